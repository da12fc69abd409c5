//! Locks that stay usable after a panic elsewhere.
//!
//! A panic while a lock is held poisons it; the daemon's shared tables (the
//! slot table, conversations, sessions, the live index, the cost model's
//! figures) are caches of what is worth keeping, not records of what
//! happened, so every later request takes the lock anyway instead of
//! failing for the rest of the run. That is sound only while no code
//! panics half-way through changing one of them: code that holds one of
//! these locks must not `unwrap`, `expect` or index on data from a request.
//! One place still does: the clustering of `reorder::cluster` asserts its
//! own tree's invariants with `expect` while the live index is held, so a
//! bug there can leave the index half-changed; those asserts are to become
//! errors.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// `mutex.lock()`, poisoned or not.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `rwlock.read()`, poisoned or not.
pub fn read<T: ?Sized>(rwlock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    rwlock
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `rwlock.write()`, poisoned or not.
pub fn write<T: ?Sized>(rwlock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    rwlock
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_poisoned_lock_is_still_taken() {
        let shared = Arc::new(Mutex::new(1));
        let other = shared.clone();
        let _ = std::thread::spawn(move || {
            let _guard = other.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(shared.is_poisoned());
        *lock(&shared) += 1;
        assert_eq!(*lock(&shared), 2);
    }
}
