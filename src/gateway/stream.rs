//! A streamed answer: every chunk goes to the client as it arrives, and a
//! copy to `sse::StreamObserver` for the record. The relay runs in a task of
//! its own that owns the request's ticket and slot lease; it frees the slot
//! the moment the stream ends, then settles. `StreamTasks` counts these
//! tasks, so shutdown flushes the meter only after the last one settled.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::settle::{Outcome, Ticket};
use super::sse::StreamObserver;
use super::{Body, ChannelBody};
use crate::meter::round2;
use crate::slots::SlotLease;

/// A stream client that takes no data for this long is treated as gone, so
/// it cannot hold a slot forever.
const STALLED_CLIENT: Duration = Duration::from_secs(60);

/// How the relay loop ended.
struct Relayed {
    ttft_ms: Option<f64>,
    /// The child's stream broke, and why.
    cut: Option<String>,
    /// The client went away (or stopped reading) before the whole answer.
    client_gone: bool,
}

/// Starts relaying a stream whose first chunk is `first`; the response
/// carries the rest as it comes.
pub(super) fn relay(
    ticket: Ticket,
    lease: SlotLease,
    first: Bytes,
    incoming: Incoming,
) -> Response<Body> {
    let (tx, body) = ChannelBody::new(64);
    let gateway = ticket.gateway().clone();
    let openai = ticket.path().starts_with("/v1/");
    // Dropped last, after the task has settled the request.
    let in_flight = gateway.streams.enter();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let mut observer = StreamObserver::new(gateway.meter.log_prompts);
        let relayed = pump(&ticket, &tx, &mut observer, first, incoming, openai).await;
        // The upstream request is stopped (`incoming` is gone); free the
        // slot before anything else.
        drop(lease);
        let error = close(&tx, &observer, &relayed, openai);
        ticket.settle(Outcome {
            status: if relayed.client_gone { 499 } else { 200 },
            timings: observer.timings.take(),
            usage: observer.usage.take(),
            error,
            ttft_ms: relayed.ttft_ms,
            completion: observer.text.take(),
            tokens_evaluated: observer.tokens_evaluated,
            tokens_predicted: observer.tokens_predicted,
        });
    });
    let mut response = Response::new(body.boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Forwards chunks until the child's stream ends, breaks, or the client
/// goes away.
async fn pump(
    ticket: &Ticket,
    tx: &mpsc::Sender<Bytes>,
    observer: &mut StreamObserver,
    first: Bytes,
    mut incoming: Incoming,
    openai: bool,
) -> Relayed {
    let arrived = ticket.arrived();
    let mut relayed = Relayed {
        ttft_ms: None,
        cut: None,
        client_gone: false,
    };
    let mut chunk = Some(first);
    // The whole answer reached the client ([DONE], or the native final
    // event): one that closes its end now has not gone away.
    let mut delivered = false;
    loop {
        let data = match chunk.take() {
            Some(data) => data,
            None => {
                let frame = tokio::select! {
                    frame = incoming.frame() => frame,
                    // Notice a client that left while the child is quiet
                    // (long prefill), not only at the next chunk.
                    _ = tx.closed() => {
                        relayed.client_gone = true;
                        break;
                    }
                };
                match frame {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => data,
                        Err(_) => continue, // trailers
                    },
                    Some(Err(e)) => {
                        relayed.cut = Some(e.to_string());
                        break;
                    }
                    None => break,
                }
            }
        };
        // Forward first (a `Bytes` clone is a reference count), then read
        // the copy.
        let sent = tokio::time::timeout(STALLED_CLIENT, tx.send(data.clone())).await;
        if observer.feed(&data) {
            relayed.ttft_ms = Some(round2(arrived.elapsed().as_secs_f64() * 1000.0));
        }
        if !matches!(sent, Ok(Ok(()))) {
            // Gone, or not reading for so long that holding the slot any
            // longer would starve everyone else.
            relayed.client_gone = true;
            break;
        }
        delivered = if openai {
            observer.saw_done
        } else {
            observer.timings.is_some()
        };
    }
    if delivered {
        relayed.client_gone = false;
    }
    relayed
}

/// Ends the client's stream the way clients expect after an error, and
/// returns the error for the record.
fn close(
    tx: &mpsc::Sender<Bytes>,
    observer: &StreamObserver,
    relayed: &Relayed,
    openai: bool,
) -> Option<String> {
    if relayed.client_gone {
        return Some("the client went away (or stopped reading) during the stream".to_string());
    }
    if let Some(child_error) = observer.error.clone() {
        // llama-server reported an error in the stream and ended it without
        // [DONE]: its words, then the end marker clients expect.
        if openai && !observer.saw_done {
            let _ = tx.try_send(Bytes::from_static(b"data: [DONE]\n\n"));
        }
        return Some(child_error);
    }
    let why = relayed.cut.clone().or_else(|| {
        (openai && !observer.saw_done).then(|| "the stream ended without [DONE]".to_string())
    })?;
    let error = ApiError::new(
        StatusCode::BAD_GATEWAY,
        "server_error",
        format!("llama-server stopped during the response ({why}); the answer is incomplete"),
    );
    let mut tail = format!("data: {}\n\n", error.body());
    if openai {
        tail.push_str("data: [DONE]\n\n");
    }
    let _ = tx.try_send(Bytes::from(tail));
    Some(error.message)
}
