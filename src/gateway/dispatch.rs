//! Dispatch, the middle stage of a model request: wait for a ready child,
//! lease a slot from the slot table (FIFO admission, then the prepared plan
//! picks the slot by predicted time), forward with `cache_prompt` and
//! `id_slot`, and hand the answer on: a whole answer is settled here, a
//! stream goes to `stream::relay`. A request whose backend fails before
//! anything reached the client fails over to the model's next backend,
//! when it has one, else is retried (up to twice) on the next child.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use serde_json::Value;

use super::error::ApiError;
use super::prepare::{Fallback, Routed};
use super::settle::{Outcome, Ticket};
use super::upstream::Target;
use super::{full, json, stream, Body, Gateway};
use crate::models::Engine;
use crate::reorder::prepare::Prepared;
use crate::slots::SlotLease;
use crate::supervisor::State;

/// Retries for a request nothing of which reached the client, counted
/// apart for children that died under it (each retry waits for a ready child
/// that has not) and for failures on a child that is still there (retried
/// on it). Children restarting one after another cost a request only when
/// the faults outnumber these.
const MAX_RETRIES: u32 = 2;

/// What the child did with one attempt.
enum Forwarded {
    /// A whole answer (any status).
    Whole(StatusCode, Bytes),
    /// A stream that has produced its first chunk.
    Stream(Bytes, Incoming),
    /// The child closed the connection before any byte reached the client
    /// (`refused`: it was not even listening any more).
    ChildDied { why: String, refused: bool },
}

impl Forwarded {
    fn died(why: impl ToString) -> Forwarded {
        Forwarded::ChildDied {
            why: why.to_string(),
            refused: false,
        }
    }
}

/// Runs a prepared request to its response.
pub(super) async fn dispatch(mut ticket: Ticket, path: &str, routed: Routed) -> Response<Body> {
    let gateway = ticket.gateway().clone();
    let Some(mut engine) = ticket.engine() else {
        return ticket.fail(ApiError::internal(
            "the request reached dispatch without a model",
        ));
    };
    let Routed {
        mut prepared,
        fallbacks,
        sticky_key,
    } = routed;
    let mut fallbacks = fallbacks.into_iter();
    let result_header = prepared.facts.result_header.take();
    let mut deadline = ticket.arrived() + gateway.queue_timeout;
    // Children that failed this request and are gone: a retry waits for
    // another one instead of meeting the one that is going away.
    let mut gone: Vec<u32> = Vec::new();
    // Failures on a child that is still there (a pooled connection it had
    // just closed): retried on it at once, counted apart.
    let mut hiccups = 0;
    loop {
        // A backend that went out after routing chose it (its probe, or
        // another request's failure): the next one, rather than a wait.
        if engine.supervisor.borrow().state != State::Ready {
            if let Some(next) = fallbacks.next() {
                fail_over(&mut ticket, &mut engine, &mut prepared, next, sticky_key);
                continue;
            }
        }
        let attempt = attempt(
            &gateway,
            &engine,
            &mut ticket,
            path,
            &mut prepared,
            &gone,
            deadline,
        );
        let (target, lease, forwarded) = match attempt.await {
            Ok(attempt) => attempt,
            Err(error) => return ticket.fail(error),
        };
        let response = match forwarded {
            Forwarded::Whole(status, bytes) => {
                drop(lease);
                answer_whole(ticket, status, bytes)
            }
            Forwarded::Stream(first, incoming) => stream::relay(ticket, lease, first, incoming),
            Forwarded::ChildDied { why, refused } => {
                // Nothing has reached the client: try again, on another
                // backend of the model when it has one, else on the
                // restarted child, unless this one turns out to be alive.
                drop(lease);
                // A refused connection needs no probe: nothing listens there.
                let dead = refused || gateway.upstream.is_gone(&target).await;
                if !dead {
                    hiccups += 1;
                } else {
                    // An upstream that failed is out until its prober sees
                    // it answer again.
                    if let Some(remote) = &engine.remote {
                        remote.mark_down(&why);
                    }
                    if let Some(next) = fallbacks.next() {
                        tracing::warn!(query = %ticket.query_id(), "{} failed the request ({why})", engine.backend());
                        fail_over(&mut ticket, &mut engine, &mut prepared, next, sticky_key);
                        gone.clear();
                        deadline = Instant::now() + gateway.queue_timeout;
                        continue;
                    }
                    gone.push(target.pid);
                }
                if gone.len() as u32 > MAX_RETRIES || hiccups > MAX_RETRIES {
                    return ticket.fail(ApiError::failed_every_attempt(&engine.described(), &why));
                }
                tracing::warn!(query = %ticket.query_id(), "{} failed the request ({why}); retrying", engine.described());
                ticket.note(|facts| facts.record.retried = true);
                // The retry gets a full wait of its own: a long request that
                // crashes late still deserves the restarted child.
                deadline = Instant::now() + gateway.queue_timeout;
                continue;
            }
        };
        return with_result_header(response, result_header);
    }
}

/// Moves the request to the next backend's plan: the ticket runs on it,
/// its record and commits become that plan's, and its conversation
/// follows it there.
fn fail_over(
    ticket: &mut Ticket,
    engine: &mut Arc<Engine>,
    prepared: &mut Prepared,
    next: Fallback,
    sticky_key: Option<u64>,
) {
    tracing::info!(query = %ticket.query_id(), from = engine.backend(), to = next.engine.backend(), "failing over");
    if let Some(key) = sticky_key {
        ticket
            .gateway()
            .fleet
            .remember_route(key, next.engine.backend());
    }
    *engine = Arc::clone(&next.engine);
    *prepared = super::prepare::adopt(ticket, next.engine.use_now(None), next.prepared);
    ticket.note(|facts| facts.record.retried = true);
}

/// One attempt: a ready child, a slot on it, the request forwarded.
async fn attempt(
    gateway: &Gateway,
    engine: &Engine,
    ticket: &mut Ticket,
    path: &str,
    prepared: &mut Prepared,
    gone: &[u32],
    deadline: Instant,
) -> Result<(Target, SlotLease, Forwarded), ApiError> {
    let target = super::upstream::wait_ready(engine, gateway.queue_timeout, gone, deadline).await?;
    let remaining = deadline.saturating_duration_since(Instant::now());
    let leased = prepared
        .lease(&engine.scheduler, target.pid, remaining)
        .await?;
    let lease = leased.lease;
    let wants_stream = ticket.wants_stream();
    ticket.note(|facts| {
        facts.slot = Some(lease.receipt().clone());
        if leased.reorder.is_some() {
            facts.record.reorder = leased.reorder;
        }
        facts.commits.set_conversation(leased.conversation);
    });
    let payload = match &engine.remote {
        Some(remote) if !remote.picks_slots() => {
            prepared.payload_without_slot(remote.kind == crate::config::UpstreamKind::Contextpilotd)
        }
        _ => prepared.payload(lease.id()),
    };
    let forwarded = forward(gateway, &target, path, payload, wants_stream).await;
    Ok((target, lease, forwarded))
}

async fn forward(
    gateway: &Gateway,
    target: &Target,
    path: &str,
    payload: Bytes,
    wants_stream: bool,
) -> Forwarded {
    let sent = gateway
        .upstream
        .send(Method::POST, target, path, payload)
        .await;
    let (parts, mut incoming) = match sent {
        Ok(response) => response.into_parts(),
        Err(e) => {
            return Forwarded::ChildDied {
                refused: e.is_connect(),
                why: e.to_string(),
            }
        }
    };
    let is_sse = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if wants_stream && parts.status == StatusCode::OK && is_sse {
        // Hold the response until the first chunk: a child that dies before
        // it can still be retried.
        return match incoming.frame().await {
            Some(Ok(frame)) => Forwarded::Stream(frame.into_data().unwrap_or_default(), incoming),
            Some(Err(e)) => Forwarded::died(e),
            None => Forwarded::died("the stream ended before its first event"),
        };
    }
    match incoming.collect().await {
        Ok(collected) => Forwarded::Whole(parts.status, collected.to_bytes()),
        Err(e) => Forwarded::died(e),
    }
}

/// Adds `X-ContextPilot-Result` (what inferred mode did; metadata never goes
/// into bodies).
fn with_result_header(mut response: Response<Body>, header: Option<String>) -> Response<Body> {
    if let Some(value) = header.and_then(|h| HeaderValue::from_str(&h).ok()) {
        response
            .headers_mut()
            .insert("x-contextpilot-result", value);
    }
    response
}

/// A whole (non-streamed) answer: fill `usage.prompt_tokens_details.cached_tokens`
/// from the timings, settle, respond.
fn answer_whole(ticket: Ticket, status: StatusCode, bytes: Bytes) -> Response<Body> {
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        ticket.settle(Outcome {
            status: status.as_u16(),
            error: (!status.is_success()).then(|| String::from_utf8_lossy(&bytes).into_owned()),
            ..Outcome::default()
        });
        let mut response = Response::new(full(bytes));
        *response.status_mut() = status;
        return response;
    };
    // llama-server names the model by its file path; the answer names it as
    // the client asked for it.
    if let (Some(reported), Some(name)) = (value.get_mut("model"), ticket.model_name()) {
        *reported = Value::from(name);
    }
    if !status.is_success() {
        if let Some(engine) = ticket.engine() {
            super::error::explain_context_overflow(&mut value, engine.status.plan.ctx_per_slot);
        }
    }
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
    let completion = ticket
        .gateway()
        .meter
        .log_prompts
        .then(|| {
            value
                .pointer("/choices/0/message/content")
                .or_else(|| value.pointer("/choices/0/text"))
                .or_else(|| value.get("content"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .flatten();
    let error = value
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| (!status.is_success()).then(|| format!("llama-server answered {status}")));
    ticket.settle(Outcome {
        status: status.as_u16(),
        timings,
        usage: value.get("usage").cloned(),
        error,
        completion,
        tokens_evaluated: value.get("tokens_evaluated").and_then(Value::as_u64),
        tokens_predicted: value.get("tokens_predicted").and_then(Value::as_u64),
        ..Outcome::default()
    });
    json(status, &value)
}
