//! `contextpilotd pull` against a loopback server that answers the way the
//! Hugging Face hub does: the tree API, `resolve/` with `X-Repo-Commit` and
//! `X-Linked-Etag` redirecting to a "CDN" path that honours `Range`. The
//! binary is the real one, pointed at the server by `HF_ENDPOINT`.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use contextpilotd::gguf::writer::{header, WriteValue};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_contextpilotd");
const REPO: &str = "owner/tiny-GGUF";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const FILE: &str = "tiny-Q4_K_M.gguf";
const TOKEN: &str = "hf_test_secret_token";

/// A few MiB that begin as a real GGUF header.
fn model_bytes(seed: u8) -> Vec<u8> {
    let mut bytes = header(&[
        ("general.architecture", WriteValue::Str("llama")),
        ("llama.context_length", WriteValue::U32(4096)),
    ]);
    let mut state = 0x9e37_79b9_u32 ^ u32::from(seed);
    while bytes.len() < 3 * 1024 * 1024 + 12_345 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        bytes.push(state as u8);
    }
    bytes
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One request the server saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    range: Option<String>,
    authorised: bool,
}

/// How the server misbehaves.
#[derive(Clone, Default)]
struct Script {
    /// Close the first CDN answer after this many body bytes.
    cut_after: Option<usize>,
    /// Serve these bytes instead of the file whose hash is advertised.
    wrong_bytes: Option<Vec<u8>>,
    /// Answer every request with the whole file, `Range` or not.
    ignore_range: bool,
}

struct LoopbackHub {
    endpoint: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl LoopbackHub {
    fn start(file: Vec<u8>, script: Script) -> LoopbackHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let endpoint = format!("http://{}", listener.local_addr().expect("address"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(ServerState {
            sha256: sha256_hex(&file),
            served: script.wrong_bytes.clone().unwrap_or_else(|| file.clone()),
            file,
            cut_after: Mutex::new(script.cut_after),
            ignore_range: script.ignore_range,
            seen: Arc::clone(&seen),
        });
        // Runs until the test binary exits; each connection gets a thread.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = Arc::clone(&state);
                std::thread::spawn(move || state.serve(stream));
            }
        });
        LoopbackHub { endpoint, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    fn cdn_gets(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "GET" && s.path.starts_with("/cdn/"))
            .collect()
    }
}

struct ServerState {
    file: Vec<u8>,
    served: Vec<u8>,
    sha256: String,
    cut_after: Mutex<Option<usize>>,
    ignore_range: bool,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl ServerState {
    /// Answers one HTTP/1.1 request, then closes the connection.
    fn serve(&self, stream: TcpStream) {
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(s) => s,
            Err(_) => return,
        });
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).is_err() {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let (mut range, mut authorised) = (None, false);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "range" => range = Some(value.trim().to_string()),
                    "authorization" => authorised = value.trim() == format!("Bearer {TOKEN}"),
                    _ => {}
                }
            }
        }
        self.seen.lock().expect("seen").push(Seen {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
            authorised,
        });
        let mut stream = stream;
        let head = method == "HEAD";
        let tree = format!("/api/models/{REPO}/tree/main");
        let resolve_prefixes = [
            format!("/{REPO}/resolve/main/"),
            format!("/{REPO}/resolve/{COMMIT}/"),
        ];
        if path.starts_with(&tree) {
            // Two pages, as the hub pages long listings: the second is
            // named by the first's `Link` header.
            let second_page = path.contains("cursor=2");
            let body = if second_page {
                serde_json::json!([
                    {"type": "file", "oid": "3333333333333333333333333333333333333333", "size": 4096, "path": "tiny-Q8_0.gguf",
                     "lfs": {"oid": "c".repeat(64), "size": 4096, "pointerSize": 134}},
                    {"type": "file", "oid": "4444444444444444444444444444444444444444", "size": 4096, "path": "mmproj-tiny-F16.gguf",
                     "lfs": {"oid": "d".repeat(64), "size": 4096, "pointerSize": 134}},
                ])
            } else {
                serde_json::json!([
                    {"type": "file", "oid": "1111111111111111111111111111111111111111", "size": 12, "path": "README.md"},
                    {"type": "file", "oid": "2222222222222222222222222222222222222222", "size": self.file.len(), "path": FILE,
                     "lfs": {"oid": self.sha256, "size": self.file.len(), "pointerSize": 134}},
                ])
            }
            .to_string();
            let link = format!("<{tree}?recursive=true&cursor=2>; rel=\"next\"");
            let mut headers = vec![("Content-Type", "application/json")];
            if !second_page {
                headers.push(("Link", link.as_str()));
            }
            respond(&mut stream, "200 OK", &headers, body.as_bytes(), head);
        } else if path == format!("/api/models/{REPO}/revision/main") {
            let body = serde_json::json!({"id": REPO, "sha": COMMIT}).to_string();
            respond(
                &mut stream,
                "200 OK",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
                head,
            );
        } else if let Some(file) = resolve_prefixes
            .iter()
            .find_map(|p| path.strip_prefix(p.as_str()))
        {
            if file != FILE {
                respond(&mut stream, "404 Not Found", &[], b"", head);
                return;
            }
            let etag = format!("\"{}\"", self.sha256);
            let size = self.file.len().to_string();
            let location = format!("/cdn/{}", self.sha256);
            respond(
                &mut stream,
                "302 Found",
                &[
                    ("Location", location.as_str()),
                    ("X-Repo-Commit", COMMIT),
                    ("X-Linked-Etag", etag.as_str()),
                    ("X-Linked-Size", size.as_str()),
                    ("ETag", "\"not-the-sha256\""),
                ],
                b"",
                head,
            );
        } else if path == format!("/cdn/{}", self.sha256) {
            self.serve_bytes(&mut stream, range.as_deref(), head);
        } else {
            respond(&mut stream, "404 Not Found", &[], b"", head);
        }
    }

    /// The bytes, from the `Range` start when there is one; the first
    /// answer is cut short when the script says so.
    fn serve_bytes(&self, stream: &mut TcpStream, range: Option<&str>, head: bool) {
        let total = self.served.len();
        let from = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse::<usize>().ok())
            .filter(|_| !self.ignore_range);
        let (status, start) = match from {
            Some(from) if from < total => ("206 Partial Content", from),
            Some(_) => {
                respond(stream, "416 Range Not Satisfiable", &[], b"", head);
                return;
            }
            None => ("200 OK", 0),
        };
        let content_range = format!("bytes {start}-{}/{total}", total - 1);
        let mut headers = vec![("Content-Type", "application/octet-stream")];
        if start > 0 {
            headers.push(("Content-Range", content_range.as_str()));
        }
        let body = &self.served[start..];
        let cut = self.cut_after.lock().expect("cut").take();
        match cut {
            Some(n) => {
                // Promise the whole body, send n bytes, hang up: a broken
                // connection, not an error status.
                let _ = write_head(stream, status, &headers, body.len());
                let _ = stream.write_all(&body[..n.min(body.len())]);
                let _ = stream.flush();
                let _ = stream.shutdown(Shutdown::Both);
            }
            None => respond(stream, status, &headers, body, head),
        }
    }
}

fn write_head(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, &str)],
    length: usize,
) -> std::io::Result<()> {
    let mut head =
        format!("HTTP/1.1 {status}\r\nContent-Length: {length}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    head: bool,
) {
    if write_head(stream, status, headers, body.len()).is_ok() && !head {
        let _ = stream.write_all(body);
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Write);
}

/// A temporary HOME and HF_HOME for one run of the binary.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn hf_home(&self) -> PathBuf {
        self.dir.path().join("hf")
    }

    fn repo_dir(&self) -> PathBuf {
        self.hf_home().join("hub").join("models--owner--tiny-GGUF")
    }

    fn pull(&self, hub: &LoopbackHub, spec: &str, token: Option<&str>) -> Output {
        let mut command = Command::new(BIN);
        command
            .args(["pull", spec])
            .env("HF_ENDPOINT", &hub.endpoint)
            .env("HF_HOME", self.hf_home())
            .env("HOME", self.dir.path().join("home"))
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_TOKEN");
        if let Some(token) = token {
            command.env("HF_TOKEN", token);
        }
        command.output().expect("run contextpilotd pull")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every file under `dir`, relative, sorted (missing dir: none).
fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                found.push(rel.display().to_string());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn pull_lays_out_the_hub_cache_with_progress() {
    let bytes = model_bytes(1);
    let sha = sha256_hex(&bytes);
    let hub = LoopbackHub::start(bytes.clone(), Script::default());
    let sandbox = Sandbox::new();
    let out = sandbox.pull(&hub, REPO, Some(TOKEN));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");

    let snapshot = sandbox.repo_dir().join("snapshots").join(COMMIT).join(FILE);
    assert_eq!(stdout.trim(), snapshot.display().to_string(), "{stderr}");
    let label = format!("pulling {REPO} {FILE}");
    let progress: Vec<&str> = stderr.lines().filter(|l| l.starts_with(&label)).collect();
    assert!(
        progress.first().is_some_and(|l| l.contains(": 0% (")),
        "{stderr}"
    );
    assert!(
        progress
            .last()
            .is_some_and(|l| l.contains(": 100% (3.0 of 3.0 MiB)")),
        "{stderr}"
    );
    assert!(progress.len() <= 11, "one line a tenth at most:\n{stderr}");
    assert!(
        stderr.contains("serve it: contextpilotd run --model"),
        "{stderr}"
    );
    assert!(!stderr.contains(TOKEN) && !stdout.contains(TOKEN));

    // The layout huggingface_hub makes: a relative link to the blob.
    let link = std::fs::read_link(&snapshot).expect("snapshot is a symlink");
    assert_eq!(link, PathBuf::from(format!("../../blobs/{sha}")));
    let served = std::fs::read(&snapshot).expect("the link resolves");
    assert_eq!(sha256_hex(&served), sha);
    let refs =
        std::fs::read_to_string(sandbox.repo_dir().join("refs").join("main")).expect("refs/main");
    assert_eq!(refs, COMMIT);
    assert_eq!(
        files_under(&sandbox.repo_dir().join("blobs")),
        std::slice::from_ref(&sha),
        "nothing but the blob"
    );

    // The token goes to the hub, never to the CDN.
    let seen = hub.seen();
    assert!(
        seen.iter()
            .filter(|s| !s.path.starts_with("/cdn/"))
            .all(|s| s.authorised),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|s| s.path.starts_with("/cdn/"))
            .all(|s| !s.authorised),
        "{seen:?}"
    );
    assert_eq!(hub.cdn_gets().len(), 1, "{seen:?}");

    // Pulled again: the blob is there, only the link is made.
    std::fs::remove_file(&snapshot).expect("remove the link");
    let again = sandbox.pull(&hub, &format!("{REPO}:q4_k_m"), None);
    let stderr = text(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(stderr.contains("already in the cache"), "{stderr}");
    assert_eq!(hub.cdn_gets().len(), 1, "no second download");
    assert_eq!(std::fs::read_link(&snapshot).expect("link again"), link);
}

#[test]
fn a_connection_cut_half_way_resumes_with_a_range_request() {
    let bytes = model_bytes(2);
    let sha = sha256_hex(&bytes);
    let cut = bytes.len() / 2;
    let hub = LoopbackHub::start(
        bytes.clone(),
        Script {
            cut_after: Some(cut),
            ..Script::default()
        },
    );
    let sandbox = Sandbox::new();
    let out = sandbox.pull(&hub, REPO, None);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    let gets = hub.cdn_gets();
    assert_eq!(gets.len(), 2, "{gets:?}\n{stderr}");
    assert_eq!(gets[0].range, None);
    assert_eq!(
        gets[1].range.as_deref(),
        Some(format!("bytes={cut}-").as_str())
    );
    assert!(stderr.contains("resuming"), "{stderr}");

    let snapshot = sandbox.repo_dir().join("snapshots").join(COMMIT).join(FILE);
    assert_eq!(
        sha256_hex(&std::fs::read(&snapshot).expect("snapshot")),
        sha
    );
    assert_eq!(files_under(&sandbox.repo_dir().join("blobs")), [sha]);
}

#[test]
fn a_server_that_ignores_range_is_read_again_from_the_start() {
    let bytes = model_bytes(7);
    let sha = sha256_hex(&bytes);
    let hub = LoopbackHub::start(
        bytes,
        Script {
            cut_after: Some(1024 * 1024),
            ignore_range: true,
            ..Script::default()
        },
    );
    let sandbox = Sandbox::new();
    let out = sandbox.pull(&hub, REPO, None);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ignored the range request; starting over"),
        "{stderr}"
    );
    let gets = hub.cdn_gets();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].range.as_deref(), Some("bytes=1048576-"));
    assert_eq!(files_under(&sandbox.repo_dir().join("blobs")), [sha]);
}

#[test]
fn a_sha256_mismatch_fails_and_leaves_nothing_under_the_final_names() {
    let bytes = model_bytes(3);
    let sha = sha256_hex(&bytes);
    let wrong = model_bytes(4);
    let hub = LoopbackHub::start(
        bytes,
        Script {
            wrong_bytes: Some(wrong.clone()),
            ..Script::default()
        },
    );
    let sandbox = Sandbox::new();
    let out = sandbox.pull(&hub, REPO, None);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("sha256 mismatch"), "{stderr}");
    assert!(stderr.contains(&format!("expected {sha}")), "{stderr}");
    assert!(
        stderr.contains(&format!("got {}", sha256_hex(&wrong))),
        "{stderr}"
    );

    let repo = sandbox.repo_dir();
    assert_eq!(
        files_under(&repo.join("blobs")),
        Vec::<String>::new(),
        "no blob, no .incomplete"
    );
    assert_eq!(files_under(&repo.join("snapshots")), Vec::<String>::new());
    assert!(!repo.join("refs").join("main").exists());
}

#[test]
fn a_missing_quant_names_the_quants_there() {
    let hub = LoopbackHub::start(model_bytes(5), Script::default());
    let sandbox = Sandbox::new();
    let out = sandbox.pull(&hub, &format!("{REPO}:Q5_K_M"), None);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("\"Q5_K_M\""), "{stderr}");
    assert!(stderr.contains("available: Q4_K_M, Q8_0"), "{stderr}");
    assert!(hub.cdn_gets().is_empty());
}

#[test]
fn a_repository_that_is_not_owner_slash_name_is_a_usage_error() {
    let hub = LoopbackHub::start(model_bytes(6), Script::default());
    let sandbox = Sandbox::new();
    let out = sandbox.pull(&hub, "just-a-name", None);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("owner/name"));
    assert!(hub.seen().is_empty());

    let missing = sandbox.pull(&hub, "owner/absent", None);
    let stderr = text(&missing.stderr);
    assert_eq!(missing.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("owner/absent at revision main is not on"),
        "{stderr}"
    );
}
