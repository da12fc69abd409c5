//! Slot choice and admission: which llama.cpp slot a request goes to, and
//! how many requests run at once.
//!
//! The daemon is the child's only client and sets `id_slot` on every request,
//! so it knows what each slot's KV cache holds: the prompt of the last request
//! it sent there. A new request goes to the free slot whose contents share
//! the longest prefix with its prompt (llama.cpp reuses exactly that prefix),
//! else to the least recently used free slot. At most `slots` requests are in
//! flight; the rest wait in FIFO order, up to `max_queue` of them.
//!
//! Behind the slots, llama-server keeps a host-RAM prompt cache
//! (`--cache-ram`): a slot's prompt is saved there before it is replaced,
//! and a request whose slot would keep less than half of its contents gets
//! the cached prompt that shares the most with it (if that is at least a
//! quarter of the cached prompt) loaded into the slot first. [`RamTier`]
//! models it for prompts with documents, so that choices and predictions
//! count those hits too.

use std::collections::VecDeque;
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
    /// What the last request sent to this slot put there.
    pub holds: SlotContents,
    pub last_used: Option<Instant>,
}

/// A slot's KV contents as the daemon tracks them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotContents {
    /// The prompt key (see `gateway::proxy::prompt_key`) of the last request.
    pub key: Arc<str>,
    /// For a request with documents: the documents in prompt order.
    pub blocks: Option<Arc<BlockSeq>>,
}

/// The context blocks (documents) of a prompt, in order, after a header
/// (everything before the first block).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSeq {
    pub header: u64,
    pub header_tokens: u32,
    pub blocks: Vec<Block>,
}

impl BlockSeq {
    /// Estimated tokens of the header and the blocks.
    pub fn tokens(&self) -> u64 {
        u64::from(self.header_tokens) + self.blocks.iter().map(|b| u64::from(b.tokens)).sum::<u64>()
    }

    /// Whether `other` starts with all of this sequence.
    pub fn is_prefix_of(&self, other: &BlockSeq) -> bool {
        self.header == other.header
            && self.blocks.len() <= other.blocks.len()
            && self
                .blocks
                .iter()
                .zip(&other.blocks)
                .all(|(a, b)| a.hash == b.hash)
    }
}

/// The daemon's model of llama-server's host-RAM prompt cache, for prompts
/// with documents: what slots held before they were overwritten, oldest
/// first, within a token budget (`--cache-ram` MiB over the model's KV bytes
/// per token) and at most [`MAX_RAM_ENTRIES`] entries. Every slot choice
/// scans it under the slot table's lock, so the count bound keeps that scan
/// short; forgetting old entries only makes predictions conservative.
/// Entries the RAM tier model keeps at most (see [`RamTier`]).
pub const MAX_RAM_ENTRIES: usize = 256;

#[derive(Debug, Default)]
pub struct RamTier {
    entries: VecDeque<Arc<BlockSeq>>,
    tokens: u64,
    max_tokens: u64,
}

impl RamTier {
    /// A tier holding up to `max_tokens`; 0 means llama-server has none.
    pub fn new(max_tokens: u64) -> RamTier {
        RamTier {
            max_tokens,
            ..RamTier::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_tokens > 0
    }

    pub fn entries(&self) -> &VecDeque<Arc<BlockSeq>> {
        &self.entries
    }

    /// A slot's prompt, saved as it is replaced. Like llama-server: nothing
    /// is saved that an entry already contains, entries it contains are
    /// dropped, and the oldest go when the budget is exceeded.
    pub fn save(&mut self, seq: &Arc<BlockSeq>) {
        let size = seq.tokens();
        if !self.enabled() || size > self.max_tokens || seq.blocks.is_empty() {
            return;
        }
        if self.entries.iter().any(|e| seq.is_prefix_of(e)) {
            return;
        }
        let mut freed = 0;
        self.entries.retain(|e| {
            let contained = e.is_prefix_of(seq);
            if contained {
                freed += e.tokens();
            }
            !contained
        });
        self.tokens -= freed;
        while self.tokens + size > self.max_tokens || self.entries.len() >= MAX_RAM_ENTRIES {
            match self.entries.pop_front() {
                Some(old) => self.tokens -= old.tokens(),
                None => break,
            }
        }
        self.tokens += size;
        self.entries.push_back(seq.clone());
    }

    /// Entry `i` was loaded into a slot: llama-server moves it out.
    pub fn take(&mut self, i: usize) -> Option<Arc<BlockSeq>> {
        let entry = self.entries.remove(i)?;
        self.tokens -= entry.tokens();
        Some(entry)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.tokens = 0;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Hash of the block's text: its identity.
    pub hash: u64,
    /// Estimated tokens.
    pub tokens: u32,
}

/// Chooses a free slot for a request and says what the slot will hold.
/// `slots` includes busy ones, which must be skipped; at least one is free.
/// A policy that counts on an entry of `ram` being loaded takes it out.
pub trait SlotPolicy {
    fn choose(&mut self, slots: &[SlotState], ram: &mut RamTier) -> (usize, SlotContents);
}

/// The policy for prompts without documents: longest useful common prefix.
pub struct PrefixPolicy {
    pub prompt: Arc<str>,
}

impl SlotPolicy for PrefixPolicy {
    fn choose(&mut self, slots: &[SlotState], _ram: &mut RamTier) -> (usize, SlotContents) {
        let slot = choose_slot(slots, &self.prompt).unwrap_or(0);
        let contents = SlotContents {
            key: self.prompt.clone(),
            blocks: None,
        };
        (slot, contents)
    }
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
            let n = common_prefix_len(&s.holds.key, prompt);
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
    ram: RamTier,
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
    /// `ram_tokens`: the size of llama-server's RAM prompt cache in tokens
    /// (0: it has none).
    pub fn new(slots: usize, max_queue: usize, ram_tokens: u64) -> Arc<Scheduler> {
        let slots = slots.max(1);
        Arc::new(Scheduler {
            permits: Arc::new(Semaphore::new(slots)),
            waiting: AtomicUsize::new(0),
            max_queue,
            table: Mutex::new(Table {
                slots: vec![SlotState::default(); slots],
                ram: RamTier::new(ram_tokens),
                child_pid: None,
            }),
        })
    }

    /// Waits (FIFO) for a free slot, picks one for `prompt` and marks it busy
    /// with the prompt as its new contents.
    pub async fn acquire(
        self: &Arc<Self>,
        policy: &mut impl SlotPolicy,
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
                slot.holds = SlotContents::default();
            }
            table.ram.clear();
        }
        // A permit guarantees a free slot (permits == slots); a policy that
        // names a busy one anyway gets the first free one.
        let table = &mut *table;
        let (mut slot, contents) = policy.choose(&table.slots, &mut table.ram);
        if table.slots.get(slot).is_none_or(|s| s.busy) {
            slot = table.slots.iter().position(|s| !s.busy).unwrap_or(0);
        }
        let state = &mut table.slots[slot];
        state.busy = true;
        let replaced = std::mem::replace(&mut state.holds, contents.clone());
        state.last_used = Some(Instant::now());
        if let Some(old) = &replaced.blocks {
            table.ram.save(old);
        }
        Ok(SlotLease {
            scheduler: self.clone(),
            slot,
            contents,
            _permit: permit,
        })
    }

    /// Changes what `slot` is recorded to hold, but only while it still
    /// holds what this request put there (`mine`): another request may have
    /// replaced it since.
    fn update_if_mine(
        &self,
        slot: usize,
        mine: &SlotContents,
        update: impl FnOnce(&mut SlotContents),
    ) {
        let mut table = self.lock();
        if let Some(state) = table.slots.get_mut(slot) {
            let same = match (&state.holds.blocks, &mine.blocks) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => Arc::ptr_eq(&state.holds.key, &mine.key),
                _ => false,
            };
            if same {
                update(&mut state.holds);
            }
        }
    }

    /// Adds the rendered prompt's key to what `slot` holds (a documents
    /// policy chooses before the prompt is rendered).
    pub fn set_key(&self, slot: usize, mine: &SlotContents, key: Arc<str>) {
        self.update_if_mine(slot, mine, |holds| holds.key = key);
    }

    /// The daemon's picture of `slot` is wrong: a request failed (its prompt
    /// may never have reached the slot), or llama.cpp reused far less than
    /// predicted. Forget it.
    pub fn forget(&self, slot: usize, mine: &SlotContents) {
        self.update_if_mine(slot, mine, |holds| *holds = SlotContents::default());
    }

    /// What the daemon believes `slot` holds.
    pub fn holds(&self, slot: usize) -> SlotContents {
        self.lock()
            .slots
            .get(slot)
            .map(|s| s.holds.clone())
            .unwrap_or_default()
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
    /// What the slot was recorded to hold for this request.
    pub contents: SlotContents,
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

    fn policy(prompt: &str) -> PrefixPolicy {
        PrefixPolicy {
            prompt: Arc::from(prompt),
        }
    }

    fn slot(holds: &str, busy: bool, age_s: u64) -> SlotState {
        SlotState {
            busy,
            holds: SlotContents {
                key: Arc::from(holds),
                blocks: None,
            },
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
        let scheduler = Scheduler::new(1, 1, 0);
        let first = scheduler
            .acquire(&mut policy("a"), 1, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(scheduler.busy(), 1);
        // One may wait; the next is refused at once.
        let waiter = {
            let s = scheduler.clone();
            tokio::spawn(async move {
                s.acquire(&mut policy("b"), 1, Duration::from_secs(30))
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
                .acquire(&mut policy("c"), 1, Duration::from_secs(5))
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
        let scheduler = Scheduler::new(1, 4, 0);
        let _held = scheduler
            .acquire(&mut policy("a"), 1, Duration::from_secs(5))
            .await
            .unwrap();
        let err = scheduler
            .acquire(&mut policy("b"), 1, Duration::from_secs(5))
            .await
            .err();
        assert_eq!(err, Some(AdmitError::Timeout));
        assert_eq!(scheduler.queued(), 0);
    }

    #[tokio::test]
    async fn a_new_child_starts_with_empty_slots() {
        let scheduler = Scheduler::new(2, 4, 0);
        let docs = "d".repeat(1000);
        let lease = scheduler
            .acquire(&mut policy(&docs), 7, Duration::from_secs(1))
            .await
            .unwrap();
        let first = lease.id();
        drop(lease);
        let again = scheduler
            .acquire(&mut policy(&docs), 7, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(again.id(), first, "the slot holding the prefix is chosen");
        drop(again);
        assert_eq!(&*scheduler.holds(first).key, docs.as_str());
        let after_restart = scheduler
            .acquire(&mut policy("x"), 8, Duration::from_secs(1))
            .await
            .unwrap();
        let untouched = 1 - after_restart.id();
        assert_eq!(
            &*scheduler.holds(untouched).key,
            "",
            "a new child starts empty"
        );
    }
}
