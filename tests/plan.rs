//! The planner pinned for every hardware fixture with an 8B and a 1B model,
//! and the `print-command` / `doctor` commands on a fixture.

use std::path::{Path, PathBuf};
use std::process::Command;

use contextpilotd::config::{Auto, LlamaConfig};
use contextpilotd::gguf::{self, writer::WriteValue::*, ModelFacts};
use contextpilotd::hardware::Hardware;
use contextpilotd::plan::{command_line, plan};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_contextpilotd");

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hardware")
        .join(format!("{name}.expected.json"))
}

fn hardware(name: &str) -> Hardware {
    serde_json::from_str(&std::fs::read_to_string(fixture_path(name)).unwrap()).unwrap()
}

/// Llama 3.1 8B Instruct Q4_K_M: 32 layers, 8 KV heads of 128: 128 KiB/token.
fn llama_8b() -> ModelFacts {
    ModelFacts {
        path: PathBuf::from("/models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"),
        size_bytes: 4_920_734_016,
        architecture: "llama".into(),
        name: Some("Meta Llama 3.1 8B Instruct".into()),
        context_length: Some(131_072),
        block_count: 32,
        embedding_length: Some(4096),
        head_count: Some(32),
        head_count_kv: vec![8],
        key_length: None,
        value_length: None,
        sliding_window: None,
        file_type: Some(15),
        parameter_count: Some(8_030_261_248),
        size_label: Some("8B".into()),
    }
}

/// Llama 3.2 1B Instruct Q4_K_M: 16 layers, 8 KV heads of 64: 32 KiB/token.
fn llama_1b() -> ModelFacts {
    ModelFacts {
        path: PathBuf::from("/models/Llama-3.2-1B-Instruct-Q4_K_M.gguf"),
        size_bytes: 807_694_464,
        block_count: 16,
        embedding_length: Some(2048),
        name: Some("Llama 3.2 1B Instruct".into()),
        parameter_count: Some(1_235_814_400),
        size_label: Some("1B".into()),
        ..llama_8b()
    }
}

#[test]
fn kv_sizes_of_the_reference_models() {
    assert_eq!(llama_8b().kv_bytes_per_token(), Some(128 * 1024));
    assert_eq!(llama_1b().kv_bytes_per_token(), Some(32 * 1024));
}

/// (fixture, model, slots, ctx_per_slot, threads, batch, ubatch)
#[rustfmt::skip]
const TABLE: &[(&str, &str, u32, u32, u32, u32, u32)] = &[
    // 8 GiB M1: Metal may wire 2/3 (5.33 GiB); after the 4.58 GiB model and
    // the 512 MiB margin, 2052 tokens of KV remain: one slot of 2048.
    ("macos-m1-8gb",      "8b",  1,  2048, 4,  1024, 256),
    ("macos-m1-8gb",      "1b",  2,  8192, 4,  1024, 256),
    // 16 GiB M2 Pro: 45.7k tokens fit; 19 GPU cores cap at 4 slots.
    ("macos-m2pro-16gb",  "8b",  4,  8192, 8,  2048, 512),
    ("macos-m2pro-16gb",  "1b",  4,  8192, 8,  2048, 512),
    // 128 GiB M3 Max: memory is plentiful; 40 GPU cores cap at 10.
    ("macos-m3max-128gb", "8b", 10,  8192, 12, 2048, 1024),
    ("macos-m3max-128gb", "1b", 10,  8192, 12, 2048, 1024),
    // 64 GiB M4 Max with iogpu.wired_limit_mb = 57344.
    ("macos-m4max-64gb",  "8b", 10,  8192, 12, 2048, 1024),
    ("macos-m4max-64gb",  "1b", 10,  8192, 12, 2048, 1024),
    // 2-core Linux VM, CPU only: one slot per two cores.
    ("linux-2core",       "8b",  1,  8192, 2,  2048, 512),
    ("linux-2core",       "1b",  1,  8192, 2,  2048, 512),
    // 24 GiB RTX 4090: 150k tokens fit beside the 8B model; CUDA caps at 8.
    ("linux-nvidia",      "8b",  8,  8192, 8,  2048, 512),
    ("linux-nvidia",      "1b",  8,  8192, 8,  2048, 512),
    // Under Rosetta the chip is unknown: base-class limits.
    ("macos-rosetta",     "8b",  2,  8192, 8,  1024, 256),
];

#[test]
fn plan_table() {
    let cfg = LlamaConfig::default();
    for &(fixture, model, slots, ctx_per_slot, threads, batch, ubatch) in TABLE {
        let hw = hardware(fixture);
        let facts = if model == "8b" {
            llama_8b()
        } else {
            llama_1b()
        };
        let p = plan(&hw, &facts, &cfg);
        let got = (p.slots, p.ctx_per_slot, p.threads, p.batch, p.ubatch);
        assert_eq!(
            got,
            (slots, ctx_per_slot, threads, batch, ubatch),
            "{fixture} with {model}: {p:#?}"
        );
        assert_eq!(
            p.ctx_size,
            slots as u64 * ctx_per_slot as u64,
            "{fixture} {model}"
        );
        assert!(
            p.memory.kv_planned_bytes <= p.memory.kv_budget_bytes,
            "{fixture} {model}: the plan exceeds the KV budget"
        );
        assert!(!p.swa_full);
        // Every derived setting explains itself.
        for flag in [
            "--ctx-size",
            "--parallel",
            "-ngl",
            "--cache-reuse",
            "-t",
            "-b",
            "-ub",
        ] {
            let d = p
                .decisions
                .iter()
                .find(|d| d.flag == flag)
                .unwrap_or_else(|| panic!("no {flag}"));
            assert!(!d.why.is_empty());
        }
    }
}

#[test]
fn memory_rules() {
    let m1 = plan(
        &hardware("macos-m1-8gb"),
        &llama_8b(),
        &LlamaConfig::default(),
    );
    assert_eq!(m1.memory.gpu_usable_bytes, 8 * (1 << 30) / 3 * 2);
    assert_eq!(m1.memory.margin_bytes, 512 << 20);
    let m3 = plan(
        &hardware("macos-m3max-128gb"),
        &llama_8b(),
        &LlamaConfig::default(),
    );
    assert_eq!(m3.memory.gpu_usable_bytes, 96 << 30);
    let m4 = plan(
        &hardware("macos-m4max-64gb"),
        &llama_8b(),
        &LlamaConfig::default(),
    );
    assert_eq!(m4.memory.gpu_usable_bytes, 57_344 << 20);
    assert!(m4.memory.gpu_usable_rule.contains("iogpu.wired_limit_mb"));
    let cuda = plan(
        &hardware("linux-nvidia"),
        &llama_8b(),
        &LlamaConfig::default(),
    );
    assert_eq!(cuda.memory.gpu_usable_bytes, 24_564 << 20);
}

#[test]
fn explicit_values_win_and_warn_when_over_budget() {
    let cfg = LlamaConfig {
        slots: Auto::Value(6),
        ctx_per_slot: Auto::Value(4096),
        threads: Auto::Value(3),
        batch: Auto::Value(128),
        ..LlamaConfig::default()
    };
    let p = plan(&hardware("macos-m1-8gb"), &llama_8b(), &cfg);
    assert_eq!(
        (
            p.slots,
            p.ctx_per_slot,
            p.ctx_size,
            p.threads,
            p.batch,
            p.ubatch
        ),
        (6, 4096, 24_576, 3, 128, 128)
    );
    assert!(
        p.warnings.iter().any(|w| w.contains("more than the")),
        "{:?}",
        p.warnings
    );
}

#[test]
fn explicit_slots_share_the_budget() {
    // 8 GiB M1 with an 8B model has room for 2052 tokens of KV: four slots
    // get 512 each (the minimum), not 2048 each.
    let cfg = LlamaConfig {
        slots: Auto::Value(4),
        ..LlamaConfig::default()
    };
    let p = plan(&hardware("macos-m1-8gb"), &llama_8b(), &cfg);
    assert_eq!((p.slots, p.ctx_per_slot, p.ctx_size), (4, 512, 2048));
    assert!(p.memory.kv_planned_bytes <= p.memory.kv_budget_bytes);
    let cfg = LlamaConfig {
        slots: Auto::Value(2),
        ..LlamaConfig::default()
    };
    let p = plan(&hardware("macos-m1-8gb"), &llama_8b(), &cfg);
    assert_eq!((p.slots, p.ctx_per_slot), (2, 1024));
}

#[test]
fn attention_free_models_plan_without_panicking() {
    let mamba = ModelFacts {
        architecture: "mamba".into(),
        head_count: Some(0),
        head_count_kv: vec![],
        context_length: None,
        ..llama_1b()
    };
    let p = plan(&hardware("macos-m1-8gb"), &mamba, &LlamaConfig::default());
    assert!(p.slots >= 1);
    assert!(p.warnings.iter().any(|w| w.contains("attention shape")));
}

#[test]
fn a_model_too_big_for_memory_is_called_out() {
    let huge = ModelFacts {
        size_bytes: 40 << 30,
        ..llama_8b()
    };
    let p = plan(
        &hardware("macos-m2pro-16gb"),
        &huge,
        &LlamaConfig::default(),
    );
    assert_eq!((p.slots, p.ctx_per_slot), (1, 512));
    assert!(
        p.warnings.iter().any(|w| w.contains("even the smallest")),
        "{:?}",
        p.warnings
    );
    assert!(
        p.warnings.iter().any(|w| w.contains("does not fit")),
        "{:?}",
        p.warnings
    );
}

#[test]
fn short_trained_context_caps_ctx_per_slot() {
    let small = ModelFacts {
        context_length: Some(2048),
        ..llama_1b()
    };
    let p = plan(
        &hardware("macos-m3max-128gb"),
        &small,
        &LlamaConfig::default(),
    );
    assert_eq!(p.ctx_per_slot, 2048);
}

#[test]
fn sliding_window_models_get_swa_full_when_it_fits() {
    let gemma = ModelFacts {
        architecture: "gemma3".into(),
        sliding_window: Some(512),
        ..llama_1b()
    };
    let p = plan(
        &hardware("macos-m3max-128gb"),
        &gemma,
        &LlamaConfig::default(),
    );
    assert!(p.swa_full);
    let d = p
        .decisions
        .iter()
        .find(|d| d.flag == "--swa-full")
        .expect("--swa-full explained");
    assert!(d.why.contains("sliding-window"));
    let argv = command_line(
        Path::new("llama-server"),
        &gemma.path,
        8080,
        &p,
        &LlamaConfig::default(),
    );
    assert!(argv.contains(&"--swa-full".to_string()));

    let over = LlamaConfig {
        slots: Auto::Value(16),
        ctx_per_slot: Auto::Value(131_072),
        ..LlamaConfig::default()
    };
    let p = plan(&hardware("macos-m1-8gb"), &gemma, &over);
    assert!(!p.swa_full);
    assert!(p.warnings.iter().any(|w| w.contains("--swa-full")));
}

#[test]
fn command_line_carries_every_fixed_flag_and_extra_args_last() {
    let cfg = LlamaConfig {
        model_alias: Some("llama-8b".into()),
        extra_args: vec!["--flash-attn".into(), "on".into()],
        ..LlamaConfig::default()
    };
    let p = plan(&hardware("macos-m3max-128gb"), &llama_8b(), &cfg);
    let argv = command_line(
        Path::new("/opt/homebrew/bin/llama-server"),
        &llama_8b().path,
        8081,
        &p,
        &cfg,
    );
    assert_eq!(argv[0], "/opt/homebrew/bin/llama-server");
    for flag in [
        "-m",
        "--host",
        "--port",
        "--ctx-size",
        "--parallel",
        "-ngl",
        "--cache-reuse",
        "--metrics",
        "--alias",
    ] {
        assert!(argv.iter().any(|a| a == flag), "{flag} missing: {argv:?}");
    }
    assert_eq!(&argv[argv.len() - 2..], ["--flash-attn", "on"]);
    let host = argv.iter().position(|a| a == "--host").unwrap();
    assert_eq!(argv[host + 1], "127.0.0.1");
}

/// Writes a GGUF header for an 8B llama and extends the file to the real
/// model's size as a sparse file, so the planner sees real numbers.
fn sparse_8b_model(dir: &Path) -> PathBuf {
    let path = dir.join("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf");
    let header = gguf::writer::header(&[
        ("general.architecture", Str("llama")),
        ("general.name", Str("Meta Llama 3.1 8B Instruct")),
        ("llama.block_count", U32(32)),
        ("llama.context_length", U32(131_072)),
        ("llama.embedding_length", U32(4096)),
        ("llama.attention.head_count", U32(32)),
        ("llama.attention.head_count_kv", U32(8)),
    ]);
    std::fs::write(&path, header).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4_920_734_016)
        .unwrap();
    path
}

fn write_config(dir: &Path, model: &Path, port: u16) -> PathBuf {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[llama]\nbinary = \"/opt/homebrew/bin/llama-server\"\nmodel = \"{}\"\nport = {port}\n",
            model.display()
        ),
    )
    .unwrap();
    config
}

/// An executable that answers `--help` with nothing: a binary that exists,
/// with no optional flags, as the planner sees a missing one.
fn stub_binary(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("llama-server");
    std::fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn write_config_with(dir: &Path, model: &Path, binary: &Path) -> PathBuf {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[llama]\nbinary = \"{}\"\nmodel = \"{}\"\nport = 8081\n",
            binary.display(),
            model.display()
        ),
    )
    .unwrap();
    config
}

/// A PROBLEM in doctor's report is what would stop `run`, with its exit
/// code (2): a missing binary still gets the whole plan; a missing model
/// still gets the configuration, the binary and the hardware.
#[test]
fn doctor_exits_2_on_a_problem_and_still_shows_the_hardware() {
    let dir = tempfile::tempdir().unwrap();
    let hardware = fixture_path("macos-m4max-64gb");
    let doctor = |config: &Path, json: bool| {
        let mut command = Command::new(BIN);
        command.arg("doctor");
        if json {
            command.arg("--json");
        }
        let out = command
            .arg("--config")
            .arg(config)
            .arg("--hardware")
            .arg(&hardware)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };

    // The binary is missing (write_config names Homebrew's path).
    let model = sparse_8b_model(dir.path());
    let config = write_config(dir.path(), &model, 8081);
    let (code, text, stderr) = doctor(&config, false);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(text.contains("llama-server   PROBLEM:"), "{text}");
    assert!(
        text.contains("KV budget"),
        "the plan is still shown:\n{text}"
    );
    let (code, json, _) = doctor(&config, true);
    assert_eq!(code, Some(2));
    let doc: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["plan"]["slots"], 10);
    let problems = doc["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{doc}");
    assert!(
        problems[0].as_str().unwrap().contains("llama.binary"),
        "{doc}"
    );

    // The model is missing too: no plan, but what is known is shown.
    let missing = dir.path().join("gone.gguf");
    let config = write_config(dir.path(), &missing, 8081);
    let (code, text, stderr) = doctor(&config, false);
    assert_eq!(code, Some(2), "{stderr}");
    for needle in [
        "configuration",
        "Apple M4 Max",
        "model          PROBLEM:",
        "gone.gguf",
        "llama.model",
    ] {
        assert!(
            text.contains(needle),
            "doctor output lacks {needle}:\n{text}"
        );
    }
    assert!(!text.contains("KV budget"), "{text}");
    let (code, json, _) = doctor(&config, true);
    assert_eq!(code, Some(2));
    let doc: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["hardware"]["chip"], "Apple M4 Max");
    assert!(doc.get("plan").is_none(), "{doc}");
    let problems: Vec<&str> = doc["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(problems[0].contains("gone.gguf"), "{problems:?}");
    assert!(
        problems
            .iter()
            .any(|p| p.contains("/opt/homebrew/bin/llama-server")),
        "{problems:?}"
    );

    // With both in place there is no problem and the exit code is 0.
    let config = write_config_with(dir.path(), &model, &stub_binary(dir.path()));
    let (code, json, stderr) = doctor(&config, true);
    assert_eq!(code, Some(0), "{stderr}");
    let doc: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["problems"].as_array().unwrap().len(), 0);
}

#[test]
fn print_command_golden() {
    let dir = tempfile::tempdir().unwrap();
    let model = sparse_8b_model(dir.path());
    let config = write_config(dir.path(), &model, 8081);
    let out = Command::new(BIN)
        .args(["print-command", "--config"])
        .arg(&config)
        .arg("--hardware")
        .arg(fixture_path("macos-m3max-128gb"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model_path = model.canonicalize().unwrap();
    let stdout = String::from_utf8(out.stdout)
        .unwrap()
        .replace(model_path.to_str().unwrap(), "$MODEL");
    assert_eq!(
        stdout,
        "/opt/homebrew/bin/llama-server -m $MODEL --host 127.0.0.1 --port 8081 --ctx-size 81920 \
         --parallel 10 -ngl 99 --cache-reuse 256 -t 12 -b 2048 -ub 1024 --metrics\n"
    );
    // No such binary here: said on stderr, the command still printed.
    assert!(String::from_utf8_lossy(&out.stderr).contains("llama.binary"));
}

#[test]
fn doctor_explains_and_its_hardware_json_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let model = sparse_8b_model(dir.path());
    let config = write_config_with(dir.path(), &model, &stub_binary(dir.path()));
    let run = |args: &[&str], hardware: &Path| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&config)
            .arg("--hardware")
            .arg(hardware)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let doc: Value = serde_json::from_str(&run(
        &["doctor", "--json"],
        &fixture_path("macos-m4max-64gb"),
    ))
    .unwrap();
    assert_eq!(doc["hardware"]["chip"], "Apple M4 Max");
    assert_eq!(doc["model"]["block_count"], 32);
    assert_eq!(doc["plan"]["slots"], 10);
    for decision in doc["plan"]["decisions"].as_array().unwrap() {
        assert!(!decision["why"].as_str().unwrap().is_empty(), "{decision}");
    }

    // The whole doctor document is accepted as a hardware profile, and so is
    // its `hardware` object alone; both give the same plan.
    let whole = dir.path().join("doctor.json");
    std::fs::write(&whole, serde_json::to_string(&doc).unwrap()).unwrap();
    let part = dir.path().join("hardware.json");
    std::fs::write(&part, serde_json::to_string(&doc["hardware"]).unwrap()).unwrap();
    let again: Value = serde_json::from_str(&run(&["doctor", "--json"], &part)).unwrap();
    assert_eq!(again["plan"], doc["plan"]);
    let again: Value = serde_json::from_str(&run(&["doctor", "--json"], &whole)).unwrap();
    assert_eq!(again["plan"], doc["plan"]);

    let text = run(&["doctor"], &part);
    for needle in [
        "Apple M4 Max",
        "iogpu.wired_limit_mb",
        "--parallel",
        "--ctx-size",
        "KV budget",
    ] {
        assert!(
            text.contains(needle),
            "doctor output lacks {needle}:\n{text}"
        );
    }
}

/// With a binary that has `--kv-unified` and llama-server's RAM cache
/// measured to cost more than it saves, slots are planned for the working
/// set: as many resident prompts of half a context as the budget holds, in
/// one pool no larger than the budget, with only what the chip decodes in
/// parallel admitted at once. With a RAM cache that pays (it holds the
/// working set), or without the flag, slots stay the decode count.
#[test]
fn a_unified_kv_without_the_ram_cache_plans_resident_prompts() {
    use contextpilotd::cost::{CostProfile, RamCost};
    use contextpilotd::plan::{plan_with, BinaryCaps, PlanInputs};
    let caps = BinaryCaps {
        kv_unified: true,
        cache_ram: true,
        cache_idle_slots: true,
        rpc: false,
    };
    let with_ram = |restore_ms: f64| CostProfile {
        ram: Some(RamCost {
            tokens: 4080,
            recompute_ms: 420.0,
            restore_ms,
            save_ms: restore_ms,
        }),
        ..CostProfile::unmeasured(8.7, 0.101, 11.0)
    };
    let costly = with_ram(124.0);
    let cheap = with_ram(10.0);
    let hw = hardware("macos-m3max-128gb");
    let cfg = LlamaConfig::default();
    let split = plan(&hw, &llama_8b(), &cfg);
    let inputs = |cost| PlanInputs {
        caps,
        cost,
        keep_shape: None,
        memory_limit: None,
        rpc: &[],
    };
    let unified = plan_with(&hw, &llama_8b(), &cfg, inputs(Some(&costly)));
    assert_eq!(split.slots, split.concurrency);
    assert!(!split.kv_unified);
    assert!(unified.kv_unified);
    assert_eq!(
        unified.concurrency, split.slots,
        "decoding is still bounded by the chip"
    );
    assert!(unified.slots > split.slots, "{} resident", unified.slots);
    assert_eq!(unified.cache_ram_mib, Some(0));
    assert!(unified.memory.kv_planned_bytes <= unified.memory.kv_budget_bytes);
    let argv = command_line(
        Path::new("llama-server"),
        Path::new("/m.gguf"),
        8080,
        &unified,
        &cfg,
    );
    assert!(argv.iter().any(|a| a == "--kv-unified"), "{argv:?}");
    assert!(
        !argv.iter().any(|a| a == "--no-cache-idle-slots"),
        "{argv:?}"
    );
    let why: Vec<&str> = unified.decisions.iter().map(|d| d.why.as_str()).collect();
    assert!(
        why.iter().any(|w| w.contains("resident prompts")),
        "{why:?}"
    );

    // A child restarted with the measured flags keeps the running slots.
    let restarted = plan_with(
        &hw,
        &llama_8b(),
        &cfg,
        PlanInputs {
            caps,
            cost: Some(&costly),
            keep_shape: Some(&split),
            memory_limit: None,
            rpc: &[],
        },
    );
    assert_eq!(
        (restarted.slots, restarted.concurrency, restarted.ctx_size),
        (split.slots, split.concurrency, split.ctx_size)
    );
    assert_eq!(restarted.cache_ram_mib, Some(0));

    for cost in [Some(&cheap), None] {
        let kept = plan_with(&hw, &llama_8b(), &cfg, inputs(cost));
        assert_eq!((kept.slots, kept.concurrency), (split.slots, split.slots));
        assert!(kept.kv_unified && kept.no_cache_idle_slots);
    }
    // On the 8 GiB M1 the pool is the budget, and admission follows the chip.
    let small = plan_with(
        &hardware("macos-m1-8gb"),
        &llama_8b(),
        &cfg,
        inputs(Some(&costly)),
    );
    assert!(small.memory.kv_planned_bytes <= small.memory.kv_budget_bytes);
    assert!(small.concurrency <= small.slots);
    // Explicit slots are the user's: all of them run at once.
    let explicit = plan_with(
        &hw,
        &llama_8b(),
        &LlamaConfig {
            slots: Auto::Value(8),
            ..LlamaConfig::default()
        },
        inputs(Some(&costly)),
    );
    assert_eq!((explicit.slots, explicit.concurrency), (8, 8));
}

fn worker(endpoint: &str, free_gib: u64) -> contextpilotd::rpc::RpcWorker {
    contextpilotd::rpc::RpcWorker {
        endpoint: endpoint.into(),
        facts: Ok(contextpilotd::rpc::WorkerFacts {
            protocol: "7.0.0".into(),
            devices: vec![contextpilotd::rpc::DeviceMemory {
                free_bytes: free_gib << 30,
                total_bytes: (free_gib + 2) << 30,
            }],
        }),
    }
}

/// A model too large for a 16 GiB Mac fits once a remote worker's free
/// memory counts; the layers split by free memory and the child gets
/// `--rpc`.
#[test]
fn rpc_workers_count_their_memory_and_split_the_layers() {
    use contextpilotd::plan::{plan_with, BinaryCaps, PlanInputs};
    let huge = ModelFacts {
        size_bytes: 20 << 30,
        ..llama_8b()
    };
    let hw = hardware("macos-m2pro-16gb");
    let cfg = LlamaConfig {
        rpc_workers: vec!["10.0.0.2:50052".into()],
        rpc_allow_remote: true,
        ..LlamaConfig::default()
    };
    let caps = BinaryCaps {
        rpc: true,
        ..BinaryCaps::default()
    };
    let workers = [worker("10.0.0.2:50052", 32)];
    let inputs = PlanInputs {
        caps,
        rpc: &workers,
        ..PlanInputs::default()
    };
    let alone = plan(&hw, &huge, &LlamaConfig::default());
    let p = plan_with(&hw, &huge, &cfg, inputs);
    assert_eq!(
        p.memory.gpu_usable_bytes,
        alone.memory.gpu_usable_bytes + (32 << 30)
    );
    assert!(
        p.memory.gpu_usable_rule.contains("RPC workers"),
        "{}",
        p.memory.gpu_usable_rule
    );
    assert!(
        !p.warnings.iter().any(|w| w.contains("does not fit")),
        "{:?}",
        p.warnings
    );
    // 32 GiB free on the worker against ~10.7 GiB on the Mac: 3/4 of the
    // 33 offloaded layers (32 blocks and the output) go to the worker.
    let split: Vec<(&str, u32)> = p
        .layer_split
        .iter()
        .map(|s| (s.device.as_str(), s.layers))
        .collect();
    assert_eq!(split.len(), 2, "{split:?}");
    assert_eq!(split[0].0, "10.0.0.2:50052");
    assert_eq!(split[1].0, "this machine");
    assert_eq!(split[0].1 + split[1].1, 33);
    assert!((24..=26).contains(&split[0].1), "{split:?}");
    let argv = command_line(Path::new("llama-server"), &huge.path, 8080, &p, &cfg);
    let at = argv.iter().position(|a| a == "--rpc").expect("--rpc");
    assert_eq!(argv[at + 1], "10.0.0.2:50052");
    assert!(p.decisions.iter().any(|d| d.flag == "--rpc"));
    assert!(p.speed_flags().iter().any(|f| f.starts_with("rpc=")));
}

/// A loopback worker's memory is this machine's: it is not counted twice.
/// On a CPU-only machine every offloaded layer goes to the workers.
#[test]
fn a_loopback_worker_on_a_cpu_machine_takes_every_layer_and_adds_no_memory() {
    use contextpilotd::plan::{plan_with, BinaryCaps, PlanInputs};
    let hw = hardware("linux-2core");
    let cfg = LlamaConfig {
        rpc_workers: vec!["127.0.0.1:50052".into(), "127.0.0.1:50053".into()],
        ..LlamaConfig::default()
    };
    let workers = [worker("127.0.0.1:50052", 6), worker("127.0.0.1:50053", 2)];
    let p = plan_with(
        &hw,
        &llama_1b(),
        &cfg,
        PlanInputs {
            caps: BinaryCaps {
                rpc: true,
                ..BinaryCaps::default()
            },
            rpc: &workers,
            ..PlanInputs::default()
        },
    );
    let alone = plan(&hw, &llama_1b(), &LlamaConfig::default());
    assert_eq!(p.memory.gpu_usable_bytes, alone.memory.gpu_usable_bytes);
    let layers: Vec<u32> = p.layer_split.iter().map(|s| s.layers).collect();
    // 17 layers by 6:2 free memory.
    assert_eq!(layers, vec![13, 4]);
    let argv = command_line(Path::new("llama-server"), &llama_1b().path, 8080, &p, &cfg);
    assert!(argv
        .windows(2)
        .any(|w| w[0] == "--rpc" && w[1] == "127.0.0.1:50052,127.0.0.1:50053"));
}

/// A binary without RPC gets no `--rpc` (it would refuse to start) and
/// the plan says why.
#[test]
fn rpc_workers_without_an_rpc_build_are_a_warning_not_a_flag() {
    let cfg = LlamaConfig {
        rpc_workers: vec!["127.0.0.1:50052".into()],
        ..LlamaConfig::default()
    };
    let p = plan(&hardware("linux-2core"), &llama_1b(), &cfg);
    assert!(p.rpc_workers.is_empty() && p.layer_split.is_empty());
    assert!(
        p.warnings.iter().any(|w| w.contains("GGML_RPC")),
        "{:?}",
        p.warnings
    );
    let argv = command_line(Path::new("llama-server"), &llama_1b().path, 8080, &p, &cfg);
    assert!(!argv.iter().any(|a| a == "--rpc"));
}
