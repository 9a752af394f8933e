//! AMD SVM on this machine: what the CPU offers (CPUID 0x8000_000A), turning SVM on for each
//! CPU (EFER.SVME, the host save area in VM_HSAVE_PA, a host VMCB holding the state VMRUN does
//! not switch), and the VMRUN stub itself.
//!
//! One VMRUN, with host interrupts already disabled by the caller: `CLGI; STI` (physical
//! interrupts now exit the guest instead of being taken: V_INTR_MASKING), `VMLOAD` the guest's
//! FS/GS/TR/LDTR/SYSCALL state, load the guest registers VMRUN does not, `VMRUN`; after the
//! exit save them, `VMSAVE` the guest, `VMLOAD` the host, `STGI` — a pending host interrupt is
//! taken right there. The stub returns with interrupts enabled.

use super::percpu::MAX_CPUS;
use conduit_vm::vcpu::{Gprs, gpr_offset as g};
use core::arch::x86_64::__cpuid;
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::registers::model_specific::Msr;

/// EFER.
const IA32_EFER: u32 = 0xc000_0080;
/// EFER.SVME.
const EFER_SVME: u64 = 1 << 12;
/// VM_CR: SVM control (APM Vol. 2 §15.30.1).
const VM_CR: u32 = 0xc001_0114;
/// VM_CR.SVMDIS: SVM disabled by firmware.
const VM_CR_SVMDIS: u64 = 1 << 4;
/// VM_HSAVE_PA: physical address of the host save area.
const VM_HSAVE_PA: u32 = 0xc001_0117;

/// What this CPU's SVM offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub struct SvmInfo {
    /// SVM revision (CPUID 0x8000_000A EAX).
    pub revision: u32,
    /// Number of ASIDs (ASID 0 is the host's).
    pub asids: u32,
    /// Next-RIP saving on exits.
    pub nrips: bool,
    /// Decode assists.
    pub decode_assists: bool,
    /// TLB flush by ASID.
    pub flush_by_asid: bool,
}

/// Why SVM cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum SvmError {
    /// CPUID 0x8000_0001 ECX bit 2 is clear: the CPU has no SVM.
    NoSvm,
    /// CPUID 0x8000_000A EDX bit 0 is clear: no nested paging, which Conduit requires.
    NoNestedPaging,
    /// VM_CR.SVMDIS is set: firmware disabled SVM.
    DisabledByFirmware,
    /// No frame for the host save area or host VMCB.
    OutOfMemory,
    /// The CPU index is beyond the per-CPU tables.
    BadCpu(usize),
}

impl SvmError {
    /// One line for the console.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NoSvm => "the CPU has no SVM (CPUID 8000_0001 ECX bit 2 clear; QEMU: -cpu qemu64,+svm,+npt)",
            Self::NoNestedPaging => "the CPU has SVM but no nested paging (CPUID 8000_000A EDX bit 0 clear)",
            Self::DisabledByFirmware => "SVM is disabled by firmware (VM_CR.SVMDIS set)",
            Self::OutOfMemory => "no memory for the SVM host save area",
            Self::BadCpu(_) => "CPU index beyond the per-CPU tables",
        }
    }
}

/// Reads SVM's capabilities from CPUID.
pub fn probe() -> Result<SvmInfo, SvmError> {
    let max_ext = __cpuid(0x8000_0000).eax;
    if max_ext < 0x8000_000a || __cpuid(0x8000_0001).ecx & (1 << 2) == 0 {
        return Err(SvmError::NoSvm);
    }
    let r = __cpuid(0x8000_000a);
    if r.edx & 1 == 0 {
        return Err(SvmError::NoNestedPaging);
    }
    Ok(SvmInfo {
        revision: r.eax & 0xff,
        asids: r.ebx,
        nrips: r.edx & (1 << 3) != 0,
        decode_assists: r.edx & (1 << 7) != 0,
        flush_by_asid: r.edx & (1 << 6) != 0,
    })
}

/// Host VMCB (for VMSAVE/VMLOAD) of each CPU with SVM on; 0 where it is off.
static HOST_VMCB: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn zeroed_frame() -> Result<u64, SvmError> {
    let f = crate::mem::alloc_frame_below(conduit_mem::FOUR_GIB).ok_or(SvmError::OutOfMemory)?;
    // SAFETY:
    // 1. `f` is a fresh 4 KiB frame from the allocator: nobody else holds it.
    // 2. It is usable RAM below 4 GiB, identity-mapped read-write by the kernel's tables.
    unsafe { core::ptr::write_bytes(f as *mut u8, 0, 4096) };
    Ok(f)
}

/// Turns SVM on for the running CPU (index `cpu`): EFER.SVME, host save area, host VMCB with
/// this CPU's FS/GS/TR/LDTR/SYSCALL state saved once (none of it changes later).
pub fn enable_this_cpu(cpu: usize) -> Result<SvmInfo, SvmError> {
    let info = probe()?;
    let slot = HOST_VMCB.get(cpu).ok_or(SvmError::BadCpu(cpu))?;
    if slot.load(Ordering::Acquire) != 0 {
        return Ok(info);
    }
    // SAFETY: VM_CR exists on every CPU with SVM (checked above); reading it has no effect.
    if unsafe { Msr::new(VM_CR).read() } & VM_CR_SVMDIS != 0 {
        return Err(SvmError::DisabledByFirmware);
    }
    let hsave = zeroed_frame()?;
    let host = zeroed_frame()?;
    // SAFETY:
    // 1. EFER read-modify-write sets only SVME (allowed: SVM present and not disabled, checked
    //    above); every other bit, reserved ones included, is written back unchanged.
    // 2. VM_HSAVE_PA receives a 4 KiB-aligned frame this CPU owns for good, in RAM.
    // 3. VMSAVE writes only the host VMCB frame `host` (4 KiB, owned, identity-mapped); it needs
    //    EFER.SVME, set just before, and runs at CPL 0.
    unsafe {
        let mut efer = Msr::new(IA32_EFER);
        efer.write(efer.read() | EFER_SVME);
        Msr::new(VM_HSAVE_PA).write(hsave);
        core::arch::asm!("vmsave rax", in("rax") host, options(nostack, preserves_flags));
    }
    slot.store(host, Ordering::Release);
    Ok(info)
}

/// The host VMCB of CPU `cpu`, when SVM is on there.
pub fn host_vmcb(cpu: usize) -> Option<u64> {
    HOST_VMCB.get(cpu).map(|s| s.load(Ordering::Acquire)).filter(|&p| p != 0)
}

/// A clean FXSAVE image: x87 control word 0x37f, MXCSR 0x1f80, every register zero.
#[repr(C, align(16))]
struct FxArea([u8; 512]);

static CLEAN_FX: FxArea = {
    let mut a = [0u8; 512];
    a[0] = 0x7f;
    a[1] = 0x03;
    a[24] = 0x80;
    a[25] = 0x1f;
    FxArea(a)
};

/// Clears the state a guest sees on this CPU that VMRUN does not switch: the x87/SSE registers
/// and DR0–DR3. Called before a new vCPU first runs here, so nothing of a previous guest (or
/// of the hypervisor) leaks into it. XCR0 never changes (guests cannot run XSETBV), so x87/SSE
/// is all the extended state a guest can reach.
pub fn reset_guest_visible_state() {
    // SAFETY:
    // 1. CR4.OSFXSR is set on every CPU (`cpu::enable_fxsr` at bring-up), so FXRSTOR loads the
    //    XMM registers and MXCSR; `CLEAN_FX` is a valid, 16-byte aligned 512-byte image whose
    //    MXCSR has no reserved bit set.
    // 2. The hypervisor never holds x87/SSE state of its own (soft-float target), so nothing is
    //    overwritten that it uses.
    // 3. Writing 0 to DR0–DR3 only clears breakpoint addresses; the host's DR7 (restored by
    //    every #VMEXIT) enables none, and each guest's DR7 is in its VMCB.
    unsafe {
        core::arch::asm!(
            "fxrstor64 [{fx}]",
            "xor {z:e}, {z:e}",
            "mov dr0, {z}",
            "mov dr1, {z}",
            "mov dr2, {z}",
            "mov dr3, {z}",
            fx = in(reg) &CLEAN_FX.0,
            z = out(reg) _,
            options(nostack, preserves_flags)
        )
    };
}

/// Runs the guest of `vmcb_pa` until its next exit.
///
/// # Safety
/// 1. SVM is on for this CPU and `host_vmcb_pa` is its host VMCB (`host_vmcb`).
/// 2. `vmcb_pa` is a 4 KiB-aligned VMCB this CPU owns exclusively while the call runs, filled
///    so that its guest state cannot reach host memory: nested paging on with tables that map
///    only the guest's own frames, VMRUN intercepted, IOPM/MSRPM valid.
/// 3. `gprs` is valid for reads and writes.
/// 4. Host interrupts are disabled (the caller's last look at pending work must not race).
///
/// Returns the TSC read right after the exit, before the host takes any interrupt (under
/// `-icount` it counts instructions: the benchmarks measure from here to the next VMRUN).
pub unsafe fn vmrun(vmcb_pa: u64, host_vmcb_pa: u64, gprs: *mut Gprs) -> u64 {
    let mut exit_tsc = 0u64;
    // SAFETY: the obligations are the caller's (above); `exit_tsc` is a live local. The stub
    // restores every callee-saved register and the host's hidden state (VMLOAD of the host
    // VMCB) before returning.
    unsafe { vmrun_stub(vmcb_pa, host_vmcb_pa, gprs, &mut exit_tsc) };
    exit_tsc
}

#[unsafe(naked)]
unsafe extern "sysv64" fn vmrun_stub(_vmcb_pa: u64, _host_vmcb_pa: u64, _gprs: *mut Gprs, _exit_tsc: *mut u64) {
    core::arch::naked_asm!(
        "push rbp",
        "push rbx",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        // [rsp + 16] = exit TSC, [rsp + 8] = gprs, [rsp] = host VMCB.
        "push rcx",
        "push rdx",
        "push rsi",
        "mov rax, rdi",
        "clgi",
        "sti",
        "vmload rax",
        "mov rbx, [rdx + {rbx}]",
        "mov rcx, [rdx + {rcx}]",
        "mov rsi, [rdx + {rsi}]",
        "mov rdi, [rdx + {rdi}]",
        "mov rbp, [rdx + {rbp}]",
        "mov r8, [rdx + {r8}]",
        "mov r9, [rdx + {r9}]",
        "mov r10, [rdx + {r10}]",
        "mov r11, [rdx + {r11}]",
        "mov r12, [rdx + {r12}]",
        "mov r13, [rdx + {r13}]",
        "mov r14, [rdx + {r14}]",
        "mov r15, [rdx + {r15}]",
        "mov rdx, [rdx + {rdx}]",
        "vmrun rax",
        // #VMEXIT: RAX and RSP are the host's again (RAX = guest VMCB), GIF = 0.
        "vmsave rax",
        "mov rax, [rsp + 8]",
        "mov [rax + {rbx}], rbx",
        "mov [rax + {rcx}], rcx",
        "mov [rax + {rdx}], rdx",
        "mov [rax + {rsi}], rsi",
        "mov [rax + {rdi}], rdi",
        "mov [rax + {rbp}], rbp",
        "mov [rax + {r8}], r8",
        "mov [rax + {r9}], r9",
        "mov [rax + {r10}], r10",
        "mov [rax + {r11}], r11",
        "mov [rax + {r12}], r12",
        "mov [rax + {r13}], r13",
        "mov [rax + {r14}], r14",
        "mov [rax + {r15}], r15",
        "rdtsc",
        "shl rdx, 32",
        "or rax, rdx",
        "mov rdx, [rsp + 16]",
        "mov [rdx], rax",
        "pop rax",
        "vmload rax",
        "stgi",
        "pop rdx",
        "pop rcx",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "ret",
        rbx = const g::RBX,
        rcx = const g::RCX,
        rdx = const g::RDX,
        rsi = const g::RSI,
        rdi = const g::RDI,
        rbp = const g::RBP,
        r8 = const g::R8,
        r9 = const g::R9,
        r10 = const g::R10,
        r11 = const g::R11,
        r12 = const g::R12,
        r13 = const g::R13,
        r14 = const g::R14,
        r15 = const g::R15,
    )
}
