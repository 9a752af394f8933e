//! MSR policy: every guest RDMSR/WRMSR exits (the MSR permission map is all ones) and is
//! answered here. State SVM keeps in the VMCB (EFER, PAT, segment bases, SYSCALL/SYSENTER) is
//! read and written there, with the architectural validity checks a real CPU makes (#GP on a
//! bad value); the APIC base is fixed; a few harmless platform MSRs read as constants; every
//! other MSR raises #GP, as on a CPU that does not have it.

use crate::vmcb::SaveArea;

/// MSR numbers.
pub mod index {
    /// Time-stamp counter.
    pub const TSC: u32 = 0x10;
    /// APIC base.
    pub const APIC_BASE: u32 = 0x1b;
    /// MTRR capabilities.
    pub const MTRR_CAP: u32 = 0xfe;
    /// SYSENTER_CS.
    pub const SYSENTER_CS: u32 = 0x174;
    /// SYSENTER_ESP.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// SYSENTER_EIP.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// MCG_CAP.
    pub const MCG_CAP: u32 = 0x179;
    /// MCG_STATUS.
    pub const MCG_STATUS: u32 = 0x17a;
    /// MISC_ENABLE.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// PAT.
    pub const PAT: u32 = 0x277;
    /// MTRR default type.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// EFER.
    pub const EFER: u32 = 0xc000_0080;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SFMASK.
    pub const SFMASK: u32 = 0xc000_0084;
    /// FS base.
    pub const FS_BASE: u32 = 0xc000_0100;
    /// GS base.
    pub const GS_BASE: u32 = 0xc000_0101;
    /// Kernel GS base.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// VM_CR (SVM): hidden.
    pub const VM_CR: u32 = 0xc001_0114;
    /// VM_HSAVE_PA (SVM): hidden.
    pub const VM_HSAVE_PA: u32 = 0xc001_0117;
}

/// EFER bits.
pub mod efer {
    /// SYSCALL enable.
    pub const SCE: u64 = 1 << 0;
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active.
    pub const LMA: u64 = 1 << 10;
    /// No-execute enable.
    pub const NXE: u64 = 1 << 11;
    /// SVM enable: always set in the VMCB (VMRUN requires it), never shown to the guest.
    pub const SVME: u64 = 1 << 12;
}

/// The fixed guest APIC base: 0xFEE00000, enabled (bit 11), xAPIC mode.
pub const APIC_BASE_VALUE: u64 = 0xfee0_0000 | 1 << 11;
/// APIC base BSP flag (bit 8), set for vCPU 0.
pub const APIC_BASE_BSP: u64 = 1 << 8;
const CR0_PG: u64 = 1 << 31;

/// MSR state the VMCB does not hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsrState {
    /// MTRR default type (written values are kept; there are no variable MTRRs).
    pub mtrr_def_type: u64,
    /// The vCPU is the partition's bootstrap processor.
    pub bsp: bool,
}

/// Outcome of an MSR access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MsrOutcome {
    /// Done (for a read: this value).
    Done(u64),
    /// The guest gets #GP(0).
    GeneralProtection,
}

fn canonical(v: u64) -> bool {
    let top = (v as i64) >> 47;
    top == 0 || top == -1
}

fn valid_pat(v: u64) -> bool {
    v.to_le_bytes().iter().all(|b| matches!(b, 0 | 1 | 4 | 5 | 6 | 7))
}

/// RDMSR.
pub fn read(msr: u32, save: &SaveArea, state: &MsrState, tsc: u64) -> MsrOutcome {
    use MsrOutcome::Done;
    match msr {
        index::TSC => Done(tsc),
        index::APIC_BASE => Done(APIC_BASE_VALUE | if state.bsp { APIC_BASE_BSP } else { 0 }),
        index::MTRR_CAP | index::MCG_CAP | index::MCG_STATUS => Done(0),
        index::MISC_ENABLE => Done(1), // fast strings
        index::MTRR_DEF_TYPE => Done(state.mtrr_def_type),
        index::PAT => Done(save.g_pat),
        index::EFER => Done(save.efer & !efer::SVME),
        index::STAR => Done(save.star),
        index::LSTAR => Done(save.lstar),
        index::CSTAR => Done(save.cstar),
        index::SFMASK => Done(save.sfmask),
        index::FS_BASE => Done(save.fs.base),
        index::GS_BASE => Done(save.gs.base),
        index::KERNEL_GS_BASE => Done(save.kernel_gs_base),
        index::SYSENTER_CS => Done(save.sysenter_cs),
        index::SYSENTER_ESP => Done(save.sysenter_esp),
        index::SYSENTER_EIP => Done(save.sysenter_eip),
        _ => MsrOutcome::GeneralProtection,
    }
}

/// WRMSR.
pub fn write(msr: u32, value: u64, save: &mut SaveArea, state: &mut MsrState) -> MsrOutcome {
    use MsrOutcome::{Done, GeneralProtection as Gp};
    let base = |field: &mut u64| {
        if canonical(value) {
            *field = value;
            Done(0)
        } else {
            Gp
        }
    };
    match msr {
        index::APIC_BASE => {
            // Relocating, disabling or switching to x2APIC is not offered.
            let want = APIC_BASE_VALUE | if state.bsp { APIC_BASE_BSP } else { 0 };
            if value & !APIC_BASE_BSP == want & !APIC_BASE_BSP { Done(0) } else { Gp }
        }
        index::MTRR_DEF_TYPE => {
            // Type (7:0) must be a valid memory type; E (11) and FE (10) settable; rest reserved.
            if value & !0xcff != 0 || !matches!(value & 0xff, 0 | 1 | 4 | 5 | 6) {
                return Gp;
            }
            state.mtrr_def_type = value;
            Done(0)
        }
        index::MCG_STATUS => {
            if value == 0 {
                Done(0)
            } else {
                Gp
            }
        }
        index::PAT => {
            if !valid_pat(value) {
                return Gp;
            }
            save.g_pat = value;
            Done(0)
        }
        index::EFER => {
            let allowed = efer::SCE | efer::LME | efer::LMA | efer::NXE;
            if value & !allowed != 0 {
                return Gp;
            }
            let paging = save.cr0 & CR0_PG != 0;
            if paging && (value ^ save.efer) & efer::LME != 0 {
                return Gp;
            }
            // LMA is the processor's: written values are ignored.
            save.efer = (value & !efer::LMA) | (save.efer & efer::LMA) | efer::SVME;
            Done(0)
        }
        index::STAR => {
            save.star = value;
            Done(0)
        }
        index::LSTAR => base(&mut save.lstar),
        index::CSTAR => base(&mut save.cstar),
        index::SFMASK => {
            save.sfmask = value & 0xffff_ffff;
            Done(0)
        }
        index::FS_BASE => base(&mut save.fs.base),
        index::GS_BASE => base(&mut save.gs.base),
        index::KERNEL_GS_BASE => base(&mut save.kernel_gs_base),
        index::SYSENTER_CS => {
            save.sysenter_cs = value & 0xffff;
            Done(0)
        }
        index::SYSENTER_ESP => base(&mut save.sysenter_esp),
        index::SYSENTER_EIP => base(&mut save.sysenter_eip),
        _ => Gp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmcb::Vmcb;

    fn long_mode() -> Vmcb {
        let mut v = Vmcb::zeroed();
        v.save.efer = efer::LME | efer::LMA | efer::NXE | efer::SVME;
        v.save.cr0 = 0x8001_0033;
        v.save.g_pat = 0x0007_0406_0007_0406;
        v
    }

    #[test]
    fn efer_hides_svme_and_checks_writes() {
        let mut v = long_mode();
        let mut s = MsrState::default();
        assert_eq!(read(index::EFER, &v.save, &s, 0), MsrOutcome::Done(efer::LME | efer::LMA | efer::NXE));
        assert_eq!(write(index::EFER, efer::LME | efer::NXE | efer::SCE, &mut v.save, &mut s), MsrOutcome::Done(0));
        assert_eq!(v.save.efer, efer::LME | efer::LMA | efer::NXE | efer::SCE | efer::SVME, "SVME kept, LMA kept");
        assert_eq!(
            write(index::EFER, efer::NXE, &mut v.save, &mut s),
            MsrOutcome::GeneralProtection,
            "LME with paging on"
        );
        assert_eq!(write(index::EFER, efer::LME | efer::SVME, &mut v.save, &mut s), MsrOutcome::GeneralProtection);
        assert_eq!(write(index::EFER, efer::LME | 1 << 14, &mut v.save, &mut s), MsrOutcome::GeneralProtection);
    }

    #[test]
    fn bases_pat_apic() {
        let mut v = long_mode();
        let mut s = MsrState { bsp: true, ..Default::default() };
        assert_eq!(write(index::GS_BASE, 0xffff_8000_0000_1000, &mut v.save, &mut s), MsrOutcome::Done(0));
        assert_eq!(v.save.gs.base, 0xffff_8000_0000_1000);
        assert_eq!(write(index::GS_BASE, 0x0000_8000_0000_0000, &mut v.save, &mut s), MsrOutcome::GeneralProtection);
        assert_eq!(write(index::PAT, 0x0007_0406_0007_0406, &mut v.save, &mut s), MsrOutcome::Done(0));
        assert_eq!(write(index::PAT, 0x0007_0406_0007_0402, &mut v.save, &mut s), MsrOutcome::GeneralProtection);
        assert_eq!(read(index::APIC_BASE, &v.save, &s, 0), MsrOutcome::Done(0xfee0_0900));
        assert_eq!(write(index::APIC_BASE, 0xfee0_0900, &mut v.save, &mut s), MsrOutcome::Done(0));
        assert_eq!(write(index::APIC_BASE, 0xfee0_0d00, &mut v.save, &mut s), MsrOutcome::GeneralProtection, "x2APIC");
        assert_eq!(write(index::APIC_BASE, 0xfec0_0900, &mut v.save, &mut s), MsrOutcome::GeneralProtection);
        assert_eq!(read(index::TSC, &v.save, &s, 1234), MsrOutcome::Done(1234));
    }

    #[test]
    fn unknown_and_svm_msrs_fault() {
        let mut v = long_mode();
        let mut s = MsrState::default();
        for msr in [index::VM_CR, index::VM_HSAVE_PA, 0x8b, 0xc001_0015, 0xdead_beef] {
            assert_eq!(read(msr, &v.save, &s, 0), MsrOutcome::GeneralProtection, "{msr:#x}");
            assert_eq!(write(msr, 0, &mut v.save, &mut s), MsrOutcome::GeneralProtection, "{msr:#x}");
        }
    }
}
