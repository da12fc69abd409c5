//! Prepare, the first stage of a model request: one façade over the stores
//! that rewrite a request before it is forwarded (the document registry,
//! conversations, inferred-mode sessions, block dedup). It turns a parsed
//! body into a [`Prepared`] request: the body to forward, the plan that
//! chooses its slot (and, with documents, their order), and the commits that
//! settle applies once llama-server has answered. Nothing here is stored
//! before then: a failed request sent again starts from the last good turn.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use super::conversation::{self, Conversations, Turn};
use super::dedup::DedupStats;
use super::extract::InterceptConfig;
use super::infer::{self, Sessions};
use super::{Documents, DocumentsPolicy, GainThreshold, Registry, ReorderInfo};
use crate::slots::{AdmitError, PrefixPolicy, Scheduler, SlotLease};

/// The one route whose body has messages (and may carry `documents`).
pub const CHAT_PATH: &str = "/v1/chat/completions";

/// How the stage rewrites requests (`[reorder]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Inferred mode for chat requests without `documents`.
    pub infer_documents: bool,
    /// Block dedup of repeated blocks within one request.
    pub dedup: bool,
    /// When reordering documents is worth leaving the client's order.
    pub threshold: GainThreshold,
    /// The longest prompt (tokens) a conversation grows to before it starts
    /// over with only the current turn's documents.
    pub conversation_max_tokens: u64,
}

/// The stores requests are prepared against; settle commits into them.
pub struct Reorder {
    /// Documents seen so far: canonical order and id → text identity.
    pub registry: Registry,
    pub conversations: Conversations,
    pub sessions: Sessions,
    settings: Settings,
}

/// What the request's headers ask of this stage.
pub struct Hints<'a> {
    /// The `X-ContextPilot-*` settings.
    pub intercept: &'a InterceptConfig,
    /// Who is calling (a hash of its credentials), so sessions never mix.
    pub client: &'a str,
    /// `X-Conversation-Id`.
    pub conversation: Option<String>,
}

/// A request ready for dispatch.
pub struct Prepared {
    body: Value,
    plan: SlotPlan,
    /// What settle stores once the request was answered.
    pub commits: Commits,
    /// What this stage did, for the record and the response headers.
    pub facts: Facts,
}

impl Prepared {
    /// What this request is predicted to cost on `slots` now (the slot its
    /// plan would choose there), without taking one: for choosing between
    /// backends.
    pub fn predict_ms(&self, slots: &Scheduler) -> f64 {
        match &self.plan {
            SlotPlan::Prefix(key) => slots.predict(&mut PrefixPolicy {
                prompt: key.clone(),
            }),
            SlotPlan::Documents(request) => slots.predict(&mut request.policy()),
        }
    }
}

/// How the slot is chosen.
enum SlotPlan {
    /// By the longest common prefix of the prompt key (plain requests and
    /// later conversation turns, which keep them on their slot).
    Prefix(Arc<str>),
    /// By the documents, which fix their order together with the slot.
    Documents(Box<DocumentRequest>),
}

/// Stores to update once llama-server has answered 200.
#[derive(Default)]
pub struct Commits {
    session: Option<infer::Pending>,
    conversation: Option<conversation::Pending>,
}

/// What preparing did to a request.
#[derive(Default)]
pub struct Facts {
    pub reorder: Option<ReorderInfo>,
    /// Repeated blocks replaced by pointers, when any were.
    pub block_dedup: Option<DedupStats>,
    /// The `X-ContextPilot-Result` header, when inferred mode did something.
    pub result_header: Option<String>,
}

/// A slot leased for one attempt, with what choosing it decided.
pub struct Leased {
    pub lease: SlotLease,
    /// With documents: the order chosen for this slot.
    pub reorder: Option<ReorderInfo>,
    /// With documents and a conversation id: the conversation to open.
    pub conversation: Option<conversation::Pending>,
}

impl Commits {
    /// This attempt's conversation turn replaces the one prepared before
    /// the slot (and so the document order) was known.
    pub fn set_conversation(&mut self, pending: Option<conversation::Pending>) {
        if pending.is_some() {
            self.conversation = pending;
        }
    }
}

impl Reorder {
    pub fn new(settings: Settings) -> Reorder {
        Reorder {
            registry: Registry::default(),
            conversations: Conversations::default(),
            sessions: Sessions::default(),
            settings,
        }
    }

    /// Rewrites `body` for forwarding, in prefix-stable steps: inferred
    /// mode (chat requests without `documents`), block dedup, then
    /// `documents` and `conversation_id` taken out of the body (a later
    /// turn of a known conversation gets its history back byte-identical).
    /// `slots` prices whether a conversation keeps its history. An error is
    /// the client's (a 400).
    pub fn prepare(
        &self,
        path: &str,
        mut body: Value,
        hints: Hints<'_>,
        slots: &Scheduler,
    ) -> Result<Prepared, String> {
        let mut commits = Commits::default();
        let mut facts = Facts::default();
        if hints.intercept.enabled && path == CHAT_PATH {
            self.infer(&mut body, &hints, &mut commits, &mut facts);
            if self.settings.dedup {
                facts.block_dedup = dedup_blocks(&mut body);
            }
        }
        let documents = self.take_documents(path, &mut body, hints.conversation, slots)?;
        let plan = match documents {
            Some(request) if request.turn.is_none() => SlotPlan::Documents(Box::new(request)),
            Some(mut request) => {
                let referenced = request.turn.as_ref().map_or(0, |t| t.referenced);
                commits.conversation = request.turn.as_mut().and_then(|t| t.pending.take());
                facts.reorder = Some(ReorderInfo {
                    documents: request.documents.docs.len(),
                    moved: 0,
                    deduped: request.documents.deduped + referenced,
                    predicted_reused_tokens: 0,
                    slot_choice: "conversation",
                    reordered: false,
                    predicted_gain_ms: 0.0,
                });
                SlotPlan::Prefix(Arc::from(prompt_key(path, &body)))
            }
            None => SlotPlan::Prefix(Arc::from(prompt_key(path, &body))),
        };
        body["cache_prompt"] = Value::Bool(true);
        Ok(Prepared {
            body,
            plan,
            commits,
            facts,
        })
    }

    /// Stores what an answered request prepared.
    pub fn commit(&self, commits: Commits) {
        if let Some(pending) = commits.session {
            self.sessions.commit(pending);
        }
        if let Some(pending) = commits.conversation {
            self.conversations.commit(pending);
        }
    }

    /// Inferred mode (`infer`) for a chat request that brings no
    /// `documents` and is not a turn of a conversation with documents.
    fn infer(&self, body: &mut Value, hints: &Hints<'_>, commits: &mut Commits, facts: &mut Facts) {
        if !self.settings.infer_documents || body.get("documents").is_some_and(|d| !d.is_null()) {
            return;
        }
        let conversation = body
            .get("conversation_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| hints.conversation.clone());
        if conversation
            .as_deref()
            .is_some_and(|id| self.conversations.contains(id))
        {
            return;
        }
        let (report, pending) = self.sessions.rewrite(
            body,
            hints.intercept,
            &self.registry,
            hints.client,
            conversation.as_deref(),
        );
        commits.session = pending;
        if report.is_empty() {
            return;
        }
        if report.total_documents > 0 {
            facts.reorder = Some(ReorderInfo {
                documents: report.total_documents,
                moved: report.moved,
                deduped: report.documents_deduplicated,
                predicted_reused_tokens: 0,
                slot_choice: "inferred",
                reordered: report.moved > 0,
                predicted_gain_ms: 0.0,
            });
        }
        facts.result_header = serde_json::to_string(&report).ok();
    }

    /// Takes `documents` (and `conversation_id`) out of the body; `None`
    /// when there are none. A later turn of a known conversation is
    /// rewritten here, history byte-identical to what was sent before.
    fn take_documents(
        &self,
        path: &str,
        body: &mut Value,
        conversation_header: Option<String>,
        slots: &Scheduler,
    ) -> Result<Option<DocumentRequest>, String> {
        let Some(object) = body.as_object_mut() else {
            return Ok(None);
        };
        let conversation = match object.remove("conversation_id") {
            Some(Value::String(id)) if !id.is_empty() => Some(id),
            Some(Value::Null) | None => conversation_header.filter(|id| !id.is_empty()),
            Some(_) => return Err("`conversation_id` must be a non-empty string".into()),
        };
        let value = object.remove("documents");
        let no_documents = match &value {
            None | Some(Value::Null) => true,
            Some(Value::Array(items)) => items.is_empty() && conversation.is_some(),
            Some(_) => false,
        };
        let mut messages = object
            .get("messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if no_documents {
            // A follow-up turn without new documents still belongs to its
            // conversation; without one, the request is left as it is.
            let Some(id) = conversation else {
                return Ok(None);
            };
            let caller_system = super::take_caller_system(&mut messages)?;
            let Some(turn) =
                self.conversations
                    .continue_turn(&id, caller_system.as_deref(), &messages, &[])
            else {
                return Ok(None);
            };
            object.insert("messages".into(), Value::Array(turn.messages.clone()));
            let documents = Documents {
                docs: Vec::new(),
                deduped: 0,
            };
            let request = DocumentRequest::new(documents, Vec::new(), 0, caller_system, messages);
            return Ok(Some(request.in_conversation(Some(id), Some(turn))));
        }
        if path != CHAT_PATH {
            return Err("`documents` is supported on /v1/chat/completions only".into());
        }
        let documents = super::parse_documents(&value.unwrap_or(Value::Null))?;
        let known_before = self.registry.next_rank();
        let ranks = self.registry.observe(&documents.docs)?;
        let caller_system = super::take_caller_system(&mut messages)?;
        let mut request =
            DocumentRequest::new(documents, ranks, known_before, caller_system, messages);
        request.threshold = self.settings.threshold;
        let turn = conversation
            .as_deref()
            .and_then(|id| self.continue_with_documents(id, &request, slots));
        if let Some(turn) = &turn {
            object.insert("messages".into(), Value::Array(turn.messages.clone()));
        }
        Ok(Some(request.in_conversation(conversation, turn)))
    }

    /// A later turn that brings documents: continued with its history while
    /// that is predicted faster than starting over ([`Self::keeps_history`]).
    fn continue_with_documents(
        &self,
        id: &str,
        request: &DocumentRequest,
        slots: &Scheduler,
    ) -> Option<Turn> {
        let turn = self.conversations.continue_turn(
            id,
            request.caller_system.as_deref(),
            &request.messages,
            &request.documents.docs,
        )?;
        // Started over, the prompt holds this turn's documents and the
        // client's own history, without earlier documents.
        let docs = &request.documents.docs;
        let restart_tokens = u64::from(request.header_tokens)
            + docs.iter().map(|d| u64::from(d.tokens)).sum::<u64>()
            + super::tail_tokens(&request.messages, docs.len());
        self.keeps_history(&turn.messages, restart_tokens, slots)
            .then_some(turn)
    }

    /// Whether a later conversation turn keeps its history (earlier
    /// documents included) or starts over with only this turn's documents:
    /// it keeps them while the prompt stays within `[reorder]
    /// conversation_max_tokens` and a slot still holds enough of it that
    /// continuing is predicted faster than computing the shorter prompt
    /// from nothing.
    fn keeps_history(&self, messages: &[Value], restart_tokens: u64, slots: &Scheduler) -> bool {
        let key = prompt_key(CHAT_PATH, &serde_json::json!({ "messages": messages }));
        let keep_tokens = crate::slots::tokens_of_bytes(key.len());
        let held = crate::slots::tokens_of_bytes(slots.longest_held_prefix(&key));
        let cost = slots.cost().view();
        if cost.tokens(keep_tokens) > self.settings.conversation_max_tokens {
            return false;
        }
        cost.prompt_ms(keep_tokens, held) <= cost.prompt_ms(restart_tokens, 0)
    }
}

/// Block dedup of the chat messages (`dedup`), when it found anything.
fn dedup_blocks(body: &mut Value) -> Option<DedupStats> {
    let messages = body.get_mut("messages").and_then(Value::as_array_mut)?;
    let stats = super::dedup::dedup_messages(messages);
    (stats.blocks_deduped > 0).then_some(stats)
}

impl Prepared {
    /// Dispatch's slot step for one attempt on child `child_pid`: the plan
    /// chooses a free slot; a documents plan then renders its documents in
    /// the order chosen for that slot and records the rendered prompt as
    /// what the slot will hold.
    pub async fn lease(
        &mut self,
        slots: &Arc<Scheduler>,
        child_pid: u32,
        timeout: Duration,
    ) -> Result<Leased, AdmitError> {
        match &self.plan {
            SlotPlan::Prefix(key) => {
                let mut policy = PrefixPolicy {
                    prompt: key.clone(),
                };
                let lease = slots.acquire(&mut policy, child_pid, timeout).await?;
                Ok(Leased {
                    lease,
                    reorder: None,
                    conversation: None,
                })
            }
            SlotPlan::Documents(request) => {
                let mut policy = request.policy();
                let lease = slots.acquire(&mut policy, child_pid, timeout).await?;
                let conversation = request.render_into(&mut self.body, &policy);
                let key = Arc::from(prompt_key(CHAT_PATH, &self.body));
                slots.set_key(lease.id(), lease.contents(), key);
                let reorder = policy.info.map(|mut info| {
                    info.deduped = request.documents.deduped;
                    info
                });
                Ok(Leased {
                    lease,
                    reorder,
                    conversation,
                })
            }
        }
    }

    /// The body to forward to `slot`.
    pub fn payload(&mut self, slot: usize) -> Bytes {
        self.body["id_slot"] = Value::from(slot);
        Bytes::from(serde_json::to_vec(&self.body).unwrap_or_default())
    }

    /// The body for a backend whose slots are not the daemon's to pick
    /// (another contextpilotd, vLLM, SGLang): no `id_slot`, and for an
    /// OpenAI-only server none of llama-server's own fields either.
    pub fn payload_without_slot(&mut self, llama_fields: bool) -> Bytes {
        if let Some(object) = self.body.as_object_mut() {
            object.remove("id_slot");
            if !llama_fields {
                object.remove("cache_prompt");
            }
        }
        Bytes::from(serde_json::to_vec(&self.body).unwrap_or_default())
    }
}

/// The text slot choice compares: what llama.cpp will see at the start of
/// the prompt, in order.
pub fn prompt_key(path: &str, body: &Value) -> String {
    if path == CHAT_PATH {
        let tools = body.get("tools").map(Value::to_string).unwrap_or_default();
        format!(
            "{tools}{}",
            body.get("messages")
                .map(Value::to_string)
                .unwrap_or_default()
        )
    } else {
        match body.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    }
}

/// A chat request that carries `documents`: parsed once, rendered per
/// attempt (the order depends on the slot).
struct DocumentRequest {
    documents: Documents,
    ranks: Vec<u64>,
    /// Ranks below this were documents of earlier requests.
    known_before: u64,
    caller_system: Option<String>,
    /// The caller's messages without its system message.
    messages: Vec<Value>,
    header: u64,
    header_tokens: u32,
    threshold: GainThreshold,
    conversation: Option<String>,
    /// Set for a later turn of a known conversation: already rewritten.
    turn: Option<Turn>,
}

impl DocumentRequest {
    fn new(
        documents: Documents,
        ranks: Vec<u64>,
        known_before: u64,
        caller_system: Option<String>,
        messages: Vec<Value>,
    ) -> DocumentRequest {
        let (header, header_tokens) = super::header_of(caller_system.as_deref());
        DocumentRequest {
            documents,
            ranks,
            known_before,
            caller_system,
            messages,
            header,
            header_tokens,
            threshold: GainThreshold::default(),
            conversation: None,
            turn: None,
        }
    }

    fn in_conversation(mut self, id: Option<String>, turn: Option<Turn>) -> DocumentRequest {
        self.conversation = id;
        self.turn = turn;
        self
    }

    fn policy(&self) -> DocumentsPolicy<'_> {
        let mut policy = DocumentsPolicy::new(
            self.header,
            self.header_tokens,
            &self.documents.docs,
            &self.ranks,
        );
        policy.tail_tokens = super::tail_tokens(&self.messages, self.documents.docs.len())
            .min(u64::from(u32::MAX)) as u32;
        policy.threshold = self.threshold;
        policy.known_before = self.known_before;
        policy
    }

    /// Puts the rendered system message and the caller's other messages
    /// into the body; for a request with a conversation id, returns the
    /// conversation to open once the turn is answered.
    fn render_into(
        &self,
        body: &mut Value,
        policy: &DocumentsPolicy<'_>,
    ) -> Option<conversation::Pending> {
        let system = super::render_system(
            self.caller_system.as_deref(),
            &self.documents.docs,
            &policy.order,
        );
        let system = serde_json::json!({"role": "system", "content": system});
        let pending = self.conversation.as_ref().map(|id| {
            Conversations::start(
                id,
                self.caller_system.as_deref(),
                system.clone(),
                &self.messages,
                &self.documents.docs,
                &policy.order,
            )
        });
        let mut messages = Vec::with_capacity(self.messages.len() + 1);
        messages.push(system);
        messages.extend(self.messages.iter().cloned());
        body["messages"] = Value::Array(messages);
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompt_keys_follow_prompt_order() {
        let chat = json!({"messages": [{"role": "system", "content": "docs"}, {"role": "user", "content": "q"}]});
        let key = prompt_key(CHAT_PATH, &chat);
        // serde_json orders object keys; only consistency matters here.
        assert!(
            key.starts_with("[{\"content\":\"docs\",\"role\":\"system\"}"),
            "{key}"
        );
        let with_tools = json!({"tools": [{"type": "function"}], "messages": []});
        assert!(prompt_key(CHAT_PATH, &with_tools).starts_with("[{\"type\""));
        assert_eq!(prompt_key("/completion", &json!({"prompt": "abc"})), "abc");
        assert_eq!(
            prompt_key("/v1/completions", &json!({"prompt": [1, 2]})),
            "[1,2]"
        );
    }
}
