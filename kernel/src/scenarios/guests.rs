//! Scenarios that run guests (test guests from `qemu-tests/guests`, in the bundle passed as a
//! boot module): the partition runner (`partitions`, also `cargo xtask run`'s default), and the
//! choreographed ones — isolation, interrupt injection, two guests at once.

use super::check;
use crate::arch::{paging, percpu, time};
use crate::vmm::{self, BuildError, Outcome, VcpuState};
use crate::{Platform, partitions, println};
use conduit_vm::pending::VectorSet;
use conduit_vm::vcpu::{Access, Stop};

/// Exit value the test guests use for "every check passed".
pub const GOOD: u64 = 0x600d;
/// How long a whole set may run.
const RUN_TIMEOUT_US: u64 = 60_000_000;
/// Bound for each step of a choreography.
const STEP_US: u64 = 5_000_000;

fn build_error(e: BuildError) -> &'static str {
    println!("vmm: partition refused: {:?}", e);
    defmt::error!("vmm: partition refused: {}", e);
    "a partition could not be built or started"
}

fn slot_of(cpu: u8) -> Result<&'static vmm::VcpuSlot, &'static str> {
    vmm::slot(usize::from(cpu)).ok_or("no such CPU")
}

fn wait_stopped(cpu: u8, timeout_us: u64) -> Result<Outcome, &'static str> {
    let s = slot_of(cpu)?;
    if !vmm::wait_for(timeout_us, || s.state() == VcpuState::Stopped) {
        vmm::request_stop(usize::from(cpu));
        return Err("a vCPU did not stop in time");
    }
    s.outcome().ok_or("a stopped vCPU has no outcome")
}

/// Builds and starts `specs`, runs a vCPU pinned to this CPU (if any) here, waits for all,
/// tears everything down and checks every frame came back. Returns each vCPU's outcome.
fn run_set(specs: &[conduit_vm::partition::Spec]) -> Result<heapless::Vec<(usize, u8, Outcome), 16>, &'static str> {
    let bundle = vmm::bundle().map_err(build_error)?;
    let (free_before, _) = crate::mem::stats();
    let faults_before = crate::iommu::with_fault_log(|l| l.total);
    let mut indices: heapless::Vec<usize, { partitions::MAX }> = heapless::Vec::new();
    for spec in specs {
        let i = vmm::create(spec, &bundle).map_err(build_error)?;
        let _ = indices.push(i);
    }
    for &i in &indices {
        vmm::start(i).map_err(build_error)?;
    }
    let here = percpu::this_cpu().index();
    if specs.iter().any(|s| s.cpus.iter().any(|&c| usize::from(c) == here)) {
        vmm::run_here();
    }
    let mut outcomes = heapless::Vec::new();
    let deadline = time::deadline_after_us(RUN_TIMEOUT_US);
    for (spec, &i) in specs.iter().zip(&indices) {
        for &cpu in &spec.cpus {
            let left = deadline.saturating_sub(time::rdtsc()) * 1_000_000 / time::tsc_hz().max(1);
            let o = wait_stopped(cpu, left)?;
            let _ = outcomes.push((i, cpu, o));
        }
    }
    let mut frames = 0;
    for &i in &indices {
        frames += vmm::teardown(i).map_err(build_error)?;
    }
    let (free_after, _) = crate::mem::stats();
    println!("vmm: {} partition(s) torn down, {} frames returned", indices.len(), frames);
    println!("irq: {} stray device interrupts (host vectors with no context)", vmm::irq::stray());
    let vectors: usize = vmm::irq::HOST_VECTORS.iter().map(|t| t.in_use()).sum();
    let contexts = vmm::irq::POOL.in_use();
    println!("irq: after teardown {} host vectors and {} contexts in use", vectors, contexts);
    println!("doorbells: {} guest writes served on the fast path so far", vmm::doorbells::served());
    let faults = crate::iommu::with_fault_log(|l| l.total) - faults_before;
    println!("iommu: {} DMA or interrupt-remapping faults during the run", faults);
    defmt::info!("vmm: torn down; free frames {=u64} before, {=u64} after", free_before, free_after);
    check(free_after == free_before, "frames were lost across the run")?;
    check(vectors == 0 && contexts == 0, "host vectors or contexts leaked across the run")?;
    Ok(outcomes)
}

fn chosen(p: &Platform) -> Result<heapless::Vec<conduit_vm::partition::Spec, { partitions::MAX }>, &'static str> {
    // `conduit.doorbell_limit=N`: doorbells one device takes (default 1000).
    let limit = p.record.cmdline.as_str().split_whitespace().find_map(|w| w.strip_prefix("conduit.doorbell_limit="));
    if let Some(text) = limit {
        match text.parse::<u32>() {
            Ok(n) if n > 0 => {
                vmm::doorbells::TABLE.set_device_limit(n);
                println!("partitions: doorbells per device limited to {}", n);
            }
            _ => {
                println!("partitions: rejected: conduit.doorbell_limit={}: not a count above 0", text);
                return Err("the doorbell limit was rejected");
            }
        }
    }
    let specs = partitions::select(p.record.cmdline.as_str()).and_then(|s| partitions::validate(&s, p).map(|_| s));
    match specs {
        Ok(s) => {
            for spec in &s {
                println!("partitions: {}", spec);
                defmt::info!("partitions: {}", spec);
            }
            Ok(s)
        }
        Err(e) => {
            println!("partitions: rejected: {}", e);
            defmt::error!("partitions: rejected: {=str}", crate::log::display(&e).as_str());
            Err("the partition description was rejected")
        }
    }
}

/// `partitions`: runs the selected set to completion; passes when every vCPU exited with
/// 0x600d (the test guests' "all checks passed").
pub fn partitions(p: &Platform) -> Result<(), &'static str> {
    p.svm.map_err(|e| {
        println!("partitions: svm unavailable: {}", e.describe());
        "SVM is not available"
    })?;
    let specs = chosen(p)?;
    let outcomes = run_set(&specs)?;
    let mut good = true;
    for (i, cpu, o) in &outcomes {
        println!("partitions: partition {} on cpu {}: {}", i, cpu, o.stop);
        good &= o.stop == Stop::Exited(GOOD);
    }
    check(good, "a guest did not exit with 0x600d")
}

/// `guest_isolation`: a bystander worker runs on one CPU while intruders on another read
/// unbacked guest memory, write the host's I/O APIC, triple-fault and write at another guest's
/// host address; each intruder is stopped and reported, the bystander keeps running and finishes
/// its work with its memory intact, and the hypervisor's image is unchanged.
pub fn isolation(p: &Platform) -> Result<(), &'static str> {
    p.svm.map_err(|_| "SVM is not available")?;
    let bundle = vmm::bundle().map_err(build_error)?;
    let (text, _, _) = paging::image_sections();
    let image_before = paging::fingerprint(text.start, text.len()).ok_or("image not mapped")?;
    let (free_before, _) = crate::mem::stats();
    let parse = |t: &str| conduit_vm::partition::parse(t).map_err(|_| "a built-in description does not parse");
    let bystander = parse("bystander:guest=worker,memory=16M,cpus=2")?;
    partitions::validate(core::slice::from_ref(&bystander), p).map_err(|_| "needs three CPUs (-smp 3)")?;
    let b = vmm::create(&bystander, &bundle).map_err(build_error)?;
    vmm::start(b).map_err(build_error)?;
    let bslot = slot_of(2)?;
    check(vmm::wait_for(STEP_US, || bslot.signal() == 1), "the bystander did not start working")?;
    // The host-physical address of the bystander's checksummed buffer (the worker keeps it at
    // `free_start`, after its canary page): the intruder writes to that number as a
    // guest-physical address, which can only ever be its own memory.
    let b_info = vmm::partition_info(b).ok_or("bystander vanished")?;
    let b_buffer = vmm::host_address(b, b_info.free_start + 0x1000).ok_or("bystander buffer not in its RAM")?;
    println!("guest_isolation: the bystander's checksummed buffer is at host-physical {:#x}", b_buffer);
    let intruders: [(u64, &str); 4] = [
        (1, "intruder:guest=intruder,memory=16M,cpus=1,arg=1"),
        (2, "intruder:guest=intruder,memory=16M,cpus=1,arg=2"),
        (3, "intruder:guest=intruder,memory=16M,cpus=1,arg=3"),
        (4, "intruder:guest=intruder,memory=16M,cpus=1,arg=4"),
    ];
    for (arg, text) in intruders {
        let spec = parse(text)?;
        let i = vmm::create(&spec, &bundle).map_err(build_error)?;
        vmm::start(i).map_err(build_error)?;
        if arg == 4 {
            vmm::post(1, b_buffer);
        }
        let o = wait_stopped(1, STEP_US)?;
        let expected = match (arg, o.stop) {
            (1, Stop::MemoryViolation { gpa, access: Access::Read, .. }) => gpa == (16 << 20) + 0x20_0000,
            (2, Stop::MemoryViolation { gpa, access: Access::Write, .. }) => gpa == 0xfec0_0000,
            (3, Stop::TripleFault { .. }) => true,
            // Its first write lands in its own memory; its second, beyond its RAM, stops it.
            (4, Stop::MemoryViolation { gpa, access: Access::Write, .. }) => {
                gpa == ((16 << 20) + (b_buffer & 0xfff_ffff)) & !7
            }
            _ => false,
        };
        let bystander_running = matches!(bslot.state(), VcpuState::Running | VcpuState::Halted);
        let frames = vmm::teardown(i).map_err(build_error)?;
        println!(
            "guest_isolation: intruder {}: {}; bystander {}; {} frames returned",
            arg,
            o.stop,
            if bystander_running { "still running" } else { "STOPPED" },
            frames
        );
        defmt::info!("guest_isolation: intruder {=u64}: {}; bystander running {=bool}", arg, o.stop, bystander_running);
        check(expected, "an intruder was not stopped for the expected reason")?;
        check(bystander_running, "the bystander stopped with an intruder")?;
    }
    // The next guest on a CPU sees nothing of the previous one's registers.
    for (arg, text) in
        [(5, "intruder:guest=intruder,memory=16M,cpus=1,arg=5"), (6, "intruder:guest=intruder,memory=16M,cpus=1,arg=6")]
    {
        let spec = parse(text)?;
        let i = vmm::create(&spec, &bundle).map_err(build_error)?;
        vmm::start(i).map_err(build_error)?;
        let o = wait_stopped(1, STEP_US)?;
        vmm::teardown(i).map_err(build_error)?;
        println!("guest_isolation: intruder {}: {}", arg, o.stop);
        check(o.stop == Stop::Exited(GOOD), "a guest saw register state of the previous guest on its CPU")?;
    }
    vmm::post(2, 1);
    let o = wait_stopped(2, STEP_US * 4)?;
    println!("guest_isolation: bystander: {}", o.stop);
    check(o.stop == Stop::Exited(GOOD), "the bystander did not finish its work intact")?;
    vmm::teardown(b).map_err(build_error)?;
    let image_after = paging::fingerprint(text.start, text.len()).ok_or("image not mapped")?;
    let (free_after, _) = crate::mem::stats();
    println!(
        "guest_isolation: hypervisor text {}, {} frames free before and {} after",
        if image_after == image_before { "unchanged" } else { "CHANGED" },
        free_before,
        free_after
    );
    check(image_after == image_before, "the hypervisor image changed")?;
    check(free_after == free_before, "frames were lost")
}

/// `guest_interrupt_injection`: the supervisor raises vectors while the guest halts, spins
/// with interrupts on, spins with them off, and runs under a raised TPR; the guest checks
/// each arrives once, higher priority first; here the counters must agree.
pub fn injection(p: &Platform) -> Result<(), &'static str> {
    p.svm.map_err(|_| "SVM is not available")?;
    let bundle = vmm::bundle().map_err(build_error)?;
    let spec = conduit_vm::partition::parse("irq:guest=injection,memory=16M,cpus=1").map_err(|_| "bad description")?;
    partitions::validate(core::slice::from_ref(&spec), p).map_err(|_| "needs two CPUs (-smp 2)")?;
    let i = vmm::create(&spec, &bundle).map_err(build_error)?;
    vmm::start(i).map_err(build_error)?;
    let s = slot_of(1)?;
    let four = [0x51u8, 0x62, 0x73, 0x74];
    let phase = |n: u64| vmm::wait_for(STEP_US, || s.signal() == n || s.state() == VcpuState::Stopped);
    // A: halted, all four at once.
    check(phase(1), "phase A: no signal")?;
    check(vmm::wait_for(STEP_US, || s.state() == VcpuState::Halted), "phase A: the vCPU did not halt")?;
    vmm::raise(1, &VectorSet::of(&four));
    println!("guest_interrupt_injection: phase A: raised 0x51 0x62 0x73 0x74 together while halted");
    // B: spinning with IF=1, one at a time, each taken before the next.
    check(phase(2), "phase B: no signal")?;
    for v in four {
        vmm::raise(1, &VectorSet::of(&[v]));
        check(vmm::wait_for(STEP_US, || !s.pending.contains(v)), "phase B: a vector was not injected")?;
    }
    println!("guest_interrupt_injection: phase B: raised 0x51 0x62 0x73 0x74 one by one while spinning");
    // C: spinning with IF=0: all stay pending until the guest enables interrupts.
    check(phase(3), "phase C: no signal")?;
    for v in four {
        vmm::raise(1, &VectorSet::of(&[v]));
        time::delay_us(1000);
    }
    let held = four.iter().all(|&v| s.pending.contains(v));
    println!(
        "guest_interrupt_injection: phase C: raised 0x51 0x62 0x73 0x74 one by one with IF=0: {}",
        if held { "all held pending" } else { "NOT HELD" }
    );
    vmm::post(1, 3);
    check(held, "phase C: a vector was injected while the guest had interrupts off")?;
    // D: TPR 0x60 blocks 0x51 and 0x62.
    check(phase(4), "phase D: no signal")?;
    vmm::raise(1, &VectorSet::of(&[0x51, 0x62, 0x73]));
    println!("guest_interrupt_injection: phase D: raised 0x51 0x62 0x73 under TPR 0x60");
    // F: the same under CR8 6 (the guest's CR8 write did not exit: nothing was waiting).
    check(phase(6), "phase F: no signal")?;
    vmm::raise(1, &VectorSet::of(&[0x51, 0x62, 0x73]));
    println!("guest_interrupt_injection: phase F: raised 0x51 0x62 0x73 under CR8 6");
    let o = wait_stopped(1, STEP_US * 4)?;
    let raised = s.raised();
    let left = s.pending.snapshot().len();
    println!(
        "guest_interrupt_injection: {}; {} raised by the supervisor + {} by the virtual timer, {} injected, {} left pending, {} interrupt windows, {} CR8 exits",
        o.stop, raised, o.stats.timer_interrupts, o.stats.injected, left, o.stats.windows, o.stats.cr8
    );
    defmt::info!("guest_interrupt_injection: {}; raised {=u64}, stats {}", o.stop, raised, o.stats);
    vmm::teardown(i).map_err(build_error)?;
    check(o.stop == Stop::Exited(GOOD), "the guest saw a wrong order or count")?;
    check(raised == 18 && o.stats.injected == raised + o.stats.timer_interrupts, "injected differs from raised")?;
    check(o.stats.cr8 >= 1, "lowering the priority through CR8 did not exit")?;
    check(left == 0, "vectors left pending")
}

/// `two_guests_two_cpus`: two workers, one on this CPU and one on the other, run at the same
/// time and each finishes its work.
pub fn two_at_once(p: &Platform) -> Result<(), &'static str> {
    p.svm.map_err(|_| "SVM is not available")?;
    let specs = partitions::select("conduit.partitions=pair").map_err(|_| "bad built-in set")?;
    partitions::validate(&specs, p).map_err(|_| "needs two CPUs (-smp 2)")?;
    let spans: heapless::Vec<(u64, u64), 2> = {
        let outcomes = run_set(&specs)?;
        let mut spans = heapless::Vec::new();
        for (spec, (i, cpu, o)) in specs.iter().zip(outcomes.iter()) {
            let sig = slot_of(*cpu)?.signals();
            let start = sig.iter().find(|(v, _)| *v == 1).map(|&(_, t)| t);
            let end = sig.iter().find(|(v, _)| *v == 2).map(|&(_, t)| t);
            let (Some(start), Some(end)) = (start, end) else { return Err("a worker did not signal its work") };
            println!(
                "two_guests_two_cpus: {} (partition {}) on cpu {}: worked from {} us to {} us, {}",
                spec.name.as_str(),
                i,
                cpu,
                start,
                end,
                o.stop
            );
            check(o.stop == Stop::Exited(GOOD), "a worker did not finish its work")?;
            let _ = spans.push((start, end));
        }
        spans
    };
    let [(a0, a1), (b0, b1)] = spans.as_slice() else { return Err("expected two workers") };
    let overlap = a0 < b1 && b0 < a1;
    println!("two_guests_two_cpus: their work {} in time", if overlap { "overlapped" } else { "did NOT overlap" });
    check(overlap, "the two guests did not run at the same time")
}
