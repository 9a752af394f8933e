//! Per-CPU GDT and TSS. Every CPU's GDT has the same layout (null, code 0x08, data 0x10,
//! TSS 0x18), so the IDT's code selector is the same everywhere. The TSS carries seven IST
//! stacks; every IDT gate uses one of them (see `idt::ist_for`).

use super::stacks::{CpuStacks, IST_COUNT};
use core::cell::UnsafeCell;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;

/// Kernel code selector in every GDT.
pub const KERNEL_CODE: u16 = 0x08;

/// One CPU's descriptor tables; built once, then loaded on that CPU. The GDT sits in an
/// `UnsafeCell` because the CPU writes it (`ltr` sets the TSS descriptor's busy bit).
#[derive(Debug)]
pub struct CpuTables {
    tss: spin::Once<TaskStateSegment>,
    gdt: UnsafeCell<GlobalDescriptorTable>,
    selectors: spin::Once<Selectors>,
}

// SAFETY:
// 1. `gdt` is written by Rust exactly once, inside `selectors.call_once` (one caller, no other
//    reference exists yet); afterwards only the CPU writes it (the busy bit), and Rust only
//    takes short-lived shared references to pass it to `lgdt`. `tss` and `selectors` are
//    `spin::Once`, already `Sync`.
unsafe impl Sync for CpuTables {}

#[derive(Debug, Clone, Copy)]
struct Selectors {
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

impl CpuTables {
    /// Empty tables for a static slot.
    pub const fn new() -> Self {
        Self {
            tss: spin::Once::new(),
            gdt: UnsafeCell::new(GlobalDescriptorTable::new()),
            selectors: spin::Once::new(),
        }
    }

    /// Builds the TSS (IST pointers from `stacks`) and GDT, loads them on this CPU and reloads
    /// CS/DS/ES/SS and TR. GS is left alone: its base is the per-CPU pointer.
    pub fn load(&'static self, stacks: &CpuStacks) {
        let tss = self.tss.call_once(|| {
            let mut tss = TaskStateSegment::new();
            for i in 0..IST_COUNT {
                tss.interrupt_stack_table[i] = VirtAddr::new(stacks.ist_top(i));
            }
            tss.privilege_stack_table[0] = VirtAddr::new(stacks.kernel_top());
            tss
        });
        let sel = *self.selectors.call_once(|| {
            // SAFETY: the only Rust write to the GDT, in the one `call_once` initializer, before
            // any reference to it exists (see the `Sync` impl).
            let gdt = unsafe { &mut *self.gdt.get() };
            let code = gdt.append(Descriptor::kernel_code_segment());
            let data = gdt.append(Descriptor::kernel_data_segment());
            let tss = gdt.append(Descriptor::tss_segment(tss));
            Selectors { code, data, tss }
        });
        debug_assert_eq!(sel.code.0, KERNEL_CODE);
        // SAFETY:
        // 1. The GDT is 'static (a static per-CPU slot) and fully built above; `lgdt` only
        //    reads it. Its code, data and TSS descriptors are the ones the selectors name, so
        //    the segment loads below are valid.
        // 2. `sel.tss` points at this CPU's own 'static TSS, loaded once per CPU (a second
        //    `ltr` of the same busy descriptor would #GP, and `load` runs once per CPU).
        unsafe {
            (*self.gdt.get()).load_unsafe();
            CS::set_reg(sel.code);
            DS::set_reg(sel.data);
            ES::set_reg(sel.data);
            SS::set_reg(sel.data);
            load_tss(sel.tss);
        }
    }
}
