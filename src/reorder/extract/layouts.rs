//! Finding a document list in one text and rebuilding the text in another
//! order: XML tags, numbered lists, JSON `results`, separator blocks and
//! markdown sections. An [`Extraction`] keeps what surrounds the documents,
//! so that nothing else the client wrote is lost.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::{is_valid_tag, InterceptConfig, Mode};

/// Fixed priority orders. A reference implementation iterated a hash set here,
/// which made the chosen tag differ from run to run when several were present.
const WRAPPER_TAGS: [&str; 6] = [
    "documents",
    "contexts",
    "docs",
    "passages",
    "references",
    "files",
];
const ITEM_TAGS: [&str; 6] = ["document", "context", "doc", "passage", "reference", "file"];

/// Opening tags longer than this are treated as text. Real tags are short; the
/// cap keeps a text full of unterminated `<document "` fragments from turning
/// every tag search into a scan to the end of the text.
const MAX_TAG_LEN: usize = 1024;

/// JSON fields that name where a search result came from, best first.
const LABEL_FIELDS: [&str; 6] = ["url", "path", "file", "filename", "uri", "href"];

/// How to put the text back together; the variant also names the layout.
#[derive(Debug, Clone)]
enum Layout {
    /// `open` runs from the wrapper's opening tag (if any) to the first item,
    /// `close` from the end of the last item through the wrapper's closing
    /// tag. `gaps[i]` is the original text between items `i` and `i + 1`.
    Xml {
        open: String,
        items: Vec<String>,
        gaps: Vec<String>,
        close: String,
    },
    Numbered,
    /// `object` still holds a `results` key (as null) so that, when
    /// serde_json keeps insertion order, the key stays where it was.
    Json {
        object: Map<String, Value>,
        items: Vec<Value>,
    },
    Separator {
        delimiter: String,
    },
    Markdown,
}

/// A list of documents found in one text, with enough of the surrounding text
/// to rebuild it.
#[derive(Debug, Clone)]
pub struct Extraction {
    identities: Vec<String>,
    /// Only JSON results have labels distinct from the identities.
    labels: Option<Vec<String>>,
    prefix: String,
    suffix: String,
    layout: Layout,
}

impl Extraction {
    pub fn len(&self) -> usize {
        self.identities.len()
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }

    /// The text that identifies each document, in found order. Two documents
    /// with equal identities are duplicates.
    pub fn identities(&self) -> &[String] {
        &self.identities
    }

    /// A short human-readable name per document, for logs: the source field of
    /// a JSON result, otherwise the document text itself.
    pub fn labels(&self) -> &[String] {
        self.labels.as_deref().unwrap_or(&self.identities)
    }

    /// The exact text each document occupies in the prompt: for XML the
    /// whole item with its tags and attributes, otherwise its identity. Two
    /// documents are the same content for dedup only if these are equal.
    pub fn contents(&self) -> Vec<&str> {
        match &self.layout {
            Layout::Xml { items, .. } => items.iter().map(String::as_str).collect(),
            _ => self.identities.iter().map(String::as_str).collect(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self.layout {
            Layout::Xml { .. } => "xml_tag",
            Layout::Numbered => "numbered",
            Layout::Json { .. } => "json_results",
            Layout::Separator { .. } => "separator",
            Layout::Markdown => "markdown_header",
        }
    }

    /// The original text before the document list (for XML with a wrapper:
    /// before the wrapper's opening tag).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The original text after the document list (for XML with a wrapper:
    /// after the wrapper's closing tag). Always empty for numbered lists,
    /// separator blocks and markdown, whose last document runs to the end.
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// Rebuilds the whole text with the documents in `order` (indices into
    /// the found order). `order` may leave documents out but may not repeat
    /// one; an empty, repeating or out-of-range order gives `None`.
    ///
    /// Only XML gives back the input byte for byte for the identity order.
    /// The other layouts normalise spacing (numbered lists are also
    /// renumbered from 1), so callers should rebuild only when the order or
    /// the set of documents actually changed; otherwise an unchanged request
    /// would still differ from what the client sent.
    ///
    /// JSON results are re-serialised pretty-printed with two-space indents.
    /// Without serde_json's `preserve_order` feature, object keys come out in
    /// alphabetical order, not the client's order; the content is the same.
    pub fn rebuild(&self, order: &[usize]) -> Option<String> {
        if !self.is_valid_order(order) {
            return None;
        }
        let mut out = String::new();
        match &self.layout {
            Layout::Xml {
                open,
                items,
                gaps,
                close,
            } => {
                out.push_str(&self.prefix);
                out.push_str(open);
                for (pos, &index) in order.iter().enumerate() {
                    if pos > 0 {
                        // Gaps stay at their positions so that the identity
                        // order gives back the input byte for byte.
                        out.push_str(gaps.get(pos - 1).map_or("", String::as_str));
                    }
                    out.push_str(items.get(index)?);
                }
                out.push_str(close);
            }
            Layout::Numbered => {
                out.push_str(&self.prefix);
                for (pos, &index) in order.iter().enumerate() {
                    if pos > 0 {
                        out.push('\n');
                    }
                    let _ = write!(out, "[{}] {}", pos + 1, self.identities.get(index)?);
                }
            }
            Layout::Json { object, items } => {
                let chosen = order
                    .iter()
                    .map(|&index| items.get(index).cloned())
                    .collect::<Option<Vec<Value>>>()?;
                let mut object = object.clone();
                object.insert("results".to_string(), Value::Array(chosen));
                out.push_str(&self.prefix);
                out.push_str(&serde_json::to_string_pretty(&Value::Object(object)).ok()?);
            }
            Layout::Separator { delimiter } => {
                for (pos, &index) in order.iter().enumerate() {
                    if pos > 0 {
                        out.push_str(delimiter);
                    }
                    out.push_str(self.identities.get(index)?);
                }
            }
            Layout::Markdown => {
                let head = self.prefix.trim();
                if !head.is_empty() {
                    out.push_str(head);
                    out.push_str("\n\n");
                }
                for (pos, &index) in order.iter().enumerate() {
                    if pos > 0 {
                        out.push_str("\n\n");
                    }
                    out.push_str(self.identities.get(index)?);
                }
            }
        }
        out.push_str(&self.suffix);
        Some(out)
    }

    fn is_valid_order(&self, order: &[usize]) -> bool {
        if order.is_empty() {
            return false;
        }
        let mut seen = vec![false; self.len()];
        for &index in order {
            match seen.get_mut(index) {
                Some(slot) if !*slot => *slot = true,
                _ => return false,
            }
        }
        true
    }
}

/// Finds a document list in `text` according to `config.mode`. Returns `None`
/// when extraction is disabled or nothing usable is found.
///
/// With an XML wrapper one document is enough (the wrapper says it is a
/// list); every other layout needs at least two.
pub fn extract(text: &str, config: &InterceptConfig) -> Option<Extraction> {
    if !config.enabled || text.trim().is_empty() {
        return None;
    }
    match config.mode {
        // JSON goes before numbered lists: a search result whose snippet
        // holds "[1] .. [2]" would otherwise be cut across JSON strings,
        // while a text that parses as a results object is never a plain list.
        Mode::Auto => extract_xml(text, &config.tag)
            .or_else(|| extract_json(text))
            .or_else(|| extract_numbered(text)),
        Mode::XmlTag => extract_xml(text, &config.tag),
        Mode::Numbered => extract_numbered(text),
        Mode::JsonResults => extract_json(text),
        Mode::Separator => extract_separator(text, &config.separator),
        Mode::MarkdownHeader => extract_markdown(text),
    }
}

// ---------------------------------------------------------------------------
// XML

/// Tag lists with the configured tag first. It is honoured in auto mode too:
/// a client that names its tag expects it to be used.
fn tag_lists(custom: &str) -> (Vec<String>, Vec<String>) {
    let mut wrappers = Vec::new();
    let mut items = Vec::new();
    if is_valid_tag(custom) {
        wrappers.push(format!("{custom}s"));
        items.push(custom.to_string());
    }
    for tag in WRAPPER_TAGS {
        if !wrappers.iter().any(|w| w == tag) {
            wrappers.push(tag.to_string());
        }
    }
    for tag in ITEM_TAGS {
        if !items.iter().any(|i| i == tag) {
            items.push(tag.to_string());
        }
    }
    (wrappers, items)
}

fn extract_xml(text: &str, custom_tag: &str) -> Option<Extraction> {
    let (wrappers, items) = tag_lists(custom_tag);
    for wrapper in &wrappers {
        let Some((open_start, open_end)) =
            find_open_tag(text, &format!("<{wrapper}"), 0, text.len())
        else {
            continue;
        };
        let Some((close_start, close_end)) =
            find_close_tag(text, &format!("</{wrapper}"), open_end, text.len())
        else {
            continue;
        };
        for item in &items {
            let found = scan_items(text, item, open_end, close_start);
            if let Some(extraction) = xml_extraction(text, &found, Some((open_start, close_end)), 1)
            {
                return Some(extraction);
            }
        }
    }
    for item in &items {
        let found = scan_items(text, item, 0, text.len());
        if let Some(extraction) = xml_extraction(text, &found, None, 2) {
            return Some(extraction);
        }
    }
    None
}

/// Byte offsets of one `<tag ..>body</tag>` occurrence.
#[derive(Debug, Clone, Copy)]
struct RawItem {
    start: usize,
    body_start: usize,
    body_end: usize,
    end: usize,
}

/// All items of one tag inside `text[from..limit]`, in order. An unclosed item
/// ends the scan: no later closing tag exists for any later item either.
fn scan_items(text: &str, tag: &str, from: usize, limit: usize) -> Vec<RawItem> {
    let open = format!("<{tag}");
    let close = format!("</{tag}");
    let mut items = Vec::new();
    let mut pos = from;
    while let Some((start, body_start)) = find_open_tag(text, &open, pos, limit) {
        let Some((body_end, end)) = find_close_tag(text, &close, body_start, limit) else {
            break;
        };
        items.push(RawItem {
            start,
            body_start,
            body_end,
            end,
        });
        pos = end;
    }
    items
}

/// Turns scanned items into an extraction, or refuses when rebuilding could
/// lose text: anything but whitespace (or empty items) between two items has
/// no place to go once the items move.
fn xml_extraction(
    text: &str,
    items: &[RawItem],
    wrapper: Option<(usize, usize)>,
    min_docs: usize,
) -> Option<Extraction> {
    for pair in items.windows(2) {
        if !text.get(pair[0].end..pair[1].start)?.trim().is_empty() {
            return None;
        }
    }
    // Empty items are not documents; they stay behind inside the gaps.
    let docs: Vec<&RawItem> = items
        .iter()
        .filter(|item| {
            text.get(item.body_start..item.body_end)
                .is_some_and(|body| !body.trim().is_empty())
        })
        .collect();
    if docs.len() < min_docs {
        return None;
    }
    let first = docs.first()?;
    let last = docs.last()?;
    let (prefix, open, close, suffix) = match wrapper {
        Some((wrap_start, wrap_end)) => (
            text.get(..wrap_start)?,
            text.get(wrap_start..first.start)?,
            text.get(last.end..wrap_end)?,
            text.get(wrap_end..)?,
        ),
        None => (text.get(..first.start)?, "", "", text.get(last.end..)?),
    };
    let mut identities = Vec::with_capacity(docs.len());
    let mut raw = Vec::with_capacity(docs.len());
    for doc in &docs {
        identities.push(text.get(doc.body_start..doc.body_end)?.trim().to_string());
        raw.push(text.get(doc.start..doc.end)?.to_string());
    }
    let gaps = docs
        .windows(2)
        .map(|pair| text.get(pair[0].end..pair[1].start).map(str::to_string))
        .collect::<Option<Vec<String>>>()?;
    Some(Extraction {
        identities,
        labels: None,
        prefix: prefix.to_string(),
        suffix: suffix.to_string(),
        layout: Layout::Xml {
            open: open.to_string(),
            items: raw,
            gaps,
            close: close.to_string(),
        },
    })
}

/// Finds the next opening tag starting with `needle` (`<name`) in
/// `text[from..limit]`, attributes allowed. Returns the offsets of `<` and
/// just past `>`. Self-closing tags are skipped: they have no body.
fn find_open_tag(text: &str, needle: &str, from: usize, limit: usize) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut pos = from;
    while pos < limit {
        let start = pos + text.get(pos..limit)?.find(needle)?;
        let after = start + needle.len();
        if let Some(end) = open_tag_end(bytes, after, limit) {
            return Some((start, end));
        }
        pos = after;
    }
    None
}

/// Given the offset right after `<name`, returns the offset past the closing
/// `>` if this really is an opening tag of that name (not a longer name such
/// as `<documents` when looking for `<document`, and not self-closing).
fn open_tag_end(bytes: &[u8], after: usize, limit: usize) -> Option<usize> {
    let first = *bytes.get(after).filter(|_| after < limit)?;
    if first == b'>' {
        return Some(after + 1);
    }
    if !first.is_ascii_whitespace() {
        return None;
    }
    let stop = limit
        .min(bytes.len())
        .min(after.saturating_add(MAX_TAG_LEN));
    let mut quote: Option<u8> = None;
    let mut i = after;
    while i < stop {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None => match b {
                b'"' | b'\'' => quote = Some(b),
                b'<' => return None,
                b'>' => {
                    return if bytes.get(i.wrapping_sub(1)) == Some(&b'/') {
                        None
                    } else {
                        Some(i + 1)
                    };
                }
                _ => {}
            },
        }
        i += 1;
    }
    None
}

/// Finds the next `</name>` (whitespace allowed before `>`) in
/// `text[from..limit]`. Returns the offsets of `<` and just past `>`.
fn find_close_tag(text: &str, needle: &str, from: usize, limit: usize) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut pos = from;
    while pos < limit {
        let start = pos + text.get(pos..limit)?.find(needle)?;
        let mut i = start + needle.len();
        while i < limit && bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if i < limit && bytes.get(i) == Some(&b'>') {
            return Some((start, i + 1));
        }
        pos = start + needle.len();
    }
    None
}

// ---------------------------------------------------------------------------
// Numbered lists

/// The first `[digits]` in `text`: offsets of `[` and past `]`, and the number.
/// Numbers too large for u64 are ordinary text.
fn first_marker(text: &str) -> Option<(usize, usize, u64)> {
    let bytes = text.as_bytes();
    let mut pos = 0;
    while let Some(rel) = text.get(pos..)?.find('[') {
        let open = pos + rel;
        let digits_start = open + 1;
        let digits = bytes
            .get(digits_start..)?
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let close = digits_start + digits;
        if digits > 0 && bytes.get(close) == Some(&b']') {
            if let Some(number) = text
                .get(digits_start..close)
                .and_then(|d| d.parse::<u64>().ok())
            {
                return Some((open, close + 1, number));
            }
        }
        pos = open + 1;
    }
    None
}

/// Markers must count up from the first one: a reference implementation split
/// at every `[n]`, so a document citing "[7]" was cut in two.
fn extract_numbered(text: &str) -> Option<Extraction> {
    let (start, mut body_start, mut number) = first_marker(text)?;
    let mut docs = Vec::new();
    loop {
        let rest = text.get(body_start..)?;
        let next = number.checked_add(1).and_then(|next| {
            let needle = format!("[{next}]");
            rest.find(&needle).map(|rel| (rel, needle.len(), next))
        });
        match next {
            Some((rel, marker_len, next_number)) => {
                docs.push(rest.get(..rel)?.trim());
                body_start += rel + marker_len;
                number = next_number;
            }
            None => {
                docs.push(rest.trim());
                break;
            }
        }
    }
    let identities: Vec<String> = docs
        .into_iter()
        .filter(|doc| !doc.is_empty())
        .map(str::to_string)
        .collect();
    if identities.len() < 2 {
        return None;
    }
    Some(Extraction {
        identities,
        labels: None,
        prefix: text.get(..start)?.to_string(),
        suffix: String::new(),
        layout: Layout::Numbered,
    })
}

// ---------------------------------------------------------------------------
// JSON results

fn extract_json(text: &str) -> Option<Extraction> {
    let body = text.trim();
    if !body.starts_with('{') {
        return None;
    }
    let Value::Object(mut object) = serde_json::from_str::<Value>(body).ok()? else {
        return None;
    };
    let items = match object.get_mut("results") {
        Some(Value::Array(items)) if items.len() >= 2 => std::mem::take(items),
        _ => return None,
    };
    object.insert("results".to_string(), Value::Null);
    // The whole item is the identity, not its path: the same file with a new
    // snippet is different content.
    let identities: Vec<String> = items.iter().map(Value::to_string).collect();
    let labels = items.iter().map(json_label).collect();
    let leading = text.len() - text.trim_start().len();
    let trailing = text.trim_end().len();
    Some(Extraction {
        identities,
        labels: Some(labels),
        prefix: text.get(..leading)?.to_string(),
        suffix: text.get(trailing..)?.to_string(),
        layout: Layout::Json { object, items },
    })
}

fn json_label(item: &Value) -> String {
    LABEL_FIELDS
        .iter()
        .filter_map(|field| item.get(*field).and_then(Value::as_str))
        .find(|value| !value.is_empty())
        .map_or_else(|| item.to_string(), str::to_string)
}

// ---------------------------------------------------------------------------
// Separator blocks

fn extract_separator(text: &str, separator: &str) -> Option<Extraction> {
    if separator.is_empty() {
        return None;
    }
    let delimiter = format!("\n{separator}\n");
    let identities: Vec<String> = text
        .split(delimiter.as_str())
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(str::to_string)
        .collect();
    if identities.len() < 2 {
        return None;
    }
    Some(Extraction {
        identities,
        labels: None,
        prefix: String::new(),
        suffix: String::new(),
        layout: Layout::Separator { delimiter },
    })
}

// ---------------------------------------------------------------------------
// Markdown sections

/// Offsets of lines starting with `# ` or `## `. Lines inside fenced code
/// blocks are skipped: a shell comment there is not a section heading.
fn markdown_heading_offsets(text: &str) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut offset = 0;
    let mut in_fence = false;
    for line in text.split_inclusive('\n') {
        let lead = line.trim_start();
        if lead.starts_with("```") || lead.starts_with("~~~") {
            in_fence = !in_fence;
        } else if !in_fence && (line.starts_with("# ") || line.starts_with("## ")) {
            offsets.push(offset);
        }
        offset += line.len();
    }
    offsets
}

fn extract_markdown(text: &str) -> Option<Extraction> {
    let offsets = markdown_heading_offsets(text);
    if offsets.len() < 2 {
        return None;
    }
    let mut identities = Vec::with_capacity(offsets.len());
    for (i, &start) in offsets.iter().enumerate() {
        let end = offsets.get(i + 1).copied().unwrap_or(text.len());
        identities.push(text.get(start..end)?.trim().to_string());
    }
    Some(Extraction {
        identities,
        labels: None,
        prefix: text.get(..*offsets.first()?)?.to_string(),
        suffix: String::new(),
        layout: Layout::Markdown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reorder::extract::tests::{ids, with_mode};

    fn auto(text: &str) -> Option<Extraction> {
        extract(text, &InterceptConfig::default())
    }

    // --- XML ---------------------------------------------------------------

    const WRAPPED: &str = "Here are the docs:\n<documents>\n<document>A</document>\n<document>B</document>\n</documents>\nPlease answer.";

    #[test]
    fn xml_wrapper_keeps_prefix_and_suffix() {
        let e = auto(WRAPPED).expect("found");
        assert_eq!(e.kind(), "xml_tag");
        assert_eq!(ids(&e), ["A", "B"]);
        assert_eq!(e.labels(), ["A", "B"]);
        assert_eq!(e.prefix(), "Here are the docs:\n");
        assert_eq!(e.suffix(), "\nPlease answer.");
        assert_eq!(e.rebuild(&[0, 1]).as_deref(), Some(WRAPPED));
        assert_eq!(
            e.rebuild(&[1, 0]).as_deref(),
            Some("Here are the docs:\n<documents>\n<document>B</document>\n<document>A</document>\n</documents>\nPlease answer.")
        );
        assert_eq!(
            e.rebuild(&[1]).as_deref(),
            Some("Here are the docs:\n<documents>\n<document>B</document>\n</documents>\nPlease answer.")
        );
    }

    #[test]
    fn rebuild_rejects_bad_orders() {
        let e = auto(WRAPPED).expect("found");
        assert_eq!(e.rebuild(&[]), None);
        assert_eq!(e.rebuild(&[0, 0]), None);
        assert_eq!(e.rebuild(&[2]), None);
        assert_eq!(e.rebuild(&[usize::MAX]), None);
    }

    #[test]
    fn single_unwrapped_item_is_not_a_list() {
        assert!(auto("<document>Only one doc</document>").is_none());
    }

    #[test]
    fn single_wrapped_item_is_a_list() {
        let e = auto("<docs><doc>solo</doc></docs>").expect("found");
        assert_eq!(ids(&e), ["solo"]);
    }

    #[test]
    fn xml_keeps_attributes_and_indentation() {
        let text = "<documents source=\"kb\">\n  <document id=\"1\">A</document>\n  <document id=\"2\">B</document>\n</documents>";
        let e = auto(text).expect("found");
        assert_eq!(ids(&e), ["A", "B"]);
        assert_eq!(e.rebuild(&[0, 1]).as_deref(), Some(text));
        assert_eq!(
            e.rebuild(&[1, 0]).as_deref(),
            Some("<documents source=\"kb\">\n  <document id=\"2\">B</document>\n  <document id=\"1\">A</document>\n</documents>")
        );
    }

    #[test]
    fn xml_body_is_kept_as_written_but_identity_is_trimmed() {
        let text = "<document>\n  A  \n</document>\n\n<document> B\n</document>";
        let e = auto(text).expect("found");
        assert_eq!(ids(&e), ["A", "B"]);
        assert_eq!(e.rebuild(&[0, 1]).as_deref(), Some(text));
        assert_eq!(
            e.rebuild(&[1, 0]).as_deref(),
            Some("<document> B\n</document>\n\n<document>\n  A  \n</document>")
        );
    }

    #[test]
    fn wrapper_priority_is_fixed_not_textual() {
        let text = "<contexts><context>c1</context><context>c2</context></contexts>\n<documents><document>d1</document></documents>";
        let e = auto(text).expect("found");
        assert_eq!(ids(&e), ["d1"]);
        assert!(e.prefix().starts_with("<contexts>"));
    }

    #[test]
    fn item_tag_priority_inside_wrapper() {
        let text = "<passages><file>f</file><passage>p1</passage><passage>p2</passage></passages>";
        // "passage" outranks "file"; the lone <file> item before the passages
        // is not between two of them, so it simply stays in the head text.
        let e = auto(text).expect("found");
        assert_eq!(ids(&e), ["p1", "p2"]);
        assert_eq!(e.rebuild(&[0, 1]).as_deref(), Some(text));
        assert_eq!(
            e.rebuild(&[1, 0]).as_deref(),
            Some("<passages><file>f</file><passage>p2</passage><passage>p1</passage></passages>")
        );
    }

    #[test]
    fn attribute_values_may_hold_angle_brackets() {
        let text = "<document title=\"a > b\">A</document><document title='<x>'>B</document>";
        let e = auto(text).expect("found");
        // The second tag's quoted '<' must not end the tag.
        assert_eq!(ids(&e), ["A", "B"]);
        assert_eq!(e.rebuild(&[0, 1]).as_deref(), Some(text));
    }

    #[test]
    fn longer_tag_names_do_not_match_shorter_ones() {
        // <documentation> must not be read as <document>.
        let text = "<documentation>x</documentation><document>A</document><document>B</document>";
        let e = auto(text).expect("found");
        assert_eq!(ids(&e), ["A", "B"]);
        assert_eq!(e.prefix(), "<documentation>x</documentation>");
    }

    #[test]
    fn text_between_items_blocks_xml_extraction() {
        let text = "<document>A</document> and also <document>B</document>";
        assert!(extract(text, &with_mode(Mode::XmlTag)).is_none());
    }

    #[test]
    fn empty_and_self_closing_items_are_not_documents() {
        let text = "<documents><document>A</document> <document>  </document> <document/><document>B</document></documents>";
        // The self-closing tag is plain text between items, so the list is
        // refused rather than risk dropping it.
        assert!(auto(text).is_none());

        let text = "<documents><document>A</document>\n<document> </document>\n<document>B</document></documents>";
        let e = auto(text).expect("found");
        assert_eq!(ids(&e), ["A", "B"]);
        assert_eq!(e.rebuild(&[0, 1]).as_deref(), Some(text));
    }

    #[test]
    fn custom_tag_is_tried_first() {
        let config = InterceptConfig {
            mode: Mode::XmlTag,
            tag: "chunk".to_string(),
            ..InterceptConfig::default()
        };
        let text = "<chunks>\n<chunk n=\"1\">one</chunk>\n<chunk>two</chunk>\n</chunks>";
        let e = extract(text, &config).expect("found");
        assert_eq!(ids(&e), ["one", "two"]);
        assert_eq!(
            e.rebuild(&[1, 0]).as_deref(),
            Some("<chunks>\n<chunk>two</chunk>\n<chunk n=\"1\">one</chunk>\n</chunks>")
        );
        assert!(extract(text, &with_mode(Mode::XmlTag)).is_none());
    }

    // --- numbered -----------------------------------------------------------

    #[test]
    fn numbered_inline_list() {
        let e = auto("[1] First document [2] Second document [3] Third document").expect("found");
        assert_eq!(e.kind(), "numbered");
        assert_eq!(
            ids(&e),
            ["First document", "Second document", "Third document"]
        );
        assert_eq!(
            e.rebuild(&[2, 0]).as_deref(),
            Some("[1] Third document\n[2] First document")
        );
    }

    #[test]
    fn numbered_citations_inside_documents_are_text() {
        let e = auto("[1] Alpha cites [3] here [2] Beta [3] Gamma").expect("found");
        assert_eq!(ids(&e), ["Alpha cites [3] here", "Beta", "Gamma"]);
    }

    #[test]
    fn numbered_keeps_prefix_and_may_start_anywhere() {
        let e = extract("Context:\n[4] four\n[5] five", &with_mode(Mode::Numbered)).expect("found");
        assert_eq!(e.prefix(), "Context:\n");
        assert_eq!(ids(&e), ["four", "five"]);
        assert_eq!(
            e.rebuild(&[1, 0]).as_deref(),
            Some("Context:\n[1] five\n[2] four")
        );
    }

    #[test]
    fn numbered_needs_two_documents() {
        assert!(auto("[1] only one").is_none());
        assert!(auto("[1] one [3] skipped").is_none());
        assert!(auto("[1] [2] x").is_none());
    }

    #[test]
    fn multibyte_text_around_numbered_markers() {
        let e = auto("é[1]ü [2]ß").expect("found");
        assert_eq!(e.prefix(), "é");
        assert_eq!(ids(&e), ["ü", "ß"]);
        assert_eq!(e.rebuild(&[1, 0]).as_deref(), Some("é[1] ß\n[2] ü"));
    }

    #[test]
    fn huge_numbers_are_not_markers() {
        assert!(auto("[99999999999999999999] a [100000000000000000000] b").is_none());
        let e = auto("[99999999999999999999] x [1] a [2] b").expect("found");
        assert_eq!(e.prefix(), "[99999999999999999999] x ");
        // u64::MAX has no successor, so the list ends there.
        assert!(auto("[18446744073709551615] a [18446744073709551616] b").is_none());
    }

    // --- JSON results ---------------------------------------------------------

    const JSON_RESULTS: &str = r#"{"results":[{"path":"MEMORY.md","snippet":"m"},{"path":"notes.md","snippet":"n"},{"path":"config.md","snippet":"c"}],"query":"q"}"#;

    #[test]
    fn json_results_labels_and_rebuild() {
        let e = auto(JSON_RESULTS).expect("found");
        assert_eq!(e.kind(), "json_results");
        assert_eq!(e.labels(), ["MEMORY.md", "notes.md", "config.md"]);
        let rebuilt = e.rebuild(&[2, 1, 0]).expect("rebuilt");
        assert!(
            rebuilt.contains("\n  \"query\""),
            "pretty, 2-space: {rebuilt}"
        );
        let parsed: Value = serde_json::from_str(&rebuilt).expect("json");
        let original: Value = serde_json::from_str(JSON_RESULTS).expect("json");
        let mut reversed = original["results"].as_array().expect("array").clone();
        reversed.reverse();
        assert_eq!(parsed["results"], Value::Array(reversed));
        assert_eq!(parsed["query"], "q");
        assert_eq!(parsed.as_object().map(Map::len), Some(2));
    }

    #[test]
    fn json_results_win_over_citations_in_snippets() {
        let text = r#"{"results":[{"path":"a","snippet":"see [1] and"},{"path":"b","snippet":"[2] too"}]}"#;
        let e = auto(text).expect("found");
        assert_eq!(e.kind(), "json_results");
        assert_eq!(e.labels(), ["a", "b"]);
    }

    #[test]
    fn json_identity_is_the_whole_item() {
        let text = r#"{"results":[{"path":"a.md","snippet":"old"},{"path":"a.md","snippet":"new"},{"title":"x"}]}"#;
        let e = auto(text).expect("found");
        assert_ne!(e.identities()[0], e.identities()[1]);
        assert_eq!(e.labels()[0], "a.md");
        assert_eq!(e.labels()[2], r#"{"title":"x"}"#);
    }

    #[test]
    fn json_keeps_non_ascii_and_needs_two_results() {
        let text = r#"{"results":[{"url":"","uri":"ü://x","t":"日本"},{"t":"é"}]}"#;
        let e = auto(text).expect("found");
        assert_eq!(e.labels()[0], "ü://x");
        let rebuilt = e.rebuild(&[1, 0]).expect("rebuilt");
        assert!(rebuilt.contains("日本") && rebuilt.contains('é'));
        assert!(auto(r#"{"results":[{"path":"a"}]}"#).is_none());
        assert!(auto(r#"{"results":"nope"}"#).is_none());
        assert!(auto(r#"{"results":[1,2"#).is_none());
    }

    // --- separator and markdown ---------------------------------------------

    #[test]
    fn separator_only_when_asked() {
        let text = "First\n---\nSecond\n---\nThird";
        assert!(auto(text).is_none());
        let e = extract(text, &with_mode(Mode::Separator)).expect("found");
        assert_eq!(e.kind(), "separator");
        assert_eq!(ids(&e), ["First", "Second", "Third"]);
        assert_eq!(e.rebuild(&[2, 0]).as_deref(), Some("Third\n---\nFirst"));
        let custom = InterceptConfig {
            mode: Mode::Separator,
            separator: "***".to_string(),
            ..InterceptConfig::default()
        };
        assert!(extract(text, &custom).is_none());
        assert!(extract("A\n***\nB", &custom).is_some());
    }

    #[test]
    fn markdown_only_when_asked() {
        let text = "# Topic A\nalpha text\n\n# Topic B\nbeta text";
        assert!(auto(text).is_none());
        let e = extract(text, &with_mode(Mode::MarkdownHeader)).expect("found");
        assert_eq!(e.kind(), "markdown_header");
        assert_eq!(ids(&e), ["# Topic A\nalpha text", "# Topic B\nbeta text"]);
        assert_eq!(
            e.rebuild(&[1, 0]).as_deref(),
            Some("# Topic B\nbeta text\n\n# Topic A\nalpha text")
        );
    }

    #[test]
    fn markdown_deep_headings_and_fences_do_not_split() {
        let text = "Intro\n## One\n### x\nmore\n```sh\n# not a heading\n```\n## Two\nend";
        let e = extract(text, &with_mode(Mode::MarkdownHeader)).expect("found");
        assert_eq!(e.prefix(), "Intro\n");
        assert_eq!(
            ids(&e),
            [
                "## One\n### x\nmore\n```sh\n# not a heading\n```",
                "## Two\nend"
            ]
        );
        assert_eq!(
            e.rebuild(&[1, 0]).as_deref(),
            Some("Intro\n\n## Two\nend\n\n## One\n### x\nmore\n```sh\n# not a heading\n```")
        );
        let only_deep = "### a\nx\n### b\ny";
        assert!(extract(only_deep, &with_mode(Mode::MarkdownHeader)).is_none());
    }

    #[test]
    fn disabled_config_extracts_nothing() {
        let config = InterceptConfig {
            enabled: false,
            ..InterceptConfig::default()
        };
        assert!(extract(WRAPPED, &config).is_none());
    }
}
