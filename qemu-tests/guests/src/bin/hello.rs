//! `hello`: the first guest. Greets, checks what the CPU shows of the hypervisor (SVM hidden,
//! hypervisor bit, the "ConduitHyper" leaves, EFER.SVME clear), checks that SSE and x87 state
//! survive 1000 exits, and that bad hypercalls are rejected with the documented errors.
#![no_std]
#![no_main]

use core::arch::asm;
use core::mem::offset_of;

use conduit_guest_rt::abi::{error, hypercall as nr};
use conduit_guest_rt::report::Report;
use conduit_guest_rt::{BootInfo, cpu, entry, hypercall, partition_name, println};

entry!(main);

/// CPUID 1 ECX: running under a hypervisor.
const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID 0x8000_0001 ECX: SVM.
const CPUID_EXT_ECX_SVM: u32 = 1 << 2;
/// Hypervisor vendor leaf (EAX = highest hypervisor leaf, EBX:ECX:EDX = signature).
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
/// Conduit's ABI-version leaf (EAX = `ABI_VERSION`).
const LEAF_ABI_VERSION: u32 = 0x4000_0001;
/// EFER MSR and its bits (AMD APM Vol. 2, 3.1.7).
const MSR_EFER: u32 = 0xc000_0080;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const EFER_SVME: u64 = 1 << 12;

/// Exits in the FPU test: pairs of (UPTIME hypercall, `out 0x80`).
const FPU_EXIT_PAIRS: u64 = 500;

fn main(info: &'static BootInfo) -> u64 {
    let mut r = Report::new("hello");
    let version = hypercall::version();
    println!(
        "hello from {} vcpu {}/{}: {} MiB, ABI {}.{}",
        partition_name(info),
        info.vcpu,
        info.vcpus,
        info.memory_bytes >> 20,
        version >> 16,
        version & 0xffff
    );
    r.check(
        version == info.abi_version,
        format_args!("VERSION returned {:#x} but BootInfo.abi_version is {:#x}", version, info.abi_version),
    );
    check_cpu(&mut r, version);
    check_fpu(&mut r);
    check_bad_hypercalls(&mut r, info);
    println!("hello: done");
    r.finish()
}

/// CPUID and EFER show a hypervisor but no SVM.
fn check_cpu(r: &mut Report, version: u64) {
    let before = r.failures();
    let leaf1 = cpu::cpuid(1, 0);
    r.check(leaf1.ecx & CPUID1_ECX_HYPERVISOR != 0, format_args!("CPUID 1 ECX {:#x}: hypervisor bit clear", leaf1.ecx));
    let max_ext = cpu::cpuid(0x8000_0000, 0).eax;
    if r.check(max_ext >= 0x8000_0001, format_args!("CPUID 0x80000000 EAX {max_ext:#x}: no leaf 0x80000001")) {
        let ext = cpu::cpuid(0x8000_0001, 0);
        r.check(ext.ecx & CPUID_EXT_ECX_SVM == 0, format_args!("CPUID 0x80000001 ECX {:#x}: SVM visible", ext.ecx));
    }
    let hv = cpu::cpuid(LEAF_HYPERVISOR, 0);
    r.check(hv.eax >= LEAF_ABI_VERSION, format_args!("CPUID {LEAF_HYPERVISOR:#x} EAX {:#x}: no ABI leaf", hv.eax));
    let mut signature = [0u8; 12];
    signature[0..4].copy_from_slice(&hv.ebx.to_le_bytes());
    signature[4..8].copy_from_slice(&hv.ecx.to_le_bytes());
    signature[8..12].copy_from_slice(&hv.edx.to_le_bytes());
    r.check(
        &signature == b"ConduitHyper",
        format_args!(
            "CPUID {LEAF_HYPERVISOR:#x} signature {:?} (EBX {:#x} ECX {:#x} EDX {:#x}), expected \"ConduitHyper\"",
            core::str::from_utf8(&signature).unwrap_or("<not ASCII>"),
            hv.ebx,
            hv.ecx,
            hv.edx
        ),
    );
    let abi = cpu::cpuid(LEAF_ABI_VERSION, 0).eax;
    r.check(
        u64::from(abi) == version,
        format_args!("CPUID {LEAF_ABI_VERSION:#x} EAX {abi:#x}, but VERSION returned {version:#x}"),
    );
    let efer = cpu::rdmsr(MSR_EFER);
    r.check(efer & EFER_SVME == 0, format_args!("EFER {efer:#x}: SVME visible"));
    let long_mode = EFER_LME | EFER_LMA | EFER_NXE;
    r.check(efer & long_mode == long_mode, format_args!("EFER {efer:#x}: LME, LMA or NXE clear"));
    if r.failures() == before {
        println!(
            "hello: cpuid and EFER hide SVM; hypervisor leaf \"ConduitHyper\", ABI {}.{}",
            abi >> 16,
            abi & 0xffff
        );
    }
}

/// An FXSAVE image (Intel SDM Vol. 1, Table 10-2; 64-bit mode, REX.W clear).
#[repr(C, align(16))]
struct FxArea([u8; 512]);

impl FxArea {
    const FCW: usize = 0;
    const FSW: usize = 2;
    const FTW: usize = 4;
    const MXCSR: usize = 24;
    const ST0: usize = 32;
    const XMM0: usize = 160;

    const fn new() -> Self {
        Self([0; 512])
    }

    fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.0[offset], self.0[offset + 1]])
    }

    fn mxcsr(&self) -> u32 {
        let b = &self.0[Self::MXCSR..Self::MXCSR + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// The 80-bit value of `ST(i)`.
    fn st(&self, i: usize) -> &[u8] {
        &self.0[Self::ST0 + 16 * i..Self::ST0 + 16 * i + 10]
    }

    fn xmm(&self, i: usize) -> &[u8] {
        &self.0[Self::XMM0 + 16 * i..Self::XMM0 + 16 * i + 16]
    }
}

/// What the FPU test loads, read by its asm at the offsets below.
#[repr(C)]
struct FpuSetup {
    /// xmm0–15, low quadword first.
    xmm: [[u64; 2]; 16],
    /// Loaded with `fild` in this order (so `ST(1)` holds the last, `ST(0)` is π).
    ints: [i64; 4],
    mxcsr: u32,
    fcw: u16,
}

/// Distinct, recognisable values.
const FPU_SETUP: FpuSetup = {
    let mut xmm = [[0u64; 2]; 16];
    let mut i = 0;
    while i < 16 {
        let n = i as u64;
        xmm[i] =
            [0x5a5a_0000_0000_0000 | (n << 40) | (0x0101_0101 * (n + 1)), !(0x0f0f_0000_1234_0000 ^ (n << 24)) ^ n];
        i += 1;
    }
    FpuSetup {
        xmm,
        ints: [1_000_003, -271_828, 0x0123_4567_89ab_cdef, 42],
        // All exceptions masked, round toward zero (default 0x1f80).
        mxcsr: 0x7f80,
        // All exceptions masked, 64-bit precision, round toward zero (default 0x037f).
        fcw: 0x0f7f,
    }
};

/// The x87 80-bit extended encoding of a non-zero integer (exact: 64-bit significand with an
/// explicit integer bit).
fn x87_from_i64(value: i64) -> [u8; 10] {
    let magnitude = value.unsigned_abs();
    let shift = magnitude.leading_zeros();
    let significand = magnitude << shift;
    let exponent = 16383 + 63 - shift as u16;
    let sign_exponent = if value < 0 { 0x8000 | exponent } else { exponent };
    let mut out = [0u8; 10];
    out[..8].copy_from_slice(&significand.to_le_bytes());
    out[8..].copy_from_slice(&sign_exponent.to_le_bytes());
    out
}

/// Loads `setup` into xmm0–15, MXCSR, FCW and five x87 registers, FXSAVEs that to `before`,
/// makes `2 * pairs` exits (UPTIME hypercall, `out 0x80`), FXSAVEs to `after` and restores the
/// state it found. Only this asm touches SSE/x87 (the rest of the guest is soft-float).
fn fpu_across_exits(setup: &FpuSetup, pairs: u64, before: &mut FxArea, after: &mut FxArea) {
    let mut original = FxArea::new();
    // SAFETY:
    // 1. `original`, `before` and `after` are 512-byte, 16-byte-aligned buffers this function
    //    may write (FXSAVE's operand); `setup` is readable at every offset used (offset_of!).
    // 2. CR4.OSFXSR is set by the boot protocol, so FXSAVE/FXRSTOR and SSE instructions work.
    // 3. Every SSE/x87 register and MXCSR changed is restored by the final FXRSTOR from
    //    `original`, so the compiler-visible state is as before; RAX (hypercall result) is
    //    declared clobbered, `n` is an in/out operand, and VMMCALL preserves every other
    //    register.
    // 4. UPTIME_US writes no guest memory; port 0x80 is a POST-code port the hypervisor ignores.
    unsafe {
        asm!(
            "fxsave [{original}]",
            "movdqu xmm0, [{s}]",
            "movdqu xmm1, [{s} + 16]",
            "movdqu xmm2, [{s} + 32]",
            "movdqu xmm3, [{s} + 48]",
            "movdqu xmm4, [{s} + 64]",
            "movdqu xmm5, [{s} + 80]",
            "movdqu xmm6, [{s} + 96]",
            "movdqu xmm7, [{s} + 112]",
            "movdqu xmm8, [{s} + 128]",
            "movdqu xmm9, [{s} + 144]",
            "movdqu xmm10, [{s} + 160]",
            "movdqu xmm11, [{s} + 176]",
            "movdqu xmm12, [{s} + 192]",
            "movdqu xmm13, [{s} + 208]",
            "movdqu xmm14, [{s} + 224]",
            "movdqu xmm15, [{s} + 240]",
            "ldmxcsr dword ptr [{s} + {mxcsr}]",
            "fninit",
            "fldcw word ptr [{s} + {fcw}]",
            "fild qword ptr [{s} + {ints}]",
            "fild qword ptr [{s} + {ints} + 8]",
            "fild qword ptr [{s} + {ints} + 16]",
            "fild qword ptr [{s} + {ints} + 24]",
            "fldpi",
            "fxsave [{before}]",
            "2:",
            "mov eax, {uptime}",
            "vmmcall",
            "out 0x80, al",
            "dec {n}",
            "jnz 2b",
            "fxsave [{after}]",
            "fxrstor [{original}]",
            original = in(reg) original.0.as_mut_ptr(),
            before = in(reg) before.0.as_mut_ptr(),
            after = in(reg) after.0.as_mut_ptr(),
            s = in(reg) setup as *const FpuSetup,
            n = inout(reg) pairs.max(1) => _,
            mxcsr = const offset_of!(FpuSetup, mxcsr),
            fcw = const offset_of!(FpuSetup, fcw),
            ints = const offset_of!(FpuSetup, ints),
            uptime = const nr::UPTIME_US,
            out("rax") _,
            options(nostack),
        );
    }
}

/// SSE and x87 registers hold their values across exits.
fn check_fpu(r: &mut Report) {
    let before_failures = r.failures();
    let setup = &FPU_SETUP;
    let mut before = FxArea::new();
    let mut after = FxArea::new();
    fpu_across_exits(setup, FPU_EXIT_PAIRS, &mut before, &mut after);

    // The loads took effect (otherwise comparing before with after proves nothing).
    for (i, x) in setup.xmm.iter().enumerate() {
        let mut want = [0u8; 16];
        want[..8].copy_from_slice(&x[0].to_le_bytes());
        want[8..].copy_from_slice(&x[1].to_le_bytes());
        r.check(before.xmm(i) == want, format_args!("xmm{i} did not load its pattern"));
    }
    r.check(
        before.mxcsr() == setup.mxcsr,
        format_args!("MXCSR reads {:#x}, loaded {:#x}", before.mxcsr(), setup.mxcsr),
    );
    r.check(
        before.u16_at(FxArea::FCW) == setup.fcw,
        format_args!("FCW reads {:#x}, loaded {:#x}", before.u16_at(FxArea::FCW), setup.fcw),
    );
    for (k, &v) in setup.ints.iter().enumerate() {
        let st = 4 - k; // the last one loaded is ST(1), under π
        r.check(before.st(st) == x87_from_i64(v), format_args!("ST({st}) does not hold {v}"));
    }
    let top = (before.u16_at(FxArea::FSW) >> 11) & 7;
    r.check(top == 3, format_args!("x87 TOP is {top} after five loads, expected 3"));

    // Nothing changed across the exits.
    r.check(
        after.u16_at(FxArea::FCW) == before.u16_at(FxArea::FCW),
        format_args!("FCW changed across exits: {:#x} -> {:#x}", before.u16_at(FxArea::FCW), after.u16_at(FxArea::FCW)),
    );
    r.check(
        after.u16_at(FxArea::FSW) == before.u16_at(FxArea::FSW),
        format_args!("FSW changed across exits: {:#x} -> {:#x}", before.u16_at(FxArea::FSW), after.u16_at(FxArea::FSW)),
    );
    r.check(
        after.0[FxArea::FTW] == before.0[FxArea::FTW],
        format_args!("x87 tag word changed across exits: {:#x} -> {:#x}", before.0[FxArea::FTW], after.0[FxArea::FTW]),
    );
    r.check(
        after.mxcsr() == before.mxcsr(),
        format_args!("MXCSR changed across exits: {:#x} -> {:#x}", before.mxcsr(), after.mxcsr()),
    );
    for i in 0..8 {
        r.check(after.st(i) == before.st(i), format_args!("ST({i}) changed across exits"));
    }
    for i in 0..16 {
        r.check(after.xmm(i) == before.xmm(i), format_args!("xmm{i} changed across exits"));
    }
    if r.failures() == before_failures {
        println!("hello: xmm0-15 and x87 state intact across {} exits", 2 * FPU_EXIT_PAIRS);
    }
}

/// An unknown hypercall and a console write outside guest memory fail with the documented
/// codes.
fn check_bad_hypercalls(r: &mut Report, info: &BootInfo) {
    let before = r.failures();
    const UNKNOWN: u64 = 0x7777;
    // SAFETY:
    // 1. An unknown function writes no guest memory (ABI: it returns ENOSYS).
    let unknown = unsafe { hypercall::call(UNKNOWN, 0, 0) };
    r.check(unknown == error::ENOSYS, format_args!("hypercall {UNKNOWN:#x} returned {unknown}, expected ENOSYS (-38)"));
    // SAFETY:
    // 1. CONSOLE_WRITE only reads guest memory (here: none that exists).
    let outside = unsafe { hypercall::call(nr::CONSOLE_WRITE, info.memory_bytes, 16) };
    r.check(
        outside == error::EFAULT,
        format_args!(
            "CONSOLE_WRITE at {:#x} (beyond RAM) returned {outside}, expected EFAULT (-14)",
            info.memory_bytes
        ),
    );
    // SAFETY:
    // 1. As above; the range ends 8 bytes past the end of RAM.
    let straddling = unsafe { hypercall::call(nr::CONSOLE_WRITE, info.memory_bytes - 8, 16) };
    r.check(
        straddling == error::EFAULT,
        format_args!(
            "CONSOLE_WRITE of 16 bytes at {:#x} (crossing the end of RAM) returned {straddling}, expected EFAULT (-14)",
            info.memory_bytes - 8
        ),
    );
    if r.failures() == before {
        println!("hello: bad hypercalls rejected: unknown -> {unknown}, bad address -> {outside}");
    }
}
