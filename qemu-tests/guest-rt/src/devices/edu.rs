//! QEMU's `edu` teaching device (1234:11e8; QEMU `docs/specs/edu.rst`, `hw/misc/edu.c`): an ID
//! register, an inverter, a factorial unit that can interrupt on completion, an interrupt
//! status with raise/acknowledge registers, and a DMA engine between guest RAM and a 4 KiB
//! device buffer. BAR 0 (1 MiB): registers below 0x80 take 32-bit accesses only, the DMA
//! registers 32 or 64.

use core::fmt;

use crate::memory::DmaBuf;
use crate::mmio::Mmio;
use crate::time;

/// PCI vendor ID.
pub const VENDOR: u16 = 0x1234;
/// PCI device ID.
pub const DEVICE: u16 = 0x11e8;
/// What the ID register reads: major 1, minor 0, `0xed`.
pub const ID_VALUE: u32 = 0x0100_00ed;

/// Register offsets in BAR 0.
pub mod reg {
    /// Identification (RO).
    pub const ID: u64 = 0x00;
    /// Liveness check: reads the bitwise inverse of what was written.
    pub const INVERT: u64 = 0x04;
    /// Factorial: write n to start, read n! when done.
    pub const FACTORIAL: u64 = 0x08;
    /// Status: bit 0 computing (RO), bit 7 raise an interrupt when the factorial is done.
    pub const STATUS: u64 = 0x20;
    /// Interrupt status (RO): the sources raised and not acknowledged.
    pub const IRQ_STATUS: u64 = 0x24;
    /// Interrupt raise (WO): ORs the value into the interrupt status and interrupts.
    pub const IRQ_RAISE: u64 = 0x60;
    /// Interrupt acknowledge (WO): clears the value's bits from the interrupt status.
    pub const IRQ_ACK: u64 = 0x64;
    /// DMA source address (64-bit).
    pub const DMA_SRC: u64 = 0x80;
    /// DMA destination address (64-bit).
    pub const DMA_DST: u64 = 0x88;
    /// DMA byte count (64-bit).
    pub const DMA_COUNT: u64 = 0x90;
    /// DMA command (64-bit, `dma_cmd`).
    pub const DMA_CMD: u64 = 0x98;
}

/// Status register bits.
pub mod status {
    /// The factorial unit is computing.
    pub const COMPUTING: u32 = 1 << 0;
    /// Raise interrupt `irq::FACTORIAL` when the factorial is done.
    pub const IRQ_ON_FACTORIAL: u32 = 1 << 7;
}

/// Interrupt status values the device raises itself.
pub mod irq {
    /// The factorial finished (with `status::IRQ_ON_FACTORIAL`).
    pub const FACTORIAL: u32 = 0x1;
    /// A DMA transfer finished (with `dma_cmd::IRQ`).
    pub const DMA: u32 = 0x100;
}

/// DMA command bits.
pub mod dma_cmd {
    /// Start the transfer (reads 1 while it runs).
    pub const START: u64 = 1 << 0;
    /// Direction: set = device buffer → RAM, clear = RAM → device buffer.
    pub const TO_RAM: u64 = 1 << 1;
    /// Raise `irq::DMA` when done.
    pub const IRQ: u64 = 1 << 2;
}

/// Device address of the 4 KiB DMA buffer inside the device.
pub const BUFFER: u64 = 0x40000;
/// Bytes of the device buffer.
pub const BUFFER_BYTES: u64 = 4096;
/// Longest transfer used: QEMU 7.2 aborts the VM on a 4096-byte one (off-by-one).
pub const MAX_TRANSFER: u64 = 4095;
/// edu masks DMA addresses to 28 bits (its default `dma_mask`): RAM addresses must be below.
pub const DMA_LIMIT: u64 = 1 << 28;
/// Bytes of BAR 0 the driver uses (the registers; the BAR itself is 1 MiB).
pub const REGISTER_BYTES: u64 = 0x100;

/// Direction of a DMA transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Guest RAM → device buffer.
    ToDevice,
    /// Device buffer → guest RAM.
    ToRam,
}

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EduError {
    /// The factorial unit was still computing after the timeout.
    FactorialTimeout {
        /// Microseconds waited.
        waited_us: u64,
    },
    /// A DMA transfer was still running after the timeout.
    DmaTimeout {
        /// Microseconds waited.
        waited_us: u64,
    },
    /// The transfer does not fit: RAM range outside the buffer or above `DMA_LIMIT`, device
    /// range outside 0x40000–0x40fff, or longer than `MAX_TRANSFER`.
    BadTransfer {
        /// Offset in the device buffer.
        device_offset: u64,
        /// Bytes.
        bytes: u64,
    },
}

impl fmt::Display for EduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::FactorialTimeout { waited_us } => write!(f, "edu factorial still computing after {waited_us} us"),
            Self::DmaTimeout { waited_us } => write!(f, "edu DMA still running after {waited_us} us"),
            Self::BadTransfer { device_offset, bytes } => {
                write!(f, "edu DMA of {bytes} bytes at device buffer offset {device_offset:#x} does not fit")
            }
        }
    }
}

/// The edu device's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edu {
    regs: Mmio,
}

impl Edu {
    /// The device whose BAR 0 registers are `regs` (at least `REGISTER_BYTES`). The driver
    /// points DMA only at the [`DmaBuf`]s it is given.
    pub fn new(regs: Mmio) -> Self {
        Self { regs }
    }

    /// Guest-physical address of the registers.
    pub fn base(&self) -> u64 {
        self.regs.base()
    }

    /// The ID register.
    pub fn id(&self) -> u32 {
        self.regs.read32(reg::ID)
    }

    /// Writes `value` to the liveness register and reads it back (the device inverts it).
    pub fn invert(&self, value: u32) -> u32 {
        self.regs.write32(reg::INVERT, value);
        self.regs.read32(reg::INVERT)
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        self.regs.read32(reg::STATUS)
    }

    /// Starts computing `n!`; with `interrupt`, the device raises `irq::FACTORIAL` when done.
    pub fn start_factorial(&self, n: u32, interrupt: bool) {
        let flag = if interrupt { status::IRQ_ON_FACTORIAL } else { 0 };
        self.regs.write32(reg::STATUS, flag);
        self.regs.write32(reg::FACTORIAL, n);
    }

    /// Waits (bounded) until the factorial unit is idle and returns its result.
    pub fn factorial_result(&self, timeout_us: u64) -> Result<u32, EduError> {
        let start = time::uptime_us();
        if !time::wait_until(start.saturating_add(timeout_us), || self.status() & status::COMPUTING == 0) {
            return Err(EduError::FactorialTimeout { waited_us: time::uptime_us() - start });
        }
        Ok(self.regs.read32(reg::FACTORIAL))
    }

    /// The interrupt status.
    pub fn irq_status(&self) -> u32 {
        self.regs.read32(reg::IRQ_STATUS)
    }

    /// Raises an interrupt with `value` ORed into the interrupt status.
    pub fn raise(&self, value: u32) {
        self.regs.write32(reg::IRQ_RAISE, value);
    }

    /// Acknowledges the bits of `value`.
    pub fn ack(&self, value: u32) {
        self.regs.write32(reg::IRQ_ACK, value);
    }

    /// Copies `bytes` bytes between `ram` (from offset `ram_offset`) and the device buffer (from
    /// `device_offset`), waiting (bounded, polling the command register) for the transfer to
    /// end. No interrupt is requested.
    pub fn dma(
        &self,
        direction: Direction,
        ram: &DmaBuf,
        ram_offset: u64,
        device_offset: u64,
        bytes: u64,
        timeout_us: u64,
    ) -> Result<(), EduError> {
        let bad = EduError::BadTransfer { device_offset, bytes };
        let ram_end = ram_offset.checked_add(bytes).ok_or(bad)?;
        let device_end = device_offset.checked_add(bytes).ok_or(bad)?;
        if bytes == 0
            || bytes > MAX_TRANSFER
            || ram_end > ram.bytes()
            || device_end > BUFFER_BYTES
            || ram.addr() + ram_end > DMA_LIMIT
        {
            return Err(bad);
        }
        let ram_addr = ram.addr() + ram_offset;
        let device_addr = BUFFER + device_offset;
        let (src, dst, cmd) = match direction {
            Direction::ToDevice => (ram_addr, device_addr, dma_cmd::START),
            Direction::ToRam => (device_addr, ram_addr, dma_cmd::START | dma_cmd::TO_RAM),
        };
        self.regs.write64(reg::DMA_SRC, src);
        self.regs.write64(reg::DMA_DST, dst);
        self.regs.write64(reg::DMA_COUNT, bytes);
        self.regs.write64(reg::DMA_CMD, cmd);
        let start = time::uptime_us();
        if !time::wait_until(start.saturating_add(timeout_us), || self.regs.read64(reg::DMA_CMD) & dma_cmd::START == 0)
        {
            return Err(EduError::DmaTimeout { waited_us: time::uptime_us() - start });
        }
        Ok(())
    }
}
