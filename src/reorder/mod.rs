//! Context reordering for requests that carry `documents`.
//!
//! The caller sends an OpenAI chat request with a top-level `documents`
//! list in relevance order. The daemon renders the system message itself:
//! the caller's system text, then the documents numbered `[1]..[n]` in an
//! order chosen for the KV cache, then an importance ranking that lists those
//! positions in the original relevance order, so the model still knows what
//! matters most and the ranking (after the documents) never breaks a shared
//! prefix.
//!
//! The order is chosen together with the slot ([`DocumentsPolicy`]): for
//! every free slot, the longest run of documents at the start of what that
//! slot holds that this request also has is reusable as-is. Each slot is
//! priced in predicted time (`slots::Pricing`) twice: with its run first and
//! the other documents in one canonical order (first seen first, so later
//! requests over the same documents converge on the same prefix), and in the
//! client's order. The reordered layout is used only when it saves at least
//! [`GainThreshold`], counting what its canonical head saves later requests.

pub mod cluster;
pub mod conversation;
pub mod dedup;
pub mod extract;
pub mod infer;
pub mod live;
pub mod prepare;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;

use crate::slots::{
    Block, BlockSeq, Choice, ChoiceInput, Pricing, RamTier, Reuse, SlotContents, SlotDecision,
    SlotPolicy,
};

/// The fixed instruction line before the documents.
const INSTRUCTION: &str = "Answer the question based on the provided documents.";
/// Longest document id accepted (ids are kept in the registry).
const MAX_ID_BYTES: usize = 256;
/// Bound on the canonical-order table; past it the table starts over (the
/// order is a convergence aid, not state anyone depends on).
const MAX_KNOWN_DOCUMENTS: usize = 200_000;

/// One document of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub id: Option<String>,
    pub text: String,
    pub hash: u64,
    pub tokens: u32,
}

/// FNV-1a, 64 bit: a stable identity for document text within a daemon run.
pub fn text_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A rough token count (about four bytes per token for English text); used
/// only to weigh reusable runs and to predict reuse, which the meter checks
/// against llama.cpp's own count.
pub fn estimate_tokens(text: &str) -> u32 {
    (text.len() as u32).div_ceil(4).max(1)
}

/// The documents of a request, in relevance order, with exact duplicates
/// dropped (counted in `deduped`).
#[derive(Debug, Clone, PartialEq)]
pub struct Documents {
    pub docs: Vec<Document>,
    pub deduped: usize,
}

/// Parses `documents`: strings or `{"id", "text"}` objects.
pub fn parse_documents(value: &Value) -> Result<Documents, String> {
    let Value::Array(items) = value else {
        return Err("`documents` must be an array of strings or {\"id\", \"text\"} objects".into());
    };
    let mut docs = Vec::with_capacity(items.len());
    let mut seen = HashSet::new();
    let mut ids: HashMap<&str, u64> = HashMap::new();
    let mut deduped = 0;
    for (i, item) in items.iter().enumerate() {
        let (id, text) = match item {
            Value::String(text) => (None, text.as_str()),
            Value::Object(fields) => {
                let Some(Value::String(text)) = fields.get("text") else {
                    return Err(format!("documents[{i}] needs a string `text`"));
                };
                let id = match fields.get("id") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(id)) if id.len() > MAX_ID_BYTES => {
                        return Err(format!(
                            "documents[{i}].id is longer than {MAX_ID_BYTES} bytes"
                        ))
                    }
                    Some(Value::String(id)) => Some(id.as_str()),
                    Some(_) => return Err(format!("documents[{i}].id must be a string")),
                };
                (id, text.as_str())
            }
            _ => {
                return Err(format!(
                    "documents[{i}] must be a string or an {{\"id\", \"text\"}} object"
                ))
            }
        };
        let hash = text_hash(text);
        if let Some(id) = id {
            if let Some(previous) = ids.insert(id, hash) {
                if previous != hash {
                    return Err(format!(
                        "document id {id:?} is given twice with different text"
                    ));
                }
            }
        }
        if !seen.insert(hash) {
            deduped += 1;
            continue;
        }
        docs.push(Document {
            id: id.map(str::to_string),
            text: text.to_string(),
            hash,
            tokens: estimate_tokens(text),
        });
    }
    if docs.is_empty() {
        return Err("`documents` must not be empty".into());
    }
    Ok(Documents { docs, deduped })
}

/// The daemon-wide memory of documents: the canonical order (first seen
/// first) and which id named which text.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    first_seen: HashMap<u64, u64>,
    ids: HashMap<String, u64>,
    next: u64,
}

impl Registry {
    /// The rank the next new document gets: documents ranked below it were
    /// seen in earlier requests.
    pub fn next_rank(&self) -> u64 {
        crate::sync::lock(&self.inner).next
    }

    /// Notes the documents and returns each one's canonical rank. An id seen
    /// before with different text is an error.
    pub fn observe(&self, docs: &[Document]) -> Result<Vec<u64>, String> {
        let mut inner = crate::sync::lock(&self.inner);
        // Check every id before storing any, so a refused request leaves
        // nothing behind.
        for doc in docs {
            if let Some(id) = &doc.id {
                if inner.ids.get(id).is_some_and(|hash| *hash != doc.hash) {
                    return Err(format!(
                        "document id {id:?} was sent before with different text; ids must name one text"
                    ));
                }
            }
        }
        if inner.first_seen.len() + docs.len() > MAX_KNOWN_DOCUMENTS
            || inner.ids.len() + docs.len() > MAX_KNOWN_DOCUMENTS
        {
            *inner = RegistryInner::default();
        }
        for doc in docs {
            if let Some(id) = &doc.id {
                inner.ids.entry(id.clone()).or_insert(doc.hash);
            }
        }
        Ok(docs
            .iter()
            .map(|doc| {
                let next = inner.next;
                let rank = *inner.first_seen.entry(doc.hash).or_insert(next);
                if rank == next {
                    inner.next += 1;
                }
                rank
            })
            .collect())
    }
}

/// What the reordering did to one request; part of its query-log record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReorderInfo {
    pub documents: usize,
    /// Documents not at their relevance position.
    pub moved: usize,
    /// Exact duplicates dropped from the request.
    pub deduped: usize,
    /// Tokens the daemon expects llama.cpp to reuse (an estimate).
    pub predicted_reused_tokens: u32,
    /// "cached-prefix": the slot held some of these documents at the start;
    /// "ram-cache": llama-server's RAM prompt cache holds a prompt starting
    /// with some of them, which it loads into the slot; "header": only the
    /// text before the documents matched; "lru": none of these (an empty or
    /// the least valuable slot).
    pub slot_choice: &'static str,
    /// Whether the documents left the client's order: only when that is
    /// predicted to save at least `[reorder] min_gain_ms` and
    /// `min_gain_share` of the prompt time.
    pub reordered: bool,
    /// The predicted saving of the reordered layout over the client's order.
    pub predicted_gain_ms: f64,
}

/// When reordering is worth changing the client's order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GainThreshold {
    pub min_ms: f64,
    pub min_share: f64,
}

impl Default for GainThreshold {
    fn default() -> Self {
        GainThreshold {
            min_ms: 5.0,
            min_share: 0.05,
        }
    }
}

/// Chooses the slot and the document order together (see the module doc).
pub struct DocumentsPolicy<'a> {
    pub header: u64,
    pub header_tokens: u32,
    pub docs: &'a [Document],
    /// Canonical rank of each document (same indexing as `docs`).
    pub ranks: &'a [u64],
    /// Estimated tokens after the documents (ranking, question, history).
    pub tail_tokens: u32,
    /// Documents ranked below this were seen in earlier requests
    /// ([`Registry::next_rank`] before this request was observed): the ones
    /// later requests are likely to share.
    pub known_before: u64,
    pub threshold: GainThreshold,
    /// Filled by `choose`: indices into `docs` in prompt order.
    pub order: Vec<usize>,
    pub info: Option<ReorderInfo>,
    pub blocks: Option<Arc<BlockSeq>>,
}

/// One way to lay out the request's documents on one slot.
struct Layout {
    /// The documents reused from the slot (or RAM cache), in their order.
    run: Vec<usize>,
    ram_entry: Option<usize>,
}

impl<'a> DocumentsPolicy<'a> {
    pub fn new(header: u64, header_tokens: u32, docs: &'a [Document], ranks: &'a [u64]) -> Self {
        DocumentsPolicy {
            header,
            header_tokens,
            docs,
            ranks,
            tail_tokens: 0,
            known_before: 0,
            threshold: GainThreshold::default(),
            order: Vec::new(),
            info: None,
            blocks: None,
        }
    }

    fn prompt_tokens(&self) -> u64 {
        u64::from(self.header_tokens)
            + self.docs.iter().map(|d| u64::from(d.tokens)).sum::<u64>()
            + u64::from(self.tail_tokens)
    }

    /// The reordered layout: `run` first, the rest in canonical order.
    fn reordered(&self, run: &[usize]) -> Vec<usize> {
        let mut in_run = vec![false; self.docs.len()];
        for &i in run {
            in_run[i] = true;
        }
        let mut order = run.to_vec();
        let mut rest: Vec<usize> = (0..self.docs.len()).filter(|&i| !in_run[i]).collect();
        rest.sort_by_key(|&i| self.ranks[i]);
        order.extend(rest);
        order
    }

    /// Estimated tokens of the documents at the head of `order` that were
    /// seen in earlier requests: what the slot will hold that later requests
    /// are likely to reuse.
    fn shared_head_tokens(&self, order: &[usize]) -> u64 {
        order
            .iter()
            .take_while(|&&i| self.ranks[i] < self.known_before)
            .map(|&i| u64::from(self.docs[i].tokens))
            .sum()
    }

    /// The reusable run of a held prompt for this request when the request
    /// follows it: (tokens, documents).
    fn reusable(&self, seq: Option<&BlockSeq>, index: &HashMap<u64, usize>) -> (u32, Vec<usize>) {
        let Some(seq) = seq.filter(|b| b.header == self.header) else {
            return (0, Vec::new());
        };
        let run: Vec<usize> = seq
            .blocks
            .iter()
            .map_while(|b| index.get(&b.hash).copied())
            .collect();
        let tokens = self.header_tokens + run.iter().map(|&i| self.docs[i].tokens).sum::<u32>();
        (tokens, run)
    }

    /// What a held prompt shares with the request in the client's order:
    /// the header and the documents at the same positions.
    fn reusable_in_client_order(&self, seq: Option<&BlockSeq>) -> (u32, usize) {
        let Some(seq) = seq.filter(|b| b.header == self.header) else {
            return (0, 0);
        };
        let same = seq
            .blocks
            .iter()
            .zip(self.docs)
            .take_while(|(b, d)| b.hash == d.hash)
            .count();
        let tokens = self.header_tokens + self.docs[..same].iter().map(|d| d.tokens).sum::<u32>();
        (tokens, same)
    }

    /// The RAM cache entry llama-server would load for this request: the
    /// one sharing the most, among those sharing at least a quarter of
    /// their own length. (index, tokens, run).
    fn best_in_ram(
        &self,
        ram: &RamTier,
        index: &HashMap<u64, usize>,
    ) -> Option<(usize, u32, Vec<usize>)> {
        if !ram.enabled() {
            return None;
        }
        ram.entries()
            .iter()
            .enumerate()
            .filter_map(|(i, entry)| {
                let (tokens, run) = self.reusable(Some(entry), index);
                (!run.is_empty() && u64::from(tokens) * 4 >= entry.tokens())
                    .then_some((i, tokens, run))
            })
            // The most tokens; on a tie the newest entry.
            .max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)))
    }
}

impl SlotPolicy for DocumentsPolicy<'_> {
    fn choose(&mut self, input: ChoiceInput<'_>) -> Choice {
        let ChoiceInput {
            slots,
            ram,
            cost,
            now,
        } = input;
        let pricing = Pricing {
            slots,
            ram_tier: ram.enabled(),
            cost,
            now,
        };
        let index: HashMap<u64, usize> = self
            .docs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.hash, i))
            .collect();
        let prompt = self.prompt_tokens();
        let from_ram = self.best_in_ram(ram, &index);
        let reuse = |reused: u32, restored: u32, kept: u32| Reuse {
            prompt,
            reused: u64::from(reused),
            restored: u64::from(restored),
            kept: u64::from(kept),
        };
        // Reordered: the run the slot holds first, or, when the slot would
        // keep less than half of what it holds (llama-server then consults
        // its RAM cache; an empty slot never does), the best entry there.
        let (with_reorder, free) = pricing.cheapest(|_, s| {
            let held = s.holds.blocks.as_deref();
            let (tokens, run) = self.reusable(held, &index);
            let keeps_little = held.is_none_or(|h| u64::from(tokens) * 2 < h.tokens());
            match &from_ram {
                Some((e, ram_tokens, ram_run))
                    if !s.holds.is_empty() && keeps_little && *ram_tokens > tokens =>
                {
                    let layout = Layout {
                        run: ram_run.clone(),
                        ram_entry: Some(*e),
                    };
                    (reuse(*ram_tokens, *ram_tokens, tokens), layout)
                }
                _ => {
                    let layout = Layout {
                        run,
                        ram_entry: None,
                    };
                    (reuse(tokens, 0, tokens), layout)
                }
            }
        });
        // In the client's order: what the slot holds at the same positions.
        let (in_client_order, _) = pricing.cheapest(|_, s| {
            let (tokens, same) = self.reusable_in_client_order(s.holds.blocks.as_deref());
            let layout = Layout {
                run: (0..same).collect(),
                ram_entry: None,
            };
            (reuse(tokens, 0, tokens), layout)
        });
        // The scheduler guarantees a free slot; slot 0 keeps this total.
        let fallback = || {
            let layout = Layout {
                run: Vec::new(),
                ram_entry: None,
            };
            (pricing.price(0, reuse(0, 0, 0)), layout)
        };
        let with_reorder = with_reorder.unwrap_or_else(fallback);
        let in_client_order = in_client_order.unwrap_or_else(fallback);
        // Quality wins ties: the client's (relevance) order stays unless
        // reordering is predicted to save real time, now (what this request
        // reuses) or later (a head of documents seen before, in the order
        // every request puts them in, that later requests reuse; weighted
        // like an unproven slot's contents, see `slot_value_ms`).
        let reordered_order = self.reordered(&with_reorder.1.run);
        let client_order: Vec<usize> = (0..self.docs.len()).collect();
        let later_ms = (cost.compute_ms(self.shared_head_tokens(&reordered_order))
            - cost.compute_ms(self.shared_head_tokens(&client_order)))
            * crate::slots::reuse_chance(0);
        let gain_ms = in_client_order.0.score_ms() - with_reorder.0.score_ms() + later_ms;
        let pays = gain_ms >= self.threshold.min_ms
            && gain_ms >= self.threshold.min_share * in_client_order.0.prompt_ms;
        let ((c, chosen), order) = if pays {
            (with_reorder, reordered_order)
        } else {
            (in_client_order, client_order)
        };
        if let Some(e) = chosen.ram_entry {
            ram.take(e);
        }
        let moved = order
            .iter()
            .enumerate()
            .filter(|(pos, &i)| *pos != i)
            .count();
        let blocks = Arc::new(BlockSeq {
            header: self.header,
            header_tokens: self.header_tokens,
            blocks: order
                .iter()
                .map(|&i| Block {
                    hash: self.docs[i].hash,
                    tokens: self.docs[i].tokens,
                })
                .collect(),
        });
        let slot_choice = match (chosen.run.is_empty(), c.reused_tokens > 0) {
            (false, _) if chosen.ram_entry.is_some() => "ram-cache",
            (false, _) => "cached-prefix",
            (true, true) => "header",
            (true, false) => "lru",
        };
        let decision_choice = match slot_choice {
            "lru" | "header" => crate::slots::empty_or_least_valuable(&slots[c.slot]),
            other => other,
        };
        self.info = Some(ReorderInfo {
            documents: self.docs.len(),
            moved,
            deduped: 0,
            predicted_reused_tokens: c.reused_tokens.min(u64::from(u32::MAX)) as u32,
            slot_choice,
            reordered: pays,
            predicted_gain_ms: (gain_ms.max(0.0) * 100.0).round() / 100.0,
        });
        self.order = order;
        self.blocks = Some(blocks.clone());
        Choice {
            slot: c.slot,
            contents: SlotContents {
                key: Arc::from(""),
                blocks: Some(blocks),
            },
            decision: SlotDecision::from_candidate(decision_choice, &c, free),
            hit: !chosen.run.is_empty(),
        }
    }
}

/// The system message for `docs` in `order`, after the caller's own system
/// text.
pub fn render_system(caller_system: Option<&str>, docs: &[Document], order: &[usize]) -> String {
    let mut out = String::new();
    if let Some(system) = caller_system.filter(|s| !s.is_empty()) {
        out.push_str(system);
        out.push_str("\n\n");
    }
    out.push_str(INSTRUCTION);
    out.push_str("\n\n<documents>\n");
    for (pos, &i) in order.iter().enumerate() {
        out.push_str(&format!("[{}] {}\n", pos + 1, docs[i].text));
    }
    out.push_str("</documents>\n\nRead the documents in this importance ranking: ");
    let mut position = vec![0; docs.len()];
    for (pos, &i) in order.iter().enumerate() {
        position[i] = pos + 1;
    }
    let ranking: Vec<String> = position.iter().map(|p| p.to_string()).collect();
    out.push_str(&ranking.join(" > "));
    out.push_str("\nPrioritize information from higher-ranked documents.");
    out
}

/// Estimated tokens after the documents of a rendered request: the
/// caller's other messages, and the ranking line (a few tokens a document).
pub fn tail_tokens(messages: &[Value], documents: usize) -> u64 {
    let bytes: usize = messages.iter().map(|m| m.to_string().len()).sum();
    crate::slots::tokens_of_bytes(bytes) + 3 * documents as u64 + 16
}

/// What precedes the documents in the prompt: its identity and size.
pub fn header_of(caller_system: Option<&str>) -> (u64, u32) {
    let text = format!("{}\n{INSTRUCTION}", caller_system.unwrap_or(""));
    // A few tokens for the chat template's own start.
    (text_hash(&text), estimate_tokens(&text) + 8)
}

/// Takes the caller's system text out of `messages` (the first system
/// message, which must be a string), for the rendered one to replace.
pub fn take_caller_system(messages: &mut Vec<Value>) -> Result<Option<String>, String> {
    let Some(pos) = messages
        .iter()
        .position(|m| m.get("role").and_then(Value::as_str) == Some("system"))
    else {
        return Ok(None);
    };
    match messages[pos].get("content") {
        Some(Value::String(text)) => {
            let text = text.clone();
            messages.remove(pos);
            Ok(Some(text))
        }
        None | Some(Value::Null) => {
            messages.remove(pos);
            Ok(None)
        }
        Some(_) => Err("with `documents`, the system message's content must be a string".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::CostView;
    use crate::slots::{SlotContents, SlotState};

    /// Runs a policy's choice with the tests' cost figures (1 ms a token).
    fn pick(policy: &mut impl SlotPolicy, slots: &[SlotState], ram: &mut RamTier) -> Choice {
        policy.choose(ChoiceInput {
            slots,
            ram,
            cost: &CostView::for_tests(),
            now: std::time::Instant::now(),
        })
    }

    /// Reorder whenever it saves anything, to test the mechanics.
    const ALWAYS: GainThreshold = GainThreshold {
        min_ms: 0.0,
        min_share: 0.0,
    };

    fn docs(texts: &[&str]) -> Vec<Document> {
        parse_documents(&serde_json::json!(texts)).unwrap().docs
    }

    #[test]
    fn parsing_strings_objects_duplicates_and_errors() {
        let parsed = parse_documents(
            &serde_json::json!(["a", {"id": "x", "text": "b"}, "a", {"text": "c"}]),
        )
        .unwrap();
        assert_eq!(parsed.docs.len(), 3);
        assert_eq!(parsed.deduped, 1);
        assert_eq!(parsed.docs[1].id.as_deref(), Some("x"));
        for bad in [
            serde_json::json!("a"),
            serde_json::json!([]),
            serde_json::json!([1]),
            serde_json::json!([{"id": "x"}]),
            serde_json::json!([{"id": "x", "text": "a"}, {"id": "x", "text": "b"}]),
        ] {
            assert!(parse_documents(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn registry_ranks_by_first_sight_and_pins_ids() {
        let registry = Registry::default();
        let first = parse_documents(&serde_json::json!([{"id": "a", "text": "A"}, "B"])).unwrap();
        assert_eq!(registry.observe(&first.docs).unwrap(), vec![0, 1]);
        let second = docs(&["C", "B"]);
        assert_eq!(registry.observe(&second).unwrap(), vec![2, 1]);
        let clash = parse_documents(&serde_json::json!([{"id": "a", "text": "not A"}])).unwrap();
        assert!(registry.observe(&clash.docs).is_err());
    }

    /// The example of the reference system's first-call/second-call pair:
    /// A, B, C then D, B, A reordered to A, B, D with ranking 3 > 2 > 1.
    #[test]
    fn render_matches_the_reference_layout() {
        let d = docs(&["Doc D text", "Doc B text", "Doc A text"]);
        let text = render_system(None, &d, &[2, 1, 0]);
        assert_eq!(
            text,
            "Answer the question based on the provided documents.\n\n<documents>\n[1] Doc A text\n[2] Doc B text\n\
             [3] Doc D text\n</documents>\n\nRead the documents in this importance ranking: 3 > 2 > 1\n\
             Prioritize information from higher-ranked documents."
        );
        let with_system = render_system(Some("You are terse."), &d, &[0, 1, 2]);
        assert!(with_system.starts_with("You are terse.\n\nAnswer the question"));
        assert!(with_system
            .ends_with("ranking: 1 > 2 > 3\nPrioritize information from higher-ranked documents."));
    }

    fn slot_holding(header: u64, held: &[Document], age: u64) -> SlotState {
        SlotState {
            busy: false,
            holds: SlotContents {
                key: Arc::from(""),
                blocks: Some(Arc::new(BlockSeq {
                    header,
                    header_tokens: 0,
                    blocks: held
                        .iter()
                        .map(|d| Block {
                            hash: d.hash,
                            tokens: d.tokens,
                        })
                        .collect(),
                })),
            },
            last_used: std::time::Instant::now().checked_sub(std::time::Duration::from_secs(age)),
            ..SlotState::default()
        }
    }

    #[test]
    fn the_slot_holding_the_longest_run_wins_and_its_run_goes_first() {
        let all = docs(&[
            "alpha text",
            "beta text",
            "gamma text",
            "delta text",
            "epsilon text",
        ]);
        let (header, header_tokens) = header_of(None);
        // Slot 0 holds alpha, beta, gamma; slot 1 holds delta only.
        let slots = vec![
            slot_holding(header, &all[0..3], 5),
            slot_holding(header, &all[3..4], 50),
            SlotState::default(),
        ];
        // The request: epsilon, beta, alpha, delta (relevance order).
        let request = vec![
            all[4].clone(),
            all[1].clone(),
            all[0].clone(),
            all[3].clone(),
        ];
        let ranks = vec![4, 1, 0, 3];
        let mut policy = DocumentsPolicy::new(header, header_tokens, &request, &ranks);
        policy.threshold = ALWAYS;
        let choice = pick(&mut policy, &slots, &mut RamTier::default());
        let (slot, contents) = (choice.slot, choice.contents);
        assert_eq!(slot, 0);
        // alpha, beta (slot 0's run), then delta, epsilon by canonical rank.
        assert_eq!(policy.order, vec![2, 1, 3, 0]);
        let info = policy.info.unwrap();
        assert_eq!(info.slot_choice, "cached-prefix");
        assert_eq!(
            info.predicted_reused_tokens,
            header_tokens + all[0].tokens + all[1].tokens
        );
        assert_eq!(info.moved, 3, "beta stays second");
        assert_eq!(contents.blocks.unwrap().blocks.len(), 4);
    }

    /// Quality wins ties: with nothing reusable, or a saving under the
    /// threshold, the documents keep the client's relevance order.
    #[test]
    fn the_client_order_stays_unless_reordering_pays() {
        let all = docs(&["alpha text", "beta text", "gamma text"]);
        let (header, header_tokens) = header_of(None);
        // Nothing held anywhere: no reason to move anything.
        let request = vec![all[2].clone(), all[0].clone(), all[1].clone()];
        let ranks = vec![2, 0, 1];
        let mut policy = DocumentsPolicy::new(header, header_tokens, &request, &ranks);
        pick(
            &mut policy,
            &[SlotState::default()],
            &mut RamTier::default(),
        );
        assert_eq!(policy.order, vec![0, 1, 2]);
        let info = policy.info.unwrap();
        assert!(!info.reordered);
        assert_eq!(info.moved, 0);
        // A slot holds alpha, beta: reordering saves their few tokens, under
        // a 1 s threshold but over none.
        let slots = vec![slot_holding(header, &all[0..2], 5)];
        let mut policy = DocumentsPolicy::new(header, header_tokens, &request, &ranks);
        policy.threshold = GainThreshold {
            min_ms: 1000.0,
            min_share: 0.0,
        };
        pick(&mut policy, &slots, &mut RamTier::default());
        assert_eq!(policy.order, vec![0, 1, 2], "the saving is under 1 s");
        let mut policy = DocumentsPolicy::new(header, header_tokens, &request, &ranks);
        policy.threshold = ALWAYS;
        let choice = pick(&mut policy, &slots, &mut RamTier::default());
        assert_eq!(policy.order, vec![1, 2, 0]);
        let info = policy.info.unwrap();
        assert!(info.reordered && info.predicted_gain_ms > 0.0);
        assert_eq!(choice.decision.choice, "cached-prefix");
    }

    /// Documents seen in earlier requests are put in the order every
    /// request puts them in even when nothing is reusable yet: later
    /// requests reuse that head. Documents never seen keep the client's order.
    #[test]
    fn documents_seen_before_lead_in_canonical_order_for_later_requests() {
        let texts: Vec<String> = ["alpha", "beta", "gamma", "delta"]
            .iter()
            .map(|w| format!("{w} {}", "long document text ".repeat(20)))
            .collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let all = docs(&texts);
        let (header, header_tokens) = header_of(None);
        // delta (rank 3) is new; alpha, beta, gamma (ranks 0-2) were seen.
        let request = vec![
            all[3].clone(),
            all[2].clone(),
            all[0].clone(),
            all[1].clone(),
        ];
        let ranks = vec![3, 2, 0, 1];
        let mut policy = DocumentsPolicy::new(header, header_tokens, &request, &ranks);
        policy.known_before = 3;
        pick(
            &mut policy,
            &[SlotState::default()],
            &mut RamTier::default(),
        );
        assert_eq!(
            policy.order,
            vec![2, 3, 1, 0],
            "alpha, beta, gamma, then delta"
        );
        let info = policy.info.unwrap();
        assert!(info.reordered && info.predicted_gain_ms > 5.0, "{info:?}");
        // Nothing seen before: nothing to converge on, the client's order.
        let mut policy = DocumentsPolicy::new(header, header_tokens, &request, &ranks);
        policy.known_before = 0;
        pick(
            &mut policy,
            &[SlotState::default()],
            &mut RamTier::default(),
        );
        assert_eq!(policy.order, vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_different_header_reuses_nothing_and_lru_decides() {
        let all = docs(&["alpha text", "beta text"]);
        let (header, header_tokens) = header_of(Some("other system"));
        let slots = vec![
            slot_holding(header ^ 1, &all, 1),
            slot_holding(header ^ 1, &all, 100),
        ];
        let ranks = vec![0, 1];
        let mut policy = DocumentsPolicy::new(header, header_tokens, &all, &ranks);
        let slot = pick(&mut policy, &slots, &mut RamTier::default()).slot;
        assert_eq!(slot, 1, "least recently used");
        assert_eq!(
            policy.order,
            vec![0, 1],
            "canonical order = relevance order here"
        );
        let info = policy.info.unwrap();
        assert_eq!(
            (info.slot_choice, info.predicted_reused_tokens, info.moved),
            ("lru", 0, 0)
        );
    }

    #[test]
    fn a_matching_header_alone_counts() {
        let all = docs(&["alpha text", "beta text"]);
        let (header, header_tokens) = header_of(None);
        let slots = vec![
            SlotState::default(),
            slot_holding(header, &docs(&["zeta"]), 1),
        ];
        let ranks = vec![0, 1];
        let mut policy = DocumentsPolicy::new(header, header_tokens, &all, &ranks);
        let slot = pick(&mut policy, &slots, &mut RamTier::default()).slot;
        assert_eq!(slot, 1);
        assert_eq!(policy.info.unwrap().slot_choice, "header");
    }

    fn seq(header: u64, header_tokens: u32, held: &[Document]) -> Arc<BlockSeq> {
        Arc::new(BlockSeq {
            header,
            header_tokens,
            blocks: held
                .iter()
                .map(|d| Block {
                    hash: d.hash,
                    tokens: d.tokens,
                })
                .collect(),
        })
    }

    /// llama-server's RAM prompt cache: a slot that would keep little of
    /// what it holds gets the best cached prompt loaded first, so its run
    /// leads the order and counts in the prediction; the entry moves out of
    /// the cache.
    #[test]
    fn a_prompt_in_the_ram_cache_is_reused_through_any_slot_that_holds_little() {
        let all = docs(&["alpha text", "beta text", "gamma text", "delta text"]);
        let (header, header_tokens) = header_of(None);
        let mut ram = RamTier::new(1_000_000);
        ram.save(&seq(header, header_tokens, &all[0..3]));
        // The slot holds an unrelated prompt: it would keep only the header.
        let unrelated = docs(&[
            "unrelated one, a long enough document",
            "unrelated two, a long enough document",
            "unrelated three, a long enough document",
        ]);
        let slots = vec![SlotState {
            holds: SlotContents {
                key: Arc::from(""),
                blocks: Some(seq(header, header_tokens, &unrelated)),
            },
            ..SlotState::default()
        }];
        let request = vec![all[1].clone(), all[0].clone(), all[3].clone()];
        let ranks = vec![1, 0, 3];
        let mut policy = DocumentsPolicy::new(header, header_tokens, &request, &ranks);
        policy.threshold = ALWAYS;
        let slot = pick(&mut policy, &slots, &mut ram).slot;
        assert_eq!(slot, 0);
        assert_eq!(
            policy.order,
            vec![1, 0, 2],
            "alpha, beta from the cached prompt"
        );
        let info = policy.info.unwrap();
        assert_eq!(info.slot_choice, "ram-cache");
        assert_eq!(
            info.predicted_reused_tokens,
            header_tokens + all[0].tokens + all[1].tokens
        );
        assert!(ram.entries().is_empty(), "loaded: moved out of the cache");

        // An empty slot never consults the cache (llama-server skips it).
        let mut ram = RamTier::new(1_000_000);
        ram.save(&seq(header, header_tokens, &all[0..3]));
        let mut policy = DocumentsPolicy::new(header, header_tokens, &request, &ranks);
        policy.threshold = ALWAYS;
        pick(&mut policy, &[SlotState::default()], &mut ram);
        assert_eq!(policy.info.unwrap().slot_choice, "lru");
        assert_eq!(ram.entries().len(), 1);

        // An entry sharing less than a quarter of itself is not loaded.
        let filler: Vec<String> = (0..4)
            .map(|i| format!("p{i} {}", "x".repeat(400)))
            .collect();
        let filler: Vec<&str> = filler.iter().map(String::as_str).collect();
        let long: Vec<Document> = docs(&["alpha text"])
            .into_iter()
            .chain(docs(&filler))
            .collect();
        let mut ram = RamTier::new(1_000_000);
        ram.save(&seq(header, header_tokens, &long));
        let shared = header_tokens + long[0].tokens;
        assert!(u64::from(shared) * 4 < seq(header, header_tokens, &long).tokens());
        let mut policy = DocumentsPolicy::new(header, header_tokens, &request, &ranks);
        policy.threshold = ALWAYS;
        pick(&mut policy, &slots, &mut ram);
        assert_ne!(policy.info.unwrap().slot_choice, "ram-cache");
    }

    #[test]
    fn the_ram_tier_keeps_no_contained_prompts_and_stays_in_budget() {
        let all = docs(&["alpha text", "beta text", "gamma text"]);
        let tokens: u64 = all.iter().map(|d| u64::from(d.tokens)).sum();
        let mut ram = RamTier::new(tokens + 1);
        ram.save(&seq(1, 0, &all[0..1]));
        ram.save(&seq(1, 0, &all[0..2]));
        assert_eq!(ram.entries().len(), 1, "the shorter prompt is contained");
        ram.save(&seq(1, 0, &all[0..1]));
        assert_eq!(ram.entries().len(), 1, "already contained: not saved");
        ram.save(&seq(2, 0, &all[2..3]));
        assert_eq!(ram.entries().len(), 2);
        ram.save(&seq(3, 0, &all[0..3]));
        assert_eq!(ram.entries().len(), 1, "oldest went to make room");
        assert!(ram.take(0).is_some() && ram.entries().is_empty());
        let mut off = RamTier::new(0);
        off.save(&seq(1, 0, &all));
        assert!(off.entries().is_empty());
    }

    #[test]
    fn caller_system_text_is_taken_out() {
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": "Be brief."}),
            serde_json::json!({"role": "user", "content": "q"}),
        ];
        assert_eq!(
            take_caller_system(&mut messages).unwrap().as_deref(),
            Some("Be brief.")
        );
        assert_eq!(messages.len(), 1);
        let mut parts =
            vec![serde_json::json!({"role": "system", "content": [{"type": "text", "text": "x"}]})];
        assert!(take_caller_system(&mut parts).is_err());
    }
}
