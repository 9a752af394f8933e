//! CPU exceptions (vectors 0–31). Every exception is fatal: it is reported (vector, name, error
//! code, RIP, CR2, every register) on the plain console and in the defmt log, and the run ends
//! with the failure verdict. Two narrow exceptions: an NMI while the system is stopping halts
//! the CPU quietly, and a scenario may arm one expected *trap* (#BP or #DB, which resume after
//! the instruction) to check the reporting path without ending the run.

use super::idt::Frame;
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// SDM Vol. 3A Table 7-1 mnemonics.
pub const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

/// Breakpoint vector.
pub const BREAKPOINT: u8 = 3;
/// NMI vector.
pub const NMI: u8 = 2;

/// One-shot expected trap: 0 = none, else vector + 1.
static EXPECTED_TRAP: AtomicU8 = AtomicU8::new(0);
/// The last expected trap taken: vector + 1 (0 = none), RIP after it, and R12.
static LAST_TRAP: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
/// RIP at which a scenario expects a fatal exception (reported as matching), or 0.
static EXPECTED_FATAL_RIP: AtomicU64 = AtomicU64::new(0);

/// What an expected trap looked like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub struct TrapRecord {
    /// Vector taken.
    pub vector: u8,
    /// RIP pushed by the CPU (the instruction after the trap).
    pub rip: u64,
    /// R12 at the trap.
    pub r12: u64,
}

/// Arms one expected trap: the next #BP is reported and resumed instead of ending the run.
/// Nothing else can be armed: returning from a fault (and from an instruction-breakpoint #DB,
/// which is fault-class) would re-run the faulting instruction.
pub fn expect_trap(vector: u8) -> bool {
    if vector != BREAKPOINT {
        return false;
    }
    LAST_TRAP[0].store(0, Ordering::Relaxed);
    EXPECTED_TRAP.store(vector + 1, Ordering::SeqCst);
    true
}

/// The last expected trap taken, if any.
pub fn last_trap() -> Option<TrapRecord> {
    let v = LAST_TRAP[0].load(Ordering::SeqCst);
    (v != 0).then(|| TrapRecord {
        vector: (v - 1) as u8,
        rip: LAST_TRAP[1].load(Ordering::SeqCst),
        r12: LAST_TRAP[2].load(Ordering::SeqCst),
    })
}

/// Deliberate exceptions for the `exception_report` scenario.
pub mod test_support {
    /// Executes `int3` with `r12 = marker`; returns the address right after the `int3` (the
    /// RIP the CPU pushes for this trap). Arm it first with `expect_trap(BREAKPOINT)`, or the
    /// breakpoint ends the run.
    pub fn breakpoint_with_marker(marker: u64) -> u64 {
        let rip_after: u64;
        // SAFETY:
        // 1. `int3` traps to the #BP gate; with the trap armed, the handler reports and returns
        //    to the next instruction with every register restored (it only reads the frame).
        // 2. r12 is declared clobbered; `rip_after` is computed by `lea` from a local label.
        unsafe {
            core::arch::asm!(
                "mov r12, {marker}",
                "lea {rip}, [rip + 2f]",
                "int3",
                "2:",
                marker = in(reg) marker,
                rip = out(reg) rip_after,
                out("r12") _,
            );
        }
        rip_after
    }

    /// Writes to `addr`, which must be unmapped, after recording the address of the faulting
    /// instruction as the expected fatal RIP (the report says whether it matches). The #PF ends the run; this never returns.
    pub fn fatal_write(addr: u64) -> ! {
        let slot = super::EXPECTED_FATAL_RIP.as_ptr();
        // SAFETY:
        // 1. `slot` is the storage of a static AtomicU64 (8-aligned, valid for the whole run);
        //    a plain aligned 8-byte store to it is atomic on x86-64 and nothing else writes it
        //    concurrently.
        // 2. The store to `addr` faults (the caller checked it is unmapped); the #PF handler
        //    reports and ends the run, so execution never continues past it. Should it ever
        //    not fault, the loop below still never returns.
        unsafe {
            core::arch::asm!(
                "lea {tmp}, [rip + 3f]",
                "mov qword ptr [{slot}], {tmp}",
                "3:",
                "mov qword ptr [{addr}], {tmp}",
                slot = in(reg) slot,
                addr = in(reg) addr,
                tmp = out(reg) _,
            );
        }
        crate::exit::halt_forever()
    }
}

pub(super) fn handle(vector: u8, frame: &mut Frame) {
    if vector == NMI && crate::exit::stopping() {
        // Another CPU is ending the run: stop here without touching locks or the log.
        crate::exit::halt_forever();
    }
    let expected = EXPECTED_TRAP.load(Ordering::SeqCst);
    if expected != 0 && expected == vector + 1 {
        EXPECTED_TRAP.store(0, Ordering::SeqCst);
        report(vector, frame, Disposition::Resumed);
        LAST_TRAP[1].store(frame.rip, Ordering::SeqCst);
        LAST_TRAP[2].store(frame.r12, Ordering::SeqCst);
        LAST_TRAP[0].store(u64::from(vector) + 1, Ordering::SeqCst);
        return;
    }
    report(vector, frame, Disposition::Fatal);
    crate::exit::exit(crate::exit::Verdict::Failure);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Disposition {
    Fatal,
    Resumed,
}

fn report(vector: u8, f: &Frame, disposition: Disposition) {
    let cpu = super::percpu::this_cpu().index();
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    let name = NAMES[usize::from(vector & 31)];
    let what =
        if disposition == Disposition::Fatal { "EXCEPTION" } else { "exception (expected by the scenario, resuming)" };
    crate::console::emergency(format_args!(
        "\n{what} on cpu {cpu}: {name} (vector {vector}) error=0x{:x}\n\
         \x20 rip=0x{:016x} cs=0x{:x} rflags=0x{:x} rsp=0x{:016x} ss=0x{:x} cr2=0x{:016x}\n\
         \x20 rax=0x{:016x} rbx=0x{:016x} rcx=0x{:016x} rdx=0x{:016x}\n\
         \x20 rsi=0x{:016x} rdi=0x{:016x} rbp=0x{:016x} r8=0x{:016x}\n\
         \x20 r9=0x{:016x} r10=0x{:016x} r11=0x{:016x} r12=0x{:016x}\n\
         \x20 r13=0x{:016x} r14=0x{:016x} r15=0x{:016x}\n",
        f.error_code,
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        f.ss,
        cr2,
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp,
        f.r8,
        f.r9,
        f.r10,
        f.r11,
        f.r12,
        f.r13,
        f.r14,
        f.r15,
    ));
    if disposition == Disposition::Fatal {
        let expected = EXPECTED_FATAL_RIP.load(Ordering::SeqCst);
        if expected != 0 {
            let verdict = if expected == f.rip { "matches" } else { "does NOT match" };
            crate::console::emergency(format_args!(
                "  faulting rip {verdict} the scenario's expected rip 0x{expected:016x}\n"
            ));
        }
        if let Some((owner, stack)) = super::stacks::guard_owner(cr2).filter(|_| vector == 14) {
            crate::console::emergency(format_args!(
                "  stack overflow: cr2 is in the guard page below {stack} of cpu {owner}\n"
            ));
        }
        backtrace(f.rbp);
    }
    defmt::error!(
        "{=str} on cpu {=usize}: {=str} (vector {=u8}) error={=u64:#x} rip={=u64:#x} cr2={=u64:#x} rsp={=u64:#x}",
        what,
        cpu,
        name,
        vector,
        f.error_code,
        f.rip,
        cr2,
        f.rsp
    );
}

/// Follows the frame-pointer chain (the image is built with frame pointers) for a few frames,
/// reading only addresses inside the hypervisor's mapped data.
fn backtrace(mut rbp: u64) {
    crate::console::emergency(format_args!("  call chain:"));
    for _ in 0..16 {
        if rbp == 0 || !rbp.is_multiple_of(8) || !super::paging::is_mapped_data(rbp, 16) {
            break;
        }
        let words = super::paging::read_u64_pair(rbp);
        let Some((next, ret)) = words else { break };
        crate::console::emergency(format_args!(" 0x{ret:x}"));
        if next <= rbp {
            break;
        }
        rbp = next;
    }
    crate::console::emergency(format_args!("\n"));
}
