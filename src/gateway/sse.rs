//! Reading llama-server's server-sent events as they pass through, without
//! holding them back: the gateway forwards every chunk at once and feeds a
//! copy to a [`StreamObserver`], which picks out what the meter needs.

use serde_json::Value;

/// Splits a byte stream into SSE events. Events end with a blank line;
/// comment lines (`:` keep-alive pings) are dropped; `data:` lines of one
/// event are joined with newlines.
#[derive(Default, Debug)]
pub struct SseSplitter {
    buffer: Vec<u8>,
}

impl SseSplitter {
    /// Feeds bytes; returns the `data` of every event completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, sep)) = find_event_end(&self.buffer) {
            let raw: Vec<u8> = self.buffer.drain(..end + sep).collect();
            let text = String::from_utf8_lossy(&raw[..end]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

/// Position and length of the first blank-line separator.
fn find_event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// What the meter wants from a stream.
#[derive(Default, Debug)]
pub struct StreamObserver {
    splitter: SseSplitter,
    /// The first event that carried generated text has been seen.
    pub saw_token: bool,
    pub saw_done: bool,
    /// llama-server's final `timings`.
    pub timings: Option<Value>,
    pub usage: Option<Value>,
    /// An `error` object the child sent in the stream.
    pub error: Option<String>,
    /// A native `/completion` stream's last event has `stop: true`.
    pub saw_stop: bool,
    /// Generated text, kept only when asked to (prompt logging).
    pub text: Option<String>,
    pub tokens_predicted: Option<u64>,
    pub tokens_evaluated: Option<u64>,
}

impl StreamObserver {
    pub fn new(keep_text: bool) -> StreamObserver {
        StreamObserver {
            text: keep_text.then(String::new),
            ..StreamObserver::default()
        }
    }

    /// Feeds a chunk; returns true when this chunk carried the first token.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        let before = self.saw_token;
        for data in self.splitter.feed(bytes) {
            if data.trim() == "[DONE]" {
                self.saw_done = true;
                continue;
            }
            let Ok(event) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            self.observe(&event);
        }
        !before && self.saw_token
    }

    fn observe(&mut self, event: &Value) {
        if let Some(timings) = event.get("timings").filter(|t| t.is_object()) {
            self.timings = Some(timings.clone());
        }
        if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage.clone());
        }
        if let Some(error) = event.get("error") {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| error.to_string());
            self.error = Some(message);
        }
        if event.get("stop").and_then(Value::as_bool) == Some(true) {
            self.saw_stop = true;
        }
        for (key, slot) in [
            ("tokens_predicted", &mut self.tokens_predicted),
            ("tokens_evaluated", &mut self.tokens_evaluated),
        ] {
            if let Some(n) = event.get(key).and_then(Value::as_u64) {
                *slot = Some(n);
            }
        }
        let piece = generated_text(event);
        if let Some(piece) = piece.filter(|p| !p.is_empty()) {
            self.saw_token = true;
            if let Some(text) = self.text.as_mut() {
                text.push_str(piece);
            }
        }
    }
}

/// The generated text in one event of any of the three stream shapes:
/// chat (`choices[0].delta.content`), completions (`choices[0].text`) and
/// native (`content`).
fn generated_text(event: &Value) -> Option<&str> {
    let choice = event.get("choices").and_then(|c| c.get(0));
    choice
        .and_then(|c| c.get("delta"))
        .and_then(|d| d.get("content").or_else(|| d.get("reasoning_content")))
        .and_then(Value::as_str)
        .or_else(|| choice.and_then(|c| c.get("text")).and_then(Value::as_str))
        .or_else(|| event.get("content").and_then(Value::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT_USAGE: &str = include_str!("../../tests/fixtures/sse/chat-stream-usage.sse");
    const CHAT: &str = include_str!("../../tests/fixtures/sse/chat-stream.sse");
    const NATIVE: &str = include_str!("../../tests/fixtures/sse/completion-stream.sse");

    fn observe_in_chunks(text: &str, chunk: usize) -> StreamObserver {
        let mut observer = StreamObserver::new(true);
        let mut first_token_chunks = 0;
        for piece in text.as_bytes().chunks(chunk) {
            first_token_chunks += usize::from(observer.feed(piece));
        }
        assert_eq!(
            first_token_chunks, 1,
            "exactly one chunk carries the first token"
        );
        observer
    }

    #[test]
    fn chat_stream_with_usage_in_any_chunking() {
        for chunk in [1, 3, 64, 100_000] {
            let o = observe_in_chunks(CHAT_USAGE, chunk);
            assert!(o.saw_done && o.saw_token);
            assert_eq!(o.timings.as_ref().unwrap()["cache_n"], 34);
            assert_eq!(
                o.usage.as_ref().unwrap()["prompt_tokens_details"]["cached_tokens"],
                34
            );
            assert_eq!(o.text.as_deref(), Some("The primary colors are"));
        }
    }

    #[test]
    fn chat_stream_timings_on_the_finish_chunk() {
        let o = observe_in_chunks(CHAT, 7);
        assert!(o.saw_done);
        assert!(o.timings.is_some());
        assert!(o.usage.is_none());
    }

    #[test]
    fn native_stream_has_no_done_but_stops() {
        let o = observe_in_chunks(NATIVE, 5);
        assert!(!o.saw_done);
        assert!(o.saw_stop);
        assert!(o.timings.is_some());
    }

    #[test]
    fn comments_crlf_and_errors() {
        let mut o = StreamObserver::new(false);
        o.feed(b": ping\r\n\r\ndata: {\"error\":{\"message\":\"boom\",\"code\":500}}\r\n\r\n");
        assert_eq!(o.error.as_deref(), Some("boom"));
        assert!(!o.saw_token);
        assert!(o.text.is_none());
    }
}
