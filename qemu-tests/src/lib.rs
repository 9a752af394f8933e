//! The QEMU scenario harness, host side. A scenario is a kernel command line selecting an
//! in-hypervisor test sequence (`conduit.scenario=NAME`), a QEMU device set, the markers its
//! COM1 console and decoded defmt log must show (in order), text that must never appear, the
//! expected verdict and a wall-clock timeout.
//!
//! - [`scenarios`]: the table (add a scenario here and in `kernel/src/scenarios/`).
//! - [`qemu`]: the QEMU command line and the runner (COM1 on stdout, COM2 on a Unix socket).
//! - [`decode`]: defmt frames from COM2 decoded with the kernel ELF's string table.
//! - [`judge`]: turns what a run produced into a verdict with reasons.

pub mod decode;
pub mod judge;
pub mod qemu;
pub mod scenarios;

pub use decode::{LogLine, LogTable};
pub use judge::judge;
pub use qemu::{Line, Outcome, RunOptions};
pub use scenarios::{DEFAULT, Expect, Marker, SCENARIOS, Scenario, Stream};
