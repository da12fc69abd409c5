//! Conversations: requests with `documents` and a conversation id.
//!
//! The first turn is rendered like any request with documents (the
//! documents in the system message). The daemon remembers what it sent:
//! every message as forwarded, and which documents went out under which
//! label. On later turns the history is forwarded byte-identical to what was
//! sent before, so the whole earlier conversation stays a cached prefix, and
//! only the new last message is rewritten: documents sent earlier are named
//! by their label instead of being repeated, new ones are added under new
//! labels. A client whose history no longer matches (an edited or different
//! conversation under the same id) starts the conversation over.
//!
//! A turn changes what is remembered only once llama-server has answered
//! it ([`Conversations::commit`]): a turn that failed and is sent again (or
//! sent again with more history) continues from the last answered turn.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;

use super::{text_hash, Document};

/// Conversations kept, and the bytes of forwarded messages they may hold;
/// the least recently used go first.
const MAX_CONVERSATIONS: usize = 1024;
const MAX_BYTES: usize = 256 << 20;

#[derive(Debug, Clone, PartialEq)]
struct Conversation {
    /// Hash of the caller's system text, which must stay the same.
    system_hash: u64,
    /// Every message forwarded so far, as (hash of the client's original,
    /// the message as forwarded). The first is the rendered system message.
    sent: Vec<(u64, Value)>,
    /// Label (1-based) of every document sent in this conversation.
    labels: HashMap<u64, usize>,
    last_used: u64,
    /// Size of `sent`, for the memory bound.
    bytes: usize,
}

/// A conversation's state after a turn, stored once the turn is answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    id: String,
    conversation: Conversation,
}

/// What a later turn looks like after rewriting.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// The messages to forward.
    pub messages: Vec<Value>,
    /// New documents (not sent before in this conversation).
    pub new_documents: usize,
    /// Documents named by label instead of repeated.
    pub referenced: usize,
    /// What to remember once llama-server has answered (`None` for a
    /// replayed turn, which changes nothing).
    pub pending: Option<Pending>,
}

#[derive(Default)]
pub struct Conversations {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Conversation>,
    clock: u64,
    bytes: usize,
}

fn sent_bytes(sent: &[(u64, Value)]) -> usize {
    sent.iter().map(|(_, m)| m.to_string().len()).sum()
}

pub fn message_hash(message: &Value) -> u64 {
    text_hash(&message.to_string())
}

impl Conversations {
    /// A later turn of conversation `id`, when the daemon knows it and the
    /// client's history (`messages`, system message removed) starts with
    /// everything sent before. `None` means: render it as a first turn.
    pub fn continue_turn(
        &self,
        id: &str,
        caller_system: Option<&str>,
        messages: &[Value],
        docs: &[Document],
    ) -> Option<Turn> {
        let mut inner = crate::sync::lock(&self.inner);
        inner.clock += 1;
        let clock = inner.clock;
        let stored = inner.map.get_mut(id)?;
        stored.last_used = clock;
        let stored: &Conversation = stored;
        if stored.system_hash != text_hash(caller_system.unwrap_or("")) {
            return None;
        }
        // sent[0] is the rendered system message; the client's history must
        // repeat the rest, then add at least one message.
        let history = &stored.sent[1..];
        let matches = |n: usize| {
            history[..n]
                .iter()
                .zip(messages)
                .all(|((hash, _), original)| *hash == message_hash(original))
        };
        if messages.len() == history.len() && docs.is_empty() && matches(history.len()) {
            // The same turn again (a retry, or "regenerate"): replay it.
            return Some(Turn {
                messages: stored.sent.iter().map(|(_, m)| m.clone()).collect(),
                new_documents: 0,
                referenced: 0,
                pending: None,
            });
        }
        if messages.len() <= history.len()
            || history
                .iter()
                .zip(messages)
                .any(|((hash, _), original)| *hash != message_hash(original))
        {
            return None;
        }
        let last = messages.len() - 1;
        let Some(Value::String(question)) = messages[last].get("content") else {
            return None;
        };
        let history_len = history.len();
        let mut conversation = stored.clone();
        drop(inner);
        let mut new = Vec::new();
        let mut referenced = Vec::new();
        for doc in docs {
            match conversation.labels.get(&doc.hash) {
                Some(label) => referenced.push(*label),
                None => new.push(doc),
            }
        }
        let mut next_label = conversation.labels.len() + 1;
        let mut block = String::new();
        if !new.is_empty() {
            block.push_str("<documents>\n");
            for doc in &new {
                block.push_str(&format!("[{next_label}] {}\n", doc.text));
                conversation.labels.insert(doc.hash, next_label);
                next_label += 1;
            }
            block.push_str("</documents>\n");
        }
        if !referenced.is_empty() {
            let list: Vec<String> = referenced.iter().map(|l| format!("[{l}]")).collect();
            block.push_str(&format!(
                "Documents {} from earlier in this conversation also apply.\n",
                list.join(", ")
            ));
        }
        if !docs.is_empty() {
            let ranking: Vec<String> = docs
                .iter()
                .map(|d| conversation.labels[&d.hash].to_string())
                .collect();
            block.push_str(&format!(
                "Read the documents in this importance ranking: {}\nPrioritize information from higher-ranked documents.\n\n",
                ranking.join(" > ")
            ));
        }
        let mut forwarded: Vec<Value> = conversation.sent.iter().map(|(_, m)| m.clone()).collect();
        for (i, original) in messages.iter().enumerate().skip(history_len) {
            let mut message = original.clone();
            if i == last && !block.is_empty() {
                message["content"] = Value::String(format!("{block}{question}"));
            }
            conversation
                .sent
                .push((message_hash(original), message.clone()));
            forwarded.push(message);
        }
        conversation.bytes = sent_bytes(&conversation.sent);
        Some(Turn {
            messages: forwarded,
            new_documents: new.len(),
            referenced: referenced.len(),
            pending: Some(Pending {
                id: id.to_string(),
                conversation,
            }),
        })
    }

    /// A first turn: the rendered system message, the client's other
    /// messages as forwarded, and the documents under their labels
    /// (positions in `order`), to [`commit`](Self::commit) once answered.
    pub fn start(
        id: &str,
        caller_system: Option<&str>,
        system_message: Value,
        messages: &[Value],
        docs: &[Document],
        order: &[usize],
    ) -> Pending {
        let mut sent = vec![(0, system_message)];
        sent.extend(messages.iter().map(|m| (message_hash(m), m.clone())));
        let labels = order
            .iter()
            .enumerate()
            .map(|(pos, &i)| (docs[i].hash, pos + 1))
            .collect();
        let bytes = sent_bytes(&sent);
        Pending {
            id: id.to_string(),
            conversation: Conversation {
                system_hash: text_hash(caller_system.unwrap_or("")),
                sent,
                labels,
                last_used: 0,
                bytes,
            },
        }
    }

    /// Remembers a turn that llama-server answered.
    pub fn commit(&self, pending: Pending) {
        let Pending {
            id,
            mut conversation,
        } = pending;
        if conversation.bytes > MAX_BYTES {
            return;
        }
        let mut inner = crate::sync::lock(&self.inner);
        inner.clock += 1;
        conversation.last_used = inner.clock;
        if let Some(old) = inner.map.remove(&id) {
            inner.bytes -= old.bytes;
        }
        while !inner.map.is_empty()
            && (inner.map.len() >= MAX_CONVERSATIONS
                || inner.bytes + conversation.bytes > MAX_BYTES)
        {
            let Some(oldest) = inner
                .map
                .iter()
                .min_by_key(|(_, c)| c.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(old) = inner.map.remove(&oldest) {
                inner.bytes -= old.bytes;
            }
        }
        inner.bytes += conversation.bytes;
        inner.map.insert(id, conversation);
    }

    /// Whether a conversation with this id is remembered.
    pub fn contains(&self, id: &str) -> bool {
        crate::sync::lock(&self.inner).map.contains_key(id)
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
    use super::super::{parse_documents, render_system};
    use super::*;
    use serde_json::json;

    fn docs(texts: &[&str]) -> Vec<Document> {
        parse_documents(&json!(texts)).unwrap().docs
    }

    #[test]
    fn later_turns_keep_history_byte_identical_and_reference_sent_documents() {
        let conversations = Conversations::default();
        let first = docs(&["AUTH text", "DB text", "OAUTH text"]);
        let system = json!({"role": "system", "content": render_system(None, &first, &[0, 1, 2])});
        let q1 = json!({"role": "user", "content": "q1"});
        conversations.commit(Conversations::start(
            "c1",
            None,
            system.clone(),
            std::slice::from_ref(&q1),
            &first,
            &[0, 1, 2],
        ));

        let a1 = json!({"role": "assistant", "content": "a1"});
        let q2 = json!({"role": "user", "content": "q2"});
        let second = docs(&["AUTH text", "OAUTH text", "CACHE text", "DEPLOY text"]);
        let mut turn = conversations
            .continue_turn("c1", None, &[q1.clone(), a1.clone(), q2.clone()], &second)
            .unwrap();
        conversations.commit(turn.pending.take().unwrap());
        assert_eq!((turn.new_documents, turn.referenced), (2, 2));
        assert_eq!(
            turn.messages[0], system,
            "the system message is forwarded unchanged"
        );
        assert_eq!(&turn.messages[1..3], &[q1.clone(), a1.clone()]);
        let rewritten = turn.messages[3]["content"].as_str().unwrap();
        assert!(
            rewritten.contains("[4] CACHE text\n[5] DEPLOY text\n"),
            "{rewritten}"
        );
        assert!(
            rewritten.contains("Documents [1], [3] from earlier"),
            "{rewritten}"
        );
        assert!(rewritten.contains("ranking: 1 > 3 > 4 > 5"), "{rewritten}");
        assert!(rewritten.ends_with("\n\nq2"));
        assert!(!rewritten.contains("AUTH text"));

        // Turn 3: turn 2's rewritten message is forwarded again, identical.
        let a2 = json!({"role": "assistant", "content": "a2"});
        let q3 = json!({"role": "user", "content": "q3"});
        let turn3 = conversations
            .continue_turn(
                "c1",
                None,
                &[q1.clone(), a1.clone(), q2.clone(), a2, q3],
                &[],
            )
            .unwrap();
        assert_eq!(turn3.messages[..4], turn.messages[..]);
        assert_eq!(turn3.messages[5]["content"], "q3");
    }

    #[test]
    fn the_same_turn_sent_again_is_replayed() {
        let conversations = Conversations::default();
        let d = docs(&["A text"]);
        let q1 = json!({"role": "user", "content": "q1"});
        conversations.commit(Conversations::start(
            "c",
            None,
            json!({"role": "system"}),
            std::slice::from_ref(&q1),
            &d,
            &[0],
        ));
        let a1 = json!({"role": "assistant", "content": "a1"});
        let q2 = json!({"role": "user", "content": "q2"});
        let mut turn = conversations
            .continue_turn("c", None, &[q1.clone(), a1.clone(), q2.clone()], &[])
            .unwrap();
        conversations.commit(turn.pending.take().unwrap());
        let again = conversations
            .continue_turn("c", None, &[q1, a1, q2], &[])
            .unwrap();
        assert_eq!(again.messages, turn.messages);
        assert!(again.pending.is_none());
    }

    #[test]
    fn an_edited_history_or_other_system_text_starts_over() {
        let conversations = Conversations::default();
        let d = docs(&["A text"]);
        let q1 = json!({"role": "user", "content": "q1"});
        conversations.commit(Conversations::start(
            "c",
            Some("sys"),
            json!({}),
            std::slice::from_ref(&q1),
            &d,
            &[0],
        ));
        let edited = json!({"role": "user", "content": "q1 edited"});
        let q2 = json!({"role": "user", "content": "q2"});
        assert!(conversations
            .continue_turn("c", Some("sys"), &[edited, q2.clone()], &d)
            .is_none());
        assert!(conversations
            .continue_turn("c", Some("other"), &[q1.clone(), q2.clone()], &d)
            .is_none());
        assert!(conversations
            .continue_turn("unknown", Some("sys"), &[q1.clone(), q2.clone()], &d)
            .is_none());
        assert!(
            conversations
                .continue_turn("c", Some("sys"), std::slice::from_ref(&q1), &d)
                .is_none(),
            "nothing new"
        );
        assert!(conversations
            .continue_turn("c", Some("sys"), &[q1, q2], &d)
            .is_some());
    }

    #[test]
    fn conversations_are_bounded() {
        let conversations = Conversations::default();
        for i in 0..MAX_CONVERSATIONS + 10 {
            conversations.commit(Conversations::start(
                &format!("c{i}"),
                None,
                json!({}),
                &[],
                &[],
                &[],
            ));
        }
        assert_eq!(conversations.len(), MAX_CONVERSATIONS);
    }

    /// A turn that was never answered leaves no trace: the same turn sent
    /// again (here with the first answer's history) continues from the last
    /// answered one instead of starting over.
    #[test]
    fn an_unanswered_turn_is_not_remembered() {
        let conversations = Conversations::default();
        let d = docs(&["A text"]);
        let q1 = json!({"role": "user", "content": "q1"});
        assert!(!conversations.contains("c"));
        let pending =
            Conversations::start("c", None, json!({}), std::slice::from_ref(&q1), &d, &[0]);
        assert!(!conversations.contains("c"), "not before it is answered");
        conversations.commit(pending);
        let (a1, q2) = (
            json!({"role": "assistant", "content": "a1"}),
            json!({"role": "user", "content": "q2"}),
        );
        let failed = conversations
            .continue_turn(
                "c",
                None,
                &[q1.clone(), a1.clone(), q2.clone()],
                &docs(&["B text"]),
            )
            .unwrap();
        drop(failed);
        let retried = conversations
            .continue_turn("c", None, &[q1, a1, q2], &docs(&["B text"]))
            .unwrap();
        assert_eq!(
            retried.new_documents, 1,
            "B is still new: the failed turn left nothing"
        );
        assert!(retried.messages[3]["content"]
            .as_str()
            .unwrap()
            .contains("[2] B text"));
    }
}
