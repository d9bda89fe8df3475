//! The bitdelta artifact (`NAME.bitdelta.safetensors`): reading with full validation, and writing.
//!
//! FORMAT.md at the repository root is the normative description; in short, for each compressed
//! weight `P` there are `P.sign` (U32 `[out, ceil(in/32)]`) and `P.scale` (F32, laid out by the
//! weight's scale mode); changed tensors that are not compressed are stored whole under their own
//! name; unchanged tensors are absent. `__metadata__` carries the format name and version, the
//! producer, the architecture, the mode table (`weights`), the base fingerprint (`base`), side
//! files that differ from the base's (`files`) and a content digest over everything else.
//!
//! [`DeltaArtifact::open`] returns an artifact only if every rule holds, and otherwise the
//! [`FormatError`] variant of the first rule broken.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{FileBytes, SafetensorsFile};
use crate::dtype::{shape_string, DType};
use crate::error::{FormatError, Result};
use crate::fingerprint::BaseFingerprint;
use crate::safetensors::{content_digest, SafetensorsHeader, SafetensorsWriter, TensorPlan, TensorView};
use crate::scale::ScaleMode;
use crate::sign::{words_per_row, SignMask};

pub const FORMAT_NAME: &str = "bitdelta";
pub const FORMAT_VERSION: u32 = 1;
pub const FILE_SUFFIX: &str = ".bitdelta.safetensors";
pub const SIGN_SUFFIX: &str = ".sign";
pub const SCALE_SUFFIX: &str = ".scale";
pub const DIGEST_KEY: &str = "content_digest";

mod key {
    pub const FORMAT: &str = "format";
    pub const VERSION: &str = "format_version";
    pub const PRODUCER: &str = "producer";
    pub const ARCHITECTURE: &str = "architecture";
    pub const WEIGHTS: &str = "weights";
    pub const BASE: &str = "base";
    pub const FILES: &str = "files";
    pub const RESERVED: [&str; 8] = [FORMAT, VERSION, PRODUCER, ARCHITECTURE, WEIGHTS, BASE, FILES, super::DIGEST_KEY];
}

/// A side file of the fine-tuned model folder (config, tokenizer, ...) that differs from the
/// base's, carried so that `apply` reproduces the fine-tune's folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SideFile {
    Utf8(String),
    Base64(String),
}

impl SideFile {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        match String::from_utf8(bytes) {
            Ok(s) => SideFile::Utf8(s),
            Err(e) => SideFile::Base64(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())),
        }
    }

    pub fn to_bytes(&self) -> std::result::Result<Vec<u8>, String> {
        match self {
            SideFile::Utf8(s) => Ok(s.clone().into_bytes()),
            SideFile::Base64(b) => base64::engine::general_purpose::STANDARD.decode(b).map_err(|e| e.to_string()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightEntry {
    mode: String,
    shape: [usize; 2],
}

/// Everything in `__metadata__`, decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct ArtifactMetadata {
    pub producer: String,
    pub architecture: String,
    /// Compressed weights: name -> (mode, `[out, in]`).
    pub weights: BTreeMap<String, (ScaleMode, [usize; 2])>,
    pub base: BaseFingerprint,
    pub files: BTreeMap<String, SideFile>,
    /// Any other metadata entries (e.g. `compression`, a JSON summary of how it was made).
    pub notes: BTreeMap<String, String>,
}

/// One compressed weight, borrowed from an artifact or owned by a producer.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressedWeight<'a> {
    pub name: Cow<'a, str>,
    pub mode: ScaleMode,
    pub signs: SignMask<'a>,
    pub scales: Cow<'a, [f32]>,
}

impl CompressedWeight<'_> {
    pub fn rows(&self) -> usize {
        self.signs.rows()
    }

    pub fn cols(&self) -> usize {
        self.signs.cols()
    }
}

/// A validated artifact, memory-mapped.
pub struct DeltaArtifact {
    file: SafetensorsFile,
    meta: ArtifactMetadata,
}

impl DeltaArtifact {
    /// Opens and validates an artifact file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let meta = validate(&file.header, &file.bytes).map_err(|e| e.in_file(path))?;
        Ok(DeltaArtifact { file, meta })
    }

    /// Validates an artifact held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let header = SafetensorsHeader::parse(&bytes)?;
        let meta = validate(&header, &bytes)?;
        Ok(DeltaArtifact { file: SafetensorsFile { path: PathBuf::new(), bytes: FileBytes::Owned(bytes), header }, meta })
    }

    pub fn metadata(&self) -> &ArtifactMetadata {
        &self.meta
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Size of the artifact in bytes.
    pub fn file_len(&self) -> usize {
        self.file.bytes.len()
    }

    /// The header (tensor table) as parsed.
    pub fn header(&self) -> &SafetensorsHeader {
        &self.file.header
    }

    /// The compressed weight `name` (its HF weight name, e.g. `model.layers.0.mlp.up_proj.weight`).
    pub fn weight(&self, name: &str) -> Option<CompressedWeight<'_>> {
        let (name, &(mode, [rows, cols])) = self.meta.weights.get_key_value(name)?;
        let sign = self.tensor(&format!("{name}{SIGN_SUFFIX}")).expect("validated");
        let scale = self.tensor(&format!("{name}{SCALE_SUFFIX}")).expect("validated");
        let signs = SignMask::new(rows, cols, sign.as_u32().expect("validated U32")).expect("validated shape");
        Some(CompressedWeight { name: Cow::Borrowed(name), mode, signs, scales: scale.as_f32().expect("validated F32") })
    }

    /// All compressed weights, by name.
    pub fn weights(&self) -> impl Iterator<Item = CompressedWeight<'_>> {
        self.meta.weights.keys().map(|n| self.weight(n).expect("listed"))
    }

    /// Tensors stored whole (changed but not compressed), by name.
    pub fn whole_tensors(&self) -> impl Iterator<Item = (&str, TensorView<'_>)> {
        self.file
            .header
            .tensors()
            .iter()
            .filter(|t| owner_weight(&t.name, &self.meta.weights).is_none())
            .map(|t| (t.name.as_str(), self.file.view(t)))
    }

    pub fn whole_tensor(&self, name: &str) -> Option<TensorView<'_>> {
        if self.meta.weights.contains_key(name) || owner_weight(name, &self.meta.weights).is_some() {
            return None;
        }
        self.tensor(name)
    }

    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.file.header.info(name).map(|i| self.file.view(i))
    }
}

/// The compressed weight a `.sign` / `.scale` tensor belongs to, if any.
fn owner_weight<'m>(tensor: &str, weights: &'m BTreeMap<String, (ScaleMode, [usize; 2])>) -> Option<&'m str> {
    for suffix in [SIGN_SUFFIX, SCALE_SUFFIX] {
        if let Some(w) = tensor.strip_suffix(suffix) {
            if let Some((k, _)) = weights.get_key_value(w) {
                return Some(k);
            }
        }
    }
    None
}

fn meta_json<T: serde::de::DeserializeOwned>(md: &BTreeMap<String, String>, key: &'static str) -> Result<T> {
    let text = md.get(key).ok_or(FormatError::MissingMetadata { key })?;
    serde_json::from_str(text).map_err(|e| FormatError::BadArtifactMetadata { key, reason: e.to_string() })
}

fn validate(header: &SafetensorsHeader, bytes: &[u8]) -> Result<ArtifactMetadata> {
    let md = header.metadata();
    let format = md.get(key::FORMAT);
    if format.map(String::as_str) != Some(FORMAT_NAME) {
        return Err(FormatError::NotAnArtifact { found: format.cloned() });
    }
    let version = md.get(key::VERSION).ok_or(FormatError::MissingMetadata { key: key::VERSION })?;
    if version.parse::<u32>().ok() != Some(FORMAT_VERSION) {
        return Err(FormatError::UnsupportedVersion { found: version.clone(), supported: FORMAT_VERSION });
    }
    let stored = md.get(DIGEST_KEY).ok_or(FormatError::MissingMetadata { key: DIGEST_KEY })?;
    let computed = content_digest(header, bytes, DIGEST_KEY);
    if *stored != computed {
        return Err(FormatError::DigestMismatch { stored: stored.clone(), computed });
    }
    let producer = md.get(key::PRODUCER).ok_or(FormatError::MissingMetadata { key: key::PRODUCER })?.clone();
    let architecture = md.get(key::ARCHITECTURE).ok_or(FormatError::MissingMetadata { key: key::ARCHITECTURE })?.clone();
    let raw_weights: BTreeMap<String, WeightEntry> = meta_json(md, key::WEIGHTS)?;
    let base: BaseFingerprint = meta_json(md, key::BASE)?;
    base.validate().map_err(|reason| FormatError::BadArtifactMetadata { key: key::BASE, reason })?;
    let files: BTreeMap<String, SideFile> = match md.get(key::FILES) {
        Some(_) => meta_json(md, key::FILES)?,
        None => BTreeMap::new(),
    };
    for (name, f) in &files {
        if !crate::checkpoint::is_side_file(name) || name.contains('/') || name.contains('\\') {
            return Err(FormatError::BadArtifactMetadata { key: key::FILES, reason: format!("`{name}` is not a plain side-file name") });
        }
        f.to_bytes().map_err(|e| FormatError::BadArtifactMetadata { key: key::FILES, reason: format!("`{name}`: {e}") })?;
    }

    let mut weights = BTreeMap::new();
    for (name, entry) in raw_weights {
        let mode: ScaleMode = entry.mode.parse().map_err(|_| FormatError::UnknownScaleMode { name: name.clone(), mode: entry.mode.clone() })?;
        let [rows, cols] = entry.shape;
        let Some(b) = base.tensors.get(&name) else {
            return Err(FormatError::BadArtifactMetadata { key: key::WEIGHTS, reason: format!("`{name}` is not a tensor of the base") });
        };
        if b.shape != entry.shape {
            return Err(FormatError::TensorShape { name, expected: shape_string(&b.shape), found: shape_string(&entry.shape) });
        }
        if !base.dtype(&name).is_some_and(DType::is_weight_float) {
            return Err(FormatError::BadArtifactMetadata { key: key::WEIGHTS, reason: format!("`{name}` is {} in the base, not a float weight", b.dtype) });
        }
        let sign_name = format!("{name}{SIGN_SUFFIX}");
        let scale_name = format!("{name}{SCALE_SUFFIX}");
        let sign = expect_tensor(header, &sign_name, DType::U32, &[rows, words_per_row(cols)])?;
        let scale_len = mode.scale_len(rows, cols).ok_or_else(|| FormatError::ShapeOverflow { name: scale_name.clone(), shape: "?".into() })?;
        let scale = expect_tensor(header, &scale_name, DType::F32, &[scale_len])?;
        let mask = SignMask::new(rows, cols, header.view(bytes, sign).as_u32().expect("U32")).expect("shape checked");
        if let Some(row) = mask.first_bad_padding() {
            return Err(FormatError::NonZeroPadding { name: sign_name, row, cols });
        }
        if let Some((index, value)) = header.view(bytes, scale).first_non_finite() {
            return Err(FormatError::NonFinite { name: scale_name, index, value });
        }
        weights.insert(name, (mode, entry.shape));
    }

    for info in header.tensors() {
        if owner_weight(&info.name, &weights).is_some() {
            continue;
        }
        let Some(b) = base.tensors.get(&info.name).filter(|_| !weights.contains_key(&info.name)) else {
            return Err(FormatError::UnexpectedTensor { name: info.name.clone() });
        };
        if !crate::checkpoint::replaces_shape(&info.name, &b.shape, &info.shape) {
            return Err(FormatError::TensorShape { name: info.name.clone(), expected: shape_string(&b.shape), found: shape_string(&info.shape) });
        }
        let base_dtype = base.dtype(&info.name).expect("validated fingerprint");
        if base_dtype != info.dtype {
            return Err(FormatError::TensorDType { name: info.name.clone(), expected: base_dtype, found: info.dtype });
        }
        if let Some((index, value)) = header.view(bytes, info).first_non_finite() {
            return Err(FormatError::NonFinite { name: info.name.clone(), index, value });
        }
    }

    let notes = md.iter().filter(|(k, _)| !key::RESERVED.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    Ok(ArtifactMetadata { producer, architecture, weights, base, files, notes })
}

fn expect_tensor<'h>(header: &'h SafetensorsHeader, name: &str, dtype: DType, shape: &[usize]) -> Result<&'h crate::safetensors::TensorInfo> {
    let info = header.info(name).ok_or_else(|| FormatError::MissingTensor { name: name.to_string() })?;
    if info.dtype != dtype {
        return Err(FormatError::TensorDType { name: name.to_string(), expected: dtype, found: info.dtype });
    }
    if info.shape != shape {
        return Err(FormatError::TensorShape { name: name.to_string(), expected: shape_string(shape), found: shape_string(&info.shape) });
    }
    Ok(info)
}

/// What an artifact is made of, for [`write_artifact`].
pub struct ArtifactContents<'a> {
    pub producer: String,
    pub architecture: String,
    pub base: &'a BaseFingerprint,
    pub weights: &'a [CompressedWeight<'a>],
    /// Changed tensors stored whole, with their data (usually borrowed from the fine-tune's mmap).
    pub whole: Vec<(String, TensorView<'a>)>,
    pub files: BTreeMap<String, SideFile>,
    pub notes: BTreeMap<String, String>,
}

/// Writes an artifact atomically, streaming tensor by tensor. Returns its size in bytes.
pub fn write_artifact(path: &Path, c: &ArtifactContents<'_>, overwrite: bool) -> Result<u64> {
    let mut md = c.notes.clone();
    md.retain(|k, _| !key::RESERVED.contains(&k.as_str()));
    md.insert(key::FORMAT.into(), FORMAT_NAME.into());
    md.insert(key::VERSION.into(), FORMAT_VERSION.to_string());
    md.insert(key::PRODUCER.into(), c.producer.clone());
    md.insert(key::ARCHITECTURE.into(), c.architecture.clone());
    let table: BTreeMap<&str, WeightEntry> = c
        .weights
        .iter()
        .map(|w| (w.name.as_ref(), WeightEntry { mode: w.mode.name().into(), shape: [w.rows(), w.cols()] }))
        .collect();
    md.insert(key::WEIGHTS.into(), serde_json::to_string(&table).expect("serialises"));
    md.insert(key::BASE.into(), serde_json::to_string(c.base).expect("serialises"));
    if !c.files.is_empty() {
        md.insert(key::FILES.into(), serde_json::to_string(&c.files).expect("serialises"));
    }

    enum Source<'s> {
        Sign(&'s SignMask<'s>),
        Scale(&'s [f32]),
        Whole(&'s [u8]),
    }
    let mut plan = Vec::new();
    let mut sources: BTreeMap<String, Source<'_>> = BTreeMap::new();
    for w in c.weights {
        let sign = format!("{}{SIGN_SUFFIX}", w.name);
        let scale = format!("{}{SCALE_SUFFIX}", w.name);
        plan.push(TensorPlan::new(sign.clone(), DType::U32, vec![w.rows(), w.signs.words_per_row()]));
        plan.push(TensorPlan::new(scale.clone(), DType::F32, vec![w.scales.len()]));
        sources.insert(sign, Source::Sign(&w.signs));
        sources.insert(scale, Source::Scale(&w.scales));
    }
    for (name, view) in &c.whole {
        plan.push(TensorPlan::new(name.clone(), view.dtype, view.shape.to_vec()));
        sources.insert(name.clone(), Source::Whole(view.data));
    }
    let mut writer = SafetensorsWriter::create(path, plan, md, Some(DIGEST_KEY), overwrite)?;
    for t in writer.order().to_vec() {
        let bytes: Cow<'_, [u8]> = match sources.remove(&t.name).expect("planned tensor has a source") {
            Source::Sign(m) => Cow::Owned(m.words().iter().flat_map(|x| x.to_le_bytes()).collect()),
            Source::Scale(s) => Cow::Owned(s.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Source::Whole(d) => Cow::Borrowed(d),
        };
        writer.write_tensor(&t.name, &bytes)?;
    }
    writer.finish()
}
