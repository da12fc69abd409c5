//! The query log: append-only JSONL with size-based rotation.
//!
//! Each record is serialised into one buffer ending in a newline and written
//! with one call through [`RotatingFile`]; if a write fails part-way, the
//! file is cut back to its previous length, so no line is ever partial. A
//! failed write is logged and counted; it never reaches the request that
//! produced the record.

use std::path::PathBuf;

use super::QueryRecord;
use crate::rotate::{RotatingFile, WriteError};

pub struct LogWriter {
    file: RotatingFile,
    failed: u64,
}

impl LogWriter {
    pub fn new(path: PathBuf, max_bytes: u64, keep_files: u32) -> LogWriter {
        LogWriter {
            file: RotatingFile::new(path, max_bytes, keep_files),
            failed: 0,
        }
    }

    pub fn failed_writes(&self) -> u64 {
        self.failed
    }

    pub fn append(&mut self, record: &QueryRecord) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(e) => return self.fail(&format!("cannot serialise a record: {e}")),
        };
        line.push(b'\n');
        if let Err(e) = self.file.rotate_if_full(line.len() as u64) {
            tracing::warn!("cannot rotate {}: {e}", self.file.path().display());
        }
        match self.file.write(&line) {
            Ok(()) => {}
            Err(WriteError::Open(e)) => {
                let why = format!("cannot open {}: {e}", self.file.path().display());
                self.fail(&why)
            }
            Err(WriteError::Write(e)) => {
                let why = format!("cannot write {}: {e}", self.file.path().display());
                self.fail(&why)
            }
        }
    }

    fn fail(&mut self, why: &str) {
        self.failed += 1;
        // Say it once per burst, not once per request.
        if self.failed.is_power_of_two() {
            tracing::warn!("query log: {why} ({} failed writes so far)", self.failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotate::numbered_path;
    use std::path::Path;

    fn record(id: usize) -> QueryRecord {
        QueryRecord {
            query_id: format!("q{id}"),
            slot_id: Some(0),
            completion_tokens: Some(1),
            ..crate::meter::tests::routed_record(None, 0, 3, None)
        }
    }

    #[test]
    fn appends_whole_lines_and_rotates_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/query_log.jsonl");
        let line_len = serde_json::to_vec(&record(0)).unwrap().len() as u64 + 1;
        let mut writer = LogWriter::new(path.clone(), line_len * 3, 2);
        for i in 0..10 {
            writer.append(&record(i));
        }
        // 10 lines, 3 per file: current has 1, .1 and .2 have 3 each; the
        // first 3 lines were rotated away.
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path).lines().count(), 1);
        assert_eq!(read(&numbered_path(&path, 1)).lines().count(), 3);
        assert_eq!(read(&numbered_path(&path, 2)).lines().count(), 3);
        assert!(!numbered_path(&path, 3).exists());
        assert!(read(&path).contains("\"q9\""));
        for p in [
            path.clone(),
            numbered_path(&path, 1),
            numbered_path(&path, 2),
        ] {
            for line in read(&p).lines() {
                serde_json::from_str::<serde_json::Value>(line).unwrap();
            }
        }
        assert_eq!(writer.failed_writes(), 0);
    }

    #[test]
    fn a_fragment_left_by_a_crash_does_not_swallow_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("query_log.jsonl");
        std::fs::write(&path, "{\"query_id\":\"q0\"}\n{\"query_id\":\"q1\",\"pa").unwrap();
        let mut writer = LogWriter::new(path.clone(), 1 << 20, 2);
        writer.append(&record(2));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            serde_json::from_str::<serde_json::Value>(lines[2]).is_ok(),
            "{text}"
        );
    }

    #[test]
    fn an_unwritable_log_is_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let mut writer = LogWriter::new(blocker.join("query_log.jsonl"), 1 << 20, 2);
        writer.append(&record(1));
        writer.append(&record(2));
        assert_eq!(writer.failed_writes(), 2);
    }
}
