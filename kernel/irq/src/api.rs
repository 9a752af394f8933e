//! VFIO's `GET_IRQ_INFO` / `SET_IRQS` semantics over the hypercall arguments
//! (`conduit_abi::hypercall::{IRQ_INFO, SET_IRQS}`, constants in `conduit_abi::irq`): parse and
//! validate, then apply through [`IrqControl`], the narrow trait the kernel implements per
//! device. Every malformed request is an [`IrqError`] (mapped to a `conduit_abi::error` code);
//! nothing here panics on any argument.
//!
//! A `SET_IRQS` call goes: [`SetIrqs::parse`] (arguments only) → the kernel reads
//! [`SetIrqs::data_bytes`] bytes at `data_gpa` (`EFAULT` if it cannot) → [`apply`].
//!
//! Checks, in this order (the first failing one is returned):
//! 1. `index` is not an `irq::INDEX_*` → `BadIndex` (EINVAL);
//! 2. `flags` has a bit outside `DATA_MASK | ACTION_MASK_ALL`, or not exactly one `DATA_*`,
//!    or not exactly one `ACTION_*`, or `DATA_EVENT` without `ACTION_TRIGGER` → `BadFlags`
//!    (EINVAL);
//! 3. `count > MAX_COUNT`, `start + count` overflows, `start >= info.count`,
//!    `start + count > info.count` (so every request on an index that is not offered, INTx),
//!    or `count == 0` other than `DATA_NONE | ACTION_TRIGGER` → `BadRange` (EINVAL);
//! 4. `ACTION_MASK`/`ACTION_UNMASK` on an index without `FLAG_MASKABLE` → `NotMaskable`
//!    (EINVAL);
//! 5. (`apply`) data not exactly `data_bytes()` long, a bool byte other than 0/1, an event
//!    entry that is neither `UNBIND` nor a `binding(vcpu, vector)` with vector ≥ 16 →
//!    `BadData` (EINVAL); the whole data is checked before anything is applied;
//! 6. (`apply`) mask, unmask or a software trigger on MSI/MSI-X while that index is disabled
//!    → `NotEnabled` (EINVAL);
//! 7. (`apply`) binding events on MSI while MSI-X is enabled or the reverse → `Busy` (EBUSY);
//!    on MSI while enabled with fewer vectors than `start + count` (NORESIZE: MSI cannot
//!    grow while enabled) → `Busy` (EBUSY). MSI-X is never refused for its size: it grows
//!    vector by vector while enabled (dynamic MSI-X).
//!
//! `count == 0` with `DATA_NONE | ACTION_TRIGGER` disables the index (idempotent). Errors
//! from the device (`IrqControl`) are passed through; when binding events enabled MSI/MSI-X
//! and a later binding fails, the index is disabled again (the call frees what it allocated).

use crate::context::MaskState;
use conduit_abi::irq;

/// An interrupt index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqIndex {
    /// Legacy INTx (not offered by Conduit: count 0).
    Intx,
    /// MSI.
    Msi,
    /// MSI-X.
    Msix,
    /// Error notification (software-signalled).
    Err,
    /// Device request (software-signalled).
    Req,
}

impl IrqIndex {
    /// Every index, in ABI order.
    pub const ALL: [Self; 5] = [Self::Intx, Self::Msi, Self::Msix, Self::Err, Self::Req];

    /// The index an ABI number names.
    pub const fn from_abi(index: u64) -> Option<Self> {
        match index {
            irq::INDEX_INTX => Some(Self::Intx),
            irq::INDEX_MSI => Some(Self::Msi),
            irq::INDEX_MSIX => Some(Self::Msix),
            irq::INDEX_ERR => Some(Self::Err),
            irq::INDEX_REQ => Some(Self::Req),
            _ => None,
        }
    }

    /// The ABI number.
    pub const fn abi(self) -> u64 {
        match self {
            Self::Intx => irq::INDEX_INTX,
            Self::Msi => irq::INDEX_MSI,
            Self::Msix => irq::INDEX_MSIX,
            Self::Err => irq::INDEX_ERR,
            Self::Req => irq::INDEX_REQ,
        }
    }

    /// MSI or MSI-X (enabled as a whole, mutually exclusive).
    pub const fn is_msi_family(self) -> bool {
        matches!(self, Self::Msi | Self::Msix)
    }
}

/// What an index offers (`IRQ_INFO`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IrqInfo {
    /// Vectors.
    pub count: u32,
    /// `irq::FLAG_*`.
    pub flags: u32,
}

const fn flag(f: u64) -> u32 {
    f as u32
}

impl IrqInfo {
    /// Not offered (INTx: Conduit guests use MSI or MSI-X).
    pub const NOT_OFFERED: Self = Self { count: 0, flags: 0 };

    /// MSI with `count` vectors: EVENTFD | NORESIZE, MASKABLE only with per-vector masking.
    pub const fn msi(count: u32, per_vector_mask: bool) -> Self {
        let maskable = if per_vector_mask { flag(irq::FLAG_MASKABLE) } else { 0 };
        Self { count, flags: flag(irq::FLAG_EVENTFD) | flag(irq::FLAG_NORESIZE) | maskable }
    }

    /// MSI-X with `count` vectors: EVENTFD | MASKABLE, never NORESIZE.
    pub const fn msix(count: u32) -> Self {
        Self { count, flags: flag(irq::FLAG_EVENTFD) | flag(irq::FLAG_MASKABLE) }
    }

    /// A software-signalled index (ERR, REQ): one vector, EVENTFD.
    pub const fn software() -> Self {
        Self { count: 1, flags: flag(irq::FLAG_EVENTFD) }
    }

    /// Whether MASK/UNMASK apply.
    pub const fn maskable(self) -> bool {
        self.flags as u64 & irq::FLAG_MASKABLE != 0
    }

    /// The `IRQ_INFO` result: `count | flags << 32`.
    pub const fn encode(self) -> u64 {
        self.count as u64 | (self.flags as u64) << 32
    }
}

/// A `SET_IRQS` data kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataKind {
    /// No data.
    None,
    /// One byte (0 or 1) per vector: act on the vectors whose byte is 1.
    Bool,
    /// One little-endian u64 binding (or `UNBIND`) per vector.
    Event,
}

/// A `SET_IRQS` action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Mask.
    Mask,
    /// Unmask.
    Unmask,
    /// Signal in software; with event data, bind; with count 0 and no data, disable.
    Trigger,
}

/// An event binding: deliver to guest vector `vector` of vCPU `vcpu` (of the caller's
/// partition).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventBinding {
    /// vCPU index.
    pub vcpu: u8,
    /// Guest vector (≥ 16).
    pub vector: u8,
}

impl EventBinding {
    /// Decodes one event entry: `Ok(None)` for `UNBIND`.
    pub const fn decode(raw: u64) -> Result<Option<Self>, IrqError> {
        if raw == irq::UNBIND {
            return Ok(None);
        }
        if raw >> 16 != 0 || (raw as u8) < crate::msi::FIRST_VECTOR {
            return Err(IrqError::BadData);
        }
        Ok(Some(Self { vcpu: (raw >> 8) as u8, vector: raw as u8 }))
    }

    /// The ABI encoding (`irq::binding`).
    pub const fn encode(self) -> u64 {
        irq::binding(self.vcpu, self.vector)
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqError {
    /// Unknown index (EINVAL).
    BadIndex,
    /// Malformed flags (EINVAL).
    BadFlags,
    /// `start`/`count` out of range (EINVAL).
    BadRange,
    /// Mask/unmask on an index that cannot mask (EINVAL).
    NotMaskable,
    /// Malformed data (EINVAL); also a binding the device refuses (unknown vCPU).
    BadData,
    /// The index is disabled (EINVAL).
    NotEnabled,
    /// Another index is enabled, or MSI would have to grow while enabled (EBUSY).
    Busy,
    /// Out of contexts or host vectors (ENOSPC).
    NoSpace,
    /// No such device (ENODEV).
    NoDevice,
    /// The data could not be read from guest memory (EFAULT).
    Fault,
}

impl IrqError {
    /// The `conduit_abi::error` code.
    pub const fn code(self) -> i64 {
        use conduit_abi::error::{EBUSY, EFAULT, EINVAL, ENODEV, ENOSPC};
        match self {
            Self::BadIndex | Self::BadFlags | Self::BadRange | Self::NotMaskable | Self::BadData | Self::NotEnabled => {
                EINVAL
            }
            Self::Busy => EBUSY,
            Self::NoSpace => ENOSPC,
            Self::NoDevice => ENODEV,
            Self::Fault => EFAULT,
        }
    }
}

impl From<IrqError> for i64 {
    fn from(e: IrqError) -> Self {
        e.code()
    }
}

/// A device's interrupt control, implemented by the kernel per device. Vector numbers are
/// within the index's `info().count` (the API checked them).
pub trait IrqControl {
    /// What `index` offers; build it with the `IrqInfo` constructors.
    fn info(&self, index: IrqIndex) -> IrqInfo;

    /// Vectors enabled at `index` now (0: disabled). MSI: the enabled count; MSI-X: nonzero
    /// while enabled. Not consulted for INTx/ERR/REQ.
    fn enabled(&self, index: IrqIndex) -> u32;

    /// Enables MSI or MSI-X with at least `count` vectors (MSI rounds up to a power of two).
    fn enable(&mut self, index: IrqIndex, count: u32) -> Result<(), IrqError>;

    /// Disables `index`: every binding dropped, every context freed.
    fn disable(&mut self, index: IrqIndex);

    /// Masks or unmasks vector `vector` (unmasking delivers a pending signal once).
    fn mask(&mut self, index: IrqIndex, vector: u32, state: MaskState) -> Result<(), IrqError>;

    /// Signals vector `vector` in software.
    fn trigger(&mut self, index: IrqIndex, vector: u32) -> Result<(), IrqError>;

    /// Binds vector `vector` to an event target, or unbinds it (`None`).
    fn bind(&mut self, index: IrqIndex, vector: u32, binding: Option<EventBinding>) -> Result<(), IrqError>;
}

/// `IRQ_INFO`: `count | flags << 32` for `index`. NORESIZE is forced on for MSI and off for
/// MSI-X, whatever the device says (DESIGN.md: Conduit owns the MSI-X table, so growing MSI-X
/// never needs MSI-X off).
pub fn irq_info(ctrl: &(impl IrqControl + ?Sized), index: u64) -> Result<u64, IrqError> {
    let index = IrqIndex::from_abi(index).ok_or(IrqError::BadIndex)?;
    Ok(sanitized_info(ctrl, index).encode())
}

fn sanitized_info(ctrl: &(impl IrqControl + ?Sized), index: IrqIndex) -> IrqInfo {
    let mut info = ctrl.info(index);
    let noresize = flag(irq::FLAG_NORESIZE);
    match index {
        IrqIndex::Msi => info.flags |= noresize,
        IrqIndex::Msix => info.flags &= !noresize,
        _ => {}
    }
    info
}

/// A validated `SET_IRQS` request (only `parse` builds one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SetIrqs {
    index: IrqIndex,
    start: u32,
    count: u32,
    data: DataKind,
    action: Action,
}

impl SetIrqs {
    /// Validates the arguments (checks 1–4 of the module doc) against `ctrl`'s info.
    pub fn parse(
        ctrl: &(impl IrqControl + ?Sized),
        index: u64,
        start: u64,
        count: u64,
        flags: u64,
    ) -> Result<Self, IrqError> {
        let index = IrqIndex::from_abi(index).ok_or(IrqError::BadIndex)?;
        if flags & !(irq::DATA_MASK | irq::ACTION_MASK_ALL) != 0 {
            return Err(IrqError::BadFlags);
        }
        let data = match flags & irq::DATA_MASK {
            irq::DATA_NONE => DataKind::None,
            irq::DATA_BOOL => DataKind::Bool,
            irq::DATA_EVENT => DataKind::Event,
            _ => return Err(IrqError::BadFlags),
        };
        let action = match flags & irq::ACTION_MASK_ALL {
            irq::ACTION_MASK => Action::Mask,
            irq::ACTION_UNMASK => Action::Unmask,
            irq::ACTION_TRIGGER => Action::Trigger,
            _ => return Err(IrqError::BadFlags),
        };
        if data == DataKind::Event && action != Action::Trigger {
            return Err(IrqError::BadFlags);
        }
        let info = sanitized_info(ctrl, index);
        let end = start.checked_add(count).ok_or(IrqError::BadRange)?;
        if count > irq::MAX_COUNT || start >= u64::from(info.count) || end > u64::from(info.count) {
            return Err(IrqError::BadRange);
        }
        if count == 0 && !(data == DataKind::None && action == Action::Trigger) {
            return Err(IrqError::BadRange);
        }
        if matches!(action, Action::Mask | Action::Unmask) && !info.maskable() {
            return Err(IrqError::NotMaskable);
        }
        let (Ok(start), Ok(count)) = (u32::try_from(start), u32::try_from(count)) else {
            return Err(IrqError::BadRange);
        };
        Ok(Self { index, start, count, data, action })
    }

    /// The index.
    pub const fn index(&self) -> IrqIndex {
        self.index
    }
    /// First vector.
    pub const fn start(&self) -> u32 {
        self.start
    }
    /// Vectors.
    pub const fn count(&self) -> u32 {
        self.count
    }
    /// Data kind.
    pub const fn data(&self) -> DataKind {
        self.data
    }
    /// Action.
    pub const fn action(&self) -> Action {
        self.action
    }

    /// Whether this request disables the index (count 0, no data, trigger).
    pub const fn is_disable(&self) -> bool {
        self.count == 0
    }

    /// Bytes of data to read from `data_gpa` (0, `count`, or `8 * count`; at most
    /// `8 * MAX_COUNT`).
    pub const fn data_bytes(&self) -> usize {
        match self.data {
            DataKind::None => 0,
            DataKind::Bool => self.count as usize,
            DataKind::Event => self.count as usize * 8,
        }
    }
}

/// Applies a parsed request with its data (`data_bytes()` bytes read from the guest).
pub fn apply(ctrl: &mut (impl IrqControl + ?Sized), req: &SetIrqs, data: &[u8]) -> Result<(), IrqError> {
    if data.len() != req.data_bytes() {
        return Err(IrqError::BadData);
    }
    if req.is_disable() {
        ctrl.disable(req.index);
        return Ok(());
    }
    // Check all the data before acting on any of it.
    match req.data {
        DataKind::None => {}
        DataKind::Bool => {
            if data.iter().any(|&b| b > 1) {
                return Err(IrqError::BadData);
            }
        }
        DataKind::Event => {
            for raw in events(data) {
                EventBinding::decode(raw)?;
            }
        }
    }
    let vectors = req.start..req.start.saturating_add(req.count);
    // Vectors selected by the data (all of them without bool data).
    let selected = |i: u32| -> bool {
        req.data != DataKind::Bool
            || i.checked_sub(req.start).and_then(|k| data.get(k as usize)).is_some_and(|&b| b == 1)
    };
    match (req.action, req.data) {
        (Action::Mask | Action::Unmask, _) => {
            if req.index.is_msi_family() && ctrl.enabled(req.index) == 0 {
                return Err(IrqError::NotEnabled);
            }
            let state = if req.action == Action::Mask { MaskState::Masked } else { MaskState::Unmasked };
            for v in vectors.filter(|&v| selected(v)) {
                ctrl.mask(req.index, v, state)?;
            }
            Ok(())
        }
        (Action::Trigger, DataKind::None | DataKind::Bool) => {
            if req.index.is_msi_family() && ctrl.enabled(req.index) == 0 {
                return Err(IrqError::NotEnabled);
            }
            for v in vectors.filter(|&v| selected(v)) {
                ctrl.trigger(req.index, v)?;
            }
            Ok(())
        }
        (Action::Trigger, DataKind::Event) => bind_events(ctrl, req, data),
    }
}

/// The little-endian u64 entries of event data.
fn events(data: &[u8]) -> impl Iterator<Item = u64> + '_ {
    data.chunks_exact(8).map(|c| {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        u64::from_le_bytes(b)
    })
}

fn bind_events(ctrl: &mut (impl IrqControl + ?Sized), req: &SetIrqs, data: &[u8]) -> Result<(), IrqError> {
    let mut enabled_here = false;
    if req.index.is_msi_family() {
        let other = if req.index == IrqIndex::Msi { IrqIndex::Msix } else { IrqIndex::Msi };
        if ctrl.enabled(other) != 0 {
            return Err(IrqError::Busy);
        }
        let end = req.start.saturating_add(req.count);
        let now = ctrl.enabled(req.index);
        if now == 0 {
            ctrl.enable(req.index, end)?;
            enabled_here = true;
        } else if req.index == IrqIndex::Msi && end > now {
            return Err(IrqError::Busy);
        }
    }
    for (v, raw) in (req.start..).zip(events(data)) {
        let binding = EventBinding::decode(raw)?;
        if let Err(e) = ctrl.bind(req.index, v, binding) {
            if enabled_here {
                ctrl.disable(req.index);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// `SET_IRQS` in one call, for data already read: `parse` then `apply`.
pub fn set_irqs(
    ctrl: &mut (impl IrqControl + ?Sized),
    index: u64,
    start: u64,
    count: u64,
    flags: u64,
    data: &[u8],
) -> Result<(), IrqError> {
    let req = SetIrqs::parse(ctrl, index, start, count, flags)?;
    apply(ctrl, &req, data)
}

#[cfg(all(test, not(loom)))]
mod tests;
