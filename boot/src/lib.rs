//! How Conduit gets control: a boot-protocol entry (PVH today; Multiboot2 for GRUB on lab
//! hardware slots in beside it), one shared 32→64-bit trampoline, and a protocol-neutral
//! [`BootRecord`] the kernel receives. The kernel never sees a protocol structure.
//!
//! Flow: `pvh_start32` (32-bit, paging off) → `common_start32` (zero .bss, early identity map
//! of the first 4 GiB, long mode) → [`entry::boot_main64`] (parse the protocol's structures
//! into a `BootRecord`) → the kernel's entry named with [`kernel_entry!`].
#![cfg_attr(not(test), no_std)]

pub mod pvh;
mod record;

#[cfg(target_os = "none")]
pub mod entry;

pub use record::{BootError, BootRecord, CMDLINE_MAX, MAX_MODULES, Module, Protocol};

/// How the hypervisor tells its runner the verdict: a 32-bit write of `SUCCESS` or `FAILURE`
/// to QEMU's `isa-debug-exit` port, which exits QEMU with status `(value << 1) | 1`. Zero is
/// never a verdict (QEMU's own start-up failures exit 1, which is `0 << 1 | 1`).
pub mod verdict {
    /// The `isa-debug-exit` I/O port (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
    pub const DEBUG_EXIT_PORT: u16 = 0xf4;
    /// Value written for success (QEMU exit status 33).
    pub const SUCCESS: u32 = 0x10;
    /// Value written for failure (QEMU exit status 65).
    pub const FAILURE: u32 = 0x20;

    /// The QEMU exit status a written value produces.
    pub const fn qemu_status(value: u32) -> i32 {
        ((value << 1) | 1) as i32
    }
}

/// Declares the kernel's entry point, a `fn(Result<&'static BootRecord, BootError>) -> !`.
/// The boot crate calls it once, on the bootstrap processor, in long mode on the boot stack,
/// with interrupts disabled and the early identity map of the first 4 GiB active.
#[macro_export]
macro_rules! kernel_entry {
    ($path:path) => {
        #[unsafe(export_name = "conduit_kernel_entry")]
        fn __conduit_kernel_entry(record: ::core::result::Result<&'static $crate::BootRecord, $crate::BootError>) -> ! {
            let f: fn(::core::result::Result<&'static $crate::BootRecord, $crate::BootError>) -> ! = $path;
            f(record)
        }
    };
}
