//! Stacks for each CPU, each with an unmapped guard page below it so an overflow faults
//! (onto the #DF IST stack) instead of corrupting memory. The bootstrap processor's IST stacks
//! are a static block (exceptions work from its first instruction); application processors'
//! come from the frame allocator. One layout serves both.

use conduit_mem::PAGE_SIZE;
use core::cell::UnsafeCell;

/// Kernel stack per application processor.
pub const KERNEL_STACK_BYTES: u64 = 64 * 1024;
/// Each IST stack.
pub const IST_STACK_BYTES: u64 = 16 * 1024;
/// IST slots in the TSS.
pub const IST_COUNT: usize = 7;
/// Bytes of one CPU's block: [guard][kernel stack] then 7 × [guard][IST stack].
pub const BLOCK_BYTES: u64 =
    (1 + IST_COUNT as u64) * PAGE_SIZE + KERNEL_STACK_BYTES + IST_COUNT as u64 * IST_STACK_BYTES;

/// Where one CPU's stacks are.
#[derive(Clone, Copy, Debug)]
pub struct CpuStacks {
    base: u64,
}

impl CpuStacks {
    /// The layout over a block starting at `base` (page-aligned, `BLOCK_BYTES` long).
    pub const fn at(base: u64) -> Self {
        Self { base }
    }

    /// Top of the kernel stack (16-byte aligned).
    pub fn kernel_top(&self) -> u64 {
        self.base + PAGE_SIZE + KERNEL_STACK_BYTES
    }

    /// Top of IST stack `i` (0-based: TSS IST1 is `i = 0`).
    pub fn ist_top(&self, i: usize) -> u64 {
        self.kernel_top() + (i as u64 + 1) * (PAGE_SIZE + IST_STACK_BYTES)
    }

    /// The guard pages, lowest first.
    pub fn guards(&self) -> [u64; 1 + IST_COUNT] {
        let mut g = [0u64; 1 + IST_COUNT];
        g[0] = self.base;
        for (i, slot) in g.iter_mut().enumerate().skip(1) {
            *slot = self.kernel_top() + (i as u64 - 1) * (PAGE_SIZE + IST_STACK_BYTES);
        }
        g
    }
}

/// Which stack's guard page `addr` falls in, if any: (CPU index, stack name).
pub fn guard_owner(addr: u64) -> Option<(usize, &'static str)> {
    let page = addr & !(PAGE_SIZE - 1);
    let (_, boot_guard) = conduit_boot::entry::boot_stack();
    if page == boot_guard {
        return Some((0, "the boot stack"));
    }
    const NAMES: [&str; 1 + IST_COUNT] = [
        "the kernel stack",
        "IST1 (NMI)",
        "IST2 (#DF)",
        "IST3 (#MC)",
        "IST4 (#PF)",
        "IST5 (exceptions)",
        "IST6 (interrupts)",
        "IST7 (#DB/#BP)",
    ];
    super::percpu::all().iter().find_map(|cpu| {
        let stacks = cpu.stacks.get()?;
        let i = stacks.guards().iter().position(|&g| g == page)?;
        Some((cpu.index(), NAMES[i]))
    })
}

/// Memory the CPU uses as stack: only ever written through RSP, never through a Rust reference.
#[repr(C, align(4096))]
pub struct StackBlock(UnsafeCell<[u8; BLOCK_BYTES as usize]>);

// SAFETY:
// 1. Rust code never reads or writes the contents; only the one CPU whose TSS and RSP point
//    into the block uses it, as stack. Sharing the address between CPUs is therefore sound.
unsafe impl Sync for StackBlock {}

/// The bootstrap processor's block.
pub static BSP_STACKS: StackBlock = StackBlock(UnsafeCell::new([0; BLOCK_BYTES as usize]));

impl StackBlock {
    /// Layout over this block.
    pub fn layout(&'static self) -> CpuStacks {
        CpuStacks::at(self.0.get() as u64)
    }
}
