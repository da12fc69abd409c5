//! The daemon's log lines, live: every line the daemon logs (its own,
//! llama-server's, one per settled request) as the log file has it, kept in
//! a ring of the last [`KEPT`] and broadcast to whoever follows them
//! (`GET /logs?follow=1`, `contextpilotd logs -f`).
//!
//! [`LogBus::layer`] is a `tracing` layer that formats each event the way
//! the log file does and publishes it here. Nothing in this file logs
//! through `tracing`: a line about the bus would come back to the bus.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};
use tracing_subscriber::fmt::MakeWriter;

/// The tracing target of the one line per settled request
/// (`gateway::settle::request_line`), told apart from every other line.
pub const REQUEST_TARGET: &str = "request";

/// How many recent lines `GET /logs` can show.
pub const KEPT: usize = 500;

/// How many lines a follower may fall behind before it misses some (and
/// is told how many).
const FOLLOW_BACKLOG: usize = 1024;

/// One formatted line, without its newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub text: Arc<str>,
    /// One of the lines settle writes per request (target `request`).
    pub request: bool,
}

/// The ring and the broadcast; cheap to clone, all clones are one bus.
#[derive(Clone)]
pub struct LogBus {
    inner: Arc<Inner>,
}

struct Inner {
    /// Held while a line is published, and while a follower takes the
    /// lines so far and subscribes, so it sees each line exactly once.
    recent: Mutex<VecDeque<LogLine>>,
    sender: broadcast::Sender<LogLine>,
    /// Set at shutdown: followers end their streams, so open `logs -f`
    /// connections do not hold up the gateway's drain.
    closed: watch::Sender<bool>,
}

impl Default for LogBus {
    fn default() -> Self {
        LogBus::new()
    }
}

impl LogBus {
    pub fn new() -> LogBus {
        LogBus {
            inner: Arc::new(Inner {
                recent: Mutex::new(VecDeque::with_capacity(KEPT)),
                sender: broadcast::channel(FOLLOW_BACKLOG).0,
                closed: watch::Sender::new(false),
            }),
        }
    }

    /// Adds `text` (one or more lines) to the ring and sends each line to
    /// the followers. Blank lines are left out.
    pub fn publish(&self, text: &str, request: bool) {
        let mut recent = crate::sync::lock(&self.inner.recent);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let line = LogLine {
                text: line.into(),
                request,
            };
            if recent.len() == KEPT {
                recent.pop_front();
            }
            recent.push_back(line.clone());
            // No receiver is not an error: nobody follows.
            let _ = self.inner.sender.send(line);
        }
    }

    /// The kept lines, oldest first; with `requests_only`, request lines.
    pub fn recent(&self, requests_only: bool) -> Vec<LogLine> {
        crate::sync::lock(&self.inner.recent)
            .iter()
            .filter(|l| l.request || !requests_only)
            .cloned()
            .collect()
    }

    /// The kept lines and a receiver of every line after them.
    pub fn follow(&self, requests_only: bool) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        let recent = crate::sync::lock(&self.inner.recent);
        let receiver = self.inner.sender.subscribe();
        let lines = recent
            .iter()
            .filter(|l| l.request || !requests_only)
            .cloned()
            .collect();
        (lines, receiver)
    }

    /// Ends every follower's stream, now and from now on.
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
    }

    /// Resolves once [`LogBus::close`] was called.
    pub async fn closed(&self) {
        let mut closed = self.inner.closed.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = closed.wait_for(|c| *c).await;
    }

    /// A `tracing` layer that publishes every event here, formatted as the
    /// log file formats it (no colour).
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(self.clone())
    }
}

/// The writer the formatting layer gets for one event: the fmt layer
/// writes each formatted event whole, then drops its writer, which is when
/// the line is published.
pub struct EventWriter {
    bus: LogBus,
    request: bool,
    buffer: Vec<u8>,
}

impl Write for EventWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if !self.buffer.is_empty() {
            self.bus
                .publish(&String::from_utf8_lossy(&self.buffer), self.request);
        }
    }
}

impl<'a> MakeWriter<'a> for LogBus {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            bus: self.clone(),
            request: false,
            buffer: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> EventWriter {
        EventWriter {
            bus: self.clone(),
            request: meta.target() == REQUEST_TARGET,
            buffer: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn the_ring_keeps_the_last_lines_and_tells_request_lines_apart() {
        let bus = LogBus::new();
        for i in 0..KEPT + 10 {
            bus.publish(&format!("line {i}\n"), i % 2 == 0);
        }
        let all = bus.recent(false);
        assert_eq!(all.len(), KEPT);
        assert_eq!(&*all[0].text, "line 10");
        assert_eq!(&*all[KEPT - 1].text, format!("line {}", KEPT + 9));
        let requests = bus.recent(true);
        assert_eq!(requests.len(), KEPT / 2);
        assert!(requests.iter().all(|l| l.request));
        // Several lines in one event are several lines; blank ones none.
        bus.publish("first\n\n  \nsecond\n", false);
        let last: Vec<String> = bus.recent(false)[KEPT - 2..]
            .iter()
            .map(|l| l.text.to_string())
            .collect();
        assert_eq!(last, ["first", "second"]);
    }

    #[tokio::test]
    async fn a_follower_gets_the_kept_lines_then_each_new_line_once() {
        let bus = LogBus::new();
        bus.publish("before", true);
        let (kept, mut live) = bus.follow(false);
        assert_eq!(kept.len(), 1);
        bus.publish("after", false);
        let line = live.recv().await.unwrap();
        assert_eq!(&*line.text, "after");
        assert!(!line.request);
        assert!(live.try_recv().is_err(), "nothing twice");
    }

    #[tokio::test]
    async fn close_resolves_closed() {
        let bus = LogBus::new();
        let waiting = tokio::spawn({
            let bus = bus.clone();
            async move { bus.closed().await }
        });
        bus.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("closed resolves after close")
            .unwrap();
        // And at once for a later caller.
        bus.closed().await;
    }

    #[test]
    fn the_layer_publishes_events_as_the_log_file_formats_them() {
        let bus = LogBus::new();
        let subscriber = tracing_subscriber::registry().with(bus.layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "llama_server", "llama-server[7]: low memory");
            tracing::info!(target: "request", "POST /v1/chat/completions status=200");
        });
        let lines = bus.recent(false);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0]
                .text
                .contains(" WARN llama_server: llama-server[7]: low memory"),
            "{lines:?}"
        );
        assert!(!lines[0].request);
        assert!(
            lines[1]
                .text
                .ends_with(" INFO request: POST /v1/chat/completions status=200"),
            "{lines:?}"
        );
        assert!(lines[1].request);
        assert!(!lines[1].text.contains('\x1b'), "no colour");
        assert_eq!(bus.recent(true).len(), 1);
    }
}
