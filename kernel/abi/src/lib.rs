//! What a guest sees of Conduit besides its devices: the hypercall ABI (`VMMCALL`) and the
//! boot-info block. Shared, byte for byte, by the hypervisor and the guests; documented in
//! `docs/hypercalls.md` and `docs/guest-boot.md`.
//!
//! Calling convention: `RAX` = function number, arguments in `RDI`, `RSI`, `RDX`, `R10`, `R8`,
//! `R9`; results in `RAX` (a value ≥ 0, or a negative error code) and, where documented, `RDX`.
//! Every other register is preserved. An unknown function returns `ENOSYS`; no request can make
//! the hypervisor fail.
#![no_std]
#![forbid(unsafe_code)]

/// ABI version returned by `hypercall::VERSION` (major << 16 | minor). A major change breaks
/// compatibility; a minor one only adds functions.
pub const ABI_VERSION: u64 = 1 << 16 | 2;

/// Hypercall function numbers (in `RAX`).
pub mod hypercall {
    /// `() -> version`: the ABI version.
    pub const VERSION: u64 = 0;
    /// `(gpa, len) -> len`: writes `len` bytes of guest memory at guest-physical `gpa` to the
    /// guest's console (at most `CONSOLE_MAX` bytes per call).
    pub const CONSOLE_WRITE: u64 = 1;
    /// `(value) -> !`: this vCPU stops; `value` is its result, reported by the hypervisor.
    pub const EXIT: u64 = 2;
    /// `(value) -> 0`: publishes `value` in this vCPU's signal word, which the hypervisor (a
    /// scenario or supervisor) can observe. Used for rendezvous in tests.
    pub const SIGNAL: u64 = 3;
    /// `() -> microseconds`: time since the hypervisor booted.
    pub const UPTIME_US: u64 = 4;
    /// `() -> value`: reads the word the hypervisor last posted to this vCPU (0 if none).
    pub const MAILBOX: u64 = 5;
    /// `(device, index) -> count | flags << 32`: the interrupts of `device` (its requester ID
    /// on the guest's PCI bus) at `index` (`irq::INDEX_*`). Since 1.1.
    pub const IRQ_INFO: u64 = 6;
    /// `(device, index, start, count, flags, data_gpa) -> 0`: VFIO `SET_IRQS`: `flags` holds
    /// one `irq::DATA_*` and one `irq::ACTION_*`; `data_gpa` points at `count` bytes (bool
    /// data) or `count` u64 bindings (event data). Since 1.1.
    pub const SET_IRQS: u64 = 7;
    /// `(device, index, vector, out_gpa) -> 0`: writes that vector's `irq::IrqStats` to guest
    /// memory at `out_gpa`. Since 1.1.
    pub const IRQ_STATS: u64 = 8;
    /// `(vector, enable) -> 0`: with `enable` = 1, `vector` is taken without an EOI: it never
    /// enters the virtual ISR, and the guest's handler must not write EOI for it (one exit
    /// less per interrupt); 0 restores normal EOI. `EINVAL` for vectors below 16. Since 1.1.
    pub const AUTO_EOI: u64 = 9;
    /// `(device, request_gpa) -> 0`: registers the doorbell described by the
    /// `doorbell::Request` at `request_gpa` on `device` (its requester ID on the guest's bus),
    /// VFIO `IOEVENTFD` rules; errors in `docs/hypercalls.md`. Since 1.2.
    pub const DOORBELL_ADD: u64 = 10;
    /// `(device, request_gpa) -> 0`: removes the doorbell whose key (`bar`, `offset`,
    /// `width`, match) equals the request's; `ENODEV` when there is none. Since 1.2.
    pub const DOORBELL_REMOVE: u64 = 11;
    /// `(device, request_gpa) -> hits`: how many guest writes the doorbell with the request's
    /// key has served on the fast path; `ENODEV` when there is none. Since 1.2.
    pub const DOORBELL_HITS: u64 = 12;
}

/// The doorbell ABI (VFIO's `VFIO_DEVICE_IOEVENTFD`, as hypercalls). See `docs/hypercalls.md`.
pub mod doorbell {
    /// `Request::flags`: only writes of `match_value` ring the doorbell (else any value).
    pub const MATCH_VALUE: u32 = 1 << 0;
    /// `Request::flags`: the action writes to the device (`write_*` fields).
    pub const WRITE: u32 = 1 << 1;
    /// `Request::flags`: the device write carries the value the guest wrote (else
    /// `write_value`).
    pub const WRITE_FORWARD: u32 = 1 << 2;
    /// `Request::flags`: the action raises guest vector `event_vector` on vCPU `event_vcpu`
    /// (an emulated interrupt through a software context).
    pub const EVENT: u32 = 1 << 3;
    /// Every defined flag.
    pub const FLAGS: u32 = MATCH_VALUE | WRITE | WRITE_FORWARD | EVENT;

    /// One doorbell, in guest memory (48 bytes, little-endian).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Request {
        /// `MATCH_VALUE` | `WRITE` | `WRITE_FORWARD` | `EVENT`.
        pub flags: u32,
        /// BAR of the doorbell register (0–5; config space is not a BAR).
        pub bar: u8,
        /// Bytes the guest writes: 1, 2, 4 or 8.
        pub width: u8,
        /// BAR of the register the action writes.
        pub write_bar: u8,
        /// Bytes of that write: 1, 2, 4 or 8.
        pub write_width: u8,
        /// Offset of the doorbell in its BAR (a multiple of `width`).
        pub offset: u64,
        /// The value that rings it (with `MATCH_VALUE`).
        pub match_value: u64,
        /// Offset of the written register in `write_bar`.
        pub write_offset: u64,
        /// The value written (unless `WRITE_FORWARD`).
        pub write_value: u64,
        /// vCPU of the event (with `EVENT`).
        pub event_vcpu: u32,
        /// Guest vector of the event (16–255).
        pub event_vector: u32,
    }

    impl Request {
        /// A doorbell of `width` bytes at `offset` in BAR `bar` that rings on any value and
        /// forwards the value written to its own register (what a partition description's
        /// `doorbell=` registers).
        pub const fn forwarding(bar: u8, offset: u64, width: u8) -> Self {
            Self {
                flags: WRITE | WRITE_FORWARD,
                bar,
                width,
                write_bar: bar,
                write_width: width,
                offset,
                match_value: 0,
                write_offset: offset,
                write_value: 0,
                event_vcpu: 0,
                event_vector: 0,
            }
        }
    }

    const _: () = assert!(core::mem::size_of::<Request>() == 48);
    const _: () = assert!(core::mem::offset_of!(Request, offset) == 8);
    const _: () = assert!(core::mem::offset_of!(Request, event_vcpu) == 40);

    /// Doorbells one device takes unless the kernel command line says otherwise
    /// (`conduit.doorbell_limit=N`).
    pub const DEFAULT_DEVICE_LIMIT: u32 = 1000;
}

/// The interrupt-control ABI (VFIO's `VFIO_DEVICE_GET_IRQ_INFO` / `SET_IRQS`, as hypercalls).
/// See `docs/hypercalls.md`.
pub mod irq {
    /// Legacy INTx.
    pub const INDEX_INTX: u64 = 0;
    /// MSI.
    pub const INDEX_MSI: u64 = 1;
    /// MSI-X.
    pub const INDEX_MSIX: u64 = 2;
    /// Error notification (software-signalled).
    pub const INDEX_ERR: u64 = 3;
    /// Device request (software-signalled).
    pub const INDEX_REQ: u64 = 4;
    /// Number of indices.
    pub const INDICES: u64 = 5;

    /// Info flag: vectors can be bound to events.
    pub const FLAG_EVENTFD: u64 = 1 << 0;
    /// Info flag: vectors can be masked.
    pub const FLAG_MASKABLE: u64 = 1 << 1;
    /// Info flag: the vector masks itself when it fires (level-triggered INTx).
    pub const FLAG_AUTOMASKED: u64 = 1 << 2;
    /// Info flag: the vector count cannot change while the index is enabled (MSI; never
    /// MSI-X).
    pub const FLAG_NORESIZE: u64 = 1 << 3;

    /// Set flag: no data.
    pub const DATA_NONE: u64 = 1 << 0;
    /// Set flag: `count` bytes, each 0 or 1.
    pub const DATA_BOOL: u64 = 1 << 1;
    /// Set flag: `count` u64 event bindings (`binding`, or `UNBIND`).
    pub const DATA_EVENT: u64 = 1 << 2;
    /// Set flag: mask the vectors.
    pub const ACTION_MASK: u64 = 1 << 3;
    /// Set flag: unmask the vectors.
    pub const ACTION_UNMASK: u64 = 1 << 4;
    /// Set flag: trigger (with bool or no data: signal the vectors in software; with event data:
    /// bind them; with count 0 and no data: disable the index).
    pub const ACTION_TRIGGER: u64 = 1 << 5;
    /// Every data flag.
    pub const DATA_MASK: u64 = DATA_NONE | DATA_BOOL | DATA_EVENT;
    /// Every action flag.
    pub const ACTION_MASK_ALL: u64 = ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER;

    /// An event binding: deliver to guest vector `vector` of vCPU `vcpu` of the caller's
    /// partition.
    pub const fn binding(vcpu: u8, vector: u8) -> u64 {
        (vcpu as u64) << 8 | vector as u64
    }
    /// Event data entry that unbinds the vector.
    pub const UNBIND: u64 = u64::MAX;
    /// Most vectors one `SET_IRQS` call names.
    pub const MAX_COUNT: u64 = 2048;

    /// Counters of one vector (`IRQ_STATS`), all since the vector was first used.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct IrqStats {
        /// Signals that reached the vector (device interrupts or software triggers).
        pub raised: u64,
        /// Signals queued for the guest (newly pending in the vCPU's IRR).
        pub delivered: u64,
        /// Signals merged into one already pending in the vCPU's IRR or while masked.
        pub coalesced: u64,
        /// Signals that arrived while the vector was masked.
        pub pending_while_masked: u64,
        /// Signals with no binding (vector disabled).
        pub spurious: u64,
        /// 1 when a signal is pending behind the mask now (the PBA bit).
        pub pending: u64,
    }
}

/// Most bytes `CONSOLE_WRITE` takes in one call.
pub const CONSOLE_MAX: u64 = 256;

/// Error codes (negated in `RAX`), after the POSIX numbers.
pub mod error {
    /// No such entry (removing something never added).
    pub const ENOENT: i64 = -2;
    /// Busy (e.g. resizing MSI while it is enabled).
    pub const EBUSY: i64 = -16;
    /// Already exists.
    pub const EEXIST: i64 = -17;
    /// No such device.
    pub const ENODEV: i64 = -19;
    /// A limit was reached.
    pub const ENOSPC: i64 = -28;
    /// A guest address outside the guest's memory.
    pub const EFAULT: i64 = -14;
    /// An argument out of range.
    pub const EINVAL: i64 = -22;
    /// Unknown function.
    pub const ENOSYS: i64 = -38;
    /// Not allowed for this guest.
    pub const EPERM: i64 = -1;
}

/// Port a guest may write bytes to as a debug console (Bochs/QEMU convention).
pub const DEBUG_CONSOLE_PORT: u16 = 0xe9;

/// The boot-info block the hypervisor places in guest memory, one per vCPU; `RDI` holds its
/// guest-physical address at entry. All fields little-endian. See `docs/guest-boot.md`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// `BOOT_INFO_MAGIC`.
    pub magic: u64,
    /// `ABI_VERSION`.
    pub abi_version: u64,
    /// Partition index (order of the partition descriptions).
    pub partition: u32,
    /// This vCPU's index in the partition.
    pub vcpu: u32,
    /// vCPUs in the partition.
    pub vcpus: u32,
    /// Reserved, 0.
    pub reserved0: u32,
    /// Guest RAM: `[0, memory_bytes)`.
    pub memory_bytes: u64,
    /// First guest-physical address free for the guest's own use (after the image).
    pub free_start: u64,
    /// End of the free range: the vCPU stacks (`stack_bytes` each) sit above it, at the top
    /// of RAM, vCPU 0 highest.
    pub free_end: u64,
    /// Bytes of stack per vCPU.
    pub stack_bytes: u64,
    /// Guest-physical address of the (virtual) local APIC window.
    pub local_apic: u64,
    /// Rate at which the virtual local APIC timer counts with divide-by-1, in Hz.
    pub apic_timer_hz: u64,
    /// TSC rate in Hz (the guest reads the host TSC, offset 0).
    pub tsc_hz: u64,
    /// Argument from the partition description (test guests select a behaviour with it).
    pub argument: u64,
    /// Partition name, NUL-padded.
    pub name: [u8; 16],
    /// Guest-physical base of the guest's PCI configuration window (ECAM, segment 0, bus 0:
    /// 1 MiB); 0 when the partition has no PCI bus. Since 1.1.
    pub ecam_base: u64,
    /// Guest-physical base of the window where the guest places device BARs
    /// (`layout::PCI_WINDOW_BYTES` long). Since 1.1.
    pub pci_window: u64,
}

/// `BootInfo::magic`.
pub const BOOT_INFO_MAGIC: u64 = 0x4f46_4e49_5444_4e43; // "CNDTINFO"

const _: () = assert!(core::mem::size_of::<BootInfo>() == 128);
const _: () = assert!(core::mem::offset_of!(BootInfo, memory_bytes) == 32);
const _: () = assert!(core::mem::offset_of!(BootInfo, argument) == 88);
const _: () = assert!(core::mem::offset_of!(BootInfo, name) == 96);

/// Fixed guest-physical layout (see `docs/guest-boot.md`).
pub mod layout {
    /// The GDT the hypervisor provides: null, 64-bit code (`CODE_SELECTOR`), data
    /// (`DATA_SELECTOR`).
    pub const GDT: u64 = 0x1000;
    /// Selector of the flat 64-bit code segment.
    pub const CODE_SELECTOR: u16 = 0x08;
    /// Selector of the flat data segment.
    pub const DATA_SELECTOR: u16 = 0x10;
    /// Page tables: PML4 here, then the PDPT and four page directories (to `TABLES_END`),
    /// identity-mapping `[0, 4 GiB)` with 2 MiB pages.
    pub const PAGE_TABLES: u64 = 0x2000;
    /// End of the page tables.
    pub const TABLES_END: u64 = 0x8000;
    /// `BootInfo` of vCPU `i` at `BOOT_INFO + i * 128`.
    pub const BOOT_INFO: u64 = 0x8000;
    /// Most vCPUs one partition has.
    pub const MAX_VCPUS: usize = 32;
    /// Lowest address an image segment may occupy.
    pub const IMAGE_START: u64 = 0x10_0000;
    /// Virtual local APIC.
    pub const LOCAL_APIC: u64 = 0xfee0_0000;
    /// Stack bytes per vCPU.
    pub const STACK_BYTES: u64 = 64 * 1024;
    /// The guest's ECAM window (bus 0 only).
    pub const ECAM: u64 = 0xe000_0000;
    /// Bytes of the ECAM window.
    pub const ECAM_BYTES: u64 = 1 << 20;
    /// The window guests place memory BARs in.
    pub const PCI_WINDOW: u64 = 0xc000_0000;
    /// Bytes of the BAR window.
    pub const PCI_WINDOW_BYTES: u64 = 0x2000_0000;
}

const _: () = assert!(layout::BOOT_INFO + (layout::MAX_VCPUS as u64) * 128 <= 0x9000);

/// The emulated PCI devices a partition can be given (`vdevs=`). See `docs/devices.md`.
pub mod vdev {
    /// Vendor ID of Conduit's emulated devices (not a PCI-SIG assignment; only ever seen by
    /// Conduit guests).
    pub const VENDOR: u16 = 0xc0de;
    /// Device ID of `notify`: a software-signalled MSI-X function.
    pub const NOTIFY_DEVICE: u16 = 0x0001;
    /// `notify`'s BAR 0: 4 KiB of emulated registers.
    pub const NOTIFY_BAR_BYTES: u64 = 0x1000;
    /// `notify` register (read): `0xc0de_0001`.
    pub const NOTIFY_ID: u64 = 0x00;
    /// `notify` register (write): writing `i` signals MSI-X entry `i` in software.
    pub const NOTIFY_SIGNAL: u64 = 0x04;
    /// `notify` register (read): signals and notifications requested so far.
    pub const NOTIFY_COUNT: u64 = 0x08;
    /// `notify` register (read/write): scratch.
    pub const NOTIFY_SCRATCH: u64 = 0x0c;
    /// `notify`'s MSI-X table offset in BAR 0.
    pub const NOTIFY_TABLE: u64 = 0x800;
    /// `notify`'s PBA offset in BAR 0.
    pub const NOTIFY_PBA: u64 = 0xc00;
    /// `notify`'s MSI-X entries.
    pub const NOTIFY_VECTORS: u16 = 4;
    /// `notify`'s MSI-X capability offset in configuration space.
    pub const NOTIFY_MSIX_CAP: u8 = 0x40;
}
