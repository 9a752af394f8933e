//! The kernel's frame allocator: built once from the normalized memory map minus everything
//! that lives in RAM and must never be handed out, then shared behind an `IrqMutex` (control
//! paths only).

use crate::sync::IrqMutex;
use conduit_mem::frames::{bitmap_words_for, plan_bitmap};
use conduit_mem::{FOUR_GIB, FrameAllocator, FrameError, MapError, MemoryMap, PAGE_SIZE, PhysRange};

static FRAMES: IrqMutex<Option<FrameAllocator<'static>>> = IrqMutex::new(None);
/// The normalized memory map and the firmware table ranges, kept for checking device-register
/// ranges at run time.
static LAYOUT: spin::Once<(MemoryMap, heapless::Vec<PhysRange, { conduit_acpi::MAX_TABLES + 2 }>)> = spin::Once::new();

/// Why a range may not be mapped as device registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum MmioError {
    /// It overlaps RAM (usable or ACPI), the image or a firmware table.
    AliasesMemory(u64),
    /// The memory layout is not known yet.
    TooEarly,
}

/// Records the layout `check_mmio` validates against (once, at boot).
pub fn set_layout(map: &MemoryMap, firmware: impl Iterator<Item = PhysRange>) {
    LAYOUT.call_once(|| (map.clone(), firmware.collect()));
}

/// Device registers may be mapped over `range` only if it aliases no RAM (usable or ACPI),
/// no part of the image and no firmware table.
pub fn check_mmio(range: PhysRange) -> Result<(), MmioError> {
    let (map, firmware) = LAYOUT.get().ok_or(MmioError::TooEarly)?;
    let r = range.align_outward(PAGE_SIZE);
    let ram = map.regions().iter().any(|reg| {
        reg.range.overlaps(&r)
            && matches!(
                reg.kind,
                conduit_mem::MemoryKind::Usable
                    | conduit_mem::MemoryKind::AcpiReclaimable
                    | conduit_mem::MemoryKind::AcpiNvs
            )
    });
    if ram || r.overlaps(&image_range()) || firmware.iter().any(|t| t.overlaps(&r)) {
        return Err(MmioError::AliasesMemory(range.start));
    }
    Ok(())
}

/// Why the allocator could not be built.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum MemError {
    /// The memory map could not be cut up.
    Map(MapError),
    /// No room for the allocator's bitmap below 4 GiB.
    NoBitmapHome,
    /// The allocator refused its ranges.
    Frames(FrameError),
    /// `init` ran twice.
    AlreadyInitialized,
}

/// What `init` set up.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub struct Summary {
    /// Frames managed.
    pub total_frames: u64,
    /// Where the bitmap lives.
    pub bitmap: PhysRange,
    /// Number of disjoint ranges managed.
    pub ranges: usize,
}

/// The image in memory, from the linker script.
pub fn image_range() -> PhysRange {
    unsafe extern "C" {
        static __image_start: u8;
        static __image_end: u8;
    }
    PhysRange::new((&raw const __image_start) as u64, (&raw const __image_end) as u64)
}

/// Builds the allocator over `map`'s usable RAM minus `exclusions` (and minus the first MiB).
pub fn init(map: &MemoryMap, exclusions: &[PhysRange]) -> Result<Summary, MemError> {
    let mut frames = FRAMES.lock();
    if frames.is_some() {
        return Err(MemError::AlreadyInitialized);
    }
    let usable = map.allocatable(exclusions).map_err(MemError::Map)?;
    let (bitmap, rest) = plan_bitmap(&usable, FOUR_GIB).ok_or(MemError::NoBitmapHome)?;
    let words = bitmap_words_for(&rest);
    debug_assert!(words as u64 * 8 <= bitmap.len());
    // SAFETY:
    // 1. `bitmap` is a page-aligned piece of usable RAM below 4 GiB that was just removed
    //    from the managed ranges, so no frame handed out later can alias it, and nothing else
    //    in the system refers to it: the slice is the only reference, for 'static.
    // 2. It is identity-mapped read-write both by the early map (below 4 GiB) and by the
    //    kernel's own tables (all usable RAM), so the pointer is valid for `words` u64s.
    // 3. u64 has no invalid bit patterns; `FrameAllocator::new` initializes every word.
    let storage: &'static mut [u64] = unsafe { core::slice::from_raw_parts_mut(bitmap.start as *mut u64, words) };
    let alloc = FrameAllocator::new(&rest, storage).map_err(MemError::Frames)?;
    let summary = Summary { total_frames: alloc.total_frames(), bitmap, ranges: rest.len() };
    *frames = Some(alloc);
    Ok(summary)
}

/// One frame anywhere.
pub fn alloc_frame() -> Option<u64> {
    FRAMES.lock().as_mut()?.alloc()
}

/// One frame whose address is below `limit`.
pub fn alloc_frame_below(limit: u64) -> Option<u64> {
    FRAMES.lock().as_mut()?.alloc_contiguous(1, PAGE_SIZE, limit).ok()
}

/// `count` contiguous frames aligned to `align` bytes, ending below `limit`.
pub fn alloc_contiguous(count: u64, align: u64, limit: u64) -> Result<u64, FrameError> {
    FRAMES.lock().as_mut().ok_or(FrameError::OutOfMemory)?.alloc_contiguous(count, align, limit)
}

/// Returns `count` contiguous frames (all or nothing).
pub fn free_contiguous(addr: u64, count: u64) -> Result<(), FrameError> {
    FRAMES.lock().as_mut().ok_or(FrameError::NotManaged(addr))?.free_contiguous(addr, count)
}

/// Returns one frame.
pub fn free_frame(addr: u64) -> Result<(), FrameError> {
    FRAMES.lock().as_mut().ok_or(FrameError::NotManaged(addr))?.free(addr)
}

/// True when the allocator manages `addr` (could ever hand it out).
pub fn manages(addr: u64) -> bool {
    FRAMES.lock().as_ref().is_some_and(|a| a.manages(addr))
}

/// (free, total) frames.
pub fn stats() -> (u64, u64) {
    FRAMES.lock().as_ref().map_or((0, 0), |a| (a.free_frames(), a.total_frames()))
}
