//! `msix_mask`: MSI-X masking on a passed-through NVMe controller (00:01.0). Entries 0 (admin
//! queue, 0x60) and 1 (I/O queue 1, 0x61) are live on vCPU 0. Then:
//! - entry mask: mask entry 1, complete a Read on I/O queue 1 by polling, wait 20 ms: no
//!   interrupt at 0x61 and PBA bit 1 set; unmask: exactly one interrupt at 0x61, PBA bit 1
//!   clear, and no second one within 20 ms;
//! - function mask: set it, complete an admin command (Get Features) by polling, wait 20 ms: no
//!   interrupt at 0x60 and PBA bit 0 set; clear it: exactly one interrupt at 0x60, PBA bit 0
//!   clear, no second one within 20 ms;
//! - IRQ_STATS of entries 0 and 1: pending_while_masked ≥ 1, delivered = the guest's count;
//! - SET_IRQS event binding on the physical function: entry 1 rebound to vCPU 0 vector 0x66 by
//!   `DATA_EVENT|ACTION_TRIGGER`: the guest's table shows the binding, a Read completes by an
//!   interrupt at 0x66 (none at 0x61); `UNBIND`: a Read brings no interrupt; count 0 with no
//!   data disables MSI-X, and the guest's own MSI-X control register reads disabled (the API
//!   and the guest's config space agree).
//!
//! Only vCPU 0 takes part (other vCPUs exit at once with `PASS`).
#![no_std]
#![no_main]

use conduit_guest_rt::abi::irq;
use conduit_guest_rt::devices::nvme::{self, Command, NvmeFunction, Wait, feature, opcode};
use conduit_guest_rt::hypercall::IrqData;
use conduit_guest_rt::memory;
use conduit_guest_rt::pci::{BarWindow, Bdf};
use conduit_guest_rt::report::Report;
use conduit_guest_rt::{BootInfo, cpu, entry, hypercall, interrupts, lapic, println, time};

entry!(main);

const NAME: &str = "msix_mask";
/// Where the partition's first device appears (`docs/devices.md`).
const NVME_BDF: Bdf = Bdf::new(0, 1, 0);
/// Vectors of entry 0 (admin queue) and entry 1 (I/O queue 1).
const ADMIN_VECTOR: u8 = 0x60;
const IO_VECTOR: u8 = 0x61;
/// Entries per queue.
const QUEUE_ENTRIES: u16 = 16;
/// Namespace.
const NSID: u32 = 1;
/// Quiet time in which a masked interrupt must not arrive (and no second one after unmask).
const QUIET_US: u64 = 20_000;
/// Bound of the wait for the interrupt released by an unmask.
const UNMASK_WAIT_US: u64 = 1_000_000;
/// Vector entry 1 is rebound to by SET_IRQS.
const BOUND_VECTOR: u8 = 0x66;

fn main(info: &'static BootInfo) -> u64 {
    let mut r = Report::new(NAME);
    if info.vcpu != 0 {
        println!("{NAME}: vcpu {} has nothing to do", info.vcpu);
        return r.finish();
    }
    cpu::cli();
    interrupts::register(ADMIN_VECTOR, interrupts::count_only);
    interrupts::register(IO_VECTOR, interrupts::count_only);
    interrupts::register(BOUND_VECTOR, interrupts::count_only);
    lapic::enable(interrupts::SPURIOUS_VECTOR);
    lapic::set_tpr(0);
    cpu::sti();
    if let Some(mut dev) = setup(&mut r, info) {
        entry_mask(&mut r, &mut dev);
        function_mask(&mut r, &mut dev);
        check_stats(&mut r);
        if r.passed() {
            event_binding(&mut r, &mut dev);
        }
    }
    cpu::cli();
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
            "{NAME}: all checks passed: {} interrupts at {ADMIN_VECTOR:#04x}, {} at {IO_VECTOR:#04x}",
            interrupts::count(ADMIN_VECTOR),
            interrupts::count(IO_VECTOR)
        );
    }
    r.finish()
}

/// Opens the controller, makes entries 0 and 1 live, enables the controller, identifies
/// namespace 1 and creates I/O queue pair 1 on entry 1 (admin completions by interrupt).
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
    msix.program(1, 0, IO_VECTOR);
    msix.unmask(0);
    msix.unmask(1);
    if !r.check(
        msix.is_enabled() && !msix.function_masked() && !msix.is_masked(0) && !msix.is_masked(1),
        format_args!("MSI-X control {:#06x}, entry 0 {:?}, entry 1 {:?}", msix.control(), msix.entry(0), msix.entry(1)),
    ) {
        return None;
    }
    let admin = Wait::Interrupt(ADMIN_VECTOR);
    let c = &mut dev.controller;
    r.require("enabling the controller", c.init(QUEUE_ENTRIES))?;
    let buf = r.require("identify buffer", memory::alloc_pages(1).ok_or("no free memory"))?;
    r.require("Identify Namespace 1", c.identify_namespace(NSID, &buf, admin))?;
    r.require("creating I/O queue pair 1", c.create_io_queue_pair(1, QUEUE_ENTRIES, Some(1), admin))?;
    let (a, i) = (interrupts::count(ADMIN_VECTOR), interrupts::count(IO_VECTOR));
    if !r.check(
        a == 3 && i == 0,
        format_args!(
            "after set-up: {a} interrupts at {ADMIN_VECTOR:#04x} (expected 3), {i} at {IO_VECTOR:#04x} (expected 0)"
        ),
    ) {
        return None;
    }
    println!("{NAME}: entries 0 ({ADMIN_VECTOR:#04x}) and 1 ({IO_VECTOR:#04x}) live; I/O queue 1 on entry 1");
    Some(dev)
}

/// Waits `QUIET_US` and returns how many interrupts arrived at `vector` meanwhile.
fn quiet(vector: u8) -> u64 {
    let before = interrupts::count(vector);
    time::delay_us(QUIET_US);
    interrupts::count(vector) - before
}

/// After the release of a masked signal: exactly one interrupt at `vector` (waited for up to
/// `UNMASK_WAIT_US`), the PBA bit clear, and no second one within `QUIET_US`.
fn expect_release(r: &mut Report, dev: &NvmeFunction, entry: u16, vector: u8, start: u64, what: &str) -> bool {
    let arrived = interrupts::wait_for_count(vector, start + 1, UNMASK_WAIT_US);
    let pending = dev.msix.pending(entry);
    let extra = quiet(vector);
    let total = interrupts::count(vector) - start;
    r.check(arrived, format_args!("{what}: no interrupt at {vector:#04x} within {UNMASK_WAIT_US} us"))
        & r.check(!pending, format_args!("{what}: PBA bit {entry} still set after the interrupt"))
        & r.check(
            extra == 0 && total == 1,
            format_args!("{what}: {total} interrupts at {vector:#04x}, expected exactly 1"),
        )
}

/// Entry mask: a completion on I/O queue 1 while entry 1 is masked is held in the PBA and
/// delivered once on unmask.
fn entry_mask(r: &mut Report, dev: &mut NvmeFunction) {
    let before = r.failures();
    let Some(buf) = memory::alloc_pages(1) else {
        r.fail(format_args!("no free memory for the read buffer"));
        return;
    };
    dev.msix.mask(1);
    if !r.check(dev.msix.is_masked(1), format_args!("entry 1 does not read masked after masking")) {
        return;
    }
    let start = interrupts::count(IO_VECTOR);
    let read = dev.controller.io_command(opcode::READ, NSID, 0, 1, &buf, 0);
    let Some(read) = r.require("building the Read", read) else { return };
    if r.require(
        "Read on I/O queue 1 (entry 1 masked, polled)",
        dev.controller.run(1, &read, Wait::Poll, nvme::COMMAND_TIMEOUT_US),
    )
    .is_none()
    {
        return;
    }
    time::delay_us(QUIET_US);
    let early = interrupts::count(IO_VECTOR) - start;
    let pending = dev.msix.pending(1);
    let ok = r.check(early == 0, format_args!("entry 1 masked: {early} interrupts at {IO_VECTOR:#04x}"))
        & r.check(pending, format_args!("entry 1 masked: PBA bit 1 clear after the completion"));
    if !ok {
        return;
    }
    println!("{NAME}: entry 1 masked: I/O completion polled, no interrupt in 20 ms, PBA bit 1 set");
    dev.msix.unmask(1);
    if expect_release(r, dev, 1, IO_VECTOR, start, "entry 1 unmasked") && r.failures() == before {
        println!("{NAME}: entry 1 unmasked: 1 interrupt at {IO_VECTOR:#04x}, PBA bit 1 clear, no second in 20 ms");
    }
}

/// Function mask: an admin completion while the function is masked is held in the PBA and
/// delivered once when the mask is cleared.
fn function_mask(r: &mut Report, dev: &mut NvmeFunction) {
    let before = r.failures();
    dev.msix.set_function_mask(true);
    if !r.check(dev.msix.function_masked(), format_args!("function mask does not read set")) {
        return;
    }
    let start = interrupts::count(ADMIN_VECTOR);
    let get = Command {
        opcode: opcode::GET_FEATURES,
        cdw: [u32::from(feature::NUMBER_OF_QUEUES), 0, 0, 0, 0, 0],
        ..Command::default()
    };
    if r.require(
        "Get Features (function masked, polled)",
        dev.controller.run(0, &get, Wait::Poll, nvme::COMMAND_TIMEOUT_US),
    )
    .is_none()
    {
        return;
    }
    time::delay_us(QUIET_US);
    let early = interrupts::count(ADMIN_VECTOR) - start;
    let pending = dev.msix.pending(0);
    let ok = r.check(early == 0, format_args!("function masked: {early} interrupts at {ADMIN_VECTOR:#04x}"))
        & r.check(pending, format_args!("function masked: PBA bit 0 clear after the completion"))
        & r.check(!dev.msix.is_masked(0), format_args!("function masked: entry 0's own mask bit set"));
    if !ok {
        return;
    }
    println!("{NAME}: function masked: admin completion polled, no interrupt in 20 ms, PBA bit 0 set");
    dev.msix.set_function_mask(false);
    if expect_release(r, dev, 0, ADMIN_VECTOR, start, "function unmasked") && r.failures() == before {
        println!("{NAME}: function unmasked: 1 interrupt at {ADMIN_VECTOR:#04x}, PBA bit 0 clear, no second in 20 ms");
    }
}

/// IRQ_STATS of entries 0 and 1: a signal was held behind the mask, and delivered matches the
/// guest's count.
fn check_stats(r: &mut Report) {
    let rid = NVME_BDF.rid();
    for (entry, vector) in [(0u64, ADMIN_VECTOR), (1, IO_VECTOR)] {
        let counted = interrupts::count(vector);
        match hypercall::irq_stats(rid, irq::INDEX_MSIX, entry) {
            Ok(s) => {
                println!(
                    "{NAME}: IRQ_STATS entry {entry}: raised {} delivered {} coalesced {} masked {} spurious {} pending {}",
                    s.raised, s.delivered, s.coalesced, s.pending_while_masked, s.spurious, s.pending
                );
                r.check(
                    s.pending_while_masked >= 1,
                    format_args!("entry {entry}: pending_while_masked {}, expected at least 1", s.pending_while_masked),
                );
                r.check(
                    s.delivered == counted,
                    format_args!("entry {entry}: delivered {} but the guest counted {counted}", s.delivered),
                );
            }
            Err(e) => {
                r.fail(format_args!("IRQ_STATS({rid:#06x}, MSI-X, {entry}) -> {e} ({})", hypercall::error_name(e)))
            }
        }
    }
}

/// Entry 1 bound, unbound and the index disabled through SET_IRQS on the physical function.
fn event_binding(r: &mut Report, dev: &mut NvmeFunction) {
    let before = r.failures();
    let rid = NVME_BDF.rid();
    let Some(buf) = memory::alloc_pages(1) else {
        r.fail(format_args!("no free memory for the read buffer"));
        return;
    };
    let bind = [irq::binding(0, BOUND_VECTOR)];
    let res =
        hypercall::set_irqs(rid, irq::INDEX_MSIX, 1, 1, irq::DATA_EVENT | irq::ACTION_TRIGGER, IrqData::Event(&bind));
    if r.require("SET_IRQS bind entry 1", res.map_err(hypercall::error_name)).is_none() {
        return;
    }
    let e1 = dev.msix.entry(1);
    r.check(
        !e1.masked() && e1.data == u32::from(BOUND_VECTOR) && dev.msix.is_enabled(),
        format_args!("after the binding the guest reads entry 1 as {e1:?}, MSI-X enabled {}", dev.msix.is_enabled()),
    );
    let (io0, bound0) = (interrupts::count(IO_VECTOR), interrupts::count(BOUND_VECTOR));
    let read = dev.controller.io_command(opcode::READ, NSID, 0, 1, &buf, 0);
    let Some(read) = r.require("building the Read", read) else { return };
    if r.require(
        "Read after the binding (interrupt at 0x66)",
        dev.controller.run(1, &read, Wait::Interrupt(BOUND_VECTOR), nvme::COMMAND_TIMEOUT_US),
    )
    .is_none()
    {
        return;
    }
    time::delay_us(QUIET_US);
    let (io, bound) = (interrupts::count(IO_VECTOR) - io0, interrupts::count(BOUND_VECTOR) - bound0);
    r.check(
        io == 0 && bound == 1,
        format_args!("bound: {bound} interrupts at {BOUND_VECTOR:#04x} and {io} at {IO_VECTOR:#04x}, expected 1 and 0"),
    );
    let unbind = [irq::UNBIND];
    let res =
        hypercall::set_irqs(rid, irq::INDEX_MSIX, 1, 1, irq::DATA_EVENT | irq::ACTION_TRIGGER, IrqData::Event(&unbind));
    if r.require("SET_IRQS unbind entry 1", res.map_err(hypercall::error_name)).is_none() {
        return;
    }
    let bound0 = interrupts::count(BOUND_VECTOR);
    if r.require(
        "Read after the unbinding (polled)",
        dev.controller.run(1, &read, Wait::Poll, nvme::COMMAND_TIMEOUT_US),
    )
    .is_none()
    {
        return;
    }
    time::delay_us(QUIET_US);
    let late = interrupts::count(BOUND_VECTOR) - bound0 + interrupts::count(IO_VECTOR) - io0;
    r.check(late == 0, format_args!("unbound: {late} interrupts after the Read"));
    let res = hypercall::set_irqs(rid, irq::INDEX_MSIX, 0, 0, irq::DATA_NONE | irq::ACTION_TRIGGER, IrqData::None);
    if r.require("SET_IRQS disable MSI-X", res.map_err(hypercall::error_name)).is_none() {
        return;
    }
    r.check(
        !dev.msix.is_enabled(),
        format_args!("after SET_IRQS disabled MSI-X the guest's control register reads enabled"),
    );
    if r.failures() == before {
        println!(
            "{NAME}: SET_IRQS: entry 1 bound to {BOUND_VECTOR:#04x} (1 interrupt), unbound (none), MSI-X off (reads off)"
        );
    }
}
