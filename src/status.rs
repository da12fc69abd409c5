//! The status document: served as JSON on `GET /status`, rendered for people
//! by `contextpilotd status`. Field names are part of the interface.

use serde::{Deserialize, Serialize};

use crate::gguf::ModelFacts;
use crate::hardware::Hardware;
use crate::plan::LaunchPlan;
use crate::supervisor::{State, SupervisorView};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_s: u64,
    pub listen: String,
    /// "starting" | "ready" | "restarting" | "crashloop" | "stopping".
    pub state: String,
    pub child: ChildStatus,
    pub model: ModelStatus,
    pub plan: PlanStatus,
    pub hardware: HardwareStatus,
    /// Planner and hardware warnings.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Headline numbers of the requests served since start.
    #[serde(default)]
    pub requests: Option<RequestsHeadline>,
    /// Why GPU use is not sampled, when it is not.
    #[serde(default)]
    pub gpu_sampling: Option<String>,
    /// The cost model: measured prompt times and what they decided.
    #[serde(default)]
    pub cost: Option<CostStatus>,
    /// What each slot holds, in short.
    #[serde(default)]
    pub slots: Vec<crate::slots::SlotSummary>,
    /// Every loaded model (what `contextpilotd ps` shows).
    #[serde(default)]
    pub models: Vec<crate::models::LoadedModel>,
    /// Requests of this model running on a slot now.
    #[serde(default)]
    pub busy: usize,
    /// Requests of this model waiting for a slot.
    #[serde(default)]
    pub queued: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostStatus {
    pub profile: crate::cost::CostProfile,
    /// llama-server's token counts over the daemon's estimates.
    pub token_scale: f64,
    pub measuring: bool,
    pub note: Option<String>,
    /// The plan's settings that follow from measurements and the binary,
    /// `flag value: why`.
    pub decisions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestsHeadline {
    pub total: u64,
    pub errors: u64,
    /// 4xx answers (499, the client gone, included).
    #[serde(default)]
    pub client_errors: u64,
    /// 5xx answers.
    #[serde(default)]
    pub server_errors: u64,
    pub retried: u64,
    pub token_weighted_reuse_pct: f64,
    pub latency_p50_ms: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub query_log: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildStatus {
    pub pid: Option<u32>,
    pub port: Option<u16>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub started_at: Option<String>,
    pub command: Vec<String>,
    pub stderr_tail: Vec<String>,
    /// Seconds since the current child was started.
    #[serde(default)]
    pub running_s: Option<u64>,
    /// `[supervisor] ready_timeout_s`: how long a child may take to get
    /// ready before it is killed and started again.
    #[serde(default)]
    pub ready_timeout_s: u64,
    /// While starting: how far llama-server says it has got ([`load_phase`]).
    #[serde(default)]
    pub load_phase: Option<String>,
    /// After the child failed: what its last lines point to ([`likely_cause`]).
    #[serde(default)]
    pub likely_cause: Option<LikelyCause>,
}

/// What a failing child's last lines point to, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LikelyCause {
    pub cause: String,
    pub next_step: String,
    /// The child's line it was read from.
    pub line: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    pub path: String,
    pub size_bytes: u64,
    pub architecture: String,
    pub context_length: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanStatus {
    pub slots: u32,
    /// Requests in flight at once (fewer than `slots` with a shared KV pool).
    #[serde(default)]
    pub concurrency: u32,
    pub ctx_per_slot: u32,
    pub ctx_size: u64,
    pub threads: u32,
    pub gpu_layers: u32,
    pub cache_reuse: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HardwareStatus {
    pub chip: String,
    pub memory_bytes: u64,
    pub perf_cores: u32,
    pub efficiency_cores: u32,
    pub gpu_cores: Option<u32>,
}

/// The parts of the status that do not change while the daemon runs.
#[derive(Debug, Clone, Default)]
pub struct StaticStatus {
    pub listen: String,
    pub model: ModelStatus,
    pub plan: PlanStatus,
    pub hardware: HardwareStatus,
    pub warnings: Vec<String>,
    /// The plan's settings that follow from measurements and the binary.
    pub cost_decisions: Vec<String>,
    /// `[supervisor] ready_timeout_s`.
    pub ready_timeout_s: u64,
}

/// The flags whose values come from the cost model and the binary's
/// abilities rather than from hardware and configuration.
pub const COST_FLAGS: [&str; 3] = ["--cache-ram", "--kv-unified", "--no-cache-idle-slots"];

/// `flag value: why` for each of the plan's [`COST_FLAGS`] decisions.
pub fn cost_decisions(plan: &LaunchPlan) -> Vec<String> {
    plan.decisions
        .iter()
        .filter(|d| COST_FLAGS.contains(&d.flag.as_str()))
        .map(|d| format!("{} {}: {}", d.flag, d.value, d.why))
        .collect()
}

impl StaticStatus {
    pub fn new(
        listen: String,
        model: &ModelFacts,
        plan: &LaunchPlan,
        hw: &Hardware,
        ready_timeout_s: u64,
    ) -> StaticStatus {
        let mut warnings = hw.warnings.clone();
        warnings.extend(plan.warnings.iter().cloned());
        StaticStatus {
            cost_decisions: cost_decisions(plan),
            ready_timeout_s,
            listen,
            model: ModelStatus {
                path: model.path.display().to_string(),
                size_bytes: model.size_bytes,
                architecture: model.architecture.clone(),
                context_length: model.context_length,
            },
            plan: PlanStatus {
                slots: plan.slots,
                concurrency: plan.concurrency,
                ctx_per_slot: plan.ctx_per_slot,
                ctx_size: plan.ctx_size,
                threads: plan.threads,
                gpu_layers: plan.gpu_layers,
                cache_reuse: plan.cache_reuse,
            },
            hardware: HardwareStatus {
                chip: hw.chip.clone(),
                memory_bytes: hw.memory_bytes,
                perf_cores: hw.perf_cores,
                efficiency_cores: hw.efficiency_cores,
                gpu_cores: hw.gpu_cores,
            },
            warnings,
        }
    }

    /// The status of a daemon with no local model (front only): an empty
    /// model path, no plan and no hardware of its own; its upstreams are
    /// in `models`.
    pub fn front_only(listen: String, ready_timeout_s: u64) -> StaticStatus {
        StaticStatus {
            listen,
            ready_timeout_s,
            ..StaticStatus::default()
        }
    }

    /// Combines the fixed parts with the supervisor's current view.
    pub fn snapshot(
        &self,
        uptime_s: u64,
        view: &SupervisorView,
        stderr_tail: Vec<String>,
    ) -> Status {
        let starting = matches!(view.state, State::Starting | State::Restarting);
        let failing = matches!(view.state, State::Crashloop | State::Restarting);
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_s,
            listen: self.listen.clone(),
            state: view.state.as_str().to_string(),
            child: ChildStatus {
                pid: view.pid,
                port: view.port,
                restarts: view.restarts,
                last_exit: view.last_exit.clone(),
                started_at: view.started_at.clone(),
                command: view.command.clone(),
                running_s: view.spawned.map(|t| t.elapsed().as_secs()),
                ready_timeout_s: self.ready_timeout_s,
                load_phase: starting.then(|| load_phase(&stderr_tail)).flatten(),
                likely_cause: failing.then(|| likely_cause(&stderr_tail)).flatten(),
                stderr_tail,
            },
            model: self.model.clone(),
            plan: self.plan.clone(),
            hardware: self.hardware.clone(),
            warnings: self.warnings.clone(),
            requests: None,
            gpu_sampling: None,
            cost: None,
            slots: Vec::new(),
            models: Vec::new(),
            busy: 0,
            queued: 0,
        }
    }
}

/// The marker the supervisor writes into the tail before each child.
const START_MARKER: &str = "--- contextpilotd: starting";

/// The current child's lines: those after the last start marker.
fn current_child(tail: &[String]) -> &[String] {
    let from = tail
        .iter()
        .rposition(|l| l.starts_with(START_MARKER))
        .map_or(0, |i| i + 1);
    &tail[from..]
}

/// How far a starting llama-server has got, from the loading lines it
/// prints (llama.cpp's wording, matched loosely: builds differ): the latest
/// stage it reached, with the percentage when it printed its dots (one per
/// percent of the tensors read). `None` before it says anything known.
pub fn load_phase(tail: &[String]) -> Option<String> {
    // Later stages first: the last stage reached wins whatever order the
    // lines came in.
    const STAGES: &[(&[&str], &str)] = &[
        (
            &["server is listening", "model loaded"],
            "loaded, checking the model",
        ),
        (&["warming up"], "warming up"),
        (
            &["llama_context", "llama_kv_cache", "kv_self", "constructing"],
            "allocating the context and KV cache",
        ),
        (
            &["load_tensors", "loading model tensors"],
            "loading tensors",
        ),
        (
            &["llama_model_loader", "loaded meta data", "print_info"],
            "reading the model's metadata",
        ),
        (&["loading model"], "loading the model"),
    ];
    let lines = current_child(tail);
    let reached = STAGES.iter().position(|(needles, _)| {
        lines
            .iter()
            .any(|l| needles.iter().any(|n| l.to_lowercase().contains(n)))
    })?;
    let stage = STAGES[reached].1;
    // The progress dots: a line of nothing else, one per percent.
    let dots = lines
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| !l.is_empty() && l.chars().all(|c| c == '.'))
        .map(|l| l.len().min(100));
    Some(match dots {
        Some(pct) if stage == "loading tensors" => format!("{stage}, {pct}%"),
        _ => stage.to_string(),
    })
}

/// What a failed child's last lines point to: out of memory, a port taken,
/// an argument this llama-server lacks, an architecture it does not know, a
/// damaged file, a model it could not load. The latest child's lines are
/// read first, then the one before (in a crash loop the next child may have
/// only just started). `None` when nothing known matches.
pub fn likely_cause(tail: &[String]) -> Option<LikelyCause> {
    let mut rest = tail;
    for _ in 0..2 {
        let lines = current_child(rest);
        if let Some(found) = cause_in(lines) {
            return Some(found);
        }
        let start = rest.len() - lines.len();
        if start == 0 {
            break;
        }
        rest = &rest[..start - 1];
    }
    None
}

fn cause_in(lines: &[String]) -> Option<LikelyCause> {
    // Most specific first: a damaged file also makes "failed to load model".
    const CAUSES: &[(&[&str], &str, &str)] = &[
        (
            &[
                "out of memory",
                "failed to allocate",
                "unable to allocate",
                "cannot allocate memory",
                "insufficient memory",
                "erroroutofmemory",
                "cudamalloc failed",
            ],
            "out of memory",
            "lower [llama] ctx_per_slot or slots (or gpu_layers), or use a smaller quantisation; contextpilotd doctor shows the memory plan",
        ),
        (
            &["address already in use", "couldn't bind", "failed to bind"],
            "llama-server's port is taken",
            "another program holds the port: set [llama] port = 0 (a free port is chosen) or stop that program",
        ),
        (
            &[
                "invalid argument",
                "unknown argument",
                "unrecognized option",
                "unrecognised option",
                "error while handling argument",
            ],
            "llama-server refused an argument",
            "this llama-server is older than the flag: update llama.cpp, or remove the flag from [llama] extra_args",
        ),
        (
            &["unknown model architecture"],
            "llama-server does not know this model's architecture",
            "update llama.cpp to a build that supports it, or serve another model",
        ),
        (
            &[
                "missing tensor",
                // This build's wording: "check_tensor_dims: tensor 'x' not found".
                "check_tensor_dims",
                "not within the file bounds",
                "invalid magic",
                "wrong number of tensors",
                "tensor data is not",
                "failed to read",
                "wrong shape",
            ],
            "the model file is damaged or incomplete",
            "download the model again (contextpilotd pull) or point [llama] model at another file",
        ),
        (
            &[
                "failed to load model",
                "error loading model",
                "model loading error",
                "unable to load model",
            ],
            "llama-server could not load the model",
            "read llama-server's lines below; check that [llama] model is a complete GGUF this llama.cpp build supports",
        ),
    ];
    let lowered: Vec<(String, &String)> = lines
        .iter()
        .filter(|l| !l.starts_with("--- contextpilotd"))
        .map(|l| (l.to_lowercase(), l))
        .collect();
    CAUSES.iter().find_map(|(needles, cause, next_step)| {
        lowered
            .iter()
            .find(|(low, _)| needles.iter().any(|n| low.contains(n)))
            .map(|(_, line)| LikelyCause {
                cause: cause.to_string(),
                next_step: next_step.to_string(),
                line: line.trim().to_string(),
            })
    })
}

/// Renders a status for a person: what is running, how healthy, and, when
/// something is wrong, the child's last lines.
pub fn render(status: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "contextpilotd {} (pid {}) on http://{}, up {}: {}",
        status.version,
        status.pid,
        status.listen,
        human_duration(status.uptime_s),
        status.state.to_uppercase()
    );
    if is_front_only(status) {
        render_front_only(&mut out, status);
        return out;
    }
    let child = &status.child;
    let _ = match (child.pid, child.port) {
        (Some(pid), Some(port)) => writeln!(
            out,
            "  llama-server  pid {pid} on 127.0.0.1:{port}, started {}, {} restart{}",
            child.started_at.as_deref().unwrap_or("?"),
            child.restarts,
            if child.restarts == 1 { "" } else { "s" }
        ),
        _ => writeln!(
            out,
            "  llama-server  not running, {} restart{}",
            child.restarts,
            if child.restarts == 1 { "" } else { "s" }
        ),
    };
    if let Some(last) = &child.last_exit {
        let _ = writeln!(out, "  last exit     {last}");
    }
    if matches!(status.state.as_str(), "starting" | "restarting") {
        if let Some(running) = child.running_s {
            let _ = writeln!(
                out,
                "  starting      {running} s of {} s (ready_timeout_s){}",
                child.ready_timeout_s,
                child
                    .load_phase
                    .as_deref()
                    .map_or(String::new(), |p| format!(", {p}"))
            );
        }
    }
    if let Some(cause) = &child.likely_cause {
        let _ = writeln!(out, "  likely cause  {} ({})", cause.cause, cause.line);
        let _ = writeln!(out, "  next step     {}", cause.next_step);
    }
    let file = std::path::Path::new(&status.model.path)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| status.model.path.clone());
    let _ = writeln!(
        out,
        "  model         {file} ({}, {}, trained context {})",
        status.model.architecture,
        human_bytes(status.model.size_bytes),
        status
            .model
            .context_length
            .map_or("unknown".to_string(), |c| c.to_string())
    );
    let p = &status.plan;
    let _ = writeln!(
        out,
        "  plan          {} × {} tokens (--ctx-size {}), {} threads, -ngl {}, --cache-reuse {}",
        crate::plan::counted(p.slots, "slot"),
        p.ctx_per_slot,
        p.ctx_size,
        p.threads,
        p.gpu_layers,
        p.cache_reuse
    );
    let h = &status.hardware;
    let _ = writeln!(
        out,
        "  hardware      {}, {} memory, {} performance + {} efficiency cores{}",
        h.chip,
        human_bytes(h.memory_bytes),
        h.perf_cores,
        h.efficiency_cores,
        h.gpu_cores
            .map_or(String::new(), |g| format!(", {g} GPU cores"))
    );
    if let Some(r) = &status.requests {
        render_requests(&mut out, r);
    }
    if status.state == "ready" {
        let _ = writeln!(
            out,
            "  now           {} busy, {} queued (of {})",
            status.busy,
            status.queued,
            crate::plan::counted(p.slots, "slot")
        );
    }
    if !status.slots.is_empty() {
        let _ = writeln!(out, "  slots         {}", slots_line(&status.slots));
    }
    // With more than one model loaded, each in short (`ps` has the rest).
    if status.models.len() > 1 {
        for m in &status.models {
            let _ = writeln!(
                out,
                "  loaded        {} ({}, {}, {} busy, {} queued)",
                m.name,
                m.state,
                human_bytes(m.size_bytes),
                m.busy,
                m.queued
            );
        }
    }
    if let Some(reason) = &status.gpu_sampling {
        let _ = writeln!(out, "  gpu sampling  off: {reason}");
    }
    for warning in &status.warnings {
        let _ = writeln!(out, "  warning       {warning}");
    }
    if matches!(
        status.state.as_str(),
        "crashloop" | "restarting" | "starting"
    ) && !child.stderr_tail.is_empty()
    {
        let _ = writeln!(out, "  last lines from llama-server:");
        let skip = child.stderr_tail.len().saturating_sub(12);
        for line in &child.stderr_tail[skip..] {
            let _ = writeln!(out, "    {line}");
        }
    }
    out
}

/// The requests line and where they are logged.
fn render_requests(out: &mut String, r: &RequestsHeadline) {
    use std::fmt::Write;
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
    let _ = writeln!(
        out,
        "  requests      {} served, {} (4xx), {} (5xx), {} retried; {:.1}% of prompt tokens from cache; p50 latency {}, TTFT {}",
        r.total,
        crate::plan::counted(r.client_errors, "client error"),
        crate::plan::counted(r.server_errors, "server error"),
        r.retried,
        r.token_weighted_reuse_pct,
        ms(r.latency_p50_ms),
        ms(r.ttft_p50_ms)
    );
    if let Some(log) = &r.query_log {
        let _ = writeln!(out, "  query log     {log}");
    }
}

/// A daemon with no local model reports an empty model path
/// ([`StaticStatus::front_only`]).
fn is_front_only(status: &Status) -> bool {
    status.model.path.is_empty()
}

/// The rest of [`render`] for a daemon with no child: each upstream.
fn render_front_only(out: &mut String, status: &Status) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "  llama-server  none here: no [llama] model, routing to [[upstream]] backends only"
    );
    for m in &status.models {
        let _ = writeln!(
            out,
            "  upstream      {} serves {} ({}, {} busy, {} queued)",
            m.backend, m.name, m.state, m.busy, m.queued
        );
    }
    if let Some(r) = &status.requests {
        render_requests(out, r);
    }
    for warning in &status.warnings {
        let _ = writeln!(out, "  warning       {warning}");
    }
}

/// What each slot holds, in short: `#0 busy, ~1.2k tokens, 3 docs; #1 empty`.
/// At most eight are listed (`/status` has them all).
pub fn slots_line(slots: &[crate::slots::SlotSummary]) -> String {
    const SHOWN: usize = 8;
    let mut parts: Vec<String> = slots
        .iter()
        .take(SHOWN)
        .map(|s| {
            let mut part = format!("#{}", s.id);
            if s.busy {
                part.push_str(" busy");
            }
            if s.tokens == 0 {
                part.push_str(if s.busy { ", new prompt" } else { " empty" });
                return part;
            }
            let tokens = if s.tokens >= 1000 {
                format!("~{:.1}k tokens", s.tokens as f64 / 1000.0)
            } else {
                format!("~{} tokens", s.tokens)
            };
            part.push_str(if s.busy { ", " } else { " " });
            part.push_str(&tokens);
            if s.documents > 0 {
                part.push_str(&format!(
                    ", {}",
                    crate::plan::counted(s.documents as u64, "doc")
                ));
            }
            if s.hits > 0 {
                part.push_str(&format!(", {}", crate::plan::counted(s.hits, "hit")));
            }
            part
        })
        .collect();
    if slots.len() > SHOWN {
        parts.push(format!("{} more", slots.len() - SHOWN));
    }
    parts.join("; ")
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn the_load_phase_from_llama_servers_lines() {
        let start = "--- contextpilotd: starting llama-server -m m.gguf";
        assert_eq!(load_phase(&lines(start)), None);
        let loading = format!(
            "{start}\nmain: loading model\nllama_model_loader: loaded meta data with 33 key-value pairs"
        );
        assert_eq!(
            load_phase(&lines(&loading)).as_deref(),
            Some("reading the model's metadata")
        );
        let tensors = format!("{loading}\nload_tensors: loading model tensors, this can take a while... (mmap = true)");
        assert_eq!(
            load_phase(&lines(&tensors)).as_deref(),
            Some("loading tensors")
        );
        let dots = format!("{tensors}\n{}", ".".repeat(42));
        assert_eq!(
            load_phase(&lines(&dots)).as_deref(),
            Some("loading tensors, 42%")
        );
        let context = format!("{dots}\nllama_context: constructing llama_context");
        assert_eq!(
            load_phase(&lines(&context)).as_deref(),
            Some("allocating the context and KV cache")
        );
        let warm = format!(
            "{context}\ncommon_init_from_params: warming up the model with an empty run - please wait ..."
        );
        assert_eq!(load_phase(&lines(&warm)).as_deref(), Some("warming up"));
        let up = format!(
            "{warm}\nmain: server is listening on http://127.0.0.1:4000 - starting the main loop"
        );
        assert_eq!(
            load_phase(&lines(&up)).as_deref(),
            Some("loaded, checking the model")
        );
        // Only the current child counts: a new one starts from nothing.
        let again =
            format!("{up}\n--- contextpilotd: llama-server ended: exited with code 1\n{start}");
        assert_eq!(load_phase(&lines(&again)), None);
    }

    #[test]
    fn likely_causes_from_the_childs_last_lines() {
        let cause = |text: &str| likely_cause(&lines(text)).map(|c| c.cause);
        let start = "--- contextpilotd: starting llama-server -m /m/corrupt.gguf";
        assert_eq!(
            cause(&format!("{start}\nggml_backend_cuda_buffer_type_alloc_buffer: allocating 9000 MiB on device 0: cudaMalloc failed: out of memory\nllama_init_from_model: failed to initialize the context\nsrv load_model: failed to load model\n--- contextpilotd: llama-server ended: exited with code 1")).as_deref(),
            Some("out of memory")
        );
        assert_eq!(
            cause(&format!("{start}\nllama_model_load: error loading model: missing tensor 'token_embd.weight'\nllama_model_load_from_file_impl: failed to load model\nmain: exiting due to model loading error")).as_deref(),
            Some("the model file is damaged or incomplete")
        );
        assert_eq!(
            cause(&format!("{start}\n0.00.217.234 E llama_model_load: error loading model: check_tensor_dims: tensor 'token_embd.weight' not found\n0.00.217.274 E llama_model_load_from_file_impl: failed to load model")).as_deref(),
            Some("the model file is damaged or incomplete")
        );
        assert_eq!(
            cause(&format!("{start}\nllama_model_load: error loading model: error loading model architecture: unknown model architecture: 'qwen9'")).as_deref(),
            Some("llama-server does not know this model's architecture")
        );
        assert_eq!(
            cause(&format!(
                "{start}\nerror while handling argument \"--kv-unified\": unknown"
            ))
            .as_deref(),
            Some("llama-server refused an argument")
        );
        assert_eq!(
            cause(&format!(
                "{start}\nerror: invalid argument: --no-cache-idle-slots"
            ))
            .as_deref(),
            Some("llama-server refused an argument")
        );
        assert_eq!(
            cause(&format!("{start}\nmain: couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 8080\nbind: Address already in use")).as_deref(),
            Some("llama-server's port is taken")
        );
        assert_eq!(
            cause(&format!(
                "{start}\nsrv load_model: failed to load model, '/m/x.gguf'"
            ))
            .as_deref(),
            Some("llama-server could not load the model")
        );
        // The file's name alone is no cause, nor are our own lines.
        assert_eq!(cause(&format!("{start}\nmain: loading model")), None);
        // A crash loop's next child may have only just started: the one
        // before it still has the cause.
        let found = likely_cause(&lines(&format!(
            "{start}\nllama_model_load: error loading model: missing tensor 'x'\n--- contextpilotd: llama-server ended: exited with code 1\n{start}\nmain: loading model"
        )))
        .unwrap();
        assert_eq!(
            found.line,
            "llama_model_load: error loading model: missing tensor 'x'"
        );
        assert!(found.next_step.contains("download the model again"));
    }

    fn sample(state: State) -> Status {
        let fixed = StaticStatus {
            listen: "127.0.0.1:8765".into(),
            model: ModelStatus {
                path: "/m/smol.gguf".into(),
                size_bytes: 98_362_432,
                architecture: "llama".into(),
                context_length: Some(8192),
            },
            plan: PlanStatus {
                slots: 1,
                concurrency: 1,
                ctx_per_slot: 512,
                ctx_size: 512,
                threads: 1,
                gpu_layers: 0,
                cache_reuse: 256,
            },
            hardware: HardwareStatus {
                chip: "test".into(),
                memory_bytes: 1 << 34,
                perf_cores: 2,
                efficiency_cores: 0,
                gpu_cores: None,
            },
            warnings: Vec::new(),
            cost_decisions: Vec::new(),
            ready_timeout_s: 120,
        };
        let mut view = SupervisorView::unloaded();
        view.state = state;
        view.spawned = Some(std::time::Instant::now());
        let tail = lines(
            "--- contextpilotd: starting llama-server\nload_tensors: loading model tensors\nllama_model_load: error loading model: missing tensor 'token_embd.weight'",
        );
        fixed.snapshot(5, &view, tail)
    }

    #[test]
    fn each_state_reads_well() {
        let mut ready = sample(State::Ready);
        ready.busy = 1;
        ready.slots = vec![crate::slots::SlotSummary {
            id: 0,
            busy: true,
            tokens: 1234,
            documents: 3,
            hits: 1,
            value_ms: 2.0,
        }];
        let text = render(&ready);
        assert!(text.contains("plan          1 slot × 512 tokens"), "{text}");
        assert!(
            text.contains("now           1 busy, 0 queued (of 1 slot)"),
            "{text}"
        );
        assert!(
            text.contains("slots         #0 busy, ~1.2k tokens, 3 docs, 1 hit"),
            "{text}"
        );
        assert!(
            !text.contains("likely cause") && !text.contains("starting  "),
            "{text}"
        );

        let starting = sample(State::Starting);
        let text = render(&starting);
        assert!(
            text.contains("starting      0 s of 120 s (ready_timeout_s), loading tensors"),
            "{text}"
        );
        assert_eq!(
            starting.child.load_phase.as_deref(),
            Some("loading tensors")
        );

        let looping = sample(State::Crashloop);
        let text = render(&looping);
        assert!(
            text.contains("likely cause  the model file is damaged or incomplete (llama_model_load: error loading model: missing tensor 'token_embd.weight')"),
            "{text}"
        );
        assert!(
            text.contains("next step     download the model again"),
            "{text}"
        );
        // The JSON round-trips with the new fields.
        let json = serde_json::to_value(&looping).unwrap();
        assert_eq!(json["child"]["ready_timeout_s"], 120);
        assert_eq!(
            json["child"]["likely_cause"]["cause"],
            "the model file is damaged or incomplete"
        );
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, looping);
    }

    #[test]
    fn slots_in_short() {
        let slot = |id, busy, tokens| crate::slots::SlotSummary {
            id,
            busy,
            tokens,
            documents: 0,
            hits: 0,
            value_ms: 0.0,
        };
        assert_eq!(
            slots_line(&[slot(0, false, 0), slot(1, true, 0), slot(2, false, 300)]),
            "#0 empty; #1 busy, new prompt; #2 ~300 tokens"
        );
        let many: Vec<_> = (0..10).map(|i| slot(i, false, 0)).collect();
        assert!(slots_line(&many).ends_with("#7 empty; 2 more"));
    }

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(98_362_432), "93.8 MiB");
        assert_eq!(human_bytes(17_179_869_184), "16.0 GiB");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(192), "3m12s");
        assert_eq!(human_duration(7_260), "2h01m");
        assert_eq!(human_duration(90_000), "1d01h");
    }
}
