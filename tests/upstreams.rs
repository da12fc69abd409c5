//! Routing over backends: the supervised child and two plain llama-servers
//! configured as `[[upstream]]` (one as `llama-server`, one addressed only
//! through its OpenAI routes as `openai`), all real, on loopback.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{http_get, http_post_json, real_parts, wait_for, Daemon, PlainServer, RealParts};
use serde_json::{json, Value};

/// Every backend is up once the probes say so.
fn wait_for_three_ready_backends(daemon: &Daemon) {
    wait_for(Duration::from_secs(120), "three ready backends", || {
        let (status, body) = http_get(daemon.listen, "/models/loaded").ok()?;
        let loaded: Value = serde_json::from_str(&body).ok()?;
        let ready = loaded["models"]
            .as_array()?
            .iter()
            .filter(|m| m["state"] == "ready")
            .count();
        (status == 200 && ready == 3).then_some(())
    });
}

fn documents(topic: &str) -> Vec<Value> {
    (0..3)
        .map(|i| {
            json!({
                "id": format!("{topic}-{i}"),
                "text": format!("{topic} note {i}: ").repeat(12),
            })
        })
        .collect()
}

/// What one run of the workload saw: requests per backend, and prompt
/// tokens from cache of all prompt tokens.
struct Run {
    by_backend: BTreeMap<String, usize>,
    reused: u64,
    total: u64,
    openai_metered: bool,
    /// `/stats` `per_backend`: queries per backend.
    stats_by_backend: BTreeMap<String, usize>,
    /// The `/metrics` text once every request was metered.
    metrics: String,
}

/// llama-server's host-RAM prompt cache, on every backend alike.
#[derive(Clone, Copy, PartialEq)]
enum RamCache {
    /// llama-server's default.
    On,
    /// `--cache-ram 0`: only what a slot holds is reused.
    Off,
}

fn run(parts: &RealParts, policy: &str, ram_cache: RamCache) -> Run {
    let args: &[&str] = match ram_cache {
        RamCache::On => &[],
        RamCache::Off => &["--cache-ram", "0"],
    };
    let first = PlainServer::start_with(parts, args);
    let second = PlainServer::start_with(parts, args);
    let extra = format!(
        "[routing]\npolicy = \"{policy}\"\n\n\
         [[upstream]]\nurl = \"http://127.0.0.1:{}\"\nkind = \"llama-server\"\n\n\
         [[upstream]]\nurl = \"http://127.0.0.1:{}/v1\"\nkind = \"openai\"\n",
        first.port, second.port
    );
    let child_args = match ram_cache {
        RamCache::On => String::new(),
        RamCache::Off => "extra_args = [\"--cache-ram\", \"0\"]\n".to_string(),
    };
    let mut daemon = Daemon::start_with(
        |listen| {
            common::test_config(parts, listen, &extra).replacen(
                "threads = 1\n",
                &format!("threads = 1\n{child_args}"),
                1,
            )
        },
        &[],
    );
    daemon.wait_ready();
    wait_for_three_ready_backends(&daemon);
    // Three topics, each with its own documents, asked about in sessions
    // of two requests in a row (a user's question and its follow-up).
    let topics = ["harbour", "glacier", "orchard"];
    let order = [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2];
    for (round, &t) in order.iter().enumerate() {
        {
            let topic = topics[t];
            let body = json!({
                "messages": [{"role": "user", "content": format!("Summarise the {topic} notes ({round}).")}],
                "documents": documents(topic),
                "max_tokens": 4,
                "temperature": 0,
            });
            let (status, answer) =
                http_post_json(daemon.listen, "/v1/chat/completions", &body).unwrap();
            assert_eq!(status, 200, "{answer}");
        }
    }
    // The meter takes a record after its answer went out; once `/stats`
    // counts all twelve, everything else the meter answers does too.
    let stats = wait_for(Duration::from_secs(10), "/stats to count 12", || {
        let (status, body) = http_get(daemon.listen, "/stats").ok()?;
        let stats: Value = serde_json::from_str(&body).ok()?;
        (status == 200 && stats["total_queries"] == 12).then_some(stats)
    });
    let stats_by_backend = stats["per_backend"]
        .as_object()
        .unwrap_or_else(|| panic!("no per_backend in {stats}"))
        .iter()
        .map(|(backend, totals)| {
            let queries = totals["queries"].as_u64().unwrap_or(0) as usize;
            (backend.clone(), queries)
        })
        .collect();
    let (status, metrics) = http_get(daemon.listen, "/metrics").unwrap();
    assert_eq!(status, 200, "{metrics}");
    let (_, recent) = http_get(daemon.listen, "/requests/recent?limit=100").unwrap();
    let recent: Value = serde_json::from_str(&recent).unwrap();
    let records = recent["requests"].as_array().unwrap();
    assert_eq!(records.len(), 12, "{recent}");
    let openai = format!("http://127.0.0.1:{}/v1", second.port);
    let mut result = Run {
        by_backend: Default::default(),
        reused: 0,
        total: 0,
        openai_metered: false,
        stats_by_backend,
        metrics,
    };
    for record in records {
        let backend = record["backend"].as_str().unwrap_or("none").to_string();
        *result.by_backend.entry(backend.clone()).or_default() += 1;
        let reuse = &record["cache_reuse"];
        result.reused += reuse["reused_tokens"].as_u64().unwrap_or(0);
        result.total += reuse["total_prompt_tokens"].as_u64().unwrap_or(0);
        if backend == openai && reuse["total_prompt_tokens"].as_u64().is_some() {
            result.openai_metered = true;
        }
    }
    result
}

/// Cache-aware routing keeps each topic where its documents are and so
/// serves more prompt tokens from cache than round robin over the same
/// backends, without sending more than half the requests to one, and an
/// `openai` backend is metered from its `cached_tokens`.
#[test]
fn cache_aware_routing_reuses_more_than_round_robin_over_three_backends() {
    let parts = real_parts();
    let aware = run(&parts, "cache-aware", RamCache::On);
    let robin = run(&parts, "round-robin", RamCache::On);
    println!(
        "cache-aware: {}/{} tokens from cache, {:?}; round-robin: {}/{}, {:?}",
        aware.reused, aware.total, aware.by_backend, robin.reused, robin.total, robin.by_backend
    );
    assert_eq!(aware.by_backend.len(), 3, "{:?}", aware.by_backend);
    for (backend, count) in &aware.by_backend {
        assert!(
            *count <= 6,
            "{backend} took {count} of 12: {:?}",
            aware.by_backend
        );
    }
    // Round robin gets part of the way through llama-server's own RAM
    // cache (a backend restores a prompt it saved); routing by what each
    // backend holds finds the slot itself: all but each topic's first.
    assert!(
        aware.reused > robin.reused,
        "cache-aware {} vs round robin {}",
        aware.reused,
        robin.reused
    );
    // The openai-kind backend's answers are metered.
    assert!(aware.openai_metered && robin.openai_metered);
    // `/stats` and `/metrics` count each backend's requests as the records
    // name them.
    for run in [&aware, &robin] {
        assert_eq!(run.stats_by_backend, run.by_backend);
        let local = run.by_backend.get("local").copied().unwrap_or(0);
        let line = format!("contextpilotd_backend_requests_total{{backend=\"local\"}} {local}");
        assert!(
            run.metrics.lines().any(|l| l == line),
            "no line {line:?} in:\n{}",
            run.metrics
        );
    }
}

/// A backend killed mid-run loses no request: one routed there fails over
/// to another backend before anything reached the client, and routing
/// leaves the dead one out afterwards.
#[test]
fn a_killed_backend_loses_no_request() {
    let parts = real_parts();
    let mut first = PlainServer::start(&parts);
    let second = PlainServer::start(&parts);
    let extra = format!(
        "[[upstream]]\nurl = \"http://127.0.0.1:{}\"\nkind = \"llama-server\"\n\n\
         [[upstream]]\nurl = \"http://127.0.0.1:{}\"\nkind = \"llama-server\"\n",
        first.port, second.port
    );
    let mut daemon = Daemon::start(&parts, &extra);
    daemon.wait_ready();
    wait_for_three_ready_backends(&daemon);
    let ask = |topic: &str, round: usize| {
        let body = json!({
            "messages": [{"role": "user", "content": format!("Summarise the {topic} notes ({round}).")}],
            "documents": documents(topic),
            "max_tokens": 4,
            "temperature": 0,
        });
        http_post_json(daemon.listen, "/v1/chat/completions", &body).unwrap()
    };
    let topics = ["harbour", "glacier", "orchard"];
    for (round, topic) in topics.iter().enumerate() {
        let (status, answer) = ask(topic, round);
        assert_eq!(status, 200, "{answer}");
    }
    let dead = format!("http://127.0.0.1:{}", first.port);
    let _ = first.process.kill();
    let _ = first.process.wait();
    // Every topic again, the dead backend's among them: each is answered
    // (the probe may not have noticed yet; the request fails over).
    for (round, topic) in topics.iter().cycle().take(6).enumerate() {
        let (status, answer) = ask(topic, round + 3);
        assert_eq!(status, 200, "request {round} after the kill: {answer}");
    }
    let (_, recent) = http_get(daemon.listen, "/requests/recent?limit=100").unwrap();
    let recent: Value = serde_json::from_str(&recent).unwrap();
    let records = recent["requests"].as_array().unwrap();
    assert_eq!(records.len(), 9, "{recent}");
    let before: Vec<&str> = records[..3]
        .iter()
        .filter_map(|r| r["backend"].as_str())
        .collect();
    assert!(
        before.contains(&dead.as_str()),
        "the killed backend served nothing before the kill: {before:?}"
    );
    // Records are oldest first: the six after the kill.
    for record in &records[3..] {
        assert_eq!(record["status_code"], 200, "{record}");
        assert_ne!(record["backend"].as_str(), Some(dead.as_str()), "{record}");
    }
}

/// Without llama-server's RAM cache on any backend (as the daemon plans its
/// child where that cache was measured to cost more than it saves), only
/// what a slot holds is reused: round robin, which moves every topic to a
/// backend that last served another one, gets the shared prefix alone, and
/// cache-aware routing serves at least twice as many prompt tokens from
/// cache.
#[test]
fn without_the_ram_cache_cache_aware_routing_serves_twice_the_cached_tokens() {
    let parts = real_parts();
    let aware = run(&parts, "cache-aware", RamCache::Off);
    let robin = run(&parts, "round-robin", RamCache::Off);
    println!(
        "cache-aware: {}/{} tokens from cache, {:?}; round-robin: {}/{}, {:?}",
        aware.reused, aware.total, aware.by_backend, robin.reused, robin.total, robin.by_backend
    );
    for (backend, count) in &aware.by_backend {
        assert!(
            *count <= 6,
            "{backend} took {count} of 12: {:?}",
            aware.by_backend
        );
    }
    assert!(
        aware.reused >= 2 * robin.reused,
        "cache-aware {} vs round robin {}",
        aware.reused,
        robin.reused
    );
}

/// An upstream llama-server whose slots the configuration does not give
/// is modelled with the slots its `/props` reports (it joins once it
/// answers), not one: requests would queue in the daemon for one slot
/// while the others idle.
#[test]
fn an_upstreams_slots_come_from_its_props() {
    let parts = real_parts();
    let plain = PlainServer::start_with(&parts, &["--parallel", "3", "--ctx-size", "1536"]);
    let url = format!("http://127.0.0.1:{}", plain.port);
    let extra = format!("[[upstream]]\nurl = \"{url}\"\nkind = \"llama-server\"\n");
    let mut daemon = Daemon::start(&parts, &extra);
    daemon.wait_ready();
    let upstream = common::wait_for_ready_backend(daemon.listen, &url);
    assert_eq!(upstream["slots"], 3, "{upstream}");
}

/// A backend killed while requests are in flight on it loses none of them:
/// an answer that had not begun to reach its client (a whole, unstreamed
/// one) is asked again on another backend.
#[test]
fn a_backend_killed_mid_request_loses_no_unstreamed_request() {
    let parts = real_parts();
    let mut first = PlainServer::start(&parts);
    let second = PlainServer::start(&parts);
    let dead = format!("http://127.0.0.1:{}", first.port);
    let extra = format!(
        "[routing]\npolicy = \"round-robin\"\n\n\
         [[upstream]]\nurl = \"{dead}\"\nkind = \"llama-server\"\n\n\
         [[upstream]]\nurl = \"http://127.0.0.1:{}\"\nkind = \"llama-server\"\n",
        second.port
    );
    let mut daemon = Daemon::start(&parts, &extra);
    daemon.wait_ready();
    wait_for_three_ready_backends(&daemon);
    let listen = daemon.listen;
    // Six requests at once, long enough answers that the kill finds one
    // of them on the doomed backend.
    let requests: Vec<_> = (0..6)
        .map(|i| {
            std::thread::spawn(move || {
                let body = json!({
                    "messages": [{"role": "user", "content": format!("Write a long story about ship {i}.")}],
                    "max_tokens": 96,
                    // The whole 96 tokens: an early end of turn could
                    // finish the request before the kill.
                    "ignore_eos": true,
                    "temperature": 0,
                });
                http_post_json(listen, "/v1/chat/completions", &body).unwrap()
            })
        })
        .collect();
    wait_for(
        Duration::from_secs(60),
        "a request in flight on the backend to kill",
        || {
            let (_, body) = http_get(listen, "/models/loaded").ok()?;
            let loaded: Value = serde_json::from_str(&body).ok()?;
            loaded["models"]
                .as_array()?
                .iter()
                .any(|m| m["backend"] == dead.as_str() && m["busy"].as_u64() > Some(0))
                .then_some(())
        },
    );
    let _ = first.process.kill();
    let _ = first.process.wait();
    for (i, request) in requests.into_iter().enumerate() {
        let (status, answer) = request.join().unwrap();
        assert_eq!(status, 200, "request {i}: {answer}");
        assert!(
            answer["choices"][0]["message"]["content"].is_string(),
            "{answer}"
        );
    }
    let records = wait_for(Duration::from_secs(10), "six records", || {
        let (_, body) = http_get(listen, "/requests/recent?limit=100").ok()?;
        let recent: Value = serde_json::from_str(&body).ok()?;
        let records = recent["requests"].as_array()?.clone();
        (records.len() == 6).then_some(records)
    });
    // The one cut off on the dead backend was answered elsewhere.
    assert!(
        records
            .iter()
            .any(|r| r["retried"] == true && r["backend"].as_str() != Some(dead.as_str())),
        "no request failed over: {records:?}"
    );
}
