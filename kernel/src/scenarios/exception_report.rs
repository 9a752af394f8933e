//! `exception_report`: exceptions are reported with the right vector, RIP, registers and CR2.
//! First an armed #BP: the report is printed, the trap resumes, and the recorded vector, RIP
//! and R12 are checked here. Then a write to an unmapped address: the #PF takes the real fatal
//! path (report with error code 0x2 and CR2 = the address, failure verdict); the host harness
//! asserts that report and that the run ended with the failure verdict.

use super::check;
use crate::arch::exceptions::{self, BREAKPOINT, test_support};
use crate::{Platform, println};

/// Put in R12 before the breakpoint; must appear in the report.
pub const R12_MARKER: u64 = 0x00c0_ffee_0000_0bad;
/// Unmapped on every machine Conduit runs on (256 GiB).
pub const FAULT_ADDR: u64 = 0x0000_0040_0000_0000;

pub fn run(_p: &Platform) -> Result<(), &'static str> {
    check(exceptions::expect_trap(BREAKPOINT), "could not arm the #BP")?;
    let rip_after = test_support::breakpoint_with_marker(R12_MARKER);
    let t = exceptions::last_trap().ok_or("the #BP was not reported")?;
    check(t.vector == BREAKPOINT, "the #BP report has the wrong vector")?;
    check(t.rip == rip_after, "the #BP report has the wrong rip")?;
    check(t.r12 == R12_MARKER, "the #BP report lost r12")?;
    println!("exception_report: #BP reported (vector 3, rip {:#x}, r12 {:#x}) and resumed", t.rip, t.r12);
    check(crate::arch::paging::translate(FAULT_ADDR).is_none(), "the fault address is mapped")?;
    println!("exception_report: writing to unmapped {:#x}; a fatal #PF must follow", FAULT_ADDR);
    test_support::fatal_write(FAULT_ADDR)
}
