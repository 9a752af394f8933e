//! `iommu_dma_allowed` and `iommu_dma_blocked`: QEMU's edu device does real DMA through the
//! VT-d unit. Allowed: bytes round-trip from one mapped IOVA through the device to another,
//! byte for byte, and nothing lands beyond the transfer. Blocked: DMA to an unmapped IOVA, DMA
//! aimed at the hypervisor's own code, a write through a read-only mapping, a read of an
//! unmapped IOVA, and any DMA from the device once it is unassigned, each leave the target
//! unchanged and are recorded as faults with edu's source ID, the right reason and the owner;
//! assignment is refused while the device holds an interrupt remapping entry; then a flood of
//! faults, after which the unit still translates and reports.

use super::check;
use super::edu::{Direction, Edu, MAX_TRANSFER};
use crate::arch::paging;
use crate::arch::vtd::DmaBuffer;
use crate::iommu::{self, AssignError, Domain, LoggedFault, Owner};
use crate::{Platform, println};
use conduit_iommu::vtd::fault::reason_name;
use conduit_iommu::{DmaAccess, FaultKind, InterruptTarget, IommuError};

/// IOVAs the tests use: below 256 MiB (edu masks DMA addresses to 28 bits) and apart from the
/// physical addresses the blocked tests aim at (the image at 2 MiB, the canary frame).
const IOVA_SRC: u64 = 0x0800_0000;
const IOVA_DST: u64 = 0x0810_0000;
const IOVA_UNMAPPED_READ: u64 = 0x0850_0000;
const IOVA_FLOOD: u64 = 0x0900_0000;
const IOVA_AFTER_FLOOD: u64 = 0x0a00_0000;
/// Bytes per transfer.
const N: u64 = MAX_TRANSFER;
/// How long a fault may take to show up in the log.
const FAULT_WAIT_US: u64 = 200_000;
/// Faulting transfers in the flood.
const FLOOD: u32 = 100;

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(7) ^ (i >> 8) ^ 0x5a) as u8
}

struct Setup {
    edu: Edu,
    dom: Domain,
    src: DmaBuffer,
    dst: DmaBuffer,
}

fn setup(p: &Platform) -> Result<Setup, &'static str> {
    check(p.iommu.is_some(), "no IOMMU (run with -device intel-iommu)")?;
    let edu = Edu::open()?;
    let dom = iommu::create_domain_for(edu.addr).map_err(|_| "cannot create a domain")?;
    let mut src = DmaBuffer::alloc(1).ok_or("no memory for the source buffer")?;
    let dst = DmaBuffer::alloc(1).ok_or("no memory for the destination buffer")?;
    src.fill(pattern);
    iommu::map(dom, IOVA_SRC, src.paddr(), 0x1000, DmaAccess::Read).map_err(|_| "map source")?;
    iommu::map(dom, IOVA_DST, dst.paddr(), 0x1000, DmaAccess::ReadWrite).map_err(|_| "map destination")?;
    iommu::assign(dom, edu.addr, Owner::Hypervisor).map_err(|_| "cannot assign edu")?;
    iommu::clear_fault_log();
    Ok(Setup { edu, dom, src, dst })
}

fn teardown(s: Setup) -> Result<(), &'static str> {
    s.edu.quiesce();
    if iommu::unassign(s.edu.addr).is_err() {
        // Already unassigned by the test.
    }
    iommu::destroy_domain(s.dom).map_err(|_| "cannot destroy the domain")
}

fn round_trip(s: &mut Setup) -> Result<(), &'static str> {
    s.dst.fill(|_| 0);
    s.edu.dma(Direction::ToDevice, IOVA_SRC, N)?;
    s.edu.dma(Direction::ToMemory, IOVA_DST, N)?;
    check(
        s.dst.all(|i| if (i as u64) < N { pattern(i) } else { 0 }),
        "the bytes that came back differ from the bytes sent",
    )
}

pub fn allowed(p: &Platform) -> Result<(), &'static str> {
    let mut s = setup(p)?;
    round_trip(&mut s)?;
    let faults = iommu::with_fault_log(|l| l.total);
    check(faults == 0, "the allowed transfers faulted")?;
    println!(
        "iommu_dma_allowed: {} bytes from IOVA {:#x} (phys {:#x}) through edu to IOVA {:#x} (phys {:#x}): identical byte for byte, nothing written beyond",
        N,
        IOVA_SRC,
        s.src.paddr(),
        IOVA_DST,
        s.dst.paddr()
    );
    println!("iommu_dma_allowed: {} assigned to domain {} on unit {}; 0 faults", s.edu.addr, s.dom.id, s.dom.unit);
    defmt::info!("iommu_dma_allowed: {=u64} bytes round-tripped", N);
    teardown(s)
}

/// Waits for edu's fault with `reason` at `page`; prints it with its attribution.
fn expect_fault(edu: &Edu, what: &str, reason: u8, page: u64, write: bool) -> Result<LoggedFault, &'static str> {
    let sid = edu.addr.requester_id();
    let f = iommu::wait_for_fault(FAULT_WAIT_US, |f| {
        f.fault.source_id == sid && f.fault.reason == reason && f.fault.kind == FaultKind::Dma { address: page, write }
    })
    .ok_or("the expected fault was not recorded")?;
    println!(
        "iommu_dma_blocked: {}: blocked; fault sid {:#06x} ({}) reason {:#04x} ({}) {} at {:#x}, owner {:?}",
        what,
        f.fault.source_id,
        edu.addr,
        f.fault.reason,
        reason_name(f.fault.reason),
        if write { "write" } else { "read" },
        page,
        f.owner
    );
    defmt::info!("iommu_dma_blocked: {=str}: fault reason {=u8:#x} at {=u64:#x}", what, f.fault.reason, page);
    Ok(f)
}

pub fn blocked(p: &Platform) -> Result<(), &'static str> {
    let mut s = setup(p)?;
    // 1. An unmapped IOVA equal to a real frame's address: without the IOMMU it would land there.
    let mut canary = DmaBuffer::alloc(1).ok_or("no memory for the canary")?;
    check(![IOVA_SRC, IOVA_DST].contains(&canary.paddr()), "the canary frame collides with a mapped IOVA")?;
    canary.fill(|_| 0xa5);
    s.edu.dma(Direction::ToMemory, canary.paddr(), N)?;
    expect_fault(&s.edu, "write to unmapped IOVA (a real frame's address)", 5, canary.paddr(), true)?;
    check(canary.all(|_| 0xa5), "DMA landed in the unmapped frame")?;
    println!("iommu_dma_blocked: target frame {:#x} unchanged", canary.paddr());

    // 2. Aimed at the hypervisor's own code.
    let (text, _, _) = paging::image_sections();
    let before = paging::fingerprint(text.start, 0x1000).ok_or("cannot read the image")?;
    s.edu.dma(Direction::ToMemory, text.start, N)?;
    expect_fault(&s.edu, "write aimed at hypervisor code", 5, text.start, true)?;
    check(paging::fingerprint(text.start, 0x1000) == Some(before), "DMA changed hypervisor code")?;
    println!("iommu_dma_blocked: hypervisor text at {:#x} unchanged", text.start);

    // 3. Through a read-only mapping.
    s.edu.dma(Direction::ToMemory, IOVA_SRC, N)?;
    expect_fault(&s.edu, "write through a read-only mapping", 5, IOVA_SRC, true)?;
    check(s.src.all(pattern), "DMA wrote through a read-only mapping")?;

    // 4. A read of an unmapped IOVA.
    s.edu.dma(Direction::ToDevice, IOVA_UNMAPPED_READ, N)?;
    expect_fault(&s.edu, "read of unmapped IOVA", 6, IOVA_UNMAPPED_READ, false)?;

    // 5. Changes after a translation was cached: a transfer through IOVA_DST succeeds (the unit
    //    caches it), then the mapping becomes read-only, then it is unmapped; each change is
    //    invalidated before returning, so the next transfer must fault.
    round_trip(&mut s)?;
    iommu::map(s.dom, IOVA_DST, s.dst.paddr(), 0x1000, DmaAccess::Read).map_err(|_| "remap read-only")?;
    s.dst.fill(|_| 0x77);
    s.edu.dma(Direction::ToMemory, IOVA_DST, N)?;
    expect_fault(&s.edu, "write after the mapping became read-only", 5, IOVA_DST, true)?;
    check(s.dst.all(|_| 0x77), "a stale writable translation was used")?;
    iommu::unmap(s.dom, IOVA_DST, 0x1000).map_err(|_| "unmap")?;
    s.edu.dma(Direction::ToDevice, IOVA_DST, N)?;
    expect_fault(&s.edu, "read after unmap", 6, IOVA_DST, false)?;
    iommu::map(s.dom, IOVA_DST, s.dst.paddr(), 0x1000, DmaAccess::ReadWrite).map_err(|_| "remap")?;
    println!("iommu_dma_blocked: permission change and unmap take effect at once (IOTLB invalidated)");

    // 6. Unassigned: no context entry, nothing reachable, not even the old mappings.
    iommu::unassign(s.edu.addr).map_err(|_| "cannot unassign edu")?;
    s.dst.fill(|_| 0x3c);
    s.edu.dma(Direction::ToMemory, IOVA_DST, N)?;
    let f = expect_fault(&s.edu, "write from the unassigned device", 2, IOVA_DST, true)?;
    check(f.owner == Owner::Unassigned, "the fault was not attributed to 'unassigned'")?;
    check(s.dst.all(|_| 0x3c), "an unassigned device's DMA landed")?;
    println!("iommu_dma_blocked: unassigned device can DMA nowhere (destination unchanged)");

    // 7. Interrupt entries stay with their owner: a device holding one is not handed over.
    let (h, _) = iommu::alloc_interrupt(s.edu.addr, InterruptTarget { apic_id: 0, vector: 0x40 })
        .map_err(|_| "no remapping entry")?;
    let refused = iommu::assign(s.dom, s.edu.addr, Owner::Hypervisor);
    iommu::free_interrupt(s.edu.addr, h).map_err(|_| "cannot free the remapping entry")?;
    check(
        refused == Err(AssignError::Iommu(IommuError::InterruptsInUse(s.edu.addr))),
        "a device holding an interrupt remapping entry was assigned",
    )?;
    println!("iommu_dma_blocked: assignment refused while edu holds IRTE {} (InterruptsInUse)", h.0);

    // 8. A flood, then the unit still works.
    iommu::assign(s.dom, s.edu.addr, Owner::Hypervisor).map_err(|_| "cannot reassign edu")?;
    let total_before = iommu::with_fault_log(|l| l.total);
    for i in 0..FLOOD {
        s.edu.dma(Direction::ToMemory, IOVA_FLOOD + u64::from(i) * 0x1000, 64)?;
    }
    crate::arch::time::delay_us(FAULT_WAIT_US);
    let (total, overflows, dropped, logged) =
        iommu::with_fault_log(|l| (l.total, l.overflows, l.dropped, l.iter().count()));
    let recorded = total - total_before;
    check(recorded > 0, "the flood recorded no fault")?;
    check(logged <= iommu::FAULT_LOG, "the fault log is unbounded")?;
    println!(
        "iommu_dma_blocked: flood of {} faulting transfers: {} recorded, {} hardware overflows, {} dropped from the bounded log",
        FLOOD, recorded, overflows, dropped
    );
    iommu::clear_fault_log();
    round_trip(&mut s)?;
    s.edu.dma(Direction::ToMemory, IOVA_AFTER_FLOOD, 64)?;
    expect_fault(&s.edu, "after the flood", 5, IOVA_AFTER_FLOOD, true)?;
    println!("iommu_dma_blocked: after the flood the unit still translates (round trip identical) and reports faults");
    teardown(s)
}
