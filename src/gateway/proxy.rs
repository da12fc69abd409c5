//! The path of one model request, top to bottom: read and validate the body,
//! wait for a ready child, take a slot (admission + slot choice), forward
//! with `cache_prompt` and `id_slot`, stream or return the answer, retry once
//! if the child died before anything reached the client, and hand the meter
//! a record of what happened, whatever happened.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde_json::Value;

pub(super) use super::headers::RequestOptions;
use super::sse::StreamObserver;
use super::{error, error_body, full, json, with_retry_after, Body, ChannelBody, Gateway};
use crate::meter::{round2, CacheReuse, QueryRecord};
use crate::reorder::{self, Documents, DocumentsPolicy, ReorderInfo};
use crate::slots::{AdmitError, PrefixPolicy, SlotLease};
use crate::supervisor::{rfc3339_utc, State};

/// The daemon's HTTP client to the child: keep-alive connections, no
/// timeouts of its own (generation can take minutes; liveness is the
/// supervisor's job).
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    pub fn new() -> Upstream {
        Upstream {
            client: crate::http_client::loopback_client(),
        }
    }

    async fn send(
        &self,
        method: Method,
        port: u16,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{port}{path_and_query}"))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a loopback URI and fixed headers always build");
        self.client.request(request).await
    }

    /// Whether the child on `port` is gone: the probe fails outright
    /// (refused, or reset on a pooled connection). A slow answer is not
    /// death: a busy child may be slow.
    async fn is_gone(&self, port: u16) -> bool {
        let probe = self.send(Method::GET, port, "/health", Bytes::new());
        matches!(
            tokio::time::timeout(Duration::from_millis(500), probe).await,
            Ok(Err(_))
        )
    }
}

/// A stream client that takes no data for this long is treated as gone, so
/// it cannot hold a slot forever.
const STALLED_CLIENT: Duration = Duration::from_secs(60);

/// A child that is ready for requests.
#[derive(Debug, Clone, Copy)]
struct Target {
    pid: u32,
    port: u16,
}

impl Gateway {
    /// Waits until the child is ready (and, after a failure, is not the one
    /// that failed), or returns the state it was stuck in at the deadline.
    async fn wait_ready(&self, avoid_pid: Option<u32>, deadline: Instant) -> Result<Target, State> {
        let mut view = self.supervisor.clone();
        loop {
            {
                let v = view.borrow_and_update();
                if let (State::Ready, Some(pid), Some(port)) = (v.state, v.pid, v.port) {
                    if Some(pid) != avoid_pid {
                        return Ok(Target { pid, port });
                    }
                }
            }
            let state = view.borrow().state;
            match tokio::time::timeout_at(deadline.into(), view.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(state),
            }
        }
    }
}

/// What is known about one request while it runs; becomes its record.
pub(super) struct Ctx {
    gateway: Arc<Gateway>,
    query_id: String,
    timestamp: String,
    arrived: Instant,
    path: String,
    stream: bool,
    retried: bool,
    slot: Option<usize>,
    /// The child that answered (slots are per child).
    child_pid: Option<u32>,
    /// The caller's request id (`rid` or `request_id`), as ContextPilot's
    /// clients send it: the live index learns when its slot is overwritten.
    request_id: Option<String>,
    prompt: Option<Value>,
    /// What reordering did.
    reorder: Option<ReorderInfo>,
    /// Repeated blocks replaced by pointers, when any were.
    block_dedup: Option<reorder::dedup::DedupStats>,
    /// What the slot was recorded to hold, to drop if the request fails.
    slot_contents: Option<crate::slots::SlotContents>,
    /// How the slot was chosen, with the predicted prompt time.
    slot_decision: Option<crate::slots::SlotDecision>,
    /// Inferred mode's session state, stored once llama-server answered.
    infer_pending: Option<reorder::infer::Pending>,
    /// A conversation turn (requests with `documents`), stored likewise.
    conversation_pending: Option<reorder::conversation::Pending>,
    /// The `X-ContextPilot-Result` header, when inferred mode did something.
    result_header: Option<String>,
    /// Set once the record is sent; a context dropped without it (the
    /// client went away mid-request) records itself as such.
    recorded: bool,
}

/// How a request ended, for its record.
#[derive(Default)]
struct Outcome {
    status: u16,
    timings: Option<Value>,
    usage: Option<Value>,
    error: Option<String>,
    ttft_ms: Option<f64>,
    completion: Option<String>,
    tokens_evaluated: Option<u64>,
    tokens_predicted: Option<u64>,
}

impl Ctx {
    fn finish(&mut self, outcome: Outcome) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let now = Instant::now();
        let latency_ms = round2(now.duration_since(self.arrived).as_secs_f64() * 1000.0);
        let timings = outcome.timings.as_ref();
        let cache_reuse = timings.and_then(CacheReuse::from_timings);
        let usage_n = |key: &str| {
            outcome
                .usage
                .as_ref()
                .and_then(|u| u.get(key))
                .and_then(Value::as_u64)
        };
        let timing_n = |key: &str| timings.and_then(|t| t.get(key)).and_then(Value::as_u64);
        let prompt_tokens = usage_n("prompt_tokens")
            .or_else(|| cache_reuse.as_ref().map(|c| c.total_prompt_tokens))
            .or(outcome.tokens_evaluated);
        let completion_tokens = usage_n("completion_tokens")
            .or_else(|| timing_n("predicted_n"))
            .or(outcome.tokens_predicted);
        // Without a stream there is no first-token moment to see: the
        // latency less the generation time is when the first token was ready.
        let ttft_ms = outcome.ttft_ms.or_else(|| {
            let gen_ms = cache_reuse.as_ref()?.gen_ms;
            (outcome.status == 200).then(|| round2((latency_ms - gen_ms).max(0.0)))
        });
        if let (Some(slot), Some(contents)) = (self.slot, &self.slot_contents) {
            if outcome.status != 200 || timings.is_none() {
                self.gateway.scheduler.forget(slot, contents);
            }
        }
        // Conversations and sessions remember a turn only once it was
        // answered: a failed turn sent again continues from the last good one.
        if let Some(pending) = self.infer_pending.take() {
            if outcome.status == 200 {
                self.gateway.sessions.commit(pending);
            }
        }
        if let Some(pending) = self.conversation_pending.take() {
            if outcome.status == 200 {
                self.gateway.conversations.commit(pending);
            }
        }
        if let (Some(slot), Some(pid)) = (self.slot, self.child_pid) {
            // Whatever the slot held before this request is gone from it.
            let rid = (outcome.status == 200).then_some(self.request_id.as_deref());
            self.gateway.compat.slot_answered(pid, slot, rid.flatten());
        }
        let reorder = self.reorder.take();
        if let (Some(info), Some(slot), Some(contents), Some(reuse)) =
            (&reorder, self.slot, &self.slot_contents, &cache_reuse)
        {
            // Resync: llama.cpp reused less than half of what the daemon
            // expected, so its picture of this slot is wrong.
            if reuse.reused_tokens * 2 < u64::from(info.predicted_reused_tokens) {
                self.gateway.scheduler.forget(slot, contents);
            }
        }
        if let (Some(decision), Some(reuse)) = (&self.slot_decision, &cache_reuse) {
            // Calibrate the token estimates slot choice predicts with.
            if outcome.status == 200 {
                self.gateway
                    .scheduler
                    .cost()
                    .observe_tokens(decision.predicted_prompt_tokens, reuse.total_prompt_tokens);
            }
        }
        let gpu = self
            .gateway
            .gpu
            .as_ref()
            .and_then(|g| g.window(self.arrived, now))
            .and_then(|w| serde_json::to_value(w).ok());
        self.gateway.meter.record(QueryRecord {
            query_id: self.query_id.clone(),
            timestamp: self.timestamp.clone(),
            path: self.path.clone(),
            model: self.gateway.model_id.clone(),
            slot_id: self.slot,
            status_code: outcome.status,
            stream: self.stream,
            latency_ms,
            ttft_ms,
            prompt_tokens,
            completion_tokens,
            cache_reuse,
            error: outcome.error,
            retried: self.retried,
            gpu,
            reorder,
            slot_decision: self.slot_decision.take(),
            block_dedup: self.block_dedup.take(),
            prompt: self.prompt.take(),
            completion: outcome.completion,
        });
    }

    /// Records an error and builds its response.
    fn fail(&mut self, status: StatusCode, message: &str, kind: &str) -> Response<Body> {
        self.finish(Outcome {
            status: status.as_u16(),
            error: Some(message.to_string()),
            ..Outcome::default()
        });
        error(status, message, kind)
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if !self.recorded {
            self.finish(Outcome {
                status: 499,
                error: Some("the client went away before the response was complete".into()),
                ..Outcome::default()
            });
        }
    }
}

/// Reads a request body up to `limit` bytes.
pub(super) async fn read_body(
    request: Request<Incoming>,
    limit: usize,
) -> Result<Bytes, Response<Body>> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request body is larger than max_body_bytes ({limit} bytes)"),
            "invalid_request_error",
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("could not read the request body: {e}"),
            "invalid_request_error",
        )),
    }
}

/// The text slot choice compares: what llama.cpp will see at the start of
/// the prompt, in order.
fn prompt_key(path: &str, body: &Value) -> String {
    if path == "/v1/chat/completions" {
        let tools = body.get("tools").map(Value::to_string).unwrap_or_default();
        format!(
            "{tools}{}",
            body.get("messages")
                .map(Value::to_string)
                .unwrap_or_default()
        )
    } else {
        match body.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    }
}

fn validate(path: &str, body: &Value) -> Result<(), String> {
    if path == "/v1/chat/completions" {
        match body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => Ok(()),
            Some(Value::Array(_)) => Err("`messages` must not be empty".into()),
            Some(_) => Err("`messages` must be an array of messages".into()),
            None => Err("`messages` is required".into()),
        }
    } else {
        match body.get("prompt") {
            Some(Value::String(_) | Value::Array(_)) => Ok(()),
            Some(_) => Err("`prompt` must be a string or an array".into()),
            None => Err("`prompt` is required".into()),
        }
    }
}

/// Inferred mode (`reorder::infer`) for a chat request that brings no
/// `documents` and is not a turn of a conversation with documents.
fn infer_documents(gateway: &Gateway, options: &RequestOptions, ctx: &mut Ctx, body: &mut Value) {
    if !gateway.infer_documents || body.get("documents").is_some_and(|d| !d.is_null()) {
        return;
    }
    let conversation = body
        .get("conversation_id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| options.conversation.clone());
    if conversation
        .as_deref()
        .is_some_and(|id| gateway.conversations.contains(id))
    {
        return;
    }
    let (report, pending) = gateway.sessions.rewrite(
        body,
        &options.intercept,
        &gateway.registry,
        &options.client,
        conversation.as_deref(),
    );
    ctx.infer_pending = pending;
    if report.is_empty() {
        return;
    }
    if report.total_documents > 0 {
        ctx.reorder = Some(ReorderInfo {
            documents: report.total_documents,
            moved: report.moved,
            deduped: report.documents_deduplicated,
            predicted_reused_tokens: 0,
            slot_choice: "inferred",
            reordered: report.moved > 0,
            predicted_gain_ms: 0.0,
        });
    }
    ctx.result_header = serde_json::to_string(&report).ok();
}

/// The 503 (with Retry-After) for a request that waited `waited` for a
/// child that did not become ready; `respond` renders it (and records it,
/// for a model request).
fn not_ready(
    state: State,
    waited: Duration,
    respond: impl FnOnce(StatusCode, &str, &str) -> Response<Body>,
) -> Response<Body> {
    let message = format!(
        "llama-server is not ready ({}) after {}s; try again",
        state.as_str(),
        waited.as_secs()
    );
    with_retry_after(
        respond(
            StatusCode::SERVICE_UNAVAILABLE,
            &message,
            "unavailable_error",
        ),
        "5",
    )
}

impl Ctx {
    pub(super) fn new(gateway: &Arc<Gateway>, path: &str) -> Ctx {
        let number = gateway.next_query.fetch_add(1, Ordering::Relaxed);
        Ctx {
            gateway: gateway.clone(),
            query_id: format!("{}-{number}", gateway.query_prefix),
            timestamp: rfc3339_utc(SystemTime::now()),
            arrived: Instant::now(),
            path: path.to_string(),
            stream: false,
            retried: false,
            slot: None,
            child_pid: None,
            request_id: None,
            prompt: None,
            reorder: None,
            block_dedup: None,
            slot_contents: None,
            slot_decision: None,
            infer_pending: None,
            conversation_pending: None,
            result_header: None,
            recorded: false,
        }
    }
}

/// `POST /v1/chat/completions`, `/v1/completions` and native `/completion`.
pub(super) async fn model_request(
    gateway: &Arc<Gateway>,
    request: Request<Incoming>,
) -> Response<Body> {
    let path = request.uri().path().to_string();
    let options = RequestOptions::from_headers(request.headers());
    let mut ctx = Ctx::new(gateway, &path);
    let raw = match read_body(request, gateway.max_body_bytes).await {
        Ok(raw) => raw,
        Err(response) => {
            let status = response.status();
            ctx.finish(Outcome {
                status: status.as_u16(),
                error: Some(
                    status
                        .canonical_reason()
                        .unwrap_or("bad request")
                        .to_string(),
                ),
                ..Outcome::default()
            });
            return response;
        }
    };
    serve_model(gateway, &path, options, ctx, raw).await
}

/// A model request whose body has been read: everything after that.
pub(super) async fn serve_model(
    gateway: &Arc<Gateway>,
    path: &str,
    options: RequestOptions,
    mut ctx: Ctx,
    raw: Bytes,
) -> Response<Body> {
    let path = path.to_string();
    let arrived = ctx.arrived;
    let mut body: Value = match serde_json::from_slice(&raw) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return ctx.fail(
                StatusCode::BAD_REQUEST,
                "the request body must be a JSON object",
                "invalid_request_error",
            )
        }
        Err(e) => {
            return ctx.fail(
                StatusCode::BAD_REQUEST,
                &format!("the request body is not valid JSON: {e}"),
                "invalid_request_error",
            )
        }
    };
    if let Err(message) = validate(&path, &body) {
        return ctx.fail(StatusCode::BAD_REQUEST, &message, "invalid_request_error");
    }
    ctx.stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    ctx.request_id = ["rid", "request_id"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_str))
        .map(str::to_string);
    if gateway.meter.log_prompts {
        ctx.prompt = body.get("messages").or_else(|| body.get("prompt")).cloned();
    }
    drop(raw);
    if options.intercept.enabled && path == "/v1/chat/completions" {
        infer_documents(gateway, &options, &mut ctx, &mut body);
        if let Some(messages) = body
            .get_mut("messages")
            .and_then(Value::as_array_mut)
            .filter(|_| gateway.dedup)
        {
            let stats = reorder::dedup::dedup_messages(messages);
            if stats.blocks_deduped > 0 {
                ctx.block_dedup = Some(stats);
            }
        }
    }
    let mut documents = match DocumentRequest::take(gateway, &path, &mut body, options.conversation)
    {
        Ok(documents) => documents,
        Err(message) => {
            return ctx.fail(StatusCode::BAD_REQUEST, &message, "invalid_request_error")
        }
    };
    ctx.conversation_pending = documents
        .as_mut()
        .and_then(|d| d.turn.as_mut())
        .and_then(|turn| turn.pending.take());
    // The prompt key for prefix-based slot choice; a first turn with
    // documents chooses by its documents instead and never needs it.
    let key: Arc<str> = match &documents {
        Some(request) if request.turn.is_none() => Arc::from(""),
        _ => Arc::from(prompt_key(&path, &body)),
    };
    body["cache_prompt"] = Value::Bool(true);

    let mut deadline = arrived + gateway.queue_timeout;
    let mut avoid_pid = None;
    loop {
        let target = match gateway.wait_ready(avoid_pid, deadline).await {
            Ok(target) => target,
            Err(state) => {
                return not_ready(state, gateway.queue_timeout, |status, message, kind| {
                    ctx.fail(status, message, kind)
                });
            }
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        // Slot choice: by documents for a request that brings them, else by
        // the longest common prefix of the prompt (which also keeps a
        // conversation's later turns on its slot).
        let acquired = match documents.as_ref().filter(|r| r.turn.is_none()) {
            Some(request) => {
                let mut policy = request.policy(gateway.reorder_threshold);
                let lease = gateway
                    .scheduler
                    .acquire(&mut policy, target.pid, remaining)
                    .await;
                if let Ok(lease) = &lease {
                    ctx.conversation_pending = request.render_into(&mut body, &policy);
                    let key = Arc::from(prompt_key(&path, &body));
                    gateway.scheduler.set_key(lease.id(), &lease.contents, key);
                    ctx.reorder = policy.info.map(|mut info| {
                        info.deduped = request.documents.deduped;
                        info
                    });
                }
                lease
            }
            None => {
                if let Some((request, turn)) =
                    documents.as_ref().and_then(|r| Some((r, r.turn.as_ref()?)))
                {
                    ctx.reorder = Some(ReorderInfo {
                        documents: request.documents.docs.len(),
                        moved: 0,
                        deduped: request.documents.deduped + turn.referenced,
                        predicted_reused_tokens: 0,
                        slot_choice: "conversation",
                        reordered: false,
                        predicted_gain_ms: 0.0,
                    });
                }
                let mut policy = PrefixPolicy {
                    prompt: key.clone(),
                };
                gateway
                    .scheduler
                    .acquire(&mut policy, target.pid, remaining)
                    .await
            }
        };
        let lease = match acquired {
            Ok(lease) => lease,
            Err(AdmitError::QueueFull) => {
                return with_retry_after(
                    ctx.fail(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many requests are waiting for a slot (max_queue); try again",
                        "rate_limit_error",
                    ),
                    "1",
                );
            }
            Err(AdmitError::Timeout) => {
                return with_retry_after(
                    ctx.fail(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no slot came free in time (queue_timeout_s); try again",
                        "unavailable_error",
                    ),
                    "5",
                );
            }
        };
        ctx.slot = Some(lease.id());
        ctx.child_pid = Some(target.pid);
        ctx.slot_contents = Some(lease.contents.clone());
        ctx.slot_decision = Some(lease.decision.clone());
        body["id_slot"] = Value::from(lease.id());
        let payload = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());

        match forward(&mut ctx, target, &path, payload, lease).await {
            Forwarded::Done(response) => return response,
            Forwarded::ChildDied(why) if !ctx.retried => {
                // Nothing has reached the client: try once more, on the
                // restarted child unless this one turns out to be alive.
                tracing::warn!(query = %ctx.query_id, "llama-server failed the request ({why}); retrying once");
                ctx.retried = true;
                // The retry gets a full wait of its own: a long request that
                // crashes late still deserves the restarted child.
                deadline = Instant::now() + gateway.queue_timeout;
                avoid_pid = gateway
                    .upstream
                    .is_gone(target.port)
                    .await
                    .then_some(target.pid);
            }
            Forwarded::ChildDied(why) => {
                return with_retry_after(
                    ctx.fail(
                        StatusCode::BAD_GATEWAY,
                        &format!(
                        "llama-server failed the request twice ({why}); see contextpilotd status"
                    ),
                        "server_error",
                    ),
                    "5",
                );
            }
        }
    }
}

enum Forwarded {
    Done(Response<Body>),
    /// The child closed the connection before any byte reached the client.
    ChildDied(String),
}

async fn forward(
    ctx: &mut Ctx,
    target: Target,
    path: &str,
    payload: Bytes,
    lease: SlotLease,
) -> Forwarded {
    let upstream = &ctx.gateway.upstream;
    let response = match upstream
        .send(Method::POST, target.port, path, payload)
        .await
    {
        Ok(response) => response,
        Err(e) => return Forwarded::ChildDied(e.to_string()),
    };
    let (parts, mut incoming) = response.into_parts();
    let is_sse = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if ctx.stream && parts.status == StatusCode::OK && is_sse {
        // Hold the response until the first chunk: a child that dies before
        // it can still be retried.
        let first = match incoming.frame().await {
            Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
            Some(Err(e)) => return Forwarded::ChildDied(e.to_string()),
            None => return Forwarded::ChildDied("the stream ended before its first event".into()),
        };
        let header = ctx.result_header.take();
        return Forwarded::Done(with_result_header(
            start_stream(ctx, first, incoming, lease),
            header,
        ));
    }
    let bytes = match incoming.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return Forwarded::ChildDied(e.to_string()),
    };
    drop(lease);
    let header = ctx.result_header.take();
    Forwarded::Done(with_result_header(
        finish_whole(ctx, parts.status, bytes),
        header,
    ))
}

/// Adds `X-ContextPilot-Result` (what inferred mode did; metadata never goes
/// into bodies).
fn with_result_header(mut response: Response<Body>, header: Option<String>) -> Response<Body> {
    if let Some(value) = header.and_then(|h| hyper::header::HeaderValue::from_str(&h).ok()) {
        response
            .headers_mut()
            .insert("x-contextpilot-result", value);
    }
    response
}

/// A whole (non-streamed) answer: fill `usage.prompt_tokens_details.cached_tokens`
/// from the timings, record, respond.
fn finish_whole(ctx: &mut Ctx, status: StatusCode, bytes: Bytes) -> Response<Body> {
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        ctx.finish(Outcome {
            status: status.as_u16(),
            error: (!status.is_success()).then(|| String::from_utf8_lossy(&bytes).into_owned()),
            ..Outcome::default()
        });
        let mut response = Response::new(full(bytes));
        *response.status_mut() = status;
        return response;
    };
    let timings = value.get("timings").cloned();
    if let (Some(cached), Some(usage)) = (
        timings.as_ref().and_then(|t| t.get("cache_n")).cloned(),
        value.get_mut("usage").and_then(Value::as_object_mut),
    ) {
        let details = usage
            .entry("prompt_tokens_details")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(details) = details.as_object_mut() {
            details.insert("cached_tokens".into(), cached);
        }
    }
    let completion = if ctx.gateway.meter.log_prompts {
        value
            .pointer("/choices/0/message/content")
            .or_else(|| value.pointer("/choices/0/text"))
            .or_else(|| value.get("content"))
            .and_then(Value::as_str)
            .map(str::to_string)
    } else {
        None
    };
    ctx.finish(Outcome {
        status: status.as_u16(),
        timings,
        usage: value.get("usage").cloned(),
        error: value
            .pointer("/error/message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| (!status.is_success()).then(|| format!("llama-server answered {status}"))),
        completion,
        tokens_evaluated: value.get("tokens_evaluated").and_then(Value::as_u64),
        tokens_predicted: value.get("tokens_predicted").and_then(Value::as_u64),
        ..Outcome::default()
    });
    json(status, &value)
}

/// Starts relaying a stream: every chunk goes to the client as it arrives,
/// and a copy to the observer for the record.
fn start_stream(
    outer: &mut Ctx,
    first: Bytes,
    mut incoming: Incoming,
    lease: SlotLease,
) -> Response<Body> {
    let (tx, body) = ChannelBody::new(64);
    let mut ctx = Ctx {
        gateway: outer.gateway.clone(),
        query_id: std::mem::take(&mut outer.query_id),
        timestamp: std::mem::take(&mut outer.timestamp),
        arrived: outer.arrived,
        path: std::mem::take(&mut outer.path),
        stream: true,
        retried: outer.retried,
        slot: outer.slot,
        child_pid: outer.child_pid,
        request_id: outer.request_id.take(),
        prompt: outer.prompt.take(),
        reorder: outer.reorder.take(),
        block_dedup: outer.block_dedup.take(),
        slot_contents: outer.slot_contents.take(),
        slot_decision: outer.slot_decision.take(),
        infer_pending: outer.infer_pending.take(),
        conversation_pending: outer.conversation_pending.take(),
        result_header: None,
        recorded: false,
    };
    // The stream task records from here on; the caller's context must not.
    outer.recorded = true;
    let openai = ctx.path.starts_with("/v1/");
    let mut observer = StreamObserver::new(ctx.gateway.meter.log_prompts);
    // Dropped last, after the task has recorded the request.
    let in_flight = ctx.gateway.streams.enter();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let mut lease = Some(lease);
        let mut ttft_ms = None;
        let mut chunk = Some(first);
        let mut cut: Option<String> = None;
        let mut client_gone = false;
        // The whole answer reached the client ([DONE], or the native final
        // event): one that closes its end now has not gone away.
        let mut delivered = false;
        loop {
            let data = match chunk.take() {
                Some(data) => data,
                None => {
                    let frame = tokio::select! {
                        frame = incoming.frame() => frame,
                        // Notice a client that left while the child is quiet
                        // (long prefill), not only at the next chunk.
                        _ = tx.closed() => {
                            client_gone = true;
                            break;
                        }
                    };
                    match frame {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) => data,
                            Err(_) => continue, // trailers
                        },
                        Some(Err(e)) => {
                            cut = Some(e.to_string());
                            break;
                        }
                        None => break,
                    }
                }
            };
            // Forward first (a `Bytes` clone is a reference count), then
            // read the copy.
            let sent = tokio::time::timeout(STALLED_CLIENT, tx.send(data.clone())).await;
            if observer.feed(&data) {
                ttft_ms = Some(round2(ctx.arrived.elapsed().as_secs_f64() * 1000.0));
            }
            if !matches!(sent, Ok(Ok(()))) {
                // Gone, or not reading for so long that holding the slot
                // any longer would starve everyone else.
                client_gone = true;
                break;
            }
            delivered = if openai {
                observer.saw_done
            } else {
                observer.timings.is_some()
            };
        }
        if delivered {
            client_gone = false;
        }
        // Stop the upstream request and free the slot before anything else.
        drop(incoming);
        drop(lease.take());
        let error = if client_gone {
            Some("the client went away (or stopped reading) during the stream".to_string())
        } else if let Some(child_error) = observer.error.clone() {
            // llama-server reported an error in the stream and ended it
            // without [DONE]: its words, then the end marker clients expect.
            if openai && !observer.saw_done {
                let _ = tx.try_send(Bytes::from_static(b"data: [DONE]\n\n"));
            }
            Some(child_error)
        } else if let Some(why) = cut.or_else(|| {
            (openai && !observer.saw_done).then(|| "the stream ended without [DONE]".to_string())
        }) {
            let message = format!(
                "llama-server stopped during the response ({why}); the answer is incomplete"
            );
            let event = error_body(StatusCode::BAD_GATEWAY, &message, "server_error");
            let mut tail = format!("data: {event}\n\n");
            if openai {
                tail.push_str("data: [DONE]\n\n");
            }
            let _ = tx.try_send(Bytes::from(tail));
            Some(message)
        } else {
            None
        };
        ctx.finish(Outcome {
            status: if client_gone { 499 } else { 200 },
            timings: observer.timings.take(),
            usage: observer.usage.take(),
            error,
            ttft_ms,
            completion: observer.text.take(),
            tokens_evaluated: observer.tokens_evaluated,
            tokens_predicted: observer.tokens_predicted,
        });
    });
    let mut response = Response::new(http_body_util::BodyExt::boxed_unsync(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// llama.cpp routes passed through unmetered: `/tokenize`, `/detokenize`,
/// `/apply-template`, `/v1/embeddings`, `GET /slots`.
pub(super) async fn passthrough(
    gateway: &Arc<Gateway>,
    request: Request<Incoming>,
) -> Response<Body> {
    let method = request.method().clone();
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| request.uri().path().to_string());
    let body = match read_body(request, gateway.max_body_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    if method == Method::POST && serde_json::from_slice::<Value>(&body).is_err() {
        return error(
            StatusCode::BAD_REQUEST,
            "the request body is not valid JSON",
            "invalid_request_error",
        );
    }
    let deadline = Instant::now() + gateway.queue_timeout;
    let target = match gateway.wait_ready(None, deadline).await {
        Ok(target) => target,
        Err(state) => return not_ready(state, gateway.queue_timeout, error),
    };
    let response = match gateway
        .upstream
        .send(method, target.port, &path_and_query, body)
        .await
    {
        Ok(response) => response,
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                &format!("llama-server did not answer: {e}"),
                "server_error",
            )
        }
    };
    let (parts, incoming) = response.into_parts();
    let bytes = match incoming.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                &format!("llama-server stopped answering: {e}"),
                "server_error",
            )
        }
    };
    let mut out = Response::new(full(bytes));
    *out.status_mut() = parts.status;
    if let Some(content_type) = parts.headers.get(CONTENT_TYPE) {
        out.headers_mut().insert(CONTENT_TYPE, content_type.clone());
    }
    out
}

/// Whether a later conversation turn keeps its history (earlier documents
/// included) or starts over with only this turn's documents: it keeps them
/// while the prompt stays within `[reorder] conversation_max_tokens` and a
/// slot still holds enough of it that continuing is predicted faster than
/// computing the shorter prompt from nothing.
fn keep_conversation(
    gateway: &Gateway,
    path: &str,
    messages: &[Value],
    restart_tokens: u64,
) -> bool {
    let key = prompt_key(path, &serde_json::json!({ "messages": messages }));
    let keep_tokens = crate::slots::tokens_of_bytes(key.len());
    let held = crate::slots::tokens_of_bytes(gateway.scheduler.longest_held_prefix(&key));
    let cost = gateway.scheduler.cost().view();
    if cost.tokens(keep_tokens) > gateway.conversation_max_tokens {
        return false;
    }
    cost.prompt_ms(keep_tokens, held) <= cost.prompt_ms(restart_tokens, 0)
}

/// A chat request that carries `documents`: parsed once, rendered per
/// attempt (the order depends on the slot).
struct DocumentRequest {
    documents: Documents,
    ranks: Vec<u64>,
    /// Ranks below this were documents of earlier requests.
    known_before: u64,
    caller_system: Option<String>,
    /// The caller's messages without its system message.
    messages: Vec<Value>,
    header: u64,
    header_tokens: u32,
    conversation: Option<String>,
    /// Set for a later turn of a known conversation: already rewritten.
    turn: Option<reorder::conversation::Turn>,
}

impl DocumentRequest {
    /// Takes `documents` (and `conversation_id`) out of the body; `None`
    /// when there are none. A later turn of a known conversation is
    /// rewritten here, history byte-identical to what was sent before.
    fn take(
        gateway: &Gateway,
        path: &str,
        body: &mut Value,
        conversation_header: Option<String>,
    ) -> Result<Option<DocumentRequest>, String> {
        let Some(object) = body.as_object_mut() else {
            return Ok(None);
        };
        let conversation = match object.remove("conversation_id") {
            Some(Value::String(id)) if !id.is_empty() => Some(id),
            Some(Value::Null) | None => conversation_header.filter(|id| !id.is_empty()),
            Some(_) => return Err("`conversation_id` must be a non-empty string".into()),
        };
        let value = object.remove("documents");
        let no_documents = match &value {
            None | Some(Value::Null) => true,
            Some(Value::Array(items)) => items.is_empty() && conversation.is_some(),
            Some(_) => false,
        };
        if no_documents {
            // A follow-up turn without new documents still belongs to its
            // conversation; without one, the request is left as it is.
            let Some(id) = conversation.as_deref() else {
                return Ok(None);
            };
            let mut messages = object
                .get("messages")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let caller_system = reorder::take_caller_system(&mut messages)?;
            let Some(turn) =
                gateway
                    .conversations
                    .continue_turn(id, caller_system.as_deref(), &messages, &[])
            else {
                return Ok(None);
            };
            object.insert("messages".into(), Value::Array(turn.messages.clone()));
            let (header, header_tokens) = reorder::header_of(caller_system.as_deref());
            return Ok(Some(DocumentRequest {
                documents: Documents {
                    docs: Vec::new(),
                    deduped: 0,
                },
                ranks: Vec::new(),
                known_before: 0,
                caller_system,
                messages,
                header,
                header_tokens,
                conversation,
                turn: Some(turn),
            }));
        }
        let value = value.unwrap_or(Value::Null);
        if path != "/v1/chat/completions" {
            return Err("`documents` is supported on /v1/chat/completions only".into());
        }
        let documents = reorder::parse_documents(&value)?;
        let known_before = gateway.registry.next_rank();
        let ranks = gateway.registry.observe(&documents.docs)?;
        let mut messages = object
            .get("messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let caller_system = reorder::take_caller_system(&mut messages)?;
        let (header, header_tokens) = reorder::header_of(caller_system.as_deref());
        let turn = conversation
            .as_deref()
            .and_then(|id| {
                gateway.conversations.continue_turn(
                    id,
                    caller_system.as_deref(),
                    &messages,
                    &documents.docs,
                )
            })
            .filter(|turn| {
                // Started over, the prompt holds this turn's documents and
                // the client's own history, without earlier documents.
                let restart_tokens = u64::from(header_tokens)
                    + documents
                        .docs
                        .iter()
                        .map(|d| u64::from(d.tokens))
                        .sum::<u64>()
                    + reorder::tail_tokens(&messages, documents.docs.len());
                keep_conversation(gateway, path, &turn.messages, restart_tokens)
            });
        if let Some(turn) = &turn {
            object.insert("messages".into(), Value::Array(turn.messages.clone()));
        }
        Ok(Some(DocumentRequest {
            documents,
            ranks,
            known_before,
            caller_system,
            messages,
            header,
            header_tokens,
            conversation,
            turn,
        }))
    }

    fn policy(&self, threshold: reorder::GainThreshold) -> DocumentsPolicy<'_> {
        let mut policy = DocumentsPolicy::new(
            self.header,
            self.header_tokens,
            &self.documents.docs,
            &self.ranks,
        );
        policy.tail_tokens = reorder::tail_tokens(&self.messages, self.documents.docs.len())
            .min(u64::from(u32::MAX)) as u32;
        policy.threshold = threshold;
        policy.known_before = self.known_before;
        policy
    }

    /// Puts the rendered system message and the caller's other messages
    /// into the body; for a request with a conversation id, returns the
    /// conversation to open once the turn is answered.
    fn render_into(
        &self,
        body: &mut Value,
        policy: &DocumentsPolicy<'_>,
    ) -> Option<reorder::conversation::Pending> {
        let system = reorder::render_system(
            self.caller_system.as_deref(),
            &self.documents.docs,
            &policy.order,
        );
        let system = serde_json::json!({"role": "system", "content": system});
        let pending = self.conversation.as_ref().map(|id| {
            reorder::conversation::Conversations::start(
                id,
                self.caller_system.as_deref(),
                system.clone(),
                &self.messages,
                &self.documents.docs,
                &policy.order,
            )
        });
        let mut messages = Vec::with_capacity(self.messages.len() + 1);
        messages.push(system);
        messages.extend(self.messages.iter().cloned());
        body["messages"] = Value::Array(messages);
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference system's case 31, as it applies here: the request to
    /// llama-server is built from scratch, so no client header reaches it
    /// (neither `X-ContextPilot-*` nor credentials, which are the daemon's).
    #[tokio::test]
    async fn upstream_requests_carry_no_client_headers() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let child = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request ended early");
                head.extend_from_slice(&buf[..n]);
            }
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                .await
                .unwrap();
            String::from_utf8_lossy(&head).to_ascii_lowercase()
        });
        let response = Upstream::new()
            .send(
                Method::POST,
                port,
                "/v1/chat/completions",
                Bytes::from_static(b"{}"),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let head = child.await.unwrap();
        assert!(
            head.starts_with("post /v1/chat/completions http/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("content-type: application/json"), "{head}");
        for absent in [
            "x-contextpilot",
            "authorization",
            "x-conversation-id",
            "cookie",
        ] {
            assert!(!head.contains(absent), "{absent} in {head}");
        }
    }

    #[test]
    fn prompt_keys_follow_prompt_order() {
        let chat = serde_json::json!({"messages": [{"role": "system", "content": "docs"}, {"role": "user", "content": "q"}]});
        let key = prompt_key("/v1/chat/completions", &chat);
        // serde_json orders object keys; only consistency matters here.
        assert!(
            key.starts_with("[{\"content\":\"docs\",\"role\":\"system\"}"),
            "{key}"
        );
        let with_tools = serde_json::json!({"tools": [{"type": "function"}], "messages": []});
        assert!(prompt_key("/v1/chat/completions", &with_tools).starts_with("[{\"type\""));
        assert_eq!(
            prompt_key("/completion", &serde_json::json!({"prompt": "abc"})),
            "abc"
        );
        assert_eq!(
            prompt_key("/v1/completions", &serde_json::json!({"prompt": [1, 2]})),
            "[1,2]"
        );
    }

    #[test]
    fn validation_messages() {
        assert!(validate(
            "/v1/chat/completions",
            &serde_json::json!({"messages": [{}]})
        )
        .is_ok());
        assert_eq!(
            validate(
                "/v1/chat/completions",
                &serde_json::json!({"messages": "hi"})
            )
            .unwrap_err(),
            "`messages` must be an array of messages"
        );
        assert!(validate("/v1/chat/completions", &serde_json::json!({})).is_err());
        assert!(validate("/v1/completions", &serde_json::json!({"prompt": "x"})).is_ok());
        assert!(validate("/completion", &serde_json::json!({"prompt": 5})).is_err());
    }
}
