//! In-process tests of the gateway: the real HTTP server and request path
//! (prepare → dispatch → settle, the slot table, the meter writing its log)
//! in front of a scripted upstream, a loopback HTTP server that answers
//! like llama-server with chosen timings and `cache_n`, dies on demand, and
//! holds a stream open until told. The real llama-server stays the main
//! path in `tests/` and `tests/python`; these pin what it cannot be made
//! to do on demand.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Barrier, Notify};

use super::{serve, Body, ChannelBody, Gateway, Upstream};
use crate::config::{KeepAlive, MeterConfig};
use crate::cost::{CostModel, CostView};
use crate::meter::Meter;
use crate::models::{Engine, Fleet, ModelSpec};
use crate::reorder::prepare::{Reorder, Settings};
use crate::slots::Scheduler;
use crate::status::{HardwareStatus, ModelStatus, PlanStatus, StaticStatus};
use crate::supervisor::{State, SupervisorView};

/// Long enough for any wait that should end; a test that hits it fails.
const DEADLINE: Duration = Duration::from_secs(20);
const CHILD_PID: u32 = 4242;

/// What the scripted child does with the next model request.
enum Reply {
    /// A whole answer with these timings.
    Whole { cache_n: u64, prompt_n: u64 },
    /// A whole answer, once `Barrier` has seen every request it waits for.
    WholeTogether(Arc<Barrier>),
    /// Close the connection without answering, as a child that died.
    Die,
    /// SSE: these events, then (if set) wait to be released, then end,
    /// with `data: [DONE]` when `done`.
    Stream {
        events: Vec<Value>,
        release: Option<Arc<Notify>>,
        done: bool,
    },
}

#[derive(Default)]
struct Script {
    replies: Mutex<VecDeque<Reply>>,
    /// Model request bodies as the child received them.
    received: Mutex<Vec<Value>>,
}

impl Script {
    fn then(&self, reply: Reply) {
        self.replies.lock().unwrap().push_back(reply);
    }

    fn received(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }
}

fn whole(cache_n: u64, prompt_n: u64) -> Response<Body> {
    let body = json!({
        "model": "/models/scripted.gguf",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": cache_n + prompt_n, "completion_tokens": 1},
        "timings": {"cache_n": cache_n, "prompt_n": prompt_n, "prompt_ms": 2.0 * prompt_n as f64,
            "predicted_n": 1, "predicted_ms": 1.0},
    });
    super::json(StatusCode::OK, &body)
}

fn stream(events: Vec<Value>, release: Option<Arc<Notify>>, done: bool) -> Response<Body> {
    let (tx, body) = ChannelBody::new(16);
    tokio::spawn(async move {
        for event in events {
            let _ = tx.send(Bytes::from(format!("data: {event}\n\n"))).await;
        }
        if let Some(release) = release {
            release.notified().await;
        }
        if done {
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        }
    });
    let mut response = Response::new(body.boxed_unsync());
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// Serves the script on a loopback port for as long as the test runs.
async fn scripted_child(script: Arc<Script>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| answer(script.clone(), request));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    port
}

async fn answer(
    script: Arc<Script>,
    request: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    if request.uri().path() == "/health" {
        return Ok(super::json(StatusCode::OK, &json!({"status": "ok"})));
    }
    let bytes = request.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    script.received.lock().unwrap().push(body);
    let reply = script.replies.lock().unwrap().pop_front();
    match reply.unwrap_or(Reply::Whole {
        cache_n: 0,
        prompt_n: 10,
    }) {
        Reply::Whole { cache_n, prompt_n } => Ok(whole(cache_n, prompt_n)),
        Reply::WholeTogether(barrier) => {
            barrier.wait().await;
            Ok(whole(0, 10))
        }
        // A service error makes hyper close the connection unanswered.
        Reply::Die => Err(std::io::Error::other("the scripted child died")),
        Reply::Stream {
            events,
            release,
            done,
        } => Ok(stream(events, release, done)),
    }
}

/// The gateway serving on a loopback port in front of a scripted child.
struct Harness {
    script: Arc<Script>,
    gateway: Arc<Gateway>,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _view: watch::Sender<SupervisorView>,
    _stop: oneshot::Sender<()>,
}

async fn start(slots: usize) -> Harness {
    start_with(slots, false).await
}

async fn start_with(slots: usize, model_fallback: bool) -> Harness {
    let script = Arc::new(Script::default());
    let child_port = scripted_child(script.clone()).await;
    let (view_tx, view) = watch::channel(SupervisorView {
        state: State::Ready,
        pid: Some(CHILD_PID),
        port: Some(child_port),
        restarts: 0,
        last_exit: None,
        started_at: None,
        command: Vec::new(),
        spawned: None,
        key: None,
    });
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("query_log.jsonl");
    let meter = Meter::start(&MeterConfig::default(), Some(log.clone()));
    let cost = CostModel::new(CostView::for_tests().profile.as_ref().clone());
    let scheduler = Scheduler::new(slots, slots, 64, 0, cost);
    let spec = ModelSpec {
        name: "scripted".into(),
        aliases: Vec::new(),
        path: "scripted.gguf".into(),
        keep_alive: KeepAlive::Forever,
        primary: true,
    };
    let idle = Arc::new(Notify::new());
    let engine = Engine::from_parts(
        "scripted",
        &spec.path,
        static_status(slots),
        0,
        view,
        Default::default(),
        scheduler,
        KeepAlive::Forever,
        idle,
    );
    let fallback = model_fallback.then_some("scripted");
    let fleet = Arc::new(Fleet::over(vec![spec], fallback, vec![Arc::new(engine)]));
    let gateway = Arc::new(Gateway {
        started: std::time::Instant::now(),
        fleet,
        primary_status: super::PrimaryStatus::Local(static_status(slots)),
        api_key: None,
        guard: super::guard::Policy {
            allowed_hosts: vec![],
            allowed_origins: vec!["http://localhost:3000".into()],
        },
        meter,
        upstream: Upstream::new(),
        max_body_bytes: 1 << 20,
        queue_timeout: Duration::from_secs(10),
        gpu: None,
        query_log: Some(log.clone()),
        query_prefix: "test".into(),
        reorder: Reorder::new(Settings {
            infer_documents: false,
            dedup: true,
            threshold: Default::default(),
            conversation_max_tokens: 100_000,
        }),
        compat: super::CompatState::new(&Default::default()),
        next_query: Default::default(),
        streams: Default::default(),
        logs: Default::default(),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        gateway.clone(),
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
        Duration::from_secs(5),
    ));
    Harness {
        script,
        gateway,
        port,
        log,
        _dir: dir,
        _view: view_tx,
        _stop: stop,
    }
}

fn static_status(slots: usize) -> StaticStatus {
    StaticStatus {
        listen: "127.0.0.1:0".into(),
        model: ModelStatus {
            path: "scripted.gguf".into(),
            size_bytes: 0,
            architecture: "llama".into(),
            context_length: Some(4096),
        },
        plan: PlanStatus {
            slots: slots as u32,
            concurrency: slots as u32,
            ctx_per_slot: 4096,
            ctx_size: 4096 * slots as u64,
            threads: 1,
            gpu_layers: 0,
            cache_reuse: 0,
        },
        hardware: HardwareStatus {
            chip: "test".into(),
            memory_bytes: 0,
            perf_cores: 1,
            efficiency_cores: 0,
            gpu_cores: None,
        },
        warnings: Vec::new(),
        cost_decisions: Vec::new(),
        ready_timeout_s: 60,
    }
}

impl Harness {
    /// The scripted model's slot table.
    fn scheduler(&self) -> Arc<Scheduler> {
        self.gateway.fleet.primary().unwrap().scheduler.clone()
    }

    /// Sends one request; the response as it comes (headers first).
    async fn send(&self, path: &str, body: &Value) -> Response<Incoming> {
        self.send_with(hyper::Method::POST, path, &[], body).await
    }

    async fn send_with(
        &self,
        method: hyper::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> Response<Incoming> {
        let client = crate::http_client::loopback_client::<Full<Bytes>>();
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{}{path}", self.port))
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Value::Null => Bytes::new(),
            body => Bytes::from(body.to_string()),
        };
        let request = request.body(Full::new(body)).unwrap();
        tokio::time::timeout(DEADLINE, client.request(request))
            .await
            .expect("the gateway answers in time")
            .unwrap()
    }

    /// Sends one request and reads the whole answer.
    async fn post(&self, path: &str, body: &Value) -> (StatusCode, hyper::HeaderMap, String) {
        let (parts, body) = self.send(path, body).await.into_parts();
        let bytes = tokio::time::timeout(DEADLINE, body.collect())
            .await
            .expect("the answer ends in time")
            .unwrap()
            .to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    /// Every record the meter has written so far.
    async fn records(&self) -> Vec<Value> {
        self.gateway.meter.flush().await;
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

/// Starts a stream the child holds open after its first chunk (which has
/// reached the client) until the returned `Notify` releases it.
async fn hold_a_stream(h: &Harness) -> (Arc<Notify>, Incoming) {
    let release = Arc::new(Notify::new());
    h.script.then(Reply::Stream {
        events: vec![json!({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})],
        release: Some(release.clone()),
        done: true,
    });
    let mut body = chat("s", "q");
    body["stream"] = json!(true);
    let mut response = h.send("/v1/chat/completions", &body).await.into_body();
    let first = tokio::time::timeout(DEADLINE, response.frame())
        .await
        .expect("the first chunk arrives")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(first.data_ref().unwrap()).contains("Hi"));
    (release, response)
}

fn chat(system: &str, question: &str) -> Value {
    json!({"messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
    ]})
}

/// A distinct text of about 500 tokens.
fn passage(tag: usize) -> String {
    (0..250)
        .map(|i| format!("w{tag}x{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn slot_of(body: &Value) -> u64 {
    body["id_slot"]
        .as_u64()
        .expect("every forwarded request names its slot")
}

#[tokio::test]
async fn eight_requests_run_at_once_on_eight_slots_and_each_prompt_returns_to_its_slot() {
    let h = Arc::new(start(8).await);
    let together = Arc::new(Barrier::new(8));
    for _ in 0..8 {
        h.script.then(Reply::WholeTogether(together.clone()));
    }
    // The child answers none until all eight are in: they must run at once.
    let mut running = tokio::task::JoinSet::new();
    for i in 0..8 {
        let h = h.clone();
        running.spawn(async move {
            h.post("/v1/chat/completions", &chat(&passage(i), "q"))
                .await
        });
    }
    while let Some(done) = running.join_next().await {
        assert_eq!(done.unwrap().0, StatusCode::OK);
    }
    let first: Vec<Value> = h.script.received();
    let mut slots: Vec<u64> = first.iter().map(slot_of).collect();
    slots.sort();
    assert_eq!(slots, (0..8).collect::<Vec<u64>>(), "one slot each");
    // A later request with the same system prompt goes back to its slot.
    for i in (0..8).rev() {
        let text = passage(i);
        let before = first
            .iter()
            .find(|b| b["messages"][0]["content"] == text.as_str())
            .map(slot_of)
            .unwrap();
        h.post("/v1/chat/completions", &chat(&text, "another question"))
            .await;
        let again = h.script.received().last().map(slot_of).unwrap();
        assert_eq!(again, before, "prompt {i} came back to its slot");
    }
    let records = h.records().await;
    assert_eq!(records.len(), 16);
    assert!(records.iter().all(|r| r["status_code"] == 200));
    assert!(records.iter().all(|r| r["slot_id"].is_u64()));
}

#[tokio::test]
async fn requests_sharing_documents_meet_on_one_slot_with_the_shared_run_first() {
    let h = start(8).await;
    let docs = |ids: &[usize]| -> Value {
        ids.iter()
            .map(|&i| json!({"id": format!("d{i}"), "text": passage(100 + i)}))
            .collect()
    };
    let ask = |ids: &[usize]| {
        let mut body = chat("Be brief.", "Which document names w101x3?");
        body["documents"] = docs(ids);
        body
    };
    assert_eq!(
        h.post("/v1/chat/completions", &ask(&[1, 2, 3, 4])).await.0,
        StatusCode::OK
    );
    assert_eq!(
        h.post("/v1/chat/completions", &ask(&[4, 9, 2, 1])).await.0,
        StatusCode::OK
    );
    let received = h.script.received();
    assert_eq!(slot_of(&received[1]), slot_of(&received[0]));
    let system = received[1]["messages"][0]["content"].as_str().unwrap();
    // The held run (1, 2) leads; the client's first choice is still ranked first.
    let at = |i: usize| system.find(&passage(100 + i)).unwrap();
    assert!(
        at(1) < at(2) && at(2) < at(4) && at(4) < at(9),
        "{system:.200}"
    );
    assert!(system.contains("importance ranking: 3 > "), "{system}");
    assert!(received.iter().all(|b| b.get("documents").is_none()));
    let records = h.records().await;
    assert_eq!(records[1]["reorder"]["slot_choice"], "cached-prefix");
}

#[tokio::test]
async fn a_child_that_dies_before_answering_is_retried_and_three_deaths_are_a_502() {
    let h = start(4).await;
    h.script.then(Reply::Die);
    let (status, _, body) = h.post("/v1/chat/completions", &chat("s", "q")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(h.script.received().len(), 2);
    for _ in 0..3 {
        h.script.then(Reply::Die);
    }
    let (status, headers, body) = h.post("/v1/chat/completions", &chat("s", "q")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers[hyper::header::RETRY_AFTER], "5");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("failed the request on every attempt"));
    assert_eq!(h.script.received().len(), 2 + 3);
    let records = h.records().await;
    assert_eq!(records.len(), 2);
    assert_eq!(
        (&records[0]["status_code"], &records[0]["retried"]),
        (&json!(200), &json!(true))
    );
    assert_eq!(
        (&records[1]["status_code"], &records[1]["retried"]),
        (&json!(502), &json!(true))
    );
}

#[tokio::test]
async fn a_stream_the_child_cuts_ends_with_an_error_event_and_done() {
    let h = start(4).await;
    h.script.then(Reply::Stream {
        events: vec![json!({"choices": [{"index": 0, "delta": {"content": "Hel"}}]})],
        release: None,
        done: false,
    });
    let mut body = chat("s", "q");
    body["stream"] = json!(true);
    let (status, headers, text) = h.post("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[hyper::header::CONTENT_TYPE], "text/event-stream");
    assert!(text.contains("\"Hel\""), "{text}");
    assert!(
        text.contains("llama-server stopped during the response"),
        "{text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let records = h.records().await;
    assert_eq!(records.len(), 1);
    assert!(records[0]["error"]
        .as_str()
        .unwrap()
        .contains("stopped during the response"));
    // The slot is free again and the daemon no longer trusts its contents.
    assert_eq!(h.scheduler().busy(), 0);
}

#[tokio::test]
async fn a_stream_in_flight_is_settled_before_idle_resolves() {
    let h = start(4).await;
    let (release, response) = hold_a_stream(&h).await;
    assert_eq!(h.gateway.streams.in_flight(), 1);
    tokio::select! {
        biased;
        _ = h.gateway.streams.idle() => panic!("idle with a stream still relaying"),
        _ = std::future::ready(()) => {}
    }
    assert!(h.records().await.is_empty(), "recorded before it ended");
    release.notify_one();
    tokio::time::timeout(DEADLINE, h.gateway.streams.idle())
        .await
        .expect("the stream task ends once the child does");
    let records = h.records().await;
    assert_eq!(records.len(), 1);
    assert_eq!(
        (&records[0]["status_code"], &records[0]["stream"]),
        (&json!(200), &json!(true))
    );
    let rest = tokio::time::timeout(DEADLINE, response.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn a_page_on_a_rebinding_domain_or_another_origin_is_refused() {
    let h = start(2).await;
    let get = |headers: &'static [(&'static str, &'static str)]| {
        h.send_with(hyper::Method::GET, "/v1/models", headers, &Value::Null)
    };
    let rebound = get(&[("host", "attacker.example:8765")]).await;
    assert_eq!(rebound.status(), StatusCode::FORBIDDEN);
    let body = rebound.into_body().collect().await.unwrap().to_bytes();
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["type"], "permission_error");
    assert_eq!(
        get(&[("host", "localhost:8765")]).await.status(),
        StatusCode::OK
    );
    // Another origin: a POST is refused before it runs, a GET gets no CORS
    // headers (so the browser keeps the answer from the page).
    let evil = [("origin", "https://evil.example")];
    let post = h
        .send_with(
            hyper::Method::POST,
            "/v1/chat/completions",
            &evil,
            &chat("s", "q"),
        )
        .await;
    assert_eq!(post.status(), StatusCode::FORBIDDEN);
    assert!(h.script.received().is_empty(), "nothing reached the child");
    let read = get(&[("origin", "https://evil.example")]).await;
    assert_eq!(read.status(), StatusCode::OK);
    assert!(!read.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn an_allowed_origin_gets_its_preflight_and_cors_headers() {
    let h = start(2).await;
    let origin = ("origin", "http://localhost:3000");
    let preflight = h
        .send_with(
            hyper::Method::OPTIONS,
            "/v1/chat/completions",
            &[origin, ("access-control-request-method", "POST")],
            &Value::Null,
        )
        .await;
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    let headers = preflight.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert!(headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));
    let post = h
        .send_with(
            hyper::Method::POST,
            "/v1/chat/completions",
            &[origin],
            &chat("s", "q"),
        )
        .await;
    assert_eq!(post.status(), StatusCode::OK);
    assert_eq!(
        post.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
}

#[tokio::test]
async fn head_answers_like_get_without_a_body() {
    let h = start(2).await;
    let head = h
        .send_with(hyper::Method::HEAD, "/v1/models", &[], &Value::Null)
        .await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()[hyper::header::CONTENT_TYPE],
        "application/json"
    );
    let body = head.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty());
}

#[tokio::test]
async fn embeddings_wait_for_a_slot_like_completions() {
    let h = Arc::new(start(1).await);
    let (release, _stream) = hold_a_stream(&h).await;
    assert_eq!(h.scheduler().busy(), 1);
    let embedding = tokio::spawn({
        let h = h.clone();
        async move { h.post("/v1/embeddings", &json!({"input": "hello"})).await }
    });
    // The one slot is taken, so the embedding queues behind the stream.
    let queued = async {
        while h.scheduler().queued() == 0 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(DEADLINE, queued)
        .await
        .expect("the embedding waits for admission");
    assert_eq!(h.script.received().len(), 1, "not sent while it waits");
    release.notify_one();
    let (status, _, _) = tokio::time::timeout(DEADLINE, embedding)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.script.received().len(), 2);
}

#[tokio::test]
async fn a_model_the_daemon_does_not_serve_is_a_404_naming_the_one_it_does() {
    let h = start(2).await;
    let mut body = chat("s", "q");
    body["model"] = json!("llama3.1:70b");
    let (status, _, text) = h.post("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let error: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["code"], "model_not_found");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("\"scripted\""));
    assert!(h.script.received().is_empty(), "nothing reached the child");
    // Its own name (any case) is served, and the answer carries that name
    // instead of llama-server's file path.
    body["model"] = json!("Scripted");
    let (status, _, text) = h.post("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["model"], "Scripted");
    let (status, _, text) = h.post("/v1/chat/completions", &chat("s", "q")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["model"],
        "scripted"
    );
    let one = |id: &'static str| h.send_with(hyper::Method::GET, id, &[], &Value::Null);
    assert_eq!(one("/v1/models/scripted").await.status(), StatusCode::OK);
    assert_eq!(
        one("/v1/models/gpt-4o").await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn with_a_fallback_any_name_is_served() {
    let h = start_with(2, true).await;
    let mut body = chat("s", "q");
    body["model"] = json!("gpt-4o");
    let (status, _, text) = h.post("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["model"],
        "gpt-4o"
    );
}

#[tokio::test]
async fn logs_shows_the_kept_lines_then_follows_until_the_bus_closes() {
    let h = start(1).await;
    let logs = &h.gateway.logs;
    logs.publish("2026-12-02T10:00:00Z  INFO contextpilotd: started", false);
    logs.publish(
        "2026-12-02T10:00:01Z  INFO request: POST /v1/chat/completions status=200",
        true,
    );
    let get = |path: &'static str| h.send_with(hyper::Method::GET, path, &[], &Value::Null);

    let text = |response: Response<Incoming>| async move {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let all = get("/logs").await;
    assert_eq!(all.status(), StatusCode::OK);
    assert_eq!(
        all.headers()[hyper::header::CONTENT_TYPE],
        "text/plain; charset=utf-8"
    );
    assert_eq!(text(all).await.lines().count(), 2);
    let requests = text(get("/logs?requests=1").await).await;
    assert_eq!(
        requests,
        "2026-12-02T10:00:01Z  INFO request: POST /v1/chat/completions status=200\n"
    );
    let bad = get("/logs?follow=maybe").await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert!(text(bad).await.contains("follow=1"));

    let mut live = get("/logs?follow=1&requests=1").await.into_body();
    assert_eq!(
        next_chunk(&mut live).await.unwrap(),
        requests,
        "the kept request line first"
    );
    logs.publish("a daemon line, not for this follower", false);
    logs.publish("INFO request: POST /completion status=499", true);
    assert_eq!(
        next_chunk(&mut live).await.unwrap(),
        "INFO request: POST /completion status=499\n"
    );
    // Shutdown closes the bus: the stream ends, and the connection with it.
    logs.close();
    assert_eq!(next_chunk(&mut live).await, None);
}

/// The next data frame of a streamed body; `None` at its end.
async fn next_chunk(body: &mut Incoming) -> Option<String> {
    let frame = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("a frame in time")?;
    let data = frame.unwrap().into_data().expect("a data frame");
    Some(String::from_utf8_lossy(&data).into_owned())
}
