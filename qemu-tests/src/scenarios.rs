//! Every QEMU scenario. Markers are matched as substrings, in the order given, within their
//! stream (COM1 console or decoded defmt log message).

use std::time::Duration;

/// Which output a marker is looked for in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Plain text on COM1.
    Console,
    /// Decoded defmt messages from COM2.
    Log,
}

/// Text that must appear: a substring of some line, or a whole line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    /// Where.
    pub stream: Stream,
    /// What.
    pub text: &'static str,
    /// The line must be exactly `text` (not merely contain it).
    pub whole_line: bool,
}

impl Marker {
    /// True when `line` satisfies the marker.
    pub fn matches(&self, line: &str) -> bool {
        if self.whole_line { line.trim_end() == self.text } else { line.contains(self.text) }
    }
}

/// Console marker (substring).
pub const fn console(text: &'static str) -> Marker {
    Marker { stream: Stream::Console, text, whole_line: false }
}

/// Console marker (the whole line).
pub const fn console_line(text: &'static str) -> Marker {
    Marker { stream: Stream::Console, text, whole_line: true }
}

/// Log marker (substring of a decoded message).
pub const fn log(text: &'static str) -> Marker {
    Marker { stream: Stream::Log, text, whole_line: false }
}

/// A raw disk image the harness creates (zero-filled) for a run and offers to QEMU as
/// `-drive file=…,if=none,id=ID,format=raw`; devices refer to it by `drive=ID`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disk {
    /// Drive ID.
    pub id: &'static str,
    /// Size in bytes.
    pub bytes: u64,
}

/// The verdict a scenario must end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `conduit_boot::verdict::SUCCESS` (QEMU exit status 33).
    Success,
    /// `conduit_boot::verdict::FAILURE` (QEMU exit status 65): the scenario proves a failure
    /// path is taken and reported.
    Failure,
}

impl Expect {
    /// The QEMU exit status this verdict produces.
    pub fn qemu_status(self) -> i32 {
        match self {
            Self::Success => conduit_boot::verdict::qemu_status(conduit_boot::verdict::SUCCESS),
            Self::Failure => conduit_boot::verdict::qemu_status(conduit_boot::verdict::FAILURE),
        }
    }
}

/// One scenario.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// Name (the in-hypervisor sequence too, unless `sequence` names another).
    pub name: &'static str,
    /// In-hypervisor sequence (`conduit.scenario=…`) when it differs from `name`.
    pub sequence: Option<&'static str>,
    /// More kernel command-line words (partition descriptions, sets).
    pub kernel_args: &'static [&'static str],
    /// Boots with the guest bundle as a boot module (`-initrd`).
    pub guests: bool,
    /// QEMU CPU model.
    pub cpu: &'static str,
    /// One line on what it proves.
    pub about: &'static str,
    /// Virtual CPUs.
    pub smp: u32,
    /// Guest RAM.
    pub memory_mib: u32,
    /// Devices and other QEMU arguments beyond the common set.
    pub qemu_args: &'static [&'static str],
    /// Disk images to create.
    pub disks: &'static [Disk],
    /// Markers that must appear, in order per stream.
    pub markers: &'static [Marker],
    /// Text that must appear in neither stream.
    pub forbidden: &'static [&'static str],
    /// Expected verdict.
    pub expect: Expect,
    /// Wall-clock limit for the whole run.
    pub timeout: Duration,
}

/// Scenario booted by `cargo xtask run` without `--scenario`.
pub const DEFAULT: &str = "guest_hello";

const TIMEOUT: Duration = Duration::from_secs(60);

/// Text no scenario may show unless it names it as its expected failure.
const NO_FAILURES: &[&str] = &[
    "PANIC",
    "EXCEPTION",
    "FAIL",
    "bring-up failed",
    "acpi: table at",
    "partitions: rejected",
    "vmm: partition refused",
    "did not drain",
    "not given back",
];

/// The table.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "boot_smoke",
        sequence: None,
        kernel_args: &[],
        guests: false,
        cpu: DEFAULT_CPU,
        about: "boots, prints the memory map summary, checks allocator exclusions, W^X, guards, IOAPIC masking, timer",
        smp: 1,
        memory_mib: 256,
        qemu_args: &[],
        disks: &[],
        markers: &[
            console("boot: protocol Pvh, command line \"conduit.scenario=boot_smoke\""),
            console("boot: iommu: absent (no DMAR table: the platform has no VT-d IOMMU)"),
            console("boot: 1 of 1 CPUs online"),
            console("memory map: "),
            console(") usable"),
            console("frame allocator: "),
            console("cpus: 1 enabled in MADT, 1 online"),
            console("ioapic: 24 pins masked"),
            console(
                "counters: 0 unexpected and 0 spurious interrupts, 0 APIC errors, 0 console bytes dropped, 0 nested log frames dropped",
            ),
            console(
                "boot_smoke: allocator excludes image, ACPI, boot data, bitmap, trampoline; alloc/free round trip ok",
            ),
            console("boot_smoke: W^X image (text R+X, rodata R, data R+W+NX), page 0 and 9 guard pages unmapped"),
            console("boot_smoke: identity map uses 2 MiB pages at most"),
            console_line(
                "boot_smoke: no IOMMU: assigning 0000:00:00.0 refused (no DMAR table: the platform has no VT-d IOMMU)",
            ),
            console("timer: "),
            console("boot_smoke: all checks passed"),
            console("scenario boot_smoke: PASS"),
            console("conduit: verdict success"),
            log("acpi: APIC at "),
            log("paging: kernel tables at "),
            log("largest page 2M"),
            log("time: tsc "),
            log("scenario boot_smoke: start"),
            log("frame allocator: "),
            log("timer: "),
            log("scenario boot_smoke: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "boot_smoke_cpu_max",
        sequence: Some("boot_smoke"),
        kernel_args: &[],
        guests: false,
        cpu: "max",
        about: "boot_smoke on QEMU's `max` CPU with 3 GiB: RAM above 4 GiB, 1 GiB pages in the kernel's identity map",
        smp: 1,
        memory_mib: 3072,
        qemu_args: &[],
        disks: &[],
        markers: &[
            log("paging: kernel tables at "),
            log("largest page 1G"),
            console("  [0x000100000000, 0x000140000000) usable"),
            console("boot_smoke: W^X image (text R+X, rodata R, data R+W+NX), page 0 and 9 guard pages unmapped"),
            console("boot_smoke: identity map uses 1 GiB pages (at 0x100000000)"),
            console("scenario boot_smoke: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "exception_report",
        sequence: None,
        kernel_args: &[],
        guests: false,
        cpu: DEFAULT_CPU,
        about: "an armed #BP is reported and resumed; a #PF at a known address is reported and ends the run with failure",
        smp: 1,
        memory_mib: 256,
        qemu_args: &[],
        disks: &[],
        markers: &[
            console("scenario exception_report: start"),
            console("exception (expected by the scenario, resuming) on cpu 0: #BP breakpoint (vector 3) error=0x0"),
            console("r12=0x00c0ffee00000bad"),
            console("exception_report: #BP reported (vector 3, rip 0x"),
            console("exception_report: writing to unmapped 0x4000000000; a fatal #PF must follow"),
            console("EXCEPTION on cpu 0: #PF page fault (vector 14) error=0x2"),
            console("cr2=0x0000004000000000"),
            console("faulting rip matches the scenario's expected rip"),
            console("call chain: 0x"),
            console("conduit: verdict failure"),
            log("#BP breakpoint (vector 3)"),
            log("EXCEPTION on cpu 0: #PF page fault (vector 14) error=0x2"),
        ],
        forbidden: &["PANIC", "does NOT match", "scenario exception_report: PASS", "scenario exception_report: FAIL"],
        expect: Expect::Failure,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "smp_two_cpus",
        sequence: None,
        kernel_args: &[],
        guests: false,
        cpu: DEFAULT_CPU,
        about: "with -smp 2 both CPUs come online, run work, take their own timer interrupt and check in",
        smp: 2,
        memory_mib: 256,
        qemu_args: &[],
        disks: &[],
        markers: &[
            console("boot: 2 of 2 CPUs online"),
            console("smp: 2 CPUs enabled in MADT, 2 online"),
            console("smp: cpu 0 apic 0: live apic id 0, own timer interrupt taken"),
            console("smp: cpu 1 apic 1: live apic id 1, own timer interrupt taken, wake-ups 1"),
            console("smp: 2 of 2 CPUs checked in"),
            console("scenario smp_two_cpus: PASS"),
            log("smp: cpu 1 (apic 1) online"),
            log("smp: smp-check-in posted to cpu 1"),
            log("smp: 2 of 2 CPUs checked in"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "panic_report",
        sequence: None,
        kernel_args: &[],
        guests: false,
        cpu: DEFAULT_CPU,
        about: "a panic prints its location and message on COM1 and ends the run with failure",
        smp: 1,
        memory_mib: 256,
        qemu_args: &[],
        disks: &[],
        markers: &[
            console("scenario panic_report: start"),
            console("panic_report: panicking now"),
            console("PANIC on cpu 0 at kernel/src/scenarios/panic_report.rs:"),
            console("deliberate panic from the panic_report scenario (value 0x5eed)"),
            console("conduit: verdict failure"),
            log("scenario panic_report: start"),
        ],
        forbidden: &["EXCEPTION", "scenario panic_report: PASS", "scenario panic_report: FAIL"],
        expect: Expect::Failure,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "stack_overflow",
        sequence: None,
        kernel_args: &[],
        guests: false,
        cpu: DEFAULT_CPU,
        about: "recursion into the boot stack's guard page is reported as a stack overflow, not memory corruption",
        smp: 1,
        memory_mib: 256,
        qemu_args: &[],
        disks: &[],
        markers: &[
            console("stack_overflow: recursing on the boot stack until the guard page"),
            console("EXCEPTION on cpu 0: #PF page fault (vector 14) error=0x2"),
            console("stack overflow: cr2 is in the guard page below the boot stack of cpu 0"),
            console("conduit: verdict failure"),
            log("scenario stack_overflow: start"),
            log("#PF page fault (vector 14)"),
        ],
        forbidden: &["PANIC", "recursion returned", "scenario stack_overflow: PASS", "scenario stack_overflow: FAIL"],
        expect: Expect::Failure,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "pci_enumerate",
        sequence: None,
        kernel_args: &[],
        guests: false,
        cpu: DEFAULT_CPU,
        about: "ECAM enumeration finds edu, nvme, e1000e and the nvme behind a root port with the right BARs and capabilities; legacy ports agree",
        smp: 1,
        memory_mib: 256,
        qemu_args: PCI_DEVICES,
        disks: PCI_DISKS,
        markers: &[
            console("boot: pci: 10 functions (0 problems) through ECAM"),
            console_line("pci: 10 functions"),
            // q35's own functions.
            console_line("pci: 0000:00:00.0 8086:29c0 class 060000"),
            console_line("pci: 0000:00:01.0 1234:1111 class 030000 bar0=mem32-pf/16M bar2=mem32/4K rom/64K"),
            // edu: one 1 MiB BAR, one 64-bit MSI vector.
            console_line("pci: 0000:00:02.0 1234:11e8 class 00ff00 bar0=mem32/1M caps=msi@40(64bit,1vec)"),
            // nvme: 16 KiB 64-bit BAR0, MSI-X at 0x40 with 65 entries, table BAR0+0x2000, PBA BAR0+0x3000.
            console_line(
                "pci: 0000:00:03.0 1b36:0010 class 010802 bar0=mem64/16K caps=msix@40(65vec,table=bar0+0x2000,pba=bar0+0x3000),exp@80(v2,rc-endpoint),pm@60",
            ),
            // e1000e: MSI and a 5-entry MSI-X, AER and DSN.
            console_line(
                "pci: 0000:00:04.0 8086:10d3 class 020000 bar0=mem32/128K bar1=mem32/128K bar2=io/32 bar3=mem32/16K rom/256K caps=pm@c8,msi@d0(64bit,1vec),exp@e0(v1,rc-endpoint),msix@a0(5vec,table=bar3+0x0,pba=bar3+0x2000) ext=aer@100,dsn@140",
            ),
            // The PCIe root port and the nvme behind it, on bus 1.
            console_line(
                "pci: 0000:00:05.0 1b36:000c class 060400 bridge 00->01..01 bar0=mem32/4K caps=exp@54(v2,root-port),msix@48(1vec,table=bar0+0x0,pba=bar0+0x800),ssvid@40 ext=aer@100,acs@148",
            ),
            console_line("pci: 0000:00:1f.0 8086:2918 class 060100"),
            console_line(
                "pci: 0000:00:1f.2 8086:2922 class 010601 bar4=io/32 bar5=mem32/4K caps=msi@80(64bit,1vec),sata@a8",
            ),
            console_line("pci: 0000:00:1f.3 8086:2930 class 0c0500 bar4=io/64"),
            console_line(
                "pci: 0000:01:00.0 1b36:0010 class 010802 bar0=mem64/16K caps=msix@40(65vec,table=bar0+0x2000,pba=bar0+0x3000),exp@80(v2,endpoint),pm@60",
            ),
            console("pci_enumerate: 10 functions consistent; 1 bridges followed, 1 functions behind them"),
            console("pci_enumerate: legacy 0xCF8/0xCFC enumeration agrees with ECAM on 10 functions"),
            console("scenario pci_enumerate: PASS"),
            log("acpi: MCFG at "),
            log("pci: 0000:00:02.0 1234:11e8 class 00ff00 bar0=mem32/1M caps=msi@40(64bit,1vec)"),
            log("pci: 0000:00:03.0 bar0 mem64 at "),
            log("pci_enumerate: 10 functions, legacy agrees on 10"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "pci_config_virtualization",
        sequence: None,
        kernel_args: &[],
        guests: false,
        cpu: DEFAULT_CPU,
        about: "edu and nvme through their virtual config space: BAR sizing/moves stay virtual, hidden capabilities vanish, read-only bits hold",
        smp: 1,
        memory_mib: 256,
        qemu_args: PCI_DEVICES,
        disks: PCI_DISKS,
        markers: &[
            console(
                "pci_config_virtualization: 0000:00:03.0 bar0 sizing returns 16K (true size 16K); guest address 0x1000000000 recorded; physical BAR unchanged",
            ),
            console_line("pci_config_virtualization: 0000:00:03.0 guest capability chain: msix@40,exp@80 (pm hidden)"),
            console("pci_config_virtualization: 0000:00:03.0 command 0x0406 -> hardware 0x01"),
            console("(INTx disable virtual)"),
            console_line(
                "pci_config_virtualization: 0000:00:03.0 msix enable+mask -> event; physical MSI-X untouched; guest sees 65 entries",
            ),
            console(
                "pci_config_virtualization: 0000:00:03.0 4000 pseudo-random guest writes: no protected hardware bit changed",
            ),
            console(
                "pci_config_virtualization: 0000:00:02.0 bar0 sizing returns 1M (true size 1M); guest address 0x80000000 recorded; physical BAR unchanged",
            ),
            console_line("pci_config_virtualization: 0000:00:02.0 guest capability chain: msi@40"),
            console_line(
                "pci_config_virtualization: 0000:00:02.0 msi address/data/enable -> 3 events; physical MSI still disabled",
            ),
            console(
                "pci_config_virtualization: 0000:00:02.0 4000 pseudo-random guest writes: no protected hardware bit changed",
            ),
            console_line(
                "pci_config_virtualization: 0000:00:02.0: msi hidden -> no capability list (status cap-list 0, pointer 0)",
            ),
            console("scenario pci_config_virtualization: PASS"),
            log("scenario pci_config_virtualization: start"),
            log("scenario pci_config_virtualization: PASS"),
        ],
        forbidden: &["PANIC", "EXCEPTION", "FAIL", "bring-up failed", "rejected", "protected bits changed"],
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "iommu_dma_allowed",
        sequence: None,
        kernel_args: &[],
        guests: false,
        cpu: DEFAULT_CPU,
        about: "edu DMA through a VT-d domain: bytes round-trip from one mapped IOVA through the device to another, identical",
        smp: 1,
        memory_mib: 256,
        qemu_args: IOMMU_DEVICES,
        disks: &[],
        markers: &[
            console("boot: iommu: 1 VT-d unit(s), 3-level tables, interrupt remapping on, all devices blocked"),
            console("iommu_dma_allowed: 4095 bytes from IOVA 0x8000000 (phys 0x"),
            console("through edu to IOVA 0x8100000 (phys 0x"),
            console("): identical byte for byte, nothing written beyond"),
            console_line("iommu_dma_allowed: 0000:00:02.0 assigned to domain 1 on unit 0; 0 faults"),
            console("scenario iommu_dma_allowed: PASS"),
            log("dmar: unit at 0xfed90000"),
            log("iommu_dma_allowed: 4095 bytes round-tripped"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "iommu_dma_blocked",
        sequence: None,
        kernel_args: &[],
        guests: false,
        cpu: DEFAULT_CPU,
        about: "edu DMA to unmapped IOVAs, hypervisor code, read-only or stale mappings, and from an unassigned device is blocked and reported with edu's source id and the right reason; a fault flood is survived",
        smp: 1,
        memory_mib: 256,
        qemu_args: IOMMU_DEVICES,
        disks: &[],
        markers: &[
            console(
                "iommu_dma_blocked: write to unmapped IOVA (a real frame's address): blocked; fault sid 0x0010 (0000:00:02.0) reason 0x05 (write without write permission) write at 0x",
            ),
            console("owner Hypervisor"),
            console("iommu_dma_blocked: target frame 0x"),
            console_line(
                "iommu_dma_blocked: write aimed at hypervisor code: blocked; fault sid 0x0010 (0000:00:02.0) reason 0x05 (write without write permission) write at 0x200000, owner Hypervisor",
            ),
            console_line("iommu_dma_blocked: hypervisor text at 0x200000 unchanged"),
            console_line(
                "iommu_dma_blocked: write through a read-only mapping: blocked; fault sid 0x0010 (0000:00:02.0) reason 0x05 (write without write permission) write at 0x8000000, owner Hypervisor",
            ),
            console_line(
                "iommu_dma_blocked: read of unmapped IOVA: blocked; fault sid 0x0010 (0000:00:02.0) reason 0x06 (read without read permission) read at 0x8500000, owner Hypervisor",
            ),
            console_line(
                "iommu_dma_blocked: write after the mapping became read-only: blocked; fault sid 0x0010 (0000:00:02.0) reason 0x05 (write without write permission) write at 0x8100000, owner Hypervisor",
            ),
            console_line(
                "iommu_dma_blocked: read after unmap: blocked; fault sid 0x0010 (0000:00:02.0) reason 0x06 (read without read permission) read at 0x8100000, owner Hypervisor",
            ),
            console_line("iommu_dma_blocked: permission change and unmap take effect at once (IOTLB invalidated)"),
            console_line(
                "iommu_dma_blocked: write from the unassigned device: blocked; fault sid 0x0010 (0000:00:02.0) reason 0x02 (context entry not present) write at 0x8100000, owner Unassigned",
            ),
            console_line("iommu_dma_blocked: unassigned device can DMA nowhere (destination unchanged)"),
            console("iommu_dma_blocked: flood of 100 faulting transfers: "),
            console_line(
                "iommu_dma_blocked: after the flood the unit still translates (round trip identical) and reports faults",
            ),
            console("scenario iommu_dma_blocked: PASS"),
            log("iommu_dma_blocked: write aimed at hypervisor code: fault reason 0x5 at 0x200000"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "iommu_irq_remap",
        sequence: None,
        kernel_args: &[],
        guests: false,
        cpu: DEFAULT_CPU,
        about: "edu MSI through an IRTE arrives at the intended vector; retargeting, freeing and a foreign source id behave; the compatibility-format outcome is reported",
        smp: 1,
        memory_mib: 256,
        qemu_args: IOMMU_DEVICES,
        disks: &[],
        markers: &[
            console_line(
                "iommu_irq_remap: interrupt remapping on, compatibility format not allowed (GSTS.CFIS=0), entries validate the requester ID (SVT=01)",
            ),
            console_line(
                "iommu_irq_remap: edu MSI through IRTE 0 (remappable format, address 0xfee00010) arrived at vector 0x40 on cpu 0: 1 interrupt",
            ),
            console_line(
                "iommu_irq_remap: IRTE 0 retargeted to vector 0x43 without touching the device: 1 interrupt there, none at 0x40",
            ),
            console_line("iommu_irq_remap: IRTE 0 freed: edu's MSI through it delivers nothing (0 interrupts)"),
            console_line(
                "iommu_irq_remap: edu (0x0010) through IRTE 0 owned by 0000:00:1f.2 (source id 0x00fa): blocked, 0 interrupts at vector 0x42",
            ),
            console("iommu_irq_remap: compatibility-format MSI (0xfee00000, vector 0x41): "),
            console("scenario iommu_irq_remap: PASS"),
            log("scenario iommu_irq_remap: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "guest_hello",
        sequence: Some("partitions"),
        kernel_args: &[],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "the default partition: a guest prints through its console, checks SVM is hidden and its FPU state survives exits, and returns 0x600d by hypercall",
        smp: 2,
        memory_mib: 256,
        qemu_args: &[],
        disks: &[],
        markers: &[
            console("boot: svm: revision 1, 16 ASIDs, nested paging, next-RIP no, decode assists no; on 2 CPU(s)"),
            console_line("partitions: hello:guest=hello,memory=16M,cpus=1,console=serial"),
            console_line("[hello] hello from hello vcpu 0/1: 16 MiB, ABI 1.2"),
            console_line("[hello] hello: cpuid and EFER hide SVM; hypervisor leaf \"ConduitHyper\", ABI 1.2"),
            console_line("[hello] hello: xmm0-15 and x87 state intact across 1000 exits"),
            console_line("[hello] hello: bad hypercalls rejected: unknown -> -38, bad address -> -14"),
            console_line("[hello] hello: done"),
            console("vmm: partition 0 \"hello\" vcpu 0 on cpu 1 stopped: exited with 0x600d"),
            console("vmm: 1 partition(s) torn down, "),
            console_line("partitions: partition 0 on cpu 1: exited with 0x600d"),
            log("guest hello: hello: done"),
            log("scenario partitions: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "guest_isolation",
        sequence: None,
        kernel_args: &[],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "intruders reading unbacked memory, writing the host I/O APIC, triple-faulting and writing at another guest's host address are each stopped and reported while a bystander guest keeps running intact",
        smp: 3,
        memory_mib: 256,
        qemu_args: &[],
        disks: &[],
        markers: &[
            console("guest_isolation: the bystander's checksummed buffer is at host-physical 0x"),
            console_line("[intruder] intruder: reading unbacked guest-physical 0x1200000 (0x1000000 bytes of RAM)"),
            console("guest_isolation: intruder 1: read of guest-physical 0x1200000 outside its memory at rip "),
            console("; bystander still running; 4100 frames returned"),
            console_line("[intruder] intruder: writing 0xdeadbeefdeadbeef to the host I/O APIC at 0xfec00000"),
            console("guest_isolation: intruder 2: write of guest-physical 0xfec00000 outside its memory at rip "),
            console("; bystander still running; 4100 frames returned"),
            console_line("[intruder] intruder: triple fault (IDT limit 0, then int3)"),
            console("guest_isolation: intruder 3: triple fault at rip "),
            console("; bystander still running; 4100 frames returned"),
            console(", where another guest's memory is on the host"),
            console("[intruder] intruder: write to 0x"),
            console("guest_isolation: intruder 4: write of guest-physical "),
            console("; bystander still running; 4100 frames returned"),
            console_line("[intruder] intruder: left 0x5ec2e7da7a000001 in xmm0-15 and dr0-3"),
            console_line("[intruder] intruder: fcw 0x037f, mxcsr 0x1f80, st0-7 zero, xmm0-15 zero, dr0-3 zero"),
            console_line("guest_isolation: intruder 6: exited with 0x600d"),
            console("[bystander] worker bystander: "),
            console(" rounds, checksum 0xc4372ec82a36fb1a stable, canary intact, "),
            console_line("guest_isolation: bystander: exited with 0x600d"),
            console("guest_isolation: hypervisor text unchanged, "),
            log("guest_isolation: intruder 1: MemoryViolation"),
            log("scenario guest_isolation: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "guest_interrupt_injection",
        sequence: None,
        kernel_args: &[],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "vectors injected while the guest halts, spins with interrupts on or off, or runs under a raised TPR each arrive exactly once, higher priority first; the virtual APIC timer fires once",
        smp: 2,
        memory_mib: 256,
        qemu_args: &[],
        disks: &[],
        markers: &[
            console_line("[irq] injection: phase A (halted): 0x74 0x73 0x62 0x51"),
            console_line("[irq] injection: phase B (spinning, IF=1): 0x51 0x62 0x73 0x74"),
            console_line(
                "guest_interrupt_injection: phase C: raised 0x51 0x62 0x73 0x74 one by one with IF=0: all held pending",
            ),
            console_line("[irq] injection: phase C (spinning, IF=0): 0x74 0x73 0x62 0x51"),
            console_line("[irq] injection: phase D (TPR 0x60, then 0): 0x73 0x62 0x51"),
            console_line("[irq] injection: phase E (timer): 0x45"),
            console_line("[irq] injection: phase F (CR8 6, then 0): 0x73 0x62 0x51"),
            console_line("[irq] injection: every vector arrived exactly once per raise, higher priority first"),
            console(
                "guest_interrupt_injection: exited with 0x600d; 18 raised by the supervisor + 1 by the virtual timer, 19 injected, 0 left pending, ",
            ),
            log("guest irq: injection: every vector arrived exactly once per raise, higher priority first"),
            log("scenario guest_interrupt_injection: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "two_guests_two_cpus",
        sequence: None,
        kernel_args: &[],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "two guests run at the same time on two CPUs (one on the bootstrap CPU), each finishing its work",
        smp: 2,
        memory_mib: 256,
        qemu_args: &[],
        disks: &[],
        markers: &[
            console("[left] worker left: 60 rounds, checksum 0xc4372ec82a36fb1a stable, canary intact, "),
            log("guest right: worker right: 60 rounds, checksum 0xe3131169c103bfd1 stable, canary intact, "),
            console("two_guests_two_cpus: left (partition 0) on cpu 0: worked from "),
            console("two_guests_two_cpus: right (partition 1) on cpu 1: worked from "),
            console_line("two_guests_two_cpus: their work overlapped in time"),
            log("scenario two_guests_two_cpus: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "partition_invalid",
        sequence: Some("partitions"),
        kernel_args: &["conduit.partition=bad:guest=hello,memory=16Q,cpus=1"],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "a partition description that does not parse is rejected at boot, saying what is wrong",
        smp: 2,
        memory_mib: 256,
        qemu_args: &[],
        disks: &[],
        markers: &[
            console_line("partitions: rejected: partition \"bad\": memory: \"16Q\" is not a size"),
            console_line("scenario partitions: FAIL: the partition description was rejected"),
            log("partitions: rejected: partition \"bad\": memory: \"16Q\" is not a size"),
        ],
        forbidden: &["PANIC", "EXCEPTION", "vmm: cpu"],
        expect: Expect::Failure,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "partition_conflict",
        sequence: Some("partitions"),
        kernel_args: &[
            "conduit.partition=a:guest=hello,memory=16M,cpus=1",
            "conduit.partition=b:guest=hello,memory=16M,cpus=0+1",
        ],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "partitions that do not fit the machine (two claim the same CPU) are rejected at boot",
        smp: 2,
        memory_mib: 256,
        qemu_args: &[],
        disks: &[],
        markers: &[
            console_line("partitions: rejected: partition \"b\": CPU 1 is already used by partition 0"),
            console_line("scenario partitions: FAIL: the partition description was rejected"),
            log("partitions: rejected: partition \"b\": "),
        ],
        forbidden: &["PANIC", "EXCEPTION", "vmm: cpu"],
        expect: Expect::Failure,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "edu_msi_to_guest",
        sequence: Some("partitions"),
        kernel_args: &["conduit.partition=edu:guest=edu_msi,memory=16M,cpus=1,devices=00:02.0"],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "a guest drives the passed-through edu device (factorial with interrupt, raise register, DMA) and receives each MSI at its vector through an IRTE; counters agree",
        smp: 2,
        memory_mib: 256,
        qemu_args: IOMMU_DEVICES,
        disks: &[],
        markers: &[
            console_line("vmm: 0000:00:02.0 has no FLR: its internal state is not reset before its assignment"),
            log("vmm: partition 0: 0000:00:02.0 assigned as 00:01.0"),
            console_line("[edu] edu_msi: edu 1234:11e8 at 00:01.0 through ECAM"),
            console_line("[edu] edu_msi: CF8/CFC agrees: 0x11e81234 at 00:01.0"),
            console_line("[edu] edu_msi: BAR0 32-bit memory, 0x100000 bytes at 0xc0000000; command MEM|BM"),
            console_line("[edu] edu_msi: id 0x010000ed, invert 0x12345678 -> 0xedcba987"),
            console_line("[edu] edu_msi: (a) factorial 5 = 120 with 1 interrupt at 0x50, status 0x1"),
            console_line("[edu] edu_msi: (b) 20 raises: 20 interrupts at 0x50 (21 in all)"),
            console_line("[edu] edu_msi: (c) MSI data 0x58: 5 interrupts at 0x58, none at 0x50"),
            console_line("[edu] edu_msi: (d) DMA of 256 bytes RAM -> edu buffer -> RAM: identical"),
            console_line(
                "[edu] edu_msi: (e) IRQ_STATS MSI 0: raised 26 delivered 26 coalesced 0 masked 0 spurious 0 pending 0",
            ),
            console_line("[edu] edu_msi: all checks passed: 26 interrupts (21 at 0x50, 5 at 0x58)"),
            console_line(
                "irq: partition 0 00:01.0 MSI message 0: raised 26 delivered 26 coalesced 0 masked 0 spurious 0 pending 0",
            ),
            console_line("vmm: 0000:00:02.0 has no FLR: its internal state is not reset after its partition"),
            console_line("irq: after teardown 0 host vectors and 0 contexts in use"),
            console_line("iommu: 0 DMA or interrupt-remapping faults during the run"),
            console_line("partitions: partition 0 on cpu 1: exited with 0x600d"),
            log("scenario partitions: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "nvme_msix_dynamic",
        sequence: Some("partitions"),
        kernel_args: &["conduit.partition=nv:guest=nvme_msix,memory=16M,cpus=1,devices=00:03.0"],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "a guest NVMe driver enables MSI-X with every vector masked, then unmasks vectors one at a time while commands are in flight on every live queue (admin and I/O completions arrive across each unmask): none lost, none duplicated, no other vector disturbed",
        smp: 2,
        memory_mib: 256,
        qemu_args: NVME_DEVICES,
        disks: NVME_DISKS,
        markers: &[
            console_line("vmm: 0000:00:03.0 reset (FLR) before its assignment"),
            console_line("[nv] nvme_msix: MSI-X enabled, function unmasked, all 65 entries masked"),
            console_line(
                "[nv] nvme_msix: Identify Controller by interrupt 0x60: vendor 0x1b36, model \"QEMU NVMe Ctrl\"",
            ),
            console_line("[nv] nvme_msix: I/O queues 1-4 created (IV 1-4, IEN); entries 1-4 -> 0x61-0x64 still masked"),
            console_line("[nv] nvme_msix: entry 1 unmasked: vectors 0x60 0x61 live, counts 12 2"),
            console_line("[nv] nvme_msix: entry 2 unmasked: vectors 0x60 0x61 0x62 live, counts 14 5 2"),
            console_line("[nv] nvme_msix: entry 3 unmasked: vectors 0x60 0x61 0x62 0x63 live, counts 16 8 5 2"),
            console_line("[nv] nvme_msix: entry 4 unmasked: vectors 0x60 0x61 0x62 0x63 0x64 live, counts 18 11 8 5 2"),
            console_line("[nv] nvme_msix: all checks passed: vectors 0x60-0x64 counts 18 11 8 5 2"),
            console_line(
                "irq: partition 0 00:01.0 MSI-X entry 4: raised 2 delivered 2 coalesced 0 masked 0 spurious 0 pending 0",
            ),
            console_line("vmm: 0000:00:03.0 reset (FLR) after its partition"),
            console_line("irq: after teardown 0 host vectors and 0 contexts in use"),
            console_line("iommu: 0 DMA or interrupt-remapping faults during the run"),
            console_line("partitions: partition 0 on cpu 1: exited with 0x600d"),
            log("scenario partitions: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "msix_mask_pending",
        sequence: Some("partitions"),
        kernel_args: &["conduit.partition=nv:guest=msix_mask,memory=16M,cpus=1,devices=00:03.0"],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "an NVMe interrupt raised while its MSI-X vector (or the function) is masked shows in the guest's PBA and arrives exactly once on unmask",
        smp: 2,
        memory_mib: 256,
        qemu_args: NVME_DEVICES,
        disks: NVME_DISKS,
        markers: &[
            console_line("[nv] msix_mask: entry 1 masked: I/O completion polled, no interrupt in 20 ms, PBA bit 1 set"),
            console_line("[nv] msix_mask: entry 1 unmasked: 1 interrupt at 0x61, PBA bit 1 clear, no second in 20 ms"),
            console_line(
                "[nv] msix_mask: function masked: admin completion polled, no interrupt in 20 ms, PBA bit 0 set",
            ),
            console_line("[nv] msix_mask: function unmasked: 1 interrupt at 0x60, PBA bit 0 clear, no second in 20 ms"),
            console_line(
                "[nv] msix_mask: SET_IRQS: entry 1 bound to 0x66 (1 interrupt), unbound (none), MSI-X off (reads off)",
            ),
            console_line("[nv] msix_mask: all checks passed: 4 interrupts at 0x60, 1 at 0x61"),
            // Entry 1 after the SET_IRQS phase: the release after unmask and the bound Read
            // delivered; the Read completed while unbound (masked) reaches the context only as
            // a signal with no binding.
            console("irq: partition 0 00:01.0 MSI-X entry 1: raised 3 delivered 2 coalesced 0 masked 1"),
            console_line("irq: after teardown 0 host vectors and 0 contexts in use"),
            console_line("iommu: 0 DMA or interrupt-remapping faults during the run"),
            log("scenario partitions: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "emulated_interrupt",
        sequence: Some("partitions"),
        kernel_args: &["conduit.partition=em:guest=emulated,memory=16M,cpus=1,vdevs=notify"],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "software-raised vectors of the emulated notify device (its register path and SET_IRQS triggers) reach the guest through the same MSI-X front end, masking and PBA included; malformed SET_IRQS calls get their error codes",
        smp: 2,
        memory_mib: 256,
        qemu_args: &[],
        disks: &[],
        markers: &[
            console_line("[em] emulated: notify c0de:0001 at 00:01.0"),
            console_line("[em] emulated: SIGNAL 0-3: one interrupt each at 0x70 0x71 0x72 0x73; COUNT 4"),
            console_line("[em] emulated: entry 2 masked: SIGNAL 2 held, PBA bit 2 set; unmasked: 1 interrupt at 0x72"),
            console_line("[em] emulated: IRQ_INFO MSI-X: count 4, EVENTFD|MASKABLE, not NORESIZE"),
            console_line("[em] emulated: SET_IRQS trigger 0-3: one interrupt each at 0x70 0x71 0x72 0x73"),
            console_line("[em] emulated: SET_IRQS trigger bool 1 0 1 0: one interrupt each at 0x70 0x72"),
            console_line("[em] emulated: SET_IRQS mask 1, trigger 1: held; unmask 1: 1 interrupt at 0x71"),
            console_line("[em] emulated: SET_IRQS index 7 -> -22 (EINVAL)"),
            console_line("[em] emulated: SET_IRQS device 00:1f.0 (none) -> -19 (ENODEV)"),
            console_line("[em] emulated: all checks passed: interrupts 0x70 3, 0x71 3, 0x72 4, 0x73 2"),
            console_line(
                "irq: partition 0 00:01.0 MSI-X entry 2: raised 4 delivered 4 coalesced 0 masked 1 spurious 0 pending 0",
            ),
            console_line("irq: after teardown 0 host vectors and 0 contexts in use"),
            console_line("iommu: 0 DMA or interrupt-remapping faults during the run"),
            log("scenario partitions: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "irq_no_loss_stress",
        sequence: Some("partitions"),
        kernel_args: &["conduit.partition=st:guest=irq_stress,memory=16M,cpus=1+2,devices=00:03.0"],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "thousands of NVMe completion interrupts while a second vCPU churns the vector (mask, retarget between CPUs, unmask): every signal is delivered or merged into a pending one, none lost, none spurious, guest count = delivered",
        smp: 3,
        memory_mib: 256,
        qemu_args: NVME_DEVICES,
        disks: NVME_DISKS,
        markers: &[
            console_line(
                "[st] irq_stress: vcpu 0: entry 1 churning on vcpu 1; submitting 4000 reads on queue 1, polling",
            ),
            console("[st] irq_stress: IRQ_STATS entry 1: raised "),
            console_line(
                "[st] irq_stress: all checks passed: 4000 completions; guest count = IRQ_STATS delivered, no spurious, none pending",
            ),
            console("[st] irq_stress: vcpu 1: "),
            console_line("irq: 0 stray device interrupts (host vectors with no context)"),
            console_line("irq: after teardown 0 host vectors and 0 contexts in use"),
            console_line("iommu: 0 DMA or interrupt-remapping faults during the run"),
            console_line("partitions: partition 0 on cpu 1: exited with 0x600d"),
            console_line("partitions: partition 0 on cpu 2: exited with 0x600d"),
            log("scenario partitions: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "doorbell_device_write",
        sequence: Some("partitions"),
        kernel_args: &["conduit.partition=db:guest=doorbell_edu,memory=16M,cpus=1,devices=00:02.0"],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "guest writes to registered doorbells on a trapped edu page arrive as the pre-programmed device write (and an event), or forward the value written; a non-matching write on the same page takes the generic path; removal maps the page straight again",
        smp: 2,
        memory_mib: 256,
        qemu_args: IOMMU_DEVICES,
        disks: &[],
        markers: &[
            console_line(
                "[db] doorbell_edu: (a) wrote 1 at 0x04: device got 0xcafe0000 (pre-programmed), 1 interrupt at 0x66, hits 1",
            ),
            console_line(
                "[db] doorbell_edu: (b) wrote 2 at 0x04 (no match): forwarded as written, no interrupt, hits 1",
            ),
            console_line("[db] doorbell_edu: (c) wrote 0x1357 at 0x10: forwarded to 0x04, hits 1"),
            console_line(
                "[db] doorbell_edu: (d) removed: 1 written at 0x04 reaches the device as 1, no interrupt; hits -> ENODEV",
            ),
            console_line("[db] doorbell_edu: all checks passed"),
            console_line("irq: after teardown 0 host vectors and 0 contexts in use"),
            console_line("iommu: 0 DMA or interrupt-remapping faults during the run"),
            console_line("partitions: partition 0 on cpu 1: exited with 0x600d"),
            log("scenario partitions: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "doorbell_nvme_io",
        sequence: Some("partitions"),
        kernel_args: &[
            "conduit.partition=nv:guest=doorbell_nvme,memory=16M,cpus=1,devices=00:03.0,doorbell=00:03.0/0/0x1008/4,arg=1",
        ],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "a guest NVMe driver writes blocks and reads them back through the passed-through controller; its submission doorbells (one registered by hypercall, one by the partition description) sit on a trapped page served by the fast path, its completions arrive as forwarded MSI-X interrupts; data read back equals data written; then the guest's own FLR resets the controller and the doorbell still rings after it is brought up again",
        smp: 2,
        memory_mib: 256,
        qemu_args: NVME_DEVICES,
        disks: NVME_DISKS,
        markers: &[
            console_line(
                "[nv] doorbell_nvme: SQ 0 tail 0x1000 by hypercall, SQ 1 tail 0x1008 by description, both forwarded",
            ),
            console("[nv] doorbell_nvme: controller \"QEMU NVMe Ctrl\" up by interrupts at 0x60"),
            console_line(
                "[nv] doorbell_nvme: 8 blocks of 512 bytes written and read back through I/O queue 1: identical",
            ),
            console_line(
                "[nv] doorbell_nvme: fast path served SQ 0 4 and SQ 1 16 submissions; interrupts 4 at 0x60, 16 at 0x61",
            ),
            console_line("vmm: 0000:00:03.0 reset (FLR) at its guest's request"),
            console_line(
                "[nv] doorbell_nvme: guest FLR: reset (RDY 0, MSI-X off); up again, Identify by interrupt via the SQ 0 doorbell",
            ),
            console_line("[nv] doorbell_nvme: all checks passed"),
            console_line("irq: after teardown 0 host vectors and 0 contexts in use"),
            console_line("iommu: 0 DMA or interrupt-remapping faults during the run"),
            console_line("partitions: partition 0 on cpu 1: exited with 0x600d"),
            log("scenario partitions: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "doorbell_rejects",
        sequence: Some("partitions"),
        kernel_args: &[
            "conduit.doorbell_limit=8",
            "conduit.partition=rj:guest=doorbell_rejects,memory=16M,cpus=1,devices=00:02.0+00:03.0",
        ],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "every doorbell rejection with its error code: not a BAR, absent BAR, beyond the BAR, bad width, misaligned, on the MSI-X table or PBA, action into the table or beyond the BAR, values too wide, no action, bad event, unknown device (EINVAL/ENODEV/EFAULT); duplicate and colliding any-value (EEXIST); unknown removal (ENODEV); the per-device limit (ENOSPC)",
        smp: 2,
        memory_mib: 256,
        qemu_args: DOORBELL_DEVICES,
        disks: NVME_DISKS,
        markers: &[
            console_line("partitions: doorbells per device limited to 8"),
            console_line("[rj] doorbell_rejects: config space as the BAR (index 7) -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: BAR 1 (edu has none) -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: offset beyond the BAR (0x100000) -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: last bytes crossing the BAR end -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: width 3 -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: misaligned offset (0x12, width 4) -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: on the MSI-X table (nvme 0x2000) -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: on the PBA (nvme 0x3000) -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: action writing the MSI-X table -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: action writing beyond the BAR -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: match value wider than 1 byte -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: written value wider than 2 bytes -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: no action -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: unknown flag -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: event vector 8 -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: event on vCPU 5 (absent) -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: device 00:1f.0 (not on the bus) -> -19 (ENODEV)"),
            console_line("[rj] doorbell_rejects: request outside guest memory -> -14 (EFAULT)"),
            console_line("[rj] doorbell_rejects: first doorbell at edu 0x10 -> 0 (ok)"),
            console_line("[rj] doorbell_rejects: the same again -> -17 (EEXIST)"),
            console_line("[rj] doorbell_rejects: value 1 where any value rings -> -17 (EEXIST)"),
            console_line("[rj] doorbell_rejects: 2 bytes at the same offset (distinct) -> 0 (ok)"),
            console_line("[rj] doorbell_rejects: removing value 1 (never added) -> -19 (ENODEV)"),
            console_line("[rj] doorbell_rejects: removing on nvme (never added) -> -19 (ENODEV)"),
            console_line("[rj] doorbell_rejects: removing the 2-byte one -> 0 (ok)"),
            console_line("[rj] doorbell_rejects: removing it again -> -19 (ENODEV)"),
            console_line("[rj] doorbell_rejects: removing a key no doorbell can have (BAR 9) -> -22 (EINVAL)"),
            console_line("[rj] doorbell_rejects: an event doorbell after 40 refused ones -> 0 (ok)"),
            console_line("[rj] doorbell_rejects: removing it -> 0 (ok)"),
            console_line("[rj] doorbell_rejects: doorbells on edu up to the limit -> 0 (ok)"),
            console_line("[rj] doorbell_rejects: one more than the limit -> -28 (ENOSPC)"),
            console_line("[rj] doorbell_rejects: the limit is per device (nvme) -> 0 (ok)"),
            console_line("[rj] doorbell_rejects: after removing one -> 0 (ok)"),
            console_line("[rj] doorbell_rejects: all checks passed"),
            console_line("partitions: partition 0 on cpu 1: exited with 0x600d"),
            log("scenario partitions: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "bench_doorbell",
        sequence: Some("partitions"),
        kernel_args: &["conduit.partition=b:guest=doorbell_edu,memory=16M,cpus=1,devices=00:02.0,arg=2"],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "benchmark (cargo xtask bench): under -icount shift=0 the TSC counts instructions; guest writes on a trapped edu page: hypervisor instructions from the NPF exit to the next VMRUN for a registered doorbell (fast path) and for a plain register (generic trapped-MMIO path), in the same run",
        smp: 2,
        memory_mib: 256,
        qemu_args: &["-device", "intel-iommu,intremap=on", "-device", "edu,addr=0x2", "-icount", "shift=0,align=off"],
        disks: &[],
        markers: &[
            console_line("[b] doorbell_edu: 256 doorbell writes and 256 plain writes on the trapped page measured"),
            console("bench: partition 0 vcpu 0: doorbell fast path: 256 writes, NPF exit to next VMRUN mean "),
            console("bench: partition 0 vcpu 0: generic trapped MMIO: 256 writes, NPF exit to next VMRUN mean "),
            log("scenario partitions: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
    Scenario {
        name: "bench_forwarding",
        sequence: Some("partitions"),
        kernel_args: &["conduit.partition=b:guest=bench_irq,memory=16M,cpus=1,devices=00:02.0"],
        guests: true,
        cpu: DEFAULT_CPU,
        about: "benchmark (cargo xtask bench): under -icount shift=0 the TSC counts instructions; edu MSIs forwarded to a guest spinning without exits: hypervisor instructions from the INTR exit to the next VMRUN, exits per forwarded interrupt",
        smp: 2,
        memory_mib: 256,
        qemu_args: &["-device", "intel-iommu,intremap=on", "-device", "edu,addr=0x2", "-icount", "shift=0,align=off"],
        disks: &[],
        markers: &[
            console_line("[b] bench_irq: 256 forwarded interrupts measured, each waited for without an exit"),
            console("bench: partition 0 vcpu 0: 272 forwarded interrupts, INTR exit to next VMRUN mean "),
            console("bench: partition 0 vcpu 0: measured window: 256 forwarded interrupts, "),
            log("scenario partitions: PASS"),
        ],
        forbidden: NO_FAILURES,
        expect: Expect::Success,
        timeout: TIMEOUT,
    },
];

/// VT-d with interrupt remapping and an nvme (1 MiB namespace) at 00:03.0.
const NVME_DEVICES: &[&str] =
    &["-device", "intel-iommu,intremap=on", "-device", "nvme,serial=conduit0,drive=nvme0,addr=0x3"];
const NVME_DISKS: &[Disk] = &[Disk { id: "nvme0", bytes: 1 << 20 }];

/// The passthrough test bed: edu, an nvme, an e1000e, and a second nvme behind a PCIe root
/// port, at fixed slots so addresses are stable.
const PCI_DEVICES: &[&str] = &[
    "-device",
    "edu,addr=0x2",
    "-device",
    "nvme,serial=conduit0,drive=nvme0,addr=0x3",
    "-device",
    "e1000e,addr=0x4",
    "-device",
    "pcie-root-port,id=rp1,chassis=1,addr=0x5",
    "-device",
    "nvme,serial=conduit1,drive=nvme1,bus=rp1,addr=0x0",
];
const PCI_DISKS: &[Disk] = &[Disk { id: "nvme0", bytes: 1 << 20 }, Disk { id: "nvme1", bytes: 1 << 20 }];

impl Scenario {
    /// The in-hypervisor sequence this scenario runs.
    pub fn sequence(&self) -> &'static str {
        self.sequence.unwrap_or(self.name)
    }
}

/// The CPU every scenario uses unless it says otherwise: SVM and nested paging on (later issues
/// run guests), no x2APIC and no 1 GiB pages under TCG.
pub const DEFAULT_CPU: &str = "qemu64,+svm,+npt";

/// VT-d with interrupt remapping, and edu (the unit must come before the devices it serves).
const IOMMU_DEVICES: &[&str] = &["-device", "intel-iommu,intremap=on", "-device", "edu,addr=0x2"];

/// edu and an nvme behind the IOMMU (doorbell rejections on both).
const DOORBELL_DEVICES: &[&str] = &[
    "-device",
    "intel-iommu,intremap=on",
    "-device",
    "edu,addr=0x2",
    "-device",
    "nvme,serial=conduit0,drive=nvme0,addr=0x3",
];

/// The scenario named `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_unique_and_default_exists() {
        for (i, a) in SCENARIOS.iter().enumerate() {
            assert!(SCENARIOS[i + 1..].iter().all(|b| b.name != a.name), "duplicate {}", a.name);
            assert!(!a.markers.is_empty(), "{} checks nothing", a.name);
            assert!(a.markers.iter().any(|m| m.stream == Stream::Log), "{} checks no defmt line", a.name);
        }
        assert!(find(DEFAULT).is_some());
    }

    #[test]
    fn verdict_statuses() {
        assert_eq!(Expect::Success.qemu_status(), 33);
        assert_eq!(Expect::Failure.qemu_status(), 65);
    }
}
