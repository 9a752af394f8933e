use super::*;
use crate::context::Target;
use crate::context::tests::RecordingSink;
use crate::frontend::fake::{Call, FakeBackend};
use crate::frontend::{MAX_VCPUS, Software, message_target};
use crate::msi::{self, GuestMsi};
use proptest::prelude::*;
use std::vec::Vec;

const SLOTS: VcpuSlots = [Some(4), Some(5), Some(6), None, None, None, None, None];

fn target(vcpu: u8, vector: u8) -> Target {
    Target { slot: SLOTS[usize::from(vcpu)].unwrap(), vector }
}

type Fe<'p> = MsixFrontEnd<'p, FakeBackend, 8, 16>;

/// One step of a table-driven scenario.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Program entry `i`'s message for (vcpu, vector), keeping its mask bit.
    Program(u16, u8, u8),
    /// Write a zeroed (undeliverable) message into entry `i`.
    Clear(u16),
    Mask(u16),
    Unmask(u16),
    Control {
        enabled: bool,
        function_masked: bool,
    },
    /// Signal entry `i`, expecting an outcome.
    Fire(u16, Signal),
    /// The deliveries since the last check, as (entry index whose target, ...): exact targets.
    Delivered(&'static [(u8, u8)]),
    /// Exactly these entries have a context.
    Live(&'static [u16]),
    /// PBA qword 0.
    Pba(u64),
    /// Entry activations fail (bit per entry).
    FailActivate(u64),
    /// The backend calls since the last check.
    Calls(&'static [CallKind]),
    /// Contexts allocated in the pool.
    InUse(usize),
}

/// A backend call without its context id (ids are the pool's business).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallKind {
    Activate(u16),
    Retarget(u16),
    Deactivate(u16),
}

fn kind(c: &Call) -> CallKind {
    match *c {
        Call::Activate(i, ..) => CallKind::Activate(i),
        Call::Retarget(i, ..) => CallKind::Retarget(i),
        Call::Deactivate(i, _) => CallKind::Deactivate(i),
    }
}

fn write_message(fe: &mut Fe<'_>, i: u16, address: u64, data: u32, sink: &RecordingSink) {
    let base = u64::from(i) * table::ENTRY_BYTES;
    fe.write_table(base + table::ADDRESS_LO, 8, address, sink);
    fe.write_table(base + table::DATA, 4, u64::from(data), sink);
}

fn set_mask(fe: &mut Fe<'_>, i: u16, masked: bool, sink: &RecordingSink) {
    fe.write_table(u64::from(i) * table::ENTRY_BYTES + table::VECTOR_CONTROL, 4, u64::from(masked), sink);
}

fn run(name: &str, steps: &[Step]) {
    let pool = ContextPool::<16>::new();
    let sink = RecordingSink::new();
    let mut fe = Fe::new(&pool, FakeBackend::default(), 4, SLOTS);
    for (n, &step) in steps.iter().enumerate() {
        let at = || format!("{name}: step {n} {step:?}");
        match step {
            Step::Program(i, vcpu, vector) => {
                let (a, d) = msi::encode(GuestMsi { dest_apic: vcpu, vector });
                write_message(&mut fe, i, a, d, &sink);
            }
            Step::Clear(i) => write_message(&mut fe, i, 0, 0, &sink),
            Step::Mask(i) => set_mask(&mut fe, i, true, &sink),
            Step::Unmask(i) => set_mask(&mut fe, i, false, &sink),
            Step::Control { enabled, function_masked } => {
                fe.set_control(MsixControl { enabled, function_masked }, &sink)
            }
            Step::Fire(i, want) => assert_eq!(fe.signal(i, &sink), want, "{}", at()),
            Step::Delivered(want) => {
                let want: Vec<Target> = want.iter().map(|&(vcpu, vector)| target(vcpu, vector)).collect();
                assert_eq!(sink.take_log(), want, "{}", at());
            }
            Step::Live(want) => {
                let live: Vec<u16> = (0..fe.table_size()).filter(|&i| fe.entry_context(i).is_some()).collect();
                assert_eq!(live, want, "{}", at());
                assert_eq!(fe.backend().live.keys().copied().collect::<Vec<_>>(), want, "{}", at());
            }
            Step::Pba(want) => assert_eq!(fe.read_pba(0, 8), want, "{}", at()),
            Step::FailActivate(bits) => fe.backend_mut().fail_activate = bits,
            Step::Calls(want) => {
                let calls: Vec<CallKind> = fe.backend_mut().take_calls().iter().map(kind).collect();
                assert_eq!(calls, want, "{}", at());
            }
            Step::InUse(n) => assert_eq!(pool.in_use(), n, "{}", at()),
        }
        for i in 0..fe.table_size() {
            let s = fe.entry_counters(i).unwrap();
            let pending = u64::from(fe.is_pending(i));
            assert_eq!(s.pending_while_masked, s.flushed + s.dropped + pending, "{}", at());
        }
    }
    drop(fe);
    assert_eq!(pool.in_use(), 0, "{name}: dropping the front end frees everything");
}

use CallKind::{Activate as A, Deactivate as D, Retarget as R};
use Step::*;

const ON: Step = Control { enabled: true, function_masked: false };
const OFF: Step = Control { enabled: false, function_masked: false };
const FN_MASKED: Step = Control { enabled: true, function_masked: true };

#[test]
fn scenarios() {
    let cases: &[(&str, &[Step])] = &[
        (
            "enable with every entry masked: nothing allocated; a masked signal latches",
            &[
                Program(0, 0, 0x40),
                Program(1, 1, 0x41),
                ON,
                Live(&[]),
                InUse(0),
                Calls(&[]),
                Fire(0, Signal::PendingWhileMasked),
                Fire(0, Signal::Coalesced),
                Pba(0b1),
                Unmask(0),
                Live(&[0]),
                Calls(&[A(0)]),
                Delivered(&[(0, 0x40)]),
                Pba(0),
                Fire(0, Signal::Delivered),
                Delivered(&[(0, 0x40)]),
            ],
        ),
        (
            "unmask one at a time while the others fire: no other vector is touched",
            &[
                ON,
                Program(0, 0, 0x40),
                Program(1, 1, 0x41),
                Program(2, 2, 0x42),
                Unmask(0),
                Calls(&[A(0)]),
                Fire(0, Signal::Delivered),
                Fire(1, Signal::PendingWhileMasked),
                Fire(2, Signal::PendingWhileMasked),
                Delivered(&[(0, 0x40)]),
                Unmask(1),
                Calls(&[A(1)]),
                Delivered(&[(1, 0x41)]),
                Fire(0, Signal::Delivered),
                Fire(2, Signal::Coalesced),
                Unmask(2),
                Calls(&[A(2)]),
                Delivered(&[(0, 0x40), (2, 0x42)]),
                Live(&[0, 1, 2]),
                InUse(3),
            ],
        ),
        (
            "mask while pending, unmask delivers exactly once; the context stays",
            &[
                ON,
                Program(0, 0, 0x40),
                Unmask(0),
                Mask(0),
                Fire(0, Signal::PendingWhileMasked),
                Fire(0, Signal::Coalesced),
                Delivered(&[]),
                Pba(0b1),
                Live(&[0]),
                Unmask(0),
                Delivered(&[(0, 0x40)]),
                Pba(0),
                Unmask(0),
                Delivered(&[]),
                Calls(&[A(0)]),
            ],
        ),
        (
            "function mask masks every context; unmasking the function delivers each once",
            &[
                ON,
                Program(0, 0, 0x40),
                Program(1, 1, 0x41),
                Unmask(0),
                Unmask(1),
                FN_MASKED,
                Fire(0, Signal::PendingWhileMasked),
                Fire(1, Signal::PendingWhileMasked),
                Fire(2, Signal::PendingWhileMasked),
                Pba(0b111),
                Delivered(&[]),
                ON,
                Delivered(&[(0, 0x40), (1, 0x41)]),
                Pba(0b100),
                Live(&[0, 1]),
            ],
        ),
        (
            "function masked at unmask time: no activation until the function unmasks",
            &[
                FN_MASKED,
                Program(0, 0, 0x40),
                Unmask(0),
                Live(&[]),
                Fire(0, Signal::PendingWhileMasked),
                ON,
                Live(&[0]),
                Delivered(&[(0, 0x40)]),
            ],
        ),
        (
            "retarget: context and backend follow; a pending signal goes to the new target",
            &[
                ON,
                Program(0, 0, 0x40),
                Unmask(0),
                Calls(&[A(0)]),
                // Address then data: two writes, two retargets.
                Program(0, 1, 0x50),
                Calls(&[R(0), R(0)]),
                Fire(0, Signal::Delivered),
                Delivered(&[(1, 0x50)]),
                Mask(0),
                Fire(0, Signal::PendingWhileMasked),
                Program(0, 2, 0x60),
                Unmask(0),
                Delivered(&[(2, 0x60)]),
                Calls(&[R(0), R(0)]),
                Live(&[0]),
            ],
        ),
        (
            "disable frees everything, dropping pending signals",
            &[
                ON,
                Program(0, 0, 0x40),
                Program(1, 1, 0x41),
                Unmask(0),
                Unmask(1),
                Mask(1),
                Fire(1, Signal::PendingWhileMasked),
                Fire(2, Signal::PendingWhileMasked),
                InUse(2),
                OFF,
                Calls(&[A(0), A(1), D(0), D(1)]),
                Live(&[]),
                InUse(0),
                Pba(0),
                Fire(0, Signal::Spurious),
                Delivered(&[]),
                ON,
                Live(&[0]),
                Calls(&[A(0)]),
                Delivered(&[]),
            ],
        ),
        (
            "a failed activation frees only its own context; pre-existing ones are untouched",
            &[
                ON,
                Program(0, 0, 0x40),
                Program(1, 1, 0x41),
                Unmask(0),
                FailActivate(0b10),
                Fire(1, Signal::PendingWhileMasked),
                Unmask(1),
                Calls(&[A(0), A(1)]),
                Live(&[0]),
                InUse(1),
                Pba(0b10),
                Fire(0, Signal::Delivered),
                Fire(1, Signal::Spurious),
                Delivered(&[(0, 0x40)]),
                FailActivate(0),
                Unmask(1),
                Calls(&[A(1)]),
                Live(&[0, 1]),
                Delivered(&[(1, 0x41)]),
                InUse(2),
            ],
        ),
        (
            "an undeliverable message: never activated, signals spurious",
            &[
                ON,
                Unmask(0),
                Live(&[]),
                Fire(0, Signal::Spurious),
                Program(0, 3, 0x40),
                Live(&[]),
                Program(0, 3, 0x08),
                Program(0, 0, 0x08),
                Live(&[]),
                Program(0, 0, 0x40),
                Live(&[0]),
                Fire(0, Signal::Delivered),
                Delivered(&[(0, 0x40)]),
            ],
        ),
        (
            "a live entry whose message becomes undeliverable is unbound, then rebound",
            &[
                ON,
                Program(0, 0, 0x40),
                Unmask(0),
                Mask(0),
                Fire(0, Signal::PendingWhileMasked),
                Clear(0),
                Pba(0),
                Fire(0, Signal::Spurious),
                Live(&[0]),
                Program(0, 1, 0x41),
                Unmask(0),
                Delivered(&[]),
                Fire(0, Signal::Delivered),
                Delivered(&[(1, 0x41)]),
                Calls(&[A(0), R(0)]),
            ],
        ),
        (
            "MSI-X disabled: signals are spurious, nothing latches",
            &[Program(0, 0, 0x40), Unmask(0), Fire(0, Signal::Spurious), Live(&[]), Pba(0), ON, Delivered(&[])],
        ),
    ];
    for (name, steps) in cases {
        run(name, steps);
    }
}

fn fe_with<'p>(pool: &'p ContextPool<16>) -> Fe<'p> {
    Fe::new(pool, FakeBackend::default(), 4, SLOTS)
}

#[test]
fn table_accesses() {
    let pool = ContextPool::<16>::new();
    let sink = RecordingSink::new();
    let mut fe = fe_with(&pool);
    assert_eq!(fe.table_size(), 4);
    assert_eq!(fe.pba_bytes(), 8);
    // Reset state: zero message, masked.
    assert_eq!(fe.read_table(0xc, 4), 1);
    assert_eq!(fe.read_table(0x8, 8), 1 << 32);
    fe.write_table(0x10, 8, 0x1234_5678_fee0_1000, &sink);
    assert_eq!(fe.read_table(0x10, 4), 0xfee0_1000);
    assert_eq!(fe.read_table(0x14, 4), 0x1234_5678);
    assert_eq!(fe.entry(1).unwrap().address, 0x1234_5678_fee0_1000);
    fe.write_table(0x18, 8, 0xffff_fffe_0000_0045, &sink);
    assert_eq!(fe.entry(1).unwrap(), MsixEntry { address: 0x1234_5678_fee0_1000, data: 0x45, masked: false });
    assert_eq!(fe.read_table(0x1c, 4), 0, "only the mask bit of vector control is kept");
    let before = fe.stats().ignored_accesses;
    // Wrong sizes, misaligned, past the table.
    fe.write_table(0x10, 1, 0xff, &sink);
    fe.write_table(0x10, 2, 0xff, &sink);
    fe.write_table(0x12, 4, 0xff, &sink);
    fe.write_table(0x14, 8, 0xff, &sink);
    fe.write_table(0x40, 4, 0xff, &sink);
    fe.write_table(u64::MAX - 3, 4, 0xff, &sink);
    assert_eq!(fe.read_table(0x10, 3), 0);
    assert_eq!(fe.read_table(0x40, 8), 0);
    assert_eq!(fe.read_table(u64::MAX, 8), 0);
    assert_eq!(fe.read_pba(8, 8), 0, "past the PBA");
    assert_eq!(fe.read_pba(2, 4), 0, "misaligned");
    fe.write_pba(0, 8, u64::MAX);
    assert_eq!(fe.stats().ignored_accesses - before, 12);
    assert_eq!(fe.entry(1).unwrap().data, 0x45, "ignored writes changed nothing");
    assert!(fe.entry(4).is_none());
}

#[test]
fn pba_reports_hardware_pending_and_dword_halves() {
    let pool = ContextPool::<16>::new();
    let mut fe = MsixFrontEnd::<'_, FakeBackend, 128, 16>::new(&pool, FakeBackend::default(), 100, SLOTS);
    assert_eq!(fe.pba_bytes(), 16);
    fe.backend_mut().hardware_pending = 1 << 3 | 1 << 40;
    assert_eq!(fe.read_pba(0, 8), 1 << 3 | 1 << 40);
    assert_eq!(fe.read_pba(0, 4), 1 << 3);
    assert_eq!(fe.read_pba(4, 4), 1 << 8);
    assert_eq!(fe.read_pba(8, 8), 0);
    assert!(fe.is_pending(40));
    assert_eq!(fe.entry_stats(40).unwrap().pending, 1);
}

#[test]
fn table_size_is_clamped() {
    let pool = ContextPool::<16>::new();
    let fe = MsixFrontEnd::<'_, Software, 8, 16>::new(&pool, Software, 9, SLOTS);
    assert_eq!(fe.table_size(), 8);
    let fe = MsixFrontEnd::<'_, Software, 4096, 16>::new(&pool, Software, u16::MAX, SLOTS);
    assert_eq!(fe.table_size(), 2048);
    let fe = MsixFrontEnd::<'_, Software, 8, 16>::new(&pool, Software, 0, SLOTS);
    assert_eq!(fe.table_size(), 0);
    assert_eq!(fe.signal(0, &RecordingSink::new()), Signal::Spurious);
    assert_eq!(fe.stats().bad_index, 1);
}

#[test]
fn vcpu_moves_retarget_live_vectors() {
    let pool = ContextPool::<16>::new();
    let sink = RecordingSink::new();
    let mut fe = fe_with(&pool);
    fe.set_control(MsixControl { enabled: true, function_masked: false }, &sink);
    let (a, d) = msi::encode(GuestMsi { dest_apic: 1, vector: 0x44 });
    write_message(&mut fe, 0, a, d, &sink);
    set_mask(&mut fe, 0, false, &sink);
    let mut moved = SLOTS;
    moved[1] = Some(9);
    fe.set_vcpu_slots(moved, &sink);
    assert_eq!(fe.signal(0, &sink), Signal::Delivered);
    assert_eq!(sink.take_log(), [Target { slot: 9, vector: 0x44 }]);
    assert_eq!(fe.backend().live[&0].1, Target { slot: 9, vector: 0x44 });
    // The vCPU goes away: unbound.
    moved[1] = None;
    fe.set_vcpu_slots(moved, &sink);
    assert_eq!(fe.signal(0, &sink), Signal::Spurious);
    assert_eq!(fe.stats().unbound, 1);
}

#[test]
fn backend_retarget_failure_keeps_delivering_and_retries() {
    let pool = ContextPool::<16>::new();
    let sink = RecordingSink::new();
    let mut fe = fe_with(&pool);
    fe.set_control(MsixControl { enabled: true, function_masked: false }, &sink);
    let (a, d) = msi::encode(GuestMsi { dest_apic: 0, vector: 0x44 });
    write_message(&mut fe, 0, a, d, &sink);
    set_mask(&mut fe, 0, false, &sink);
    fe.backend_mut().fail_retarget = true;
    let (a, d) = msi::encode(GuestMsi { dest_apic: 1, vector: 0x45 });
    write_message(&mut fe, 0, a, d, &sink);
    assert_eq!(fe.stats().retarget_failures, 2, "one per write (address, then data)");
    assert_eq!(fe.signal(0, &sink), Signal::Delivered);
    assert_eq!(sink.take_log(), [target(1, 0x45)], "the context delivers to the new target anyway");
    assert_eq!(fe.backend().live[&0].1, target(0, 0x44), "the backend kept the old one");
    fe.backend_mut().fail_retarget = false;
    set_mask(&mut fe, 0, false, &sink);
    assert_eq!(fe.backend().live[&0].1, target(1, 0x45), "retried at the next change");
    assert_eq!(fe.stats().retargets, 1);
}

#[test]
fn pool_exhaustion_is_counted_and_recovers() {
    let pool = ContextPool::<1>::new();
    let sink = RecordingSink::new();
    let mut fe = MsixFrontEnd::<'_, FakeBackend, 4, 1>::new(&pool, FakeBackend::default(), 4, SLOTS);
    fe.set_control(MsixControl { enabled: true, function_masked: false }, &sink);
    for i in 0..2u16 {
        let (a, d) = msi::encode(GuestMsi { dest_apic: 0, vector: 0x40 + i as u8 });
        let base = u64::from(i) * 16;
        fe.write_table(base, 8, a, &sink);
        fe.write_table(base + 8, 8, u64::from(d), &sink);
    }
    assert!(fe.entry_context(0).is_some());
    assert!(fe.entry_context(1).is_none());
    assert_eq!(fe.stats().no_context, 1);
    assert_eq!(fe.signal(1, &sink), Signal::Spurious);
    fe.set_control(MsixControl { enabled: false, function_masked: false }, &sink);
    fe.set_control(MsixControl { enabled: true, function_masked: false }, &sink);
    assert!(fe.entry_context(0).is_some(), "the lowest entry wins again");
    fe.reset();
    assert_eq!(pool.in_use(), 0);
    assert_eq!(fe.entry(0).unwrap(), MsixEntry { address: 0, data: 0, masked: true });
}

#[test]
fn software_backend_emulated_interrupts() {
    static POOL: ContextPool<4> = ContextPool::new();
    let sink = RecordingSink::new();
    let mut fe = MsixFrontEnd::<'_, Software, 2, 4>::new(&POOL, Software, 2, SLOTS);
    fe.set_control(MsixControl { enabled: true, function_masked: false }, &sink);
    let (a, d) = msi::encode(GuestMsi { dest_apic: 2, vector: 0x70 });
    fe.write_table(0, 8, a, &sink);
    fe.write_table(8, 8, u64::from(d), &sink);
    assert_eq!(fe.signal(0, &sink), Signal::Delivered);
    assert_eq!(sink.take_log(), [target(2, 0x70)]);
    let st = fe.entry_stats(0).unwrap();
    assert_eq!((st.raised, st.delivered, st.pending), (1, 1, 0));
    drop(fe);
    assert_eq!(POOL.in_use(), 0);
}

#[test]
fn stats_survive_deactivation() {
    let pool = ContextPool::<16>::new();
    let sink = RecordingSink::new();
    let mut fe = fe_with(&pool);
    fe.set_control(MsixControl { enabled: true, function_masked: false }, &sink);
    let (a, d) = msi::encode(GuestMsi { dest_apic: 0, vector: 0x40 });
    write_message(&mut fe, 0, a, d, &sink);
    set_mask(&mut fe, 0, false, &sink);
    fe.signal(0, &sink);
    set_mask(&mut fe, 0, true, &sink);
    fe.signal(0, &sink);
    fe.set_control(MsixControl::default(), &sink);
    fe.signal(0, &sink);
    let s = fe.entry_counters(0).unwrap();
    assert_eq!(
        s,
        ContextStats {
            raised: 3,
            delivered: 1,
            pending_while_masked: 1,
            spurious: 1,
            dropped: 1,
            ..ContextStats::default()
        }
    );
}

// ---- property test: the front end against a model ----

const E: usize = 4;
/// A table size smaller than the array, so accesses past the table are exercised.
const TABLE: u16 = 3;

#[derive(Clone, Debug)]
enum Op {
    /// A raw table access (any offset/size/value).
    Write(u64, u8, u64),
    /// A well-formed message write: entry, vcpu (3 = unmapped), vector kind.
    Message(u16, u8, u8),
    MaskBit(u16, bool),
    Control(bool, bool),
    Signal(u16),
    FailActivate(u64),
    Slots(u8),
    Read(u64, u8),
    Pba(u64, u8),
}

fn op() -> impl Strategy<Value = Op> {
    let entry = 0u16..(TABLE + 1);
    prop_oneof![
        2 => (0u64..(u64::from(TABLE) * 16 + 24), prop::sample::select(vec![1u8, 2, 3, 4, 8]), any::<u64>())
            .prop_map(|(o, s, v)| Op::Write(o, s, v)),
        4 => (entry.clone(), 0u8..4, 0u8..4).prop_map(|(e, c, v)| Op::Message(e, c, v)),
        4 => (entry.clone(), any::<bool>()).prop_map(|(e, m)| Op::MaskBit(e, m)),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(e, f)| Op::Control(e, f)),
        6 => entry.clone().prop_map(Op::Signal),
        1 => (0u64..8).prop_map(Op::FailActivate),
        1 => (0u8..3).prop_map(Op::Slots),
        1 => (0u64..80, prop::sample::select(vec![1u8, 4, 8])).prop_map(|(o, s)| Op::Read(o, s)),
        1 => (0u64..24, prop::sample::select(vec![2u8, 4, 8])).prop_map(|(o, s)| Op::Pba(o, s)),
    ]
}

fn slots_variant(k: u8) -> VcpuSlots {
    let mut s = [None; MAX_VCPUS];
    match k {
        0 => s[..3].copy_from_slice(&[Some(4), Some(5), Some(6)]),
        1 => s[..3].copy_from_slice(&[Some(7), Some(5), None]),
        _ => s[0] = Some(1),
    }
    s
}

#[derive(Debug)]
struct Model {
    regs: [[u32; 4]; E],
    enabled: bool,
    fmask: bool,
    slots: VcpuSlots,
    live: [bool; E],
    pending: [bool; E],
    fail: u64,
    delivered: Vec<Target>,
    /// Signals per entry.
    signals: [u64; E],
}

impl Model {
    fn new() -> Self {
        Self {
            regs: [RESET_REGS; E],
            enabled: false,
            fmask: false,
            slots: slots_variant(0),
            live: [false; E],
            pending: [false; E],
            fail: 0,
            delivered: Vec::new(),
            signals: [0; E],
        }
    }

    fn target(&self, e: usize) -> Option<Target> {
        let r = self.regs[e];
        message_target(u64::from(r[1]) << 32 | u64::from(r[0]), r[2], &self.slots)
    }

    fn masked(&self, e: usize) -> bool {
        self.fmask || self.regs[e][3] & 1 != 0
    }

    fn sync(&mut self, e: usize) {
        if !self.enabled {
            self.live[e] = false;
            self.pending[e] = false;
            return;
        }
        let t = self.target(e);
        let masked = self.masked(e);
        if self.live[e] {
            match t {
                None => self.pending[e] = false,
                Some(t) => {
                    if !masked && self.pending[e] {
                        self.delivered.push(t);
                        self.pending[e] = false;
                    }
                }
            }
        } else if let (false, Some(t), false) = (masked, t, self.fail & 1 << e != 0) {
            self.live[e] = true;
            if self.pending[e] {
                self.delivered.push(t);
                self.pending[e] = false;
            }
        }
    }

    fn sync_all(&mut self) {
        for e in 0..usize::from(TABLE) {
            self.sync(e);
        }
    }

    fn signal(&mut self, e: usize) -> Signal {
        if e >= usize::from(TABLE) {
            return Signal::Spurious;
        }
        self.signals[e] += 1;
        if !self.enabled {
            return Signal::Spurious;
        }
        let masked = self.masked(e);
        match (self.live[e], self.target(e)) {
            (true, None) => Signal::Spurious,
            (true, Some(t)) if !masked => {
                self.delivered.push(t);
                Signal::Delivered
            }
            (false, _) if !masked => Signal::Spurious,
            _ => {
                if self.pending[e] {
                    Signal::Coalesced
                } else {
                    self.pending[e] = true;
                    Signal::PendingWhileMasked
                }
            }
        }
    }

    /// The register effect of a raw write; returns the entry touched.
    fn write(&mut self, offset: u64, size: u8, value: u64) -> Option<usize> {
        if !matches!(size, 4 | 8) || !offset.is_multiple_of(u64::from(size)) || offset / 16 >= u64::from(TABLE) {
            return None;
        }
        let e = (offset / 16) as usize;
        let d = (offset % 16 / 4) as usize;
        let words = if size == 8 { vec![value as u32, (value >> 32) as u32] } else { vec![value as u32] };
        for (k, w) in words.into_iter().enumerate() {
            self.regs[e][d + k] = if d + k == 3 { w & 1 } else { w };
        }
        Some(e)
    }
}

fn vector_of(kind: u8) -> u32 {
    match kind {
        0 => 0x40,
        1 => 0x41,
        2 => 0x05,           // reserved vector
        _ => 0x42 | 1 << 15, // level-triggered
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn matches_model(ops in proptest::collection::vec(op(), 0..80)) {
        let pool = ContextPool::<8>::new();
        let sink = RecordingSink::new();
        let mut fe = MsixFrontEnd::<'_, FakeBackend, E, 8>::new(&pool, FakeBackend::default(), TABLE, slots_variant(0));
        let mut m = Model::new();
        for op in ops {
            match op {
                Op::Write(o, s, v) => {
                    fe.write_table(o, s, v, &sink);
                    if let Some(e) = m.write(o, s, v) { m.sync(e); }
                }
                Op::Message(e, vcpu, kind) => {
                    let (a, _) = msi::encode(GuestMsi { dest_apic: vcpu, vector: 0x40 });
                    let base = u64::from(e) * 16;
                    for (off, size, v) in [(base, 8, a), (base + 8, 4, u64::from(vector_of(kind)))] {
                        fe.write_table(off, size, v, &sink);
                        if let Some(e) = m.write(off, size, v) { m.sync(e); }
                    }
                }
                Op::MaskBit(e, masked) => {
                    let off = u64::from(e) * 16 + 12;
                    fe.write_table(off, 4, u64::from(masked), &sink);
                    if let Some(e) = m.write(off, 4, u64::from(masked)) { m.sync(e); }
                }
                Op::Control(enabled, fmask) => {
                    fe.set_control(MsixControl { enabled, function_masked: fmask }, &sink);
                    if (enabled, fmask) != (m.enabled, m.fmask) {
                        m.enabled = enabled;
                        m.fmask = fmask;
                        m.sync_all();
                    }
                }
                Op::Signal(e) => {
                    let got = fe.signal(e, &sink);
                    prop_assert_eq!(got, m.signal(usize::from(e)));
                }
                Op::FailActivate(bits) => {
                    fe.backend_mut().fail_activate = bits;
                    m.fail = bits;
                }
                Op::Slots(k) => {
                    let s = slots_variant(k);
                    fe.set_vcpu_slots(s, &sink);
                    if s != m.slots {
                        m.slots = s;
                        m.sync_all();
                    }
                }
                Op::Read(o, s) => {
                    let got = fe.read_table(o, s);
                    if matches!(s, 4 | 8) && o.is_multiple_of(u64::from(s)) && o / 16 < u64::from(TABLE) {
                        let (e, d) = ((o / 16) as usize, (o % 16 / 4) as usize);
                        let want = if s == 8 {
                            u64::from(m.regs[e][d]) | u64::from(m.regs[e][d + 1]) << 32
                        } else {
                            u64::from(m.regs[e][d])
                        };
                        prop_assert_eq!(got, want);
                    } else {
                        prop_assert_eq!(got, 0);
                    }
                }
                Op::Pba(o, s) => {
                    let got = fe.read_pba(o, s);
                    if matches!(s, 4 | 8) && o.is_multiple_of(u64::from(s)) && o + u64::from(s) <= 8 {
                        let want = (0..usize::from(TABLE)).filter(|&e| m.pending[e]).fold(0u64, |a, e| a | 1 << e);
                        prop_assert_eq!(got, want >> (o * 8));
                    } else {
                        prop_assert_eq!(got, 0);
                    }
                }
            }
            prop_assert_eq!(sink.take_log(), core::mem::take(&mut m.delivered));
            let b = fe.backend();
            for e in 0..usize::from(TABLE) {
                let i = e as u16;
                prop_assert_eq!(fe.entry_context(i).is_some(), m.live[e], "entry {} live", e);
                prop_assert_eq!(b.live.contains_key(&i), m.live[e]);
                prop_assert_eq!(fe.is_pending(i), m.pending[e], "entry {} pending", e);
                let s = fe.entry_counters(i).unwrap();
                prop_assert_eq!(s.raised, m.signals[e], "entry {}: one outcome per signal", e);
                prop_assert_eq!(s.pending_while_masked, s.flushed + s.dropped + u64::from(m.pending[e]));
            }
            prop_assert_eq!(pool.in_use(), m.live.iter().filter(|&&l| l).count());
            prop_assert_eq!(b.activations, b.deactivations + b.live.len() as u64, "activations balance");
        }
        let stats = fe.stats();
        drop(fe);
        prop_assert_eq!(pool.in_use(), 0);
        prop_assert_eq!(stats.activations, stats.deactivations + m.live.iter().filter(|&&l| l).count() as u64);
    }
}
