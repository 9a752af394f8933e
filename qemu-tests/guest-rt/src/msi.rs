//! MSI (PCI Local Bus 3.0 §6.8.1): the capability's message address, data, Multiple Message
//! Enable and enable bit, programmed with x86 messages (`docs/devices.md`): address
//! `0xfee00000 | dest_vcpu << 12` (physical destination, no redirection hint), data = vector
//! (fixed delivery, edge). Message `i` of a multi-message function arrives at `vector + i`.

use core::fmt;

use crate::pci::{Function, PciError, cap_id};

/// Offsets in the MSI capability.
mod off {
    /// Message control (16-bit).
    pub const CONTROL: u16 = 0x02;
    /// Message address, low dword.
    pub const ADDRESS: u16 = 0x04;
    /// Message upper address (64-bit layout).
    pub const ADDRESS_HI: u16 = 0x08;
    /// Message data, 64-bit layout (16-bit).
    pub const DATA_64: u16 = 0x0c;
    /// Message data, 32-bit layout (16-bit).
    pub const DATA_32: u16 = 0x08;
    /// Mask bits, 64-bit layout (with per-vector masking).
    pub const MASK_64: u16 = 0x10;
    /// Mask bits, 32-bit layout (with per-vector masking).
    pub const MASK_32: u16 = 0x0c;
}

/// Message control bits.
mod ctl {
    /// MSI enable.
    pub const ENABLE: u16 = 1 << 0;
    /// Multiple Message Capable (log2 of the messages the function can send), bits 3:1.
    pub const MMC_SHIFT: u16 = 1;
    /// Multiple Message Enable (log2 of the messages enabled), bits 6:4.
    pub const MME_SHIFT: u16 = 4;
    /// Mask of a 3-bit MMC/MME field once shifted down.
    pub const LOG2_MASK: u16 = 0b111;
    /// 64-bit address capable.
    pub const ADDR_64: u16 = 1 << 7;
    /// Per-vector masking capable.
    pub const PER_VECTOR_MASK: u16 = 1 << 8;
}

/// The x86 interrupt message address window (`docs/devices.md`, Intel SDM Vol. 3A §11.11.1).
pub const MESSAGE_ADDRESS_BASE: u32 = 0xfee0_0000;

/// The message address that delivers to vCPU `dest_vcpu` (physical destination mode).
pub const fn message_address(dest_vcpu: u8) -> u32 {
    MESSAGE_ADDRESS_BASE | (dest_vcpu as u32) << 12
}

/// Why MSI could not be programmed as asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiError {
    /// The function has no MSI capability.
    NoCapability,
    /// The capability list is broken.
    Pci(PciError),
    /// Messages must be a power of two from 1 to what the function supports (and ≤ 32).
    BadCount {
        /// Messages asked for.
        asked: u32,
        /// Messages the function supports.
        supported: u32,
    },
    /// For `n` messages the vector's low log2(n) bits must be 0 (the device ORs the message
    /// number into them).
    MisalignedVector {
        /// The vector.
        vector: u8,
        /// Messages.
        messages: u32,
    },
    /// The message count cannot change while MSI is enabled.
    Enabled,
}

impl fmt::Display for MsiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoCapability => write!(f, "no MSI capability"),
            Self::Pci(e) => write!(f, "{e}"),
            Self::BadCount { asked, supported } => {
                write!(f, "{asked} MSI messages asked, the function supports {supported} (power of two)")
            }
            Self::MisalignedVector { vector, messages } => {
                write!(f, "vector {vector:#04x} not aligned to {messages} messages")
            }
            Self::Enabled => write!(f, "MSI is enabled: disable it before reprogramming"),
        }
    }
}

impl From<PciError> for MsiError {
    fn from(e: PciError) -> Self {
        Self::Pci(e)
    }
}

/// A function's MSI capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msi {
    function: Function,
    cap: u16,
}

impl Msi {
    /// The MSI capability of `function`.
    pub fn find(function: Function) -> Result<Self, MsiError> {
        let cap = function.find_capability(cap_id::MSI)?.ok_or(MsiError::NoCapability)?;
        Ok(Self { function, cap: u16::from(cap) })
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> u16 {
        self.cap
    }

    /// The message control register.
    pub fn control(&self) -> u16 {
        self.function.read16(self.cap + off::CONTROL)
    }

    /// Whether the function uses the 64-bit layout.
    pub fn is_64bit(&self) -> bool {
        self.control() & ctl::ADDR_64 != 0
    }

    /// Whether the function has per-vector mask bits.
    pub fn has_per_vector_masking(&self) -> bool {
        self.control() & ctl::PER_VECTOR_MASK != 0
    }

    /// Messages the function can send (Multiple Message Capable).
    pub fn supported_messages(&self) -> u32 {
        1 << ((self.control() >> ctl::MMC_SHIFT) & ctl::LOG2_MASK).min(5)
    }

    /// Messages enabled (Multiple Message Enable).
    pub fn enabled_messages(&self) -> u32 {
        1 << ((self.control() >> ctl::MME_SHIFT) & ctl::LOG2_MASK).min(5)
    }

    /// Whether MSI is enabled.
    pub fn is_enabled(&self) -> bool {
        self.control() & ctl::ENABLE != 0
    }

    fn data_reg(&self) -> u16 {
        self.cap + if self.is_64bit() { off::DATA_64 } else { off::DATA_32 }
    }

    /// Programs `messages` messages to vCPU `dest_vcpu`, message `i` at `vector + i`: address,
    /// data and Multiple Message Enable. MSI must be disabled; it stays so.
    pub fn program(&self, dest_vcpu: u8, vector: u8, messages: u32) -> Result<(), MsiError> {
        let supported = self.supported_messages();
        if !messages.is_power_of_two() || messages > supported {
            return Err(MsiError::BadCount { asked: messages, supported });
        }
        if u32::from(vector) % messages != 0 {
            return Err(MsiError::MisalignedVector { vector, messages });
        }
        let control = self.control();
        if control & ctl::ENABLE != 0 {
            return Err(MsiError::Enabled);
        }
        self.function.write32(self.cap + off::ADDRESS, message_address(dest_vcpu));
        if self.is_64bit() {
            self.function.write32(self.cap + off::ADDRESS_HI, 0);
        }
        self.function.write16(self.data_reg(), u16::from(vector));
        let mme = messages.trailing_zeros() as u16;
        let control = (control & !(ctl::LOG2_MASK << ctl::MME_SHIFT)) | (mme << ctl::MME_SHIFT);
        self.function.write16(self.cap + off::CONTROL, control);
        Ok(())
    }

    /// Rewrites only the message data (the vector of message 0). Use while MSI is disabled.
    pub fn set_vector(&self, vector: u8) {
        self.function.write16(self.data_reg(), u16::from(vector));
    }

    /// The message address (both halves in the 64-bit layout).
    pub fn address(&self) -> u64 {
        let lo = u64::from(self.function.read32(self.cap + off::ADDRESS));
        if self.is_64bit() { u64::from(self.function.read32(self.cap + off::ADDRESS_HI)) << 32 | lo } else { lo }
    }

    /// The message data.
    pub fn data(&self) -> u16 {
        self.function.read16(self.data_reg())
    }

    /// Sets the enable bit.
    pub fn enable(&self) {
        self.function.write16(self.cap + off::CONTROL, self.control() | ctl::ENABLE);
    }

    /// Clears the enable bit.
    pub fn disable(&self) {
        self.function.write16(self.cap + off::CONTROL, self.control() & !ctl::ENABLE);
    }

    /// Writes the per-vector mask bits (bit `i`: message `i` masked); `false` when the function
    /// has no per-vector masking.
    pub fn set_mask_bits(&self, bits: u32) -> bool {
        if !self.has_per_vector_masking() {
            return false;
        }
        let reg = self.cap + if self.is_64bit() { off::MASK_64 } else { off::MASK_32 };
        self.function.write32(reg, bits);
        true
    }
}
