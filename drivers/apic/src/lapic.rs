//! Local APIC (SDM Vol. 3A, chapter 12 "Advanced Programmable Interrupt Controller"):
//! enabling, EOI, IPIs including INIT-SIPI-SIPI, and the timer.

use crate::ApicError;
use bitflags::bitflags;

/// How registers are reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Mode {
    /// Memory-mapped registers at the APIC base; 8-bit IDs in ID bits 31:24.
    XApic,
    /// MSRs 0x800–0x8FF; 32-bit IDs; the ICR is one 64-bit MSR without a delivery status bit.
    X2Apic,
}

/// Local APIC registers (SDM Vol. 3A Table 12-1: offsets from the base; the x2APIC MSR is
/// 0x800 + offset / 16, Table 12-6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u16)]
pub enum Register {
    /// Local APIC ID.
    Id = 0x020,
    /// Version and max LVT entry.
    Version = 0x030,
    /// Task priority.
    TaskPriority = 0x080,
    /// End of interrupt (write only).
    Eoi = 0x0b0,
    /// Spurious interrupt vector (bit 8: software enable).
    SpuriousVector = 0x0f0,
    /// First in-service register (ISR 31:0).
    InService0 = 0x100,
    /// First interrupt request register (IRR 31:0).
    InterruptRequest0 = 0x200,
    /// Error status.
    ErrorStatus = 0x280,
    /// Interrupt command, low half (xAPIC).
    IcrLow = 0x300,
    /// Interrupt command, high half (xAPIC destination).
    IcrHigh = 0x310,
    /// LVT timer.
    LvtTimer = 0x320,
    /// LVT thermal sensor.
    LvtThermal = 0x330,
    /// LVT performance counter.
    LvtPerfCounter = 0x340,
    /// LVT LINT0.
    LvtLint0 = 0x350,
    /// LVT LINT1.
    LvtLint1 = 0x360,
    /// LVT error.
    LvtError = 0x370,
    /// Timer initial count.
    TimerInitialCount = 0x380,
    /// Timer current count (read only).
    TimerCurrentCount = 0x390,
    /// Timer divide configuration.
    TimerDivide = 0x3e0,
}

impl Register {
    /// Byte offset from the xAPIC base.
    pub const fn offset(self) -> u16 {
        self as u16
    }

    /// x2APIC MSR number.
    pub const fn msr(self) -> u32 {
        0x800 + (self as u32 >> 4)
    }
}

/// The x2APIC 64-bit ICR MSR (Table 12-6).
pub const X2APIC_ICR_MSR: u32 = 0x830;
/// IA32_APIC_BASE MSR.
pub const IA32_APIC_BASE: u32 = 0x1b;
/// IA32_APIC_BASE: xAPIC global enable.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE: x2APIC mode enable.
pub const APIC_BASE_X2APIC: u64 = 1 << 10;
/// IA32_APIC_BASE: this is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;

bitflags! {
    /// ICR low dword (SDM Vol. 3A Figure 12-12).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Icr: u32 {
        /// Delivery mode INIT (101b).
        const INIT = 0b101 << 8;
        /// Delivery mode Start-Up (110b).
        const STARTUP = 0b110 << 8;
        /// Delivery mode NMI (100b).
        const NMI = 0b100 << 8;
        /// Delivery status: send pending (xAPIC, read only).
        const SEND_PENDING = 1 << 12;
        /// Level: assert.
        const ASSERT = 1 << 14;
        /// Trigger mode: level.
        const LEVEL = 1 << 15;
        /// Shorthand: all excluding self.
        const ALL_EXCLUDING_SELF = 0b11 << 18;
        /// Vector bits.
        const VECTOR = 0xff;
    }
}

/// LVT: masked (bit 16).
pub const LVT_MASKED: u32 = 1 << 16;
/// LVT timer mode bits 18:17.
const LVT_TIMER_MODE_MASK: u32 = 0b11 << 17;
/// SVR: APIC software enable (bit 8).
pub const SVR_ENABLE: u32 = 1 << 8;

/// Timer modes (LVT timer bits 18:17).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TimerMode {
    /// Count down once.
    OneShot = 0b00,
    /// Reload on reaching zero.
    Periodic = 0b01,
}

/// Register access. Implementations must be usable from the CPU that owns this local APIC.
pub trait LocalApicRegs {
    /// How registers are reached.
    fn mode(&self) -> Mode;
    /// Reads a 32-bit register.
    fn read(&self, reg: Register) -> u32;
    /// Writes a 32-bit register.
    fn write(&self, reg: Register, value: u32);
    /// Writes the whole ICR: xAPIC writes the destination to ICR high, then `low`; x2APIC
    /// writes one 64-bit MSR.
    fn write_icr(&self, destination: u32, low: u32);
}

/// Polls of the delivery status bit before an IPI send counts as stuck.
pub const ICR_POLL_LIMIT: u32 = 1_000_000;

/// Encodes a timer divide value (1, 2, 4 … 128) into the divide configuration bits 0, 1 and 3
/// (SDM Vol. 3A Figure 12-10).
pub fn divide_bits(divide: u32) -> Result<u32, ApicError> {
    Ok(match divide {
        1 => 0b1011,
        2 => 0b0000,
        4 => 0b0001,
        8 => 0b0010,
        16 => 0b0011,
        32 => 0b1000,
        64 => 0b1001,
        128 => 0b1010,
        other => return Err(ApicError::InvalidDivide(other)),
    })
}
const DIVIDE_MASK: u32 = 0b1011;

/// A local APIC driven through `R`.
#[derive(Debug)]
pub struct LocalApic<R> {
    regs: R,
}

impl<R: LocalApicRegs> LocalApic<R> {
    /// Wraps the register access.
    pub const fn new(regs: R) -> Self {
        Self { regs }
    }

    /// The register access.
    pub fn regs(&self) -> &R {
        &self.regs
    }

    /// This APIC's ID.
    pub fn id(&self) -> u32 {
        let raw = self.regs.read(Register::Id);
        match self.regs.mode() {
            Mode::XApic => raw >> 24,
            Mode::X2Apic => raw,
        }
    }

    /// (version, number of LVT entries).
    pub fn version(&self) -> (u8, u8) {
        let v = self.regs.read(Register::Version);
        ((v & 0xff) as u8, (((v >> 16) & 0xff) + 1) as u8)
    }

    /// Software-enables the APIC with `spurious` as spurious vector, accepts every priority,
    /// masks LINT0/LINT1/performance/thermal/timer, routes APIC errors to `error_vector` and
    /// clears the error status. Reserved bits of each register are kept.
    pub fn enable(&self, spurious: u8, error_vector: u8) -> Result<(), ApicError> {
        check_vector(spurious)?;
        check_vector(error_vector)?;
        let (_, lvts) = self.version();
        for reg in
            [Register::LvtTimer, Register::LvtLint0, Register::LvtLint1, Register::LvtPerfCounter, Register::LvtThermal]
        {
            // The thermal LVT exists only with 6 or more entries; touching a missing x2APIC
            // register faults.
            if reg != Register::LvtThermal || lvts >= 6 {
                self.rmw(reg, |v| v | LVT_MASKED);
            }
        }
        self.rmw(Register::LvtError, |v| (v & !(0xff | LVT_MASKED)) | u32::from(error_vector));
        self.rmw(Register::TaskPriority, |v| v & !0xff);
        self.rmw(Register::SpuriousVector, |v| (v & !0xff) | SVR_ENABLE | u32::from(spurious));
        // Back-to-back writes clear the ESR (SDM §12.5.3).
        self.regs.write(Register::ErrorStatus, 0);
        self.regs.write(Register::ErrorStatus, 0);
        Ok(())
    }

    /// Signals end of interrupt for the highest-priority in-service vector.
    pub fn eoi(&self) {
        self.regs.write(Register::Eoi, 0);
    }

    /// Reads the error status (write first to latch, SDM §12.5.3).
    pub fn error_status(&self) -> u32 {
        self.regs.write(Register::ErrorStatus, 0);
        self.regs.read(Register::ErrorStatus)
    }

    /// Sends a fixed interrupt with `vector` to the APIC `destination`.
    pub fn send_fixed(&self, destination: u32, vector: u8) -> Result<(), ApicError> {
        check_vector(vector)?;
        self.send(destination, Icr::ASSERT.bits() | u32::from(vector))
    }

    /// Sends an NMI to `destination`.
    pub fn send_nmi(&self, destination: u32) -> Result<(), ApicError> {
        self.send(destination, (Icr::NMI | Icr::ASSERT).bits())
    }

    /// INIT (level assert), the first step of starting an application processor.
    pub fn send_init(&self, destination: u32) -> Result<(), ApicError> {
        self.send(destination, (Icr::INIT | Icr::ASSERT | Icr::LEVEL).bits())
    }

    /// Start-up IPI: the AP starts in real mode at `page << 12` (a page below 1 MiB).
    pub fn send_startup(&self, destination: u32, page: u8) -> Result<(), ApicError> {
        self.send(destination, (Icr::STARTUP | Icr::ASSERT).bits() | u32::from(page))
    }

    fn send(&self, destination: u32, low: u32) -> Result<(), ApicError> {
        self.wait_idle()?;
        self.regs.write_icr(destination, low);
        self.wait_idle()
    }

    /// xAPIC: waits until the previous IPI left; x2APIC has no such bit.
    fn wait_idle(&self) -> Result<(), ApicError> {
        if self.regs.mode() == Mode::X2Apic {
            return Ok(());
        }
        for _ in 0..ICR_POLL_LIMIT {
            if self.regs.read(Register::IcrLow) & Icr::SEND_PENDING.bits() == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(ApicError::Timeout)
    }

    /// Starts the timer: `mode`, `vector`, counting down from `initial` at bus clock /
    /// `divide`. An initial count of 0 stops it.
    pub fn start_timer(&self, mode: TimerMode, vector: u8, divide: u32, initial: u32) -> Result<(), ApicError> {
        check_vector(vector)?;
        let bits = divide_bits(divide)?;
        self.rmw(Register::TimerDivide, |v| (v & !DIVIDE_MASK) | bits);
        self.rmw(Register::LvtTimer, |v| {
            (v & !(0xff | LVT_MASKED | LVT_TIMER_MODE_MASK)) | ((mode as u32) << 17) | u32::from(vector)
        });
        self.regs.write(Register::TimerInitialCount, initial);
        Ok(())
    }

    /// Stops and masks the timer.
    pub fn stop_timer(&self) {
        self.regs.write(Register::TimerInitialCount, 0);
        self.rmw(Register::LvtTimer, |v| v | LVT_MASKED);
    }

    /// Current count of the timer.
    pub fn timer_current(&self) -> u32 {
        self.regs.read(Register::TimerCurrentCount)
    }

    fn rmw(&self, reg: Register, f: impl FnOnce(u32) -> u32) {
        let v = self.regs.read(reg);
        self.regs.write(reg, f(v));
    }
}

fn check_vector(v: u8) -> Result<(), ApicError> {
    if v < 16 { Err(ApicError::InvalidVector(v)) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Registers in a map; records every write; ICR send-pending for `busy_reads` reads.
    struct FakeLapic {
        mode: Mode,
        regs: RefCell<HashMap<u16, u32>>,
        writes: RefCell<Vec<(Register, u32)>>,
        icr: RefCell<Vec<(u32, u32)>>,
        busy_reads: RefCell<u32>,
    }

    impl FakeLapic {
        fn new(mode: Mode) -> Self {
            let mut regs = HashMap::new();
            regs.insert(Register::Id.offset(), if mode == Mode::XApic { 3 << 24 } else { 0x1234 });
            regs.insert(Register::Version.offset(), 0x0005_0014);
            // Reserved bits set everywhere we do read-modify-write.
            for r in [
                Register::LvtTimer,
                Register::LvtLint0,
                Register::LvtLint1,
                Register::LvtError,
                Register::LvtPerfCounter,
                Register::LvtThermal,
            ] {
                regs.insert(r.offset(), 0xfff0_0000);
            }
            regs.insert(Register::SpuriousVector.offset(), 0xffff_e000);
            regs.insert(Register::TimerDivide.offset(), 0xffff_fff4);
            Self {
                mode,
                regs: RefCell::new(regs),
                writes: RefCell::default(),
                icr: RefCell::default(),
                busy_reads: RefCell::new(0),
            }
        }
        fn get(&self, r: Register) -> u32 {
            self.regs.borrow().get(&r.offset()).copied().unwrap_or(0)
        }
    }

    impl LocalApicRegs for FakeLapic {
        fn mode(&self) -> Mode {
            self.mode
        }
        fn read(&self, reg: Register) -> u32 {
            if reg == Register::IcrLow {
                let mut b = self.busy_reads.borrow_mut();
                if *b > 0 {
                    *b -= 1;
                    return Icr::SEND_PENDING.bits();
                }
                return 0;
            }
            self.get(reg)
        }
        fn write(&self, reg: Register, value: u32) {
            self.writes.borrow_mut().push((reg, value));
            self.regs.borrow_mut().insert(reg.offset(), value);
        }
        fn write_icr(&self, destination: u32, low: u32) {
            self.icr.borrow_mut().push((destination, low));
        }
    }

    #[test]
    fn register_offsets_and_msrs_match_the_sdm() {
        assert_eq!(Register::Id.offset(), 0x20);
        assert_eq!(Register::Eoi.offset(), 0xb0);
        assert_eq!(Register::SpuriousVector.offset(), 0xf0);
        assert_eq!(Register::IcrLow.offset(), 0x300);
        assert_eq!(Register::LvtTimer.offset(), 0x320);
        assert_eq!(Register::LvtError.offset(), 0x370);
        assert_eq!(Register::TimerDivide.offset(), 0x3e0);
        assert_eq!(Register::Id.msr(), 0x802);
        assert_eq!(Register::Eoi.msr(), 0x80b);
        assert_eq!(Register::SpuriousVector.msr(), 0x80f);
        assert_eq!(Register::LvtTimer.msr(), 0x832);
        assert_eq!(Register::TimerDivide.msr(), 0x83e);
        assert_eq!(Icr::INIT.bits(), 0x500);
        assert_eq!(Icr::STARTUP.bits(), 0x600);
    }

    #[test]
    fn ids_by_mode() {
        assert_eq!(LocalApic::new(FakeLapic::new(Mode::XApic)).id(), 3);
        assert_eq!(LocalApic::new(FakeLapic::new(Mode::X2Apic)).id(), 0x1234);
        assert_eq!(LocalApic::new(FakeLapic::new(Mode::XApic)).version(), (0x14, 6));
    }

    #[test]
    fn enable_keeps_reserved_bits() {
        let a = LocalApic::new(FakeLapic::new(Mode::XApic));
        a.enable(0xff, 0xfe).unwrap();
        let r = a.regs();
        assert_eq!(r.get(Register::SpuriousVector), 0xffff_e000 | SVR_ENABLE | 0xff);
        assert_eq!(r.get(Register::LvtLint0), 0xfff0_0000 | LVT_MASKED);
        assert_eq!(r.get(Register::LvtThermal), 0xfff0_0000 | LVT_MASKED);
        assert_eq!(r.get(Register::LvtError), 0xfff0_0000 | 0xfe);
        assert_eq!(a.enable(3, 0xfe), Err(ApicError::InvalidVector(3)));
    }

    #[test]
    fn init_sipi_encoding_and_bounded_wait() {
        let a = LocalApic::new(FakeLapic::new(Mode::XApic));
        a.send_init(1).unwrap();
        a.send_startup(1, 0x08).unwrap();
        assert_eq!(a.regs().icr.borrow().as_slice(), &[(1, 0xc500), (1, 0x4608)]);
        *a.regs().busy_reads.borrow_mut() = 10;
        a.send_fixed(1, 0x31).unwrap();
        *a.regs().busy_reads.borrow_mut() = u32::MAX;
        assert_eq!(a.send_fixed(1, 0x31), Err(ApicError::Timeout));
        // x2APIC has no delivery status: never waits.
        let x = LocalApic::new(FakeLapic::new(Mode::X2Apic));
        *x.regs().busy_reads.borrow_mut() = u32::MAX;
        assert_eq!(x.send_nmi(7), Ok(()));
        assert_eq!(x.regs().icr.borrow()[0], (7, 0x4400));
    }

    #[test]
    fn timer_programming() {
        let a = LocalApic::new(FakeLapic::new(Mode::XApic));
        a.start_timer(TimerMode::Periodic, 0x30, 16, 1000).unwrap();
        let r = a.regs();
        assert_eq!(r.get(Register::TimerDivide), 0xffff_fff4 | 0b0011);
        assert_eq!(r.get(Register::LvtTimer), 0xfff0_0000 | (1 << 17) | 0x30);
        assert_eq!(r.get(Register::TimerInitialCount), 1000);
        assert_eq!(a.start_timer(TimerMode::OneShot, 0x30, 3, 1), Err(ApicError::InvalidDivide(3)));
        a.stop_timer();
        assert_eq!(r.get(Register::TimerInitialCount), 0);
        assert_ne!(r.get(Register::LvtTimer) & LVT_MASKED, 0);
        for (d, bits) in [(1, 0b1011), (2, 0), (4, 1), (8, 2), (16, 3), (32, 8), (64, 9), (128, 10)] {
            assert_eq!(divide_bits(d), Ok(bits));
        }
    }
}
