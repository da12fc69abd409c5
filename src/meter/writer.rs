//! The query log: append-only JSONL with size-based rotation.
//!
//! Each record is serialised into one buffer ending in a newline and written
//! with one call; if a write fails part-way, the file is cut back to its
//! previous length, so no line is ever partial. A failed write is logged and
//! counted; it never reaches the request that produced the record.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::QueryRecord;

pub struct LogWriter {
    path: PathBuf,
    max_bytes: u64,
    keep_files: u32,
    file: Option<File>,
    len: u64,
    failed: u64,
}

impl LogWriter {
    pub fn new(path: PathBuf, max_bytes: u64, keep_files: u32) -> LogWriter {
        LogWriter {
            path,
            max_bytes,
            keep_files,
            file: None,
            len: 0,
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
        if self.file.is_some() && self.len > 0 && self.len + line.len() as u64 > self.max_bytes {
            self.rotate();
        }
        if self.file.is_none() {
            if let Err(e) = self.open() {
                return self.fail(&format!("cannot open {}: {e}", self.path.display()));
            }
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        match file.write_all(&line) {
            Ok(()) => self.len += line.len() as u64,
            Err(e) => {
                // Cut a partial line off again; reopen on the next record.
                let _ = file.set_len(self.len);
                self.file = None;
                self.fail(&format!("cannot write {}: {e}", self.path.display()));
            }
        }
    }

    fn open(&mut self) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)?;
        self.len = file.metadata()?.len();
        // A crash mid-write (or a power cut) can leave a fragment at the end;
        // end it so the next record starts a line of its own.
        if self.len > 0 && !ends_with_newline(&mut file, self.len)? {
            file.write_all(b"\n")?;
            self.len += 1;
        }
        self.file = Some(file);
        Ok(())
    }

    /// `log.jsonl` → `log.jsonl.1` → ... → `log.jsonl.N`; the oldest goes.
    fn rotate(&mut self) {
        self.file = None;
        if self.keep_files == 0 {
            let _ = std::fs::remove_file(&self.path);
            return;
        }
        let numbered = |n: u32| numbered_path(&self.path, n);
        let _ = std::fs::remove_file(numbered(self.keep_files));
        for n in (1..self.keep_files).rev() {
            let _ = std::fs::rename(numbered(n), numbered(n + 1));
        }
        if let Err(e) = std::fs::rename(&self.path, numbered(1)) {
            tracing::warn!("cannot rotate {}: {e}", self.path.display());
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

fn ends_with_newline(file: &mut File, len: u64) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

pub fn numbered_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: usize) -> QueryRecord {
        QueryRecord {
            query_id: format!("q{id}"),
            timestamp: "2026-11-22T00:00:00Z".into(),
            path: "/v1/chat/completions".into(),
            model: "m".into(),
            slot_id: Some(0),
            status_code: 200,
            stream: false,
            latency_ms: 1.0,
            ttft_ms: None,
            prompt_tokens: Some(3),
            completion_tokens: Some(1),
            cache_reuse: None,
            error: None,
            retried: false,
            gpu: None,
            reorder: None,
            slot_decision: None,
            block_dedup: None,
            prompt: None,
            completion: None,
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
