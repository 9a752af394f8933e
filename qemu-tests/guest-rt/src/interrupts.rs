//! The IDT and interrupt dispatch. All 256 vectors enter through 16-byte stubs that push the
//! vector (and a 0 where the CPU pushes no error code) and jump to one common entry, which
//! saves every general-purpose register and calls `dispatch`:
//! - vectors 0–31 (exceptions) print a report and EXIT with `exit_code::EXCEPTION | vector`;
//! - other vectors call the handler [`register`]ed for them, then EOI; an unregistered vector
//!   is counted ([`unexpected`]) and EOI'd; the spurious vector (see [`SPURIOUS_VECTOR`]) is
//!   counted and not EOI'd.
//!
//! Every arrival at a vector ≥ 32 is also counted per vector, on all vCPUs together
//! ([`count`]); [`wait_for_count`] waits (bounded) for a vector's count to reach a value. A
//! driver that needs nothing done in its handler registers [`count_only`].
//!
//! Handlers run on the interrupted stack with interrupts off (interrupt gates). The runtime is
//! built soft-float, so no handler touches SSE/x87 state.

use core::arch::{asm, naked_asm};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use conduit_abi::layout;

use crate::{cpu, exit_code, hypercall, lapic, println};

/// Vector the runtime expects as the APIC's spurious-interrupt vector (`lapic::enable`).
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// First vector that is not a CPU exception.
pub const FIRST_INTERRUPT: u8 = 32;

/// Exceptions for which the CPU pushes an error code: #DF 8, #TS 10, #NP 11, #SS 12, #GP 13,
/// #PF 14, #AC 17, #CP 21, #VC 29, #SX 30 (SDM Vol. 3A, Table 6-1).
const ERROR_CODE_VECTORS: u32 = {
    let vectors = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];
    let mut mask = 0;
    let mut i = 0;
    while i < vectors.len() {
        mask |= 1 << vectors[i];
        i += 1;
    }
    mask
};

/// Bytes per entry stub (see `vector_stubs`).
const STUB_BYTES: usize = 16;

/// Exception mnemonics, by vector.
const EXCEPTION_NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "res15",
    "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "res22", "res23", "res24", "res25", "res26", "res27", "#HV", "#VC",
    "#SX", "res31",
];

/// The IDT: 256 16-byte gates as pairs of words. Atomics because every vCPU of a partition
/// fills it (with the same values) when it starts.
#[repr(C, align(16))]
struct Idt([AtomicU64; 512]);

static IDT: Idt = Idt([const { AtomicU64::new(0) }; 512]);

/// Registered handlers (`fn(u8)` as `usize`, 0 = none), by vector.
static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

/// Arrivals per vector (every vCPU), vectors 32–254 (the spurious vector counts in `SPURIOUS`).
static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

/// Interrupts at vectors without a handler.
static UNEXPECTED: AtomicU64 = AtomicU64::new(0);
/// Last vector counted in `UNEXPECTED`, plus 1 (0: none).
static LAST_UNEXPECTED: AtomicUsize = AtomicUsize::new(0);
/// Interrupts at `SPURIOUS_VECTOR`.
static SPURIOUS: AtomicU64 = AtomicU64::new(0);
/// Set while an exception is being reported: a fault inside the report exits at once.
static IN_EXCEPTION: AtomicBool = AtomicBool::new(false);

/// A 64-bit interrupt gate (SDM Vol. 3A, Figure 6-8): `handler` in code segment `selector`,
/// present, DPL 0, type 0xE, no IST.
const fn gate(handler: u64, selector: u16) -> [u64; 2] {
    const PRESENT_INTERRUPT_GATE: u64 = 0x8e;
    let low = (handler & 0xffff)
        | ((selector as u64) << 16)
        | (PRESENT_INTERRUPT_GATE << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// Operand of `lidt`.
#[repr(C, packed)]
struct IdtPointer {
    limit: u16,
    base: u64,
}

/// Fills the IDT with the entry stubs and loads it on this vCPU.
pub(crate) fn init() {
    let stubs = vector_stubs as *const () as u64;
    for vector in 0..256 {
        let [low, high] = gate(stubs + (vector * STUB_BYTES) as u64, layout::CODE_SELECTOR);
        IDT.0[2 * vector].store(low, Ordering::Relaxed);
        IDT.0[2 * vector + 1].store(high, Ordering::Relaxed);
    }
    let pointer = IdtPointer { limit: (core::mem::size_of::<Idt>() - 1) as u16, base: &IDT as *const Idt as u64 };
    // SAFETY:
    // 1. `pointer` describes `IDT`, a static (it lives for ever), fully written above: 256
    //    present gates to the stubs below, in the hypervisor's flat code segment.
    // 2. `lidt` reads the 10-byte operand and changes no general-purpose register.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
}

/// Registers `handler` for `vector` (≥ `FIRST_INTERRUPT`), replacing any previous one. The
/// handler gets the vector and runs with interrupts off; the runtime sends the EOI after it.
pub fn register(vector: u8, handler: fn(u8)) {
    assert!(vector >= FIRST_INTERRUPT, "vectors below 32 are CPU exceptions");
    HANDLERS[usize::from(vector)].store(handler as usize, Ordering::Release);
}

/// Vectors taken without an EOI (`set_auto_eoi`).
static AUTO_EOI: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];

/// Has `vector` taken without an EOI (the `AUTO_EOI` hypercall: it never enters the virtual
/// ISR) and stops the dispatcher from writing EOI for it; returns the hypercall's result.
pub fn set_auto_eoi(vector: u8, enable: bool) -> i64 {
    let r = crate::hypercall::auto_eoi(vector, enable);
    if r == 0 {
        let (word, bit) = (usize::from(vector) / 64, 1usize << (vector % 64));
        if enable {
            AUTO_EOI[word].fetch_or(bit, Ordering::AcqRel);
        } else {
            AUTO_EOI[word].fetch_and(!bit, Ordering::AcqRel);
        }
    }
    r
}

fn auto_eoi(vector: u8) -> bool {
    AUTO_EOI[usize::from(vector) / 64].load(Ordering::Acquire) & (1usize << (vector % 64)) != 0
}

/// Removes the handler of `vector`.
pub fn unregister(vector: u8) {
    HANDLERS[usize::from(vector)].store(0, Ordering::Release);
}

/// A handler that does nothing: the arrival is counted ([`count`]) and EOI'd by the runtime.
pub fn count_only(_vector: u8) {}

/// Arrivals at `vector` so far, on every vCPU (exceptions are not counted).
pub fn count(vector: u8) -> u64 {
    COUNTS[usize::from(vector)].load(Ordering::Acquire)
}

/// Waits until [`count`]`(vector)` reaches `target` or `timeout_us` microseconds pass; returns
/// whether it did. Interrupts must be enabled (or arrive on another vCPU) for this to succeed.
pub fn wait_for_count(vector: u8, target: u64, timeout_us: u64) -> bool {
    crate::time::wait_until(crate::time::deadline_after_us(timeout_us), || count(vector) >= target)
}

/// Interrupts that arrived at a vector without a handler.
pub fn unexpected() -> u64 {
    UNEXPECTED.load(Ordering::Relaxed)
}

/// The last vector counted by [`unexpected`], if any.
pub fn last_unexpected() -> Option<u8> {
    LAST_UNEXPECTED.load(Ordering::Relaxed).checked_sub(1).map(|v| v as u8)
}

/// Interrupts that arrived at `SPURIOUS_VECTOR`.
pub fn spurious() -> u64 {
    SPURIOUS.load(Ordering::Relaxed)
}

/// What the common entry saved, lowest address first: the general-purpose registers, the
/// vector and error code the stub pushed (or the CPU, for the error code), and the CPU's
/// interrupt frame.
#[repr(C)]
#[derive(Debug)]
struct Frame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Called by the common entry for every vector.
extern "sysv64" fn dispatch(frame: &Frame) {
    let vector = frame.vector as u8;
    if vector < FIRST_INTERRUPT {
        exception(frame);
    }
    if vector == SPURIOUS_VECTOR {
        SPURIOUS.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let raw = HANDLERS[usize::from(vector)].load(Ordering::Acquire);
    if raw == 0 {
        UNEXPECTED.fetch_add(1, Ordering::Relaxed);
        LAST_UNEXPECTED.store(usize::from(vector) + 1, Ordering::Relaxed);
    } else {
        // SAFETY:
        // 1. Non-zero values in HANDLERS are only stored by `register`, from a `fn(u8)`, so
        //    `raw` is a valid pointer to a function of that type.
        let handler = unsafe { core::mem::transmute::<usize, fn(u8)>(raw) };
        handler(vector);
    }
    // Counted after the handler, so a waiter that sees the count also sees the handler's work.
    COUNTS[usize::from(vector)].fetch_add(1, Ordering::AcqRel);
    if !auto_eoi(vector) {
        lapic::eoi();
    }
}

/// Reports a CPU exception and stops the vCPU.
fn exception(frame: &Frame) -> ! {
    let vector = frame.vector;
    let code = exit_code::EXCEPTION | vector;
    if IN_EXCEPTION.swap(true, Ordering::Relaxed) {
        hypercall::exit(code);
    }
    println!(
        "guest-rt: exception {} ({}) error code {:#x} at rip {:#x}, cr2 {:#x}, rsp {:#x}, rbp {:#x}, rflags {:#x}",
        vector,
        EXCEPTION_NAMES[vector as usize % 32],
        frame.error_code,
        frame.rip,
        cpu::cr2(),
        frame.rsp,
        frame.rbp,
        frame.rflags,
    );
    println!(
        "guest-rt:   rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi
    );
    println!(
        "guest-rt:   r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x} cs {:#x} ss {:#x}",
        frame.r8, frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15, frame.cs, frame.ss
    );
    hypercall::exit(code)
}

/// The 256 entry stubs, `STUB_BYTES` each, vector `v` at `vector_stubs + 16 * v`. Each is
/// encoded by hand so its size is fixed whatever the vector or the distance to the common
/// entry: `push 0` (`6a 00`, or the 2-byte nop `66 90` where the CPU pushed an error code),
/// `push imm32 v` (`68 v`), `jmp rel32 common` (`e9 rel32`), and `int3` padding to 16.
///
/// # Safety
///
/// Never called: only the CPU enters it, through the IDT.
#[unsafe(naked)]
unsafe extern "sysv64" fn vector_stubs() {
    naked_asm!(
        ".set conduit_rt_vector, 0",
        ".rept 256",
        ".if conduit_rt_vector < 32",
        ".if ({mask} >> conduit_rt_vector) & 1",
        ".byte 0x66, 0x90",
        ".else",
        ".byte 0x6a, 0x00",
        ".endif",
        ".else",
        ".byte 0x6a, 0x00",
        ".endif",
        ".byte 0x68",
        ".long conduit_rt_vector",
        ".byte 0xe9",
        ".long {common} - . - 4",
        ".byte 0xcc, 0xcc, 0xcc, 0xcc",
        ".set conduit_rt_vector, conduit_rt_vector + 1",
        ".endr",
        mask = const ERROR_CODE_VECTORS,
        common = sym common_entry,
    )
}

/// Saves the general-purpose registers below the vector/error-code pair, calls `dispatch` with
/// a pointer to the resulting `Frame` on a 16-byte-aligned stack, restores the registers, drops
/// the pair and returns from the interrupt.
///
/// # Safety
///
/// Never called: only the entry stubs jump here, with the stack as the stubs leave it.
#[unsafe(naked)]
unsafe extern "sysv64" fn common_entry() {
    naked_asm!(
        "push rax",
        "push rbx",
        "push rcx",
        "push rdx",
        "push rsi",
        "push rdi",
        "push rbp",
        "push r8",
        "push r9",
        "push r10",
        "push r11",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "mov rdi, rsp",
        // rbx is callee-saved in the SysV ABI: it keeps the unaligned stack pointer.
        "mov rbx, rsp",
        "and rsp, -16",
        "cld",
        "call {dispatch}",
        "mov rsp, rbx",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop r11",
        "pop r10",
        "pop r9",
        "pop r8",
        "pop rbp",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        "pop rcx",
        "pop rbx",
        "pop rax",
        "add rsp, 16",
        "iretq",
        dispatch = sym dispatch,
    )
}
