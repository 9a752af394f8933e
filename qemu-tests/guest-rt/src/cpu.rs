//! CPU instructions a test guest uses: interrupt flag, halt, TSC, CPUID, MSRs, port I/O.

use core::arch::asm;

pub use core::arch::x86_64::CpuidResult;

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// Enables interrupts (`sti`). The runtime's IDT is installed before `main` runs.
pub fn sti() {
    // SAFETY:
    // 1. `sti` only sets RFLAGS.IF; every vector has a gate in the runtime's IDT.
    // 2. It is not `nomem`: an interrupt handler may run right after it and change memory, so
    //    the compiler must not cache memory across it.
    unsafe { asm!("sti", options(nostack)) };
}

/// Disables interrupts (`cli`).
pub fn cli() {
    // SAFETY:
    // 1. `cli` only clears RFLAGS.IF.
    // 2. Not `nomem`: it orders memory accesses against the handlers it holds off.
    unsafe { asm!("cli", options(nostack)) };
}

/// Halts until the next interrupt (or forever with interrupts off).
pub fn hlt() {
    // SAFETY:
    // 1. `hlt` at CPL 0 waits for an interrupt; handlers may run before it returns, so it is
    //    not `nomem`.
    unsafe { asm!("hlt", options(nostack)) };
}

/// `sti; hlt` back to back: the `sti` shadow covers the `hlt`, so an interrupt pending before
/// the call (or arriving in between) wakes the `hlt` rather than being taken before it. Returns
/// with interrupts enabled, after the handlers of the waking interrupts ran.
pub fn sti_hlt() {
    // SAFETY:
    // 1. Sets RFLAGS.IF (the IDT is installed) and waits; handlers may run, so not `nomem`.
    unsafe { asm!("sti", "hlt", options(nostack)) };
}

/// Whether RFLAGS.IF is set.
pub fn interrupts_enabled() -> bool {
    let flags: u64;
    // SAFETY:
    // 1. `pushfq; pop` reads RFLAGS through 8 bytes of stack it restores.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags)) };
    flags & RFLAGS_IF != 0
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY:
    // 1. `rdtsc` (CR4.TSD is clear) writes EDX:EAX, declared as outputs, and nothing else.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// `CPUID` leaf `leaf`, sub-leaf `subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    core::arch::x86_64::__cpuid_count(leaf, subleaf)
}

/// Reads model-specific register `msr`. An MSR the (virtual) CPU does not have raises #GP,
/// which the runtime reports as an exception exit.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY:
    // 1. `rdmsr` at CPL 0 writes EDX:EAX, declared as outputs, and no memory; a #GP for an
    //    unknown MSR goes to the runtime's handler, which stops the vCPU.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes `value` to I/O port `port`.
///
/// # Safety
///
/// The write must have no effect on memory Rust code owns (for example, it must not start
/// DMA into it). Ports a Conduit guest has not been given are intercepted by the hypervisor.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY:
    // 1. `out` at CPL 0 is allowed; its effects on memory are excluded by the caller.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// Reads a 32-bit value from I/O port `port` (one `in eax, dx`; never a string instruction).
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY:
    // 1. `in` at CPL 0 is allowed and writes only EAX, declared as an output; a port the
    //    hypervisor does not emulate reads all ones.
    // 2. Not `nomem`: reading a port may have device side effects that memory accesses must be
    //    ordered with.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags)) };
    value
}

/// Writes a 32-bit `value` to I/O port `port` (one `out dx, eax`).
///
/// # Safety
///
/// As for [`outb`]: the write must have no effect on memory Rust code owns.
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY:
    // 1. `out` at CPL 0 is allowed; its effects on memory are excluded by the caller.
    // 2. Not `nomem`, so it stays ordered with the surrounding memory accesses.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) };
}

/// Spin-loop hint.
pub fn pause() {
    core::hint::spin_loop();
}

/// Reads CR2 (the address of the last page fault).
pub fn cr2() -> u64 {
    let value: u64;
    // SAFETY:
    // 1. Reading CR2 at CPL 0 has no side effect.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}
