//! Finding GGUF files where other tools keep them, and the names they are
//! served under.
//!
//! Where each tool keeps its files, and what it calls them:
//!
//! * the Hugging Face hub cache: `models--{owner}--{repo}/snapshots/{commit}/`
//!   holds the files (usually symlinks into `../../blobs/`), `refs/main`
//!   names the commit. Served as `{owner}/{repo}:{QUANT}`, what
//!   `llama-server -hf` takes.
//! * LM Studio: `{root}/{publisher}/{repo}/{file}.gguf`, served as
//!   `{publisher}/{repo}:{QUANT}`.
//! * Ollama: `manifests/{registry}/{namespace}/{model}/{tag}` is JSON whose
//!   model layer's digest names a GGUF blob, `blobs/sha256-{hex}`. Served as
//!   Ollama names it: `{model}:{tag}` (`library` models on
//!   `registry.ollama.ai`), else `{namespace}/{model}:{tag}`; `:latest` may
//!   be left off.
//! * llama.cpp's download cache and `[models] dirs`: any `*.gguf` below,
//!   served by file stem.
//!
//! What llama-server cannot serve on its own is left out: multimodal
//! projectors (`mmproj`), adapters, and the second and later parts of a
//! split model (the first part stands for the whole). Every header read is
//! the header only; a file that cannot be read is listed with its error.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{Config, ModelsConfig};
use crate::gguf::{self, GgufError, ModelFacts};

/// Where a model was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `[llama] model` or a `[[models.model]]` entry.
    Config,
    /// One of `[models] dirs`.
    Dir,
    HuggingFace,
    LmStudio,
    Ollama,
    LlamaCache,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Dir => "dir",
            Source::HuggingFace => "huggingface",
            Source::LmStudio => "lmstudio",
            Source::Ollama => "ollama",
            Source::LlamaCache => "llamacache",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One servable model file.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// The name requests use.
    pub name: String,
    /// Other names that reach it (file stems, longer forms).
    pub aliases: Vec<String>,
    /// The file llama-server is given (a split model's first part).
    pub path: PathBuf,
    pub source: Source,
    /// Its header, or why it could not be read. A split model's size and
    /// parameter count are those of all its parts.
    pub facts: Result<ModelFacts, String>,
}

/// A [`Found`] as `contextpilotd models --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub name: String,
    pub aliases: Vec<String>,
    pub path: PathBuf,
    pub source: Source,
    pub architecture: Option<String>,
    /// "135M", "8B": `general.size_label`, else the counted parameters.
    pub parameters: Option<String>,
    pub parameter_count: Option<u64>,
    pub quantization: Option<&'static str>,
    /// The context length the model was trained for.
    pub context_length: Option<u64>,
    pub size_bytes: Option<u64>,
    pub error: Option<String>,
}

impl Found {
    pub fn summary(&self) -> Summary {
        let facts = self.facts.as_ref().ok();
        Summary {
            name: self.name.clone(),
            aliases: self.aliases.clone(),
            path: self.path.clone(),
            source: self.source,
            architecture: facts.map(|f| f.architecture.clone()),
            parameters: facts.and_then(ModelFacts::parameter_label),
            parameter_count: facts.and_then(|f| f.parameter_count),
            quantization: facts.and_then(ModelFacts::quantization),
            context_length: facts.and_then(|f| f.context_length),
            size_bytes: facts.map(|f| f.size_bytes),
            error: self.facts.as_ref().err().cloned(),
        }
    }

    /// The name and then the aliases.
    fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}

/// Where to look. Built from the environment by [`Places::from_env`], or by
/// hand in tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Places {
    /// The Hugging Face hub cache (the folder holding `models--*`).
    pub hf_hub: Option<PathBuf>,
    /// LM Studio's models folders.
    pub lm_studio: Vec<PathBuf>,
    /// Ollama's models folder (holding `manifests/` and `blobs/`).
    pub ollama: Option<PathBuf>,
    /// llama.cpp's download cache.
    pub llama_cache: Option<PathBuf>,
    /// `[models] dirs`.
    pub dirs: Vec<PathBuf>,
}

/// How deep below a `[models] dirs` entry or the llama.cpp cache `*.gguf`
/// files are looked for.
const MAX_DEPTH: usize = 4;
/// Directory entries one place's walk looks at, at most: a home directory
/// given as a models dir must not take minutes.
const MAX_ENTRIES: usize = 20_000;
/// An Ollama manifest is a few hundred bytes; anything far larger is not one.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
const OLLAMA_MODEL_LAYER: &str = "application/vnd.ollama.image.model";
const OLLAMA_DEFAULT_REGISTRY: &str = "registry.ollama.ai";

impl Places {
    /// The usual places on this machine, from the environment (read here
    /// once) and the home directory; only `dirs` when `[models] discover`
    /// is off.
    pub fn from_env(models: &ModelsConfig) -> Places {
        let home = directories::BaseDirs::new().map(|b| b.home_dir().to_path_buf());
        let var = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty());
        let mut places = Places::for_home(models, home.as_deref(), var, cfg!(target_os = "macos"));
        // LM Studio 0.3 keeps the path of its home folder (which may have
        // been moved) in this file.
        let pointer = home
            .as_ref()
            .and_then(|h| fs::read_to_string(h.join(".lmstudio-home-pointer")).ok());
        if let Some(lm_home) = pointer.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
            let pointed = Path::new(lm_home).join("models");
            if models.discover && !places.lm_studio.contains(&pointed) {
                places.lm_studio.insert(0, pointed);
            }
        }
        // Ollama's Linux installer runs it as its own user, whose home is
        // /usr/share/ollama.
        if models.discover
            && !cfg!(target_os = "macos")
            && var("OLLAMA_MODELS").is_none()
            && !places.ollama.as_deref().is_some_and(Path::is_dir)
        {
            let system = PathBuf::from("/usr/share/ollama/.ollama/models");
            if system.is_dir() {
                places.ollama = Some(system);
            }
        }
        places
    }

    /// The places for a home directory and environment (`var` answers
    /// set, non-empty variables), without touching the file system.
    fn for_home(
        models: &ModelsConfig,
        home: Option<&Path>,
        var: impl Fn(&str) -> Option<OsString>,
        macos: bool,
    ) -> Places {
        let mut places = Places {
            dirs: models.dirs.clone(),
            ..Places::default()
        };
        if !models.discover {
            return places;
        }
        let path = |key: &str| var(key).map(PathBuf::from);
        let in_home = |rest: &str| home.map(|h| h.join(rest));
        // huggingface_hub's rule: HF_HUB_CACHE, else $HF_HOME/hub, else
        // $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub.
        places.hf_hub = path("HF_HUB_CACHE")
            .or_else(|| path("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| path("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
            .or_else(|| in_home(".cache/huggingface/hub"));
        places.lm_studio = [".lmstudio/models", ".cache/lm-studio/models"]
            .into_iter()
            .filter_map(in_home)
            .collect();
        places.ollama = path("OLLAMA_MODELS").or_else(|| in_home(".ollama/models"));
        // llama.cpp's fs_get_cache_directory.
        places.llama_cache = path("LLAMA_CACHE").or_else(|| {
            if macos {
                in_home("Library/Caches/llama.cpp")
            } else {
                path("XDG_CACHE_HOME")
                    .map(|c| c.join("llama.cpp"))
                    .or_else(|| in_home(".cache/llama.cpp"))
            }
        });
        places
    }

    /// Every place, in the order [`discover`] searches them.
    pub fn searched(&self) -> Vec<(Source, &Path)> {
        let dirs = self.dirs.iter().map(|d| (Source::Dir, d.as_path()));
        let hf = self
            .hf_hub
            .iter()
            .map(|d| (Source::HuggingFace, d.as_path()));
        let lm = self
            .lm_studio
            .iter()
            .map(|d| (Source::LmStudio, d.as_path()));
        let ollama = self.ollama.iter().map(|d| (Source::Ollama, d.as_path()));
        let cache = self
            .llama_cache
            .iter()
            .map(|d| (Source::LlamaCache, d.as_path()));
        dirs.chain(hf)
            .chain(lm)
            .chain(ollama)
            .chain(cache)
            .collect()
    }
}

/// The GGUF models in `places`, in the order dirs, Hugging Face, LM Studio,
/// Ollama, llama.cpp cache; a file reached twice (a symlink, a folder
/// listed twice, two Ollama tags) is listed once, where it was first found,
/// and answers to the later names too.
pub fn discover(places: &Places) -> Vec<Found> {
    let mut found = Vec::new();
    for (source, place) in places.searched() {
        match source {
            Source::HuggingFace => hf_hub(place, source, &mut found),
            Source::LmStudio => lm_studio(place, &mut found),
            Source::Ollama => ollama(place, &mut found),
            _ => loose_files(place, source, &mut found),
        }
    }
    one_per_file(found, false)
}

/// What the daemon can serve by name: `[llama] model`, each
/// `[[models.model]]`, then what [`discover`] finds. A file already listed
/// is not listed again (its other names become aliases); a name an earlier
/// entry took (in any case) is taken from the later one, which keeps its
/// other names, or goes when it has none.
pub fn servable(config: &Config) -> Vec<Found> {
    let mut entries = Vec::new();
    if let Some(path) = &config.llama.model {
        let stem = file_stem(path);
        // The id the primary model is served under: `[llama] model_alias`, else the file stem.
        let name = config
            .llama
            .model_alias
            .clone()
            .unwrap_or_else(|| stem.clone().unwrap_or_else(|| "model".to_string()));
        let aliases = stem.into_iter().filter(|s| *s != name).collect();
        entries.push(configured(name, aliases, path));
    }
    for entry in &config.models.model {
        entries.push(configured(entry.name.clone(), Vec::new(), &entry.path));
    }
    entries.extend(discover(&Places::from_env(&config.models)));
    one_per_file(entries, true)
}

/// The model `name` asks for: a name first, then an alias; case-insensitive.
pub fn find<'a>(models: &'a [Found], name: &str) -> Option<&'a Found> {
    models
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
        .or_else(|| {
            models
                .iter()
                .find(|m| m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name)))
        })
}

fn configured(name: String, aliases: Vec<String>, path: &Path) -> Found {
    Found {
        name,
        aliases,
        path: path.to_path_buf(),
        source: Source::Config,
        facts: gguf::read_model_facts(path).map_err(|e| e.to_string()),
    }
}

/// One entry per file: a file found again lends its names to the entry
/// found first, as aliases (Ollama tags often share a blob: `qwen3:0.6b`
/// and `qwen3:latest`). With `unique_names`, a name (in any case) belongs
/// to the first entry that has it, and an entry left with no name goes.
fn one_per_file(entries: Vec<Found>, unique_names: bool) -> Vec<Found> {
    let mut index: HashMap<PathBuf, usize> = HashMap::new();
    let mut taken: HashSet<String> = HashSet::new();
    let mut out: Vec<Found> = Vec::new();
    for mut entry in entries {
        let file = canonical(&entry.path);
        let earlier = index.get(&file).copied();
        let mut names: Vec<String> = Vec::new();
        for name in entry.names() {
            let key = name.to_lowercase();
            let had = |f: &Found| f.names().any(|n| n.to_lowercase() == key);
            if earlier.is_some_and(|i| had(&out[i]))
                || names.iter().any(|n| n.to_lowercase() == key)
                || (unique_names && taken.contains(&key))
            {
                continue;
            }
            names.push(name.to_string());
        }
        if unique_names {
            taken.extend(names.iter().map(|n| n.to_lowercase()));
        }
        match earlier {
            Some(i) => out[i].aliases.extend(names),
            None if names.is_empty() => {}
            None => {
                entry.name = names.remove(0);
                entry.aliases = names;
                index.insert(file, out.len());
                out.push(entry);
            }
        }
    }
    out
}

fn canonical(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn file_stem(path: &Path) -> Option<String> {
    path.file_stem().map(|s| s.to_string_lossy().into_owned())
}

/// The names a file in a repository goes by: `{repo}:{QUANT}` when the
/// header names its quantisation, `{repo}/{stem}`, and the stem.
fn repo_names(repo: &str, stem: &str, facts: &Result<ModelFacts, String>) -> (String, Vec<String>) {
    let long = format!("{repo}/{stem}");
    match facts.as_ref().ok().and_then(ModelFacts::quantization) {
        Some(quant) => (format!("{repo}:{quant}"), vec![long, stem.to_string()]),
        None => (long, vec![stem.to_string()]),
    }
}

/// A model file's facts for listing, or `None` for a file llama-server
/// cannot serve on its own (found out only from its header).
fn read_listed(path: &Path) -> Option<Result<ModelFacts, String>> {
    match gguf::read_model_facts(path) {
        Err(GgufError::NotAModel { .. }) => None,
        Err(e) => Some(Err(e.to_string())),
        Ok(mut facts) => {
            if let Some(split) = Split::of(path) {
                split.total(&mut facts);
            }
            Some(Ok(facts))
        }
    }
}

/// A name that says "not on its own": projectors and later parts of a
/// split model.
fn skipped_by_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.to_ascii_lowercase().starts_with("mmproj")
        || Split::of(path).is_some_and(|s| s.number != 1)
}

fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// `{prefix}-{number:05}-of-{count:05}.gguf`, llama.cpp's split naming.
#[derive(Debug, PartialEq)]
struct Split {
    dir: PathBuf,
    prefix: String,
    number: u32,
    count: u32,
}

impl Split {
    fn of(path: &Path) -> Option<Split> {
        let stem = path.file_stem()?.to_str()?;
        let (rest, count) = stem.rsplit_once("-of-")?;
        let (prefix, number) = rest.rsplit_once('-')?;
        let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(count) || !digits(number) || !is_gguf(path) {
            return None;
        }
        Some(Split {
            dir: path.parent()?.to_path_buf(),
            prefix: prefix.to_string(),
            number: number.parse().ok()?,
            count: count.parse().ok()?,
        })
    }

    fn part(&self, number: u32) -> PathBuf {
        self.dir.join(format!(
            "{}-{number:05}-of-{:05}.gguf",
            self.prefix, self.count
        ))
    }

    /// Makes the first part's facts those of the whole: sizes and
    /// parameters summed over the parts (the count unknown when a part is
    /// missing or unreadable).
    fn total(&self, facts: &mut ModelFacts) {
        for number in 2..=self.count {
            let part = self.part(number);
            let size = fs::metadata(&part).map(|m| m.len()).ok();
            let params = gguf::read_parameter_count(&part).ok().flatten();
            facts.size_bytes = facts.size_bytes.saturating_add(size.unwrap_or(0));
            facts.parameter_count = match (facts.parameter_count, params) {
                (Some(sum), Some(p)) => sum.checked_add(p),
                _ => None,
            };
        }
    }
}

/// The stem a loose file is served by: a split model's without its
/// `-00001-of-0000N`.
fn loose_stem(path: &Path) -> Option<String> {
    match Split::of(path) {
        Some(split) => Some(split.prefix),
        None => file_stem(path),
    }
}

/// `*.gguf` files below `root` (sorted, to `depth` levels of folders):
/// directory symlinks are followed, but never twice to the same folder,
/// and unreadable entries are passed over. A hub cache found on the way
/// (`models--*` folders) is handed to `hub` instead.
fn walk(
    root: &Path,
    depth: usize,
    budget: &mut usize,
    visited: &mut HashSet<PathBuf>,
    out: &mut Vec<PathBuf>,
    hub: &mut dyn FnMut(&Path),
) {
    if !visited.insert(canonical(root)) {
        return;
    }
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let mut hub_seen = false;
    for path in paths {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        // `metadata` follows symlinks: a file symlink (an HF snapshot's)
        // is a file, a broken one is passed over.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if meta.is_dir() {
            if name.starts_with("models--") {
                if !hub_seen {
                    hub_seen = true;
                    hub(root);
                }
            } else if depth > 0 && !name.starts_with('.') {
                walk(&path, depth - 1, budget, visited, out, hub);
            }
        } else if meta.is_file() && is_gguf(&path) && !skipped_by_name(&path) {
            out.push(path);
        }
    }
}

/// `*.gguf` below a `[models] dirs` entry or the llama.cpp cache, named by
/// stem; a hub cache inside is read as one.
fn loose_files(root: &Path, source: Source, found: &mut Vec<Found>) {
    let mut files = Vec::new();
    let mut hubs = Vec::new();
    let mut budget = MAX_ENTRIES;
    walk(
        root,
        MAX_DEPTH,
        &mut budget,
        &mut HashSet::new(),
        &mut files,
        &mut |hub| hubs.push(hub.to_path_buf()),
    );
    for hub in hubs {
        hf_hub(&hub, source, found);
    }
    for path in files {
        let Some(facts) = read_listed(&path) else {
            continue;
        };
        let Some(name) = loose_stem(&path) else {
            continue;
        };
        let aliases = file_stem(&path)
            .into_iter()
            .filter(|s| *s != name)
            .collect();
        found.push(Found {
            name,
            aliases,
            path,
            source,
            facts,
        });
    }
}

/// Sorted subfolders of `dir` (symlinks to folders too), hidden ones left out.
fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let path = e.path();
            (!name.starts_with('.') && path.is_dir()).then_some((name, path))
        })
        .collect();
    dirs.sort();
    dirs
}

/// The Hugging Face hub cache: per `models--{owner}--{repo}`, the snapshot
/// `refs/main` names, else the newest.
fn hf_hub(root: &Path, source: Source, found: &mut Vec<Found>) {
    for (dir_name, repo_dir) in subdirs(root) {
        let Some(repo) = dir_name.strip_prefix("models--") else {
            continue;
        };
        // The hub forbids "--" in names, so it only separates owner and repo.
        let repo = repo.replacen("--", "/", 1);
        let Some(snapshot) = hf_snapshot(&repo_dir) else {
            continue;
        };
        let mut files = Vec::new();
        let mut budget = MAX_ENTRIES;
        walk(
            &snapshot,
            2,
            &mut budget,
            &mut HashSet::new(),
            &mut files,
            &mut |_| {},
        );
        for path in files {
            let Some(facts) = read_listed(&path) else {
                continue;
            };
            let Some(stem) = loose_stem(&path) else {
                continue;
            };
            let (name, aliases) = repo_names(&repo, &stem, &facts);
            found.push(Found {
                name,
                aliases,
                path,
                source,
                facts,
            });
        }
    }
}

fn hf_snapshot(repo_dir: &Path) -> Option<PathBuf> {
    let snapshots = repo_dir.join("snapshots");
    if let Ok(commit) = fs::read_to_string(repo_dir.join("refs/main")) {
        let commit = commit.trim();
        let named = snapshots.join(commit);
        if !commit.is_empty() && !commit.contains(['/', '\\']) && commit != ".." && named.is_dir() {
            return Some(named);
        }
    }
    subdirs(&snapshots)
        .into_iter()
        .max_by_key(|(_, path)| fs::metadata(path).and_then(|m| m.modified()).ok())
        .map(|(_, path)| path)
}

/// LM Studio: `{root}/{publisher}/{repo}/` holds a repository's files.
fn lm_studio(root: &Path, found: &mut Vec<Found>) {
    for (publisher, publisher_dir) in subdirs(root) {
        for (repo, repo_dir) in subdirs(&publisher_dir) {
            let repo = format!("{publisher}/{repo}");
            let mut files = Vec::new();
            let mut budget = MAX_ENTRIES;
            walk(
                &repo_dir,
                1,
                &mut budget,
                &mut HashSet::new(),
                &mut files,
                &mut |_| {},
            );
            for path in files {
                let Some(facts) = read_listed(&path) else {
                    continue;
                };
                let Some(stem) = loose_stem(&path) else {
                    continue;
                };
                let (name, aliases) = repo_names(&repo, &stem, &facts);
                found.push(Found {
                    name,
                    aliases,
                    path,
                    source: Source::LmStudio,
                    facts,
                });
            }
        }
    }
}

/// Ollama: each `manifests/{registry}/{namespace}/{model}/{tag}` names its
/// model blob.
fn ollama(root: &Path, found: &mut Vec<Found>) {
    for (registry, registry_dir) in subdirs(&root.join("manifests")) {
        for (namespace, namespace_dir) in subdirs(&registry_dir) {
            for (model, model_dir) in subdirs(&namespace_dir) {
                let Ok(tags) = fs::read_dir(&model_dir) else {
                    continue;
                };
                let mut tags: Vec<PathBuf> =
                    tags.filter_map(|e| e.ok().map(|e| e.path())).collect();
                tags.sort();
                for manifest in tags.into_iter().filter(|p| p.is_file()) {
                    let Some(tag) = manifest.file_name().and_then(|t| t.to_str()) else {
                        continue;
                    };
                    let short = if registry == OLLAMA_DEFAULT_REGISTRY && namespace == "library" {
                        model.clone()
                    } else {
                        format!("{namespace}/{model}")
                    };
                    let name = format!("{short}:{tag}");
                    let aliases = if tag == "latest" {
                        vec![short]
                    } else {
                        Vec::new()
                    };
                    let entry = match ollama_blob(root, &manifest) {
                        Ok(blob) => match read_listed(&blob) {
                            Some(facts) => (blob, facts),
                            None => continue,
                        },
                        Err(error) => (manifest.clone(), Err(error)),
                    };
                    found.push(Found {
                        name,
                        aliases,
                        path: entry.0,
                        source: Source::Ollama,
                        facts: entry.1,
                    });
                }
            }
        }
    }
}

/// The model blob an Ollama manifest names, or what is wrong with it.
fn ollama_blob(root: &Path, manifest: &Path) -> Result<PathBuf, String> {
    let bad = |what: &str| format!("Ollama manifest {}: {what}", manifest.display());
    let size = fs::metadata(manifest)
        .map_err(|e| bad(&e.to_string()))?
        .len();
    if size > MAX_MANIFEST_BYTES {
        return Err(bad(&format!("{size} bytes is too large for a manifest")));
    }
    let text = fs::read_to_string(manifest).map_err(|e| bad(&e.to_string()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(&format!("not JSON: {e}")))?;
    let layer = doc
        .get("layers")
        .and_then(|l| l.as_array())
        .and_then(|layers| {
            layers
                .iter()
                .find(|l| l.get("mediaType").and_then(|m| m.as_str()) == Some(OLLAMA_MODEL_LAYER))
        })
        .ok_or_else(|| bad("no model layer"))?;
    let digest = layer
        .get("digest")
        .and_then(|d| d.as_str())
        .unwrap_or_default();
    // Checked to be hex, so the blob's name cannot leave `blobs/`.
    match digest.strip_prefix("sha256:") {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(root.join("blobs").join(format!("sha256-{hex}")))
        }
        _ => Err(bad(&format!(
            "the model layer's digest {digest:?} is not sha256:<hex>"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::writer::{header_with_tensors, WriteValue::*};

    /// A small real GGUF header: `file_type` 15 is Q4_K_M, 2 is Q4_0.
    fn model(arch: &str, file_type: u32, context: u32) -> Vec<u8> {
        let block_count = format!("{arch}.block_count");
        let context_length = format!("{arch}.context_length");
        header_with_tensors(
            &[
                ("general.architecture", Str(arch)),
                ("general.file_type", U32(file_type)),
                (&block_count, U32(2)),
                (&context_length, U32(context)),
            ],
            &[
                ("token_embd.weight", &[64, 1000], 12),
                ("blk.0.attn_norm.weight", &[64], 0),
            ],
        )
    }

    const PARAMS: u64 = 64 * 1000 + 64;

    fn put(path: &Path, bytes: &[u8]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }

    fn projector() -> Vec<u8> {
        crate::gguf::writer::header(&[
            ("general.type", Str("mmproj")),
            ("general.architecture", Str("clip")),
        ])
    }

    /// The hub cache as `huggingface_hub` leaves it: blobs, two snapshots
    /// with `refs/main` naming the older, and a projector.
    fn hf_tree(hub: &Path) {
        let repo = hub.join("models--bartowski--SmolLM2-135M-Instruct-GGUF");
        put(&repo.join("blobs/aaaa"), &model("llama", 15, 8192));
        put(&repo.join("blobs/bbbb"), &projector());
        put(&repo.join("blobs/cccc"), &model("llama", 2, 8192));
        put(&repo.join("refs/main"), b"0123abcd");
        let snapshot = repo.join("snapshots/0123abcd");
        fs::create_dir_all(&snapshot).unwrap();
        std::os::unix::fs::symlink(
            "../../blobs/aaaa",
            snapshot.join("SmolLM2-135M-Instruct-Q4_K_M.gguf"),
        )
        .unwrap();
        // A projector named like a model: found out from its header.
        std::os::unix::fs::symlink("../../blobs/bbbb", snapshot.join("vision-f16.gguf")).unwrap();
        let newer = repo.join("snapshots/ffff0000");
        fs::create_dir_all(&newer).unwrap();
        std::os::unix::fs::symlink(
            "../../blobs/cccc",
            newer.join("SmolLM2-135M-Instruct-Q4_0.gguf"),
        )
        .unwrap();
        // No ref: the only snapshot; no quantisation in the header.
        let plain = hub.join("models--someone--plain");
        put(
            &plain.join("snapshots/1111/plain.gguf"),
            &crate::gguf::writer::header(&[
                ("general.architecture", Str("qwen2")),
                ("qwen2.block_count", U32(2)),
            ]),
        );
    }

    fn lm_studio_tree(root: &Path) {
        put(
            &root.join("lmstudio-community/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q4_K_M.gguf"),
            &model("gemma3", 15, 32768),
        );
        put(
            &root.join("lmstudio-community/gemma-3-270m-it-GGUF/mmproj-gemma-3-270m-it-F16.gguf"),
            b"not even read",
        );
        put(
            &root.join("lmstudio-community/broken/broken.gguf"),
            b"GGUF\x03\0\0\0",
        );
    }

    fn ollama_tree(root: &Path) {
        let digest = "a".repeat(64);
        put(
            &root.join(format!("blobs/sha256-{digest}")),
            &model("qwen3", 15, 40960),
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": format!("sha256:{}", "b".repeat(64)), "size": 10},
            "layers": [
                {"mediaType": "application/vnd.ollama.image.template", "digest": format!("sha256:{}", "c".repeat(64)), "size": 10},
                {"mediaType": OLLAMA_MODEL_LAYER, "digest": format!("sha256:{digest}"), "size": 10},
            ],
        });
        put(
            &root.join("manifests/registry.ollama.ai/library/qwen3/latest"),
            manifest.to_string().as_bytes(),
        );
        put(
            &root.join("manifests/hf.co/unsloth/Qwen3-0.6B-GGUF/Q4_K_M"),
            manifest.to_string().as_bytes(),
        );
        put(
            &root.join("manifests/registry.ollama.ai/library/bad/latest"),
            b"{not json",
        );
        let escape = serde_json::json!({"layers": [{"mediaType": OLLAMA_MODEL_LAYER, "digest": "sha256:../../etc"}]});
        put(
            &root.join("manifests/registry.ollama.ai/library/escape/latest"),
            escape.to_string().as_bytes(),
        );
    }

    fn names(found: &[Found]) -> Vec<(&str, Source)> {
        found.iter().map(|f| (f.name.as_str(), f.source)).collect()
    }

    fn facts(found: &Found) -> &ModelFacts {
        found
            .facts
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", found.name))
    }

    #[test]
    fn the_hub_cache_is_named_as_llama_server_hf_takes_it() {
        let dir = tempfile::tempdir().unwrap();
        hf_tree(dir.path());
        let found = discover(&Places {
            hf_hub: Some(dir.path().to_path_buf()),
            ..Places::default()
        });
        assert_eq!(
            names(&found),
            [
                (
                    "bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M",
                    Source::HuggingFace
                ),
                ("someone/plain/plain", Source::HuggingFace),
            ]
        );
        let smol = &found[0];
        assert_eq!(
            smol.aliases,
            [
                "bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M",
                "SmolLM2-135M-Instruct-Q4_K_M"
            ]
        );
        assert!(smol
            .path
            .ends_with("snapshots/0123abcd/SmolLM2-135M-Instruct-Q4_K_M.gguf"));
        let summary = smol.summary();
        assert_eq!(summary.architecture.as_deref(), Some("llama"));
        assert_eq!(summary.quantization, Some("Q4_K_M"));
        assert_eq!(summary.context_length, Some(8192));
        assert_eq!(summary.parameter_count, Some(PARAMS));
        assert_eq!(summary.parameters.as_deref(), Some("64K"));
        assert_eq!(found[1].aliases, ["plain"]);
    }

    #[test]
    fn without_refs_main_the_newest_snapshot_is_used() {
        let dir = tempfile::tempdir().unwrap();
        hf_tree(dir.path());
        fs::remove_file(
            dir.path()
                .join("models--bartowski--SmolLM2-135M-Instruct-GGUF/refs/main"),
        )
        .unwrap();
        let newer = dir
            .path()
            .join("models--bartowski--SmolLM2-135M-Instruct-GGUF/snapshots/ffff0000");
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        fs::File::open(&newer).unwrap().set_modified(later).unwrap();
        let found = discover(&Places {
            hf_hub: Some(dir.path().to_path_buf()),
            ..Places::default()
        });
        assert_eq!(found[0].name, "bartowski/SmolLM2-135M-Instruct-GGUF:Q4_0");
    }

    #[test]
    fn lm_studio_publisher_and_repo_name_the_model() {
        let dir = tempfile::tempdir().unwrap();
        lm_studio_tree(dir.path());
        let found = discover(&Places {
            lm_studio: vec![dir.path().to_path_buf(), dir.path().join("missing")],
            ..Places::default()
        });
        assert_eq!(
            names(&found),
            [
                ("lmstudio-community/broken/broken", Source::LmStudio),
                (
                    "lmstudio-community/gemma-3-270m-it-GGUF:Q4_K_M",
                    Source::LmStudio
                ),
            ]
        );
        assert!(
            found[0].facts.as_ref().unwrap_err().contains("truncated"),
            "{:?}",
            found[0].facts
        );
        assert_eq!(found[0].summary().error, found[0].facts.clone().err());
        assert_eq!(facts(&found[1]).architecture, "gemma3");
        assert_eq!(found[1].aliases[1], "gemma-3-270m-it-Q4_K_M");
    }

    #[test]
    fn ollama_manifests_name_their_blobs() {
        let dir = tempfile::tempdir().unwrap();
        ollama_tree(dir.path());
        let found = discover(&Places {
            ollama: Some(dir.path().to_path_buf()),
            ..Places::default()
        });
        // The hf.co manifest names the same blob as qwen3: listed once,
        // under both names.
        assert_eq!(
            names(&found),
            [
                ("unsloth/Qwen3-0.6B-GGUF:Q4_K_M", Source::Ollama),
                ("bad:latest", Source::Ollama),
                ("escape:latest", Source::Ollama),
            ]
        );
        assert_eq!(facts(&found[0]).architecture, "qwen3");
        assert_eq!(facts(&found[0]).context_length, Some(40960));
        assert!(found[0]
            .path
            .ends_with(format!("blobs/sha256-{}", "a".repeat(64))));
        assert!(found[1].facts.as_ref().unwrap_err().contains("not JSON"));
        assert!(found[2]
            .facts
            .as_ref()
            .unwrap_err()
            .contains("not sha256:<hex>"));

        assert_eq!(
            found[0].aliases,
            ["qwen3:latest".to_string(), "qwen3".to_string()]
        );
        assert_eq!(
            find(&found, "QWEN3").map(|f| f.source),
            Some(Source::Ollama)
        );

        fs::remove_dir_all(dir.path().join("manifests/hf.co")).unwrap();
        let found = discover(&Places {
            ollama: Some(dir.path().to_path_buf()),
            ..Places::default()
        });
        assert_eq!(found[2].name, "qwen3:latest");
        assert_eq!(found[2].aliases, ["qwen3"]);
        assert_eq!(find(&found, "QWEN3").map(|f| &f.name), Some(&found[2].name));
    }

    #[test]
    fn loose_files_split_models_projectors_and_loops() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        put(&root.join("a/tiny.gguf"), &model("llama", 7, 2048));
        put(&root.join("a/mmproj-tiny-f16.gguf"), &projector());
        put(&root.join("a/notes.txt"), b"not a model");
        put(
            &root.join("big/big-00001-of-00002.gguf"),
            &model("llama", 15, 4096),
        );
        // A later part holds tensors and split keys, no model keys.
        let part2 = header_with_tensors(
            &[("split.no", U32(1))],
            &[("blk.1.ffn.weight", &[64, 100], 12)],
        );
        put(&root.join("big/big-00002-of-00002.gguf"), &part2);
        std::os::unix::fs::symlink(root, root.join("a/loop")).unwrap();
        put(
            &root.join("1/2/3/4/5/too-deep.gguf"),
            &model("llama", 7, 2048),
        );
        let found = discover(&Places {
            dirs: vec![root.to_path_buf(), root.join("a")],
            ..Places::default()
        });
        assert_eq!(names(&found), [("tiny", Source::Dir), ("big", Source::Dir)]);
        let big = &found[1];
        assert_eq!(big.aliases, ["big-00001-of-00002"]);
        let first = fs::metadata(root.join("big/big-00001-of-00002.gguf"))
            .unwrap()
            .len();
        assert_eq!(facts(big).size_bytes, first + part2.len() as u64);
        assert_eq!(facts(big).parameter_count, Some(PARAMS + 6400));
        assert_eq!(facts(&found[0]).quantization(), Some("Q8_0"));
    }

    #[test]
    fn a_hub_cache_inside_a_loose_folder_keeps_its_names() {
        let dir = tempfile::tempdir().unwrap();
        hf_tree(&dir.path().join("hub"));
        let found = discover(&Places {
            llama_cache: Some(dir.path().to_path_buf()),
            ..Places::default()
        });
        assert_eq!(found[0].name, "bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M");
        assert_eq!(found[0].source, Source::LlamaCache);
    }

    #[test]
    fn every_place_in_order_and_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        hf_tree(&root.join("hub"));
        lm_studio_tree(&root.join("lmstudio"));
        ollama_tree(&root.join("ollama"));
        put(&root.join("cache/cached.gguf"), &model("llama", 1, 1024));
        // The same blob through a models dir: found there first.
        let mine = root.join("mine");
        fs::create_dir_all(&mine).unwrap();
        let blob = root.join("hub/models--someone--plain/snapshots/1111/plain.gguf");
        std::os::unix::fs::symlink(&blob, mine.join("my-plain.gguf")).unwrap();
        let places = Places {
            hf_hub: Some(root.join("hub")),
            lm_studio: vec![root.join("lmstudio")],
            ollama: Some(root.join("ollama")),
            llama_cache: Some(root.join("cache")),
            dirs: vec![mine],
        };
        let found = discover(&places);
        let sources: Vec<Source> = found.iter().map(|f| f.source).collect();
        assert_eq!(
            sources,
            [
                Source::Dir,
                Source::HuggingFace,
                Source::LmStudio,
                Source::LmStudio,
                Source::Ollama,
                Source::Ollama,
                Source::Ollama,
                Source::LlamaCache,
            ]
        );
        assert_eq!(found[0].name, "my-plain");
        assert_eq!(
            find(&found, "someone/plain/plain").map(|f| f.name.as_str()),
            Some("my-plain")
        );
        assert_eq!(
            find(&found, "cached").map(|f| f.source),
            Some(Source::LlamaCache)
        );
        assert_eq!(
            find(&found, "smollm2-135m-instruct-q4_k_m").map(|f| f.source),
            Some(Source::HuggingFace)
        );
        assert!(find(&found, "nothing").is_none());
    }

    #[test]
    fn earlier_entries_keep_their_names() {
        let entry = |name: &str, aliases: &[&str], path: &str| Found {
            name: name.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            path: PathBuf::from(path),
            source: Source::Dir,
            facts: Err("unread".into()),
        };
        let listed = one_per_file(
            vec![
                entry("tiny", &[], "/nowhere/a.gguf"),
                entry("TINY", &["tiny-q8"], "/nowhere/b.gguf"),
                entry("Tiny", &["TINY-Q8"], "/nowhere/c.gguf"),
                entry("other", &[], "/nowhere/a.gguf"),
                entry("x", &["x", "X", "y"], "/nowhere/d.gguf"),
                entry("z", &["y"], "/nowhere/d.gguf"),
            ],
            true,
        );
        let names: Vec<(&str, &[String])> = listed
            .iter()
            .map(|f| (f.name.as_str(), f.aliases.as_slice()))
            .collect();
        assert_eq!(
            names,
            [
                ("tiny", &["other".to_string()][..]),
                ("tiny-q8", &[][..]),
                ("x", &["y".to_string(), "z".to_string()][..]),
            ]
        );
    }

    #[test]
    fn places_follow_each_tools_environment() {
        let models = ModelsConfig {
            dirs: vec![PathBuf::from("/models")],
            ..ModelsConfig::default()
        };
        let home = Path::new("/home/u");
        let none = |_: &str| None;
        let linux = Places::for_home(&models, Some(home), none, false);
        assert_eq!(linux.hf_hub, Some(home.join(".cache/huggingface/hub")));
        assert_eq!(
            linux.lm_studio,
            [
                home.join(".lmstudio/models"),
                home.join(".cache/lm-studio/models")
            ]
        );
        assert_eq!(linux.ollama, Some(home.join(".ollama/models")));
        assert_eq!(linux.llama_cache, Some(home.join(".cache/llama.cpp")));
        assert_eq!(linux.dirs, [PathBuf::from("/models")]);
        let macos = Places::for_home(&models, Some(home), none, true);
        assert_eq!(
            macos.llama_cache,
            Some(home.join("Library/Caches/llama.cpp"))
        );

        let vars = |key: &str| match key {
            "HF_HOME" => Some(OsString::from("/hf")),
            "OLLAMA_MODELS" => Some(OsString::from("/ollama")),
            "LLAMA_CACHE" => Some(OsString::from("/llama")),
            _ => None,
        };
        let set = Places::for_home(&models, Some(home), vars, true);
        assert_eq!(set.hf_hub, Some(PathBuf::from("/hf/hub")));
        assert_eq!(set.ollama, Some(PathBuf::from("/ollama")));
        assert_eq!(set.llama_cache, Some(PathBuf::from("/llama")));
        let hub_cache =
            |key: &str| (key == "HF_HUB_CACHE" || key == "HF_HOME").then(|| OsString::from("/x"));
        assert_eq!(
            Places::for_home(&models, Some(home), hub_cache, false).hf_hub,
            Some(PathBuf::from("/x"))
        );

        let off = ModelsConfig {
            discover: false,
            ..models.clone()
        };
        assert_eq!(
            Places::for_home(&off, Some(home), vars, false),
            Places {
                dirs: vec![PathBuf::from("/models")],
                ..Places::default()
            }
        );
    }

    #[test]
    fn servable_lists_the_configured_model_first_under_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let tiny = dir.path().join("tiny.gguf");
        put(&tiny, &model("llama", 7, 2048));
        put(&dir.path().join("other.gguf"), &model("llama", 2, 2048));
        let mut config = Config::default();
        config.llama.model = Some(tiny.clone());
        config.models.discover = false;
        config.models.dirs = vec![dir.path().to_path_buf()];
        config.models.model = vec![crate::config::ModelEntry {
            name: "Other".into(),
            path: dir.path().join("missing.gguf"),
            keep_alive: None,
        }];
        let listed = servable(&config);
        assert_eq!(
            names(&listed),
            [("tiny", Source::Config), ("Other", Source::Config)]
        );
        assert!(listed[1].facts.is_err());
        // "other.gguf" in the dir lost its name to the entry, and had no other.
        config.llama.model_alias = Some("fast".into());
        let listed = servable(&config);
        assert_eq!(
            names(&listed),
            [("fast", Source::Config), ("Other", Source::Config)]
        );
        assert_eq!(listed[0].aliases, ["tiny"]);
        assert_eq!(find(&listed, "TINY").map(|f| f.name.as_str()), Some("fast"));
    }
}
