//! Runtime for Conduit test guests: the entry point, an IDT with Rust interrupt handlers, the
//! console, hypercalls, the virtual local APIC, bounded waits and a pass/fail report, so that a
//! test guest reads like a small driver.
//!
//! Device support: `pci` (ECAM and port configuration access, enumeration, BARs,
//! capabilities), `msi` and `msix` (programming interrupt messages), `memory` (DMA pages from
//! the free range), `mmio` (register windows), `devices` (edu, NVMe, notify) and the interrupt
//! hypercalls in `hypercall`.
//!
//! Every vCPU of a partition enters through the same entry point with its own `BootInfo`
//! (`info.vcpu`) and stack; the IDT, the handler table and the interrupt counts are shared
//! statics (each vCPU loads the IDT), so cross-vCPU coordination is through atomics and
//! `sync::Once`.
//!
//! A guest binary is `#![no_std] #![no_main]` and names its main function with [`entry!`]:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! conduit_guest_rt::entry!(main);
//! fn main(info: &'static conduit_guest_rt::BootInfo) -> u64 {
//!     conduit_guest_rt::println!("hello");
//!     conduit_guest_rt::exit_code::PASS
//! }
//! ```
//!
//! The guest boot protocol (`conduit_abi`, `docs/guest-boot.md`): entry in 64-bit mode at CPL 0
//! with `RDI` = this vCPU's [`BootInfo`], interrupts off, no IDT, `[0, 4 GiB)` identity-mapped
//! (so a virtual address is the guest-physical address the hypercalls take).
#![no_std]

pub mod console;
pub mod cpu;
pub mod devices;
pub mod hypercall;
pub mod interrupts;
pub mod lapic;
pub mod memory;
pub mod mmio;
pub mod msi;
pub mod msix;
pub mod pci;
pub mod report;
pub mod sync;
pub mod time;

pub use conduit_abi::{self as abi, BootInfo};

/// Values a guest passes to the EXIT hypercall. Distinct, never 0.
pub mod exit_code {
    /// Every check passed.
    pub const PASS: u64 = 0x600d;
    /// A check failed (the guest printed what).
    pub const FAIL: u64 = 0xbad;
    /// A Rust panic (the message and location were printed).
    pub const PANIC: u64 = 0xdead_beef;
    /// A CPU exception: `EXCEPTION | vector` (vectors 0–31; a report was printed).
    pub const EXCEPTION: u64 = 0xdead_0000;
    /// The `BootInfo` at `RDI` failed validation (what was wrong was printed).
    pub const BAD_BOOT_INFO: u64 = 0xdead_b007;
}

/// Defines the guest's entry point `_start` (the ELF entry), which validates the `BootInfo`,
/// installs the runtime's IDT, calls `$main(info) -> u64` and passes its result to the EXIT
/// hypercall.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// The ELF entry point: the hypervisor enters here with `RDI` = this vCPU's `BootInfo`
        /// and `RSP` as if this function had been called.
        #[unsafe(no_mangle)]
        pub extern "sysv64" fn _start(info: &'static $crate::BootInfo) -> ! {
            let main: fn(&'static $crate::BootInfo) -> u64 = $main;
            $crate::start(info, main)
        }
    };
}

/// What [`entry!`] runs: validate `info`, set up the runtime, run `main`, exit with its result.
#[doc(hidden)]
pub fn start(info: &'static BootInfo, main: fn(&'static BootInfo) -> u64) -> ! {
    if let Err(what) = validate(info) {
        println!("guest-rt: bad BootInfo at {:#x}: {}", info as *const BootInfo as usize, what);
        hypercall::exit(exit_code::BAD_BOOT_INFO);
    }
    lapic::set_base(info.local_apic);
    time::set_tsc_hz(info.tsc_hz);
    memory::init(info.free_start, info.free_end);
    interrupts::init();
    let result = main(info);
    hypercall::exit(result)
}

/// Checks the fields the runtime relies on.
fn validate(info: &BootInfo) -> Result<(), &'static str> {
    if info.magic != abi::BOOT_INFO_MAGIC {
        return Err("wrong magic");
    }
    if info.abi_version >> 16 != abi::ABI_VERSION >> 16 {
        return Err("ABI major version differs from the one this guest was built for");
    }
    if info.vcpu >= info.vcpus {
        return Err("vcpu index not below vcpus");
    }
    let apic = info.local_apic;
    if !apic.is_multiple_of(4096) || apic < info.memory_bytes || apic > (1 << 32) - 4096 {
        return Err("local APIC window not a page above RAM and below 4 GiB");
    }
    if info.free_start > info.free_end || info.free_end > info.memory_bytes {
        return Err("free range not inside RAM");
    }
    Ok(())
}

/// The partition name from `info` (NUL padding removed; `"?"` if it is not UTF-8).
pub fn partition_name(info: &BootInfo) -> &str {
    let len = info.name.iter().position(|&b| b == 0).unwrap_or(info.name.len());
    core::str::from_utf8(&info.name[..len]).unwrap_or("?")
}
