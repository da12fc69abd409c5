//! `contextpilotd print-command`: the llama-server command line, shell-quoted.

use std::path::PathBuf;

use super::{ConfigArg, EXIT_OK};
use crate::plan::shell_quote;
use crate::supervisor::process::free_loopback_port;

pub fn run(arg: ConfigArg, hardware: Option<PathBuf>) -> i32 {
    let prepared = match super::prepare(&arg, hardware.as_deref()) {
        Ok(p) => p,
        Err(code) => return code,
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
