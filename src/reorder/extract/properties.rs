//! Properties of finding and rebuilding document lists: valid lists of
//! every layout are found and rebuilt in any order; mutated and random
//! texts give an extraction or nothing, never a panic, and an extraction
//! always rebuilds (XML byte for byte in its own order); orders are
//! accepted exactly when they are valid; a location that was found can be
//! written back; markers lose exactly their ids.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{json, Value};

use super::*;
use crate::testing;

pub(super) const MODES: [Mode; 6] = [
    Mode::Auto,
    Mode::XmlTag,
    Mode::Numbered,
    Mode::JsonResults,
    Mode::Separator,
    Mode::MarkdownHeader,
];

/// A document's text: no markup of any layout in it, and not blank.
fn body() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9é][a-zA-Z0-9 .,é]{0,16}"
}

/// Text around a list: no markup of any layout either.
fn around() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 .,:é\n]{0,24}"
}

/// A list of valid documents in one layout.
#[derive(Debug, Clone)]
struct List {
    text: String,
    config: InterceptConfig,
    /// What each document's identity must be, in order.
    identities: Vec<String>,
}

fn config(mode: Mode) -> InterceptConfig {
    InterceptConfig {
        mode,
        ..InterceptConfig::default()
    }
}

fn xml_list() -> impl Strategy<Value = List> {
    let tag = prop_oneof![
        select(&["document", "context", "doc", "passage", "reference", "file"][..])
            .prop_map(str::to_string),
        "[a-z][a-z_.-]{0,6}",
    ];
    (
        tag,
        any::<bool>(),
        vec(
            (
                body(),
                "[ \n\t]{0,2}",
                proptest::option::of("[a-z0-9 ]{0,6}"),
            ),
            1..8,
        ),
        around(),
        around(),
        "[ \n]{0,2}",
        any::<bool>(),
    )
        .prop_filter(
            "a list without a wrapper needs two documents",
            |(_, wrapped, docs, ..)| *wrapped || docs.len() >= 2,
        )
        .prop_map(|(tag, wrapped, docs, prefix, suffix, pad, auto)| {
            let mut text = prefix;
            if wrapped {
                text.push_str(&format!("<{tag}s>{pad}"));
            }
            for (i, (body, gap, id)) in docs.iter().enumerate() {
                if i > 0 {
                    text.push_str(gap);
                }
                match id {
                    Some(id) => text.push_str(&format!("<{tag} id=\"{id}\">{body}</{tag}>")),
                    None => text.push_str(&format!("<{tag}>{body}</{tag} >")),
                }
            }
            if wrapped {
                text.push_str(&format!("{pad}</{tag}s>"));
            }
            text.push_str(&suffix);
            List {
                text,
                config: InterceptConfig {
                    tag,
                    ..config(if auto { Mode::Auto } else { Mode::XmlTag })
                },
                identities: docs.iter().map(|(b, ..)| b.trim().to_string()).collect(),
            }
        })
}

fn numbered_list() -> impl Strategy<Value = List> {
    (
        vec(body(), 2..8),
        around(),
        0..1000u64,
        "[ \n]{1,2}",
        any::<bool>(),
    )
        .prop_map(|(docs, prefix, first, sep, auto)| {
            let mut text = prefix;
            for (i, doc) in docs.iter().enumerate() {
                text.push_str(&format!("[{}] {doc}{sep}", first + i as u64));
            }
            List {
                text,
                config: config(if auto { Mode::Auto } else { Mode::Numbered }),
                identities: docs.iter().map(|d| d.trim().to_string()).collect(),
            }
        })
}

fn json_item() -> impl Strategy<Value = Value> {
    prop_oneof![
        (body(), body()).prop_map(|(url, snippet)| json!({"url": url, "snippet": snippet})),
        (body(), any::<i32>()).prop_map(|(path, score)| json!({"path": path, "score": score})),
        body().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
    ]
}

fn json_list() -> impl Strategy<Value = List> {
    (vec(json_item(), 2..8), "[ \n]{0,2}", body(), any::<bool>()).prop_map(
        |(items, pad, query, auto)| {
            let object = json!({"query": query, "results": items});
            List {
                text: format!("{pad}{object}{pad}"),
                config: config(if auto { Mode::Auto } else { Mode::JsonResults }),
                identities: items.iter().map(Value::to_string).collect(),
            }
        },
    )
}

fn separator_list() -> impl Strategy<Value = List> {
    let separator = prop_oneof![Just(DEFAULT_SEPARATOR.to_string()), "[=*+~-]{3,5}"];
    (vec(body(), 2..8), separator).prop_map(|(docs, separator)| List {
        text: docs.join(&format!("\n{separator}\n")),
        config: InterceptConfig {
            separator,
            ..config(Mode::Separator)
        },
        identities: docs.iter().map(|d| d.trim().to_string()).collect(),
    })
}

fn markdown_list() -> impl Strategy<Value = List> {
    (
        vec((body(), "[a-z ]{0,20}", "#{1,2}"), 2..8),
        "[a-z .\n]{0,20}",
    )
        .prop_map(|(sections, prefix)| {
            let texts: Vec<String> = sections
                .iter()
                .map(|(title, body, level)| format!("{level} {title}\n{body}"))
                .collect();
            List {
                text: format!("{prefix}\n{}", texts.join("\n")),
                config: config(Mode::MarkdownHeader),
                identities: texts.iter().map(|t| t.trim().to_string()).collect(),
            }
        })
}

fn valid_list() -> impl Strategy<Value = List> {
    prop_oneof![
        xml_list(),
        numbered_list(),
        json_list(),
        separator_list(),
        markdown_list()
    ]
}

/// Markup of every layout, to insert into texts.
const TOKENS: &[&str] = &[
    "<document>",
    "</document>",
    "<documents>",
    "</documents>",
    "<document id=\"",
    "<doc/>",
    "<",
    ">",
    "\"",
    "'",
    "[1]",
    "[2]",
    "[18446744073709551616]",
    "[",
    "{\"results\": [",
    "{",
    "}",
    "\n---\n",
    "\n# ",
    "\n## ",
    "\n```\n",
    "é",
    "<<<EXTERNAL_UNTRUSTED_CONTENT id=\"ab\">>>",
];

/// Any mode, with any tag and separator (valid or not).
fn any_config() -> impl Strategy<Value = InterceptConfig> {
    (
        prop_oneof![3 => Just(Mode::Auto), 2 => select(&MODES[..])],
        prop_oneof![Just(DEFAULT_TAG.to_string()), "[a-z]{1,6}", ".{0,4}"],
        prop_oneof![3 => Just(DEFAULT_SEPARATOR.to_string()), 1 => ".{0,4}"],
        select(&[Scope::All, Scope::System, Scope::ToolResults][..]),
        proptest::bool::weighted(0.95),
    )
        .prop_map(|(mode, tag, separator, scope, enabled)| InterceptConfig {
            enabled,
            mode,
            tag,
            separator,
            scope,
        })
}

/// Valid lists, as they are and mutated, and random texts made of markup
/// and text.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => valid_list().prop_map(|l| l.text),
        4 => testing::mutated_text(valid_list().prop_map(|l| l.text), TOKENS, 3),
        1 => vec(prop_oneof![select(TOKENS).prop_map(str::to_string), ".{0,8}"], 0..24)
            .prop_map(|pieces| pieces.concat()),
        1 => ".{0,64}",
    ]
}

/// A valid order of `0..n`: a permutation of a subset of `min` or more.
fn valid_order(n: usize, min: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::sample::subsequence((0..n).collect::<Vec<_>>(), min..=n).prop_shuffle()
}

fn is_valid(order: &[usize], n: usize) -> bool {
    let mut seen = std::collections::HashSet::new();
    !order.is_empty() && order.iter().all(|&i| i < n && seen.insert(i))
}

/// The promises every extraction keeps, whatever text it came from.
fn check_extraction(
    text: &str,
    e: &Extraction,
    orders: &[Vec<usize>],
) -> Result<(), TestCaseError> {
    prop_assert!(!e.is_empty());
    prop_assert_eq!(e.labels().len(), e.len());
    prop_assert_eq!(e.contents().len(), e.len());
    let identity: Vec<usize> = (0..e.len()).collect();
    let rebuilt = e.rebuild(&identity);
    prop_assert!(rebuilt.is_some(), "the found order rebuilds");
    if e.kind() == "xml_tag" {
        prop_assert_eq!(
            rebuilt.as_deref(),
            Some(text),
            "XML in its own order is the input"
        );
    }
    for order in orders {
        // Indices past the end, repeats, the empty order: refused, not a
        // panic; every valid order rebuilds.
        let order: Vec<usize> = order.iter().map(|&i| i % (e.len() + 2)).collect();
        prop_assert_eq!(
            e.rebuild(&order).is_some(),
            is_valid(&order, e.len()),
            "{:?}",
            order
        );
    }
    Ok(())
}

/// The text at `location` in `body`, read independently of `replace_text`.
fn text_at<'v>(body: &'v Value, location: &Location) -> Option<&'v str> {
    let container = if location.top_level_system {
        body.get("system")?
    } else {
        body.get("messages")?
            .get(location.message)?
            .get("content")?
    };
    let block = |b: usize| container.get(b);
    match (location.block, location.inner) {
        (None, None) => container.as_str(),
        (Some(b), None) => {
            let block = block(b)?;
            block
                .get("text")
                .or_else(|| block.get("content"))
                .and_then(Value::as_str)
        }
        (Some(b), Some(i)) => block(b)?.get("content")?.get(i)?.get("text")?.as_str(),
        (None, Some(_)) => None,
    }
}

/// One message or system prompt holding `text` in one of the shapes
/// `find_documents` reads (and some it does not).
fn message(text: String) -> impl Strategy<Value = Value> {
    let role = select(
        &[
            "system",
            "system",
            "developer",
            "tool",
            "tool",
            "tool",
            "toolResult",
            "user",
            "user",
            "assistant",
            "",
        ][..],
    );
    (role, 0..5u8, Just(text)).prop_map(|(role, shape, text)| match shape {
        0 => json!({"role": role, "content": text}),
        1 => json!({"role": role, "content": [
            {"type": "text", "text": "intro"},
            {"type": "text", "text": text},
        ]}),
        2 => json!({"role": role, "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": text},
        ]}),
        3 => json!({"role": role, "content": [
            {"type": "tool_result", "content": [{"type": "image"}, {"type": "text", "text": text}]},
        ]}),
        _ => json!({"role": role, "content": {"text": text}}),
    })
}

fn chat_body() -> impl Strategy<Value = Value> {
    (
        vec(any_text().prop_flat_map(message), 0..8),
        proptest::option::of(prop_oneof![
            any_text().prop_map(Value::from),
            any_text().prop_map(|t| json!([{"type": "text", "text": t}])),
        ]),
    )
        .prop_map(|(messages, system)| {
            let mut body = json!({ "messages": messages });
            if let Some(system) = system {
                body["system"] = system;
            }
            body
        })
}

/// A text with untrusted-content markers, and the same text with their
/// ids removed, and how many there are.
fn marked_text() -> impl Strategy<Value = (String, String, usize)> {
    let piece = prop_oneof![
        3 => "[a-z <>=\"]{0,8}".prop_map(|t| (t.clone(), t, 0)),
        2 => ("[0-9a-fA-F]{1,16}", any::<bool>(), any::<bool>(), "[ \t]{1,2}").prop_map(
            |(id, end, escaped, space)| {
                let name = if end {
                    "END_EXTERNAL_UNTRUSTED_CONTENT"
                } else {
                    "EXTERNAL_UNTRUSTED_CONTENT"
                };
                let q = if escaped { "\\\"" } else { "\"" };
                (format!("<<<{name}{space}id={q}{id}{q}>>>"), format!("<<<{name}>>>"), 1)
            }
        ),
        // Not markers: no id, an id that is not hex, no space, no quotes.
        1 => select(&[
            "<<<EXTERNAL_UNTRUSTED_CONTENT>>>",
            "<<<EXTERNAL_UNTRUSTED_CONTENT id=\"xyz\">>>",
            "<<<EXTERNAL_UNTRUSTED_CONTENTid=\"ab\">>>",
            "<<<EXTERNAL_UNTRUSTED_CONTENT id=ab>>>",
            "<<<EXTERNAL_UNTRUSTED_CONTENT id=\"ab\" >>>",
            "<<<<",
        ][..]).prop_map(|t| (t.to_string(), t.to_string(), 0)),
    ];
    vec(piece, 0..10).prop_map(|pieces| {
        let mut text = String::new();
        let mut stripped = String::new();
        let mut count = 0;
        for (t, s, n) in pieces {
            text.push_str(&t);
            stripped.push_str(&s);
            count += n;
        }
        (text, stripped, count)
    })
}

proptest! {
    #![proptest_config(testing::config(256))]

    /// A valid list of any layout is found whole, and rebuilds in any
    /// order into a text that is found again in that order.
    #[test]
    fn valid_lists_are_found_and_rebuilt_in_any_order(
        (list, order) in valid_list().prop_flat_map(|list| {
            // Two documents at least, where there are two: one alone in a
            // list is a list only inside a wrapper.
            let n = list.identities.len();
            (Just(list), valid_order(n, n.min(2)))
        }),
    ) {
        let e = extract(&list.text, &list.config)
            .ok_or_else(|| TestCaseError::fail(format!("nothing found in {:?}", list.text)))?;
        prop_assert_eq!(e.identities(), &list.identities[..]);
        check_extraction(&list.text, &e, &[])?;
        let rebuilt = e.rebuild(&order).unwrap();
        let again = extract(&rebuilt, &list.config)
            .ok_or_else(|| TestCaseError::fail(format!("nothing found in rebuilt {rebuilt:?}")))?;
        let want: Vec<&str> = order.iter().map(|&i| list.identities[i].as_str()).collect();
        prop_assert_eq!(again.identities().iter().map(String::as_str).collect::<Vec<_>>(), want);
    }

    /// Mutated lists and random texts, in every mode: an extraction that
    /// keeps its promises, or nothing.
    #[test]
    fn any_text_extracts_or_not_without_panic(
        text in any_text(),
        config in any_config(),
        orders in vec(vec(any::<usize>(), 0..10), 0..4),
    ) {
        for mode in MODES {
            let config = InterceptConfig { mode, ..config.clone() };
            if let Some(e) = extract(&text, &config) {
                prop_assert!(config.enabled);
                check_extraction(&text, &e, &orders)?;
            }
        }
    }

    /// Random chat bodies: every list found sits where its location says,
    /// is the extraction of that text, and can be written back there (in
    /// its own order, XML leaves the body as it was).
    #[test]
    fn found_documents_can_be_written_back(body in chat_body(), config in any_config()) {
        for found in find_documents(&body, &config) {
            let text = text_at(&body, &found.location)
                .ok_or_else(|| TestCaseError::fail(format!("no text at {:?}", found.location)))?;
            let again = extract(text, &config).map(|e| e.identities().to_vec());
            prop_assert_eq!(again.as_deref(), Some(found.extraction.identities()));
            let identity: Vec<usize> = (0..found.extraction.len()).collect();
            let rebuilt = found.extraction.rebuild(&identity).unwrap();
            let mut copy = body.clone();
            prop_assert!(replace_text(&mut copy, &found.location, rebuilt.clone()));
            prop_assert_eq!(text_at(&copy, &found.location), Some(rebuilt.as_str()));
            if found.extraction.kind() == "xml_tag" {
                prop_assert_eq!(&copy, &body);
            }
        }
    }

    /// Any location in any body: written when a string is there, else
    /// nothing changes.
    #[test]
    fn replace_text_changes_only_strings(
        body in chat_body(),
        location in (
            any::<bool>(),
            0..8usize,
            proptest::option::of(0..4usize),
            proptest::option::of(0..3usize),
        )
            .prop_map(|(top_level_system, message, block, inner)| Location {
                top_level_system,
                message,
                block,
                inner,
            }),
    ) {
        let mut copy = body.clone();
        if replace_text(&mut copy, &location, "new".to_string()) {
            prop_assert_eq!(text_at(&copy, &location), Some("new"));
        } else {
            prop_assert_eq!(copy, body);
        }
    }

    /// Exactly the markers' ids go, wherever the strings sit; a second pass
    /// finds nothing.
    #[test]
    fn markers_lose_exactly_their_ids(
        marked in vec(marked_text(), 1..4),
        mutated in any_text(),
    ) {
        let strings: Vec<Value> = marked.iter().map(|(t, ..)| Value::from(t.as_str())).collect();
        let stripped: Vec<&str> = marked.iter().map(|(_, s, _)| s.as_str()).collect();
        let mut value = json!({
            "messages": [{"content": strings}],
            "other": {"deep": [[marked[0].0]]},
            "n": 5,
        });
        let want = json!({
            "messages": [{"content": stripped}],
            "other": {"deep": [[marked[0].1]]},
            "n": 5,
        });
        let count: usize = marked.iter().map(|(.., n)| n).sum::<usize>() + marked[0].2;
        prop_assert_eq!(strip_untrusted_markers(&mut value), count);
        prop_assert_eq!(&value, &want);
        prop_assert_eq!(strip_untrusted_markers(&mut value), 0);

        let mut value = Value::from(mutated);
        strip_untrusted_markers(&mut value);
        let once = value.clone();
        prop_assert_eq!(strip_untrusted_markers(&mut value), 0);
        prop_assert_eq!(value, once);
    }
}
