//! `intruder`: breaks the rules on purpose; `BootInfo::argument` selects how. The hypervisor must
//! stop this guest (and only it) and report why; none of the accesses should return.
//! - 1: read a u64 from unbacked guest-physical memory (2 MiB beyond RAM, below 4 GiB);
//! - 2: write a u64 to 0xfec0_0000, the host's I/O APIC (not emulated for guests);
//! - 3: triple fault (an IDT with limit 0, then `int3`);
//! - 4: write to the address the supervisor posts in the mailbox (another guest's host-physical
//!   memory), then to the same offset beyond this guest's RAM.
#![no_std]
#![no_main]

use core::arch::asm;

use conduit_guest_rt::{BootInfo, entry, exit_code, hypercall, println, time};

entry!(main);

/// Host I/O APIC (q35).
const IOAPIC: u64 = 0xfec0_0000;
/// Written by the write attempts.
const POISON: u64 = 0xdead_beef_dead_beef;
/// How long to wait for the supervisor's mailbox word.
const MAILBOX_WAIT_US: u64 = 1_000_000;
/// The accesses stay below this, clear of the APIC windows near the top of 4 GiB.
const LOW_WINDOW_END: u64 = 0xf000_0000;

fn main(info: &'static BootInfo) -> u64 {
    match info.argument {
        1 => {
            let addr = (info.memory_bytes + 0x20_0000) & !7;
            if addr >= LOW_WINDOW_END {
                println!(
                    "intruder: FAILED: RAM ends at {:#x}, no unbacked address below 4 GiB to read",
                    info.memory_bytes
                );
                return exit_code::FAIL;
            }
            println!("intruder: reading unbacked guest-physical {addr:#x} ({:#x} bytes of RAM)", info.memory_bytes);
            // SAFETY:
            // 1. `addr` is 8-byte aligned, below 4 GiB (identity-mapped) and above RAM, so no
            //    Rust object lives there; the access is expected to stop the guest.
            let value = unsafe { core::ptr::read_volatile(addr as *const u64) };
            println!("intruder: read {value:#x}");
        }
        2 => {
            println!("intruder: writing {POISON:#x} to the host I/O APIC at {IOAPIC:#x}");
            // SAFETY:
            // 1. As for argument 1: aligned, identity-mapped, outside RAM and every Rust object.
            unsafe { core::ptr::write_volatile(IOAPIC as *mut u64, POISON) };
        }
        3 => {
            println!("intruder: triple fault (IDT limit 0, then int3)");
            let empty = IdtPointer { limit: 0, base: 0 };
            // SAFETY:
            // 1. Loading an empty IDT and raising #BP makes the CPU fail to deliver #BP, #GP and
            //    #DF: a triple fault, which ends the guest; no Rust state is touched.
            // 2. Should it return anyway, only IDTR changed (no interrupt can be taken: IF is
            //    clear), and the guest goes on to report that and exit by hypercall.
            unsafe { asm!("lidt [{}]", "int3", in(reg) &empty, options(readonly)) };
        }
        4 => return other_guest(info),
        other => {
            println!("intruder: FAILED: unknown argument {other}");
            return exit_code::FAIL;
        }
    }
    println!("intruder: access returned");
    exit_code::FAIL
}

/// Operand of `lidt`.
#[repr(C, packed)]
struct IdtPointer {
    limit: u16,
    base: u64,
}

/// Argument 4: writes where the supervisor says another guest's memory is (host-physical), and
/// at that offset past this guest's RAM.
fn other_guest(info: &BootInfo) -> u64 {
    let mut target = 0;
    let posted = time::wait_until(time::deadline_after_us(MAILBOX_WAIT_US), || {
        target = hypercall::mailbox();
        target != 0
    });
    if !posted {
        println!("intruder: FAILED: no address in the mailbox within 1 s");
        return exit_code::FAIL;
    }
    let target = target & !7;
    println!("intruder: writing {POISON:#x} to {target:#x}, where another guest's memory is on the host");
    if target < info.memory_bytes && !(info.free_start..info.free_end.saturating_sub(8)).contains(&target) {
        // Inside this guest's own RAM but not in its free range: writing there would only
        // corrupt this guest's image, tables or stacks.
        println!("intruder: {target:#x} is this guest's own image, tables or stack; not written");
    } else if target >= 1 << 32 {
        println!("intruder: {target:#x} is above the 4 GiB this guest has mapped; not written");
    } else {
        // SAFETY:
        // 1. `target` is 8-byte aligned and below 4 GiB (identity-mapped); it is either outside
        //    this guest's RAM or inside its free range, which no Rust object occupies.
        unsafe { core::ptr::write_volatile(target as *mut u64, POISON) };
        println!("intruder: write to {target:#x} returned");
    }
    let beyond = (info.memory_bytes + (target % 0x1000_0000)) & !7;
    if beyond < LOW_WINDOW_END {
        println!("intruder: writing {POISON:#x} to {beyond:#x}, beyond this guest's RAM");
        // SAFETY:
        // 1. `beyond` is 8-byte aligned, at or above the end of RAM and below 4 GiB: mapped,
        //    and no Rust object lives there.
        unsafe { core::ptr::write_volatile(beyond as *mut u64, POISON) };
    }
    println!("intruder: access returned");
    exit_code::FAIL
}
