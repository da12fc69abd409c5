//! Online reorder: one request placed against a live index holding 10,000
//! leaves (the stateful `/reorder` path), in steady state: the leaf bound is
//! 10,000, so every insertion pushes the least recently used leaf out.
//! Prints p50/p95/p99 over 5,000 requests next to the 200 µs p99 target,
//! then criterion's own measurement.

use std::hint::black_box;
use std::time::{Duration, Instant};

use contextpilotd::reorder::cluster::DEFAULT_ALPHA;
use contextpilotd::reorder::live::{Key, Limits, LiveIndex};
use criterion::{criterion_group, criterion_main, Criterion};

mod common;
use common::topical_batch;

const LIVE_LEAVES: usize = 10_000;
const QUERIES: usize = 5_000;
const TARGET_P99_US: f64 = 200.0;

fn keys(batch: &[Vec<u32>]) -> Vec<Vec<Key>> {
    batch
        .iter()
        .map(|c| c.iter().map(|&b| Key::Int(u64::from(b))).collect())
        .collect()
}

/// A live index with `LIVE_LEAVES` leaves, and requests from the same topics.
fn setup() -> (LiveIndex, Vec<Vec<Key>>) {
    let all = keys(&topical_batch(LIVE_LEAVES + QUERIES, 0x11FE));
    let (initial, queries) = all.split_at(LIVE_LEAVES);
    let mut index = LiveIndex::new(
        DEFAULT_ALPHA,
        Limits {
            max_leaves: LIVE_LEAVES,
            ttl: None,
        },
    );
    index.reorder(initial, None);
    (index, queries.to_vec())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report_percentiles() {
    let (mut index, queries) = setup();
    let leaves_before = index.stats().leaf_nodes;
    let mut micros: Vec<f64> = queries
        .iter()
        .map(|q| {
            let started = Instant::now();
            black_box(index.reorder(std::slice::from_ref(q), None));
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    micros.sort_by(f64::total_cmp);
    let stats = index.stats();
    let p99 = percentile(&micros, 99.0);
    println!();
    println!(
        "online reorder, one request against {leaves_before} live leaves ({QUERIES} requests):"
    );
    println!(
        "  p50 {:>7.1} µs   p95 {:>7.1} µs   p99 {:>7.1} µs   max {:>8.1} µs",
        percentile(&micros, 50.0),
        percentile(&micros, 95.0),
        p99,
        micros[micros.len() - 1]
    );
    println!(
        "  target p99 < {TARGET_P99_US} µs: {}   (leaves after: {}, nodes: {}, LRU-evicted: {})",
        if p99 < TARGET_P99_US {
            "met"
        } else {
            "NOT met"
        },
        stats.leaf_nodes,
        stats.num_nodes,
        stats.lru_evicted
    );
    println!();
}

fn bench_online(c: &mut Criterion) {
    report_percentiles();
    let (mut index, queries) = setup();
    let mut next = 0usize;
    let mut group = c.benchmark_group("live_index");
    group.warm_up_time(Duration::from_millis(500));
    group.bench_function("online_reorder_vs_10000_leaves", |b| {
        b.iter(|| {
            let q = &queries[next % queries.len()];
            next += 1;
            black_box(index.reorder(std::slice::from_ref(q), None))
        })
    });
    group.finish();
}

criterion_group!(benches, bench_online);
criterion_main!(benches);
