//! Slot choice and admission: which llama.cpp slot a request goes to, and
//! how many requests run at once.
//!
//! The daemon is the child's only client and sets `id_slot` on every request,
//! so it knows what each slot's KV cache holds: the prompt of the last request
//! it sent there. A new request goes to the free slot where it is predicted
//! to cost the least time ([`Candidate::score_ms`]): the prompt time for the
//! tokens the slot would not reuse (llama.cpp reuses exactly the common
//! prefix), plus a restore from the RAM cache when one is counted on, plus
//! the value of what the request would overwrite there ([`slot_value_ms`]:
//! the prefill that the slot's contents save the requests that keep reusing
//! them). So a request whose only match is the chat header goes to an empty
//! or the least valuable slot, not onto a slot others keep hitting. Busy
//! slots are never candidates: a request never queues behind one while
//! another is free. At most `concurrency` requests (at most one per slot)
//! are in flight; the rest wait in FIFO order, up to `max_queue` of them.
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

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::cost::{CostModel, CostView};

/// A shared prefix shorter than this many bytes is template boilerplate
/// (`[{"role":"system","content":"`), not reusable context: it does not
/// count as a hit on the slot.
pub const MIN_USEFUL_PREFIX: usize = 256;

/// How fast a slot's value fades when nothing reuses it: halved after
/// this many seconds.
pub const VALUE_HALF_LIFE_S: f64 = 300.0;

/// What the daemon believes one slot holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotState {
    pub busy: bool,
    /// What the last request sent to this slot put there.
    pub holds: SlotContents,
    pub last_used: Option<Instant>,
    /// Requests that reused a useful part of these contents (or of the
    /// contents they grew from).
    pub hits: u32,
    /// The live-index id (`rid`) of the tagged request whose prompt the
    /// slot holds, so that overwriting the slot evicts it.
    pub answered: Option<String>,
}

/// Estimated tokens in `bytes` of prompt text (about four bytes a token;
/// the cost model scales it to llama-server's counts).
pub fn tokens_of_bytes(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

/// What the contents of `slot` are worth, in milliseconds of prefill they
/// are expected to save the requests that come back to them: the time to
/// compute them times the chance they are reused, which grows with each hit
/// and fades while nobody comes back.
pub fn slot_value_ms(slot: &SlotState, cost: &CostView, now: Instant) -> f64 {
    let held = slot.holds.tokens();
    if held == 0 {
        return 0.0;
    }
    let reuse = reuse_chance(slot.hits);
    let age_s = slot
        .last_used
        .map(|t| now.saturating_duration_since(t).as_secs_f64())
        .unwrap_or(f64::INFINITY);
    let fade = 0.5f64.powf(age_s / VALUE_HALF_LIFE_S);
    cost.compute_ms(held) * reuse * fade
}

/// The chance that contents with `hits` reuses so far are reused again:
/// a third for contents nobody came back to yet, rising toward one.
pub fn reuse_chance(hits: u32) -> f64 {
    let hits = f64::from(hits);
    (hits + 1.0) / (hits + 3.0)
}

/// One free slot as a place for a request: what it would reuse and lose.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub slot: usize,
    /// Estimated tokens of the request's prompt.
    pub prompt_tokens: u64,
    /// Of those, how many the slot (or a RAM-cache restore) provides.
    pub reused_tokens: u64,
    /// Tokens restored from llama-server's RAM cache first.
    pub restored_tokens: u64,
    /// Tokens of what the slot holds that the request keeps.
    pub kept_tokens: u64,
    /// Predicted prompt time (llama-server's `prompt_ms`).
    pub prompt_ms: f64,
    /// Restoring from, and saving the replaced prompt to, the RAM cache.
    pub restore_ms: f64,
    pub save_ms: f64,
    /// The part of the slot's value the request would overwrite.
    pub lost_value_ms: f64,
}

/// How much of a prompt a slot would provide (estimated tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reuse {
    /// The request's whole prompt.
    pub prompt: u64,
    /// Of it, what the slot (or a RAM-cache restore) provides.
    pub reused: u64,
    /// Of that, what is restored from llama-server's RAM cache first.
    pub restored: u64,
    /// Of what the slot holds, what the request keeps.
    pub kept: u64,
}

/// Prices candidate slots for one choice.
#[derive(Clone, Copy)]
pub struct Pricing<'a> {
    pub slots: &'a [SlotState],
    /// Whether llama-server runs its RAM prompt cache.
    pub ram_tier: bool,
    pub cost: &'a CostView,
    pub now: Instant,
}

impl Pricing<'_> {
    /// Prices every free slot with what `reuse` says the request would get
    /// there, and returns the cheapest (ties to the least recently used)
    /// with what `reuse` returned beside it, and how many slots were free.
    /// `None` when none is free.
    pub fn cheapest<T>(
        &self,
        mut reuse: impl FnMut(usize, &SlotState) -> (Reuse, T),
    ) -> (Option<(Candidate, T)>, usize) {
        let mut free = 0;
        let mut best: Option<(Candidate, T)> = None;
        for (i, state) in self.slots.iter().enumerate().filter(|(_, s)| !s.busy) {
            free += 1;
            let (r, extra) = reuse(i, state);
            let candidate = self.price(i, r);
            let better = best.as_ref().is_none_or(|(b, _)| {
                candidate
                    .score_ms()
                    .total_cmp(&b.score_ms())
                    .then_with(|| state.last_used.cmp(&self.slots[b.slot].last_used))
                    .is_lt()
            });
            if better {
                best = Some((candidate, extra));
            }
        }
        (best, free)
    }

    /// Evaluates `slot` for a request that reuses `reuse` of it.
    pub fn price(&self, slot: usize, reuse: Reuse) -> Candidate {
        let cost = self.cost;
        let state = &self.slots[slot];
        let held = state.holds.tokens();
        let lost_share = if held == 0 {
            0.0
        } else {
            1.0 - (reuse.kept.min(held) as f64 / held as f64)
        };
        // llama-server saves a slot's prompt to its RAM cache when the new
        // one keeps less than half of it.
        let save_ms = if self.ram_tier && held > 0 && reuse.kept * 2 < held {
            cost.profile.save_ms(cost.tokens(held))
        } else {
            0.0
        };
        Candidate {
            slot,
            prompt_tokens: reuse.prompt,
            reused_tokens: reuse.reused,
            restored_tokens: reuse.restored,
            kept_tokens: reuse.kept,
            prompt_ms: cost.prompt_ms(reuse.prompt, reuse.reused),
            restore_ms: cost.profile.restore_ms(cost.tokens(reuse.restored)),
            save_ms,
            lost_value_ms: slot_value_ms(state, cost, self.now) * lost_share,
        }
    }
}

impl Candidate {
    /// What choosing this slot costs: this request's time, and the future
    /// time of the requests that would have reused what it overwrites.
    pub fn score_ms(&self) -> f64 {
        self.prompt_ms + self.restore_ms + self.save_ms + self.lost_value_ms
    }
}

/// How a slot was chosen, for the query log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotDecision {
    /// "prefix" (it holds part of this prompt), "cached-prefix" and
    /// "ram-cache" (documents it or the RAM cache holds lead the order),
    /// "empty", "least-valuable" (nothing useful anywhere: the slot whose
    /// contents are worth least), "header" (only the text before the
    /// documents matched).
    pub choice: &'static str,
    /// Predicted prompt time (compare with `cache_reuse.prompt_eval_ms`).
    pub predicted_ms: f64,
    pub predicted_prompt_tokens: u64,
    pub predicted_reused_tokens: u64,
    /// Predicted RAM-cache restore and save time on top of it.
    pub restore_ms: f64,
    pub save_ms: f64,
    /// The value of the slot's contents this request overwrote.
    pub lost_value_ms: f64,
    /// Free slots considered.
    pub free_slots: usize,
}

impl SlotDecision {
    pub fn from_candidate(choice: &'static str, c: &Candidate, free_slots: usize) -> SlotDecision {
        let round = |v: f64| (v * 100.0).round() / 100.0;
        SlotDecision {
            choice,
            predicted_ms: round(c.prompt_ms),
            predicted_prompt_tokens: c.prompt_tokens,
            predicted_reused_tokens: c.reused_tokens,
            restore_ms: round(c.restore_ms),
            save_ms: round(c.save_ms),
            lost_value_ms: round(c.lost_value_ms),
            free_slots,
        }
    }
}

/// A slot's KV contents as the daemon tracks them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotContents {
    /// The prompt key (see `reorder::prepare::prompt_key`) of the last request.
    pub key: Arc<str>,
    /// For a request with documents: the documents in prompt order.
    pub blocks: Option<Arc<BlockSeq>>,
}

impl SlotContents {
    /// Estimated tokens held.
    pub fn tokens(&self) -> u64 {
        match &self.blocks {
            Some(blocks) => blocks.tokens().max(tokens_of_bytes(self.key.len())),
            None => tokens_of_bytes(self.key.len()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.key.is_empty() && self.blocks.is_none()
    }

    /// Whether these are the very contents `other` recorded (not merely
    /// equal ones: another request may have replaced them since).
    pub fn is_same(&self, other: &SlotContents) -> bool {
        match (&self.blocks, &other.blocks) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => Arc::ptr_eq(&self.key, &other.key),
            _ => false,
        }
    }
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

#[derive(Debug, Default, Clone)]
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

/// A policy's choice: the slot, what it will hold, and why.
#[derive(Debug, Clone)]
pub struct Choice {
    pub slot: usize,
    pub contents: SlotContents,
    pub decision: SlotDecision,
    /// Whether the request reuses a useful part of what the slot held (a
    /// hit on it).
    pub hit: bool,
}

/// What a policy gets to choose from.
pub struct ChoiceInput<'a> {
    /// Every slot, busy ones included (they must be skipped); at least one
    /// is free.
    pub slots: &'a [SlotState],
    /// The model of llama-server's RAM cache; a policy that counts on an
    /// entry being loaded takes it out.
    pub ram: &'a mut RamTier,
    pub cost: &'a CostView,
    pub now: Instant,
}

/// Chooses a free slot for a request and says what the slot will hold.
pub trait SlotPolicy {
    fn choose(&mut self, input: ChoiceInput<'_>) -> Choice;
}

/// The policy for prompts without documents: the free slot where the
/// prompt is predicted cheapest, reuse counted as the common prefix.
pub struct PrefixPolicy {
    pub prompt: Arc<str>,
}

impl SlotPolicy for PrefixPolicy {
    fn choose(&mut self, input: ChoiceInput<'_>) -> Choice {
        let pricing = Pricing {
            slots: input.slots,
            ram_tier: input.ram.enabled(),
            cost: input.cost,
            now: input.now,
        };
        let prompt_tokens = tokens_of_bytes(self.prompt.len());
        let (best, free) = pricing.cheapest(|_, s| {
            let shared = common_prefix_len(&s.holds.key, &self.prompt);
            let reused = tokens_of_bytes(shared).min(prompt_tokens);
            let reuse = Reuse {
                prompt: prompt_tokens,
                reused,
                restored: 0,
                kept: reused,
            };
            (reuse, shared)
        });
        // The scheduler guarantees a free slot; slot 0 keeps this total.
        let (best, shared) = best.unwrap_or_else(|| {
            let reuse = Reuse {
                prompt: prompt_tokens,
                ..Reuse::default()
            };
            (pricing.price(0, reuse), 0)
        });
        let hit = shared >= MIN_USEFUL_PREFIX;
        let choice = if hit {
            "prefix"
        } else {
            empty_or_least_valuable(&input.slots[best.slot])
        };
        Choice {
            slot: best.slot,
            contents: SlotContents {
                key: self.prompt.clone(),
                blocks: None,
            },
            decision: SlotDecision::from_candidate(choice, &best, free),
            hit,
        }
    }
}

/// The name of a choice that reuses nothing useful.
pub fn empty_or_least_valuable(slot: &SlotState) -> &'static str {
    if slot.holds.is_empty() {
        "empty"
    } else {
        "least-valuable"
    }
}

/// A slot for the daemon's own use (measuring): the free slot whose
/// contents are worth least, left empty.
pub struct ReservePolicy;

impl SlotPolicy for ReservePolicy {
    fn choose(&mut self, input: ChoiceInput<'_>) -> Choice {
        let pricing = Pricing {
            slots: input.slots,
            ram_tier: false,
            cost: input.cost,
            now: input.now,
        };
        let (best, free) = pricing.cheapest(|_, _| (Reuse::default(), ()));
        let best = best.map_or_else(|| pricing.price(0, Reuse::default()), |(c, ())| c);
        Choice {
            slot: best.slot,
            contents: SlotContents::default(),
            decision: SlotDecision::from_candidate("reserved", &best, free),
            hit: false,
        }
    }
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
    /// With a unified KV: the pool's size in tokens. llama-server empties
    /// every idle slot when a prompt does not fit in what is left.
    unified_pool: Option<u64>,
    /// The child the contents belong to; a new child starts empty.
    child_pid: Option<u32>,
    /// Live-index ids whose KV is gone (their slot was overwritten or their
    /// child replaced) and that the next settle hands to the live index.
    displaced: Vec<String>,
}

pub struct Scheduler {
    concurrency: usize,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queue: usize,
    table: Mutex<Table>,
    cost: Arc<CostModel>,
}

impl Scheduler {
    /// `slots` hold prompts, `concurrency` of them run at once. `ram_tokens`:
    /// the size of llama-server's RAM prompt cache in tokens (0: it has
    /// none). Slot choice predicts with `cost`.
    pub fn new(
        slots: usize,
        concurrency: usize,
        max_queue: usize,
        ram_tokens: u64,
        cost: Arc<CostModel>,
    ) -> Arc<Scheduler> {
        let slots = slots.max(1);
        Arc::new(Scheduler {
            cost,
            concurrency: concurrency.clamp(1, slots),
            permits: Arc::new(Semaphore::new(concurrency.clamp(1, slots))),
            waiting: AtomicUsize::new(0),
            max_queue,
            table: Mutex::new(Table {
                slots: vec![SlotState::default(); slots],
                ram: RamTier::new(ram_tokens),
                unified_pool: None,
                child_pid: None,
                displaced: Vec::new(),
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
            let table = &mut *table;
            for slot in &mut table.slots {
                slot.holds = SlotContents::default();
                table.displaced.extend(slot.answered.take());
            }
            table.ram.clear();
        }
        // A permit guarantees a free slot (permits <= slots); a policy that
        // names a busy one anyway gets the first free one.
        let table = &mut *table;
        let cost = self.cost.view();
        let now = Instant::now();
        let choice = policy.choose(ChoiceInput {
            slots: &table.slots,
            ram: &mut table.ram,
            cost: &cost,
            now,
        });
        let mut slot = choice.slot;
        if table.slots.get(slot).is_none_or(|s| s.busy) {
            slot = table.slots.iter().position(|s| !s.busy).unwrap_or(0);
        }
        let contents = choice.contents;
        let state = &mut table.slots[slot];
        state.busy = true;
        let replaced = std::mem::replace(&mut state.holds, contents.clone());
        state.hits = if choice.hit {
            state.hits.saturating_add(1)
        } else {
            0
        };
        state.last_used = Some(now);
        if let Some(old) = &replaced.blocks {
            table.ram.save(old);
        }
        if let Some(pool) = table.unified_pool {
            // Past the shared pool llama-server purges every idle slot.
            let held: u64 = table.slots.iter().map(|s| s.holds.tokens()).sum();
            if cost.tokens(held) > pool {
                for (i, other) in table.slots.iter_mut().enumerate() {
                    if i != slot && !other.busy {
                        other.holds = SlotContents::default();
                        other.hits = 0;
                    }
                }
            }
        }
        Ok(SlotLease {
            scheduler: self.clone(),
            receipt: SlotReceipt {
                slot,
                child_pid,
                contents,
                decision: choice.decision,
            },
            _permit: permit,
        })
    }

    /// Settles what a finished request did to its slot, and returns the
    /// live-index ids whose KV is gone since the last settle (the slot's
    /// previous tagged request, and every id of a replaced child).
    pub fn settle(&self, receipt: &SlotReceipt, outcome: SlotOutcome<'_>) -> Vec<String> {
        let mut table = self.lock();
        let mut displaced = std::mem::take(&mut table.displaced);
        let request_id = outcome.request_id.filter(|_| outcome.succeeded);
        if table.child_pid != Some(receipt.child_pid) {
            // The child it ran on was replaced, and its KV with it.
            displaced.extend(request_id.map(str::to_string));
            return displaced;
        }
        let Some(state) = table.slots.get_mut(receipt.slot) else {
            return displaced;
        };
        // A failed request's prompt may never have reached the slot, and a
        // diverged one shows the daemon's picture of it is wrong.
        if (!outcome.succeeded || !outcome.measured || outcome.diverged)
            && state.holds.is_same(&receipt.contents)
        {
            state.holds = SlotContents::default();
        }
        // Whatever tagged request the slot held before is gone from it.
        match (state.answered.take(), request_id) {
            (Some(old), Some(new)) if old == new => state.answered = Some(old),
            (old, new) => {
                displaced.extend(old);
                state.answered = new.map(str::to_string);
            }
        }
        displaced
    }

    /// The child runs one KV pool of `tokens` shared by all slots.
    pub fn set_unified_pool(&self, tokens: Option<u64>) {
        self.lock().unified_pool = tokens;
    }

    /// Requests that may run at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// The cost model slot choice predicts with.
    pub fn cost(&self) -> &Arc<CostModel> {
        &self.cost
    }

    /// llama-server's RAM prompt cache now holds `tokens` (0: none), as for
    /// a child started with another `--cache-ram`.
    pub fn set_ram_tokens(&self, tokens: u64) {
        let mut table = self.lock();
        table.ram = RamTier::new(tokens);
    }

    /// The longest prefix of `key` (bytes) any slot holds, busy or not.
    pub fn longest_held_prefix(&self, key: &str) -> usize {
        self.lock()
            .slots
            .iter()
            .map(|s| common_prefix_len(&s.holds.key, key))
            .max()
            .unwrap_or(0)
    }

    /// What `policy` would choose now, without taking a slot: the
    /// predicted prompt time there with the RAM-cache restore and save and
    /// the value of the contents it would overwrite. A backend's slots hold
    /// what was routed there, so this prices backends against each other
    /// exactly as slots are priced within one.
    pub fn predict(&self, policy: &mut impl SlotPolicy) -> f64 {
        let table = self.lock();
        let cost = self.cost.view();
        let mut ram = table.ram.clone();
        let choice = policy.choose(ChoiceInput {
            slots: &table.slots,
            ram: &mut ram,
            cost: &cost,
            now: Instant::now(),
        });
        let d = &choice.decision;
        d.predicted_ms + d.restore_ms + d.save_ms + d.lost_value_ms
    }

    /// What each slot holds, in short, for `/status`.
    pub fn summary(&self) -> Vec<SlotSummary> {
        let cost = self.cost.view();
        let now = Instant::now();
        let table = self.lock();
        table
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| SlotSummary {
                id: i,
                busy: s.busy,
                tokens: cost.tokens(s.holds.tokens()),
                documents: s.holds.blocks.as_ref().map_or(0, |b| b.blocks.len()),
                hits: s.hits,
                value_ms: (slot_value_ms(s, &cost, now) * 10.0).round() / 10.0,
            })
            .collect()
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
            if state.holds.is_same(mine) {
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
        crate::sync::lock(&self.table)
    }
}

struct QueuedGuard<'a>(&'a AtomicUsize);

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One slot in `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct SlotSummary {
    pub id: usize,
    pub busy: bool,
    /// Tokens the daemon believes the slot holds.
    pub tokens: u64,
    /// Documents among them.
    pub documents: usize,
    pub hits: u32,
    /// What its contents are worth ([`slot_value_ms`]).
    pub value_ms: f64,
}

/// A slot held by one request; dropping it frees the slot.
pub struct SlotLease {
    scheduler: Arc<Scheduler>,
    receipt: SlotReceipt,
    _permit: OwnedSemaphorePermit,
}

impl SlotLease {
    pub fn id(&self) -> usize {
        self.receipt.slot
    }

    /// What the slot was recorded to hold for this request.
    pub fn contents(&self) -> &SlotContents {
        &self.receipt.contents
    }

    /// What settling the request needs to know once the slot is free.
    pub fn receipt(&self) -> &SlotReceipt {
        &self.receipt
    }
}

/// One lease as settle sees it: which slot of which child, what it was
/// recorded to hold, how it was chosen.
#[derive(Debug, Clone)]
pub struct SlotReceipt {
    pub slot: usize,
    pub child_pid: u32,
    pub contents: SlotContents,
    pub decision: SlotDecision,
}

/// How a request ended, as far as its slot is concerned.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlotOutcome<'a> {
    /// llama-server answered 200.
    pub succeeded: bool,
    /// It reported timings (the prompt was evaluated in the slot).
    pub measured: bool,
    /// llama.cpp reused far less than the daemon predicted.
    pub diverged: bool,
    /// The caller's live-index id (`rid` or `request_id`).
    pub request_id: Option<&'a str>,
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let mut table = self.scheduler.lock();
        if let Some(state) = table.slots.get_mut(self.receipt.slot) {
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

    fn cost() -> Arc<CostModel> {
        CostModel::new(CostView::for_tests().profile.as_ref().clone())
    }

    fn slot(holds: &str, busy: bool, age_s: u64) -> SlotState {
        SlotState {
            busy,
            holds: SlotContents {
                key: Arc::from(holds),
                blocks: None,
            },
            last_used: Instant::now().checked_sub(Duration::from_secs(age_s)),
            ..SlotState::default()
        }
    }

    fn choose(slots: &[SlotState], prompt: &str) -> Choice {
        policy(prompt).choose(ChoiceInput {
            slots,
            ram: &mut RamTier::default(),
            cost: &CostView::for_tests(),
            now: Instant::now(),
        })
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
    fn the_slot_holding_the_prefix_is_cheapest() {
        let docs = "d".repeat(1000);
        let slots = vec![
            slot(&format!("{docs} question one"), false, 10),
            slot("something else entirely", false, 100),
        ];
        let choice = choose(&slots, &format!("{docs} question two"));
        assert_eq!(choice.slot, 0);
        assert_eq!(choice.decision.choice, "prefix");
        assert!(choice.hit);
        assert!(
            choice.decision.predicted_ms < 20.0,
            "{:?}: only the question is computed",
            choice.decision
        );
    }

    /// A match on template boilerplate only is no reason to overwrite a
    /// slot that holds something: an empty slot is cheaper.
    #[test]
    fn a_boilerplate_match_goes_to_an_empty_slot() {
        let header = "[{\"role\":\"system\",\"content\":\"";
        let held = format!("{header}{}", "a".repeat(2000));
        let slots = vec![slot(&held, false, 5), SlotState::default()];
        let choice = choose(&slots, &format!("{header}{}", "b".repeat(2000)));
        assert_eq!(choice.slot, 1);
        assert_eq!(choice.decision.choice, "empty");
        assert!(!choice.hit);
    }

    /// With nothing useful anywhere, the slot whose contents are worth
    /// least goes: fewer hits, and older.
    #[test]
    fn the_least_valuable_slot_is_overwritten() {
        let mut popular = slot(&"p".repeat(2000), false, 5);
        popular.hits = 6;
        let once = slot(&"q".repeat(2000), false, 5);
        let stale = slot(&"r".repeat(2000), false, 3000);
        let slots = vec![popular, once, stale];
        let choice = choose(&slots, &"z".repeat(2000));
        assert_eq!(choice.slot, 2, "{:?}", choice.decision);
        assert_eq!(choice.decision.choice, "least-valuable");
        let now = Instant::now();
        let view = CostView::for_tests();
        assert!(slot_value_ms(&slots[0], &view, now) > slot_value_ms(&slots[1], &view, now));
        assert!(slot_value_ms(&slots[1], &view, now) > slot_value_ms(&slots[2], &view, now));
        assert_eq!(slot_value_ms(&SlotState::default(), &view, now), 0.0);
    }

    #[test]
    fn busy_slots_are_skipped() {
        let docs = "d".repeat(1000);
        let slots = vec![slot(&docs, true, 1), slot("", false, 1)];
        assert_eq!(choose(&slots, &docs).slot, 1);
    }

    /// Distinct prompts spread over the slots while empty ones remain; a
    /// prompt that extends what a slot holds goes back there and counts a
    /// hit.
    #[tokio::test]
    async fn distinct_prompts_spread_and_repeats_come_back() {
        let scheduler = Scheduler::new(4, 4, 4, 0, cost());
        let prompts: Vec<String> = (0..4).map(|i| format!("{i}{}", "x".repeat(1500))).collect();
        let mut used = std::collections::HashSet::new();
        for p in &prompts {
            let lease = scheduler
                .acquire(&mut policy(p), 1, Duration::from_secs(1))
                .await
                .unwrap();
            used.insert(lease.id());
        }
        assert_eq!(used.len(), 4, "every prompt got a slot of its own");
        let first = prompts[0].clone() + " and more";
        let lease = scheduler
            .acquire(&mut policy(&first), 1, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(&*scheduler.holds(lease.id()).key, first.as_str());
        assert_eq!(lease.receipt().decision.choice, "prefix");
        let summary = scheduler.summary();
        assert_eq!(summary[lease.id()].hits, 1);
        assert!(summary[lease.id()].busy);
    }

    #[tokio::test]
    async fn admission_is_bounded_and_frees_on_drop() {
        let scheduler = Scheduler::new(1, 1, 1, 0, cost());
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
        let scheduler = Scheduler::new(1, 1, 4, 0, cost());
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
        let scheduler = Scheduler::new(2, 2, 4, 0, cost());
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

    async fn answer(
        scheduler: &Arc<Scheduler>,
        prompt: &str,
        child_pid: u32,
        request_id: Option<&str>,
    ) -> (usize, Vec<String>) {
        let lease = scheduler
            .acquire(&mut policy(prompt), child_pid, Duration::from_secs(1))
            .await
            .unwrap();
        let receipt = lease.receipt().clone();
        drop(lease);
        let outcome = SlotOutcome {
            succeeded: true,
            measured: true,
            diverged: false,
            request_id,
        };
        (receipt.slot, scheduler.settle(&receipt, outcome))
    }

    /// Case 33, the slot-occupancy rule, kept by the one slot table: a slot
    /// that answers another request displaces the tagged one it held, and a
    /// new child displaces every id.
    #[tokio::test]
    async fn overwritten_slots_and_new_children_displace_request_ids() {
        let scheduler = Scheduler::new(2, 2, 4, 0, cost());
        let a = "a".repeat(800);
        let b = "b".repeat(800);
        let (first, gone) = answer(&scheduler, &a, 1, Some("r1")).await;
        assert!(gone.is_empty());
        assert_eq!(answer(&scheduler, &a, 1, Some("r1")).await, (first, vec![]));
        assert_eq!(
            answer(&scheduler, &a, 1, Some("r2")).await,
            (first, vec!["r1".to_string()])
        );
        let (second, gone) = answer(&scheduler, &b, 1, Some("r3")).await;
        assert_ne!(second, first);
        assert!(gone.is_empty());
        // The child is replaced: both ids leave, whatever the new request.
        let (_, mut gone) = answer(&scheduler, "x", 2, None).await;
        gone.sort();
        assert_eq!(gone, ["r2", "r3"]);
        assert!(answer(&scheduler, "x", 2, None).await.1.is_empty());
    }

    #[tokio::test]
    async fn a_request_that_outlived_its_child_leaves_nothing_behind() {
        let scheduler = Scheduler::new(2, 2, 4, 0, cost());
        let old = scheduler
            .acquire(&mut policy("old"), 1, Duration::from_secs(1))
            .await
            .unwrap();
        let receipt = old.receipt().clone();
        drop(old);
        let new = "n".repeat(800);
        let (slot, _) = answer(&scheduler, &new, 2, Some("n1")).await;
        let outcome = SlotOutcome {
            succeeded: true,
            measured: true,
            diverged: false,
            request_id: Some("o1"),
        };
        assert_eq!(scheduler.settle(&receipt, outcome), ["o1"]);
        // The new child's slot keeps its own id.
        assert_eq!(
            answer(&scheduler, &new, 2, Some("n2")).await,
            (slot, vec!["n1".to_string()])
        );
    }

    #[tokio::test]
    async fn a_failed_request_forgets_what_it_put_in_the_slot() {
        let scheduler = Scheduler::new(1, 1, 4, 0, cost());
        let lease = scheduler
            .acquire(&mut policy("prompt"), 1, Duration::from_secs(1))
            .await
            .unwrap();
        let receipt = lease.receipt().clone();
        drop(lease);
        assert_eq!(&*scheduler.holds(0).key, "prompt");
        scheduler.settle(&receipt, SlotOutcome::default());
        assert!(scheduler.holds(0).is_empty());
    }
}
