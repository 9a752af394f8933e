//! The physical frame allocator: one bit per 4 KiB frame over the allocatable ranges of the
//! memory map (bit set = free). The bitmap's storage is handed in by the caller, so this module
//! never touches raw memory; `plan_bitmap` says where the kernel should carve it from.

use crate::PAGE_SIZE;
use crate::range::{PhysRange, subtract_all};
use heapless::Vec;

/// Most disjoint ranges one allocator manages.
pub const MAX_ZONES: usize = crate::map::MAX_REGIONS;

/// Frame allocator errors. None of them is a panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FrameError {
    /// A managed range is not page-aligned, or an address to free is not a frame address.
    Unaligned(u64),
    /// Two managed ranges overlap.
    Overlapping,
    /// More ranges than `MAX_ZONES`.
    TooManyRanges,
    /// The bitmap storage is smaller than `bitmap_words_for` asked.
    BitmapTooSmall {
        /// Words needed.
        needed: usize,
        /// Words given.
        given: usize,
    },
    /// The address is not in any managed range.
    NotManaged(u64),
    /// The frame is already free.
    DoubleFree(u64),
    /// A request for zero frames, or an alignment that is not a power of two of pages.
    BadRequest,
    /// No free run of frames satisfies the request.
    OutOfMemory,
}

#[derive(Clone, Copy, Debug)]
struct Zone {
    range: PhysRange,
    /// Index of this zone's first frame in the bitmap.
    first_bit: usize,
}

impl Zone {
    fn frames(&self) -> usize {
        (self.range.len() / PAGE_SIZE) as usize
    }
}

/// Number of 64-bit bitmap words needed to manage `ranges`.
pub fn bitmap_words_for(ranges: &[PhysRange]) -> usize {
    let frames: u64 = ranges.iter().map(|r| r.len() / PAGE_SIZE).sum();
    frames.div_ceil(64) as usize
}

/// Picks where to keep the bitmap for `ranges`: the first piece of one range, below `limit`
/// (the kernel must be able to address it early), page-aligned. Returns the bitmap's range and
/// the ranges left to manage once it is carved out.
pub fn plan_bitmap(ranges: &[PhysRange], limit: u64) -> Option<(PhysRange, Vec<PhysRange, MAX_ZONES>)> {
    let bytes = (bitmap_words_for(ranges) as u64 * 8).div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
    let home = ranges.iter().find(|r| r.len() >= bytes && r.start.checked_add(bytes).is_some_and(|e| e <= limit))?;
    let bitmap = PhysRange::new(home.start, home.start + bytes);
    let rest = subtract_all::<MAX_ZONES>(ranges, &[bitmap]).ok()?;
    Some((bitmap, rest))
}

/// A bitmap frame allocator over disjoint page-aligned ranges (any order, any address).
#[derive(Debug)]
pub struct FrameAllocator<'a> {
    zones: Vec<Zone, MAX_ZONES>,
    bitmap: &'a mut [u64],
    free: u64,
    total: u64,
    /// Bit index where the next single-frame search starts.
    hint: usize,
}

impl<'a> FrameAllocator<'a> {
    /// Manages `ranges` (page-aligned, disjoint) with `bitmap` as storage; every frame starts
    /// free. The bitmap needs `bitmap_words_for(ranges)` words.
    pub fn new(ranges: &[PhysRange], bitmap: &'a mut [u64]) -> Result<Self, FrameError> {
        let mut sorted: Vec<PhysRange, MAX_ZONES> = Vec::new();
        for r in ranges.iter().filter(|r| !r.is_empty()) {
            if r.start % PAGE_SIZE != 0 || r.end % PAGE_SIZE != 0 {
                return Err(FrameError::Unaligned(if r.start % PAGE_SIZE != 0 { r.start } else { r.end }));
            }
            sorted.push(*r).map_err(|_| FrameError::TooManyRanges)?;
        }
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0].end > w[1].start) {
            return Err(FrameError::Overlapping);
        }
        let needed = bitmap_words_for(&sorted);
        if bitmap.len() < needed {
            return Err(FrameError::BitmapTooSmall { needed, given: bitmap.len() });
        }
        let mut zones: Vec<Zone, MAX_ZONES> = Vec::new();
        let mut bit = 0usize;
        for r in &sorted {
            let z = Zone { range: *r, first_bit: bit };
            bit += z.frames();
            let _ = zones.push(z);
        }
        let total = bit as u64;
        for (i, w) in bitmap.iter_mut().enumerate() {
            let lo = i * 64;
            *w = if lo + 64 <= bit {
                u64::MAX
            } else if lo < bit {
                (1u64 << (bit - lo)) - 1
            } else {
                0
            };
        }
        Ok(Self { zones, bitmap, free: total, total, hint: 0 })
    }

    /// Frames currently free.
    pub fn free_frames(&self) -> u64 {
        self.free
    }

    /// Frames managed.
    pub fn total_frames(&self) -> u64 {
        self.total
    }

    /// The managed ranges, ascending.
    pub fn ranges(&self) -> impl Iterator<Item = PhysRange> + '_ {
        self.zones.iter().map(|z| z.range)
    }

    fn bit_of(&self, addr: u64) -> Option<usize> {
        let z = self.zones.iter().find(|z| z.range.contains(addr))?;
        Some(z.first_bit + ((addr - z.range.start) / PAGE_SIZE) as usize)
    }

    fn addr_of(&self, bit: usize) -> u64 {
        // Zones are sorted by bit as well as by address.
        let idx = self.zones.partition_point(|z| z.first_bit <= bit) - 1;
        let z = &self.zones[idx];
        z.range.start + (bit - z.first_bit) as u64 * PAGE_SIZE
    }

    fn is_free_bit(&self, bit: usize) -> bool {
        self.bitmap[bit / 64] & (1 << (bit % 64)) != 0
    }

    fn set_free_bit(&mut self, bit: usize, free: bool) {
        if free {
            self.bitmap[bit / 64] |= 1 << (bit % 64);
        } else {
            self.bitmap[bit / 64] &= !(1 << (bit % 64));
        }
    }

    /// True when `addr` lies in a managed range (free or not).
    pub fn manages(&self, addr: u64) -> bool {
        self.bit_of(addr).is_some()
    }

    /// True when `addr` is a managed frame that is free.
    pub fn is_free(&self, addr: u64) -> bool {
        addr.is_multiple_of(PAGE_SIZE) && self.bit_of(addr).is_some_and(|b| self.is_free_bit(b))
    }

    /// One frame, lowest free at or after the search hint.
    pub fn alloc(&mut self) -> Option<u64> {
        if self.free == 0 {
            return None;
        }
        let words = self.total.div_ceil(64) as usize;
        let start = self.hint / 64;
        for step in 0..words {
            let w = (start + step) % words;
            let word = self.bitmap[w];
            if word != 0 {
                let bit = w * 64 + word.trailing_zeros() as usize;
                self.set_free_bit(bit, false);
                self.free -= 1;
                self.hint = bit;
                return Some(self.addr_of(bit));
            }
        }
        None
    }

    /// `count` physically contiguous frames whose first address is a multiple of `align`
    /// bytes (a power of two, at least a page) and whose end is at most `limit`.
    pub fn alloc_contiguous(&mut self, count: u64, align: u64, limit: u64) -> Result<u64, FrameError> {
        if count == 0 || !align.is_power_of_two() || align < PAGE_SIZE {
            return Err(FrameError::BadRequest);
        }
        let bytes = count.checked_mul(PAGE_SIZE).ok_or(FrameError::BadRequest)?;
        for zi in 0..self.zones.len() {
            let z = self.zones[zi];
            let Some(mut start) = z.range.start.checked_next_multiple_of(align) else { continue };
            while let Some(end) = start.checked_add(bytes) {
                if end > z.range.end || end > limit {
                    break;
                }
                let first = z.first_bit + ((start - z.range.start) / PAGE_SIZE) as usize;
                match (0..count as usize).rev().find(|i| !self.is_free_bit(first + i)) {
                    None => {
                        for i in 0..count as usize {
                            self.set_free_bit(first + i, false);
                        }
                        self.free -= count;
                        return Ok(start);
                    }
                    // Skip past the used frame, keeping the alignment.
                    Some(used) => {
                        let after = start + (used as u64 + 1) * PAGE_SIZE;
                        let Some(next) = after.checked_next_multiple_of(align) else { break };
                        start = next;
                    }
                }
            }
        }
        Err(FrameError::OutOfMemory)
    }

    /// Returns one frame.
    pub fn free(&mut self, addr: u64) -> Result<(), FrameError> {
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(FrameError::Unaligned(addr));
        }
        let bit = self.bit_of(addr).ok_or(FrameError::NotManaged(addr))?;
        if self.is_free_bit(bit) {
            return Err(FrameError::DoubleFree(addr));
        }
        self.set_free_bit(bit, true);
        self.free += 1;
        Ok(())
    }

    /// Returns `count` contiguous frames starting at `addr`. Checks every frame first, so an
    /// error frees nothing.
    pub fn free_contiguous(&mut self, addr: u64, count: u64) -> Result<(), FrameError> {
        for i in 0..count {
            let a = i.checked_mul(PAGE_SIZE).and_then(|o| addr.checked_add(o)).ok_or(FrameError::NotManaged(addr))?;
            if a % PAGE_SIZE != 0 {
                return Err(FrameError::Unaligned(a));
            }
            let bit = self.bit_of(a).ok_or(FrameError::NotManaged(a))?;
            if self.is_free_bit(bit) {
                return Err(FrameError::DoubleFree(a));
            }
        }
        for i in 0..count {
            self.free(addr + i * PAGE_SIZE)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn alloc_over(ranges: &[PhysRange]) -> (std::vec::Vec<u64>, std::vec::Vec<PhysRange>) {
        (std::vec![0u64; bitmap_words_for(ranges)], ranges.to_vec())
    }

    #[test]
    fn hands_out_every_frame_once_then_none() {
        let ranges = [PhysRange::new(0x10_0000, 0x10_5000), PhysRange::new(0x1_0000_0000, 0x1_0000_3000)];
        let (mut bm, r) = alloc_over(&ranges);
        let mut a = FrameAllocator::new(&r, &mut bm).unwrap();
        assert_eq!(a.total_frames(), 8);
        let mut seen = BTreeSet::new();
        while let Some(f) = a.alloc() {
            assert!(ranges.iter().any(|r| r.contains(f)));
            assert!(seen.insert(f), "frame {f:#x} handed out twice");
        }
        assert_eq!(seen.len(), 8);
        assert!(seen.contains(&0x1_0000_2000), "frames above 4 GiB are managed");
        assert_eq!(a.free_frames(), 0);
        a.free(0x10_2000).unwrap();
        assert_eq!(a.alloc(), Some(0x10_2000));
    }

    #[test]
    fn unsorted_ranges_are_accepted_overlaps_are_not() {
        let r = [PhysRange::new(0x30_0000, 0x30_1000), PhysRange::new(0x10_0000, 0x10_1000)];
        let mut bm = [0u64; 1];
        assert!(FrameAllocator::new(&r, &mut bm).is_ok());
        let o = [PhysRange::new(0x10_0000, 0x10_3000), PhysRange::new(0x10_2000, 0x10_4000)];
        let mut bm = [0u64; 1];
        assert_eq!(FrameAllocator::new(&o, &mut bm).err(), Some(FrameError::Overlapping));
    }

    #[test]
    fn unaligned_and_small_bitmap_are_errors() {
        let mut bm = [0u64; 1];
        assert_eq!(
            FrameAllocator::new(&[PhysRange::new(0x10_0800, 0x10_2000)], &mut bm).err(),
            Some(FrameError::Unaligned(0x10_0800))
        );
        let big = [PhysRange::new(0, 65 * PAGE_SIZE)];
        assert_eq!(FrameAllocator::new(&big, &mut bm).err(), Some(FrameError::BitmapTooSmall { needed: 2, given: 1 }));
    }

    #[test]
    fn free_rejects_foreign_unaligned_and_double() {
        let r = [PhysRange::new(0x10_0000, 0x10_2000)];
        let mut bm = [0u64; 1];
        let mut a = FrameAllocator::new(&r, &mut bm).unwrap();
        let f = a.alloc().unwrap();
        assert_eq!(a.free(f + 1), Err(FrameError::Unaligned(f + 1)));
        assert_eq!(a.free(0x20_0000), Err(FrameError::NotManaged(0x20_0000)));
        assert_eq!(a.free(f), Ok(()));
        assert_eq!(a.free(f), Err(FrameError::DoubleFree(f)));
        assert_eq!(a.free_frames(), 2);
    }

    #[test]
    fn contiguous_respects_alignment_limit_and_holes() {
        let r = [PhysRange::new(0x10_0000, 0x60_0000)];
        let (mut bm, r) = alloc_over(&r);
        let mut a = FrameAllocator::new(&r, &mut bm).unwrap();
        // Occupy one frame in the first 2 MiB-aligned block.
        let first = a.alloc().unwrap();
        assert_eq!(first, 0x10_0000);
        let big = a.alloc_contiguous(512, 0x20_0000, u64::MAX).unwrap();
        assert_eq!(big, 0x20_0000);
        let next = a.alloc_contiguous(512, 0x20_0000, u64::MAX).unwrap();
        assert_eq!(next, 0x40_0000);
        assert_eq!(a.alloc_contiguous(512, 0x20_0000, u64::MAX), Err(FrameError::OutOfMemory));
        assert_eq!(a.alloc_contiguous(2, PAGE_SIZE, 0x10_2000), Err(FrameError::OutOfMemory), "limit is honoured");
        assert_eq!(a.alloc_contiguous(0, PAGE_SIZE, u64::MAX), Err(FrameError::BadRequest));
        assert_eq!(a.alloc_contiguous(1, 3000, u64::MAX), Err(FrameError::BadRequest));
    }

    #[test]
    fn failed_free_contiguous_frees_nothing() {
        let r = [PhysRange::new(0x10_0000, 0x10_4000)];
        let mut bm = [0u64; 1];
        let mut a = FrameAllocator::new(&r, &mut bm).unwrap();
        let s = a.alloc_contiguous(2, PAGE_SIZE, u64::MAX).unwrap();
        let before = a.free_frames();
        assert_eq!(a.free_contiguous(s, 3), Err(FrameError::DoubleFree(s + 2 * PAGE_SIZE)));
        assert_eq!(a.free_frames(), before);
        assert_eq!(a.free_contiguous(s, 2), Ok(()));
    }

    #[test]
    fn ranges_at_the_top_of_the_address_space_never_overflow() {
        let top = [
            PhysRange::new(0xffff_ffff_ffe0_1000, 0xffff_ffff_ffe0_2000),
            PhysRange::new(0xffff_ffff_ffff_f000, !0xfff),
        ];
        let mut bm = [0u64; 1];
        let mut a = FrameAllocator::new(&top[..1], &mut bm).unwrap();
        assert_eq!(a.alloc_contiguous(1, 0x20_0000, u64::MAX), Err(FrameError::OutOfMemory));
        assert_eq!(a.alloc_contiguous(1, PAGE_SIZE, u64::MAX), Ok(0xffff_ffff_ffe0_1000));
        assert_eq!(a.free_contiguous(0xffff_ffff_ffff_f000, 4), Err(FrameError::NotManaged(0xffff_ffff_ffff_f000)));
    }

    #[test]
    fn plan_bitmap_carves_from_a_range_below_the_limit() {
        let r = [
            PhysRange::new(0x10_0000, 0x10_1000),
            PhysRange::new(0x20_0000, 0x8000_0000),
            PhysRange::new(0x1_0000_0000, 0x2_0000_0000),
        ];
        let (bm, rest) = plan_bitmap(&r, 0x1_0000_0000).unwrap();
        // 0x7fe00 + 0x100000 + 1 frames -> ~ 48 KiB of bitmap, does not fit the 4 KiB range.
        assert_eq!(bm.start, 0x20_0000);
        assert!(bm.len() as usize >= bitmap_words_for(&r) * 8);
        assert!(rest.iter().all(|x| !x.overlaps(&bm)));
        assert!(bitmap_words_for(&rest) <= bitmap_words_for(&r));
        assert!(plan_bitmap(&r, 0x10_0000).is_none());
    }

    proptest! {
        /// Random alloc/free sequences against a set model: never a frame twice, never a frame
        /// outside the ranges, the free count always right.
        #[test]
        fn alloc_free_matches_model(ops in proptest::collection::vec((0u8..4, 0usize..64), 1..300)) {
            let ranges = [PhysRange::new(0x10_0000, 0x10_0000 + 37 * PAGE_SIZE), PhysRange::new(0x1_0000_0000, 0x1_0000_0000 + 70 * PAGE_SIZE)];
            let mut bm = std::vec![0u64; bitmap_words_for(&ranges)];
            let mut a = FrameAllocator::new(&ranges, &mut bm).unwrap();
            let mut held: std::vec::Vec<(u64, u64)> = std::vec::Vec::new();
            let mut used = BTreeSet::new();
            for (op, n) in ops {
                match op {
                    0 | 1 => if let Some(f) = a.alloc() {
                        prop_assert!(ranges.iter().any(|r| r.contains(f)));
                        prop_assert!(used.insert(f));
                        held.push((f, 1));
                    } else { prop_assert_eq!(used.len() as u64, a.total_frames()); },
                    2 => if let Ok(f) = a.alloc_contiguous((n % 5 + 1) as u64, PAGE_SIZE << (n % 3), u64::MAX) {
                        for i in 0..(n % 5 + 1) as u64 {
                            prop_assert!(used.insert(f + i * PAGE_SIZE));
                        }
                        prop_assert_eq!(f % (PAGE_SIZE << (n % 3)), 0);
                        held.push((f, (n % 5 + 1) as u64));
                    },
                    _ => if !held.is_empty() {
                        let (f, c) = held.swap_remove(n % held.len());
                        prop_assert_eq!(a.free_contiguous(f, c), Ok(()));
                        for i in 0..c { used.remove(&(f + i * PAGE_SIZE)); }
                    },
                }
                prop_assert_eq!(a.free_frames(), a.total_frames() - used.len() as u64);
            }
        }
    }
}
