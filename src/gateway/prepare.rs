//! Prepare, the first stage of a model request, on the gateway's side:
//! read the body (413 over `max_body_bytes`), parse and validate it (400),
//! note what the record needs, and hand it to `reorder::prepare` for the
//! rewriting. A model served by more than one backend is prepared for each
//! and routed (`models::route`) by predicted time; the others' plans are
//! kept for failover. The result is ready for dispatch.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::Request;
use serde_json::Value;

use super::error::ApiError;
use super::headers::RequestOptions;
use super::settle::Ticket;
use crate::models::{route, Engine, EngineUse};
use crate::reorder::prepare::{Hints, Prepared, CHAT_PATH};

/// Reads a request body up to `limit` bytes.
pub(super) async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::too_large(limit))
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// The body as a JSON object.
pub(super) fn parse_object(raw: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice(raw) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// Validates a model request's body, notes what its record needs, gets
/// the engine of the model it names (loading it if need be), and rewrites
/// the body for forwarding to it.
pub(super) async fn prepare(
    ticket: &mut Ticket,
    path: &str,
    options: &RequestOptions,
    mut body: Value,
) -> Result<Routed, ApiError> {
    validate(path, &body).map_err(ApiError::bad_request)?;
    let gateway = ticket.gateway().clone();
    // A name the daemon does not serve is the client's mistake, not a
    // reason to answer from another model without a word (unless
    // `[models] fallback` says so).
    let requested = match body.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(name.clone()),
        Some(_) => return Err(ApiError::bad_request("`model` must be a string")),
    };
    let spec = gateway.fleet.resolve(requested.as_deref())?;
    // Ollama's per-request keep-alive is the daemon's to act on.
    let keep_alive = super::models::keep_alive(&body)?;
    if let Some(object) = body.as_object_mut() {
        object.remove("keep_alive");
    }
    ticket.note(|facts| {
        facts.record.stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        facts.model_name = Some(
            requested
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| spec.name.clone()),
        );
        facts.request_id = ["rid", "request_id"]
            .iter()
            .find_map(|k| body.get(*k).and_then(Value::as_str))
            .map(str::to_string);
        if gateway.meter.log_prompts {
            facts.record.prompt = body.get("messages").or_else(|| body.get("prompt")).cloned();
        }
    });
    let engine = gateway.fleet.acquire(&spec, keep_alive).await?;
    let hints = || Hints {
        intercept: &options.intercept,
        client: &options.client,
        conversation: options.conversation.clone(),
    };
    let backends = gateway.fleet.backends(&spec.name);
    if backends.len() < 2 {
        let prepared = gateway
            .reorder
            .prepare(path, body, hints(), &engine.scheduler)
            .map_err(ApiError::bad_request)?;
        let prepared = adopt(ticket, engine, prepared);
        return Ok(Routed {
            prepared,
            fallbacks: Vec::new(),
            sticky_key: None,
        });
    }
    // Each backend's own plan (documents ordered for what it holds), priced
    // at its own speed; the chosen one's plan is the request's, the others
    // are kept, best first, to fail over to.
    let sticky_key = sticky_key(options, &body);
    let sticky = sticky_key.and_then(|key| gateway.fleet.routed_before(key));
    let mut plans = Vec::with_capacity(backends.len());
    for backend in &backends {
        let prepared = gateway
            .reorder
            .prepare(path, body.clone(), hints(), &backend.scheduler)
            .map_err(ApiError::bad_request)?;
        let mut offer = backend.offer(prepared.predict_ms(&backend.scheduler));
        offer.sticky = sticky.as_deref() == Some(backend.backend());
        plans.push((offer, prepared));
    }
    let offers: Vec<_> = plans.iter().map(|(o, _)| o.clone()).collect();
    let turn = gateway.fleet.next_turn();
    let (chosen, reason) = route::choose(&offers, gateway.fleet.routing(), turn);
    let backend = Arc::clone(&backends[chosen]);
    tracing::debug!(backend = backend.backend(), ?reason, "routed");
    if let Some(key) = sticky_key {
        gateway.fleet.remember_route(key, backend.backend());
    }
    let mut rest: Vec<(f64, bool, Fallback)> = Vec::with_capacity(plans.len() - 1);
    let mut chosen_plan = None;
    for (i, ((offer, prepared), engine)) in plans.into_iter().zip(&backends).enumerate() {
        if i == chosen {
            chosen_plan = Some(prepared);
        } else {
            let fallback = Fallback {
                engine: Arc::clone(engine),
                prepared,
            };
            rest.push((offer.score(), offer.healthy, fallback));
        }
    }
    // Healthy ones first, by predicted time.
    rest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.total_cmp(&b.0)));
    let fallbacks = rest.into_iter().map(|(_, _, f)| f).collect();
    let engine = if backend.remote.is_none() {
        engine
    } else {
        backend.use_now(keep_alive)
    };
    let prepared = adopt(
        ticket,
        engine,
        chosen_plan.expect("the chosen index is one of the plans"),
    );
    Ok(Routed {
        prepared,
        fallbacks,
        sticky_key,
    })
}

/// A request ready for dispatch: its plan for the backend routing chose,
/// and the plans for the model's other backends, best first, to fail over
/// to when that one fails before anything reached the client.
pub(super) struct Routed {
    pub prepared: Prepared,
    pub fallbacks: Vec<Fallback>,
    /// What routing remembers the backend by, when the request has it.
    pub sticky_key: Option<u64>,
}

/// Another backend's plan for the same request.
pub(super) struct Fallback {
    pub engine: Arc<Engine>,
    pub prepared: Prepared,
}

/// Makes `prepared`, for `engine`, the plan in force: the ticket runs on
/// that engine, and its record and commits are that plan's. Called once
/// by prepare, and again by dispatch for each failover.
pub(super) fn adopt(ticket: &mut Ticket, engine: EngineUse, mut prepared: Prepared) -> Prepared {
    let commits = std::mem::take(&mut prepared.commits);
    // An upstream is named even when it is the model's only backend.
    let routed = ticket.gateway().fleet.backends(&engine.name).len() > 1 || engine.remote.is_some();
    ticket.note(|facts| {
        facts.record.backend = routed.then(|| engine.backend().to_string());
        facts.engine = Some(engine);
        facts.commits = commits;
        facts.record.reorder = prepared.facts.reorder.take();
        facts.record.block_dedup = prepared.facts.block_dedup.take();
    });
    prepared
}

/// What keeps a request on the backend its predecessors went to: its
/// `X-Conversation-Id`, else the OpenAI `user` field, each with the
/// caller's identity.
fn sticky_key(options: &RequestOptions, body: &Value) -> Option<u64> {
    let id = options
        .conversation
        .as_deref()
        .map(|c| format!("conversation:{c}"))
        .or_else(|| {
            body.get("user")
                .and_then(Value::as_str)
                .filter(|u| !u.is_empty())
                .map(|u| format!("user:{u}"))
        })?;
    Some(crate::reorder::text_hash(&format!(
        "{}\n{id}",
        options.client
    )))
}

fn validate(path: &str, body: &Value) -> Result<(), String> {
    if path == CHAT_PATH {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validation_messages() {
        assert!(validate(CHAT_PATH, &json!({"messages": [{}]})).is_ok());
        assert_eq!(
            validate(CHAT_PATH, &json!({"messages": "hi"})).unwrap_err(),
            "`messages` must be an array of messages"
        );
        assert!(validate(CHAT_PATH, &json!({})).is_err());
        assert!(validate("/v1/completions", &json!({"prompt": "x"})).is_ok());
        assert!(validate("/completion", &json!({"prompt": 5})).is_err());
    }

    #[test]
    fn only_objects_are_request_bodies() {
        assert!(parse_object(b"{\"a\": 1}").is_ok());
        assert!(parse_object(b"[1]")
            .unwrap_err()
            .message
            .contains("JSON object"));
        assert!(parse_object(b"{")
            .unwrap_err()
            .message
            .contains("not valid JSON"));
    }
}
