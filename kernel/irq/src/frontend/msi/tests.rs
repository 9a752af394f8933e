use super::*;
use crate::context::Target;
use crate::context::tests::RecordingSink;
use crate::frontend::fake::{Call, FakeBackend};
use crate::msi::{self, GuestMsi};

const SLOTS: VcpuSlots = [Some(4), Some(5), None, None, None, None, None, None];

fn t(slot: u8, vector: u8) -> Target {
    Target { slot, vector }
}

fn program(fe: &mut MsiFrontEnd<'_, FakeBackend, 64>, vcpu: u8, vector: u8, sink: &RecordingSink) {
    let (a, d) = msi::encode(GuestMsi { dest_apic: vcpu, vector });
    fe.set_address(a, sink);
    fe.set_data(d as u16, sink);
}

fn on(log2: u8) -> MsiControl {
    MsiControl { enabled: true, vectors_log2: log2 }
}

#[test]
fn enable_allocates_every_vector_data_plus_i() {
    let pool = ContextPool::<64>::new();
    let sink = RecordingSink::new();
    let mut fe = MsiFrontEnd::new(&pool, FakeBackend::default(), 3, false, SLOTS);
    assert_eq!(fe.capable(), 8);
    program(&mut fe, 1, 0x40, &sink);
    assert!(fe.backend().calls.is_empty(), "nothing while disabled");
    assert!(fe.set_control(on(2), &sink));
    assert_eq!(fe.enabled_count(), 4);
    assert_eq!(pool.in_use(), 4);
    for i in 0..4u32 {
        assert_eq!(fe.signal(i, &sink), Signal::Delivered);
    }
    assert_eq!(sink.take_log(), [t(5, 0x40), t(5, 0x41), t(5, 0x42), t(5, 0x43)]);
    assert_eq!(fe.signal(4, &sink), Signal::Spurious, "vector 4 is not enabled");
    assert_eq!(fe.signal(8, &sink), Signal::Spurious, "vector 8 does not exist");
    assert_eq!(fe.stats().bad_index, 1);
    // Retarget all with one data write.
    fe.set_data(0x50, &sink);
    assert_eq!(fe.signal(3, &sink), Signal::Delivered);
    assert_eq!(sink.take_log(), [t(5, 0x53)]);
    fe.set_control(MsiControl::default(), &sink);
    assert_eq!(pool.in_use(), 0);
    let b = fe.backend();
    assert_eq!((b.activations, b.deactivations), (4, 4));
}

#[test]
fn low_data_bits_are_replaced_not_added() {
    let pool = ContextPool::<64>::new();
    let sink = RecordingSink::new();
    let mut fe = MsiFrontEnd::new(&pool, FakeBackend::default(), 2, false, SLOTS);
    program(&mut fe, 0, 0x41, &sink);
    fe.set_control(on(1), &sink);
    fe.signal(0, &sink);
    fe.signal(1, &sink);
    assert_eq!(sink.take_log(), [t(4, 0x40), t(4, 0x41)]);
}

#[test]
fn noresize_refuses_a_count_change_while_enabled() {
    let pool = ContextPool::<64>::new();
    let sink = RecordingSink::new();
    let mut fe = MsiFrontEnd::new(&pool, FakeBackend::default(), 5, false, SLOTS);
    program(&mut fe, 0, 0x40, &sink);
    fe.set_control(on(1), &sink);
    fe.backend_mut().take_calls();
    assert!(!fe.set_control(on(3), &sink), "refused");
    assert_eq!(fe.enabled_count(), 2, "the live count stays");
    assert!(fe.backend().calls.is_empty(), "no vector touched");
    assert_eq!(fe.stats().refused_writes, 1);
    assert!(fe.set_control(MsiControl { enabled: false, vectors_log2: 3 }, &sink), "MSI off");
    assert!(fe.set_control(on(3), &sink), "resizing with MSI off is fine");
    assert_eq!(fe.enabled_count(), 8);
    assert_eq!(pool.in_use(), 8);
    assert!(!fe.set_control(on(7), &sink), "above the capability: clamped and counted");
    assert_eq!(fe.enabled_count(), 8, "still enabled, NORESIZE keeps 8");
}

#[test]
fn above_capability_is_clamped() {
    let pool = ContextPool::<64>::new();
    let sink = RecordingSink::new();
    let mut fe = MsiFrontEnd::new(&pool, FakeBackend::default(), 1, false, SLOTS);
    program(&mut fe, 0, 0x40, &sink);
    assert!(!fe.set_control(on(5), &sink));
    assert_eq!(fe.enabled_count(), 2);
    let mut fe = MsiFrontEnd::new(&pool, FakeBackend::default(), 200, false, SLOTS);
    assert_eq!(fe.capable(), 32);
    assert!(fe.set_control(on(5), &sink));
    assert_eq!(fe.enabled_count(), 32);
}

#[test]
fn per_vector_masking() {
    let pool = ContextPool::<64>::new();
    let sink = RecordingSink::new();
    let mut fe = MsiFrontEnd::new(&pool, FakeBackend::default(), 2, true, SLOTS);
    program(&mut fe, 0, 0x40, &sink);
    fe.set_mask(0b10, &sink);
    fe.set_control(on(2), &sink);
    assert_eq!(pool.in_use(), 4, "MSI activates masked vectors too");
    assert_eq!(fe.signal(1, &sink), Signal::PendingWhileMasked);
    assert_eq!(fe.signal(1, &sink), Signal::Coalesced);
    assert_eq!(fe.pending_bits(), 0b10);
    assert!(sink.take_log().is_empty());
    fe.set_mask(0, &sink);
    assert_eq!(sink.take_log(), [t(4, 0x41)], "delivered once on unmask");
    assert_eq!(fe.pending_bits(), 0);
    let st = fe.vector_stats(1).unwrap();
    assert_eq!((st.raised, st.pending_while_masked, st.coalesced, st.delivered, st.pending), (2, 1, 1, 1, 0));
}

#[test]
fn mask_bits_without_per_vector_masking_are_refused() {
    let pool = ContextPool::<64>::new();
    let sink = RecordingSink::new();
    let mut fe = MsiFrontEnd::new(&pool, FakeBackend::default(), 0, false, SLOTS);
    program(&mut fe, 0, 0x40, &sink);
    fe.set_control(on(0), &sink);
    fe.set_mask(1, &sink);
    assert_eq!(fe.stats().refused_writes, 1);
    assert_eq!(fe.signal(0, &sink), Signal::Delivered);
}

#[test]
fn enabled_before_programmed_activates_when_deliverable() {
    let pool = ContextPool::<64>::new();
    let sink = RecordingSink::new();
    let mut fe = MsiFrontEnd::new(&pool, FakeBackend::default(), 0, true, SLOTS);
    fe.set_mask(1, &sink);
    fe.set_control(on(0), &sink);
    assert_eq!(pool.in_use(), 0, "zero message: undeliverable");
    assert_eq!(fe.signal(0, &sink), Signal::PendingWhileMasked, "latched (masked, enabled)");
    program(&mut fe, 1, 0x60, &sink);
    assert_eq!(pool.in_use(), 1);
    assert_eq!(fe.pending_bits(), 1, "the latched bit moved into the context");
    fe.set_mask(0, &sink);
    assert_eq!(sink.take_log(), [t(5, 0x60)]);
    let s = fe.vector_counters(0).unwrap();
    assert_eq!(s.pending_while_masked, s.flushed + s.dropped);
}

#[test]
fn activation_failure_frees_only_its_own_context() {
    let pool = ContextPool::<64>::new();
    let sink = RecordingSink::new();
    let mut fe = MsiFrontEnd::new(&pool, FakeBackend::default(), 2, false, SLOTS);
    program(&mut fe, 0, 0x40, &sink);
    fe.backend_mut().fail_activate = 0b100;
    fe.set_control(on(2), &sink);
    assert_eq!(pool.in_use(), 3);
    assert_eq!(fe.stats().activation_failures, 1);
    assert!(fe.vector_context(2).is_none());
    assert!(fe.backend().calls.contains(&Call::Activate(2, ContextId(2), t(4, 0x42))));
    assert_eq!(fe.signal(2, &sink), Signal::Spurious);
    assert_eq!(fe.signal(3, &sink), Signal::Delivered);
    fe.reset();
    assert_eq!(pool.in_use(), 0);
    assert_eq!(fe.control(), MsiControl::default());
}
