//! The model routes: `GET /v1/models` (every servable model and whether it
//! is loaded), `GET /v1/models/{id}`, `GET /models/loaded` (what `ps`
//! shows), `POST /models/load` and `POST /models/unload`.

use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::error::ApiError;
use super::prepare::{parse_object, read_body};
use super::{json as respond, Body, Gateway};
use crate::config::KeepAlive;
use crate::models::ModelSpec;

/// `GET /v1/models`.
pub(super) fn list(gateway: &Gateway) -> Response<Body> {
    let data: Vec<Value> = gateway
        .fleet
        .specs()
        .iter()
        .map(|spec| model_object(gateway, spec))
        .collect();
    respond(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`.
pub(super) fn one(gateway: &Gateway, id: &str) -> Response<Body> {
    match gateway.fleet.resolve(Some(id)) {
        Ok(spec) => respond(StatusCode::OK, &model_object(gateway, &spec)),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `GET /models/loaded`.
pub(super) fn loaded(gateway: &Gateway) -> Response<Body> {
    respond(
        StatusCode::OK,
        &json!({
            "models": gateway.fleet.ps(),
            "memory_budget_bytes": gateway.fleet.budget_bytes(),
        }),
    )
}

/// `POST /models/load {"model": NAME, "keep_alive": ...}`: loads the model
/// and answers once its child is ready (or with the 503 of one that is not
/// by `queue_timeout_s`).
pub(super) async fn load(gateway: &Arc<Gateway>, request: Request<Incoming>) -> Response<Body> {
    let result = async {
        let (spec, keep_alive) = named_model(gateway, request).await?;
        let engine = gateway.fleet.load(&spec, keep_alive).await?;
        let deadline = Instant::now() + gateway.queue_timeout;
        super::upstream::wait_ready(&engine, gateway.queue_timeout, &[], deadline).await?;
        Ok::<_, ApiError>(engine.loaded_model())
    };
    match result.await {
        Ok(model) => respond(StatusCode::OK, &model),
        Err(e) => e.into_response(),
    }
}

/// `POST /models/unload {"model": NAME}`: stops its child now if idle,
/// else once its requests are done.
pub(super) async fn unload(gateway: &Arc<Gateway>, request: Request<Incoming>) -> Response<Body> {
    let result = async {
        let (spec, _) = named_model(gateway, request).await?;
        let was_loaded = gateway.fleet.unload(&spec.name).await;
        Ok::<_, ApiError>(json!({"model": spec.name, "unloaded": was_loaded}))
    };
    match result.await {
        Ok(answer) => respond(StatusCode::OK, &answer),
        Err(e) => e.into_response(),
    }
}

/// The body's `model` (required) and `keep_alive` (optional).
async fn named_model(
    gateway: &Gateway,
    request: Request<Incoming>,
) -> Result<(ModelSpec, Option<KeepAlive>), ApiError> {
    let body = parse_object(&read_body(request, gateway.max_body_bytes).await?)?;
    let name = body
        .get("model")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("`model` (a model name) is required"))?;
    let keep_alive = keep_alive(&body)?;
    let spec = gateway.fleet.resolve(Some(name))?;
    Ok((spec, keep_alive))
}

/// A request's `keep_alive` field (Ollama's), if any.
pub(super) fn keep_alive(body: &Value) -> Result<Option<KeepAlive>, ApiError> {
    match body.get("keep_alive") {
        None | Some(Value::Null) => Ok(None),
        Some(value) => KeepAlive::from_json(value)
            .map(Some)
            .map_err(ApiError::bad_request),
    }
}

fn model_object(gateway: &Gateway, spec: &ModelSpec) -> Value {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| {
            d.as_secs()
                .saturating_sub(gateway.started.elapsed().as_secs())
        })
        .unwrap_or_default();
    let mut meta = json!({
        "path": spec.path.display().to_string(),
        "aliases": spec.aliases,
        "keep_alive": spec.keep_alive.to_string(),
        "state": "unloaded",
    });
    if let Some(engine) = gateway.fleet.loaded(&spec.name) {
        let status = &engine.status;
        meta["state"] = json!(engine.supervisor.borrow().state.as_str());
        meta["architecture"] = json!(status.model.architecture);
        meta["context_length_per_slot"] = json!(status.plan.ctx_per_slot);
        meta["slots"] = json!(status.plan.slots);
        meta["size_bytes"] = json!(engine.footprint_bytes);
    } else if matches!(gateway.primary_status, super::PrimaryStatus::FrontOnly(_)) {
        // Nothing loads here: the model is as available as its upstreams.
        let backends = gateway.fleet.backends(&spec.name);
        meta["state"] = json!(super::backends_state(&backends).as_str());
        meta["backends"] = json!(backends.iter().map(|e| e.backend()).collect::<Vec<_>>());
    }
    json!({
        "id": spec.name,
        "object": "model",
        "created": created,
        "owned_by": "contextpilotd",
        "meta": meta,
    })
}
