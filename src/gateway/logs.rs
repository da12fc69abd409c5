//! `GET /logs`: the daemon's recent log lines as plain text, one per line
//! (`logbus::KEPT` at most); `?follow=1` keeps the response open and sends
//! each new line as it is logged; `requests=1` keeps only the one line per
//! request. Behind the API key like `/status`: lines name models, paths
//! and client behaviour (never prompt text).

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use tokio::sync::{broadcast, mpsc};

use super::{error, full, Body, ChannelBody, Gateway};
use crate::logbus::{LogBus, LogLine};

/// What the query string asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Params {
    pub follow: bool,
    pub requests: bool,
}

impl Params {
    /// `follow` and `requests`, each `1`/`true`/`0`/`false` (a bare name is
    /// `1`); anything else is an error that says what is allowed.
    pub fn parse(query: Option<&str>) -> Result<Params, String> {
        let mut params = Params::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, "1"));
            let flag = match value {
                "1" | "true" => true,
                "0" | "false" => false,
                _ => {
                    return Err(format!(
                        "/logs: {key}={value} is not allowed; use {key}=1 or {key}=0"
                    ))
                }
            };
            match key {
                "follow" => params.follow = flag,
                "requests" => params.requests = flag,
                _ => {
                    return Err(format!(
                        "/logs has no parameter {key:?}; it takes follow=1 and requests=1"
                    ))
                }
            }
        }
        Ok(params)
    }
}

pub(super) fn logs(gateway: &Gateway, query: Option<&str>) -> Response<Body> {
    let params = match Params::parse(query) {
        Ok(params) => params,
        Err(message) => {
            return error(StatusCode::BAD_REQUEST, &message, "invalid_request_error");
        }
    };
    if !params.follow {
        let lines = gateway.logs.recent(params.requests);
        return text(full(Bytes::from(joined(&lines))));
    }
    let (kept, live) = gateway.logs.follow(params.requests);
    let (tx, body) = ChannelBody::new(64);
    tokio::spawn(follow(
        gateway.logs.clone(),
        kept,
        live,
        tx,
        params.requests,
    ));
    let mut response = text(body.boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // A proxy in front must pass each line on, not wait for the end.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn text(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn joined(lines: &[LogLine]) -> String {
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.text);
        text.push('\n');
    }
    text
}

/// Sends the kept lines, then every new one, until the client goes away
/// or the bus closes (shutdown).
async fn follow(
    bus: LogBus,
    kept: Vec<LogLine>,
    mut live: broadcast::Receiver<LogLine>,
    tx: mpsc::Sender<Bytes>,
    requests_only: bool,
) {
    if !kept.is_empty() && !send(&bus, &tx, joined(&kept)).await {
        return;
    }
    loop {
        let chunk = tokio::select! {
            line = live.recv() => match line {
                Ok(line) if line.request || !requests_only => {
                    let mut chunk = line.text.to_string();
                    chunk.push('\n');
                    chunk
                }
                Ok(_) => continue,
                // A reader slower than the log loses lines, and is told.
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    format!("--- contextpilotd: {n} log lines were missed here (this reader fell behind) ---\n")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tx.closed() => return,
            _ = bus.closed() => return,
        };
        if !send(&bus, &tx, chunk).await {
            return;
        }
    }
}

/// False once the client is gone or the bus closed, even while a client
/// that stopped reading holds the send up.
async fn send(bus: &LogBus, tx: &mpsc::Sender<Bytes>, chunk: String) -> bool {
    tokio::select! {
        sent = tx.send(Bytes::from(chunk)) => sent.is_ok(),
        _ = bus.closed() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::Params;

    #[test]
    fn the_query_says_follow_and_requests() {
        let p = |q| Params::parse(q).unwrap();
        assert_eq!(p(None), Params::default());
        assert_eq!(p(Some("")), Params::default());
        assert_eq!(
            p(Some("follow=1&requests=1")),
            Params {
                follow: true,
                requests: true
            }
        );
        assert_eq!(
            p(Some("follow&requests=false")),
            Params {
                follow: true,
                requests: false
            }
        );
        assert_eq!(
            p(Some("requests=true&")),
            Params {
                follow: false,
                requests: true
            }
        );
    }

    #[test]
    fn a_bad_query_is_an_error_that_says_what_is_allowed() {
        let e = Params::parse(Some("follow=yes")).unwrap_err();
        assert!(e.contains("follow=yes") && e.contains("follow=1"), "{e}");
        let e = Params::parse(Some("folow=1")).unwrap_err();
        assert!(e.contains("\"folow\"") && e.contains("follow=1"), "{e}");
    }
}
