//! The table directory: RSDT or XSDT walked, each table's header and checksum verified, plus
//! the DSDT and FACS reached through the FADT. Tables that fail validation are kept in a
//! separate list with the reason, so one bad table neither hides the others nor gets used.

use crate::{AcpiError, HEADER_LEN, Rsdp, Signature, read_header};
use conduit_mem::{PhysRange, PhysRead};
use heapless::Vec;

/// Most tables kept (valid and rejected each).
pub const MAX_TABLES: usize = 64;

/// A validated table: where it is and how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TableRef {
    /// Signature.
    pub signature: Signature,
    /// Physical address of the header.
    pub paddr: u64,
    /// Length from the header.
    pub len: u32,
}

impl TableRef {
    /// The bytes the table occupies.
    pub fn range(&self) -> PhysRange {
        PhysRange::new(self.paddr, self.paddr.saturating_add(u64::from(self.len)))
    }
}

/// All tables reachable from the RSDP.
#[derive(Clone, Debug)]
pub struct Tables {
    rsdp: Rsdp,
    root: TableRef,
    tables: Vec<TableRef, MAX_TABLES>,
    rejected: Vec<(u64, AcpiError), MAX_TABLES>,
    /// Entries beyond `MAX_TABLES`, not examined.
    pub dropped: u32,
}

/// FADT offsets (ACPI 6.5 Table 5.9).
const FADT_FIRMWARE_CTRL: u64 = 36;
const FADT_DSDT: u64 = 40;
const FADT_X_FIRMWARE_CTRL: u64 = 132;
const FADT_X_DSDT: u64 = 140;

impl Tables {
    /// Walks the XSDT (revision 2 and up, when present) or the RSDT.
    pub fn load(mem: &impl PhysRead, rsdp: Rsdp) -> Result<Self, AcpiError> {
        let (root_addr, sig, entry_size) = match rsdp.xsdt {
            Some(x) => (x, Signature::XSDT, 8u32),
            None => (u64::from(rsdp.rsdt), Signature::RSDT, 4u32),
        };
        let (_, root_len) = read_header(mem, root_addr, Some(sig))?;
        let root = TableRef { signature: sig, paddr: root_addr, len: root_len };
        let mut me = Self { rsdp, root, tables: Vec::new(), rejected: Vec::new(), dropped: 0 };
        let count = (root_len - HEADER_LEN) / entry_size;
        for i in 0..count {
            let at = root_addr + u64::from(HEADER_LEN + i * entry_size);
            let ptr = if entry_size == 8 { mem.read_u64(at)? } else { u64::from(mem.read_u32(at)?) };
            me.add(mem, ptr, None);
        }
        if let Some(fadt) = me.find(Signature::FADT) {
            me.add_fadt_children(mem, fadt);
        }
        Ok(me)
    }

    fn add(&mut self, mem: &impl PhysRead, paddr: u64, expected: Option<Signature>) {
        if self.tables.iter().any(|t| t.paddr == paddr) {
            return;
        }
        let result =
            if expected == Some(Signature::FACS) { read_facs(mem, paddr) } else { read_header(mem, paddr, expected) };
        match result {
            Ok((signature, len)) => {
                if self.tables.push(TableRef { signature, paddr, len }).is_err() {
                    self.dropped += 1;
                }
            }
            Err(e) => {
                if self.rejected.push((paddr, e)).is_err() {
                    self.dropped += 1;
                }
            }
        }
    }

    fn add_fadt_children(&mut self, mem: &impl PhysRead, fadt: TableRef) {
        // The 64-bit fields win when present and non-zero (ACPI 6.5 §5.2.9).
        let field = |off: u64, wide: bool| -> Option<u64> {
            let end = off + if wide { 8 } else { 4 };
            if end > u64::from(fadt.len) {
                return None;
            }
            let v = if wide {
                mem.read_u64(fadt.paddr + off).ok()?
            } else {
                u64::from(mem.read_u32(fadt.paddr + off).ok()?)
            };
            (v != 0).then_some(v)
        };
        if let Some(dsdt) = field(FADT_X_DSDT, true).or_else(|| field(FADT_DSDT, false)) {
            self.add(mem, dsdt, Some(Signature::DSDT));
        }
        if let Some(facs) = field(FADT_X_FIRMWARE_CTRL, true).or_else(|| field(FADT_FIRMWARE_CTRL, false)) {
            self.add(mem, facs, Some(Signature::FACS));
        }
    }

    /// The RSDP these tables came from.
    pub fn rsdp(&self) -> Rsdp {
        self.rsdp
    }

    /// The RSDT or XSDT.
    pub fn root(&self) -> TableRef {
        self.root
    }

    /// First valid table with this signature.
    pub fn find(&self, signature: Signature) -> Option<TableRef> {
        self.tables.iter().copied().find(|t| t.signature == signature)
    }

    /// Every valid table (not the root).
    pub fn iter(&self) -> impl Iterator<Item = TableRef> + '_ {
        self.tables.iter().copied()
    }

    /// Tables that failed validation, with the reason.
    pub fn rejected(&self) -> &[(u64, AcpiError)] {
        &self.rejected
    }

    /// Every byte range firmware tables occupy: RSDP, root and each valid table. The frame
    /// allocator must never hand these out.
    pub fn ranges(&self) -> impl Iterator<Item = PhysRange> + '_ {
        let rsdp = PhysRange::new(self.rsdp.paddr, self.rsdp.paddr + u64::from(self.rsdp.len));
        [rsdp, self.root.range()].into_iter().chain(self.tables.iter().map(|t| t.range()))
    }
}

/// The FACS has a signature and a length but no checksum (ACPI 6.5 §5.2.10).
fn read_facs(mem: &impl PhysRead, paddr: u64) -> Result<(Signature, u32), AcpiError> {
    let mut sig = [0u8; 4];
    mem.read_bytes(paddr, &mut sig)?;
    if Signature(sig) != Signature::FACS {
        return Err(AcpiError::BadSignature { paddr, expected: Signature::FACS, found: Signature(sig) });
    }
    let len = mem.read_u32(paddr + 4)?;
    if !(64..=4096).contains(&len) {
        return Err(AcpiError::BadLength { signature: Signature::FACS, paddr, len });
    }
    Ok((Signature::FACS, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::find_rsdp;
    use crate::rsdp::tests::{rsdp_v0, rsdp_v2};
    use crate::testutil::table;
    use conduit_mem::phys::FakePhys;

    fn fadt(dsdt: u32, facs: u32) -> std::vec::Vec<u8> {
        let mut body = std::vec![0u8; 116 - 36];
        body[0..4].copy_from_slice(&facs.to_le_bytes());
        body[4..8].copy_from_slice(&dsdt.to_le_bytes());
        table(b"FACP", 1, &body)
    }

    fn facs() -> std::vec::Vec<u8> {
        let mut f = std::vec![0u8; 64];
        f[0..4].copy_from_slice(b"FACS");
        f[4..8].copy_from_slice(&64u32.to_le_bytes());
        f
    }

    /// The q35 layout: RSDP rev 0 → RSDT → FACP (→ DSDT, FACS), APIC, HPET.
    pub fn q35() -> FakePhys {
        let mut m = FakePhys::new();
        m.place(0xf5000, &rsdp_v0(0x7ffe_1000));
        let ptrs: std::vec::Vec<u8> =
            [0x7ffe_2000u32, 0x7ffe_3000, 0x7ffe_4000].iter().flat_map(|p| p.to_le_bytes()).collect();
        m.place(0x7ffe_1000, &table(b"RSDT", 1, &ptrs));
        m.place(0x7ffe_2000, &fadt(0x7ffe_5000, 0x7ffe_6000));
        m.place(0x7ffe_3000, &table(b"APIC", 1, &[0u8; 8]));
        m.place(0x7ffe_4000, &table(b"HPET", 1, &[0u8; 20]));
        m.place(0x7ffe_5000, &table(b"DSDT", 1, &[0xa5u8; 3000]));
        m.place(0x7ffe_6000, &facs());
        m
    }

    #[test]
    fn walks_rsdt_and_fadt_children() {
        let m = q35();
        let t = Tables::load(&m, find_rsdp(&m, Some(0xf5000)).unwrap()).unwrap();
        let sigs: std::vec::Vec<std::string::String> = t.iter().map(|x| x.signature.as_str().to_owned()).collect();
        assert_eq!(sigs, ["FACP", "APIC", "HPET", "DSDT", "FACS"]);
        assert_eq!(t.find(Signature::DSDT).unwrap().len, 3036);
        assert!(t.rejected().is_empty());
        let ranges: std::vec::Vec<PhysRange> = t.ranges().collect();
        assert_eq!(ranges.len(), 7);
        assert!(ranges.contains(&PhysRange::new(0x7ffe_5000, 0x7ffe_5000 + 3036)));
    }

    #[test]
    fn xsdt_is_preferred_and_bad_tables_are_rejected_not_used() {
        let mut m = q35();
        m.place(0xf6000, &rsdp_v2(0x7ffe_1000, 0x7ffe_7000));
        let ptrs: std::vec::Vec<u8> =
            [0x7ffe_3000u64, 0x7ffe_8000, 0x9_0000_0000].iter().flat_map(|p| p.to_le_bytes()).collect();
        m.place(0x7ffe_7000, &table(b"XSDT", 1, &ptrs));
        let mut bad = table(b"MCFG", 1, &[0u8; 16]);
        bad[20] ^= 0xff;
        m.place(0x7ffe_8000, &bad);
        let t = Tables::load(&m, find_rsdp(&m, Some(0xf6000)).unwrap()).unwrap();
        assert_eq!(t.root().signature, Signature::XSDT);
        assert_eq!(t.iter().count(), 1);
        assert!(t.find(Signature::MCFG).is_none());
        assert_eq!(t.rejected().len(), 2);
        assert!(matches!(t.rejected()[0].1, AcpiError::BadChecksum { .. }));
        assert!(matches!(t.rejected()[1].1, AcpiError::Read(_)));
    }

    #[test]
    fn bad_root_is_an_error() {
        let mut m = q35();
        m.place(0x7ffe_1000, &table(b"XXXX", 1, &[]));
        let r = find_rsdp(&m, Some(0xf5000)).unwrap();
        assert!(matches!(Tables::load(&m, r), Err(AcpiError::BadSignature { .. })));
        let mut huge = table(b"RSDT", 1, &[]);
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        m.place(0x7ffe_1000, &huge);
        assert!(matches!(Tables::load(&m, r), Err(AcpiError::BadLength { .. })));
    }
}
