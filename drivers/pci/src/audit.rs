//! An independent check of what a guest's virtual config space may write to hardware, for
//! tests, the fuzz target and the QEMU scenario. It is written from the specs and the design's
//! policy, not from [`crate::perm`]'s tables or [`crate::vconfig`]'s regions, so a mistake in
//! those (a table letting MSI enable reach the device, a write widened over a status register)
//! shows up as a [`Violation`] instead of being checked against itself.
//!
//! The rules, per byte of a hardware write:
//!
//! - command low byte (0x04): only I/O, memory and bus master, and only those the policy
//!   passes through; cache line size (0x0C) and latency timer (0x0D): any bit;
//! - PCI Express, when visible: device control except phantom functions, Max_Payload_Size,
//!   Enable No Snoop, Max_Read_Request_Size and initiate-FLR (bits 0–4, 8, 10); device
//!   control 2 (version 2 only) except ARI forwarding; each only when the register lies
//!   inside the capability (which ends where the next one begins);
//! - bytes outside every capability: any bit with `UnknownPolicy::Passthrough` for their
//!   space (standard or extended), else nothing;
//! - everything else — IDs, status, class, header type, BIST, BARs, ROM, capability pointer,
//!   interrupt line and pin, MSI, MSI-X, power management, vendor-specific, hidden and every
//!   extended capability — nothing: no write may even cover such a byte.
//!
//! Within a byte a write may cover, bits outside the allowed ones must be written with their
//! current hardware value. No byte with a write-1-to-clear bit is coverable (status registers
//! hold no guest-writable bit), so RW1C bits are never written as 1 either.

use crate::enumerate::Function;
use crate::regs::{self, Command, cap_id, ext_cap_id};
use crate::vconfig::{DevicePolicy, UnknownPolicy};
use crate::{CONFIG_SIZE, ConfigSpace, EXTENDED_CONFIG_SIZE, PciAddress, Width, access_ok};
use core::cell::Cell;
use heapless::Vec;

/// A hardware write the rules forbid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Violation {
    /// The byte.
    pub offset: u16,
    /// Value written to it.
    pub written: u8,
    /// Its hardware value before the write.
    pub was: u8,
    /// Which rule.
    pub rule: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pcie { version: u8 },
    Other,
}

#[derive(Clone, Copy, Debug)]
struct Span {
    start: u16,
    end: u16,
    kind: Kind,
    visible: bool,
}

/// What each byte of one function's config space may receive from a guest's view.
#[derive(Clone, Debug)]
pub struct WriteAudit {
    addr: PciAddress,
    size: u16,
    command: u8,
    unknown: UnknownPolicy,
    extended_unknown: UnknownPolicy,
    spans: Vec<Span, 96>,
}

/// Bits of byte `off` of a PCIe capability that may reach hardware.
fn pcie_allowed(off: u16, version: u8) -> u8 {
    match off {
        // Device control: error reporting enables and relaxed ordering (bits 0–4).
        0x08 => 0x1f,
        // Extended tag (8) and aux power PM enable (10).
        0x09 => 0x05,
        // Device control 2 (version 2): everything but ARI forwarding (bit 5).
        0x28 if version >= 2 => 0xdf,
        0x29 if version >= 2 => 0xff,
        _ => 0,
    }
}

impl WriteAudit {
    /// The rules for `f` (as enumerated: its capability offsets) under `policy`. Lengths and
    /// versions are read from the device itself.
    pub fn new(cfg: &impl ConfigSpace, f: &Function, policy: &DevicePolicy) -> Self {
        let size = f.config_size.min(cfg.size(f.addr));
        let mut a = Self {
            addr: f.addr,
            size,
            command: (policy.command_passthrough & (Command::IO | Command::MEMORY | Command::BUS_MASTER)).bits() as u8,
            unknown: policy.unknown,
            extended_unknown: policy.extended_unknown,
            spans: Vec::new(),
        };
        let mut starts: Vec<u16, 96> = f.chains.caps.iter().map(|c| c.offset).collect();
        starts.sort_unstable();
        for c in &f.chains.caps {
            let next = starts.iter().copied().find(|&s| s > c.offset).unwrap_or(CONFIG_SIZE);
            let control = cfg.read16(f.addr, c.offset + 2);
            // Lengths by type (PCI LB 3.0 §6.7, §6.8; PCIe §7.5.3); unknown ones run to the
            // next capability.
            let natural = match c.id {
                cap_id::POWER_MANAGEMENT => 8,
                cap_id::MSI => {
                    10 + if control & (1 << 7) != 0 { 4 } else { 0 } + if control & (1 << 8) != 0 { 10 } else { 0 }
                }
                cap_id::MSIX => 12,
                cap_id::PCI_EXPRESS => {
                    if control & 0xf >= 2 {
                        0x3c
                    } else {
                        0x24
                    }
                }
                cap_id::VENDOR => u16::from(cfg.read8(f.addr, c.offset + 2)).max(3),
                _ => next - c.offset,
            };
            let kind =
                if c.id == cap_id::PCI_EXPRESS { Kind::Pcie { version: (control & 0xf) as u8 } } else { Kind::Other };
            let visible = c.id >= 32 || policy.hide_caps & (1 << c.id) == 0;
            let _ = a.spans.push(Span { start: c.offset, end: (c.offset + natural).min(next), kind, visible });
        }
        if size >= EXTENDED_CONFIG_SIZE {
            let mut starts: Vec<u16, 96> = f.chains.ext.iter().map(|c| c.offset).collect();
            starts.sort_unstable();
            for c in &f.chains.ext {
                let next = starts.iter().copied().find(|&s| s > c.offset).unwrap_or(EXTENDED_CONFIG_SIZE);
                let natural = match c.id {
                    ext_cap_id::AER => 0x48,
                    ext_cap_id::DSN => 0x0c,
                    ext_cap_id::VENDOR => ((cfg.read32(f.addr, c.offset + 4) >> 20) as u16).max(8),
                    _ => next - c.offset,
                };
                let _ = a.spans.push(Span {
                    start: c.offset,
                    end: (c.offset + natural).min(next),
                    kind: Kind::Other,
                    visible: false,
                });
            }
        }
        a
    }

    /// (bits a write may change, the byte is free for the guest) for byte `off`.
    fn rule(&self, off: u16) -> (u8, bool) {
        if off < regs::HEADER_SIZE {
            return match off {
                regs::COMMAND => (self.command, false),
                regs::CACHE_LINE_SIZE | regs::LATENCY_TIMER => (0xff, false),
                _ => (0, false),
            };
        }
        match self.spans.iter().find(|s| (s.start..s.end).contains(&off)) {
            Some(&Span { start, kind: Kind::Pcie { version }, visible: true, end }) => {
                let rel = off - start;
                // The whole register must lie inside the capability.
                let reg_end = start + (rel & !1) + 2;
                (if reg_end <= end { pcie_allowed(rel, version) } else { 0 }, false)
            }
            Some(_) => (0, false),
            None => {
                let policy = if off >= regs::EXTENDED_CAP_START { self.extended_unknown } else { self.unknown };
                (0, policy == UnknownPolicy::Passthrough)
            }
        }
    }

    /// Checks one hardware write of `value` at `offset` over bytes that held `current`.
    pub fn check(&self, offset: u16, width: Width, value: u32, current: u32) -> Result<(), Violation> {
        for i in 0..width.bytes() {
            let off = offset.wrapping_add(i);
            let written = (value >> (8 * i)) as u8;
            let was = (current >> (8 * i)) as u8;
            let v = |rule| Err(Violation { offset: off, written, was, rule });
            if !access_ok(offset, width, self.size) {
                return v("misaligned or outside the config space");
            }
            let (allowed, free) = self.rule(off);
            if free {
                continue;
            }
            if allowed == 0 {
                return v("a byte the guest cannot write to hardware was written");
            }
            if (written ^ was) & !allowed != 0 {
                return v("a protected bit changed");
            }
        }
        Ok(())
    }

    /// True when byte `off` lies outside every structure with `UnknownPolicy::Passthrough`
    /// for its space: the guest owns it whole.
    pub fn guest_owns(&self, off: u16) -> bool {
        off < self.size && self.rule(off).1
    }

    /// The function the rules are for.
    pub fn addr(&self) -> PciAddress {
        self.addr
    }
}

/// A config space that checks every write to the audited function against a [`WriteAudit`]
/// before passing it on; the first violation is kept.
#[derive(Debug)]
pub struct Audited<'a, C: ConfigSpace> {
    inner: &'a C,
    audit: &'a WriteAudit,
    violation: Cell<Option<Violation>>,
    writes: Cell<u32>,
}

impl<'a, C: ConfigSpace> Audited<'a, C> {
    /// Wraps `inner`.
    pub fn new(inner: &'a C, audit: &'a WriteAudit) -> Self {
        Self { inner, audit, violation: Cell::new(None), writes: Cell::new(0) }
    }

    /// The first violation seen.
    pub fn violation(&self) -> Option<Violation> {
        self.violation.get()
    }

    /// Writes to the audited function so far.
    pub fn writes(&self) -> u32 {
        self.writes.get()
    }
}

impl<C: ConfigSpace> ConfigSpace for Audited<'_, C> {
    fn read(&self, addr: PciAddress, offset: u16, width: Width) -> u32 {
        self.inner.read(addr, offset, width)
    }

    fn write(&self, addr: PciAddress, offset: u16, width: Width, value: u32) {
        if addr == self.audit.addr {
            self.writes.set(self.writes.get() + 1);
            let current = self.inner.read(addr, offset, width);
            if let Err(v) = self.audit.check(offset, width, value, current)
                && self.violation.get().is_none()
            {
                self.violation.set(Some(v));
            }
        }
        self.inner.write(addr, offset, width, value)
    }

    fn size(&self, addr: PciAddress) -> u16 {
        self.inner.size(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enumerate::{Inventory, probe};
    use crate::fake::{FakeConfig, nvme_like};

    fn at() -> PciAddress {
        PciAddress::new(0, 3, 0)
    }

    #[test]
    fn rules_follow_the_specs() {
        let cfg = FakeConfig::new();
        cfg.add(at(), nvme_like());
        let f = probe(&cfg, at(), false, &mut Inventory::default());
        let a = WriteAudit::new(&cfg, &f, &DevicePolicy::default());
        let ok = |off, w, v, c| a.check(off, w, v, c).is_ok();
        assert!(ok(regs::COMMAND, Width::Byte, 0x07, 0x00), "decode and bus master");
        assert!(!ok(regs::COMMAND, Width::Byte, 0x47, 0x00), "parity is virtual");
        assert!(!ok(regs::COMMAND, Width::Word, 0x0407, 0x0000), "INTx disable is virtual");
        assert!(!ok(regs::COMMAND, Width::Dword, 0x0000_0007, 0x0010_0000), "never over status");
        assert!(ok(regs::CACHE_LINE_SIZE, Width::Word, 0xffff, 0), "cache line and latency timer");
        assert!(!ok(regs::CACHE_LINE_SIZE, Width::Dword, 0x0000_ffff, 0), "never over header type and BIST");
        for off in [regs::BAR0, regs::ROM_ADDRESS, regs::VENDOR_ID, regs::REVISION] {
            assert!(!ok(off, Width::Dword, 0, 0), "{off:#x}: not even with its own value");
        }
        let msix = f.chains.find(cap_id::MSIX).unwrap().offset;
        assert!(!ok(msix + 2, Width::Word, 0x8040, 0x0040), "MSI-X enable is the interrupt layer's");
        let pm = f.chains.find(cap_id::POWER_MANAGEMENT).unwrap().offset;
        assert!(!ok(pm + 4, Width::Word, 0x0003, 0x0000), "power state is virtual");
        let pcie = f.chains.find(cap_id::PCI_EXPRESS).unwrap().offset;
        assert!(ok(pcie + 8, Width::Word, 0x051f, 0x0000));
        for bit in [5u32, 9, 11, 12, 15] {
            assert!(!ok(pcie + 8, Width::Word, 1 << bit, 0), "device control bit {bit}");
        }
        assert!(!ok(pcie + 8, Width::Dword, 0x1f, 0), "never over device status (RW1C)");
        assert!(!ok(pcie + 0x28, Width::Word, 0x20, 0), "ARI forwarding");
        assert!(ok(pcie + 0x28, Width::Word, 0x40, 0));
        assert!(!ok(0x100, Width::Dword, 0, 0), "AER");
        assert!(!ok(0x800, Width::Byte, 1, 0), "extended gaps: nothing by default");
        assert!(!ok(0xc0, Width::Byte, 1, 0), "standard gaps: nothing by default");
        let pass = DevicePolicy {
            unknown: UnknownPolicy::Passthrough,
            extended_unknown: UnknownPolicy::Passthrough,
            ..DevicePolicy::default()
        };
        let a = WriteAudit::new(&cfg, &f, &pass);
        assert!(a.check(0xc0, Width::Byte, 1, 0).is_ok() && a.check(0x800, Width::Dword, 7, 0).is_ok());
        assert!(a.check(msix + 2, Width::Word, 0x8040, 0x0040).is_err(), "capabilities stay protected");
        // Hidden by policy: PCIe registers are protected too.
        let hide = DevicePolicy::default().hiding_cap(cap_id::PCI_EXPRESS);
        let a = WriteAudit::new(&cfg, &f, &hide);
        assert!(a.check(pcie + 8, Width::Word, 0x0001, 0).is_err());
    }

    #[test]
    fn audited_config_space_keeps_the_first_violation() {
        let cfg = FakeConfig::new();
        cfg.add(at(), nvme_like());
        let f = probe(&cfg, at(), false, &mut Inventory::default());
        let a = WriteAudit::new(&cfg, &f, &DevicePolicy::default());
        let audited = Audited::new(&cfg, &a);
        audited.write(at(), regs::COMMAND, Width::Byte, 0x06);
        assert_eq!(audited.violation(), None);
        audited.write(at(), regs::BAR0, Width::Dword, 0);
        audited.write(at(), regs::VENDOR_ID, Width::Dword, 0);
        assert_eq!(audited.violation().map(|v| v.offset), Some(regs::BAR0));
        assert_eq!(audited.writes(), 3);
        assert_eq!(cfg.bytes(at())[4] & 0x7, 0x06, "writes still go through");
    }
}
