//! The context pool: a fixed array of contexts and a bitmap of the ones in use, allocated and
//! freed lock-free (a CAS on one bitmap word). Lookup by id is an array index: the data path
//! (host vector → id → context) never touches the bitmap.

use crate::context::{Context, Signal, Sink};
use crate::sync::{AtomicU64, Ordering};

/// Most contexts one pool holds (the bitmap is sized for it; ids fit in `u16`).
pub const MAX_CONTEXTS: usize = 16384;

/// Bitmap words.
const WORDS: usize = MAX_CONTEXTS / 64;

/// Names one context of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContextId(pub u16);

impl ContextId {
    /// The array index.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// `N` contexts (at most [`MAX_CONTEXTS`], checked at compile time).
#[derive(Debug)]
pub struct ContextPool<const N: usize> {
    contexts: [Context; N],
    used: [AtomicU64; WORDS],
}

impl<const N: usize> Default for ContextPool<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Bitmap words in use for `n` contexts.
const fn words_for(n: usize) -> usize {
    n.div_ceil(64)
}

/// The bits of word `w` that name contexts (`< n`).
const fn valid_bits(w: usize, n: usize) -> u64 {
    let first = w * 64;
    if n >= first + 64 {
        u64::MAX
    } else if n <= first {
        0
    } else {
        (1u64 << (n - first)) - 1
    }
}

impl<const N: usize> ContextPool<N> {
    const CHECK: () = assert!(N <= MAX_CONTEXTS, "a ContextPool holds at most MAX_CONTEXTS contexts");

    /// Every context free (disabled, masked, counters zero).
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        let () = Self::CHECK;
        Self { contexts: [const { Context::new() }; N], used: [const { AtomicU64::new(0) }; WORDS] }
    }

    /// Every context free (disabled, masked, counters zero).
    #[cfg(loom)]
    pub fn new() -> Self {
        let () = Self::CHECK;
        Self { contexts: core::array::from_fn(|_| Context::new()), used: core::array::from_fn(|_| AtomicU64::new(0)) }
    }

    /// Number of contexts.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Allocates a context: reset (disabled, masked, counters zero) and owned by the caller
    /// until `free`. `None` when every context is in use. Lock-free: a CAS on one bitmap word,
    /// retried only when another CPU changed that word.
    pub fn alloc(&self) -> Option<ContextId> {
        for (w, word) in self.used.iter().enumerate().take(words_for(N)) {
            let valid = valid_bits(w, N);
            let mut cur = word.load(Ordering::Relaxed);
            loop {
                let free = !cur & valid;
                if free == 0 {
                    break;
                }
                let bit = free.trailing_zeros();
                match word.compare_exchange_weak(cur, cur | 1 << bit, Ordering::AcqRel, Ordering::Relaxed) {
                    Ok(_) => {
                        let index = w * 64 + bit as usize;
                        let id = ContextId(u16::try_from(index).ok()?);
                        self.contexts.get(index)?.reset();
                        return Some(id);
                    }
                    Err(now) => cur = now,
                }
            }
        }
        None
    }

    /// Frees `id`: disables its context (dropping a pending signal, which the context counts)
    /// and returns it to the pool. Returns whether it was allocated; freeing a free id changes
    /// nothing. Only the owner frees an id (a racing double free by a non-owner cannot be told
    /// apart from a legitimate one).
    pub fn free(&self, id: ContextId) -> bool {
        let index = id.index();
        let (Some(ctx), Some(word)) = (self.contexts.get(index), self.used.get(index / 64)) else {
            return false;
        };
        let bit = 1u64 << (index % 64);
        if word.load(Ordering::Acquire) & bit == 0 {
            return false;
        }
        ctx.disable();
        word.fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// The context `id` names, O(1) (allocated or not: a free context is disabled, so a
    /// stale id only ever produces spurious signals).
    pub fn get(&self, id: ContextId) -> Option<&Context> {
        self.contexts.get(id.index())
    }

    /// Signals context `id` (`None`: no such context).
    pub fn signal(&self, id: ContextId, sink: &(impl Sink + ?Sized)) -> Option<Signal> {
        Some(self.get(id)?.signal(sink))
    }

    /// Whether `id` is allocated.
    pub fn is_allocated(&self, id: ContextId) -> bool {
        let index = id.index();
        index < N && self.used.get(index / 64).is_some_and(|w| w.load(Ordering::Acquire) & 1 << (index % 64) != 0)
    }

    /// Contexts in use now.
    pub fn in_use(&self) -> usize {
        self.used.iter().take(words_for(N)).map(|w| w.load(Ordering::Relaxed).count_ones() as usize).sum()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::context::tests::RecordingSink;
    use crate::context::{MaskState, Target};
    use proptest::prelude::*;

    static GLOBAL: ContextPool<8> = ContextPool::new();

    #[test]
    fn valid_bits_cover_exactly_n() {
        assert_eq!(valid_bits(0, 0), 0);
        assert_eq!(valid_bits(0, 1), 1);
        assert_eq!(valid_bits(0, 64), u64::MAX);
        assert_eq!(valid_bits(1, 64), 0);
        assert_eq!(valid_bits(1, 70), 0x3f);
        assert_eq!(words_for(0), 0);
        assert_eq!(words_for(65), 2);
        assert_eq!(words_for(MAX_CONTEXTS), WORDS);
    }

    #[test]
    fn alloc_until_full_then_free() {
        let p = ContextPool::<70>::new();
        let mut ids = std::vec::Vec::new();
        while let Some(id) = p.alloc() {
            ids.push(id);
        }
        assert_eq!(ids.len(), 70);
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 70, "no id twice");
        assert_eq!(p.in_use(), 70);
        assert!(p.free(ContextId(65)));
        assert!(!p.free(ContextId(65)), "double free refused");
        assert!(!p.free(ContextId(70)), "out of range");
        assert!(!p.free(ContextId(u16::MAX)));
        assert_eq!(p.alloc(), Some(ContextId(65)));
        assert_eq!(p.alloc(), None);
        assert!(p.get(ContextId(69)).is_some());
        assert!(p.get(ContextId(70)).is_none());
        assert!(p.signal(ContextId(70), &RecordingSink::new()).is_none());
    }

    #[test]
    fn empty_pool() {
        let p = ContextPool::<0>::new();
        assert_eq!(p.alloc(), None);
        assert!(!p.free(ContextId(0)));
        assert!(p.get(ContextId(0)).is_none());
    }

    #[test]
    fn free_disables_and_alloc_resets() {
        let s = RecordingSink::new();
        let id = GLOBAL.alloc().unwrap();
        let c = GLOBAL.get(id).unwrap();
        c.enable(Target { slot: 0, vector: 0x40 }, MaskState::Masked);
        assert_eq!(c.signal(&s), Signal::PendingWhileMasked);
        assert!(GLOBAL.free(id));
        assert!(!GLOBAL.is_allocated(id));
        assert_eq!(GLOBAL.signal(id, &s), Some(Signal::Spurious), "a stale id is spurious");
        assert_eq!(c.stats().dropped, 1);
        let again = GLOBAL.alloc().unwrap();
        assert_eq!(again, id, "lowest free first");
        let c = GLOBAL.get(again).unwrap();
        assert_eq!(c.stats(), Default::default(), "counters reset");
        assert!(!c.state().enabled && !c.state().pending);
        assert!(GLOBAL.free(again));
    }

    proptest! {
        /// Alloc/free against a set model.
        #[test]
        fn matches_model(ops in proptest::collection::vec(proptest::option::of(0u16..140), 0..300)) {
            let p = ContextPool::<130>::new();
            let mut model = std::collections::BTreeSet::new();
            for op in ops {
                match op {
                    None => {
                        let got = p.alloc();
                        let want = (0..130u16).find(|i| !model.contains(i));
                        prop_assert_eq!(got.map(|c| c.0), want);
                        if let Some(w) = want { model.insert(w); }
                    }
                    Some(i) => prop_assert_eq!(p.free(ContextId(i)), model.remove(&i)),
                }
                prop_assert_eq!(p.in_use(), model.len());
            }
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::context::loom_tests::CountingSink;
    use crate::context::loom_tests::model;
    use crate::context::{MaskState, Target};
    use loom::sync::Arc;

    /// Two allocations racing never return the same context; a free racing an allocation
    /// never loses or duplicates one.
    #[test]
    fn loom_pool_alloc_free() {
        model(|| {
            let p = Arc::new(ContextPool::<2>::new());
            let first = p.alloc().unwrap();
            let p2 = p.clone();
            let a = loom::thread::spawn(move || p2.alloc());
            let p3 = p.clone();
            let b = loom::thread::spawn(move || {
                assert!(p3.free(first));
                p3.alloc()
            });
            let a = a.join().unwrap().unwrap();
            let b = b.join().unwrap().unwrap();
            assert_ne!(a, b, "one context, one owner");
            assert_eq!(p.in_use(), 2);
            assert_eq!(p.alloc(), None);
        });
    }

    /// A signal through a pool racing the context's free: at most one delivery, counters
    /// consistent, a pending signal dropped and reported.
    #[test]
    fn loom_signal_races_free() {
        for mask in [MaskState::Unmasked, MaskState::Masked] {
            model(move || {
                let p = Arc::new(ContextPool::<1>::new());
                let sink = Arc::new(CountingSink::default());
                let id = p.alloc().unwrap();
                p.get(id).unwrap().enable(Target { slot: 0, vector: 0x40 }, mask);
                let (p2, s2) = (p.clone(), sink.clone());
                let signaller = loom::thread::spawn(move || p2.signal(id, &*s2).unwrap());
                let p3 = p.clone();
                let freer = loom::thread::spawn(move || p3.free(id));
                let outcome = signaller.join().unwrap();
                assert!(freer.join().unwrap());
                let c = p.get(id).unwrap();
                let s = c.stats();
                assert!(sink.total() <= 1);
                assert_eq!(sink.total(), u64::from(outcome == Signal::Delivered));
                assert_eq!(s.raised, 1);
                assert_eq!(s.delivered + s.coalesced + s.pending_while_masked + s.spurious, 1);
                assert_eq!(s.dropped, s.pending_while_masked, "a pending signal is dropped by the free");
                assert!(!c.state().enabled && !c.is_pending());
            });
        }
    }
}
