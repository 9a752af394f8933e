//! `nvme_msix`: an NVMe driver (QEMU nvme passed through at 00:01.0, 1 MiB namespace) that
//! brings MSI-X entries to life one at a time, long after MSI-X was enabled:
//! - MSI-X enabled with every entry masked (reset state) and the function unmasked; entry 0
//!   (vCPU 0, 0x60) programmed and unmasked; controller enabled; Identify Controller and
//!   Namespace, each completion waited for by its interrupt at 0x60;
//! - I/O queue pairs 1–4 created with IV 1–4 and IEN while entries 1–4 (0x61–0x64) stay masked;
//! - for k in 1..=4: a command submitted on every live queue (admin Get Features, a Read on each
//!   I/O queue 1..k-1), entry k unmasked while they are in flight, each completed by its own
//!   vector; then a round in which every live queue completes one
//!   command at a time (admin: Get Features; I/O queue q ≤ k: Write then Read of its own LBA,
//!   data compared), each waited for by its own vector. After every round: each vector's count
//!   equals its queue's completions, still-masked vectors saw nothing and their PBA bits are
//!   clear;
//! - IRQ_STATS of entries 0–4: delivered equals the guest's count, coalesced 0.
//!
//! Only vCPU 0 takes part (other vCPUs exit at once with `PASS`).
#![no_std]
#![no_main]

use conduit_guest_rt::abi::irq;
use conduit_guest_rt::devices::nvme::{self, Command, NvmeFunction, Wait, feature};
use conduit_guest_rt::memory::{self, DmaBuf, PAGE_BYTES};
use conduit_guest_rt::pci::{BarWindow, Bdf};
use conduit_guest_rt::report::Report;
use conduit_guest_rt::{BootInfo, cpu, entry, hypercall, interrupts, lapic, println};
use conduit_test_guests::{VectorList, pattern_byte};

entry!(main);

const NAME: &str = "nvme_msix";
/// Where the partition's first device appears (`docs/devices.md`).
const NVME_BDF: Bdf = Bdf::new(0, 1, 0);
/// Vector of MSI-X entry `i` (0: admin queue, `q`: I/O queue `q`).
const BASE_VECTOR: u8 = 0x60;
/// I/O queue pairs.
const IO_QUEUES: u16 = 4;
/// Queues in all (admin + I/O).
const QUEUES: usize = IO_QUEUES as usize + 1;
/// Entries per queue.
const QUEUE_ENTRIES: u16 = 16;
/// Namespace used, and its expected size.
const NSID: u32 = 1;
const NAMESPACE_BYTES: u64 = 1 << 20;

fn vector(entry: u16) -> u8 {
    BASE_VECTOR + entry as u8
}

fn main(info: &'static BootInfo) -> u64 {
    let mut r = Report::new(NAME);
    if info.vcpu != 0 {
        println!("{NAME}: vcpu {} has nothing to do", info.vcpu);
        return r.finish();
    }
    cpu::cli();
    for e in 0..QUEUES as u16 {
        interrupts::register(vector(e), interrupts::count_only);
    }
    lapic::enable(interrupts::SPURIOUS_VECTOR);
    lapic::set_tpr(0);
    cpu::sti();
    let mut completions = [0u64; QUEUES];
    if let Some(mut dev) = setup(&mut r, info, &mut completions) {
        rounds(&mut r, &mut dev, &mut completions);
        if r.passed() {
            check_stats(&mut r, &completions);
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
        println!("{NAME}: all checks passed: vectors 0x60-0x64 counts {}", Counts(&completions));
    }
    r.finish()
}

/// Space-separated counts.
struct Counts<'a>(&'a [u64]);

impl core::fmt::Display for Counts<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// Finds and opens the controller, brings up MSI-X with only entry 0 live, enables the
/// controller, identifies it and namespace 1, creates I/O queues 1–4 behind masked entries.
fn setup(r: &mut Report, info: &BootInfo, completions: &mut [u64; QUEUES]) -> Option<NvmeFunction> {
    let mut window = r.require("BAR window", BarWindow::from_boot_info(info))?;
    let mut dev = r.require("opening the NVMe function", nvme::open(info, &mut window))?;
    let f = dev.function;
    if !r.check(f.bdf() == NVME_BDF, format_args!("nvme found at {}, expected {NVME_BDF}", f.bdf())) {
        return None;
    }
    let msix = dev.msix;
    println!(
        "{NAME}: nvme {:04x}:{:04x} at {}: BAR0 {:#x} bytes at {:#x}, MSI-X {} entries",
        nvme::VENDOR,
        nvme::DEVICE,
        f.bdf(),
        dev.bar.size,
        dev.bar.address(),
        msix.entries()
    );
    if !r.check(msix.entries() > IO_QUEUES, format_args!("only {} MSI-X entries", msix.entries())) {
        return None;
    }
    let masked = msix.masked_count(msix.entries());
    r.check(masked == msix.entries(), format_args!("{masked} of {} MSI-X entries masked at reset", msix.entries()));
    msix.set_function_mask(false);
    msix.enable();
    let ok = r.check(
        msix.is_enabled() && !msix.function_masked(),
        format_args!("MSI-X control {:#06x} after enabling", msix.control()),
    );
    if !ok || masked != msix.entries() {
        return None;
    }
    println!("{NAME}: MSI-X enabled, function unmasked, all {} entries masked", msix.entries());
    msix.program(0, 0, vector(0));
    msix.unmask(0);
    let e0 = msix.entry(0);
    if !r.check(
        !e0.masked() && e0.data == u32::from(vector(0)) && e0.address == 0xfee0_0000,
        format_args!("entry 0 reads {e0:?} after programming"),
    ) {
        return None;
    }
    println!("{NAME}: entry 0 -> vcpu 0 vector {:#04x}, unmasked", vector(0));

    let admin = Wait::Interrupt(vector(0));
    let c = &mut dev.controller;
    r.require("enabling the controller", c.init(QUEUE_ENTRIES))?;
    println!(
        "{NAME}: controller enabled: admin queue {QUEUE_ENTRIES} entries, doorbell stride {}",
        c.doorbell_stride()
    );
    let buf = r.require("identify buffer", memory::alloc_pages(1).ok_or("no free memory"))?;
    let id = r.require("Identify Controller", c.identify_controller(&buf, admin))?;
    completions[0] += 1;
    if !r.check(id.vid == nvme::VENDOR, format_args!("Identify Controller VID {:#06x}", id.vid)) {
        return None;
    }
    println!(
        "{NAME}: Identify Controller by interrupt {:#04x}: vendor {:#06x}, model \"{}\"",
        vector(0),
        id.vid,
        id.model()
    );
    let ns = r.require("Identify Namespace 1", c.identify_namespace(NSID, &buf, admin))?;
    completions[0] += 1;
    let ns_bytes = ns.blocks * u64::from(ns.block_bytes);
    if !r.check(
        ns.block_bytes == 512 && ns_bytes == NAMESPACE_BYTES,
        format_args!(
            "namespace 1: {} blocks of {} bytes, expected 1 MiB of 512-byte blocks",
            ns.blocks, ns.block_bytes
        ),
    ) {
        return None;
    }
    println!("{NAME}: namespace 1: {} blocks of {} bytes", ns.blocks, ns.block_bytes);

    for q in 1..=IO_QUEUES {
        msix.program(q, 0, vector(q));
    }
    for q in 1..=IO_QUEUES {
        r.require("creating an I/O queue pair", c.create_io_queue_pair(q, QUEUE_ENTRIES, Some(q), admin))?;
        completions[0] += 2;
    }
    let still_masked = (1..=IO_QUEUES).all(|q| msix.is_masked(q));
    r.check(still_masked, format_args!("entries 1-4 not all masked after programming"));
    check_counts(r, &dev, completions, 0);
    if !r.passed() {
        return None;
    }
    println!(
        "{NAME}: I/O queues 1-4 created (IV 1-4, IEN); entries 1-4 -> {:#04x}-{:#04x} still masked",
        vector(1),
        vector(IO_QUEUES)
    );
    Some(dev)
}

/// Each vector's count equals its queue's completions; entries above `live` are masked, saw
/// no interrupt and have their PBA bit clear; live entries' PBA bits are clear too.
fn check_counts(r: &mut Report, dev: &NvmeFunction, completions: &[u64; QUEUES], live: u16) -> bool {
    let before = r.failures();
    for e in 0..QUEUES as u16 {
        let got = interrupts::count(vector(e));
        let want = if e <= live { completions[usize::from(e)] } else { 0 };
        r.check(
            got == want,
            format_args!("vector {:#04x}: {got} interrupts, expected {want} (completions on queue {e})", vector(e)),
        );
        r.check(
            !dev.msix.pending(e),
            format_args!("PBA bit {e} set (entry {})", if e <= live { "live" } else { "masked" }),
        );
        if e > live {
            r.check(dev.msix.is_masked(e), format_args!("entry {e} unmasked, but nothing unmasked it"));
        }
    }
    r.failures() == before
}

/// The I/O LBA of queue `q` in round `k` (distinct for every pair).
fn lba(k: u16, q: u16) -> u64 {
    u64::from(k) * 8 + u64::from(q)
}

/// The data of the block written by queue `q` in round `k`.
fn block_byte(k: u16, q: u16, i: u64) -> u8 {
    pattern_byte(u64::from(k) << 8 | u64::from(q), i)
}

/// Rounds k = 1..=4: unmask entry k; every live queue completes one command at a time, each
/// waited for on its own vector.
fn rounds(r: &mut Report, dev: &mut NvmeFunction, completions: &mut [u64; QUEUES]) {
    let (Some(wbuf), Some(rbuf)) = (memory::alloc_pages(2), memory::alloc_pages(2)) else {
        r.fail(format_args!("no free memory for the data buffers"));
        return;
    };
    for k in 1..=IO_QUEUES {
        // Commands in flight on every live queue (admin and I/O 1..k-1) while entry k is
        // unmasked: activating one entry must not disturb the others' delivery.
        let mut in_flight = [(0u16, 0u16, 0u64); QUEUES];
        let mut n = 0;
        let get = Command {
            opcode: nvme::opcode::GET_FEATURES,
            cdw: [u32::from(feature::NUMBER_OF_QUEUES), 0, 0, 0, 0, 0],
            ..Command::default()
        };
        let before0 = interrupts::count(vector(0));
        match dev.controller.submit(0, &get) {
            Ok(cid) => {
                in_flight[n] = (0, cid, before0);
                n += 1;
            }
            Err(e) => {
                r.fail(format_args!("submitting Get Features before unmasking entry {k}: {e}"));
                return;
            }
        }
        for q in 1..k {
            let read = dev.controller.io_command(nvme::opcode::READ, NSID, lba(k - 1, q), 1, &rbuf, 0);
            let Some(read) = r.require("building a Read", read) else { return };
            let before = interrupts::count(vector(q));
            match dev.controller.submit(q, &read) {
                Ok(cid) => {
                    in_flight[n] = (q, cid, before);
                    n += 1;
                }
                Err(e) => {
                    r.fail(format_args!("submitting a Read on queue {q} before unmasking entry {k}: {e}"));
                    return;
                }
            }
        }
        dev.msix.unmask(k);
        if !r.check(!dev.msix.is_masked(k), format_args!("entry {k} still masked after unmasking")) {
            return;
        }
        for &(q, cid, before) in &in_flight[..n] {
            let arrived = interrupts::wait_for_count(vector(q), before + 1, nvme::COMMAND_TIMEOUT_US);
            let done = dev.controller.wait_poll(q, cid, nvme::COMMAND_TIMEOUT_US);
            if !r.check(
                arrived && done.is_ok(),
                format_args!(
                    "command in flight on queue {q} across unmasking entry {k}: interrupt {arrived}, {done:?}"
                ),
            ) {
                return;
            }
            completions[usize::from(q)] += 1;
        }
        let features = dev.controller.get_features(feature::NUMBER_OF_QUEUES, Wait::Interrupt(vector(0)));
        if r.require("round admin command (Get Features)", features).is_none() {
            return;
        }
        completions[0] += 1;
        for q in 1..=k {
            if !write_read(r, dev, &wbuf, &rbuf, k, q) {
                return;
            }
            completions[usize::from(q)] += 2;
        }
        if !check_counts(r, dev, completions, k) {
            return;
        }
        let mut live = VectorList::new();
        for e in 0..=k {
            live.push(vector(e));
        }
        println!("{NAME}: entry {k} unmasked: vectors {live} live, counts {}", Counts(&completions[..=usize::from(k)]));
    }
}

/// On queue `q`: Write the round's block, Read it back into a scrubbed buffer, compare. Data
/// offsets alternate between page-aligned and crossing a page (PRP2).
fn write_read(r: &mut Report, dev: &mut NvmeFunction, wbuf: &DmaBuf, rbuf: &DmaBuf, k: u16, q: u16) -> bool {
    let block = u64::from(dev.controller.block_bytes());
    let offset = if (k + q) % 2 == 1 { PAGE_BYTES - block / 2 } else { 0 };
    let wait = Wait::Interrupt(vector(q));
    for i in 0..block {
        wbuf.write8(offset + i, block_byte(k, q, i));
    }
    rbuf.fill(0xee);
    let c = &mut dev.controller;
    if r.require("Write", c.write(q, NSID, lba(k, q), 1, wbuf, offset, wait)).is_none() {
        return false;
    }
    if r.require("Read", c.read(q, NSID, lba(k, q), 1, rbuf, offset, wait)).is_none() {
        return false;
    }
    let bad = (0..block).filter(|&i| rbuf.read8(offset + i) != block_byte(k, q, i)).count();
    r.check(
        bad == 0,
        format_args!("queue {q} round {k}: {bad} of {block} bytes read back from LBA {} differ", lba(k, q)),
    )
}

/// IRQ_STATS of entries 0–4 agree with the guest's counts.
fn check_stats(r: &mut Report, completions: &[u64; QUEUES]) {
    let rid = NVME_BDF.rid();
    for e in 0..QUEUES as u16 {
        let counted = interrupts::count(vector(e));
        match hypercall::irq_stats(rid, irq::INDEX_MSIX, u64::from(e)) {
            Ok(s) => {
                println!(
                    "{NAME}: IRQ_STATS entry {e}: raised {} delivered {} coalesced {} masked {} spurious {}",
                    s.raised, s.delivered, s.coalesced, s.pending_while_masked, s.spurious
                );
                r.check(
                    s.delivered == counted,
                    format_args!("entry {e}: delivered {} but the guest counted {counted}", s.delivered),
                );
                r.check(s.coalesced == 0, format_args!("entry {e}: coalesced {}, expected 0", s.coalesced));
            }
            Err(err) => {
                r.fail(format_args!("IRQ_STATS({rid:#06x}, MSI-X, {e}) -> {err} ({})", hypercall::error_name(err)))
            }
        }
        r.check(
            counted == completions[usize::from(e)],
            format_args!(
                "vector {:#04x}: {counted} interrupts, {} completions",
                vector(e),
                completions[usize::from(e)]
            ),
        );
    }
}
