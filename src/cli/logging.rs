//! Where `run` writes its log lines, decided from what the process can
//! observe about its stderr rather than from the platform's name:
//!
//! * stderr is a terminal (`contextpilotd run` by hand): stderr, with colour,
//!   and `contextpilotd.log` in the log dir;
//! * stderr is the systemd journal (`$JOURNAL_STREAM` names fd 2's device
//!   and inode): stderr only; journald stores and rotates;
//! * otherwise (a file or pipe a service manager captures, like launchd's
//!   `StandardErrorPath`): `contextpilotd.log` only, so each line is written
//!   once. Errors before logging is set up, and panics, still reach stderr.
//!
//! `contextpilotd.log` is rotated by size (`[log] max_bytes`, `keep_files`).
//! Both destinations are written by `tracing-appender`'s worker threads, so
//! a slow disk or a full pipe never blocks a runtime worker; a line that
//! finds the queue full is dropped rather than waited for.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::{Config, LOG_FILE};
use crate::logbus::LogBus;
use crate::rotate::{RotatingFile, WriteError};

/// Which destinations the daemon's log lines go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destinations {
    pub stderr: bool,
    pub file: bool,
}

/// The decision, from what the process observes: whether stderr is a
/// terminal, `$JOURNAL_STREAM` (systemd's `<device>:<inode>` of the stream
/// it connected), fd 2's own device and inode, and whether there is a log
/// dir. A `JOURNAL_STREAM` that does not name fd 2 was inherited from
/// elsewhere and does not count.
pub fn destinations(
    stderr_is_terminal: bool,
    journal_stream: Option<&str>,
    stderr_dev_ino: Option<(u64, u64)>,
    has_log_dir: bool,
) -> Destinations {
    if stderr_is_terminal {
        return Destinations {
            stderr: true,
            file: has_log_dir,
        };
    }
    let journal =
        stderr_dev_ino.is_some() && journal_stream.and_then(parse_dev_ino) == stderr_dev_ino;
    if journal {
        return Destinations {
            stderr: true,
            file: false,
        };
    }
    // Captured by a service manager: the rotated file, unless there is no
    // directory for it; then stderr is all there is.
    Destinations {
        stderr: !has_log_dir,
        file: has_log_dir,
    }
}

/// `"<device>:<inode>"`, both decimal, as systemd writes `JOURNAL_STREAM`.
fn parse_dev_ino(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// fd 2's device and inode (through a duplicate of it, so nothing unsafe).
fn stderr_dev_ino() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Keeps the log writers' threads; dropping it writes out what they still
/// hold (each gets about a second), so hold it until the process exits.
#[must_use = "dropping it stops the log writers"]
pub struct Logging {
    _guards: Vec<WorkerGuard>,
    /// Every line, live, for `GET /logs`.
    pub bus: LogBus,
}

/// Sets up the global subscriber. `CONTEXTPILOTD_LOG` overrides the level
/// with an `EnvFilter` directive.
pub fn init(config: &Config) -> Logging {
    let filter = || {
        EnvFilter::try_from_env("CONTEXTPILOTD_LOG")
            .unwrap_or_else(|_| EnvFilter::new(&config.log.level))
    };
    let is_terminal = std::io::stderr().is_terminal();
    let journal_stream = std::env::var("JOURNAL_STREAM").ok();
    let dir = config.log_dir();
    let wanted = destinations(
        is_terminal,
        journal_stream.as_deref(),
        stderr_dev_ino(),
        dir.is_some(),
    );

    let file = dir.filter(|_| wanted.file).and_then(|dir| {
        let path = dir.join(LOG_FILE);
        let mut file = LogFile::new(path.clone(), config.log.max_bytes, config.log.keep_files);
        match file.file.open() {
            Ok(()) => Some(file),
            Err(e) => {
                eprintln!(
                    "contextpilotd: cannot open {}: {e}; logging to stderr",
                    path.display()
                );
                None
            }
        }
    });
    let mut guards = Vec::new();
    let mut worker = |name: &str, writer: Box<dyn Write + Send>| {
        let (writer, guard) = NonBlockingBuilder::default()
            .thread_name(name)
            .finish(writer);
        guards.push(guard);
        writer
    };
    let stderr_layer = (wanted.stderr || file.is_none()).then(|| {
        fmt::layer()
            .with_ansi(is_terminal)
            .with_writer(worker(
                "contextpilotd-log-stderr",
                Box::new(std::io::stderr()),
            ))
            .with_filter(filter())
    });
    let file_layer = file.map(|file| {
        fmt::layer()
            .with_ansi(false)
            .with_writer(worker("contextpilotd-log-file", Box::new(file)))
            .with_filter(filter())
    });
    // The same lines as the log file, published in the calling thread (a
    // copy into memory, never a wait on a disk or a pipe).
    let bus = LogBus::new();
    let bus_layer = bus.layer().with_filter(filter());
    let _ = tracing_subscriber::registry()
        .with(stderr_layer)
        .with(file_layer)
        .with(bus_layer)
        .try_init();
    Logging {
        _guards: guards,
        bus,
    }
}

/// `contextpilotd.log` as the log writer's thread sees it: each write is one
/// formatted event (whole lines), appended in one piece, rotated by size
/// before it would pass `max_bytes`. A failure is said on stderr (once per
/// burst), never through `tracing`, which would feed it back here.
struct LogFile {
    file: RotatingFile,
    failed: u64,
}

impl LogFile {
    fn new(path: PathBuf, max_bytes: u64, keep_files: u32) -> LogFile {
        LogFile {
            file: RotatingFile::new(path, max_bytes, keep_files),
            failed: 0,
        }
    }

    fn fail(&mut self, why: &str) {
        self.failed += 1;
        if self.failed.is_power_of_two() {
            eprintln!(
                "contextpilotd: log file {}: {why} ({} failures so far)",
                self.file.path().display(),
                self.failed
            );
        }
    }
}

impl Write for LogFile {
    fn write(&mut self, lines: &[u8]) -> std::io::Result<usize> {
        if let Err(e) = self.file.rotate_if_full(lines.len() as u64) {
            self.fail(&format!("cannot rotate: {e}"));
        }
        match self.file.write(lines) {
            Ok(()) => {}
            Err(WriteError::Open(e)) => self.fail(&format!("cannot open, a line is lost: {e}")),
            Err(WriteError::Write(e)) => self.fail(&format!("cannot write, a line is lost: {e}")),
        }
        // Taken either way: the appender's thread has nothing better to do
        // with an error, and a retry could split a line.
        Ok(lines.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Every write went straight to the file.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotate::numbered_path;
    use std::path::Path;

    const BOTH: Destinations = Destinations {
        stderr: true,
        file: true,
    };
    const STDERR: Destinations = Destinations {
        stderr: true,
        file: false,
    };
    const FILE: Destinations = Destinations {
        stderr: false,
        file: true,
    };

    #[test]
    fn a_terminal_gets_the_lines_and_the_file_keeps_them() {
        assert_eq!(destinations(true, None, Some((1, 2)), true), BOTH);
        assert_eq!(destinations(true, None, None, false), STDERR);
        // A terminal is never the journal's socket, whatever the variable says.
        assert_eq!(destinations(true, Some("1:2"), Some((1, 2)), true), BOTH);
    }

    #[test]
    fn the_journal_gets_stderr_only() {
        assert_eq!(
            destinations(false, Some("64769:1234"), Some((64769, 1234)), true),
            STDERR
        );
        assert_eq!(
            destinations(false, Some("64769:1234"), Some((64769, 1234)), false),
            STDERR
        );
    }

    #[test]
    fn a_journal_stream_that_is_not_fd_2_does_not_count() {
        // Inherited by a process whose stderr was redirected since (a shell
        // in a unit, a child started with its own stderr file).
        assert_eq!(
            destinations(false, Some("64769:1234"), Some((64769, 999)), true),
            FILE
        );
        assert_eq!(
            destinations(false, Some("64769:1234"), Some((7, 1234)), true),
            FILE
        );
        assert_eq!(destinations(false, Some("64769:1234"), None, true), FILE);
        for odd in [
            "",
            "64769",
            "64769:",
            ":1234",
            "a:b",
            "64769:1234:5",
            "-1:1234",
        ] {
            assert_eq!(
                destinations(false, Some(odd), Some((64769, 1234)), true),
                FILE,
                "{odd:?}"
            );
        }
    }

    #[test]
    fn a_captured_stderr_leaves_the_lines_to_the_rotated_file() {
        // launchd's StandardErrorPath, a pipe, /dev/null.
        assert_eq!(destinations(false, None, Some((16777220, 42)), true), FILE);
        // Nowhere to put a file: stderr is better than nothing.
        assert_eq!(
            destinations(false, None, Some((16777220, 42)), false),
            STDERR
        );
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn the_file_rotates_by_size_keeping_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs").join(LOG_FILE);
        let line = |i: usize| format!("2026-12-02T10:00:00Z  INFO contextpilotd: line {i:03}\n");
        let line_len = line(0).len() as u64;
        // Room for 4 lines and a half: the fifth starts the next file.
        let mut file = LogFile::new(path.clone(), line_len * 9 / 2, 2);
        for i in 0..14 {
            file.write_all(line(i).as_bytes()).unwrap();
        }
        // 14 lines, 4 per file: the current has 2, .1 and .2 have 4 each,
        // and the first 4 went with the oldest file.
        assert_eq!(read(&path).lines().count(), 2);
        assert_eq!(read(&numbered_path(&path, 1)).lines().count(), 4);
        assert_eq!(read(&numbered_path(&path, 2)).lines().count(), 4);
        assert!(!numbered_path(&path, 3).exists());
        let kept: Vec<String> = [
            numbered_path(&path, 2),
            numbered_path(&path, 1),
            path.clone(),
        ]
        .iter()
        .flat_map(|p| read(p).lines().map(str::to_string).collect::<Vec<_>>())
        .collect();
        let expected: Vec<String> = (4..14).map(|i| line(i).trim_end().to_string()).collect();
        assert_eq!(kept, expected, "every kept line whole, in order");
        for p in [
            numbered_path(&path, 2),
            numbered_path(&path, 1),
            path.clone(),
        ] {
            assert!(read(&p).ends_with('\n'), "{} ends mid-line", p.display());
            assert!(std::fs::metadata(&p).unwrap().len() <= line_len * 9 / 2);
        }
        assert_eq!(file.failed, 0);
    }

    #[test]
    fn an_event_is_never_split_across_files_through_the_appender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(false)
            .finish(LogFile::new(path.clone(), 1024, 3));
        let subscriber =
            tracing_subscriber::registry().with(fmt::layer().with_ansi(false).with_writer(writer));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..100 {
                tracing::info!(
                    n = i,
                    "an event that is long enough to fill a kilobyte soon"
                );
            }
        });
        // Dropping the guard writes out what the thread still holds.
        drop(guard);
        let files = [
            numbered_path(&path, 3),
            numbered_path(&path, 2),
            numbered_path(&path, 1),
            path.clone(),
        ];
        assert!(!numbered_path(&path, 4).exists());
        let mut seen = Vec::new();
        for p in &files {
            let text = read(p);
            assert!(
                text.len() <= 1024,
                "{} is {} bytes",
                p.display(),
                text.len()
            );
            assert!(text.ends_with('\n'), "{} ends mid-line", p.display());
            for line in text.lines() {
                assert!(
                    line.contains(" INFO ") && line.contains("kilobyte soon n="),
                    "{line}"
                );
                let n: usize = line.rsplit("n=").next().unwrap().parse().unwrap();
                seen.push(n);
            }
        }
        // The newest lines, all of them, in order, up to the last.
        assert_eq!(seen.last(), Some(&99));
        assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
        assert!(!read(&path).contains('\x1b'), "no ANSI codes in the file");
    }
}
