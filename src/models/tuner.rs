//! The cost model's measurement of a newly loaded model's child, in the
//! background (see [`crate::cost::tune`]), and the planned restart when
//! what it measured changes llama-server's flags.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cost;
use crate::gguf::ModelFacts;
use crate::hardware::Hardware;
use crate::plan::{self, BinaryCaps, LaunchPlan, PlanInputs};
use crate::slots::Scheduler;
use crate::supervisor;

/// Measures the first child that becomes ready (see [`cost::tune`]), in the
/// background, on a slot leased like any request's, and caches what it
/// found; a child that fails the measurement is measured again when the
/// next one is ready.
pub struct Tuner {
    pub key: String,
    pub ctx_per_slot: u32,
    pub ram_tier: bool,
    pub caps: BinaryCaps,
    pub rpc: Vec<crate::rpc::RpcWorker>,
    pub hardware: Hardware,
    pub model: ModelFacts,
    pub llama: crate::config::LlamaConfig,
    /// The plan the child runs with now.
    pub plan: LaunchPlan,
    pub replanner: supervisor::Replanner,
}

/// How long a new plan waits for the daemon to be idle before the child is
/// restarted with it anyway.
const REPLAN_IDLE_WAIT: Duration = Duration::from_secs(600);

impl Tuner {
    pub async fn run(
        self,
        mut view: tokio::sync::watch::Receiver<supervisor::SupervisorView>,
        scheduler: Arc<Scheduler>,
    ) {
        let cost = scheduler.cost().clone();
        let mut tried_pid = None;
        loop {
            let target = {
                let v = view.borrow_and_update();
                match (v.state, v.pid, v.port) {
                    (supervisor::State::Ready, Some(pid), Some(port)) if Some(pid) != tried_pid => {
                        Some((pid, port, v.key.clone()))
                    }
                    _ => None,
                }
            };
            let Some((pid, port, key)) = target else {
                if view.changed().await.is_err() {
                    return;
                }
                continue;
            };
            tried_pid = Some(pid);
            cost.set_note(true, Some("measuring prompt times on one slot".into()));
            let lease = match scheduler
                .acquire(
                    &mut crate::slots::ReservePolicy,
                    pid,
                    Duration::from_secs(300),
                )
                .await
            {
                Ok(lease) => lease,
                Err(_) => {
                    cost.set_note(false, Some("no slot came free to measure on".into()));
                    continue;
                }
            };
            let result = cost::tune::measure(cost::tune::TuneTarget {
                port,
                slot: lease.id(),
                ctx_per_slot: self.ctx_per_slot,
                n_vocab: None,
                ram_tier: self.ram_tier,
                key,
            })
            .await;
            // Whatever the measurement left in the slot is nothing anyone
            // asked for.
            scheduler.forget(lease.id(), lease.contents());
            drop(lease);
            match result {
                Ok(mut profile) => {
                    profile.key = self.key.clone();
                    let replanned = plan::plan_with(
                        &self.hardware,
                        &self.model,
                        &self.llama,
                        PlanInputs {
                            caps: self.caps,
                            cost: Some(&profile),
                            keep_shape: Some(&self.plan),
                            memory_limit: None,
                            rpc: &self.rpc,
                        },
                    );
                    let mut message = format!(
                        "measured in {:.1} s: prefill {:.3} ms/token + {:.1} ms, exact hit {:.1} ms",
                        profile.took_ms / 1000.0,
                        profile.prefill_ms_per_token,
                        profile.prefill_fixed_ms,
                        profile.hit_ms
                    );
                    if let Some((_, why)) = cost::ram_tier_decision(Some(&profile)) {
                        message.push_str(&format!("; {why}"));
                    }
                    let flags_change = plan::command_line(
                        Path::new(""),
                        Path::new(""),
                        0,
                        &replanned,
                        &self.llama,
                    ) != plan::command_line(
                        Path::new(""),
                        Path::new(""),
                        0,
                        &self.plan,
                        &self.llama,
                    );
                    if flags_change {
                        message.push_str(
                            "; llama-server restarts with the measured flags when no request is in flight",
                        );
                    }
                    tracing::info!("cost model: {message}");
                    match cost::store_profile(&profile) {
                        Ok(path) => tracing::info!("cost profile cached in {}", path.display()),
                        Err(e) => tracing::warn!("could not cache the cost profile: {e}"),
                    }
                    cost.replace(profile);
                    cost.set_note(false, Some(message));
                    cost.set_decisions(crate::status::cost_decisions(&replanned));
                    if flags_change {
                        wait_idle(&scheduler, REPLAN_IDLE_WAIT).await;
                        scheduler.set_ram_tokens(plan::planned_ram_cache_tokens(
                            &replanned,
                            &self.llama.extra_args,
                        ));
                        self.replanner.replan(replanned);
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!("could not measure llama-server's prompt times: {e}");
                    cost.set_note(false, Some(format!("measurement failed: {e}")));
                }
            }
        }
    }
}

/// Returns once no request is in flight or waiting, or after `limit`.
async fn wait_idle(scheduler: &Scheduler, limit: Duration) {
    let deadline = Instant::now() + limit;
    while (scheduler.busy() > 0 || scheduler.queued() > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
