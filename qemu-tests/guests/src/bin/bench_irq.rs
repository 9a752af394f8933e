//! `bench_irq`: the forwarded-interrupt benchmark. Drives the passed-through edu device (00:01.0)
//! so that each write of its raise register sends one MSI, which Conduit forwards to vector 0x50
//! of vCPU 0. The vector is taken without an EOI (`AUTO_EOI`), the handler acknowledges edu
//! with a write straight to the device, and the guest waits for each interrupt by spinning on
//! its counter — so, in the measured window, the only exits are the ones the interrupts cause.
//!
//! The window is marked with `SIGNAL 1` and `SIGNAL 2`; the hypervisor reports, for the
//! forwarded interrupts inside it, its instructions from the INTR exit to the next VMRUN (the
//! TSC under `-icount shift=0`) and the exits per interrupt. The guest checks only that every
//! interrupt arrived.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use conduit_guest_rt::devices::edu::{self, Edu};
use conduit_guest_rt::mmio::Mmio;
use conduit_guest_rt::msi::Msi;
use conduit_guest_rt::pci::{BarWindow, Ecam, command};
use conduit_guest_rt::report::Report;
use conduit_guest_rt::{BootInfo, cpu, entry, hypercall, interrupts, lapic, println, time};

entry!(main);

const NAME: &str = "bench_irq";
const VECTOR: u8 = 0x50;
/// Interrupts before the window (warm-up) and inside it.
const WARMUP: u64 = 16;
const MEASURED: u64 = 256;
/// Bound of each wait.
const WAIT_US: u64 = 1_000_000;

static EDU_BASE: AtomicU64 = AtomicU64::new(0);

fn handler(_vector: u8) {
    let base = EDU_BASE.load(Ordering::Acquire);
    if base == 0 {
        return;
    }
    // SAFETY:
    // 1. `base` is edu's placed BAR 0 (stored by `main`); acknowledging the interrupt status
    //    starts no DMA.
    let dev = Edu::new(unsafe { Mmio::new(base, edu::REGISTER_BYTES) });
    dev.ack(dev.irq_status());
}

/// Raises one interrupt and waits for it, spinning with no exit.
fn one(dev: &Edu) -> bool {
    let before = interrupts::count(VECTOR);
    dev.raise(1);
    time::spin_without_exits(WAIT_US, || interrupts::count(VECTOR) > before)
}

fn main(info: &'static BootInfo) -> u64 {
    let mut r = Report::new(NAME);
    if info.vcpu != 0 {
        return r.finish();
    }
    cpu::cli();
    interrupts::register(VECTOR, handler);
    lapic::enable(interrupts::SPURIOUS_VECTOR);
    let auto = interrupts::set_auto_eoi(VECTOR, true);
    if !r.check(auto == 0, format_args!("AUTO_EOI refused: {auto}")) {
        return r.finish();
    }
    let Some(ecam) = r.require("ECAM window", Ecam::from_boot_info(info)) else { return r.finish() };
    let Some(f) = r.require("finding edu", ecam.find(edu::VENDOR, edu::DEVICE)) else { return r.finish() };
    let Some(mut window) = r.require("BAR window", BarWindow::from_boot_info(info)) else { return r.finish() };
    let Some(bar) = r.require("placing BAR 0", f.place_bar(0, &mut window)) else { return r.finish() };
    f.enable(command::MEMORY | command::BUS_MASTER);
    // SAFETY:
    // 1. `bar` is edu's placed memory BAR 0; this guest starts no DMA.
    let Some(regs) = (unsafe { bar.window(0, edu::REGISTER_BYTES) }) else {
        r.fail(format_args!("BAR 0 smaller than the register block"));
        return r.finish();
    };
    let dev = Edu::new(regs);
    EDU_BASE.store(dev.base(), Ordering::Release);
    let Some(msi) = r.require("MSI capability", Msi::find(f)) else { return r.finish() };
    if r.require("programming MSI", msi.program(0, VECTOR, 1)).is_none() {
        return r.finish();
    }
    msi.enable();
    cpu::sti();
    for _ in 0..WARMUP {
        if !r.check(one(&dev), format_args!("warm-up interrupt did not arrive")) {
            return r.finish();
        }
    }
    hypercall::signal(1);
    let mut arrived = 0;
    for _ in 0..MEASURED {
        if one(&dev) {
            arrived += 1;
        }
    }
    hypercall::signal(2);
    cpu::cli();
    if r.check(arrived == MEASURED, format_args!("{arrived} of {MEASURED} interrupts arrived")) {
        println!("{NAME}: {MEASURED} forwarded interrupts measured, each waited for without an exit");
    }
    r.finish()
}
