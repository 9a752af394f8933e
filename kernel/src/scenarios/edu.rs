//! A driver for QEMU's `edu` test device (1234:11e8), as the IOMMU scenarios use it: identity
//! check, DMA between guest-physical (here: IOVA) memory and its 4 KiB buffer, raising and
//! acknowledging its interrupt, programming its MSI capability. Safe code only: registers go
//! through an `MmioWindow`, config space through `ConfigSpace`.

use crate::arch::mmio::MmioWindow;
use crate::arch::time;
use crate::pci;
use conduit_pci::caps::MsiCap;
use conduit_pci::regs::{self, Command};
use conduit_pci::{ConfigSpace, PciAddress};

/// Identification register (0x00): 0x010000ed.
const ID: u64 = 0x00;
const EXPECTED_ID: u32 = 0x0100_00ed;
/// Interrupt status (0x24), raise (0x60), acknowledge (0x64).
const IRQ_STATUS: u64 = 0x24;
const IRQ_RAISE: u64 = 0x60;
const IRQ_ACK: u64 = 0x64;
/// DMA source, destination, count, command.
const DMA_SRC: u64 = 0x80;
const DMA_DST: u64 = 0x88;
const DMA_COUNT: u64 = 0x90;
const DMA_CMD: u64 = 0x98;
/// DMA command bits: start, direction edu→RAM, interrupt when done.
const DMA_START: u64 = 1;
const DMA_TO_RAM: u64 = 2;
/// Where the device's own buffer sits in its DMA address space.
pub const BUFFER: u64 = 0x40000;
/// Largest transfer QEMU 7.2 handles without aborting (PLATFORM.md: 4096 crashes the VM).
pub const MAX_TRANSFER: u64 = 4095;
/// How long a DMA may take. edu completes a transfer 100 ms (virtual time) after it starts:
/// a bound of exactly 100 ms on the TSC lost that race whenever the TSC calibration came out
/// a little slow, so the bound is ten times the device's latency.
const DMA_TIMEOUT_US: u64 = 1_000_000;

/// An opened edu device.
#[derive(Debug)]
pub struct Edu {
    /// Its address.
    pub addr: PciAddress,
    mmio: MmioWindow,
    msi: MsiCap,
}

/// Direction of a DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Memory (at a DMA address) into the device buffer.
    ToDevice,
    /// The device buffer out to memory.
    ToMemory,
}

impl Edu {
    /// Finds edu, maps its BAR0, turns on memory decode and bus mastering, checks its ID.
    pub fn open() -> Result<Self, &'static str> {
        let (addr, bar, msi) = pci::with_inventory(|inv| {
            let f = inv.by_id(0x1234, 0x11e8).next()?;
            Some((f.addr, *f.bar(0)?, f.msi?))
        })
        .ok_or("no edu device (1234:11e8) with BAR0 and MSI")?;
        let mmio = MmioWindow::map(bar.address, bar.size).map_err(|_| "cannot map edu BAR0")?;
        let cfg = pci::config();
        let cmd = cfg.read16(addr, regs::COMMAND);
        cfg.write16(addr, regs::COMMAND, cmd | (Command::MEMORY | Command::BUS_MASTER).bits());
        if mmio.read32(ID) != EXPECTED_ID {
            return Err("edu identification register is wrong");
        }
        Ok(Self { addr, mmio, msi })
    }

    /// Copies `count` bytes by DMA between DMA address `addr` and the device buffer, waiting
    /// (bounded) for completion. What the DMA really did is for the caller to check.
    pub fn dma(&self, dir: Direction, addr: u64, count: u64) -> Result<(), &'static str> {
        let count = count.min(MAX_TRANSFER);
        let (src, dst, cmd) = match dir {
            Direction::ToDevice => (addr, BUFFER, DMA_START),
            Direction::ToMemory => (BUFFER, addr, DMA_START | DMA_TO_RAM),
        };
        self.mmio.write64(DMA_SRC, src);
        self.mmio.write64(DMA_DST, dst);
        self.mmio.write64(DMA_COUNT, count);
        self.mmio.write64(DMA_CMD, cmd);
        let deadline = time::deadline_after_us(DMA_TIMEOUT_US);
        while self.mmio.read64(DMA_CMD) & DMA_START != 0 {
            if time::passed(deadline) {
                return Err("edu DMA did not complete");
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// Raises the device's interrupt with status bits `bits`.
    pub fn raise(&self, bits: u32) {
        self.mmio.write32(IRQ_RAISE, bits);
    }

    /// Acknowledges every pending interrupt status bit.
    pub fn ack_all(&self) {
        let st = self.mmio.read32(IRQ_STATUS);
        self.mmio.write32(IRQ_ACK, st);
    }

    /// Programs the physical MSI capability with `address`/`data` and enables it.
    pub fn program_msi(&self, address: u64, data: u32) {
        let cfg = pci::config();
        let m = self.msi;
        cfg.write16(self.addr, m.control(), cfg.read16(self.addr, m.control()) & !1);
        cfg.write32(self.addr, m.address_lo(), address as u32);
        if let Some(hi) = m.address_hi() {
            cfg.write32(self.addr, hi, (address >> 32) as u32);
        }
        cfg.write16(self.addr, m.data(), data as u16);
        cfg.write16(self.addr, m.control(), cfg.read16(self.addr, m.control()) | 1);
    }

    /// Turns its MSI off.
    pub fn disable_msi(&self) {
        let cfg = pci::config();
        cfg.write16(self.addr, self.msi.control(), cfg.read16(self.addr, self.msi.control()) & !1);
    }

    /// Bus mastering off (no DMA, no MSI), as when the device is handed back.
    pub fn quiesce(&self) {
        self.disable_msi();
        let cfg = pci::config();
        let cmd = cfg.read16(self.addr, regs::COMMAND);
        cfg.write16(self.addr, regs::COMMAND, cmd & !Command::BUS_MASTER.bits());
    }
}
