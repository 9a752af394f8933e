//! The registry of emulated guest-physical regions of one vCPU: which ranges trap to the
//! hypervisor and who answers them. A nested page fault inside a registered region is decoded
//! and emulated; one outside every region and outside guest RAM stops the guest. The virtual
//! local APIC is always registered; device regions (registered by the device layer) are
//! answered through the environment with their region ID.

/// Most regions per vCPU.
pub const MAX_REGIONS: usize = 32;

/// Who answers a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Handler {
    /// The vCPU's virtual local APIC.
    LocalApic,
    /// A device region: `Env::mmio_read`/`mmio_write` with this ID.
    Device(u16),
}

/// A registered region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Region {
    /// Guest-physical start.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// Who answers.
    pub handler: Handler,
}

/// Why a region was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RegionError {
    /// Empty or wrapping past the end of the address space.
    Empty,
    /// It overlaps this registered region.
    Overlap(Region),
    /// `MAX_REGIONS` already.
    Full,
    /// No region starts at this address.
    NotFound(u64),
}

/// The regions, sorted by base, disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Regions {
    regions: heapless::Vec<Region, MAX_REGIONS>,
}

impl Regions {
    /// No region.
    pub const fn new() -> Self {
        Self { regions: heapless::Vec::new() }
    }

    /// Registers `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, handler: Handler) -> Result<(), RegionError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(RegionError::Empty)?;
        if let Some(r) = self.regions.iter().find(|r| base < r.base + r.len && r.base < end) {
            return Err(RegionError::Overlap(*r));
        }
        let at = self.regions.iter().position(|r| r.base > base).unwrap_or(self.regions.len());
        self.regions.insert(at, Region { base, len, handler }).map_err(|_| RegionError::Full)
    }

    /// Removes the region starting at `base`.
    pub fn remove(&mut self, base: u64) -> Result<Region, RegionError> {
        let at = self.regions.iter().position(|r| r.base == base).ok_or(RegionError::NotFound(base))?;
        Ok(self.regions.remove(at))
    }

    /// The region holding `gpa`, and the offset of `gpa` in it.
    #[inline]
    pub fn find(&self, gpa: u64) -> Option<(Region, u64)> {
        // A handful of disjoint regions: one compare each beats a binary search (every MMIO
        // exit comes here).
        self.regions.iter().find(|r| gpa.wrapping_sub(r.base) < r.len).map(|r| (*r, gpa - r.base))
    }

    /// The regions, by address.
    pub fn iter(&self) -> impl Iterator<Item = &Region> {
        self.regions.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn insert_find_remove() {
        let mut m = Regions::new();
        m.insert(0xfee0_0000, 0x1000, Handler::LocalApic).unwrap();
        m.insert(0xc000_0000, 0x4000, Handler::Device(3)).unwrap();
        assert_eq!(
            m.insert(0xc000_3000, 0x2000, Handler::Device(4)),
            Err(RegionError::Overlap(Region { base: 0xc000_0000, len: 0x4000, handler: Handler::Device(3) }))
        );
        assert_eq!(m.insert(0, 0, Handler::Device(1)), Err(RegionError::Empty));
        assert_eq!(m.insert(u64::MAX, 2, Handler::Device(1)), Err(RegionError::Empty));
        assert_eq!(m.find(0xc000_3fff).map(|(r, o)| (r.handler, o)), Some((Handler::Device(3), 0x3fff)));
        assert_eq!(m.find(0xc000_4000), None);
        assert_eq!(m.find(0xfee0_00b0).map(|(r, o)| (r.handler, o)), Some((Handler::LocalApic, 0xb0)));
        assert_eq!(m.find(0xbfff_ffff), None);
        assert_eq!(m.remove(0xc000_1000), Err(RegionError::NotFound(0xc000_1000)));
        m.remove(0xc000_0000).unwrap();
        assert_eq!(m.find(0xc000_0000), None);
    }

    proptest! {
        /// Lookups agree with a linear model whatever was inserted.
        #[test]
        fn matches_a_linear_model(ops in proptest::collection::vec((0u64..64, 1u64..8), 0..40), probes in proptest::collection::vec(0u64..80, 0..40)) {
            let mut m = Regions::new();
            let mut model: Vec<(u64, u64, u16)> = Vec::new();
            for (i, (base, len)) in ops.into_iter().enumerate() {
                let overlaps = model.iter().any(|&(b, l, _)| base < b + l && b < base + len);
                let r = m.insert(base, len, Handler::Device(i as u16));
                if overlaps || model.len() == MAX_REGIONS {
                    prop_assert!(r.is_err());
                } else {
                    prop_assert!(r.is_ok());
                    model.push((base, len, i as u16));
                }
            }
            for p in probes {
                let want = model.iter().find(|&&(b, l, _)| p >= b && p < b + l).map(|&(b, _, id)| (Handler::Device(id), p - b));
                prop_assert_eq!(m.find(p).map(|(r, o)| (r.handler, o)), want);
            }
        }
    }
}
