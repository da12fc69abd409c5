//! Running contextpilotd as a login service: a launchd LaunchAgent on macOS,
//! a systemd user unit on Linux.
//!
//! The unit files ([`launchd::plist`], [`systemd::unit`]) and every
//! service-manager command line are built by pure functions, for either
//! platform on any platform; [`Step`]s say what a command does, in order,
//! and [`run_steps`] carries them out (or prints them, for `--dry-run`).
//! Service-manager programs run only through `std::process::Command` with an
//! argv, never a shell.

pub mod launchd;
pub mod systemd;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::Serialize;

/// Replaces `launchctl` (the program name or a path), for tests and unusual
/// installs.
pub const LAUNCHCTL_ENV: &str = "CONTEXTPILOTD_LAUNCHCTL";
/// Replaces `systemctl`, likewise.
pub const SYSTEMCTL_ENV: &str = "CONTEXTPILOTD_SYSTEMCTL";

/// How long `status` waits for the service manager.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Platform {
    /// launchd (macOS).
    Macos,
    /// systemd --user (Linux).
    Linux,
}

impl Platform {
    pub fn current() -> Platform {
        if cfg!(target_os = "macos") {
            Platform::Macos
        } else {
            Platform::Linux
        }
    }

    pub fn manager(self) -> &'static str {
        match self {
            Platform::Macos => "launchd",
            Platform::Linux => "systemd",
        }
    }

    /// The program that talks to the service manager, `$CONTEXTPILOTD_LAUNCHCTL`
    /// or `$CONTEXTPILOTD_SYSTEMCTL` when set.
    pub fn program(self) -> String {
        let (var, default) = match self {
            Platform::Macos => (LAUNCHCTL_ENV, "launchctl"),
            Platform::Linux => (SYSTEMCTL_ENV, "systemctl"),
        };
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_string())
    }

    /// Where a person reads the service's output. Under launchd, stderr
    /// (`StandardErrorPath`) has what stopped a start and panics; the log
    /// lines are in the daemon's own file, in that directory unless
    /// `[log] dir` moves it.
    pub fn logs_hint(self, home: &Path) -> String {
        match self {
            Platform::Macos => format!(
                "{} and {}",
                launchd::log_dir(home).join(launchd::ERR_LOG).display(),
                crate::config::LOG_FILE
            ),
            Platform::Linux => "journalctl --user -u contextpilotd".to_string(),
        }
    }
}

/// What a unit file needs to know. All paths absolute and UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSpec {
    pub binary: String,
    pub config: String,
    pub home: String,
}

impl UnitSpec {
    /// Checks that the paths can go into a unit file as they are: absolute
    /// (launchd expands neither `~` nor `$HOME`), UTF-8, no control characters.
    pub fn new(binary: &Path, config: &Path, home: &Path) -> Result<UnitSpec, ServiceError> {
        let check = |what: &str, path: &Path| -> Result<String, ServiceError> {
            let text = path.to_str().ok_or_else(|| {
                ServiceError::Usage(format!("{what} {} is not UTF-8", path.display()))
            })?;
            if !path.is_absolute() {
                return Err(ServiceError::Usage(format!(
                    "{what} {text} is not an absolute path"
                )));
            }
            if text.chars().any(char::is_control) {
                return Err(ServiceError::Usage(format!(
                    "{what} {text:?} contains a control character"
                )));
            }
            Ok(text.to_string())
        };
        Ok(UnitSpec {
            binary: check("the binary", binary)?,
            config: check("the configuration file", config)?,
            home: check("the home directory", home)?,
        })
    }

    /// The daemon's argv, as both service managers run it.
    pub fn program_arguments(&self) -> Vec<String> {
        vec![
            self.binary.clone(),
            "run".to_string(),
            "--config".to_string(),
            self.config.clone(),
        ]
    }
}

/// What the service manager says about the unit; `None` is "not said".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServiceState {
    pub loaded: Option<bool>,
    pub enabled: Option<bool>,
    /// launchd's `state`, or systemd's `ActiveState (SubState)`.
    pub state: Option<String>,
    pub pid: Option<u32>,
    pub last_exit: Option<String>,
}

impl ServiceState {
    pub fn is_running(&self) -> bool {
        self.pid.is_some()
            || matches!(self.state.as_deref(), Some(s) if s == "running" || s.starts_with("active"))
    }
}

/// The `service` object of `status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceReport {
    /// "launchd" or "systemd".
    pub manager: String,
    pub unit_path: String,
    /// The unit file exists.
    pub installed: bool,
    /// What the service manager said; `None` when it could not be asked.
    pub manager_state: Option<ServiceState>,
    /// Why the service manager could not be asked.
    pub unknown_reason: Option<String>,
    /// The service is Homebrew's (`brew services`, label
    /// `homebrew.mxcl.contextpilotd`), not the one `service install` writes.
    #[serde(default)]
    pub homebrew: bool,
}

impl ServiceReport {
    /// Installed, or known to the service manager.
    fn present(&self) -> bool {
        self.installed
            || self
                .manager_state
                .as_ref()
                .is_some_and(|s| s.loaded == Some(true))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Bad usage or environment: exit code 2.
    #[error("{0}")]
    Usage(String),
    /// A file could not be written or removed, or the service manager
    /// refused: exit code 1.
    #[error("{0}")]
    Failed(String),
}

/// The unit file's path for `platform` under `home`.
pub fn unit_path(platform: Platform, home: &Path, xdg_config_home: Option<&Path>) -> PathBuf {
    match platform {
        Platform::Macos => launchd::plist_path(home),
        Platform::Linux => systemd::unit_path(home, xdg_config_home),
    }
}

/// The unit file's text for `platform`.
pub fn unit_text(platform: Platform, spec: &UnitSpec) -> String {
    match platform {
        Platform::Macos => launchd::plist_xml(spec),
        Platform::Linux => systemd::unit(spec),
    }
}

/// One thing a service command does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create the file's directory and write it.
    Write { path: PathBuf, text: String },
    /// Create a directory the service manager needs but will not create.
    CreateDir(PathBuf),
    /// Remove the file if it exists.
    Remove(PathBuf),
    /// Remove the directory if it is empty (one `install` created).
    RemoveIfEmpty(PathBuf),
    /// Run an argv; a failure stops the command.
    Run(Vec<String>),
    /// Run an argv; "not loaded" is fine (stopping what is not running),
    /// and another failure is reported at the end without stopping the
    /// steps after it (uninstall still removes the file).
    RunAllowNotLoaded(Vec<String>),
    /// `launchctl bootstrap`, which on EIO is retried once after a fresh
    /// `bootout` (`retry_after`).
    Bootstrap {
        argv: Vec<String>,
        retry_after: Vec<String>,
    },
}

/// The service commands, named as on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Install,
    Uninstall,
    Start,
    Stop,
    Restart,
}

/// Everything the steps are built from.
pub struct Context<'a> {
    pub platform: Platform,
    pub program: &'a str,
    pub uid: u32,
    pub unit_path: &'a Path,
    pub home: &'a Path,
    /// Only `install` needs it.
    pub spec: Option<&'a UnitSpec>,
}

/// The steps of `action`, in order. Pure: `--dry-run` prints exactly these.
pub fn steps(action: Action, cx: &Context<'_>) -> Vec<Step> {
    let p = cx.program;
    let bootstrap = || Step::Bootstrap {
        argv: launchd::bootstrap_command(p, cx.uid, cx.unit_path),
        retry_after: launchd::bootout_command(p, cx.uid),
    };
    match (cx.platform, action) {
        (Platform::Macos, Action::Install) => {
            let mut steps = write_step(cx);
            // launchd opens StandardOutPath but does not create its directory.
            steps.push(Step::CreateDir(launchd::log_dir(cx.home)));
            steps.push(Step::Run(launchd::enable_command(p, cx.uid)));
            steps.push(bootstrap());
            steps
        }
        (Platform::Linux, Action::Install) => {
            let mut steps = write_step(cx);
            steps.extend(systemd::install_commands(p).into_iter().map(Step::Run));
            steps
        }
        (Platform::Macos, Action::Uninstall) => vec![
            Step::RunAllowNotLoaded(launchd::bootout_command(p, cx.uid)),
            Step::Remove(cx.unit_path.to_path_buf()),
        ],
        (Platform::Linux, Action::Uninstall) => {
            let mut steps: Vec<Step> = systemd::uninstall_commands(p)
                .into_iter()
                .map(Step::RunAllowNotLoaded)
                .collect();
            steps.push(Step::Remove(cx.unit_path.to_path_buf()));
            // `systemd/user/` and `systemd/`, left as they were before install.
            steps.extend(
                cx.unit_path
                    .ancestors()
                    .skip(1)
                    .take(2)
                    .map(|dir| Step::RemoveIfEmpty(dir.to_path_buf())),
            );
            steps.extend(
                systemd::after_uninstall_commands(p)
                    .into_iter()
                    .map(Step::RunAllowNotLoaded),
            );
            steps
        }
        (Platform::Macos, Action::Start) => vec![bootstrap()],
        (Platform::Linux, Action::Start) => vec![Step::Run(systemd::start_command(p))],
        (Platform::Macos, Action::Stop) => {
            vec![Step::RunAllowNotLoaded(launchd::bootout_command(p, cx.uid))]
        }
        (Platform::Linux, Action::Stop) => vec![Step::Run(systemd::stop_command(p))],
        (Platform::Macos, Action::Restart) => {
            vec![Step::Run(launchd::kickstart_command(p, cx.uid, true))]
        }
        (Platform::Linux, Action::Restart) => vec![Step::Run(systemd::restart_command(p))],
    }
}

fn write_step(cx: &Context<'_>) -> Vec<Step> {
    match cx.spec {
        Some(spec) => vec![Step::Write {
            path: cx.unit_path.to_path_buf(),
            text: unit_text(cx.platform, spec),
        }],
        None => Vec::new(),
    }
}

/// The steps as a person would type them (`--dry-run`).
pub fn describe(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Write { path, text } => {
                out.push_str(&format!("# write {}\n", path.display()));
                out.push_str(text);
                if !text.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str(&format!("# end of {}\n", path.display()));
            }
            Step::CreateDir(dir) => out.push_str(&format!("mkdir -p {}\n", quote(dir))),
            Step::Remove(path) => out.push_str(&format!("rm -f {}\n", quote(path))),
            Step::RemoveIfEmpty(dir) => {
                out.push_str(&format!("rmdir {}  # only if empty\n", quote(dir)))
            }
            Step::Run(argv) => out.push_str(&format!("{}\n", shell_line(argv))),
            Step::RunAllowNotLoaded(argv) => {
                out.push_str(&format!("{}  # not loaded is fine\n", shell_line(argv)))
            }
            Step::Bootstrap { argv, retry_after } => {
                out.push_str(&format!("{}\n", shell_line(argv)));
                out.push_str(&format!(
                    "# on \"Bootstrap failed: 5: Input/output error\", once: {}; {}\n",
                    shell_line(retry_after),
                    shell_line(argv)
                ));
            }
        }
    }
    out
}

fn quote(path: &Path) -> String {
    shell_line(&[path.to_string_lossy().into_owned()])
}

/// `argv` as a POSIX shell would read it back; words of plain characters
/// stay bare so the line reads like what a person types.
pub fn shell_line(argv: &[String]) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    argv.iter()
        .map(|a| {
            if !a.is_empty() && a.chars().all(plain) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What one program run gave.
#[derive(Debug)]
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `argv` without a shell. `None` timeout waits as long as it takes.
pub fn run_argv(argv: &[String], timeout: Option<Duration>) -> Result<Ran, String> {
    let (program, args) = argv.split_first().ok_or("empty command line")?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let pid = child.id();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (sender, receiver) = mpsc::channel();
    // The wait happens on its own thread so that a hung service manager can
    // be abandoned (and killed) after the timeout.
    std::thread::spawn(move || {
        let mut err = String::new();
        let err_reader = stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        });
        let mut out = String::new();
        if let Some(pipe) = stdout.as_mut() {
            let _ = pipe.read_to_string(&mut out);
        }
        if let Some(reader) = err_reader {
            err = reader.join().unwrap_or_default();
        }
        let status = child.wait();
        let _ = sender.send(status.map(|s| Ran {
            code: s.code(),
            stdout: out,
            stderr: err,
        }));
    });
    let received = match timeout {
        Some(t) => receiver.recv_timeout(t).map_err(|_| ()),
        None => receiver.recv().map_err(|_| ()),
    };
    match received {
        Ok(Ok(ran)) => Ok(ran),
        Ok(Err(e)) => Err(format!("{program}: {e}")),
        Err(()) => {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(format!("{program} did not answer within {timeout:?}"))
        }
    }
}

/// Carries out `steps`, saying what it does on stdout. Stops at the first
/// failure, except for [`Step::RunAllowNotLoaded`].
pub fn run_steps(steps: &[Step]) -> Result<(), ServiceError> {
    let mut deferred = None;
    for step in steps {
        match step {
            Step::Write { path, text } => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        ServiceError::Failed(format!("cannot create {}: {e}", dir.display()))
                    })?;
                }
                std::fs::write(path, text).map_err(|e| {
                    ServiceError::Failed(format!("cannot write {}: {e}", path.display()))
                })?;
                println!("wrote {}", path.display());
            }
            Step::CreateDir(dir) => std::fs::create_dir_all(dir).map_err(|e| {
                ServiceError::Failed(format!("cannot create {}: {e}", dir.display()))
            })?,
            Step::Remove(path) => match std::fs::remove_file(path) {
                Ok(()) => println!("removed {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ServiceError::Failed(format!(
                        "cannot remove {}: {e}",
                        path.display()
                    )))
                }
            },
            Step::RemoveIfEmpty(dir) => {
                // Not empty or already gone: either way nothing to do.
                let _ = std::fs::remove_dir(dir);
            }
            Step::Run(argv) => {
                let ran = run_checked(argv)?;
                if ran.code != Some(0) {
                    return Err(command_failed(argv, &ran));
                }
            }
            Step::RunAllowNotLoaded(argv) => {
                let ran = run_checked(argv)?;
                if ran.code != Some(0) && !is_not_loaded(&ran) {
                    deferred.get_or_insert(command_failed(argv, &ran));
                }
            }
            Step::Bootstrap { argv, retry_after } => {
                let ran = run_checked(argv)?;
                if ran.code == Some(0) {
                    continue;
                }
                if !launchd::is_bootstrap_eio(ran.code, &ran.stderr) {
                    return Err(command_failed(argv, &ran));
                }
                run_checked(retry_after)?;
                let again = run_checked(argv)?;
                if again.code != Some(0) {
                    return Err(command_failed(argv, &again));
                }
            }
        }
    }
    deferred.map_or(Ok(()), Err)
}

fn run_checked(argv: &[String]) -> Result<Ran, ServiceError> {
    println!("$ {}", shell_line(argv));
    run_argv(argv, None).map_err(ServiceError::Failed)
}

/// launchctl's "not loaded", or systemctl's "Unit file … does not exist" /
/// "Unit … not loaded".
fn is_not_loaded(ran: &Ran) -> bool {
    launchd::is_not_loaded(ran.code, &ran.stderr)
        || ran.stderr.contains("not loaded")
        || ran.stderr.contains("does not exist")
}

fn command_failed(argv: &[String], ran: &Ran) -> ServiceError {
    let code = ran
        .code
        .map_or("a signal".to_string(), |c| format!("exit code {c}"));
    let said = ran.stderr.trim();
    let said = if said.is_empty() {
        ran.stdout.trim()
    } else {
        said
    };
    ServiceError::Failed(format!("`{}` failed with {code}: {said}", shell_line(argv)))
}

/// Asks the service manager about the unit, within [`QUERY_TIMEOUT`]. Never
/// fails: a missing or silent manager makes the state unknown.
pub fn query(platform: Platform, uid: u32, unit_path: &Path) -> ServiceReport {
    let program = platform.program();
    let argv = match platform {
        Platform::Macos => launchd::print_command(&program, uid),
        Platform::Linux => systemd::show_command(&program),
    };
    let (manager_state, unknown_reason) = match run_argv(&argv, Some(QUERY_TIMEOUT)) {
        Ok(ran) => interpret_query(platform, &ran),
        Err(e) => (None, Some(e)),
    };
    ServiceReport {
        manager: platform.manager().to_string(),
        unit_path: unit_path.display().to_string(),
        installed: unit_path.is_file(),
        manager_state,
        unknown_reason,
        homebrew: false,
    }
}

/// Asks launchd about Homebrew's agent for the formula
/// (`launchctl print gui/<uid>/homebrew.mxcl.contextpilotd`).
pub fn query_homebrew(uid: u32, home: &Path) -> ServiceReport {
    let platform = Platform::Macos;
    let argv = launchd::print_label_command(&platform.program(), uid, launchd::HOMEBREW_LABEL);
    let (manager_state, unknown_reason) = match run_argv(&argv, Some(QUERY_TIMEOUT)) {
        Ok(ran) => interpret_query(platform, &ran),
        Err(e) => (None, Some(e)),
    };
    let plist = launchd::homebrew_plist_path(home);
    ServiceReport {
        manager: platform.manager().to_string(),
        unit_path: plist.display().to_string(),
        installed: plist.is_file(),
        manager_state,
        unknown_reason,
        homebrew: true,
    }
}

/// The service to report on: Homebrew's when it is there (so `status` never
/// advises installing a second LaunchAgent beside it), else our own.
pub fn prefer_homebrew(ours: ServiceReport, homebrew: ServiceReport) -> ServiceReport {
    if homebrew.present() && !ours.present() {
        homebrew
    } else {
        ours
    }
}

/// Turns the query's output into a state, or the reason there is none.
pub fn interpret_query(platform: Platform, ran: &Ran) -> (Option<ServiceState>, Option<String>) {
    match platform {
        Platform::Macos if ran.code == Some(0) => (Some(launchd::parse_print(&ran.stdout)), None),
        Platform::Macos if launchd::is_not_loaded(ran.code, &ran.stderr) => (
            Some(ServiceState {
                loaded: Some(false),
                ..ServiceState::default()
            }),
            None,
        ),
        Platform::Linux if ran.code == Some(0) => (Some(systemd::parse_show(&ran.stdout)), None),
        _ => {
            let said = ran.stderr.trim();
            (
                None,
                Some(said.lines().next().unwrap_or("no answer").to_string()),
            )
        }
    }
}

/// The next thing a person should do, when something is off. `daemon_answers`
/// is whether `/status` answered.
pub fn next_step(report: &ServiceReport, daemon_answers: bool, logs_hint: &str) -> Option<String> {
    if report.homebrew {
        return homebrew_next_step(report, daemon_answers);
    }
    if !report.installed {
        return (!daemon_answers)
            .then(|| "not installed as a service: contextpilotd service install".to_string());
    }
    if daemon_answers {
        return None;
    }
    match &report.manager_state {
        Some(state) if state.is_running() => Some(format!(
            "the service is running{} but not answering yet: it may still be starting; see {logs_hint}",
            state.pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        )),
        Some(state) if state.loaded == Some(false) => Some(format!(
            "installed but not loaded: contextpilotd service start; see {logs_hint}"
        )),
        _ => Some(format!("installed but not running: see {logs_hint}")),
    }
}

/// [`next_step`] for Homebrew's service: `brew services`, never `service
/// install` (that would be a second agent running the same daemon).
fn homebrew_next_step(report: &ServiceReport, daemon_answers: bool) -> Option<String> {
    if daemon_answers {
        return None;
    }
    let logs = launchd::HOMEBREW_LOGS;
    match &report.manager_state {
        Some(state) if state.is_running() => Some(format!(
            "the Homebrew service is running{} but not answering yet: it may still be starting; see {logs}",
            state.pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        )),
        Some(state) if state.loaded == Some(false) => Some(format!(
            "installed with Homebrew but not loaded: brew services start contextpilotd; see {logs}"
        )),
        _ => Some(format!(
            "installed with Homebrew but not running: brew services restart contextpilotd; see {logs}"
        )),
    }
}

/// One line for people: what the service manager says.
pub fn describe_report(report: &ServiceReport) -> String {
    if report.homebrew {
        let state = report.manager_state.clone().unwrap_or_default();
        let head = format!(
            "Homebrew's {} ({})",
            launchd::HOMEBREW_LABEL,
            report.unit_path
        );
        return with_state(head, &state);
    }
    if !report.installed {
        return format!("not installed ({} does not exist)", report.unit_path);
    }
    let Some(state) = &report.manager_state else {
        return format!(
            "installed ({}); {} unknown: {}",
            report.unit_path,
            report.manager,
            report.unknown_reason.as_deref().unwrap_or("no answer")
        );
    };
    with_state(format!("{} {}", report.manager, report.unit_path), state)
}

/// `head`, then what the manager says of the service: loaded or its state,
/// pid, last exit.
fn with_state(head: String, state: &ServiceState) -> String {
    let mut parts = vec![head];
    match (state.loaded, &state.state) {
        (Some(false), _) => parts.push("not loaded".to_string()),
        (_, Some(s)) => parts.push(s.clone()),
        _ => {}
    }
    if let Some(pid) = state.pid {
        parts.push(format!("pid {pid}"));
    }
    if let Some(exit) = &state.last_exit {
        parts.push(format!("last exit {exit}"));
    }
    parts.join(", ")
}

/// What `install`, and its dry run alike, warns about before it writes the
/// unit: a configuration file that is not there yet (the service would exit
/// with code 2 at every start), and a binary inside a cargo build directory
/// (the next `cargo build`, `cargo clean` or checkout replaces or removes
/// the program the service runs).
pub fn install_warnings(spec: &UnitSpec, config_exists: bool) -> Vec<String> {
    let mut warnings = Vec::new();
    if !config_exists {
        warnings.push(format!(
            "{} does not exist yet; the service exits with code 2 until it does \
             (it needs at least `[llama] model = \"/path/to/model.gguf\"`)",
            spec.config
        ));
    }
    if in_cargo_target(Path::new(&spec.binary)) {
        warnings.push(format!(
            "the service would run {}, a build output under target/ that the next cargo build or \
             cargo clean replaces or removes; install the program first (cargo install --path . , \
             or copy it to ~/.local/bin) and run `service install` from there",
            spec.binary
        ));
    }
    warnings
}

/// True for `…/target/{debug,release}/…` and `…/target/<triple>/{debug,release}/…`.
fn in_cargo_target(binary: &Path) -> bool {
    let parts: Vec<&std::ffi::OsStr> = binary
        .parent()
        .map(|dir| dir.iter().collect())
        .unwrap_or_default();
    let profile = |p: &std::ffi::OsStr| p == "debug" || p == "release";
    parts.windows(2).any(|w| w[0] == "target" && profile(w[1]))
        || parts.windows(3).any(|w| w[0] == "target" && profile(w[2]))
}

#[cfg(test)]
mod install_warning_tests {
    use super::*;

    fn spec(binary: &str) -> UnitSpec {
        UnitSpec {
            binary: binary.into(),
            config: "/home/u/.config/contextpilotd/config.toml".into(),
            home: "/home/u".into(),
        }
    }

    #[test]
    fn a_missing_config_and_a_binary_under_target_are_warned_about() {
        assert!(install_warnings(&spec("/usr/local/bin/contextpilotd"), true).is_empty());
        assert!(install_warnings(&spec("/home/u/.cargo/bin/contextpilotd"), true).is_empty());
        // A directory merely named target is not a cargo build output.
        assert!(install_warnings(&spec("/srv/target/bin/contextpilotd"), true).is_empty());

        let missing = install_warnings(&spec("/usr/local/bin/contextpilotd"), false);
        assert_eq!(missing.len(), 1);
        assert!(
            missing[0].contains("config.toml does not exist"),
            "{missing:?}"
        );

        for built in [
            "/home/u/src/contextpilotd/target/release/contextpilotd",
            "/home/u/src/contextpilotd/target/debug/contextpilotd",
            "/home/u/src/contextpilotd/target/aarch64-apple-darwin/release/contextpilotd",
        ] {
            let warnings = install_warnings(&spec(built), true);
            assert_eq!(warnings.len(), 1, "{built}");
            assert!(warnings[0].contains("under target/"), "{warnings:?}");
        }
    }
}
