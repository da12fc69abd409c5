//! The platform side of the child: spawning it from an argv vector in its own
//! process group, tying its life to the daemon's, reading its output, and
//! stopping it.
//!
//! Two mechanisms make sure no llama-server outlives the daemon, even when the
//! daemon is SIGKILLed:
//! * On Linux the child gets a parent-death signal (SIGKILL) at spawn.
//! * On every platform a watchdog process (this binary, `__watchdog`) holds
//!   the read end of a pipe from the daemon. When the daemon dies the kernel
//!   closes the pipe; the watchdog sees EOF and kills every process group it
//!   was told about. macOS has no parent-death signal, so there the watchdog
//!   is the only mechanism; on Linux it is the second one, and tests run it
//!   alone by setting `CONTEXTPILOTD_NO_PDEATHSIG=1`.

use std::collections::{BTreeSet, VecDeque};
use std::io::{self, BufRead};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tracing::Level;

/// How many lines of the child's output are kept for `status`.
pub const TAIL_LINES: usize = 200;

/// Set to 1 to skip the parent-death signal, so tests can check that the
/// watchdog alone cleans up.
pub const NO_PDEATHSIG_ENV: &str = "CONTEXTPILOTD_NO_PDEATHSIG";

/// The last lines the child printed, shared with the status endpoint.
#[derive(Clone, Default)]
pub struct OutputTail(Arc<Mutex<VecDeque<String>>>);

impl OutputTail {
    pub fn push(&self, line: String) {
        let mut lines = crate::sync::lock(&self.0);
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub fn lines(&self) -> Vec<String> {
        crate::sync::lock(&self.0).iter().cloned().collect()
    }
}

/// The key a child requires on every request: llama-server's `--api-key`,
/// handed over in `LLAMA_API_KEY` so that it is never in an argv (which
/// `/status` and `ps` show) and never logged. A fresh one for every child,
/// so no page or process that learned the child's port can use the model
/// past the daemon's API key, admission and meter.
#[derive(Clone, PartialEq, Eq)]
pub struct ChildKey(std::sync::Arc<str>);

impl ChildKey {
    /// 128 random bits from the system's generator.
    pub fn generate() -> io::Result<ChildKey> {
        use std::io::Read;
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(ChildKey(hex.into()))
    }

    /// The `Authorization` header value.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl std::fmt::Debug for ChildKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChildKey(..)")
    }
}

/// A running llama-server in its own process group.
pub struct ChildProcess {
    child: Child,
    pid: u32,
}

impl ChildProcess {
    /// Spawns `argv` (never through a shell) in a new process group, with the
    /// `LLAMA_ARG_*` and `LLAMA_API_KEY` variables removed so they cannot
    /// override the argv; with `key`, the child requires it on every request.
    /// Output lines go to the daemon's log and to `tail`.
    pub fn spawn(
        argv: &[String],
        tail: &OutputTail,
        key: Option<&ChildKey>,
    ) -> io::Result<ChildProcess> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command line"))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for (name, _) in std::env::vars_os() {
            if overrides_argv(&name.to_string_lossy()) {
                command.env_remove(name);
            }
        }
        if let Some(key) = key {
            command.env("LLAMA_API_KEY", &*key.0);
        }
        // The level mark on each line (`W `, `E `, ...) that `line_level`
        // reads. Through the environment, not the argv: a build that does
        // not know the setting ignores a variable but refuses a flag.
        command.env("LLAMA_ARG_LOG_PREFIX", "1");
        set_parent_death_signal(&mut command);
        let mut child = command.spawn()?;
        let pid = child.id().unwrap_or_default();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out, pid, tail.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err, pid, tail.clone()));
        }
        Ok(ChildProcess { child, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the child to exit. Cancel-safe.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// The exit status if the child has already exited.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops the child's process group: SIGTERM (and SIGCONT, so a stopped
    /// child can act on it), then SIGKILL after `grace`. llama-server can hang
    /// on SIGTERM while a request runs, so the SIGKILL is not optional. The
    /// group is never signalled after the child is reaped: its id could
    /// belong to someone else by then.
    pub async fn stop(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        signal_group(self.pid, Signal::SIGTERM);
        signal_group(self.pid, Signal::SIGCONT);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    "llama-server did not exit {grace:?} after SIGTERM; sending SIGKILL"
                );
                signal_group(self.pid, Signal::SIGKILL);
                self.child.wait().await
            }
        }
    }
}

/// llama-server reads most flags from `LLAMA_ARG_*` variables too, and
/// `--api-key` from `LLAMA_API_KEY`; any of them in the daemon's environment
/// would silently change the child the daemon planned.
fn overrides_argv(name: &str) -> bool {
    name.starts_with("LLAMA_ARG_") || name == "LLAMA_API_KEY"
}

fn signal_group(pgid: u32, signal: Signal) {
    if pgid == 0 {
        return;
    }
    // ESRCH (the group is gone) is the expected outcome, not an error.
    let _ = killpg(Pid::from_raw(pgid as i32), signal);
}

#[cfg(target_os = "linux")]
fn set_parent_death_signal(command: &mut Command) {
    if std::env::var_os(NO_PDEATHSIG_ENV).is_some_and(|v| v == "1") {
        return;
    }
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe. The signal fires when
    // the *thread* that forked exits; the supervisor spawns from a tokio
    // worker thread, which lives as long as the runtime, i.e. the daemon.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The daemon may have died between fork and prctl.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(io::Error::other("contextpilotd exited during spawn"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_command: &mut Command) {}

async fn forward_lines(stream: impl AsyncRead + Unpin, pid: u32, tail: OutputTail) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                if line.is_empty() {
                    continue;
                }
                let (level, text) = line_level(&line);
                log_child_line(level, pid, text);
                tail.push(line);
            }
        }
    }
}

/// One of the child's lines in the daemon's log, at its own level.
fn log_child_line(level: Level, pid: u32, text: &str) {
    // tracing's macros need the level at compile time.
    match level {
        Level::ERROR => tracing::error!(target: "llama_server", "llama-server[{pid}]: {text}"),
        Level::WARN => tracing::warn!(target: "llama_server", "llama-server[{pid}]: {text}"),
        Level::DEBUG => tracing::debug!(target: "llama_server", "llama-server[{pid}]: {text}"),
        Level::TRACE => tracing::trace!(target: "llama_server", "llama-server[{pid}]: {text}"),
        _ => tracing::info!(target: "llama_server", "llama-server[{pid}]: {text}"),
    }
}

/// The level of one line llama-server printed, and its text without the
/// marks. With `--log-prefix` (which the child gets through
/// `LLAMA_ARG_LOG_PREFIX`, see [`ChildProcess::spawn`]) llama.cpp's logger
/// starts each line with `I `, `W `, `E ` or `D `, after a `M.ss.mmm.uuu`
/// timestamp when `--log-timestamps` is on, and in colour on a terminal.
/// Lines without a mark (continuations, raw `fprintf`s, an older build) are
/// info unless their text says otherwise: `error:`/`warning:` as llama.cpp's
/// argument and loader messages start, a failed `GGML_ASSERT`, an uncaught
/// C++ exception.
pub fn line_level(line: &str) -> (Level, &str) {
    let plain = skip_colour(line);
    let after_time = skip_timestamp(plain);
    let marked = match after_time.as_bytes() {
        [mark, b' ', ..] => match mark {
            b'I' => Some(Level::INFO),
            b'W' => Some(Level::WARN),
            b'E' => Some(Level::ERROR),
            b'D' => Some(Level::DEBUG),
            _ => None,
        },
        _ => None,
    };
    if let Some(level) = marked {
        // A warning or error resets the colour after its text.
        let text = skip_colour(&after_time[2..]).trim_end_matches("\x1b[0m");
        return (level, text);
    }
    let lower = plain.trim_start().to_ascii_lowercase();
    let level = if lower.starts_with("error")
        || lower.starts_with("fatal")
        || lower.contains("ggml_assert")
        || lower.starts_with("terminate called")
    {
        Level::ERROR
    } else if lower.starts_with("warning") || lower.starts_with("warn:") {
        Level::WARN
    } else {
        Level::INFO
    };
    (level, plain)
}

/// `line` after any leading ANSI colour codes (`ESC [ ... m`).
fn skip_colour(mut line: &str) -> &str {
    while let Some(rest) = line.strip_prefix("\x1b[") {
        match rest.find(|c: char| !(c.is_ascii_digit() || c == ';')) {
            Some(end) if rest[end..].starts_with('m') => line = &rest[end + 1..],
            _ => break,
        }
    }
    line
}

/// `line` after llama.cpp's `M.ss.mmm.uuu ` timestamp (minutes, seconds,
/// milliseconds, microseconds since start) and any colour around it.
fn skip_timestamp(line: &str) -> &str {
    let Some((stamp, rest)) = line.split_once(' ') else {
        return line;
    };
    let stamp = stamp.trim_end_matches("\x1b[0m");
    let parts: Vec<&str> = stamp.split('.').collect();
    let digits = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if parts.len() == 4 && parts.iter().all(digits) {
        skip_colour(rest)
    } else {
        line
    }
}

/// Picks a free loopback port by binding port 0. Another process can take it
/// before the child binds; the child then exits and is restarted on a new one.
pub fn free_loopback_port() -> io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// The daemon's end of the watchdog pipe, shared by every model's
/// supervisor (one watchdog watches every child's group).
#[derive(Clone)]
pub struct Watchdog {
    stdin: Arc<tokio::sync::Mutex<Option<ChildStdin>>>,
    _process: Arc<Child>,
}

impl Watchdog {
    /// Starts `contextpilotd __watchdog` in its own process group, so a
    /// terminal's Ctrl-C reaches the daemon but not the watchdog.
    pub fn start() -> io::Result<Watchdog> {
        let exe = std::env::current_exe()?;
        let mut process = Command::new(exe)
            .arg("__watchdog")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()?;
        let stdin = process.stdin.take();
        Ok(Watchdog {
            stdin: Arc::new(tokio::sync::Mutex::new(stdin)),
            _process: Arc::new(process),
        })
    }

    /// Tells the watchdog to kill process group `pgid` if the daemon dies.
    pub async fn watch(&mut self, pgid: u32) {
        self.send(format!("watch {pgid}\n")).await;
    }

    /// The group is gone; forget it (its id may be reused).
    pub async fn unwatch(&mut self, pgid: u32) {
        self.send(format!("unwatch {pgid}\n")).await;
    }

    async fn send(&mut self, line: String) {
        let mut stdin = self.stdin.lock().await;
        if let Some(pipe) = stdin.as_mut() {
            if let Err(e) = pipe.write_all(line.as_bytes()).await {
                tracing::warn!("watchdog pipe failed: {e}; the child may outlive a crashed daemon");
                *stdin = None;
            }
        }
    }
}

/// The watchdog process: read `watch N` / `unwatch N` lines until EOF, then
/// stop every group still watched. Runs without tokio.
pub fn run_watchdog(input: impl BufRead, grace: Duration) {
    // The daemon's terminal or service manager may signal our group; only
    // EOF on stdin should end us.
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: setting a disposition to SIG_IGN runs no handler code.
        unsafe {
            let _ = nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigIgn);
        }
    }
    let mut groups = BTreeSet::new();
    for line in input.lines() {
        let Ok(line) = line else { break };
        match line.split_once(' ') {
            Some(("watch", n)) => {
                if let Ok(pgid) = n.trim().parse::<u32>() {
                    groups.insert(pgid);
                }
            }
            Some(("unwatch", n)) => {
                if let Ok(pgid) = n.trim().parse::<u32>() {
                    groups.remove(&pgid);
                }
            }
            _ => {}
        }
    }
    for &pgid in &groups {
        signal_group(pgid, Signal::SIGTERM);
        signal_group(pgid, Signal::SIGCONT);
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline && groups.iter().any(|&g| group_exists(g)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pgid in groups.iter().filter(|&&g| group_exists(g)) {
        signal_group(pgid, Signal::SIGKILL);
    }
}

fn group_exists(pgid: u32) -> bool {
    killpg(Pid::from_raw(pgid as i32), None::<Signal>).is_ok()
}

#[cfg(test)]
mod tests {
    use super::line_level;
    use tracing::Level;

    #[test]
    fn marked_lines_get_their_level_and_lose_the_mark() {
        // As llama-server prints with --log-prefix (lines from this build).
        let cases = [
            (
                "I srv  load_model: loading model '/m/SmolLM2.gguf'",
                Level::INFO,
                "srv  load_model: loading model '/m/SmolLM2.gguf'",
            ),
            (
                "W srv  load_model: the slot context (512) exceeds the training context",
                Level::WARN,
                "srv  load_model: the slot context (512) exceeds the training context",
            ),
            (
                "E llama_model_load: error loading model: tensor data is not within bounds",
                Level::ERROR,
                "llama_model_load: error loading model: tensor data is not within bounds",
            ),
            (
                "D slot update_slots: id  0 | task 3 | kv cache rm [96, end)",
                Level::DEBUG,
                "slot update_slots: id  0 | task 3 | kv cache rm [96, end)",
            ),
            // With --log-timestamps.
            (
                "0.00.035.060 W warning: no usable GPU found",
                Level::WARN,
                "warning: no usable GPU found",
            ),
        ];
        for (line, level, text) in cases {
            assert_eq!(line_level(line), (level, text), "{line:?}");
        }
    }

    #[test]
    fn colours_are_taken_off() {
        assert_eq!(
            line_level("\x1b[34m0.01.002.003\x1b[0m \x1b[32mI \x1b[0mmain: model loaded"),
            (Level::INFO, "main: model loaded")
        );
        assert_eq!(
            line_level("\x1b[35mW srv  params: low memory\x1b[0m"),
            (Level::WARN, "srv  params: low memory")
        );
        assert_eq!(
            line_level("\x1b[31mE main: exiting due to model loading error\x1b[0m"),
            (Level::ERROR, "main: exiting due to model loading error")
        );
    }

    #[test]
    fn unmarked_lines_are_info_unless_they_say_error_or_warning() {
        let cases = [
            (
                "main: server is listening on http://127.0.0.1:41234",
                Level::INFO,
            ),
            ("error: unknown argument: --bogus", Level::ERROR),
            ("Error: invalid argument", Level::ERROR),
            ("warning: failed to mlock 1234-byte buffer", Level::WARN),
            (
                "/src/ggml/src/ggml.c:1234: GGML_ASSERT(n_dims <= 4) failed",
                Level::ERROR,
            ),
            (
                "terminate called after throwing an instance of 'std::runtime_error'",
                Level::ERROR,
            ),
            // A request line that merely mentions an error is not one.
            (
                "srv  log_server_r: request: POST /completion 127.0.0.1 500 (error)",
                Level::INFO,
            ),
            // A timestamp-like or mark-like start that is not one.
            ("1.2.3 I not a stamp", Level::INFO),
            ("Info: nothing wrong", Level::INFO),
            ("X something", Level::INFO),
            ("", Level::INFO),
            ("\x1b[", Level::INFO),
            ("\x1b[12", Level::INFO),
        ];
        for (line, level) in cases {
            let (got, text) = line_level(line);
            assert_eq!(got, level, "{line:?}");
            assert!(line.ends_with(text), "{line:?} -> {text:?}");
        }
    }
}
