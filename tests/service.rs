//! The login service: the units `service print` writes (checked with a real
//! plist parser and `systemd-analyze verify`), their consistency with the
//! documented templates under `assets/` and the Homebrew formula, the exact
//! service-manager commands of `--dry-run`, `install`/`uninstall` in a
//! temporary HOME with a stand-in `systemctl`, and the parsers of what
//! `launchctl print` and `systemctl show` say.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use contextpilotd::service::{
    self, launchd, systemd, Platform, Ran, ServiceReport, ServiceState, UnitSpec,
};
use plist::Value;

const BIN: &str = env!("CARGO_BIN_EXE_contextpilotd");

fn manifest(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(manifest("tests/fixtures/service").join(name)).unwrap()
}

/// The binary with a controlled environment: HOME as given, no inherited
/// config or service-manager overrides.
fn contextpilotd(home: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("CONTEXTPILOTD_CONFIG")
        .env_remove(service::SYSTEMCTL_ENV)
        .env_remove(service::LAUNCHCTL_ENV);
    cmd
}

fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn real_binary() -> String {
    Path::new(BIN)
        .canonicalize()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

// --- launchd ---------------------------------------------------------------

#[test]
fn printed_launch_agent_has_every_key_with_absolute_paths_that_survive_spaces() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home with space & <more>");
    std::fs::create_dir(&home).unwrap();
    let config = "/tmp/with space/config.toml";
    let out = contextpilotd(
        &home,
        &["service", "print", "--launchd", "--config", config],
    )
    .output()
    .unwrap();
    let xml = stdout_of(&out);
    let value = Value::from_reader_xml(xml.as_bytes()).expect("a valid XML plist");
    let dict = value.as_dictionary().expect("a dictionary at the top");

    assert_eq!(dict["Label"].as_string(), Some(launchd::LABEL));
    let argv: Vec<&str> = dict["ProgramArguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_string().unwrap())
        .collect();
    assert_eq!(argv, [real_binary().as_str(), "run", "--config", config]);
    assert_eq!(dict["RunAtLoad"].as_boolean(), Some(true));
    let keep_alive = dict["KeepAlive"].as_dictionary().unwrap();
    assert_eq!(keep_alive["SuccessfulExit"].as_boolean(), Some(false));
    assert_eq!(dict["ThrottleInterval"].as_signed_integer(), Some(10));
    assert_eq!(dict["ProcessType"].as_string(), Some("Interactive"));
    let logs = home.join("Library/Logs/contextpilotd");
    assert_eq!(
        dict["StandardOutPath"].as_string().map(PathBuf::from),
        Some(logs.join("contextpilotd.out.log"))
    );
    assert_eq!(
        dict["StandardErrorPath"].as_string().map(PathBuf::from),
        Some(logs.join("contextpilotd.err.log"))
    );
    let path = dict["EnvironmentVariables"].as_dictionary().unwrap()["PATH"]
        .as_string()
        .unwrap();
    assert!(path.split(':').any(|p| p == "/opt/homebrew/bin"), "{path}");

    let paths = argv
        .iter()
        .copied()
        .filter(|a| a.starts_with('/') || a.contains('~'))
        .chain([
            dict["StandardOutPath"].as_string().unwrap(),
            dict["StandardErrorPath"].as_string().unwrap(),
        ]);
    for p in paths {
        assert!(Path::new(p).is_absolute(), "{p} is not absolute");
        assert!(!p.contains('~') && !p.contains('$'), "{p} needs expansion");
    }
}

/// Recursively: the same keys, and every value equal once the template's
/// placeholders are filled in.
fn fill(value: &Value, spec: &UnitSpec) -> Value {
    match value {
        Value::String(s) => Value::String(
            s.replace("@BIN@", &spec.binary)
                .replace("@CONFIG@", &spec.config)
                .replace("@HOME@", &spec.home),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| fill(v, spec)).collect()),
        Value::Dictionary(d) => {
            Value::Dictionary(d.iter().map(|(k, v)| (k.clone(), fill(v, spec))).collect())
        }
        other => other.clone(),
    }
}

#[test]
fn generated_launch_agent_matches_the_documented_template() {
    let spec = UnitSpec::new(
        Path::new("/Applications/Context Pilot/bin/contextpilotd"),
        Path::new("/Users/ada/Library/Application Support/contextpilotd/config.toml"),
        Path::new("/Users/ada"),
    )
    .unwrap();
    let template = Value::from_file(manifest(
        "assets/launchd/com.contextpilot.contextpilotd.plist",
    ))
    .expect("the template is a valid plist");
    let generated = Value::from_reader_xml(launchd::plist_xml(&spec).as_bytes()).unwrap();
    let keys = |v: &Value| -> Vec<String> { v.as_dictionary().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&generated), keys(&template));
    assert_eq!(generated, fill(&template, &spec));
}

// --- systemd ---------------------------------------------------------------

/// `(section, key, value)` for every directive, comments and blanks dropped.
fn directives(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        let (key, value) = line.split_once('=').expect("key=value");
        out.push((section.clone(), key.to_string(), value.to_string()));
    }
    out
}

#[test]
fn generated_unit_matches_the_documented_template() {
    let spec = UnitSpec::new(
        Path::new("/opt/context pilot/$bin/contextpilotd"),
        Path::new("/home/ada/.config/contextpilotd/50%$x.toml"),
        Path::new("/home/ada"),
    )
    .unwrap();
    let template =
        std::fs::read_to_string(manifest("assets/systemd/contextpilotd.service")).unwrap();
    let filled = template
        .replace("@BIN@", &systemd::exec_program(&spec.binary))
        .replace("@CONFIG@", &systemd::exec_arg(&spec.config));
    assert_eq!(directives(&systemd::unit(&spec)), directives(&filled));
    assert!(systemd::unit(&spec).contains(
        "ExecStart=\"/opt/context pilot/$bin/contextpilotd\" run --config /home/ada/.config/contextpilotd/50%%$$x.toml\n"
    ));
}

/// Runs `systemd-analyze --user verify` on `unit` (written as
/// contextpilotd.service) and fails on any complaint about it. A private
/// XDG_RUNTIME_DIR lets the user-mode verifier start without a user manager.
fn verify_unit(unit: &str) {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.exists(),
        "systemd-analyze is missing: install systemd (`apt-get install systemd`) to run this test"
    );
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    let file = dir.path().join(systemd::UNIT);
    std::fs::write(&file, unit).unwrap();
    let out = Command::new(analyze)
        .args(["--user", "verify"])
        .arg(&file)
        .env("XDG_RUNTIME_DIR", &runtime)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed: {stderr}\n{unit}");
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(systemd::UNIT))
        .collect();
    assert!(complaints.is_empty(), "{complaints:?}\n{unit}");
}

#[test]
fn printed_unit_passes_systemd_analyze_verify() {
    let home = tempfile::tempdir().unwrap();
    let out = contextpilotd(
        home.path(),
        &[
            "service",
            "print",
            "--systemd",
            "--config",
            "/tmp/with space/c.toml",
        ],
    )
    .output()
    .unwrap();
    let unit = stdout_of(&out);
    assert!(unit.contains(&format!(
        "ExecStart={} run --config \"/tmp/with space/c.toml\"\n",
        systemd::exec_program(&real_binary())
    )));
    verify_unit(&unit);
}

#[test]
fn unit_with_spaces_and_specifier_characters_passes_verify() {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = dir.path().join("Context Pilot $bin 100%");
    std::fs::create_dir(&bin_dir).unwrap();
    let binary = bin_dir.join("contextpilotd");
    std::os::unix::fs::symlink(real_binary(), &binary).unwrap();
    let spec = UnitSpec::new(
        &binary,
        Path::new("/tmp/a \"quoted\" dir/c.toml"),
        dir.path(),
    )
    .unwrap();
    verify_unit(&systemd::unit(&spec));

    // And verify does catch a binary that is not there, so the check above means something.
    let missing = UnitSpec::new(&bin_dir.join("nope"), Path::new("/c.toml"), dir.path()).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let file = dir2.path().join(systemd::UNIT);
    std::fs::write(&file, systemd::unit(&missing)).unwrap();
    let out = Command::new("/usr/bin/systemd-analyze")
        .arg("verify")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

// --- dry runs --------------------------------------------------------------

fn command_lines(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|l| {
            l.starts_with("launchctl ") || l.starts_with("systemctl ") || l.starts_with("# on ")
        })
        .collect()
}

#[test]
fn install_dry_run_prints_the_exact_commands_for_both_platforms() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path().canonicalize().unwrap();
    let uid = nix::unistd::getuid().as_raw();
    let h = home.display();

    let out = contextpilotd(
        &home,
        &[
            "service",
            "install",
            "--dry-run",
            "--platform",
            "macos",
            "--config",
            "/c.toml",
        ],
    )
    .output()
    .unwrap();
    let text = stdout_of(&out);
    let plist = format!("{h}/Library/LaunchAgents/com.contextpilot.contextpilotd.plist");
    assert_eq!(
        command_lines(&text),
        [
            format!("launchctl enable gui/{uid}/com.contextpilot.contextpilotd"),
            format!("launchctl bootstrap gui/{uid} {plist}"),
            format!(
                "# on \"Bootstrap failed: 5: Input/output error\", once: launchctl bootout gui/{uid}/com.contextpilot.contextpilotd; launchctl bootstrap gui/{uid} {plist}"
            ),
        ]
    );
    assert!(
        text.starts_with(&format!("# write {plist}\n<?xml")),
        "{text}"
    );
    assert!(text.contains(&format!("mkdir -p {h}/Library/Logs/contextpilotd\n")));

    let out = contextpilotd(
        &home,
        &[
            "service",
            "install",
            "--dry-run",
            "--platform",
            "linux",
            "--config",
            "/c.toml",
        ],
    )
    .output()
    .unwrap();
    let text = stdout_of(&out);
    assert_eq!(
        command_lines(&text),
        [
            "systemctl --user daemon-reload",
            "systemctl --user enable --now contextpilotd.service",
        ]
    );
    assert!(text.starts_with(&format!(
        "# write {h}/.config/systemd/user/contextpilotd.service\n"
    )));
    // A dry run writes nothing.
    assert_eq!(std::fs::read_dir(&home).unwrap().count(), 0);
}

/// `install --dry-run` warns as the install itself does, on stderr (stdout
/// stays the steps): a configuration file that does not exist, and a
/// program that lives in a cargo build directory.
#[test]
fn install_dry_run_warns_as_the_install_does() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let home = dir.join("home");
    std::fs::create_dir(&home).unwrap();
    // The same program at two places: a build output and an installed copy.
    let place = |relative: &str| {
        let path = dir.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        if std::fs::hard_link(BIN, &path).is_err() {
            std::fs::copy(BIN, &path).unwrap();
        }
        path
    };
    let built = place("src/contextpilotd/target/release/contextpilotd");
    let installed = place("bin/contextpilotd");
    let config = dir.join("config.toml");
    let dry_run = |program: &Path| {
        let out = Command::new(program)
            .args([
                "service",
                "install",
                "--dry-run",
                "--platform",
                "linux",
                "--config",
            ])
            .arg(&config)
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("CONTEXTPILOTD_CONFIG")
            .output()
            .unwrap();
        let stdout = stdout_of(&out);
        assert!(stdout.starts_with("# write "), "{stdout}");
        assert!(!stdout.contains("warning"), "{stdout}");
        String::from_utf8(out.stderr).unwrap()
    };

    let stderr = dry_run(&built);
    assert!(
        stderr.contains("config.toml does not exist yet"),
        "{stderr}"
    );
    assert!(stderr.contains("under target/"), "{stderr}");
    assert!(stderr.contains(&built.display().to_string()), "{stderr}");

    std::fs::write(&config, "").unwrap();
    let stderr = dry_run(&built);
    assert!(!stderr.contains("does not exist"), "{stderr}");
    assert!(stderr.contains("under target/"), "{stderr}");

    let stderr = dry_run(&installed);
    assert!(!stderr.contains("warning"), "{stderr}");
    // A dry run writes nothing.
    assert_eq!(std::fs::read_dir(&home).unwrap().count(), 0);
}

#[test]
fn other_dry_runs_print_the_exact_commands() {
    let home = tempfile::tempdir().unwrap();
    let uid = nix::unistd::getuid().as_raw();
    let target = format!("gui/{uid}/com.contextpilot.contextpilotd");
    let run = |args: &[&str]| {
        let out = contextpilotd(home.path(), args).output().unwrap();
        stdout_of(&out)
    };
    let cases: [(&str, &str, Vec<String>); 8] = [
        ("restart", "macos", vec![format!("launchctl kickstart -k {target}")]),
        ("restart", "linux", vec!["systemctl --user restart contextpilotd.service".into()]),
        ("stop", "macos", vec![format!("launchctl bootout {target}  # not loaded is fine")]),
        ("stop", "linux", vec!["systemctl --user stop contextpilotd.service".into()]),
        ("start", "linux", vec!["systemctl --user start contextpilotd.service".into()]),
        ("status", "macos", vec![format!("launchctl print {target}")]),
        (
            "status",
            "linux",
            vec!["systemctl --user show contextpilotd.service --property=ActiveState,SubState,MainPID,ExecMainStatus,LoadState,UnitFileState".into()],
        ),
        (
            "uninstall",
            "linux",
            vec![
                "systemctl --user disable --now contextpilotd.service  # not loaded is fine".into(),
                "systemctl --user daemon-reload  # not loaded is fine".into(),
            ],
        ),
    ];
    for (command, platform, expected) in cases {
        let text = run(&["service", command, "--dry-run", "--platform", platform]);
        assert_eq!(command_lines(&text), expected, "{command} {platform}");
    }
}

// --- install / uninstall in a temporary HOME --------------------------------

/// Every path under `root` (files with their contents).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if path.is_dir() {
                out.insert(rel, None);
                stack.push(path);
            } else {
                out.insert(rel, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

/// A stand-in for systemctl (there is no user manager here): appends its
/// argv, tab-separated, one line per call, and exits with `code`.
fn fake_systemctl(dir: &Path, code: i32) -> (PathBuf, PathBuf) {
    let log = dir.join("systemctl.argv");
    let script = dir.join("systemctl");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n{{ printf '%s' \"$0\"; for a in \"$@\"; do printf '\\t%s' \"$a\"; done; echo; }} >> '{}'\n\
             [ {code} -eq 0 ] || echo 'Failed to connect to bus: No medium found' >&2\nexit {code}\n",
            log.display()
        ),
    )
    .unwrap();
    let mut permissions = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&script, permissions).unwrap();
    (script, log)
}

fn calls(log: &Path, script: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            l.split('\t')
                .enumerate()
                .map(|(i, a)| {
                    if i == 0 {
                        assert_eq!(Path::new(a), script);
                        "systemctl".to_string()
                    } else {
                        a.to_string()
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn install_and_uninstall_touch_only_the_unit_file() {
    let outside = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let home = home.path().canonicalize().unwrap();
    // What a user already has: a configuration and some logs.
    let config = home.join(".config/contextpilotd/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, "[llama]\nmodel = \"/m.gguf\"\n").unwrap();
    std::fs::create_dir_all(home.join(".local/state/contextpilotd/logs")).unwrap();
    std::fs::write(
        home.join(".local/state/contextpilotd/logs/contextpilotd.log"),
        "x\n",
    )
    .unwrap();
    let before = snapshot(&home);
    let (script, log) = fake_systemctl(outside.path(), 0);

    let out = contextpilotd(&home, &["service", "install", "--platform", "linux"])
        .env(service::SYSTEMCTL_ENV, &script)
        .output()
        .unwrap();
    stdout_of(&out);
    let unit_path = home.join(".config/systemd/user/contextpilotd.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(unit.contains(&format!(
        "ExecStart={} run --config {}\n",
        systemd::exec_program(&real_binary()),
        systemd::exec_arg(&config.to_string_lossy())
    )));
    let mut expected = before.clone();
    for dir in [".config/systemd", ".config/systemd/user"] {
        expected.insert(PathBuf::from(dir), None);
    }
    expected.insert(
        PathBuf::from(".config/systemd/user/contextpilotd.service"),
        Some(unit.into_bytes()),
    );
    assert_eq!(snapshot(&home), expected);
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    assert_eq!(
        calls(&log, &script),
        [
            s(&["systemctl", "--user", "daemon-reload"]),
            s(&[
                "systemctl",
                "--user",
                "enable",
                "--now",
                "contextpilotd.service"
            ]),
        ]
    );

    std::fs::remove_file(&log).unwrap();
    let out = contextpilotd(&home, &["service", "uninstall", "--platform", "linux"])
        .env(service::SYSTEMCTL_ENV, &script)
        .output()
        .unwrap();
    stdout_of(&out);
    assert_eq!(snapshot(&home), before);
    assert_eq!(
        calls(&log, &script),
        [
            s(&[
                "systemctl",
                "--user",
                "disable",
                "--now",
                "contextpilotd.service"
            ]),
            s(&["systemctl", "--user", "daemon-reload"]),
        ]
    );
}

#[test]
fn install_without_a_user_manager_writes_the_unit_and_exits_1() {
    let outside = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let (script, log) = fake_systemctl(outside.path(), 1);
    let out = contextpilotd(
        home.path(),
        &[
            "service",
            "install",
            "--platform",
            "linux",
            "--config",
            "/c.toml",
        ],
    )
    .env(service::SYSTEMCTL_ENV, &script)
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Failed to connect to bus"), "{stderr}");
    let fake = script.display();
    assert!(
        stderr.contains(&format!(
            "load it with: {fake} --user daemon-reload && {fake} --user enable --now contextpilotd.service"
        )),
        "{stderr}"
    );
    assert!(home
        .path()
        .join(".config/systemd/user/contextpilotd.service")
        .is_file());
    // It stopped at the first failure.
    assert_eq!(calls(&log, &script).len(), 1);
}

#[test]
fn start_without_install_is_a_usage_error() {
    let home = tempfile::tempdir().unwrap();
    let out = contextpilotd(home.path(), &["service", "start", "--platform", "linux"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("contextpilotd service install"));
}

#[test]
fn status_with_no_service_manager_is_unknown_not_an_error() {
    let home = tempfile::tempdir().unwrap();
    let out = contextpilotd(home.path(), &["service", "status", "--platform", "linux"])
        .env(
            service::SYSTEMCTL_ENV,
            home.path().join("no-such-systemctl"),
        )
        .output()
        .unwrap();
    // Not installed: exit 3 and the next step, whatever the manager says.
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("not installed as a service: contextpilotd service install"));
}

// --- parsers ---------------------------------------------------------------

fn ran(code: i32, stdout: &str, stderr: &str) -> Ran {
    Ran {
        code: Some(code),
        stdout: stdout.to_string(),
        stderr: stderr.to_string(),
    }
}

#[test]
fn launchctl_print_samples() {
    let running = launchd::parse_print(&fixture("launchctl-print-running.txt"));
    assert_eq!(
        running,
        ServiceState {
            loaded: Some(true),
            enabled: None,
            state: Some("running".into()),
            pid: Some(8123),
            last_exit: None,
        }
    );
    assert!(running.is_running());
    let exited = launchd::parse_print(&fixture("launchctl-print-exited.txt"));
    assert_eq!(exited.state.as_deref(), Some("not running"));
    assert_eq!(exited.pid, None);
    assert_eq!(exited.last_exit.as_deref(), Some("2"));
    assert!(!exited.is_running());

    let (state, reason) = service::interpret_query(
        Platform::Macos,
        &ran(113, "", &fixture("launchctl-print-not-loaded.stderr")),
    );
    assert_eq!(state.unwrap().loaded, Some(false));
    assert_eq!(reason, None);
}

#[test]
fn systemctl_show_samples() {
    let active = systemd::parse_show(&fixture("systemctl-show-active.txt"));
    assert_eq!(
        active,
        ServiceState {
            loaded: Some(true),
            enabled: Some(true),
            state: Some("active (running)".into()),
            pid: Some(4242),
            last_exit: None,
        }
    );
    let failed = systemd::parse_show(&fixture("systemctl-show-failed.txt"));
    assert_eq!(failed.state.as_deref(), Some("failed (failed)"));
    assert_eq!(failed.last_exit.as_deref(), Some("2"));
    assert!(!failed.is_running());
    let unknown = systemd::parse_show(&fixture("systemctl-show-not-found.txt"));
    assert_eq!(unknown.loaded, Some(false));
    assert_eq!(unknown.enabled, None);

    let (state, reason) = service::interpret_query(
        Platform::Linux,
        &ran(1, "", "Failed to connect to bus: No medium found\n"),
    );
    assert_eq!(state, None);
    assert_eq!(
        reason.as_deref(),
        Some("Failed to connect to bus: No medium found")
    );
}

fn report(installed: bool, state: Option<ServiceState>) -> ServiceReport {
    ServiceReport {
        manager: "launchd".into(),
        unit_path: "/Users/ada/Library/LaunchAgents/com.contextpilot.contextpilotd.plist".into(),
        installed,
        manager_state: state,
        unknown_reason: None,
        homebrew: false,
    }
}

fn homebrew_report(installed: bool, state: Option<ServiceState>) -> ServiceReport {
    ServiceReport {
        unit_path: "/Users/ada/Library/LaunchAgents/homebrew.mxcl.contextpilotd.plist".into(),
        homebrew: true,
        ..report(installed, state)
    }
}

#[test]
fn a_homebrew_service_is_named_and_never_doubled() {
    assert_eq!(
        launchd::print_label_command("launchctl", 501, launchd::HOMEBREW_LABEL),
        ["launchctl", "print", "gui/501/homebrew.mxcl.contextpilotd"]
    );
    assert_eq!(
        launchd::homebrew_plist_path(Path::new("/Users/ada")),
        Path::new("/Users/ada/Library/LaunchAgents/homebrew.mxcl.contextpilotd.plist")
    );
    let exited = launchd::parse_print(&fixture("launchctl-print-homebrew-exited.txt"));
    assert_eq!(exited.state.as_deref(), Some("not running"));
    assert_eq!(exited.last_exit.as_deref(), Some("2"));
    let not_loaded = || {
        service::interpret_query(
            Platform::Macos,
            &ran(113, "", &fixture("launchctl-print-not-loaded.stderr")),
        )
        .0
    };

    // Ours not installed, Homebrew's installed: Homebrew's is the report.
    let chosen = service::prefer_homebrew(
        report(false, not_loaded()),
        homebrew_report(true, Some(exited.clone())),
    );
    assert!(chosen.homebrew);
    let step = service::next_step(&chosen, false, "unused").unwrap();
    assert_eq!(
        step,
        "installed with Homebrew but not running: brew services restart contextpilotd; see $(brew --prefix)/var/log/contextpilotd.err.log"
    );
    assert!(!step.contains("service install"));
    let line = service::describe_report(&chosen);
    assert!(
        line.starts_with("Homebrew's homebrew.mxcl.contextpilotd (/Users/ada/Library/LaunchAgents/homebrew.mxcl.contextpilotd.plist), not running")
            && line.contains("last exit 2"),
        "{line}"
    );
    assert_eq!(service::next_step(&chosen, true, "unused"), None);

    // Loaded by launchd without the plist where brew keeps it: still Homebrew's.
    let running = launchd::parse_print(&fixture("launchctl-print-running.txt"));
    let chosen = service::prefer_homebrew(
        report(false, not_loaded()),
        homebrew_report(false, Some(running)),
    );
    assert!(chosen.homebrew);
    assert!(service::next_step(&chosen, false, "unused")
        .unwrap()
        .starts_with("the Homebrew service is running (pid 8123) but not answering yet"));
    // Installed but not loaded: brew services start.
    let chosen = service::prefer_homebrew(
        report(false, not_loaded()),
        homebrew_report(true, not_loaded()),
    );
    assert!(service::next_step(&chosen, false, "unused")
        .unwrap()
        .starts_with("installed with Homebrew but not loaded: brew services start contextpilotd"));

    // Neither: our own report and its advice.
    let chosen = service::prefer_homebrew(
        report(false, not_loaded()),
        homebrew_report(false, not_loaded()),
    );
    assert!(!chosen.homebrew);
    assert_eq!(
        service::next_step(&chosen, false, "unused").as_deref(),
        Some("not installed as a service: contextpilotd service install")
    );
    // Ours installed: ours, whatever Homebrew says.
    let ours = service::prefer_homebrew(
        report(true, not_loaded()),
        homebrew_report(true, not_loaded()),
    );
    assert!(!ours.homebrew);
}

#[test]
fn next_steps_for_people() {
    let logs = "/Users/ada/Library/Logs/contextpilotd/contextpilotd.err.log";
    assert_eq!(
        service::next_step(&report(false, None), false, logs).as_deref(),
        Some("not installed as a service: contextpilotd service install")
    );
    assert_eq!(service::next_step(&report(false, None), true, logs), None);
    let exited = launchd::parse_print(&fixture("launchctl-print-exited.txt"));
    assert_eq!(
        service::next_step(&report(true, Some(exited)), false, logs).as_deref(),
        Some("installed but not running: see /Users/ada/Library/Logs/contextpilotd/contextpilotd.err.log")
    );
    assert_eq!(
        service::next_step(
            &report(true, None),
            false,
            "journalctl --user -u contextpilotd"
        )
        .as_deref(),
        Some("installed but not running: see journalctl --user -u contextpilotd")
    );
    let running = launchd::parse_print(&fixture("launchctl-print-running.txt"));
    assert_eq!(
        service::next_step(&report(true, Some(running)), true, logs),
        None
    );
}

// --- Homebrew ----------------------------------------------------------------

/// The `service do … end` block of the formula, one statement per line.
fn service_block(formula: &str) -> Vec<String> {
    let start = formula
        .lines()
        .position(|l| l.trim() == "service do")
        .expect("a `service do` block");
    formula
        .lines()
        .skip(start + 1)
        .map(str::trim)
        .take_while(|l| *l != "end")
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn statement<'a>(block: &'a [String], name: &str) -> &'a str {
    block
        .iter()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no `{name}` in the service block: {block:?}"))
}

#[test]
fn homebrew_service_runs_what_the_launch_agent_runs() {
    let formula = std::fs::read_to_string(manifest("packaging/homebrew/contextpilotd.rb")).unwrap();
    let block = service_block(&formula);
    // `run [opt_bin/"contextpilotd", "run"]`: the program and its arguments.
    let run = statement(&block, "run");
    let items: Vec<String> = run
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|i| i.trim().to_string())
        .collect();
    let spec = UnitSpec::new(
        Path::new("/opt/homebrew/opt/contextpilotd/bin/contextpilotd"),
        Path::new("/c.toml"),
        Path::new("/Users/ada"),
    )
    .unwrap();
    let agent = launchd::plist(&spec);
    let agent_argv: Vec<&str> = agent["ProgramArguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_string().unwrap())
        .collect();
    assert_eq!(items[0], "opt_bin/\"contextpilotd\"");
    assert_eq!(
        Path::new(agent_argv[0]).file_name().unwrap(),
        "contextpilotd"
    );
    // brew omits `--config PATH`: the daemon then reads the platform default,
    // the same file `service install` names when no --config is given.
    let brew_args: Vec<&str> = items[1..].iter().map(|i| i.trim_matches('"')).collect();
    assert_eq!(brew_args, agent_argv[1..agent_argv.len() - 2]);
    assert_eq!(&agent_argv[agent_argv.len() - 2..], ["--config", "/c.toml"]);

    // Same log file names (brew keeps them in its var/log).
    let file_of = |stmt: &str| {
        let path = stmt.strip_prefix("var/\"").unwrap().trim_end_matches('"');
        Path::new(path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let agent_file = |key: &str| {
        Path::new(agent[key].as_string().unwrap())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    assert_eq!(
        file_of(statement(&block, "log_path")),
        agent_file("StandardOutPath")
    );
    assert_eq!(
        file_of(statement(&block, "error_log_path")),
        agent_file("StandardErrorPath")
    );
    // Restart policy, scheduling and PATH as in the LaunchAgent.
    assert_eq!(statement(&block, "keep_alive"), "successful_exit: false");
    assert_eq!(
        agent["KeepAlive"].as_dictionary().unwrap()["SuccessfulExit"].as_boolean(),
        Some(false)
    );
    assert_eq!(statement(&block, "process_type"), ":interactive");
    assert_eq!(agent["ProcessType"].as_string(), Some("Interactive"));
    assert_eq!(
        statement(&block, "environment_variables"),
        "PATH: std_service_path_env"
    );
    assert!(formula.contains("depends_on \"llama.cpp\""));
    assert!(formula.contains("depends_on \"rust\" => :build"));
    assert!(formula.contains("system \"cargo\", \"install\", *std_cargo_args"));
    assert!(formula.contains("\n  test do\n"));
}

#[test]
fn homebrew_formula_is_valid_ruby() {
    let ruby = [
        "/usr/bin/ruby",
        "/usr/local/bin/ruby",
        "/opt/homebrew/bin/ruby",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("ruby is missing: install it (`apt-get install ruby`) to check the Homebrew formula");
    let out = Command::new(ruby)
        .arg("-c")
        .arg(manifest("packaging/homebrew/contextpilotd.rb"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// --- contextpilotd status ------------------------------------------------------

#[test]
fn status_names_the_next_step_when_nothing_answers() {
    let outside = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let (script, _log) = fake_systemctl(outside.path(), 1);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = outside.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let status = || {
        let out = contextpilotd(home.path(), &["status", "--config"])
            .arg(&config)
            .env(service::SYSTEMCTL_ENV, &script)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        String::from_utf8(out.stdout).unwrap()
    };
    if cfg!(target_os = "macos") {
        return;
    }
    assert!(status()
        .contains("next step     not installed as a service: contextpilotd service install"));
    let unit = home
        .path()
        .join(".config/systemd/user/contextpilotd.service");
    std::fs::create_dir_all(unit.parent().unwrap()).unwrap();
    std::fs::write(&unit, "[Service]\n").unwrap();
    let text = status();
    assert!(
        text.contains("systemd unknown: Failed to connect to bus"),
        "{text}"
    );
    assert!(
        text.contains(
            "next step     installed but not running: see journalctl --user -u contextpilotd"
        ),
        "{text}"
    );
}
