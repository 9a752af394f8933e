//! Which partitions to run: descriptions in the text syntax of `conduit_vm::partition`, either
//! given on the kernel command line (`conduit.partition=NAME:key=value,...`, repeatable) or a
//! compiled-in set chosen with `conduit.partitions=SET` (default `default`). Compiled-in sets
//! go through the same parser and the same validation as command-line ones.

use crate::Platform;
use crate::arch::{percpu, svm};
use conduit_vm::partition::{self, Bdf, Machine, ParseError, Spec, ValidationError};

/// Most partitions in one set.
pub const MAX: usize = crate::vmm::MAX_PARTITIONS;

/// The compiled-in sets.
pub const SETS: &[(&str, &[&str])] = &[
    ("default", &["hello:guest=hello,memory=16M,cpus=1,console=serial"]),
    ("injection", &["irq:guest=injection,memory=16M,cpus=1"]),
    ("pair", &["left:guest=worker,memory=16M,cpus=0,arg=60", "right:guest=worker,memory=16M,cpus=1,arg=60"]),
];

/// Why no partition set could be chosen.
#[derive(Debug)]
pub enum SelectError {
    /// `conduit.partitions=` names no compiled-in set.
    UnknownSet,
    /// More than `MAX` descriptions.
    TooMany,
    /// A description does not parse.
    Parse(ParseError),
    /// The set does not fit the machine.
    Invalid(ValidationError),
}

impl core::fmt::Display for SelectError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::UnknownSet => {
                f.write_str("conduit.partitions= names no compiled-in set; known:")?;
                for (name, _) in SETS {
                    write!(f, " {name}")?;
                }
                Ok(())
            }
            Self::TooMany => write!(f, "more than {MAX} partitions"),
            Self::Parse(e) => write!(f, "{e}"),
            Self::Invalid(e) => write!(f, "{e}"),
        }
    }
}

/// The descriptions the command line selects, parsed (not validated).
pub fn select(cmdline: &str) -> Result<heapless::Vec<Spec, MAX>, SelectError> {
    let mut given = cmdline.split_ascii_whitespace().filter_map(|t| t.strip_prefix("conduit.partition=")).peekable();
    let texts: heapless::Vec<&str, MAX> = if given.peek().is_some() {
        let mut v = heapless::Vec::new();
        for t in given {
            v.push(t).map_err(|_| SelectError::TooMany)?;
        }
        v
    } else {
        let set = cmdline
            .split_ascii_whitespace()
            .rev()
            .find_map(|t| t.strip_prefix("conduit.partitions="))
            .unwrap_or("default");
        let (_, texts) = SETS.iter().find(|(n, _)| *n == set).ok_or(SelectError::UnknownSet)?;
        texts.iter().copied().take(MAX).collect()
    };
    let mut specs = heapless::Vec::new();
    for t in texts {
        let spec = partition::parse(t).map_err(SelectError::Parse)?;
        specs.push(spec).map_err(|_| SelectError::TooMany)?;
    }
    Ok(specs)
}

/// Checks `specs` against this machine: online CPUs with SVM, free memory (less a reserve for
/// tables), PCI functions that are not bridges, the IOMMU.
pub fn validate(specs: &[Spec], platform: &Platform) -> Result<(), SelectError> {
    let cpus: heapless::Vec<u8, { percpu::MAX_CPUS }> = percpu::all()
        .iter()
        .filter(|c| c.state() == percpu::CpuState::Online && svm::host_vmcb(c.index()).is_some())
        .filter_map(|c| u8::try_from(c.index()).ok())
        .collect();
    let devices: heapless::Vec<Bdf, { conduit_pci::enumerate::MAX_FUNCTIONS }> = crate::pci::with_inventory(|inv| {
        inv.functions
            .iter()
            .filter(|f| f.bridge.is_none())
            .map(|f| Bdf { segment: f.addr.segment, bus: f.addr.bus, device: f.addr.device, function: f.addr.function })
            .collect()
    });
    // Keep 4 MiB per partition for nested tables and VMCBs.
    let (free, _) = crate::mem::stats();
    let reserve: u64 = 4 << 20;
    let memory_free_bytes = (free * conduit_mem::PAGE_SIZE).saturating_sub(reserve * specs.len() as u64);
    let machine = Machine { cpus_online: &cpus, memory_free_bytes, devices: &devices, iommu: platform.iommu.is_some() };
    partition::validate(specs, &machine).map_err(SelectError::Invalid)
}
