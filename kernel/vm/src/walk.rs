//! Guest-virtual to guest-physical translation by walking the guest's own page tables (read
//! through the environment), and instruction fetch at the guest's RIP: without decode assists
//! the hypervisor must read the faulting instruction itself to emulate an MMIO access.

use crate::vmcb::SaveArea;

/// Longest x86 instruction.
pub const MAX_INSTRUCTION: usize = 15;

const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1 << 0;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum WalkError {
    /// A table entry on the way is not present (the guest would take #PF).
    NotPresent(u64),
    /// A table lies outside guest memory.
    TableOutsideMemory(u64),
    /// A paging mode other than long mode (4- or 5-level) or no paging.
    UnsupportedMode,
    /// A reserved combination (a large page at the top level).
    Reserved(u64),
}

/// Reads guest-physical memory.
pub trait GuestRead {
    /// Fills `buf` from guest-physical `gpa`; false when any byte is outside guest RAM.
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> bool;
    /// The little-endian u64 at 8-aligned guest-physical `gpa` (a page-table entry); `None`
    /// outside guest RAM. Environments with a faster single-word read override it.
    fn read_u64(&mut self, gpa: u64) -> Option<u64> {
        let mut raw = [0u8; 8];
        self.read(gpa, &mut raw).then(|| u64::from_le_bytes(raw))
    }
}

/// Translates `gva` with the paging state in `save`.
pub fn translate(save: &SaveArea, gva: u64, mem: &mut impl GuestRead) -> Result<u64, WalkError> {
    if save.cr0 & CR0_PG == 0 {
        return Ok(gva & 0xffff_ffff);
    }
    if save.efer & EFER_LMA == 0 || save.cr4 & CR4_PAE == 0 {
        return Err(WalkError::UnsupportedMode);
    }
    let levels: u32 = if save.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let mut table = save.cr3 & ADDR;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (gva >> shift) & 0x1ff;
        let at = table + index * 8;
        let Some(entry) = mem.read_u64(at) else {
            return Err(WalkError::TableOutsideMemory(at));
        };
        if entry & PRESENT == 0 {
            return Err(WalkError::NotPresent(gva));
        }
        if level == 1 {
            return Ok((entry & ADDR) | (gva & 0xfff));
        }
        if entry & PAGE_SIZE_BIT != 0 {
            if level > 3 {
                return Err(WalkError::Reserved(entry));
            }
            let offset_mask = (1u64 << shift) - 1;
            return Ok((entry & ADDR & !offset_mask) | (gva & offset_mask));
        }
        table = entry & ADDR;
    }
    Err(WalkError::UnsupportedMode)
}

/// Fetches up to 15 instruction bytes at the guest's RIP (CS base is 0 in 64-bit mode),
/// crossing into the next page when the instruction does. Returns the bytes read; fewer than
/// 15 when the next page is not mapped (the decoder reports a truncated instruction if it
/// needed them).
pub fn fetch(save: &SaveArea, mem: &mut impl GuestRead) -> Result<([u8; MAX_INSTRUCTION], usize), WalkError> {
    let mut bytes = [0u8; MAX_INSTRUCTION];
    let rip = save.rip;
    let first = ((0x1000 - (rip & 0xfff)) as usize).min(MAX_INSTRUCTION);
    let gpa = translate(save, rip, mem)?;
    if !mem.read(gpa, &mut bytes[..first]) {
        return Err(WalkError::TableOutsideMemory(gpa));
    }
    if first == MAX_INSTRUCTION {
        return Ok((bytes, first));
    }
    let next = rip.wrapping_add(first as u64);
    match translate(save, next, mem) {
        Ok(gpa2) if mem.read(gpa2, &mut bytes[first..]) => Ok((bytes, MAX_INSTRUCTION)),
        _ => Ok((bytes, first)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vmcb::Vmcb;

    /// Guest memory for tests (zero-filled; `vec![0; n]` is a lazily zeroed allocation).
    #[derive(Default)]
    pub struct FakeMemory {
        pub bytes: Vec<u8>,
        pub size: u64,
    }

    impl FakeMemory {
        pub fn new(size: u64) -> Self {
            Self { bytes: vec![0; size as usize], size }
        }
        pub fn put(&mut self, gpa: u64, data: &[u8]) {
            self.bytes[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
        }
        pub fn put_u64(&mut self, gpa: u64, v: u64) {
            self.put(gpa, &v.to_le_bytes());
        }
    }

    impl GuestRead for FakeMemory {
        fn read(&mut self, gpa: u64, buf: &mut [u8]) -> bool {
            if gpa.checked_add(buf.len() as u64).is_none_or(|e| e > self.size) {
                return false;
            }
            buf.copy_from_slice(&self.bytes[gpa as usize..gpa as usize + buf.len()]);
            true
        }
    }

    fn long_mode(cr3: u64) -> Vmcb {
        let mut v = Vmcb::zeroed();
        v.save.cr0 = 0x8001_0033;
        v.save.cr4 = CR4_PAE;
        v.save.efer = EFER_LMA | 1 << 8;
        v.save.cr3 = cr3;
        v
    }

    #[test]
    fn four_level_with_large_and_small_pages() {
        let mut m = FakeMemory::new(0x100_0000);
        // PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000: entry 0 a 2 MiB page at 0x40_0000; entry 1
        // a table 0x4000 whose entry 5 maps 0x9000.
        m.put_u64(0x1000, 0x2000 | 3);
        m.put_u64(0x2000, 0x3000 | 3);
        m.put_u64(0x3000, 0x40_0000 | 0x83);
        m.put_u64(0x3008, 0x4000 | 3);
        m.put_u64(0x4000 + 5 * 8, 0x9000 | 3);
        let v = long_mode(0x1000);
        assert_eq!(translate(&v.save, 0x1234, &mut m), Ok(0x40_1234));
        assert_eq!(translate(&v.save, 0x20_5abc, &mut m), Ok(0x9abc));
        assert_eq!(translate(&v.save, 0x20_6000, &mut m), Err(WalkError::NotPresent(0x20_6000)));
        assert_eq!(translate(&v.save, 0x8000_0000, &mut m), Err(WalkError::NotPresent(0x8000_0000)));
    }

    #[test]
    fn tables_outside_memory_and_modes() {
        let mut m = FakeMemory::new(0x10_0000);
        let v = long_mode(0x20_0000);
        assert_eq!(translate(&v.save, 0, &mut m), Err(WalkError::TableOutsideMemory(0x20_0000)));
        let mut flat = Vmcb::zeroed();
        flat.save.cr0 = 0x11;
        assert_eq!(translate(&flat.save, 0x1234, &mut m), Ok(0x1234));
        flat.save.cr0 |= CR0_PG;
        assert_eq!(translate(&flat.save, 0x1234, &mut m), Err(WalkError::UnsupportedMode));
    }

    #[test]
    fn fetch_across_a_page() {
        let mut m = FakeMemory::new(0x100_0000);
        m.put_u64(0x1000, 0x2000 | 3);
        m.put_u64(0x2000, 0x3000 | 3);
        m.put_u64(0x3000, 0x4000 | 3);
        // Virtual page 0x5000 -> 0x8000, page 0x6000 -> 0xa000 (not adjacent).
        m.put_u64(0x4000 + 5 * 8, 0x8000 | 3);
        m.put_u64(0x4000 + 6 * 8, 0xa000 | 3);
        m.put(0x8ffd, &[0x8b, 0x04, 0x25]);
        m.put(0xa000, &[0x00, 0x00, 0xe0, 0xfe]);
        let mut v = long_mode(0x1000);
        v.save.rip = 0x5ffd;
        let (bytes, n) = fetch(&v.save, &mut m).unwrap();
        assert_eq!(n, 15);
        assert_eq!(&bytes[..7], &[0x8b, 0x04, 0x25, 0x00, 0x00, 0xe0, 0xfe]);
        // Next page unmapped: only the first part.
        m.put_u64(0x4000 + 6 * 8, 0);
        let (_, n) = fetch(&v.save, &mut m).unwrap();
        assert_eq!(n, 3);
    }
}
