//! A physical CPU's host vector table: which context each host interrupt vector feeds. One per
//! CPU (a device interrupt remapped to vector V on CPU C arrives through C's table); readers —
//! the interrupt entry path — do one atomic load, writers claim and release vectors with a CAS.

use crate::pool::ContextId;
use crate::sync::{AtomicU32, Ordering};

/// First vector of the default device range (below: exceptions and the legacy PIC range).
pub const DEVICE_FIRST: u8 = 0x40;
/// Last vector of the default device range (above: the hypervisor's own APIC vectors — timer,
/// IPIs, spurious).
pub const DEVICE_LAST: u8 = 0xef;
/// Vectors 0–31 are exceptions: never device vectors.
pub const FIRST_ALLOWED: u8 = 32;

/// Entry value for a free vector.
const FREE: u32 = 0;

/// 256 entries: `context id + 1`, or 0 for a free vector. Only vectors of the device range are
/// ever allocated.
#[derive(Debug)]
pub struct HostVectorTable {
    entries: [AtomicU32; 256],
    first: u8,
    last: u8,
}

impl Default for HostVectorTable {
    fn default() -> Self {
        Self::new()
    }
}

const fn encode(ctx: ContextId) -> u32 {
    ctx.0 as u32 + 1
}

impl HostVectorTable {
    /// All free; device vectors `DEVICE_FIRST..=DEVICE_LAST`.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self { entries: [const { AtomicU32::new(FREE) }; 256], first: DEVICE_FIRST, last: DEVICE_LAST }
    }

    /// All free; device vectors `DEVICE_FIRST..=DEVICE_LAST`.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self { entries: core::array::from_fn(|_| AtomicU32::new(FREE)), first: DEVICE_FIRST, last: DEVICE_LAST }
    }

    /// All free; device vectors `first..=last` (for statics). `None` unless
    /// `FIRST_ALLOWED <= first <= last`.
    #[cfg(not(loom))]
    pub const fn with_const_range(first: u8, last: u8) -> Option<Self> {
        if first < FIRST_ALLOWED || first > last {
            return None;
        }
        Some(Self { entries: [const { AtomicU32::new(FREE) }; 256], first, last })
    }

    /// All free; device vectors `first..=last`. `None` unless `FIRST_ALLOWED <= first <= last`.
    pub fn with_range(first: u8, last: u8) -> Option<Self> {
        if first < FIRST_ALLOWED || first > last {
            return None;
        }
        Some(Self { first, last, ..Self::new() })
    }

    /// The device vector range.
    pub const fn range(&self) -> (u8, u8) {
        (self.first, self.last)
    }

    /// Claims a free device vector for `ctx` (lowest first). `None` when the range is full.
    /// Lock-free: a CAS per candidate.
    pub fn allocate(&self, ctx: ContextId) -> Option<u8> {
        let value = encode(ctx);
        (self.first..=self.last).find(|&v| {
            self.entries.get(usize::from(v)).is_some_and(|e| {
                e.load(Ordering::Relaxed) == FREE
                    && e.compare_exchange(FREE, value, Ordering::AcqRel, Ordering::Relaxed).is_ok()
            })
        })
    }

    /// Releases `vector` if it still maps `ctx` (a CAS back to free); returns whether it did.
    pub fn free(&self, vector: u8, ctx: ContextId) -> bool {
        self.entries
            .get(usize::from(vector))
            .is_some_and(|e| e.compare_exchange(encode(ctx), FREE, Ordering::AcqRel, Ordering::Relaxed).is_ok())
    }

    /// Points `vector` at `to` if it still maps `from` (one CAS); returns whether it did. Used
    /// to park a vector that is being retired on a context that is never enabled, so anything
    /// still on its way to it is counted as spurious instead of reaching whoever reuses `from`.
    pub fn replace(&self, vector: u8, from: ContextId, to: ContextId) -> bool {
        self.entries
            .get(usize::from(vector))
            .is_some_and(|e| e.compare_exchange(encode(from), encode(to), Ordering::AcqRel, Ordering::Relaxed).is_ok())
    }

    /// The context `vector` feeds, O(1): one load.
    #[inline]
    pub fn lookup(&self, vector: u8) -> Option<ContextId> {
        let v = self.entries.get(usize::from(vector))?.load(Ordering::Acquire);
        let id = v.checked_sub(1)?;
        u16::try_from(id).ok().map(ContextId)
    }

    /// Device vectors in use.
    pub fn in_use(&self) -> usize {
        (self.first..=self.last)
            .filter(|&v| self.entries.get(usize::from(v)).is_some_and(|e| e.load(Ordering::Relaxed) != FREE))
            .count()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocate_lookup_free() {
        let t = HostVectorTable::new();
        assert_eq!(t.range(), (0x40, 0xef));
        assert_eq!(t.lookup(0x40), None);
        assert_eq!(t.allocate(ContextId(0)), Some(0x40));
        assert_eq!(t.allocate(ContextId(7)), Some(0x41));
        assert_eq!(t.allocate(ContextId(u16::MAX)), Some(0x42), "the largest id fits");
        assert_eq!(t.lookup(0x40), Some(ContextId(0)));
        assert_eq!(t.lookup(0x42), Some(ContextId(u16::MAX)));
        assert!(!t.free(0x40, ContextId(7)), "only the owner frees");
        assert!(t.free(0x40, ContextId(0)));
        assert!(!t.free(0x40, ContextId(0)));
        assert_eq!(t.lookup(0x40), None);
        assert_eq!(t.allocate(ContextId(3)), Some(0x40));
        assert_eq!(t.in_use(), 3);
        assert!(!t.free(0x10, ContextId(0)), "outside the range nothing is mapped");
    }

    #[test]
    fn replace_moves_a_mapping_only_from_its_owner() {
        let t = HostVectorTable::new();
        let v = t.allocate(ContextId(3)).unwrap();
        assert!(!t.replace(v, ContextId(4), ContextId(9)), "not the owner");
        assert!(t.replace(v, ContextId(3), ContextId(9)));
        assert_eq!(t.lookup(v), Some(ContextId(9)));
        assert!(!t.free(v, ContextId(3)));
        assert!(t.free(v, ContextId(9)));
    }

    #[test]
    fn ranges() {
        assert!(HostVectorTable::with_range(31, 40).is_none());
        assert!(HostVectorTable::with_range(50, 49).is_none());
        let t = HostVectorTable::with_range(0xfe, 0xff).unwrap();
        assert_eq!(t.allocate(ContextId(1)), Some(0xfe));
        assert_eq!(t.allocate(ContextId(1)), Some(0xff));
        assert_eq!(t.allocate(ContextId(1)), None, "full");
        let full = HostVectorTable::new();
        let n = (DEVICE_FIRST..=DEVICE_LAST).filter_map(|_| full.allocate(ContextId(9))).count();
        assert_eq!(n, usize::from(DEVICE_LAST - DEVICE_FIRST) + 1);
        assert_eq!(full.allocate(ContextId(9)), None);
    }

    proptest! {
        #[test]
        fn matches_model(ops in proptest::collection::vec((any::<bool>(), any::<u8>(), 0u16..4), 0..300)) {
            let t = HostVectorTable::with_range(0x40, 0x47).unwrap();
            let mut model: [Option<u16>; 256] = [None; 256];
            for (alloc, v, c) in ops {
                if alloc {
                    let want = (0x40..=0x47u8).find(|&v| model[usize::from(v)].is_none());
                    prop_assert_eq!(t.allocate(ContextId(c)), want);
                    if let Some(w) = want { model[usize::from(w)] = Some(c); }
                } else {
                    let owned = model[usize::from(v)] == Some(c);
                    prop_assert_eq!(t.free(v, ContextId(c)), owned);
                    if owned { model[usize::from(v)] = None; }
                }
                for v in 0..=255u8 {
                    prop_assert_eq!(t.lookup(v).map(|c| c.0), model[usize::from(v)]);
                }
            }
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::context::loom_tests::model;
    use loom::sync::Arc;

    /// Allocation and free racing a lookup: the reader sees the vector free or mapped to one
    /// of the contexts that owned it, never anything else.
    #[test]
    fn loom_vectors_allocate_free_race_lookup() {
        model(|| {
            let t = Arc::new(HostVectorTable::with_range(0x40, 0x41).unwrap());
            let t1 = t.clone();
            let writer = loom::thread::spawn(move || {
                let v = t1.allocate(ContextId(5)).unwrap();
                assert!(t1.free(v, ContextId(5)));
                t1.allocate(ContextId(6)).unwrap()
            });
            let t2 = t.clone();
            let reader = loom::thread::spawn(move || t2.lookup(0x40));
            let v = writer.join().unwrap();
            let seen = reader.join().unwrap();
            assert!(matches!(seen, None | Some(ContextId(5 | 6))), "{seen:?}");
            assert_eq!(v, 0x40, "the freed vector is reused");
            assert_eq!(t.lookup(0x40), Some(ContextId(6)));
        });
    }

    /// Two allocators racing get different vectors; a free by a non-owner racing them fails.
    #[test]
    fn loom_vectors_two_allocators() {
        model(|| {
            let t = Arc::new(HostVectorTable::with_range(0x40, 0x41).unwrap());
            let t1 = t.clone();
            let a = loom::thread::spawn(move || t1.allocate(ContextId(1)));
            let t2 = t.clone();
            let b = loom::thread::spawn(move || {
                let v = t2.allocate(ContextId(2));
                assert!(!t2.free(0x40, ContextId(3)), "not the owner");
                v
            });
            let (a, b) = (a.join().unwrap().unwrap(), b.join().unwrap().unwrap());
            assert_ne!(a, b, "one vector, one owner");
            assert_eq!(t.lookup(a), Some(ContextId(1)));
            assert_eq!(t.lookup(b), Some(ContextId(2)));
            assert_eq!(t.allocate(ContextId(4)), None);
        });
    }
}
