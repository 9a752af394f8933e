//! The plain-text console on COM1: boot progress, scenario markers, and exception and panic
//! reports, readable without any tool. (Structured logs go to COM2 as defmt; see `log`.)
//! Every byte waits a bounded time for the UART; a stuck UART drops bytes, never hangs.

use crate::sync::IrqMutex;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550};
use x86_64::instructions::port::Port;

/// COM1.
pub const COM1: u16 = 0x3f8;
/// Polls of the transmitter per byte before the byte is dropped.
const SEND_POLLS: u32 = 100_000;
/// Attempts to take the console lock on a fatal path before writing around it.
const EMERGENCY_LOCK_ATTEMPTS: u32 = 1_000_000;

static CONSOLE: IrqMutex<Option<Serial>> = IrqMutex::new(None);
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Ports opened so far (bit 0 COM1, bit 1 COM2).
static OPENED: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);

/// A 16550 UART with bounded sends.
#[derive(Debug)]
pub struct Serial {
    uart: Uart16550<PioBackend>,
}

impl Serial {
    /// Initializes the UART at `port` (COM1 or COM2; 8-N-1, FIFOs on). `None` for another
    /// port, a port already opened, or when no UART answers.
    pub fn open(port: u16) -> Option<Self> {
        let bit = match port {
            COM1 => 1,
            crate::log::COM2 => 2,
            _ => return None,
        };
        if OPENED.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return None;
        }
        // SAFETY:
        // 1. `port` is COM1 or COM2, whose 8 registers belong to this driver only: `OPENED`
        //    lets each be opened once, and the fatal-path writer below only writes THR/reads
        //    LSR of COM1 after failing to get the console lock, when the system is going down.
        let mut uart = unsafe { Uart16550::new_port(port) }.ok()?;
        uart.init(Config::default()).ok()?;
        Some(Self { uart })
    }

    /// Sends `bytes`, each waiting at most `SEND_POLLS` polls.
    pub fn send(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let mut sent = false;
            for _ in 0..SEND_POLLS {
                if self.uart.try_send_byte(b).is_ok() {
                    sent = true;
                    break;
                }
                core::hint::spin_loop();
            }
            if !sent {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.send(s.as_bytes());
        Ok(())
    }
}

/// Opens COM1.
pub fn init() -> bool {
    let serial = Serial::open(COM1);
    let ok = serial.is_some();
    *CONSOLE.lock() = serial;
    ok
}

/// Writes formatted text to COM1.
pub fn print(args: fmt::Arguments<'_>) {
    if let Some(s) = CONSOLE.lock().as_mut() {
        let _ = s.write_fmt(args);
    }
}

/// Bytes dropped because the UART never became ready.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Writes on a fatal path (exception, panic): through the console if its lock can be had
/// within a bound, otherwise straight to the UART's transmit register, so a report is never
/// lost to a lock held by the code that failed.
pub fn emergency(args: fmt::Arguments<'_>) {
    if let Some(mut guard) = CONSOLE.try_lock_for(EMERGENCY_LOCK_ATTEMPTS)
        && let Some(s) = guard.as_mut()
    {
        let _ = s.write_fmt(args);
        return;
    }
    let _ = RawCom1.write_fmt(args);
}

/// COM1 by its transmit-holding register and line status only (no configuration, no state).
struct RawCom1;

impl Write for RawCom1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut lsr = Port::<u8>::new(COM1 + 5);
        let mut thr = Port::<u8>::new(COM1);
        for &b in s.as_bytes() {
            for _ in 0..SEND_POLLS {
                // SAFETY:
                // 1. Reading LSR (COM1+5) has no side effect besides clearing error bits,
                //    which the console does not rely on.
                if unsafe { lsr.read() } & 0x20 != 0 {
                    break;
                }
                core::hint::spin_loop();
            }
            // SAFETY:
            // 1. Writing THR (COM1+0, DLAB clear as the console leaves it) transmits one byte;
            //    this path runs only when the system is going down.
            unsafe { thr.write(b) };
        }
        Ok(())
    }
}

/// `print!` to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// `println!` to COM1.
#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}
