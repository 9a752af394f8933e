//! The Root System Description Pointer (ACPI 6.5 §5.2.5): validated at the address the boot
//! protocol gave, or searched for in the EBDA and the BIOS read-only area.

use crate::{AcpiError, Signature};
use conduit_mem::PhysRead;

/// The RSDP, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Rsdp {
    /// Where it was found.
    pub paddr: u64,
    /// 0 for ACPI 1.0 (RSDT only), 2 and up for XSDT.
    pub revision: u8,
    /// Physical address of the RSDT.
    pub rsdt: u32,
    /// Physical address of the XSDT (revision 2 and up, non-zero).
    pub xsdt: Option<u64>,
    /// Bytes the structure occupies (20 or its length field).
    pub len: u32,
}

const SIGNATURE: &[u8; 8] = b"RSD PTR ";
/// Where the real-mode segment of the EBDA is stored (BIOS data area).
const EBDA_SEGMENT_PTR: u64 = 0x40e;
/// BIOS read-only memory area searched for the RSDP.
const BIOS_AREA: (u64, u64) = (0xe0000, 0x100000);

/// Validates the RSDP at `hint` if given; otherwise searches the first KiB of the EBDA and then
/// 0xE0000–0xFFFFF on 16-byte boundaries.
pub fn find_rsdp(mem: &impl PhysRead, hint: Option<u64>) -> Result<Rsdp, AcpiError> {
    if let Some(p) = hint {
        return parse(mem, p)?.ok_or(AcpiError::RsdpNotFound);
    }
    if let Ok(seg) = mem.read_u16(EBDA_SEGMENT_PTR) {
        let ebda = u64::from(seg) << 4;
        if ebda >= 0x400
            && let Some(r) = scan(mem, ebda, ebda + 1024)
        {
            return Ok(r);
        }
    }
    scan(mem, BIOS_AREA.0, BIOS_AREA.1).ok_or(AcpiError::RsdpNotFound)
}

fn scan(mem: &impl PhysRead, start: u64, end: u64) -> Option<Rsdp> {
    (start..end).step_by(16).find_map(|p| parse(mem, p).ok().flatten())
}

/// `Ok(None)` when there is no signature at `paddr`; an error when there is one but the rest is
/// invalid.
fn parse(mem: &impl PhysRead, paddr: u64) -> Result<Option<Rsdp>, AcpiError> {
    let mut v1 = [0u8; 20];
    mem.read_bytes(paddr, &mut v1)?;
    if &v1[..8] != SIGNATURE {
        return Ok(None);
    }
    let rsdp_sig = Signature(*b"RSDP");
    if v1.iter().fold(0u8, |a, b| a.wrapping_add(*b)) != 0 {
        return Err(AcpiError::BadChecksum { signature: rsdp_sig, paddr });
    }
    let revision = v1[15];
    let rsdt = u32::from_le_bytes([v1[16], v1[17], v1[18], v1[19]]);
    if revision < 2 {
        return Ok(Some(Rsdp { paddr, revision, rsdt, xsdt: None, len: 20 }));
    }
    let len = mem.read_u32(paddr + 20)?;
    if !(36..=4096).contains(&len) {
        return Err(AcpiError::BadLength { signature: rsdp_sig, paddr, len });
    }
    if crate::checksum(mem, paddr, len)? != 0 {
        return Err(AcpiError::BadChecksum { signature: rsdp_sig, paddr });
    }
    let xsdt = mem.read_u64(paddr + 24)?;
    Ok(Some(Rsdp { paddr, revision, rsdt, xsdt: (xsdt != 0).then_some(xsdt), len }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::fix;
    use conduit_mem::phys::FakePhys;

    pub fn rsdp_v0(rsdt: u32) -> std::vec::Vec<u8> {
        let mut r = std::vec::Vec::new();
        r.extend_from_slice(SIGNATURE);
        r.push(0);
        r.extend_from_slice(b"BOCHS ");
        r.push(0);
        r.extend_from_slice(&rsdt.to_le_bytes());
        fix(&mut r, 8, 20);
        r
    }

    pub fn rsdp_v2(rsdt: u32, xsdt: u64) -> std::vec::Vec<u8> {
        let mut r = rsdp_v0(rsdt);
        r[15] = 2;
        r.extend_from_slice(&36u32.to_le_bytes());
        r.extend_from_slice(&xsdt.to_le_bytes());
        r.extend_from_slice(&[0, 0, 0, 0]);
        fix(&mut r, 8, 20);
        fix(&mut r, 32, 36);
        r
    }

    #[test]
    fn found_at_hint_and_by_search() {
        let mut m = FakePhys::new();
        m.place(0xf5000, &rsdp_v0(0x7ffe_0000));
        let r = find_rsdp(&m, Some(0xf5000)).unwrap();
        assert_eq!((r.revision, r.rsdt, r.xsdt), (0, 0x7ffe_0000, None));
        // Search needs the whole BIOS area readable.
        let mut area = std::vec![0u8; 0x20000];
        area[0x15000..0x15014].copy_from_slice(&rsdp_v0(0x1234));
        let mut m = FakePhys::new();
        m.place(0xe0000, &area);
        assert_eq!(find_rsdp(&m, None).unwrap().paddr, 0xf5000);
    }

    #[test]
    fn ebda_is_searched_first() {
        let mut m = FakePhys::new();
        let mut low = std::vec![0u8; 0xa0000];
        low[0x40e..0x410].copy_from_slice(&0x9fc0u16.to_le_bytes());
        low[0x9fc40..0x9fc40 + 36].copy_from_slice(&rsdp_v2(1, 0x7fff_0000));
        m.place(0, &low);
        let r = find_rsdp(&m, None).unwrap();
        assert_eq!((r.paddr, r.xsdt), (0x9fc40, Some(0x7fff_0000)));
    }

    #[test]
    fn bad_checksums_and_lengths_are_errors() {
        let mut m = FakePhys::new();
        let mut bad = rsdp_v0(0x1000);
        bad[19] ^= 1;
        m.place(0x1000, &bad);
        assert!(matches!(find_rsdp(&m, Some(0x1000)), Err(AcpiError::BadChecksum { .. })));
        let mut v2 = rsdp_v2(1, 2);
        v2[20..24].copy_from_slice(&9000u32.to_le_bytes());
        fix(&mut v2, 8, 20);
        m.place(0x2000, &v2);
        assert!(matches!(find_rsdp(&m, Some(0x2000)), Err(AcpiError::BadLength { len: 9000, .. })));
        m.place(0x3000, &[0u8; 20]);
        assert_eq!(find_rsdp(&m, Some(0x3000)), Err(AcpiError::RsdpNotFound));
        assert!(matches!(find_rsdp(&m, Some(0x5000)), Err(AcpiError::Read(_))));
        // Nothing readable anywhere: not found, no panic.
        assert_eq!(find_rsdp(&FakePhys::new(), None), Err(AcpiError::RsdpNotFound));
    }
}
