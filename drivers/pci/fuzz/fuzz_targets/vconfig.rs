//! Fuzzes the config-space path end to end with a hostile device and a hostile guest at once:
//! the first bytes of the input become the device's config space (arbitrary capability chains,
//! BAR contents, lengths), the rest a sequence of guest reads and writes. Enumeration, the
//! virtual config space and every access must not panic, and every hardware write the view
//! makes on the guest's behalf is checked as it happens against `audit::WriteAudit`: rules
//! written from the specs, not from the permission tables the view runs on. The device model
//! is writable in every bit but its RW1C ones, so a forbidden write changes its state, and
//! RW1C bits it has set must survive outside bytes the guest owns.
#![no_main]

use conduit_pci::audit::{Audited, WriteAudit};
use conduit_pci::enumerate::{Inventory, probe};
use conduit_pci::fake::{FakeConfig, FakeFunction, edu_like, nvme_like};
use conduit_pci::regs::Command;
use conduit_pci::vconfig::{DevicePolicy, IntxPolicy, RomPolicy, UnknownPolicy, VirtualConfig};
use conduit_pci::{PciAddress, Width};
use libfuzzer_sys::fuzz_target;

const DEVICE_BYTES: usize = 512;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let (head, rest) = data.split_at(9);
    let mut f = match head[0] % 3 {
        0 => nvme_like(),
        1 => edu_like(),
        _ => FakeFunction::new(0x1af4, 0x1000, 0x02_00_00, 4096),
    };
    // Overlay device bytes (keeping a present vendor ID and a type 0 header).
    let (device, ops) = rest.split_at(rest.len().min(DEVICE_BYTES) * usize::from(head[1] & 1));
    let n = device.len().min(f.bytes.len());
    f.bytes[..n].copy_from_slice(&device[..n]);
    f.bytes[0] = 0x34;
    f.bytes[1] = 0x12;
    f.bytes[0x0e] = 0;
    // Status error bits (RW1C) set, so an accidental clear shows up.
    f.bytes[7] |= 0xf9;
    let unknowns = [UnknownPolicy::ReadOnly, UnknownPolicy::Zero, UnknownPolicy::Passthrough];
    let policy = DevicePolicy {
        command_passthrough: Command::from_bits_truncate(u16::from(head[2] & 7)),
        hide_caps: u32::from_le_bytes([head[3], head[4], 0, 0]),
        hide_ext_caps: u64::from(head[5]),
        rom: if head[6] & 1 != 0 { RomPolicy::Visible } else { RomPolicy::Hidden },
        unknown: unknowns[usize::from(head[6] >> 1) % 3],
        extended_unknown: unknowns[usize::from(head[8]) % 3],
        intx: if head[7] & 1 != 0 { IntxPolicy::Hide } else { IntxPolicy::Expose },
    };
    let at = PciAddress::new(0, 3, 0);
    let cfg = FakeConfig::new();
    cfg.add(at, f);
    let mut func = probe(&cfg, at, false, &mut Inventory::default());
    // Sometimes a config space size a real function never has (unreachable, truncated).
    if head[7] & 2 != 0 {
        func.config_size = u16::from(head[7] & 0xfc) << 2;
    }
    let Ok(mut v) = VirtualConfig::new(&cfg, &func, policy) else { return };
    // From here on every bit but the RW1C ones is writable in the device.
    let rw1c = {
        let mut fns = cfg.functions.borrow_mut();
        let Some(d) = fns.get_mut(&at) else { return };
        for (w, c) in d.writable.iter_mut().zip(&d.rw1c) {
            *w = !c;
        }
        d.rw1c.clone()
    };
    let audit = WriteAudit::new(&cfg, &func, &policy);
    let audited = Audited::new(&cfg, &audit);
    let fixed =
        |b: &[u8]| (b[0..4].to_vec(), b[8..0x0c].to_vec(), b[0x0e], b[0x10..0x28].to_vec(), b[0x30..0x34].to_vec());
    let original = fixed(&cfg.bytes(at));
    for op in ops.chunks_exact(8) {
        let width = [Width::Byte, Width::Word, Width::Dword][usize::from(op[0] >> 1) % 3];
        let offset = u16::from_le_bytes([op[1], op[2]]) % 0x1100;
        let value = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        if op[0] & 1 == 0 {
            let _ = v.read(&audited, offset, width);
            continue;
        }
        let before = cfg.bytes(at);
        v.write(&audited, offset, width, value, &mut |_| {});
        if let Some(violation) = audited.violation() {
            panic!("{violation:?} by a {width:?} guest write of {value:#x} at {offset:#x}");
        }
        let after = cfg.bytes(at);
        for (i, ((b, a), c)) in before.iter().zip(&after).zip(&rw1c).enumerate() {
            let cleared = b & !a & c;
            assert!(cleared == 0 || audit.guest_owns(i as u16), "RW1C bits {cleared:#04x} of {i:#x} cleared");
        }
    }
    assert_eq!(fixed(&cfg.bytes(at)), original, "IDs, class, header type, BARs or ROM changed");
});
