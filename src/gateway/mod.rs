//! The daemon's HTTP front door on `[server] listen`.
//!
//! Routing, authentication and the daemon's own endpoints live here; the
//! path of a model request is `request` (prepare → dispatch → settle, one
//! file per stage). Every error is an `error::ApiError`, rendered as an
//! OpenAI-shaped JSON body `{"error": {"message", "type", "code"}}`.

mod batch;
mod compat;
mod dashboard;
mod dispatch;
mod error;
pub mod guard;
mod headers;
mod logs;
mod models;
mod prepare;
mod request;
mod settle;
pub mod sse;
mod stream;
#[cfg(test)]
mod tests;
mod upstream;
pub use compat::CompatState;
pub use error::{error, error_body, ApiError};
pub use upstream::Upstream;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::meter::{Gauges, Meter};
use crate::models::{Engine, Fleet};
use crate::supervisor::State;

/// Response bodies: whole (`Full`) or streamed from a channel.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What request handlers can see.
pub struct Gateway {
    pub started: Instant,
    /// The models served by name, and the loaded ones' children and slots.
    pub fleet: Arc<Fleet>,
    /// What `/status` says of the local model, or that there is none.
    pub primary_status: PrimaryStatus,
    pub api_key: Option<String>,
    /// Which hosts and web origins may call (`[server] allowed_hosts`,
    /// `allowed_origins`), applied by the outer layer.
    pub guard: guard::Policy,
    pub meter: Meter,
    pub upstream: Upstream,
    pub max_body_bytes: usize,
    pub queue_timeout: Duration,
    pub gpu: Option<Arc<crate::meter::gpu::GpuSampler>>,
    pub query_log: Option<std::path::PathBuf>,
    /// Query ids are this prefix (unique per daemon start) and a counter.
    pub query_prefix: String,
    /// What prepares requests: the document registry, conversations,
    /// inferred-mode sessions, block dedup.
    pub reorder: crate::reorder::prepare::Reorder,
    /// The ContextPilot-compatible index API's state.
    pub compat: compat::CompatState,
    pub next_query: AtomicU64,
    /// Streaming responses still being relayed (each records itself when
    /// it ends), so that shutdown flushes the meter after the last one.
    pub streams: StreamTasks,
    /// The daemon's log lines, for `GET /logs`.
    pub logs: crate::logbus::LogBus,
}

/// Whether the daemon runs a model of its own, with the fixed parts of
/// its status.
pub enum PrimaryStatus {
    /// `[llama] model`'s status, shown while it is not loaded.
    Local(crate::status::StaticStatus),
    /// No `[llama] model`: no child, every model is an upstream's
    /// ([`crate::status::StaticStatus::front_only`]).
    FrontOnly(crate::status::StaticStatus),
}

/// A count of the stream tasks in flight.
#[derive(Clone)]
pub struct StreamTasks(Arc<watch::Sender<usize>>);

/// Held by one stream task; dropping it (after the task recorded its
/// request) counts the task out.
pub struct StreamTask(Arc<watch::Sender<usize>>);

impl Default for StreamTasks {
    fn default() -> Self {
        StreamTasks(Arc::new(watch::Sender::new(0)))
    }
}

impl StreamTasks {
    pub fn enter(&self) -> StreamTask {
        self.0.send_modify(|n| *n += 1);
        StreamTask(self.0.clone())
    }

    pub fn in_flight(&self) -> usize {
        *self.0.borrow()
    }

    /// Resolves once no stream task is left.
    pub async fn idle(&self) {
        let mut count = self.0.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = count.wait_for(|n| *n == 0).await;
    }
}

impl Drop for StreamTask {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Routes that run a model request through admission, slot choice and the
/// meter.
const MODEL_ROUTES: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/completion"];
/// The ContextPilot-compatible index API's POST routes.
const COMPAT_POST: [&str; 9] = [
    "/reorder",
    "/build",
    "/schedule",
    "/evict",
    "/search",
    "/insert",
    "/update",
    "/deduplicate",
    "/reset",
];
/// llama.cpp routes passed through as they are, for tools that speak them.
const POST_PASSTHROUGH: [&str; 5] = [
    "/v1/embeddings",
    "/embeddings",
    "/tokenize",
    "/detokenize",
    "/apply-template",
];

impl Gateway {
    async fn handle(self: &Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_string();
        // The dashboard's page and assets hold no data (its script sends
        // the key with every request for data).
        let open = path == "/health" || dashboard::ASSETS.contains(&path.as_str());
        if !open && !self.authorized(&request) {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send \"Authorization: Bearer <key>\"",
                "authentication_error",
            );
        }
        let method = request.method().clone();
        let post = method == Method::POST;
        // HEAD is GET without the body (hyper leaves it out).
        let get = method == Method::GET || method == Method::HEAD;
        match path.as_str() {
            "/health" if get => self.health(),
            "/status" if get => json(StatusCode::OK, &self.status_with_requests().await),
            "/stats" if get => match self.meter.stats().await {
                Some(stats) => {
                    let mut stats = serde_json::to_value(&stats).unwrap_or_default();
                    // The reference server's `/stats` field, so its client's
                    // `get_stats()` finds the index counters.
                    stats["index_stats"] = self.compat.index_stats().await;
                    json(StatusCode::OK, &stats)
                }
                None => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the meter is not running",
                    "server_error",
                ),
            },
            "/metrics" if get => self.metrics().await,
            "/logs" if get => logs::logs(self, request.uri().query()),
            "/v1/models" | "/models" if get => models::list(self),
            "/models/loaded" if get => models::loaded(self),
            "/models/load" if post => models::load(self, request).await,
            "/models/unload" if post => models::unload(self, request).await,
            p if get && p.starts_with("/v1/models/") => {
                models::one(self, &p["/v1/models/".len()..])
            }
            "/slots" if get => upstream::passthrough(self, request).await,
            // `/build` and `/schedule` are the reference server's older names.
            "/reorder" | "/build" if post => compat::reorder(self, request, false).await,
            "/schedule" if post => compat::reorder(self, request, true).await,
            "/evict" if post => compat::evict(self, request).await,
            "/search" if post => compat::search(self, request).await,
            "/insert" if post => compat::insert(self, request).await,
            "/update" if post => compat::update(self, request).await,
            "/deduplicate" if post => compat::deduplicate(self, request).await,
            "/reset" if post => compat::reset(self).await,
            "/requests" if get => compat::requests(self).await,
            "/requests/recent" if get => dashboard::recent(self, request.uri().query()).await,
            p if get && dashboard::ASSETS.contains(&p) => dashboard::asset(p),
            "/v1/batch/chat/completions" if post => batch::batch(self, request).await,
            p if post && MODEL_ROUTES.contains(&p) => request::model_request(self, request).await,
            p if post && POST_PASSTHROUGH.contains(&p) => {
                upstream::passthrough(self, request).await
            }
            "/health" | "/status" | "/stats" | "/metrics" | "/v1/models" | "/models" | "/slots"
            | "/requests" | "/models/loaded" | "/logs" => method_not_allowed(&method, &path, "GET"),
            "/models/load" | "/models/unload" => method_not_allowed(&method, &path, "POST"),
            p if MODEL_ROUTES.contains(&p)
                || POST_PASSTHROUGH.contains(&p)
                || COMPAT_POST.contains(&p) =>
            {
                method_not_allowed(&method, &path, "POST")
            }
            _ => error(
                StatusCode::NOT_FOUND,
                &format!("no route for {method} {path}"),
                "not_found_error",
            ),
        }
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let Some(key) = &self.api_key else {
            return true;
        };
        request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), key.as_bytes()))
    }

    /// 200 when the primary model is ready (or nothing is loaded: models
    /// load on demand); else 503 with its state.
    fn health(&self) -> Response<Body> {
        let (state, what) = match self.primary_status {
            PrimaryStatus::Local(_) => (
                self.fleet
                    .primary()
                    .map_or(State::Ready, |engine| engine.supervisor.borrow().state),
                "llama-server is",
            ),
            PrimaryStatus::FrontOnly(_) => (self.upstreams_state(), "no upstream is"),
        };
        if state == State::Ready {
            json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
        } else {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                format!("{what} not ready ({})", state.as_str()),
            )
            .retry_after("1")
            .into_response()
        }
    }

    async fn metrics(&self) -> Response<Body> {
        let engines = self.fleet.engines();
        let gauges = Gauges {
            // Children only: an upstream is no child of ours (front only:
            // none is up), and its outages are not restarts.
            child_up: self
                .fleet
                .primary()
                .filter(|e| e.remote.is_none())
                .is_some_and(|e| e.supervisor.borrow().state == State::Ready),
            slots_busy: engines.iter().map(|e| e.scheduler.busy()).sum(),
            queue_depth: engines.iter().map(|e| e.scheduler.queued()).sum(),
            child_restarts: engines
                .iter()
                .filter(|e| e.remote.is_none())
                .map(|e| e.supervisor.borrow().restarts)
                .sum(),
        };
        match self.meter.metrics(gauges).await {
            Some(text) => {
                let mut response = Response::new(full(Bytes::from(text)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            None => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the meter is not running",
                "server_error",
            ),
        }
    }

    async fn status_with_requests(&self) -> crate::status::Status {
        let mut status = self.status_document();
        if let Some(stats) = self.meter.stats().await {
            status.requests = Some(crate::status::RequestsHeadline {
                total: stats.total_queries,
                errors: stats.errors,
                client_errors: stats.client_errors,
                server_errors: stats.server_errors,
                retried: stats.retried,
                token_weighted_reuse_pct: stats.cache_reuse.token_weighted_reuse_pct,
                latency_p50_ms: stats.latency_ms.map(|d| d.p50),
                ttft_p50_ms: stats.ttft_ms.map(|d| d.p50),
                query_log: self.query_log.as_ref().map(|p| p.display().to_string()),
            });
        }
        status.gpu_sampling = self.gpu.as_ref().and_then(|g| g.unavailable_reason());
        status
    }

    /// The status of the primary model's engine (or the first loaded), and
    /// every loaded model in short.
    pub fn status_document(&self) -> crate::status::Status {
        let uptime = self.started.elapsed().as_secs();
        let mut status = match (&self.primary_status, self.fleet.primary()) {
            (PrimaryStatus::Local(_), Some(engine)) => engine_status(&engine, uptime),
            (PrimaryStatus::Local(primary), None) => {
                let unloaded = crate::supervisor::SupervisorView::unloaded();
                primary.snapshot(uptime, &unloaded, Vec::new())
            }
            // No child: the state is the upstreams', the child fields empty.
            (PrimaryStatus::FrontOnly(front), _) => {
                let view = crate::supervisor::SupervisorView {
                    state: self.upstreams_state(),
                    ..crate::supervisor::SupervisorView::unloaded()
                };
                let mut status = front.snapshot(uptime, &view, Vec::new());
                let engines = self.fleet.engines();
                status.busy = engines.iter().map(|e| e.scheduler.busy()).sum();
                status.queued = engines.iter().map(|e| e.scheduler.queued()).sum();
                status
            }
        };
        status.models = self.fleet.ps();
        status
    }

    /// A front-only daemon's state: its upstreams'.
    fn upstreams_state(&self) -> State {
        backends_state(&self.fleet.engines())
    }
}

/// The state of what several backends serve: ready while any is, else
/// the first one's; unloaded when there are none.
fn backends_state(backends: &[Arc<Engine>]) -> State {
    let states: Vec<State> = backends
        .iter()
        .map(|e| e.supervisor.borrow().state)
        .collect();
    if states.contains(&State::Ready) {
        State::Ready
    } else {
        states.first().copied().unwrap_or(State::Unloaded)
    }
}

/// One engine's part of `/status`.
fn engine_status(engine: &Engine, uptime_s: u64) -> crate::status::Status {
    let view = engine.supervisor.borrow().clone();
    let mut status = engine.status.snapshot(uptime_s, &view, engine.tail.lines());
    let cost = engine.scheduler.cost();
    let note = cost.note();
    status.cost = Some(crate::status::CostStatus {
        profile: cost.profile().as_ref().clone(),
        token_scale: (cost.token_scale() * 1000.0).round() / 1000.0,
        measuring: note.measuring,
        note: note.message,
        decisions: if note.decisions.is_empty() {
            engine.status.cost_decisions.clone()
        } else {
            note.decisions
        },
    });
    status.slots = engine.scheduler.summary();
    status.busy = engine.scheduler.busy();
    status.queued = engine.scheduler.queued();
    status
}

fn method_not_allowed(method: &Method, path: &str, allowed: &'static str) -> Response<Body> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("{method} is not allowed on {path}; use {allowed}"),
        "invalid_request_error",
    );
    response
        .headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allowed));
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).boxed_unsync()
}

pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A response body fed chunk by chunk from a channel; the sender sees an
/// error once the client is gone.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    pub fn new(capacity: usize) -> (mpsc::Sender<Bytes>, ChannelBody) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, ChannelBody { rx })
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// Serves `listener` until `shutdown` resolves, then stops accepting and
/// gives open connections up to `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    header_timeout: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer): (_, SocketAddr) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = tower::ServiceBuilder::new()
                    .layer(guard::GuardLayer::new(gateway.guard.clone()))
                    .service(tower::service_fn({
                        let gateway = gateway.clone();
                        move |request: Request<Incoming>| {
                            let gateway = gateway.clone();
                            async move { Ok::<_, Infallible>(gateway.handle(request).await) }
                        }
                    }));
                let service = hyper_util::service::TowerToHyperService::new(service);
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {grace:?}; closing them");
    }
}

#[cfg(test)]
mod stream_tasks_tests {
    use super::StreamTasks;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_the_last_stream_task() {
        let streams = StreamTasks::default();
        streams.idle().await; // none: resolves at once
        let first = streams.enter();
        let second = streams.enter();
        assert_eq!(streams.in_flight(), 2);
        let waiting = tokio::spawn({
            let streams = streams.clone();
            async move { streams.idle().await }
        });
        drop(first);
        // Polled first, `idle` must still be pending with one task in flight.
        tokio::select! {
            biased;
            _ = streams.idle() => panic!("idle resolved with a stream task still in flight"),
            _ = std::future::ready(()) => {}
        }
        assert!(!waiting.is_finished());
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("idle resolves once the last task is done")
            .unwrap();
        assert_eq!(streams.in_flight(), 0);
    }
}
