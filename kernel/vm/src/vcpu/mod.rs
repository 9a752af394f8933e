//! One vCPU's exit handling and interrupt injection, over a narrow [`Env`] the kernel
//! implements (guest memory, time, console, supervisor words, device regions) and host tests
//! fake. Nothing here trusts the guest: every value it controls is checked, and anything the
//! hypervisor cannot or will not do stops this vCPU with a [`Stop`] reason instead of
//! failing the hypervisor.
//!
//! Interrupts: the IRR is the shared [`PendingVectors`]; before each VMRUN
//! [`Vcpu::prepare_entry`] injects the highest deliverable vector through EVENTINJ when the
//! guest can take it (IF set, no interrupt shadow), moving it to the ISR, so delivery is
//! exact; otherwise it asks for an interrupt window (a dummy V_IRQ with the VINTR intercept)
//! or, when only the task priority blocks it, intercepts CR8 writes. An event whose delivery
//! an exit interrupted (EXITINTINFO) is re-injected first.

use crate::cpuid::{self, CpuidResult};
use crate::mmio::{Handler, Regions};
use crate::msr::{self, MsrOutcome, MsrState};
use crate::pending::PendingVectors;
use crate::vlapic::{VLapic, WriteEffect};
use crate::vmcb::{self, Event, EventKind, Misc1, Vmcb, exit, int_ctl};
use crate::walk::{self, GuestRead, WalkError};
use conduit_abi::{ABI_VERSION, CONSOLE_MAX, DEBUG_CONSOLE_PORT, error, hypercall, layout};
use conduit_decode::{DecodeError, Gpr, Registers};

/// The guest's general registers that VMRUN does not keep in the VMCB (RAX and RSP live
/// there). Layout fixed: the VMRUN stub saves and loads them by offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gprs {
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RBP.
    pub rbp: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
}

/// Byte offset of each register in [`Gprs`], for the VMRUN stub.
pub mod gpr_offset {
    /// RBX.
    pub const RBX: usize = 0;
    /// RCX.
    pub const RCX: usize = 8;
    /// RDX.
    pub const RDX: usize = 16;
    /// RSI.
    pub const RSI: usize = 24;
    /// RDI.
    pub const RDI: usize = 32;
    /// RBP.
    pub const RBP: usize = 40;
    /// R8.
    pub const R8: usize = 48;
    /// R9.
    pub const R9: usize = 56;
    /// R10.
    pub const R10: usize = 64;
    /// R11.
    pub const R11: usize = 72;
    /// R12.
    pub const R12: usize = 80;
    /// R13.
    pub const R13: usize = 88;
    /// R14.
    pub const R14: usize = 96;
    /// R15.
    pub const R15: usize = 104;
}
const _: () = assert!(core::mem::offset_of!(Gprs, rbx) == gpr_offset::RBX);
const _: () = assert!(core::mem::offset_of!(Gprs, rdi) == gpr_offset::RDI);
const _: () = assert!(core::mem::offset_of!(Gprs, r8) == gpr_offset::R8);
const _: () = assert!(core::mem::offset_of!(Gprs, r15) == gpr_offset::R15);

/// The guest's registers as the decoder sees them: RAX and RSP from the VMCB, the rest saved.
struct GuestRegs<'a> {
    gprs: &'a mut Gprs,
    vmcb: &'a mut Vmcb,
}

impl Registers for GuestRegs<'_> {
    fn get(&self, r: Gpr) -> u64 {
        let g = &self.gprs;
        match r {
            Gpr::Rax => self.vmcb.save.rax,
            Gpr::Rcx => g.rcx,
            Gpr::Rdx => g.rdx,
            Gpr::Rbx => g.rbx,
            Gpr::Rsp => self.vmcb.save.rsp,
            Gpr::Rbp => g.rbp,
            Gpr::Rsi => g.rsi,
            Gpr::Rdi => g.rdi,
            Gpr::R8 => g.r8,
            Gpr::R9 => g.r9,
            Gpr::R10 => g.r10,
            Gpr::R11 => g.r11,
            Gpr::R12 => g.r12,
            Gpr::R13 => g.r13,
            Gpr::R14 => g.r14,
            Gpr::R15 => g.r15,
        }
    }

    fn set(&mut self, r: Gpr, value: u64) {
        let g = &mut self.gprs;
        let slot = match r {
            Gpr::Rax => &mut self.vmcb.save.rax,
            Gpr::Rcx => &mut g.rcx,
            Gpr::Rdx => &mut g.rdx,
            Gpr::Rbx => &mut g.rbx,
            Gpr::Rsp => &mut self.vmcb.save.rsp,
            Gpr::Rbp => &mut g.rbp,
            Gpr::Rsi => &mut g.rsi,
            Gpr::Rdi => &mut g.rdi,
            Gpr::R8 => &mut g.r8,
            Gpr::R9 => &mut g.r9,
            Gpr::R10 => &mut g.r10,
            Gpr::R11 => &mut g.r11,
            Gpr::R12 => &mut g.r12,
            Gpr::R13 => &mut g.r13,
            Gpr::R14 => &mut g.r14,
            Gpr::R15 => &mut g.r15,
        };
        *slot = value;
    }
}

/// What the kernel provides to exit handling.
pub trait Env {
    /// Fills `buf` from guest-physical `gpa`; false when any byte is outside guest RAM.
    fn read_guest(&mut self, gpa: u64, buf: &mut [u8]) -> bool;
    /// The little-endian u64 at 8-aligned guest-physical `gpa`; `None` outside guest RAM (or
    /// misaligned). The page walk of every MMIO exit reads its entries through this.
    fn read_guest_u64(&mut self, gpa: u64) -> Option<u64> {
        let mut raw = [0u8; 8];
        (gpa.is_multiple_of(8) && self.read_guest(gpa, &mut raw)).then(|| u64::from_le_bytes(raw))
    }
    /// The TSC now.
    fn tsc(&self) -> u64;
    /// Microseconds since the hypervisor booted.
    fn uptime_us(&self) -> u64;
    /// The host's CPUID answer.
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult;
    /// One complete console line of the guest (printable ASCII only; no newline).
    fn console_line(&mut self, line: &[u8]);
    /// The guest published `value` in its signal word.
    fn signal(&mut self, value: u64);
    /// The word the supervisor posted for this vCPU.
    fn mailbox(&mut self) -> u64;
    /// Reads `size` bytes at `offset` of device region `id`; `None` if nothing answers.
    fn mmio_read(&mut self, id: u16, offset: u64, size: u8) -> Option<u64> {
        let _ = (id, offset, size);
        None
    }
    /// Writes `size` bytes at `offset` of device region `id`; false if nothing took it.
    fn mmio_write(&mut self, id: u16, offset: u64, size: u8, value: u64) -> bool {
        let _ = (id, offset, size, value);
        false
    }
    /// The doorbell fast path: a `size`-byte guest write of `value` at `offset` of device region
    /// `id`, offered before the generic path; true when a registered doorbell took it (the
    /// write is then complete). Lock-free and allocation-free in the kernel.
    fn doorbell(&mut self, id: u16, offset: u64, size: u8, value: u64) -> bool {
        let _ = (id, offset, size, value);
        false
    }
    /// A hypercall the vCPU does not handle itself (device functions: `IRQ_INFO`, `SET_IRQS`,
    /// `IRQ_STATS`...), with its six arguments; `None`: unknown (`ENOSYS`).
    fn hypercall(&mut self, nr: u64, args: [u64; 6]) -> Option<i64> {
        let _ = (nr, args);
        None
    }
    /// An I/O port read other than the built-in ones; `None` reads as all ones.
    fn port_in(&mut self, port: u16, size: u8) -> Option<u32> {
        let _ = (port, size);
        None
    }
    /// An I/O port write other than the built-in ones; false when nothing took it (dropped).
    fn port_out(&mut self, port: u16, size: u8, value: u32) -> bool {
        let _ = (port, size, value);
        false
    }
}

struct Mem<'a, E: Env>(&'a mut E);

impl<E: Env> GuestRead for Mem<'_, E> {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> bool {
        self.0.read_guest(gpa, buf)
    }
    fn read_u64(&mut self, gpa: u64) -> Option<u64> {
        self.0.read_guest_u64(gpa)
    }
}

/// Kinds of guest memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Access {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Fetch,
}

/// Why a vCPU stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Stop {
    /// The guest called `EXIT` with this value.
    Exited(u64),
    /// The supervisor stopped it (partition stop, shutdown).
    Requested,
    /// Triple fault (SHUTDOWN intercept).
    TripleFault {
        /// RIP at the shutdown.
        rip: u64,
    },
    /// An access to guest-physical memory that is neither the guest's RAM nor an emulated
    /// region.
    MemoryViolation {
        /// The guest-physical address.
        gpa: u64,
        /// What kind of access.
        access: Access,
        /// RIP of the access.
        rip: u64,
    },
    /// An access to an emulated region by an instruction the decoder does not handle.
    UnsupportedInstruction {
        /// The guest-physical address accessed.
        gpa: u64,
        /// RIP.
        rip: u64,
        /// The decoder's verdict.
        error: DecodeError,
    },
    /// The instruction at RIP does not do what the fault says (a load where the guest wrote,
    /// or the reverse): its bytes changed between the fault and the fetch.
    InstructionMismatch {
        /// The guest-physical address accessed.
        gpa: u64,
        /// RIP.
        rip: u64,
    },
    /// The instruction at RIP could not be read (its page is not mapped, or the guest is in a
    /// paging mode the hypervisor does not walk).
    InstructionFetch {
        /// RIP.
        rip: u64,
        /// Why.
        error: WalkError,
    },
    /// A local APIC access that is not an aligned 32-bit register access.
    ApicAccess {
        /// Offset in the APIC page.
        offset: u32,
        /// Access width.
        size: u8,
    },
    /// String or REP I/O (not emulated).
    StringIo {
        /// Port.
        port: u16,
    },
    /// HLT with interrupts disabled: nothing can ever wake the vCPU.
    HaltedForever {
        /// RIP after the HLT.
        rip: u64,
    },
    /// VMRUN refused the guest state.
    InvalidState,
    /// An exit the hypervisor does not expect.
    UnexpectedExit {
        /// Exit code.
        code: u64,
        /// EXITINFO1.
        info1: u64,
        /// EXITINFO2.
        info2: u64,
    },
}

impl Stop {
    /// Whether the guest broke a rule (as opposed to exiting or being stopped).
    pub fn is_violation(&self) -> bool {
        !matches!(self, Self::Exited(_) | Self::Requested)
    }
}

impl core::fmt::Display for Access {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Fetch => "instruction fetch",
        })
    }
}

impl core::fmt::Display for Stop {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::Exited(v) => write!(f, "exited with {v:#x}"),
            Self::Requested => f.write_str("stopped by the supervisor"),
            Self::TripleFault { rip } => write!(f, "triple fault at rip {rip:#x}"),
            Self::MemoryViolation { gpa, access, rip } => {
                write!(f, "{access} of guest-physical {gpa:#x} outside its memory at rip {rip:#x}")
            }
            Self::UnsupportedInstruction { gpa, rip, error } => {
                write!(f, "access to emulated {gpa:#x} by an instruction not emulated ({error}) at rip {rip:#x}")
            }
            Self::InstructionMismatch { gpa, rip } => {
                write!(f, "instruction at rip {rip:#x} changed under its fault at {gpa:#x}")
            }
            Self::InstructionFetch { rip, error } => write!(f, "instruction at rip {rip:#x} unreadable ({error:?})"),
            Self::ApicAccess { offset, size } => {
                write!(f, "local APIC access of {size} bytes at offset {offset:#x} (only aligned 32-bit)")
            }
            Self::StringIo { port } => write!(f, "string I/O on port {port:#x} (not emulated)"),
            Self::HaltedForever { rip } => write!(f, "HLT with interrupts disabled at rip {rip:#x}"),
            Self::InvalidState => f.write_str("VMRUN refused the guest state"),
            Self::UnexpectedExit { code, info1, info2 } => {
                write!(f, "unexpected exit {code:#x} (info {info1:#x}, {info2:#x})")
            }
        }
    }
}

/// What the kernel does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Action {
    /// Enter the guest again.
    Resume,
    /// Block until [`Vcpu::wake_ready`] (or a stop request), then resume.
    Halt,
    /// This vCPU is done.
    Stop(Stop),
}

/// Exit and injection counters of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Stats {
    /// All exits.
    pub exits: u64,
    /// Physical interrupts (INTR) and NMIs.
    pub host_interrupts: u64,
    /// I/O instructions.
    pub io: u64,
    /// RDMSR/WRMSR.
    pub msr: u64,
    /// CPUID.
    pub cpuid: u64,
    /// Hypercalls.
    pub hypercalls: u64,
    /// Emulated MMIO accesses (local APIC and device regions).
    pub mmio: u64,
    /// Of those, guest writes a registered doorbell took on the fast path.
    pub doorbells: u64,
    /// HLT.
    pub hlt: u64,
    /// Interrupt-window exits.
    pub windows: u64,
    /// CR8 writes intercepted.
    pub cr8: u64,
    /// Exceptions intercepted and re-injected.
    pub exceptions: u64,
    /// Vectors injected (moved from IRR to ISR).
    pub injected: u64,
    /// Vectors the virtual local APIC timer raised.
    pub timer_interrupts: u64,
    /// Events re-injected from EXITINTINFO.
    pub reinjected: u64,
    /// #GP injected for a refused MSR access.
    pub msr_faults: u64,
    /// #UD injected for an instruction guests do not get (SVM, MONITOR, RDTSCP...).
    pub undefined: u64,
    /// I/O writes nothing took, and reads answered with all ones.
    pub unclaimed_io: u64,
    /// Hypercalls that returned an error.
    pub hypercall_errors: u64,
    /// Local APIC ICR writes not carried out (IPIs to other CPUs, INIT...).
    pub refused_ipis: u64,
}

const CONSOLE_LINE: usize = 120;

/// One vCPU's private state (owned by the CPU running it).
#[derive(Debug)]
pub struct Vcpu {
    /// Saved general registers.
    pub gprs: Gprs,
    /// Virtual local APIC (the IRR is shared, outside).
    pub lapic: VLapic,
    /// MSR state outside the VMCB.
    pub msrs: MsrState,
    /// Counters.
    pub stats: Stats,
    /// Emulated regions (the local APIC, and device regions registered for this vCPU).
    pub regions: Regions,
    console: heapless::Vec<u8, CONSOLE_LINE>,
    /// The last MMIO instruction emulated (see `cached_instruction`).
    mmio_cache: Option<CachedInstruction>,
}

/// An emulated MMIO instruction kept for the next exit at the same place: drivers ring
/// doorbells and poll registers from the same few instructions, so the page walk and the
/// decode are done once. Reused only when CR3 and RIP are the same and the instruction's bytes
/// at the remembered guest-physical address are still the same bytes (re-read each time). A
/// guest that remaps its code page under the same CR3 (even after INVLPG or reloading CR3 with
/// the same value), or changes its code segment or paging mode at the same RIP and CR3, gets
/// the instruction it had before: an emulation the guest brought on itself and that only
/// touches its own registers and devices. Guest memory is only read, within the guest's RAM.
#[derive(Clone, Copy, Debug)]
struct CachedInstruction {
    cr3: u64,
    rip: u64,
    /// The 8-aligned guest-physical words covering the instruction: the first one's address,
    /// and for each (mask of the instruction's bytes in it, their expected value).
    first_word: u64,
    words: [(u64, u64); 3],
    insn: conduit_decode::Instruction,
}

const IOIO_IN: u64 = 1 << 0;
const IOIO_STRING: u64 = 1 << 2;
const IOIO_REP: u64 = 1 << 3;
const NPF_FETCH: u64 = 1 << 4;
const NPF_WRITE: u64 = 1 << 1;
/// The nested fault happened while the CPU walked the guest's page tables.
const NPF_PAGE_TABLE_WALK: u64 = 1 << 33;
const RFLAGS_IF: u64 = 1 << 9;
const INTERRUPT_SHADOW: u64 = 1;
const VECTOR_UD: u8 = 6;
const VECTOR_GP: u8 = 13;
const VECTOR_DB: u8 = 1;
const VECTOR_BP: u8 = 3;
const VECTOR_OF: u8 = 4;
const VECTOR_AC: u8 = 17;
/// Ports every guest may write harmlessly (POST codes).
const POST_PORT: u16 = 0x80;

impl Vcpu {
    /// A vCPU at reset with APIC ID `apic_id`; `bsp` for the partition's first vCPU. The
    /// caller sets RDI to the boot-info block.
    pub fn new(apic_id: u8, bsp: bool, boot_info_gpa: u64) -> Self {
        let mut regions = Regions::new();
        // Cannot fail: the map is empty.
        let _ = regions.insert(layout::LOCAL_APIC, 0x1000, Handler::LocalApic);
        Self {
            gprs: Gprs { rdi: boot_info_gpa, ..Default::default() },
            lapic: VLapic::new(apic_id),
            msrs: MsrState { bsp, ..Default::default() },
            stats: Stats::default(),
            regions,
            console: heapless::Vec::new(),
            mmio_cache: None,
        }
    }

    /// Whether a halted vCPU should run again: a deliverable interrupt is pending or its timer
    /// is due (which raises the timer vector).
    pub fn wake_ready(&mut self, pending: &PendingVectors, now_tsc: u64) -> bool {
        self.poll_timer(pending, now_tsc);
        self.lapic.deliverable(pending).is_some()
    }

    fn poll_timer(&mut self, pending: &PendingVectors, now_tsc: u64) {
        if self.lapic.poll_timer(now_tsc, pending).is_some() {
            self.stats.timer_interrupts += 1;
        }
    }

    /// Sets up interrupt delivery for the next VMRUN. Call with host interrupts disabled, so a
    /// vector raised after this look is either seen here or arrives as a kick that makes the
    /// VMRUN exit at once.
    pub fn prepare_entry(&mut self, vmcb: &mut Vmcb, pending: &PendingVectors, now_tsc: u64) {
        self.poll_timer(pending, now_tsc);
        let c = &mut vmcb.control;
        c.int_ctl = int_ctl::V_INTR_MASKING | u64::from(self.lapic.tpr() >> 4);
        c.intercept_misc1 &= !Misc1::VINTR.bits();
        c.intercept_cr &= !crate::guest::INTERCEPT_CR8_WRITE;
        let window = |c: &mut vmcb::ControlArea| {
            c.int_ctl |= int_ctl::V_IRQ | int_ctl::V_IGN_TPR | 0xf << int_ctl::V_INTR_PRIO_SHIFT;
            c.intercept_misc1 |= Misc1::VINTR.bits();
        };
        // One look at the pending set (nothing pending, the common case on the MMIO and
        // doorbell exits, ends here).
        let Some(highest) = pending.highest() else { return };
        let queued = c.event_inj & vmcb::EVENT_VALID != 0;
        if let Some(v) = self.lapic.deliverable_of(highest) {
            // An event already queued (a re-injection or an exception) goes first; the vector
            // follows as soon as the guest can take it.
            let open = !queued && vmcb.save.rflags & RFLAGS_IF != 0 && c.int_state & INTERRUPT_SHADOW == 0;
            if open {
                if self.lapic.accept(v, pending) {
                    c.event_inj = Event { vector: v, kind: EventKind::Interrupt, error_code: None }.encode();
                    self.stats.injected += 1;
                }
            } else {
                window(c);
            }
        } else if self.lapic.blocked_by_tpr_of(highest).is_some() {
            c.intercept_cr |= crate::guest::INTERCEPT_CR8_WRITE;
        }
    }

    /// Handles the exit recorded in `vmcb`.
    pub fn handle_exit(&mut self, vmcb: &mut Vmcb, pending: &PendingVectors, env: &mut impl Env) -> Action {
        self.stats.exits += 1;
        let c = &mut vmcb.control;
        // The guest may have changed its task priority through CR8.
        let v_tpr = (c.int_ctl & int_ctl::V_TPR_MASK) as u8 & 0xf;
        if v_tpr != self.lapic.tpr() >> 4 {
            self.lapic.set_tpr(v_tpr << 4);
        }
        c.int_ctl &= !(int_ctl::V_IRQ | int_ctl::V_IGN_TPR | 0xf << int_ctl::V_INTR_PRIO_SHIFT);
        c.event_inj = 0;
        // The forwarding fast path: a physical interrupt (a device's, for this vCPU) with no
        // event in flight needs nothing more; injection happens in `prepare_entry`.
        if c.exit_code == exit::INTR && c.exit_int_info & vmcb::EVENT_VALID == 0 {
            self.stats.host_interrupts += 1;
            return Action::Resume;
        }
        if let Some(e) = Event::decode(c.exit_int_info) {
            // Without next-RIP saving, software interrupts (INTn, INT3, INTO) are not
            // re-injected: RIP still points at the instruction, which runs again.
            let soft = e.kind == EventKind::Software
                || (e.kind == EventKind::Exception && matches!(e.vector, VECTOR_BP | VECTOR_OF));
            if !soft {
                c.event_inj = e.encode();
                self.stats.reinjected += 1;
            }
        }
        let (code, info1, info2) = (c.exit_code, c.exit_info1, c.exit_info2);
        match code {
            exit::INTR | exit::NMI => {
                self.stats.host_interrupts += 1;
                Action::Resume
            }
            exit::VINTR => {
                self.stats.windows += 1;
                Action::Resume
            }
            exit::IOIO => self.io(vmcb, info1, info2, env),
            exit::MSR => self.msr(vmcb, info1, env),
            exit::CPUID => self.cpuid(vmcb, env),
            exit::VMMCALL => self.hypercall(vmcb, env),
            exit::HLT => {
                self.stats.hlt += 1;
                self.skip(vmcb, 1);
                if vmcb.save.rflags & RFLAGS_IF == 0 {
                    Action::Stop(Stop::HaltedForever { rip: vmcb.save.rip })
                } else {
                    Action::Halt
                }
            }
            exit::NPF => self.npf(vmcb, info1, info2, pending, env),
            exit::WRITE_CR8 => self.write_cr8(vmcb, env),
            exit::SHUTDOWN => Action::Stop(Stop::TripleFault { rip: vmcb.save.rip }),
            exit::INVD => {
                // INVD would drop dirty cache lines of the host and other guests: the guest's
                // is a no-op (its own data is coherent anyway).
                self.stats.undefined += 1;
                self.skip(vmcb, 2);
                Action::Resume
            }
            c if c == exit::EXCEPTION_BASE + u64::from(VECTOR_AC) => {
                self.stats.exceptions += 1;
                self.inject(vmcb, VECTOR_AC, Some(info1 as u32));
                Action::Resume
            }
            c if c == exit::EXCEPTION_BASE + u64::from(VECTOR_DB) => {
                self.stats.exceptions += 1;
                self.inject(vmcb, VECTOR_DB, None);
                Action::Resume
            }
            exit::VMRUN
            | exit::VMLOAD
            | exit::VMSAVE
            | exit::STGI
            | exit::CLGI
            | exit::SKINIT
            | exit::INVLPGA
            | exit::RDTSCP
            | exit::MONITOR
            | exit::MWAIT
            | exit::XSETBV => {
                self.stats.undefined += 1;
                self.inject(vmcb, VECTOR_UD, None);
                Action::Resume
            }
            exit::INVALID => Action::Stop(Stop::InvalidState),
            _ => Action::Stop(Stop::UnexpectedExit { code, info1, info2 }),
        }
    }

    /// Queues an exception unless an interrupted event is being re-injected (then the
    /// instruction, whose RIP was not advanced, runs again later and faults again).
    fn inject(&mut self, vmcb: &mut Vmcb, vector: u8, error_code: Option<u32>) {
        if vmcb.control.event_inj & vmcb::EVENT_VALID == 0 {
            vmcb.control.event_inj = Event { vector, kind: EventKind::Exception, error_code }.encode();
        }
    }

    /// Completes an emulated instruction of `len` bytes: RIP moves on and the interrupt
    /// shadow (of an STI or MOV SS before it) ends.
    fn skip(&mut self, vmcb: &mut Vmcb, len: u64) {
        vmcb.save.rip = vmcb.save.rip.wrapping_add(len);
        vmcb.control.int_state &= !INTERRUPT_SHADOW;
    }

    fn console_byte(&mut self, b: u8, env: &mut impl Env) {
        if b == b'\n' {
            env.console_line(&self.console);
            self.console.clear();
            return;
        }
        let b = if b == b'\t' || (0x20..0x7f).contains(&b) { b } else { b'?' };
        if b == b'\r' {
            return;
        }
        if self.console.push(b).is_err() {
            env.console_line(&self.console);
            self.console.clear();
            let _ = self.console.push(b);
        }
    }

    /// Prints what is left in the console line buffer (at stop).
    pub fn flush_console(&mut self, env: &mut impl Env) {
        if !self.console.is_empty() {
            env.console_line(&self.console);
            self.console.clear();
        }
    }

    fn io(&mut self, vmcb: &mut Vmcb, info1: u64, next_rip: u64, env: &mut impl Env) -> Action {
        self.stats.io += 1;
        let port = (info1 >> 16) as u16;
        if info1 & (IOIO_STRING | IOIO_REP) != 0 {
            return Action::Stop(Stop::StringIo { port });
        }
        let size: u8 = match (info1 >> 4) & 7 {
            1 => 1,
            2 => 2,
            _ => 4,
        };
        let mask = if size == 4 { u32::MAX } else { (1u32 << (size * 8)) - 1 };
        if info1 & IOIO_IN != 0 {
            let value = env.port_in(port, size).unwrap_or_else(|| {
                self.stats.unclaimed_io += 1;
                u32::MAX
            }) & mask;
            let rax = &mut vmcb.save.rax;
            *rax = match size {
                4 => u64::from(value),
                _ => (*rax & !u64::from(mask)) | u64::from(value),
            };
        } else {
            let value = vmcb.save.rax as u32 & mask;
            match port {
                DEBUG_CONSOLE_PORT => {
                    for b in value.to_le_bytes().into_iter().take(usize::from(size)) {
                        self.console_byte(b, env);
                    }
                }
                POST_PORT => {}
                _ => {
                    if !env.port_out(port, size, value) {
                        self.stats.unclaimed_io += 1;
                    }
                }
            }
        }
        // IOIO's EXITINFO2 is the next RIP (with or without NRIPS).
        vmcb.save.rip = next_rip;
        vmcb.control.int_state &= !INTERRUPT_SHADOW;
        Action::Resume
    }

    fn msr(&mut self, vmcb: &mut Vmcb, info1: u64, env: &mut impl Env) -> Action {
        self.stats.msr += 1;
        let index = self.gprs.rcx as u32;
        let outcome = if info1 & 1 == 0 {
            let r = msr::read(index, &vmcb.save, &self.msrs, env.tsc());
            if let MsrOutcome::Done(v) = r {
                vmcb.save.rax = v & 0xffff_ffff;
                self.gprs.rdx = v >> 32;
            }
            r
        } else {
            let value = (self.gprs.rdx << 32) | (vmcb.save.rax & 0xffff_ffff);
            msr::write(index, value, &mut vmcb.save, &mut self.msrs)
        };
        match outcome {
            MsrOutcome::Done(_) => self.skip(vmcb, 2),
            MsrOutcome::GeneralProtection => {
                self.stats.msr_faults += 1;
                self.inject(vmcb, VECTOR_GP, Some(0));
            }
        }
        Action::Resume
    }

    fn cpuid(&mut self, vmcb: &mut Vmcb, env: &mut impl Env) -> Action {
        self.stats.cpuid += 1;
        let leaf = vmcb.save.rax as u32;
        let subleaf = self.gprs.rcx as u32;
        let r = cpuid::filter(leaf, subleaf, env.host_cpuid(leaf, subleaf), self.lapic.id(), ABI_VERSION);
        vmcb.save.rax = u64::from(r.eax);
        self.gprs.rbx = u64::from(r.ebx);
        self.gprs.rcx = u64::from(r.ecx);
        self.gprs.rdx = u64::from(r.edx);
        self.skip(vmcb, 2);
        Action::Resume
    }

    fn hypercall(&mut self, vmcb: &mut Vmcb, env: &mut impl Env) -> Action {
        self.stats.hypercalls += 1;
        self.skip(vmcb, 3);
        let nr = vmcb.save.rax;
        let (a0, a1) = (self.gprs.rdi, self.gprs.rsi);
        let result: i64 = if vmcb.save.cpl != 0 {
            error::EPERM
        } else {
            match nr {
                hypercall::VERSION => ABI_VERSION as i64,
                hypercall::CONSOLE_WRITE => self.console_write(a0, a1, env),
                hypercall::EXIT => {
                    self.flush_console(env);
                    return Action::Stop(Stop::Exited(a0));
                }
                hypercall::SIGNAL => {
                    env.signal(a0);
                    0
                }
                hypercall::UPTIME_US => env.uptime_us() as i64,
                hypercall::MAILBOX => env.mailbox() as i64,
                hypercall::AUTO_EOI => match (u8::try_from(a0), a1) {
                    (Ok(vector), 0 | 1) if self.lapic.set_auto_eoi(vector, a1 == 1) => 0,
                    _ => error::EINVAL,
                },
                _ => {
                    let g = &self.gprs;
                    env.hypercall(nr, [g.rdi, g.rsi, g.rdx, g.r10, g.r8, g.r9]).unwrap_or(error::ENOSYS)
                }
            }
        };
        if result < 0 {
            self.stats.hypercall_errors += 1;
        }
        vmcb.save.rax = result as u64;
        Action::Resume
    }

    fn console_write(&mut self, gpa: u64, len: u64, env: &mut impl Env) -> i64 {
        if len > CONSOLE_MAX {
            return error::EINVAL;
        }
        let mut buf = [0u8; CONSOLE_MAX as usize];
        let Some(buf) = buf.get_mut(..len as usize) else { return error::EINVAL };
        if !env.read_guest(gpa, buf) {
            return error::EFAULT;
        }
        for &b in buf.iter() {
            self.console_byte(b, env);
        }
        len as i64
    }

    fn npf(&mut self, vmcb: &mut Vmcb, info1: u64, gpa: u64, pending: &PendingVectors, env: &mut impl Env) -> Action {
        let access = if info1 & NPF_FETCH != 0 {
            Access::Fetch
        } else if info1 & NPF_WRITE != 0 {
            Access::Write
        } else {
            Access::Read
        };
        let rip = vmcb.save.rip;
        let Some((region, offset)) = self.regions.find(gpa) else {
            return Action::Stop(Stop::MemoryViolation { gpa, access, rip });
        };
        // Only a data access by the instruction at RIP is emulated: not a fetch, not the
        // guest's own page-table walk, not an access made while delivering an event (IDT,
        // stack) — those would make the hypervisor emulate the wrong instruction.
        let walk = info1 & NPF_PAGE_TABLE_WALK != 0;
        let delivering = vmcb.control.exit_int_info & vmcb::EVENT_VALID != 0;
        if access == Access::Fetch || walk || delivering {
            return Action::Stop(Stop::MemoryViolation { gpa, access, rip });
        }
        self.stats.mmio += 1;
        let insn = match self.cached_instruction(&vmcb.save, env) {
            Some(insn) => insn,
            None => {
                let (bytes, n) = match walk::fetch(&vmcb.save, &mut Mem(env)) {
                    Ok(f) => f,
                    Err(error) => return Action::Stop(Stop::InstructionFetch { rip, error }),
                };
                let insn = match conduit_decode::decode(&bytes[..n]) {
                    Ok(i) => i,
                    Err(error) => return Action::Stop(Stop::UnsupportedInstruction { gpa, rip, error }),
                };
                self.remember_instruction(&vmcb.save, bytes, insn, env);
                insn
            }
        };
        // The bytes were read after the fault: another vCPU may have rewritten them. An
        // instruction whose direction disagrees with the fault is not emulated.
        if insn.is_store() != (access == Access::Write) {
            return Action::Stop(Stop::InstructionMismatch { gpa, rip });
        }
        let size = insn.size.bytes();
        let mut regs = GuestRegs { gprs: &mut self.gprs, vmcb };
        match region.handler {
            Handler::LocalApic => {
                let offset = offset as u32;
                if size != 4 || offset & 0xf != 0 {
                    return Action::Stop(Stop::ApicAccess { offset, size });
                }
                let now = env.tsc();
                match insn.store_value(&regs) {
                    Some(value) => {
                        if let WriteEffect::UnsupportedIpi(_) = self.lapic.write(offset, value as u32, pending, now) {
                            self.stats.refused_ipis += 1;
                        }
                    }
                    None => insn.complete_load(&mut regs, u64::from(self.lapic.read(offset, pending, now))),
                }
            }
            Handler::Device(id) => match insn.store_value(&regs) {
                Some(value) => {
                    if env.doorbell(id, offset, size, value) {
                        self.stats.doorbells += 1;
                    } else if !env.mmio_write(id, offset, size, value) {
                        return Action::Stop(Stop::MemoryViolation { gpa, access, rip });
                    }
                }
                None => match env.mmio_read(id, offset, size) {
                    Some(value) => insn.complete_load(&mut regs, value),
                    None => return Action::Stop(Stop::MemoryViolation { gpa, access, rip }),
                },
            },
        }
        self.skip(vmcb, u64::from(insn.len));
        Action::Resume
    }

    /// The instruction at the guest's RIP if it is the one emulated last (same CR3, RIP and
    /// bytes), without a page walk or a decode.
    fn cached_instruction(
        &self,
        save: &crate::vmcb::SaveArea,
        env: &mut impl Env,
    ) -> Option<conduit_decode::Instruction> {
        let c = self.mmio_cache.as_ref()?;
        if c.cr3 != save.cr3 || c.rip != save.rip {
            return None;
        }
        // Compare the aligned words covering the instruction (at most three), masked to its
        // bytes: a few loads and compares instead of a byte-wise copy.
        let mut word = c.first_word;
        for &(mask, expected) in &c.words {
            if mask == 0 {
                break;
            }
            if (env.read_guest_u64(word)? ^ expected) & mask != 0 {
                return None;
            }
            word += 8;
        }
        Some(c.insn)
    }

    /// Keeps `insn` (decoded from `bytes` at the guest's RIP) for the next exit at that RIP, if
    /// it lies within one page.
    fn remember_instruction(
        &mut self,
        save: &crate::vmcb::SaveArea,
        bytes: [u8; walk::MAX_INSTRUCTION],
        insn: conduit_decode::Instruction,
        env: &mut impl Env,
    ) {
        self.mmio_cache = None;
        if (save.rip & 0xfff) + u64::from(insn.len) > 0x1000 {
            return;
        }
        let Ok(gpa) = walk::translate(save, save.rip, &mut Mem(env)) else { return };
        let first_word = gpa & !7;
        let mut words = [(0u64, 0u64); 3];
        for (i, &b) in bytes.iter().take(usize::from(insn.len)).enumerate() {
            let at = gpa + i as u64 - first_word;
            let Some(w) = words.get_mut((at / 8) as usize) else { return };
            let shift = (at % 8) * 8;
            w.0 |= 0xff << shift;
            w.1 |= u64::from(b) << shift;
        }
        self.mmio_cache = Some(CachedInstruction { cr3: save.cr3, rip: save.rip, first_word, words, insn });
    }

    /// `mov cr8, r64` (REX.R + 0F 22 /r, or the AMD `lock mov cr0` alias F0 0F 22 /r): the
    /// new task priority. Intercepted only while an interrupt waits on the TPR.
    fn write_cr8(&mut self, vmcb: &mut Vmcb, env: &mut impl Env) -> Action {
        self.stats.cr8 += 1;
        let rip = vmcb.save.rip;
        let (bytes, n) = match walk::fetch(&vmcb.save, &mut Mem(env)) {
            Ok(f) => f,
            Err(error) => return Action::Stop(Stop::InstructionFetch { rip, error }),
        };
        let Some((len, reg)) = decode_mov_to_cr8(&bytes[..n]) else {
            return Action::Stop(Stop::UnexpectedExit { code: exit::WRITE_CR8, info1: 0, info2: rip });
        };
        let regs = GuestRegs { gprs: &mut self.gprs, vmcb };
        let value = regs.get(reg);
        if value > 0xf {
            self.inject(vmcb, VECTOR_GP, Some(0));
            return Action::Resume;
        }
        self.lapic.set_tpr((value as u8) << 4);
        self.skip(vmcb, len);
        Action::Resume
    }
}

/// Decodes a move to CR8: returns the instruction length and source register.
fn decode_mov_to_cr8(b: &[u8]) -> Option<(u64, Gpr)> {
    let (rex, rest, lock) = match b {
        [0xf0, rest @ ..] => (0x40, rest, true),
        [r @ 0x40..=0x4f, rest @ ..] => (*r, rest, false),
        _ => return None,
    };
    let [0x0f, 0x22, modrm, ..] = rest else { return None };
    let reg = ((modrm >> 3) & 7) | if rex & 4 != 0 { 8 } else { 0 };
    let want = if lock { 0 } else { 8 };
    // MOV to a control register always takes a register operand: the CPU ignores the mod
    // field (SDM: "the two bits in the mod field are ignored").
    if reg != want {
        return None;
    }
    let rm = (modrm & 7) | if rex & 1 != 0 { 8 } else { 0 };
    Some((4, Gpr::from_number(rm)?))
}

#[cfg(test)]
mod tests;
