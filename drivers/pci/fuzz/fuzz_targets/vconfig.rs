//! Fuzzes the config-space path end to end with a hostile device and a hostile guest at once:
//! the first bytes of the input become the device's config space (arbitrary capability chains,
//! BAR contents, lengths), the rest a sequence of guest reads and writes. Enumeration, the
//! virtual config space and every access must not panic, and after every guest write no
//! physical bit outside the view's hardware-write mask may have changed.
#![no_main]

use conduit_pci::enumerate::{Inventory, probe};
use conduit_pci::fake::{FakeConfig, FakeFunction, edu_like, nvme_like};
use conduit_pci::regs::Command;
use conduit_pci::vconfig::{DevicePolicy, IntxPolicy, RomPolicy, UnknownPolicy, VirtualConfig};
use conduit_pci::{PciAddress, Width};
use libfuzzer_sys::fuzz_target;

const DEVICE_BYTES: usize = 512;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (head, rest) = data.split_at(8);
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
    let policy = DevicePolicy {
        command_passthrough: Command::from_bits_truncate(u16::from(head[2] & 7)),
        hide_caps: u32::from_le_bytes([head[3], head[4], 0, 0]),
        hide_ext_caps: u64::from(head[5]),
        rom: if head[6] & 1 != 0 { RomPolicy::Visible } else { RomPolicy::Hidden },
        unknown: [UnknownPolicy::ReadOnly, UnknownPolicy::Zero, UnknownPolicy::Passthrough]
            [usize::from(head[6] >> 1) % 3],
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
    for op in ops.chunks_exact(8) {
        let width = [Width::Byte, Width::Word, Width::Dword][usize::from(op[0] >> 1) % 3];
        let offset = u16::from_le_bytes([op[1], op[2]]) % 0x1100;
        let value = u32::from_le_bytes([op[3], op[4], op[5], op[6]]);
        if op[0] & 1 == 0 {
            let _ = v.read(&cfg, offset, width);
            continue;
        }
        let before = cfg.bytes(at);
        v.write(&cfg, offset, width, value, &mut |_| {});
        let after = cfg.bytes(at);
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let changed = b ^ a;
            assert_eq!(changed & !v.hw_write_mask(i as u16), 0, "protected bits changed at {i:#x}");
        }
    }
});
