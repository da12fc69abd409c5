//! `contextpilotd print-command`: the llama-server command line, shell-quoted.

use std::path::PathBuf;

use super::{report, ConfigArg, EXIT_CONFIG, EXIT_OK};
use crate::config::ConfigSource;
use crate::daemon;
use crate::plan::shell_quote;
use crate::supervisor::process::free_loopback_port;

pub fn run(arg: ConfigArg, hardware: Option<PathBuf>) -> i32 {
    let source = ConfigSource::locate(arg.config.as_deref());
    let prepared = match daemon::prepare(source, hardware.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            report(&e);
            return EXIT_CONFIG;
        }
    };
    if let Err(e) = &prepared.binary {
        eprintln!("contextpilotd: warning: {e}");
    }
    // With port 0 the daemon picks a free port at each start; pick one now
    // too, so the printed command runs as it is.
    let port = match prepared.config.llama.port {
        0 => free_loopback_port().unwrap_or(0),
        port => port,
    };
    println!("{}", shell_quote(&prepared.argv(port)));
    EXIT_OK
}
