//! External interrupts and IPIs (vectors 32–255): a lock-free table of handlers, registered on
//! the control path and read on every interrupt, and end-of-interrupt for the local APIC.

use super::idt::Frame;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

/// Vector assignments.
pub mod vectors {
    /// Legacy PIC lines are remapped here (all masked, and LINT0 is masked too).
    pub const PIC_BASE: u8 = 0x20;
    /// Local APIC timer.
    pub const TIMER: u8 = 0x30;
    /// Wake-up IPI: a CPU sleeping in `hlt` checks its mailbox.
    pub const WAKEUP: u8 = 0x31;
    /// IOMMU fault event.
    pub const IOMMU_FAULT: u8 = 0x32;
    /// Local APIC error.
    pub const APIC_ERROR: u8 = 0xfe;
    /// Local APIC spurious vector (never acknowledged with EOI).
    pub const SPURIOUS: u8 = 0xff;
}

/// An interrupt handler: runs with interrupts disabled, on the IST stack for interrupts, and
/// must not block.
#[derive(Debug)]
pub struct Handler {
    /// For logs.
    pub name: &'static str,
    /// The code.
    pub run: fn(&mut Frame),
}

static HANDLERS: [AtomicPtr<Handler>; 256] = [const { AtomicPtr::new(core::ptr::null_mut()) }; 256];
static UNEXPECTED: AtomicU64 = AtomicU64::new(0);
static LAST_UNEXPECTED: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);
static SPURIOUS_COUNT: AtomicU64 = AtomicU64::new(0);
static APIC_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Registers `handler` for `vector` (32–254), replacing any previous one. Returns false for
/// exception vectors and the spurious vector.
pub fn register(vector: u8, handler: &'static Handler) -> bool {
    if vector < 32 || vector == vectors::SPURIOUS {
        return false;
    }
    HANDLERS[usize::from(vector)].store(handler as *const Handler as *mut Handler, Ordering::Release);
    defmt::debug!("interrupts: vector {=u8:#x} -> {=str}", vector, handler.name);
    true
}

/// Interrupts that arrived on a vector without a handler.
pub fn unexpected_count() -> u64 {
    UNEXPECTED.load(Ordering::Relaxed)
}

/// The vector of the last interrupt that had no handler.
pub fn last_unexpected_vector() -> u8 {
    LAST_UNEXPECTED.load(Ordering::Relaxed)
}

/// Removes the handler of `vector` (later interrupts there count as unexpected).
pub fn unregister(vector: u8) {
    HANDLERS[usize::from(vector)].store(core::ptr::null_mut(), Ordering::Release);
}

/// Local APIC spurious interrupts seen.
pub fn spurious_count() -> u64 {
    SPURIOUS_COUNT.load(Ordering::Relaxed)
}

/// Local APIC error interrupts seen.
pub fn apic_error_count() -> u64 {
    APIC_ERRORS.load(Ordering::Relaxed)
}

pub(super) fn handle(vector: u8, frame: &mut Frame) {
    // The legacy PIC is masked and LINT0 too, so nothing arrives through it: only the local
    // APIC's own spurious vector goes without EOI.
    if vector == vectors::SPURIOUS {
        SPURIOUS_COUNT.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let ptr = HANDLERS[usize::from(vector)].load(Ordering::Acquire);
    // SAFETY:
    // 1. The table holds only null or pointers made from `&'static Handler` in `register`,
    //    so a non-null value points at a live, immutable, 'static `Handler`.
    match unsafe { ptr.as_ref() } {
        Some(h) => (h.run)(frame),
        None => {
            LAST_UNEXPECTED.store(vector, Ordering::Relaxed);
            UNEXPECTED.fetch_add(1, Ordering::Relaxed);
        }
    }
    super::apic::local().eoi();
}

static TIMER: Handler = Handler { name: "apic-timer", run: super::time::on_timer };
static WAKEUP: Handler = Handler { name: "wakeup-ipi", run: on_wakeup };
static APIC_ERROR: Handler = Handler { name: "apic-error", run: on_apic_error };

fn on_wakeup(_frame: &mut Frame) {
    super::percpu::this_cpu().wakeups.fetch_add(1, Ordering::Relaxed);
}

fn on_apic_error(_frame: &mut Frame) {
    APIC_ERRORS.fetch_add(1, Ordering::Relaxed);
    let _ = super::apic::local().error_status();
}

/// Installs the hypervisor's own interrupt handlers.
pub fn init() {
    register(vectors::TIMER, &TIMER);
    register(vectors::WAKEUP, &WAKEUP);
    register(vectors::APIC_ERROR, &APIC_ERROR);
}
