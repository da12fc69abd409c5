//! contextpilotd: one daemon that supervises llama.cpp's `llama-server` and
//! makes it fast for long-context work.
//!
//! # Layout
//!
//! * [`config`]: the TOML configuration, validated with messages that name
//!   the file and the key.
//! * [`hardware`]: what machine this is (chip, memory, cores, GPU), from
//!   platform commands parsed by pure functions.
//! * [`gguf`]: the model's facts, read from its GGUF header.
//! * [`plan`]: a pure function from hardware + model + config to the
//!   llama-server settings and command line, each setting with its reason.
//! * [`supervisor`]: the actor that owns the llama-server child: spawn,
//!   readiness, liveness, restart with backoff, crash-loop detection, stop.
//!   [`supervisor::process`] holds the per-platform process code.
//! * [`gateway`]: the HTTP server on `[server] listen`: `/health`, `/status`,
//!   `/stats`, `/metrics`, the OpenAI-compatible API, batches, and the
//!   ContextPilot-compatible index API.
//! * [`reorder`]: everything that rewrites a prompt for the KV cache:
//!   `documents` ordering and rendering, conversations, inferred mode
//!   (document lists found in the prompt), block dedup, ContextPilot's
//!   clustering and its live index.
//! * [`cost`]: the cost model: prompt times measured on this machine
//!   ([`cost::tune`]), cached per setup, that slot choice, reordering and
//!   llama-server's flags are decided by.
//! * [`slots`]: the slot table, slot choice by predicted time (prompt time
//!   plus the value of what a request overwrites) and FIFO admission.
//! * [`models`]: the models served by name: discovery of the GGUFs other
//!   tools keep, `pull` from the Hugging Face hub, and the fleet of loaded
//!   models (one engine each: supervised child, slot table, cost model),
//!   loaded on demand within the memory budget, unloaded after `keep_alive`.
//! * [`meter`]: the meter thread (JSONL query log, `/stats`, Prometheus) and
//!   the GPU sampler.
//! * [`logbus`]: the daemon's log lines live: the last 500 and a broadcast,
//!   fed by a `tracing` layer, for `GET /logs` and `contextpilotd logs`.
//! * [`rpc`]: llama.cpp's RPC workers: what each offers (devices, memory),
//!   asked over ggml's RPC protocol before the child starts.
//! * [`rotate`]: a file of whole lines rotated by size, under the query log
//!   and the daemon's own log.
//! * [`status`]: the status document and its human rendering.
//! * [`daemon`]: wiring for `run`: preflight, one-instance lock, listener,
//!   supervisor, gateway, shutdown.
//! * [`service`]: the login service: the launchd LaunchAgent and the systemd
//!   user unit generated from one spec, the `launchctl`/`systemctl` command
//!   lines, and parsers for what those say about the service.
//! * [`http_client`]: the loopback HTTP client used for probes and `status`.
//! * [`sync`]: the lock helpers every shared table uses (usable after a
//!   panic elsewhere, and why that is sound).
//! * [`cli`]: the command line, one file per command.
//!
//! # Data flow
//!
//! `run` prepares (config → model header → hardware → plan), then loads the
//! primary model into the fleet: its engine starts a supervisor task, which
//! publishes its [`supervisor::SupervisorView`] on a `watch` channel. The
//! gateway answers requests from those views; a model request goes through
//! three stages, listed in `gateway::request`: prepare (body checks, the
//! model's engine from the fleet, then `reorder::prepare` rewrites it) → dispatch
//! (child, slot lease, forward, stream, retry) → settle (slot table, live
//! index, cost model, conversation stores, then the meter's record).

pub mod cli;
pub mod config;
pub mod cost;
pub mod daemon;
pub mod gateway;
pub mod gguf;
pub mod hardware;
pub mod http_client;
pub mod logbus;
pub mod meter;
pub mod models;
pub mod plan;
pub mod reorder;
pub mod rotate;
pub mod rpc;
pub mod service;
pub mod slots;
pub mod status;
pub mod supervisor;
pub mod sync;
#[cfg(test)]
mod testing;
