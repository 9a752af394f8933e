//! Drivers for the devices the test guests are given: QEMU's `edu` and NVMe controller
//! (passed through) and Conduit's emulated `notify` device.

pub mod edu;
pub mod notify;
pub mod nvme;
