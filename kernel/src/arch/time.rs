//! Time: the TSC and the local APIC timer, both calibrated once against the PIT. Uptime for log
//! timestamps, bounded busy-wait delays, and the timer interrupt's tick counter.

use super::apic::{self, PitPorts};
use super::idt::Frame;
use super::interrupts::vectors;
use conduit_apic::lapic::TimerMode;
use conduit_apic::{ApicError, pit, rate_hz, ticks_in_us};
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);
static APIC_TIMER_HZ: AtomicU64 = AtomicU64::new(0);

/// Divider used for the local APIC timer everywhere.
pub const APIC_TIMER_DIVIDE: u32 = 16;
/// Calibration window.
const CALIBRATION_US: u64 = 10_000;
/// Reads of port 0x61 before the PIT counts as broken: a 10 ms window takes about 10 000 reads
/// on hardware (~1 µs each) and about 2.5 million under `-icount shift=0` (1 ns per
/// instruction), so 20 million bounds a broken PIT to seconds.
const PIT_POLL_LIMIT: u64 = 20_000_000;

/// Measured clock rates.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub struct Calibration {
    /// TSC ticks per second.
    pub tsc_hz: u64,
    /// Local APIC timer ticks per second at divide `APIC_TIMER_DIVIDE`.
    pub apic_timer_hz: u64,
    /// Window the PIT measured, microseconds.
    pub window_us: u64,
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged here (CR4.TSD is clear), reads a counter and has no
    // memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Marks time zero for `uptime_us`.
pub fn mark_boot() {
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
}

/// Calibrates the TSC and the local APIC timer against a 10 ms PIT window. Interrupts must be
/// off; the local APIC must be enabled.
pub fn calibrate() -> Result<Calibration, ApicError> {
    let lapic = apic::local();
    let mut start_tsc = 0u64;
    let window_us = pit::measure(&mut PitPorts, CALIBRATION_US, PIT_POLL_LIMIT, || {
        // Cannot fail: valid vector and divide.
        let _ = lapic.start_timer(TimerMode::OneShot, vectors::TIMER, APIC_TIMER_DIVIDE, u32::MAX);
        start_tsc = rdtsc();
    })?;
    let end_tsc = rdtsc();
    let remaining = lapic.timer_current();
    lapic.stop_timer();
    let tsc_hz = rate_hz(end_tsc.wrapping_sub(start_tsc), window_us).ok_or(ApicError::Timeout)?;
    let apic_timer_hz = rate_hz(u64::from(u32::MAX - remaining), window_us).ok_or(ApicError::Timeout)?;
    if tsc_hz == 0 || apic_timer_hz == 0 {
        return Err(ApicError::Timeout);
    }
    TSC_HZ.store(tsc_hz, Ordering::Relaxed);
    APIC_TIMER_HZ.store(apic_timer_hz, Ordering::Relaxed);
    Ok(Calibration { tsc_hz, apic_timer_hz, window_us })
}

/// TSC ticks per second (0 before calibration).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Microseconds since `mark_boot` (0 before calibration).
pub fn uptime_us() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return 0;
    }
    let ticks = rdtsc().wrapping_sub(TSC_AT_BOOT.load(Ordering::Relaxed));
    u64::try_from(u128::from(ticks) * 1_000_000 / u128::from(hz)).unwrap_or(u64::MAX)
}

/// A deadline `us` microseconds from now, in TSC ticks.
pub fn deadline_after_us(us: u64) -> u64 {
    rdtsc().saturating_add(ticks_in_us(tsc_hz().max(1), us))
}

/// True once `deadline` (from `deadline_after_us`) has passed.
pub fn passed(deadline: u64) -> bool {
    rdtsc() >= deadline
}

/// Busy-waits `us` microseconds (calibrated TSC; bounded by construction).
pub fn delay_us(us: u64) {
    let deadline = deadline_after_us(us);
    while !passed(deadline) {
        core::hint::spin_loop();
    }
}

/// Starts this CPU's local APIC timer: `hz` interrupts per second, periodic or once.
pub fn start_timer(mode: TimerMode, hz: u64) -> Result<(), ApicError> {
    let per = APIC_TIMER_HZ.load(Ordering::Relaxed);
    if per == 0 || hz == 0 {
        return Err(ApicError::Timeout);
    }
    let count = u32::try_from((per / hz).max(1)).unwrap_or(u32::MAX);
    apic::local().start_timer(mode, vectors::TIMER, APIC_TIMER_DIVIDE, count)
}

/// Starts this CPU's local APIC timer once, to fire when the TSC reaches `deadline` (at
/// once, one tick away, if it already has).
pub fn start_oneshot_at(deadline: u64) {
    let (tsc_hz, apic_hz) = (TSC_HZ.load(Ordering::Relaxed), APIC_TIMER_HZ.load(Ordering::Relaxed));
    if tsc_hz == 0 || apic_hz == 0 {
        return;
    }
    let delta = deadline.saturating_sub(rdtsc());
    let count = u128::from(delta) * u128::from(apic_hz) / u128::from(tsc_hz);
    let count = u32::try_from(count).unwrap_or(u32::MAX).max(1);
    // Cannot fail: valid vector and divide.
    let _ = apic::local().start_timer(TimerMode::OneShot, vectors::TIMER, APIC_TIMER_DIVIDE, count);
}

/// Stops this CPU's local APIC timer.
pub fn stop_timer() {
    apic::local().stop_timer();
}

/// Timer interrupt: counts a tick on this CPU.
pub fn on_timer(_frame: &mut Frame) {
    super::percpu::this_cpu().timer_ticks.fetch_add(1, Ordering::Relaxed);
}
