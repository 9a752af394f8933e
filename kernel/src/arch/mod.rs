//! The hardware tier: everything that touches x86-64 system state (descriptor tables, entry
//! stubs, page tables, APIC, SMP start-up, time). Unsafe code lives here and in `boot`, each
//! block with a numbered SAFETY list; mission logic lives in the pure crates.

pub mod apic;
pub mod cpu;
pub mod exceptions;
pub mod gdt;
pub mod idt;
pub mod interrupts;
pub mod mmio;
pub mod paging;
pub mod pci;
pub mod percpu;
pub mod smp;
pub mod stacks;
pub mod svm;
pub mod time;
pub mod vtd;

/// First thing on the bootstrap processor: per-CPU pointer, GDT/TSS with its static IST
/// stacks, IDT. From here on every exception is reported.
pub fn init_bsp_cpu() -> &'static percpu::PerCpu {
    let Some(me) = percpu::install(0) else { crate::exit::halt_forever() };
    let stacks = me.stacks.call_once(|| stacks::BSP_STACKS.layout());
    me.tables.load(stacks);
    idt::load();
    cpu::enable_fxsr();
    me.set_state(percpu::CpuState::Online);
    me
}
