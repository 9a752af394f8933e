//! `doorbell_edu`: doorbells on QEMU's edu device (passed through at 00:01.0), whose inverter
//! register (0x04) shows what the device was last written: reading it returns the complement.
//!
//! With `arg=0` (scenario `doorbell_device_write`):
//! - (a) a doorbell at BAR 0 + 0x04, 4 bytes, matching the value 1, whose action writes the
//!   pre-programmed 0xcafe0000 to 0x04 and raises vector 0x66 on vCPU 0: writing 1 makes the
//!   inverter read !0xcafe0000 and brings exactly one interrupt at 0x66; `DOORBELL_HITS` is 1;
//! - (b) writing 2 to 0x04 (no match, same trapped page) goes the generic way: forwarded as it
//!   is, the inverter reads !2, no interrupt, hits stay 1;
//! - (c) a doorbell at 0x10 (a register edu ignores), any value, forwarding the value written
//!   to 0x04: writing 0x1357 there makes the inverter read !0x1357;
//! - (d) both removed: the page is mapped straight again, writing 1 to 0x04 reads !1 and brings
//!   no interrupt; `DOORBELL_HITS` of a removed doorbell is `ENODEV`.
//!
//! With `arg=2` (scenario `bench_doorbell`): the (c) doorbell, then between `SIGNAL 1` and
//! `SIGNAL 2` 256 writes to it (fast path) and 256 writes to 0x14 on the same trapped page
//! (generic trapped-MMIO path), each followed by nothing else; the hypervisor measures both.
//!
//! Only vCPU 0 takes part.
#![no_std]
#![no_main]

use conduit_guest_rt::abi::doorbell::{self as db, Request};
use conduit_guest_rt::abi::error;
use conduit_guest_rt::devices::edu::{self, Edu};
use conduit_guest_rt::mmio::Mmio;
use conduit_guest_rt::pci::{BarWindow, Bdf, Ecam, command};
use conduit_guest_rt::report::Report;
use conduit_guest_rt::{BootInfo, cpu, entry, hypercall, interrupts, lapic, println, time};

entry!(main);

const NAME: &str = "doorbell_edu";
const EDU_BDF: Bdf = Bdf::new(0, 1, 0);
/// The event vector of doorbell (a).
const EVENT_VECTOR: u8 = 0x66;
/// What doorbell (a) writes to the inverter.
const PROGRAMMED: u64 = 0xcafe_0000;
/// The register edu ignores that doorbell (c) sits on, and another beside it.
const FORWARDER: u64 = 0x10;
const PLAIN: u64 = 0x14;
/// Writes per path in the benchmark.
const BENCH_WRITES: u32 = 256;
const SETTLE_US: u64 = 20_000;
const WAIT_US: u64 = 1_000_000;

fn value_doorbell() -> Request {
    Request {
        flags: db::MATCH_VALUE | db::WRITE | db::EVENT,
        bar: 0,
        width: 4,
        offset: edu::reg::INVERT,
        match_value: 1,
        write_bar: 0,
        write_width: 4,
        write_offset: edu::reg::INVERT,
        write_value: PROGRAMMED,
        event_vcpu: 0,
        event_vector: u32::from(EVENT_VECTOR),
    }
}

fn forward_doorbell() -> Request {
    Request {
        flags: db::WRITE | db::WRITE_FORWARD,
        bar: 0,
        width: 4,
        offset: FORWARDER,
        write_bar: 0,
        write_width: 4,
        write_offset: edu::reg::INVERT,
        ..Request::default()
    }
}

fn main(info: &'static BootInfo) -> u64 {
    let mut r = Report::new(NAME);
    if info.vcpu != 0 {
        return r.finish();
    }
    cpu::cli();
    interrupts::register(EVENT_VECTOR, interrupts::count_only);
    lapic::enable(interrupts::SPURIOUS_VECTOR);
    lapic::set_tpr(0);
    cpu::sti();
    if let Some(regs) = setup(&mut r, info) {
        match info.argument {
            2 => bench(&mut r, regs),
            _ => scenario(&mut r, regs),
        }
    }
    cpu::cli();
    r.check(interrupts::unexpected() == 0, format_args!("{} unexpected interrupts", interrupts::unexpected()));
    r.finish()
}

fn setup(r: &mut Report, info: &BootInfo) -> Option<Mmio> {
    let ecam = r.require("ECAM window", Ecam::from_boot_info(info))?;
    let f = r.require("finding edu", ecam.find(edu::VENDOR, edu::DEVICE))?;
    if !r.check(f.bdf() == EDU_BDF, format_args!("edu at {}, expected {EDU_BDF}", f.bdf())) {
        return None;
    }
    let mut window = r.require("BAR window", BarWindow::from_boot_info(info))?;
    let bar = r.require("placing BAR 0", f.place_bar(0, &mut window))?;
    f.enable(command::MEMORY);
    // SAFETY:
    // 1. `bar` is edu's placed memory BAR 0; bus mastering stays off (no DMA).
    let regs = unsafe { bar.window(0, edu::REGISTER_BYTES) };
    let regs = r.require("edu registers", regs.ok_or("BAR 0 smaller than the register block"))?;
    let inverted = Edu::new(regs).invert(0x1234_5678);
    if !r.check(inverted == !0x1234_5678, format_args!("inverter reads {inverted:#x} before any doorbell")) {
        return None;
    }
    println!("{NAME}: edu at {EDU_BDF}, BAR0 at {:#x}, inverter direct: 0x12345678 -> {inverted:#010x}", bar.address());
    Some(regs)
}

fn add(r: &mut Report, what: &str, req: &Request) -> bool {
    let res = hypercall::doorbell_add(EDU_BDF.rid(), req);
    r.check(res.is_ok(), format_args!("DOORBELL_ADD {what}: {}", hypercall::error_name(res.err().unwrap_or(0))))
}

fn hits(req: &Request) -> Result<u64, i64> {
    hypercall::doorbell_hits(EDU_BDF.rid(), req)
}

fn scenario(r: &mut Report, regs: Mmio) {
    let inverter = |regs: &Mmio| u64::from(!regs.read32(edu::reg::INVERT));
    // (a)
    let a = value_doorbell();
    if !add(r, "(a)", &a) {
        return;
    }
    let before = interrupts::count(EVENT_VECTOR);
    regs.write32(edu::reg::INVERT, 1);
    let arrived = interrupts::wait_for_count(EVENT_VECTOR, before + 1, WAIT_US);
    time::delay_us(SETTLE_US);
    let got = interrupts::count(EVENT_VECTOR) - before;
    let seen = inverter(&regs);
    let ok = r.check(seen == PROGRAMMED, format_args!("(a) the device saw {seen:#x}, expected {PROGRAMMED:#x}"))
        & r.check(arrived && got == 1, format_args!("(a) {got} interrupts at {EVENT_VECTOR:#04x}, expected 1"))
        & r.check(hits(&a) == Ok(1), format_args!("(a) DOORBELL_HITS {:?}, expected 1", hits(&a)));
    if ok {
        println!(
            "{NAME}: (a) wrote 1 at 0x04: device got {PROGRAMMED:#x} (pre-programmed), 1 interrupt at {EVENT_VECTOR:#04x}, hits 1"
        );
    }
    // (b)
    regs.write32(edu::reg::INVERT, 2);
    time::delay_us(SETTLE_US);
    let seen = inverter(&regs);
    let got = interrupts::count(EVENT_VECTOR) - before;
    let ok = r.check(seen == 2, format_args!("(b) the device saw {seen:#x}, expected 2 (forwarded)"))
        & r.check(got == 1, format_args!("(b) {got} interrupts in all, expected still 1"))
        & r.check(hits(&a) == Ok(1), format_args!("(b) DOORBELL_HITS {:?}, expected 1", hits(&a)));
    if ok {
        println!("{NAME}: (b) wrote 2 at 0x04 (no match): forwarded as written, no interrupt, hits 1");
    }
    // (c)
    let c = forward_doorbell();
    if !add(r, "(c)", &c) {
        return;
    }
    regs.write32(FORWARDER, 0x1357);
    let seen = inverter(&regs);
    let ok = r.check(seen == 0x1357, format_args!("(c) the device saw {seen:#x} at 0x04, expected 0x1357"))
        & r.check(hits(&c) == Ok(1), format_args!("(c) DOORBELL_HITS {:?}, expected 1", hits(&c)));
    if ok {
        println!("{NAME}: (c) wrote 0x1357 at 0x10: forwarded to 0x04, hits 1");
    }
    // (d)
    let removed = hypercall::doorbell_remove(EDU_BDF.rid(), &a).and(hypercall::doorbell_remove(EDU_BDF.rid(), &c));
    r.check(removed.is_ok(), format_args!("(d) DOORBELL_REMOVE: {removed:?}"));
    regs.write32(edu::reg::INVERT, 1);
    time::delay_us(SETTLE_US);
    let seen = inverter(&regs);
    let got = interrupts::count(EVENT_VECTOR) - before;
    let ok = r.check(seen == 1, format_args!("(d) the device saw {seen:#x}, expected 1"))
        & r.check(got == 1, format_args!("(d) {got} interrupts in all, expected still 1"))
        & r.check(
            hits(&a) == Err(error::ENODEV),
            format_args!("(d) DOORBELL_HITS of a removed doorbell: {:?}", hits(&a)),
        );
    if ok {
        println!("{NAME}: (d) removed: 1 written at 0x04 reaches the device as 1, no interrupt; hits -> ENODEV");
    }
    if r.passed() {
        println!("{NAME}: all checks passed");
    }
}

fn bench(r: &mut Report, regs: Mmio) {
    let c = forward_doorbell();
    if !add(r, "bench", &c) {
        return;
    }
    hypercall::signal(1);
    for i in 0..BENCH_WRITES {
        regs.write32(FORWARDER, i);
    }
    for i in 0..BENCH_WRITES {
        regs.write32(PLAIN, i);
    }
    hypercall::signal(2);
    let seen = !regs.read32(edu::reg::INVERT);
    r.check(seen == BENCH_WRITES - 1, format_args!("the device saw {seen:#x} last"));
    r.check(
        hits(&c) == Ok(u64::from(BENCH_WRITES)),
        format_args!("DOORBELL_HITS {:?}, expected {BENCH_WRITES}", hits(&c)),
    );
    if r.passed() {
        println!("{NAME}: {BENCH_WRITES} doorbell writes and {BENCH_WRITES} plain writes on the trapped page measured");
    }
}
