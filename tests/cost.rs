//! Time-first slot choice and the cost model, against the real llama-server
//! and model with four slots: requests with different documents spread
//! over the slots, a request that matches a held prompt goes back to its
//! slot, a header-only match never overwrites a slot others reuse while an
//! empty one exists; the measured cost model shows in `/status` and
//! `doctor --json`; `--cache-ram` follows the measured restore cost.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn config(parts: &RealParts, listen: SocketAddr, dir: &Path, cost: &str) -> String {
    format!(
        r#"[server]
listen = "{listen}"

[llama]
binary = "{binary}"
model = "{model}"
slots = 4
ctx_per_slot = 1024
threads = 2

[supervisor]
ready_timeout_s = 60
hang_timeout_s = 30

[meter]
query_log = "{log}"

[log]
dir = "logs"

[cost]
{cost}
"#,
        binary = parts.llama_server.display(),
        model = parts.model.display(),
        log = dir.join("query_log.jsonl").display(),
    )
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Three short documents of topic `t`, none shared with another topic.
fn topic(t: usize) -> Vec<String> {
    (0..3)
        .map(|d| {
            format!(
                "Topic {t} note {d}: the {t}-{d} valve opens at {} kPa and closes when the {} sensor reads low; service it every {} days.",
                100 + 7 * t + d,
                ["north", "south", "east", "west", "upper", "lower"][(t + d) % 6],
                10 + t * 3 + d
            )
        })
        .collect()
}

fn ask(addr: SocketAddr, docs: &[String], question: &str) {
    let (code, body) = post(
        addr,
        "/v1/chat/completions",
        &json!({
            "messages": [{"role": "user", "content": question}],
            "documents": docs,
            "max_tokens": 1,
            "temperature": 0,
        }),
    );
    assert_eq!(code, 200, "{body}");
}

fn query_log(dir: &Path, n: usize) -> Vec<Value> {
    wait_for(Duration::from_secs(10), "the query log", || {
        let log: Vec<Value> = std::fs::read_to_string(dir.join("query_log.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (log.len() >= n).then_some(log)
    })
}

#[test]
fn with_four_slots_requests_spread_come_back_and_spare_valuable_slots() {
    let parts = real_parts();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let mut daemon = Daemon::start_with(
        |listen| config(&parts, listen, &dir, "measure = false"),
        &[],
    );
    daemon.wait_ready();
    let addr = daemon.listen;

    // t0 twice: the second goes back to the slot holding its documents.
    ask(addr, &topic(0), "When does the valve open?");
    ask(addr, &topic(0), "How often is it serviced?");
    // t1: its only match anywhere is the chat header; an empty slot is
    // cheaper than overwriting t0, which was just reused.
    ask(addr, &topic(1), "When does the valve open?");
    ask(addr, &topic(2), "When does the valve open?");
    ask(addr, &topic(3), "When does the valve open?");
    // All four slots hold something now; t4 overwrites the least valuable.
    ask(addr, &topic(4), "When does the valve open?");

    let log = query_log(&dir, 6);
    let slot = |i: usize| log[i]["slot_id"].as_u64().unwrap();
    let choice = |i: usize| {
        log[i]["slot_decision"]["choice"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(choice(0), "empty");
    assert_eq!(slot(1), slot(0), "a held prompt's slot is chosen again");
    assert_eq!(choice(1), "cached-prefix");
    assert_eq!(log[1]["reorder"]["slot_choice"], "cached-prefix");
    let reused = log[1]["cache_reuse"]["reused_tokens"].as_u64().unwrap();
    let total = log[1]["cache_reuse"]["total_prompt_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        reused * 2 > total,
        "the documents came from the cache: {reused} of {total}"
    );
    for (i, record) in log.iter().enumerate().take(5).skip(2) {
        assert_eq!(choice(i), "empty", "request {i}: {record}");
        assert_ne!(slot(i), slot(0), "request {i} overwrote the reused slot");
    }
    let used: std::collections::HashSet<u64> = (0..5).map(slot).collect();
    assert_eq!(used.len(), 4, "four topics on four slots: {used:?}");
    assert_eq!(choice(5), "least-valuable", "{}", log[5]);
    assert_ne!(slot(5), slot(0), "the slot with a hit is worth more");
    for record in &log {
        let predicted = record["slot_decision"]["predicted_ms"].as_f64().unwrap();
        assert!(predicted > 0.0, "{record}");
        assert!(record["cache_reuse"]["prompt_eval_ms"].as_f64().is_some());
    }
    // /status shows what each slot holds.
    let status = daemon.status().unwrap();
    let slots = status["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 4);
    assert!(slots.iter().all(|s| s["documents"] == 3), "{slots:?}");
    assert_eq!(slots[slot(0) as usize]["hits"], 1);
}

#[test]
fn the_cost_model_is_measured_once_cached_and_shown() {
    let parts = real_parts();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let cache = dir.join("cache");
    let cache_env = cache.display().to_string();
    let envs = [("CONTEXTPILOTD_CACHE", cache_env.as_str())];
    let mut daemon = Daemon::start_with(
        |listen| config(&parts, listen, &dir, "measure = true"),
        &envs,
    );
    daemon.wait_ready();
    let status = daemon.wait_status(Duration::from_secs(120), "a measured cost model", |s| {
        s["cost"]["profile"]["source"] == "measured"
    });
    let cost = &status["cost"];
    let profile = &cost["profile"];
    assert!(profile["prefill"].as_array().unwrap().len() >= 3, "{cost}");
    assert!(profile["prefill_ms_per_token"].as_f64().unwrap() > 0.0);
    assert!(profile["hit_ms"].as_f64().unwrap() > 0.0);
    // llama-server's RAM cache is on by default: its costs were measured
    // and decided on.
    assert!(profile["ram"]["restore_ms"].as_f64().is_some(), "{cost}");
    let decisions: Vec<&str> = cost["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(
        decisions.iter().any(|d| d.starts_with("--cache-ram")),
        "{decisions:?}"
    );
    assert_eq!(cost["measuring"], false);
    assert!(cost["note"].as_str().unwrap().starts_with("measured in"));
    // The measurement slot was handed back empty.
    assert!(status["slots"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["busy"] == false && s["tokens"] == 0));

    // doctor finds the cached measurement for the same setup.
    let doctor = Command::new(BIN)
        .args(["doctor", "--json", "--config"])
        .arg(&daemon.config)
        .env("CONTEXTPILOTD_CACHE", &cache)
        .output()
        .unwrap();
    assert!(doctor.status.success());
    let doc: Value = serde_json::from_slice(&doctor.stdout).unwrap();
    assert_eq!(doc["cost"]["source"], "measured");
    assert_eq!(
        doc["cost"]["prefill_ms_per_token"],
        profile["prefill_ms_per_token"]
    );
    assert_eq!(doc["cost"]["key"], doc["cost_key"]);
    drop(daemon);

    // A new daemon on the same setup starts with it and measures nothing.
    let mut again = Daemon::start_with(
        |listen| config(&parts, listen, &dir, "measure = true"),
        &envs,
    );
    let status = again.wait_ready();
    assert_eq!(status["cost"]["profile"]["source"], "measured");
    assert_eq!(
        status["cost"]["profile"]["measured_at"],
        profile["measured_at"]
    );
    assert_eq!(status["cost"]["measuring"], false);
}

/// The CUDA figures behind this rule (restoring cost as much as
/// recomputing) turn llama-server's RAM cache off; cheap copies, as on
/// unified memory, keep it.
#[test]
fn cache_ram_follows_the_measured_restore_cost() {
    let parts = real_parts();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, restore: f64, save: f64, recompute: f64| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            json!({
                "prefill_fixed_ms": 20.0,
                "prefill_ms_per_token": 0.11,
                "hit_ms": 34.0,
                "ram": {"tokens": 4800, "restore_ms": restore, "save_ms": save, "recompute_ms": recompute},
            })
            .to_string(),
        )
        .unwrap();
        path
    };
    let expensive = write("cuda.json", 558.0, 530.0, 541.0);
    let cheap = write("unified.json", 30.0, 20.0, 541.0);
    // A configuration with the real binary and model, planned from `profile`.
    let config_with = |profile: &Path| {
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[llama]\nbinary = \"{}\"\nmodel = \"{}\"\nslots = 4\n\n[cost]\nprofile = \"{}\"\n",
                parts.llama_server.display(),
                parts.model.display(),
                profile.display()
            ),
        )
        .unwrap();
        config
    };
    let command = |profile: &Path| {
        let config = config_with(profile);
        let out = Command::new(BIN)
            .args(["doctor", "--json", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        let argv: Vec<String> = doc["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        (argv, doc)
    };
    let (argv, doc) = command(&expensive);
    let at = argv
        .iter()
        .position(|a| a == "--cache-ram")
        .expect("--cache-ram");
    assert_eq!(argv[at + 1], "0");
    assert_eq!(doc["cost"]["source"], "configured");
    let decision = doc["cost_decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|d| d.as_str().filter(|d| d.starts_with("--cache-ram")))
        .unwrap()
        .to_string();
    assert!(
        decision.contains("558 ms") && decision.contains("off"),
        "{decision}"
    );
    // With its RAM cache off, llama-server is not told about idle slots.
    assert!(
        !argv.iter().any(|a| a == "--no-cache-idle-slots"),
        "{argv:?}"
    );

    let (argv, _) = command(&cheap);
    assert!(!argv.iter().any(|a| a == "--cache-ram"), "{argv:?}");
    assert!(
        argv.iter().any(|a| a == "--no-cache-idle-slots"),
        "the RAM cache stays, but idle slots stay in the KV cache: {argv:?}"
    );

    // A profile file that is not one is a configuration error naming it.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"prefill_ms_per_token\": -1}").unwrap();
    let config = config_with(&bad);
    let out = Command::new(BIN)
        .args(["print-command", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cost.profile"), "{stderr}");
}
