//! Conduit's emulated `notify` device (`docs/devices.md`, `conduit_abi::vdev`): one 4 KiB
//! memory BAR of emulated registers (ID, SIGNAL, COUNT, SCRATCH) and an MSI-X capability with
//! four software-signalled entries (table at BAR 0 + 0x800, PBA at + 0xc00). Every register is
//! 32-bit.

use conduit_abi::vdev;

use crate::mmio::Mmio;

/// PCI vendor ID.
pub const VENDOR: u16 = vdev::VENDOR;
/// PCI device ID.
pub const DEVICE: u16 = vdev::NOTIFY_DEVICE;
/// What the ID register reads.
pub const ID_VALUE: u32 = 0xc0de_0001;

/// The `notify` device's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notify {
    regs: Mmio,
}

impl Notify {
    /// The device whose BAR 0 registers are `regs` (at least 16 bytes).
    pub fn new(regs: Mmio) -> Self {
        Self { regs }
    }

    /// The ID register.
    pub fn id(&self) -> u32 {
        self.regs.read32(vdev::NOTIFY_ID)
    }

    /// Signals MSI-X entry `entry` in software.
    pub fn signal(&self, entry: u32) {
        self.regs.write32(vdev::NOTIFY_SIGNAL, entry);
    }

    /// Signals and notifications requested so far.
    pub fn count(&self) -> u32 {
        self.regs.read32(vdev::NOTIFY_COUNT)
    }

    /// The scratch register.
    pub fn scratch(&self) -> u32 {
        self.regs.read32(vdev::NOTIFY_SCRATCH)
    }

    /// Writes the scratch register.
    pub fn set_scratch(&self, value: u32) {
        self.regs.write32(vdev::NOTIFY_SCRATCH, value);
    }
}
