//! The vCPU loop, on the physical CPU the vCPU is pinned to: with interrupts off, look at
//! pending work and set up injection; VMRUN (the stub enables interrupts inside the CLGI
//! window, so a kick or device interrupt arriving from here on exits the guest at once);
//! handle the exit; on HLT sleep until a deliverable interrupt, the vCPU's timer or a stop
//! request. The virtual timer is backed by this CPU's local APIC timer, armed for the nearest
//! deadline before every entry and every sleep.

use super::{Outcome, VcpuSlot, VcpuState, slot};
use crate::arch::percpu::{PerCpu, Work};
use crate::arch::{svm, time};
use crate::println;
use conduit_vm::cpuid::CpuidResult;
use conduit_vm::memory::GuestMemory;
use conduit_vm::partition::{Console, Name};
use conduit_vm::vcpu::{Action, Env, Stop, Vcpu};
use conduit_vm::vmcb::{Vmcb, tlb_control};
use core::sync::atomic::Ordering;
use x86_64::instructions::interrupts;

/// What a CPU needs to run one vCPU.
#[derive(Clone, Debug)]
pub struct Launch {
    /// Partition index.
    pub partition: usize,
    /// vCPU index in the partition.
    pub vcpu: u32,
    /// The vCPU's VMCB (a frame the partition owns).
    pub vmcb_pa: u64,
    /// The partition's RAM map (read-only while it runs).
    pub memory: GuestMemory,
    /// Partition name (console prefix).
    pub name: Name,
    /// Where its console lines go.
    pub console: Console,
    /// Its ASID.
    pub asid: u32,
    /// It has a PCI bus (devices or emulated devices): the ECAM and BAR windows trap.
    pub pci: bool,
}

/// Work posted to a CPU to run the vCPU in its slot.
pub static VCPU_WORK: Work = Work { name: "vcpu", run: vcpu_work };

fn vcpu_work(me: &'static PerCpu) {
    run_slot(me.index());
}

/// Runs the vCPU launched on the calling CPU (a partition pinned there), until it stops.
pub fn run_here() {
    run_slot(crate::arch::percpu::this_cpu().index());
}

/// The environment exit handling sees.
struct KernelEnv<'a> {
    launch: &'a Launch,
    slot: &'static VcpuSlot,
    /// This vCPU's last doorbell (the fast path's memo).
    doorbell: Option<super::doorbells::Memo>,
    /// The last guest 2 MiB block read word-wise and its host address.
    last_block: Option<(u64, u64)>,
}

impl Env for KernelEnv<'_> {
    fn read_guest(&mut self, gpa: u64, buf: &mut [u8]) -> bool {
        self.launch.memory.for_each_piece(gpa, buf.len() as u64, |hpa, off, n| {
            for i in 0..n {
                // SAFETY:
                // 1. `hpa + i` lies in one chunk of this guest's RAM (`for_each_piece` checked
                //    the whole range first): frames the partition owns, identity-mapped RAM.
                // 2. Volatile byte reads: the guest's other vCPUs may write the same bytes
                //    concurrently; a torn value is the guest's problem, never a hazard here.
                buf[(off + i) as usize] = unsafe { core::ptr::read_volatile((hpa + i) as *const u8) };
            }
        })
    }

    #[inline]
    fn read_guest_u64(&mut self, gpa: u64) -> Option<u64> {
        if !gpa.is_multiple_of(8) {
            return None;
        }
        // The 2 MiB block of the last read (page-table pages and the code being emulated sit in
        // a few blocks): chunks are whole, aligned 2 MiB blocks fixed for the partition's life.
        let block = gpa & !(conduit_vm::memory::CHUNK_ALIGN - 1);
        let hpa = match self.last_block {
            Some((g, h)) if g == block => h + (gpa - block),
            _ => {
                let (hpa, run) = self.launch.memory.translate(gpa)?;
                if run < 8 {
                    return None;
                }
                self.last_block = Some((block, hpa - (gpa - block)));
                hpa
            }
        };
        // SAFETY:
        // 1. `[hpa, hpa + 8)` lies in one chunk of this guest's RAM: `translate` found the chunk
        //    of `gpa` (now or for an earlier address in the same 2 MiB block, which lies in the
        //    same chunk: chunks are 2 MiB-aligned whole blocks, fixed while the partition
        //    lives): frames the partition owns, identity-mapped RAM; `hpa` is 8-aligned
        //    (chunks are 2 MiB-aligned and `gpa` is 8-aligned).
        // 2. A volatile read: the guest may write the word concurrently; a torn value is the
        //    guest's problem, never a hazard here.
        Some(unsafe { core::ptr::read_volatile(hpa as *const u64) })
    }

    fn tsc(&self) -> u64 {
        time::rdtsc()
    }

    fn uptime_us(&self) -> u64 {
        time::uptime_us()
    }

    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        CpuidResult { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
    }

    fn console_line(&mut self, line: &[u8]) {
        let text = core::str::from_utf8(line).unwrap_or("<non-ASCII>");
        let name = self.launch.name.as_str();
        match self.launch.console {
            Console::Serial => {
                println!("[{}] {}", name, text);
                defmt::info!("guest {=str}: {=str}", name, text);
            }
            Console::Log => defmt::info!("guest {=str}: {=str}", name, text),
            Console::Discard => {}
        }
    }

    fn signal(&mut self, value: u64) {
        self.slot.signal.store(value, Ordering::Release);
        let mut log = self.slot.signals.lock();
        if log.is_full() {
            log.remove(0);
        }
        let _ = log.push((value, time::uptime_us()));
    }

    fn mailbox(&mut self) -> u64 {
        self.slot.mailbox.load(Ordering::Acquire)
    }

    fn mmio_read(&mut self, id: u16, offset: u64, size: u8) -> Option<u64> {
        super::devices::mmio(self.launch.partition, id, offset, size, None)
    }

    fn mmio_write(&mut self, id: u16, offset: u64, size: u8, value: u64) -> bool {
        super::devices::mmio(self.launch.partition, id, offset, size, Some(value)).is_some()
    }

    #[inline]
    fn doorbell(&mut self, id: u16, offset: u64, size: u8, value: u64) -> bool {
        id == super::devices::REGION_WINDOW
            && super::doorbells::fast_write(
                self.launch.partition,
                conduit_abi::layout::PCI_WINDOW + offset,
                size,
                value,
                &mut self.doorbell,
            )
    }

    fn port_in(&mut self, port: u16, size: u8) -> Option<u32> {
        if !self.launch.pci {
            return None;
        }
        super::devices::port(self.launch.partition, port, size, None)
    }

    fn port_out(&mut self, port: u16, size: u8, value: u32) -> bool {
        self.launch.pci && super::devices::port(self.launch.partition, port, size, Some(value)).is_some()
    }

    fn hypercall(&mut self, nr: u64, a: [u64; 6]) -> Option<i64> {
        use conduit_abi::{error, hypercall};
        let p = self.launch.partition;
        Some(match nr {
            hypercall::IRQ_INFO => super::devices::irq_info(p, a[0], a[1]),
            hypercall::SET_IRQS => self.set_irqs(a),
            hypercall::DOORBELL_ADD | hypercall::DOORBELL_REMOVE | hypercall::DOORBELL_HITS => {
                let mut raw = [0u8; core::mem::size_of::<conduit_abi::doorbell::Request>()];
                if !self.read_guest(a[1], &mut raw) {
                    return Some(error::EFAULT);
                }
                let request = super::devices::parse_doorbell_request(&raw);
                super::devices::doorbell_call(p, nr, a[0], &request)
            }
            hypercall::IRQ_STATS => match super::devices::irq_stats(p, a[0], a[1], a[2]) {
                Ok(st) => {
                    let words =
                        [st.raised, st.delivered, st.coalesced, st.pending_while_masked, st.spurious, st.pending];
                    let mut out = [0u8; 48];
                    for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
                        chunk.copy_from_slice(&w.to_le_bytes());
                    }
                    if self.write_guest(a[3], &out) { 0 } else { error::EFAULT }
                }
                Err(code) => code,
            },
            _ => return None,
        })
    }
}

impl KernelEnv<'_> {
    /// `SET_IRQS`: out of line, so its 16 KiB data buffer is not in the frame (and the stack
    /// probes) of every exit.
    #[inline(never)]
    fn set_irqs(&mut self, a: [u64; 6]) -> i64 {
        let p = self.launch.partition;
        let bytes = match super::devices::set_irqs_data_bytes(p, a[0], a[1], a[2], a[3], a[4]) {
            Ok(n) => n,
            Err(code) => return code,
        };
        let mut data = [0u8; 2048 * 8];
        let Some(buf) = data.get_mut(..bytes) else { return conduit_abi::error::EINVAL };
        if !self.read_guest(a[5], buf) {
            return conduit_abi::error::EFAULT;
        }
        super::devices::set_irqs(p, a[0], a[1], a[2], a[3], a[4], buf)
    }

    /// Copies `data` into guest RAM at `gpa`; false (nothing written) when any byte is outside.
    fn write_guest(&mut self, gpa: u64, data: &[u8]) -> bool {
        self.launch.memory.for_each_piece(gpa, data.len() as u64, |hpa, off, n| {
            for i in 0..n {
                // SAFETY:
                // 1. `hpa + i` lies in one chunk of this guest's RAM (`for_each_piece` checked
                //    the whole range first): frames the partition owns, identity-mapped RAM.
                // 2. Volatile byte writes: the guest's other vCPUs may access the bytes
                //    concurrently; the guest asked for the write.
                unsafe { core::ptr::write_volatile((hpa + i) as *mut u8, data[(off + i) as usize]) };
            }
        })
    }
}

/// The forwarding benchmark, measured on every run: for each exit during which a device
/// interrupt was routed to this CPU (an INTR exit caused by a forwarded interrupt), the TSC from
/// the exit (read in the VMRUN stub before the host takes the interrupt) to the next VMRUN —
/// under `-icount shift=0` that is the hypervisor's instruction count. Exits per forwarded
/// interrupt are counted in the window the guest marks with `SIGNAL 1` … `SIGNAL 2`.
#[derive(Clone, Copy, Debug, Default)]
struct ForwardBench {
    samples: u64,
    sum: u64,
    max: u64,
    /// (exits, samples) when the window opened.
    window_start: Option<(u64, u64)>,
    /// (exits, forwarded interrupts) in the closed window.
    window: Option<(u64, u64)>,
}

impl ForwardBench {
    fn record(&mut self, cost: u64) {
        // Kept to a few instructions: they are inside what is measured.
        self.max = self.max.max(cost);
        self.sum = self.sum.wrapping_add(cost);
        self.samples += 1;
    }

    fn signal(&mut self, value: u64, exits: u64) {
        match (value, self.window_start) {
            (1, None) => self.window_start = Some((exits, self.samples)),
            (2, Some((e0, s0))) if self.window.is_none() => {
                // The SIGNAL 2 exit itself is the guest's, not an interrupt's.
                self.window = Some((exits.saturating_sub(e0).saturating_sub(1), self.samples - s0));
            }
            _ => {}
        }
    }
}

/// The doorbell benchmark: in the window the guest marks with `SIGNAL 1` … `SIGNAL 2`, the TSC
/// from each NPF exit to the next VMRUN, split by path: writes a registered doorbell took on
/// the fast path, and the other trapped MMIO writes (the generic path). Under `-icount shift=0`
/// these are hypervisor instruction counts, decode included.
#[derive(Clone, Copy, Debug, Default)]
struct DoorbellBench {
    open: bool,
    /// (samples, sum, max) for the fast path and the generic path.
    fast: (u64, u64, u64),
    generic: (u64, u64, u64),
}

impl DoorbellBench {
    fn record(&mut self, fast: bool, cost: u64) {
        let b = if fast { &mut self.fast } else { &mut self.generic };
        b.0 += 1;
        b.1 = b.1.wrapping_add(cost);
        b.2 = b.2.max(cost);
    }

    fn print(&self, partition: usize, vcpu: u32) {
        for (name, (n, sum, max)) in [("doorbell fast path", self.fast), ("generic trapped MMIO", self.generic)] {
            if let Some(mean) = sum.checked_div(n) {
                println!(
                    "bench: partition {} vcpu {}: {}: {} writes, NPF exit to next VMRUN mean {} max {} TSC ticks",
                    partition, vcpu, name, n, mean, max
                );
            }
        }
    }
}

/// After a hypercall exit (and once when the loop ends): the benchmark windows follow the
/// guest's signal word, which only `SIGNAL` changes.
fn follow_signal(
    slot: &VcpuSlot,
    seen: &mut u64,
    bench: &mut ForwardBench,
    doorbell_bench: &mut DoorbellBench,
    exits: u64,
) {
    let now = slot.signal.load(Ordering::Acquire);
    if now != *seen {
        bench.signal(now, exits);
        doorbell_bench.open = now == 1;
        *seen = now;
    }
}

/// This CPU's local APIC timer as the vCPU loop left it: it backs the virtual timer's deadline.
/// Reprogrammed only when the deadline changes, or after the timer fired (it may fire a little
/// before the TSC deadline: the rates are converted), so the entry path does not touch the
/// APIC on every VMRUN.
#[derive(Debug)]
struct HostTimer {
    /// The deadline armed (`None`: stopped), or `Unknown` after it fired.
    armed: Option<Option<u64>>,
    ticks_seen: u64,
}

impl HostTimer {
    fn new() -> Self {
        Self { armed: None, ticks_seen: crate::arch::percpu::this_cpu().timer_ticks.load(Ordering::Relaxed) }
    }

    /// Arms this CPU's timer to fire at TSC `deadline` (at once if it passed), or stops it.
    fn arm(&mut self, deadline: Option<u64>) {
        if deadline.is_none() && self.armed == Some(None) {
            // Stopped and staying stopped (whatever fired meanwhile was not ours).
            return;
        }
        let ticks = crate::arch::percpu::this_cpu().timer_ticks.load(Ordering::Relaxed);
        if ticks != self.ticks_seen {
            self.ticks_seen = ticks;
            self.armed = None;
        }
        if self.armed == Some(deadline) {
            return;
        }
        match deadline {
            Some(d) => time::start_oneshot_at(d),
            None => time::stop_timer(),
        }
        self.armed = Some(deadline);
    }
}

fn run_slot(cpu: usize) {
    let Some(slot) = slot(cpu) else { return };
    let Some(launch) = slot.launch.lock().take() else {
        defmt::error!("vmm: cpu {=usize}: vCPU work without a launch", cpu);
        return;
    };
    let stop = run_vcpu(cpu, slot, &launch);
    time::stop_timer();
    report(cpu, &launch, stop);
}

fn run_vcpu(cpu: usize, slot: &'static VcpuSlot, launch: &Launch) -> (Stop, conduit_vm::vcpu::Stats) {
    let Some(host) = svm::host_vmcb(cpu) else {
        return (Stop::InvalidState, Default::default());
    };
    // SAFETY:
    // 1. `vmcb_pa` is the VMCB frame the partition allocated for this vCPU (4 KiB-aligned,
    //    identity-mapped RAM, a valid `Vmcb` for any bits); it was initialized before the
    //    launch was published through the slot's lock.
    // 2. This CPU is the only one using it until the vCPU stops (one vCPU per CPU, and the
    //    partition is not torn down while its vCPUs run).
    let vmcb = unsafe { &mut *(launch.vmcb_pa as *mut Vmcb) };
    let bsp = launch.vcpu == 0;
    let mut vcpu = Vcpu::new(launch.vcpu as u8, bsp, conduit_vm::guest::boot_info_gpa(launch.vcpu));
    if launch.pci {
        use conduit_abi::layout;
        use conduit_vm::mmio::Handler;
        // Cannot fail: the map holds only the local APIC, far from both windows.
        let _ = vcpu.regions.insert(layout::ECAM, layout::ECAM_BYTES, Handler::Device(super::devices::REGION_ECAM));
        let _ = vcpu.regions.insert(
            layout::PCI_WINDOW,
            layout::PCI_WINDOW_BYTES,
            Handler::Device(super::devices::REGION_WINDOW),
        );
    }
    let mut tlb_seen = super::build::tlb_generation(launch.partition);
    let mut env = KernelEnv { launch, slot, doorbell: None, last_block: None };
    // Nothing of the previous guest on this CPU (x87/SSE, DR0-3) reaches this one.
    svm::reset_guest_visible_state();
    slot.set_state(VcpuState::Running);
    defmt::info!(
        "vmm: cpu {=usize} runs partition {=usize} \"{=str}\" vcpu {=u32} (asid {=u32})",
        cpu,
        launch.partition,
        launch.name.as_str(),
        launch.vcpu,
        launch.asid
    );
    let mut bench = ForwardBench::default();
    let mut host_timer = HostTimer::new();
    let mut doorbell_bench = DoorbellBench::default();
    // The previous exit's TSC, and what the benchmarks compare after it.
    let mut last_exit_tsc: Option<u64> = None;
    let mut routed_before = 0;
    let (mut seen_mmio, mut seen_doorbells) = (0, 0);
    let mut signal_seen = slot.signal.load(Ordering::Acquire);
    let stop = loop {
        interrupts::disable();
        if slot.stop_requested.load(Ordering::Acquire) {
            interrupts::enable();
            break Stop::Requested;
        }
        vcpu.prepare_entry(vmcb, &slot.pending, time::rdtsc());
        // A nested mapping was removed: no stale translation may survive into the guest.
        let tlb_now = super::build::tlb_generation(launch.partition);
        if tlb_now != tlb_seen {
            vmcb.control.tlb_control = conduit_vm::vmcb::tlb_control::FLUSH_ALL;
            tlb_seen = tlb_now;
        }
        host_timer.arm(vcpu.lapic.timer_deadline());
        let entry_tsc = time::rdtsc();
        // The benchmarks classify the exit just handled here, after the entry TSC (its code is
        // still in the VMCB): their bookkeeping stays out of what they measure.
        if let Some(exit_tsc) = last_exit_tsc.take() {
            let code = vmcb.control.exit_code;
            if code == conduit_vm::vmcb::exit::INTR && super::irq::routed(cpu) != routed_before {
                bench.record(entry_tsc.wrapping_sub(exit_tsc));
            } else if code == conduit_vm::vmcb::exit::NPF && doorbell_bench.open && vcpu.stats.mmio != seen_mmio {
                doorbell_bench.record(vcpu.stats.doorbells != seen_doorbells, entry_tsc.wrapping_sub(exit_tsc));
            } else if code == conduit_vm::vmcb::exit::VMMCALL {
                follow_signal(slot, &mut signal_seen, &mut bench, &mut doorbell_bench, vcpu.stats.exits);
            }
        }
        routed_before = super::irq::routed(cpu);
        (seen_mmio, seen_doorbells) = (vcpu.stats.mmio, vcpu.stats.doorbells);
        // SAFETY:
        // 1. SVM is on for this CPU and `host` is its host VMCB (checked above).
        // 2. `vmcb` is this vCPU's, exclusively ours (see above); it was built by
        //    `guest::init_vmcb`: nested paging on over tables mapping only the partition's own
        //    frames, VMRUN and every I/O port and MSR intercepted.
        // 3. `vcpu.gprs` is a live, exclusively borrowed `Gprs`.
        // 4. Interrupts are disabled (just above).
        let exit_tsc = unsafe { svm::vmrun(launch.vmcb_pa, host, &mut vcpu.gprs) };
        last_exit_tsc = Some(exit_tsc);
        vmcb.control.tlb_control = tlb_control::NONE;
        let action = vcpu.handle_exit(vmcb, &slot.pending, &mut env);
        match action {
            Action::Resume => {}
            Action::Halt => {
                slot.set_state(VcpuState::Halted);
                loop {
                    interrupts::disable();
                    if slot.stop_requested.load(Ordering::Acquire) || vcpu.wake_ready(&slot.pending, time::rdtsc()) {
                        interrupts::enable();
                        break;
                    }
                    host_timer.arm(vcpu.lapic.timer_deadline());
                    // `sti; hlt`: a kick or timer after the check above still ends the hlt.
                    interrupts::enable_and_hlt();
                }
                slot.set_state(VcpuState::Running);
            }
            Action::Stop(s) => break s,
        }
    };
    // A stop right after the last SIGNAL ended the loop before its next entry looked.
    follow_signal(slot, &mut signal_seen, &mut bench, &mut doorbell_bench, vcpu.stats.exits);
    vcpu.flush_console(&mut env);
    doorbell_bench.print(launch.partition, launch.vcpu);
    if let Some(mean) = bench.sum.checked_div(bench.samples) {
        println!(
            "bench: partition {} vcpu {}: {} forwarded interrupts, INTR exit to next VMRUN mean {} max {} TSC ticks",
            launch.partition, launch.vcpu, bench.samples, mean, bench.max
        );
        defmt::info!(
            "bench: partition {=usize} vcpu {=u32}: {=u64} forwarded, exit to VMRUN mean {=u64} max {=u64}",
            launch.partition,
            launch.vcpu,
            bench.samples,
            mean,
            bench.max
        );
        if let Some((exits, forwarded)) = bench.window
            && forwarded > 0
        {
            println!(
                "bench: partition {} vcpu {}: measured window: {} forwarded interrupts, {} exits: {}.{:02} exits per forwarded interrupt",
                launch.partition,
                launch.vcpu,
                forwarded,
                exits,
                exits / forwarded,
                exits % forwarded * 100 / forwarded
            );
        }
    }
    (stop, vcpu.stats)
}

fn report(cpu: usize, launch: &Launch, (stop, stats): (Stop, conduit_vm::vcpu::Stats)) {
    let Some(slot) = slot(cpu) else { return };
    let at_us = time::uptime_us();
    // A vCPU stopped by a violation takes its partition down with it; the others keep running.
    // This happens before this vCPU counts as stopped, so the partition cannot have been torn
    // down (and its index reused) yet.
    if stop.is_violation() {
        super::stop_partition_of(cpu, launch.partition);
    }
    *slot.outcome.lock() = Some(Outcome { stop, stats, at_us });
    slot.set_state(VcpuState::Stopped);
    println!(
        "vmm: partition {} \"{}\" vcpu {} on cpu {} stopped: {} ({} exits, {} interrupts injected)",
        launch.partition,
        launch.name.as_str(),
        launch.vcpu,
        cpu,
        stop,
        stats.exits,
        stats.injected
    );
    defmt::info!(
        "vmm: partition {=usize} \"{=str}\" vcpu {=u32} stopped: {}; {}",
        launch.partition,
        launch.name.as_str(),
        launch.vcpu,
        stop,
        stats
    );
}
