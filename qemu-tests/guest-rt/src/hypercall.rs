//! Hypercalls (`VMMCALL`): `RAX` = function, arguments in `RDI`, `RSI`, `RDX`, `R10`, `R8`,
//! `R9`, result in `RAX`; every other register is preserved by the hypervisor. Typed wrappers
//! for every function of ABI 1.2, including the interrupt-control calls (`IRQ_INFO`,
//! `SET_IRQS`, `IRQ_STATS`) and the doorbell calls (`DOORBELL_ADD`, `DOORBELL_REMOVE`,
//! `DOORBELL_HITS`), which name a device by its requester ID on the guest's PCI bus
//! (`crate::pci::Bdf::rid`).

use core::arch::asm;

use conduit_abi::irq::IrqStats;
use conduit_abi::{CONSOLE_MAX, hypercall as nr};

/// Raw hypercall `nr(a0, a1)`: the value in `RAX` afterwards (≥ 0, or a negative error code
/// from `conduit_abi::error`). For testing error returns; everything else has a typed wrapper.
///
/// # Safety
///
/// The function called must not write guest memory Rust code owns (of ABI 1.1 only
/// `IRQ_STATS` writes guest memory, at its third argument; `EXIT` does not return, which is
/// fine).
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

/// Raw hypercall `nr(a[0], …, a[5])` with all six argument registers: the value in `RAX`
/// afterwards.
///
/// # Safety
///
/// As for [`call`]: whatever guest memory the function writes (`IRQ_STATS`: 48 bytes at
/// `a[3]`) must be memory the caller lets it write; memory it reads (`SET_IRQS` data at
/// `a[5]`) must stay valid for the call.
pub unsafe fn call6(nr: u64, a: [u64; 6]) -> i64 {
    let result: i64;
    // SAFETY:
    // 1. VMMCALL at CPL 0 traps to the hypervisor, which changes only RAX (an output); the six
    //    argument registers are inputs it preserves.
    // 2. Not `nomem`/`readonly`: the function may read or write guest memory, which the
    //    caller's obligation covers.
    // 3. It uses no stack.
    unsafe {
        asm!(
            "vmmcall",
            inlateout("rax") nr as i64 => result,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            options(nostack),
        );
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

/// `AUTO_EOI`: asks that `vector` be taken without an EOI (`enable`) or with one again; 0 or
/// the negative error code. Use `interrupts::set_auto_eoi`, which also tells the dispatcher.
pub fn auto_eoi(vector: u8, enable: bool) -> i64 {
    // SAFETY:
    // 1. AUTO_EOI writes no guest memory.
    unsafe { call(nr::AUTO_EOI, u64::from(vector), u64::from(enable)) }
}

/// `MAILBOX`: the word the hypervisor last posted to this vCPU (0 if none).
pub fn mailbox() -> u64 {
    // SAFETY:
    // 1. MAILBOX writes no guest memory.
    unsafe { call(nr::MAILBOX, 0, 0) as u64 }
}

/// `IRQ_INFO`: the interrupts of `device` (requester ID) at `index` (`irq::INDEX_*`): their
/// count and `irq::FLAG_*` flags, or the negative error code.
pub fn irq_info(device: u16, index: u64) -> Result<(u32, u64), i64> {
    // SAFETY:
    // 1. IRQ_INFO writes no guest memory.
    let r = unsafe { call6(nr::IRQ_INFO, [u64::from(device), index, 0, 0, 0, 0]) };
    if r < 0 { Err(r) } else { Ok((r as u64 as u32, r as u64 >> 32)) }
}

/// The data of a `SET_IRQS` call. The wrapper passes what it is given: the `irq::DATA_*` flag
/// in `flags` and the data need not agree (to test rejections).
#[derive(Clone, Copy, Debug)]
pub enum IrqData<'a> {
    /// No data (address 0).
    None,
    /// One byte per vector, 0 or 1 (`irq::DATA_BOOL`).
    Bool(&'a [u8]),
    /// One binding per vector (`irq::DATA_EVENT`: `irq::binding` or `irq::UNBIND`).
    Event(&'a [u64]),
}

impl IrqData<'_> {
    /// Guest-physical address of the data (the identity map makes it the slice's address).
    fn gpa(&self) -> u64 {
        match self {
            Self::None => 0,
            Self::Bool(b) => b.as_ptr() as u64,
            Self::Event(e) => e.as_ptr() as u64,
        }
    }
}

/// `SET_IRQS`: on `device` (requester ID), index `index`, vectors `start..start + count`,
/// with `flags` = one `irq::DATA_*` | one `irq::ACTION_*`, and `data`. `Err` holds the negative
/// error code.
pub fn set_irqs(device: u16, index: u64, start: u64, count: u64, flags: u64, data: IrqData) -> Result<(), i64> {
    // SAFETY:
    // 1. SET_IRQS only reads guest memory: the data, borrowed for the call.
    let r = unsafe { call6(nr::SET_IRQS, [u64::from(device), index, start, count, flags, data.gpa()]) };
    if r < 0 { Err(r) } else { Ok(()) }
}

/// `IRQ_STATS`: the counters of vector `vector` (the message or entry number within `index`)
/// of `device` (requester ID), or the negative error code.
pub fn irq_stats(device: u16, index: u64, vector: u64) -> Result<IrqStats, i64> {
    let mut stats = IrqStats::default();
    let out = &mut stats as *mut IrqStats as u64;
    // SAFETY:
    // 1. IRQ_STATS writes one `IrqStats` (repr(C), 48 bytes, every bit pattern valid) at
    //    `out`, which is `stats`, exclusively borrowed here; it writes nothing else.
    let r = unsafe { call6(nr::IRQ_STATS, [u64::from(device), index, vector, out, 0, 0]) };
    if r < 0 { Err(r) } else { Ok(stats) }
}

/// `DOORBELL_ADD`: registers `request` on `device` (requester ID), or the negative error code.
pub fn doorbell_add(device: u16, request: &conduit_abi::doorbell::Request) -> Result<(), i64> {
    let r = doorbell_call(nr::DOORBELL_ADD, device, request);
    if r < 0 { Err(r) } else { Ok(()) }
}

/// `DOORBELL_REMOVE`: removes the doorbell with `request`'s key from `device`.
pub fn doorbell_remove(device: u16, request: &conduit_abi::doorbell::Request) -> Result<(), i64> {
    let r = doorbell_call(nr::DOORBELL_REMOVE, device, request);
    if r < 0 { Err(r) } else { Ok(()) }
}

/// `DOORBELL_HITS`: writes the doorbell with `request`'s key served on the fast path.
pub fn doorbell_hits(device: u16, request: &conduit_abi::doorbell::Request) -> Result<u64, i64> {
    let r = doorbell_call(nr::DOORBELL_HITS, device, request);
    if r < 0 { Err(r) } else { Ok(r as u64) }
}

fn doorbell_call(function: u64, device: u16, request: &conduit_abi::doorbell::Request) -> i64 {
    let gpa = request as *const conduit_abi::doorbell::Request as u64;
    // SAFETY:
    // 1. The doorbell calls only read guest memory: the 48-byte request, borrowed for the call
    //    (identity-mapped, so its address is its guest-physical address).
    unsafe { call6(function, [u64::from(device), gpa, 0, 0, 0, 0]) }
}

/// The name of a Conduit error code (`conduit_abi::error`), for messages.
pub fn error_name(code: i64) -> &'static str {
    use conduit_abi::error::*;
    match code {
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        EFAULT => "EFAULT",
        EBUSY => "EBUSY",
        EEXIST => "EEXIST",
        ENODEV => "ENODEV",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        ENOSYS => "ENOSYS",
        _ if code >= 0 => "ok",
        _ => "unknown error",
    }
}
