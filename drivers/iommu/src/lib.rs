//! IOMMUs for Conduit. Callers (device assignment, the interrupt layer) use the [`Iommu`]
//! trait: DMA domains (one per guest, IOVA = guest-physical), device attachment, interrupt
//! remapping entries, and fault draining. [`vtd`] implements it for Intel VT-d; an AMD-Vi
//! backend implements the same trait.
//!
//! Everything here is pure: the VT-d driver runs over two narrow traits — register access
//! ([`vtd::regs::VtdRegs`]) and DMA-visible memory ([`DmaMemory`]) — so bring-up handshakes,
//! time-outs, the invalidation queue, table building and fault handling are tested on the host
//! against a scripted fake unit.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod vtd;

#[cfg(test)]
mod fake;

use conduit_pci::PciAddress;

/// A DMA domain: one address space (IOVA → physical) shared by the devices attached to it.
pub type DomainId = u16;

/// What a device may do through a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DmaAccess {
    /// Read (device reads memory).
    Read,
    /// Read and write.
    ReadWrite,
}

/// Where a remapped interrupt goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InterruptTarget {
    /// Destination local APIC ID.
    pub apic_id: u32,
    /// Vector on that CPU.
    pub vector: u8,
}

/// A remapping entry the device's MSI/MSI-X points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InterruptHandle(pub u16);

/// An MSI address/data pair to program into a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MsiMessage {
    /// Address.
    pub address: u64,
    /// Data.
    pub data: u32,
}

/// What faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FaultKind {
    /// A DMA request: its page address and direction.
    Dma {
        /// Page address.
        address: u64,
        /// A write (else a read).
        write: bool,
    },
    /// An interrupt request: its remapping index.
    Interrupt {
        /// Index.
        index: u16,
    },
}

/// A fault the IOMMU recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Fault {
    /// Requester ID of the device.
    pub source_id: u16,
    /// Hardware fault reason code.
    pub reason: u8,
    /// What faulted.
    pub kind: FaultKind,
}

/// IOMMU errors. None is a panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IommuError {
    /// A status bit did not follow its command within the poll bound.
    Timeout(&'static str),
    /// The hardware lacks something Conduit requires.
    Unsupported(&'static str),
    /// No memory for a table.
    OutOfMemory,
    /// No free domain ID, interrupt entry or attachment slot.
    Exhausted(&'static str),
    /// Unknown domain.
    NoSuchDomain(DomainId),
    /// The domain still has devices attached.
    DomainInUse(DomainId),
    /// The device is already attached (detach it first).
    AlreadyAttached(PciAddress),
    /// The device is not attached.
    NotAttached(PciAddress),
    /// The device still holds interrupt remapping entries: a device enters a domain (a new
    /// owner) with none, so it cannot raise interrupts set up for whoever had it before.
    InterruptsInUse(PciAddress),
    /// Unknown or free interrupt entry, or one that belongs to another device.
    NoSuchInterrupt(InterruptHandle),
    /// A mapping request the tables refuse (unaligned, beyond the address width).
    BadMapping(conduit_paging::MapError),
    /// The invalidation queue reported an error (FSTS.IQE/ICE/ITE).
    QueueError(u32),
}

impl From<conduit_paging::MapError> for IommuError {
    fn from(e: conduit_paging::MapError) -> Self {
        match e {
            conduit_paging::MapError::OutOfTables => Self::OutOfMemory,
            other => Self::BadMapping(other),
        }
    }
}

/// Memory the IOMMU reads (tables, queues): allocated, written and, for units that do not
/// snoop CPU caches, flushed by the caller's implementation. `&self` methods: implementations
/// use interior mutability (the kernel's frame allocator; a `RefCell` in tests).
pub trait DmaMemory: Clone {
    /// `pages` zeroed, contiguous, page-aligned 4 KiB pages below `limit`.
    fn alloc(&self, pages: u64, limit: u64) -> Option<u64>;
    /// Gives back pages from `alloc`.
    fn free(&self, paddr: u64, pages: u64);
    /// Reads a quadword.
    fn read64(&self, paddr: u64) -> u64;
    /// Writes a quadword.
    fn write64(&self, paddr: u64, value: u64);
    /// Makes `[paddr, paddr + len)` visible to a unit that does not snoop (clflush).
    fn flush(&self, paddr: u64, len: u64);
}

/// The operations callers need from any IOMMU (VT-d now, AMD-Vi later).
pub trait Iommu {
    /// A new empty domain (blocks everything until mapped).
    fn create_domain(&mut self) -> Result<DomainId, IommuError>;
    /// Frees a domain with no devices attached.
    fn destroy_domain(&mut self, domain: DomainId) -> Result<(), IommuError>;
    /// Maps `[iova, iova + len)` to `[paddr, paddr + len)`; invalidates as the hardware needs,
    /// also when the change fails partway (part of the range may then be mapped).
    fn map(&mut self, domain: DomainId, iova: u64, paddr: u64, len: u64, access: DmaAccess) -> Result<(), IommuError>;
    /// Unmaps `[iova, iova + len)` and invalidates the IOTLB before returning, also when the
    /// change fails partway (part of the range may then still be mapped).
    fn unmap(&mut self, domain: DomainId, iova: u64, len: u64) -> Result<(), IommuError>;
    /// Where `iova` goes in `domain`, with its access.
    fn translate(&self, domain: DomainId, iova: u64) -> Option<(u64, DmaAccess)>;
    /// Puts `dev` in `domain`: from now on its DMA goes through the domain's tables. Refused
    /// while `dev` holds interrupt entries (`InterruptsInUse`).
    fn attach(&mut self, domain: DomainId, dev: PciAddress) -> Result<(), IommuError>;
    /// Takes `dev` out of its domain: from now on its DMA is blocked, and every interrupt
    /// entry it held is freed (interrupts through them fault).
    fn detach(&mut self, dev: PciAddress) -> Result<(), IommuError>;
    /// The domain `dev` is attached to.
    fn domain_of(&self, dev: PciAddress) -> Option<DomainId>;
    /// A remapping entry for `dev`'s interrupts to `target`; only `dev` can use it.
    /// `Unsupported` when the entry format cannot name the target (an APIC ID above 255 in
    /// xAPIC format).
    fn alloc_interrupt(&mut self, dev: PciAddress, target: InterruptTarget) -> Result<InterruptHandle, IommuError>;
    /// Changes where `dev`'s entry delivers, without a moment in which it delivers nowhere.
    /// `NoSuchInterrupt` when `handle` is not an entry of `dev`.
    fn retarget_interrupt(
        &mut self,
        dev: PciAddress,
        handle: InterruptHandle,
        target: InterruptTarget,
    ) -> Result<(), IommuError>;
    /// Frees `dev`'s entry (later interrupts through it fault). `NoSuchInterrupt` when
    /// `handle` is not an entry of `dev`.
    fn free_interrupt(&mut self, dev: PciAddress, handle: InterruptHandle) -> Result<(), IommuError>;
    /// What to program into the device's MSI/MSI-X entry for `handle`.
    fn msi_message(&self, handle: InterruptHandle) -> MsiMessage;
}
