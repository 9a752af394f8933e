//! PCI config access on this machine, behind `conduit_pci::ConfigSpace`: ECAM windows from the
//! MCFG (one uncached MMIO access per config access; no lock) and, as fallback for segment 0
//! buses no window covers (or when forced), the legacy 0xCF8/0xCFC port pair, serialized by a
//! lock because address and data are two separate port accesses.

use crate::sync::IrqMutex;
use conduit_acpi::EcamWindow;
use conduit_pci::{CONFIG_SIZE, ConfigSpace, EXTENDED_CONFIG_SIZE, PciAddress, Width};
use heapless::Vec;
use x86_64::instructions::port::Port;

/// CONFIG_ADDRESS.
const CONFIG_ADDRESS: u16 = 0xcf8;
/// CONFIG_DATA.
const CONFIG_DATA: u16 = 0xcfc;
/// CONFIG_ADDRESS enable bit.
const CONFIG_ENABLE: u32 = 1 << 31;

static LEGACY: IrqMutex<()> = IrqMutex::new(());

/// How config space is reached.
#[derive(Clone, Debug, Default)]
pub struct PlatformConfig {
    windows: Vec<EcamWindow, { conduit_acpi::mcfg::MAX_WINDOWS }>,
    legacy_fallback: bool,
}

impl PlatformConfig {
    /// ECAM through `windows`, legacy ports for segment 0 buses no window covers when
    /// `legacy_fallback`.
    ///
    /// # Safety
    ///
    /// Every window must be identity-mapped uncached in the kernel's tables (every byte of
    /// it) and stay mapped for as long as the value is used, and must be an MCFG ECAM window:
    /// device config registers, never RAM. `read`/`write` access it through raw pointers.
    pub unsafe fn new(windows: &[EcamWindow], legacy_fallback: bool) -> Self {
        Self { windows: windows.iter().copied().collect(), legacy_fallback }
    }

    /// Legacy ports only (256-byte config space, segment 0).
    pub fn legacy_only() -> Self {
        Self { windows: Vec::new(), legacy_fallback: true }
    }

    fn ecam(&self, addr: PciAddress, offset: u16) -> Option<u64> {
        let w =
            self.windows.iter().find(|w| w.segment == addr.segment && (w.start_bus..=w.end_bus).contains(&addr.bus))?;
        // `devfn` keeps device and function to their widths: the address stays inside the
        // bus's 1 MiB of the window whatever the caller put in the fields.
        Some(w.base + (u64::from(addr.bus) << 20) + (u64::from(addr.devfn()) << 12) + u64::from(offset & 0xfff))
    }

    fn legacy(&self, addr: PciAddress, offset: u16) -> Option<u32> {
        (self.legacy_fallback && addr.segment == 0 && offset < CONFIG_SIZE).then(|| {
            CONFIG_ENABLE | u32::from(addr.bus) << 16 | u32::from(addr.devfn()) << 8 | u32::from(offset & 0xfc)
        })
    }
}

impl ConfigSpace for PlatformConfig {
    fn read(&self, addr: PciAddress, offset: u16, width: Width) -> u32 {
        if !conduit_pci::access_ok(offset, width, self.size(addr)) {
            return width.ones();
        }
        if let Some(pa) = self.ecam(addr, offset) {
            // SAFETY:
            // 1. `pa` lies in an MCFG ECAM window that is mapped uncached (identity) for as
            //    long as this value exists (`new`'s contract); the access is naturally aligned
            //    (checked above) and inside the function's 4 KiB (`ecam` masks every field).
            // 2. ECAM reads have no side effects beyond the device's own register semantics,
            //    which is what a config read means.
            return unsafe {
                match width {
                    Width::Byte => u32::from(core::ptr::read_volatile(pa as *const u8)),
                    Width::Word => u32::from(core::ptr::read_volatile(pa as *const u16)),
                    Width::Dword => core::ptr::read_volatile(pa as *const u32),
                }
            };
        }
        let Some(cf8) = self.legacy(addr, offset) else { return width.ones() };
        let _serialized = LEGACY.lock();
        let data = CONFIG_DATA + (offset & 3);
        // SAFETY:
        // 1. 0xCF8/0xCFC are the PCI configuration mechanism #1 ports; the lock makes the
        //    address write and the data access one unit with respect to other CPUs.
        // 2. `data` is 0xCFC plus the byte offset inside the dword, as the mechanism requires
        //    for byte and word accesses (alignment checked above).
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(cf8);
            match width {
                Width::Byte => u32::from(Port::<u8>::new(data).read()),
                Width::Word => u32::from(Port::<u16>::new(data).read()),
                Width::Dword => Port::<u32>::new(data).read(),
            }
        }
    }

    fn write(&self, addr: PciAddress, offset: u16, width: Width, value: u32) {
        if !conduit_pci::access_ok(offset, width, self.size(addr)) {
            return;
        }
        if let Some(pa) = self.ecam(addr, offset) {
            // SAFETY:
            // 1. `pa` lies in an MCFG ECAM window mapped uncached for as long as this value
            //    exists (`new`'s contract); the access is naturally aligned (checked above) and
            //    inside the function's 4 KiB (`ecam` masks every field).
            // 2. The write reaches only that config register: device register semantics, no
            //    Rust object is behind it.
            unsafe {
                match width {
                    Width::Byte => core::ptr::write_volatile(pa as *mut u8, value as u8),
                    Width::Word => core::ptr::write_volatile(pa as *mut u16, value as u16),
                    Width::Dword => core::ptr::write_volatile(pa as *mut u32, value),
                }
            }
            return;
        }
        let Some(cf8) = self.legacy(addr, offset) else { return };
        let _serialized = LEGACY.lock();
        let data = CONFIG_DATA + (offset & 3);
        // SAFETY:
        // 1. 0xCF8/0xCFC are the PCI configuration mechanism #1 ports; the lock makes the
        //    address write and the data access one unit with respect to other CPUs.
        // 2. `data` is 0xCFC plus the byte offset inside the dword, as the mechanism requires
        //    for byte and word accesses (alignment checked above).
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(cf8);
            match width {
                Width::Byte => Port::<u8>::new(data).write(value as u8),
                Width::Word => Port::<u16>::new(data).write(value as u16),
                Width::Dword => Port::<u32>::new(data).write(value),
            }
        }
    }

    fn size(&self, addr: PciAddress) -> u16 {
        if self.ecam(addr, 0).is_some() {
            EXTENDED_CONFIG_SIZE
        } else if self.legacy(addr, 0).is_some() {
            CONFIG_SIZE
        } else {
            0
        }
    }
}
