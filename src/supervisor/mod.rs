//! The supervisor: an actor task that owns the llama-server child.
//!
//! It spawns the child, waits until it is ready (`/health` 200 *and*
//! `/props.model_path` is our model: without `-m` llama-server answers 200 in
//! router mode with no model), polls `/health` to find a hung child, restarts
//! a dead or hung one with exponential backoff and jitter, recognises a crash
//! loop, and stops the child on shutdown. Everyone else sees its state through
//! a `watch` channel ([`SupervisorView`]); nobody else touches the process.

pub mod process;

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{LlamaConfig, SupervisorConfig};
use crate::http_client::HttpClient;
use crate::plan::{self, LaunchPlan};
use process::{ChildProcess, OutputTail, Watchdog};

/// A child that stays ready this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How often readiness is probed while the model loads.
const READY_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The first child is loading its model.
    Starting,
    /// The child answers `/health` and serves the configured model.
    Ready,
    /// The child died or hung and a new one is on its way.
    Restarting,
    /// The child keeps dying; retries continue at the maximum backoff.
    Crashloop,
    /// The daemon is shutting down.
    Stopping,
    /// The model is not loaded; a request naming it loads it.
    Unloaded,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Restarting => "restarting",
            State::Crashloop => "crashloop",
            State::Stopping => "stopping",
            State::Unloaded => "unloaded",
        }
    }
}

/// What the supervisor publishes about the child.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SupervisorView {
    pub state: State,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// RFC 3339 UTC time the current child was spawned.
    pub started_at: Option<String>,
    pub command: Vec<String>,
    /// When the current child was spawned (for `running_s`).
    #[serde(skip)]
    pub spawned: Option<Instant>,
    /// The key the current child requires (never shown in `/status`).
    #[serde(skip)]
    pub key: Option<process::ChildKey>,
}

impl SupervisorView {
    /// The view of a model with no child: not loaded.
    pub fn unloaded() -> SupervisorView {
        SupervisorView {
            state: State::Unloaded,
            pid: None,
            port: None,
            restarts: 0,
            last_exit: None,
            started_at: None,
            command: Vec::new(),
            spawned: None,
            key: None,
        }
    }
}

/// What to run: everything the argv is built from.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub binary: PathBuf,
    pub model: PathBuf,
    pub plan: LaunchPlan,
    pub llama: LlamaConfig,
}

impl LaunchSpec {
    pub fn argv(&self, port: u16) -> Vec<String> {
        plan::command_line(&self.binary, &self.model, port, &self.plan, &self.llama)
    }
}

/// Where the daemon is in its life, as the supervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Run,
    /// Shutting down: the child keeps serving in-flight work, but one that
    /// dies now is not restarted.
    Drain,
    /// Stop the child and end.
    Stop,
}

/// The rest of the daemon's handle on the supervisor task.
pub struct SupervisorHandle {
    pub view: watch::Receiver<SupervisorView>,
    pub tail: OutputTail,
    phase: watch::Sender<Phase>,
    replan: watch::Sender<Option<LaunchPlan>>,
    task: JoinHandle<()>,
}

/// Asks the supervisor to run the child with another plan.
#[derive(Clone)]
pub struct Replanner(watch::Sender<Option<LaunchPlan>>);

impl Replanner {
    /// The current child is stopped and a new one started with `plan` (a
    /// planned restart: no backoff, not counted as a failure). The caller
    /// picks a quiet moment.
    pub fn replan(&self, plan: LaunchPlan) {
        let _ = self.0.send(Some(plan));
    }
}

impl SupervisorHandle {
    pub fn replanner(&self) -> Replanner {
        Replanner(self.replan.clone())
    }

    /// No more restarts: the daemon is shutting down and the current child
    /// only finishes in-flight work.
    pub fn drain(&self) {
        self.phase.send_if_modified(|p| {
            let changed = *p < Phase::Drain;
            *p = (*p).max(Phase::Drain);
            changed
        });
    }

    /// Stops the child (SIGTERM, SIGKILL after the stop timeout) and waits
    /// until it is gone.
    pub async fn shutdown(self) {
        let _ = self.phase.send(Phase::Stop);
        let _ = self.task.await;
    }
}

/// Starts the supervisor task.
pub fn start(
    spec: LaunchSpec,
    cfg: SupervisorConfig,
    watchdog: Option<Watchdog>,
) -> SupervisorHandle {
    let (view_tx, view) = watch::channel(SupervisorView {
        state: State::Starting,
        pid: None,
        port: None,
        restarts: 0,
        last_exit: None,
        started_at: None,
        command: spec.argv(spec.llama.port),
        spawned: None,
        key: None,
    });
    let (phase, phase_rx) = watch::channel(Phase::Run);
    let (replan, replan_rx) = watch::channel(None);
    let tail = OutputTail::default();
    let supervisor = Supervisor {
        replan: replan_rx,
        spec,
        cfg,
        view: view_tx,
        tail: tail.clone(),
        phase: phase_rx,
        watchdog,
        http: HttpClient::new(),
    };
    let task = tokio::spawn(supervisor.run());
    SupervisorHandle {
        view,
        tail,
        phase,
        replan,
        task,
    }
}

struct Supervisor {
    spec: LaunchSpec,
    cfg: SupervisorConfig,
    view: watch::Sender<SupervisorView>,
    tail: OutputTail,
    phase: watch::Receiver<Phase>,
    /// A new plan to run the child with (see [`Replanner`]).
    replan: watch::Receiver<Option<LaunchPlan>>,
    watchdog: Option<Watchdog>,
    http: HttpClient,
}

/// How one child's life ended.
enum Outcome {
    Exited(ExitStatus),
    /// Killed by us; the string says why.
    Killed(String),
    /// Stopped by us to start again with the plan asked for.
    Replanned,
    Shutdown,
}

impl Supervisor {
    async fn run(mut self) {
        let mut recent_restarts: VecDeque<Instant> = VecDeque::new();
        let mut failures: u32 = 0;
        loop {
            let port = match self.spec.llama.port {
                0 => process::free_loopback_port().unwrap_or(0),
                p => p,
            };
            // Every child runs the latest plan asked for, also one asked for
            // while the previous child was going away.
            if let Some(plan) = self.replan.borrow_and_update().clone() {
                self.spec.plan = plan;
            }
            let argv = self.spec.argv(port);
            self.tail.push(format!(
                "--- contextpilotd: starting {}",
                plan::shell_quote(&argv)
            ));
            let key = match self.spec.llama.child_key {
                true => process::ChildKey::generate().map(Some),
                false => Ok(None),
            };
            let spawned = key.and_then(|key| {
                let child = ChildProcess::spawn(&argv, &self.tail, key.as_ref())?;
                Ok((child, key))
            });
            let (outcome, ready_for) = match spawned {
                Ok((mut child, key)) => {
                    let pid = child.pid();
                    tracing::info!(pid, port, "llama-server started");
                    self.view.send_modify(|v| {
                        v.pid = Some(pid);
                        v.port = Some(port);
                        v.started_at = Some(rfc3339_utc(SystemTime::now()));
                        v.spawned = Some(Instant::now());
                        v.command = argv.clone();
                        v.key = key.clone();
                    });
                    if let Some(w) = self.watchdog.as_mut() {
                        w.watch(pid).await;
                    }
                    let result = self.watch_child(&mut child, port, key.as_ref()).await;
                    if let Some(w) = self.watchdog.as_mut() {
                        w.unwatch(pid).await;
                    }
                    result
                }
                Err(e) => (
                    Outcome::Killed(format!("could not start {}: {e}", argv[0])),
                    None,
                ),
            };

            let last_exit = match outcome {
                Outcome::Replanned => {
                    tracing::info!("starting llama-server again with the measured plan");
                    self.tail.push(
                        "--- contextpilotd: restarting llama-server with the measured plan".into(),
                    );
                    self.view.send_modify(|v| {
                        v.state = State::Restarting;
                        v.pid = None;
                        v.spawned = None;
                        v.key = None;
                    });
                    continue;
                }
                Outcome::Shutdown => {
                    return self.view.send_modify(|v| {
                        v.state = State::Stopping;
                        v.pid = None;
                        v.spawned = None;
                        v.key = None;
                    })
                }
                Outcome::Exited(status) => describe_exit(status),
                Outcome::Killed(why) => why,
            };
            tracing::warn!("llama-server ended: {last_exit}");
            self.tail.push(format!(
                "--- contextpilotd: llama-server ended: {last_exit}"
            ));

            if *self.phase.borrow() >= Phase::Drain {
                // Shutting down: a child that ends now is not replaced.
                return self.view.send_modify(|v| {
                    v.state = State::Stopping;
                    v.pid = None;
                    v.spawned = None;
                    v.key = None;
                    v.last_exit = Some(last_exit);
                });
            }
            if ready_for.is_some_and(|d| d >= STABLE_AFTER) {
                failures = 0;
                recent_restarts.clear();
            }
            let now = Instant::now();
            recent_restarts.push_back(now);
            let window = Duration::from_secs(self.cfg.crashloop_window_s);
            while recent_restarts
                .front()
                .is_some_and(|t| now.duration_since(*t) > window)
            {
                recent_restarts.pop_front();
            }
            let crashloop = recent_restarts.len() > self.cfg.crashloop_restarts as usize;
            let delay = if crashloop {
                Duration::from_millis(self.cfg.restart_backoff_max_ms)
            } else {
                backoff_delay(
                    self.cfg.restart_backoff_initial_ms,
                    self.cfg.restart_backoff_max_ms,
                    failures,
                    random_unit(),
                )
            };
            failures = failures.saturating_add(1);
            let state = if crashloop {
                State::Crashloop
            } else {
                State::Restarting
            };
            if crashloop {
                tracing::error!(
                    "llama-server restarted {} times within {}s: crash loop; retrying every {delay:?}",
                    recent_restarts.len(),
                    self.cfg.crashloop_window_s
                );
            }
            self.view.send_modify(|v| {
                v.state = state;
                v.pid = None;
                v.spawned = None;
                v.key = None;
                v.restarts += 1;
                v.last_exit = Some(last_exit);
            });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.phase.wait_for(|p| *p >= Phase::Drain) => {
                    return self.view.send_modify(|v| v.state = State::Stopping);
                }
            }
        }
    }

    /// Follows one child from spawn to its end. Returns how it ended and how
    /// long it was ready.
    async fn watch_child(
        &mut self,
        child: &mut ChildProcess,
        port: u16,
        key: Option<&process::ChildKey>,
    ) -> (Outcome, Option<Duration>) {
        let bearer = key.map(process::ChildKey::bearer);
        let auth: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("authorization", b.as_str()))
            .collect();
        let stop_grace = Duration::from_secs(self.cfg.stop_timeout_s);
        let health_interval = Duration::from_millis(self.cfg.health_interval_ms);
        let hang_timeout = Duration::from_secs(self.cfg.hang_timeout_s);
        let ready_deadline = Instant::now() + Duration::from_secs(self.cfg.ready_timeout_s);
        let base = format!("http://127.0.0.1:{port}");
        let mut ready_at: Option<Instant> = None;
        let mut last_ok = Instant::now();
        let mut phase = self.phase.clone();
        let mut replan = self.replan.clone();

        loop {
            let (pause, probe_timeout) = match ready_at {
                None => (READY_POLL, Duration::from_secs(2)),
                Some(_) => (
                    health_interval,
                    health_interval.max(Duration::from_millis(500)),
                ),
            };
            let probe = async {
                tokio::time::sleep(pause).await;
                match ready_at {
                    None => self.probe_ready(&base, &auth, probe_timeout).await,
                    Some(_) => self.probe_health(&base, &auth, probe_timeout).await,
                }
            };
            // Biased: an exit that coincides with a failed probe is an exit,
            // not a hang.
            let ok = tokio::select! {
                biased;
                status = child.wait() => {
                    let ready_for = ready_at.map(|t| t.elapsed());
                    return match status {
                        Ok(status) => (Outcome::Exited(status), ready_for),
                        Err(e) => (Outcome::Killed(format!("lost track of the child: {e}")), ready_for),
                    };
                }
                _ = stop_requested(&mut phase) => {
                    self.view.send_modify(|v| v.state = State::Stopping);
                    tracing::info!(pid = child.pid(), "stopping llama-server");
                    match child.stop(stop_grace).await {
                        Ok(status) => tracing::info!("llama-server stopped: {}", describe_exit(status)),
                        Err(e) => tracing::warn!("stopping llama-server: {e}"),
                    }
                    return (Outcome::Shutdown, ready_at.map(|t| t.elapsed()));
                }
                Ok(()) = replan.changed(), if ready_at.is_some() => {
                    let asked = replan.borrow_and_update().clone();
                    if asked.is_none_or(|plan| plan == self.spec.plan) {
                        continue;
                    }
                    tracing::info!(pid = child.pid(), "stopping llama-server for a new plan");
                    if let Err(e) = child.stop(stop_grace).await {
                        tracing::warn!("stopping llama-server: {e}");
                    }
                    return (Outcome::Replanned, ready_at.map(|t| t.elapsed()));
                }
                ok = probe => ok,
            };

            let now = Instant::now();
            match ready_at {
                None if ok => {
                    ready_at = Some(now);
                    last_ok = now;
                    tracing::info!(pid = child.pid(), port, "llama-server is ready");
                    self.view.send_modify(|v| v.state = State::Ready);
                }
                None if now >= ready_deadline => {
                    if let Some(status) = child.try_exited() {
                        return (Outcome::Exited(status), None);
                    }
                    let why = format!(
                        "not ready within ready_timeout_s ({}s); killed",
                        self.cfg.ready_timeout_s
                    );
                    let _ = child.stop(stop_grace).await;
                    return (Outcome::Killed(why), None);
                }
                None => {}
                Some(_) if ok => last_ok = now,
                Some(ready) if now.duration_since(last_ok) >= hang_timeout => {
                    if let Some(status) = child.try_exited() {
                        return (Outcome::Exited(status), Some(now.duration_since(ready)));
                    }
                    let why = format!(
                        "hung: /health did not answer for {}s (hang_timeout_s); killed",
                        now.duration_since(last_ok).as_secs()
                    );
                    tracing::warn!(pid = child.pid(), "{why}");
                    let _ = child.stop(stop_grace).await;
                    return (Outcome::Killed(why), Some(now.duration_since(ready)));
                }
                Some(_) => {}
            }
        }
    }

    /// `auth`: the child's key, as the headers to send (none for an open child).
    async fn probe_health(&self, base: &str, auth: &[(&str, &str)], timeout: Duration) -> bool {
        let url = format!("{base}/health");
        let answer = self.http.get_with_headers(&url, auth, timeout).await;
        matches!(answer, Ok((s, _)) if s.is_success())
    }

    /// Ready means `/health` 200 and `/props.model_path` naming our model.
    async fn probe_ready(&self, base: &str, auth: &[(&str, &str)], timeout: Duration) -> bool {
        if !self.probe_health(base, auth, timeout).await {
            return false;
        }
        let props = format!("{base}/props");
        let answer = self.http.get_with_headers(&props, auth, timeout).await;
        let Ok((status, body)) = answer else {
            return false;
        };
        if !status.is_success() {
            return false;
        }
        let model_path = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("model_path")
                    .and_then(|p| p.as_str())
                    .map(str::to_string)
            });
        match model_path {
            Some(path) if same_file(Path::new(&path), &self.spec.model) => true,
            other => {
                tracing::warn!(
                    "llama-server answers /health but serves {:?}, not {}",
                    other.as_deref().unwrap_or("no model"),
                    self.spec.model.display()
                );
                false
            }
        }
    }
}

/// Resolves once the child is to be stopped (or the daemon's handle is
/// gone).
async fn stop_requested(phase: &mut watch::Receiver<Phase>) {
    let _ = phase.wait_for(|p| *p == Phase::Stop).await;
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b
        || match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
}

/// "exit code 1", "killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    match status.signal() {
        Some(sig) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(name) => format!("killed by signal {sig} ({name})"),
            Err(_) => format!("killed by signal {sig}"),
        },
        None => "ended".to_string(),
    }
}

/// Exponential backoff: `initial × 2^failures`, capped at `max`, then scaled
/// by a jitter factor in [0.8, 1.2) (from `unit` in [0, 1)) and capped again,
/// so restarts of several daemons do not line up.
pub fn backoff_delay(initial_ms: u64, max_ms: u64, failures: u32, unit: f64) -> Duration {
    let exp = initial_ms.saturating_mul(1u64.checked_shl(failures.min(32)).unwrap_or(u64::MAX));
    let base = exp.min(max_ms) as f64;
    let jittered = base * (0.8 + 0.4 * unit.clamp(0.0, 1.0));
    Duration::from_millis((jittered as u64).clamp(1, max_ms))
}

/// A number in [0, 1) from the process's randomly keyed hasher: enough for
/// jitter without a random-number crate.
fn random_unit() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Formats a time as RFC 3339 in UTC, e.g. "2026-11-22T01:29:03Z".
pub fn rfc3339_utc(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        assert_eq!(
            backoff_delay(500, 30_000, 0, 0.5),
            Duration::from_millis(500)
        );
        assert_eq!(
            backoff_delay(500, 30_000, 1, 0.5),
            Duration::from_millis(1000)
        );
        assert_eq!(
            backoff_delay(500, 30_000, 3, 0.5),
            Duration::from_millis(4000)
        );
        assert_eq!(
            backoff_delay(500, 30_000, 20, 0.5),
            Duration::from_millis(30_000)
        );
        assert_eq!(
            backoff_delay(500, 30_000, 200, 0.5),
            Duration::from_millis(30_000)
        );
        assert_eq!(
            backoff_delay(500, 30_000, 0, 0.0),
            Duration::from_millis(400)
        );
        assert_eq!(
            backoff_delay(500, 30_000, 0, 0.999),
            Duration::from_millis(599)
        );
        // Jitter never goes past the maximum.
        assert_eq!(
            backoff_delay(500, 30_000, 10, 0.999),
            Duration::from_millis(30_000)
        );
    }

    #[test]
    fn random_unit_is_in_range_and_varies() {
        let draws: Vec<f64> = (0..64).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(draws.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_utc(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_311_743);
        assert_eq!(rfc3339_utc(t), "2026-11-22T01:42:23Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_utc(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn exits_are_described() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            describe_exit(ExitStatus::from_raw(1 << 8)),
            "exited with code 1"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL)"
        );
    }
}
