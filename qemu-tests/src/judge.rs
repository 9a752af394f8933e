//! From what a run produced to a verdict: exit status, ordered markers per stream, forbidden
//! text, defmt health, timeout. Every problem is named; nothing is skipped.

use crate::qemu::Outcome;
use crate::scenarios::{Scenario, Stream};

/// `Ok` when the run did exactly what the scenario asks, else every problem found.
pub fn judge(s: &Scenario, o: &Outcome) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if o.timed_out {
        problems.push(format!("timed out after {} s", s.timeout.as_secs()));
    }
    let want = s.expect.qemu_status();
    match o.status {
        Some(code) if code == want => {}
        Some(0) => problems.push("QEMU exited 0: the machine reset (triple fault?) instead of giving a verdict".into()),
        Some(1) => problems.push("QEMU exited 1: QEMU failed to start or the hypervisor wrote verdict 0".into()),
        Some(code) => problems.push(format!("exit status {code}, expected {want} ({:?} verdict)", s.expect)),
        None => problems.push(format!("QEMU did not exit by itself (expected status {want})")),
    }
    let log: Vec<&str> = o.log.iter().map(|l| l.message.as_str()).collect();
    let console: Vec<&str> = o.console.iter().map(String::as_str).collect();
    for stream in [Stream::Console, Stream::Log] {
        let lines = if stream == Stream::Console { &console } else { &log };
        let mut at = 0usize;
        for m in s.markers.iter().filter(|m| m.stream == stream) {
            match lines[at..].iter().position(|l| m.matches(l)) {
                Some(i) => at += i,
                None if lines.iter().any(|l| m.matches(l)) => {
                    problems.push(format!("{stream:?} marker out of order: {:?}", m.text));
                }
                None => problems.push(format!("missing {stream:?} marker: {:?}", m.text)),
            }
        }
    }
    for f in s.forbidden {
        if let Some(l) = console.iter().chain(log.iter()).find(|l| l.contains(f)) {
            problems.push(format!("forbidden text {f:?} appeared: {l:?}"));
        }
    }
    if o.malformed_frames > 0 {
        problems.push(format!("{} malformed defmt frames on COM2", o.malformed_frames));
    }
    if o.log.is_empty() {
        problems.push("no defmt line was decoded from COM2".into());
    }
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::LogLine;
    use crate::scenarios::{Expect, console, console_line, log};
    use std::time::Duration;

    const S: Scenario = Scenario {
        name: "t",
        sequence: None,
        kernel_args: &[],
        guests: false,
        cpu: crate::scenarios::DEFAULT_CPU,
        about: "",
        smp: 1,
        memory_mib: 64,
        qemu_args: &[],
        disks: &[],
        markers: &[console("a"), console("b"), log("x")],
        forbidden: &["PANIC"],
        expect: Expect::Success,
        timeout: Duration::from_secs(1),
    };

    fn line(m: &str) -> LogLine {
        LogLine { level: Some("info".into()), timestamp: None, message: m.into(), location: None }
    }

    fn good() -> Outcome {
        Outcome {
            status: Some(33),
            console: vec!["a".into(), "zz".into(), "b".into()],
            log: vec![line("x")],
            ..Outcome::default()
        }
    }

    #[test]
    fn passing_run() {
        assert_eq!(judge(&S, &good()), Ok(()));
    }

    #[test]
    fn each_problem_is_reported() {
        let mut o = good();
        o.console = vec!["b".into(), "a".into(), "PANIC x".into()];
        o.status = Some(65);
        o.malformed_frames = 2;
        let p = judge(&S, &o).unwrap_err();
        assert!(p.iter().any(|x| x.contains("exit status 65")));
        assert!(p.iter().any(|x| x.contains("out of order: \"b\"")));
        assert!(p.iter().any(|x| x.contains("forbidden text \"PANIC\"")));
        assert!(p.iter().any(|x| x.contains("2 malformed")));
        let mut o = good();
        o.log.clear();
        o.timed_out = true;
        o.status = None;
        let p = judge(&S, &o).unwrap_err();
        assert!(p.iter().any(|x| x.contains("missing Log marker: \"x\"")));
        assert!(p.iter().any(|x| x.contains("no defmt line")));
        assert!(p.iter().any(|x| x.contains("timed out")));
        assert!(p.iter().any(|x| x.contains("did not exit")));
    }

    #[test]
    fn whole_line_markers_reject_longer_lines() {
        const MARKERS: &[crate::scenarios::Marker] = &[console_line("pci: a b"), log("x")];
        let s = Scenario { markers: MARKERS, ..S };
        let mut o = good();
        o.console = vec!["pci: a b c".into()];
        assert!(judge(&s, &o).unwrap_err().iter().any(|p| p.contains("missing Console marker")));
        o.console = vec!["pci: a b  ".into()];
        assert_eq!(judge(&s, &o), Ok(()));
    }

    #[test]
    fn reset_and_startup_failure_are_named() {
        let mut o = good();
        o.status = Some(0);
        assert!(judge(&S, &o).unwrap_err()[0].contains("triple fault"));
        o.status = Some(1);
        assert!(judge(&S, &o).unwrap_err()[0].contains("failed to start"));
    }
}
