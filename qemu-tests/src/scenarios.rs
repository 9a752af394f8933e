//! Every QEMU scenario. Markers are matched as substrings, in the order given, within their
//! stream (COM1 console or decoded defmt log message).

use std::time::Duration;

/// Which output a marker is looked for in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Plain text on COM1.
    Console,
    /// Decoded defmt messages from COM2.
    Log,
}

/// A substring that must appear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    /// Where.
    pub stream: Stream,
    /// What.
    pub text: &'static str,
}

/// Console marker.
pub const fn console(text: &'static str) -> Marker {
    Marker { stream: Stream::Console, text }
}

/// Log marker.
pub const fn log(text: &'static str) -> Marker {
    Marker { stream: Stream::Log, text }
}

/// The verdict a scenario must end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `conduit_boot::verdict::SUCCESS` (QEMU exit status 33).
    Success,
    /// `conduit_boot::verdict::FAILURE` (QEMU exit status 65): the scenario proves a failure
    /// path is taken and reported.
    Failure,
}

impl Expect {
    /// The QEMU exit status this verdict produces.
    pub fn qemu_status(self) -> i32 {
        match self {
            Self::Success => conduit_boot::verdict::qemu_status(conduit_boot::verdict::SUCCESS),
            Self::Failure => conduit_boot::verdict::qemu_status(conduit_boot::verdict::FAILURE),
        }
    }
}

/// One scenario.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// Name: selects the in-hypervisor sequence (`conduit.scenario=NAME`).
    pub name: &'static str,
    /// One line on what it proves.
    pub about: &'static str,
    /// Virtual CPUs.
    pub smp: u32,
    /// Guest RAM.
    pub memory_mib: u32,
    /// Devices and other QEMU arguments beyond the common set.
    pub qemu_args: &'static [&'static str],
    /// Markers that must appear, in order per stream.
    pub markers: &'static [Marker],
    /// Text that must appear in neither stream.
    pub forbidden: &'static [&'static str],
    /// Expected verdict.
    pub expect: Expect,
    /// Wall-clock limit for the whole run.
    pub timeout: Duration,
}

/// Scenario booted by `cargo xtask run` without `--scenario`.
pub const DEFAULT: &str = "boot_smoke";

const TIMEOUT: Duration = Duration::from_secs(60);

/// Text no scenario may show unless it names it as its expected failure.
const NO_FAILURES: &[&str] = &["PANIC", "EXCEPTION", "FAIL", "bring-up failed", "rejected"];

/// The table.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "boot_smoke",
        about: "boots, prints the memory map summary, checks allocator exclusions, W^X, guards, IOAPIC masking, timer",
        smp: 1,
        memory_mib: 256,
        qemu_args: &[],
        markers: &[
            console("boot: protocol Pvh, command line \"conduit.scenario=boot_smoke\""),
            console("boot: 1 of 1 CPUs online"),
            console("memory map: "),
            console(") usable"),
            console("frame allocator: "),
            console("cpus: 1 enabled in MADT, 1 online"),
            console("ioapic: 24 pins masked"),
            console(
                "counters: 0 unexpected and 0 spurious interrupts, 0 APIC errors, 0 console bytes dropped, 0 nested log frames dropped",
            ),
            console(
                "boot_smoke: allocator excludes image, ACPI, boot data, bitmap, trampoline; alloc/free round trip ok",
            ),
            console("boot_smoke: W^X image (text R+X, rodata R, data R+W+NX), page 0 and 9 guard pages unmapped"),
            console("timer: "),
            console("boot_smoke: all checks passed"),
            console("scenario boot_smoke: PASS"),
            console("conduit: verdict success"),
            log("acpi: APIC at "),
            log("paging: kernel tables at "),
            log("time: tsc "),
            log("scenario boot_smoke: start"),
            log("frame allocator: "),
            log("timer: "),
            log("scenario boot_smoke: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "exception_report",
        about: "an armed #BP is reported and resumed; a #PF at a known address is reported and ends the run with failure",
        smp: 1,
        memory_mib: 256,
        qemu_args: &[],
        markers: &[
            console("scenario exception_report: start"),
            console("exception (expected by the scenario, resuming) on cpu 0: #BP breakpoint (vector 3) error=0x0"),
            console("r12=0x00c0ffee00000bad"),
            console("exception_report: #BP reported (vector 3, rip 0x"),
            console("exception_report: writing to unmapped 0x4000000000; a fatal #PF must follow"),
            console("EXCEPTION on cpu 0: #PF page fault (vector 14) error=0x2"),
            console("cr2=0x0000004000000000"),
            console("faulting rip matches the scenario's expected rip"),
            console("call chain: 0x"),
            console("conduit: verdict failure"),
            log("#BP breakpoint (vector 3)"),
            log("EXCEPTION on cpu 0: #PF page fault (vector 14) error=0x2"),
        ],
        forbidden: &["PANIC", "does NOT match", "scenario exception_report: PASS", "scenario exception_report: FAIL"],
        expect: Expect::Failure,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "smp_two_cpus",
        about: "with -smp 2 both CPUs come online, run work, take their own timer interrupt and check in",
        smp: 2,
        memory_mib: 256,
        qemu_args: &[],
        markers: &[
            console("boot: 2 of 2 CPUs online"),
            console("smp: 2 CPUs enabled in MADT, 2 online"),
            console("smp: cpu 0 apic 0: live apic id 0, own timer interrupt taken"),
            console("smp: cpu 1 apic 1: live apic id 1, own timer interrupt taken, wake-ups 1"),
            console("smp: 2 of 2 CPUs checked in"),
            console("scenario smp_two_cpus: PASS"),
            log("smp: cpu 1 (apic 1) online"),
            log("smp: smp-check-in posted to cpu 1"),
            log("smp: 2 of 2 CPUs checked in"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "panic_report",
        about: "a panic prints its location and message on COM1 and ends the run with failure",
        smp: 1,
        memory_mib: 256,
        qemu_args: &[],
        markers: &[
            console("scenario panic_report: start"),
            console("panic_report: panicking now"),
            console("PANIC on cpu 0 at kernel/src/scenarios/panic_report.rs:"),
            console("deliberate panic from the panic_report scenario (value 0x5eed)"),
            console("conduit: verdict failure"),
            log("scenario panic_report: start"),
        ],
        forbidden: &["EXCEPTION", "scenario panic_report: PASS", "scenario panic_report: FAIL"],
        expect: Expect::Failure,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "stack_overflow",
        about: "recursion into the boot stack's guard page is reported as a stack overflow, not memory corruption",
        smp: 1,
        memory_mib: 256,
        qemu_args: &[],
        markers: &[
            console("stack_overflow: recursing on the boot stack until the guard page"),
            console("EXCEPTION on cpu 0: #PF page fault (vector 14) error=0x2"),
            console("stack overflow: cr2 is in the guard page below the boot stack of cpu 0"),
            console("conduit: verdict failure"),
            log("scenario stack_overflow: start"),
            log("#PF page fault (vector 14)"),
        ],
        forbidden: &["PANIC", "recursion returned", "scenario stack_overflow: PASS", "scenario stack_overflow: FAIL"],
        expect: Expect::Failure,
        timeout: TIMEOUT,
    },
];

/// The scenario named `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_unique_and_default_exists() {
        for (i, a) in SCENARIOS.iter().enumerate() {
            assert!(SCENARIOS[i + 1..].iter().all(|b| b.name != a.name), "duplicate {}", a.name);
            assert!(!a.markers.is_empty(), "{} checks nothing", a.name);
            assert!(a.markers.iter().any(|m| m.stream == Stream::Log), "{} checks no defmt line", a.name);
        }
        assert!(find(DEFAULT).is_some());
    }

    #[test]
    fn verdict_statuses() {
        assert_eq!(Expect::Success.qemu_status(), 33);
        assert_eq!(Expect::Failure.qemu_status(), 65);
    }
}
