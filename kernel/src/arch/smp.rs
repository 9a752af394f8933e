//! Application processors: each enabled CPU in the MADT is started with INIT-SIPI-SIPI through
//! a real-mode trampoline copied to `TRAMPOLINE_PADDR`. The trampoline climbs to long mode on
//! the boot crate's early identity map, jumps into the image, which loads the kernel's tables,
//! switches to the CPU's own guarded stack and runs `ap_main`. APs are started one at a time:
//! each must check in (bounded wait) before the parameter block is reused.

use super::percpu::{self, CpuState, MAX_CPUS, PerCpu};
use super::stacks::{BLOCK_BYTES, CpuStacks};
use conduit_mem::PAGE_SIZE;
use core::sync::atomic::{AtomicUsize, Ordering};
use x86_64::instructions::interrupts;

/// Physical page the trampoline runs from (SIPI vector 0x08). Below 1 MiB, never allocated.
pub const TRAMPOLINE_PADDR: u64 = 0x8000;
/// INIT → SIPI delay (Intel MP spec: 10 ms).
const INIT_DELAY_US: u64 = 10_000;
/// SIPI → SIPI delay (200 µs).
const SIPI_DELAY_US: u64 = 200;
/// How long an AP may take to check in.
const CHECK_IN_TIMEOUT_US: u64 = 500_000;

static ONLINE: AtomicUsize = AtomicUsize::new(1);

/// CPUs running Conduit code (the bootstrap processor included).
pub fn online() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// Parameters the trampoline reads (layout fixed by the asm below).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ApParams {
    early_cr3: u64,
    efer_nxe: u64,
    kernel_cr3: u64,
    stack_top: u64,
    entry: u64,
    cpu_index: u64,
}

core::arch::global_asm!(
    r#"
    .pushsection .rodata.ap_trampoline, "a", @progbits
    .balign 16
    .global conduit_ap_trampoline_start
conduit_ap_trampoline_start:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdtr - conduit_ap_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, ${base} + (ap_pm32 - conduit_ap_trampoline_start)

    .code32
ap_pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $0x20, %eax                        /* CR4: PAE only */
    movl %eax, %cr4
    movl ({base} + (conduit_ap_params - conduit_ap_trampoline_start)), %eax
    movl %eax, %cr3                         /* early identity map */
    movl $0xc0000080, %ecx                  /* EFER */
    rdmsr
    orl $0x100, %eax                        /* LME */
    orl ({base} + (conduit_ap_params - conduit_ap_trampoline_start) + 8), %eax   /* NXE */
    wrmsr
    movl ${cr0}, %eax                       /* PG|WP|NE|ET|MP|PE; CD/NW cleared */
    movl %eax, %cr0
    ljmpl $0x18, ${base} + (ap_lm64 - conduit_ap_trampoline_start)

    .code64
ap_lm64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movq ({base} + (conduit_ap_params - conduit_ap_trampoline_start) + 16), %rax   /* kernel CR3 */
    movq ({base} + (conduit_ap_params - conduit_ap_trampoline_start) + 24), %rsi   /* stack top */
    movq ({base} + (conduit_ap_params - conduit_ap_trampoline_start) + 40), %rdi   /* cpu index */
    movq ({base} + (conduit_ap_params - conduit_ap_trampoline_start) + 32), %rcx   /* entry */
    jmpq *%rcx

    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff                /* 0x08: 32-bit code (accessed) */
    .quad 0x00cf93000000ffff                /* 0x10: data (accessed) */
    .quad 0x00af9b000000ffff                /* 0x18: 64-bit code (accessed) */
ap_gdt_end:
ap_gdtr:
    .word ap_gdt_end - ap_gdt - 1
    .long {base} + (ap_gdt - conduit_ap_trampoline_start)
    .balign 8
    .global conduit_ap_params
conduit_ap_params:
    .skip 48
    .global conduit_ap_trampoline_end
conduit_ap_trampoline_end:
    .popsection
    "#,
    base = const TRAMPOLINE_PADDR,
    cr0 = const conduit_boot::entry::CR0_LONG_MODE,
    options(att_syntax),
);

unsafe extern "C" {
    static conduit_ap_trampoline_start: u8;
    static conduit_ap_params: u8;
    static conduit_ap_trampoline_end: u8;
}

/// First code of an AP in the image (still on the early map): load the kernel's tables, switch
/// to the CPU's own stack, call `ap_main(cpu_index)`.
#[unsafe(naked)]
extern "C" fn ap_entry64() -> ! {
    core::arch::naked_asm!(
        "mov cr3, rax",
        "mov rsp, rsi",
        "xor ebp, ebp",
        "call {main}",
        "ud2",
        main = sym ap_main,
    )
}

/// Why starting application processors failed.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum SmpError {
    /// No frames for a CPU's stacks.
    NoStackMemory,
    /// Page-table change for the guard pages failed.
    Paging(conduit_paging::MapError),
    /// The trampoline does not fit its page.
    TrampolineTooBig,
    /// The kernel page tables are not active.
    NoKernelTables,
}

/// Highest APIC ID the xAPIC ICR can address (0xFF is broadcast).
const XAPIC_MAX_ID: u32 = 0xfe;

/// The CPUs to start: enabled in the MADT, not the running one, each APIC ID once, no
/// broadcast ID, and addressable in the APIC mode in use.
fn targets(madt: &conduit_acpi::Madt, bsp_apic_id: u32, x2apic: bool) -> heapless::Vec<u32, MAX_CPUS> {
    let mut ids: heapless::Vec<u32, MAX_CPUS> = heapless::Vec::new();
    for c in madt.enabled_cpus() {
        let id = c.apic_id;
        let addressable = if x2apic { id != u32::MAX } else { id <= XAPIC_MAX_ID };
        if id == bsp_apic_id || !addressable || ids.contains(&id) {
            if id != bsp_apic_id {
                defmt::warn!("smp: skipping APIC ID {=u32:#x} (duplicate or not addressable)", id);
            }
            continue;
        }
        if ids.len() + 1 >= MAX_CPUS || ids.push(id).is_err() {
            defmt::warn!("smp: more than {=usize} CPUs; the rest stay offline", MAX_CPUS);
            break;
        }
    }
    ids
}

/// Starts every enabled CPU of `madt` other than the running one; returns how many came
/// online. A CPU that does not check in is put back into wait-for-SIPI with INIT (so it can
/// never run on the next CPU's parameters), reported and skipped; not fatal.
pub fn start_aps(madt: &conduit_acpi::Madt, bsp_apic_id: u32, nx: bool, x2apic: bool) -> Result<usize, SmpError> {
    let kernel_cr3 = super::paging::root().ok_or(SmpError::NoKernelTables)?;
    let targets = targets(madt, bsp_apic_id, x2apic);
    // Stacks first, for every AP, with guards unmapped before any AP runs (so no CPU can hold
    // a stale translation of a guard page).
    let mut planned = 0usize;
    for i in 0..targets.len() {
        let slot = percpu::cpu(i + 1).ok_or(SmpError::NoStackMemory)?;
        let base = crate::mem::alloc_contiguous(BLOCK_BYTES / PAGE_SIZE, PAGE_SIZE, u64::MAX)
            .map_err(|_| SmpError::NoStackMemory)?;
        let stacks = CpuStacks::at(base);
        super::paging::unmap_guards_before_smp(&stacks.guards()).map_err(SmpError::Paging)?;
        slot.stacks.call_once(|| stacks);
        planned += 1;
    }
    install_trampoline()?;
    let mut started = 0;
    for (i, &apic_id) in targets.iter().enumerate().take(planned) {
        let index = i + 1;
        let Some(slot) = percpu::cpu(index) else { break };
        let Some(stacks) = slot.stacks.get() else { break };
        slot.apic_id.store(apic_id, Ordering::Relaxed);
        write_params(ApParams {
            early_cr3: conduit_boot::entry::early_page_table_root(),
            efer_nxe: if nx { 1 << 11 } else { 0 },
            kernel_cr3,
            stack_top: stacks.kernel_top(),
            entry: ap_entry64 as *const () as u64,
            cpu_index: index as u64,
        });
        slot.set_state(CpuState::Starting);
        match wake(apic_id, slot) {
            Ok(()) => {
                started += 1;
                defmt::info!("smp: cpu {=usize} (apic {=u32}) online", index, apic_id);
            }
            Err(e) => {
                // Park it again before the parameter block is reused for the next CPU.
                let _ = super::apic::local().send_init(apic_id);
                super::time::delay_us(INIT_DELAY_US);
                slot.set_state(CpuState::Offline);
                defmt::error!("smp: cpu {=usize} (apic {=u32}) did not start: {}", index, apic_id, e);
                crate::println!("smp: cpu {} (apic {}) did not start: {:?}", index, apic_id, e);
            }
        }
    }
    Ok(started)
}

/// Why one AP did not come up.
#[derive(Clone, Copy, Debug, defmt::Format)]
enum WakeError {
    /// An IPI could not be sent.
    Ipi(conduit_apic::ApicError),
    /// No check-in within `CHECK_IN_TIMEOUT_US`.
    NoCheckIn,
}

fn wake(apic_id: u32, slot: &PerCpu) -> Result<(), WakeError> {
    let apic = super::apic::local();
    apic.send_init(apic_id).map_err(WakeError::Ipi)?;
    super::time::delay_us(INIT_DELAY_US);
    let page = (TRAMPOLINE_PADDR >> 12) as u8;
    for _ in 0..2 {
        apic.send_startup(apic_id, page).map_err(WakeError::Ipi)?;
        super::time::delay_us(SIPI_DELAY_US);
        if slot.state() == CpuState::Online {
            return Ok(());
        }
    }
    let deadline = super::time::deadline_after_us(CHECK_IN_TIMEOUT_US);
    while !super::time::passed(deadline) {
        if slot.state() == CpuState::Online {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(WakeError::NoCheckIn)
}

fn trampoline_bytes() -> (u64, u64, u64) {
    let start = (&raw const conduit_ap_trampoline_start) as u64;
    let params = (&raw const conduit_ap_params) as u64;
    let end = (&raw const conduit_ap_trampoline_end) as u64;
    (start, params, end)
}

fn install_trampoline() -> Result<(), SmpError> {
    let (start, _, end) = trampoline_bytes();
    let len = end - start;
    if len > PAGE_SIZE {
        return Err(SmpError::TrampolineTooBig);
    }
    // SAFETY:
    // 1. The source is the trampoline blob in the image's rodata (`len` bytes, mapped R).
    // 2. The destination page 0x8000 is conventional memory below 1 MiB: never handed out by
    //    the frame allocator, identity-mapped read-write by the kernel's tables, and used by
    //    nothing else once the boot record was copied. No AP is running from it now.
    unsafe { core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE_PADDR as *mut u8, len as usize) };
    Ok(())
}

fn write_params(p: ApParams) {
    let (start, params, _) = trampoline_bytes();
    let dst = TRAMPOLINE_PADDR + (params - start);
    // SAFETY:
    // 1. `dst` is the 48-byte parameter block inside the trampoline copy (8-aligned by the
    //    asm's `.balign 8`; the copy starts page-aligned), in the page described in
    //    `install_trampoline`.
    // 2. No AP reads it concurrently: APs are started one at a time, and each has checked in
    //    (it copied its parameters into registers before that) or was sent INIT, which stops
    //    it, before the next `write_params`.
    unsafe { core::ptr::write_volatile(dst as *mut ApParams, p) };
}

/// Rust entry of an application processor, on its own kernel stack, kernel tables loaded.
extern "C" fn ap_main(index: u64) -> ! {
    let Some(me) = percpu::install(index as usize) else { crate::exit::halt_forever() };
    let Some(stacks) = me.stacks.get() else { crate::exit::halt_forever() };
    me.tables.load(stacks);
    super::idt::load();
    super::cpu::enable_fxsr();
    match super::apic::enable_this_cpu() {
        Ok(id) => me.apic_id.store(id, Ordering::Relaxed),
        Err(e) => {
            defmt::error!("smp: cpu {=usize}: local APIC: {}", me.index(), e);
            crate::exit::halt_forever();
        }
    }
    if let Err(e) = super::svm::enable_this_cpu(me.index()) {
        defmt::warn!("smp: cpu {=usize}: svm: {}", me.index(), e);
    }
    ONLINE.fetch_add(1, Ordering::AcqRel);
    me.set_state(CpuState::Online);
    idle(me)
}

/// Runs posted work; sleeps in `hlt` otherwise. `sti; hlt` is atomic with respect to
/// interrupts, so a wake-up IPI sent after the mailbox check still ends the `hlt`.
pub fn idle(me: &'static PerCpu) -> ! {
    loop {
        interrupts::disable();
        if let Some(work) = me.take_work() {
            interrupts::enable();
            (work.run)(me);
            continue;
        }
        interrupts::enable_and_hlt();
    }
}

/// Why work could not be handed to a CPU.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum RunError {
    /// No such CPU, or it is not online.
    NotOnline(usize),
    /// Earlier work is still pending there.
    Busy(usize),
    /// The wake-up IPI could not be sent.
    Ipi(conduit_apic::ApicError),
}

/// Posts `work` to CPU `index` and wakes it with an IPI.
pub fn run_on(index: usize, work: &'static percpu::Work) -> Result<(), RunError> {
    let cpu = percpu::cpu(index).filter(|c| c.state() == CpuState::Online).ok_or(RunError::NotOnline(index))?;
    cpu.post(work).map_err(|_| RunError::Busy(index))?;
    defmt::debug!("smp: {=str} posted to cpu {=usize}", work.name, index);
    super::apic::local()
        .send_fixed(cpu.apic_id.load(Ordering::Relaxed), super::interrupts::vectors::WAKEUP)
        .map_err(RunError::Ipi)
}
