//! CPU identification: the feature bits the hypervisor depends on, read once per CPU.

use core::arch::x86_64::{__cpuid, __cpuid_count};

/// Features Conduit checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, defmt::Format)]
pub struct Features {
    /// Execute-disable bit (CPUID 0x8000_0001 EDX 20).
    pub nx: bool,
    /// 1 GiB pages (CPUID 0x8000_0001 EDX 26).
    pub pdpe1gb: bool,
    /// x2APIC (CPUID 1 ECX 21).
    pub x2apic: bool,
    /// SVM (CPUID 0x8000_0001 ECX 2).
    pub svm: bool,
    /// Invariant TSC (CPUID 0x8000_0007 EDX 8).
    pub invariant_tsc: bool,
    /// Highest extended leaf.
    pub max_extended_leaf: u32,
    /// First physical address beyond what the CPU can address (CPUID 0x8000_0008 EAX 7:0).
    pub max_phys_addr: u64,
}

/// Reads the features of the running CPU.
pub fn features() -> Features {
    let basic = __cpuid(1);
    let max_ext = __cpuid(0x8000_0000).eax;
    let ext = if max_ext >= 0x8000_0001 { __cpuid(0x8000_0001) } else { __cpuid_count(0, 0) };
    let power = if max_ext >= 0x8000_0007 { __cpuid(0x8000_0007).edx } else { 0 };
    let has_ext = max_ext >= 0x8000_0001;
    // Without leaf 0x8000_0008, 36 bits (SDM Vol. 3A §4.1.4).
    let phys_bits = if max_ext >= 0x8000_0008 { __cpuid(0x8000_0008).eax & 0xff } else { 36 };
    Features {
        nx: has_ext && ext.edx & (1 << 20) != 0,
        pdpe1gb: has_ext && ext.edx & (1 << 26) != 0,
        x2apic: basic.ecx & (1 << 21) != 0,
        svm: has_ext && ext.ecx & (1 << 2) != 0,
        invariant_tsc: power & (1 << 8) != 0,
        max_extended_leaf: max_ext,
        max_phys_addr: 1u64 << phys_bits.clamp(32, 52),
    }
}

/// Enables FXSAVE/FXRSTOR and SSE exceptions on this CPU (CR4.OSFXSR, CR4.OSXMMEXCPT), read-
/// modify-write. The hypervisor itself never executes SSE (soft-float target); this only lets it
/// load a clean x87/SSE state for a new guest (`svm::reset_guest_visible_state`).
pub fn enable_fxsr() {
    use x86_64::registers::control::{Cr4, Cr4Flags};
    // SAFETY:
    // 1. Every x86-64 CPU has FXSR and SSE (CPUID 1 EDX bits 24, 25 are architectural in
    //    long mode), so both bits are valid to set.
    // 2. Only these two bits change; every other CR4 bit, reserved ones included, is written
    //    back as read (`Cr4::update`).
    unsafe { Cr4::update(|f| f.insert(Cr4Flags::OSFXSR | Cr4Flags::OSXMMEXCPT_ENABLE)) };
}

/// A 64-bit value nobody outside can predict, for seeding hash tables guests could otherwise
/// aim collisions at: RDRAND when the CPU has it (retried a bounded number of times, as the
/// instruction may transiently fail), else the TSC mixed with a constant (weaker: under
/// `-icount` the TSC at boot is deterministic).
pub fn random_seed() -> u64 {
    const RDRAND: u32 = 1 << 30;
    if __cpuid(1).ecx & RDRAND != 0 {
        for _ in 0..16 {
            let value: u64;
            let ok: u8;
            // SAFETY:
            // 1. CPUID.1:ECX.RDRAND says the instruction exists.
            // 2. It writes only its output register and CF (read by `setc`); no memory, no stack.
            unsafe {
                core::arch::asm!("rdrand {v}", "setc {ok}", v = out(reg) value, ok = out(reg_byte) ok, options(nomem, nostack));
            }
            if ok != 0 {
                return value;
            }
        }
    }
    super::time::rdtsc().rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15
}
