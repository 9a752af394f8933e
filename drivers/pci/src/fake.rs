//! A scriptable config space for tests and fuzzing. Each function has its bytes, a per-bit
//! writable mask and a per-bit write-1-to-clear mask, so BAR sizing, read-only registers and
//! RW1C status bits behave as on hardware. Every write is logged.

use crate::regs::{self, Command};
use crate::{ConfigSpace, PciAddress, Width};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::vec::Vec;

/// One function's registers.
#[derive(Clone, Debug)]
pub struct FakeFunction {
    /// Current contents.
    pub bytes: Vec<u8>,
    /// Bits a write changes.
    pub writable: Vec<u8>,
    /// Bits a 1 clears.
    pub rw1c: Vec<u8>,
    next_cap: u16,
    last_cap: Option<u16>,
    last_ext: Option<u16>,
    next_ext: u16,
}

impl FakeFunction {
    /// A type 0 function with `size` bytes of config space (256 or 4096).
    pub fn new(vendor: u16, device: u16, class: u32, size: u16) -> Self {
        let mut f = Self {
            bytes: vec![0; usize::from(size)],
            writable: vec![0; usize::from(size)],
            rw1c: vec![0; usize::from(size)],
            next_cap: 0x40,
            last_cap: None,
            last_ext: None,
            next_ext: regs::EXTENDED_CAP_START,
        };
        f.set16(regs::VENDOR_ID, vendor).set16(regs::DEVICE_ID, device);
        f.set32(regs::REVISION, class << 8 | 0x01);
        let cmd = (Command::IO
            | Command::MEMORY
            | Command::BUS_MASTER
            | Command::PARITY
            | Command::SERR
            | Command::INTX_DISABLE)
            .bits();
        f.writable_at(regs::COMMAND, &cmd.to_le_bytes());
        f.writable_at(regs::CACHE_LINE_SIZE, &[0xff, 0xff]);
        f.writable_at(regs::INTERRUPT_LINE, &[0xff]);
        f.set8(regs::INTERRUPT_PIN, 1);
        f.rw1c_at(regs::STATUS, &regs::STATUS_RW1C.to_le_bytes());
        f
    }

    /// A type 1 bridge with bus numbers.
    pub fn bridge(vendor: u16, device: u16, primary: u8, secondary: u8, subordinate: u8) -> Self {
        let mut f = Self::new(vendor, device, 0x06_04_00, 4096);
        f.set8(regs::HEADER_TYPE, regs::HEADER_TYPE_BRIDGE);
        f.set8(regs::BRIDGE_PRIMARY_BUS, primary);
        f.set8(regs::BRIDGE_SECONDARY_BUS, secondary);
        f.set8(regs::BRIDGE_SUBORDINATE_BUS, subordinate);
        f.writable_at(regs::BRIDGE_PRIMARY_BUS, &[0xff, 0xff, 0xff]);
        f
    }

    /// Sets a byte.
    pub fn set8(&mut self, off: u16, v: u8) -> &mut Self {
        self.bytes[usize::from(off)] = v;
        self
    }
    /// Sets a little-endian word.
    pub fn set16(&mut self, off: u16, v: u16) -> &mut Self {
        self.put(off, &v.to_le_bytes())
    }
    /// Sets a little-endian dword.
    pub fn set32(&mut self, off: u16, v: u32) -> &mut Self {
        self.put(off, &v.to_le_bytes())
    }
    /// Sets bytes.
    pub fn put(&mut self, off: u16, b: &[u8]) -> &mut Self {
        let o = usize::from(off);
        self.bytes[o..o + b.len()].copy_from_slice(b);
        self
    }
    /// Marks bits writable.
    pub fn writable_at(&mut self, off: u16, mask: &[u8]) -> &mut Self {
        let o = usize::from(off);
        self.writable[o..o + mask.len()].copy_from_slice(mask);
        self
    }
    /// Marks bits write-1-to-clear.
    pub fn rw1c_at(&mut self, off: u16, mask: &[u8]) -> &mut Self {
        let o = usize::from(off);
        self.rw1c[o..o + mask.len()].copy_from_slice(mask);
        self
    }

    /// A 32-bit memory BAR of `size` bytes (a power of two ≥ 16) at `address`.
    pub fn bar32(&mut self, index: u16, address: u32, size: u32, prefetchable: bool) -> &mut Self {
        let off = regs::BAR0 + 4 * index;
        let flags = if prefetchable { regs::BAR_PREFETCH } else { 0 };
        self.set32(off, (address & !(size - 1)) | flags);
        self.writable_at(off, &(!(size - 1) & !0xf).to_le_bytes())
    }

    /// A 64-bit memory BAR (two slots) of `size` bytes at `address`.
    pub fn bar64(&mut self, index: u16, address: u64, size: u64, prefetchable: bool) -> &mut Self {
        let off = regs::BAR0 + 4 * index;
        let flags = regs::BAR_MEM_TYPE_64 | if prefetchable { regs::BAR_PREFETCH } else { 0 };
        let v = (address & !(size - 1)) | u64::from(flags);
        self.set32(off, v as u32).set32(off + 4, (v >> 32) as u32);
        let mask = !(size - 1) & !0xf;
        self.writable_at(off, &(mask as u32).to_le_bytes()).writable_at(off + 4, &((mask >> 32) as u32).to_le_bytes())
    }

    /// An I/O BAR of `size` bytes at `port`.
    pub fn bar_io(&mut self, index: u16, port: u32, size: u32) -> &mut Self {
        let off = regs::BAR0 + 4 * index;
        self.set32(off, (port & !(size - 1)) | regs::BAR_IO);
        self.writable_at(off, &((!(size - 1) & !0x3) & 0xffff).to_le_bytes())
    }

    /// An expansion ROM BAR of `size` bytes.
    pub fn rom(&mut self, address: u32, size: u32) -> &mut Self {
        self.set32(regs::ROM_ADDRESS, address & !(size - 1));
        self.writable_at(regs::ROM_ADDRESS, &((!(size - 1) & regs::ROM_ADDRESS_MASK) | 1).to_le_bytes())
    }

    /// Appends a standard capability `id` with `body` (bytes after ID and next) to the chain;
    /// returns its offset.
    pub fn cap(&mut self, id: u8, body: &[u8]) -> u16 {
        let off = self.next_cap;
        self.set8(off, id);
        self.put(off + 2, body);
        match self.last_cap {
            None => {
                self.set8(regs::CAPABILITIES_POINTER, off as u8);
                let s = self.bytes[usize::from(regs::STATUS)] | regs::Status::CAP_LIST.bits() as u8;
                self.set8(regs::STATUS, s);
            }
            Some(prev) => {
                self.set8(prev + 1, off as u8);
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + 2 + body.len() as u16).next_multiple_of(4);
        off
    }

    /// Appends an extended capability; returns its offset.
    pub fn ext_cap(&mut self, id: u16, version: u8, body: &[u8]) -> u16 {
        let off = self.next_ext;
        self.set32(off, u32::from(id) | u32::from(version & 0xf) << 16);
        self.put(off + 4, body);
        if let Some(prev) = self.last_ext {
            let h =
                u32::from_le_bytes(self.bytes[usize::from(prev)..usize::from(prev) + 4].try_into().unwrap_or([0; 4]));
            self.set32(prev, (h & 0x000f_ffff) | u32::from(off) << 20);
        }
        self.last_ext = Some(off);
        self.next_ext = (off + 4 + body.len() as u16).next_multiple_of(4);
        off
    }

    /// An MSI capability (64-bit and/or per-vector masking, `mmc` = log2 of vectors).
    pub fn msi(&mut self, is_64: bool, masking: bool, mmc: u8) -> u16 {
        let control: u16 = u16::from(mmc & 7) << 1 | if is_64 { 1 << 7 } else { 0 } | if masking { 1 << 8 } else { 0 };
        let len = 10 + if is_64 { 4 } else { 0 } + if masking { 10 } else { 0 };
        let mut body = vec![0u8; len - 2];
        body[0..2].copy_from_slice(&control.to_le_bytes());
        let off = self.cap(regs::cap_id::MSI, &body);
        // Enable, MME and the message fields are writable in hardware.
        self.writable_at(off + 2, &[0x71, 0x00]);
        let data = if is_64 { 12 } else { 8 };
        self.writable_at(off + 4, &[0xfc, 0xff, 0xff, 0xff]);
        if is_64 {
            self.writable_at(off + 8, &[0xff; 4]);
        }
        self.writable_at(off + data, &[0xff, 0xff]);
        if masking {
            self.writable_at(off + data + 4, &[0xff; 4]);
        }
        off
    }

    /// An MSI-X capability with `entries` vectors, table and PBA in `bir` at the offsets.
    pub fn msix(&mut self, entries: u16, bir: u8, table: u32, pba: u32) -> u16 {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(entries - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table | u32::from(bir)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba | u32::from(bir)).to_le_bytes());
        let off = self.cap(regs::cap_id::MSIX, &body);
        self.writable_at(off + 3, &[0xc0]);
        off
    }

    /// A PCI Express capability (version 2, endpoint).
    pub fn pcie(&mut self) -> u16 {
        let mut body = [0u8; 0x3c - 2];
        body[0..2].copy_from_slice(&0x0002u16.to_le_bytes());
        let off = self.cap(regs::cap_id::PCI_EXPRESS, &body);
        self.writable_at(off + 8, &[0xff, 0xff]); // device control
        self.rw1c_at(off + 0xa, &[0x0f]); // device status error bits
        self.writable_at(off + 0x10, &[0xff, 0x0f]); // link control (hardware allows it)
        self.rw1c_at(off + 0x13, &[0xc0]); // link status
        self.writable_at(off + 0x28, &[0xff, 0xff]); // device control 2
        off
    }

    /// A power-management capability.
    pub fn pm(&mut self) -> u16 {
        let off = self.cap(regs::cap_id::POWER_MANAGEMENT, &[0x03, 0x00, 0x08, 0x00, 0x00, 0x00]);
        self.writable_at(off + 4, &[0x03, 0x01]);
        self.rw1c_at(off + 5, &[0x80]);
        off
    }
}

/// Functions by address.
#[derive(Debug, Default)]
pub struct FakeConfig {
    /// The functions.
    pub functions: RefCell<BTreeMap<PciAddress, FakeFunction>>,
    /// Every write: (address, offset, width, value).
    pub writes: RefCell<Vec<(PciAddress, u16, Width, u32)>>,
    /// Config size for functions reached through "legacy" access.
    pub legacy_only: bool,
}

impl FakeConfig {
    /// No functions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a function.
    pub fn add(&self, addr: PciAddress, f: FakeFunction) -> &Self {
        self.functions.borrow_mut().insert(addr, f);
        self
    }

    /// A copy of a function's bytes.
    pub fn bytes(&self, addr: PciAddress) -> Vec<u8> {
        self.functions.borrow().get(&addr).map(|f| f.bytes.clone()).unwrap_or_default()
    }
}

impl ConfigSpace for FakeConfig {
    fn read(&self, addr: PciAddress, offset: u16, width: Width) -> u32 {
        let fns = self.functions.borrow();
        let Some(f) = fns.get(&addr) else { return width.ones() };
        let o = usize::from(offset);
        let n = usize::from(width.bytes());
        if o + n > f.bytes.len() {
            return width.ones();
        }
        let mut v = 0u32;
        for i in 0..n {
            v |= u32::from(f.bytes[o + i]) << (8 * i);
        }
        v
    }

    fn write(&self, addr: PciAddress, offset: u16, width: Width, value: u32) {
        self.writes.borrow_mut().push((addr, offset, width, value));
        let mut fns = self.functions.borrow_mut();
        let Some(f) = fns.get_mut(&addr) else { return };
        let o = usize::from(offset);
        let n = usize::from(width.bytes());
        if o + n > f.bytes.len() {
            return;
        }
        for i in 0..n {
            let v = (value >> (8 * i)) as u8;
            let (w, c) = (f.writable[o + i], f.rw1c[o + i]);
            let old = f.bytes[o + i];
            f.bytes[o + i] = ((old & !w) | (v & w)) & !(v & c);
        }
    }

    fn size(&self, addr: PciAddress) -> u16 {
        if self.legacy_only {
            return crate::CONFIG_SIZE;
        }
        self.functions.borrow().get(&addr).map_or(crate::CONFIG_SIZE, |f| f.bytes.len() as u16)
    }
}

/// An nvme-like function: 64-bit BAR0 of 16 KiB, PM, MSI-X (65 entries, table at 0x2000,
/// PBA at 0x3000), PCIe, an AER and a DSN extended capability.
pub fn nvme_like() -> FakeFunction {
    let mut f = FakeFunction::new(0x1b36, 0x0010, 0x01_08_02, 4096);
    f.bar64(0, 0xfebf_0000, 0x4000, false);
    f.pm();
    f.msix(65, 0, 0x2000, 0x3000);
    f.pcie();
    f.ext_cap(regs::ext_cap_id::AER, 2, &[0u8; 0x44]);
    f.rw1c_at(0x104, &[0xff; 4]);
    f.ext_cap(regs::ext_cap_id::DSN, 1, &[1, 2, 3, 4, 5, 6, 7, 8]);
    f
}

/// An edu-like function: 32-bit BAR0 of 1 MiB, one 64-bit MSI vector, 256-byte config space.
pub fn edu_like() -> FakeFunction {
    let mut f = FakeFunction::new(0x1234, 0x11e8, 0x00_ff_00, 256);
    f.bar32(0, 0xfea0_0000, 0x10_0000, false);
    f.msi(true, false, 0);
    f
}
