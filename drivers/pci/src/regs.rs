//! Config-space register offsets and bits. Sections refer to the PCI Local Bus Specification
//! 3.0 (LB) and the PCI Express Base Specification 6.0 (PCIe).

use bitflags::bitflags;

/// Vendor ID (LB §6.2.1).
pub const VENDOR_ID: u16 = 0x00;
/// Device ID.
pub const DEVICE_ID: u16 = 0x02;
/// Command (LB §6.2.2).
pub const COMMAND: u16 = 0x04;
/// Status (LB §6.2.3).
pub const STATUS: u16 = 0x06;
/// Revision ID.
pub const REVISION: u16 = 0x08;
/// Programming interface.
pub const PROG_IF: u16 = 0x09;
/// Sub-class.
pub const SUBCLASS: u16 = 0x0a;
/// Base class.
pub const CLASS: u16 = 0x0b;
/// Cache line size.
pub const CACHE_LINE_SIZE: u16 = 0x0c;
/// Latency timer.
pub const LATENCY_TIMER: u16 = 0x0d;
/// Header type (bit 7: multi-function).
pub const HEADER_TYPE: u16 = 0x0e;
/// BIST.
pub const BIST: u16 = 0x0f;
/// First BAR (LB §6.2.5.1); type 0 has six, type 1 two.
pub const BAR0: u16 = 0x10;
/// Subsystem vendor ID (type 0).
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
/// Subsystem ID (type 0).
pub const SUBSYSTEM_ID: u16 = 0x2e;
/// Expansion ROM base address (type 0).
pub const ROM_ADDRESS: u16 = 0x30;
/// Capabilities pointer (LB §6.7).
pub const CAPABILITIES_POINTER: u16 = 0x34;
/// Interrupt line.
pub const INTERRUPT_LINE: u16 = 0x3c;
/// Interrupt pin.
pub const INTERRUPT_PIN: u16 = 0x3d;
/// Min grant (type 0).
pub const MIN_GNT: u16 = 0x3e;
/// Max latency (type 0).
pub const MAX_LAT: u16 = 0x3f;
/// End of the standard header.
pub const HEADER_SIZE: u16 = 0x40;

/// Type 1 (bridge): primary bus number.
pub const BRIDGE_PRIMARY_BUS: u16 = 0x18;
/// Type 1: secondary bus number.
pub const BRIDGE_SECONDARY_BUS: u16 = 0x19;
/// Type 1: subordinate bus number.
pub const BRIDGE_SUBORDINATE_BUS: u16 = 0x1a;
/// Type 1: expansion ROM base address.
pub const BRIDGE_ROM_ADDRESS: u16 = 0x38;

/// Header type 0: a device.
pub const HEADER_TYPE_DEVICE: u8 = 0;
/// Header type 1: a PCI-to-PCI bridge.
pub const HEADER_TYPE_BRIDGE: u8 = 1;
/// Header type byte: multi-function device.
pub const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;

/// Vendor ID of an absent function.
pub const VENDOR_NONE: u16 = 0xffff;

bitflags! {
    /// Command register (LB §6.2.2).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Command: u16 {
        /// I/O space decode.
        const IO = 1 << 0;
        /// Memory space decode.
        const MEMORY = 1 << 1;
        /// Bus master (DMA and MSI).
        const BUS_MASTER = 1 << 2;
        /// Special cycles.
        const SPECIAL = 1 << 3;
        /// Memory write and invalidate.
        const MWI = 1 << 4;
        /// VGA palette snoop.
        const VGA_SNOOP = 1 << 5;
        /// Parity error response.
        const PARITY = 1 << 6;
        /// SERR# enable.
        const SERR = 1 << 8;
        /// Fast back-to-back.
        const FAST_B2B = 1 << 9;
        /// INTx emulation disable.
        const INTX_DISABLE = 1 << 10;
    }
}

bitflags! {
    /// Status register (LB §6.2.3). Bits 8 and 11–15 are write-1-to-clear.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Status: u16 {
        /// INTx asserted.
        const INTERRUPT = 1 << 3;
        /// Capabilities list present.
        const CAP_LIST = 1 << 4;
        /// 66 MHz capable.
        const MHZ66 = 1 << 5;
        /// Fast back-to-back capable.
        const FAST_B2B = 1 << 7;
        /// Master data parity error (RW1C).
        const MASTER_PARITY = 1 << 8;
        /// Signaled target abort (RW1C).
        const SIG_TARGET_ABORT = 1 << 11;
        /// Received target abort (RW1C).
        const REC_TARGET_ABORT = 1 << 12;
        /// Received master abort (RW1C).
        const REC_MASTER_ABORT = 1 << 13;
        /// Signaled system error (RW1C).
        const SIG_SYSTEM_ERROR = 1 << 14;
        /// Detected parity error (RW1C).
        const DETECTED_PARITY = 1 << 15;
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Command {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "Command({=u16:#x})", self.bits())
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Status {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "Status({=u16:#x})", self.bits())
    }
}

/// Status bits that are write-1-to-clear.
pub const STATUS_RW1C: u16 = 0xf900;

/// BAR: I/O space indicator (bit 0).
pub const BAR_IO: u32 = 1;
/// BAR (memory): type bits 2:1; 0b10 = 64-bit.
pub const BAR_MEM_TYPE_MASK: u32 = 0b110;
/// BAR (memory): 64-bit type.
pub const BAR_MEM_TYPE_64: u32 = 0b100;
/// BAR (memory): prefetchable (bit 3).
pub const BAR_PREFETCH: u32 = 1 << 3;
/// Expansion ROM BAR: enable (bit 0); address bits 31:11.
pub const ROM_ENABLE: u32 = 1;
/// Expansion ROM address mask.
pub const ROM_ADDRESS_MASK: u32 = 0xffff_f800;

/// Standard capability IDs (PCI Code and ID Assignment Specification §2).
pub mod cap_id {
    /// Power management.
    pub const POWER_MANAGEMENT: u8 = 0x01;
    /// AGP.
    pub const AGP: u8 = 0x02;
    /// Vital product data.
    pub const VPD: u8 = 0x03;
    /// Slot identification.
    pub const SLOT_ID: u8 = 0x04;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// CompactPCI hot swap.
    pub const CHSWP: u8 = 0x06;
    /// PCI-X.
    pub const PCIX: u8 = 0x07;
    /// HyperTransport.
    pub const HYPERTRANSPORT: u8 = 0x08;
    /// Vendor specific.
    pub const VENDOR: u8 = 0x09;
    /// Debug port.
    pub const DEBUG_PORT: u8 = 0x0a;
    /// CompactPCI central resource control.
    pub const CCRC: u8 = 0x0b;
    /// PCI hot plug.
    pub const HOTPLUG: u8 = 0x0c;
    /// Bridge subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR: u8 = 0x0d;
    /// AGP 8x.
    pub const AGP3: u8 = 0x0e;
    /// Secure device.
    pub const SECURE: u8 = 0x0f;
    /// PCI Express.
    pub const PCI_EXPRESS: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
    /// SATA data/index configuration.
    pub const SATA: u8 = 0x12;
    /// Advanced features.
    pub const AF: u8 = 0x13;
    /// Enhanced allocation.
    pub const EA: u8 = 0x14;
    /// Flattening portal bridge.
    pub const FPB: u8 = 0x15;
}

/// Extended capability IDs (PCI Code and ID Assignment Specification §3).
pub mod ext_cap_id {
    /// Null capability (used as a placeholder header).
    pub const NULL: u16 = 0x0000;
    /// Advanced error reporting.
    pub const AER: u16 = 0x0001;
    /// Virtual channel.
    pub const VC: u16 = 0x0002;
    /// Device serial number.
    pub const DSN: u16 = 0x0003;
    /// Power budgeting.
    pub const POWER_BUDGET: u16 = 0x0004;
    /// Vendor specific.
    pub const VENDOR: u16 = 0x000b;
    /// Access control services.
    pub const ACS: u16 = 0x000d;
    /// Alternative routing-ID.
    pub const ARI: u16 = 0x000e;
    /// Address translation services.
    pub const ATS: u16 = 0x000f;
    /// Single root I/O virtualization.
    pub const SRIOV: u16 = 0x0010;
    /// Resizable BAR.
    pub const REBAR: u16 = 0x0015;
    /// Latency tolerance reporting.
    pub const LTR: u16 = 0x0018;
    /// Secondary PCI Express.
    pub const SECONDARY_PCIE: u16 = 0x0019;
    /// Process address space ID.
    pub const PASID: u16 = 0x001b;
    /// L1 PM substates.
    pub const L1SS: u16 = 0x001e;
}

/// First extended capability (PCIe §7.6.3).
pub const EXTENDED_CAP_START: u16 = 0x100;

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets and bits against the spec tables (LB Figure 6-1, 6-2, 6-3; PCIe §7.6).
    #[test]
    fn constants_match_the_specs() {
        assert_eq!((VENDOR_ID, DEVICE_ID, COMMAND, STATUS), (0, 2, 4, 6));
        assert_eq!((REVISION, PROG_IF, SUBCLASS, CLASS), (8, 9, 0xa, 0xb));
        assert_eq!((HEADER_TYPE, BAR0, ROM_ADDRESS, CAPABILITIES_POINTER), (0xe, 0x10, 0x30, 0x34));
        assert_eq!((INTERRUPT_LINE, INTERRUPT_PIN, HEADER_SIZE), (0x3c, 0x3d, 0x40));
        assert_eq!((BRIDGE_PRIMARY_BUS, BRIDGE_SECONDARY_BUS, BRIDGE_SUBORDINATE_BUS), (0x18, 0x19, 0x1a));
        assert_eq!(BRIDGE_ROM_ADDRESS, 0x38);
        assert_eq!(Command::INTX_DISABLE.bits(), 0x400);
        assert_eq!(Command::BUS_MASTER.bits(), 0x4);
        assert_eq!(Status::CAP_LIST.bits(), 0x10);
        assert_eq!(
            STATUS_RW1C,
            (Status::MASTER_PARITY
                | Status::SIG_TARGET_ABORT
                | Status::REC_TARGET_ABORT
                | Status::REC_MASTER_ABORT
                | Status::SIG_SYSTEM_ERROR
                | Status::DETECTED_PARITY)
                .bits()
        );
        assert_eq!((cap_id::MSI, cap_id::PCI_EXPRESS, cap_id::MSIX, cap_id::VENDOR), (5, 0x10, 0x11, 9));
        assert_eq!((ext_cap_id::AER, ext_cap_id::SRIOV, ext_cap_id::ATS), (1, 0x10, 0xf));
    }
}
