//! A file of whole lines, rotated by size: `name` → `name.1` → … → `name.N`,
//! the oldest removed. The query log (`meter::writer`) and the daemon's own
//! log (`cli::logging`) both write through it.
//!
//! Each write is one call with whole lines; if it fails part-way, the file is
//! cut back to its previous length, so no line is ever partial and none is
//! split across two files. Reporting a failure is the caller's business.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep_files: u32,
    file: Option<File>,
    len: u64,
}

/// Why a write did not land; the file is left as it was before it.
#[derive(Debug)]
pub enum WriteError {
    /// The file (or its directory) could not be opened or created.
    Open(std::io::Error),
    /// The write itself failed; the file is reopened on the next write.
    Write(std::io::Error),
}

impl RotatingFile {
    /// Nothing is opened until the first write (or [`RotatingFile::open`]).
    pub fn new(path: PathBuf, max_bytes: u64, keep_files: u32) -> RotatingFile {
        RotatingFile {
            path,
            max_bytes,
            keep_files,
            file: None,
            len: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rotates when `incoming` more bytes would take the open file past
    /// `max_bytes`; a file that holds nothing yet takes them whatever their
    /// size. Err: the file could not be renamed away; it is reopened and
    /// appended to as before, and the next write tries again.
    pub fn rotate_if_full(&mut self, incoming: u64) -> std::io::Result<()> {
        if self.file.is_some() && self.len > 0 && self.len + incoming > self.max_bytes {
            self.rotate()
        } else {
            Ok(())
        }
    }

    /// Appends `lines` (whole lines, each ending in a newline) with one write,
    /// opening the file first if it is not open.
    pub fn write(&mut self, lines: &[u8]) -> Result<(), WriteError> {
        if self.file.is_none() {
            self.open().map_err(WriteError::Open)?;
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        match file.write_all(lines) {
            Ok(()) => {
                self.len += lines.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Cut a partial line off again; reopen on the next write.
                let _ = file.set_len(self.len);
                self.file = None;
                Err(WriteError::Write(e))
            }
        }
    }

    /// Opens (creating the directory and the file) unless already open.
    pub fn open(&mut self) -> std::io::Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
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
        // end it so the next line starts a line of its own.
        if self.len > 0 && !ends_with_newline(&mut file, self.len)? {
            file.write_all(b"\n")?;
            self.len += 1;
        }
        self.file = Some(file);
        Ok(())
    }

    /// `name` → `name.1` → ... → `name.N`; the oldest goes. With
    /// `keep_files` 0 the file is removed.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        if self.keep_files == 0 {
            let _ = std::fs::remove_file(&self.path);
            return Ok(());
        }
        let numbered = |n: u32| numbered_path(&self.path, n);
        let _ = std::fs::remove_file(numbered(self.keep_files));
        for n in (1..self.keep_files).rev() {
            let _ = std::fs::rename(numbered(n), numbered(n + 1));
        }
        std::fs::rename(&self.path, numbered(1))
    }
}

fn ends_with_newline(file: &mut File, len: u64) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// `name.n`, a rotated file.
pub fn numbered_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}
