//! What a doorbell is — the watched guest write, the match, the action — what the kernel knows
//! of the device when one is registered, and the registration rules ([`validate`]).

use crate::error::{Error, RangeFault, Reason};
use crate::table::MAX_DEVICES;

/// Number of PCI BARs. Index 6 and above (the ROM, config space) are never doorbell BARs.
pub const BARS: usize = 6;

/// The width of an MMIO write: VFIO's `VFIO_DEVICE_IOEVENTFD_{8,16,32,64}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Width {
    /// 1 byte.
    Byte,
    /// 2 bytes.
    Word,
    /// 4 bytes.
    Dword,
    /// 8 bytes.
    Qword,
}

impl Width {
    /// Every width, narrowest first.
    pub const ALL: [Self; 4] = [Self::Byte, Self::Word, Self::Dword, Self::Qword];

    /// The width of a `bytes`-byte access: 1, 2, 4 or 8, else `None`.
    pub const fn from_bytes(bytes: u8) -> Option<Self> {
        match bytes {
            1 => Some(Self::Byte),
            2 => Some(Self::Word),
            4 => Some(Self::Dword),
            8 => Some(Self::Qword),
            _ => None,
        }
    }

    /// Bytes accessed.
    pub const fn bytes(self) -> u8 {
        1 << self.log2()
    }

    /// The bits a value of this width can have (`0xff` for a byte … `u64::MAX`).
    pub const fn mask(self) -> u64 {
        u64::MAX >> (64 - 8 * self.bytes() as u32)
    }

    /// Whether `value` fits (has no bits above the width).
    pub const fn fits(self, value: u64) -> bool {
        value & !self.mask() == 0
    }

    /// log2 of the byte count: the table's 2-bit encoding.
    pub(crate) const fn log2(self) -> u8 {
        match self {
            Self::Byte => 0,
            Self::Word => 1,
            Self::Dword => 2,
            Self::Qword => 3,
        }
    }

    /// Inverse of [`Width::log2`] (only the low two bits are looked at).
    pub(crate) const fn from_log2(log2: u64) -> Self {
        match log2 & 3 {
            0 => Self::Byte,
            1 => Self::Word,
            2 => Self::Dword,
            _ => Self::Qword,
        }
    }
}

/// Which written values ring the doorbell (VFIO's `data`; KVM's `DATAMATCH` flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Match {
    /// Any value.
    Any,
    /// Only this value (it must fit the doorbell's width).
    Value(u64),
}

/// What a device write writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WriteValue {
    /// Always this value (it must fit the device write's width) — VFIO's pre-programmed write.
    Fixed(u64),
    /// The value the guest wrote, truncated or zero-extended to the device write's width.
    Forward,
}

/// A write to the device the doorbell belongs to, done by the hypervisor when it rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceWrite {
    /// BAR index (0–5).
    pub bar: u8,
    /// Byte offset in the BAR (naturally aligned to `width`).
    pub offset: u64,
    /// Access width.
    pub width: Width,
    /// The value written.
    pub value: WriteValue,
}

impl DeviceWrite {
    /// The write to perform for a guest write of `written`: `Fixed` as registered, `Forward`
    /// as `written` cut to the width.
    pub const fn resolve(&self, written: u64) -> ResolvedWrite {
        let value = match self.value {
            WriteValue::Fixed(v) => v & self.width.mask(),
            WriteValue::Forward => written & self.width.mask(),
        };
        ResolvedWrite { bar: self.bar, offset: self.offset, width: self.width, value }
    }
}

/// A device write with its value known: what the kernel hands to its MMIO layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResolvedWrite {
    /// BAR index (0–5).
    pub bar: u8,
    /// Byte offset in the BAR.
    pub offset: u64,
    /// Access width.
    pub width: Width,
    /// The value, within `width`.
    pub value: u64,
}

/// What happens when the doorbell rings: a device write, an event, or both (write first is
/// the natural order, but the table only reports; the kernel decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Action {
    /// Write to the device.
    pub write: Option<DeviceWrite>,
    /// Signal this event sink: an opaque id (an emulated-interrupt context, an emulated-device
    /// notification) that the kernel resolved and checked before registering.
    pub event: Option<u32>,
}

/// A doorbell registration: a guest write of `width` bytes at `offset` in BAR `bar` of device
/// `device`, with a value that `matches`, does `action` instead of (or besides) the normal
/// MMIO exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Doorbell {
    /// The kernel-global device slot (`< MAX_DEVICES`).
    pub device: u16,
    /// BAR index (0–5).
    pub bar: u8,
    /// Byte offset in the BAR (naturally aligned to `width`).
    pub offset: u64,
    /// Access width of the guest write.
    pub width: Width,
    /// Which written values ring it.
    pub matches: Match,
    /// What ringing does.
    pub action: Action,
}

/// A BAR as the kernel sized it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bar {
    /// Length in bytes.
    pub len: u64,
    /// Memory space (`true`) or I/O space (`false`).
    pub memory: bool,
}

/// A byte range in a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    /// BAR index (the BIR).
    pub bar: u8,
    /// Byte offset in the BAR.
    pub offset: u64,
    /// Length in bytes (0: nothing).
    pub len: u64,
}

impl Region {
    /// Whether `[offset, offset + len)` in `bar` shares a byte with this region. Computed in
    /// u128, so no range overflows.
    pub const fn intersects(&self, bar: u8, offset: u64, len: u64) -> bool {
        let (a0, a1) = (offset as u128, offset as u128 + len as u128);
        let (b0, b1) = (self.offset as u128, self.offset as u128 + self.len as u128);
        bar == self.bar && a0 < b1 && b0 < a1
    }
}

/// Where a device's MSI-X table and PBA live (from its MSI-X capability).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MsixLayout {
    /// The vector table (16 bytes per vector).
    pub table: Region,
    /// The pending bit array.
    pub pba: Region,
}

/// What the kernel knows of a device when a doorbell is registered on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeviceView {
    /// BAR 0–5: `None` where the device implements none (or it is the upper half of a 64-bit
    /// BAR).
    pub bars: [Option<Bar>; BARS],
    /// The MSI-X layout, if the device has MSI-X.
    pub msix: Option<MsixLayout>,
}

/// Checks `doorbell` against the rules, for a device that looks like `view`. [`Table::add`]
/// runs this first; the kernel may also call it alone (e.g. to answer a probe). Checks, in this
/// order; the first failing one is returned as `Error::Invalid(reason)` (`EINVAL`):
///
/// 1. `device >= MAX_DEVICES` → [`Reason::DeviceSlot`];
/// 2. the watched range (`bar`, `offset`, `width`) → [`Reason::Doorbell`] with, checked in
///    this order:
///    - `bar >= 6` (config space, the ROM and anything else are not BARs) →
///      [`RangeFault::BarIndex`],
///    - the BAR is not implemented → [`RangeFault::MissingBar`],
///    - it is an I/O BAR → [`RangeFault::NotMemoryBar`],
///    - `offset` is not a multiple of the width → [`RangeFault::Misaligned`],
///    - `offset + width` is past the BAR's length (or overflows) → [`RangeFault::BeyondBar`],
///    - any byte of it is in the MSI-X table → [`RangeFault::OverlapsMsixTable`], or in the
///      PBA → [`RangeFault::OverlapsPba`] (a doorbell must never be a way around the
///      hypervisor's ownership of either, core rule 2);
/// 3. `Match::Value(v)` with bits above the width → [`Reason::MatchTooWide`];
/// 4. neither a device write nor an event → [`Reason::NoAction`];
/// 5. the device write's target → [`Reason::WriteTarget`] with the same range faults as 2
///    (never into the MSI-X table or PBA either: that is exactly the hole VFIO closes);
/// 6. `WriteValue::Fixed(v)` with bits above the write's width → [`Reason::FixedTooWide`].
///
/// Never panics, whatever the input (core rule 1).
///
/// [`Table::add`]: crate::Table::add
pub fn validate(doorbell: &Doorbell, view: &DeviceView) -> Result<(), Error> {
    if usize::from(doorbell.device) >= MAX_DEVICES {
        return Err(Reason::DeviceSlot.into());
    }
    check_range(view, doorbell.bar, doorbell.offset, doorbell.width).map_err(Reason::Doorbell)?;
    if let Match::Value(v) = doorbell.matches
        && !doorbell.width.fits(v)
    {
        return Err(Reason::MatchTooWide.into());
    }
    let action = &doorbell.action;
    if action.write.is_none() && action.event.is_none() {
        return Err(Reason::NoAction.into());
    }
    if let Some(write) = &action.write {
        check_range(view, write.bar, write.offset, write.width).map_err(Reason::WriteTarget)?;
        if let WriteValue::Fixed(v) = write.value
            && !write.width.fits(v)
        {
            return Err(Reason::FixedTooWide.into());
        }
    }
    Ok(())
}

/// The range rules shared by the watched range and the write target.
fn check_range(view: &DeviceView, bar: u8, offset: u64, width: Width) -> Result<(), RangeFault> {
    let slot = view.bars.get(usize::from(bar)).ok_or(RangeFault::BarIndex)?;
    let found = slot.ok_or(RangeFault::MissingBar)?;
    if !found.memory {
        return Err(RangeFault::NotMemoryBar);
    }
    let len = u64::from(width.bytes());
    if !offset.is_multiple_of(len) {
        return Err(RangeFault::Misaligned);
    }
    match offset.checked_add(len) {
        Some(end) if end <= found.len => {}
        _ => return Err(RangeFault::BeyondBar),
    }
    if let Some(msix) = &view.msix {
        if msix.table.intersects(bar, offset, len) {
            return Err(RangeFault::OverlapsMsixTable);
        }
        if msix.pba.intersects(bar, offset, len) {
            return Err(RangeFault::OverlapsPba);
        }
    }
    Ok(())
}

#[cfg(all(test, not(loom)))]
pub(crate) mod tests {
    use super::*;

    /// BAR 0: 16 KiB memory, MSI-X table at 0x2000 (0x100 bytes = 16 vectors), PBA at 0x3000
    /// (8 bytes); BAR 1 absent; BAR 2: an I/O BAR; BAR 4: 4 KiB memory.
    pub(crate) fn view() -> DeviceView {
        let mut bars = [None; BARS];
        bars[0] = Some(Bar { len: 0x4000, memory: true });
        bars[2] = Some(Bar { len: 0x100, memory: false });
        bars[4] = Some(Bar { len: 0x1000, memory: true });
        DeviceView {
            bars,
            msix: Some(MsixLayout {
                table: Region { bar: 0, offset: 0x2000, len: 0x100 },
                pba: Region { bar: 0, offset: 0x3000, len: 8 },
            }),
        }
    }

    pub(crate) fn event_bell(device: u16, bar: u8, offset: u64, width: Width, matches: Match) -> Doorbell {
        Doorbell { device, bar, offset, width, matches, action: Action { write: None, event: Some(7) } }
    }

    fn with_write(write: DeviceWrite) -> Doorbell {
        Doorbell {
            action: Action { write: Some(write), event: None },
            ..event_bell(0, 0, 0x100, Width::Dword, Match::Any)
        }
    }

    fn invalid(reason: Reason) -> Result<(), Error> {
        Err(Error::Invalid(reason))
    }

    #[test]
    fn width_conversions() {
        for (bytes, w, mask) in [
            (1, Width::Byte, 0xff),
            (2, Width::Word, 0xffff),
            (4, Width::Dword, 0xffff_ffff),
            (8, Width::Qword, u64::MAX),
        ] {
            assert_eq!(Width::from_bytes(bytes), Some(w));
            assert_eq!(w.bytes(), bytes);
            assert_eq!(w.mask(), mask);
            assert_eq!(Width::from_log2(u64::from(w.log2())), w);
            assert!(w.fits(mask));
            assert_eq!(w.fits(mask.wrapping_add(1)), w == Width::Qword, "{w:?}");
        }
        for bytes in [0, 3, 5, 6, 7, 9, 16, 255] {
            assert_eq!(Width::from_bytes(bytes), None, "{bytes}");
        }
    }

    #[test]
    fn a_good_doorbell_passes() {
        assert_eq!(validate(&event_bell(0, 0, 0x100, Width::Dword, Match::Value(0xffff_ffff)), &view()), Ok(()));
        let both = Doorbell {
            action: Action {
                write: Some(DeviceWrite { bar: 4, offset: 0xff8, width: Width::Qword, value: WriteValue::Forward }),
                event: Some(3),
            },
            ..event_bell(0, 0, 0x3ffc, Width::Dword, Match::Any)
        };
        assert_eq!(validate(&both, &view()), Ok(()), "last dword of BAR 0, last qword of BAR 4");
    }

    #[test]
    fn device_slot_is_checked_first() {
        let d = event_bell(MAX_DEVICES as u16, 9, 3, Width::Qword, Match::Value(u64::MAX));
        assert_eq!(validate(&d, &view()), invalid(Reason::DeviceSlot));
        assert_eq!(
            validate(&event_bell(u16::MAX, 0, 0, Width::Byte, Match::Any), &view()),
            invalid(Reason::DeviceSlot)
        );
        let last = event_bell(MAX_DEVICES as u16 - 1, 0, 0, Width::Byte, Match::Any);
        assert_eq!(validate(&last, &view()), Ok(()));
    }

    #[test]
    fn doorbell_range_rules() {
        let v = view();
        let check = |bar, offset, width| validate(&event_bell(1, bar, offset, width, Match::Any), &v);
        let fault = |f| invalid(Reason::Doorbell(f));
        for bar in [6, 7, 8, 0xff] {
            assert_eq!(check(bar, 0, Width::Byte), fault(RangeFault::BarIndex), "bar {bar}");
        }
        assert_eq!(check(1, 0, Width::Byte), fault(RangeFault::MissingBar));
        assert_eq!(check(5, 0, Width::Byte), fault(RangeFault::MissingBar));
        assert_eq!(check(2, 0, Width::Byte), fault(RangeFault::NotMemoryBar));
        assert_eq!(check(0, 2, Width::Dword), fault(RangeFault::Misaligned));
        assert_eq!(check(0, 4, Width::Qword), fault(RangeFault::Misaligned));
        assert_eq!(check(0, 1, Width::Word), fault(RangeFault::Misaligned));
        assert_eq!(check(0, 3, Width::Byte), Ok(()), "bytes are always aligned");
        assert_eq!(check(0, 0x4000, Width::Byte), fault(RangeFault::BeyondBar));
        assert_eq!(check(0, 0x3ff8, Width::Qword), Ok(()));
        assert_eq!(check(4, 0x1000, Width::Dword), fault(RangeFault::BeyondBar));
        assert_eq!(check(0, u64::MAX - 7, Width::Qword), fault(RangeFault::BeyondBar), "offset + 8 overflows");
        assert_eq!(check(0, u64::MAX, Width::Byte), fault(RangeFault::BeyondBar), "offset + 1 overflows");
    }

    #[test]
    fn msix_table_and_pba_are_off_limits() {
        let v = view();
        let check = |offset, width| validate(&event_bell(1, 0, offset, width, Match::Any), &v);
        let fault = |f| invalid(Reason::Doorbell(f));
        assert_eq!(check(0x1ff8, Width::Qword), Ok(()), "ends right before the table");
        assert_eq!(check(0x2000, Width::Byte), fault(RangeFault::OverlapsMsixTable));
        assert_eq!(check(0x20ff, Width::Byte), fault(RangeFault::OverlapsMsixTable), "last table byte");
        assert_eq!(check(0x20f8, Width::Qword), fault(RangeFault::OverlapsMsixTable));
        assert_eq!(check(0x2100, Width::Qword), Ok(()), "starts right after the table");
        assert_eq!(check(0x2ffc, Width::Dword), Ok(()), "ends right before the PBA");
        assert_eq!(check(0x3000, Width::Qword), fault(RangeFault::OverlapsPba));
        assert_eq!(check(0x3006, Width::Word), fault(RangeFault::OverlapsPba));
        assert_eq!(check(0x3008, Width::Byte), Ok(()), "right after the PBA");
        // The same offsets in another BAR are fine: the regions are per BAR.
        assert_eq!(validate(&event_bell(1, 4, 0x0, Width::Qword, Match::Any), &v), Ok(()));
        let mut straddle = view();
        if let Some(m) = straddle.msix.as_mut() {
            m.table = Region { bar: 4, offset: 0x7fc, len: 8 };
        }
        let check4 = |offset, width| validate(&event_bell(1, 4, offset, width, Match::Any), &straddle);
        assert_eq!(check4(0x7f8, Width::Qword), fault(RangeFault::OverlapsMsixTable), "partial overlap at the start");
        assert_eq!(check4(0x800, Width::Qword), fault(RangeFault::OverlapsMsixTable), "partial overlap at the end");
        assert_eq!(check4(0x808, Width::Qword), Ok(()));
        // A zero-length region and a region near u64::MAX never misbehave.
        let mut odd = view();
        if let Some(m) = odd.msix.as_mut() {
            m.table = Region { bar: 0, offset: 0x100, len: 0 };
            m.pba = Region { bar: 0, offset: u64::MAX, len: u64::MAX };
        }
        assert_eq!(validate(&event_bell(1, 0, 0x100, Width::Qword, Match::Any), &odd), Ok(()));
        // Without MSI-X, nothing is off limits.
        let plain = DeviceView { msix: None, ..view() };
        assert_eq!(validate(&event_bell(1, 0, 0x2000, Width::Qword, Match::Any), &plain), Ok(()));
    }

    #[test]
    fn match_value_must_fit() {
        let v = view();
        for (w, ok, bad) in
            [(Width::Byte, 0xff, 0x100), (Width::Word, 0xffff, 0x1_0000), (Width::Dword, 0xffff_ffff, 0x1_0000_0000)]
        {
            assert_eq!(validate(&event_bell(0, 0, 0, w, Match::Value(ok)), &v), Ok(()));
            assert_eq!(validate(&event_bell(0, 0, 0, w, Match::Value(bad)), &v), invalid(Reason::MatchTooWide));
        }
        assert_eq!(validate(&event_bell(0, 0, 0, Width::Qword, Match::Value(u64::MAX)), &v), Ok(()));
    }

    #[test]
    fn an_action_is_required() {
        let mut d = event_bell(0, 0, 0, Width::Dword, Match::Any);
        d.action = Action { write: None, event: None };
        assert_eq!(validate(&d, &view()), invalid(Reason::NoAction));
        d.action.event = Some(0);
        assert_eq!(validate(&d, &view()), Ok(()), "event 0 is a valid id");
    }

    #[test]
    fn write_target_rules() {
        let v = view();
        let target = |bar, offset, width| {
            validate(&with_write(DeviceWrite { bar, offset, width, value: WriteValue::Forward }), &v)
        };
        let fault = |f| invalid(Reason::WriteTarget(f));
        assert_eq!(target(0, 0x200, Width::Dword), Ok(()));
        assert_eq!(target(6, 0, Width::Dword), fault(RangeFault::BarIndex));
        assert_eq!(target(1, 0, Width::Dword), fault(RangeFault::MissingBar));
        assert_eq!(target(2, 0, Width::Dword), fault(RangeFault::NotMemoryBar));
        assert_eq!(target(0, 0x201, Width::Word), fault(RangeFault::Misaligned));
        assert_eq!(target(4, 0xffc, Width::Qword), fault(RangeFault::Misaligned));
        assert_eq!(target(4, 0x1000, Width::Byte), fault(RangeFault::BeyondBar));
        assert_eq!(target(0, u64::MAX - 3, Width::Dword), fault(RangeFault::BeyondBar));
        assert_eq!(target(0, 0x2010, Width::Dword), fault(RangeFault::OverlapsMsixTable));
        assert_eq!(target(0, 0x3004, Width::Dword), fault(RangeFault::OverlapsPba));
        // The doorbell's own range is checked before its target.
        let mut d = with_write(DeviceWrite { bar: 0, offset: 0x2000, width: Width::Dword, value: WriteValue::Forward });
        d.offset = 0x3000;
        assert_eq!(validate(&d, &v), invalid(Reason::Doorbell(RangeFault::OverlapsPba)));
    }

    #[test]
    fn fixed_value_must_fit_the_write() {
        let v = view();
        let fixed = |width, value| {
            validate(&with_write(DeviceWrite { bar: 0, offset: 0x10, width, value: WriteValue::Fixed(value) }), &v)
        };
        assert_eq!(fixed(Width::Byte, 0xff), Ok(()));
        assert_eq!(fixed(Width::Byte, 0x100), invalid(Reason::FixedTooWide));
        assert_eq!(fixed(Width::Word, 0x1_0000), invalid(Reason::FixedTooWide));
        assert_eq!(fixed(Width::Dword, 1 << 32), invalid(Reason::FixedTooWide));
        assert_eq!(fixed(Width::Qword, u64::MAX), Ok(()));
        // The fixed value is measured against the write's width, not the doorbell's.
        let mut d =
            with_write(DeviceWrite { bar: 0, offset: 0x10, width: Width::Qword, value: WriteValue::Fixed(1 << 40) });
        d.width = Width::Byte;
        d.offset = 0x101;
        assert_eq!(validate(&d, &v), Ok(()));
    }

    #[test]
    fn resolve_fixed_and_forward() {
        let fwd = DeviceWrite { bar: 4, offset: 0x10, width: Width::Word, value: WriteValue::Forward };
        assert_eq!(fwd.resolve(0x1234_5678).value, 0x5678, "truncated to the write width");
        assert_eq!(fwd.resolve(0xab).value, 0xab, "zero-extended");
        let r = fwd.resolve(1);
        assert_eq!((r.bar, r.offset, r.width), (4, 0x10, Width::Word));
        let q = DeviceWrite { width: Width::Qword, ..fwd };
        assert_eq!(q.resolve(u64::MAX).value, u64::MAX);
        let fixed = DeviceWrite { value: WriteValue::Fixed(0x42), ..fwd };
        assert_eq!(fixed.resolve(0xffff).value, 0x42, "fixed ignores the guest's value");
    }

    #[test]
    fn region_intersection() {
        let r = Region { bar: 3, offset: 0x10, len: 0x10 };
        assert!(r.intersects(3, 0x1f, 1));
        assert!(!r.intersects(3, 0x20, 8));
        assert!(!r.intersects(3, 0x8, 8));
        assert!(r.intersects(3, 0x8, 9));
        assert!(!r.intersects(2, 0x10, 8), "other BAR");
        assert!(!r.intersects(3, 0x10, 0), "empty range");
        let top = Region { bar: 0, offset: u64::MAX, len: u64::MAX };
        assert!(top.intersects(0, u64::MAX, 1));
    }
}
