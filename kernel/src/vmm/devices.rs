//! Devices in a partition (`docs/devices.md`): the guest's own PCI bus (ECAM window and
//! configuration mechanism #1), the physical functions assigned to it — configuration space
//! through `conduit_pci::vconfig`, BARs mapped into the guest where it places them (except the
//! pages holding the MSI-X table and PBA, and BARs smaller than a page, which trap), DMA
//! confined to the guest's RAM by an IOMMU domain, MSI and MSI-X through the one front end of
//! `conduit_irq` with the physical backend (host vector + interrupt-remapping entry + the real
//! table entry) — and the emulated `notify` function (the same front end, software backend).
//!
//! Everything here is the control path: one lock per partition's bus, taken by the vCPU that
//! trapped (configuration access, MSI-X table write, hypercall) and by the supervisor. Device
//! interrupts never come here: they go host vector → context → vCPU (`vmm::irq`), lock-free.

use super::irq::{HOST_VECTORS, MAX_CONTEXTS, POOL, VmmSink, drain_vectors_of};
use super::{MAX_PARTITIONS, build, doorbells};
use crate::arch::mmio::MmioWindow;
use crate::arch::percpu;
use crate::iommu::{self, AssignError, Domain, Owner};
use crate::println;
use crate::sync::IrqMutex;
use conduit_abi::{doorbell as abi_doorbell, error, irq as abi_irq, layout, vdev as abi_vdev};
use conduit_iommu::{DmaAccess, InterruptHandle, InterruptTarget};
use conduit_irq::api::{self, EventBinding, IrqControl, IrqError, IrqIndex, IrqInfo};
use conduit_irq::frontend::{Backend, MsiControl, MsiFrontEnd, MsixControl, MsixFrontEnd, Software, VcpuSlots};
use conduit_irq::{ContextId, MaskState, Target};
use conduit_mem::PAGE_SIZE;
use conduit_pci::bar::BarKind;
use conduit_pci::caps::msix_control::{ENABLE as MSIX_ENABLE, FUNCTION_MASK as MSIX_FUNCTION_MASK};
use conduit_pci::caps::{MsiCap, MsixCap};
use conduit_pci::enumerate::Function as HostFunction;
use conduit_pci::regs::{self, Command};
use conduit_pci::vconfig::{ConfigEvent, DevicePolicy, VirtualConfig};
use conduit_pci::{ConfigSpace, PciAddress, Width};
use conduit_vm::memory::GuestMemory;
use conduit_vm::partition::{Bdf, MAX_DEVICES, MAX_VDEVS, Spec, VirtualDevice};
use conduit_vm::pcibus::{self, ConfigRef, Mechanism1};
use conduit_vm::vdev::{Notify, NotifyEvent};

/// Region ID of the ECAM window in each vCPU's emulated-region map.
pub const REGION_ECAM: u16 = 0;
/// Region ID of the BAR window (trapped pages of BARs placed there).
pub const REGION_WINDOW: u16 = 1;

/// MSI-X entries a front end keeps (a device's table beyond this is not used; counted).
const TABLE_ENTRIES: usize = 128;
/// Functions on one guest bus.
pub const MAX_FUNCTIONS: usize = MAX_DEVICES + MAX_VDEVS;
/// Distinct pages of one function that trap because doorbells sit on them.
const MAX_DOORBELL_PAGES: usize = 32;
/// Distinct guest vectors a partition's doorbell events target.
const MAX_DOORBELL_EVENTS: usize = 32;
/// Host vectors waiting for their old CPU to drain (after a retarget or a free): room for every
/// entry of a table plus the MSI vector and some slack, so one control operation never has to
/// drop one; a retarget that would overflow it is refused instead (`RouteError::Busy`).
const MAX_RETIRED: usize = TABLE_ENTRIES + 16;
/// The context a freed host vector is parked on while its CPU drains: outside every pool, so a
/// late message is counted as stray and can never reach a context that was freed and reused.
const PARKED: ContextId = ContextId(u16::MAX);

type Msix<B> = MsixFrontEnd<'static, B, TABLE_ENTRIES, MAX_CONTEXTS>;
type Msi<B> = MsiFrontEnd<'static, B, MAX_CONTEXTS>;

/// Why devices could not be given to a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum DeviceError {
    /// The function is not in the inventory.
    NotPresent(Bdf),
    /// The IOMMU refused.
    Iommu(Bdf, AssignError),
    /// Its virtual configuration space could not be built.
    Config(Bdf),
    /// A BAR could not be mapped for the hypervisor's own accesses.
    BarMap(Bdf),
    /// More functions than a guest bus holds.
    TooMany,
    /// Doorbell `.0` of the description was refused with error code `.1`.
    Doorbell(usize, i64),
    /// The function did not come back from its reset.
    Reset(Bdf),
}

/// A host vector and interrupt-remapping entry behind one live vector.
#[derive(Clone, Copy, Debug)]
struct HostRoute {
    cpu: u8,
    vector: u8,
    irte: InterruptHandle,
}

/// Why the physical backend failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum RouteError {
    /// No free host vector on the target CPU.
    NoHostVector,
    /// The IOMMU refused the interrupt-remapping entry.
    Iommu(AssignError),
    /// The vector is beyond what the backend keeps (MSI multi-message needs a block of
    /// remapping entries, not offered yet).
    Unsupported,
    /// Too many old host vectors are still draining: the remapping entry stays on its CPU
    /// (the context already delivers to the new target, so nothing is lost).
    Busy,
}

/// Old host vectors of retargeted entries: still mapped to their context until the old CPU has
/// taken whatever was on its way, then freed (after the bus lock is released).
/// A retired host vector: (CPU, vector, the context it maps, drained once already). It is freed
/// after its CPU drained in two control operations: a grace period for a message the IOMMU
/// translated with the old entry just before it changed but delivered after the first drain
/// (seen under QEMU's threaded device emulation), so such a message still reaches its context.
type RetiredVector = (u8, u8, ContextId, bool);

type Retired = heapless::Vec<RetiredVector, MAX_RETIRED>;

fn apic_of(cpu: u8) -> Option<u32> {
    percpu::cpu(usize::from(cpu)).map(|c| c.apic_id.load(core::sync::atomic::Ordering::Relaxed))
}

/// Host side of one interrupt: host vector on the target's CPU plus a remapping entry with the
/// device's source ID. Shared by the MSI and MSI-X backends.
fn route_to(
    dev: PciAddress,
    ctx: ContextId,
    target: Target,
) -> Result<(HostRoute, conduit_iommu::MsiMessage), RouteError> {
    let table = HOST_VECTORS.get(usize::from(target.slot)).ok_or(RouteError::NoHostVector)?;
    let apic = apic_of(target.slot).ok_or(RouteError::NoHostVector)?;
    let vector = table.allocate(ctx).ok_or(RouteError::NoHostVector)?;
    match iommu::alloc_interrupt(dev, InterruptTarget { apic_id: apic, vector }) {
        Ok((irte, msg)) => Ok((HostRoute { cpu: target.slot, vector, irte }, msg)),
        Err(e) => {
            table.free(vector, ctx);
            Err(RouteError::Iommu(e))
        }
    }
}

/// Moves a live route to `new`'s CPU: a new host vector there, the remapping entry rewritten in
/// place (the device is not touched); the old vector is retired, not freed.
fn reroute(
    dev: PciAddress,
    route: &mut HostRoute,
    ctx: ContextId,
    new: Target,
    retired: &mut Retired,
) -> Result<(), RouteError> {
    if new.slot == route.cpu {
        return Ok(());
    }
    if retired.is_full() {
        return Err(RouteError::Busy);
    }
    let table = HOST_VECTORS.get(usize::from(new.slot)).ok_or(RouteError::NoHostVector)?;
    let apic = apic_of(new.slot).ok_or(RouteError::NoHostVector)?;
    let vector = table.allocate(ctx).ok_or(RouteError::NoHostVector)?;
    if let Err(e) = iommu::retarget_interrupt(dev, route.irte, InterruptTarget { apic_id: apic, vector }) {
        defmt::error!("vmm: retargeting an interrupt of {}: {}", dev, e);
        if matches!(e, AssignError::Iommu(conduit_iommu::IommuError::Timeout(_))) {
            // The entry was rewritten but its invalidation did not complete: the device may
            // use either vector. The new one becomes the route's; the old one stays mapped to
            // this context until its CPU drained (retired), so both reach the context.
            let _ = retired.push((route.cpu, route.vector, ctx, false));
            route.cpu = new.slot;
            route.vector = vector;
        } else {
            // Refused before the entry was written: it still names the old vector.
            table.free(vector, ctx);
        }
        return Err(RouteError::Iommu(e));
    }
    // Cannot fail: checked for room above, and nothing else pushed since.
    let _ = retired.push((route.cpu, route.vector, ctx, false));
    route.cpu = new.slot;
    route.vector = vector;
    Ok(())
}

/// Frees a route: the remapping entry first (the device can no longer reach the vector), then
/// the host vector is parked (a late message is stray, never another context's) and retired,
/// to be freed once its CPU drained.
fn unroute(dev: PciAddress, route: HostRoute, ctx: ContextId, retired: &mut Retired) {
    if let Err(e) = iommu::free_interrupt(dev, route.irte) {
        defmt::error!("vmm: freeing the remapping entry of {}: {}", dev, e);
    }
    // Older vectors of this context still waiting to drain are parked too: the context is
    // about to be freed and may be reused.
    for item in retired.iter_mut().filter(|i| i.2 == ctx) {
        if let Some(t) = HOST_VECTORS.get(usize::from(item.0))
            && t.replace(item.1, ctx, PARKED)
        {
            item.2 = PARKED;
        }
    }
    if let Some(t) = HOST_VECTORS.get(usize::from(route.cpu))
        && t.replace(route.vector, ctx, PARKED)
        && retired.push((route.cpu, route.vector, PARKED, false)).is_err()
    {
        // No room to drain it: parked, so freeing it now can at worst turn a late message into
        // a stray on whoever gets the vector next on that CPU.
        t.free(route.vector, PARKED);
    }
}

/// The physical MSI-X backend: the real table is Conduit's; a live entry gets a remapping
/// entry whose remappable-format address/data go into the real table entry, then unmasked.
#[derive(Debug)]
pub struct PhysicalMsix {
    dev: PciAddress,
    table: Option<MmioWindow>,
    pba: Option<MmioWindow>,
    routes: [Option<HostRoute>; TABLE_ENTRIES],
    retired: Retired,
}

impl PhysicalMsix {
    fn entry_offset(index: u16) -> u64 {
        u64::from(index) * 16
    }

    /// Masks every real entry and clears its message (before MSI-X is enabled in hardware).
    fn mask_all(&self, size: u16) {
        if let Some(t) = &self.table {
            for i in 0..size {
                let o = Self::entry_offset(i);
                t.write32(o + 12, 1);
                t.write32(o, 0);
                t.write32(o + 4, 0);
                t.write32(o + 8, 0);
            }
        }
    }
}

impl Backend for PhysicalMsix {
    type Error = RouteError;

    fn activate(&mut self, index: u16, ctx: ContextId, target: Target) -> Result<(), RouteError> {
        let slot = self.routes.get_mut(usize::from(index)).ok_or(RouteError::Unsupported)?;
        let (route, msg) = route_to(self.dev, ctx, target)?;
        if let Some(t) = &self.table {
            let o = Self::entry_offset(index);
            t.write32(o + 12, 1);
            t.write32(o, msg.address as u32);
            t.write32(o + 4, (msg.address >> 32) as u32);
            t.write32(o + 8, msg.data);
            t.write32(o + 12, 0);
        }
        *slot = Some(route);
        Ok(())
    }

    fn retarget(&mut self, index: u16, ctx: ContextId, _old: Target, new: Target) -> Result<(), RouteError> {
        let dev = self.dev;
        let route = self.routes.get_mut(usize::from(index)).and_then(Option::as_mut).ok_or(RouteError::Unsupported)?;
        reroute(dev, route, ctx, new, &mut self.retired)
    }

    fn deactivate(&mut self, index: u16, ctx: ContextId) {
        if let Some(t) = &self.table {
            t.write32(Self::entry_offset(index) + 12, 1);
        }
        if let Some(route) = self.routes.get_mut(usize::from(index)).and_then(Option::take) {
            unroute(self.dev, route, ctx, &mut self.retired);
        }
    }

    fn hardware_pending(&self, index: u16) -> bool {
        self.pba.as_ref().is_some_and(|p| p.read64(u64::from(index / 64) * 8) & (1 << (index % 64)) != 0)
    }
}

/// The physical MSI backend (one message: a block of remapping entries for multi-message MSI
/// is not offered, and `IRQ_INFO` says 1).
#[derive(Debug)]
pub struct PhysicalMsi {
    dev: PciAddress,
    cap: MsiCap,
    route: Option<HostRoute>,
    retired: Retired,
}

impl PhysicalMsi {
    fn set_enable(&self, on: bool) {
        let cfg = crate::pci::config();
        let off = self.cap.control();
        let control = cfg.read16(self.dev, off) & !conduit_pci::caps::msi_control::MME_MASK;
        let control = if on {
            control | conduit_pci::caps::msi_control::ENABLE
        } else {
            control & !conduit_pci::caps::msi_control::ENABLE
        };
        cfg.write16(self.dev, off, control);
    }
}

impl Backend for PhysicalMsi {
    type Error = RouteError;

    fn activate(&mut self, index: u16, ctx: ContextId, target: Target) -> Result<(), RouteError> {
        if index != 0 {
            return Err(RouteError::Unsupported);
        }
        let (route, msg) = route_to(self.dev, ctx, target)?;
        let cfg = crate::pci::config();
        self.set_enable(false);
        cfg.write32(self.dev, self.cap.address_lo(), msg.address as u32);
        if let Some(hi) = self.cap.address_hi() {
            cfg.write32(self.dev, hi, (msg.address >> 32) as u32);
        }
        cfg.write16(self.dev, self.cap.data(), msg.data as u16);
        self.set_enable(true);
        self.route = Some(route);
        Ok(())
    }

    fn retarget(&mut self, index: u16, ctx: ContextId, _old: Target, new: Target) -> Result<(), RouteError> {
        let dev = self.dev;
        match (index, self.route.as_mut()) {
            (0, Some(route)) => reroute(dev, route, ctx, new, &mut self.retired),
            _ => Err(RouteError::Unsupported),
        }
    }

    fn deactivate(&mut self, index: u16, ctx: ContextId) {
        if index != 0 {
            return;
        }
        self.set_enable(false);
        if let Some(route) = self.route.take() {
            unroute(self.dev, route, ctx, &mut self.retired);
        }
    }
}

/// A host BAR of an assigned function.
#[derive(Clone, Copy, Debug)]
struct HostBar {
    index: u8,
    base: u64,
    size: u64,
    memory: bool,
    /// The hypervisor's own uncached mapping (forwarded accesses), for memory BARs.
    window: Option<MmioWindow>,
}

/// A guest-physical range mapped straight to device memory.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    gpa: u64,
    len: u64,
}

/// A physical function given to the guest.
#[derive(Debug)]
struct Physical {
    host: PciAddress,
    bdf: Bdf,
    vconfig: VirtualConfig,
    bars: heapless::Vec<HostBar, 6>,
    msix_cap: Option<MsixCap>,
    msix: Option<Msix<PhysicalMsix>>,
    msi: Option<Msi<PhysicalMsi>>,
    mappings: heapless::Vec<Mapping, { 16 + 2 * MAX_DOORBELL_PAGES }>,
    decoding: bool,
    /// Software-signalled ERR and REQ indices: their context, once bound.
    err: Option<ContextId>,
    req: Option<ContextId>,
    /// Its index on the bus (device number - 1): its doorbell device id and directory slot.
    slot: usize,
    /// Pages that trap because doorbells sit on them.
    doorbell_pages: heapless::Vec<DoorbellPage, MAX_DOORBELL_PAGES>,
    /// The guest asked for a Function Level Reset that `finish_resets` has yet to do.
    reset_requested: bool,
}

/// A page of a BAR holding doorbells (trapped, so their writes reach the fast path).
#[derive(Clone, Copy, Debug)]
struct DoorbellPage {
    bar: u8,
    start: u64,
    doorbells: u32,
}

/// The emulated `notify` function.
#[derive(Debug)]
struct NotifyFn {
    model: Notify,
    msix: Msix<Software>,
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Func {
    Physical(Physical),
    Notify(NotifyFn),
}

/// One partition's PCI bus. Lives in a static and is changed in place: with its functions'
/// virtual configuration spaces and MSI-X tables it is far too large to move through a stack.
#[derive(Debug)]
pub struct Bus {
    /// The partition has a bus now.
    active: bool,
    partition: usize,
    slots: VcpuSlots,
    mech1: Mechanism1,
    functions: heapless::Vec<Func, MAX_FUNCTIONS>,
    domains: heapless::Vec<Domain, 4>,
    /// Guest accesses nothing answered (configuration of empty slots excluded).
    unclaimed: u64,
    /// Software contexts doorbell events raise, one per (vCPU, vector); freed at teardown
    /// only, so a fast path holding an id never signals a reused context.
    events: heapless::Vec<(Target, ContextId), MAX_DOORBELL_EVENTS>,
    /// A device or domain of the partition that last had this bus could not be given back
    /// (sticky until the bus is set up again: every later detach reports it).
    dirty: bool,
}

impl Bus {
    const fn empty() -> Self {
        Self {
            active: false,
            partition: 0,
            slots: [None; conduit_irq::frontend::MAX_VCPUS],
            mech1: Mechanism1::new(),
            functions: heapless::Vec::new(),
            domains: heapless::Vec::new(),
            unclaimed: 0,
            events: heapless::Vec::new(),
            dirty: false,
        }
    }
}

static BUSES: [IrqMutex<Bus>; MAX_PARTITIONS] = [const { IrqMutex::new(Bus::empty()) }; MAX_PARTITIONS];

/// The bus of a partition that has one.
fn active(bus: &mut Bus) -> Option<&mut Bus> {
    bus.active.then_some(bus)
}

fn quiesce(dev: PciAddress, f: &HostFunction) {
    let cfg = crate::pci::config();
    let cmd = cfg.read16(dev, regs::COMMAND);
    cfg.write16(dev, regs::COMMAND, cmd & !(Command::BUS_MASTER | Command::MEMORY | Command::IO).bits());
    if let Some(m) = f.msi {
        let c = cfg.read16(dev, m.control());
        cfg.write16(dev, m.control(), c & !conduit_pci::caps::msi_control::ENABLE);
    }
    if let Some(x) = f.msix {
        let c = cfg.read16(dev, x.offset + 2);
        cfg.write16(dev, x.offset + 2, (c & !MSIX_ENABLE) | MSIX_FUNCTION_MASK);
    }
}

/// The virtual configuration space of a function being given to a guest (or given back to it
/// after a reset), and the hardware command word that goes with it: memory decode and I/O decode
/// are the guest's only virtually — in hardware memory decode stays on while the function is
/// assigned (the hypervisor owns the MSI-X table and PBA behind it and must reach them whatever
/// the guest's command register says; the guest's bit decides only whether its BARs are
/// mapped), I/O decode stays off (I/O BARs are not passed through). Bus mastering is the
/// guest's, and off until it sets it.
fn assigned_config(f: &HostFunction) -> Result<VirtualConfig, conduit_pci::vconfig::VConfigError> {
    let cfg = crate::pci::config();
    let policy = DevicePolicy { command_passthrough: Command::BUS_MASTER, ..DevicePolicy::default() };
    let vconfig = VirtualConfig::new(cfg, f, policy)?;
    let command = cfg.read16(f.addr, regs::COMMAND);
    let command = (command | Command::MEMORY.bits()) & !(Command::IO | Command::BUS_MASTER).bits();
    cfg.write16(f.addr, regs::COMMAND, command);
    Ok(vconfig)
}

/// How a function was reset around its assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reset {
    /// Function Level Reset done; BARs and command restored.
    Flr,
    /// The function offers no reset Conduit drives (no FLR): its internal state survives.
    Unsupported,
}

/// Resets a quiesced function by Function Level Reset (PCIe Device Control bit 15) when it
/// advertises one: waits (bounded) for its Transactions Pending to clear, resets, waits the
/// 100 ms the specification gives the function, waits (bounded) until it answers
/// configuration reads again, and restores the BAR registers and command word it had. So no
/// queue, buffer or register state of one partition's use reaches the next owner.
fn reset_function(dev: PciAddress, f: &HostFunction) -> Result<Reset, &'static str> {
    use conduit_pci::caps::pcie_regs;
    let Some(pcie) = f.pcie.filter(|p| p.flr) else { return Ok(Reset::Unsupported) };
    let cfg = crate::pci::config();
    let mut bars = [0u32; 6];
    for (i, b) in bars.iter_mut().enumerate() {
        *b = cfg.read32(dev, regs::BAR0 + 4 * i as u16);
    }
    let command = cfg.read16(dev, regs::COMMAND);
    // What else the reset clears that the platform set: cache line size, the ROM BAR, and the
    // PCI Express device controls (Max Payload Size must keep matching the rest of the
    // hierarchy, or completions the device then refuses turn into fatal errors).
    let cache_line = cfg.read8(dev, regs::CACHE_LINE_SIZE);
    let rom = cfg.read32(dev, regs::ROM_ADDRESS);
    let devctl = cfg.read16(dev, pcie.offset + pcie_regs::DEVICE_CONTROL) & !pcie_regs::DEVCTL_FLR;
    let devctl2 = (pcie.version >= 2).then(|| cfg.read16(dev, pcie.offset + pcie_regs::DEVICE_CONTROL_2));
    let status = pcie.offset + pcie_regs::DEVICE_STATUS;
    if !super::wait_for(100_000, || cfg.read16(dev, status) & pcie_regs::DEVSTA_TRANSACTIONS_PENDING == 0) {
        defmt::warn!("vmm: {}: transactions still pending after 100 ms; resetting anyway", dev);
    }
    let control = pcie.offset + pcie_regs::DEVICE_CONTROL;
    let c = cfg.read16(dev, control);
    cfg.write16(dev, control, c | pcie_regs::DEVCTL_FLR);
    crate::arch::time::delay_us(100_000);
    // All ones: nothing answers; 0x0001: Configuration Request Retry Status (not ready yet).
    if !super::wait_for(1_000_000, || !matches!(cfg.read16(dev, regs::VENDOR_ID), 0xffff | 0x0001)) {
        return Err("the function did not answer within 1 s of its reset");
    }
    for (i, b) in bars.iter().enumerate() {
        cfg.write32(dev, regs::BAR0 + 4 * i as u16, *b);
    }
    cfg.write(dev, regs::CACHE_LINE_SIZE, Width::Byte, u32::from(cache_line));
    cfg.write32(dev, regs::ROM_ADDRESS, rom);
    cfg.write16(dev, pcie.offset + pcie_regs::DEVICE_CONTROL, devctl);
    if let Some(d) = devctl2 {
        cfg.write16(dev, pcie.offset + pcie_regs::DEVICE_CONTROL_2, d);
    }
    cfg.write16(dev, regs::COMMAND, command);
    Ok(Reset::Flr)
}

/// `reset_function`, reported: `when` says around what.
fn reset_reported(dev: PciAddress, f: &HostFunction, when: &str) -> bool {
    match reset_function(dev, f) {
        Ok(Reset::Flr) => {
            println!("vmm: {} reset (FLR) {}", dev, when);
            true
        }
        Ok(Reset::Unsupported) => {
            println!("vmm: {} has no FLR: its internal state is not reset {}", dev, when);
            true
        }
        Err(e) => {
            println!("vmm: {} reset failed {}: {}", dev, when, e);
            false
        }
    }
}

fn host_function(bdf: Bdf) -> Option<HostFunction> {
    crate::pci::with_inventory(|inv| {
        inv.functions
            .iter()
            .find(|f| {
                f.addr.segment == bdf.segment
                    && f.addr.bus == bdf.bus
                    && f.addr.device == bdf.device
                    && f.addr.function == bdf.function
            })
            .cloned()
    })
}

fn vcpu_slots(spec: &Spec) -> VcpuSlots {
    let mut s: VcpuSlots = [None; conduit_irq::frontend::MAX_VCPUS];
    for (d, &cpu) in s.iter_mut().zip(&spec.cpus) {
        *d = Some(cpu);
    }
    s
}

/// Builds partition `index`'s bus: quiesces and assigns each device (IOMMU domain holding the
/// guest's RAM at its guest-physical addresses), builds its virtual configuration space and
/// interrupt front ends; adds the emulated functions. On an error everything done is undone.
pub fn attach(index: usize, spec: &Spec, memory: &GuestMemory) -> Result<bool, DeviceError> {
    if spec.devices.is_empty() && spec.vdevs.is_empty() {
        return Ok(false);
    }
    let Some(cell) = BUSES.get(index) else { return Err(DeviceError::TooMany) };
    {
        let mut bus = cell.lock();
        bus.functions.clear();
        bus.domains.clear();
        bus.partition = index;
        bus.slots = vcpu_slots(spec);
        bus.mech1 = Mechanism1::new();
        bus.unclaimed = 0;
        bus.events.clear();
        bus.dirty = false;
        bus.active = true;
    }
    let result = (|| {
        for &bdf in &spec.devices {
            attach_physical(cell, index, bdf, memory)?;
        }
        for &v in &spec.vdevs {
            match v {
                VirtualDevice::Notify => {
                    let mut guard = cell.lock();
                    let bus = active(&mut guard).ok_or(DeviceError::TooMany)?;
                    let slots = bus.slots;
                    bus.functions
                        .push(Func::Notify(NotifyFn {
                            model: Notify::new(),
                            msix: MsixFrontEnd::new(&POOL, Software, abi_vdev::NOTIFY_VECTORS, slots),
                        }))
                        .map_err(|_| DeviceError::TooMany)?;
                }
            }
        }
        // The description's doorbells: each forwards the value written to its own register.
        for (i, d) in spec.doorbells.iter().enumerate() {
            let position =
                spec.devices.iter().position(|&b| b == d.device).ok_or(DeviceError::Doorbell(i, error::ENODEV))?;
            let mut request = abi_doorbell::Request::forwarding(d.bar, d.offset, d.width);
            if let Some(v) = d.matches {
                request.flags |= abi_doorbell::MATCH_VALUE;
                request.match_value = v;
            }
            let mut guard = cell.lock();
            let bus = active(&mut guard).ok_or(DeviceError::TooMany)?;
            let code = bus.doorbell_add(position, &request);
            if code != 0 {
                return Err(DeviceError::Doorbell(i, code));
            }
        }
        Ok(true)
    })();
    if result.is_err() && !detach(index) {
        defmt::error!("vmm: partition {=usize}: devices not fully given back after a failed attach", index);
    }
    result
}

fn attach_physical(cell: &IrqMutex<Bus>, index: usize, bdf: Bdf, memory: &GuestMemory) -> Result<(), DeviceError> {
    let f = host_function(bdf).ok_or(DeviceError::NotPresent(bdf))?;
    let dev = f.addr;
    if UNUSABLE.lock().contains(&bdf) {
        return Err(DeviceError::Reset(bdf));
    }
    quiesce(dev, &f);
    if !reset_reported(dev, &f, "before its assignment") {
        unusable(bdf);
        return Err(DeviceError::Reset(bdf));
    }
    // DMA: one domain per IOMMU unit, holding the guest's RAM at its guest-physical addresses.
    let unit = iommu::unit_for(dev).map_err(|e| DeviceError::Iommu(bdf, e))?;
    let existing = {
        let mut guard = cell.lock();
        active(&mut guard).and_then(|b| b.domains.iter().copied().find(|d| d.unit == unit))
    };
    let domain = match existing {
        Some(d) => d,
        None => {
            let d = iommu::create_domain_for(dev).map_err(|e| DeviceError::Iommu(bdf, e))?;
            for c in memory.chunks() {
                if let Err(e) = iommu::map(d, c.gpa, c.hpa, c.len, DmaAccess::ReadWrite) {
                    let _ = iommu::destroy_domain(d);
                    return Err(DeviceError::Iommu(bdf, e));
                }
            }
            let mut guard = cell.lock();
            let bus = active(&mut guard).ok_or(DeviceError::TooMany)?;
            if bus.domains.push(d).is_err() {
                let _ = iommu::destroy_domain(d);
                return Err(DeviceError::TooMany);
            }
            d
        }
    };
    iommu::assign(domain, dev, Owner::Guest(index as u16)).map_err(|e| DeviceError::Iommu(bdf, e))?;
    // From here on every failure gives the device back to the IOMMU: the bus does not hold it
    // yet, so `detach` would not find it.
    let result = add_function(cell, index, bdf, &f, domain);
    if result.is_err()
        && let Err(e) = iommu::unassign(dev)
    {
        defmt::error!("vmm: unassigning {} after a failed attach: {}", dev, e);
        // Still in the partition's domain, which maps its RAM: teardown must keep that RAM.
        cell.lock().dirty = true;
    }
    result
}

/// The rest of `attach_physical` once the device is in its domain: virtual config, the
/// hypervisor's BAR windows, the interrupt front ends, the bus entry.
fn add_function(
    cell: &IrqMutex<Bus>,
    index: usize,
    bdf: Bdf,
    f: &HostFunction,
    domain: iommu::Domain,
) -> Result<(), DeviceError> {
    let dev = f.addr;
    let vconfig = assigned_config(f).map_err(|_| DeviceError::Config(bdf))?;
    let mut bars: heapless::Vec<HostBar, 6> = heapless::Vec::new();
    for b in f.bars.iter() {
        let memory = !matches!(b.kind, BarKind::Io);
        let window = if memory && b.size > 0 {
            Some(MmioWindow::map(b.address, b.size).map_err(|_| DeviceError::BarMap(bdf))?)
        } else {
            None
        };
        let _ = bars.push(HostBar { index: b.index, base: b.address, size: b.size, memory, window });
    }
    // The hypervisor's own view of the real MSI-X table and PBA.
    let window_at = |bir: u8, offset: u32, len: u64| {
        let b = bars.iter().find(|b| b.index == bir && b.window.is_some())?;
        MmioWindow::map(b.base + u64::from(offset), len).ok()
    };
    let mut guard = cell.lock();
    let bus = active(&mut guard).ok_or(DeviceError::TooMany)?;
    let slots = bus.slots;
    let slot = bus.functions.len();
    let msix = f.msix.map(|x| {
        let entries = x.table_size.min(TABLE_ENTRIES as u16);
        let backend = PhysicalMsix {
            dev,
            table: window_at(x.table_bir, x.table_offset, u64::from(x.table_size) * 16),
            pba: window_at(x.pba_bir, x.pba_offset, u64::from(x.table_size).div_ceil(64) * 8),
            routes: [None; TABLE_ENTRIES],
            retired: Retired::new(),
        };
        MsixFrontEnd::new(&POOL, backend, entries, slots)
    });
    let msi = f.msi.map(|m| {
        let backend = PhysicalMsi { dev, cap: m, route: None, retired: Retired::new() };
        MsiFrontEnd::new(&POOL, backend, 0, m.per_vector_mask, slots)
    });
    defmt::info!(
        "vmm: partition {=usize}: {} assigned as 00:{=usize:02x}.0 (domain on unit {=u8}), {=usize} BARs, MSI {=bool}, MSI-X {=bool}",
        index,
        dev,
        bus.functions.len() + 1,
        domain.unit,
        bars.len(),
        f.msi.is_some(),
        f.msix.is_some()
    );
    for b in &bars {
        doorbells::publish_host(index, slot, b.index, b.window);
    }
    bus.functions
        .push(Func::Physical(Physical {
            host: dev,
            bdf,
            vconfig,
            bars,
            msix_cap: f.msix,
            msix,
            msi,
            mappings: heapless::Vec::new(),
            decoding: false,
            err: None,
            req: None,
            slot,
            doorbell_pages: heapless::Vec::new(),
            reset_requested: false,
        }))
        .map_err(|_| DeviceError::TooMany)
}

/// Takes partition `index`'s devices back (its vCPUs have stopped): every interrupt vector
/// freed, every device quiesced and unassigned, the IOMMU domains destroyed. Returns false if
/// a device could not be unassigned or a domain destroyed: the partition's RAM may still be
/// reachable by DMA and must not be given back.
#[must_use]
pub fn detach(index: usize) -> bool {
    let mut clean = true;
    let Some(cell) = BUSES.get(index) else { return clean };
    // Every function's retired vectors, each list at most MAX_RETIRED long.
    let mut drain: heapless::Vec<RetiredVector, { MAX_RETIRED * MAX_FUNCTIONS }> = heapless::Vec::new();
    // Functions to reset once the bus lock is released (the reset waits 100 ms or more).
    let mut to_reset: heapless::Vec<(PciAddress, Bdf), MAX_FUNCTIONS> = heapless::Vec::new();
    {
        let mut guard = cell.lock();
        // An earlier detach of this bus (a failed attach's) that could not give everything
        // back is still reported: the partition's RAM must not be freed on its word.
        let Some(bus) = active(&mut guard) else { return !guard.dirty };
        for f in bus.functions.iter_mut() {
            if let Func::Physical(p) = f {
                if let Some(m) = p.msix.as_mut() {
                    m.set_control(MsixControl { enabled: false, function_masked: true }, &VmmSink::here());
                }
                if let Some(m) = p.msi.as_mut() {
                    m.set_control(MsiControl { enabled: false, vectors_log2: 0 }, &VmmSink::here());
                }
                for c in [p.err.take(), p.req.take()].into_iter().flatten() {
                    POOL.free(c);
                }
                // Every vCPU has stopped: no fast path is looking at these any more.
                if let Some(device) = doorbells::device_id(index, p.slot) {
                    doorbells::TABLE.remove_device(device);
                    doorbells::changed();
                }
                doorbells::clear(index, p.slot);
                if let Some(f) = host_function(p.bdf) {
                    quiesce(p.host, &f);
                    let _ = to_reset.push((p.host, p.bdf));
                }
                if let Err(e) = iommu::unassign(p.host) {
                    defmt::error!("vmm: unassigning {}: {}", p.host, e);
                    clean = false;
                }
            }
        }
        for (_, c) in bus.events.iter() {
            POOL.free(*c);
        }
        doorbells::reset(index);
        bus.events.clear();
        take_retired(bus, &mut drain);
        for d in bus.domains.iter().copied() {
            if let Err(e) = iommu::destroy_domain(d) {
                defmt::error!("vmm: destroying a domain: {}", e);
                clean = false;
            }
        }
        // Dropped in place (front ends free whatever is left).
        bus.functions.clear();
        bus.domains.clear();
        bus.active = false;
        bus.dirty |= !clean;
        clean = !bus.dirty;
    }
    free_retired(&mut drain);
    // Unassigned already (their DMA is blocked): a function that does not come back from its
    // reset is kept from every later assignment instead.
    for (dev, bdf) in to_reset {
        if let Some(f) = host_function(bdf)
            && !reset_reported(dev, &f, "after its partition")
        {
            unusable(bdf);
        }
    }
    clean
}

/// Functions that did not come back from a reset: never assigned again.
static UNUSABLE: IrqMutex<heapless::Vec<Bdf, 8>> = IrqMutex::new(heapless::Vec::new());

fn unusable(bdf: Bdf) {
    let mut u = UNUSABLE.lock();
    if !u.contains(&bdf) && u.push(bdf).is_err() {
        defmt::error!("vmm: list of unusable functions full; {} stays assignable", bdf);
    }
}

/// Frees retired host vectors once their CPU drained: each CPU is asked once. A vector whose
/// CPU did not answer stays allocated, parked (leaked, logged) — never freed while something
/// may still be on its way to it.
fn free_retired<const N: usize>(list: &mut heapless::Vec<RetiredVector, N>) {
    let mut drained = 0u64; // bit per CPU asked and answered
    let mut failed = 0u64; // bit per CPU asked that did not answer
    for &(cpu, vector, ctx, _) in list.iter() {
        let bit = 1u64 << (cpu % 64);
        if drained & bit == 0 && failed & bit == 0 {
            if drain_vectors_of(usize::from(cpu)) {
                drained |= bit;
            } else {
                failed |= bit;
            }
        }
        settle_retired(cpu, vector, ctx, drained & bit != 0);
    }
    list.clear();
}

/// The end of a retired vector: freed if its CPU drained (it maps its context still, or
/// `PARKED` if that context was freed), else parked and left allocated (leaked, logged) —
/// never freed while something may still be on its way to it.
fn settle_retired(cpu: u8, vector: u8, ctx: ContextId, drained: bool) {
    let Some(t) = HOST_VECTORS.get(usize::from(cpu)) else { return };
    if drained {
        let _ = t.free(vector, ctx) || t.free(vector, PARKED);
    } else {
        if ctx != PARKED {
            let _ = t.replace(vector, ctx, PARKED);
        }
        LEAKED_VECTORS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        defmt::warn!("vmm: cpu {=u8} did not drain; host vector {=u8:#x} stays allocated", cpu, vector);
    }
}

/// Host vectors left allocated because their CPU never answered a drain.
static LEAKED_VECTORS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

impl Physical {
    fn config_read(&mut self, offset: u16, width: Width) -> u32 {
        self.vconfig.read(crate::pci::config(), offset, width)
    }

    /// Memory BARs placed inside the window, as (slot, guest base, host BAR).
    fn placed(&self) -> heapless::Vec<(u64, HostBar), 6> {
        let mut v = heapless::Vec::new();
        for b in self.bars.iter().filter(|b| b.memory && b.size > 0) {
            if let Some((gpa, size, _)) = self.vconfig.bar(b.index) {
                let in_window = gpa >= layout::PCI_WINDOW
                    && gpa.checked_add(size).is_some_and(|e| e <= layout::PCI_WINDOW + layout::PCI_WINDOW_BYTES);
                if in_window && gpa.is_multiple_of(size.max(1)) {
                    let _ = v.push((gpa, *b));
                }
            }
        }
        v
    }

    /// The byte ranges of BAR `index` that must trap: MSI-X table and PBA (page-rounded) and
    /// the pages holding doorbells.
    fn trapped_pages(&self, index: u8) -> heapless::Vec<(u64, u64), { 2 + MAX_DOORBELL_PAGES }> {
        let mut v: heapless::Vec<(u64, u64), { 2 + MAX_DOORBELL_PAGES }> =
            self.msix_pages(index).into_iter().flatten().collect();
        for d in self.doorbell_pages.iter().filter(|d| d.bar == index) {
            let _ = v.push((d.start, d.start + PAGE_SIZE));
        }
        v
    }

    /// The page-rounded byte ranges of BAR `index` holding the MSI-X table and the PBA.
    fn msix_pages(&self, index: u8) -> [Option<(u64, u64)>; 2] {
        let Some(x) = self.msix_cap else { return [None, None] };
        let page = |off: u32, len: u64| {
            let start = u64::from(off) & !(PAGE_SIZE - 1);
            (start, (u64::from(off) + len).next_multiple_of(PAGE_SIZE))
        };
        [
            (x.table_bir == index).then(|| page(x.table_offset, u64::from(x.table_size) * 16)),
            (x.pba_bir == index).then(|| page(x.pba_offset, u64::from(x.table_size).div_ceil(64) * 8)),
        ]
    }

    /// Maps every placed memory BAR into the guest: page by page, skipping trapped pages;
    /// BARs smaller than a page are never mapped (another device's registers could share the
    /// page) — their accesses trap and are forwarded.
    fn map_bars(&mut self, partition: usize) {
        // The doorbell fast path finds the BARs through the directory, mapped or not.
        doorbells::clear_guest(partition, self.slot);
        for (gpa, b) in self.placed() {
            doorbells::publish_guest(partition, self.slot, b.index, Some((gpa, b.size)));
        }
        for (gpa, b) in self.placed() {
            if b.size < PAGE_SIZE {
                continue;
            }
            let trapped = self.trapped_pages(b.index);
            let mut off = 0;
            while off < b.size {
                let is_trapped = trapped.iter().any(|&(s, e)| off >= s && off < e);
                if is_trapped {
                    off += PAGE_SIZE;
                    continue;
                }
                let mut end = off + PAGE_SIZE;
                while end < b.size && !trapped.iter().any(|&(s, e)| end >= s && end < e) {
                    end += PAGE_SIZE;
                }
                match build::map_device(partition, gpa + off, b.base + off, end - off) {
                    Ok(()) => {
                        let _ = self.mappings.push(Mapping { gpa: gpa + off, len: end - off });
                    }
                    Err(e) => defmt::error!("vmm: mapping BAR{=u8} of {}: {}", b.index, self.host, e),
                }
                off = end;
            }
        }
    }

    fn unmap_bars(&mut self, partition: usize) {
        doorbells::clear_guest(partition, self.slot);
        for m in self.mappings.iter() {
            if let Err(e) = build::unmap_device(partition, m.gpa, m.len) {
                defmt::error!("vmm: unmapping {=u64:#x}: {}", m.gpa, e);
            }
        }
        self.mappings.clear();
    }

    fn config_write(&mut self, partition: usize, offset: u16, width: Width, value: u32) {
        let mut events: heapless::Vec<ConfigEvent, 8> = heapless::Vec::new();
        self.vconfig.write(crate::pci::config(), offset, width, value, &mut events);
        for e in events {
            match e {
                ConfigEvent::Command { memory, .. } => {
                    if memory != self.decoding {
                        if memory {
                            self.map_bars(partition);
                        } else {
                            self.unmap_bars(partition);
                        }
                        self.decoding = memory;
                    }
                }
                ConfigEvent::Bar { .. } => {
                    if self.decoding {
                        self.unmap_bars(partition);
                        self.map_bars(partition);
                    }
                }
                ConfigEvent::MsiControl { enabled, vectors_log2 } => {
                    if let Some(m) = self.msi.as_mut() {
                        m.set_control(MsiControl { enabled, vectors_log2 }, &VmmSink::here());
                    }
                }
                ConfigEvent::MsiAddress(a) => {
                    if let Some(m) = self.msi.as_mut() {
                        m.set_address(a, &VmmSink::here());
                    }
                }
                ConfigEvent::MsiData(d) => {
                    if let Some(m) = self.msi.as_mut() {
                        m.set_data(d, &VmmSink::here());
                    }
                }
                ConfigEvent::MsiMask(bits) => {
                    if let Some(m) = self.msi.as_mut() {
                        m.set_mask(bits, &VmmSink::here());
                    }
                }
                ConfigEvent::MsixControl { enabled, function_masked } => self.msix_control(enabled, function_masked),
                ConfigEvent::FunctionLevelReset => self.guest_reset(partition),
                ConfigEvent::Rom { .. } | ConfigEvent::PowerState(_) => {}
            }
        }
    }

    /// The guest asked for a Function Level Reset: its interrupts are freed, its BARs unmapped,
    /// the function quiesced and reset in hardware (FLR if it has one), and the guest gets the
    /// function back as at assignment — a fresh virtual configuration space (BARs unplaced,
    /// MSI/MSI-X off, bus master off). Registered doorbells stay (VFIO keeps ioeventfds across a
    /// reset); they ring again once the guest places the BAR.
    ///
    /// Here, under the bus lock, the function is taken from the guest; the reset itself (100 ms
    /// or more) runs after the lock is released (`finish_resets`), before the vCPU that asked
    /// returns to the guest.
    fn guest_reset(&mut self, partition: usize) {
        if let Some(m) = self.msix.as_mut() {
            m.reset();
        }
        if let Some(m) = self.msi.as_mut() {
            m.reset();
        }
        self.unmap_bars(partition);
        self.decoding = false;
        if let Some(f) = host_function(self.bdf) {
            quiesce(self.host, &f);
        }
        self.reset_requested = true;
        if let Some(flag) = RESETS_PENDING.get(partition) {
            flag.store(true, core::sync::atomic::Ordering::Release);
        }
    }

    /// The guest changed MSI-X enable or the function mask. Hardware MSI-X is on exactly while
    /// the guest has it on (with every real entry masked until the front end makes it live);
    /// the function mask is the front end's alone (the hardware one stays clear).
    fn msix_control(&mut self, enabled: bool, function_masked: bool) {
        let (Some(cap), Some(front)) = (self.msix_cap, self.msix.as_mut()) else { return };
        let cfg = crate::pci::config();
        let off = cap.offset + 2;
        let hw_on = cfg.read16(self.host, off) & MSIX_ENABLE != 0;
        if enabled && !hw_on {
            front.backend().mask_all(cap.table_size.min(TABLE_ENTRIES as u16));
            let c = cfg.read16(self.host, off);
            cfg.write16(self.host, off, (c | MSIX_ENABLE) & !MSIX_FUNCTION_MASK);
        }
        front.set_control(MsixControl { enabled, function_masked }, &VmmSink::here());
        if !enabled && hw_on {
            let c = cfg.read16(self.host, off);
            cfg.write16(self.host, off, c & !MSIX_ENABLE);
        }
    }

    /// Which placed BAR holds `gpa`: (BAR, offset in it).
    fn bar_at(&self, gpa: u64) -> Option<(HostBar, u64)> {
        if !self.decoding {
            return None;
        }
        self.placed().into_iter().find(|(g, b)| gpa >= *g && gpa - g < b.size).map(|(g, b)| (b, gpa - g))
    }

    fn mmio(&mut self, partition: usize, bar: HostBar, off: u64, size: u8, write: Option<u64>) -> Option<u64> {
        if let (Some(x), Some(front)) = (self.msix_cap, self.msix.as_mut()) {
            let table = u64::from(x.table_offset)..u64::from(x.table_offset) + u64::from(x.table_size) * 16;
            let pba = u64::from(x.pba_offset)..u64::from(x.pba_offset) + u64::from(x.table_size).div_ceil(64) * 8;
            if x.table_bir == bar.index && table.contains(&off) {
                let o = off - table.start;
                return match write {
                    Some(v) => {
                        front.write_table(o, size, v, &VmmSink::here());
                        Some(0)
                    }
                    None => Some(front.read_table(o, size)),
                };
            }
            if x.pba_bir == bar.index && pba.contains(&off) {
                let o = off - pba.start;
                return match write {
                    Some(v) => {
                        front.write_pba(o, size, v);
                        Some(0)
                    }
                    None => Some(front.read_pba(o, size)),
                };
            }
        }
        // Other registers on a trapped page (or a sub-page BAR): forwarded to the device —
        // unless a doorbell the fast path missed (its BAR being remapped just then) is there.
        let w = bar.window?;
        if let (Some(v), Some(width), Some(device)) =
            (write, conduit_doorbell::Width::from_bytes(size), doorbells::device_id(partition, self.slot))
            && let Some(hit) = doorbells::TABLE.lookup(device, bar.index, off, width, v)
        {
            let bars = &self.bars;
            if doorbells::ring(&hit, v, |b| bars.iter().find(|h| h.index == b).and_then(|h| h.window)) {
                return Some(0);
            }
        }
        match write {
            Some(v) => {
                w.write(off, size, v);
                Some(0)
            }
            None => Some(w.read(off, size)),
        }
    }
}

impl NotifyFn {
    fn bar(&self) -> Option<u64> {
        self.model.bar0()
    }

    fn mmio(&mut self, off: u64, size: u8, write: Option<u64>) -> Option<u64> {
        let table = abi_vdev::NOTIFY_TABLE..abi_vdev::NOTIFY_TABLE + u64::from(abi_vdev::NOTIFY_VECTORS) * 16;
        let pba = abi_vdev::NOTIFY_PBA..abi_vdev::NOTIFY_PBA + 8;
        if table.contains(&off) {
            let o = off - table.start;
            return match write {
                Some(v) => {
                    self.msix.write_table(o, size, v, &VmmSink::here());
                    Some(0)
                }
                None => Some(self.msix.read_table(o, size)),
            };
        }
        if pba.contains(&off) {
            return match write {
                Some(_) => Some(0),
                None => Some(self.msix.read_pba(off - pba.start, size)),
            };
        }
        match write {
            Some(v) => {
                match self.model.register_write(off, size, v) {
                    NotifyEvent::Signal(i) => {
                        self.msix.signal(i, &VmmSink::here());
                    }
                    NotifyEvent::BadSignal(i) => defmt::debug!("vmm: notify: signal of entry {=u32} (none)", i),
                    _ => {}
                }
                Some(0)
            }
            None => Some(self.model.register_read(off, size)),
        }
    }

    fn config_write(&mut self, offset: u16, width: u8, value: u32) {
        if let NotifyEvent::MsixControl { enabled, function_masked } = self.model.config_write(offset, width, value) {
            self.msix.set_control(MsixControl { enabled, function_masked }, &VmmSink::here());
        }
    }
}

impl Bus {
    fn function(&mut self, device: u8, function: u8) -> Option<&mut Func> {
        if function != 0 || device == 0 {
            return None;
        }
        self.functions.get_mut(usize::from(device) - 1)
    }

    fn config_read(&mut self, r: ConfigRef) -> u32 {
        let width = match r.width {
            1 => Width::Byte,
            2 => Width::Word,
            _ => Width::Dword,
        };
        match self.function(r.device, r.function) {
            Some(Func::Physical(p)) => p.config_read(r.offset, width),
            Some(Func::Notify(n)) => n.model.config_read(r.offset, r.width),
            None => match r.width {
                1 => 0xff,
                2 => 0xffff,
                _ => u32::MAX,
            },
        }
    }

    fn config_write(&mut self, r: ConfigRef, value: u32) {
        let partition = self.partition;
        let width = match r.width {
            1 => Width::Byte,
            2 => Width::Word,
            _ => Width::Dword,
        };
        match self.function(r.device, r.function) {
            Some(Func::Physical(p)) => p.config_write(partition, r.offset, width, value),
            Some(Func::Notify(n)) => n.config_write(r.offset, r.width, value),
            None => {}
        }
    }

    fn window(&mut self, offset: u64, size: u8, write: Option<u64>) -> Option<u64> {
        let gpa = layout::PCI_WINDOW + offset;
        for f in self.functions.iter_mut() {
            match f {
                Func::Physical(p) => {
                    if let Some((bar, off)) = p.bar_at(gpa) {
                        return p.mmio(self.partition, bar, off, size, write);
                    }
                }
                Func::Notify(n) => {
                    if let Some(base) = n.bar()
                        && gpa >= base
                        && gpa - base < abi_vdev::NOTIFY_BAR_BYTES
                    {
                        return n.mmio(gpa - base, size, write);
                    }
                }
            }
        }
        None
    }
}

/// A guest access to an emulated region of partition `index` (ECAM or the BAR window); `None`
/// when nothing answers (the vCPU is stopped: an access to unbacked memory).
pub fn mmio(index: usize, region: u16, offset: u64, size: u8, write: Option<u64>) -> Option<u64> {
    let cell = BUSES.get(index)?;
    let mut retired = Retired::new();
    let result = {
        let mut guard = cell.lock();
        let bus = active(&mut guard)?;
        let r = match region {
            REGION_ECAM => match pcibus::ecam(offset, size) {
                Some(r) => match write {
                    Some(v) => {
                        bus.config_write(r, v as u32);
                        Some(0)
                    }
                    None => Some(u64::from(bus.config_read(r))),
                },
                None => {
                    bus.unclaimed += 1;
                    Some(if write.is_some() { 0 } else { u64::MAX >> (64 - 8 * u32::from(size.clamp(1, 8))) })
                }
            },
            REGION_WINDOW => bus.window(offset, size, write),
            _ => None,
        };
        note_retired(bus, &mut retired);
        r
    };
    // Old host vectors are freed once their CPU drained, with the bus lock released (and so
    // interrupts enabled here: anything on its way to this CPU has been taken).
    release_retired(index, &mut retired);
    finish_resets(index);
    result
}

/// A partition's guest asked for a Function Level Reset that `finish_resets` has yet to do.
static RESETS_PENDING: [core::sync::atomic::AtomicBool; MAX_PARTITIONS] =
    [const { core::sync::atomic::AtomicBool::new(false) }; MAX_PARTITIONS];

/// Does the Function Level Resets partition `index`'s guest asked for (`Physical::guest_reset`),
/// with the bus lock released during each reset, then gives each function a fresh virtual
/// configuration space.
fn finish_resets(index: usize) {
    // The common case, on every trapped access: nothing asked for.
    let Some(flag) = RESETS_PENDING.get(index) else { return };
    if !flag.swap(false, core::sync::atomic::Ordering::AcqRel) {
        return;
    }
    let Some(cell) = BUSES.get(index) else { return };
    let mut pending: heapless::Vec<(usize, PciAddress, Bdf), MAX_FUNCTIONS> = heapless::Vec::new();
    {
        let mut guard = cell.lock();
        let Some(bus) = active(&mut guard) else { return };
        for (i, f) in bus.functions.iter_mut().enumerate() {
            if let Func::Physical(p) = f
                && core::mem::take(&mut p.reset_requested)
            {
                let _ = pending.push((i, p.host, p.bdf));
            }
        }
    }
    for (i, dev, bdf) in pending {
        let Some(f) = host_function(bdf) else { continue };
        if !reset_reported(dev, &f, "at its guest's request") {
            unusable(bdf);
        }
        let mut guard = cell.lock();
        let Some(bus) = active(&mut guard) else { return };
        if let Some(Func::Physical(p)) = bus.functions.get_mut(i) {
            match assigned_config(&f) {
                Ok(v) => p.vconfig = v,
                Err(e) => defmt::error!("vmm: {}: rebuilding its configuration space after a reset: {}", dev, e),
            }
        }
    }
}

/// Moves the bus's retired host vectors into `into` (as many as fit; the rest wait in their
/// backend for the next control operation or teardown). For teardown, whose backends go away.
fn take_retired<const N: usize>(bus: &mut Bus, into: &mut heapless::Vec<RetiredVector, N>) {
    fn take<const N: usize>(from: &mut Retired, into: &mut heapless::Vec<RetiredVector, N>) {
        while !into.is_full() {
            let Some(item) = from.pop() else { break };
            let _ = into.push(item);
        }
    }
    for f in bus.functions.iter_mut() {
        if let Func::Physical(p) = f {
            if let Some(m) = p.msix.as_mut() {
                take(&mut m.backend_mut().retired, into);
            }
            if let Some(m) = p.msi.as_mut() {
                take(&mut m.backend_mut().retired, into);
            }
        }
    }
}

/// Copies the bus's retired host vectors into `into` (as many as fit): they stay on their
/// backends' lists while their CPUs drain, so a context freed meanwhile by another operation
/// still parks them (`unroute`), and `release_retired` frees them under the lock afterwards.
fn note_retired<const N: usize>(bus: &Bus, into: &mut heapless::Vec<RetiredVector, N>) {
    for f in bus.functions.iter() {
        if let Func::Physical(p) = f {
            let lists = [p.msix.as_ref().map(|m| &m.backend().retired), p.msi.as_ref().map(|m| &m.backend().retired)];
            for item in lists.into_iter().flatten().flat_map(|l| l.iter()) {
                if into.push(*item).is_err() {
                    return;
                }
            }
        }
    }
}

/// Drains the CPUs of the vectors `note_retired` copied (bus lock released, each CPU asked
/// once), then, under the lock, frees each one still on its backend's list with the mapping
/// it has now (its context, or `PARKED` if the context was freed meanwhile). A vector whose CPU
/// did not answer is parked and left allocated (leaked, logged).
fn release_retired<const N: usize>(index: usize, list: &mut heapless::Vec<RetiredVector, N>) {
    if list.is_empty() {
        return;
    }
    let mut drained = 0u64; // bit per CPU asked and answered
    let mut asked = 0u64;
    for &(cpu, _, _, _) in list.iter() {
        let bit = 1u64 << (cpu % 64);
        if asked & bit == 0 {
            asked |= bit;
            if drain_vectors_of(usize::from(cpu)) {
                drained |= bit;
            }
        }
    }
    let Some(cell) = BUSES.get(index) else { return };
    let mut guard = cell.lock();
    // Torn down meanwhile: teardown took (and freed) whatever was left.
    let Some(bus) = active(&mut guard) else {
        list.clear();
        return;
    };
    let release = |retired: &mut Retired| {
        retired.retain_mut(|item| {
            let (cpu, vector, ctx, drained_before) = *item;
            if !list.iter().any(|&(c, v, _, _)| c == cpu && v == vector) {
                return true;
            }
            let ok = drained & (1u64 << (cpu % 64)) != 0;
            if ok && !drained_before {
                // The grace period: freed after the next drain.
                item.3 = true;
                return true;
            }
            settle_retired(cpu, vector, ctx, ok);
            false
        });
    };
    for f in bus.functions.iter_mut() {
        if let Func::Physical(p) = f {
            if let Some(m) = p.msix.as_mut() {
                release(&mut m.backend_mut().retired);
            }
            if let Some(m) = p.msi.as_mut() {
                release(&mut m.backend_mut().retired);
            }
        }
    }
    list.clear();
}

/// A port access of partition `index`: configuration mechanism #1. `None` for other ports.
pub fn port(index: usize, port: u16, size: u8, write: Option<u32>) -> Option<u32> {
    if !Mechanism1::claims(port) {
        return None;
    }
    let cell = BUSES.get(index)?;
    let mut retired = Retired::new();
    let result = {
        let mut guard = cell.lock();
        let bus = active(&mut guard)?;
        let r = match write {
            Some(v) => {
                if !bus.mech1.write_address(port, size, v)
                    && let Some(r) = bus.mech1.data(port, size)
                {
                    bus.config_write(r, v);
                }
                Some(0)
            }
            None => Some(match bus.mech1.read_address(port, size) {
                Some(a) => a,
                None => match bus.mech1.data(port, size) {
                    Some(r) => bus.config_read(r),
                    None => u32::MAX,
                },
            }),
        };
        note_retired(bus, &mut retired);
        r
    };
    release_retired(index, &mut retired);
    finish_resets(index);
    result
}

/// A device's interrupt control (the VFIO-style API) over its front ends.
struct Control<'a> {
    func: &'a mut Func,
    /// The partition (for configuration writes that remap BARs).
    partition: usize,
}

fn binding_target(slots: &VcpuSlots, b: EventBinding) -> Option<(u64, u32)> {
    slots.get(usize::from(b.vcpu)).copied().flatten()?;
    let (address, data) = conduit_irq::msi::encode(conduit_irq::msi::GuestMsi { dest_apic: b.vcpu, vector: b.vector });
    Some((address, data))
}

fn msix_bind<B: Backend>(
    front: &mut Msix<B>,
    slots: &VcpuSlots,
    v: u32,
    b: Option<EventBinding>,
) -> Result<(), IrqError> {
    let o = u64::from(v) * 16;
    front.write_table(o + 12, 4, 1, &VmmSink::here());
    if let Some(b) = b {
        let (address, data) = binding_target(slots, b).ok_or(IrqError::BadData)?;
        front.write_table(o, 4, address & 0xffff_ffff, &VmmSink::here());
        front.write_table(o + 4, 4, address >> 32, &VmmSink::here());
        front.write_table(o + 8, 4, u64::from(data), &VmmSink::here());
        front.write_table(o + 12, 4, 0, &VmmSink::here());
        // With MSI-X on, a bound entry is live at once: no context or no host vector left
        // means it could never fire. Undo the binding and say so (ENOSPC).
        let index = u16::try_from(v).map_err(|_| IrqError::BadRange)?;
        let control = front.control();
        if control.enabled && !control.function_masked && front.entry_context(index).is_none() {
            front.write_table(o + 12, 4, 1, &VmmSink::here());
            front.write_table(o, 4, 0, &VmmSink::here());
            front.write_table(o + 4, 4, 0, &VmmSink::here());
            front.write_table(o + 8, 4, 0, &VmmSink::here());
            return Err(IrqError::NoSpace);
        }
    } else {
        front.write_table(o, 4, 0, &VmmSink::here());
        front.write_table(o + 4, 4, 0, &VmmSink::here());
        front.write_table(o + 8, 4, 0, &VmmSink::here());
    }
    Ok(())
}

/// Partition-wide facts the API needs besides the function.
struct ApiCtx<'a> {
    control: Control<'a>,
    slots: VcpuSlots,
}

impl IrqControl for ApiCtx<'_> {
    fn info(&self, index: IrqIndex) -> IrqInfo {
        match (&*self.control.func, index) {
            (Func::Physical(p), IrqIndex::Msix) => {
                p.msix.as_ref().map_or(IrqInfo::NOT_OFFERED, |m| IrqInfo::msix(u32::from(m.table_size())))
            }
            (Func::Physical(p), IrqIndex::Msi) => {
                p.msi.as_ref().map_or(IrqInfo::NOT_OFFERED, |m| IrqInfo::msi(1, m.per_vector_mask()))
            }
            (Func::Physical(_), IrqIndex::Err | IrqIndex::Req) => IrqInfo::software(),
            (Func::Notify(n), IrqIndex::Msix) => IrqInfo::msix(u32::from(n.msix.table_size())),
            _ => IrqInfo::NOT_OFFERED,
        }
    }

    fn enabled(&self, index: IrqIndex) -> u32 {
        match (&*self.control.func, index) {
            (Func::Physical(p), IrqIndex::Msix) => {
                p.msix.as_ref().map_or(0, |m| if m.control().enabled { u32::from(m.table_size()) } else { 0 })
            }
            (Func::Physical(p), IrqIndex::Msi) => p.msi.as_ref().map_or(0, |m| m.enabled_count()),
            (Func::Notify(n), IrqIndex::Msix) if n.msix.control().enabled => u32::from(n.msix.table_size()),
            _ => 0,
        }
    }

    fn enable(&mut self, index: IrqIndex, count: u32) -> Result<(), IrqError> {
        let partition = self.control.partition;
        match (&mut *self.control.func, index) {
            // Through the guest's own configuration registers, so what the guest reads there
            // stays what the front end does (a later read-modify-write by the guest must not
            // undo the call).
            (Func::Physical(p), IrqIndex::Msix) => {
                let cap = p.msix_cap.ok_or(IrqError::BadIndex)?;
                let c = p.config_read(cap.offset + 2, Width::Word) as u16;
                p.config_write(
                    partition,
                    cap.offset + 2,
                    Width::Word,
                    u32::from((c | MSIX_ENABLE) & !MSIX_FUNCTION_MASK),
                );
                // A capability the virtual configuration space does not expose takes no write.
                match p.msix.as_ref() {
                    Some(m) if m.control().enabled => Ok(()),
                    _ => Err(IrqError::BadIndex),
                }
            }
            (Func::Physical(p), IrqIndex::Msi) => {
                let cap = p.msi.as_ref().map(|m| m.backend().cap).ok_or(IrqError::BadIndex)?;
                if count > 1 {
                    return Err(IrqError::NoSpace);
                }
                let c = p.config_read(cap.control(), Width::Word) as u16 & !conduit_pci::caps::msi_control::MME_MASK;
                let c = c | conduit_pci::caps::msi_control::ENABLE;
                p.config_write(partition, cap.control(), Width::Word, u32::from(c));
                // A capability the virtual configuration space does not expose takes no write.
                match p.msi.as_ref() {
                    Some(m) if m.enabled_count() > 0 => Ok(()),
                    _ => Err(IrqError::BadIndex),
                }
            }
            (Func::Notify(n), IrqIndex::Msix) => {
                n.msix.set_control(MsixControl { enabled: true, function_masked: false }, &VmmSink::here());
                Ok(())
            }
            _ => Err(IrqError::BadIndex),
        }
    }

    fn disable(&mut self, index: IrqIndex) {
        let partition = self.control.partition;
        match (&mut *self.control.func, index) {
            (Func::Physical(p), IrqIndex::Msix) => {
                if let Some(cap) = p.msix_cap {
                    let c = p.config_read(cap.offset + 2, Width::Word) as u16;
                    p.config_write(partition, cap.offset + 2, Width::Word, u32::from(c & !MSIX_ENABLE));
                }
            }
            (Func::Physical(p), IrqIndex::Msi) => {
                if let Some(cap) = p.msi.as_ref().map(|m| m.backend().cap) {
                    let c = p.config_read(cap.control(), Width::Word) as u16;
                    let c = c & !conduit_pci::caps::msi_control::ENABLE;
                    p.config_write(partition, cap.control(), Width::Word, u32::from(c));
                }
            }
            (Func::Physical(p), IrqIndex::Err) => {
                if let Some(c) = p.err.take() {
                    POOL.free(c);
                }
            }
            (Func::Physical(p), IrqIndex::Req) => {
                if let Some(c) = p.req.take() {
                    POOL.free(c);
                }
            }
            (Func::Notify(n), IrqIndex::Msix) => {
                n.msix.set_control(MsixControl { enabled: false, function_masked: false }, &VmmSink::here())
            }
            _ => {}
        }
    }

    fn mask(&mut self, index: IrqIndex, vector: u32, state: MaskState) -> Result<(), IrqError> {
        let bit = u64::from(state.is_masked());
        let o = u64::from(vector) * 16 + 12;
        match (&mut *self.control.func, index) {
            (Func::Physical(p), IrqIndex::Msix) => {
                p.msix.as_mut().ok_or(IrqError::BadIndex)?.write_table(o, 4, bit, &VmmSink::here());
                Ok(())
            }
            (Func::Notify(n), IrqIndex::Msix) => {
                n.msix.write_table(o, 4, bit, &VmmSink::here());
                Ok(())
            }
            (Func::Physical(p), IrqIndex::Msi) => {
                // One message (see `PhysicalMsi`): its mask bit is bit 0.
                let m = p.msi.as_mut().ok_or(IrqError::BadIndex)?;
                m.set_mask(if state.is_masked() { 1 << vector } else { 0 }, &VmmSink::here());
                Ok(())
            }
            _ => Err(IrqError::BadIndex),
        }
    }

    fn trigger(&mut self, index: IrqIndex, vector: u32) -> Result<(), IrqError> {
        match (&mut *self.control.func, index) {
            (Func::Physical(p), IrqIndex::Msix) => {
                let i = u16::try_from(vector).map_err(|_| IrqError::BadRange)?;
                p.msix.as_ref().ok_or(IrqError::BadIndex)?.signal(i, &VmmSink::here());
                Ok(())
            }
            (Func::Physical(p), IrqIndex::Msi) => {
                p.msi.as_ref().ok_or(IrqError::BadIndex)?.signal(vector, &VmmSink::here());
                Ok(())
            }
            (Func::Physical(p), IrqIndex::Err | IrqIndex::Req) => {
                let c = if index == IrqIndex::Err { p.err } else { p.req };
                if let Some(c) = c {
                    POOL.signal(c, &VmmSink::here());
                }
                Ok(())
            }
            (Func::Notify(n), IrqIndex::Msix) => {
                let i = u16::try_from(vector).map_err(|_| IrqError::BadRange)?;
                n.msix.signal(i, &VmmSink::here());
                Ok(())
            }
            _ => Err(IrqError::BadIndex),
        }
    }

    fn bind(&mut self, index: IrqIndex, vector: u32, binding: Option<EventBinding>) -> Result<(), IrqError> {
        let slots = self.slots;
        match (&mut *self.control.func, index) {
            (Func::Physical(p), IrqIndex::Msix) => {
                msix_bind(p.msix.as_mut().ok_or(IrqError::BadIndex)?, &slots, vector, binding)
            }
            (Func::Notify(n), IrqIndex::Msix) => msix_bind(&mut n.msix, &slots, vector, binding),
            (Func::Physical(p), IrqIndex::Msi) => {
                // Through the guest's MSI registers (see `enable`).
                let partition = self.control.partition;
                let cap = p.msi.as_ref().map(|m| m.backend().cap).ok_or(IrqError::BadIndex)?;
                let (address, data) = match binding {
                    Some(b) => binding_target(&slots, b).ok_or(IrqError::BadData)?,
                    None => (0, 0),
                };
                p.config_write(partition, cap.address_lo(), Width::Dword, address as u32);
                if let Some(hi) = cap.address_hi() {
                    p.config_write(partition, hi, Width::Dword, (address >> 32) as u32);
                }
                if binding.is_some() {
                    p.config_write(partition, cap.data(), Width::Word, data & 0xffff);
                }
                Ok(())
            }
            (Func::Physical(p), IrqIndex::Err | IrqIndex::Req) => {
                let cell = if index == IrqIndex::Err { &mut p.err } else { &mut p.req };
                match binding {
                    Some(b) => {
                        let slot = slots.get(usize::from(b.vcpu)).copied().flatten().ok_or(IrqError::BadData)?;
                        let c = match *cell {
                            Some(c) => c,
                            None => {
                                let c = POOL.alloc().ok_or(IrqError::NoSpace)?;
                                *cell = Some(c);
                                c
                            }
                        };
                        let ctx = POOL.get(c).ok_or(IrqError::NoSpace)?;
                        let t = Target { slot, vector: b.vector };
                        if !ctx.enable(t, MaskState::Unmasked) {
                            ctx.retarget(t);
                        }
                    }
                    None => {
                        if let Some(c) = cell.take() {
                            POOL.free(c);
                        }
                    }
                }
                Ok(())
            }
            _ => Err(IrqError::BadIndex),
        }
    }
}

/// Runs `f` on the function the guest names by requester ID on its bus.
fn with_function<R>(index: usize, rid: u64, f: impl FnOnce(&mut Func, VcpuSlots, usize) -> R) -> Result<R, i64> {
    let rid = u16::try_from(rid).map_err(|_| error::ENODEV)?;
    let (bus_nr, device, function) = ((rid >> 8) as u8, ((rid >> 3) & 0x1f) as u8, (rid & 7) as u8);
    let cell = BUSES.get(index).ok_or(error::ENODEV)?;
    let mut retired = Retired::new();
    let r = {
        let mut guard = cell.lock();
        let bus = active(&mut guard).ok_or(error::ENODEV)?;
        let slots = bus.slots;
        if bus_nr != 0 {
            return Err(error::ENODEV);
        }
        let func = bus.function(device, function).ok_or(error::ENODEV)?;
        let r = f(func, slots, index);
        note_retired(bus, &mut retired);
        r
    };
    release_retired(index, &mut retired);
    Ok(r)
}

/// `IRQ_INFO` for partition `index`.
pub fn irq_info(index: usize, rid: u64, irq_index: u64) -> i64 {
    match with_function(index, rid, |func, slots, partition| {
        let ctx = ApiCtx { control: Control { func, partition }, slots };
        api::irq_info(&ctx, irq_index)
    }) {
        Ok(Ok(v)) => v as i64,
        Ok(Err(e)) => e.code(),
        Err(code) => code,
    }
}

/// `SET_IRQS` for partition `index`; `data` was read from guest memory by the caller.
pub fn set_irqs(index: usize, rid: u64, irq_index: u64, start: u64, count: u64, flags: u64, data: &[u8]) -> i64 {
    match with_function(index, rid, |func, slots, partition| {
        let mut ctx = ApiCtx { control: Control { func, partition }, slots };
        api::set_irqs(&mut ctx, irq_index, start, count, flags, data)
    }) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => e.code(),
        Err(code) => code,
    }
}

/// How many bytes of data a `SET_IRQS` call carries, validating the call first (nothing is
/// applied): `Err(code)` for a request the API refuses before reading its data.
pub fn set_irqs_data_bytes(
    index: usize,
    rid: u64,
    irq_index: u64,
    start: u64,
    count: u64,
    flags: u64,
) -> Result<usize, i64> {
    match with_function(index, rid, |func, slots, partition| {
        let ctx = ApiCtx { control: Control { func, partition }, slots };
        api::SetIrqs::parse(&ctx, irq_index, start, count, flags).map(|r| r.data_bytes())
    }) {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(e.code()),
        Err(code) => Err(code),
    }
}

/// `IRQ_STATS` of vector `vector` at `irq_index` of the function `rid` of partition `index`.
pub fn irq_stats(index: usize, rid: u64, irq_index: u64, vector: u64) -> Result<abi_irq::IrqStats, i64> {
    let idx = IrqIndex::from_abi(irq_index).ok_or(error::EINVAL)?;
    with_function(index, rid, |func, _, _| {
        let none = || Err(error::EINVAL);
        match (&*func, idx) {
            (Func::Physical(p), IrqIndex::Msix) => {
                let i = u16::try_from(vector).map_err(|_| error::EINVAL)?;
                p.msix.as_ref().and_then(|m| m.entry_stats(i)).map_or_else(none, Ok)
            }
            (Func::Physical(p), IrqIndex::Msi) => {
                let i = u32::try_from(vector).map_err(|_| error::EINVAL)?;
                p.msi.as_ref().and_then(|m| m.vector_stats(i)).map_or_else(none, Ok)
            }
            (Func::Notify(n), IrqIndex::Msix) => {
                let i = u16::try_from(vector).map_err(|_| error::EINVAL)?;
                n.msix.entry_stats(i).map_or_else(none, Ok)
            }
            _ => none(),
        }
    })?
}

/// Prints the counters of every vector that saw a signal (at the end of a partition's run).
pub fn report(index: usize) {
    let Some(cell) = BUSES.get(index) else { return };
    let mut guard = cell.lock();
    let Some(bus) = active(&mut guard) else { return };
    let print = |slot: usize, kind: &str, entry: u32, s: abi_irq::IrqStats| {
        if s.raised == 0 && s.spurious == 0 {
            return;
        }
        crate::println!(
            "irq: partition {} 00:{:02x}.0 {} {}: raised {} delivered {} coalesced {} masked {} spurious {} pending {}",
            index,
            slot,
            kind,
            entry,
            s.raised,
            s.delivered,
            s.coalesced,
            s.pending_while_masked,
            s.spurious,
            s.pending
        );
        defmt::info!(
            "irq: partition {=usize} 00:{=usize:02x}.0 {=str} {=u32}: raised {=u64} delivered {=u64} coalesced {=u64} masked {=u64} spurious {=u64}",
            index,
            slot,
            kind,
            entry,
            s.raised,
            s.delivered,
            s.coalesced,
            s.pending_while_masked,
            s.spurious
        );
    };
    for (i, f) in bus.functions.iter().enumerate() {
        match f {
            Func::Physical(p) => {
                if let Some(m) = &p.msix {
                    for e in 0..m.table_size() {
                        if let Some(s) = m.entry_stats(e) {
                            print(i + 1, "MSI-X entry", u32::from(e), s);
                        }
                    }
                }
                if let Some(m) = &p.msi
                    && let Some(s) = m.vector_stats(0)
                {
                    print(i + 1, "MSI message", 0, s);
                }
            }
            Func::Notify(n) => {
                for e in 0..n.msix.table_size() {
                    if let Some(s) = n.msix.entry_stats(e) {
                        print(i + 1, "MSI-X entry", u32::from(e), s);
                    }
                }
            }
        }
    }
}

/// A `doorbell::Request` from its 48 guest bytes (little-endian).
pub fn parse_doorbell_request(raw: &[u8; 48]) -> abi_doorbell::Request {
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let u32_at = |o: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&raw[o..o + 4]);
        u32::from_le_bytes(b)
    };
    abi_doorbell::Request {
        flags: u32_at(0),
        bar: raw[4],
        width: raw[5],
        write_bar: raw[6],
        write_width: raw[7],
        offset: u64_at(8),
        match_value: u64_at(16),
        write_offset: u64_at(24),
        write_value: u64_at(32),
        event_vcpu: u32_at(40),
        event_vector: u32_at(44),
    }
}

/// What a doorbell request names before any device is looked at; `EINVAL` for what no device
/// could accept (unknown flags, widths, a forward without a write).
fn doorbell_key(r: &abi_doorbell::Request) -> Result<(conduit_doorbell::Width, conduit_doorbell::Match), i64> {
    if r.flags & !abi_doorbell::FLAGS != 0 {
        return Err(error::EINVAL);
    }
    let width = conduit_doorbell::Width::from_bytes(r.width).ok_or(error::EINVAL)?;
    // A key no doorbell can have (not a BAR, a value wider than the write) is malformed for
    // every call, not merely unknown.
    if usize::from(r.bar) >= conduit_doorbell::BARS {
        return Err(error::EINVAL);
    }
    let matches = if r.flags & abi_doorbell::MATCH_VALUE != 0 {
        if !width.fits(r.match_value) {
            return Err(error::EINVAL);
        }
        conduit_doorbell::Match::Value(r.match_value)
    } else {
        conduit_doorbell::Match::Any
    };
    Ok((width, matches))
}

impl Physical {
    /// What the doorbell rules need to know of this function.
    fn doorbell_view(&self) -> conduit_doorbell::DeviceView {
        let mut view = conduit_doorbell::DeviceView::default();
        for b in &self.bars {
            if let Some(slot) = view.bars.get_mut(usize::from(b.index))
                && b.size > 0
            {
                *slot = Some(conduit_doorbell::Bar { len: b.size, memory: b.memory });
            }
        }
        view.msix = self.msix_cap.map(|x| conduit_doorbell::MsixLayout {
            table: conduit_doorbell::Region {
                bar: x.table_bir,
                offset: u64::from(x.table_offset),
                len: u64::from(x.table_size) * 16,
            },
            pba: conduit_doorbell::Region {
                bar: x.pba_bir,
                offset: u64::from(x.pba_offset),
                len: u64::from(x.table_size).div_ceil(64) * 8,
            },
        });
        view
    }

    /// One more (`add`) or one fewer doorbell on the page of BAR `bar` holding `offset`; the
    /// BAR mappings are redone when a page starts or stops trapping. False when a new page
    /// does not fit.
    /// Whether a doorbell at `offset` of BAR `bar` can be registered as far as trapped pages
    /// go: its page traps already, or there is room to trap one more.
    fn doorbell_page_has_room(&self, bar: u8, offset: u64) -> bool {
        let start = offset & !(PAGE_SIZE - 1);
        self.traps_anyway(bar, start)
            || self.doorbell_pages.iter().any(|d| d.bar == bar && d.start == start)
            || !self.doorbell_pages.is_full()
    }

    /// Whether the page at `start` of BAR `bar` traps without any doorbell: it holds the MSI-X
    /// table or PBA, or the BAR is smaller than a page (never mapped).
    fn traps_anyway(&self, bar: u8, start: u64) -> bool {
        self.bars.iter().any(|b| b.index == bar && b.size < PAGE_SIZE)
            || self.msix_pages(bar).into_iter().flatten().any(|(s, e)| start >= s && start < e)
    }

    fn doorbell_page(&mut self, partition: usize, bar: u8, offset: u64, add: bool) -> bool {
        let start = offset & !(PAGE_SIZE - 1);
        if self.traps_anyway(bar, start) {
            return true;
        }
        let at = self.doorbell_pages.iter().position(|d| d.bar == bar && d.start == start);
        let changed = match (at, add) {
            (Some(i), true) => {
                if let Some(d) = self.doorbell_pages.get_mut(i) {
                    d.doorbells += 1;
                }
                false
            }
            (None, true) => {
                if self.doorbell_pages.push(DoorbellPage { bar, start, doorbells: 1 }).is_err() {
                    return false;
                }
                true
            }
            (Some(i), false) => {
                let last = self.doorbell_pages.get_mut(i).is_some_and(|d| {
                    d.doorbells = d.doorbells.saturating_sub(1);
                    d.doorbells == 0
                });
                if last {
                    self.doorbell_pages.swap_remove(i);
                }
                last
            }
            (None, false) => false,
        };
        if changed && self.decoding {
            self.unmap_bars(partition);
            self.map_bars(partition);
        }
        true
    }
}

impl Bus {
    /// The software context that raises guest `vector` on vCPU `vcpu`: shared by every
    /// doorbell event with that target, allocated on first use.
    fn doorbell_event(&mut self, vcpu: u32, vector: u32) -> Result<ContextId, i64> {
        let vector = u8::try_from(vector).ok().filter(|&v| v >= 16).ok_or(error::EINVAL)?;
        let slot =
            usize::try_from(vcpu).ok().and_then(|i| self.slots.get(i).copied().flatten()).ok_or(error::EINVAL)?;
        let target = Target { slot, vector };
        if let Some(&(_, c)) = self.events.iter().find(|(t, _)| *t == target) {
            return Ok(c);
        }
        if self.events.is_full() {
            return Err(error::ENOSPC);
        }
        let c = POOL.alloc().ok_or(error::ENOSPC)?;
        let Some(ctx) = POOL.get(c) else {
            POOL.free(c);
            return Err(error::ENOSPC);
        };
        ctx.enable(target, MaskState::Unmasked);
        let _ = self.events.push((target, c));
        Ok(c)
    }

    /// Registers `request` on the function at bus index `index` (0-based).
    fn doorbell_add(&mut self, index: usize, request: &abi_doorbell::Request) -> i64 {
        let partition = self.partition;
        let (width, matches) = match doorbell_key(request) {
            Ok(k) => k,
            Err(e) => return e,
        };
        let write = if request.flags & abi_doorbell::WRITE != 0 {
            let Some(w) = conduit_doorbell::Width::from_bytes(request.write_width) else { return error::EINVAL };
            let value = if request.flags & abi_doorbell::WRITE_FORWARD != 0 {
                conduit_doorbell::WriteValue::Forward
            } else {
                conduit_doorbell::WriteValue::Fixed(request.write_value)
            };
            Some(conduit_doorbell::DeviceWrite {
                bar: request.write_bar,
                offset: request.write_offset,
                width: w,
                value,
            })
        } else if request.flags & abi_doorbell::WRITE_FORWARD != 0 {
            return error::EINVAL;
        } else {
            None
        };
        let wants_event = request.flags & abi_doorbell::EVENT != 0;
        let Some(device) = (match self.functions.get(index) {
            Some(Func::Physical(p)) => doorbells::device_id(partition, p.slot),
            _ => None,
        }) else {
            return error::ENODEV;
        };
        // The partition's share of the table: no partition can starve the others.
        let used: u32 = (0..self.functions.len())
            .filter_map(|f| doorbells::device_id(partition, f))
            .map(|d| doorbells::TABLE.count(d))
            .sum();
        let Some(Func::Physical(p)) = self.functions.get_mut(index) else { return error::ENODEV };
        let mut doorbell = conduit_doorbell::Doorbell {
            device,
            bar: request.bar,
            offset: request.offset,
            width,
            matches,
            // A stand-in event while the rules are checked: the context is taken only for a
            // doorbell that passes them.
            action: conduit_doorbell::Action { write, event: wants_event.then_some(0) },
        };
        let view = p.doorbell_view();
        if let Err(e) = conduit_doorbell::validate(&doorbell, &view) {
            return e.code();
        }
        if used >= doorbells::PARTITION_SHARE {
            return error::ENOSPC;
        }
        if !p.doorbell_page_has_room(request.bar, request.offset) {
            return error::ENOSPC;
        }
        if wants_event {
            match self.doorbell_event(request.event_vcpu, request.event_vector) {
                Ok(c) => doorbell.action.event = Some(u32::from(c.0)),
                Err(e) => return e,
            }
        }
        let Some(Func::Physical(p)) = self.functions.get_mut(index) else { return error::ENODEV };
        if let Err(e) = doorbells::TABLE.add(&doorbell, &view) {
            return e.code();
        }
        doorbells::changed();
        p.doorbell_page(partition, request.bar, request.offset, true);
        0
    }

    /// Removes the doorbell with `request`'s key, or reads its hits (`DOORBELL_HITS`).
    fn doorbell_key_call(&mut self, index: usize, request: &abi_doorbell::Request, remove: bool) -> i64 {
        let partition = self.partition;
        let (width, matches) = match doorbell_key(request) {
            Ok(k) => k,
            Err(e) => return e,
        };
        let Some(Func::Physical(p)) = self.functions.get_mut(index) else { return error::ENODEV };
        let Some(device) = doorbells::device_id(partition, p.slot) else { return error::ENODEV };
        if remove {
            match doorbells::TABLE.remove(device, request.bar, request.offset, width, matches) {
                Ok(()) => {
                    doorbells::changed();
                    p.doorbell_page(partition, request.bar, request.offset, false);
                    0
                }
                Err(e) => e.code(),
            }
        } else {
            match doorbells::TABLE
                .find(device, request.bar, request.offset, width, matches)
                .and_then(|id| doorbells::TABLE.hits(id))
            {
                Some(h) => i64::try_from(h).unwrap_or(i64::MAX),
                None => error::ENODEV,
            }
        }
    }
}

/// `DOORBELL_ADD` / `DOORBELL_REMOVE` / `DOORBELL_HITS` of partition `partition` on the
/// function with requester ID `rid`.
pub fn doorbell_call(partition: usize, function: u64, rid: u64, request: &abi_doorbell::Request) -> i64 {
    let Ok(rid) = u16::try_from(rid) else { return error::ENODEV };
    let (bus_nr, device, func) = ((rid >> 8) as u8, ((rid >> 3) & 0x1f) as u8, (rid & 7) as u8);
    let Some(cell) = BUSES.get(partition) else { return error::ENODEV };
    let mut guard = cell.lock();
    let Some(bus) = active(&mut guard) else { return error::ENODEV };
    if bus_nr != 0 || func != 0 || device == 0 || usize::from(device) > bus.functions.len() {
        return error::ENODEV;
    }
    let index = usize::from(device) - 1;
    if !matches!(bus.functions.get(index), Some(Func::Physical(_))) {
        // Emulated functions take no doorbells (their registers are the hypervisor's already).
        return error::EINVAL;
    }
    match function {
        conduit_abi::hypercall::DOORBELL_ADD => bus.doorbell_add(index, request),
        conduit_abi::hypercall::DOORBELL_REMOVE => bus.doorbell_key_call(index, request, true),
        _ => bus.doorbell_key_call(index, request, false),
    }
}
