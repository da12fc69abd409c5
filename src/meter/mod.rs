//! Metering: one record per request, from llama-server's own timings.
//!
//! The meter runs on its own thread and owns everything it writes: the JSONL
//! query log (with size-based rotation), the aggregate statistics behind
//! `/stats`, and the Prometheus registry behind `/metrics`. Requests hand it
//! a [`QueryRecord`] through a channel and never wait on disk. Questions
//! (`/stats`, `/metrics`) travel the same channel, so an answer always
//! reflects every record sent before it.

pub mod gpu;
pub mod metrics;
pub mod recent;
mod stats;
mod writer;

use std::path::PathBuf;
use std::sync::mpsc;

use serde::Serialize;
use tokio::sync::oneshot;

pub use stats::StatsSnapshot;

use crate::config::MeterConfig;

/// One request, as written to the query log. Field names are an interface.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueryRecord {
    pub query_id: String,
    /// RFC 3339 UTC time the request arrived.
    pub timestamp: String,
    pub path: String,
    pub model: String,
    pub slot_id: Option<usize>,
    pub status_code: u16,
    pub stream: bool,
    pub latency_ms: f64,
    /// Time to the first generated token: measured on streams; on other
    /// requests, the latency less llama-server's generation time.
    pub ttft_ms: Option<f64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cache_reuse: Option<CacheReuse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub retried: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<serde_json::Value>,
    /// Requests with `documents`: what the reordering did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reorder: Option<crate::reorder::ReorderInfo>,
    /// How the slot was chosen and the prompt time predicted for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot_decision: Option<crate::slots::SlotDecision>,
    /// Repeated blocks of tool output replaced by pointers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_dedup: Option<crate::reorder::dedup::DedupStats>,
    /// Which backend answered, when the model has more than one: "local"
    /// or the upstream's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Only with `[meter] log_prompts = true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
}

/// How much of the prompt llama.cpp served from its KV cache, from the
/// response's `timings`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CacheReuse {
    pub total_prompt_tokens: u64,
    pub reused_tokens: u64,
    pub newly_computed: u64,
    /// `None` (null) for an empty prompt, where no ratio exists.
    pub reuse_ratio_pct: Option<f64>,
    pub prompt_eval_ms: f64,
    pub gen_ms: f64,
    pub prompt_tps: f64,
    pub gen_tps: f64,
}

impl CacheReuse {
    /// From a llama-server `timings` object: `cache_n` tokens came from the
    /// cache, `prompt_n` were computed.
    pub fn from_timings(timings: &serde_json::Value) -> Option<CacheReuse> {
        let num = |key: &str| timings.get(key).and_then(serde_json::Value::as_f64);
        let reused = num("cache_n")? as u64;
        let computed = num("prompt_n")? as u64;
        let total = reused + computed;
        Some(CacheReuse {
            total_prompt_tokens: total,
            reused_tokens: reused,
            newly_computed: computed,
            reuse_ratio_pct: (total > 0).then(|| round2(100.0 * reused as f64 / total as f64)),
            prompt_eval_ms: round2(num("prompt_ms").unwrap_or(0.0)),
            gen_ms: round2(num("predicted_ms").unwrap_or(0.0)),
            prompt_tps: round2(num("prompt_per_second").unwrap_or(0.0)),
            gen_tps: round2(num("predicted_per_second").unwrap_or(0.0)),
        })
    }
}

impl CacheReuse {
    /// From an OpenAI `usage` object (a backend that reports no llama-server
    /// `timings`: vLLM, SGLang, another server's OpenAI routes):
    /// `prompt_tokens_details.cached_tokens` of `prompt_tokens` came from
    /// its prefix cache. No times: those backends do not report them.
    pub fn from_usage(usage: &serde_json::Value) -> Option<CacheReuse> {
        let total = usage.get("prompt_tokens")?.as_u64()?;
        let reused = usage
            .pointer("/prompt_tokens_details/cached_tokens")?
            .as_u64()?
            .min(total);
        Some(CacheReuse {
            total_prompt_tokens: total,
            reused_tokens: reused,
            newly_computed: total - reused,
            reuse_ratio_pct: (total > 0).then(|| round2(100.0 * reused as f64 / total as f64)),
            prompt_eval_ms: 0.0,
            gen_ms: 0.0,
            prompt_tps: 0.0,
            gen_tps: 0.0,
        })
    }
}

pub fn round2(x: f64) -> f64 {
    if x.is_finite() {
        (x * 100.0).round() / 100.0
    } else {
        0.0
    }
}

/// Point-in-time values the gateway knows and the registry shows as gauges.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub child_up: bool,
    pub slots_busy: usize,
    pub queue_depth: usize,
    pub child_restarts: u32,
}

enum Message {
    Record(Box<QueryRecord>),
    Stats(oneshot::Sender<StatsSnapshot>),
    Metrics(Gauges, oneshot::Sender<String>),
    /// The records after a number, at most a count.
    Recent(u64, usize, oneshot::Sender<recent::RecentPage>),
    /// Answered once everything sent before it is written.
    Flush(oneshot::Sender<()>),
}

/// Records the meter may fall behind by before new ones are dropped (and
/// counted): a stalled disk must not grow the daemon without bound.
const BACKLOG: usize = 10_000;
/// `/stats`, `/metrics` and `/status` give up on the meter after this long.
const QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The gateway's handle on the meter thread.
#[derive(Clone)]
pub struct Meter {
    tx: mpsc::SyncSender<Message>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub log_prompts: bool,
}

impl Meter {
    /// Starts the meter thread. `query_log: None` keeps no log file.
    pub fn start(cfg: &MeterConfig, query_log: Option<PathBuf>) -> Meter {
        let (tx, rx) = mpsc::sync_channel(BACKLOG);
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let dropped_in_thread = dropped.clone();
        let mut writer =
            query_log.map(|path| writer::LogWriter::new(path, cfg.max_log_bytes, cfg.keep_files));
        let spawned = std::thread::Builder::new()
            .name("meter".into())
            .spawn(move || {
                let mut stats = stats::Stats::new();
                let mut registry = metrics::Metrics::new();
                let mut recent = recent::Recent::default();
                for message in rx {
                    match message {
                        Message::Record(record) => {
                            if let Some(w) = writer.as_mut() {
                                w.append(&record);
                            }
                            stats.add(&record);
                            registry.observe(&record);
                            recent.add(&record);
                        }
                        Message::Stats(reply) => {
                            let failed = writer.as_ref().map(|w| w.failed_writes()).unwrap_or(0);
                            let dropped =
                                dropped_in_thread.load(std::sync::atomic::Ordering::Relaxed);
                            let _ = reply.send(stats.snapshot(failed, dropped));
                        }
                        Message::Metrics(gauges, reply) => {
                            let _ = reply.send(registry.encode(gauges));
                        }
                        Message::Recent(after, limit, reply) => {
                            let _ = reply.send(recent.after(after, limit));
                        }
                        Message::Flush(reply) => {
                            let _ = reply.send(());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the meter thread: {e}; requests will not be metered");
        }
        Meter {
            tx,
            dropped,
            log_prompts: cfg.log_prompts,
        }
    }

    /// Hands a record to the meter; never blocks. When the meter is too far
    /// behind, the record is dropped and counted.
    pub fn record(&self, record: QueryRecord) {
        if let Err(mpsc::TrySendError::Full(_)) =
            self.tx.try_send(Message::Record(Box::new(record)))
        {
            let n = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            if n.is_power_of_two() {
                tracing::warn!("the meter is {BACKLOG} records behind; {n} records dropped so far");
            }
        }
    }

    async fn ask<T>(&self, message: impl FnOnce(oneshot::Sender<T>) -> Message) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(message(reply)).ok()?;
        tokio::time::timeout(QUERY_TIMEOUT, answer).await.ok()?.ok()
    }

    pub async fn stats(&self) -> Option<StatsSnapshot> {
        self.ask(Message::Stats).await
    }

    pub async fn metrics(&self, gauges: Gauges) -> Option<String> {
        self.ask(|reply| Message::Metrics(gauges, reply)).await
    }

    /// The requests recorded after number `after` (at most `limit`).
    pub async fn recent(&self, after: u64, limit: usize) -> Option<recent::RecentPage> {
        self.ask(|reply| Message::Recent(after, limit, reply)).await
    }

    /// Waits until every record sent so far is written (at shutdown).
    pub async fn flush(&self) {
        let (reply, answer) = oneshot::channel();
        if self.tx.try_send(Message::Flush(reply)).is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), answer).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 200 answered by `backend` (`None`: a model with one backend), with
    /// `reused` of `prompt` tokens from cache when `prompt` is not 0.
    pub(super) fn routed_record(
        backend: Option<&str>,
        reused: u64,
        prompt: u64,
        ttft_ms: Option<f64>,
    ) -> QueryRecord {
        QueryRecord {
            backend: backend.map(str::to_string),
            query_id: "q".into(),
            timestamp: "2026-12-03T00:00:00Z".into(),
            path: "/v1/chat/completions".into(),
            model: "m".into(),
            slot_id: None,
            status_code: 200,
            stream: false,
            latency_ms: 500.0,
            ttft_ms,
            prompt_tokens: (prompt > 0).then_some(prompt),
            completion_tokens: None,
            cache_reuse: (prompt > 0).then(|| {
                CacheReuse::from_usage(&serde_json::json!({
                    "prompt_tokens": prompt,
                    "prompt_tokens_details": {"cached_tokens": reused}
                }))
                .expect("a usage object with cached_tokens")
            }),
            error: None,
            retried: false,
            gpu: None,
            reorder: None,
            slot_decision: None,
            block_dedup: None,
            prompt: None,
            completion: None,
        }
    }

    #[test]
    fn reuse_from_timings() {
        let timings = serde_json::json!({"cache_n": 34, "prompt_n": 1, "prompt_ms": 16.794,
            "prompt_per_second": 59.5, "predicted_n": 4, "predicted_ms": 50.123, "predicted_per_second": 79.8});
        let reuse = CacheReuse::from_timings(&timings).unwrap();
        assert_eq!(reuse.total_prompt_tokens, 35);
        assert_eq!(reuse.reused_tokens, 34);
        assert_eq!(reuse.newly_computed, 1);
        assert_eq!(reuse.reuse_ratio_pct, Some(97.14));
        assert_eq!(reuse.prompt_eval_ms, 16.79);
        assert_eq!(reuse.gen_ms, 50.12);
        assert!(CacheReuse::from_timings(&serde_json::json!({"prompt_n": 3})).is_none());
        let empty =
            CacheReuse::from_timings(&serde_json::json!({"cache_n": 0, "prompt_n": 0})).unwrap();
        assert_eq!(empty.reuse_ratio_pct, None);
        let record = serde_json::to_value(&empty).unwrap();
        assert!(record["reuse_ratio_pct"].is_null());
    }

    /// The reference system's case 34, field for field.
    #[test]
    fn reuse_ratio_of_the_reference_case() {
        let timings = serde_json::json!({"prompt_n": 100, "cache_n": 300, "prompt_ms": 50,
            "predicted_ms": 400, "prompt_per_second": 2000, "predicted_per_second": 80});
        let reuse = CacheReuse::from_timings(&timings).unwrap();
        assert_eq!(
            (
                reuse.total_prompt_tokens,
                reuse.reused_tokens,
                reuse.newly_computed
            ),
            (400, 300, 100)
        );
        assert_eq!(reuse.reuse_ratio_pct, Some(75.0));
        assert_eq!((reuse.prompt_eval_ms, reuse.gen_ms), (50.0, 400.0));
        assert_eq!((reuse.prompt_tps, reuse.gen_tps), (2000.0, 80.0));
    }

    #[test]
    fn an_openai_usage_object_gives_the_cache_reuse() {
        let usage = serde_json::json!({
            "prompt_tokens": 400, "completion_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 300}
        });
        let reuse = CacheReuse::from_usage(&usage).unwrap();
        assert_eq!(
            (
                reuse.total_prompt_tokens,
                reuse.reused_tokens,
                reuse.newly_computed
            ),
            (400, 300, 100)
        );
        assert_eq!(reuse.reuse_ratio_pct, Some(75.0));
        // No details: nothing is known about reuse.
        assert!(CacheReuse::from_usage(&serde_json::json!({"prompt_tokens": 4})).is_none());
        // More cached than sent is clamped.
        let odd =
            serde_json::json!({"prompt_tokens": 4, "prompt_tokens_details": {"cached_tokens": 9}});
        assert_eq!(CacheReuse::from_usage(&odd).unwrap().newly_computed, 0);
    }
}
