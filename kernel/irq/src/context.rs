//! The per-vector context: the one place a signal (a device interrupt, a software trigger) is
//! routed to its sink. Its whole routing state — guest vector, target slot, enabled, masked,
//! pending, generation — is ONE `AtomicU64`, so the data path reads it with a single load and
//! every configuration change is a single compare-and-swap: there is no moment at which a
//! signal can see half a reconfiguration.
//!
//! Exactly-once rules (DESIGN.md, core rule 3):
//! - a signal arriving while the context is masked sets the pending bit (the PBA bit) and is
//!   delivered exactly once, by the `unmask` that clears it (the clear and the delivery are one
//!   CAS: two racing unmasks cannot both deliver it, a racing signal either sets the bit before
//!   the CAS — and is delivered by the unmask — or sees the context unmasked after it);
//! - a signal racing a retarget is delivered exactly once, to the target read by its one load
//!   (the old or the new one);
//! - mask, unmask, retarget, enable and disable never lose a signal: a pending bit survives
//!   mask/retarget and is only dropped by `disable`, which reports it (and counts it).
//!
//! Counters (Relaxed `AtomicU64`s on their own cache line, so a CPU reconfiguring the word
//! does not steal the line the signalling CPU counts on; see [`ContextStats`] for the exact
//! accounting): every `signal` counts exactly one of `delivered`, `coalesced`,
//! `pending_while_masked`, `spurious`; every delivery made by `unmask` (a flush) counts
//! `flushed` and one of `delivered`, `coalesced`; every pending bit dropped by `disable`
//! counts `dropped`. `raised` is derived from those (one atomic add per signal instead of
//! two; measured in `benches/delivery.rs`).

use crate::sync::{AtomicU64, Ordering};
use conduit_abi::irq::IrqStats;

/// Where a signal goes: guest vector `vector` of the vCPU running on physical CPU `slot`
/// (Conduit pins one vCPU per CPU, so the slot names the vCPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Target {
    /// Physical CPU (slot) running the target vCPU.
    pub slot: u8,
    /// Guest vector to make pending in that vCPU's IRR.
    pub vector: u8,
}

/// Where delivered signals end up: the target vCPU's pending-vector bitmap (its virtual IRR),
/// plus whatever kick the kernel sends to make the vCPU notice.
pub trait Sink {
    /// Makes `target.vector` pending for the vCPU on `target.slot`. Returns true when the
    /// vector is newly pending, false when it merged with an already pending one (or the sink
    /// refused it: an unknown slot, a reserved vector).
    fn deliver(&self, target: Target) -> bool;
}

impl<S: Sink + ?Sized> Sink for &S {
    fn deliver(&self, target: Target) -> bool {
        (**self).deliver(target)
    }
}

/// What became of one signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Newly pending in the target vCPU's IRR.
    Delivered,
    /// Merged with a signal already pending: in the vCPU's IRR, or behind the mask (the
    /// pending bit was already set).
    Coalesced,
    /// Arrived while masked: the pending bit is now set; `unmask` delivers it once.
    PendingWhileMasked,
    /// No binding: the context is disabled (or, in a front end, the vector is not live).
    Spurious,
}

/// Whether a vector is masked (an argument where a bare `bool` would read badly).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MaskState {
    /// Signals become pending.
    Masked,
    /// Signals are delivered.
    Unmasked,
}

impl MaskState {
    /// `Masked` when `masked`.
    pub const fn from_masked(masked: bool) -> Self {
        if masked { Self::Masked } else { Self::Unmasked }
    }

    /// Whether this is `Masked`.
    pub const fn is_masked(self) -> bool {
        matches!(self, Self::Masked)
    }
}

/// A snapshot of a context's state word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct State {
    /// Current target.
    pub target: Target,
    /// Bound: signals are routed (otherwise they are spurious).
    pub enabled: bool,
    /// Signals become pending instead of being delivered.
    pub masked: bool,
    /// A signal arrived while masked and has not been delivered yet (the PBA bit).
    pub pending: bool,
    /// Bumped (wrapping) by every reconfiguration: enable, disable, mask, unmask, retarget.
    pub generation: u32,
}

/// The state word's layout.
mod word {
    use super::{State, Target};

    /// Guest vector, bits 7:0.
    pub const VECTOR_SHIFT: u32 = 0;
    /// Target slot, bits 15:8.
    pub const SLOT_SHIFT: u32 = 8;
    /// Both target fields.
    pub const TARGET_MASK: u64 = 0xffff;
    /// Bound.
    pub const ENABLED: u64 = 1 << 16;
    /// Masked.
    pub const MASKED: u64 = 1 << 17;
    /// Pending behind the mask.
    pub const PENDING: u64 = 1 << 18;
    /// Generation, bits 63:32.
    pub const GENERATION_SHIFT: u32 = 32;
    /// The generation field.
    pub const GENERATION_MASK: u64 = 0xffff_ffff << GENERATION_SHIFT;
    /// The reset word: disabled, masked, nothing pending, generation 0.
    pub const RESET: u64 = MASKED;

    pub const fn target_bits(t: Target) -> u64 {
        (t.vector as u64) << VECTOR_SHIFT | (t.slot as u64) << SLOT_SHIFT
    }

    pub const fn target(w: u64) -> Target {
        Target { slot: (w >> SLOT_SHIFT) as u8, vector: (w >> VECTOR_SHIFT) as u8 }
    }

    pub const fn generation(w: u64) -> u32 {
        (w >> GENERATION_SHIFT) as u32
    }

    /// `w` with its generation bumped (wrapping: the generation only tells changes apart).
    pub const fn bump(w: u64) -> u64 {
        let g = generation(w).wrapping_add(1);
        (w & 0xffff_ffff) | (g as u64) << GENERATION_SHIFT
    }

    pub const fn decode(w: u64) -> State {
        State {
            target: target(w),
            enabled: w & ENABLED != 0,
            masked: w & MASKED != 0,
            pending: w & PENDING != 0,
            generation: generation(w),
        }
    }
}

/// A context's counters, read one by one (each exact, the set not a single snapshot while
/// signals run).
///
/// Accounting, exact once the context is quiescent:
/// - each `signal` counts exactly one outcome: signal-time `delivered`, signal-time
///   `coalesced`, `pending_while_masked` or `spurious`;
/// - `delivered` and `coalesced` also count the deliveries `unmask` makes (`flushed`);
/// - so `raised` — the number of `signal` calls — is
///   `delivered + coalesced + pending_while_masked + spurious − flushed`, and is computed
///   that way rather than counted (the tests check it against the signals they made);
/// - every pending bit set is flushed once, dropped once (by `disable`) or still pending:
///   `pending_while_masked == flushed + dropped + pending`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ContextStats {
    /// Signals that reached the context (derived, see above).
    pub raised: u64,
    /// Deliveries newly pending in the vCPU's IRR (at signal time or by `unmask`).
    pub delivered: u64,
    /// Signals merged into one already pending (in the IRR, or behind the mask), plus `unmask`
    /// deliveries merged in the IRR.
    pub coalesced: u64,
    /// Signals that set the pending bit (arrived while masked, bit clear).
    pub pending_while_masked: u64,
    /// Signals while disabled.
    pub spurious: u64,
    /// Pending signals delivered by `unmask`.
    pub flushed: u64,
    /// Pending signals dropped by `disable`.
    pub dropped: u64,
}

impl ContextStats {
    /// The ABI's view (`IRQ_STATS`), with the current PBA bit.
    pub const fn irq_stats(&self, pending: bool) -> IrqStats {
        IrqStats {
            raised: self.raised,
            delivered: self.delivered,
            coalesced: self.coalesced,
            pending_while_masked: self.pending_while_masked,
            spurious: self.spurious,
            pending: pending as u64,
        }
    }

    /// Adds `other` (wrapping: counters never panic).
    pub fn accumulate(&mut self, other: &Self) {
        self.raised = self.raised.wrapping_add(other.raised);
        self.delivered = self.delivered.wrapping_add(other.delivered);
        self.coalesced = self.coalesced.wrapping_add(other.coalesced);
        self.pending_while_masked = self.pending_while_masked.wrapping_add(other.pending_while_masked);
        self.spurious = self.spurious.wrapping_add(other.spurious);
        self.flushed = self.flushed.wrapping_add(other.flushed);
        self.dropped = self.dropped.wrapping_add(other.dropped);
    }
}

/// The live counters (Relaxed: they order nothing). `raised` is derived.
#[derive(Debug)]
pub(crate) struct Counters {
    delivered: AtomicU64,
    coalesced: AtomicU64,
    pending_while_masked: AtomicU64,
    spurious: AtomicU64,
    flushed: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Self {
            delivered: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            pending_while_masked: AtomicU64::new(0),
            spurious: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Self {
            delivered: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            pending_while_masked: AtomicU64::new(0),
            spurious: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    fn all(&self) -> [&AtomicU64; 6] {
        [&self.delivered, &self.coalesced, &self.pending_while_masked, &self.spurious, &self.flushed, &self.dropped]
    }

    pub(crate) fn snapshot(&self) -> ContextStats {
        let [d, c, p, s, f, x] = self.all().map(|a| a.load(Ordering::Relaxed));
        ContextStats {
            raised: d.wrapping_add(c).wrapping_add(p).wrapping_add(s).wrapping_sub(f),
            delivered: d,
            coalesced: c,
            pending_while_masked: p,
            spurious: s,
            flushed: f,
            dropped: x,
        }
    }

    pub(crate) fn reset(&self) {
        for a in self.all() {
            a.store(0, Ordering::Relaxed);
        }
    }

    /// Adds `s` (folding a freed context's counters into a longer-lived set).
    pub(crate) fn absorb(&self, s: &ContextStats) {
        let v = [s.delivered, s.coalesced, s.pending_while_masked, s.spurious, s.flushed, s.dropped];
        for (a, v) in self.all().into_iter().zip(v) {
            if v != 0 {
                a.fetch_add(v, Ordering::Relaxed);
            }
        }
    }

    /// One signal outcome.
    pub(crate) fn outcome(&self, s: Signal) {
        let a = match s {
            Signal::Delivered => &self.delivered,
            Signal::Coalesced => &self.coalesced,
            Signal::PendingWhileMasked => &self.pending_while_masked,
            Signal::Spurious => &self.spurious,
        };
        a.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn flushed(&self) {
        self.flushed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Delivers to `t` and names the outcome.
pub(crate) fn deliver(sink: &(impl Sink + ?Sized), t: Target) -> Signal {
    if sink.deliver(t) { Signal::Delivered } else { Signal::Coalesced }
}

/// One vector's routing state and counters: two cache lines, the state word alone on the
/// first (reconfigured by the control path), the counters on the second (written by the CPU
/// that signals). Contexts never share a line.
#[derive(Debug)]
#[repr(align(64))]
pub struct Context {
    word: Line,
    counters: Counters,
}

/// An atomic word alone on its cache line.
#[derive(Debug)]
#[repr(align(64))]
struct Line(AtomicU64);

impl core::ops::Deref for Line {
    type Target = AtomicU64;

    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

impl Default for Context {
    fn default() -> Self {
        Self::new()
    }
}

impl Context {
    /// Disabled, masked, nothing pending, counters zero.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self { word: Line(AtomicU64::new(word::RESET)), counters: Counters::new() }
    }

    /// Disabled, masked, nothing pending, counters zero.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self { word: Line(AtomicU64::new(word::RESET)), counters: Counters::new() }
    }

    /// The data path: one signal. No lock, no allocation, O(1): one load of the word, then
    /// either the delivery to the target of that same load, or (masked) a CAS of the pending
    /// bit, retried only when a concurrent reconfiguration changed the word.
    pub fn signal(&self, sink: &(impl Sink + ?Sized)) -> Signal {
        let mut cur = self.word.load(Ordering::Acquire);
        let outcome = loop {
            if cur & word::ENABLED == 0 {
                break Signal::Spurious;
            }
            if cur & word::MASKED == 0 {
                break deliver(sink, word::target(cur));
            }
            if cur & word::PENDING != 0 {
                break Signal::Coalesced;
            }
            match self.word.compare_exchange_weak(cur, cur | word::PENDING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break Signal::PendingWhileMasked,
                Err(now) => cur = now,
            }
        };
        self.counters.outcome(outcome);
        outcome
    }

    /// Applies `f` to the word until the CAS succeeds; `f` returns `None` to leave the word
    /// alone. Returns the word that was replaced (or left).
    fn update(&self, mut f: impl FnMut(u64) -> Option<u64>) -> (u64, bool) {
        let mut cur = self.word.load(Ordering::Acquire);
        loop {
            let Some(new) = f(cur) else { return (cur, false) };
            match self.word.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return (cur, true),
                Err(now) => cur = now,
            }
        }
    }

    /// Binds the context to `target`, masked or not. Only from disabled: returns false (and
    /// changes nothing) when the context is already enabled — reconfigure a live context with
    /// `retarget`, `mask`, `unmask`.
    pub fn enable(&self, target: Target, mask: MaskState) -> bool {
        let (_, changed) = self.update(|cur| {
            if cur & word::ENABLED != 0 {
                return None;
            }
            let masked = if mask.is_masked() { word::MASKED } else { 0 };
            Some(word::bump(
                (cur & !(word::TARGET_MASK | word::MASKED | word::PENDING))
                    | word::target_bits(target)
                    | word::ENABLED
                    | masked,
            ))
        });
        changed
    }

    /// Masks: later signals become pending. A no-op (no generation bump) when masked already.
    pub fn mask(&self) {
        self.update(|cur| if cur & word::MASKED != 0 { None } else { Some(word::bump(cur | word::MASKED)) });
    }

    /// Unmasks, delivering a pending signal exactly once (clearing masked and pending and
    /// choosing the delivery target is one CAS). Returns whether a pending signal was
    /// delivered (flushed).
    pub fn unmask(&self, sink: &(impl Sink + ?Sized)) -> bool {
        let (old, changed) = self.update(|cur| {
            if cur & word::MASKED == 0 { None } else { Some(word::bump(cur & !(word::MASKED | word::PENDING))) }
        });
        if !changed || old & word::PENDING == 0 {
            return false;
        }
        self.counters.flushed();
        self.counters.outcome(deliver(sink, word::target(old)));
        true
    }

    /// Points the context at `target` (a pending signal stays pending and goes to the new
    /// target on unmask). Returns the previous target.
    pub fn retarget(&self, target: Target) -> Target {
        let bits = word::target_bits(target);
        let (old, _) = self.update(|cur| {
            if cur & word::TARGET_MASK == bits { None } else { Some(word::bump((cur & !word::TARGET_MASK) | bits)) }
        });
        word::target(old)
    }

    /// Unbinds: later signals are spurious. Leaves the context masked (its reset state) with
    /// the same target. Returns whether a pending signal was dropped (also counted).
    pub fn disable(&self) -> bool {
        let (old, changed) = self.update(|cur| {
            let new = word::bump((cur & (word::GENERATION_MASK | word::TARGET_MASK)) | word::MASKED);
            if cur & (word::ENABLED | word::PENDING) == 0 && cur & word::MASKED != 0 { None } else { Some(new) }
        });
        let dropped = changed && old & word::PENDING != 0;
        if dropped {
            self.counters.dropped();
        }
        dropped
    }

    /// Sets the pending bit without a signal, when enabled and masked: carries a pending bit
    /// latched elsewhere (a front end's, before the context existed) into the context. Counts
    /// nothing. Returns whether the bit is now set.
    pub(crate) fn carry_pending(&self) -> bool {
        let (old, changed) = self.update(|cur| {
            if cur & (word::ENABLED | word::MASKED) == word::ENABLED | word::MASKED && cur & word::PENDING == 0 {
                Some(cur | word::PENDING)
            } else {
                None
            }
        });
        changed || old & word::PENDING != 0
    }

    /// The PBA bit: a signal is pending behind the mask.
    pub fn is_pending(&self) -> bool {
        self.word.load(Ordering::Acquire) & word::PENDING != 0
    }

    /// A snapshot of the state word.
    pub fn state(&self) -> State {
        word::decode(self.word.load(Ordering::Acquire))
    }

    /// The counters.
    pub fn stats(&self) -> ContextStats {
        self.counters.snapshot()
    }

    /// The counters as the ABI reports them (`IRQ_STATS`).
    pub fn irq_stats(&self) -> IrqStats {
        let pending = self.is_pending();
        self.stats().irq_stats(pending)
    }

    /// Back to the reset state, counters zero (a freshly allocated context). The generation
    /// keeps counting, so a stale snapshot never matches.
    pub(crate) fn reset(&self) {
        self.update(|cur| Some(word::bump((cur & word::GENERATION_MASK) | word::RESET)));
        self.counters.reset();
    }
}

impl From<&Context> for IrqStats {
    fn from(c: &Context) -> Self {
        c.irq_stats()
    }
}

#[cfg(all(test, not(loom)))]
pub(crate) mod tests {
    use super::*;
    use core::cell::RefCell;
    use proptest::prelude::*;
    use std::vec::Vec;

    /// Records every delivery; a target already pending (not yet `take`n) coalesces, as in
    /// an IRR.
    #[derive(Debug, Default)]
    pub(crate) struct RecordingSink {
        pub log: RefCell<Vec<Target>>,
        pub irr: RefCell<Vec<Target>>,
        /// When set, every delivery reports "newly pending" (no IRR model).
        pub always_new: bool,
    }

    impl RecordingSink {
        pub fn new() -> Self {
            Self { always_new: true, ..Self::default() }
        }
        pub fn with_irr() -> Self {
            Self::default()
        }
        pub fn take_log(&self) -> Vec<Target> {
            core::mem::take(&mut *self.log.borrow_mut())
        }
        pub fn count(&self) -> usize {
            self.log.borrow().len()
        }
        pub fn ack(&self, t: Target) {
            self.irr.borrow_mut().retain(|&x| x != t);
        }
    }

    impl Sink for RecordingSink {
        fn deliver(&self, target: Target) -> bool {
            self.log.borrow_mut().push(target);
            if self.always_new {
                return true;
            }
            let mut irr = self.irr.borrow_mut();
            if irr.contains(&target) {
                false
            } else {
                irr.push(target);
                true
            }
        }
    }

    const T0: Target = Target { slot: 0, vector: 0x40 };
    const T1: Target = Target { slot: 1, vector: 0x41 };

    /// The accounting after `signals` calls of `signal`.
    fn consistent(c: &Context, signals: u64) {
        let s = c.stats();
        let st = c.state();
        assert_eq!(s.raised, signals, "every signal has exactly one outcome: {s:?}");
        assert_eq!(s.raised + s.flushed, s.delivered + s.coalesced + s.pending_while_masked + s.spurious, "{s:?}");
        assert_eq!(s.pending_while_masked, s.flushed + s.dropped + u64::from(st.pending), "{s:?} {st:?}");
    }

    #[test]
    fn word_layout() {
        let w = word::target_bits(Target { slot: 0xab, vector: 0xcd });
        assert_eq!(w, 0xabcd);
        assert_eq!(word::target(w | word::ENABLED | word::MASKED | word::PENDING), Target { slot: 0xab, vector: 0xcd });
        assert_eq!(word::generation(word::bump(u64::MAX)), 0, "the generation wraps");
        assert_eq!(word::bump(u64::MAX) & 0xffff_ffff, 0xffff_ffff, "bumping keeps the low half");
        let c = Context::new();
        assert_eq!(c.state(), State { masked: true, ..State::default() });
    }

    #[test]
    fn two_cache_lines() {
        assert_eq!(core::mem::size_of::<Context>(), 128);
        assert_eq!(core::mem::align_of::<Context>(), 64);
    }

    #[test]
    fn disabled_is_spurious() {
        let c = Context::new();
        let s = RecordingSink::new();
        assert_eq!(c.signal(&s), Signal::Spurious);
        assert_eq!(s.count(), 0);
        assert_eq!(c.stats(), ContextStats { raised: 1, spurious: 1, ..ContextStats::default() });
        consistent(&c, 1);
    }

    #[test]
    fn delivers_and_coalesces() {
        let c = Context::new();
        let s = RecordingSink::with_irr();
        assert!(c.enable(T0, MaskState::Unmasked));
        assert!(!c.enable(T1, MaskState::Masked), "enable only from disabled");
        assert_eq!(c.state().target, T0);
        assert_eq!(c.signal(&s), Signal::Delivered);
        assert_eq!(c.signal(&s), Signal::Coalesced, "still in the IRR");
        s.ack(T0);
        assert_eq!(c.signal(&s), Signal::Delivered);
        assert_eq!(s.take_log(), [T0, T0, T0]);
        assert_eq!(c.stats(), ContextStats { raised: 3, delivered: 2, coalesced: 1, ..ContextStats::default() });
        consistent(&c, 3);
    }

    #[test]
    fn masked_signal_is_delivered_once_on_unmask() {
        let c = Context::new();
        let s = RecordingSink::new();
        assert!(c.enable(T0, MaskState::Masked));
        assert!(!c.unmask(&s), "nothing pending yet");
        c.mask();
        assert_eq!(c.signal(&s), Signal::PendingWhileMasked);
        assert_eq!(c.signal(&s), Signal::Coalesced, "merged behind the mask");
        assert!(c.is_pending());
        assert_eq!(s.count(), 0);
        c.retarget(T1);
        assert!(c.is_pending(), "a retarget keeps the pending bit");
        assert!(c.unmask(&s));
        assert!(!c.unmask(&s), "delivered once");
        assert_eq!(s.take_log(), [T1], "to the target at unmask time");
        assert!(!c.is_pending());
        let st = c.stats();
        assert_eq!((st.raised, st.pending_while_masked, st.coalesced, st.flushed, st.delivered), (2, 1, 1, 1, 1));
        consistent(&c, 2);
    }

    #[test]
    fn disable_drops_and_reports() {
        let c = Context::new();
        let s = RecordingSink::new();
        assert!(!c.disable(), "nothing to drop");
        c.enable(T0, MaskState::Masked);
        c.signal(&s);
        assert!(c.disable());
        assert!(!c.disable());
        assert_eq!(c.signal(&s), Signal::Spurious);
        assert!(!c.unmask(&s), "nothing delivered after the drop");
        assert_eq!(s.count(), 0);
        assert_eq!(c.stats().dropped, 1);
        consistent(&c, 2);
    }

    #[test]
    fn generation_counts_reconfigurations() {
        let c = Context::new();
        let s = RecordingSink::new();
        let g = |c: &Context| c.state().generation;
        let g0 = g(&c);
        c.enable(T0, MaskState::Unmasked);
        assert_eq!(g(&c), g0 + 1);
        c.signal(&s);
        assert_eq!(g(&c), g0 + 1, "signals are not reconfigurations");
        c.mask();
        c.mask();
        assert_eq!(g(&c), g0 + 2, "a no-op mask does not bump");
        c.signal(&s);
        assert_eq!(g(&c), g0 + 2, "setting the pending bit is not a reconfiguration");
        c.retarget(T1);
        c.retarget(T1);
        assert_eq!(g(&c), g0 + 3);
        c.unmask(&s);
        assert_eq!(g(&c), g0 + 4);
        c.disable();
        assert_eq!(g(&c), g0 + 5);
    }

    #[test]
    fn carry_pending() {
        let c = Context::new();
        let s = RecordingSink::new();
        assert!(!c.carry_pending(), "disabled: refused");
        c.enable(T0, MaskState::Unmasked);
        assert!(!c.carry_pending(), "unmasked: refused");
        c.mask();
        assert!(c.carry_pending());
        assert!(c.carry_pending(), "already set");
        assert!(c.unmask(&s));
        assert_eq!(s.take_log(), [T0]);
    }

    #[test]
    fn irq_stats_conversion() {
        let c = Context::new();
        let s = RecordingSink::new();
        c.enable(T0, MaskState::Masked);
        c.signal(&s);
        let st = IrqStats::from(&c);
        assert_eq!(st, IrqStats { raised: 1, pending_while_masked: 1, pending: 1, ..IrqStats::default() });
    }

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Signal,
        Enable(u8, bool),
        Disable,
        Mask,
        Unmask,
        Retarget(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Signal),
            1 => (0..3u8, any::<bool>()).prop_map(|(v, m)| Op::Enable(v, m)),
            1 => Just(Op::Disable),
            2 => Just(Op::Mask),
            2 => Just(Op::Unmask),
            1 => (0..3u8).prop_map(Op::Retarget),
        ]
    }

    proptest! {
        /// The context against a plain model: same deliveries, same pending bit, counters
        /// consistent after every step.
        #[test]
        fn matches_model(ops in proptest::collection::vec(op(), 0..100)) {
            let c = Context::new();
            let s = RecordingSink::new();
            let (mut en, mut masked, mut pending, mut t) = (false, true, false, Target::default());
            let mut signals = 0;
            let tgt = |v: u8| Target { slot: v, vector: 0x40 + v };
            for op in ops {
                let mut want = Vec::new();
                match op {
                    Op::Signal => {
                        signals += 1;
                        let r = c.signal(&s);
                        let m = if !en { Signal::Spurious } else if !masked { want.push(t); Signal::Delivered }
                            else if pending { Signal::Coalesced } else { pending = true; Signal::PendingWhileMasked };
                        prop_assert_eq!(r, m);
                    }
                    Op::Enable(v, m) => {
                        prop_assert_eq!(c.enable(tgt(v), MaskState::from_masked(m)), !en);
                        if !en { en = true; masked = m; t = tgt(v); }
                    }
                    Op::Disable => { prop_assert_eq!(c.disable(), pending); en = false; masked = true; pending = false; }
                    Op::Mask => { c.mask(); masked = true; }
                    Op::Unmask => {
                        prop_assert_eq!(c.unmask(&s), masked && pending);
                        if masked && pending { want.push(t); }
                        masked = false; pending = false;
                    }
                    Op::Retarget(v) => { c.retarget(tgt(v)); t = tgt(v); }
                }
                prop_assert_eq!(s.take_log(), want);
                let st = c.state();
                prop_assert_eq!((st.enabled, st.masked, st.pending, st.target), (en, masked, pending, t));
                consistent(&c, signals);
            }
        }
    }
}

#[cfg(all(test, loom))]
pub(crate) mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicU64 as LoomU64;

    /// Counts deliveries per slot (two slots), with IRR semantics per slot.
    #[derive(Debug)]
    pub(crate) struct CountingSink {
        pub hits: [LoomU64; 2],
    }

    impl Default for CountingSink {
        fn default() -> Self {
            Self { hits: [LoomU64::new(0), LoomU64::new(0)] }
        }
    }

    impl Sink for CountingSink {
        fn deliver(&self, t: Target) -> bool {
            match self.hits.get(usize::from(t.slot)) {
                Some(h) => h.fetch_add(1, Ordering::AcqRel) == 0,
                None => false,
            }
        }
    }

    /// Counts deliveries and reports each as newly pending.
    #[derive(Debug)]
    pub(crate) struct AlwaysNew(pub LoomU64);

    impl Sink for AlwaysNew {
        fn deliver(&self, _: Target) -> bool {
            self.0.fetch_add(1, Ordering::AcqRel);
            true
        }
    }

    impl CountingSink {
        pub fn total(&self) -> u64 {
            self.hits.iter().map(|h| h.load(Ordering::Acquire)).sum()
        }
        pub fn at(&self, slot: usize) -> u64 {
            self.hits[slot].load(Ordering::Acquire)
        }
    }

    /// `loom::model` with a preemption bound (3 unless `LOOM_MAX_PREEMPTIONS` says
    /// otherwise): loom's unbounded search was seen to miss a lost-interrupt interleaving
    /// (a non-atomic unmask) that the bounded one finds.
    pub(crate) fn model<F: Fn() + Sync + Send + 'static>(f: F) {
        let mut b = loom::model::Builder::new();
        if b.preemption_bound.is_none() {
            b.preemption_bound = Some(3);
        }
        b.check(f);
    }

    const T0: Target = Target { slot: 0, vector: 0x40 };
    const T1: Target = Target { slot: 1, vector: 0x41 };

    /// The accounting after one `signal`.
    fn consistent(c: &Context) {
        let s = c.stats();
        assert_eq!(s.raised, 1, "the one signal has exactly one outcome: {s:?}");
        assert_eq!(s.pending_while_masked, s.flushed + s.dropped + u64::from(c.is_pending()), "{s:?}");
    }

    /// A signal racing mask-then-unmask of an unmasked context is delivered exactly once:
    /// directly, or as the pending bit the unmask flushes.
    #[test]
    fn loom_signal_races_mask_unmask() {
        model(|| {
            let c = Arc::new(Context::new());
            let sink = Arc::new(CountingSink::default());
            c.enable(T0, MaskState::Unmasked);
            let (c2, s2) = (c.clone(), sink.clone());
            let signaller = loom::thread::spawn(move || c2.signal(&*s2));
            let (c3, s3) = (c.clone(), sink.clone());
            let controller = loom::thread::spawn(move || {
                c3.mask();
                c3.unmask(&*s3)
            });
            let outcome = signaller.join().unwrap();
            let flushed = controller.join().unwrap();
            assert_eq!(sink.total(), 1, "exactly once ({outcome:?}, flushed {flushed})");
            assert_eq!(flushed, outcome == Signal::PendingWhileMasked);
            assert!(!c.is_pending());
            consistent(&c);
        });
    }

    /// A signal racing an unmask of a masked context: never lost, never twice.
    #[test]
    fn loom_signal_races_unmask() {
        model(|| {
            let c = Arc::new(Context::new());
            let sink = Arc::new(CountingSink::default());
            c.enable(T0, MaskState::Masked);
            let (c2, s2) = (c.clone(), sink.clone());
            let signaller = loom::thread::spawn(move || c2.signal(&*s2));
            let (c3, s3) = (c.clone(), sink.clone());
            let controller = loom::thread::spawn(move || c3.unmask(&*s3));
            signaller.join().unwrap();
            controller.join().unwrap();
            assert_eq!(sink.total(), 1);
            assert!(!c.is_pending());
            consistent(&c);
        });
    }

    /// Two signals racing an unmask: each is delivered, or merged behind the mask into a
    /// pending signal that the unmask delivers — never lost.
    #[test]
    fn loom_two_signals_race_unmask() {
        model(|| {
            let c = Arc::new(Context::new());
            let sink = Arc::new(AlwaysNew(LoomU64::new(0)));
            c.enable(T0, MaskState::Masked);
            let signallers: [_; 2] = core::array::from_fn(|_| {
                let (c, s) = (c.clone(), sink.clone());
                loom::thread::spawn(move || c.signal(&*s))
            });
            let flushed = c.unmask(&*sink);
            let outcomes = signallers.map(|h| h.join().unwrap());
            let count = |o: Signal| outcomes.iter().filter(|&&x| x == o).count() as u64;
            // The sink never merges, so `Coalesced` means merged behind the mask.
            let deliveries = sink.0.load(Ordering::Acquire);
            assert_eq!(count(Signal::PendingWhileMasked), u64::from(flushed), "each pending bit flushed once");
            assert_eq!(count(Signal::Delivered) + u64::from(flushed), deliveries, "{outcomes:?} flushed {flushed}");
            assert_eq!(deliveries + count(Signal::Coalesced), 2, "none lost: {outcomes:?}");
            assert!(deliveries >= 1);
            assert!(!c.is_pending());
            let s = c.stats();
            assert_eq!(s.raised, 2);
            assert_eq!(s.pending_while_masked, s.flushed);
        });
    }

    /// A signal racing a retarget is delivered once, to the old or the new target; masked,
    /// the pending signal follows the retarget and the unmask delivers it to the new target.
    #[test]
    fn loom_signal_races_retarget() {
        for mask in [MaskState::Unmasked, MaskState::Masked] {
            model(move || {
                let c = Arc::new(Context::new());
                let sink = Arc::new(CountingSink::default());
                c.enable(T0, mask);
                let (c2, s2) = (c.clone(), sink.clone());
                let signaller = loom::thread::spawn(move || c2.signal(&*s2));
                let c3 = c.clone();
                let controller = loom::thread::spawn(move || c3.retarget(T1));
                signaller.join().unwrap();
                assert_eq!(controller.join().unwrap(), T0);
                if mask.is_masked() {
                    assert_eq!(sink.total(), 0);
                    assert!(c.unmask(&*sink));
                    assert_eq!(sink.at(1), 1, "the pending signal goes to the new target");
                }
                assert_eq!(sink.total(), 1, "exactly once, old or new");
                consistent(&c);
            });
        }
    }

    /// A signal racing a disable is delivered at most once; a pending bit is either flushed
    /// or reported dropped, never both; the counters add up.
    #[test]
    fn loom_signal_races_disable() {
        for mask in [MaskState::Unmasked, MaskState::Masked] {
            model(move || {
                let c = Arc::new(Context::new());
                let sink = Arc::new(CountingSink::default());
                c.enable(T0, mask);
                let (c2, s2) = (c.clone(), sink.clone());
                let signaller = loom::thread::spawn(move || c2.signal(&*s2));
                let c3 = c.clone();
                let controller = loom::thread::spawn(move || c3.disable());
                let outcome = signaller.join().unwrap();
                let dropped = controller.join().unwrap();
                assert!(sink.total() <= 1);
                assert_eq!(dropped, outcome == Signal::PendingWhileMasked, "pending ⇒ dropped, reported");
                assert!(!c.unmask(&*sink), "nothing survives the disable");
                assert_eq!(sink.total(), u64::from(outcome == Signal::Delivered));
                consistent(&c);
            });
        }
    }
}
