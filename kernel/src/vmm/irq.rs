//! Interrupt routing on this machine (the data path of DESIGN.md's "one picture"): the context
//! pool, one host vector table per CPU, the sink that feeds a vCPU's pending bitmap and kicks
//! its CPU, and the entry of every guest-device host vector. No lock, no allocation, O(1):
//! `conduit_irq::route`.

use super::slot;
use crate::arch::percpu::{self, MAX_CPUS};
use conduit_irq::vectors::HostVectorTable;
use conduit_irq::{ContextPool, Sink, Target};
use core::sync::atomic::{AtomicU64, Ordering};

/// Contexts for every vector of every device of every partition.
pub const MAX_CONTEXTS: usize = 4096;
/// Host vectors guest devices get on each CPU (0x40–0x4f stay the hypervisor's own).
pub const FIRST_DEVICE_VECTOR: u8 = 0x50;
/// Last host vector for guest devices (above: the hypervisor's APIC vectors).
pub const LAST_DEVICE_VECTOR: u8 = 0xef;

/// The context pool.
pub static POOL: ContextPool<MAX_CONTEXTS> = ContextPool::new();

const fn table() -> HostVectorTable {
    match HostVectorTable::with_const_range(FIRST_DEVICE_VECTOR, LAST_DEVICE_VECTOR) {
        Some(t) => t,
        None => panic!("the device vector range is valid"),
    }
}

/// Each CPU's host vector → context table.
pub static HOST_VECTORS: [HostVectorTable; MAX_CPUS] = [const { table() }; MAX_CPUS];

/// Device interrupts that arrived on a vector mapping no context (counted, EOI'd).
static STRAY: AtomicU64 = AtomicU64::new(0);
/// Device interrupts routed into a context, per CPU: the vCPU loop tells the exits that
/// forwarded an interrupt apart with it (benchmarks).
static ROUTED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// The sink: a vector for vCPU slot `target.slot` becomes pending there; the CPU running it is
/// kicked unless it is `here` (an interrupt arriving there already made the guest exit).
#[derive(Clone, Copy, Debug)]
pub struct VmmSink {
    /// The CPU the signal is raised on.
    pub here: usize,
}

impl VmmSink {
    /// A sink for signals raised on the calling CPU.
    pub fn here() -> Self {
        Self { here: percpu::this_cpu().index() }
    }
}

impl Sink for VmmSink {
    #[inline]
    fn deliver(&self, target: Target) -> bool {
        let Some(s) = slot(usize::from(target.slot)) else { return false };
        let newly = s.pending.raise(target.vector).unwrap_or(false);
        if usize::from(target.slot) != self.here {
            super::kick(usize::from(target.slot));
        }
        newly
    }
}

/// A guest-device host vector arrived (called from the vector's IDT entry,
/// `arch::idt::entry_device`, with interrupts off): route it to its context, then EOI.
pub extern "sysv64" fn device_interrupt(vector: u64) {
    let me = percpu::this_cpu();
    let cpu = me.index();
    let routed = HOST_VECTORS
        .get(cpu)
        .and_then(|table| conduit_irq::route(table, &POOL, vector as u8, &VmmSink { here: cpu }))
        .is_some();
    if routed {
        if let Some(r) = ROUTED.get(cpu) {
            r.fetch_add(1, Ordering::Relaxed);
        }
    } else {
        STRAY.fetch_add(1, Ordering::Relaxed);
    }
    crate::arch::apic::local_of(me).eoi();
}

/// Device interrupts routed into a context on CPU `cpu` so far.
pub fn routed(cpu: usize) -> u64 {
    ROUTED.get(cpu).map_or(0, |r| r.load(Ordering::Relaxed))
}

/// Device interrupts that found no context.
pub fn stray() -> u64 {
    STRAY.load(Ordering::Relaxed)
}

/// How long a CPU gets to answer the drain IPI (generous: under emulation a CPU's thread may
/// be descheduled for milliseconds).
const DRAIN_US: u64 = 200_000;

/// Waits until CPU `cpu` has taken every device interrupt that was already on its way to it
/// (after an interrupt-remapping entry stopped pointing there): a wake-up IPI (vector 0x31,
/// below every device vector in priority) is serviced only after them. Returns false if the
/// CPU did not answer within the bound; the caller then keeps the old vector mapped (leaks it
/// rather than lose an interrupt). On the calling CPU, interrupts must be enabled: they were
/// taken already.
pub fn drain_vectors_of(cpu: usize) -> bool {
    if cpu == percpu::this_cpu().index() {
        return true;
    }
    let Some(c) = percpu::cpu(cpu) else { return false };
    let before = c.wakeups.load(Ordering::Acquire);
    super::kick(cpu);
    super::wait_for(DRAIN_US, || c.wakeups.load(Ordering::Acquire) != before)
}
