//! Ending the run: the verdict goes to QEMU's isa-debug-exit port (see
//! `conduit_boot::verdict`), other CPUs are stopped with an NMI, and the CPU halts. On hardware
//! without the exit device the machine simply stops.

use conduit_boot::verdict;
use core::sync::atomic::{AtomicBool, Ordering};
use x86_64::instructions::{hlt, interrupts, port::Port};

static STOPPING: AtomicBool = AtomicBool::new(false);

/// How the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum Verdict {
    /// Everything asked for worked.
    Success,
    /// Something failed (the console says what).
    Failure,
}

/// True once some CPU has begun ending the run.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::Acquire)
}

/// Ends the run with `v`. The first CPU to get here reports; any other halts.
pub fn exit(v: Verdict) -> ! {
    if STOPPING.swap(true, Ordering::AcqRel) {
        halt_forever();
    }
    crate::arch::apic::nmi_others();
    let value = match v {
        Verdict::Success => verdict::SUCCESS,
        Verdict::Failure => verdict::FAILURE,
    };
    crate::console::emergency(format_args!(
        "conduit: verdict {}\n",
        if v == Verdict::Success { "success" } else { "failure" }
    ));
    // SAFETY:
    // 1. Port 0xf4 is QEMU's isa-debug-exit when configured (the test runner always adds it);
    //    the write ends the VM. On hardware without it, a write to an unclaimed port is
    //    ignored and the CPU halts below.
    unsafe { Port::<u32>::new(verdict::DEBUG_EXIT_PORT).write(value) };
    halt_forever()
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        interrupts::disable();
        hlt();
    }
}
