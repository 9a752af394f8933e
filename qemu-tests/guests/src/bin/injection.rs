//! `injection`: interrupts injected by the hypervisor's supervisor, checked for order, count and
//! masking. The guest records every arrival at 0x45, 0x51, 0x62, 0x73 and 0x74, and runs five
//! phases, each started by a SIGNAL (every wait bounded, a timeout is a failure):
//! - A (halted): IF=0, SIGNAL 1, `sti; hlt` until 4 arrivals. The supervisor raises 0x51, 0x62,
//!   0x73, 0x74 at once while the vCPU halts: expect 0x74 0x73 0x62 0x51 (priority order).
//! - B (spinning, IF=1): SIGNAL 2; the supervisor raises the four one at a time: expect them in
//!   that order, each once.
//! - C (spinning, IF=0): SIGNAL 3, spin until the mailbox reads 3 (the supervisor raised all
//!   four meanwhile): nothing may arrive; after `sti` expect 0x74 0x73 0x62 0x51.
//! - D (TPR): TPR 0x60, SIGNAL 4; the supervisor raises 0x51, 0x62, 0x73: only 0x73 arrives,
//!   0x51 and 0x62 stay requested (IRR) until TPR 0, then 0x62, 0x51.
//! - E (timer): a 1 ms one-shot of the virtual APIC timer at 0x45, waited for halted: exactly one
//!   arrival, current count 0.
//! - F (CR8): `mov cr8, 6`, SIGNAL 6; the supervisor raises 0x51, 0x62, 0x73: only 0x73
//!   arrives; `mov cr8, 0` (which must exit: an interrupt waits on the priority) releases 0x62,
//!   then 0x51.
//!
//! Phases B, D and F wait by spinning on the TSC with no exit at all, so every vector the
//! supervisor raises meanwhile reaches the running vCPU only through the kick IPI.
//!
//! Only vCPU 0 takes part (other vCPUs exit at once with `PASS`).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU8, AtomicU32, AtomicUsize, Ordering};

use conduit_guest_rt::lapic::{self, Divide};
use conduit_guest_rt::report::Report;
use conduit_guest_rt::{BootInfo, cpu, entry, hypercall, interrupts, println, time};
use conduit_test_guests::VectorList;

entry!(main);

/// Vectors the supervisor raises, and the timer's.
const V51: u8 = 0x51;
const V62: u8 = 0x62;
const V73: u8 = 0x73;
const V74: u8 = 0x74;
const TIMER: u8 = 0x45;
/// Watchdog timer vector (lowest priority class) that bounds the halted wait of phase A.
const WATCHDOG: u8 = 0x30;

/// Bound of every wait for arrivals.
const PHASE_WAIT_US: u64 = 2_000_000;
/// Quiet time after a phase in which nothing more may arrive.
const SETTLE_US: u64 = 10_000;

/// Every arrival at a recorded vector, in order.
static LOG: [AtomicU8; 64] = [const { AtomicU8::new(0) }; 64];
/// Arrivals so far (the next `LOG` index).
static ARRIVALS: AtomicUsize = AtomicUsize::new(0);
/// Arrivals per vector.
static PER_VECTOR: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];
/// Watchdog ticks.
static WATCHDOG_TICKS: AtomicU32 = AtomicU32::new(0);

/// Handler of the recorded vectors.
fn record(vector: u8) {
    let i = ARRIVALS.fetch_add(1, Ordering::Relaxed);
    if let Some(slot) = LOG.get(i) {
        slot.store(vector, Ordering::Relaxed);
    }
    PER_VECTOR[usize::from(vector)].fetch_add(1, Ordering::Relaxed);
}

fn watchdog(_vector: u8) {
    WATCHDOG_TICKS.fetch_add(1, Ordering::Relaxed);
}

fn arrivals() -> usize {
    ARRIVALS.load(Ordering::Relaxed)
}

fn count(vector: u8) -> u32 {
    PER_VECTOR[usize::from(vector)].load(Ordering::Relaxed)
}

/// The arrivals from index `from` on.
fn since(from: usize) -> VectorList {
    let mut list = VectorList::new();
    for i in from..arrivals() {
        match LOG.get(i) {
            Some(slot) => list.push(slot.load(Ordering::Relaxed)),
            None => list.push(0),
        }
    }
    list
}

/// Spins (interrupts as they are) until `n` arrivals since `from`, for at most `PHASE_WAIT_US`,
/// without any exit: arrivals come through kicks.
fn spin_for(from: usize, n: usize) -> bool {
    time::spin_without_exits(PHASE_WAIT_US, || arrivals() - from >= n)
}

/// Sets the task priority through CR8 (`mov cr8, reg`).
fn set_cr8(class: u64) {
    // SAFETY:
    // 1. CPL 0 in 64-bit mode: MOV to CR8 is allowed; values 0-15 are valid (bits 63:4 zero).
    // 2. It changes only the task priority: which interrupts the vCPU takes, nothing else.
    unsafe { core::arch::asm!("mov cr8, {}", in(reg) class & 0xf, options(nostack, preserves_flags)) };
}

/// Checks `got` is `want` and prints the phase line.
fn expect(r: &mut Report, phase: &str, got: &VectorList, want: &[u8]) {
    let mut expected = VectorList::new();
    for &v in want {
        expected.push(v);
    }
    if r.check(got.is(want), format_args!("{phase}: got {got}, expected {expected}")) {
        println!("injection: {phase}: {got}");
    }
}

fn main(info: &'static BootInfo) -> u64 {
    let mut r = Report::new("injection");
    if info.vcpu != 0 {
        // The record is one per partition; the supervisor drives vCPU 0.
        println!("injection: vcpu {} has nothing to do", info.vcpu);
        return r.finish();
    }
    cpu::cli();
    for v in [TIMER, V51, V62, V73, V74] {
        interrupts::register(v, record);
    }
    interrupts::register(WATCHDOG, watchdog);
    lapic::enable(interrupts::SPURIOUS_VECTOR);
    lapic::set_tpr(0);

    phase_a(&mut r, info);
    phase_b(&mut r);
    phase_c(&mut r);
    phase_d(&mut r);
    phase_e(&mut r, info);
    phase_f(&mut r);

    cpu::cli();
    for (v, want) in [(V51, 5), (V62, 5), (V73, 5), (V74, 3), (TIMER, 1)] {
        r.check(count(v) == want, format_args!("vector {v:#04x} arrived {} times in all, expected {want}", count(v)));
    }
    r.check(
        interrupts::unexpected() == 0,
        format_args!(
            "{} interrupts at vectors without a handler (last {:#04x})",
            interrupts::unexpected(),
            interrupts::last_unexpected().unwrap_or(0)
        ),
    );
    r.check(interrupts::spurious() == 0, format_args!("{} spurious interrupts", interrupts::spurious()));
    if r.passed() {
        println!("injection: every vector arrived exactly once per raise, higher priority first");
    }
    r.finish()
}

/// The finest divider whose count for `us` microseconds at `apic_timer_hz` fits the 32-bit
/// initial count, with that count (`None` if the rate is 0).
fn timer_count(apic_timer_hz: u64, us: u64) -> Option<(u32, Divide)> {
    [Divide::By1, Divide::By2, Divide::By4, Divide::By8, Divide::By16, Divide::By32, Divide::By64, Divide::By128]
        .into_iter()
        .find_map(|d| {
            let count = apic_timer_hz / u64::from(d.divisor()) * us / 1_000_000;
            u32::try_from(count).ok().filter(|&c| c > 0).map(|c| (c, d))
        })
}

/// A: four vectors raised at once while halted arrive in priority order.
fn phase_a(r: &mut Report, info: &BootInfo) {
    const PHASE: &str = "phase A (halted)";
    let from = arrivals();
    // The watchdog wakes the halt loop if the supervisor never raises anything.
    let watchdog = timer_count(info.apic_timer_hz, PHASE_WAIT_US);
    if let Some((count, divide)) = watchdog {
        lapic::timer_oneshot(WATCHDOG, count, divide);
    }
    let deadline_us = time::deadline_after_us(PHASE_WAIT_US);
    hypercall::signal(1);
    while arrivals() - from < 4 && time::uptime_us() < deadline_us {
        if watchdog.is_some() && WATCHDOG_TICKS.load(Ordering::Relaxed) == 0 {
            cpu::sti_hlt();
        } else {
            // Nothing left to bound a halt (no usable timer rate, or the watchdog already
            // fired): poll until the deadline instead.
            cpu::sti();
            time::wait_until(deadline_us, || arrivals() - from >= 4);
        }
        cpu::cli();
    }
    lapic::timer_stop();
    let got = since(from);
    if !r.check(got.total() >= 4, format_args!("{PHASE}: timed out after 2 s with {got}")) {
        return;
    }
    r.check(
        WATCHDOG_TICKS.load(Ordering::Relaxed) == 0,
        format_args!("{PHASE}: the 2 s watchdog fired: the raised vectors did not wake the halted vCPU"),
    );
    expect(r, PHASE, &got, &[V74, V73, V62, V51]);
}

/// B: four vectors raised one at a time while the vCPU spins with IF=1 arrive once each.
fn phase_b(r: &mut Report) {
    const PHASE: &str = "phase B (spinning, IF=1)";
    let from = arrivals();
    cpu::sti();
    hypercall::signal(2);
    let done = spin_for(from, 4);
    time::delay_us(SETTLE_US);
    let got = since(from);
    if r.check(done, format_args!("{PHASE}: timed out after 2 s with {got}")) {
        expect(r, PHASE, &got, &[V51, V62, V73, V74]);
    }
}

/// C: vectors raised while IF=0 wait, then arrive in priority order after `sti`.
fn phase_c(r: &mut Report) {
    const PHASE: &str = "phase C (spinning, IF=0)";
    cpu::cli();
    let from = arrivals();
    hypercall::signal(3);
    let posted = time::wait_until(time::deadline_after_us(PHASE_WAIT_US), || hypercall::mailbox() == 3);
    let early = since(from);
    r.check(posted, format_args!("{PHASE}: mailbox did not read 3 within 2 s"));
    r.check(early.total() == 0, format_args!("{PHASE}: {early} arrived while IF=0"));
    let from = arrivals();
    cpu::sti();
    let done = spin_for(from, 4);
    time::delay_us(SETTLE_US);
    let got = since(from);
    if r.check(done, format_args!("{PHASE}: timed out after sti with {got}")) {
        expect(r, PHASE, &got, &[V74, V73, V62, V51]);
    }
}

/// D: the task priority holds back classes at or below it until it is lowered.
fn phase_d(r: &mut Report) {
    const PHASE: &str = "phase D (TPR 0x60, then 0)";
    let from = arrivals();
    lapic::set_tpr(0x60);
    cpu::sti();
    hypercall::signal(4);
    let first = spin_for(from, 1);
    time::delay_us(20_000);
    let held = since(from);
    let ok = r.check(first, format_args!("{PHASE}: nothing arrived within 2 s"))
        & r.check(held.is(&[V73]), format_args!("{PHASE}: with TPR 0x60 got {held}, expected 0x73 only"))
        & r.check(
            lapic::irr_bit(V51) && lapic::irr_bit(V62),
            format_args!(
                "{PHASE}: IRR bits with TPR 0x60: 0x51 {}, 0x62 {} (both expected set)",
                lapic::irr_bit(V51),
                lapic::irr_bit(V62)
            ),
        );
    let from_low = arrivals();
    lapic::set_tpr(0);
    let done = spin_for(from_low, 2);
    time::delay_us(SETTLE_US);
    let low = since(from_low);
    let ok = ok & r.check(done, format_args!("{PHASE}: after TPR 0 timed out with {low}"));
    let ok = ok & r.check(low.is(&[V62, V51]), format_args!("{PHASE}: after TPR 0 got {low}, expected 0x62 0x51"));
    if ok {
        println!("injection: {PHASE}: {}", since(from));
    }
}

/// E: a 1 ms one-shot timer interrupt wakes the halted vCPU exactly once.
fn phase_e(r: &mut Report, info: &BootInfo) {
    const PHASE: &str = "phase E (timer)";
    let count = info.apic_timer_hz / 1000;
    let Ok(count @ 1..) = u32::try_from(count) else {
        r.fail(format_args!("{PHASE}: apic_timer_hz {} gives no 1 ms count", info.apic_timer_hz));
        return;
    };
    cpu::cli();
    let from = arrivals();
    lapic::timer_oneshot(TIMER, count, Divide::By1);
    let deadline_us = time::deadline_after_us(PHASE_WAIT_US);
    // Only the timer can wake this halt: a timer that never fires hangs here (the scenario's
    // timeout reports it).
    while count_since(from, TIMER) == 0 && time::uptime_us() < deadline_us {
        cpu::sti_hlt();
        cpu::cli();
    }
    cpu::sti();
    time::delay_us(SETTLE_US);
    let got = since(from);
    let current = lapic::timer_current();
    let ok = r.check(got.is(&[TIMER]), format_args!("{PHASE}: got {got}, expected 0x45 once"))
        & r.check(current == 0, format_args!("{PHASE}: timer current count {current} after it fired, expected 0"));
    if ok {
        println!("injection: {PHASE}: {got}");
    }
}

/// F: the task priority set through CR8 holds back classes at or below it; lowering it through
/// CR8 releases them.
fn phase_f(r: &mut Report) {
    const PHASE: &str = "phase F (CR8 6, then 0)";
    let from = arrivals();
    set_cr8(6);
    cpu::sti();
    hypercall::signal(6);
    let first = spin_for(from, 1);
    time::spin_without_exits(SETTLE_US * 2, || false);
    let held = since(from);
    let ok = r.check(first, format_args!("{PHASE}: nothing arrived within 2 s"))
        & r.check(held.is(&[V73]), format_args!("{PHASE}: with CR8 6 got {held}, expected 0x73 only"));
    let from_low = arrivals();
    set_cr8(0);
    let done = spin_for(from_low, 2);
    time::delay_us(SETTLE_US);
    let low = since(from_low);
    let ok = ok & r.check(done, format_args!("{PHASE}: after CR8 0 timed out with {low}"));
    let ok = ok & r.check(low.is(&[V62, V51]), format_args!("{PHASE}: after CR8 0 got {low}, expected 0x62 0x51"));
    if ok {
        println!("injection: {PHASE}: {}", since(from));
    }
}

/// Arrivals of `vector` from index `from` on.
fn count_since(from: usize, vector: u8) -> usize {
    since(from).as_slice().iter().filter(|&&v| v == vector).count()
}
