//! The child as the gateway sees it: waiting until it is ready, the pooled
//! HTTP client to it, whether it is gone, and the llama.cpp routes passed
//! through unmetered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde_json::Value;

use super::error::ApiError;
use super::prepare::read_body;
use super::{full, Body, Gateway};
use crate::models::Engine;
use crate::slots::ReservePolicy;
use crate::supervisor::process::ChildKey;
use crate::supervisor::State;

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

    /// One request to the child, built from scratch: no client header
    /// reaches llama-server, and the child's own key goes with it.
    pub(super) async fn send(
        &self,
        method: Method,
        target: &Target,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", target.base))
            .header(CONTENT_TYPE, "application/json");
        if let Some(auth) = &target.auth {
            request = request.header(AUTHORIZATION, auth.as_str());
        }
        let request = request
            .body(Full::new(body))
            .expect("a loopback URI and fixed headers always build");
        self.client.request(request).await
    }

    /// Whether the child on `port` is gone: the probe fails outright
    /// (refused, or reset on a pooled connection). A slow answer is not
    /// death: a busy child may be slow.
    pub(super) async fn is_gone(&self, target: &Target) -> bool {
        let probe = self.send(Method::GET, target, "/health", Bytes::new());
        matches!(
            tokio::time::timeout(Duration::from_millis(500), probe).await,
            Ok(Err(_))
        )
    }
}

/// A child (or an upstream) that is ready for requests.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// The child's pid, or the upstream's number: a slot table resets
    /// when it changes, and a retry avoids the ones that failed.
    pub pid: u32,
    /// `http://host:port`, which request paths are appended to.
    pub base: String,
    /// The `Authorization` value it requires on every request: the child's
    /// own key, or the upstream's `api_key`.
    pub auth: Option<String>,
}

impl Target {
    /// The supervised child on loopback `port`.
    pub fn child(pid: u32, port: u16, key: Option<&ChildKey>) -> Target {
        Target {
            pid,
            base: format!("http://127.0.0.1:{port}"),
            auth: key.map(ChildKey::bearer),
        }
    }
}

/// Waits until the engine's child is ready (and, after failures, is none
/// of the `gone` ones); past the deadline, the 503 for the state it was
/// stuck in.
pub(super) async fn wait_ready(
    engine: &Engine,
    queue_timeout: Duration,
    gone: &[u32],
    deadline: Instant,
) -> Result<Target, ApiError> {
    let mut view = engine.supervisor.clone();
    loop {
        {
            let v = view.borrow_and_update();
            if let (State::Ready, Some(pid)) = (v.state, v.pid) {
                if !gone.contains(&pid) {
                    match (&engine.remote, v.port) {
                        (Some(remote), _) => {
                            return Ok(Target {
                                pid,
                                base: remote.base.clone(),
                                auth: remote.auth.clone(),
                            })
                        }
                        (None, Some(port)) => return Ok(Target::child(pid, port, v.key.as_ref())),
                        (None, None) => {}
                    }
                }
            }
        }
        let state = view.borrow().state;
        match tokio::time::timeout_at(deadline.into(), view.changed()).await {
            Ok(Ok(())) => continue,
            _ => {
                return Err(ApiError::not_ready(
                    &engine.described(),
                    state,
                    queue_timeout,
                ))
            }
        }
    }
}

/// llama.cpp routes passed through unmetered: `/tokenize`, `/detokenize`,
/// `/apply-template`, `/v1/embeddings`, `GET /slots`.
pub(super) async fn passthrough(
    gateway: &Arc<Gateway>,
    request: Request<Incoming>,
) -> Response<Body> {
    relay(gateway, request)
        .await
        .unwrap_or_else(ApiError::into_response)
}

async fn relay(gateway: &Gateway, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    // HEAD is answered as GET (hyper drops the body); llama-server may not know HEAD.
    let method = match request.method() {
        &Method::HEAD => Method::GET,
        other => other.clone(),
    };
    let embeddings = request.uri().path().ends_with("/embeddings");
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| request.uri().path().to_string());
    let body = read_body(request, gateway.max_body_bytes).await?;
    if method == Method::POST && serde_json::from_slice::<Value>(&body).is_err() {
        return Err(ApiError::bad_request("the request body is not valid JSON"));
    }
    // The model a JSON body names (embeddings), else the primary one.
    let named = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|b| b.get("model").and_then(Value::as_str).map(str::to_string));
    let spec = gateway.fleet.resolve(named.as_deref())?;
    let engine = gateway.fleet.acquire(&spec, None).await?;
    let deadline = Instant::now() + gateway.queue_timeout;
    let target = wait_ready(&engine, gateway.queue_timeout, &[], deadline).await?;
    // Embeddings take a slot in llama-server like a completion, so they go
    // through admission too. llama-server picks that slot itself, so the
    // lease takes the free slot worth least and forgets what it held: the
    // one llama-server's least-recently-used choice most likely takes.
    let _lease = match embeddings {
        true => {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let lease = engine
                .scheduler
                .acquire(&mut ReservePolicy, target.pid, remaining)
                .await?;
            Some(lease)
        }
        false => None,
    };
    let response = gateway
        .upstream
        .send(method, &target, &path_and_query, body)
        .await
        .map_err(|e| ApiError::upstream(format!("llama-server did not answer: {e}")))?;
    let (parts, incoming) = response.into_parts();
    let bytes = incoming
        .collect()
        .await
        .map_err(|e| ApiError::upstream(format!("llama-server stopped answering: {e}")))?
        .to_bytes();
    let mut out = Response::new(full(bytes));
    *out.status_mut() = parts.status;
    if let Some(content_type) = parts.headers.get(CONTENT_TYPE) {
        out.headers_mut().insert(CONTENT_TYPE, content_type.clone());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;

    /// The reference system's case 31, as it applies here: the request to
    /// llama-server is built from scratch, so no client header reaches it
    /// (neither `X-ContextPilot-*` nor the client's credentials); it carries
    /// the child's key instead.
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
        let key = ChildKey::generate().unwrap();
        let target = Target::child(1, port, Some(&key));
        let response = Upstream::new()
            .send(
                Method::POST,
                &target,
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
        // The only credential is the child's own key.
        let auth = format!("authorization: {}\r\n", key.bearer()).to_ascii_lowercase();
        assert!(head.contains(&auth), "{head}");
        assert_eq!(head.matches("authorization").count(), 1, "{head}");
        for absent in ["x-contextpilot", "x-conversation-id", "cookie"] {
            assert!(!head.contains(absent), "{absent} in {head}");
        }
    }
}
