//! Time and bounded waits. Deadlines are `UPTIME_US` values (microseconds since the hypervisor
//! booted); between two uptime checks a wait spins on the TSC (`BootInfo::tsc_hz`), so a
//! waiting vCPU keeps running in the guest instead of exiting on every iteration.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::{cpu, hypercall};

/// Longest stretch a wait spins on the TSC alone before asking for the uptime again.
const TSC_SLICE_US: u64 = 10_000;

/// TSC ticks per microsecond (0: unknown, every check asks for the uptime).
static TSC_PER_US: AtomicU64 = AtomicU64::new(0);

/// Sets the TSC rate from `BootInfo::tsc_hz`.
pub(crate) fn set_tsc_hz(tsc_hz: u64) {
    TSC_PER_US.store(tsc_hz / 1_000_000, Ordering::Relaxed);
}

/// Microseconds since the hypervisor booted (the `UPTIME_US` hypercall).
pub fn uptime_us() -> u64 {
    hypercall::uptime_us()
}

/// The uptime `us` microseconds from now.
pub fn deadline_after_us(us: u64) -> u64 {
    uptime_us().saturating_add(us)
}

/// Spins until `cond()` holds (returns true) or the uptime reaches `deadline_us` (returns
/// `cond()` checked once more). `cond` is checked at least once and then continuously.
pub fn wait_until(deadline_us: u64, mut cond: impl FnMut() -> bool) -> bool {
    let tsc_per_us = TSC_PER_US.load(Ordering::Relaxed);
    loop {
        if cond() {
            return true;
        }
        let now = uptime_us();
        if now >= deadline_us {
            return cond();
        }
        let slice_us = (deadline_us - now).min(TSC_SLICE_US);
        let start = cpu::rdtsc();
        let ticks = slice_us.saturating_mul(tsc_per_us);
        while cpu::rdtsc().wrapping_sub(start) < ticks {
            if cond() {
                return true;
            }
            cpu::pause();
        }
        cpu::pause();
    }
}

/// Waits `us` microseconds (interrupts are taken meanwhile if enabled).
pub fn delay_us(us: u64) {
    wait_until(deadline_after_us(us), || false);
}

/// Spins on the TSC alone — no exit at all — until `cond()` holds or `us` microseconds passed
/// (`BootInfo::tsc_hz`; falls back to `wait_until` when the rate is unknown). Use it where the
/// hypervisor must interrupt a running vCPU to deliver (a kick), not wait for its next exit.
pub fn spin_without_exits(us: u64, mut cond: impl FnMut() -> bool) -> bool {
    let tsc_per_us = TSC_PER_US.load(Ordering::Relaxed);
    if tsc_per_us == 0 {
        return wait_until(deadline_after_us(us), cond);
    }
    let start = cpu::rdtsc();
    let ticks = us.saturating_mul(tsc_per_us);
    while cpu::rdtsc().wrapping_sub(start) < ticks {
        if cond() {
            return true;
        }
        cpu::pause();
    }
    cond()
}
