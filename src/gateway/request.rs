//! One model request (`POST /v1/chat/completions`, `/v1/completions`,
//! native `/completion`), its three stages in order:
//!
//! 1. **prepare** (`prepare.rs`, then `reorder::prepare`): read, parse and
//!    validate the body; rewrite it (inferred mode, block dedup,
//!    `documents`, conversations) into a `Prepared` request with the plan
//!    that will choose its slot and the commits to store once answered.
//! 2. **dispatch** (`dispatch.rs`, `stream.rs`): wait for a ready child,
//!    lease a slot, forward, relay the answer whole or streamed, retry on
//!    the next child if one died before anything reached the client.
//! 3. **settle** (`settle.rs`): once, however the request ended: the slot
//!    table, the live index, the cost model and the conversation stores
//!    learn what happened, and the meter gets the record.
//!
//! The request's [`Ticket`] travels through the stages and guarantees the
//! third: it settles itself if dropped.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::Value;

use super::headers::RequestOptions;
use super::settle::{Outcome, Ticket};
use super::{dispatch, prepare, Body, Gateway};

/// A model request as it arrives over HTTP.
pub(super) async fn model_request(
    gateway: &Arc<Gateway>,
    request: Request<Incoming>,
) -> Response<Body> {
    let path = request.uri().path().to_string();
    let options = RequestOptions::from_headers(request.headers());
    let ticket = Ticket::open(gateway, &path);
    let body = match prepare::read_body(request, gateway.max_body_bytes).await {
        Ok(raw) => prepare::parse_object(&raw),
        Err(error) => {
            // The record names the status only: the body was not read.
            let reason = error.status.canonical_reason().unwrap_or("bad request");
            ticket.settle(Outcome {
                error: Some(reason.to_string()),
                ..Outcome::failed(&error)
            });
            return error.into_response();
        }
    };
    match body {
        Ok(body) => serve_model(ticket, &path, &options, body).await,
        Err(error) => ticket.fail(error),
    }
}

/// A model request whose body is a JSON object (from HTTP, or one request
/// of a batch): prepare, then dispatch, which settles.
pub(super) async fn serve_model(
    mut ticket: Ticket,
    path: &str,
    options: &RequestOptions,
    body: Value,
) -> Response<Body> {
    match prepare::prepare(&mut ticket, path, options, body).await {
        Ok(routed) => dispatch::dispatch(ticket, path, routed).await,
        Err(error) => ticket.fail(error),
    }
}
