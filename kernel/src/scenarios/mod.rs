//! In-hypervisor test sequences, selected by `conduit.scenario=NAME` on the kernel command
//! line. Each prints exact markers (COM1 and defmt) that the host harness in `qemu-tests`
//! checks, and returns the run's verdict. The host side of each scenario (QEMU devices,
//! expected markers, expected verdict) is in `qemu-tests/src/scenarios.rs`.

mod boot_smoke;
mod edu;
mod exception_report;
mod guests;
mod iommu_dma;
mod iommu_irq_remap;
mod panic_report;
mod pci_config_virtualization;
mod pci_enumerate;
mod smp_two_cpus;
mod stack_overflow;

use crate::Platform;
use crate::exit::Verdict;

/// Scenario run when the command line names none.
pub const DEFAULT: &str = "partitions";

/// One sequence.
struct Scenario {
    name: &'static str,
    run: fn(&Platform) -> Result<(), &'static str>,
}

const SCENARIOS: &[Scenario] = &[
    Scenario { name: "boot_smoke", run: boot_smoke::run },
    Scenario { name: "exception_report", run: exception_report::run },
    Scenario { name: "smp_two_cpus", run: smp_two_cpus::run },
    Scenario { name: "panic_report", run: panic_report::run },
    Scenario { name: "stack_overflow", run: stack_overflow::run },
    Scenario { name: "pci_enumerate", run: pci_enumerate::run },
    Scenario { name: "pci_config_virtualization", run: pci_config_virtualization::run },
    Scenario { name: "iommu_dma_allowed", run: iommu_dma::allowed },
    Scenario { name: "iommu_dma_blocked", run: iommu_dma::blocked },
    Scenario { name: "iommu_irq_remap", run: iommu_irq_remap::run },
    Scenario { name: "partitions", run: guests::partitions },
    Scenario { name: "guest_isolation", run: guests::isolation },
    Scenario { name: "guest_interrupt_injection", run: guests::injection },
    Scenario { name: "two_guests_two_cpus", run: guests::two_at_once },
];

/// Runs scenario `name`; an unknown name is a failure that lists the known ones.
pub fn run(name: &str, platform: &Platform) -> Verdict {
    let Some(s) = SCENARIOS.iter().find(|s| s.name == name) else {
        crate::println!("scenario: unknown \"{}\"; known:", name);
        for s in SCENARIOS {
            crate::println!("  {}", s.name);
        }
        return Verdict::Failure;
    };
    crate::println!("scenario {}: start", s.name);
    defmt::info!("scenario {=str}: start", s.name);
    match (s.run)(platform) {
        Ok(()) => {
            crate::println!("scenario {}: PASS", s.name);
            defmt::info!("scenario {=str}: PASS", s.name);
            Verdict::Success
        }
        Err(why) => {
            crate::println!("scenario {}: FAIL: {}", s.name, why);
            defmt::error!("scenario {=str}: FAIL: {=str}", s.name, why);
            Verdict::Failure
        }
    }
}

/// Fails the scenario with `why` unless `cond` holds.
pub fn check(cond: bool, why: &'static str) -> Result<(), &'static str> {
    if cond { Ok(()) } else { Err(why) }
}
