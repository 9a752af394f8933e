//! Xen PVH direct boot (xen/include/public/arch-x86/hvm/start_info.h): the ELF note that makes
//! QEMU's `-kernel` enter us in 32-bit protected mode with `%ebx` = `hvm_start_info`, and the
//! parser that turns `hvm_start_info` into a [`BootRecord`].

use crate::record::{BootError, BootRecord, CMDLINE_MAX, MAX_MODULES, Module, Protocol};
use conduit_mem::map::{MAX_RAW_REGIONS, MemoryKind, RawRegion};
use conduit_mem::{PhysRange, PhysRead};
use heapless::{String, Vec};

/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Size of `hvm_start_info` version 1.
pub const START_INFO_LEN: u64 = 56;
/// Size of one `hvm_memmap_table_entry`.
pub const MEMMAP_ENTRY_LEN: u64 = 24;
/// Size of one `hvm_modlist_entry`.
pub const MODLIST_ENTRY_LEN: u64 = 32;
/// ELF note type XEN_ELFNOTE_PHYS32_ENTRY.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// `hvm_start_info` field offsets.
mod off {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const NR_MODULES: u64 = 12;
    pub const MODLIST_PADDR: u64 = 16;
    pub const CMDLINE_PADDR: u64 = 24;
    pub const RSDP_PADDR: u64 = 32;
    pub const MEMMAP_PADDR: u64 = 40;
    pub const MEMMAP_ENTRIES: u64 = 48;
}

/// Reads a NUL-terminated string of at most `N` bytes at `paddr` (0 = none).
fn read_cstr<const N: usize>(mem: &impl PhysRead, paddr: u64) -> Result<(String<N>, u64), BootError> {
    let mut s: Vec<u8, N> = Vec::new();
    if paddr == 0 {
        return Ok((String::new(), 0));
    }
    let mut chunk = [0u8; 64];
    loop {
        let at = paddr.checked_add(s.len() as u64).ok_or(BootError::Unreadable(paddr))?;
        // A string may end right before unreadable memory: fall back to byte reads.
        let n = if mem.read_bytes(at, &mut chunk).is_ok() {
            chunk.len()
        } else {
            chunk[0] = mem.read_u8(at).map_err(|_| BootError::Unreadable(at))?;
            1
        };
        for &b in &chunk[..n] {
            if b == 0 {
                let len = s.len() as u64 + 1;
                let text = String::from_utf8(s).map_err(|_| BootError::BadCmdline)?;
                return Ok((text, len));
            }
            s.push(b).map_err(|_| BootError::BadCmdline)?;
        }
    }
}

/// Builds the boot record from the `hvm_start_info` at `start_info`.
pub fn parse(mem: &impl PhysRead, start_info: u64) -> Result<BootRecord, BootError> {
    let rd32 = |o: u64| mem.read_u32(start_info + o).map_err(|_| BootError::Unreadable(start_info + o));
    let rd64 = |o: u64| mem.read_u64(start_info + o).map_err(|_| BootError::Unreadable(start_info + o));
    let magic = rd32(off::MAGIC)?;
    if magic != START_INFO_MAGIC {
        return Err(BootError::BadMagic(magic));
    }
    let version = rd32(off::VERSION)?;
    if version < 1 {
        return Err(BootError::UnsupportedVersion(version));
    }
    let mut boot_data: Vec<PhysRange, 8> = Vec::new();
    let _ = boot_data.push(PhysRange::new(start_info, start_info + START_INFO_LEN));

    let memmap = rd64(off::MEMMAP_PADDR)?;
    let entries = rd32(off::MEMMAP_ENTRIES)?;
    if memmap == 0 || entries == 0 {
        return Err(BootError::NoMemoryMap);
    }
    if entries as usize > MAX_RAW_REGIONS {
        return Err(BootError::TooManyRegions(entries));
    }
    let mut memory_map: Vec<RawRegion, MAX_RAW_REGIONS> = Vec::new();
    let memmap_end = u64::from(entries)
        .checked_mul(MEMMAP_ENTRY_LEN)
        .and_then(|l| memmap.checked_add(l))
        .ok_or(BootError::Unreadable(memmap))?;
    for i in 0..u64::from(entries) {
        let e = memmap + i * MEMMAP_ENTRY_LEN;
        let unreadable = |_| BootError::Unreadable(e);
        let base = mem.read_u64(e).map_err(unreadable)?;
        let len = mem.read_u64(e + 8).map_err(unreadable)?;
        let kind = mem.read_u32(e + 16).map_err(unreadable)?;
        let _ = memory_map.push(RawRegion { base, len, kind: MemoryKind::from_e820(kind) });
    }
    let _ = boot_data.push(PhysRange::new(memmap, memmap_end));

    let cmdline_paddr = rd64(off::CMDLINE_PADDR)?;
    let (cmdline, cmdline_len) = read_cstr::<CMDLINE_MAX>(mem, cmdline_paddr)?;
    if cmdline_len > 0 {
        let _ = boot_data.push(PhysRange::from_base_len(cmdline_paddr, cmdline_len).0);
    }

    let rsdp = rd64(off::RSDP_PADDR)?;
    let nr_modules = rd32(off::NR_MODULES)?;
    if nr_modules as usize > MAX_MODULES {
        return Err(BootError::TooManyModules(nr_modules));
    }
    let mut modules: Vec<Module, MAX_MODULES> = Vec::new();
    if nr_modules > 0 {
        let list = rd64(off::MODLIST_PADDR)?;
        let list_end = u64::from(nr_modules)
            .checked_mul(MODLIST_ENTRY_LEN)
            .and_then(|l| list.checked_add(l))
            .ok_or(BootError::Unreadable(list))?;
        for i in 0..u64::from(nr_modules) {
            let e = list + i * MODLIST_ENTRY_LEN;
            let unreadable = |_| BootError::Unreadable(e);
            let paddr = mem.read_u64(e).map_err(unreadable)?;
            let size = mem.read_u64(e + 8).map_err(unreadable)?;
            let cmd = mem.read_u64(e + 16).map_err(unreadable)?;
            // A module command line that does not fit is dropped, not fatal.
            let cmdline = read_cstr(mem, cmd).map(|(s, _)| s).unwrap_or_default();
            let _ = modules.push(Module { range: PhysRange::from_base_len(paddr, size).0, cmdline });
        }
        let _ = boot_data.push(PhysRange::new(list, list_end));
    }

    Ok(BootRecord {
        protocol: Protocol::Pvh,
        memory_map,
        cmdline,
        rsdp_paddr: (rsdp != 0).then_some(rsdp),
        modules,
        boot_data,
    })
}

#[cfg(target_os = "none")]
core::arch::global_asm!(
    r#"
    /* The PVH note (ELF note in a PT_NOTE segment, 4-byte aligned): name "Xen",
       type XEN_ELFNOTE_PHYS32_ENTRY, an 8-byte physical entry address. */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long {note_type}
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4
    .popsection

    .pushsection .text.boot, "ax", @progbits
    .code32
    .global pvh_start32
pvh_start32:
    /* 32-bit protected mode, paging off, %ebx = hvm_start_info. */
    mov edi, {protocol_pvh}
    mov esi, ebx
    jmp common_start32
    .code64
    .popsection
    "#,
    note_type = const XEN_ELFNOTE_PHYS32_ENTRY,
    protocol_pvh = const crate::entry::PROTOCOL_PVH,
);

#[cfg(test)]
mod tests {
    use super::*;
    use conduit_mem::phys::FakePhys;

    /// A start_info as QEMU builds it: version 1, cmdline, RSDP, 3-entry memory map.
    fn qemu_start_info(mem: &mut FakePhys, cmdline: &[u8]) {
        let mut si = std::vec![0u8; START_INFO_LEN as usize];
        si[0..4].copy_from_slice(&START_INFO_MAGIC.to_le_bytes());
        si[4..8].copy_from_slice(&1u32.to_le_bytes());
        si[24..32].copy_from_slice(&0x7000u64.to_le_bytes());
        si[32..40].copy_from_slice(&0xf52a0u64.to_le_bytes());
        si[40..48].copy_from_slice(&0x6000u64.to_le_bytes());
        si[48..52].copy_from_slice(&3u32.to_le_bytes());
        mem.place(0x5000, &si);
        let mut mm = std::vec::Vec::new();
        for (b, l, t) in [(0u64, 0x9fc00u64, 1u32), (0x9fc00, 0x400, 2), (0x10_0000, 0x1ff0_0000, 1)] {
            mm.extend_from_slice(&b.to_le_bytes());
            mm.extend_from_slice(&l.to_le_bytes());
            mm.extend_from_slice(&t.to_le_bytes());
            mm.extend_from_slice(&0u32.to_le_bytes());
        }
        mem.place(0x6000, &mm);
        mem.place(0x7000, cmdline);
    }

    #[test]
    fn parses_what_qemu_gives() {
        let mut m = FakePhys::new();
        qemu_start_info(&mut m, b"conduit.scenario=boot_smoke\0garbage");
        let r = parse(&m, 0x5000).unwrap();
        assert_eq!(r.protocol, Protocol::Pvh);
        assert_eq!(r.cmdline.as_str(), "conduit.scenario=boot_smoke");
        assert_eq!(r.rsdp_paddr, Some(0xf52a0));
        assert_eq!(r.memory_map.len(), 3);
        assert_eq!(r.memory_map[2], RawRegion { base: 0x10_0000, len: 0x1ff0_0000, kind: MemoryKind::Usable });
        assert_eq!(
            r.boot_data.as_slice(),
            &[PhysRange::new(0x5000, 0x5038), PhysRange::new(0x6000, 0x6048), PhysRange::new(0x7000, 0x701c)]
        );
        assert!(r.modules.is_empty());
    }

    #[test]
    fn rejects_bad_input_with_errors() {
        let mut m = FakePhys::new();
        qemu_start_info(&mut m, b"ok\0");
        let mut si = std::vec![0u8; 56];
        si[0..4].copy_from_slice(&0xdeadu32.to_le_bytes());
        let mut bad = m.clone();
        bad.place(0x5000, &si);
        assert_eq!(parse(&bad, 0x5000), Err(BootError::BadMagic(0xdead)));
        si[0..4].copy_from_slice(&START_INFO_MAGIC.to_le_bytes());
        bad.place(0x5000, &si);
        assert_eq!(parse(&bad, 0x5000), Err(BootError::UnsupportedVersion(0)));
        si[4] = 1;
        bad.place(0x5000, &si);
        assert_eq!(parse(&bad, 0x5000), Err(BootError::NoMemoryMap));
        si[40..48].copy_from_slice(&0x6000u64.to_le_bytes());
        si[48..52].copy_from_slice(&500u32.to_le_bytes());
        bad.place(0x5000, &si);
        assert_eq!(parse(&bad, 0x5000), Err(BootError::TooManyRegions(500)));
        assert_eq!(parse(&m, 0x9999), Err(BootError::Unreadable(0x9999)));
        // A command line without a terminator inside the limit.
        let mut long = m.clone();
        long.place(0x7000, &[b'a'; CMDLINE_MAX + 10]);
        assert_eq!(parse(&long, 0x5000), Err(BootError::BadCmdline));
        // A command line running into unreadable memory.
        let mut cut = m.clone();
        cut.place(0x7000, b"abc");
        assert_eq!(parse(&cut, 0x5000), Err(BootError::Unreadable(0x7003)));
    }

    #[test]
    fn modules_are_recorded() {
        let mut m = FakePhys::new();
        qemu_start_info(&mut m, b"\0");
        let mut si = std::vec![0u8; 56];
        m.read_bytes(0x5000, &mut si).unwrap();
        si[12..16].copy_from_slice(&1u32.to_le_bytes());
        si[16..24].copy_from_slice(&0x8000u64.to_le_bytes());
        m.place(0x5000, &si);
        let mut ml = std::vec![0u8; 32];
        ml[0..8].copy_from_slice(&0x200_0000u64.to_le_bytes());
        ml[8..16].copy_from_slice(&0x1234u64.to_le_bytes());
        ml[16..24].copy_from_slice(&0x9000u64.to_le_bytes());
        m.place(0x8000, &ml);
        m.place(0x9000, b"guest=hello\0");
        let r = parse(&m, 0x5000).unwrap();
        assert_eq!(r.modules[0].range, PhysRange::new(0x200_0000, 0x200_1234));
        assert_eq!(r.modules[0].cmdline.as_str(), "guest=hello");
        assert_eq!(r.cmdline.as_str(), "");
    }

    proptest::proptest! {
        /// Arbitrary bytes where start_info and its tables live never panic the parser.
        #[test]
        fn arbitrary_start_info_never_panics(si in proptest::collection::vec(proptest::prelude::any::<u8>(), 56), tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut m = FakePhys::new();
            let mut si = si;
            si[0..4].copy_from_slice(&START_INFO_MAGIC.to_le_bytes());
            m.place(0x5000, &si);
            m.place(0x6000, &tail);
            let _ = parse(&m, 0x5000);
        }
    }
}
