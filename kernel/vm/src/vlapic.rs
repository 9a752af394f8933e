//! A minimal virtual local APIC (xAPIC register layout, MMIO at the guest's 0xFEE00000): ID,
//! version, TPR/PPR, EOI, ISR/IRR (the IRR is the shared [`PendingVectors`]), spurious vector,
//! error status, self-IPIs through the ICR, and the LVT timer (one-shot and periodic). Enough
//! for test guests and small drivers; the rest of the page reads as zero and ignores writes.
//!
//! Time is the host TSC: the timer counts at the TSC rate divided by the divide configuration
//! (`BootInfo::apic_timer_hz` is the TSC rate).

use crate::pending::{FIRST_VECTOR, PendingVectors, VectorSet};

/// Register offsets (Intel SDM Vol. 3 Table 11-1).
pub mod reg {
    /// Local APIC ID.
    pub const ID: u32 = 0x20;
    /// Version.
    pub const VERSION: u32 = 0x30;
    /// Task priority.
    pub const TPR: u32 = 0x80;
    /// Arbitration priority.
    pub const APR: u32 = 0x90;
    /// Processor priority.
    pub const PPR: u32 = 0xa0;
    /// End of interrupt.
    pub const EOI: u32 = 0xb0;
    /// Logical destination.
    pub const LDR: u32 = 0xd0;
    /// Destination format.
    pub const DFR: u32 = 0xe0;
    /// Spurious-interrupt vector.
    pub const SVR: u32 = 0xf0;
    /// In-service register, 8 × 32 bits, 16 bytes apart.
    pub const ISR: u32 = 0x100;
    /// Trigger mode register.
    pub const TMR: u32 = 0x180;
    /// Interrupt request register.
    pub const IRR: u32 = 0x200;
    /// Error status.
    pub const ESR: u32 = 0x280;
    /// LVT CMCI.
    pub const LVT_CMCI: u32 = 0x2f0;
    /// Interrupt command, low half.
    pub const ICR_LOW: u32 = 0x300;
    /// Interrupt command, high half.
    pub const ICR_HIGH: u32 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u32 = 0x320;
    /// LVT thermal sensor.
    pub const LVT_THERMAL: u32 = 0x330;
    /// LVT performance counters.
    pub const LVT_PERF: u32 = 0x340;
    /// LVT LINT0.
    pub const LVT_LINT0: u32 = 0x350;
    /// LVT LINT1.
    pub const LVT_LINT1: u32 = 0x360;
    /// LVT error.
    pub const LVT_ERROR: u32 = 0x370;
    /// Timer initial count.
    pub const TIMER_INITIAL: u32 = 0x380;
    /// Timer current count.
    pub const TIMER_CURRENT: u32 = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: u32 = 0x3e0;
}

/// Version register: version 0x14 (integrated xAPIC), 6 LVT entries (max LVT index 5).
pub const VERSION_VALUE: u32 = 0x14 | 5 << 16;
/// LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;
/// SVR software-enable bit.
pub const SVR_ENABLED: u32 = 1 << 8;
/// ESR: a send of an illegal vector (bit 5) / receive of one (bit 6).
const ESR_SEND_ILLEGAL: u32 = 1 << 5;

/// Timer mode (LVT timer bits 18:17).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TimerMode {
    /// Counts down once.
    OneShot,
    /// Reloads the initial count at zero.
    Periodic,
}

/// What a register write did that the caller must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum WriteEffect {
    /// Nothing beyond the register.
    None,
    /// An EOI retired this vector (None: EOI with nothing in service).
    Eoi(Option<u8>),
    /// A self-IPI raised this vector.
    SelfIpi(u8),
    /// The timer was (re)armed or stopped: the caller re-evaluates host timer needs.
    Timer,
    /// An ICR write the virtual APIC does not carry out (IPIs to other CPUs, INIT, SIPI,
    /// NMI...): counted and dropped.
    UnsupportedIpi(u32),
    /// A write to a read-only or unknown register: dropped.
    Ignored,
}

/// The register file of one vCPU's virtual local APIC. The IRR lives outside (shared).
#[derive(Clone, Debug)]
pub struct VLapic {
    id: u8,
    tpr: u8,
    svr: u32,
    isr: VectorSet,
    /// The highest in-service vector (0 when none), kept with `isr`.
    isr_highest: u8,
    esr: u32,
    icr_high: u32,
    ldr: u32,
    dfr: u32,
    lvt_timer: u32,
    lvt: [u32; 6],
    divide: u32,
    initial: u32,
    /// TSC at which the current count was `initial`.
    start_tsc: u64,
    /// TSC at which the timer fires next, when armed.
    deadline: Option<u64>,
    /// Vectors the guest asked to take without an EOI (`hypercall::AUTO_EOI`).
    auto_eoi: VectorSet,
}

impl VLapic {
    /// After reset, with the APIC software-enabled (SVR 0x1FF): the guest boot protocol starts
    /// guests with a usable APIC. Every LVT is masked.
    pub fn new(id: u8) -> Self {
        Self {
            id,
            tpr: 0,
            svr: SVR_ENABLED | 0xff,
            isr: VectorSet::EMPTY,
            isr_highest: 0,
            esr: 0,
            icr_high: 0,
            ldr: 0,
            dfr: u32::MAX,
            lvt_timer: LVT_MASKED,
            lvt: [LVT_MASKED; 6],
            divide: 0,
            initial: 0,
            start_tsc: 0,
            deadline: None,
            auto_eoi: VectorSet::EMPTY,
        }
    }

    /// Marks `vector` as taken without an EOI (or not): when injected it does not enter the
    /// ISR, so it never blocks lower-priority vectors and the guest's handler skips the EOI
    /// write — one exit less per interrupt. Vectors below 16 are refused.
    pub fn set_auto_eoi(&mut self, vector: u8, enabled: bool) -> bool {
        if vector < FIRST_VECTOR {
            return false;
        }
        if enabled {
            self.auto_eoi.insert(vector);
        } else {
            self.auto_eoi.remove(vector);
        }
        true
    }

    /// APIC ID.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Task priority.
    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// Sets the task priority (from an MMIO write or a CR8 change).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.tpr = tpr;
    }

    /// Vectors in service.
    pub fn in_service(&self) -> VectorSet {
        self.isr
    }

    /// Processor priority: the higher of TPR and the highest in-service vector's class.
    pub fn ppr(&self) -> u8 {
        let isrv = self.isr_highest;
        if (self.tpr & 0xf0) >= (isrv & 0xf0) { self.tpr } else { isrv & 0xf0 }
    }

    /// The highest pending vector whose priority class is above the processor priority: the
    /// one to deliver next.
    pub fn deliverable(&self, pending: &PendingVectors) -> Option<u8> {
        self.deliverable_of(pending.highest()?)
    }

    /// `deliverable` for a known highest pending vector `v`.
    #[inline]
    pub fn deliverable_of(&self, v: u8) -> Option<u8> {
        ((v & 0xf0) > (self.ppr() & 0xf0)).then_some(v)
    }

    /// The highest pending vector blocked only by the task priority (not by an in-service
    /// vector): an interrupt window with that priority opens when the guest lowers its TPR.
    pub fn blocked_by_tpr(&self, pending: &PendingVectors) -> Option<u8> {
        self.blocked_by_tpr_of(pending.highest()?)
    }

    /// `blocked_by_tpr` for a known highest pending vector `v`.
    #[inline]
    pub fn blocked_by_tpr_of(&self, v: u8) -> Option<u8> {
        let isr_class = self.isr_highest & 0xf0;
        ((v & 0xf0) > isr_class && (v & 0xf0) <= (self.tpr & 0xf0)).then_some(v)
    }

    /// The vector is being injected: moves it from the IRR to the ISR. Returns false (and
    /// changes nothing) when it was no longer pending.
    pub fn accept(&mut self, vector: u8, pending: &PendingVectors) -> bool {
        if pending.take(vector) {
            if !self.auto_eoi.contains(vector) {
                self.isr.insert(vector);
                self.isr_highest = self.isr_highest.max(vector);
            }
            true
        } else {
            false
        }
    }

    /// End of interrupt: retires the highest in-service vector.
    pub fn eoi(&mut self) -> Option<u8> {
        let v = self.isr.highest()?;
        self.isr.remove(v);
        self.isr_highest = self.isr.highest().unwrap_or(0);
        Some(v)
    }

    /// Timer divisor from the divide configuration register (SDM Figure 11-10).
    pub fn divisor(&self) -> u64 {
        let code = ((self.divide & 8) >> 1) | (self.divide & 3);
        if code == 7 { 1 } else { 2 << code }
    }

    fn timer_mode(&self) -> TimerMode {
        if (self.lvt_timer >> 17) & 3 == 1 { TimerMode::Periodic } else { TimerMode::OneShot }
    }

    /// When the timer fires next (TSC), if armed.
    pub fn timer_deadline(&self) -> Option<u64> {
        self.deadline
    }

    fn arm(&mut self, now_tsc: u64) {
        self.start_tsc = now_tsc;
        self.deadline = if self.initial == 0 {
            None
        } else {
            Some(now_tsc.saturating_add(u64::from(self.initial).saturating_mul(self.divisor())))
        };
    }

    /// Fires the timer if its deadline has passed: raises the LVT vector unless masked, and
    /// re-arms a periodic timer. Returns the vector raised.
    pub fn poll_timer(&mut self, now_tsc: u64, pending: &PendingVectors) -> Option<u8> {
        let deadline = self.deadline?;
        if now_tsc < deadline {
            return None;
        }
        match self.timer_mode() {
            TimerMode::Periodic => {
                // Skip whole periods missed (one interrupt, as a real APIC coalesces in IRR).
                let period = u64::from(self.initial).saturating_mul(self.divisor()).max(1);
                let missed = (now_tsc - deadline) / period + 1;
                self.start_tsc = deadline.saturating_add((missed - 1).saturating_mul(period));
                self.deadline = Some(self.start_tsc.saturating_add(period));
            }
            TimerMode::OneShot => self.deadline = None,
        }
        let vector = (self.lvt_timer & 0xff) as u8;
        if self.lvt_timer & LVT_MASKED != 0 || self.svr & SVR_ENABLED == 0 || vector < FIRST_VECTOR {
            return None;
        }
        pending.raise(vector).map(|_| vector)
    }

    fn current_count(&self, now_tsc: u64) -> u32 {
        match self.deadline {
            None => 0,
            Some(deadline) if now_tsc >= deadline => 0,
            Some(deadline) => ((deadline - now_tsc) / self.divisor()).min(u64::from(self.initial)) as u32,
        }
    }

    /// Reads the 32-bit register at `offset` (16-byte aligned offsets; others read as 0).
    pub fn read(&self, offset: u32, pending: &PendingVectors, now_tsc: u64) -> u32 {
        let bank = |set: VectorSet, off: u32| -> u32 {
            let i = ((off >> 4) & 7) as usize;
            (set.0[i / 2] >> ((i % 2) * 32)) as u32
        };
        match offset {
            reg::ID => u32::from(self.id) << 24,
            reg::VERSION => VERSION_VALUE,
            reg::TPR => u32::from(self.tpr),
            reg::APR => 0,
            reg::PPR => u32::from(self.ppr()),
            reg::LDR => self.ldr,
            reg::DFR => self.dfr,
            reg::SVR => self.svr,
            o if (reg::ISR..reg::ISR + 0x80).contains(&o) => bank(self.isr, o - reg::ISR),
            o if (reg::TMR..reg::TMR + 0x80).contains(&o) => 0,
            o if (reg::IRR..reg::IRR + 0x80).contains(&o) => bank(pending.snapshot(), o - reg::IRR),
            reg::ESR => self.esr,
            reg::ICR_LOW => 0,
            reg::ICR_HIGH => self.icr_high,
            reg::LVT_TIMER => self.lvt_timer,
            reg::LVT_CMCI => self.lvt[0],
            reg::LVT_THERMAL => self.lvt[1],
            reg::LVT_PERF => self.lvt[2],
            reg::LVT_LINT0 => self.lvt[3],
            reg::LVT_LINT1 => self.lvt[4],
            reg::LVT_ERROR => self.lvt[5],
            reg::TIMER_INITIAL => self.initial,
            reg::TIMER_CURRENT => self.current_count(now_tsc),
            reg::TIMER_DIVIDE => self.divide,
            _ => 0,
        }
    }

    /// Writes the 32-bit register at `offset`. Reserved bits are kept at their defined
    /// values; read-only and unknown registers ignore writes.
    pub fn write(&mut self, offset: u32, value: u32, pending: &PendingVectors, now_tsc: u64) -> WriteEffect {
        let lvt_mask = |v: u32, svr: u32| {
            let v = v & (LVT_MASKED | 0x7ff | 1 << 13 | 1 << 15);
            if svr & SVR_ENABLED == 0 { v | LVT_MASKED } else { v }
        };
        match offset {
            reg::TPR => {
                self.tpr = value as u8;
                WriteEffect::None
            }
            reg::EOI => WriteEffect::Eoi(self.eoi()),
            reg::LDR => {
                self.ldr = value & 0xff00_0000;
                WriteEffect::None
            }
            reg::DFR => {
                self.dfr = value | 0x0fff_ffff;
                WriteEffect::None
            }
            reg::SVR => {
                self.svr = value & 0x13ff;
                if self.svr & SVR_ENABLED == 0 {
                    self.lvt_timer |= LVT_MASKED;
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
                WriteEffect::None
            }
            reg::ESR => {
                self.esr = 0;
                WriteEffect::None
            }
            reg::ICR_HIGH => {
                self.icr_high = value & 0xff00_0000;
                WriteEffect::None
            }
            reg::ICR_LOW => self.icr(value, pending),
            reg::LVT_TIMER => {
                self.lvt_timer = lvt_mask(value & !(0x7 << 8), self.svr) | (value & (3 << 17));
                WriteEffect::Timer
            }
            reg::LVT_CMCI | reg::LVT_THERMAL | reg::LVT_PERF | reg::LVT_LINT0 | reg::LVT_LINT1 | reg::LVT_ERROR => {
                let i = match offset {
                    reg::LVT_CMCI => 0,
                    reg::LVT_THERMAL => 1,
                    reg::LVT_PERF => 2,
                    reg::LVT_LINT0 => 3,
                    reg::LVT_LINT1 => 4,
                    _ => 5,
                };
                self.lvt[i] = lvt_mask(value, self.svr);
                WriteEffect::None
            }
            reg::TIMER_INITIAL => {
                self.initial = value;
                self.arm(now_tsc);
                WriteEffect::Timer
            }
            reg::TIMER_DIVIDE => {
                self.divide = value & 0xb;
                WriteEffect::Timer
            }
            _ => WriteEffect::Ignored,
        }
    }

    /// ICR low write: fixed-delivery self-IPIs (shorthand "self", or physical destination
    /// equal to this APIC's ID) are raised; everything else is refused.
    fn icr(&mut self, value: u32, pending: &PendingVectors) -> WriteEffect {
        let vector = (value & 0xff) as u8;
        let delivery = (value >> 8) & 7;
        let logical = value & (1 << 11) != 0;
        let shorthand = (value >> 18) & 3;
        let to_self = match shorthand {
            1 => true,
            0 => !logical && (self.icr_high >> 24) as u8 == self.id,
            _ => false,
        };
        if delivery != 0 || !to_self {
            return WriteEffect::UnsupportedIpi(value);
        }
        match pending.raise(vector) {
            Some(_) => WriteEffect::SelfIpi(vector),
            None => {
                self.esr |= ESR_SEND_ILLEGAL;
                WriteEffect::Ignored
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn priorities_and_eoi() {
        let p = PendingVectors::new();
        let mut l = VLapic::new(0);
        for v in [0x51, 0x62, 0x73, 0x74] {
            p.raise(v);
        }
        assert_eq!(l.deliverable(&p), Some(0x74));
        assert!(l.accept(0x74, &p));
        assert_eq!(l.ppr(), 0x70);
        assert_eq!(l.deliverable(&p), None, "0x73 is in the same class as the in-service 0x74");
        assert_eq!(l.blocked_by_tpr(&p), None, "blocked by the ISR, not the TPR");
        assert_eq!(l.write(reg::EOI, 0, &p, 0), WriteEffect::Eoi(Some(0x74)));
        assert_eq!(l.deliverable(&p), Some(0x73));
        l.set_tpr(0x70);
        assert_eq!(l.deliverable(&p), None);
        assert_eq!(l.blocked_by_tpr(&p), Some(0x73));
        assert_eq!(l.read(reg::PPR, &p, 0), 0x70);
        l.set_tpr(0x60);
        assert_eq!(l.deliverable(&p), Some(0x73));
        assert_eq!(l.write(reg::EOI, 0, &p, 0), WriteEffect::Eoi(None));
    }

    #[test]
    fn auto_eoi_vectors_skip_the_isr() {
        let p = PendingVectors::new();
        let mut l = VLapic::new(0);
        assert!(l.set_auto_eoi(0x61, true));
        assert!(!l.set_auto_eoi(0x0f, true));
        p.raise(0x61);
        p.raise(0x51);
        assert!(l.accept(0x61, &p));
        assert_eq!(l.in_service(), VectorSet::EMPTY);
        assert_eq!(l.deliverable(&p), Some(0x51), "nothing in service blocks 0x51");
        l.set_auto_eoi(0x61, false);
        p.raise(0x61);
        assert!(l.accept(0x61, &p));
        assert_eq!(l.in_service(), VectorSet::of(&[0x61]));
    }

    #[test]
    fn isr_irr_banks() {
        let p = PendingVectors::new();
        let mut l = VLapic::new(3);
        p.raise(0x41);
        p.raise(0xfe);
        assert_eq!(l.read(reg::IRR + 0x20, &p, 0), 1 << 1, "0x41: bank 2 bit 1");
        assert_eq!(l.read(reg::IRR + 0x70, &p, 0), 1 << 30, "0xfe: bank 7 bit 30");
        l.accept(0x41, &p);
        assert_eq!(l.read(reg::ISR + 0x20, &p, 0), 1 << 1);
        assert_eq!(l.read(reg::IRR + 0x20, &p, 0), 0);
        assert_eq!(l.read(reg::ID, &p, 0), 3 << 24);
        assert_eq!(l.read(reg::VERSION, &p, 0), 0x5_0014);
    }

    #[test]
    fn one_shot_timer() {
        let p = PendingVectors::new();
        let mut l = VLapic::new(0);
        l.write(reg::TIMER_DIVIDE, 0xb, &p, 0); // divide by 1
        assert_eq!(l.divisor(), 1);
        l.write(reg::LVT_TIMER, 0x45, &p, 0);
        l.write(reg::TIMER_INITIAL, 1000, &p, 100);
        assert_eq!(l.timer_deadline(), Some(1100));
        assert_eq!(l.read(reg::TIMER_CURRENT, &p, 600), 500);
        assert_eq!(l.poll_timer(1099, &p), None);
        assert_eq!(l.poll_timer(1100, &p), Some(0x45));
        assert_eq!(l.poll_timer(5000, &p), None, "one shot fires once");
        assert_eq!(l.read(reg::TIMER_CURRENT, &p, 5000), 0);
        assert!(p.contains(0x45));
    }

    #[test]
    fn periodic_and_masked_timer() {
        let p = PendingVectors::new();
        let mut l = VLapic::new(0);
        l.write(reg::TIMER_DIVIDE, 0x3, &p, 0); // divide by 16
        assert_eq!(l.divisor(), 16);
        l.write(reg::LVT_TIMER, 0x46 | 1 << 17, &p, 0);
        l.write(reg::TIMER_INITIAL, 10, &p, 0);
        assert_eq!(l.poll_timer(160, &p), Some(0x46));
        assert_eq!(l.timer_deadline(), Some(320));
        assert_eq!(l.poll_timer(1000, &p), Some(0x46), "missed periods coalesce");
        assert_eq!(l.timer_deadline(), Some(1120));
        p.take(0x46);
        l.write(reg::LVT_TIMER, 0x46 | 1 << 17 | LVT_MASKED, &p, 1000);
        assert_eq!(l.poll_timer(2000, &p), None, "masked");
        assert!(!p.contains(0x46));
    }

    #[test]
    fn self_ipi_and_refusals() {
        let p = PendingVectors::new();
        let mut l = VLapic::new(2);
        assert_eq!(l.write(reg::ICR_LOW, 0x4_0050, &p, 0), WriteEffect::SelfIpi(0x50), "shorthand self");
        l.write(reg::ICR_HIGH, 2 << 24, &p, 0);
        assert_eq!(l.write(reg::ICR_LOW, 0x51, &p, 0), WriteEffect::SelfIpi(0x51), "own physical id");
        l.write(reg::ICR_HIGH, 1 << 24, &p, 0);
        assert_eq!(l.write(reg::ICR_LOW, 0x52, &p, 0), WriteEffect::UnsupportedIpi(0x52), "another CPU");
        assert_eq!(l.write(reg::ICR_LOW, 0x4_0500, &p, 0), WriteEffect::UnsupportedIpi(0x4_0500), "INIT");
        assert_eq!(l.write(reg::ICR_LOW, 0x4_0005, &p, 0), WriteEffect::Ignored, "illegal vector");
        assert_eq!(l.read(reg::ESR, &p, 0), ESR_SEND_ILLEGAL);
        assert_eq!(l.write(reg::VERSION, 0, &p, 0), WriteEffect::Ignored);
        assert_eq!(l.write(reg::PPR, 0xff, &p, 0), WriteEffect::Ignored);
    }

    #[test]
    fn lvts_are_separate_registers() {
        let p = PendingVectors::new();
        let mut l = VLapic::new(0);
        l.write(reg::LVT_LINT0, 0x700, &p, 0);
        l.write(reg::LVT_ERROR, 0x1_00fe, &p, 0);
        l.write(reg::LVT_LINT1, 0x400, &p, 0);
        assert_eq!(l.read(reg::LVT_LINT0, &p, 0), 0x700);
        assert_eq!(l.read(reg::LVT_ERROR, &p, 0), 0x1_00fe);
        assert_eq!(l.read(reg::LVT_LINT1, &p, 0), 0x400);
    }

    #[test]
    fn software_disable_masks_lvts() {
        let p = PendingVectors::new();
        let mut l = VLapic::new(0);
        l.write(reg::LVT_TIMER, 0x45, &p, 0);
        l.write(reg::SVR, 0xff, &p, 0);
        assert_ne!(l.read(reg::LVT_TIMER, &p, 0) & LVT_MASKED, 0);
        l.write(reg::LVT_TIMER, 0x45, &p, 0);
        assert_ne!(l.read(reg::LVT_TIMER, &p, 0) & LVT_MASKED, 0, "cannot unmask while disabled");
    }
}
