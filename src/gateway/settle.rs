//! Settle, the last stage of a model request: exactly once per request,
//! whatever happened, the slot table learns what the request did to its
//! slot (and which tagged requests that displaced leave the live index),
//! the cost model its real prompt size, the conversation and session stores
//! what an answered turn prepared, and the meter gets the request's record.
//!
//! A [`Ticket`] carries everything this needs from the moment the request
//! arrives; it moves (whole) into the stream task for a streamed answer. A
//! ticket dropped without being settled (the client went away, the handler
//! was cancelled) settles itself as a 499.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde_json::Value;

use super::error::ApiError;
use super::Gateway;
use crate::meter::{round2, CacheReuse, QueryRecord};
use crate::models::{Engine, EngineUse};
use crate::reorder::dedup::DedupStats;
use crate::reorder::prepare::Commits;
use crate::reorder::ReorderInfo;
use crate::slots::{SlotOutcome, SlotReceipt};
use crate::supervisor::rfc3339_utc;

/// One model request from its arrival to its record.
pub(super) struct Ticket {
    gateway: Arc<Gateway>,
    /// `None` once settled.
    facts: Option<RequestFacts>,
}

/// What settle needs: the record's facts and the stores' changes.
pub(super) struct RequestFacts {
    pub record: RecordFacts,
    /// The slot the last attempt ran on.
    pub slot: Option<SlotReceipt>,
    /// The caller's live-index id (`rid` or `request_id`), as ContextPilot's
    /// clients send it: it leaves the live index when its slot is overwritten.
    pub request_id: Option<String>,
    /// The model name the answer reports: the one requested, else the id.
    pub model_name: Option<String>,
    /// The loaded model the request runs on, held until it settles.
    pub engine: Option<EngineUse>,
    pub commits: Commits,
}

/// What the record says about the request itself.
pub(super) struct RecordFacts {
    pub query_id: String,
    pub timestamp: String,
    pub arrived: Instant,
    pub path: String,
    pub stream: bool,
    pub retried: bool,
    /// The prompt, only with `[log] prompts` on.
    pub prompt: Option<Value>,
    pub reorder: Option<ReorderInfo>,
    pub block_dedup: Option<DedupStats>,
}

/// How a request ended.
#[derive(Default)]
pub(super) struct Outcome {
    pub status: u16,
    pub timings: Option<Value>,
    pub usage: Option<Value>,
    pub error: Option<String>,
    pub ttft_ms: Option<f64>,
    pub completion: Option<String>,
    pub tokens_evaluated: Option<u64>,
    pub tokens_predicted: Option<u64>,
}

impl Outcome {
    pub fn failed(error: &ApiError) -> Outcome {
        Outcome {
            status: error.status.as_u16(),
            error: Some(error.message.clone()),
            ..Outcome::default()
        }
    }
}

impl Ticket {
    pub fn open(gateway: &Arc<Gateway>, path: &str) -> Ticket {
        let number = gateway.next_query.fetch_add(1, Ordering::Relaxed);
        let record = RecordFacts {
            query_id: format!("{}-{number}", gateway.query_prefix),
            timestamp: rfc3339_utc(SystemTime::now()),
            arrived: Instant::now(),
            path: path.to_string(),
            stream: false,
            retried: false,
            prompt: None,
            reorder: None,
            block_dedup: None,
        };
        Ticket {
            gateway: gateway.clone(),
            facts: Some(RequestFacts {
                record,
                slot: None,
                request_id: None,
                model_name: None,
                engine: None,
                commits: Commits::default(),
            }),
        }
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// The engine prepare chose (every request that reaches dispatch has one).
    pub fn engine(&self) -> Option<Arc<Engine>> {
        self.facts.as_ref()?.engine.as_deref().cloned()
    }

    /// Adds to what is known about the request.
    pub fn note(&mut self, update: impl FnOnce(&mut RequestFacts)) {
        if let Some(facts) = &mut self.facts {
            update(facts);
        }
    }

    pub fn arrived(&self) -> Instant {
        self.facts
            .as_ref()
            .map_or_else(Instant::now, |f| f.record.arrived)
    }

    pub fn path(&self) -> &str {
        self.facts.as_ref().map_or("", |f| &f.record.path)
    }

    /// The model name a whole answer reports.
    pub fn model_name(&self) -> Option<&str> {
        self.facts.as_ref()?.model_name.as_deref()
    }

    /// The client asked for a stream.
    pub fn wants_stream(&self) -> bool {
        self.facts.as_ref().is_some_and(|f| f.record.stream)
    }

    pub fn query_id(&self) -> &str {
        self.facts.as_ref().map_or("", |f| &f.record.query_id)
    }

    pub fn settle(mut self, outcome: Outcome) {
        if let Some(facts) = self.facts.take() {
            settle(&self.gateway, facts, outcome);
        }
    }

    /// Settles a request that gets `error` instead of an answer, and
    /// renders it.
    pub fn fail(self, error: ApiError) -> hyper::Response<super::Body> {
        self.settle(Outcome::failed(&error));
        error.into_response()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(facts) = self.facts.take() {
            let outcome = Outcome {
                status: 499,
                error: Some("the client went away before the response was complete".into()),
                ..Outcome::default()
            };
            settle(&self.gateway, facts, outcome);
        }
    }
}

/// Applies every change a finished request makes, in one place, then
/// hands the meter its record.
fn settle(gateway: &Gateway, facts: RequestFacts, outcome: Outcome) {
    let succeeded = outcome.status == 200;
    let reuse = outcome.timings.as_ref().and_then(CacheReuse::from_timings);
    let engine = facts.engine;
    let model = engine.as_ref().map(|e| e.name.clone());
    let decision = facts.slot.zip(engine.as_ref()).map(|(slot, engine)| {
        // llama.cpp reused less than half of what the daemon expected: its
        // picture of this slot is wrong.
        let diverged = match (&facts.record.reorder, &reuse) {
            (Some(info), Some(reuse)) => {
                reuse.reused_tokens * 2 < u64::from(info.predicted_reused_tokens)
            }
            _ => false,
        };
        let slot_outcome = SlotOutcome {
            succeeded,
            measured: outcome.timings.is_some(),
            diverged,
            request_id: facts.request_id.as_deref(),
        };
        let displaced = engine.scheduler.settle(&slot, slot_outcome);
        gateway.compat.evict_displaced(displaced);
        if let (true, Some(reuse)) = (succeeded, &reuse) {
            // Calibrate the token estimates slot choice predicts with.
            engine.scheduler.cost().observe_tokens(
                slot.decision.predicted_prompt_tokens,
                reuse.total_prompt_tokens,
            );
        }
        (slot.slot, slot.decision)
    });
    // Conversations and sessions remember a turn only once it was answered:
    // a failed turn sent again continues from the last good one.
    if succeeded {
        gateway.reorder.commit(facts.commits);
    }
    let model = model.or(facts.model_name).unwrap_or_default();
    gateway.meter.record(record(
        gateway,
        facts.record,
        model,
        decision,
        outcome,
        reuse,
    ));
    // The engine is let go only now, after its slot table learnt the
    // outcome: it may unload as soon as it is idle.
    drop(engine);
}

/// The request's record for the meter.
fn record(
    gateway: &Gateway,
    facts: RecordFacts,
    model: String,
    slot: Option<(usize, crate::slots::SlotDecision)>,
    outcome: Outcome,
    cache_reuse: Option<CacheReuse>,
) -> QueryRecord {
    let now = Instant::now();
    let latency_ms = round2(now.duration_since(facts.arrived).as_secs_f64() * 1000.0);
    let usage_n = |key: &str| outcome.usage.as_ref()?.get(key)?.as_u64();
    let timing_n = |key: &str| outcome.timings.as_ref()?.get(key)?.as_u64();
    let prompt_tokens = usage_n("prompt_tokens")
        .or_else(|| cache_reuse.as_ref().map(|c| c.total_prompt_tokens))
        .or(outcome.tokens_evaluated);
    let completion_tokens = usage_n("completion_tokens")
        .or_else(|| timing_n("predicted_n"))
        .or(outcome.tokens_predicted);
    // Without a stream there is no first-token moment to see: the latency
    // less the generation time is when the first token was ready.
    let ttft_ms = outcome.ttft_ms.or_else(|| {
        let gen_ms = cache_reuse.as_ref()?.gen_ms;
        (outcome.status == 200).then(|| round2((latency_ms - gen_ms).max(0.0)))
    });
    let gpu = gateway
        .gpu
        .as_ref()
        .and_then(|g| g.window(facts.arrived, now))
        .and_then(|w| serde_json::to_value(w).ok());
    let (slot_id, slot_decision) = slot.unzip();
    QueryRecord {
        query_id: facts.query_id,
        timestamp: facts.timestamp,
        path: facts.path,
        model,
        slot_id,
        status_code: outcome.status,
        stream: facts.stream,
        latency_ms,
        ttft_ms,
        prompt_tokens,
        completion_tokens,
        cache_reuse,
        error: outcome.error,
        retried: facts.retried,
        gpu,
        reorder: facts.reorder,
        slot_decision,
        block_dedup: facts.block_dedup,
        prompt: facts.prompt,
        completion: outcome.completion,
    }
}
