//! The GGUF reader on the real model the tests run (SmolLM2-135M-Instruct
//! Q4_1), against the facts llama.cpp itself reports for it.

mod common;

use contextpilotd::gguf::read_model_facts;

#[test]
fn reads_the_real_model() {
    let parts = common::real_parts();
    let facts = read_model_facts(&parts.model).unwrap();
    assert_eq!(facts.architecture, "llama");
    assert_eq!(facts.size_bytes, 98_362_432);
    assert_eq!(facts.context_length, Some(8192));
    assert_eq!(facts.block_count, 30);
    assert_eq!(facts.embedding_length, Some(576));
    assert_eq!(facts.head_count, Some(9));
    assert_eq!(facts.head_count_kv, vec![3]);
    assert_eq!(facts.sliding_window, None);
    // 30 layers × 3 KV heads × (64 + 64) dims × 2 bytes.
    assert_eq!(facts.kv_bytes_per_token(), Some(23_040));
    assert_eq!(facts.quantization(), Some("Q4_1"));
}

/// The parameter count from the tensor infos, on the model named by
/// `$CONTEXTPILOTD_TEST_MODEL` only (so no provisioning is needed to skip
/// it): SmolLM2-135M has 134.5M weights (its embeddings tied to the output).
#[test]
fn counts_the_real_models_parameters() {
    let Some(model) = std::env::var_os("CONTEXTPILOTD_TEST_MODEL") else {
        return;
    };
    let facts = read_model_facts(std::path::Path::new(&model)).unwrap();
    let count = facts.parameter_count.expect("the tensor infos are read");
    assert!(
        (130_000_000..140_000_000).contains(&count),
        "{count} parameters"
    );
    // `general.size_label` when the converter wrote one, else "135M".
    assert!(facts.parameter_label().is_some());
}

#[test]
fn a_truncated_real_model_header_is_a_clear_error() {
    let parts = common::real_parts();
    let bytes = std::fs::read(&parts.model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    // Inside the tokenizer vocabulary, well before the tensor data.
    std::fs::write(&cut, &bytes[..64 * 1024]).unwrap();
    let err = read_model_facts(&cut).unwrap_err().to_string();
    assert!(
        err.contains("truncated or corrupt") && err.contains("cut.gguf"),
        "{err}"
    );
}
