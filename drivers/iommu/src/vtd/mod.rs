//! Intel VT-d (Intel Virtualization Technology for Directed I/O, spec rev 4.1).

pub mod dmar;
pub mod entries;
pub mod fault;
pub mod qi;
pub mod regs;
pub mod unit;

pub use unit::{FaultReader, VtdUnit};
