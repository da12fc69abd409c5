//! Several models by name, with the real llama-server and two real models
//! (SmolLM2-135M as `[llama] model`, Gemma 3 270M as a `[[models.model]]`):
//! requests reach the model they name, unknown names are a 404 listing the
//! choices, `keep_alive` unloads, a budget for one model evicts the other,
//! and two requests for a model that is loading share one load.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{http_get, http_post_json, process_alive, real_parts, wait_for, Daemon, RealParts};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn gemma() -> PathBuf {
    common::provisioned(
        "CONTEXTPILOTD_TEST_GEMMA_MODEL",
        "GEMMA_MODEL",
        "the Gemma model",
    )
}

/// SmolLM2 served as "smol" and loaded at start, Gemma as "gemma".
fn start(parts: &RealParts, models: &str) -> Daemon {
    let gemma = gemma();
    let extra = format!(
        "[models]\ndiscover = false\n{models}\n[[models.model]]\nname = \"gemma\"\npath = \"{}\"\n",
        gemma.display()
    );
    let mut daemon = Daemon::start_with(
        |listen| {
            common::test_config(parts, listen, &extra)
                .replace("[llama]\n", "[llama]\nmodel_alias = \"smol\"\n")
        },
        &[],
    );
    daemon.wait_ready();
    daemon
}

fn chat(daemon: &Daemon, model: &str) -> (u16, Value) {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Name one colour."}],
        "max_tokens": 4,
        "temperature": 0,
    });
    http_post_json(daemon.listen, "/v1/chat/completions", &body).unwrap()
}

/// The loaded models, by name: (pid, state).
fn loaded(daemon: &Daemon) -> Vec<(String, Option<u64>, String)> {
    let (code, body) = http_get(daemon.listen, "/models/loaded").unwrap();
    assert_eq!(code, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["pid"].as_u64(),
                m["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pid_of(daemon: &Daemon, name: &str) -> Option<u32> {
    loaded(daemon)
        .into_iter()
        .find(|(n, _, _)| n == name)
        .and_then(|(_, pid, _)| pid)
        .map(|p| p as u32)
}

#[test]
fn requests_by_name_reach_their_model_and_unknown_names_are_404() {
    let parts = real_parts();
    let daemon = start(&parts, "");
    // The two tokenizers and chat templates count the same prompt
    // differently: each name's count is its own model's, every time.
    let mut counts: std::collections::HashMap<&str, Vec<u64>> = Default::default();
    for model in ["smol", "gemma", "smol", "gemma"] {
        let (code, answer) = chat(&daemon, model);
        assert_eq!(code, 200, "{model}: {answer}");
        assert_eq!(answer["model"], model, "{answer}");
        counts
            .entry(model)
            .or_default()
            .push(answer["usage"]["prompt_tokens"].as_u64().unwrap());
    }
    // A stream names the model as asked in every chunk.
    let body = json!({
        "model": "gemma",
        "messages": [{"role": "user", "content": "Name one colour."}],
        "max_tokens": 4,
        "stream": true,
    });
    let (code, stream) =
        common::http_post_text(daemon.listen, "/v1/chat/completions", &body).unwrap();
    assert_eq!(code, 200, "{stream}");
    let named = stream.matches("\"model\":").count();
    assert!(named > 0, "{stream}");
    assert_eq!(
        stream.matches("\"model\":\"gemma\"").count(),
        named,
        "{stream}"
    );
    let (smol, gemma) = (&counts["smol"], &counts["gemma"]);
    assert!(smol[0] == smol[1] && gemma[0] == gemma[1], "{counts:?}");
    assert_ne!(smol[0], gemma[0], "both names were answered by one model");
    let models = loaded(&daemon);
    assert_eq!(models.len(), 2, "{models:?}");
    let smol_pid = pid_of(&daemon, "smol").unwrap();
    let gemma_pid = pid_of(&daemon, "gemma").unwrap();
    assert_ne!(smol_pid, gemma_pid);
    // The records name the model that answered.
    let (_, stats) = http_get(daemon.listen, "/stats").unwrap();
    assert!(stats.contains("\"total_queries\":5"), "{stats}");

    let (code, answer) = chat(&daemon, "llama3.1:70b");
    assert_eq!(code, 404, "{answer}");
    assert_eq!(answer["error"]["code"], "model_not_found", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"smol\"") && message.contains("\"gemma\""),
        "{message}"
    );
    // Every servable model is listed, with its state.
    let (_, list) = http_get(daemon.listen, "/v1/models").unwrap();
    let list: Value = serde_json::from_str(&list).unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smol", "gemma"]);
    let (code, one) = http_get(daemon.listen, "/v1/models/gemma").unwrap();
    assert_eq!(code, 200, "{one}");
    assert!(one.contains("\"state\":\"ready\""), "{one}");
}

#[test]
fn keep_alive_unloads_and_the_next_request_loads_again() {
    let parts = real_parts();
    let daemon = start(&parts, "keep_alive = \"2s\"");
    let (code, answer) = chat(&daemon, "gemma");
    assert_eq!(code, 200, "{answer}");
    let first = pid_of(&daemon, "gemma").expect("gemma is loaded");
    // Two seconds idle: the child exits and the model leaves the list; the
    // primary model stays.
    wait_for(Duration::from_secs(60), "gemma to unload", || {
        (pid_of(&daemon, "gemma").is_none() && !process_alive(first)).then_some(())
    });
    assert!(pid_of(&daemon, "smol").is_some());
    let (code, answer) = chat(&daemon, "gemma");
    assert_eq!(code, 200, "{answer}");
    let second = pid_of(&daemon, "gemma").expect("gemma is loaded again");
    assert_ne!(first, second);

    // A request's own keep_alive of 0 unloads right after it.
    let body = json!({"model": "gemma", "prompt": "Hi", "max_tokens": 2, "keep_alive": 0});
    let (code, answer) = http_post_json(daemon.listen, "/v1/completions", &body).unwrap();
    assert_eq!(code, 200, "{answer}");
    wait_for(Duration::from_secs(60), "gemma to unload at once", || {
        (!process_alive(second)).then_some(())
    });
}

#[test]
fn a_budget_for_one_model_evicts_the_other() {
    let parts = real_parts();
    // Room for either model with its KV and the 512 MiB margin the planner
    // keeps below 16 GiB, never for both.
    let largest = std::fs::metadata(gemma())
        .unwrap()
        .len()
        .max(std::fs::metadata(&parts.model).unwrap().len());
    let budget_mib = (largest + 512 * MIB + 128 * MIB) / MIB;
    let daemon = start(&parts, &format!("memory_mib = {budget_mib}"));
    let smol = pid_of(&daemon, "smol").unwrap();
    let (code, answer) = chat(&daemon, "gemma");
    assert_eq!(code, 200, "{answer}");
    assert!(!process_alive(smol), "smol still runs next to gemma");
    let names: Vec<String> = loaded(&daemon).into_iter().map(|m| m.0).collect();
    assert_eq!(names, ["gemma"]);
    let gemma_pid = pid_of(&daemon, "gemma").unwrap();
    let (code, answer) = chat(&daemon, "smol");
    assert_eq!(code, 200, "{answer}");
    assert!(!process_alive(gemma_pid), "gemma still runs next to smol");
    let names: Vec<String> = loaded(&daemon).into_iter().map(|m| m.0).collect();
    assert_eq!(names, ["smol"]);
}

#[test]
fn two_requests_for_a_loading_model_share_one_load() {
    let parts = real_parts();
    let daemon = start(&parts, "");
    assert!(pid_of(&daemon, "gemma").is_none());
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let a = scope.spawn(|| chat(&daemon, "gemma"));
        let b = scope.spawn(|| chat(&daemon, "gemma"));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    for (code, answer) in &answers {
        assert_eq!(*code, 200, "{answer}");
    }
    let loads = daemon
        .log()
        .lines()
        .filter(|l| l.contains("loading the model") && l.contains("gemma"))
        .count();
    assert_eq!(loads, 1, "{}", daemon.log());

    // `ps`, `unload` and `load` as commands.
    let ps = daemon.command(&["ps", "--json"]);
    assert!(ps.status.success(), "{ps:?}");
    let ps: Value = serde_json::from_slice(&ps.stdout).unwrap();
    assert_eq!(ps["models"].as_array().unwrap().len(), 2, "{ps}");
    let table = daemon.command(&["ps"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("gemma") && table.contains("stays loaded"),
        "{table}"
    );
    let gemma_pid = pid_of(&daemon, "gemma").unwrap();
    let unload = daemon.command(&["unload", "gemma"]);
    assert!(unload.status.success(), "{unload:?}");
    assert!(
        !process_alive(gemma_pid),
        "unload answered before the child exited"
    );
    let load = daemon.command(&["load", "gemma"]);
    assert!(load.status.success(), "{load:?}");
    assert!(
        String::from_utf8_lossy(&load.stdout).contains("gemma is ready"),
        "{load:?}"
    );
    let unknown = daemon.command(&["load", "nope"]);
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not served here"));
}

/// `run --model NAME` with no `[llama] model`: the name is one discovery
/// gives a file in the Hugging Face cache's layout, and a model in LM
/// Studio's layout is served by its name on demand.
#[test]
fn run_model_by_a_discovered_name_and_serve_another_found_one() {
    let parts = real_parts();
    let home = tempfile::tempdir().unwrap();
    let snapshot = home
        .path()
        .join("hf/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF/snapshots/0123abc");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::os::unix::fs::symlink(
        &parts.model,
        snapshot.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    .unwrap();
    let studio = home
        .path()
        .join(".lmstudio/models/lmstudio-community/gemma-3-270m-it-GGUF");
    std::fs::create_dir_all(&studio).unwrap();
    std::os::unix::fs::symlink(gemma(), studio.join("gemma-3-270m-it-Q4_K_M.gguf")).unwrap();
    let hf_home = home.path().join("hf");
    let envs = [
        ("HOME", home.path().to_str().unwrap()),
        ("HF_HOME", hf_home.to_str().unwrap()),
    ];
    let listing = Command::new(common::BIN)
        .args(["models", "--json"])
        .envs(envs)
        .env_remove("CONTEXTPILOTD_CONFIG")
        .output()
        .unwrap();
    let listing: Value = serde_json::from_slice(&listing.stdout).unwrap();
    let names: Vec<&str> = listing
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    let smol = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1";
    let gemma_name = names
        .iter()
        .find(|n| n.starts_with("lmstudio-community/gemma"))
        .unwrap_or_else(|| panic!("LM Studio's Gemma is not listed: {names:?}"))
        .to_string();
    assert!(names.contains(&smol), "{names:?}");

    let mut daemon = Daemon::start_with_args(
        |listen| {
            common::test_config(&parts, listen, "")
                .lines()
                .filter(|l| !l.starts_with("model = "))
                .collect::<Vec<_>>()
                .join("\n")
        },
        &envs,
        &["--model", smol],
    );
    let status = daemon.wait_ready();
    assert_eq!(status["models"][0]["name"], smol, "{status}");
    let (code, answer) = chat(&daemon, smol);
    assert_eq!(code, 200, "{answer}");
    let (code, answer) = chat(&daemon, &gemma_name);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(loaded(&daemon).len(), 2);
}

/// `doctor` names every model servable by name and the budget they share.
#[test]
fn doctor_lists_the_models_served_by_name() {
    let parts = real_parts();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let text = format!(
        "[llama]\nbinary = \"{}\"\nmodel = \"{}\"\nmodel_alias = \"smol\"\n[models]\ndiscover = false\nmemory_mib = 2048\n[[models.model]]\nname = \"gemma\"\npath = \"{}\"\nkeep_alive = \"2m\"\n",
        parts.llama_server.display(),
        parts.model.display(),
        gemma().display()
    );
    std::fs::write(&config, text).unwrap();
    let run = |json: bool| {
        let mut command = Command::new(common::BIN);
        command.arg("doctor").arg("--config").arg(&config);
        if json {
            command.arg("--json");
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let doc: Value = serde_json::from_str(&run(true)).unwrap();
    let names: Vec<&str> = doc["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["smol", "gemma"]);
    assert_eq!(doc["models"][1]["keep_alive"], 120.0);
    assert_eq!(doc["memory_budget_bytes"], 2048 * MIB);
    let text = run(false);
    assert!(text.contains("2 servable"), "{text}");
    assert!(
        text.contains("gemma") && text.contains("unloads 120 s after"),
        "{text}"
    );
}

/// A model that appears after the start (pulled, copied in) is served by
/// name without a restart: a name not known makes the daemon look again.
#[test]
fn a_model_added_after_the_start_is_found_by_name() {
    let parts = real_parts();
    let more = tempfile::tempdir().unwrap();
    let daemon = start(&parts, &format!("dirs = [\"{}\"]", more.path().display()));
    let (code, answer) = chat(&daemon, "late-gemma");
    assert_eq!(code, 404, "{answer}");
    std::os::unix::fs::symlink(gemma(), more.path().join("late-gemma.gguf")).unwrap();
    // The daemon looks again at most every two seconds.
    let answer = wait_for(Duration::from_secs(30), "late-gemma to be found", || {
        let (code, answer) = chat(&daemon, "late-gemma");
        (code != 404).then_some((code, answer))
    });
    assert_eq!(answer.0, 200, "{}", answer.1);
    // The file is Gemma's, which is served as "gemma" already: the new
    // name reaches that model.
    assert!(pid_of(&daemon, "gemma").is_some(), "{:?}", loaded(&daemon));
}
