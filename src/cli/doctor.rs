//! `contextpilotd doctor`: the hardware, the model, and why each setting.

use std::fmt::Write;
use std::path::PathBuf;

use serde::Serialize;

use super::{report, ConfigArg, EXIT_OK};
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
}

pub fn run(arg: ConfigArg, hardware: Option<PathBuf>, json: bool) -> i32 {
    let prepared = match super::prepare(&arg, hardware.as_deref()) {
        Ok(p) => p,
        Err(code) => return code,
    };
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
        };
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(e) => report(&e),
        }
    } else {
        print!("{}", render(&prepared));
    }
    EXIT_OK
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
    let _ = writeln!(
        out,
        "\nhardware{}",
        if p.hardware_from_file {
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

fn memory_budget(p: &Prepared) -> u64 {
    crate::daemon::memory_budget(&p.config, &p.hardware)
}
