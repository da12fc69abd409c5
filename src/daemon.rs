//! Putting the daemon together: preflight checks, the one-instance lock, the
//! listener, the supervisor and the gateway, and an orderly shutdown.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError, ConfigSource, KeepAlive};
use crate::cost::CostProfile;
use crate::gateway::{self, Gateway, Upstream};
use crate::gguf::{self, ModelFacts};
use crate::hardware::{self, Hardware};
use crate::logbus::LogBus;
use crate::meter::gpu::GpuSampler;
use crate::meter::Meter;
use crate::models::engine::Launcher;
use crate::models::{Fleet, ModelSpec};
use crate::plan::{self, BinaryCaps, LaunchPlan};
use crate::reorder::prepare::{Reorder, Settings as ReorderSettings};
use crate::supervisor::process::Watchdog;

/// How long open client connections get to finish on shutdown.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Why the daemon could not start. Everything here is the user's to fix, so
/// it maps to exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("contextpilotd is already running for {listen} (pid {pid}); stop it first or change [server] listen")]
    AlreadyRunning { listen: SocketAddr, pid: String },
    #[error(
        "cannot listen on {listen}: {source}; another program holds it (change [server] listen)"
    )]
    ListenInUse {
        listen: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create the instance lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Everything the commands derive from configuration before doing anything.
pub struct Prepared {
    pub source: ConfigSource,
    pub config: Config,
    /// The configured binary resolved on PATH, or why it cannot be run.
    pub binary: Result<PathBuf, ConfigError>,
    pub model: ModelFacts,
    pub hardware: Hardware,
    /// True when the hardware came from `--hardware FILE`.
    pub hardware_from_file: bool,
    /// What the binary supports (from its `--help`).
    pub caps: BinaryCaps,
    /// The cost profile the plan used: `[cost] profile`, or the cached
    /// measurement for `cost_key`; `None` when nothing is measured yet.
    pub cost: Option<CostProfile>,
    /// The cache key of a measurement of this binary, model, machine and
    /// speed-relevant flags.
    pub cost_key: String,
    /// The RPC workers and what each offers, asked before any child starts.
    pub rpc: Vec<crate::rpc::RpcWorker>,
    pub plan: LaunchPlan,
}

impl Prepared {
    /// The llama-server argv for `port`; the binary as configured when it
    /// cannot be resolved.
    pub fn argv(&self, port: u16) -> Vec<String> {
        let binary = match &self.binary {
            Ok(path) => path.clone(),
            Err(_) => PathBuf::from(&self.config.llama.binary),
        };
        plan::command_line(
            &binary,
            &self.model.path,
            port,
            &self.plan,
            &self.config.llama,
        )
    }
}

/// What `run` starts: the local child (and any upstreams next to it), or,
/// with no `[llama] model` but `[[upstream]]`s, a front for the upstreams
/// alone.
pub enum Startup {
    Local(Box<Prepared>),
    FrontOnly(Box<FrontOnly>),
}

impl Startup {
    pub fn config(&self) -> &Config {
        match self {
            Startup::Local(prepared) => &prepared.config,
            Startup::FrontOnly(front) => &front.config,
        }
    }
}

/// A daemon with no child: no model file, binary or plan, only the
/// configuration whose every `[[upstream]]` names the model it serves.
pub struct FrontOnly {
    pub source: ConfigSource,
    pub config: Config,
}

/// What a first run with no model needs to hear: which file to write, what
/// to put in it, and where `make run` keeps its demo model.
pub fn no_model_message(source: &ConfigSource) -> String {
    let what = "`[llama]` then `model = \"/path/to/model.gguf\"`";
    let edit = match source {
        ConfigSource::Default(p) if !p.exists() => {
            format!("create {} containing {what}", p.display())
        }
        ConfigSource::BuiltIn => {
            format!("write a configuration file containing {what} and pass it with --config")
        }
        _ => format!(
            "add {what} to {}",
            source
                .path()
                .map_or_else(String::new, |p| p.display().to_string())
        ),
    };
    format!(
        "no model configured; {edit} (configuration read: {source}). To try a small demo model, \
         run `make run` in the contextpilotd sources: it provisions one under ~/.cache/contextpilotd/models/ \
         and runs with target/demo/config.toml"
    )
}

/// Loads the configuration, checks the model and the binary, reads the
/// model's header, detects (or reads) the hardware and plans the launch.
/// What the command line says instead of the configuration.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `run --model PATH|NAME`.
    pub model: Option<String>,
}

pub fn prepare(
    source: ConfigSource,
    hardware_file: Option<&Path>,
) -> Result<Prepared, ConfigError> {
    prepare_with(source, hardware_file, &Overrides::default())
}

/// [`prepare`] with the command line's overrides applied to the
/// configuration first. For the commands that need the local model: a
/// front-only configuration is the missing `[llama] model` to them.
pub fn prepare_with(
    source: ConfigSource,
    hardware_file: Option<&Path>,
    overrides: &Overrides,
) -> Result<Prepared, ConfigError> {
    match prepare_startup(source, hardware_file, overrides)? {
        Startup::Local(prepared) => Ok(*prepared),
        Startup::FrontOnly(front) => Err(ConfigError::new(
            front.source.path(),
            Some("llama.model"),
            format!(
                "this configuration has {} and no [llama] model, so `run` serves as a front for them with no llama-server of its own; this command needs a local model: {}",
                crate::plan::counted(front.config.upstream.len() as u64, "[[upstream]]"),
                no_model_message(&front.source)
            ),
        )),
    }
}

/// What `run` starts: [`prepare_with`]'s preparation of the local model, or
/// the front for the upstreams when the configuration has `[[upstream]]`s
/// and no `[llama] model` (nor `--model`).
pub fn prepare_startup(
    source: ConfigSource,
    hardware_file: Option<&Path>,
    overrides: &Overrides,
) -> Result<Startup, ConfigError> {
    let mut config = Config::load(&source)?;
    let file = source.path();
    if let Some(model) = &overrides.model {
        let (path, name) = model_by_path_or_name(&config, model)
            .map_err(|message| ConfigError::new(None, Some("--model"), message))?;
        if name.is_some() || config.llama.model.as_deref() != Some(path.as_path()) {
            // Served under the name it was asked for (a path: its file
            // stem); the configured alias named the configured model.
            config.llama.model_alias = name;
        }
        config.llama.model = Some(path);
    }
    if config.llama.model.is_none() && !config.upstream.is_empty() {
        check_front_only(&config, file)?;
        return Ok(Startup::FrontOnly(Box::new(FrontOnly { source, config })));
    }
    let model_path =
        config.llama.model.as_deref().ok_or_else(|| {
            ConfigError::new(file, Some("llama.model"), no_model_message(&source))
        })?;
    if !model_path.is_file() {
        return Err(ConfigError::new(
            file,
            Some("llama.model"),
            format!("model file {} does not exist", model_path.display()),
        ));
    }
    // An absolute, canonical path: llama-server reports it back in
    // /props.model_path, which is how readiness is recognised.
    let model_path = model_path.canonicalize().map_err(|e| {
        ConfigError::new(
            file,
            Some("llama.model"),
            format!("{}: {e}", model_path.display()),
        )
    })?;
    let model = gguf::read_model_facts(&model_path)
        .and_then(|facts| gguf::check_tensor_data(&model_path, &facts).map(|()| facts))
        .map_err(|e| ConfigError::new(file, Some("llama.model"), e.to_string()))?;
    check_fallback(&config, file, &model_specs(&config, &model_path))?;
    for entry in &config.models.model {
        if !entry.path.is_file() {
            return Err(ConfigError::new(
                file,
                Some("models.model.path"),
                format!(
                    "model file {} (of {:?}) does not exist",
                    entry.path.display(),
                    entry.name
                ),
            ));
        }
    }
    let binary = resolve_binary(&config.llama.binary)
        .map_err(|message| ConfigError::new(file, Some("llama.binary"), message));
    let (hardware, hardware_from_file) = hardware_for(hardware_file)?;
    let caps = binary
        .as_ref()
        .ok()
        .map(|b| read_caps(b))
        .unwrap_or_default();
    let binary_path = binary
        .clone()
        .unwrap_or_else(|_| PathBuf::from(&config.llama.binary));
    let memory_limit = config
        .models
        .memory_mib
        .value()
        .map(|mib| u64::from(mib) << 20);
    // Asked only when the child can use them; each connection is closed
    // before the child starts (a worker serves one client at a time).
    let rpc = if caps.rpc {
        crate::rpc::query_all(&config.llama.rpc_workers)
    } else {
        Vec::new()
    };
    let planned = crate::models::engine::plan_model(
        &hardware,
        &model,
        &config.llama,
        caps,
        &config.cost,
        &binary_path,
        memory_limit,
        &rpc,
    )
    .map_err(|e| ConfigError::new(file, Some("cost.profile"), e))?;
    let (plan, cost, cost_key) = (planned.plan, planned.cost, planned.cost_key);
    Ok(Startup::Local(Box::new(Prepared {
        source,
        config,
        binary,
        model,
        hardware,
        hardware_from_file,
        caps,
        cost,
        cost_key,
        rpc,
        plan,
    })))
}

/// `[models] fallback`, when set, must name one of `specs`.
fn check_fallback(
    config: &Config,
    file: Option<&Path>,
    specs: &[ModelSpec],
) -> Result<(), ConfigError> {
    let Some(fallback) = &config.models.fallback else {
        return Ok(());
    };
    let named = |s: &ModelSpec| {
        s.name.eq_ignore_ascii_case(fallback)
            || s.aliases.iter().any(|a| a.eq_ignore_ascii_case(fallback))
    };
    if specs.iter().any(named) {
        return Ok(());
    }
    let served: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    Err(ConfigError::new(
        file,
        Some("models.fallback"),
        format!("{fallback:?} names no model this daemon serves; it serves {served:?}"),
    ))
}

/// A front-only configuration: with no local model to default to, every
/// upstream must name the model it serves.
fn check_front_only(config: &Config, file: Option<&Path>) -> Result<(), ConfigError> {
    if let Some(unnamed) = config
        .upstream
        .iter()
        .find(|u| u.model.as_deref().is_none_or(|m| m.trim().is_empty()))
    {
        return Err(ConfigError::new(
            file,
            Some("upstream.model"),
            format!(
                "the upstream {:?} has no `model`: with no [llama] model the daemon runs no model of its own, \
                 so each [[upstream]] must say which model it serves (e.g. model = \"qwen2.5-7b\"), \
                 or set [llama] model",
                unnamed.url
            ),
        ));
    }
    check_fallback(config, file, &upstream_specs(config))
}

/// The models a front-only daemon serves: each `[[upstream]]`'s `model`,
/// once, in configuration order. Its path is the first upstream's URL
/// (there is no file here); none is primary (none is loaded at start: the
/// first answers requests that name no model).
pub fn upstream_specs(config: &Config) -> Vec<ModelSpec> {
    let mut specs: Vec<ModelSpec> = Vec::new();
    for upstream in &config.upstream {
        // The exact name: the upstream's engine is served under it.
        let Some(name) = upstream.model.as_deref() else {
            continue;
        };
        if specs.iter().any(|s| s.name == name) {
            continue;
        }
        specs.push(ModelSpec {
            name: name.to_string(),
            aliases: Vec::new(),
            path: PathBuf::from(&upstream.url),
            keep_alive: KeepAlive::Forever,
            primary: false,
        });
    }
    specs
}

/// `--model`'s argument: a GGUF file, or the name of one the daemon can
/// serve (`contextpilotd models`), with the name it is served under.
fn model_by_path_or_name(
    config: &Config,
    model: &str,
) -> Result<(PathBuf, Option<String>), String> {
    let path = Path::new(model);
    if path.is_file() {
        let path = path.canonicalize().map_err(|e| format!("{model}: {e}"))?;
        return Ok((path, None));
    }
    let servable = crate::models::discover::servable(config);
    match crate::models::discover::find(&servable, model) {
        Some(found) => Ok((found.path.clone(), Some(found.name.clone()))),
        None => Err(format!(
            "{model} is neither a GGUF file nor the name of a model found here; \
             `contextpilotd models` lists the names, `contextpilotd pull <repo>` fetches one"
        )),
    }
}

/// What `binary --help` says it supports; nothing when it cannot be run
/// within a few seconds.
pub fn read_caps(binary: &Path) -> BinaryCaps {
    let child = std::process::Command::new(binary)
        .arg("--help")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return BinaryCaps::default();
    };
    let mut out = String::new();
    let reader = child.stdout.take().map(|mut stdout| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        })
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    if let Some(reader) = reader {
        out = reader.join().unwrap_or_default();
    }
    BinaryCaps::from_help(&out)
}

/// The machine to plan for: the `--hardware FILE` profile (then `true`), or
/// what this one is.
pub fn hardware_for(hardware_file: Option<&Path>) -> Result<(Hardware, bool), ConfigError> {
    Ok(match hardware_file {
        Some(path) => (read_hardware_file(path)?, true),
        None => (hardware::detect(), false),
    })
}

fn read_hardware_file(path: &Path) -> Result<Hardware, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            Some(path),
            None,
            format!("cannot read the hardware profile: {e}"),
        )
    })?;
    // Accept both a bare profile and a whole `doctor --json` document.
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        ConfigError::new(
            Some(path),
            None,
            format!("not a JSON hardware profile: {e}"),
        )
    })?;
    let profile = value.get("hardware").cloned().unwrap_or(value);
    serde_json::from_value(profile)
        .map_err(|e| ConfigError::new(Some(path), None, format!("not a hardware profile: {e}")))
}

/// Finds the llama-server binary: a path must be an executable file; a bare
/// name is looked up on PATH.
pub fn resolve_binary(binary: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if binary.contains('/') {
        let path = PathBuf::from(binary);
        return if executable(&path) {
            Ok(path)
        } else if path.exists() {
            Err(format!("{binary} is not an executable file"))
        } else {
            Err(format!("llama-server binary {binary} does not exist"))
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(binary))
        .find(|candidate| executable(candidate))
        .ok_or_else(|| {
            format!(
                "llama-server binary {binary:?} is not on PATH; install llama.cpp (macOS: brew install llama.cpp) or set [llama] binary to its path"
            )
        })
}

/// Holds an exclusive lock per listen address while the daemon runs; the file
/// holds the daemon's pid for the next one to name.
pub struct InstanceLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl InstanceLock {
    pub fn acquire(listen: SocketAddr) -> Result<InstanceLock, StartError> {
        let dir = runtime_dir();
        let path = dir.join(format!(
            "listen-{}.lock",
            listen.to_string().replace([':', '[', ']'], "_")
        ));
        let lock_err = |source| StartError::Lock {
            path: path.clone(),
            source,
        };
        private_dir(&dir).map_err(lock_err)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .map_err(lock_err)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(StartError::AlreadyRunning {
                    listen,
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.into()
                    },
                });
            }
        };
        let write_pid = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", std::process::id())
        };
        write_pid(&mut lock).map_err(lock_err)?;
        Ok(InstanceLock { _lock: lock, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `dir` (mode 0700) if needed and checks that it is a real
/// directory owned by us and closed to others, so nobody else can plant or
/// hold our lock file.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    let uid = nix::unistd::getuid().as_raw();
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o022 != 0 {
        return Err(std::io::Error::other(format!(
            "{} must be a directory owned by uid {uid} and writable only by it",
            dir.display()
        )));
    }
    Ok(())
}

/// `$XDG_RUNTIME_DIR/contextpilotd`, else `run/` in the per-user cache dir
/// (`~/.cache/contextpilotd/run`, `~/Library/Caches/contextpilotd/run`).
fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("contextpilotd");
    }
    directories::ProjectDirs::from("", "", "contextpilotd")
        .map(|d| d.cache_dir().join("run"))
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("contextpilotd-{}", nix::unistd::getuid()))
        })
}

/// Set to 1 to run without the watchdog, so tests can check that the
/// parent-death signal alone cleans up on Linux.
pub const NO_WATCHDOG_ENV: &str = "CONTEXTPILOTD_NO_WATCHDOG";

/// SIGTERM and SIGINT, caught from the moment the daemon starts so that a
/// stop during start-up is still an orderly stop with exit code 0.
pub struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Must run inside the tokio runtime.
    pub fn install() -> std::io::Result<ShutdownSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT; `logs` is what `GET /logs`
/// shows (the bus the log subscriber feeds).
pub async fn run(
    startup: Startup,
    mut signals: ShutdownSignals,
    logs: LogBus,
) -> Result<(), StartError> {
    let local = match &startup {
        Startup::Local(prepared) => Some((prepared.as_ref(), prepared.binary.clone()?)),
        Startup::FrontOnly(_) => None,
    };
    let config = startup.config();
    let listen = config.server.listen;
    let lock = InstanceLock::acquire(listen)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| StartError::ListenInUse { listen, source })?;
    tracing::info!(
        "contextpilotd {} listening on http://{listen} (lock {})",
        env!("CARGO_PKG_VERSION"),
        lock.path().display()
    );
    let (fleet, primary_status, ctx_per_slot) = match local {
        Some((prepared, binary)) => {
            for warning in prepared
                .hardware
                .warnings
                .iter()
                .chain(&prepared.plan.warnings)
            {
                tracing::warn!("{warning}");
            }
            let watchdog = match std::env::var_os(NO_WATCHDOG_ENV).filter(|v| v == "1") {
                Some(_) => None,
                None => start_watchdog(),
            };
            let status = crate::status::StaticStatus::new(
                listen.to_string(),
                &prepared.model,
                &prepared.plan,
                &prepared.hardware,
                config.supervisor.ready_timeout_s,
            );
            (
                fleet(prepared, binary, watchdog),
                gateway::PrimaryStatus::Local(status),
                prepared.plan.ctx_per_slot,
            )
        }
        None => {
            tracing::info!(
                "no [llama] model: no llama-server runs here; routing to the {} only",
                crate::plan::counted(config.upstream.len() as u64, "upstream")
            );
            let fleet = Fleet::over(
                upstream_specs(config),
                config.models.fallback.as_deref(),
                Vec::new(),
            )
            .with_routing(config.routing.clone());
            let status = crate::status::StaticStatus::front_only(
                listen.to_string(),
                config.supervisor.ready_timeout_s,
            );
            // The upstreams' contexts are not known here: `[llama]
            // ctx_per_slot` when set, else a common default.
            let ctx_per_slot = config.llama.ctx_per_slot.value().unwrap_or(4096);
            (
                fleet,
                gateway::PrimaryStatus::FrontOnly(status),
                ctx_per_slot,
            )
        }
    };
    let runs_child = matches!(primary_status, gateway::PrimaryStatus::Local(_));
    let fleet = Arc::new(fleet);
    let query_log = config.query_log_path();
    match &query_log {
        Some(path) => tracing::info!("query log: {}", path.display()),
        None => tracing::warn!(
            "no data directory for the query log; requests are metered in memory only"
        ),
    }
    let gpu = (config.meter.gpu_sample_ms > 0)
        .then(|| GpuSampler::start(Duration::from_millis(config.meter.gpu_sample_ms)));
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let meter = Meter::start(&config.meter, query_log.clone());
    let gateway = Arc::new(Gateway {
        started: Instant::now(),
        fleet: fleet.clone(),
        primary_status,
        api_key: config.server.api_key.clone(),
        guard: gateway::guard::Policy {
            allowed_hosts: config.server.allowed_hosts.clone(),
            allowed_origins: config.server.allowed_origins.clone(),
        },
        meter: meter.clone(),
        query_log,
        upstream: Upstream::new(),
        max_body_bytes: config.server.max_body_bytes,
        queue_timeout: Duration::from_secs(config.server.queue_timeout_s),
        gpu,
        query_prefix: format!("{started_ms:x}"),
        reorder: Reorder::new(ReorderSettings {
            infer_documents: config.reorder.infer_documents(),
            dedup: config.reorder.dedup,
            threshold: crate::reorder::GainThreshold {
                min_ms: config.reorder.min_gain_ms,
                min_share: config.reorder.min_gain_share,
            },
            conversation_max_tokens: match config.reorder.conversation_max_tokens {
                0 => u64::from(ctx_per_slot) * 3 / 4,
                n => n,
            },
        }),
        compat: crate::gateway::CompatState::new(&config.reorder),
        next_query: AtomicU64::new(0),
        streams: Default::default(),
        logs: logs.clone(),
    });
    let header_timeout = Duration::from_secs(config.server.header_timeout_s);
    // The primary model loads now; the others when a request names them.
    if runs_child {
        if let Ok(primary) = fleet.resolve(None) {
            if let Err(e) = fleet.load(&primary, None).await {
                tracing::error!("{e}");
            }
        }
    }
    let (stop_probes, probes_stop) = tokio::sync::watch::channel(false);
    start_upstreams(&fleet, config, probes_stop);
    let reaper = tokio::spawn(fleet.clone().reap());

    let stop = async {
        signals.recv().await;
        // From here on a child that dies is not replaced.
        fleet.drain();
        // `logs -f` streams end, so their connections do not hold the drain.
        logs.close();
    };
    let streams = gateway.streams.clone();
    gateway::serve(listener, gateway, stop, DRAIN_GRACE, header_timeout).await;
    if runs_child {
        tracing::info!("shutting down: stopping llama-server");
    } else {
        tracing::info!("shutting down");
    }
    reaper.abort();
    let _ = stop_probes.send(true);
    fleet.shutdown().await;
    // A stream the stop cut records itself when it notices: wait for the
    // last one before writing it all.
    if tokio::time::timeout(DRAIN_GRACE, streams.idle())
        .await
        .is_err()
    {
        tracing::warn!(
            "{} streams had not ended {DRAIN_GRACE:?} after llama-server stopped; their records are lost",
            streams.in_flight()
        );
    }
    meter.flush().await;
    tracing::info!("contextpilotd stopped");
    drop(lock);
    Ok(())
}

/// The models this daemon serves by name, the primary (`[llama] model`)
/// first, and the fleet that loads them.
fn fleet(prepared: &Prepared, binary: PathBuf, watchdog: Option<Watchdog>) -> Fleet {
    let config = &prepared.config;
    let rescan = {
        let config = config.clone();
        let primary = prepared.model.path.clone();
        Box::new(move || model_specs(&config, &primary))
    };
    let budget = memory_budget(config, &prepared.hardware);
    let launcher = Launcher {
        binary,
        caps: prepared.caps,
        hardware: prepared.hardware.clone(),
        config: config.clone(),
        watchdog,
        listen: config.server.listen.to_string(),
        rpc: prepared.rpc.clone(),
    };
    Fleet::new(rescan, config.models.fallback.as_deref(), launcher, budget)
        .with_routing(config.routing.clone())
}

/// Every `[[upstream]]` as an engine of the model it serves, with its
/// prober ([`add_upstream`]). An upstream whose slots the
/// configuration does not give joins once it says how many it has (a
/// llama-server's `/props`, which answers only once its model is loaded):
/// the daemon's slot table for it must have as many, or requests queue
/// in the daemon for one slot while the others idle.
fn start_upstreams(fleet: &Arc<Fleet>, config: &Config, stop: tokio::sync::watch::Receiver<bool>) {
    use crate::models::engine::Remote;
    use crate::models::probe;
    let primary = fleet.resolve(None).map(|s| s.name).unwrap_or_default();
    for (position, upstream) in config.upstream.iter().enumerate() {
        let name = upstream.model.clone().unwrap_or_else(|| primary.clone());
        let (view, seen) =
            tokio::sync::watch::channel(crate::supervisor::SupervisorView::unloaded());
        let remote = Remote {
            url: upstream.url.clone(),
            base: probe::base_of(&upstream.url),
            auth: upstream.api_key.as_ref().map(|k| format!("Bearer {k}")),
            kind: upstream.kind,
            weight: upstream.weight,
            position,
            down: view,
        };
        let configured = upstream.slots;
        let fleet = fleet.clone();
        let max_queue = config.server.max_queue;
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let slots = match (configured, probe::slots_path(remote.kind)) {
                (Some(slots), _) => slots,
                (None, None) => OPENAI_UPSTREAM_SLOTS,
                (None, Some(_)) => {
                    let auth = remote.auth.as_deref();
                    match probe::wait_for_slots(&remote.base, auth, remote.kind, &mut stop).await {
                        Some(slots) => slots,
                        None => return, // stopping
                    }
                }
            };
            add_upstream(&fleet, remote, seen, &name, slots, max_queue, stop);
        });
    }
}

/// Requests in flight at once to an `openai`-kind upstream when the
/// configuration does not say: such servers (vLLM, SGLang) batch many, and
/// do not say how many.
const OPENAI_UPSTREAM_SLOTS: u32 = 8;

/// One upstream's engine, added to the fleet, and its prober. Its number
/// stands in for a child's pid: counting down from `u32::MAX` by its
/// position, so it is never a real pid's.
fn add_upstream(
    fleet: &Arc<Fleet>,
    remote: crate::models::engine::Remote,
    seen: tokio::sync::watch::Receiver<crate::supervisor::SupervisorView>,
    name: &str,
    slots: u32,
    max_queue: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    use crate::models::engine::Engine;
    use crate::models::probe;
    let number = u32::MAX - remote.position as u32;
    tokio::spawn(probe::run(
        remote.base.clone(),
        remote.auth.clone(),
        remote.kind,
        number,
        remote.down.clone(),
        stop,
    ));
    // The same model as the child's: its speed until measured there.
    let cost = fleet
        .primary()
        .filter(|engine| engine.remote.is_none())
        .map(|local| local.scheduler.cost().profile().as_ref().clone())
        .unwrap_or_else(|| crate::cost::CostProfile::unmeasured(10.0, 1.0, 10.0));
    tracing::info!(upstream = %remote.url, model = %name, slots, "routing to an upstream");
    let engine = Engine::upstream(
        name,
        remote,
        slots as usize,
        max_queue,
        cost,
        seen,
        fleet.idle_signal(),
    );
    fleet.add_upstream(Arc::new(engine));
}

/// What the loaded models may use together: `[models] memory_mib`, else
/// the memory the GPU may use.
pub fn memory_budget(config: &Config, hardware: &Hardware) -> u64 {
    config
        .models
        .memory_mib
        .value()
        .map(|mib| u64::from(mib) << 20)
        .unwrap_or_else(|| plan::gpu_usable_memory(hardware).0)
}

/// What the daemon serves by name ([`crate::models::discover::servable`]):
/// `[llama] model` first (kept loaded unless its `[[models.model]]` entry
/// says otherwise), then each `[[models.model]]`, then the GGUF files found
/// where other tools keep them. Files whose header cannot be read are left
/// out.
pub fn model_specs(config: &Config, primary_path: &Path) -> Vec<ModelSpec> {
    let same_file = |a: &Path, b: &Path| {
        a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    };
    let entry_of =
        |found: &crate::models::discover::Found| {
            config.models.model.iter().find(|e| {
                e.name.eq_ignore_ascii_case(&found.name) || same_file(&e.path, &found.path)
            })
        };
    crate::models::discover::servable(config)
        .into_iter()
        .enumerate()
        .filter(|(_, found)| found.facts.is_ok())
        .map(|(i, found)| {
            let primary = i == 0 && config.llama.model.is_some();
            let entry = entry_of(&found);
            let mut aliases = found.aliases.clone();
            if let Some(e) = entry.filter(|e| !e.name.eq_ignore_ascii_case(&found.name)) {
                aliases.push(e.name.clone());
            }
            let keep_alive = entry.and_then(|e| e.keep_alive).unwrap_or(if primary {
                KeepAlive::Forever
            } else {
                config.models.keep_alive
            });
            ModelSpec {
                name: found.name,
                aliases,
                // The canonical path: llama-server reports it back in
                // /props.model_path, which is how readiness is recognised.
                path: if primary {
                    primary_path.to_path_buf()
                } else {
                    found.path.canonicalize().unwrap_or(found.path)
                },
                keep_alive,
                primary,
            }
        })
        .collect()
}

fn start_watchdog() -> Option<Watchdog> {
    match Watchdog::start() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(
                "could not start the watchdog: {e}; a crashed daemon may leave llama-server running"
            );
            None
        }
    }
}
