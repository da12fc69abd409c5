//! The daemon's log, live, with the real llama-server and model: a chat
//! request leaves one request line (status, model, slot) that `GET /logs`
//! shows, `contextpilotd logs -f --requests` prints it as it happens, and
//! `logs` without a daemon says so.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{http_get, http_post_json, real_parts, wait_for, Daemon, BIN};
use serde_json::json;

fn chat(daemon: &Daemon, question: &str) {
    let body = json!({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 4,
        "temperature": 0,
    });
    let (code, answer) = http_post_json(daemon.listen, "/v1/chat/completions", &body).unwrap();
    assert_eq!(code, 200, "{answer}");
}

/// The value of `key=` in a request line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn a_request_leaves_one_log_line_and_logs_follow_prints_it_live() {
    let parts = real_parts();
    let mut daemon = Daemon::start(&parts, "");
    let status = daemon.wait_ready();
    let model = status["models"][0]["name"]
        .as_str()
        .expect("the primary model's name")
        .to_string();
    chat(&daemon, "Name one colour. Do not mention tangerines.");

    let line = wait_for(Duration::from_secs(20), "the request line", || {
        let (code, text) = http_get(daemon.listen, "/logs?requests=1").ok()?;
        assert_eq!(code, 200, "{text}");
        text.lines()
            .find(|l| l.contains("POST /v1/chat/completions"))
            .map(str::to_string)
    });
    assert!(line.contains(" INFO request: "), "{line}");
    assert_eq!(field(&line, "model"), Some(model.as_str()), "{line}");
    assert_eq!(field(&line, "status"), Some("200"), "{line}");
    assert_eq!(field(&line, "slot"), Some("0"), "{line}");
    assert_eq!(field(&line, "stream"), Some("false"), "{line}");
    for key in ["ms", "ttft_ms"] {
        let value = field(&line, key).unwrap_or_default();
        assert!(value.parse::<u64>().is_ok(), "{key}: {line}");
    }
    let cached = field(&line, "cached").unwrap_or_default();
    let (reused, total) = cached.split_once('/').expect("cached=reused/total");
    assert!(
        reused.parse::<u64>().unwrap() <= total.parse::<u64>().unwrap(),
        "{line}"
    );
    assert!(!line.contains("tangerines"), "no prompt text: {line}");

    // The whole log has the daemon's own lines and llama-server's too, and
    // the request line is in the log file as well.
    let (_, all) = http_get(daemon.listen, "/logs").unwrap();
    assert!(all.contains("listening on http://"), "{all}");
    assert!(all.contains("llama-server["), "{all}");
    assert!(!all.contains("tangerines"), "no prompt text in the log");
    // Each layer stamps its own time: the same line after the timestamp.
    let (_, unstamped) = line.split_once(' ').unwrap();
    wait_for(Duration::from_secs(10), "the line in the log file", || {
        daemon.log().contains(unstamped).then_some(())
    });

    // `logs -f --requests`: the kept request line, then the next one live.
    let mut follower = Command::new(BIN)
        .args(["logs", "-f", "--requests", "--config"])
        .arg(&daemon.config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // With --requests every line is a request line.
    let next = |what: &str| match lines.recv_timeout(Duration::from_secs(30)) {
        Ok(l) if l.contains("POST /v1/chat/completions") => l,
        Ok(l) => panic!("not a request line from logs --requests: {l}"),
        Err(e) => panic!("logs -f printed no {what} ({e})"),
    };
    assert_eq!(next("kept line"), line, "the kept line first");
    chat(&daemon, "Name one fruit.");
    let live = next("new line");
    assert_ne!(live, line);
    assert_eq!(field(&live, "status"), Some("200"), "{live}");
    assert_eq!(field(&live, "model"), Some(model.as_str()), "{live}");
    // Still running: it follows until Ctrl-C or the daemon stops.
    assert!(follower.try_wait().unwrap().is_none());
    let _ = follower.kill();
    let _ = follower.wait();
}

#[test]
fn logs_without_a_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let port = common::free_port();
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["logs", "-f", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("contextpilotd is not running") && stderr.contains(&port.to_string()),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}
