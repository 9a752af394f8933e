//! VT-d remapping-hardware registers (VT-d spec rev 4.1, §11.4): offsets, bit fields, the
//! decoded capability registers, and the narrow access trait the driver runs over. Each
//! constant names its section; unit tests check them against the spec's tables.

use bitflags::bitflags;

/// Version (§11.4.1).
pub const VER: u64 = 0x00;
/// Capability (§11.4.2).
pub const CAP: u64 = 0x08;
/// Extended capability (§11.4.3).
pub const ECAP: u64 = 0x10;
/// Global command (§11.4.4.1), write-only.
pub const GCMD: u64 = 0x18;
/// Global status (§11.4.4.2).
pub const GSTS: u64 = 0x1c;
/// Root table address (§11.4.5).
pub const RTADDR: u64 = 0x20;
/// Context command (§11.4.7.1).
pub const CCMD: u64 = 0x28;
/// Fault status (§11.4.9.1).
pub const FSTS: u64 = 0x34;
/// Fault event control (§11.4.9.2).
pub const FECTL: u64 = 0x38;
/// Fault event data.
pub const FEDATA: u64 = 0x3c;
/// Fault event address.
pub const FEADDR: u64 = 0x40;
/// Fault event upper address.
pub const FEUADDR: u64 = 0x44;
/// Protected memory enable (§11.4.11.1).
pub const PMEN: u64 = 0x64;
/// Invalidation queue head (§11.4.13.1).
pub const IQH: u64 = 0x80;
/// Invalidation queue tail.
pub const IQT: u64 = 0x88;
/// Invalidation queue address.
pub const IQA: u64 = 0x90;
/// Invalidation completion status.
pub const ICS: u64 = 0x9c;
/// Interrupt remapping table address (§11.4.15).
pub const IRTA: u64 = 0xb8;

bitflags! {
    /// Global command bits (GCMD, §11.4.4.1).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Gcmd: u32 {
        /// Compatibility format interrupts allowed.
        const CFI = 1 << 23;
        /// Set interrupt remapping table pointer (one-shot).
        const SIRTP = 1 << 24;
        /// Interrupt remapping enable.
        const IRE = 1 << 25;
        /// Queued invalidation enable.
        const QIE = 1 << 26;
        /// Write buffer flush (one-shot).
        const WBF = 1 << 27;
        /// Enable advanced fault logging.
        const EAFL = 1 << 28;
        /// Set fault log (one-shot).
        const SFL = 1 << 29;
        /// Set root table pointer (one-shot).
        const SRTP = 1 << 30;
        /// Translation enable.
        const TE = 1 << 31;
    }
}

bitflags! {
    /// Global status bits (GSTS, §11.4.4.2), one per command bit.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Gsts: u32 {
        /// Compatibility format interrupts allowed.
        const CFIS = 1 << 23;
        /// Interrupt remapping table pointer set (one-shot status).
        const IRTPS = 1 << 24;
        /// Interrupt remapping enabled.
        const IRES = 1 << 25;
        /// Queued invalidation enabled.
        const QIES = 1 << 26;
        /// Write buffer flush pending (one-shot status).
        const WBFS = 1 << 27;
        /// Advanced fault logging enabled.
        const AFLS = 1 << 28;
        /// Fault log set (one-shot status).
        const FLS = 1 << 29;
        /// Root table pointer set (one-shot status).
        const RTPS = 1 << 30;
        /// Translation enabled.
        const TES = 1 << 31;
    }
}

/// Status bits that mirror persistent enables: the value GCMD must keep when one command bit
/// changes. One-shot status bits (RTPS, FLS, WBFS, IRTPS) must never be written back, or the
/// write would repeat their command.
pub const GSTS_PERSISTENT: u32 =
    Gsts::TES.bits() | Gsts::QIES.bits() | Gsts::IRES.bits() | Gsts::CFIS.bits() | Gsts::AFLS.bits();

bitflags! {
    /// Fault status (FSTS, §11.4.9.1). PFO, IQE, ICE, ITE are RW1C; PPF reads 1 while any
    /// fault record holds a fault.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Fsts: u32 {
        /// Primary fault overflow (RW1C).
        const PFO = 1 << 0;
        /// Primary pending fault (read-only).
        const PPF = 1 << 1;
        /// Advanced fault overflow.
        const AFO = 1 << 2;
        /// Advanced pending fault.
        const APF = 1 << 3;
        /// Invalidation queue error (RW1C).
        const IQE = 1 << 4;
        /// Invalidation completion error (RW1C).
        const ICE = 1 << 5;
        /// Invalidation time-out error (RW1C).
        const ITE = 1 << 6;
    }
}

/// FSTS bits a handler clears by writing 1 (never the read-only PPF, never the FRI field).
pub const FSTS_RW1C: u32 = Fsts::PFO.bits() | Fsts::IQE.bits() | Fsts::ICE.bits() | Fsts::ITE.bits();
/// FSTS fault record index (15:8).
pub const FSTS_FRI_SHIFT: u32 = 8;

/// Fault event control: interrupt mask (bit 31).
pub const FECTL_IM: u32 = 1 << 31;
/// Fault event control: interrupt pending (bit 30, read-only).
pub const FECTL_IP: u32 = 1 << 30;

/// IQA: 128-bit descriptors (DW = 0) and queue size 2^QS pages (bits 2:0).
pub const IQA_QS_MASK: u64 = 0x7;
/// IRTA: extended interrupt mode (x2APIC) enable (bit 11).
pub const IRTA_EIME: u64 = 1 << 11;
/// IRTA: size field S (3:0): 2^(S+1) entries.
pub const IRTA_S_MASK: u64 = 0xf;

/// Capability register, decoded (§11.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Cap(pub u64);

impl Cap {
    /// Domains supported: 2^(4 + 2·ND).
    pub const fn domains(self) -> u32 {
        let nd = (self.0 & 0x7) as u32;
        // ND 7 is reserved; 6 (65536 domains) is the most.
        1u32 << (4 + 2 * if nd > 6 { 6 } else { nd })
    }
    /// Required write-buffer flushing.
    pub const fn rwbf(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// Caching mode: not-present entries may be cached; every entry change needs invalidation.
    pub const fn caching_mode(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// Supported adjusted guest address widths (bit 1: 39-bit/3-level, 2: 48/4, 3: 57/5).
    pub const fn sagaw(self) -> u8 {
        ((self.0 >> 8) & 0x1f) as u8
    }
    /// Maximum guest address width (bits).
    pub const fn mgaw(self) -> u8 {
        ((self.0 >> 16) & 0x3f) as u8 + 1
    }
    /// Fault recording registers offset (bytes).
    pub const fn fault_recording_offset(self) -> u64 {
        ((self.0 >> 24) & 0x3ff) * 16
    }
    /// Second-level large page support: bit 0 = 2 MiB, bit 1 = 1 GiB.
    pub const fn sllps(self) -> u8 {
        ((self.0 >> 34) & 0xf) as u8
    }
    /// Page-selective invalidation supported.
    pub const fn psi(self) -> bool {
        self.0 & (1 << 39) != 0
    }
    /// Number of fault recording registers.
    pub const fn fault_records(self) -> u32 {
        ((self.0 >> 40) & 0xff) as u32 + 1
    }
    /// Maximum address mask value for page-selective invalidation.
    pub const fn mamv(self) -> u8 {
        ((self.0 >> 48) & 0x3f) as u8
    }
    /// Write draining: IOTLB invalidations may ask the unit to drain writes (DW).
    pub const fn write_drain(self) -> bool {
        self.0 & (1 << 54) != 0
    }
    /// Read draining: IOTLB invalidations may ask the unit to drain reads (DR).
    pub const fn read_drain(self) -> bool {
        self.0 & (1 << 55) != 0
    }
}

/// Extended capability register, decoded (§11.4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ecap(pub u64);

impl Ecap {
    /// Page-walk coherency: the unit snoops the CPU caches when walking tables.
    pub const fn coherent(self) -> bool {
        self.0 & 1 != 0
    }
    /// Queued invalidation.
    pub const fn queued_invalidation(self) -> bool {
        self.0 & (1 << 1) != 0
    }
    /// Device-TLB (ATS).
    pub const fn device_tlb(self) -> bool {
        self.0 & (1 << 2) != 0
    }
    /// Interrupt remapping.
    pub const fn interrupt_remapping(self) -> bool {
        self.0 & (1 << 3) != 0
    }
    /// Extended interrupt mode (x2APIC destinations).
    pub const fn eim(self) -> bool {
        self.0 & (1 << 4) != 0
    }
    /// Pass-through translation type.
    pub const fn pass_through(self) -> bool {
        self.0 & (1 << 6) != 0
    }
    /// Snoop control.
    pub const fn snoop_control(self) -> bool {
        self.0 & (1 << 7) != 0
    }
    /// IOTLB registers offset (bytes).
    pub const fn iotlb_offset(self) -> u64 {
        ((self.0 >> 8) & 0x3ff) * 16
    }
}

/// Register access for one unit. `read*`/`write*` take byte offsets from the register base.
pub trait VtdRegs {
    /// 32-bit read.
    fn read32(&self, offset: u64) -> u32;
    /// 32-bit write.
    fn write32(&self, offset: u64, value: u32);
    /// 64-bit read.
    fn read64(&self, offset: u64) -> u64;
    /// 64-bit write.
    fn write64(&self, offset: u64, value: u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets against VT-d spec Table 11-1 (register offsets).
    #[test]
    fn offsets_match_the_spec() {
        assert_eq!((VER, CAP, ECAP, GCMD, GSTS, RTADDR, CCMD), (0x00, 0x08, 0x10, 0x18, 0x1c, 0x20, 0x28));
        assert_eq!((FSTS, FECTL, FEDATA, FEADDR, FEUADDR), (0x34, 0x38, 0x3c, 0x40, 0x44));
        assert_eq!((PMEN, IQH, IQT, IQA, ICS, IRTA), (0x64, 0x80, 0x88, 0x90, 0x9c, 0xb8));
    }

    #[test]
    fn command_and_status_bits_match_the_spec() {
        assert_eq!(Gcmd::TE.bits(), 0x8000_0000);
        assert_eq!(Gcmd::SRTP.bits(), 0x4000_0000);
        assert_eq!(Gcmd::QIE.bits(), 0x0400_0000);
        assert_eq!(Gcmd::IRE.bits(), 0x0200_0000);
        assert_eq!(Gcmd::SIRTP.bits(), 0x0100_0000);
        assert_eq!(Gcmd::CFI.bits(), 0x0080_0000);
        // Every command bit has its status bit at the same position.
        for (c, s) in [
            (Gcmd::TE, Gsts::TES),
            (Gcmd::SRTP, Gsts::RTPS),
            (Gcmd::QIE, Gsts::QIES),
            (Gcmd::IRE, Gsts::IRES),
            (Gcmd::SIRTP, Gsts::IRTPS),
            (Gcmd::CFI, Gsts::CFIS),
        ] {
            assert_eq!(c.bits(), s.bits());
        }
        // One-shot status bits are not persistent.
        for one_shot in [Gsts::RTPS, Gsts::FLS, Gsts::WBFS, Gsts::IRTPS] {
            assert_eq!(GSTS_PERSISTENT & one_shot.bits(), 0);
        }
        assert_eq!(FSTS_RW1C, 0x71);
    }

    /// QEMU 7.2's intel-iommu values (PLATFORM.md): fault records at byte offset 0x220 (FRO
    /// field 0x22), IOTLB registers at 0xf0 (IRO field 0xf), 39-bit, 3-level only.
    #[test]
    fn decodes_qemu_capabilities() {
        // ND=2 (256 domains), SAGAW=0b00010, MGAW=38 (39-bit), FRO=0x22, SLLPS=0b11, PSI, NFR=0,
        // MAMV=0x12, DWD (54) and DRD (55), RWBF (4) clear.
        let cap = Cap(2
            | (0b00010 << 8)
            | (38 << 16)
            | (0x22 << 24)
            | (0b11 << 34)
            | (1 << 39)
            | (0x12 << 48)
            | (0b11 << 54));
        assert!(cap.write_drain() && cap.read_drain() && !cap.rwbf());
        assert!(Cap(1 << 4).rwbf());
        assert!(Cap(1 << 55).read_drain() && !Cap(1 << 55).write_drain());
        assert_eq!(cap.domains(), 256);
        assert_eq!(cap.sagaw(), 0b00010);
        assert_eq!(cap.mgaw(), 39);
        assert_eq!(cap.fault_recording_offset(), 0x220);
        assert_eq!(cap.sllps(), 0b11);
        assert!(cap.psi());
        assert_eq!(cap.fault_records(), 1);
        assert_eq!(cap.mamv(), 0x12);
        let ecap = Ecap(0b10 | (1 << 3) | (1 << 6) | (0xf << 8));
        assert!(ecap.queued_invalidation() && ecap.interrupt_remapping() && ecap.pass_through());
        assert!(!ecap.eim() && !ecap.coherent());
        assert_eq!(ecap.iotlb_offset(), 0xf0);
    }
}
