//! PCI for Conduit, all of it pure logic over one narrow trait, [`ConfigSpace`]:
//!
//! - [`regs`]: register offsets, bit definitions and capability IDs (PCI Local Bus 3.0,
//!   PCI Express Base 6.0), each named after its spec section and checked by unit tests.
//! - [`caps`]: capability chains (standard and extended) walked with loop and bounds
//!   protection; MSI, MSI-X and PCI Express capabilities decoded.
//! - [`bar`]: BAR decoding and sizing (decode disabled while sizing, restored after).
//! - [`enumerate`]: every bus reachable through bridges, multi-function devices, an inventory.
//! - [`perm`]: the shared, compile-time permission tables (which bits are virtual, which the
//!   guest may write, which are write-1-to-clear) per capability ID.
//! - [`summary`]: one canonical inventory line per function.
//! - [`audit`]: an independent, spec-derived check of every hardware write a virtual config
//!   space makes (tests, fuzzing, the QEMU scenario).
//! - [`vconfig`]: a device's config space as its guest sees it, driven by those tables, with
//!   MSI/MSI-X/BAR/command changes reported as [`vconfig::ConfigEvent`]s to the interrupt layer.
//!
//! The kernel implements `ConfigSpace` over ECAM (MCFG) and the legacy 0xCF8/0xCFC ports; host
//! tests use [`fake::FakeConfig`], a scriptable device model with per-bit writability and RW1C.
#![cfg_attr(not(any(test, feature = "fake")), no_std)]
#![forbid(unsafe_code)]

pub mod audit;
pub mod bar;
pub mod caps;
pub mod enumerate;
pub mod perm;
pub mod regs;
pub mod summary;
pub mod vconfig;

#[cfg(any(test, feature = "fake"))]
pub mod fake;

use core::fmt;

/// A PCI function's address: segment group, bus, device, function.
///
/// The fields are public (and read all over the kernel), so a value can be built with a device
/// above 31 or a function above 7. Everything that names hardware uses only the low 5 and 3
/// bits, as PCI does: comparison, ordering and hashing ([`PciAddress::normalized`]), the
/// requester ID, the display form and the config-space accessors. Two values that name the
/// same function are therefore equal, so no table keyed by address can hold one function
/// twice under two spellings.
#[derive(Clone, Copy, Default)]
pub struct PciAddress {
    /// PCI segment group (MCFG).
    pub segment: u16,
    /// Bus 0–255.
    pub bus: u8,
    /// Device 0–31.
    pub device: u8,
    /// Function 0–7.
    pub function: u8,
}

impl PciAddress {
    /// Segment 0 address; `device` and `function` are masked to their widths.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self { segment: 0, bus, device: device & 0x1f, function: function & 7 }
    }

    /// Same address in another segment.
    pub const fn in_segment(self, segment: u16) -> Self {
        Self { segment, ..self }
    }

    /// The same function with device and function cut to their widths (5 and 3 bits).
    pub const fn normalized(self) -> Self {
        Self { segment: self.segment, bus: self.bus, device: self.device & 0x1f, function: self.function & 7 }
    }

    /// Device and function as one byte (device 7:3, function 2:0).
    pub const fn devfn(self) -> u8 {
        (self.device & 0x1f) << 3 | (self.function & 7)
    }

    /// Bus/device/function as the 16-bit requester ID (source ID) the IOMMU sees.
    pub const fn requester_id(self) -> u16 {
        (self.bus as u16) << 8 | self.devfn() as u16
    }

    const fn key(self) -> (u16, u8, u8, u8) {
        let n = self.normalized();
        (n.segment, n.bus, n.device, n.function)
    }
}

impl PartialEq for PciAddress {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for PciAddress {}

impl PartialOrd for PciAddress {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PciAddress {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl core::hash::Hash for PciAddress {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.normalized();
        write!(f, "{:04x}:{:02x}:{:02x}.{}", n.segment, n.bus, n.device, n.function)
    }
}

impl fmt::Debug for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for PciAddress {
    fn format(&self, f: defmt::Formatter) {
        let n = self.normalized();
        defmt::write!(f, "{=u16:04x}:{=u8:02x}:{=u8:02x}.{=u8}", n.segment, n.bus, n.device, n.function)
    }
}

/// Width of one config access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Width {
    /// 1 byte.
    Byte = 1,
    /// 2 bytes.
    Word = 2,
    /// 4 bytes.
    Dword = 4,
}

impl Width {
    /// Bytes.
    pub const fn bytes(self) -> u16 {
        self as u16
    }

    /// Width of `n` bytes.
    pub const fn of(n: usize) -> Option<Self> {
        match n {
            1 => Some(Self::Byte),
            2 => Some(Self::Word),
            4 => Some(Self::Dword),
            _ => None,
        }
    }

    /// All-ones value of this width (what a read of nothing returns).
    pub const fn ones(self) -> u32 {
        match self {
            Self::Byte => 0xff,
            Self::Word => 0xffff,
            Self::Dword => 0xffff_ffff,
        }
    }
}

/// Standard config space size (legacy access reaches only this much).
pub const CONFIG_SIZE: u16 = 256;
/// PCI Express extended config space size (ECAM).
pub const EXTENDED_CONFIG_SIZE: u16 = 4096;

/// Config-space access, the only way this crate touches hardware. Accesses are naturally
/// aligned and inside the function's config space (callers check); a function that does not
/// exist reads all ones and ignores writes, as PCI does.
pub trait ConfigSpace {
    /// Reads `width` bytes at `offset`.
    fn read(&self, addr: PciAddress, offset: u16, width: Width) -> u32;
    /// Writes `width` bytes at `offset`.
    fn write(&self, addr: PciAddress, offset: u16, width: Width, value: u32);
    /// Config space size reachable for `addr` (256 through legacy ports, 4096 through ECAM).
    fn size(&self, addr: PciAddress) -> u16;

    /// 8-bit read.
    fn read8(&self, addr: PciAddress, offset: u16) -> u8 {
        self.read(addr, offset, Width::Byte) as u8
    }
    /// 16-bit read.
    fn read16(&self, addr: PciAddress, offset: u16) -> u16 {
        self.read(addr, offset, Width::Word) as u16
    }
    /// 32-bit read.
    fn read32(&self, addr: PciAddress, offset: u16) -> u32 {
        self.read(addr, offset, Width::Dword)
    }
    /// 16-bit write.
    fn write16(&self, addr: PciAddress, offset: u16, value: u16) {
        self.write(addr, offset, Width::Word, u32::from(value))
    }
    /// 32-bit write.
    fn write32(&self, addr: PciAddress, offset: u16, value: u32) {
        self.write(addr, offset, Width::Dword, value)
    }
}

impl<T: ConfigSpace + ?Sized> ConfigSpace for &T {
    fn read(&self, addr: PciAddress, offset: u16, width: Width) -> u32 {
        (**self).read(addr, offset, width)
    }
    fn write(&self, addr: PciAddress, offset: u16, width: Width, value: u32) {
        (**self).write(addr, offset, width, value)
    }
    fn size(&self, addr: PciAddress) -> u16 {
        (**self).size(addr)
    }
}

/// True when `offset`/`width` is naturally aligned and inside `size`.
pub const fn access_ok(offset: u16, width: Width, size: u16) -> bool {
    let w = width.bytes();
    offset.is_multiple_of(w) && (offset as u32 + w as u32) <= size as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a = PciAddress::new(1, 0x1f, 7);
        assert_eq!(a.to_string(), "0000:01:1f.7");
        assert_eq!(a.requester_id(), 0x01ff);
        assert_eq!(PciAddress::new(0, 0x3f, 9), PciAddress::new(0, 0x1f, 1));
        assert_eq!(a.in_segment(2).to_string(), "0002:01:1f.7");
    }

    #[test]
    fn out_of_range_fields_name_the_function_hardware_sees() {
        // Public fields let a caller spell device 2 as 34 (0x22) and function 1 as 9.
        let odd = PciAddress { segment: 0, bus: 3, device: 0x22, function: 9 };
        let real = PciAddress::new(3, 2, 1);
        assert_eq!(odd, real, "one function, one identity");
        assert_eq!(odd.cmp(&real), core::cmp::Ordering::Equal);
        assert_eq!(odd.requester_id(), 0x0311, "never carries into the bus byte");
        assert_eq!(odd.devfn(), 0x11);
        assert_eq!(odd.to_string(), "0000:03:02.1");
        let mut set = std::collections::HashSet::new();
        set.insert(odd);
        assert!(!set.insert(real), "hashes alike");
        assert!(PciAddress::new(3, 2, 2) > odd && PciAddress::new(3, 1, 7) < odd);
        assert_ne!(odd, real.in_segment(1));
    }

    #[test]
    fn access_checks() {
        assert!(access_ok(0, Width::Dword, 256));
        assert!(access_ok(0xfc, Width::Dword, 256));
        assert!(!access_ok(0x100, Width::Dword, 256));
        assert!(!access_ok(2, Width::Dword, 256));
        assert!(access_ok(2, Width::Word, 256));
        assert!(!access_ok(0xfff, Width::Word, 4096));
        assert!(access_ok(0xfff, Width::Byte, 4096));
    }
}
