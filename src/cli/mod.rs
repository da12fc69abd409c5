//! The command line: one file per command, all sharing [`Cli`].
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 bad configuration or usage
//! (also "already running"), 3 `status` found no daemon listening.

mod doctor;
mod logging;
mod logs;
mod models;
mod print_command;
mod ps;
mod pull;
mod run;
mod service;
mod status;
mod tune;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_CONFIG: i32 = 2;
pub const EXIT_NOT_RUNNING: i32 = 3;

const EXAMPLES: &str = "\
Examples:
  contextpilotd run --config ~/.config/contextpilotd/config.toml
      Run the daemon in the foreground (what launchd and systemd run).
  contextpilotd run --model ~/models/Qwen3-8B-Q4_K_M.gguf
      Serve one model, no configuration file needed.
  contextpilotd status
      Ask the running daemon how it and its llama-server are doing.
  contextpilotd status --json | jq .child
      The same, as JSON.
  contextpilotd logs -f --requests
      Follow the daemon's log: a line per request as it is answered.
  contextpilotd print-command
      Show the llama-server command line the daemon would run.
  contextpilotd doctor --hardware m3max.json
      Explain every derived setting for another machine's hardware profile.
  contextpilotd models
      List the GGUF models found (Hugging Face cache, LM Studio, Ollama, ...) by name.
  contextpilotd tune
      Measure prompt times on this machine; run uses them for slots and flags.
  contextpilotd ps
      Show the loaded models; `load NAME` and `unload NAME` change that.
  contextpilotd pull unsloth/Qwen3-0.6B-GGUF:Q4_K_M
      Download a GGUF into the Hugging Face hub cache; prints its path.
  contextpilotd service install
      Start the daemon at login (launchd on macOS, systemd --user on Linux).

Then point any OpenAI client at http://127.0.0.1:8765/v1.";

#[derive(Debug, Parser)]
#[command(
    name = "contextpilotd",
    version,
    about = "Supervises llama-server and serves it as a fast, metered OpenAI-compatible API",
    after_help = EXAMPLES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// Configuration file [default: $CONTEXTPILOTD_CONFIG, else the platform config dir]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground: supervise llama-server and serve the API.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Serve this model (a .gguf path, or a name `contextpilotd models` lists) instead of `[llama] model`.
        #[arg(long, value_name = "PATH|NAME")]
        model: Option<String>,
    },
    /// Show what the running daemon and its llama-server are doing.
    Status {
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show the running daemon's recent log lines (its own, llama-server's, one per request).
    Logs {
        /// Keep printing new lines as they are logged, until Ctrl-C or the daemon stops.
        #[arg(short, long)]
        follow: bool,
        /// Only the one line per request (method, path, model, status, times, cache, slot).
        #[arg(long)]
        requests: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the llama-server command line the daemon would run; changes nothing.
    PrintCommand {
        #[command(flatten)]
        config: ConfigArg,
        /// Plan for this hardware profile (the `hardware` object of `doctor --json`) instead of detecting.
        #[arg(long, value_name = "FILE")]
        hardware: Option<PathBuf>,
    },
    /// Explain the detected hardware, the model, and every derived llama-server setting.
    Doctor {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
        /// Plan for this hardware profile instead of detecting.
        #[arg(long, value_name = "FILE")]
        hardware: Option<PathBuf>,
    },
    /// List the models that can be served by name: the config's, and GGUF files in the Hugging Face cache, LM Studio, Ollama, llama.cpp's cache and [models] dirs.
    Models {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Measure this machine's prompt costs with a llama-server of its own, cache them, and say what they decide.
    Tune {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show the models the running daemon has loaded: size, slots, busy, until when.
    Ps {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Load a model in the running daemon (it answers once the model is ready).
    Load {
        /// The model's name (`contextpilotd models` lists them).
        model: String,
        /// How long it stays loaded once idle: seconds, "5m", or -1 for ever.
        #[arg(long, allow_hyphen_values = true)]
        keep_alive: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Unload a model from the running daemon (after its requests, if busy).
    Unload {
        model: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Download a GGUF from the Hugging Face hub into the hub cache; prints its path.
    Pull {
        /// The hub repository, owner/name, with an optional quantisation or file name after ':' [default quant: Q4_K_M, else Q4_0, else the first GGUF].
        #[arg(value_name = "REPO[:QUANT]")]
        spec: String,
        /// The branch, tag or commit to pull from.
        #[arg(long, value_name = "REV", default_value = "main")]
        revision: String,
    },
    /// Run the daemon as a login service: install, uninstall, start, stop, restart, status, print.
    Service {
        #[command(subcommand)]
        command: service::ServiceCommand,
    },
    /// Internal: kills the daemon's children when the daemon dies.
    #[command(name = "__watchdog", hide = true)]
    Watchdog,
}

/// Parses the command line, runs the command, and returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, model } => run::run(config, model),
        Command::Status { json, config } => status::run(config, json),
        Command::Logs {
            follow,
            requests,
            config,
        } => logs::run(config, follow, requests),
        Command::PrintCommand { config, hardware } => print_command::run(config, hardware),
        Command::Doctor {
            json,
            config,
            hardware,
        } => doctor::run(config, hardware, json),
        Command::Models { json, config } => models::run(config, json),
        Command::Tune { json, config } => tune::run(config, json),
        Command::Ps { json, config } => ps::ps(config, json),
        Command::Load {
            model,
            keep_alive,
            config,
        } => ps::load(config, model, keep_alive),
        Command::Unload { model, config } => ps::unload(config, model),
        Command::Pull { spec, revision } => pull::run(&spec, revision),
        Command::Service { command } => service::run(command),
        Command::Watchdog => {
            crate::supervisor::process::run_watchdog(
                std::io::stdin().lock(),
                std::time::Duration::from_secs(5),
            );
            EXIT_OK
        }
    }
}

/// The async runtime a command runs on (multi-threaded or not), or the exit
/// code after saying why there is none.
fn runtime(multi_thread: bool) -> Result<tokio::runtime::Runtime, i32> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().map_err(|e| {
        report(&format!("cannot start the async runtime: {e}"));
        EXIT_FAILURE
    })
}

/// The preflight of every command that plans a child (`daemon::prepare`);
/// a problem is reported and becomes exit code 2.
fn prepare(
    arg: &ConfigArg,
    hardware: Option<&std::path::Path>,
) -> Result<crate::daemon::Prepared, i32> {
    let source = crate::config::ConfigSource::locate(arg.config.as_deref());
    crate::daemon::prepare(source, hardware).map_err(|e| {
        report(&e);
        EXIT_CONFIG
    })
}

/// Prints a start-up error the way every command does.
fn report(error: &dyn std::fmt::Display) {
    eprintln!("contextpilotd: error: {error}");
}

/// One request to the running daemon named by the configuration: GET
/// `path`, or POST `body`; the answer's JSON, or the exit code after
/// saying what went wrong.
fn ask_daemon(
    arg: &ConfigArg,
    path: &str,
    body: Option<serde_json::Value>,
    timeout: std::time::Duration,
) -> Result<serde_json::Value, i32> {
    use crate::http_client::{HttpClient, HttpError};
    let source = crate::config::ConfigSource::locate(arg.config.as_deref());
    let config = crate::config::Config::load(&source).map_err(|e| {
        report(&e);
        EXIT_CONFIG
    })?;
    let listen = config.server.listen;
    let url = format!("http://{listen}{path}");
    let auth = config
        .server
        .api_key
        .as_ref()
        .map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let client = HttpClient::new();
    let answer = runtime(false)?.block_on(async {
        match &body {
            Some(body) => client.post_json(&url, &headers, body, timeout).await,
            None => client.get_with_headers(&url, &headers, timeout).await,
        }
    });
    let (code, bytes) = match answer {
        Ok(answer) => answer,
        Err(HttpError::Connect(_)) => {
            eprintln!("contextpilotd is not running: nothing is listening on {listen} (configuration: {source})");
            return Err(EXIT_NOT_RUNNING);
        }
        Err(e) => {
            report(&format!("{url}: {e}"));
            return Err(EXIT_FAILURE);
        }
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if !code.is_success() {
        let message = value
            .pointer("/error/message")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        report(&message);
        return Err(EXIT_FAILURE);
    }
    Ok(value)
}
