//! `panic_report`: a panic prints its location and message on COM1 and ends the run with the
//! failure verdict.

use crate::Platform;

/// Part of the panic message the harness looks for.
pub const MESSAGE: &str = "deliberate panic from the panic_report scenario";

pub fn run(_p: &Platform) -> Result<(), &'static str> {
    crate::println!("panic_report: panicking now");
    panic!("{} (value {:#x})", MESSAGE, 0x5eed_u32);
}
