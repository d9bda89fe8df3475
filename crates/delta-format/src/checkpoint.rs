//! Hugging Face model folders: reading single-file or sharded safetensors checkpoints over
//! mmap, and writing them (sharded above a size limit, as `transformers` does).
//!
//! A folder holds `model.safetensors`, or `model.safetensors.index.json` naming shards, plus
//! side files (`config.json`, tokenizer files, ...). Reading maps every shard and validates
//! its header; tensors are then borrowed views, never copies.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use memmap2::Mmap;
use serde::Deserialize;

use crate::error::{FormatError, Result};
use crate::fingerprint::BaseFingerprint;
use crate::safetensors::{SafetensorsHeader, TensorInfo, TensorView};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// The bytes of a file: memory-mapped, or owned for tiny files (which cannot be mapped).
pub enum FileBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Maps `path` read-only.
    ///
    /// The mapping assumes nobody truncates the file while it is in use (the usual contract
    /// of mmap-based readers); the header is validated against the length seen at open.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
        let meta = file.metadata().map_err(|e| FormatError::io(path, e))?;
        if meta.is_dir() {
            return Err(FormatError::io(path, std::io::Error::new(std::io::ErrorKind::IsADirectory, "a folder, where a file was expected")));
        }
        let len = meta.len();
        if len < 4096 {
            return fs::read(path).map(FileBytes::Owned).map_err(|e| FormatError::io(path, e));
        }
        // SAFETY: read-only mapping of a regular file; see the contract above.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
        Ok(FileBytes::Mapped(map))
    }
}

impl Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

/// One parsed safetensors file.
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub bytes: FileBytes,
    pub header: SafetensorsHeader,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = FileBytes::open(path)?;
        let header = SafetensorsHeader::parse(&bytes).map_err(|e| e.in_file(path))?;
        Ok(SafetensorsFile { path: path.to_path_buf(), bytes, header })
    }

    pub fn view<'a>(&'a self, info: &'a TensorInfo) -> TensorView<'a> {
        self.header.view(&self.bytes, info)
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// A Hugging Face model folder opened for reading.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<SafetensorsFile>,
    /// name -> (shard, index into that shard's tensors)
    index: BTreeMap<String, (usize, usize)>,
    /// Digests of every tensor, computed on first use (a server checks every delta it loads
    /// against the same base).
    fingerprint: OnceLock<BaseFingerprint>,
}

impl Checkpoint {
    /// The fingerprint of this checkpoint (name, dtype, shape and digest of every tensor), hashed
    /// once per open checkpoint.
    pub fn fingerprint(&self) -> &BaseFingerprint {
        self.fingerprint.get_or_init(|| BaseFingerprint::of(self))
    }

    /// Opens a model folder (or a single `.safetensors` file).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            return Self::from_files(dir, vec![path.to_path_buf()], None);
        }
        if !path.is_dir() {
            return Err(FormatError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such model folder")));
        }
        let single = path.join(SINGLE_FILE);
        let index_path = path.join(SHARD_INDEX);
        if single.is_file() {
            return Self::from_files(path.to_path_buf(), vec![single], None);
        }
        if !index_path.is_file() {
            return Err(FormatError::NotAModelFolder { dir: path.to_path_buf() });
        }
        let text = fs::read_to_string(&index_path).map_err(|e| FormatError::io(&index_path, e))?;
        let index: ShardIndex = serde_json::from_str(&text)
            .map_err(|e| FormatError::BadShardIndex { path: index_path.clone(), reason: e.to_string() })?;
        let files: BTreeSet<&String> = index.weight_map.values().collect();
        let mut paths = Vec::new();
        for f in files {
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(FormatError::BadShardIndex { path: index_path, reason: format!("shard name `{f}` is not a plain file name") });
            }
            paths.push(path.join(f));
        }
        Self::from_files(path.to_path_buf(), paths, Some((index_path, index.weight_map)))
    }

    fn from_files(dir: PathBuf, paths: Vec<PathBuf>, map: Option<(PathBuf, BTreeMap<String, String>)>) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for (s, p) in paths.iter().enumerate() {
            let file = SafetensorsFile::open(p)?;
            for (t, info) in file.header.tensors().iter().enumerate() {
                if let Some(&(first, _)) = index.get(&info.name) {
                    let first: &SafetensorsFile = &shards[first];
                    return Err(FormatError::DuplicateTensor {
                        name: info.name.clone(),
                        first: first.path.display().to_string(),
                        second: p.display().to_string(),
                    });
                }
                index.insert(info.name.clone(), (s, t));
            }
            shards.push(file);
        }
        if let Some((index_path, weight_map)) = map {
            for (name, file) in &weight_map {
                let found = index.get(name).map(|&(s, _)| shards[s].path.file_name() == Some(file.as_ref()));
                if found != Some(true) {
                    return Err(FormatError::BadShardIndex {
                        path: index_path,
                        reason: format!("tensor `{name}` is listed in shard {file} but is not in it"),
                    });
                }
            }
        }
        Ok(Checkpoint { dir, shards, index, fingerprint: OnceLock::new() })
    }

    /// Lets the kernel drop the mapped pages read so far from this process's resident set (they
    /// are read back from the file if touched again). For callers that copied the weights out
    /// (e.g. into f32 tensors) and want their peak memory to be the copies, not copies + pages.
    pub fn release_pages(&self) {
        for shard in &self.shards {
            if let FileBytes::Mapped(map) = &shard.bytes {
                // SAFETY: a read-only shared mapping of a file: MADV_DONTNEED only drops clean
                // pages, which later reads fault back in from the file unchanged.
                #[cfg(unix)]
                let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
                #[cfg(not(unix))]
                let _ = map;
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let &(s, t) = self.index.get(name)?;
        let shard = &self.shards[s];
        Some(shard.view(&shard.header.tensors()[t]))
    }

    /// Bytes of all tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.shards.iter().flat_map(|s| s.header.tensors()).map(|t| (t.end - t.start) as u64).sum()
    }

    /// The architecture named in `config.json` (`architectures[0]`), if any.
    pub fn architecture(&self) -> Option<String> {
        let text = fs::read_to_string(self.dir.join("config.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v.get("architectures")?.get(0)?.as_str().map(str::to_string)
    }

    /// The folder's side files (config, tokenizer, generation settings, ...): every regular,
    /// non-hidden file that is not a weight file or a shard index, sorted by name.
    pub fn side_files(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(|e| FormatError::io(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| FormatError::io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) && is_side_file(&name) {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }
}

/// True for the linear weights inside transformer blocks, the weights a delta compresses: rank-2
/// `…weight` tensors under a numbered block (`model.layers.N.…`, `transformer.h.N.…`,
/// `blocks.N.…`). Embeddings, the LM head and norms are never compressed.
pub fn is_block_linear(name: &str, shape: &[usize]) -> bool {
    if shape.len() != 2 || !name.ends_with(".weight") {
        return false;
    }
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).any(|w| matches!(w[0], "layers" | "h" | "blocks" | "block") && w[1].parse::<usize>().is_ok())
}

/// True for the matrices with a row per token of the vocabulary (`…embed_tokens.weight`,
/// `lm_head.weight`): the only tensors whose shape a fine-tune may change, by adding tokens (or
/// dropping them); their columns stay the model's width.
pub fn is_vocabulary_matrix(name: &str) -> bool {
    name.ends_with("embed_tokens.weight") || name == "lm_head.weight"
}

/// Whether a fine-tune's tensor of shape `finetuned` may stand for the base's of shape `base`
/// (stored whole): the same shape, or for a vocabulary matrix other rows of the same width.
pub fn replaces_shape(name: &str, base: &[usize], finetuned: &[usize]) -> bool {
    base == finetuned || (is_vocabulary_matrix(name) && base.len() == 2 && finetuned.len() == 2 && base[1] == finetuned[1])
}

/// Weight files and indexes are not side files; neither are hidden files.
pub fn is_side_file(name: &str) -> bool {
    const WEIGHT_SUFFIXES: [&str; 10] =
        [".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".index.json"];
    !name.starts_with('.') && !WEIGHT_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Parses a size like `5GB`, `200MB`, `4GiB` or a plain byte count (decimal units are powers
/// of 1000, as in `transformers`' `max_shard_size`).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_linear_names() {
        assert!(is_block_linear("model.layers.0.self_attn.q_proj.weight", &[576, 576]));
        assert!(is_block_linear("transformer.h.11.mlp.c_fc.weight", &[8, 4]));
        assert!(!is_block_linear("model.layers.0.input_layernorm.weight", &[576]));
        assert!(!is_block_linear("model.embed_tokens.weight", &[49152, 576]));
        assert!(!is_block_linear("lm_head.weight", &[49152, 576]));
        assert!(!is_block_linear("model.layers.0.self_attn.q_proj.bias", &[576, 1]));
        assert!(!is_block_linear("model.layers.x.mlp.up_proj.weight", &[4, 4]));
    }

    #[test]
    fn only_vocabulary_matrices_may_change_shape_and_only_their_rows() {
        assert!(replaces_shape("model.norm.weight", &[576], &[576]));
        assert!(!replaces_shape("model.norm.weight", &[576], &[577]));
        assert!(replaces_shape("model.embed_tokens.weight", &[49152, 576], &[49155, 576]));
        assert!(replaces_shape("lm_head.weight", &[32000, 64], &[31999, 64]));
        assert!(!replaces_shape("model.embed_tokens.weight", &[49152, 576], &[49152, 577]));
        assert!(!replaces_shape("model.embed_tokens.weight", &[49152, 576], &[49152 * 576]));
        assert!(!replaces_shape("model.layers.0.mlp.up_proj.weight", &[1536, 576], &[1537, 576]));
    }

    #[test]
    fn side_files_and_sizes() {
        assert!(is_side_file("config.json"));
        assert!(is_side_file("tokenizer.model"));
        assert!(!is_side_file("model.safetensors.index.json"));
        assert!(!is_side_file("model-00001-of-00002.safetensors"));
        assert!(!is_side_file(".model.safetensors.tmp-1-0"));
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("200 MB"), Some(200_000_000));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("5 parsecs"), None);
        assert_eq!(parse_size("GB"), None);
    }
}

/// Writes the tensors of `plan` as a Hugging Face checkpoint into folder `dir`: one
/// `model.safetensors` if the data fits in `max_shard_bytes`, otherwise
/// `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`.
/// `fill` is called once per tensor, in file order, and returns its bytes. Returns the files
/// written.
pub fn write_model_folder<'a, E: From<FormatError>>(
    dir: &Path,
    mut plan: Vec<crate::safetensors::TensorPlan>,
    max_shard_bytes: u64,
    mut fill: impl FnMut(&crate::safetensors::TensorPlan) -> std::result::Result<std::borrow::Cow<'a, [u8]>, E>,
) -> std::result::Result<Vec<PathBuf>, E> {
    use crate::safetensors::SafetensorsWriter;
    plan.sort_by(|a, b| a.name.cmp(&b.name));
    let mut shards: Vec<Vec<crate::safetensors::TensorPlan>> = vec![Vec::new()];
    let mut current = 0u64;
    let mut total = 0u64;
    for t in plan {
        let len = t.byte_len().ok_or_else(|| FormatError::ShapeOverflow {
            name: t.name.clone(),
            shape: crate::dtype::shape_string(&t.shape),
        })? as u64;
        if current > 0 && current + len > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += len;
        total += len;
        shards.last_mut().expect("at least one shard").push(t);
    }
    let n = shards.len();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut written = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (k, shard) in shards.into_iter().enumerate() {
        let name = if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", k + 1, n) };
        let path = dir.join(&name);
        for t in &shard {
            weight_map.insert(t.name.clone(), name.clone());
        }
        let mut w = SafetensorsWriter::create(&path, shard, metadata.clone(), None, false)?;
        for t in w.order().to_vec() {
            let bytes = fill(&t)?;
            w.write_tensor(&t.name, &bytes)?;
        }
        w.finish()?;
        written.push(path);
    }
    if n > 1 {
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = dir.join(SHARD_INDEX);
        let mut f = crate::atomic::AtomicFile::create(&path, false)?;
        let text = serde_json::to_string_pretty(&index).expect("index serialises");
        std::io::Write::write_all(f.file(), text.as_bytes()).map_err(|e| FormatError::io(&path, e))?;
        f.commit()?;
        written.push(path);
    }
    Ok(written)
}
