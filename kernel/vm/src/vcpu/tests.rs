//! Exit handling against a fake environment and a fake guest memory.

use super::*;
use crate::guest::{self, HostTables};
use crate::walk::tests::FakeMemory;

struct FakeEnv {
    mem: FakeMemory,
    tsc: u64,
    lines: Vec<String>,
    signals: Vec<u64>,
    mailbox: u64,
    device: Option<u16>,
    device_writes: Vec<(u64, u8, u64)>,
}

impl FakeEnv {
    fn new() -> Self {
        let mut mem = FakeMemory::new(MEMORY);
        guest::write_tables(MEMORY, |gpa, bytes| {
            mem.put(gpa, bytes);
            true
        });
        Self {
            mem,
            tsc: 1000,
            lines: Vec::new(),
            signals: Vec::new(),
            mailbox: 0,
            device: None,
            device_writes: Vec::new(),
        }
    }
}

impl Env for FakeEnv {
    fn read_guest(&mut self, gpa: u64, buf: &mut [u8]) -> bool {
        self.mem.read(gpa, buf)
    }
    fn tsc(&self) -> u64 {
        self.tsc
    }
    fn uptime_us(&self) -> u64 {
        42
    }
    fn host_cpuid(&self, _leaf: u32, _subleaf: u32) -> CpuidResult {
        CpuidResult { eax: u32::MAX, ebx: u32::MAX, ecx: u32::MAX, edx: u32::MAX }
    }
    fn console_line(&mut self, line: &[u8]) {
        self.lines.push(String::from_utf8(line.to_vec()).unwrap());
    }
    fn signal(&mut self, value: u64) {
        self.signals.push(value);
    }
    fn mailbox(&mut self) -> u64 {
        self.mailbox
    }
    fn mmio_read(&mut self, id: u16, offset: u64, _size: u8) -> Option<u64> {
        (self.device == Some(id)).then_some(0x1234_5678_9abc_def0 ^ offset)
    }
    fn mmio_write(&mut self, id: u16, offset: u64, size: u8, value: u64) -> bool {
        self.device_writes.push((offset, size, value));
        self.device == Some(id)
    }
}

const MEMORY: u64 = 16 << 20;
const CODE: u64 = 0x20_0000;

fn setup() -> (Vcpu, Box<Vmcb>, PendingVectors, FakeEnv) {
    let mut vmcb = Box::new(Vmcb::zeroed());
    let host = HostTables { iopm: 0x1000_0000, msrpm: 0x1000_3000, ncr3: 0x1000_5000, asid: 1 };
    guest::init_vmcb(&mut vmcb, host, MEMORY, 0, CODE);
    let vcpu = Vcpu::new(0, true, guest::boot_info_gpa(0));
    (vcpu, vmcb, PendingVectors::new(), FakeEnv::new())
}

fn exit_with(vmcb: &mut Vmcb, code: u64, info1: u64, info2: u64) {
    vmcb.control.exit_code = code;
    vmcb.control.exit_info1 = info1;
    vmcb.control.exit_info2 = info2;
    vmcb.control.exit_int_info = 0;
}

fn injected(vmcb: &Vmcb) -> Option<Event> {
    Event::decode(vmcb.control.event_inj)
}

#[test]
fn hypercalls() {
    let (mut v, mut vmcb, p, mut env) = setup();
    env.mem.put(0x30_0000, b"hi there\nand more");
    let call = |v: &mut Vcpu, vmcb: &mut Vmcb, env: &mut FakeEnv, nr: u64, a0: u64, a1: u64| {
        vmcb.save.rax = nr;
        v.gprs.rdi = a0;
        v.gprs.rsi = a1;
        exit_with(vmcb, exit::VMMCALL, 0, 0);
        let a = v.handle_exit(vmcb, &p, env);
        (a, vmcb.save.rax as i64)
    };
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::VERSION, 0, 0), (Action::Resume, ABI_VERSION as i64));
    assert_eq!(vmcb.save.rip, CODE + 3);
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::CONSOLE_WRITE, 0x30_0000, 17).1, 17);
    assert_eq!(env.lines, ["hi there"]);
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::CONSOLE_WRITE, MEMORY - 4, 8).1, error::EFAULT);
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::CONSOLE_WRITE, u64::MAX - 3, 8).1, error::EFAULT);
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::CONSOLE_WRITE, 0, CONSOLE_MAX + 1).1, error::EINVAL);
    assert_eq!(call(&mut v, &mut vmcb, &mut env, 0x7777, 0, 0).1, error::ENOSYS);
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::SIGNAL, 5, 0).1, 0);
    assert_eq!(env.signals, [5]);
    env.mailbox = 9;
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::MAILBOX, 0, 0).1, 9);
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::UPTIME_US, 0, 0).1, 42);
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::AUTO_EOI, 0x61, 1).1, 0);
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::AUTO_EOI, 0x0f, 1).1, error::EINVAL);
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::AUTO_EOI, 0x161, 1).1, error::EINVAL);
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::AUTO_EOI, 0x61, 2).1, error::EINVAL);
    vmcb.save.cpl = 3;
    assert_eq!(call(&mut v, &mut vmcb, &mut env, hypercall::VERSION, 0, 0).1, error::EPERM);
    vmcb.save.cpl = 0;
    let (a, _) = call(&mut v, &mut vmcb, &mut env, hypercall::EXIT, 0x600d, 0);
    assert_eq!(a, Action::Stop(Stop::Exited(0x600d)));
    assert_eq!(env.lines, ["hi there", "and more"], "the partial line is flushed at exit");
    assert_eq!(v.stats.hypercall_errors, 8);
}

#[test]
fn console_port_sanitizes() {
    let (mut v, mut vmcb, p, mut env) = setup();
    for b in b"a\x1b[2Jb\n" {
        vmcb.save.rax = u64::from(*b);
        exit_with(&mut vmcb, exit::IOIO, u64::from(DEBUG_CONSOLE_PORT) << 16 | 1 << 4, CODE + 2);
        assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Resume);
        assert_eq!(vmcb.save.rip, CODE + 2);
    }
    assert_eq!(env.lines, ["a?[2Jb"]);
}

#[test]
fn port_io() {
    let (mut v, mut vmcb, p, mut env) = setup();
    vmcb.save.rax = 0xaaaa_bbbb_cccc_dddd;
    exit_with(&mut vmcb, exit::IOIO, 0x60 << 16 | 1 << 4 | IOIO_IN, CODE + 1);
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!(vmcb.save.rax, 0xaaaa_bbbb_cccc_ddff, "IN AL merges");
    exit_with(&mut vmcb, exit::IOIO, 0x60 << 16 | 1 << 6 | IOIO_IN, CODE + 1);
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!(vmcb.save.rax, 0xffff_ffff, "IN EAX zero-extends");
    exit_with(&mut vmcb, exit::IOIO, 0x60 << 16 | 1 << 4 | IOIO_STRING | IOIO_REP, CODE + 2);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Stop(Stop::StringIo { port: 0x60 }));
    assert_eq!(v.stats.unclaimed_io, 2);
}

#[test]
fn msrs_and_cpuid() {
    let (mut v, mut vmcb, p, mut env) = setup();
    v.gprs.rcx = u64::from(msr::index::EFER);
    exit_with(&mut vmcb, exit::MSR, 0, 0);
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!((vmcb.save.rax, v.gprs.rdx), (0xd00, 0), "EFER without SVME");
    assert_eq!(vmcb.save.rip, CODE + 2);
    v.gprs.rcx = u64::from(msr::index::VM_HSAVE_PA);
    exit_with(&mut vmcb, exit::MSR, 0, 0);
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!(injected(&vmcb), Some(Event { vector: VECTOR_GP, kind: EventKind::Exception, error_code: Some(0) }));
    assert_eq!(vmcb.save.rip, CODE + 2, "not advanced on #GP");
    vmcb.save.rax = 0x8000_0001;
    v.gprs.rcx = 0;
    exit_with(&mut vmcb, exit::CPUID, 0, 0);
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!(v.gprs.rcx & 4, 0, "SVM hidden");
    assert_eq!(vmcb.save.rip, CODE + 4);
}

#[test]
fn svm_instructions_are_undefined() {
    let (mut v, mut vmcb, p, mut env) = setup();
    for code in [exit::VMRUN, exit::VMLOAD, exit::STGI, exit::XSETBV, exit::RDTSCP] {
        exit_with(&mut vmcb, code, 0, 0);
        assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Resume);
        assert_eq!(injected(&vmcb).map(|e| e.vector), Some(VECTOR_UD));
    }
    exit_with(&mut vmcb, exit::SHUTDOWN, 0, 0);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Stop(Stop::TripleFault { rip: CODE }));
    exit_with(&mut vmcb, exit::INVALID, 0, 0);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Stop(Stop::InvalidState));
    exit_with(&mut vmcb, 0x99, 1, 2);
    assert_eq!(
        v.handle_exit(&mut vmcb, &p, &mut env),
        Action::Stop(Stop::UnexpectedExit { code: 0x99, info1: 1, info2: 2 })
    );
}

#[test]
fn memory_violations_stop() {
    let (mut v, mut vmcb, p, mut env) = setup();
    exit_with(&mut vmcb, exit::NPF, 1 << 1 | 1 << 32, MEMORY + 0x20_0000);
    assert_eq!(
        v.handle_exit(&mut vmcb, &p, &mut env),
        Action::Stop(Stop::MemoryViolation { gpa: MEMORY + 0x20_0000, access: Access::Write, rip: CODE })
    );
    exit_with(&mut vmcb, exit::NPF, 1 << 4, layout::LOCAL_APIC);
    assert!(matches!(
        v.handle_exit(&mut vmcb, &p, &mut env),
        Action::Stop(Stop::MemoryViolation { access: Access::Fetch, .. })
    ));
}

fn place(env: &mut FakeEnv, bytes: &[u8]) {
    env.mem.put(CODE, bytes);
}

#[test]
fn apic_mmio_through_the_decoder() {
    let (mut v, mut vmcb, p, mut env) = setup();
    // mov eax, [0xfee00020] (8b 04 25 disp32) — the APIC ID register.
    place(&mut env, &[0x8b, 0x04, 0x25, 0x20, 0x00, 0xe0, 0xfe]);
    vmcb.save.rax = u64::MAX;
    exit_with(&mut vmcb, exit::NPF, 1 << 32, layout::LOCAL_APIC + 0x20);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Resume);
    assert_eq!(vmcb.save.rax, 0, "APIC ID 0, zero-extended");
    assert_eq!(vmcb.save.rip, CODE + 7);
    // mov [rbx], ecx with rbx -> TPR, ecx = 0x60.
    vmcb.save.rip = CODE;
    place(&mut env, &[0x89, 0x0b]);
    v.gprs.rcx = 0x60;
    exit_with(&mut vmcb, exit::NPF, 1 << 1 | 1 << 32, layout::LOCAL_APIC + 0x80);
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!(v.lapic.tpr(), 0x60);
    // The instruction read after the fault is a load, but the fault was a write: the bytes
    // changed under the fault (another vCPU rewrote them). Not emulated.
    vmcb.save.rip = CODE;
    place(&mut env, &[0x8b, 0x0b]);
    exit_with(&mut vmcb, exit::NPF, 1 << 1 | 1 << 32, layout::LOCAL_APIC + 0x80);
    assert_eq!(
        v.handle_exit(&mut vmcb, &p, &mut env),
        Action::Stop(Stop::InstructionMismatch { gpa: layout::LOCAL_APIC + 0x80, rip: CODE })
    );
    // A byte access to the APIC stops the guest.
    vmcb.save.rip = CODE;
    place(&mut env, &[0x88, 0x0b]);
    exit_with(&mut vmcb, exit::NPF, 1 << 1 | 1 << 32, layout::LOCAL_APIC + 0x80);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Stop(Stop::ApicAccess { offset: 0x80, size: 1 }));
    // An instruction the decoder refuses.
    vmcb.save.rip = CODE;
    place(&mut env, &[0xf3, 0xa4]);
    exit_with(&mut vmcb, exit::NPF, 1 << 1 | 1 << 32, layout::LOCAL_APIC + 0x80);
    assert!(matches!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Stop(Stop::UnsupportedInstruction { .. })));
    // RIP on an unmapped page.
    vmcb.save.rip = 0xffff_8000_0000_0000;
    exit_with(&mut vmcb, exit::NPF, 1 << 32, layout::LOCAL_APIC + 0x80);
    assert!(matches!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Stop(Stop::InstructionFetch { .. })));
}

#[test]
fn device_regions_through_the_environment() {
    let (mut v, mut vmcb, p, mut env) = setup();
    env.device = Some(7);
    v.regions.insert(0xc000_0000, 0x1000, crate::mmio::Handler::Device(7)).unwrap();
    // mov qword [rdi], 0x7f (48 c7 07 imm32)
    place(&mut env, &[0x48, 0xc7, 0x07, 0x7f, 0, 0, 0]);
    exit_with(&mut vmcb, exit::NPF, 1 << 1 | 1 << 32, 0xc000_0010);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Resume);
    assert_eq!(env.device_writes, [(0x10, 8, 0x7f)]);
    // movzx eax, word [rdi]
    vmcb.save.rip = CODE;
    place(&mut env, &[0x0f, 0xb7, 0x07]);
    exit_with(&mut vmcb, exit::NPF, 1 << 32, 0xc000_0010);
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!(vmcb.save.rax, (0x1234_5678_9abc_def0u64 ^ 0x10) & 0xffff);
    // A region whose device does not answer stops the guest.
    v.regions.insert(0xc000_2000, 0x1000, crate::mmio::Handler::Device(8)).unwrap();
    vmcb.save.rip = CODE;
    exit_with(&mut vmcb, exit::NPF, 1 << 32, 0xc000_2000);
    assert!(matches!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Stop(Stop::MemoryViolation { .. })));
}

#[test]
fn injection_respects_if_shadow_and_priority() {
    let (mut v, mut vmcb, p, _env) = setup();
    for vec in [0x51, 0x73, 0x62] {
        p.raise(vec);
    }
    // IF clear: a window, nothing injected.
    v.prepare_entry(&mut vmcb, &p, 0);
    assert_eq!(injected(&vmcb), None);
    assert_ne!(vmcb.control.int_ctl & int_ctl::V_IRQ, 0);
    assert_ne!(vmcb.control.intercept_misc1 & Misc1::VINTR.bits(), 0);
    // The window opens: the highest vector goes in, exactly once.
    vmcb.save.rflags |= RFLAGS_IF;
    exit_with(&mut vmcb, exit::VINTR, 0, 0);
    let mut env = FakeEnv::new();
    v.handle_exit(&mut vmcb, &p, &mut env);
    v.prepare_entry(&mut vmcb, &p, 0);
    assert_eq!(injected(&vmcb), Some(Event { vector: 0x73, kind: EventKind::Interrupt, error_code: None }));
    assert_eq!(vmcb.control.intercept_misc1 & Misc1::VINTR.bits(), 0);
    assert!(!p.contains(0x73));
    // Entered: EVENTINJ consumed. Until EOI, 0x62 and 0x51 are blocked by the ISR.
    exit_with(&mut vmcb, exit::INTR, 0, 0);
    v.handle_exit(&mut vmcb, &p, &mut env);
    v.prepare_entry(&mut vmcb, &p, 0);
    assert_eq!(injected(&vmcb), None);
    assert_eq!(vmcb.control.int_ctl & int_ctl::V_IRQ, 0, "no window: the EOI exits");
    v.lapic.eoi();
    // An STI shadow blocks injection too.
    vmcb.control.int_state = INTERRUPT_SHADOW;
    v.prepare_entry(&mut vmcb, &p, 0);
    assert_eq!(injected(&vmcb), None);
    vmcb.control.int_state = 0;
    v.prepare_entry(&mut vmcb, &p, 0);
    assert_eq!(injected(&vmcb).map(|e| e.vector), Some(0x62));
    assert_eq!(v.stats.injected, 2);
}

#[test]
fn interrupted_delivery_is_reinjected() {
    let (mut v, mut vmcb, p, mut env) = setup();
    vmcb.save.rflags |= RFLAGS_IF;
    p.raise(0x40);
    v.prepare_entry(&mut vmcb, &p, 0);
    let word = vmcb.control.event_inj;
    // The delivery hit an NPF (say, the IDT page); the exit reports the event.
    exit_with(&mut vmcb, exit::INTR, 0, 0);
    vmcb.control.exit_int_info = word;
    p.raise(0x50);
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!(vmcb.control.event_inj, word, "re-injected as it was");
    v.prepare_entry(&mut vmcb, &p, 0);
    assert_eq!(vmcb.control.event_inj, word, "0x50 waits behind the re-injection");
    assert_ne!(vmcb.control.int_ctl & int_ctl::V_IRQ, 0, "a window for 0x50");
    assert_eq!(v.stats.reinjected, 1);
    // A stale vector with the valid bit clear is ignored.
    exit_with(&mut vmcb, exit::INTR, 0, 0);
    vmcb.control.exit_int_info = 0x40;
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!(vmcb.control.event_inj, 0);
    // A software interrupt is not re-injected (no next RIP): INT3 runs again.
    exit_with(&mut vmcb, exit::INTR, 0, 0);
    vmcb.control.exit_int_info = Event { vector: 3, kind: EventKind::Exception, error_code: None }.encode();
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!(vmcb.control.event_inj, 0);
}

#[test]
fn tpr_blocking_and_cr8() {
    let (mut v, mut vmcb, p, mut env) = setup();
    vmcb.save.rflags |= RFLAGS_IF;
    v.lapic.set_tpr(0x60);
    p.raise(0x51);
    v.prepare_entry(&mut vmcb, &p, 0);
    assert_eq!(injected(&vmcb), None);
    assert_eq!(vmcb.control.int_ctl & int_ctl::V_TPR_MASK, 6);
    assert_ne!(vmcb.control.intercept_cr & guest::INTERCEPT_CR8_WRITE, 0);
    // mov cr8, rax (44 0f 22 c0) with rax = 0.
    place(&mut env, &[0x44, 0x0f, 0x22, 0xc0]);
    vmcb.save.rax = 0;
    exit_with(&mut vmcb, exit::WRITE_CR8, 0, 0);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Resume);
    assert_eq!(v.lapic.tpr(), 0);
    assert_eq!(vmcb.save.rip, CODE + 4);
    v.prepare_entry(&mut vmcb, &p, 0);
    assert_eq!(injected(&vmcb).map(|e| e.vector), Some(0x51));
    // A CR8 write the guest made without an intercept is picked up at the next exit.
    vmcb.control.int_ctl = (vmcb.control.int_ctl & !int_ctl::V_TPR_MASK) | 0xa;
    exit_with(&mut vmcb, exit::INTR, 0, 0);
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!(v.lapic.tpr(), 0xa0);
}

#[test]
fn decode_cr8_forms() {
    assert_eq!(decode_mov_to_cr8(&[0x44, 0x0f, 0x22, 0xc0]), Some((4, Gpr::Rax)));
    assert_eq!(decode_mov_to_cr8(&[0x45, 0x0f, 0x22, 0xc7]), Some((4, Gpr::R15)));
    assert_eq!(decode_mov_to_cr8(&[0xf0, 0x0f, 0x22, 0xc1]), Some((4, Gpr::Rcx)));
    assert_eq!(decode_mov_to_cr8(&[0x0f, 0x22, 0xc0]), None, "that is CR0");
    assert_eq!(decode_mov_to_cr8(&[0x44, 0x0f, 0x22, 0x00]), Some((4, Gpr::Rax)), "mod is ignored");
    assert_eq!(decode_mov_to_cr8(&[0x44, 0x0f]), None);
}

#[test]
fn halt_and_timer() {
    let (mut v, mut vmcb, p, mut env) = setup();
    exit_with(&mut vmcb, exit::HLT, 0, 0);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Stop(Stop::HaltedForever { rip: CODE + 1 }));
    vmcb.save.rflags |= RFLAGS_IF;
    vmcb.control.int_state = INTERRUPT_SHADOW;
    exit_with(&mut vmcb, exit::HLT, 0, 0);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Halt);
    assert_eq!(vmcb.control.int_state, 0, "the STI shadow ends with the HLT");
    // One-shot timer at vector 0x45 in 100 TSC ticks (divide by 1).
    v.lapic.write(crate::vlapic::reg::TIMER_DIVIDE, 0xb, &p, 0);
    v.lapic.write(crate::vlapic::reg::LVT_TIMER, 0x45, &p, 0);
    v.lapic.write(crate::vlapic::reg::TIMER_INITIAL, 100, &p, 1000);
    assert!(!v.wake_ready(&p, 1050));
    assert!(v.wake_ready(&p, 1100));
    v.prepare_entry(&mut vmcb, &p, 1100);
    assert_eq!(injected(&vmcb).map(|e| e.vector), Some(0x45));
}

#[test]
fn intercepted_exceptions_are_reinjected() {
    let (mut v, mut vmcb, p, mut env) = setup();
    exit_with(&mut vmcb, exit::EXCEPTION_BASE + 17, 0, 0);
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!(injected(&vmcb), Some(Event { vector: 17, kind: EventKind::Exception, error_code: Some(0) }));
    exit_with(&mut vmcb, exit::EXCEPTION_BASE + 1, 0, 0);
    v.handle_exit(&mut vmcb, &p, &mut env);
    assert_eq!(injected(&vmcb), Some(Event { vector: 1, kind: EventKind::Exception, error_code: None }));
}

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    const CODES: &[u64] = &[
        exit::INTR,
        exit::NMI,
        exit::VINTR,
        exit::IOIO,
        exit::MSR,
        exit::CPUID,
        exit::VMMCALL,
        exit::HLT,
        exit::NPF,
        exit::WRITE_CR8,
        exit::SHUTDOWN,
        exit::EXCEPTION_BASE + 1,
        exit::EXCEPTION_BASE + 17,
        exit::VMRUN,
        exit::XSETBV,
        exit::INVALID,
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Any exit with any guest-controlled registers, exit information and instruction
        /// bytes is handled without a panic, and injection preparation afterwards too.
        #[test]
        fn any_exit(
            code in prop_oneof![proptest::sample::select(CODES), any::<u64>()],
            info1 in any::<u64>(),
            info2 in prop_oneof![any::<u64>(), Just(layout::LOCAL_APIC + 0x80), 0xfee0_0000u64..0xfee0_1000],
            exit_int_info in any::<u64>(),
            regs in proptest::array::uniform8(any::<u64>()),
            rflags in any::<u64>(),
            int_ctl in any::<u64>(),
            cpl in any::<u8>(),
            insn in proptest::collection::vec(any::<u8>(), 0..16),
            pending in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let (mut v, mut vmcb, p, mut env) = setup();
            env.mem.put(CODE, &insn);
            env.device = Some(1);
            let _ = v.regions.insert(0xc000_0000, 0x1000, crate::mmio::Handler::Device(1));
            vmcb.save.rax = regs[0];
            v.gprs.rcx = regs[1];
            v.gprs.rdx = regs[2];
            v.gprs.rdi = regs[3];
            v.gprs.rsi = regs[4];
            v.gprs.rbx = regs[5];
            vmcb.save.rflags = rflags;
            vmcb.save.cpl = cpl;
            vmcb.control.int_ctl = int_ctl;
            for vec in pending {
                p.raise(vec);
            }
            exit_with(&mut vmcb, code, info1, info2);
            vmcb.control.exit_int_info = exit_int_info;
            let _ = v.handle_exit(&mut vmcb, &p, &mut env);
            v.prepare_entry(&mut vmcb, &p, regs[6]);
            let _ = v.wake_ready(&p, regs[7]);
        }
    }
}

#[test]
fn queued_event_keeps_tpr_blocked_vector_reachable() {
    let (mut v, mut vmcb, p, mut env) = setup();
    vmcb.save.rflags |= RFLAGS_IF;
    v.lapic.set_tpr(0x60);
    p.raise(0x51);
    v.prepare_entry(&mut vmcb, &p, 0);
    assert_ne!(vmcb.control.intercept_cr & guest::INTERCEPT_CR8_WRITE, 0);
    // A refused RDMSR queues #GP; the vector still waits only on the TPR.
    v.gprs.rcx = 0xdead_beef;
    exit_with(&mut vmcb, exit::MSR, 0, 0);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Resume);
    assert!(injected(&vmcb).is_some(), "#GP queued");
    v.prepare_entry(&mut vmcb, &p, 0);
    assert_ne!(vmcb.control.intercept_cr & guest::INTERCEPT_CR8_WRITE, 0, "CR8 writes still exit");
    // And a deliverable vector behind a queued event asks for a window.
    v.lapic.set_tpr(0);
    v.prepare_entry(&mut vmcb, &p, 0);
    assert_eq!(injected(&vmcb).map(|e| e.vector), Some(13), "#GP stays first");
    assert_ne!(vmcb.control.int_ctl & int_ctl::V_IRQ, 0, "a window for 0x51");
}

#[test]
fn invd_is_a_no_op_and_delivery_faults_are_not_emulated() {
    let (mut v, mut vmcb, p, mut env) = setup();
    exit_with(&mut vmcb, exit::INVD, 0, 0);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Resume);
    assert_eq!(vmcb.save.rip, CODE + 2);
    assert_eq!(injected(&vmcb), None);
    // An NPF on the APIC page while delivering an event (an IDT placed there): not emulated.
    vmcb.save.rip = CODE;
    place(&mut env, &[0x8b, 0x0b]);
    exit_with(&mut vmcb, exit::NPF, 1 << 32, layout::LOCAL_APIC + 0x80);
    vmcb.control.exit_int_info = Event { vector: 0x40, kind: EventKind::Interrupt, error_code: None }.encode();
    assert!(matches!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Stop(Stop::MemoryViolation { .. })));
    // An NPF during the guest's own page-table walk: not emulated either.
    vmcb.save.rip = CODE;
    exit_with(&mut vmcb, exit::NPF, 1 << 33, layout::LOCAL_APIC + 0x80);
    assert!(matches!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Stop(Stop::MemoryViolation { .. })));
}

#[test]
fn the_instruction_cache_follows_the_bytes_and_offers_doorbells_first() {
    struct DoorbellEnv {
        inner: FakeEnv,
        rung: Vec<(u16, u64, u8, u64)>,
    }
    impl Env for DoorbellEnv {
        fn read_guest(&mut self, gpa: u64, buf: &mut [u8]) -> bool {
            self.inner.read_guest(gpa, buf)
        }
        fn tsc(&self) -> u64 {
            self.inner.tsc()
        }
        fn uptime_us(&self) -> u64 {
            0
        }
        fn host_cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
            self.inner.host_cpuid(leaf, subleaf)
        }
        fn console_line(&mut self, _line: &[u8]) {}
        fn signal(&mut self, _value: u64) {}
        fn mailbox(&mut self) -> u64 {
            0
        }
        fn mmio_write(&mut self, id: u16, offset: u64, size: u8, value: u64) -> bool {
            self.inner.mmio_write(id, offset, size, value)
        }
        fn doorbell(&mut self, id: u16, offset: u64, size: u8, value: u64) -> bool {
            // Offset 0x20 is a doorbell; everything else goes the generic way.
            let hit = offset == 0x20;
            if hit {
                self.rung.push((id, offset, size, value));
            }
            hit
        }
    }
    let (mut v, mut vmcb, p, inner) = setup();
    let mut env = DoorbellEnv { inner, rung: Vec::new() };
    env.inner.device = Some(7);
    v.regions.insert(0xc000_0000, 0x1000, crate::mmio::Handler::Device(7)).unwrap();
    // mov dword [rdi], 5 (c7 07 imm32), twice at the same RIP: the second from the cache.
    place(&mut env.inner, &[0xc7, 0x07, 5, 0, 0, 0]);
    for _ in 0..2 {
        vmcb.save.rip = CODE;
        exit_with(&mut vmcb, exit::NPF, 1 << 1 | 1 << 32, 0xc000_0020);
        assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Resume);
        assert_eq!(vmcb.save.rip, CODE + 6);
    }
    assert_eq!(env.rung, [(7, 0x20, 4, 5), (7, 0x20, 4, 5)]);
    assert_eq!(v.stats.doorbells, 2);
    assert!(env.inner.device_writes.is_empty(), "a doorbell is not also written the generic way");
    // The guest rewrites the instruction in place (same RIP, same CR3): decoded afresh.
    // mov word [rdi], 9 (66 c7 07 imm16)
    place(&mut env.inner, &[0x66, 0xc7, 0x07, 9, 0]);
    vmcb.save.rip = CODE;
    exit_with(&mut vmcb, exit::NPF, 1 << 1 | 1 << 32, 0xc000_0020);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Resume);
    assert_eq!(env.rung.last(), Some(&(7, 0x20, 2, 9)));
    assert_eq!(vmcb.save.rip, CODE + 5);
    // Not a doorbell: the generic path.
    vmcb.save.rip = CODE;
    exit_with(&mut vmcb, exit::NPF, 1 << 1 | 1 << 32, 0xc000_0024);
    assert_eq!(v.handle_exit(&mut vmcb, &p, &mut env), Action::Resume);
    assert_eq!(env.inner.device_writes, [(0x24, 2, 9)]);
    assert_eq!(v.stats.doorbells, 3);
}
