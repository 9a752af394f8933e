//! defmt, the structured log, on its own UART (COM2): frames are rzCOBS-encoded and decoded on
//! the host from the kernel ELF by `cargo xtask`. The logger lock is safe against interrupts
//! (they are off while it is held) and against other CPUs (a spin lock with an owner); a frame
//! started from an exception on a CPU that already holds the lock is dropped and counted
//! instead of deadlocking. NMI handlers never log.

use crate::arch::percpu::this_cpu;
use crate::console::Serial;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use x86_64::instructions::interrupts;

/// COM2.
pub const COM2: u16 = 0x2f8;

/// 0 = free, else owner CPU index + 1.
static OWNER: AtomicU32 = AtomicU32::new(0);
static INTERRUPTS_WERE_ENABLED: AtomicBool = AtomicBool::new(false);
static NESTED_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Encoder and UART, used only by the CPU that holds `OWNER`.
struct Channel {
    encoder: defmt::Encoder,
    serial: Option<Serial>,
}

struct ChannelCell(UnsafeCell<Channel>);

// SAFETY:
// 1. The channel is reached only through `channel()`, called once per logger call
//    (`with_channel`, or `init`), only between a successful `acquire` (OWNER == this CPU, not
//    nested) and the matching `release`, or in `init` while OWNER is held: at most one CPU at a
//    time, one live `&mut` at a time (nested frames return before touching it).
unsafe impl Sync for ChannelCell {}

static CHANNEL: ChannelCell = ChannelCell(UnsafeCell::new(Channel { encoder: defmt::Encoder::new(), serial: None }));

/// # Safety
/// The caller holds the logger (OWNER is the running CPU and this frame is not nested), and
/// drops the reference before releasing it.
unsafe fn channel() -> &'static mut Channel {
    // SAFETY: exclusive access is the caller's obligation (see above).
    unsafe { &mut *CHANNEL.0.get() }
}

/// Opens COM2 for the log. Frames logged before this are encoded into nothing.
pub fn init() -> bool {
    let serial = Serial::open(COM2);
    let ok = serial.is_some();
    let me = this_cpu().index() as u32 + 1;
    interrupts::without_interrupts(|| {
        while OWNER.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
        // SAFETY: OWNER is this CPU, and interrupts are off, so nothing else touches it.
        unsafe { channel() }.serial = serial;
        OWNER.store(0, Ordering::Release);
    });
    ok
}

/// Frames dropped because an exception logged while its CPU held the logger.
pub fn nested_dropped() -> u64 {
    NESTED_DROPPED.load(Ordering::Relaxed)
}

/// Runs `f` with the encoder and a sink that sends encoded bytes to COM2, from one borrow of
/// the channel (the encoder and the UART are disjoint fields, so no reference overlaps).
///
/// # Safety
/// As for `channel()`: the caller holds the logger and the frame is not nested.
unsafe fn with_channel(f: impl FnOnce(&mut defmt::Encoder, &mut dyn FnMut(&[u8]))) {
    // SAFETY: the caller's obligation.
    let Channel { encoder, serial } = unsafe { channel() };
    let mut sink = |bytes: &[u8]| {
        if let Some(s) = serial.as_mut() {
            s.send(bytes);
        }
    };
    f(encoder, &mut sink);
}

#[defmt::global_logger]
struct Logger;

// SAFETY:
// 1. `acquire` gives one CPU exclusive use of the channel until `release`: a spin lock whose
//    owner is the CPU index, taken with interrupts disabled (restored in `release`).
// 2. A second `acquire` on the owning CPU (only possible from an exception or NMI inside a
//    log call) is marked nested; its `write`/`release` touch nothing but the counter, so the
//    encoder is never re-entered.
unsafe impl defmt::Logger for Logger {
    fn acquire() {
        let were = interrupts::are_enabled();
        interrupts::disable();
        let cpu = this_cpu();
        let me = cpu.index() as u32 + 1;
        if OWNER.load(Ordering::Acquire) == me {
            cpu.log_nesting.fetch_add(1, Ordering::Relaxed);
            NESTED_DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        while OWNER.compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
        INTERRUPTS_WERE_ENABLED.store(were, Ordering::Relaxed);
        // SAFETY: this CPU now holds the logger, not nested.
        unsafe { with_channel(|e, sink| e.start_frame(sink)) };
    }

    unsafe fn flush() {}

    unsafe fn release() {
        let cpu = this_cpu();
        if cpu.log_nesting.load(Ordering::Relaxed) > 0 {
            cpu.log_nesting.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        // SAFETY: this CPU holds the logger (defmt pairs release with acquire), not nested.
        unsafe { with_channel(|e, sink| e.end_frame(sink)) };
        let were = INTERRUPTS_WERE_ENABLED.load(Ordering::Relaxed);
        OWNER.store(0, Ordering::Release);
        if were {
            interrupts::enable();
        }
    }

    unsafe fn write(bytes: &[u8]) {
        if this_cpu().log_nesting.load(Ordering::Relaxed) > 0 {
            return;
        }
        // SAFETY: this CPU holds the logger (defmt calls write between acquire and release).
        unsafe { with_channel(|e, sink| e.write(bytes, sink)) };
    }
}

defmt::timestamp!("{=u64:us}", crate::arch::time::uptime_us());

/// `value`'s `Display` text (up to 200 bytes), for logging types that only implement `Display`.
pub fn display(value: &impl core::fmt::Display) -> heapless::String<200> {
    use core::fmt::Write;
    let mut s = heapless::String::new();
    let _ = write!(s, "{value}");
    s
}
