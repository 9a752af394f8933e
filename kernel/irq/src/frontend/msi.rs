//! The MSI (multi-message) front end: one address/data pair for 1–32 vectors (a power of
//! two); vector `i` uses the message data with its low bits replaced by `i` (the function
//! modifies the low bits of Message Data: PCI Local Bus, "Message Data for MSI"; for the
//! aligned data drivers write this is data + i). Optional per-vector masking.
//!
//! NORESIZE (seed 003): the enabled vector count cannot change while MSI is enabled — that
//! needs MSI off, during which the device's interrupts would go to INTx and be lost. A
//! Multiple Message Enable change while enabled is refused (the count stays) and counted.
//! Vectors are activated when MSI is enabled (all of them: MSI has no dynamic allocation),
//! each as soon as its message is deliverable.
//!
//! The register writes come from the virtual config space (`conduit_pci::vconfig`'s
//! `MsiControl`, `MsiAddress`, `MsiData`, `MsiMask` events); the front end keeps its own copy.

use super::{Backend, Binding, FrontEndStats, Nowhere, Stat, Stats, VcpuSlots, Want, message_target};
use crate::context::{ContextStats, Signal, Sink};
use crate::pool::{ContextId, ContextPool};
use conduit_abi::irq::IrqStats;

/// Most vectors an MSI function has (Multiple Message Capable ≤ 5).
pub const MAX_MSI_VECTORS: usize = 32;

/// Largest log2 vector count.
const MAX_LOG2: u8 = 5;

/// MSI Message Control as far as interrupt routing cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsiControl {
    /// MSI Enable.
    pub enabled: bool,
    /// Multiple Message Enable: log2 of the vectors enabled.
    pub vectors_log2: u8,
}

/// An MSI function's interrupt front end, contexts from a pool of `P`.
///
/// Dropping the front end deactivates and frees every vector (as disabling MSI does).
#[derive(Debug)]
pub struct MsiFrontEnd<'p, B: Backend, const P: usize> {
    pool: &'p ContextPool<P>,
    backend: B,
    capable_log2: u8,
    per_vector_mask: bool,
    control: MsiControl,
    address: u64,
    data: u16,
    mask_bits: u32,
    slots: VcpuSlots,
    vectors: [Binding; MAX_MSI_VECTORS],
    stats: Stats,
}

impl<'p, B: Backend, const P: usize> MsiFrontEnd<'p, B, P> {
    /// A front end in the reset state (MSI disabled, one vector, nothing masked) for a
    /// function with `2^capable_log2` vectors (clamped to 32) and optional per-vector masking.
    #[cfg(not(loom))]
    pub const fn new(
        pool: &'p ContextPool<P>,
        backend: B,
        capable_log2: u8,
        per_vector_mask: bool,
        slots: VcpuSlots,
    ) -> Self {
        Self {
            pool,
            backend,
            capable_log2: if capable_log2 < MAX_LOG2 { capable_log2 } else { MAX_LOG2 },
            per_vector_mask,
            control: MsiControl { enabled: false, vectors_log2: 0 },
            address: 0,
            data: 0,
            mask_bits: 0,
            slots,
            vectors: [const { Binding::new() }; MAX_MSI_VECTORS],
            stats: Stats::new(),
        }
    }

    /// A front end in the reset state (MSI disabled, one vector, nothing masked) for a
    /// function with `2^capable_log2` vectors (clamped to 32) and optional per-vector masking.
    #[cfg(loom)]
    pub fn new(
        pool: &'p ContextPool<P>,
        backend: B,
        capable_log2: u8,
        per_vector_mask: bool,
        slots: VcpuSlots,
    ) -> Self {
        Self {
            pool,
            backend,
            capable_log2: capable_log2.min(MAX_LOG2),
            per_vector_mask,
            control: MsiControl { enabled: false, vectors_log2: 0 },
            address: 0,
            data: 0,
            mask_bits: 0,
            slots,
            vectors: core::array::from_fn(|_| Binding::new()),
            stats: Stats::new(),
        }
    }

    /// Vectors the function can use.
    pub const fn capable(&self) -> u32 {
        1 << self.capable_log2
    }

    /// Whether the function has per-vector masking (then the index is maskable).
    pub const fn per_vector_mask(&self) -> bool {
        self.per_vector_mask
    }

    /// MSI enable and the enabled count (log2).
    pub const fn control(&self) -> MsiControl {
        self.control
    }

    /// Vectors enabled now (0 while MSI is disabled).
    pub const fn enabled_count(&self) -> u32 {
        if self.control.enabled { 1 << self.control.vectors_log2 } else { 0 }
    }

    /// The backend.
    pub const fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The front end's own counters.
    pub fn stats(&self) -> FrontEndStats {
        self.stats.snapshot()
    }

    /// The guest wrote MSI Enable / Multiple Message Enable. A count above the capability is
    /// clamped to it; a count change while enabled is refused (NORESIZE); both counted in
    /// `refused_writes`. Returns whether the write took effect as written.
    pub fn set_control(&mut self, control: MsiControl, sink: &(impl Sink + ?Sized)) -> bool {
        let mut exact = true;
        let mut log2 = control.vectors_log2;
        if log2 > self.capable_log2 {
            log2 = self.capable_log2;
            exact = false;
        }
        if control.enabled && self.control.enabled && log2 != self.control.vectors_log2 {
            // NORESIZE: keep the live count.
            log2 = self.control.vectors_log2;
            exact = false;
        }
        if !exact {
            self.stats.count(Stat::RefusedWrite);
        }
        let new = MsiControl { enabled: control.enabled, vectors_log2: log2 };
        if new != self.control {
            self.control = new;
            self.sync_all(sink);
        }
        exact
    }

    /// The guest wrote the Message Address (both halves).
    pub fn set_address(&mut self, address: u64, sink: &(impl Sink + ?Sized)) {
        if address != self.address {
            self.address = address;
            self.sync_all(sink);
        }
    }

    /// The guest wrote the Message Data.
    pub fn set_data(&mut self, data: u16, sink: &(impl Sink + ?Sized)) {
        if data != self.data {
            self.data = data;
            self.sync_all(sink);
        }
    }

    /// The guest wrote the Mask Bits. Without per-vector masking: ignored and counted.
    pub fn set_mask(&mut self, mask_bits: u32, sink: &(impl Sink + ?Sized)) {
        if !self.per_vector_mask {
            self.stats.count(Stat::RefusedWrite);
            return;
        }
        if mask_bits != self.mask_bits {
            self.mask_bits = mask_bits;
            self.sync_all(sink);
        }
    }

    /// The vCPU → slot map changed: every live vector is retargeted.
    pub fn set_vcpu_slots(&mut self, slots: VcpuSlots, sink: &(impl Sink + ?Sized)) {
        if slots != self.slots {
            self.slots = slots;
            self.sync_all(sink);
        }
    }

    /// Back to the reset state: MSI disabled, every context freed, message zero, unmasked.
    pub fn reset(&mut self) {
        self.control = MsiControl::default();
        self.address = 0;
        self.data = 0;
        self.mask_bits = 0;
        self.sync_all(&Nowhere);
    }

    /// The Pending Bits register: bit `i` set when vector `i` is pending (enabled vectors
    /// only; 0 without per-vector masking, where nothing can be pending).
    pub fn pending_bits(&self) -> u32 {
        (0..self.enabled_count()).filter(|&i| self.is_pending(i)).fold(0, |acc, i| acc | 1 << i)
    }

    /// Vector `i` is pending (software or hardware).
    pub fn is_pending(&self, i: u32) -> bool {
        let Ok(i16) = u16::try_from(i) else { return false };
        self.binding(i).is_some_and(|b| b.pending(self.pool)) || self.backend.hardware_pending(i16)
    }

    /// A software signal for vector `i`. A vector the function does not have is spurious and
    /// counted in `bad_index`.
    pub fn signal(&self, i: u32, sink: &(impl Sink + ?Sized)) -> Signal {
        let Some(b) = self.binding(i) else {
            self.stats.count(Stat::BadIndex);
            return Signal::Spurious;
        };
        let enabled = i < self.enabled_count();
        b.signal(self.pool, sink, enabled, self.masked(i))
    }

    /// The context vector `i` delivers through, once live.
    pub fn vector_context(&self, i: u32) -> Option<ContextId> {
        self.binding(i)?.context()
    }

    /// Vector `i`'s counters since the front end was created.
    pub fn vector_counters(&self, i: u32) -> Option<ContextStats> {
        Some(self.binding(i)?.stats(self.pool))
    }

    /// Vector `i`'s counters as `IRQ_STATS` reports them.
    pub fn vector_stats(&self, i: u32) -> Option<IrqStats> {
        Some(self.vector_counters(i)?.irq_stats(self.is_pending(i)))
    }

    /// The binding of a vector the function has.
    fn binding(&self, i: u32) -> Option<&Binding> {
        if i < self.capable() { self.vectors.get(usize::try_from(i).ok()?) } else { None }
    }

    fn masked(&self, i: u32) -> bool {
        self.per_vector_mask && self.mask_bits.checked_shr(i).is_some_and(|m| m & 1 != 0)
    }

    fn sync_all(&mut self, sink: &(impl Sink + ?Sized)) {
        for i in 0..MAX_MSI_VECTORS as u32 {
            self.sync(i, sink);
        }
    }

    fn sync(&mut self, i: u32, sink: &(impl Sink + ?Sized)) {
        let count = self.enabled_count();
        let data = (u32::from(self.data) & !(count.max(1) - 1)) | i;
        let want = Want {
            enabled: i < count,
            may_activate: true,
            target: message_target(self.address, data, &self.slots),
            masked: self.masked(i),
        };
        let (Ok(index), Some(b)) = (u16::try_from(i), self.vectors.get_mut(i as usize)) else { return };
        b.sync(index, want, self.pool, &mut self.backend, sink, &self.stats);
    }
}

impl<B: Backend, const P: usize> Drop for MsiFrontEnd<'_, B, P> {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
