//! `contextpilotd status` in each state, as text and as JSON, against the
//! real daemon and llama-server: ready with a request running, starting
//! (a stand-in that prints llama-server's loading lines and never gets
//! ready), nothing listening, another program on the port; and the rough
//! edges around it: a context overflow, client and server errors in
//! `/stats`, a GGUF cut short inside its tensor data.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `contextpilotd status [--json]` against `config`, with a stand-in
/// systemctl that fails at once (no user manager here).
fn status(config: &Path, dir: &Path, json: bool) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("status");
    if json {
        cmd.arg("--json");
    }
    cmd.arg("--config")
        .arg(config)
        .env("XDG_RUNTIME_DIR", dir)
        .env("CONTEXTPILOTD_SYSTEMCTL", "/bin/false")
        .env("CONTEXTPILOTD_LAUNCHCTL", "/bin/false")
        .output()
        .unwrap()
}

fn text_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no JSON ({e}): {}\nstderr: {}",
            text_of(out),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A request long enough to keep the one slot busy for a while on 2 cores.
fn long_request() -> Value {
    serde_json::json!({"prompt": "Count slowly:", "n_predict": 400, "ignore_eos": true, "temperature": 0})
}

#[test]
fn ready_shows_busy_and_queued_and_the_slots() {
    let parts = real_parts();
    let mut daemon = Daemon::start(&parts, "");
    daemon.wait_ready();
    let listen = daemon.listen;
    let running =
        std::thread::spawn(move || http_post_json(listen, "/completion", &long_request()));
    let json = wait_for(
        Duration::from_secs(60),
        "a busy slot in status --json",
        || {
            let out = status(&daemon.config, daemon.dir(), true);
            assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
            let json = json_of(&out);
            (json["busy"] == 1).then_some(json)
        },
    );
    assert_eq!(json["state"], "ready");
    assert_eq!(json["queued"], 0);
    assert_eq!(json["child"]["ready_timeout_s"], 60);
    assert_eq!(json["slots"][0]["busy"], true);
    assert!(json["child"]["running_s"].is_u64(), "{json}");
    assert!(json["service"].is_object(), "{json}");

    let out = status(&daemon.config, daemon.dir(), false);
    assert_eq!(out.status.code(), Some(0));
    let text = text_of(&out);
    assert!(text.contains(": READY"), "{text}");
    assert!(text.contains("plan          1 slot × 512 tokens"), "{text}");
    // The request may have finished by now; the line is there either way.
    assert!(text.contains(" queued (of 1 slot)"), "{text}");
    assert!(text.contains("slots         #0"), "{text}");
    let (code, _) = running.join().unwrap().unwrap();
    assert_eq!(code, 200);

    // A prompt longer than the slot's context: the error names the setting.
    let long = "word ".repeat(2000);
    let (code, body) = http_post_json(
        listen,
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": long}], "max_tokens": 4}),
    )
    .unwrap();
    assert_eq!(code, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("ctx_per_slot = 512") && message.contains("raise [llama] ctx_per_slot"),
        "{body}"
    );
    // ... and counts as the client's error, not the server's.
    let stats = wait_for(Duration::from_secs(10), "the error in /stats", || {
        let (_, text) = http_get(listen, "/stats").ok()?;
        let stats: Value = serde_json::from_str(&text).ok()?;
        (stats["client_errors"] == 1).then_some(stats)
    });
    assert_eq!(stats["server_errors"], 0, "{stats}");
    let out = status(&daemon.config, daemon.dir(), false);
    assert!(
        text_of(&out).contains("1 client error (4xx), 0 server errors (5xx)"),
        "{}",
        text_of(&out)
    );
}

/// A stand-in for llama-server that answers `--help` as the real one does,
/// then, as the child, prints the real loading lines and never gets ready.
fn slow_stand_in(parts: &RealParts, dir: &Path) -> RealParts {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("slow-llama-server");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             case \"$1\" in --help|--version) exec '{real}' \"$@\";; esac\n\
             echo 'main: loading model' >&2\n\
             echo 'load_tensors: loading model tensors, this can take a while... (mmap = true)' >&2\n\
             exec sleep 300\n",
            real = parts.llama_server.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    RealParts {
        llama_server: script,
        model: parts.model.clone(),
    }
}

#[test]
fn starting_shows_the_time_against_ready_timeout_and_the_load_phase() {
    let parts = real_parts();
    let dir = tempfile::tempdir().unwrap();
    let slow = slow_stand_in(&parts, dir.path());
    let mut daemon = Daemon::start(&slow, "");
    let json = daemon.wait_status(Duration::from_secs(60), "the loading line", |s| {
        s["child"]["load_phase"] == "loading tensors"
    });
    assert_eq!(json["state"], "starting");
    assert_eq!(json["child"]["ready_timeout_s"], 60);

    let out = status(&daemon.config, daemon.dir(), true);
    assert_eq!(out.status.code(), Some(0));
    let json = json_of(&out);
    assert_eq!(json["state"], "starting");
    assert!(json["child"]["running_s"].is_u64(), "{json}");

    let out = status(&daemon.config, daemon.dir(), false);
    assert_eq!(out.status.code(), Some(0));
    let text = text_of(&out);
    assert!(text.contains(": STARTING"), "{text}");
    assert!(
        text.contains(" s of 60 s (ready_timeout_s), loading tensors"),
        "{text}"
    );
}

fn config_on(dir: &Path, listen: SocketAddr) -> std::path::PathBuf {
    let config = dir.join("config.toml");
    std::fs::write(&config, format!("[server]\nlisten = \"{listen}\"\n")).unwrap();
    config
}

#[test]
fn not_running_is_json_too_with_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = config_on(dir.path(), listen);
    let out = status(&config, dir.path(), true);
    assert_eq!(out.status.code(), Some(3));
    let json = json_of(&out);
    assert_eq!(json["state"], "not_running");
    assert_eq!(json["listen"], listen.to_string());
    assert!(json["service"].is_object(), "{json}");

    let out = status(&config, dir.path(), false);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("contextpilotd is not running"));
}

#[test]
fn another_program_on_the_port_is_named_not_dumped() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = listener.local_addr().unwrap();
    // A tiny web server: every connection gets the same page.
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let page =
                "<html><head><title>Other App</title></head><body>PRIVATE PAGE BODY</body></html>";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = config_on(dir.path(), listen);

    let out = status(&config, dir.path(), false);
    assert_eq!(out.status.code(), Some(1));
    let said = format!("{}{}", text_of(&out), String::from_utf8_lossy(&out.stderr));
    assert!(
        said.contains(&format!(
            "{listen} is held by another program, not contextpilotd"
        )) && said.contains("\"Other App\""),
        "{said}"
    );
    assert!(!said.contains("PRIVATE PAGE BODY"), "{said}");

    let out = status(&config, dir.path(), true);
    assert_eq!(out.status.code(), Some(1));
    let json = json_of(&out);
    assert_eq!(json["state"], "not_contextpilotd");
    assert!(!json.to_string().contains("PRIVATE PAGE BODY"));
}

#[test]
fn a_model_cut_short_is_refused_before_start() {
    let parts = real_parts();
    let dir = tempfile::tempdir().unwrap();
    let cut = truncated_model(&parts, dir.path());
    let mut daemon = Daemon::start(&cut, "");
    let exit = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(2), "{}", daemon.output());
    let stderr = daemon.stderr();
    let actual = 8u64 << 20;
    assert!(
        stderr.contains("truncated.gguf is truncated")
            && stderr.contains("bytes of tensor data and header")
            && stderr.contains(&format!("the file has {actual} bytes")),
        "{stderr}"
    );
    // The whole model's size is what the header implies.
    let whole = std::fs::metadata(&parts.model).unwrap().len();
    assert!(
        stderr.contains(&format!("describes {whole} bytes")),
        "{stderr}"
    );
}

#[test]
fn a_model_by_name_cut_short_is_refused_when_loaded() {
    let parts = real_parts();
    let dir = tempfile::tempdir().unwrap();
    let cut = truncated_model(&parts, dir.path());
    let extra = format!(
        "[models]\ndiscover = false\n[[models.model]]\nname = \"cut\"\npath = \"{}\"\n",
        cut.model.display()
    );
    let mut daemon = Daemon::start(&parts, &extra);
    daemon.wait_ready();
    let (code, body) = http_post_json(
        daemon.listen,
        "/models/load",
        &serde_json::json!({"model": "cut"}),
    )
    .unwrap();
    assert_ne!(code, 200, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("truncated.gguf is truncated") && message.contains("8388608 bytes"),
        "{body}"
    );
    // Nothing was started for it: the primary is the only model loaded.
    let status = daemon.wait_ready();
    assert_eq!(status["models"].as_array().unwrap().len(), 1, "{status}");
}
