//! Slot choice and admission: which llama.cpp slot a request goes to, and
//! how many requests run at once.
//!
//! The daemon is the child's only client and sets `id_slot` on every request,
//! so it knows what each slot's KV cache holds: the prompt of the last request
//! it sent there. A new request goes to the free slot whose contents share
//! the longest prefix with its prompt (llama.cpp reuses exactly that prefix),
//! else to the least recently used free slot. At most `slots` requests are in
//! flight; the rest wait in FIFO order, up to `max_queue` of them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A shared prefix shorter than this many bytes is template boilerplate
/// (`[{"role":"system","content":"`), not reusable context.
pub const MIN_USEFUL_PREFIX: usize = 256;

/// What the daemon believes one slot holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotState {
    pub busy: bool,
    /// The prompt key of the last request sent to this slot.
    pub holds: Arc<str>,
    pub last_used: Option<Instant>,
}

/// The slot-choice policy: the free slot with the longest useful common
/// prefix, ties and no-prefix cases to the least recently used free slot.
/// Returns `None` when every slot is busy.
pub fn choose_slot(slots: &[SlotState], prompt: &str) -> Option<usize> {
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.busy)
        .map(|(i, s)| {
            let n = common_prefix_len(&s.holds, prompt);
            let useful = if n >= MIN_USEFUL_PREFIX { n } else { 0 };
            // Longer prefix wins; on a tie the older `last_used` (None is
            // oldest) wins, hence Reverse.
            (useful, std::cmp::Reverse(s.last_used), i)
        })
        .max()
        .map(|(_, _, i)| i)
}

/// Length in bytes of the common prefix of `a` and `b`, on a char boundary.
pub fn common_prefix_len(a: &str, b: &str) -> usize {
    let mut n = a
        .as_bytes()
        .iter()
        .zip(b.as_bytes())
        .position(|(x, y)| x != y)
        .unwrap_or_else(|| a.len().min(b.len()));
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    n
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitError {
    /// `max_queue` requests are already waiting.
    QueueFull,
    /// No slot came free within the timeout.
    Timeout,
}

struct Table {
    slots: Vec<SlotState>,
    /// The child the contents belong to; a new child starts empty.
    child_pid: Option<u32>,
}

pub struct Scheduler {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queue: usize,
    table: Mutex<Table>,
}

impl Scheduler {
    pub fn new(slots: usize, max_queue: usize) -> Arc<Scheduler> {
        let slots = slots.max(1);
        Arc::new(Scheduler {
            permits: Arc::new(Semaphore::new(slots)),
            waiting: AtomicUsize::new(0),
            max_queue,
            table: Mutex::new(Table {
                slots: vec![SlotState::default(); slots],
                child_pid: None,
            }),
        })
    }

    /// Waits (FIFO) for a free slot, picks one for `prompt` and marks it busy
    /// with the prompt as its new contents.
    pub async fn acquire(
        self: &Arc<Self>,
        prompt: &Arc<str>,
        child_pid: u32,
        timeout: Duration,
    ) -> Result<SlotLease, AdmitError> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    return Err(AdmitError::QueueFull);
                }
                let _queued = QueuedGuard(&self.waiting);
                match tokio::time::timeout(timeout, self.permits.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => return Err(AdmitError::Timeout),
                }
            }
        };
        let mut table = self.lock();
        if table.child_pid != Some(child_pid) {
            // A new child: whatever the old one cached is gone.
            table.child_pid = Some(child_pid);
            for slot in &mut table.slots {
                slot.holds = Arc::from("");
            }
        }
        let slot = choose_slot(&table.slots, prompt)
            .expect("a permit guarantees a free slot: permits == slots");
        let state = &mut table.slots[slot];
        let reusable = common_prefix_len(&state.holds, prompt);
        state.busy = true;
        state.holds = prompt.clone();
        state.last_used = Some(Instant::now());
        drop(table);
        Ok(SlotLease {
            scheduler: self.clone(),
            slot,
            expected_prefix_bytes: reusable,
            _permit: permit,
        })
    }

    /// Requests in flight.
    pub fn busy(&self) -> usize {
        self.lock().slots.iter().filter(|s| s.busy).count()
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    pub fn slot_count(&self) -> usize {
        self.lock().slots.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct QueuedGuard<'a>(&'a AtomicUsize);

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A slot held by one request; dropping it frees the slot.
pub struct SlotLease {
    scheduler: Arc<Scheduler>,
    slot: usize,
    /// Bytes of the prompt the slot already held when it was chosen.
    pub expected_prefix_bytes: usize,
    _permit: OwnedSemaphorePermit,
}

impl SlotLease {
    pub fn id(&self) -> usize {
        self.slot
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let mut table = self.scheduler.lock();
        if let Some(state) = table.slots.get_mut(self.slot) {
            state.busy = false;
            state.last_used = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(holds: &str, busy: bool, age_s: u64) -> SlotState {
        SlotState {
            busy,
            holds: Arc::from(holds),
            last_used: Instant::now().checked_sub(Duration::from_secs(age_s)),
        }
    }

    #[test]
    fn common_prefix() {
        assert_eq!(common_prefix_len("abcdef", "abcxyz"), 3);
        assert_eq!(common_prefix_len("abc", "abcdef"), 3);
        assert_eq!(common_prefix_len("", "abc"), 0);
        assert_eq!(common_prefix_len("héllo", "hélp"), 4);
        assert_eq!(common_prefix_len("é", "è"), 0);
    }

    #[test]
    fn longest_useful_prefix_wins() {
        let docs = "d".repeat(1000);
        let slots = vec![
            slot(&format!("{docs} question one"), false, 10),
            slot("something else entirely", false, 100),
        ];
        assert_eq!(
            choose_slot(&slots, &format!("{docs} question two")),
            Some(0)
        );
    }

    #[test]
    fn short_prefixes_do_not_count_and_lru_decides() {
        let slots = vec![
            slot("[{\"role\":\"system\",\"content\":\"A", false, 5),
            slot("[{\"role\":\"system\",\"content\":\"B", false, 50),
        ];
        assert_eq!(
            choose_slot(&slots, "[{\"role\":\"system\",\"content\":\"C"),
            Some(1)
        );
        let fresh = vec![slot("x", false, 5), SlotState::default()];
        assert_eq!(
            choose_slot(&fresh, "y"),
            Some(1),
            "a never-used slot is the oldest"
        );
    }

    #[test]
    fn busy_slots_are_skipped() {
        let docs = "d".repeat(1000);
        let slots = vec![slot(&docs, true, 1), slot("", false, 1)];
        assert_eq!(choose_slot(&slots, &docs), Some(1));
        assert_eq!(choose_slot(&[slot("", true, 1)], "x"), None);
    }

    #[tokio::test]
    async fn admission_is_bounded_and_frees_on_drop() {
        let scheduler = Scheduler::new(1, 1);
        let first = scheduler
            .acquire(&Arc::from("a"), 1, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(scheduler.busy(), 1);
        // One may wait; the next is refused at once.
        let waiter = {
            let s = scheduler.clone();
            tokio::spawn(async move {
                s.acquire(&Arc::from("b"), 1, Duration::from_secs(30))
                    .await
                    .map(|l| l.id())
            })
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while scheduler.queued() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(
            scheduler
                .acquire(&Arc::from("c"), 1, Duration::from_secs(5))
                .await
                .err(),
            Some(AdmitError::QueueFull)
        );
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(0));
        assert_eq!(scheduler.queued(), 0);
        assert_eq!(scheduler.busy(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_times_out() {
        let scheduler = Scheduler::new(1, 4);
        let _held = scheduler
            .acquire(&Arc::from("a"), 1, Duration::from_secs(5))
            .await
            .unwrap();
        let err = scheduler
            .acquire(&Arc::from("b"), 1, Duration::from_secs(5))
            .await
            .err();
        assert_eq!(err, Some(AdmitError::Timeout));
        assert_eq!(scheduler.queued(), 0);
    }

    #[tokio::test]
    async fn a_new_child_starts_with_empty_slots() {
        let scheduler = Scheduler::new(2, 4);
        let docs: Arc<str> = Arc::from("d".repeat(1000));
        let lease = scheduler
            .acquire(&docs, 7, Duration::from_secs(1))
            .await
            .unwrap();
        let first = lease.id();
        drop(lease);
        let again = scheduler
            .acquire(&docs, 7, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(again.id(), first);
        assert_eq!(again.expected_prefix_bytes, docs.len());
        drop(again);
        let after_restart = scheduler
            .acquire(&docs, 8, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(after_restart.expected_prefix_bytes, 0);
    }
}
