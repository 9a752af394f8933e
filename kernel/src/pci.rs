//! The machine's PCI: config access chosen at boot (ECAM from the MCFG, legacy ports as
//! fallback), the inventory enumerated once at boot and logged.

use crate::arch::pci::PlatformConfig;
use crate::sync::IrqMutex;
use conduit_acpi::EcamWindow;
use conduit_mem::PhysRange;
use conduit_pci::enumerate::{Inventory, Segment, enumerate};
use conduit_pci::summary::Summary;
use heapless::Vec;

static CONFIG: spin::Once<PlatformConfig> = spin::Once::new();
static INVENTORY: IrqMutex<Inventory> = IrqMutex::new(Inventory::new());

/// Config access for the whole machine.
pub fn config() -> &'static PlatformConfig {
    CONFIG.call_once(PlatformConfig::legacy_only)
}

/// The PCI segments to scan: one per ECAM window, else segment 0 through legacy ports.
pub fn segments(windows: &[EcamWindow]) -> Vec<Segment, { conduit_acpi::mcfg::MAX_WINDOWS }> {
    if windows.is_empty() {
        let mut v = Vec::new();
        let _ = v.push(Segment { segment: 0, start_bus: 0, end_bus: 255 });
        return v;
    }
    windows.iter().map(|w| Segment { segment: w.segment, start_bus: w.start_bus, end_bus: w.end_bus }).collect()
}

/// Chooses config access, enumerates, logs the inventory. Returns (functions, problems).
/// Each ECAM window is (re)mapped uncached here first, which also checks it is device
/// memory; a window that cannot be is left out (its segment 0 buses fall back to the legacy
/// ports).
pub fn init(windows: &[EcamWindow]) -> (usize, usize) {
    let mut mapped: Vec<EcamWindow, { conduit_acpi::mcfg::MAX_WINDOWS }> = Vec::new();
    for w in windows {
        let range = PhysRange::new(w.start(), w.start().saturating_add(w.len_bytes()));
        match crate::arch::paging::map_mmio(range) {
            Ok(()) => {
                let _ = mapped.push(*w);
            }
            Err(e) => {
                defmt::error!("pci: ECAM window at {=u64:#x} not usable: {}", w.start(), e);
                crate::println!("pci: ECAM window at {:#x} not usable: {:?}", w.start(), e);
            }
        }
    }
    // SAFETY:
    // 1. Every window in `mapped` was just mapped uncached (identity) by `map_mmio`, which
    //    refuses ranges that alias RAM, the image or firmware tables; nothing unmaps device
    //    memory afterwards, and the value lives in a static for the kernel's lifetime.
    // 2. They are the MCFG's ECAM windows: config registers.
    let cfg = CONFIG.call_once(|| unsafe { PlatformConfig::new(&mapped, true) });
    let mut inv = INVENTORY.lock();
    enumerate(cfg, &segments(&mapped), &mut inv);
    // Every memory BAR is mapped (uncached) into the hypervisor's tables once, now: assigning
    // a device later reaches its registers (MSI-X table, forwarded accesses) without growing
    // the kernel's tables at run time.
    for f in &inv.functions {
        for b in f.bars.iter().filter(|b| !matches!(b.kind, conduit_pci::bar::BarKind::Io) && b.size > 0) {
            let end = b.address.saturating_add(b.size);
            if let Err(e) = crate::arch::paging::map_mmio(PhysRange::new(b.address, end)) {
                defmt::warn!("pci: {} bar{=u8} at {=u64:#x} not mapped: {}", f.addr, b.index, b.address, e);
            }
        }
    }
    for f in &inv.functions {
        defmt::info!("pci: {}", defmt::Display2Format(&Summary(f)));
        for b in &f.bars {
            defmt::debug!(
                "pci: {} bar{=u8} {=str} at {=u64:#x} size {=u64:#x}",
                f.addr,
                b.index,
                b.kind.name(),
                b.address,
                b.size
            );
        }
    }
    for p in &inv.problems {
        defmt::warn!("pci: {}", p);
        crate::println!("pci: problem: {:?}", p);
    }
    (inv.functions.len(), inv.problems.len())
}

/// Prints the inventory, one canonical line per function, on COM1 (and the defmt log).
pub fn print_inventory() {
    let inv = INVENTORY.lock();
    crate::println!("pci: {} functions", inv.functions.len());
    for f in &inv.functions {
        crate::println!("pci: {}", Summary(f));
    }
    defmt::info!("pci: inventory of {=usize} functions printed", inv.functions.len());
}

/// Runs `f` with the inventory.
pub fn with_inventory<R>(f: impl FnOnce(&Inventory) -> R) -> R {
    f(&INVENTORY.lock())
}
