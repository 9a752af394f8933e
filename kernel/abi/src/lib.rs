//! What a guest sees of Conduit besides its devices: the hypercall ABI (`VMMCALL`) and the
//! boot-info block. Shared, byte for byte, by the hypervisor and the guests; documented in
//! `docs/hypercalls.md` and `docs/guest-boot.md`.
//!
//! Calling convention: `RAX` = function number, arguments in `RDI`, `RSI`, `RDX`, `R10`, `R8`,
//! `R9`; results in `RAX` (a value ≥ 0, or a negative error code) and, where documented, `RDX`.
//! Every other register is preserved. An unknown function returns `ENOSYS`; no request can make
//! the hypervisor fail.
#![no_std]
#![forbid(unsafe_code)]

/// ABI version returned by `hypercall::VERSION` (major << 16 | minor). A major change breaks
/// compatibility; a minor one only adds functions.
pub const ABI_VERSION: u64 = 1 << 16;

/// Hypercall function numbers (in `RAX`).
pub mod hypercall {
    /// `() -> version`: the ABI version.
    pub const VERSION: u64 = 0;
    /// `(gpa, len) -> len`: writes `len` bytes of guest memory at guest-physical `gpa` to the
    /// guest's console (at most `CONSOLE_MAX` bytes per call).
    pub const CONSOLE_WRITE: u64 = 1;
    /// `(value) -> !`: this vCPU stops; `value` is its result, reported by the hypervisor.
    pub const EXIT: u64 = 2;
    /// `(value) -> 0`: publishes `value` in this vCPU's signal word, which the hypervisor (a
    /// scenario or supervisor) can observe. Used for rendezvous in tests.
    pub const SIGNAL: u64 = 3;
    /// `() -> microseconds`: time since the hypervisor booted.
    pub const UPTIME_US: u64 = 4;
    /// `() -> value`: reads the word the hypervisor last posted to this vCPU (0 if none).
    pub const MAILBOX: u64 = 5;
}

/// Most bytes `CONSOLE_WRITE` takes in one call.
pub const CONSOLE_MAX: u64 = 256;

/// Error codes (negated in `RAX`), after the POSIX numbers.
pub mod error {
    /// A guest address outside the guest's memory.
    pub const EFAULT: i64 = -14;
    /// An argument out of range.
    pub const EINVAL: i64 = -22;
    /// Unknown function.
    pub const ENOSYS: i64 = -38;
    /// Not allowed for this guest.
    pub const EPERM: i64 = -1;
}

/// Port a guest may write bytes to as a debug console (Bochs/QEMU convention).
pub const DEBUG_CONSOLE_PORT: u16 = 0xe9;

/// The boot-info block the hypervisor places in guest memory, one per vCPU; `RDI` holds its
/// guest-physical address at entry. All fields little-endian. See `docs/guest-boot.md`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// `BOOT_INFO_MAGIC`.
    pub magic: u64,
    /// `ABI_VERSION`.
    pub abi_version: u64,
    /// Partition index (order of the partition descriptions).
    pub partition: u32,
    /// This vCPU's index in the partition.
    pub vcpu: u32,
    /// vCPUs in the partition.
    pub vcpus: u32,
    /// Reserved, 0.
    pub reserved0: u32,
    /// Guest RAM: `[0, memory_bytes)`.
    pub memory_bytes: u64,
    /// First guest-physical address free for the guest's own use (after the image).
    pub free_start: u64,
    /// End of the free range: the vCPU stacks (`stack_bytes` each) sit above it, at the top
    /// of RAM, vCPU 0 highest.
    pub free_end: u64,
    /// Bytes of stack per vCPU.
    pub stack_bytes: u64,
    /// Guest-physical address of the (virtual) local APIC window.
    pub local_apic: u64,
    /// Rate at which the virtual local APIC timer counts with divide-by-1, in Hz.
    pub apic_timer_hz: u64,
    /// TSC rate in Hz (the guest reads the host TSC, offset 0).
    pub tsc_hz: u64,
    /// Argument from the partition description (test guests select a behaviour with it).
    pub argument: u64,
    /// Partition name, NUL-padded.
    pub name: [u8; 16],
    /// Reserved, 0.
    pub reserved1: [u64; 2],
}

/// `BootInfo::magic`.
pub const BOOT_INFO_MAGIC: u64 = 0x4f46_4e49_5444_4e43; // "CNDTINFO"

const _: () = assert!(core::mem::size_of::<BootInfo>() == 128);
const _: () = assert!(core::mem::offset_of!(BootInfo, memory_bytes) == 32);
const _: () = assert!(core::mem::offset_of!(BootInfo, argument) == 88);
const _: () = assert!(core::mem::offset_of!(BootInfo, name) == 96);

/// Fixed guest-physical layout (see `docs/guest-boot.md`).
pub mod layout {
    /// The GDT the hypervisor provides: null, 64-bit code (`CODE_SELECTOR`), data
    /// (`DATA_SELECTOR`).
    pub const GDT: u64 = 0x1000;
    /// Selector of the flat 64-bit code segment.
    pub const CODE_SELECTOR: u16 = 0x08;
    /// Selector of the flat data segment.
    pub const DATA_SELECTOR: u16 = 0x10;
    /// Page tables: PML4 here, then the PDPT and four page directories (to `TABLES_END`),
    /// identity-mapping `[0, 4 GiB)` with 2 MiB pages.
    pub const PAGE_TABLES: u64 = 0x2000;
    /// End of the page tables.
    pub const TABLES_END: u64 = 0x8000;
    /// `BootInfo` of vCPU `i` at `BOOT_INFO + i * 128`.
    pub const BOOT_INFO: u64 = 0x8000;
    /// Most vCPUs one partition has.
    pub const MAX_VCPUS: usize = 32;
    /// Lowest address an image segment may occupy.
    pub const IMAGE_START: u64 = 0x10_0000;
    /// Virtual local APIC.
    pub const LOCAL_APIC: u64 = 0xfee0_0000;
    /// Stack bytes per vCPU.
    pub const STACK_BYTES: u64 = 64 * 1024;
}

const _: () = assert!(layout::BOOT_INFO + (layout::MAX_VCPUS as u64) * 128 <= 0x9000);
