//! `contextpilotd doctor`: the hardware, the model, and why each setting.

use std::fmt::Write;
use std::path::PathBuf;

use serde::Serialize;

use super::{report, ConfigArg, EXIT_CONFIG, EXIT_OK};
use crate::config::{Config, ConfigError, ConfigSource};
use crate::daemon::Prepared;
use crate::gguf::ModelFacts;
use crate::hardware::Hardware;
use crate::plan::{shell_quote, LaunchPlan};
use crate::status::human_bytes;

#[derive(Serialize)]
struct Report<'a> {
    config: String,
    binary: Result<String, String>,
    hardware: &'a Hardware,
    model: &'a ModelFacts,
    plan: &'a LaunchPlan,
    /// The measured (or configured) prompt costs the plan used; `null`
    /// when nothing was measured yet.
    cost: Option<&'a crate::cost::CostProfile>,
    /// Where a measurement of this setup is cached.
    cost_key: &'a str,
    /// What llama-server's `--help` says it supports.
    binary_caps: crate::plan::BinaryCaps,
    /// The settings decided by measurements and the binary, with why.
    cost_decisions: Vec<String>,
    command: Vec<String>,
    /// Every model servable by name, `[llama] model` first.
    models: Vec<crate::models::ModelSpec>,
    /// What the loaded models may use together (`[models] memory_mib`).
    memory_budget_bytes: u64,
    /// Each `[llama] rpc_workers` entry and what it said (the layer split
    /// is the plan's `layer_split`).
    rpc_workers: Vec<RpcWorkerReport>,
    /// What would stop `run` (the exit code is then 2); empty when nothing.
    problems: Vec<String>,
}

/// One RPC worker as `doctor --json` reports it.
#[derive(Serialize)]
struct RpcWorkerReport {
    endpoint: String,
    /// The worker's RPC protocol version, e.g. "7.0.0".
    protocol: Option<String>,
    devices: Vec<crate::rpc::DeviceMemory>,
    free_bytes: Option<u64>,
    total_bytes: Option<u64>,
    /// Why the worker could not be asked.
    problem: Option<String>,
}

impl RpcWorkerReport {
    fn of(worker: &crate::rpc::RpcWorker) -> RpcWorkerReport {
        let facts = worker.facts.as_ref().ok();
        RpcWorkerReport {
            endpoint: worker.endpoint.clone(),
            protocol: facts.map(|f| f.protocol.clone()),
            devices: facts.map(|f| f.devices.clone()).unwrap_or_default(),
            free_bytes: facts.map(|f| f.free_bytes()),
            total_bytes: facts.map(|f| f.total_bytes()),
            problem: worker.facts.as_ref().err().cloned(),
        }
    }
}

pub fn run(arg: ConfigArg, hardware: Option<PathBuf>, json: bool) -> i32 {
    let source = ConfigSource::locate(arg.config.as_deref());
    let overrides = crate::daemon::Overrides::default();
    let prepared =
        match crate::daemon::prepare_startup(source.clone(), hardware.as_deref(), &overrides) {
            Ok(crate::daemon::Startup::Local(p)) => p,
            Ok(crate::daemon::Startup::FrontOnly(front)) => return front_only(&front, json),
            Err(problem) => return without_a_plan(&source, hardware.as_deref(), &problem, json),
        };
    // What stops `run` is a PROBLEM here too, with the same exit code.
    let problems: Vec<String> = prepared
        .binary
        .as_ref()
        .err()
        .map(|e| e.to_string())
        .into_iter()
        .collect();
    if json {
        let doc = Report {
            config: prepared.source.to_string(),
            binary: prepared
                .binary
                .as_ref()
                .map(|p| p.display().to_string())
                .map_err(|e| e.message.clone()),
            hardware: &prepared.hardware,
            model: &prepared.model,
            plan: &prepared.plan,
            cost: prepared.cost.as_ref(),
            cost_key: &prepared.cost_key,
            binary_caps: prepared.caps,
            cost_decisions: crate::status::cost_decisions(&prepared.plan),
            command: prepared.argv(prepared.config.llama.port),
            models: crate::daemon::model_specs(&prepared.config, &prepared.model.path),
            memory_budget_bytes: memory_budget(&prepared),
            rpc_workers: prepared.rpc.iter().map(RpcWorkerReport::of).collect(),
            problems: problems.clone(),
        };
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(e) => report(&e),
        }
    } else {
        print!("{}", render(&prepared));
    }
    if problems.is_empty() {
        EXIT_OK
    } else {
        EXIT_CONFIG
    }
}

/// The report of a daemon with no local model: no binary, hardware or plan
/// matter, only the upstreams it routes to (their keys never shown).
fn front_only(front: &crate::daemon::FrontOnly, json: bool) -> i32 {
    let upstreams = &front.config.upstream;
    let specs = crate::daemon::upstream_specs(&front.config);
    if json {
        let listed: Vec<serde_json::Value> = upstreams
            .iter()
            .map(|u| {
                serde_json::json!({
                    "url": u.url,
                    "kind": u.kind,
                    "model": u.model,
                    "weight": u.weight,
                    "slots": u.slots,
                    "api_key_set": u.api_key.is_some(),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "config": front.source.to_string(),
            "front_only": true,
            "model": null,
            "upstreams": listed,
            "models": specs,
            "problems": Vec::<String>::new(),
        });
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(e) => report(&e),
        }
        return EXIT_OK;
    }
    let mut out = String::new();
    let _ = writeln!(out, "configuration  {}", front.source);
    let _ = writeln!(
        out,
        "\nmodel          none here: no [llama] model, so no llama-server runs; requests go to the upstreams (front only)"
    );
    let _ = writeln!(
        out,
        "\nupstreams      {}",
        crate::plan::counted(upstreams.len() as u64, "backend")
    );
    for u in upstreams {
        // The kind as the configuration spells it.
        let kind = serde_json::to_value(u.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<32} {kind} serving {:?}, weight {}, {}{}",
            u.url,
            u.model.as_deref().unwrap_or_default(),
            u.weight,
            u.slots.map_or("slots not set".to_string(), |n| {
                crate::plan::counted(n, "slot")
            }),
            if u.api_key.is_some() {
                ", with an API key"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(out, "\nmodels by name  {} servable", specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let _ = match i {
            0 => writeln!(
                out,
                "  {:<40} also answers requests that name no model",
                spec.name
            ),
            _ => writeln!(out, "  {}", spec.name),
        };
    }
    print!("{out}");
    EXIT_OK
}

/// The report when no plan can be made (the model is missing or not a
/// model, a `[models]` entry is wrong): what is known (the configuration,
/// the binary, the hardware) and the problem, exit 2 as `run` would. A
/// configuration that cannot be read, or a bad `--hardware` file, is only
/// reported.
fn without_a_plan(
    source: &ConfigSource,
    hardware_file: Option<&std::path::Path>,
    problem: &ConfigError,
    json: bool,
) -> i32 {
    let known = Config::load(source)
        .and_then(|config| Ok((config, crate::daemon::hardware_for(hardware_file)?)));
    let (config, (hardware, from_file)) = match known {
        Ok(known) => known,
        Err(e) => {
            report(&e);
            return EXIT_CONFIG;
        }
    };
    let binary = crate::daemon::resolve_binary(&config.llama.binary);
    let mut problems = vec![problem.to_string()];
    if let Err(e) = &binary {
        problems.push(e.clone());
    }
    if json {
        let doc = serde_json::json!({
            "config": source.to_string(),
            "binary": match &binary {
                Ok(path) => serde_json::json!({ "Ok": path.display().to_string() }),
                Err(e) => serde_json::json!({ "Err": e }),
            },
            "hardware": hardware,
            "problems": problems,
        });
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(e) => report(&e),
        }
    } else {
        let mut out = String::new();
        let _ = writeln!(out, "configuration  {source}");
        let _ = match &binary {
            Ok(path) => writeln!(out, "llama-server   {}", path.display()),
            Err(e) => writeln!(out, "llama-server   PROBLEM: {e}"),
        };
        render_hardware(&mut out, &hardware, from_file);
        let _ = writeln!(out, "\nmodel          PROBLEM: {problem}");
        let _ = writeln!(
            out,
            "\nno plan without a model: fix the problem above and run `contextpilotd doctor` again"
        );
        print!("{out}");
    }
    EXIT_CONFIG
}

fn render(p: &Prepared) -> String {
    let mut out = String::new();
    let hw = &p.hardware;
    let m = &p.model;
    let plan = &p.plan;
    let _ = writeln!(out, "configuration  {}", p.source);
    let _ = match &p.binary {
        Ok(path) => writeln!(out, "llama-server   {}", path.display()),
        Err(e) => writeln!(out, "llama-server   PROBLEM: {}", e.message),
    };
    render_hardware(&mut out, hw, p.hardware_from_file);
    let _ = writeln!(out, "\nmodel          {}", m.path.display());
    let _ = writeln!(
        out,
        "  {} {}, {} layers, trained context {}, {}",
        m.architecture,
        m.name.as_deref().unwrap_or(""),
        m.block_count,
        m.context_length.map_or("unknown".into(), |c| c.to_string()),
        human_bytes(m.size_bytes)
    );
    if let Some(window) = m.sliding_window {
        let _ = writeln!(out, "  sliding-window attention, window {window}");
    }
    let mem = &plan.memory;
    let _ = writeln!(out, "\nmemory budget");
    let _ = writeln!(
        out,
        "  GPU-usable   {} ({})",
        human_bytes(mem.gpu_usable_bytes),
        mem.gpu_usable_rule
    );
    let _ = writeln!(out, "  − model      {}", human_bytes(mem.model_bytes));
    let _ = writeln!(out, "  − margin     {}", human_bytes(mem.margin_bytes));
    let _ = writeln!(
        out,
        "  = KV budget  {} at {} per token; the plan uses {}",
        human_bytes(mem.kv_budget_bytes),
        human_bytes(mem.kv_bytes_per_token),
        human_bytes(mem.kv_planned_bytes)
    );
    render_layer_split(&mut out, p);
    let _ = writeln!(out, "\nsettings");
    for d in &plan.decisions {
        let _ = writeln!(out, "  {:<14} {:<7} {}", d.flag, d.value, d.why);
    }
    let _ = writeln!(out, "\ncost model");
    match &p.cost {
        Some(c) => {
            let _ = writeln!(
                out,
                "  prefill      {:.3} ms/token + {:.1} ms ({:?}{})",
                c.prefill_ms_per_token,
                c.prefill_fixed_ms,
                c.source,
                c.measured_at
                    .as_deref()
                    .map(|t| format!(", {t}"))
                    .unwrap_or_default()
            );
            for point in &c.prefill {
                let _ = writeln!(
                    out,
                    "    {:>6} tokens cold: {:.1} ms",
                    point.tokens, point.ms
                );
            }
            let _ = writeln!(out, "  exact hit    {:.1} ms", c.hit_ms);
            match &c.ram {
                Some(r) => {
                    let _ = writeln!(
                        out,
                        "  RAM cache    {} tokens: restore {:.0} ms, save {:.0} ms, recompute {:.0} ms",
                        r.tokens, r.restore_ms, r.save_ms, r.recompute_ms
                    );
                }
                None => {
                    let _ = writeln!(out, "  RAM cache    not measured (off, or absent)");
                }
            }
        }
        None => {
            let _ = writeln!(
                out,
                "  not measured yet: the daemon measures when llama-server is first ready, or run `contextpilotd tune`"
            );
        }
    }
    let specs = crate::daemon::model_specs(&p.config, &p.model.path);
    let _ = writeln!(
        out,
        "\nmodels by name  {} servable; loaded together within {} ([models] memory_mib)",
        specs.len(),
        human_bytes(memory_budget(p))
    );
    const SHOWN: usize = 12;
    for spec in specs.iter().take(SHOWN) {
        let _ = writeln!(
            out,
            "  {:<40} {}{}",
            spec.name,
            if spec.primary {
                "loaded at start".to_string()
            } else {
                "loaded on request".to_string()
            },
            match spec.keep_alive.duration() {
                None => ", stays loaded".to_string(),
                Some(d) => format!(", unloads {} s after its last request", d.as_secs()),
            }
        );
    }
    if specs.len() > SHOWN {
        let _ = writeln!(
            out,
            "  … and {} more (`contextpilotd models`)",
            specs.len() - SHOWN
        );
    }
    let warnings: Vec<&String> = hw.warnings.iter().chain(&plan.warnings).collect();
    if !warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings");
        for w in warnings {
            let _ = writeln!(out, "  ! {w}");
        }
    }
    let _ = writeln!(
        out,
        "\ncommand\n  {}",
        shell_quote(&p.argv(p.config.llama.port))
    );
    out
}

/// Where the layers go when there are RPC workers: each worker, what it
/// said, and its share.
fn render_layer_split(out: &mut String, p: &Prepared) {
    let plan = &p.plan;
    if plan.layer_split.is_empty() {
        return;
    }
    let offloaded: u32 = plan.layer_split.iter().map(|s| s.layers).sum();
    let _ = writeln!(
        out,
        "\nlayer split    {offloaded} offloaded layers over llama.cpp RPC (unauthenticated: workers belong on a network you trust)"
    );
    for share in &plan.layer_split {
        let worker = p.rpc.iter().find(|w| w.endpoint == share.device);
        let said = match worker.map(|w| &w.facts) {
            Some(Ok(facts)) => format!(
                "RPC {}, {}, {} free of {}",
                facts.protocol,
                crate::plan::counted(facts.devices.len() as u64, "device"),
                human_bytes(facts.free_bytes()),
                human_bytes(facts.total_bytes())
            ),
            Some(Err(why)) => format!("PROBLEM: {why}"),
            None => match share.free_bytes {
                Some(free) => format!("local GPU, {} usable", human_bytes(free)),
                None => "not asked".to_string(),
            },
        };
        let _ = writeln!(
            out,
            "  {:<22} {:>3} of {offloaded} layers  {said}",
            share.device, share.layers
        );
    }
}

fn render_hardware(out: &mut String, hw: &Hardware, from_file: bool) {
    let _ = writeln!(
        out,
        "\nhardware{}",
        if from_file {
            " (from --hardware)"
        } else {
            " (detected)"
        }
    );
    let _ = writeln!(out, "  chip         {} ({} {})", hw.chip, hw.os, hw.arch);
    let _ = writeln!(out, "  memory       {}", human_bytes(hw.memory_bytes));
    let _ = writeln!(
        out,
        "  cores        {} performance, {} efficiency, {} logical",
        hw.perf_cores, hw.efficiency_cores, hw.logical_cpus
    );
    let gpu = match (&hw.gpu_name, hw.gpu_cores, hw.gpu_memory_bytes) {
        (Some(name), Some(cores), _) => format!("{name}, {cores} cores"),
        (Some(name), None, Some(vram)) => format!("{name}, {} VRAM", human_bytes(vram)),
        (Some(name), None, None) => name.clone(),
        (None, _, _) => "none".to_string(),
    };
    let _ = writeln!(out, "  gpu          {gpu} (backend: {:?})", hw.accelerator);
}

fn memory_budget(p: &Prepared) -> u64 {
    crate::daemon::memory_budget(&p.config, &p.hardware)
}
