//! One canonical line per function for inventories: address, IDs, class, BAR kinds and sizes,
//! capabilities with the details that matter for passthrough (MSI vectors, MSI-X table size and
//! placement, PCIe version and port type), extended capabilities, bridge buses. Addresses
//! assigned by firmware are left out, so the line is stable for a given device set.

use crate::caps::{MsiCap, MsixCap, PcieCap};
use crate::enumerate::Function;
use crate::regs::{cap_id, ext_cap_id};
use core::fmt;

/// Short name of a standard capability.
pub fn cap_name(id: u8) -> Option<&'static str> {
    Some(match id {
        cap_id::POWER_MANAGEMENT => "pm",
        cap_id::AGP => "agp",
        cap_id::VPD => "vpd",
        cap_id::SLOT_ID => "slotid",
        cap_id::MSI => "msi",
        cap_id::PCIX => "pcix",
        cap_id::HYPERTRANSPORT => "ht",
        cap_id::VENDOR => "vndr",
        cap_id::HOTPLUG => "hotplug",
        cap_id::SUBSYSTEM_VENDOR => "ssvid",
        cap_id::SECURE => "secure",
        cap_id::PCI_EXPRESS => "exp",
        cap_id::MSIX => "msix",
        cap_id::SATA => "sata",
        cap_id::AF => "af",
        cap_id::EA => "ea",
        _ => return None,
    })
}

/// Short name of an extended capability.
pub fn ext_cap_name(id: u16) -> Option<&'static str> {
    Some(match id {
        ext_cap_id::AER => "aer",
        ext_cap_id::VC => "vc",
        ext_cap_id::DSN => "dsn",
        ext_cap_id::POWER_BUDGET => "pwr",
        ext_cap_id::VENDOR => "vndr",
        ext_cap_id::ACS => "acs",
        ext_cap_id::ARI => "ari",
        ext_cap_id::ATS => "ats",
        ext_cap_id::SRIOV => "sriov",
        ext_cap_id::REBAR => "rebar",
        ext_cap_id::LTR => "ltr",
        ext_cap_id::SECONDARY_PCIE => "secpcie",
        ext_cap_id::PASID => "pasid",
        ext_cap_id::L1SS => "l1ss",
        _ => return None,
    })
}

/// PCIe device/port type name (PCIe Table 7-17).
pub fn port_type_name(t: u8) -> &'static str {
    match t {
        0 => "endpoint",
        1 => "legacy-endpoint",
        4 => "root-port",
        5 => "upstream-port",
        6 => "downstream-port",
        7 => "pcie-to-pci",
        8 => "pci-to-pcie",
        9 => "rc-endpoint",
        0xa => "rc-event-collector",
        _ => "unknown",
    }
}

/// A size as `32`, `4K`, `16M`, `4G`.
#[derive(Debug, Clone, Copy)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if v >= 1 << shift && v.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", v >> shift);
            }
        }
        write!(f, "{v}")
    }
}

/// The canonical line for a function.
#[derive(Debug, Clone, Copy)]
pub struct Summary<'a>(pub &'a Function);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        write!(f, "{} {:04x}:{:04x} class {:06x}", d.addr, d.vendor, d.device, d.class_code())?;
        if let Some(b) = d.bridge {
            write!(f, " bridge {:02x}->{:02x}..{:02x}", b.primary, b.secondary, b.subordinate)?;
        }
        for b in &d.bars {
            write!(f, " bar{}={}/{}", b.index, b.kind.name(), Size(b.size))?;
        }
        if let Some(r) = d.rom {
            write!(f, " rom/{}", Size(u64::from(r.size)))?;
        }
        for (i, c) in d.chains.caps.iter().enumerate() {
            f.write_str(if i == 0 { " caps=" } else { "," })?;
            match cap_name(c.id) {
                Some(n) => write!(f, "{n}@{:02x}", c.offset)?,
                None => write!(f, "cap{:02x}@{:02x}", c.id, c.offset)?,
            }
            match (d.msi, d.msix, d.pcie) {
                (Some(m), _, _) if c.id == cap_id::MSI && m.offset == c.offset => msi(f, &m)?,
                (_, Some(m), _) if c.id == cap_id::MSIX && m.offset == c.offset => msix(f, &m)?,
                (_, _, Some(p)) if c.id == cap_id::PCI_EXPRESS && p.offset == c.offset => pcie(f, &p)?,
                _ => {}
            }
        }
        for (i, c) in d.chains.ext.iter().enumerate() {
            f.write_str(if i == 0 { " ext=" } else { "," })?;
            match ext_cap_name(c.id) {
                Some(n) => write!(f, "{n}@{:03x}", c.offset)?,
                None => write!(f, "ext{:04x}@{:03x}", c.id, c.offset)?,
            }
        }
        if let Some(e) = d.chains.error {
            write!(f, " chain-error={e:?}")?;
        }
        if let Some(e) = d.chains.ext_error {
            write!(f, " ext-chain-error={e:?}")?;
        }
        Ok(())
    }
}

fn msi(f: &mut fmt::Formatter<'_>, m: &MsiCap) -> fmt::Result {
    write!(
        f,
        "({},{}vec{})",
        if m.is_64bit { "64bit" } else { "32bit" },
        1u32 << m.vectors_log2,
        if m.per_vector_mask { ",mask" } else { "" }
    )
}

fn msix(f: &mut fmt::Formatter<'_>, m: &MsixCap) -> fmt::Result {
    write!(
        f,
        "({}vec,table=bar{}+{:#x},pba=bar{}+{:#x})",
        m.table_size, m.table_bir, m.table_offset, m.pba_bir, m.pba_offset
    )
}

fn pcie(f: &mut fmt::Formatter<'_>, p: &PcieCap) -> fmt::Result {
    write!(f, "(v{},{})", p.version, port_type_name(p.port_type))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PciAddress;
    use crate::enumerate::{Inventory, probe};
    use crate::fake::{FakeConfig, edu_like, nvme_like};

    #[test]
    fn sizes() {
        assert_eq!(Size(32).to_string(), "32");
        assert_eq!(Size(0x4000).to_string(), "16K");
        assert_eq!(Size(0x10_0000).to_string(), "1M");
        assert_eq!(Size(0x1_0000_0000).to_string(), "4G");
        assert_eq!(Size(0x1800).to_string(), "6K");
        assert_eq!(Size(0x1801).to_string(), "6145");
    }

    #[test]
    fn canonical_lines() {
        let cfg = FakeConfig::new();
        let a = PciAddress::new(0, 3, 0);
        cfg.add(a, nvme_like());
        let f = probe(&cfg, a, false, &mut Inventory::default());
        assert_eq!(
            Summary(&f).to_string(),
            "0000:00:03.0 1b36:0010 class 010802 bar0=mem64/16K caps=pm@40,msix@48(65vec,table=bar0+0x2000,pba=bar0+0x3000),exp@54(v2,endpoint) ext=aer@100,dsn@148"
        );
        let b = PciAddress::new(0, 2, 0);
        cfg.add(b, edu_like());
        let f = probe(&cfg, b, false, &mut Inventory::default());
        assert_eq!(
            Summary(&f).to_string(),
            "0000:00:02.0 1234:11e8 class 00ff00 bar0=mem32/1M caps=msi@40(64bit,1vec)"
        );
    }
}
