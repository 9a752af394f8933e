//! Conduit: a bare-metal x86-64 microhypervisor for device passthrough.
//!
//! Bring-up on the bootstrap processor, in order: per-CPU tables and IDT (exceptions are
//! reported from here on), COM1 console, COM2 defmt log, CPU features, ACPI (RSDP, tables,
//! MADT), memory map and frame allocator, the kernel's own page tables, local APIC + legacy
//! PIC and I/O APIC masking, timer calibration, application processors. Then the scenario
//! named on the command line (`conduit.scenario=NAME`, default `partitions`: run the selected guest partitions) runs and its
//! result is the run's verdict.
#![no_std]
#![no_main]

mod arch;
mod console;
mod exit;
mod iommu;
mod log;
mod mem;
mod partitions;
mod pci;
mod scenarios;
mod sync;
mod vmm;

use arch::{apic, cpu, paging, smp, time};
use conduit_acpi::{AcpiError, Madt, Mcfg, Signature, Tables, find_rsdp};
use conduit_boot::{BootError, BootRecord};
use conduit_mem::{MemoryMap, PhysRange};
use exit::{Verdict, exit};
use heapless::Vec;

conduit_boot::kernel_entry!(kernel_main);

/// What bring-up found and built; scenarios read it.
#[derive(Debug)]
pub struct Platform {
    /// The boot record.
    pub record: &'static BootRecord,
    /// Normalized memory map.
    pub map: MemoryMap,
    /// ACPI tables.
    pub acpi: Tables,
    /// The MADT.
    pub madt: Madt,
    /// Bootstrap processor features.
    pub features: cpu::Features,
    /// Frame allocator set-up.
    pub memory: mem::Summary,
    /// Clock rates.
    pub clocks: time::Calibration,
    /// I/O APIC pins masked (all of them).
    pub ioapic_pins_masked: u32,
    /// Application processors that checked in.
    pub aps_started: usize,
    /// The kernel's PML4.
    pub page_table_root: u64,
    /// ECAM windows (empty: legacy config access only).
    pub mcfg: Mcfg,
    /// PCI functions enumerated at boot.
    pub pci_functions: usize,
    /// The IOMMU, when there is one.
    pub iommu: Option<iommu::Summary>,
    /// SVM as the bootstrap processor found it (every online CPU enabled it, or the error).
    pub svm: Result<arch::svm::SvmInfo, arch::svm::SvmError>,
}

static PLATFORM: spin::Once<Platform> = spin::Once::new();

/// What bring-up found, once it finished.
pub fn platform() -> Option<&'static Platform> {
    PLATFORM.get()
}

/// Why bring-up failed.
#[derive(Debug, defmt::Format)]
enum BringUpError {
    Boot(BootError),
    Acpi(AcpiError),
    NoMadt,
    Map(conduit_mem::MapError),
    Memory(mem::MemError),
    Paging(conduit_paging::MapError),
    Apic(conduit_apic::ApicError),
    Smp(smp::SmpError),
    TooManyExclusions,
    /// A device-register range from ACPI overlaps RAM, firmware tables or the image.
    MmioOverlapsMemory(u64),
    /// The MADT's local APIC address differs from IA32_APIC_BASE.
    LapicBaseMismatch {
        madt: u64,
        msr: u64,
    },
    /// The AP trampoline page is not free conventional memory.
    TrampolinePageUnusable,
    /// The DMAR is malformed.
    Dmar(conduit_iommu::vtd::dmar::DmarError),
    /// The IOMMU could not be brought up.
    Iommu(iommu::InitError),
}

impl From<AcpiError> for BringUpError {
    fn from(e: AcpiError) -> Self {
        Self::Acpi(e)
    }
}
impl From<conduit_apic::ApicError> for BringUpError {
    fn from(e: conduit_apic::ApicError) -> Self {
        Self::Apic(e)
    }
}

fn kernel_main(record: Result<&'static BootRecord, BootError>) -> ! {
    arch::init_bsp_cpu();
    time::mark_boot();
    let console_ok = console::init();
    println!("conduit {}: hypervisor starting", env!("CARGO_PKG_VERSION"));
    let log_ok = log::init();
    defmt::info!(
        "conduit {=str} starting; console {=bool}, log {=bool}",
        env!("CARGO_PKG_VERSION"),
        console_ok,
        log_ok
    );
    let platform = match record.map_err(BringUpError::Boot).and_then(bring_up) {
        Ok(p) => p,
        Err(e) => {
            println!("conduit: bring-up failed: {:?}", e);
            defmt::error!("bring-up failed: {}", e);
            exit(Verdict::Failure);
        }
    };
    let name = platform.record.cmdline_value("conduit.scenario").unwrap_or(scenarios::DEFAULT);
    let verdict = scenarios::run(name, platform);
    exit(verdict)
}

fn bring_up(record: &'static BootRecord) -> Result<&'static Platform, BringUpError> {
    println!("boot: protocol {:?}, command line \"{}\"", record.protocol, record.cmdline.as_str());
    let features = cpu::features();
    defmt::info!("cpu: {}", features);

    // ACPI, read through the early identity map (tables below 4 GiB).
    let early = conduit_boot::entry::EarlyPhys;
    let rsdp = find_rsdp(&early, record.rsdp_paddr)?;
    let acpi = Tables::load(&early, rsdp)?;
    for t in acpi.iter() {
        defmt::info!("acpi: {} at {=u64:#x} len {=u32}", t.signature, t.paddr, t.len);
    }
    for (at, e) in acpi.rejected() {
        defmt::warn!("acpi: table at {=u64:#x} rejected: {}", at, e);
        println!("acpi: table at {:#x} rejected: {:?}", at, e);
    }
    let madt = Madt::parse(&early, acpi.find(Signature::MADT).ok_or(BringUpError::NoMadt)?)?;
    let mcfg = match acpi.find(Signature::MCFG) {
        Some(t) => Mcfg::parse(&early, t)?,
        None => Mcfg::default(),
    };
    let dmar = match acpi.find(Signature::DMAR) {
        Some(t) => {
            defmt::info!("acpi: DMAR located at {=u64:#x} ({=u32} bytes)", t.paddr, t.len);
            Some(conduit_iommu::vtd::dmar::Dmar::parse(&early, t.paddr, t.len).map_err(BringUpError::Dmar)?)
        }
        None => {
            defmt::info!("acpi: no DMAR: no VT-d IOMMU");
            None
        }
    };
    if let Some(d) = &dmar {
        for u in &d.units {
            defmt::info!(
                "dmar: unit at {=u64:#x} ({=u32} pages), segment {=u16}, include-all {=bool}, {=usize} scopes",
                u.base,
                u.pages,
                u.segment,
                u.include_pci_all,
                u.scopes.len()
            );
        }
        for u in &d.units {
            for sc in &u.scopes {
                defmt::info!(
                    "dmar:   scope {} id {=u8} bus {=u8} path {=[?]}",
                    sc.kind,
                    sc.enumeration_id,
                    sc.start_bus,
                    sc.path.as_slice()
                );
            }
        }
        for r in &d.rmrrs {
            defmt::info!(
                "dmar: RMRR [{=u64:#x}, {=u64:#x}) for {=usize} devices",
                r.range.start,
                r.range.end,
                r.scopes.len()
            );
        }
    }

    // Memory: normalize the map, keep out everything that lives in RAM.
    let map = MemoryMap::normalize(&record.memory_map).map_err(BringUpError::Map)?;
    let repairs = map.repairs();
    if repairs != Default::default() {
        defmt::warn!("memory map repaired: {}", repairs);
    }
    let mut exclusions: Vec<PhysRange, { conduit_mem::map::MAX_EXCLUSIONS }> = Vec::new();
    let (boot_stack, _) = conduit_boot::entry::boot_stack();
    let trampoline = PhysRange::new(smp::TRAMPOLINE_PADDR, smp::TRAMPOLINE_PADDR + 0x1000);
    let trampoline_free = map.kind_at(trampoline.start) == Some(conduit_mem::MemoryKind::Usable)
        && map.kind_at(trampoline.end - 1) == Some(conduit_mem::MemoryKind::Usable)
        && !record.boot_data.iter().chain(record.modules.iter().map(|m| &m.range)).any(|r| r.overlaps(&trampoline));
    if !trampoline_free {
        return Err(BringUpError::TrampolinePageUnusable);
    }
    // Beyond the CPU's physical address width nothing can be mapped.
    let unreachable = PhysRange::new(features.max_phys_addr, u64::MAX);
    let in_ram = [mem::image_range(), boot_stack, trampoline, unreachable];
    for r in in_ram
        .into_iter()
        .chain(record.boot_data.iter().copied())
        .chain(record.modules.iter().map(|m| m.range))
        .chain(acpi.ranges())
    {
        exclusions.push(r).map_err(|_| BringUpError::TooManyExclusions)?;
    }
    let memory = mem::init(&map, &exclusions).map_err(BringUpError::Memory)?;

    // Device registers named by ACPI: the local APIC must be where the CPU says, and no
    // register range may alias RAM, firmware tables or the image.
    let lapic_msr = apic::msr_base();
    if madt.local_apic_paddr != lapic_msr {
        return Err(BringUpError::LapicBaseMismatch { madt: madt.local_apic_paddr, msr: lapic_msr });
    }
    // The kernel's own page tables.
    let mut mmio: Vec<PhysRange, { 1 + conduit_acpi::madt::MAX_IOAPICS + conduit_acpi::mcfg::MAX_WINDOWS }> =
        Vec::new();
    let _ = mmio.push(PhysRange::new(madt.local_apic_paddr, madt.local_apic_paddr + apic::XAPIC_MMIO_BYTES));
    for io in &madt.ioapics {
        let _ = mmio.push(PhysRange::new(io.paddr, io.paddr + apic::IOAPIC_MMIO_BYTES));
    }
    for w in &mcfg.windows {
        let _ = mmio.push(PhysRange::new(w.start(), w.start() + w.len_bytes()));
    }
    mem::set_layout(&map, acpi.ranges());
    for m in &mmio {
        mem::check_mmio(*m).map_err(|_| BringUpError::MmioOverlapsMemory(m.start))?;
    }
    let firmware: Vec<PhysRange, { conduit_acpi::MAX_TABLES + 2 }> = acpi.ranges().collect();
    let (_, boot_guard) = conduit_boot::entry::boot_stack();
    let mut guards: Vec<u64, 9> = Vec::new();
    let _ = guards.push(boot_guard);
    for g in arch::stacks::BSP_STACKS.layout().guards() {
        let _ = guards.push(g);
    }
    let layout = paging::Layout { firmware: &firmware, mmio: &mmio, guards: &guards };
    let page_table_root = paging::init(&map, &layout, &features).map_err(BringUpError::Paging)?;
    defmt::info!(
        "paging: kernel tables at {=u64:#x}, W^X image, {=usize} guard pages, largest page {=str}",
        page_table_root,
        guards.len(),
        if features.pdpe1gb { "1G" } else { "2M" }
    );

    // Interrupt controllers and time.
    arch::interrupts::init();
    apic::init_mode(madt.local_apic_paddr, features.x2apic);
    let bsp_apic_id = apic::enable_this_cpu()?;
    arch::percpu::this_cpu().apic_id.store(bsp_apic_id, core::sync::atomic::Ordering::Relaxed);
    apic::disable_pic();
    apic::register_ioapics(madt.ioapics.iter().map(|io| io.paddr));
    let ioapic_pins_masked = apic::mask_all_ioapics();
    let clocks = time::calibrate()?;
    defmt::info!(
        "time: tsc {=u64} kHz, apic timer {=u64} kHz (divide 16)",
        clocks.tsc_hz / 1000,
        clocks.apic_timer_hz / 1000
    );
    x86_64::instructions::interrupts::enable();

    // PCI: config access and the inventory.
    let (pci_functions, pci_problems) = pci::init(&mcfg.windows);
    println!(
        "boot: pci: {} functions ({} problems) through {}",
        pci_functions,
        pci_problems,
        if mcfg.windows.is_empty() { "legacy ports" } else { "ECAM" }
    );

    // IOMMU: every device blocked from here on.
    let iommu = iommu::init(dmar, bsp_apic_id).map_err(BringUpError::Iommu)?;
    match &iommu {
        Some(s) => println!(
            "boot: iommu: {} VT-d unit(s), {}-level tables, interrupt remapping {}, all devices blocked",
            s.units,
            s.levels,
            if s.interrupt_remapping { "on" } else { "off" }
        ),
        None => println!("boot: iommu: absent ({})", iommu::absent_reason().unwrap_or("?")),
    }

    // Application processors.
    let aps_started = smp::start_aps(&madt, bsp_apic_id, features.nx, features.x2apic).map_err(BringUpError::Smp)?;
    println!("boot: {} of {} CPUs online", smp::online(), madt.enabled_cpus().count());

    // SVM on every CPU (each AP enabled its own while starting).
    let svm = arch::svm::enable_this_cpu(0);
    match &svm {
        Ok(info) => {
            let ready = (0..arch::percpu::MAX_CPUS).filter(|&c| arch::svm::host_vmcb(c).is_some()).count();
            println!(
                "boot: svm: revision {}, {} ASIDs, nested paging, next-RIP {}, decode assists {}; on {} CPU(s)",
                info.revision,
                info.asids,
                if info.nrips { "yes" } else { "no" },
                if info.decode_assists { "yes" } else { "no" },
                ready
            );
            defmt::info!("svm: {}; enabled on {=usize} CPU(s)", info, ready);
            if let Err(e) = vmm::init() {
                defmt::error!("vmm: {}", e);
            }
        }
        Err(e) => {
            println!("boot: svm: unavailable: {}", e.describe());
            defmt::warn!("svm: unavailable: {}", e);
        }
    }

    Ok(PLATFORM.call_once(|| Platform {
        record,
        map,
        acpi,
        madt,
        features,
        memory,
        clocks,
        ioapic_pins_masked,
        aps_started,
        page_table_root,
        mcfg,
        pci_functions,
        iommu,
        svm,
    }))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    x86_64::instructions::interrupts::disable();
    let cpu = arch::percpu::this_cpu().index();
    match info.location() {
        Some(l) => console::emergency(format_args!(
            "\nPANIC on cpu {} at {}:{}: {}\n",
            cpu,
            l.file(),
            l.line(),
            info.message()
        )),
        None => console::emergency(format_args!("\nPANIC on cpu {}: {}\n", cpu, info.message())),
    }
    exit(Verdict::Failure)
}
