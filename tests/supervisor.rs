//! The daemon with a real llama-server and a real model: readiness, status,
//! restarts after a crash or a hang, clean shutdown, no orphaned child, and
//! a crash loop.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

fn child_pid(status: &Value) -> u32 {
    status["child"]["pid"].as_u64().expect("child pid") as u32
}

#[test]
fn reaches_ready_and_status_has_every_field() {
    let parts = real_parts();
    // Variables llama-server would read as flags must not reach it: an API
    // key would lock the daemon out of /props, so it would never be ready.
    let hijack = [
        ("LLAMA_API_KEY", "hijack"),
        ("LLAMA_ARG_ALIAS", "hijacked"),
        ("LLAMA_ARG_ENDPOINT_SLOTS", "0"),
    ];
    let mut daemon = Daemon::start_with(|listen| test_config(&parts, listen, ""), &hijack);
    let status = daemon.wait_ready();

    for key in [
        "version", "pid", "uptime_s", "listen", "state", "child", "model", "plan", "hardware",
    ] {
        assert!(!status[key].is_null(), "status lacks {key}: {status}");
    }
    for key in [
        "pid",
        "port",
        "restarts",
        "started_at",
        "command",
        "stderr_tail",
    ] {
        assert!(
            !status["child"][key].is_null(),
            "status.child lacks {key}: {status}"
        );
    }
    assert!(
        status["child"].get("last_exit").is_some(),
        "status.child lacks last_exit"
    );
    for key in ["path", "size_bytes", "architecture", "context_length"] {
        assert!(
            !status["model"][key].is_null(),
            "status.model lacks {key}: {status}"
        );
    }
    for key in [
        "slots",
        "ctx_per_slot",
        "ctx_size",
        "threads",
        "gpu_layers",
        "cache_reuse",
    ] {
        assert!(
            !status["plan"][key].is_null(),
            "status.plan lacks {key}: {status}"
        );
    }
    for key in ["chip", "memory_bytes", "perf_cores", "efficiency_cores"] {
        assert!(
            !status["hardware"][key].is_null(),
            "status.hardware lacks {key}: {status}"
        );
    }
    assert!(status["hardware"].get("gpu_cores").is_some());

    assert_eq!(status["pid"].as_u64(), Some(daemon.pid() as u64));
    assert_eq!(status["listen"], daemon.listen.to_string());
    assert_eq!(status["child"]["restarts"], 0);
    assert_eq!(status["model"]["architecture"], "llama");
    assert_eq!(status["model"]["size_bytes"], 98_362_432);
    assert_eq!(status["plan"]["slots"], 1);
    assert_eq!(status["plan"]["ctx_size"], 512);

    // The command is an argv array that carries every fixed flag.
    let command: Vec<&str> = status["child"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(command[0], parts.llama_server.to_str().unwrap());
    let port = status["child"]["port"].as_u64().unwrap().to_string();
    for pair in [
        ["--host", "127.0.0.1"],
        ["--port", &port],
        ["--ctx-size", "512"],
        ["--parallel", "1"],
    ] {
        assert!(
            command.windows(2).any(|w| w == pair),
            "{pair:?} missing from {command:?}"
        );
    }
    for flag in ["-m", "-ngl", "--cache-reuse", "--metrics"] {
        assert!(command.contains(&flag), "{flag} missing from {command:?}");
    }

    // The child requires the key the daemon handed it (not the one in the
    // environment), so nothing that finds its port can use the model past
    // the daemon's key, admission and meter.
    let child: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (code, _) = http_get(child, "/props").unwrap();
    assert_eq!(code, 401, "the child answered without its key");
    let hijacker = [("Authorization", "Bearer hijack")];
    let (code, _) = http_request(child, "POST", "/completion", &hijacker).unwrap();
    assert_eq!(code, 401, "the environment's key opened the child");
    assert!(
        !command.iter().any(|arg| arg.contains("api-key")),
        "{command:?}"
    );
    // Through the daemon the child answers, and /slots was not disabled
    // through the environment.
    let (code, _) = http_get(daemon.listen, "/slots").unwrap();
    assert_eq!(code, 200, "/slots was disabled through the environment");

    // The daemon's own /health follows the child.
    let (code, _) = http_get(daemon.listen, "/health").unwrap();
    assert_eq!(code, 200);

    // `status --json` prints the same document; `status` renders it.
    let out = daemon.command(&["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let via_cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(via_cli["child"]["pid"], status["child"]["pid"]);
    let out = daemon.command(&["status"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("READY"), "{text}");
    assert!(
        text.contains(&format!("pid {}", child_pid(&status))),
        "{text}"
    );

    // Unknown routes and wrong methods get OpenAI-shaped errors.
    let (code, body) = http_get(daemon.listen, "/nope").unwrap();
    assert_eq!(code, 404);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], 404);
    assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string());
    let (code, _) = http_request(daemon.listen, "POST", "/status", &[]).unwrap();
    assert_eq!(code, 405);

    // The child's output reaches the daemon's log file.
    let log = std::fs::read_to_string(daemon.dir().join("logs/contextpilotd.log")).unwrap();
    assert!(log.contains("llama-server["), "no child output in the log");
}

#[test]
fn killed_child_is_restarted() {
    let parts = real_parts();
    let mut daemon = Daemon::start(&parts, "");
    let first = child_pid(&daemon.wait_ready());

    signal(first, Signal::SIGKILL);
    let status = daemon.wait_status(Duration::from_secs(90), "ready again after kill -9", |s| {
        s["state"] == "ready" && s["child"]["restarts"].as_u64() >= Some(1)
    });
    assert_eq!(status["child"]["restarts"], 1, "{status}");
    assert_ne!(child_pid(&status), first);
    assert!(
        status["child"]["last_exit"]
            .as_str()
            .unwrap()
            .contains("SIGKILL"),
        "{status}"
    );
    assert!(!process_alive(first));
}

#[test]
fn stopped_child_is_found_hung_killed_and_restarted() {
    let parts = real_parts();
    let mut daemon = Daemon::start_with(
        |listen| {
            test_config(&parts, listen, "").replace("hang_timeout_s = 10", "hang_timeout_s = 2")
        },
        &[],
    );
    let first = child_pid(&daemon.wait_ready());

    signal(first, Signal::SIGSTOP);
    let status = daemon.wait_status(Duration::from_secs(90), "ready again after SIGSTOP", |s| {
        s["state"] == "ready" && s["child"]["restarts"].as_u64() >= Some(1)
    });
    assert_ne!(child_pid(&status), first);
    let last_exit = status["child"]["last_exit"].as_str().unwrap();
    assert!(last_exit.contains("hung"), "{last_exit}");
    wait_for(Duration::from_secs(10), "the hung child to be gone", || {
        (!process_alive(first)).then_some(())
    });
}

#[test]
fn sigterm_stops_daemon_and_child() {
    let parts = real_parts();
    let mut daemon = Daemon::start(&parts, "");
    let child = child_pid(&daemon.wait_ready());

    signal(daemon.pid(), Signal::SIGTERM);
    let exit = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "{}", daemon.output());
    assert!(
        !process_alive(child),
        "llama-server {child} outlived the daemon"
    );
    // stderr is a file, as under launchd: the lines, down to the last one,
    // are in the log file alone, without colour.
    let log = daemon.log();
    assert!(log.contains("contextpilotd stopped"), "{}", daemon.output());
    assert!(log.contains("llama-server["), "the child's output: {log}");
    assert!(!log.contains('\x1b'), "ANSI codes in the file: {log}");
    assert!(
        daemon.stderr().is_empty(),
        "log lines on stderr too: {}",
        daemon.output()
    );
}

#[test]
fn under_the_journal_lines_go_to_stderr_only() {
    let parts = real_parts();
    let mut daemon = Daemon::start_as_if_journald(&parts);
    daemon.wait_ready();
    signal(daemon.pid(), Signal::SIGTERM);
    let exit = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "{}", daemon.output());
    let stderr = daemon.stderr();
    assert!(stderr.contains("contextpilotd stopped"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "ANSI codes in the journal: {stderr}"
    );
    assert!(
        !daemon.log_path().exists(),
        "a log file beside the journal: {}",
        daemon.output()
    );
}

#[test]
fn sigkill_of_the_daemon_takes_the_child_along() {
    let parts = real_parts();
    let mut daemon = Daemon::start(&parts, "");
    let child = child_pid(&daemon.wait_ready());

    signal(daemon.pid(), Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10));
    wait_for(
        Duration::from_secs(10),
        "llama-server to die with the daemon",
        || (!process_alive(child)).then_some(()),
    );
}

/// Linux's parent-death signal alone, without the watchdog.
#[test]
fn parent_death_signal_alone_takes_the_child_along() {
    let parts = real_parts();
    let mut daemon = Daemon::start_with(
        |listen| test_config(&parts, listen, ""),
        &[("CONTEXTPILOTD_NO_WATCHDOG", "1")],
    );
    let child = child_pid(&daemon.wait_ready());

    signal(daemon.pid(), Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10));
    wait_for(
        Duration::from_secs(10),
        "the parent-death signal to kill llama-server",
        || (!process_alive(child)).then_some(()),
    );
}

/// The watchdog is macOS's only guard against an orphaned child; on Linux it
/// backs up the parent-death signal. Here it works alone.
#[test]
fn watchdog_alone_cleans_up_after_a_killed_daemon() {
    let parts = real_parts();
    let mut daemon = Daemon::start_with(
        |listen| test_config(&parts, listen, ""),
        &[("CONTEXTPILOTD_NO_PDEATHSIG", "1")],
    );
    let child = child_pid(&daemon.wait_ready());

    signal(daemon.pid(), Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10));
    wait_for(
        Duration::from_secs(15),
        "the watchdog to stop llama-server",
        || (!process_alive(child)).then_some(()),
    );
}

#[test]
fn corrupt_model_is_a_crash_loop_with_the_childs_words() {
    let parts = real_parts();
    // The file is whole but names a tensor wrongly: llama-server reads the
    // metadata, then fails to load and exits.
    let dir = tempfile::tempdir().unwrap();
    let broken = corrupt_model(&parts, dir.path());
    let mut daemon = Daemon::start_with(
        |listen| {
            test_config(&broken, listen, "").replace(
                "restart_backoff_max_ms = 1000",
                "restart_backoff_max_ms = 300",
            )
        },
        &[],
    );
    // crashloop_restarts defaults to 5: the sixth quick restart is a loop.
    let status = daemon.wait_status(Duration::from_secs(60), "state crashloop", |s| {
        s["state"] == "crashloop"
    });
    assert!(
        status["child"]["restarts"].as_u64().unwrap() >= 6,
        "{status}"
    );
    assert!(
        status["child"]["last_exit"]
            .as_str()
            .unwrap()
            .contains("exited with code"),
        "{status}"
    );
    let tail: Vec<&str> = status["child"]["stderr_tail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    // The child's own words (this build says "exiting due to model loading
    // error"; any build says something with "error").
    assert!(
        tail.iter()
            .any(|l| !l.starts_with("--- contextpilotd") && l.to_lowercase().contains("error")),
        "the child's own error is not in the tail: {tail:#?}"
    );
    let (code, _) = http_get(daemon.listen, "/health").unwrap();
    assert_eq!(code, 503);

    // The likely cause, read from the child's lines, and what to do.
    assert_eq!(
        status["child"]["likely_cause"]["cause"], "the model file is damaged or incomplete",
        "{status}"
    );
    let out = daemon.command(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CRASHLOOP") && text.contains("last lines from llama-server"),
        "{text}"
    );
    assert!(
        text.contains("likely cause  the model file is damaged or incomplete (")
            && text.contains("token_embd.weight")
            && text.contains("next step     download the model again"),
        "{text}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a crash loop is a failure: {text}"
    );
    let out = daemon.command(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["state"], "crashloop");
}

#[test]
fn second_daemon_on_the_same_address_refuses_to_start() {
    let parts = real_parts();
    let mut daemon = Daemon::start(&parts, "");
    daemon.wait_ready();

    let out = daemon.command(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "already running for {} (pid {})",
            daemon.listen,
            daemon.pid()
        )),
        "{stderr}"
    );
    // The first one is unharmed.
    daemon.wait_ready();
}

#[test]
fn sigterm_during_start_up_is_an_orderly_stop() {
    let parts = real_parts();
    let mut daemon = Daemon::start(&parts, "");
    // The lock file appears once the configuration is checked, before the
    // model is loaded: stop the daemon right there.
    let lock_dir = daemon.dir().join("contextpilotd");
    wait_for(Duration::from_secs(30), "the instance lock", || {
        std::fs::read_dir(&lock_dir).ok()?.next().map(|_| ())
    });
    signal(daemon.pid(), Signal::SIGTERM);
    let exit = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "{}", daemon.output());
}
