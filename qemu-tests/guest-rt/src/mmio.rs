//! Memory-mapped device registers. An [`Mmio`] is a window of guest-physical addresses (the
//! boot identity map makes them virtual addresses too; everything above RAM is mapped uncached)
//! accessed only with single, naturally aligned `mov`s of 1, 2, 4 or 8 bytes between a register
//! and `[register]`: the forms a device behind the hypervisor's MMIO decoder (ECAM, MSI-X
//! table and PBA, emulated devices) is guaranteed to handle, and what a real device expects.

use core::arch::asm;

/// A window of device registers: `bytes` bytes at guest-physical `base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mmio {
    base: u64,
    bytes: u64,
}

impl Mmio {
    /// The window `[base, base + bytes)`.
    ///
    /// # Safety
    ///
    /// 1. The range must lie below 4 GiB (identity-mapped) and hold device registers (or
    ///    nothing), never RAM that a Rust object or another user occupies.
    /// 2. Accesses to it must not make a device write memory Rust code owns (DMA targets are
    ///    the caller's business: [`crate::memory::DmaBuf`]).
    pub const unsafe fn new(base: u64, bytes: u64) -> Self {
        Self { base, bytes }
    }

    /// Guest-physical address of the first byte.
    pub const fn base(&self) -> u64 {
        self.base
    }

    /// Size of the window in bytes.
    pub const fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The part `[offset, offset + bytes)` of this window, if it lies inside.
    pub fn window(&self, offset: u64, bytes: u64) -> Option<Mmio> {
        let end = offset.checked_add(bytes)?;
        (end <= self.bytes).then_some(Mmio { base: self.base + offset, bytes })
    }

    /// The address of the `width`-byte register at `offset`. Out-of-window or misaligned
    /// offsets are driver bugs (device-given offsets are validated when a window is built), so
    /// they panic rather than touch anything else.
    fn addr(&self, offset: u64, width: u64) -> usize {
        assert!(
            offset.is_multiple_of(width) && offset.checked_add(width).is_some_and(|end| end <= self.bytes),
            "MMIO access of {width} bytes at offset {offset:#x} outside or misaligned in a {:#x}-byte window",
            self.bytes
        );
        (self.base + offset) as usize
    }

    /// Reads the byte at `offset`.
    pub fn read8(&self, offset: u64) -> u8 {
        let a = self.addr(offset, 1);
        let v: u8;
        // SAFETY:
        // 1. `a` is inside the window (checked by `addr`), which `new`'s caller guarantees is
        //    identity-mapped device memory outside every Rust object.
        // 2. One `mov r8, [r64]` (8a /r); it writes only `v`. Not `nomem`/`readonly`, so it is
        //    volatile and ordered with the other device accesses.
        unsafe {
            asm!("mov {v}, byte ptr [{a}]", a = in(reg) a, v = lateout(reg_byte) v, options(nostack, preserves_flags))
        };
        v
    }

    /// Reads the 16-bit register at `offset` (2-byte aligned).
    pub fn read16(&self, offset: u64) -> u16 {
        let a = self.addr(offset, 2);
        let v: u16;
        // SAFETY:
        // 1. As in `read8`; `addr` checked the 2-byte alignment. `66 8b /r`.
        unsafe {
            asm!("mov {v:x}, word ptr [{a}]", a = in(reg) a, v = lateout(reg) v, options(nostack, preserves_flags))
        };
        v
    }

    /// Reads the 32-bit register at `offset` (4-byte aligned).
    pub fn read32(&self, offset: u64) -> u32 {
        let a = self.addr(offset, 4);
        let v: u32;
        // SAFETY:
        // 1. As in `read8`; `addr` checked the 4-byte alignment. `8b /r`.
        unsafe {
            asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) a, v = lateout(reg) v, options(nostack, preserves_flags))
        };
        v
    }

    /// Reads the 64-bit register at `offset` (8-byte aligned).
    pub fn read64(&self, offset: u64) -> u64 {
        let a = self.addr(offset, 8);
        let v: u64;
        // SAFETY:
        // 1. As in `read8`; `addr` checked the 8-byte alignment. `REX.W 8b /r`.
        unsafe {
            asm!("mov {v:r}, qword ptr [{a}]", a = in(reg) a, v = lateout(reg) v, options(nostack, preserves_flags))
        };
        v
    }

    /// Writes the byte at `offset`.
    pub fn write8(&self, offset: u64, value: u8) {
        let a = self.addr(offset, 1);
        // SAFETY:
        // 1. As in `read8`: inside the window, device memory outside every Rust object; the
        //    effects of the write on memory are excluded by `new`'s caller. `88 /r`.
        unsafe {
            asm!("mov byte ptr [{a}], {v}", a = in(reg) a, v = in(reg_byte) value, options(nostack, preserves_flags))
        };
    }

    /// Writes the 16-bit register at `offset` (2-byte aligned).
    pub fn write16(&self, offset: u64, value: u16) {
        let a = self.addr(offset, 2);
        // SAFETY:
        // 1. As in `write8`; `addr` checked the alignment. `66 89 /r`.
        unsafe {
            asm!("mov word ptr [{a}], {v:x}", a = in(reg) a, v = in(reg) value, options(nostack, preserves_flags))
        };
    }

    /// Writes the 32-bit register at `offset` (4-byte aligned).
    pub fn write32(&self, offset: u64, value: u32) {
        let a = self.addr(offset, 4);
        // SAFETY:
        // 1. As in `write8`; `addr` checked the alignment. `89 /r`.
        unsafe {
            asm!("mov dword ptr [{a}], {v:e}", a = in(reg) a, v = in(reg) value, options(nostack, preserves_flags))
        };
    }

    /// Writes the 64-bit register at `offset` (8-byte aligned).
    pub fn write64(&self, offset: u64, value: u64) {
        let a = self.addr(offset, 8);
        // SAFETY:
        // 1. As in `write8`; `addr` checked the alignment. `REX.W 89 /r`.
        unsafe {
            asm!("mov qword ptr [{a}], {v:r}", a = in(reg) a, v = in(reg) value, options(nostack, preserves_flags))
        };
    }
}
