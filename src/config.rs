//! The daemon's configuration: one TOML file, every key optional.
//!
//! The file is found at `--config`, else `$CONTEXTPILOTD_CONFIG`, else the
//! platform config dir. Unknown keys and bad values are errors that name the
//! file, the key and what is allowed; `main` turns them into exit code 2.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

/// Environment variable naming the config file when `--config` is absent.
pub const CONFIG_ENV: &str = "CONTEXTPILOTD_CONFIG";

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub llama: LlamaConfig,
    pub supervisor: SupervisorConfig,
    pub meter: MeterConfig,
    pub reorder: ReorderConfig,
    pub cost: CostConfig,
    pub log: LogConfig,
    pub models: ModelsConfig,
    /// Other servers requests may be routed to (`[[upstream]]`).
    pub upstream: Vec<UpstreamConfig>,
    pub routing: RoutingConfig,
}

/// One `[[upstream]]`: another OpenAI-compatible server to route to.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Its base URL, as an OpenAI client is given it (`http://host:8080`
    /// or `http://host:8080/v1`); plain HTTP.
    pub url: String,
    pub kind: UpstreamKind,
    /// Sent as `Authorization: Bearer` to it (never logged).
    pub api_key: Option<String>,
    /// How much traffic it should get relative to the others (its score is
    /// divided by it).
    #[serde(default = "one")]
    pub weight: f64,
    /// Requests it runs at once. Absent: a llama-server's `/props`
    /// `total_slots` (the upstream joins once it answers), another
    /// contextpilotd's `/status`, 8 for an `openai` server.
    pub slots: Option<u32>,
    /// The model name it serves (default: the name `[llama] model` is
    /// served under; required when there is no `[llama] model`).
    pub model: Option<String>,
}

fn one() -> f64 {
    1.0
}

/// What an upstream is, which decides what the daemon can know of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamKind {
    /// Slots visible, `id_slot` usable: modelled slot by slot like the child.
    LlamaServer,
    /// Another contextpilotd: it picks its own slots.
    Contextpilotd,
    /// vLLM, SGLang, anything OpenAI-compatible: prefix reuse read from
    /// `usage.prompt_tokens_details.cached_tokens`.
    Openai,
}

/// How requests are spread over the backends of one model (`routing`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// "cache-aware" (by predicted time: prefix reuse, prefill speed,
    /// queue) or "round-robin" (for comparison).
    pub policy: RoutingPolicy,
    /// The load imbalance (requests in flight) past which the least loaded
    /// backend is chosen whatever the cache says: more than `balance_abs`
    /// apart and the busiest more than `balance_rel` times the idlest.
    pub balance_abs: u32,
    pub balance_rel: f64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            policy: RoutingPolicy::CacheAware,
            balance_abs: 2,
            balance_rel: 1.5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingPolicy {
    CacheAware,
    RoundRobin,
}

/// Which models the daemon serves and how many it keeps loaded (`models`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    /// Serve requests that name a model the daemon does not serve with this
    /// one (for clients that hard-code a name) instead of answering 404
    /// `model_not_found`.
    pub fallback: Option<String>,
    /// Folders searched for GGUF files, besides the places other tools keep
    /// them (the Hugging Face cache, LM Studio, Ollama, `$LLAMA_CACHE`).
    pub dirs: Vec<PathBuf>,
    /// Look in those usual places; `false` serves only `[llama] model`,
    /// `[[models.model]]` and `dirs`.
    pub discover: bool,
    /// How long a model loaded on demand stays loaded after its last
    /// request: seconds or "30s"/"5m"/"1h"; 0 unloads it right after the
    /// request, -1 never. A request's own `keep_alive` field overrides it
    /// for that model. `[llama] model` stays loaded unless its
    /// `[[models.model]]` entry says otherwise.
    pub keep_alive: KeepAlive,
    /// Memory the loaded models may use together (weights, KV cache and
    /// margin, as the planner counts them), in MiB; "auto" is the memory
    /// the GPU may use. A model that does not fit unloads the least
    /// recently used idle ones.
    pub memory_mib: Auto<u32>,
    /// Models served by name besides `[llama] model` and those discovered.
    pub model: Vec<ModelEntry>,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            fallback: None,
            dirs: Vec::new(),
            discover: true,
            keep_alive: KeepAlive::After(std::time::Duration::from_secs(300)),
            memory_mib: Auto::Auto,
            model: Vec::new(),
        }
    }
}

/// One `[[models.model]]`: a GGUF file served under a name.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The name requests use in `model`.
    pub name: String,
    /// The .gguf file.
    pub path: PathBuf,
    /// This model's keep-alive (else `[models] keep_alive`).
    pub keep_alive: Option<KeepAlive>,
}

/// How long an idle model stays loaded (Ollama's `keep_alive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Unload this long after the last request ends (zero: right after).
    After(std::time::Duration),
    /// Never unload.
    Forever,
}

impl KeepAlive {
    /// Reads Ollama's forms: a number of seconds (negative: forever), or a
    /// duration string such as "30s", "5m", "1h", "1h30m", "-1".
    pub fn from_json(value: &serde_json::Value) -> Result<KeepAlive, String> {
        let wrong = || {
            format!(
                "keep_alive must be seconds (-1 for never) or a duration such as \"30s\", \"5m\"; got {value}"
            )
        };
        match value {
            serde_json::Value::Number(n) => {
                let secs = n.as_f64().ok_or_else(wrong)?;
                Ok(KeepAlive::from_seconds(secs))
            }
            serde_json::Value::String(s) => KeepAlive::parse(s).ok_or_else(wrong),
            _ => Err(wrong()),
        }
    }

    fn from_seconds(secs: f64) -> KeepAlive {
        if secs < 0.0 || !secs.is_finite() {
            KeepAlive::Forever
        } else {
            KeepAlive::After(std::time::Duration::from_secs_f64(secs.min(1e9)))
        }
    }

    /// A duration string: digits with units h, m, s, ms (Go's form, as
    /// Ollama takes it), a bare number of seconds, or a negative number.
    pub fn parse(text: &str) -> Option<KeepAlive> {
        let text = text.trim();
        if let Ok(secs) = text.parse::<f64>() {
            return Some(KeepAlive::from_seconds(secs));
        }
        if let Some(rest) = text.strip_prefix('-') {
            return KeepAlive::parse(rest).map(|_| KeepAlive::Forever);
        }
        let mut total = 0.0;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let number: f64 = rest[..digits].parse().ok()?;
            rest = &rest[digits..];
            let unit = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            total += number
                * match &rest[..unit] {
                    "h" => 3600.0,
                    "m" => 60.0,
                    "s" => 1.0,
                    "ms" => 0.001,
                    _ => return None,
                };
            rest = &rest[unit..];
        }
        (!text.is_empty()).then(|| KeepAlive::from_seconds(total))
    }

    /// The idle time after which to unload; `None` for never.
    pub fn duration(self) -> Option<std::time::Duration> {
        match self {
            KeepAlive::After(d) => Some(d),
            KeepAlive::Forever => None,
        }
    }
}

impl fmt::Display for KeepAlive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepAlive::Forever => f.write_str("-1"),
            KeepAlive::After(d) => write!(f, "{}s", d.as_secs_f64()),
        }
    }
}

impl<'de> Deserialize<'de> for KeepAlive {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        KeepAlive::from_json(&value).map_err(serde::de::Error::custom)
    }
}

impl Serialize for KeepAlive {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            KeepAlive::Forever => serializer.serialize_i64(-1),
            KeepAlive::After(d) => serializer.serialize_f64(d.as_secs_f64()),
        }
    }
}

/// The cost model (`cost`): measured prompt times that slot choice,
/// reordering and llama-server's flags are decided by.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostConfig {
    /// Measure the child when it becomes ready and no measurement of this
    /// llama-server, model, machine and flags is cached (a few seconds, in
    /// the background; `contextpilotd tune` does it on demand).
    pub measure: bool,
    /// A profile file (the JSON `tune` writes) to use instead of measuring.
    pub profile: Option<PathBuf>,
}

impl Default for CostConfig {
    fn default() -> Self {
        CostConfig {
            measure: true,
            profile: None,
        }
    }
}

/// What `/reorder` keeps between calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexMode {
    /// One live index: later calls are placed against earlier ones and
    /// carry request ids that `/evict` removes (ContextPilot's default).
    Live,
    /// Every call is clustered on its own (ContextPilot's `--stateless`).
    Stateless,
}

/// How far the daemon may rewrite prompts the client did not hand it as
/// `documents` (`[reorder] quality`). The known-answer eval
/// (bench/abc/quality.py) measured what each rewrite costs in answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    /// Only rewrites the eval found to keep answers (the default):
    /// `documents` and conversations as always, block dedup, but no
    /// inferred-mode reordering of document lists found in messages, which
    /// cost a 270M model 7 points of agent answers for 4 points of cache.
    Strict,
    /// Also inferred mode (`infer_documents`): the most cache reuse.
    Balanced,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReorderConfig {
    /// `strict` (default) or `balanced`: see [`Quality`].
    pub quality: Quality,
    /// Find document lists inside system messages and tool results of
    /// requests without `documents` and reorder them (a request turns it off
    /// with `X-ContextPilot-Enabled: false`). Unset: on with `quality =
    /// "balanced"`, off with `"strict"`.
    pub infer_documents: Option<bool>,
    /// Block dedup: a block of a tool result or long message that already
    /// appeared earlier in the request is replaced by a pointer to it.
    pub dedup: bool,
    /// The ContextPilot-compatible `/reorder`: `live` or `stateless`.
    pub index: IndexMode,
    /// Bound on the live index's leaves; the least recently used go first.
    pub live_max_leaves: usize,
    /// A live leaf unused for this long is dropped; 0 keeps leaves until
    /// evicted or pushed out.
    pub live_ttl_s: u64,
    /// Documents keep the client's (relevance) order unless reordering them
    /// is predicted to save at least this many milliseconds of prefill...
    pub min_gain_ms: f64,
    /// ...and at least this share of the request's predicted prompt time.
    pub min_gain_share: f64,
    /// A conversation with documents keeps earlier turns' documents in its
    /// prompt up to this many tokens, then starts over with the current
    /// turn's; 0 means three quarters of a slot's context.
    pub conversation_max_tokens: u64,
}

impl ReorderConfig {
    /// Whether inferred mode runs: as configured, else as `quality` says.
    pub fn infer_documents(&self) -> bool {
        self.infer_documents
            .unwrap_or(self.quality == Quality::Balanced)
    }
}

impl Default for ReorderConfig {
    fn default() -> Self {
        ReorderConfig {
            quality: Quality::Strict,
            infer_documents: None,
            dedup: true,
            index: IndexMode::Live,
            live_max_leaves: 100_000,
            live_ttl_s: 3600,
            min_gain_ms: 5.0,
            min_gain_share: 0.05,
            conversation_max_tokens: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the OpenAI-compatible API and the status endpoints listen on.
    pub listen: SocketAddr,
    /// Required for a listen address other than loopback; clients send it as
    /// `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Requests allowed to wait for a free slot; more get 429.
    pub max_queue: usize,
    /// How long a request waits for a starting child or a free slot before
    /// it gets 503.
    pub queue_timeout_s: u64,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// A client must send its request headers within this time.
    pub header_timeout_s: u64,
    /// Host names (besides localhost and IP addresses) requests may name in
    /// their `Host` header; any other gets 403, which is what stops a web
    /// page on a rebinding domain from reaching the API.
    pub allowed_hosts: Vec<String>,
    /// Web origins (`scheme://host[:port]`, or `"*"`) whose pages may call
    /// the API from a browser: they get CORS headers and preflight answers.
    /// A request from any other origin gets 403 on POST and no CORS headers.
    pub allowed_origins: Vec<String>,
}

/// A DNS name as a `Host` header carries it, without a port.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A web origin as browsers send it (`http://localhost:3000`), or `"*"`.
fn is_origin(origin: &str) -> bool {
    if origin == "*" {
        return true;
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    // `[v6 address]` or a name, then an optional `:port`.
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((address, port)) => (address.parse::<std::net::Ipv6Addr>().is_ok(), port),
            None => (false, ""),
        },
        None => match rest.rsplit_once(':') {
            Some((name, _)) => (is_host_name(name), &rest[name.len()..]),
            None => (is_host_name(rest), ""),
        },
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.parse::<u16>().is_ok());
    matches!(scheme, "http" | "https") && host && port_ok
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8765)),
            api_key: None,
            max_queue: 64,
            queue_timeout_s: 120,
            max_body_bytes: 32 << 20,
            header_timeout_s: 10,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeterConfig {
    /// The per-request JSONL log; defaults to `query_log.jsonl` in the
    /// platform data dir.
    pub query_log: Option<PathBuf>,
    /// Also log prompt and completion text (off: only numbers are logged).
    pub log_prompts: bool,
    /// Rotate the query log when it grows past this size.
    pub max_log_bytes: u64,
    /// Rotated files to keep (`query_log.jsonl.1` ... `.N`).
    pub keep_files: u32,
    /// How often GPU use is sampled in the background; 0 turns it off.
    pub gpu_sample_ms: u64,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            query_log: None,
            log_prompts: false,
            max_log_bytes: 64 << 20,
            keep_files: 5,
            gpu_sample_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlamaConfig {
    /// llama-server: a name looked up on PATH, or a path.
    pub binary: String,
    /// The .gguf model file.
    pub model: Option<PathBuf>,
    /// Model id served on /v1/models; defaults to the file stem.
    pub model_alias: Option<String>,
    /// Loopback port for the child; 0 picks a free one at each start.
    pub port: u16,
    pub slots: Auto<u32>,
    pub ctx_per_slot: Auto<u32>,
    /// Minimum chunk for KV-shift reuse (`--cache-reuse`); 0 turns it off.
    pub cache_reuse: u32,
    pub gpu_layers: u32,
    pub threads: Auto<u32>,
    pub batch: Auto<u32>,
    /// `--kv-unified` (one KV pool shared by all slots, so idle slots
    /// reserve nothing): absent means on where the binary supports it.
    pub kv_unified: Option<bool>,
    /// Appended last to the llama-server command line.
    pub extra_args: Vec<String>,
    /// Give every child a random key of its own (through its environment),
    /// so that nothing but the daemon can use it. `false` leaves the child
    /// open to any local process and web page, for tools that must call
    /// llama-server directly (the benchmarks' plain systems).
    pub child_key: bool,
    /// llama.cpp RPC workers (`ggml-rpc-server`) the child spreads the
    /// model's layers over, `host:port` each (`--rpc`).
    pub rpc_workers: Vec<String>,
    /// Allow workers beyond this machine. RPC is unauthenticated: anyone
    /// who reaches a worker's port can use it, so this is off by default.
    pub rpc_allow_remote: bool,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        LlamaConfig {
            binary: "llama-server".to_string(),
            model: None,
            model_alias: None,
            port: 0,
            slots: Auto::Auto,
            ctx_per_slot: Auto::Auto,
            cache_reuse: 256,
            gpu_layers: 99,
            threads: Auto::Auto,
            batch: Auto::Auto,
            kv_unified: None,
            extra_args: Vec::new(),
            child_key: true,
            rpc_workers: Vec::new(),
            rpc_allow_remote: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    pub health_interval_ms: u64,
    pub ready_timeout_s: u64,
    pub hang_timeout_s: u64,
    pub stop_timeout_s: u64,
    pub restart_backoff_initial_ms: u64,
    pub restart_backoff_max_ms: u64,
    pub crashloop_restarts: u32,
    pub crashloop_window_s: u64,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            health_interval_ms: 1000,
            ready_timeout_s: 300,
            hang_timeout_s: 30,
            stop_timeout_s: 5,
            restart_backoff_initial_ms: 500,
            restart_backoff_max_ms: 30_000,
            crashloop_restarts: 5,
            crashloop_window_s: 120,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// error, warn, info, debug or trace.
    pub level: String,
    /// Where the daemon writes `contextpilotd.log`; defaults to the
    /// platform's state/log directory.
    pub dir: Option<PathBuf>,
    /// Rotate `contextpilotd.log` when it grows past this size.
    pub max_bytes: u64,
    /// Rotated files to keep (`contextpilotd.log.1` ... `.N`).
    pub keep_files: u32,
}

/// The smallest `[log] max_bytes`: a few hundred lines, so a value meant in
/// MiB is caught instead of rotating at every line.
pub const LOG_MIN_BYTES: u64 = 64 << 10;

/// The most `[log] keep_files`; each rotation renames every kept file.
pub const LOG_MAX_KEEP_FILES: u32 = 100;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            dir: None,
            max_bytes: 10 << 20,
            keep_files: 3,
        }
    }
}

/// `"auto"` or an explicit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Auto<T> {
    #[default]
    Auto,
    Value(T),
}

impl<T: Copy> Auto<T> {
    pub fn value(self) -> Option<T> {
        match self {
            Auto::Auto => None,
            Auto::Value(v) => Some(v),
        }
    }
}

impl<T: fmt::Display> fmt::Display for Auto<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auto::Auto => f.write_str("auto"),
            Auto::Value(v) => v.fmt(f),
        }
    }
}

impl<'de> Deserialize<'de> for Auto<u32> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Auto<u32>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"auto\" or a positive integer")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v == "auto" {
                    Ok(Auto::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u32::try_from(v)
                    .ok()
                    .filter(|v| *v > 0)
                    .map(Auto::Value)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Serialize for Auto<u32> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Auto::Auto => serializer.serialize_str("auto"),
            Auto::Value(v) => serializer.serialize_u32(*v),
        }
    }
}

/// A configuration problem, phrased for the person who has to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in, when it comes from a file.
    pub file: Option<PathBuf>,
    /// The key, as `table.key`.
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: Option<&Path>, key: Option<&str>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.map(Path::to_path_buf),
            key: key.map(str::to_string),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}: ", file.display())?,
            None => f.write_str("configuration: ")?,
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// `--config PATH`.
    Flag(PathBuf),
    /// `$CONTEXTPILOTD_CONFIG`.
    Env(PathBuf),
    /// The platform config dir; the file may not exist.
    Default(PathBuf),
    /// No file and no platform dir could be determined.
    BuiltIn,
}

impl ConfigSource {
    pub fn path(&self) -> Option<&Path> {
        match self {
            ConfigSource::Flag(p) | ConfigSource::Env(p) | ConfigSource::Default(p) => Some(p),
            ConfigSource::BuiltIn => None,
        }
    }

    /// Picks the file by precedence: flag, environment, platform default.
    pub fn locate(flag: Option<&Path>) -> ConfigSource {
        if let Some(path) = flag {
            return ConfigSource::Flag(path.to_path_buf());
        }
        if let Some(path) = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            return ConfigSource::Env(PathBuf::from(path));
        }
        match default_config_path() {
            Some(path) => ConfigSource::Default(path),
            None => ConfigSource::BuiltIn,
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::Flag(p) => write!(f, "{} (--config)", p.display()),
            ConfigSource::Env(p) => write!(f, "{} (${CONFIG_ENV})", p.display()),
            ConfigSource::Default(p) if p.exists() => write!(f, "{}", p.display()),
            ConfigSource::Default(p) => {
                write!(f, "built-in defaults ({} does not exist)", p.display())
            }
            ConfigSource::BuiltIn => f.write_str("built-in defaults"),
        }
    }
}

/// `~/Library/Application Support/contextpilotd/config.toml` on macOS,
/// `~/.config/contextpilotd/config.toml` on Linux.
pub fn default_config_path() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "contextpilotd")
        .map(|d| d.config_dir().join("config.toml"))
}

/// The daemon's own log, in [`Config::log_dir`] (rotated as `.1` ... `.N`).
pub const LOG_FILE: &str = "contextpilotd.log";

/// Default directory for log files: `~/Library/Logs/contextpilotd` on macOS,
/// the XDG state dir on Linux.
pub fn default_log_dir() -> Option<PathBuf> {
    if cfg!(target_os = "macos") {
        directories::BaseDirs::new().map(|d| d.home_dir().join("Library/Logs/contextpilotd"))
    } else {
        directories::ProjectDirs::from("", "", "contextpilotd").map(|d| {
            d.state_dir()
                .unwrap_or_else(|| d.data_local_dir())
                .join("logs")
        })
    }
}

impl Config {
    /// Loads the configuration the way every command does. A file named by the
    /// flag or the environment must exist; the platform default may be absent.
    pub fn load(source: &ConfigSource) -> Result<Config, ConfigError> {
        let path = match source {
            ConfigSource::Flag(p) | ConfigSource::Env(p) => p,
            ConfigSource::Default(p) if p.exists() => p,
            ConfigSource::Default(_) | ConfigSource::BuiltIn => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                "; create it with `[llama]` then `model = \"/path/to/model.gguf\"` (config.example.toml documents every key)"
            } else {
                ""
            };
            ConfigError::new(
                Some(path),
                None,
                format!("cannot read the configuration file: {e}{hint}"),
            )
        })?;
        Config::parse(&text, Some(path))
    }

    /// Parses and validates TOML text. `file` is used in messages and to
    /// resolve relative paths (relative to the file's directory).
    pub fn parse(text: &str, file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| toml_error(text, file, &e))?;
        let base = file
            .and_then(Path::parent)
            .filter(|p| !p.as_os_str().is_empty());
        if let Some(model) = config.llama.model.take() {
            config.llama.model = Some(resolve_path(&model, base));
        }
        for dir in &mut config.models.dirs {
            *dir = resolve_path(dir, base);
        }
        for entry in &mut config.models.model {
            entry.path = resolve_path(&entry.path, base);
        }
        if let Some(dir) = config.log.dir.take() {
            config.log.dir = Some(resolve_path(&dir, base));
        }
        if let Some(profile) = config.cost.profile.take() {
            config.cost.profile = Some(resolve_path(&profile, base));
        }
        if let Some(log) = config.meter.query_log.take() {
            config.meter.query_log = Some(resolve_path(&log, base));
        }
        if config.llama.binary.contains('/') {
            config.llama.binary = resolve_path(Path::new(&config.llama.binary), base)
                .display()
                .to_string();
        }
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: Option<&Path>) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| Err(ConfigError::new(file, Some(key), message));
        if !self.server.listen.ip().is_loopback() && self.server.api_key.is_none() {
            return err(
                "server.listen",
                format!(
                    "{} is not a loopback address; listening beyond this machine requires [server] api_key",
                    self.server.listen
                ),
            );
        }
        if matches!(&self.server.api_key, Some(k) if k.trim().is_empty()) {
            return err("server.api_key", "must not be empty".to_string());
        }
        if let Some(bad) = self.server.allowed_hosts.iter().find(|h| !is_host_name(h)) {
            return err(
                "server.allowed_hosts",
                format!("{bad:?} is not a host name (letters, digits, '-' and '.', no port)"),
            );
        }
        if let Some(bad) = self.server.allowed_origins.iter().find(|o| !is_origin(o)) {
            return err(
                "server.allowed_origins",
                format!("{bad:?} is not an origin: write scheme://host[:port] (no path), or \"*\""),
            );
        }
        if !(self.reorder.min_gain_ms.is_finite() && self.reorder.min_gain_ms >= 0.0) {
            return err(
                "reorder.min_gain_ms",
                "must be a number of milliseconds, 0 or more".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.reorder.min_gain_share) {
            return err(
                "reorder.min_gain_share",
                "must be a share between 0 and 1".into(),
            );
        }
        if self.llama.binary.trim().is_empty() {
            return err(
                "llama.binary",
                "must name llama-server (a name on PATH or a path)".into(),
            );
        }
        if let Auto::Value(slots) = self.llama.slots {
            if !(1..=16).contains(&slots) {
                return err(
                    "llama.slots",
                    format!("{slots} is out of range; allowed: \"auto\" or 1 to 16"),
                );
            }
        }
        if let Auto::Value(ctx) = self.llama.ctx_per_slot {
            if ctx < 256 {
                return err(
                    "llama.ctx_per_slot",
                    format!("{ctx} is too small; allowed: \"auto\" or at least 256"),
                );
            }
        }
        if let Auto::Value(batch) = self.llama.batch {
            if batch < 32 {
                return err(
                    "llama.batch",
                    format!("{batch} is too small; allowed: \"auto\" or at least 32"),
                );
            }
        }
        for worker in &self.llama.rpc_workers {
            let host = match crate::rpc::split_endpoint(worker) {
                Ok((host, _)) => host,
                Err(why) => return err("llama.rpc_workers", why),
            };
            if !crate::rpc::is_loopback_host(host) && !self.llama.rpc_allow_remote {
                return err(
                    "llama.rpc_workers",
                    format!(
                        "{worker} is not on this machine; llama.cpp's RPC is unauthenticated (whoever reaches the port can use the worker), so workers beyond loopback need [llama] rpc_allow_remote = true, on a network you trust"
                    ),
                );
            }
        }
        for upstream in &self.upstream {
            let url = upstream.url.trim();
            let Some(rest) = url.strip_prefix("http://") else {
                return err(
                    "upstream.url",
                    format!("{url:?} must be a plain http:// URL (https upstreams are not supported; put them behind a local proxy)"),
                );
            };
            if rest.is_empty() || rest.starts_with('/') {
                return err("upstream.url", format!("{url:?} names no host"));
            }
            if !(upstream.weight.is_finite() && upstream.weight > 0.0) {
                return err("upstream.weight", "must be a number greater than 0".into());
            }
            if upstream.slots == Some(0) {
                return err("upstream.slots", "must be at least 1".into());
            }
        }
        if !(self.routing.balance_rel.is_finite() && self.routing.balance_rel >= 1.0) {
            return err(
                "routing.balance_rel",
                "must be a number of at least 1".into(),
            );
        }
        let mut names = std::collections::HashSet::new();
        for entry in &self.models.model {
            if entry.name.trim().is_empty() {
                return err("models.model.name", "must not be empty".to_string());
            }
            if !names.insert(entry.name.to_ascii_lowercase()) {
                return err(
                    "models.model.name",
                    format!("{:?} is named twice", entry.name),
                );
            }
        }
        if matches!(&self.llama.model_alias, Some(a) if a.trim().is_empty()) {
            return err("llama.model_alias", "must not be empty".to_string());
        }
        for (key, value) in [
            ("server.queue_timeout_s", self.server.queue_timeout_s),
            ("server.max_body_bytes", self.server.max_body_bytes as u64),
            ("server.header_timeout_s", self.server.header_timeout_s),
            ("meter.max_log_bytes", self.meter.max_log_bytes),
            (
                "reorder.live_max_leaves",
                self.reorder.live_max_leaves as u64,
            ),
        ] {
            if value == 0 {
                return err(key, "must be greater than 0".to_string());
            }
        }
        // Flags the daemon itself owns: overriding them would break what it
        // knows about the child (its port, its slots, its model).
        const OWNED: [(&str, &str); 11] = [
            ("-m", "llama.model"),
            ("--model", "llama.model"),
            ("--host", "(always 127.0.0.1)"),
            ("--port", "llama.port"),
            ("-c", "llama.ctx_per_slot"),
            ("--ctx-size", "llama.ctx_per_slot"),
            ("-np", "llama.slots"),
            ("--parallel", "llama.slots"),
            // Through extra_args a remote worker would skip the loopback check.
            ("--rpc", "llama.rpc_workers"),
            ("--api-key", "(the daemon talks to the child on loopback)"),
            (
                "--api-key-file",
                "(the daemon talks to the child on loopback)",
            ),
        ];
        for arg in &self.llama.extra_args {
            let flag = arg.split_once('=').map_or(arg.as_str(), |(f, _)| f);
            if let Some((_, instead)) = OWNED.iter().find(|(owned, _)| *owned == flag) {
                return err(
                    "llama.extra_args",
                    format!("{flag} is set by contextpilotd; use {instead} instead"),
                );
            }
        }
        let s = &self.supervisor;
        for (key, value) in [
            ("supervisor.health_interval_ms", s.health_interval_ms),
            ("supervisor.ready_timeout_s", s.ready_timeout_s),
            ("supervisor.hang_timeout_s", s.hang_timeout_s),
            ("supervisor.stop_timeout_s", s.stop_timeout_s),
            (
                "supervisor.restart_backoff_initial_ms",
                s.restart_backoff_initial_ms,
            ),
            (
                "supervisor.restart_backoff_max_ms",
                s.restart_backoff_max_ms,
            ),
            ("supervisor.crashloop_window_s", s.crashloop_window_s),
        ] {
            if value == 0 {
                return err(key, "must be greater than 0".to_string());
            }
        }
        if s.restart_backoff_initial_ms > s.restart_backoff_max_ms {
            return err(
                "supervisor.restart_backoff_initial_ms",
                format!(
                    "{} is larger than restart_backoff_max_ms ({})",
                    s.restart_backoff_initial_ms, s.restart_backoff_max_ms
                ),
            );
        }
        if s.crashloop_restarts == 0 {
            return err(
                "supervisor.crashloop_restarts",
                "must be at least 1".to_string(),
            );
        }
        const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
        if !LEVELS.contains(&self.log.level.as_str()) {
            return err(
                "log.level",
                format!(
                    "{:?} is not a level; allowed: {}",
                    self.log.level,
                    LEVELS.join(", ")
                ),
            );
        }
        if self.log.max_bytes < LOG_MIN_BYTES {
            return err(
                "log.max_bytes",
                format!(
                    "{} is too small; allowed: at least {LOG_MIN_BYTES} (64 KiB); the value is in bytes, e.g. 10485760 for 10 MiB",
                    self.log.max_bytes
                ),
            );
        }
        if !(1..=LOG_MAX_KEEP_FILES).contains(&self.log.keep_files) {
            return err(
                "log.keep_files",
                format!(
                    "{} is out of range; allowed: 1 to {LOG_MAX_KEEP_FILES} rotated files",
                    self.log.keep_files
                ),
            );
        }
        Ok(())
    }

    /// The query log path, configured or the platform default.
    pub fn query_log_path(&self) -> Option<PathBuf> {
        self.meter.query_log.clone().or_else(|| {
            directories::ProjectDirs::from("", "", "contextpilotd")
                .map(|d| d.data_local_dir().join("query_log.jsonl"))
        })
    }

    /// The directory for log files, configured or the platform default.
    pub fn log_dir(&self) -> Option<PathBuf> {
        self.log.dir.clone().or_else(default_log_dir)
    }
}

fn resolve_path(path: &Path, base: Option<&Path>) -> PathBuf {
    if let Ok(rest) = path.strip_prefix("~") {
        if let Some(home) = directories::BaseDirs::new() {
            return home.home_dir().join(rest);
        }
    }
    match base {
        Some(base) if path.is_relative() => base.join(path),
        _ => path.to_path_buf(),
    }
}

/// Turns a TOML/serde error into a message naming the key (`table.key`), the
/// line and what is allowed.
fn toml_error(text: &str, file: Option<&Path>, error: &toml::de::Error) -> ConfigError {
    let message = error.message().trim().to_string();
    let Some(span) = error.span() else {
        return ConfigError::new(file, None, message);
    };
    let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let key = key_path_at(text, span.start);
    ConfigError::new(file, key.as_deref(), format!("{message} (line {line_no})"))
}

/// The dotted path of the innermost key whose name or value covers byte
/// `pos`, from the spans of the parsed document. `None` when the text is
/// not valid TOML (a syntax error has no key to name).
fn key_path_at(text: &str, pos: usize) -> Option<String> {
    use toml::de::{DeTable, DeValue};

    fn walk(table: &DeTable<'_>, pos: usize, path: &mut Vec<String>, best: &mut Vec<String>) {
        for (key, value) in table.iter() {
            path.push(key.get_ref().to_string());
            if (key.span().contains(&pos) || value.span().contains(&pos)) && path.len() > best.len()
            {
                *best = path.clone();
            }
            match value.get_ref() {
                DeValue::Table(inner) => walk(inner, pos, path, best),
                DeValue::Array(items) => {
                    for item in items {
                        if let DeValue::Table(inner) = item.get_ref() {
                            walk(inner, pos, path, best);
                        }
                    }
                }
                _ => {}
            }
            path.pop();
        }
    }

    let document = DeTable::parse(text).ok()?;
    let mut best = Vec::new();
    walk(document.get_ref(), pos, &mut Vec::new(), &mut best);
    (!best.is_empty()).then(|| best.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Some(Path::new("/etc/cp/config.toml")))
    }

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_example_file_parses_and_matches_the_defaults() {
        let text = include_str!("../config.example.toml");
        // The example documents every key with its default value; keys
        // without a default are commented out.
        assert_eq!(parse(text).unwrap(), Config::default());
        for key in ["api_key", "model", "model_alias", "dir", "query_log"] {
            assert!(
                text.contains(&format!("# {key} = ")),
                "{key} is not documented"
            );
        }
    }

    #[test]
    fn unknown_key_names_key_file_and_allowed() {
        let err = parse("[llama]\nslotz = 4\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("/etc/cp/config.toml: llama.slotz: unknown field `slotz`"),
            "{text}"
        );
        assert!(text.contains("expected one of"), "{text}");
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    fn keys_are_found_by_their_spans_not_by_line_shape() {
        let err = parse("[server]\n[llama] # the model\nslotz = 4\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("llama.slotz"), "{err}");
        let err = parse("[llama]\nextra_args = [\n  \"--a\",\n  42,\n]\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("llama.extra_args"), "{err}");
        let err = parse("[llama]\nextra_args = [\"--override-kv=x\", 42]\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("llama.extra_args"), "{err}");
        let err = parse("llama.port = \"x\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("llama.port"), "{err}");
    }

    #[test]
    fn unknown_table_is_named() {
        let text = parse("[lama]\nmodel = \"x\"\n").unwrap_err().to_string();
        assert!(text.contains("unknown field `lama`"), "{text}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = parse("[llama]\nport = \"eighty\"\n")
            .unwrap_err()
            .to_string();
        assert!(text.contains("llama.port:"), "{text}");
        assert!(text.contains("invalid type"), "{text}");
    }

    #[test]
    fn auto_or_integer() {
        let c = parse("[llama]\nslots = 4\nctx_per_slot = \"auto\"\n").unwrap();
        assert_eq!(c.llama.slots, Auto::Value(4));
        assert_eq!(c.llama.ctx_per_slot, Auto::Auto);
        let text = parse("[llama]\nslots = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("llama.slots") && text.contains("\"auto\" or a positive integer"),
            "{text}"
        );
        let text = parse("[llama]\nslots = 0\n").unwrap_err().to_string();
        assert!(text.contains("llama.slots"), "{text}");
        let text = parse("[llama]\nslots = 17\n").unwrap_err().to_string();
        assert!(text.contains("1 to 16"), "{text}");
    }

    #[test]
    fn allowed_hosts_and_origins_are_checked() {
        let config = parse(
            "[server]\nallowed_hosts = [\"mybox.lan\"]\nallowed_origins = [\"http://localhost:3000\", \"https://[::1]\", \"*\"]\n",
        )
        .unwrap();
        assert_eq!(config.server.allowed_hosts, ["mybox.lan"]);
        for (text, key) in [
            (
                "[server]\nallowed_hosts = [\"evil.example:80\"]\n",
                "server.allowed_hosts",
            ),
            ("[server]\nallowed_hosts = [\"\"]\n", "server.allowed_hosts"),
            (
                "[server]\nallowed_origins = [\"localhost:3000\"]\n",
                "server.allowed_origins",
            ),
            (
                "[server]\nallowed_origins = [\"http://a.b/path\"]\n",
                "server.allowed_origins",
            ),
            (
                "[server]\nallowed_origins = [\"ftp://a.b\"]\n",
                "server.allowed_origins",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{text}: {err}");
        }
    }

    #[test]
    fn non_loopback_listen_needs_an_api_key() {
        let text = parse("[server]\nlisten = \"0.0.0.0:8765\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("server.listen") && text.contains("api_key"),
            "{text}"
        );
        parse("[server]\nlisten = \"0.0.0.0:8765\"\napi_key = \"s3cret\"\n").unwrap();
    }

    #[test]
    fn rpc_workers_beyond_loopback_need_an_explicit_setting() {
        let c =
            parse("[llama]\nrpc_workers = [\"127.0.0.1:50052\", \"localhost:50053\"]\n").unwrap();
        assert_eq!(c.llama.rpc_workers.len(), 2);
        let text = parse("[llama]\nrpc_workers = [\"192.168.1.20:50052\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("llama.rpc_workers")
                && text.contains("unauthenticated")
                && text.contains("rpc_allow_remote"),
            "{text}"
        );
        parse("[llama]\nrpc_workers = [\"192.168.1.20:50052\"]\nrpc_allow_remote = true\n")
            .unwrap();
    }

    #[test]
    fn relative_paths_resolve_against_the_config_file() {
        let c =
            parse("[llama]\nmodel = \"models/m.gguf\"\nbinary = \"./bin/llama-server\"\n").unwrap();
        assert_eq!(c.llama.model, Some(PathBuf::from("/etc/cp/models/m.gguf")));
        assert_eq!(c.llama.binary, "/etc/cp/./bin/llama-server");
        let c = parse("[llama]\nbinary = \"llama-server\"\n").unwrap();
        assert_eq!(c.llama.binary, "llama-server");
    }

    #[test]
    fn semantic_checks() {
        for (text, key) in [
            (
                "[supervisor]\nhang_timeout_s = 0\n",
                "supervisor.hang_timeout_s",
            ),
            (
                "[supervisor]\nrestart_backoff_initial_ms = 10\nrestart_backoff_max_ms = 5\n",
                "supervisor.restart_backoff_initial_ms",
            ),
            ("[log]\nlevel = \"loud\"\n", "log.level"),
            ("[log]\nmax_bytes = 0\n", "log.max_bytes"),
            ("[log]\nmax_bytes = 10\n", "log.max_bytes"),
            ("[log]\nkeep_files = 0\n", "log.keep_files"),
            ("[log]\nkeep_files = 101\n", "log.keep_files"),
            ("[log]\nkeep_files = -1\n", "log.keep_files"),
            ("[llama]\nctx_per_slot = 100\n", "llama.ctx_per_slot"),
            (
                "[llama]\nextra_args = [\"--parallel\", \"8\"]\n",
                "llama.extra_args",
            ),
            ("[llama]\nextra_args = [\"--port=9\"]\n", "llama.extra_args"),
            (
                "[llama]\nextra_args = [\"--rpc\", \"10.0.0.2:50052\"]\n",
                "llama.extra_args",
            ),
            (
                "[llama]\nrpc_workers = [\"127.0.0.1\"]\n",
                "llama.rpc_workers",
            ),
            ("[reorder]\nmin_gain_share = 2\n", "reorder.min_gain_share"),
            ("[reorder]\nmin_gain_ms = -1\n", "reorder.min_gain_ms"),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{err}");
        }
    }

    #[test]
    fn log_rotation_is_bounded_with_messages_that_say_why() {
        let defaults = LogConfig::default();
        assert_eq!((defaults.max_bytes, defaults.keep_files), (10 << 20, 3));
        let c = parse("[log]\nmax_bytes = 1048576\nkeep_files = 7\n").unwrap();
        assert_eq!((c.log.max_bytes, c.log.keep_files), (1 << 20, 7));
        let text = parse("[log]\nmax_bytes = 10\n").unwrap_err().to_string();
        assert!(
            text.contains("log.max_bytes: 10 is too small; allowed: at least 65536")
                && text.contains("in bytes"),
            "{text}"
        );
        let text = parse("[log]\nkeep_files = 0\n").unwrap_err().to_string();
        assert!(
            text.contains("log.keep_files: 0 is out of range; allowed: 1 to 100"),
            "{text}"
        );
    }

    /// Inferred mode follows `quality` unless set; a bad quality names
    /// its key.
    #[test]
    fn quality_decides_inferred_mode_unless_it_is_set() {
        assert!(!parse("").unwrap().reorder.infer_documents());
        let balanced = parse("[reorder]\nquality = \"balanced\"\n").unwrap();
        assert!(balanced.reorder.infer_documents());
        assert!(parse("[reorder]\ninfer_documents = true\n")
            .unwrap()
            .reorder
            .infer_documents());
        assert!(
            !parse("[reorder]\nquality = \"balanced\"\ninfer_documents = false\n")
                .unwrap()
                .reorder
                .infer_documents()
        );
        let err = parse("[reorder]\nquality = \"loose\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("reorder.quality"), "{err}");
    }

    #[test]
    fn keep_alive_reads_ollama_forms() {
        use std::time::Duration;
        let parse = |s: &str| KeepAlive::parse(s);
        assert_eq!(
            parse("5m"),
            Some(KeepAlive::After(Duration::from_secs(300)))
        );
        assert_eq!(
            parse("1h30m"),
            Some(KeepAlive::After(Duration::from_secs(5400)))
        );
        assert_eq!(parse("2s"), Some(KeepAlive::After(Duration::from_secs(2))));
        assert_eq!(parse("0"), Some(KeepAlive::After(Duration::ZERO)));
        assert_eq!(parse("-1"), Some(KeepAlive::Forever));
        assert_eq!(parse("-5m"), Some(KeepAlive::Forever));
        assert_eq!(parse("5 minutes"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("m"), None);
        let json = |v: serde_json::Value| KeepAlive::from_json(&v);
        assert_eq!(json(serde_json::json!(-1)), Ok(KeepAlive::Forever));
        assert_eq!(
            json(serde_json::json!(2)),
            Ok(KeepAlive::After(Duration::from_secs(2)))
        );
        assert!(json(serde_json::json!(true))
            .unwrap_err()
            .contains("keep_alive"));
    }

    #[test]
    fn models_config_reads_entries_and_rejects_twins() {
        let c = parse(
            "[models]\nkeep_alive = \"2s\"\nmemory_mib = 1024\ndirs = [\"g\"]\n[[models.model]]\nname = \"a\"\npath = \"a.gguf\"\nkeep_alive = -1\n",
        )
        .unwrap();
        assert_eq!(c.models.memory_mib, Auto::Value(1024));
        assert_eq!(c.models.model[0].keep_alive, Some(KeepAlive::Forever));
        assert_eq!(
            c.models.keep_alive,
            KeepAlive::After(std::time::Duration::from_secs(2))
        );
        let twins = "[[models.model]]\nname = \"a\"\npath = \"a.gguf\"\n[[models.model]]\nname = \"A\"\npath = \"b.gguf\"\n";
        let e = parse(twins).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("models.model.name"));
        let e = parse("[models]\nkeep_alive = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("keep_alive"), "{e}");
    }
}

/// Any text gives a `Config` or a `ConfigError`, never a panic; a valid
/// config written out as TOML reads back the same.
#[cfg(test)]
mod properties {
    use super::*;
    use crate::testing;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    const FILE: &str = "/etc/cp/config.toml";

    /// What a config file can hold for a `u64` (TOML integers are i64).
    fn count(min: u64) -> impl Strategy<Value = u64> {
        prop_oneof![min..min + 1000, min..=i64::MAX as u64]
    }

    fn auto(min: u32, max: u32) -> impl Strategy<Value = Auto<u32>> {
        prop_oneof![Just(Auto::Auto), (min..=max).prop_map(Auto::Value)]
    }

    /// An absolute path (relative ones resolve against the file).
    fn path() -> impl Strategy<Value = PathBuf> {
        "/[a-zA-Z0-9 ._é-]{1,12}(/[a-z0-9.]{1,8}){0,3}".prop_map(PathBuf::from)
    }

    fn text() -> impl Strategy<Value = String> {
        "[^\\s~][^\u{0}]{0,15}"
    }

    /// A config that passes `validate`. Keys added later keep their
    /// defaults (`..Default::default()`, needless only until then).
    #[allow(clippy::needless_update)]
    fn valid() -> impl Strategy<Value = Config> {
        let server = (
            (any::<[u8; 4]>(), any::<u16>(), any::<bool>()),
            proptest::option::of(text()),
            (0..=i64::MAX as u64, count(1), count(1), count(1)),
        )
            .prop_map(
                |((ip, port, v6), api_key, (queue, timeout, body, header))| {
                    let listen = match (v6, &api_key) {
                        (true, None) => SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port)),
                        (false, None) => SocketAddr::from(([127, ip[1], ip[2], ip[3]], port)),
                        (_, Some(_)) => SocketAddr::from((ip, port)),
                    };
                    ServerConfig {
                        listen,
                        api_key,
                        max_queue: queue as usize,
                        queue_timeout_s: timeout,
                        max_body_bytes: body as usize,
                        header_timeout_s: header,
                        ..ServerConfig::default()
                    }
                },
            );
        let llama = (
            (
                text(),
                proptest::option::of(path()),
                proptest::option::of(text()),
            ),
            (
                any::<u16>(),
                auto(1, 16),
                auto(256, u32::MAX),
                auto(1, u32::MAX),
                auto(32, u32::MAX),
            ),
            (
                any::<u32>(),
                any::<u32>(),
                proptest::option::of(any::<bool>()),
            ),
            vec("--?[a-z][a-z-]{0,10}(=[^\u{0}]{0,6})?|[0-9]{1,4}", 0..4),
        )
            .prop_map(
                |(
                    (binary, model, model_alias),
                    (port, slots, ctx, threads, batch),
                    rest,
                    extra_args,
                )| {
                    let (cache_reuse, gpu_layers, kv_unified) = rest;
                    LlamaConfig {
                        binary,
                        model,
                        model_alias,
                        port,
                        slots,
                        ctx_per_slot: ctx,
                        cache_reuse,
                        gpu_layers,
                        threads,
                        batch,
                        kv_unified,
                        extra_args,
                        ..LlamaConfig::default()
                    }
                },
            )
            .prop_filter("flags the daemon owns", |llama| {
                llama.extra_args.iter().all(|a| {
                    let flag = a.split_once('=').map_or(a.as_str(), |(f, _)| f);
                    ![
                        "-m",
                        "--model",
                        "--host",
                        "--port",
                        "-c",
                        "--ctx-size",
                        "-np",
                        "--parallel",
                        "--api-key",
                        "--api-key-file",
                    ]
                    .contains(&flag)
                })
            });
        let supervisor = (
            (count(1), count(1), count(1), count(1)),
            (count(1), count(1), 1..=u32::MAX, count(1)),
        )
            .prop_map(
                |((health, ready, hang, stop), (a, b, restarts, window))| SupervisorConfig {
                    health_interval_ms: health,
                    ready_timeout_s: ready,
                    hang_timeout_s: hang,
                    stop_timeout_s: stop,
                    restart_backoff_initial_ms: a.min(b),
                    restart_backoff_max_ms: a.max(b),
                    crashloop_restarts: restarts,
                    crashloop_window_s: window,
                    ..SupervisorConfig::default()
                },
            );
        let meter = (
            proptest::option::of(path()),
            any::<bool>(),
            count(1),
            any::<u32>(),
            count(0),
        )
            .prop_map(
                |(query_log, log_prompts, max_log_bytes, keep_files, gpu_sample_ms)| MeterConfig {
                    query_log,
                    log_prompts,
                    max_log_bytes,
                    keep_files,
                    gpu_sample_ms,
                    ..MeterConfig::default()
                },
            );
        let reorder = (
            (
                any::<bool>(),
                proptest::option::of(any::<bool>()),
                any::<bool>(),
                any::<bool>(),
            ),
            (
                count(1),
                count(0),
                prop_oneof![Just(0.0), 0.0..1e9f64, 0.0..f64::MAX],
                0.0..=1.0f64,
                count(0),
            ),
        )
            .prop_map(
                |((balanced, infer, dedup, stateless), (leaves, ttl, ms, share, tokens))| {
                    ReorderConfig {
                        quality: if balanced {
                            Quality::Balanced
                        } else {
                            Quality::Strict
                        },
                        infer_documents: infer,
                        dedup,
                        index: if stateless {
                            IndexMode::Stateless
                        } else {
                            IndexMode::Live
                        },
                        live_max_leaves: leaves as usize,
                        live_ttl_s: ttl,
                        min_gain_ms: ms,
                        min_gain_share: share,
                        conversation_max_tokens: tokens,
                        ..ReorderConfig::default()
                    }
                },
            );
        let cost = (any::<bool>(), proptest::option::of(path())).prop_map(|(measure, profile)| {
            CostConfig {
                measure,
                profile,
                ..CostConfig::default()
            }
        });
        let log = (
            select(&["error", "warn", "info", "debug", "trace"][..]),
            proptest::option::of(path()),
        )
            .prop_map(|(level, dir)| LogConfig {
                level: level.to_string(),
                dir,
                ..LogConfig::default()
            });
        (server, llama, supervisor, meter, reorder, cost, log).prop_map(
            |(server, llama, supervisor, meter, reorder, cost, log)| Config {
                server,
                llama,
                supervisor,
                meter,
                reorder,
                cost,
                log,
                ..Config::default()
            },
        )
    }

    /// Config's own text: what `toml` writes for it.
    fn written(config: &Config) -> String {
        toml::to_string(config).expect("a config serializes")
    }

    /// A parse that fails names the file; one that succeeds is a config
    /// that validates and reads back the same from its own TOML.
    fn check(text: &str) -> Result<(), TestCaseError> {
        let file = Path::new(FILE);
        match Config::parse(text, Some(file)) {
            Ok(config) => {
                prop_assert_eq!(config.validate(Some(file)), Ok(()));
                let again = Config::parse(&written(&config), Some(file));
                prop_assert_eq!(again.as_ref(), Ok(&config), "{}", written(&config));
            }
            Err(err) => {
                prop_assert_eq!(err.file.as_deref(), Some(file));
                prop_assert!(!err.message.is_empty());
                prop_assert!(err.to_string().starts_with(FILE), "{}", err);
            }
        }
        Ok(())
    }

    /// Pieces of TOML, valid or not, to insert.
    const TOKENS: &[&str] = &[
        "[llama]",
        "[server]",
        "[[llama]]",
        "slots = ",
        "= ",
        "\"auto\"",
        "\n",
        "\"",
        "'''",
        "\"\"\"",
        "\\u00e9",
        "\\",
        "é",
        "{",
        "}",
        "[",
        "]",
        "#",
        ",",
        "-1",
        "0",
        "17",
        "99999999999999999999",
        "1e400",
        "nan",
        "-inf",
        "0x7fffffffffffffff",
        "1979-05-27T07:32:00Z",
        "true",
        ".",
        "extra_args = [\"--port\"]",
        "listen = \"0.0.0.0:1\"",
    ];

    const ODD_NUMBERS: &[&str] = &[
        "nan", "+inf", "-inf", "-0.0", "1e-400", "0b101", "0o17", "0xff", "1_000",
    ];
    const OTHER_VALUES: &[&str] = &[
        "\"auto\"",
        "true",
        "false",
        "1979-05-27",
        "07:32:00",
        "\"127.0.0.1:0\"",
        "\"[::1]:80\"",
    ];

    /// A random value of any TOML type, odd ones included.
    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            3 => any::<i64>().prop_map(|n| n.to_string()),
            3 => (0..100_000i64).prop_map(|n| n.to_string()),
            1 => Just("18446744073709551616".to_string()),
            1 => any::<f64>().prop_map(|f| format!("{f:?}")),
            1 => select(ODD_NUMBERS).prop_map(str::to_string),
            3 => "[^\u{0}]{0,10}".prop_map(|s| toml::Value::from(s).to_string()),
            1 => "[a-z\" ]{0,6}".prop_map(|s| format!("'{s}'")),
            1 => select(OTHER_VALUES).prop_map(str::to_string),
        ];
        leaf.prop_recursive(2, 12, 4, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
                vec(("[a-z]{1,5}", inner), 0..3).prop_map(|kv| {
                    let kv: Vec<String> =
                        kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                    format!("{{{}}}", kv.join(", "))
                }),
            ]
        })
    }

    /// The tables and keys a config has, with their default values, from
    /// the defaults' own TOML.
    fn known_keys() -> Vec<(String, String, toml::Value)> {
        let table: toml::Table = toml::from_str(&written(&Config::default())).unwrap();
        let mut keys = Vec::new();
        for (name, section) in table {
            if let toml::Value::Table(section) = section {
                keys.extend(section.into_iter().map(|(k, v)| (name.clone(), k, v)));
            }
        }
        keys
    }

    /// A value of the type `default` has (often valid, often out of
    /// range), or any value at all.
    fn plausible(default: &toml::Value) -> BoxedStrategy<String> {
        let typed = match default {
            toml::Value::Integer(n) => {
                let n = *n;
                prop_oneof![Just(n), 0..300i64, any::<i64>()]
                    .prop_map(|n| n.to_string())
                    .boxed()
            }
            toml::Value::Float(_) => prop_oneof![0.0..1.0f64, -1.0..1e6f64, any::<f64>()]
                .prop_map(|f| toml::Value::from(f).to_string())
                .boxed(),
            toml::Value::Boolean(_) => any::<bool>().prop_map(|b| b.to_string()).boxed(),
            other => {
                let default = other.to_string();
                prop_oneof![
                    Just(default),
                    select(
                        &[
                            "\"auto\"",
                            "\"balanced\"",
                            "\"live\"",
                            "\"debug\"",
                            "\"[::1]:0\"",
                            "[\"--x\"]"
                        ][..]
                    )
                    .prop_map(str::to_string),
                ]
                .boxed()
            }
        };
        prop_oneof![3 => typed, 1 => value()].boxed()
    }

    /// Lines of TOML-ish text: sections of known tables (sometimes twice,
    /// sometimes unknown ones) holding their own keys (mostly) with random
    /// values, dotted keys, garbage.
    fn toml_ish() -> impl Strategy<Value = String> {
        let keys = known_keys();
        let mut tables: Vec<String> = keys.iter().map(|(t, _, _)| t.clone()).collect();
        tables.dedup();
        let n = tables.len();
        let table_keys = move |table: &str| -> Vec<(String, toml::Value)> {
            keys.iter()
                .filter(|(t, _, _)| t == table)
                .map(|(_, k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let name = prop_oneof![
            8 => Just(None),
            1 => "[a-z]{1,6}".prop_map(Some),
        ];
        let section = move |table: String| {
            let own = table_keys(&table);
            let count = own.len().min(4);
            let line = prop_oneof![
                1 => ("[a-z_]{1,10}", value()).prop_map(|(k, v)| format!("{k} = {v}")),
                1 => "[^\u{0}]{0,20}",
                1 => select(TOKENS).prop_map(str::to_string),
            ];
            let dotted = table.clone();
            (
                prop_oneof![
                    16 => Just(format!("[{table}]")),
                    1 => Just(String::new()),
                    1 => Just(format!("[[{table}]]")),
                ],
                proptest::sample::subsequence(own, 0..=count).prop_flat_map(|keys| {
                    let values: Vec<_> = keys.iter().map(|(_, v)| plausible(v)).collect();
                    let names: Vec<String> = keys.into_iter().map(|(k, _)| k).collect();
                    (Just(names), values)
                }),
                proptest::option::weighted(0.04, line),
                proptest::option::weighted(
                    0.04,
                    value().prop_map(move |v| format!("{dotted}.port = {v}")),
                ),
            )
                .prop_map(|(header, (keys, values), odd, dotted)| {
                    let mut text = header;
                    let lines = keys.iter().zip(&values).map(|(k, v)| format!("{k} = {v}"));
                    for line in lines.chain(odd).chain(dotted) {
                        text.push('\n');
                        text.push_str(&line);
                    }
                    text
                })
        };
        (
            proptest::sample::subsequence(tables, 0..=n).prop_shuffle(),
            vec(name, 0..3),
            proptest::bool::weighted(0.1),
        )
            .prop_flat_map(move |(mut tables, unknown, twice)| {
                tables.extend(unknown.into_iter().flatten());
                if twice {
                    if let Some(first) = tables.first().cloned() {
                        tables.push(first);
                    }
                }
                tables.into_iter().map(&section).collect::<Vec<_>>()
            })
            .prop_map(|sections| sections.join("\n"))
    }

    proptest! {
        #![proptest_config(testing::config(256))]

        /// A valid config, written by `toml`, reads back equal.
        #[test]
        fn valid_configs_round_trip(config in valid()) {
            let text = written(&config);
            let parsed = Config::parse(&text, None);
            prop_assert_eq!(parsed.as_ref(), Ok(&config), "{}", text);
            check(&text)?;
        }

        /// The example file and written configs, mutated.
        #[test]
        fn mutated_configs_parse_or_fail_cleanly(
            text in testing::mutated_text(
                prop_oneof![
                    Just(include_str!("../config.example.toml").to_string()),
                    valid().prop_map(|c| written(&c)),
                ],
                TOKENS,
                5,
            ),
        ) {
            check(&text)?;
        }

        /// Random TOML-ish text.
        #[test]
        fn random_toml_parses_or_fails_cleanly(text in toml_ish()) {
            check(&text)?;
        }

        /// Short texts of TOML's punctuation and characters of every UTF-8
        /// width: error positions land next to multi-byte characters.
        #[test]
        fn punctuation_and_wide_characters_fail_cleanly(
            text in vec(select(&[
                "[llama]", "port", "slots", " = ", "=", "\"", "'", "\\", "\\u", "[", "]",
                "{", "}", ".", ",", "#", "\n", "\r", "\t", " ", "1", "-", "é", "€", "🕴",
                "\u{7f}", "\u{0}", "\u{feff}", "\u{2028}",
            ][..]), 0..16).prop_map(|pieces| pieces.concat()),
        ) {
            check(&text)?;
        }
    }
}
