//! `pci_config_virtualization`: the virtual config space of the edu and nvme devices on real
//! (QEMU) hardware behaves per the permission tables:
//!
//! - BAR sizing through the virtual BAR returns the true size; a guest address is recorded
//!   and the physical BAR does not move;
//! - a hidden capability is absent from the chain the guest walks (PM on nvme, spliced out of
//!   the middle; MSI on a second edu view, leaving no list at all);
//! - command: memory decode and bus master reach hardware, INTx disable stays virtual;
//! - MSI and MSI-X writes become events and leave the real capabilities alone;
//! - explicit writes to read-only fields and thousands of pseudo-random guest writes make no
//!   hardware write that `conduit_pci::audit` forbids: every write the view makes goes through
//!   an auditing config space that checks it, as it happens, against rules written from the
//!   specs (not from the permission tables the view runs on); and no physical bit changes
//!   outside the hardware-write masks.

use super::check;
use crate::{Platform, pci, println};
use conduit_pci::audit::{Audited, WriteAudit};
use conduit_pci::bar::BarKind;
use conduit_pci::enumerate::Function;
use conduit_pci::regs::{self, Command, Status, cap_id};
use conduit_pci::summary::{Size, cap_name};
use conduit_pci::vconfig::{ConfigEvent, DevicePolicy, VirtualConfig};
use conduit_pci::{ConfigSpace, EXTENDED_CONFIG_SIZE, Width};
use heapless::Vec;

/// Pseudo-random guest writes per device.
const RANDOM_WRITES: u32 = 4000;

pub fn run(_p: &Platform) -> Result<(), &'static str> {
    let (edu, nvme) = pci::with_inventory(|inv| {
        (
            inv.by_id(0x1234, 0x11e8).next().cloned(),
            inv.functions.iter().find(|f| f.vendor == 0x1b36 && f.device == 0x0010 && f.addr.bus == 0).cloned(),
        )
    });
    let edu = edu.ok_or("no edu device (1234:11e8)")?;
    let nvme = nvme.ok_or("no nvme device (1b36:0010) on bus 0")?;
    exercise(&nvme, DevicePolicy::default().hiding_cap(cap_id::POWER_MANAGEMENT), Some(cap_id::POWER_MANAGEMENT))?;
    exercise(&edu, DevicePolicy::default(), None)?;
    // A second view of edu with its only capability hidden: no list at all.
    let cfg = pci::config();
    let mut v =
        VirtualConfig::new(cfg, &edu, DevicePolicy::default().hiding_cap(cap_id::MSI)).map_err(|_| "edu view")?;
    let status = v.read(cfg, regs::STATUS, Width::Word) as u16;
    let ptr = v.read(cfg, regs::CAPABILITIES_POINTER, Width::Byte);
    check(status & Status::CAP_LIST.bits() == 0 && ptr == 0, "hiding edu's MSI left a capability list")?;
    check(cfg.read16(edu.addr, regs::STATUS) & Status::CAP_LIST.bits() != 0, "hardware lost its capability list")?;
    println!(
        "pci_config_virtualization: {}: msi hidden -> no capability list (status cap-list 0, pointer 0)",
        edu.addr
    );
    Ok(())
}

/// Reads the whole physical config space.
fn snapshot(cfg: &impl ConfigSpace, f: &Function, out: &mut [u8; EXTENDED_CONFIG_SIZE as usize]) -> usize {
    let size = usize::from(cfg.size(f.addr).min(f.config_size));
    for off in (0..size).step_by(4) {
        out[off..off + 4].copy_from_slice(&cfg.read32(f.addr, off as u16).to_le_bytes());
    }
    size
}

fn guest_chain(v: &mut VirtualConfig, cfg: &impl ConfigSpace) -> Vec<(u8, u16), 48> {
    let mut out = Vec::new();
    if v.read(cfg, regs::STATUS, Width::Word) as u16 & Status::CAP_LIST.bits() == 0 {
        return out;
    }
    let mut p = v.read(cfg, regs::CAPABILITIES_POINTER, Width::Byte) as u16;
    while p != 0 && out.len() < 48 {
        let _ = out.push((v.read(cfg, p, Width::Byte) as u8, p));
        p = v.read(cfg, p + 1, Width::Byte) as u16 & 0xfc;
    }
    out
}

/// Every bit that changed in hardware is inside the view's hardware-write mask.
fn only_allowed_changes(v: &VirtualConfig, before: &[u8], after: &[u8]) -> Result<u32, &'static str> {
    let mut changed_bits = 0;
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        let changed = b ^ a;
        if changed & !v.hw_write_mask(i as u16) != 0 {
            println!("pci_config_virtualization: protected bits changed at {:#x}: {:#04x} -> {:#04x}", i, b, a);
            return Err("a guest write changed a protected hardware bit");
        }
        changed_bits += changed.count_ones();
    }
    Ok(changed_bits)
}

fn exercise(f: &Function, policy: DevicePolicy, hidden: Option<u8>) -> Result<(), &'static str> {
    let plain = pci::config();
    let mut before = [0u8; EXTENDED_CONFIG_SIZE as usize];
    let mut after = [0u8; EXTENDED_CONFIG_SIZE as usize];
    // Building the view may bring hardware in line with it (Enable No Snoop off): the
    // snapshot is taken after.
    let mut v = VirtualConfig::new(plain, f, policy).map_err(|_| "could not build the virtual config space")?;
    let size = snapshot(plain, f, &mut before);
    let audit = WriteAudit::new(plain, f, &policy);
    let audited = Audited::new(plain, &audit);
    let cfg = &audited;
    let mut events: Vec<ConfigEvent, 32> = Vec::new();

    // BARs: sizing and guest addresses, physical BARs untouched.
    for b in &f.bars {
        let off = regs::BAR0 + 4 * u16::from(b.index);
        let is64 = matches!(b.kind, BarKind::Mem64 { .. });
        v.write(cfg, off, Width::Dword, u32::MAX, &mut events);
        if is64 {
            v.write(cfg, off + 4, Width::Dword, u32::MAX, &mut events);
        }
        let lo = v.read(cfg, off, Width::Dword);
        let hi = if is64 { v.read(cfg, off + 4, Width::Dword) } else { u32::MAX };
        let mask = u64::from(hi) << 32 | u64::from(lo & if b.kind == BarKind::Io { !0x3 } else { !0xf });
        let sized = (!mask).wrapping_add(1);
        check(sized == b.size, "virtual BAR sizing did not return the true size")?;
        let guest = if is64 { 0x10_0000_0000 } else { 0x8000_0000 & !(b.size - 1) } & !(b.size - 1);
        v.write(cfg, off, Width::Dword, guest as u32, &mut events);
        if is64 {
            v.write(cfg, off + 4, Width::Dword, (guest >> 32) as u32, &mut events);
        }
        check(v.bar(b.index).map(|x| x.0) == Some(guest), "the guest BAR address was not recorded")?;
        check(events.last() == Some(&ConfigEvent::Bar { index: b.index, address: guest }), "no BAR event")?;
        let phys = cfg.read32(f.addr, off);
        let was = u32::from_le_bytes([
            before[usize::from(off)],
            before[usize::from(off) + 1],
            before[usize::from(off) + 2],
            before[usize::from(off) + 3],
        ]);
        check(phys == was, "the physical BAR moved")?;
        println!(
            "pci_config_virtualization: {} bar{} sizing returns {} (true size {}); guest address {:#x} recorded; physical BAR unchanged ({:#x})",
            f.addr,
            b.index,
            Size(sized),
            Size(b.size),
            guest,
            phys
        );
    }

    // The chain the guest walks.
    let chain = guest_chain(&mut v, cfg);
    let mut line: heapless::String<160> = heapless::String::new();
    for (i, (id, off)) in chain.iter().enumerate() {
        let _ = core::fmt::write(
            &mut line,
            format_args!("{}{}@{:02x}", if i == 0 { "" } else { "," }, cap_name(*id).unwrap_or("?"), off),
        );
    }
    if let Some(h) = hidden {
        check(f.chains.find(h).is_some(), "the device lacks the capability the test hides")?;
        check(chain.iter().all(|c| c.0 != h), "a hidden capability is still in the guest's chain")?;
        let expected =
            f.chains.caps.iter().filter(|c| c.id != h && conduit_pci::perm::standard(c.id).is_some()).count();
        check(chain.len() == expected, "the guest's chain lost a visible capability")?;
        println!(
            "pci_config_virtualization: {} guest capability chain: {} ({} hidden)",
            f.addr,
            line.as_str(),
            cap_name(h).unwrap_or("?")
        );
    } else {
        println!("pci_config_virtualization: {} guest capability chain: {}", f.addr, line.as_str());
    }

    // Command: decode and bus master reach hardware, INTx disable does not.
    let hw_cmd_before = cfg.read16(f.addr, regs::COMMAND);
    let want = (Command::MEMORY | Command::BUS_MASTER | Command::INTX_DISABLE).bits();
    v.write(cfg, regs::COMMAND, Width::Word, u32::from(want), &mut events);
    let hw_cmd = cfg.read16(f.addr, regs::COMMAND);
    check(hw_cmd & 0x7 == 0x6, "memory decode and bus master did not reach hardware")?;
    check(
        hw_cmd & Command::INTX_DISABLE.bits() == hw_cmd_before & Command::INTX_DISABLE.bits(),
        "INTx disable reached hardware",
    )?;
    check(v.read(cfg, regs::COMMAND, Width::Word) as u16 & want == want, "the guest does not read back its command")?;
    println!(
        "pci_config_virtualization: {} command {:#06x} -> hardware {:#06x} (INTx disable virtual)",
        f.addr, want, hw_cmd
    );

    // MSI / MSI-X writes are events; the real capabilities stay as they were.
    events.clear();
    if let Some(m) = f.msi.filter(|_| hidden != Some(cap_id::MSI)) {
        v.write(cfg, m.address_lo(), Width::Dword, 0xfee0_0000, &mut events);
        v.write(cfg, m.data(), Width::Word, 0x0041, &mut events);
        v.write(cfg, m.control(), Width::Word, 0x0001, &mut events);
        check(
            events.as_slice()
                == [
                    ConfigEvent::MsiAddress(0xfee0_0000),
                    ConfigEvent::MsiData(0x41),
                    ConfigEvent::MsiControl { enabled: true, vectors_log2: 0 },
                ],
            "MSI writes did not produce the expected events",
        )?;
        check(cfg.read16(f.addr, m.control()) & 1 == 0, "the physical MSI got enabled")?;
        println!(
            "pci_config_virtualization: {} msi address/data/enable -> 3 events; physical MSI still disabled",
            f.addr
        );
    }
    if let Some(m) = f.msix {
        v.write(cfg, m.control(), Width::Word, 0xc000, &mut events);
        check(
            events.last() == Some(&ConfigEvent::MsixControl { enabled: true, function_masked: true }),
            "MSI-X enable did not produce an event",
        )?;
        check(cfg.read16(f.addr, m.control()) & 0xc000 == 0, "the physical MSI-X got enabled")?;
        let size = v.read(cfg, m.control(), Width::Word) as u16 & 0x7ff;
        println!(
            "pci_config_virtualization: {} msix enable+mask -> event; physical MSI-X untouched; guest sees {} entries",
            f.addr,
            size + 1
        );
    }

    // Read-only fields, then a pseudo-random storm over the whole config space.
    for (off, width) in [
        (regs::VENDOR_ID, Width::Dword),
        (regs::REVISION, Width::Dword),
        (regs::HEADER_TYPE, Width::Byte),
        (regs::STATUS, Width::Word),
        (regs::CAPABILITIES_POINTER, Width::Byte),
    ] {
        v.write(cfg, off, width, u32::MAX, &mut events);
    }
    if let Some(m) = f.msix {
        v.write(cfg, m.offset + 4, Width::Dword, 0xdead_beef, &mut events);
    }
    if let Some(p) = f.pcie {
        v.write(cfg, p.offset + conduit_pci::caps::pcie_regs::LINK_CONTROL, Width::Word, 0xffff, &mut events);
    }
    let mut x = 0x2545_f491_4f6c_dd1du64 ^ u64::from(f.device);
    for _ in 0..RANDOM_WRITES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let width = [Width::Byte, Width::Word, Width::Dword][(x % 3) as usize];
        // Half of the writes land in the header and standard capabilities.
        let span = if x & 0x10 != 0 { 0x100 } else { size as u16 };
        let off = ((x >> 8) as u16 % span) & !(width.bytes() - 1);
        v.write(cfg, off, width, (x >> 32) as u32, &mut events);
    }
    snapshot(plain, f, &mut after);
    if let Some(x) = audited.violation() {
        println!(
            "pci_config_virtualization: {} forbidden hardware write at {:#x}: {:#04x} over {:#04x} ({})",
            f.addr, x.offset, x.written, x.was, x.rule
        );
        return Err("a guest write reached hardware where the specs forbid it");
    }
    let changed = only_allowed_changes(&v, &before[..size], &after[..size])?;
    let c = v.counters();
    println!(
        "pci_config_virtualization: {} {} pseudo-random guest writes: no protected hardware bit changed ({} hardware writes, each allowed by the spec rules; {} bits changed inside the write masks; {} hidden and {} unknown-region writes dropped)",
        f.addr,
        RANDOM_WRITES,
        audited.writes(),
        changed,
        c.hidden_writes,
        c.unknown_writes
    );
    // Put the device back as it was.
    plain.write16(f.addr, regs::COMMAND, u16::from_le_bytes([before[4], before[5]]));
    Ok(())
}
