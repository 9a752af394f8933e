//! The doorbell table: registrations keyed by (device, BAR, offset, width, match), a
//! lock-free, allocation-free, bounded [`Table::lookup`] for the nested-page-fault exit, and
//! writers ([`Table::add`], [`Table::remove`], [`Table::remove_device`]) serialised by a tiny
//! internal lock that readers never take.
//!
//! # Layout
//!
//! An open-addressing hash table of `SLOTS` slots (a power of two), linear probing, at most
//! `SLOTS / 2` live entries (load ≤ 50%, so a miss stops at an empty slot after ~2.5 slots on
//! average). Two parallel arrays:
//! - the control words, one `u64` per slot, eight per cache line: the slot's state (empty,
//!   live, tombstone, busy), 24 bits of its key's hash (the fingerprint) and a generation.
//!   A probe walks these: a slot whose state or fingerprint differs is skipped without
//!   touching its data, so the extra slots a probe crosses at 50% load mostly cost a compare
//!   in a cache line already loaded;
//! - the slots, one 64-byte cache line each: the key (`meta`, offset, match value), the action
//!   (`meta` again, write offset, fixed value), and two words only writers and statistics
//!   touch (the per-device list links, the hit counter). A hit reads one slot.
//!
//! The key's match value is part of the hash: each `Match::Value` entry has its own home slot,
//! each `Match::Any` entry hashes with the value left out. A lookup is therefore at most two
//! probe sequences: the exact (value) key, then the any-value key. (Registration forbids an
//! any-value and a value entry at the same address, so at most one of them can hit.)
//!
//! # Probe bound, tombstones
//!
//! Every entry lies within [`Table::PROBE_WINDOW`] slots of its home ([`PROBE_LIMIT`] = 64,
//! or `SLOTS / 2` for tiny tables), so a lookup reads at most `2 × PROBE_WINDOW` slots,
//! whatever happens — it is wait-free with a hard bound. An insert that finds no free slot in
//! its window fails with `TableFull`; below capacity that needs a 64-slot run of live entries
//! at load ≤ 50%, which a secret hash seed makes vanishingly rare (measured: the largest
//! displacement after filling 65536 entries into 131072 slots is 20–35).
//!
//! Removal leaves a tombstone (lookups must probe past it). Two rules keep add/remove churn
//! from clogging the table with them:
//! - an insert reuses the first tombstone (or empty slot) of its window;
//! - after a removal, every tombstone in the removed entry's probe path that no remaining
//!   live entry's path crosses is turned back into an empty slot (the sweep). So a tombstone
//!   only ever lies on the path of some live entry: the non-empty slots are exactly the
//!   union of the live entries' paths, and a miss stops at the end of that union.
//!
//! Measured at full load (2047 doorbells in 4096 slots) over 100k–2M add/remove pairs: the
//! table settles at ~15% tombstones, a miss reads ~5 control words (2.5 freshly filled), a
//! hit ~2.3 (1.4 fresh), the largest displacement stays 17–35. Without the sweep, every miss
//! reads the whole 64-word window within 10k pairs. The remaining drift (entries stay where they were
//! put, even when an earlier slot frees up) is the price of never moving an entry.
//!
//! Entries never move once inserted (no backward-shift deletion, no rehash), and the sweep
//! never empties a slot on a live entry's path, so a reader never misses an entry that stays
//! registered for the whole lookup, whatever writers do meanwhile.
//!
//! # Reader consistency: a seqlock per slot over atomic words
//!
//! The slot's control word is its sequence word: `generation << 26 | fingerprint << 2 |
//! state`; every transition bumps the generation (38 bits: a slot would need 2^38 changes
//! during one lookup to fool a reader). A writer filling a slot stores `busy`, then the key
//! and action words (release), then `live` with the fingerprint (release). A reader loads the
//! control word (acquire), skips the slot unless it is live with the right fingerprint, loads
//! the key and action words (acquire), compares the whole key, and loads the control word
//! again: unchanged means the words are one consistent registration that was live at the
//! first load; changed means the slot was removed or reused meanwhile and the reader ignores
//! it. The acquire loads of the data words are what keep the second control-word load after
//! them (and make a newer data value imply a newer control word) without fences; on x86 every
//! load is an acquire and every store a release anyway, so they cost nothing. All of it is
//! `AtomicU64`s: no unsafe, no torn words.
//!
//! # Counting, limits
//!
//! Per-device counts live in an array of [`MAX_DEVICES`] entries, with the head of a doubly
//! linked list (through the slots) of that device's entries: the any-value duplicate check and
//! [`Table::remove_device`] walk only that device's entries. All writer-side bookkeeping is
//! guarded by the writer lock.

use crate::doorbell::{Action, BARS, DeviceView, DeviceWrite, Doorbell, Match, ResolvedWrite, Width, WriteValue};
use crate::error::{Error, RangeFault, Reason};
use crate::sync::{self, AtomicBool, AtomicU64, Ordering};
use crate::validate;
use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU64 as PlainU64, Ordering as PlainOrdering};

/// Device slots the table counts doorbells for: a [`Doorbell::device`] must be below this.
pub const MAX_DEVICES: usize = 256;

/// Doorbells one device may have unless configured otherwise (VFIO's
/// `VFIO_PCI_IOEVENTFD_MAX`).
pub const DEFAULT_DEVICE_LIMIT: u32 = 1000;

/// The most slots a lookup examines per probe sequence (and how far from its home an entry
/// may be placed), for tables of at least `2 × PROBE_LIMIT` slots.
pub const PROBE_LIMIT: usize = 64;

/// Slots of [`DoorbellTable`]: 2^17, for 65536 doorbells.
pub const DEFAULT_SLOTS: usize = 1 << 17;

/// The table size the kernel is expected to use: 65536 doorbells, 9 MiB (72 bytes per slot:
/// a control word and a 64-byte slot; all zero initially, so a `static` of it lands in
/// `.bss`).
pub type DoorbellTable = Table<DEFAULT_SLOTS>;

// The control word: generation << 26 | fingerprint << 2 | state.
const STATE_MASK: u64 = 3;
const EMPTY: u64 = 0;
const LIVE: u64 = 1;
const TOMBSTONE: u64 = 2;
const BUSY: u64 = 3;
const FINGERPRINT_SHIFT: u32 = 2;
const FINGERPRINT_BITS: u32 = 24;
const GENERATION_SHIFT: u32 = FINGERPRINT_SHIFT + FINGERPRINT_BITS;
/// State and fingerprint: what a probe compares.
const TAG_MASK: u64 = (1 << GENERATION_SHIFT) - 1;

/// The fingerprint of a key with hash `h`: its top 24 bits (the slot index uses the low
/// bits; tables have at most 2^31 slots, so the two never overlap).
const fn fingerprint(h: u64) -> u64 {
    h >> (64 - FINGERPRINT_BITS)
}

/// The tag (state and fingerprint) a live slot holding a key with hash `h` has.
const fn live_tag(h: u64) -> u64 {
    fingerprint(h) << FINGERPRINT_SHIFT | LIVE
}

/// The control word after a transition to `tag` (a state, with a fingerprint for `LIVE`):
/// next generation.
const fn bump(control: u64, tag: u64) -> u64 {
    ((control >> GENERATION_SHIFT).wrapping_add(1) << GENERATION_SHIFT) | tag
}

// The meta word: key bits, then action bits.
const DEVICE_SHIFT: u32 = 0;
const BAR_SHIFT: u32 = 16;
const WIDTH_SHIFT: u32 = 19;
const ANY: u64 = 1 << 21;
/// The bits of `meta` that are part of the key (device, BAR, width, any).
const KEY_META: u64 = (1 << 22) - 1;
/// The key bits that name the address (device, BAR, width): `KEY_META` without `ANY`.
const ADDRESS_META: u64 = KEY_META & !ANY;
const HAS_WRITE: u64 = 1 << 22;
const WRITE_BAR_SHIFT: u32 = 23;
const WRITE_WIDTH_SHIFT: u32 = 26;
const FORWARD: u64 = 1 << 28;
const HAS_EVENT: u64 = 1 << 29;
const EVENT_SHIFT: u32 = 32;

/// "No slot" in the writer-only links (slot indices are stored plus one, so zero is none and
/// a fresh table is all zero bytes).
const NONE: u32 = 0;

/// The key of a registration, as stored: `meta` holds only key bits here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    meta: u64,
    offset: u64,
    /// The match value; 0 for any-value keys.
    value: u64,
}

impl Key {
    /// `value`: `Some(v)` for a value match, `None` for any value. `bar` must be below 8
    /// (three bits; callers check `< BARS` first).
    const fn new(device: u16, bar: u8, offset: u64, width: Width, value: Option<u64>) -> Self {
        let meta =
            (device as u64) << DEVICE_SHIFT | (bar as u64 & 7) << BAR_SHIFT | (width.log2() as u64) << WIDTH_SHIFT;
        match value {
            Some(value) => Self { meta, offset, value },
            None => Self { meta: meta | ANY, offset, value: 0 },
        }
    }

    const fn of(doorbell: &Doorbell) -> Self {
        let value = match doorbell.matches {
            Match::Any => None,
            Match::Value(v) => Some(v),
        };
        Self::new(doorbell.device, doorbell.bar, doorbell.offset, doorbell.width, value)
    }

    /// The any-value key at the same address.
    const fn any(self) -> Self {
        Self { meta: self.meta | ANY, offset: self.offset, value: 0 }
    }
}

const fn action_meta(action: &Action) -> u64 {
    let mut meta = 0;
    if let Some(w) = &action.write {
        meta |= HAS_WRITE | (w.bar as u64 & 7) << WRITE_BAR_SHIFT | (w.width.log2() as u64) << WRITE_WIDTH_SHIFT;
        if let WriteValue::Forward = w.value {
            meta |= FORWARD;
        }
    }
    if let Some(event) = action.event {
        meta |= HAS_EVENT | (event as u64) << EVENT_SHIFT;
    }
    meta
}

const fn decode_action(meta: u64, write_offset: u64, write_value: u64) -> Action {
    let write = if meta & HAS_WRITE != 0 {
        Some(DeviceWrite {
            bar: ((meta >> WRITE_BAR_SHIFT) & 7) as u8,
            offset: write_offset,
            width: Width::from_log2(meta >> WRITE_WIDTH_SHIFT),
            value: if meta & FORWARD != 0 { WriteValue::Forward } else { WriteValue::Fixed(write_value) },
        })
    } else {
        None
    };
    let event = if meta & HAS_EVENT != 0 { Some((meta >> EVENT_SHIFT) as u32) } else { None };
    Action { write, event }
}

/// The upper half of the 128-bit product, folded onto the lower (the wyhash mixer).
const fn fold(a: u64, b: u64) -> u64 {
    let p = a as u128 * b as u128;
    p as u64 ^ (p >> 64) as u64
}

/// Keyed hash of a key. Not cryptographic: the seed keeps guests from aiming collisions at
/// a probe window they cannot see; lookups stay bounded by the window even if they could.
/// Offset and value are each multiplied by an odd constant (after the seed), so no chosen
/// value zeroes the mix.
const fn hash(seed: u64, key: &Key) -> u64 {
    const K0: u64 = 0x243f_6a88_85a3_08d3;
    const K1: u64 = 0x1319_8a2e_0370_7345;
    const K2: u64 = 0xa409_3822_299f_31d1;
    let a = fold(key.offset ^ seed, K0) ^ fold(key.value ^ seed.rotate_left(21), K1);
    fold(a ^ key.meta ^ seed.rotate_left(43), K2)
}

/// One slot: a cache line (one word spare). Its state lives in the control array.
#[repr(align(64))]
struct Slot {
    /// Key bits (`KEY_META`) and action bits.
    meta: AtomicU64,
    key_offset: AtomicU64,
    key_value: AtomicU64,
    write_offset: AtomicU64,
    /// The fixed value (0 for `Forward`).
    write_value: AtomicU64,
    /// Writer-only: `prev + 1 << 32 | next + 1` in the device's list.
    links: PlainU64,
    /// Lookups that hit this entry (relaxed; reset when the slot is reused).
    hits: PlainU64,
}

impl Slot {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Self {
            meta: AtomicU64::new(0),
            key_offset: AtomicU64::new(0),
            key_value: AtomicU64::new(0),
            write_offset: AtomicU64::new(0),
            write_value: AtomicU64::new(0),
            links: PlainU64::new(0),
            hits: PlainU64::new(0),
        }
    }

    #[cfg(loom)]
    fn new() -> Self {
        Self {
            meta: AtomicU64::new(0),
            key_offset: AtomicU64::new(0),
            key_value: AtomicU64::new(0),
            write_offset: AtomicU64::new(0),
            write_value: AtomicU64::new(0),
            links: PlainU64::new(0),
            hits: PlainU64::new(0),
        }
    }

    /// The stored key (writer side: the writer lock orders these loads).
    fn key(&self) -> Key {
        Key {
            meta: self.meta.load(Ordering::Relaxed) & KEY_META,
            offset: self.key_offset.load(Ordering::Relaxed),
            value: self.key_value.load(Ordering::Relaxed),
        }
    }
}

/// Writer-only per-device bookkeeping.
struct DeviceBook {
    count: AtomicU32,
    /// Of `count`, the value-matched and the any-value entries. Each is raised before such an
    /// entry is published and lowered after it is retired, so neither ever undercounts what a
    /// reader can find: a lookup skips the exact-value probe when `values` is 0 and the
    /// any-value probe when `anys` is 0 (a device with one kind of doorbell costs one probe
    /// sequence).
    values: AtomicU32,
    anys: AtomicU32,
    /// First slot of the device's list, plus one (`NONE`: empty).
    head: AtomicU32,
    /// `0`: the table's limit; else the device's own limit plus one.
    limit: PlainU64,
}

impl DeviceBook {
    const fn new() -> Self {
        Self {
            count: AtomicU32::new(0),
            values: AtomicU32::new(0),
            anys: AtomicU32::new(0),
            head: AtomicU32::new(NONE),
            limit: PlainU64::new(0),
        }
    }
}

/// Names a registered entry (its slot and the generation it was registered in); stale once
/// the entry is removed, even if the slot is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryId {
    slot: u32,
    /// The control word while it is registered.
    control: u64,
}

impl EntryId {
    /// The slot index (for traces).
    pub const fn slot(self) -> u32 {
        self.slot
    }
}

/// A doorbell that rang: a copy of its action, taken consistently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// The entry that matched.
    pub id: EntryId,
    /// The value it matched on (a value-matched doorbell), or `None` (an any-value one).
    pub value: Option<u64>,
    /// Its action.
    pub action: Action,
}

impl Hit {
    /// The device write to perform for a guest write of `written`, its value resolved (`Fixed`
    /// as registered, `Forward` as `written` cut to the write's width); `None` if the action
    /// has no device write.
    pub const fn device_value(&self, written: u64) -> Option<ResolvedWrite> {
        match &self.action.write {
            Some(w) => Some(w.resolve(written)),
            None => None,
        }
    }

    /// The event to signal, if any.
    pub const fn event(&self) -> Option<u32> {
        self.action.event
    }
}

/// What [`Table::stats`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Stats {
    /// Live entries.
    pub live: usize,
    /// Tombstones (removed entries whose slots still lie on a live entry's probe path).
    pub tombstones: usize,
    /// The largest distance of a live entry from its home slot (a hit probes this + 1 slots
    /// at worst).
    pub max_displacement: usize,
}

/// The doorbell table: `SLOTS` slots (a power of two, at least 2, at most 2^31), holding at
/// most [`Table::CAPACITY`] = `SLOTS / 2` doorbells. 72 bytes per slot (plus 4 KiB); see the
/// module documentation for the design.
///
/// Readers ([`Table::lookup`], [`Table::find`], [`Table::hits`], [`Table::count`],
/// [`Table::len`]) never wait.
/// Writers ([`Table::add`], [`Table::remove`], [`Table::remove_device`]) take an internal spin
/// lock held for a bounded time (at most a device's entries plus a probe window); do not call
/// them from a context that may interrupt a writer on the same CPU.
pub struct Table<const SLOTS: usize> {
    /// Per slot: `generation << 26 | fingerprint << 2 | state`, the seqlock word.
    control: [AtomicU64; SLOTS],
    slots: [Slot; SLOTS],
    devices: [DeviceBook; MAX_DEVICES],
    /// The writer lock.
    writer: AtomicBool,
    /// The hash seed ([`Table::set_hash_seed`]).
    seed: PlainU64,
    /// Live entries.
    len: AtomicU32,
    /// Tombstones.
    tombstones: AtomicU32,
    /// `0`: [`DEFAULT_DEVICE_LIMIT`]; else the table-wide per-device limit plus one.
    device_limit: PlainU64,
}

impl<const SLOTS: usize> fmt::Debug for Table<SLOTS> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("slots", &SLOTS)
            .field("len", &self.len())
            .field("device_limit", &self.device_limit())
            .finish_non_exhaustive()
    }
}

impl<const SLOTS: usize> Default for Table<SLOTS> {
    fn default() -> Self {
        Self::new()
    }
}

/// Holds the writer lock; releases it when dropped.
struct WriterGuard<'a>(&'a AtomicBool);

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl<const SLOTS: usize> Table<SLOTS> {
    /// Most live doorbells: half the slots (load ≤ 50%).
    pub const CAPACITY: usize = SLOTS / 2;

    /// Slots one probe sequence examines at most: [`PROBE_LIMIT`], or `SLOTS / 2` for tables
    /// smaller than `2 × PROBE_LIMIT` (so that, there, a free slot is always in the window
    /// below capacity).
    pub const PROBE_WINDOW: usize = if SLOTS / 2 < PROBE_LIMIT { SLOTS / 2 } else { PROBE_LIMIT };

    const MASK: usize = SLOTS - 1;

    const CHECK: () =
        assert!(SLOTS.is_power_of_two() && SLOTS >= 2 && SLOTS <= 1 << 31, "Table slots: a power of two, 2..=2^31");

    /// An empty table with hash seed 0 (call [`Table::set_hash_seed`] with a secret before use).
    /// `const`, and all zero bytes, so the kernel can hold one in a `static` in `.bss`.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        let () = Self::CHECK;
        Self {
            control: [const { AtomicU64::new(EMPTY) }; SLOTS],
            slots: [const { Slot::new() }; SLOTS],
            devices: [const { DeviceBook::new() }; MAX_DEVICES],
            writer: AtomicBool::new(false),
            seed: PlainU64::new(0),
            len: AtomicU32::new(0),
            tombstones: AtomicU32::new(0),
            device_limit: PlainU64::new(0),
        }
    }

    /// An empty table with hash seed 0.
    #[cfg(loom)]
    pub fn new() -> Self {
        let () = Self::CHECK;
        Self {
            control: core::array::from_fn(|_| AtomicU64::new(EMPTY)),
            slots: core::array::from_fn(|_| Slot::new()),
            devices: [const { DeviceBook::new() }; MAX_DEVICES],
            writer: AtomicBool::new(false),
            seed: PlainU64::new(0),
            len: AtomicU32::new(0),
            tombstones: AtomicU32::new(0),
            device_limit: PlainU64::new(0),
        }
    }

    /// Sets the hash seed; do it once at boot with a secret (RDRAND, TSC jitter), before the
    /// table is shared, so guests cannot aim hash collisions at one probe window (which could
    /// make other devices' registrations fail with `TableFull`; lookups stay bounded either
    /// way). Returns `false`, changing nothing, if the table holds any entry.
    pub fn set_hash_seed(&self, seed: u64) -> bool {
        let _guard = self.lock();
        if self.len.load(PlainOrdering::Relaxed) != 0 {
            return false;
        }
        self.seed.store(seed, PlainOrdering::Relaxed);
        true
    }

    /// The per-device limit for devices without their own: [`DEFAULT_DEVICE_LIMIT`] unless
    /// [`Table::set_device_limit`] changed it.
    pub fn device_limit(&self) -> u32 {
        decode_limit(self.device_limit.load(PlainOrdering::Relaxed)).unwrap_or(DEFAULT_DEVICE_LIMIT)
    }

    /// Sets the per-device limit for every device without its own. Devices already above it
    /// keep their doorbells; their next `add` gets `NoSpace`.
    pub fn set_device_limit(&self, limit: u32) {
        self.device_limit.store(u64::from(limit) + 1, PlainOrdering::Relaxed);
    }

    /// Gives `device` its own limit (`Some`), or makes it follow the table's again (`None`).
    /// `Invalid(DeviceSlot)` for `device >= MAX_DEVICES`.
    pub fn set_limit_for(&self, device: u16, limit: Option<u32>) -> Result<(), Error> {
        let book = self.devices.get(usize::from(device)).ok_or(Error::Invalid(Reason::DeviceSlot))?;
        book.limit.store(limit.map_or(0, |l| u64::from(l) + 1), PlainOrdering::Relaxed);
        Ok(())
    }

    /// The limit that applies to `device` (0 for `device >= MAX_DEVICES`: it can have none).
    pub fn limit_of(&self, device: u16) -> u32 {
        match self.devices.get(usize::from(device)) {
            Some(book) => decode_limit(book.limit.load(PlainOrdering::Relaxed)).unwrap_or_else(|| self.device_limit()),
            None => 0,
        }
    }

    /// Registers `doorbell` on a device that looks like `view`. In this order:
    /// 1. [`validate`] → `Invalid(reason)` (`EINVAL`; every rule is listed there);
    /// 2. a registered doorbell with the same device, BAR, offset and width whose match
    ///    collides — either side is `Match::Any`, or both are the same value — → `Exists`
    ///    (`EEXIST`). Different widths at one offset, and different values, are distinct;
    /// 3. the device already has its limit ([`Table::limit_of`]) → `NoSpace { limit }`
    ///    (`ENOSPC`);
    /// 4. the table holds [`Table::CAPACITY`] doorbells, or no slot is free in the key's
    ///    probe window → `TableFull` (`ENOSPC`).
    ///
    /// On success the doorbell is visible to every lookup that starts after this returns.
    pub fn add(&self, doorbell: &Doorbell, view: &DeviceView) -> Result<EntryId, Error> {
        validate(doorbell, view)?;
        let book = self.devices.get(usize::from(doorbell.device)).ok_or(Error::Invalid(Reason::DeviceSlot))?;
        let key = Key::of(doorbell);
        let _guard = self.lock();
        let seed = self.seed.load(PlainOrdering::Relaxed);
        let collides = match doorbell.matches {
            Match::Value(_) => self.probe(seed, &key).is_some() || self.probe(seed, &key.any()).is_some(),
            Match::Any => self.device_entries(book).any(|i| {
                let k = self.slot(i).key();
                k.meta & ADDRESS_META == key.meta & ADDRESS_META && k.offset == key.offset
            }),
        };
        if collides {
            return Err(Error::Exists);
        }
        let limit = self.limit_of(doorbell.device);
        let count = book.count.load(PlainOrdering::Relaxed);
        if count >= limit {
            return Err(Error::NoSpace { limit });
        }
        if self.len() >= Self::CAPACITY {
            return Err(Error::TableFull);
        }
        let h = hash(seed, &key);
        let home = h as usize;
        let index = (0..Self::PROBE_WINDOW)
            .map(|d| home.wrapping_add(d) & Self::MASK)
            .find(|&i| self.state(i) != LIVE)
            .ok_or(Error::TableFull)?;
        let slot = self.slot(index);
        let control = self.control(index);
        let old = control.load(Ordering::Relaxed);
        match doorbell.matches {
            Match::Value(_) => book.values.fetch_add(1, Ordering::AcqRel),
            Match::Any => book.anys.fetch_add(1, Ordering::AcqRel),
        };
        let busy = bump(old, BUSY);
        control.store(busy, Ordering::Relaxed);
        let (write_offset, write_value) = match &doorbell.action.write {
            Some(DeviceWrite { offset, value: WriteValue::Fixed(v), .. }) => (*offset, *v),
            Some(DeviceWrite { offset, value: WriteValue::Forward, .. }) => (*offset, 0),
            None => (0, 0),
        };
        slot.meta.store(key.meta | action_meta(&doorbell.action), Ordering::Release);
        slot.key_offset.store(key.offset, Ordering::Release);
        slot.key_value.store(key.value, Ordering::Release);
        slot.write_offset.store(write_offset, Ordering::Release);
        slot.write_value.store(write_value, Ordering::Release);
        slot.hits.store(0, PlainOrdering::Relaxed);
        let live = bump(busy, live_tag(h));
        control.store(live, Ordering::Release);
        // Bookkeeping: push on the device's list.
        let head = book.head.load(PlainOrdering::Relaxed);
        slot.links.store(link_word(NONE, head), PlainOrdering::Relaxed);
        if let Some(h) = unlink_index(head) {
            let next = self.slot(h).links.load(PlainOrdering::Relaxed) & 0xffff_ffff;
            self.slot(h).links.store(link_word(slot_ref(index), next as u32), PlainOrdering::Relaxed);
        }
        book.head.store(slot_ref(index), PlainOrdering::Relaxed);
        book.count.store(count + 1, PlainOrdering::Relaxed);
        self.len.fetch_add(1, PlainOrdering::Relaxed);
        if old & STATE_MASK == TOMBSTONE {
            self.tombstones.fetch_sub(1, PlainOrdering::Relaxed);
        }
        Ok(EntryId { slot: index as u32, control: live })
    }

    /// Removes the doorbell registered under exactly this key: `Match::Any` removes only an
    /// any-value entry, `Match::Value(v)` only the entry for `v` (VFIO's de-assign). Returns:
    /// - `Invalid(DeviceSlot)` for `device >= MAX_DEVICES`, `Invalid(Doorbell(BarIndex))` for
    ///   `bar >= 6`, `Invalid(MatchTooWide)` for a value wider than `width` (keys that can
    ///   never have been registered; the other range rules need the device's view and are
    ///   not rechecked: such keys are simply not found);
    /// - `NotFound` (`ENODEV`) if no such doorbell is registered.
    ///
    /// Lookups that start after this returns no longer see it.
    pub fn remove(&self, device: u16, bar: u8, offset: u64, width: Width, matches: Match) -> Result<(), Error> {
        let book = self.devices.get(usize::from(device)).ok_or(Error::Invalid(Reason::DeviceSlot))?;
        if usize::from(bar) >= BARS {
            return Err(Reason::Doorbell(RangeFault::BarIndex).into());
        }
        let value = match matches {
            Match::Any => None,
            Match::Value(v) if width.fits(v) => Some(v),
            Match::Value(_) => return Err(Reason::MatchTooWide.into()),
        };
        let key = Key::new(device, bar, offset, width, value);
        let _guard = self.lock();
        let seed = self.seed.load(PlainOrdering::Relaxed);
        let found = self.probe(seed, &key).ok_or(Error::NotFound)?;
        self.unlink(book, found.index);
        self.retire(seed, found.index);
        match value {
            Some(_) => book.values.fetch_sub(1, Ordering::AcqRel),
            None => book.anys.fetch_sub(1, Ordering::AcqRel),
        };
        Ok(())
    }

    /// Removes every doorbell of `device` (device teardown); returns how many. 0 for
    /// `device >= MAX_DEVICES`.
    pub fn remove_device(&self, device: u16) -> usize {
        let Some(book) = self.devices.get(usize::from(device)) else { return 0 };
        let _guard = self.lock();
        let seed = self.seed.load(PlainOrdering::Relaxed);
        let mut removed = 0;
        let mut next = unlink_index(book.head.load(PlainOrdering::Relaxed));
        while let Some(index) = next {
            next = unlink_index(self.slot(index).links.load(PlainOrdering::Relaxed) as u32);
            self.retire(seed, index);
            removed += 1;
        }
        book.head.store(NONE, PlainOrdering::Relaxed);
        book.count.store(0, PlainOrdering::Relaxed);
        book.values.store(0, Ordering::Release);
        book.anys.store(0, Ordering::Release);
        removed
    }

    /// Doorbells `device` has (0 for `device >= MAX_DEVICES`).
    pub fn count(&self, device: u16) -> u32 {
        self.devices.get(usize::from(device)).map_or(0, |b| b.count.load(PlainOrdering::Relaxed))
    }

    /// Doorbells registered in all.
    pub fn len(&self) -> usize {
        self.len.load(PlainOrdering::Relaxed) as usize
    }

    /// Whether no doorbell is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The nested-page-fault fast path: the guest wrote `written` with a `width`-byte write at
    /// `offset` in BAR `bar` of `device`. Returns the doorbell it rings, if any, and counts
    /// the hit.
    ///
    /// `written` is cut to `width` first. The value entry for that value is looked for first,
    /// then the any-value entry (registration never lets both exist). Wait-free: at most
    /// `2 × PROBE_WINDOW` slots read, no lock, no allocation, no retry loop; O(1) expected
    /// (about 1.5 slots per hit, 2.5 per miss at full load).
    ///
    /// Racing writers: a doorbell registered for the whole call is always found; one added or
    /// removed during the call may or may not be; a returned hit is always one complete
    /// registration for exactly this key that was live during the call, never a mix.
    #[inline]
    pub fn lookup(&self, device: u16, bar: u8, offset: u64, width: Width, written: u64) -> Option<Hit> {
        if usize::from(bar) >= BARS {
            return None;
        }
        let book = self.devices.get(usize::from(device))?;
        let (values, anys) = (book.values.load(Ordering::Acquire), book.anys.load(Ordering::Acquire));
        let seed = self.seed.load(PlainOrdering::Relaxed);
        let exact = Key::new(device, bar, offset, width, Some(written & width.mask()));
        let (found, value) = match (values != 0).then(|| self.probe(seed, &exact)).flatten() {
            Some(found) => (found, Some(exact.value)),
            None if anys != 0 => (self.probe(seed, &exact.any())?, None),
            None => return None,
        };
        self.slot(found.index).hits.fetch_add(1, PlainOrdering::Relaxed);
        Some(Hit {
            id: EntryId { slot: found.index as u32, control: found.control },
            value,
            action: decode_action(found.meta, found.write_offset, found.write_value),
        })
    }

    /// The entry registered under exactly this key (`Match::Any` finds only an any-value
    /// entry, `Match::Value(v)` only the entry for `v`), without counting a hit: with
    /// [`Table::hits`], the hit count of a doorbell named by its key. Lock-free, like
    /// `lookup`; `None` for keys that cannot be registered (`bar >= 6`, a value wider than
    /// `width`).
    pub fn find(&self, device: u16, bar: u8, offset: u64, width: Width, matches: Match) -> Option<EntryId> {
        if usize::from(bar) >= BARS {
            return None;
        }
        let value = match matches {
            Match::Any => None,
            Match::Value(v) if width.fits(v) => Some(v),
            Match::Value(_) => return None,
        };
        let key = Key::new(device, bar, offset, width, value);
        let found = self.probe(self.seed.load(PlainOrdering::Relaxed), &key)?;
        Some(EntryId { slot: found.index as u32, control: found.control })
    }

    /// Lookups that hit the entry `id` so far; `None` once it is removed. (Relaxed: a hit
    /// being counted as the entry is removed and its slot reused may land on the successor.)
    pub fn hits(&self, id: EntryId) -> Option<u64> {
        let slot = self.slots.get(id.slot as usize)?;
        if self.control.get(id.slot as usize)?.load(Ordering::Acquire) != id.control {
            return None;
        }
        Some(slot.hits.load(PlainOrdering::Relaxed))
    }

    /// Counts one more hit on the entry `id` if it is still registered (for a caller that
    /// remembered a [`Hit`] and rings it again without a lookup); returns whether it was.
    #[inline]
    pub fn record_hit(&self, id: EntryId) -> bool {
        let (Some(slot), Some(control)) = (self.slots.get(id.slot as usize), self.control.get(id.slot as usize)) else {
            return false;
        };
        if control.load(Ordering::Acquire) != id.control {
            return false;
        }
        slot.hits.fetch_add(1, PlainOrdering::Relaxed);
        true
    }

    /// The doorbell `id` names, if it is still registered (for traces and tests; takes the
    /// writer lock).
    pub fn get(&self, id: EntryId) -> Option<Doorbell> {
        let slot = self.slots.get(id.slot as usize)?;
        let _guard = self.lock();
        if self.control.get(id.slot as usize)?.load(Ordering::Relaxed) != id.control {
            return None;
        }
        let meta = slot.meta.load(Ordering::Relaxed);
        let key = slot.key();
        Some(Doorbell {
            device: (meta >> DEVICE_SHIFT) as u16,
            bar: ((meta >> BAR_SHIFT) & 7) as u8,
            offset: key.offset,
            width: Width::from_log2(meta >> WIDTH_SHIFT),
            matches: if meta & ANY != 0 { Match::Any } else { Match::Value(key.value) },
            action: decode_action(
                meta,
                slot.write_offset.load(Ordering::Relaxed),
                slot.write_value.load(Ordering::Relaxed),
            ),
        })
    }

    /// Occupancy and the probe bound in force: a scan of every slot under the writer lock
    /// (diagnostics, tests).
    pub fn stats(&self) -> Stats {
        let _guard = self.lock();
        let seed = self.seed.load(PlainOrdering::Relaxed);
        let mut stats = Stats::default();
        for index in 0..SLOTS {
            match self.state(index) {
                LIVE => {
                    stats.live += 1;
                    stats.max_displacement = stats.max_displacement.max(self.displacement(seed, index));
                }
                TOMBSTONE => stats.tombstones += 1,
                _ => {}
            }
        }
        stats
    }

    #[inline]
    fn slot(&self, index: usize) -> &Slot {
        &self.slots[index & Self::MASK]
    }

    #[inline]
    fn control(&self, index: usize) -> &AtomicU64 {
        &self.control[index & Self::MASK]
    }

    /// A slot's state (writer side: the writer lock orders this load).
    fn state(&self, index: usize) -> u64 {
        self.control(index).load(Ordering::Relaxed) & STATE_MASK
    }

    /// One probe sequence for `key`: the first live slot holding it, read consistently.
    #[inline]
    fn probe(&self, seed: u64, key: &Key) -> Option<Found> {
        let h = hash(seed, key);
        let (home, tag) = (h as usize, live_tag(h));
        for d in 0..Self::PROBE_WINDOW {
            let index = home.wrapping_add(d) & Self::MASK;
            let control = self.control(index).load(Ordering::Acquire);
            if control & TAG_MASK != tag {
                if control & STATE_MASK == EMPTY {
                    // The end of the run: no entry for this key lies beyond (an entry's probe
                    // path never crosses an empty slot).
                    return None;
                }
                // Another key, a tombstone, or a slot being filled: go on.
                continue;
            }
            // Live with our fingerprint: compare the whole key (all three words, one cache
            // line, one branch).
            let slot = self.slot(index);
            let meta = slot.meta.load(Ordering::Acquire);
            let offset = slot.key_offset.load(Ordering::Acquire);
            let value = slot.key_value.load(Ordering::Acquire);
            if ((meta & KEY_META) ^ key.meta) | (offset ^ key.offset) | (value ^ key.value) != 0 {
                continue;
            }
            let write_offset = slot.write_offset.load(Ordering::Acquire);
            let write_value = slot.write_value.load(Ordering::Acquire);
            if self.control(index).load(Ordering::Acquire) != control {
                // Removed or reused while we read: what we read may be a mix. Not a
                // registration that was live for this whole read; go on.
                continue;
            }
            return Some(Found { index, control, meta, write_offset, write_value });
        }
        None
    }

    /// How far the live entry at `index` is from its home slot (writer side).
    fn displacement(&self, seed: u64, index: usize) -> usize {
        let home = hash(seed, &self.slot(index).key()) as usize;
        index.wrapping_sub(home) & Self::MASK
    }

    /// The device's entries (writer side, under the lock).
    fn device_entries<'a>(&'a self, book: &DeviceBook) -> impl Iterator<Item = usize> + 'a {
        let mut next = unlink_index(book.head.load(PlainOrdering::Relaxed));
        core::iter::from_fn(move || {
            let index = next?;
            next = unlink_index(self.slot(index).links.load(PlainOrdering::Relaxed) as u32);
            Some(index)
        })
    }

    /// Takes the entry at `index` off its device's list.
    fn unlink(&self, book: &DeviceBook, index: usize) {
        let links = self.slot(index).links.load(PlainOrdering::Relaxed);
        let (prev, next) = ((links >> 32) as u32, links as u32);
        match unlink_index(prev) {
            Some(p) => {
                let pl = self.slot(p).links.load(PlainOrdering::Relaxed);
                self.slot(p).links.store(link_word((pl >> 32) as u32, next), PlainOrdering::Relaxed);
            }
            None => book.head.store(next, PlainOrdering::Relaxed),
        }
        if let Some(n) = unlink_index(next) {
            let nl = self.slot(n).links.load(PlainOrdering::Relaxed);
            self.slot(n).links.store(link_word(prev, nl as u32), PlainOrdering::Relaxed);
        }
        book.count.fetch_sub(1, PlainOrdering::Relaxed);
    }

    /// Turns the live entry at `r` into a tombstone, then sweeps: every tombstone on `r`'s
    /// probe path that no remaining live entry's path crosses becomes empty again.
    ///
    /// Coordinates are relative to `r`'s home `h`. A live entry `j` crosses slot `t` when
    /// `home(j) <= t < j`. Only entries within `PROBE_WINDOW - 1` slots after `t` can, and
    /// none beyond an empty slot (paths never cross one), so scanning down from
    /// `min(first empty after r, r + PROBE_WINDOW - 1)` while tracking the lowest home seen
    /// decides every candidate `t` in `[h, r]`. `2 × PROBE_WINDOW <= SLOTS`, so the relative
    /// coordinates never wrap onto each other.
    fn retire(&self, seed: u64, r: usize) {
        let r_rel = self.displacement(seed, r);
        let home = r.wrapping_sub(r_rel);
        let control = self.control(r);
        control.store(bump(control.load(Ordering::Relaxed), TOMBSTONE), Ordering::Release);
        self.len.fetch_sub(1, PlainOrdering::Relaxed);
        self.tombstones.fetch_add(1, PlainOrdering::Relaxed);
        let last = r_rel + Self::PROBE_WINDOW - 1;
        let mut end = r_rel;
        while end < last && self.state(home.wrapping_add(end + 1)) != EMPTY {
            end += 1;
        }
        let mut lowest_home = isize::MAX;
        for x in (0..=end).rev() {
            let index = home.wrapping_add(x) & Self::MASK;
            match self.state(index) {
                LIVE => lowest_home = lowest_home.min(x as isize - self.displacement(seed, index) as isize),
                TOMBSTONE if x <= r_rel && lowest_home > x as isize => {
                    let c = self.control(index);
                    c.store(bump(c.load(Ordering::Relaxed), EMPTY), Ordering::Release);
                    self.tombstones.fetch_sub(1, PlainOrdering::Relaxed);
                }
                _ => {}
            }
        }
    }

    fn lock(&self) -> WriterGuard<'_> {
        while self.writer.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            while self.writer.load(Ordering::Relaxed) {
                sync::spin();
            }
        }
        WriterGuard(&self.writer)
    }

    /// The home slot of `doorbell`'s key (tests arrange collisions with it).
    #[cfg(all(test, not(loom)))]
    fn home_of(&self, doorbell: &Doorbell) -> usize {
        hash(self.seed.load(PlainOrdering::Relaxed), &Key::of(doorbell)) as usize & Self::MASK
    }

    /// Slots a miss on `doorbell`'s key examines (up to the first empty slot, at most the
    /// window): the cost the churn test watches.
    #[cfg(all(test, not(loom)))]
    fn probe_len(&self, doorbell: &Doorbell) -> usize {
        let home = self.home_of(doorbell);
        (0..Self::PROBE_WINDOW)
            .find(|&d| self.state(home.wrapping_add(d)) == EMPTY)
            .map_or(Self::PROBE_WINDOW, |d| d + 1)
    }
}

/// A consistent copy of a live slot's words.
struct Found {
    index: usize,
    control: u64,
    meta: u64,
    write_offset: u64,
    write_value: u64,
}

/// A stored limit (`0`: none; else limit plus one).
fn decode_limit(word: u64) -> Option<u32> {
    word.checked_sub(1).and_then(|l| u32::try_from(l).ok())
}

/// A slot index as stored in the links (plus one).
const fn slot_ref(index: usize) -> u32 {
    index as u32 + 1
}

/// The slot a stored link names, if any.
const fn unlink_index(link: u32) -> Option<usize> {
    match link {
        NONE => None,
        l => Some(l as usize - 1),
    }
}

const fn link_word(prev: u32, next: u32) -> u64 {
    (prev as u64) << 32 | next as u64
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
