//! The systemd user unit: its text, the `systemctl --user` command lines, and
//! the parser for `systemctl --user show`.
//!
//! Everything here is pure, so Linux tests cover it byte for byte.

use std::path::{Path, PathBuf};

use super::{ServiceState, UnitSpec};

/// The unit's file name under `systemd/user/`.
pub const UNIT: &str = "contextpilotd.service";

/// Properties `service status` and `status` ask for, in this order.
pub const SHOW_PROPERTIES: &str =
    "ActiveState,SubState,MainPID,ExecMainStatus,LoadState,UnitFileState";

/// Where systemd looks for this user's units: `$XDG_CONFIG_HOME/systemd/user/`,
/// else `~/.config/systemd/user/`. An empty or relative `XDG_CONFIG_HOME` is
/// ignored, as the XDG spec says.
pub fn unit_path(home: &Path, xdg_config_home: Option<&Path>) -> PathBuf {
    let base = match xdg_config_home {
        Some(dir) if dir.is_absolute() => dir.to_path_buf(),
        _ => home.join(".config"),
    };
    base.join("systemd/user").join(UNIT)
}

/// The unit file. Keep it in step with `assets/systemd/contextpilotd.service`;
/// a test compares the two directive by directive.
pub fn unit(spec: &UnitSpec) -> String {
    let exec_start = spec
        .program_arguments()
        .iter()
        .enumerate()
        .map(|(i, arg)| {
            if i == 0 {
                exec_program(arg)
            } else {
                exec_arg(arg)
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "# Written by `contextpilotd service install`; `contextpilotd service uninstall` removes it.\n\
         [Unit]\n\
         Description=contextpilotd: llama-server supervisor with an OpenAI-compatible API\n\
         After=network.target\n\
         StartLimitIntervalSec=60\n\
         StartLimitBurst=5\n\
         \n\
         [Service]\n\
         Type=simple\n\
         ExecStart={exec_start}\n\
         Restart=on-failure\n\
         RestartSec=3\n\
         # Exit code 2 is a configuration problem: restarting cannot fix it.\n\
         RestartPreventExitStatus=2\n\
         # The daemon stops llama-server itself (SIGTERM, then SIGKILL); give it time.\n\
         TimeoutStopSec=30\n\
         KillMode=mixed\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n"
    )
}

/// One `ExecStart=` argument, quoted the way systemd.service(5) reads it:
/// `%` starts a specifier and `$` a variable, so both are doubled; an
/// argument with whitespace, quotes or backslashes goes in double quotes with
/// `\` and `"` escaped; a bare `;` would separate commands.
pub fn exec_arg(arg: &str) -> String {
    quote(&arg.replace('%', "%%").replace('$', "$$"), arg)
}

/// The executable of `ExecStart=`: like [`exec_arg`], except that systemd
/// expands no variables in it, so a `$` stays single (`$$` would stay `$$`).
pub fn exec_program(path: &str) -> String {
    quote(&path.replace('%', "%%"), path)
}

fn quote(escaped: &str, arg: &str) -> String {
    let needs_quotes = arg.is_empty()
        || arg == ";"
        || arg
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\'));
    if !needs_quotes {
        return escaped.to_string();
    }
    let mut quoted = String::with_capacity(escaped.len() + 2);
    quoted.push('"');
    for c in escaped.chars() {
        if matches!(c, '\\' | '"') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

fn systemctl(program: &str, args: &[&str]) -> Vec<String> {
    std::iter::once(program)
        .chain(["--user"])
        .chain(args.iter().copied())
        .map(str::to_string)
        .collect()
}

pub fn install_commands(program: &str) -> Vec<Vec<String>> {
    vec![
        systemctl(program, &["daemon-reload"]),
        systemctl(program, &["enable", "--now", UNIT]),
    ]
}

pub fn uninstall_commands(program: &str) -> Vec<Vec<String>> {
    vec![systemctl(program, &["disable", "--now", UNIT])]
}

/// After the unit file is gone, so systemd forgets it.
pub fn after_uninstall_commands(program: &str) -> Vec<Vec<String>> {
    vec![systemctl(program, &["daemon-reload"])]
}

pub fn start_command(program: &str) -> Vec<String> {
    systemctl(program, &["start", UNIT])
}

pub fn stop_command(program: &str) -> Vec<String> {
    systemctl(program, &["stop", UNIT])
}

pub fn restart_command(program: &str) -> Vec<String> {
    systemctl(program, &["restart", UNIT])
}

pub fn show_command(program: &str) -> Vec<String> {
    let property = format!("--property={SHOW_PROPERTIES}");
    systemctl(program, &["show", UNIT, &property])
}

/// Reads `systemctl --user show` output (`Key=Value` lines). A unit systemd
/// does not know has `LoadState=not-found`.
pub fn parse_show(output: &str) -> ServiceState {
    let mut state = ServiceState::default();
    let mut sub_state = None;
    for line in output.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "LoadState" => state.loaded = Some(value == "loaded"),
            "ActiveState" if !value.is_empty() => state.state = Some(value.to_string()),
            "SubState" if !value.is_empty() => sub_state = Some(value.to_string()),
            "MainPID" => state.pid = value.parse().ok().filter(|pid| *pid != 0),
            "ExecMainStatus" if !value.is_empty() => state.last_exit = Some(value.to_string()),
            "UnitFileState" if !value.is_empty() => state.enabled = Some(value == "enabled"),
            _ => {}
        }
    }
    if let (Some(active), Some(sub)) = (&state.state, sub_state) {
        state.state = Some(format!("{active} ({sub})"));
    }
    // A unit that never ran reports ExecMainStatus=0 like a clean exit.
    if state.pid.is_some() {
        state.last_exit = None;
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_args_follow_systemd_quoting() {
        assert_eq!(exec_arg("/usr/bin/contextpilotd"), "/usr/bin/contextpilotd");
        assert_eq!(exec_arg("/a b/c"), "\"/a b/c\"");
        assert_eq!(exec_arg("50%"), "50%%");
        assert_eq!(exec_arg("$HOME"), "$$HOME");
        assert_eq!(exec_arg("a\"b c"), "\"a\\\"b c\"");
        assert_eq!(exec_arg("a\\b"), "\"a\\\\b\"");
        assert_eq!(exec_arg(""), "\"\"");
        assert_eq!(exec_arg(";"), "\";\"");
        assert_eq!(exec_program("/a $b/100%"), "\"/a $b/100%%\"");
    }

    #[test]
    fn unit_path_prefers_an_absolute_xdg_config_home() {
        let home = Path::new("/home/me");
        assert_eq!(
            unit_path(home, None),
            Path::new("/home/me/.config/systemd/user/contextpilotd.service")
        );
        assert_eq!(
            unit_path(home, Some(Path::new("/cfg"))),
            Path::new("/cfg/systemd/user/contextpilotd.service")
        );
        assert_eq!(
            unit_path(home, Some(Path::new("relative"))),
            Path::new("/home/me/.config/systemd/user/contextpilotd.service")
        );
    }

    #[test]
    fn command_lines() {
        assert_eq!(
            install_commands("systemctl"),
            vec![
                vec!["systemctl", "--user", "daemon-reload"],
                vec![
                    "systemctl",
                    "--user",
                    "enable",
                    "--now",
                    "contextpilotd.service"
                ],
            ]
        );
        assert_eq!(
            show_command("systemctl"),
            vec![
                "systemctl",
                "--user",
                "show",
                "contextpilotd.service",
                "--property=ActiveState,SubState,MainPID,ExecMainStatus,LoadState,UnitFileState"
            ]
        );
        assert_eq!(
            restart_command("systemctl"),
            vec!["systemctl", "--user", "restart", "contextpilotd.service"]
        );
    }
}
