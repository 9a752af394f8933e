//! Sharing between the vCPUs of a partition: [`Once`], a value published once by one vCPU and
//! read by the others (a device handle set up by vCPU 0, say).

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU8, Ordering};

/// `Once` states.
const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

/// A value written at most once and then read by anyone.
#[derive(Debug)]
pub struct Once<T> {
    state: AtomicU8,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY:
// 1. The value is written only by the one caller that moved `state` from EMPTY to WRITING, and
//    read (shared) only after `state` is READY (Release/Acquire), so there is no data race.
// 2. It is handed to other vCPUs (`T: Send`) and shared among them (`T: Sync`).
unsafe impl<T: Send + Sync> Sync for Once<T> {}

impl<T> Once<T> {
    /// An empty cell.
    pub const fn new() -> Self {
        Self { state: AtomicU8::new(EMPTY), value: UnsafeCell::new(MaybeUninit::uninit()) }
    }

    /// Publishes `value`; gives it back if a value was already published (or is being).
    pub fn set(&self, value: T) -> Result<(), T> {
        if self.state.compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return Err(value);
        }
        // SAFETY:
        // 1. This caller alone won the EMPTY -> WRITING transition, and readers look only after
        //    READY: nobody else accesses the cell now.
        unsafe { (*self.value.get()).write(value) };
        self.state.store(READY, Ordering::Release);
        Ok(())
    }

    /// The published value, if any.
    pub fn get(&self) -> Option<&T> {
        if self.state.load(Ordering::Acquire) != READY {
            return None;
        }
        // SAFETY:
        // 1. READY is stored (Release) only after the value was written, and the value is never
        //    written again: it is initialized and only shared from here on.
        Some(unsafe { (*self.value.get()).assume_init_ref() })
    }
}

impl<T> Drop for Once<T> {
    fn drop(&mut self) {
        if *self.state.get_mut() == READY {
            // SAFETY:
            // 1. READY means the value was written; `&mut self` means nobody else holds it.
            unsafe { self.value.get_mut().assume_init_drop() };
        }
    }
}

impl<T> Default for Once<T> {
    fn default() -> Self {
        Self::new()
    }
}
