//! Atomics: `core`'s, or loom's when the crate is built for the loom models (`--cfg loom`).
//!
//! Only the words a reader shares with a writer — each slot's sequence word and the key and
//! action words it guards, and the writer lock — come from here. Writer-only bookkeeping
//! (per-device counts and lists, the table length) and the relaxed hit counters use
//! `core::sync::atomic` directly even under loom: the writer lock serialises the former and the
//! latter are statistics, so modelling them would only slow the models down.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One step of a spin-wait: a pause hint on hardware, a yield under loom (loom cannot make
/// progress on a thread that spins without yielding).
#[inline]
pub(crate) fn spin() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}
