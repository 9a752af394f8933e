//! Interrupt routing on this machine (the data path of DESIGN.md's "one picture"): the context
//! pool, one host vector table per CPU, the sink that feeds a vCPU's pending bitmap and kicks
//! its CPU, and the entry of every guest-device host vector. No lock, no allocation, O(1):
//! `conduit_irq::route`.

use super::slot;
use crate::arch::idt::Frame;
use crate::arch::interrupts::{self, Handler};
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

/// The sink: a vector for vCPU slot `target.slot` becomes pending there; the CPU running it is
/// kicked unless it is this one (an interrupt arriving here already made the guest exit).
#[derive(Clone, Copy, Debug, Default)]
pub struct VmmSink;

impl Sink for VmmSink {
    fn deliver(&self, target: Target) -> bool {
        let Some(s) = slot(usize::from(target.slot)) else { return false };
        let newly = s.pending.raise(target.vector).unwrap_or(false);
        super::kick(usize::from(target.slot));
        newly
    }
}

fn on_device_vector(frame: &mut Frame) {
    let cpu = percpu::this_cpu().index();
    let vector = frame.vector as u8;
    let Some(table) = HOST_VECTORS.get(cpu) else { return };
    if conduit_irq::route(table, &POOL, vector, &VmmSink).is_none() {
        STRAY.fetch_add(1, Ordering::Relaxed);
    }
}

static DEVICE_VECTOR: Handler = Handler { name: "guest-device", run: on_device_vector };

/// Installs the entry of every guest-device host vector (at bring-up).
pub fn init() {
    for v in FIRST_DEVICE_VECTOR..=LAST_DEVICE_VECTOR {
        interrupts::register(v, &DEVICE_VECTOR);
    }
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
