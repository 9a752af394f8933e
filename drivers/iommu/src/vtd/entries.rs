//! In-memory structures the unit reads (VT-d spec §9): root entries, legacy-mode context
//! entries, interrupt remapping table entries, and the remappable MSI address/data format.

/// Root entry (§9.1), 128 bits: present (bit 0) and the context table pointer (63:12).
pub const fn root_entry(context_table: u64) -> (u64, u64) {
    ((context_table & !0xfff) | 1, 0)
}

/// Translation type of a context entry (§9.3, bits 3:2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TranslationType {
    /// Untranslated requests go through the second-level tables.
    SecondLevel = 0b00,
    /// Untranslated requests pass through unchanged (never used for assigned devices).
    PassThrough = 0b10,
}

/// Address width field (AW) for a table with `levels` levels: 3 → 1 (39-bit), 4 → 2, 5 → 3.
pub const fn address_width(levels: u8) -> u64 {
    (levels as u64).saturating_sub(2)
}

/// Context entry (§9.3), 128 bits: present, translation type, second-level table pointer;
/// address width and domain ID in the upper half.
pub const fn context_entry(table: u64, domain: u16, levels: u8, tt: TranslationType) -> (u64, u64) {
    let lo = (table & !0xfff) | ((tt as u64) << 2) | 1;
    let hi = (domain as u64) << 8 | address_width(levels);
    (lo, hi)
}

/// Interrupt remapping table entry fields (§9.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Irte {
    /// Vector delivered.
    pub vector: u8,
    /// Destination APIC ID.
    pub destination: u32,
    /// Requester ID allowed to use the entry.
    pub source_id: u16,
    /// Destination IDs in x2APIC format (IRTA.EIME set).
    pub x2apic: bool,
}

/// IRTE: present.
pub const IRTE_PRESENT: u64 = 1;
/// IRTE: fault processing disable (never set: Conduit wants every fault).
pub const IRTE_FPD: u64 = 1 << 1;
/// IRTE high: source-validation type "verify requester ID and qualifier" (SVT = 01b, 83:82).
pub const IRTE_SVT_REQUESTER: u64 = 0b01 << 18;

impl Irte {
    /// Encodes a present entry: fixed delivery, physical destination, edge trigger, no
    /// redirection hint, remapped (not posted) format; source validation by exact requester ID
    /// (SQ = 0: all 16 bits compared). In xAPIC mode the destination sits in bits 47:40.
    pub const fn encode(&self) -> (u64, u64) {
        let dest = if self.x2apic { self.destination as u64 } else { ((self.destination & 0xff) as u64) << 8 };
        let lo = IRTE_PRESENT | (self.vector as u64) << 16 | dest << 32;
        let hi = self.source_id as u64 | IRTE_SVT_REQUESTER;
        (lo, hi)
    }
}

/// The MSI address/data a device must use to be remapped through IRTE `handle` (§5.1.2.2):
/// address 0xFEE0_0000 with the interrupt-format bit (4) set, handle bits 14:0 in 19:5 and
/// bit 15 in bit 2, SHV clear; data 0.
pub const fn remappable_msi(handle: u16) -> (u64, u32) {
    let h = handle as u64;
    let address = 0xfee0_0000 | (h & 0x7fff) << 5 | (1 << 4) | ((h >> 15) & 1) << 2;
    (address, 0)
}

/// A compatibility-format MSI for `vector` on `apic_id` (what a device would send without
/// interrupt remapping; the unit must block it when GSTS.CFIS is clear).
pub const fn compatibility_msi(apic_id: u8, vector: u8) -> (u64, u32) {
    (0xfee0_0000 | (apic_id as u64) << 12, vector as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_context_entries() {
        assert_eq!(root_entry(0x12_3000), (0x12_3001, 0));
        let (lo, hi) = context_entry(0x45_6000, 7, 3, TranslationType::SecondLevel);
        assert_eq!(lo, 0x45_6001);
        assert_eq!(hi, 7 << 8 | 1, "AW=1: 39-bit, 3-level");
        assert_eq!(context_entry(0x1000, 1, 4, TranslationType::PassThrough), (0x1009, 1 << 8 | 2));
    }

    #[test]
    fn irte_encoding() {
        let (lo, hi) = Irte { vector: 0x41, destination: 3, source_id: 0x0010, x2apic: false }.encode();
        assert_eq!(lo, 1 | 0x41 << 16 | 3u64 << 40, "xAPIC destination in 47:40");
        assert_eq!(hi, 0x0010 | 1 << 18, "SVT=01, SQ=00, SID");
        let (lo, _) = Irte { vector: 0x41, destination: 0x1234, source_id: 0, x2apic: true }.encode();
        assert_eq!(lo >> 32, 0x1234);
        assert_eq!(lo & IRTE_FPD, 0, "faults are never suppressed");
    }

    #[test]
    fn msi_formats() {
        assert_eq!(remappable_msi(0), (0xfee0_0010, 0));
        assert_eq!(remappable_msi(5), (0xfee0_00b0, 0));
        assert_eq!(remappable_msi(0x8001), (0xfee0_0034, 0), "handle bit 15 in address bit 2");
        assert_eq!(compatibility_msi(1, 0x42), (0xfee0_1000, 0x42));
    }
}
