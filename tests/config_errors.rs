//! Bad configuration stops `run` before anything is spawned, with exit code 2
//! and a message that names the file and the key; `status` with no daemon
//! exits 3.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use contextpilotd::gguf::{self, writer::WriteValue::*};

const BIN: &str = env!("CARGO_BIN_EXE_contextpilotd");

struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    /// An executable that exists; these tests never get as far as running it.
    binary: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    std::fs::write(
        &model,
        gguf::writer::header(&[
            ("general.architecture", Str("llama")),
            ("llama.block_count", U32(2)),
            ("llama.context_length", U32(2048)),
            ("llama.embedding_length", U32(64)),
            ("llama.attention.head_count", U32(4)),
            ("llama.attention.head_count_kv", U32(4)),
        ]),
    )
    .unwrap();
    Setup {
        dir,
        model,
        binary: PathBuf::from(BIN),
    }
}

fn run_with(setup: &Setup, config_text: &str, args: &[&str]) -> (Output, PathBuf) {
    let config = setup.dir.path().join("config.toml");
    std::fs::write(&config, config_text).unwrap();
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&config)
        .env("XDG_RUNTIME_DIR", setup.dir.path())
        .output()
        .unwrap();
    (out, config)
}

fn valid(setup: &Setup, extra_llama: &str) -> String {
    valid_on(setup, free_port(), extra_llama)
}

fn valid_on(setup: &Setup, port: u16, extra_llama: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[llama]\nbinary = \"{}\"\nmodel = \"{}\"\n{extra_llama}",
        setup.binary.display(),
        setup.model.display()
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `run`, expects exit 2 and a message naming the file and every needle.
fn expect_exit_2(setup: &Setup, config_text: &str, needles: &[&str]) {
    let (out, config) = run_with(setup, config_text, &["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains(&config.display().to_string()),
        "file not named: {stderr}"
    );
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    assert_eq!(stderr.lines().count(), 1, "one line, please: {stderr}");
}

#[test]
fn unknown_key() {
    let s = setup();
    expect_exit_2(
        &s,
        &valid(&s, "slotz = 4\n"),
        &["llama.slotz", "unknown field", "expected one of", "slots"],
    );
}

#[test]
fn unknown_table() {
    let s = setup();
    expect_exit_2(
        &s,
        &(valid(&s, "") + "[lama]\nx = 1\n"),
        &["unknown field `lama`"],
    );
}

#[test]
fn wrong_type() {
    let s = setup();
    expect_exit_2(
        &s,
        &valid(&s, "port = \"eighty\"\n"),
        &["llama.port", "invalid type"],
    );
    expect_exit_2(
        &s,
        &valid(&s, "slots = \"lots\"\n"),
        &["llama.slots", "\"auto\" or a positive integer"],
    );
}

#[test]
fn toml_syntax_error() {
    let s = setup();
    expect_exit_2(&s, "[llama\nmodel = 1\n", &["line 1"]);
}

#[test]
fn missing_model_file() {
    let s = setup();
    let text = valid(&s, "").replace(s.model.to_str().unwrap(), "/nonexistent/model.gguf");
    expect_exit_2(
        &s,
        &text,
        &["llama.model", "/nonexistent/model.gguf", "does not exist"],
    );
}

#[test]
fn no_model_configured() {
    let s = setup();
    expect_exit_2(
        &s,
        &format!("[llama]\nbinary = \"{}\"\n", s.binary.display()),
        &["llama.model", "no model configured"],
    );
}

#[test]
fn not_a_gguf_file() {
    let s = setup();
    std::fs::write(&s.model, b"<html>not a model</html>").unwrap();
    expect_exit_2(
        &s,
        &valid(&s, ""),
        &["llama.model", "not a GGUF model file"],
    );
}

#[test]
fn missing_binary() {
    let s = setup();
    let text = valid(&s, "").replace(&s.binary.display().to_string(), "/nonexistent/llama-server");
    expect_exit_2(
        &s,
        &text,
        &[
            "llama.binary",
            "/nonexistent/llama-server",
            "does not exist",
        ],
    );
    let text = valid(&s, "").replace(
        &s.binary.display().to_string(),
        "no-such-llama-server-on-path",
    );
    expect_exit_2(&s, &text, &["llama.binary", "is not on PATH"]);
}

#[test]
fn listen_address_in_use() {
    let s = setup();
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let text = valid_on(&s, port, "");
    let (out, _) = run_with(&s, &text, &["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(stderr.contains("another program holds it"), "{stderr}");
}

#[test]
fn a_fallback_must_name_the_model_served() {
    let s = setup();
    let text = valid(
        &s,
        "model_alias = \"mine\"\n[models]\nfallback = \"gpt-4o\"\n",
    );
    expect_exit_2(&s, &text, &["models.fallback", "\"gpt-4o\"", "\"mine\""]);
}

#[test]
fn non_loopback_listen_requires_an_api_key() {
    let s = setup();
    let text = valid(&s, "").replace("listen = \"127.0.0.1:", "listen = \"0.0.0.0:");
    expect_exit_2(&s, &text, &["server.listen", "api_key"]);
}

#[test]
fn config_file_named_but_missing() {
    let out = Command::new(BIN)
        .args(["run", "--config", "/nonexistent/config.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/config.toml") && stderr.contains("cannot read"),
        "{stderr}"
    );
}

#[test]
fn config_from_the_environment() {
    let s = setup();
    let config = s.dir.path().join("env.toml");
    std::fs::write(&config, "[llama]\nslotz = 1\n").unwrap();
    let out = Command::new(BIN)
        .arg("run")
        .env("CONTEXTPILOTD_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&config.display().to_string()));
}

#[test]
fn status_with_nothing_listening_exits_3() {
    let s = setup();
    let port = free_port();
    let (out, config) = run_with(
        &s,
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
        &["status"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("not running"), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);
}

#[test]
fn example_config_is_valid_for_run_checks() {
    // The shipped example parses (its model is commented out, so `run` stops
    // at the model, not at a key).
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&example)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("llama.model: no model configured"));
}

#[test]
fn first_run_without_config_or_model_says_what_to_write() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("run")
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("CONTEXTPILOTD_CONFIG")
        .env("XDG_RUNTIME_DIR", home.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let file = if cfg!(target_os = "macos") {
        "Library/Application Support/contextpilotd/config.toml"
    } else {
        ".config/contextpilotd/config.toml"
    };
    let expected = format!(
        "create {} containing `[llama]` then `model = \"/path/to/model.gguf\"`",
        home.path().join(file).display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("make run"), "{stderr}");
    assert!(
        stderr.contains("~/.cache/contextpilotd/models/"),
        "{stderr}"
    );

    let missing = home.path().join("missing.toml");
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("create it with `[llama]`"), "{stderr}");
}
