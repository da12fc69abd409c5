//! `POST /v1/batch/chat/completions`: a list of chat requests run as one
//! batch. Requests that share documents are scheduled one after another
//! (ContextPilot's clustering and schedule over their document sets), at
//! most `slots` run at once, each goes through the normal request path
//! (slot choice, reordering, metering), and the answers come back in input
//! order.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::headers::RequestOptions;
use super::prepare::read_body;
use super::request::serve_model;
use super::settle::Ticket;
use super::{error, json, ApiError, Body, Gateway};
use crate::reorder::cluster;

const PATH: &str = "/v1/chat/completions";
/// Most requests in one batch.
pub const MAX_BATCH: usize = 1024;

/// The document texts of one request (empty without `documents`).
fn document_texts(request: &Value) -> Vec<String> {
    request
        .get("documents")
        .and_then(Value::as_array)
        .map(|docs| {
            docs.iter()
                .filter_map(|d| d.as_str().or_else(|| d.get("text").and_then(Value::as_str)))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn parse(body: Value) -> Result<Vec<Value>, String> {
    let requests = match body {
        Value::Array(items) => items,
        Value::Object(mut o) => match o.remove("requests") {
            Some(Value::Array(items)) => items,
            _ => {
                return Err(
                    "send {\"requests\": [chat request, ...]} or a list of chat requests".into(),
                )
            }
        },
        _ => {
            return Err(
                "send {\"requests\": [chat request, ...]} or a list of chat requests".into(),
            )
        }
    };
    if requests.is_empty() {
        return Err("the batch is empty".into());
    }
    if requests.len() > MAX_BATCH {
        return Err(format!("a batch holds at most {MAX_BATCH} requests"));
    }
    for (i, request) in requests.iter().enumerate() {
        if !request.is_object() {
            return Err(format!("requests[{i}] must be a chat request object"));
        }
        if request.get("stream").and_then(Value::as_bool) == Some(true) {
            return Err(format!(
                "requests[{i}]: streaming is not available in a batch"
            ));
        }
    }
    Ok(requests)
}

/// The order to run the batch in: contexts sharing documents back to back.
async fn schedule(requests: &[Value]) -> Result<Vec<usize>, ApiError> {
    let contexts: Vec<Vec<String>> = requests.iter().map(document_texts).collect();
    tokio::task::spawn_blocking(move || {
        let (ids, _) = cluster::intern(&contexts);
        cluster::schedule(&cluster::build_index(&ids, cluster::DEFAULT_ALPHA)).order
    })
    .await
    .map_err(|e| ApiError::internal(format!("scheduling failed: {e}")))
}

pub(super) async fn batch(gateway: &Arc<Gateway>, request: Request<Incoming>) -> Response<Body> {
    let mut options = RequestOptions::from_headers(request.headers());
    // One conversation id cannot name many concurrent requests.
    options.conversation = None;
    let raw = match read_body(request, gateway.max_body_bytes).await {
        Ok(raw) => raw,
        Err(error) => return error.into_response(),
    };
    let mut requests = match serde_json::from_slice::<Value>(&raw)
        .map_err(|e| format!("not valid JSON: {e}"))
        .and_then(parse)
    {
        Ok(requests) => requests,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message, "invalid_request_error"),
    };

    let order = match schedule(&requests).await {
        Ok(order) => order,
        Err(error) => return error.into_response(),
    };

    // At most `slots` in flight; permits are handed out in schedule order.
    // The JoinSet aborts whatever still runs if the client goes away.
    // As many in flight as the primary model runs at once.
    let concurrency = gateway
        .fleet
        .primary()
        .map_or(1, |engine| engine.scheduler.concurrency());
    let running = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for &index in &order {
        let permit = running
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let gateway = gateway.clone();
        let options = options.clone();
        let body = std::mem::take(&mut requests[index]);
        tasks.spawn(async move {
            let _permit = permit;
            let ticket = Ticket::open(&gateway, PATH);
            let response = serve_model(ticket, PATH, &options, body).await;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let body = serde_json::from_slice::<Value>(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            (index, status, body)
        });
    }
    let mut answers = vec![Value::Null; requests.len()];
    while let Some(done) = tasks.join_next().await {
        if let Ok((index, status, body)) = done {
            answers[index] = json!({"index": index, "status_code": status, "response": body});
        }
    }
    for (index, answer) in answers.iter_mut().enumerate() {
        if answer.is_null() {
            *answer = json!({"index": index, "status_code": 500,
                "response": {"error": {"message": "the request failed inside the daemon", "type": "server_error", "code": 500}}});
        }
    }
    json(
        StatusCode::OK,
        &json!({"object": "list", "data": answers, "schedule": order}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_shapes_and_errors() {
        let one = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(parse(json!({"requests": [one.clone()]})).unwrap().len(), 1);
        assert_eq!(parse(json!([one.clone(), one.clone()])).unwrap().len(), 2);
        assert!(parse(json!({"requests": []})).is_err());
        assert!(parse(json!([1])).unwrap_err().contains("requests[0]"));
        let streaming = json!({"messages": [], "stream": true});
        assert!(parse(json!([one.clone(), streaming]))
            .unwrap_err()
            .contains("requests[1]"));
        let too_many = Value::Array(vec![one; MAX_BATCH + 1]);
        assert!(parse(too_many).unwrap_err().contains("at most"));
    }

    #[test]
    fn documents_of_both_shapes() {
        let request = json!({"documents": ["a", {"id": "x", "text": "b"}, 3]});
        assert_eq!(
            document_texts(&request),
            vec!["a".to_string(), "b".to_string()]
        );
        assert!(document_texts(&json!({})).is_empty());
    }
}
