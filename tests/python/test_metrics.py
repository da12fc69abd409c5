"""/metrics and /stats agree with each other and with the query log. This
module has its own daemon that sees only the requests made here."""

from __future__ import annotations

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from e2e import MODEL_ALIAS, is_number, long_system_prompt, wait_until

REQUESTS = 4


@pytest.fixture(scope="module")
def traffic(daemon):
    """A few successful requests (two sharing a prefix, one streamed, one
    completion), finished and logged before any test reads a number."""
    client = daemon.client(max_retries=0)
    system = long_system_prompt()
    for question in ("Where is the red ledger?", "Which shelf holds the blue kettle?"):
        client.chat.completions.create(
            model=MODEL_ALIAS,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=8,
            temperature=0,
        )
    list(
        client.chat.completions.create(
            model=MODEL_ALIAS,
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    client.completions.create(model=MODEL_ALIAS, prompt="Once upon a time", max_tokens=8)
    daemon.wait_query_log(REQUESTS)
    return daemon


def stats_settled(daemon) -> dict:
    """/stats once its total_queries matches the query log (both are
    written as a request ends)."""

    def settled():
        r = daemon.get("/stats")
        assert r.status_code == 200, f"GET /stats: HTTP {r.status_code}: {r.text[:500]}"
        stats = r.json()
        return stats if stats.get("total_queries") == len(daemon.query_log_lines()) else None

    return wait_until(10, "/stats total_queries == number of query_log lines", settled, interval_s=0.1)


def test_metrics_parse_and_count_requests(traffic):
    d = traffic
    stats = stats_settled(d)
    r = d.get("/metrics")
    assert r.status_code == 200, f"GET /metrics: HTTP {r.status_code}: {r.text[:500]}"
    families = list(text_string_to_metric_families(r.text))
    assert families, "no metric families on /metrics"
    if r.headers.get("content-type", "").startswith("application/openmetrics-text"):
        # The Prometheus text parser reads OpenMetrics without error but does
        # not know its counter naming (`# TYPE x counter` with samples
        # `x_total`): it leaves family x empty and puts each x_total sample in
        # an "unknown" family of its own. Count with the OpenMetrics parser,
        # which also checks the exposition strictly.
        families = list(openmetrics_families(r.text))

    counters = [f for f in families if f.type == "counter" and "requests" in f.name]
    assert counters, f"no counter family with 'requests' in its name: {[(f.name, f.type) for f in families]}"
    # Prefer a family named ..._requests (samples ..._requests_total) over
    # e.g. ..._requests_rejected.
    preferred = [f for f in counters if f.name.endswith("requests")] or counters
    assert len(preferred) == 1, f"which counter counts requests? {[f.name for f in preferred]}"
    family = preferred[0]
    total = sum(s.value for s in family.samples if s.name in (family.name, family.name + "_total"))
    assert total == stats["total_queries"], (
        f"{family.name} totals {total} over {family.samples!r}, /stats total_queries is {stats['total_queries']}"
    )
    assert total >= REQUESTS


def test_stats_match_query_log(traffic):
    d = traffic
    stats = stats_settled(d)
    lines = d.query_log_lines()
    assert stats["total_queries"] == len(lines) >= REQUESTS

    for key in ("latency_ms", "ttft_ms"):
        summary = stats.get(key)
        assert isinstance(summary, dict), f"stats.{key}: {summary!r}"
        for field in ("avg", "p50", "p95", "p99", "min", "max"):
            assert is_number(summary.get(field)), f"stats.{key}.{field}: {summary!r}"
        ordered = [summary[f] for f in ("min", "p50", "p95", "p99", "max")]
        assert all(a <= b + 0.5 for a, b in zip(ordered, ordered[1:])), f"stats.{key} out of order: {summary!r}"
        assert summary["min"] - 0.5 <= summary["avg"] <= summary["max"] + 0.5, f"stats.{key}: {summary!r}"

    reuse = stats.get("cache_reuse")
    assert isinstance(reuse, dict), f"stats.cache_reuse: {reuse!r}"
    for field in (
        "queries_with_data",
        "avg_reuse_ratio_pct",
        "token_weighted_reuse_pct",
        "reused_tokens_total",
        "prompt_tokens_total",
    ):
        assert is_number(reuse.get(field)), f"stats.cache_reuse.{field}: {reuse!r}"
    assert "per_slot" in stats and isinstance(stats["per_slot"], (dict, list)), f"stats.per_slot: {stats!r}"
    assert isinstance(stats.get("since"), str) and stats["since"], f"stats.since: {stats!r}"

    with_data = [
        l["cache_reuse"]
        for l in lines
        if isinstance(l.get("cache_reuse"), dict)
        and is_number(l["cache_reuse"].get("reused_tokens"))
        and is_number(l["cache_reuse"].get("total_prompt_tokens"))
    ]
    reused = sum(c["reused_tokens"] for c in with_data)
    prompt = sum(c["total_prompt_tokens"] for c in with_data)
    assert reuse["reused_tokens_total"] == reused, f"reused_tokens_total {reuse!r} vs query log sum {reused}"
    assert reuse["prompt_tokens_total"] == prompt, f"prompt_tokens_total {reuse!r} vs query log sum {prompt}"
    assert reuse["queries_with_data"] == len(with_data), f"queries_with_data {reuse!r} vs {len(with_data)} lines"
    assert reused > 0, "the two requests sharing a system prompt reused nothing"
    assert abs(reuse["token_weighted_reuse_pct"] - 100.0 * reused / prompt) <= 0.5, reuse
    ratios = [c["reuse_ratio_pct"] for c in with_data if is_number(c.get("reuse_ratio_pct"))]
    assert abs(reuse["avg_reuse_ratio_pct"] - sum(ratios) / len(ratios)) <= 0.5, (reuse, ratios)
