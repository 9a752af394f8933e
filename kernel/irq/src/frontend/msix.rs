//! The MSI-X front end: the guest's view of the MSI-X table and PBA (Conduit owns the real
//! ones; DESIGN.md core rule 2), MSI-X enable and function mask, and dynamic per-vector
//! allocation behind a [`Backend`].
//!
//! Table and PBA accesses are byte-offset based (from the MMIO exit decoder): 4- and 8-byte,
//! naturally aligned; anything else — another size, a misaligned offset, an offset past the
//! table or PBA — is ignored (reads return 0) and counted in `ignored_accesses`.

use super::{Backend, Binding, FrontEndStats, Nowhere, Stat, Stats, VcpuSlots, Want, message_target};
use crate::context::{ContextStats, Signal, Sink};
use crate::pool::{ContextId, ContextPool};
use conduit_abi::irq::IrqStats;

/// MSI-X table layout (PCIe Base Specification, "MSI-X Table Structure").
pub mod table {
    /// Bytes per entry.
    pub const ENTRY_BYTES: u64 = 16;
    /// Message Address (low dword).
    pub const ADDRESS_LO: u64 = 0x0;
    /// Message Upper Address.
    pub const ADDRESS_HI: u64 = 0x4;
    /// Message Data.
    pub const DATA: u64 = 0x8;
    /// Vector Control.
    pub const VECTOR_CONTROL: u64 = 0xc;
    /// Vector Control: Mask Bit (bit 0; the only bit Conduit keeps).
    pub const MASK_BIT: u32 = 1 << 0;
    /// PBA: one bit per entry, in qwords.
    pub const PBA_BITS_PER_QWORD: u64 = 64;
}

/// Most entries an MSI-X table has (Table Size is 11 bits, N − 1 encoded).
pub const MAX_TABLE_ENTRIES: usize = 2048;

/// Dword index of each register in an entry.
const ADDR_LO: usize = 0;
const ADDR_HI: usize = 1;
const DATA: usize = 2;
const CTRL: usize = 3;

/// MSI-X Message Control as far as interrupt routing cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsixControl {
    /// MSI-X Enable.
    pub enabled: bool,
    /// Function Mask: every vector masked.
    pub function_masked: bool,
}

/// One table entry as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsixEntry {
    /// Message Address (both halves).
    pub address: u64,
    /// Message Data.
    pub data: u32,
    /// Vector Control Mask Bit.
    pub masked: bool,
}

#[derive(Debug)]
struct Entry {
    /// Address lo, address hi, data, vector control.
    regs: [u32; 4],
    binding: Binding,
}

/// Reset value of the registers: everything zero, the entry masked.
const RESET_REGS: [u32; 4] = [0, 0, 0, table::MASK_BIT];

impl Entry {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Self { regs: RESET_REGS, binding: Binding::new() }
    }

    #[cfg(loom)]
    fn new() -> Self {
        Self { regs: RESET_REGS, binding: Binding::new() }
    }

    fn address(&self) -> u64 {
        u64::from(self.regs[ADDR_HI]) << 32 | u64::from(self.regs[ADDR_LO])
    }

    fn masked(&self) -> bool {
        self.regs[CTRL] & table::MASK_BIT != 0
    }
}

/// An MSI-X function's interrupt front end: a table of up to `N` entries (the device's table
/// size, at most [`MAX_TABLE_ENTRIES`], is given at creation), contexts from a pool of `P`.
///
/// Dropping the front end deactivates and frees every vector (as disabling MSI-X does).
#[derive(Debug)]
pub struct MsixFrontEnd<'p, B: Backend, const N: usize, const P: usize> {
    pool: &'p ContextPool<P>,
    backend: B,
    size: u16,
    control: MsixControl,
    slots: VcpuSlots,
    entries: [Entry; N],
    stats: Stats,
}

/// `min(table_size, N, MAX_TABLE_ENTRIES)`.
const fn clamp_size(table_size: u16, n: usize) -> u16 {
    let max = if n < MAX_TABLE_ENTRIES { n } else { MAX_TABLE_ENTRIES };
    if (table_size as usize) < max { table_size } else { max as u16 }
}

impl<'p, B: Backend, const N: usize, const P: usize> MsixFrontEnd<'p, B, N, P> {
    /// A front end in the reset state (MSI-X disabled, every entry masked) for a table of
    /// `table_size` entries (clamped to `N` and [`MAX_TABLE_ENTRIES`]; see `table_size`).
    #[cfg(not(loom))]
    pub const fn new(pool: &'p ContextPool<P>, backend: B, table_size: u16, slots: VcpuSlots) -> Self {
        Self {
            pool,
            backend,
            size: clamp_size(table_size, N),
            control: MsixControl { enabled: false, function_masked: false },
            slots,
            entries: [const { Entry::new() }; N],
            stats: Stats::new(),
        }
    }

    /// A front end in the reset state (MSI-X disabled, every entry masked) for a table of
    /// `table_size` entries (clamped to `N` and [`MAX_TABLE_ENTRIES`]; see `table_size`).
    #[cfg(loom)]
    pub fn new(pool: &'p ContextPool<P>, backend: B, table_size: u16, slots: VcpuSlots) -> Self {
        Self {
            pool,
            backend,
            size: clamp_size(table_size, N),
            control: MsixControl { enabled: false, function_masked: false },
            slots,
            entries: core::array::from_fn(|_| Entry::new()),
            stats: Stats::new(),
        }
    }

    /// Entries in the table.
    pub const fn table_size(&self) -> u16 {
        self.size
    }

    /// Bytes of the PBA (whole qwords).
    pub const fn pba_bytes(&self) -> u64 {
        (self.size as u64).div_ceil(table::PBA_BITS_PER_QWORD) * 8
    }

    /// MSI-X enable and function mask.
    pub const fn control(&self) -> MsixControl {
        self.control
    }

    /// The backend.
    pub const fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (configuration the front end does not know about).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The front end's own counters.
    pub fn stats(&self) -> FrontEndStats {
        self.stats.snapshot()
    }

    /// The guest wrote MSI-X Enable / Function Mask. Enabling activates every entry that is
    /// live; masking the function masks every context; disabling deactivates and frees all.
    pub fn set_control(&mut self, control: MsixControl, sink: &(impl Sink + ?Sized)) {
        if control != self.control {
            self.control = control;
            self.sync_all(sink);
        }
    }

    /// The vCPU → slot map changed (a vCPU moved): every live vector is retargeted.
    pub fn set_vcpu_slots(&mut self, slots: VcpuSlots, sink: &(impl Sink + ?Sized)) {
        if slots != self.slots {
            self.slots = slots;
            self.sync_all(sink);
        }
    }

    /// Back to the reset state (Function Level Reset): MSI-X disabled, every context freed,
    /// every entry zeroed and masked. The vCPU map stays.
    pub fn reset(&mut self) {
        self.control = MsixControl::default();
        for e in self.entries.iter_mut() {
            e.regs = RESET_REGS;
        }
        self.sync_all(&Nowhere);
    }

    /// Entry `index` of the table, as the guest wrote it.
    pub fn entry(&self, index: u16) -> Option<MsixEntry> {
        let e = self.live_entry(index)?;
        Some(MsixEntry { address: e.address(), data: e.regs[DATA], masked: e.masked() })
    }

    /// The context entry `index` delivers through, once live.
    pub fn entry_context(&self, index: u16) -> Option<ContextId> {
        self.live_entry(index)?.binding.context()
    }

    /// Entry `index`'s counters since the front end was created.
    pub fn entry_counters(&self, index: u16) -> Option<ContextStats> {
        Some(self.live_entry(index)?.binding.stats(self.pool))
    }

    /// Entry `index`'s counters as `IRQ_STATS` reports them (pending = its PBA bit).
    pub fn entry_stats(&self, index: u16) -> Option<IrqStats> {
        Some(self.entry_counters(index)?.irq_stats(self.is_pending(index)))
    }

    /// Entry `index`'s PBA bit: pending in software (context or latch) or in the hardware.
    pub fn is_pending(&self, index: u16) -> bool {
        self.live_entry(index).is_some_and(|e| e.binding.pending(self.pool)) || self.backend.hardware_pending(index)
    }

    /// A software signal for entry `index` (emulated interrupts; also what the kernel's
    /// interrupt path does for a hardware vector, through the context directly). An index
    /// past the table is spurious and counted in `bad_index`.
    pub fn signal(&self, index: u16, sink: &(impl Sink + ?Sized)) -> Signal {
        let Some(e) = self.live_entry(index) else {
            self.stats.count(Stat::BadIndex);
            return Signal::Spurious;
        };
        let masked = self.control.function_masked || e.masked();
        e.binding.signal(self.pool, sink, self.control.enabled, masked)
    }

    /// A guest read of the table at byte `offset`, `size_bytes` wide.
    pub fn read_table(&self, offset: u64, size_bytes: u8) -> u64 {
        let Some((index, dword)) = self.locate(offset, size_bytes) else {
            self.stats.count(Stat::IgnoredAccess);
            return 0;
        };
        let Some(e) = self.entries.get(index) else { return 0 };
        let lo = u64::from(e.regs.get(dword).copied().unwrap_or(0));
        if size_bytes == 8 { lo | u64::from(e.regs.get(dword + 1).copied().unwrap_or(0)) << 32 } else { lo }
    }

    /// A guest write of the table at byte `offset`, `size_bytes` wide. Only the entry written
    /// is re-evaluated (dynamic MSI-X: no other vector is touched).
    pub fn write_table(&mut self, offset: u64, size_bytes: u8, value: u64, sink: &(impl Sink + ?Sized)) {
        let Some((index, dword)) = self.locate(offset, size_bytes) else {
            self.stats.count(Stat::IgnoredAccess);
            return;
        };
        let Some(e) = self.entries.get_mut(index) else { return };
        let words: &[u32] = if size_bytes == 8 { &[value as u32, (value >> 32) as u32] } else { &[value as u32] };
        for (k, &w) in words.iter().enumerate() {
            let d = dword + k;
            let w = if d == CTRL { w & table::MASK_BIT } else { w };
            if let Some(r) = e.regs.get_mut(d) {
                *r = w;
            }
        }
        self.sync(index, sink);
    }

    /// A guest read of the PBA at byte `offset`, `size_bytes` wide: bit `i` is entry `i`'s
    /// pending bit.
    pub fn read_pba(&self, offset: u64, size_bytes: u8) -> u64 {
        let aligned = matches!(size_bytes, 4 | 8) && offset.is_multiple_of(u64::from(size_bytes));
        let end = offset.checked_add(u64::from(size_bytes));
        if !aligned || end.is_none_or(|e| e > self.pba_bytes()) {
            self.stats.count(Stat::IgnoredAccess);
            return 0;
        }
        let first = offset * 8;
        let mut bits = 0u64;
        for k in 0..u64::from(size_bytes) * 8 {
            let Ok(index) = u16::try_from(first + k) else { break };
            if index < self.size && self.is_pending(index) {
                bits |= 1 << k;
            }
        }
        bits
    }

    /// A guest write of the PBA: read-only, ignored and counted.
    pub fn write_pba(&self, _offset: u64, _size_bytes: u8, _value: u64) {
        self.stats.count(Stat::IgnoredAccess);
    }

    /// `(entry, dword)` for a valid table access.
    fn locate(&self, offset: u64, size_bytes: u8) -> Option<(usize, usize)> {
        if !matches!(size_bytes, 4 | 8) || !offset.is_multiple_of(u64::from(size_bytes)) {
            return None;
        }
        let index = offset / table::ENTRY_BYTES;
        if index >= u64::from(self.size) {
            return None;
        }
        Some((usize::try_from(index).ok()?, usize::try_from(offset % table::ENTRY_BYTES / 4).ok()?))
    }

    fn live_entry(&self, index: u16) -> Option<&Entry> {
        if index < self.size { self.entries.get(usize::from(index)) } else { None }
    }

    fn sync_all(&mut self, sink: &(impl Sink + ?Sized)) {
        for index in 0..usize::from(self.size) {
            self.sync(index, sink);
        }
    }

    /// Moves entry `index` to the state its registers and the control bits ask for.
    fn sync(&mut self, index: usize, sink: &(impl Sink + ?Sized)) {
        let Ok(index16) = u16::try_from(index) else { return };
        let Some(e) = self.entries.get_mut(index) else { return };
        let masked = self.control.function_masked || e.masked();
        let want = Want {
            enabled: self.control.enabled,
            may_activate: !masked,
            target: message_target(e.address(), e.regs[DATA], &self.slots),
            masked,
        };
        e.binding.sync(index16, want, self.pool, &mut self.backend, sink, &self.stats);
    }
}

impl<B: Backend, const N: usize, const P: usize> Drop for MsixFrontEnd<'_, B, N, P> {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
