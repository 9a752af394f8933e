//! Physical memory for Conduit: address ranges, the firmware memory map made consistent, the
//! frame allocator built from it, and the narrow `PhysRead` trait through which pure parsers
//! (boot record, ACPI) read physical memory.
//!
//! Everything here is plain data and arithmetic: it builds for the host and the target, and
//! all edge cases (overlapping, unsorted, zero-length, unaligned entries, memory above 4 GiB)
//! are unit- and property-tested on the host.
#![cfg_attr(not(any(test, feature = "fake")), no_std)]
#![forbid(unsafe_code)]

pub mod frames;
pub mod map;
pub mod phys;
pub mod range;

pub use frames::{FrameAllocator, FrameError};
pub use map::{MapError, MemoryKind, MemoryMap, RawRegion, Region};
pub use phys::{PhysRead, PhysReadError};
pub use range::PhysRange;

/// Size of a base page and of an allocator frame.
pub const PAGE_SIZE: u64 = 4096;
/// 2 MiB large page.
pub const LARGE_PAGE_SIZE: u64 = 2 * 1024 * 1024;
/// Start of memory above the legacy real-mode area; nothing below it is ever allocated.
pub const LOW_MEMORY_END: u64 = 0x10_0000;
/// 4 GiB: the limit of the early identity mapping and of 32-bit DMA.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
