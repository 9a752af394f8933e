//! The shared 32→64-bit trampoline every boot protocol jumps to, the early identity map it
//! builds, and the first Rust function, which turns the protocol's structures into a
//! [`BootRecord`] and calls the kernel.

use crate::record::{BootError, BootRecord};
use conduit_mem::{FOUR_GIB, PAGE_SIZE, PhysRange, PhysRead, PhysReadError};

/// Protocol number passed from a protocol entry to `common_start32` in `%edi`.
pub const PROTOCOL_PVH: u32 = 1;

/// CR0 for long mode: PG | WP | NE | ET | MP | PE, CD and NW clear (caches enabled whatever
/// the loader or INIT left).
pub const CR0_LONG_MODE: u32 = 0x8001_0033;

/// Size of the bootstrap processor's boot stack.
pub const BOOT_STACK_BYTES: u64 = 256 * 1024;

core::arch::global_asm!(
    r#"
    .pushsection .text.boot, "ax", @progbits
    .code32
    .global common_start32
common_start32:
    /* %edi = protocol, %esi = protocol info (physical, < 4 GiB). Paging is off. */
    cli
    cld
    mov ebp, edi
    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb 90f
    mov eax, 0x80000001
    cpuid
    test edx, 1 << 29          /* long mode */
    jz 90f
    mov ebx, edx               /* keep: bit 20 = NX */

    /* Zero .bss (QEMU and GRUB already do; real firmware may not). */
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb

    /* Early identity map of 0-4 GiB with 2 MiB pages: PML4[0] -> PDPT, PDPT[0..4] -> PD[0..4]. */
    mov eax, offset conduit_boot_pdpt
    or eax, 3
    mov dword ptr [conduit_boot_pml4], eax
    xor ecx, ecx
1:  mov eax, ecx
    shl eax, 12
    add eax, offset conduit_boot_pd
    or eax, 3
    mov dword ptr [conduit_boot_pdpt + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jb 1b
    xor ecx, ecx
2:  mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov dword ptr [conduit_boot_pd + ecx * 8], eax
    inc ecx
    cmp ecx, 2048
    jb 2b

    mov eax, 1 << 5            /* CR4: PAE only; nothing the loader left */
    mov cr4, eax
    mov eax, offset conduit_boot_pml4
    mov cr3, eax
    mov ecx, 0xc0000080        /* EFER */
    rdmsr
    or eax, 1 << 8             /* LME */
    test ebx, 1 << 20
    jz 3f
    or eax, 1 << 11            /* NXE when the CPU has NX */
3:  wrmsr
    mov eax, {cr0}             /* PG | WP | NE | ET | MP | PE: caches on whatever CD/NW were */
    mov cr0, eax
    lgdt [conduit_boot_gdtr]
    /* Far jump to 64-bit code: no stack is needed (PVH leaves ESP/SS unspecified). */
    .byte 0xea
    .long .Lconduit_boot_long_mode
    .word 0x08

90: /* No long mode: say so on COM1 and give QEMU the failure verdict. */
    mov esi, offset conduit_boot_no_long_mode
91: lodsb
    test al, al
    jz 92f
    mov dx, 0x3f8
    out dx, al
    jmp 91b
92: mov dx, {exit_port}
    mov eax, {exit_failure}
    out dx, eax
93: hlt
    jmp 93b

    .code64
.Lconduit_boot_long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, offset conduit_boot_stack_top
    mov edi, ebp               /* protocol (zero-extends) */
    mov esi, esi               /* info: the upper half is undefined after the switch */
    xor ebp, ebp
    call {main64}
    ud2
    .popsection

    .pushsection .rodata.boot, "a", @progbits
    .balign 16
conduit_boot_gdt:
    .quad 0
    .quad 0x00af9b000000ffff   /* 0x08: 64-bit code (accessed bit preset: the GDT is read-only) */
    .quad 0x00cf93000000ffff   /* 0x10: data (accessed) */
conduit_boot_gdt_end:
conduit_boot_gdtr:
    .word conduit_boot_gdt_end - conduit_boot_gdt - 1
    .quad conduit_boot_gdt
conduit_boot_no_long_mode:
    .asciz "conduit: this CPU has no long mode; stopping\r\n"
    .popsection

    /* Guard page, boot stack, then the early tables above the stack: the stack grows
       away from the tables, and once the kernel's own tables are active the guard page
       below it is unmapped. */
    .pushsection .bss.boot, "aw", @nobits
    .balign 4096
    .global conduit_boot_stack_guard
conduit_boot_stack_guard:
    .skip 4096
    .skip {stack_bytes}
    .global conduit_boot_stack_top
conduit_boot_stack_top:
    .global conduit_boot_pml4
conduit_boot_pml4:
    .skip 4096
conduit_boot_pdpt:
    .skip 4096
conduit_boot_pd:
    .skip 4096 * 4
    .popsection
    "#,
    main64 = sym boot_main64,
    exit_port = const crate::verdict::DEBUG_EXIT_PORT,
    exit_failure = const crate::verdict::FAILURE,
    stack_bytes = const BOOT_STACK_BYTES,
    cr0 = const CR0_LONG_MODE,
);

unsafe extern "C" {
    static conduit_boot_pml4: u8;
    static conduit_boot_stack_guard: u8;
    static conduit_boot_stack_top: u8;
}

unsafe extern "Rust" {
    /// Defined by the kernel through `kernel_entry!`.
    fn conduit_kernel_entry(record: Result<&'static BootRecord, BootError>) -> !;
}

static RECORD: spin::Once<BootRecord> = spin::Once::new();

/// Physical address of the early PML4 (identity map of 0–4 GiB, 2 MiB pages, everything
/// writable and executable). Application processors pass through it on their way to the
/// kernel's own tables; nothing else uses it after the kernel switches.
pub fn early_page_table_root() -> u64 {
    (&raw const conduit_boot_pml4) as u64
}

/// The bootstrap processor's boot stack, and below it the guard page the kernel unmaps.
pub fn boot_stack() -> (PhysRange, u64) {
    let guard = (&raw const conduit_boot_stack_guard) as u64;
    let top = (&raw const conduit_boot_stack_top) as u64;
    (PhysRange::new(guard + PAGE_SIZE, top), guard)
}

/// The x86 fixed device-register window (I/O APIC, HPET, local APIC, flash): never read as
/// memory.
const FIXED_MMIO: (u64, u64) = (0xfec0_0000, FOUR_GIB);

static EARLY_MAP_RETIRED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Marks the early identity map as gone; from now on `EarlyPhys` refuses every read. The
/// kernel calls it right before it loads its own page tables.
pub fn retire_early_map() {
    EARLY_MAP_RETIRED.store(true, core::sync::atomic::Ordering::SeqCst);
}

/// Reads firmware structures (boot protocol, ACPI) through the early identity map while it is
/// active: anything in (0, 4 GiB) outside the fixed MMIO window. Address 0 itself is refused
/// (a null pointer); the rest of page 0 is readable (QEMU's PVH loader puts `hvm_start_info`
/// there). After `retire_early_map` every read fails.
#[derive(Clone, Copy, Debug, Default)]
pub struct EarlyPhys;

impl PhysRead for EarlyPhys {
    fn read_bytes(&self, paddr: u64, buf: &mut [u8]) -> Result<(), PhysReadError> {
        let err = PhysReadError { paddr, len: buf.len() };
        let end = paddr.checked_add(buf.len() as u64).ok_or(err)?;
        let in_mmio = paddr < FIXED_MMIO.1 && end > FIXED_MMIO.0;
        if paddr == 0 || end > FOUR_GIB || in_mmio || EARLY_MAP_RETIRED.load(core::sync::atomic::Ordering::SeqCst) {
            return Err(err);
        }
        // SAFETY:
        // 1. The early identity map (built by common_start32) is still the active one: the
        //    kernel retires it (making this branch unreachable) before loading its own tables.
        //    It maps all of [0, 4 GiB), so `[paddr, end)` is mapped and non-null.
        // 2. The range is outside the fixed device-register window, so the copy reads memory,
        //    not registers with read side effects; any bit pattern is a valid u8, and `buf` is
        //    a distinct, exclusively borrowed Rust buffer, so the ranges do not overlap.
        unsafe {
            core::ptr::copy_nonoverlapping(paddr as *const u8, buf.as_mut_ptr(), buf.len());
        }
        Ok(())
    }
}

/// First Rust code: in long mode, on the boot stack, interrupts off.
extern "C" fn boot_main64(protocol: u32, info: u64) -> ! {
    let parsed = match protocol {
        PROTOCOL_PVH => crate::pvh::parse(&EarlyPhys, info),
        _ => Err(BootError::UnknownProtocol(protocol)),
    };
    let record = parsed.map(|r| RECORD.call_once(|| r));
    // SAFETY:
    // 1. `conduit_kernel_entry` is defined by the kernel through `kernel_entry!`, which fixes
    //    its Rust-ABI signature to exactly this declaration.
    // 2. It is called once, here, on the bootstrap processor, as its contract states.
    unsafe { conduit_kernel_entry(record) }
}
