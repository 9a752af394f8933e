//! Guest images: static 64-bit little-endian x86-64 ELF executables (System V gABI, "ELF-64
//! Object File Format" 1.5). [`parse`] checks the header and the loadable segments, [`plan`]
//! places them in a guest of a given size (see `conduit_abi::layout`), and [`load`] copies
//! them into guest memory through the caller's writers. The guest runs identity-mapped, so a
//! segment goes to its physical address `p_paddr`, which must equal its `p_vaddr`.

use bitflags::bitflags;
use conduit_abi::layout::{IMAGE_START, STACK_BYTES};
use core::fmt;

/// Most loadable segments an image may have.
pub const MAX_SEGMENTS: usize = 8;
/// Guest page size: `LoadPlan::image_end` is rounded up to it.
pub const PAGE_BYTES: u64 = 0x1000;

/// `e_ident[EI_MAG0..=EI_MAG3]`.
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// `e_ident[EI_CLASS]`: 64-bit objects.
const ELFCLASS64: u8 = 2;
/// `e_ident[EI_DATA]`: little-endian.
const ELFDATA2LSB: u8 = 1;
/// `e_ident[EI_VERSION]` and `e_version`: the current version.
const EV_CURRENT: u8 = 1;
/// `e_type`: executable file.
pub const ET_EXEC: u16 = 2;
/// `e_machine`: AMD x86-64.
pub const EM_X86_64: u16 = 62;
/// Size of the ELF-64 file header.
const EHDR_BYTES: usize = 64;
/// Size of an ELF-64 program header (`e_phentsize`).
pub const PHDR_BYTES: u16 = 56;
/// `p_type`: loadable segment.
const PT_LOAD: u32 = 1;
/// `p_type`: dynamic linking information.
const PT_DYNAMIC: u32 = 2;
/// `p_type`: program interpreter.
const PT_INTERP: u32 = 3;

// ELF-64 header field offsets.
const E_IDENT_CLASS: usize = 4;
const E_IDENT_DATA: usize = 5;
const E_IDENT_VERSION: usize = 6;
const E_TYPE: usize = 16;
const E_MACHINE: usize = 18;
const E_VERSION: usize = 20;
const E_ENTRY: usize = 24;
const E_PHOFF: usize = 32;
const E_PHENTSIZE: usize = 54;
const E_PHNUM: usize = 56;

// ELF-64 program header field offsets.
const P_TYPE: usize = 0;
const P_FLAGS: usize = 4;
const P_OFFSET: usize = 8;
const P_VADDR: usize = 16;
const P_PADDR: usize = 24;
const P_FILESZ: usize = 32;
const P_MEMSZ: usize = 40;

bitflags! {
    /// Segment permissions (`p_flags`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SegmentFlags: u32 {
        /// Executable (`PF_X`).
        const X = 1 << 0;
        /// Writable (`PF_W`).
        const W = 1 << 1;
        /// Readable (`PF_R`).
        const R = 1 << 2;
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for SegmentFlags {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(
            f,
            "{=str}{=str}{=str}",
            if self.contains(Self::R) { "r" } else { "-" },
            if self.contains(Self::W) { "w" } else { "-" },
            if self.contains(Self::X) { "x" } else { "-" }
        );
    }
}

/// A loadable segment: `file_bytes` bytes from the file at `file_offset` go to guest-physical
/// `paddr`, the rest up to `mem_bytes` is zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Segment {
    /// Guest-physical address (`p_paddr`; the guest is identity-mapped).
    pub paddr: u64,
    /// Offset of the initialized bytes in the file.
    pub file_offset: u64,
    /// Initialized bytes (`p_filesz`).
    pub file_bytes: u64,
    /// Bytes in memory (`p_memsz`), at least `file_bytes`.
    pub mem_bytes: u64,
    /// Permissions.
    pub flags: SegmentFlags,
}

impl Segment {
    /// End of the segment in guest memory (checked by [`parse`] not to overflow).
    pub fn end(&self) -> u64 {
        self.paddr.saturating_add(self.mem_bytes)
    }

    /// Whether `gpa` lies in the segment.
    pub fn contains(&self, gpa: u64) -> bool {
        self.paddr <= gpa && gpa < self.end()
    }
}

/// A checked guest image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    /// Entry point (`e_entry`).
    pub entry: u64,
    /// Loadable segments with `mem_bytes > 0`, in program-header order; disjoint.
    pub segments: heapless::Vec<Segment, MAX_SEGMENTS>,
}

#[cfg(feature = "defmt")]
impl defmt::Format for ElfImage {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "ElfImage {{ entry: {=u64:#x}, segments: {=[?]} }}", self.entry, self.segments.as_slice());
    }
}

/// Where a planned image sits in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LoadPlan {
    /// Entry point.
    pub entry: u64,
    /// End of the highest segment, rounded up to 4 KiB: guest memory is free from here.
    pub image_end: u64,
    /// Start of the vCPU stacks (`memory_bytes - vcpus * STACK_BYTES`): free memory ends here.
    pub stacks_start: u64,
}

/// Why an image was rejected. Indices `i`, `j` from [`parse`] number program headers (as
/// `readelf -l` does); indices from [`plan`] number `ElfImage::segments`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ElfError {
    /// The file does not start with `\x7fELF`.
    BadMagic,
    /// Not a 64-bit object (`EI_CLASS`).
    NotElf64,
    /// Not little-endian (`EI_DATA`).
    NotLittleEndian,
    /// `EI_VERSION` or `e_version` is not 1.
    BadVersion,
    /// `e_machine` is not x86-64 (the value found).
    WrongMachine(u16),
    /// `e_type` is not `ET_EXEC` (the value found; 3 is a position-independent executable).
    NotExecutable(u16),
    /// `e_phentsize` is not 56 (the value found).
    BadPhentsize(u16),
    /// The file ends inside the ELF header.
    Truncated,
    /// The program header table does not lie inside the file.
    ProgramHeadersOutOfFile,
    /// Program header `i`'s file range is not inside the file.
    SegmentOutOfFile(usize),
    /// Program header `i` has more file bytes than memory bytes.
    FileLargerThanMemory(usize),
    /// Program header `i` has `p_vaddr != p_paddr` (the guest runs identity-mapped).
    VirtualNotPhysical(usize),
    /// Program header `i`'s memory range wraps around the address space.
    Overflow(usize),
    /// Program headers `i` (earlier) and `j` overlap in memory.
    SegmentOverlap(usize, usize),
    /// More than [`MAX_SEGMENTS`] loadable segments.
    TooManySegments,
    /// The image asks for an interpreter or dynamic linking: guests must be static.
    Dynamic,
    /// Segment `i` starts below `IMAGE_START`.
    BelowImageStart(usize),
    /// Segment `i` ends above the memory left under the vCPU stacks.
    AboveMemory(usize),
    /// The stacks of all vCPUs do not fit in the guest's memory.
    NoRoomForStacks,
    /// The entry point (given) is not inside an executable segment.
    EntryNotExecutable(u64),
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadMagic => write!(f, "not an ELF file"),
            Self::NotElf64 => write!(f, "not a 64-bit ELF file"),
            Self::NotLittleEndian => write!(f, "not a little-endian ELF file"),
            Self::BadVersion => write!(f, "unknown ELF version"),
            Self::WrongMachine(m) => write!(f, "machine {m} is not x86-64 ({EM_X86_64})"),
            Self::NotExecutable(t) => write!(f, "type {t} is not a static executable (ET_EXEC)"),
            Self::BadPhentsize(n) => write!(f, "program header size {n}, expected {PHDR_BYTES}"),
            Self::Truncated => write!(f, "file truncated inside the ELF header"),
            Self::ProgramHeadersOutOfFile => write!(f, "program header table outside the file"),
            Self::SegmentOutOfFile(i) => write!(f, "program header {i}: file bytes outside the file"),
            Self::FileLargerThanMemory(i) => write!(f, "program header {i}: file size larger than memory size"),
            Self::VirtualNotPhysical(i) => write!(f, "program header {i}: virtual and physical addresses differ"),
            Self::Overflow(i) => write!(f, "program header {i}: address range overflows"),
            Self::SegmentOverlap(i, j) => write!(f, "program headers {i} and {j} overlap"),
            Self::TooManySegments => write!(f, "more than {MAX_SEGMENTS} loadable segments"),
            Self::Dynamic => write!(f, "dynamically linked (the guest must be static)"),
            Self::BelowImageStart(i) => write!(f, "segment {i} starts below {IMAGE_START:#x}"),
            Self::AboveMemory(i) => write!(f, "segment {i} does not fit below the vCPU stacks"),
            Self::NoRoomForStacks => write!(f, "vCPU stacks do not fit in the guest's memory"),
            Self::EntryNotExecutable(e) => write!(f, "entry point {e:#x} is not in an executable segment"),
        }
    }
}

/// Why [`load`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LoadError<E> {
    /// The bytes do not hold the image's segments (they are not the bytes it was parsed from).
    Image(ElfError),
    /// The caller's writer failed.
    Memory(E),
}

impl<E> From<ElfError> for LoadError<E> {
    fn from(e: ElfError) -> Self {
        Self::Image(e)
    }
}

/// Parses and checks a guest image: a 64-bit little-endian x86-64 `ET_EXEC` of ELF version 1,
/// whose program header table (entries of 56 bytes) lies in the file. Keeps the `PT_LOAD`
/// segments with a non-zero memory size, each with its file bytes inside the file, no more
/// file than memory bytes, `p_vaddr == p_paddr`, no wrap-around, and none overlapping another;
/// ignores other segment types except `PT_INTERP` and `PT_DYNAMIC`, which are rejected.
/// Section headers are not read.
pub fn parse(bytes: &[u8]) -> Result<ElfImage, ElfError> {
    let header = bytes.get(..EHDR_BYTES);
    if bytes.get(..4) != Some(&ELF_MAGIC[..]) {
        return Err(ElfError::BadMagic);
    }
    let header = header.ok_or(ElfError::Truncated)?;
    let ident = |at: usize| header.get(at).copied().ok_or(ElfError::Truncated);
    if ident(E_IDENT_CLASS)? != ELFCLASS64 {
        return Err(ElfError::NotElf64);
    }
    if ident(E_IDENT_DATA)? != ELFDATA2LSB {
        return Err(ElfError::NotLittleEndian);
    }
    if ident(E_IDENT_VERSION)? != EV_CURRENT || read_u32(header, E_VERSION) != Some(u32::from(EV_CURRENT)) {
        return Err(ElfError::BadVersion);
    }
    let machine = read_u16(header, E_MACHINE).ok_or(ElfError::Truncated)?;
    if machine != EM_X86_64 {
        return Err(ElfError::WrongMachine(machine));
    }
    let kind = read_u16(header, E_TYPE).ok_or(ElfError::Truncated)?;
    if kind != ET_EXEC {
        return Err(ElfError::NotExecutable(kind));
    }
    let phentsize = read_u16(header, E_PHENTSIZE).ok_or(ElfError::Truncated)?;
    if phentsize != PHDR_BYTES {
        return Err(ElfError::BadPhentsize(phentsize));
    }
    let entry = read_u64(header, E_ENTRY).ok_or(ElfError::Truncated)?;
    let phoff = read_u64(header, E_PHOFF).ok_or(ElfError::Truncated)?;
    let phnum = read_u16(header, E_PHNUM).ok_or(ElfError::Truncated)?;
    let table = usize::try_from(phoff)
        .ok()
        .and_then(|start| Some((start, start.checked_add(usize::from(phnum).checked_mul(usize::from(PHDR_BYTES))?)?)))
        .and_then(|(start, end)| bytes.get(start..end))
        .ok_or(ElfError::ProgramHeadersOutOfFile)?;

    let mut segments = heapless::Vec::<Segment, MAX_SEGMENTS>::new();
    // Program header index of each kept segment, for error reports.
    let mut headers = [0usize; MAX_SEGMENTS];
    for (i, phdr) in table.chunks_exact(usize::from(PHDR_BYTES)).enumerate() {
        let field = |at: usize| read_u64(phdr, at).ok_or(ElfError::ProgramHeadersOutOfFile);
        match read_u32(phdr, P_TYPE).ok_or(ElfError::ProgramHeadersOutOfFile)? {
            PT_LOAD => {}
            PT_INTERP | PT_DYNAMIC => return Err(ElfError::Dynamic),
            _ => continue,
        }
        let segment = Segment {
            paddr: field(P_PADDR)?,
            file_offset: field(P_OFFSET)?,
            file_bytes: field(P_FILESZ)?,
            mem_bytes: field(P_MEMSZ)?,
            flags: SegmentFlags::from_bits_truncate(read_u32(phdr, P_FLAGS).ok_or(ElfError::ProgramHeadersOutOfFile)?),
        };
        if segment.mem_bytes == 0 {
            continue;
        }
        file_range(bytes, &segment).ok_or(ElfError::SegmentOutOfFile(i))?;
        if segment.file_bytes > segment.mem_bytes {
            return Err(ElfError::FileLargerThanMemory(i));
        }
        if field(P_VADDR)? != segment.paddr {
            return Err(ElfError::VirtualNotPhysical(i));
        }
        let end = segment.paddr.checked_add(segment.mem_bytes).ok_or(ElfError::Overflow(i))?;
        for (earlier, &j) in segments.iter().zip(headers.iter()) {
            if segment.paddr < earlier.end() && earlier.paddr < end {
                return Err(ElfError::SegmentOverlap(j, i));
            }
        }
        let slot = headers.get_mut(segments.len()).ok_or(ElfError::TooManySegments)?;
        *slot = i;
        segments.push(segment).map_err(|_| ElfError::TooManySegments)?;
    }
    Ok(ElfImage { entry, segments })
}

/// Places `image` in a guest of `memory_bytes` with `vcpus` vCPUs: every segment must lie in
/// `[IMAGE_START, memory_bytes - vcpus * STACK_BYTES)` (the stacks sit at the top of memory),
/// and the entry point inside an executable segment.
pub fn plan(image: &ElfImage, memory_bytes: u64, vcpus: u32) -> Result<LoadPlan, ElfError> {
    let stacks_start = u64::from(vcpus)
        .checked_mul(STACK_BYTES)
        .and_then(|stacks| memory_bytes.checked_sub(stacks))
        .ok_or(ElfError::NoRoomForStacks)?;
    let mut image_end = IMAGE_START;
    for (i, segment) in image.segments.iter().enumerate() {
        if segment.paddr < IMAGE_START {
            return Err(ElfError::BelowImageStart(i));
        }
        let end = segment
            .paddr
            .checked_add(segment.mem_bytes)
            .and_then(|end| end.checked_next_multiple_of(PAGE_BYTES))
            .filter(|&end| end <= stacks_start)
            .ok_or(ElfError::AboveMemory(i))?;
        image_end = image_end.max(end);
    }
    let executable = image.segments.iter().any(|s| s.flags.contains(SegmentFlags::X) && s.contains(image.entry));
    if !executable {
        return Err(ElfError::EntryNotExecutable(image.entry));
    }
    Ok(LoadPlan { entry: image.entry, image_end, stacks_start })
}

/// Loads `image` (parsed from `bytes`) into guest memory: for each segment, `write(gpa, data)`
/// copies its file bytes and `zero(gpa, len)` clears the rest of its memory (when non-empty).
/// Check the image with [`plan`] first: `load` does not know the guest's size. Stops at the
/// first error.
pub fn load<E>(
    bytes: &[u8],
    image: &ElfImage,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), E>,
    mut zero: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), LoadError<E>> {
    for (i, segment) in image.segments.iter().enumerate() {
        let data = file_range(bytes, segment).ok_or(ElfError::SegmentOutOfFile(i))?;
        let rest = segment.mem_bytes.checked_sub(segment.file_bytes).ok_or(ElfError::FileLargerThanMemory(i))?;
        let rest_at = segment.paddr.checked_add(segment.file_bytes).ok_or(ElfError::Overflow(i))?;
        if !data.is_empty() {
            write(segment.paddr, data).map_err(LoadError::Memory)?;
        }
        if rest > 0 {
            zero(rest_at, rest).map_err(LoadError::Memory)?;
        }
    }
    Ok(())
}

/// The segment's file bytes, if inside `bytes` (no bytes are always inside, whatever the
/// offset).
fn file_range<'a>(bytes: &'a [u8], segment: &Segment) -> Option<&'a [u8]> {
    if segment.file_bytes == 0 {
        return Some(&[]);
    }
    let start = usize::try_from(segment.file_offset).ok()?;
    let end = start.checked_add(usize::try_from(segment.file_bytes).ok()?)?;
    bytes.get(start..end)
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RX: u32 = 4 | 1;
    const RW: u32 = 4 | 2;

    /// A program header for the test builder.
    #[derive(Clone, Copy, Debug)]
    struct Ph {
        kind: u32,
        flags: u32,
        offset: u64,
        vaddr: u64,
        paddr: u64,
        filesz: u64,
        memsz: u64,
    }

    fn load_ph(flags: u32, offset: u64, paddr: u64, filesz: u64, memsz: u64) -> Ph {
        Ph { kind: PT_LOAD, flags, offset, vaddr: paddr, paddr, filesz, memsz }
    }

    /// Assembles an ELF: the 64-byte header (fields from `patch` applied afterwards), the
    /// program headers at offset 64, then `data` at offset 64 + 56 * phdrs.len().
    fn build(entry: u64, phdrs: &[Ph], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for p in phdrs {
            b.extend_from_slice(&p.kind.to_le_bytes());
            b.extend_from_slice(&p.flags.to_le_bytes());
            for v in [p.offset, p.vaddr, p.paddr, p.filesz, p.memsz, 0x1000] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b.extend_from_slice(data);
        b
    }

    /// Offset of the data in an image built with `n` program headers.
    fn data_at(n: usize) -> u64 {
        64 + 56 * n as u64
    }

    /// A typical guest: text (16 bytes) at 1 MiB, data (8 bytes + 0x100 bss) at 1 MiB + 4 KiB.
    fn guest() -> Vec<u8> {
        let d = data_at(3);
        build(
            0x10_0004,
            &[
                load_ph(RX, d, 0x10_0000, 16, 16),
                Ph { kind: 0x6474_e551, flags: RW, offset: 0, vaddr: 0, paddr: 0, filesz: 0, memsz: 0 }, // GNU_STACK
                load_ph(RW, d + 16, 0x10_1000, 8, 0x108),
            ],
            &[0x90; 24],
        )
    }

    fn patch(mut b: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    }

    #[test]
    fn parses_typical_guest() {
        let image = parse(&guest()).unwrap();
        assert_eq!(image.entry, 0x10_0004);
        assert_eq!(
            image.segments.as_slice(),
            &[
                Segment {
                    paddr: 0x10_0000,
                    file_offset: data_at(3),
                    file_bytes: 16,
                    mem_bytes: 16,
                    flags: SegmentFlags::R | SegmentFlags::X
                },
                Segment {
                    paddr: 0x10_1000,
                    file_offset: data_at(3) + 16,
                    file_bytes: 8,
                    mem_bytes: 0x108,
                    flags: SegmentFlags::R | SegmentFlags::W
                },
            ]
        );
        let plan = plan(&image, 4 << 20, 2).unwrap();
        assert_eq!(
            plan,
            LoadPlan { entry: 0x10_0004, image_end: 0x10_2000, stacks_start: (4 << 20) - 2 * STACK_BYTES }
        );
    }

    #[test]
    fn ignores_empty_and_other_segments() {
        let d = data_at(3);
        let b = build(
            0x10_0000,
            &[
                load_ph(RX, d, 0x10_0000, 4, 4),
                load_ph(RW, 0, 0x10_0000, 0, 0), // empty: ignored, even though it sits on the text
                Ph { kind: 4, flags: 4, offset: 0, vaddr: 0, paddr: 0, filesz: 0, memsz: 0 }, // PT_NOTE
            ],
            &[0xc3; 4],
        );
        assert_eq!(parse(&b).unwrap().segments.len(), 1);
    }

    #[test]
    fn header_rejections() {
        use ElfError::*;
        let g = guest();
        let cases: Vec<(&str, Vec<u8>, ElfError)> = vec![
            ("empty", vec![], BadMagic),
            ("magic", patch(g.clone(), 1, b"ELG"), BadMagic),
            ("short header", g[..63].to_vec(), Truncated),
            ("32-bit", patch(g.clone(), 4, &[1]), NotElf64),
            ("big-endian", patch(g.clone(), 5, &[2]), NotLittleEndian),
            ("ident version", patch(g.clone(), 6, &[0]), BadVersion),
            ("e_version", patch(g.clone(), 20, &2u32.to_le_bytes()), BadVersion),
            ("aarch64", patch(g.clone(), 18, &183u16.to_le_bytes()), WrongMachine(183)),
            ("pie", patch(g.clone(), 16, &3u16.to_le_bytes()), NotExecutable(3)),
            ("relocatable", patch(g.clone(), 16, &1u16.to_le_bytes()), NotExecutable(1)),
            ("phentsize", patch(g.clone(), 54, &32u16.to_le_bytes()), BadPhentsize(32)),
            ("phoff past end", patch(g.clone(), 32, &0x1_0000u64.to_le_bytes()), ProgramHeadersOutOfFile),
            ("phoff huge", patch(g.clone(), 32, &u64::MAX.to_le_bytes()), ProgramHeadersOutOfFile),
            ("phnum too large", patch(g.clone(), 56, &100u16.to_le_bytes()), ProgramHeadersOutOfFile),
            ("table cut", g[..64 + 56 * 2].to_vec(), ProgramHeadersOutOfFile),
        ];
        for (what, bytes, want) in cases {
            assert_eq!(parse(&bytes), Err(want), "{what}");
        }
    }

    #[test]
    fn segment_rejections() {
        use ElfError::*;
        let d = data_at(2);
        let text = load_ph(RX, d, 0x10_0000, 16, 16);
        let one = |p: Ph| build(0x10_0000, &[text, p], &[0; 32]);
        let cases: Vec<(&str, Vec<u8>, ElfError)> = vec![
            ("file range past end", one(load_ph(RW, d + 16, 0x20_0000, 17, 32)), SegmentOutOfFile(1)),
            ("offset past end", one(load_ph(RW, 0x1000, 0x20_0000, 1, 32)), SegmentOutOfFile(1)),
            ("offset overflow", one(load_ph(RW, u64::MAX, 0x20_0000, 2, 32)), SegmentOutOfFile(1)),
            ("file > memory", one(load_ph(RW, d, 0x20_0000, 16, 8)), FileLargerThanMemory(1)),
            (
                "vaddr != paddr",
                one(Ph { vaddr: 0xffff_8000_0000_0000, ..load_ph(RW, d, 0x20_0000, 0, 8) }),
                VirtualNotPhysical(1),
            ),
            ("wraps", one(load_ph(RW, d, u64::MAX - 4, 0, 8)), Overflow(1)),
            ("overlap", one(load_ph(RW, d, 0x10_000f, 0, 8)), SegmentOverlap(0, 1)),
            ("contains", one(load_ph(RW, d, 0x0f_0000, 0, 0x2_0000)), SegmentOverlap(0, 1)),
            ("interp", one(Ph { kind: PT_INTERP, ..load_ph(4, d, 0, 1, 1) }), Dynamic),
            ("dynamic", one(Ph { kind: PT_DYNAMIC, ..load_ph(RW, d, 0, 0, 0) }), Dynamic),
        ];
        for (what, bytes, want) in cases {
            assert_eq!(parse(&bytes), Err(want), "{what}");
        }
        // Segments that touch are fine, and so is any offset without file bytes.
        assert!(parse(&one(load_ph(RW, d, 0x10_0010, 0, 8))).is_ok());
        assert!(parse(&one(load_ph(RW, u64::MAX, 0x20_0000, 0, 8))).is_ok());

        let nine: Vec<Ph> = (0..9).map(|i| load_ph(RW, 0, 0x10_0000 + i * 0x1000, 0, 8)).collect();
        assert_eq!(parse(&build(0x10_0000, &nine, &[])), Err(TooManySegments));
        assert_eq!(parse(&build(0x10_0000, &nine[..8], &[])).map(|i| i.segments.len()), Ok(8));
    }

    #[test]
    fn plan_rejections() {
        use ElfError::*;
        let image = |entry: u64, segs: &[(u64, u64, SegmentFlags)]| ElfImage {
            entry,
            segments: segs
                .iter()
                .map(|&(paddr, mem_bytes, flags)| Segment { paddr, file_offset: 0, file_bytes: 0, mem_bytes, flags })
                .collect(),
        };
        let rx = SegmentFlags::R | SegmentFlags::X;
        let rw = SegmentFlags::R | SegmentFlags::W;
        let mem = 4u64 << 20;
        let top = mem - 2 * STACK_BYTES;
        let ok = image(0x10_0000, &[(0x10_0000, 0x10, rx), (top - 0x1000, 0x1000, rw)]);
        assert_eq!(plan(&ok, mem, 2), Ok(LoadPlan { entry: 0x10_0000, image_end: top, stacks_start: top }));

        let cases: Vec<(&str, ElfImage, u64, u32, ElfError)> = vec![
            ("below", image(0x10_0000, &[(0x10_0000, 0x10, rx), (0xf_f000, 0x1000, rw)]), mem, 2, BelowImageStart(1)),
            (
                "into stacks",
                image(0x10_0000, &[(0x10_0000, 0x10, rx), (top - 0x1000, 0x1001, rw)]),
                mem,
                2,
                AboveMemory(1),
            ),
            ("rounded into stacks", image(0x10_0000, &[(0x10_0000, 0x10, rx)]), 0x10_0800, 0, AboveMemory(0)),
            ("past memory", image(0x10_0000, &[(0x10_0000, 0x10, rx), (mem, 0x1000, rw)]), mem, 0, AboveMemory(1)),
            ("wraps", image(0x10_0000, &[(0x10_0000, 0x10, rx), (u64::MAX, 2, rw)]), u64::MAX, 0, AboveMemory(1)),
            ("stacks > memory", ok.clone(), STACK_BYTES, 2, NoRoomForStacks),
            ("many stacks", ok.clone(), mem, u32::MAX, NoRoomForStacks),
            (
                "entry in data",
                image(top - 0x800, &[(0x10_0000, 0x10, rx), (top - 0x1000, 0x1000, rw)]),
                mem,
                2,
                EntryNotExecutable(top - 0x800),
            ),
            ("entry past text", image(0x10_0010, &[(0x10_0000, 0x10, rx)]), mem, 2, EntryNotExecutable(0x10_0010)),
            ("entry nowhere", image(0x40_0000, &[(0x10_0000, 0x10, rx)]), mem, 2, EntryNotExecutable(0x40_0000)),
            ("no segments", image(0x10_0000, &[]), mem, 2, EntryNotExecutable(0x10_0000)),
        ];
        for (what, img, mem, vcpus, want) in cases {
            assert_eq!(plan(&img, mem, vcpus), Err(want), "{what}");
        }
    }

    #[test]
    fn loads_segments() {
        let mut data = vec![0u8; 24];
        data[..16].copy_from_slice(b"text-text-text-!");
        data[16..].copy_from_slice(b"data-dat");
        let d = data_at(3);
        let bytes = build(
            0x10_0000,
            &[
                load_ph(RX, d, 0x10_0000, 16, 16),
                load_ph(RW, d + 16, 0x10_1000, 8, 0x108),
                load_ph(RW, 0, 0x10_2000, 0, 0x40),
            ],
            &data,
        );
        let image = parse(&bytes).unwrap();
        let ops = core::cell::RefCell::new(Vec::<(u64, Result<Vec<u8>, u64>)>::new());
        load::<()>(
            &bytes,
            &image,
            |gpa, d| {
                ops.borrow_mut().push((gpa, Ok(d.to_vec())));
                Ok(())
            },
            |gpa, len| {
                ops.borrow_mut().push((gpa, Err(len)));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            ops.into_inner(),
            vec![
                (0x10_0000, Ok(b"text-text-text-!".to_vec())),
                (0x10_1000, Ok(b"data-dat".to_vec())),
                (0x10_1008, Err(0x100)),
                (0x10_2000, Err(0x40)),
            ]
        );
    }

    #[test]
    fn load_errors() {
        let bytes = guest();
        let image = parse(&bytes).unwrap();
        // Writer error stops the load.
        let mut calls = 0;
        let r = load(
            &bytes,
            &image,
            |_, _| {
                calls += 1;
                Err("full")
            },
            |_, _| Ok(()),
        );
        assert_eq!(r, Err(LoadError::Memory("full")));
        assert_eq!(calls, 1);
        assert_eq!(load(&bytes, &image, |_, _| Ok::<(), ()>(()), |_, _| Err(())), Err(LoadError::Memory(())));
        // Bytes that do not match the image.
        assert_eq!(
            load(&bytes[..100], &image, |_, _| Ok::<(), ()>(()), |_, _| Ok(())),
            Err(LoadError::Image(ElfError::SegmentOutOfFile(0)))
        );
        let mut bad = image.clone();
        bad.segments[1].mem_bytes = 4;
        assert_eq!(
            load(&bytes, &bad, |_, _| Ok::<(), ()>(()), |_, _| Ok(())),
            Err(LoadError::Image(ElfError::FileLargerThanMemory(1)))
        );
    }

    #[test]
    fn errors_display() {
        assert_eq!(ElfError::WrongMachine(183).to_string(), "machine 183 is not x86-64 (62)");
        assert_eq!(
            ElfError::EntryNotExecutable(0x1234).to_string(),
            "entry point 0x1234 is not in an executable segment"
        );
        assert_eq!(ElfError::SegmentOverlap(1, 3).to_string(), "program headers 1 and 3 overlap");
    }

    fn check_invariants(bytes: &[u8], image: &ElfImage) {
        for (i, s) in image.segments.iter().enumerate() {
            assert!(s.mem_bytes > 0 && s.file_bytes <= s.mem_bytes);
            assert!(s.paddr.checked_add(s.mem_bytes).is_some());
            assert!(file_range(bytes, s).is_some());
            for t in &image.segments[..i] {
                assert!(s.end() <= t.paddr || t.end() <= s.paddr);
            }
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(image) = parse(&bytes) {
                check_invariants(&bytes, &image);
            }
        }

        #[test]
        fn parse_never_panics_on_mutated(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
            memory_mib in 0u64..64,
            vcpus in 0u32..8,
        ) {
            let mut bytes = guest();
            for (at, value) in flips {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
            let bytes = &bytes[..cut.index(bytes.len() + 1)];
            if let Ok(image) = parse(bytes) {
                check_invariants(bytes, &image);
                if let Ok(plan) = plan(&image, memory_mib << 20, vcpus) {
                    prop_assert!(plan.image_end <= plan.stacks_start);
                    prop_assert!(image.segments.iter().all(|s| s.paddr >= IMAGE_START && s.end() <= plan.image_end));
                }
                prop_assert_eq!(load(bytes, &image, |_, _| Ok::<(), ()>(()), |_, _| Ok(())), Ok(()));
            }
        }
    }
}
