//! Building and tearing down partitions: guest RAM from the frame allocator (zeroed, in as few
//! 2 MiB-aligned chunks as memory allows), nested page tables mapping exactly those chunks and
//! nothing else, the ELF image, the boot layout (GDT, identity page tables, boot-info blocks),
//! one VMCB per vCPU. Teardown, once every vCPU has stopped, returns every frame.

use super::run::{self, Launch};
use super::{MAX_PARTITIONS, VcpuState, slot};
use crate::arch::percpu;
use crate::arch::svm::{self, SvmError};
use crate::sync::IrqMutex;
use conduit_abi::{ABI_VERSION, BOOT_INFO_MAGIC, BootInfo, layout};
use conduit_mem::PAGE_SIZE;
use conduit_paging::{Attrs, Cache, Execute, MapError, Options, PageSize, PageTable, TableMemory, Write};
use conduit_vm::bundle::{Bundle, BundleError};
use conduit_vm::elf::{self, ElfError};
use conduit_vm::guest::{self, HostTables};
use conduit_vm::memory::{CHUNK_ALIGN, GuestMemory};
use conduit_vm::partition::{MAX_VCPUS, Name, Spec};
use conduit_vm::vmcb::Vmcb;
use core::sync::atomic::Ordering;

/// Guest RAM in nested tables: read, write, execute, write-back, user (nested walks are user
/// accesses).
const GUEST_RAM: Attrs = Attrs { write: Write::Allow, execute: Execute::Allow, cache: Cache::WriteBack, user: true };
/// Device memory in nested tables: read, write, uncached, never executable.
const DEVICE_MEMORY: Attrs = Attrs { write: Write::Allow, execute: Execute::Deny, cache: Cache::Uncached, user: true };

/// Per partition: bumped whenever a nested mapping is removed or changed; a vCPU that sees a
/// new value flushes its TLB before its next VMRUN.
static TLB_GENERATION: [core::sync::atomic::AtomicU64; MAX_PARTITIONS] =
    [const { core::sync::atomic::AtomicU64::new(0) }; MAX_PARTITIONS];

/// The nested-TLB generation of partition `index`.
pub fn tlb_generation(index: usize) -> u64 {
    TLB_GENERATION.get(index).map_or(0, |g| g.load(Ordering::Acquire))
}

/// Maps device memory `[hpa, hpa + len)` at guest-physical `gpa` of partition `index` (4 KiB
/// pages, so no table is ever replaced and freed while vCPUs run). The range must be device
/// registers (never RAM, the image or firmware tables) and lie in the guest's BAR window.
pub fn map_device(index: usize, gpa: u64, hpa: u64, len: u64) -> Result<(), BuildError> {
    let end = gpa.checked_add(len).ok_or(BuildError::Layout)?;
    if gpa < layout::PCI_WINDOW || end > layout::PCI_WINDOW + layout::PCI_WINDOW_BYTES {
        return Err(BuildError::Layout);
    }
    let hend = hpa.checked_add(len).ok_or(BuildError::Layout)?;
    crate::mem::check_mmio(conduit_mem::PhysRange::new(hpa, hend)).map_err(|_| BuildError::Layout)?;
    let mut parts = PARTITIONS.lock();
    let p = parts.get_mut(index).and_then(Option::as_mut).ok_or(BuildError::NoPartition(index))?;
    p.npt.map(gpa, hpa, len, DEVICE_MEMORY, PageSize::Size4K).map_err(BuildError::Paging)
}

/// Unmaps `[gpa, gpa + len)` (device memory) from partition `index` and has every vCPU of it
/// flush its TLB before running on.
pub fn unmap_device(index: usize, gpa: u64, len: u64) -> Result<(), BuildError> {
    let end = gpa.checked_add(len).ok_or(BuildError::Layout)?;
    if gpa < layout::PCI_WINDOW || end > layout::PCI_WINDOW + layout::PCI_WINDOW_BYTES {
        return Err(BuildError::Layout);
    }
    let cpus = {
        let mut parts = PARTITIONS.lock();
        let p = parts.get_mut(index).and_then(Option::as_mut).ok_or(BuildError::NoPartition(index))?;
        p.npt.unmap(gpa, len).map_err(BuildError::Paging)?;
        p.spec.cpus.clone()
    };
    if let Some(g) = TLB_GENERATION.get(index) {
        g.fetch_add(1, Ordering::AcqRel);
    }
    for cpu in cpus {
        super::kick(usize::from(cpu));
    }
    Ok(())
}

/// Why a partition could not be built or started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum BuildError {
    /// SVM is not usable on a CPU the partition needs.
    Svm(u8, SvmError),
    /// No guest bundle was passed as a boot module.
    NoBundle,
    /// The guest bundle is malformed.
    Bundle(BundleError),
    /// The bundle has no image of this name.
    NoImage,
    /// The guest image is not a loadable ELF for this partition.
    Elf(ElfError),
    /// Not enough free memory for the guest's RAM.
    OutOfMemory {
        /// Bytes still missing.
        missing: u64,
    },
    /// Free memory is too fragmented (more chunks than a guest may have).
    TooFragmented,
    /// The nested page tables could not be built.
    Paging(MapError),
    /// Writing guest memory failed (the layout does not fit).
    Layout,
    /// `MAX_PARTITIONS` are alive.
    TooManyPartitions,
    /// The CPU is running another vCPU.
    CpuBusy(u8),
    /// No such partition.
    NoPartition(usize),
    /// A device could not be given to the partition.
    Device(super::devices::DeviceError),
    /// A vCPU could not be handed to its CPU.
    Launch(u8),
    /// Teardown while a vCPU still runs.
    StillRunning(u8),
}

/// Nested page-table frames from the frame allocator. Freed frames go straight back: tables
/// are only freed at teardown, after every vCPU of the partition stopped, and every vCPU's
/// first VMRUN flushes the whole TLB (`tlb_control::FLUSH_ALL`), so no CPU uses them again.
#[derive(Debug, Default)]
struct NptTables {
    live: u64,
}

impl TableMemory for NptTables {
    fn alloc_table(&mut self) -> Option<u64> {
        let f = crate::mem::alloc_frame()?;
        // SAFETY:
        // 1. `f` is a fresh frame from the allocator: nobody else holds it.
        // 2. Allocator frames are usable RAM, identity-mapped read-write by the kernel.
        unsafe { core::ptr::write_bytes(f as *mut u8, 0, PAGE_SIZE as usize) };
        self.live += 1;
        Some(f)
    }

    fn free_table(&mut self, table: u64) {
        if crate::mem::free_frame(table).is_ok() {
            self.live -= 1;
        }
    }

    fn read_entry(&self, table: u64, index: usize) -> u64 {
        // SAFETY:
        // 1. `table` is a frame this type allocated (identity-mapped RAM), `index` < 512 (the
        //    paging crate's invariant, enforced by the modulo), so the read stays in the frame.
        // 2. Volatile: the CPU's nested walker sets accessed/dirty bits concurrently.
        unsafe { core::ptr::read_volatile((table as *const u64).add(index % conduit_paging::ENTRIES)) }
    }

    fn write_entry(&mut self, table: u64, index: usize, value: u64) {
        // SAFETY: as in `read_entry`; `&mut self` is only reachable through the partition
        // registry's lock, so there is no other writer.
        unsafe { core::ptr::write_volatile((table as *mut u64).add(index % conduit_paging::ENTRIES), value) }
    }
}

/// A built partition.
#[derive(Debug)]
struct Partition {
    spec: Spec,
    memory: GuestMemory,
    npt: PageTable<NptTables>,
    vmcbs: heapless::Vec<u64, MAX_VCPUS>,
    asid: u32,
    free_start: u64,
}

static PARTITIONS: IrqMutex<[Option<Partition>; MAX_PARTITIONS]> = IrqMutex::new([const { None }; MAX_PARTITIONS]);

/// What the supervisor knows of a partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Registry index (also the `BootInfo::partition` value).
    pub index: usize,
    /// Name.
    pub name: Name,
    /// Physical CPU of each vCPU.
    pub cpus: heapless::Vec<u8, MAX_VCPUS>,
    /// Guest RAM bytes.
    pub memory_bytes: u64,
    /// Host chunks backing it.
    pub chunks: usize,
    /// Host-physical address of its first chunk.
    pub first_chunk: u64,
    /// `BootInfo::free_start` (the first byte after its image).
    pub free_start: u64,
}

/// The partition at `index`.
pub fn partition_info(index: usize) -> Option<PartitionInfo> {
    let parts = PARTITIONS.lock();
    let p = parts.get(index)?.as_ref()?;
    Some(PartitionInfo {
        index,
        name: p.spec.name.clone(),
        cpus: p.spec.cpus.clone(),
        memory_bytes: p.spec.memory_bytes,
        chunks: p.memory.chunks().len(),
        first_chunk: p.memory.chunks().first().map_or(0, |c| c.hpa),
        free_start: p.free_start,
    })
}

/// The host-physical address behind guest-physical `gpa` of partition `index`.
pub fn host_address(index: usize, gpa: u64) -> Option<u64> {
    let parts = PARTITIONS.lock();
    parts.get(index)?.as_ref()?.memory.translate(gpa).map(|(hpa, _)| hpa)
}

/// The guest bundle passed as the first boot module.
pub fn bundle() -> Result<Bundle<'static>, BuildError> {
    let record = crate::platform().ok_or(BuildError::NoBundle)?.record;
    let module = record.modules.first().ok_or(BuildError::NoBundle)?;
    let len = usize::try_from(module.range.len()).map_err(|_| BuildError::NoBundle)?;
    // SAFETY:
    // 1. The module lies in RAM the boot loader placed it in; bring-up excluded it from the
    //    frame allocator (nothing else ever writes it) and the kernel's tables map all RAM, so
    //    the `len` bytes at its start are readable for the rest of the run.
    // 2. u8 has no alignment or validity requirement.
    let bytes = unsafe { core::slice::from_raw_parts(module.range.start as *const u8, len) };
    Bundle::parse(bytes).map_err(BuildError::Bundle)
}

/// I/O and MSR permission maps shared by every vCPU: all ones (every port and MSR exits).
/// Allocated once (at bring-up, through `vmm::init`) and kept for the whole run.
pub fn permission_maps() -> Result<(u64, u64), BuildError> {
    static MAPS: spin::Once<Option<(u64, u64)>> = spin::Once::new();
    let maps = MAPS.call_once(|| {
        let iopm = crate::mem::alloc_contiguous(3, PAGE_SIZE, conduit_mem::FOUR_GIB).ok()?;
        let msrpm = crate::mem::alloc_contiguous(2, PAGE_SIZE, conduit_mem::FOUR_GIB).ok()?;
        // SAFETY:
        // 1. Both ranges were just allocated (3 and 2 frames): nobody else holds them.
        // 2. They are usable RAM, identity-mapped read-write; they are never freed.
        unsafe {
            core::ptr::write_bytes(iopm as *mut u8, 0xff, 3 * PAGE_SIZE as usize);
            core::ptr::write_bytes(msrpm as *mut u8, 0xff, 2 * PAGE_SIZE as usize);
        }
        Some((iopm, msrpm))
    });
    maps.ok_or(BuildError::OutOfMemory { missing: 5 * PAGE_SIZE })
}

/// Copies `data` into guest memory at `gpa` (before any vCPU runs).
fn write_guest(memory: &GuestMemory, gpa: u64, data: &[u8]) -> bool {
    memory.for_each_piece(gpa, data.len() as u64, |hpa, off, n| {
        // SAFETY:
        // 1. `hpa..hpa + n` lies in one chunk of this guest's RAM (frames it owns, identity-
        //    mapped read-write); `off + n <= data.len()` by `for_each_piece`'s contract.
        // 2. No vCPU of the partition runs yet, so nothing else accesses these bytes.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr().add(off as usize), hpa as *mut u8, n as usize) }
    })
}

fn zero_guest(memory: &GuestMemory, gpa: u64, len: u64) -> bool {
    memory.for_each_piece(gpa, len, |hpa, _, n| {
        // SAFETY: as in `write_guest`.
        unsafe { core::ptr::write_bytes(hpa as *mut u8, 0, n as usize) }
    })
}

/// Backs `size` bytes of guest RAM: the largest 2 MiB-aligned runs the allocator has, halving
/// down to 2 MiB. On failure everything taken is returned.
fn alloc_ram(size: u64) -> Result<GuestMemory, BuildError> {
    let mut memory = GuestMemory::new(size);
    let mut want = size;
    let result = loop {
        let left = size - memory.backed();
        if left == 0 {
            break Ok(());
        }
        want = want.min(left);
        match crate::mem::alloc_contiguous(want / PAGE_SIZE, CHUNK_ALIGN, u64::MAX) {
            Ok(hpa) => {
                if memory.push(hpa, want).is_err() {
                    let _ = crate::mem::free_contiguous(hpa, want / PAGE_SIZE);
                    break Err(BuildError::TooFragmented);
                }
            }
            Err(_) if want > CHUNK_ALIGN => want = (want / 2).next_multiple_of(CHUNK_ALIGN).min(want - CHUNK_ALIGN),
            Err(_) => break Err(BuildError::OutOfMemory { missing: left }),
        }
    };
    if let Err(e) = result {
        free_ram(&memory);
        return Err(e);
    }
    if !zero_guest(&memory, 0, size) {
        free_ram(&memory);
        return Err(BuildError::Layout);
    }
    Ok(memory)
}

fn free_ram(memory: &GuestMemory) {
    for c in memory.chunks() {
        if let Err(e) = crate::mem::free_contiguous(c.hpa, c.len / PAGE_SIZE) {
            defmt::error!("vmm: freeing guest chunk {=u64:#x}: {}", c.hpa, e);
        }
    }
}

/// Builds partition `spec` from `bundle` (not started). Returns its index.
pub fn create(spec: &Spec, bundle: &Bundle<'_>) -> Result<usize, BuildError> {
    for &cpu in &spec.cpus {
        if svm::host_vmcb(usize::from(cpu)).is_none() {
            let why = svm::probe().err().unwrap_or(SvmError::BadCpu(usize::from(cpu)));
            return Err(BuildError::Svm(cpu, why));
        }
    }
    let image_bytes = bundle.find(&spec.guest).ok_or(BuildError::NoImage)?;
    let image = elf::parse(image_bytes).map_err(BuildError::Elf)?;
    let vcpus = spec.cpus.len() as u32;
    let plan = elf::plan(&image, spec.memory_bytes, vcpus).map_err(BuildError::Elf)?;
    let (iopm, msrpm) = permission_maps()?;

    // Creates are serialized (so the free index found stays free); the registry itself is
    // locked (interrupts off) only to find the index and to install the partition, not while
    // guest RAM is zeroed and the image loaded.
    static CREATE: spin::Mutex<()> = spin::Mutex::new(());
    let _serial = CREATE.lock();
    let index = PARTITIONS.lock().iter().position(Option::is_none).ok_or(BuildError::TooManyPartitions)?;
    // ASID = index + 1 must exist (ASID 0 is the host's).
    let asids = svm::probe().map_err(|e| BuildError::Svm(spec.cpus.first().copied().unwrap_or(0), e))?.asids;
    if index as u32 + 1 >= asids {
        return Err(BuildError::TooManyPartitions);
    }
    let memory = alloc_ram(spec.memory_bytes)?;
    let mut vmcbs: heapless::Vec<u64, MAX_VCPUS> = heapless::Vec::new();
    let built = (|| {
        let mut npt =
            PageTable::new(NptTables::default(), Options::x86(true, PageSize::Size2M)).map_err(BuildError::Paging)?;
        for c in memory.chunks() {
            npt.map(c.gpa, c.hpa, c.len, GUEST_RAM, PageSize::Size2M).map_err(BuildError::Paging)?;
        }
        let loaded = elf::load(
            image_bytes,
            &image,
            |gpa, data| if write_guest(&memory, gpa, data) { Ok(()) } else { Err(()) },
            |gpa, len| if zero_guest(&memory, gpa, len) { Ok(()) } else { Err(()) },
        );
        if loaded.is_err() || !guest::write_tables(spec.memory_bytes, |gpa, b| write_guest(&memory, gpa, b)) {
            return Err(BuildError::Layout);
        }
        let mut name = [0u8; 16];
        for (d, s) in name.iter_mut().zip(spec.name.as_bytes()) {
            *d = *s;
        }
        let host = HostTables { iopm, msrpm, ncr3: npt.root(), asid: index as u32 + 1 };
        for vcpu in 0..vcpus {
            let info = BootInfo {
                magic: BOOT_INFO_MAGIC,
                abi_version: ABI_VERSION,
                partition: index as u32,
                vcpu,
                vcpus,
                memory_bytes: spec.memory_bytes,
                free_start: plan.image_end,
                free_end: plan.stacks_start,
                stack_bytes: layout::STACK_BYTES,
                local_apic: layout::LOCAL_APIC,
                apic_timer_hz: crate::arch::time::tsc_hz(),
                tsc_hz: crate::arch::time::tsc_hz(),
                argument: spec.argument,
                name,
                ecam_base: if spec.devices.is_empty() && spec.vdevs.is_empty() { 0 } else { layout::ECAM },
                pci_window: layout::PCI_WINDOW,
                ..Default::default()
            };
            if !write_guest(&memory, guest::boot_info_gpa(vcpu), boot_info_bytes(&info).as_slice()) {
                return Err(BuildError::Layout);
            }
            let frame = crate::mem::alloc_frame().ok_or(BuildError::OutOfMemory { missing: PAGE_SIZE })?;
            let _ = vmcbs.push(frame);
            // SAFETY:
            // 1. `frame` is a fresh, 4 KiB-aligned allocator frame (identity-mapped RAM); a
            //    `Vmcb` is exactly 4096 bytes with alignment 4096, and any bit pattern is a
            //    valid `Vmcb` (plain integers).
            // 2. Nothing else references it: the exclusive borrow ends before the frame is
            //    published to the vCPU's CPU (at start, through the slot's lock).
            let vmcb = unsafe { &mut *(frame as *mut Vmcb) };
            guest::init_vmcb(vmcb, host, spec.memory_bytes, vcpu, plan.entry);
        }
        Ok(npt)
    })();
    match built {
        Ok(npt) => {
            defmt::info!(
                "vmm: partition {=usize} \"{=str}\": {=u64} MiB in {=usize} chunk(s), entry {=u64:#x}, {=u32} vCPU(s), {=u64} table frames",
                index,
                spec.name.as_str(),
                spec.memory_bytes >> 20,
                memory.chunks().len(),
                plan.entry,
                vcpus,
                npt.memory().live
            );
            let pci = !spec.devices.is_empty() || !spec.vdevs.is_empty();
            let memory_map = memory.clone();
            PARTITIONS.lock()[index] = Some(Partition {
                spec: spec.clone(),
                memory,
                npt,
                vmcbs,
                asid: index as u32 + 1,
                free_start: plan.image_end,
            });
            if pci && let Err(e) = super::devices::attach(index, spec, &memory_map) {
                defmt::error!("vmm: partition {=usize}: devices: {}", index, e);
                let _ = teardown(index);
                return Err(BuildError::Device(e));
            }
            Ok(index)
        }
        Err(e) => {
            for f in vmcbs {
                let _ = crate::mem::free_frame(f);
            }
            free_ram(&memory);
            Err(e)
        }
    }
}

/// The bytes of a boot-info block (little-endian fields, as the ABI defines).
fn boot_info_bytes(info: &BootInfo) -> heapless::Vec<u8, 128> {
    let mut v = heapless::Vec::new();
    let mut put = |b: &[u8]| {
        let _ = v.extend_from_slice(b);
    };
    put(&info.magic.to_le_bytes());
    put(&info.abi_version.to_le_bytes());
    put(&info.partition.to_le_bytes());
    put(&info.vcpu.to_le_bytes());
    put(&info.vcpus.to_le_bytes());
    put(&info.reserved0.to_le_bytes());
    for f in [
        info.memory_bytes,
        info.free_start,
        info.free_end,
        info.stack_bytes,
        info.local_apic,
        info.apic_timer_hz,
        info.tsc_hz,
        info.argument,
    ] {
        put(&f.to_le_bytes());
    }
    put(&info.name);
    put(&info.ecam_base.to_le_bytes());
    put(&info.pci_window.to_le_bytes());
    debug_assert_eq!(v.len(), core::mem::size_of::<BootInfo>());
    v
}

/// Launches every vCPU of partition `index` on its CPU. vCPUs pinned to the calling CPU are
/// not started: the caller runs them with `run_here` when it is ready to give up the CPU.
pub fn start(index: usize) -> Result<(), BuildError> {
    let parts = PARTITIONS.lock();
    let p = parts.get(index).and_then(Option::as_ref).ok_or(BuildError::NoPartition(index))?;
    for &cpu in &p.spec.cpus {
        let s = slot(usize::from(cpu)).ok_or(BuildError::Launch(cpu))?;
        // A stopped vCPU whose partition was not torn down still owns the slot: contexts name
        // their target by CPU, so its device interrupts would reach the newcomer.
        if matches!(s.state(), VcpuState::Starting | VcpuState::Running | VcpuState::Halted)
            || s.owner.load(Ordering::Acquire) != 0
        {
            return Err(BuildError::CpuBusy(cpu));
        }
    }
    let here = percpu::this_cpu().index();
    for (vcpu, (&cpu, &vmcb)) in p.spec.cpus.iter().zip(&p.vmcbs).enumerate() {
        let s = slot(usize::from(cpu)).ok_or(BuildError::Launch(cpu))?;
        s.pending.clear();
        s.stop_requested.store(false, Ordering::Release);
        s.signal.store(0, Ordering::Release);
        s.mailbox.store(0, Ordering::Release);
        s.raised.store(0, Ordering::Relaxed);
        s.signals.lock().clear();
        *s.outcome.lock() = None;
        s.owner.store(((index as u32) << 8 | vcpu as u32) + 1, Ordering::Release);
        *s.launch.lock() = Some(Launch {
            partition: index,
            vcpu: vcpu as u32,
            vmcb_pa: vmcb,
            memory: p.memory.clone(),
            name: p.spec.name.clone(),
            console: p.spec.console,
            asid: p.asid,
            pci: !p.spec.devices.is_empty() || !p.spec.vdevs.is_empty(),
        });
        s.set_state(VcpuState::Starting);
        if usize::from(cpu) == here {
            continue;
        }
        if let Err(e) = crate::arch::smp::run_on(usize::from(cpu), &run::VCPU_WORK) {
            defmt::error!("vmm: cpu {=u8}: launching a vCPU: {}", cpu, e);
            // Take the launch back unless the CPU already took it (then it runs).
            if s.launch.lock().take().is_some() {
                s.owner.store(0, Ordering::Release);
                s.set_state(VcpuState::Idle);
                return Err(BuildError::Launch(cpu));
            }
        }
    }
    Ok(())
}

/// Frees partition `index` (all its vCPUs must have stopped): guest RAM, nested tables, VMCBs.
/// Returns the frames given back.
pub fn teardown(index: usize) -> Result<u64, BuildError> {
    let mut parts = PARTITIONS.lock();
    let entry = parts.get_mut(index).ok_or(BuildError::NoPartition(index))?;
    let p = entry.as_ref().ok_or(BuildError::NoPartition(index))?;
    for &cpu in &p.spec.cpus {
        let s = slot(usize::from(cpu)).ok_or(BuildError::Launch(cpu))?;
        if !matches!(s.state(), VcpuState::Stopped | VcpuState::Idle) {
            return Err(BuildError::StillRunning(cpu));
        }
    }
    // Devices first: quiesced and unassigned before their DMA domain and the RAM it maps go.
    drop(parts);
    super::devices::report(index);
    let devices_clean = super::devices::detach(index);
    let mut parts = PARTITIONS.lock();
    let Some(entry) = parts.get_mut(index) else { return Err(BuildError::NoPartition(index)) };
    let Some(p) = entry.take() else { return Err(BuildError::NoPartition(index)) };
    let mut frames = 0;
    if devices_clean {
        frames += p.memory.backed() / PAGE_SIZE;
        free_ram(&p.memory);
    } else {
        // A device may still reach this RAM by DMA: keep it out of the allocator (leaked).
        defmt::error!("vmm: partition {=usize}: guest RAM kept (not freed): a device was not given back", index);
    }
    for &f in &p.vmcbs {
        if crate::mem::free_frame(f).is_ok() {
            frames += 1;
        }
    }
    let table_frames = p.npt.memory().live;
    let tables = p.npt.destroy();
    frames += table_frames - tables.live;
    if tables.live != 0 {
        defmt::error!("vmm: partition {=usize}: {=u64} nested table frames not returned", index, tables.live);
    }
    for &cpu in &p.spec.cpus {
        if let Some(s) = slot(usize::from(cpu)) {
            s.owner.store(0, Ordering::Release);
            s.set_state(VcpuState::Idle);
        }
    }
    Ok(frames)
}
