//! The doorbell fast path (DESIGN.md "one picture": a guest doorbell write is a source whose
//! sinks are a device write and/or an emulated interrupt). On a nested page fault in the BAR
//! window the vCPU calls [`fast_write`] before any generic MMIO emulation: the guest-physical
//! address is resolved to (function, BAR, offset) through a per-partition directory of atomic
//! words, the table (`conduit_doorbell`) is looked up, and the device write goes straight to
//! the host BAR through a published window. No lock, no allocation, O(1): the directory walk is
//! bounded by `MAX_FUNCTIONS × 6` loads, the lookup by the table's probe window.
//!
//! The control side (registration, BAR moves, teardown) lives in `devices`, under the bus
//! lock, and keeps the directory current: a BAR's guest address is published while the guest
//! has memory decode on and the BAR placed in the window; the host windows are published at
//! attach. A fast path already past the directory when the guest turns decode off, moves the
//! BAR or removes the doorbell may still complete its device write just after that control
//! operation returned — the same window a not-yet-flushed nested TLB entry gives the guest's
//! own direct accesses; it only ever reaches the guest's own device, through its own BARs.

use super::MAX_PARTITIONS;
use super::devices::MAX_FUNCTIONS;
use super::irq::{POOL, VmmSink};
use crate::arch::mmio::{MmioWindow, WindowCell};
use conduit_doorbell::{Table, Width};
use conduit_irq::ContextId;
use core::sync::atomic::{AtomicU64, Ordering};

/// Slots of the doorbell table: room for `SLOTS / 2` doorbells across all partitions
/// (72 bytes a slot with its control word: about 2.3 MiB of `.bss`).
pub const SLOTS: usize = 32768;

/// Doorbells one partition may hold (an equal share of the table, so no partition can
/// starve the others; above one device's default limit of 1000).
pub const PARTITION_SHARE: u32 = (SLOTS / 2 / MAX_PARTITIONS) as u32;

/// Every partition's doorbells. Device ids are `partition * MAX_FUNCTIONS + function`.
pub static TABLE: Table<SLOTS> = Table::new();

const _: () = assert!(MAX_PARTITIONS * MAX_FUNCTIONS <= conduit_doorbell::MAX_DEVICES);

/// One BAR of one function, as the fast path sees it.
struct FastBar {
    /// Guest base << 32 | size (both below 4 GiB: the BAR window is), 0 when not decoded.
    guest: AtomicU64,
    /// The hypervisor's window onto the host BAR (for the device write).
    host: WindowCell,
}

impl FastBar {
    const fn new() -> Self {
        Self { guest: AtomicU64::new(0), host: WindowCell::new() }
    }
}

/// A partition's directory: its functions' BARs.
struct Directory {
    /// One more than the highest function slot ever published (the walk stops there).
    functions: core::sync::atomic::AtomicUsize,
    bars: [[FastBar; 6]; MAX_FUNCTIONS],
}

static DIRECTORY: [Directory; MAX_PARTITIONS] = [const {
    Directory {
        functions: core::sync::atomic::AtomicUsize::new(0),
        bars: [const { [const { FastBar::new() }; 6] }; MAX_FUNCTIONS],
    }
}; MAX_PARTITIONS];

/// Doorbell writes the fast path served so far.
static SERVED: AtomicU64 = AtomicU64::new(0);

/// Bumped by every change a remembered doorbell depends on (a doorbell added or removed, a
/// BAR published or withdrawn): a vCPU's [`Memo`] is used only while this is unchanged since
/// it was made.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Says that doorbells or the directory changed (control path, after the change).
pub fn changed() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
}

/// A vCPU's last doorbell: drivers ring the same few registers, so the directory walk and the
/// table lookup are done once per (address, width[, value]) until anything changes.
#[derive(Clone, Copy, Debug)]
pub struct Memo {
    generation: u64,
    gpa: u64,
    size: u8,
    hit: conduit_doorbell::Hit,
    /// The window of the action's write target, if it writes.
    window: Option<MmioWindow>,
}

/// The table's device id of function `function` of partition `partition`.
pub fn device_id(partition: usize, function: usize) -> Option<u16> {
    (partition < MAX_PARTITIONS && function < MAX_FUNCTIONS).then(|| (partition * MAX_FUNCTIONS + function) as u16)
}

fn bars_of(partition: usize, function: usize) -> Option<&'static [FastBar; 6]> {
    DIRECTORY.get(partition)?.bars.get(function)
}

/// Publishes the hypervisor's window onto host BAR `bar` of a function (at attach: host BARs
/// never move while the device is assigned, and the mapping is permanent).
pub fn publish_host(partition: usize, function: usize, bar: u8, host: Option<MmioWindow>) {
    if let Some(b) = bars_of(partition, function).and_then(|b| b.get(usize::from(bar))) {
        b.host.set(host);
    }
    changed();
}

/// Publishes where the guest decodes BAR `bar` of a function: at guest `gpa` with `size`
/// bytes, or not at all (`None`). Called under the partition's bus lock.
pub fn publish_guest(partition: usize, function: usize, bar: u8, guest: Option<(u64, u64)>) {
    let Some(b) = bars_of(partition, function).and_then(|b| b.get(usize::from(bar))) else { return };
    let word = match guest {
        Some((gpa, size)) if gpa >> 32 == 0 && size >> 32 == 0 && size != 0 => gpa << 32 | size,
        _ => 0,
    };
    b.guest.store(word, Ordering::Release);
    if word != 0
        && let Some(dir) = DIRECTORY.get(partition)
    {
        dir.functions.fetch_max(function + 1, Ordering::AcqRel);
    }
    changed();
}

/// Withdraws every guest BAR of a function (decode off, BARs moving): the fast path stops
/// finding them; the host windows stay.
pub fn clear_guest(partition: usize, function: usize) {
    if let Some(bars) = bars_of(partition, function) {
        for b in bars {
            b.guest.store(0, Ordering::Release);
        }
    }
    changed();
}

/// Forgets a function entirely (detached).
pub fn clear(partition: usize, function: usize) {
    if let Some(bars) = bars_of(partition, function) {
        for b in bars {
            b.guest.store(0, Ordering::Release);
            b.host.set(None);
        }
    }
    changed();
}

/// Forgets the whole partition's directory (teardown: its vCPUs have stopped).
pub fn reset(partition: usize) {
    if let Some(dir) = DIRECTORY.get(partition) {
        for f in 0..MAX_FUNCTIONS {
            clear(partition, f);
        }
        dir.functions.store(0, Ordering::Release);
    }
}

/// Where guest-physical `gpa` falls: (function, BAR, offset).
#[inline]
fn resolve(partition: usize, gpa: u64) -> Option<(usize, u8, u64)> {
    let dir = DIRECTORY.get(partition)?;
    let functions = dir.functions.load(Ordering::Acquire).min(MAX_FUNCTIONS);
    for (f, bars) in dir.bars.iter().take(functions).enumerate() {
        for (i, b) in bars.iter().enumerate() {
            let w = b.guest.load(Ordering::Acquire);
            if w == 0 {
                continue;
            }
            let (base, size) = (w >> 32, w & 0xffff_ffff);
            if gpa >= base && gpa - base < size {
                return Some((f, i as u8, gpa - base));
            }
        }
    }
    None
}

/// The fast path: a `size`-byte guest write of `value` at guest-physical `gpa` of partition
/// `partition`. True when a registered doorbell took it (its device write done, its event
/// raised); false sends the access down the generic path. Lock-free, allocation-free; `memo`
/// is the calling vCPU's last doorbell.
#[inline]
pub fn fast_write(partition: usize, gpa: u64, size: u8, value: u64, memo: &mut Option<Memo>) -> bool {
    let generation = GENERATION.load(Ordering::Acquire);
    if let Some(m) = memo
        && m.generation == generation
        && m.gpa == gpa
        && m.size == size
        && m.hit.value.is_none_or(|v| Width::from_bytes(size).is_some_and(|w| v == value & w.mask()))
    {
        if !ring(&m.hit, value, |_| m.window) {
            return false;
        }
        TABLE.record_hit(m.hit.id);
        SERVED.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    let Some(width) = Width::from_bytes(size) else { return false };
    let Some((function, bar, offset)) = resolve(partition, gpa) else { return false };
    let Some(device) = device_id(partition, function) else { return false };
    let Some(hit) = TABLE.lookup(device, bar, offset, width, value) else { return false };
    let bars = bars_of(partition, function);
    let window_of = |b: u8| bars.and_then(|bars| bars.get(usize::from(b))).and_then(|b| b.host.get());
    if !ring(&hit, value, window_of) {
        // The BAR's window is being republished: the generic path rings it under the lock.
        return false;
    }
    // Remembered with the generation read before the directory and the table were: any
    // change since makes it unused.
    *memo = Some(Memo { generation, gpa, size, hit, window: hit.action.write.and_then(|w| window_of(w.bar)) });
    SERVED.fetch_add(1, Ordering::Relaxed);
    true
}

/// Does what `hit` says for a guest write of `value`: the device write through the window of
/// its BAR (`window`), then the event. False (nothing done) when the write's window is not
/// available. Shared by the fast path and the generic path (which finds a doorbell the
/// directory did not, while BARs are being remapped).
#[inline]
pub fn ring(hit: &conduit_doorbell::Hit, value: u64, window: impl Fn(u8) -> Option<MmioWindow>) -> bool {
    if let Some(w) = hit.device_value(value) {
        let Some(win) = window(w.bar) else { return false };
        win.write(w.offset, w.width.bytes(), w.value);
    }
    if let Some(event) = hit.event()
        && let Ok(id) = u16::try_from(event)
    {
        POOL.signal(ContextId(id), &VmmSink::here());
    }
    true
}

/// Doorbell writes the fast path served so far.
pub fn served() -> u64 {
    SERVED.load(Ordering::Relaxed)
}
