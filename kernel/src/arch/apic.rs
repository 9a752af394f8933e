//! Interrupt controllers on this machine: the local APIC (xAPIC over MMIO, or x2APIC over MSRs
//! when CPUID offers it), the I/O APICs (all pins masked: Conduit takes no legacy interrupts)
//! and the legacy PIC (remapped and masked). The logic is `conduit_apic`; this is the access.

use super::interrupts::vectors;
use conduit_apic::lapic::{APIC_BASE_ENABLE, APIC_BASE_X2APIC, IA32_APIC_BASE, X2APIC_ICR_MSR};
use conduit_apic::{ApicError, IoApic, IoApicRegs, LocalApic, LocalApicRegs, Mode, Register, pic, pit};
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

/// 0 = not initialized, 1 = xAPIC, 2 = x2APIC.
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
                // xAPIC: destination in ICR high bits 31:24; writing ICR low sends.
                self.write(Register::IcrHigh, (destination & 0xff) << 24);
                self.write(Register::IcrLow, low);
            }
            // SAFETY: x2APIC mode is enabled (see `read`); MSR 0x830 is the 64-bit ICR.
            Mode::X2Apic => unsafe { Msr::new(X2APIC_ICR_MSR).write(u64::from(destination) << 32 | u64::from(low)) },
        }
    }
}

/// The running CPU's local APIC. Before `init_bsp` it reports xAPIC at base 0 and must not be
/// used; `ready()` says whether it may.
pub fn local() -> LocalApic<Regs> {
    let mode = if MODE.load(Ordering::Acquire) == 2 { Mode::X2Apic } else { Mode::XApic };
    LocalApic::new(Regs { mode, base: BASE.load(Ordering::Acquire) })
}

/// True once the local APIC access is set up.
pub fn ready() -> bool {
    MODE.load(Ordering::Acquire) != 0
}

/// Chooses the mode (x2APIC when offered) and records the xAPIC base; the base page must
/// already be mapped uncached.
pub fn init_mode(base: u64, x2apic: bool) {
    BASE.store(base, Ordering::Release);
    MODE.store(if x2apic { 2 } else { 1 }, Ordering::Release);
}

/// Enables the local APIC of the running CPU in the chosen mode (read-modify-write of
/// IA32_APIC_BASE keeps the base and BSP bits) and returns its ID.
pub fn enable_this_cpu() -> Result<u32, ApicError> {
    let mut msr = Msr::new(IA32_APIC_BASE);
    // SAFETY:
    // 1. IA32_APIC_BASE exists on every x86-64 CPU; only the enable bits are changed, the
    //    base address and BSP flag are written back unchanged.
    // 2. x2APIC is enabled only when CPUID reported it (MODE 2 is chosen from CPUID).
    unsafe {
        let v = msr.read();
        let mut want = v | APIC_BASE_ENABLE;
        if MODE.load(Ordering::Acquire) == 2 {
            want |= APIC_BASE_X2APIC;
        }
        if want != v {
            msr.write(want);
        }
    }
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

/// An I/O APIC's IOREGSEL/IOWIN pair. Used by the bootstrap processor during bring-up only;
/// later users must serialize access (the select/window pair is not atomic).
#[derive(Clone, Copy, Debug)]
pub struct IoApicMmio {
    base: u64,
}

impl IoApicMmio {
    /// The I/O APIC at `base` (already mapped uncached).
    pub const fn new(base: u64) -> Self {
        Self { base }
    }
}

impl IoApicRegs for IoApicMmio {
    fn read(&self, index: u8) -> u32 {
        // SAFETY:
        // 1. `base` is an I/O APIC window from the MADT, identity-mapped uncached by
        //    `paging::init`; IOREGSEL (+0) and IOWIN (+0x10) are 32-bit registers inside it.
        // 2. Only the bootstrap processor uses it, during bring-up, so select+window is not
        //    interleaved with another CPU's.
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

/// Masks every pin of the I/O APIC at `base`; returns the pin count.
pub fn mask_ioapic(base: u64) -> u32 {
    IoApic::new(IoApicMmio::new(base)).mask_all()
}

/// True when every pin of the I/O APIC at `base` reads back masked.
pub fn ioapic_all_masked(base: u64) -> bool {
    let io = IoApic::new(IoApicMmio::new(base));
    (0..io.pins()).all(|p| io.is_masked(p).unwrap_or(false))
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
