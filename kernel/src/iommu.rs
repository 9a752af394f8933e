//! The machine's IOMMU. Brought up at boot from the DMAR with every device blocked (empty root
//! tables, translation on) and interrupt remapping on; from then on it is the only way a device
//! gets DMA (attachment to a domain) or interrupts (remapping entries). Faults are drained by
//! the fault-event interrupt into a bounded log, each attributed to the owner of the device
//! that caused it. Without an IOMMU, without interrupt remapping on the device's unit, with a
//! DMAR that did not fit (something in it was dropped), or for a device whose DMA reaches the
//! IOMMU under another requester ID (behind a PCIe-to-PCI or conventional PCI bridge), device
//! assignment is refused with the reason.

use crate::arch::interrupts::{self, Handler, vectors};
use crate::arch::mmio::MmioWindow;
use crate::arch::vtd::{self, KernelDma};
use crate::sync::IrqMutex;
use conduit_iommu::vtd::dmar::Dmar;
use conduit_iommu::vtd::unit::{FaultEvent, FaultReader, VtdUnit};
use conduit_iommu::{DmaAccess, DomainId, Fault, InterruptHandle, InterruptTarget, Iommu, IommuError, MsiMessage};
use conduit_pci::PciAddress;
use core::sync::atomic::{AtomicU64, Ordering};
use heapless::{Deque, Vec};

/// Units driven (more units in the DMAR are an error at bring-up).
pub const MAX_UNITS: usize = 4;
/// Faults kept in the log (oldest dropped first).
pub const FAULT_LOG: usize = 64;

type Unit = VtdUnit<MmioWindow, KernelDma>;

static UNITS: IrqMutex<Vec<Unit, MAX_UNITS>> = IrqMutex::new(Vec::new());
static READERS: spin::Once<Vec<FaultReader<MmioWindow>, MAX_UNITS>> = spin::Once::new();
static DMAR: spin::Once<Dmar> = spin::Once::new();
/// Structures, scopes or units the DMAR parser dropped for lack of room (0 when it all fit).
static DMAR_DROPPED: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);
static ABSENT: spin::Once<&'static str> = spin::Once::new();
static LOG: IrqMutex<FaultLog> = IrqMutex::new(FaultLog::new());
/// Owner of each attached device: requester ID (bits 15:0), owner (47:16), valid (bit 63).
/// Read lock-free by the fault handler; written only with `UNITS` locked (see `set_owner`).
static OWNERS: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];

/// Who a device belongs to, for fault attribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum Owner {
    /// Nobody: the device is blocked.
    Unassigned,
    /// The hypervisor itself (scenarios).
    Hypervisor,
    /// A guest, by partition index.
    Guest(u16),
}

impl Owner {
    /// 0, 1, or 2 + g (up to 0x1_0001: wider than 16 bits, hence a 32-bit field).
    const fn encode(self) -> u64 {
        match self {
            Self::Unassigned => 0,
            Self::Hypervisor => 1,
            Self::Guest(g) => 2 + g as u64,
        }
    }
    const fn decode(v: u64) -> Self {
        match v {
            0 => Self::Unassigned,
            1 => Self::Hypervisor,
            g => Self::Guest((g - 2) as u16),
        }
    }
}

/// An `OWNERS` slot: `owner` of the device with requester ID `rid`.
const fn owner_slot(rid: u16, owner: Owner) -> u64 {
    1 << 63 | owner.encode() << 16 | rid as u64
}

/// The owner recorded in an `OWNERS` slot.
const fn slot_owner(v: u64) -> Owner {
    Owner::decode((v >> 16) & 0xffff_ffff)
}

/// Every owner survives the slot encoding (checked at compile time: the kernel has no host
/// tests). Guests 0xfffe and 0xffff once decoded as `Unassigned` and `Hypervisor`.
const _: () = {
    assert!(matches!(slot_owner(owner_slot(0xffff, Owner::Guest(0xffff))), Owner::Guest(0xffff)));
    assert!(matches!(slot_owner(owner_slot(0x10, Owner::Guest(0xfffe))), Owner::Guest(0xfffe)));
    assert!(matches!(slot_owner(owner_slot(0x10, Owner::Guest(0))), Owner::Guest(0)));
    assert!(matches!(slot_owner(owner_slot(0x10, Owner::Hypervisor)), Owner::Hypervisor));
    assert!(owner_slot(0xffff, Owner::Guest(0xffff)) as u16 == 0xffff);
};

/// A logged fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub struct LoggedFault {
    /// Unit index.
    pub unit: u8,
    /// The fault.
    pub fault: Fault,
    /// The device's owner when the fault was taken.
    pub owner: Owner,
}

/// The bounded fault log and its counters.
#[derive(Debug)]
pub struct FaultLog {
    entries: Deque<LoggedFault, FAULT_LOG>,
    /// Faults seen (including those dropped from the log).
    pub total: u64,
    /// Fault events on which the unit reported an overflow (faults lost in hardware).
    pub overflows: u64,
    /// Oldest entries dropped to make room.
    pub dropped: u64,
    /// Fault interrupts taken.
    pub interrupts: u64,
    /// Drains that stopped with faults still pending (a device recording faults faster than
    /// they were drained); they are drained again later (`wait_for_fault`, the next event).
    pub left_pending: u64,
}

impl FaultLog {
    const fn new() -> Self {
        Self { entries: Deque::new(), total: 0, overflows: 0, dropped: 0, interrupts: 0, left_pending: 0 }
    }

    /// Logged faults, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &LoggedFault> {
        self.entries.iter()
    }

    fn push(&mut self, f: LoggedFault) {
        self.total += 1;
        if self.entries.is_full() {
            self.entries.pop_front();
            self.dropped += 1;
        }
        let _ = self.entries.push_back(f);
    }
}

/// Why the IOMMU is not in use.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum InitError {
    /// The DMAR lists more units than Conduit drives.
    TooManyUnits(usize),
    /// Mapping a unit's registers failed.
    Map(crate::arch::paging::MmioMapError),
    /// Fault events cannot reach this APIC ID (xAPIC format: 255 at most).
    FaultDestination(u32),
    /// The unit refused.
    Unit(IommuError),
}

/// What bring-up did.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub struct Summary {
    /// Units brought up.
    pub units: usize,
    /// Interrupt remapping on.
    pub interrupt_remapping: bool,
    /// Second-level levels of unit 0.
    pub levels: u8,
    /// Unit 0 snoops CPU caches.
    pub coherent: bool,
}

static FAULT_HANDLER: Handler = Handler { name: "iommu-fault", run: on_fault };

fn owner_of(source_id: u16) -> Owner {
    OWNERS
        .iter()
        .map(|o| o.load(Ordering::Acquire))
        .find(|&v| v >> 63 != 0 && v as u16 == source_id)
        .map_or(Owner::Unassigned, slot_owner)
}

/// Records (or, with `Owner::Unassigned`, forgets) `dev`'s owner. Fails when the table is
/// full, so a device is never attached without an owner to blame its faults on. `_units` is
/// the locked unit list: writers find a slot and store into it in two steps, so they must be
/// serialized (and with the attachment they record); the fault handler only loads.
fn set_owner(_units: &mut Vec<Unit, MAX_UNITS>, dev: PciAddress, owner: Owner) -> Result<(), AssignError> {
    let rid = u64::from(dev.requester_id());
    let value = if owner == Owner::Unassigned { 0 } else { owner_slot(dev.requester_id(), owner) };
    if let Some(slot) = OWNERS.iter().find(|s| {
        let v = s.load(Ordering::Acquire);
        v >> 63 != 0 && v & 0xffff == rid
    }) {
        slot.store(value, Ordering::Release);
        return Ok(());
    }
    if owner == Owner::Unassigned {
        return Ok(());
    }
    let slot = OWNERS
        .iter()
        .find(|s| s.load(Ordering::Acquire) >> 63 == 0)
        .ok_or(AssignError::Iommu(IommuError::Exhausted("owner slots")))?;
    slot.store(value, Ordering::Release);
    Ok(())
}

/// Fault-event interrupt: drains every unit's records into the log. Uses only the fault
/// registers (no unit lock) and the log's own lock.
fn on_fault(_frame: &mut crate::arch::idt::Frame) {
    let mut log = LOG.lock();
    log.interrupts += 1;
    drain_into(&mut log);
}

/// Drains every unit's fault records into `log` (the caller holds the log's lock, which
/// serializes drains). Each drain is bounded; faults it leaves pending raise no new event, so
/// they are counted and picked up by the next drain.
fn drain_into(log: &mut FaultLog) {
    let Some(readers) = READERS.get() else { return };
    for (unit, r) in readers.iter().enumerate() {
        let d = r.drain(&mut |fault| {
            let owner = owner_of(fault.source_id);
            log.push(LoggedFault { unit: unit as u8, fault, owner });
        });
        if d.overflowed {
            log.overflows += 1;
        }
        if d.pending {
            log.left_pending += 1;
        }
    }
}

/// Brings up every unit of `dmar` (or records why there is no IOMMU). Fault events go to
/// `fault_apic_id`.
pub fn init(dmar: Option<Dmar>, fault_apic_id: u32) -> Result<Option<Summary>, InitError> {
    let Some(dmar) = dmar else {
        ABSENT.call_once(|| "no DMAR table: the platform has no VT-d IOMMU");
        return Ok(None);
    };
    if dmar.units.len() > MAX_UNITS {
        return Err(InitError::TooManyUnits(dmar.units.len()));
    }
    let remap = dmar.flags & conduit_iommu::vtd::dmar::flags::INTR_REMAP != 0;
    let fault =
        FaultEvent::new(fault_apic_id, vectors::IOMMU_FAULT).map_err(|_| InitError::FaultDestination(fault_apic_id))?;
    if dmar.dropped > 0 {
        // A dropped RMRR or scope could name a device firmware DMAs for, or place it under
        // another unit: no device is assigned on a partial picture.
        DMAR_DROPPED.store(dmar.dropped, Ordering::Relaxed);
        defmt::warn!(
            "iommu: the DMAR did not fit ({=u32} units, RMRRs or scopes dropped): assignment refused",
            dmar.dropped
        );
        crate::println!("iommu: DMAR incomplete ({} structures dropped): device assignment refused", dmar.dropped);
    }
    interrupts::register(vectors::IOMMU_FAULT, &FAULT_HANDLER);
    let mut units = UNITS.lock();
    let mut readers: Vec<FaultReader<MmioWindow>, MAX_UNITS> = Vec::new();
    let brought_up = bring_up(&dmar, fault, remap, &mut units, &mut readers);
    // Units enabled before a failure have their fault events unmasked and routed to the
    // handler: it must find their readers, whatever happened to the rest.
    READERS.call_once(|| readers);
    brought_up?;
    let u0 = units.first();
    let summary = Summary {
        units: units.len(),
        interrupt_remapping: u0.is_some_and(|u| u.status().contains(conduit_iommu::vtd::regs::Gsts::IRES)),
        levels: u0.map_or(0, |u| u.levels()),
        coherent: u0.is_some_and(|u| u.ecap().coherent()),
    };
    drop(units);
    DMAR.call_once(|| dmar);
    // Context tables for every bus with devices now, so later assignments allocate nothing
    // that outlives them.
    crate::pci::with_inventory(|inv| {
        for f in &inv.functions {
            if let Ok(unit) = unit_for(f.addr)
                && let Err(e) = with_unit(unit, |u| u.prepare_bus(f.addr.bus))
            {
                defmt::warn!("iommu: context table for bus {=u8}: {}", f.addr.bus, e);
            }
        }
    });
    Ok(Some(summary))
}

/// Probes and enables every unit of `dmar`, in order, into `units` (and their fault readers
/// into `readers`); stops at the first failure.
fn bring_up(
    dmar: &Dmar,
    fault: FaultEvent,
    remap: bool,
    units: &mut Vec<Unit, MAX_UNITS>,
    readers: &mut Vec<FaultReader<MmioWindow>, MAX_UNITS>,
) -> Result<(), InitError> {
    for d in &dmar.units {
        let regs = MmioWindow::map_pages(d.base, u64::from(d.pages).max(1)).map_err(InitError::Map)?;
        let mut unit = vtd::probe_unit(regs, dmar.host_address_width).map_err(InitError::Unit)?;
        // The register window must reach the fault records and IOTLB registers.
        let need = (unit.cap().fault_recording_offset() + 16 * u64::from(unit.cap().fault_records()))
            .max(unit.ecap().iotlb_offset() + 16);
        if need > u64::from(d.pages) * conduit_mem::PAGE_SIZE {
            let regs = MmioWindow::map(d.base, need).map_err(InitError::Map)?;
            unit = vtd::probe_unit(regs, dmar.host_address_width).map_err(InitError::Unit)?;
        }
        let reader = unit.fault_reader();
        let enabled = unit.enable(fault, remap && unit.ecap().interrupt_remapping());
        // Fault events may be unmasked even when a later step failed: drain its faults too.
        let _ = readers.push(reader);
        enabled.map_err(InitError::Unit)?;
        let _ = units.push(unit);
    }
    Ok(())
}

/// Why the IOMMU cannot be used, when it cannot.
pub fn absent_reason() -> Option<&'static str> {
    ABSENT.get().copied()
}

/// A DMA domain on one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub struct Domain {
    /// Unit index.
    pub unit: u8,
    /// Domain ID on that unit.
    pub id: DomainId,
}

/// Why a device could not be given DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum AssignError {
    /// No IOMMU: nothing would confine the device's DMA.
    NoIommu(&'static str),
    /// No unit translates the device.
    NoUnit(PciAddress),
    /// The device is in an RMRR's scope (firmware DMAs on its behalf): not assignable.
    Rmrr(PciAddress),
    /// The domain lives on another unit than the device.
    WrongUnit,
    /// The device's unit does not remap interrupts (no DMAR INTR_REMAP flag, no ECAP.IR, or
    /// GSTS.IRES clear): the device's writes to 0xFEEx_xxxx would reach the CPUs as
    /// compatibility-format interrupts, any vector on any CPU.
    NoInterruptRemapping,
    /// The DMAR had more units, RMRRs or device scopes than Conduit records (this many were
    /// dropped): a dropped RMRR or scope could concern any device, so none is assigned.
    DmarIncomplete(u32),
    /// The device's DMA reaches the IOMMU under another requester ID too (it sits behind a
    /// PCIe-to-PCI/PCI-X or conventional PCI bridge, or is not in the inventory): the IOMMU
    /// cannot tell it from its neighbours.
    Aliased(conduit_pci::enumerate::Aliasing),
    /// The unit refused.
    Iommu(IommuError),
}

impl From<IommuError> for AssignError {
    fn from(e: IommuError) -> Self {
        Self::Iommu(e)
    }
}

fn ready() -> Result<&'static Dmar, AssignError> {
    DMAR.get().ok_or(AssignError::NoIommu(absent_reason().unwrap_or("the IOMMU is not initialized")))
}

/// The unit that translates `dev`.
pub fn unit_for(dev: PciAddress) -> Result<u8, AssignError> {
    let dmar = ready()?;
    let u = dmar.unit_for(crate::pci::config(), dev).ok_or(AssignError::NoUnit(dev))?;
    Ok(u as u8)
}

fn with_unit<R>(unit: u8, f: impl FnOnce(&mut Unit) -> Result<R, IommuError>) -> Result<R, AssignError> {
    ready()?;
    let mut units = UNITS.lock();
    let u = units.get_mut(usize::from(unit)).ok_or(AssignError::WrongUnit)?;
    Ok(f(u)?)
}

/// A new empty domain on the unit that translates `dev`.
pub fn create_domain_for(dev: PciAddress) -> Result<Domain, AssignError> {
    let unit = unit_for(dev)?;
    let id = with_unit(unit, |u| u.create_domain())?;
    Ok(Domain { unit, id })
}

/// Frees a domain no device uses.
pub fn destroy_domain(d: Domain) -> Result<(), AssignError> {
    with_unit(d.unit, |u| u.destroy_domain(d.id))
}

/// Maps `[iova, iova + len)` → `[paddr, paddr + len)` in `d`.
pub fn map(d: Domain, iova: u64, paddr: u64, len: u64, access: DmaAccess) -> Result<(), AssignError> {
    with_unit(d.unit, |u| u.map(d.id, iova, paddr, len, access))
}

/// Unmaps `[iova, iova + len)` in `d` (IOTLB invalidated on return).
pub fn unmap(d: Domain, iova: u64, len: u64) -> Result<(), AssignError> {
    with_unit(d.unit, |u| u.unmap(d.id, iova, len))
}

/// Gives `dev`'s DMA to domain `d` and records `owner` for fault attribution. Refused without
/// an IOMMU, when the DMAR did not fit, without interrupt remapping on the device's unit, for
/// devices in an RMRR's scope, for devices whose DMA can carry another requester ID (behind a
/// PCIe-to-PCI or conventional PCI bridge; see `Inventory::own_requester_id` for what is not
/// checked: ACS peer-to-peer isolation), across units, and while `dev` still holds interrupt
/// remapping entries.
pub fn assign(d: Domain, dev: PciAddress, owner: Owner) -> Result<(), AssignError> {
    let dmar = ready()?;
    let dropped = DMAR_DROPPED.load(Ordering::Relaxed);
    if dropped > 0 {
        return Err(AssignError::DmarIncomplete(dropped));
    }
    if dmar.rmrrs_for(crate::pci::config(), dev).next().is_some() {
        return Err(AssignError::Rmrr(dev));
    }
    crate::pci::with_inventory(|inv| inv.own_requester_id(dev)).map_err(AssignError::Aliased)?;
    if unit_for(dev)? != d.unit {
        return Err(AssignError::WrongUnit);
    }
    let mut units = UNITS.lock();
    let u = units.get_mut(usize::from(d.unit)).ok_or(AssignError::WrongUnit)?;
    if !u.remaps_interrupts() {
        return Err(AssignError::NoInterruptRemapping);
    }
    u.attach(d.id, dev)?;
    // Recorded under the same lock as the attachment: concurrent assign/unassign calls can
    // neither take the same owner slot nor leave an attached device without its owner.
    if let Err(e) = set_owner(&mut units, dev, owner) {
        // No owner to blame its faults on: undo exactly the attach this call made.
        if let Some(u) = units.get_mut(usize::from(d.unit)) {
            let _ = u.detach(dev);
        }
        return Err(e);
    }
    Ok(())
}

/// Takes `dev` out of its domain: its DMA is blocked again and its interrupt remapping
/// entries are freed.
pub fn unassign(dev: PciAddress) -> Result<(), AssignError> {
    let unit = unit_for(dev)?;
    let mut units = UNITS.lock();
    units.get_mut(usize::from(unit)).ok_or(AssignError::WrongUnit)?.detach(dev)?;
    set_owner(&mut units, dev, Owner::Unassigned)
}

/// A remapping entry for `dev`'s interrupts to `target`, and the MSI message to program.
pub fn alloc_interrupt(dev: PciAddress, target: InterruptTarget) -> Result<(InterruptHandle, MsiMessage), AssignError> {
    let unit = unit_for(dev)?;
    with_unit(unit, |u| {
        let h = u.alloc_interrupt(dev, target)?;
        Ok((h, u.msi_message(h)))
    })
}

/// Points `dev`'s remapping entry `h` at another CPU/vector (the device is not touched).
/// Refused when `h` is not one of `dev`'s entries.
pub fn retarget_interrupt(dev: PciAddress, h: InterruptHandle, target: InterruptTarget) -> Result<(), AssignError> {
    let unit = unit_for(dev)?;
    with_unit(unit, |u| u.retarget_interrupt(dev, h, target))
}

/// Global status of unit 0 (translation, interrupt remapping, compatibility format).
pub fn global_status() -> Option<conduit_iommu::vtd::regs::Gsts> {
    UNITS.lock().first().map(|u| u.status())
}

/// Frees `dev`'s remapping entry `h`. Refused when `h` is not one of `dev`'s entries.
pub fn free_interrupt(dev: PciAddress, h: InterruptHandle) -> Result<(), AssignError> {
    let unit = unit_for(dev)?;
    with_unit(unit, |u| u.free_interrupt(dev, h))
}

/// Runs `f` with the fault log.
pub fn with_fault_log<R>(f: impl FnOnce(&FaultLog) -> R) -> R {
    f(&LOG.lock())
}

/// Waits (bounded) until the log holds a fault matching `pred`; returns it. Drains the units
/// itself too, so faults a bounded drain left pending (no new event for them) are found.
pub fn wait_for_fault(timeout_us: u64, pred: impl Fn(&LoggedFault) -> bool) -> Option<LoggedFault> {
    let deadline = crate::arch::time::deadline_after_us(timeout_us);
    loop {
        let mut log = LOG.lock();
        drain_into(&mut log);
        if let Some(f) = log.iter().find(|f| pred(f)).copied() {
            return Some(f);
        }
        drop(log);
        if crate::arch::time::passed(deadline) {
            return None;
        }
        core::hint::spin_loop();
    }
}

/// Forgets logged faults (counters stay).
pub fn clear_fault_log() {
    LOG.lock().entries.clear();
}
