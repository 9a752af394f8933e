//! The VMCB (AMD64 APM Vol. 2, Appendix B): control area (intercepts, interrupt control, exit
//! information, event injection, nested paging) and state save area, as one 4 KiB
//! `#[repr(C)]` structure whose every field offset is checked at compile time.

use bitflags::bitflags;

/// A segment register in the save area (selector, attributes, limit, base).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Selector.
    pub selector: u16,
    /// Attributes: descriptor bits 47:40 in 7:0 and 55:52 in 11:8.
    pub attrib: u16,
    /// Limit.
    pub limit: u32,
    /// Base.
    pub base: u64,
}

/// Segment attribute values used for guests.
pub mod attrib {
    /// 64-bit code: type 0xB (execute/read, accessed), S, P, L, G.
    pub const CODE64: u16 = 0x9b | 1 << 9 | 1 << 11;
    /// Data: type 0x3 (read/write, accessed), S, P, D/B, G.
    pub const DATA: u16 = 0x93 | 1 << 10 | 1 << 11;
    /// Busy 64-bit TSS, present.
    pub const TSS64: u16 = 0x8b;
    /// LDT, present.
    pub const LDT: u16 = 0x82;
}

/// Control area, offsets 0x000–0x3FF.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ControlArea {
    /// CR reads (15:0) and writes (31:16) intercepted.
    pub intercept_cr: u32,
    /// DR reads (15:0) and writes (31:16) intercepted.
    pub intercept_dr: u32,
    /// Exception vectors intercepted.
    pub intercept_exceptions: u32,
    /// `Misc1` intercepts.
    pub intercept_misc1: u32,
    /// `Misc2` intercepts.
    pub intercept_misc2: u32,
    /// Further intercepts (newer CPUs).
    pub intercept_misc3: u32,
    reserved1: [u8; 0x24],
    /// Pause filter threshold.
    pub pause_filter_threshold: u16,
    /// Pause filter count.
    pub pause_filter_count: u16,
    /// I/O permission map (12 KiB, physical).
    pub iopm_base_pa: u64,
    /// MSR permission map (8 KiB, physical).
    pub msrpm_base_pa: u64,
    /// Added to the TSC the guest reads.
    pub tsc_offset: u64,
    /// Guest ASID (never 0).
    pub guest_asid: u32,
    /// TLB control (`tlb_control::*`).
    pub tlb_control: u8,
    reserved2: [u8; 3],
    /// Virtual interrupt control (`int_ctl::*`).
    pub int_ctl: u64,
    /// Interrupt shadow (bit 0) and guest interrupt mask (bit 1).
    pub int_state: u64,
    /// Exit code.
    pub exit_code: u64,
    /// Exit information 1.
    pub exit_info1: u64,
    /// Exit information 2.
    pub exit_info2: u64,
    /// Event being delivered when the exit happened (`EventInjection` format).
    pub exit_int_info: u64,
    /// Bit 0: nested paging enable.
    pub np_control: u64,
    /// AVIC APIC BAR.
    pub avic_apic_bar: u64,
    /// GHCB (SEV-ES).
    pub ghcb_pa: u64,
    /// Event to inject at VMRUN (`EventInjection` format).
    pub event_inj: u64,
    /// Nested page table root.
    pub n_cr3: u64,
    /// LBR virtualization.
    pub lbr_virt: u64,
    /// VMCB clean bits (0: reload everything).
    pub clean_bits: u32,
    reserved3: u32,
    /// Next sequential RIP (NRIPS only; 0 under QEMU TCG).
    pub next_rip: u64,
    /// Bytes fetched (decode assists only).
    pub instruction_len: u8,
    /// Instruction bytes (decode assists only).
    pub instruction_bytes: [u8; 15],
    reserved4: [u8; 0x400 - 0xe0],
}

/// State save area, offsets 0x400–0xFFF.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SaveArea {
    /// ES.
    pub es: Segment,
    /// CS.
    pub cs: Segment,
    /// SS.
    pub ss: Segment,
    /// DS.
    pub ds: Segment,
    /// FS.
    pub fs: Segment,
    /// GS.
    pub gs: Segment,
    /// GDTR (base, limit).
    pub gdtr: Segment,
    /// LDTR.
    pub ldtr: Segment,
    /// IDTR (base, limit).
    pub idtr: Segment,
    /// TR.
    pub tr: Segment,
    reserved1: [u8; 0x2b],
    /// Current privilege level.
    pub cpl: u8,
    reserved2: u32,
    /// EFER.
    pub efer: u64,
    reserved3: [u8; 0x70],
    /// CR4.
    pub cr4: u64,
    /// CR3.
    pub cr3: u64,
    /// CR0.
    pub cr0: u64,
    /// DR7.
    pub dr7: u64,
    /// DR6.
    pub dr6: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// RIP.
    pub rip: u64,
    reserved4: [u8; 0x58],
    /// RSP.
    pub rsp: u64,
    /// S_CET.
    pub s_cet: u64,
    /// SSP.
    pub ssp: u64,
    /// ISST_ADDR.
    pub isst_addr: u64,
    /// RAX.
    pub rax: u64,
    /// STAR.
    pub star: u64,
    /// LSTAR.
    pub lstar: u64,
    /// CSTAR.
    pub cstar: u64,
    /// SFMASK.
    pub sfmask: u64,
    /// KernelGsBase.
    pub kernel_gs_base: u64,
    /// SYSENTER_CS.
    pub sysenter_cs: u64,
    /// SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// CR2.
    pub cr2: u64,
    reserved5: [u8; 0x20],
    /// Guest PAT (nested paging).
    pub g_pat: u64,
    /// DBGCTL.
    pub dbgctl: u64,
    /// BR_FROM.
    pub br_from: u64,
    /// BR_TO.
    pub br_to: u64,
    /// LASTEXCPFROM.
    pub last_excp_from: u64,
    /// LASTEXCPTO.
    pub last_excp_to: u64,
    reserved6: [u8; 0x1000 - 0x698],
}

/// The VMCB: one 4 KiB page.
#[repr(C, align(4096))]
#[derive(Clone, Copy, Debug)]
pub struct Vmcb {
    /// Control area.
    pub control: ControlArea,
    /// State save area.
    pub save: SaveArea,
}

macro_rules! at {
    ($t:ty, $f:ident, $o:expr) => {
        const _: () = assert!(core::mem::offset_of!($t, $f) == $o);
    };
}
// APM Vol. 2 Table B-1 (control area).
at!(ControlArea, intercept_cr, 0x000);
at!(ControlArea, intercept_exceptions, 0x008);
at!(ControlArea, intercept_misc1, 0x00c);
at!(ControlArea, intercept_misc2, 0x010);
at!(ControlArea, pause_filter_threshold, 0x03c);
at!(ControlArea, iopm_base_pa, 0x040);
at!(ControlArea, msrpm_base_pa, 0x048);
at!(ControlArea, tsc_offset, 0x050);
at!(ControlArea, guest_asid, 0x058);
at!(ControlArea, tlb_control, 0x05c);
at!(ControlArea, int_ctl, 0x060);
at!(ControlArea, int_state, 0x068);
at!(ControlArea, exit_code, 0x070);
at!(ControlArea, exit_info1, 0x078);
at!(ControlArea, exit_info2, 0x080);
at!(ControlArea, exit_int_info, 0x088);
at!(ControlArea, np_control, 0x090);
at!(ControlArea, event_inj, 0x0a8);
at!(ControlArea, n_cr3, 0x0b0);
at!(ControlArea, clean_bits, 0x0c0);
at!(ControlArea, next_rip, 0x0c8);
at!(ControlArea, instruction_len, 0x0d0);
const _: () = assert!(core::mem::size_of::<ControlArea>() == 0x400);
// APM Vol. 2 Table B-2 (save area), offsets from the start of the VMCB.
at!(Vmcb, save, 0x400);
const SAVE: usize = 0x400;
at!(SaveArea, cs, 0x410 - SAVE);
at!(SaveArea, gdtr, 0x460 - SAVE);
at!(SaveArea, idtr, 0x480 - SAVE);
at!(SaveArea, tr, 0x490 - SAVE);
at!(SaveArea, cpl, 0x4cb - SAVE);
at!(SaveArea, efer, 0x4d0 - SAVE);
at!(SaveArea, cr4, 0x548 - SAVE);
at!(SaveArea, cr3, 0x550 - SAVE);
at!(SaveArea, cr0, 0x558 - SAVE);
at!(SaveArea, dr7, 0x560 - SAVE);
at!(SaveArea, rflags, 0x570 - SAVE);
at!(SaveArea, rip, 0x578 - SAVE);
at!(SaveArea, rsp, 0x5d8 - SAVE);
at!(SaveArea, rax, 0x5f8 - SAVE);
at!(SaveArea, star, 0x600 - SAVE);
at!(SaveArea, kernel_gs_base, 0x620 - SAVE);
at!(SaveArea, cr2, 0x640 - SAVE);
at!(SaveArea, g_pat, 0x668 - SAVE);
at!(SaveArea, last_excp_to, 0x690 - SAVE);
const _: () = assert!(core::mem::size_of::<Vmcb>() == 4096);

impl Vmcb {
    /// All zeros.
    pub const fn zeroed() -> Self {
        const Z: Segment = Segment { selector: 0, attrib: 0, limit: 0, base: 0 };
        Self {
            control: ControlArea {
                intercept_cr: 0,
                intercept_dr: 0,
                intercept_exceptions: 0,
                intercept_misc1: 0,
                intercept_misc2: 0,
                intercept_misc3: 0,
                reserved1: [0; 0x24],
                pause_filter_threshold: 0,
                pause_filter_count: 0,
                iopm_base_pa: 0,
                msrpm_base_pa: 0,
                tsc_offset: 0,
                guest_asid: 0,
                tlb_control: 0,
                reserved2: [0; 3],
                int_ctl: 0,
                int_state: 0,
                exit_code: 0,
                exit_info1: 0,
                exit_info2: 0,
                exit_int_info: 0,
                np_control: 0,
                avic_apic_bar: 0,
                ghcb_pa: 0,
                event_inj: 0,
                n_cr3: 0,
                lbr_virt: 0,
                clean_bits: 0,
                reserved3: 0,
                next_rip: 0,
                instruction_len: 0,
                instruction_bytes: [0; 15],
                reserved4: [0; 0x400 - 0xe0],
            },
            save: SaveArea {
                es: Z,
                cs: Z,
                ss: Z,
                ds: Z,
                fs: Z,
                gs: Z,
                gdtr: Z,
                ldtr: Z,
                idtr: Z,
                tr: Z,
                reserved1: [0; 0x2b],
                cpl: 0,
                reserved2: 0,
                efer: 0,
                reserved3: [0; 0x70],
                cr4: 0,
                cr3: 0,
                cr0: 0,
                dr7: 0,
                dr6: 0,
                rflags: 0,
                rip: 0,
                reserved4: [0; 0x58],
                rsp: 0,
                s_cet: 0,
                ssp: 0,
                isst_addr: 0,
                rax: 0,
                star: 0,
                lstar: 0,
                cstar: 0,
                sfmask: 0,
                kernel_gs_base: 0,
                sysenter_cs: 0,
                sysenter_esp: 0,
                sysenter_eip: 0,
                cr2: 0,
                reserved5: [0; 0x20],
                g_pat: 0,
                dbgctl: 0,
                br_from: 0,
                br_to: 0,
                last_excp_from: 0,
                last_excp_to: 0,
                reserved6: [0; 0x1000 - 0x698],
            },
        }
    }
}

bitflags! {
    /// First intercept vector (VMCB offset 0x00C).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Misc1: u32 {
        /// Physical interrupts.
        const INTR = 1 << 0;
        /// NMI.
        const NMI = 1 << 1;
        /// SMI.
        const SMI = 1 << 2;
        /// INIT.
        const INIT = 1 << 3;
        /// Virtual interrupt window (V_IRQ taken).
        const VINTR = 1 << 4;
        /// CPUID.
        const CPUID = 1 << 18;
        /// INVD.
        const INVD = 1 << 22;
        /// HLT.
        const HLT = 1 << 24;
        /// INVLPGA.
        const INVLPGA = 1 << 26;
        /// I/O (through the IOPM).
        const IOIO = 1 << 27;
        /// MSR (through the MSRPM).
        const MSR = 1 << 28;
        /// Task switches.
        const TASK_SWITCH = 1 << 29;
        /// Shutdown (triple fault).
        const SHUTDOWN = 1 << 31;
    }
}

bitflags! {
    /// Second intercept vector (VMCB offset 0x010).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Misc2: u32 {
        /// VMRUN (must be intercepted).
        const VMRUN = 1 << 0;
        /// VMMCALL.
        const VMMCALL = 1 << 1;
        /// VMLOAD.
        const VMLOAD = 1 << 2;
        /// VMSAVE.
        const VMSAVE = 1 << 3;
        /// STGI.
        const STGI = 1 << 4;
        /// CLGI.
        const CLGI = 1 << 5;
        /// SKINIT.
        const SKINIT = 1 << 6;
        /// RDTSCP.
        const RDTSCP = 1 << 7;
        /// ICEBP (INT1).
        const ICEBP = 1 << 8;
        /// MONITOR.
        const MONITOR = 1 << 10;
        /// MWAIT.
        const MWAIT = 1 << 11;
        /// XSETBV.
        const XSETBV = 1 << 13;
    }
}

/// `int_ctl` fields (VMCB offset 0x060).
pub mod int_ctl {
    /// Virtual TPR (7:0).
    pub const V_TPR_MASK: u64 = 0xff;
    /// A virtual interrupt is pending (bit 8).
    pub const V_IRQ: u64 = 1 << 8;
    /// Priority of the virtual interrupt (19:16).
    pub const V_INTR_PRIO_SHIFT: u64 = 16;
    /// Ignore the virtual TPR for V_IRQ (bit 20).
    pub const V_IGN_TPR: u64 = 1 << 20;
    /// Guest RFLAGS.IF masks only virtual interrupts; host IF masks physical ones (bit 24).
    pub const V_INTR_MASKING: u64 = 1 << 24;
    /// Vector of the virtual interrupt (39:32).
    pub const V_INTR_VECTOR_SHIFT: u64 = 32;
}

/// `tlb_control` values.
pub mod tlb_control {
    /// Nothing to flush.
    pub const NONE: u8 = 0;
    /// Flush the entire TLB (every ASID): always supported.
    pub const FLUSH_ALL: u8 = 1;
    /// Flush this guest's (ASID's) TLB entries.
    pub const FLUSH_ASID: u8 = 3;
}

/// Event injection / EXITINTINFO format (APM Vol. 2 §15.20).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Event {
    /// Vector.
    pub vector: u8,
    /// Kind.
    pub kind: EventKind,
    /// Error code to push, if any.
    pub error_code: Option<u32>,
}

/// Event kinds (bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EventKind {
    /// External interrupt.
    Interrupt = 0,
    /// NMI.
    Nmi = 2,
    /// Exception (fault or trap).
    Exception = 3,
    /// Software interrupt (INTn).
    Software = 4,
}

/// Event valid (bit 31).
pub const EVENT_VALID: u64 = 1 << 31;
/// Error code valid (bit 11).
pub const EVENT_ERROR_VALID: u64 = 1 << 11;

impl Event {
    /// The injection word.
    pub const fn encode(&self) -> u64 {
        let ev = match self.error_code {
            Some(e) => EVENT_ERROR_VALID | (e as u64) << 32,
            None => 0,
        };
        EVENT_VALID | ev | (self.kind as u64) << 8 | self.vector as u64
    }

    /// Decodes an EXITINTINFO word; `None` when its valid bit is clear (QEMU leaves a stale
    /// vector there with V = 0) or the type is reserved.
    pub const fn decode(word: u64) -> Option<Self> {
        if word & EVENT_VALID == 0 {
            return None;
        }
        let kind = match (word >> 8) & 7 {
            0 => EventKind::Interrupt,
            2 => EventKind::Nmi,
            3 => EventKind::Exception,
            4 => EventKind::Software,
            _ => return None,
        };
        let error_code = if word & EVENT_ERROR_VALID != 0 { Some((word >> 32) as u32) } else { None };
        Some(Self { vector: word as u8, kind, error_code })
    }
}

/// Exit codes (APM Vol. 2 Appendix C).
pub mod exit {
    /// First exception exit (0x40 + vector).
    pub const EXCEPTION_BASE: u64 = 0x40;
    /// Physical interrupt.
    pub const INTR: u64 = 0x60;
    /// NMI.
    pub const NMI: u64 = 0x61;
    /// SMI.
    pub const SMI: u64 = 0x62;
    /// INIT.
    pub const INIT: u64 = 0x63;
    /// Virtual interrupt window.
    pub const VINTR: u64 = 0x64;
    /// CPUID.
    pub const CPUID: u64 = 0x72;
    /// INVD.
    pub const INVD: u64 = 0x76;
    /// HLT.
    pub const HLT: u64 = 0x78;
    /// INVLPGA.
    pub const INVLPGA: u64 = 0x7a;
    /// I/O.
    pub const IOIO: u64 = 0x7b;
    /// MSR.
    pub const MSR: u64 = 0x7c;
    /// Task switch.
    pub const TASK_SWITCH: u64 = 0x7d;
    /// Shutdown (triple fault).
    pub const SHUTDOWN: u64 = 0x7f;
    /// VMRUN.
    pub const VMRUN: u64 = 0x80;
    /// VMMCALL.
    pub const VMMCALL: u64 = 0x81;
    /// VMLOAD.
    pub const VMLOAD: u64 = 0x82;
    /// VMSAVE.
    pub const VMSAVE: u64 = 0x83;
    /// STGI.
    pub const STGI: u64 = 0x84;
    /// CLGI.
    pub const CLGI: u64 = 0x85;
    /// SKINIT.
    pub const SKINIT: u64 = 0x86;
    /// ICEBP.
    pub const ICEBP: u64 = 0x88;
    /// MONITOR.
    pub const MONITOR: u64 = 0x8a;
    /// MWAIT.
    pub const MWAIT: u64 = 0x8b;
    /// XSETBV.
    pub const XSETBV: u64 = 0x8d;
    /// RDTSCP.
    pub const RDTSCP: u64 = 0x87;
    /// CR8 write.
    pub const WRITE_CR8: u64 = 0x18;
    /// Nested page fault.
    pub const NPF: u64 = 0x400;
    /// VMRUN found the VMCB invalid.
    pub const INVALID: u64 = u64::MAX;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_encoding() {
        let e = Event { vector: 0x40, kind: EventKind::Interrupt, error_code: None };
        assert_eq!(e.encode(), 0x8000_0040);
        let gp = Event { vector: 13, kind: EventKind::Exception, error_code: Some(0x10) };
        assert_eq!(gp.encode(), 0x10_0000_0000 | 0x8000_0000 | 0x800 | 0x300 | 13);
        assert_eq!(Event::decode(gp.encode()), Some(gp));
        assert_eq!(Event::decode(0x40), None, "stale vector with V clear");
        assert_eq!(Event::decode(0x8000_0540), None, "reserved type 5");
    }

    #[test]
    fn attributes() {
        assert_eq!(attrib::CODE64, 0xa9b);
        assert_eq!(attrib::DATA, 0xc93);
    }
}
