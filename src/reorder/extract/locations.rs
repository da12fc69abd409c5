//! Where document lists sit in a chat request body (OpenAI-shaped system
//! and tool messages, Anthropic's top-level `system` and `tool_result`
//! blocks), and writing a rebuilt text back to where it was found.

use serde_json::Value;

use super::layouts::{extract, Extraction};
use super::InterceptConfig;

/// Where a document list came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    System,
    ToolResult,
}

/// Where a text sits in a request body.
///
/// - `top_level_system == false`: in `messages[message]`. With no `block`,
///   the message's `content` is the string; with `block`, it is
///   `content[block]`: its `text`, or for an Anthropic `tool_result` block
///   its string `content`; with `inner` too, it is
///   `content[block].content[inner].text`.
/// - `top_level_system == true`: in Anthropic's top-level `system` field,
///   either the string itself or `system[block].text`. `message` is unused
///   (0) there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    pub top_level_system: bool,
    pub message: usize,
    pub block: Option<usize>,
    pub inner: Option<usize>,
}

impl Location {
    /// A message whose `content` is a string.
    pub fn at_message(message: usize) -> Self {
        Self {
            top_level_system: false,
            message,
            block: None,
            inner: None,
        }
    }

    /// One block of a message's `content` array.
    pub fn at_block(message: usize, block: usize) -> Self {
        Self {
            block: Some(block),
            ..Self::at_message(message)
        }
    }

    /// A text block inside an Anthropic `tool_result` block.
    pub fn at_inner(message: usize, block: usize, inner: usize) -> Self {
        Self {
            inner: Some(inner),
            ..Self::at_block(message, block)
        }
    }

    /// Anthropic's top-level `system`: the string, or one of its text blocks.
    pub fn top_level_system(block: Option<usize>) -> Self {
        Self {
            top_level_system: true,
            message: 0,
            block,
            inner: None,
        }
    }
}

/// One document list found in a request.
#[derive(Debug, Clone)]
pub struct Found {
    pub location: Location,
    pub source: Source,
    pub extraction: Extraction,
}

/// Finds document lists in a chat request body: OpenAI-shaped (`messages`
/// with `system`/`developer` and `tool`/`toolResult` roles) and
/// Anthropic-shaped (top-level `system`, `tool_result` blocks in `user`
/// messages). At most one system-prompt list is taken per shape: the first
/// one found. Tool results, and Anthropic's top-level system prompt, need at
/// least two documents, since a single one leaves nothing to reorder.
pub fn find_documents(body: &Value, config: &InterceptConfig) -> Vec<Found> {
    let mut found = Vec::new();
    if !config.enabled {
        return found;
    }
    let want_system = config.scope.includes_system();
    let want_tools = config.scope.includes_tool_results();

    if want_system {
        if let Some(system) = body.get("system") {
            let mut hits = Vec::new();
            collect_texts(system, &Location::top_level_system, &mut hits);
            if let Some(hit) = hits
                .into_iter()
                .find_map(|(location, text)| extract_at(location, text, config, 2))
            {
                found.push(found_at(hit, Source::System));
            }
        }
    }

    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return found;
    };
    let mut system_found = false;
    for (index, message) in messages.iter().enumerate() {
        let Some(content) = message.get("content") else {
            continue;
        };
        let role = message.get("role").and_then(Value::as_str).unwrap_or("");
        let locate = |block: Option<usize>| {
            block.map_or(Location::at_message(index), |b| {
                Location::at_block(index, b)
            })
        };
        let mut hits = Vec::new();
        match role {
            "system" | "developer" if want_system && !system_found => {
                collect_texts(content, &locate, &mut hits);
                if let Some(hit) = hits
                    .into_iter()
                    .find_map(|(location, text)| extract_at(location, text, config, 1))
                {
                    found.push(found_at(hit, Source::System));
                    system_found = true;
                }
            }
            "tool" | "toolResult" if want_tools => {
                collect_texts(content, &locate, &mut hits);
                push_tool_hits(hits, config, &mut found);
            }
            "user" if want_tools => {
                collect_tool_result_blocks(index, content, &mut hits);
                push_tool_hits(hits, config, &mut found);
            }
            _ => {}
        }
    }
    found
}

fn found_at((location, extraction): (Location, Extraction), source: Source) -> Found {
    Found {
        location,
        source,
        extraction,
    }
}

fn extract_at(
    location: Location,
    text: &str,
    config: &InterceptConfig,
    min_docs: usize,
) -> Option<(Location, Extraction)> {
    extract(text, config)
        .filter(|extraction| extraction.len() >= min_docs)
        .map(|extraction| (location, extraction))
}

fn push_tool_hits(hits: Vec<(Location, &str)>, config: &InterceptConfig, found: &mut Vec<Found>) {
    found.extend(
        hits.into_iter()
            .filter_map(|(location, text)| extract_at(location, text, config, 2))
            .map(|hit| found_at(hit, Source::ToolResult)),
    );
}

/// The text of a `{"type": "text", "text": ..}` block.
fn text_block(block: &Value) -> Option<&str> {
    if block.get("type").and_then(Value::as_str) == Some("text") {
        block.get("text").and_then(Value::as_str)
    } else {
        None
    }
}

fn is_tool_result_block(block: &Value) -> bool {
    matches!(
        block.get("type").and_then(Value::as_str),
        Some("tool_result" | "toolResult")
    )
}

/// Texts of a content value: the string itself, or every text block of an
/// array. `locate` gets `None` for a string and `Some(block)` for a block.
fn collect_texts<'v>(
    content: &'v Value,
    locate: &dyn Fn(Option<usize>) -> Location,
    hits: &mut Vec<(Location, &'v str)>,
) {
    match content {
        Value::String(text) => hits.push((locate(None), text)),
        Value::Array(blocks) => {
            for (index, block) in blocks.iter().enumerate() {
                if let Some(text) = text_block(block) {
                    hits.push((locate(Some(index)), text));
                }
            }
        }
        _ => {}
    }
}

fn collect_tool_result_blocks<'v>(
    message: usize,
    content: &'v Value,
    hits: &mut Vec<(Location, &'v str)>,
) {
    let Some(blocks) = content.as_array() else {
        return;
    };
    for (b, block) in blocks.iter().enumerate() {
        if !is_tool_result_block(block) {
            continue;
        }
        match block.get("content") {
            Some(Value::String(text)) => hits.push((Location::at_block(message, b), text)),
            Some(Value::Array(inner)) => {
                for (i, part) in inner.iter().enumerate() {
                    if let Some(text) = text_block(part) {
                        hits.push((Location::at_inner(message, b, i), text));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Writes `text` at `location`. Returns false, changing nothing, if the
/// location does not hold a string there (the body changed since it was
/// found).
pub fn replace_text(body: &mut Value, location: &Location, text: String) -> bool {
    let container = if location.top_level_system {
        body.get_mut("system")
    } else {
        body.get_mut("messages")
            .and_then(|messages| messages.get_mut(location.message))
            .and_then(|message| message.get_mut("content"))
    };
    let Some(container) = container else {
        return false;
    };
    let target = match (location.block, location.inner) {
        (None, None) => Some(container),
        (Some(b), None) => container.get_mut(b).and_then(|block| {
            let key = if is_tool_result_block(block) {
                "content"
            } else {
                "text"
            };
            block.get_mut(key)
        }),
        (Some(b), Some(i)) => container
            .get_mut(b)
            .and_then(|block| block.get_mut("content"))
            .and_then(|inner| inner.get_mut(i))
            .and_then(|part| part.get_mut("text")),
        (None, Some(_)) => None,
    };
    match target {
        Some(slot @ Value::String(_)) => {
            *slot = Value::String(text);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reorder::extract::tests::ids;
    use crate::reorder::extract::Scope;
    use serde_json::json;

    fn with_scope(scope: Scope) -> InterceptConfig {
        InterceptConfig {
            scope,
            ..InterceptConfig::default()
        }
    }

    // --- find_documents -----------------------------------------------------

    const TWO_DOCS: &str = "<documents><document>A</document><document>B</document></documents>";

    fn openai_body(tool_role: &str) -> Value {
        json!({
            "model": "m",
            "messages": [
                { "role": "system", "content": "You are helpful." },
                { "role": "user", "content": "Question?" },
                { "role": "assistant", "content": null, "tool_calls": [] },
                { "role": tool_role, "tool_call_id": "t1", "content": TWO_DOCS }
            ]
        })
    }

    fn anthropic_body() -> Value {
        json!({
            "system": "plain instructions",
            "messages": [{
                "role": "user",
                "content": [{
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [{ "type": "text", "text": "[1] Alpha [2] Beta [3] Gamma" }]
                }]
            }]
        })
    }

    #[test]
    fn finds_openai_tool_results() {
        for role in ["tool", "toolResult"] {
            let found = find_documents(&openai_body(role), &InterceptConfig::default());
            assert_eq!(found.len(), 1, "{role}");
            assert_eq!(found[0].location, Location::at_message(3));
            assert_eq!(found[0].source, Source::ToolResult);
            assert_eq!(ids(&found[0].extraction), ["A", "B"]);
        }
    }

    #[test]
    fn finds_anthropic_tool_results() {
        let found = find_documents(&anthropic_body(), &InterceptConfig::default());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].location, Location::at_inner(0, 0, 0));
        assert_eq!(
            (
                found[0].location.message,
                found[0].location.block,
                found[0].location.inner
            ),
            (0, Some(0), Some(0))
        );
        assert_eq!(found[0].source, Source::ToolResult);
        assert_eq!(ids(&found[0].extraction), ["Alpha", "Beta", "Gamma"]);

        let string_content = json!({
            "messages": [{ "role": "user", "content": [
                { "type": "text", "text": "[1] not [2] a tool result" },
                { "type": "toolResult", "content": "[1] x [2] y" }
            ]}]
        });
        let found = find_documents(&string_content, &InterceptConfig::default());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].location, Location::at_block(0, 1));
    }

    #[test]
    fn system_prompts_and_scopes() {
        let body = json!({
            "messages": [
                { "role": "system", "content": "no documents here" },
                { "role": "developer", "content": [
                    { "type": "image_url", "image_url": {} },
                    { "type": "text", "text": "intro" },
                    { "type": "text", "text": "<docs><doc>only</doc></docs>" }
                ]},
                { "role": "system", "content": TWO_DOCS },
                { "role": "tool", "content": TWO_DOCS }
            ]
        });
        let found = find_documents(&body, &InterceptConfig::default());
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].source, Source::System);
        assert_eq!(found[0].location, Location::at_block(1, 2));
        assert_eq!(ids(&found[0].extraction), ["only"]);
        assert_eq!(found[1].source, Source::ToolResult);

        let system_only = find_documents(&body, &with_scope(Scope::System));
        assert_eq!(system_only.len(), 1);
        assert_eq!(system_only[0].source, Source::System);

        let tools_only = find_documents(&body, &with_scope(Scope::ToolResults));
        assert_eq!(tools_only.len(), 1);
        assert_eq!(tools_only[0].source, Source::ToolResult);
        assert_eq!(tools_only[0].location, Location::at_message(3));

        assert!(find_documents(&anthropic_body(), &with_scope(Scope::System)).is_empty());
    }

    #[test]
    fn single_document_tool_results_are_ignored() {
        let body = json!({ "messages": [
            { "role": "tool", "content": "<docs><doc>only</doc></docs>" },
            { "role": "tool", "content": [{ "type": "text", "text": "<docs><doc>only</doc></docs>" }] }
        ]});
        assert!(find_documents(&body, &InterceptConfig::default()).is_empty());
    }

    #[test]
    fn anthropic_top_level_system() {
        let body = json!({ "system": TWO_DOCS, "messages": [] });
        let found = find_documents(&body, &InterceptConfig::default());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].location, Location::top_level_system(None));
        assert_eq!(found[0].source, Source::System);
        assert!(find_documents(&body, &with_scope(Scope::ToolResults)).is_empty());

        let blocks = json!({ "system": [
            { "type": "text", "text": "be brief" },
            { "type": "text", "text": "[1] a [2] b" }
        ]});
        let found = find_documents(&blocks, &InterceptConfig::default());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].location, Location::top_level_system(Some(1)));

        let single = json!({ "system": "<docs><doc>only</doc></docs>" });
        assert!(find_documents(&single, &InterceptConfig::default()).is_empty());
    }

    #[test]
    fn disabled_finds_nothing() {
        let config = InterceptConfig {
            enabled: false,
            ..InterceptConfig::default()
        };
        assert!(find_documents(&openai_body("tool"), &config).is_empty());
        assert!(find_documents(&anthropic_body(), &config).is_empty());
    }

    // --- replace_text ---------------------------------------------------------

    fn round_trip(mut body: Value, config: &InterceptConfig) -> Value {
        let found = find_documents(&body, config);
        assert!(!found.is_empty());
        for f in &found {
            let order: Vec<usize> = (0..f.extraction.len()).rev().collect();
            let text = f.extraction.rebuild(&order).expect("rebuilt");
            assert!(replace_text(&mut body, &f.location, text));
        }
        let again = find_documents(&body, config);
        assert_eq!(again.len(), found.len());
        for (before, after) in found.iter().zip(&again) {
            assert_eq!(before.location, after.location);
            let mut expected = before.extraction.identities().to_vec();
            expected.reverse();
            assert_eq!(after.extraction.identities(), expected.as_slice());
        }
        body
    }

    #[test]
    fn replace_text_round_trips_every_location_kind() {
        // Plain string content.
        let body = round_trip(openai_body("tool"), &InterceptConfig::default());
        assert_eq!(
            body["messages"][3]["content"],
            "<documents><document>B</document><document>A</document></documents>"
        );
        // OpenAI text block.
        let blocks = json!({ "messages": [
            { "role": "tool", "content": [{ "type": "text", "text": TWO_DOCS }] }
        ]});
        let body = round_trip(blocks, &InterceptConfig::default());
        assert_eq!(body["messages"][0]["content"][0]["type"], "text");
        // Anthropic tool_result with inner text blocks.
        let body = round_trip(anthropic_body(), &InterceptConfig::default());
        assert_eq!(
            body["messages"][0]["content"][0]["content"][0]["text"],
            "[1] Gamma\n[2] Beta\n[3] Alpha"
        );
        // Anthropic tool_result with string content.
        let string_result = json!({ "messages": [{ "role": "user", "content": [
            { "type": "tool_result", "content": TWO_DOCS }
        ]}]});
        round_trip(string_result, &InterceptConfig::default());
        // Anthropic top-level system, string and block.
        round_trip(json!({ "system": TWO_DOCS }), &InterceptConfig::default());
        round_trip(
            json!({ "system": [{ "type": "text", "text": TWO_DOCS }] }),
            &InterceptConfig::default(),
        );
    }

    #[test]
    fn replace_text_refuses_stale_locations() {
        let mut body = openai_body("tool");
        let before = body.clone();
        assert!(!replace_text(
            &mut body,
            &Location::at_message(9),
            "x".into()
        ));
        assert!(!replace_text(
            &mut body,
            &Location::at_block(3, 0),
            "x".into()
        ));
        assert!(!replace_text(
            &mut body,
            &Location::at_message(2),
            "x".into()
        ));
        assert!(!replace_text(
            &mut body,
            &Location::top_level_system(None),
            "x".into()
        ));
        let odd = Location {
            inner: Some(0),
            ..Location::at_message(3)
        };
        assert!(!replace_text(&mut body, &odd, "x".into()));
        assert_eq!(body, before);
        let mut not_json_object = json!("text");
        assert!(!replace_text(
            &mut not_json_object,
            &Location::at_message(0),
            "x".into()
        ));
    }
}
