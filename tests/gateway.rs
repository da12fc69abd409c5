//! Gateway behaviour under pressure, against the real llama-server: a full
//! queue, a child that never becomes ready, a client that walks away. The
//! OpenAI-client view of the gateway is tested in tests/python.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A request long enough to keep its slot busy for a while on 2 cores.
const LONG: &str =
    r#"{"prompt":"Count slowly:","n_predict":400,"ignore_eos":true,"temperature":0}"#;

fn post(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    std::io::Read::read_to_string(&mut stream, &mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, head.to_string(), body.to_string()))
}

fn gauge(daemon: &Daemon, name: &str) -> Option<i64> {
    let (_, text) = http_get(daemon.listen, "/metrics").ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The query log once it holds at least `n` lines (the meter writes on its
/// own thread, after the response).
fn query_log_with(daemon: &Daemon, n: usize) -> Vec<Value> {
    wait_for(Duration::from_secs(10), "the query log", || {
        let log = query_log(daemon);
        (log.len() >= n).then_some(log)
    })
}

fn query_log(daemon: &Daemon) -> Vec<Value> {
    std::fs::read_to_string(daemon.dir().join("query_log.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every query log line is JSON"))
        .collect()
}

fn config_with(parts: &RealParts, listen: SocketAddr, server: &str) -> String {
    test_config(parts, listen, "[meter]\nquery_log = \"query_log.jsonl\"\n")
        .replace("[llama]", &format!("{server}\n[llama]"))
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let parts = real_parts();
    let mut daemon = Daemon::start_with(|listen| config_with(&parts, listen, "max_queue = 1"), &[]);
    daemon.wait_ready();
    let listen = daemon.listen;
    let running = std::thread::spawn(move || post(listen, "/completion", LONG));
    wait_for(
        Duration::from_secs(30),
        "the first request to hold the slot",
        || (gauge(&daemon, "contextpilotd_slots_busy") == Some(1)).then_some(()),
    );
    let queued = std::thread::spawn(move || post(listen, "/completion", LONG));
    wait_for(
        Duration::from_secs(30),
        "the second request to queue",
        || (gauge(&daemon, "contextpilotd_queue_depth") == Some(1)).then_some(()),
    );

    let (code, head, body) = post(
        listen,
        "/v1/completions",
        r#"{"prompt":"hi","max_tokens":1}"#,
    )
    .unwrap();
    assert_eq!(code, 429, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], 429);

    // The two others are served in order, not dropped.
    assert_eq!(running.join().unwrap().unwrap().0, 200);
    assert_eq!(queued.join().unwrap().unwrap().0, 200);
    let statuses: Vec<u64> = query_log_with(&daemon, 3)
        .iter()
        .map(|r| r["status_code"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
}

#[test]
fn a_child_that_never_gets_ready_means_503_with_retry_after() {
    let parts = real_parts();
    let dir = tempfile::tempdir().unwrap();
    let broken = corrupt_model(&parts, dir.path());
    let mut daemon = Daemon::start_with(
        |listen| config_with(&broken, listen, "queue_timeout_s = 1"),
        &[],
    );
    daemon.wait_status(Duration::from_secs(30), "the daemon to answer", |_| true);
    let (code, head, body) = post(
        daemon.listen,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not ready"),
        "{body}"
    );
    let log = query_log_with(&daemon, 1);
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["status_code"], 503);
}

#[test]
fn a_client_that_walks_away_frees_its_slot_and_is_recorded() {
    let parts = real_parts();
    let mut daemon = Daemon::start_with(|listen| config_with(&parts, listen, ""), &[]);
    daemon.wait_ready();
    let mut stream = TcpStream::connect(daemon.listen).unwrap();
    write!(
        stream,
        "POST /completion HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{LONG}",
        LONG.len()
    )
    .unwrap();
    wait_for(
        Duration::from_secs(30),
        "the request to hold the slot",
        || (gauge(&daemon, "contextpilotd_slots_busy") == Some(1)).then_some(()),
    );
    drop(stream);

    // llama-server itself stops working on it: its slot goes idle long
    // before 400 tokens could be generated here (its /slots, through the
    // daemon: the child wants its key).
    let child = daemon.listen;
    wait_for(
        Duration::from_secs(30),
        "llama-server to cancel the request",
        || {
            let (_, body) = http_get(child, "/slots").ok()?;
            let slots: Vec<Value> = serde_json::from_str(&body).ok()?;
            slots
                .iter()
                .all(|s| s["is_processing"] == false)
                .then_some(())
        },
    );
    let records = query_log_with(&daemon, 1);
    assert_eq!(records[0]["status_code"], 499, "{records:?}");
    assert_eq!(gauge(&daemon, "contextpilotd_slots_busy"), Some(0));
}
