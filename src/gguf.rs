//! Reads the facts the planner needs from a GGUF model file's header.
//!
//! Only the header is read: the key/value section and the tensor infos after
//! it (names and shapes, for the parameter count); tensor data is never
//! touched, so this costs a few milliseconds even for a 70 GB file. The format
//! is documented in ggml's `docs/gguf.md`: magic `GGUF`, a version, tensor and
//! key/value counts, typed key/value pairs, then per tensor its name, number
//! of dimensions, dimensions, type and data offset, all little-endian.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// What the daemon knows about a model without loading it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelFacts {
    pub path: PathBuf,
    pub size_bytes: u64,
    /// `general.architecture`, e.g. "llama", "gemma3", "qwen2".
    pub architecture: String,
    pub name: Option<String>,
    /// Context length the model was trained for.
    pub context_length: Option<u64>,
    /// Number of transformer blocks (layers).
    pub block_count: u64,
    pub embedding_length: Option<u64>,
    pub head_count: Option<u64>,
    /// Key/value heads per layer; grouped-query attention makes this smaller
    /// than `head_count`.
    pub head_count_kv: Vec<u64>,
    pub key_length: Option<u64>,
    pub value_length: Option<u64>,
    /// Sliding-window attention size; `Some` for Gemma 2/3 and similar.
    pub sliding_window: Option<u64>,
    /// `general.file_type` (llama.cpp's ftype enum).
    pub file_type: Option<u64>,
    /// Weights in this file: the sum over its tensor infos of each shape's
    /// product. `None` when the tensor infos are cut short or absurd (the
    /// key/values still count), or list no tensors. A split model's first
    /// part counts only its own tensors.
    pub parameter_count: Option<u64>,
    /// `general.size_label`, the publisher's own size ("8B", "8x7B").
    pub size_label: Option<String>,
}

impl ModelFacts {
    /// The quantisation's name as llama.cpp's tools write it ("Q4_K_M"), from
    /// `general.file_type`; `None` when absent or a number this table lacks.
    pub fn quantization(&self) -> Option<&'static str> {
        ftype_name(self.file_type?)
    }

    /// The model's size for people: `general.size_label` when the file has
    /// one, else the parameter count rounded ("135M", "8.0B").
    pub fn parameter_label(&self) -> Option<String> {
        if let Some(label) = self.size_label.as_deref().filter(|l| !l.trim().is_empty()) {
            return Some(label.trim().to_string());
        }
        let count = self.parameter_count? as f64;
        Some(if count >= 1e12 {
            format!("{:.1}T", count / 1e12)
        } else if count >= 1e9 {
            format!("{:.1}B", count / 1e9)
        } else if count >= 1e6 {
            format!("{:.0}M", count / 1e6)
        } else if count >= 1e3 {
            format!("{:.0}K", count / 1e3)
        } else {
            format!("{count}")
        })
    }

    /// Bytes of KV cache one token occupies with f16 K and V over all layers.
    /// `None` when the header lacks the attention shape.
    pub fn kv_bytes_per_token(&self) -> Option<u64> {
        const F16_BYTES: u64 = 2;
        let heads = self.head_count.filter(|h| *h > 0)?;
        let per_head = self.embedding_length.map(|e| e / heads);
        let key_length = self.key_length.or(per_head)?;
        let value_length = self.value_length.or(per_head)?;
        let heads_kv_over_layers: u64 = match self.head_count_kv.as_slice() {
            [] => heads.checked_mul(self.block_count)?,
            [one] => one.checked_mul(self.block_count)?,
            many => many.iter().try_fold(0u64, |sum, h| sum.checked_add(*h))?,
        };
        // Recurrent models (Mamba, RWKV) have no attention KV: 0 means
        // "unknown" to the planner, never a divisor.
        heads_kv_over_layers
            .checked_mul(key_length.checked_add(value_length)?)?
            .checked_mul(F16_BYTES)
            .filter(|bytes| *bytes > 0)
    }
}

/// llama.cpp's `enum llama_ftype` (`include/llama.h`) by value, named the
/// way `llama-quantize` and file names spell them. 4 to 6 and 33 to 35 were
/// removed from llama.cpp; 1024 (`GUESSED`) is never written to a file.
fn ftype_name(file_type: u64) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        39 => "NVFP4",
        40 => "Q1_0",
        _ => return None,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF model file (it starts with {magic:?}, a GGUF file starts with \"GGUF\")")]
    NotGguf { path: PathBuf, magic: String },
    #[error("{path}: GGUF version {version} is not supported (2 and 3 are)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path} is truncated or corrupt: the GGUF header ends early ({detail})")]
    Truncated { path: PathBuf, detail: String },
    #[error("{path}: invalid GGUF header: {detail}")]
    Invalid { path: PathBuf, detail: String },
    /// The header is whole but the tensor data it describes is not: an
    /// interrupted download or copy. llama-server would fail only after
    /// reading the header, with a message that names no size.
    #[error("{path} is truncated: its header describes {expected} bytes of tensor data and header, but the file has {actual} bytes ({missing} missing); download or copy it again", missing = .expected - .actual)]
    DataCut {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: the GGUF header lacks {key}")]
    MissingKey { path: PathBuf, key: String },
    /// A GGUF that llama-server cannot serve on its own: a multimodal
    /// projector (`--mmproj`) or a LoRA adapter (`--lora`).
    #[error("{path} is a {kind}, not a model llama-server can serve on its own")]
    NotAModel { path: PathBuf, kind: &'static str },
}

/// A value from the header, reduced to what the planner uses.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Int(u64),
    Str(String),
    IntArray(Vec<u64>),
    Other,
}

/// Bounds that keep a corrupt header from making the reader allocate or loop
/// without end.
const MAX_STRING_BYTES: u64 = 64 << 20;
const MAX_KV_PAIRS: u64 = 1 << 20;
/// ggml's `GGML_MAX_DIMS`; its loader refuses more.
const MAX_TENSOR_DIMS: u32 = 4;
/// The least a tensor info takes: an empty name's length, the dimension
/// count (of none), the type and the offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

struct Reader<R> {
    inner: R,
    path: PathBuf,
    file_size: u64,
}

impl<R: Read> Reader<R> {
    fn truncated(&self, detail: impl Into<String>) -> GgufError {
        GgufError::Truncated {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    fn invalid(&self, detail: impl Into<String>) -> GgufError {
        GgufError::Invalid {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| self.truncated(format!("while reading {what}")))?;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes::<4>(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes::<8>(what)?))
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), GgufError> {
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|_| self.truncated(format!("while reading {what}")))?;
        if copied != n {
            return Err(self.truncated(format!("while reading {what}")));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > MAX_STRING_BYTES || len > self.file_size {
            return Err(self.invalid(format!("{what} claims {len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| self.truncated(format!("while reading {what}")))?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Reads one value of GGUF type `ty`. Integers of every width become
    /// `Int` (negative values clamp to 0: no key the planner reads is signed).
    fn value(&mut self, ty: u32, key: &str) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::Int(self.bytes::<1>(key)?[0] as u64),
            1 => Value::Int(i8::from_le_bytes(self.bytes::<1>(key)?).max(0) as u64),
            2 => Value::Int(u16::from_le_bytes(self.bytes::<2>(key)?) as u64),
            3 => Value::Int(i16::from_le_bytes(self.bytes::<2>(key)?).max(0) as u64),
            4 => Value::Int(self.u32(key)? as u64),
            5 => Value::Int(i32::from_le_bytes(self.bytes::<4>(key)?).max(0) as u64),
            6 => {
                self.bytes::<4>(key)?;
                Value::Other
            }
            7 => Value::Int(self.bytes::<1>(key)?[0] as u64),
            8 => Value::Str(self.string(key)?),
            9 => self.array(key)?,
            10 => Value::Int(self.u64(key)?),
            11 => Value::Int(i64::from_le_bytes(self.bytes::<8>(key)?).max(0) as u64),
            12 => {
                self.bytes::<8>(key)?;
                Value::Other
            }
            other => return Err(self.invalid(format!("key {key} has unknown value type {other}"))),
        })
    }

    fn array(&mut self, key: &str) -> Result<Value, GgufError> {
        let elem_ty = self.u32(key)?;
        let count = self.u64(key)?;
        if elem_ty == 9 {
            // llama.cpp's loader accepts no nested arrays either; refusing
            // them also bounds the recursion.
            return Err(self.invalid(format!("array {key} holds arrays")));
        }
        let fixed_width = match elem_ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match fixed_width {
            Some(width) => {
                let total = count.checked_mul(width).filter(|t| *t <= self.file_size);
                let Some(total) = total else {
                    return Err(self.invalid(format!("array {key} claims {count} elements")));
                };
                // Only the per-layer KV head counts are wanted; every other
                // array (token types, scores, ...) is skipped unread.
                if key.ends_with(".attention.head_count_kv")
                    && count <= 4096
                    && matches!(elem_ty, 0..=5 | 7 | 10 | 11)
                {
                    let mut out = Vec::with_capacity(count as usize);
                    for _ in 0..count {
                        match self.value(elem_ty, key)? {
                            Value::Int(v) => out.push(v),
                            _ => unreachable!("integer element types yield Int"),
                        }
                    }
                    Ok(Value::IntArray(out))
                } else {
                    self.skip(total, key)?;
                    Ok(Value::Other)
                }
            }
            None => {
                if count > self.file_size {
                    return Err(self.invalid(format!("array {key} claims {count} elements")));
                }
                if elem_ty != 8 {
                    return Err(
                        self.invalid(format!("array {key} has unknown element type {elem_ty}"))
                    );
                }
                // Strings (vocabularies, merges): walk and drop.
                for _ in 0..count {
                    let len = self.u64(key)?;
                    if len > MAX_STRING_BYTES {
                        return Err(self.invalid(format!("a string in {key} claims {len} bytes")));
                    }
                    self.skip(len, key)?;
                }
                Ok(Value::Other)
            }
        }
    }
}

/// Reads the header of the GGUF file at `path`.
pub fn read_model_facts(path: &Path) -> Result<ModelFacts, GgufError> {
    let (reader, file_size) = open(path)?;
    read_header(reader, path, file_size)
}

/// The parameter count alone, for files that hold tensors but not a
/// model's keys: the second and later parts of a split model.
pub fn read_parameter_count(path: &Path) -> Result<Option<u64>, GgufError> {
    let (inner, file_size) = open(path)?;
    let mut reader = Reader {
        inner,
        path: path.to_path_buf(),
        file_size,
    };
    let (_, tensor_count) = read_key_values(&mut reader)?;
    parameter_count(&mut reader, tensor_count)
}

fn open(path: &Path) -> Result<(BufReader<File>, u64), GgufError> {
    let file = File::open(path).map_err(|source| GgufError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let file_size = file
        .metadata()
        .map_err(|source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    Ok((BufReader::with_capacity(1 << 16, file), file_size))
}

/// Reads a header from `inner`, the start of the file at `path` of
/// `file_size` bytes (which bounds every length the header declares).
fn read_header(inner: impl Read, path: &Path, file_size: u64) -> Result<ModelFacts, GgufError> {
    let mut reader = Reader {
        inner,
        path: path.to_path_buf(),
        file_size,
    };
    let (kv, tensor_count) = read_key_values(&mut reader)?;
    let mut facts = facts_from_kv(path, file_size, &kv)?;
    // The key/values are what the planner needs; a file whose tensor infos
    // are cut short or garbled still has them, so that is no error here.
    facts.parameter_count = parameter_count(&mut reader, tensor_count).ok().flatten();
    Ok(facts)
}

/// Reads the fixed part and the key/values, leaving `reader` at the tensor
/// infos; returns the values and the declared tensor count.
fn read_key_values(
    reader: &mut Reader<impl Read>,
) -> Result<(BTreeMap<String, Value>, u64), GgufError> {
    let path = reader.path.clone();
    let magic = reader
        .bytes::<4>("the magic number")
        .map_err(|_| GgufError::NotGguf {
            path: path.to_path_buf(),
            magic: "(file shorter than 4 bytes)".to_string(),
        })?;
    if &magic != b"GGUF" {
        return Err(GgufError::NotGguf {
            path: path.to_path_buf(),
            magic: String::from_utf8_lossy(&magic).into_owned(),
        });
    }
    let version = reader.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version {
            path: path.to_path_buf(),
            version,
        });
    }
    let tensor_count = reader.u64("the tensor count")?;
    let kv_count = reader.u64("the key/value count")?;
    if kv_count > MAX_KV_PAIRS {
        return Err(reader.invalid(format!("it claims {kv_count} key/value pairs")));
    }

    let mut kv = BTreeMap::new();
    for _ in 0..kv_count {
        let key = reader.string("a key name")?;
        let ty = reader.u32(&key)?;
        let value = reader.value(ty, &key)?;
        kv.insert(key, value);
    }
    Ok((kv, tensor_count))
}

/// The sum of the tensors' element counts from the tensor infos, read up to
/// the start of the tensor data and no further. `Ok(None)` for no tensors
/// or a sum that does not fit; `Err` for infos that end early or are absurd.
fn parameter_count(
    reader: &mut Reader<impl Read>,
    tensor_count: u64,
) -> Result<Option<u64>, GgufError> {
    if tensor_count == 0 {
        return Ok(None);
    }
    if tensor_count > reader.file_size / MIN_TENSOR_INFO_BYTES {
        return Err(reader.invalid(format!("it claims {tensor_count} tensors")));
    }
    let mut total: Option<u64> = Some(0);
    for _ in 0..tensor_count {
        // Names are skipped, never allocated: only shapes are wanted.
        let name_len = reader.u64("a tensor name")?;
        if name_len > MAX_STRING_BYTES || name_len > reader.file_size {
            return Err(reader.invalid(format!("a tensor name claims {name_len} bytes")));
        }
        reader.skip(name_len, "a tensor name")?;
        let n_dims = reader.u32("a tensor's dimension count")?;
        if n_dims > MAX_TENSOR_DIMS {
            return Err(reader.invalid(format!("a tensor has {n_dims} dimensions")));
        }
        let mut elements: Option<u64> = Some(1);
        for _ in 0..n_dims {
            let dim = reader.u64("a tensor dimension")?;
            elements = elements.and_then(|e| e.checked_mul(dim));
        }
        reader.u32("a tensor type")?;
        reader.u64("a tensor offset")?;
        total = total.zip(elements).and_then(|(t, e)| t.checked_add(e));
    }
    Ok(total)
}

/// `(elements per block, bytes per block)` of a ggml tensor type, from
/// ggml's `type_traits`; `None` for a type this table lacks (a newer ggml),
/// which makes the file's size unknowable rather than wrong.
fn ggml_type_size(ty: u32) -> Option<(u64, u64)> {
    Some(match ty {
        0 => (1, 4),       // F32
        1 => (1, 2),       // F16
        2 => (32, 18),     // Q4_0
        3 => (32, 20),     // Q4_1
        6 => (32, 22),     // Q5_0
        7 => (32, 24),     // Q5_1
        8 => (32, 34),     // Q8_0
        9 => (32, 36),     // Q8_1
        10 => (256, 84),   // Q2_K
        11 => (256, 110),  // Q3_K
        12 => (256, 144),  // Q4_K
        13 => (256, 176),  // Q5_K
        14 => (256, 210),  // Q6_K
        15 => (256, 292),  // Q8_K
        16 => (256, 66),   // IQ2_XXS
        17 => (256, 74),   // IQ2_XS
        18 => (256, 98),   // IQ3_XXS
        19 => (256, 50),   // IQ1_S
        20 => (32, 18),    // IQ4_NL
        21 => (256, 110),  // IQ3_S
        22 => (256, 82),   // IQ2_S
        23 => (256, 136),  // IQ4_XS
        24 => (1, 1),      // I8
        25 => (1, 2),      // I16
        26 => (1, 4),      // I32
        27 | 28 => (1, 8), // I64, F64
        29 => (256, 56),   // IQ1_M
        30 => (1, 2),      // BF16
        34 => (256, 54),   // TQ1_0
        35 => (256, 66),   // TQ2_0
        39 => (32, 17),    // MXFP4
        _ => return None,
    })
}

/// The size the file at `path` must have for every tensor's data to be in
/// it: the header, padded to `general.alignment` (32 when absent), plus the
/// furthest tensor's offset and byte size. `Ok(None)` when that cannot be
/// known (no tensors, a tensor type this table lacks, sizes that overflow),
/// so only a file that is certainly short is refused.
pub fn implied_file_size(path: &Path) -> Result<Option<u64>, GgufError> {
    let (inner, file_size) = open(path)?;
    let mut reader = Reader {
        inner: Counting { inner, read: 0 },
        path: path.to_path_buf(),
        file_size,
    };
    let (kv, tensor_count) = read_key_values(&mut reader)?;
    if tensor_count == 0 {
        return Ok(None);
    }
    if tensor_count > file_size / MIN_TENSOR_INFO_BYTES {
        return Err(reader.invalid(format!("it claims {tensor_count} tensors")));
    }
    let alignment = match kv.get("general.alignment") {
        Some(Value::Int(a)) if *a > 0 => *a,
        _ => 32,
    };
    let mut data_end: Option<u64> = Some(0);
    for _ in 0..tensor_count {
        let name_len = reader.u64("a tensor name")?;
        if name_len > MAX_STRING_BYTES || name_len > file_size {
            return Err(reader.invalid(format!("a tensor name claims {name_len} bytes")));
        }
        reader.skip(name_len, "a tensor name")?;
        let n_dims = reader.u32("a tensor's dimension count")?;
        if n_dims > MAX_TENSOR_DIMS {
            return Err(reader.invalid(format!("a tensor has {n_dims} dimensions")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(reader.u64("a tensor dimension")?);
        }
        let ty = reader.u32("a tensor type")?;
        let offset = reader.u64("a tensor offset")?;
        let end = tensor_bytes(&dims, ty).and_then(|bytes| offset.checked_add(bytes));
        data_end = data_end.zip(end).map(|(a, b)| a.max(b));
    }
    let header_end = reader.inner.read;
    let data_start = header_end.div_ceil(alignment).checked_mul(alignment);
    Ok(data_start
        .zip(data_end)
        .and_then(|(start, end)| start.checked_add(end)))
}

/// Bytes of one tensor's data, as ggml's `ggml_nbytes` counts a contiguous
/// tensor: rows of `ne0 / block` blocks.
fn tensor_bytes(dims: &[u64], ty: u32) -> Option<u64> {
    let (block, size) = ggml_type_size(ty)?;
    let Some((&ne0, rest)) = dims.split_first() else {
        return Some(size);
    };
    let rows = rest.iter().try_fold(1u64, |n, d| n.checked_mul(*d))?;
    (ne0 / block).checked_mul(size)?.checked_mul(rows)
}

/// Refuses a model whose file is shorter than its header says (see
/// [`implied_file_size`]); run before a child is started, so the person
/// reads the sizes instead of llama-server's loading error.
pub fn check_tensor_data(path: &Path, facts: &ModelFacts) -> Result<(), GgufError> {
    match implied_file_size(path)? {
        Some(expected) if expected > facts.size_bytes => Err(GgufError::DataCut {
            path: path.to_path_buf(),
            expected,
            actual: facts.size_bytes,
        }),
        _ => Ok(()),
    }
}

/// A reader that counts the bytes read through it: where the tensor infos
/// end is where the data section begins, after padding.
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

fn facts_from_kv(
    path: &Path,
    size_bytes: u64,
    kv: &BTreeMap<String, Value>,
) -> Result<ModelFacts, GgufError> {
    let string = |key: &str| match kv.get(key) {
        Some(Value::Str(s)) => Some(s.clone()),
        _ => None,
    };
    // Projectors and adapters lack the keys of a model (a projector's are
    // `clip.vision.*`); saying what they are beats naming a missing key.
    let kind = match string("general.type").as_deref().unwrap_or_default() {
        "mmproj" => Some("multimodal projector"),
        "adapter" => Some("adapter"),
        _ if string("general.architecture").as_deref() == Some("clip") => {
            Some("multimodal projector")
        }
        _ => None,
    };
    if let Some(kind) = kind {
        return Err(GgufError::NotAModel {
            path: path.to_path_buf(),
            kind,
        });
    }
    let architecture = match kv.get("general.architecture") {
        Some(Value::Str(s)) => s.clone(),
        _ => {
            return Err(GgufError::MissingKey {
                path: path.to_path_buf(),
                key: "general.architecture".to_string(),
            })
        }
    };
    let int = |suffix: &str| match kv.get(&format!("{architecture}.{suffix}")) {
        Some(Value::Int(v)) => Some(*v),
        _ => None,
    };
    let block_count = int("block_count").ok_or_else(|| GgufError::MissingKey {
        path: path.to_path_buf(),
        key: format!("{architecture}.block_count"),
    })?;
    let head_count_kv = match kv.get(&format!("{architecture}.attention.head_count_kv")) {
        Some(Value::Int(v)) => vec![*v],
        Some(Value::IntArray(v)) => v.clone(),
        _ => Vec::new(),
    };
    Ok(ModelFacts {
        path: path.to_path_buf(),
        size_bytes,
        name: string("general.name"),
        context_length: int("context_length").filter(|c| *c > 0),
        block_count,
        embedding_length: int("embedding_length"),
        head_count: int("attention.head_count"),
        head_count_kv,
        key_length: int("attention.key_length"),
        value_length: int("attention.value_length"),
        sliding_window: int("attention.sliding_window").filter(|w| *w > 0),
        file_type: match kv.get("general.file_type") {
            Some(Value::Int(v)) => Some(*v),
            _ => None,
        },
        parameter_count: None,
        size_label: string("general.size_label"),
        architecture,
    })
}

/// Writes minimal GGUF files; used by tests and benches to make models with a
/// chosen header without shipping one.
pub mod writer {
    /// A header value to write.
    pub enum WriteValue<'a> {
        U32(u32),
        U64(u64),
        Str(&'a str),
        U32Array(&'a [u32]),
        StrArray(&'a [&'a str]),
        F32(f32),
    }

    /// One tensor info: name, dimensions, ggml type.
    pub type TensorInfo<'a> = (&'a str, &'a [u64], u32);

    /// Serialises a GGUF v3 header with the given key/values and no tensors.
    pub fn header(kv: &[(&str, WriteValue<'_>)]) -> Vec<u8> {
        header_with_tensors(kv, &[])
    }

    /// Serialises a GGUF v3 header with the given key/values and tensor
    /// infos, ending where tensor data would start (no data follows; the
    /// offsets are those of tightly packed f32 data).
    pub fn header_with_tensors(
        kv: &[(&str, WriteValue<'_>)],
        tensors: &[TensorInfo<'_>],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        for (key, value) in kv {
            put_str(&mut out, key);
            match value {
                WriteValue::U32(v) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                WriteValue::U64(v) => {
                    out.extend_from_slice(&10u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                WriteValue::F32(v) => {
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                WriteValue::Str(s) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    put_str(&mut out, s);
                }
                WriteValue::U32Array(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for v in *items {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
                WriteValue::StrArray(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&8u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for s in *items {
                        put_str(&mut out, s);
                    }
                }
            }
        }
        let mut offset = 0u64;
        for (name, dims, ty) in tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for dim in *dims {
                out.extend_from_slice(&dim.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            let elements = dims.iter().fold(1u64, |n, d| n.saturating_mul(*d));
            offset = offset.saturating_add(elements.saturating_mul(4));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{header, WriteValue::*};
    use super::*;

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, bytes).unwrap();
        file
    }

    /// A header with two f32 tensors (64 and 16 bytes), then padding to
    /// `align` and `data` bytes of tensor data.
    fn with_data(align: Option<u32>, data: usize) -> Vec<u8> {
        let mut kv = vec![
            ("general.architecture", Str("llama")),
            ("llama.block_count", U32(1)),
        ];
        if let Some(a) = align {
            kv.push(("general.alignment", U32(a)));
        }
        let mut bytes = super::writer::header_with_tensors(
            &kv,
            &[("a.weight", &[8, 2], 0), ("b.weight", &[4], 0)],
        );
        let align = align.unwrap_or(32) as usize;
        bytes.resize(bytes.len().div_ceil(align) * align, 0);
        bytes.resize(bytes.len() + data, 0);
        bytes
    }

    #[test]
    fn the_file_size_the_header_implies() {
        for align in [None, Some(64), Some(1)] {
            let whole = with_data(align, 80);
            let file = write(&whole);
            assert_eq!(
                implied_file_size(file.path()).unwrap(),
                Some(whole.len() as u64)
            );
            let facts = read_model_facts(file.path()).unwrap();
            check_tensor_data(file.path(), &facts).unwrap();

            let cut = write(&whole[..whole.len() - 1]);
            let facts = read_model_facts(cut.path()).unwrap();
            let err = check_tensor_data(cut.path(), &facts)
                .unwrap_err()
                .to_string();
            let name = cut.path().display().to_string();
            assert!(
                err.contains(&name)
                    && err.contains("is truncated")
                    && err.contains(&format!("describes {} bytes", whole.len()))
                    && err.contains(&format!("has {} bytes (1 missing)", whole.len() - 1)),
                "{err}"
            );
        }
        // No tensors, or a type the table lacks: nothing to check.
        let bare = write(&header(&[
            ("general.architecture", Str("llama")),
            ("llama.block_count", U32(1)),
        ]));
        assert_eq!(implied_file_size(bare.path()).unwrap(), None);
        let unknown = write(&super::writer::header_with_tensors(
            &[
                ("general.architecture", Str("llama")),
                ("llama.block_count", U32(1)),
            ],
            &[("a.weight", &[8], 999)],
        ));
        assert_eq!(implied_file_size(unknown.path()).unwrap(), None);
    }

    #[test]
    fn quantised_tensors_count_whole_blocks() {
        // Q4_1: 32 weights in 20 bytes; Q6_K: 256 in 210.
        assert_eq!(tensor_bytes(&[576, 49152], 3), Some(576 / 32 * 20 * 49152));
        assert_eq!(tensor_bytes(&[4096, 2], 14), Some(16 * 210 * 2));
        assert_eq!(tensor_bytes(&[], 0), Some(4));
        assert_eq!(tensor_bytes(&[u64::MAX, 3], 0), None);
    }

    fn llama_8b_header() -> Vec<u8> {
        header(&[
            ("general.architecture", Str("llama")),
            ("general.name", Str("Test 8B")),
            ("general.file_type", U32(15)),
            ("llama.block_count", U32(32)),
            ("llama.context_length", U32(131072)),
            ("llama.embedding_length", U32(4096)),
            ("llama.attention.head_count", U32(32)),
            ("llama.attention.head_count_kv", U32(8)),
            ("llama.rope.freq_base", F32(500000.0)),
            ("tokenizer.ggml.tokens", StrArray(&["<s>", "</s>", "hello"])),
        ])
    }

    #[test]
    fn reads_a_written_header() {
        let file = write(&llama_8b_header());
        let facts = read_model_facts(file.path()).unwrap();
        assert_eq!(facts.architecture, "llama");
        assert_eq!(facts.name.as_deref(), Some("Test 8B"));
        assert_eq!(facts.block_count, 32);
        assert_eq!(facts.context_length, Some(131072));
        assert_eq!(facts.head_count_kv, vec![8]);
        assert_eq!(facts.file_type, Some(15));
        assert_eq!(facts.sliding_window, None);
        // 32 layers x 8 kv heads x (128 + 128) x 2 bytes = 128 KiB per token,
        // the well-known figure for Llama 3 8B at f16.
        assert_eq!(facts.kv_bytes_per_token(), Some(131072));
    }

    #[test]
    fn explicit_key_and_value_lengths_and_per_layer_heads() {
        let file = write(&header(&[
            ("general.architecture", Str("gemma3")),
            ("gemma3.block_count", U32(3)),
            ("gemma3.embedding_length", U32(640)),
            ("gemma3.attention.head_count", U32(4)),
            ("gemma3.attention.head_count_kv", U32Array(&[1, 1, 2])),
            ("gemma3.attention.key_length", U32(256)),
            ("gemma3.attention.value_length", U32(128)),
            ("gemma3.attention.sliding_window", U32(512)),
        ]));
        let facts = read_model_facts(file.path()).unwrap();
        assert_eq!(facts.head_count_kv, vec![1, 1, 2]);
        assert_eq!(facts.sliding_window, Some(512));
        assert_eq!(facts.kv_bytes_per_token(), Some(4 * (256 + 128) * 2));
    }

    #[test]
    fn every_truncation_point_is_a_clear_error() {
        let bytes = llama_8b_header();
        for len in 0..bytes.len() {
            let file = write(&bytes[..len]);
            let err = read_model_facts(file.path()).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, GgufError::NotGguf { .. } | GgufError::Truncated { .. }),
                "cut at {len}: {text}"
            );
            assert!(text.contains(&file.path().display().to_string()));
        }
    }

    #[test]
    fn not_gguf_names_what_it_found() {
        let file = write(b"not a model at all");
        let err = read_model_facts(file.path()).unwrap_err();
        assert!(matches!(err, GgufError::NotGguf { .. }), "{err}");
        assert!(err.to_string().contains("\"not \""), "{err}");
    }

    #[test]
    fn absurd_lengths_are_rejected_not_allocated() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes()); // key length
        let file = write(&bytes);
        let err = read_model_facts(file.path()).unwrap_err();
        assert!(matches!(err, GgufError::Invalid { .. }), "{err}");
    }

    #[test]
    fn nested_arrays_are_refused_without_recursion() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.push(b'k');
        for _ in 0..100_000 {
            bytes.extend_from_slice(&9u32.to_le_bytes()); // value type: array
            bytes.extend_from_slice(&9u32.to_le_bytes()); // of arrays
            bytes.extend_from_slice(&1u64.to_le_bytes());
        }
        let file = write(&bytes);
        let err = read_model_facts(file.path()).unwrap_err();
        assert!(matches!(err, GgufError::Invalid { .. }), "{err}");
    }

    #[test]
    fn kv_size_is_none_for_attention_free_or_absurd_headers() {
        let file = write(&header(&[
            ("general.architecture", Str("mamba")),
            ("mamba.block_count", U32(64)),
            ("mamba.context_length", U32(0)),
            ("mamba.embedding_length", U32(2560)),
            ("mamba.attention.head_count", U32(0)),
        ]));
        let facts = read_model_facts(file.path()).unwrap();
        assert_eq!(facts.kv_bytes_per_token(), None);
        assert_eq!(facts.context_length, None);
        let absurd = ModelFacts {
            block_count: 1 << 40,
            head_count: Some(1),
            head_count_kv: vec![1 << 30],
            key_length: Some(128),
            value_length: Some(128),
            ..facts
        };
        assert_eq!(absurd.kv_bytes_per_token(), None);
    }

    /// SmolLM2-135M's shape, cut down: embeddings, one block's attention
    /// and norm, tied output.
    const TENSORS: &[writer::TensorInfo<'static>] = &[
        ("token_embd.weight", &[576, 49152], 3),
        ("blk.0.attn_q.weight", &[576, 576], 3),
        ("blk.0.attn_norm.weight", &[576], 0),
    ];

    #[test]
    fn parameters_are_counted_from_the_tensor_infos() {
        let kv = [
            ("general.architecture", Str("llama")),
            ("llama.block_count", U32(1)),
            ("general.file_type", U32(3)),
        ];
        let file = write(&writer::header_with_tensors(&kv, TENSORS));
        let facts = read_model_facts(file.path()).unwrap();
        assert_eq!(facts.parameter_count, Some(576 * 49152 + 576 * 576 + 576));
        assert_eq!(facts.parameter_label().as_deref(), Some("29M"));
        assert_eq!(facts.quantization(), Some("Q4_1"));
        assert_eq!(facts.size_label, None);
        // No tensors: nothing to count, not zero parameters.
        let file = write(&header(&kv));
        assert_eq!(read_model_facts(file.path()).unwrap().parameter_count, None);
    }

    #[test]
    fn cut_or_absurd_tensor_infos_keep_the_key_values() {
        let kv = [
            ("general.architecture", Str("llama")),
            ("llama.block_count", U32(1)),
            ("llama.context_length", U32(8192)),
        ];
        let kv_only = header(&kv).len();
        let bytes = writer::header_with_tensors(&kv, TENSORS);
        for len in kv_only..bytes.len() {
            let file = write(&bytes[..len]);
            let facts =
                read_model_facts(file.path()).unwrap_or_else(|e| panic!("cut at {len}: {e}"));
            assert_eq!(facts.context_length, Some(8192));
            assert_eq!(facts.parameter_count, None, "cut at {len}");
        }
        let mut five_dims = writer::header_with_tensors(&kv, &[("t", &[1, 2, 3, 4, 5], 0)]);
        five_dims.extend_from_slice(&[0; 64]);
        let file = write(&five_dims);
        assert_eq!(read_model_facts(file.path()).unwrap().parameter_count, None);
        let overflowing = writer::header_with_tensors(&kv, &[("t", &[u64::MAX, 2], 0)]);
        let file = write(&overflowing);
        assert_eq!(read_model_facts(file.path()).unwrap().parameter_count, None);
    }

    #[test]
    fn quantization_names_follow_llama_ftype() {
        let named = |file_type: Option<u64>| ModelFacts {
            file_type,
            ..read_model_facts(write(&llama_8b_header()).path()).unwrap()
        };
        for (value, name) in [
            (0, "F32"),
            (1, "F16"),
            (2, "Q4_0"),
            (7, "Q8_0"),
            (10, "Q2_K"),
            (15, "Q4_K_M"),
            (18, "Q6_K"),
            (21, "Q2_K_S"),
            (30, "IQ4_XS"),
            (32, "BF16"),
            (37, "TQ2_0"),
            (38, "MXFP4_MOE"),
        ] {
            assert_eq!(named(Some(value)).quantization(), Some(name), "{value}");
        }
        for removed in [4, 5, 6, 33, 34, 35, 1024, u64::MAX] {
            assert_eq!(named(Some(removed)).quantization(), None, "{removed}");
        }
        assert_eq!(named(None).quantization(), None);
    }

    #[test]
    fn parameter_labels_prefer_the_publishers_own() {
        let facts = ModelFacts {
            parameter_count: Some(134_515_008),
            ..read_model_facts(write(&llama_8b_header()).path()).unwrap()
        };
        assert_eq!(facts.parameter_label().as_deref(), Some("135M"));
        let big = ModelFacts {
            parameter_count: Some(8_030_261_248),
            ..facts.clone()
        };
        assert_eq!(big.parameter_label().as_deref(), Some("8.0B"));
        let labelled = ModelFacts {
            size_label: Some("8x7B".into()),
            ..big
        };
        assert_eq!(labelled.parameter_label().as_deref(), Some("8x7B"));
        let unknown = ModelFacts {
            parameter_count: None,
            ..facts
        };
        assert_eq!(unknown.parameter_label(), None);
    }

    #[test]
    fn size_label_is_read() {
        let file = write(&header(&[
            ("general.architecture", Str("llama")),
            ("llama.block_count", U32(1)),
            ("general.size_label", Str("135M")),
        ]));
        let facts = read_model_facts(file.path()).unwrap();
        assert_eq!(facts.size_label.as_deref(), Some("135M"));
    }

    #[test]
    fn projectors_and_adapters_are_not_models() {
        for kv in [
            vec![
                ("general.type", Str("mmproj")),
                ("general.architecture", Str("clip")),
            ],
            vec![
                ("general.architecture", Str("clip")),
                ("clip.vision.block_count", U32(2)),
            ],
            vec![
                ("general.type", Str("adapter")),
                ("general.architecture", Str("llama")),
                ("llama.block_count", U32(2)),
            ],
        ] {
            let file = write(&header(&kv));
            let err = read_model_facts(file.path()).unwrap_err();
            assert!(matches!(err, GgufError::NotAModel { .. }), "{err}");
        }
        let model = write(&header(&[
            ("general.type", Str("model")),
            ("general.architecture", Str("llama")),
            ("llama.block_count", U32(2)),
        ]));
        assert!(read_model_facts(model.path()).is_ok());
    }

    #[test]
    fn missing_architecture_is_named() {
        let file = write(&header(&[("general.name", Str("x"))]));
        let err = read_model_facts(file.path()).unwrap_err();
        assert!(err.to_string().contains("general.architecture"), "{err}");
    }

    #[test]
    fn old_version_is_refused() {
        let mut bytes = llama_8b_header();
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        let file = write(&bytes);
        assert!(matches!(
            read_model_facts(file.path()).unwrap_err(),
            GgufError::Version { version: 1, .. }
        ));
    }
}

/// Headers the writer makes read back to their facts; cut or corrupted
/// ones give an error, never a panic, and never an allocation out of
/// proportion to the bytes present (or, in a file large enough to hold any
/// declared length, one past `MAX_STRING_BYTES`).
#[cfg(test)]
mod properties {
    use super::writer::{header, WriteValue};
    use super::*;
    use crate::testing;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    /// A header value, owned (the writer's values borrow).
    #[derive(Debug, Clone)]
    enum Owned {
        U32(u32),
        U64(u64),
        Str(String),
        U32s(Vec<u32>),
        Strs(Vec<String>),
        F32(f32),
    }

    /// What the key/values were written to say.
    #[derive(Debug, Clone)]
    struct Written {
        kv: Vec<(String, Owned)>,
        facts: ModelFacts,
    }

    /// `attention.head_count_kv`: one count, or one per layer.
    #[derive(Debug, Clone)]
    enum HeadsKv {
        One(u64),
        PerLayer(Vec<u32>),
    }

    /// An integer key, written 32 or 64 bits wide.
    fn int(value: u64, wide: bool) -> Owned {
        match u32::try_from(value) {
            Ok(v) if !wide => Owned::U32(v),
            _ => Owned::U64(value),
        }
    }

    fn written() -> impl Strategy<Value = Written> {
        let small = || prop_oneof![0..200u64, any::<u32>().prop_map(u64::from), any::<u64>()];
        let opt = move || proptest::option::of(small());
        let heads_kv = prop_oneof![
            Just(None),
            small().prop_map(|v| Some(HeadsKv::One(v))),
            vec(any::<u32>(), 0..8).prop_map(|v| Some(HeadsKv::PerLayer(v))),
        ];
        let junk = prop_oneof![
            any::<f32>().prop_map(Owned::F32),
            ".{0,12}".prop_map(Owned::Str),
            vec(".{0,6}", 0..6).prop_map(Owned::Strs),
            vec(any::<u32>(), 0..6).prop_map(Owned::U32s),
            any::<u64>().prop_map(Owned::U64),
        ];
        (
            "[a-z][a-z0-9]{0,9}".prop_filter("clip is a projector's", |a| a != "clip"),
            proptest::option::of(".{0,20}"),
            (opt(), small(), opt(), opt(), opt()),
            (heads_kv, opt(), opt(), opt()),
            vec(junk, 0..6),
            any::<bool>(),
        )
            .prop_map(
                |(arch, name, (file_type, blocks, context, embedding, heads), rest, junk, wide)| {
                    let (heads_kv, key_length, value_length, sliding) = rest;
                    let mut kv = vec![
                        ("general.architecture".to_string(), Owned::Str(arch.clone())),
                        (format!("{arch}.block_count"), int(blocks, wide)),
                    ];
                    let mut put = |key: &str, value: Option<u64>| {
                        if let Some(v) = value {
                            kv.push((key.to_string(), int(v, wide)));
                        }
                    };
                    put("general.file_type", file_type);
                    put(&format!("{arch}.context_length"), context);
                    put(&format!("{arch}.embedding_length"), embedding);
                    put(&format!("{arch}.attention.head_count"), heads);
                    put(&format!("{arch}.attention.key_length"), key_length);
                    put(&format!("{arch}.attention.value_length"), value_length);
                    put(&format!("{arch}.attention.sliding_window"), sliding);
                    let heads_kv_key = format!("{arch}.attention.head_count_kv");
                    let head_count_kv = match heads_kv {
                        None => Vec::new(),
                        Some(HeadsKv::One(v)) => {
                            kv.push((heads_kv_key, int(v, wide)));
                            vec![v]
                        }
                        Some(HeadsKv::PerLayer(per_layer)) => {
                            kv.push((heads_kv_key, Owned::U32s(per_layer.clone())));
                            per_layer.into_iter().map(u64::from).collect()
                        }
                    };
                    if let Some(name) = &name {
                        kv.push(("general.name".to_string(), Owned::Str(name.clone())));
                    }
                    for (i, value) in junk.into_iter().enumerate() {
                        kv.push((format!("junk.{i}"), value));
                    }
                    let facts = ModelFacts {
                        path: PathBuf::from("model.gguf"),
                        size_bytes: 0,
                        architecture: arch,
                        name,
                        context_length: context.filter(|c| *c > 0),
                        block_count: blocks,
                        embedding_length: embedding,
                        head_count: heads,
                        head_count_kv,
                        key_length,
                        value_length,
                        sliding_window: sliding.filter(|w| *w > 0),
                        file_type,
                        parameter_count: None,
                        size_label: None,
                    };
                    Written { kv, facts }
                },
            )
            .prop_flat_map(|written| {
                let n = written.kv.len();
                (
                    Just(written),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                )
            })
            .prop_map(|(mut written, order)| {
                // Key order is the writer's business, not the reader's.
                let kv = std::mem::take(&mut written.kv);
                written.kv = order.into_iter().map(|i| kv[i].clone()).collect();
                written
            })
    }

    /// The header's bytes, and where each 8-byte length or count sits with
    /// the value written there.
    fn encode(kv: &[(String, Owned)]) -> (Vec<u8>, Vec<(usize, u64)>) {
        let string_lists: Vec<Vec<&str>> = kv
            .iter()
            .map(|(_, v)| match v {
                Owned::Strs(items) => items.iter().map(String::as_str).collect(),
                _ => Vec::new(),
            })
            .collect();
        let values: Vec<(&str, WriteValue<'_>)> = kv
            .iter()
            .zip(&string_lists)
            .map(|((key, value), strings)| {
                let value = match value {
                    Owned::U32(v) => WriteValue::U32(*v),
                    Owned::U64(v) => WriteValue::U64(*v),
                    Owned::Str(s) => WriteValue::Str(s),
                    Owned::U32s(v) => WriteValue::U32Array(v),
                    Owned::Strs(_) => WriteValue::StrArray(strings),
                    Owned::F32(v) => WriteValue::F32(*v),
                };
                (key.as_str(), value)
            })
            .collect();
        let bytes = header(&values);
        // The layout of ggml's docs/gguf.md: magic, version, tensor count,
        // key/value count, then per pair a key, a type and a value.
        let mut lengths = vec![(8, 0), (16, kv.len() as u64)];
        let mut at = 24;
        let string = |at: &mut usize, s: &str, lengths: &mut Vec<(usize, u64)>| {
            lengths.push((*at, s.len() as u64));
            *at += 8 + s.len();
        };
        for (key, value) in kv {
            string(&mut at, key, &mut lengths);
            at += 4;
            match value {
                Owned::U32(_) | Owned::F32(_) => at += 4,
                Owned::U64(_) => at += 8,
                Owned::Str(s) => string(&mut at, s, &mut lengths),
                Owned::U32s(items) => {
                    lengths.push((at + 4, items.len() as u64));
                    at += 12 + 4 * items.len();
                }
                Owned::Strs(items) => {
                    lengths.push((at + 4, items.len() as u64));
                    at += 12;
                    for s in items {
                        string(&mut at, s, &mut lengths);
                    }
                }
            }
        }
        assert_eq!(at, bytes.len(), "the layout above is the writer's");
        for &(offset, value) in &lengths {
            assert_eq!(
                bytes[offset..offset + 8],
                value.to_le_bytes(),
                "at {offset}"
            );
        }
        (bytes, lengths)
    }

    fn read(bytes: &[u8], file_size: u64) -> Result<ModelFacts, GgufError> {
        read_header(bytes, Path::new("model.gguf"), file_size)
    }

    /// Lengths and counts that sit on or just past a bound.
    const HUGE: &[u64] = &[
        u64::MAX,
        u64::MAX / 2 + 1,
        u64::MAX / 8 + 1,
        1 << 32,
        1 << 40,
        MAX_STRING_BYTES,
        MAX_STRING_BYTES + 1,
        MAX_KV_PAIRS,
        MAX_KV_PAIRS + 1,
        4096,
        4097,
    ];

    /// A file of 1 TiB: a real model is that large, so it bounds nothing.
    const LARGE_FILE: u64 = 1 << 40;

    proptest! {
        #![proptest_config(testing::config(256))]

        /// What the writer wrote, in any key order and with anything after
        /// it (tensor data is never read), is read back.
        #[test]
        fn written_headers_read_back(
            written in written(),
            tail in vec(any::<u8>(), 0..64),
            extra in prop_oneof![Just(0u64), 0..LARGE_FILE],
        ) {
            let (mut bytes, _) = encode(&written.kv);
            bytes.extend_from_slice(&tail);
            let file_size = bytes.len() as u64 + extra;
            let facts = read(&bytes, file_size).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let want = ModelFacts { size_bytes: file_size, ..written.facts };
            prop_assert_eq!(facts, want);
        }

        /// Tensor infos read back to the sum of their shapes' products;
        /// cut anywhere, they leave the key/values as they were.
        #[test]
        fn tensor_infos_count_parameters_or_nothing(
            tensors in vec(("[a-z.0-9]{0,24}", vec(0..2_000u64, 0..=4), 0..40u32), 0..12),
            cut in any::<u64>(),
        ) {
            let kv = [
                ("general.architecture", WriteValue::Str("llama")),
                ("llama.block_count", WriteValue::U32(2)),
            ];
            let infos: Vec<writer::TensorInfo<'_>> =
                tensors.iter().map(|(n, d, t)| (n.as_str(), d.as_slice(), *t)).collect();
            let bytes = writer::header_with_tensors(&kv, &infos);
            let want: u64 = tensors.iter().map(|(_, d, _)| d.iter().product::<u64>()).sum();
            let facts = read(&bytes, bytes.len() as u64).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(facts.parameter_count, (!tensors.is_empty()).then_some(want));
            let kv_end = header(&kv).len();
            if bytes.len() > kv_end {
                let cut = kv_end + testing::fit(cut, bytes.len() - kv_end - 1);
                let facts = read(&bytes[..cut], LARGE_FILE).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(facts.parameter_count, None);
                prop_assert_eq!(facts.block_count, 2);
            }
        }

        /// A header cut anywhere before its end is an error naming the file.
        #[test]
        fn cut_headers_are_errors(written in written(), cut in any::<u64>(), lie in any::<bool>()) {
            let (bytes, _) = encode(&written.kv);
            let cut = testing::fit(cut, bytes.len() - 1);
            let file_size = if lie { LARGE_FILE } else { cut as u64 };
            let err = read(&bytes[..cut], file_size).unwrap_err();
            prop_assert!(
                matches!(
                    err,
                    GgufError::NotGguf { .. } | GgufError::Truncated { .. } | GgufError::Invalid { .. }
                ),
                "{}", err
            );
            prop_assert!(err.to_string().contains("model.gguf"), "{}", err);
        }

        /// Valid headers with lengths and counts set to huge values, types
        /// changed, and bytes deleted, duplicated, swapped or flipped: a
        /// value or an error, and memory bounded by what is there.
        #[test]
        fn corrupt_headers_never_panic_or_allocate_what_they_claim(
            written in written(),
            huge in vec((any::<u64>(), prop_oneof![select(HUGE), any::<u64>()]), 0..3),
            types in vec((any::<u64>(), prop_oneof![Just(9u32), Just(13), any::<u32>()]), 0..2),
            edits in testing::edits(&["GGUF", "\u{3}\0\0\0", "\u{9}\0\0\0\u{8}\0\0\0"], 3),
            lie in any::<bool>(),
        ) {
            let (mut bytes, lengths) = encode(&written.kv);
            for (field, value) in huge {
                let (offset, _) = lengths[testing::fit(field, lengths.len() - 1)];
                bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
            }
            for (at, ty) in types {
                // Any 4 bytes after the fixed part: some are type fields.
                if bytes.len() > 28 {
                    let at = 24 + testing::fit(at, bytes.len() - 28);
                    bytes[at..at + 4].copy_from_slice(&ty.to_le_bytes());
                }
            }
            let bytes = testing::apply(bytes, &edits);
            let file_size = if lie { LARGE_FILE } else { bytes.len() as u64 };
            let (result, largest) = testing::largest_allocation(|| read(&bytes, file_size));
            if let Ok(facts) = &result {
                prop_assert_eq!(facts.size_bytes, file_size);
            }
            // A string is allocated at its declared length (at most the
            // file's size, at most MAX_STRING_BYTES) before it is read, and
            // turning invalid UTF-8 into U+FFFD can triple what was read.
            let bound = if lie {
                (MAX_STRING_BYTES as usize).max(4 * bytes.len())
            } else {
                4 * bytes.len()
            };
            prop_assert!(
                largest <= bound + 4096,
                "{} bytes allocated for {} ({:?})", largest, bytes.len(), result
            );
        }

        /// The KV size is the exact product, or `None` when that is 0 or
        /// does not fit (no overflow, no division by 0).
        #[test]
        fn kv_bytes_per_token_is_exact_or_none(
            heads in proptest::option::of(prop_oneof![0..4u64, any::<u64>()]),
            embedding in proptest::option::of(any::<u64>()),
            key_length in proptest::option::of(prop_oneof![0..300u64, any::<u64>()]),
            value_length in proptest::option::of(prop_oneof![0..300u64, any::<u64>()]),
            block_count in prop_oneof![0..100u64, any::<u64>()],
            head_count_kv in vec(prop_oneof![0..16u64, any::<u64>()], 0..5),
        ) {
            let facts = ModelFacts {
                path: PathBuf::new(),
                size_bytes: 0,
                architecture: String::new(),
                name: None,
                context_length: None,
                block_count,
                embedding_length: embedding,
                head_count: heads,
                head_count_kv: head_count_kv.clone(),
                key_length,
                value_length,
                sliding_window: None,
                file_type: None,
                parameter_count: None,
                size_label: None,
            };
            let want = (|| {
                let heads = u128::from(heads.filter(|h| *h > 0)?);
                let per_head = embedding.map(|e| u128::from(e) / heads);
                let k = key_length.map(u128::from).or(per_head)?;
                let v = value_length.map(u128::from).or(per_head)?;
                let kv_heads: u128 = match head_count_kv.as_slice() {
                    [] => heads * u128::from(block_count),
                    [one] => u128::from(*one) * u128::from(block_count),
                    many => many.iter().map(|h| u128::from(*h)).sum(),
                };
                // u128 is wide enough for every factor but the last.
                let total = kv_heads.checked_mul(k + v)?.checked_mul(2)?;
                u64::try_from(total).ok().filter(|t| *t > 0)
            })();
            prop_assert_eq!(facts.kv_bytes_per_token(), want);
        }
    }
}
