//! A model spread over llama.cpp RPC: a real `ggml-rpc-server` on
//! loopback, asked over its protocol by `doctor`, then used by the child
//! the daemon plans with `--rpc`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, http_post_json, real_parts, test_config, wait_for, Daemon};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_contextpilotd");

/// The provisioned `ggml-rpc-server`.
fn rpc_server_binary() -> PathBuf {
    common::provisioned(
        "CONTEXTPILOTD_TEST_RPC_SERVER",
        "RPC_SERVER",
        "ggml-rpc-server",
    )
}

/// A worker on loopback, one CPU thread.
struct Worker {
    endpoint: String,
    process: Child,
}

impl Worker {
    fn start() -> Worker {
        let port = free_port();
        let process = Command::new(rpc_server_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string(), "-t", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let endpoint = format!("127.0.0.1:{port}");
        // Up once it answers the protocol (each query closes its
        // connection, so the worker is free again afterwards).
        wait_for(Duration::from_secs(30), "the RPC worker", || {
            contextpilotd::rpc::query(&endpoint, Duration::from_secs(2)).ok()
        });
        Worker { endpoint, process }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn with_worker(config: String, endpoint: &str) -> String {
    config.replacen(
        "threads = 1\n",
        &format!("threads = 1\nrpc_workers = [\"{endpoint}\"]\n"),
        1,
    )
}

/// `doctor` asks the worker what it offers and shows the split; the child
/// planned with `--rpc` loads the model onto the worker and answers, and
/// holds the worker (which serves one client at a time) until it stops.
#[test]
fn a_child_planned_with_a_loopback_rpc_worker_answers_and_doctor_shows_the_split() {
    let parts = real_parts();
    let worker = Worker::start();
    let facts = contextpilotd::rpc::query(&worker.endpoint, Duration::from_secs(2)).unwrap();
    assert_eq!(facts.protocol.split('.').next(), Some("7"));
    assert!(
        !facts.devices.is_empty() && facts.free_bytes() > 0,
        "{facts:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(
        &config,
        with_worker(test_config(&parts, listen, ""), &worker.endpoint),
    )
    .unwrap();
    let doctor = |json: bool| {
        let mut command = Command::new(BIN);
        command.arg("doctor").arg("--config").arg(&config);
        if json {
            command.arg("--json");
        }
        command.output().unwrap()
    };
    let out = doctor(true);
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let split = report["plan"]["layer_split"].as_array().unwrap();
    // A CPU machine: every offloaded layer (the blocks and the output)
    // goes to the one worker.
    let layers = report["model"]["block_count"].as_u64().unwrap() + 1;
    assert_eq!(split.len(), 1, "{split:?}");
    assert_eq!(split[0]["device"], worker.endpoint.as_str());
    assert_eq!(split[0]["layers"].as_u64(), Some(layers));
    assert_eq!(
        report["rpc_workers"][0]["protocol"],
        facts.protocol.as_str()
    );
    assert!(report["rpc_workers"][0]["problem"].is_null());
    let command: Vec<&str> = report["command"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        command
            .windows(2)
            .any(|w| w == ["--rpc", worker.endpoint.as_str()]),
        "{command:?}"
    );
    let text = String::from_utf8_lossy(&doctor(false).stdout).into_owned();
    assert!(
        text.contains("layer split")
            && text.contains(&format!("{layers} of {layers} layers"))
            && text.contains(&worker.endpoint),
        "{text}"
    );

    let mut daemon = Daemon::start_with(
        |listen| with_worker(test_config(&parts, listen, ""), &worker.endpoint),
        &[],
    );
    let status = daemon.wait_ready();
    let argv = status["child"]["command"].to_string();
    assert!(argv.contains("--rpc"), "{argv}");
    let body = json!({
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 4,
        "temperature": 0,
    });
    let (code, answer) = http_post_json(daemon.listen, "/v1/chat/completions", &body).unwrap();
    assert_eq!(code, 200, "{answer}\n{}", daemon.output());
    assert!(
        answer["usage"]["completion_tokens"].as_u64() > Some(0),
        "{answer}"
    );
    // The child holds the worker: another client gets no answer.
    let busy = contextpilotd::rpc::query(&worker.endpoint, Duration::from_secs(1)).unwrap_err();
    assert!(busy.contains("one client at a time"), "{busy}");
    // Stopped, the daemon's child lets the worker go.
    common::signal(daemon.pid(), nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    wait_for(Duration::from_secs(10), "the worker to be free", || {
        contextpilotd::rpc::query(&worker.endpoint, Duration::from_secs(2)).ok()
    });
}

/// A worker beyond loopback is refused unless the configuration says so
/// explicitly: exit 2, naming the key and why.
#[test]
fn a_remote_rpc_worker_needs_rpc_allow_remote() {
    let parts = real_parts();
    let mut daemon = Daemon::start_with(
        |listen| with_worker(test_config(&parts, listen, ""), "192.0.2.7:50052"),
        &[],
    );
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", daemon.output());
    let said = daemon.stderr();
    assert!(
        said.contains("llama.rpc_workers")
            && said.contains("unauthenticated")
            && said.contains("rpc_allow_remote"),
        "{said}"
    );
}
