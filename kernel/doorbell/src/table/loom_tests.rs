//! Loom models: lookups racing writers on an 8-slot table (4 doorbells, probe window 4).
//! Each side runs in its own `loom::thread::spawn`.

use super::*;
use crate::doorbell::{Bar, MsixLayout, Region};
use loom::sync::Arc;

type Tiny = Table<8>;

/// `loom::model` with a preemption bound (4 unless `LOOM_MAX_PREEMPTIONS` says otherwise;
/// `conduit-irq` uses 3; 4 still runs in seconds here).
fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(4);
    }
    b.check(f);
}

fn view() -> DeviceView {
    let mut bars = [None; BARS];
    bars[0] = Some(Bar { len: 0x1000, memory: true });
    bars[4] = Some(Bar { len: 0x1000, memory: true });
    let none = Region { bar: 7, offset: 0, len: 0 };
    DeviceView { bars, msix: Some(MsixLayout { table: none, pba: none }) }
}

/// A doorbell at `offset` whose action differs from every other `bell(..)`'s in every word
/// (write BAR, width, offset, value kind and value, event), so a torn copy cannot pass for
/// any registered action.
fn bell(offset: u64, n: u8) -> Doorbell {
    let k = u64::from(n);
    let write = if n % 2 == 0 {
        DeviceWrite { bar: 0, offset: 0x100 + 8 * k, width: Width::Qword, value: WriteValue::Fixed(0x1111 * (k + 1)) }
    } else {
        DeviceWrite { bar: 4, offset: 0x200 + 4 * k, width: Width::Dword, value: WriteValue::Forward }
    };
    Doorbell {
        device: 1,
        bar: 0,
        offset,
        width: Width::Dword,
        matches: Match::Value(5),
        action: Action { write: Some(write), event: Some(100 + u32::from(n)) },
    }
}

fn look(t: &Tiny, d: &Doorbell) -> Option<Action> {
    t.lookup(d.device, d.bar, d.offset, d.width, 5).map(|h| h.action)
}

/// The home slot of `d` in a `Tiny` table with seed 0 (computed outside the models: loom
/// atomics exist only inside one).
fn home(d: &Doorbell) -> usize {
    hash(0, &Key::of(d)) as usize & (8 - 1)
}

/// Doorbells (distinct offsets) whose keys share `first`'s home slot.
fn same_home(first: Doorbell, n: usize) -> Vec<Doorbell> {
    let mut out = vec![first];
    let mut offset = first.offset + 4;
    while out.len() < n {
        let d = Doorbell { offset, ..first };
        if home(&d) == home(&first) {
            out.push(d);
        }
        offset += 4;
    }
    out
}

/// (1) A lookup racing an add then a remove of its key sees nothing or exactly the
/// registered action, never a mix of the new words and the empty slot's.
#[test]
fn loom_lookup_races_add_then_remove() {
    model(|| {
        let t = Arc::new(Tiny::new());
        let a = bell(0x10, 0);
        let w = t.clone();
        let writer = loom::thread::spawn(move || {
            w.add(&a, &view()).unwrap();
            w.remove(a.device, a.bar, a.offset, a.width, a.matches).unwrap();
        });
        let r = t.clone();
        let reader = loom::thread::spawn(move || look(&r, &a));
        writer.join().unwrap();
        let seen = reader.join().unwrap();
        assert!(seen.is_none() || seen == Some(a.action), "{seen:?}");
        assert_eq!(look(&t, &a), None);
        assert_eq!(t.len(), 0);
    });
}

/// (2) Slot reuse: the writer removes A and adds B, which lands in A's slot (same home, and
/// A's slot is swept empty). A reader looking up A, then B, never gets B's action for A's
/// key or A's for B's: only nothing or the right one.
#[test]
fn loom_slot_reuse_never_mixes_entries() {
    let keys = same_home(bell(0x10, 0), 2);
    let (a, b) = (keys[0], Doorbell { action: bell(0, 1).action, ..keys[1] });
    model(move || {
        let t = Arc::new(Tiny::new());
        let a_id = t.add(&a, &view()).unwrap();
        let w = t.clone();
        let writer = loom::thread::spawn(move || {
            w.remove(a.device, a.bar, a.offset, a.width, a.matches).unwrap();
            w.add(&b, &view()).unwrap()
        });
        let r = t.clone();
        let reader = loom::thread::spawn(move || (look(&r, &a), look(&r, &b)));
        let b_id = writer.join().unwrap();
        let (seen_a, seen_b) = reader.join().unwrap();
        assert_eq!(b_id.slot(), a_id.slot(), "the arrangement: B reuses A's slot");
        assert!(seen_a.is_none() || seen_a == Some(a.action), "A's key: {seen_a:?}");
        assert!(seen_b.is_none() || seen_b == Some(b.action), "B's key: {seen_b:?}");
        assert_eq!((look(&t, &a), look(&t, &b)), (None, Some(b.action)));
    });
}

/// (3) Two writers add concurrently (keys sharing C's home, so they compete for the same
/// next slot) while a reader looks up C, registered before: C is always found, intact;
/// both adds land in distinct slots and are found afterwards.
#[test]
fn loom_two_writers_and_a_reader() {
    let keys = same_home(bell(0x10, 0), 3);
    let c = keys[0];
    let (a, b) = (Doorbell { action: bell(0, 1).action, ..keys[1] }, Doorbell { action: bell(0, 2).action, ..keys[2] });
    model(move || {
        let t = Arc::new(Tiny::new());
        t.add(&c, &view()).unwrap();
        let w1 = t.clone();
        let first = loom::thread::spawn(move || w1.add(&a, &view()).unwrap());
        let w2 = t.clone();
        let second = loom::thread::spawn(move || w2.add(&b, &view()).unwrap());
        let r = t.clone();
        let reader = loom::thread::spawn(move || look(&r, &c));
        let (ia, ib) = (first.join().unwrap(), second.join().unwrap());
        assert_eq!(reader.join().unwrap(), Some(c.action), "a doorbell registered throughout is always found");
        assert_ne!(ia.slot(), ib.slot());
        assert_eq!((look(&t, &a), look(&t, &b)), (Some(a.action), Some(b.action)));
        assert_eq!((t.len(), t.count(1)), (3, 3));
    });
}

/// (4) The sweep never empties a slot a live entry's path crosses: A and C share a home,
/// C lies behind A; removing A (tombstone, sweep) races a lookup of C, which must hit.
#[test]
fn loom_removal_keeps_a_colliding_key_reachable() {
    let keys = same_home(bell(0x10, 0), 2);
    let (a, c) = (keys[0], Doorbell { action: bell(0, 1).action, ..keys[1] });
    model(move || {
        let t = Arc::new(Tiny::new());
        t.add(&a, &view()).unwrap();
        t.add(&c, &view()).unwrap();
        let w = t.clone();
        let writer = loom::thread::spawn(move || w.remove(a.device, a.bar, a.offset, a.width, a.matches).unwrap());
        let r = t.clone();
        let reader = loom::thread::spawn(move || look(&r, &c));
        writer.join().unwrap();
        assert_eq!(reader.join().unwrap(), Some(c.action));
        assert_eq!(t.stats().tombstones, 1, "A's slot stays a tombstone while C's path crosses it");
    });
}

/// (5) The per-device kind counters that let a lookup skip a probe sequence never hide a
/// doorbell registered for the whole lookup: an any-value doorbell stays found while a
/// value-matched doorbell of the same device is added and removed, and the reverse.
#[test]
fn loom_kind_counters_never_hide_a_stable_doorbell() {
    model(|| {
        let t = Arc::new(Tiny::new());
        let stable_any = Doorbell { matches: Match::Any, ..bell(0x10, 1) };
        let stable_value = bell(0x20, 2);
        t.add(&stable_any, &view()).unwrap();
        t.add(&stable_value, &view()).unwrap();
        let w = t.clone();
        let writer = loom::thread::spawn(move || {
            let churn_value = bell(0x30, 3);
            let churn_any = Doorbell { matches: Match::Any, ..bell(0x40, 4) };
            w.add(&churn_value, &view()).unwrap();
            w.remove(churn_value.device, churn_value.bar, churn_value.offset, churn_value.width, churn_value.matches)
                .unwrap();
            w.add(&churn_any, &view()).unwrap();
            w.remove(churn_any.device, churn_any.bar, churn_any.offset, churn_any.width, Match::Any).unwrap();
        });
        assert_eq!(look(&t, &stable_any), Some(stable_any.action), "the any-value doorbell was hidden");
        assert_eq!(look(&t, &stable_value), Some(stable_value.action), "the value doorbell was hidden");
        writer.join().unwrap();
    });
}
