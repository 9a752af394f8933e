//! Virtual machines on AMD SVM, the pure part: the VMCB, exit handling and interrupt
//! injection over a narrow environment trait, the virtual local APIC and pending-vector
//! bitmap, CPUID and MSR policy, the guest boot layout and initial state, guest page walks,
//! partition descriptions, and ELF and guest-bundle loading. The kernel supplies the hardware
//! half (`kernel/src/arch/svm.rs`, `kernel/src/vmm`).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod bundle;
pub mod cpuid;
pub mod elf;
pub mod guest;
pub mod memory;
pub mod mmio;
pub mod msr;
pub mod partition;
pub mod pcibus;
pub mod pending;
mod sync;
pub mod vcpu;
pub mod vdev;
pub mod vlapic;
pub mod vmcb;
pub mod walk;
