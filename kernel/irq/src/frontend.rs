//! The one MSI/MSI-X front end every device uses — physical, emulated, IMS-style — with the
//! device-specific part behind a narrow [`Backend`] (DESIGN.md, "Emulated interrupts"; seed
//! 004: the front end is common code, backends connect it to hardware or to software).
//!
//! The front end owns the guest-visible state (the MSI-X table and PBA, the MSI registers) and
//! a binding per vector: the vector's context, once it has one, and what the backend was
//! told. Every guest change recomputes one vector's wanted state and moves the binding there:
//! - *dynamic allocation* (seed 000): a vector gets its context and its backend activation
//!   when it first becomes live — MSI-X: enabled, function unmasked, entry unmasked, valid
//!   message — also after MSI-X is already enabled, touching no other vector;
//! - masking only masks the context (the hardware entry, owned by Conduit, may stay unmasked):
//!   a signal while masked is the PBA bit and is delivered once on unmask;
//! - a message change retargets the context, then tells the backend;
//! - disabling frees every context and deactivates every backend vector;
//! - error paths free exactly what they allocated: a failed activation frees the context it
//!   just allocated and nothing else (the `new_ctx` symmetry of seed 000).
//!
//! Signals that arrive before a vector has a context (masked, MSI-X enabled) are latched in
//! the binding (they are the PBA bit) and carried into the context when it becomes live.

pub mod msi;
pub mod msix;

#[cfg(all(test, not(loom)))]
pub(crate) mod fake;

pub use msi::{MAX_MSI_VECTORS, MsiControl, MsiFrontEnd};
pub use msix::{MAX_TABLE_ENTRIES, MsixControl, MsixEntry, MsixFrontEnd};

use crate::context::{ContextStats, Counters, MaskState, Signal, Sink, Target, deliver};
use crate::msi as message;
use crate::pool::{ContextId, ContextPool};
use crate::sync::{AtomicBool, AtomicU64, Ordering};

/// What a front end asks of the device-specific side. Called on the control path only, with
/// the front end exclusively borrowed.
pub trait Backend {
    /// Why an operation failed.
    type Error: Copy + core::fmt::Debug;

    /// Entry `index` becomes live, delivering into context `ctx` (allocate the host vector on
    /// the target CPU, the interrupt-remapping entry, program the hardware entry...). On an
    /// error the front end frees `ctx` and expects the backend to hold nothing for `index`.
    fn activate(&mut self, index: u16, ctx: ContextId, target: Target) -> Result<(), Self::Error>;

    /// A live entry's target changed (the context already delivers to `new`; this moves the
    /// host side — vector, IRTE — for locality). On an error the backend keeps `old`, and the
    /// front end retries at the next change.
    fn retarget(&mut self, index: u16, ctx: ContextId, old: Target, new: Target) -> Result<(), Self::Error>;

    /// The entry is no longer live: free exactly what `activate` allocated.
    fn deactivate(&mut self, index: u16, ctx: ContextId);

    /// The hardware's own PBA bit (physical devices), ORed into PBA reads.
    fn hardware_pending(&self, index: u16) -> bool {
        let _ = index;
        false
    }
}

/// The software backend: nothing to allocate; signals come from the front end's `signal`
/// ("emulated interrupts": an emulated register path completes and signals the guest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Software;

impl Backend for Software {
    type Error = core::convert::Infallible;

    fn activate(&mut self, _: u16, _: ContextId, _: Target) -> Result<(), Self::Error> {
        Ok(())
    }

    fn retarget(&mut self, _: u16, _: ContextId, _: Target, _: Target) -> Result<(), Self::Error> {
        Ok(())
    }

    fn deactivate(&mut self, _: u16, _: ContextId) {}
}

/// vCPUs a front end can target (a partition's limit, `conduit_vm::partition::MAX_VCPUS`).
pub const MAX_VCPUS: usize = 8;

/// Guest destination APIC ID (= vCPU index) → physical slot running that vCPU; `None`: no
/// such vCPU (messages naming it are undeliverable).
pub type VcpuSlots = [Option<u8>; MAX_VCPUS];

/// The target a guest message asks for, through the vCPU map.
pub(crate) fn message_target(address: u64, data: u32, slots: &VcpuSlots) -> Option<Target> {
    let m = message::decode(address, data)?;
    let slot = (*slots.get(usize::from(m.dest_apic))?)?;
    Some(Target { slot, vector: m.vector })
}

/// A front end's own counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrontEndStats {
    /// Guest accesses ignored: wrong size or alignment, outside the table or PBA, PBA writes.
    pub ignored_accesses: u64,
    /// Register writes refused: MSI resize while enabled (NORESIZE), MSI count above the
    /// capability, MSI mask bits without per-vector masking.
    pub refused_writes: u64,
    /// Vectors activated (context allocated and backend activated).
    pub activations: u64,
    /// Activations the backend refused (the context was freed again).
    pub activation_failures: u64,
    /// Activations impossible: the context pool was empty.
    pub no_context: u64,
    /// Vectors deactivated (backend deactivated, context freed).
    pub deactivations: u64,
    /// Backend retargets done.
    pub retargets: u64,
    /// Backend retargets refused (the context delivers to the new target anyway).
    pub retarget_failures: u64,
    /// Live vectors unbound because their message became undeliverable.
    pub unbound: u64,
    /// `signal` calls naming a vector the device does not have.
    pub bad_index: u64,
}

/// `FrontEndStats`, live.
#[derive(Debug)]
pub(crate) struct Stats([AtomicU64; 10]);

/// One `FrontEndStats` field.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stat {
    IgnoredAccess,
    RefusedWrite,
    Activation,
    ActivationFailure,
    NoContext,
    Deactivation,
    Retarget,
    RetargetFailure,
    Unbound,
    BadIndex,
}

impl Stats {
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Self([const { AtomicU64::new(0) }; 10])
    }

    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Self(core::array::from_fn(|_| AtomicU64::new(0)))
    }

    pub(crate) fn count(&self, s: Stat) {
        if let Some(a) = self.0.get(s as usize) {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> FrontEndStats {
        let [a, b, c, d, e, f, g, h, i, j] =
            core::array::from_fn(|k| self.0.get(k).map_or(0, |a| a.load(Ordering::Relaxed)));
        FrontEndStats {
            ignored_accesses: a,
            refused_writes: b,
            activations: c,
            activation_failures: d,
            no_context: e,
            deactivations: f,
            retargets: g,
            retarget_failures: h,
            unbound: i,
            bad_index: j,
        }
    }
}

/// A sink that takes nothing (for transitions that cannot deliver: disabling).
pub(crate) struct Nowhere;

impl Sink for Nowhere {
    fn deliver(&self, _: Target) -> bool {
        false
    }
}

/// The state a vector should be in, computed from the guest-visible registers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Want {
    /// The vector exists and its index (MSI/MSI-X) is enabled.
    pub enabled: bool,
    /// It may get a context now (MSI-X: unmasked; MSI: always).
    pub may_activate: bool,
    /// Where its message points (`None`: undeliverable).
    pub target: Option<Target>,
    /// Masked (entry or function mask).
    pub masked: bool,
}

/// One vector's binding to a context and a backend.
#[derive(Debug)]
pub(crate) struct Binding {
    /// The context, from activation to deactivation.
    ctx: Option<ContextId>,
    /// The target the backend last accepted (meaningful while `ctx` is set).
    backend_target: Target,
    /// A signal arrived while masked before the vector had a context (the PBA bit).
    latched: AtomicBool,
    /// Signals counted here (no context yet) plus the counters of freed contexts.
    base: Counters,
}

impl Binding {
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Self {
            ctx: None,
            backend_target: Target { slot: 0, vector: 0 },
            latched: AtomicBool::new(false),
            base: Counters::new(),
        }
    }

    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Self {
            ctx: None,
            backend_target: Target { slot: 0, vector: 0 },
            latched: AtomicBool::new(false),
            base: Counters::new(),
        }
    }

    pub(crate) fn context(&self) -> Option<ContextId> {
        self.ctx
    }

    /// A signal for this vector; `enabled`/`masked` describe the vector now (used only before
    /// it has a context).
    pub(crate) fn signal<const P: usize>(
        &self,
        pool: &ContextPool<P>,
        sink: &(impl Sink + ?Sized),
        enabled: bool,
        masked: bool,
    ) -> Signal {
        if let Some(ctx) = self.ctx.and_then(|id| pool.get(id)) {
            return ctx.signal(sink);
        }
        let outcome = if enabled && masked {
            if self.latched.swap(true, Ordering::AcqRel) { Signal::Coalesced } else { Signal::PendingWhileMasked }
        } else {
            // Disabled, or unmasked without a context: undeliverable message, no context,
            // or the backend refused the activation.
            Signal::Spurious
        };
        self.base.outcome(outcome);
        outcome
    }

    /// The PBA bit as far as software knows it.
    pub(crate) fn pending<const P: usize>(&self, pool: &ContextPool<P>) -> bool {
        self.latched.load(Ordering::Acquire) || self.ctx.and_then(|id| pool.get(id)).is_some_and(|c| c.is_pending())
    }

    /// Counters since the front end was created (freed contexts folded in).
    pub(crate) fn stats<const P: usize>(&self, pool: &ContextPool<P>) -> ContextStats {
        let mut s = self.base.snapshot();
        if let Some(c) = self.ctx.and_then(|id| pool.get(id)) {
            s.accumulate(&c.stats());
        }
        s
    }

    /// Moves the binding to `want`.
    pub(crate) fn sync<B: Backend, const P: usize>(
        &mut self,
        index: u16,
        want: Want,
        pool: &ContextPool<P>,
        backend: &mut B,
        sink: &(impl Sink + ?Sized),
        stats: &Stats,
    ) {
        if !want.enabled {
            self.release(index, pool, backend, stats);
            if self.latched.swap(false, Ordering::AcqRel) {
                self.base.dropped();
            }
            return;
        }
        match self.ctx {
            None => self.activate(index, want, pool, backend, sink, stats),
            Some(id) => {
                let Some(ctx) = pool.get(id) else {
                    debug_assert!(false, "a binding holds an id its pool does not have");
                    self.ctx = None;
                    return;
                };
                let Some(t) = want.target else {
                    // Undeliverable message on a live vector: unbound until it is valid again
                    // (the context and the backend activation stay).
                    if ctx.state().enabled {
                        ctx.disable();
                        stats.count(Stat::Unbound);
                    }
                    return;
                };
                if !ctx.enable(t, MaskState::from_masked(want.masked)) {
                    ctx.retarget(t);
                }
                if t != self.backend_target {
                    match backend.retarget(index, id, self.backend_target, t) {
                        Ok(()) => {
                            self.backend_target = t;
                            stats.count(Stat::Retarget);
                        }
                        Err(_) => stats.count(Stat::RetargetFailure),
                    }
                }
                if want.masked {
                    ctx.mask();
                } else {
                    ctx.unmask(sink);
                }
            }
        }
    }

    fn activate<B: Backend, const P: usize>(
        &mut self,
        index: u16,
        want: Want,
        pool: &ContextPool<P>,
        backend: &mut B,
        sink: &(impl Sink + ?Sized),
        stats: &Stats,
    ) {
        let (true, Some(t)) = (want.may_activate, want.target) else { return };
        let Some(id) = pool.alloc() else {
            stats.count(Stat::NoContext);
            return;
        };
        let Some(ctx) = pool.get(id) else {
            pool.free(id);
            return;
        };
        ctx.enable(t, MaskState::from_masked(want.masked));
        if backend.activate(index, id, t).is_err() {
            // Free exactly what this activation allocated: its own context.
            self.base.absorb(&ctx.stats());
            pool.free(id);
            stats.count(Stat::ActivationFailure);
            return;
        }
        self.ctx = Some(id);
        self.backend_target = t;
        stats.count(Stat::Activation);
        if self.latched.swap(false, Ordering::AcqRel) {
            // The PBA bit latched before the context existed.
            if !want.masked {
                self.base.flushed();
                self.base.outcome(deliver(sink, t));
            } else if !ctx.carry_pending() {
                self.base.dropped();
            }
        }
    }

    /// Deactivates and frees the context, if any, folding its counters into `base`.
    fn release<B: Backend, const P: usize>(
        &mut self,
        index: u16,
        pool: &ContextPool<P>,
        backend: &mut B,
        stats: &Stats,
    ) {
        let Some(id) = self.ctx.take() else { return };
        backend.deactivate(index, id);
        if let Some(ctx) = pool.get(id) {
            ctx.disable();
            self.base.absorb(&ctx.stats());
        }
        pool.free(id);
        stats.count(Stat::Deactivation);
    }
}
