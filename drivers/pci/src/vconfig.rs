//! A device's config space as its guest sees it. Built from the physical function and a
//! [`DevicePolicy`], driven byte by byte by the shared tables in [`crate::perm`]:
//!
//! - header and visible capabilities follow their tables; hidden capabilities are spliced out
//!   of both chains (their bytes read 0, writes are dropped);
//! - BARs and the expansion ROM are fully virtual: sizing answers with the real size, the
//!   guest's addresses are recorded and reported (ROM writes too, when the ROM is visible),
//!   hardware BARs are never written;
//! - command: I/O, memory decode and bus master reach hardware only as the policy passes them;
//!   INTx disable, parity and SERR are virtual;
//! - bytes outside every structure follow [`UnknownPolicy`] (separately for the standard and
//!   the extended space: extended bytes outside every visible extended capability read 0 by
//!   default, since a broken chain can leave SR-IOV, ATS or ACS there);
//! - hardware agrees with the guest's view from the start: command bits the policy keeps
//!   virtual, and PCIe Enable No Snoop, are switched off in the device when the view is built;
//! - hardware writes touch only guest-writable bytes (one naturally aligned access per run of
//!   them, never a byte the guest cannot write), with write-1-to-clear bits written as 0
//!   unless the guest owns them;
//! - a capability register is used only where it lies inside its capability (a capability
//!   ends where the next begins): an MSI capability cut short is hidden whole.
//!
//! Changes the interrupt and mapping layers must act on arrive as [`ConfigEvent`]s.

use crate::bar::BarKind;
use crate::caps::{MsiCap, msi_control, msix_control, pcie_regs};
use crate::enumerate::Function;
use crate::perm::{self, BytePerm, COMMAND_PASSABLE, COMMAND_WRITABLE};
use crate::regs::{self, Command, Status, cap_id, ext_cap_id};
use crate::{ConfigSpace, EXTENDED_CONFIG_SIZE, PciAddress, Width, access_ok};
use heapless::Vec;

/// What bytes outside every header field and capability do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum UnknownPolicy {
    /// Read from hardware; writes dropped (the default).
    ReadOnly,
    /// Read as zero; writes dropped.
    Zero,
    /// Read and written straight through (for devices with registers in config space that
    /// their drivers need; use only for devices known to require it).
    Passthrough,
}

/// Whether the guest sees the expansion ROM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RomPolicy {
    /// The ROM BAR reads 0 and ignores writes (the default).
    Hidden,
    /// The ROM BAR is virtualized like the other BARs.
    Visible,
}

/// Whether the guest sees an interrupt pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IntxPolicy {
    /// The pin reads as the hardware's.
    Expose,
    /// The pin reads 0 (no INTx): guests must use MSI or MSI-X.
    Hide,
}

/// Per-device choices on top of the shared tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DevicePolicy {
    /// Command bits (of I/O, memory, bus master) that reach hardware; the rest are virtual.
    pub command_passthrough: Command,
    /// Bit n hides standard capability ID n, beyond those without a table.
    pub hide_caps: u32,
    /// Bit n hides extended capability ID n, beyond those without a table.
    pub hide_ext_caps: u64,
    /// Expansion ROM.
    pub rom: RomPolicy,
    /// Bytes of the standard space (0x40–0xFF) outside every structure.
    pub unknown: UnknownPolicy,
    /// Bytes of the extended space (0x100–0xFFF) outside every visible extended capability.
    /// `Zero` by default: a chain that could not be walked (no PCIe capability, an error, too
    /// many capabilities) or a gap can hold capabilities Conduit hides (SR-IOV, ATS, ACS).
    pub extended_unknown: UnknownPolicy,
    /// Interrupt pin.
    pub intx: IntxPolicy,
}

impl Default for DevicePolicy {
    fn default() -> Self {
        Self {
            command_passthrough: Command::IO | Command::MEMORY | Command::BUS_MASTER,
            hide_caps: 0,
            hide_ext_caps: 0,
            rom: RomPolicy::Hidden,
            unknown: UnknownPolicy::ReadOnly,
            extended_unknown: UnknownPolicy::Zero,
            intx: IntxPolicy::Expose,
        }
    }
}

impl DevicePolicy {
    /// Also hides standard capability `id`.
    pub const fn hiding_cap(mut self, id: u8) -> Self {
        if id < 32 {
            self.hide_caps |= 1 << id;
        }
        self
    }

    /// Also hides extended capability `id`.
    pub const fn hiding_ext_cap(mut self, id: u16) -> Self {
        if id < 64 {
            self.hide_ext_caps |= 1 << id;
        }
        self
    }
}

/// A change the interrupt or mapping layer acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ConfigEvent {
    /// The guest's command register changed.
    Command {
        /// I/O decode.
        io: bool,
        /// Memory decode.
        memory: bool,
        /// Bus master.
        bus_master: bool,
        /// INTx disable.
        intx_disable: bool,
    },
    /// The guest wrote a BAR (`value` is the whole address, both halves for 64-bit BARs).
    Bar {
        /// First slot of the BAR.
        index: u8,
        /// Guest address.
        address: u64,
    },
    /// The guest wrote the expansion ROM BAR (only with `RomPolicy::Visible` and a ROM).
    Rom {
        /// Guest address.
        address: u32,
        /// ROM address decode enabled (bit 0).
        enabled: bool,
    },
    /// MSI enable or Multiple Message Enable changed.
    MsiControl {
        /// MSI enabled.
        enabled: bool,
        /// log2 of vectors enabled.
        vectors_log2: u8,
    },
    /// MSI message address changed.
    MsiAddress(u64),
    /// MSI message data changed.
    MsiData(u16),
    /// MSI per-vector mask bits changed.
    MsiMask(u32),
    /// MSI-X enable or function mask changed.
    MsixControl {
        /// MSI-X enabled.
        enabled: bool,
        /// All vectors masked.
        function_masked: bool,
    },
    /// The guest set the power state (D0–D3hot), kept virtual.
    PowerState(u8),
    /// The guest requested a Function Level Reset (kept virtual; the device layer decides).
    FunctionLevelReset,
}

/// Where events go.
pub trait EventSink {
    /// One event.
    fn event(&mut self, e: ConfigEvent);
}

impl<F: FnMut(ConfigEvent)> EventSink for F {
    fn event(&mut self, e: ConfigEvent) {
        self(e)
    }
}

/// Collects events; when full, further events are dropped (the caller sized it).
impl<const N: usize> EventSink for Vec<ConfigEvent, N> {
    fn event(&mut self, e: ConfigEvent) {
        let _ = self.push(e);
    }
}

/// Why a virtual config space could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum VConfigError {
    /// Only type 0 functions (not bridges) can be given to a guest.
    NotAnEndpoint(u8),
    /// The function's config space (as enumerated, or as reachable now) is smaller than the
    /// 256 bytes every function has: absent or unreachable.
    ConfigSpaceTooSmall(u16),
    /// More visible structures than slots.
    TooManyCapabilities,
}

/// Counters of guest behaviour that was refused or odd (never fatal).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Counters {
    /// Misaligned or out-of-range accesses (reads return all ones, writes are dropped).
    pub bad_accesses: u64,
    /// Writes touching hidden capabilities.
    pub hidden_writes: u64,
    /// Writes touching bytes outside every structure (dropped unless passthrough).
    pub unknown_writes: u64,
    /// Hardware writes made on the guest's behalf (and, when the view was built, to bring
    /// hardware in line with it).
    pub hardware_writes: u64,
}

/// What a byte belongs to.
const REGION_UNKNOWN: u8 = 0;
const REGION_HIDDEN: u8 = 1;
const REGION_HEADER: u8 = 2;
const FIRST_SLOT: u8 = 3;

/// Most visible structures (standard + extended + the synthetic extended root).
pub const MAX_SLOTS: usize = 48;

#[derive(Clone, Copy, Debug)]
struct Slot {
    start: u16,
    table: &'static [BytePerm],
}

/// One BAR slot (dword) as the guest sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct VirtBar {
    /// Address bits the guest may set.
    mask: u32,
    /// Read-only flag bits.
    flags: u32,
    /// Current guest value.
    value: u32,
}

impl VirtBar {
    fn write(&mut self, v: u32) {
        self.value = (v & self.mask) | self.flags;
    }
}

/// A guest's view of one physical function.
#[derive(Clone, Debug)]
pub struct VirtualConfig {
    addr: PciAddress,
    size: u16,
    shadow: [u8; EXTENDED_CONFIG_SIZE as usize],
    region: [u8; EXTENDED_CONFIG_SIZE as usize],
    slots: Vec<Slot, MAX_SLOTS>,
    bars: [VirtBar; 6],
    bar_kinds: [Option<BarKind>; 6],
    bar_sizes: [u64; 6],
    rom: VirtBar,
    rom_size: u32,
    policy: DevicePolicy,
    msi: Option<MsiCap>,
    msix_control: Option<u16>,
    pcie: Option<u16>,
    /// Device control of the PCIe capability (visible or not) when it lies inside it.
    devctl: Option<u16>,
    pm: Option<u16>,
    guest_command: u16,
    counters: Counters,
}

/// Natural length of a standard capability, when known.
fn cap_len(f: &Function, id: u8, offset: u16, cfg: &impl ConfigSpace) -> Option<u16> {
    match id {
        cap_id::POWER_MANAGEMENT => Some(8),
        cap_id::MSI => f.msi.map(|m| m.len_bytes()),
        cap_id::MSIX => Some(crate::caps::MSIX_CAP_LEN),
        cap_id::PCI_EXPRESS => f.pcie.map(|p| p.len_bytes()),
        cap_id::VENDOR => Some(u16::from(cfg.read8(f.addr, offset + 2)).max(3)),
        _ => None,
    }
}

/// Natural length of an extended capability, when known.
fn ext_len(f: &Function, id: u16, offset: u16, cfg: &impl ConfigSpace) -> Option<u16> {
    match id {
        ext_cap_id::AER => Some(0x48),
        ext_cap_id::DSN => Some(0x0c),
        ext_cap_id::VENDOR => Some(((cfg.read32(f.addr, offset + 4) >> 20) as u16).max(8)),
        _ => None,
    }
}

impl VirtualConfig {
    /// Builds the guest's view of `f` (as enumerated) under `policy`. The virtual copy starts
    /// from the hardware's contents with everything the guest owns reset: command 0, BARs
    /// unprogrammed, MSI and MSI-X disabled, D0.
    ///
    /// Writes hardware so that it agrees with the view: command bits (I/O, memory, bus
    /// master) the policy keeps virtual read 0 to the guest, so they are switched off in the
    /// device; PCIe Enable No Snoop is virtual and switched off too (No Snoop DMA bypasses the
    /// CPU caches where the IOMMU cannot force snooping).
    pub fn new(cfg: &impl ConfigSpace, f: &Function, policy: DevicePolicy) -> Result<Self, VConfigError> {
        if f.header_type != regs::HEADER_TYPE_DEVICE {
            return Err(VConfigError::NotAnEndpoint(f.header_type));
        }
        let size = f.config_size.min(cfg.size(f.addr));
        if size < crate::CONFIG_SIZE {
            return Err(VConfigError::ConfigSpaceTooSmall(size));
        }
        let mut v = Self {
            addr: f.addr,
            size,
            shadow: [0; EXTENDED_CONFIG_SIZE as usize],
            region: [REGION_UNKNOWN; EXTENDED_CONFIG_SIZE as usize],
            slots: Vec::new(),
            bars: [VirtBar::default(); 6],
            bar_kinds: [None; 6],
            bar_sizes: [0; 6],
            rom: VirtBar::default(),
            rom_size: 0,
            policy,
            msi: f.msi,
            msix_control: None,
            pcie: None,
            devctl: None,
            pm: None,
            guest_command: 0,
            counters: Counters::default(),
        };
        for off in (0..size).step_by(4) {
            let d = cfg.read32(f.addr, off).to_le_bytes();
            v.shadow[usize::from(off)..usize::from(off) + 4].copy_from_slice(&d);
        }
        v.region[..usize::from(regs::HEADER_SIZE)].fill(REGION_HEADER);
        v.init_bars(f);
        v.init_standard_chain(cfg, f)?;
        if size >= EXTENDED_CONFIG_SIZE {
            v.init_extended_chain(cfg, f)?;
        }
        // Header fields the guest owns.
        v.put16(regs::COMMAND, 0);
        v.put8(regs::INTERRUPT_LINE, 0);
        if policy.intx == IntxPolicy::Hide {
            v.put8(regs::INTERRUPT_PIN, 0);
        }
        for off in 0x35..0x3c {
            v.put8(off, 0);
        }
        v.align_hardware(cfg);
        Ok(v)
    }

    /// Switches off in the device what the guest's view says is off and cannot reach
    /// hardware: command bits the policy keeps virtual, and Enable No Snoop.
    fn align_hardware(&mut self, cfg: &impl ConfigSpace) {
        let blocked = COMMAND_PASSABLE & !self.policy.command_passthrough.bits();
        let command = cfg.read16(self.addr, regs::COMMAND);
        if command & blocked != 0 {
            // Command only (status is the next word: its RW1C bits are not touched).
            cfg.write16(self.addr, regs::COMMAND, command & !blocked);
            self.counters.hardware_writes += 1;
        }
        if let Some(devctl) = self.devctl {
            let dc = cfg.read16(self.addr, devctl);
            if dc & pcie_regs::DEVCTL_NO_SNOOP != 0 {
                // Device control holds no RW1C bit; initiate-FLR reads 0, so it is written 0.
                cfg.write16(self.addr, devctl, dc & !(pcie_regs::DEVCTL_NO_SNOOP | pcie_regs::DEVCTL_FLR));
                self.counters.hardware_writes += 1;
            }
        }
    }

    fn init_bars(&mut self, f: &Function) {
        for b in &f.bars {
            let i = usize::from(b.index);
            let mask = !(b.size.saturating_sub(1));
            let flags = b.kind.flags();
            let low_mask = (mask as u32) & if b.kind == BarKind::Io { !0x3 } else { !0xf };
            self.bars[i] = VirtBar { mask: low_mask, flags, value: flags };
            self.bar_kinds[i] = Some(b.kind);
            self.bar_sizes[i] = b.size;
            if matches!(b.kind, BarKind::Mem64 { .. }) && i < 5 {
                self.bars[i + 1] = VirtBar { mask: (mask >> 32) as u32, flags: 0, value: 0 };
            }
        }
        if let (Some(rom), RomPolicy::Visible) = (f.rom, self.policy.rom) {
            let mask = !(rom.size.saturating_sub(1)) & regs::ROM_ADDRESS_MASK;
            self.rom = VirtBar { mask: mask | regs::ROM_ENABLE, flags: 0, value: 0 };
            self.rom_size = rom.size;
        }
    }

    /// Marks `[start, start + len)`, cut at the config space size, as belonging to `region`.
    fn mark(&mut self, start: u16, len: u16, region: u8) {
        let end = (usize::from(start) + usize::from(len)).min(usize::from(self.size));
        let start = usize::from(start).min(end);
        self.region[start..end].fill(region);
    }

    fn add_slot(&mut self, start: u16, len: u16, table: &'static [BytePerm]) -> Result<(), VConfigError> {
        let idx = self.slots.len();
        self.slots.push(Slot { start, table }).map_err(|_| VConfigError::TooManyCapabilities)?;
        self.mark(start, len, FIRST_SLOT + idx as u8);
        Ok(())
    }

    fn init_standard_chain(&mut self, cfg: &impl ConfigSpace, f: &Function) -> Result<(), VConfigError> {
        let caps = &f.chains.caps;
        // Ends of structures in address order, to clamp lengths.
        let mut starts: Vec<u16, { crate::caps::MAX_CAPS }> = caps.iter().map(|c| c.offset).collect();
        starts.sort_unstable();
        let next_start = |off: u16| starts.iter().copied().find(|&s| s > off).unwrap_or(crate::CONFIG_SIZE);
        let mut visible: Vec<u16, { crate::caps::MAX_CAPS }> = Vec::new();
        for c in caps {
            // A capability ends where the next one begins: `room` bytes. Its registers are
            // used only inside that room (beyond it they are the next capability's).
            let room = next_start(c.offset) - c.offset;
            let natural = cap_len(f, c.id, c.offset, cfg);
            let len = natural.map_or(room, |n| n.min(room));
            let cut_short = natural.is_some_and(|n| n > room);
            let hidden_by_policy = c.id < 32 && self.policy.hide_caps & (1 << c.id) != 0;
            let table = match c.id {
                // MSI cut short: its address, data or mask registers are another capability's
                // bytes. Hidden whole rather than half virtualized.
                cap_id::MSI if cut_short => None,
                cap_id::MSI => f.msi.filter(|m| m.offset == c.offset).map(|m| perm::msi(m.is_64bit, m.per_vector_mask)),
                _ => perm::standard(c.id),
            };
            if c.id == cap_id::PCI_EXPRESS && room >= pcie_regs::DEVICE_CONTROL + 2 && self.devctl.is_none() {
                self.devctl = Some(c.offset + pcie_regs::DEVICE_CONTROL);
            }
            match table.filter(|_| !hidden_by_policy) {
                Some(t) => {
                    self.add_slot(c.offset, len, t)?;
                    let _ = visible.push(c.offset);
                    match c.id {
                        cap_id::MSI => self.reset_msi(),
                        cap_id::MSIX => {
                            // Message control (+2) is always inside: capabilities are dword
                            // aligned, so `room` is at least 4.
                            self.msix_control = Some(c.offset + 2);
                            let ctl = self.get16(c.offset + 2) & !(msix_control::ENABLE | msix_control::FUNCTION_MASK);
                            self.put16(c.offset + 2, ctl);
                        }
                        cap_id::PCI_EXPRESS if room >= pcie_regs::DEVICE_CONTROL + 2 && self.pcie.is_none() => {
                            self.pcie = Some(c.offset);
                            let ctl = self.get16(c.offset + pcie_regs::DEVICE_CONTROL) & !pcie_regs::DEVCTL_FLR;
                            self.put16(c.offset + pcie_regs::DEVICE_CONTROL, ctl);
                        }
                        cap_id::POWER_MANAGEMENT if room >= 6 && self.pm.is_none() => {
                            self.pm = Some(c.offset);
                            let csr = self.get16(c.offset + 4) & !0x0103;
                            self.put16(c.offset + 4, csr);
                        }
                        _ => {}
                    }
                }
                None => {
                    self.mark(c.offset, len, REGION_HIDDEN);
                    if self.msi.is_some_and(|m| m.offset == c.offset) {
                        self.msi = None;
                    }
                }
            }
        }
        // Splice: the pointer and each visible capability's next skip hidden ones.
        self.put8(regs::CAPABILITIES_POINTER, visible.first().map_or(0, |&o| o as u8));
        for (i, &off) in visible.iter().enumerate() {
            self.put8(off + 1, visible.get(i + 1).map_or(0, |&o| o as u8));
        }
        let status = self.get16(regs::STATUS) & !Status::CAP_LIST.bits();
        let cap_list = if visible.is_empty() { 0 } else { Status::CAP_LIST.bits() };
        self.put16(regs::STATUS, status | cap_list);
        Ok(())
    }

    fn init_extended_chain(&mut self, cfg: &impl ConfigSpace, f: &Function) -> Result<(), VConfigError> {
        let ext = &f.chains.ext;
        if ext.is_empty() {
            return Ok(());
        }
        let mut starts: Vec<u16, { crate::caps::MAX_EXT_CAPS }> = ext.iter().map(|c| c.offset).collect();
        starts.sort_unstable();
        let next_start = |off: u16| starts.iter().copied().find(|&s| s > off).unwrap_or(EXTENDED_CONFIG_SIZE);
        let mut visible: Vec<u16, { crate::caps::MAX_EXT_CAPS }> = Vec::new();
        for c in ext {
            let limit = next_start(c.offset);
            let len = ext_len(f, c.id, c.offset, cfg).map_or(limit - c.offset, |n| n.min(limit - c.offset));
            let hidden_by_policy = c.id < 64 && self.policy.hide_ext_caps & (1 << c.id) != 0;
            match perm::extended(c.id).filter(|_| !hidden_by_policy) {
                Some(t) => {
                    self.add_slot(c.offset, len, t)?;
                    let _ = visible.push(c.offset);
                }
                None => self.mark(c.offset, len, REGION_HIDDEN),
            }
        }
        for (i, &off) in visible.iter().enumerate() {
            let next = visible.get(i + 1).copied().unwrap_or(0);
            let header = (self.get32(off) & 0x000f_ffff) | u32::from(next) << 20;
            self.put32(off, header);
        }
        // The chain must start at 0x100: if that capability is hidden, a null header (ID 0)
        // there points on to the first visible one (or ends the chain).
        if visible.first() != Some(&regs::EXTENDED_CAP_START) {
            let first = visible.first().copied().unwrap_or(0);
            self.put32(regs::EXTENDED_CAP_START, u32::from(first) << 20);
            self.add_slot(regs::EXTENDED_CAP_START, 4, &perm::EXT_HEADER)?;
        }
        Ok(())
    }

    fn reset_msi(&mut self) {
        let Some(m) = self.msi else { return };
        let ctl = self.get16(m.control()) & !(msi_control::ENABLE | msi_control::MME_MASK);
        self.put16(m.control(), ctl);
        self.put32(m.address_lo(), 0);
        if let Some(hi) = m.address_hi() {
            self.put32(hi, 0);
        }
        self.put16(m.data(), 0);
        if let Some(mask) = m.mask() {
            self.put32(mask, 0);
        }
    }

    fn get8(&self, off: u16) -> u8 {
        self.shadow[usize::from(off)]
    }
    fn get16(&self, off: u16) -> u16 {
        u16::from_le_bytes([self.get8(off), self.get8(off + 1)])
    }
    fn get32(&self, off: u16) -> u32 {
        u32::from(self.get16(off)) | u32::from(self.get16(off + 2)) << 16
    }
    fn put8(&mut self, off: u16, v: u8) {
        if off < self.size {
            self.shadow[usize::from(off)] = v;
        }
    }
    fn put16(&mut self, off: u16, v: u16) {
        self.put8(off, v as u8);
        self.put8(off + 1, (v >> 8) as u8);
    }
    fn put32(&mut self, off: u16, v: u32) {
        self.put16(off, v as u16);
        self.put16(off + 2, (v >> 16) as u16);
    }

    /// What bytes at `off` outside every structure do: the standard or the extended policy.
    fn unknown_policy(&self, off: u16) -> UnknownPolicy {
        if off >= regs::EXTENDED_CAP_START { self.policy.extended_unknown } else { self.policy.unknown }
    }

    /// The permissions of byte `off`, or `None` for hidden/unknown bytes.
    fn perm(&self, off: u16) -> Option<BytePerm> {
        match self.region[usize::from(off)] {
            REGION_HEADER => {
                let mut p = perm::HEADER[usize::from(off)];
                if off == regs::COMMAND || off == regs::COMMAND + 1 {
                    let shift = 8 * (off - regs::COMMAND);
                    let blocked = (COMMAND_PASSABLE & !self.policy.command_passthrough.bits()) >> shift;
                    p.virt |= blocked as u8;
                }
                Some(p)
            }
            REGION_UNKNOWN | REGION_HIDDEN => None,
            slot => {
                let s = self.slots.get(usize::from(slot - FIRST_SLOT))?;
                Some(s.table.get(usize::from(off - s.start)).copied().unwrap_or(BytePerm::READ_ONLY))
            }
        }
    }

    /// Bits of byte `off` a guest write can change in hardware (for tests and audits).
    pub fn hw_write_mask(&self, off: u16) -> u8 {
        if off >= self.size {
            return 0;
        }
        match self.region[usize::from(off)] {
            REGION_UNKNOWN if self.unknown_policy(off) == UnknownPolicy::Passthrough => 0xff,
            _ if is_bar_or_rom(off) => 0,
            _ => self.perm(off).map_or(0, |p| p.hw_write()),
        }
    }

    fn bar_slot(&mut self, off: u16) -> Option<&mut VirtBar> {
        match off {
            0x10..=0x27 => Some(&mut self.bars[usize::from((off - regs::BAR0) / 4)]),
            0x30..=0x33 => Some(&mut self.rom),
            _ => None,
        }
    }

    /// The guest reads `width` bytes at `offset`.
    pub fn read(&mut self, hw: &impl ConfigSpace, offset: u16, width: Width) -> u32 {
        if !access_ok(offset, width, self.size) {
            self.counters.bad_accesses += 1;
            return width.ones();
        }
        let n = width.bytes();
        if let Some(bar) = self.bar_slot(offset & !3) {
            return (bar.value >> (8 * (offset & 3))) & width.ones();
        }
        let unknown_reads_hw = |o: u16| self.unknown_policy(o) != UnknownPolicy::Zero;
        let needs_hw = (offset..offset + n).any(|o| match self.perm(o) {
            Some(p) => p.virt != 0xff,
            None => self.region[usize::from(o)] == REGION_UNKNOWN && unknown_reads_hw(o),
        });
        let hwv = if needs_hw { hw.read(self.addr, offset, width) } else { 0 };
        let mut out = 0u32;
        for i in 0..n {
            let o = offset + i;
            let h = (hwv >> (8 * i)) as u8;
            let b = match self.perm(o) {
                Some(p) => (h & !p.virt) | (self.get8(o) & p.virt),
                None if self.region[usize::from(o)] == REGION_UNKNOWN && unknown_reads_hw(o) => h,
                None => 0,
            };
            out |= u32::from(b) << (8 * i);
        }
        out
    }

    /// The guest writes `value` (`width` bytes) at `offset`; events go to `sink`.
    pub fn write(&mut self, hw: &impl ConfigSpace, offset: u16, width: Width, value: u32, sink: &mut impl EventSink) {
        if !access_ok(offset, width, self.size) {
            self.counters.bad_accesses += 1;
            return;
        }
        let n = width.bytes();
        if is_bar_or_rom(offset) {
            self.write_bar(offset, width, value, sink);
            return;
        }
        let before = self.watched();
        let (mut hw_mask, mut hw_val) = (0u32, 0u32);
        let (mut hidden, mut unknown) = (false, false);
        for i in 0..n {
            let o = offset + i;
            let v = (value >> (8 * i)) as u8;
            match self.perm(o) {
                Some(p) => {
                    let vw = p.write & p.virt;
                    let cur = self.get8(o);
                    self.put8(o, (cur & !vw) | (v & vw));
                    hw_mask |= u32::from(p.hw_write()) << (8 * i);
                    hw_val |= u32::from(v & p.hw_write()) << (8 * i);
                }
                None if self.region[usize::from(o)] == REGION_HIDDEN => hidden = true,
                None => {
                    unknown = true;
                    if self.unknown_policy(o) == UnknownPolicy::Passthrough {
                        hw_mask |= 0xff << (8 * i);
                        hw_val |= u32::from(v) << (8 * i);
                    }
                }
            }
        }
        self.counters.hidden_writes += u64::from(hidden);
        self.counters.unknown_writes += u64::from(unknown);
        if offset <= regs::COMMAND + 1 && offset + n > regs::COMMAND {
            let mut cmd = self.guest_command;
            for i in 0..n {
                let o = offset + i;
                if o == regs::COMMAND || o == regs::COMMAND + 1 {
                    let byte_shift = 8 * (o - regs::COMMAND);
                    let v = u16::from((value >> (8 * i)) as u8);
                    cmd = (cmd & !(0xff << byte_shift)) | (v << byte_shift);
                }
            }
            self.guest_command = cmd & COMMAND_WRITABLE;
        }
        if hw_mask != 0 {
            self.write_hardware(hw, offset, hw_mask, hw_val);
        }
        self.after_write(offset, n, value, before, sink);
    }

    /// Writes the bits in `mask` (relative to `offset`) to hardware: one naturally aligned
    /// access per run of bytes holding such bits, so a byte without guest-writable bits is
    /// never written (not even with its own value: some registers act on any write). Other
    /// bits of a written byte keep their hardware value; RW1C bits are written 0.
    fn write_hardware(&mut self, hw: &impl ConfigSpace, offset: u16, mask: u32, val: u32) {
        let byte = |x: u32, i: u16| (x >> (8 * i)) & 0xff;
        let mut i = 0u16;
        while i < 4 {
            if byte(mask, i) == 0 {
                i += 1;
                continue;
            }
            let o = offset + i;
            let covered = |k: u16| (i..i + k).all(|j| j < 4 && byte(mask, j) != 0);
            let width = if o.is_multiple_of(4) && covered(4) {
                Width::Dword
            } else if o.is_multiple_of(2) && covered(2) {
                Width::Word
            } else {
                Width::Byte
            };
            let shift = 8 * u32::from(i);
            self.write_span(hw, o, width, (mask >> shift) & width.ones(), (val >> shift) & width.ones());
            i += width.bytes();
        }
    }

    /// One hardware access at `start`: bits in `m` from `v`, the rest from hardware, RW1C
    /// bits the guest does not own written 0.
    fn write_span(&mut self, hw: &impl ConfigSpace, start: u16, width: Width, m: u32, v: u32) {
        let mut rw1c = 0u32;
        for i in 0..width.bytes() {
            let guest_owned = (m >> (8 * i)) as u8;
            let c = self.perm(start + i).map_or(0, |p| p.rw1c & !guest_owned);
            rw1c |= u32::from(c) << (8 * i);
        }
        let cur = hw.read(self.addr, start, width);
        let new = (cur & !m & !rw1c) | (v & m);
        hw.write(self.addr, start, width, new);
        self.counters.hardware_writes += 1;
    }

    fn write_bar(&mut self, offset: u16, width: Width, value: u32, sink: &mut impl EventSink) {
        let dword = offset & !3;
        let shift = 8 * u32::from(offset & 3);
        let Some(bar) = self.bar_slot(dword) else { return };
        let merged = (bar.value & !(width.ones() << shift)) | ((value & width.ones()) << shift);
        bar.write(merged);
        if dword == regs::ROM_ADDRESS {
            // A hidden or absent ROM has no writable bits: nothing to report.
            if self.rom.mask != 0 {
                let value = self.rom.value;
                sink.event(ConfigEvent::Rom {
                    address: value & regs::ROM_ADDRESS_MASK,
                    enabled: value & regs::ROM_ENABLE != 0,
                });
            }
            return;
        }
        // Report the BAR whose slot this is (the low slot of a 64-bit BAR).
        let slot = usize::from((dword - regs::BAR0) / 4);
        let index = if slot > 0
            && self.bar_kinds[slot].is_none()
            && matches!(self.bar_kinds[slot - 1], Some(BarKind::Mem64 { .. }))
        {
            slot - 1
        } else {
            slot
        };
        let Some(kind) = self.bar_kinds[index] else { return };
        let low = u64::from(self.bars[index].value & !kind.flags());
        let high = if matches!(kind, BarKind::Mem64 { .. }) { u64::from(self.bars[index + 1].value) << 32 } else { 0 };
        sink.event(ConfigEvent::Bar { index: index as u8, address: high | low });
    }

    /// Virtual fields whose changes are events.
    fn watched(&self) -> Watched {
        let msi = self.msi.map(|m| {
            let hi = m.address_hi().map_or(0, |o| self.get32(o));
            (
                self.get16(m.control()),
                u64::from(hi) << 32 | u64::from(self.get32(m.address_lo())),
                self.get16(m.data()),
                m.mask().map_or(0, |o| self.get32(o)),
            )
        });
        Watched {
            command: self.guest_command,
            msi,
            msix: self.msix_control.map(|o| self.get16(o)),
            pm: self.pm.map(|o| self.get16(o + 4) & 0x3),
        }
    }

    fn after_write(&mut self, offset: u16, n: u16, value: u32, before: Watched, sink: &mut impl EventSink) {
        // MME beyond what the function can do is clamped to its maximum.
        if let Some(m) = self.msi {
            let ctl = self.get16(m.control());
            let mme = (ctl & msi_control::MME_MASK) >> msi_control::MME_SHIFT;
            if mme > u16::from(m.vectors_log2) {
                self.put16(
                    m.control(),
                    (ctl & !msi_control::MME_MASK) | u16::from(m.vectors_log2) << msi_control::MME_SHIFT,
                );
            }
        }
        let after = self.watched();
        if after.command != before.command {
            let c = Command::from_bits_truncate(after.command);
            sink.event(ConfigEvent::Command {
                io: c.contains(Command::IO),
                memory: c.contains(Command::MEMORY),
                bus_master: c.contains(Command::BUS_MASTER),
                intx_disable: c.contains(Command::INTX_DISABLE),
            });
        }
        if let (Some(b), Some(a)) = (before.msi, after.msi) {
            let (cb, ca) = (
                b.0 & (msi_control::ENABLE | msi_control::MME_MASK),
                a.0 & (msi_control::ENABLE | msi_control::MME_MASK),
            );
            if ca != cb {
                sink.event(ConfigEvent::MsiControl {
                    enabled: ca & msi_control::ENABLE != 0,
                    vectors_log2: ((ca & msi_control::MME_MASK) >> msi_control::MME_SHIFT) as u8,
                });
            }
            if a.1 != b.1 {
                sink.event(ConfigEvent::MsiAddress(a.1));
            }
            if a.2 != b.2 {
                sink.event(ConfigEvent::MsiData(a.2));
            }
            if a.3 != b.3 {
                sink.event(ConfigEvent::MsiMask(a.3));
            }
        }
        if let (Some(b), Some(a)) = (before.msix, after.msix) {
            let bits = msix_control::ENABLE | msix_control::FUNCTION_MASK;
            if a & bits != b & bits {
                sink.event(ConfigEvent::MsixControl {
                    enabled: a & msix_control::ENABLE != 0,
                    function_masked: a & msix_control::FUNCTION_MASK != 0,
                });
            }
        }
        if let (Some(b), Some(a)) = (before.pm, after.pm)
            && a != b
        {
            sink.event(ConfigEvent::PowerState(a as u8));
        }
        if let Some(p) = self.pcie {
            let ctl = p + pcie_regs::DEVICE_CONTROL;
            let flr_byte = ctl + 1;
            if (offset..offset + n).contains(&flr_byte) {
                let v = (value >> (8 * (flr_byte - offset))) as u8;
                if v & (pcie_regs::DEVCTL_FLR >> 8) as u8 != 0 {
                    sink.event(ConfigEvent::FunctionLevelReset);
                    let c = self.get16(ctl) & !pcie_regs::DEVCTL_FLR;
                    self.put16(ctl, c);
                }
            }
        }
    }

    /// The physical function.
    pub fn addr(&self) -> PciAddress {
        self.addr
    }

    /// Config space size the guest sees.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Refused or odd accesses so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The policy.
    pub fn policy(&self) -> &DevicePolicy {
        &self.policy
    }

    /// The guest's address for the expansion ROM, its size and whether the guest enabled its
    /// decode; `None` unless the ROM exists and the policy makes it visible.
    pub fn rom(&self) -> Option<(u32, u32, bool)> {
        let v = self.rom.value;
        (self.rom.mask != 0).then_some((v & regs::ROM_ADDRESS_MASK, self.rom_size, v & regs::ROM_ENABLE != 0))
    }

    /// The guest's address for the BAR at `index` with its size, if implemented.
    pub fn bar(&self, index: u8) -> Option<(u64, u64, BarKind)> {
        let i = usize::from(index);
        let kind = (*self.bar_kinds.get(i)?)?;
        let low = u64::from(self.bars[i].value & !kind.flags());
        let high = if matches!(kind, BarKind::Mem64 { .. }) { u64::from(self.bars[i + 1].value) << 32 } else { 0 };
        Some((high | low, self.bar_sizes[i], kind))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Watched {
    command: u16,
    msi: Option<(u16, u64, u16, u32)>,
    msix: Option<u16>,
    pm: Option<u16>,
}

const fn is_bar_or_rom(off: u16) -> bool {
    (off >= regs::BAR0 && off < regs::BAR0 + 24) || (off >= regs::ROM_ADDRESS && off < regs::ROM_ADDRESS + 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enumerate::{Inventory, probe};
    use crate::fake::{FakeConfig, FakeFunction, edu_like, nvme_like};
    use proptest::prelude::*;
    use std::vec::Vec as StdVec;

    fn at() -> PciAddress {
        PciAddress::new(0, 3, 0)
    }

    fn setup(f: FakeFunction, policy: DevicePolicy) -> (FakeConfig, VirtualConfig) {
        let (cfg, v, _) = setup_with(f, policy);
        (cfg, v)
    }

    /// Also the function as enumerated. The write log starts empty after the view is built.
    fn setup_with(f: FakeFunction, policy: DevicePolicy) -> (FakeConfig, VirtualConfig, Function) {
        let cfg = FakeConfig::new();
        cfg.add(at(), f);
        let func = probe(&cfg, at(), false, &mut Inventory::default());
        let v = VirtualConfig::new(&cfg, &func, policy).unwrap();
        cfg.writes.borrow_mut().clear();
        (cfg, v, func)
    }

    /// A function whose capabilities sit back to back, shorter than their types say: a
    /// 64-bit MSI (14 bytes) with PM 8 bytes on; a PCIe capability (0x3c) with a 4-byte vendor
    /// capability after 4 bytes, which holds where device control would be.
    fn packed_caps() -> FakeFunction {
        let mut f = FakeFunction::new(0x1af4, 0x1041, 0x02_00_00, 4096);
        f.cap(cap_id::MSI, &[0x80, 0x00, 0, 0, 0, 0]);
        f.pm();
        f.cap(cap_id::PCI_EXPRESS, &[0x02, 0x00]);
        f.cap(cap_id::VENDOR, &[8, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
        f.writable_at(0x40 + 2, &[0x71, 0]);
        f
    }

    fn events(v: &mut VirtualConfig, cfg: &FakeConfig, off: u16, w: Width, val: u32) -> StdVec<ConfigEvent> {
        let mut ev = StdVec::new();
        v.write(cfg, off, w, val, &mut |e| ev.push(e));
        ev
    }

    /// The guest's walk of the standard chain: (id, offset) pairs.
    fn guest_chain(v: &mut VirtualConfig, cfg: &FakeConfig) -> StdVec<(u8, u16)> {
        let mut out = StdVec::new();
        if v.read(cfg, regs::STATUS, Width::Word) as u16 & Status::CAP_LIST.bits() == 0 {
            return out;
        }
        let mut p = v.read(cfg, regs::CAPABILITIES_POINTER, Width::Byte) as u16;
        while p != 0 && out.len() < 48 {
            out.push((v.read(cfg, p, Width::Byte) as u8, p));
            p = v.read(cfg, p + 1, Width::Byte) as u16;
        }
        out
    }

    fn guest_ext_chain(v: &mut VirtualConfig, cfg: &FakeConfig) -> StdVec<(u16, u16)> {
        let mut out = StdVec::new();
        let mut p = 0x100;
        while p != 0 && out.len() < 64 {
            let h = v.read(cfg, p, Width::Dword);
            if h == 0 {
                break;
            }
            if h & 0xffff != 0 {
                out.push((h as u16, p));
            }
            p = ((h >> 20) & 0xffc) as u16;
        }
        out
    }

    #[test]
    fn ids_class_and_header_type_come_from_hardware_and_never_change() {
        let (cfg, mut v) = setup(nvme_like(), DevicePolicy::default());
        assert_eq!(v.read(&cfg, 0, Width::Dword), 0x0010_1b36);
        assert_eq!(v.read(&cfg, regs::REVISION, Width::Dword) >> 8, 0x01_08_02);
        let before = cfg.bytes(at());
        for off in [0u16, 2, 8, 0x0e] {
            v.write(&cfg, off, Width::Word, 0xabcd, &mut |_| {});
        }
        assert_eq!(cfg.bytes(at()), before);
        assert_eq!(v.read(&cfg, 0, Width::Dword), 0x0010_1b36, "virtual IDs are read-only too");
        assert!(cfg.writes.borrow().is_empty(), "no hardware write at all");
    }

    #[test]
    fn command_passes_decode_and_bus_master_through_the_mask() {
        let (cfg, mut v) = setup(edu_like(), DevicePolicy::default());
        let ev = events(&mut v, &cfg, regs::COMMAND, Width::Word, 0x0407);
        assert_eq!(ev, [ConfigEvent::Command { io: true, memory: true, bus_master: true, intx_disable: true }]);
        let hw = u16::from_le_bytes([cfg.bytes(at())[4], cfg.bytes(at())[5]]);
        assert_eq!(hw, 0x0007, "decode and bus master reach hardware, INTx disable does not");
        assert_eq!(v.read(&cfg, regs::COMMAND, Width::Word), 0x0407, "guest reads what it wrote");
        // A narrower mask: only memory decode passes; bus master stays virtual.
        let policy = DevicePolicy { command_passthrough: Command::MEMORY, ..DevicePolicy::default() };
        let (cfg, mut v) = setup(edu_like(), policy);
        v.write(&cfg, regs::COMMAND, Width::Word, 0x0006, &mut |_| {});
        assert_eq!(cfg.bytes(at())[4], 0x02);
        assert_eq!(v.read(&cfg, regs::COMMAND, Width::Word), 0x0006);
        assert_eq!(v.hw_write_mask(regs::COMMAND), 0x02);
    }

    #[test]
    fn status_rw1c_bits_survive_any_guest_write() {
        let mut f = edu_like();
        f.set16(regs::STATUS, 0xf900 | Status::CAP_LIST.bits());
        let (cfg, mut v) = setup(f, DevicePolicy::default());
        // Dword write over command + status: only the command word reaches hardware.
        v.write(&cfg, regs::COMMAND, Width::Dword, 0xffff_0002, &mut |_| {});
        let b = cfg.bytes(at());
        assert_eq!(u16::from_le_bytes([b[6], b[7]]) & 0xf900, 0xf900, "error bits not cleared");
        let w = cfg.writes.borrow();
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].1, w[0].2), (regs::COMMAND, Width::Byte), "smallest span: the command low byte");
    }

    #[test]
    fn bars_size_truly_and_never_touch_hardware() {
        let (cfg, mut v) = setup(nvme_like(), DevicePolicy::default());
        let before = cfg.bytes(at());
        assert_eq!(v.read(&cfg, regs::BAR0, Width::Dword), 0x4, "unprogrammed: flags only");
        v.write(&cfg, regs::BAR0, Width::Dword, u32::MAX, &mut |_| {});
        v.write(&cfg, regs::BAR0 + 4, Width::Dword, u32::MAX, &mut |_| {});
        assert_eq!(v.read(&cfg, regs::BAR0, Width::Dword), 0xffff_c004, "16 KiB, 64-bit");
        assert_eq!(v.read(&cfg, regs::BAR0 + 4, Width::Dword), 0xffff_ffff);
        let mut ev = StdVec::new();
        v.write(&cfg, regs::BAR0, Width::Dword, 0xe000_0000, &mut |e| ev.push(e));
        v.write(&cfg, regs::BAR0 + 4, Width::Dword, 0x1, &mut |e| ev.push(e));
        assert_eq!(ev.last(), Some(&ConfigEvent::Bar { index: 0, address: 0x1_e000_0000 }));
        assert_eq!(v.bar(0), Some((0x1_e000_0000, 0x4000, BarKind::Mem64 { prefetchable: false })));
        // Unaligned guest address bits are dropped, like hardware would.
        v.write(&cfg, regs::BAR0, Width::Dword, 0xe000_1234, &mut |_| {});
        assert_eq!(v.read(&cfg, regs::BAR0, Width::Dword), 0xe000_0004);
        // Byte writes inside a BAR.
        v.write(&cfg, regs::BAR0 + 3, Width::Byte, 0xd0, &mut |_| {});
        assert_eq!(v.read(&cfg, regs::BAR0, Width::Dword), 0xd000_0004);
        // Unimplemented BAR reads 0 whatever is written.
        v.write(&cfg, regs::BAR0 + 8, Width::Dword, u32::MAX, &mut |_| {});
        assert_eq!(v.read(&cfg, regs::BAR0 + 8, Width::Dword), 0);
        assert_eq!(cfg.bytes(at()), before);
        assert!(cfg.writes.borrow().is_empty());
    }

    #[test]
    fn rom_hidden_unless_configured() {
        let mut f = edu_like();
        f.rom(0xfeb0_0000, 0x4_0000);
        let (cfg, mut v) = setup(f.clone(), DevicePolicy::default());
        v.write(&cfg, regs::ROM_ADDRESS, Width::Dword, u32::MAX, &mut |_| {});
        assert_eq!(v.read(&cfg, regs::ROM_ADDRESS, Width::Dword), 0);
        assert_eq!(events(&mut v, &cfg, regs::ROM_ADDRESS, Width::Dword, 0xfea0_0001), []);
        assert_eq!(v.rom(), None);
        let (cfg, mut v) = setup(f, DevicePolicy { rom: RomPolicy::Visible, ..DevicePolicy::default() });
        assert_eq!(v.rom(), Some((0, 0x4_0000, false)));
        v.write(&cfg, regs::ROM_ADDRESS, Width::Dword, regs::ROM_ADDRESS_MASK, &mut |_| {});
        assert_eq!(v.read(&cfg, regs::ROM_ADDRESS, Width::Dword), 0xfffc_0000);
        // The address the guest programs is reported and kept, so it can be mapped.
        assert_eq!(
            events(&mut v, &cfg, regs::ROM_ADDRESS, Width::Dword, 0xfea4_0001),
            [ConfigEvent::Rom { address: 0xfea4_0000, enabled: true }]
        );
        assert_eq!(v.rom(), Some((0xfea4_0000, 0x4_0000, true)));
        assert_eq!(
            events(&mut v, &cfg, regs::ROM_ADDRESS, Width::Byte, 0),
            [ConfigEvent::Rom { address: 0xfea4_0000, enabled: false }]
        );
        assert_eq!(cfg.bytes(at())[0x30..0x34], [0, 0, 0xb0, 0xfe], "hardware ROM BAR untouched");
    }

    #[test]
    fn a_config_space_too_small_is_an_error_not_a_panic() {
        let cfg = FakeConfig::new();
        cfg.add(at(), nvme_like());
        let mut f = probe(&cfg, at(), false, &mut Inventory::default());
        for size in [0u16, 0x3c, 0x40, 0xff] {
            f.config_size = size;
            assert_eq!(
                VirtualConfig::new(&cfg, &f, DevicePolicy::default()).err(),
                Some(VConfigError::ConfigSpaceTooSmall(size))
            );
        }
        f.config_size = 256;
        let v = VirtualConfig::new(&cfg, &f, DevicePolicy::default()).unwrap();
        assert_eq!(v.size(), 256);
    }

    #[test]
    fn hidden_capabilities_are_spliced_out() {
        let (cfg, mut v) = setup(nvme_like(), DevicePolicy::default());
        let full = guest_chain(&mut v, &cfg);
        assert_eq!(
            full.iter().map(|c| c.0).collect::<StdVec<_>>(),
            [cap_id::POWER_MANAGEMENT, cap_id::MSIX, cap_id::PCI_EXPRESS]
        );
        let pm_at = full[0].1;
        let (cfg, mut v) = setup(nvme_like(), DevicePolicy::default().hiding_cap(cap_id::POWER_MANAGEMENT));
        let chain = guest_chain(&mut v, &cfg);
        assert_eq!(chain.iter().map(|c| c.0).collect::<StdVec<_>>(), [cap_id::MSIX, cap_id::PCI_EXPRESS]);
        assert_eq!(v.read(&cfg, pm_at, Width::Dword), 0, "hidden bytes read 0");
        let before = cfg.bytes(at());
        v.write(&cfg, pm_at + 4, Width::Word, 0x3, &mut |_| {});
        assert_eq!(cfg.bytes(at()), before);
        assert_eq!(v.counters().hidden_writes, 1);
        // The only capability hidden: no list at all.
        let (cfg, mut v) = setup(edu_like(), DevicePolicy::default().hiding_cap(cap_id::MSI));
        assert_eq!(v.read(&cfg, regs::STATUS, Width::Word) as u16 & Status::CAP_LIST.bits(), 0);
        assert_eq!(v.read(&cfg, regs::CAPABILITIES_POINTER, Width::Byte), 0);
        // A capability without a table (PCI-X) is always hidden.
        let mut f = edu_like();
        f.cap(cap_id::PCIX, &[0; 6]);
        let (cfg, mut v) = setup(f, DevicePolicy::default());
        assert_eq!(guest_chain(&mut v, &cfg).iter().map(|c| c.0).collect::<StdVec<_>>(), [cap_id::MSI]);
    }

    #[test]
    fn hidden_extended_capabilities_are_spliced_out() {
        let (cfg, mut v) = setup(nvme_like(), DevicePolicy::default());
        assert_eq!(
            guest_ext_chain(&mut v, &cfg).iter().map(|c| c.0).collect::<StdVec<_>>(),
            [ext_cap_id::AER, ext_cap_id::DSN]
        );
        let (cfg, mut v) = setup(nvme_like(), DevicePolicy::default().hiding_ext_cap(ext_cap_id::AER));
        let h = v.read(&cfg, 0x100, Width::Dword);
        assert_eq!(h & 0xffff, 0, "null header at 0x100");
        assert_eq!(guest_ext_chain(&mut v, &cfg).iter().map(|c| c.0).collect::<StdVec<_>>(), [ext_cap_id::DSN]);
        let (cfg, mut v) =
            setup(nvme_like(), DevicePolicy::default().hiding_ext_cap(ext_cap_id::AER).hiding_ext_cap(ext_cap_id::DSN));
        assert_eq!(v.read(&cfg, 0x100, Width::Dword), 0);
        // SR-IOV has no table: hidden even in the middle of the chain.
        let mut f = nvme_like();
        f.ext_cap(ext_cap_id::SRIOV, 1, &[0; 0x3c]);
        f.ext_cap(ext_cap_id::VENDOR, 1, &[0, 0, 0x80, 0]);
        let (cfg, mut v) = setup(f, DevicePolicy::default());
        assert_eq!(
            guest_ext_chain(&mut v, &cfg).iter().map(|c| c.0).collect::<StdVec<_>>(),
            [ext_cap_id::AER, ext_cap_id::DSN, ext_cap_id::VENDOR]
        );
    }

    #[test]
    fn msi_writes_become_events_and_stay_virtual() {
        let (cfg, mut v) = setup(edu_like(), DevicePolicy::default());
        let m = MsiCap::read(&cfg, at(), 0x40);
        let before = cfg.bytes(at());
        assert_eq!(
            events(&mut v, &cfg, m.address_lo(), Width::Dword, 0xfee0_1003),
            [ConfigEvent::MsiAddress(0xfee0_1000)]
        );
        assert_eq!(events(&mut v, &cfg, m.address_hi().unwrap(), Width::Dword, 0), []);
        assert_eq!(events(&mut v, &cfg, m.data(), Width::Word, 0x4041), [ConfigEvent::MsiData(0x4041)]);
        // MME beyond the single vector is clamped.
        assert_eq!(
            events(&mut v, &cfg, m.control(), Width::Word, 0x0071),
            [ConfigEvent::MsiControl { enabled: true, vectors_log2: 0 }]
        );
        assert_eq!(v.read(&cfg, m.control(), Width::Word) & 0x71, 0x01);
        assert_eq!(
            events(&mut v, &cfg, m.control(), Width::Word, 0),
            [ConfigEvent::MsiControl { enabled: false, vectors_log2: 0 }]
        );
        assert_eq!(cfg.bytes(at()), before, "the real MSI capability is the interrupt layer's");
    }

    #[test]
    fn msix_and_pcie_controls() {
        let (cfg, mut v) = setup(nvme_like(), DevicePolicy::default());
        let chain = guest_chain(&mut v, &cfg);
        let msix = chain.iter().find(|c| c.0 == cap_id::MSIX).unwrap().1;
        let pcie = chain.iter().find(|c| c.0 == cap_id::PCI_EXPRESS).unwrap().1;
        let before = cfg.bytes(at());
        assert_eq!(
            events(&mut v, &cfg, msix + 2, Width::Word, 0xc000),
            [ConfigEvent::MsixControl { enabled: true, function_masked: true }]
        );
        assert_eq!(v.read(&cfg, msix + 2, Width::Word), 0xc040, "table size 65 from hardware");
        assert_eq!(
            events(&mut v, &cfg, msix + 2, Width::Word, 0x8000),
            [ConfigEvent::MsixControl { enabled: true, function_masked: false }]
        );
        assert_eq!(cfg.bytes(at()), before);
        // FLR is an event and reads back 0; phantom functions never reach hardware; MPS is
        // virtual.
        let devctl = pcie + pcie_regs::DEVICE_CONTROL;
        let ev = events(&mut v, &cfg, devctl, Width::Word, 0x8000 | 0x0200 | 0x00a0 | 0x000f);
        assert_eq!(ev, [ConfigEvent::FunctionLevelReset]);
        assert_eq!(v.read(&cfg, devctl, Width::Word) & 0x8000, 0);
        let hw = u16::from_le_bytes([cfg.bytes(at())[usize::from(devctl)], cfg.bytes(at())[usize::from(devctl) + 1]]);
        assert_eq!(hw, 0x000f, "error reporting enables reach hardware; phantom, MPS, FLR do not");
        assert_eq!(v.read(&cfg, devctl, Width::Word) & 0x00e0, 0x00a0, "guest sees its MPS");
        // Link control is read-only.
        v.write(&cfg, pcie + pcie_regs::LINK_CONTROL, Width::Word, 0x0010, &mut |_| {});
        assert_eq!(cfg.bytes(at())[usize::from(pcie + pcie_regs::LINK_CONTROL)], 0);
    }

    #[test]
    fn power_state_is_virtual() {
        let (cfg, mut v) = setup(nvme_like(), DevicePolicy::default());
        let pm = guest_chain(&mut v, &cfg)[0].1;
        assert_eq!(events(&mut v, &cfg, pm + 4, Width::Word, 0x0003), [ConfigEvent::PowerState(3)]);
        assert_eq!(v.read(&cfg, pm + 4, Width::Word) & 3, 3);
        assert_eq!(cfg.bytes(at())[usize::from(pm + 4)] & 3, 0, "device stays in D0");
    }

    #[test]
    fn unknown_bytes_follow_the_policy() {
        let mut f = edu_like();
        f.set32(0xc0, 0x1234_5678).writable_at(0xc0, &[0xff; 4]);
        for (policy, read, hw_after) in [
            (UnknownPolicy::ReadOnly, 0x1234_5678, 0x1234_5678),
            (UnknownPolicy::Zero, 0, 0x1234_5678),
            (UnknownPolicy::Passthrough, 0x1234_5678, 0xcafe_f00d),
        ] {
            let (cfg, mut v) = setup(f.clone(), DevicePolicy { unknown: policy, ..DevicePolicy::default() });
            assert_eq!(v.read(&cfg, 0xc0, Width::Dword), read, "{policy:?}");
            v.write(&cfg, 0xc0, Width::Dword, 0xcafe_f00d, &mut |_| {});
            let b = cfg.bytes(at());
            assert_eq!(u32::from_le_bytes(b[0xc0..0xc4].try_into().unwrap()), hw_after, "{policy:?}");
            assert_eq!(v.counters().unknown_writes, 1);
        }
    }

    #[test]
    fn bad_accesses_and_bridges() {
        let (cfg, mut v) = setup(edu_like(), DevicePolicy::default());
        assert_eq!(v.read(&cfg, 2, Width::Dword), u32::MAX);
        assert_eq!(v.read(&cfg, 0x100, Width::Byte), 0xff, "edu has 256 bytes");
        v.write(&cfg, 0xfe, Width::Dword, 0, &mut |_| {});
        assert_eq!(v.counters().bad_accesses, 3);
        let cfg = FakeConfig::new();
        cfg.add(at(), FakeFunction::bridge(1, 2, 0, 1, 1));
        let f = probe(&cfg, at(), false, &mut Inventory::default());
        assert_eq!(VirtualConfig::new(&cfg, &f, DevicePolicy::default()).err(), Some(VConfigError::NotAnEndpoint(1)));
    }

    #[test]
    fn capability_registers_outside_their_capability_are_never_used() {
        // The reviewer's case: a 64-bit MSI at 0x40 cut short by PM at 0x48. MSI's address
        // high (0x48) and data (0x4c) registers would be PM's ID and PMCSR.
        let (cfg, mut v) = setup(packed_caps(), DevicePolicy::default());
        let chain = guest_chain(&mut v, &cfg);
        assert_eq!(chain, [(cap_id::POWER_MANAGEMENT, 0x48), (cap_id::PCI_EXPRESS, 0x50), (cap_id::VENDOR, 0x54)]);
        assert_eq!(v.read(&cfg, 0x48, Width::Byte), u32::from(cap_id::POWER_MANAGEMENT), "PM keeps its ID");
        assert_eq!(events(&mut v, &cfg, 0x4c, Width::Word, 0x0003), [ConfigEvent::PowerState(3)], "no MsiData");
        assert_eq!(v.read(&cfg, 0x40, Width::Dword), 0, "the MSI cut short is hidden");
        assert_eq!(events(&mut v, &cfg, 0x42, Width::Word, 0x0001), []);
        // PCIe at 0x50 ends at 0x54: "device control" (0x58) is the vendor capability's.
        assert_eq!(v.read(&cfg, 0x58, Width::Dword), 0xeedd_ccbb, "vendor bytes as the device has them");
        assert_eq!(events(&mut v, &cfg, 0x58, Width::Word, 0x8000), [], "no FLR from another capability's bytes");
        assert_eq!(v.read(&cfg, 0x58, Width::Dword), 0xeedd_ccbb);
        assert!(cfg.writes.borrow().is_empty());
    }

    #[test]
    fn extended_space_outside_visible_capabilities_is_hidden_by_default() {
        // 4 KiB of config space, no PCIe capability (so no extended walk), SR-IOV at 0x100.
        let mut f = edu_like();
        f.bytes.resize(4096, 0);
        f.writable.resize(4096, 0);
        f.rw1c.resize(4096, 0);
        f.ext_cap(ext_cap_id::SRIOV, 1, &[0x1f, 0, 0, 0]);
        f.writable_at(0x104, &[0xff; 4]);
        let (cfg, mut v) = setup(f.clone(), DevicePolicy::default());
        assert_eq!(v.size(), 4096);
        assert_eq!(v.read(&cfg, 0x100, Width::Dword), 0, "no SR-IOV header for the guest to find");
        assert_eq!(v.read(&cfg, 0x104, Width::Dword), 0);
        v.write(&cfg, 0x104, Width::Dword, 0xffff_ffff, &mut |_| {});
        assert_eq!(cfg.bytes(at())[0x104], 0x1f, "SR-IOV control untouched");
        assert!(cfg.writes.borrow().is_empty());
        // Gaps between visible extended capabilities too.
        let (cfg, mut v) = setup(nvme_like(), DevicePolicy::default());
        assert_eq!(v.read(&cfg, 0x400, Width::Dword), 0);
        // Only an explicit policy shows (or passes) them.
        let p = DevicePolicy { extended_unknown: UnknownPolicy::Passthrough, ..DevicePolicy::default() };
        let (cfg, mut v) = setup(f, p);
        assert_eq!(v.read(&cfg, 0x100, Width::Dword) & 0xffff, u32::from(ext_cap_id::SRIOV));
        v.write(&cfg, 0x104, Width::Byte, 0, &mut |_| {});
        assert_eq!(cfg.bytes(at())[0x104], 0);
        // The standard-space policy does not reach the extended space.
        let p = DevicePolicy { unknown: UnknownPolicy::Passthrough, ..DevicePolicy::default() };
        let (cfg, mut v) = setup(nvme_like(), p);
        v.write(&cfg, 0x400, Width::Dword, 0x1234, &mut |_| {});
        assert!(cfg.writes.borrow().is_empty());
    }

    #[test]
    fn command_bits_the_policy_keeps_virtual_are_off_in_hardware() {
        let mut f = edu_like();
        f.set16(regs::COMMAND, (Command::IO | Command::MEMORY | Command::BUS_MASTER | Command::SERR).bits());
        f.set16(regs::STATUS, 0xf900 | Status::CAP_LIST.bits());
        let cfg = FakeConfig::new();
        cfg.add(at(), f.clone());
        let func = probe(&cfg, at(), false, &mut Inventory::default());
        cfg.writes.borrow_mut().clear();
        let policy = DevicePolicy { command_passthrough: Command::MEMORY, ..DevicePolicy::default() };
        let mut v = VirtualConfig::new(&cfg, &func, policy).unwrap();
        let hw = cfg.read16(at(), regs::COMMAND);
        assert_eq!(hw & 0x7, Command::MEMORY.bits(), "bus master and I/O off: the guest sees them off");
        assert_ne!(hw & Command::SERR.bits(), 0, "bits the view does not own are left alone");
        assert_eq!(v.read(&cfg, regs::COMMAND, Width::Word) & 0x7, u32::from(Command::MEMORY.bits()));
        assert_eq!(*cfg.writes.borrow(), [(at(), regs::COMMAND, Width::Word, u32::from(hw))], "command only");
        assert_eq!(cfg.read16(at(), regs::STATUS) & 0xf900, 0xf900, "status untouched");
        assert_eq!(v.counters().hardware_writes, 1);
        // Passing everything through: nothing to change.
        cfg.add(at(), f);
        cfg.writes.borrow_mut().clear();
        VirtualConfig::new(&cfg, &func, DevicePolicy::default()).unwrap();
        assert!(cfg.writes.borrow().is_empty());
    }

    #[test]
    fn no_snoop_is_virtual_and_off_in_hardware() {
        let mut f = nvme_like();
        let pcie =
            f.bytes.iter().enumerate().skip(0x40).step_by(4).find(|(_, b)| **b == cap_id::PCI_EXPRESS).unwrap().0;
        let devctl = pcie as u16 + pcie_regs::DEVICE_CONTROL;
        // Reset value: Enable No Snoop set, with relaxed ordering and MPS.
        f.set16(devctl, 0x0830);
        let (cfg, mut v) = setup(f, DevicePolicy::default());
        assert_eq!(cfg.read16(at(), devctl), 0x0030, "off in the device, the rest kept");
        assert_eq!(v.read(&cfg, devctl, Width::Word), 0x0830, "the guest sees the device's value");
        v.write(&cfg, devctl, Width::Word, 0x0010, &mut |_| {});
        assert_eq!(v.read(&cfg, devctl, Width::Word) & 0x0800, 0);
        v.write(&cfg, devctl, Width::Word, 0x0810, &mut |_| {});
        assert_eq!(v.read(&cfg, devctl, Width::Word) & 0x0800, 0x0800, "its own value back");
        assert_eq!(cfg.read16(at(), devctl) & 0x0800, 0, "never in the device");
    }

    #[test]
    fn hardware_writes_never_cover_bytes_the_guest_cannot_write() {
        // A vendor capability of 5 bytes at 0x40: 0x45–0x47 lie outside every structure.
        let mut f = FakeFunction::new(1, 2, 0, 256);
        f.cap(cap_id::VENDOR, &[5, 0x11, 0x22]);
        f.writable_at(0x44, &[0xff; 4]);
        let p = DevicePolicy { unknown: UnknownPolicy::Passthrough, ..DevicePolicy::default() };
        let (cfg, mut v) = setup(f, p);
        v.write(&cfg, 0x44, Width::Dword, 0x5566_7788, &mut |_| {});
        let w: StdVec<(u16, Width)> = cfg.writes.borrow().iter().map(|w| (w.1, w.2)).collect();
        assert_eq!(w, [(0x45, Width::Byte), (0x46, Width::Word)], "the vendor byte at 0x44 is not rewritten");
        assert_eq!(cfg.bytes(at())[0x44..0x48], [0x22, 0x77, 0x66, 0x55]);
    }

    #[derive(Debug, Clone)]
    struct Op {
        read: bool,
        offset: u16,
        width: Width,
        value: u32,
    }

    fn op() -> impl Strategy<Value = Op> {
        (
            any::<bool>(),
            0u16..0x1000,
            prop_oneof![Just(Width::Byte), Just(Width::Word), Just(Width::Dword)],
            any::<u32>(),
            any::<bool>(),
        )
            .prop_map(|(read, off, width, value, hot)| {
                // Half the accesses aim at the header and the first capabilities.
                let offset = if hot { off % 0x120 } else { off };
                Op { read, offset: offset & !(width.bytes() - 1), width, value }
            })
    }

    fn policy() -> impl Strategy<Value = DevicePolicy> {
        (0u8..8, any::<u32>(), any::<u64>(), 0u8..3, 0u8..3, any::<bool>()).prop_map(
            |(pass, hide, hide_ext, unknown, ext_unknown, rom)| {
                let unknowns = [UnknownPolicy::ReadOnly, UnknownPolicy::Zero, UnknownPolicy::Passthrough];
                DevicePolicy {
                    command_passthrough: Command::from_bits_truncate(u16::from(pass)),
                    hide_caps: hide & 0x0002_0022,
                    hide_ext_caps: hide_ext & 0xa,
                    rom: if rom { RomPolicy::Visible } else { RomPolicy::Hidden },
                    unknown: unknowns[usize::from(unknown)],
                    extended_unknown: unknowns[usize::from(ext_unknown)],
                    intx: IntxPolicy::Expose,
                }
            },
        )
    }

    proptest! {
        /// No sequence of guest reads and writes makes a hardware write that the independent,
        /// spec-derived rules of `audit::WriteAudit` forbid (not the permission tables this
        /// code runs on): the device model is writable everywhere, every write is checked as
        /// it happens, RW1C bits the device has set stay set outside bytes the guest owns, and
        /// IDs, class, header type and BARs never change.
        #[test]
        fn guest_writes_reach_hardware_only_as_the_specs_allow(
            device in 0u8..3,
            policy in policy(),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let mut f = match device {
                0 => nvme_like(),
                1 => edu_like(),
                _ => packed_caps(),
            };
            f.rom(0xfeb0_0000, 0x4_0000);
            // Status error bits set, so accidental RW1C clears show up.
            let st = u16::from_le_bytes([f.bytes[6], f.bytes[7]]) | 0xf900;
            f.set16(regs::STATUS, st);
            let (cfg, mut v, func) = setup_with(f, policy);
            // Every bit but the RW1C ones writable: a forbidden write changes the device.
            if let Some(f) = cfg.functions.borrow_mut().get_mut(&at()) {
                let rw1c = f.rw1c.clone();
                for (w, c) in f.writable.iter_mut().zip(rw1c) { *w = !c; }
            }
            let audit = crate::audit::WriteAudit::new(&cfg, &func, &policy);
            let audited = crate::audit::Audited::new(&cfg, &audit);
            let rw1c = cfg.functions.borrow()[&at()].rw1c.clone();
            let fixed = |b: &[u8]| (b[0..4].to_vec(), b[8..0x0c].to_vec(), b[0x0e], b[0x10..0x28].to_vec(), b[0x30..0x34].to_vec());
            let original = fixed(&cfg.bytes(at()));
            for o in &ops {
                let before = cfg.bytes(at());
                if o.read {
                    let _ = v.read(&audited, o.offset, o.width);
                } else {
                    v.write(&audited, o.offset, o.width, o.value, &mut |_| {});
                }
                prop_assert_eq!(audited.violation(), None, "after {:?}", o);
                let after = cfg.bytes(at());
                for i in 0..before.len() {
                    let cleared = before[i] & !after[i] & rw1c[i];
                    prop_assert!(cleared == 0 || audit.guest_owns(i as u16), "RW1C bits {:#04x} of {:#x} cleared by {:?}", cleared, i, o);
                }
            }
            prop_assert_eq!(fixed(&cfg.bytes(at())), original);
        }
    }
}
