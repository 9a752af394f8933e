//! The firmware memory map (e820 / PVH / Multiboot2) made consistent: sorted, non-overlapping,
//! merged, with a fixed rule for overlaps (any kind of reserved memory wins over usable RAM),
//! and the list of page-aligned ranges the frame allocator may manage.

use crate::range::{PhysRange, subtract_all};
use crate::{LOW_MEMORY_END, PAGE_SIZE};
use heapless::Vec;

/// Most raw entries accepted from firmware. More is an error, never a silent truncation:
/// dropping a reserved entry would let the allocator hand out reserved memory.
pub const MAX_RAW_REGIONS: usize = 128;
/// Most regions in a normalized map (n raw entries give at most 2n - 1 pieces).
pub const MAX_REGIONS: usize = 2 * MAX_RAW_REGIONS;
/// Most exclusions `MemoryMap::allocatable` accepts.
pub const MAX_EXCLUSIONS: usize = 127;

/// What a range of physical memory is, in e820 terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MemoryKind {
    /// RAM the OS may use (e820 type 1).
    Usable,
    /// Reserved by firmware or a device hole (type 2).
    Reserved,
    /// ACPI tables, reclaimable after they are read (type 3). Conduit keeps them.
    AcpiReclaimable,
    /// ACPI non-volatile storage (type 4).
    AcpiNvs,
    /// Memory reported bad (type 5).
    Unusable,
    /// Persistent memory (type 7).
    Persistent,
    /// Any other type number; treated as reserved.
    Other(u32),
}

impl MemoryKind {
    /// Maps an e820 type number (ACPI spec, "Address Range Types").
    pub const fn from_e820(kind: u32) -> Self {
        match kind {
            1 => Self::Usable,
            2 => Self::Reserved,
            3 => Self::AcpiReclaimable,
            4 => Self::AcpiNvs,
            5 => Self::Unusable,
            7 => Self::Persistent,
            other => Self::Other(other),
        }
    }

    /// Which kind wins where entries overlap: the more restrictive one.
    const fn precedence(self) -> u8 {
        match self {
            Self::Usable => 0,
            Self::AcpiReclaimable => 1,
            Self::AcpiNvs => 2,
            Self::Persistent => 3,
            Self::Other(_) => 4,
            Self::Reserved => 5,
            Self::Unusable => 6,
        }
    }

    /// Short name for logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Usable => "usable",
            Self::Reserved => "reserved",
            Self::AcpiReclaimable => "acpi-reclaim",
            Self::AcpiNvs => "acpi-nvs",
            Self::Unusable => "unusable",
            Self::Persistent => "persistent",
            Self::Other(_) => "other",
        }
    }
}

/// One entry exactly as firmware gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RawRegion {
    /// First byte.
    pub base: u64,
    /// Length in bytes (may be zero, may overflow the address space).
    pub len: u64,
    /// Kind.
    pub kind: MemoryKind,
}

/// One region of a normalized map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Region {
    /// The bytes.
    pub range: PhysRange,
    /// What they are.
    pub kind: MemoryKind,
}

/// Why a memory map could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MapError {
    /// Firmware gave more entries than Conduit accepts.
    TooManyEntries {
        /// Entries given.
        given: usize,
        /// Entries accepted.
        max: usize,
    },
    /// Carving out exclusions split the usable memory into too many pieces.
    TooFragmented,
    /// The map holds no usable RAM above 1 MiB.
    NoUsableMemory,
}

/// Counts of firmware entries that needed repair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Repairs {
    /// Entries of length zero, ignored.
    pub zero_length: u32,
    /// Entries running past the top of the address space, clamped.
    pub clamped: u32,
    /// Entries overlapping another entry (resolved by precedence).
    pub overlapping: u32,
    /// True when entries were not in ascending order.
    pub unsorted: bool,
}

/// A sorted, non-overlapping, merged memory map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryMap {
    regions: Vec<Region, MAX_REGIONS>,
    repairs: Repairs,
}

impl MemoryMap {
    /// Builds the consistent map from raw firmware entries in any order.
    ///
    /// Overlaps are resolved per byte: the most restrictive kind covering a byte wins
    /// (unusable > reserved > other > persistent > ACPI NVS > ACPI reclaimable > usable).
    /// Zero-length entries are ignored; entries past the top of the address space are clamped.
    pub fn normalize(raw: &[RawRegion]) -> Result<Self, MapError> {
        if raw.len() > MAX_RAW_REGIONS {
            return Err(MapError::TooManyEntries { given: raw.len(), max: MAX_RAW_REGIONS });
        }
        let mut repairs = Repairs::default();
        let mut entries: Vec<Region, MAX_RAW_REGIONS> = Vec::new();
        let mut previous_start = 0u64;
        for r in raw {
            if r.base < previous_start {
                repairs.unsorted = true;
            }
            previous_start = r.base;
            if r.len == 0 {
                repairs.zero_length += 1;
                continue;
            }
            let (range, clamped) = PhysRange::from_base_len(r.base, r.len);
            if clamped {
                repairs.clamped += 1;
            }
            if range.is_empty() {
                repairs.zero_length += 1;
                continue;
            }
            // Cannot fail: at most MAX_RAW_REGIONS entries were checked above.
            let _ = entries.push(Region { range, kind: r.kind });
        }
        for (i, a) in entries.iter().enumerate() {
            if entries[i + 1..].iter().any(|b| a.range.overlaps(&b.range)) {
                repairs.overlapping += 1;
            }
        }

        // Every start and end is a boundary; between two neighbouring boundaries the kind is
        // constant.
        let mut points: Vec<u64, { 2 * MAX_RAW_REGIONS }> = Vec::new();
        for e in &entries {
            let _ = points.push(e.range.start);
            let _ = points.push(e.range.end);
        }
        points.sort_unstable();
        let mut regions: Vec<Region, MAX_REGIONS> = Vec::new();
        let mut prev: Option<u64> = None;
        for &p in &points {
            let Some(a) = prev.replace(p) else { continue };
            if a == p {
                continue;
            }
            let piece = PhysRange::new(a, p);
            let kind = entries.iter().filter(|e| e.range.covers(&piece)).map(|e| e.kind).max_by_key(|k| k.precedence());
            let Some(kind) = kind else { continue };
            match regions.last_mut() {
                Some(last) if last.kind == kind && last.range.end == a => last.range.end = p,
                // Cannot fail: n entries give at most 2n - 1 pieces.
                _ => {
                    let _ = regions.push(Region { range: piece, kind });
                }
            }
        }
        Ok(Self { regions, repairs })
    }

    /// The regions, ascending.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// What had to be repaired in the firmware's entries.
    pub fn repairs(&self) -> Repairs {
        self.repairs
    }

    /// Total bytes of usable RAM.
    pub fn usable_bytes(&self) -> u64 {
        self.regions.iter().filter(|r| r.kind == MemoryKind::Usable).map(|r| r.range.len()).sum()
    }

    /// The kind of memory at `addr`, or `None` in a hole the map does not describe.
    pub fn kind_at(&self, addr: u64) -> Option<MemoryKind> {
        self.regions.iter().find(|r| r.range.contains(addr)).map(|r| r.kind)
    }

    /// Highest address covered by any region (exclusive).
    pub fn end(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.range.end)
    }

    /// Page-aligned usable RAM the frame allocator may manage: usable regions shrunk to whole
    /// pages, without the first megabyte, and without every `exclusion` (each grown to whole
    /// pages). Exclusions name what lives in RAM and must never be handed out: the image, boot
    /// structures, ACPI tables, the AP trampoline.
    pub fn allocatable(&self, exclusions: &[PhysRange]) -> Result<Vec<PhysRange, MAX_REGIONS>, MapError> {
        let mut usable: Vec<PhysRange, MAX_REGIONS> = Vec::new();
        for r in self.regions.iter().filter(|r| r.kind == MemoryKind::Usable) {
            let aligned = r.range.align_inward(PAGE_SIZE);
            if !aligned.is_empty() {
                let _ = usable.push(aligned);
            }
        }
        let mut holes: Vec<PhysRange, { MAX_EXCLUSIONS + 1 }> = Vec::new();
        holes.push(PhysRange::new(0, LOW_MEMORY_END)).map_err(|_| MapError::TooFragmented)?;
        for e in exclusions {
            holes.push(e.align_outward(PAGE_SIZE)).map_err(|_| MapError::TooFragmented)?;
        }
        let out = subtract_all::<MAX_REGIONS>(&usable, &holes).map_err(|_| MapError::TooFragmented)?;
        if out.is_empty() {
            return Err(MapError::NoUsableMemory);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw(base: u64, len: u64, kind: u32) -> RawRegion {
        RawRegion { base, len, kind: MemoryKind::from_e820(kind) }
    }

    /// The map QEMU q35 gives a 512 MiB guest through PVH.
    fn qemu_like() -> [RawRegion; 5] {
        [
            raw(0, 0x9fc00, 1),
            raw(0x9fc00, 0x400, 2),
            raw(0xf0000, 0x10000, 2),
            raw(0x10_0000, 0x1fee_0000, 1),
            raw(0xfffc_0000, 0x4_0000, 2),
        ]
    }

    #[test]
    fn qemu_map_is_kept_as_is() {
        let m = MemoryMap::normalize(&qemu_like()).unwrap();
        assert_eq!(m.regions().len(), 5);
        assert_eq!(m.usable_bytes(), 0x9fc00 + 0x1fee_0000);
        assert_eq!(m.repairs(), Repairs::default());
        assert_eq!(m.kind_at(0x9fc00), Some(MemoryKind::Reserved));
        assert_eq!(m.kind_at(0xa0000), None);
    }

    #[test]
    fn unsorted_entries_are_sorted() {
        let mut r = qemu_like();
        r.reverse();
        let m = MemoryMap::normalize(&r).unwrap();
        assert!(m.repairs().unsorted);
        assert_eq!(m.regions(), MemoryMap::normalize(&qemu_like()).unwrap().regions());
    }

    #[test]
    fn overlap_reserved_wins_over_usable() {
        // Usable 1..16 MiB with a reserved hole 4..5 MiB reported on top of it.
        let m = MemoryMap::normalize(&[raw(0x10_0000, 0xf0_0000, 1), raw(0x40_0000, 0x10_0000, 2)]).unwrap();
        assert_eq!(
            m.regions(),
            &[
                Region { range: PhysRange::new(0x10_0000, 0x40_0000), kind: MemoryKind::Usable },
                Region { range: PhysRange::new(0x40_0000, 0x50_0000), kind: MemoryKind::Reserved },
                Region { range: PhysRange::new(0x50_0000, 0x100_0000), kind: MemoryKind::Usable },
            ]
        );
        assert_eq!(m.repairs().overlapping, 1);
        // Same result whichever order firmware used.
        let m2 = MemoryMap::normalize(&[raw(0x40_0000, 0x10_0000, 2), raw(0x10_0000, 0xf0_0000, 1)]).unwrap();
        assert_eq!(m.regions(), m2.regions());
    }

    #[test]
    fn overlapping_usable_entries_merge() {
        let m = MemoryMap::normalize(&[raw(0x10_0000, 0x20_0000, 1), raw(0x20_0000, 0x20_0000, 1)]).unwrap();
        assert_eq!(m.regions(), &[Region { range: PhysRange::new(0x10_0000, 0x40_0000), kind: MemoryKind::Usable }]);
    }

    #[test]
    fn zero_length_and_overflowing_entries() {
        let m = MemoryMap::normalize(&[
            raw(0x10_0000, 0, 1),
            raw(u64::MAX - 0xfff, 0x10_000, 2),
            raw(0x20_0000, 0x1000, 1),
        ])
        .unwrap();
        assert_eq!(m.repairs().zero_length, 1);
        assert_eq!(m.repairs().clamped, 1);
        assert_eq!(m.regions().len(), 2);
        assert_eq!(m.regions()[1].range.end, u64::MAX);
    }

    #[test]
    fn regions_above_4gib() {
        let m = MemoryMap::normalize(&[raw(0x10_0000, 0x7ff0_0000, 1), raw(0x1_0000_0000, 0x1_0000_0000, 1)]).unwrap();
        assert_eq!(m.usable_bytes(), 0x7ff0_0000 + 0x1_0000_0000);
        let a = m.allocatable(&[]).unwrap();
        assert_eq!(
            a.as_slice(),
            &[PhysRange::new(0x10_0000, 0x8000_0000), PhysRange::new(0x1_0000_0000, 0x2_0000_0000)]
        );
    }

    #[test]
    fn allocatable_aligns_inward_and_excludes() {
        let m = MemoryMap::normalize(&[raw(0x1234, 0x2_0000_0000, 1)]).unwrap();
        let image = PhysRange::new(0x20_0000, 0x28_0123); // grown to 0x281000
        let acpi = PhysRange::new(0x1_0000_0800, 0x1_0000_0900); // grown to one page
        let a = m.allocatable(&[image, acpi]).unwrap();
        assert_eq!(
            a.as_slice(),
            &[
                PhysRange::new(0x10_0000, 0x20_0000),
                PhysRange::new(0x28_1000, 0x1_0000_0000),
                PhysRange::new(0x1_0000_1000, 0x2_0000_1000),
            ]
        );
    }

    #[test]
    fn allocatable_never_below_1mib_and_empty_is_error() {
        let m = MemoryMap::normalize(&[raw(0, 0x9fc00, 1)]).unwrap();
        assert_eq!(m.allocatable(&[]), Err(MapError::NoUsableMemory));
    }

    #[test]
    fn the_maximum_number_of_exclusions_is_accepted() {
        let m = MemoryMap::normalize(&[raw(0x10_0000, 0x1000_0000, 1)]).unwrap();
        let ex: std::vec::Vec<PhysRange> = (0..MAX_EXCLUSIONS as u64)
            .map(|i| PhysRange::new(0x20_0000 + i * 0x2000, 0x20_1000 + i * 0x2000))
            .collect();
        assert!(m.allocatable(&ex).is_ok());
    }

    #[test]
    fn too_many_entries_is_an_error() {
        let many: std::vec::Vec<RawRegion> = (0..=MAX_RAW_REGIONS as u64).map(|i| raw(i * 0x2000, 0x1000, 1)).collect();
        assert_eq!(
            MemoryMap::normalize(&many),
            Err(MapError::TooManyEntries { given: MAX_RAW_REGIONS + 1, max: MAX_RAW_REGIONS })
        );
    }

    fn kind_strategy() -> impl Strategy<Value = u32> {
        prop_oneof![Just(1u32), Just(1u32), Just(2u32), Just(3u32), Just(4u32), Just(5u32), Just(12u32)]
    }

    proptest! {
        /// For any firmware map: the result is sorted, non-overlapping, merged, and at every
        /// probed address reports exactly the most restrictive kind of the raw entries covering
        /// it; allocatable ranges are page-aligned, above 1 MiB and usable in every raw entry
        /// that covers them.
        #[test]
        fn normalize_matches_reference(
            entries in proptest::collection::vec(
                (0u64..0x40_0000, 0u64..0x20_0000, kind_strategy()), 0..24),
            probes in proptest::collection::vec(0u64..0x60_0000, 32),
        ) {
            let raw: std::vec::Vec<RawRegion> = entries.iter().map(|&(b, l, k)| raw(b, l, k)).collect();
            let m = MemoryMap::normalize(&raw).unwrap();
            for w in m.regions().windows(2) {
                prop_assert!(w[0].range.end <= w[1].range.start);
                prop_assert!(!(w[0].range.end == w[1].range.start && w[0].kind == w[1].kind));
            }
            for r in m.regions() { prop_assert!(!r.range.is_empty()); }
            for p in probes {
                let expected = raw.iter()
                    .filter(|r| r.base <= p && p < r.base + r.len)
                    .map(|r| r.kind)
                    .max_by_key(|k| k.precedence());
                prop_assert_eq!(m.kind_at(p), expected);
            }
            if let Ok(alloc) = m.allocatable(&[]) {
                for a in &alloc {
                    prop_assert_eq!(a.start % PAGE_SIZE, 0);
                    prop_assert_eq!(a.end % PAGE_SIZE, 0);
                    prop_assert!(a.start >= LOW_MEMORY_END);
                    for r in &raw {
                        let rr = PhysRange::from_base_len(r.base, r.len).0;
                        if rr.overlaps(a) { prop_assert_eq!(r.kind, MemoryKind::Usable); }
                    }
                }
            }
        }
    }
}
