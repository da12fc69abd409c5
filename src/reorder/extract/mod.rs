//! Finding retrieved documents inside chat requests and rebuilding them in
//! another order.
//!
//! Retrieval-augmented clients paste lists of documents into the system prompt
//! or get them back from tool calls. The daemon can only improve KV-cache reuse
//! (by reordering) or shrink a prompt (by dropping duplicates) if it can tell
//! where each document starts and ends, and then put the text back together
//! without losing anything else the client wrote. This module does exactly
//! that and nothing more: choosing the new order is the caller's business.
//!
//! Recognised layouts:
//! - XML-style tags (`<documents><document>..</document></documents>`),
//! - numbered lists (`[1] .. [2] ..`),
//! - JSON objects with a `results` array (what search tools return),
//! - blocks split by a separator line (opt-in),
//! - markdown sections (opt-in).
//!
//! The last two are opt-in because ordinary prompts are full of `---` lines
//! (YAML front matter) and `#` headings that are not document boundaries.
//!
//! Behaviour is tuned per request by [`InterceptConfig`], which the gateway
//! reads from `X-ContextPilot-*` headers (`gateway::headers`).
//!
//! The code is split by concern, and everything public is re-exported
//! here:
//! - `layouts`: finding a document list in one text and rebuilding the
//!   text in another order ([`extract`], [`Extraction`]);
//! - `locations`: where to look in a chat body and writing a rebuilt text
//!   back ([`find_documents`], [`replace_text`]);
//! - `markers`: [`strip_untrusted_markers`].

mod layouts;
mod locations;
mod markers;
#[cfg(test)]
mod properties;

pub use layouts::{extract, Extraction};
pub use locations::{find_documents, replace_text, Found, Location, Source};
pub use markers::strip_untrusted_markers;

pub const DEFAULT_TAG: &str = "document";
pub const DEFAULT_SEPARATOR: &str = "---";

/// Which layout to look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// XML, then JSON results, then numbered.
    Auto,
    /// XML only, with the configured tag tried before the standard ones.
    XmlTag,
    Numbered,
    JsonResults,
    Separator,
    MarkdownHeader,
}

impl Mode {
    /// A mode's name, any case; anything else is `auto`.
    pub fn parse(value: &str) -> Self {
        match value.trim().to_ascii_lowercase().as_str() {
            "xml_tag" => Mode::XmlTag,
            "numbered" => Mode::Numbered,
            "json_results" => Mode::JsonResults,
            "separator" => Mode::Separator,
            "markdown_header" => Mode::MarkdownHeader,
            _ => Mode::Auto,
        }
    }
}

/// Which parts of a request may be rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    System,
    ToolResults,
    All,
}

impl Scope {
    /// A scope's name, any case; anything else is `all`.
    pub fn parse(value: &str) -> Self {
        match value.trim().to_ascii_lowercase().as_str() {
            "system" => Scope::System,
            "tool_results" => Scope::ToolResults,
            _ => Scope::All,
        }
    }

    fn includes_system(self) -> bool {
        matches!(self, Scope::System | Scope::All)
    }

    fn includes_tool_results(self) -> bool {
        matches!(self, Scope::ToolResults | Scope::All)
    }
}

/// Per-request settings (parsed from `X-ContextPilot-*` headers by the
/// gateway, `gateway::headers`).
#[derive(Debug, Clone, PartialEq)]
pub struct InterceptConfig {
    pub enabled: bool,
    pub mode: Mode,
    pub tag: String,
    pub separator: String,
    pub scope: Scope,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: Mode::Auto,
            tag: DEFAULT_TAG.to_string(),
            separator: DEFAULT_SEPARATOR.to_string(),
            scope: Scope::All,
        }
    }
}

/// A tag name is spliced into `<name` searches, so anything that could end or
/// break a tag (`>`, `/`, spaces, quotes) would make the search meaningless.
pub fn is_valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 64
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(super) fn with_mode(mode: Mode) -> InterceptConfig {
        InterceptConfig {
            mode,
            ..InterceptConfig::default()
        }
    }

    pub(super) fn ids(extraction: &Extraction) -> Vec<&str> {
        extraction.identities().iter().map(String::as_str).collect()
    }

    // --- adversarial input --------------------------------------------------

    #[test]
    fn adversarial_inputs_do_not_panic() {
        let long_digits = format!("[{}] a [{}] b", "9".repeat(40), "1".repeat(25));
        let unterminated = "<document \"".repeat(2000);
        let inputs = [
            "",
            " ",
            "[",
            "text [",
            "[1",
            "[1]",
            "[]",
            "[99999999999999999999] a [100000000000000000000] b",
            "[18446744073709551615] a [18446744073709551616] b",
            long_digits.as_str(),
            "é[1]ü [2]ß",
            "[1]é[2]ü",
            "<document>unclosed",
            "<documents><document>A</document>",
            "<documents>",
            "</documents><documents",
            "<document",
            "<document ",
            "<document id=\"x",
            "<document id='x'",
            "</document><document>",
            "<document>é</document>ü<document>ß</document>",
            "<<<",
            "<<<EXTERNAL_UNTRUSTED_CONTENT id=\"",
            "{",
            "{\"results\":",
            "\n---\n",
            "# \n## ",
            "```\n# a\n",
            unterminated.as_str(),
        ];
        for input in inputs {
            for mode in super::properties::MODES {
                if let Some(e) = extract(input, &with_mode(mode)) {
                    let order: Vec<usize> = (0..e.len()).rev().collect();
                    assert!(e.rebuild(&order).is_some());
                }
            }
            let mut value = json!({ "messages": [{ "role": "tool", "content": input }] });
            let _ = find_documents(&value, &InterceptConfig::default());
            let _ = strip_untrusted_markers(&mut value);
        }
    }

    #[test]
    fn large_inputs_are_handled_whole() {
        // Each of these would take minutes if any scan restarted from the top
        // of the text per item or per marker (the suite would hang, not
        // fail a threshold).
        let n = 20_000;
        let many_docs: String = (0..n)
            .map(|i| format!("<document id=\"{i}\">doc {i}</document>\n"))
            .collect();
        let numbered: String = (1..=n)
            .map(|i| format!("[{i}] doc {i} cites [1]\n"))
            .collect();
        let inputs = [
            many_docs,
            numbered,
            "<document \"".repeat(n),
            "<document>".repeat(n),
            "[1] a ".repeat(n),
            "<<<EXTERNAL_UNTRUSTED_CONTENT id=\"ab".repeat(n),
        ];
        for input in &inputs {
            for mode in [Mode::Auto, Mode::XmlTag, Mode::Numbered] {
                if let Some(e) = extract(input, &with_mode(mode)) {
                    let order: Vec<usize> = (0..e.len()).rev().collect();
                    assert!(e.rebuild(&order).is_some());
                }
            }
            let mut value = json!(input);
            strip_untrusted_markers(&mut value);
        }
        let big = extract(&inputs[0], &InterceptConfig::default()).expect("found");
        assert_eq!(big.len(), n);
        let numbered = extract(&inputs[1], &InterceptConfig::default()).expect("found");
        assert_eq!(numbered.len(), n);
    }
}
