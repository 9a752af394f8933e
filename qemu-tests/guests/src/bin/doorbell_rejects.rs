//! `doorbell_rejects`: every rejection of `DOORBELL_ADD` / `DOORBELL_REMOVE`, each with its
//! error code, on edu (00:01.0, BAR 0 of 1 MiB, no MSI-X) and an NVMe controller (00:02.0, BAR 0
//! of 16 KiB holding its MSI-X table at 0x2000 and PBA at 0x3000). The partition runs with a
//! per-device limit of 8 (`conduit.doorbell_limit=8`). One line per case:
//! `doorbell_rejects: <case> -> <code> (<name>)`; the run fails on any other code.
//!
//! Only vCPU 0 takes part.
#![no_std]
#![no_main]

use conduit_guest_rt::abi::doorbell::{self as db, Request};
use conduit_guest_rt::abi::{error, hypercall as nr};
use conduit_guest_rt::devices::{edu, nvme};
use conduit_guest_rt::pci::{BarWindow, Bdf, Ecam, command};
use conduit_guest_rt::report::Report;
use conduit_guest_rt::{BootInfo, entry, hypercall, println};

entry!(main);

const NAME: &str = "doorbell_rejects";
const EDU: Bdf = Bdf::new(0, 1, 0);
const NVME: Bdf = Bdf::new(0, 2, 0);
/// The per-device limit the scenario configures.
const LIMIT: u64 = 8;

/// A plain doorbell: `width` bytes at `offset` of BAR 0, any value, forwarded to itself.
fn plain(offset: u64, width: u8) -> Request {
    Request::forwarding(0, offset, width)
}

fn main(info: &'static BootInfo) -> u64 {
    let mut r = Report::new(NAME);
    if info.vcpu != 0 {
        return r.finish();
    }
    if setup(&mut r, info).is_some() {
        cases(&mut r);
    }
    if r.passed() {
        println!("{NAME}: all checks passed");
    }
    r.finish()
}

fn setup(r: &mut Report, info: &BootInfo) -> Option<()> {
    let ecam = r.require("ECAM window", Ecam::from_boot_info(info))?;
    let mut window = r.require("BAR window", BarWindow::from_boot_info(info))?;
    let e = r.require("finding edu", ecam.find(edu::VENDOR, edu::DEVICE))?;
    let n = r.require("finding nvme", ecam.find(nvme::VENDOR, nvme::DEVICE))?;
    let ok = r.check(e.bdf() == EDU && n.bdf() == NVME, format_args!("edu at {}, nvme at {}", e.bdf(), n.bdf()));
    if !ok {
        return None;
    }
    r.require("placing edu BAR 0", e.place_bar(0, &mut window))?;
    r.require("placing nvme BAR 0", n.place_bar(0, &mut window))?;
    e.enable(command::MEMORY);
    n.enable(command::MEMORY);
    Some(())
}

/// Expects `got` to be `want`; prints the case.
fn expect(r: &mut Report, case: &str, got: i64, want: i64) {
    if r.check(got == want, format_args!("{case}: got {got}, expected {want} ({})", hypercall::error_name(want))) {
        println!("{NAME}: {case} -> {got} ({})", hypercall::error_name(got));
    }
}

fn add(device: Bdf, req: &Request) -> i64 {
    hypercall::doorbell_add(device.rid(), req).err().unwrap_or(0)
}

fn remove(device: Bdf, req: &Request) -> i64 {
    hypercall::doorbell_remove(device.rid(), req).err().unwrap_or(0)
}

fn cases(r: &mut Report) {
    let ok = plain(0x10, 4);
    expect(r, "config space as the BAR (index 7)", add(EDU, &Request { bar: 7, ..ok }), error::EINVAL);
    expect(r, "BAR 1 (edu has none)", add(EDU, &Request { bar: 1, ..ok }), error::EINVAL);
    expect(r, "offset beyond the BAR (0x100000)", add(EDU, &plain(0x10_0000, 4)), error::EINVAL);
    expect(r, "last bytes crossing the BAR end", add(EDU, &plain(0xf_fffc, 8)), error::EINVAL);
    expect(r, "width 3", add(EDU, &plain(0x10, 3)), error::EINVAL);
    expect(r, "misaligned offset (0x12, width 4)", add(EDU, &plain(0x12, 4)), error::EINVAL);
    expect(r, "on the MSI-X table (nvme 0x2000)", add(NVME, &plain(0x2000, 4)), error::EINVAL);
    expect(r, "on the PBA (nvme 0x3000)", add(NVME, &plain(0x3000, 8)), error::EINVAL);
    let into_table = Request { write_offset: 0x2010, ..plain(0x1000, 4) };
    expect(r, "action writing the MSI-X table", add(NVME, &into_table), error::EINVAL);
    let beyond = Request { write_offset: 0x10_0000, ..ok };
    expect(r, "action writing beyond the BAR", add(EDU, &beyond), error::EINVAL);
    let wide = Request { flags: ok.flags | db::MATCH_VALUE, width: 1, write_width: 1, match_value: 0x100, ..ok };
    expect(r, "match value wider than 1 byte", add(EDU, &wide), error::EINVAL);
    let fixed = Request { flags: db::WRITE, write_width: 2, write_value: 0x1_0000, ..ok };
    expect(r, "written value wider than 2 bytes", add(EDU, &fixed), error::EINVAL);
    expect(r, "no action", add(EDU, &Request { flags: 0, ..ok }), error::EINVAL);
    expect(r, "unknown flag", add(EDU, &Request { flags: ok.flags | 1 << 9, ..ok }), error::EINVAL);
    let low = Request { flags: db::EVENT, event_vector: 8, ..ok };
    expect(r, "event vector 8", add(EDU, &low), error::EINVAL);
    let absent = Request { flags: db::EVENT, event_vcpu: 5, event_vector: 0x40, ..ok };
    expect(r, "event on vCPU 5 (absent)", add(EDU, &absent), error::EINVAL);
    expect(r, "device 00:1f.0 (not on the bus)", add(Bdf::new(0, 0x1f, 0), &ok), error::ENODEV);
    // SAFETY:
    // 1. DOORBELL_ADD only reads guest memory; the address is outside guest RAM, so it reads
    //    nothing and returns EFAULT.
    let fault = unsafe { hypercall::call6(nr::DOORBELL_ADD, [u64::from(EDU.rid()), 1 << 40, 0, 0, 0, 0]) };
    expect(r, "request outside guest memory", fault, error::EFAULT);

    expect(r, "first doorbell at edu 0x10", add(EDU, &ok), 0);
    expect(r, "the same again", add(EDU, &ok), error::EEXIST);
    let one = Request { flags: ok.flags | db::MATCH_VALUE, match_value: 1, ..ok };
    expect(r, "value 1 where any value rings", add(EDU, &one), error::EEXIST);
    let narrow = plain(0x10, 2);
    expect(r, "2 bytes at the same offset (distinct)", add(EDU, &narrow), 0);
    expect(r, "removing value 1 (never added)", remove(EDU, &one), error::ENODEV);
    expect(r, "removing on nvme (never added)", remove(NVME, &ok), error::ENODEV);
    expect(r, "removing the 2-byte one", remove(EDU, &narrow), 0);
    expect(r, "removing it again", remove(EDU, &narrow), error::ENODEV);
    expect(r, "removing a key no doorbell can have (BAR 9)", remove(EDU, &Request { bar: 9, ..narrow }), error::EINVAL);
    // Refused requests take no event target: more refused event requests than the partition
    // has targets (32), then a valid one still gets its target.
    for v in 0..40 {
        let _ = add(EDU, &Request { flags: db::EVENT, bar: 1, event_vector: 0x40 + v, ..ok });
    }
    let event = Request { flags: db::EVENT, offset: 0x18, write_offset: 0x18, event_vector: 0x7f, ..ok };
    expect(r, "an event doorbell after 40 refused ones", add(EDU, &event), 0);
    expect(r, "removing it", remove(EDU, &event), 0);

    // The limit: 1 in place, LIMIT - 1 more fit, the next does not; removing one makes room.
    let mut added = 1;
    for i in 1..LIMIT {
        if add(EDU, &plain(0x100 + 8 * i, 4)) == 0 {
            added += 1;
        }
    }
    expect(r, "doorbells on edu up to the limit", if added == LIMIT { 0 } else { -(added as i64) }, 0);
    expect(r, "one more than the limit", add(EDU, &plain(0x200, 4)), error::ENOSPC);
    expect(r, "the limit is per device (nvme)", add(NVME, &plain(0x1000, 4)), 0);
    expect(
        r,
        "after removing one",
        {
            let _ = remove(EDU, &ok);
            add(EDU, &plain(0x200, 4))
        },
        0,
    );
}
