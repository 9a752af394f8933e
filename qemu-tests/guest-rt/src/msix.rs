//! MSI-X (PCI Local Bus 3.0 §6.8.2): the capability (enable, function mask, table size, table
//! and PBA location as BAR indicator + offset), the table (16-byte entries: address low/high,
//! data, vector control) and the pending-bit array, in the function's placed memory BARs. Every
//! table and PBA access is one aligned 32-bit `mov` (`docs/devices.md`: 4 or 8 bytes). Messages
//! are x86 messages, as for MSI (`crate::msi::message_address`).

use core::fmt;

use crate::mmio::Mmio;
use crate::msi::message_address;
use crate::pci::{Bar, Function, PciError, cap_id};

/// Offsets in the MSI-X capability.
mod off {
    /// Message control (16-bit).
    pub const CONTROL: u16 = 0x02;
    /// Table offset (bits 31:3) and BAR indicator (bits 2:0).
    pub const TABLE: u16 = 0x04;
    /// PBA offset and BAR indicator.
    pub const PBA: u16 = 0x08;
}

/// Message control bits.
mod ctl {
    /// Table size − 1, bits 10:0.
    pub const TABLE_SIZE_MASK: u16 = 0x07ff;
    /// Function mask.
    pub const FUNCTION_MASK: u16 = 1 << 14;
    /// MSI-X enable.
    pub const ENABLE: u16 = 1 << 15;
}

/// BAR indicator bits of the table/PBA offset registers.
const BIR_MASK: u32 = 0b111;

/// Table entry layout.
mod entry {
    /// Bytes per entry.
    pub const BYTES: u64 = 16;
    /// Message address, low dword.
    pub const ADDRESS_LO: u64 = 0x0;
    /// Message address, high dword.
    pub const ADDRESS_HI: u64 = 0x4;
    /// Message data.
    pub const DATA: u64 = 0x8;
    /// Vector control (bit 0: masked).
    pub const VECTOR_CONTROL: u64 = 0xc;
    /// Vector control: masked.
    pub const MASKED: u32 = 1 << 0;
}

/// Why the MSI-X structures could not be located.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixError {
    /// The function has no MSI-X capability.
    NoCapability,
    /// The capability list is broken.
    Pci(PciError),
    /// The table or PBA names a BAR that was not placed (or is not a memory BAR).
    BarNotPlaced(u8),
    /// The table or PBA does not fit in its BAR.
    OutsideBar {
        /// BAR indicator.
        bir: u8,
        /// Offset in the BAR.
        offset: u64,
        /// Bytes needed.
        bytes: u64,
    },
}

impl fmt::Display for MsixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoCapability => write!(f, "no MSI-X capability"),
            Self::Pci(e) => write!(f, "{e}"),
            Self::BarNotPlaced(bir) => write!(f, "MSI-X structure in BAR {bir}, which is not a placed memory BAR"),
            Self::OutsideBar { bir, offset, bytes } => {
                write!(f, "MSI-X structure of {bytes:#x} bytes at BAR {bir} + {offset:#x} does not fit the BAR")
            }
        }
    }
}

impl From<PciError> for MsixError {
    fn from(e: PciError) -> Self {
        Self::Pci(e)
    }
}

/// One table entry as read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control.
    pub vector_control: u32,
}

impl Entry {
    /// Whether the entry is masked.
    pub fn masked(&self) -> bool {
        self.vector_control & entry::MASKED != 0
    }
}

/// A function's MSI-X capability, table and PBA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiX {
    function: Function,
    cap: u16,
    table: Mmio,
    pba: Mmio,
    entries: u16,
}

impl MsiX {
    /// Finds the capability of `function` and locates the table and PBA in `bars` (the
    /// function's placed memory BARs), checking each fits in its BAR.
    pub fn find(function: Function, bars: &[Bar]) -> Result<Self, MsixError> {
        let cap = u16::from(function.find_capability(cap_id::MSIX)?.ok_or(MsixError::NoCapability)?);
        let entries = (function.read16(cap + off::CONTROL) & ctl::TABLE_SIZE_MASK) + 1;
        let table_bytes = u64::from(entries) * entry::BYTES;
        let pba_bytes = u64::from(entries).div_ceil(64) * 8;
        let table = Self::locate(function, cap + off::TABLE, table_bytes, bars)?;
        let pba = Self::locate(function, cap + off::PBA, pba_bytes, bars)?;
        Ok(Self { function, cap, table, pba, entries })
    }

    /// The `bytes` bytes the offset/BIR register at `reg` points at.
    fn locate(function: Function, reg: u16, bytes: u64, bars: &[Bar]) -> Result<Mmio, MsixError> {
        let value = function.read32(reg);
        let bir = (value & BIR_MASK) as u8;
        let offset = u64::from(value & !BIR_MASK);
        let bar = bars.iter().find(|b| b.index == bir && b.address() != 0).ok_or(MsixError::BarNotPlaced(bir))?;
        // SAFETY:
        // 1. Accesses to the MSI-X table and PBA only program interrupt messages, whose
        //    addresses this module always sets to the local APIC window (`message_address`),
        //    never RAM: no device write to memory Rust owns follows from them.
        let window = unsafe { bar.window(offset, bytes) };
        window.ok_or(MsixError::OutsideBar { bir, offset, bytes })
    }

    /// Table entries.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> u16 {
        self.cap
    }

    /// Guest-physical address of the table.
    pub fn table_address(&self) -> u64 {
        self.table.base()
    }

    /// Guest-physical address of the PBA.
    pub fn pba_address(&self) -> u64 {
        self.pba.base()
    }

    /// The message control register.
    pub fn control(&self) -> u16 {
        self.function.read16(self.cap + off::CONTROL)
    }

    /// Sets or clears `bits` of message control; every other bit is written back as read
    /// (reserved bits preserved; the table size is read-only).
    fn set_control_bits(&self, bits: u16, on: bool) {
        let control = self.control();
        let control = if on { control | bits } else { control & !bits };
        self.function.write16(self.cap + off::CONTROL, control);
    }

    /// Sets MSI-X enable (the function mask is left as it is).
    pub fn enable(&self) {
        self.set_control_bits(ctl::ENABLE, true);
    }

    /// Clears MSI-X enable.
    pub fn disable(&self) {
        self.set_control_bits(ctl::ENABLE, false);
    }

    /// Whether MSI-X is enabled.
    pub fn is_enabled(&self) -> bool {
        self.control() & ctl::ENABLE != 0
    }

    /// Sets (`true`) or clears the function mask.
    pub fn set_function_mask(&self, masked: bool) {
        self.set_control_bits(ctl::FUNCTION_MASK, masked);
    }

    /// Whether the function mask is set.
    pub fn function_masked(&self) -> bool {
        self.control() & ctl::FUNCTION_MASK != 0
    }

    /// Offset of `field` of entry `index` in the table (an out-of-range index is a driver bug:
    /// the table window's bounds check panics).
    fn at(index: u16, field: u64) -> u64 {
        u64::from(index) * entry::BYTES + field
    }

    /// Writes entry `index`'s message: address (vCPU `dest_vcpu`), upper address 0, data
    /// `vector`. Vector control is not touched (mask first when the entry is live).
    pub fn program(&self, index: u16, dest_vcpu: u8, vector: u8) {
        self.table.write32(Self::at(index, entry::ADDRESS_LO), message_address(dest_vcpu));
        self.table.write32(Self::at(index, entry::ADDRESS_HI), 0);
        self.table.write32(Self::at(index, entry::DATA), u32::from(vector));
    }

    /// Rewrites only entry `index`'s address low dword: retargets it to vCPU `dest_vcpu`.
    pub fn set_destination(&self, index: u16, dest_vcpu: u8) {
        self.table.write32(Self::at(index, entry::ADDRESS_LO), message_address(dest_vcpu));
    }

    /// Reads entry `index`.
    pub fn entry(&self, index: u16) -> Entry {
        let lo = self.table.read32(Self::at(index, entry::ADDRESS_LO));
        let hi = self.table.read32(Self::at(index, entry::ADDRESS_HI));
        Entry {
            address: u64::from(hi) << 32 | u64::from(lo),
            data: self.table.read32(Self::at(index, entry::DATA)),
            vector_control: self.table.read32(Self::at(index, entry::VECTOR_CONTROL)),
        }
    }

    /// Entry `index`'s vector control register.
    pub fn vector_control(&self, index: u16) -> u32 {
        self.table.read32(Self::at(index, entry::VECTOR_CONTROL))
    }

    /// Whether entry `index` is masked.
    pub fn is_masked(&self, index: u16) -> bool {
        self.vector_control(index) & entry::MASKED != 0
    }

    /// Masks entry `index` (other vector control bits kept).
    pub fn mask(&self, index: u16) {
        let vc = self.vector_control(index);
        self.table.write32(Self::at(index, entry::VECTOR_CONTROL), vc | entry::MASKED);
    }

    /// Unmasks entry `index` (other vector control bits kept).
    pub fn unmask(&self, index: u16) {
        let vc = self.vector_control(index);
        self.table.write32(Self::at(index, entry::VECTOR_CONTROL), vc & !entry::MASKED);
    }

    /// Whether entry `index`'s pending bit is set.
    pub fn pending(&self, index: u16) -> bool {
        let dword = self.pba.read32(u64::from(index / 32) * 4);
        dword & (1 << (index % 32)) != 0
    }

    /// How many entries are masked, of the first `count`.
    pub fn masked_count(&self, count: u16) -> u16 {
        (0..count.min(self.entries)).filter(|&i| self.is_masked(i)).count() as u16
    }
}
