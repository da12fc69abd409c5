//! The aggregates behind `GET /stats`: totals since start, percentiles over
//! a bounded window of recent requests.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use super::{round2, QueryRecord};
use crate::supervisor::rfc3339_utc;

/// Percentiles are computed over at most this many recent requests.
pub const WINDOW: usize = 1000;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Distribution {
    pub avg: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

impl Distribution {
    /// Nearest-rank percentiles; `None` for no values.
    pub fn of(values: impl Iterator<Item = f64>) -> Option<Distribution> {
        let mut sorted: Vec<f64> = values.filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            sorted[((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
        };
        Some(Distribution {
            avg: round2(sorted.iter().sum::<f64>() / sorted.len() as f64),
            p50: round2(rank(50.0)),
            p95: round2(rank(95.0)),
            p99: round2(rank(99.0)),
            min: round2(sorted[0]),
            max: round2(sorted[sorted.len() - 1]),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CacheTotals {
    pub queries_with_data: u64,
    pub avg_reuse_ratio_pct: f64,
    pub token_weighted_reuse_pct: f64,
    pub reused_tokens_total: u64,
    pub prompt_tokens_total: u64,
}

/// One backend's share of the requests that name a backend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendTotals {
    pub queries: u64,
    pub errors: u64,
    pub reused_tokens: u64,
    pub prompt_tokens: u64,
    pub reuse_pct: f64,
    /// Over the backend's last [`WINDOW`] requests with a TTFT.
    pub ttft_ms: Option<Distribution>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotTotals {
    pub queries: u64,
    pub reused_tokens: u64,
    pub prompt_tokens: u64,
    pub reuse_pct: f64,
}

/// Requests with `documents`: what reordering did and how well the daemon
/// predicted llama.cpp's reuse.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReorderTotals {
    pub requests: u64,
    pub documents: u64,
    pub moved: u64,
    pub deduped: u64,
    pub predicted_reused_tokens: u64,
    /// llama.cpp's `cache_n` over the same requests.
    pub actual_reused_tokens: u64,
    /// Requests where llama.cpp reused less than half the prediction (the
    /// slot's state was resynced).
    pub mispredicted: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsSnapshot {
    pub total_queries: u64,
    pub errors: u64,
    /// Answers 400–499, 499 (the client went away) included: the request or
    /// the caller, not the daemon.
    pub client_errors: u64,
    /// Answers 500 and up: the daemon or its llama-server.
    pub server_errors: u64,
    pub retried: u64,
    pub latency_ms: Option<Distribution>,
    pub ttft_ms: Option<Distribution>,
    pub cache_reuse: CacheTotals,
    pub per_slot: BTreeMap<String, SlotTotals>,
    /// Keyed by the records' `backend` ("local" or the upstream's URL):
    /// requests of models with more than one backend, or served by an
    /// upstream.
    pub per_backend: BTreeMap<String, BackendTotals>,
    pub reorder: ReorderTotals,
    /// RFC 3339 time the totals count from (the daemon's start).
    pub since: String,
    /// Percentiles cover at most this many recent requests.
    pub window: usize,
    pub log_write_failures: u64,
    /// Records dropped because the meter fell too far behind.
    pub records_dropped: u64,
}

pub struct Stats {
    since: String,
    total: u64,
    errors: u64,
    client_errors: u64,
    server_errors: u64,
    retried: u64,
    recent: VecDeque<(f64, Option<f64>)>,
    with_data: u64,
    ratio_sum: f64,
    /// Records with a ratio (a prompt of at least one token).
    ratios: u64,
    reused: u64,
    prompt: u64,
    per_slot: BTreeMap<usize, (u64, u64, u64)>,
    /// Backends come from the configuration, so this stays small.
    per_backend: BTreeMap<String, BackendTally>,
    reorder: ReorderTotals,
}

#[derive(Default)]
struct BackendTally {
    queries: u64,
    errors: u64,
    reused: u64,
    prompt: u64,
    /// The most recent TTFTs, at most [`WINDOW`].
    ttft_ms: VecDeque<f64>,
}

/// Whether a record counts in `errors`: the one rule for the totals and
/// each backend's, so the two add up. The gateway gives every failed
/// status an `error`; the status is checked too so that a record without
/// one still counts.
fn is_error(record: &QueryRecord) -> bool {
    record.error.is_some() || record.status_code >= 400
}

/// Percent `part` is of `whole`, 0 for nothing.
fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        round2(100.0 * part as f64 / whole as f64)
    }
}

/// (client error, server error) for an HTTP status: 4xx (499 included) is
/// the client's, 5xx the server's.
pub fn error_class(status_code: u16) -> (bool, bool) {
    ((400..500).contains(&status_code), status_code >= 500)
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            since: rfc3339_utc(std::time::SystemTime::now()),
            total: 0,
            errors: 0,
            client_errors: 0,
            server_errors: 0,
            retried: 0,
            recent: VecDeque::with_capacity(WINDOW),
            with_data: 0,
            ratio_sum: 0.0,
            ratios: 0,
            reused: 0,
            prompt: 0,
            per_slot: BTreeMap::new(),
            per_backend: BTreeMap::new(),
            reorder: ReorderTotals::default(),
        }
    }

    pub fn add(&mut self, record: &QueryRecord) {
        self.total += 1;
        self.errors += u64::from(is_error(record));
        let (client, server) = error_class(record.status_code);
        self.client_errors += u64::from(client);
        self.server_errors += u64::from(server);
        self.retried += u64::from(record.retried);
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back((record.latency_ms, record.ttft_ms));
        if let Some(reuse) = &record.cache_reuse {
            self.with_data += 1;
            if let Some(ratio) = reuse.reuse_ratio_pct {
                self.ratio_sum += ratio;
                self.ratios += 1;
            }
            self.reused += reuse.reused_tokens;
            self.prompt += reuse.total_prompt_tokens;
        }
        if let Some(info) = &record.reorder {
            let r = &mut self.reorder;
            r.requests += 1;
            r.documents += info.documents as u64;
            r.moved += info.moved as u64;
            r.deduped += info.deduped as u64;
            if let Some(reuse) = &record.cache_reuse {
                let predicted = u64::from(info.predicted_reused_tokens);
                r.predicted_reused_tokens += predicted;
                r.actual_reused_tokens += reuse.reused_tokens;
                r.mispredicted += u64::from(reuse.reused_tokens * 2 < predicted);
            }
        }
        if let Some(slot) = record.slot_id {
            let entry = self.per_slot.entry(slot).or_default();
            entry.0 += 1;
            if let Some(reuse) = &record.cache_reuse {
                entry.1 += reuse.reused_tokens;
                entry.2 += reuse.total_prompt_tokens;
            }
        }
        if let Some(backend) = &record.backend {
            let tally = self.per_backend.entry(backend.clone()).or_default();
            tally.queries += 1;
            tally.errors += u64::from(is_error(record));
            if let Some(reuse) = &record.cache_reuse {
                tally.reused += reuse.reused_tokens;
                tally.prompt += reuse.total_prompt_tokens;
            }
            if let Some(ttft) = record.ttft_ms {
                if tally.ttft_ms.len() == WINDOW {
                    tally.ttft_ms.pop_front();
                }
                tally.ttft_ms.push_back(ttft);
            }
        }
    }

    pub fn snapshot(&self, log_write_failures: u64, records_dropped: u64) -> StatsSnapshot {
        StatsSnapshot {
            total_queries: self.total,
            errors: self.errors,
            client_errors: self.client_errors,
            server_errors: self.server_errors,
            retried: self.retried,
            latency_ms: Distribution::of(self.recent.iter().map(|(l, _)| *l)),
            ttft_ms: Distribution::of(self.recent.iter().filter_map(|(_, t)| *t)),
            cache_reuse: CacheTotals {
                queries_with_data: self.with_data,
                avg_reuse_ratio_pct: if self.ratios == 0 {
                    0.0
                } else {
                    round2(self.ratio_sum / self.ratios as f64)
                },
                token_weighted_reuse_pct: pct(self.reused, self.prompt),
                reused_tokens_total: self.reused,
                prompt_tokens_total: self.prompt,
            },
            per_slot: self
                .per_slot
                .iter()
                .map(|(slot, (queries, reused, prompt))| {
                    (
                        slot.to_string(),
                        SlotTotals {
                            queries: *queries,
                            reused_tokens: *reused,
                            prompt_tokens: *prompt,
                            reuse_pct: pct(*reused, *prompt),
                        },
                    )
                })
                .collect(),
            per_backend: self
                .per_backend
                .iter()
                .map(|(backend, tally)| {
                    (
                        backend.clone(),
                        BackendTotals {
                            queries: tally.queries,
                            errors: tally.errors,
                            reused_tokens: tally.reused,
                            prompt_tokens: tally.prompt,
                            reuse_pct: pct(tally.reused, tally.prompt),
                            ttft_ms: Distribution::of(tally.ttft_ms.iter().copied()),
                        },
                    )
                })
                .collect(),
            reorder: self.reorder.clone(),
            since: self.since.clone(),
            window: WINDOW,
            log_write_failures,
            records_dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::routed_record;
    use super::*;

    const UPSTREAM: &str = "http://10.0.0.2:8080";

    #[test]
    fn totals_per_backend_leave_out_requests_of_single_backend_models() {
        let mut stats = Stats::new();
        stats.add(&routed_record(Some("local"), 30, 40, Some(100.0)));
        stats.add(&routed_record(Some("local"), 10, 40, Some(300.0)));
        stats.add(&routed_record(Some(UPSTREAM), 3, 4, Some(50.0)));
        let mut failed = routed_record(Some(UPSTREAM), 0, 0, None);
        failed.status_code = 502;
        failed.error = Some("the upstream answered 502".into());
        stats.add(&failed);
        // A failed status without a message is an error all the same.
        let mut refused = routed_record(Some("local"), 0, 0, None);
        refused.status_code = 429;
        stats.add(&refused);
        stats.add(&routed_record(None, 100, 100, Some(10.0)));
        let snapshot = stats.snapshot(0, 0);
        assert_eq!(snapshot.total_queries, 6);
        let backends: Vec<&str> = snapshot.per_backend.keys().map(String::as_str).collect();
        assert_eq!(backends, ["http://10.0.0.2:8080", "local"]);
        let local = &snapshot.per_backend["local"];
        assert_eq!(
            (
                local.queries,
                local.errors,
                local.reused_tokens,
                local.prompt_tokens
            ),
            (3, 1, 40, 80)
        );
        assert_eq!(local.reuse_pct, 50.0);
        let local_ttft = local.ttft_ms.as_ref().expect("local has TTFTs");
        assert_eq!((local_ttft.p50, local_ttft.max), (100.0, 300.0));
        let upstream = &snapshot.per_backend[UPSTREAM];
        assert_eq!(
            (
                upstream.queries,
                upstream.errors,
                upstream.reused_tokens,
                upstream.prompt_tokens
            ),
            (2, 1, 3, 4)
        );
        assert_eq!(upstream.reuse_pct, 75.0);
        assert_eq!(upstream.ttft_ms.as_ref().map(|d| d.p50), Some(50.0));
        // The one unrouted request succeeded: the backends' errors are all.
        assert_eq!(snapshot.errors, 2);
        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(json["per_backend"]["local"]["queries"], 3, "{json}");
    }

    #[test]
    fn nothing_routed_leaves_per_backend_empty() {
        let mut stats = Stats::new();
        stats.add(&routed_record(None, 1, 2, Some(10.0)));
        assert!(stats.snapshot(0, 0).per_backend.is_empty());
    }

    #[test]
    fn a_backends_ttft_covers_its_last_window_requests() {
        let mut stats = Stats::new();
        stats.add(&routed_record(Some("local"), 0, 0, Some(1e6)));
        for _ in 0..WINDOW {
            stats.add(&routed_record(Some("local"), 0, 0, Some(20.0)));
        }
        // Requests without a TTFT do not push one out.
        stats.add(&routed_record(Some("local"), 0, 0, None));
        let local = &stats.snapshot(0, 0).per_backend["local"];
        assert_eq!(local.queries, WINDOW as u64 + 2);
        assert_eq!(local.ttft_ms.as_ref().map(|d| d.max), Some(20.0));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let d = Distribution::of((1..=100).map(f64::from)).unwrap();
        assert_eq!(
            (d.p50, d.p95, d.p99, d.min, d.max, d.avg),
            (50.0, 95.0, 99.0, 1.0, 100.0, 50.5)
        );
        let one = Distribution::of([7.0].into_iter()).unwrap();
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert!(Distribution::of(std::iter::empty()).is_none());
        assert!(Distribution::of([f64::NAN].into_iter()).is_none());
    }

    #[test]
    fn errors_are_the_clients_or_the_servers() {
        assert_eq!(error_class(200), (false, false));
        assert_eq!(error_class(400), (true, false));
        assert_eq!(error_class(429), (true, false));
        assert_eq!(error_class(499), (true, false));
        assert_eq!(error_class(500), (false, true));
        assert_eq!(error_class(503), (false, true));
    }
}
