//! The doorbell table, DESIGN.md's "guest doorbell write" source: a guest MMIO write that
//! matches a registered doorbell is turned, on the nested-page-fault exit, directly into a
//! device write and/or an event — VFIO's `VFIO_DEVICE_IOEVENTFD` with KVM's ioeventfd match
//! semantics, minus the eventfd hops.
//!
//! ```text
//!  guest write ──► NPF exit ──► kernel: decode, GPA → (device, BAR, offset) ──► Table::lookup
//!                                                                                 │
//!                              Hit { action } ◄───────────────────────────────────┘
//!                              ├─► device write (Fixed value, or Forward the guest's)
//!                              └─► event (emulated interrupt / device notification)
//! ```
//!
//! The control path ([`Table::add`], [`Table::remove`], [`Table::remove_device`]) applies the
//! registration rules ([`validate`]: device BARs only, never the MSI-X table or PBA, widths
//! 1/2/4/8, natural alignment) and the VFIO limits (duplicate → `EEXIST`, unknown →
//! `ENODEV`, per-device limit → `ENOSPC`). The data path ([`Table::lookup`]) is wait-free,
//! allocation-free and reads a bounded number of slots, whatever is registered.
//!
//! Modules:
//! - [`doorbell`]: the registration types, the device view, [`validate`];
//! - [`table`]: the table (layout, probe bound, seqlock: see its documentation);
//! - [`error`]: [`Error`], [`Reason`], [`RangeFault`] and their ABI codes.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod doorbell;
pub mod error;
mod sync;
pub mod table;

pub use doorbell::{
    Action, BARS, Bar, DeviceView, DeviceWrite, Doorbell, Match, MsixLayout, Region, ResolvedWrite, Width, WriteValue,
    validate,
};
pub use error::{Error, RangeFault, Reason};
pub use table::{
    DEFAULT_DEVICE_LIMIT, DEFAULT_SLOTS, DoorbellTable, EntryId, Hit, MAX_DEVICES, PROBE_LIMIT, Stats, Table,
};
