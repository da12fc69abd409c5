//! Start-up cost of the planning path: reading a GGUF header and planning.
//! Both run once per start, so the numbers only need to stay far below the
//! child's own start-up (~0.6 s for a 135M model on 2 cores).

use std::hint::black_box;

use contextpilotd::config::LlamaConfig;
use contextpilotd::gguf::{self, writer::WriteValue::*};
use contextpilotd::hardware::Hardware;
use criterion::{criterion_group, criterion_main, Criterion};

fn bench_plan(c: &mut Criterion) {
    let tokens: Vec<String> = (0..49_152).map(|i| format!("token{i}")).collect();
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let header = gguf::writer::header(&[
        ("general.architecture", Str("llama")),
        ("llama.block_count", U32(32)),
        ("llama.context_length", U32(131_072)),
        ("llama.embedding_length", U32(4096)),
        ("llama.attention.head_count", U32(32)),
        ("llama.attention.head_count_kv", U32(8)),
        ("tokenizer.ggml.tokens", StrArray(&token_refs)),
    ]);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.gguf");
    std::fs::write(&path, &header).expect("write model");

    c.bench_function("gguf header with a 49k-token vocabulary", |b| {
        b.iter(|| gguf::read_model_facts(black_box(&path)).expect("readable"))
    });

    let model = gguf::read_model_facts(&path).expect("readable");
    let hw: Hardware = serde_json::from_str(include_str!(
        "../tests/fixtures/hardware/macos-m3max-128gb.expected.json"
    ))
    .expect("fixture");
    let cfg = LlamaConfig::default();
    c.bench_function("plan for M3 Max", |b| {
        b.iter(|| contextpilotd::plan::plan(black_box(&hw), black_box(&model), black_box(&cfg)))
    });
}

criterion_group!(benches, bench_plan);
criterion_main!(benches);
