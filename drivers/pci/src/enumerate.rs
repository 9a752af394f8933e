//! Enumeration: every bus reachable from each root bus through bridges (type 1 headers with
//! the secondary/subordinate numbers firmware assigned), every function of multi-function
//! devices, BARs sized, both capability chains walked, MSI/MSI-X/PCIe decoded. Bounded: each
//! bus is scanned once (a bridge pointing at a visited or lower bus is recorded as a problem),
//! and the inventory has a fixed capacity.

use crate::bar::{self, BadBar, Bar, Rom};
use crate::caps::{self, Chains, MsiCap, MsixCap, PcieCap};
use crate::regs::{self, cap_id};
use crate::{ConfigSpace, PciAddress};
use heapless::Vec;

/// Most functions in an inventory.
pub const MAX_FUNCTIONS: usize = 96;
/// Most problems recorded.
pub const MAX_PROBLEMS: usize = 32;

/// Bus numbers of a bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BridgeBuses {
    /// Primary (upstream) bus.
    pub primary: u8,
    /// Secondary (directly below) bus.
    pub secondary: u8,
    /// Highest bus below.
    pub subordinate: u8,
}

/// One function as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// Address.
    pub addr: PciAddress,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Base class, sub-class, programming interface.
    pub class: (u8, u8, u8),
    /// Revision.
    pub revision: u8,
    /// Header type (without the multi-function bit).
    pub header_type: u8,
    /// Part of a multi-function device.
    pub multifunction: bool,
    /// Config space reachable (256 or 4096).
    pub config_size: u16,
    /// Implemented BARs.
    pub bars: Vec<Bar, 6>,
    /// Expansion ROM.
    pub rom: Option<Rom>,
    /// A BAR slot that made no sense.
    pub bad_bar: Option<BadBar>,
    /// Capability chains.
    pub chains: Chains,
    /// MSI.
    pub msi: Option<MsiCap>,
    /// MSI-X.
    pub msix: Option<MsixCap>,
    /// PCI Express.
    pub pcie: Option<PcieCap>,
    /// Bus numbers (bridges).
    pub bridge: Option<BridgeBuses>,
    /// Interrupt pin (0 none, 1–4 INTA–INTD).
    pub interrupt_pin: u8,
}

impl Function {
    /// The BAR in slot `index` (either slot of a 64-bit BAR gives the BAR at its first slot).
    pub fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.iter().find(|b| b.index == index)
    }

    /// Class as `cc:ss:pp`.
    pub fn class_code(&self) -> u32 {
        u32::from(self.class.0) << 16 | u32::from(self.class.1) << 8 | u32::from(self.class.2)
    }
}

/// Something odd found while scanning (the scan goes on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Problem {
    /// A bridge whose secondary bus is unassigned (0), not above its own bus, or outside the
    /// segment's range: not followed.
    BridgeBusInvalid {
        /// The bridge.
        bridge: PciAddress,
        /// Its secondary bus.
        secondary: u8,
    },
    /// A bridge leading to a bus already scanned: not followed.
    BusLoop {
        /// The bridge.
        bridge: PciAddress,
        /// The bus.
        bus: u8,
    },
    /// A broken capability chain (what was found before the break is kept).
    Chain {
        /// The function.
        addr: PciAddress,
        /// Which chain and why.
        error: caps::ChainError,
        /// True for the extended chain.
        extended: bool,
    },
    /// A BAR slot whose contents made no sense.
    Bar {
        /// The function.
        addr: PciAddress,
        /// The slot.
        bad: BadBar,
    },
    /// More functions than `MAX_FUNCTIONS`; the rest were not recorded.
    InventoryFull,
}

/// Why DMA from a function does not reach the IOMMU under the function's own requester ID,
/// so the IOMMU cannot tell it from other devices' DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Aliasing {
    /// The function is not in the inventory: nothing is known about its path.
    Unknown(PciAddress),
    /// Below a bridge that takes requests over under an ID of its own: a PCIe-to-PCI/PCI-X
    /// bridge (or the reverse), or a conventional PCI-to-PCI bridge. Requests from below it
    /// can carry the bridge's ID or its secondary bus with devfn 0, shared with every device
    /// beside the function.
    BehindBridge {
        /// The bridge.
        bridge: PciAddress,
    },
    /// More than one bridge claims a bus on the path: which one forwards it is unknown.
    Ambiguous {
        /// The bus.
        bus: u8,
    },
}

/// PCIe device/port types (PCIe Table 7-17) of bridges that forward requester IDs unchanged:
/// root port (4), switch upstream port (5), switch downstream port (6).
const ID_PRESERVING_PORTS: [u8; 3] = [4, 5, 6];

/// A bus range of one segment, as MCFG describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Segment {
    /// Segment group.
    pub segment: u16,
    /// First bus (the root bus).
    pub start_bus: u8,
    /// Last bus.
    pub end_bus: u8,
}

/// What enumeration found.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    /// Functions in scan order.
    pub functions: Vec<Function, MAX_FUNCTIONS>,
    /// Problems in scan order.
    pub problems: Vec<Problem, MAX_PROBLEMS>,
    /// Problems not recorded for lack of room.
    pub problems_dropped: u32,
}

impl Inventory {
    /// An empty inventory (for statics).
    pub const fn new() -> Self {
        Self { functions: Vec::new(), problems: Vec::new(), problems_dropped: 0 }
    }

    /// The function at `addr`.
    pub fn get(&self, addr: PciAddress) -> Option<&Function> {
        self.functions.iter().find(|f| f.addr == addr)
    }

    /// Functions with this vendor and device ID.
    pub fn by_id(&self, vendor: u16, device: u16) -> impl Iterator<Item = &Function> {
        self.functions.iter().filter(move |f| f.vendor == vendor && f.device == device)
    }

    /// Checks that DMA from `addr` reaches the IOMMU under `addr`'s own requester ID: every
    /// bridge between it and its root bus must be a PCIe root or switch port (which forward
    /// IDs unchanged). A device behind a PCIe-to-PCI/PCI-X bridge or a conventional PCI
    /// bridge shares the bridge's ID with its neighbours (`Aliasing::BehindBridge`).
    ///
    /// Only requester-ID aliasing is checked. Peer-to-peer DMA that never reaches the IOMMU
    /// (between functions of a multi-function device, or below a switch port, without ACS) is
    /// not: that needs ACS-based isolation groups. Root-complex integrated endpoints and
    /// devices directly below root ports (QEMU's q35 layout) are isolated by construction.
    pub fn own_requester_id(&self, addr: PciAddress) -> Result<(), Aliasing> {
        let f = self.get(addr).ok_or(Aliasing::Unknown(addr))?;
        let mut bus = f.addr.bus;
        // Each hop goes to a lower bus (enumeration only follows bridges to higher
        // secondaries), so 256 hops bound the walk.
        for _ in 0..256 {
            let mut parents = self.functions.iter().filter(|b| {
                b.addr.segment == addr.segment && b.addr.bus < bus && b.bridge.is_some_and(|x| x.secondary == bus)
            });
            let Some(parent) = parents.next() else { return Ok(()) };
            if parents.next().is_some() {
                return Err(Aliasing::Ambiguous { bus });
            }
            if !parent.pcie.is_some_and(|p| ID_PRESERVING_PORTS.contains(&p.port_type)) {
                return Err(Aliasing::BehindBridge { bridge: parent.addr });
            }
            bus = parent.addr.bus;
        }
        Err(Aliasing::Ambiguous { bus })
    }

    fn problem(&mut self, p: Problem) {
        if self.problems.push(p).is_err() {
            self.problems_dropped += 1;
        }
    }
}

/// Scans every segment's buses, reachable from its root bus, into `out` (cleared first).
pub fn enumerate(cfg: &impl ConfigSpace, segments: &[Segment], out: &mut Inventory) {
    out.functions.clear();
    out.problems.clear();
    out.problems_dropped = 0;
    for seg in segments {
        let mut visited = [0u64; 4];
        let mut pending: Vec<u8, 256> = Vec::new();
        let _ = pending.push(seg.start_bus);
        visited[usize::from(seg.start_bus / 64)] |= 1 << (seg.start_bus % 64);
        while let Some(bus) = pending.pop() {
            for device in 0..32u8 {
                let f0 = PciAddress::new(bus, device, 0).in_segment(seg.segment);
                if cfg.read16(f0, regs::VENDOR_ID) == regs::VENDOR_NONE {
                    continue;
                }
                let multi = cfg.read8(f0, regs::HEADER_TYPE) & regs::HEADER_TYPE_MULTIFUNCTION != 0;
                for function in 0..if multi { 8 } else { 1 } {
                    let addr = PciAddress::new(bus, device, function).in_segment(seg.segment);
                    if cfg.read16(addr, regs::VENDOR_ID) == regs::VENDOR_NONE {
                        continue;
                    }
                    let f = probe(cfg, addr, multi, out);
                    if let Some(b) = f.bridge {
                        let in_range = b.secondary > bus && (seg.start_bus..=seg.end_bus).contains(&b.secondary);
                        let (w, bit) = (usize::from(b.secondary / 64), 1u64 << (b.secondary % 64));
                        if !in_range {
                            out.problem(Problem::BridgeBusInvalid { bridge: addr, secondary: b.secondary });
                        } else if visited[w] & bit != 0 {
                            out.problem(Problem::BusLoop { bridge: addr, bus: b.secondary });
                        } else {
                            visited[w] |= bit;
                            let _ = pending.push(b.secondary);
                        }
                    }
                    if out.functions.push(f).is_err() {
                        out.problem(Problem::InventoryFull);
                        out.functions.sort_unstable_by_key(|f| f.addr);
                        return;
                    }
                }
            }
        }
    }
    out.functions.sort_unstable_by_key(|f| f.addr);
}

/// Reads everything about one present function.
pub fn probe(cfg: &impl ConfigSpace, addr: PciAddress, multifunction: bool, out: &mut Inventory) -> Function {
    let header_type = cfg.read8(addr, regs::HEADER_TYPE) & 0x7f;
    let class = cfg.read32(addr, regs::REVISION);
    let (bar_count, rom_offset) = match header_type {
        regs::HEADER_TYPE_DEVICE => (6, Some(regs::ROM_ADDRESS)),
        regs::HEADER_TYPE_BRIDGE => (2, Some(regs::BRIDGE_ROM_ADDRESS)),
        _ => (0, None),
    };
    let (bars, rom, bad_bar) = bar::size_all(cfg, addr, bar_count, rom_offset);
    if let Some(bad) = bad_bar {
        out.problem(Problem::Bar { addr, bad });
    }
    let chains = caps::walk(cfg, addr);
    if let Some(error) = chains.error {
        out.problem(Problem::Chain { addr, error, extended: false });
    }
    if let Some(error) = chains.ext_error {
        out.problem(Problem::Chain { addr, error, extended: true });
    }
    let bridge = (header_type == regs::HEADER_TYPE_BRIDGE).then(|| BridgeBuses {
        primary: cfg.read8(addr, regs::BRIDGE_PRIMARY_BUS),
        secondary: cfg.read8(addr, regs::BRIDGE_SECONDARY_BUS),
        subordinate: cfg.read8(addr, regs::BRIDGE_SUBORDINATE_BUS),
    });
    Function {
        addr,
        vendor: cfg.read16(addr, regs::VENDOR_ID),
        device: cfg.read16(addr, regs::DEVICE_ID),
        class: ((class >> 24) as u8, (class >> 16) as u8, (class >> 8) as u8),
        revision: class as u8,
        header_type,
        multifunction,
        config_size: cfg.size(addr),
        bars,
        rom,
        bad_bar,
        msi: chains.find(cap_id::MSI).map(|c| MsiCap::read(cfg, addr, c.offset)),
        msix: chains.find(cap_id::MSIX).map(|c| MsixCap::read(cfg, addr, c.offset)),
        pcie: chains.find(cap_id::PCI_EXPRESS).map(|c| PcieCap::read(cfg, addr, c.offset)),
        chains,
        bridge,
        interrupt_pin: cfg.read8(addr, regs::INTERRUPT_PIN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeConfig, FakeFunction, edu_like, nvme_like};

    const ALL: [Segment; 1] = [Segment { segment: 0, start_bus: 0, end_bus: 255 }];

    fn scan(cfg: &FakeConfig) -> Box<Inventory> {
        let mut inv = Box::<Inventory>::default();
        enumerate(cfg, &ALL, &mut inv);
        inv
    }

    #[test]
    fn finds_devices_behind_bridges_and_multifunction() {
        let cfg = FakeConfig::new();
        cfg.add(PciAddress::new(0, 0, 0), FakeFunction::new(0x8086, 0x29c0, 0x06_00_00, 4096));
        cfg.add(PciAddress::new(0, 2, 0), edu_like());
        cfg.add(PciAddress::new(0, 5, 0), FakeFunction::bridge(0x1b36, 0x000c, 0, 1, 2));
        cfg.add(PciAddress::new(1, 0, 0), FakeFunction::bridge(0x1b36, 0x000e, 1, 2, 2));
        cfg.add(PciAddress::new(2, 3, 0), nvme_like());
        let mut mf0 = FakeFunction::new(0x8086, 0x2918, 0x06_01_00, 256);
        mf0.set8(regs::HEADER_TYPE, 0x80);
        cfg.add(PciAddress::new(0, 0x1f, 0), mf0);
        cfg.add(PciAddress::new(0, 0x1f, 3), FakeFunction::new(0x8086, 0x2930, 0x0c_05_00, 256));
        // Function 2 of a single-function device is not scanned.
        cfg.add(PciAddress::new(0, 2, 2), FakeFunction::new(0xdead, 0xbeef, 0, 256));
        let inv = scan(&cfg);
        let addrs: std::vec::Vec<String> = inv.functions.iter().map(|f| f.addr.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "0000:00:00.0",
                "0000:00:02.0",
                "0000:00:05.0",
                "0000:00:1f.0",
                "0000:00:1f.3",
                "0000:01:00.0",
                "0000:02:03.0"
            ]
        );
        let nvme = inv.get(PciAddress::new(2, 3, 0)).unwrap();
        assert_eq!(nvme.msix.unwrap().table_size, 65);
        assert_eq!(nvme.bar(0).unwrap().size, 0x4000);
        assert_eq!(nvme.class_code(), 0x01_08_02);
        assert_eq!(
            inv.get(PciAddress::new(0, 5, 0)).unwrap().bridge,
            Some(BridgeBuses { primary: 0, secondary: 1, subordinate: 2 })
        );
        assert!(inv.problems.is_empty());
        assert!(inv.get(PciAddress::new(0, 0x1f, 3)).unwrap().multifunction);
    }

    #[test]
    fn bad_bridges_are_problems_not_hangs() {
        let cfg = FakeConfig::new();
        // Points at its own bus, at an unassigned bus, and two bridges at the same bus.
        cfg.add(PciAddress::new(0, 1, 0), FakeFunction::bridge(1, 1, 0, 0, 0));
        cfg.add(PciAddress::new(0, 2, 0), FakeFunction::bridge(1, 1, 0, 3, 3));
        cfg.add(PciAddress::new(0, 3, 0), FakeFunction::bridge(1, 1, 0, 3, 3));
        cfg.add(PciAddress::new(3, 0, 0), FakeFunction::bridge(1, 1, 3, 1, 1)); // back upward
        let inv = scan(&cfg);
        assert_eq!(inv.functions.len(), 4);
        assert!(inv.problems.contains(&Problem::BridgeBusInvalid { bridge: PciAddress::new(0, 1, 0), secondary: 0 }));
        assert!(inv.problems.contains(&Problem::BusLoop { bridge: PciAddress::new(0, 3, 0), bus: 3 }));
        assert!(inv.problems.contains(&Problem::BridgeBusInvalid { bridge: PciAddress::new(3, 0, 0), secondary: 1 }));
        // Two bridges claim bus 3: who forwards its requests is unknown.
        assert_eq!(inv.own_requester_id(PciAddress::new(3, 0, 0)), Err(Aliasing::Ambiguous { bus: 3 }));
    }

    /// A type 1 bridge with a PCIe capability of `port_type`.
    fn pcie_bridge(primary: u8, secondary: u8, subordinate: u8, port_type: u16) -> FakeFunction {
        let mut b = FakeFunction::bridge(0x1b36, 0x000c, primary, secondary, subordinate);
        let off = b.pcie();
        b.set16(off + 2, 0x0002 | port_type << 4);
        b
    }

    #[test]
    fn requester_ids_are_own_only_below_pcie_ports() {
        let cfg = FakeConfig::new();
        cfg.add(PciAddress::new(0, 2, 0), edu_like());
        // Root port (4) → nvme; root port → switch up (5) → down (6) → nvme.
        cfg.add(PciAddress::new(0, 3, 0), pcie_bridge(0, 1, 1, 4));
        cfg.add(PciAddress::new(1, 0, 0), nvme_like());
        cfg.add(PciAddress::new(0, 4, 0), pcie_bridge(0, 2, 4, 4));
        cfg.add(PciAddress::new(2, 0, 0), pcie_bridge(2, 3, 4, 5));
        cfg.add(PciAddress::new(3, 0, 0), pcie_bridge(3, 4, 4, 6));
        cfg.add(PciAddress::new(4, 0, 0), nvme_like());
        // Root port → PCIe-to-PCI bridge (7) → two conventional devices; a conventional PCI
        // bridge (no PCIe capability) → one more.
        cfg.add(PciAddress::new(0, 5, 0), pcie_bridge(0, 5, 6, 4));
        cfg.add(PciAddress::new(5, 0, 0), pcie_bridge(5, 6, 6, 7));
        cfg.add(PciAddress::new(6, 1, 0), edu_like());
        cfg.add(PciAddress::new(6, 2, 0), edu_like());
        cfg.add(PciAddress::new(0, 6, 0), FakeFunction::bridge(0x1b36, 0x0001, 0, 7, 7));
        cfg.add(PciAddress::new(7, 1, 0), edu_like());
        let inv = scan(&cfg);
        assert!(inv.problems.is_empty(), "{:?}", inv.problems);
        for ok in [PciAddress::new(0, 2, 0), PciAddress::new(1, 0, 0), PciAddress::new(4, 0, 0)] {
            assert_eq!(inv.own_requester_id(ok), Ok(()), "{ok}");
        }
        for (dev, bridge) in [
            (PciAddress::new(6, 1, 0), PciAddress::new(5, 0, 0)),
            (PciAddress::new(6, 2, 0), PciAddress::new(5, 0, 0)),
            (PciAddress::new(7, 1, 0), PciAddress::new(0, 6, 0)),
        ] {
            assert_eq!(inv.own_requester_id(dev), Err(Aliasing::BehindBridge { bridge }), "{dev}");
        }
        assert_eq!(inv.own_requester_id(PciAddress::new(9, 0, 0)), Err(Aliasing::Unknown(PciAddress::new(9, 0, 0))));
    }

    #[test]
    fn full_inventory_stops_cleanly() {
        let cfg = FakeConfig::new();
        for bus in 0..4u8 {
            for dev in 0..32u8 {
                cfg.add(PciAddress::new(bus, dev, 0), FakeFunction::new(1, 1, 0, 256));
            }
        }
        for bus in 0..3u8 {
            cfg.add(PciAddress::new(bus, 31, 0), FakeFunction::bridge(1, 1, bus, bus + 1, bus + 1));
        }
        let inv = scan(&cfg);
        assert_eq!(inv.functions.len(), MAX_FUNCTIONS);
        assert_eq!(inv.problems.last(), Some(&Problem::InventoryFull));
    }
}
