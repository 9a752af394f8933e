//! `irq_stress`: an MSI-X entry retargeted and masked continuously while its device keeps
//! interrupting (QEMU nvme at 00:01.0, two vCPUs).
//! - vCPU 0 is the NVMe driver: entries 0 (admin, 0x60) and 1 (I/O queue 1, 0x61) live on
//!   vCPU 0; it submits 4000 one-block Reads on queue 1, one at a time, each completion found by
//!   polling the CQ (not by interrupt);
//! - vCPU 1 meanwhile churns entry 1: mask, retarget to vCPU 0 or 1 alternately (vector 0x61
//!   on both), unmask, short pause, and counts the cycles;
//! - both count their 0x61 interrupts; after the 4000 completions vCPU 1 stops churning and
//!   leaves entry 1 unmasked on vCPU 0; after 50 ms of quiet, IRQ_STATS of entry 1 must match:
//!   delivered = the two vCPUs' counts together, raised = delivered + coalesced + spurious,
//!   spurious 0, nothing pending, raised ≥ 4000 / 4.
//!
//! vCPU 0 prints the results and checks; vCPU 1 prints its own counts and waits for vCPU 0 to
//! finish before it exits.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use conduit_guest_rt::abi::irq;
use conduit_guest_rt::devices::nvme::{self, NvmeFunction, Wait, opcode};
use conduit_guest_rt::memory;
use conduit_guest_rt::msix::MsiX;
use conduit_guest_rt::pci::{BarWindow, Bdf};
use conduit_guest_rt::report::Report;
use conduit_guest_rt::sync::Once;
use conduit_guest_rt::{BootInfo, cpu, entry, hypercall, interrupts, lapic, msi, println, time};

entry!(main);

const NAME: &str = "irq_stress";
/// Where the partition's first device appears (`docs/devices.md`).
const NVME_BDF: Bdf = Bdf::new(0, 1, 0);
/// Vectors of entry 0 (admin queue) and entry 1 (I/O queue 1).
const ADMIN_VECTOR: u8 = 0x60;
const IO_VECTOR: u8 = 0x61;
/// The churned entry.
const CHURNED: u16 = 1;
/// Reads submitted on queue 1.
const COMMANDS: u64 = 4000;
/// `raised` must be at least `COMMANDS / RAISED_FACTOR` (masking may merge signals).
const RAISED_FACTOR: u64 = 4;
/// Entries per queue.
const QUEUE_ENTRIES: u16 = 16;
/// Namespace.
const NSID: u32 = 1;
/// Pause between churn cycles.
const CHURN_PAUSE_US: u64 = 20;
/// Quiet time before the statistics are read.
const QUIESCE_US: u64 = 50_000;
/// Bound of each hand-over wait between the vCPUs.
const HANDOVER_US: u64 = 10_000_000;
/// Longest the churn may run (vCPU 0 stops it long before).
const CHURN_LIMIT_US: u64 = 300_000_000;

/// The run's phases, published by one vCPU to the other.
mod phase {
    /// vCPU 0 is setting up.
    pub const SETUP: u32 = 0;
    /// Entry 1 is live and published: vCPU 1 churns.
    pub const CHURN: u32 = 1;
    /// vCPU 0 completed its commands: vCPU 1 stops churning.
    pub const STOP: u32 = 2;
    /// vCPU 1 left entry 1 unmasked on vCPU 0 and churns no more.
    pub const STOPPED: u32 = 3;
    /// vCPU 0 has checked everything: vCPU 1 may exit.
    pub const DONE: u32 = 4;
    /// vCPU 0 gave up during set-up.
    pub const ABORT: u32 = 0xdead;
}

static PHASE: AtomicU32 = AtomicU32::new(phase::SETUP);
/// Entry 1's MSI-X table, set up by vCPU 0.
static MSIX: Once<MsiX> = Once::new();
/// Churn cycles done by vCPU 1.
static CHURN_CYCLES: AtomicU64 = AtomicU64::new(0);
/// 0x61 interrupts taken by vCPU 0, vCPU 1, and any other vCPU.
static IO_INTERRUPTS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// Handler of 0x61: counts per vCPU (the local APIC ID is the vCPU index).
fn io_interrupt(_vector: u8) {
    let slot = (lapic::id() as usize).min(2);
    IO_INTERRUPTS[slot].fetch_add(1, Ordering::Relaxed);
}

fn io_count(slot: usize) -> u64 {
    IO_INTERRUPTS[slot].load(Ordering::Relaxed)
}

fn set_phase(p: u32) {
    PHASE.store(p, Ordering::Release);
}

fn phase() -> u32 {
    PHASE.load(Ordering::Acquire)
}

/// Waits (bounded) until the phase is `want` (or ABORT).
fn wait_phase(want: u32, timeout_us: u64) -> bool {
    time::wait_until(time::deadline_after_us(timeout_us), || {
        let p = phase();
        p == want || p == phase::ABORT
    }) && phase() == want
}

fn main(info: &'static BootInfo) -> u64 {
    cpu::cli();
    interrupts::register(ADMIN_VECTOR, interrupts::count_only);
    interrupts::register(IO_VECTOR, io_interrupt);
    lapic::enable(interrupts::SPURIOUS_VECTOR);
    lapic::set_tpr(0);
    cpu::sti();
    let mut r = Report::new(NAME);
    match info.vcpu {
        0 => {
            if info.vcpus < 2 {
                r.fail(format_args!("needs 2 vCPUs, the partition has {}", info.vcpus));
                set_phase(phase::ABORT);
            } else {
                driver(&mut r, info);
            }
        }
        1 => churner(&mut r),
        other => println!("{NAME}: vcpu {other} has nothing to do"),
    }
    r.finish()
}

/// vCPU 0: sets up, runs the commands, stops the churn, checks.
fn driver(r: &mut Report, info: &BootInfo) {
    let Some(mut dev) = setup(r, info) else {
        set_phase(phase::ABORT);
        return;
    };
    let published = MSIX.set(dev.msix).is_ok();
    r.check(published, format_args!("MSI-X handle already published"));
    set_phase(phase::CHURN);
    let started = time::wait_until(time::deadline_after_us(HANDOVER_US), || CHURN_CYCLES.load(Ordering::Relaxed) > 0);
    if !r.check(started, format_args!("vcpu 1 did not start churning within {HANDOVER_US} us")) {
        set_phase(phase::ABORT);
        return;
    }
    println!("{NAME}: vcpu 0: entry 1 churning on vcpu 1; submitting {COMMANDS} reads on queue 1, polling");

    let completions = run_commands(r, &mut dev);
    let cycles_at_stop = CHURN_CYCLES.load(Ordering::Relaxed);
    set_phase(phase::STOP);
    if !r.check(
        wait_phase(phase::STOPPED, HANDOVER_US),
        format_args!("vcpu 1 did not stop churning within {HANDOVER_US} us"),
    ) {
        set_phase(phase::ABORT);
        return;
    }
    let cycles = CHURN_CYCLES.load(Ordering::Relaxed);
    let e = dev.msix.entry(CHURNED);
    r.check(
        !e.masked() && e.address == u64::from(msi::message_address(0)) && e.data == u32::from(IO_VECTOR),
        format_args!("entry 1 after the churn: {e:?}, expected unmasked, vcpu 0, {IO_VECTOR:#04x}"),
    );
    time::delay_us(QUIESCE_US);

    let (on0, on1, other) = (io_count(0), io_count(1), io_count(2));
    let total = on0 + on1 + other;
    println!("{NAME}: completions {completions}, churn cycles {cycles} ({cycles_at_stop} while commands ran)");
    println!("{NAME}: interrupts at {IO_VECTOR:#04x}: vcpu 0 {on0}, vcpu 1 {on1}, total {total}");
    r.check(completions == COMMANDS, format_args!("{completions} of {COMMANDS} commands completed"));
    r.check(cycles_at_stop > 0, format_args!("no churn cycle overlapped the commands"));
    r.check(other == 0, format_args!("{other} interrupts at {IO_VECTOR:#04x} on a vCPU other than 0 and 1"));
    r.check(!dev.msix.pending(CHURNED), format_args!("PBA bit 1 still set after {QUIESCE_US} us of quiet"));
    match hypercall::irq_stats(NVME_BDF.rid(), irq::INDEX_MSIX, u64::from(CHURNED)) {
        Ok(s) => {
            println!(
                "{NAME}: IRQ_STATS entry 1: raised {} delivered {} coalesced {} masked {} spurious {} pending {}",
                s.raised, s.delivered, s.coalesced, s.pending_while_masked, s.spurious, s.pending
            );
            r.check(s.delivered == total, format_args!("delivered {} but the guest counted {total}", s.delivered));
            r.check(
                s.raised == s.delivered + s.coalesced + s.spurious,
                format_args!(
                    "raised {} != delivered {} + coalesced {} + spurious {}",
                    s.raised, s.delivered, s.coalesced, s.spurious
                ),
            );
            r.check(s.spurious == 0, format_args!("spurious {}, expected 0", s.spurious));
            r.check(s.pending == 0, format_args!("a signal is still pending behind the mask"));
            let floor = COMMANDS / RAISED_FACTOR;
            r.check(
                s.raised >= floor,
                format_args!("raised {} for {COMMANDS} completions, expected at least {floor}", s.raised),
            );
        }
        Err(e) => {
            r.fail(format_args!("IRQ_STATS({:#06x}, MSI-X, 1) -> {e} ({})", NVME_BDF.rid(), hypercall::error_name(e)))
        }
    }
    r.check(
        interrupts::unexpected() == 0,
        format_args!(
            "{} interrupts at unexpected vectors (last {:#04x})",
            interrupts::unexpected(),
            interrupts::last_unexpected().unwrap_or(0)
        ),
    );
    r.check(interrupts::spurious() == 0, format_args!("{} spurious interrupts", interrupts::spurious()));
    if r.passed() {
        println!(
            "{NAME}: all checks passed: {COMMANDS} completions; guest count = IRQ_STATS delivered, no spurious, none pending"
        );
    }
    set_phase(phase::DONE);
}

/// Opens the controller with entries 0 and 1 live on vCPU 0, identifies namespace 1 and
/// creates I/O queue pair 1 on entry 1; every admin completion is polled.
fn setup(r: &mut Report, info: &BootInfo) -> Option<NvmeFunction> {
    let mut window = r.require("BAR window", BarWindow::from_boot_info(info))?;
    let mut dev = r.require("opening the NVMe function", nvme::open(info, &mut window))?;
    if !r.check(
        dev.function.bdf() == NVME_BDF,
        format_args!("nvme found at {}, expected {NVME_BDF}", dev.function.bdf()),
    ) {
        return None;
    }
    let msix = dev.msix;
    msix.set_function_mask(false);
    msix.enable();
    msix.program(0, 0, ADMIN_VECTOR);
    msix.program(CHURNED, 0, IO_VECTOR);
    msix.unmask(0);
    msix.unmask(CHURNED);
    if !r.check(
        msix.is_enabled() && !msix.is_masked(0) && !msix.is_masked(CHURNED),
        format_args!("MSI-X control {:#06x}, entry 0 {:?}, entry 1 {:?}", msix.control(), msix.entry(0), msix.entry(1)),
    ) {
        return None;
    }
    let c = &mut dev.controller;
    r.require("enabling the controller", c.init(QUEUE_ENTRIES))?;
    let buf = r.require("identify buffer", memory::alloc_pages(1).ok_or("no free memory"))?;
    let ns = r.require("Identify Namespace 1", c.identify_namespace(NSID, &buf, Wait::Poll))?;
    if !r.check(ns.blocks > 0, format_args!("namespace 1 has no blocks")) {
        return None;
    }
    r.require("creating I/O queue pair 1", c.create_io_queue_pair(1, QUEUE_ENTRIES, Some(CHURNED), Wait::Poll))?;
    println!(
        "{NAME}: vcpu 0: entries 0 ({ADMIN_VECTOR:#04x}) and 1 ({IO_VECTOR:#04x}) live; I/O queue 1 on entry 1; namespace 1: {} blocks",
        ns.blocks
    );
    Some(dev)
}

/// `COMMANDS` one-block Reads on queue 1, one at a time, each completion polled. Returns how
/// many completed.
fn run_commands(r: &mut Report, dev: &mut NvmeFunction) -> u64 {
    let Some(buf) = memory::alloc_pages(1) else {
        r.fail(format_args!("no free memory for the read buffer"));
        return 0;
    };
    let blocks = 1 << 20 >> 9; // read within the first MiB, which every test image has
    for i in 0..COMMANDS {
        let cmd = match dev.controller.io_command(opcode::READ, NSID, i % blocks, 1, &buf, 0) {
            Ok(cmd) => cmd,
            Err(e) => {
                r.fail(format_args!("building read {i}: {e}"));
                return i;
            }
        };
        if let Err(e) = dev.controller.run(1, &cmd, Wait::Poll, nvme::COMMAND_TIMEOUT_US) {
            r.fail(format_args!("read {i} of {COMMANDS}: {e}"));
            return i;
        }
    }
    COMMANDS
}

/// vCPU 1: churns entry 1 until told to stop, then leaves it unmasked on vCPU 0.
fn churner(r: &mut Report) {
    if !wait_phase(phase::CHURN, HANDOVER_US * 3) {
        println!("{NAME}: vcpu 1: vcpu 0 did not publish entry 1 (phase {:#x})", phase());
        r.fail(format_args!("no churn: vcpu 0 did not get ready"));
        return;
    }
    let Some(msix) = MSIX.get().copied() else {
        r.fail(format_args!("vcpu 0 published no MSI-X handle"));
        set_phase(phase::ABORT);
        return;
    };
    let deadline = time::deadline_after_us(CHURN_LIMIT_US);
    let mut target = 1u8;
    while phase() == phase::CHURN {
        msix.mask(CHURNED);
        msix.set_destination(CHURNED, target);
        msix.unmask(CHURNED);
        CHURN_CYCLES.fetch_add(1, Ordering::Relaxed);
        target ^= 1;
        time::delay_us(CHURN_PAUSE_US);
        if time::uptime_us() >= deadline {
            r.fail(format_args!("vcpu 0 did not stop the churn within {CHURN_LIMIT_US} us"));
            break;
        }
    }
    msix.mask(CHURNED);
    msix.set_destination(CHURNED, 0);
    msix.unmask(CHURNED);
    let cycles = CHURN_CYCLES.load(Ordering::Relaxed);
    if phase() == phase::STOP {
        set_phase(phase::STOPPED);
    }
    // Interrupts may still reach this vCPU until vCPU 0 is done checking: stay to take them.
    let done = wait_phase(phase::DONE, HANDOVER_US * 3);
    println!("{NAME}: vcpu 1: {cycles} churn cycles, {} interrupts at {IO_VECTOR:#04x}", io_count(1));
    r.check(done, format_args!("vcpu 1: vcpu 0 did not finish within {} us", HANDOVER_US * 3));
}
