//! `contextpilotd service …`: install, remove and drive the login service
//! (launchd on macOS, systemd --user on Linux).
//!
//! Exit codes: 0 done, 1 the service manager or the file system refused,
//! 2 bad usage (no home directory, a path that cannot go in a unit file).
//! `service status`: 0 running, 3 installed but not running or not
//! installed, 1 the service manager could not be asked.

use std::path::{Path, PathBuf};

use super::{report, ConfigArg, EXIT_CONFIG, EXIT_FAILURE, EXIT_NOT_RUNNING, EXIT_OK};
use crate::config::ConfigSource;
use crate::service::{self, Action, Context, Platform, ServiceError, Step, UnitSpec};

#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print the service-manager commands (and the file to write) instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Act for this platform's service manager (dry runs and `print` on another platform).
    #[arg(long, value_enum, hide = true)]
    pub platform: Option<Platform>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ServiceCommand {
    /// Write the unit for this platform and load it: starts now and at every login.
    Install(ServiceArgs),
    /// Stop the service and remove its unit; the configuration and logs stay.
    Uninstall(ServiceArgs),
    /// Start the installed service.
    Start(ServiceArgs),
    /// Stop the service (it starts again at the next login).
    Stop(ServiceArgs),
    /// Restart the service.
    Restart(ServiceArgs),
    /// What the service manager says about the service.
    Status(ServiceArgs),
    /// Print the unit `install` would write; changes nothing.
    Print {
        #[command(flatten)]
        args: ServiceArgs,
        /// The macOS LaunchAgent plist.
        #[arg(long, conflicts_with = "systemd")]
        launchd: bool,
        /// The Linux systemd user unit.
        #[arg(long)]
        systemd: bool,
    },
}

pub fn run(command: ServiceCommand) -> i32 {
    let result = match command {
        ServiceCommand::Install(a) => act(Action::Install, &a),
        ServiceCommand::Uninstall(a) => act(Action::Uninstall, &a),
        ServiceCommand::Start(a) => act(Action::Start, &a),
        ServiceCommand::Stop(a) => act(Action::Stop, &a),
        ServiceCommand::Restart(a) => act(Action::Restart, &a),
        ServiceCommand::Status(a) => return status(&a),
        ServiceCommand::Print {
            args,
            launchd,
            systemd,
        } => {
            let platform = if launchd {
                Platform::Macos
            } else if systemd {
                Platform::Linux
            } else {
                args.platform.unwrap_or_else(Platform::current)
            };
            print(platform, &args)
        }
    };
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            report(&e);
            match e {
                ServiceError::Usage(_) => EXIT_CONFIG,
                ServiceError::Failed(_) => EXIT_FAILURE,
            }
        }
    }
}

/// The user's home, where unit files and LaunchAgent logs go.
fn home() -> Result<PathBuf, ServiceError> {
    directories::BaseDirs::new()
        .map(|d| d.home_dir().to_path_buf())
        .filter(|h| h.is_absolute())
        .ok_or_else(|| ServiceError::Usage("cannot determine the home directory (set HOME)".into()))
}

fn unit_path(platform: Platform, home: &Path) -> PathBuf {
    let xdg = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from);
    service::unit_path(platform, home, xdg.as_deref())
}

/// The spec `install` and `print` write: this very binary, the configuration
/// file every other command would read, both absolute.
fn spec(arg: &ConfigArg, home: &Path) -> Result<UnitSpec, ServiceError> {
    let exe = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .map_err(|e| ServiceError::Failed(format!("cannot find this program's own path: {e}")))?;
    let source = ConfigSource::locate(arg.config.as_deref());
    let config = source.path().ok_or_else(|| {
        ServiceError::Usage("no configuration file could be located: pass --config PATH".into())
    })?;
    let config = absolute(config)?;
    UnitSpec::new(&exe, &config, home)
}

/// Absolute without requiring the file to exist; symlinks resolved when it does.
fn absolute(path: &Path) -> Result<PathBuf, ServiceError> {
    if let Ok(canonical) = path.canonicalize() {
        return Ok(canonical);
    }
    std::path::absolute(path).map_err(|e| {
        ServiceError::Usage(format!(
            "cannot make {} an absolute path: {e}",
            path.display()
        ))
    })
}

fn print(platform: Platform, args: &ServiceArgs) -> Result<(), ServiceError> {
    let home = home()?;
    print!(
        "{}",
        service::unit_text(platform, &spec(&args.config, &home)?)
    );
    Ok(())
}

fn act(action: Action, args: &ServiceArgs) -> Result<(), ServiceError> {
    let platform = args.platform.unwrap_or_else(Platform::current);
    let home = home()?;
    let unit_path = unit_path(platform, &home);
    let spec = match action {
        Action::Install => Some(spec(&args.config, &home)?),
        _ => None,
    };
    let program = platform.program();
    let cx = Context {
        platform,
        program: &program,
        uid: nix::unistd::getuid().as_raw(),
        unit_path: &unit_path,
        home: &home,
        spec: spec.as_ref(),
    };
    let steps = service::steps(action, &cx);
    // The dry run warns as the install would, on stderr: stdout stays the
    // steps alone.
    if let Some(spec) = &spec {
        for warning in service::install_warnings(spec, Path::new(&spec.config).is_file()) {
            eprintln!("contextpilotd: warning: {warning}");
        }
    }
    if args.dry_run {
        print!("{}", service::describe(&steps));
        return Ok(());
    }
    if action != Action::Install && action != Action::Uninstall && !unit_path.is_file() {
        return Err(ServiceError::Usage(format!(
            "not installed as a service ({} does not exist): contextpilotd service install",
            unit_path.display()
        )));
    }
    service::run_steps(&steps).map_err(|e| match (action, e) {
        (Action::Install, ServiceError::Failed(message)) => {
            let manual: Vec<String> = steps
                .iter()
                .filter_map(|s| match s {
                    Step::Run(argv) | Step::Bootstrap { argv, .. } => {
                        Some(service::shell_line(argv))
                    }
                    _ => None,
                })
                .collect();
            ServiceError::Failed(format!(
                "{message}\n  the unit file {} is written; load it with: {} \
                 (or remove it: contextpilotd service uninstall)",
                unit_path.display(),
                manual.join(" && ")
            ))
        }
        (_, e) => e,
    })
}

fn status(args: &ServiceArgs) -> i32 {
    let platform = args.platform.unwrap_or_else(Platform::current);
    let home = match home() {
        Ok(h) => h,
        Err(e) => {
            report(&e);
            return EXIT_CONFIG;
        }
    };
    let unit_path = unit_path(platform, &home);
    let uid = nix::unistd::getuid().as_raw();
    if args.dry_run {
        let program = platform.program();
        let argv = match platform {
            Platform::Macos => service::launchd::print_command(&program, uid),
            Platform::Linux => service::systemd::show_command(&program),
        };
        println!("{}", service::shell_line(&argv));
        return EXIT_OK;
    }
    let found = service::query(platform, uid, &unit_path);
    println!("service  {}", service::describe_report(&found));
    let running = found
        .manager_state
        .as_ref()
        .is_some_and(service::ServiceState::is_running);
    if !running {
        if let Some(step) = service::next_step(&found, false, &platform.logs_hint(&home)) {
            println!("next     {step}");
        }
    }
    if running {
        EXIT_OK
    } else if found.manager_state.is_none() && found.installed {
        EXIT_FAILURE
    } else {
        EXIT_NOT_RUNNING
    }
}
