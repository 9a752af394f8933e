//! The MADT ("APIC", ACPI 6.5 §5.2.12): local APIC address, processors, I/O APICs and
//! interrupt source overrides. Entries are walked with bounds: an entry whose length is below
//! two bytes or that runs past the table end stops the walk with an error.

use crate::{AcpiError, HEADER_LEN, Signature, TableRef};
use conduit_mem::PhysRead;
use heapless::Vec;

/// Most processors recorded.
pub const MAX_CPUS: usize = 64;
/// Most I/O APICs recorded.
pub const MAX_IOAPICS: usize = 8;
/// Most interrupt source overrides recorded.
pub const MAX_OVERRIDES: usize = 24;

/// A processor (Processor Local APIC or Local x2APIC structure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Cpu {
    /// ACPI processor UID.
    pub uid: u32,
    /// Local APIC ID.
    pub apic_id: u32,
    /// Usable now (flags bit 0).
    pub enabled: bool,
    /// Can be brought online later (flags bit 1).
    pub online_capable: bool,
}

/// An I/O APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IoApic {
    /// I/O APIC ID.
    pub id: u8,
    /// Register base.
    pub paddr: u64,
    /// First global system interrupt it serves.
    pub gsi_base: u32,
}

/// A legacy IRQ routed to another GSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Override {
    /// ISA IRQ.
    pub source: u8,
    /// GSI it arrives on.
    pub gsi: u32,
    /// MPS INTI flags (polarity, trigger mode).
    pub flags: u16,
}

/// The parsed MADT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Madt {
    /// Local APIC physical address (after any address override).
    pub local_apic_paddr: u64,
    /// Dual 8259 PICs present (flags bit 0).
    pub pcat_compat: bool,
    /// Processors, in table order.
    pub cpus: Vec<Cpu, MAX_CPUS>,
    /// I/O APICs.
    pub ioapics: Vec<IoApic, MAX_IOAPICS>,
    /// Interrupt source overrides.
    pub overrides: Vec<Override, MAX_OVERRIDES>,
    /// Entries of known kinds beyond the capacities above.
    pub dropped: u32,
    /// Entries of kinds not interpreted here.
    pub skipped: u32,
}

impl Madt {
    /// Parses the MADT `table` (already checksum-verified by [`crate::Tables`]).
    pub fn parse(mem: &impl PhysRead, table: TableRef) -> Result<Self, AcpiError> {
        let sig = Signature::MADT;
        if table.signature != sig {
            return Err(AcpiError::BadSignature { paddr: table.paddr, expected: sig, found: table.signature });
        }
        if table.len < HEADER_LEN + 8 {
            return Err(AcpiError::BadLength { signature: sig, paddr: table.paddr, len: table.len });
        }
        let base = table.paddr;
        let mut madt = Madt {
            local_apic_paddr: u64::from(mem.read_u32(base + 36)?),
            pcat_compat: mem.read_u32(base + 40)? & 1 != 0,
            cpus: Vec::new(),
            ioapics: Vec::new(),
            overrides: Vec::new(),
            dropped: 0,
            skipped: 0,
        };
        let mut off = HEADER_LEN + 8;
        while off < table.len {
            let malformed = AcpiError::Malformed { signature: sig, offset: off };
            if table.len - off < 2 {
                return Err(malformed);
            }
            let at = base + u64::from(off);
            let kind = mem.read_u8(at)?;
            let len = u32::from(mem.read_u8(at + 1)?);
            if len < 2 || len > table.len - off {
                return Err(malformed);
            }
            let need = |min: u32| if len < min { Err(malformed) } else { Ok(()) };
            let pushed = match kind {
                0 => {
                    need(8)?;
                    let flags = mem.read_u32(at + 4)?;
                    madt.cpus
                        .push(Cpu {
                            uid: u32::from(mem.read_u8(at + 2)?),
                            apic_id: u32::from(mem.read_u8(at + 3)?),
                            enabled: flags & 1 != 0,
                            online_capable: flags & 2 != 0,
                        })
                        .is_ok()
                }
                1 => {
                    need(12)?;
                    madt.ioapics
                        .push(IoApic {
                            id: mem.read_u8(at + 2)?,
                            paddr: u64::from(mem.read_u32(at + 4)?),
                            gsi_base: mem.read_u32(at + 8)?,
                        })
                        .is_ok()
                }
                2 => {
                    need(10)?;
                    madt.overrides
                        .push(Override {
                            source: mem.read_u8(at + 3)?,
                            gsi: mem.read_u32(at + 4)?,
                            flags: mem.read_u16(at + 8)?,
                        })
                        .is_ok()
                }
                5 => {
                    need(12)?;
                    madt.local_apic_paddr = mem.read_u64(at + 4)?;
                    true
                }
                9 => {
                    need(16)?;
                    let flags = mem.read_u32(at + 8)?;
                    madt.cpus
                        .push(Cpu {
                            uid: mem.read_u32(at + 12)?,
                            apic_id: mem.read_u32(at + 4)?,
                            enabled: flags & 1 != 0,
                            online_capable: flags & 2 != 0,
                        })
                        .is_ok()
                }
                _ => {
                    madt.skipped += 1;
                    true
                }
            };
            if !pushed {
                madt.dropped += 1;
            }
            off += len;
        }
        Ok(madt)
    }

    /// Processors that are enabled now.
    pub fn enabled_cpus(&self) -> impl Iterator<Item = Cpu> + '_ {
        self.cpus.iter().copied().filter(|c| c.enabled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::table;
    use conduit_mem::phys::FakePhys;
    use proptest::prelude::*;

    fn madt_body(entries: &[&[u8]]) -> std::vec::Vec<u8> {
        let mut b = std::vec::Vec::new();
        b.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        for e in entries {
            b.extend_from_slice(e);
        }
        b
    }

    fn place(entries: &[&[u8]]) -> (FakePhys, TableRef) {
        let t = table(b"APIC", 3, &madt_body(entries));
        let mut m = FakePhys::new();
        m.place(0x1000, &t);
        (m, TableRef { signature: Signature::MADT, paddr: 0x1000, len: t.len() as u32 })
    }

    #[test]
    fn q35_two_cpus() {
        let (m, t) = place(&[
            &[0, 8, 0, 0, 1, 0, 0, 0],
            &[0, 8, 1, 1, 1, 0, 0, 0],
            &[0, 8, 2, 2, 2, 0, 0, 0], // online-capable only
            &[1, 12, 0, 0, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0],
            &[2, 10, 0, 0, 2, 0, 0, 0, 0, 0],
            &[4, 6, 0xff, 0, 0, 1],
        ]);
        let madt = Madt::parse(&m, t).unwrap();
        assert_eq!(madt.local_apic_paddr, 0xfee0_0000);
        assert!(madt.pcat_compat);
        assert_eq!(madt.cpus.len(), 3);
        assert_eq!(madt.enabled_cpus().map(|c| c.apic_id).collect::<std::vec::Vec<_>>(), [0, 1]);
        assert!(madt.cpus[2].online_capable);
        assert_eq!(madt.ioapics[0], IoApic { id: 0, paddr: 0xfec0_0000, gsi_base: 0 });
        assert_eq!(madt.overrides[0], Override { source: 0, gsi: 2, flags: 0 });
        assert_eq!(madt.skipped, 1);
    }

    #[test]
    fn x2apic_and_address_override() {
        let (m, t) = place(&[
            &[9, 16, 0, 0, 0x00, 0x01, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0],
            &[5, 12, 0, 0, 0, 0, 0xe0, 0xfe, 1, 0, 0, 0],
        ]);
        let madt = Madt::parse(&m, t).unwrap();
        assert_eq!(madt.cpus[0], Cpu { uid: 7, apic_id: 0x100, enabled: true, online_capable: false });
        assert_eq!(madt.local_apic_paddr, 0x1_fee0_0000);
    }

    #[test]
    fn malformed_entries_stop_with_an_error() {
        let (m, t) = place(&[&[0, 0, 0, 0]]);
        assert_eq!(Madt::parse(&m, t), Err(AcpiError::Malformed { signature: Signature::MADT, offset: 44 }));
        let (m, t) = place(&[&[0, 40, 0, 0, 1, 0, 0, 0]]);
        assert!(matches!(Madt::parse(&m, t), Err(AcpiError::Malformed { .. })));
        let (m, t) = place(&[&[1, 4, 0, 0]]); // I/O APIC entry too short
        assert!(matches!(Madt::parse(&m, t), Err(AcpiError::Malformed { .. })));
        let (m, t) = place(&[&[7]]);
        assert!(matches!(Madt::parse(&m, t), Err(AcpiError::Malformed { .. })));
    }

    proptest! {
        /// Arbitrary entry bytes never panic, never loop and never read past the table.
        #[test]
        fn arbitrary_entries_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let t = table(b"APIC", 3, &madt_body(&[&bytes]));
            let mut m = FakePhys::new();
            m.place(0x1000, &t);
            let r = TableRef { signature: Signature::MADT, paddr: 0x1000, len: t.len() as u32 };
            let _ = Madt::parse(&m, r);
        }
    }
}
