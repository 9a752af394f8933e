//! Emulated PCI functions (`vdevs=` in a partition description; `docs/devices.md`). Pure
//! models of their configuration space and registers; the interrupts they raise go through the
//! same MSI-X front end as physical devices (the kernel wires that).
//!
//! `notify`: vendor `0xc0de`, device `0x0001`, class `ff:00:00`; BAR 0 is 4 KiB of 32-bit
//! memory holding the registers (`conduit_abi::vdev`) and the MSI-X table and PBA; an MSI-X
//! capability at `0x40` with 4 entries. Writing `i` to `SIGNAL` signals entry `i` in software.

use conduit_abi::vdev as abi;

/// What a guest access did that the kernel acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum NotifyEvent {
    /// Nothing beyond the model's own state.
    None,
    /// Memory decode or BAR 0 changed: BAR 0 is now at this guest address (`None`: not
    /// decoded).
    Bar(Option<u64>),
    /// MSI-X enable or function mask changed.
    MsixControl {
        /// MSI-X enabled.
        enabled: bool,
        /// Function masked.
        function_masked: bool,
    },
    /// The guest asked for MSI-X entry `0` to `NOTIFY_VECTORS - 1` to be signalled.
    Signal(u16),
    /// A `SIGNAL` write named an entry that does not exist (counted, ignored).
    BadSignal(u32),
}

const COMMAND: u16 = 0x04;
const BAR0: u16 = 0x10;
const CAP_PTR: u16 = 0x34;
const CMD_MEMORY: u32 = 1 << 1;
const CMD_BUS_MASTER: u32 = 1 << 2;
const STATUS_CAP_LIST: u32 = 1 << 4;
const MSIX_ENABLE: u32 = 1 << 15;
const MSIX_FUNCTION_MASK: u32 = 1 << 14;

/// The `notify` function's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notify {
    command: u32,
    bar0: u32,
    msix_control: u32,
    scratch: u32,
    count: u32,
}

impl Default for Notify {
    fn default() -> Self {
        Self::new()
    }
}

impl Notify {
    /// At reset: decode off, BAR 0 at 0, MSI-X off.
    pub const fn new() -> Self {
        Self { command: 0, bar0: 0, msix_control: 0, scratch: 0, count: 0 }
    }

    /// BAR 0's guest address while memory decode is on.
    pub fn bar0(&self) -> Option<u64> {
        (self.command & CMD_MEMORY != 0 && self.bar0 != 0).then_some(u64::from(self.bar0))
    }

    /// Signals requested so far (the `COUNT` register).
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Counts a notification delivered to this device from elsewhere (a doorbell's event).
    pub fn notified(&mut self) {
        self.count = self.count.wrapping_add(1);
    }

    fn dword(&self, offset: u16) -> u32 {
        match offset {
            0x00 => u32::from(abi::NOTIFY_DEVICE) << 16 | u32::from(abi::VENDOR),
            COMMAND => STATUS_CAP_LIST << 16 | self.command,
            0x08 => 0xff00_0000,
            0x0c => 0,
            BAR0 => self.bar0,
            0x2c => u32::from(abi::NOTIFY_DEVICE) << 16 | u32::from(abi::VENDOR),
            CAP_PTR => u32::from(abi::NOTIFY_MSIX_CAP),
            o if o == u16::from(abi::NOTIFY_MSIX_CAP) => {
                0x11 | (self.msix_control | u32::from(abi::NOTIFY_VECTORS - 1)) << 16
            }
            o if o == u16::from(abi::NOTIFY_MSIX_CAP) + 4 => abi::NOTIFY_TABLE as u32,
            o if o == u16::from(abi::NOTIFY_MSIX_CAP) + 8 => abi::NOTIFY_PBA as u32,
            _ => 0,
        }
    }

    /// A configuration read of `width` (1, 2, 4) bytes at `offset` (within 4 KiB; unaligned
    /// or out-of-range reads return all ones).
    pub fn config_read(&self, offset: u16, width: u8) -> u32 {
        if !matches!(width, 1 | 2 | 4) || !offset.is_multiple_of(u16::from(width)) || offset >= 0x1000 {
            return u32::MAX;
        }
        let shift = u32::from(offset & 3) * 8;
        let v = self.dword(offset & !3) >> shift;
        match width {
            1 => v & 0xff,
            2 => v & 0xffff,
            _ => v,
        }
    }

    /// A configuration write; returns what changed.
    pub fn config_write(&mut self, offset: u16, width: u8, value: u32) -> NotifyEvent {
        if !matches!(width, 1 | 2 | 4) || !offset.is_multiple_of(u16::from(width)) || offset >= 0x1000 {
            return NotifyEvent::None;
        }
        // Merge into the dword, then apply the writable bits of the registers touched.
        let base = offset & !3;
        let shift = u32::from(offset & 3) * 8;
        let mask = match width {
            1 => 0xffu32,
            2 => 0xffff,
            _ => u32::MAX,
        } << shift;
        let merged = (self.dword(base) & !mask) | ((value << shift) & mask);
        match base {
            COMMAND if mask & 0xffff != 0 => {
                let before = self.bar0();
                self.command = merged & (CMD_MEMORY | CMD_BUS_MASTER);
                if self.bar0() != before { NotifyEvent::Bar(self.bar0()) } else { NotifyEvent::None }
            }
            BAR0 => {
                let before = self.bar0();
                // 4 KiB, 32-bit, non-prefetchable memory: address bits 31:12 writable.
                self.bar0 = merged & !(abi::NOTIFY_BAR_BYTES as u32 - 1);
                if self.bar0() != before { NotifyEvent::Bar(self.bar0()) } else { NotifyEvent::None }
            }
            o if o == u16::from(abi::NOTIFY_MSIX_CAP) && mask & 0xffff_0000 != 0 => {
                let before = self.msix_control;
                self.msix_control = (merged >> 16) & (MSIX_ENABLE | MSIX_FUNCTION_MASK);
                if self.msix_control == before {
                    NotifyEvent::None
                } else {
                    NotifyEvent::MsixControl {
                        enabled: self.msix_control & MSIX_ENABLE != 0,
                        function_masked: self.msix_control & MSIX_FUNCTION_MASK != 0,
                    }
                }
            }
            _ => NotifyEvent::None,
        }
    }

    /// A register read at `offset` in BAR 0 (outside the MSI-X table and PBA, which the front
    /// end serves).
    pub fn register_read(&self, offset: u64, width: u8) -> u64 {
        let v = match offset & !3 {
            abi::NOTIFY_ID => 0xc0de_0001,
            abi::NOTIFY_COUNT => self.count,
            abi::NOTIFY_SCRATCH => self.scratch,
            _ => 0,
        };
        let v = u64::from(v) >> ((offset & 3) * 8);
        match width {
            1 => v & 0xff,
            2 => v & 0xffff,
            4 | 8 => v,
            _ => 0,
        }
    }

    /// A register write at `offset` in BAR 0.
    pub fn register_write(&mut self, offset: u64, width: u8, value: u64) -> NotifyEvent {
        if width != 4 && width != 8 {
            return NotifyEvent::None;
        }
        match offset {
            abi::NOTIFY_SIGNAL => {
                self.count = self.count.wrapping_add(1);
                let entry = value as u32;
                if entry < u32::from(abi::NOTIFY_VECTORS) {
                    NotifyEvent::Signal(entry as u16)
                } else {
                    NotifyEvent::BadSignal(entry)
                }
            }
            abi::NOTIFY_SCRATCH => {
                self.scratch = value as u32;
                NotifyEvent::None
            }
            _ => NotifyEvent::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_capability() {
        let n = Notify::new();
        assert_eq!(n.config_read(0, 4), 0x0001_c0de);
        assert_eq!(n.config_read(2, 2), 0x0001);
        assert_eq!(n.config_read(0x0b, 1), 0xff, "class ff");
        assert_eq!(n.config_read(0x06, 2) & 0x10, 0x10, "capability list");
        assert_eq!(n.config_read(0x34, 1), 0x40);
        assert_eq!(n.config_read(0x40, 1), 0x11, "MSI-X");
        assert_eq!(n.config_read(0x42, 2), 3, "4 entries, off");
        assert_eq!(n.config_read(0x44, 4), 0x800);
        assert_eq!(n.config_read(0x48, 4), 0xc00);
        assert_eq!(n.config_read(0x41, 2), u32::MAX, "unaligned");
        assert_eq!(n.config_read(0x1000, 4), u32::MAX);
    }

    #[test]
    fn bar_sizing_and_decode() {
        let mut n = Notify::new();
        assert_eq!(n.config_write(0x10, 4, u32::MAX), NotifyEvent::None);
        assert_eq!(n.config_read(0x10, 4), 0xffff_f000, "4 KiB memory BAR");
        n.config_write(0x10, 4, 0xc000_0000);
        assert_eq!(n.config_write(0x04, 2, 0x6), NotifyEvent::Bar(Some(0xc000_0000)));
        assert_eq!(n.config_read(0x04, 2), 0x6);
        assert_eq!(n.config_write(0x10, 4, 0xc010_0123), NotifyEvent::Bar(Some(0xc010_0000)));
        assert_eq!(n.config_write(0x04, 2, 0), NotifyEvent::Bar(None));
    }

    #[test]
    fn msix_control_and_registers() {
        let mut n = Notify::new();
        assert_eq!(n.config_write(0x42, 2, 0xc000), NotifyEvent::MsixControl { enabled: true, function_masked: true });
        assert_eq!(n.config_read(0x42, 2), 0xc003);
        assert_eq!(
            n.config_write(0x40, 4, 0x8000_0000),
            NotifyEvent::MsixControl { enabled: true, function_masked: false }
        );
        assert_eq!(n.config_write(0x40, 1, 0xff), NotifyEvent::None, "the ID byte is read-only");
        assert_eq!(n.register_write(abi::NOTIFY_SIGNAL, 4, 2), NotifyEvent::Signal(2));
        assert_eq!(n.register_write(abi::NOTIFY_SIGNAL, 4, 9), NotifyEvent::BadSignal(9));
        assert_eq!(n.register_read(abi::NOTIFY_COUNT, 4), 2);
        n.register_write(abi::NOTIFY_SCRATCH, 4, 0x1234_5678);
        assert_eq!(n.register_read(abi::NOTIFY_SCRATCH, 4), 0x1234_5678);
        assert_eq!(n.register_read(abi::NOTIFY_SCRATCH + 2, 2), 0x1234);
        assert_eq!(n.register_read(abi::NOTIFY_ID, 4), 0xc0de_0001);
        assert_eq!(n.register_write(abi::NOTIFY_SIGNAL, 1, 0), NotifyEvent::None, "byte writes ignored");
    }
}
