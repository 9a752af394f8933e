//! `stack_overflow`: unbounded recursion on the boot stack runs into its unmapped guard page;
//! the #PF is taken on its own IST stack and reported as a stack overflow naming the stack,
//! and the run ends with the failure verdict (instead of silently corrupting memory).

use crate::{Platform, println};

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 512];
    frame[0] = depth as u8;
    core::hint::black_box(&mut frame);
    if depth == u64::MAX {
        return 0;
    }
    recurse(depth + 1) + u64::from(frame[1])
}

pub fn run(_p: &Platform) -> Result<(), &'static str> {
    println!("stack_overflow: recursing on the boot stack until the guard page");
    let n = core::hint::black_box(recurse(0));
    println!("stack_overflow: recursion returned {}", n);
    Err("recursion ended without reaching the guard page")
}
