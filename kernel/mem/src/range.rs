//! Half-open physical address ranges and the set operations the memory map needs.

use heapless::Vec;

/// A half-open physical address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PhysRange {
    /// First byte in the range.
    pub start: u64,
    /// First byte after the range.
    pub end: u64,
}

/// Too many pieces for the fixed capacity of a range list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CapacityError;

impl PhysRange {
    /// `[start, end)`; an inverted range is empty.
    pub const fn new(start: u64, end: u64) -> Self {
        if end < start { Self { start, end: start } } else { Self { start, end } }
    }

    /// `[base, base + len)`, clamped at the top of the address space. Returns the range and
    /// whether it had to be clamped.
    pub const fn from_base_len(base: u64, len: u64) -> (Self, bool) {
        match base.checked_add(len) {
            Some(end) => (Self { start: base, end }, false),
            None => (Self { start: base, end: u64::MAX }, true),
        }
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True when the range holds no byte.
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// True when `addr` lies inside.
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// True when `other` lies entirely inside (an empty `other` is contained everywhere).
    pub const fn covers(&self, other: &PhysRange) -> bool {
        other.is_empty() || (self.start <= other.start && other.end <= self.end)
    }

    /// True when the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &PhysRange) -> bool {
        self.start < other.end && other.start < self.end && !self.is_empty() && !other.is_empty()
    }

    /// The bytes both ranges hold (possibly empty).
    pub fn intersect(&self, other: &PhysRange) -> PhysRange {
        PhysRange::new(self.start.max(other.start), self.end.min(other.end))
    }

    /// Shrinks the range to whole `align`-sized blocks inside it (`align` a power of two).
    pub fn align_inward(&self, align: u64) -> PhysRange {
        debug_assert!(align.is_power_of_two());
        let mask = align - 1;
        let start = match self.start.checked_add(mask) {
            Some(s) => s & !mask,
            None => return PhysRange::new(self.end, self.end),
        };
        PhysRange::new(start, self.end & !mask)
    }

    /// Grows the range to whole `align`-sized blocks covering it (`align` a power of two),
    /// clamped at the top of the address space.
    pub fn align_outward(&self, align: u64) -> PhysRange {
        debug_assert!(align.is_power_of_two());
        let mask = align - 1;
        let end = self.end.checked_add(mask).map_or(!mask, |e| e & !mask);
        PhysRange::new(self.start & !mask, end)
    }

    /// `self` minus `hole`: up to two pieces (below and above the hole).
    pub fn subtract(&self, hole: &PhysRange) -> [Option<PhysRange>; 2] {
        if !self.overlaps(hole) {
            return [if self.is_empty() { None } else { Some(*self) }, None];
        }
        let below = PhysRange::new(self.start, hole.start.max(self.start).min(self.end));
        let above = PhysRange::new(hole.end.min(self.end).max(self.start), self.end);
        [(!below.is_empty()).then_some(below), (!above.is_empty()).then_some(above)]
    }
}

/// Removes every byte of every `hole` from `ranges`, keeping the order of what remains.
pub fn subtract_all<const N: usize>(
    ranges: &[PhysRange],
    holes: &[PhysRange],
) -> Result<Vec<PhysRange, N>, CapacityError> {
    let mut current: Vec<PhysRange, N> = Vec::new();
    for r in ranges.iter().filter(|r| !r.is_empty()) {
        current.push(*r).map_err(|_| CapacityError)?;
    }
    for hole in holes.iter().filter(|h| !h.is_empty()) {
        let mut next: Vec<PhysRange, N> = Vec::new();
        for r in &current {
            for piece in r.subtract(hole).into_iter().flatten() {
                next.push(piece).map_err(|_| CapacityError)?;
            }
        }
        current = next;
    }
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtract_cases() {
        let r = PhysRange::new(0x1000, 0x5000);
        assert_eq!(r.subtract(&PhysRange::new(0x6000, 0x7000)), [Some(r), None]);
        assert_eq!(
            r.subtract(&PhysRange::new(0x2000, 0x3000)),
            [Some(PhysRange::new(0x1000, 0x2000)), Some(PhysRange::new(0x3000, 0x5000))]
        );
        assert_eq!(r.subtract(&PhysRange::new(0, 0x2000)), [None, Some(PhysRange::new(0x2000, 0x5000))]);
        assert_eq!(r.subtract(&PhysRange::new(0x4000, 0x9000)), [Some(PhysRange::new(0x1000, 0x4000)), None]);
        assert_eq!(r.subtract(&PhysRange::new(0, u64::MAX)), [None, None]);
        // An empty hole removes nothing.
        assert_eq!(r.subtract(&PhysRange::new(0x2000, 0x2000)), [Some(r), None]);
    }

    #[test]
    fn alignment_is_inward_and_outward() {
        let r = PhysRange::new(0x1001, 0x3fff);
        assert_eq!(r.align_inward(0x1000), PhysRange::new(0x2000, 0x3000));
        assert_eq!(r.align_outward(0x1000), PhysRange::new(0x1000, 0x4000));
        // Smaller than one page: nothing left inward.
        assert!(PhysRange::new(0x1001, 0x1fff).align_inward(0x1000).is_empty());
        // Near the top of the address space nothing overflows.
        let top = PhysRange::new(u64::MAX - 10, u64::MAX);
        assert!(top.align_inward(0x1000).is_empty());
        assert_eq!(top.align_outward(0x1000).start, !0xfff);
    }

    #[test]
    fn from_base_len_clamps() {
        assert_eq!(PhysRange::from_base_len(10, 5), (PhysRange::new(10, 15), false));
        assert_eq!(PhysRange::from_base_len(u64::MAX - 1, 5), (PhysRange::new(u64::MAX - 1, u64::MAX), true));
    }

    #[test]
    fn subtract_all_many_holes() {
        let ranges = [PhysRange::new(0, 0x10000), PhysRange::new(0x20000, 0x30000)];
        let holes = [PhysRange::new(0x1000, 0x2000), PhysRange::new(0xf000, 0x21000), PhysRange::new(0x2f000, 0x40000)];
        let out: Vec<PhysRange, 8> = subtract_all(&ranges, &holes).unwrap();
        assert_eq!(
            out.as_slice(),
            &[PhysRange::new(0, 0x1000), PhysRange::new(0x2000, 0xf000), PhysRange::new(0x21000, 0x2f000)]
        );
        let tiny: Result<Vec<PhysRange, 1>, _> = subtract_all(&ranges, &holes);
        assert_eq!(tiny, Err(CapacityError));
    }
}
