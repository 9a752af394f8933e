//! VT-d on this machine: DMA-visible memory for a unit's tables and queues (frames from the
//! allocator, identity-mapped, flushed from the CPU caches with `clflush` when the unit does
//! not snoop them), and DMA buffers for scenarios. A unit's registers are an
//! `mmio::MmioWindow`.
//!
//! `KernelDma` is the only safe door to raw physical memory here, so it checks every access:
//! only this module makes one (inside the unit `probe_unit` returns, which never hands it
//! out), and it reads, writes, flushes and frees only frames it allocated itself and has not
//! freed, as recorded in `TABLE_FRAMES`. DMA buffers come from the allocator without being
//! recorded: table accesses can never reach them.

use super::mmio::MmioWindow;
use crate::sync::IrqMutex;
use conduit_iommu::vtd::VtdUnit;
use conduit_iommu::{DmaMemory, IommuError};
use conduit_mem::PAGE_SIZE;

/// Frames per leaf page of the frame set (one bit each): 128 MiB of physical memory.
const LEAF_FRAMES: u64 = PAGE_SIZE * 8;
/// Leaf pages the frame set can have.
const LEAVES: usize = 4096;
/// Table frames are allocated below this address (512 GiB), the range the set covers.
const TRACKED_LIMIT: u64 = LEAVES as u64 * LEAF_FRAMES * PAGE_SIZE;

/// A set of 4 KiB frames: one bit per frame, in leaf pages allocated on first use and kept.
#[derive(Debug)]
struct FrameSet {
    /// Physical address of each leaf page (0: none yet).
    leaves: [u64; LEAVES],
}

impl FrameSet {
    const fn new() -> Self {
        Self { leaves: [0; LEAVES] }
    }

    /// Leaf index, word address inside that leaf's page (relative), bit.
    fn locate(frame: u64) -> Option<(usize, u64, u64)> {
        let n = frame / PAGE_SIZE;
        let leaf = usize::try_from(n / LEAF_FRAMES).ok().filter(|&l| l < LEAVES)?;
        let bit = n % LEAF_FRAMES;
        Some((leaf, (bit / 64) * 8, 1 << (bit % 64)))
    }

    fn contains(&self, frame: u64) -> bool {
        let Some((leaf, word, mask)) = Self::locate(frame) else { return false };
        let page = self.leaves[leaf];
        if page == 0 {
            return false;
        }
        // SAFETY:
        // 1. `page` is a frame this set allocated in `insert` and never frees: nothing else
        //    in the system refers to it; it is identity-mapped read-write RAM.
        // 2. `word` < 4096 and 8-aligned, so the u64 lies inside that page.
        // 3. The set is only reached through `TABLE_FRAMES`'s lock (`&self` here): no write
        //    to the page runs concurrently.
        let w = unsafe { core::ptr::read((page + word) as *const u64) };
        w & mask != 0
    }

    /// Adds `frame`; false when the set does not cover it or has no memory for a leaf.
    fn insert(&mut self, frame: u64) -> bool {
        let Some((leaf, word, mask)) = Self::locate(frame) else { return false };
        if self.leaves[leaf] == 0 {
            let Some(page) = alloc_zeroed(1, TRACKED_LIMIT) else { return false };
            self.leaves[leaf] = page;
        }
        let at = (self.leaves[leaf] + word) as *mut u64;
        // SAFETY:
        // 1. As in `contains`: the leaf page belongs to this set alone, is mapped read-write,
        //    and `word` keeps the u64 inside it.
        // 2. `&mut self` (under `TABLE_FRAMES`'s lock) makes this the only access.
        unsafe { core::ptr::write(at, core::ptr::read(at) | mask) };
        true
    }

    fn remove(&mut self, frame: u64) {
        let Some((leaf, word, mask)) = Self::locate(frame) else { return };
        if self.leaves[leaf] == 0 {
            return;
        }
        let at = (self.leaves[leaf] + word) as *mut u64;
        // SAFETY:
        // 1. As in `contains`: the leaf page belongs to this set alone, is mapped read-write,
        //    and `word` keeps the u64 inside it.
        // 2. `&mut self` (under `TABLE_FRAMES`'s lock) makes this the only access.
        unsafe { core::ptr::write(at, core::ptr::read(at) & !mask) };
    }
}

/// Frames `KernelDma` allocated and has not freed.
static TABLE_FRAMES: IrqMutex<FrameSet> = IrqMutex::new(FrameSet::new());

/// `page`-th frame from `paddr`, without overflow.
fn nth_frame(paddr: u64, page: u64) -> Option<u64> {
    page.checked_mul(PAGE_SIZE).and_then(|o| paddr.checked_add(o))
}

/// `pages` zeroed contiguous frames below `limit`, recorded nowhere.
fn alloc_zeroed(pages: u64, limit: u64) -> Option<u64> {
    let len = usize::try_from(pages.checked_mul(PAGE_SIZE)?).ok()?;
    let p = crate::mem::alloc_contiguous(pages, PAGE_SIZE, limit).ok()?;
    // SAFETY:
    // 1. `p` .. `p + len` were just allocated: nobody else holds them.
    // 2. They are usable RAM, identity-mapped read-write by the kernel's tables.
    unsafe { core::ptr::write_bytes(p as *mut u8, 0, len) };
    Some(p)
}

/// Frames for IOMMU tables and queues (see the module doc for what it may touch).
#[derive(Clone, Debug)]
pub struct KernelDma {
    _only_here: (),
}

/// A VT-d unit over `regs`, its tables and queues in kernel frames.
pub fn probe_unit(regs: MmioWindow, host_address_width: u8) -> Result<VtdUnit<MmioWindow, KernelDma>, IommuError> {
    VtdUnit::probe(regs, KernelDma { _only_here: () }, host_address_width)
}

impl DmaMemory for KernelDma {
    fn alloc(&self, pages: u64, limit: u64) -> Option<u64> {
        let p = alloc_zeroed(pages, limit.min(TRACKED_LIMIT))?;
        let mut set = TABLE_FRAMES.lock();
        for i in 0..pages {
            if !nth_frame(p, i).is_some_and(|f| set.insert(f)) {
                // No room to record them: give back exactly what this call took.
                for j in 0..i {
                    if let Some(f) = nth_frame(p, j) {
                        set.remove(f);
                    }
                }
                drop(set);
                let _ = crate::mem::free_contiguous(p, pages);
                return None;
            }
        }
        Some(p)
    }

    fn free(&self, paddr: u64, pages: u64) {
        let mut set = TABLE_FRAMES.lock();
        if !(0..pages).all(|i| nth_frame(paddr, i).is_some_and(|f| set.contains(f))) {
            drop(set);
            defmt::error!("iommu: refusing to free {=u64} pages at {=u64:#x}: not table frames", pages, paddr);
            return;
        }
        for i in 0..pages {
            if let Some(f) = nth_frame(paddr, i) {
                set.remove(f);
            }
        }
        drop(set);
        if let Err(e) = crate::mem::free_contiguous(paddr, pages) {
            defmt::error!("iommu: freeing {=u64} pages at {=u64:#x}: {}", pages, paddr, e);
        }
    }

    fn read64(&self, paddr: u64) -> u64 {
        let set = TABLE_FRAMES.lock();
        if !paddr.is_multiple_of(8) || !set.contains(paddr & !(PAGE_SIZE - 1)) {
            return 0;
        }
        // SAFETY:
        // 1. `paddr` is 8-aligned and inside a frame `alloc` handed out and `free` has not
        //    taken back (checked against the set, whose lock is held until after the read,
        //    so the frame cannot be freed meanwhile): identity-mapped read-write RAM that only
        //    IOMMU tables and queues use, never a Rust object.
        // 2. The unit may write it concurrently (completion words): hence a volatile read.
        let v = unsafe { core::ptr::read_volatile(paddr as *const u64) };
        drop(set);
        v
    }

    fn write64(&self, paddr: u64, value: u64) {
        let set = TABLE_FRAMES.lock();
        if !paddr.is_multiple_of(8) || !set.contains(paddr & !(PAGE_SIZE - 1)) {
            return;
        }
        // SAFETY:
        // 1. `paddr` is 8-aligned and inside a frame `alloc` handed out and `free` has not
        //    taken back (checked against the set, whose lock is held until after the write):
        //    identity-mapped read-write RAM that only IOMMU tables and queues use.
        // 2. The unit reads it concurrently: a volatile, naturally aligned 64-bit store, which
        //    the unit sees whole (never half an entry).
        unsafe { core::ptr::write_volatile(paddr as *mut u64, value) };
        drop(set);
    }

    fn flush(&self, paddr: u64, len: u64) {
        let set = TABLE_FRAMES.lock();
        let end = paddr.saturating_add(len);
        let mut line = paddr & !63;
        while line < end {
            if set.contains(line & !(PAGE_SIZE - 1)) {
                // SAFETY:
                // 1. `line` lies in a table frame (checked, lock held): mapped RAM, so
                //    `clflush` cannot fault.
                // 2. `clflush` writes the line back and invalidates it; memory contents and
                //    every other state stay as they are.
                unsafe { core::arch::asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags)) };
            }
            line += 64;
        }
        drop(set);
        // SAFETY:
        // 1. `mfence` orders the flushes before the register write that hands the data to
        //    the unit.
        // 2. It reads and writes no memory and no register.
        unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
    }
}

/// A buffer of whole frames for device DMA, with checked byte access; freed on drop.
#[derive(Debug)]
pub struct DmaBuffer {
    paddr: u64,
    pages: u64,
}

impl DmaBuffer {
    /// `pages` zeroed contiguous frames below 4 GiB (reachable by 32-bit DMA engines). Not
    /// table frames: `KernelDma` never reaches them.
    pub fn alloc(pages: u64) -> Option<Self> {
        let paddr = alloc_zeroed(pages, conduit_mem::FOUR_GIB)?;
        Some(Self { paddr, pages })
    }

    /// Physical address.
    pub fn paddr(&self) -> u64 {
        self.paddr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        (self.pages * PAGE_SIZE) as usize
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY:
        // 1. The frames were allocated for this buffer and are owned by it until drop; they
        //    are identity-mapped read-write RAM, `len()` bytes long.
        // 2. `&mut self` makes this the only Rust reference; a device may write them by DMA
        //    concurrently, which is why callers read back only after the DMA completed.
        unsafe { core::slice::from_raw_parts_mut(self.paddr as *mut u8, self.len()) }
    }

    /// Fills the buffer with `f(i)` for each byte index.
    pub fn fill(&mut self, f: impl Fn(usize) -> u8) {
        for (i, b) in self.bytes_mut().iter_mut().enumerate() {
            *b = f(i);
        }
    }

    /// True when every byte equals `f(i)`.
    pub fn all(&mut self, f: impl Fn(usize) -> u8) -> bool {
        self.bytes_mut().iter().enumerate().all(|(i, b)| *b == f(i))
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        if let Err(e) = crate::mem::free_contiguous(self.paddr, self.pages) {
            defmt::error!("dma buffer: freeing {=u64} pages at {=u64:#x}: {}", self.pages, self.paddr, e);
        }
    }
}
