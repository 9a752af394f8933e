//! I/O APIC (82093AA datasheet; ACPI MADT gives the base): indirect register access through
//! IOREGSEL/IOWIN, redirection table entries, masking every pin.

use crate::ApicError;

/// IOREGSEL offset from the base.
pub const IOREGSEL: u64 = 0x00;
/// IOWIN offset from the base.
pub const IOWIN: u64 = 0x10;
/// Register index: ID.
pub const REG_ID: u8 = 0x00;
/// Register index: version (bits 23:16 hold the highest redirection entry index).
pub const REG_VERSION: u8 = 0x01;
/// Register index of redirection entry 0, low dword; entry n uses 0x10 + 2n and 0x11 + 2n.
pub const REG_REDIRECTION_BASE: u8 = 0x10;
/// Redirection entry: masked (bit 16).
pub const REDIRECTION_MASKED: u32 = 1 << 16;
/// Most pins an I/O APIC can have: redirection registers 0x10–0xFF hold 120 entries.
pub const MAX_PINS: u32 = 120;

/// Indirect register access.
pub trait IoApicRegs {
    /// Selects `index` and reads the window.
    fn read(&self, index: u8) -> u32;
    /// Selects `index` and writes the window.
    fn write(&self, index: u8, value: u32);
}

/// An I/O APIC driven through `R`.
#[derive(Debug)]
pub struct IoApic<R> {
    regs: R,
}

impl<R: IoApicRegs> IoApic<R> {
    /// Wraps the register access.
    pub const fn new(regs: R) -> Self {
        Self { regs }
    }

    /// Number of redirection entries (pins); 0 when the version register reads all ones (no
    /// device there), at most `MAX_PINS`.
    pub fn pins(&self) -> u32 {
        let v = self.regs.read(REG_VERSION);
        if v == u32::MAX {
            return 0;
        }
        (((v >> 16) & 0xff) + 1).min(MAX_PINS)
    }

    /// Version number.
    pub fn version(&self) -> u8 {
        (self.regs.read(REG_VERSION) & 0xff) as u8
    }

    fn low_index(&self, pin: u32) -> Result<u8, ApicError> {
        if pin >= self.pins() {
            return Err(ApicError::InvalidPin(pin));
        }
        // pin < MAX_PINS, so 0x10 + 2 * pin + 1 <= 0xff.
        u8::try_from(u32::from(REG_REDIRECTION_BASE) + 2 * pin).map_err(|_| ApicError::InvalidPin(pin))
    }

    /// The redirection entry of `pin` (high dword << 32 | low dword).
    pub fn redirection(&self, pin: u32) -> Result<u64, ApicError> {
        let lo = self.low_index(pin)?;
        Ok(u64::from(self.regs.read(lo + 1)) << 32 | u64::from(self.regs.read(lo)))
    }

    /// Masks `pin`, keeping every other bit of its entry.
    pub fn mask(&self, pin: u32) -> Result<(), ApicError> {
        let lo = self.low_index(pin)?;
        let v = self.regs.read(lo);
        self.regs.write(lo, v | REDIRECTION_MASKED);
        Ok(())
    }

    /// Masks every pin; returns how many.
    pub fn mask_all(&self) -> u32 {
        let pins = self.pins();
        for pin in 0..pins {
            // Cannot fail: pin < pins.
            let _ = self.mask(pin);
        }
        pins
    }

    /// True when `pin` is masked.
    pub fn is_masked(&self, pin: u32) -> Result<bool, ApicError> {
        Ok(self.redirection(pin)? & u64::from(REDIRECTION_MASKED) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct FakeIoApic {
        regs: RefCell<[u32; 0x40]>,
    }

    impl IoApicRegs for FakeIoApic {
        fn read(&self, index: u8) -> u32 {
            self.regs.borrow().get(index as usize).copied().unwrap_or(u32::MAX)
        }
        fn write(&self, index: u8, value: u32) {
            if let Some(r) = self.regs.borrow_mut().get_mut(index as usize) {
                *r = value;
            }
        }
    }

    #[test]
    fn mask_all_keeps_other_bits() {
        let mut regs = [0u32; 0x40];
        regs[REG_VERSION as usize] = 0x0017_0020; // 24 pins, version 0x20
        for pin in 0..24 {
            regs[0x10 + 2 * pin] = 0x0000_a030 + pin as u32;
            regs[0x11 + 2 * pin] = 0x0100_0000;
        }
        let io = IoApic::new(FakeIoApic { regs: RefCell::new(regs) });
        assert_eq!(io.pins(), 24);
        assert_eq!(io.version(), 0x20);
        assert_eq!(io.mask_all(), 24);
        for pin in 0..24 {
            assert!(io.is_masked(pin).unwrap());
            assert_eq!(io.redirection(pin).unwrap(), 0x0100_0000_0001_a030 + u64::from(pin));
        }
        assert_eq!(io.mask(24), Err(ApicError::InvalidPin(24)));
    }

    #[test]
    fn absent_or_bogus_ioapic_never_overflows() {
        let io = IoApic::new(FakeIoApic { regs: RefCell::new([u32::MAX; 0x40]) });
        assert_eq!(io.pins(), 0);
        assert_eq!(io.mask_all(), 0);
        let mut regs = [0u32; 0x40];
        regs[REG_VERSION as usize] = 0x00ff_0011; // claims 256 pins
        let io = IoApic::new(FakeIoApic { regs: RefCell::new(regs) });
        assert_eq!(io.pins(), MAX_PINS);
        assert!(io.redirection(MAX_PINS).is_err());
    }
}
