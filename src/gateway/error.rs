//! The gateway's errors and their one rendering: an OpenAI-shaped JSON body
//! `{"error": {"message", "type", "code"}}`, with `Retry-After` where trying
//! again later is the answer.

use std::time::Duration;

use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};

use super::{json, Body};
use crate::models::FleetError;
use crate::slots::AdmitError;
use crate::supervisor::State;

/// An error a request gets instead of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's error `type`.
    pub kind: &'static str,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<&'static str>,
    /// OpenAI's error `code` where it names the error (`model_not_found`);
    /// otherwise the body's `code` is the HTTP status.
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            retry_after: None,
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The client's request is wrong (400).
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than max_body_bytes ({limit} bytes)"),
        )
    }

    /// The backend (`what`: [`crate::models::Engine::described`]) did not
    /// become ready within `waited` (503).
    pub fn not_ready(what: &str, state: State, waited: Duration) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            format!(
                "{what} is not ready ({}) after {}s; try again",
                state.as_str(),
                waited.as_secs()
            ),
        )
        .retry_after("5")
    }

    /// The child failed every attempt, before anything reached the client
    /// (502).
    pub fn failed_every_attempt(what: &str, why: &str) -> ApiError {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!("{what} failed the request on every attempt ({why}); see contextpilotd status"),
        )
        .retry_after("5")
    }

    /// The child did not answer a passed-through request (502).
    pub fn upstream(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_GATEWAY, "server_error", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn retry_after(mut self, seconds: &'static str) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    /// The JSON body, also sent as an SSE event when a stream breaks.
    pub fn body(&self) -> serde_json::Value {
        let mut body = error_body(self.status, &self.message, self.kind);
        if let Some(code) = self.code {
            body["error"]["code"] = code.into();
        }
        body
    }

    pub fn into_response(self) -> Response<Body> {
        let mut response = json(self.status, &self.body());
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static(seconds));
        }
        response
    }
}

impl From<AdmitError> for ApiError {
    fn from(error: AdmitError) -> ApiError {
        match error {
            AdmitError::QueueFull => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "too many requests are waiting for a slot (max_queue); try again",
            )
            .retry_after("1"),
            AdmitError::Timeout => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                "no slot came free in time (queue_timeout_s); try again",
            )
            .retry_after("5"),
        }
    }
}

impl From<FleetError> for ApiError {
    fn from(error: FleetError) -> ApiError {
        let message = error.to_string();
        match error {
            FleetError::NotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
                    .with_code("model_not_found")
            }
            FleetError::NoRoom { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                message,
            )
            .with_code("insufficient_memory")
            .retry_after("5"),
            FleetError::Unloadable { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            }
            FleetError::NoUpstreamYet { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                message,
            )
            .retry_after("2"),
            FleetError::Stopping => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                message,
            )
            .retry_after("5"),
        }
    }
}

/// An OpenAI-shaped error body.
/// Rewrites llama-server's answer to a prompt longer than a slot's context
/// (`exceed_context_size_error`, or its older wording) so that it names the
/// setting that decides the limit, `[llama] ctx_per_slot`. The child's own
/// words stay at the end. Returns whether it was such an answer.
pub fn explain_context_overflow(value: &mut serde_json::Value, ctx_per_slot: u32) -> bool {
    let Some(error) = value.get_mut("error").and_then(|e| e.as_object_mut()) else {
        return false;
    };
    let said = error
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
    let overflow = error.get("type").and_then(|t| t.as_str()) == Some("exceed_context_size_error")
        || said.contains("exceeds the available context size")
        || said.contains("larger than the max context size");
    if !overflow {
        return false;
    }
    let tokens = error
        .get("n_prompt_tokens")
        .and_then(|n| n.as_u64())
        .map_or("the prompt".to_string(), |n| {
            format!("the prompt's {n} tokens")
        });
    let limit = error
        .get("n_ctx")
        .and_then(|n| n.as_u64())
        .unwrap_or(u64::from(ctx_per_slot));
    error.insert(
        "message".into(),
        serde_json::Value::from(format!(
            "{tokens} (and the answer's) do not fit a slot's context of {limit} tokens (ctx_per_slot = {ctx_per_slot}): shorten the prompt, or raise [llama] ctx_per_slot in the configuration (fewer slots then fit the same memory); llama-server said: {said}"
        )),
    );
    true
}

pub fn error_body(status: StatusCode, message: &str, kind: &str) -> serde_json::Value {
    serde_json::json!({"error": {"message": message, "type": kind, "code": status.as_u16()}})
}

/// An OpenAI-shaped error response (`ApiError::new(..).into_response()`).
pub fn error(status: StatusCode, message: &str, kind: &'static str) -> Response<Body> {
    ApiError::new(status, kind, message).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_errors_say_when_to_come_back() {
        let full = ApiError::from(AdmitError::QueueFull);
        assert_eq!(full.status, StatusCode::TOO_MANY_REQUESTS);
        let response = full.into_response();
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        let timeout = ApiError::from(AdmitError::Timeout);
        assert_eq!(timeout.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(timeout.retry_after, Some("5"));
    }

    #[test]
    fn a_context_overflow_names_ctx_per_slot() {
        let mut value = serde_json::json!({"error": {"code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error", "n_prompt_tokens": 900, "n_ctx": 512}});
        assert!(explain_context_overflow(&mut value, 512));
        let message = value["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("the prompt's 900 tokens (and the answer's) do not fit a slot's context of 512 tokens (ctx_per_slot = 512)")
                && message.contains("raise [llama] ctx_per_slot")
                && message.ends_with("llama-server said: the request exceeds the available context size, try increasing it"),
            "{message}"
        );
        assert_eq!(value["error"]["type"], "exceed_context_size_error");
        // Older builds: the wording alone.
        let mut old = serde_json::json!({"error": {"message": "the request exceeds the available context size"}});
        assert!(explain_context_overflow(&mut old, 256));
        assert!(old["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context of 256 tokens"));
        let mut other = serde_json::json!({"error": {"message": "Invalid grammar"}});
        assert!(!explain_context_overflow(&mut other, 512));
        assert_eq!(other["error"]["message"], "Invalid grammar");
        assert!(!explain_context_overflow(
            &mut serde_json::json!({"choices": []}),
            512
        ));
    }

    #[test]
    fn the_body_is_openai_shaped() {
        let body = ApiError::bad_request("`messages` is required").body();
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "`messages` is required",
                "type": "invalid_request_error", "code": 400}})
        );
    }
}
