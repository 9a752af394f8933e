//! VT-d on this machine: DMA-visible memory for a unit's tables and queues (frames from the
//! allocator, identity-mapped, flushed from the CPU caches with `clflush` when the unit does
//! not snoop them), and DMA buffers for scenarios. A unit's registers are an
//! `mmio::MmioWindow`.

use conduit_iommu::DmaMemory;
use conduit_mem::PAGE_SIZE;

/// Frames for IOMMU tables and queues.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelDma;

impl KernelDma {
    /// Only frames the allocator manages (identity-mapped RAM, never the image, firmware or
    /// device registers) are touched, 8-aligned.
    fn valid(paddr: u64) -> bool {
        paddr.is_multiple_of(8) && crate::mem::manages(paddr)
    }
}

impl DmaMemory for KernelDma {
    fn alloc(&self, pages: u64, limit: u64) -> Option<u64> {
        let p = crate::mem::alloc_contiguous(pages, PAGE_SIZE, limit).ok()?;
        // SAFETY:
        // 1. `p` .. `p + pages` pages were just allocated: nobody else holds them.
        // 2. They are usable RAM, identity-mapped read-write by the kernel's tables.
        unsafe { core::ptr::write_bytes(p as *mut u8, 0, (pages * PAGE_SIZE) as usize) };
        Some(p)
    }

    fn free(&self, paddr: u64, pages: u64) {
        if let Err(e) = crate::mem::free_contiguous(paddr, pages) {
            defmt::error!("iommu: freeing {=u64} pages at {=u64:#x}: {}", pages, paddr, e);
        }
    }

    fn read64(&self, paddr: u64) -> u64 {
        if !Self::valid(paddr) {
            return 0;
        }
        // SAFETY:
        // 1. `paddr` is 8-aligned RAM the frame allocator manages (checked), so it is mapped
        //    read-write by the identity map.
        // 2. The IOMMU driver only passes addresses of frames it allocated through `alloc` and
        //    owns; the unit may write them concurrently (completion words), hence volatile.
        unsafe { core::ptr::read_volatile(paddr as *const u64) }
    }

    fn write64(&self, paddr: u64, value: u64) {
        if !Self::valid(paddr) {
            return;
        }
        // SAFETY: as in `read64`.
        unsafe { core::ptr::write_volatile(paddr as *mut u64, value) }
    }

    fn flush(&self, paddr: u64, len: u64) {
        let start = paddr & !63;
        let end = paddr.saturating_add(len);
        let mut line = start;
        while line < end {
            if Self::valid(line) {
                // SAFETY:
                // 1. `line` is a mapped RAM address (checked); clflush writes back and
                //    invalidates that cache line and has no other effect.
                unsafe { core::arch::asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags)) };
            }
            line += 64;
        }
        // SAFETY: mfence orders the flushes before the register write that hands the data to
        // the unit; it touches no memory.
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
    /// `pages` zeroed contiguous frames below 4 GiB (reachable by 32-bit DMA engines).
    pub fn alloc(pages: u64) -> Option<Self> {
        let paddr = KernelDma.alloc(pages, conduit_mem::FOUR_GIB)?;
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
        KernelDma.free(self.paddr, self.pages);
    }
}
