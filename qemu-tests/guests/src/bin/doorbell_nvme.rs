//! `doorbell_nvme`: a small NVMe driver (QEMU nvme passed through at 00:01.0, 1 MiB namespace)
//! whose submission-queue tail doorbells are registered doorbells: every submission is a write
//! to a trapped page that the hypervisor's fast path forwards to the controller's register;
//! completions arrive as forwarded MSI-X interrupts.
//! - doorbells for SQ 0 and SQ 1 tails (BAR 0 + 0x1000 + 2·q·stride, 4 bytes, any value,
//!   forwarded as written) before the controller is enabled: SQ 0 by `DOORBELL_ADD`; SQ 1 by
//!   `DOORBELL_ADD` too, or with `arg=1` by the partition description (`doorbell=`; a second
//!   `DOORBELL_ADD` of it must then be `EEXIST`);
//! - MSI-X entry 0 → 0x60 (admin), entry 1 → 0x61 (I/O queue 1);
//! - Identify Controller and Namespace, I/O queue pair 1 created, each waited for by 0x60;
//! - `BLOCKS` blocks written with distinct patterns, then read back into a scrubbed buffer,
//!   each completion waited for by 0x61; the data read back equals the data written;
//! - `DOORBELL_HITS` of SQ 0 equals the admin commands submitted and of SQ 1 the I/O commands;
//!   interrupt counts equal the completions; the CQ head doorbells on the same page (not
//!   registered) went the generic trapped way, forwarded.
//!
//! Only vCPU 0 takes part.
#![no_std]
#![no_main]

use conduit_guest_rt::abi::doorbell::Request;
use conduit_guest_rt::devices::nvme::{self, Wait};
use conduit_guest_rt::memory::{self, PAGE_BYTES};
use conduit_guest_rt::pci::{BarWindow, Bdf, cap_id};
use conduit_guest_rt::report::Report;
use conduit_guest_rt::{BootInfo, cpu, entry, hypercall, interrupts, lapic, println};

entry!(main);

const NAME: &str = "doorbell_nvme";
const NVME_BDF: Bdf = Bdf::new(0, 1, 0);
const ADMIN_VECTOR: u8 = 0x60;
const IO_VECTOR: u8 = 0x61;
const QUEUE_ENTRIES: u16 = 16;
const NSID: u32 = 1;
/// Blocks written and read back.
const BLOCKS: u64 = 8;
/// Offset of the doorbells in BAR 0.
const DOORBELLS: u64 = 0x1000;

fn pattern(block: u64, i: u64) -> u8 {
    (block as u8).wrapping_mul(37) ^ (i as u8).wrapping_mul(11) ^ (i >> 8) as u8 ^ 0x5a
}

fn sq_doorbell(qid: u16, stride: u64) -> Request {
    Request::forwarding(0, DOORBELLS + 2 * u64::from(qid) * stride, 4)
}

fn main(info: &'static BootInfo) -> u64 {
    let mut r = Report::new(NAME);
    if info.vcpu != 0 {
        return r.finish();
    }
    cpu::cli();
    interrupts::register(ADMIN_VECTOR, interrupts::count_only);
    interrupts::register(IO_VECTOR, interrupts::count_only);
    lapic::enable(interrupts::SPURIOUS_VECTOR);
    lapic::set_tpr(0);
    cpu::sti();
    run(&mut r, info);
    cpu::cli();
    r.check(interrupts::unexpected() == 0, format_args!("{} unexpected interrupts", interrupts::unexpected()));
    if r.passed() {
        println!("{NAME}: all checks passed");
    }
    r.finish()
}

fn run(r: &mut Report, info: &BootInfo) -> Option<()> {
    let mut window = r.require("BAR window", BarWindow::from_boot_info(info))?;
    let mut dev = r.require("opening the NVMe function", nvme::open(info, &mut window))?;
    if !r.check(dev.function.bdf() == NVME_BDF, format_args!("nvme at {}", dev.function.bdf())) {
        return None;
    }
    let stride = dev.controller.doorbell_stride();
    let (sq0, sq1) = (sq_doorbell(0, stride), sq_doorbell(1, stride));
    r.require("DOORBELL_ADD SQ 0", hypercall::doorbell_add(NVME_BDF.rid(), &sq0).map_err(hypercall::error_name))?;
    if info.argument == 1 {
        // The partition description registered SQ 1's doorbell when the partition was built.
        let again = hypercall::doorbell_add(NVME_BDF.rid(), &sq1);
        let ok = r.check(
            again == Err(conduit_guest_rt::abi::error::EEXIST),
            format_args!("DOORBELL_ADD SQ 1 (from the description): {again:?}, expected EEXIST"),
        );
        if !ok {
            return None;
        }
    } else {
        r.require("DOORBELL_ADD SQ 1", hypercall::doorbell_add(NVME_BDF.rid(), &sq1).map_err(hypercall::error_name))?;
    }
    println!(
        "{NAME}: SQ 0 tail {:#x} by hypercall, SQ 1 tail {:#x} by {}, both forwarded",
        sq0.offset,
        sq1.offset,
        if info.argument == 1 { "description" } else { "hypercall" }
    );
    let msix = dev.msix;
    msix.set_function_mask(false);
    msix.enable();
    msix.program(0, 0, ADMIN_VECTOR);
    msix.program(1, 0, IO_VECTOR);
    msix.unmask(0);
    msix.unmask(1);
    let admin = Wait::Interrupt(ADMIN_VECTOR);
    let io = Wait::Interrupt(IO_VECTOR);
    let c = &mut dev.controller;
    r.require("enabling the controller", c.init(QUEUE_ENTRIES))?;
    let buf = r.require("identify buffer", memory::alloc_pages(1).ok_or("no free memory"))?;
    let id = r.require("Identify Controller", c.identify_controller(&buf, admin))?;
    let ns = r.require("Identify Namespace 1", c.identify_namespace(NSID, &buf, admin))?;
    r.require("creating I/O queue pair 1", c.create_io_queue_pair(1, QUEUE_ENTRIES, Some(1), admin))?;
    let admin_commands = 4u64;
    println!(
        "{NAME}: controller \"{}\" up by interrupts at {ADMIN_VECTOR:#04x}; namespace 1: {} blocks of {} bytes; I/O queue 1 -> {IO_VECTOR:#04x}",
        id.model(),
        ns.blocks,
        ns.block_bytes
    );
    let block = u64::from(c.block_bytes());
    let wbuf = r.require("write buffer", memory::alloc_pages(1).ok_or("no free memory"))?;
    let rbuf = r.require("read buffer", memory::alloc_pages(1).ok_or("no free memory"))?;
    let _ = PAGE_BYTES;
    for b in 0..BLOCKS {
        for i in 0..block {
            wbuf.write8(i, pattern(b, i));
        }
        r.require("Write", c.write(1, NSID, b, 1, &wbuf, 0, io))?;
    }
    let mut bad_blocks = 0;
    for b in 0..BLOCKS {
        rbuf.fill(0xee);
        r.require("Read", c.read(1, NSID, b, 1, &rbuf, 0, io))?;
        if (0..block).any(|i| rbuf.read8(i) != pattern(b, i)) {
            bad_blocks += 1;
        }
    }
    let io_commands = 2 * BLOCKS;
    let ok = r.check(bad_blocks == 0, format_args!("{bad_blocks} of {BLOCKS} blocks read back differ"));
    if ok {
        println!("{NAME}: {BLOCKS} blocks of {block} bytes written and read back through I/O queue 1: identical");
    }
    let h0 = hypercall::doorbell_hits(NVME_BDF.rid(), &sq0);
    let h1 = hypercall::doorbell_hits(NVME_BDF.rid(), &sq1);
    let (a, i) = (interrupts::count(ADMIN_VECTOR), interrupts::count(IO_VECTOR));
    let ok = r.check(h0 == Ok(admin_commands), format_args!("SQ 0 doorbell hits {h0:?}, expected {admin_commands}"))
        & r.check(h1 == Ok(io_commands), format_args!("SQ 1 doorbell hits {h1:?}, expected {io_commands}"))
        & r.check(
            a == admin_commands,
            format_args!("{a} interrupts at {ADMIN_VECTOR:#04x}, expected {admin_commands}"),
        )
        & r.check(i == io_commands, format_args!("{i} interrupts at {IO_VECTOR:#04x}, expected {io_commands}"));
    if ok {
        println!(
            "{NAME}: fast path served SQ 0 {admin_commands} and SQ 1 {io_commands} submissions; interrupts {a} at {ADMIN_VECTOR:#04x}, {i} at {IO_VECTOR:#04x}"
        );
    }
    if r.passed() {
        guest_flr(r, info, &sq0)?;
    }
    Some(())
}

/// The guest resets the function (Function Level Reset through its PCI Express Device Control):
/// afterwards the controller is disabled (CSTS.RDY 0), MSI-X and bus master read off; brought up
/// again from scratch it completes an admin command by interrupt, its submission rung through the
/// doorbell registered before the reset (doorbells outlive a reset, as VFIO's ioeventfds do).
fn guest_flr(r: &mut Report, info: &BootInfo, sq0: &Request) -> Option<()> {
    const DEVICE_CONTROL: u16 = 0x08;
    const FLR: u16 = 1 << 15;
    let window = BarWindow::from_boot_info(info);
    let mut window = r.require("BAR window", window)?;
    let f = r.require("opening the NVMe function", nvme::open(info, &mut window))?.function;
    let cap = r.require("PCI Express capability", f.find_capability(cap_id::PCIE))?;
    let cap = r.require("PCI Express capability", cap.ok_or("absent"))?;
    let hits_before = hypercall::doorbell_hits(NVME_BDF.rid(), sq0).unwrap_or(0);
    let devctl = u16::from(cap) + DEVICE_CONTROL;
    f.write16(devctl, f.read16(devctl) | FLR);
    let command = f.command();
    let msix_off = {
        let mut dev = r.require(
            "opening the NVMe function after the reset",
            nvme::open(info, &mut BarWindow::from_boot_info(info).ok()?),
        )?;
        // `open` placed BAR 0 again and set MEM|BM; the controller must be in its reset state.
        let ready = dev.controller.csts() & 1;
        let off = !dev.msix.is_enabled();
        let ok = r.check(ready == 0, format_args!("after the FLR CSTS.RDY reads {ready}, expected 0"))
            & r.check(
                command & 0x4 == 0,
                format_args!("after the FLR the command register reads {command:#06x} (bus master on)"),
            )
            & r.check(off, format_args!("after the FLR MSI-X reads enabled"));
        if !ok {
            return None;
        }
        let msix = dev.msix;
        msix.set_function_mask(false);
        msix.enable();
        msix.program(0, 0, ADMIN_VECTOR);
        msix.unmask(0);
        let c = &mut dev.controller;
        r.require("enabling the controller after the FLR", c.init(QUEUE_ENTRIES))?;
        let buf = r.require("identify buffer", memory::alloc_pages(1).ok_or("no free memory"))?;
        let before = interrupts::count(ADMIN_VECTOR);
        let id =
            r.require("Identify Controller after the FLR", c.identify_controller(&buf, Wait::Interrupt(ADMIN_VECTOR)))?;
        let got = interrupts::count(ADMIN_VECTOR) - before;
        let hits = hypercall::doorbell_hits(NVME_BDF.rid(), sq0).unwrap_or(0) - hits_before;
        r.check(
            id.vid == nvme::VENDOR && got == 1,
            format_args!("after the FLR: VID {:#06x}, {got} interrupts", id.vid),
        ) & r.check(hits == 1, format_args!("after the FLR the SQ 0 doorbell took {hits} writes, expected 1"))
    };
    if msix_off {
        println!("{NAME}: guest FLR: reset (RDY 0, MSI-X off); up again, Identify by interrupt via the SQ 0 doorbell");
    }
    Some(())
}
