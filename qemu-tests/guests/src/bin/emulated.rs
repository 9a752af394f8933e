//! `emulated`: Conduit's emulated `notify` device (00:01.0, `docs/devices.md`) and the
//! interrupt-control hypercalls on it:
//! - finds it (c0de:0001) through ECAM, places BAR 0, enables memory decode, checks the ID;
//! - programs its 4 MSI-X entries to vCPU 0 at 0x70–0x73, unmasks them, enables MSI-X;
//! - SIGNAL 0–3: one interrupt each at 0x70+i, COUNT reads 4; entry 2 masked, SIGNAL 2: no
//!   interrupt, PBA bit 2 set (COUNT 5); unmasked: exactly one at 0x72;
//! - IRQ_INFO(MSI-X): 4, EVENTFD|MASKABLE, not NORESIZE; IRQ_INFO(MSI): 0;
//! - SET_IRQS trigger (no data) 0–3: each once; trigger (bool 1 0 1 0): 0x70 and 0x72 once;
//!   mask 1, trigger 1: nothing; unmask 1: one at 0x71;
//! - SET_IRQS rejections with their codes: index 7, start 3 count 2, two actions, event data
//!   with mask, count above MAX_COUNT (EINVAL); a requester ID with no function (ENODEV).
//!
//! Only vCPU 0 takes part (other vCPUs exit at once with `PASS`).
#![no_std]
#![no_main]

use conduit_guest_rt::abi::{error, irq, vdev};
use conduit_guest_rt::devices::notify::{self, Notify};
use conduit_guest_rt::hypercall::{self, IrqData};
use conduit_guest_rt::msix::MsiX;
use conduit_guest_rt::pci::{BarWindow, Bdf, Ecam, command};
use conduit_guest_rt::report::Report;
use conduit_guest_rt::{BootInfo, cpu, entry, interrupts, lapic, println, time};

entry!(main);

const NAME: &str = "emulated";
/// Where the partition's first (emulated) device appears.
const NOTIFY_BDF: Bdf = Bdf::new(0, 1, 0);
/// A requester ID with no function behind it (00:1f.0).
const NO_DEVICE: u16 = Bdf::new(0, 0x1f, 0).rid();
/// Vector of entry `i` is `BASE_VECTOR + i`.
const BASE_VECTOR: u8 = 0x70;
/// Entries.
const ENTRIES: usize = vdev::NOTIFY_VECTORS as usize;
/// Bound of every wait for an interrupt.
const WAIT_US: u64 = 1_000_000;
/// Quiet time in which nothing more (or nothing masked) may arrive.
const QUIET_US: u64 = 20_000;

fn vector(entry: usize) -> u8 {
    BASE_VECTOR + entry as u8
}

/// The interrupts each vector should have seen so far.
struct Expected([u64; ENTRIES]);

impl Expected {
    /// Waits until every vector reached its expected count (bounded), then `QUIET_US` more,
    /// and checks the counts are exactly as expected.
    fn settle(&self, r: &mut Report, what: &str) -> bool {
        let deadline = time::deadline_after_us(WAIT_US);
        time::wait_until(deadline, || (0..ENTRIES).all(|i| interrupts::count(vector(i)) >= self.0[i]));
        time::delay_us(QUIET_US);
        let mut ok = true;
        for i in 0..ENTRIES {
            let got = interrupts::count(vector(i));
            ok &= r.check(
                got == self.0[i],
                format_args!("{what}: {got} interrupts at {:#04x} in all, expected {}", vector(i), self.0[i]),
            );
        }
        ok
    }
}

fn main(info: &'static BootInfo) -> u64 {
    let mut r = Report::new(NAME);
    if info.vcpu != 0 {
        println!("{NAME}: vcpu {} has nothing to do", info.vcpu);
        return r.finish();
    }
    cpu::cli();
    for i in 0..ENTRIES {
        interrupts::register(vector(i), interrupts::count_only);
    }
    lapic::enable(interrupts::SPURIOUS_VECTOR);
    lapic::set_tpr(0);
    let mut expected = Expected([0; ENTRIES]);
    if let Some((dev, msix)) = setup(&mut r, info) {
        cpu::sti();
        signals(&mut r, &dev, &msix, &mut expected);
        info_calls(&mut r);
        set_irqs(&mut r, &mut expected);
        rejections(&mut r, &expected);
        cpu::cli();
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
        let c = |i| interrupts::count(vector(i));
        println!("{NAME}: all checks passed: interrupts 0x70 {}, 0x71 {}, 0x72 {}, 0x73 {}", c(0), c(1), c(2), c(3));
    }
    r.finish()
}

/// Finds the device, places BAR 0, enables memory decode, checks the ID, programs and enables
/// MSI-X with every entry live.
fn setup(r: &mut Report, info: &BootInfo) -> Option<(Notify, MsiX)> {
    let ecam = r.require("ECAM window", Ecam::from_boot_info(info))?;
    let f = r.require("finding notify through ECAM", ecam.find(notify::VENDOR, notify::DEVICE))?;
    if !r.check(f.bdf() == NOTIFY_BDF, format_args!("notify found at {}, expected {NOTIFY_BDF}", f.bdf())) {
        return None;
    }
    println!("{NAME}: notify {:04x}:{:04x} at {}", notify::VENDOR, notify::DEVICE, f.bdf());
    let mut window = r.require("BAR window", BarWindow::from_boot_info(info))?;
    let bar = r.require("placing BAR 0", f.place_bar(0, &mut window))?;
    f.enable(command::MEMORY);
    if !r
        .check(f.command() & command::MEMORY != 0, format_args!("command reads {:#06x} after setting MEM", f.command()))
    {
        return None;
    }
    println!("{NAME}: BAR0 {:#x} bytes at {:#x}; command MEM", bar.size, bar.address());
    // SAFETY:
    // 1. `bar` is notify's placed memory BAR 0; the device is emulated and does no DMA.
    let regs = unsafe { bar.window(0, 16) };
    let dev = Notify::new(r.require("notify registers", regs.ok_or("BAR 0 smaller than 16 bytes"))?);
    let id = dev.id();
    if !r.check(id == notify::ID_VALUE, format_args!("ID reads {id:#010x}, expected {:#010x}", notify::ID_VALUE)) {
        return None;
    }
    let msix = r.require("MSI-X", MsiX::find(f, &[bar]))?;
    let table = msix.table_address() - bar.address();
    let pba = msix.pba_address() - bar.address();
    let ok = r.check(
        usize::from(msix.entries()) == ENTRIES && msix.offset() == u16::from(vdev::NOTIFY_MSIX_CAP),
        format_args!("MSI-X capability at {:#x} with {} entries", msix.offset(), msix.entries()),
    ) & r.check(
        table == vdev::NOTIFY_TABLE && pba == vdev::NOTIFY_PBA,
        format_args!("MSI-X table at BAR0+{table:#x}, PBA at BAR0+{pba:#x}"),
    );
    if !ok {
        return None;
    }
    println!(
        "{NAME}: id {id:#010x}; MSI-X at {:#04x}: {ENTRIES} entries, table BAR0+{table:#x}, PBA BAR0+{pba:#x}",
        msix.offset()
    );
    let masked = msix.masked_count(msix.entries());
    r.check(masked == msix.entries(), format_args!("{masked} of {ENTRIES} entries masked at reset"));
    for i in 0..ENTRIES {
        msix.program(i as u16, 0, vector(i));
        msix.unmask(i as u16);
    }
    msix.set_function_mask(false);
    msix.enable();
    let live = (0..ENTRIES).all(|i| !msix.is_masked(i as u16));
    if !r.check(
        msix.is_enabled() && live,
        format_args!("MSI-X control {:#06x}, entries unmasked: {live}", msix.control()),
    ) {
        return None;
    }
    println!("{NAME}: entries 0-3 -> vcpu 0 vectors 0x70-0x73, unmasked, MSI-X enabled");
    Some((dev, msix))
}

/// SIGNAL through the register; masking with the table's vector control.
fn signals(r: &mut Report, dev: &Notify, msix: &MsiX, expected: &mut Expected) {
    let before = r.failures();
    for i in 0..ENTRIES {
        dev.signal(i as u32);
        expected.0[i] += 1;
        let ok = interrupts::wait_for_count(vector(i), expected.0[i], WAIT_US);
        r.check(ok, format_args!("SIGNAL {i}: no interrupt at {:#04x} within {WAIT_US} us", vector(i)));
    }
    expected.settle(r, "SIGNAL 0-3");
    let count = dev.count();
    r.check(count == 4, format_args!("COUNT reads {count} after 4 signals, expected 4"));
    if r.failures() != before {
        return;
    }
    println!("{NAME}: SIGNAL 0-3: one interrupt each at 0x70 0x71 0x72 0x73; COUNT 4");

    msix.mask(2);
    if !r.check(msix.is_masked(2), format_args!("entry 2 does not read masked")) {
        return;
    }
    dev.signal(2);
    time::delay_us(QUIET_US);
    let held = interrupts::count(vector(2)) == expected.0[2];
    let pending = msix.pending(2);
    let count = dev.count();
    let ok = r.check(held, format_args!("entry 2 masked: SIGNAL 2 delivered an interrupt"))
        & r.check(pending, format_args!("entry 2 masked: PBA bit 2 clear after SIGNAL 2"))
        & r.check(count == 5, format_args!("COUNT reads {count} after 5 signals, expected 5"));
    if !ok {
        return;
    }
    msix.unmask(2);
    expected.0[2] += 1;
    let released = expected.settle(r, "entry 2 unmasked");
    let pending = msix.pending(2);
    if released & r.check(!pending, format_args!("entry 2 unmasked: PBA bit 2 still set")) {
        println!("{NAME}: entry 2 masked: SIGNAL 2 held, PBA bit 2 set; unmasked: 1 interrupt at 0x72");
    }
}

/// IRQ_INFO for MSI-X and MSI.
fn info_calls(r: &mut Report) {
    let rid = NOTIFY_BDF.rid();
    match hypercall::irq_info(rid, irq::INDEX_MSIX) {
        Ok((count, flags)) => {
            let want = irq::FLAG_EVENTFD | irq::FLAG_MASKABLE;
            let ok = r.check(count == 4, format_args!("IRQ_INFO MSI-X count {count}, expected 4"))
                & r.check(
                    flags & want == want,
                    format_args!("IRQ_INFO MSI-X flags {flags:#x}: EVENTFD or MASKABLE clear"),
                )
                & r.check(
                    flags & irq::FLAG_NORESIZE == 0,
                    format_args!("IRQ_INFO MSI-X flags {flags:#x}: NORESIZE set"),
                );
            if ok {
                println!("{NAME}: IRQ_INFO MSI-X: count 4, EVENTFD|MASKABLE, not NORESIZE");
            }
        }
        Err(e) => r.fail(format_args!("IRQ_INFO({rid:#06x}, MSI-X) -> {e} ({})", hypercall::error_name(e))),
    }
    match hypercall::irq_info(rid, irq::INDEX_MSI) {
        Ok((count, _)) => {
            if r.check(count == 0, format_args!("IRQ_INFO MSI count {count}, expected 0")) {
                println!("{NAME}: IRQ_INFO MSI: count 0");
            }
        }
        Err(e) => r.fail(format_args!("IRQ_INFO({rid:#06x}, MSI) -> {e} ({})", hypercall::error_name(e))),
    }
}

/// `SET_IRQS` on the MSI-X index; `Err` is a failure naming `what`.
fn set(r: &mut Report, what: &str, start: u64, count: u64, flags: u64, data: IrqData) -> bool {
    let result = hypercall::set_irqs(NOTIFY_BDF.rid(), irq::INDEX_MSIX, start, count, flags, data);
    r.check(
        result.is_ok(),
        format_args!("SET_IRQS {what} -> {:?} ({})", result, hypercall::error_name(result.err().unwrap_or(0))),
    )
}

/// Software triggers, and masking through the hypercall.
fn set_irqs(r: &mut Report, expected: &mut Expected) {
    let before = r.failures();
    if set(r, "trigger 0-3", 0, 4, irq::ACTION_TRIGGER | irq::DATA_NONE, IrqData::None) {
        expected.0.iter_mut().for_each(|e| *e += 1);
        if expected.settle(r, "SET_IRQS trigger 0-3") {
            println!("{NAME}: SET_IRQS trigger 0-3: one interrupt each at 0x70 0x71 0x72 0x73");
        }
    }
    let bools = [1u8, 0, 1, 0];
    if set(r, "trigger bool 1 0 1 0", 0, 4, irq::ACTION_TRIGGER | irq::DATA_BOOL, IrqData::Bool(&bools)) {
        expected.0[0] += 1;
        expected.0[2] += 1;
        if expected.settle(r, "SET_IRQS trigger bool 1 0 1 0") {
            println!("{NAME}: SET_IRQS trigger bool 1 0 1 0: one interrupt each at 0x70 0x72");
        }
    }
    if r.failures() != before {
        return;
    }
    if !set(r, "mask 1", 1, 1, irq::ACTION_MASK | irq::DATA_NONE, IrqData::None)
        || !set(r, "trigger 1 (masked)", 1, 1, irq::ACTION_TRIGGER | irq::DATA_NONE, IrqData::None)
        || !expected.settle(r, "SET_IRQS trigger 1 while masked")
    {
        return;
    }
    if set(r, "unmask 1", 1, 1, irq::ACTION_UNMASK | irq::DATA_NONE, IrqData::None) {
        expected.0[1] += 1;
        if expected.settle(r, "SET_IRQS unmask 1") {
            println!("{NAME}: SET_IRQS mask 1, trigger 1: held; unmask 1: 1 interrupt at 0x71");
        }
    }
}

/// A `SET_IRQS` call that must be rejected with `want`.
struct BadCall<'a> {
    what: &'static str,
    device: u16,
    index: u64,
    start: u64,
    count: u64,
    flags: u64,
    data: IrqData<'a>,
    want: i64,
}

/// Rejected `SET_IRQS` calls, each with its exact code, and no interrupt from any of them.
fn rejections(r: &mut Report, expected: &Expected) {
    let before = r.failures();
    let rid = NOTIFY_BDF.rid();
    let trigger = irq::ACTION_TRIGGER | irq::DATA_NONE;
    let binding = [irq::binding(0, BASE_VECTOR)];
    let bad = |what, device, index, start, count, flags, data, want| BadCall {
        what,
        device,
        index,
        start,
        count,
        flags,
        data,
        want,
    };
    let cases = [
        bad("index 7", rid, 7, 0, 1, trigger, IrqData::None, error::EINVAL),
        bad("start 3 count 2", rid, irq::INDEX_MSIX, 3, 2, trigger, IrqData::None, error::EINVAL),
        bad(
            "mask and unmask at once",
            rid,
            irq::INDEX_MSIX,
            0,
            1,
            irq::ACTION_MASK | irq::ACTION_UNMASK | irq::DATA_NONE,
            IrqData::None,
            error::EINVAL,
        ),
        bad(
            "event data with mask",
            rid,
            irq::INDEX_MSIX,
            0,
            1,
            irq::ACTION_MASK | irq::DATA_EVENT,
            IrqData::Event(&binding),
            error::EINVAL,
        ),
        bad("device 00:1f.0 (none)", NO_DEVICE, irq::INDEX_MSIX, 0, 1, trigger, IrqData::None, error::ENODEV),
        bad("count MAX_COUNT + 1", rid, irq::INDEX_MSIX, 0, irq::MAX_COUNT + 1, trigger, IrqData::None, error::EINVAL),
    ];
    for c in cases {
        let got = match hypercall::set_irqs(c.device, c.index, c.start, c.count, c.flags, c.data) {
            Ok(()) => 0,
            Err(e) => e,
        };
        let want = c.want;
        if r.check(
            got == want,
            format_args!(
                "SET_IRQS {} -> {got} ({}), expected {want} ({})",
                c.what,
                hypercall::error_name(got),
                hypercall::error_name(want)
            ),
        ) {
            println!("{NAME}: SET_IRQS {} -> {got} ({})", c.what, hypercall::error_name(got));
        }
    }
    if expected.settle(r, "after the rejected calls") && r.failures() == before {
        println!("{NAME}: 6 bad SET_IRQS calls rejected, no interrupt from any");
    }
}
