//! Downloading a GGUF from the Hugging Face hub into its cache layout.
//!
//! The layout is `huggingface_hub`'s own, so that its tools, llama.cpp and
//! `discover` see what `pull` fetched (and `pull` reuses what they did):
//!
//! ```text
//! {hub cache}/models--{owner}--{name}/
//!     blobs/{sha256}                 the file, under its content's hash
//!     blobs/{sha256}.incomplete      a download in progress (resumed from)
//!     snapshots/{commit}/{file}  ->  ../../blobs/{sha256}
//!     refs/{revision}                the commit the revision named
//! {hub cache}/.locks/models--{owner}--{name}/{sha256}.lock
//! ```
//!
//! The hub's requests: `GET /api/models/{repo}/tree/{revision}` lists the
//! files with their LFS sha256; `HEAD /{repo}/resolve/{revision}/{file}`
//! (redirects not followed) says the commit (`X-Repo-Commit`) and the hash
//! (`X-Linked-Etag`); `GET /{repo}/resolve/{commit}/{file}` redirects to
//! the CDN that serves the bytes, with `Range`.
//!
//! A blob appears under its final name only complete and with the sha256
//! the hub advertised; a mismatch deletes the partial. What decides things
//! (the file choice, the paths, what to do with a partial and with the
//! answer to a `Range` request, the progress lines) is pure and tested
//! here; `tests/pull.rs` runs the whole path against a loopback hub.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The hub's address when `$HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision pulled when none is named.
pub const DEFAULT_REVISION: &str = "main";
/// The quantisations chosen, in this order, when none is named.
pub const DEFAULT_QUANTS: [&str; 2] = ["Q4_K_M", "Q4_0"];

/// Attempts in a row that receive nothing before a download gives up; an
/// attempt that received bytes starts the count again.
const MAX_FRUITLESS_ATTEMPTS: u32 = 5;
/// The wait after the first broken attempt; doubled after each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const COPY_BUFFER: usize = 256 * 1024;
/// Pages of a tree listing followed at most (the hub's pages hold 1,000
/// entries; no GGUF repository comes near this).
const MAX_TREE_PAGES: usize = 100;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The command line names something that cannot be a hub repository.
    #[error("{0}")]
    BadArgument(String),
    /// The repository, revision or quantisation is not on the hub.
    #[error("{0}")]
    NotFound(String),
    /// The hub or the CDN answered with an error, or could not be reached.
    #[error("{0}")]
    Http(String),
    /// The hub answered something this code cannot use.
    #[error("the hub's answer for {what} is unusable: {why}")]
    BadAnswer { what: String, why: String },
    #[error(
        "sha256 mismatch for {file}: expected {expected}, got {got}; the download was deleted"
    )]
    Mismatch {
        file: String,
        expected: String,
        got: String,
    },
    #[error("another pull of {file} is writing {path} now")]
    Busy { file: String, path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PullError {
    let path = path.to_path_buf();
    move |source| PullError::Io { what, path, source }
}

/// A model repository on the hub, `owner/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    pub owner: String,
    pub name: String,
}

impl std::fmt::Display for RepoId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

impl RepoId {
    /// The repository's folder in the hub cache.
    pub fn cache_folder(&self) -> String {
        format!("models--{}--{}", self.owner, self.name)
    }
}

/// Parses `owner/name[:quant]`. The hub's own rules for a name part
/// (letters, digits, `-`, `_`, `.`; no `--` or `..`, at most 96) also keep
/// `models--{owner}--{name}` unambiguous and inside the cache.
pub fn parse_spec(spec: &str) -> Result<(RepoId, Option<String>), PullError> {
    let bad = |why: &str| {
        PullError::BadArgument(format!(
            "{spec:?} is not a hub repository: {why} (expected owner/name or owner/name:QUANT)"
        ))
    };
    let (repo, quant) = match spec.split_once(':') {
        Some((repo, quant)) => (repo, Some(quant)),
        None => (spec, None),
    };
    let (owner, name) = repo.split_once('/').ok_or_else(|| bad("no '/'"))?;
    for part in [owner, name] {
        let valid_chars = part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if part.is_empty()
            || part.len() > 96
            || !valid_chars
            || part.contains("--")
            || part.contains("..")
            || part.starts_with(['-', '.'])
            || part.ends_with(['-', '.'])
        {
            return Err(bad(&format!("{part:?} is not a valid owner or name")));
        }
    }
    let quant = match quant {
        None => None,
        Some("") => return Err(bad("an empty quantisation after ':'")),
        Some(q) if q.contains("..") || q.starts_with('/') || q.contains('\\') => {
            return Err(bad(&format!("{q:?} is not a quantisation or file name")))
        }
        Some(q) => Some(q.to_string()),
    };
    Ok((
        RepoId {
            owner: owner.to_string(),
            name: name.to_string(),
        },
        quant,
    ))
}

/// Checks a revision before it becomes a URL segment and `refs/{revision}`:
/// branch and tag names may hold `/` (`refs/pr/1`), never a way out.
pub fn check_revision(revision: &str) -> Result<(), PullError> {
    let escapes = revision
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..");
    if revision.is_empty() || escapes || revision.contains('\\') || revision.contains('\0') {
        return Err(PullError::BadArgument(format!(
            "{revision:?} is not a revision (a branch, tag or commit)"
        )));
    }
    Ok(())
}

/// Where the hub and the cache are, from the environment.
#[derive(Clone)]
pub struct HubSettings {
    pub endpoint: String,
    pub cache_root: PathBuf,
    /// Sent as `Authorization: Bearer` to the endpoint only; never printed.
    token: Option<String>,
}

impl std::fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("cache_root", &self.cache_root)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// A variable's value, with an empty one counted as unset.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// `$HF_HOME`, else `~/.cache/huggingface`.
pub fn hf_home(hf_home: Option<String>, home: Option<&Path>) -> Option<PathBuf> {
    match non_empty(hf_home) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => home.map(|h| h.join(".cache").join("huggingface")),
    }
}

/// The hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (the order `huggingface_hub` uses).
pub fn hub_cache_root(
    hf_hub_cache: Option<String>,
    hf_home_var: Option<String>,
    home: Option<&Path>,
) -> Option<PathBuf> {
    match non_empty(hf_hub_cache) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => hf_home(hf_home_var, home).map(|h| h.join("hub")),
    }
}

impl HubSettings {
    /// Reads `$HF_ENDPOINT`, `$HF_TOKEN` (else the file `$HF_HOME/token`),
    /// `$HF_HUB_CACHE` and `$HF_HOME`.
    pub fn from_env() -> Result<HubSettings, PullError> {
        let var = |key: &str| std::env::var(key).ok();
        let home = directories::BaseDirs::new().map(|d| d.home_dir().to_path_buf());
        let cache_root = hub_cache_root(var("HF_HUB_CACHE"), var("HF_HOME"), home.as_deref())
            .ok_or_else(|| {
                PullError::BadArgument(
                    "no home directory to put the hub cache under: set HF_HOME or HF_HUB_CACHE"
                        .into(),
                )
            })?;
        let token = non_empty(var("HF_TOKEN")).or_else(|| {
            let file = hf_home(var("HF_HOME"), home.as_deref())?.join("token");
            non_empty(fs::read_to_string(file).ok())
        });
        Ok(HubSettings {
            endpoint: non_empty(var("HF_ENDPOINT"))
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            cache_root,
            token: token.map(|t| t.trim().to_string()),
        })
    }
}

/// One entry of the hub's tree listing.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TreeEntry {
    #[serde(rename = "type", default)]
    pub kind: String,
    pub path: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub lfs: Option<LfsInfo>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct LfsInfo {
    /// The file's sha256, in hex.
    pub oid: String,
    pub size: u64,
}

impl TreeEntry {
    fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    fn is_model_gguf(&self) -> bool {
        let name = self.file_name().to_ascii_lowercase();
        self.kind != "directory" && name.ends_with(".gguf") && !name.starts_with("mmproj")
    }
}

/// A split model's part: `{stem}-{index:05}-of-{count:05}.gguf`, as
/// llama.cpp's `gguf-split` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitPart<'a> {
    pub stem: &'a str,
    pub index: u32,
    pub count: u32,
}

pub fn split_part(path: &str) -> Option<SplitPart<'_>> {
    let lower = path.to_ascii_lowercase();
    let body = &path[..lower.strip_suffix(".gguf")?.len()];
    // "-00001-of-00003" is 15 bytes of ASCII at the end.
    let cut = body.len().checked_sub(15)?;
    let (stem, tail) = (body.get(..cut)?, body.get(cut..)?);
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    let (index, count) = tail.strip_prefix('-')?.split_once("-of-")?;
    if !digits(index) || !digits(count) {
        return None;
    }
    let (index, count) = (index.parse().ok()?, count.parse().ok()?);
    (index >= 1 && index <= count).then_some(SplitPart { stem, index, count })
}

/// The quantisation a file name carries (`…-Q4_K_M.gguf` → `Q4_K_M`), for
/// telling people what a repository has.
pub fn quant_tag(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or(path);
    let stem = split_part(name)
        .map(|p| p.stem)
        .unwrap_or_else(|| &name[..name.len().saturating_sub(".gguf".len())]);
    let looks_like_quant = |token: &str| {
        let t = token.to_ascii_uppercase();
        let numbered = |prefix: &str| {
            t.strip_prefix(prefix)
                .and_then(|rest| rest.chars().next())
                .is_some_and(|c| c.is_ascii_digit())
        };
        numbered("Q")
            || numbered("IQ")
            || numbered("TQ")
            || matches!(t.as_str(), "F16" | "F32" | "BF16" | "FP16" | "FP32")
            || t.starts_with("MXFP4")
    };
    stem.rsplit(['-', '.'])
        .find(|token| looks_like_quant(token))
        .unwrap_or(stem)
        .to_string()
}

/// Whether `name` holds `tag` as a whole word: a quantisation between
/// separators (`-`, `.`, `/`, the ends), so that `Q4_K` is not `Q4_K_M`.
fn contains_tag(name: &str, tag: &str) -> bool {
    let (name, tag) = (name.to_ascii_lowercase(), tag.to_ascii_lowercase());
    let is_separator = |c: Option<char>| c.is_none_or(|c| matches!(c, '-' | '.' | '/'));
    name.match_indices(&tag).any(|(at, _)| {
        is_separator(name[..at].chars().next_back())
            && is_separator(name[at + tag.len()..].chars().next())
    })
}

/// The files to download from a tree listing: the GGUF whose name holds
/// `quant` (a whole word first, then anywhere, case-insensitive; or whose
/// name is `quant`), else `Q4_K_M`, then `Q4_0`, then the first GGUF;
/// never a multimodal projector (`mmproj*`). A split model is every part,
/// in order.
pub fn choose_files<'a>(
    entries: &'a [TreeEntry],
    quant: Option<&str>,
) -> Result<Vec<&'a TreeEntry>, PullError> {
    let mut ggufs: Vec<&TreeEntry> = entries.iter().filter(|e| e.is_model_gguf()).collect();
    ggufs.sort_by(|a, b| a.path.cmp(&b.path));
    if ggufs.is_empty() {
        return Err(PullError::NotFound(
            "the repository has no GGUF model files".into(),
        ));
    }
    let by_name = |q: &str| {
        ggufs
            .iter()
            .copied()
            .find(|e| e.path.eq_ignore_ascii_case(q) || e.file_name().eq_ignore_ascii_case(q))
    };
    let by_tag = |q: &str| {
        let whole = ggufs.iter().copied().find(|e| contains_tag(&e.path, q));
        whole.or_else(|| {
            let q = q.to_ascii_lowercase();
            ggufs
                .iter()
                .copied()
                .find(|e| e.path.to_ascii_lowercase().contains(&q))
        })
    };
    let chosen = match quant {
        Some(q) => by_name(q).or_else(|| by_tag(q)).ok_or_else(|| {
            PullError::NotFound(format!(
                "no GGUF for quantisation {q:?}; available: {}",
                available_quants(&ggufs).join(", ")
            ))
        })?,
        None => DEFAULT_QUANTS
            .iter()
            .find_map(|q| by_tag(q))
            .unwrap_or(ggufs[0]),
    };
    let Some(part) = split_part(&chosen.path) else {
        return Ok(vec![chosen]);
    };
    let mut parts: Vec<&TreeEntry> = ggufs
        .iter()
        .copied()
        .filter(|e| {
            split_part(&e.path).is_some_and(|p| p.stem == part.stem && p.count == part.count)
        })
        .collect();
    parts.sort_by_key(|e| split_part(&e.path).map(|p| p.index));
    parts.dedup_by_key(|e| split_part(&e.path).map(|p| p.index));
    if parts.len() != part.count as usize {
        return Err(PullError::NotFound(format!(
            "{} is part of a {}-part model, but the repository lists {} of its parts",
            chosen.path,
            part.count,
            parts.len()
        )));
    }
    Ok(parts)
}

fn available_quants(ggufs: &[&TreeEntry]) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    for entry in ggufs {
        let tag = quant_tag(&entry.path);
        if !tags.iter().any(|t| t.eq_ignore_ascii_case(&tag)) {
            tags.push(tag);
        }
    }
    tags
}

/// Checks a path from the hub's listing before it becomes a path under
/// `snapshots/`: relative, with no `.`/`..` or empty components.
pub fn check_repo_path(path: &str) -> Result<(), PullError> {
    let bad_component = path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..");
    if bad_component || path.contains('\\') || path.contains('\0') {
        return Err(PullError::BadAnswer {
            what: "the file list".into(),
            why: format!("{path:?} is not a relative path inside the repository"),
        });
    }
    Ok(())
}

/// A sha256 in lower-case hex, or `None` when `value` is not one (an ETag
/// may be quoted, weak, or a git sha1 for a file not in LFS).
pub fn sha256_hex(value: &str) -> Option<String> {
    let v = value.trim().trim_start_matches("W/").trim_matches('"');
    (v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())).then(|| v.to_ascii_lowercase())
}

fn is_commit_hash(value: &str) -> bool {
    value.len() == 40 && value.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cache paths of one repository.
#[derive(Debug, Clone)]
pub struct RepoCache {
    pub root: PathBuf,
    pub dir: PathBuf,
    folder: String,
}

impl RepoCache {
    pub fn new(cache_root: &Path, repo: &RepoId) -> RepoCache {
        let folder = repo.cache_folder();
        RepoCache {
            root: cache_root.to_path_buf(),
            dir: cache_root.join(&folder),
            folder,
        }
    }

    pub fn blob(&self, sha256: &str) -> PathBuf {
        self.dir.join("blobs").join(sha256)
    }

    pub fn incomplete(&self, sha256: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{sha256}.incomplete"))
    }

    pub fn snapshot(&self, commit: &str, file: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit).join(file)
    }

    pub fn ref_file(&self, revision: &str) -> PathBuf {
        self.dir.join("refs").join(revision)
    }

    /// The lock file `huggingface_hub` takes while it writes the blob.
    pub fn lock(&self, sha256: &str) -> PathBuf {
        self.root
            .join(".locks")
            .join(&self.folder)
            .join(format!("{sha256}.lock"))
    }
}

/// The relative target of `snapshots/{commit}/{file}`: one `..` per folder
/// between it and the repository folder, then `blobs/{sha256}`.
pub fn snapshot_link_target(file: &str, sha256: &str) -> PathBuf {
    let mut target = PathBuf::from("..");
    target.push("..");
    for _ in 1..file.split('/').count() {
        target.push("..");
    }
    target.join("blobs").join(sha256)
}

/// What to do with the bytes already in `blobs/{sha256}.incomplete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Nothing usable: (re)start from the first byte.
    Fresh,
    /// Ask for the rest with `Range: bytes={0}-`.
    From(u64),
    /// All bytes are there; only the hash is left to check.
    Complete,
}

pub fn resume_decision(have: u64, size: u64) -> Resume {
    match have {
        h if h == size => Resume::Complete,
        0 => Resume::Fresh,
        h if h < size => Resume::From(h),
        // Longer than the file: not a prefix of it.
        _ => Resume::Fresh,
    }
}

/// What an answer to a download request means for the partial file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeAnswer {
    /// The body continues the partial: append it.
    Append,
    /// The body is the whole file (a server that ignores `Range`): empty
    /// the partial, then write it.
    StartOver,
    /// The range was refused (416): the partial is not a prefix of this
    /// file; empty it and ask again without `Range`.
    Refused,
    /// The server is unwell or busy: try again later.
    Retry(String),
    /// An error that trying again will not cure.
    Fail(String),
}

pub fn range_answer(from: u64, status: u16, content_range: Option<&str>) -> RangeAnswer {
    match status {
        200 if from == 0 => RangeAnswer::Append,
        200 => RangeAnswer::StartOver,
        206 => {
            let start = content_range
                .and_then(|v| v.trim().strip_prefix("bytes "))
                .and_then(|v| v.split_once('-'))
                .and_then(|(start, _)| start.trim().parse::<u64>().ok());
            match start {
                Some(s) if s == from => RangeAnswer::Append,
                _ => RangeAnswer::Retry(format!(
                    "asked for bytes from {from}, got Content-Range {:?}",
                    content_range.unwrap_or("")
                )),
            }
        }
        416 => RangeAnswer::Refused,
        408 | 429 | 500..=599 => RangeAnswer::Retry(format!("HTTP {status}")),
        _ => RangeAnswer::Fail(format!("HTTP {status}")),
    }
}

/// The plain progress line printed when stderr is not a terminal.
pub fn progress_line(label: &str, have: u64, total: u64) -> String {
    let percent = (have * 100).checked_div(total).unwrap_or(100);
    format!(
        "pulling {label}: {percent}% ({:.1} of {:.1} MiB)",
        have as f64 / MIB,
        total as f64 / MIB
    )
}

/// How far along a download is in tenths, for printing a plain line at
/// each 10 %.
pub fn tenth(have: u64, total: u64) -> u64 {
    (have.min(total) * 10).checked_div(total).unwrap_or(10)
}

/// The progress of one file: a bar on a terminal, plain lines at each
/// 10 % elsewhere (logs and tests stay readable).
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines {
        label: String,
        total: u64,
        printed_tenth: Option<u64>,
    },
}

impl Progress {
    fn new(label: &str, total: u64, have: u64) -> Progress {
        if io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .map(|s| s.progress_chars("=> "));
            if let Ok(style) = style {
                bar.set_style(style);
            }
            bar.set_message(format!("pulling {label}"));
            bar.set_position(have);
            Progress::Bar(bar)
        } else {
            let mut lines = Progress::Lines {
                label: label.to_string(),
                total,
                printed_tenth: None,
            };
            lines.update(have);
            lines
        }
    }

    fn update(&mut self, have: u64) {
        match self {
            Progress::Bar(bar) => bar.set_position(have),
            Progress::Lines {
                label,
                total,
                printed_tenth,
            } => {
                let now = tenth(have, *total);
                if printed_tenth.is_none_or(|printed| now > printed) {
                    eprintln!("{}", progress_line(label, have, *total));
                    *printed_tenth = Some(now);
                }
            }
        }
    }

    /// A line about the download that must not be drawn over by the bar.
    fn note(&mut self, text: &str) {
        match self {
            Progress::Bar(bar) => bar.println(text),
            Progress::Lines { .. } => eprintln!("{text}"),
        }
    }

    /// The count went back to `have` (a server that ignored `Range`).
    fn restart(&mut self, have: u64) {
        match self {
            Progress::Bar(bar) => bar.set_position(have),
            Progress::Lines { printed_tenth, .. } => *printed_tenth = None,
        }
    }

    fn finish(self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// The URL of a `Link` header's `rel="next"` entry.
pub fn next_page_link(header: &str) -> Option<String> {
    header.split(',').find_map(|entry| {
        let (target, params) = entry.trim().split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| matches!(p.trim(), "rel=\"next\"" | "rel=next"));
        let url = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| url.to_string())
    })
}

/// Percent-encodes a URL path, keeping `/` when `keep_slash`.
fn encode_path(value: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        let plain = byte.is_ascii_alphanumeric()
            || matches!(byte, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && byte == b'/');
        if plain {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// What one pull asks for.
#[derive(Debug, Clone)]
pub struct PullRequest {
    pub repo: RepoId,
    pub quant: Option<String>,
    pub revision: String,
}

/// What one pull left in the cache.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// `snapshots/{commit}/{file}` of the (first part of the) model.
    pub path: PathBuf,
    pub commit: String,
    pub files: Vec<String>,
}

/// The HTTP side: one agent, and the token for the endpoint's own requests.
struct Hub<'a> {
    agent: ureq::Agent,
    settings: &'a HubSettings,
}

#[cfg(target_os = "macos")]
fn tls_config() -> ureq::tls::TlsConfig {
    ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::NativeTls)
        .root_certs(ureq::tls::RootCerts::PlatformVerifier)
        .build()
}

#[cfg(not(target_os = "macos"))]
fn tls_config() -> ureq::tls::TlsConfig {
    ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .build()
}

type Response = ureq::http::Response<ureq::Body>;

impl<'a> Hub<'a> {
    fn new(settings: &'a HubSettings) -> Hub<'a> {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(concat!("contextpilotd/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .tls_config(tls_config())
            .build()
            .new_agent();
        Hub { agent, settings }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.settings.endpoint)
    }

    /// A request to the endpoint, with the token when there is one (ureq
    /// drops it on redirects, so the CDN never sees it).
    fn authorised<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.settings.token {
            Some(token) => request.header("Authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    /// `GET` a JSON document from the endpoint: the status, the value on a
    /// 200, and the next page's URL from a `Link: <…>; rel="next"` header.
    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        url: &str,
    ) -> Result<(u16, Option<T>, Option<String>), PullError> {
        let mut response = self
            .authorised(self.agent.get(url))
            .call()
            .map_err(|e| PullError::Http(format!("{what}: {url}: {e}")))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Ok((status, None, None));
        }
        let next = response
            .headers()
            .get_all("link")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(next_page_link)
            .and_then(|link| self.same_endpoint(&link));
        let bad = |why: String| PullError::BadAnswer {
            what: what.to_string(),
            why,
        };
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| bad(e.to_string()))?;
        let value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        Ok((status, Some(value), next))
    }

    /// `link` as a URL on the endpoint (where the token may go), or `None`.
    fn same_endpoint(&self, link: &str) -> Option<String> {
        let endpoint = &self.settings.endpoint;
        if link.starts_with('/') {
            Some(format!("{endpoint}{link}"))
        } else {
            link.strip_prefix(endpoint.as_str())
                .filter(|rest| rest.starts_with('/'))
                .map(|_| link.to_string())
        }
    }

    /// The whole listing, page after page (the hub pages long ones).
    fn tree(&self, repo: &RepoId, revision: &str) -> Result<Vec<TreeEntry>, PullError> {
        let mut url = self.url(&format!(
            "/api/models/{repo}/tree/{}?recursive=true",
            encode_path(revision, false)
        ));
        let mut entries = Vec::new();
        for _ in 0..MAX_TREE_PAGES {
            match self.get_json::<Vec<TreeEntry>>("the file list", &url)? {
                (_, Some(page), next) => {
                    entries.extend(page);
                    match next {
                        Some(next) => url = next,
                        None => return Ok(entries),
                    }
                }
                (401 | 403 | 404, _, _) => {
                    return Err(PullError::NotFound(format!(
                        "{repo} at revision {revision} is not on {} (or it is private or gated: set HF_TOKEN)",
                        self.settings.endpoint
                    )))
                }
                (status, _, _) => {
                    return Err(PullError::Http(format!(
                        "the file list of {repo}: HTTP {status}"
                    )))
                }
            }
        }
        Err(PullError::BadAnswer {
            what: "the file list".into(),
            why: format!("more than {MAX_TREE_PAGES} pages"),
        })
    }

    fn revision_commit(&self, repo: &RepoId, revision: &str) -> Result<String, PullError> {
        #[derive(Deserialize)]
        struct RevisionInfo {
            sha: String,
        }
        let path = format!(
            "/api/models/{repo}/revision/{}",
            encode_path(revision, false)
        );
        match self.get_json::<RevisionInfo>("the revision", &self.url(&path))? {
            (_, Some(info), _) if is_commit_hash(&info.sha) => Ok(info.sha.to_ascii_lowercase()),
            (_, Some(info), _) => Err(PullError::BadAnswer {
                what: "the revision".into(),
                why: format!("{:?} is not a commit hash", info.sha),
            }),
            (status, None, _) => Err(PullError::Http(format!(
                "the commit of {repo} at {revision}: HTTP {status}"
            ))),
        }
    }

    /// `HEAD resolve/{revision}/{file}`, not followed: the commit and the
    /// sha256 are on the hub's answer, not on the CDN's.
    fn file_metadata(
        &self,
        repo: &RepoId,
        revision: &str,
        file: &str,
    ) -> Result<FileMetadata, PullError> {
        let url = self.url(&format!(
            "/{repo}/resolve/{}/{}",
            encode_path(revision, false),
            encode_path(file, true)
        ));
        let response = self
            .authorised(self.agent.head(&url))
            .config()
            .max_redirects(0)
            .build()
            .call()
            .map_err(|e| PullError::Http(format!("{file}: {url}: {e}")))?;
        let status = response.status().as_u16();
        if !(200..400).contains(&status) {
            return Err(PullError::Http(format!("{file}: {url}: HTTP {status}")));
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(FileMetadata {
            commit: header("x-repo-commit").filter(|c| is_commit_hash(c)),
            sha256: header("x-linked-etag")
                .or_else(|| header("etag"))
                .and_then(|e| sha256_hex(&e)),
            size: header("x-linked-size").and_then(|s| s.trim().parse().ok()),
        })
    }

    /// `GET resolve/{commit}/{file}` from byte `from`, redirects followed.
    fn download(&self, url: &str, from: u64) -> Result<Response, ureq::Error> {
        let request = self.authorised(self.agent.get(url));
        let request = if from > 0 {
            request.header("Range", format!("bytes={from}-"))
        } else {
            request
        };
        request.call()
    }
}

#[derive(Debug, Default)]
struct FileMetadata {
    commit: Option<String>,
    sha256: Option<String>,
    size: Option<u64>,
}

/// Pulls the model `request` names into the hub cache, printing progress on
/// stderr. Returns where the model is in `snapshots/`.
pub fn pull(settings: &HubSettings, request: &PullRequest) -> Result<Pulled, PullError> {
    check_revision(&request.revision)?;
    let hub = Hub::new(settings);
    let repo = &request.repo;
    let entries = hub.tree(repo, &request.revision)?;
    let files = choose_files(&entries, request.quant.as_deref())?;
    for file in &files {
        check_repo_path(&file.path)?;
    }
    let cache = RepoCache::new(&settings.cache_root, repo);
    let mut commit: Option<String> =
        is_commit_hash(&request.revision).then(|| request.revision.to_ascii_lowercase());
    let mut paths = Vec::new();
    for file in &files {
        let revision = commit.as_deref().unwrap_or(&request.revision);
        let metadata = hub.file_metadata(repo, revision, &file.path)?;
        let commit = match &commit {
            Some(c) => c.clone(),
            None => {
                let found = match metadata.commit.clone() {
                    Some(c) => c.to_ascii_lowercase(),
                    None => hub.revision_commit(repo, &request.revision)?,
                };
                commit = Some(found.clone());
                found
            }
        };
        let sha256 = expected_sha256(file, &metadata)?;
        let size = file
            .lfs
            .as_ref()
            .map(|l| l.size)
            .or(metadata.size)
            .unwrap_or(file.size);
        let url = hub.url(&format!(
            "/{repo}/resolve/{commit}/{}",
            encode_path(&file.path, true)
        ));
        let label = format!("{repo} {}", file.path);
        fetch_blob(&hub, &cache, &url, &label, &file.path, &sha256, size)?;
        paths.push(link_snapshot(&cache, &commit, &file.path, &sha256)?);
    }
    let commit = commit.unwrap_or_default();
    if request.revision != commit {
        write_ref(&cache, &request.revision, &commit)?;
    }
    let path = paths
        .into_iter()
        .next()
        .ok_or_else(|| PullError::NotFound("the repository has no GGUF model files".into()))?;
    Ok(Pulled {
        path,
        commit,
        files: files.iter().map(|f| f.path.clone()).collect(),
    })
}

/// The sha256 a file must have: the tree's LFS oid, which the hub's
/// `X-Linked-Etag` must agree with when it names one.
fn expected_sha256(file: &TreeEntry, metadata: &FileMetadata) -> Result<String, PullError> {
    let from_tree = file.lfs.as_ref().and_then(|l| sha256_hex(&l.oid));
    match (from_tree, metadata.sha256.clone()) {
        (Some(tree), Some(etag)) if tree != etag => Err(PullError::BadAnswer {
            what: file.path.clone(),
            why: format!("the file list says sha256 {tree}, the download says {etag}"),
        }),
        (Some(sha), _) | (None, Some(sha)) => Ok(sha),
        (None, None) => Err(PullError::BadAnswer {
            what: file.path.clone(),
            why: "the hub names no sha256 for it (not an LFS file)".into(),
        }),
    }
}

/// Makes `blobs/{sha256}` hold the file: already there, or downloaded into
/// `.incomplete` (resumed, retried) and renamed only once its hash is right.
fn fetch_blob(
    hub: &Hub<'_>,
    cache: &RepoCache,
    url: &str,
    label: &str,
    file: &str,
    sha256: &str,
    size: u64,
) -> Result<PathBuf, PullError> {
    let blob = cache.blob(sha256);
    let blobs_dir = cache.dir.join("blobs");
    fs::create_dir_all(&blobs_dir).map_err(io_err("cannot create", &blobs_dir))?;
    let lock_path = cache.lock(sha256);
    if let Some(parent) = lock_path.parent() {
        fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    }
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err("cannot open", &lock_path))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| PullError::Busy {
            file: file.to_string(),
            path: blob.clone(),
        })?;

    if let Ok(meta) = fs::metadata(&blob) {
        if meta.len() == size {
            eprintln!("{label}: already in the cache ({})", blob.display());
            return Ok(blob);
        }
        // Only a complete file is ever renamed to this name; one of another
        // size was put there by something else and is not this file.
        eprintln!(
            "{label}: {} has {} bytes, not {size}; downloading it again",
            blob.display(),
            meta.len()
        );
        fs::remove_file(&blob).map_err(io_err("cannot remove", &blob))?;
    }

    let partial_path = cache.incomplete(sha256);
    let mut partial = Partial::open(&partial_path)?;
    let result = download_into(hub, url, label, size, &mut partial);
    let got = match result {
        Ok(()) => partial.hex_digest(),
        Err(e) => return Err(e),
    };
    if got != sha256 {
        drop(partial);
        fs::remove_file(&partial_path).map_err(io_err("cannot remove", &partial_path))?;
        return Err(PullError::Mismatch {
            file: file.to_string(),
            expected: sha256.to_string(),
            got,
        });
    }
    partial.finish()?;
    fs::rename(&partial_path, &blob).map_err(io_err("cannot rename to", &blob))?;
    Ok(blob)
}

/// `blobs/{sha256}.incomplete`: the bytes so far, and their hash.
struct Partial {
    path: PathBuf,
    file: File,
    have: u64,
    hasher: Sha256,
}

impl Partial {
    /// Opens (or creates) the partial and hashes what it holds, so that a
    /// resumed download is checked from its first byte.
    fn open(path: &Path) -> Result<Partial, PullError> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("cannot open", path))?;
        let mut hasher = Sha256::new();
        let mut have = 0u64;
        let mut buffer = vec![0u8; COPY_BUFFER];
        loop {
            let n = file
                .read(&mut buffer)
                .map_err(io_err("cannot read", path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            have += n as u64;
        }
        Ok(Partial {
            path: path.to_path_buf(),
            file,
            have,
            hasher,
        })
    }

    fn empty(&mut self) -> Result<(), PullError> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.seek(SeekFrom::Start(0)).map(drop))
            .map_err(io_err("cannot empty", &self.path))?;
        self.have = 0;
        self.hasher = Sha256::new();
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), PullError> {
        self.file
            .write_all(bytes)
            .map_err(io_err("cannot write", &self.path))?;
        self.hasher.update(bytes);
        self.have += bytes.len() as u64;
        Ok(())
    }

    fn hex_digest(&self) -> String {
        let digest = self.hasher.clone().finalize();
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// On disk before the rename, so the final name never points at bytes
    /// a crash could lose.
    fn finish(self) -> Result<(), PullError> {
        self.file
            .sync_all()
            .map_err(io_err("cannot flush", &self.path))
    }
}

/// How one download attempt ended, when not with the whole file.
enum Broken {
    /// The connection broke or the server was unwell: resume.
    Retry(String),
    Fatal(PullError),
}

/// Fills `partial` up to `size` bytes, resuming after each broken attempt.
fn download_into(
    hub: &Hub<'_>,
    url: &str,
    label: &str,
    size: u64,
    partial: &mut Partial,
) -> Result<(), PullError> {
    if resume_decision(partial.have, size) == Resume::Fresh && partial.have > 0 {
        partial.empty()?;
    }
    let mut progress = Progress::new(label, size, partial.have);
    if partial.have > 0 && partial.have < size {
        progress.note(&format!(
            "{label}: resuming at {:.1} of {:.1} MiB",
            partial.have as f64 / MIB,
            size as f64 / MIB
        ));
    }
    let mut fruitless = 0u32;
    let mut backoff = FIRST_BACKOFF;
    while resume_decision(partial.have, size) != Resume::Complete {
        let before = partial.have;
        match attempt(hub, url, size, partial, &mut progress) {
            Ok(()) => {}
            Err(Broken::Fatal(e)) => {
                progress.finish();
                return Err(e);
            }
            Err(Broken::Retry(why)) => {
                if partial.have > before {
                    fruitless = 0;
                    backoff = FIRST_BACKOFF;
                }
                fruitless += 1;
                if fruitless >= MAX_FRUITLESS_ATTEMPTS {
                    progress.finish();
                    return Err(PullError::Http(format!(
                        "{label}: gave up after {fruitless} attempts in a row without data: {why} (run pull again to resume)"
                    )));
                }
                progress.note(&format!(
                    "{label}: {why}; resuming from {:.1} MiB in {:.1} s",
                    partial.have as f64 / MIB,
                    backoff.as_secs_f64()
                ));
                std::thread::sleep(backoff);
                backoff = backoff.saturating_mul(2);
            }
        }
    }
    progress.update(partial.have);
    progress.finish();
    Ok(())
}

/// One request for the bytes `partial` lacks, written as they arrive.
fn attempt(
    hub: &Hub<'_>,
    url: &str,
    size: u64,
    partial: &mut Partial,
    progress: &mut Progress,
) -> Result<(), Broken> {
    let from = match resume_decision(partial.have, size) {
        Resume::From(have) => have,
        _ => 0,
    };
    let response = hub
        .download(url, from)
        .map_err(|e| Broken::Retry(format!("request failed: {e}")))?;
    let status = response.status().as_u16();
    let content_range = response
        .headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok());
    match range_answer(from, status, content_range) {
        RangeAnswer::Append => {}
        RangeAnswer::StartOver => {
            progress.note("the server ignored the range request; starting over");
            partial.empty().map_err(Broken::Fatal)?;
            progress.restart(0);
        }
        RangeAnswer::Refused => {
            partial.empty().map_err(Broken::Fatal)?;
            progress.restart(0);
            return Err(Broken::Retry(
                "the server refused the range (416); starting over".into(),
            ));
        }
        RangeAnswer::Retry(why) => return Err(Broken::Retry(why)),
        RangeAnswer::Fail(why) => {
            return Err(Broken::Fatal(PullError::Http(format!("{url}: {why}"))))
        }
    }
    let mut body = response.into_body().into_reader();
    let mut buffer = vec![0u8; COPY_BUFFER];
    loop {
        let n = match body.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Broken::Retry(format!("connection broken: {e}"))),
        };
        if partial.have + n as u64 > size {
            return Err(Broken::Fatal(PullError::BadAnswer {
                what: url.to_string(),
                why: format!("the server sent more than the file's {size} bytes"),
            }));
        }
        partial.append(&buffer[..n]).map_err(Broken::Fatal)?;
        progress.update(partial.have);
    }
    if partial.have < size {
        return Err(Broken::Retry(format!(
            "connection closed at {} of {size} bytes",
            partial.have
        )));
    }
    Ok(())
}

/// `snapshots/{commit}/{file}` → `../../blobs/{sha256}`, replacing whatever
/// was there in one rename.
fn link_snapshot(
    cache: &RepoCache,
    commit: &str,
    file: &str,
    sha256: &str,
) -> Result<PathBuf, PullError> {
    let link = cache.snapshot(commit, file);
    let parent = link.parent().unwrap_or(&cache.dir);
    fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    let staged = parent.join(format!(
        ".{}.{}.tmp",
        file.rsplit('/').next().unwrap_or(file),
        std::process::id()
    ));
    let _ = fs::remove_file(&staged);
    std::os::unix::fs::symlink(snapshot_link_target(file, sha256), &staged)
        .map_err(io_err("cannot create the link", &staged))?;
    fs::rename(&staged, &link).map_err(io_err("cannot rename to", &link))?;
    Ok(link)
}

/// `refs/{revision}` holding the commit (no newline, as `huggingface_hub`
/// writes it), replaced in one rename.
fn write_ref(cache: &RepoCache, revision: &str, commit: &str) -> Result<(), PullError> {
    let path = cache.ref_file(revision);
    let parent = path.parent().unwrap_or(&cache.dir);
    fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    let staged = parent.join(format!(".ref.{}.tmp", std::process::id()));
    fs::write(&staged, commit).map_err(io_err("cannot write", &staged))?;
    fs::rename(&staged, &path).map_err(io_err("cannot rename to", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> TreeEntry {
        TreeEntry {
            kind: "file".into(),
            path: path.into(),
            size: 10,
            lfs: Some(LfsInfo {
                oid: "a".repeat(64),
                size: 10,
            }),
        }
    }

    fn chosen(entries: &[TreeEntry], quant: Option<&str>) -> Vec<String> {
        choose_files(entries, quant)
            .map(|files| files.iter().map(|f| f.path.clone()).collect())
            .unwrap_or_else(|e| vec![format!("error: {e}")])
    }

    #[test]
    fn spec_parsing_accepts_owner_name_and_quant() {
        let (repo, quant) = parse_spec("unsloth/Qwen3-0.6B-GGUF:q8_0").unwrap();
        assert_eq!(repo.to_string(), "unsloth/Qwen3-0.6B-GGUF");
        assert_eq!(repo.cache_folder(), "models--unsloth--Qwen3-0.6B-GGUF");
        assert_eq!(quant.as_deref(), Some("q8_0"));
        assert_eq!(parse_spec("a/b").unwrap().1, None);
        for bad in [
            "noslash", "/name", "owner/", "a/b/c", "a--b/c", "a/../b", "a/b:", "a/b:../x", "a b/c",
            "../x",
        ] {
            assert!(
                matches!(parse_spec(bad), Err(PullError::BadArgument(_))),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn revisions_may_hold_slashes_but_never_leave_refs() {
        assert!(check_revision("main").is_ok());
        assert!(check_revision("refs/pr/1").is_ok());
        for bad in ["", "../x", "a//b", "/abs", "a/.."] {
            assert!(check_revision(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn cache_root_follows_huggingface_hub_order() {
        let home = Path::new("/home/u");
        assert_eq!(
            hub_cache_root(Some("/c".into()), Some("/h".into()), Some(home)),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(
            hub_cache_root(None, Some("/h".into()), Some(home)),
            Some(PathBuf::from("/h/hub"))
        );
        assert_eq!(
            hub_cache_root(Some(String::new()), None, Some(home)),
            Some(PathBuf::from("/home/u/.cache/huggingface/hub"))
        );
        assert_eq!(hub_cache_root(None, None, None), None);
    }

    #[test]
    fn cache_paths_are_huggingface_hubs_layout() {
        let (repo, _) = parse_spec("owner/name").unwrap();
        let cache = RepoCache::new(Path::new("/c"), &repo);
        let sha = "b".repeat(64);
        assert_eq!(
            cache.blob(&sha),
            PathBuf::from(format!("/c/models--owner--name/blobs/{sha}"))
        );
        assert_eq!(
            cache.incomplete(&sha),
            PathBuf::from(format!("/c/models--owner--name/blobs/{sha}.incomplete"))
        );
        assert_eq!(
            cache.snapshot("c0ffee", "sub/m.gguf"),
            PathBuf::from("/c/models--owner--name/snapshots/c0ffee/sub/m.gguf")
        );
        assert_eq!(
            cache.ref_file("main"),
            PathBuf::from("/c/models--owner--name/refs/main")
        );
        assert_eq!(
            cache.lock(&sha),
            PathBuf::from(format!("/c/.locks/models--owner--name/{sha}.lock"))
        );
        assert_eq!(
            snapshot_link_target("m.gguf", &sha),
            PathBuf::from(format!("../../blobs/{sha}"))
        );
        assert_eq!(
            snapshot_link_target("Q8_0/m.gguf", &sha),
            PathBuf::from(format!("../../../blobs/{sha}"))
        );
    }

    #[test]
    fn the_default_choice_is_q4_k_m_then_q4_0_then_the_first() {
        let all = [
            file("README.md"),
            file("m-Q8_0.gguf"),
            file("m-Q4_0.gguf"),
            file("m-Q4_K_M.gguf"),
            file("mmproj-m-Q4_K_M.gguf"),
        ];
        assert_eq!(chosen(&all, None), ["m-Q4_K_M.gguf"]);
        assert_eq!(chosen(&all[..3], None), ["m-Q4_0.gguf"]);
        assert_eq!(
            chosen(&[file("z-F16.gguf"), file("a-Q8_0.gguf")], None),
            ["a-Q8_0.gguf"]
        );
        assert!(
            chosen(&[file("mmproj-F16.gguf"), file("README.md")], None)[0]
                .starts_with("error: the repository has no GGUF")
        );
    }

    #[test]
    fn a_named_quant_matches_a_whole_tag_then_any_part_then_a_file_name() {
        let all = [
            file("m-Q4_K_M.gguf"),
            file("m-Q4_K_S.gguf"),
            file("m-Q4_K.gguf"),
            file("m.Q8_0.gguf"),
        ];
        assert_eq!(chosen(&all, Some("q4_k")), ["m-Q4_K.gguf"]);
        assert_eq!(chosen(&all, Some("Q4_K_S")), ["m-Q4_K_S.gguf"]);
        assert_eq!(chosen(&all, Some("q8_0")), ["m.Q8_0.gguf"]);
        assert_eq!(chosen(&all[..2], Some("Q4_K")), ["m-Q4_K_M.gguf"]);
        assert_eq!(chosen(&all, Some("m-Q4_K_S.gguf")), ["m-Q4_K_S.gguf"]);
    }

    #[test]
    fn a_missing_quant_names_the_ones_there() {
        let all = [
            file("Llama-3.2-1B-Q4_K_M.gguf"),
            file("Llama-3.2-1B-q8_0.gguf"),
            file("Llama-3.2-1B-UD-IQ2_XXS.gguf"),
            file("Llama-3.2-1B.f16.gguf"),
            file("BF16/Llama-3.2-1B-BF16-00001-of-00002.gguf"),
            file("BF16/Llama-3.2-1B-BF16-00002-of-00002.gguf"),
        ];
        let err = chosen(&all, Some("Q5_K_M")).join("");
        assert!(err.contains("\"Q5_K_M\""), "{err}");
        assert!(
            err.ends_with("available: BF16, Q4_K_M, IQ2_XXS, q8_0, f16"),
            "{err}"
        );
    }

    #[test]
    fn a_split_model_is_every_part_in_order() {
        let all = [
            file("Q8_0/m-Q8_0-00002-of-00003.gguf"),
            file("Q8_0/m-Q8_0-00001-of-00003.gguf"),
            file("Q8_0/m-Q8_0-00003-of-00003.gguf"),
            file("m-Q4_0.gguf"),
        ];
        assert_eq!(
            chosen(&all, Some("Q8_0")),
            [
                "Q8_0/m-Q8_0-00001-of-00003.gguf",
                "Q8_0/m-Q8_0-00002-of-00003.gguf",
                "Q8_0/m-Q8_0-00003-of-00003.gguf"
            ]
        );
        let err = chosen(&all[..2], Some("Q8_0")).join("");
        assert!(err.contains("3-part model"), "{err}");
        assert_eq!(
            split_part("a/m-00002-of-00010.GGUF"),
            Some(SplitPart {
                stem: "a/m",
                index: 2,
                count: 10
            })
        );
        assert_eq!(split_part("m-00011-of-00010.gguf"), None);
        assert_eq!(split_part("m-0001-of-00010.gguf"), None);
        assert_eq!(split_part("m.gguf"), None);
    }

    #[test]
    fn paths_and_hashes_from_the_hub_are_checked() {
        assert!(check_repo_path("m.gguf").is_ok());
        assert!(check_repo_path("Q8_0/m.gguf").is_ok());
        for bad in ["../m.gguf", "/m.gguf", "a//m.gguf", "a/./m.gguf", "a\\m"] {
            assert!(check_repo_path(bad).is_err(), "{bad} was accepted");
        }
        let sha = "AB".repeat(32);
        assert_eq!(sha256_hex(&format!("\"{sha}\"")), Some("ab".repeat(32)));
        assert_eq!(sha256_hex(&format!("W/\"{sha}\"")), Some("ab".repeat(32)));
        assert_eq!(sha256_hex(&"a".repeat(40)), None);
        assert_eq!(sha256_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn a_partial_is_resumed_only_when_shorter_than_the_file() {
        assert_eq!(resume_decision(0, 100), Resume::Fresh);
        assert_eq!(resume_decision(40, 100), Resume::From(40));
        assert_eq!(resume_decision(100, 100), Resume::Complete);
        assert_eq!(resume_decision(101, 100), Resume::Fresh);
        // An empty file needs no request, only its hash checked.
        assert_eq!(resume_decision(0, 0), Resume::Complete);
    }

    #[test]
    fn answers_to_a_range_request() {
        assert_eq!(range_answer(0, 200, None), RangeAnswer::Append);
        assert_eq!(range_answer(40, 200, None), RangeAnswer::StartOver);
        assert_eq!(
            range_answer(40, 206, Some("bytes 40-99/100")),
            RangeAnswer::Append
        );
        assert!(matches!(
            range_answer(40, 206, Some("bytes 0-99/100")),
            RangeAnswer::Retry(_)
        ));
        assert!(matches!(range_answer(40, 206, None), RangeAnswer::Retry(_)));
        assert_eq!(range_answer(40, 416, None), RangeAnswer::Refused);
        assert!(matches!(range_answer(0, 503, None), RangeAnswer::Retry(_)));
        assert!(matches!(range_answer(0, 429, None), RangeAnswer::Retry(_)));
        assert!(matches!(range_answer(0, 404, None), RangeAnswer::Fail(_)));
        assert!(matches!(range_answer(0, 302, None), RangeAnswer::Fail(_)));
    }

    #[test]
    fn plain_progress_is_a_line_a_tenth() {
        let mib = 1024 * 1024;
        assert_eq!(
            progress_line("o/r f.gguf", 12 * mib + mib / 3, 27 * mib),
            "pulling o/r f.gguf: 45% (12.3 of 27.0 MiB)"
        );
        assert_eq!(progress_line("x", 0, 0), "pulling x: 100% (0.0 of 0.0 MiB)");
        assert_eq!(tenth(0, 100), 0);
        assert_eq!(tenth(19, 100), 1);
        assert_eq!(tenth(100, 100), 10);
        assert_eq!(tenth(150, 100), 10);
        assert_eq!(tenth(0, 0), 10);
    }

    #[test]
    fn the_next_page_comes_from_the_link_header() {
        let url = "https://huggingface.co/api/models/o/r/tree/main?recursive=true&cursor=abc";
        assert_eq!(
            next_page_link(&format!("<{url}>; rel=\"next\"")).as_deref(),
            Some(url)
        );
        assert_eq!(
            next_page_link("<https://x/prev>; rel=\"prev\", </next>; rel=next").as_deref(),
            Some("/next")
        );
        assert_eq!(next_page_link("<https://x/prev>; rel=\"prev\""), None);
        assert_eq!(next_page_link("garbage"), None);
    }

    #[test]
    fn url_paths_are_percent_encoded() {
        assert_eq!(encode_path("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode_path("Q8_0/m a+b.gguf", true), "Q8_0/m%20a%2Bb.gguf");
    }

    #[test]
    fn the_token_is_never_in_debug_output() {
        let settings = HubSettings {
            endpoint: DEFAULT_ENDPOINT.into(),
            cache_root: PathBuf::from("/c"),
            token: Some("hf_secret".into()),
        };
        let text = format!("{settings:?}");
        assert!(!text.contains("hf_secret"), "{text}");
    }
}
