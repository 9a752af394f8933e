//! The guest boot protocol, hypervisor side (`docs/guest-boot.md`): the fixed guest-physical
//! layout (GDT, identity page tables, boot-info blocks, image, stacks) and the initial VMCB:
//! intercepts, nested paging, and 64-bit register state at the image's entry point.

use crate::vmcb::{Misc1, Misc2, Segment, Vmcb, attrib, int_ctl, tlb_control};
use conduit_abi::layout;

/// CR0 at entry: PE, MP, ET, NE, WP, PG.
pub const CR0: u64 = 0x8001_0033;
/// CR4 at entry: PAE, OSFXSR, OSXMMEXCPT.
pub const CR4: u64 = 0x620;
/// EFER at entry as the VMCB holds it: LME, LMA, NXE, and SVME (required by VMRUN, hidden
/// from the guest by the MSR policy).
pub const EFER: u64 = 1 << 8 | 1 << 10 | 1 << 11 | 1 << 12;
/// Power-on PAT.
pub const PAT: u64 = 0x0007_0406_0007_0406;
/// The GDT: null, flat 64-bit code (0x08), flat data (0x10).
pub const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// Exception vectors intercepted: #DB (1) and #AC (17), which a guest could otherwise turn
/// into an endless delivery loop the host never regains control from. Both are re-injected.
pub const INTERCEPTED_EXCEPTIONS: u32 = 1 << 1 | 1 << 17;

/// Intercept-CR bit for CR8 writes (set only while an interrupt waits on the task priority).
pub const INTERCEPT_CR8_WRITE: u32 = 1 << (16 + 8);

const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const LARGE: u64 = 1 << 7;
const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;

/// Writes the GDT and the identity page tables for a guest with `memory_bytes` of RAM through
/// `write(gpa, bytes)`; stops at the first failed write.
pub fn write_tables(memory_bytes: u64, mut write: impl FnMut(u64, &[u8]) -> bool) -> bool {
    let mut gdt = [0u8; 24];
    for (chunk, d) in gdt.chunks_exact_mut(8).zip(GDT) {
        chunk.copy_from_slice(&d.to_le_bytes());
    }
    let pml4 = layout::PAGE_TABLES;
    let pdpt = pml4 + 0x1000;
    let pd = pdpt + 0x1000;
    if !write(layout::GDT, &gdt) || !write(pml4, &(pdpt | PRESENT | WRITABLE).to_le_bytes()) {
        return false;
    }
    for i in 0..4u64 {
        if !write(pdpt + i * 8, &((pd + i * 0x1000) | PRESENT | WRITABLE).to_le_bytes()) {
            return false;
        }
        let mut table = [0u8; 4096];
        for (j, e) in table.chunks_exact_mut(8).enumerate() {
            let addr = i * GIB + j as u64 * TWO_MIB;
            let cache = if addr >= memory_bytes { PCD | PWT } else { 0 };
            e.copy_from_slice(&(addr | PRESENT | WRITABLE | LARGE | cache).to_le_bytes());
        }
        if !write(pd + i * 0x1000, &table) {
            return false;
        }
    }
    true
}

/// Guest-physical address of vCPU `vcpu`'s boot-info block.
pub const fn boot_info_gpa(vcpu: u32) -> u64 {
    layout::BOOT_INFO + vcpu as u64 * 128
}

/// Top of vCPU `vcpu`'s stack (vCPU 0 highest).
pub const fn stack_top(memory_bytes: u64, vcpu: u32) -> u64 {
    memory_bytes - vcpu as u64 * layout::STACK_BYTES
}

/// Host-side physical addresses the VMCB refers to.
#[derive(Clone, Copy, Debug)]
pub struct HostTables {
    /// I/O permission map (12 KiB).
    pub iopm: u64,
    /// MSR permission map (8 KiB).
    pub msrpm: u64,
    /// Nested page table root.
    pub ncr3: u64,
    /// Address-space ID (1..).
    pub asid: u32,
}

/// Fills `vmcb` for a vCPU entering at `entry` with `boot_info` in RDI (the caller sets RDI in
/// its saved registers): every control field, then the 64-bit state of the guest boot protocol.
pub fn init_vmcb(vmcb: &mut Vmcb, host: HostTables, memory_bytes: u64, vcpu: u32, entry: u64) {
    *vmcb = Vmcb::zeroed();
    let c = &mut vmcb.control;
    c.intercept_exceptions = INTERCEPTED_EXCEPTIONS;
    c.intercept_misc1 = (Misc1::INTR
        | Misc1::NMI
        | Misc1::CPUID
        | Misc1::HLT
        | Misc1::INVD
        | Misc1::INVLPGA
        | Misc1::IOIO
        | Misc1::MSR
        | Misc1::SHUTDOWN)
        .bits();
    c.intercept_misc2 = (Misc2::VMRUN
        | Misc2::VMMCALL
        | Misc2::VMLOAD
        | Misc2::VMSAVE
        | Misc2::STGI
        | Misc2::CLGI
        | Misc2::SKINIT
        | Misc2::RDTSCP
        | Misc2::MONITOR
        | Misc2::MWAIT
        | Misc2::XSETBV)
        .bits();
    c.iopm_base_pa = host.iopm;
    c.msrpm_base_pa = host.msrpm;
    c.guest_asid = host.asid;
    c.tlb_control = tlb_control::FLUSH_ALL;
    c.int_ctl = int_ctl::V_INTR_MASKING;
    c.np_control = 1;
    c.n_cr3 = host.ncr3;

    let s = &mut vmcb.save;
    let flat = |selector: u16, attrib: u16| Segment { selector, attrib, limit: 0xffff_ffff, base: 0 };
    s.cs = flat(layout::CODE_SELECTOR, attrib::CODE64);
    for seg in [&mut s.ds, &mut s.es, &mut s.ss, &mut s.fs, &mut s.gs] {
        *seg = flat(layout::DATA_SELECTOR, attrib::DATA);
    }
    s.gdtr = Segment { selector: 0, attrib: 0, limit: (GDT.len() * 8 - 1) as u32, base: layout::GDT };
    s.idtr = Segment::default();
    s.ldtr = Segment::default();
    s.tr = Segment { selector: 0, attrib: attrib::TSS64, limit: 0x67, base: 0 };
    s.cpl = 0;
    s.efer = EFER;
    s.cr0 = CR0;
    s.cr3 = layout::PAGE_TABLES;
    s.cr4 = CR4;
    s.dr6 = 0xffff_0ff0;
    s.dr7 = 0x400;
    s.rflags = 0x2;
    s.rip = entry;
    s.rsp = stack_top(memory_bytes, vcpu) - 8;
    s.g_pat = PAT;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn identity_tables() {
        let mut mem = BTreeMap::new();
        assert!(write_tables(64 << 20, |gpa, bytes| {
            for (i, b) in bytes.iter().enumerate() {
                mem.insert(gpa + i as u64, *b);
            }
            true
        }));
        let q = |gpa: u64| {
            let mut b = [0u8; 8];
            for (i, x) in b.iter_mut().enumerate() {
                *x = mem[&(gpa + i as u64)];
            }
            u64::from_le_bytes(b)
        };
        assert_eq!(q(0x1008), GDT[1]);
        assert_eq!(q(0x2000), 0x3003);
        assert_eq!(q(0x3018), 0x7003, "PDPT[3] -> the fourth directory");
        assert_eq!(q(0x4000), 0x83, "first 2 MiB: RAM, write-back");
        assert_eq!(q(0x4000 + 31 * 8), (31 << 21) | 0x83, "last RAM page");
        assert_eq!(q(0x4000 + 32 * 8), (32 << 21) | 0x9b, "first page above RAM: uncached");
        assert_eq!(q(0x7000 + 0x1f7 * 8), 0xfee0_0000 | 0x9b, "local APIC window uncached");
    }

    #[test]
    fn initial_state() {
        let mut v = Vmcb::zeroed();
        let host = HostTables { iopm: 0x10_0000, msrpm: 0x20_0000, ncr3: 0x30_0000, asid: 1 };
        init_vmcb(&mut v, host, 16 << 20, 1, 0x20_1000);
        assert_eq!(v.save.rip, 0x20_1000);
        assert_eq!(v.save.rsp, (16 << 20) - 64 * 1024 - 8);
        assert_eq!(v.save.rsp % 16, 8, "as if called");
        assert_eq!(v.save.cs.attrib, 0xa9b);
        assert_ne!(v.control.intercept_misc2 & Misc2::VMRUN.bits(), 0, "VMRUN must be intercepted");
        assert_eq!(v.control.np_control, 1);
        assert_eq!(boot_info_gpa(2), 0x8100);
    }
}
