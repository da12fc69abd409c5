//! The LaunchAgent: its plist, the `launchctl` command lines, and the parser
//! for `launchctl print`.
//!
//! Everything here is pure, so Linux tests cover it byte for byte.

use std::path::{Path, PathBuf};

use plist::{Dictionary, Value};

use super::{ServiceState, UnitSpec};

pub const LABEL: &str = "com.contextpilot.contextpilotd";

/// The label `brew services` gives the formula's agent
/// (`homebrew.mxcl.<formula>`), in `~/Library/LaunchAgents/<label>.plist`.
pub const HOMEBREW_LABEL: &str = "homebrew.mxcl.contextpilotd";

/// Where the formula's service writes stderr (`error_log_path
/// var/"log/contextpilotd.err.log"`), under Homebrew's prefix.
pub const HOMEBREW_LOGS: &str = "$(brew --prefix)/var/log/contextpilotd.err.log";

/// launchd reads no shell profile, so Homebrew's prefixes (Apple Silicon,
/// then Intel) must be on the agent's own PATH for `llama-server` to be found.
pub const PATH: &str =
    "/opt/homebrew/bin:/opt/homebrew/sbin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

/// Seconds launchd waits between spawns; also its minimum run time.
pub const THROTTLE_INTERVAL_S: i64 = 10;

pub const OUT_LOG: &str = "contextpilotd.out.log";
pub const ERR_LOG: &str = "contextpilotd.err.log";

/// `~/Library/LaunchAgents/<label>.plist`.
pub fn plist_path(home: &Path) -> PathBuf {
    home.join("Library/LaunchAgents")
        .join(format!("{LABEL}.plist"))
}

/// `~/Library/Logs/contextpilotd`: where the agent's stdout and stderr go
/// (also the default `[log] dir`, so `contextpilotd.log` is beside them).
pub fn log_dir(home: &Path) -> PathBuf {
    home.join("Library/Logs/contextpilotd")
}

/// The LaunchAgent as a dictionary. Keep it in step with
/// `assets/launchd/com.contextpilot.contextpilotd.plist`; a test compares them.
pub fn plist(spec: &UnitSpec) -> Dictionary {
    let string = |s: &str| Value::String(s.to_string());
    let logs = log_dir(Path::new(&spec.home));
    let log = |name: &str| Value::String(logs.join(name).to_string_lossy().into_owned());
    let mut keep_alive = Dictionary::new();
    // Restart only after an abnormal exit: a clean stop stays stopped.
    keep_alive.insert("SuccessfulExit".into(), Value::Boolean(false));
    let mut environment = Dictionary::new();
    environment.insert("PATH".into(), string(PATH));

    let mut dict = Dictionary::new();
    dict.insert("Label".into(), string(LABEL));
    dict.insert(
        "ProgramArguments".into(),
        Value::Array(spec.program_arguments().iter().map(|a| string(a)).collect()),
    );
    dict.insert("RunAtLoad".into(), Value::Boolean(true));
    dict.insert("KeepAlive".into(), Value::Dictionary(keep_alive));
    dict.insert(
        "ThrottleInterval".into(),
        Value::Integer(THROTTLE_INTERVAL_S.into()),
    );
    // Without it macOS throttles the agent as background work, which
    // inference latency cannot afford.
    dict.insert("ProcessType".into(), string("Interactive"));
    // stderr catches what stops a start and panics; with stderr not a
    // terminal, the daemon's log lines go to its own rotated file instead.
    dict.insert("StandardOutPath".into(), log(OUT_LOG));
    dict.insert("StandardErrorPath".into(), log(ERR_LOG));
    dict.insert(
        "EnvironmentVariables".into(),
        Value::Dictionary(environment),
    );
    dict
}

/// The plist as XML, escaped by the plist writer (paths may hold `&`, `<`).
pub fn plist_xml(spec: &UnitSpec) -> String {
    let mut out = Vec::new();
    Value::Dictionary(plist(spec))
        .to_writer_xml(&mut out)
        .expect("writing a plist into memory cannot fail");
    out.push(b'\n');
    String::from_utf8(out).expect("the plist writer writes UTF-8")
}

fn domain(uid: u32) -> String {
    format!("gui/{uid}")
}

fn target(uid: u32) -> String {
    format!("gui/{uid}/{LABEL}")
}

fn launchctl(program: &str, args: &[&str]) -> Vec<String> {
    std::iter::once(program)
        .chain(args.iter().copied())
        .map(str::to_string)
        .collect()
}

pub fn enable_command(program: &str, uid: u32) -> Vec<String> {
    launchctl(program, &["enable", &target(uid)])
}

pub fn bootstrap_command(program: &str, uid: u32, plist: &Path) -> Vec<String> {
    launchctl(
        program,
        &["bootstrap", &domain(uid), &plist.to_string_lossy()],
    )
}

pub fn bootout_command(program: &str, uid: u32) -> Vec<String> {
    launchctl(program, &["bootout", &target(uid)])
}

/// `-k` kills a running instance first, so this is a restart.
pub fn kickstart_command(program: &str, uid: u32, kill: bool) -> Vec<String> {
    let t = target(uid);
    let args: &[&str] = if kill {
        &["kickstart", "-k", &t]
    } else {
        &["kickstart", &t]
    };
    launchctl(program, args)
}

pub fn print_command(program: &str, uid: u32) -> Vec<String> {
    launchctl(program, &["print", &target(uid)])
}

/// `launchctl print` for another label (Homebrew's).
pub fn print_label_command(program: &str, uid: u32, label: &str) -> Vec<String> {
    launchctl(program, &["print", &format!("gui/{uid}/{label}")])
}

/// `~/Library/LaunchAgents/homebrew.mxcl.contextpilotd.plist`.
pub fn homebrew_plist_path(home: &Path) -> PathBuf {
    home.join("Library/LaunchAgents")
        .join(format!("{HOMEBREW_LABEL}.plist"))
}

/// `bootstrap` fails with EIO when the label is still (or already) loaded,
/// e.g. right after a `bootout` that launchd has not finished.
pub fn is_bootstrap_eio(code: Option<i32>, stderr: &str) -> bool {
    code == Some(5) || stderr.contains("5: Input/output error")
}

/// `launchctl print` and `bootout` say "not loaded" with exit 113 (3 on
/// older releases) or "Could not find service".
pub fn is_not_loaded(code: Option<i32>, stderr: &str) -> bool {
    matches!(code, Some(3) | Some(113))
        || stderr.contains("Could not find service")
        || stderr.contains("No such process")
}

/// Reads `launchctl print gui/<uid>/<label>`: `state`, `pid` and
/// `last exit code` of the job itself, ignoring the nested blocks
/// (environment, endpoints, …) that may repeat those names.
pub fn parse_print(output: &str) -> ServiceState {
    let mut state = ServiceState {
        loaded: Some(true),
        ..ServiceState::default()
    };
    let mut depth = 0usize;
    for line in output.lines() {
        let line = line.trim();
        if line.ends_with('{') {
            depth += 1;
            continue;
        }
        if line == "}" {
            depth = depth.saturating_sub(1);
            continue;
        }
        if depth != 1 {
            continue;
        }
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "state" => state.state = Some(value.to_string()),
            "pid" => state.pid = value.parse().ok(),
            "last exit code" if value != "(never exited)" => {
                state.last_exit = Some(value.to_string())
            }
            "last terminating signal" => state.last_exit = Some(value.to_string()),
            _ => {}
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines() {
        let plist =
            Path::new("/Users/me/Library/LaunchAgents/com.contextpilot.contextpilotd.plist");
        assert_eq!(
            enable_command("launchctl", 501),
            [
                "launchctl",
                "enable",
                "gui/501/com.contextpilot.contextpilotd"
            ]
        );
        assert_eq!(
            bootstrap_command("launchctl", 501, plist),
            [
                "launchctl",
                "bootstrap",
                "gui/501",
                "/Users/me/Library/LaunchAgents/com.contextpilot.contextpilotd.plist"
            ]
        );
        assert_eq!(
            kickstart_command("launchctl", 501, true),
            [
                "launchctl",
                "kickstart",
                "-k",
                "gui/501/com.contextpilot.contextpilotd"
            ]
        );
        assert_eq!(
            bootout_command("launchctl", 501),
            [
                "launchctl",
                "bootout",
                "gui/501/com.contextpilot.contextpilotd"
            ]
        );
    }

    #[test]
    fn eio_and_not_loaded_are_recognised() {
        assert!(is_bootstrap_eio(
            Some(5),
            "Bootstrap failed: 5: Input/output error\n"
        ));
        assert!(!is_bootstrap_eio(
            Some(1),
            "Bootstrap failed: 1: Operation not permitted"
        ));
        assert!(is_not_loaded(
            Some(113),
            "Could not find service \"com.contextpilot.contextpilotd\" in domain for port\n"
        ));
        assert!(!is_not_loaded(Some(0), ""));
    }
}
