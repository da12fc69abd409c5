//! Front only: no `[llama] model`, so no child; every request goes to the
//! `[[upstream]]` backends (two plain llama-servers, real, on loopback).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{free_port, http_get, http_post_json, real_parts, wait_for, Daemon, PlainServer};
use serde_json::{json, Value};

/// A configuration with no `[llama]` section at all, routing to
/// `upstreams` (each a whole `[[upstream]]` table).
fn front_config(listen: std::net::SocketAddr, upstreams: &[String]) -> String {
    format!(
        "[server]\nlisten = \"{listen}\"\n\n[log]\ndir = \"logs\"\n\n[cost]\nmeasure = false\n\n{}",
        upstreams.join("\n")
    )
}

fn upstream(url: &str, kind: &str, model: Option<&str>) -> String {
    let model = model.map_or(String::new(), |m| format!("model = \"{m}\"\n"));
    format!("[[upstream]]\nurl = \"{url}\"\nkind = \"{kind}\"\n{model}")
}

/// The commands of `pid`'s child processes (`comm`).
fn children_of(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's /proc entry");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter_map(|child| std::fs::read_to_string(format!("/proc/{child}/comm")).ok())
        .map(|comm| comm.trim().to_string())
        .collect()
}

#[test]
fn routes_to_the_upstreams_with_no_child() {
    let parts = real_parts();
    let first = PlainServer::start(&parts);
    let second = PlainServer::start(&parts);
    let llama_url = format!("http://127.0.0.1:{}", first.port);
    let openai_url = format!("http://127.0.0.1:{}/v1", second.port);
    let upstreams = [
        upstream(&llama_url, "llama-server", Some("smol")),
        upstream(&openai_url, "openai", Some("smol")),
    ];
    let mut daemon = Daemon::start_with(|listen| front_config(listen, &upstreams), &[]);
    wait_for(Duration::from_secs(120), "two ready upstreams", || {
        if let Ok(Some(exit)) = daemon.process.try_wait() {
            panic!("the daemon exited ({exit}): {}", daemon.output());
        }
        let (status, body) = http_get(daemon.listen, "/models/loaded").ok()?;
        let loaded: Value = serde_json::from_str(&body).ok()?;
        let ready = loaded["models"]
            .as_array()?
            .iter()
            .filter(|m| m["state"] == "ready")
            .count();
        (status == 200 && ready == 2).then_some(())
    });

    let ask = |model: Option<&str>, i: usize| {
        let mut body = json!({
            "messages": [{"role": "user", "content": format!("Say hello ({i}).")}],
            "max_tokens": 4,
            "temperature": 0,
        });
        if let Some(model) = model {
            body["model"] = json!(model);
        }
        http_post_json(daemon.listen, "/v1/chat/completions", &body).unwrap()
    };
    for i in 0..4 {
        let (status, answer) = ask(Some("smol"), i);
        assert_eq!(status, 200, "request {i}: {answer}");
        assert!(answer["choices"][0]["message"].is_object(), "{answer}");
    }
    // Naming no model gets the first upstream model, as a primary would.
    let (status, answer) = ask(None, 4);
    assert_eq!(status, 200, "no model named: {answer}");
    // A name nothing serves is the client's mistake, said the OpenAI way.
    let (status, answer) = ask(Some("no-such-model"), 5);
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["error"]["code"], "model_not_found", "{answer}");

    let recent = wait_for(Duration::from_secs(10), "six recorded requests", || {
        let (status, body) = http_get(daemon.listen, "/requests/recent?limit=100").ok()?;
        let recent: Value = serde_json::from_str(&body).ok()?;
        let records = recent["requests"].as_array()?.clone();
        (status == 200 && records.len() == 6).then_some(records)
    });
    let served: Vec<&Value> = recent.iter().filter(|r| r["status_code"] == 200).collect();
    assert_eq!(served.len(), 5, "{recent:?}");
    for record in &served {
        let backend = record["backend"].as_str();
        assert!(
            backend == Some(llama_url.as_str()) || backend == Some(openai_url.as_str()),
            "a request went elsewhere than the upstreams: {record}"
        );
    }

    let status = daemon.status().expect("GET /status answers");
    assert_eq!(status["state"], "ready", "{status}");
    assert!(status["child"]["pid"].is_null(), "{status}");
    assert!(status["child"]["port"].is_null(), "{status}");
    let models = status["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "{status}");
    assert!(
        models.iter().all(|m| m["backend"] != "local"),
        "a local backend in {status}"
    );
    // Nothing the daemon runs is a llama-server (a GPU sampler's short-lived
    // helper may be).
    let children = children_of(daemon.pid());
    assert!(
        !children.iter().any(|c| c.contains("llama")),
        "the daemon started a llama-server: {children:?}"
    );

    let (code, body) = http_get(daemon.listen, "/v1/models").unwrap();
    assert_eq!(code, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["smol"], "{body}");
    let smol = &listed["data"][0]["meta"];
    assert_eq!(smol["state"], "ready", "{body}");
    assert_eq!(smol["backends"], json!([llama_url, openai_url]), "{body}");

    let (code, body) = http_get(daemon.listen, "/health").unwrap();
    assert_eq!(code, 200, "{body}");

    // No child is up; every request is counted on the upstream it went to.
    let (code, metrics) = http_get(daemon.listen, "/metrics").unwrap();
    assert_eq!(code, 200, "{metrics}");
    assert!(
        metrics.lines().any(|l| l == "contextpilotd_child_up 0"),
        "{metrics}"
    );
    let counted: u64 = [&llama_url, &openai_url]
        .iter()
        .filter_map(|url| {
            let prefix = format!("contextpilotd_backend_requests_total{{backend=\"{url}\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&prefix)?.parse::<u64>().ok())
        })
        .sum();
    assert_eq!(counted, 5, "{metrics}");

    // `contextpilotd status` renders it without a child.
    let out = daemon.command(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&llama_url) && text.contains(&openai_url),
        "{text}"
    );
}

#[test]
fn an_upstream_without_a_model_is_a_config_error_with_no_local_model() {
    let upstreams = [
        upstream("http://127.0.0.1:9", "llama-server", Some("smol")),
        upstream("http://127.0.0.1:10", "openai", None),
    ];
    let mut daemon = Daemon::start_with(|listen| front_config(listen, &upstreams), &[]);
    let exit = daemon.wait_exit(Duration::from_secs(30));
    let stderr = daemon.stderr();
    assert_eq!(exit.code(), Some(2), "{stderr}");
    assert!(stderr.contains("upstream.model"), "{stderr}");
    assert!(
        stderr.contains(&daemon.config.display().to_string()),
        "the file is not named: {stderr}"
    );
    assert!(stderr.contains("http://127.0.0.1:10"), "{stderr}");

    // No upstream and no model: still the missing `[llama] model`.
    let mut daemon = Daemon::start_with(|listen| front_config(listen, &[]), &[]);
    let exit = daemon.wait_exit(Duration::from_secs(30));
    let stderr = daemon.stderr();
    assert_eq!(exit.code(), Some(2), "{stderr}");
    assert!(stderr.contains("llama.model"), "{stderr}");
    assert!(!stderr.contains("upstream.model"), "{stderr}");
}

#[test]
fn doctor_says_there_is_no_local_model_and_lists_the_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let url = "http://127.0.0.1:9/v1";
    std::fs::write(
        &config,
        front_config(listen, &[upstream(url, "openai", Some("smol"))]),
    )
    .unwrap();
    let doctor = |args: &[&str]| {
        Command::new(common::BIN)
            .arg("doctor")
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("XDG_RUNTIME_DIR", dir.path())
            .output()
            .unwrap()
    };
    let out = doctor(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("no [llama] model"), "{text}");
    assert!(text.contains(url) && text.contains("smol"), "{text}");

    let out = doctor(&["--json"]);
    assert_eq!(out.status.code(), Some(0));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("doctor --json is JSON");
    assert_eq!(doc["front_only"], true, "{doc}");
    assert!(doc["model"].is_null(), "{doc}");
    assert_eq!(doc["upstreams"][0]["url"], url, "{doc}");
    assert_eq!(doc["problems"], json!([]), "{doc}");

    // A command that needs a local model says why there is none.
    let out = Command::new(common::BIN)
        .args(["print-command", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("llama.model") && said.contains("serves as a front"),
        "{said}"
    );
}

/// With its upstreams down, a front-only daemon answers 503 with
/// Retry-After, naming what it waits for: an upstream that has not said
/// how many slots it has has not joined yet; one that has joined is not
/// ready.
#[test]
fn with_its_upstreams_down_the_front_says_what_it_waits_for() {
    let closed = free_port();
    let with = |kind: &str, url: &str| {
        let upstreams = [upstream(url, kind, Some("smol"))];
        Daemon::start_with(
            |listen| {
                front_config(listen, &upstreams).replacen(
                    "[log]",
                    "queue_timeout_s = 1\n\n[log]",
                    1,
                )
            },
            &[],
        )
    };
    let ask = |daemon: &Daemon| {
        let body = json!({
            "model": "smol",
            "messages": [{"role": "user", "content": "Hello?"}],
            "max_tokens": 4,
        });
        wait_for(Duration::from_secs(30), "the daemon to answer", || {
            http_post_json(daemon.listen, "/v1/chat/completions", &body).ok()
        })
    };
    // A llama-server joins once its /props answers: this one never does.
    let daemon = with("llama-server", &format!("http://127.0.0.1:{closed}"));
    let (status, answer) = ask(&daemon);
    assert_eq!(status, 503, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no upstream serving"), "{answer}");
    drop(daemon);
    // An openai-kind upstream joins at once, and is not ready.
    let url = format!("http://127.0.0.1:{closed}/v1");
    let daemon = with("openai", &url);
    let (status, answer) = ask(&daemon);
    assert_eq!(status, 503, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("the upstream {url} is not ready")),
        "{answer}"
    );
}

/// Another contextpilotd as the upstream (`kind = "contextpilotd"`): the
/// front learns its slots from its `/status`, forwards the model's
/// requests to it, and meters them from the timings it passes on.
#[test]
fn another_contextpilotd_serves_as_an_upstream() {
    let parts = real_parts();
    let mut inner = Daemon::start(&parts, "");
    inner.wait_ready();
    let (_, body) = http_get(inner.listen, "/v1/models").unwrap();
    let listed: Value = serde_json::from_str(&body).unwrap();
    let name = listed["data"][0]["id"].as_str().unwrap().to_string();
    let url = format!("http://{}", inner.listen);
    let upstreams = [upstream(&url, "contextpilotd", Some(&name))];
    let front = Daemon::start_with(|listen| front_config(listen, &upstreams), &[]);
    let joined = common::wait_for_ready_backend(front.listen, &url);
    // The test configuration's one slot, as the inner daemon's /status says.
    assert_eq!(joined["slots"], 1, "{joined}");
    for i in 0..2 {
        let body = json!({
            "model": name,
            "messages": [{"role": "user", "content": format!("Say hello ({i}).")}],
            "max_tokens": 4,
            "temperature": 0,
        });
        let (status, answer) = http_post_json(front.listen, "/v1/chat/completions", &body).unwrap();
        assert_eq!(status, 200, "{answer}");
    }
    let recorded = |daemon: &Daemon| {
        wait_for(Duration::from_secs(10), "two records", || {
            let (_, body) = http_get(daemon.listen, "/requests/recent?limit=10").ok()?;
            let recent: Value = serde_json::from_str(&body).ok()?;
            let records = recent["requests"].as_array()?.clone();
            (records.len() == 2).then_some(records)
        })
    };
    for record in recorded(&front) {
        assert_eq!(record["backend"], url.as_str(), "{record}");
        assert!(
            record["cache_reuse"]["total_prompt_tokens"].as_u64() > Some(0),
            "not metered: {record}"
        );
    }
    // The inner daemon answered both itself.
    assert!(recorded(&inner).iter().all(|r| r["status_code"] == 200));
}
