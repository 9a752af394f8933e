//! Console output: `print!`/`println!` format into a line buffer on the caller's stack, flushed
//! with `CONSOLE_WRITE` at each newline, when full, and at the end of the call. Lock-free, so
//! interrupt handlers and other vCPUs may print at any time; the hypervisor joins partial lines.
//! Also the panic handler.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use conduit_abi::CONSOLE_MAX;

use crate::{exit_code, hypercall};

/// A line buffer of `CONSOLE_MAX` bytes that writes itself to the console at each newline and
/// when full.
#[derive(Debug)]
pub struct LineWriter {
    buf: [u8; CONSOLE_MAX as usize],
    len: usize,
}

impl LineWriter {
    /// An empty buffer.
    pub const fn new() -> Self {
        Self { buf: [0; CONSOLE_MAX as usize], len: 0 }
    }

    /// Writes what is buffered (possibly a partial line) to the console.
    pub fn flush(&mut self) {
        if self.len > 0 {
            hypercall::console_write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Default for LineWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            self.buf[self.len] = b;
            self.len += 1;
            if b == b'\n' || self.len == self.buf.len() {
                self.flush();
            }
        }
        Ok(())
    }
}

/// Formats `args` to the console (what `print!` expands to).
#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let mut w = LineWriter::new();
    // LineWriter::write_str never fails; a Display impl's error only cuts the text short.
    let _ = w.write_fmt(args);
    w.flush();
}

/// Prints to the guest console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the guest console (one `CONSOLE_WRITE` when it fits in `CONSOLE_MAX`).
#[macro_export]
macro_rules! println {
    () => { $crate::console::_print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Set by the first panic; a panic while reporting one exits at once.
static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        hypercall::exit(exit_code::PANIC);
    }
    match info.location() {
        Some(at) => crate::println!("panic: {} at {}:{}:{}", info.message(), at.file(), at.line(), at.column()),
        None => crate::println!("panic: {}", info.message()),
    }
    hypercall::exit(exit_code::PANIC)
}
