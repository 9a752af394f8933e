//! Per-CPU data: one slot per CPU in a static array, found through the GS base, which points
//! at the slot (whose first word is the CPU's index). The GS base is set before anything else
//! runs on a CPU, so `this_cpu()` is valid everywhere after that.

use super::gdt::CpuTables;
use super::stacks::CpuStacks;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU32, AtomicU64, Ordering};

/// Most CPUs Conduit runs on (matches the MADT parser's capacity).
pub const MAX_CPUS: usize = conduit_acpi::madt::MAX_CPUS;

/// Where a CPU is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
#[repr(u8)]
pub enum CpuState {
    /// Not started (or not present).
    Offline = 0,
    /// INIT-SIPI-SIPI sent, not checked in yet.
    Starting = 1,
    /// Running Conduit code.
    Online = 2,
}

/// Work a CPU runs when it finds it in its mailbox.
#[derive(Debug)]
pub struct Work {
    /// For logs.
    pub name: &'static str,
    /// What to run, on the target CPU, with interrupts enabled.
    pub run: fn(&'static PerCpu),
}

/// One CPU's data.
#[repr(C)]
#[derive(Debug)]
pub struct PerCpu {
    /// Index of this slot; must stay the first field (read through `gs:[0]`).
    index: usize,
    /// Local APIC ID (valid once the CPU is online).
    pub apic_id: AtomicU32,
    state: AtomicU8,
    /// Local APIC timer interrupts taken.
    pub timer_ticks: AtomicU64,
    /// Wake-up IPIs taken.
    pub wakeups: AtomicU64,
    /// defmt frames started while this CPU already held the logger (from an exception).
    pub log_nesting: AtomicU32,
    /// This CPU's local APIC is in x2APIC mode.
    pub x2apic: AtomicBool,
    /// Pending work, or null. Only `&'static Work` values are ever stored.
    mailbox: AtomicPtr<Work>,
    /// GDT and TSS.
    pub tables: CpuTables,
    /// Kernel and IST stacks.
    pub stacks: spin::Once<CpuStacks>,
}

impl PerCpu {
    const fn new(index: usize) -> Self {
        Self {
            index,
            apic_id: AtomicU32::new(0),
            state: AtomicU8::new(CpuState::Offline as u8),
            timer_ticks: AtomicU64::new(0),
            wakeups: AtomicU64::new(0),
            log_nesting: AtomicU32::new(0),
            x2apic: AtomicBool::new(false),
            mailbox: AtomicPtr::new(core::ptr::null_mut()),
            tables: CpuTables::new(),
            stacks: spin::Once::new(),
        }
    }

    /// This CPU's index (0 = bootstrap processor).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Current state.
    pub fn state(&self) -> CpuState {
        match self.state.load(Ordering::Acquire) {
            2 => CpuState::Online,
            1 => CpuState::Starting,
            _ => CpuState::Offline,
        }
    }

    /// Moves to `state`.
    pub fn set_state(&self, state: CpuState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// Posts work; fails when work is already pending.
    pub fn post(&self, work: &'static Work) -> Result<(), &'static Work> {
        let ptr = work as *const Work as *mut Work;
        self.mailbox
            .compare_exchange(core::ptr::null_mut(), ptr, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(|_| work)
    }

    /// Takes pending work, if any.
    pub fn take_work(&self) -> Option<&'static Work> {
        let ptr = self.mailbox.swap(core::ptr::null_mut(), Ordering::AcqRel);
        // SAFETY:
        // 1. The mailbox only ever holds null or a pointer made from a `&'static Work` in
        //    `post`, so a non-null value points at a live, immutable, 'static `Work`.
        unsafe { ptr.as_ref() }
    }
}

static CPUS: [PerCpu; MAX_CPUS] = {
    let mut cpus = [const { PerCpu::new(0) }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        cpus[i].index = i;
        i += 1;
    }
    cpus
};

/// The slot of CPU `index`.
pub fn cpu(index: usize) -> Option<&'static PerCpu> {
    CPUS.get(index)
}

/// All slots.
pub fn all() -> &'static [PerCpu] {
    &CPUS
}

/// Points this CPU's GS base at slot `index`. Called first thing on each CPU. `None` for an
/// index beyond the slots.
pub fn install(index: usize) -> Option<&'static PerCpu> {
    let slot = CPUS.get(index)?;
    // Writing IA32_GS_BASE needs no unsafe block through the x86_64 crate's GsBase::write.
    x86_64::registers::model_specific::GsBase::write(x86_64::VirtAddr::new(slot as *const PerCpu as u64));
    Some(slot)
}

/// The running CPU's slot.
pub fn this_cpu() -> &'static PerCpu {
    let index: usize;
    // SAFETY:
    // 1. `install` ran first on every CPU, so the GS base points at a `PerCpu` slot, whose
    //    first field (repr(C)) is its index: the read is in bounds of a live static.
    // 2. The asm only reads one word and touches no stack or flags.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) index, options(nostack, readonly, preserves_flags));
    }
    &CPUS[index.min(MAX_CPUS - 1)]
}
