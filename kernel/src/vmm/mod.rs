//! Running guests. A partition (a `conduit_vm::partition::Spec`) becomes guest RAM backed by
//! frames and mapped by nested page tables, its ELF image loaded, its vCPUs' VMCBs filled; each
//! vCPU then runs on its own physical CPU (Conduit partitions CPUs statically: one vCPU per
//! CPU, so a vCPU never migrates and the hypervisor, which never touches SSE, never has to save
//! guest FPU state). The CPU that starts the partitions is the supervisor: it raises
//! interrupts, posts mailbox words, waits for signals and stops, and tears partitions down.
//!
//! Per physical CPU there is one [`VcpuSlot`]: the shared face of the vCPU running there —
//! its pending-vector bitmap (set from any CPU, then a kick IPI), its state, its signal and
//! mailbox words, and its outcome once stopped.

mod build;
mod devices;
pub mod doorbells;
pub mod irq;
mod run;

pub use build::BuildError;

use crate::arch::interrupts::vectors;
use crate::arch::percpu::{self, MAX_CPUS};
use crate::arch::{apic, time};
use crate::sync::IrqMutex;
use conduit_vm::pending::{PendingVectors, VectorSet};
use conduit_vm::vcpu::{Stats, Stop};
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

/// Most partitions alive at once (each takes an ASID: QEMU offers 16).
pub const MAX_PARTITIONS: usize = 8;

/// Where a vCPU is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
#[repr(u8)]
pub enum VcpuState {
    /// No vCPU on this CPU.
    Idle = 0,
    /// Launched, not yet in its loop.
    Starting = 1,
    /// Running guest code or handling an exit.
    Running = 2,
    /// Blocked in HLT until an interrupt is deliverable.
    Halted = 3,
    /// Stopped; its outcome is recorded.
    Stopped = 4,
}

/// How a vCPU ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub struct Outcome {
    /// Why it stopped.
    pub stop: Stop,
    /// Its counters.
    pub stats: Stats,
    /// Uptime when it stopped.
    pub at_us: u64,
}

/// Most signals remembered per vCPU.
pub const SIGNAL_LOG: usize = 8;

/// The shared face of the vCPU that runs on one physical CPU.
#[derive(Debug)]
pub struct VcpuSlot {
    /// Pending vectors (the virtual IRR).
    pub pending: PendingVectors,
    state: AtomicU8,
    stop_requested: AtomicBool,
    /// `partition << 8 | vcpu`, plus one; 0 when free.
    owner: AtomicU32,
    signal: AtomicU64,
    mailbox: AtomicU64,
    signals: IrqMutex<heapless::Vec<(u64, u64), SIGNAL_LOG>>,
    launch: IrqMutex<Option<run::Launch>>,
    outcome: IrqMutex<Option<Outcome>>,
    /// Vectors raised by the supervisor (and timers) into this slot since launch.
    raised: AtomicU64,
}

impl VcpuSlot {
    const fn new() -> Self {
        Self {
            pending: PendingVectors::new(),
            state: AtomicU8::new(VcpuState::Idle as u8),
            stop_requested: AtomicBool::new(false),
            owner: AtomicU32::new(0),
            signal: AtomicU64::new(0),
            mailbox: AtomicU64::new(0),
            signals: IrqMutex::new(heapless::Vec::new()),
            launch: IrqMutex::new(None),
            outcome: IrqMutex::new(None),
            raised: AtomicU64::new(0),
        }
    }

    /// Current state.
    pub fn state(&self) -> VcpuState {
        match self.state.load(Ordering::Acquire) {
            1 => VcpuState::Starting,
            2 => VcpuState::Running,
            3 => VcpuState::Halted,
            4 => VcpuState::Stopped,
            _ => VcpuState::Idle,
        }
    }

    fn set_state(&self, s: VcpuState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// The last value the guest signalled.
    pub fn signal(&self) -> u64 {
        self.signal.load(Ordering::Acquire)
    }

    /// Signals so far, with the uptime of each (oldest first; at most `SIGNAL_LOG`).
    pub fn signals(&self) -> heapless::Vec<(u64, u64), SIGNAL_LOG> {
        self.signals.lock().clone()
    }

    /// The outcome, once stopped.
    pub fn outcome(&self) -> Option<Outcome> {
        *self.outcome.lock()
    }

    /// Vectors raised into this vCPU so far.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}

static SLOTS: [VcpuSlot; MAX_CPUS] = [const { VcpuSlot::new() }; MAX_CPUS];

/// The slot of physical CPU `cpu`.
pub fn slot(cpu: usize) -> Option<&'static VcpuSlot> {
    SLOTS.get(cpu)
}

/// Interrupts the CPU running the vCPU of slot `cpu`, so it looks at its pending work (an
/// INTR exit if it is in the guest, a wake-up if it halts). No-op for the calling CPU.
fn kick(cpu: usize) {
    if cpu == percpu::this_cpu().index() {
        return;
    }
    if let Some(c) = percpu::cpu(cpu) {
        let _ = apic::local().send_fixed(c.apic_id.load(Ordering::Relaxed), vectors::WAKEUP);
    }
}

/// Raises `vectors` in the vCPU on CPU `cpu` (one atomic operation per 64-vector word, then
/// one kick). Returns how many were newly pending.
pub fn raise(cpu: usize, vectors: &VectorSet) -> u32 {
    let Some(s) = slot(cpu) else { return 0 };
    let newly = s.pending.raise_set(vectors);
    s.raised.fetch_add(u64::from(vectors.len()), Ordering::Relaxed);
    kick(cpu);
    newly.len()
}

/// Posts `value` to the mailbox of the vCPU on CPU `cpu`.
pub fn post(cpu: usize, value: u64) {
    if let Some(s) = slot(cpu) {
        s.mailbox.store(value, Ordering::Release);
    }
}

/// Waits until `cond` holds, at most `timeout_us`.
pub fn wait_for(timeout_us: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = time::deadline_after_us(timeout_us);
    loop {
        if cond() {
            return true;
        }
        if time::passed(deadline) {
            return false;
        }
        core::hint::spin_loop();
    }
}

/// Asks the vCPU on CPU `cpu` to stop (it stops at its next exit; a kick forces one).
pub fn request_stop(cpu: usize) {
    if let Some(s) = slot(cpu) {
        s.stop_requested.store(true, Ordering::Release);
        kick(cpu);
    }
}

/// Stops every other vCPU of `partition` (after one of them, on `cpu`, broke a rule).
pub fn stop_partition_of(cpu: usize, partition: usize) {
    for (i, s) in SLOTS.iter().enumerate() {
        let owner = s.owner.load(Ordering::Acquire);
        if i != cpu && owner != 0 && ((owner - 1) >> 8) as usize == partition {
            request_stop(i);
        }
    }
}

pub use build::{bundle, create, host_address, partition_info, start, teardown};

/// Sets up what every partition shares (the I/O and MSR permission maps), at bring-up. The
/// guest-device host vectors have their own IDT entry (`arch::idt`), always installed.
pub fn init() -> Result<(), BuildError> {
    // A seed guests cannot know, so they cannot aim doorbell hash collisions at one probe
    // window.
    let _ = doorbells::TABLE.set_hash_seed(crate::arch::cpu::random_seed());
    build::permission_maps().map(|_| ())
}
pub use run::run_here;
