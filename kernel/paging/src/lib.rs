//! Radix page tables: building, changing and walking them. Two entry formats share one walker:
//! x86-64 (the hypervisor's own tables and AMD nested page tables; SDM Vol. 3A §4.5, APM Vol. 2
//! §15.25) and the VT-d second-level format (IOMMU DMA remapping, VT-d spec §9.8), with 3, 4
//! or 5 levels of 512 entries.
//!
//! Tables live in physical frames the caller owns; this crate reaches them only through
//! [`TableMemory`], so all of it runs on the host against a fake. TLB invalidation is the
//! caller's job: every change returns normally and the caller flushes what it changed.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use bitflags::bitflags;

/// Entries per table.
pub const ENTRIES: usize = 512;
/// Bits 51:12 of an entry hold the physical address of the next table or the page.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Lowest non-canonical address of the lower half (48-bit virtual addresses).
pub const LOWER_HALF_END: u64 = 0x0000_8000_0000_0000;

bitflags! {
    /// Bits of a page-table entry (SDM Vol. 3A, Table 4-19 to 4-20).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Pte: u64 {
        /// Present.
        const PRESENT = 1 << 0;
        /// Writable.
        const WRITABLE = 1 << 1;
        /// User-accessible (required on every level of a nested table).
        const USER = 1 << 2;
        /// Page-level write-through.
        const WRITE_THROUGH = 1 << 3;
        /// Page-level cache disable.
        const CACHE_DISABLE = 1 << 4;
        /// Accessed (set by hardware).
        const ACCESSED = 1 << 5;
        /// Dirty (set by hardware, leaves only).
        const DIRTY = 1 << 6;
        /// Page size: this PDPTE/PDE maps a 1 GiB / 2 MiB page.
        const HUGE = 1 << 7;
        /// Global (not flushed on CR3 load).
        const GLOBAL = 1 << 8;
        /// Execute-disable (requires EFER.NXE).
        const NO_EXECUTE = 1 << 63;
    }
}

/// Page sizes the format offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PageSize {
    /// 4 KiB (a PTE).
    Size4K,
    /// 2 MiB (a PDE with PS).
    Size2M,
    /// 1 GiB (a PDPTE with PS; needs CPUID PDPE1GB).
    Size1G,
}

impl PageSize {
    /// Bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size4K => 0x1000,
            Self::Size2M => 0x20_0000,
            Self::Size1G => 0x4000_0000,
        }
    }

    /// Table level holding a leaf of this size (1 = PT, 2 = PD, 3 = PDPT).
    const fn level(self) -> u8 {
        match self {
            Self::Size4K => 1,
            Self::Size2M => 2,
            Self::Size1G => 3,
        }
    }

    const fn smaller(self) -> Option<Self> {
        match self {
            Self::Size4K => None,
            Self::Size2M => Some(Self::Size4K),
            Self::Size1G => Some(Self::Size2M),
        }
    }
}

/// Memory type of a mapping (through PCD/PWT with the power-on PAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Cache {
    /// Write-back: RAM.
    WriteBack,
    /// Strong uncacheable: device registers.
    Uncached,
}

/// Whether a mapping may be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Write {
    /// Read-only.
    Deny,
    /// Read-write.
    Allow,
}

/// Whether instructions may be fetched from a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Execute {
    /// No instruction fetch (NX).
    Deny,
    /// Executable.
    Allow,
}

/// What a leaf mapping allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Attrs {
    /// Writes.
    pub write: Write,
    /// Instruction fetch.
    pub execute: Execute,
    /// Memory type.
    pub cache: Cache,
    /// Accessible from user mode (always true in nested tables).
    pub user: bool,
}

impl Attrs {
    /// Hypervisor code: read + execute.
    pub const TEXT: Self = Self { write: Write::Deny, execute: Execute::Allow, cache: Cache::WriteBack, user: false };
    /// Hypervisor constants: read only.
    pub const RODATA: Self = Self { write: Write::Deny, execute: Execute::Deny, cache: Cache::WriteBack, user: false };
    /// Hypervisor data: read + write, never executable.
    pub const DATA: Self = Self { write: Write::Allow, execute: Execute::Deny, cache: Cache::WriteBack, user: false };
    /// Device registers: read + write, uncached, never executable.
    pub const MMIO: Self = Self { write: Write::Allow, execute: Execute::Deny, cache: Cache::Uncached, user: false };
    /// DMA: the device may read.
    pub const DMA_READ: Self =
        Self { write: Write::Deny, execute: Execute::Deny, cache: Cache::WriteBack, user: false };
    /// DMA: the device may read and write.
    pub const DMA_READ_WRITE: Self = Self { write: Write::Allow, ..Self::DMA_READ };

    fn encode(self, size: PageSize, options: Options) -> u64 {
        if options.format == Format::VtdSecondLevel {
            let w = if self.write == Write::Allow { VTD_WRITE } else { 0 };
            let ps = if size == PageSize::Size4K { 0 } else { VTD_PAGE_SIZE };
            let snp = if options.snoop { VTD_SNOOP } else { 0 };
            return VTD_READ | w | ps | snp;
        }
        let mut e = Pte::PRESENT;
        if self.write == Write::Allow {
            e |= Pte::WRITABLE;
        }
        if self.user {
            e |= Pte::USER;
        }
        if self.execute == Execute::Deny && options.no_execute {
            e |= Pte::NO_EXECUTE;
        }
        if self.cache == Cache::Uncached {
            e |= Pte::CACHE_DISABLE | Pte::WRITE_THROUGH;
        }
        if size != PageSize::Size4K {
            e |= Pte::HUGE;
        }
        e.bits()
    }

    fn decode(entry: u64, format: Format) -> Self {
        if format == Format::VtdSecondLevel {
            let write = if entry & VTD_WRITE != 0 { Write::Allow } else { Write::Deny };
            return Self { write, ..Self::DMA_READ };
        }
        let e = Pte::from_bits_retain(entry);
        Self {
            write: if e.contains(Pte::WRITABLE) { Write::Allow } else { Write::Deny },
            execute: if e.contains(Pte::NO_EXECUTE) { Execute::Deny } else { Execute::Allow },
            cache: if e.contains(Pte::CACHE_DISABLE) { Cache::Uncached } else { Cache::WriteBack },
            user: e.contains(Pte::USER),
        }
    }
}

/// Entry format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Format {
    /// x86-64 paging: P, R/W, U/S, PWT/PCD, PS, XD.
    X86,
    /// VT-d second-level paging: R (bit 0), W (bit 1), PS (bit 7), SNP (bit 11, leaves, with
    /// `Options::snoop`); a non-leaf entry is R|W. Execute and memory type are not used (no
    /// execute requests; SNP forces snooping where the unit has snoop control).
    VtdSecondLevel,
}

/// Format options fixed per table tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Options {
    /// EFER.NXE is set: bit 63 means execute-disable (else it is reserved and never set).
    /// Ignored for VT-d.
    pub no_execute: bool,
    /// Largest leaf the hardware supports (1 GiB needs CPUID PDPE1GB or VT-d SLLPS bit 35).
    pub largest_page: PageSize,
    /// Entry format.
    pub format: Format,
    /// Levels: 4 for x86-64; 3 (39-bit), 4 (48-bit) or 5 (57-bit) for VT-d (SAGAW).
    pub levels: u8,
    /// VT-d only: set SNP (bit 11) in every leaf, so the unit snoops the CPU caches for DMA to
    /// the page whatever the request's No Snoop attribute. Only for units with snoop control
    /// (ECAP.SC); without it the bit is reserved. Ignored for x86-64.
    pub snoop: bool,
}

impl Options {
    /// x86-64 paging with 4 levels.
    pub const fn x86(no_execute: bool, largest_page: PageSize) -> Self {
        Self { no_execute, largest_page, format: Format::X86, levels: 4, snoop: false }
    }

    /// VT-d second-level paging with `levels` levels, clamped to what the format defines
    /// (3, 4 or 5: SAGAW bits 1–3).
    pub const fn vtd(levels: u8, largest_page: PageSize) -> Self {
        let levels = if levels < VTD_MIN_LEVELS {
            VTD_MIN_LEVELS
        } else if levels > MAX_LEVELS {
            MAX_LEVELS
        } else {
            levels
        };
        Self { no_execute: false, largest_page, format: Format::VtdSecondLevel, levels, snoop: false }
    }

    /// The same options with SNP set in VT-d leaves (`snoop`), for units with snoop control.
    pub const fn with_snoop(mut self, snoop: bool) -> Self {
        self.snoop = snoop;
        self
    }

    /// First address beyond what the tree translates: the canonical lower half for x86-64,
    /// the adjusted guest address width for VT-d (all of the 64-bit space when a hand-built
    /// `Options` names more levels than that can hold).
    pub const fn address_limit(&self) -> u64 {
        match self.format {
            Format::X86 => LOWER_HALF_END,
            Format::VtdSecondLevel => match 1u64.checked_shl(12 + 9 * self.levels as u32) {
                Some(limit) => limit,
                None => u64::MAX,
            },
        }
    }

    const fn table_entry(&self) -> u64 {
        match self.format {
            Format::X86 => TABLE_ENTRY,
            Format::VtdSecondLevel => VTD_READ | VTD_WRITE,
        }
    }

    /// Present (x86: P; VT-d: readable or writable).
    const fn present(&self, e: u64) -> bool {
        match self.format {
            Format::X86 => e & Pte::PRESENT.bits() != 0,
            Format::VtdSecondLevel => e & (VTD_READ | VTD_WRITE) != 0,
        }
    }
}

/// Most levels a tree has (x86-64 LA57, VT-d 57-bit).
pub const MAX_LEVELS: u8 = 5;
/// Fewest levels of a VT-d second-level tree (39-bit).
pub const VTD_MIN_LEVELS: u8 = 3;

/// VT-d second-level entry: read permission.
pub const VTD_READ: u64 = 1 << 0;
/// VT-d second-level entry: write permission.
pub const VTD_WRITE: u64 = 1 << 1;
/// VT-d second-level entry: page size (a 2 MiB or 1 GiB leaf).
pub const VTD_PAGE_SIZE: u64 = 1 << 7;
/// VT-d second-level leaf: snoop (SNP): DMA to the page snoops the CPU caches even when the
/// request carries the No Snoop attribute (VT-d spec §9.8; needs ECAP.SC).
pub const VTD_SNOOP: u64 = 1 << 11;

/// Where the tables live. The kernel implements it over the identity map; tests over a map.
pub trait TableMemory {
    /// A zeroed, 4 KiB-aligned frame for a new table, or `None` when memory is exhausted.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Takes back a table frame no entry points to any more. A CPU may still hold cached
    /// entries of it until its TLB and paging-structure caches are flushed: implementations
    /// must not reuse the frame before that.
    fn free_table(&mut self, table: u64);
    /// Reads entry `index` of the table at `table`.
    fn read_entry(&self, table: u64, index: usize) -> u64;
    /// Writes entry `index` of the table at `table`.
    fn write_entry(&mut self, table: u64, index: usize, value: u64);
}

/// Why a change could not be made. A failed `map` may leave part of the range mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MapError {
    /// An address or length is not 4 KiB-aligned.
    Unaligned(u64),
    /// The range leaves the canonical lower half or wraps.
    OutOfRange(u64),
    /// No frame for a new table.
    OutOfTables,
}

/// What a virtual address translates to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Translation {
    /// Physical address of the byte.
    pub phys: u64,
    /// Leaf permissions.
    pub attrs: Attrs,
    /// Leaf size.
    pub size: PageSize,
}

/// One tree of 4-level tables, owned through its root.
#[derive(Debug)]
pub struct PageTable<M: TableMemory> {
    root: u64,
    mem: M,
    options: Options,
}

/// Intermediate entries allow everything; leaves restrict.
const TABLE_ENTRY: u64 = Pte::PRESENT.bits() | Pte::WRITABLE.bits() | Pte::USER.bits();

const fn index_at(virt: u64, level: u8) -> usize {
    let shift = 12 + 9 * (level as u32).saturating_sub(1);
    match virt.checked_shr(shift) {
        Some(v) => (v & 0x1ff) as usize,
        None => 0,
    }
}

impl<M: TableMemory> PageTable<M> {
    /// An empty tree (one zeroed root table). `options.levels` is clamped to 1..=5.
    pub fn new(mut mem: M, mut options: Options) -> Result<Self, MapError> {
        options.levels = options.levels.clamp(1, MAX_LEVELS);
        let root = mem.alloc_table().ok_or(MapError::OutOfTables)?;
        Ok(Self { root, mem, options })
    }

    /// Physical address of the root (for CR3 or nCR3).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The table memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The options the tree was built with.
    pub fn options(&self) -> Options {
        self.options
    }

    /// The table memory, mutably (to reclaim tables it holds back).
    pub fn memory_mut(&mut self) -> &mut M {
        &mut self.mem
    }

    /// Maps `[virt, virt + len)` to `[phys, phys + len)` with `attrs`, using the largest pages
    /// alignment, `largest` and the CPU allow. Replaces whatever was mapped there.
    pub fn map(&mut self, virt: u64, phys: u64, len: u64, attrs: Attrs, largest: PageSize) -> Result<(), MapError> {
        check_range(virt, len, self.options.address_limit())?;
        if !phys.is_multiple_of(0x1000) {
            return Err(MapError::Unaligned(phys));
        }
        phys.checked_add(len).filter(|&e| e <= ADDR_MASK + 0x1000).ok_or(MapError::OutOfRange(phys))?;
        let largest = largest.min(self.options.largest_page);
        let mut off = 0;
        while off < len {
            let (v, p) = (virt + off, phys + off);
            let mut size = largest;
            while size.bytes() > len - off || v % size.bytes() != 0 || p % size.bytes() != 0 {
                size = size.smaller().unwrap_or(PageSize::Size4K);
                if size == PageSize::Size4K {
                    break;
                }
            }
            self.set_leaf(v, p, size, attrs)?;
            off += size.bytes();
        }
        Ok(())
    }

    /// Changes the permissions of every mapped page in the range, keeping its address
    /// (splitting large pages partly covered). Unmapped pages stay unmapped.
    pub fn protect(&mut self, virt: u64, len: u64, attrs: Attrs) -> Result<(), MapError> {
        check_range(virt, len, self.options.address_limit())?;
        let mut off = 0;
        while off < len {
            let v = virt + off;
            match self.lookup(v) {
                Err(span) => off += Self::skip(v, span, len - off),
                Ok(t) => {
                    let base = v & !(t.size.bytes() - 1);
                    if base == v && t.size.bytes() <= len - off {
                        self.set_leaf(v, t.phys, t.size, attrs)?;
                        off += t.size.bytes();
                    } else {
                        self.set_leaf(v, t.phys, PageSize::Size4K, attrs)?;
                        off += 0x1000;
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes every mapping in the range (splitting large pages partly covered).
    pub fn unmap(&mut self, virt: u64, len: u64) -> Result<(), MapError> {
        check_range(virt, len, self.options.address_limit())?;
        let mut off = 0;
        while off < len {
            let v = virt + off;
            match self.lookup(v) {
                Err(span) => off += Self::skip(v, span, len - off),
                Ok(t) => {
                    let size = if v.is_multiple_of(t.size.bytes()) && t.size.bytes() <= len - off {
                        t.size
                    } else {
                        PageSize::Size4K
                    };
                    let table = self.table_for(v, size.level())?;
                    self.mem.write_entry(table, index_at(v, size.level()), 0);
                    off += size.bytes();
                }
            }
        }
        Ok(())
    }

    /// Walks the tree for `virt`: its translation, or the size of the unmapped, aligned region
    /// around it (so sparse ranges are skipped a region at a time, not a page at a time).
    fn lookup(&self, virt: u64) -> Result<Translation, u64> {
        let mut table = self.root;
        for level in (1..=self.options.levels).rev() {
            let e = self.mem.read_entry(table, index_at(virt, level));
            let span = 1u64 << (12 + 9 * (u32::from(level) - 1));
            if !self.options.present(e) {
                return Err(span);
            }
            let leaf_size = match level {
                1 => Some(PageSize::Size4K),
                2 | 3 if e & Pte::HUGE.bits() != 0 => {
                    Some(if level == 2 { PageSize::Size2M } else { PageSize::Size1G })
                }
                _ => None,
            };
            if let Some(size) = leaf_size {
                let base = e & ADDR_MASK & !(size.bytes() - 1);
                return Ok(Translation {
                    phys: base + (virt & (size.bytes() - 1)),
                    attrs: Attrs::decode(e, self.options.format),
                    size,
                });
            }
            table = e & ADDR_MASK;
        }
        Err(0x1000)
    }

    /// Bytes from `v` to the end of the unmapped region of `span` bytes around it, capped at
    /// `remaining`.
    fn skip(v: u64, span: u64, remaining: u64) -> u64 {
        (span - (v & (span - 1))).min(remaining)
    }

    /// Frees every table of the tree (root included) through `free_table` and returns the
    /// table memory. Mapped frames are not touched. The caller invalidates hardware caches of
    /// the tree before reusing what `free_table` received.
    pub fn destroy(mut self) -> M {
        let (root, levels) = (self.root, self.options.levels);
        self.free_tree(root, levels);
        self.mem
    }

    /// Walks the tree for `virt`.
    pub fn translate(&self, virt: u64) -> Option<Translation> {
        if virt >= self.options.address_limit() {
            return None;
        }
        self.lookup(virt).ok()
    }

    /// The table at `level` covering `virt`, creating tables and splitting large pages above.
    fn table_for(&mut self, virt: u64, level: u8) -> Result<u64, MapError> {
        let mut table = self.root;
        for l in ((level + 1)..=self.options.levels).rev() {
            let idx = index_at(virt, l);
            let e = self.mem.read_entry(table, idx);
            let next = if !self.options.present(e) {
                let t = self.mem.alloc_table().ok_or(MapError::OutOfTables)?;
                self.mem.write_entry(table, idx, t | self.options.table_entry());
                t
            } else if e & Pte::HUGE.bits() != 0 && l > 1 {
                self.split(table, idx, l, e)?
            } else {
                e & ADDR_MASK
            };
            table = next;
        }
        Ok(table)
    }

    /// Replaces the large leaf `entry` at `table[idx]` (level `level`) by a table of 512
    /// smaller leaves with the same translation and permissions.
    fn split(&mut self, table: u64, idx: usize, level: u8, entry: u64) -> Result<u64, MapError> {
        let size = if level == 3 { PageSize::Size1G } else { PageSize::Size2M };
        let small = size.smaller().unwrap_or(PageSize::Size4K);
        let t = self.mem.alloc_table().ok_or(MapError::OutOfTables)?;
        let base = entry & ADDR_MASK & !(size.bytes() - 1);
        let mut flags = entry & !ADDR_MASK;
        if small == PageSize::Size4K {
            flags &= !Pte::HUGE.bits();
        }
        for i in 0..ENTRIES {
            self.mem.write_entry(t, i, (base + i as u64 * small.bytes()) | flags);
        }
        self.mem.write_entry(table, idx, t | self.options.table_entry());
        Ok(t)
    }

    fn set_leaf(&mut self, virt: u64, phys: u64, size: PageSize, attrs: Attrs) -> Result<(), MapError> {
        let level = size.level();
        let table = self.table_for(virt, level)?;
        let idx = index_at(virt, level);
        let old = self.mem.read_entry(table, idx);
        self.mem.write_entry(table, idx, phys | attrs.encode(size, self.options));
        if level > 1 && self.options.present(old) && old & Pte::HUGE.bits() == 0 {
            // A table sat where the large leaf went: its mappings are replaced. Freed only
            // now that no entry points to it (`TableMemory::free_table`'s contract).
            self.free_tree(old & ADDR_MASK, level - 1);
        }
        Ok(())
    }

    fn free_tree(&mut self, table: u64, level: u8) {
        if level > 1 {
            for i in 0..ENTRIES {
                let e = self.mem.read_entry(table, i);
                if self.options.present(e) && e & Pte::HUGE.bits() == 0 {
                    self.free_tree(e & ADDR_MASK, level - 1);
                }
            }
        }
        self.mem.free_table(table);
    }
}

fn check_range(virt: u64, len: u64, limit: u64) -> Result<(), MapError> {
    if !virt.is_multiple_of(0x1000) {
        return Err(MapError::Unaligned(virt));
    }
    if !len.is_multiple_of(0x1000) {
        return Err(MapError::Unaligned(len));
    }
    match virt.checked_add(len) {
        Some(end) if end <= limit => Ok(()),
        _ => Err(MapError::OutOfRange(virt)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    /// Tables in a hash map keyed by frame address; counts live tables. With `root` set
    /// (x86 format), freeing a table still reachable from the root is a test failure.
    #[derive(Default, Debug)]
    struct FakeTables {
        tables: HashMap<u64, [u64; ENTRIES]>,
        next: u64,
        limit: Option<usize>,
        freed: usize,
        root: Option<u64>,
    }

    impl FakeTables {
        /// Tables reachable from `root` through present non-leaf entries (x86, 4 levels).
        fn reachable(&self, root: u64) -> std::collections::HashSet<u64> {
            let mut seen = std::collections::HashSet::from([root]);
            let mut stack = std::vec![(root, 4u8)];
            while let Some((t, level)) = stack.pop() {
                if level == 1 {
                    continue;
                }
                for &e in &self.tables[&t] {
                    let leaf = (level == 2 || level == 3) && e & Pte::HUGE.bits() != 0;
                    let child = e & ADDR_MASK;
                    if e & 1 != 0 && !leaf && self.tables.contains_key(&child) && seen.insert(child) {
                        stack.push((child, level - 1));
                    }
                }
            }
            seen
        }
    }

    impl TableMemory for FakeTables {
        fn alloc_table(&mut self) -> Option<u64> {
            if self.limit.is_some_and(|l| self.tables.len() >= l) {
                return None;
            }
            self.next += 0x1000;
            let a = 0x1000_0000 + self.next;
            self.tables.insert(a, [0; ENTRIES]);
            Some(a)
        }
        fn free_table(&mut self, table: u64) {
            if let Some(root) = self.root {
                assert!(!self.reachable(root).contains(&table), "table {table:#x} freed while still linked");
            }
            assert!(self.tables.remove(&table).is_some(), "freeing unknown table {table:#x}");
            self.freed += 1;
        }
        fn read_entry(&self, table: u64, index: usize) -> u64 {
            self.tables[&table][index]
        }
        fn write_entry(&mut self, table: u64, index: usize, value: u64) {
            self.tables.get_mut(&table).expect("write to unknown table")[index] = value;
        }
    }

    const OPTS: Options = Options::x86(true, PageSize::Size1G);

    fn pt() -> PageTable<FakeTables> {
        PageTable::new(FakeTables::default(), OPTS).unwrap()
    }

    /// A tree whose fake checks that every freed table is already unlinked.
    fn checked_pt() -> PageTable<FakeTables> {
        let mut t = pt();
        t.mem.root = Some(t.root());
        t
    }

    #[test]
    fn index_and_flag_constants_match_the_sdm() {
        assert_eq!(index_at(0x0000_7fff_ffff_f000, 4), 255);
        assert_eq!(index_at(0x4020_1000, 3), 1);
        assert_eq!(index_at(0x4020_1000, 2), 1);
        assert_eq!(index_at(0x4020_1000, 1), 1);
        assert_eq!(Pte::HUGE.bits(), 0x80);
        assert_eq!(Pte::NO_EXECUTE.bits(), 0x8000_0000_0000_0000);
        assert_eq!(Attrs::MMIO.encode(PageSize::Size4K, OPTS), 0x8000_0000_0000_001b);
        assert_eq!(Attrs::TEXT.encode(PageSize::Size2M, OPTS), 0x81);
        // Without EFER.NXE bit 63 is reserved: never set.
        let no_nx = Options::x86(false, PageSize::Size1G);
        assert_eq!(Attrs::DATA.encode(PageSize::Size4K, no_nx), 0x3);
    }

    #[test]
    fn identity_map_uses_large_pages_where_aligned() {
        let mut t = pt();
        t.map(0x1000, 0x1000, 0x8040_0000 - 0x1000, Attrs::DATA, PageSize::Size1G).unwrap();
        assert_eq!(t.translate(0x1000).unwrap().size, PageSize::Size4K);
        assert_eq!(t.translate(0x20_0000).unwrap().size, PageSize::Size2M);
        assert_eq!(t.translate(0x4000_0000).unwrap().size, PageSize::Size1G);
        assert_eq!(t.translate(0x8020_0000).unwrap().size, PageSize::Size2M);
        assert_eq!(t.translate(0x8040_0000), None);
        assert_eq!(t.translate(0x0), None, "page zero stays unmapped");
        assert_eq!(t.translate(0x1234_5678).unwrap().phys, 0x1234_5678);
        // Largest page limited by the CPU.
        let mut t2 = PageTable::new(FakeTables::default(), Options::x86(true, PageSize::Size2M)).unwrap();
        t2.map(0, 0, 0x4000_0000, Attrs::DATA, PageSize::Size1G).unwrap();
        assert_eq!(t2.translate(0).unwrap().size, PageSize::Size2M);
    }

    #[test]
    fn protect_splits_a_large_page_and_keeps_the_rest() {
        let mut t = pt();
        t.map(0x20_0000, 0x20_0000, 0x20_0000, Attrs::DATA, PageSize::Size2M).unwrap();
        t.protect(0x20_1000, 0x1000, Attrs::TEXT).unwrap();
        assert_eq!(t.translate(0x20_1000).unwrap().attrs, Attrs::TEXT);
        assert_eq!(t.translate(0x20_1000).unwrap().size, PageSize::Size4K);
        assert_eq!(t.translate(0x20_0000).unwrap().attrs, Attrs::DATA);
        assert_eq!(t.translate(0x3f_f123).unwrap().phys, 0x3f_f123);
        assert_eq!(t.translate(0x3f_f123).unwrap().attrs, Attrs::DATA);
    }

    #[test]
    fn unmap_a_guard_page_inside_a_large_page() {
        let mut t = pt();
        t.map(0, 0, 0x4000_0000, Attrs::DATA, PageSize::Size1G).unwrap();
        t.unmap(0x1234_5000, 0x1000).unwrap();
        assert_eq!(t.translate(0x1234_5000), None);
        assert_eq!(t.translate(0x1234_4fff).unwrap().phys, 0x1234_4fff);
        assert_eq!(t.translate(0x1234_6000).unwrap().phys, 0x1234_6000);
    }

    #[test]
    fn large_leaf_over_existing_table_frees_the_table() {
        let mut t = checked_pt();
        t.map(0x20_0000, 0x20_0000, 0x1000, Attrs::DATA, PageSize::Size4K).unwrap();
        let before = t.memory().tables.len();
        t.map(0x20_0000, 0x80_0000, 0x20_0000, Attrs::RODATA, PageSize::Size2M).unwrap();
        assert_eq!(t.memory().tables.len(), before - 1);
        assert_eq!(t.translate(0x20_0010).unwrap().phys, 0x80_0010);
    }

    #[test]
    fn replaced_tables_are_unlinked_before_they_are_freed() {
        // A 1 GiB leaf over a PD holding a PT: both tables go, each only once unlinked.
        let mut t = checked_pt();
        t.map(0x4000_0000, 0x4000_0000, 0x1000, Attrs::DATA, PageSize::Size4K).unwrap();
        t.map(0x4020_0000, 0x4020_0000, 0x20_0000, Attrs::DATA, PageSize::Size2M).unwrap();
        let before = t.memory().freed;
        t.map(0x4000_0000, 0x8000_0000, 0x4000_0000, Attrs::DATA, PageSize::Size1G).unwrap();
        assert_eq!(t.memory().freed, before + 2);
        assert_eq!(t.translate(0x4000_1234).unwrap().phys, 0x8000_1234);
    }

    #[test]
    fn vtd_levels_are_clamped_and_limits_never_overflow() {
        assert_eq!(Options::vtd(6, PageSize::Size4K).levels, 5);
        assert_eq!(Options::vtd(200, PageSize::Size4K).address_limit(), 1 << 57);
        assert_eq!(Options::vtd(0, PageSize::Size4K).levels, 3);
        assert_eq!(Options::vtd(4, PageSize::Size4K).address_limit(), 1 << 48);
        // A hand-built `Options` with too many levels: no overflow anywhere.
        let wild = Options { levels: 9, ..Options::vtd(3, PageSize::Size2M) };
        assert_eq!(wild.address_limit(), u64::MAX);
        let mut t = PageTable::new(FakeTables::default(), wild).unwrap();
        assert_eq!(t.options().levels, MAX_LEVELS);
        t.map(0x1000, 0x2000, 0x1000, Attrs::DMA_READ, PageSize::Size4K).unwrap();
        assert_eq!(t.translate(0x1000).unwrap().phys, 0x2000);
        assert_eq!(index_at(u64::MAX, 9), 0);
    }

    #[test]
    fn errors_never_panic() {
        let mut t = pt();
        assert_eq!(t.map(0x1001, 0, 0x1000, Attrs::DATA, PageSize::Size4K), Err(MapError::Unaligned(0x1001)));
        assert_eq!(t.map(0, 1, 0x1000, Attrs::DATA, PageSize::Size4K), Err(MapError::Unaligned(1)));
        assert_eq!(t.map(0, 0, 0x1001, Attrs::DATA, PageSize::Size4K), Err(MapError::Unaligned(0x1001)));
        assert_eq!(
            t.map(LOWER_HALF_END - 0x1000, 0, 0x2000, Attrs::DATA, PageSize::Size4K),
            Err(MapError::OutOfRange(LOWER_HALF_END - 0x1000))
        );
        assert_eq!(t.map(0, !0xfff, 0x2000, Attrs::DATA, PageSize::Size4K), Err(MapError::OutOfRange(!0xfff)));
        assert_eq!(t.translate(u64::MAX), None);
        let mut tiny = PageTable::new(FakeTables { limit: Some(2), ..Default::default() }, OPTS).unwrap();
        assert_eq!(tiny.map(0, 0, 0x1000, Attrs::DATA, PageSize::Size4K), Err(MapError::OutOfTables));
    }

    #[test]
    fn sparse_unmap_is_fast_and_destroy_frees_every_table() {
        let mut t = PageTable::new(FakeTables::default(), Options::vtd(3, PageSize::Size2M)).unwrap();
        t.map(0x7f_0000_0000, 0x1000, 0x1000, Attrs::DMA_READ, PageSize::Size4K).unwrap();
        t.map(0x1000, 0x2000, 0x1000, Attrs::DMA_READ, PageSize::Size4K).unwrap();
        // The whole 512 GiB space: one region-sized step per empty region.
        t.unmap(0, 1 << 39).unwrap();
        assert_eq!(t.translate(0x7f_0000_0000), None);
        let tables = t.memory().tables.len();
        let mem = t.destroy();
        assert_eq!(mem.freed, tables);
        assert!(mem.tables.is_empty());
    }

    #[test]
    fn vtd_second_level_format() {
        let opts = Options::vtd(3, PageSize::Size2M);
        let mut t = PageTable::new(FakeTables::default(), opts).unwrap();
        t.map(0x10_0000, 0x7_0000_0000, 0x1000, Attrs::DMA_READ, PageSize::Size2M).unwrap();
        t.map(0x20_0000, 0x40_0000, 0x20_0000, Attrs::DMA_READ_WRITE, PageSize::Size2M).unwrap();
        assert_eq!(t.translate(0x10_0123).unwrap().phys, 0x7_0000_0123);
        assert_eq!(t.translate(0x10_0000).unwrap().attrs, Attrs::DMA_READ);
        assert_eq!(t.translate(0x20_0000).unwrap().attrs, Attrs::DMA_READ_WRITE);
        assert_eq!(t.translate(0x20_0000).unwrap().size, PageSize::Size2M);
        // 39-bit address space: three levels; the root covers 512 GiB.
        assert_eq!(opts.address_limit(), 1 << 39);
        assert_eq!(t.map(1 << 39, 0, 0x1000, Attrs::DMA_READ, PageSize::Size4K), Err(MapError::OutOfRange(1 << 39)));
        // Raw entries: leaf R (+W), PS on large leaves, non-leaf R|W, nothing else.
        let root = t.root();
        let l3 = t.memory().tables[&root][0];
        assert_eq!(l3 & 0xfff, 0b11);
        let l2 = t.memory().tables[&(l3 & ADDR_MASK)][1];
        assert_eq!(l2 & 0xfff, 0b11 | VTD_PAGE_SIZE);
        let pt = t.memory().tables[&(t.memory().tables[&(l3 & ADDR_MASK)][0] & ADDR_MASK)][0x100];
        assert_eq!(pt, 0x7_0000_0000 | VTD_READ);
        t.unmap(0x20_0000, 0x1000).unwrap();
        assert_eq!(t.translate(0x20_0000), None);
        assert_eq!(t.translate(0x20_1000).unwrap().attrs, Attrs::DMA_READ_WRITE, "split keeps the rest");
    }

    #[test]
    fn vtd_snoop_sets_snp_in_leaves_only() {
        let opts = Options::vtd(3, PageSize::Size2M).with_snoop(true);
        let mut t = PageTable::new(FakeTables::default(), opts).unwrap();
        t.map(0x1000, 0x5000, 0x1000, Attrs::DMA_READ, PageSize::Size4K).unwrap();
        t.map(0x20_0000, 0x40_0000, 0x20_0000, Attrs::DMA_READ_WRITE, PageSize::Size2M).unwrap();
        let root = t.root();
        let l3 = t.memory().tables[&root][0];
        assert_eq!(l3 & VTD_SNOOP, 0, "non-leaf entries never carry SNP");
        let pd = l3 & ADDR_MASK;
        assert_eq!(t.memory().tables[&pd][1], 0x40_0000 | VTD_READ | VTD_WRITE | VTD_PAGE_SIZE | VTD_SNOOP);
        let pt = t.memory().tables[&pd][0] & ADDR_MASK;
        assert_eq!(t.memory().tables[&pt][1], 0x5000 | VTD_READ | VTD_SNOOP);
        // A split keeps SNP on every small leaf.
        t.unmap(0x20_0000, 0x1000).unwrap();
        let pt2 = t.memory().tables[&pd][1] & ADDR_MASK;
        assert!(t.memory().tables[&pt2][1..].iter().all(|e| e & VTD_SNOOP != 0));
        // Without snoop control, bit 11 (reserved then) stays clear.
        let mut t = PageTable::new(FakeTables::default(), Options::vtd(3, PageSize::Size2M)).unwrap();
        t.map(0x1000, 0x5000, 0x1000, Attrs::DMA_READ, PageSize::Size4K).unwrap();
        let l3 = t.memory().tables[&t.root()][0] & ADDR_MASK;
        let pt = t.memory().tables[&l3][0] & ADDR_MASK;
        assert_eq!(t.memory().tables[&pt][1] & VTD_SNOOP, 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Map { page: u64, frame: u64, pages: u64, attrs: u8 },
        Unmap { page: u64, pages: u64 },
        Protect { page: u64, pages: u64, attrs: u8 },
    }

    fn attrs_of(n: u8) -> Attrs {
        [Attrs::TEXT, Attrs::RODATA, Attrs::DATA, Attrs::MMIO][n as usize % 4]
    }

    fn op() -> impl Strategy<Value = Op> {
        // A 4 MiB window so large pages and splits happen often.
        prop_oneof![
            // Half of the maps are 2 MiB-aligned on both sides, so large leaves appear.
            (0u64..1024, 0u64..1024, 1u64..600, 0u8..4).prop_map(|(page, frame, pages, attrs)| {
                let (page, frame) = if page % 2 == 0 { (page & !0x1ff, frame & !0x1ff) } else { (page, frame) };
                Op::Map { page, frame, pages, attrs }
            }),
            (0u64..1024, 1u64..600).prop_map(|(page, pages)| Op::Unmap { page, pages }),
            (0u64..1024, 1u64..600, 0u8..4).prop_map(|(page, pages, attrs)| Op::Protect { page, pages, attrs }),
        ]
    }

    proptest! {
        /// Any sequence of map/unmap/protect gives the same translation, page by page, as a
        /// flat model, and never leaks or double-frees a table.
        #[test]
        fn matches_flat_model(ops in proptest::collection::vec(op(), 1..20)) {
            let mut t = checked_pt();
            let mut model: BTreeMap<u64, (u64, Attrs)> = BTreeMap::new();
            for o in &ops {
                match *o {
                    Op::Map { page, frame, pages, attrs } => {
                        t.map(page * 0x1000, frame * 0x1000, pages * 0x1000, attrs_of(attrs), PageSize::Size1G).unwrap();
                        for i in 0..pages { model.insert(page + i, (frame + i, attrs_of(attrs))); }
                    }
                    Op::Unmap { page, pages } => {
                        t.unmap(page * 0x1000, pages * 0x1000).unwrap();
                        for i in 0..pages { model.remove(&(page + i)); }
                    }
                    Op::Protect { page, pages, attrs } => {
                        t.protect(page * 0x1000, pages * 0x1000, attrs_of(attrs)).unwrap();
                        for i in 0..pages {
                            if let Some(e) = model.get_mut(&(page + i)) { e.1 = attrs_of(attrs); }
                        }
                    }
                }
            }
            for page in 0..1700u64 {
                let got = t.translate(page * 0x1000 + 0x123).map(|x| (x.phys, x.attrs));
                let want = model.get(&page).map(|&(f, a)| (f * 0x1000 + 0x123, a));
                prop_assert_eq!(got, want, "page {:#x}", page);
            }
        }
    }
}
