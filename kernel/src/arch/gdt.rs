//! Per-CPU GDT and TSS. Every CPU's GDT has the same layout (null, code 0x08, data 0x10,
//! TSS 0x18), so the IDT's code selector is the same everywhere. The TSS carries seven IST
//! stacks; every IDT gate uses one of them (see `idt::ist_for`).

use super::stacks::{CpuStacks, IST_COUNT};
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;

/// Kernel code selector in every GDT.
pub const KERNEL_CODE: u16 = 0x08;

/// One CPU's descriptor tables; built once, then loaded on that CPU.
#[derive(Debug)]
pub struct CpuTables {
    tss: spin::Once<TaskStateSegment>,
    gdt: spin::Once<(GlobalDescriptorTable, Selectors)>,
}

#[derive(Debug, Clone, Copy)]
struct Selectors {
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

impl CpuTables {
    /// Empty tables for a static slot.
    pub const fn new() -> Self {
        Self { tss: spin::Once::new(), gdt: spin::Once::new() }
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
        let (gdt, sel) = self.gdt.call_once(|| {
            let mut gdt = GlobalDescriptorTable::new();
            let code = gdt.append(Descriptor::kernel_code_segment());
            let data = gdt.append(Descriptor::kernel_data_segment());
            let tss = gdt.append(Descriptor::tss_segment(tss));
            (gdt, Selectors { code, data, tss })
        });
        debug_assert_eq!(sel.code.0, KERNEL_CODE);
        gdt.load();
        // SAFETY:
        // 1. `gdt` is 'static and now loaded; `sel.code` is its 64-bit kernel code descriptor
        //    and `sel.data` its data descriptor, so the segment loads are valid.
        // 2. `sel.tss` points at this CPU's own 'static TSS, loaded once per CPU (a second
        //    `ltr` of the same busy descriptor would #GP, and `load` runs once per CPU).
        unsafe {
            CS::set_reg(sel.code);
            DS::set_reg(sel.data);
            ES::set_reg(sel.data);
            SS::set_reg(sel.data);
            load_tss(sel.tss);
        }
    }
}
