//! A backend that records every call, checks they balance, and fails when told to.

use super::Backend;
use crate::context::Target;
use crate::pool::ContextId;
use std::collections::BTreeMap;
use std::vec::Vec;

/// One backend call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Activate(u16, ContextId, Target),
    Retarget(u16, ContextId, Target, Target),
    Deactivate(u16, ContextId),
}

/// The fake's error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused;

#[derive(Debug, Default)]
pub struct FakeBackend {
    pub calls: Vec<Call>,
    /// Entries whose activation fails.
    pub fail_activate: u64,
    /// Retargets fail.
    pub fail_retarget: bool,
    /// What is live: index → (context, target the backend holds).
    pub live: BTreeMap<u16, (ContextId, Target)>,
    /// The hardware's PBA bits.
    pub hardware_pending: u64,
    pub activations: u64,
    pub deactivations: u64,
}

impl FakeBackend {
    pub fn take_calls(&mut self) -> Vec<Call> {
        core::mem::take(&mut self.calls)
    }
}

impl Backend for FakeBackend {
    type Error = Refused;

    fn activate(&mut self, index: u16, ctx: ContextId, target: Target) -> Result<(), Refused> {
        self.calls.push(Call::Activate(index, ctx, target));
        assert!(!self.live.contains_key(&index), "activate of a live entry {index}");
        assert!(self.live.values().all(|&(c, _)| c != ctx), "context {ctx:?} given twice");
        if index < 64 && self.fail_activate & 1 << index != 0 {
            return Err(Refused);
        }
        self.live.insert(index, (ctx, target));
        self.activations += 1;
        Ok(())
    }

    fn retarget(&mut self, index: u16, ctx: ContextId, old: Target, new: Target) -> Result<(), Refused> {
        self.calls.push(Call::Retarget(index, ctx, old, new));
        let entry = self.live.get_mut(&index).expect("retarget of an entry that is not live");
        assert_eq!(*entry, (ctx, old), "retarget from what the backend holds");
        if self.fail_retarget {
            return Err(Refused);
        }
        entry.1 = new;
        Ok(())
    }

    fn deactivate(&mut self, index: u16, ctx: ContextId) {
        self.calls.push(Call::Deactivate(index, ctx));
        let (c, _) = self.live.remove(&index).expect("deactivate of an entry that is not live");
        assert_eq!(c, ctx, "deactivate frees what activate allocated");
        self.deactivations += 1;
    }

    fn hardware_pending(&self, index: u16) -> bool {
        index < 64 && self.hardware_pending & 1 << index != 0
    }
}
