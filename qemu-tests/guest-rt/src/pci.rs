//! The guest's PCI bus (`docs/devices.md`): configuration space through the ECAM window at
//! `BootInfo::ecam_base` (1, 2 or 4 bytes, naturally aligned, one `mov` each) and through
//! configuration mechanism #1 (ports `0xcf8`/`0xcfc`, 32-bit); enumeration of bus 0; BAR sizing
//! and placement in the BAR window at `BootInfo::pci_window`; command bits; the capability list.
//!
//! Register offsets and bits: PCI Local Bus Specification 3.0 §6.1–§6.2 (type 0 header),
//! §6.7 (capabilities list), §3.2.2.3.2 (configuration mechanism #1); PCI Express Base 4.0
//! §7.2.2 (ECAM).

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use conduit_abi::{BootInfo, layout};

use crate::cpu;
use crate::memory::PAGE_BYTES;
use crate::mmio::Mmio;

/// Type 0 configuration header offsets (PCI 3.0 Figure 6-1).
pub mod reg {
    /// Vendor ID (16-bit; `0xffff`: no function).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16-bit).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command (16-bit, `super::command`).
    pub const COMMAND: u16 = 0x04;
    /// Status (16-bit, `super::status`; RW1C error bits: never written here).
    pub const STATUS: u16 = 0x06;
    /// Revision ID (8-bit).
    pub const REVISION: u16 = 0x08;
    /// Class code: programming interface 0x09, subclass 0x0a, base class 0x0b.
    pub const CLASS: u16 = 0x09;
    /// Header type (8-bit; bit 7: multi-function device).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// BAR 0; BAR `i` at `BAR0 + 4 * i`, six of them in a type 0 header.
    pub const BAR0: u16 = 0x10;
    /// Capabilities pointer (8-bit; bits 1:0 reserved).
    pub const CAP_PTR: u16 = 0x34;
}

/// Command register bits (PCI 3.0 §6.2.2).
pub mod command {
    /// I/O space decode.
    pub const IO: u16 = 1 << 0;
    /// Memory space decode.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus master (DMA and MSI writes).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// INTx disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Status register bits (PCI 3.0 §6.2.3).
pub mod status {
    /// The function has a capabilities list at `reg::CAP_PTR`.
    pub const CAP_LIST: u16 = 1 << 4;
}

/// Capability IDs (PCI Code and ID Assignment Specification §2).
pub mod cap_id {
    /// Power management.
    pub const POWER_MANAGEMENT: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor specific.
    pub const VENDOR: u8 = 0x09;
    /// PCI Express.
    pub const PCIE: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// BAR register bits (PCI 3.0 §6.2.5.1).
mod bar_bits {
    /// Bit 0: I/O space BAR.
    pub const IO: u32 = 1 << 0;
    /// Bits 2:1 of a memory BAR: type.
    pub const TYPE_MASK: u32 = 0b11 << 1;
    /// Type 00: 32-bit address.
    pub const TYPE_32: u32 = 0b00 << 1;
    /// Type 10: 64-bit address (this BAR and the next).
    pub const TYPE_64: u32 = 0b10 << 1;
    /// Bit 3 of a memory BAR: prefetchable.
    pub const PREFETCHABLE: u32 = 1 << 3;
    /// Address bits of a memory BAR's low dword.
    pub const MEMORY_ADDRESS: u32 = !0xf;
    /// Address bits of an I/O BAR.
    pub const IO_ADDRESS: u32 = !0x3;
}

/// BARs in a type 0 header.
pub const BARS: u8 = 6;
/// Functions per device, devices per bus.
const FUNCTIONS: u8 = 8;
const DEVICES: u8 = 32;
/// Bytes of one function's configuration space in ECAM.
const FUNCTION_CONFIG_BYTES: u64 = 4096;
/// Most capabilities a 256-byte configuration space can hold ((0x100 - 0x40) / 4): a longer
/// chain loops.
const MAX_CAPABILITIES: usize = 48;

/// A function's address on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    /// Bus.
    pub bus: u8,
    /// Device (0–31).
    pub device: u8,
    /// Function (0–7).
    pub function: u8,
}

impl Bdf {
    /// `bus:device.function` (device and function are truncated to 5 and 3 bits).
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self { bus, device: device & 0x1f, function: function & 0x7 }
    }

    /// The requester ID: `bus << 8 | device << 3 | function` (how the interrupt hypercalls
    /// name a device).
    pub const fn rid(&self) -> u16 {
        (self.bus as u16) << 8 | (self.device as u16) << 3 | self.function as u16
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.device, self.function)
    }
}

/// What went wrong finding, sizing or placing a function's resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciError {
    /// `BootInfo::ecam_base` is 0: the partition has no PCI bus.
    NoEcam,
    /// `BootInfo::ecam_base` is not a 1 MiB-aligned window above RAM and below 4 GiB.
    BadEcam(u64),
    /// `BootInfo::pci_window` is 0 or not a window above RAM and below 4 GiB.
    BadWindow(u64),
    /// No function with this vendor and device ID on bus 0.
    NotFound {
        /// Vendor ID looked for.
        vendor: u16,
        /// Device ID looked for.
        device: u16,
    },
    /// The BAR index is not 0–5 (or is the upper half of a 64-bit BAR).
    BadBarIndex(u8),
    /// The BAR is not implemented (sizing reads 0).
    NoBar(u8),
    /// The BAR is an I/O BAR (only memory BARs are placed).
    IoBar(u8),
    /// The memory BAR has a reserved type (01 or 11).
    ReservedBarType(u8),
    /// A 64-bit BAR in slot 5 (its upper half would be outside the header).
    Bar64InLastSlot,
    /// The BAR window has no room for a BAR of this size.
    WindowFull {
        /// The BAR.
        index: u8,
        /// Its size.
        size: u64,
    },
    /// The BAR did not read back the address written.
    BarReadback {
        /// The BAR.
        index: u8,
        /// Address written.
        wrote: u64,
        /// Address read back.
        read: u64,
    },
    /// A capability pointer outside 0x40–0xfc.
    BadCapPointer(u8),
    /// The capability chain has more entries than fit in 256 bytes (a loop).
    CapChainTooLong,
}

impl fmt::Display for PciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoEcam => write!(f, "BootInfo.ecam_base is 0 (no PCI bus)"),
            Self::BadEcam(base) => {
                write!(f, "BootInfo.ecam_base {base:#x} is not a 1 MiB window above RAM below 4 GiB")
            }
            Self::BadWindow(base) => write!(f, "BootInfo.pci_window {base:#x} is not a window above RAM below 4 GiB"),
            Self::NotFound { vendor, device } => write!(f, "no function {vendor:04x}:{device:04x} on bus 0"),
            Self::BadBarIndex(i) => write!(f, "BAR {i} is not a BAR index"),
            Self::NoBar(i) => write!(f, "BAR {i} is not implemented"),
            Self::IoBar(i) => write!(f, "BAR {i} is an I/O BAR"),
            Self::ReservedBarType(i) => write!(f, "BAR {i} has a reserved memory type"),
            Self::Bar64InLastSlot => write!(f, "BAR 5 claims to be 64-bit"),
            Self::WindowFull { index, size } => {
                write!(f, "no room for BAR {index} ({size:#x} bytes) in the BAR window")
            }
            Self::BarReadback { index, wrote, read } => {
                write!(f, "BAR {index} reads back {read:#x} after {wrote:#x} was written")
            }
            Self::BadCapPointer(p) => write!(f, "capability pointer {p:#04x} outside 0x40-0xfc"),
            Self::CapChainTooLong => write!(f, "capability chain longer than {MAX_CAPABILITIES} (a loop)"),
        }
    }
}

/// Whether `[base, base + bytes)` lies above RAM and below 4 GiB (identity-mapped, uncached,
/// no RAM), clear of the local APIC page.
fn device_window_ok(info: &BootInfo, base: u64, bytes: u64) -> bool {
    let Some(end) = base.checked_add(bytes) else { return false };
    let apic = info.local_apic..info.local_apic + PAGE_BYTES;
    base >= info.memory_bytes && end <= 1 << 32 && (end <= apic.start || base >= apic.end)
}

/// The ECAM window of bus 0 (`BootInfo::ecam_base`, `layout::ECAM_BYTES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ecam {
    window: Mmio,
}

impl Ecam {
    /// The window from `info`, checked to be 1 MiB-aligned device space above RAM.
    pub fn from_boot_info(info: &BootInfo) -> Result<Self, PciError> {
        let base = info.ecam_base;
        if base == 0 {
            return Err(PciError::NoEcam);
        }
        if !base.is_multiple_of(layout::ECAM_BYTES) || !device_window_ok(info, base, layout::ECAM_BYTES) {
            return Err(PciError::BadEcam(base));
        }
        // SAFETY:
        // 1. Checked just above: below 4 GiB, above RAM and the local APIC page, so it holds
        //    no RAM and no Rust object; configuration accesses never make a device DMA into
        //    memory by themselves (bus master is only enabled by drivers that own DMA buffers).
        Ok(Self { window: unsafe { Mmio::new(base, layout::ECAM_BYTES) } })
    }

    /// Offset of `reg` of `bdf` in the window (bus 0 only; `reg` < 4096).
    fn offset(bdf: Bdf, reg: u16) -> u64 {
        assert!(bdf.bus == 0 && u64::from(reg) < FUNCTION_CONFIG_BYTES, "ECAM access to {bdf} register {reg:#x}");
        (u64::from(bdf.device) << 15) | (u64::from(bdf.function) << 12) | u64::from(reg)
    }

    /// Reads the byte at `reg` of `bdf`.
    pub fn read8(&self, bdf: Bdf, reg: u16) -> u8 {
        self.window.read8(Self::offset(bdf, reg))
    }

    /// Reads the 16-bit register at `reg` (2-byte aligned) of `bdf`.
    pub fn read16(&self, bdf: Bdf, reg: u16) -> u16 {
        self.window.read16(Self::offset(bdf, reg))
    }

    /// Reads the 32-bit register at `reg` (4-byte aligned) of `bdf`.
    pub fn read32(&self, bdf: Bdf, reg: u16) -> u32 {
        self.window.read32(Self::offset(bdf, reg))
    }

    /// Writes the byte at `reg` of `bdf`.
    pub fn write8(&self, bdf: Bdf, reg: u16, value: u8) {
        self.window.write8(Self::offset(bdf, reg), value)
    }

    /// Writes the 16-bit register at `reg` (2-byte aligned) of `bdf`.
    pub fn write16(&self, bdf: Bdf, reg: u16, value: u16) {
        self.window.write16(Self::offset(bdf, reg), value)
    }

    /// Writes the 32-bit register at `reg` (4-byte aligned) of `bdf`.
    pub fn write32(&self, bdf: Bdf, reg: u16, value: u32) {
        self.window.write32(Self::offset(bdf, reg), value)
    }

    /// The function at `bdf`, if present (vendor ID not `0xffff`).
    pub fn function(&self, bdf: Bdf) -> Option<Function> {
        (self.read16(bdf, reg::VENDOR_ID) != 0xffff).then_some(Function { ecam: *self, bdf })
    }

    /// Calls `each` for every function present on bus 0, in address order. Functions 1–7 of
    /// a device are scanned only when function 0 is multi-function.
    pub fn scan(&self, mut each: impl FnMut(Function)) {
        for device in 0..DEVICES {
            let Some(f0) = self.function(Bdf::new(0, device, 0)) else { continue };
            let multi = f0.read8(reg::HEADER_TYPE) & 0x80 != 0;
            each(f0);
            if multi {
                for function in 1..FUNCTIONS {
                    if let Some(f) = self.function(Bdf::new(0, device, function)) {
                        each(f);
                    }
                }
            }
        }
    }

    /// The first function on bus 0 with this vendor and device ID.
    pub fn find(&self, vendor: u16, device: u16) -> Result<Function, PciError> {
        let mut found = None;
        self.scan(|f| {
            if found.is_none() && f.vendor_id() == vendor && f.device_id() == device {
                found = Some(f);
            }
        });
        found.ok_or(PciError::NotFound { vendor, device })
    }
}

/// Configuration mechanism #1: the address at port `0xcf8`, the data at `0xcfc`; 32-bit
/// accesses to the first 256 bytes. The two port accesses are serialized by a lock shared by
/// every vCPU (interrupt handlers must not use it).
#[derive(Clone, Copy, Debug, Default)]
pub struct LegacyConfig;

/// Address port of configuration mechanism #1.
const CONFIG_ADDRESS: u16 = 0xcf8;
/// Data port of configuration mechanism #1.
const CONFIG_DATA: u16 = 0xcfc;
/// Enable bit of the configuration address.
const CONFIG_ENABLE: u32 = 1 << 31;

/// Held while a vCPU's address/data pair is in flight.
static LEGACY_LOCK: AtomicBool = AtomicBool::new(false);

impl LegacyConfig {
    /// The configuration address of `reg` (dword-aligned, < 256) of `bdf`.
    fn address(bdf: Bdf, reg: u8) -> u32 {
        CONFIG_ENABLE
            | u32::from(bdf.bus) << 16
            | u32::from(bdf.device) << 11
            | u32::from(bdf.function) << 8
            | u32::from(reg & 0xfc)
    }

    fn locked<T>(f: impl FnOnce() -> T) -> T {
        while LEGACY_LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            cpu::pause();
        }
        let value = f();
        LEGACY_LOCK.store(false, Ordering::Release);
        value
    }

    /// Reads the dword at `reg` (rounded down to a multiple of 4) of `bdf`.
    pub fn read32(&self, bdf: Bdf, reg: u8) -> u32 {
        Self::locked(|| {
            // SAFETY:
            // 1. Selecting a configuration register has no effect on memory.
            unsafe { cpu::outl(CONFIG_ADDRESS, Self::address(bdf, reg)) };
            cpu::inl(CONFIG_DATA)
        })
    }

    /// Writes the dword at `reg` (rounded down to a multiple of 4) of `bdf`.
    ///
    /// # Safety
    ///
    /// The write must not let the device write memory Rust code owns (e.g. by enabling bus
    /// master on a device programmed to DMA there).
    pub unsafe fn write32(&self, bdf: Bdf, reg: u8, value: u32) {
        Self::locked(|| {
            // SAFETY:
            // 1. Selecting a register has no effect on memory; the data write's effects are
            //    the caller's obligation.
            unsafe {
                cpu::outl(CONFIG_ADDRESS, Self::address(bdf, reg));
                cpu::outl(CONFIG_DATA, value);
            }
        })
    }
}

/// Kind of a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Memory32,
    /// 64-bit memory BAR (uses the next slot too).
    Memory64,
    /// I/O BAR.
    Io,
}

/// A sized BAR, and where it was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Slot (0–5).
    pub index: u8,
    /// Kind.
    pub kind: BarKind,
    /// Prefetchable (memory BARs).
    pub prefetchable: bool,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Guest-physical address, 0 until placed by [`Function::place_bar`].
    address: u64,
}

impl Bar {
    /// Guest-physical address (0: not placed).
    pub const fn address(&self) -> u64 {
        self.address
    }

    /// The registers `[offset, offset + bytes)` of a placed memory BAR, if inside it.
    ///
    /// # Safety
    ///
    /// Accesses through the window must not make the device write memory Rust code owns: the
    /// driver using it only points the device's DMA at [`crate::memory::DmaBuf`]s (and its
    /// interrupt messages at the local APIC).
    pub unsafe fn window(&self, offset: u64, bytes: u64) -> Option<Mmio> {
        if self.address == 0 || self.kind == BarKind::Io {
            return None;
        }
        // SAFETY:
        // 1. A placed memory BAR lies inside the BAR window, which `BarWindow` checked is
        //    above RAM and below 4 GiB: device memory, no Rust object.
        // 2. The DMA obligation is the caller's.
        let whole = unsafe { Mmio::new(self.address, self.size) };
        whole.window(offset, bytes)
    }
}

/// The window BARs are placed in (`BootInfo::pci_window`, `layout::PCI_WINDOW_BYTES`), handed
/// out by a bump allocator, each BAR aligned to its size (at least a page).
#[derive(Clone, Copy, Debug)]
pub struct BarWindow {
    next: u64,
    end: u64,
}

impl BarWindow {
    /// The window from `info`, checked to be device space above RAM below 4 GiB.
    pub fn from_boot_info(info: &BootInfo) -> Result<Self, PciError> {
        let base = info.pci_window;
        if base == 0 || !base.is_multiple_of(PAGE_BYTES) || !device_window_ok(info, base, layout::PCI_WINDOW_BYTES) {
            return Err(PciError::BadWindow(base));
        }
        Ok(Self { next: base, end: base + layout::PCI_WINDOW_BYTES })
    }

    /// An address for `size` bytes (a power of two), aligned to `max(size, page)`.
    pub fn alloc(&mut self, size: u64) -> Option<u64> {
        let align = size.max(PAGE_BYTES).checked_next_power_of_two()?;
        let start = self.next.checked_next_multiple_of(align)?;
        let end = start.checked_add(size.max(PAGE_BYTES))?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start)
    }
}

/// One capability in the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Capability ID (`cap_id`).
    pub id: u8,
    /// Offset in configuration space.
    pub offset: u8,
}

/// A present PCI function, accessed through ECAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    ecam: Ecam,
    bdf: Bdf,
}

impl Function {
    /// Its address.
    pub const fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// Its requester ID (`Bdf::rid`).
    pub const fn rid(&self) -> u16 {
        self.bdf.rid()
    }

    /// Reads the byte at `reg`.
    pub fn read8(&self, reg: u16) -> u8 {
        self.ecam.read8(self.bdf, reg)
    }

    /// Reads the 16-bit register at `reg`.
    pub fn read16(&self, reg: u16) -> u16 {
        self.ecam.read16(self.bdf, reg)
    }

    /// Reads the 32-bit register at `reg`.
    pub fn read32(&self, reg: u16) -> u32 {
        self.ecam.read32(self.bdf, reg)
    }

    /// Writes the byte at `reg`.
    pub fn write8(&self, reg: u16, value: u8) {
        self.ecam.write8(self.bdf, reg, value)
    }

    /// Writes the 16-bit register at `reg`.
    pub fn write16(&self, reg: u16, value: u16) {
        self.ecam.write16(self.bdf, reg, value)
    }

    /// Writes the 32-bit register at `reg`.
    pub fn write32(&self, reg: u16, value: u32) {
        self.ecam.write32(self.bdf, reg, value)
    }

    /// Vendor ID.
    pub fn vendor_id(&self) -> u16 {
        self.read16(reg::VENDOR_ID)
    }

    /// Device ID.
    pub fn device_id(&self) -> u16 {
        self.read16(reg::DEVICE_ID)
    }

    /// Class code (base class, subclass, programming interface).
    pub fn class(&self) -> (u8, u8, u8) {
        (self.read8(reg::CLASS + 2), self.read8(reg::CLASS + 1), self.read8(reg::CLASS))
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read16(reg::COMMAND)
    }

    /// The status register.
    pub fn status(&self) -> u16 {
        self.read16(reg::STATUS)
    }

    /// Writes the command register (a 16-bit write: the status register's RW1C bits are not
    /// touched).
    pub fn set_command(&self, value: u16) {
        self.write16(reg::COMMAND, value)
    }

    /// Sets `bits` (`command::*`) in the command register, keeping the others.
    pub fn enable(&self, bits: u16) {
        self.set_command(self.command() | bits)
    }

    /// Clears `bits` (`command::*`) in the command register, keeping the others.
    pub fn disable(&self, bits: u16) {
        self.set_command(self.command() & !bits)
    }

    /// Offset of BAR `index`.
    fn bar_reg(index: u8) -> u16 {
        reg::BAR0 + 4 * u16::from(index)
    }

    /// Sizes BAR `index`: with memory and I/O decode off, writes all ones, reads the mask
    /// back and restores the BAR (both halves of a 64-bit BAR), then restores the command
    /// register.
    pub fn probe_bar(&self, index: u8) -> Result<Bar, PciError> {
        if index >= BARS {
            return Err(PciError::BadBarIndex(index));
        }
        let lo_reg = Self::bar_reg(index);
        let original = self.read32(lo_reg);
        let kind = if original & bar_bits::IO != 0 {
            BarKind::Io
        } else {
            match original & bar_bits::TYPE_MASK {
                bar_bits::TYPE_32 => BarKind::Memory32,
                bar_bits::TYPE_64 if index + 1 < BARS => BarKind::Memory64,
                bar_bits::TYPE_64 => return Err(PciError::Bar64InLastSlot),
                _ => return Err(PciError::ReservedBarType(index)),
            }
        };
        let saved_command = self.command();
        self.set_command(saved_command & !(command::MEMORY | command::IO));
        self.write32(lo_reg, u32::MAX);
        let lo_mask = self.read32(lo_reg);
        self.write32(lo_reg, original);
        let hi_mask = if kind == BarKind::Memory64 {
            let hi_reg = lo_reg + 4;
            let hi_original = self.read32(hi_reg);
            self.write32(hi_reg, u32::MAX);
            let mask = self.read32(hi_reg);
            self.write32(hi_reg, hi_original);
            mask
        } else {
            u32::MAX
        };
        self.set_command(saved_command);
        let mask = match kind {
            BarKind::Io => {
                // I/O BARs may implement only 16 address bits (the upper ones read 0).
                let m = lo_mask & bar_bits::IO_ADDRESS;
                let m = if m != 0 && m & 0xffff_0000 == 0 { m | 0xffff_0000 } else { m };
                u64::from(m) | 0xffff_ffff_0000_0000
            }
            _ => u64::from(hi_mask) << 32 | u64::from(lo_mask & bar_bits::MEMORY_ADDRESS),
        };
        let size = (!mask).wrapping_add(1);
        if (lo_mask & !0xf == 0 && hi_mask == u32::MAX) || size == 0 || !size.is_power_of_two() {
            return Err(PciError::NoBar(index));
        }
        Ok(Bar { index, kind, prefetchable: original & bar_bits::PREFETCHABLE != 0, size, address: 0 })
    }

    /// Sizes memory BAR `index`, places it in `window` (aligned to its size) and checks it
    /// reads back. Decode is not enabled here (see [`Function::enable`]).
    pub fn place_bar(&self, index: u8, window: &mut BarWindow) -> Result<Bar, PciError> {
        let mut bar = self.probe_bar(index)?;
        if bar.kind == BarKind::Io {
            return Err(PciError::IoBar(index));
        }
        let address = window.alloc(bar.size).ok_or(PciError::WindowFull { index, size: bar.size })?;
        let lo_reg = Self::bar_reg(index);
        self.write32(lo_reg, address as u32);
        if bar.kind == BarKind::Memory64 {
            self.write32(lo_reg + 4, (address >> 32) as u32);
        }
        let read = self.bar_address(index).unwrap_or(0);
        if read != address {
            return Err(PciError::BarReadback { index, wrote: address, read });
        }
        bar.address = address;
        Ok(bar)
    }

    /// The address memory BAR `index` holds now (`None` for an I/O BAR or an invalid index).
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        if index >= BARS {
            return None;
        }
        let lo = self.read32(Self::bar_reg(index));
        if lo & bar_bits::IO != 0 {
            return None;
        }
        let hi = if lo & bar_bits::TYPE_MASK == bar_bits::TYPE_64 && index + 1 < BARS {
            self.read32(Self::bar_reg(index + 1))
        } else {
            0
        };
        Some(u64::from(hi) << 32 | u64::from(lo & bar_bits::MEMORY_ADDRESS))
    }

    /// Calls `each` for every capability in the list, in chain order. The walk is bounded: a
    /// pointer outside 0x40–0xfc or a chain of more than 48 entries ends it with an error.
    pub fn for_each_capability(&self, mut each: impl FnMut(Capability)) -> Result<(), PciError> {
        if self.status() & status::CAP_LIST == 0 {
            return Ok(());
        }
        let mut pointer = self.read8(reg::CAP_PTR) & 0xfc;
        for _ in 0..MAX_CAPABILITIES {
            if pointer == 0 {
                return Ok(());
            }
            if pointer < 0x40 {
                return Err(PciError::BadCapPointer(pointer));
            }
            let offset = u16::from(pointer);
            each(Capability { id: self.read8(offset), offset: pointer });
            pointer = self.read8(offset + 1) & 0xfc;
        }
        if pointer == 0 { Ok(()) } else { Err(PciError::CapChainTooLong) }
    }

    /// The offset of the first capability with ID `id`, if any.
    pub fn find_capability(&self, id: u8) -> Result<Option<u8>, PciError> {
        let mut found = None;
        self.for_each_capability(|cap| {
            if found.is_none() && cap.id == id {
                found = Some(cap.offset);
            }
        })?;
        Ok(found)
    }
}
