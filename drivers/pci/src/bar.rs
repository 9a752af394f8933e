//! Base address registers (LB §6.2.5): decoding and sizing. Sizing writes all ones and reads
//! the mask back; the function's memory and I/O decode are switched off meanwhile (so a
//! half-written BAR never claims addresses) and every register is restored afterwards. Host
//! bridges keep decoding: some chipsets misbehave when it is switched off (Linux
//! `mmio_always_on`).

use crate::regs::{self, Command};
use crate::{ConfigSpace, PciAddress};
use heapless::Vec;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// 32-bit memory.
    Mem32 {
        /// Prefetchable.
        prefetchable: bool,
    },
    /// 64-bit memory (uses two BAR slots).
    Mem64 {
        /// Prefetchable.
        prefetchable: bool,
    },
}

impl BarKind {
    /// Short name for inventories: `io`, `mem32`, `mem64`, with `-pf` when prefetchable.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Io => "io",
            Self::Mem32 { prefetchable: false } => "mem32",
            Self::Mem32 { prefetchable: true } => "mem32-pf",
            Self::Mem64 { prefetchable: false } => "mem64",
            Self::Mem64 { prefetchable: true } => "mem64-pf",
        }
    }

    /// Flag bits of the BAR's low dword (type, prefetchable, I/O).
    pub const fn flags(self) -> u32 {
        match self {
            Self::Io => regs::BAR_IO,
            Self::Mem32 { prefetchable } => {
                if prefetchable {
                    regs::BAR_PREFETCH
                } else {
                    0
                }
            }
            Self::Mem64 { prefetchable } => regs::BAR_MEM_TYPE_64 | if prefetchable { regs::BAR_PREFETCH } else { 0 },
        }
    }
}

/// An implemented BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Bar {
    /// Slot index (0–5; a 64-bit BAR also uses `index + 1`).
    pub index: u8,
    /// Kind.
    pub kind: BarKind,
    /// Address programmed by firmware.
    pub address: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

/// The expansion ROM BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Rom {
    /// Address programmed by firmware.
    pub address: u32,
    /// Size in bytes.
    pub size: u32,
}

/// A BAR slot whose probe made no sense (a 64-bit BAR in the last slot, a reserved type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BadBar {
    /// Slot.
    pub index: u8,
    /// Value read before sizing.
    pub raw: u32,
}

/// Size from a probe mask: the lowest address bit that stuck at one. A hostile device with a
/// non-contiguous mask still yields a power of two.
fn size_of_mask(mask: u64) -> u64 {
    if mask == 0 { 0 } else { 1u64 << mask.trailing_zeros() }
}

fn probe32(cfg: &impl ConfigSpace, addr: PciAddress, off: u16, ones: u32) -> (u32, u32) {
    let orig = cfg.read32(addr, off);
    cfg.write32(addr, off, ones);
    let probe = cfg.read32(addr, off);
    cfg.write32(addr, off, orig);
    (orig, probe)
}

/// Base class and sub-class of a host bridge (06:00).
pub const CLASS_HOST_BRIDGE: u16 = 0x0600;

/// Sizes every BAR (`count` slots: 6 for type 0, 2 for type 1) and the expansion ROM at
/// `rom_offset` (if any), with decode disabled during the probe and restored after — except
/// on host bridges, which keep decoding.
pub fn size_all(
    cfg: &impl ConfigSpace,
    addr: PciAddress,
    count: u8,
    rom_offset: Option<u16>,
) -> (Vec<Bar, 6>, Option<Rom>, Option<BadBar>) {
    let host_bridge = (cfg.read32(addr, regs::REVISION) >> 16) as u16 == CLASS_HOST_BRIDGE;
    let command = cfg.read16(addr, regs::COMMAND);
    let decode = if host_bridge { 0 } else { (Command::IO | Command::MEMORY).bits() };
    if command & decode != 0 {
        cfg.write16(addr, regs::COMMAND, command & !decode);
    }
    let mut bars = Vec::new();
    let mut bad = None;
    let mut i = 0u8;
    while i < count.min(6) {
        let off = regs::BAR0 + 4 * u16::from(i);
        let (orig, probe) = probe32(cfg, addr, off, u32::MAX);
        let index = i;
        i += 1;
        if orig & regs::BAR_IO != 0 {
            // I/O BARs may leave the upper 16 address bits unimplemented (reading zero), but
            // an implemented one has writable address bits below 16: a probe with none (bit 0
            // alone) is an unimplemented BAR, not a 64 KiB one.
            let low = probe & 0xfffc;
            let mask = if low == 0 {
                0
            } else {
                u64::from(probe & !0x3) | if probe & 0xffff_0000 == 0 { 0xffff_0000 } else { 0 }
            };
            let size = size_of_mask(mask);
            if size != 0 {
                let _ = bars.push(Bar { index, kind: BarKind::Io, address: u64::from(orig & !0x3), size });
            }
            continue;
        }
        let prefetchable = orig & regs::BAR_PREFETCH != 0;
        match orig & regs::BAR_MEM_TYPE_MASK {
            0 | 0b010 => {
                let size = size_of_mask(u64::from(probe & !0xf));
                if size != 0 {
                    let kind = BarKind::Mem32 { prefetchable };
                    let _ = bars.push(Bar { index, kind, address: u64::from(orig & !0xf), size });
                }
            }
            regs::BAR_MEM_TYPE_64 if i < count.min(6) => {
                let (orig_hi, probe_hi) = probe32(cfg, addr, off + 4, u32::MAX);
                i += 1;
                let mask = u64::from(probe_hi) << 32 | u64::from(probe & !0xf);
                let size = size_of_mask(mask);
                if size != 0 {
                    let address = u64::from(orig_hi) << 32 | u64::from(orig & !0xf);
                    let _ = bars.push(Bar { index, kind: BarKind::Mem64 { prefetchable }, address, size });
                }
            }
            _ => {
                bad.get_or_insert(BadBar { index, raw: orig });
            }
        }
    }
    let rom = rom_offset.and_then(|off| {
        let (orig, probe) = probe32(cfg, addr, off, regs::ROM_ADDRESS_MASK);
        let size = size_of_mask(u64::from(probe & regs::ROM_ADDRESS_MASK));
        (size != 0).then_some(Rom { address: orig & regs::ROM_ADDRESS_MASK, size: size as u32 })
    });
    if command & decode != 0 {
        cfg.write16(addr, regs::COMMAND, command);
    }
    (bars, rom, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeConfig, FakeFunction};

    fn at() -> PciAddress {
        PciAddress::new(0, 4, 0)
    }

    #[test]
    fn sizes_every_kind_and_restores_everything() {
        let mut f = FakeFunction::new(0x8086, 0x10d3, 0x02_00_00, 4096);
        f.bar32(0, 0xfebc_0000, 0x2_0000, false);
        f.bar64(1, 0x8_0000_0000, 0x1_0000_0000, true);
        f.bar_io(3, 0xc000, 0x20);
        f.bar32(4, 0xfeb0_0000, 0x4000, true);
        f.rom(0xfeb8_0000, 0x4_0000);
        f.set16(regs::COMMAND, (Command::MEMORY | Command::IO | Command::BUS_MASTER).bits());
        let cfg = FakeConfig::new();
        cfg.add(at(), f);
        let before = cfg.bytes(at());
        let (bars, rom, bad) = size_all(&cfg, at(), 6, Some(regs::ROM_ADDRESS));
        assert_eq!(bad, None);
        assert_eq!(
            bars.as_slice(),
            &[
                Bar { index: 0, kind: BarKind::Mem32 { prefetchable: false }, address: 0xfebc_0000, size: 0x2_0000 },
                Bar {
                    index: 1,
                    kind: BarKind::Mem64 { prefetchable: true },
                    address: 0x8_0000_0000,
                    size: 0x1_0000_0000
                },
                Bar { index: 3, kind: BarKind::Io, address: 0xc000, size: 0x20 },
                Bar { index: 4, kind: BarKind::Mem32 { prefetchable: true }, address: 0xfeb0_0000, size: 0x4000 },
            ]
        );
        assert_eq!(rom, Some(Rom { address: 0xfeb8_0000, size: 0x4_0000 }));
        assert_eq!(cfg.bytes(at()), before, "every register restored");
        // Decode was off during every BAR write.
        let writes = cfg.writes.borrow();
        let first_bar = writes.iter().position(|w| w.1 >= regs::BAR0).unwrap();
        assert_eq!(writes[first_bar - 1].1, regs::COMMAND);
        assert_eq!(writes[first_bar - 1].3 & 0x3, 0, "decode disabled before sizing");
        assert_eq!(writes.last().unwrap().1, regs::COMMAND, "command restored last");
    }

    #[test]
    fn host_bridges_keep_decoding_while_sized() {
        let mut f = FakeFunction::new(0x8086, 0x29c0, 0x06_00_00, 256);
        f.bar32(0, 0xfed1_0000, 0x4000, false);
        f.set16(regs::COMMAND, (Command::MEMORY | Command::IO).bits());
        let cfg = FakeConfig::new();
        cfg.add(at(), f);
        let before = cfg.bytes(at());
        let (bars, _, _) = size_all(&cfg, at(), 6, Some(regs::ROM_ADDRESS));
        assert_eq!(bars[0].size, 0x4000);
        assert!(cfg.writes.borrow().iter().all(|w| w.1 != regs::COMMAND), "command never written");
        assert_eq!(cfg.bytes(at()), before);
        // Other bridges (06:04, PCI-to-PCI) are not host bridges: decode goes off.
        let mut f = FakeFunction::new(0x8086, 0x244e, 0x06_04_00, 256);
        f.bar32(0, 0xfed2_0000, 0x1000, false);
        f.set16(regs::COMMAND, Command::MEMORY.bits());
        let cfg = FakeConfig::new();
        cfg.add(at(), f);
        size_all(&cfg, at(), 2, None);
        assert!(cfg.writes.borrow().iter().any(|w| w.1 == regs::COMMAND && w.3 & 0x3 == 0));
    }

    #[test]
    fn odd_devices() {
        // 64-bit type in the last slot is bad; unimplemented BARs are skipped.
        let mut f = FakeFunction::new(1, 2, 0, 256);
        f.set32(regs::BAR0 + 20, regs::BAR_MEM_TYPE_64);
        f.set32(regs::BAR0 + 4, 0b110); // reserved type 0b11
        let cfg = FakeConfig::new();
        cfg.add(at(), f);
        let (bars, rom, bad) = size_all(&cfg, at(), 6, None);
        assert!(bars.is_empty());
        assert_eq!(rom, None);
        assert_eq!(bad, Some(BadBar { index: 1, raw: 0b110 }));
        // A non-contiguous mask still gives a power of two.
        assert_eq!(size_of_mask(0xffff_0f00), 0x100);
    }

    #[test]
    fn io_bars_without_address_bits_are_unimplemented() {
        // Reads back 0x1 after all ones: the I/O flag and nothing else.
        let mut f = FakeFunction::new(1, 2, 0, 256);
        f.set32(regs::BAR0, regs::BAR_IO);
        // A 16-bit decoder (upper half reads 0) of 256 ports, which is a real BAR.
        f.bar_io(1, 0xc100, 0x100);
        let cfg = FakeConfig::new();
        cfg.add(at(), f);
        let (bars, _, bad) = size_all(&cfg, at(), 6, None);
        assert_eq!(bad, None);
        assert_eq!(bars.as_slice(), &[Bar { index: 1, kind: BarKind::Io, address: 0xc100, size: 0x100 }]);
    }
}
