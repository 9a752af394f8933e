//! ACPI tables, read through [`PhysRead`] and never trusted: every length is bounded, every
//! checksum verified, every read checked. A malformed or truncated table is an error value,
//! never a panic and never a read outside what the table claims (ACPI 6.5, chapter 5).
//!
//! Covered here: the RSDP (from the boot record or the BIOS areas), RSDT/XSDT, the FADT's
//! pointers to the DSDT and FACS (so their memory is kept), the MADT and the MCFG. The DMAR
//! (VT-d) is located by signature; its parser belongs to the IOMMU driver.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod madt;
pub mod mcfg;
mod rsdp;
mod tables;

pub use madt::Madt;
pub use mcfg::{EcamWindow, Mcfg};
pub use rsdp::{Rsdp, find_rsdp};
pub use tables::{MAX_TABLES, TableRef, Tables};

use conduit_mem::{PhysRead, PhysReadError};

/// Length of the standard table header (ACPI 6.5 §5.2.6).
pub const HEADER_LEN: u32 = 36;
/// Longest table accepted (a DSDT of a large server is well below this).
pub const MAX_TABLE_LEN: u32 = 16 << 20;

/// A four-character table signature.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 4]);

impl Signature {
    /// "APIC": the MADT.
    pub const MADT: Self = Self(*b"APIC");
    /// "FACP": the FADT.
    pub const FADT: Self = Self(*b"FACP");
    /// "DSDT".
    pub const DSDT: Self = Self(*b"DSDT");
    /// "FACS".
    pub const FACS: Self = Self(*b"FACS");
    /// "MCFG": PCI Express ECAM.
    pub const MCFG: Self = Self(*b"MCFG");
    /// "DMAR": Intel VT-d.
    pub const DMAR: Self = Self(*b"DMAR");
    /// "RSDT".
    pub const RSDT: Self = Self(*b"RSDT");
    /// "XSDT".
    pub const XSDT: Self = Self(*b"XSDT");

    /// The signature as text ("????" if it is not printable ASCII).
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.0) {
            Ok(s) if self.0.iter().all(|b| b.is_ascii_graphic() || *b == b' ') => s,
            _ => "????",
        }
    }
}

impl core::fmt::Debug for Signature {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.as_str())
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Signature {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "{=str}", self.as_str())
    }
}

/// Why a table could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AcpiError {
    /// Memory the reader cannot reach.
    Read(PhysReadError),
    /// No valid RSDP at the given address or in the BIOS areas.
    RsdpNotFound,
    /// The table at `paddr` does not carry the expected signature.
    BadSignature {
        /// Where.
        paddr: u64,
        /// What was expected.
        expected: Signature,
        /// What was found.
        found: Signature,
    },
    /// Bytes do not sum to zero.
    BadChecksum {
        /// Which table.
        signature: Signature,
        /// Where.
        paddr: u64,
    },
    /// The length field is shorter than the structure or longer than `MAX_TABLE_LEN`.
    BadLength {
        /// Which table.
        signature: Signature,
        /// Where.
        paddr: u64,
        /// The length claimed.
        len: u32,
    },
    /// A structure inside the table runs past its end or has an impossible length.
    Malformed {
        /// Which table.
        signature: Signature,
        /// Offset inside the table.
        offset: u32,
    },
}

impl From<PhysReadError> for AcpiError {
    fn from(e: PhysReadError) -> Self {
        Self::Read(e)
    }
}

/// Sums `len` bytes at `paddr` modulo 256, reading in small chunks.
fn checksum(mem: &impl PhysRead, paddr: u64, len: u32) -> Result<u8, AcpiError> {
    let mut sum = 0u8;
    let mut buf = [0u8; 256];
    let mut off = 0u32;
    while off < len {
        let n = (len - off).min(buf.len() as u32);
        let chunk = &mut buf[..n as usize];
        let at = paddr.checked_add(u64::from(off)).ok_or(PhysReadError { paddr, len: len as usize })?;
        mem.read_bytes(at, chunk)?;
        sum = chunk.iter().fold(sum, |s, b| s.wrapping_add(*b));
        off += n;
    }
    Ok(sum)
}

/// Reads a standard header at `paddr` and checks signature (if given), length bounds and
/// checksum. Returns the signature and length.
fn read_header(mem: &impl PhysRead, paddr: u64, expected: Option<Signature>) -> Result<(Signature, u32), AcpiError> {
    let mut sig = [0u8; 4];
    mem.read_bytes(paddr, &mut sig)?;
    let signature = Signature(sig);
    if let Some(expected) = expected
        && expected != signature
    {
        return Err(AcpiError::BadSignature { paddr, expected, found: signature });
    }
    let len = mem.read_u32(paddr + 4)?;
    if !(HEADER_LEN..=MAX_TABLE_LEN).contains(&len) {
        return Err(AcpiError::BadLength { signature, paddr, len });
    }
    if checksum(mem, paddr, len)? != 0 {
        return Err(AcpiError::BadChecksum { signature, paddr });
    }
    Ok((signature, len))
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Builders for well-formed tables with correct checksums.

    /// A table with a standard header, `body` after it and a fixed checksum.
    pub fn table(sig: &[u8; 4], revision: u8, body: &[u8]) -> std::vec::Vec<u8> {
        let mut t = std::vec::Vec::new();
        t.extend_from_slice(sig);
        t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
        t.push(revision);
        t.push(0); // checksum
        t.extend_from_slice(b"CONDUI");
        t.extend_from_slice(b"TESTTABL");
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(b"CNDT");
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(body);
        let len = t.len();
        fix(&mut t, 9, len);
        t
    }

    /// Sets byte `at` so the first `len` bytes sum to zero.
    pub fn fix(t: &mut [u8], at: usize, len: usize) {
        t[at] = 0;
        let s = t[..len].iter().fold(0u8, |a, b| a.wrapping_add(*b));
        t[at] = 0u8.wrapping_sub(s);
    }
}
