//! The interrupt delivery path (host vector → context → sink), measured:
//! - `route/alone`: one CPU, nothing else running;
//! - `route/with_writer`: the same while another CPU continuously reconfigures the same
//!   contexts (mask, unmask, retarget);
//! - `spin_table/alone`, `spin_table/with_writer`: the same work through a `spin::Mutex`-
//!   protected table, for comparison;
//! - `live_vectors/1`, `live_vectors/2048`: delivery cost with 1 and with 2048 live vectors
//!   (spread over 12 CPUs' host vector tables), which should be flat.
//!
//! The sink is the real per-vCPU pending bitmap (`conduit_vm::pending::PendingVectors`).
//! Run: `cargo bench -p conduit-irq`.

use conduit_irq::vectors::{DEVICE_FIRST, DEVICE_LAST};
use conduit_irq::{ContextPool, HostVectorTable, MaskState, Sink, Target, route};
use conduit_vm::pending::PendingVectors;
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Slots (physical CPUs) in the benches.
const SLOTS: usize = 2;

/// One pending bitmap per slot.
struct Cpus([PendingVectors; SLOTS]);

impl Cpus {
    fn new() -> Self {
        Self([PendingVectors::new(), PendingVectors::new()])
    }
}

impl Sink for Cpus {
    fn deliver(&self, t: Target) -> bool {
        self.0.get(usize::from(t.slot)).and_then(|p| p.raise(t.vector)) == Some(true)
    }
}

/// Contexts and vectors the concurrent benches share.
const SHARED: usize = 8;

fn target(i: usize, flip: bool) -> Target {
    Target { slot: u8::from(flip) ^ (i % SLOTS) as u8, vector: 0x40 + (i % 0xa0) as u8 }
}

/// A pool, a table and `n` live contexts mapped to host vectors.
fn setup(n: usize) -> (&'static ContextPool<2048>, &'static HostVectorTable, Vec<u8>) {
    let pool: &'static ContextPool<2048> = Box::leak(Box::new(ContextPool::new()));
    let table: &'static HostVectorTable = Box::leak(Box::new(HostVectorTable::new()));
    let mut vectors = Vec::new();
    for i in 0..n {
        let id = pool.alloc().expect("pool");
        pool.get(id).expect("context").enable(target(i, false), MaskState::Unmasked);
        vectors.push(table.allocate(id).expect("vector"));
    }
    (pool, table, vectors)
}

/// Runs `f` while a second thread reconfigures the contexts behind `vectors` in a loop.
fn with_writer(pool: &ContextPool<2048>, table: &HostVectorTable, sink: &Cpus, vectors: &[u8], f: impl FnOnce()) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut flip = false;
            while !stop.load(Ordering::Relaxed) {
                flip = !flip;
                for (i, &v) in vectors.iter().enumerate() {
                    let Some(c) = table.lookup(v).and_then(|id| pool.get(id)) else { continue };
                    c.mask();
                    c.unmask(sink);
                    c.retarget(target(i, flip));
                }
            }
        });
        f();
        stop.store(true, Ordering::Relaxed);
    });
}

fn route_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    let (pool, table, vectors) = setup(SHARED);
    let sink = Cpus::new();
    let mut i = 0usize;
    g.bench_function("alone", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            route(table, pool, black_box(vectors[i % SHARED]), &sink)
        })
    });
    with_writer(pool, table, &sink, &vectors, || {
        g.bench_function("with_writer", |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                route(table, pool, black_box(vectors[i % SHARED]), &sink)
            })
        });
    });
    g.finish();
}

/// The same routing state behind one spin lock.
#[derive(Clone, Copy, Default)]
struct LockedEntry {
    live: bool,
    target: Target,
    masked: bool,
    pending: bool,
}

struct LockedTable {
    entries: spin::Mutex<[LockedEntry; 256]>,
}

impl LockedTable {
    fn signal(&self, vector: u8, sink: &Cpus) -> Option<bool> {
        let mut t = self.entries.lock();
        let e = t.get_mut(usize::from(vector))?;
        if !e.live {
            return None;
        }
        if e.masked {
            e.pending = true;
            return Some(false);
        }
        Some(sink.deliver(e.target))
    }

    fn reconfigure(&self, vector: u8, i: usize, flip: bool, sink: &Cpus) {
        if let Some(e) = self.entries.lock().get_mut(usize::from(vector)) {
            e.masked = true;
        }
        if let Some(e) = self.entries.lock().get_mut(usize::from(vector)) {
            e.masked = false;
            if std::mem::take(&mut e.pending) {
                sink.deliver(e.target);
            }
        }
        if let Some(e) = self.entries.lock().get_mut(usize::from(vector)) {
            e.target = target(i, flip);
        }
    }
}

fn spin_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("spin_table");
    let table = LockedTable { entries: spin::Mutex::new([LockedEntry::default(); 256]) };
    let vectors: Vec<u8> = (0..SHARED).map(|i| DEVICE_FIRST + i as u8).collect();
    for (i, &v) in vectors.iter().enumerate() {
        table.entries.lock()[usize::from(v)] =
            LockedEntry { live: true, target: target(i, false), ..LockedEntry::default() };
    }
    let sink = Cpus::new();
    let mut i = 0usize;
    g.bench_function("alone", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            table.signal(black_box(vectors[i % SHARED]), &sink)
        })
    });
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut flip = false;
            while !stop.load(Ordering::Relaxed) {
                flip = !flip;
                for (i, &v) in vectors.iter().enumerate() {
                    table.reconfigure(v, i, flip, &sink);
                }
            }
        });
        g.bench_function("with_writer", |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                table.signal(black_box(vectors[i % SHARED]), &sink)
            })
        });
        stop.store(true, Ordering::Relaxed);
    });
    g.finish();
}

/// 2048 live vectors over 12 CPUs' tables (176 device vectors each), visited in turn.
fn live_vector_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("live_vectors");
    let per_cpu = usize::from(DEVICE_LAST - DEVICE_FIRST) + 1;
    for live in [1usize, 2048] {
        let pool: &'static ContextPool<2048> = Box::leak(Box::new(ContextPool::new()));
        let tables: Vec<HostVectorTable> = (0..live.div_ceil(per_cpu)).map(|_| HostVectorTable::new()).collect();
        let mut routes = Vec::new();
        for i in 0..live {
            let id = pool.alloc().expect("pool");
            pool.get(id).expect("context").enable(target(i, false), MaskState::Unmasked);
            let cpu = i / per_cpu;
            routes.push((cpu, tables[cpu].allocate(id).expect("vector")));
        }
        let sink = Cpus::new();
        let mut i = 0usize;
        g.bench_function(live.to_string(), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let (cpu, v) = routes[i % live];
                route(&tables[cpu], pool, black_box(v), &sink)
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default().sample_size(50).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = route_benches, spin_benches, live_vector_benches
}
criterion_main!(benches);
