//! The daemon's HTTP front door on `[server] listen`.
//!
//! Today it serves the daemon's own `GET /health` and `GET /status`; the
//! OpenAI-compatible `/v1` routes join them here. Every error is an
//! OpenAI-shaped JSON body `{"error": {"message", "type", "code"}}`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::status::StaticStatus;
use crate::supervisor::process::OutputTail;
use crate::supervisor::{State, SupervisorView};

pub type Body = Full<Bytes>;

/// What request handlers can see.
pub struct Gateway {
    pub started: Instant,
    pub status: StaticStatus,
    pub supervisor: watch::Receiver<SupervisorView>,
    pub tail: OutputTail,
    pub api_key: Option<String>,
}

impl Gateway {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path();
        if path != "/health" && !self.authorized(&request) {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send \"Authorization: Bearer <key>\"",
                "authentication_error",
            );
        }
        let method = request.method();
        match (path, method) {
            ("/health", &Method::GET) => self.health(),
            ("/status", &Method::GET) => json(StatusCode::OK, &self.status_document()),
            ("/health" | "/status", _) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{method} is not allowed on {path}; use GET"),
                "invalid_request_error",
            ),
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

    fn health(&self) -> Response<Body> {
        let state = self.supervisor.borrow().state;
        if state == State::Ready {
            json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
        } else {
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("llama-server is not ready ({})", state.as_str()),
                "unavailable_error",
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }

    pub fn status_document(&self) -> crate::status::Status {
        let view = self.supervisor.borrow().clone();
        self.status
            .snapshot(self.started.elapsed().as_secs(), &view, self.tail.lines())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An OpenAI-shaped error response.
pub fn error(status: StatusCode, message: &str, kind: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"error": {"message": message, "type": kind, "code": status.as_u16()}}),
    )
}

/// Serves `listener` until `shutdown` resolves, then stops accepting and
/// gives open connections up to `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(true);
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
                let gateway = gateway.clone();
                let service = service_fn(move |request| {
                    let gateway = gateway.clone();
                    async move { Ok::<_, Infallible>(gateway.handle(request).await) }
                });
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
