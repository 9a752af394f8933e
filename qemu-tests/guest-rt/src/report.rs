//! Pass/fail bookkeeping for a test guest: each failed check prints `<prefix>: FAILED: <what>`
//! and the guest ends with `exit_code::PASS` or `exit_code::FAIL`.

use core::fmt;

use crate::{exit_code, println};

/// The failures of one test guest.
#[derive(Debug)]
pub struct Report {
    prefix: &'static str,
    failures: u32,
}

impl Report {
    /// A report whose lines start with `prefix` (the guest's name).
    pub const fn new(prefix: &'static str) -> Self {
        Self { prefix, failures: 0 }
    }

    /// Records a failure unless `ok`; returns `ok`.
    pub fn check(&mut self, ok: bool, what: fmt::Arguments) -> bool {
        if !ok {
            self.fail(what);
        }
        ok
    }

    /// The value of `result`; on an error, records a failure `<what>: <error>` and gives
    /// `None` (for set-up steps after which the guest cannot go on).
    pub fn require<T, E: fmt::Display>(&mut self, what: &str, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                self.fail(format_args!("{what}: {e}"));
                None
            }
        }
    }

    /// Records a failure unless `got == want`, printing `<what>: got <got>, expected <want>`;
    /// returns whether they were equal.
    pub fn check_eq<T: PartialEq + fmt::Debug>(&mut self, what: &str, got: T, want: T) -> bool {
        self.check(got == want, format_args!("{what}: got {got:?}, expected {want:?}"))
    }

    /// Records a failure and prints `what`.
    pub fn fail(&mut self, what: fmt::Arguments) {
        self.failures += 1;
        println!("{}: FAILED: {}", self.prefix, what);
    }

    /// Failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether every check so far passed.
    pub fn passed(&self) -> bool {
        self.failures == 0
    }

    /// The exit code: `PASS`, or `FAIL` after printing how many checks failed.
    pub fn finish(self) -> u64 {
        if self.failures == 0 {
            exit_code::PASS
        } else {
            println!("{}: {} check(s) failed", self.prefix, self.failures);
            exit_code::FAIL
        }
    }
}
