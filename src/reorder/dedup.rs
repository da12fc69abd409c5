//! Block dedup within one chat payload: a block of tool output (or a long
//! user or assistant message) that already appeared in an earlier message is
//! replaced by a short pointer to it.
//!
//! Blocks are content-defined: a block ends after a line whose hash is 0
//! modulo 13 (at least 3 lines in), or at 40 lines, so the same text splits
//! the same way wherever it appears. The rewrite of a message depends only
//! on the messages before it, so re-running it on a longer conversation
//! leaves earlier messages byte-identical: a cached prefix stays a prefix.
//! The constants and hashes are those of the reference system, so its test
//! vectors hold.

use std::collections::HashMap;

use md5::{Digest as _, Md5};
use serde::Serialize;
use serde_json::Value;
use sha2::Sha256;

pub const MIN_BLOCK_CHARS: usize = 40;
pub const MIN_CONTENT_CHARS: usize = 200;
pub const CHUNK_MODULUS: u32 = 13;
pub const CHUNK_MIN_LINES: usize = 3;
pub const CHUNK_MAX_LINES: usize = 40;

/// What block dedup did to one payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DedupStats {
    pub blocks_deduped: usize,
    pub blocks_total: usize,
    pub system_blocks_matched: usize,
    pub chars_before: usize,
    pub chars_after: usize,
    pub chars_saved: usize,
}

/// A line without a leading line-number prefix (`   12|`), as editors and
/// file-reading tools print them.
fn strip_line_number(line: &str) -> &str {
    let trimmed = line.trim_start();
    let digits = trimmed.bytes().take_while(u8::is_ascii_digit).count();
    if digits > 0 && trimmed.as_bytes().get(digits) == Some(&b'|') {
        &trimmed[digits + 1..]
    } else {
        line
    }
}

fn line_hash(line: &str) -> u32 {
    let normalised = strip_line_number(line).trim();
    let digest = Md5::digest(normalised.as_bytes());
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Splits text into content-defined blocks (joined back with `\n`).
pub fn chunk(text: &str, modulus: u32) -> Vec<String> {
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() <= CHUNK_MIN_LINES {
        return vec![text.to_string()];
    }
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in lines {
        current.push(line);
        let boundary = line_hash(line).is_multiple_of(modulus) && current.len() >= CHUNK_MIN_LINES;
        if boundary || current.len() >= CHUNK_MAX_LINES {
            blocks.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        match blocks.last_mut() {
            Some(last) if current.len() < CHUNK_MIN_LINES => last.extend(current),
            _ => blocks.push(current),
        }
    }
    blocks.into_iter().map(|b| b.join("\n")).collect()
}

/// A block's identity: SHA-256 of its text without line-number prefixes,
/// first 20 hex characters.
pub fn block_hash(block: &str) -> String {
    let normalised: Vec<&str> = block.trim().split('\n').map(strip_line_number).collect();
    let digest = Sha256::digest(normalised.join("\n").as_bytes());
    digest.iter().take(10).map(|b| format!("{b:02x}")).collect()
}

/// Lengths are counted in characters, as the reference system does.
fn chars(text: &str) -> usize {
    text.chars().count()
}

fn pointer(block: &str, label: &str) -> String {
    let first = block
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let quoted: String = first.chars().take(80).collect();
    format!("[... \"{quoted}\" — identical to earlier {label} result, see above ...]")
}

struct Table {
    /// Block hash → (message index, label) where it was first seen; -1 is
    /// the system prompt.
    seen: HashMap<String, (isize, String)>,
    modulus: u32,
    stats: DedupStats,
}

impl Table {
    fn register(&mut self, text: &str, msg: isize, label: &str) {
        for block in chunk(text, self.modulus) {
            if chars(block.trim()) >= MIN_BLOCK_CHARS {
                self.seen
                    .entry(block_hash(&block))
                    .or_insert((msg, label.to_string()));
            }
        }
    }

    /// Rewrites `text` (message `msg`): blocks first seen in another message
    /// become pointers when that makes them shorter.
    fn rewrite(&mut self, text: &str, msg: isize, label: &str) -> Option<String> {
        if chars(text) < MIN_CONTENT_CHARS {
            return None;
        }
        let blocks = chunk(text, self.modulus);
        self.stats.blocks_total += blocks.len();
        self.stats.chars_before += chars(text);
        if blocks.len() == 1 {
            self.register(text, msg, label);
            self.stats.chars_after += chars(text);
            return None;
        }
        let mut changed = false;
        let mut out = Vec::with_capacity(blocks.len());
        for block in blocks {
            if chars(block.trim()) < MIN_BLOCK_CHARS {
                out.push(block);
                continue;
            }
            let hash = block_hash(&block);
            match self.seen.get(&hash) {
                Some((source, source_label)) if *source != msg => {
                    let replacement = pointer(&block, source_label);
                    if chars(&replacement) < chars(&block) {
                        self.stats.blocks_deduped += 1;
                        if *source == -1 {
                            self.stats.system_blocks_matched += 1;
                        }
                        out.push(replacement);
                        changed = true;
                    } else {
                        out.push(block);
                    }
                }
                Some(_) => out.push(block),
                None => {
                    self.seen.insert(hash, (msg, label.to_string()));
                    out.push(block);
                }
            }
        }
        let rewritten = out.join("\n");
        self.stats.chars_after += chars(&rewritten);
        changed.then_some(rewritten)
    }
}

/// The label of a tool message: the function its call named, else its
/// `name`, else "tool".
fn tool_label(messages: &[Value], message: &Value) -> String {
    let call_id = message.get("tool_call_id").and_then(Value::as_str);
    let from_call = call_id.and_then(|id| {
        messages.iter().find_map(|m| {
            m.get("tool_calls")?.as_array()?.iter().find_map(|call| {
                (call.get("id")?.as_str()? == id)
                    .then(|| call.pointer("/function/name")?.as_str().map(str::to_string))?
            })
        })
    });
    from_call
        .or_else(|| {
            message
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "tool".to_string())
}

/// Dedups the blocks of a chat `messages` array in place.
pub fn dedup_messages(messages: &mut [Value]) -> DedupStats {
    let mut table = Table {
        seen: HashMap::new(),
        modulus: CHUNK_MODULUS,
        stats: DedupStats::default(),
    };
    // The leading system messages are the system prompt. A system message
    // further down registers where it stands, so it can never turn text
    // before it into a pointer (that would change earlier messages once it
    // is added on a later turn, and break the cached prefix).
    let leading = messages
        .iter()
        .take_while(|m| m.get("role").and_then(Value::as_str) == Some("system"))
        .count();
    let system: Vec<&str> = messages[..leading]
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .collect();
    if !system.is_empty() {
        table.register(&system.join("\n\n"), -1, "system prompt");
    }
    let snapshot: Vec<Value> = messages.to_vec();
    for (i, message) in messages.iter_mut().enumerate() {
        let msg = i as isize;
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match role.as_str() {
            "system" if i >= leading => {
                if let Some(text) = message.get("content").and_then(Value::as_str) {
                    table.register(text, msg, "system prompt");
                }
            }
            "system" => {}
            "user" | "assistant" => {
                let label = format!("{role} message");
                match message.get_mut("content") {
                    Some(Value::String(text)) => {
                        if let Some(new) = table.rewrite(text, msg, &label) {
                            *text = new;
                        }
                    }
                    Some(Value::Array(parts)) if role == "assistant" => {
                        for part in parts.iter_mut() {
                            if part.get("type").and_then(Value::as_str) != Some("text") {
                                continue;
                            }
                            if let Some(Value::String(text)) = part.get_mut("text") {
                                if let Some(new) = table.rewrite(text, msg, &label) {
                                    *text = new;
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            "tool" | "toolResult" => {
                let label = tool_label(&snapshot, message);
                let Some(Value::String(text)) = message.get_mut("content") else {
                    continue;
                };
                // JSON tool output: dedup the text field inside, keep the rest.
                if let Ok(Value::Object(mut object)) = serde_json::from_str::<Value>(text) {
                    let field = ["content", "output", "result", "text", "stdout"]
                        .into_iter()
                        .find(|k| {
                            object
                                .get(*k)
                                .and_then(Value::as_str)
                                .is_some_and(|s| chars(s) >= MIN_CONTENT_CHARS)
                        });
                    if let Some(field) = field {
                        let inner = object[field].as_str().unwrap_or_default().to_string();
                        if let Some(new) = table.rewrite(&inner, msg, &label) {
                            object.insert(field.to_string(), Value::String(new));
                            *text = Value::Object(object).to_string();
                        }
                        continue;
                    }
                }
                if let Some(new) = table.rewrite(text, msg, &label) {
                    *text = new;
                }
            }
            _ => {}
        }
    }
    table.stats.chars_saved = table
        .stats
        .chars_before
        .saturating_sub(table.stats.chars_after);
    table.stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn thirty_lines() -> String {
        (0..30)
            .map(|i| format!("line {i:03}: some repeated configuration text here"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A system message later in the conversation is registered where it
    /// stands: the messages before it are rewritten as they were before it
    /// was added (prefix-stable).
    #[test]
    fn a_late_system_message_leaves_earlier_messages_alone() {
        let lines: String = (0..30)
            .map(|i| format!("line {i:03}: some repeated configuration text here"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut before = vec![json!({"role": "user", "content": lines.clone()})];
        dedup_messages(&mut before);
        let mut after = vec![
            json!({"role": "user", "content": lines.clone()}),
            json!({"role": "system", "content": lines.clone()}),
        ];
        dedup_messages(&mut after);
        assert_eq!(after[0], before[0]);
        assert_eq!(after[0]["content"], json!(lines));
    }

    #[test]
    fn chunker_vector() {
        let blocks = chunk(&thirty_lines(), CHUNK_MODULUS);
        let sizes: Vec<usize> = blocks.iter().map(|b| b.split('\n').count()).collect();
        assert_eq!(sizes, vec![13, 13, 4]);
        assert_eq!(block_hash(&blocks[1]), "7d0d039fe0559f5ffe1b");
        assert_eq!(chunk("a\nb\nc", CHUNK_MODULUS), vec!["a\nb\nc".to_string()]);
    }

    #[test]
    fn line_number_prefixes_do_not_change_the_hash() {
        assert_eq!(
            block_hash("     1|foo bar\n     2|baz"),
            "d9176ee555182e869470"
        );
        assert_eq!(
            block_hash("    41|foo bar\n    42|baz"),
            "d9176ee555182e869470"
        );
    }

    #[test]
    fn repeated_tool_output_becomes_a_pointer() {
        let mut messages = vec![
            json!({"role": "system", "content": "You are a coding agent."}),
            json!({"role": "user", "content": "read both files"}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": thirty_lines()}),
            json!({"role": "tool", "tool_call_id": "c2", "content": format!("header of b\n{}\nfooter of b", thirty_lines())}),
        ];
        let before = messages.clone();
        let stats = dedup_messages(&mut messages);
        assert_eq!(messages[..4], before[..4], "earlier messages are untouched");
        let rewritten = messages[4]["content"].as_str().unwrap();
        assert!(
            rewritten.contains(
                "[... \"line 013: some repeated configuration text here\" — identical to earlier read_file result, see above ...]"
            ),
            "{rewritten}"
        );
        assert!(rewritten.starts_with("header of b\nline 000"));
        assert!(rewritten.ends_with("line 029: some repeated configuration text here\nfooter of b"));
        assert_eq!(
            (stats.blocks_deduped, stats.blocks_total, stats.chars_saved),
            (1, 6, 513)
        );
    }

    #[test]
    fn invariants() {
        // The system prompt is never shortened, but a tool result repeating
        // it points at it.
        let system: String = (0..70)
            .map(|i| format!("rule {i}: never do the thing number {i} at all"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut messages = vec![
            json!({"role": "system", "content": system}),
            json!({"role": "tool", "content": system}),
        ];
        let stats = dedup_messages(&mut messages);
        assert_eq!(messages[0]["content"], system.as_str());
        assert!(messages[1]["content"]
            .as_str()
            .unwrap()
            .contains("identical to earlier system prompt result"));
        assert!(stats.system_blocks_matched > 0);

        // A block repeated inside one message stays; short texts are untouched.
        let twice = format!("{}\n{}", thirty_lines(), thirty_lines());
        let mut one = vec![json!({"role": "tool", "content": twice})];
        assert_eq!(dedup_messages(&mut one).blocks_deduped, 0);
        let mut short = vec![
            json!({"role": "tool", "content": "x"}),
            json!({"role": "tool", "content": "x"}),
        ];
        assert_eq!(dedup_messages(&mut short), DedupStats::default());

        // A one-character change keeps a block verbatim.
        let changed = thirty_lines().replace("line 014: some", "line 014: sOme");
        let mut messages = vec![
            json!({"role": "tool", "content": thirty_lines()}),
            json!({"role": "tool", "content": changed}),
        ];
        let stats = dedup_messages(&mut messages);
        assert_eq!(
            stats.blocks_deduped, 2,
            "blocks 1 and 3 match; block 2 changed"
        );
        assert!(messages[1]["content"]
            .as_str()
            .unwrap()
            .contains("line 014: sOme"));
    }

    #[test]
    fn prefix_stable_across_turns() {
        let turn1 = vec![
            json!({"role": "tool", "content": thirty_lines()}),
            json!({"role": "tool", "content": format!("x\n{}", thirty_lines())}),
        ];
        let mut first = turn1.clone();
        dedup_messages(&mut first);
        let mut second = turn1.clone();
        second.push(json!({"role": "tool", "content": thirty_lines()}));
        dedup_messages(&mut second);
        assert_eq!(
            second[..2],
            first[..],
            "earlier messages are rewritten the same way"
        );
    }
}
