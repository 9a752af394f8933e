//! The boot record: what any boot protocol tells Conduit, copied out of the protocol's own
//! structures into fixed-capacity storage.

use conduit_mem::PhysRange;
use conduit_mem::map::{MAX_RAW_REGIONS, RawRegion};
use heapless::{String, Vec};

/// Longest kernel command line accepted (bytes).
pub const CMDLINE_MAX: usize = 1024;
/// Most boot modules recorded.
pub const MAX_MODULES: usize = 16;
/// Longest module command line kept.
pub const MODULE_CMDLINE_MAX: usize = 128;

/// Which protocol booted us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Protocol {
    /// Xen PVH direct boot (QEMU `-kernel`).
    Pvh,
}

/// A boot module (a guest payload, later).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Where it was loaded.
    pub range: PhysRange,
    /// Its command line.
    pub cmdline: String<MODULE_CMDLINE_MAX>,
}

/// Why the boot record could not be built. The kernel reports it and stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BootError {
    /// The protocol structure's magic number is wrong.
    BadMagic(u32),
    /// The protocol version lacks something Conduit needs (PVH: version 1 for the memory map).
    UnsupportedVersion(u32),
    /// No memory map was given.
    NoMemoryMap,
    /// More memory map entries than Conduit accepts.
    TooManyRegions(u32),
    /// The command line is longer than `CMDLINE_MAX` or not UTF-8.
    BadCmdline,
    /// More modules than `MAX_MODULES`.
    TooManyModules(u32),
    /// A structure could not be read at this physical address.
    Unreadable(u64),
    /// The entry code passed a protocol number this crate does not know.
    UnknownProtocol(u32),
}

/// What the kernel learns from the boot protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootRecord {
    /// The protocol.
    pub protocol: Protocol,
    /// Firmware memory map, as given (normalized later by `conduit_mem::MemoryMap`).
    pub memory_map: Vec<RawRegion, MAX_RAW_REGIONS>,
    /// Kernel command line.
    pub cmdline: String<CMDLINE_MAX>,
    /// ACPI RSDP, when the protocol passes it.
    pub rsdp_paddr: Option<u64>,
    /// Boot modules.
    pub modules: Vec<Module, MAX_MODULES>,
    /// Memory holding the protocol's own structures (kept out of the allocator).
    pub boot_data: Vec<PhysRange, 8>,
}

impl BootRecord {
    /// The value of `key=value` on the command line (the last one wins), or `Some("")` for a
    /// bare `key`.
    pub fn cmdline_value(&self, key: &str) -> Option<&str> {
        self.cmdline.split_ascii_whitespace().rev().find_map(|tok| match tok.split_once('=') {
            Some((k, v)) if k == key => Some(v),
            None if tok == key => Some(""),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_values() {
        let mut r = BootRecord {
            protocol: Protocol::Pvh,
            memory_map: Vec::new(),
            cmdline: String::new(),
            rsdp_paddr: None,
            modules: Vec::new(),
            boot_data: Vec::new(),
        };
        r.cmdline.push_str("  conduit.scenario=boot_smoke quiet conduit.scenario=smp_two_cpus x=").unwrap();
        assert_eq!(r.cmdline_value("conduit.scenario"), Some("smp_two_cpus"));
        assert_eq!(r.cmdline_value("quiet"), Some(""));
        assert_eq!(r.cmdline_value("x"), Some(""));
        assert_eq!(r.cmdline_value("conduit"), None);
    }
}
