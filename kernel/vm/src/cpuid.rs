//! What CPUID tells a guest: the host's answers, filtered. SVM, VMX and x2APIC are hidden (the
//! guest gets a virtual xAPIC and no nested virtualization); XSAVE and the AVX family are
//! hidden (XCR0 is not switched between guests and the hypervisor); MONITOR/MWAIT and RDTSCP
//! are hidden (intercepted, #UD); the hypervisor bit is set and leaves 0x40000000.. identify
//! Conduit. Topology leaves are emptied; the initial APIC ID is the vCPU's.

/// Hypervisor signature in EBX, ECX, EDX of leaf 0x4000_0000.
pub const SIGNATURE: &[u8; 12] = b"ConduitHyper";
/// Highest hypervisor leaf.
pub const MAX_HYPERVISOR_LEAF: u32 = 0x4000_0001;

/// CPUID result registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

mod bit {
    // Leaf 1 ECX.
    pub const MONITOR: u32 = 1 << 3;
    pub const VMX: u32 = 1 << 5;
    pub const FMA: u32 = 1 << 12;
    pub const X2APIC: u32 = 1 << 21;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const XSAVE: u32 = 1 << 26;
    pub const OSXSAVE: u32 = 1 << 27;
    pub const AVX: u32 = 1 << 28;
    pub const F16C: u32 = 1 << 29;
    pub const HYPERVISOR: u32 = 1 << 31;
    // Leaf 0x8000_0001 ECX.
    pub const SVM: u32 = 1 << 2;
    pub const SKINIT: u32 = 1 << 12;
    pub const MWAITX: u32 = 1 << 29;
    // Leaf 0x8000_0001 EDX.
    pub const RDTSCP: u32 = 1 << 27;
    // Leaf 7.0 EBX allowlist: FSGSBASE, BMI1, SMEP, BMI2, ERMS, RDSEED, ADX, SMAP, CLFLUSHOPT,
    // CLWB, SHA.
    pub const LEAF7_EBX_ALLOWED: u32 =
        1 << 0 | 1 << 3 | 1 << 7 | 1 << 8 | 1 << 9 | 1 << 18 | 1 << 19 | 1 << 20 | 1 << 23 | 1 << 24 | 1 << 29;
}

/// The guest's answer for `leaf`/`subleaf`, given the host's answer and the vCPU's APIC ID.
pub fn filter(leaf: u32, subleaf: u32, host: CpuidResult, apic_id: u8, abi_version: u64) -> CpuidResult {
    let mut r = host;
    match leaf {
        0x1 => {
            r.ecx &= !(bit::MONITOR
                | bit::VMX
                | bit::FMA
                | bit::X2APIC
                | bit::TSC_DEADLINE
                | bit::XSAVE
                | bit::OSXSAVE
                | bit::AVX
                | bit::F16C);
            r.ecx |= bit::HYPERVISOR;
            r.ebx = (r.ebx & 0x00ff_ffff) | u32::from(apic_id) << 24;
        }
        0x5 | 0x6 | 0xb | 0xd | 0x1f => r = CpuidResult::default(),
        0x7 => {
            r = if subleaf == 0 {
                CpuidResult { eax: 0, ebx: host.ebx & bit::LEAF7_EBX_ALLOWED, ecx: 0, edx: 0 }
            } else {
                CpuidResult::default()
            };
        }
        0x4000_0000 => {
            let w = |i: usize| u32::from_le_bytes([SIGNATURE[i], SIGNATURE[i + 1], SIGNATURE[i + 2], SIGNATURE[i + 3]]);
            r = CpuidResult { eax: MAX_HYPERVISOR_LEAF, ebx: w(0), ecx: w(4), edx: w(8) };
        }
        0x4000_0001 => r = CpuidResult { eax: abi_version as u32, ebx: 0, ecx: 0, edx: 0 },
        0x4000_0002..=0x4fff_ffff => r = CpuidResult::default(),
        0x8000_0001 => {
            r.ecx &= !(bit::SVM | bit::SKINIT | bit::MWAITX);
            r.edx &= !bit::RDTSCP;
        }
        0x8000_000a => r = CpuidResult::default(),
        _ => {}
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: CpuidResult = CpuidResult { eax: u32::MAX, ebx: u32::MAX, ecx: u32::MAX, edx: u32::MAX };

    #[test]
    fn svm_and_friends_hidden() {
        let r = filter(0x8000_0001, 0, ALL, 0, 0);
        assert_eq!(r.ecx & bit::SVM, 0);
        assert_eq!(r.edx & bit::RDTSCP, 0);
        assert_eq!(filter(0x8000_000a, 0, ALL, 0, 0), CpuidResult::default());
        let r = filter(1, 0, ALL, 5, 0);
        assert_ne!(r.ecx & bit::HYPERVISOR, 0);
        assert_eq!(r.ecx & (bit::VMX | bit::X2APIC | bit::XSAVE | bit::AVX | bit::MONITOR), 0);
        assert_eq!(r.ebx >> 24, 5, "initial APIC ID is the vCPU's");
        assert_eq!(filter(7, 0, ALL, 0, 0).ebx, bit::LEAF7_EBX_ALLOWED);
        assert_eq!(filter(0xd, 1, ALL, 0, 0), CpuidResult::default());
    }

    #[test]
    fn hypervisor_leaves() {
        let r = filter(0x4000_0000, 0, ALL, 0, 0x1_0000);
        assert_eq!(r.eax, MAX_HYPERVISOR_LEAF);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&r.edx.to_le_bytes());
        assert_eq!(&sig, SIGNATURE);
        assert_eq!(filter(0x4000_0001, 0, ALL, 0, 0x1_0000).eax, 0x1_0000);
        assert_eq!(filter(0x4000_0010, 0, ALL, 0, 0), CpuidResult::default());
    }
}
