//! Interrupt controllers on this machine: the local APIC (xAPIC over MMIO, or x2APIC over MSRs
//! when CPUID offers it), the I/O APICs (all pins masked: Conduit takes no legacy interrupts)
//! and the legacy PIC (remapped and masked). The logic is `conduit_apic`; this is the access.

use super::interrupts::vectors;
use conduit_apic::lapic::{APIC_BASE_ENABLE, APIC_BASE_X2APIC, IA32_APIC_BASE, X2APIC_ICR_MSR};
use conduit_apic::{ApicError, IoApic, IoApicRegs, LocalApic, LocalApicRegs, Mode, Register, pic, pit};
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

/// 0 = not initialized, 1 = xAPIC everywhere, 2 = each CPU switches to x2APIC when it enables
/// its APIC (the per-CPU flag says whether the running CPU already has).
static MODE: AtomicU8 = AtomicU8::new(0);
/// xAPIC register base (identity-mapped, uncached).
static BASE: AtomicU64 = AtomicU64::new(0);

/// Size of the xAPIC register page.
pub const XAPIC_MMIO_BYTES: u64 = 0x1000;
/// Size of an I/O APIC register window.
pub const IOAPIC_MMIO_BYTES: u64 = 0x20;

/// Register access for the running CPU's local APIC, in the mode chosen at boot.
#[derive(Clone, Copy, Debug)]
pub struct Regs {
    mode: Mode,
    base: u64,
}

impl Regs {
    fn mmio(&self, reg: Register) -> *mut u32 {
        (self.base + u64::from(reg.offset())) as *mut u32
    }
}

impl LocalApicRegs for Regs {
    fn mode(&self) -> Mode {
        self.mode
    }

    fn read(&self, reg: Register) -> u32 {
        match self.mode {
            // SAFETY:
            // 1. `base` is the local APIC page, identity-mapped uncached by `paging::init`
            //    before MODE was published; `reg.offset()` < 0x400 lies inside it, 16-aligned.
            // 2. A 32-bit volatile load is the access the xAPIC requires (SDM §12.4.1).
            Mode::XApic => unsafe { core::ptr::read_volatile(self.mmio(reg)) },
            // SAFETY:
            // 1. x2APIC mode is enabled in IA32_APIC_BASE on this CPU before MODE says so, and
            //    every `Register` maps to an architected x2APIC MSR (Table 12-6).
            Mode::X2Apic => unsafe { Msr::new(reg.msr()).read() as u32 },
        }
    }

    fn write(&self, reg: Register, value: u32) {
        match self.mode {
            // SAFETY: as in `read`; writable registers only are passed by `conduit_apic`.
            Mode::XApic => unsafe { core::ptr::write_volatile(self.mmio(reg), value) },
            // SAFETY: as in `read`.
            Mode::X2Apic => unsafe { Msr::new(reg.msr()).write(u64::from(value)) },
        }
    }

    fn write_icr(&self, destination: u32, low: u32) {
        match self.mode {
            Mode::XApic => {
                // xAPIC: destination in ICR high bits 31:24; writing ICR low sends. The pair
                // must not be split by a handler on this CPU that sends an IPI itself.
                x86_64::instructions::interrupts::without_interrupts(|| {
                    self.write(Register::IcrHigh, (destination & 0xff) << 24);
                    self.write(Register::IcrLow, low);
                });
            }
            // SAFETY:
            // 1. x2APIC mode is enabled on this CPU (see `read`); MSR 0x830 is the 64-bit ICR.
            // 2. `mfence; lfence` first: a WRMSR to an x2APIC register is not ordered after
            //    earlier stores (SDM §12.12.3), and the IPI's receiver must see them (mailbox
            //    work, the stopping flag, AP parameters). The fences touch no memory.
            Mode::X2Apic => unsafe {
                core::arch::asm!("mfence", "lfence", options(nostack, preserves_flags));
                Msr::new(X2APIC_ICR_MSR).write(u64::from(destination) << 32 | u64::from(low))
            },
        }
    }
}

/// The running CPU's local APIC, in the mode this CPU is in now (a CPU is in xAPIC mode until
/// `enable_this_cpu` switched it). Must not be used before `init_mode` (`ready()`).
pub fn local() -> LocalApic<Regs> {
    let mode = if super::percpu::this_cpu().x2apic.load(Ordering::Acquire) { Mode::X2Apic } else { Mode::XApic };
    LocalApic::new(Regs { mode, base: BASE.load(Ordering::Acquire) })
}

/// The local APIC of `me`, which must be the running CPU (saves looking it up again on the
/// device-interrupt path).
pub fn local_of(me: &super::percpu::PerCpu) -> LocalApic<Regs> {
    let mode = if me.x2apic.load(Ordering::Acquire) { Mode::X2Apic } else { Mode::XApic };
    LocalApic::new(Regs { mode, base: BASE.load(Ordering::Acquire) })
}

/// True once the local APIC access is set up.
pub fn ready() -> bool {
    MODE.load(Ordering::Acquire) != 0
}

/// The local APIC's physical base as this CPU's IA32_APIC_BASE says (bits 51:12).
pub fn msr_base() -> u64 {
    // SAFETY: reading IA32_APIC_BASE has no side effects; it exists on every x86-64 CPU.
    unsafe { Msr::new(IA32_APIC_BASE).read() & 0x000f_ffff_ffff_f000 }
}

/// Chooses the mode (x2APIC when offered) and records the xAPIC base; the base page must
/// already be mapped uncached.
pub fn init_mode(base: u64, x2apic: bool) {
    BASE.store(base, Ordering::Release);
    MODE.store(if x2apic { 2 } else { 1 }, Ordering::Release);
}

/// Enables the local APIC of the running CPU in the chosen mode and returns its ID. Read-modify-
/// write of IA32_APIC_BASE keeps the base and BSP bits; x2APIC is entered from xAPIC-enabled
/// (disabled → x2APIC directly is an illegal transition, SDM Figure 12-27).
pub fn enable_this_cpu() -> Result<u32, ApicError> {
    let mut msr = Msr::new(IA32_APIC_BASE);
    let x2 = MODE.load(Ordering::Acquire) == 2;
    // SAFETY:
    // 1. IA32_APIC_BASE exists on every x86-64 CPU; only the enable bits change, the base
    //    address and BSP flag are written back unchanged.
    // 2. Transitions are legal: disabled → xAPIC enabled, then xAPIC → x2APIC, and x2APIC
    //    only when CPUID reported it (MODE 2 is chosen from CPUID).
    unsafe {
        let v = msr.read();
        if v & APIC_BASE_ENABLE == 0 {
            msr.write(v | APIC_BASE_ENABLE);
        }
        if x2 && v & APIC_BASE_X2APIC == 0 {
            msr.write(v | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
        }
    }
    super::percpu::this_cpu().x2apic.store(x2, Ordering::Release);
    let apic = local();
    apic.enable(vectors::SPURIOUS, vectors::APIC_ERROR)?;
    Ok(apic.id())
}

/// Sends an NMI to every other CPU (used when the run ends), without waiting on anything.
pub fn nmi_others() {
    if !ready() {
        return;
    }
    let apic = local();
    let low = (conduit_apic::lapic::Icr::NMI
        | conduit_apic::lapic::Icr::ASSERT
        | conduit_apic::lapic::Icr::ALL_EXCLUDING_SELF)
        .bits();
    apic.regs().write_icr(0, low);
}

/// An I/O APIC's IOREGSEL/IOWIN pair. Only the registry below builds one, from an MADT
/// address that bring-up validated and mapped uncached; all access goes through the registry's
/// lock (the select/window pair is not atomic).
#[derive(Clone, Copy, Debug)]
struct IoApicMmio {
    base: u64,
}

impl IoApicRegs for IoApicMmio {
    fn read(&self, index: u8) -> u32 {
        // SAFETY:
        // 1. `base` is an I/O APIC window from the MADT that `register_ioapics` accepted
        //    (page-aligned, outside RAM and the image) after `paging::init` mapped it uncached;
        //    IOREGSEL (+0) and IOWIN (+0x10) are 32-bit registers inside it.
        // 2. Accesses run under the registry lock, so select+window is never interleaved with
        //    another CPU's.
        unsafe {
            core::ptr::write_volatile((self.base + conduit_apic::ioapic::IOREGSEL) as *mut u32, u32::from(index));
            core::ptr::read_volatile((self.base + conduit_apic::ioapic::IOWIN) as *const u32)
        }
    }

    fn write(&self, index: u8, value: u32) {
        // SAFETY: as in `read`.
        unsafe {
            core::ptr::write_volatile((self.base + conduit_apic::ioapic::IOREGSEL) as *mut u32, u32::from(index));
            core::ptr::write_volatile((self.base + conduit_apic::ioapic::IOWIN) as *mut u32, value);
        }
    }
}

static IOAPICS: crate::sync::IrqMutex<heapless::Vec<IoApicMmio, { conduit_acpi::madt::MAX_IOAPICS }>> =
    crate::sync::IrqMutex::new(heapless::Vec::new());

/// Records the I/O APICs at `bases` (validated by the caller against the memory map and
/// already mapped uncached by `paging::init`).
pub fn register_ioapics(bases: impl Iterator<Item = u64>) {
    let mut list = IOAPICS.lock();
    for base in bases {
        let _ = list.push(IoApicMmio { base });
    }
}

/// Masks every pin of every registered I/O APIC; returns the pin count.
pub fn mask_all_ioapics() -> u32 {
    IOAPICS.lock().iter().map(|io| IoApic::new(*io).mask_all()).sum()
}

/// True when every pin of every registered I/O APIC reads back masked.
pub fn ioapics_all_masked() -> bool {
    IOAPICS.lock().iter().all(|io| {
        let io = IoApic::new(*io);
        (0..io.pins()).all(|p| io.is_masked(p).unwrap_or(false))
    })
}

/// Remaps the legacy PIC to `PIC_BASE` and masks every line.
pub fn disable_pic() {
    for (port, value) in pic::disable_sequence(vectors::PIC_BASE) {
        // SAFETY:
        // 1. Ports 0x20/0x21/0xa0/0xa1 are the 8259A pair on every PC-compatible machine; the
        //    sequence is the documented ICW1-4 + OCW1 initialization and has no other effect.
        unsafe { Port::<u8>::new(port).write(value) };
    }
}

/// Port I/O for the PIT (channel 2 and port 0x61).
#[derive(Debug)]
pub struct PitPorts;

impl pit::Ports for PitPorts {
    fn inb(&mut self, port: u16) -> u8 {
        debug_assert!(port == pit::PORT_B);
        // SAFETY:
        // 1. Reading port 0x61 (NMI status / PIT gate) has no side effects.
        unsafe { Port::<u8>::new(port).read() }
    }

    fn outb(&mut self, port: u16, value: u8) {
        debug_assert!(matches!(port, pit::PORT_B | pit::COMMAND | pit::CHANNEL2));
        // SAFETY:
        // 1. Only the PIT command port, channel 2 data and port B are written (asserted
        //    above); channel 2 drives nothing but the speaker, which stays off.
        unsafe { Port::<u8>::new(port).write(value) };
    }
}
