//! `contextpilotd models` against a home directory laid out as the Hugging
//! Face hub cache, LM Studio, Ollama and llama.cpp's cache lay models out,
//! with small real GGUF headers.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use contextpilotd::gguf::writer::{header, header_with_tensors, WriteValue::*};

const BIN: &str = env!("CARGO_BIN_EXE_contextpilotd");

/// A model's header: `file_type` 15 is Q4_K_M, 7 is Q8_0.
fn model(arch: &str, file_type: u32, context: u32) -> Vec<u8> {
    let block_count = format!("{arch}.block_count");
    let context_length = format!("{arch}.context_length");
    header_with_tensors(
        &[
            ("general.architecture", Str(arch)),
            ("general.file_type", U32(file_type)),
            (&block_count, U32(2)),
            (&context_length, U32(context)),
        ],
        &[
            ("token_embd.weight", &[576, 49152], 3),
            ("blk.0.attn_q.weight", &[576, 576], 3),
        ],
    )
}

fn put(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

/// Every layout under `root`: `home/` (LM Studio), `hf/hub`, `ollama/`,
/// `llama-cache/`.
fn layouts(root: &Path) {
    let repo = root.join("hf/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF");
    put(&repo.join("blobs/0a1b"), &model("llama", 15, 8192));
    put(&repo.join("refs/main"), b"abc123\n");
    fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
    std::os::unix::fs::symlink(
        "../../blobs/0a1b",
        repo.join("snapshots/abc123/smollm2-135m-instruct-q4_k_m.gguf"),
    )
    .unwrap();
    put(
        &repo.join("snapshots/abc123/mmproj-smollm2-f16.gguf"),
        &header(&[
            ("general.type", Str("mmproj")),
            ("general.architecture", Str("clip")),
        ]),
    );

    put(
        &root.join("home/.lmstudio/models/lmstudio-community/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q8_0.gguf"),
        &model("gemma3", 7, 32768),
    );

    let digest = "9f".repeat(32);
    put(
        &root.join(format!("ollama/blobs/sha256-{digest}")),
        &model("qwen3", 15, 40960),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{digest}"), "size": 1},
            {"mediaType": "application/vnd.ollama.image.license", "digest": format!("sha256:{}", "0".repeat(64)), "size": 1},
        ],
    });
    put(
        &root.join("ollama/manifests/registry.ollama.ai/library/qwen3/0.6b"),
        manifest.to_string().as_bytes(),
    );

    put(
        &root.join("llama-cache/ggml-org_tiny-GGUF_tiny-Q8_0.gguf"),
        &model("llama", 7, 2048),
    );
    put(
        &root.join("llama-cache/ggml-org_tiny-GGUF_tiny-Q8_0.gguf.json"),
        b"{}",
    );
}

fn models(root: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("models")
        .args(args)
        .env("HOME", root.join("home"))
        .env("HF_HOME", root.join("hf"))
        .env("OLLAMA_MODELS", root.join("ollama"))
        .env("LLAMA_CACHE", root.join("llama-cache"))
        .env("XDG_CONFIG_HOME", root.join("config"))
        .env_remove("CONTEXTPILOTD_CONFIG")
        .env_remove("HF_HUB_CACHE")
        .env_remove("XDG_CACHE_HOME")
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn lists_every_layout_as_a_table() {
    let dir = tempfile::tempdir().unwrap();
    layouts(dir.path());
    let text = stdout(&models(dir.path(), &[]));
    let lines: Vec<&str> = text.lines().collect();
    let heading: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        heading,
        ["NAME", "ARCH", "PARAMS", "QUANT", "CONTEXT", "SIZE", "SOURCE"]
    );
    // Each model's row, then its path.
    let rows: Vec<Vec<&str>> = lines[1..]
        .iter()
        .step_by(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let want = [
        (
            "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_K_M",
            "llama",
            "Q4_K_M",
            "8K",
            "huggingface",
        ),
        (
            "lmstudio-community/gemma-3-270m-it-GGUF:Q8_0",
            "gemma3",
            "Q8_0",
            "32K",
            "lmstudio",
        ),
        ("qwen3:0.6b", "qwen3", "Q4_K_M", "40K", "ollama"),
        (
            "ggml-org_tiny-GGUF_tiny-Q8_0",
            "llama",
            "Q8_0",
            "2K",
            "llamacache",
        ),
    ];
    assert_eq!(rows.len(), want.len(), "{text}");
    for (row, (name, arch, quant, context, source)) in rows.iter().zip(want) {
        assert_eq!(row[0], name, "{text}");
        assert_eq!(row[1], arch, "{text}");
        assert_eq!(row[2], "29M", "{text}");
        assert_eq!(row[3], quant, "{text}");
        assert_eq!(row[4], context, "{text}");
        assert_eq!(row.last().copied(), Some(source), "{text}");
    }
    assert!(lines[2].trim_start().starts_with('/'), "{text}");
    assert!(!text.contains("mmproj"), "{text}");
}

#[test]
fn json_lists_the_facts() {
    let dir = tempfile::tempdir().unwrap();
    layouts(dir.path());
    let text = stdout(&models(dir.path(), &["--json"]));
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let list = doc.as_array().unwrap();
    assert_eq!(list.len(), 4, "{text}");
    let smol = &list[0];
    assert_eq!(
        smol["name"],
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_K_M"
    );
    assert_eq!(smol["source"], "huggingface");
    assert_eq!(smol["architecture"], "llama");
    assert_eq!(smol["quantization"], "Q4_K_M");
    assert_eq!(smol["context_length"], 8192);
    assert_eq!(smol["parameters"], "29M");
    assert_eq!(smol["parameter_count"], 576 * 49152 + 576 * 576);
    assert_eq!(smol["size_bytes"], model("llama", 15, 8192).len() as u64);
    assert!(smol["error"].is_null());
    assert!(smol["aliases"]
        .as_array()
        .unwrap()
        .contains(&"smollm2-135m-instruct-q4_k_m".into()));
    let ollama = &list[2];
    assert_eq!(ollama["name"], "qwen3:0.6b");
    assert!(ollama["path"]
        .as_str()
        .unwrap()
        .ends_with(&format!("blobs/sha256-{}", "9f".repeat(32))));
}

#[test]
fn the_config_comes_first_and_discover_off_searches_only_dirs() {
    let dir = tempfile::tempdir().unwrap();
    layouts(dir.path());
    let mine = dir.path().join("mine");
    put(&mine.join("sub/local.gguf"), &model("llama", 7, 4096));
    let config = dir.path().join("config.toml");
    fs::write(
        &config,
        format!(
            "[llama]\nmodel = {:?}\nmodel_alias = \"main\"\n[models]\ndiscover = false\ndirs = [{:?}]\n",
            dir.path().join("llama-cache/ggml-org_tiny-GGUF_tiny-Q8_0.gguf"),
            mine,
        ),
    )
    .unwrap();
    let text = stdout(&models(
        dir.path(),
        &["--json", "--config", config.to_str().unwrap()],
    ));
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let names: Vec<(&str, &str)> = doc
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["source"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("main", "config"), ("local", "dir")], "{text}");
}

#[test]
fn nothing_found_says_where_it_looked_and_a_bad_config_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let text = stdout(&models(dir.path(), &[]));
    assert!(
        text.contains(&dir.path().join("hf/hub").display().to_string()),
        "{text}"
    );
    assert!(text.contains("contextpilotd pull <repo>"), "{text}");
    assert_eq!(stdout(&models(dir.path(), &["--json"])).trim(), "[]");

    let config = dir.path().join("bad.toml");
    fs::write(&config, "[models]\nno_such_key = 1\n").unwrap();
    let out = models(dir.path(), &["--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no_such_key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
