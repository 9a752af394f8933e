//! The IDT: 256 interrupt gates, each entering through a 16-byte naked stub that normalizes
//! the stack (a dummy error code where the CPU pushes none, then the vector) and jumps to one
//! common path that saves every general register into a [`Frame`] and calls [`dispatch`].
//! Every gate runs on an IST stack (SDM Vol. 3A §7.14.5).

use super::gdt::KERNEL_CODE;
use x86_64::VirtAddr;
use x86_64::structures::DescriptorTablePointer;

/// Vectors for which the CPU pushes an error code (SDM Vol. 3A Table 7-1).
pub const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Bytes per entry stub.
const STUB_BYTES: u64 = 16;

/// Registers as the entry path leaves them on the stack, lowest address first.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Pushed by the stub.
    pub vector: u64,
    /// Pushed by the CPU, or 0 by the stub.
    pub error_code: u64,
    /// The interrupted context (pushed by the CPU).
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

const _: () = assert!(core::mem::size_of::<Frame>() == 22 * 8);
const _: () = assert!(core::mem::offset_of!(Frame, vector) == 15 * 8);
const _: () = assert!(core::mem::offset_of!(Frame, rip) == 17 * 8);

/// The 256 entry stubs, 16 bytes each: `push 0` (or a 2-byte nop where the CPU pushed an error
/// code), `push imm32 vector`, `jmp rel32 common`, 4 bytes of int3 padding.
#[unsafe(naked)]
extern "C" fn entry_stubs() {
    core::arch::naked_asm!(
        ".set conduit_vec, 0",
        ".rept 256",
        ".if (conduit_vec == 8) || ((conduit_vec >= 10) && (conduit_vec <= 14)) || (conduit_vec == 17) || (conduit_vec == 21) || (conduit_vec == 29) || (conduit_vec == 30)",
        ".byte 0x66, 0x90",
        ".else",
        ".byte 0x6a, 0x00",
        ".endif",
        ".byte 0x68",
        ".long conduit_vec",
        ".byte 0xe9",
        ".if (conduit_vec >= {first_device}) && (conduit_vec <= {last_device})",
        ".long {device} - . - 4",
        ".else",
        ".long {common} - . - 4",
        ".endif",
        ".byte 0xcc, 0xcc, 0xcc, 0xcc",
        ".set conduit_vec, conduit_vec + 1",
        ".endr",
        common = sym entry_common,
        device = sym entry_device,
        first_device = const crate::vmm::irq::FIRST_DEVICE_VECTOR,
        last_device = const crate::vmm::irq::LAST_DEVICE_VECTOR,
    )
}

/// Entry of the guest-device vectors (the forwarding fast path): saves only the registers a
/// Rust call may clobber (the handler never looks at or changes the interrupted context), calls
/// `vmm::irq::device_interrupt(vector)`, which routes the interrupt and sends the EOI, restores
/// them and returns. The CPU's frame (5 quadwords), the stub's two and these nine keep RSP
/// 16-byte aligned for the call.
#[unsafe(naked)]
extern "C" fn entry_device() {
    core::arch::naked_asm!(
        "push rax",
        "push rcx",
        "push rdx",
        "push rsi",
        "push rdi",
        "push r8",
        "push r9",
        "push r10",
        "push r11",
        "mov edi, [rsp + 72]",
        "cld",
        "call {handler}",
        "pop r11",
        "pop r10",
        "pop r9",
        "pop r8",
        "pop rdi",
        "pop rsi",
        "pop rdx",
        "pop rcx",
        "pop rax",
        "add rsp, 16",
        "iretq",
        handler = sym crate::vmm::irq::device_interrupt,
    )
}

/// Saves all general registers, calls `dispatch(&mut Frame)`, restores them (as the handler
/// may have changed them) and returns with iretq. The CPU aligned RSP to 16 before pushing its
/// frame; 22 quadwords keep it aligned for the call.
#[unsafe(naked)]
extern "C" fn entry_common() {
    core::arch::naked_asm!(
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
        "cld",
        "call {dispatch}",
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

/// Rust side of every interrupt and exception.
extern "C" fn dispatch(frame: &mut Frame) {
    let vector = (frame.vector & 0xff) as u8;
    debug_assert!(has_error_code(vector) || frame.error_code == 0, "stub pushed no dummy error code");
    if vector < 32 {
        super::exceptions::handle(vector, frame);
    } else {
        super::interrupts::handle(vector, frame);
    }
}

/// IST slot (1-based, as the gate encodes it) for each vector.
pub const fn ist_for(vector: u8) -> u8 {
    match vector {
        2 => 1,     // NMI: may arrive anywhere, even on a bad stack
        8 => 2,     // #DF: the stack may be what overflowed
        18 => 3,    // #MC
        14 => 4,    // #PF
        1 | 3 => 7, // #DB, #BP: traps that may hit inside other handlers
        0..=31 => 5,
        _ => 6, // external interrupts and IPIs
    }
}

/// An IDT gate descriptor (SDM Vol. 3A Figure 7-8).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const _: () = assert!(core::mem::size_of::<Gate>() == 16);

impl Gate {
    /// Present, DPL 0, 64-bit interrupt gate (IF cleared on entry).
    const INTERRUPT_GATE: u8 = 0x8e;

    fn new(handler: u64, ist: u8) -> Self {
        Self {
            offset_low: handler as u16,
            selector: KERNEL_CODE,
            ist,
            type_attr: Self::INTERRUPT_GATE,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
#[derive(Debug)]
struct Idt([Gate; 256]);

static IDT: spin::Once<Idt> = spin::Once::new();

/// Builds the IDT (once) and loads it on this CPU.
pub fn load() {
    let idt = IDT.call_once(|| {
        let base = entry_stubs as *const () as u64;
        let mut gates = [Gate::default(); 256];
        for (v, gate) in gates.iter_mut().enumerate() {
            *gate = Gate::new(base + v as u64 * STUB_BYTES, ist_for(v as u8));
        }
        Idt(gates)
    });
    let ptr = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::new(idt as *const Idt as u64),
    };
    // SAFETY:
    // 1. `idt` is 'static and never changes after it is built.
    // 2. Every gate points at an entry stub inside `entry_stubs` (16 bytes each, 256 of
    //    them), with the kernel code selector present in every CPU's GDT, and an IST slot
    //    that this CPU's TSS fills (the GDT/TSS are loaded before the IDT on every CPU).
    unsafe { x86_64::instructions::tables::lidt(&ptr) };
}
