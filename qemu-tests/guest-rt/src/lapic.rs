//! The virtual local APIC (xAPIC MMIO window, `BootInfo::local_apic`): identity, EOI, task
//! priority, ISR/IRR bits and the timer. Every access is one aligned 32-bit `mov` between a
//! register and `[register]` (asm, so the instruction form is fixed for the MMIO decoder).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use conduit_abi::layout;

/// Register offsets in the xAPIC window (Intel SDM Vol. 3A, Table 11-1 "Local APIC Register
/// Address Map"; AMD APM Vol. 2, Table 16-2).
mod reg {
    /// Local APIC ID (bits 31:24).
    pub const ID: usize = 0x20;
    /// Version.
    pub const VERSION: usize = 0x30;
    /// Task priority.
    pub const TPR: usize = 0x80;
    /// Processor priority.
    pub const PPR: usize = 0xa0;
    /// End of interrupt (write 0).
    pub const EOI: usize = 0xb0;
    /// Spurious-interrupt vector (bit 8: APIC software enable).
    pub const SVR: usize = 0xf0;
    /// In-service register, eight 32-bit words 0x10 apart.
    pub const ISR: usize = 0x100;
    /// Interrupt-request register, eight 32-bit words 0x10 apart.
    pub const IRR: usize = 0x200;
    /// LVT timer: vector 7:0, mask bit 16, mode 18:17.
    pub const LVT_TIMER: usize = 0x320;
    /// Timer initial count (writing starts the timer; 0 stops it).
    pub const TIMER_INITIAL: usize = 0x380;
    /// Timer current count.
    pub const TIMER_CURRENT: usize = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: usize = 0x3e0;
}

/// LVT mask bit.
const LVT_MASKED: u32 = 1 << 16;
/// SVR APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;

/// Base of the window; `start` sets it from the validated `BootInfo`.
static BASE: AtomicU64 = AtomicU64::new(layout::LOCAL_APIC);

/// Sets the window base (page-aligned, above RAM, below 4 GiB: checked by `start`).
pub(crate) fn set_base(base: u64) {
    BASE.store(base, Ordering::Relaxed);
}

fn read(offset: usize) -> u32 {
    let addr = BASE.load(Ordering::Relaxed) as usize + offset;
    let value: u32;
    // One plain `mov r32, [r64]` (8b /r), so the hypervisor's MMIO decoder sees one simple form.
    // SAFETY:
    // 1. `addr` is a register of the virtual local APIC window, which `start` checked lies
    //    above RAM and below 4 GiB, so it is identity-mapped (uncached) and no Rust object lives
    //    there.
    // 2. Every offset is a multiple of 16, so the 32-bit access is aligned.
    // 3. The asm writes only `value`; it is not `readonly`/`nomem` so it stays ordered with the
    //    other APIC accesses (volatile).
    unsafe {
        asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = lateout(reg) value, options(nostack, preserves_flags))
    };
    value
}

fn write(offset: usize, value: u32) {
    let addr = BASE.load(Ordering::Relaxed) as usize + offset;
    // One plain `mov [r64], r32` (89 /r).
    // SAFETY:
    // 1. As in `read`: an aligned 32-bit register of the APIC window, outside any Rust object.
    unsafe {
        asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) value, options(nostack, preserves_flags))
    };
}

/// This vCPU's local APIC ID.
pub fn id() -> u32 {
    read(reg::ID) >> 24
}

/// The version register.
pub fn version() -> u32 {
    read(reg::VERSION)
}

/// Software-enables the APIC with `spurious` as the spurious-interrupt vector.
pub fn enable(spurious: u8) {
    write(reg::SVR, SVR_ENABLE | u32::from(spurious));
}

/// Signals the end of the interrupt being handled.
pub fn eoi() {
    write(reg::EOI, 0);
}

/// Sets the task priority: vectors whose class (bits 7:4) is not above `tpr`'s are held.
pub fn set_tpr(tpr: u8) {
    write(reg::TPR, u32::from(tpr));
}

/// The task priority.
pub fn tpr() -> u8 {
    read(reg::TPR) as u8
}

/// The processor priority.
pub fn ppr() -> u8 {
    read(reg::PPR) as u8
}

/// Offset of the ISR/IRR word holding `vector`, and its bit.
fn word_bit(base: usize, vector: u8) -> (usize, u32) {
    (base + usize::from(vector / 32) * 0x10, 1 << (vector % 32))
}

/// Whether `vector` is in service.
pub fn isr_bit(vector: u8) -> bool {
    let (offset, bit) = word_bit(reg::ISR, vector);
    read(offset) & bit != 0
}

/// Whether `vector` is requested (pending).
pub fn irr_bit(vector: u8) -> bool {
    let (offset, bit) = word_bit(reg::IRR, vector);
    read(offset) & bit != 0
}

/// Timer divisor (divide configuration register).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Divide {
    /// ÷1.
    By1,
    /// ÷2.
    By2,
    /// ÷4.
    By4,
    /// ÷8.
    By8,
    /// ÷16.
    By16,
    /// ÷32.
    By32,
    /// ÷64.
    By64,
    /// ÷128.
    By128,
}

impl Divide {
    /// The divide configuration value (bits 3, 1:0; SDM Figure 11-10).
    pub const fn encoding(self) -> u32 {
        match self {
            Self::By2 => 0b0000,
            Self::By4 => 0b0001,
            Self::By8 => 0b0010,
            Self::By16 => 0b0011,
            Self::By32 => 0b1000,
            Self::By64 => 0b1001,
            Self::By128 => 0b1010,
            Self::By1 => 0b1011,
        }
    }

    /// The divisor.
    pub const fn divisor(self) -> u32 {
        match self {
            Self::By1 => 1,
            Self::By2 => 2,
            Self::By4 => 4,
            Self::By8 => 8,
            Self::By16 => 16,
            Self::By32 => 32,
            Self::By64 => 64,
            Self::By128 => 128,
        }
    }
}

/// Starts the timer in one-shot mode: after `count` ticks of `BootInfo::apic_timer_hz /
/// divisor` it raises `vector` once.
pub fn timer_oneshot(vector: u8, count: u32, divide: Divide) {
    write(reg::TIMER_DIVIDE, divide.encoding());
    write(reg::LVT_TIMER, u32::from(vector)); // mode 0 (one-shot), unmasked
    write(reg::TIMER_INITIAL, count);
}

/// The timer's current count (0 once a one-shot has fired or the timer is stopped).
pub fn timer_current() -> u32 {
    read(reg::TIMER_CURRENT)
}

/// Stops the timer and masks its LVT entry.
pub fn timer_stop() {
    write(reg::LVT_TIMER, LVT_MASKED);
    write(reg::TIMER_INITIAL, 0);
}
