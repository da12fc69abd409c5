//! Test harness: runs the real `contextpilotd` binary with a real
//! llama-server and model, in a temp dir of its own, and talks to it over
//! real HTTP.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_contextpilotd");

/// The provisioned llama-server and model. `make test` passes them in the
/// environment; otherwise they are looked up in the provisioning cache.
pub struct RealParts {
    pub llama_server: PathBuf,
    pub model: PathBuf,
}

pub fn real_parts() -> RealParts {
    RealParts {
        llama_server: provisioned(
            "CONTEXTPILOTD_TEST_LLAMA_SERVER",
            "LLAMA_SERVER",
            "llama-server",
        ),
        model: provisioned("CONTEXTPILOTD_TEST_MODEL", "MODEL", "the model"),
    }
}

/// The real model with its token embedding renamed in the tensor infos:
/// the file is whole (so the daemon's size check passes) and llama-server
/// reads the metadata, then fails to load with "missing tensor" and exits.
/// Lives in `dir`.
pub fn corrupt_model(parts: &RealParts, dir: &Path) -> RealParts {
    let corrupt = dir.join("corrupt.gguf");
    let mut bytes = std::fs::read(&parts.model).unwrap();
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("the model names token_embd.weight");
    bytes[at + name.len() - 8] = b'x';
    std::fs::write(&corrupt, &bytes).unwrap();
    RealParts {
        llama_server: parts.llama_server.clone(),
        model: corrupt,
    }
}

/// The real model cut short inside its tensor data: the header is whole,
/// the file is not.
pub fn truncated_model(parts: &RealParts, dir: &Path) -> RealParts {
    let cut = dir.join("truncated.gguf");
    let bytes = std::fs::read(&parts.model).unwrap();
    std::fs::write(&cut, &bytes[..8 << 20]).unwrap();
    RealParts {
        llama_server: parts.llama_server.clone(),
        model: cut,
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it returns `Some`, or panics with `what` after
/// `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain HTTP/1.1 GET with `Connection: close`: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[])
}

pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {head:?}")))?;
    Ok((code, body.to_string()))
}

/// POSTs a JSON body and reads the JSON answer (`Null` when it is not
/// JSON); the read may take as long as a model load.
pub fn http_post_json(addr: SocketAddr, path: &str, body: &Value) -> std::io::Result<(u16, Value)> {
    let (code, text) = http_post_text(addr, path, body)?;
    Ok((code, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// POSTs a JSON body and reads the answer's body as it came on the wire
/// (a stream's chunk framing included).
pub fn http_post_text(
    addr: SocketAddr,
    path: &str,
    body: &Value,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(180)))?;
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {head:?}")))?;
    Ok((code, body.to_string()))
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("send signal");
}

/// A running daemon in its own temp dir, with its own lock dir.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub process: Child,
    /// Child pids seen, so Drop can clean up whatever a failed test left.
    seen_children: Vec<u32>,
}

/// Settings that make supervision fast enough for tests on 2 cores: one
/// slot, a small context, one thread. The hang timeout stays generous so a
/// loaded machine never looks hung; the hang test lowers it.
pub fn test_config(parts: &RealParts, listen: SocketAddr, extra: &str) -> String {
    format!(
        r#"[server]
listen = "{listen}"

[llama]
binary = "{binary}"
model = "{model}"
slots = 1
ctx_per_slot = 512
threads = 1

[supervisor]
health_interval_ms = 200
ready_timeout_s = 60
hang_timeout_s = 10
stop_timeout_s = 2
restart_backoff_initial_ms = 100
restart_backoff_max_ms = 1000

[log]
dir = "logs"

[cost]
measure = false
{extra}"#,
        binary = parts.llama_server.display(),
        model = parts.model.display(),
    )
}

impl Daemon {
    /// Writes `config_text` (with `{listen}` already filled in) and starts
    /// `contextpilotd run`.
    pub fn start_with(
        config_text: impl FnOnce(SocketAddr) -> String,
        envs: &[(&str, &str)],
    ) -> Daemon {
        Daemon::spawn(config_text, envs, false, &[])
    }

    /// [`Daemon::start_with`], with more arguments for `run`.
    pub fn start_with_args(
        config_text: impl FnOnce(SocketAddr) -> String,
        envs: &[(&str, &str)],
        args: &[&str],
    ) -> Daemon {
        Daemon::spawn(config_text, envs, false, args)
    }

    /// Like [`Daemon::start`], with `JOURNAL_STREAM` naming the stderr file's
    /// device and inode, as systemd does when stderr is the journal.
    pub fn start_as_if_journald(parts: &RealParts) -> Daemon {
        Daemon::spawn(|listen| test_config(parts, listen, ""), &[], true, &[])
    }

    fn spawn(
        config_text: impl FnOnce(SocketAddr) -> String,
        envs: &[(&str, &str)],
        journal: bool,
        args: &[&str],
    ) -> Daemon {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_text(listen)).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let meta = stderr.metadata().unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("XDG_RUNTIME_DIR", dir.path())
            .env_remove("JOURNAL_STREAM")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        if journal {
            command.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        let process = command.spawn().unwrap();
        Daemon {
            dir,
            config,
            listen,
            process,
            seen_children: Vec::new(),
        }
    }

    pub fn start(parts: &RealParts, extra: &str) -> Daemon {
        Daemon::start_with(|listen| test_config(parts, listen, extra), &[])
    }

    pub fn status(&mut self) -> Option<Value> {
        let (code, body) = http_get(self.listen, "/status").ok()?;
        assert_eq!(code, 200, "GET /status: {body}");
        let status: Value = serde_json::from_str(&body).expect("status is JSON");
        let models = status["models"].as_array().cloned().unwrap_or_default();
        let pids = models
            .iter()
            .map(|m| &m["pid"])
            .chain([&status["child"]["pid"]]);
        for pid in pids.filter_map(Value::as_u64) {
            if !self.seen_children.contains(&(pid as u32)) {
                self.seen_children.push(pid as u32);
            }
        }
        Some(status)
    }

    /// Waits until the status satisfies `pred`; returns that status.
    pub fn wait_status(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(status) = self.status() {
                if pred(&status) {
                    return status;
                }
                last = Some(status);
            }
            if let Ok(Some(exit)) = self.process.try_wait() {
                panic!(
                    "daemon exited ({exit}) while waiting for {what}; {}",
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last status: {}\n{}",
                    last.map(|s| serde_json::to_string_pretty(&s).unwrap())
                        .unwrap_or_default(),
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_ready(&mut self) -> Value {
        self.wait_status(Duration::from_secs(90), "state ready", |s| {
            s["state"] == "ready"
        })
    }

    /// Errors before logging was set up, and panics; log lines too when
    /// stderr is (said to be) the journal.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// `contextpilotd.log` in the test config's `[log] dir`: where log lines
    /// go when stderr is a file.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("logs/contextpilotd.log")
    }

    /// Both, for messages when something went wrong.
    pub fn output(&self) -> String {
        format!(
            "stderr:\n{}\ncontextpilotd.log:\n{}",
            self.stderr(),
            self.log()
        )
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_for(timeout, "the daemon to exit", || {
            self.process.try_wait().unwrap()
        })
    }

    /// Runs another `contextpilotd` command against this daemon's config.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .output()
            .unwrap()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        for &pid in &self.seen_children {
            if process_alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A provisioned file: from `env` when set (`make test` sets it), else the
/// `key=` line of `scripts/provision.sh paths`; `what` names it when it is
/// missing.
pub fn provisioned(env: &str, key: &str, what: &str) -> PathBuf {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/provision.sh"))
            .arg("paths")
            .output()
            .expect("run scripts/provision.sh paths");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(PathBuf::from)
            .unwrap_or_default()
    });
    assert!(
        path.is_file(),
        "{what} ({}) is missing: run `make test`, which provisions it",
        path.display()
    );
    path
}

/// A plain llama-server on a free loopback port, killed when dropped: one
/// slot and a small context, then `args` (a later flag wins).
pub struct PlainServer {
    pub port: u16,
    pub process: Child,
}

impl PlainServer {
    pub fn start(parts: &RealParts) -> PlainServer {
        PlainServer::start_with(parts, &[])
    }

    pub fn start_with(parts: &RealParts, args: &[&str]) -> PlainServer {
        let port = free_port();
        let process = Command::new(&parts.llama_server)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--model")
            .arg(&parts.model)
            .args(["--parallel", "1", "--ctx-size", "1024", "--threads", "1"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        PlainServer { port, process }
    }
}

impl Drop for PlainServer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// `/models/loaded`'s entry for `backend` ("local" or an upstream's URL)
/// once that backend has joined and is ready.
pub fn wait_for_ready_backend(listen: SocketAddr, backend: &str) -> Value {
    wait_for(
        Duration::from_secs(120),
        &format!("{backend} to be ready"),
        || {
            let (_, body) = http_get(listen, "/models/loaded").ok()?;
            let loaded: Value = serde_json::from_str(&body).ok()?;
            loaded["models"]
                .as_array()?
                .iter()
                .find(|m| m["backend"] == backend && m["state"] == "ready")
                .cloned()
        },
    )
}
