//! Interrupt controllers and the timers used to calibrate them: register definitions and the
//! logic that drives them, over narrow register traits. The kernel implements the traits
//! (xAPIC MMIO, x2APIC MSRs, I/O APIC MMIO, port I/O); tests implement them with scripted fakes.
//!
//! Every wait on hardware here is bounded by a poll count and returns [`ApicError::Timeout`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;

pub use ioapic::{IoApic, IoApicRegs};
pub use lapic::{LocalApic, LocalApicRegs, Mode, Register};

/// Errors from controller operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ApicError {
    /// A bounded wait on a status bit ran out.
    Timeout,
    /// A pin beyond the I/O APIC's redirection table.
    InvalidPin(u32),
    /// A vector below 16 (reserved for exceptions; the APIC flags it as an illegal vector).
    InvalidVector(u8),
    /// A divide value the timer does not support.
    InvalidDivide(u32),
    /// A measuring window the PIT cannot count (0 or above `pit::MAX_WINDOW_US`).
    InvalidWindow(u64),
}

/// `count` events over `window_us` microseconds, as events per second; `None` for an empty
/// window or a result that does not fit.
pub fn rate_hz(count: u64, window_us: u64) -> Option<u64> {
    if window_us == 0 {
        return None;
    }
    u64::try_from(u128::from(count) * 1_000_000 / u128::from(window_us)).ok()
}

/// Ticks of a `hz` clock in `us` microseconds (saturating).
pub fn ticks_in_us(hz: u64, us: u64) -> u64 {
    u64::try_from(u128::from(hz) * u128::from(us) / 1_000_000).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(rate_hz(1_000_000, 10_000), Some(100_000_000));
        assert_eq!(rate_hz(5, 0), None);
        assert_eq!(rate_hz(u64::MAX, 1), None);
        assert_eq!(ticks_in_us(1_000_000_000, 10), 10_000);
        assert_eq!(ticks_in_us(u64::MAX, u64::MAX), u64::MAX);
    }
}
