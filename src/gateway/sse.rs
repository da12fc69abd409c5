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
    /// How much of `buffer` has been searched for a separator in vain. A
    /// long event arriving in many chunks is then searched once, not once
    /// per chunk from its start (quadratic in its length).
    searched: usize,
}

impl SseSplitter {
    /// Feeds bytes; returns the `data` of every event completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        loop {
            // A separator (at most 4 bytes) may straddle the old end.
            let from = self.searched.saturating_sub(3);
            let Some((end, sep)) = find_event_end(&self.buffer[from..]) else {
                self.searched = self.buffer.len();
                break;
            };
            let end = from + end;
            self.searched = 0;
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

/// Any bytes give events or nothing, never a panic; how the stream is cut
/// into chunks never changes what is observed.
#[cfg(test)]
mod properties {
    use super::*;
    use crate::testing;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;
    use serde_json::json;

    /// One event of a generated stream.
    #[derive(Debug, Clone)]
    enum Event {
        /// `choices[0].delta.content`.
        Chat(String),
        /// `choices[0].delta.reasoning_content`.
        Reasoning(String),
        /// `choices[0].text`.
        Completion(String),
        /// A native `/completion` event.
        Native {
            content: String,
            stop: bool,
        },
        /// A native event whose JSON is spread over two `data:` lines.
        TwoLines(String),
        Usage(u64),
        Timings(u64),
        /// `{"error": value}`.
        Error(Value),
        Done,
        /// A chat event cut short: its JSON does not parse.
        Broken(String, u64),
        /// A `:` comment line, no data.
        Comment(String),
    }

    impl Event {
        /// The event's lines (without their ends).
        fn lines(&self, space: bool) -> Vec<String> {
            let data = |json: String| format!("data:{}{json}", if space { " " } else { "" });
            match self {
                Event::Chat(s) => vec![data(
                    json!({"choices": [{"delta": {"content": s}}]}).to_string(),
                )],
                Event::Reasoning(s) => vec![data(
                    json!({"choices": [{"delta": {"reasoning_content": s}}]}).to_string(),
                )],
                Event::Completion(s) => vec![data(json!({"choices": [{"text": s}]}).to_string())],
                Event::Native { content, stop } => {
                    vec![data(json!({"content": content, "stop": stop}).to_string())]
                }
                Event::TwoLines(s) => vec![
                    data("{\"content\":".to_string()),
                    data(format!("{}}}", json!(s))),
                ],
                Event::Usage(n) => vec![data(
                    json!({"choices": [], "usage": {"prompt_tokens": n}}).to_string(),
                )],
                Event::Timings(n) => vec![data(
                    json!({"timings": {"cache_n": n}, "tokens_predicted": n}).to_string(),
                )],
                Event::Error(value) => vec![data(json!({ "error": value }).to_string())],
                Event::Done => vec![data("[DONE]".to_string())],
                Event::Broken(s, cut) => {
                    let full = json!({"choices": [{"delta": {"content": s}}]}).to_string();
                    // Any proper prefix of an object's text is not JSON.
                    let mut end = testing::fit(*cut, full.len() - 1);
                    while !full.is_char_boundary(end) {
                        end -= 1;
                    }
                    vec![data(full[..end].to_string())]
                }
                Event::Comment(s) => vec![format!(":{}", s.replace(['\r', '\n'], " "))],
            }
        }

        /// The generated text this event carries.
        fn piece(&self) -> Option<&str> {
            match self {
                Event::Chat(s) | Event::Reasoning(s) | Event::Completion(s) => Some(s),
                Event::Native { content, .. } | Event::TwoLines(content) => Some(content),
                _ => None,
            }
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            // Quarters: serde_json reads these back exactly (not every f64).
            any::<i32>().prop_map(|i| json!(f64::from(i) / 4.0)),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(Value::from),
                vec(("message|code|[a-z]{1,4}", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn event() -> impl Strategy<Value = Event> {
        let text = || ".{0,16}";
        prop_oneof![
            3 => text().prop_map(Event::Chat),
            1 => text().prop_map(Event::Reasoning),
            1 => text().prop_map(Event::Completion),
            1 => (text(), any::<bool>())
                .prop_map(|(content, stop)| Event::Native { content, stop }),
            1 => text().prop_map(Event::TwoLines),
            1 => any::<u64>().prop_map(Event::Usage),
            1 => any::<u64>().prop_map(Event::Timings),
            1 => json_value().prop_map(Event::Error),
            1 => ".{0,16}".prop_map(|m| Event::Error(json!({"message": m, "code": 500}))),
            1 => Just(Event::Done),
            1 => (text(), any::<u64>()).prop_map(|(s, cut)| Event::Broken(s, cut)),
            1 => text().prop_map(Event::Comment),
        ]
    }

    /// A stream of events, each with its own line ends (LF or CRLF) and
    /// `data:` with or without a space.
    fn stream() -> impl Strategy<Value = (Vec<Event>, Vec<u8>)> {
        vec((event(), any::<bool>(), any::<bool>()), 0..16).prop_map(|events| {
            let mut bytes = Vec::new();
            for (event, crlf, space) in &events {
                let end = if *crlf { "\r\n" } else { "\n" };
                for line in event.lines(*space) {
                    bytes.extend_from_slice(line.as_bytes());
                    bytes.extend_from_slice(end.as_bytes());
                }
                bytes.extend_from_slice(end.as_bytes());
            }
            (events.into_iter().map(|(e, _, _)| e).collect(), bytes)
        })
    }

    /// Cut points, as fractions of the length (see `testing::fit`).
    fn cuts() -> impl Strategy<Value = Vec<u64>> {
        vec(any::<u64>(), 0..12)
    }

    fn chunks<'a>(bytes: &'a [u8], cuts: &[u64]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|&c| testing::fit(c, bytes.len())).collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
    }

    /// Feeds the chunks; returns the observer and how many feeds said
    /// "first token".
    fn observe(chunks: &[&[u8]]) -> (StreamObserver, usize) {
        let mut observer = StreamObserver::new(true);
        let firsts = chunks.iter().filter(|c| observer.feed(c)).count();
        (observer, firsts)
    }

    /// Bytes made mostly of what SSE is made of, and any byte at all.
    fn sse_ish_bytes() -> impl Strategy<Value = Vec<u8>> {
        const TOKENS: &[&str] = &[
            "data:",
            "data: ",
            "\n",
            "\r\n",
            "\n\n",
            "\r\n\r\n",
            "\r",
            ": ping",
            "[DONE]",
            "{\"error\":",
            "{\"error\":{\"message\":\"x\"}}",
            "{\"content\":\"a\"}",
            "{\"choices\":[{\"delta\":{\"content\":\"b\"}}]}",
            "{",
            "}",
            "\"",
            "é",
        ];
        const INVALID_UTF8: &[&[u8]] = &[&[0x80], &[0xc3], &[0xff, 0xfe], &[0xed, 0xa0, 0x80]];
        let piece = prop_oneof![
            select(TOKENS).prop_map(|t| t.as_bytes().to_vec()),
            vec(any::<u8>(), 1..6),
            // Invalid UTF-8: a lone continuation byte, a cut two-byte
            // character, bytes never valid.
            select(INVALID_UTF8).prop_map(<[u8]>::to_vec),
        ];
        vec(piece, 0..48).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #![proptest_config(testing::config(256))]

        /// A generated stream, cut anywhere: the observer sees exactly what
        /// the events say, and one chunk reports the first token.
        #[test]
        fn observer_sees_what_the_events_say((events, bytes) in stream(), cuts in cuts()) {
            let (observer, firsts) = observe(&chunks(&bytes, &cuts));
            let text: String = events.iter().filter_map(Event::piece).collect();
            prop_assert_eq!(observer.saw_token, !text.is_empty());
            prop_assert_eq!(firsts, usize::from(!text.is_empty()));
            prop_assert_eq!(observer.text.as_deref(), Some(text.as_str()));
            prop_assert_eq!(observer.saw_done, events.iter().any(|e| matches!(e, Event::Done)));
            let stop = events
                .iter()
                .any(|e| matches!(e, Event::Native { stop: true, .. }));
            prop_assert_eq!(observer.saw_stop, stop);
            let error = events.iter().rev().find_map(|e| match e {
                Event::Error(v) => Some(
                    v.get("message")
                        .and_then(Value::as_str)
                        .map_or_else(|| v.to_string(), str::to_string),
                ),
                _ => None,
            });
            prop_assert_eq!(observer.error, error);
            let usage = events.iter().rev().find_map(|e| match e {
                Event::Usage(n) => Some(json!({"prompt_tokens": n})),
                _ => None,
            });
            prop_assert_eq!(observer.usage, usage);
            let timings = events.iter().rev().find_map(|e| match e {
                Event::Timings(n) => Some(*n),
                _ => None,
            });
            prop_assert_eq!(observer.tokens_predicted, timings);
            prop_assert_eq!(observer.timings, timings.map(|n| json!({"cache_n": n})));
        }

        /// Any bytes, in any chunks: no panic, and the same outcome as fed
        /// whole (the splitter's leftover included).
        #[test]
        fn chunking_never_changes_the_outcome(bytes in sse_ish_bytes(), cuts in cuts()) {
            let (whole, whole_firsts) = observe(&[&bytes]);
            let (cut, firsts) = observe(&chunks(&bytes, &cuts));
            prop_assert_eq!(format!("{whole:?}"), format!("{cut:?}"));
            prop_assert_eq!(whole_firsts, usize::from(whole.saw_token));
            prop_assert_eq!(firsts, usize::from(whole.saw_token));

            let mut splitter = SseSplitter::default();
            let events: Vec<String> =
                chunks(&bytes, &cuts).iter().flat_map(|c| splitter.feed(c)).collect();
            prop_assert_eq!(events, SseSplitter::default().feed(&bytes));
        }

        /// Real streams (the fixtures) and generated ones, mutated: deleted,
        /// duplicated and swapped ranges, flipped bytes, inserted tokens.
        #[test]
        fn mutated_streams_do_not_panic(
            base in prop_oneof![
                select(&[CHAT_USAGE, CHAT, NATIVE][..]).prop_map(|s| s.as_bytes().to_vec()),
                stream().prop_map(|(_, bytes)| bytes),
            ],
            edits in testing::edits(
                &["data: ", "\n\n", "\r\n", "[DONE]", "{\"error\":", "\u{fffd}"],
                6,
            ),
            cuts in cuts(),
        ) {
            let bytes = testing::apply(base, &edits);
            let (whole, _) = observe(&[&bytes]);
            let (cut, firsts) = observe(&chunks(&bytes, &cuts));
            prop_assert_eq!(format!("{whole:?}"), format!("{cut:?}"));
            prop_assert_eq!(firsts, usize::from(cut.saw_token));
        }
    }

    proptest! {
        #![proptest_config(testing::config(16))]

        /// A line far longer than any event, arriving in small chunks, is
        /// one event once its blank line comes. (With every chunk searched
        /// from the start of the buffer, these 16 cases took 7 s in a debug
        /// build; a slower suite, not a failure, is what a regression shows.)
        #[test]
        fn huge_lines_are_one_event(
            len in 100_000usize..400_000,
            chunk in 512usize..8192,
            crlf in any::<bool>(),
        ) {
            let end = if crlf { "\r\n\r\n" } else { "\n\n" };
            let payload = "x".repeat(len);
            let stream = format!("data: {{\"content\":\"{payload}\"}}{end}data: [DONE]{end}");
            let (observer, firsts) = observe(&stream.as_bytes().chunks(chunk).collect::<Vec<_>>());
            prop_assert_eq!(firsts, 1);
            prop_assert!(observer.saw_done);
            prop_assert_eq!(observer.text.map(|t| t.len()), Some(len));
        }
    }

    const CHAT_USAGE: &str = include_str!("../../tests/fixtures/sse/chat-stream-usage.sse");
    const CHAT: &str = include_str!("../../tests/fixtures/sse/chat-stream.sse");
    const NATIVE: &str = include_str!("../../tests/fixtures/sse/completion-stream.sse");
}
