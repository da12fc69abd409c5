//! Index build (distance + average linkage + tree + ordering) and scheduling
//! for batches of random contexts with topical overlap.

use std::hint::black_box;
use std::time::Duration;

use contextpilotd::reorder::cluster::{build_index, schedule, DEFAULT_ALPHA};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

mod common;
use common::topical_batch;

fn bench_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("cluster_build_index");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    for &n in &[1_000usize, 4_000, 12_000] {
        let batch = topical_batch(n, 0xC0FFEE + n as u64);
        group.bench_with_input(BenchmarkId::from_parameter(n), &batch, |b, batch| {
            b.iter(|| build_index(black_box(batch), DEFAULT_ALPHA))
        });
    }
    group.finish();

    let batch = topical_batch(12_000, 42);
    let index = build_index(&batch, DEFAULT_ALPHA);
    c.bench_function("cluster_schedule_12000", |b| {
        b.iter(|| schedule(black_box(&index)))
    });
}

criterion_group!(benches, bench_build);
criterion_main!(benches);
