//! `contextpilotd run`: the daemon in the foreground.

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use super::{report, ConfigArg, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK};
use crate::config::Config;
use crate::daemon;

pub fn run(arg: ConfigArg) -> i32 {
    let runtime = match super::runtime(true) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async {
        // First of all, so that SIGTERM during start-up is an orderly stop.
        let signals = match daemon::ShutdownSignals::install() {
            Ok(s) => s,
            Err(e) => {
                report(&format!("cannot install signal handlers: {e}"));
                return EXIT_FAILURE;
            }
        };
        let prepared = match super::prepare(&arg, None) {
            Ok(p) => p,
            Err(code) => return code,
        };
        // A missing binary is reported before anything starts.
        if let Err(e) = &prepared.binary {
            report(e);
            return EXIT_CONFIG;
        }
        init_logging(&prepared.config);
        match daemon::run(prepared, signals).await {
            Ok(()) => EXIT_OK,
            Err(e) => {
                report(&e);
                EXIT_CONFIG
            }
        }
    })
}

/// Logs to stderr (what a terminal, launchd or journald shows) and to
/// `contextpilotd.log` in the log dir. `CONTEXTPILOTD_LOG` overrides the level
/// with an `EnvFilter` directive.
fn init_logging(config: &Config) {
    let filter = || {
        EnvFilter::try_from_env("CONTEXTPILOTD_LOG")
            .unwrap_or_else(|_| EnvFilter::new(&config.log.level))
    };
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter());
    let file = config.log_dir().and_then(|dir| {
        std::fs::create_dir_all(&dir).ok()?;
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("contextpilotd.log"))
            .ok()
    });
    let file_layer = file.map(|f| {
        fmt::layer()
            .with_ansi(false)
            .with_writer(Mutex::new(f))
            .with_filter(filter())
    });
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file_layer)
        .try_init();
}
