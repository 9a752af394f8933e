//! `boot_smoke`: the machine came up. Prints the memory-map summary and what bring-up found,
//! then checks what bring-up promised: the allocator never manages the image, firmware tables
//! or boot structures and hands out working frames; the image is W^X, page 0 and stack guard
//! pages are unmapped; every I/O APIC pin reads back masked; the calibrated APIC timer ticks at
//! its programmed rate (within a factor of two of the TSC's view).

use super::check;
use crate::arch::{apic, interrupts, paging, smp, time};
use crate::{Platform, mem, println};
use conduit_apic::lapic::TimerMode;
use conduit_paging::{Execute, Write};
use core::sync::atomic::Ordering;

/// Periodic timer rate and measuring window for the timer check.
const TIMER_HZ: u64 = 1000;
const TIMER_WINDOW_US: u64 = 50_000;

pub fn run(p: &Platform) -> Result<(), &'static str> {
    summary(p);
    allocator(p)?;
    protections()?;
    large_pages(p)?;
    no_iommu_no_assignment(p)?;
    interrupts(p)?;
    println!("boot_smoke: all checks passed");
    Ok(())
}

fn summary(p: &Platform) {
    let usable_mib = p.map.usable_bytes() >> 20;
    println!("memory map: {} regions, {} MiB usable", p.map.regions().len(), usable_mib);
    for r in p.map.regions() {
        println!("  [{:#014x}, {:#014x}) {}", r.range.start, r.range.end, r.kind.name());
        defmt::info!("memory: [{=u64:#x}, {=u64:#x}) {=str}", r.range.start, r.range.end, r.kind.name());
    }
    let (free, total) = mem::stats();
    println!(
        "frame allocator: {} of {} frames free ({} MiB) in {} ranges, bitmap at {:#x}",
        free,
        total,
        free * 4 / 1024,
        p.memory.ranges,
        p.memory.bitmap.start
    );
    defmt::info!("frame allocator: {=u64} of {=u64} frames free", free, total);
    let rsdp = p.acpi.rsdp();
    println!("acpi: rsdp revision {} at {:#x}, {} tables", rsdp.revision, rsdp.paddr, p.acpi.iter().count());
    println!("cpus: {} enabled in MADT, {} online", p.madt.enabled_cpus().count(), smp::online());
    println!("ioapic: {} pins masked", p.ioapic_pins_masked);
    println!("time: tsc {} kHz, apic timer {} kHz", p.clocks.tsc_hz / 1000, p.clocks.apic_timer_hz / 1000);
    println!(
        "counters: {} unexpected and {} spurious interrupts, {} APIC errors, {} console bytes dropped, {} nested log frames dropped",
        interrupts::unexpected_count(),
        interrupts::spurious_count(),
        interrupts::apic_error_count(),
        crate::console::dropped(),
        crate::log::nested_dropped()
    );
}

fn allocator(p: &Platform) -> Result<(), &'static str> {
    let image = mem::image_range();
    check(!mem::manages(image.start) && !mem::manages(image.end - 1), "the allocator manages the image")?;
    for t in p.acpi.ranges() {
        check(!mem::manages(t.start & !0xfff), "the allocator manages an ACPI table")?;
    }
    for b in &p.record.boot_data {
        check(!mem::manages(b.start & !0xfff), "the allocator manages a boot structure")?;
    }
    check(!mem::manages(p.memory.bitmap.start), "the allocator manages its own bitmap")?;
    check(!mem::manages(smp::TRAMPOLINE_PADDR), "the allocator manages the AP trampoline")?;
    let (free_before, _) = mem::stats();
    let frame = mem::alloc_frame().ok_or("no frame to allocate")?;
    check(p.map.kind_at(frame) == Some(conduit_mem::MemoryKind::Usable), "allocated frame is not usable RAM")?;
    check(paging::translate(frame).is_some_and(|t| t.phys == frame), "allocated frame is not identity-mapped")?;
    check(mem::free_frame(frame).is_ok(), "freeing a frame failed")?;
    check(mem::free_frame(frame).is_err(), "double free was accepted")?;
    check(mem::stats().0 == free_before, "free count changed after alloc + free")?;
    println!("boot_smoke: allocator excludes image, ACPI, boot data, bitmap, trampoline; alloc/free round trip ok");
    Ok(())
}

fn protections() -> Result<(), &'static str> {
    let (text, rodata, data) = paging::image_sections();
    let t = paging::translate(text.start).ok_or("text unmapped")?;
    check(t.attrs.write == Write::Deny && t.attrs.execute == Execute::Allow, "text is not R+X")?;
    let r = paging::translate(rodata.start).ok_or("rodata unmapped")?;
    check(r.attrs.write == Write::Deny && r.attrs.execute == Execute::Deny, "rodata is not read-only")?;
    let d = paging::translate(data.start).ok_or("data unmapped")?;
    check(d.attrs.write == Write::Allow && d.attrs.execute == Execute::Deny, "data is not R+W+NX")?;
    check(paging::translate(0).is_none(), "page 0 is mapped")?;
    let (_, boot_guard) = conduit_boot::entry::boot_stack();
    check(paging::translate(boot_guard).is_none(), "boot stack guard page is mapped")?;
    for g in crate::arch::stacks::BSP_STACKS.layout().guards() {
        check(paging::translate(g).is_none(), "an IST guard page is mapped")?;
    }
    println!("boot_smoke: W^X image (text R+X, rodata R, data R+W+NX), page 0 and 9 guard pages unmapped");
    Ok(())
}

/// Without an IOMMU nothing would confine a device's DMA: assignment must be refused, with
/// the reason.
fn no_iommu_no_assignment(p: &Platform) -> Result<(), &'static str> {
    if p.iommu.is_some() {
        return Ok(());
    }
    let dev = crate::pci::with_inventory(|inv| inv.functions.iter().find(|f| f.header_type == 0).map(|f| f.addr))
        .ok_or("no PCI function")?;
    match crate::iommu::create_domain_for(dev) {
        Err(crate::iommu::AssignError::NoIommu(why)) => {
            println!("boot_smoke: no IOMMU: assigning {} refused ({})", dev, why);
            Ok(())
        }
        _ => Err("a device could be set up for assignment without an IOMMU"),
    }
}

/// With 1 GiB pages available and a whole aligned GiB of RAM, the identity map must use one.
fn large_pages(p: &Platform) -> Result<(), &'static str> {
    const GIB: u64 = 1 << 30;
    let whole_gib = (1..p.map.end() / GIB).map(|i| i * GIB).find(|&a| {
        p.map.regions().iter().any(|r| {
            r.kind == conduit_mem::MemoryKind::Usable && r.range.covers(&conduit_mem::PhysRange::new(a, a + GIB))
        })
    });
    match (p.features.pdpe1gb, whole_gib) {
        (true, Some(a)) => {
            let t = paging::translate(a).ok_or("RAM at a GiB boundary is unmapped")?;
            check(t.size == conduit_paging::PageSize::Size1G, "1 GiB pages are offered but not used")?;
            println!("boot_smoke: identity map uses 1 GiB pages (at {:#x})", a);
        }
        _ => println!("boot_smoke: identity map uses 2 MiB pages at most"),
    }
    Ok(())
}

fn interrupts(_p: &Platform) -> Result<(), &'static str> {
    check(apic::ioapics_all_masked(), "an I/O APIC pin is not masked")?;
    let me = crate::arch::percpu::this_cpu();
    let before = me.timer_ticks.load(Ordering::Relaxed);
    time::start_timer(TimerMode::Periodic, TIMER_HZ).map_err(|_| "timer start failed")?;
    time::delay_us(TIMER_WINDOW_US);
    time::stop_timer();
    let ticks = me.timer_ticks.load(Ordering::Relaxed) - before;
    let expected = TIMER_HZ * TIMER_WINDOW_US / 1_000_000;
    println!(
        "timer: {} ticks of a {} Hz periodic APIC timer in {} ms (expected {})",
        ticks,
        TIMER_HZ,
        TIMER_WINDOW_US / 1000,
        expected
    );
    defmt::info!("timer: {=u64} ticks in {=u64} ms, expected {=u64}", ticks, TIMER_WINDOW_US / 1000, expected);
    check(ticks >= expected / 2 && ticks <= expected * 2, "APIC timer rate disagrees with the TSC calibration")?;
    Ok(())
}
