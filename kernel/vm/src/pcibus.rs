//! The guest's PCI bus addressing: which function and register a guest configuration access
//! names, through the ECAM window (`layout::ECAM`, bus 0 only) or configuration mechanism #1
//! (ports `0xcf8`/`0xcfc`–`0xcff`). Everything else about the access (what the function
//! answers) is the device's.

use conduit_abi::layout;

/// `CONFIG_ADDRESS` port.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// First `CONFIG_DATA` port.
pub const CONFIG_DATA: u16 = 0xcfc;
const ENABLE: u32 = 1 << 31;

/// A configuration register of a function on bus 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ConfigRef {
    /// Device number, 0–31.
    pub device: u8,
    /// Function, 0–7.
    pub function: u8,
    /// Register offset (0–4095), aligned to the access width.
    pub offset: u16,
    /// Access width: 1, 2 or 4.
    pub width: u8,
}

/// The register an ECAM access at `offset` into the window names; `None` for a width other
/// than 1, 2, 4, a misaligned access, or an offset outside bus 0.
pub fn ecam(offset: u64, width: u8) -> Option<ConfigRef> {
    if offset >= layout::ECAM_BYTES || !matches!(width, 1 | 2 | 4) || !offset.is_multiple_of(u64::from(width)) {
        return None;
    }
    Some(ConfigRef {
        device: ((offset >> 15) & 0x1f) as u8,
        function: ((offset >> 12) & 7) as u8,
        offset: (offset & 0xfff) as u16,
        width,
    })
}

/// Configuration mechanism #1: the address latch of one partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mechanism1 {
    latch: u32,
}

impl Mechanism1 {
    /// Nothing latched.
    pub const fn new() -> Self {
        Self { latch: 0 }
    }

    /// Whether `port` is one of the mechanism's (`0xcf8`–`0xcff`).
    pub fn claims(port: u16) -> bool {
        (CONFIG_ADDRESS..CONFIG_DATA + 4).contains(&port)
    }

    /// A read of `CONFIG_ADDRESS`; `None` for other ports or widths (the caller answers all
    /// ones).
    pub fn read_address(&self, port: u16, width: u8) -> Option<u32> {
        (port == CONFIG_ADDRESS && width == 4).then_some(self.latch)
    }

    /// A write to `CONFIG_ADDRESS` (only 32-bit writes latch; narrower ones, such as the reset
    /// control register at `0xcf9`, are ignored). Returns whether it latched.
    pub fn write_address(&mut self, port: u16, width: u8, value: u32) -> bool {
        if port == CONFIG_ADDRESS && width == 4 {
            // Bits 30:24 are reserved (read as 0); bits 1:0 are part of no register.
            self.latch = value & 0x80ff_fffc;
            true
        } else {
            false
        }
    }

    /// The register a `CONFIG_DATA` access at `port` of `width` names: needs the enable bit,
    /// bus 0, and an access that stays inside the latched dword.
    pub fn data(&self, port: u16, width: u8) -> Option<ConfigRef> {
        if !(CONFIG_DATA..CONFIG_DATA + 4).contains(&port) || !matches!(width, 1 | 2 | 4) {
            return None;
        }
        let byte = (port - CONFIG_DATA) as u8;
        if self.latch & ENABLE == 0 || (self.latch >> 16) & 0xff != 0 || byte + width > 4 || !byte.is_multiple_of(width)
        {
            return None;
        }
        Some(ConfigRef {
            device: ((self.latch >> 11) & 0x1f) as u8,
            function: ((self.latch >> 8) & 7) as u8,
            offset: (self.latch & 0xfc) as u16 + u16::from(byte),
            width,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecam_decoding() {
        assert_eq!(ecam(0x1_0004, 2), Some(ConfigRef { device: 2, function: 0, offset: 4, width: 2 }));
        assert_eq!(ecam(0xf_fffc, 4), Some(ConfigRef { device: 31, function: 7, offset: 0xffc, width: 4 }));
        assert_eq!(ecam(0x1_0005, 2), None, "misaligned");
        assert_eq!(ecam(0x10_0000, 4), None, "bus 1");
        assert_eq!(ecam(0, 8), None);
    }

    #[test]
    fn mechanism1() {
        let mut m = Mechanism1::default();
        assert!(Mechanism1::claims(0xcf8) && Mechanism1::claims(0xcff) && !Mechanism1::claims(0xd00));
        assert_eq!(m.data(0xcfc, 4), None, "not enabled");
        assert!(m.write_address(0xcf8, 4, 0x8000_0000 | 2 << 11 | 1 << 8 | 0x43));
        assert_eq!(m.read_address(0xcf8, 4), Some(0x8000_0000 | 2 << 11 | 1 << 8 | 0x40));
        assert_eq!(m.data(0xcfc, 4), Some(ConfigRef { device: 2, function: 1, offset: 0x40, width: 4 }));
        assert_eq!(m.data(0xcfe, 2), Some(ConfigRef { device: 2, function: 1, offset: 0x42, width: 2 }));
        assert_eq!(m.data(0xcfd, 2), None, "misaligned");
        assert_eq!(m.data(0xcfe, 4), None, "crosses the dword");
        assert!(!m.write_address(0xcf9, 1, 0x6), "reset control is not the latch");
        m.write_address(0xcf8, 4, 0x8001_0000);
        assert_eq!(m.data(0xcfc, 4), None, "bus 1");
    }
}
