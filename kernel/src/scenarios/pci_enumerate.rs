//! `pci_enumerate`: the boot inventory (through ECAM) is printed, one canonical line per
//! function, for the harness to compare with the devices QEMU was given; here the inventory
//! is checked for internal consistency (no broken chains, power-of-two BARs, MSI-X table and
//! PBA inside their BAR, every bridge's secondary bus populated), and a second enumeration
//! through the legacy 0xCF8/0xCFC ports must agree with the ECAM one on every function.

use super::check;
use crate::arch::pci::PlatformConfig;
use crate::sync::IrqMutex;
use crate::{Platform, pci, println};
use conduit_pci::enumerate::{Function, Inventory, Segment, enumerate};

static LEGACY: IrqMutex<Inventory> = IrqMutex::new(Inventory::new());

pub fn run(p: &Platform) -> Result<(), &'static str> {
    check(!p.mcfg.windows.is_empty(), "no MCFG: ECAM is not in use")?;
    pci::print_inventory();
    let (functions, bridges, behind) = pci::with_inventory(consistent)?;
    println!(
        "pci_enumerate: {} functions consistent; {} bridges followed, {} functions behind them",
        functions, bridges, behind
    );
    let legacy_cfg = PlatformConfig::legacy_only();
    let mut legacy = LEGACY.lock();
    enumerate(&legacy_cfg, &[Segment { segment: 0, start_bus: 0, end_bus: 255 }], &mut legacy);
    let agreed = pci::with_inventory(|ecam| agree(ecam, &legacy))?;
    println!("pci_enumerate: legacy 0xCF8/0xCFC enumeration agrees with ECAM on {} functions", agreed);
    defmt::info!("pci_enumerate: {=usize} functions, legacy agrees on {=usize}", functions, agreed);
    Ok(())
}

/// Returns (functions, bridges, functions behind bridges).
fn consistent(inv: &Inventory) -> Result<(usize, usize, usize), &'static str> {
    check(inv.problems.is_empty(), "enumeration recorded problems")?;
    let mut bridges = 0;
    let mut behind = 0;
    for f in &inv.functions {
        check(f.chains.error.is_none() && f.chains.ext_error.is_none(), "a capability chain is broken")?;
        check(f.bars.iter().all(|b| b.size.is_power_of_two()), "a BAR size is not a power of two")?;
        if let Some(m) = f.msix {
            let fits =
                |bir: u8, off: u32, len: u32| f.bar(bir).is_some_and(|b| u64::from(off) + u64::from(len) <= b.size);
            check(fits(m.table_bir, m.table_offset, m.table_bytes()), "an MSI-X table lies outside its BAR")?;
            check(fits(m.pba_bir, m.pba_offset, m.pba_bytes()), "an MSI-X PBA lies outside its BAR")?;
        }
        if let Some(b) = f.bridge {
            bridges += 1;
            let below = inv.functions.iter().filter(|g| (b.secondary..=b.subordinate).contains(&g.addr.bus)).count();
            check(below > 0, "a bridge's secondary bus has no function")?;
            behind += below;
        }
    }
    Ok((inv.functions.len(), bridges, behind))
}

fn same(a: &Function, b: &Function) -> bool {
    let caps = |f: &Function| f.chains.caps.iter().map(|c| (c.id, c.offset)).collect::<heapless::Vec<_, 48>>();
    a.addr == b.addr
        && (a.vendor, a.device, a.class, a.header_type) == (b.vendor, b.device, b.class, b.header_type)
        && a.bars == b.bars
        && a.rom == b.rom
        && caps(a) == caps(b)
        && a.msi == b.msi
        && a.msix == b.msix
        && a.bridge == b.bridge
}

fn agree(ecam: &Inventory, legacy: &Inventory) -> Result<usize, &'static str> {
    check(ecam.functions.len() == legacy.functions.len(), "legacy enumeration found a different number of functions")?;
    for (a, b) in ecam.functions.iter().zip(legacy.functions.iter()) {
        if !same(a, b) {
            println!("pci_enumerate: ECAM and legacy differ at {}", a.addr);
            return Err("legacy and ECAM enumeration disagree");
        }
        check(b.config_size == 256 && b.chains.ext.is_empty(), "legacy access reached extended config space")?;
    }
    Ok(ecam.functions.len())
}
