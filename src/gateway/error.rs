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

    /// The child did not become ready within `waited` (503).
    pub fn not_ready(state: State, waited: Duration) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            format!(
                "llama-server is not ready ({}) after {}s; try again",
                state.as_str(),
                waited.as_secs()
            ),
        )
        .retry_after("5")
    }

    /// The child failed every attempt, before anything reached the client
    /// (502).
    pub fn failed_every_attempt(why: &str) -> ApiError {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!("llama-server failed the request on every attempt ({why}); see contextpilotd status"),
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
    fn the_body_is_openai_shaped() {
        let body = ApiError::bad_request("`messages` is required").body();
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "`messages` is required",
                "type": "invalid_request_error", "code": 400}})
        );
    }
}
