//! Capability chains. The standard chain (LB §6.7) starts at 0x34 and lives in 0x40–0xFF; the
//! extended chain (PCIe §7.6.3) starts at 0x100. Both are walked with a visited set and range
//! checks, so a broken or hostile device with a cyclic, misaligned or out-of-range chain ends
//! the walk with a [`ChainError`] instead of hanging or reading out of bounds.

use crate::regs::{self, Status, cap_id};
use crate::{ConfigSpace, EXTENDED_CONFIG_SIZE, PciAddress};
use heapless::Vec;

/// Most standard capabilities recorded (48 dwords fit in 0x40–0xFF).
pub const MAX_CAPS: usize = 48;
/// Most extended capabilities recorded.
pub const MAX_EXT_CAPS: usize = 32;

/// A standard capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Cap {
    /// Capability ID.
    pub id: u8,
    /// Offset of its header.
    pub offset: u16,
}

/// An extended capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ExtCap {
    /// Extended capability ID.
    pub id: u16,
    /// Version.
    pub version: u8,
    /// Offset of its header.
    pub offset: u16,
}

/// Why a walk stopped early. What was found before the error is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ChainError {
    /// A pointer outside the region the chain may use.
    OutOfRange {
        /// Offset of the capability holding the pointer (0x34 for the first).
        at: u16,
        /// The pointer.
        pointer: u16,
    },
    /// A pointer to a capability already visited.
    Loop {
        /// Offset pointed to again.
        at: u16,
    },
    /// More capabilities than recorded.
    TooMany,
}

/// Both chains of a function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chains {
    /// Standard capabilities in chain order.
    pub caps: Vec<Cap, MAX_CAPS>,
    /// Extended capabilities in chain order.
    pub ext: Vec<ExtCap, MAX_EXT_CAPS>,
    /// Why the standard walk stopped early.
    pub error: Option<ChainError>,
    /// Why the extended walk stopped early.
    pub ext_error: Option<ChainError>,
}

impl Chains {
    /// First standard capability with `id`.
    pub fn find(&self, id: u8) -> Option<Cap> {
        self.caps.iter().copied().find(|c| c.id == id)
    }

    /// First extended capability with `id`.
    pub fn find_ext(&self, id: u16) -> Option<ExtCap> {
        self.ext.iter().copied().find(|c| c.id == id)
    }
}

/// Walks both chains of `addr`. The extended chain is walked only when the function has a
/// PCI Express capability and 4 KiB of config space is reachable.
pub fn walk(cfg: &impl ConfigSpace, addr: PciAddress) -> Chains {
    let mut chains = Chains::default();
    walk_standard(cfg, addr, &mut chains);
    if chains.find(cap_id::PCI_EXPRESS).is_some() && cfg.size(addr) >= EXTENDED_CONFIG_SIZE {
        walk_extended(cfg, addr, &mut chains);
    }
    chains
}

fn walk_standard(cfg: &impl ConfigSpace, addr: PciAddress, out: &mut Chains) {
    if cfg.read16(addr, regs::STATUS) & Status::CAP_LIST.bits() == 0 {
        return;
    }
    let mut visited = 0u64; // one bit per dword in 0x40..0x100
    let mut at = regs::CAPABILITIES_POINTER;
    let mut ptr = u16::from(cfg.read8(addr, regs::CAPABILITIES_POINTER) & 0xfc);
    while ptr != 0 {
        if ptr < regs::HEADER_SIZE {
            out.error = Some(ChainError::OutOfRange { at, pointer: ptr });
            return;
        }
        let bit = 1u64 << ((ptr - regs::HEADER_SIZE) / 4);
        if visited & bit != 0 {
            out.error = Some(ChainError::Loop { at: ptr });
            return;
        }
        visited |= bit;
        let header = cfg.read16(addr, ptr);
        if out.caps.push(Cap { id: header as u8, offset: ptr }).is_err() {
            out.error = Some(ChainError::TooMany);
            return;
        }
        at = ptr;
        ptr = (header >> 8) & 0xfc;
    }
}

fn walk_extended(cfg: &impl ConfigSpace, addr: PciAddress, out: &mut Chains) {
    let mut visited = [0u64; 16]; // one bit per dword in 0..0x1000
    let mut at = 0u16;
    let mut ptr = regs::EXTENDED_CAP_START;
    loop {
        if !(regs::EXTENDED_CAP_START..EXTENDED_CONFIG_SIZE).contains(&ptr) || !ptr.is_multiple_of(4) {
            out.ext_error = Some(ChainError::OutOfRange { at, pointer: ptr });
            return;
        }
        let dword = usize::from(ptr / 4);
        if visited[dword / 64] & (1 << (dword % 64)) != 0 {
            out.ext_error = Some(ChainError::Loop { at: ptr });
            return;
        }
        visited[dword / 64] |= 1 << (dword % 64);
        let header = cfg.read32(addr, ptr);
        // All zeros: no extended capabilities; all ones: no extended config space.
        if header == 0 || header == u32::MAX {
            return;
        }
        let id = header as u16;
        if id != regs::ext_cap_id::NULL
            && out.ext.push(ExtCap { id, version: ((header >> 16) & 0xf) as u8, offset: ptr }).is_err()
        {
            out.ext_error = Some(ChainError::TooMany);
            return;
        }
        let next = ((header >> 20) & 0xffc) as u16;
        if next == 0 {
            return;
        }
        at = ptr;
        ptr = next;
    }
}

/// The MSI capability (LB §6.8.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MsiCap {
    /// Offset of the capability.
    pub offset: u16,
    /// 64-bit message address.
    pub is_64bit: bool,
    /// Per-vector masking.
    pub per_vector_mask: bool,
    /// log2 of the vectors the function can use (Multiple Message Capable).
    pub vectors_log2: u8,
    /// Enabled now.
    pub enabled: bool,
}

/// Message Control bits (LB Figure 6-9).
pub mod msi_control {
    /// MSI enable.
    pub const ENABLE: u16 = 1 << 0;
    /// Multiple Message Capable (3:1).
    pub const MMC_SHIFT: u16 = 1;
    /// Multiple Message Enable (6:4).
    pub const MME_SHIFT: u16 = 4;
    /// MME field mask (in place).
    pub const MME_MASK: u16 = 0b111 << 4;
    /// 64-bit address capable.
    pub const ADDR_64: u16 = 1 << 7;
    /// Per-vector masking capable.
    pub const MASKING: u16 = 1 << 8;
}

impl MsiCap {
    /// Decodes the capability at `offset`.
    pub fn read(cfg: &impl ConfigSpace, addr: PciAddress, offset: u16) -> Self {
        let c = cfg.read16(addr, offset + 2);
        Self {
            offset,
            is_64bit: c & msi_control::ADDR_64 != 0,
            per_vector_mask: c & msi_control::MASKING != 0,
            vectors_log2: ((c >> msi_control::MMC_SHIFT) & 7).min(5) as u8,
            enabled: c & msi_control::ENABLE != 0,
        }
    }

    /// Offset of Message Control.
    pub const fn control(&self) -> u16 {
        self.offset + 2
    }
    /// Offset of Message Address (low).
    pub const fn address_lo(&self) -> u16 {
        self.offset + 4
    }
    /// Offset of Message Address (high), 64-bit only.
    pub const fn address_hi(&self) -> Option<u16> {
        if self.is_64bit { Some(self.offset + 8) } else { None }
    }
    /// Offset of Message Data.
    pub const fn data(&self) -> u16 {
        self.offset + if self.is_64bit { 12 } else { 8 }
    }
    /// Offset of Mask Bits, with per-vector masking only.
    pub const fn mask(&self) -> Option<u16> {
        if self.per_vector_mask { Some(self.data() + 4) } else { None }
    }
    /// Offset of Pending Bits, with per-vector masking only.
    pub const fn pending(&self) -> Option<u16> {
        if self.per_vector_mask { Some(self.data() + 8) } else { None }
    }
    /// Length in bytes: 10, 14, 20 or 24.
    pub const fn len_bytes(&self) -> u16 {
        10 + if self.is_64bit { 4 } else { 0 } + if self.per_vector_mask { 10 } else { 0 }
    }
}

/// The MSI-X capability (LB §6.8.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MsixCap {
    /// Offset of the capability.
    pub offset: u16,
    /// Number of table entries (Table Size + 1).
    pub table_size: u16,
    /// BAR holding the table.
    pub table_bir: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u32,
    /// BAR holding the PBA.
    pub pba_bir: u8,
    /// Offset of the PBA in that BAR.
    pub pba_offset: u32,
    /// MSI-X enabled now.
    pub enabled: bool,
    /// Function mask set now.
    pub function_masked: bool,
}

/// MSI-X Message Control bits.
pub mod msix_control {
    /// Table size minus one (10:0).
    pub const TABLE_SIZE_MASK: u16 = 0x7ff;
    /// Function mask.
    pub const FUNCTION_MASK: u16 = 1 << 14;
    /// MSI-X enable.
    pub const ENABLE: u16 = 1 << 15;
}

/// Bytes per MSI-X table entry.
pub const MSIX_ENTRY_BYTES: u32 = 16;
/// MSI-X capability length.
pub const MSIX_CAP_LEN: u16 = 12;

impl MsixCap {
    /// Decodes the capability at `offset`.
    pub fn read(cfg: &impl ConfigSpace, addr: PciAddress, offset: u16) -> Self {
        let c = cfg.read16(addr, offset + 2);
        let t = cfg.read32(addr, offset + 4);
        let p = cfg.read32(addr, offset + 8);
        Self {
            offset,
            table_size: (c & msix_control::TABLE_SIZE_MASK) + 1,
            table_bir: (t & 7) as u8,
            table_offset: t & !7,
            pba_bir: (p & 7) as u8,
            pba_offset: p & !7,
            enabled: c & msix_control::ENABLE != 0,
            function_masked: c & msix_control::FUNCTION_MASK != 0,
        }
    }

    /// Bytes of the vector table.
    pub const fn table_bytes(&self) -> u32 {
        self.table_size as u32 * MSIX_ENTRY_BYTES
    }

    /// Bytes of the PBA (one bit per vector, in whole qwords).
    pub const fn pba_bytes(&self) -> u32 {
        (self.table_size as u32).div_ceil(64) * 8
    }

    /// Offset of Message Control.
    pub const fn control(&self) -> u16 {
        self.offset + 2
    }
}

/// The PCI Express capability (PCIe §7.5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PcieCap {
    /// Offset of the capability.
    pub offset: u16,
    /// Capability version (1 or 2).
    pub version: u8,
    /// Device/port type (PCIe Table 7-17): 0 endpoint, 1 legacy endpoint, 4 root port, 5
    /// upstream switch port, 6 downstream switch port, 7 PCIe-to-PCI bridge, 9 RC integrated
    /// endpoint, 0xa RC event collector.
    pub port_type: u8,
    /// Function Level Reset supported (Device Capabilities bit 28).
    pub flr: bool,
}

/// PCI Express capability register offsets (from the capability start).
pub mod pcie_regs {
    /// PCI Express Capabilities.
    pub const CAPABILITIES: u16 = 0x02;
    /// Device Capabilities.
    pub const DEVICE_CAPABILITIES: u16 = 0x04;
    /// Device Control.
    pub const DEVICE_CONTROL: u16 = 0x08;
    /// Device Status.
    pub const DEVICE_STATUS: u16 = 0x0a;
    /// Link Capabilities.
    pub const LINK_CAPABILITIES: u16 = 0x0c;
    /// Link Control.
    pub const LINK_CONTROL: u16 = 0x10;
    /// Link Status.
    pub const LINK_STATUS: u16 = 0x12;
    /// Device Control 2.
    pub const DEVICE_CONTROL_2: u16 = 0x28;
    /// Length of a version 2 capability.
    pub const V2_LEN: u16 = 0x3c;
    /// Length of a version 1 capability (largest, root port).
    pub const V1_LEN: u16 = 0x24;
    /// Device Status: Transactions Pending (non-posted requests not yet completed).
    pub const DEVSTA_TRANSACTIONS_PENDING: u16 = 1 << 5;
    /// Device Control: initiate Function Level Reset.
    pub const DEVCTL_FLR: u16 = 1 << 15;
    /// Device Control: phantom functions enable.
    pub const DEVCTL_PHANTOM: u16 = 1 << 9;
    /// Device Control: Enable No Snoop (the device may mark requests No Snoop; reset value 1).
    pub const DEVCTL_NO_SNOOP: u16 = 1 << 11;
    /// Device Control: Max_Payload_Size (7:5).
    pub const DEVCTL_PAYLOAD: u16 = 0b111 << 5;
    /// Device Control: Max_Read_Request_Size (14:12).
    pub const DEVCTL_READRQ: u16 = 0b111 << 12;
    /// Device Control 2: ARI forwarding enable.
    pub const DEVCTL2_ARI: u16 = 1 << 5;
}

impl PcieCap {
    /// Decodes the capability at `offset`.
    pub fn read(cfg: &impl ConfigSpace, addr: PciAddress, offset: u16) -> Self {
        let c = cfg.read16(addr, offset + pcie_regs::CAPABILITIES);
        let dc = cfg.read32(addr, offset + pcie_regs::DEVICE_CAPABILITIES);
        Self { offset, version: (c & 0xf) as u8, port_type: ((c >> 4) & 0xf) as u8, flr: dc & (1 << 28) != 0 }
    }

    /// Length in bytes.
    pub const fn len_bytes(&self) -> u16 {
        if self.version >= 2 { pcie_regs::V2_LEN } else { pcie_regs::V1_LEN }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeConfig, edu_like, nvme_like};

    fn at() -> PciAddress {
        PciAddress::new(0, 3, 0)
    }

    #[test]
    fn nvme_chains() {
        let cfg = FakeConfig::new();
        cfg.add(at(), nvme_like());
        let c = walk(&cfg, at());
        let ids: std::vec::Vec<u8> = c.caps.iter().map(|c| c.id).collect();
        assert_eq!(ids, [cap_id::POWER_MANAGEMENT, cap_id::MSIX, cap_id::PCI_EXPRESS]);
        let ext: std::vec::Vec<u16> = c.ext.iter().map(|c| c.id).collect();
        assert_eq!(ext, [regs::ext_cap_id::AER, regs::ext_cap_id::DSN]);
        assert_eq!((c.error, c.ext_error), (None, None));
        let m = MsixCap::read(&cfg, at(), c.find(cap_id::MSIX).unwrap().offset);
        assert_eq!((m.table_size, m.table_bir, m.table_offset, m.pba_offset), (65, 0, 0x2000, 0x3000));
        assert_eq!((m.table_bytes(), m.pba_bytes()), (65 * 16, 16));
        let p = PcieCap::read(&cfg, at(), c.find(cap_id::PCI_EXPRESS).unwrap().offset);
        assert_eq!((p.version, p.port_type, p.len_bytes()), (2, 0, 0x3c));
    }

    #[test]
    fn msi_layouts() {
        for (is_64, masking, len, data, mask) in [
            (false, false, 10, 8, None),
            (true, false, 14, 12, None),
            (false, true, 20, 8, Some(12)),
            (true, true, 24, 12, Some(16)),
        ] {
            let mut f = crate::fake::FakeFunction::new(1, 2, 0, 256);
            let off = f.msi(is_64, masking, 3);
            let cfg = FakeConfig::new();
            cfg.add(at(), f);
            let m = MsiCap::read(&cfg, at(), off);
            assert_eq!((m.is_64bit, m.per_vector_mask, m.vectors_log2), (is_64, masking, 3));
            assert_eq!(m.len_bytes(), len);
            assert_eq!(m.data(), off + data);
            assert_eq!(m.mask(), mask.map(|x| off + x));
        }
        let cfg = FakeConfig::new();
        cfg.add(at(), edu_like());
        assert!(walk(&cfg, at()).ext.is_empty(), "no PCIe capability: no extended walk");
    }

    #[test]
    fn hostile_chains_end_with_errors() {
        // A cycle: the second capability points back to the first.
        let mut f = crate::fake::FakeFunction::new(1, 2, 0, 4096);
        let first = f.cap(cap_id::VENDOR, &[4, 0]);
        let second = f.cap(cap_id::MSI, &[0; 8]);
        f.set8(second + 1, first as u8);
        let cfg = FakeConfig::new();
        cfg.add(at(), f.clone());
        let c = walk(&cfg, at());
        assert_eq!(c.caps.len(), 2);
        assert_eq!(c.error, Some(ChainError::Loop { at: first }));
        // Into the header.
        f.set8(second + 1, 0x10);
        cfg.add(at(), f.clone());
        assert_eq!(walk(&cfg, at()).error, Some(ChainError::OutOfRange { at: second, pointer: 0x10 }));
        // Extended: self-loop and out of range.
        let mut g = crate::fake::FakeFunction::new(1, 2, 0, 4096);
        g.pcie();
        g.set32(0x100, 0x1001_0001);
        cfg.add(at(), g.clone());
        assert_eq!(walk(&cfg, at()).ext_error, Some(ChainError::Loop { at: 0x100 }));
        g.set32(0x100, 0x0801_0001); // next = 0x80
        cfg.add(at(), g.clone());
        assert_eq!(walk(&cfg, at()).ext_error, Some(ChainError::OutOfRange { at: 0x100, pointer: 0x80 }));
        // A device answering all ones everywhere past the header.
        let mut h = crate::fake::FakeFunction::new(1, 2, 0, 4096);
        h.pcie();
        for o in (0x100..0x1000).step_by(4) {
            h.set32(o, u32::MAX);
        }
        cfg.add(at(), h);
        let c = walk(&cfg, at());
        assert!(c.ext.is_empty() && c.ext_error.is_none());
    }

    proptest::proptest! {
        /// Any config-space contents: the walk terminates, never records more than fits, and
        /// every recorded offset is inside the chain's region.
        #[test]
        fn arbitrary_contents_terminate(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 4096)) {
            let mut f = crate::fake::FakeFunction::new(1, 2, 0, 4096);
            f.put(0, &bytes);
            f.set16(0, 1);
            let cfg = FakeConfig::new();
            cfg.add(at(), f);
            let c = walk(&cfg, at());
            for cap in &c.caps { proptest::prop_assert!((0x40..0x100).contains(&cap.offset)); }
            for e in &c.ext { proptest::prop_assert!((0x100..0x1000).contains(&e.offset)); }
        }
    }
}
