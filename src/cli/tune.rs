//! `contextpilotd tune`: measure this machine's prompt costs now (see
//! [`crate::cost::tune`]) with a llama-server of its own, cache them where
//! `run` finds them, and say what they decide.
//!
//! The child runs the plan as it is before any measurement, so that
//! llama-server's RAM prompt cache is on and its cost can be measured.

use std::time::{Duration, Instant};

use super::{report, ConfigArg, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK};
use crate::cost::{self, tune::TuneTarget};
use crate::plan::{self, PlanInputs};
use crate::supervisor::process::{free_loopback_port, ChildKey, ChildProcess, OutputTail};

pub fn run(arg: ConfigArg, json: bool) -> i32 {
    let prepared = match super::prepare(&arg, None) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let binary = match &prepared.binary {
        Ok(binary) => binary.clone(),
        Err(e) => {
            report(e);
            return EXIT_CONFIG;
        }
    };
    let llama = &prepared.config.llama;
    let unmeasured = plan::plan_with(
        &prepared.hardware,
        &prepared.model,
        llama,
        PlanInputs {
            caps: prepared.caps,
            cost: None,
            keep_shape: None,
            memory_limit: None,
            rpc: &prepared.rpc,
        },
    );
    let ram_tier = plan::planned_ram_cache_tokens(&unmeasured, &llama.extra_args) > 0;
    let runtime = match super::runtime(true) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let ready_timeout = Duration::from_secs(prepared.config.supervisor.ready_timeout_s);
    let stop_grace = Duration::from_secs(prepared.config.supervisor.stop_timeout_s);
    let measured = runtime.block_on(async {
        let port = free_loopback_port().map_err(|e| format!("no free port: {e}"))?;
        let argv = plan::command_line(&binary, &prepared.model.path, port, &unmeasured, llama);
        eprintln!("contextpilotd: measuring with {}", plan::shell_quote(&argv));
        let tail = OutputTail::default();
        let key = ChildKey::generate().map_err(|e| format!("no random key for the child: {e}"))?;
        let mut child = ChildProcess::spawn(&argv, &tail, Some(&key))
            .map_err(|e| format!("could not start {}: {e}", argv[0]))?;
        let result = async {
            wait_healthy(&mut child, port, ready_timeout, &tail).await?;
            cost::tune::measure(TuneTarget {
                port,
                slot: 0,
                ctx_per_slot: unmeasured.ctx_per_slot,
                n_vocab: None,
                ram_tier,
                key: Some(key.clone()),
            })
            .await
        }
        .await;
        let _ = child.stop(stop_grace).await;
        result
    });
    let mut profile = match measured {
        Ok(profile) => profile,
        Err(e) => {
            report(&format!("the measurement failed: {e}"));
            return EXIT_FAILURE;
        }
    };
    profile.key = prepared.cost_key.clone();
    let stored = cost::store_profile(&profile);
    let planned = plan::plan_with(
        &prepared.hardware,
        &prepared.model,
        llama,
        PlanInputs {
            caps: prepared.caps,
            cost: Some(&profile),
            keep_shape: None,
            memory_limit: None,
            rpc: &prepared.rpc,
        },
    );
    if json {
        match serde_json::to_string_pretty(&serde_json::json!({
            "profile": profile,
            "cached_in": stored.as_ref().ok().map(|p| p.display().to_string()),
            "decisions": crate::status::cost_decisions(&planned),
            "command": plan::command_line(&binary, &prepared.model.path, llama.port, &planned, llama),
        })) {
            Ok(text) => println!("{text}"),
            Err(e) => report(&e),
        }
    } else {
        println!(
            "prefill      {:.3} ms/token + {:.1} ms",
            profile.prefill_ms_per_token, profile.prefill_fixed_ms
        );
        for point in &profile.prefill {
            println!("  {:>6} tokens cold: {:.1} ms", point.tokens, point.ms);
        }
        println!("exact hit    {:.1} ms", profile.hit_ms);
        match &profile.ram {
            Some(r) => println!(
                "RAM cache    {} tokens: restore {:.0} ms, save {:.0} ms, recompute {:.0} ms",
                r.tokens, r.restore_ms, r.save_ms, r.recompute_ms
            ),
            None => println!("RAM cache    not measured (off in this configuration)"),
        }
        for decision in crate::status::cost_decisions(&planned) {
            println!("decided      {decision}");
        }
        println!("took         {:.1} s", profile.took_ms / 1000.0);
    }
    match stored {
        Ok(path) => {
            eprintln!(
                "contextpilotd: cached in {}; `run` uses it from its next start",
                path.display()
            );
            EXIT_OK
        }
        Err(e) => {
            report(&format!("could not cache the measurement: {e}"));
            EXIT_FAILURE
        }
    }
}

/// Polls `/health` until llama-server answers 200, it exits, or the
/// deadline passes.
async fn wait_healthy(
    child: &mut ChildProcess,
    port: u16,
    timeout: Duration,
    tail: &OutputTail,
) -> Result<(), String> {
    let http = crate::http_client::HttpClient::new();
    let deadline = Instant::now() + timeout;
    let url = format!("http://127.0.0.1:{port}/health");
    loop {
        if let Some(status) = child.try_exited() {
            let last = tail.lines().into_iter().rev().take(5).collect::<Vec<_>>();
            return Err(format!("llama-server exited ({status}): {last:?}"));
        }
        if matches!(http.get(&url, Duration::from_secs(2)).await, Ok((s, _)) if s.is_success()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("llama-server was not ready within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
