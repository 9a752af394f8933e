//! A scripted VT-d unit and DMA memory for host tests. The registers follow the spec's
//! handshakes (GSTS mirrors GCMD; one-shots set their status), the invalidation queue is
//! processed when IQT is written (wait descriptors write their completion word), fault records
//! can be injected, and any status bit or the queue can be made to stall. Like hardware, the
//! queue stops at a descriptor it refuses (an unknown type), sets FSTS.IQE with IQH pointing at
//! it, fetches nothing while IQE is set, and resumes from IQH once IQE is cleared.

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
    pub words: BTreeMap<u64, u64>,
    pub next: u64,
    pub allocated: BTreeSet<u64>,
    pub freed: Vec<u64>,
    pub flushed: Vec<(u64, u64)>,
    pub ops: Vec<DmaOp>,
    pub fail_alloc: bool,
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
        s.ops.push(DmaOp::Write(paddr, value));
    }
    fn flush(&self, paddr: u64, len: u64) {
        let mut s = self.state.borrow_mut();
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
}

#[derive(Clone, Debug)]
pub struct FakeUnit {
    pub state: Rc<RefCell<UnitState>>,
    pub dma: FakeDma,
}

/// Fault recording registers offset of QEMU's unit (bytes).
pub const FRO: u64 = 0x220;

/// QEMU 7.2's intel-iommu: 256 domains, 39-bit (3-level), fault records at 0x220 (`nfr` of
/// them), IOTLB registers at 0xf0, 2M/1G pages, QI, IR, PT, not coherent.
pub fn qemu_unit(dma: FakeDma, nfr: u8) -> FakeUnit {
    unit_with_nd(dma, nfr, 2)
}

/// `qemu_unit` with another CAP.ND (domains: 2^(4 + 2·ND)).
pub fn unit_with_nd(dma: FakeDma, nfr: u8, nd: u64) -> FakeUnit {
    let cap = nd
        | (0b00010 << 8)
        | (38 << 16)
        | ((FRO / 16) << 24)
        | (0b11 << 34)
        | (1 << 39)
        | (u64::from(nfr - 1) << 40)
        | (0x12 << 48);
    let ecap = 0b10 | (1 << 3) | (1 << 6) | ((0xf0 / 16) << 8);
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
            let lo = self.dma.read64(at);
            let hi = self.dma.read64(at + 8);
            if !matches!(lo & 0xf, 1 | 2 | 4 | 5) {
                // Refused: IQE, head stays on it, nothing more is fetched.
                s.regs32.insert(regs::FSTS, fsts | regs::Fsts::IQE.bits());
                return;
            }
            s.descriptors.push(lo);
            if lo & 0xf == 5 && lo & (1 << 5) != 0 {
                // Status write: the low dword of the completion word.
                let old = self.dma.read64(hi);
                self.dma.write64(hi, (old & !0xffff_ffff) | (lo >> 32));
            }
            s.head = (s.head + 1) % 256;
        }
    }
}

impl regs::VtdRegs for FakeUnit {
    fn read32(&self, offset: u64) -> u32 {
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
