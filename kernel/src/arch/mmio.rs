//! Device-register windows: a mapped, uncached MMIO range with bounds- and alignment-checked
//! accesses. The only way kernel code outside `arch` touches device registers (VT-d units,
//! device BARs in scenarios).

use conduit_mem::{PAGE_SIZE, PhysRange};
use core::sync::atomic::{AtomicU64, Ordering, fence};

/// A mapped register window. The mapping `map` makes is permanent (the kernel never unmaps
/// MMIO), which [`WindowCell`] relies on.
#[derive(Clone, Copy, Debug)]
pub struct MmioWindow {
    base: u64,
    len: u64,
}

impl MmioWindow {
    /// Maps `[base, base + len)` uncached (after `map_mmio`'s checks) and returns the window.
    pub fn map(base: u64, len: u64) -> Result<Self, super::paging::MmioMapError> {
        let end = base
            .checked_add(len)
            .ok_or(super::paging::MmioMapError::Paging(conduit_paging::MapError::OutOfRange(base)))?;
        super::paging::map_mmio(PhysRange::new(base, end))?;
        Ok(Self { base, len })
    }

    /// Maps `pages` 4 KiB pages at `base`.
    pub fn map_pages(base: u64, pages: u64) -> Result<Self, super::paging::MmioMapError> {
        Self::map(base, pages * PAGE_SIZE)
    }

    fn ok(&self, offset: u64, width: u64) -> bool {
        offset.is_multiple_of(width) && offset.checked_add(width).is_some_and(|e| e <= self.len)
    }

    /// 32-bit read (all ones outside the window).
    pub fn read32(&self, offset: u64) -> u32 {
        if !self.ok(offset, 4) {
            return u32::MAX;
        }
        // SAFETY:
        // 1. `[base, base + len)` was mapped uncached by `map`, after `check_mmio` confirmed it
        //    aliases no RAM, image or firmware table; `offset` is 4-aligned and the 4 bytes lie
        //    inside it (checked by `ok`).
        // 2. A volatile access of the register's width is what device registers require.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }

    /// 32-bit write (ignored outside the window).
    pub fn write32(&self, offset: u64, value: u32) {
        if self.ok(offset, 4) {
            // SAFETY:
            // 1. `[base, base + len)` was mapped uncached by `map`, after `check_mmio`
            //    confirmed it aliases no RAM, image or firmware table; `offset` is 4-aligned
            //    and the 4 bytes lie inside it (checked by `ok`).
            // 2. A volatile access of the register's width is what device registers require.
            unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, value) }
        }
    }

    /// 64-bit read (all ones outside the window).
    pub fn read64(&self, offset: u64) -> u64 {
        if !self.ok(offset, 8) {
            return u64::MAX;
        }
        // SAFETY:
        // 1. `[base, base + len)` was mapped uncached by `map`, after `check_mmio` confirmed
        //    it aliases no RAM, image or firmware table; `offset` is 8-aligned and the 8 bytes
        //    lie inside it (checked by `ok`).
        // 2. A volatile access of the register's width is what device registers require.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u64) }
    }

    /// 64-bit write (ignored outside the window).
    pub fn write64(&self, offset: u64, value: u64) {
        if self.ok(offset, 8) {
            // SAFETY:
            // 1. `[base, base + len)` was mapped uncached by `map`, after `check_mmio`
            //    confirmed it aliases no RAM, image or firmware table; `offset` is 8-aligned
            //    and the 8 bytes lie inside it (checked by `ok`).
            // 2. A volatile access of the register's width is what device registers require.
            unsafe { core::ptr::write_volatile((self.base + offset) as *mut u64, value) }
        }
    }
}

impl conduit_iommu::vtd::regs::VtdRegs for MmioWindow {
    fn read32(&self, offset: u64) -> u32 {
        MmioWindow::read32(self, offset)
    }
    fn write32(&self, offset: u64, value: u32) {
        MmioWindow::write32(self, offset, value)
    }
    fn read64(&self, offset: u64) -> u64 {
        MmioWindow::read64(self, offset)
    }
    fn write64(&self, offset: u64, value: u64) {
        MmioWindow::write64(self, offset, value)
    }
}

impl MmioWindow {
    /// A read of `width` (1, 2, 4 or 8) bytes at `offset` (all ones outside the window or for
    /// another width) — for forwarding a guest's access to a device register.
    pub fn read(&self, offset: u64, width: u8) -> u64 {
        let w = u64::from(width);
        if !matches!(width, 1 | 2 | 4 | 8) || !self.ok(offset, w) {
            return u64::MAX;
        }
        let at = self.base + offset;
        // SAFETY:
        // 1. `[base, base + len)` was mapped uncached by `map`, after `check_mmio` confirmed it
        //    aliases no RAM, image or firmware table; `offset` is aligned to `width` and the
        //    bytes lie inside it (checked by `ok`).
        // 2. A volatile access of exactly the guest's width is what the device register sees.
        unsafe {
            match width {
                1 => u64::from(core::ptr::read_volatile(at as *const u8)),
                2 => u64::from(core::ptr::read_volatile(at as *const u16)),
                4 => u64::from(core::ptr::read_volatile(at as *const u32)),
                _ => core::ptr::read_volatile(at as *const u64),
            }
        }
    }

    /// A write of `width` (1, 2, 4 or 8) bytes at `offset` (ignored outside the window or for
    /// another width).
    pub fn write(&self, offset: u64, width: u8, value: u64) {
        let w = u64::from(width);
        if !matches!(width, 1 | 2 | 4 | 8) || !self.ok(offset, w) {
            return;
        }
        let at = self.base + offset;
        // SAFETY:
        // 1. `[base, base + len)` was mapped uncached by `map`, after `check_mmio` confirmed it
        //    aliases no RAM, image or firmware table; `offset` is aligned to `width` and the
        //    bytes lie inside it (checked by `ok`).
        // 2. A volatile access of exactly the guest's width is what the device register sees.
        unsafe {
            match width {
                1 => core::ptr::write_volatile(at as *mut u8, value as u8),
                2 => core::ptr::write_volatile(at as *mut u16, value as u16),
                4 => core::ptr::write_volatile(at as *mut u32, value as u32),
                _ => core::ptr::write_volatile(at as *mut u64, value),
            }
        }
    }
}

/// A window published to lock-free readers on other CPUs (the doorbell fast path): a sequence
/// lock over the window's two words. Only windows made by [`MmioWindow::map`] are ever stored,
/// and those mappings are permanent, so whatever `get` returns is a mapped window. Writers are
/// serialized by the caller.
#[derive(Debug)]
pub struct WindowCell {
    seq: AtomicU64,
    base: AtomicU64,
    len: AtomicU64,
}

impl WindowCell {
    /// An empty cell.
    pub const fn new() -> Self {
        Self { seq: AtomicU64::new(0), base: AtomicU64::new(0), len: AtomicU64::new(0) }
    }

    /// Publishes `w` (or empties the cell).
    pub fn set(&self, w: Option<MmioWindow>) {
        let (base, len) = w.map_or((0, 0), |w| (w.base, w.len));
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.base.store(base, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// The window, if one is published; `None` also when a writer kept it changing for a few
    /// tries (the caller then takes its slow path). Never waits.
    #[inline]
    pub fn get(&self) -> Option<MmioWindow> {
        for _ in 0..4 {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 != 0 {
                continue;
            }
            let base = self.base.load(Ordering::Relaxed);
            let len = self.len.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return (len != 0).then_some(MmioWindow { base, len });
            }
        }
        None
    }
}
