//! The DMAR ACPI table (VT-d spec §8): remapping hardware units (DRHD) with their device
//! scopes, reserved memory regions (RMRR) and the host address width. Every structure length
//! is checked against the table; a malformed table is an error value, never a panic or a read
//! past its end. Device scopes are resolved to PCI addresses by walking the bridges they name.

use conduit_mem::{PhysRange, PhysRead, PhysReadError};
use conduit_pci::{ConfigSpace, PciAddress, regs as pci_regs};
use heapless::Vec;

/// Most DRHD units recorded.
pub const MAX_UNITS: usize = 8;
/// Most RMRRs recorded.
pub const MAX_RMRRS: usize = 16;
/// Most device scopes per structure.
pub const MAX_SCOPES: usize = 16;
/// Most path elements per device scope.
pub const MAX_PATH: usize = 8;

/// Offset of the first remapping structure (header 36 + width 1 + flags 1 + reserved 10).
const STRUCTURES_OFFSET: u32 = 48;

/// DMAR flags (VT-d §8.1).
pub mod flags {
    /// Interrupt remapping supported.
    pub const INTR_REMAP: u8 = 1 << 0;
    /// Firmware asks the OS not to use x2APIC mode for interrupt remapping.
    pub const X2APIC_OPT_OUT: u8 = 1 << 1;
    /// Platform opts in to DMA control (DMA protection during boot).
    pub const DMA_CTRL_PLATFORM_OPT_IN: u8 = 1 << 2;
}

/// What a device scope names (VT-d §8.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ScopeKind {
    /// A PCI endpoint.
    Endpoint,
    /// A PCI bridge and everything below it.
    Bridge,
    /// An I/O APIC.
    IoApic,
    /// An HPET (MSI-capable).
    Hpet,
    /// An ACPI namespace device.
    AcpiNamespace,
    /// Another type number.
    Other(u8),
}

impl ScopeKind {
    const fn from_raw(t: u8) -> Self {
        match t {
            1 => Self::Endpoint,
            2 => Self::Bridge,
            3 => Self::IoApic,
            4 => Self::Hpet,
            5 => Self::AcpiNamespace,
            x => Self::Other(x),
        }
    }
}

/// A device scope: a start bus and a path of (device, function) hops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceScope {
    /// Kind.
    pub kind: ScopeKind,
    /// I/O APIC ID or HPET number (for those kinds).
    pub enumeration_id: u8,
    /// Bus of the first hop.
    pub start_bus: u8,
    /// Hops: (device, function).
    pub path: Vec<(u8, u8), MAX_PATH>,
}

impl DeviceScope {
    /// Resolves the path to the function it names: each hop but the last is a bridge whose
    /// secondary bus the next hop lives on. `None` when a hop is absent or not a bridge.
    pub fn resolve(&self, cfg: &impl ConfigSpace, segment: u16) -> Option<PciAddress> {
        let mut bus = self.start_bus;
        let (last, hops) = self.path.split_last()?;
        for &(dev, func) in hops {
            let a = PciAddress::new(bus, dev, func).in_segment(segment);
            if cfg.read16(a, pci_regs::VENDOR_ID) == pci_regs::VENDOR_NONE
                || cfg.read8(a, pci_regs::HEADER_TYPE) & 0x7f != pci_regs::HEADER_TYPE_BRIDGE
            {
                return None;
            }
            bus = cfg.read8(a, pci_regs::BRIDGE_SECONDARY_BUS);
        }
        Some(PciAddress::new(bus, last.0, last.1).in_segment(segment))
    }
}

/// A DMA remapping hardware unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drhd {
    /// Register base.
    pub base: u64,
    /// Register set size in 4 KiB pages (2^size field).
    pub pages: u32,
    /// PCI segment.
    pub segment: u16,
    /// The unit covers every device of the segment not claimed by another unit.
    pub include_pci_all: bool,
    /// Explicit scopes.
    pub scopes: Vec<DeviceScope, MAX_SCOPES>,
}

/// A reserved memory region some devices use for DMA behind the OS's back (USB legacy, GPU
/// stolen memory). Devices in its scope are not assignable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rmrr {
    /// PCI segment.
    pub segment: u16,
    /// The region.
    pub range: PhysRange,
    /// Devices that use it.
    pub scopes: Vec<DeviceScope, MAX_SCOPES>,
}

/// Why the DMAR could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DmarError {
    /// Memory could not be read.
    Read(PhysReadError),
    /// Not a "DMAR" table, or shorter than its fixed part.
    BadTable,
    /// A structure at this offset has an impossible length or runs past the table end.
    Malformed(u32),
}

impl From<PhysReadError> for DmarError {
    fn from(e: PhysReadError) -> Self {
        Self::Read(e)
    }
}

/// The parsed DMAR.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dmar {
    /// Host address width (bits) DMA can address.
    pub host_address_width: u8,
    /// DMAR flags.
    pub flags: u8,
    /// Remapping units.
    pub units: Vec<Drhd, MAX_UNITS>,
    /// Reserved memory regions.
    pub rmrrs: Vec<Rmrr, MAX_RMRRS>,
    /// Structures of other types (ATSR, RHSA, ANDD, SATC…), skipped.
    pub skipped: u32,
    /// Units, RMRRs or scopes beyond capacity.
    pub dropped: u32,
}

fn scopes(
    mem: &impl PhysRead,
    at: u64,
    len: u32,
    base_off: u32,
    dropped: &mut u32,
) -> Result<Vec<DeviceScope, MAX_SCOPES>, DmarError> {
    let mut out = Vec::new();
    let mut off = 0u32;
    while off < len {
        if len - off < 6 {
            return Err(DmarError::Malformed(base_off + off));
        }
        let p = at + u64::from(off);
        let kind = mem.read_u8(p)?;
        let slen = u32::from(mem.read_u8(p + 1)?);
        if slen < 6 || slen > len - off || (slen - 6) % 2 != 0 {
            return Err(DmarError::Malformed(base_off + off));
        }
        off += slen;
        let hops = (slen - 6) / 2;
        if hops as usize > MAX_PATH {
            // Cut short, the path would name one of the bridges above the device instead of
            // the device: the whole scope is dropped (and counted), never kept truncated.
            *dropped += 1;
            continue;
        }
        let mut path = Vec::new();
        for i in 0..hops {
            let q = p + 6 + u64::from(2 * i);
            let _ = path.push((mem.read_u8(q)?, mem.read_u8(q + 1)?));
        }
        let s = DeviceScope {
            kind: ScopeKind::from_raw(kind),
            enumeration_id: mem.read_u8(p + 4)?,
            start_bus: mem.read_u8(p + 5)?,
            path,
        };
        if out.push(s).is_err() {
            *dropped += 1;
        }
    }
    Ok(out)
}

impl Dmar {
    /// Parses the DMAR at `paddr`, `len` bytes long (header and checksum already validated by
    /// the ACPI table directory).
    pub fn parse(mem: &impl PhysRead, paddr: u64, len: u32) -> Result<Self, DmarError> {
        let mut sig = [0u8; 4];
        mem.read_bytes(paddr, &mut sig)?;
        if &sig != b"DMAR" || len < STRUCTURES_OFFSET {
            return Err(DmarError::BadTable);
        }
        let mut d = Dmar {
            host_address_width: mem.read_u8(paddr + 36)?.saturating_add(1),
            flags: mem.read_u8(paddr + 37)?,
            ..Dmar::default()
        };
        let mut off = STRUCTURES_OFFSET;
        while off < len {
            if len - off < 4 {
                return Err(DmarError::Malformed(off));
            }
            let at = paddr + u64::from(off);
            let kind = mem.read_u16(at)?;
            let slen = u32::from(mem.read_u16(at + 2)?);
            if slen < 4 || slen > len - off {
                return Err(DmarError::Malformed(off));
            }
            match kind {
                0 => {
                    if slen < 16 {
                        return Err(DmarError::Malformed(off));
                    }
                    let unit = Drhd {
                        include_pci_all: mem.read_u8(at + 4)? & 1 != 0,
                        pages: 1u32 << (mem.read_u8(at + 5)? & 0xf),
                        segment: mem.read_u16(at + 6)?,
                        base: mem.read_u64(at + 8)?,
                        scopes: scopes(mem, at + 16, slen - 16, off + 16, &mut d.dropped)?,
                    };
                    if d.units.push(unit).is_err() {
                        d.dropped += 1;
                    }
                }
                1 => {
                    if slen < 24 {
                        return Err(DmarError::Malformed(off));
                    }
                    let base = mem.read_u64(at + 8)?;
                    let limit = mem.read_u64(at + 16)?;
                    if limit < base {
                        return Err(DmarError::Malformed(off));
                    }
                    let rmrr = Rmrr {
                        segment: mem.read_u16(at + 6)?,
                        range: PhysRange::new(base, limit.saturating_add(1)),
                        scopes: scopes(mem, at + 24, slen - 24, off + 24, &mut d.dropped)?,
                    };
                    if d.rmrrs.push(rmrr).is_err() {
                        d.dropped += 1;
                    }
                }
                _ => d.skipped += 1,
            }
            off += slen;
        }
        Ok(d)
    }

    /// The unit translating `dev`: the one whose scope names it (or a bridge above it),
    /// else the segment's INCLUDE_PCI_ALL unit. A bridge scope covers buses only when the
    /// bridge is present, is a bridge, and has bus numbers assigned (secondary above its own
    /// bus, subordinate not below secondary); otherwise it names at most itself.
    pub fn unit_for(&self, cfg: &impl ConfigSpace, dev: PciAddress) -> Option<usize> {
        let explicit = self.units.iter().position(|u| {
            u.segment == dev.segment
                && u.scopes.iter().any(|s| match (s.kind, s.resolve(cfg, u.segment)) {
                    (ScopeKind::Endpoint, Some(a)) => a == dev,
                    (ScopeKind::Bridge, Some(a)) => {
                        a == dev || bridge_buses(cfg, a).is_some_and(|b| b.contains(&dev.bus))
                    }
                    _ => false,
                })
        });
        explicit.or_else(|| self.units.iter().position(|u| u.segment == dev.segment && u.include_pci_all))
    }

    /// RMRRs whose scope names `dev`.
    pub fn rmrrs_for<'a>(&'a self, cfg: &'a impl ConfigSpace, dev: PciAddress) -> impl Iterator<Item = &'a Rmrr> + 'a {
        self.rmrrs.iter().filter(move |r| {
            r.segment == dev.segment && r.scopes.iter().any(|s| s.resolve(cfg, r.segment) == Some(dev))
        })
    }
}

/// The buses below the bridge at `a`, when it is a present bridge with bus numbers assigned.
fn bridge_buses(cfg: &impl ConfigSpace, a: PciAddress) -> Option<core::ops::RangeInclusive<u8>> {
    if cfg.read16(a, pci_regs::VENDOR_ID) == pci_regs::VENDOR_NONE
        || cfg.read8(a, pci_regs::HEADER_TYPE) & 0x7f != pci_regs::HEADER_TYPE_BRIDGE
    {
        return None;
    }
    let sec = cfg.read8(a, pci_regs::BRIDGE_SECONDARY_BUS);
    let sub = cfg.read8(a, pci_regs::BRIDGE_SUBORDINATE_BUS);
    (sec > a.bus && sub >= sec).then_some(sec..=sub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use conduit_mem::phys::FakePhys;
    use conduit_pci::fake::{FakeConfig, FakeFunction};

    fn header(len: u32, haw: u8, flags: u8) -> std::vec::Vec<u8> {
        let mut t = std::vec![0u8; 48];
        t[0..4].copy_from_slice(b"DMAR");
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t[36] = haw - 1;
        t[37] = flags;
        t
    }

    fn scope(kind: u8, id: u8, bus: u8, path: &[(u8, u8)]) -> std::vec::Vec<u8> {
        let mut s = std::vec![kind, (6 + 2 * path.len()) as u8, 0, 0, id, bus];
        for &(d, f) in path {
            s.extend_from_slice(&[d, f]);
        }
        s
    }

    fn drhd(flags: u8, base: u64, scopes: &[std::vec::Vec<u8>]) -> std::vec::Vec<u8> {
        let body: std::vec::Vec<u8> = scopes.concat();
        let mut s = std::vec::Vec::new();
        s.extend_from_slice(&0u16.to_le_bytes());
        s.extend_from_slice(&((16 + body.len()) as u16).to_le_bytes());
        s.extend_from_slice(&[flags, 0, 0, 0]);
        s.extend_from_slice(&base.to_le_bytes());
        s.extend_from_slice(&body);
        s
    }

    fn rmrr(base: u64, limit: u64, scopes: &[std::vec::Vec<u8>]) -> std::vec::Vec<u8> {
        let body: std::vec::Vec<u8> = scopes.concat();
        let mut s = std::vec::Vec::new();
        s.extend_from_slice(&1u16.to_le_bytes());
        s.extend_from_slice(&((24 + body.len()) as u16).to_le_bytes());
        s.extend_from_slice(&[0, 0, 0, 0]);
        s.extend_from_slice(&base.to_le_bytes());
        s.extend_from_slice(&limit.to_le_bytes());
        s.extend_from_slice(&body);
        s
    }

    fn table(structs: &[std::vec::Vec<u8>]) -> (FakePhys, u32) {
        let body: std::vec::Vec<u8> = structs.concat();
        let len = 48 + body.len() as u32;
        let mut t = header(len, 39, flags::INTR_REMAP);
        t.extend_from_slice(&body);
        let mut m = FakePhys::new();
        m.place(0x1000, &t);
        (m, len)
    }

    #[test]
    fn qemu_q35_with_intel_iommu() {
        // QEMU: one INCLUDE_PCI_ALL unit at 0xfed90000 with the I/O APIC in its scope.
        let (m, len) = table(&[drhd(1, 0xfed9_0000, &[scope(3, 0, 0xff, &[(0, 0)])])]);
        let d = Dmar::parse(&m, 0x1000, len).unwrap();
        assert_eq!(d.host_address_width, 39);
        assert_eq!(d.flags & flags::INTR_REMAP, flags::INTR_REMAP);
        assert_eq!(d.units.len(), 1);
        let u = &d.units[0];
        assert_eq!((u.base, u.include_pci_all, u.segment), (0xfed9_0000, true, 0));
        assert_eq!(u.scopes[0].kind, ScopeKind::IoApic);
        assert_eq!(u.scopes[0].start_bus, 0xff);
        let cfg = FakeConfig::new();
        assert_eq!(d.unit_for(&cfg, PciAddress::new(0, 2, 0)), Some(0));
    }

    #[test]
    fn explicit_scopes_bridges_and_rmrrs() {
        let cfg = FakeConfig::new();
        cfg.add(PciAddress::new(0, 0x1c, 0), FakeFunction::bridge(0x8086, 1, 0, 3, 4));
        cfg.add(PciAddress::new(3, 0, 0), FakeFunction::new(1, 2, 0, 256));
        let (m, len) = table(&[
            drhd(0, 0xfed9_1000, &[scope(1, 0, 0, &[(2, 0)]), scope(2, 0, 0, &[(0x1c, 0)])]),
            drhd(1, 0xfed9_0000, &[]),
            rmrr(0x7f00_0000, 0x7f0f_ffff, &[scope(1, 0, 0, &[(0x1c, 0), (0, 0)])]),
            std::vec![2, 0, 8, 0, 0, 0, 0, 0], // ATSR: skipped
        ]);
        let d = Dmar::parse(&m, 0x1000, len).unwrap();
        assert_eq!((d.units.len(), d.rmrrs.len(), d.skipped), (2, 1, 1));
        assert_eq!(d.unit_for(&cfg, PciAddress::new(0, 2, 0)), Some(0), "endpoint scope");
        assert_eq!(d.unit_for(&cfg, PciAddress::new(3, 0, 0)), Some(0), "below a scoped bridge");
        assert_eq!(d.unit_for(&cfg, PciAddress::new(0, 5, 0)), Some(1), "INCLUDE_PCI_ALL");
        assert_eq!(d.rmrrs[0].range, PhysRange::new(0x7f00_0000, 0x7f10_0000));
        assert_eq!(d.rmrrs[0].scopes[0].resolve(&cfg, 0), Some(PciAddress::new(3, 0, 0)), "path through the bridge");
        assert_eq!(d.rmrrs_for(&cfg, PciAddress::new(3, 0, 0)).count(), 1);
        assert_eq!(d.rmrrs_for(&cfg, PciAddress::new(0, 2, 0)).count(), 0);
    }

    #[test]
    fn bridge_scopes_without_bus_numbers_cover_nothing_below() {
        let cfg = FakeConfig::new();
        // A bridge firmware left unassigned (secondary = subordinate = 0) at 00:1c.0; nothing
        // at 00:1d.0 (reads all ones: bus range 0xff..=0xff).
        cfg.add(PciAddress::new(0, 0x1c, 0), FakeFunction::bridge(0x8086, 1, 0, 0, 0));
        cfg.add(PciAddress::new(0, 5, 0), FakeFunction::new(1, 2, 0, 256));
        let (m, len) = table(&[
            drhd(0, 0xfed9_1000, &[scope(2, 0, 0, &[(0x1c, 0)]), scope(2, 0, 0, &[(0x1d, 0)])]),
            drhd(1, 0xfed9_0000, &[]),
        ]);
        let d = Dmar::parse(&m, 0x1000, len).unwrap();
        assert_eq!(d.unit_for(&cfg, PciAddress::new(0, 5, 0)), Some(1), "bus 0 is not below an unassigned bridge");
        assert_eq!(d.unit_for(&cfg, PciAddress::new(0xff, 0, 0)), Some(1), "bus 255 is not below an absent bridge");
        assert_eq!(d.unit_for(&cfg, PciAddress::new(0, 0x1c, 0)), Some(0), "the bridge itself stays in scope");
        // An endpoint at a type 0 function named as a bridge covers nothing below either.
        let cfg = FakeConfig::new();
        let mut f = FakeFunction::new(1, 2, 0, 256);
        f.set8(pci_regs::BRIDGE_SECONDARY_BUS, 1).set8(pci_regs::BRIDGE_SUBORDINATE_BUS, 4);
        cfg.add(PciAddress::new(0, 0x1c, 0), f);
        assert_eq!(d.unit_for(&cfg, PciAddress::new(2, 0, 0)), Some(1));
    }

    #[test]
    fn scopes_with_paths_too_long_are_dropped_not_truncated() {
        let long: std::vec::Vec<(u8, u8)> = (0..=MAX_PATH as u8).map(|i| (i, 0)).collect();
        let fits: std::vec::Vec<(u8, u8)> = long[..MAX_PATH].to_vec();
        let (m, len) = table(&[
            drhd(0, 0xfed9_1000, &[scope(1, 0, 0, &long), scope(1, 0, 0, &fits)]),
            rmrr(0x7f00_0000, 0x7f0f_ffff, &[scope(1, 0, 0, &long)]),
        ]);
        let d = Dmar::parse(&m, 0x1000, len).unwrap();
        assert_eq!(d.units[0].scopes.len(), 1, "only the scope that fits is kept");
        assert_eq!(d.units[0].scopes[0].path.as_slice(), fits.as_slice());
        assert!(d.rmrrs[0].scopes.is_empty());
        assert_eq!(d.dropped, 2);
    }

    #[test]
    fn malformed_tables_are_errors() {
        let (m, len) = table(&[std::vec![0, 0, 3, 0]]);
        assert_eq!(Dmar::parse(&m, 0x1000, len), Err(DmarError::Malformed(48)));
        let (m, len) = table(&[std::vec![0, 0, 200, 0, 0, 0, 0, 0]]);
        assert_eq!(Dmar::parse(&m, 0x1000, len), Err(DmarError::Malformed(48)));
        let mut bad_scope = drhd(1, 0, &[scope(1, 0, 0, &[(2, 0)])]);
        bad_scope[17] = 40; // scope length past the structure
        let (m, len) = table(&[bad_scope]);
        assert_eq!(Dmar::parse(&m, 0x1000, len), Err(DmarError::Malformed(64)));
        let (m, len) = table(&[rmrr(0x2000, 0x1000, &[])]);
        assert_eq!(Dmar::parse(&m, 0x1000, len), Err(DmarError::Malformed(48)));
        let mut m = FakePhys::new();
        m.place(0x1000, b"APIC");
        assert_eq!(Dmar::parse(&m, 0x1000, 60), Err(DmarError::BadTable));
    }

    /// Memory holding a table at `start` (`len` bytes) followed by more readable bytes, where
    /// any read beyond the table fails the test on the spot: a parser bug that reads past
    /// the table cannot hide as an `Err(Read)` (or as a successful read of the bytes after).
    struct Bounded {
        mem: FakePhys,
        start: u64,
        len: u32,
    }

    impl PhysRead for Bounded {
        fn read_bytes(&self, paddr: u64, buf: &mut [u8]) -> Result<(), PhysReadError> {
            let end = paddr + buf.len() as u64;
            assert!(
                paddr >= self.start && end <= self.start + u64::from(self.len),
                "read of {:#x}..{end:#x} outside the table {:#x}..{:#x}",
                paddr,
                self.start,
                self.start + u64::from(self.len)
            );
            self.mem.read_bytes(paddr, buf)
        }
    }

    #[test]
    fn the_bounded_reader_catches_reads_past_the_table() {
        let (m, len) = table(&[]);
        let r = Bounded { mem: m, start: 0x1000, len };
        assert!(r.read_u8(0x1000 + u64::from(len) - 1).is_ok());
        let past = std::panic::catch_unwind(|| r.read_u8(0x1000 + u64::from(len)));
        assert!(past.is_err(), "a read past the end fails loudly");
    }

    /// A device scope whose declared length is off by `delta` from its real one.
    fn scope_strategy() -> impl proptest::strategy::Strategy<Value = std::vec::Vec<u8>> {
        use proptest::prelude::*;
        let delta = prop_oneof![Just(0i32), Just(2), Just(-2), -4i32..4];
        (0u8..7, any::<u8>(), proptest::collection::vec(any::<(u8, u8)>(), 0..12), delta).prop_map(
            |(kind, bus, path, delta)| {
                let mut s = scope(kind, 0, bus, &path);
                s[1] = (i32::from(s[1]) + delta).clamp(0, 255) as u8;
                s
            },
        )
    }

    /// A DRHD, RMRR, ATSR or other structure with random fields and scopes, its declared
    /// length off by `delta` from its real one (so it may run past the table or cut its
    /// scopes short).
    fn structure_strategy() -> impl proptest::strategy::Strategy<Value = std::vec::Vec<u8>> {
        use proptest::prelude::*;
        let delta = prop_oneof![Just(0i32), -24i32..24];
        (0u16..5, proptest::collection::vec(any::<u8>(), 20), proptest::collection::vec(scope_strategy(), 0..4), delta)
            .prop_map(|(kind, fixed, scopes, delta)| {
                let fixed_len = match kind {
                    0 => 16,
                    1 => 24,
                    _ => 8,
                };
                let mut s = std::vec::Vec::new();
                s.extend_from_slice(&kind.to_le_bytes());
                s.extend_from_slice(&[0, 0]);
                s.extend_from_slice(&fixed[..fixed_len - 4]);
                s.extend_from_slice(&scopes.concat());
                let len = (s.len() as i32 + delta).clamp(0, 0xffff) as u16;
                s[2..4].copy_from_slice(&len.to_le_bytes());
                s
            })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        /// Arbitrary tables never panic and never read outside the table: reads are served
        /// from memory that goes on after the table, but any read beyond its length fails the
        /// test, and the parser never reports a read error for a table it was told the
        /// length of. Half the inputs are raw bytes, half are structures and scopes with
        /// plausible shapes and wrong lengths (raw bytes alone rarely reach the scope parser).
        #[test]
        fn arbitrary_structures_never_panic(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            structured in proptest::collection::vec(structure_strategy(), 0..5),
            use_raw in proptest::prelude::any::<bool>(),
            cut in proptest::prop_oneof![3 => proptest::prelude::Just(0usize), 1 => 1usize..4],
        ) {
            let mut body = if use_raw { raw } else { structured.concat() };
            body.truncate(body.len().saturating_sub(cut));
            let (m, len) = table(&[body]);
            let mut bytes = std::vec![0u8; len as usize];
            m.read_bytes(0x1000, &mut bytes).unwrap();
            bytes.extend_from_slice(&[0xaa; 1024]);
            let mut mem = FakePhys::new();
            mem.place(0x1000, &bytes);
            let r = Dmar::parse(&Bounded { mem, start: 0x1000, len }, 0x1000, len);
            proptest::prop_assert!(!matches!(r, Err(DmarError::Read(_))), "{:?}", r);
        }
    }
}
