//! `contextpilotd run`: the daemon in the foreground.

use super::{logging, report, ConfigArg, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK};
use crate::daemon;

/// `model`: `--model PATH|NAME`, served instead of `[llama] model` (a
/// one-off run needs no configuration file at all).
pub fn run(arg: ConfigArg, model: Option<String>) -> i32 {
    let runtime = match super::runtime(true) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let (code, logs) = runtime.block_on(async {
        // First of all, so that SIGTERM during start-up is an orderly stop.
        let signals = match daemon::ShutdownSignals::install() {
            Ok(s) => s,
            Err(e) => {
                report(&format!("cannot install signal handlers: {e}"));
                return (EXIT_FAILURE, None);
            }
        };
        let overrides = daemon::Overrides { model };
        let source = crate::config::ConfigSource::locate(arg.config.as_deref());
        let startup = match daemon::prepare_startup(source, None, &overrides) {
            Ok(startup) => startup,
            Err(e) => {
                report(&e);
                return (EXIT_CONFIG, None);
            }
        };
        // A missing binary is reported before anything starts.
        if let daemon::Startup::Local(prepared) = &startup {
            if let Err(e) = &prepared.binary {
                report(e);
                return (EXIT_CONFIG, None);
            }
        }
        // From here on log lines go where `logging` decides; errors that
        // stop the start still go to stderr, after the lines before them.
        let logs = logging::init(startup.config());
        match daemon::run(startup, signals, logs.bus.clone()).await {
            Ok(()) => (EXIT_OK, Some(logs)),
            Err(e) => {
                drop(logs);
                report(&e);
                (EXIT_CONFIG, None)
            }
        }
    });
    // The runtime's last tasks may still log; then the writers finish.
    drop(runtime);
    drop(logs);
    code
}
