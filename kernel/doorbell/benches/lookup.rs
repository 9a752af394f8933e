//! The doorbell fast path (`Table::lookup`), measured on the kernel's table size
//! (`DoorbellTable`: 2^17 slots, 65536 doorbells, a `static`), as it fills:
//! - `lookup_value/hit/{1,1000,65536}`: a hit on a `Match::Value` doorbell (first probe
//!   sequence), with 1, 1000 and 65536 doorbells registered;
//! - `lookup_any/hit/{1,1000,65536}`: a hit on a `Match::Any` doorbell (the exact-value probe
//!   misses first, then the any-value probe hits): the most expensive hit;
//! - `lookup_value/miss/65536`, `lookup_any/miss/65536`: a write no doorbell matches (both
//!   probe sequences miss), table full;
//! - `lookup_value/hit_one_key/65536`: one doorbell looked up again and again in the full
//!   table (against `hit/1`: the table's size by itself costs nothing);
//! - `lookup_value/hit_all_keys/65536`: hits cycling through all 65536 doorbells in a
//!   scattered order, so most slots come from L2/L3 or memory rather than L1: the cache-miss
//!   cost the other benches leave out on purpose.
//!
//! The hit and miss benches cycle through up to 64 doorbells spread over the whole table
//! (every n/64-th), so the average probe length at that fill level is what is measured while
//! the lines stay in L1: what grows with the fill level is the algorithm's cost, not the
//! cache's. (At n = 1 there is one doorbell to cycle through.) Doorbells are spread over all
//! 256 device slots (256 each at 65536, under the default limit of 1000).
//! Run: `cargo bench -p conduit-doorbell`.

use conduit_doorbell::{
    Action, Bar, DeviceView, DeviceWrite, Doorbell, DoorbellTable, MAX_DEVICES, Match, Table, Width, WriteValue,
};
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, criterion_group, criterion_main, measurement::WallTime};
use std::hint::black_box;
use std::time::Duration;

static VALUE_TABLE: DoorbellTable = Table::new();
static ANY_TABLE: DoorbellTable = Table::new();

/// Fill levels measured.
const LEVELS: [usize; 3] = [1, 1000, DoorbellTable::CAPACITY];
/// Doorbells the hit and miss benches cycle through (at most; a power of two).
const CYCLE: usize = 64;

fn view() -> DeviceView {
    let mut bars = [None; 6];
    bars[0] = Some(Bar { len: 1 << 20, memory: true });
    DeviceView { bars, msix: None }
}

/// Doorbell `i`: device `i % 256`, a dword at offset `(i / 256) * 4` of BAR 0; a value match
/// (value depends on `i`) or an any match; forwards the write to another register and
/// signals an event.
fn bell(i: usize, any: bool) -> Doorbell {
    let device = (i % MAX_DEVICES) as u16;
    let offset = (i / MAX_DEVICES) as u64 * 4;
    let matches = if any { Match::Any } else { Match::Value((i as u64).wrapping_mul(0x9e37_79b9) & 0xffff_ffff) };
    let write = DeviceWrite { bar: 0, offset: 0x8_0000 + offset, width: Width::Dword, value: WriteValue::Forward };
    Doorbell {
        device,
        bar: 0,
        offset,
        width: Width::Dword,
        matches,
        action: Action { write: Some(write), event: Some(i as u32) },
    }
}

/// The lookup arguments that ring `d`.
fn ring(d: &Doorbell) -> (u16, u8, u64, Width, u64) {
    let written = match d.matches {
        Match::Value(v) => v,
        Match::Any => 0x1234,
    };
    (d.device, d.bar, d.offset, d.width, written)
}

fn fill(table: &DoorbellTable, from: usize, to: usize, any: bool) {
    for i in from..to {
        table.add(&bell(i, any), &view()).unwrap_or_else(|e| panic!("doorbell {i}: {e}"));
    }
}

/// Benches `lookup` over `keys` (a power-of-two count), in turn.
fn bench_keys(
    g: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    table: &DoorbellTable,
    keys: &[(u16, u8, u64, Width, u64)],
) {
    let mut i = 0usize;
    g.bench_function(id, |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let (device, bar, offset, width, written) = black_box(keys[i & (keys.len() - 1)]);
            black_box(table.lookup(device, bar, offset, width, written))
        })
    });
}

fn lookup_benches(c: &mut Criterion, name: &str, table: &'static DoorbellTable, any: bool) {
    table.set_hash_seed(0x0123_4567_89ab_cdef);
    let mut g = c.benchmark_group(name);
    let mut filled = 0;
    for n in LEVELS {
        fill(table, filled, n, any);
        filled = n;
        let m = n.min(CYCLE);
        let keys: Vec<_> = (0..m).map(|k| ring(&bell(k * n / m, any))).collect();
        assert!(keys.iter().all(|&(d, b, o, w, v)| table.lookup(d, b, o, w, v).is_some()), "every key hits");
        bench_keys(&mut g, BenchmarkId::new("hit", n), table, &keys);
    }
    // Misses (both probe sequences miss): in the value table, registered addresses written
    // with a value no doorbell matches; in the any table, addresses with no doorbell.
    let misses: Vec<_> = (0..CYCLE)
        .map(|k| {
            let (device, bar, offset, width, written) = ring(&bell(k * filled / CYCLE, any));
            if any {
                (device, bar, offset + 0x4_0000, width, written)
            } else {
                (device, bar, offset, width, !written & 0xffff_ffff)
            }
        })
        .collect();
    assert!(misses.iter().all(|&(d, b, o, w, v)| table.lookup(d, b, o, w, v).is_none()), "every miss misses");
    bench_keys(&mut g, BenchmarkId::new("miss", filled), table, &misses);
    if !any {
        let one = [ring(&bell(filled / 2, any))];
        bench_keys(&mut g, BenchmarkId::new("hit_one_key", filled), table, &one);
        // All doorbells, in a scattered order (a stride coprime with 65536).
        let all: Vec<_> = (0..filled).map(|k| ring(&bell(k.wrapping_mul(40503) % filled, any))).collect();
        bench_keys(&mut g, BenchmarkId::new("hit_all_keys", filled), table, &all);
    }
    g.finish();
}

fn value_benches(c: &mut Criterion) {
    lookup_benches(c, "lookup_value", &VALUE_TABLE, false);
}

fn any_benches(c: &mut Criterion) {
    lookup_benches(c, "lookup_any", &ANY_TABLE, true);
}

fn config() -> Criterion {
    Criterion::default().sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = value_benches, any_benches
}
criterion_main!(benches);
