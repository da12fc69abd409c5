//! The live index behind the stateful ContextPilot-compatible API
//! (`/reorder`, `/evict`, `/search`, `/insert`, `/requests`, `/reset`,
//! `/deduplicate`).
//!
//! The first batch is clustered with [`cluster::build_index`] and becomes a
//! prefix tree whose leaves carry request ids. Later contexts are placed one
//! by one: a greedy search descends to the most similar node, the context is
//! reordered to start with that node's documents, and it is inserted as a new
//! leaf (splitting a leaf when the two share a contiguous prefix). Contexts
//! that match nothing are clustered together and grafted under the root.
//! Leaves leave the tree when their requests are evicted (`/evict`, or the
//! daemon seeing the slot that held them overwritten), when they idle past
//! the TTL, or when the leaf count passes its bound (least recently used
//! first), and ancestors left without children go with them.
//!
//! Differences from the reference, on purpose:
//! - reordered contexts are always returned in scheduled order (the reference
//!   switched to input order after the first call, which paired queries with
//!   another query's documents);
//! - contexts with the same documents share one leaf; a split never creates a
//!   node equal to its parent; an unmatched group's shared node is kept;
//! - search paths are computed when asked for, never stored, so they stay
//!   right after removals;
//! - `reset` really starts over (strings, conversations and all);
//! - candidate children of a wide node are found through an inverted index
//!   (block → children), so a search never scans thousands of siblings.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use super::cluster::{self, FxMap, FxSet};

/// A block as the API carries it: an integer id or a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Int(u64),
    Str(String),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Int(n) => write!(f, "{n}"),
            Key::Str(s) => f.write_str(s),
        }
    }
}

/// Bounds that keep the index's memory flat under endless traffic.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_leaves: usize,
    /// A leaf not used for this long is dropped (sliding); `None` keeps leaves
    /// until evicted or pushed out by `max_leaves`.
    pub ttl: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_leaves: 100_000,
            ttl: Some(Duration::from_secs(3600)),
        }
    }
}

/// A node wider than this gets an inverted index over its children.
const WIDE_NODE: usize = 32;
/// Request ids kept on one leaf (identical contexts share it); the oldest
/// are forgotten past this.
const MAX_REQUESTS_PER_LEAF: usize = 256;
/// Longest parent chain walked for dedup.
const MAX_CHAIN: usize = 4096;
/// Documents remembered per conversation id; past it the set starts over.
const MAX_CONVERSATION_DOCS: usize = 100_000;
/// Requests remembered for parent-chain dedup, and conversations.
const MAX_TRACKED: usize = 100_000;
const MAX_CONVERSATIONS: usize = 10_000;

pub const TRACKER_HINT: &str =
    "Please refer to [Doc {doc_id}] from the previous conversation turn.";
pub const CONVERSATION_HINT: &str =
    "Please refer to [Doc {doc_id}] from the previous conversation.";

#[derive(Debug)]
struct LiveNode {
    /// Ordered documents: the full reordered context for a leaf, the shared
    /// prefix for an internal node.
    docs: Vec<u32>,
    children: Vec<usize>,
    parent: Option<usize>,
    /// Request ids answered from this leaf (empty for internal nodes).
    requests: Vec<String>,
    last_access: Duration,
    tokens: i64,
    /// block → (child holding it, its position there); only for wide nodes.
    child_index: Option<FxMap<u32, Vec<(usize, u32)>>>,
}

/// Ids for keys. Integers below 2^31 are their own id, so numeric order is
/// kept where the clustering sorts ids (as the reference sorts integer
/// blocks); strings (and larger integers) get ids from 2^31 up in order of
/// first appearance, reference counted so the table shrinks with the tree.
#[derive(Default)]
struct Interner {
    ids: HashMap<Key, u32>,
    keys: Vec<Option<(Key, usize)>>,
    free: Vec<u32>,
}

const STRING_BASE: u32 = 1 << 31;

impl Interner {
    fn id(&mut self, key: &Key) -> u32 {
        if let Key::Int(n) = key {
            if *n < u64::from(STRING_BASE) {
                return *n as u32;
            }
        }
        if let Some(&id) = self.ids.get(key) {
            return id;
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                self.keys[slot as usize] = Some((key.clone(), 0));
                slot
            }
            None => {
                self.keys.push(Some((key.clone(), 0)));
                (self.keys.len() - 1) as u32
            }
        };
        let id = STRING_BASE + slot;
        self.ids.insert(key.clone(), id);
        id
    }

    fn key(&self, id: u32) -> Key {
        if id < STRING_BASE {
            return Key::Int(u64::from(id));
        }
        self.keys
            .get((id - STRING_BASE) as usize)
            .and_then(|k| k.as_ref())
            .map_or(Key::Int(u64::from(id)), |(k, _)| k.clone())
    }

    fn slot(id: u32) -> Option<usize> {
        id.checked_sub(STRING_BASE).map(|s| s as usize)
    }

    fn retain(&mut self, docs: &[u32]) {
        for &d in docs {
            if let Some(Some((_, refs))) = Self::slot(d).and_then(|s| self.keys.get_mut(s)) {
                *refs += 1;
            }
        }
    }

    fn release(&mut self, docs: &[u32]) {
        for &d in docs {
            let Some(slot) = Self::slot(d) else { continue };
            let Some(entry) = self.keys.get_mut(slot) else {
                continue;
            };
            let gone = match entry {
                Some((_, refs)) => {
                    *refs = refs.saturating_sub(1);
                    *refs == 0
                }
                None => false,
            };
            if gone {
                if let Some((key, _)) = entry.take() {
                    self.ids.remove(&key);
                }
                self.free.push(slot as u32);
            }
        }
    }

    /// Drops ids that were interned for a lookup but never stored.
    fn forget_unreferenced(&mut self, docs: &[u32]) {
        for &d in docs {
            let Some(slot) = Self::slot(d) else { continue };
            if matches!(self.keys.get(slot), Some(Some((_, 0)))) {
                if let Some((key, _)) = self.keys[slot].take() {
                    self.ids.remove(&key);
                }
                self.free.push(slot as u32);
            }
        }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// Where a search ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchResult {
    pub path: Vec<usize>,
    /// The matched node, `None` when nothing below the root overlaps.
    pub node: Option<usize>,
    pub overlap: usize,
    pub has_prefix: bool,
}

/// The answer to one `reorder` call.
#[derive(Debug, Clone)]
pub struct ReorderOutcome {
    /// `"initial"` (the call that built the index) or `"incremental"`.
    pub mode: &'static str,
    /// Per input context, in input order.
    pub request_ids: Vec<String>,
    pub reordered: Vec<Vec<Key>>,
    pub leaves: Vec<usize>,
    /// The schedule: `order[i]` is the input index to send i-th.
    pub order: Vec<usize>,
    pub groups: Vec<Vec<usize>>,
    pub matched: usize,
    pub merged: usize,
    pub warnings: Vec<String>,
}

/// The answer to one eviction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Eviction {
    pub removed: usize,
    pub evicted_nodes: Vec<usize>,
    pub evicted_requests: Vec<String>,
    pub not_found: Vec<String>,
}

/// Index counters, as the reference reports them plus the bounds' work.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveStats {
    pub num_nodes: usize,
    pub leaf_nodes: usize,
    pub total_tokens: i64,
    pub num_requests: usize,
    pub total_searches: u64,
    pub total_insertions: u64,
    pub total_removals: u64,
    pub expired: u64,
    pub lru_evicted: u64,
    pub avg_search_time_us: f64,
    /// Distinct string blocks held.
    pub strings: usize,
}

/// One context's dedup against earlier turns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupResult {
    pub original: Vec<Key>,
    pub overlapping: Vec<Key>,
    pub new: Vec<Key>,
    pub hints: Vec<String>,
    /// For each overlapping document, the turn it was first sent in.
    pub source_turns: Vec<(Key, u32)>,
    pub new_conversation: bool,
}

struct Tracked {
    parent: Option<String>,
    docs: Vec<Key>,
    turn: u32,
}

/// The live index. Not thread-safe by itself; the gateway keeps it behind a
/// mutex and calls it from the blocking pool.
pub struct LiveIndex {
    alpha: f64,
    limits: Limits,
    nodes: FxMap<usize, LiveNode>,
    root: usize,
    next_node: usize,
    live: bool,
    /// request id → its leaf (`None`: tracked without a node).
    requests: HashMap<String, Option<usize>>,
    keys: Interner,
    /// (last access, leaf) for LRU and TTL.
    access: BTreeSet<(Duration, usize)>,
    clock: Box<dyn Fn() -> Duration + Send>,
    request_seq: u64,
    request_salt: u64,
    searches: u64,
    search_time: Duration,
    insertions: u64,
    removals: u64,
    expired: u64,
    lru_evicted: u64,
    /// Ids tracked without a node, oldest first.
    tracked_only: VecDeque<String>,
    /// Parent-chain conversations (`parent_request_ids`).
    tracked: HashMap<String, Tracked>,
    tracked_order: VecDeque<String>,
    /// parent request id → the turns built on it.
    turn_children: HashMap<String, Vec<String>>,
    /// `conversation_id` → documents already sent in it, and its turn count.
    conversations: HashMap<String, (HashSet<Key>, u32)>,
    conversation_order: VecDeque<String>,
    explicit_conversations: bool,
}

impl LiveIndex {
    pub fn new(alpha: f64, limits: Limits) -> Self {
        let start = Instant::now();
        Self::with_clock(alpha, limits, Box::new(move || start.elapsed()))
    }

    /// An index reading time from `clock` (tests drive TTLs with it).
    pub fn with_clock(alpha: f64, limits: Limits, clock: Box<dyn Fn() -> Duration + Send>) -> Self {
        let salt = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        let mut index = LiveIndex {
            alpha,
            limits,
            nodes: FxMap::default(),
            root: 0,
            next_node: 0,
            live: false,
            requests: HashMap::new(),
            keys: Interner::default(),
            access: BTreeSet::new(),
            clock,
            request_seq: 0,
            request_salt: salt,
            searches: 0,
            search_time: Duration::ZERO,
            insertions: 0,
            removals: 0,
            expired: 0,
            lru_evicted: 0,
            tracked_only: VecDeque::new(),
            tracked: HashMap::new(),
            tracked_order: VecDeque::new(),
            turn_children: HashMap::new(),
            conversations: HashMap::new(),
            conversation_order: VecDeque::new(),
            explicit_conversations: false,
        };
        index.root = index.add_node(Vec::new(), None, Duration::ZERO);
        index
    }

    pub fn is_live(&self) -> bool {
        self.live
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Forgets everything: tree, request ids, strings, conversations.
    pub fn reset(&mut self) -> bool {
        let was_live = self.live;
        let (alpha, limits) = (self.alpha, self.limits);
        let clock = std::mem::replace(&mut self.clock, Box::new(|| Duration::ZERO));
        *self = LiveIndex::with_clock(alpha, limits, clock);
        was_live
    }

    /// Sets the alpha a not-yet-live index will be built with (the first
    /// call's parameters stay for the life of the index, as in the reference).
    pub fn set_alpha_if_idle(&mut self, alpha: f64) {
        if !self.live {
            self.alpha = alpha;
        }
    }

    // -- nodes --------------------------------------------------------------

    fn add_node(&mut self, docs: Vec<u32>, parent: Option<usize>, now: Duration) -> usize {
        let id = self.next_node;
        self.next_node += 1;
        self.keys.retain(&docs);
        self.nodes.insert(
            id,
            LiveNode {
                docs,
                children: Vec::new(),
                parent,
                requests: Vec::new(),
                last_access: now,
                tokens: 0,
                child_index: None,
            },
        );
        if let Some(p) = parent {
            self.attach_child(p, id, None);
        }
        id
    }

    /// Adds `child` to `parent`'s children (at `at`, else last).
    fn attach_child(&mut self, parent: usize, child: usize, at: Option<usize>) {
        let child_docs = self
            .nodes
            .get(&child)
            .map(|c| c.docs.clone())
            .unwrap_or_default();
        let Some(p) = self.nodes.get_mut(&parent) else {
            return;
        };
        match at {
            Some(i) if i <= p.children.len() => p.children.insert(i, child),
            _ => p.children.push(child),
        }
        if let Some(index) = p.child_index.as_mut() {
            for (pos, d) in child_docs.into_iter().enumerate() {
                index.entry(d).or_default().push((child, pos as u32));
            }
        } else if p.children.len() > WIDE_NODE {
            self.build_child_index(parent);
        }
        if let Some(c) = self.nodes.get_mut(&child) {
            c.parent = Some(parent);
        }
    }

    fn build_child_index(&mut self, parent: usize) {
        let children = match self.nodes.get(&parent) {
            Some(p) => p.children.clone(),
            None => return,
        };
        let mut index: FxMap<u32, Vec<(usize, u32)>> = FxMap::default();
        for c in children {
            if let Some(n) = self.nodes.get(&c) {
                for (pos, &d) in n.docs.iter().enumerate() {
                    index.entry(d).or_default().push((c, pos as u32));
                }
            }
        }
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.child_index = Some(index);
        }
    }

    /// Removes `child` from `parent`'s children; returns its position.
    fn detach_child(&mut self, parent: usize, child: usize) -> Option<usize> {
        let child_docs = self
            .nodes
            .get(&child)
            .map(|c| c.docs.clone())
            .unwrap_or_default();
        let p = self.nodes.get_mut(&parent)?;
        let pos = p.children.iter().position(|&c| c == child)?;
        p.children.remove(pos);
        if let Some(index) = p.child_index.as_mut() {
            for d in child_docs {
                if let Some(list) = index.get_mut(&d) {
                    if let Some(i) = list.iter().position(|&(c, _)| c == child) {
                        list.swap_remove(i);
                    }
                    if list.is_empty() {
                        index.remove(&d);
                    }
                }
            }
        }
        Some(pos)
    }

    fn touch(&mut self, node: usize, now: Duration) {
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        let leaf = !n.requests.is_empty();
        let before = n.last_access;
        n.last_access = now;
        if leaf {
            self.access.remove(&(before, node));
            self.access.insert((now, node));
        }
    }

    fn is_leaf(&self, node: usize) -> bool {
        node != self.root && self.nodes.get(&node).is_some_and(|n| n.children.is_empty())
    }

    /// The node's position at each level below the root.
    pub fn path_of(&self, node: usize) -> Vec<usize> {
        let mut path = Vec::new();
        let mut cur = node;
        while let Some(parent) = self.nodes.get(&cur).and_then(|n| n.parent) {
            let Some(pos) = self
                .nodes
                .get(&parent)
                .and_then(|p| p.children.iter().position(|&c| c == cur))
            else {
                break;
            };
            path.push(pos);
            cur = parent;
            if path.len() > self.nodes.len() {
                break;
            }
        }
        path.reverse();
        path
    }

    fn node_at(&self, path: &[usize]) -> Option<usize> {
        let mut cur = self.root;
        for &step in path {
            cur = *self.nodes.get(&cur)?.children.get(step)?;
        }
        Some(cur)
    }

    // -- request ids ----------------------------------------------------------

    fn new_request_id(&mut self) -> String {
        loop {
            self.request_seq += 1;
            let mut x = self.request_salt ^ self.request_seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^= x >> 31;
            let id = format!("req-{:012x}", x & 0xffff_ffff_ffff);
            if !self.requests.contains_key(&id) {
                return id;
            }
        }
    }

    fn attach_request(&mut self, leaf: usize, now: Duration) -> String {
        let rid = self.new_request_id();
        if leaf == self.root || !self.nodes.contains_key(&leaf) {
            self.track_request(&rid);
            return rid;
        }
        if let Some(n) = self.nodes.get_mut(&leaf) {
            // Identical contexts share a leaf: keep its newest ids only.
            if n.requests.len() >= MAX_REQUESTS_PER_LEAF {
                let old = n.requests.remove(0);
                self.requests.remove(&old);
            }
        }
        if let Some(n) = self.nodes.get_mut(&leaf) {
            let before = n.last_access;
            let first = n.requests.is_empty();
            n.requests.push(rid.clone());
            n.last_access = now;
            if !first {
                self.access.remove(&(before, leaf));
            }
            self.access.insert((now, leaf));
        }
        self.requests.insert(rid.clone(), Some(leaf));
        rid
    }

    /// Registers an id that has no node, so a later eviction of it is not
    /// reported as unknown. The oldest such ids are forgotten past a bound.
    pub fn track_request(&mut self, rid: &str) {
        if self.requests.contains_key(rid) {
            return;
        }
        self.requests.insert(rid.to_string(), None);
        self.tracked_only.push_back(rid.to_string());
        while self.tracked_only.len() > MAX_TRACKED {
            if let Some(old) = self.tracked_only.pop_front() {
                if matches!(self.requests.get(&old), Some(None)) {
                    self.requests.remove(&old);
                }
            }
        }
    }

    /// A fresh request id, tracked without a node.
    pub fn new_tracked_id(&mut self) -> String {
        let rid = self.new_request_id();
        self.track_request(&rid);
        rid
    }

    pub fn request_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.requests.keys().cloned().collect();
        ids.sort();
        ids
    }

    pub fn leaf_of(&self, rid: &str) -> Option<usize> {
        self.requests.get(rid).copied().flatten()
    }

    pub fn docs_of(&self, node: usize) -> Option<Vec<Key>> {
        let n = self.nodes.get(&node)?;
        Some(n.docs.iter().map(|&d| self.keys.key(d)).collect())
    }

    // -- search ---------------------------------------------------------------

    /// Greedy descent: at each node, the child with the least distance among
    /// those sharing a document; descend while that child starts with a
    /// document of the context.
    fn search_ids(&mut self, ctx: &[u32], update_access: bool, now: Duration) -> SearchResult {
        let started = Instant::now();
        let positions: FxMap<u32, u32> = ctx
            .iter()
            .enumerate()
            .map(|(p, &d)| (d, p as u32))
            .collect();
        let mut path = Vec::new();
        let mut cur = self.root;
        let result = loop {
            let best = self.closest_child(cur, ctx, &positions);
            let Some((pos, child, overlap)) = best else {
                break if cur == self.root {
                    SearchResult {
                        path: Vec::new(),
                        node: None,
                        overlap: 0,
                        has_prefix: false,
                    }
                } else {
                    let overlap = self.overlap(cur, &positions);
                    SearchResult {
                        path,
                        node: Some(cur),
                        overlap,
                        has_prefix: true,
                    }
                };
            };
            path.push(pos);
            let node = &self.nodes[&child];
            let starts_in_ctx = node.docs.first().is_some_and(|d| positions.contains_key(d));
            if starts_in_ctx && !node.children.is_empty() {
                cur = child;
                continue;
            }
            break SearchResult {
                path,
                node: Some(child),
                overlap,
                has_prefix: starts_in_ctx,
            };
        };
        if update_access {
            if let Some(node) = result.node {
                self.touch(node, now);
            }
        }
        self.searches += 1;
        self.search_time += started.elapsed();
        result
    }

    fn overlap(&self, node: usize, positions: &FxMap<u32, u32>) -> usize {
        self.nodes.get(&node).map_or(0, |n| {
            n.docs.iter().filter(|d| positions.contains_key(d)).count()
        })
    }

    /// (position, child, overlap) of the closest overlapping child; ties go
    /// to the child listed first.
    fn closest_child(
        &self,
        node: usize,
        ctx: &[u32],
        positions: &FxMap<u32, u32>,
    ) -> Option<(usize, usize, usize)> {
        let n = self.nodes.get(&node)?;
        // (child, shared blocks, summed position shift)
        let overlaps: Vec<(usize, usize, u64)> = match &n.child_index {
            // A wide node: count overlaps from the postings of the context's
            // blocks, so children sharing nothing are never looked at.
            Some(index) => {
                let mut acc: FxMap<usize, (usize, u64)> = FxMap::default();
                for (q, d) in ctx.iter().enumerate() {
                    for &(child, p) in index.get(d).map_or(&[][..], Vec::as_slice) {
                        let e = acc.entry(child).or_insert((0, 0));
                        e.0 += 1;
                        e.1 += u64::from(p.abs_diff(q as u32));
                    }
                }
                acc.into_iter().map(|(c, (s, x))| (c, s, x)).collect()
            }
            None => n
                .children
                .iter()
                .filter_map(|&child| {
                    let c = self.nodes.get(&child)?;
                    let mut shared = 0usize;
                    let mut shift = 0u64;
                    for (p, d) in c.docs.iter().enumerate() {
                        if let Some(&q) = positions.get(d) {
                            shared += 1;
                            shift += u64::from((p as u32).abs_diff(q));
                        }
                    }
                    (shared > 0).then_some((child, shared, shift))
                })
                .collect(),
        };
        let mut best: Option<f64> = None;
        let mut tied: Vec<(usize, usize)> = Vec::new();
        for (child, shared, shift) in overlaps {
            let len = self.nodes.get(&child).map_or(0, |c| c.docs.len());
            let longest = ctx.len().max(len) as f64;
            let d = (1.0 - shared as f64 / longest) + self.alpha * (shift as f64 / shared as f64);
            match best {
                Some(b) if d > b => {}
                Some(b) if d == b => tied.push((child, shared)),
                _ => {
                    best = Some(d);
                    tied.clear();
                    tied.push((child, shared));
                }
            }
        }
        let (child, shared) = match tied.len() {
            0 => return None,
            1 => tied[0],
            _ => {
                let order: FxMap<usize, usize> = n
                    .children
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| (c, i))
                    .collect();
                *tied
                    .iter()
                    .min_by_key(|(c, _)| order.get(c).copied().unwrap_or(usize::MAX))?
            }
        };
        let pos = n.children.iter().position(|&c| c == child)?;
        Some((pos, child, shared))
    }

    /// `/search`: the node a context would attach to.
    pub fn search(&mut self, ctx: &[Key], update_access: bool) -> SearchResult {
        let now = (self.clock)();
        let ids = self.lookup_ids(ctx);
        let result = self.search_ids(&ids, update_access, now);
        self.keys.forget_unreferenced(&ids);
        result
    }

    fn lookup_ids(&mut self, ctx: &[Key]) -> Vec<u32> {
        let mut seen = HashSet::new();
        ctx.iter()
            .filter(|k| seen.insert(*k))
            .map(|k| self.keys.id(k))
            .collect()
    }

    // -- insertion ------------------------------------------------------------

    /// Places one context, returning its leaf and its order, or `None` when
    /// nothing in the tree overlaps it.
    fn place(&mut self, ctx: &[u32], now: Duration) -> Option<(usize, Vec<u32>)> {
        let found = self.search_ids(ctx, true, now);
        let node = found.node?;
        if found.overlap == 0 {
            return None;
        }
        let node_docs = self.nodes[&node].docs.clone();
        let in_ctx: FxSet<u32> = ctx.iter().copied().collect();
        let mut order: Vec<u32> = node_docs
            .iter()
            .copied()
            .filter(|d| in_ctx.contains(d))
            .collect();
        let head: FxSet<u32> = order.iter().copied().collect();
        order.extend(ctx.iter().copied().filter(|d| !head.contains(d)));

        let parent = self.nodes[&node].parent.unwrap_or(self.root);
        let leaf = if !found.has_prefix {
            self.add_node(order.clone(), Some(parent), now)
        } else if self.nodes[&node].docs == order {
            node
        } else if !self.is_leaf(node) {
            self.add_node(order.clone(), Some(node), now)
        } else {
            self.split_leaf(node, parent, &order, now)
        };
        self.insertions += 1;
        Some((leaf, order))
    }

    /// Inserts `order` next to leaf `leaf`: the same documents share the
    /// leaf; a context extending the leaf's goes below it; otherwise their
    /// contiguous common prefix becomes a new internal node above both,
    /// unless it is empty or just the parent's documents again, when the new
    /// leaf becomes a sibling.
    fn split_leaf(&mut self, leaf: usize, parent: usize, order: &[u32], now: Duration) -> usize {
        let leaf_docs = self.nodes[&leaf].docs.clone();
        if leaf_docs.len() == order.len() && leaf_docs == order {
            return leaf;
        }
        let common = leaf_docs
            .iter()
            .zip(order)
            .take_while(|(a, b)| a == b)
            .count();
        if common == leaf_docs.len() {
            // The new context extends the leaf's: it goes below it (the leaf
            // keeps its requests and becomes their shared prefix).
            return self.add_node(order.to_vec(), Some(leaf), now);
        }
        let same_as_parent = self
            .nodes
            .get(&parent)
            .is_some_and(|p| p.docs[..] == leaf_docs[..common]);
        if same_as_parent && common == order.len() {
            return parent;
        }
        if common == 0 || same_as_parent {
            return self.add_node(order.to_vec(), Some(parent), now);
        }
        let at = self.detach_child(parent, leaf);
        let mid = self.add_node(leaf_docs[..common].to_vec(), None, now);
        self.attach_child(parent, mid, at);
        self.attach_child(mid, leaf, None);
        self.add_node(order.to_vec(), Some(mid), now)
    }

    /// Grafts a batch index under `parent`, returning the new id of every
    /// node of `result`.
    fn graft(&mut self, result: &cluster::IndexResult, now: Duration) -> HashMap<usize, usize> {
        let mut map = HashMap::new();
        let Some(root) = result.root else {
            return map;
        };
        let mut stack: Vec<(usize, usize)> = Vec::new();
        match result.node(root) {
            Some(r) if r.content.is_empty() => {
                map.insert(root, self.root);
                for &c in r.children.iter().rev() {
                    stack.push((c, self.root));
                }
            }
            Some(_) => stack.push((root, self.root)),
            None => return map,
        }
        while let Some((old, parent)) = stack.pop() {
            let Some(n) = result.node(old) else { continue };
            let new = self.add_node(n.doc_ids.clone(), Some(parent), now);
            self.insertions += 1;
            map.insert(old, new);
            for &c in n.children.iter().rev() {
                stack.push((c, new));
            }
        }
        map
    }

    // -- reorder --------------------------------------------------------------

    /// `/reorder` in the stateful mode: the first call builds the index, later
    /// calls place their contexts incrementally.
    pub fn reorder(
        &mut self,
        contexts: &[Vec<Key>],
        conversation_id: Option<&str>,
    ) -> ReorderOutcome {
        let now = (self.clock)();
        self.expire(now);
        let mode = if self.live { "incremental" } else { "initial" };
        if contexts.is_empty() {
            return ReorderOutcome {
                mode,
                request_ids: Vec::new(),
                reordered: Vec::new(),
                leaves: Vec::new(),
                order: Vec::new(),
                groups: Vec::new(),
                matched: 0,
                merged: 0,
                warnings: Vec::new(),
            };
        }
        let ids: Vec<Vec<u32>> = contexts.iter().map(|c| self.lookup_ids(c)).collect();
        // An empty context has nothing to place: its request id is tracked
        // without a node.
        let empty: Vec<usize> = (0..ids.len()).filter(|&i| ids[i].is_empty()).collect();
        let mut leaves = vec![usize::MAX; ids.len()];
        let mut orders: Vec<Vec<u32>> = ids.clone();
        let mut matched = 0;
        let mut unmatched = Vec::new();
        let mut schedule = None;

        if self.live {
            for (i, ctx) in ids.iter().enumerate() {
                if ctx.is_empty() {
                    continue;
                }
                match self.place(ctx, now) {
                    Some((leaf, order)) => {
                        leaves[i] = leaf;
                        orders[i] = order;
                        matched += 1;
                    }
                    None => unmatched.push(i),
                }
            }
        } else {
            unmatched = (0..ids.len()).filter(|&i| !ids[i].is_empty()).collect();
        }

        if !unmatched.is_empty() {
            let batch: Vec<Vec<u32>> = unmatched.iter().map(|&i| ids[i].clone()).collect();
            let result = cluster::build_index(&batch, self.alpha);
            let map = self.graft(&result, now);
            for (k, &i) in unmatched.iter().enumerate() {
                orders[i] = result.reordered[k].clone();
                leaves[i] = map.get(&result.leaf_of[k]).copied().unwrap_or(usize::MAX);
            }
            if !self.live {
                // The batch's own schedule, in input indices, empty contexts
                // last as a group of their own.
                let batch_schedule = cluster::schedule(&result);
                let mut order: Vec<usize> =
                    batch_schedule.order.iter().map(|&k| unmatched[k]).collect();
                let mut groups: Vec<Vec<usize>> = batch_schedule
                    .groups
                    .iter()
                    .map(|g| g.iter().map(|&k| unmatched[k]).collect())
                    .collect();
                if !empty.is_empty() {
                    order.extend(&empty);
                    groups.push(empty.clone());
                }
                schedule = Some(cluster::Schedule { order, groups });
            }
        } else if !self.live {
            schedule = Some(cluster::Schedule {
                order: empty.clone(),
                groups: vec![empty.clone()],
            });
        }
        self.live = true;

        let request_ids: Vec<String> = leaves
            .iter()
            .map(|&leaf| self.attach_request(leaf, now))
            .collect();
        let schedule = schedule.unwrap_or_else(|| {
            let paths: Vec<Vec<usize>> = leaves.iter().map(|&l| self.path_of(l)).collect();
            cluster::schedule_paths(&paths)
        });

        let mut warnings = Vec::new();
        match conversation_id {
            Some(cid) if !cid.is_empty() => {
                self.explicit_conversations = true;
                let docs: Vec<Key> = contexts.iter().flatten().cloned().collect();
                self.remember_conversation(cid, docs);
            }
            _ if self.explicit_conversations => warnings.push(
                "this call has no conversation_id although earlier ones did: its documents \
                 are not tracked for any conversation (risk of cross-contamination between \
                 conversations)"
                    .to_string(),
            ),
            _ => {}
        }
        let reordered = orders
            .iter()
            .map(|o| o.iter().map(|&d| self.keys.key(d)).collect())
            .collect();
        self.enforce_leaf_bound();
        for ctx in &ids {
            self.keys.forget_unreferenced(ctx);
        }
        ReorderOutcome {
            mode,
            request_ids,
            reordered,
            leaves,
            order: schedule.order,
            groups: schedule.groups,
            matched,
            merged: if mode == "initial" {
                0
            } else {
                unmatched.len()
            },
            warnings,
        }
    }

    /// `/insert`: a new leaf at `path` (an invalid path means the root; a
    /// leaf means next to it; an internal node means below it).
    pub fn insert(&mut self, ctx: &[Key], path: &[usize], tokens: i64) -> (usize, String) {
        let now = (self.clock)();
        let ids = self.lookup_ids(ctx);
        let target = self.node_at(path).unwrap_or(self.root);
        let parent = if self.is_leaf(target) {
            self.nodes[&target].parent.unwrap_or(self.root)
        } else {
            target
        };
        let leaf = self.add_node(ids, Some(parent), now);
        if let Some(n) = self.nodes.get_mut(&leaf) {
            n.tokens = tokens;
        }
        self.insertions += 1;
        self.live = true;
        let rid = self.attach_request(leaf, now);
        self.enforce_leaf_bound();
        (leaf, rid)
    }

    /// `/update`: adds `delta` to the token count of the node at `path`.
    pub fn update_tokens(&mut self, path: &[usize], delta: i64) -> Option<(usize, i64)> {
        let node = self.node_at(path)?;
        let n = self.nodes.get_mut(&node)?;
        n.tokens = n.tokens.saturating_add(delta);
        Some((node, n.tokens))
    }

    // -- removal --------------------------------------------------------------

    /// Removes request ids. A node goes when it holds neither requests nor
    /// children any more, and so do the ancestors that this leaves empty
    /// (never the root).
    pub fn remove_requests(&mut self, ids: &[String]) -> Eviction {
        let mut out = Eviction::default();
        for rid in ids {
            match self.requests.remove(rid) {
                None => out.not_found.push(rid.clone()),
                Some(None) => out.removed += 1,
                Some(Some(node)) => {
                    out.removed += 1;
                    out.evicted_requests.push(rid.clone());
                    let emptied = match self.nodes.get_mut(&node) {
                        Some(n) => {
                            n.requests.retain(|r| r != rid);
                            n.requests.is_empty().then_some(n.last_access)
                        }
                        None => None,
                    };
                    if let Some(at) = emptied {
                        self.access.remove(&(at, node));
                        self.prune(node, &mut out.evicted_nodes);
                    }
                }
            }
        }
        self.removals += out.removed as u64;
        out
    }

    /// Removes `node` if it holds no requests and no children, then its
    /// ancestors while the same holds for them.
    fn prune(&mut self, node: usize, evicted: &mut Vec<usize>) {
        let mut cur = node;
        while cur != self.root {
            let Some(n) = self.nodes.get(&cur) else { break };
            if !n.children.is_empty() || !n.requests.is_empty() {
                break;
            }
            let parent = n.parent;
            if let Some(p) = parent {
                self.detach_child(p, cur);
            }
            if let Some(n) = self.nodes.remove(&cur) {
                self.access.remove(&(n.last_access, cur));
                self.keys.release(&n.docs);
            }
            evicted.push(cur);
            match parent {
                Some(p) => cur = p,
                None => break,
            }
        }
    }

    /// Forgets every request of `node` (for the bounds), then prunes it.
    fn drop_requests_of(&mut self, node: usize) {
        let Some(n) = self.nodes.get_mut(&node) else {
            return;
        };
        let requests = std::mem::take(&mut n.requests);
        let at = n.last_access;
        for rid in &requests {
            self.requests.remove(rid);
        }
        self.access.remove(&(at, node));
        self.prune(node, &mut Vec::new());
    }

    fn expire(&mut self, now: Duration) {
        let Some(ttl) = self.limits.ttl else { return };
        while let Some(&(at, leaf)) = self.access.first() {
            if now.saturating_sub(at) < ttl {
                break;
            }
            self.access.remove(&(at, leaf));
            self.drop_requests_of(leaf);
            self.expired += 1;
        }
    }

    fn enforce_leaf_bound(&mut self) {
        while self.access.len() > self.limits.max_leaves {
            let Some(&(at, leaf)) = self.access.first() else {
                break;
            };
            self.access.remove(&(at, leaf));
            self.drop_requests_of(leaf);
            self.lru_evicted += 1;
        }
    }

    /// Applies the TTL now (the gateway calls it before answering reads).
    pub fn expire_now(&mut self) {
        let now = (self.clock)();
        self.expire(now);
    }

    pub fn stats(&self) -> LiveStats {
        LiveStats {
            num_nodes: self.nodes.len(),
            leaf_nodes: self.access.len(),
            total_tokens: self
                .nodes
                .values()
                .fold(0i64, |sum, n| sum.saturating_add(n.tokens)),
            num_requests: self.requests.len(),
            total_searches: self.searches,
            total_insertions: self.insertions,
            total_removals: self.removals,
            expired: self.expired,
            lru_evicted: self.lru_evicted,
            strings: self.keys.len(),
            avg_search_time_us: if self.searches == 0 {
                0.0
            } else {
                self.search_time.as_secs_f64() * 1e6 / self.searches as f64
            },
        }
    }

    // -- conversations ----------------------------------------------------------

    fn remember_conversation(&mut self, cid: &str, docs: Vec<Key>) {
        if !self.conversations.contains_key(cid) {
            if self.conversations.len() >= MAX_CONVERSATIONS {
                if let Some(old) = self.conversation_order.pop_front() {
                    self.conversations.remove(&old);
                }
            }
            self.conversation_order.push_back(cid.to_string());
        }
        let entry = self
            .conversations
            .entry(cid.to_string())
            .or_insert_with(|| (HashSet::new(), 0));
        if entry.0.len() + docs.len() > MAX_CONVERSATION_DOCS {
            entry.0.clear();
        }
        entry.0.extend(docs);
    }

    /// Dedup against a `conversation_id` that an earlier `reorder` named:
    /// documents already sent there become hints; every context's documents
    /// count as sent for the contexts after it.
    pub fn deduplicate_conversation(
        &mut self,
        contexts: &[Vec<Key>],
        cid: &str,
        template: Option<&str>,
    ) -> Result<Vec<DedupResult>, String> {
        if cid.is_empty() {
            return Err("conversation_id is required".into());
        }
        let Some((seen, turns)) = self.conversations.get_mut(cid) else {
            return Err(format!(
                "No prior /reorder call found for conversation_id {cid:?}; call /reorder with it first"
            ));
        };
        let template = template.unwrap_or(CONVERSATION_HINT);
        let mut results = Vec::new();
        for ctx in contexts {
            let (overlapping, new): (Vec<Key>, Vec<Key>) =
                ctx.iter().cloned().partition(|k| seen.contains(k));
            let hints = overlapping
                .iter()
                .map(|k| fill(template, k, None, None))
                .collect();
            if seen.len() + ctx.len() > MAX_CONVERSATION_DOCS {
                seen.clear();
            }
            seen.extend(ctx.iter().cloned());
            results.push(DedupResult {
                original: ctx.clone(),
                overlapping,
                new,
                hints,
                source_turns: Vec::new(),
                new_conversation: false,
            });
        }
        *turns += 1;
        Ok(results)
    }

    /// Dedup along parent request chains (`parent_request_ids`), then
    /// registers each context under its request id as the next turn.
    pub fn deduplicate_chain(
        &mut self,
        contexts: &[Vec<Key>],
        request_ids: &[String],
        parents: &[Option<String>],
        template: Option<&str>,
    ) -> Vec<DedupResult> {
        let template = template.unwrap_or(TRACKER_HINT);
        let mut results = Vec::new();
        for (i, ctx) in contexts.iter().enumerate() {
            let parent = parents
                .get(i)
                .cloned()
                .flatten()
                .filter(|p| self.tracked.contains_key(p));
            let mut first_source: HashMap<Key, (u32, String)> = HashMap::new();
            let mut turn = 1;
            if let Some(p) = &parent {
                turn = self.tracked[p].turn + 1;
                let mut visited = HashSet::new();
                let mut cur = Some(p.clone());
                while let Some(id) = cur {
                    if visited.len() >= MAX_CHAIN || !visited.insert(id.clone()) {
                        break;
                    }
                    let Some(t) = self.tracked.get(&id) else {
                        break;
                    };
                    // Walking towards the root: an earlier turn overwrites,
                    // so the first turn that sent a document is kept.
                    for d in &t.docs {
                        first_source.insert(d.clone(), (t.turn, id.clone()));
                    }
                    cur = t.parent.clone();
                }
            }
            let (overlapping, new): (Vec<Key>, Vec<Key>) = ctx
                .iter()
                .cloned()
                .partition(|k| first_source.contains_key(k));
            let hints = overlapping
                .iter()
                .map(|k| {
                    let (turn, source) = &first_source[k];
                    fill(template, k, Some(*turn), Some(source))
                })
                .collect();
            let source_turns = overlapping
                .iter()
                .map(|k| (k.clone(), first_source[k].0))
                .collect();
            if let Some(rid) = request_ids.get(i) {
                self.track_turn(rid, parent.clone(), ctx.clone(), turn);
            }
            results.push(DedupResult {
                original: ctx.clone(),
                overlapping,
                new,
                hints,
                source_turns,
                new_conversation: parent.is_none(),
            });
        }
        results
    }

    fn track_turn(&mut self, rid: &str, parent: Option<String>, docs: Vec<Key>, turn: u32) {
        if !self.tracked.contains_key(rid) {
            if self.tracked.len() >= MAX_TRACKED {
                if let Some(old) = self.tracked_order.pop_front() {
                    self.tracked.remove(&old);
                    self.turn_children.remove(&old);
                }
            }
            self.tracked_order.push_back(rid.to_string());
        }
        if let Some(p) = &parent {
            self.turn_children
                .entry(p.clone())
                .or_default()
                .push(rid.to_string());
        }
        self.tracked
            .insert(rid.to_string(), Tracked { parent, docs, turn });
    }

    /// Forgets the conversation chain a request belongs to (every request
    /// linked to it by parent ids); returns how many chains were cleared.
    pub fn clear_conversation(&mut self, rid: &str) -> usize {
        if !self.tracked.contains_key(rid) {
            return 0;
        }
        let mut chain: HashSet<String> = HashSet::new();
        let mut cur = Some(rid.to_string());
        while let Some(id) = cur {
            if chain.len() >= MAX_CHAIN || !chain.insert(id.clone()) {
                break;
            }
            cur = self.tracked.get(&id).and_then(|t| t.parent.clone());
        }
        // Descendants too: every later turn built on one of these.
        let mut queue: Vec<String> = chain.iter().cloned().collect();
        while let Some(id) = queue.pop() {
            for child in self.turn_children.remove(&id).unwrap_or_default() {
                if self.tracked.contains_key(&child) && chain.insert(child.clone()) {
                    queue.push(child);
                }
            }
        }
        for id in &chain {
            self.tracked.remove(id);
            self.turn_children.remove(id);
        }
        self.tracked_order.retain(|id| !chain.contains(id));
        1
    }
}

fn fill(template: &str, key: &Key, turn: Option<u32>, source: Option<&str>) -> String {
    let mut out = template.replace("{doc_id}", &key.to_string());
    if let Some(turn) = turn {
        out = out.replace("{turn_number}", &turn.to_string());
    }
    if let Some(source) = source {
        out = out.replace("{source_request}", source);
    }
    out
}

/// `/evict` id normalisation: engine prefixes (`cmpl-`, `chatcmpl-`,
/// `batch-`) and vLLM's `-<n>-<hex>` suffix are dropped, health-check and
/// empty ids are ignored, duplicates collapse (first kept).
pub fn normalize_request_ids(ids: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for id in ids {
        let mut s = id.as_str();
        for prefix in ["chatcmpl-", "cmpl-", "batch-"] {
            if let Some(rest) = s.strip_prefix(prefix) {
                s = rest;
                break;
            }
        }
        let s = strip_vllm_suffix(s);
        if s.is_empty() || s.starts_with("HEALTH_CHECK") {
            continue;
        }
        if seen.insert(s.to_string()) {
            out.push(s.to_string());
        }
    }
    out
}

/// `req-<x>-<digits>-<hex>` → `req-<x>`.
fn strip_vllm_suffix(id: &str) -> &str {
    let Some(rest) = id.strip_prefix("req-") else {
        return id;
    };
    let parts: Vec<&str> = rest.split('-').collect();
    if parts.len() == 3
        && !parts[0].is_empty()
        && !parts[1].is_empty()
        && parts[1].bytes().all(|b| b.is_ascii_digit())
        && !parts[2].is_empty()
        && parts[2].bytes().all(|b| b.is_ascii_hexdigit())
    {
        &id[..4 + parts[0].len()]
    } else {
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn ints(c: &[u64]) -> Vec<Key> {
        c.iter().map(|&n| Key::Int(n)).collect()
    }

    fn batch(cs: &[&[u64]]) -> Vec<Vec<Key>> {
        cs.iter().map(|c| ints(c)).collect()
    }

    fn as_ints(c: &[Key]) -> Vec<u64> {
        c.iter()
            .map(|k| match k {
                Key::Int(n) => *n,
                Key::Str(_) => panic!("string key"),
            })
            .collect()
    }

    fn index() -> LiveIndex {
        LiveIndex::new(cluster::DEFAULT_ALPHA, Limits::default())
    }

    /// Case 13: one context per call on one index.
    #[test]
    fn online_sequence() {
        let mut ix = index();
        let mut run = |c: &[u64]| as_ints(&ix.reorder(&batch(&[c]), None).reordered[0]);
        assert_eq!(run(&[4, 3, 1]), [4, 3, 1]);
        assert_eq!(run(&[2, 9, 3, 4]), [4, 3, 2, 9]);
        assert_eq!(run(&[7, 4, 8]), [4, 7, 8]);
        assert_eq!(run(&[5, 6]), [5, 6]);
        assert_eq!(run(&[3, 4, 1, 2]), [4, 3, 2, 1]);
    }

    /// Case 14: incremental batches count matched and merged contexts.
    #[test]
    fn incremental_batches() {
        let mut ix = index();
        let first = ix.reorder(
            &batch(&[
                &[1, 2, 3, 4, 5],
                &[1, 2, 3, 6, 7],
                &[1, 2, 8, 9, 10],
                &[11, 12, 13, 14, 15],
                &[11, 12, 13, 16, 17],
            ]),
            None,
        );
        assert_eq!(first.mode, "initial");
        let before = ix.stats().num_requests;
        let second = ix.reorder(
            &batch(&[
                &[1, 2, 3, 4, 20],
                &[1, 2, 3, 21, 22],
                &[11, 12, 13, 23, 24],
                &[30, 31, 32, 33, 34],
                &[30, 31, 32, 35, 36],
            ]),
            None,
        );
        assert_eq!(second.mode, "incremental");
        assert_eq!((second.matched, second.merged), (3, 2));
        assert!(second
            .request_ids
            .iter()
            .all(|r| !first.request_ids.contains(r)));
        assert_eq!(second.request_ids.iter().collect::<HashSet<_>>().len(), 5);
        assert!(ix.stats().num_requests > before);
        // Orders of matched contexts already start with their shared blocks.
        assert_eq!(as_ints(&second.reordered[0]), [1, 2, 3, 4, 20]);
        assert_eq!(as_ints(&second.reordered[2]), [11, 12, 13, 23, 24]);
        // Deliberate difference: the two unmatched contexts keep their shared
        // node [30, 31, 32] (the reference lost it), so they sit together.
        let (a, b) = (second.leaves[3], second.leaves[4]);
        assert_eq!(ix.nodes[&a].parent, ix.nodes[&b].parent);
        let shared = ix.nodes[&a].parent.unwrap();
        assert_eq!(as_ints(&ix.docs_of(shared).unwrap()), [30, 31, 32]);

        let mut ix = index();
        ix.reorder(
            &batch(&[&[1, 2, 3, 4, 5], &[1, 2, 3, 6, 7], &[10, 20, 30, 40, 50]]),
            None,
        );
        let r = ix.reorder(
            &batch(&[
                &[1, 2, 3, 100, 101],
                &[1, 2, 3, 4, 102],
                &[10, 20, 30, 103, 104],
            ]),
            None,
        );
        assert_eq!((r.matched, r.merged), (3, 0));
        let r = ix.reorder(&batch(&[&[500, 501], &[600, 601], &[700, 701]]), None);
        assert_eq!((r.matched, r.merged), (0, 3));
    }

    /// A context's own leaf can be the shared prefix of others: evicting
    /// its request keeps the node for them, and evicting theirs keeps it
    /// for its request.
    #[test]
    fn nodes_holding_requests_and_children() {
        let mut ix = index();
        let out = ix.reorder(&batch(&[&[1, 2], &[3, 4, 1, 2], &[5, 6, 1, 2]]), None);
        let [r0, r1, r2] = [0, 1, 2].map(|i| out.request_ids[i].clone());
        let holder = ix.leaf_of(&r0).unwrap();
        assert!(!ix.nodes[&holder].children.is_empty(), "{:?}", ix.nodes);
        ix.remove_requests(&[r1.clone(), r2.clone()]);
        assert_eq!(ix.leaf_of(&r0), Some(holder), "r0 survives its children");
        let out = ix.reorder(&batch(&[&[1, 2], &[7, 1, 2]]), None);
        ix.remove_requests(std::slice::from_ref(&r0));
        for rid in &out.request_ids {
            let leaf = ix.leaf_of(rid).unwrap();
            let mut cur = leaf;
            while let Some(p) = ix.nodes[&cur].parent {
                cur = p;
            }
            assert_eq!(cur, ix.root, "node {leaf} is still reachable");
        }
        ix.remove_requests(&out.request_ids);
        assert_eq!((ix.stats().num_nodes, ix.stats().num_requests), (1, 0));
        assert!(ix.access.is_empty());
    }

    #[test]
    fn empty_contexts_have_no_node() {
        let mut ix = index();
        let out = ix.reorder(&batch(&[&[], &[1, 2], &[]]), None);
        assert_eq!(out.request_ids.len(), 3);
        assert_eq!(out.order.iter().filter(|&&i| i != 1).count(), 2);
        assert_eq!(ix.stats().leaf_nodes, 1);
        assert!(!ix.access.iter().any(|&(_, n)| n == ix.root));
        let out = ix.reorder(&batch(&[&[]]), None);
        assert_eq!(out.reordered, [Vec::<Key>::new()]);
        assert!(ix.reorder(&[], None).request_ids.is_empty());
        let mut fresh = index();
        fresh.reorder(&[], None);
        assert!(!fresh.is_live(), "no contexts: nothing was built");
    }

    #[test]
    fn request_ids_per_leaf_are_bounded() {
        let mut ix = index();
        for _ in 0..MAX_REQUESTS_PER_LEAF + 50 {
            ix.reorder(&batch(&[&[1, 2, 3]]), None);
        }
        assert_eq!(ix.stats().leaf_nodes, 1);
        assert_eq!(ix.stats().num_requests, MAX_REQUESTS_PER_LEAF);
    }

    #[test]
    fn token_counts_saturate() {
        let mut ix = index();
        ix.reorder(&batch(&[&[1]]), None);
        ix.insert(&ints(&[2]), &[], i64::MAX);
        ix.insert(&ints(&[3]), &[], i64::MAX);
        assert_eq!(ix.stats().total_tokens, i64::MAX);
    }

    /// A context extending a leaf goes below it; the same documents again
    /// share the node.
    #[test]
    fn an_extension_goes_below_its_prefix() {
        let mut ix = index();
        let a = ix.reorder(&batch(&[&[1, 2]]), None).leaves[0];
        let b = ix.reorder(&batch(&[&[1, 2, 3]]), None).leaves[0];
        assert_eq!(ix.nodes[&b].parent, Some(a));
        assert_eq!(ix.stats().num_nodes, 3);
        let again = ix.reorder(&batch(&[&[2, 1]]), None);
        assert_eq!(again.leaves[0], a);
        assert_eq!(as_ints(&again.reordered[0]), [1, 2]);
        assert_eq!(ix.stats().num_nodes, 3);
    }

    /// Case 17: conversation dedup by conversation id.
    #[test]
    fn conversation_dedup() {
        let mut ix = index();
        ix.reorder(&batch(&[&[1, 2, 3]]), Some("c1"));
        let r = ix
            .deduplicate_conversation(&batch(&[&[1, 2, 5]]), "c1", None)
            .unwrap();
        assert_eq!(as_ints(&r[0].overlapping), [1, 2]);
        assert_eq!(as_ints(&r[0].new), [5]);
        assert_eq!(
            r[0].hints,
            [
                "Please refer to [Doc 1] from the previous conversation.",
                "Please refer to [Doc 2] from the previous conversation."
            ]
        );
        ix.deduplicate_conversation(&batch(&[&[3, 4, 5]]), "c1", None)
            .unwrap();
        let r = ix
            .deduplicate_conversation(&batch(&[&[2, 4, 6]]), "c1", None)
            .unwrap();
        assert_eq!(
            r[0].overlapping.iter().collect::<HashSet<_>>(),
            ints(&[2, 4]).iter().collect()
        );
        assert_eq!(as_ints(&r[0].new), [6]);

        let mut ix = index();
        ix.reorder(&batch(&[&[1, 2], &[3, 4]]), Some("b"));
        let r = ix
            .deduplicate_conversation(&batch(&[&[1, 5], &[3, 6]]), "b", None)
            .unwrap();
        assert_eq!(
            (as_ints(&r[0].overlapping), as_ints(&r[0].new)),
            (vec![1], vec![5])
        );
        assert_eq!(
            (as_ints(&r[1].overlapping), as_ints(&r[1].new)),
            (vec![3], vec![6])
        );

        let mut ix = index();
        ix.reorder(&batch(&[&[1, 2, 3]]), Some("user_a"));
        ix.reorder(&batch(&[&[10, 20, 30]]), Some("user_b"));
        let a = ix
            .deduplicate_conversation(&batch(&[&[1, 10]]), "user_a", None)
            .unwrap();
        let b = ix
            .deduplicate_conversation(&batch(&[&[1, 10]]), "user_b", None)
            .unwrap();
        assert_eq!(as_ints(&a[0].overlapping), [1]);
        assert_eq!(as_ints(&b[0].overlapping), [10]);

        let err = ix
            .deduplicate_conversation(&batch(&[&[1]]), "nope", None)
            .unwrap_err();
        assert!(err.contains("No prior /reorder call found"), "{err}");
        let err = ix
            .deduplicate_conversation(&batch(&[&[1]]), "", None)
            .unwrap_err();
        assert!(err.contains("conversation_id is required"), "{err}");
        let r = ix
            .deduplicate_conversation(&batch(&[&[1]]), "user_a", Some("See doc {doc_id} above."))
            .unwrap();
        assert_eq!(r[0].hints, ["See doc 1 above."]);
    }

    /// The parent-chain form that `/reorder` with `deduplicate` uses.
    #[test]
    fn chain_dedup_names_the_first_turn() {
        let mut ix = index();
        let t1 = ix.deduplicate_chain(&batch(&[&[1, 2, 3]]), &["r1".into()], &[None], None);
        assert!(t1[0].new_conversation);
        let t2 = ix.deduplicate_chain(
            &batch(&[&[2, 4]]),
            &["r2".into()],
            &[Some("r1".into())],
            None,
        );
        assert_eq!(as_ints(&t2[0].overlapping), [2]);
        let t3 = ix.deduplicate_chain(
            &batch(&[&[2, 4, 5]]),
            &["r3".into()],
            &[Some("r2".into())],
            Some("{doc_id}@{turn_number}/{source_request}"),
        );
        assert_eq!(t3[0].hints, ["2@1/r1", "4@2/r2"]);
        assert_eq!(as_ints(&t3[0].new), [5]);
        // An unknown parent starts a new conversation.
        let t = ix.deduplicate_chain(&batch(&[&[1]]), &["x".into()], &[Some("zz".into())], None);
        assert!(t[0].new_conversation && t[0].overlapping.is_empty());
        assert_eq!(ix.clear_conversation("r2"), 1);
        let t = ix.deduplicate_chain(&batch(&[&[1]]), &["y".into()], &[Some("r3".into())], None);
        assert!(t[0].new_conversation, "the chain was cleared");
    }

    /// Case 18: a call without a conversation id after calls with one warns.
    #[test]
    fn cross_contamination_warning() {
        let mut ix = index();
        assert!(ix.reorder(&batch(&[&[1, 2]]), None).warnings.is_empty());
        let mut ix = index();
        ix.reorder(&batch(&[&[1, 2, 3]]), Some("user_a"));
        let out = ix.reorder(&batch(&[&[4, 5, 6]]), None);
        assert!(out.warnings[0].contains("cross-contamination"));
    }

    /// Case 19: eviction prunes emptied ancestors, never the root.
    #[test]
    fn eviction_and_pruning() {
        let mut ix = index();
        let out = ix.reorder(&batch(&[&[1, 2, 3], &[1, 2, 4], &[5, 6, 7]]), None);
        assert_eq!(ix.stats().num_nodes, 5);
        assert_eq!(ix.stats().num_requests, 3);
        let e = ix.remove_requests(&[out.request_ids[0].clone()]);
        assert_eq!(e.removed, 1);
        assert_eq!((ix.stats().num_nodes, ix.stats().num_requests), (4, 2));
        let e = ix.remove_requests(&[out.request_ids[1].clone(), "slot_3".into()]);
        assert_eq!(e.removed, 1);
        assert_eq!(e.not_found, ["slot_3"]);
        assert_eq!((ix.stats().num_nodes, ix.stats().num_requests), (2, 1));
        // A tracked id without a node is found and forgotten.
        ix.track_request("t1");
        let e = ix.remove_requests(&["t1".into()]);
        assert_eq!((e.removed, e.not_found.len()), (1, 0));
    }

    /// Case 20.
    #[test]
    fn evict_id_normalisation() {
        let ids: Vec<String> = [
            "chatcmpl-req-abc",
            "cmpl-req-abc",
            "req-xyz-3-deadbeef",
            "HEALTH_CHECK_1",
            "",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(normalize_request_ids(&ids), ["req-abc", "req-xyz"]);
    }

    /// Case 32, adapted: the reference's TTL model (sliding, 300 s) lived
    /// beside its index and never touched it; here it bounds the live leaves.
    #[test]
    fn leaves_expire_after_their_ttl() {
        let now = Arc::new(AtomicU64::new(1_000));
        let clock = now.clone();
        let mut ix = LiveIndex::with_clock(
            cluster::DEFAULT_ALPHA,
            Limits {
                max_leaves: 1000,
                ttl: Some(Duration::from_secs(300)),
            },
            Box::new(move || Duration::from_secs(clock.load(Ordering::SeqCst))),
        );
        let first = ix.reorder(&batch(&[&[1, 2, 3]]), None);
        now.store(1_299, Ordering::SeqCst);
        ix.expire_now();
        assert_eq!(ix.stats().leaf_nodes, 1, "still cached at t+299");
        // The same documents again: the leaf is refreshed, not duplicated.
        let again = ix.reorder(&batch(&[&[3, 2, 1]]), None);
        assert_eq!(again.leaves[0], first.leaves[0]);
        assert_eq!(ix.stats().leaf_nodes, 1);
        now.store(1_598, Ordering::SeqCst);
        ix.expire_now();
        assert_eq!(ix.stats().leaf_nodes, 1, "refreshed at t+299");
        now.store(1_600, Ordering::SeqCst);
        ix.expire_now();
        assert_eq!(ix.stats().leaf_nodes, 0);
        assert_eq!(ix.stats().num_requests, 0);
        assert_eq!(ix.stats().expired, 1);
        assert_eq!(ix.stats().num_nodes, 1, "only the root is left");
    }

    #[test]
    fn the_leaf_bound_drops_the_least_recently_used() {
        let mut ix = LiveIndex::new(
            cluster::DEFAULT_ALPHA,
            Limits {
                max_leaves: 3,
                ttl: None,
            },
        );
        for base in [10, 20, 30, 40, 50] {
            ix.reorder(&batch(&[&[base, base + 1]]), None);
        }
        assert_eq!(ix.stats().leaf_nodes, 3);
        assert_eq!(ix.stats().lru_evicted, 2);
        assert!(ix.search(&ints(&[10, 11]), false).node.is_none());
        assert!(ix.search(&ints(&[50, 51]), false).node.is_some());
        assert_eq!(ix.keys.len(), 0, "integers need no table");
        // Strings of dropped leaves leave the table too.
        for n in 0..10 {
            ix.reorder(
                &[vec![Key::Str(format!("a{n}")), Key::Str(format!("b{n}"))]],
                None,
            );
        }
        assert_eq!(ix.keys.len(), 6);
    }

    /// Case 7 on the live index: integer blocks keep numeric order in
    /// shared prefixes; strings keep first-appearance order.
    #[test]
    fn initial_build_orders_like_the_batch_algorithm() {
        let mut ix = index();
        let out = ix.reorder(&batch(&[&[5, 1, 9, 2], &[2, 7, 1, 5], &[8, 3, 4]]), None);
        let got: Vec<Vec<u64>> = out.reordered.iter().map(|c| as_ints(c)).collect();
        assert_eq!(got, [vec![1, 2, 5, 9], vec![1, 2, 5, 7], vec![8, 3, 4]]);
        let mut ix = index();
        let s = |v: &[&str]| {
            v.iter()
                .map(|x| Key::Str(x.to_string()))
                .collect::<Vec<_>>()
        };
        let out = ix.reorder(&[s(&["C", "A", "D", "B"]), s(&["B", "E", "A", "C"])], None);
        assert_eq!(
            out.reordered,
            [s(&["C", "A", "B", "D"]), s(&["C", "A", "B", "E"])]
        );
    }

    #[test]
    fn reset_starts_over() {
        let mut ix = index();
        ix.reorder(&batch(&[&[1, 2, 3], &[1, 2, 4]]), Some("c"));
        assert!(ix.reset());
        assert!(!ix.is_live());
        assert_eq!(ix.stats().num_nodes, 1);
        let out = ix.reorder(&batch(&[&[4, 5]]), None);
        assert_eq!(out.mode, "initial");
        assert!(out.warnings.is_empty());
        assert!(ix
            .deduplicate_conversation(&batch(&[&[1]]), "c", None)
            .is_err());
    }

    #[test]
    fn search_and_insert() {
        let mut ix = index();
        ix.reorder(&batch(&[&[1, 2, 3], &[1, 2, 4], &[5, 6, 7]]), None);
        let hit = ix.search(&ints(&[1, 2, 9]), true);
        assert!(hit.node.is_some());
        assert_eq!(hit.overlap, 2);
        let miss = ix.search(&ints(&[42]), true);
        assert_eq!((miss.node, miss.path.len()), (None, 0));
        let (leaf, rid) = ix.insert(&ints(&[1, 2, 8]), &hit.path, 10);
        assert_eq!(ix.leaf_of(&rid), Some(leaf));
        assert_eq!(ix.path_of(leaf).len(), hit.path.len());
        let (node, tokens) = ix.update_tokens(&ix.path_of(leaf), 5).unwrap();
        assert_eq!((node, tokens), (leaf, 15));
        assert!(ix.update_tokens(&[99], 1).is_none());
    }

    #[test]
    fn wide_nodes_search_through_their_index() {
        let mut ix = index();
        ix.reorder(&batch(&[&[0, 1]]), None);
        for k in 1..200u64 {
            ix.reorder(&batch(&[&[k * 10, k * 10 + 1]]), None);
        }
        assert!(ix.nodes[&ix.root].child_index.is_some());
        let hit = ix.search(&ints(&[1500, 1501, 7]), false);
        let node = hit.node.unwrap();
        assert_eq!(as_ints(&ix.docs_of(node).unwrap()), [1500, 1501]);
        // Same answer as a plain scan.
        ix.nodes.get_mut(&ix.root).unwrap().child_index = None;
        assert_eq!(ix.search(&ints(&[1500, 1501, 7]), false), hit);
    }
}
