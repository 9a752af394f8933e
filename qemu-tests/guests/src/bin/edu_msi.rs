//! `edu_msi`: drives QEMU's edu device (passed through at 00:01.0) like a driver and checks its
//! MSI interrupts end to end:
//! - finds edu through ECAM, confirms its IDs through ports 0xcf8/0xcfc, sizes and places BAR 0,
//!   enables memory decode and bus master, checks the ID and inverter registers;
//! - programs MSI to vCPU 0 at 0x50; the handler reads the interrupt status (0x24), acks it
//!   (0x64) and is counted;
//! - (a) factorial of 5 with interrupt on completion: one interrupt at 0x50, result 120;
//! - (b) 20 raises (0x60), each waited for: exactly 20 more at 0x50;
//! - (c) MSI off, data 0x58, MSI on: 5 raises arrive at 0x58, none at 0x50;
//! - (d) DMA of a 256-byte pattern RAM → edu buffer → second RAM buffer: identical;
//! - (e) IRQ_INFO(MSI): 1 vector, NORESIZE; IRQ_STATS(MSI, 0): delivered = the 26 interrupts
//!   counted, raised = delivered + coalesced, coalesced 0, spurious 0.
//!
//! Only vCPU 0 takes part (other vCPUs exit at once with `PASS`).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use conduit_guest_rt::abi::irq;
use conduit_guest_rt::devices::edu::{self, Direction, Edu};
use conduit_guest_rt::mmio::Mmio;
use conduit_guest_rt::msi::{Msi, message_address};
use conduit_guest_rt::pci::{BarKind, BarWindow, Bdf, Ecam, LegacyConfig, command};
use conduit_guest_rt::report::Report;
use conduit_guest_rt::{BootInfo, cpu, entry, hypercall, interrupts, lapic, memory, println, time};

entry!(main);

const NAME: &str = "edu_msi";
/// Where the partition's first device appears (`docs/devices.md`).
const EDU_BDF: Bdf = Bdf::new(0, 1, 0);
/// First MSI vector, and the one it is moved to in (c).
const VECTOR_A: u8 = 0x50;
const VECTOR_C: u8 = 0x58;
/// Raises in (b) and (c).
const RAISES_B: u64 = 20;
const RAISES_C: u64 = 5;
/// What (b) and (c) OR into the interrupt status (distinct from the device's own 0x1, 0x100).
const RAISE_VALUE: u32 = 0x10;
/// Bound of every wait for an interrupt, a result or a DMA.
const WAIT_US: u64 = 1_000_000;
/// Quiet time after a phase in which no further interrupt may arrive.
const SETTLE_US: u64 = 20_000;
/// Bytes moved by the DMA test.
const DMA_BYTES: u64 = 256;

/// Base of the edu registers, for the handler.
static EDU_BASE: AtomicU64 = AtomicU64::new(0);
/// Interrupt status values the handler saw (ORed), since the last `take_status`.
static STATUS_SEEN: AtomicU32 = AtomicU32::new(0);
/// Handler runs that found the interrupt status 0.
static EMPTY_STATUS: AtomicU32 = AtomicU32::new(0);

/// MSI handler: read the interrupt status, acknowledge it.
fn edu_interrupt(_vector: u8) {
    let base = EDU_BASE.load(Ordering::Acquire);
    if base == 0 {
        return;
    }
    // SAFETY:
    // 1. `base` is the placed BAR 0 of edu (stored by `main` after placing it), device memory
    //    above RAM; the handler only reads the status and writes the acknowledge register,
    //    which start no DMA.
    let dev = Edu::new(unsafe { Mmio::new(base, edu::REGISTER_BYTES) });
    let status = dev.irq_status();
    if status == 0 {
        EMPTY_STATUS.fetch_add(1, Ordering::Relaxed);
    }
    STATUS_SEEN.fetch_or(status, Ordering::Relaxed);
    dev.ack(status);
}

fn take_status() -> u32 {
    STATUS_SEEN.swap(0, Ordering::Relaxed)
}

fn main(info: &'static BootInfo) -> u64 {
    let mut r = Report::new(NAME);
    if info.vcpu != 0 {
        println!("{NAME}: vcpu {} has nothing to do", info.vcpu);
        return r.finish();
    }
    cpu::cli();
    interrupts::register(VECTOR_A, edu_interrupt);
    interrupts::register(VECTOR_C, edu_interrupt);
    lapic::enable(interrupts::SPURIOUS_VECTOR);
    lapic::set_tpr(0);
    if let Some((dev, msi)) = setup(&mut r, info) {
        cpu::sti();
        phase_a(&mut r, &dev);
        phase_b(&mut r, &dev);
        phase_c(&mut r, &dev, &msi);
        phase_d(&mut r, &dev);
        phase_e(&mut r);
        cpu::cli();
        let (a, c) = (interrupts::count(VECTOR_A), interrupts::count(VECTOR_C));
        r.check(
            interrupts::unexpected() == 0,
            format_args!(
                "{} interrupts at vectors without a handler (last {:#04x})",
                interrupts::unexpected(),
                interrupts::last_unexpected().unwrap_or(0)
            ),
        );
        r.check(interrupts::spurious() == 0, format_args!("{} spurious interrupts", interrupts::spurious()));
        let empty = EMPTY_STATUS.load(Ordering::Relaxed);
        r.check(empty == 0, format_args!("{empty} interrupts found the edu interrupt status 0"));
        if r.passed() {
            println!(
                "{NAME}: all checks passed: {} interrupts ({a} at {VECTOR_A:#04x}, {c} at {VECTOR_C:#04x})",
                a + c
            );
        }
    }
    r.finish()
}

/// Finds edu, checks its IDs both ways, places BAR 0, enables MEM|BM, checks the ID and the
/// inverter, programs and enables MSI.
fn setup(r: &mut Report, info: &BootInfo) -> Option<(Edu, Msi)> {
    let ecam = r.require("ECAM window", Ecam::from_boot_info(info))?;
    let f = r.require("finding edu through ECAM", ecam.find(edu::VENDOR, edu::DEVICE))?;
    if !r.check(f.bdf() == EDU_BDF, format_args!("edu found at {}, expected {EDU_BDF}", f.bdf())) {
        return None;
    }
    println!("{NAME}: edu {:04x}:{:04x} at {} through ECAM", edu::VENDOR, edu::DEVICE, f.bdf());
    let ids = LegacyConfig.read32(f.bdf(), 0);
    let want = u32::from(edu::DEVICE) << 16 | u32::from(edu::VENDOR);
    if !r.check(ids == want, format_args!("CF8/CFC reads {ids:#010x} at {}, expected {want:#010x}", f.bdf())) {
        return None;
    }
    println!("{NAME}: CF8/CFC agrees: {ids:#010x} at {}", f.bdf());

    let mut window = r.require("BAR window", BarWindow::from_boot_info(info))?;
    let bar = r.require("placing BAR 0", f.place_bar(0, &mut window))?;
    let kind = match bar.kind {
        BarKind::Memory32 => "32-bit",
        BarKind::Memory64 => "64-bit",
        BarKind::Io => "I/O",
    };
    f.enable(command::MEMORY | command::BUS_MASTER);
    let cmd = f.command();
    let both = command::MEMORY | command::BUS_MASTER;
    if !r.check(cmd & both == both, format_args!("command reads {cmd:#06x} after setting MEM|BM")) {
        return None;
    }
    println!("{NAME}: BAR0 {kind} memory, {:#x} bytes at {:#x}; command MEM|BM", bar.size, bar.address());
    // SAFETY:
    // 1. `bar` is edu's placed memory BAR 0; this driver only DMAs into `DmaBuf`s.
    let regs = unsafe { bar.window(0, edu::REGISTER_BYTES) };
    let regs = r.require("edu registers", regs.ok_or("BAR 0 smaller than the register block"))?;
    let dev = Edu::new(regs);

    let id = dev.id();
    let pattern = 0x1234_5678;
    let inverted = dev.invert(pattern);
    let ok = r.check(id == edu::ID_VALUE, format_args!("edu ID {id:#010x}, expected {:#010x}", edu::ID_VALUE))
        & r.check(
            inverted == !pattern,
            format_args!("invert {pattern:#010x} -> {inverted:#010x}, expected {:#010x}", !pattern),
        );
    if !ok {
        return None;
    }
    println!("{NAME}: id {id:#010x}, invert {pattern:#010x} -> {inverted:#010x}");
    EDU_BASE.store(dev.base(), Ordering::Release);

    let msi = r.require("MSI capability", Msi::find(f))?;
    r.require("programming MSI", msi.program(0, VECTOR_A, 1))?;
    msi.enable();
    let (address, data) = (msi.address(), msi.data());
    let ok = r.check(msi.is_enabled(), format_args!("MSI enable reads 0 after enabling"))
        & r.check(
            address == u64::from(message_address(0)) && data == u16::from(VECTOR_A),
            format_args!(
                "MSI reads address {address:#x} data {data:#06x}, wrote {:#x} {VECTOR_A:#06x}",
                message_address(0)
            ),
        );
    if !ok {
        return None;
    }
    println!(
        "{NAME}: MSI to vcpu 0 vector {VECTOR_A:#04x}: address {address:#010x}, data {data:#06x}, {}, {} message(s)",
        if msi.is_64bit() { "64-bit" } else { "32-bit" },
        msi.enabled_messages()
    );
    Some((dev, msi))
}

/// Waits for `vector`'s count to reach `target`; a timeout is a failure naming `what`.
fn wait_interrupt(r: &mut Report, vector: u8, target: u64, what: &str) -> bool {
    let ok = interrupts::wait_for_count(vector, target, WAIT_US);
    r.check(
        ok,
        format_args!(
            "{what}: no interrupt at {vector:#04x} within {WAIT_US} us (count {}, expected {target})",
            interrupts::count(vector)
        ),
    )
}

/// (a) Factorial of 5 with interrupt on completion.
fn phase_a(r: &mut Report, dev: &Edu) {
    let before = r.failures();
    take_status();
    let start = interrupts::count(VECTOR_A);
    dev.start_factorial(5, true);
    wait_interrupt(r, VECTOR_A, start + 1, "(a) factorial");
    let result = r.require("(a) factorial", dev.factorial_result(WAIT_US));
    time::delay_us(SETTLE_US);
    let got = interrupts::count(VECTOR_A) - start;
    let status = take_status();
    r.check(result == Some(120), format_args!("(a) factorial of 5 reads {result:?}, expected 120"));
    r.check(got == 1, format_args!("(a) {got} interrupts at {VECTOR_A:#04x}, expected 1"));
    r.check(
        status == edu::irq::FACTORIAL,
        format_args!("(a) handler saw interrupt status {status:#x}, expected {:#x}", edu::irq::FACTORIAL),
    );
    r.check(dev.irq_status() == 0, format_args!("(a) interrupt status {:#x} after the ack", dev.irq_status()));
    if r.failures() == before {
        println!("{NAME}: (a) factorial 5 = 120 with 1 interrupt at {VECTOR_A:#04x}, status {status:#x}");
    }
}

/// (b) 20 raises, each waited for.
fn phase_b(r: &mut Report, dev: &Edu) {
    let before = r.failures();
    take_status();
    let start = interrupts::count(VECTOR_A);
    for i in 0..RAISES_B {
        dev.raise(RAISE_VALUE);
        if !wait_interrupt(r, VECTOR_A, start + i + 1, "(b) raise") {
            break;
        }
    }
    time::delay_us(SETTLE_US);
    let got = interrupts::count(VECTOR_A) - start;
    let status = take_status();
    r.check(got == RAISES_B, format_args!("(b) {got} interrupts at {VECTOR_A:#04x} for {RAISES_B} raises"));
    r.check(
        status == RAISE_VALUE,
        format_args!("(b) handler saw interrupt status {status:#x}, expected {RAISE_VALUE:#x}"),
    );
    r.check(
        interrupts::count(VECTOR_C) == 0,
        format_args!("(b) {} interrupts at {VECTOR_C:#04x}", interrupts::count(VECTOR_C)),
    );
    if r.failures() == before {
        println!(
            "{NAME}: (b) {RAISES_B} raises: {got} interrupts at {VECTOR_A:#04x} ({} in all)",
            interrupts::count(VECTOR_A)
        );
    }
}

/// (c) Move MSI to 0x58 (disable, rewrite data, enable), then 5 raises.
fn phase_c(r: &mut Report, dev: &Edu, msi: &Msi) {
    let before = r.failures();
    msi.disable();
    r.check(!msi.is_enabled(), format_args!("(c) MSI enable still reads 1 after disabling"));
    msi.set_vector(VECTOR_C);
    msi.enable();
    let data = msi.data();
    if !r.check(
        msi.is_enabled() && data == u16::from(VECTOR_C),
        format_args!("(c) MSI reads enabled {} data {data:#06x}, expected 1 {VECTOR_C:#06x}", msi.is_enabled()),
    ) {
        return;
    }
    take_status();
    let a = interrupts::count(VECTOR_A);
    let start = interrupts::count(VECTOR_C);
    for i in 0..RAISES_C {
        dev.raise(RAISE_VALUE);
        if !wait_interrupt(r, VECTOR_C, start + i + 1, "(c) raise") {
            break;
        }
    }
    time::delay_us(SETTLE_US);
    let got = interrupts::count(VECTOR_C) - start;
    let stray = interrupts::count(VECTOR_A) - a;
    r.check(got == RAISES_C, format_args!("(c) {got} interrupts at {VECTOR_C:#04x} for {RAISES_C} raises"));
    r.check(stray == 0, format_args!("(c) {stray} interrupts still arrived at {VECTOR_A:#04x}"));
    if r.failures() == before {
        println!("{NAME}: (c) MSI data {VECTOR_C:#04x}: {got} interrupts at {VECTOR_C:#04x}, none at {VECTOR_A:#04x}");
    }
}

/// The DMA test pattern.
fn pattern(i: u64) -> u8 {
    (i as u8).wrapping_mul(37) ^ 0xa5
}

/// (d) RAM → edu buffer → second RAM buffer.
fn phase_d(r: &mut Report, dev: &Edu) {
    let before = r.failures();
    let interrupts_before = interrupts::count(VECTOR_A) + interrupts::count(VECTOR_C);
    let (Some(src), Some(dst)) = (memory::alloc_pages(1), memory::alloc_pages(1)) else {
        r.fail(format_args!("(d) no free memory for two DMA pages"));
        return;
    };
    for i in 0..DMA_BYTES {
        src.write8(i, pattern(i));
    }
    let to_device = dev.dma(Direction::ToDevice, &src, 0, 0, DMA_BYTES, WAIT_US);
    if r.require("(d) DMA RAM -> edu", to_device).is_none() {
        return;
    }
    let to_ram = dev.dma(Direction::ToRam, &dst, 0, 0, DMA_BYTES, WAIT_US);
    if r.require("(d) DMA edu -> RAM", to_ram).is_none() {
        return;
    }
    let mismatches = (0..DMA_BYTES).filter(|&i| dst.read8(i) != pattern(i)).count();
    let first = (0..DMA_BYTES).find(|&i| dst.read8(i) != pattern(i));
    r.check(
        mismatches == 0,
        format_args!(
            "(d) {mismatches} of {DMA_BYTES} bytes differ after the round trip (first at {}: {:#04x}, expected {:#04x})",
            first.unwrap_or(0),
            dst.read8(first.unwrap_or(0)),
            pattern(first.unwrap_or(0))
        ),
    );
    let beyond = (DMA_BYTES..dst.bytes()).filter(|&i| dst.read8(i) != 0).count();
    r.check(beyond == 0, format_args!("(d) {beyond} bytes beyond the {DMA_BYTES} transferred changed"));
    let extra = interrupts::count(VECTOR_A) + interrupts::count(VECTOR_C) - interrupts_before;
    r.check(extra == 0, format_args!("(d) {extra} interrupts during DMA without interrupt requests"));
    if r.failures() == before {
        println!("{NAME}: (d) DMA of {DMA_BYTES} bytes RAM -> edu buffer -> RAM: identical");
    }
}

/// (e) The interrupt hypercalls agree with what the guest counted.
fn phase_e(r: &mut Report) {
    let before = r.failures();
    let rid = EDU_BDF.rid();
    match hypercall::irq_info(rid, irq::INDEX_MSI) {
        Ok((count, flags)) => {
            println!("{NAME}: (e) IRQ_INFO edu MSI: count {count}, flags {flags:#x}");
            r.check(count == 1, format_args!("(e) IRQ_INFO MSI count {count}, expected 1"));
            r.check(flags & irq::FLAG_NORESIZE != 0, format_args!("(e) IRQ_INFO MSI flags {flags:#x}: NORESIZE clear"));
        }
        Err(e) => r.fail(format_args!("(e) IRQ_INFO({rid:#06x}, MSI) -> {e} ({})", hypercall::error_name(e))),
    }
    let counted = interrupts::count(VECTOR_A) + interrupts::count(VECTOR_C);
    let want = 1 + RAISES_B + RAISES_C;
    r.check(counted == want, format_args!("(e) guest counted {counted} interrupts in all, expected {want}"));
    match hypercall::irq_stats(rid, irq::INDEX_MSI, 0) {
        Ok(s) => {
            println!(
                "{NAME}: (e) IRQ_STATS MSI 0: raised {} delivered {} coalesced {} masked {} spurious {} pending {}",
                s.raised, s.delivered, s.coalesced, s.pending_while_masked, s.spurious, s.pending
            );
            r.check(
                s.delivered == counted,
                format_args!("(e) delivered {} but the guest counted {counted}", s.delivered),
            );
            r.check(
                s.raised == s.delivered + s.coalesced,
                format_args!("(e) raised {} != delivered {} + coalesced {}", s.raised, s.delivered, s.coalesced),
            );
            r.check(s.coalesced == 0, format_args!("(e) coalesced {}, expected 0", s.coalesced));
            r.check(s.spurious == 0, format_args!("(e) spurious {}, expected 0", s.spurious));
        }
        Err(e) => r.fail(format_args!("(e) IRQ_STATS({rid:#06x}, MSI, 0) -> {e} ({})", hypercall::error_name(e))),
    }
    if r.failures() == before {
        println!("{NAME}: (e) hypervisor counts match: {counted} delivered, 0 coalesced, 0 spurious");
    }
}
