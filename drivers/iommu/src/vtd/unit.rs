//! One VT-d unit: bring-up, domains and their second-level tables, device attachment through
//! root and context tables, the invalidation queue, interrupt remapping entries, and fault
//! draining. Every wait on the hardware polls a bounded number of times and fails with
//! `IommuError::Timeout`; GCMD is always written as the persistent status bits plus the one
//! command bit changing, never with a one-shot status bit copied back.

use super::entries::{self, Irte, TranslationType};
use super::fault::FaultRecord;
use super::qi::{self, Ring};
use super::regs::{self, Cap, Ecap, Gcmd, Gsts, VtdRegs};
use crate::{
    DmaAccess, DmaMemory, DomainId, Fault, FaultKind, InterruptHandle, InterruptTarget, Iommu, IommuError, MsiMessage,
};
use conduit_paging::{Attrs, Options, PageSize, PageTable, TableMemory};
use conduit_pci::PciAddress;
use heapless::Vec;

/// Polls of a status register or completion word before a wait counts as failed.
pub const POLL_LIMIT: u32 = 1_000_000;
/// Most domains a unit holds.
pub const MAX_DOMAINS: usize = 16;
/// Most attached devices.
pub const MAX_ATTACHED: usize = 64;
/// Interrupt remapping entries (one 4 KiB page).
pub const IRT_ENTRIES: u16 = 256;
/// Retired table frames a domain keeps in a list of its own; more are chained through the
/// frames themselves.
pub const RETIRED_INLINE: usize = 256;
/// Passes a fault drain makes over the recording registers at most: further passes only while
/// FSTS.PPF stays set (a fault recorded into a register the pass had already read raises no
/// new interrupt), and never unbounded, so a device flooding faults cannot hold the handler.
pub const DRAIN_PASSES: u32 = 4;

/// Second-level tables of one domain, in DMA memory.
#[derive(Debug)]
pub struct DomainTables<M: DmaMemory> {
    mem: M,
    coherent: bool,
    limit: u64,
    /// Tables unlinked by a change, freed after the IOTLB invalidation that follows it.
    retired: Vec<u64, RETIRED_INLINE>,
    /// Further retired tables: a list linked through each frame's first quadword (0 ends it).
    overflow: u64,
    /// Frames on the `overflow` list.
    overflow_len: u64,
}

impl<M: DmaMemory> DomainTables<M> {
    fn new(mem: M, coherent: bool, limit: u64) -> Self {
        Self { mem, coherent, limit, retired: Vec::new(), overflow: 0, overflow_len: 0 }
    }

    /// Gives every retired frame back. Only after the IOTLB invalidation that followed the
    /// change which retired them (or once nothing can walk the tree any more).
    fn reclaim(&mut self) {
        for t in core::mem::take(&mut self.retired) {
            self.mem.free(t, 1);
        }
        let mut t = core::mem::take(&mut self.overflow);
        for _ in 0..core::mem::take(&mut self.overflow_len) {
            if t == 0 {
                break;
            }
            let next = self.mem.read64(t);
            self.mem.free(t, 1);
            t = next;
        }
    }
}

impl<M: DmaMemory> TableMemory for DomainTables<M> {
    fn alloc_table(&mut self) -> Option<u64> {
        let t = self.mem.alloc(1, self.limit)?;
        if !self.coherent {
            self.mem.flush(t, 4096);
        }
        Some(t)
    }
    fn free_table(&mut self, table: u64) {
        if self.retired.push(table).is_err() {
            // No entry links to the frame any more (`TableMemory` contract), so its first
            // quadword can hold the list link. A walk through a stale cached pointer reads the
            // link as a not-present entry (R = W = 0: the link is page-aligned).
            self.mem.write64(table, self.overflow);
            self.overflow = table;
            self.overflow_len += 1;
        }
    }
    fn read_entry(&self, table: u64, index: usize) -> u64 {
        self.mem.read64(table + 8 * (index % conduit_paging::ENTRIES) as u64)
    }
    fn write_entry(&mut self, table: u64, index: usize, value: u64) {
        let at = table + 8 * (index % conduit_paging::ENTRIES) as u64;
        self.mem.write64(at, value);
        if !self.coherent {
            self.mem.flush(at, 8);
        }
    }
}

#[derive(Debug)]
struct Domain<M: DmaMemory> {
    id: DomainId,
    tables: PageTable<DomainTables<M>>,
}

/// Counters of the unit's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UnitCounters {
    /// Descriptors submitted.
    pub descriptors: u64,
    /// Invalidation waits completed.
    pub waits: u64,
    /// Descriptors the unit refused (FSTS.IQE) and that were replaced so the queue goes on.
    pub refused_descriptors: u64,
}

/// One VT-d unit.
#[derive(Debug)]
pub struct VtdUnit<R: VtdRegs + Clone, M: DmaMemory> {
    regs: R,
    mem: M,
    cap: Cap,
    ecap: Ecap,
    version: u32,
    levels: u8,
    largest: PageSize,
    limit: u64,
    root: u64,
    context_tables: [u64; 256],
    queue: u64,
    ring: Ring,
    status: u64,
    wait_seq: u32,
    irt: u64,
    /// The device each interrupt remapping entry belongs to (`None`: free).
    irt_owner: [Option<PciAddress>; IRT_ENTRIES as usize],
    irt_x2apic: bool,
    domains: Vec<Domain<M>, MAX_DOMAINS>,
    attached: Vec<(PciAddress, DomainId), MAX_ATTACHED>,
    counters: UnitCounters,
}

/// Where fault events go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FaultEvent {
    /// Destination APIC ID (xAPIC format, physical).
    pub apic_id: u8,
    /// Vector.
    pub vector: u8,
}

impl FaultEvent {
    /// Fault events for `vector` on the CPU with local APIC ID `apic_id`. FEADDR holds an
    /// xAPIC destination (8 bits): a larger ID is refused, never truncated to another CPU.
    pub fn new(apic_id: u32, vector: u8) -> Result<Self, IommuError> {
        let apic_id = u8::try_from(apic_id).map_err(|_| IommuError::Unsupported("fault-event APIC ID above 255"))?;
        Ok(Self { apic_id, vector })
    }
}

impl<R: VtdRegs + Clone, M: DmaMemory> VtdUnit<R, M> {
    /// Reads the unit's capabilities and checks it can do what Conduit needs: queued
    /// invalidation and a 3- or 4-level second-level table. No register changes yet.
    /// `host_address_width` comes from the DMAR.
    pub fn probe(regs: R, mem: M, host_address_width: u8) -> Result<Self, IommuError> {
        let cap = Cap(regs.read64(regs::CAP));
        let ecap = Ecap(regs.read64(regs::ECAP));
        let version = regs.read32(regs::VER);
        if !ecap.queued_invalidation() {
            return Err(IommuError::Unsupported("queued invalidation"));
        }
        let levels = if cap.sagaw() & 0b100 != 0 {
            4
        } else if cap.sagaw() & 0b010 != 0 {
            3
        } else {
            return Err(IommuError::Unsupported("a 3- or 4-level second-level table (SAGAW)"));
        };
        // The tables use every size up to `largest`: 1 GiB leaves only when 2 MiB ones are
        // supported too (SLLPS bit 0: 21-bit, bit 1: 30-bit offsets).
        let largest = match cap.sllps() & 0b11 {
            0b11 => PageSize::Size1G,
            s if s & 0b01 != 0 => PageSize::Size2M,
            _ => PageSize::Size4K,
        };
        let limit = 1u64 << host_address_width.clamp(32, 52);
        Ok(Self {
            regs,
            mem,
            cap,
            ecap,
            version,
            levels,
            largest,
            limit,
            root: 0,
            context_tables: [0; 256],
            queue: 0,
            ring: Ring::new(1),
            status: 0,
            wait_seq: 0,
            irt: 0,
            irt_owner: [None; IRT_ENTRIES as usize],
            irt_x2apic: false,
            domains: Vec::new(),
            attached: Vec::new(),
            counters: UnitCounters::default(),
        })
    }

    /// Capability register.
    pub fn cap(&self) -> Cap {
        self.cap
    }
    /// Extended capability register.
    pub fn ecap(&self) -> Ecap {
        self.ecap
    }
    /// Version register (major 7:4, minor 3:0).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Second-level table levels in use.
    pub fn levels(&self) -> u8 {
        self.levels
    }
    /// Counters.
    pub fn counters(&self) -> UnitCounters {
        self.counters
    }
    /// Global status now.
    pub fn status(&self) -> Gsts {
        Gsts::from_bits_retain(self.regs.read32(regs::GSTS))
    }

    /// Interrupt remapping is on: a remapping table is installed and GSTS.IRES is set. Without
    /// it a device's writes to 0xFEEx_xxxx reach the CPUs as compatibility-format interrupts
    /// (any vector, any CPU), so no device may be given to a guest.
    pub fn remaps_interrupts(&self) -> bool {
        self.irt != 0 && self.status().contains(Gsts::IRES)
    }

    fn alloc(&self, pages: u64) -> Result<u64, IommuError> {
        let p = self.mem.alloc(pages, self.limit).ok_or(IommuError::OutOfMemory)?;
        self.flush(p, pages * 4096);
        Ok(p)
    }

    fn flush(&self, paddr: u64, len: u64) {
        if !self.ecap.coherent() {
            self.mem.flush(paddr, len);
        }
    }

    /// Sets or clears one persistent command bit, or issues a one-shot command, and waits for
    /// its status bit (set for one-shots and enables, clear for disables).
    fn command(&mut self, bit: Gcmd, on: bool, what: &'static str) -> Result<(), IommuError> {
        let persistent = self.regs.read32(regs::GSTS) & regs::GSTS_PERSISTENT;
        let value = if on { persistent | bit.bits() } else { persistent & !bit.bits() };
        self.regs.write32(regs::GCMD, value);
        for _ in 0..POLL_LIMIT {
            if (self.regs.read32(regs::GSTS) & bit.bits() != 0) == on {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(IommuError::Timeout(what))
    }

    /// Brings the unit up: takes over the invalidation queue (firmware's queue stops, this
    /// driver's starts), installs an empty root table (every device blocked) and invalidates
    /// every cache, routes fault events to `fault`, installs the interrupt remapping table and
    /// enables interrupt remapping with compatibility-format interrupts blocked (when
    /// `remap_interrupts` and the unit supports it), and finally enables DMA translation.
    ///
    /// Translation firmware left on stays on throughout: the new root table replaces
    /// firmware's while TE is set (GCMD.SRTP allows it), followed by global context-cache and
    /// IOTLB invalidations, so there is never a moment in which DMA goes untranslated.
    /// Interrupt remapping firmware left on stays on the same way while its table is replaced
    /// (SIRTP, then a global IEC invalidation) — unless this unit will not remap interrupts:
    /// then it goes off, since its table is firmware's memory.
    pub fn enable(&mut self, fault: FaultEvent, remap_interrupts: bool) -> Result<(), IommuError> {
        if remap_interrupts && !self.ecap.interrupt_remapping() {
            return Err(IommuError::Unsupported("interrupt remapping"));
        }
        let st = self.status();
        if st.contains(Gsts::IRES) && !remap_interrupts {
            self.command(Gcmd::IRE, false, "disable interrupt remapping")?;
        }
        if st.contains(Gsts::QIES) {
            // Firmware's queue: IQA changes only while queued invalidation is off.
            self.command(Gcmd::QIE, false, "disable queued invalidation")?;
        }
        // A queue error left by firmware or an earlier kernel stops the unit from fetching
        // any descriptor: clear it before the queue starts.
        let stale = self.regs.read32(regs::FSTS) & QUEUE_ERRORS;
        if stale != 0 {
            self.regs.write32(regs::FSTS, stale);
        }
        // Invalidation queue: one page, 256 descriptors, 128-bit format; a completion word.
        // First, because switching the root table under live translation needs it.
        self.queue = self.alloc(1)?;
        self.status = self.alloc(1)?;
        self.ring = Ring::new(1);
        self.regs.write64(regs::IQT, 0);
        self.regs.write64(regs::IQA, self.queue);
        self.command(Gcmd::QIE, true, "enable queued invalidation")?;
        // Root table: all entries not present. Cached entries of firmware's tables go with the
        // global invalidations.
        self.root = self.alloc(1)?;
        self.flush_write_buffer()?;
        self.regs.write64(regs::RTADDR, self.root);
        self.command(Gcmd::SRTP, true, "set root table pointer")?;
        self.invalidate(&[qi::context_global(), qi::iotlb_global()])?;
        // Fault events: clear old records, then unmask. FECTL bits 29:0 are reserved and
        // preserved (RsvdP), IP (30) is read-only: only IM changes.
        self.regs.write32(regs::FEDATA, u32::from(fault.vector));
        self.regs.write32(regs::FEADDR, 0xfee0_0000 | u32::from(fault.apic_id) << 12);
        self.regs.write32(regs::FEUADDR, 0);
        self.fault_reader().drain(&mut |_| {});
        let fectl = self.regs.read32(regs::FECTL);
        self.regs.write32(regs::FECTL, fectl & !(regs::FECTL_IM | regs::FECTL_IP));
        if remap_interrupts {
            self.irt_x2apic = false;
            self.irt = self.alloc(u64::from(IRT_ENTRIES) * 16 / 4096)?;
            // S: 2^(S+1) entries. xAPIC destination format (no EIME).
            let s = u64::from(IRT_ENTRIES.trailing_zeros()) - 1;
            self.flush_write_buffer()?;
            self.regs.write64(regs::IRTA, self.irt | s);
            self.command(Gcmd::SIRTP, true, "set interrupt remapping table pointer")?;
            self.invalidate(&[qi::iec_global()])?;
            if self.status().contains(Gsts::CFIS) {
                self.command(Gcmd::CFI, false, "block compatibility-format interrupts")?;
            }
            self.command(Gcmd::IRE, true, "enable interrupt remapping")?;
        }
        self.command(Gcmd::TE, true, "enable translation")
    }

    /// Units with CAP.RWBF buffer writes to memory-resident structures: flush the write
    /// buffer (GCMD.WBF, then wait, bounded, for GSTS.WBFS to clear) so the unit sees every
    /// table change made so far. Nothing to do on other units.
    fn flush_write_buffer(&mut self) -> Result<(), IommuError> {
        if !self.cap.rwbf() {
            return Ok(());
        }
        let persistent = self.regs.read32(regs::GSTS) & regs::GSTS_PERSISTENT;
        self.regs.write32(regs::GCMD, persistent | Gcmd::WBF.bits());
        for _ in 0..POLL_LIMIT {
            if self.regs.read32(regs::GSTS) & Gsts::WBFS.bits() == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(IommuError::Timeout("write buffer flush"))
    }

    /// `desc` as this unit may take it: an IOTLB invalidation asks for read and write
    /// draining only where CAP.DRD / CAP.DWD offer them.
    fn adapted(&self, (lo, hi): (u64, u64)) -> (u64, u64) {
        if lo & 0xf != qi::TYPE_IOTLB {
            return (lo, hi);
        }
        let mut lo = lo;
        if !self.cap.read_drain() {
            lo &= !qi::IOTLB_DRAIN_READS;
        }
        if !self.cap.write_drain() {
            lo &= !qi::IOTLB_DRAIN_WRITES;
        }
        (lo, hi)
    }

    /// Submits `descriptors` followed by a wait descriptor and waits (bounded) for the unit to
    /// write the completion word. Table changes made before the call are made visible first
    /// (write-buffer flush where CAP.RWBF asks for it); IOTLB descriptors drain reads and
    /// writes only where the unit offers it. Checks FSTS for queue errors: a descriptor the unit refuses
    /// (IQE; IQH points at it and the unit fetches it again once IQE is cleared) is replaced
    /// by a harmless one before IQE is cleared, so the queue never wedges; the call still
    /// fails with `QueueError`, after the wait completed.
    pub fn invalidate(&mut self, descriptors: &[(u64, u64)]) -> Result<(), IommuError> {
        self.flush_write_buffer()?;
        self.wait_seq = self.wait_seq.wrapping_add(1).max(1);
        let seq = self.wait_seq;
        self.mem.write64(self.status, 0);
        self.flush(self.status, 8);
        let need = descriptors.len() as u64 + 1;
        let mut polls = 0;
        while self.ring.free(Ring::head_index(self.regs.read64(regs::IQH))) < need {
            polls += 1;
            if polls > POLL_LIMIT {
                return Err(IommuError::Timeout("invalidation queue space"));
            }
            core::hint::spin_loop();
        }
        let mut wait_at = 0;
        for &d in descriptors.iter().chain(core::iter::once(&qi::wait(self.status, seq))) {
            let (lo, hi) = self.adapted(d);
            wait_at = self.queue + self.ring.push();
            self.mem.write64(wait_at, lo);
            self.mem.write64(wait_at + 8, hi);
            self.flush(wait_at, 16);
            self.counters.descriptors += 1;
        }
        self.regs.write64(regs::IQT, self.ring.tail_register());
        let mut errors = 0;
        let mut replaced = 0;
        for _ in 0..POLL_LIMIT {
            if self.mem.read64(self.status) as u32 == seq {
                self.counters.waits += 1;
                return if errors == 0 { Ok(()) } else { Err(IommuError::QueueError(errors)) };
            }
            let found = self.regs.read32(regs::FSTS) & QUEUE_ERRORS;
            if found != 0 {
                errors |= found;
                let refused = found & regs::Fsts::IQE.bits() != 0;
                // Each replacement moves the unit past one of this call's descriptors.
                let go_on = refused && replaced < need && self.replace_refused(wait_at);
                replaced += 1;
                self.regs.write32(regs::FSTS, found);
                if !go_on {
                    return Err(IommuError::QueueError(errors));
                }
            }
            core::hint::spin_loop();
        }
        Err(if errors != 0 { IommuError::QueueError(errors) } else { IommuError::Timeout("invalidation wait") })
    }

    /// Overwrites the descriptor IQH points at (the one the unit refused) with a wait
    /// descriptor shaped like this call's own, which the unit accepts (Linux
    /// `qi_check_fault` copies its wait descriptor the same way), but writing 0 to the
    /// completion word: a value never waited for, so only the real wait ends the call. True
    /// when that wait can still complete: false when the refused one was the wait itself (it
    /// is then replaced by a global context-cache invalidation, always valid).
    fn replace_refused(&mut self, wait_at: u64) -> bool {
        let head = Ring::head_index(self.regs.read64(regs::IQH)) % self.ring.entries;
        let at = self.queue + head * qi::DESCRIPTOR_BYTES;
        let is_wait = at == wait_at;
        let (lo, hi) = if is_wait { qi::context_global() } else { qi::wait(self.status, 0) };
        self.mem.write64(at, lo);
        self.mem.write64(at + 8, hi);
        self.flush(at, 16);
        self.counters.refused_descriptors += 1;
        !is_wait
    }

    /// A reader for the fault recording registers that needs no access to the rest of the
    /// unit (the fault interrupt handler uses it without the unit's lock).
    pub fn fault_reader(&self) -> FaultReader<R> {
        FaultReader {
            regs: self.regs.clone(),
            offset: self.cap.fault_recording_offset(),
            records: self.cap.fault_records(),
        }
    }

    fn domain_mut(&mut self, id: DomainId) -> Result<&mut Domain<M>, IommuError> {
        self.domains.iter_mut().find(|d| d.id == id).ok_or(IommuError::NoSuchDomain(id))
    }

    fn flush_domain(&mut self, id: DomainId) -> Result<(), IommuError> {
        self.invalidate(&[qi::iotlb_domain(id)])?;
        // Nothing can hold the unlinked tables any more.
        self.domain_mut(id)?.tables.memory_mut().reclaim();
        Ok(())
    }

    fn context_slot(&self, dev: PciAddress) -> Option<u64> {
        let table = self.context_tables[usize::from(dev.bus)];
        // `devfn` keeps device and function to their widths: the slot stays inside the table.
        (table != 0).then(|| table + 16 * u64::from(dev.devfn()))
    }

    /// Where `dev`'s entry `handle` lives; `NoSuchInterrupt` when it is free or another
    /// device's.
    fn irt_entry(&self, dev: PciAddress, handle: InterruptHandle) -> Result<u64, IommuError> {
        let i = usize::from(handle.0);
        let owned = self.irt != 0 && self.irt_owner.get(i).copied().flatten() == Some(dev);
        if owned { Ok(self.irt + 16 * u64::from(handle.0)) } else { Err(IommuError::NoSuchInterrupt(handle)) }
    }

    fn irte(&self, dev: PciAddress, target: InterruptTarget) -> Result<Irte, IommuError> {
        if !self.irt_x2apic && target.apic_id > 0xff {
            // xAPIC destinations are 8 bits (IRTE 47:40): never deliver to `id & 0xff`.
            return Err(IommuError::Unsupported("xAPIC destination above 255"));
        }
        Ok(Irte {
            vector: target.vector,
            destination: target.apic_id,
            source_id: dev.requester_id(),
            x2apic: self.irt_x2apic,
        })
    }

    /// Clears an entry: the present bit (low half) first.
    fn clear_irte(&mut self, at: u64) {
        self.mem.write64(at, 0);
        self.mem.write64(at + 8, 0);
        self.flush(at, 16);
    }
}

/// FSTS bits of the invalidation queue (RW1C).
const QUEUE_ERRORS: u32 = regs::Fsts::IQE.bits() | regs::Fsts::ICE.bits() | regs::Fsts::ITE.bits();

impl<R: VtdRegs + Clone, M: DmaMemory> VtdUnit<R, M> {
    /// Creates the context table of `bus` (empty: every device on it still blocked) if it has
    /// none. Done at bring-up for every bus with devices, so assigning a device later takes no
    /// frame that outlives the assignment.
    pub fn prepare_bus(&mut self, bus: u8) -> Result<(), IommuError> {
        let b = usize::from(bus);
        if self.context_tables[b] != 0 {
            return Ok(());
        }
        let ct = self.alloc(1)?;
        self.context_tables[b] = ct;
        let (lo, hi) = entries::root_entry(ct);
        let at = self.root + 16 * b as u64;
        self.mem.write64(at + 8, hi);
        self.mem.write64(at, lo);
        self.flush(at, 16);
        Ok(())
    }
}

impl<R: VtdRegs + Clone, M: DmaMemory> Iommu for VtdUnit<R, M> {
    fn create_domain(&mut self) -> Result<DomainId, IommuError> {
        if self.domains.is_full() {
            return Err(IommuError::Exhausted("domain IDs"));
        }
        // The lowest ID no live domain holds (destroy invalidated its IOTLB entries, so it
        // can be reused). ID 0 is reserved when caching mode is set; never used at all here.
        let limit = self.cap.domains();
        let id = (1..=DomainId::MAX)
            .take_while(|&id| u32::from(id) < limit)
            .find(|&id| self.domains.iter().all(|d| d.id != id))
            .ok_or(IommuError::Exhausted("domain IDs"))?;
        let mem = DomainTables::new(self.mem.clone(), self.ecap.coherent(), self.limit);
        // With snoop control, every leaf forces snooping (SNP): a device's No Snoop requests
        // cannot bypass the CPU caches. Without it the bit is reserved; the virtual config
        // space keeps Enable No Snoop off in the device instead.
        let options = Options::vtd(self.levels, self.largest).with_snoop(self.ecap.snoop_control());
        let tables = PageTable::new(mem, options)?;
        let _ = self.domains.push(Domain { id, tables });
        Ok(id)
    }

    fn destroy_domain(&mut self, domain: DomainId) -> Result<(), IommuError> {
        if self.attached.iter().any(|&(_, d)| d == domain) {
            return Err(IommuError::DomainInUse(domain));
        }
        let i = self.domains.iter().position(|d| d.id == domain).ok_or(IommuError::NoSuchDomain(domain))?;
        let d = self.domains.swap_remove(i);
        let mut mem = d.tables.destroy();
        // No device uses the domain now, but a context-cache entry of one may survive: a
        // detach whose invalidation failed, or firmware's. The frames are reused only after
        // the context cache (globally) and the domain's IOTLB entries are gone; if that
        // fails, they are never reused (leaked, safely).
        self.invalidate(&[qi::context_global(), qi::iotlb_domain(domain)])?;
        mem.reclaim();
        Ok(())
    }

    fn map(&mut self, domain: DomainId, iova: u64, paddr: u64, len: u64, access: DmaAccess) -> Result<(), IommuError> {
        // Second-level entries reserve the address bits from the host address width up: the
        // unit would fault every access (reason 0Ch) rather than translate.
        if paddr.checked_add(len).is_none_or(|end| end > self.limit) {
            return Err(IommuError::BadMapping(conduit_paging::MapError::OutOfRange(paddr)));
        }
        let attrs = match access {
            DmaAccess::Read => Attrs::DMA_READ,
            DmaAccess::ReadWrite => Attrs::DMA_READ_WRITE,
        };
        let largest = self.largest;
        let changed = self.domain_mut(domain)?.tables.map(iova, paddr, len, attrs, largest);
        // Replacing or splitting a mapping, or caching mode (not-present entries cached): the
        // IOTLB must forget the old translations — also when the change failed partway, since
        // what it already replaced is gone.
        let flushed = self.flush_domain(domain);
        changed?;
        flushed
    }

    fn unmap(&mut self, domain: DomainId, iova: u64, len: u64) -> Result<(), IommuError> {
        let changed = self.domain_mut(domain)?.tables.unmap(iova, len);
        // Entries removed before a failure (a split without a free frame) must leave the IOTLB
        // before the caller hears about the error.
        let flushed = self.flush_domain(domain);
        changed?;
        flushed
    }

    fn translate(&self, domain: DomainId, iova: u64) -> Option<(u64, DmaAccess)> {
        let d = self.domains.iter().find(|d| d.id == domain)?;
        let t = d.tables.translate(iova)?;
        let access = if t.attrs.write == conduit_paging::Write::Allow { DmaAccess::ReadWrite } else { DmaAccess::Read };
        Some((t.phys, access))
    }

    fn attach(&mut self, domain: DomainId, dev: PciAddress) -> Result<(), IommuError> {
        if self.attached.iter().any(|&(a, _)| a == dev) {
            return Err(IommuError::AlreadyAttached(dev));
        }
        if self.attached.is_full() {
            return Err(IommuError::Exhausted("attachment slots"));
        }
        if self.irt_owner.contains(&Some(dev)) {
            return Err(IommuError::InterruptsInUse(dev));
        }
        let table = self.domains.iter().find(|d| d.id == domain).ok_or(IommuError::NoSuchDomain(domain))?.tables.root();
        self.prepare_bus(dev.bus)?;
        let at = self.context_slot(dev).ok_or(IommuError::OutOfMemory)?;
        let (lo, hi) = entries::context_entry(table, domain, self.levels, TranslationType::SecondLevel);
        // Upper half first; the present bit (low half) last.
        self.mem.write64(at + 8, hi);
        self.mem.write64(at, lo);
        self.flush(at, 16);
        let _ = self.attached.push((dev, domain));
        // Caching mode may have cached the not-present entry; invalidate either way.
        self.invalidate(&[qi::context_global(), qi::iotlb_domain(domain)])
    }

    fn detach(&mut self, dev: PciAddress) -> Result<(), IommuError> {
        let i = self.attached.iter().position(|&(a, _)| a == dev).ok_or(IommuError::NotAttached(dev))?;
        let (_, domain) = self.attached.swap_remove(i);
        if let Some(at) = self.context_slot(dev) {
            // Present bit (low half) first.
            self.mem.write64(at, 0);
            self.mem.write64(at + 8, 0);
            self.flush(at, 16);
        }
        // The device leaves its owner: so do its interrupt entries, or it could still raise
        // the old owner's vectors under its next one.
        let mut freed_interrupts = false;
        for index in 0..IRT_ENTRIES {
            if self.irt_owner[usize::from(index)] == Some(dev) {
                self.clear_irte(self.irt + 16 * u64::from(index));
                self.irt_owner[usize::from(index)] = None;
                freed_interrupts = true;
            }
        }
        let context = qi::context_device(domain, dev.requester_id());
        if freed_interrupts {
            self.invalidate(&[context, qi::iotlb_domain(domain), qi::iec_global()])
        } else {
            self.invalidate(&[context, qi::iotlb_domain(domain)])
        }
    }

    fn domain_of(&self, dev: PciAddress) -> Option<DomainId> {
        self.attached.iter().find(|&&(a, _)| a == dev).map(|&(_, d)| d)
    }

    fn alloc_interrupt(&mut self, dev: PciAddress, target: InterruptTarget) -> Result<InterruptHandle, IommuError> {
        if self.irt == 0 {
            return Err(IommuError::Unsupported("interrupt remapping is not enabled"));
        }
        let irte = self.irte(dev, target)?;
        let index = (0..IRT_ENTRIES)
            .find(|&i| self.irt_owner[usize::from(i)].is_none())
            .ok_or(IommuError::Exhausted("interrupt remapping entries"))?;
        self.irt_owner[usize::from(index)] = Some(dev);
        let at = self.irt + 16 * u64::from(index);
        // A free entry is all zero (not present): upper half first, present bit last.
        let (lo, hi) = irte.encode();
        self.mem.write64(at + 8, hi);
        self.mem.write64(at, lo);
        self.flush(at, 16);
        if let Err(e) = self.invalidate(&[qi::iec_index(index)]) {
            // Free exactly what this call took, visibly to a unit that does not snoop.
            self.clear_irte(at);
            self.irt_owner[usize::from(index)] = None;
            return Err(e);
        }
        Ok(InterruptHandle(index))
    }

    fn retarget_interrupt(
        &mut self,
        dev: PciAddress,
        handle: InterruptHandle,
        target: InterruptTarget,
    ) -> Result<(), IommuError> {
        let at = self.irt_entry(dev, handle)?;
        let (lo, _) = self.irte(dev, target)?.encode();
        // The upper half (source ID and its validation) stays as it is: one 64-bit store of
        // the low half changes vector and destination at once, so the entry is present
        // throughout and an interrupt arriving meanwhile goes to the old or the new target.
        self.mem.write64(at, lo);
        self.flush(at, 16);
        self.invalidate(&[qi::iec_index(handle.0)])
    }

    fn free_interrupt(&mut self, dev: PciAddress, handle: InterruptHandle) -> Result<(), IommuError> {
        let at = self.irt_entry(dev, handle)?;
        self.clear_irte(at);
        self.irt_owner[usize::from(handle.0)] = None;
        self.invalidate(&[qi::iec_index(handle.0)])
    }

    fn msi_message(&self, handle: InterruptHandle) -> MsiMessage {
        let (address, data) = entries::remappable_msi(handle.0);
        MsiMessage { address, data }
    }
}

/// Reads and clears fault records; shares nothing with the rest of the unit but registers.
#[derive(Clone, Debug)]
pub struct FaultReader<R: VtdRegs> {
    regs: R,
    offset: u64,
    records: u32,
}

/// What one drain found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Drained {
    /// Records read and cleared.
    pub records: u32,
    /// The unit had overflowed (faults were lost before this drain).
    pub overflowed: bool,
    /// FSTS.PPF still read 1 after the last pass: faults are left in the registers and no
    /// interrupt will announce them (drain again later).
    pub pending: bool,
}

impl<R: VtdRegs> FaultReader<R> {
    /// Reads every pending record, clears each F bit (write 1), then clears the overflow bit
    /// PFO if it was set. Never PPF (read-only), never FRI, never the queue errors IQE/ICE/ITE:
    /// those belong to `VtdUnit::invalidate`. After a pass over the registers, another pass
    /// follows while FSTS.PPF still reads 1 (a fault recorded meanwhile into a register the
    /// pass had already read: it raises no new interrupt), at most `DRAIN_PASSES` in all;
    /// `Drained::pending` reports faults left after the last one.
    pub fn drain(&self, sink: &mut dyn FnMut(Fault)) -> Drained {
        let mut out = Drained::default();
        for _ in 0..DRAIN_PASSES {
            let fsts = self.regs.read32(regs::FSTS);
            out.overflowed |= fsts & regs::Fsts::PFO.bits() != 0;
            self.pass(fsts, &mut out, sink);
            let clear = fsts & regs::Fsts::PFO.bits();
            if clear != 0 {
                self.regs.write32(regs::FSTS, clear);
            }
            out.pending = self.regs.read32(regs::FSTS) & regs::Fsts::PPF.bits() != 0;
            if !out.pending {
                break;
            }
        }
        out
    }

    /// One pass over the recording registers, from the index FSTS.FRI names.
    fn pass(&self, fsts: u32, out: &mut Drained, sink: &mut dyn FnMut(Fault)) {
        if self.records == 0 {
            return;
        }
        let first = (fsts >> regs::FSTS_FRI_SHIFT) & 0xff;
        for k in 0..self.records {
            let i = (first + k) % self.records;
            let at = self.offset + 16 * u64::from(i);
            let hi = self.regs.read64(at + 8);
            let Some(r) = FaultRecord::decode(self.regs.read64(at), hi) else { continue };
            // F is bit 31 of the upper dword; the rest of that dword is read-only.
            self.regs.write32(at + 12, 1 << 31);
            out.records += 1;
            let kind = if r.is_interrupt() {
                FaultKind::Interrupt { index: (r.info >> 48) as u16 }
            } else {
                FaultKind::Dma { address: r.info, write: !r.read }
            };
            sink(Fault { source_id: r.source_id, reason: r.reason, kind });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeDma, FakeUnit, qemu_unit};

    const FAULT: FaultEvent = FaultEvent { apic_id: 0, vector: 0x32 };

    fn unit() -> (FakeUnit, VtdUnit<FakeUnit, FakeDma>) {
        let dma = FakeDma::default();
        let regs = qemu_unit(dma.clone(), 1);
        let u = VtdUnit::probe(regs.clone(), dma, 39).unwrap();
        (regs, u)
    }

    fn enabled() -> (FakeUnit, VtdUnit<FakeUnit, FakeDma>) {
        let (regs, mut u) = unit();
        u.enable(FAULT, true).unwrap();
        (regs, u)
    }

    #[test]
    fn probe_decodes_qemu() {
        let (_, u) = unit();
        assert_eq!(u.levels(), 3);
        assert_eq!(u.largest, PageSize::Size1G);
        assert!(!u.ecap().coherent());
    }

    #[test]
    fn enable_handshakes_in_order_and_never_writes_one_shot_status_back() {
        let (regs, u) = enabled();
        let s = regs.state.borrow();
        let cmds: std::vec::Vec<u32> = s.gcmd_writes.clone();
        // QIE, SRTP, SIRTP, IRE, TE — each write is the persistent enables plus one bit.
        assert_eq!(
            cmds,
            [
                Gcmd::QIE.bits(),
                Gcmd::QIE.bits() | Gcmd::SRTP.bits(),
                Gcmd::QIE.bits() | Gcmd::SIRTP.bits(),
                Gcmd::QIE.bits() | Gcmd::IRE.bits(),
                Gcmd::QIE.bits() | Gcmd::IRE.bits() | Gcmd::TE.bits(),
            ]
        );
        for c in &cmds {
            assert_eq!(c & Gcmd::CFI.bits(), 0, "compatibility-format interrupts never allowed");
        }
        let gsts = s.regs32[&regs::GSTS];
        assert!(Gsts::from_bits_retain(gsts).contains(Gsts::TES | Gsts::QIES | Gsts::IRES));
        assert_eq!(s.regs64[&regs::RTADDR], u.root);
        assert_eq!(s.regs64[&regs::IRTA], u.irt | 7, "256 entries: S = 7, xAPIC format");
        assert_eq!(s.regs32[&regs::FEDATA], 0x32);
        assert_eq!(s.regs32[&regs::FECTL], 0, "fault events unmasked");
        // Context cache, IOTLB, IEC invalidated during bring-up.
        assert!(s.descriptors.iter().any(|d| d & 0xf == 1));
        assert!(s.descriptors.iter().any(|d| d & 0xf == 2));
        assert!(s.descriptors.iter().any(|d| d & 0xf == 4));
    }

    #[test]
    fn translation_left_on_by_firmware_never_goes_off() {
        let (regs, mut u) = unit();
        // Firmware (pre-boot DMA protection) left translation, the queue and interrupt
        // remapping on, with its own root table.
        let fw = (Gsts::TES | Gsts::QIES | Gsts::IRES).bits();
        regs.state.borrow_mut().regs32.insert(regs::GSTS, fw);
        regs.state.borrow_mut().regs64.insert(regs::RTADDR, 0x7777_0000);
        u.enable(FAULT, true).unwrap();
        let s = regs.state.borrow();
        for c in &s.gcmd_writes {
            assert_ne!(c & Gcmd::TE.bits(), 0, "TE cleared by {c:#x}: DMA would go untranslated");
            assert_ne!(c & Gcmd::IRE.bits(), 0, "IRE cleared by {c:#x}: interrupts would go unremapped");
        }
        assert_eq!(s.gcmd_writes[0], (Gcmd::TE | Gcmd::IRE).bits(), "firmware's queue stops first");
        assert_eq!(s.gcmd_writes[1], (Gcmd::TE | Gcmd::IRE | Gcmd::QIE).bits(), "then this driver's starts");
        let srtp = s.gcmd_writes.iter().position(|c| c & Gcmd::SRTP.bits() != 0).unwrap();
        assert!(srtp > 1, "the root table is switched once the queue can invalidate");
        assert_eq!(s.regs64[&regs::RTADDR], u.root);
        // The switch is followed by global context-cache and IOTLB invalidations.
        let types: std::vec::Vec<u64> = s.descriptors.iter().map(|d| d & 0x3f).collect();
        assert_eq!(types[..3], [qi::context_global().0, qi::iotlb_global().0 & 0x3f, 0x25]);
        drop(s);
        // Every device is blocked by the new (empty) root table.
        assert_eq!(regs.translate(0x10, 0x1000, false), Err(0x01));
        // A unit that will not remap interrupts turns firmware's remapping off (its table is
        // firmware's memory), and still keeps translation on.
        let (regs, mut u) = unit();
        regs.state.borrow_mut().regs32.insert(regs::GSTS, (Gsts::TES | Gsts::IRES).bits());
        u.enable(FAULT, false).unwrap();
        let s = regs.state.borrow();
        assert_eq!(s.gcmd_writes[0], Gcmd::TE.bits(), "IRE off, TE kept");
        assert!(s.gcmd_writes.iter().all(|c| c & Gcmd::TE.bits() != 0));
        assert_eq!(s.regs32[&regs::GSTS] & Gsts::IRES.bits(), 0);
    }

    #[test]
    fn stuck_status_bits_time_out() {
        for (bit, what) in [
            (Gcmd::TE.bits(), "enable translation"),
            (Gsts::RTPS.bits(), "set root table pointer"),
            (Gcmd::IRE.bits(), "enable interrupt remapping"),
        ] {
            let (regs, mut u) = unit();
            regs.state.borrow_mut().stuck = bit;
            assert_eq!(u.enable(FAULT, true), Err(IommuError::Timeout(what)));
        }
    }

    #[test]
    fn queue_stall_error_and_wraparound() {
        let (regs, mut u) = enabled();
        // 300 invalidations of 2 descriptors each: the 256-entry ring wraps twice.
        for i in 0..300u16 {
            u.invalidate(&[qi::iec_index(i)]).unwrap();
        }
        assert!(u.ring.tail < 256);
        assert_eq!(u.counters().waits, 300 + 2, "plus the two of bring-up");
        let n = regs.state.borrow().descriptors.len();
        assert!(n > 600);
        regs.state.borrow_mut().queue_stalled = true;
        assert_eq!(u.invalidate(&[qi::iec_global()]), Err(IommuError::Timeout("invalidation wait")));
    }

    /// A descriptor type the unit refuses.
    const BAD: (u64, u64) = (0xf, 0);

    #[test]
    fn a_refused_descriptor_is_replaced_and_the_queue_goes_on() {
        let (regs, mut u) = enabled();
        let iqe = regs::Fsts::IQE.bits();
        assert_eq!(u.invalidate(&[qi::iec_global(), BAD, qi::iotlb_global()]), Err(IommuError::QueueError(iqe)));
        assert_eq!(regs.read32(regs::FSTS) & iqe, 0, "IQE cleared");
        // The descriptors around the refused one were still carried out; in its slot, a wait
        // descriptor.
        let done = regs.state.borrow().descriptors.clone();
        let types: std::vec::Vec<u64> = done[done.len() - 4..].iter().map(|d| d & 0xf).collect();
        assert_eq!(types, [4, 5, 2, 5], "IEC, replacement wait, IOTLB, wait");
        assert_eq!(u.counters().refused_descriptors, 1);
        // The queue is not wedged: the next invalidations go through.
        u.invalidate(&[qi::iec_global()]).unwrap();
        u.invalidate(&[qi::context_global()]).unwrap();
        // Several refused descriptors in one call: each replaced, the call still fails once.
        assert_eq!(u.invalidate(&[BAD, BAD, BAD]), Err(IommuError::QueueError(iqe)));
        u.invalidate(&[qi::iec_global()]).unwrap();
    }

    #[test]
    fn a_stale_queue_error_is_cleared_before_the_queue_starts() {
        let (regs, mut u) = unit();
        // Left by firmware: the unit fetches nothing while IQE is set.
        regs.state.borrow_mut().regs32.insert(regs::FSTS, (regs::Fsts::IQE | regs::Fsts::ITE).bits());
        u.enable(FAULT, true).unwrap();
        assert_eq!(regs.read32(regs::FSTS) & QUEUE_ERRORS, 0);
    }

    #[test]
    fn fault_event_control_keeps_its_reserved_bits() {
        let (regs, mut u) = unit();
        // Reset value: IM set; reserved bits 29:0 hold something (RsvdP); IP set (read-only).
        let reserved = 0x0000_a005;
        regs.state.borrow_mut().regs32.insert(regs::FECTL, regs::FECTL_IM | regs::FECTL_IP | reserved);
        u.enable(FAULT, true).unwrap();
        assert_eq!(regs.read32(regs::FECTL), reserved, "unmasked, reserved bits preserved, IP not written");
    }

    #[test]
    fn fault_event_destination_is_never_truncated() {
        assert_eq!(FaultEvent::new(3, 0x32), Ok(FaultEvent { apic_id: 3, vector: 0x32 }));
        assert_eq!(FaultEvent::new(255, 0x32).map(|f| f.apic_id), Ok(255));
        assert_eq!(FaultEvent::new(256, 0x32), Err(IommuError::Unsupported("fault-event APIC ID above 255")));
    }

    #[test]
    fn domains_attach_and_detach() {
        use crate::fake::DmaState;
        let (regs, mut u) = enabled();
        let d = u.create_domain().unwrap();
        assert_eq!(d, 1);
        u.map(d, 0x10_0000, 0x7000_0000, 0x2000, DmaAccess::Read).unwrap();
        u.map(d, 0x20_0000, 0x8000_0000, 0x20_0000, DmaAccess::ReadWrite).unwrap();
        assert_eq!(u.translate(d, 0x10_1234), Some((0x7000_1234, DmaAccess::Read)));
        assert_eq!(u.translate(d, 0x3f_ffff), Some((0x801f_ffff, DmaAccess::ReadWrite)));
        assert_eq!(u.translate(d, 0x40_0000), None);
        let edu = PciAddress::new(0, 2, 0);
        assert_eq!(regs.translate(0x10, 0x10_1234, false), Err(0x01), "blocked before attach");
        u.attach(d, edu).unwrap();
        // The unit's own walk of what reached memory (flushed), not the driver's view.
        assert_eq!(regs.translate(0x10, 0x10_1234, false), Ok((0x7000_1234, false)));
        assert_eq!(regs.translate(0x10, 0x10_1234, true), Err(0x05), "read-only mapping");
        assert_eq!(regs.translate(0x10, 0x3f_ffff, true), Ok((0x801f_ffff, false)));
        assert_eq!(regs.translate(0x10, 0x40_0000, false), Err(0x06), "unmapped");
        assert_eq!(regs.translate(0x18, 0x10_1234, false), Err(0x02), "another device on the bus");
        let st: std::cell::Ref<DmaState> = u.mem.state.borrow();
        let root_lo = st.words[&u.root];
        assert_eq!(root_lo & 1, 1);
        let ct = root_lo & !0xfff;
        let (lo, hi) = (st.words[&(ct + 16 * 0x10)], st.words[&(ct + 16 * 0x10 + 8)]);
        drop(st);
        assert_eq!(lo & !0xfff, u.domains[0].tables.root());
        assert_eq!(lo & 0xf, 1, "present, second-level translation");
        assert_eq!(hi, 1 << 8 | 1, "domain 1, 39-bit");
        assert_eq!(u.domain_of(edu), Some(d));
        assert_eq!(u.attach(d, edu), Err(IommuError::AlreadyAttached(edu)));
        assert_eq!(u.destroy_domain(d), Err(IommuError::DomainInUse(d)));
        let before = regs.state.borrow().descriptors.len();
        u.detach(edu).unwrap();
        let s = regs.state.borrow();
        assert_eq!(s.descriptors[before], qi::context_device(d, 0x10).0, "device-selective context invalidation");
        drop(s);
        assert_eq!(u.mem.read64(ct + 16 * 0x10), 0, "context entry cleared: device blocked");
        assert_eq!(regs.translate(0x10, 0x10_1234, false), Err(0x02), "the unit sees the cleared entry");
        assert_eq!(u.detach(edu), Err(IommuError::NotAttached(edu)));
        u.destroy_domain(d).unwrap();
        assert_eq!(u.map(d, 0, 0, 0x1000, DmaAccess::Read), Err(IommuError::NoSuchDomain(d)));
    }

    #[test]
    fn the_fake_unit_sees_only_flushed_memory() {
        let dma = FakeDma::default();
        dma.write64(0x1000, 7);
        assert_eq!(dma.device_read64(0x1000), 0, "still in the CPU's cache");
        dma.flush(0x1008, 8);
        assert_eq!(dma.device_read64(0x1000), 7, "the flush wrote back the whole line");
        dma.write64(0x1040, 9);
        dma.flush(0x1000, 8);
        assert_eq!(dma.device_read64(0x1040), 0, "another line: not written back");
    }

    /// The writes to the 16-byte entry at `at`, in order, as (which half, value).
    fn entry_writes(ops: &[crate::fake::DmaOp], at: u64) -> std::vec::Vec<(&'static str, u64)> {
        ops.iter()
            .filter_map(|o| match *o {
                crate::fake::DmaOp::Write(a, v) if a == at => Some(("lo", v)),
                crate::fake::DmaOp::Write(a, v) if a == at + 8 => Some(("hi", v)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn entries_are_made_present_last_and_not_present_first() {
        // On a coherent unit every store is visible at once: the order is all there is.
        let dma = FakeDma::default();
        let regs = crate::fake::unit_with(dma.clone(), 1, |_, ecap| *ecap |= 1);
        let mut u = VtdUnit::probe(regs.clone(), dma, 39).unwrap();
        u.enable(FAULT, true).unwrap();
        let d = u.create_domain().unwrap();
        let edu = PciAddress::new(0, 2, 0);
        u.mem.state.borrow_mut().ops.clear();
        u.attach(d, edu).unwrap();
        let ops = u.mem.state.borrow().ops.clone();
        let root_at = u.root;
        let ct = u.context_tables[0];
        let w = entry_writes(&ops, root_at);
        assert_eq!(w.iter().map(|x| x.0).collect::<std::vec::Vec<_>>(), ["hi", "lo"], "root entry: present last");
        let w = entry_writes(&ops, ct + 16 * 0x10);
        assert_eq!(w.iter().map(|x| x.0).collect::<std::vec::Vec<_>>(), ["hi", "lo"], "context entry: present last");
        assert_eq!(w[1].1 & 1, 1);
        u.mem.state.borrow_mut().ops.clear();
        u.detach(edu).unwrap();
        let ops = u.mem.state.borrow().ops.clone();
        let w = entry_writes(&ops, ct + 16 * 0x10);
        assert_eq!(w, [("lo", 0), ("hi", 0)], "context entry: not present first");
        // Interrupt entries: a fresh one present last; a freed one not present first.
        u.mem.state.borrow_mut().ops.clear();
        let h = u.alloc_interrupt(edu, InterruptTarget { apic_id: 1, vector: 0x41 }).unwrap();
        let at = u.irt + 16 * u64::from(h.0);
        let ops = u.mem.state.borrow().ops.clone();
        let w = entry_writes(&ops, at);
        assert_eq!(w.iter().map(|x| x.0).collect::<std::vec::Vec<_>>(), ["hi", "lo"]);
        assert_eq!(regs.remap(0x10, h.0), Ok((1, 0x41)));
        assert_eq!(regs.remap(0x18, h.0), Err(0x26), "another requester is refused");
        u.mem.state.borrow_mut().ops.clear();
        u.free_interrupt(edu, h).unwrap();
        let ops = u.mem.state.borrow().ops.clone();
        assert_eq!(entry_writes(&ops, at), [("lo", 0), ("hi", 0)]);
        assert_eq!(regs.remap(0x10, h.0), Err(0x22));
    }

    #[test]
    fn odd_address_spellings_stay_inside_the_context_table() {
        let (regs, mut u) = enabled();
        let d = u.create_domain().unwrap();
        u.map(d, 0x1000, 0x7000_0000, 0x1000, DmaAccess::Read).unwrap();
        // Device 2 function 1 spelled with out-of-range fields (public fields allow it).
        let odd = PciAddress { segment: 0, bus: 0, device: 0x22, function: 9 };
        u.attach(d, odd).unwrap();
        assert_eq!(regs.translate(0x11, 0x1000, false), Ok((0x7000_0000, false)), "the slot of 00:02.1");
        assert_eq!(u.attach(d, PciAddress::new(0, 2, 1)), Err(IommuError::AlreadyAttached(odd)));
        assert!(
            u.mem.state.borrow().words.range(u.context_tables[0] + 4096..u.context_tables[0] + 8192).all(|w| *w.1 == 0)
        );
    }

    #[test]
    fn destroying_a_domain_forgets_cached_context_entries() {
        let (regs, mut u) = enabled();
        let d = u.create_domain().unwrap();
        u.map(d, 0x1000, 0x7000_0000, 0x1000, DmaAccess::Read).unwrap();
        let edu = PciAddress::new(0, 2, 0);
        u.attach(d, edu).unwrap();
        // The detach's invalidation times out: the context cache may still point at the
        // domain's tables.
        regs.state.borrow_mut().queue_stalled = true;
        assert_eq!(u.detach(edu), Err(IommuError::Timeout("invalidation wait")));
        regs.state.borrow_mut().queue_stalled = false;
        regs.state.borrow_mut().head = u.ring.tail;
        let before = regs.state.borrow().descriptors.len();
        let tables = u.domains[0].tables.root();
        u.destroy_domain(d).unwrap();
        let done = regs.state.borrow().descriptors[before..].to_vec();
        assert!(done.contains(&qi::context_global().0), "context cache invalidated globally: {done:x?}");
        assert!(done.contains(&qi::iotlb_domain(d).0));
        assert!(u.mem.state.borrow().freed.contains(&tables), "freed only after both");
        // When that invalidation fails, the frames are never reused.
        let d = u.create_domain().unwrap();
        let root = u.domains[0].tables.root();
        regs.state.borrow_mut().queue_stalled = true;
        assert!(u.destroy_domain(d).is_err());
        assert!(!u.mem.state.borrow().freed.contains(&root));
    }

    #[test]
    fn write_buffers_are_flushed_where_the_unit_requires_it() {
        let dma = FakeDma::default();
        let regs = crate::fake::unit_with(dma.clone(), 1, |cap, _| *cap |= 1 << 4);
        let mut u = VtdUnit::probe(regs.clone(), dma, 39).unwrap();
        u.enable(FAULT, true).unwrap();
        let at_start = regs.state.borrow().write_buffer_flushes;
        assert!(at_start >= 3, "before the root and remapping table pointers and each invalidation");
        let d = u.create_domain().unwrap();
        u.map(d, 0x1000, 0x7000_0000, 0x1000, DmaAccess::Read).unwrap();
        assert_eq!(regs.state.borrow().write_buffer_flushes, at_start + 1, "after the table change");
        // The flush command keeps the persistent enables and never repeats a one-shot.
        let wbf: std::vec::Vec<u32> =
            regs.state.borrow().gcmd_writes.iter().copied().filter(|c| c & Gcmd::WBF.bits() != 0).collect();
        assert_eq!(*wbf.last().unwrap(), (Gcmd::TE | Gcmd::QIE | Gcmd::IRE | Gcmd::WBF).bits());
        // A flush that never completes is a time-out, not a hang.
        regs.state.borrow_mut().stuck = Gsts::WBFS.bits();
        assert_eq!(
            u.map(d, 0x2000, 0x7000_0000, 0x1000, DmaAccess::Read),
            Err(IommuError::Timeout("write buffer flush"))
        );
        // QEMU's unit does not ask for it.
        let (regs, mut u) = enabled();
        let d = u.create_domain().unwrap();
        u.map(d, 0x1000, 0x7000_0000, 0x1000, DmaAccess::Read).unwrap();
        assert_eq!(regs.state.borrow().write_buffer_flushes, 0);
        assert!(regs.state.borrow().gcmd_writes.iter().all(|c| c & Gcmd::WBF.bits() == 0));
    }

    #[test]
    fn iotlb_draining_only_where_the_unit_offers_it() {
        let iotlb = |regs: &FakeUnit| -> std::vec::Vec<u64> {
            regs.state.borrow().descriptors.iter().copied().filter(|d| d & 0xf == qi::TYPE_IOTLB).collect()
        };
        let drain = qi::IOTLB_DRAIN_READS | qi::IOTLB_DRAIN_WRITES;
        let (regs, _) = enabled();
        assert!(iotlb(&regs).iter().all(|d| d & drain == drain), "QEMU offers both");
        let dma = FakeDma::default();
        let regs = crate::fake::unit_with(dma.clone(), 1, |cap, _| *cap &= !crate::fake::CAP_DRAIN);
        let mut u = VtdUnit::probe(regs.clone(), dma, 39).unwrap();
        u.enable(FAULT, true).unwrap();
        let d = u.create_domain().unwrap();
        u.map(d, 0x1000, 0x7000_0000, 0x1000, DmaAccess::Read).unwrap();
        assert!(!iotlb(&regs).is_empty());
        assert!(iotlb(&regs).iter().all(|d| d & drain == 0), "DR/DW never set without DRD/DWD");
        let dma = FakeDma::default();
        let regs = crate::fake::unit_with(dma.clone(), 1, |cap, _| *cap &= !(1 << 54));
        let mut u = VtdUnit::probe(regs.clone(), dma, 39).unwrap();
        u.enable(FAULT, true).unwrap();
        assert!(iotlb(&regs).iter().all(|d| d & drain == qi::IOTLB_DRAIN_READS));
    }

    #[test]
    fn snoop_control_makes_every_leaf_snooped() {
        let dma = FakeDma::default();
        let regs = crate::fake::unit_with(dma.clone(), 1, |_, ecap| *ecap |= 1 << 7);
        let mut u = VtdUnit::probe(regs.clone(), dma, 39).unwrap();
        u.enable(FAULT, true).unwrap();
        let d = u.create_domain().unwrap();
        u.map(d, 0x1000, 0x7000_0000, 0x1000, DmaAccess::Read).unwrap();
        u.map(d, 0x4000_0000, 0x8000_0000, 0x4000_0000, DmaAccess::ReadWrite).unwrap();
        u.attach(d, PciAddress::new(0, 2, 0)).unwrap();
        assert_eq!(regs.translate(0x10, 0x1000, false), Ok((0x7000_0000, true)));
        assert_eq!(regs.translate(0x10, 0x4123_4000, true), Ok((0x8123_4000, true)), "1 GiB leaf");
        // Without snoop control (QEMU), bit 11 is reserved and stays clear.
        let (regs, mut u) = enabled();
        let d = u.create_domain().unwrap();
        u.map(d, 0x1000, 0x7000_0000, 0x1000, DmaAccess::Read).unwrap();
        u.attach(d, PciAddress::new(0, 2, 0)).unwrap();
        assert_eq!(regs.translate(0x10, 0x1000, false), Ok((0x7000_0000, false)));
    }

    #[test]
    fn one_gib_leaves_only_with_two_mib_support() {
        for (sllps, largest) in
            [(0b11, PageSize::Size1G), (0b01, PageSize::Size2M), (0b10, PageSize::Size4K), (0, PageSize::Size4K)]
        {
            let dma = FakeDma::default();
            let regs = crate::fake::unit_with(dma.clone(), 1, |cap, _| *cap = (*cap & !(0xf << 34)) | sllps << 34);
            let mut u = VtdUnit::probe(regs.clone(), dma, 39).unwrap();
            assert_eq!(u.largest, largest, "SLLPS {sllps:#b}");
            u.enable(FAULT, true).unwrap();
            let d = u.create_domain().unwrap();
            u.map(d, 0x4000_0000, 0x4000_0000, 0x4000_0000, DmaAccess::Read).unwrap();
            let size = u.domains[0].tables.translate(0x4020_0000).unwrap().size;
            assert!(size <= largest, "SLLPS {sllps:#b}: a {size:?} leaf");
        }
    }

    #[test]
    fn faults_recorded_during_a_drain_are_not_left_behind() {
        let dma = FakeDma::default();
        let regs = qemu_unit(dma.clone(), 4);
        let mut u = VtdUnit::probe(regs.clone(), dma, 39).unwrap();
        u.enable(FAULT, true).unwrap();
        // FRI = 0: the pass reads records 0, 1, 2, 3. While record 1 is being cleared, the unit
        // records a new fault into record 0, which the pass has already read: PPF stays 1 and
        // no new interrupt comes.
        regs.inject_fault(1, 0x30_0000, 5u64 << 32 | 0x10);
        regs.state.borrow_mut().on_clear.push((1, 0, 0x40_0000, 6u64 << 32 | 1 << 62 | 0x18));
        let mut got = std::vec::Vec::new();
        let d = u.fault_reader().drain(&mut |f| got.push(f));
        assert_eq!(d, Drained { records: 2, overflowed: false, pending: false });
        assert_eq!(
            got[1],
            Fault { source_id: 0x18, reason: 6, kind: FaultKind::Dma { address: 0x40_0000, write: false } }
        );
        assert_eq!(regs.read32(regs::FSTS) & regs::Fsts::PPF.bits(), 0);
        // A source that records a new fault on every clear is drained a bounded number of times.
        regs.inject_fault(0, 0x30_0000, 5u64 << 32 | 0x10);
        for _ in 0..100 {
            regs.state.borrow_mut().on_clear.push((0, 0, 0x30_0000, 5u64 << 32 | 0x10));
        }
        let d = u.fault_reader().drain(&mut |_| {});
        assert_eq!(d.records, DRAIN_PASSES);
        assert!(d.pending, "left for a later drain");
    }

    #[test]
    fn unmap_invalidates_and_reclaims_tables() {
        let (regs, mut u) = enabled();
        let d = u.create_domain().unwrap();
        u.map(d, 0x20_0000, 0x8000_0000, 0x20_0000, DmaAccess::ReadWrite).unwrap();
        u.map(d, 0x20_0000, 0x9000_0000, 0x1000, DmaAccess::Read).unwrap();
        let before = regs.state.borrow().descriptors.len();
        u.unmap(d, 0x20_0000, 0x1000).unwrap();
        assert_eq!(regs.state.borrow().descriptors[before], qi::iotlb_domain(d).0);
        assert_eq!(u.translate(d, 0x20_0000), None);
        assert_eq!(
            u.map(d, 0x123, 0, 0x1000, DmaAccess::Read),
            Err(IommuError::BadMapping(conduit_paging::MapError::Unaligned(0x123)))
        );
        assert_eq!(
            u.map(d, 1 << 39, 0, 0x1000, DmaAccess::Read),
            Err(IommuError::BadMapping(conduit_paging::MapError::OutOfRange(1 << 39)))
        );
    }

    #[test]
    fn interrupt_entries_one_at_a_time() {
        let (regs, mut u) = enabled();
        let edu = PciAddress::new(0, 2, 0);
        let a = u.alloc_interrupt(edu, InterruptTarget { apic_id: 1, vector: 0x41 }).unwrap();
        let b = u.alloc_interrupt(edu, InterruptTarget { apic_id: 0, vector: 0x42 }).unwrap();
        assert_eq!((a.0, b.0), (0, 1));
        let at = u.irt + 16;
        assert_eq!(u.mem.read64(at), 1 | 0x42 << 16, "present, vector 0x42, APIC 0");
        assert_eq!(u.mem.read64(at + 8), 0x10 | 1 << 18, "SID 00:02.0, verified");
        assert_eq!(
            *regs.state.borrow().descriptors.last().unwrap(),
            qi::wait(0, 0).0 & 0xff | (u64::from(u.wait_seq) << 32)
        );
        assert_eq!(u.msi_message(b), MsiMessage { address: 0xfee0_0030, data: 0 });
        u.retarget_interrupt(edu, a, InterruptTarget { apic_id: 2, vector: 0x50 }).unwrap();
        assert_eq!(u.mem.read64(u.irt) >> 16 & 0xff, 0x50);
        assert_eq!(u.mem.read64(u.irt + 8) as u16, 0x10, "source ID kept");
        u.free_interrupt(edu, a).unwrap();
        assert_eq!(u.mem.read64(u.irt), 0);
        assert_eq!(u.free_interrupt(edu, a), Err(IommuError::NoSuchInterrupt(a)));
        assert_eq!(
            u.retarget_interrupt(edu, InterruptHandle(999), InterruptTarget { apic_id: 0, vector: 0x40 }),
            Err(IommuError::NoSuchInterrupt(InterruptHandle(999)))
        );
        // The freed slot is reused; the table fills up cleanly.
        assert_eq!(u.alloc_interrupt(edu, InterruptTarget { apic_id: 0, vector: 0x43 }).unwrap().0, 0);
        for _ in 2..IRT_ENTRIES {
            u.alloc_interrupt(edu, InterruptTarget { apic_id: 0, vector: 0x44 }).unwrap();
        }
        assert_eq!(
            u.alloc_interrupt(edu, InterruptTarget { apic_id: 0, vector: 0x45 }),
            Err(IommuError::Exhausted("interrupt remapping entries"))
        );
    }

    #[test]
    fn interrupt_entries_belong_to_their_device() {
        let (regs, mut u) = enabled();
        let (edu, other) = (PciAddress::new(0, 2, 0), PciAddress::new(0, 3, 0));
        let t = InterruptTarget { apic_id: 0, vector: 0x41 };
        let h = u.alloc_interrupt(edu, t).unwrap();
        let at = u.irt + 16 * u64::from(h.0);
        let entry = (u.mem.read64(at), u.mem.read64(at + 8));
        // Another device's handle: refused, the entry untouched.
        let moved = InterruptTarget { apic_id: 1, vector: 0x60 };
        assert_eq!(u.retarget_interrupt(other, h, moved), Err(IommuError::NoSuchInterrupt(h)));
        assert_eq!(u.free_interrupt(other, h), Err(IommuError::NoSuchInterrupt(h)));
        assert_eq!((u.mem.read64(at), u.mem.read64(at + 8)), entry);
        // A device holding entries cannot enter a domain (a new owner) with them.
        let d = u.create_domain().unwrap();
        assert_eq!(u.attach(d, edu), Err(IommuError::InterruptsInUse(edu)));
        u.free_interrupt(edu, h).unwrap();
        u.attach(d, edu).unwrap();
        // Detach frees what the device still holds, and invalidates the interrupt entry cache.
        let a = u.alloc_interrupt(edu, t).unwrap();
        let b = u.alloc_interrupt(edu, t).unwrap();
        let kept = u.alloc_interrupt(other, t).unwrap();
        let before = regs.state.borrow().descriptors.len();
        u.detach(edu).unwrap();
        assert!(regs.state.borrow().descriptors[before..].contains(&qi::iec_global().0));
        for x in [a, b] {
            assert_eq!(u.mem.read64(u.irt + 16 * u64::from(x.0)), 0, "not present");
            assert_eq!(u.free_interrupt(edu, x), Err(IommuError::NoSuchInterrupt(x)));
        }
        assert_eq!(u.mem.read64(u.irt + 16 * u64::from(kept.0)) & 1, 1, "the other device keeps its entry");
        u.attach(d, edu).unwrap();
    }

    #[test]
    fn retargeting_never_makes_the_entry_not_present() {
        let (_, mut u) = enabled();
        let edu = PciAddress::new(0, 2, 0);
        let h = u.alloc_interrupt(edu, InterruptTarget { apic_id: 1, vector: 0x41 }).unwrap();
        let at = u.irt + 16 * u64::from(h.0);
        let hi = u.mem.read64(at + 8);
        u.mem.state.borrow_mut().ops.clear();
        u.retarget_interrupt(edu, h, InterruptTarget { apic_id: 7, vector: 0x52 }).unwrap();
        let ops = u.mem.state.borrow().ops.clone();
        let irte_writes: std::vec::Vec<_> = ops
            .iter()
            .filter_map(|o| match *o {
                crate::fake::DmaOp::Write(a, v) if a == at || a == at + 8 => Some((a, v)),
                _ => None,
            })
            .collect();
        assert_eq!(irte_writes, [(at, 1 | 0x52 << 16 | 7 << 40)], "one store of the low half, present");
        assert_eq!(u.mem.read64(at + 8), hi);
        assert!(ops.contains(&crate::fake::DmaOp::Flush(at, 16)));
    }

    #[test]
    fn xapic_destinations_above_255_are_refused() {
        let (_, mut u) = enabled();
        let edu = PciAddress::new(0, 2, 0);
        let far = InterruptTarget { apic_id: 256, vector: 0x41 };
        assert_eq!(u.alloc_interrupt(edu, far), Err(IommuError::Unsupported("xAPIC destination above 255")));
        let h = u.alloc_interrupt(edu, InterruptTarget { apic_id: 255, vector: 0x41 }).unwrap();
        assert_eq!(h.0, 0, "the refused call took no entry");
        let at = u.irt + 16 * u64::from(h.0);
        let before = u.mem.read64(at);
        assert_eq!(before >> 40 & 0xff, 255);
        assert_eq!(u.retarget_interrupt(edu, h, far), Err(IommuError::Unsupported("xAPIC destination above 255")));
        assert_eq!(u.mem.read64(at), before, "entry unchanged");
    }

    #[test]
    fn a_failed_allocation_clears_its_entry_visibly() {
        let (regs, mut u) = enabled();
        let edu = PciAddress::new(0, 2, 0);
        regs.state.borrow_mut().queue_stalled = true;
        u.mem.state.borrow_mut().ops.clear();
        let r = u.alloc_interrupt(edu, InterruptTarget { apic_id: 0, vector: 0x41 });
        assert_eq!(r, Err(IommuError::Timeout("invalidation wait")));
        let at = u.irt;
        assert_eq!((u.mem.read64(at), u.mem.read64(at + 8)), (0, 0));
        let ops = u.mem.state.borrow().ops.clone();
        let last_write =
            ops.iter().rposition(|o| matches!(*o, crate::fake::DmaOp::Write(a, _) if a == at || a == at + 8));
        let last_flush = ops.iter().rposition(|o| *o == crate::fake::DmaOp::Flush(at, 16));
        assert!(last_flush > last_write, "the cleared entry was flushed after the last write to it");
        regs.state.borrow_mut().queue_stalled = false;
        regs.state.borrow_mut().head = u.ring.tail;
        assert_eq!(u.alloc_interrupt(edu, InterruptTarget { apic_id: 0, vector: 0x41 }), Ok(InterruptHandle(0)));
    }

    #[test]
    fn faults_are_drained_and_cleared() {
        let dma = FakeDma::default();
        let regs = qemu_unit(dma.clone(), 4);
        let mut u = VtdUnit::probe(regs.clone(), dma, 39).unwrap();
        u.enable(FAULT, true).unwrap();
        regs.inject_fault(1, 0x30_0000, 5u64 << 32 | 0x10);
        regs.inject_fault(2, 0x7_0000_0000_0000, 0x26u64 << 32 | 0x10);
        regs.state.borrow_mut().regs32.insert(regs::FSTS, 1 << 8 | regs::Fsts::PFO.bits());
        let mut got = std::vec::Vec::new();
        let d = u.fault_reader().drain(&mut |f| got.push(f));
        assert_eq!(d, Drained { records: 2, overflowed: true, pending: false });
        assert_eq!(
            got[0],
            Fault { source_id: 0x10, reason: 5, kind: FaultKind::Dma { address: 0x30_0000, write: true } }
        );
        assert_eq!(got[1], Fault { source_id: 0x10, reason: 0x26, kind: FaultKind::Interrupt { index: 7 } });
        assert_eq!(regs.read32(regs::FSTS) & 0xff, 0, "PFO cleared, PPF gone");
        assert_eq!(u.fault_reader().drain(&mut |_| panic!("no more faults")), Drained::default());
    }

    #[test]
    fn interrupt_remapping_state_is_reported() {
        let (_, u) = enabled();
        assert!(u.remaps_interrupts());
        let (_, mut u) = unit();
        u.enable(FAULT, false).unwrap();
        assert!(!u.remaps_interrupts(), "no remapping table: nothing may be assigned");
        let (regs, u) = enabled();
        u.regs.write32(regs::GCMD, (Gcmd::QIE | Gcmd::TE).bits());
        assert_eq!(regs.state.borrow().regs32[&regs::GSTS] & Gsts::IRES.bits(), 0);
        assert!(!u.remaps_interrupts(), "IRES cleared behind the driver's back");
    }

    #[test]
    fn failed_changes_still_invalidate_the_iotlb() {
        let (regs, mut u) = enabled();
        let d = u.create_domain().unwrap();
        u.map(d, 0x1000, 0x7000_0000, 0x1000, DmaAccess::ReadWrite).unwrap();
        u.map(d, 0x20_0000, 0x8000_0000, 0x20_0000, DmaAccess::ReadWrite).unwrap();
        u.map(d, 0x3fff_f000, 0x9000_0000, 0x1000, DmaAccess::ReadWrite).unwrap();
        u.mem.state.borrow_mut().fail_alloc = true;
        // Unmap: the 4 KiB page goes, then splitting the 2 MiB page needs a table.
        let before = regs.state.borrow().descriptors.len();
        assert_eq!(u.unmap(d, 0x1000, 0x20_0000), Err(IommuError::OutOfMemory));
        assert_eq!(u.translate(d, 0x1000), None);
        assert!(regs.state.borrow().descriptors[before..].contains(&qi::iotlb_domain(d).0), "IOTLB invalidated");
        // Map: the first page is replaced, the next one needs a new directory.
        let before = regs.state.borrow().descriptors.len();
        assert_eq!(u.map(d, 0x3fff_f000, 0xa000_0000, 0x2000, DmaAccess::Read), Err(IommuError::OutOfMemory));
        assert_eq!(u.translate(d, 0x3fff_f000), Some((0xa000_0000, DmaAccess::Read)));
        assert!(regs.state.borrow().descriptors[before..].contains(&qi::iotlb_domain(d).0), "IOTLB invalidated");
    }

    #[test]
    fn mappings_beyond_the_host_address_width_are_refused() {
        let (_, mut u) = enabled();
        let d = u.create_domain().unwrap();
        let out = |p| Err(IommuError::BadMapping(conduit_paging::MapError::OutOfRange(p)));
        assert_eq!(u.map(d, 0, 1 << 39, 0x1000, DmaAccess::Read), out(1 << 39));
        assert_eq!(u.map(d, 0, (1 << 39) - 0x1000, 0x2000, DmaAccess::Read), out((1 << 39) - 0x1000));
        assert_eq!(u.map(d, 0, !0xfff, 0x2000, DmaAccess::Read), out(!0xfff));
        u.map(d, 0, (1 << 39) - 0x1000, 0x1000, DmaAccess::Read).unwrap();
    }

    #[test]
    fn domain_ids_are_reused() {
        let (_, mut u) = enabled();
        // QEMU: 256 IDs, 255 usable. Far more create/destroy cycles than that.
        for _ in 0..600 {
            let d = u.create_domain().unwrap();
            assert_eq!(d, 1);
            u.destroy_domain(d).unwrap();
        }
        let ids: std::vec::Vec<DomainId> = (0..4).map(|_| u.create_domain().unwrap()).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        u.destroy_domain(2).unwrap();
        assert_eq!(u.create_domain(), Ok(2), "the lowest free ID");
        // ND = 6 (65536 IDs): nothing counts past u16.
        let dma = FakeDma::default();
        let regs = crate::fake::unit_with_nd(dma.clone(), 1, 6);
        let mut u = VtdUnit::probe(regs, dma, 39).unwrap();
        u.enable(FAULT, true).unwrap();
        for _ in 0..MAX_DOMAINS {
            u.create_domain().unwrap();
        }
        assert_eq!(u.create_domain(), Err(IommuError::Exhausted("domain IDs")), "live domains are bounded");
        // ND = 0 (16 IDs): IDs 1-15 only.
        let dma = FakeDma::default();
        let regs = crate::fake::unit_with_nd(dma.clone(), 1, 0);
        let mut u = VtdUnit::probe(regs, dma, 39).unwrap();
        u.enable(FAULT, true).unwrap();
        for id in 1..16 {
            assert_eq!(u.create_domain(), Ok(id));
        }
        assert_eq!(u.create_domain(), Err(IommuError::Exhausted("domain IDs")));
    }

    #[test]
    fn every_table_frame_comes_back() {
        let (_, mut u) = enabled();
        let at_start = u.mem.state.borrow().allocated.clone();
        let d = u.create_domain().unwrap();
        // 300 sparse pages, one page table each, under one directory.
        for i in 0..300u64 {
            u.map(d, i << 21, 0x1000_0000 + (i << 12), 0x1000, DmaAccess::Read).unwrap();
        }
        u.destroy_domain(d).unwrap();
        assert_eq!(u.mem.state.borrow().allocated, at_start, "destroy returns every frame");
        // One change that unlinks more tables than the inline list holds.
        let d = u.create_domain().unwrap();
        let with_root = u.mem.state.borrow().allocated.len();
        for i in 0..300u64 {
            u.map(d, i << 21, 0x1000_0000 + (i << 12), 0x1000, DmaAccess::Read).unwrap();
        }
        u.map(d, 0, 0x4000_0000, 0x4000_0000, DmaAccess::Read).unwrap();
        assert_eq!(u.mem.state.borrow().allocated.len(), with_root, "the directory and its 300 tables are back");
        assert_eq!(u.translate(d, 0x123_4567), Some((0x4123_4567, DmaAccess::Read)));
        u.destroy_domain(d).unwrap();
        assert_eq!(u.mem.state.borrow().allocated, at_start);
    }

    #[test]
    fn out_of_memory_is_an_error() {
        let (_, mut u) = unit();
        u.mem.state.borrow_mut().fail_alloc = true;
        assert_eq!(u.enable(FAULT, true), Err(IommuError::OutOfMemory));
    }
}
