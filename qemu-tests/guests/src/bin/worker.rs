//! `worker`: a well-behaved guest that keeps its memory busy while others misbehave. Writes a
//! 4 KiB canary at the start of its free memory and a 256 KiB pseudo-random buffer after it,
//! SIGNALs 1 ("working"), then checksums the buffer round after round (FNV-1a-64; every round
//! must match the first). `BootInfo::argument` = rounds (0: until the mailbox is non-zero, which
//! is also checked every round). Then SIGNALs 2 ("finished"), checks the canary and exits.
//! vCPU `i` of a partition uses its own slice of the free range.
#![no_std]
#![no_main]

use conduit_guest_rt::report::Report;
use conduit_guest_rt::{BootInfo, entry, exit_code, hypercall, partition_name, println, time};
use conduit_test_guests::{Fnv1a64, XorShift64};

entry!(main);

/// Canary size.
const CANARY_BYTES: usize = 4096;
/// Checksummed buffer size.
const BUFFER_BYTES: usize = 256 * 1024;
/// Memory one vCPU uses from the free range.
const SLICE_BYTES: u64 = (CANARY_BYTES + BUFFER_BYTES) as u64;
/// Longest run with argument 0 before giving up on the stop request.
const OPEN_ENDED_LIMIT_US: u64 = 120_000_000;

/// SIGNAL values.
const SIGNAL_WORKING: u64 = 1;
const SIGNAL_FINISHED: u64 = 2;

/// Canary word `i`.
fn canary(i: usize) -> u64 {
    0xca4a_12ee_0000_0000 ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A range of this vCPU's free memory, accessed word by word with volatile accesses (so every
/// round really reads memory).
struct Words {
    base: *mut u64,
    len: usize,
}

impl Words {
    /// # Safety
    ///
    /// `[base, base + 8 * len)` must be 8-byte-aligned guest RAM that nothing else (no Rust
    /// object, no other vCPU) uses while the value lives.
    unsafe fn new(base: u64, len: usize) -> Self {
        Self { base: base as *mut u64, len }
    }

    fn write(&mut self, i: usize, value: u64) {
        assert!(i < self.len);
        // SAFETY:
        // 1. `i < len`, so the word is inside the range `new`'s caller gave us exclusively.
        unsafe { self.base.add(i).write_volatile(value) };
    }

    fn read(&self, i: usize) -> u64 {
        assert!(i < self.len);
        // SAFETY:
        // 1. As in `write`.
        unsafe { self.base.add(i).read_volatile() }
    }

    fn checksum(&self) -> u64 {
        let mut h = Fnv1a64::new();
        for i in 0..self.len {
            h.write_u64(self.read(i));
        }
        h.finish()
    }
}

fn main(info: &'static BootInfo) -> u64 {
    let start_us = time::uptime_us();
    let name = partition_name(info);
    let mut r = Report::new("worker");

    let base = info.free_start + u64::from(info.vcpu) * SLICE_BYTES;
    if !base.is_multiple_of(8) || base + SLICE_BYTES > info.free_end {
        println!(
            "worker {name}: FAILED: free range [{:#x}, {:#x}) has no {SLICE_BYTES} aligned bytes for vcpu {}",
            info.free_start, info.free_end, info.vcpu
        );
        return exit_code::FAIL;
    }
    // SAFETY:
    // 1. Both ranges are 8-byte aligned, inside [free_start, free_end) (checked above), which
    //    the boot protocol leaves to the guest and no Rust object occupies.
    // 2. They are disjoint, and disjoint from other vCPUs' slices (indexed by vcpu).
    let (mut canary_words, mut buffer) =
        unsafe { (Words::new(base, CANARY_BYTES / 8), Words::new(base + CANARY_BYTES as u64, BUFFER_BYTES / 8)) };

    for i in 0..canary_words.len {
        canary_words.write(i, canary(i));
    }
    let mut rng = XorShift64::new((u64::from(info.partition) + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut written = Fnv1a64::new();
    for i in 0..buffer.len {
        let value = rng.next_u64();
        buffer.write(i, value);
        written.write_u64(value);
    }
    let expected = written.finish();
    hypercall::signal(SIGNAL_WORKING);

    let target_rounds = info.argument;
    let deadline_us = start_us.saturating_add(OPEN_ENDED_LIMIT_US);
    let mut rounds = 0u64;
    let mut first = None;
    loop {
        let sum = buffer.checksum();
        rounds += 1;
        let reference = *first.get_or_insert(sum);
        if !r.check(
            sum == reference && sum == expected,
            format_args!(
                "round {rounds}: checksum {sum:#018x}, first round {reference:#018x}, written {expected:#018x}"
            ),
        ) {
            break;
        }
        if hypercall::mailbox() != 0 || (target_rounds != 0 && rounds >= target_rounds) {
            break;
        }
        if target_rounds == 0 && time::uptime_us() >= deadline_us {
            r.fail(format_args!("no stop request in the mailbox after {} s", OPEN_ENDED_LIMIT_US / 1_000_000));
            break;
        }
    }
    hypercall::signal(SIGNAL_FINISHED);

    let bad_canary = (0..canary_words.len).filter(|&i| canary_words.read(i) != canary(i)).count();
    r.check(bad_canary == 0, format_args!("{bad_canary} canary words at {base:#x} changed"));
    let elapsed_us = time::uptime_us().saturating_sub(start_us);
    if r.passed() {
        println!(
            "worker {name}: {rounds} rounds, checksum {:#018x} stable, canary intact, {elapsed_us} us",
            first.unwrap_or(expected)
        );
    }
    r.finish()
}
