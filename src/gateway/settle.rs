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
    /// The backend routing chose, when the model has more than one.
    pub backend: Option<String>,
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
            backend: None,
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
    let reuse = outcome
        .timings
        .as_ref()
        .and_then(CacheReuse::from_timings)
        .or_else(|| outcome.usage.as_ref().and_then(CacheReuse::from_usage));
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
    let record = record(gateway, facts.record, model, decision, outcome, reuse);
    // The daemon's log line for it (and `contextpilotd logs --requests`).
    tracing::info!(target: crate::logbus::REQUEST_TARGET, "{}", request_line(&record));
    gateway.meter.record(record);
    // The engine is let go only now, after its slot table learnt the
    // outcome: it may unload as soon as it is idle.
    drop(engine);
}

/// One settled request as a log line of `key=value` fields, e.g.
/// `POST /v1/chat/completions model=smol status=200 ms=412 ttft_ms=120
/// cached=96/130 slot=0 choice=prefix reorder=kept stream=false
/// retried=false id=18c2f-7`. A value not known is `-`. Made only from
/// figures and names: never the prompt, the completion or an error's text
/// (which can quote the child or the body).
pub fn request_line(record: &QueryRecord) -> String {
    use std::fmt::Write;
    let dash = || "-".to_string();
    let ms = |v: f64| format!("{:.0}", v.max(0.0));
    // Only POST routes run a model request (`MODEL_ROUTES`, the batch route).
    let mut line = format!("POST {}", record.path);
    let _ = write!(line, " model={}", field(&record.model));
    let _ = write!(line, " status={}", record.status_code);
    let _ = write!(line, " ms={}", ms(record.latency_ms));
    let _ = write!(line, " ttft_ms={}", record.ttft_ms.map_or_else(dash, ms));
    let cached = record.cache_reuse.as_ref().map_or_else(dash, |c| {
        format!("{}/{}", c.reused_tokens, c.total_prompt_tokens)
    });
    let _ = write!(line, " cached={cached}");
    let slot = record.slot_id.map_or_else(dash, |s| s.to_string());
    let _ = write!(line, " slot={slot}");
    let choice = record.slot_decision.as_ref().map_or("-", |d| d.choice);
    let _ = write!(line, " choice={choice}");
    // Only requests with documents have an order to keep or change.
    let reorder = match &record.reorder {
        Some(info) if info.reordered => "reordered",
        Some(_) => "kept",
        None => "-",
    };
    let _ = write!(line, " reorder={reorder}");
    let _ = write!(line, " stream={}", record.stream);
    let _ = write!(line, " retried={}", record.retried);
    let _ = write!(line, " id={}", field(&record.query_id));
    line
}

/// A name as one `key=value` field: `-` when empty, quoted (Rust's escapes)
/// when it has spaces, quotes or control characters, so a line always
/// splits into the same fields.
fn field(value: &str) -> String {
    if value.is_empty() {
        "-".to_string()
    } else if value
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=')
    {
        format!("{value:?}")
    } else {
        value.to_string()
    }
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
        backend: facts.backend,
        completion: outcome.completion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::SlotDecision;

    fn answered() -> QueryRecord {
        QueryRecord {
            backend: None,
            query_id: "18c2f-7".into(),
            timestamp: "2026-12-02T10:00:00Z".into(),
            path: "/v1/chat/completions".into(),
            model: "smollm2".into(),
            slot_id: Some(0),
            status_code: 200,
            stream: false,
            latency_ms: 411.6,
            ttft_ms: Some(120.2),
            prompt_tokens: Some(130),
            completion_tokens: Some(4),
            cache_reuse: CacheReuse::from_timings(&serde_json::json!({
                "cache_n": 96, "prompt_n": 34, "prompt_ms": 30.0, "predicted_ms": 80.0,
                "predicted_n": 4,
            })),
            error: None,
            retried: false,
            gpu: None,
            reorder: None,
            slot_decision: Some(SlotDecision {
                choice: "prefix",
                predicted_ms: 30.0,
                predicted_prompt_tokens: 130,
                predicted_reused_tokens: 96,
                restore_ms: 0.0,
                save_ms: 0.0,
                lost_value_ms: 0.0,
                free_slots: 1,
            }),
            block_dedup: None,
            prompt: Some(serde_json::json!("the secret prompt")),
            completion: Some("the secret answer".into()),
        }
    }

    #[test]
    fn an_answered_request_is_one_line_of_its_figures() {
        assert_eq!(
            request_line(&answered()),
            "POST /v1/chat/completions model=smollm2 status=200 ms=412 ttft_ms=120 \
             cached=96/130 slot=0 choice=prefix reorder=- stream=false retried=false id=18c2f-7"
        );
    }

    #[test]
    fn what_is_not_known_is_a_dash_and_no_text_is_logged() {
        // A client that went away before a slot: no timings, slot or model.
        let mut record = answered();
        record.status_code = 499;
        record.model = String::new();
        record.slot_id = None;
        record.ttft_ms = None;
        record.cache_reuse = None;
        record.slot_decision = None;
        record.error = Some("a message quoting \"the secret prompt\"".into());
        record.stream = true;
        let line = request_line(&record);
        assert_eq!(
            line,
            "POST /v1/chat/completions model=- status=499 ms=412 ttft_ms=- cached=- slot=- \
             choice=- reorder=- stream=true retried=false id=18c2f-7"
        );
        assert!(!line.contains("secret"), "{line}");
        assert!(!request_line(&answered()).contains("secret"));
    }

    #[test]
    fn the_reorder_decision_is_named() {
        let mut record = answered();
        let info = |reordered| ReorderInfo {
            documents: 3,
            moved: if reordered { 2 } else { 0 },
            deduped: 0,
            predicted_reused_tokens: 90,
            slot_choice: "cached-prefix",
            reordered,
            predicted_gain_ms: 12.0,
        };
        record.reorder = Some(info(true));
        assert!(request_line(&record).contains(" reorder=reordered "));
        record.reorder = Some(info(false));
        assert!(request_line(&record).contains(" reorder=kept "));
    }

    #[test]
    fn a_name_with_spaces_stays_one_field() {
        let mut record = answered();
        record.model = "my model \"v2\"".into();
        let line = request_line(&record);
        assert!(
            line.contains(r#" model="my model \"v2\"" status=200"#),
            "{line}"
        );
        record.model = "a=b".into();
        assert!(request_line(&record).contains(r#" model="a=b" "#));
    }
}
