//! A spin lock that keeps interrupts off while held, so an interrupt handler on the same CPU
//! can never spin on a lock its own CPU holds. For control paths only: the interrupt and
//! doorbell data paths take no lock at all.

use core::ops::{Deref, DerefMut};
use x86_64::instructions::interrupts;

/// `spin::Mutex` + interrupts disabled while locked.
#[derive(Debug)]
pub struct IrqMutex<T> {
    inner: spin::Mutex<T>,
}

/// Holds the lock; restores the interrupt flag on drop.
#[derive(Debug)]
pub struct IrqGuard<'a, T> {
    guard: Option<spin::MutexGuard<'a, T>>,
    interrupts_were_enabled: bool,
}

impl<T> IrqMutex<T> {
    /// A new unlocked mutex.
    pub const fn new(value: T) -> Self {
        Self { inner: spin::Mutex::new(value) }
    }

    /// Disables interrupts, then spins until the lock is free.
    pub fn lock(&self) -> IrqGuard<'_, T> {
        let were = interrupts::are_enabled();
        interrupts::disable();
        IrqGuard { guard: Some(self.inner.lock()), interrupts_were_enabled: were }
    }

    /// Tries `attempts` times; `None` if the lock stayed held (for paths that must not wait
    /// forever, such as fatal-error reporting).
    pub fn try_lock_for(&self, attempts: u32) -> Option<IrqGuard<'_, T>> {
        let were = interrupts::are_enabled();
        interrupts::disable();
        for _ in 0..attempts {
            if let Some(g) = self.inner.try_lock() {
                return Some(IrqGuard { guard: Some(g), interrupts_were_enabled: were });
            }
            core::hint::spin_loop();
        }
        if were {
            interrupts::enable();
        }
        None
    }
}

impl<T> Deref for IrqGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // The guard is only taken out in `drop`.
        self.guard.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl<T> DerefMut for IrqGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.guard.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

impl<T> Drop for IrqGuard<'_, T> {
    fn drop(&mut self) {
        drop(self.guard.take());
        if self.interrupts_were_enabled {
            interrupts::enable();
        }
    }
}
