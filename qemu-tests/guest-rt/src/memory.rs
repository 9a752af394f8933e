//! Guest RAM for devices: whole, zeroed pages taken from the free range (`BootInfo::free_start`
//! .. `free_end`) by a bump allocator shared by every vCPU, handed out as [`DmaBuf`]s. A device
//! may read or write a `DmaBuf` at any time, so the CPU side only touches it with volatile
//! accesses. Guest-physical address = virtual address (identity map), which is also the device
//! (DMA) address in a Conduit partition.
//!
//! A guest that allocates here must not use the free range by other means.

use core::sync::atomic::{AtomicU64, Ordering};

/// Page size.
pub const PAGE_BYTES: u64 = 4096;

/// Next free page (0 until `init`).
static NEXT: AtomicU64 = AtomicU64::new(0);
/// End of the free range.
static END: AtomicU64 = AtomicU64::new(0);

/// Sets the range from the (validated) `BootInfo` of the first vCPU that starts; later calls
/// with the same range change nothing.
pub(crate) fn init(free_start: u64, free_end: u64) {
    let start = free_start.next_multiple_of(PAGE_BYTES);
    END.store(free_end & !(PAGE_BYTES - 1), Ordering::Relaxed);
    let _ = NEXT.compare_exchange(0, start, Ordering::AcqRel, Ordering::Acquire);
}

/// Bytes left in the free range.
pub fn free_bytes() -> u64 {
    END.load(Ordering::Relaxed).saturating_sub(NEXT.load(Ordering::Relaxed))
}

/// `pages` zeroed, contiguous pages, or `None` when the free range is exhausted (or `pages` is
/// 0).
pub fn alloc_pages(pages: u64) -> Option<DmaBuf> {
    let bytes = pages.checked_mul(PAGE_BYTES).filter(|&b| b > 0)?;
    let end = END.load(Ordering::Relaxed);
    let addr = NEXT
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| {
            next.checked_add(bytes).filter(|&after| next != 0 && after <= end)
        })
        .ok()?;
    let buf = DmaBuf { addr, bytes };
    buf.fill(0);
    Some(buf)
}

/// Pages of guest RAM shared with a device.
#[derive(Debug, PartialEq, Eq)]
pub struct DmaBuf {
    addr: u64,
    bytes: u64,
}

impl DmaBuf {
    /// Guest-physical (and device) address of the first byte; page-aligned.
    pub const fn addr(&self) -> u64 {
        self.addr
    }

    /// Size in bytes (whole pages).
    pub const fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Pointer to `width` bytes at `offset`; out of range or misaligned is a driver bug.
    fn at(&self, offset: u64, width: u64) -> *mut u8 {
        assert!(
            offset.is_multiple_of(width) && offset.checked_add(width).is_some_and(|end| end <= self.bytes),
            "DMA buffer access of {width} bytes at offset {offset:#x} outside or misaligned in {:#x} bytes",
            self.bytes
        );
        (self.addr + offset) as *mut u8
    }

    /// Reads the byte at `offset`.
    pub fn read8(&self, offset: u64) -> u8 {
        // SAFETY:
        // 1. `at` checked the byte lies in this buffer: RAM from the free range that only this
        //    `DmaBuf` (and the device it is given to) uses; no Rust reference points into it.
        unsafe { self.at(offset, 1).read_volatile() }
    }

    /// Reads the little-endian 16-bit value at `offset` (2-byte aligned).
    pub fn read16(&self, offset: u64) -> u16 {
        // SAFETY:
        // 1. As in `read8`; `at` checked the alignment.
        unsafe { self.at(offset, 2).cast::<u16>().read_volatile() }
    }

    /// Reads the little-endian 32-bit value at `offset` (4-byte aligned).
    pub fn read32(&self, offset: u64) -> u32 {
        // SAFETY:
        // 1. As in `read8`; `at` checked the alignment.
        unsafe { self.at(offset, 4).cast::<u32>().read_volatile() }
    }

    /// Reads the little-endian 64-bit value at `offset` (8-byte aligned).
    pub fn read64(&self, offset: u64) -> u64 {
        // SAFETY:
        // 1. As in `read8`; `at` checked the alignment.
        unsafe { self.at(offset, 8).cast::<u64>().read_volatile() }
    }

    /// Writes the byte at `offset`.
    pub fn write8(&self, offset: u64, value: u8) {
        // SAFETY:
        // 1. As in `read8`.
        unsafe { self.at(offset, 1).write_volatile(value) }
    }

    /// Writes the little-endian 16-bit value at `offset` (2-byte aligned).
    pub fn write16(&self, offset: u64, value: u16) {
        // SAFETY:
        // 1. As in `read8`; `at` checked the alignment.
        unsafe { self.at(offset, 2).cast::<u16>().write_volatile(value) }
    }

    /// Writes the little-endian 32-bit value at `offset` (4-byte aligned).
    pub fn write32(&self, offset: u64, value: u32) {
        // SAFETY:
        // 1. As in `read8`; `at` checked the alignment.
        unsafe { self.at(offset, 4).cast::<u32>().write_volatile(value) }
    }

    /// Writes the little-endian 64-bit value at `offset` (8-byte aligned).
    pub fn write64(&self, offset: u64, value: u64) {
        // SAFETY:
        // 1. As in `read8`; `at` checked the alignment.
        unsafe { self.at(offset, 8).cast::<u64>().write_volatile(value) }
    }

    /// Sets every byte to `value`.
    pub fn fill(&self, value: u8) {
        let word = u64::from_ne_bytes([value; 8]);
        for offset in (0..self.bytes).step_by(8) {
            self.write64(offset, word);
        }
    }

    /// Copies `bytes` into the buffer at `offset`.
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            self.write8(offset + i as u64, b);
        }
    }

    /// Copies the buffer's bytes at `offset` into `out`.
    pub fn read_bytes(&self, offset: u64, out: &mut [u8]) {
        for (i, b) in out.iter_mut().enumerate() {
            *b = self.read8(offset + i as u64);
        }
    }
}
