//! The launch planner: a pure function from hardware, model and configuration
//! to llama-server settings, each with one line of why.
//!
//! # The memory rule
//!
//! The KV cache has to fit in memory the GPU can use, next to the weights:
//!
//! ```text
//! kv budget = GPU-usable memory − model file − margin
//! ```
//!
//! * **Apple Silicon (Metal).** The GPU shares RAM, but macOS caps how much of
//!   it Metal may wire (`recommendedMaxWorkingSetSize`). When an administrator
//!   set `iogpu.wired_limit_mb`, that is the cap. Otherwise macOS allows about
//!   two thirds of RAM on machines with up to 36 GiB and three quarters above
//!   (reported working sets: 10.7 GiB of 16 GiB on M1, 96 GiB of 128 GiB on
//!   M3 Max; GPUStack and llmfit measure the same ~67–75 %). We use those
//!   fractions.
//! * **NVIDIA (CUDA).** The card's VRAM.
//! * **CPU only.** Three quarters of RAM; the rest is left to the OS and the
//!   user's other programs.
//!
//! * **RPC workers** (`[llama] rpc_workers`). The free memory each worker
//!   beyond this machine reports is added: llama.cpp puts offloaded layers,
//!   and their KV, on RPC devices and local GPUs in proportion to free
//!   memory. A loopback worker's memory is this machine's, already counted.
//!
//! The margin (512 MiB below 16 GiB usable, 1 GiB above) covers llama.cpp's
//! compute buffers and the output buffer. KV bytes per token come from the
//! GGUF header: f16 K and V over every layer.
//!
//! # Slots
//!
//! A slot is both a unit of parallel decoding and a separate prompt cache, so
//! more slots keep more contexts warm. The count is as many as fit the budget
//! with `ctx_per_slot` tokens each, capped by what the chip can decode in
//! parallel: decoding is bound by memory bandwidth, and each extra sequence
//! adds compute per step, so the cap grows with GPU cores (one slot per four
//! Apple GPU cores; M1 8-core: 2, M3 Max 40-core: 10), and on a CPU with one
//! slot per two performance cores (at most 4). Then at least 1, at most 16.

use std::path::Path;

use serde::Serialize;

use crate::config::LlamaConfig;
use crate::gguf::ModelFacts;
use crate::hardware::apple::{self, ChipClass};
use crate::hardware::{Accelerator, Hardware};
use crate::rpc::RpcWorker;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Context per slot when the configuration says "auto" and memory allows.
pub const DEFAULT_CTX_PER_SLOT: u32 = 8192;
/// The smallest context per slot the planner shrinks to.
pub const MIN_CTX_PER_SLOT: u32 = 512;
pub const MAX_SLOTS: u32 = 16;
/// Assumed KV size when the model header lacks the attention shape: the
/// figure for an 8B model with grouped-query attention (Llama 3 8B).
const FALLBACK_KV_BYTES_PER_TOKEN: u64 = 128 * 1024;

/// What the llama-server binary can do, read from its `--help`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BinaryCaps {
    /// `--kv-unified`: one KV pool shared by every slot.
    pub kv_unified: bool,
    /// `--cache-ram`: the host-RAM prompt cache exists (on by default).
    pub cache_ram: bool,
    /// `--cache-idle-slots`: idle slots are saved to that cache on every
    /// new task, and with a unified KV also cleared.
    pub cache_idle_slots: bool,
    /// `--rpc`: built with llama.cpp's RPC backend (`GGML_RPC=ON`).
    pub rpc: bool,
}

impl BinaryCaps {
    /// Reads the flags a `llama-server --help` lists.
    pub fn from_help(help: &str) -> BinaryCaps {
        let has = |flag: &str| {
            help.split(|c: char| c.is_whitespace() || c == ',')
                .any(|word| word == flag)
        };
        BinaryCaps {
            kv_unified: has("--kv-unified"),
            cache_ram: has("--cache-ram"),
            cache_idle_slots: has("--no-cache-idle-slots"),
            rpc: has("--rpc"),
        }
    }
}

/// Everything besides hardware, model and configuration that the plan is
/// decided by: what the binary supports and what was measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanInputs<'a> {
    pub caps: BinaryCaps,
    pub cost: Option<&'a crate::cost::CostProfile>,
    /// A running plan whose slots and context to keep: a child restarted
    /// with measured flags keeps the slot table the daemon already has.
    pub keep_shape: Option<&'a LaunchPlan>,
    /// At most this much memory for this model (`[models] memory_mib`, less
    /// what the other loaded models take), when less than the GPU may use.
    pub memory_limit: Option<u64>,
    /// The configured RPC workers and what each said it offers.
    pub rpc: &'a [RpcWorker],
}

/// The settings the daemon gives llama-server, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LaunchPlan {
    pub slots: u32,
    /// Requests in flight at once (admission); fewer than `slots` when a
    /// shared KV pool keeps more prompts resident than the chip decodes in
    /// parallel.
    pub concurrency: u32,
    pub ctx_per_slot: u32,
    pub ctx_size: u64,
    pub threads: u32,
    pub batch: u32,
    pub ubatch: u32,
    pub gpu_layers: u32,
    pub cache_reuse: u32,
    /// `--swa-full`: keep the full KV for sliding-window layers so prefix and
    /// KV-shift reuse keep working.
    pub swa_full: bool,
    /// `--cache-ram` as passed: `None` leaves llama-server's default (its
    /// RAM prompt cache on), `Some(0)` turns it off.
    pub cache_ram_mib: Option<i64>,
    /// `--kv-unified`.
    pub kv_unified: bool,
    /// `--no-cache-idle-slots`.
    pub no_cache_idle_slots: bool,
    pub memory: MemoryBudget,
    /// `--rpc`: the workers the child spreads layers over.
    pub rpc_workers: Vec<String>,
    /// Where the offloaded layers go when there are RPC workers, as
    /// llama.cpp splits them (by free memory); empty without workers.
    pub layer_split: Vec<LayerShare>,
    /// One entry per derived setting, in command-line order.
    pub decisions: Vec<Decision>,
    /// Things that are not as they should be, one sentence each.
    pub warnings: Vec<String>,
}

impl LaunchPlan {
    /// The settings that change how fast a prompt is computed, for the cost
    /// profile's cache key (the RAM cache is not one: it is what a
    /// measurement decides).
    pub fn speed_flags(&self) -> Vec<String> {
        let mut flags = vec![
            format!("ngl={}", self.gpu_layers),
            format!("t={}", self.threads),
            format!("b={}", self.batch),
            format!("ub={}", self.ubatch),
            format!("np={}", self.slots),
            format!("c={}", self.ctx_size),
            format!("kvu={}", self.kv_unified),
            format!("swa_full={}", self.swa_full),
        ];
        // Layers on other machines compute at the network's pace.
        if !self.rpc_workers.is_empty() {
            flags.push(format!("rpc={}", self.rpc_workers.join(",")));
        }
        flags
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryBudget {
    pub gpu_usable_bytes: u64,
    /// How `gpu_usable_bytes` was derived.
    pub gpu_usable_rule: String,
    pub model_bytes: u64,
    pub margin_bytes: u64,
    /// What is left for the KV cache.
    pub kv_budget_bytes: u64,
    pub kv_bytes_per_token: u64,
    /// The KV cache the plan allocates: ctx_size × kv_bytes_per_token.
    pub kv_planned_bytes: u64,
}

/// One device's share of the offloaded layers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerShare {
    /// A worker's `host:port`, or "this machine" for the local GPU.
    pub device: String,
    /// Free memory the split is proportional to; `None` when the worker
    /// did not answer.
    pub free_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    pub layers: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The llama-server flag, e.g. "--parallel" ("(admission)" for the
    /// daemon's own limit on requests in flight).
    pub flag: String,
    pub value: String,
    pub why: String,
}

/// Memory the GPU may use, and the rule that gave it.
pub fn gpu_usable_memory(hw: &Hardware) -> (u64, String) {
    match hw.accelerator {
        Accelerator::Metal => match hw.gpu_wired_limit_bytes {
            Some(limit) => (
                limit,
                format!("iogpu.wired_limit_mb is set to {} MiB", limit / MIB),
            ),
            None if hw.memory_bytes <= 36 * GIB => (
                hw.memory_bytes / 3 * 2,
                "macOS lets Metal wire about 2/3 of RAM up to 36 GiB".to_string(),
            ),
            None => (
                hw.memory_bytes / 4 * 3,
                "macOS lets Metal wire about 3/4 of RAM above 36 GiB".to_string(),
            ),
        },
        Accelerator::Cuda => match hw.gpu_memory_bytes {
            Some(vram) => (vram, "the GPU's VRAM".to_string()),
            None => (
                hw.memory_bytes / 4 * 3,
                "VRAM unknown: 3/4 of RAM".to_string(),
            ),
        },
        Accelerator::Cpu => (
            hw.memory_bytes / 4 * 3,
            "CPU only: 3/4 of RAM, the rest left to the system".to_string(),
        ),
    }
}

/// How many sequences the chip decodes in parallel without each one slowing
/// to a crawl, and why.
pub fn compute_slot_cap(hw: &Hardware) -> (u32, String) {
    match hw.accelerator {
        Accelerator::Metal => match hw.gpu_cores {
            Some(cores) => (
                (cores / 4).clamp(1, MAX_SLOTS),
                format!(
                    "{cores} GPU cores decode about {} sequences in parallel",
                    (cores / 4).clamp(1, MAX_SLOTS)
                ),
            ),
            None => {
                let cap = match apple::classify(&hw.chip) {
                    Some(ChipClass::Ultra) => 16,
                    Some(ChipClass::Max) => 8,
                    Some(ChipClass::Pro) => 4,
                    Some(ChipClass::Base) | None => 2,
                };
                (
                    cap,
                    format!("GPU core count unknown; {} class allows {cap}", hw.chip),
                )
            }
        },
        Accelerator::Cuda => (
            8,
            "a discrete NVIDIA GPU decodes 8 sequences well in parallel".to_string(),
        ),
        Accelerator::Cpu => {
            let cap = (hw.perf_cores / 2).clamp(1, 4);
            (
                cap,
                format!("CPU decoding: one slot per two of {} cores", hw.perf_cores),
            )
        }
    }
}

/// Logical and physical batch sizes for the chip class: larger micro-batches
/// speed prefill on GPUs with more cores, at the cost of compute-buffer memory.
fn batch_sizes(hw: &Hardware) -> (u32, u32, String) {
    match hw.accelerator {
        Accelerator::Metal => match apple::classify(&hw.chip) {
            Some(ChipClass::Ultra) => (4096, 2048, "Ultra-class GPU: large prefill batches".into()),
            Some(ChipClass::Max) => (
                2048,
                1024,
                "Max-class GPU: larger prefill micro-batches".into(),
            ),
            Some(ChipClass::Pro) => (
                2048,
                512,
                "Pro-class GPU: llama.cpp's default batches".into(),
            ),
            Some(ChipClass::Base) | None => (
                1024,
                256,
                "base-class GPU with little memory: smaller compute buffers".into(),
            ),
        },
        Accelerator::Cuda => (2048, 512, "CUDA: llama.cpp's default batches".into()),
        Accelerator::Cpu => (2048, 512, "CPU: llama.cpp's default batches".into()),
    }
}

/// Plans llama-server's settings. Every explicit configuration value wins
/// over the derived one; the plan says so when that breaks the budget.
pub fn plan(hw: &Hardware, model: &ModelFacts, cfg: &LlamaConfig) -> LaunchPlan {
    plan_with(hw, model, cfg, PlanInputs::default())
}

/// `n` and the noun, singular for one: "1 slot", "4 slots". Every count of
/// slots people read goes through it.
pub fn counted(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// [`plan`] with what the binary supports and what was measured.
pub fn plan_with(
    hw: &Hardware,
    model: &ModelFacts,
    cfg: &LlamaConfig,
    inputs: PlanInputs<'_>,
) -> LaunchPlan {
    let mut warnings = Vec::new();
    let mut decisions = Vec::new();

    let (gpu_usable_bytes, gpu_usable_rule) = match (gpu_usable_memory(hw), inputs.memory_limit) {
        ((usable, _), Some(limit)) if limit < usable => (
            limit,
            format!(
                "{:.2} GiB: the share of the [models] memory budget this model may use",
                gib(limit)
            ),
        ),
        (usable, _) => usable,
    };
    let mut rpc = rpc_plan(hw, model, cfg, &inputs, gpu_usable_bytes, &mut warnings);
    let (gpu_usable_bytes, gpu_usable_rule) = match rpc.remote_free_bytes {
        0 => (gpu_usable_bytes, gpu_usable_rule),
        remote => (
            gpu_usable_bytes + remote,
            format!(
                "{gpu_usable_rule}, plus {:.2} GiB free on RPC workers",
                gib(remote)
            ),
        ),
    };
    let margin_bytes = if gpu_usable_bytes >= 16 * GIB {
        GIB
    } else {
        512 * MIB
    };
    let kv_budget_bytes = gpu_usable_bytes
        .saturating_sub(model.size_bytes)
        .saturating_sub(margin_bytes);
    if model.size_bytes + margin_bytes > gpu_usable_bytes {
        warnings.push(format!(
            "the model ({:.1} GiB) does not fit in the {:.1} GiB the GPU may use with a {} MiB margin: expect swapping or a failed load",
            gib(model.size_bytes),
            gib(gpu_usable_bytes),
            margin_bytes / MIB
        ));
    }
    let kv_bytes_per_token = model.kv_bytes_per_token().unwrap_or_else(|| {
        warnings.push(format!(
            "the model header lacks the attention shape; assuming {} KiB of KV per token",
            FALLBACK_KV_BYTES_PER_TOKEN / 1024
        ));
        FALLBACK_KV_BYTES_PER_TOKEN
    });
    let tokens_in_budget = kv_budget_bytes / kv_bytes_per_token;

    // Context per slot.
    let trained = model.context_length.map(|c| c.min(u32::MAX as u64) as u32);
    let (ctx_per_slot, ctx_why) = match cfg.ctx_per_slot.value() {
        Some(ctx) => (ctx, "set in the configuration".to_string()),
        None => {
            let wanted = trained.map_or(DEFAULT_CTX_PER_SLOT, |t| t.min(DEFAULT_CTX_PER_SLOT));
            let wanted_why = match trained {
                Some(t) if t < DEFAULT_CTX_PER_SLOT => format!("the model's trained context ({t})"),
                _ => format!("{DEFAULT_CTX_PER_SLOT} tokens per slot for long-context work"),
            };
            // With the slot count fixed by the user, each slot gets its share.
            let tokens_per_slot = tokens_in_budget / cfg.slots.value().unwrap_or(1).max(1) as u64;
            if tokens_per_slot >= wanted as u64 {
                (wanted, wanted_why)
            } else {
                let fit = ((tokens_per_slot / 256) * 256).min(u32::MAX as u64) as u32;
                if fit < MIN_CTX_PER_SLOT {
                    (MIN_CTX_PER_SLOT, "the minimum: memory is short".to_string())
                } else {
                    (
                        fit,
                        format!(
                            "shrunk from {wanted} to fit {:.2} GiB of KV budget",
                            gib(kv_budget_bytes)
                        ),
                    )
                }
            }
        }
    };

    let kv_unified = match cfg.kv_unified {
        Some(on) => on && inputs.caps.kv_unified,
        None => inputs.caps.kv_unified,
    };
    let user_cache_ram = extra_flag_value(&cfg.extra_args, &["--cache-ram", "-cram"]);
    let ram_decision = crate::cost::ram_tier_decision(inputs.cost);
    // Without llama-server's RAM cache (measured to cost more than it saves,
    // or turned off), the KV cache alone holds the working set.
    let ram_tier_off = match &user_cache_ram {
        Some(mib) => mib.trim() == "0",
        None => !inputs.caps.cache_ram || matches!(ram_decision, Some((false, _))),
    };

    // Slots: each holds one prompt in the KV cache, and at most
    // `concurrency` of them decode at once.
    let (slots, slots_why, concurrency) = match cfg.slots.value() {
        Some(slots) => (slots, "set in the configuration".to_string(), slots),
        None => {
            let (cap, cap_why) = compute_slot_cap(hw);
            let fit = (tokens_in_budget / ctx_per_slot as u64).min(MAX_SLOTS as u64) as u32;
            let decode = cap.min(fit).max(1);
            if kv_unified && ram_tier_off {
                // One shared pool: an idle slot costs nothing until it holds
                // a prompt, so plan resident prompts for the working set (at
                // half a context each) and decode only `decode` at a time.
                // With a RAM cache that pays, that cache holds the working
                // set instead, without reserving the KV memory.
                let resident = (tokens_in_budget / (ctx_per_slot as u64 / 2).max(1))
                    .min(MAX_SLOTS as u64) as u32;
                let slots = resident.max(decode);
                (
                    slots,
                    format!(
                        "{slots} resident prompts: a shared KV pool fits {resident} of half a context ({} tokens) each; {cap_why}, so {decode} run at once",
                        ctx_per_slot / 2
                    ),
                    decode,
                )
            } else if fit >= cap {
                (
                    cap.max(1),
                    format!("{cap_why}; memory fits {fit}"),
                    cap.max(1),
                )
            } else {
                (
                    fit.max(1),
                    format!("memory fits {fit} of {ctx_per_slot} tokens (compute allows {cap})"),
                    fit.max(1),
                )
            }
        }
    };
    // A unified pool is capped by the budget (slots may hold less than a
    // whole context each); split contexts are slots × ctx_per_slot.
    let ctx_size = if kv_unified && ram_tier_off && cfg.slots.value().is_none() {
        (slots as u64 * ctx_per_slot as u64)
            .min(tokens_in_budget / 256 * 256)
            .max(ctx_per_slot as u64)
    } else {
        slots as u64 * ctx_per_slot as u64
    };
    let (slots, slots_why, concurrency, ctx_size) = match inputs.keep_shape {
        Some(running) => (
            running.slots,
            "kept from the running llama-server: the next start plans slots from the measurement"
                .to_string(),
            running.concurrency,
            running.ctx_size,
        ),
        None => (slots, slots_why, concurrency, ctx_size),
    };
    let kv_planned_bytes = ctx_size.saturating_mul(kv_bytes_per_token);
    let over_budget = kv_planned_bytes > kv_budget_bytes;
    if over_budget {
        let whose = if cfg.slots.value().is_some() || cfg.ctx_per_slot.value().is_some() {
            "the configured"
        } else {
            "even the smallest"
        };
        warnings.push(format!(
            "{whose} slots × ctx_per_slot need {:.2} GiB of KV cache, more than the {:.2} GiB budget",
            gib(kv_planned_bytes),
            gib(kv_budget_bytes)
        ));
    }
    if let Some(t) = trained {
        if ctx_per_slot > t {
            warnings.push(format!(
                "ctx_per_slot {ctx_per_slot} exceeds the model's trained context of {t}"
            ));
        }
    }

    let (threads, threads_why) = match cfg.threads.value() {
        Some(t) => (t, "set in the configuration".to_string()),
        None => (
            hw.perf_cores.max(1),
            format!("the {} performance cores", hw.perf_cores.max(1)),
        ),
    };
    let (class_batch, class_ubatch, batch_why) = batch_sizes(hw);
    let (batch, ubatch, batch_why) = match cfg.batch.value() {
        Some(b) => (
            b,
            class_ubatch.min(b),
            "set in the configuration".to_string(),
        ),
        None => (class_batch, class_ubatch, batch_why),
    };

    let swa_full = match model.sliding_window {
        Some(window) if !over_budget => {
            decisions_push(
                &mut decisions,
                "--swa-full",
                "on",
                format!(
                    "sliding-window attention (window {window}) would silently disable prefix and KV-shift reuse; the full cache fits"
                ),
            );
            true
        }
        Some(window) => {
            warnings.push(format!(
                "sliding-window model (window {window}) without --swa-full: memory is short, so llama-server disables --cache-reuse and partial prefix reuse"
            ));
            false
        }
        None => false,
    };

    let cache_ram_mib = match ram_decision {
        _ if user_cache_ram.is_some() => None,
        _ if !inputs.caps.cache_ram => None,
        Some((keep, why)) => {
            decisions_push(
                &mut decisions,
                "--cache-ram",
                if keep { "default" } else { "0" },
                why,
            );
            (!keep).then_some(0)
        }
        None => None,
    };
    let ram_tier_on = inputs.caps.cache_ram && cache_ram_mib != Some(0);
    if kv_unified {
        decisions_push(
            &mut decisions,
            "--kv-unified",
            "on",
            match cfg.kv_unified {
                Some(_) => "set in the configuration".to_string(),
                None => format!(
                    "one KV pool of {ctx_size} tokens shared by the {}: an idle slot reserves nothing and one prompt may use more than {ctx_per_slot} tokens when others are short",
                    counted(slots, "slot")
                ),
            },
        );
    }
    let user_idle = cfg
        .extra_args
        .iter()
        .any(|a| a == "--cache-idle-slots" || a == "--no-cache-idle-slots");
    let no_cache_idle_slots = ram_tier_on && inputs.caps.cache_idle_slots && !user_idle;
    if no_cache_idle_slots {
        decisions_push(
            &mut decisions,
            "--no-cache-idle-slots",
            "on",
            if kv_unified {
                "with a unified KV, llama-server would clear every idle slot on each new request; contextpilotd keeps them warm".to_string()
            } else {
                "llama-server would copy every idle slot to its RAM cache on each new request; slots stay warm in the KV cache".to_string()
            },
        );
    }

    let mut ordered = vec![
        Decision {
            flag: "--ctx-size".into(),
            value: ctx_size.to_string(),
            why: if ctx_size == slots as u64 * ctx_per_slot as u64 {
                format!(
                    "{} × {ctx_per_slot} tokens; {ctx_why}; {:.2} GiB of KV",
                    counted(slots, "slot"),
                    gib(kv_planned_bytes)
                )
            } else {
                format!(
                    "one pool for {} of up to {ctx_per_slot} tokens ({ctx_why}), as much as the budget holds; {:.2} GiB of KV",
                    counted(slots, "slot"),
                    gib(kv_planned_bytes)
                )
            },
        },
        Decision {
            flag: "--parallel".into(),
            value: slots.to_string(),
            why: slots_why,
        },
        Decision {
            flag: "-ngl".into(),
            value: cfg.gpu_layers.to_string(),
            why: match (hw.accelerator, cfg.gpu_layers) {
                _ if !rpc.endpoints.is_empty() && cfg.gpu_layers >= 99 => {
                    "offload every layer to the GPU and the RPC workers".into()
                }
                (Accelerator::Cpu, _) if rpc.endpoints.is_empty() => {
                    "no GPU: llama-server ignores it".into()
                }
                (_, 99) => "offload every layer to the GPU".into(),
                _ => "set in the configuration".into(),
            },
        },
        Decision {
            flag: "--cache-reuse".into(),
            value: cfg.cache_reuse.to_string(),
            why: if cfg.cache_reuse == 0 {
                "KV shifting off: only exact prefix reuse".into()
            } else {
                format!(
                    "reuse moved chunks of at least {} tokens by shifting KV",
                    cfg.cache_reuse
                )
            },
        },
        Decision {
            flag: "-t".into(),
            value: threads.to_string(),
            why: threads_why,
        },
        Decision {
            flag: "-b".into(),
            value: batch.to_string(),
            why: batch_why.clone(),
        },
        Decision {
            flag: "-ub".into(),
            value: ubatch.to_string(),
            why: batch_why,
        },
    ];
    ordered.append(&mut decisions);
    ordered.extend(rpc.decision.take());

    if concurrency < slots {
        decisions_push(
            &mut ordered,
            "(admission)",
            &concurrency.to_string(),
            format!(
                "requests in flight at once; the other {} {} prompts warm",
                counted(slots - concurrency, "slot"),
                if slots - concurrency == 1 {
                    "keeps"
                } else {
                    "keep"
                }
            ),
        );
    }
    LaunchPlan {
        slots,
        concurrency,
        ctx_per_slot,
        ctx_size,
        threads,
        batch,
        ubatch,
        gpu_layers: cfg.gpu_layers,
        cache_reuse: cfg.cache_reuse,
        swa_full,
        cache_ram_mib,
        kv_unified,
        no_cache_idle_slots,
        memory: MemoryBudget {
            gpu_usable_bytes,
            gpu_usable_rule,
            model_bytes: model.size_bytes,
            margin_bytes,
            kv_budget_bytes,
            kv_bytes_per_token,
            kv_planned_bytes,
        },
        rpc_workers: rpc.endpoints,
        layer_split: rpc.split,
        decisions: ordered,
        warnings,
    }
}

/// What the RPC workers add to the plan.
struct RpcPlan {
    /// For `--rpc`; empty when there are none or the binary lacks RPC.
    endpoints: Vec<String>,
    /// Free memory on workers beyond this machine.
    remote_free_bytes: u64,
    split: Vec<LayerShare>,
    decision: Option<Decision>,
}

fn rpc_plan(
    hw: &Hardware,
    model: &ModelFacts,
    cfg: &LlamaConfig,
    inputs: &PlanInputs<'_>,
    local_usable_bytes: u64,
    warnings: &mut Vec<String>,
) -> RpcPlan {
    let none = RpcPlan {
        endpoints: Vec::new(),
        remote_free_bytes: 0,
        split: Vec::new(),
        decision: None,
    };
    if cfg.rpc_workers.is_empty() {
        return none;
    }
    if !inputs.caps.rpc {
        warnings.push(format!(
            "[llama] rpc_workers lists {}, but this llama-server was built without RPC (no --rpc in its --help): the model runs on this machine alone; build llama.cpp with -DGGML_RPC=ON",
            counted(cfg.rpc_workers.len() as u64, "worker")
        ));
        return none;
    }
    let facts = |endpoint: &str| {
        inputs
            .rpc
            .iter()
            .find(|w| w.endpoint == endpoint)
            .map(|w| w.facts.as_ref())
    };
    let mut remote_free_bytes = 0;
    let unknown = |device: &str| LayerShare {
        device: device.to_string(),
        free_bytes: None,
        total_bytes: None,
        layers: 0,
    };
    // llama.cpp's device order: RPC devices first, then the local GPUs.
    let mut split = Vec::new();
    for endpoint in &cfg.rpc_workers {
        match facts(endpoint) {
            Some(Ok(worker)) => {
                let on_this_machine = crate::rpc::split_endpoint(endpoint)
                    .is_ok_and(|(host, _)| crate::rpc::is_loopback_host(host));
                if !on_this_machine {
                    remote_free_bytes += worker.free_bytes();
                }
                split.push(LayerShare {
                    free_bytes: Some(worker.free_bytes()),
                    total_bytes: Some(worker.total_bytes()),
                    ..unknown(endpoint)
                });
            }
            Some(Err(why)) => {
                warnings.push(format!(
                    "RPC worker {endpoint} did not answer: {why}; llama-server cannot start until it does"
                ));
                split.push(unknown(endpoint));
            }
            None => split.push(unknown(endpoint)),
        }
    }
    if hw.accelerator != Accelerator::Cpu {
        split.push(LayerShare {
            free_bytes: Some(local_usable_bytes),
            ..unknown("this machine")
        });
    }
    // Layers offloaded: the blocks and the output layer, at most -ngl.
    let offloaded = (model.block_count + 1).min(u64::from(cfg.gpu_layers)) as u32;
    let free: Vec<u64> = split.iter().map(|s| s.free_bytes.unwrap_or(0)).collect();
    for (share, layers) in split.iter_mut().zip(split_layers(offloaded, &free)) {
        share.layers = layers;
    }
    let on_workers: u32 = split
        .iter()
        .take(cfg.rpc_workers.len())
        .map(|s| s.layers)
        .sum();
    RpcPlan {
        endpoints: cfg.rpc_workers.clone(),
        remote_free_bytes,
        split,
        decision: Some(Decision {
            flag: "--rpc".into(),
            value: cfg.rpc_workers.join(","),
            why: format!(
                "{on_workers} of {offloaded} offloaded layers on {}, split by free memory as llama.cpp does",
                counted(cfg.rpc_workers.len() as u64, "RPC worker")
            ),
        }),
    }
}

/// llama.cpp's layer split: layer `i` of `layers` goes to the first device
/// whose cumulative share of the free memory exceeds `i / layers`. Devices
/// whose memory is unknown (all zero) share equally.
pub fn split_layers(layers: u32, free: &[u64]) -> Vec<u32> {
    let mut counts = vec![0u32; free.len()];
    if free.is_empty() {
        return counts;
    }
    let weights: Vec<f64> = if free.iter().all(|&f| f == 0) {
        vec![1.0; free.len()]
    } else {
        free.iter().map(|&f| f as f64).collect()
    };
    let sum: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(weights.len());
    let mut running = 0.0;
    for w in &weights {
        running += w / sum;
        cumulative.push(running);
    }
    for layer in 0..layers {
        let at = f64::from(layer) / f64::from(layers);
        let device = cumulative
            .iter()
            .position(|&c| c > at)
            .unwrap_or(free.len() - 1);
        counts[device] += 1;
    }
    counts
}

fn decisions_push(decisions: &mut Vec<Decision>, flag: &str, value: &str, why: String) {
    decisions.push(Decision {
        flag: flag.to_string(),
        value: value.to_string(),
        why,
    });
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB as f64
}

/// The llama-server argv for a plan: binary first, `extra_args` last.
pub fn command_line(
    binary: &Path,
    model: &Path,
    port: u16,
    plan: &LaunchPlan,
    cfg: &LlamaConfig,
) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        binary.display().to_string(),
        "-m".into(),
        model.display().to_string(),
    ];
    let mut push = |flag: &str, value: String| {
        argv.push(flag.to_string());
        argv.push(value);
    };
    push("--host", "127.0.0.1".into());
    push("--port", port.to_string());
    push("--ctx-size", plan.ctx_size.to_string());
    push("--parallel", plan.slots.to_string());
    push("-ngl", plan.gpu_layers.to_string());
    push("--cache-reuse", plan.cache_reuse.to_string());
    push("-t", plan.threads.to_string());
    push("-b", plan.batch.to_string());
    push("-ub", plan.ubatch.to_string());
    if let Some(alias) = &cfg.model_alias {
        push("--alias", alias.clone());
    }
    argv.push("--metrics".into());
    if plan.swa_full {
        argv.push("--swa-full".into());
    }
    if let Some(mib) = plan.cache_ram_mib {
        argv.push("--cache-ram".into());
        argv.push(mib.to_string());
    }
    if plan.kv_unified {
        argv.push("--kv-unified".into());
    }
    if plan.no_cache_idle_slots {
        argv.push("--no-cache-idle-slots".into());
    }
    if !plan.rpc_workers.is_empty() {
        argv.push("--rpc".into());
        argv.push(plan.rpc_workers.join(","));
    }
    argv.extend(cfg.extra_args.iter().cloned());
    argv
}

/// Quotes an argv for a POSIX shell, on one line.
pub fn shell_quote(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            shlex::try_quote(a)
                .map(|q| q.into_owned())
                .unwrap_or_else(|_| format!("{a:?}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// llama-server's default host-RAM prompt cache (`--cache-ram`), MiB.
pub const DEFAULT_CACHE_RAM_MIB: i64 = 8192;

/// The last value given for one of `flags` in `args` (`--flag value` or
/// `--flag=value`).
fn extra_flag_value(args: &[String], flags: &[&str]) -> Option<String> {
    let mut found = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.split_once('=') {
            Some((flag, value)) if flags.contains(&flag) => found = Some(value.to_string()),
            None if flags.contains(&arg.as_str()) => {
                if let Some(value) = iter.next() {
                    found = Some(value.clone());
                }
            }
            _ => {}
        }
    }
    found
}

/// How many tokens llama-server's RAM prompt cache holds under `plan`:
/// `--cache-ram` (or `-cram`) from the extra arguments, else the plan's,
/// else the default, over the KV bytes per token. 0 when it is off; `-1`
/// (no limit) counts as very large.
pub fn planned_ram_cache_tokens(plan: &LaunchPlan, extra_args: &[String]) -> u64 {
    match extra_flag_value(extra_args, &["--cache-ram", "-cram"]) {
        Some(_) => ram_cache_tokens(extra_args, plan.memory.kv_bytes_per_token),
        None => match plan.cache_ram_mib {
            Some(mib) => mib_to_tokens(mib, plan.memory.kv_bytes_per_token),
            None => ram_cache_tokens(&[], plan.memory.kv_bytes_per_token),
        },
    }
}

/// How many tokens llama-server's RAM prompt cache holds: `--cache-ram` (or
/// `-cram`) from the extra arguments, else the default, over the KV bytes per
/// token. 0 when it is off; `-1` (no limit) counts as very large.
pub fn ram_cache_tokens(extra_args: &[String], kv_bytes_per_token: u64) -> u64 {
    let mib = extra_flag_value(extra_args, &["--cache-ram", "-cram"])
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(DEFAULT_CACHE_RAM_MIB);
    mib_to_tokens(mib, kv_bytes_per_token)
}

fn mib_to_tokens(mib: i64, kv_bytes_per_token: u64) -> u64 {
    match mib {
        0 => 0,
        n if n < 0 => u64::MAX / 4,
        n => (n as u64).saturating_mul(1 << 20) / kv_bytes_per_token.max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slot_is_singular() {
        assert_eq!(counted(1u32, "slot"), "1 slot");
        assert_eq!(counted(0u32, "slot"), "0 slots");
        assert_eq!(counted(4u32, "slot"), "4 slots");
    }

    #[test]
    fn ram_cache_size_in_tokens() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(ram_cache_tokens(&[], 1 << 20), 8192);
        assert_eq!(ram_cache_tokens(&args(&["--cache-ram", "0"]), 1024), 0);
        assert_eq!(ram_cache_tokens(&args(&["-cram=2"]), 1024), 2048);
        assert_eq!(
            ram_cache_tokens(&args(&["--cache-ram", "-1"]), 1024),
            u64::MAX / 4
        );
        assert_eq!(
            ram_cache_tokens(&args(&["--cache-ram", "junk"]), 1 << 20),
            8192
        );
    }
}
