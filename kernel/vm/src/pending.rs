//! A vCPU's pending-vector bitmap: the virtual local APIC's IRR, set atomically from any CPU
//! (a forwarded device interrupt, a supervisor, the vCPU's own timer) and taken by the CPU that
//! runs the vCPU when it injects the vector. Setting and taking are single atomic operations
//! on one 64-bit word, so a vector raised while another CPU takes a different one is never
//! lost, and a vector raised twice before it is taken is pending once (as in a real IRR).

use crate::sync::{AtomicU64, Ordering};

/// First vector that can be raised: 0–15 are reserved (the APIC rejects them as illegal).
pub const FIRST_VECTOR: u8 = 16;

/// 256 pending bits.
#[derive(Debug)]
pub struct PendingVectors {
    words: [AtomicU64; 4],
}

impl Default for PendingVectors {
    fn default() -> Self {
        Self::new()
    }
}

/// A set of vectors (bit `v` of word `v / 64`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VectorSet(pub [u64; 4]);

impl VectorSet {
    /// The empty set.
    pub const EMPTY: Self = Self([0; 4]);

    /// The set of `vectors`.
    pub fn of(vectors: &[u8]) -> Self {
        let mut s = Self::EMPTY;
        for &v in vectors {
            s.insert(v);
        }
        s
    }

    /// Adds `v`.
    pub fn insert(&mut self, v: u8) {
        self.0[usize::from(v >> 6)] |= 1 << (v & 63);
    }

    /// Removes `v`.
    pub fn remove(&mut self, v: u8) {
        self.0[usize::from(v >> 6)] &= !(1 << (v & 63));
    }

    /// Whether `v` is in the set.
    pub fn contains(&self, v: u8) -> bool {
        self.0[usize::from(v >> 6)] & (1 << (v & 63)) != 0
    }

    /// The highest vector in the set.
    #[inline]
    pub fn highest(&self) -> Option<u8> {
        let [a, b, c, d] = self.0;
        let (w, bits) = if d != 0 {
            (3, d)
        } else if c != 0 {
            (2, c)
        } else if b != 0 {
            (1, b)
        } else if a != 0 {
            (0, a)
        } else {
            return None;
        };
        Some(w * 64 + (63 - bits.leading_zeros() as u8))
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }

    /// Number of vectors in the set.
    pub fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
}

impl PendingVectors {
    /// Nothing pending.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self { words: [const { AtomicU64::new(0) }; 4] }
    }

    /// Nothing pending.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self { words: core::array::from_fn(|_| AtomicU64::new(0)) }
    }

    /// Marks `vector` pending. Returns whether it was newly set, or `None` for a reserved
    /// vector (0–15), which is refused.
    pub fn raise(&self, vector: u8) -> Option<bool> {
        if vector < FIRST_VECTOR {
            return None;
        }
        let bit = 1u64 << (vector & 63);
        let word = &self.words[usize::from(vector >> 6)];
        // Already pending: this signal merges with the pending one (as in a real IRR) — a
        // plain load, which leaves the cache line shared instead of pulling it over for an
        // atomic read-modify-write. A take racing this load injects the vector once for both.
        if word.load(Ordering::Acquire) & bit != 0 {
            return Some(false);
        }
        let old = word.fetch_or(bit, Ordering::AcqRel);
        Some(old & bit == 0)
    }

    /// Marks every vector of `set` pending, one atomic operation per 64-vector word (vectors
    /// in the same word become visible together). Reserved vectors are dropped. Returns the
    /// vectors that were newly set.
    pub fn raise_set(&self, set: &VectorSet) -> VectorSet {
        let mut newly = VectorSet::EMPTY;
        for (w, (&bits, word)) in set.0.iter().zip(&self.words).enumerate() {
            let bits = if w == 0 { bits & !((1u64 << FIRST_VECTOR) - 1) } else { bits };
            if bits != 0 {
                let old = word.fetch_or(bits, Ordering::AcqRel);
                newly.0[w] = bits & !old;
            }
        }
        newly
    }

    /// Takes `vector` if it is pending (clears it); returns whether it was.
    pub fn take(&self, vector: u8) -> bool {
        let bit = 1u64 << (vector & 63);
        self.words[usize::from(vector >> 6)].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Whether `vector` is pending.
    pub fn contains(&self, vector: u8) -> bool {
        self.words[usize::from(vector >> 6)].load(Ordering::Acquire) & (1 << (vector & 63)) != 0
    }

    /// A snapshot of the pending set (each word read atomically).
    pub fn snapshot(&self) -> VectorSet {
        let mut s = VectorSet::EMPTY;
        for (d, w) in s.0.iter_mut().zip(&self.words) {
            *d = w.load(Ordering::Acquire);
        }
        s
    }

    /// The highest pending vector.
    pub fn highest(&self) -> Option<u8> {
        self.snapshot().highest()
    }

    /// Clears everything (vCPU reset); returns what was pending.
    pub fn clear(&self) -> VectorSet {
        let mut s = VectorSet::EMPTY;
        for (d, w) in s.0.iter_mut().zip(&self.words) {
            *d = w.swap(0, Ordering::AcqRel);
        }
        s
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn raise_take() {
        let p = PendingVectors::new();
        assert_eq!(p.raise(15), None, "reserved vector refused");
        assert_eq!(p.raise(0x40), Some(true));
        assert_eq!(p.raise(0x40), Some(false), "coalesced while pending");
        assert_eq!(p.raise(0xff), Some(true));
        assert_eq!(p.highest(), Some(0xff));
        assert!(p.take(0xff));
        assert!(!p.take(0xff));
        assert_eq!(p.highest(), Some(0x40));
        let newly = p.raise_set(&VectorSet::of(&[3, 0x40, 0x41, 0x80]));
        assert_eq!(newly, VectorSet::of(&[0x41, 0x80]));
        assert_eq!(p.clear(), VectorSet::of(&[0x40, 0x41, 0x80]));
        assert_eq!(p.highest(), None);
    }

    proptest! {
        #[test]
        fn set_matches_model(ops in proptest::collection::vec((any::<bool>(), any::<u8>()), 0..200)) {
            let p = PendingVectors::new();
            let mut model = [false; 256];
            for (raise, v) in ops {
                if raise {
                    let r = p.raise(v);
                    if v < FIRST_VECTOR {
                        prop_assert_eq!(r, None);
                    } else {
                        prop_assert_eq!(r, Some(!model[usize::from(v)]));
                        model[usize::from(v)] = true;
                    }
                } else {
                    prop_assert_eq!(p.take(v), model[usize::from(v)]);
                    model[usize::from(v)] = false;
                }
                let want = (0..=255u8).rev().find(|&v| model[usize::from(v)]);
                prop_assert_eq!(p.highest(), want);
            }
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    /// A raise racing a take of another vector in the same word is never lost, and a vector
    /// raised once is taken exactly once.
    #[test]
    fn loom_raise_races_take() {
        loom::model(|| {
            let p = Arc::new(PendingVectors::new());
            p.raise(0x40);
            let q = p.clone();
            let raiser = loom::thread::spawn(move || q.raise(0x41));
            let took40 = p.take(0x40);
            let newly = raiser.join().unwrap();
            assert!(took40);
            assert_eq!(newly, Some(true));
            assert!(p.take(0x41), "the concurrent raise survived the take");
            assert!(!p.take(0x41));
        });
    }

    /// A raise of a vector that is being taken (injected) either finds it still pending and
    /// merges with it (the take delivers both), or sets it anew and it stays pending: never
    /// lost. (The raise reads before it writes: `raise` skips the read-modify-write when the
    /// bit is already set.)
    #[test]
    fn loom_raise_races_take_of_the_same_vector() {
        loom::model(|| {
            let p = Arc::new(PendingVectors::new());
            p.raise(0x40);
            let q = p.clone();
            let raiser = loom::thread::spawn(move || q.raise(0x40));
            let took = p.take(0x40);
            let raised = raiser.join().unwrap();
            assert!(took, "the first raise was pending");
            match raised {
                Some(true) => assert!(p.contains(0x40), "a new raise stays pending until taken"),
                Some(false) => {}
                None => panic!("0x40 is a valid vector"),
            }
        });
    }
}
