//! `smp_two_cpus`: every enabled CPU is online and runs code. Each CPU (the bootstrap processor
//! directly, each AP through its mailbox and a wake-up IPI) checks its live APIC ID against the
//! one recorded at start-up, takes a one-shot interrupt from its own APIC timer, and counts
//! itself in an atomic; the count is checked and printed.

use super::check;
use crate::arch::percpu::{self, CpuState, MAX_CPUS, PerCpu, Work};
use crate::arch::{apic, smp, time};
use crate::{Platform, println};
use conduit_apic::lapic::TimerMode;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

static CHECKED_IN: AtomicUsize = AtomicUsize::new(0);
static LIVE_APIC_ID: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(u32::MAX) }; MAX_CPUS];
static TIMER_FIRED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static CHECK_IN: Work = Work { name: "smp-check-in", run: check_in };

/// How long a CPU waits for its own timer interrupt, and the BSP for all check-ins.
const WAIT_US: u64 = 200_000;

fn check_in(me: &'static PerCpu) {
    let i = me.index();
    LIVE_APIC_ID[i].store(apic::local().id(), Ordering::Relaxed);
    let before = me.timer_ticks.load(Ordering::Relaxed);
    if time::start_timer(TimerMode::OneShot, 1000).is_ok() {
        let deadline = time::deadline_after_us(WAIT_US);
        while me.timer_ticks.load(Ordering::Relaxed) == before && !time::passed(deadline) {
            core::hint::spin_loop();
        }
        time::stop_timer();
    }
    TIMER_FIRED[i].store(me.timer_ticks.load(Ordering::Relaxed) > before, Ordering::Relaxed);
    CHECKED_IN.fetch_add(1, Ordering::AcqRel);
}

pub fn run(p: &Platform) -> Result<(), &'static str> {
    let enabled = p.madt.enabled_cpus().count();
    let online = smp::online();
    println!("smp: {} CPUs enabled in MADT, {} online", enabled, online);
    check(enabled >= 2, "needs at least two CPUs (-smp 2)")?;
    check(online == enabled, "not every enabled CPU came online")?;
    let cpus: heapless::Vec<&'static PerCpu, MAX_CPUS> =
        percpu::all().iter().filter(|c| c.state() == CpuState::Online).collect();
    check(cpus.len() == online, "online count and CPU states disagree")?;
    for c in cpus.iter().filter(|c| c.index() != 0) {
        smp::run_on(c.index(), &CHECK_IN).map_err(|_| "could not post work to an AP")?;
    }
    check_in(percpu::this_cpu());
    let deadline = time::deadline_after_us(WAIT_US * 5);
    while CHECKED_IN.load(Ordering::Acquire) < online && !time::passed(deadline) {
        core::hint::spin_loop();
    }
    for c in &cpus {
        let i = c.index();
        let recorded = c.apic_id.load(Ordering::Relaxed);
        let live = LIVE_APIC_ID[i].load(Ordering::Relaxed);
        let fired = TIMER_FIRED[i].load(Ordering::Relaxed);
        println!(
            "smp: cpu {} apic {}: live apic id {}, own timer interrupt {}, wake-ups {}",
            i,
            recorded,
            live,
            if fired { "taken" } else { "MISSING" },
            c.wakeups.load(Ordering::Relaxed)
        );
        check(live == recorded, "a CPU's live APIC ID differs from the recorded one")?;
        check(fired, "a CPU did not take its own timer interrupt")?;
    }
    let n = CHECKED_IN.load(Ordering::Acquire);
    println!("smp: {} of {} CPUs checked in", n, online);
    defmt::info!("smp: {=usize} of {=usize} CPUs checked in", n, online);
    check(n == online, "not every CPU checked in")
}
