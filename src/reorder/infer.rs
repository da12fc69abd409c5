//! Inferred mode: chat requests without `documents` whose system message or
//! tool results hold document lists ([`extract`] finds them).
//!
//! - Documents in the system message are put in the canonical order (first
//!   seen first, the same order requests with `documents` converge on), so
//!   requests over the same documents share a prefix.
//! - Documents of a tool result that are already in the prompt (in an earlier
//!   message) are dropped; the others are put in canonical order. A result
//!   whose documents were all sent before becomes a one-line pointer, as does
//!   a single-document tool result repeating an earlier one.
//!
//! Every rewrite is prefix-stable. The daemon remembers, per session, each
//! message as the client sent it and as it was forwarded; a later request
//! whose first messages are the same as sent before gets the forwarded
//! versions back byte-identical, and only the messages after them are
//! rewritten. What counts as "already in the prompt" is read from those
//! earlier messages only, so nothing is ever dropped that the model cannot
//! see (the reference compared rewritten with original messages, missed, and
//! replaced documents by pointers to copies that were not in the prompt).
//! A session is remembered only once llama-server has answered its request.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{json, Value};

use super::extract::{self, InterceptConfig, Source};
use super::{estimate_tokens, text_hash, Document, Registry};

/// Sessions kept, and the bytes of forwarded messages they may hold; the
/// least recently used go first.
const MAX_SESSIONS: usize = 256;
const MAX_SESSION_BYTES: usize = 128 << 20;
/// A single-document tool result shorter than this is never replaced.
const SINGLE_DOC_MIN_CHARS: usize = 100;

/// One message of a session: as the client sent it (hash) and as forwarded.
#[derive(Debug, Clone)]
struct Sent {
    original: u64,
    forwarded: Value,
    /// Identities of the documents this message holds, as forwarded.
    documents: Vec<u64>,
    /// A single-document tool result: its content hash and tool call id.
    single: Option<(u64, String)>,
    /// Serialized size of `forwarded`, for the sessions' memory bound
    /// (computed once, when the message is first forwarded).
    bytes: usize,
}

struct Session {
    messages: Arc<Vec<Sent>>,
    bytes: usize,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<u64, Session>,
    bytes: usize,
    clock: u64,
}

/// The sessions of inferred mode.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

/// One reordered or deduplicated document list, for the result header.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detail {
    pub source: String,
    pub count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_order: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reordered_order: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deduped: Option<usize>,
}

/// What inferred mode did to one request (the `X-ContextPilot-Result`
/// response header, and the record's `reorder`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub intercepted: bool,
    pub documents_reordered: bool,
    pub total_documents: usize,
    pub documents_deduplicated: usize,
    /// Documents not at their original position after reordering.
    #[serde(skip)]
    pub moved: usize,
    pub message_count: usize,
    /// Earlier messages forwarded as they were sent before.
    pub replayed_messages: usize,
    pub markers_stripped: usize,
    pub sources: SourceCounts,
    pub reorder_details: Vec<Detail>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SourceCounts {
    pub system: usize,
    pub tool_results: usize,
}

impl Report {
    /// Whether anything was found or changed (otherwise no header is sent).
    pub fn is_empty(&self) -> bool {
        self.total_documents == 0 && self.markers_stripped == 0 && self.documents_deduplicated == 0
    }
}

/// The session state to store once llama-server has answered.
pub struct Pending {
    key: u64,
    messages: Vec<Sent>,
    bytes: usize,
}

/// The identity of a session: the caller (a hash of its credentials, so two
/// users with the same opening never share one), then an explicit
/// conversation id, else the system text and the first user message.
fn session_key(client: &str, conversation: Option<&str>, messages: &[Value]) -> u64 {
    let mut parts = vec![client.to_string()];
    if let Some(id) = conversation {
        parts.push(format!("conversation:{id}"));
    } else {
        for message in messages.iter().take(5) {
            let role = message.get("role").and_then(Value::as_str).unwrap_or("");
            let text = content_text(message);
            match role {
                "system" | "developer" => parts.push(text.chars().take(500).collect()),
                "user" => {
                    parts.push(text);
                    break;
                }
                _ => {}
            }
        }
        if parts.len() == 1 {
            parts.extend(messages.iter().take(2).map(Value::to_string));
        }
    }
    text_hash(&parts.join("\u{0}"))
}

fn content_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn message_hash(message: &Value) -> u64 {
    text_hash(&message.to_string())
}

fn is_tool(message: &Value) -> bool {
    matches!(
        message.get("role").and_then(Value::as_str),
        Some("tool" | "toolResult")
    )
}

/// Canonical order of documents (by their first-seen rank), stable.
fn canonical(registry: &Registry, identities: &[u64], texts: &[&str]) -> Vec<usize> {
    let docs: Vec<Document> = identities
        .iter()
        .zip(texts)
        .map(|(&hash, text)| Document {
            id: None,
            text: String::new(),
            hash,
            tokens: estimate_tokens(text),
        })
        .collect();
    let ranks = registry.observe(&docs).unwrap_or_default();
    let mut order: Vec<usize> = (0..identities.len()).collect();
    if ranks.len() == order.len() {
        order.sort_by_key(|&i| ranks[i]);
    }
    order
}

impl Sessions {
    /// Rewrites `body` (an OpenAI chat request without `documents`) in place.
    pub fn rewrite(
        &self,
        body: &mut Value,
        config: &InterceptConfig,
        registry: &Registry,
        client: &str,
        conversation: Option<&str>,
    ) -> (Report, Option<Pending>) {
        let mut report = Report {
            markers_stripped: extract::strip_untrusted_markers(body),
            ..Report::default()
        };
        if !config.enabled {
            return (report, None);
        }
        let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) else {
            return (report, None);
        };
        report.message_count = messages.len();
        let originals: Vec<u64> = messages.iter().map(message_hash).collect();
        let key = session_key(client, conversation, messages);

        // Replay the longest run of messages sent exactly as before.
        let earlier: Option<Arc<Vec<Sent>>> = {
            let mut inner = crate::sync::lock(&self.inner);
            inner.clock += 1;
            let clock = inner.clock;
            inner.map.get_mut(&key).map(|session| {
                session.last_used = clock;
                session.messages.clone()
            })
        };
        let mut sent: Vec<Sent> = Vec::with_capacity(messages.len());
        for ((message, original), earlier) in messages
            .iter_mut()
            .zip(&originals)
            .zip(earlier.iter().flat_map(|e| e.iter()))
        {
            if *original != earlier.original {
                break;
            }
            *message = earlier.forwarded.clone();
            sent.push(earlier.clone());
        }
        let replayed = sent.len();
        report.replayed_messages = replayed;
        let mut seen: HashSet<u64> = sent
            .iter()
            .flat_map(|s| s.documents.iter().copied())
            .collect();
        let mut seen_single: HashMap<u64, String> =
            sent.iter().filter_map(|s| s.single.clone()).collect();

        let mut documents_of: HashMap<usize, Vec<u64>> = HashMap::new();
        let found = extract::find_documents(body, config);
        let mut multi_doc_messages: HashSet<usize> = HashSet::new();
        for item in found {
            let location = item.location;
            if location.top_level_system {
                continue;
            }
            multi_doc_messages.insert(location.message);
            if location.message < replayed {
                continue;
            }
            let e = &item.extraction;
            let texts: Vec<&str> = e.identities().iter().map(String::as_str).collect();
            // Order by identity; drop as a duplicate only what is the same
            // text in the prompt (an XML item with other attributes is not).
            let identities: Vec<u64> = texts.iter().map(|t| text_hash(t)).collect();
            let hashes: Vec<u64> = e.contents().iter().map(|t| text_hash(t)).collect();
            let n = hashes.len();
            report.total_documents += n;
            let (source, keep) = match item.source {
                Source::System => {
                    report.sources.system += n;
                    ("system".to_string(), (0..n).collect::<Vec<_>>())
                }
                Source::ToolResult => {
                    report.sources.tool_results += n;
                    let mut within = HashSet::new();
                    let keep: Vec<usize> = (0..n)
                        .filter(|&i| !seen.contains(&hashes[i]) && within.insert(hashes[i]))
                        .collect();
                    (format!("tool_result[{}]", location.message), keep)
                }
            };
            let deduped = n - keep.len();
            report.documents_deduplicated += deduped;
            let new_text = if keep.is_empty() {
                let chars: usize = texts.iter().map(|t| t.chars().count()).sum();
                report.reorder_details.push(Detail {
                    source,
                    count: n,
                    original_order: None,
                    reordered_order: None,
                    deduped: Some(deduped),
                });
                Some(format!(
                    "[All {n} documents identical to a previous tool result ({chars} chars). \
                     Refer to the earlier result above.]"
                ))
            } else {
                let kept_hashes: Vec<u64> = keep.iter().map(|&i| identities[i]).collect();
                let kept_texts: Vec<&str> = keep.iter().map(|&i| texts[i]).collect();
                let order: Vec<usize> = canonical(registry, &kept_hashes, &kept_texts)
                    .into_iter()
                    .map(|k| keep[k])
                    .collect();
                let changed = order.iter().enumerate().any(|(p, &i)| p != i) || deduped > 0;
                if changed {
                    let moved = order.iter().enumerate().filter(|(p, &i)| *p != i).count();
                    report.moved += moved;
                    report.documents_reordered |= moved > 0;
                    report.reorder_details.push(Detail {
                        source,
                        count: n,
                        original_order: Some(keep.clone()),
                        reordered_order: Some(order.clone()),
                        deduped: (deduped > 0).then_some(deduped),
                    });
                    e.rebuild(&order)
                } else {
                    None
                }
            };
            if let Some(text) = new_text {
                extract::replace_text(body, &location, text);
            }
            seen.extend(hashes.iter().copied());
            documents_of
                .entry(location.message)
                .or_default()
                .extend(hashes);
        }

        // Single-document tool results repeating an earlier one, and the
        // session record of every message past the replayed ones.
        let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) else {
            return (report, None);
        };
        for (i, message) in messages.iter_mut().enumerate().skip(replayed) {
            let mut single = None;
            if is_tool(message) && !multi_doc_messages.contains(&i) {
                if let Some(Value::String(content)) = message.get("content") {
                    let stripped = content.trim();
                    if stripped.chars().count() >= SINGLE_DOC_MIN_CHARS {
                        let hash = text_hash(stripped);
                        let call_id = message
                            .get("tool_call_id")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string();
                        match seen_single.get(&hash) {
                            Some(earlier) if *earlier != call_id => {
                                message["content"] = json!(format!(
                                    "[Duplicate content — identical to a previous tool result \
                                     ({earlier}). Refer to the earlier result above.]"
                                ));
                                report.documents_deduplicated += 1;
                            }
                            _ => {
                                seen_single.insert(hash, call_id.clone());
                                single = Some((hash, call_id));
                            }
                        }
                    }
                }
            }
            sent.push(Sent {
                original: originals[i],
                bytes: message.to_string().len(),
                forwarded: message.clone(),
                documents: documents_of.remove(&i).unwrap_or_default(),
                single,
            });
        }
        report.intercepted = !report.is_empty();
        let bytes = sent.iter().map(|m| m.bytes).sum();
        let pending = Pending {
            key,
            messages: sent,
            bytes,
        };
        (report, Some(pending))
    }

    /// Remembers a session once its request was answered.
    pub fn commit(&self, pending: Pending) {
        let bytes = pending.bytes;
        if bytes > MAX_SESSION_BYTES {
            return;
        }
        let mut inner = crate::sync::lock(&self.inner);
        inner.clock += 1;
        let clock = inner.clock;
        if let Some(old) = inner.map.remove(&pending.key) {
            inner.bytes -= old.bytes;
        }
        while !inner.map.is_empty()
            && (inner.map.len() >= MAX_SESSIONS || inner.bytes + bytes > MAX_SESSION_BYTES)
        {
            let Some((&oldest, _)) = inner.map.iter().min_by_key(|(_, s)| s.last_used) else {
                break;
            };
            if let Some(old) = inner.map.remove(&oldest) {
                inner.bytes -= old.bytes;
            }
        }
        inner.bytes += bytes;
        inner.map.insert(
            pending.key,
            Session {
                messages: Arc::new(pending.messages),
                bytes,
                last_used: clock,
            },
        );
    }

    pub fn len(&self) -> usize {
        crate::sync::lock(&self.inner).map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xml(docs: &[&str]) -> String {
        let items: Vec<String> = docs
            .iter()
            .map(|d| format!("<document>{d}</document>"))
            .collect();
        format!("<documents>\n{}\n</documents>", items.join("\n"))
    }

    fn chat(first_user: &str, tools: &[&[&str]]) -> Value {
        let mut messages = vec![
            json!({"role": "system", "content": "You are a helpful agent."}),
            json!({"role": "user", "content": first_user}),
        ];
        for (k, docs) in tools.iter().enumerate() {
            messages.push(json!({"role": "assistant", "content": null,
                "tool_calls": [{"id": format!("call_{k}"), "type": "function",
                                "function": {"name": "search", "arguments": "{}"}}]}));
            messages.push(
                json!({"role": "tool", "tool_call_id": format!("call_{k}"), "content": xml(docs)}),
            );
        }
        json!({"messages": messages})
    }

    fn run(sessions: &Sessions, registry: &Registry, body: &mut Value) -> Report {
        let (report, pending) =
            sessions.rewrite(body, &InterceptConfig::default(), registry, "client", None);
        if let Some(p) = pending {
            sessions.commit(p);
        }
        report
    }

    fn tool_docs(body: &Value, index: usize) -> Vec<String> {
        let text = body["messages"][index]["content"]
            .as_str()
            .unwrap()
            .to_string();
        extract::extract(&text, &InterceptConfig::default())
            .map(|e| e.identities().to_vec())
            .unwrap_or_else(|| vec![text])
    }

    /// Case 27: the first time documents are seen they keep their order;
    /// a later list over some of them puts the known ones first.
    #[test]
    fn tool_results_converge_on_one_order() {
        let (sessions, registry) = (Sessions::default(), Registry::default());
        let mut first = chat("find alpha", &[&["alpha one", "beta two", "gamma three"]]);
        let before = first.clone();
        let report = run(&sessions, &registry, &mut first);
        assert_eq!(first, before, "first sight: forwarded unchanged");
        assert!(report.reorder_details.is_empty());

        let mut other = chat("find delta", &[&["delta four", "beta two", "alpha one"]]);
        let report = run(&sessions, &registry, &mut other);
        assert_eq!(
            tool_docs(&other, 3),
            ["alpha one", "beta two", "delta four"]
        );
        assert_eq!(
            report.reorder_details,
            [Detail {
                source: "tool_result[3]".into(),
                count: 3,
                original_order: Some(vec![0, 1, 2]),
                reordered_order: Some(vec![2, 1, 0]),
                deduped: None,
            }]
        );
        assert!(report.documents_reordered);
        assert!(report.intercepted);
    }

    /// Case 28: the next turn forwards the earlier tool result exactly as it
    /// was forwarded before; the new result keeps both its new documents.
    #[test]
    fn a_later_turn_is_prefix_stable() {
        let (sessions, registry) = (Sessions::default(), Registry::default());
        run(
            &sessions,
            &registry,
            &mut chat("prime", &[&["alpha one", "beta two", "gamma three"]]),
        );
        let mut turn1 = chat("find delta", &[&["delta four", "beta two", "alpha one"]]);
        run(&sessions, &registry, &mut turn1);
        let forwarded = turn1["messages"][3].clone();

        let mut turn2 = chat(
            "find delta",
            &[
                &["delta four", "beta two", "alpha one"],
                &["eps five", "zeta six"],
            ],
        );
        let report = run(&sessions, &registry, &mut turn2);
        assert_eq!(turn2["messages"][3], forwarded, "byte-identical history");
        assert_eq!(report.replayed_messages, 4);
        assert_eq!(tool_docs(&turn2, 5), ["eps five", "zeta six"]);
        assert_eq!(report.documents_deduplicated, 0);
    }

    /// Case 29: documents already in the prompt are dropped from a later
    /// tool result; a shorter history (a new session) gets them in full.
    #[test]
    fn cross_turn_document_dedup() {
        let (sessions, registry) = (Sessions::default(), Registry::default());
        let mut turn1 = chat("deploy?", &[&["AUTH", "DB", "OAUTH"]]);
        run(&sessions, &registry, &mut turn1);
        let mut turn2 = chat(
            "deploy?",
            &[
                &["AUTH", "DB", "OAUTH"],
                &["AUTH", "OAUTH", "CACHE", "DEPLOY"],
            ],
        );
        let report = run(&sessions, &registry, &mut turn2);
        assert_eq!(tool_docs(&turn2, 5), ["CACHE", "DEPLOY"]);
        assert_eq!(report.documents_deduplicated, 2);

        // The conversation restarts with only the second result: nothing of
        // it is in this prompt yet, so nothing is dropped.
        let mut fresh = chat("deploy?", &[&["AUTH", "OAUTH", "CACHE", "DEPLOY"]]);
        let report = run(&sessions, &registry, &mut fresh);
        assert_eq!(report.documents_deduplicated, 0);
        assert_eq!(tool_docs(&fresh, 3).len(), 4);
    }

    #[test]
    fn a_fully_repeated_result_becomes_a_pointer() {
        let (sessions, registry) = (Sessions::default(), Registry::default());
        let mut body = chat("q", &[&["A doc", "B doc"], &["B doc", "A doc"]]);
        let report = run(&sessions, &registry, &mut body);
        let text = body["messages"][5]["content"].as_str().unwrap();
        assert!(
            text.starts_with("[All 2 documents identical to a previous tool result"),
            "{text}"
        );
        assert_eq!(report.documents_deduplicated, 2);
    }

    /// The same body under other attributes is other content: kept.
    #[test]
    fn items_differing_in_attributes_are_not_duplicates() {
        let (sessions, registry) = (Sessions::default(), Registry::default());
        let result = |year: &str| {
            format!(
                "<documents>\n<document source=\"{year}-report.pdf\">Revenue grew 10%.</document>\n\
                 <document>Other</document>\n</documents>"
            )
        };
        let mut body = json!({"messages": [
            {"role": "user", "content": "q"},
            {"role": "tool", "tool_call_id": "a", "content": result("2023")},
            {"role": "tool", "tool_call_id": "b", "content": result("2024")},
        ]});
        let report = run(&sessions, &registry, &mut body);
        assert!(body["messages"][2]["content"]
            .as_str()
            .unwrap()
            .contains("2024-report.pdf"));
        assert_eq!(
            report.documents_deduplicated, 1,
            "only <document>Other</document> repeats"
        );
    }

    #[test]
    fn repeated_single_document_results() {
        let (sessions, registry) = (Sessions::default(), Registry::default());
        let long = "x".repeat(150);
        let mut body = json!({"messages": [
            {"role": "user", "content": "read it twice"},
            {"role": "tool", "tool_call_id": "a", "content": long},
            {"role": "tool", "tool_call_id": "b", "content": format!("  {long}\n")},
            {"role": "tool", "tool_call_id": "c", "content": "short"},
        ]});
        let report = run(&sessions, &registry, &mut body);
        assert_eq!(body["messages"][1]["content"], json!(long));
        assert!(body["messages"][2]["content"]
            .as_str()
            .unwrap()
            .contains("identical to a previous tool result (a)"));
        assert_eq!(body["messages"][3]["content"], "short");
        assert_eq!(report.documents_deduplicated, 1);
    }

    /// B8 fixed: documents in the system message are reordered too.
    #[test]
    fn system_documents_take_the_canonical_order() {
        let (sessions, registry) = (Sessions::default(), Registry::default());
        let system = |docs: &[&str]| {
            json!({"messages": [
                {"role": "system", "content": format!("Use these.\n{}", xml(docs))},
                {"role": "user", "content": "q"}
            ]})
        };
        run(&sessions, &registry, &mut system(&["one", "two"]));
        let mut body = system(&["three", "two", "one"]);
        let report = run(&sessions, &registry, &mut body);
        let text = body["messages"][0]["content"].as_str().unwrap();
        let e = extract::extract(text, &InterceptConfig::default()).unwrap();
        assert_eq!(e.identities(), ["one", "two", "three"]);
        assert!(text.starts_with("Use these.\n"));
        assert_eq!(report.sources.system, 3);
    }

    /// Case 30: marker ids are removed so identical content is identical.
    #[test]
    fn untrusted_content_markers_lose_their_ids() {
        let (sessions, registry) = (Sessions::default(), Registry::default());
        let body = |id: &str| {
            json!({"messages": [{"role": "user", "content": format!(
                "<<<EXTERNAL_UNTRUSTED_CONTENT id=\"{id}\">>>hello<<<END_EXTERNAL_UNTRUSTED_CONTENT id=\"{id}\">>>")}]})
        };
        let (mut a, mut b) = (body("aabbccdd11223344"), body("0011223344556677"));
        let report = run(&sessions, &registry, &mut a);
        run(&sessions, &registry, &mut b);
        assert_eq!(a, b);
        assert_eq!(report.markers_stripped, 2);
        assert_eq!(
            a["messages"][0]["content"],
            "<<<EXTERNAL_UNTRUSTED_CONTENT>>>hello<<<END_EXTERNAL_UNTRUSTED_CONTENT>>>"
        );
    }

    #[test]
    fn disabled_and_uncommitted_requests_leave_no_trace() {
        let (sessions, registry) = (Sessions::default(), Registry::default());
        let mut body = chat("q", &[&["C", "B"], &["B", "C"]]);
        let before = body.clone();
        let config = InterceptConfig {
            enabled: false,
            ..InterceptConfig::default()
        };
        let (report, pending) = sessions.rewrite(&mut body, &config, &registry, "c", None);
        assert!(pending.is_none() && report.is_empty());
        assert_eq!(body, before);
        // A request that failed is never committed: the next one replays nothing.
        let (_, pending) =
            sessions.rewrite(&mut body, &InterceptConfig::default(), &registry, "c", None);
        assert!(pending.is_some());
        assert!(sessions.is_empty());
    }

    /// Two callers with the same opening do not share a session.
    #[test]
    fn sessions_are_per_caller() {
        let messages = [
            json!({"role": "system", "content": "s"}),
            json!({"role": "user", "content": "hi"}),
        ];
        assert_ne!(
            session_key("key-a", None, &messages),
            session_key("key-b", None, &messages)
        );
        assert_eq!(
            session_key("a", None, &messages),
            session_key("a", None, &messages)
        );
        assert_ne!(
            session_key("a", Some("c1"), &messages),
            session_key("a", None, &messages)
        );
    }
}

/// A conversation of any shape, sent turn after turn: no panic, the same
/// messages come back in their roles, and every turn replays the earlier
/// turn's forwarded messages byte for byte (the prefix the KV cache holds).
#[cfg(test)]
mod properties {
    use super::*;
    use crate::reorder::extract::{Mode, Scope};
    use crate::testing;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    /// Few documents, so that lists repeat and overlap.
    const POOL: &[&str] = &[
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "a long document that is repeated verbatim across tool results, \
         long enough to count as one",
    ];

    fn documents() -> impl Strategy<Value = Vec<&'static str>> {
        vec(select(POOL), 1..6)
    }

    /// A document list in one of the layouts inferred mode finds.
    fn list() -> impl Strategy<Value = String> {
        (documents(), 0..4u8).prop_map(|(docs, layout)| match layout {
            0 => format!(
                "<documents>\n{}\n</documents>",
                docs.iter()
                    .map(|d| format!("<document>{d}</document>"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
            1 => docs
                .iter()
                .enumerate()
                .map(|(i, d)| format!("[{}] {d}\n", i + 1))
                .collect(),
            2 => {
                let results: Vec<Value> = docs
                    .iter()
                    .map(|d| json!({"url": d, "snippet": d}))
                    .collect();
                json!({ "results": results }).to_string()
            }
            _ => docs
                .iter()
                .map(|d| format!("<document id=\"{d}\">{d}</document>"))
                .collect(),
        })
    }

    const TOKENS: &[&str] = &[
        "<document>",
        "</document>",
        "[2]",
        "{",
        "<<<EXTERNAL_UNTRUSTED_CONTENT id=\"ab\">>>",
    ];

    fn content() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => list(),
            2 => testing::mutated_text(list(), TOKENS, 3),
            1 => select(POOL).prop_map(|d| d.repeat(2)),
            1 => ".{0,24}",
        ]
    }

    /// One message after the opening: a tool call and its result (OpenAI
    /// or Anthropic shaped), a user turn, or an odd one.
    fn message() -> impl Strategy<Value = Vec<Value>> {
        (0..5u8, content(), 0..4u8).prop_map(|(kind, text, call)| {
            let id = format!("call_{call}");
            match kind {
                0 | 1 => vec![
                    json!({"role": "assistant", "content": null,
                           "tool_calls": [{"id": id, "type": "function",
                                           "function": {"name": "search", "arguments": "{}"}}]}),
                    json!({"role": "tool", "tool_call_id": id, "content": text}),
                ],
                2 => vec![json!({"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": id,
                     "content": [{"type": "text", "text": text}]}
                ]})],
                3 => vec![json!({"role": "user", "content": text})],
                _ => vec![
                    json!({"role": "tool", "content": [{"type": "text", "text": text}]}),
                    json!(null),
                ],
            }
        })
    }

    fn conversation() -> impl Strategy<Value = Vec<Value>> {
        (
            prop_oneof![content(), Just("You are helpful.".to_string())],
            ".{1,12}",
            vec(message(), 0..8),
        )
            .prop_map(|(system, question, rest)| {
                let mut messages = vec![
                    json!({"role": "system", "content": system}),
                    json!({"role": "user", "content": question}),
                ];
                messages.extend(rest.into_iter().flatten());
                messages
            })
    }

    fn config() -> impl Strategy<Value = InterceptConfig> {
        (
            proptest::bool::weighted(0.9),
            prop_oneof![
                3 => Just(Mode::Auto),
                1 => Just(Mode::XmlTag),
                1 => Just(Mode::Numbered),
                1 => Just(Mode::JsonResults),
            ],
            select(&[Scope::All, Scope::System, Scope::ToolResults][..]),
        )
            .prop_map(|(enabled, mode, scope)| InterceptConfig {
                enabled,
                mode,
                scope,
                ..InterceptConfig::default()
            })
    }

    fn roles(messages: &[Value]) -> Vec<Option<&str>> {
        messages
            .iter()
            .map(|m| m.get("role").and_then(Value::as_str))
            .collect()
    }

    proptest! {
        #![proptest_config(testing::config(256))]

        #[test]
        fn turns_replay_what_was_forwarded(
            messages in conversation(),
            cuts in vec(any::<u64>(), 1..4),
            config in config(),
        ) {
            let (sessions, registry) = (Sessions::default(), Registry::default());
            // Each turn sends the conversation so far: 2 messages or more.
            let mut ends: Vec<usize> =
                cuts.iter().map(|&c| 2 + testing::fit(c, messages.len() - 2)).collect();
            ends.push(messages.len());
            ends.sort_unstable();
            ends.dedup();
            let mut forwarded: Vec<Value> = Vec::new();
            for end in ends {
                let mut body = json!({"model": "m", "messages": messages[..end]});
                let (report, pending) =
                    sessions.rewrite(&mut body, &config, &registry, "client", None);
                let sent = body["messages"].as_array().unwrap();
                prop_assert_eq!(roles(sent), roles(&messages[..end]));
                if !config.enabled {
                    prop_assert!(pending.is_none());
                    prop_assert_eq!(report.total_documents, 0);
                    continue;
                }
                prop_assert_eq!(report.intercepted, !report.is_empty());
                prop_assert_eq!(report.message_count, end);
                prop_assert_eq!(report.replayed_messages, forwarded.len());
                prop_assert_eq!(
                    &sent[..forwarded.len()],
                    &forwarded[..],
                    "a later turn changed an earlier one"
                );
                forwarded = sent.clone();
                sessions.commit(pending.unwrap());
            }
        }
    }
}
