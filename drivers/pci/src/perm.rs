//! Permission tables, after VFIO's `perm_bits` (seed 001), built at compile time and shared by
//! every device. For each byte of a structure three masks:
//!
//! - `virt`: bits read from the device's virtual copy (the rest from hardware);
//! - `write`: bits the guest may write — into the virtual copy where virtualized, into
//!   hardware otherwise;
//! - `rw1c`: write-1-to-clear bits in hardware, written as 0 whenever Conduit rewrites a
//!   register the guest only partly owns, so a status bit is never cleared by accident.
//!
//! A capability with no table here is hidden from guests (spliced out of the chain). Bytes of
//! a visible capability beyond its table read from hardware and are not writable.

use crate::caps::{msi_control, msix_control, pcie_regs};
use crate::regs::{self, Command, Status, cap_id, ext_cap_id};

/// One byte's permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BytePerm {
    /// Bits read from (and written to) the virtual copy.
    pub virt: u8,
    /// Bits the guest may write.
    pub write: u8,
    /// Write-1-to-clear bits in hardware.
    pub rw1c: u8,
}

impl BytePerm {
    /// Read from hardware, never written.
    pub const READ_ONLY: Self = Self { virt: 0, write: 0, rw1c: 0 };

    /// Bits a guest write may change in hardware.
    pub const fn hw_write(&self) -> u8 {
        self.write & !self.virt
    }
}

/// A field of up to four bytes, little-endian masks.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    offset: u16,
    len: u16,
    virt: u32,
    write: u32,
    rw1c: u32,
}

const fn field(offset: u16, len: u16, virt: u32, write: u32, rw1c: u32) -> Field {
    Field { offset, len, virt, write, rw1c }
}

/// Builds an `N`-byte table; bytes not named by a field are read-only hardware bytes.
pub const fn table<const N: usize>(fields: &[Field]) -> [BytePerm; N] {
    let mut t = [BytePerm::READ_ONLY; N];
    let mut i = 0;
    while i < fields.len() {
        let f = fields[i];
        let mut b = 0;
        while b < f.len {
            t[(f.offset + b) as usize] = BytePerm {
                virt: (f.virt >> (8 * b)) as u8,
                write: (f.write >> (8 * b)) as u8,
                rw1c: (f.rw1c >> (8 * b)) as u8,
            };
            b += 1;
        }
        i += 1;
    }
    t
}

const ALL: u32 = u32::MAX;
const NONE: u32 = 0;

/// Command bits a guest may write at all.
pub const COMMAND_WRITABLE: u16 = Command::IO.bits()
    | Command::MEMORY.bits()
    | Command::BUS_MASTER.bits()
    | Command::PARITY.bits()
    | Command::SERR.bits()
    | Command::INTX_DISABLE.bits();
/// Command bits that may reach hardware, if the device policy passes them.
pub const COMMAND_PASSABLE: u16 = Command::IO.bits() | Command::MEMORY.bits() | Command::BUS_MASTER.bits();

/// The type 0 header (LB §6.1). IDs are virtual so they can be presented differently; decode
/// and bus master reach hardware (subject to the device policy, see `vconfig`); INTx disable,
/// parity and SERR enable are virtual; BARs and ROM are fully virtual (handled by `vconfig`);
/// the capability pointer, interrupt line and pin are virtual.
pub static HEADER: [BytePerm; 64] = table(&[
    field(regs::VENDOR_ID, 2, ALL, NONE, NONE),
    field(regs::DEVICE_ID, 2, ALL, NONE, NONE),
    field(regs::COMMAND, 2, !(COMMAND_PASSABLE as u32) & 0xffff, COMMAND_WRITABLE as u32, NONE),
    field(regs::STATUS, 2, Status::CAP_LIST.bits() as u32, NONE, regs::STATUS_RW1C as u32),
    field(regs::CACHE_LINE_SIZE, 1, NONE, ALL, NONE),
    field(regs::LATENCY_TIMER, 1, NONE, ALL, NONE),
    field(regs::BAR0, 4, ALL, ALL, NONE),
    field(regs::BAR0 + 4, 4, ALL, ALL, NONE),
    field(regs::BAR0 + 8, 4, ALL, ALL, NONE),
    field(regs::BAR0 + 12, 4, ALL, ALL, NONE),
    field(regs::BAR0 + 16, 4, ALL, ALL, NONE),
    field(regs::BAR0 + 20, 4, ALL, ALL, NONE),
    field(regs::SUBSYSTEM_VENDOR_ID, 2, ALL, NONE, NONE),
    field(regs::SUBSYSTEM_ID, 2, ALL, NONE, NONE),
    field(regs::ROM_ADDRESS, 4, ALL, ALL, NONE),
    field(regs::CAPABILITIES_POINTER, 4, ALL, NONE, NONE),
    field(0x38, 4, ALL, NONE, NONE),
    field(regs::INTERRUPT_LINE, 1, ALL, ALL, NONE),
    field(regs::INTERRUPT_PIN, 1, ALL, NONE, NONE),
]);

/// Every capability's ID and next pointer are virtual (the chain is rebuilt).
const CAP_HEADER: [Field; 1] = [field(0, 2, ALL, NONE, NONE)];

/// Vendor-specific capability: visible, read-only beyond its header.
pub static VENDOR: [BytePerm; 2] = table(&CAP_HEADER);

/// Power management (PCI PM 1.2 §3.2): the power state and PME enable are virtual, so a guest
/// cannot power the function down or arm wake-ups; PME status is RW1C in hardware.
pub static POWER_MANAGEMENT: [BytePerm; 8] = table(&[CAP_HEADER[0], field(4, 2, 0x0103, 0x0103, 0x8000)]);

/// MSI message control: enable and Multiple Message Enable are guest-writable.
const MSI_CONTROL_WRITE: u32 = (msi_control::ENABLE | msi_control::MME_MASK) as u32;

const fn msi_fields(is_64: bool, masking: bool) -> [Field; 6] {
    let data: u16 = if is_64 { 12 } else { 8 };
    [
        CAP_HEADER[0],
        field(2, 2, ALL, MSI_CONTROL_WRITE, NONE),
        field(4, 4, ALL, 0xffff_fffc, NONE),
        if is_64 { field(8, 4, ALL, ALL, NONE) } else { field(4, 0, NONE, NONE, NONE) },
        field(data, 2, ALL, ALL, NONE),
        if masking { field(data + 4, 4, ALL, ALL, NONE) } else { field(4, 0, NONE, NONE, NONE) },
    ]
}

/// MSI (LB §6.8.1), fully virtual: the interrupt layer programs the real capability. Pending
/// bits read from hardware. One table per layout.
pub static MSI_32: [BytePerm; 10] = table(&msi_fields(false, false));
/// MSI, 64-bit address.
pub static MSI_64: [BytePerm; 14] = table(&msi_fields(true, false));
/// MSI, per-vector masking.
pub static MSI_32_MASK: [BytePerm; 20] = table(&msi_fields(false, true));
/// MSI, 64-bit address and per-vector masking.
pub static MSI_64_MASK: [BytePerm; 24] = table(&msi_fields(true, true));

/// MSI-X (LB §6.8.2): enable and function mask are virtual and writable; table size and the
/// table/PBA locations read from hardware.
pub static MSIX: [BytePerm; 12] = table(&[
    CAP_HEADER[0],
    field(
        2,
        2,
        (msix_control::ENABLE | msix_control::FUNCTION_MASK) as u32,
        (msix_control::ENABLE | msix_control::FUNCTION_MASK) as u32,
        NONE,
    ),
]);

/// PCI Express (PCIe §7.5.3). Device control is writable except phantom functions (would
/// confuse the IOMMU); Max_Payload_Size (shared with the link partner), Max_Read_Request,
/// initiate-FLR and Enable No Snoop are virtual (No Snoop requests would bypass the CPU caches
/// on a unit without snoop control: the device keeps it off, see `vconfig`). Device control 2
/// is writable except ARI forwarding. Link and slot control stay read-only. Status registers
/// mark their RW1C bits.
pub static PCIE: [BytePerm; 0x3c] = table(&[
    CAP_HEADER[0],
    field(
        pcie_regs::DEVICE_CONTROL,
        2,
        (pcie_regs::DEVCTL_FLR | pcie_regs::DEVCTL_PAYLOAD | pcie_regs::DEVCTL_READRQ | pcie_regs::DEVCTL_NO_SNOOP)
            as u32,
        (!pcie_regs::DEVCTL_PHANTOM) as u32,
        NONE,
    ),
    field(pcie_regs::DEVICE_STATUS, 2, NONE, NONE, 0x000f),
    field(pcie_regs::LINK_STATUS, 2, NONE, NONE, 0xc000),
    field(0x1a, 2, NONE, NONE, 0x011f),
    field(0x20, 4, NONE, NONE, 1 << 16),
    field(pcie_regs::DEVICE_CONTROL_2, 2, NONE, (!pcie_regs::DEVCTL2_ARI) as u32, NONE),
    field(0x32, 2, NONE, NONE, 0x0020),
]);

/// An extended capability header (ID, version, next): virtual, so the chain can be rebuilt.
pub static EXT_HEADER: [BytePerm; 4] = table(&[field(0, 4, ALL, NONE, NONE)]);

/// Advanced error reporting (PCIe §7.8.4): visible, read-only; status registers are RW1C.
pub static EXT_AER: [BytePerm; 0x48] = table(&[
    field(0, 4, ALL, NONE, NONE),
    field(0x04, 4, NONE, NONE, ALL),
    field(0x10, 4, NONE, NONE, ALL),
    field(0x30, 4, NONE, NONE, 0x7f),
]);

/// Standard capabilities visible to guests, and their tables. `None`: hidden.
pub fn standard(id: u8) -> Option<&'static [BytePerm]> {
    match id {
        cap_id::POWER_MANAGEMENT => Some(&POWER_MANAGEMENT),
        cap_id::VENDOR => Some(&VENDOR),
        cap_id::PCI_EXPRESS => Some(&PCIE),
        cap_id::MSIX => Some(&MSIX),
        // MSI's table depends on its layout: see `msi`.
        cap_id::MSI => Some(&MSI_64_MASK),
        _ => None,
    }
}

/// The MSI table for a layout.
pub fn msi(is_64: bool, masking: bool) -> &'static [BytePerm] {
    match (is_64, masking) {
        (false, false) => &MSI_32,
        (true, false) => &MSI_64,
        (false, true) => &MSI_32_MASK,
        (true, true) => &MSI_64_MASK,
    }
}

/// Extended capabilities visible to guests. `None`: hidden (SR-IOV, ATS, PRI, PASID, ACS,
/// resizable BAR, … would let a guest change how the device talks to the IOMMU or the fabric).
pub fn extended(id: u16) -> Option<&'static [BytePerm]> {
    match id {
        ext_cap_id::AER => Some(&EXT_AER),
        ext_cap_id::DSN | ext_cap_id::VENDOR => Some(&EXT_HEADER),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_table_matches_the_policy() {
        // IDs: virtual, read-only.
        assert_eq!(HEADER[0], BytePerm { virt: 0xff, write: 0, rw1c: 0 });
        // Command low byte: IO/MEM/BM to hardware; parity virtual.
        assert_eq!(HEADER[4].hw_write(), 0x07);
        assert_eq!(HEADER[4].virt & 0x40, 0x40);
        assert_eq!(HEADER[4].write, 0x47);
        // Command high byte: SERR and INTx disable virtual and writable.
        assert_eq!(HEADER[5], BytePerm { virt: !0x00, write: 0x05, rw1c: 0 });
        // Status: only the capability-list bit is virtual; RW1C marked; nothing writable.
        assert_eq!(HEADER[6], BytePerm { virt: 0x10, write: 0, rw1c: 0x00 });
        assert_eq!(HEADER[7], BytePerm { virt: 0, write: 0, rw1c: 0xf9 });
        // Header type and class: plain hardware reads.
        assert_eq!(HEADER[0x0e], BytePerm::READ_ONLY);
        assert_eq!(HEADER[0x0b], BytePerm::READ_ONLY);
        // BARs, ROM: fully virtual.
        for b in &HEADER[0x10..0x28] {
            assert_eq!(*b, BytePerm { virt: 0xff, write: 0xff, rw1c: 0 });
        }
        assert_eq!(HEADER[0x3c], BytePerm { virt: 0xff, write: 0xff, rw1c: 0 });
        assert_eq!(HEADER[0x3d], BytePerm { virt: 0xff, write: 0, rw1c: 0 });
        // Nothing in the header lets a guest write hardware except command and two timers.
        let hw: std::vec::Vec<usize> = (0..64).filter(|&i| HEADER[i].hw_write() != 0).collect();
        assert_eq!(hw, [0x04, 0x0c, 0x0d]);
    }

    #[test]
    fn capability_tables() {
        for t in [&POWER_MANAGEMENT[..], &MSI_32, &MSI_64, &MSI_32_MASK, &MSI_64_MASK, &MSIX, &PCIE, &VENDOR] {
            assert_eq!(t[0], BytePerm { virt: 0xff, write: 0, rw1c: 0 }, "ID virtual");
            assert_eq!(t[1], BytePerm { virt: 0xff, write: 0, rw1c: 0 }, "next virtual");
        }
        // MSI never writes hardware.
        for t in [&MSI_32[..], &MSI_64, &MSI_32_MASK, &MSI_64_MASK] {
            assert!(t.iter().all(|b| b.hw_write() == 0));
        }
        assert_eq!(MSI_64[2].write, 0x71);
        assert_eq!(MSI_64[4].write, 0xfc);
        assert_eq!(MSI_64_MASK[16], BytePerm { virt: 0xff, write: 0xff, rw1c: 0 }, "mask bits virtual");
        assert_eq!(MSI_64_MASK[20], BytePerm::READ_ONLY, "pending bits from hardware");
        // MSI-X: only enable and function mask, both virtual.
        assert_eq!(MSIX[3], BytePerm { virt: 0xc0, write: 0xc0, rw1c: 0 });
        assert!(MSIX[4..].iter().all(|b| *b == BytePerm::READ_ONLY));
        // PCIe device control: phantom (bit 9) never writable; FLR/MPS/MRRS/No Snoop virtual.
        assert_eq!(PCIE[9].write & 0x02, 0);
        assert_eq!(PCIE[8].virt, 0xe0);
        assert_eq!(PCIE[9].virt, 0xf8);
        assert_eq!(PCIE[9].hw_write(), 0x05, "extended tag and aux power reach hardware, nothing else");
        assert_eq!(PCIE[0x10].write, 0, "link control read-only");
        assert_eq!(PCIE[0x28].write & 0x20, 0, "ARI forwarding not writable");
        // PM: power state virtual.
        assert_eq!(POWER_MANAGEMENT[4], BytePerm { virt: 0x03, write: 0x03, rw1c: 0 });
        assert_eq!(POWER_MANAGEMENT[5], BytePerm { virt: 0x01, write: 0x01, rw1c: 0x80 });
    }

    #[test]
    fn visibility() {
        for id in [cap_id::POWER_MANAGEMENT, cap_id::MSI, cap_id::VENDOR, cap_id::PCI_EXPRESS, cap_id::MSIX] {
            assert!(standard(id).is_some());
        }
        for id in [cap_id::AGP, cap_id::VPD, cap_id::PCIX, cap_id::HYPERTRANSPORT, cap_id::SATA, cap_id::EA, 0x40] {
            assert!(standard(id).is_none());
        }
        assert!(extended(ext_cap_id::AER).is_some());
        for id in
            [ext_cap_id::SRIOV, ext_cap_id::ATS, ext_cap_id::PASID, ext_cap_id::ACS, ext_cap_id::REBAR, ext_cap_id::ARI]
        {
            assert!(extended(id).is_none());
        }
    }
}
