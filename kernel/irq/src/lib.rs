//! Interrupt routing, the middle of DESIGN.md's "one picture": every interrupt source reaches
//! its sink through a per-vector context whose whole state is one atomic word.
//!
//! ```text
//!  host vector ──► HostVectorTable (per CPU) ──► ContextId ──► ContextPool ──► Context ──► Sink
//!  (device MSI/MSI-X           one load               array index          one load      (vCPU IRR)
//!   via its IRTE)
//!  software signal ───────────────────────────────────────────────────────► Context
//!  (emulated device, through the front end)
//! ```
//!
//! The data path — [`route`], [`Context::signal`] — takes no lock, allocates nothing and is
//! O(1). The control path — the guest programming its MSI/MSI-X registers ([`frontend`]), the
//! `SET_IRQS` hypercall ([`api`]) — allocates contexts and host vectors lock-free and
//! reconfigures contexts with one CAS each, so an interrupt is never lost to a
//! reconfiguration (core rule 3; the loom models in each module check it).
//!
//! Modules:
//! - [`context`]: the per-vector context, `Target`, the `Sink` trait;
//! - [`pool`]: a fixed pool of contexts with lock-free allocation;
//! - [`vectors`]: a CPU's host vector → context table;
//! - [`msi`]: guest MSI address/data decoding;
//! - [`frontend`]: the one MSI-X (and MSI) front end over a `Backend` (physical, IMS-style,
//!   software);
//! - [`api`]: VFIO `GET_IRQ_INFO`/`SET_IRQS` semantics over hypercall arguments.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod api;
pub mod context;
pub mod frontend;
pub mod msi;
pub mod pool;
mod sync;
pub mod vectors;

pub use context::{Context, ContextStats, MaskState, Signal, Sink, State, Target};
pub use pool::{ContextId, ContextPool};
pub use vectors::HostVectorTable;

/// The interrupt entry path: host vector `vector` arrived on the CPU that owns `table`;
/// signal the context it maps. `None` when the vector maps no context (a stray interrupt:
/// the caller counts it). One load in the table, one array index, one load of the context
/// word (plus the delivery).
pub fn route<const P: usize>(
    table: &HostVectorTable,
    pool: &ContextPool<P>,
    vector: u8,
    sink: &(impl Sink + ?Sized),
) -> Option<Signal> {
    pool.signal(table.lookup(vector)?, sink)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::context::tests::RecordingSink;

    #[test]
    fn route_end_to_end() {
        let table = HostVectorTable::new();
        let pool = ContextPool::<4>::new();
        let sink = RecordingSink::new();
        assert_eq!(route(&table, &pool, 0x40, &sink), None, "unmapped");
        let id = pool.alloc().unwrap();
        let v = table.allocate(id).unwrap();
        assert_eq!(route(&table, &pool, v, &sink), Some(Signal::Spurious), "mapped, not yet enabled");
        let t = Target { slot: 2, vector: 0x55 };
        pool.get(id).unwrap().enable(t, MaskState::Unmasked);
        assert_eq!(route(&table, &pool, v, &sink), Some(Signal::Delivered));
        assert_eq!(sink.take_log(), [t]);
        assert!(table.free(v, id));
        assert_eq!(route(&table, &pool, v, &sink), None);
    }
}
