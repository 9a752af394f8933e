//! The hypervisor's own page tables: an identity map of RAM (read-write, never executable),
//! the image with exact permissions (text R+X, rodata R, data/bss R+W — W^X everywhere),
//! firmware tables read-only, device registers uncached, page 0 and every stack guard page
//! unmapped. Built with `conduit_paging` over table frames taken from the frame allocator
//! below 4 GiB, so they are reachable under the early map and the final one alike.

use crate::sync::IrqMutex;
use conduit_mem::{FOUR_GIB, LOW_MEMORY_END, MemoryKind, MemoryMap, PAGE_SIZE, PhysRange};
use conduit_paging::{Attrs, MapError, Options, PageSize, PageTable, TableMemory, Write};
use x86_64::PhysAddr;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::PhysFrame;

/// Table frames from the frame allocator, reached through the identity map. Private: only the
/// kernel's own tree (built and guarded here) uses it. Freed tables are kept in `retired`
/// until every CPU's TLB and paging-structure caches can no longer hold them.
#[derive(Debug)]
struct KernelTables {
    retired: heapless::Vec<u64, 64>,
    /// Retired tables that did not fit `retired` and were leaked instead of reused early.
    leaked: u64,
}

impl TableMemory for KernelTables {
    fn alloc_table(&mut self) -> Option<u64> {
        let frame = crate::mem::alloc_frame_below(FOUR_GIB)?;
        // SAFETY:
        // 1. `frame` is a fresh 4 KiB frame from the allocator (nobody else holds it), below
        //    4 GiB, identity-mapped read-write by the early map and by these tables (all
        //    usable RAM is mapped read-write).
        unsafe { core::ptr::write_bytes(frame as *mut u8, 0, PAGE_SIZE as usize) };
        Some(frame)
    }

    fn free_table(&mut self, table: u64) {
        // Not reusable yet: a CPU may still cache entries of this table.
        if self.retired.push(table).is_err() {
            self.leaked += 1;
        }
    }

    fn read_entry(&self, table: u64, index: usize) -> u64 {
        debug_assert!(index < conduit_paging::ENTRIES);
        // SAFETY:
        // 1. `table` is a table frame this type allocated (below 4 GiB, identity-mapped) and
        //    `index` < 512, so the u64 is inside that frame and 8-byte aligned.
        // 2. Volatile: the CPU's page walker sets accessed/dirty bits concurrently.
        unsafe { core::ptr::read_volatile((table as *const u64).add(index % conduit_paging::ENTRIES)) }
    }

    fn write_entry(&mut self, table: u64, index: usize, value: u64) {
        // SAFETY: as in `read_entry`; `&mut self` is only reachable through the KERNEL lock,
        // so there is no other writer.
        unsafe { core::ptr::write_volatile((table as *mut u64).add(index % conduit_paging::ENTRIES), value) };
    }
}

static KERNEL: IrqMutex<Option<PageTable<KernelTables>>> = IrqMutex::new(None);

unsafe extern "C" {
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __data_end: u8;
}

fn section(start: *const u8, end: *const u8) -> PhysRange {
    PhysRange::new(start as u64, end as u64)
}

/// The image's three permission regions: (text, rodata, data+bss).
pub fn image_sections() -> (PhysRange, PhysRange, PhysRange) {
    (
        section(&raw const __text_start, &raw const __text_end),
        section(&raw const __rodata_start, &raw const __rodata_end),
        section(&raw const __data_start, &raw const __data_end),
    )
}

/// What the kernel's tables must map besides RAM.
#[derive(Debug)]
pub struct Layout<'a> {
    /// Firmware tables (mapped read-only wherever they are).
    pub firmware: &'a [PhysRange],
    /// Device register ranges (uncached).
    pub mmio: &'a [PhysRange],
    /// Pages left unmapped (stack guards).
    pub guards: &'a [u64],
}

/// BIOS read-only area (RSDP search).
const BIOS_AREA: PhysRange = PhysRange::new(0xe0000, 0x10_0000);
/// Conventional memory below the EBDA/VGA hole, without page 0.
const LOW_RAM: PhysRange = PhysRange::new(PAGE_SIZE, 0xa0000);

/// Builds the kernel's tables and switches this CPU to them.
pub fn init(map: &MemoryMap, layout: &Layout<'_>, features: &super::cpu::Features) -> Result<u64, MapError> {
    let options = Options::x86(features.nx, if features.pdpe1gb { PageSize::Size1G } else { PageSize::Size2M });
    let mut pt = PageTable::new(KernelTables { retired: heapless::Vec::new(), leaked: 0 }, options)?;
    let identity = |pt: &mut PageTable<KernelTables>, r: PhysRange, attrs: Attrs| -> Result<(), MapError> {
        if r.is_empty() { Ok(()) } else { pt.map(r.start, r.start, r.len(), attrs, PageSize::Size1G) }
    };
    identity(&mut pt, LOW_RAM, Attrs::DATA)?;
    identity(&mut pt, BIOS_AREA, Attrs::RODATA)?;
    // RAM shrunk to whole pages (never a neighbour's partial page), below the CPU's physical
    // address limit.
    let reachable = PhysRange::new(LOW_MEMORY_END, features.max_phys_addr);
    for region in map.regions() {
        if matches!(region.kind, MemoryKind::Usable | MemoryKind::AcpiReclaimable | MemoryKind::AcpiNvs) {
            identity(&mut pt, region.range.intersect(&reachable).align_inward(PAGE_SIZE), Attrs::DATA)?;
        }
    }
    for fw in layout.firmware {
        identity(&mut pt, fw.align_outward(PAGE_SIZE), Attrs::RODATA)?;
    }
    for m in layout.mmio {
        identity(&mut pt, m.align_outward(PAGE_SIZE), Attrs::MMIO)?;
    }
    // The image last: nothing above may widen its permissions.
    let (text, rodata, data) = image_sections();
    identity(&mut pt, text, Attrs::TEXT)?;
    identity(&mut pt, rodata, Attrs::RODATA)?;
    identity(&mut pt, data, Attrs::DATA)?;
    for &g in layout.guards {
        pt.unmap(g, PAGE_SIZE)?;
    }
    let root = pt.root();
    // Nothing was ever active in the new tree: its retired frames are free to reuse.
    for t in core::mem::take(&mut pt_memory(&mut pt).retired) {
        let _ = crate::mem::free_frame(t);
    }
    conduit_boot::entry::retire_early_map();
    let frame = PhysFrame::containing_address(PhysAddr::new(root));
    // SAFETY:
    // 1. `root` is the PML4 just built: it maps the running code (text, R+X), the boot stack
    //    (data, R+W), all data, the per-CPU slots behind GS, and every table frame, as the
    //    early map did, so execution continues without a fault.
    // 2. EFER.NXE was set by the boot code whenever `no_execute` is used in the tables.
    // 3. The early map is retired first, so nothing reads through it any more.
    unsafe { Cr3::write(frame, Cr3Flags::empty()) };
    *KERNEL.lock() = Some(pt);
    Ok(root)
}

fn pt_memory(pt: &mut PageTable<KernelTables>) -> &mut KernelTables {
    pt.memory_mut()
}

/// Physical address of the kernel's PML4.
pub fn root() -> Option<u64> {
    KERNEL.lock().as_ref().map(|pt| pt.root())
}

/// Why device registers could not be mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum MmioMapError {
    /// The range aliases memory (see `mem::check_mmio`).
    Refused(crate::mem::MmioError),
    /// The tables could not be changed.
    Paging(MapError),
}

/// Maps device registers at `range` uncached (identity), after checking they alias no RAM,
/// image or firmware table. Mapping pages that were not present needs no TLB shootdown: no
/// CPU can hold a translation for them.
pub fn map_mmio(range: PhysRange) -> Result<(), MmioMapError> {
    crate::mem::check_mmio(range).map_err(MmioMapError::Refused)?;
    let r = range.align_outward(PAGE_SIZE);
    let mut guard = KERNEL.lock();
    let pt = guard.as_mut().ok_or(MmioMapError::Paging(MapError::OutOfTables))?;
    if (r.start..r.end).step_by(PAGE_SIZE as usize).all(|p| pt.translate(p).is_some_and(|t| t.attrs == Attrs::MMIO)) {
        return Ok(());
    }
    pt.map(r.start, r.start, r.len(), Attrs::MMIO, PageSize::Size2M).map_err(MmioMapError::Paging)
}

/// Unmaps guard pages while only this CPU runs (before any AP starts), then flushes this
/// CPU's TLB and returns retired table frames to the allocator: no other CPU can hold them.
pub fn unmap_guards_before_smp(guards: &[u64]) -> Result<(), MapError> {
    let mut guard = KERNEL.lock();
    let pt = guard.as_mut().ok_or(MapError::OutOfTables)?;
    for &g in guards {
        pt.unmap(g, PAGE_SIZE)?;
    }
    x86_64::instructions::tlb::flush_all();
    if crate::arch::smp::online() == 1 {
        for t in core::mem::take(&mut pt_memory(pt).retired) {
            let _ = crate::mem::free_frame(t);
        }
    }
    Ok(())
}

/// The translation of `addr` in the kernel's tables.
pub fn translate(addr: u64) -> Option<conduit_paging::Translation> {
    KERNEL.lock().as_ref()?.translate(addr)
}

/// Like `translate`, but gives up rather than wait for the lock (fatal paths).
fn try_translate(addr: u64) -> Option<conduit_paging::Translation> {
    KERNEL.try_lock_for(1000)?.as_ref()?.translate(addr)
}

/// True when `[addr, addr + len)` is mapped read-write write-back memory (hypervisor data or
/// RAM, never device registers): safe to read plain words from, even on a fatal-error path.
pub fn is_mapped_data(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else { return false };
    let mut page = addr & !(PAGE_SIZE - 1);
    while page < end {
        match try_translate(page) {
            Some(t) if t.attrs.write == Write::Allow && t.attrs.cache == conduit_paging::Cache::WriteBack => {}
            _ => return false,
        }
        page += PAGE_SIZE;
    }
    true
}

/// FNV-1a hash of `[start, start + len)` if every page is mapped write-back (RAM, image,
/// firmware tables): a cheap way to show memory was not changed behind the CPU's back.
pub fn fingerprint(start: u64, len: u64) -> Option<u64> {
    let end = start.checked_add(len)?;
    let mut page = start & !(PAGE_SIZE - 1);
    while page < end {
        match translate(page) {
            Some(t) if t.attrs.cache == conduit_paging::Cache::WriteBack => {}
            _ => return None,
        }
        page += PAGE_SIZE;
    }
    // SAFETY:
    // 1. Every page of `[start, end)` is mapped write-back (checked above): RAM, the image or
    //    firmware tables, where any bit pattern is a valid u8.
    // 2. Only shared reads are made; a concurrent DMA write would change the hash, which is
    //    exactly what callers look for.
    let bytes = unsafe { core::slice::from_raw_parts(start as *const u8, len as usize) };
    Some(bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)))
}

/// Two consecutive words at `addr` (a frame record: saved RBP, return address), if mapped.
pub fn read_u64_pair(addr: u64) -> Option<(u64, u64)> {
    if !addr.is_multiple_of(8) || !is_mapped_data(addr, 16) {
        return None;
    }
    // SAFETY:
    // 1. The 16 bytes at `addr` are 8-aligned and mapped read-write write-back (checked just
    //    above): plain memory (RAM or hypervisor data), where any bit pattern is a valid u64.
    unsafe { Some((core::ptr::read_volatile(addr as *const u64), core::ptr::read_volatile((addr + 8) as *const u64))) }
}
