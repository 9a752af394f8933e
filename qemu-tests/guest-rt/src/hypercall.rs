//! Hypercalls (`VMMCALL`): `RAX` = function, arguments in `RDI`, `RSI`, result in `RAX`; every
//! other register is preserved by the hypervisor.

use core::arch::asm;

use conduit_abi::{CONSOLE_MAX, hypercall as nr};

/// Raw hypercall `nr(a0, a1)`: the value in `RAX` afterwards (≥ 0, or a negative error code
/// from `conduit_abi::error`). For testing error returns; everything else has a typed wrapper.
///
/// # Safety
///
/// The function called must not write guest memory Rust code owns (no function of ABI 1.x
/// writes guest memory at all; `EXIT` does not return, which is fine).
pub unsafe fn call(nr: u64, a0: u64, a1: u64) -> i64 {
    let result: i64;
    // SAFETY:
    // 1. VMMCALL at CPL 0 traps to the hypervisor, which implements the ABI above: it changes
    //    only RAX, declared as an output; RDI and RSI are inputs.
    // 2. The asm may read guest memory (CONSOLE_WRITE), so it is not `nomem`/`readonly`; by the
    //    caller's obligation it writes none that Rust owns.
    // 3. It uses no stack.
    unsafe {
        asm!("vmmcall", inlateout("rax") nr as i64 => result, in("rdi") a0, in("rsi") a1, options(nostack));
    }
    result
}

/// `VERSION`: the hypervisor's ABI version (`major << 16 | minor`).
pub fn version() -> u64 {
    // SAFETY:
    // 1. VERSION writes no guest memory.
    unsafe { call(nr::VERSION, 0, 0) as u64 }
}

/// `CONSOLE_WRITE`: writes `bytes` to this partition's console, in calls of at most
/// `CONSOLE_MAX` bytes. Returns the bytes written, or the first negative error code.
pub fn console_write(bytes: &[u8]) -> i64 {
    let mut written = 0i64;
    for chunk in bytes.chunks(CONSOLE_MAX as usize) {
        // The identity map makes the virtual address of `chunk` its guest-physical address.
        // SAFETY:
        // 1. CONSOLE_WRITE only reads guest memory, here `chunk`, which is borrowed.
        let r = unsafe { call(nr::CONSOLE_WRITE, chunk.as_ptr() as u64, chunk.len() as u64) };
        if r < 0 {
            return r;
        }
        written += r;
    }
    written
}

/// `EXIT`: this vCPU stops with result `value`.
pub fn exit(value: u64) -> ! {
    // SAFETY:
    // 1. EXIT writes no guest memory (and does not return).
    unsafe { call(nr::EXIT, value, 0) };
    // Not reached under a correct hypervisor; never run on.
    loop {
        crate::cpu::cli();
        crate::cpu::hlt();
    }
}

/// `SIGNAL`: publishes `value` in this vCPU's signal word (rendezvous with a supervisor).
pub fn signal(value: u64) {
    // SAFETY:
    // 1. SIGNAL writes no guest memory.
    unsafe { call(nr::SIGNAL, value, 0) };
}

/// `UPTIME_US`: microseconds since the hypervisor booted.
pub fn uptime_us() -> u64 {
    // SAFETY:
    // 1. UPTIME_US writes no guest memory.
    unsafe { call(nr::UPTIME_US, 0, 0) as u64 }
}

/// `MAILBOX`: the word the hypervisor last posted to this vCPU (0 if none).
pub fn mailbox() -> u64 {
    // SAFETY:
    // 1. MAILBOX writes no guest memory.
    unsafe { call(nr::MAILBOX, 0, 0) as u64 }
}
