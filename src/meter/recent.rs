//! The last requests, for the dashboard: each record as the query log has
//! it, less the prompt and completion text (which `[meter] log_prompts`
//! puts in the log file only), numbered so a reader asks only for what it
//! has not seen.

use std::collections::VecDeque;

use serde::Serialize;

use super::QueryRecord;

/// How many requests the dashboard can look back over.
pub const KEPT: usize = 500;

/// One request as the dashboard sees it.
#[derive(Debug, Clone, Serialize)]
pub struct RecentRequest {
    /// Increases by one per record since the daemon started.
    pub seq: u64,
    #[serde(flatten)]
    pub record: QueryRecord,
}

/// The ring of recent requests.
#[derive(Default)]
pub struct Recent {
    next: u64,
    kept: VecDeque<RecentRequest>,
}

/// What `GET /requests/recent?after=N` answers.
#[derive(Debug, Clone, Serialize)]
pub struct RecentPage {
    /// The records after `after`, oldest first.
    pub requests: Vec<RecentRequest>,
    /// The newest `seq` there is (ask with it next time).
    pub last: u64,
}

impl Recent {
    pub fn add(&mut self, record: &QueryRecord) {
        let mut record = record.clone();
        record.prompt = None;
        record.completion = None;
        self.next += 1;
        self.kept.push_back(RecentRequest {
            seq: self.next,
            record,
        });
        while self.kept.len() > KEPT {
            self.kept.pop_front();
        }
    }

    /// The records numbered above `after`, at most `limit` (the newest).
    pub fn after(&self, after: u64, limit: usize) -> RecentPage {
        let newer: Vec<&RecentRequest> = self.kept.iter().filter(|r| r.seq > after).collect();
        let skip = newer.len().saturating_sub(limit);
        RecentPage {
            requests: newer.into_iter().skip(skip).cloned().collect(),
            last: self.next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> QueryRecord {
        QueryRecord {
            query_id: id.into(),
            slot_id: Some(0),
            prompt: Some(serde_json::json!("secret prompt")),
            completion: Some("secret answer".into()),
            ..crate::meter::tests::routed_record(None, 0, 0, None)
        }
    }

    #[test]
    fn readers_get_what_they_have_not_seen_without_the_text() {
        let mut recent = Recent::default();
        for i in 0..3 {
            recent.add(&record(&format!("q{i}")));
        }
        let page = recent.after(1, 100);
        assert_eq!(page.last, 3);
        let ids: Vec<&str> = page
            .requests
            .iter()
            .map(|r| r.record.query_id.as_str())
            .collect();
        assert_eq!(ids, ["q1", "q2"]);
        let text = serde_json::to_string(&page).unwrap();
        assert!(!text.contains("secret"), "{text}");
        assert!(
            text.contains("\"seq\":2") && text.contains("\"query_id\":\"q1\""),
            "{text}"
        );
        assert!(recent.after(3, 100).requests.is_empty());
        assert_eq!(
            recent.after(0, 1).requests[0].seq,
            3,
            "the newest within the limit"
        );
    }

    #[test]
    fn the_ring_is_bounded() {
        let mut recent = Recent::default();
        for i in 0..(KEPT + 10) {
            recent.add(&record(&i.to_string()));
        }
        let page = recent.after(0, usize::MAX);
        assert_eq!(page.requests.len(), KEPT);
        assert_eq!(page.requests[0].seq, 11);
        assert_eq!(page.last, (KEPT + 10) as u64);
    }
}
