//! Why a registration or removal was refused, and the ABI error code each refusal maps to.
//!
//! The codes are `conduit_abi::error`'s (the hypercall ABI, POSIX numbers, negated). They are
//! repeated here rather than imported so this crate stays dependency-free; a unit test reads
//! `kernel/abi/src/lib.rs` and checks every one of them against it.

use core::fmt;

/// `conduit_abi::error::EINVAL`: an argument out of range.
pub const EINVAL: i64 = -22;
/// `conduit_abi::error::EEXIST`: already exists.
pub const EEXIST: i64 = -17;
/// `conduit_abi::error::ENODEV`: no such entry (VFIO answers an unknown de-assign with ENODEV).
pub const ENODEV: i64 = -19;
/// `conduit_abi::error::ENOSPC`: a limit was reached.
pub const ENOSPC: i64 = -28;

/// A refused doorbell operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Error {
    /// The registration breaks a rule; [`Reason`] says which (`EINVAL`).
    Invalid(Reason),
    /// A doorbell with the same device, BAR, offset and width whose match collides with this
    /// one is already registered: either side matches any value, or both match the same value
    /// (KVM ioeventfd semantics) (`EEXIST`).
    Exists,
    /// Removing a doorbell that is not registered under exactly that key (`ENODEV`, as VFIO).
    NotFound,
    /// The device already has `limit` doorbells (`ENOSPC`).
    NoSpace {
        /// The device's limit when the registration was refused.
        limit: u32,
    },
    /// The table is at capacity, or (vanishingly rarely below capacity, see
    /// [`crate::table`]) every slot of the key's probe window is taken (`ENOSPC`).
    TableFull,
}

impl Error {
    /// The ABI error code (`conduit_abi::error`): `Invalid` → `EINVAL`, `Exists` → `EEXIST`,
    /// `NotFound` → `ENODEV`, `NoSpace`/`TableFull` → `ENOSPC`.
    pub const fn code(self) -> i64 {
        match self {
            Self::Invalid(_) => EINVAL,
            Self::Exists => EEXIST,
            Self::NotFound => ENODEV,
            Self::NoSpace { .. } | Self::TableFull => ENOSPC,
        }
    }
}

impl From<Reason> for Error {
    fn from(reason: Reason) -> Self {
        Self::Invalid(reason)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(reason) => write!(f, "invalid doorbell: {reason}"),
            Self::Exists => f.write_str("a colliding doorbell is already registered"),
            Self::NotFound => f.write_str("no doorbell is registered under that key"),
            Self::NoSpace { limit } => write!(f, "the device already has its limit of {limit} doorbells"),
            Self::TableFull => f.write_str("the doorbell table is full"),
        }
    }
}

impl core::error::Error for Error {}

/// Which rule an `Invalid` registration broke. Checks run in the order of
/// [`crate::validate`]'s documentation and the first failing one is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The device slot is `>= MAX_DEVICES`: the table counts doorbells per device in an array
    /// of that size.
    DeviceSlot,
    /// The watched range (the guest write that rings the doorbell) is not acceptable.
    Doorbell(RangeFault),
    /// `Match::Value` has bits above the doorbell's width: no write of that width could ever
    /// carry it.
    MatchTooWide,
    /// The action neither writes to the device nor raises an event.
    NoAction,
    /// The device write's target is not acceptable.
    WriteTarget(RangeFault),
    /// `WriteValue::Fixed` has bits above the device write's width.
    FixedTooWide,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DeviceSlot => f.write_str("device slot out of range"),
            Self::Doorbell(fault) => write!(f, "doorbell range: {fault}"),
            Self::MatchTooWide => f.write_str("match value wider than the doorbell"),
            Self::NoAction => f.write_str("neither a device write nor an event"),
            Self::WriteTarget(fault) => write!(f, "device write target: {fault}"),
            Self::FixedTooWide => f.write_str("fixed value wider than the device write"),
        }
    }
}

/// What is wrong with a (BAR, offset, width) range — the watched range or a device write's
/// target; the same rules apply to both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RangeFault {
    /// BAR index `>= 6`. Config space and the ROM are not BARs: doorbells watch, and device
    /// writes reach, device BARs only.
    BarIndex,
    /// The device does not implement that BAR.
    MissingBar,
    /// An I/O-space BAR: doorbells are MMIO (nested page fault) exits.
    NotMemoryBar,
    /// The offset is not a multiple of the width.
    Misaligned,
    /// `offset + width` goes past the BAR's end (or overflows).
    BeyondBar,
    /// The range touches the MSI-X table, which only the hypervisor writes (core rule 2).
    OverlapsMsixTable,
    /// The range touches the MSI-X PBA, which only the hypervisor owns (core rule 2).
    OverlapsPba,
}

impl fmt::Display for RangeFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BarIndex => "BAR index is not 0-5",
            Self::MissingBar => "BAR not implemented",
            Self::NotMemoryBar => "not a memory BAR",
            Self::Misaligned => "offset not aligned to the width",
            Self::BeyondBar => "past the end of the BAR",
            Self::OverlapsMsixTable => "overlaps the MSI-X table",
            Self::OverlapsPba => "overlaps the MSI-X PBA",
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// The codes are the hypercall ABI's, read from its source so a renumbering there fails
    /// here.
    #[test]
    fn codes_match_the_abi() {
        let abi = include_str!("../../abi/src/lib.rs");
        for (name, code) in [("EINVAL", EINVAL), ("EEXIST", EEXIST), ("ENODEV", ENODEV), ("ENOSPC", ENOSPC)] {
            let line = format!("pub const {name}: i64 = {code};");
            assert!(abi.contains(&line), "kernel/abi lacks `{line}`");
        }
    }

    #[test]
    fn every_error_has_its_code() {
        let invalid = Error::Invalid(Reason::NoAction);
        assert_eq!(invalid.code(), -22);
        assert_eq!(Error::Exists.code(), -17);
        assert_eq!(Error::NotFound.code(), -19);
        assert_eq!(Error::NoSpace { limit: 1000 }.code(), -28);
        assert_eq!(Error::TableFull.code(), -28);
        assert_eq!(Error::from(Reason::DeviceSlot), Error::Invalid(Reason::DeviceSlot));
    }

    #[test]
    fn display_says_what() {
        let e = Error::Invalid(Reason::WriteTarget(RangeFault::OverlapsPba));
        assert_eq!(e.to_string(), "invalid doorbell: device write target: overlaps the MSI-X PBA");
        assert_eq!(Error::NoSpace { limit: 7 }.to_string(), "the device already has its limit of 7 doorbells");
        assert_eq!(
            Error::Invalid(Reason::Doorbell(RangeFault::BarIndex)).to_string(),
            "invalid doorbell: doorbell range: BAR index is not 0-5"
        );
    }
}
