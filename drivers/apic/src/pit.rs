//! The 8254 PIT's channel 2, used once at boot as a known clock to calibrate the TSC and the
//! local APIC timer: gate on, one-shot count, poll OUT2 (port 0x61 bit 5) with a bound.

use crate::ApicError;

/// PIT input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// Channel 2 data port.
pub const CHANNEL2: u16 = 0x42;
/// Mode/command port.
pub const COMMAND: u16 = 0x43;
/// NMI status and control: bit 0 gate 2, bit 1 speaker, bit 5 OUT2.
pub const PORT_B: u16 = 0x61;
/// Command: channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count), binary.
pub const CMD_CHANNEL2_ONESHOT: u8 = 0b1011_0000;
/// Longest window one count can measure (65535 ticks).
pub const MAX_WINDOW_US: u64 = 65_535 * 1_000_000 / PIT_HZ;

/// Port I/O as the PIT logic needs it.
pub trait Ports {
    /// Reads a byte.
    fn inb(&mut self, port: u16) -> u8;
    /// Writes a byte.
    fn outb(&mut self, port: u16, value: u8);
}

/// PIT ticks for `window_us` (1 ..= `MAX_WINDOW_US`).
pub fn count_for(window_us: u64) -> Option<u16> {
    if window_us == 0 || window_us > MAX_WINDOW_US {
        return None;
    }
    u16::try_from(PIT_HZ * window_us / 1_000_000).ok().filter(|&c| c > 0)
}

/// Arms channel 2 for `window_us`, runs `start` right after the count is loaded, waits for
/// OUT2 (at most `max_polls` reads) and returns the exact window in microseconds as the PIT
/// measured it. The speaker stays off; port B's other bits are kept.
pub fn measure(ports: &mut impl Ports, window_us: u64, max_polls: u64, start: impl FnOnce()) -> Result<u64, ApicError> {
    let count = count_for(window_us).ok_or(ApicError::InvalidWindow(window_us))?;
    let b = ports.inb(PORT_B);
    ports.outb(PORT_B, (b & !0b10) | 0b01); // gate on, speaker off
    ports.outb(COMMAND, CMD_CHANNEL2_ONESHOT);
    ports.outb(CHANNEL2, (count & 0xff) as u8);
    ports.outb(CHANNEL2, (count >> 8) as u8);
    start();
    for _ in 0..max_polls {
        if ports.inb(PORT_B) & 0x20 != 0 {
            ports.outb(PORT_B, b & !0b11);
            return Ok(u64::from(count) * 1_000_000 / PIT_HZ);
        }
        core::hint::spin_loop();
    }
    ports.outb(PORT_B, b & !0b11);
    Err(ApicError::Timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakePit {
        b: u8,
        polls_until_out: u64,
        writes: Vec<(u16, u8)>,
    }

    impl Ports for FakePit {
        fn inb(&mut self, port: u16) -> u8 {
            assert_eq!(port, PORT_B);
            if self.polls_until_out == 0 {
                return self.b | 0x20;
            }
            self.polls_until_out -= 1;
            self.b
        }
        fn outb(&mut self, port: u16, value: u8) {
            if port == PORT_B {
                self.b = value;
            }
            self.writes.push((port, value));
        }
    }

    #[test]
    fn programs_channel2_and_measures() {
        let mut p = FakePit { b: 0xc2, polls_until_out: 5, writes: vec![] };
        let mut started = false;
        let us = measure(&mut p, 10_000, 100, || started = true).unwrap();
        assert!(started);
        assert_eq!(us, 9999); // 11931 ticks
        assert_eq!(p.writes[0], (PORT_B, 0xc1));
        assert_eq!(p.writes[1], (COMMAND, 0xb0));
        assert_eq!(&p.writes[2..4], &[(CHANNEL2, (11931 & 0xff) as u8), (CHANNEL2, (11931 >> 8) as u8)]);
        assert_eq!(p.b, 0xc0, "gate and speaker off again, other bits kept");
    }

    #[test]
    fn bounded_wait_and_bad_windows() {
        let mut p = FakePit { b: 0, polls_until_out: u64::MAX, writes: vec![] };
        assert_eq!(measure(&mut p, 10_000, 1000, || {}), Err(ApicError::Timeout));
        assert_eq!(count_for(0), None);
        assert_eq!(count_for(MAX_WINDOW_US + 1), None);
        assert_eq!(count_for(MAX_WINDOW_US), Some(65534));
    }
}
