//! `intruder`: breaks the rules on purpose; `BootInfo::argument` selects how. The hypervisor must
//! stop this guest (and only it) and report why; none of the accesses should return.
//! - 1: read a u64 from unbacked guest-physical memory (2 MiB beyond RAM, below 4 GiB);
//! - 2: write a u64 to 0xfec0_0000, the host's I/O APIC (not emulated for guests);
//! - 3: triple fault (an IDT with limit 0, then `int3`);
//! - 4: write to the address the supervisor posts in the mailbox (another guest's host-physical
//!   memory), then to the same offset beyond this guest's RAM.
//! - 5: leave a secret in xmm0-xmm15 and DR0-DR3, then exit normally (0x600d);
//! - 6: check that xmm0-xmm15, the x87 control word, MXCSR and DR0-DR3 hold nothing of a
//!   previous guest on this CPU (all zero, power-on control values): 0x600d if clean.
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
        5 => return leave_secret(),
        6 => return check_clean(),
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

/// The secret argument 5 leaves behind.
const SECRET: u64 = 0x5ec2_e7da_7a00_0001;

/// Fills xmm0-xmm15 and DR0-DR3 with `SECRET` and exits normally.
fn leave_secret() -> u64 {
    // SAFETY:
    // 1. CPL 0: MOV to DR0-DR3 is allowed; DR7 stays 0, so no breakpoint is armed.
    // 2. CR4.OSFXSR is set by the boot protocol, so the SSE moves are legal; the compiler does
    //    not use SSE state (soft-float target), so nothing of Rust's is clobbered.
    unsafe {
        asm!(
            "movq xmm0, {s}", "movq xmm1, {s}", "movq xmm2, {s}", "movq xmm3, {s}",
            "movq xmm4, {s}", "movq xmm5, {s}", "movq xmm6, {s}", "movq xmm7, {s}",
            "movq xmm8, {s}", "movq xmm9, {s}", "movq xmm10, {s}", "movq xmm11, {s}",
            "movq xmm12, {s}", "movq xmm13, {s}", "movq xmm14, {s}", "movq xmm15, {s}",
            "mov dr0, {s}", "mov dr1, {s}", "mov dr2, {s}", "mov dr3, {s}",
            s = in(reg) SECRET,
            options(nostack, preserves_flags)
        )
    };
    println!("intruder: left {SECRET:#x} in xmm0-15 and dr0-3");
    exit_code::PASS
}

/// FXSAVE image (512 bytes, 16-aligned).
#[repr(C, align(16))]
struct FxImage([u8; 512]);

/// Reports whether anything of a previous guest is visible in the x87/SSE registers or DR0-DR3.
fn check_clean() -> u64 {
    let mut fx = FxImage([0xa5; 512]);
    let mut dr = [0u64; 4];
    // SAFETY:
    // 1. `fx` is a live, 16-byte aligned 512-byte buffer: FXSAVE writes exactly that.
    // 2. CPL 0: reading DR0-DR3 is allowed and has no effect.
    unsafe {
        asm!(
            "fxsave64 [{fx}]",
            "mov {t}, dr0", "mov [{dr}], {t}",
            "mov {t}, dr1", "mov [{dr} + 8], {t}",
            "mov {t}, dr2", "mov [{dr} + 16], {t}",
            "mov {t}, dr3", "mov [{dr} + 24], {t}",
            fx = in(reg) fx.0.as_mut_ptr(),
            dr = in(reg) dr.as_mut_ptr(),
            t = out(reg) _,
            options(nostack, preserves_flags)
        )
    };
    let fcw = u16::from_le_bytes([fx.0[0], fx.0[1]]);
    let mxcsr = u32::from_le_bytes([fx.0[24], fx.0[25], fx.0[26], fx.0[27]]);
    // x87 registers ST0-7 at 32..160: 10 bytes each in 16-byte slots (FXSAVE leaves the other
    // 6 untouched); XMM0-15 at 160..416.
    let st_dirty = fx.0[32..160].chunks_exact(16).any(|slot| slot[..10].iter().any(|&b| b != 0));
    let xmm_dirty = fx.0[160..416].iter().any(|&b| b != 0);
    let dr_dirty = dr.iter().any(|&d| d != 0);
    println!(
        "intruder: fcw {fcw:#06x}, mxcsr {mxcsr:#x}, st0-7 {}, xmm0-15 {}, dr0-3 {}",
        if st_dirty { "DIRTY" } else { "zero" },
        if xmm_dirty { "DIRTY" } else { "zero" },
        if dr_dirty { "DIRTY" } else { "zero" }
    );
    if fcw == 0x037f && mxcsr == 0x1f80 && !st_dirty && !xmm_dirty && !dr_dirty {
        println!("intruder: nothing of the previous guest on this CPU is visible");
        exit_code::PASS
    } else {
        println!("intruder: FAILED: state of a previous guest is visible");
        exit_code::FAIL
    }
}
