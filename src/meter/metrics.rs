//! The Prometheus registry behind `GET /metrics` (OpenMetrics text format,
//! encoded by the `prometheus-client` crate).

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{Gauges, QueryRecord};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    status: String,
}

/// "local" or the upstream's URL, as in the record's `backend`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    backend_requests: Family<BackendLabels, Counter>,
    backend_prompt_tokens: Family<BackendLabels, Counter>,
    backend_cached_tokens: Family<BackendLabels, Counter>,
    backend_ttft: Family<BackendLabels, Histogram>,
    prompt_tokens: Counter,
    cached_tokens: Counter,
    generated_tokens: Counter,
    restarts: Counter,
    restarts_seen: u64,
    ttft: Histogram,
    duration: Histogram,
    child_up: Gauge,
    slots_busy: Gauge,
    queue_depth: Gauge,
}

/// Seconds: 10 ms to about 2 minutes.
fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("contextpilotd");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by endpoint and HTTP status",
            requests.clone(),
        );
        let backend_requests = Family::<BackendLabels, Counter>::default();
        registry.register(
            "backend_requests",
            "Requests by the backend that answered (models with upstreams)",
            backend_requests.clone(),
        );
        let backend_prompt_tokens = Family::<BackendLabels, Counter>::default();
        registry.register(
            "backend_prompt_tokens",
            "Prompt tokens, cached or computed, by backend",
            backend_prompt_tokens.clone(),
        );
        let backend_cached_tokens = Family::<BackendLabels, Counter>::default();
        registry.register(
            "backend_prompt_tokens_cached",
            "Prompt tokens the backend served from its KV cache",
            backend_cached_tokens.clone(),
        );
        let backend_ttft = Family::<BackendLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "backend_ttft_seconds",
            "Time to first token, by backend",
            backend_ttft.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens, cached or computed",
            prompt_tokens.clone(),
        );
        let cached_tokens = Counter::default();
        registry.register(
            "prompt_tokens_cached",
            "Prompt tokens llama.cpp served from its KV cache",
            cached_tokens.clone(),
        );
        let generated_tokens = Counter::default();
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        let restarts = Counter::default();
        registry.register(
            "child_restarts",
            "Restarts of llama-server",
            restarts.clone(),
        );
        let ttft = Histogram::new(latency_buckets());
        registry.register("ttft_seconds", "Time to first token", ttft.clone());
        let duration = Histogram::new(latency_buckets());
        registry.register(
            "request_duration_seconds",
            "Request duration",
            duration.clone(),
        );
        let child_up = Gauge::default();
        registry.register("child_up", "1 when llama-server is ready", child_up.clone());
        let slots_busy = Gauge::default();
        registry.register("slots_busy", "Slots serving a request", slots_busy.clone());
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests waiting for a slot",
            queue_depth.clone(),
        );
        Metrics {
            registry,
            requests,
            backend_requests,
            backend_prompt_tokens,
            backend_cached_tokens,
            backend_ttft,
            prompt_tokens,
            cached_tokens,
            generated_tokens,
            restarts,
            restarts_seen: 0,
            ttft,
            duration,
            child_up,
            slots_busy,
            queue_depth,
        }
    }

    pub fn observe(&mut self, record: &QueryRecord) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: record.path.clone(),
                status: record.status_code.to_string(),
            })
            .inc();
        if let Some(reuse) = &record.cache_reuse {
            self.prompt_tokens.inc_by(reuse.total_prompt_tokens);
            self.cached_tokens.inc_by(reuse.reused_tokens);
        }
        if let Some(n) = record.completion_tokens {
            self.generated_tokens.inc_by(n);
        }
        if let Some(ttft) = record.ttft_ms {
            self.ttft.observe(ttft / 1000.0);
        }
        self.duration.observe(record.latency_ms / 1000.0);
        if let Some(backend) = &record.backend {
            self.observe_backend(backend, record);
        }
    }

    fn observe_backend(&mut self, backend: &str, record: &QueryRecord) {
        let labels = BackendLabels {
            backend: backend.to_string(),
        };
        self.backend_requests.get_or_create(&labels).inc();
        if let Some(reuse) = &record.cache_reuse {
            self.backend_prompt_tokens
                .get_or_create(&labels)
                .inc_by(reuse.total_prompt_tokens);
            self.backend_cached_tokens
                .get_or_create(&labels)
                .inc_by(reuse.reused_tokens);
        }
        if let Some(ttft) = record.ttft_ms {
            self.backend_ttft
                .get_or_create(&labels)
                .observe(ttft / 1000.0);
        }
    }

    pub fn encode(&mut self, gauges: Gauges) -> String {
        let restarts = u64::from(gauges.child_restarts);
        if restarts > self.restarts_seen {
            self.restarts.inc_by(restarts - self.restarts_seen);
            self.restarts_seen = restarts;
        }
        self.child_up.set(i64::from(gauges.child_up));
        self.slots_busy.set(gauges.slots_busy as i64);
        self.queue_depth.set(gauges.queue_depth as i64);
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::routed_record;
    use super::*;

    #[test]
    fn backend_families_count_only_routed_requests() {
        let mut metrics = Metrics::new();
        metrics.observe(&routed_record(Some("local"), 30, 40, Some(100.0)));
        metrics.observe(&routed_record(Some("local"), 10, 40, Some(300.0)));
        metrics.observe(&routed_record(
            Some("http://10.0.0.2:8080"),
            3,
            4,
            Some(50.0),
        ));
        metrics.observe(&routed_record(None, 100, 100, Some(10.0)));
        let text = metrics.encode(Gauges::default());
        for line in [
            r#"contextpilotd_backend_requests_total{backend="local"} 2"#,
            r#"contextpilotd_backend_requests_total{backend="http://10.0.0.2:8080"} 1"#,
            r#"contextpilotd_backend_prompt_tokens_total{backend="local"} 80"#,
            r#"contextpilotd_backend_prompt_tokens_cached_total{backend="local"} 40"#,
            r#"contextpilotd_backend_ttft_seconds_count{backend="local"} 2"#,
            r#"contextpilotd_backend_ttft_seconds_bucket{le="0.1",backend="local"} 1"#,
            // The unrouted request counts in the totals only.
            "contextpilotd_prompt_tokens_total 184",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
        let backend_request_lines = text
            .lines()
            .filter(|l| l.starts_with("contextpilotd_backend_requests_total{"))
            .count();
        assert_eq!(backend_request_lines, 2, "{text}");
    }
}
