//! The per-request cost of reordering: parsing `documents`, choosing the
//! slot and the order against every slot's block sequence, and rendering
//! the system message. It runs on the request path, so it must stay in the
//! microseconds.

use std::hint::black_box;
use std::sync::Arc;

use contextpilotd::reorder::{
    header_of, parse_documents, render_system, DocumentsPolicy, Registry,
};
use contextpilotd::slots::{
    Block, BlockSeq, ChoiceInput, RamTier, SlotContents, SlotPolicy, SlotState,
};
use criterion::{criterion_group, criterion_main, Criterion};

fn doc(i: usize) -> String {
    format!("Document {i}: a paragraph of retrieved text about subject {} with enough words to be realistic.", i % 97)
}

fn bench_reorder(c: &mut Criterion) {
    let request: Vec<String> = (0..15).map(|i| doc(i * 3)).collect();
    let json = serde_json::to_value(&request).unwrap();
    let parsed = parse_documents(&json).unwrap();
    let registry = Registry::default();
    let ranks = registry.observe(&parsed.docs).unwrap();
    let (header, header_tokens) = header_of(Some("You are a helpful assistant."));
    // 16 slots, each holding 20 documents, some of them this request's.
    let slots: Vec<SlotState> = (0..16)
        .map(|s| {
            let held = parse_documents(
                &serde_json::to_value((0..20).map(|i| doc(i * (s + 1))).collect::<Vec<_>>())
                    .unwrap(),
            )
            .unwrap();
            SlotState {
                busy: s % 4 == 0,
                holds: SlotContents {
                    key: Arc::from(""),
                    blocks: Some(Arc::new(BlockSeq {
                        header,
                        header_tokens,
                        blocks: held
                            .docs
                            .iter()
                            .map(|d| Block {
                                hash: d.hash,
                                tokens: d.tokens,
                            })
                            .collect(),
                    })),
                },
                last_used: None,
                hits: 0,
                answered: None,
            }
        })
        .collect();

    let cost = contextpilotd::cost::CostView::for_tests();
    c.bench_function("parse 15 documents", |b| {
        b.iter(|| parse_documents(black_box(&json)).unwrap())
    });
    c.bench_function(
        "choose slot and order: 15 documents, 16 slots x 20 held",
        |b| {
            b.iter(|| {
                let mut policy = DocumentsPolicy::new(header, header_tokens, &parsed.docs, &ranks);
                black_box(policy.choose(ChoiceInput {
                    slots: black_box(&slots),
                    ram: &mut RamTier::new(0),
                    cost: &cost,
                    now: std::time::Instant::now(),
                }))
            })
        },
    );
    let order: Vec<usize> = (0..parsed.docs.len()).rev().collect();
    c.bench_function("render the system message for 15 documents", |b| {
        b.iter(|| {
            render_system(
                Some("You are a helpful assistant."),
                black_box(&parsed.docs),
                black_box(&order),
            )
        })
    });
}

criterion_group!(benches, bench_reorder);
criterion_main!(benches);
