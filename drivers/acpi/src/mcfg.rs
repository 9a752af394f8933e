//! The MCFG table (PCI Firmware Specification 3.3 §4.1.2): one ECAM window per PCI segment
//! group and bus range.

use crate::{AcpiError, HEADER_LEN, Signature, TableRef};
use conduit_mem::PhysRead;
use heapless::Vec;

/// Most ECAM windows recorded.
pub const MAX_WINDOWS: usize = 16;
/// Offset of the first allocation entry (header + 8 reserved bytes).
const ENTRIES_OFFSET: u32 = HEADER_LEN + 8;
/// Bytes per allocation entry.
const ENTRY_LEN: u32 = 16;

/// One ECAM window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct EcamWindow {
    /// Physical address of the window (the address of bus 0's config space, even when
    /// `start_bus` is not 0).
    pub base: u64,
    /// PCI segment group.
    pub segment: u16,
    /// First bus decoded.
    pub start_bus: u8,
    /// Last bus decoded.
    pub end_bus: u8,
}

impl EcamWindow {
    /// Bytes of config space the window decodes (1 MiB per bus).
    pub fn len_bytes(&self) -> u64 {
        (u64::from(self.end_bus) - u64::from(self.start_bus) + 1) << 20
    }

    /// Physical address of the first decoded bus.
    pub fn start(&self) -> u64 {
        self.base + (u64::from(self.start_bus) << 20)
    }
}

/// The parsed MCFG.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mcfg {
    /// Windows, in table order.
    pub windows: Vec<EcamWindow, MAX_WINDOWS>,
    /// Entries beyond `MAX_WINDOWS`.
    pub dropped: u32,
}

impl Mcfg {
    /// Parses the MCFG `table` (checksum already verified by [`crate::Tables`]).
    pub fn parse(mem: &impl PhysRead, table: TableRef) -> Result<Self, AcpiError> {
        let sig = Signature::MCFG;
        if table.signature != sig {
            return Err(AcpiError::BadSignature { paddr: table.paddr, expected: sig, found: table.signature });
        }
        if table.len < ENTRIES_OFFSET || !(table.len - ENTRIES_OFFSET).is_multiple_of(ENTRY_LEN) {
            return Err(AcpiError::BadLength { signature: sig, paddr: table.paddr, len: table.len });
        }
        let mut out = Mcfg::default();
        let count = (table.len - ENTRIES_OFFSET) / ENTRY_LEN;
        for i in 0..count {
            let off = ENTRIES_OFFSET + i * ENTRY_LEN;
            let at = table.paddr + u64::from(off);
            let w = EcamWindow {
                base: mem.read_u64(at)?,
                segment: mem.read_u16(at + 8)?,
                start_bus: mem.read_u8(at + 10)?,
                end_bus: mem.read_u8(at + 11)?,
            };
            if w.end_bus < w.start_bus || !w.base.is_multiple_of(1 << 20) || w.base.checked_add(256 << 20).is_none() {
                return Err(AcpiError::Malformed { signature: sig, offset: off });
            }
            if out.windows.push(w).is_err() {
                out.dropped += 1;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::table;
    use conduit_mem::phys::FakePhys;

    fn mcfg(entries: &[(u64, u16, u8, u8)]) -> (FakePhys, TableRef) {
        let mut body = std::vec![0u8; 8];
        for &(base, seg, s, e) in entries {
            body.extend_from_slice(&base.to_le_bytes());
            body.extend_from_slice(&seg.to_le_bytes());
            body.extend_from_slice(&[s, e, 0, 0, 0, 0]);
        }
        let t = table(b"MCFG", 1, &body);
        let mut m = FakePhys::new();
        m.place(0x2000, &t);
        (m, TableRef { signature: Signature::MCFG, paddr: 0x2000, len: t.len() as u32 })
    }

    #[test]
    fn q35_window() {
        let (m, t) = mcfg(&[(0xb000_0000, 0, 0, 255)]);
        let c = Mcfg::parse(&m, t).unwrap();
        assert_eq!(c.windows.as_slice(), &[EcamWindow { base: 0xb000_0000, segment: 0, start_bus: 0, end_bus: 255 }]);
        assert_eq!(c.windows[0].len_bytes(), 256 << 20);
    }

    #[test]
    fn two_segments_and_bad_entries() {
        let (m, t) = mcfg(&[(0xb000_0000, 0, 0, 63), (0x8_0000_0000, 1, 16, 31)]);
        let c = Mcfg::parse(&m, t).unwrap();
        assert_eq!(c.windows[1].start(), 0x8_0000_0000 + (16 << 20));
        assert_eq!(c.windows[1].len_bytes(), 16 << 20);
        let (m, t) = mcfg(&[(0xb000_0000, 0, 9, 3)]);
        assert!(matches!(Mcfg::parse(&m, t), Err(AcpiError::Malformed { offset: 44, .. })));
        let (m, t) = mcfg(&[(0xb000_1000, 0, 0, 3)]);
        assert!(matches!(Mcfg::parse(&m, t), Err(AcpiError::Malformed { .. })));
        let (m, mut t) = mcfg(&[]);
        t.len = 50;
        assert!(matches!(Mcfg::parse(&m, t), Err(AcpiError::BadLength { .. })));
    }
}
