//! Untrusted-content markers whose random ids would keep identical prompts
//! from sharing a cached prefix.

use serde_json::Value;

const MARKER_NAME: &str = "EXTERNAL_UNTRUSTED_CONTENT";

/// Removes the random `id` from `<<<EXTERNAL_UNTRUSTED_CONTENT id="..">>>` and
/// `<<<END_EXTERNAL_UNTRUSTED_CONTENT id="..">>>` markers in every string value
/// (object keys are left alone). Some agents draw a fresh id per request, so
/// identical prompts never shared a cached prefix. The quotes may also appear
/// escaped (`id=\"..\"`) when the marker sits inside JSON-encoded text.
/// Returns how many markers were rewritten.
pub fn strip_untrusted_markers(value: &mut Value) -> usize {
    let mut count = 0;
    // An explicit stack: values built in code are not depth-limited like
    // parsed ones, so recursion could overflow.
    let mut stack = vec![value];
    while let Some(current) = stack.pop() {
        match current {
            Value::String(text) => {
                if let Some((stripped, n)) = strip_markers_in(text) {
                    *text = stripped;
                    count += n;
                }
            }
            Value::Array(items) => stack.extend(items.iter_mut()),
            Value::Object(map) => stack.extend(map.values_mut()),
            _ => {}
        }
    }
    count
}

fn strip_markers_in(text: &str) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut count = 0;
    let mut copied = 0;
    let mut pos = 0;
    while let Some(rel) = text.get(pos..).and_then(|rest| rest.find("<<<")) {
        let start = pos + rel;
        match match_marker(text, start) {
            Some((name_end, end)) => {
                out.push_str(text.get(copied..name_end)?);
                out.push_str(">>>");
                copied = end;
                pos = end;
                count += 1;
            }
            None => pos = start + 1,
        }
    }
    if count == 0 {
        return None;
    }
    out.push_str(text.get(copied..)?);
    Some((out, count))
}

/// If a marker with an id starts at `start`, returns the offset just past its
/// name (where ` id=..` begins) and the offset just past `>>>`.
fn match_marker(text: &str, start: usize) -> Option<(usize, usize)> {
    let rest = text.get(start..)?.strip_prefix("<<<")?;
    let rest = rest.strip_prefix("END_").unwrap_or(rest);
    let after_name = rest.strip_prefix(MARKER_NAME)?;
    let name_end = text.len() - after_name.len();
    let spaced = after_name.trim_start_matches([' ', '\t']);
    if spaced.len() == after_name.len() {
        return None;
    }
    let value = strip_quote(spaced.strip_prefix("id=")?)?;
    let hex = value.bytes().take_while(u8::is_ascii_hexdigit).count();
    if hex == 0 {
        return None;
    }
    let tail = strip_quote(value.get(hex..)?)?.strip_prefix(">>>")?;
    Some((name_end, text.len() - tail.len()))
}

fn strip_quote(text: &str) -> Option<&str> {
    text.strip_prefix("\\\"").or_else(|| text.strip_prefix('"'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strips_marker_ids() {
        let mut value = json!({
            "messages": [{
                "content": [{
                    "text": "a <<<EXTERNAL_UNTRUSTED_CONTENT id=\"aabbccdd11223344\">>>body<<<END_EXTERNAL_UNTRUSTED_CONTENT id=\"aabbccdd11223344\">>> z"
                }]
            }],
            "escaped": "<<<EXTERNAL_UNTRUSTED_CONTENT id=\\\"DEADbeef\\\">>>",
            "untouched": "<<<EXTERNAL_UNTRUSTED_CONTENT>>> <<<EXTERNAL_UNTRUSTED_CONTENT id=\"xyz\">>>",
            "number": 5
        });
        assert_eq!(strip_untrusted_markers(&mut value), 3);
        assert_eq!(
            value["messages"][0]["content"][0]["text"],
            "a <<<EXTERNAL_UNTRUSTED_CONTENT>>>body<<<END_EXTERNAL_UNTRUSTED_CONTENT>>> z"
        );
        assert_eq!(value["escaped"], "<<<EXTERNAL_UNTRUSTED_CONTENT>>>");
        assert_eq!(
            value["untouched"],
            "<<<EXTERNAL_UNTRUSTED_CONTENT>>> <<<EXTERNAL_UNTRUSTED_CONTENT id=\"xyz\">>>"
        );
        assert_eq!(strip_untrusted_markers(&mut value), 0);
    }

    #[test]
    fn bodies_differing_only_in_marker_ids_become_equal() {
        let make = |id: &str| {
            json!({ "system": [{ "text": format!(
                "é<<<<EXTERNAL_UNTRUSTED_CONTENT id=\"{id}\">>>ü<<<END_EXTERNAL_UNTRUSTED_CONTENT id=\"{id}\">>>"
            ) }] })
        };
        let mut a = make("0123456789abcdef");
        let mut b = make("fedcba9876543210");
        assert_ne!(a, b);
        assert_eq!(strip_untrusted_markers(&mut a), 2);
        assert_eq!(strip_untrusted_markers(&mut b), 2);
        assert_eq!(a, b);
    }
}
