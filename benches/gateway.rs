//! What the gateway costs: 1-token completions sent straight to llama-server
//! and through contextpilotd, interleaved, over keep-alive connections; and
//! the daemon's resident memory idle and under load.
//!
//! Needs the real llama-server and model (`make bench` provisions them) and
//! the release binary (`make bench` builds it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 300;

/// A minimal HTTP/1.1 keep-alive client: enough for JSON request/response.
struct Conn {
    reader: BufReader<TcpStream>,
    addr: SocketAddr,
    /// The server said `Connection: close` (llama.cpp's HTTP library ends a
    /// keep-alive connection after a number of requests).
    closed: bool,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        Conn {
            reader: BufReader::new(stream),
            addr,
            closed: false,
        }
    }

    fn request(&mut self, method: &str, path: &str, body: &str) -> (u16, String) {
        if self.closed {
            *self = Conn::open(self.addr);
        }
        match self.exchange(method, path, body) {
            Some(answer) => answer,
            None => {
                // Closed between requests: once more on a fresh connection.
                *self = Conn::open(self.addr);
                self.exchange(method, path, body)
                    .expect("the server closed a fresh connection")
            }
        }
    }

    fn exchange(&mut self, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes()).ok()?;
        stream.write_all(body.as_bytes()).ok()?;
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line).ok()? == 0 {
            return None;
        }
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                self.closed = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            body.resize(length, 0);
            self.reader.read_exact(&mut body).unwrap();
        }
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn provisioned() -> (PathBuf, PathBuf) {
    let from_env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    match (
        from_env("CONTEXTPILOTD_TEST_LLAMA_SERVER"),
        from_env("CONTEXTPILOTD_TEST_MODEL"),
    ) {
        (Some(s), Some(m)) => (s, m),
        _ => panic!("run `make bench`: it provisions llama-server and the model"),
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this as a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("gateway bench: skipped outside `cargo bench`");
        return;
    }
    let (server, model) = provisioned();
    let binary = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/contextpilotd");
    assert!(
        binary.is_file(),
        "build the release binary first (`make bench` does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let listen: SocketAddr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{listen}\"\n[llama]\nbinary = \"{}\"\nmodel = \"{}\"\nslots = 2\nctx_per_slot = 1024\nthreads = 2\n[meter]\nquery_log = \"{}\"\n[log]\ndir = \"{}\"\n",
            server.display(),
            model.display(),
            dir.path().join("query_log.jsonl").display(),
            dir.path().join("logs").display()
        ),
    )
    .unwrap();
    let daemon = Stopped(
        Command::new(&binary)
            .args(["run", "--config"])
            .arg(&config)
            .env("XDG_RUNTIME_DIR", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let child_port = loop {
        assert!(Instant::now() < deadline, "the daemon did not become ready");
        if let Ok(stream) = TcpStream::connect(listen) {
            drop(stream);
            let mut conn = Conn::open(listen);
            let (code, body) = conn.request("GET", "/status", "");
            let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if code == 200 && status["state"] == "ready" {
                break status["child"]["port"].as_u64().unwrap() as u16;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let child: SocketAddr = format!("127.0.0.1:{child_port}").parse().unwrap();
    let idle_rss = rss_kib(daemon.id());

    let body = r#"{"prompt":"The capital of France is","n_predict":1,"temperature":0,"cache_prompt":true}"#;
    let mut direct = Conn::open(child);
    let mut gateway = Conn::open(listen);
    // Warm both paths and the prompt cache.
    for _ in 0..5 {
        direct.request("POST", "/completion", body);
        gateway.request("POST", "/completion", body);
    }
    let (mut t_direct, mut t_gateway) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let start = Instant::now();
        assert_eq!(direct.request("POST", "/completion", body).0, 200);
        t_direct.push(start.elapsed().as_secs_f64() * 1000.0);
        let start = Instant::now();
        assert_eq!(gateway.request("POST", "/completion", body).0, 200);
        t_gateway.push(start.elapsed().as_secs_f64() * 1000.0);
    }

    // Memory under load: two clients hammering the gateway.
    let load: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let mut conn = Conn::open(listen);
                for _ in 0..100 {
                    conn.request(
                        "POST",
                        "/v1/completions",
                        r#"{"prompt":"Hello","max_tokens":4}"#,
                    );
                }
            })
        })
        .collect();
    let mut peak_rss = idle_rss;
    while load.iter().any(|t| !t.is_finished()) {
        peak_rss = peak_rss.max(rss_kib(daemon.id()));
        std::thread::sleep(Duration::from_millis(20));
    }
    for t in load {
        t.join().unwrap();
    }

    t_direct.sort_by(f64::total_cmp);
    t_gateway.sort_by(f64::total_cmp);
    println!("\n1-token /completion, {ROUNDS} rounds, keep-alive, interleaved");
    println!(
        "{:<22}{:>12}{:>12}{:>12}",
        "", "p50 ms", "p99 ms", "mean ms"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for (name, v) in [
        ("llama-server direct", &t_direct),
        ("through contextpilotd", &t_gateway),
    ] {
        println!(
            "{name:<22}{:>12.2}{:>12.2}{:>12.2}",
            percentile(v, 50.0),
            percentile(v, 99.0),
            mean(v)
        );
    }
    println!(
        "{:<22}{:>12.2}{:>12.2}{:>12.2}",
        "added by the gateway",
        percentile(&t_gateway, 50.0) - percentile(&t_direct, 50.0),
        percentile(&t_gateway, 99.0) - percentile(&t_direct, 99.0),
        mean(&t_gateway) - mean(&t_direct)
    );
    println!(
        "\ncontextpilotd resident memory: idle {} KiB, peak under load {} KiB",
        idle_rss, peak_rss
    );
}

/// The daemon under test, stopped with SIGTERM when the bench ends, also
/// when it panics.
struct Stopped(Child);

impl Stopped {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}
