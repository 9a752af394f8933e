//! A scripted VT-d unit and DMA memory for host tests. The registers follow the spec's
//! handshakes (GSTS mirrors GCMD; one-shots set their status; a write-buffer flush clears WBFS
//! after a poll), the invalidation queue is processed when IQT is written (wait descriptors
//! write their completion word), fault records can be injected (also while a drain clears
//! another record), and any status bit or the queue can be made to stall. Like hardware, the
//! queue stops at a descriptor it refuses (an unknown type), sets FSTS.IQE with IQH pointing at
//! it, fetches nothing while IQE is set, and resumes from IQH once IQE is cleared.
//!
//! DMA memory has two views, as on a unit that does not snoop the CPU caches: what the CPU
//! wrote (`words`) and what the unit reads (`memory`), which a CPU write reaches only through a
//! flush of its cache line. The unit reads descriptors, tables and entries from `memory` only,
//! so a missing flush shows up as the unit seeing stale data. `FakeUnit::translate` and
//! `FakeUnit::remap` walk the unit's view as the spec describes (root, context, second-level
//! tables; IRTA and the remapping table), independently of the driver's own structures.

use crate::DmaMemory;
use crate::vtd::regs::{self, Gcmd, Gsts};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::vec::Vec;

/// One access to DMA memory, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaOp {
    Write(u64, u64),
    Flush(u64, u64),
}

/// DMA memory: sparse pages, a bump allocator, a flush log and a log of writes and flushes.
#[derive(Clone, Debug, Default)]
pub struct FakeDma {
    pub state: Rc<RefCell<DmaState>>,
}

#[derive(Debug, Default)]
pub struct DmaState {
    /// The CPU's view (what `read64`/`write64` see).
    pub words: BTreeMap<u64, u64>,
    /// The unit's view: CPU writes arrive here when their cache line is flushed (or at once
    /// with `coherent`).
    pub memory: BTreeMap<u64, u64>,
    /// The unit snoops the CPU caches: every write is visible to it at once.
    pub coherent: bool,
    pub next: u64,
    pub allocated: BTreeSet<u64>,
    pub freed: Vec<u64>,
    pub flushed: Vec<(u64, u64)>,
    pub ops: Vec<DmaOp>,
    pub fail_alloc: bool,
}

impl FakeDma {
    /// What the unit reads at `paddr`.
    pub fn device_read64(&self, paddr: u64) -> u64 {
        self.state.borrow().memory.get(&paddr).copied().unwrap_or(0)
    }

    /// A write by the unit (completion words): reaches memory, and the CPU sees it (DMA
    /// writes snoop the CPU caches).
    pub fn device_write64(&self, paddr: u64, value: u64) {
        let mut s = self.state.borrow_mut();
        s.memory.insert(paddr, value);
        s.words.insert(paddr, value);
    }
}

impl DmaMemory for FakeDma {
    fn alloc(&self, pages: u64, limit: u64) -> Option<u64> {
        let mut s = self.state.borrow_mut();
        if s.fail_alloc {
            return None;
        }
        if s.next == 0 {
            s.next = 0x10_0000;
        }
        let at = s.next;
        s.next += pages * 4096;
        if s.next > limit {
            return None;
        }
        for p in 0..pages {
            s.allocated.insert(at + p * 4096);
        }
        Some(at)
    }
    fn free(&self, paddr: u64, pages: u64) {
        let mut s = self.state.borrow_mut();
        for p in 0..pages {
            assert!(s.allocated.remove(&(paddr + p * 4096)), "freeing {paddr:#x} twice or never allocated");
            s.freed.push(paddr + p * 4096);
        }
    }
    fn read64(&self, paddr: u64) -> u64 {
        self.state.borrow().words.get(&paddr).copied().unwrap_or(0)
    }
    fn write64(&self, paddr: u64, value: u64) {
        assert_eq!(paddr % 8, 0);
        let mut s = self.state.borrow_mut();
        s.words.insert(paddr, value);
        if s.coherent {
            s.memory.insert(paddr, value);
        }
        s.ops.push(DmaOp::Write(paddr, value));
    }
    fn flush(&self, paddr: u64, len: u64) {
        let mut s = self.state.borrow_mut();
        // Whole cache lines, as `clflush` does.
        let (start, end) = (paddr & !63, (paddr + len).next_multiple_of(64));
        let lines: Vec<(u64, u64)> = s.words.range(start..end).map(|(&a, &v)| (a, v)).collect();
        s.memory.extend(lines);
        s.flushed.push((paddr, len));
        s.ops.push(DmaOp::Flush(paddr, len));
    }
}

/// The unit's registers and behaviour.
#[derive(Debug, Default)]
pub struct UnitState {
    pub regs32: BTreeMap<u64, u32>,
    pub regs64: BTreeMap<u64, u64>,
    pub gcmd_writes: Vec<u32>,
    /// Status bits that never follow their command.
    pub stuck: u32,
    /// The queue is never processed.
    pub queue_stalled: bool,
    /// Descriptors processed, in order (low quadword).
    pub descriptors: Vec<u64>,
    pub head: u64,
    /// Write-buffer flushes requested (GCMD.WBF).
    pub write_buffer_flushes: u32,
    /// GSTS reads left until a pending write-buffer flush completes (WBFS clears).
    pub wbfs_reads: u32,
    /// When a drain clears fault record `.0`, a new fault appears in record `.1` (low and
    /// high quadwords `.2`, `.3`): the unit records while software drains.
    pub on_clear: Vec<(u64, u64, u64, u64)>,
}

#[derive(Clone, Debug)]
pub struct FakeUnit {
    pub state: Rc<RefCell<UnitState>>,
    pub dma: FakeDma,
}

/// Fault recording registers offset of QEMU's unit (bytes).
pub const FRO: u64 = 0x220;

/// QEMU 7.2's intel-iommu: 256 domains, 39-bit (3-level), fault records at 0x220 (`nfr` of
/// them), IOTLB registers at 0xf0, 2M/1G pages, read and write draining, QI, IR, PT, not
/// coherent, no snoop control, no required write-buffer flushing.
pub fn qemu_unit(dma: FakeDma, nfr: u8) -> FakeUnit {
    unit_with_nd(dma, nfr, 2)
}

/// `qemu_unit` with another CAP.ND (domains: 2^(4 + 2·ND)).
pub fn unit_with_nd(dma: FakeDma, nfr: u8, nd: u64) -> FakeUnit {
    unit_with(dma, nfr, |cap, _| *cap = (*cap & !0x7) | nd)
}

/// CAP.DWD (bit 54) and CAP.DRD (bit 55).
pub const CAP_DRAIN: u64 = 3 << 54;

/// `qemu_unit` with its CAP and ECAP values changed by `edit`. ECAP.C also makes the DMA
/// memory coherent (the unit then sees CPU writes at once).
pub fn unit_with(dma: FakeDma, nfr: u8, edit: impl FnOnce(&mut u64, &mut u64)) -> FakeUnit {
    let mut cap = 2
        | (0b00010 << 8)
        | (38 << 16)
        | ((FRO / 16) << 24)
        | (0b11 << 34)
        | (1 << 39)
        | (u64::from(nfr - 1) << 40)
        | (0x12 << 48)
        | CAP_DRAIN;
    let mut ecap = 0b10 | (1 << 3) | (1 << 6) | ((0xf0 / 16) << 8);
    edit(&mut cap, &mut ecap);
    dma.state.borrow_mut().coherent = ecap & 1 != 0;
    let state = UnitState::default();
    let u = FakeUnit { state: Rc::new(RefCell::new(state)), dma };
    u.state.borrow_mut().regs64.insert(regs::CAP, cap);
    u.state.borrow_mut().regs64.insert(regs::ECAP, ecap);
    u.state.borrow_mut().regs32.insert(regs::VER, 0x10);
    u
}

impl FakeUnit {
    /// Places a fault record `i` (sets F) and PPF.
    pub fn inject_fault(&self, i: u64, lo: u64, hi: u64) {
        let mut s = self.state.borrow_mut();
        let at = FRO + 16 * i;
        s.regs64.insert(at, lo);
        s.regs64.insert(at + 8, hi | 1 << 63);
        let f = s.regs32.get(&regs::FSTS).copied().unwrap_or(0);
        s.regs32.insert(regs::FSTS, f | regs::Fsts::PPF.bits());
    }

    /// What a DMA request from `source_id` to `iova` becomes, walked through the tables as the
    /// unit sees them (flushed memory): `Ok((physical address, SNP set))`, or the fault reason
    /// (VT-d spec Appendix A). With translation off, requests pass untranslated.
    pub fn translate(&self, source_id: u16, iova: u64, write: bool) -> Result<(u64, bool), u8> {
        let s = self.state.borrow();
        if s.regs32.get(&regs::GSTS).copied().unwrap_or(0) & Gsts::TES.bits() == 0 {
            return Ok((iova, false));
        }
        let haw = 39;
        let addr = |e: u64| e & 0x000f_ffff_ffff_f000;
        let root = s.regs64.get(&regs::RTADDR).copied().unwrap_or(0) & !0xfff;
        let re = self.dma.device_read64(root + 16 * u64::from(source_id >> 8));
        if re & 1 == 0 {
            return Err(0x01);
        }
        let at = addr(re) + 16 * u64::from(source_id & 0xff);
        let (lo, hi) = (self.dma.device_read64(at), self.dma.device_read64(at + 8));
        if lo & 1 == 0 {
            return Err(0x02);
        }
        let levels = match (hi & 0x7, (lo >> 2) & 0x3) {
            (aw @ 1..=3, 0) => aw as u32 + 2,
            _ => return Err(0x03),
        };
        if iova >> (12 + 9 * levels) != 0 {
            return Err(0x04);
        }
        let mut table = addr(lo);
        for level in (1..=levels).rev() {
            let e = self.dma.device_read64(table + 8 * ((iova >> (12 + 9 * (level - 1))) & 0x1ff));
            if e & if write { 2 } else { 1 } == 0 {
                return Err(if write { 0x05 } else { 0x06 });
            }
            if addr(e) >> haw != 0 {
                return Err(0x0c);
            }
            let leaf = level == 1 || (level <= 3 && e & (1 << 7) != 0);
            if leaf {
                let size = 1u64 << (12 + 9 * (level - 1));
                return Ok(((addr(e) & !(size - 1)) | (iova & (size - 1)), e & (1 << 11) != 0));
            }
            table = addr(e);
        }
        Err(0x07)
    }

    /// Where a remappable interrupt from `source_id` through entry `handle` goes, read from the
    /// remapping table as the unit sees it: `Ok((destination APIC ID, vector))`, or the fault
    /// reason (20h–26h).
    pub fn remap(&self, source_id: u16, handle: u16) -> Result<(u32, u8), u8> {
        let s = self.state.borrow();
        if s.regs32.get(&regs::GSTS).copied().unwrap_or(0) & Gsts::IRES.bits() == 0 {
            return Err(0x25);
        }
        let irta = s.regs64.get(&regs::IRTA).copied().unwrap_or(0);
        if u64::from(handle) >= 2u64 << (irta & 0xf) {
            return Err(0x21);
        }
        let at = (irta & !0xfff) + 16 * u64::from(handle);
        let (lo, hi) = (self.dma.device_read64(at), self.dma.device_read64(at + 8));
        if lo & 1 == 0 {
            return Err(0x22);
        }
        // SVT 01b with SQ 00b: all 16 bits of the requester ID compared.
        if (hi >> 18) & 0x3 == 0b01 && (hi >> 16) & 0x3 == 0 && hi as u16 != source_id {
            return Err(0x26);
        }
        let dest = if irta & regs::IRTA_EIME != 0 { (lo >> 32) as u32 } else { ((lo >> 40) & 0xff) as u32 };
        Ok((dest, (lo >> 16) as u8))
    }

    fn process_queue(&self) {
        let mut s = self.state.borrow_mut();
        let fsts = s.regs32.get(&regs::FSTS).copied().unwrap_or(0);
        if s.queue_stalled || fsts & regs::Fsts::IQE.bits() != 0 {
            return;
        }
        let iqa = s.regs64.get(&regs::IQA).copied().unwrap_or(0) & !0xfff;
        let tail = s.regs64.get(&regs::IQT).copied().unwrap_or(0) >> 4;
        while s.head != tail {
            let at = iqa + s.head * 16;
            let lo = self.dma.device_read64(at);
            let hi = self.dma.device_read64(at + 8);
            if !matches!(lo & 0xf, 1 | 2 | 4 | 5) {
                // Refused: IQE, head stays on it, nothing more is fetched.
                s.regs32.insert(regs::FSTS, fsts | regs::Fsts::IQE.bits());
                return;
            }
            s.descriptors.push(lo);
            if lo & 0xf == 5 && lo & (1 << 5) != 0 {
                // Status write: the low dword of the completion word.
                let old = self.dma.device_read64(hi);
                self.dma.device_write64(hi, (old & !0xffff_ffff) | (lo >> 32));
            }
            s.head = (s.head + 1) % 256;
        }
    }
}

impl regs::VtdRegs for FakeUnit {
    fn read32(&self, offset: u64) -> u32 {
        if offset == regs::GSTS {
            let mut s = self.state.borrow_mut();
            if s.wbfs_reads > 0 && s.stuck & Gsts::WBFS.bits() == 0 {
                s.wbfs_reads -= 1;
                if s.wbfs_reads == 0 {
                    let g = s.regs32.get(&regs::GSTS).copied().unwrap_or(0);
                    s.regs32.insert(regs::GSTS, g & !Gsts::WBFS.bits());
                }
            }
        }
        let s = self.state.borrow();
        if offset == regs::FSTS {
            // PPF reads 1 while any record holds a fault.
            let any = (0..8u64).any(|i| s.regs64.get(&(FRO + 8 + 16 * i)).is_some_and(|h| h >> 63 != 0));
            let f = s.regs32.get(&offset).copied().unwrap_or(0) & !regs::Fsts::PPF.bits();
            return f | if any { regs::Fsts::PPF.bits() } else { 0 };
        }
        s.regs32.get(&offset).copied().unwrap_or(0)
    }

    fn write32(&self, offset: u64, value: u32) {
        let mut s = self.state.borrow_mut();
        match offset {
            regs::GCMD => {
                s.gcmd_writes.push(value);
                let stuck = s.stuck;
                let mut gsts = s.regs32.get(&regs::GSTS).copied().unwrap_or(0);
                for bit in [Gcmd::TE, Gcmd::QIE, Gcmd::IRE, Gcmd::CFI] {
                    if bit.bits() & stuck == 0 {
                        gsts = (gsts & !bit.bits()) | (value & bit.bits());
                    }
                }
                for (cmd, st) in [(Gcmd::SRTP, Gsts::RTPS), (Gcmd::SIRTP, Gsts::IRTPS)] {
                    if value & cmd.bits() != 0 && st.bits() & stuck == 0 {
                        gsts |= st.bits();
                    }
                }
                let rwbf = s.regs64.get(&regs::CAP).is_some_and(|c| c & (1 << 4) != 0);
                if value & Gcmd::WBF.bits() != 0 && rwbf {
                    // Pending until the flush is done: WBFS clears after a poll.
                    s.write_buffer_flushes += 1;
                    gsts |= Gsts::WBFS.bits();
                    s.wbfs_reads = 2;
                }
                s.regs32.insert(regs::GSTS, gsts);
            }
            regs::FSTS => {
                let f = s.regs32.get(&offset).copied().unwrap_or(0);
                s.regs32.insert(offset, f & !(value & regs::FSTS_RW1C));
                if f & value & regs::Fsts::IQE.bits() != 0 {
                    // IQE cleared: fetching resumes at IQH.
                    drop(s);
                    self.process_queue();
                }
            }
            o if (FRO..FRO + 0x100).contains(&o) && o % 16 == 12 => {
                // F bit: write 1 to clear.
                if value & (1 << 31) != 0 {
                    let hi = s.regs64.get(&(o - 4)).copied().unwrap_or(0);
                    s.regs64.insert(o - 4, hi & !(1 << 63));
                    let slot = (o - FRO) / 16;
                    if let Some(i) = s.on_clear.iter().position(|h| h.0 == slot) {
                        let (_, at, lo, hi) = s.on_clear.remove(i);
                        s.regs64.insert(FRO + 16 * at, lo);
                        s.regs64.insert(FRO + 16 * at + 8, hi | 1 << 63);
                    }
                }
            }
            _ => {
                s.regs32.insert(offset, value);
            }
        }
    }

    fn read64(&self, offset: u64) -> u64 {
        let s = self.state.borrow();
        if offset == regs::IQH {
            return s.head << 4;
        }
        s.regs64.get(&offset).copied().unwrap_or(0)
    }

    fn write64(&self, offset: u64, value: u64) {
        self.state.borrow_mut().regs64.insert(offset, value);
        if offset == regs::IQT {
            self.process_queue();
        }
        if offset == regs::IQA {
            self.state.borrow_mut().head = 0;
        }
    }
}
