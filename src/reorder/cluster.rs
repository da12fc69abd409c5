//! Batch clustering of contexts (ordered lists of block ids) into a prefix tree,
//! with the ordering and scheduling rules of ContextPilot's offline index.
//!
//! Pipeline: ids are deduplicated per context, a pairwise distance combines set
//! overlap with a small positional term, contexts are clustered bottom-up with
//! average linkage, each merge becomes a tree node holding the intersection of
//! its children, empty nodes are dropped, and every context is rewritten as the
//! shared ids of its ancestors (ascending id per level) followed by its own
//! remaining ids in their original order. The schedule groups contexts by the
//! first step of their tree path and puts deeper, path-adjacent ones together.
//!
//! The linkage is computed without a dense matrix: only pairs of contexts that
//! share at least one block get an explicit distance; every other pair is
//! exactly 1.0 and is handled implicitly. The merge sequence (including how
//! ties are resolved) is the one a nearest-neighbour-chain over the full
//! condensed matrix would produce; `linkage_average_condensed` is that dense
//! reference and the tests compare the two.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// Default weight of the positional term of [`distance`].
pub const DEFAULT_ALPHA: f64 = 0.001;

// ---------------------------------------------------------------------------
// Small fast hasher (integer keys only ever come from this module).

#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

impl FxHasher {
    #[inline]
    fn add(&mut self, v: u64) {
        self.hash = (self.hash.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(c);
            self.add(u64::from_le_bytes(buf));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

pub(crate) type FxBuild = BuildHasherDefault<FxHasher>;
pub(crate) type FxMap<K, V> = HashMap<K, V, FxBuild>;
pub(crate) type FxSet<K> = HashSet<K, FxBuild>;

// ---------------------------------------------------------------------------
// Ids and distance.

/// Maps string blocks to dense ids in order of first appearance (context 0
/// left to right, then context 1, ...). Returns the id batch and the id → string
/// table.
pub fn intern<S: AsRef<str>>(batch: &[Vec<S>]) -> (Vec<Vec<u32>>, Vec<String>) {
    let mut map: HashMap<String, u32> = HashMap::new();
    let mut names: Vec<String> = Vec::new();
    let ids = batch
        .iter()
        .map(|ctx| {
            ctx.iter()
                .map(|s| {
                    let s = s.as_ref();
                    if let Some(&id) = map.get(s) {
                        id
                    } else {
                        let id = names.len() as u32;
                        map.insert(s.to_owned(), id);
                        names.push(s.to_owned());
                        id
                    }
                })
                .collect()
        })
        .collect();
    (ids, names)
}

/// Maps ids back to their strings (inverse of [`intern`]).
pub fn extern_ids(ids: &[Vec<u32>], names: &[String]) -> Vec<Vec<String>> {
    ids.iter()
        .map(|c| c.iter().map(|&i| names[i as usize].clone()).collect())
        .collect()
}

/// Drops repeated ids, keeping the first occurrence of each.
pub fn dedup_context(ctx: &[u32]) -> Vec<u32> {
    let mut seen: FxSet<u32> = FxSet::with_capacity_and_hasher(ctx.len(), FxBuild::default());
    ctx.iter().copied().filter(|&x| seen.insert(x)).collect()
}

/// (id, position) pairs sorted by id, for merge intersection.
fn sorted_positions(ctx: &[u32]) -> Vec<(u32, u32)> {
    let mut v: Vec<(u32, u32)> = ctx
        .iter()
        .enumerate()
        .map(|(p, &id)| (id, p as u32))
        .collect();
    v.sort_unstable();
    v
}

#[inline]
fn distance_from_parts(shared: usize, pos_sum: u64, len_a: usize, len_b: usize, alpha: f64) -> f64 {
    if shared == 0 {
        return 1.0;
    }
    let longest = len_a.max(len_b) as f64;
    (1.0 - shared as f64 / longest) + alpha * (pos_sum as f64 / shared as f64)
}

fn distance_sorted(a: &[(u32, u32)], b: &[(u32, u32)], alpha: f64) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 1.0;
    }
    let (mut i, mut j) = (0, 0);
    let mut shared = 0usize;
    let mut pos_sum = 0u64;
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                shared += 1;
                pos_sum += u64::from(a[i].1.abs_diff(b[j].1));
                i += 1;
                j += 1;
            }
        }
    }
    distance_from_parts(shared, pos_sum, a.len(), b.len(), alpha)
}

/// Distance between two contexts: one minus the shared fraction of the longer
/// context, plus `alpha` times the mean position shift of the shared ids.
/// Empty or disjoint contexts are at exactly 1.0. Repeated ids are dropped
/// (first occurrence kept) before positions are taken.
pub fn distance(a: &[u32], b: &[u32], alpha: f64) -> f64 {
    let a = sorted_positions(&dedup_context(a));
    let b = sorted_positions(&dedup_context(b));
    distance_sorted(&a, &b, alpha)
}

/// Index of pair (i, j), i < j, in a condensed upper-triangle matrix of n items.
#[inline]
fn condensed_index(n: usize, i: usize, j: usize) -> usize {
    let (i, j) = if i < j { (i, j) } else { (j, i) };
    n * i - i * (i + 1) / 2 + (j - i - 1)
}

/// Full condensed distance matrix (n·(n−1)/2 single-precision values, row-major
/// upper triangle). Quadratic; the index build does not use it.
pub fn condensed_distances(contexts: &[Vec<u32>], alpha: f64) -> Vec<f32> {
    let prepared: Vec<Vec<(u32, u32)>> = contexts
        .iter()
        .map(|c| sorted_positions(&dedup_context(c)))
        .collect();
    let n = prepared.len();
    let mut out = Vec::with_capacity(n * n.saturating_sub(1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            out.push(distance_sorted(&prepared[i], &prepared[j], alpha) as f32);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Average linkage.

/// One agglomeration step: clusters `a < b` joined at `height`, giving a cluster
/// of `size` contexts whose id is `n + step`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Merge {
    pub a: usize,
    pub b: usize,
    pub height: f64,
    pub size: usize,
}

#[inline]
fn average_update(d_xi: f64, d_yi: f64, nx: usize, ny: usize) -> f64 {
    (nx as f64 * d_xi + ny as f64 * d_yi) / (nx + ny) as f64
}

/// Sorts the raw chain merges by height (stable) and renames the clusters so
/// that step k creates cluster n + k.
fn relabel(mut raw: Vec<(usize, usize, f64)>, n: usize) -> Vec<Merge> {
    raw.sort_by(|p, q| p.2.partial_cmp(&q.2).unwrap_or(std::cmp::Ordering::Equal));
    let mut parent: Vec<usize> = (0..2 * n).collect();
    let mut size: Vec<usize> = vec![1; 2 * n];
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        let mut root = x;
        while parent[root] != root {
            root = parent[root];
        }
        while parent[x] != root {
            let next = parent[x];
            parent[x] = root;
            x = next;
        }
        root
    }
    let mut next = n;
    raw.into_iter()
        .map(|(x, y, h)| {
            let rx = find(&mut parent, x);
            let ry = find(&mut parent, y);
            let (a, b) = if rx < ry { (rx, ry) } else { (ry, rx) };
            parent[rx] = next;
            parent[ry] = next;
            size[next] = size[rx] + size[ry];
            let s = size[next];
            next += 1;
            Merge {
                a,
                b,
                height: h,
                size: s,
            }
        })
        .collect()
}

/// Average linkage over a dense condensed matrix (nearest-neighbour chain).
/// Reference implementation; quadratic memory.
pub fn linkage_average_condensed(condensed: &[f32], n: usize) -> Vec<Merge> {
    if n < 2 {
        return Vec::new();
    }
    assert_eq!(condensed.len(), n * (n - 1) / 2, "condensed matrix size");
    let mut d: Vec<f64> = condensed.iter().map(|&v| f64::from(v)).collect();
    let mut size = vec![1usize; n];
    let mut chain: Vec<usize> = Vec::with_capacity(n);
    let mut raw = Vec::with_capacity(n - 1);
    for _ in 0..n - 1 {
        if chain.is_empty() {
            chain.push((0..n).find(|&i| size[i] > 0).expect("active cluster"));
        }
        let (mut x, mut y, dmin) = loop {
            let x = chain[chain.len() - 1];
            let mut y = usize::MAX;
            let mut best = f64::INFINITY;
            if chain.len() > 1 {
                y = chain[chain.len() - 2];
                best = d[condensed_index(n, x, y)];
            }
            for i in 0..n {
                if size[i] == 0 || i == x {
                    continue;
                }
                let v = d[condensed_index(n, x, i)];
                if v < best {
                    best = v;
                    y = i;
                }
            }
            if chain.len() > 1 && y == chain[chain.len() - 2] {
                break (x, y, best);
            }
            chain.push(y);
        };
        chain.truncate(chain.len() - 2);
        if x > y {
            std::mem::swap(&mut x, &mut y);
        }
        let (nx, ny) = (size[x], size[y]);
        raw.push((x, y, dmin));
        size[x] = 0;
        size[y] = nx + ny;
        for i in 0..n {
            if size[i] == 0 || i == y {
                continue;
            }
            let v = average_update(
                d[condensed_index(n, i, x)],
                d[condensed_index(n, i, y)],
                nx,
                ny,
            );
            d[condensed_index(n, i, y)] = v;
        }
    }
    relabel(raw, n)
}

/// For each pair of contexts sharing at least one id, its distance (rounded to
/// single precision like the condensed matrix); pairs whose value is exactly
/// 1.0 are left out since that is the implicit default.
fn sparse_pairs(contexts: &[Vec<u32>], alpha: f64) -> Vec<(u32, u32, f64)> {
    let n = contexts.len();
    // Compact the ids so that per-id arrays stay small.
    let mut remap: FxMap<u32, u32> = FxMap::default();
    let compact: Vec<Vec<u32>> = contexts
        .iter()
        .map(|c| {
            c.iter()
                .map(|&id| {
                    let next = remap.len() as u32;
                    *remap.entry(id).or_insert(next)
                })
                .collect()
        })
        .collect();
    let m = remap.len();
    let mut postings: Vec<Vec<u32>> = vec![Vec::new(); m];
    for (i, c) in compact.iter().enumerate() {
        for &id in c {
            postings[id as usize].push(i as u32);
        }
    }

    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let threads = if n < 2000 { 1 } else { threads };
    let work = |tid: usize| -> Vec<(u32, u32, f64)> {
        let mut out = Vec::new();
        let mut stamp = vec![u32::MAX; m];
        let mut pos = vec![0u32; m];
        let mut seen = vec![u32::MAX; n];
        let mut i = tid;
        while i < n {
            let ci = &compact[i];
            let iu = i as u32;
            for (p, &id) in ci.iter().enumerate() {
                stamp[id as usize] = iu;
                pos[id as usize] = p as u32;
            }
            for &id in ci {
                let plist = &postings[id as usize];
                let start = plist.partition_point(|&j| j <= iu);
                for &j in &plist[start..] {
                    if seen[j as usize] == iu {
                        continue;
                    }
                    seen[j as usize] = iu;
                    let cj = &compact[j as usize];
                    let mut shared = 0usize;
                    let mut pos_sum = 0u64;
                    for (q, &jd) in cj.iter().enumerate() {
                        if stamp[jd as usize] == iu {
                            shared += 1;
                            pos_sum += u64::from(pos[jd as usize].abs_diff(q as u32));
                        }
                    }
                    let d = distance_from_parts(shared, pos_sum, ci.len(), cj.len(), alpha) as f32;
                    if d != 1.0 {
                        out.push((iu, j, f64::from(d)));
                    }
                }
            }
            i += threads;
        }
        out
    };
    if threads == 1 {
        return work(0);
    }
    let parts: Vec<Vec<(u32, u32, f64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|t| s.spawn(move || work(t))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("distance worker"))
            .collect()
    });
    parts.concat()
}

/// A stored distance from one cluster to cluster `to`, valid only while `to`
/// is alive and has not absorbed another cluster since (`gen` matches).
#[derive(Clone, Copy)]
struct Edge {
    to: u32,
    gen: u32,
    d: f64,
}

/// Sparse state of the chain algorithm: per-cluster adjacency lists holding
/// every pair not at the implicit distance 1.0. Outdated entries are left in
/// place and skipped, then dropped when a list is scanned or grows.
struct SparseLinkage {
    lists: Vec<Vec<Edge>>,
    gen: Vec<u32>,
    size: Vec<usize>,
    compact_at: Vec<usize>,
    active: BTreeSet<u32>,
    stamp: Vec<u32>,
    stamp2: Vec<u32>,
    dx: Vec<f64>,
    tick: u32,
}

impl SparseLinkage {
    fn new(n: usize, pairs: Vec<(u32, u32, f64)>) -> Self {
        let mut degree = vec![0usize; n];
        for &(i, j, _) in &pairs {
            degree[i as usize] += 1;
            degree[j as usize] += 1;
        }
        let mut lists: Vec<Vec<Edge>> = degree
            .iter()
            .map(|&d| Vec::with_capacity(d + d / 2 + 4))
            .collect();
        for (i, j, d) in pairs {
            lists[i as usize].push(Edge { to: j, gen: 0, d });
            lists[j as usize].push(Edge { to: i, gen: 0, d });
        }
        let compact_at = degree.iter().map(|&d| 2 * d + 32).collect();
        SparseLinkage {
            lists,
            gen: vec![0; n],
            size: vec![1; n],
            compact_at,
            active: (0..n as u32).collect(),
            stamp: vec![u32::MAX; n],
            stamp2: vec![u32::MAX; n],
            dx: vec![0.0; n],
            tick: 0,
        }
    }

    #[inline]
    fn valid(size: &[usize], gen: &[u32], e: &Edge) -> bool {
        size[e.to as usize] > 0 && gen[e.to as usize] == e.gen
    }

    fn next_tick(&mut self) -> u32 {
        self.tick = self.tick.wrapping_add(1);
        if self.tick == u32::MAX {
            self.stamp.iter_mut().for_each(|s| *s = u32::MAX);
            self.stamp2.iter_mut().for_each(|s| *s = u32::MAX);
            self.tick = 0;
        }
        self.tick
    }

    fn compact(&mut self, i: usize) {
        let (size, gen) = (&self.size, &self.gen);
        self.lists[i].retain(|e| Self::valid(size, gen, e));
        self.compact_at[i] = 2 * self.lists[i].len() + 32;
    }

    /// Nearest live cluster of `x`; ties go to the smallest index, except that
    /// the previous chain element wins any tie. Unlisted clusters are at 1.0.
    fn nearest(&mut self, x: u32, prev: Option<u32>) -> (u32, f64) {
        self.compact(x as usize);
        let list = &self.lists[x as usize];
        let mut best = f64::INFINITY;
        let mut best_i = u32::MAX;
        let mut d_prev = 1.0;
        for e in list {
            if e.d < best || (e.d == best && e.to < best_i) {
                best = e.d;
                best_i = e.to;
            }
            if Some(e.to) == prev {
                d_prev = e.d;
            }
        }
        if best >= 1.0 {
            let t = self.next_tick();
            for e in &self.lists[x as usize] {
                self.stamp[e.to as usize] = t;
            }
            let stamp = &self.stamp;
            let implicit = self
                .active
                .iter()
                .copied()
                .find(|&i| i != x && stamp[i as usize] != t);
            if let Some(i) = implicit {
                if 1.0 < best || i < best_i {
                    best = 1.0;
                    best_i = i;
                }
            }
        }
        if let Some(p) = prev {
            if d_prev <= best {
                return (p, d_prev);
            }
        }
        (best_i, best)
    }

    fn push_edge(&mut self, i: usize, e: Edge) {
        let list = &self.lists[i];
        if list.len() == list.capacity() && list.len() >= self.compact_at[i] {
            self.compact(i);
        }
        self.lists[i].push(e);
    }

    /// Records distance `v` between cluster `i` and the merged cluster `y`
    /// on both sides: in `y`'s new list and in `i`'s.
    fn link(&mut self, new_y: &mut Vec<Edge>, i: usize, y: u32, gy: u32, v: f64) {
        new_y.push(Edge {
            to: i as u32,
            gen: self.gen[i],
            d: v,
        });
        self.push_edge(
            i,
            Edge {
                to: y,
                gen: gy,
                d: v,
            },
        );
    }

    /// Joins `x` into `y` (x < y), updating distances with the average rule.
    fn merge(&mut self, x: u32, y: u32) {
        let (xu, yu) = (x as usize, y as usize);
        let (nx, ny) = (self.size[xu], self.size[yu]);
        let lx = std::mem::take(&mut self.lists[xu]);
        let ly = std::mem::take(&mut self.lists[yu]);
        let tx = self.next_tick();
        for e in &lx {
            if e.to != y && Self::valid(&self.size, &self.gen, e) {
                self.stamp[e.to as usize] = tx;
                self.dx[e.to as usize] = e.d;
            }
        }
        self.size[xu] = 0;
        self.active.remove(&x);
        self.size[yu] = nx + ny;
        self.gen[yu] = self.gen[yu].wrapping_add(1);
        let gy = self.gen[yu];
        let mut new_y: Vec<Edge> = Vec::with_capacity(lx.len() + ly.len());
        for e in &ly {
            if e.to == x || !Self::valid(&self.size, &self.gen, e) {
                continue;
            }
            let i = e.to as usize;
            self.stamp2[i] = tx;
            let d_xi = if self.stamp[i] == tx { self.dx[i] } else { 1.0 };
            let v = average_update(d_xi, e.d, nx, ny);
            self.link(&mut new_y, i, y, gy, v);
        }
        for e in &lx {
            let i = e.to as usize;
            if e.to == y || self.stamp[i] != tx || self.stamp2[i] == tx {
                continue;
            }
            // Only the first live entry for `i` counts; it carries `dx[i]`.
            self.stamp2[i] = tx;
            let v = average_update(self.dx[i], 1.0, nx, ny);
            self.link(&mut new_y, i, y, gy, v);
        }
        self.compact_at[yu] = 2 * new_y.len() + 32;
        self.lists[yu] = new_y;
    }
}

fn linkage_sparse(contexts: &[Vec<u32>], alpha: f64) -> Vec<Merge> {
    let n = contexts.len();
    if n < 2 {
        return Vec::new();
    }
    let mut st = SparseLinkage::new(n, sparse_pairs(contexts, alpha));
    let mut chain: Vec<u32> = Vec::with_capacity(n);
    let mut raw = Vec::with_capacity(n - 1);
    for _ in 0..n - 1 {
        if chain.is_empty() {
            chain.push(*st.active.iter().next().expect("active cluster"));
        }
        let (x, y, dmin) = loop {
            let x = chain[chain.len() - 1];
            let prev = (chain.len() > 1).then(|| chain[chain.len() - 2]);
            let (y, v) = st.nearest(x, prev);
            if prev == Some(y) {
                break (x, y, v);
            }
            chain.push(y);
        };
        chain.truncate(chain.len() - 2);
        let (x, y) = if x < y { (x, y) } else { (y, x) };
        raw.push((x as usize, y as usize, dmin));
        st.merge(x, y);
    }
    relabel(raw, n)
}

/// Average linkage of the contexts under [`distance`], without building the
/// dense matrix. Gives the same merges as
/// `linkage_average_condensed(&condensed_distances(..), n)`.
pub fn linkage_average(contexts: &[Vec<u32>], alpha: f64) -> Vec<Merge> {
    let deduped: Vec<Vec<u32>> = contexts.iter().map(|c| dedup_context(c)).collect();
    linkage_sparse(&deduped, alpha)
}

// ---------------------------------------------------------------------------
// Tree.

/// A node of the prefix tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub id: usize,
    /// The ids shared by every context below, ascending.
    pub content: Vec<u32>,
    /// The node's ordered id list after intra-context ordering.
    pub doc_ids: Vec<u32>,
    /// For leaves: the contexts whose id-set this is (ascending).
    pub contexts: Vec<usize>,
    pub merge_distance: f64,
    pub children: Vec<usize>,
    pub parent: Option<usize>,
    pub frequency: usize,
}

impl Node {
    pub fn is_leaf(&self) -> bool {
        self.children.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexStats {
    pub total_nodes: usize,
    pub leaf_nodes: usize,
    pub root_nodes: usize,
    pub internal_nodes: usize,
}

/// Output of [`build_index`]; per-context vectors are in input order.
#[derive(Debug, Clone)]
pub struct IndexResult {
    pub reordered: Vec<Vec<u32>>,
    pub search_paths: Vec<Vec<usize>>,
    /// Live nodes, ascending id.
    pub nodes: Vec<Node>,
    pub root: Option<usize>,
    /// Context index → id of its leaf node.
    pub leaf_of: Vec<usize>,
    pub merges: Vec<Merge>,
    pub stats: IndexStats,
}

impl IndexResult {
    pub fn node(&self, id: usize) -> Option<&Node> {
        self.nodes
            .binary_search_by_key(&id, |n| n.id)
            .ok()
            .map(|i| &self.nodes[i])
    }
}

fn sorted_intersection(a: &[u32], b: &[u32]) -> Vec<u32> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out
}

fn new_node(id: usize, content: Vec<u32>, doc_ids: Vec<u32>) -> Node {
    Node {
        id,
        content,
        doc_ids,
        contexts: Vec::new(),
        merge_distance: 0.0,
        children: Vec::new(),
        parent: None,
        frequency: 1,
    }
}

fn add_child(node: &mut Node, child: usize) {
    if child != node.id && !node.children.contains(&child) {
        node.children.push(child);
    }
}

fn stats_of(arena: &[Option<Node>]) -> IndexStats {
    let mut s = IndexStats::default();
    for n in arena.iter().flatten() {
        s.total_nodes += 1;
        if n.is_leaf() {
            s.leaf_nodes += 1;
        }
        if n.parent.is_none() {
            s.root_nodes += 1;
        }
    }
    s.internal_nodes = s.total_nodes - s.leaf_nodes;
    s
}

/// For every node, its index in its parent's child list (first occurrence),
/// or `usize::MAX` when it has no parent or is not listed there.
fn index_in_parent(arena: &[Option<Node>]) -> Vec<usize> {
    let mut idx = vec![usize::MAX; arena.len()];
    for p in arena.iter().flatten() {
        for (k, &c) in p.children.iter().enumerate() {
            let listed = arena
                .get(c)
                .and_then(|n| n.as_ref())
                .is_some_and(|cn| cn.parent == Some(p.id));
            if listed && idx[c] == usize::MAX {
                idx[c] = k;
            }
        }
    }
    idx
}

fn search_path(arena: &[Option<Node>], idx: &[usize], leaf: usize) -> Vec<usize> {
    let mut path = Vec::new();
    let Some(mut cur) = arena.get(leaf).and_then(|n| n.as_ref()) else {
        return path;
    };
    // The walk is bounded in case reuse of shared nodes produced a cycle.
    let mut steps = 0usize;
    while let Some(p) = cur.parent {
        let Some(pn) = arena.get(p).and_then(|n| n.as_ref()) else {
            break;
        };
        if idx[cur.id] == usize::MAX {
            break;
        }
        path.push(idx[cur.id]);
        cur = pn;
        steps += 1;
        if steps > arena.len() {
            break;
        }
    }
    path.reverse();
    path
}

fn finish(
    mut arena: Vec<Option<Node>>,
    root: Option<usize>,
    leaf_of: Vec<usize>,
    merges: Vec<Merge>,
    deduped: &[Vec<u32>],
    order_tree: bool,
) -> IndexResult {
    if order_tree {
        if let Some(r) = root {
            // Breadth-first: a child's list becomes its parent's list followed
            // by the child's ids the parent lacks, in the child's order.
            let mut visited = vec![false; arena.len()];
            let mut queue = VecDeque::from([r]);
            visited[r] = true;
            while let Some(u) = queue.pop_front() {
                let (parent_list, children) = match arena[u].as_ref() {
                    Some(n) => (n.doc_ids.clone(), n.children.clone()),
                    None => continue,
                };
                let parent_set: FxSet<u32> = parent_list.iter().copied().collect();
                for c in children {
                    if c >= arena.len() || visited[c] {
                        continue;
                    }
                    visited[c] = true;
                    if let Some(cn) = arena[c].as_mut() {
                        if !parent_list.is_empty() {
                            let mut list = parent_list.clone();
                            list.extend(cn.doc_ids.iter().filter(|x| !parent_set.contains(x)));
                            cn.doc_ids = list;
                        }
                        queue.push_back(c);
                    }
                }
            }
        }
    }
    let reordered = leaf_of
        .iter()
        .enumerate()
        .map(|(i, &l)| match arena.get(l).and_then(|n| n.as_ref()) {
            Some(n) => n.doc_ids.clone(),
            None => deduped[i].clone(),
        })
        .collect();
    let idx = index_in_parent(&arena);
    let search_paths = leaf_of
        .iter()
        .map(|&l| search_path(&arena, &idx, l))
        .collect();
    let stats = stats_of(&arena);
    let nodes = arena.iter_mut().filter_map(|n| n.take()).collect();
    IndexResult {
        reordered,
        search_paths,
        nodes,
        root,
        leaf_of,
        merges,
        stats,
    }
}

/// Builds the prefix tree of a batch with average linkage and returns the
/// reordered contexts and their tree paths.
pub fn build_index(contexts: &[Vec<u32>], alpha: f64) -> IndexResult {
    let deduped: Vec<Vec<u32>> = contexts.iter().map(|c| dedup_context(c)).collect();
    let n = deduped.len();
    let mut content_owner: FxMap<Vec<u32>, usize> = FxMap::default();
    let mut arena: Vec<Option<Node>> = Vec::with_capacity(2 * n + 1);
    let mut canon: Vec<usize> = Vec::with_capacity(2 * n);

    // Leaves; identical id-sets share the first one.
    for (i, ctx) in deduped.iter().enumerate() {
        let mut key = ctx.clone();
        key.sort_unstable();
        if let Some(&owner) = content_owner.get(&key) {
            let node = arena[owner].as_mut().expect("leaf owner");
            node.frequency += 1;
            node.contexts.push(i);
            canon.push(owner);
            arena.push(None);
        } else {
            let mut node = new_node(i, key.clone(), ctx.clone());
            node.contexts.push(i);
            content_owner.insert(key, i);
            canon.push(i);
            arena.push(Some(node));
        }
    }

    if n < 2 {
        // No clustering: an empty root above the (at most one) leaf.
        let leaves: Vec<usize> = (0..n).filter(|&i| arena[i].is_some()).collect();
        let root_id = leaves.iter().max().map_or(0, |m| m + 1);
        let mut root = new_node(root_id, Vec::new(), Vec::new());
        root.frequency = leaves
            .iter()
            .map(|&l| arena[l].as_ref().map_or(0, |x| x.frequency))
            .sum();
        root.children = leaves.clone();
        for &l in &leaves {
            if let Some(x) = arena[l].as_mut() {
                x.parent = Some(root_id);
            }
        }
        arena.resize(root_id + 1, None);
        arena[root_id] = Some(root);
        return finish(arena, Some(root_id), canon, Vec::new(), &deduped, false);
    }

    let merges = linkage_sparse(&deduped, alpha);

    // Internal nodes.
    for (k, m) in merges.iter().enumerate() {
        let id = n + k;
        let (ca, cb) = (canon[m.a], canon[m.b]);
        if ca == cb {
            canon.push(ca);
            arena.push(None);
            continue;
        }
        let (inter, fa, fb) = {
            let na = arena[ca].as_ref().expect("live child");
            let nb = arena[cb].as_ref().expect("live child");
            (
                sorted_intersection(&na.content, &nb.content),
                na.frequency,
                nb.frequency,
            )
        };
        let reuse = if inter.is_empty() {
            None
        } else {
            content_owner
                .get(&inter)
                .copied()
                .filter(|&x| x != ca && x != cb)
        };
        if let Some(x) = reuse {
            let xn = arena[x].as_mut().expect("owner");
            add_child(xn, ca);
            add_child(xn, cb);
            xn.frequency = xn.frequency.max(fa + fb);
            arena[ca].as_mut().expect("child").parent = Some(x);
            arena[cb].as_mut().expect("child").parent = Some(x);
            canon.push(x);
            arena.push(None);
        } else {
            let mut node = new_node(id, inter.clone(), inter.clone());
            node.merge_distance = m.height;
            node.children = vec![ca, cb];
            node.frequency = fa + fb;
            if !inter.is_empty() {
                content_owner.insert(inter, id);
            }
            arena[ca].as_mut().expect("child").parent = Some(id);
            arena[cb].as_mut().expect("child").parent = Some(id);
            canon.push(id);
            arena.push(Some(node));
        }
    }

    // Drop empty nodes, newest first, lifting their children.
    let empties: Vec<usize> = (0..arena.len())
        .rev()
        .filter(|&i| arena[i].as_ref().is_some_and(|x| x.content.is_empty()))
        .collect();
    for e in empties {
        let Some(en) = arena[e].take() else { continue };
        if let Some(p) = en.parent {
            if arena[p].is_some() {
                let live: Vec<usize> = en
                    .children
                    .iter()
                    .copied()
                    .filter(|&c| arena[c].is_some())
                    .collect();
                let pn = arena[p].as_mut().expect("parent");
                if let Some(pos) = pn.children.iter().position(|&c| c == e) {
                    pn.children.remove(pos);
                }
                for c in live {
                    add_child(pn, c);
                }
            }
        }
        for &c in &en.children {
            if let Some(cn) = arena[c].as_mut() {
                cn.parent = en.parent;
            }
        }
    }
    let live: Vec<bool> = arena.iter().map(|x| x.is_some()).collect();
    for node in arena.iter_mut().flatten() {
        if node.parent.is_some_and(|p| !live[p]) {
            node.parent = None;
        }
    }

    // One root, virtual if needed.
    let roots: Vec<usize> = arena
        .iter()
        .flatten()
        .filter(|x| x.parent.is_none())
        .map(|x| x.id)
        .collect();
    let root = match roots.len() {
        0 => None,
        1 => Some(roots[0]),
        _ => {
            let vid = arena.iter().rposition(|x| x.is_some()).expect("live node") + 1;
            let mut vr = new_node(vid, Vec::new(), Vec::new());
            vr.frequency = roots
                .iter()
                .map(|&r| arena[r].as_ref().map_or(0, |x| x.frequency))
                .sum();
            vr.children = roots.clone();
            for &r in &roots {
                arena[r].as_mut().expect("root").parent = Some(vid);
            }
            arena.truncate(vid);
            arena.push(Some(vr));
            Some(vid)
        }
    };
    let leaf_of: Vec<usize> = canon[..n].to_vec();
    finish(arena, root, leaf_of, merges, &deduped, true)
}

/// Convenience for string blocks: interns, builds, and maps the reordered
/// contexts back to strings.
pub fn build_index_str<S: AsRef<str>>(
    batch: &[Vec<S>],
    alpha: f64,
) -> (IndexResult, Vec<Vec<String>>) {
    let (ids, names) = intern(batch);
    let result = build_index(&ids, alpha);
    let strings = extern_ids(&result.reordered, &names);
    (result, strings)
}

// ---------------------------------------------------------------------------
// Scheduling.

/// Execution order of a batch: `order[i]` is the input index sent i-th;
/// `groups` are the consecutive runs of `order` sharing a first path step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub order: Vec<usize>,
    pub groups: Vec<Vec<usize>>,
}

/// Schedules from raw search paths: group by the first step (empty paths
/// form their own group), deepest and path-adjacent first inside a group,
/// larger groups first.
pub fn schedule_paths(paths: &[Vec<usize>]) -> Schedule {
    let mut by_key: FxMap<i64, Vec<usize>> = FxMap::default();
    for (i, p) in paths.iter().enumerate() {
        let key = p.first().map_or(-1, |&k| k as i64);
        by_key.entry(key).or_default().push(i);
    }
    let mut groups: Vec<Vec<usize>> = by_key
        .into_values()
        .map(|mut g| {
            g.sort_by(|&a, &b| {
                paths[b]
                    .len()
                    .cmp(&paths[a].len())
                    .then_with(|| paths[a].cmp(&paths[b]))
                    .then_with(|| a.cmp(&b))
            });
            g
        })
        .collect();
    groups.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a[0].cmp(&b[0])));
    let order = groups.concat();
    Schedule { order, groups }
}

/// Schedules a built index (see [`schedule_paths`]).
pub fn schedule(result: &IndexResult) -> Schedule {
    schedule_paths(&result.search_paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: f64 = DEFAULT_ALPHA;

    fn close(x: f64, y: f64, tol: f64) -> bool {
        (x - y).abs() <= tol
    }

    fn strs(batch: &[&[&str]]) -> Vec<Vec<String>> {
        batch
            .iter()
            .map(|c| c.iter().map(|s| s.to_string()).collect())
            .collect()
    }

    fn ids(batch: &[&[u32]]) -> Vec<Vec<u32>> {
        batch.iter().map(|c| c.to_vec()).collect()
    }

    // Small deterministic generator for the randomized comparisons.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    // Case 1 and the first worked value.
    #[test]
    fn distance_partial_overlap() {
        assert!(close(
            distance(&[1, 2, 3, 4], &[3, 4, 5, 6], A),
            0.502,
            1e-6
        ));
    }

    // Case 2.
    #[test]
    fn distance_permutation() {
        assert!(close(distance(&[1, 2, 3], &[3, 2, 1], A), 0.0013333, 1e-6));
        assert!(close(
            distance(&[1, 2, 3, 4, 5], &[5, 4, 3, 2, 1], A),
            0.0024,
            1e-6
        ));
        let big = distance(&[1, 2, 3], &[3, 2, 1], 0.1);
        assert!(close(big, 0.13333, 1e-5));
        assert!(big > distance(&[1, 2, 3], &[3, 2, 1], A));
    }

    // Case 3.
    #[test]
    fn distance_subset_disjoint_empty() {
        assert!(close(distance(&[1, 2, 3], &[1, 2, 3, 4, 5], A), 0.4, 1e-9));
        assert_eq!(distance(&[1, 2, 3], &[4, 5, 6], A), 1.0);
        assert_eq!(distance(&[], &[1, 2, 3], A), 1.0);
        assert_eq!(distance(&[], &[4, 5, 6], A), 1.0);
        assert_eq!(distance(&[1, 2, 3], &[], A), 1.0);
        let (a, b) = ([7u32, 1, 9, 4], [4u32, 2, 7, 8, 1]);
        assert_eq!(distance(&a, &b, A), distance(&b, &a, A));
        assert_eq!(distance(&a, &a, A), 0.0);
    }

    #[test]
    fn distance_ignores_repeated_ids() {
        // [1,1,2] behaves as [1,2].
        assert_eq!(
            distance(&[1, 1, 2], &[2, 1], A),
            distance(&[1, 2], &[2, 1], A)
        );
    }

    // Case 4.
    #[test]
    fn condensed_matrix_size() {
        let b = ids(&[&[1, 2, 3], &[2, 3, 4], &[9], &[], &[3, 2, 1, 7]]);
        let d = condensed_distances(&b, A);
        assert_eq!(d.len(), 10);
        assert!(d.iter().all(|&v| (0.0..=1.5).contains(&v)));
        assert_eq!(
            d[condensed_index(5, 0, 1)],
            distance(&b[0], &b[1], A) as f32
        );
        assert_eq!(d[condensed_index(5, 4, 2)], 1.0);
    }

    #[test]
    fn intern_first_appearance() {
        let (i, names) = intern(&strs(&[&["C", "A", "D", "B"], &["B", "E", "A", "C"]]));
        assert_eq!(i, vec![vec![0, 1, 2, 3], vec![3, 4, 1, 0]]);
        assert_eq!(names, ["C", "A", "D", "B", "E"]);
    }

    // Case 5 and the first ordering example.
    #[test]
    fn batch_reorder_strings() {
        let batch = strs(&[
            &["G", "A", "F", "B", "E", "C"],
            &["X", "Y", "Z", "W", "V", "U"],
            &["C", "D", "A", "H", "B", "I"],
        ]);
        let (r, out) = build_index_str(&batch, A);
        assert_eq!(
            out,
            strs(&[
                &["A", "B", "C", "G", "F", "E"],
                &["X", "Y", "Z", "W", "V", "U"],
                &["A", "B", "C", "D", "H", "I"],
            ])
        );
        let s = schedule(&r);
        assert_eq!(s.order, vec![0, 2, 1]);
        assert_eq!(s.groups, vec![vec![0, 2], vec![1]]);
    }

    // Case 6 and the second ordering example.
    #[test]
    fn prefix_follows_first_appearance() {
        let batch = strs(&[&["C", "A", "D", "B"], &["B", "E", "A", "C"]]);
        let (r, out) = build_index_str(&batch, A);
        assert_eq!(out, strs(&[&["C", "A", "B", "D"], &["C", "A", "B", "E"]]));
        // The shared node is the real root, so the leaves land in two groups.
        assert_eq!(r.search_paths, vec![vec![0], vec![1]]);
        let s = schedule(&r);
        assert_eq!(s.order, vec![0, 1]);
        assert_eq!(s.groups, vec![vec![0], vec![1]]);
    }

    // Case 7 and the third ordering example.
    #[test]
    fn scrambled_ints() {
        let r = build_index(&ids(&[&[5, 1, 9, 2], &[2, 7, 1, 5], &[8, 3, 4]]), A);
        assert_eq!(
            r.reordered,
            ids(&[&[1, 2, 5, 9], &[1, 2, 5, 7], &[8, 3, 4]])
        );
        assert_eq!(r.search_paths, vec![vec![1, 0], vec![1, 1], vec![0]]);
        assert_eq!(schedule(&r).order, vec![0, 1, 2]);
    }

    // Case 8.
    #[test]
    fn two_clusters() {
        let input = ids(&[
            &[1, 2, 3, 100, 101],
            &[1, 2, 3, 102, 103],
            &[1, 2, 3, 104, 105],
            &[10, 20, 30, 200, 201],
            &[10, 20, 30, 202, 203],
            &[10, 20, 30, 204, 205],
        ]);
        let r = build_index(&input, A);
        assert_eq!(r.reordered, input);
        let s = schedule(&r);
        assert_eq!(s.order, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(s.groups, vec![vec![0, 1, 2], vec![3, 4, 5]]);
        assert_eq!(
            r.search_paths,
            vec![
                vec![0, 1, 0],
                vec![0, 1, 1],
                vec![0, 0],
                vec![1, 1, 0],
                vec![1, 1, 1],
                vec![1, 0]
            ]
        );
        assert_eq!(r.stats.root_nodes, 1);
        assert_eq!(r.stats.leaf_nodes, 6);
        // Two chained {1,2,3} nodes, as the original produces.
        let with_123 = r.nodes.iter().filter(|n| n.content == [1, 2, 3]).count();
        assert_eq!(with_123, 2);
    }

    // Case 9 and the fourth ordering example.
    #[test]
    fn identical_sets_share_leaf() {
        let r = build_index(&ids(&[&[3, 1, 2], &[2, 3, 1]]), A);
        assert_eq!(r.reordered, ids(&[&[3, 1, 2], &[3, 1, 2]]));
        assert_eq!(r.nodes.len(), 1);
        assert_eq!(r.stats.total_nodes, 1);
        assert_eq!(r.search_paths, vec![Vec::<usize>::new(), Vec::new()]);
        assert_eq!(r.nodes[0].frequency, 2);
        assert_eq!(r.nodes[0].contexts, vec![0, 1]);
        let s = schedule(&r);
        assert_eq!(s.order, vec![0, 1]);
        assert_eq!(s.groups, vec![vec![0, 1]]);
    }

    // Case 10.
    #[test]
    fn group_prefix_property() {
        let input = ids(&[
            &[1, 2, 3, 4, 5],
            &[1, 2, 3, 6, 7],
            &[1, 2, 4, 8, 9],
            &[3, 4, 5, 6, 7],
            &[3, 4, 5, 8, 9],
            &[3, 4, 6, 10, 11],
            &[5, 6, 7, 8, 9],
            &[5, 6, 7, 12, 13],
        ]);
        let r = build_index(&input, A);
        let s = schedule(&r);
        assert_eq!(s.groups, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7]]);
        for g in s.groups.iter().filter(|g| g.len() > 1) {
            let first = &r.reordered[g[0]];
            assert!(g.iter().all(|&i| r.reordered[i][0] == first[0]), "{g:?}");
        }
        // Reordering is a permutation of each context.
        for (a, b) in input.iter().zip(&r.reordered) {
            let (mut a, mut b) = (a.clone(), b.clone());
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b);
        }
    }

    // Case 11.
    #[test]
    fn scheduler_sort() {
        let s = schedule_paths(&[vec![0, 1], vec![0, 1, 2, 3], vec![0, 1, 2]]);
        assert_eq!(s.order, vec![1, 2, 0]);
        let s = schedule_paths(&[
            vec![1, 1, 0, 2],
            vec![1, 1, 1, 5],
            vec![1, 1, 0, 7],
            vec![1, 1, 1, 3],
        ]);
        assert_eq!(s.order, vec![0, 2, 3, 1]);
        let paths = vec![vec![], vec![0, 1], vec![]];
        let s = schedule_paths(&paths);
        assert_eq!(s.groups, vec![vec![0, 2], vec![1]]);
        assert_eq!(s.order, vec![0, 2, 1]);
        for _ in 0..5 {
            assert_eq!(schedule_paths(&paths), s);
        }
    }

    // Case 12.
    #[test]
    fn single_context() {
        let r = build_index(&ids(&[&[1, 2, 3]]), A);
        assert_eq!(r.reordered, ids(&[&[1, 2, 3]]));
        assert_eq!(r.search_paths, vec![vec![0]]);
        assert_eq!(schedule(&r).order, vec![0]);
        assert_eq!(r.stats.root_nodes, 1);
        // The leaf keeps its input order, not ascending.
        let r = build_index(&ids(&[&[3, 1, 2]]), A);
        assert_eq!(r.reordered, ids(&[&[3, 1, 2]]));
        let (r, out) = build_index_str(&strs(&[&["b", "a", "c"]]), A);
        assert_eq!(out, strs(&[&["b", "a", "c"]]));
        assert_eq!(schedule(&r).order, vec![0]);
        let r = build_index(&[], A);
        assert!(r.reordered.is_empty());
        assert!(schedule(&r).order.is_empty());
    }

    // The §3.2 root example: the top merge keeps {1,2} and is the root itself.
    #[test]
    fn non_empty_real_root() {
        let r = build_index(
            &ids(&[
                &[1, 2, 3, 4, 5],
                &[1, 2, 3, 6, 7],
                &[1, 2, 3, 8, 9],
                &[1, 2, 10, 11, 12],
            ]),
            A,
        );
        let root = r.node(r.root.unwrap()).unwrap();
        assert_eq!(root.content, vec![1, 2]);
        assert_eq!(r.stats.root_nodes, 1);
        assert!(r.reordered.iter().all(|c| c[..2] == [1, 2]));
        assert_eq!(r.reordered[3], vec![1, 2, 10, 11, 12]);
    }

    #[test]
    fn duplicates_inside_context_are_dropped() {
        let r = build_index(&ids(&[&[4, 4, 2, 9], &[2, 9, 7]]), A);
        assert_eq!(r.reordered, ids(&[&[2, 9, 4], &[2, 9, 7]]));
    }

    #[test]
    fn empty_contexts_do_not_panic() {
        let r = build_index(&ids(&[&[], &[1, 2], &[], &[2, 1, 3]]), A);
        assert_eq!(r.reordered.len(), 4);
        assert!(r.reordered[0].is_empty());
        assert_eq!(r.reordered[1], vec![1, 2]);
        assert_eq!(r.reordered[3], vec![1, 2, 3]);
    }

    #[test]
    fn dense_reference_matches_hand_trace() {
        // Case 8's batch, traced by hand through the chain algorithm.
        let input = ids(&[
            &[1, 2, 3, 100, 101],
            &[1, 2, 3, 102, 103],
            &[1, 2, 3, 104, 105],
            &[10, 20, 30, 200, 201],
            &[10, 20, 30, 202, 203],
            &[10, 20, 30, 204, 205],
        ]);
        let z = linkage_average_condensed(&condensed_distances(&input, A), 6);
        let pairs: Vec<(usize, usize, usize)> = z.iter().map(|m| (m.a, m.b, m.size)).collect();
        assert_eq!(
            pairs,
            vec![(0, 1, 2), (2, 6, 3), (3, 4, 2), (5, 8, 3), (7, 9, 6)]
        );
        assert_eq!(z[4].height, 1.0);
        assert_eq!(linkage_average(&input, A), z);
    }

    fn random_batch(rng: &mut Rng, n: usize, vocab: u64, max_len: u64) -> Vec<Vec<u32>> {
        (0..n)
            .map(|_| {
                let len = rng.below(max_len + 1);
                (0..len).map(|_| rng.below(vocab) as u32).collect()
            })
            .collect()
    }

    #[test]
    fn sparse_linkage_equals_dense() {
        let mut rng = Rng(7);
        for round in 0..300 {
            let n = 2 + (round % 40);
            let vocab = [4u64, 8, 20, 60, 200][round % 5];
            let batch: Vec<Vec<u32>> = random_batch(&mut rng, n, vocab, 6)
                .into_iter()
                .map(|c| dedup_context(&c))
                .collect();
            let dense = linkage_average_condensed(&condensed_distances(&batch, A), n);
            let sparse = linkage_average(&batch, A);
            assert_eq!(dense, sparse, "round {round}: {batch:?}");
        }
    }

    #[test]
    fn sparse_linkage_equals_dense_bigger_batches() {
        // Longer merge histories exercise the outdated-entry bookkeeping.
        let mut rng = Rng(11);
        for round in 0..6 {
            let n = 120 + 30 * round;
            let vocab = [30u64, 60, 150][round % 3];
            let batch: Vec<Vec<u32>> = random_batch(&mut rng, n, vocab, 8)
                .into_iter()
                .map(|c| dedup_context(&c))
                .collect();
            let dense = linkage_average_condensed(&condensed_distances(&batch, A), n);
            assert_eq!(dense, linkage_average(&batch, A), "round {round}");
        }
    }

    #[test]
    fn sparse_linkage_equals_dense_large_alpha() {
        // A big alpha pushes some overlapping pairs above 1.0.
        let mut rng = Rng(99);
        for round in 0..100 {
            let n = 2 + (round % 30);
            let batch: Vec<Vec<u32>> = random_batch(&mut rng, n, 12, 8)
                .into_iter()
                .map(|c| dedup_context(&c))
                .collect();
            let dense = linkage_average_condensed(&condensed_distances(&batch, 0.5), n);
            assert_eq!(dense, linkage_average(&batch, 0.5), "round {round}");
        }
    }

    #[test]
    fn reordering_is_permutation_and_deterministic() {
        let mut rng = Rng(3);
        let batch = random_batch(&mut rng, 200, 80, 12);
        let r = build_index(&batch, A);
        for (a, b) in batch.iter().zip(&r.reordered) {
            let mut a = dedup_context(a);
            let mut b = b.clone();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b);
        }
        let s = schedule(&r);
        let mut seen = s.order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        let r2 = build_index(&batch, A);
        assert_eq!(r2.reordered, r.reordered);
        assert_eq!(schedule(&r2), s);
    }
}
