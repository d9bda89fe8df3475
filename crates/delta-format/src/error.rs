//! One error type for everything this crate reads or writes, one variant per broken rule.
//!
//! Every message is a single line that names the file, tensor or key at fault and the
//! numbers involved, so a command-line user can act on it without a backtrace.

use std::io;
use std::path::PathBuf;

use crate::dtype::DType;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },

    // ---- safetensors container ----
    #[error("file is {len} bytes, too short for a safetensors header (needs at least 8)")]
    TooShort { len: usize },
    #[error("header length {header_len} is larger than the limit of {max} bytes (not a safetensors file?)")]
    HeaderTooLarge { header_len: u64, max: usize },
    #[error("header length {header_len} runs past the end of the {file_len}-byte file (truncated?)")]
    HeaderOutOfBounds { header_len: u64, file_len: usize },
    #[error("header is not valid JSON: {reason}")]
    HeaderNotJson { reason: String },
    #[error("tensor `{name}`: malformed header entry: {reason}")]
    BadTensorEntry { name: String, reason: String },
    #[error("tensor `{name}`: unknown dtype `{dtype}`")]
    UnknownDType { name: String, dtype: String },
    #[error("tensor `{name}`: shape {shape} has too many elements")]
    ShapeOverflow { name: String, shape: String },
    #[error("tensor `{name}`: data_offsets [{start}, {end}] span {span} bytes but dtype and shape need {expected}")]
    SizeMismatch { name: String, start: usize, end: usize, span: usize, expected: usize },
    #[error("tensor `{name}`: data_offsets [{start}, {end}] run past the {data_len}-byte data section (truncated?)")]
    OffsetOutOfBounds { name: String, start: usize, end: usize, data_len: usize },
    #[error("tensor `{name}` starts at byte {start} but the previous tensor ends at {expected}: tensors overlap or leave a gap")]
    OffsetNotContiguous { name: String, start: usize, expected: usize },
    #[error("data section is {data_len} bytes but tensors cover only {covered} (extra or missing bytes)")]
    DataNotCovered { covered: usize, data_len: usize },
    #[error("`__metadata__` must map strings to strings: {reason}")]
    BadMetadata { reason: String },

    // ---- bitdelta artifact ----
    #[error("not a bitdelta artifact: {}", match found {
        Some(f) => format!("metadata key `format` is {f:?}, expected \"bitdelta\""),
        None => "its metadata has no `format` key (a plain safetensors file?)".to_string(),
    })]
    NotAnArtifact { found: Option<String> },
    #[error("artifact format version {found:?} is not supported by this reader (it reads version {supported})")]
    UnsupportedVersion { found: String, supported: u32 },
    #[error("artifact metadata lacks the key `{key}`")]
    MissingMetadata { key: &'static str },
    #[error("artifact metadata `{key}` is malformed: {reason}")]
    BadArtifactMetadata { key: &'static str, reason: String },
    #[error("artifact content digest mismatch: stored {stored}, computed {computed} (file corrupted or edited)")]
    DigestMismatch { stored: String, computed: String },
    #[error("weight `{name}`: unknown scale mode `{mode}`")]
    UnknownScaleMode { name: String, mode: String },
    #[error("artifact lacks tensor `{name}`")]
    MissingTensor { name: String },
    #[error("artifact tensor `{name}` belongs to no weight of the mode table and to no base tensor")]
    UnexpectedTensor { name: String },
    #[error("tensor `{name}`: shape {found}, expected {expected}")]
    TensorShape { name: String, expected: String, found: String },
    #[error("tensor `{name}`: dtype {found}, expected {expected}")]
    TensorDType { name: String, expected: DType, found: DType },
    #[error("tensor `{name}`: row {row} has non-zero padding bits past column {cols}")]
    NonZeroPadding { name: String, row: usize, cols: usize },
    #[error("tensor `{name}`: value {value} at index {index} is not finite")]
    NonFinite { name: String, index: usize, value: f64 },

    // ---- base fingerprint ----
    #[error("wrong base: {reason} (this delta was made for another base model)")]
    BaseMismatch { reason: String },

    // ---- Hugging Face model folders ----
    #[error("{}: no model.safetensors or model.safetensors.index.json (is this a Hugging Face model folder?)", dir.display())]
    NotAModelFolder { dir: PathBuf },
    #[error("{}: {reason}", path.display())]
    BadShardIndex { path: PathBuf, reason: String },
    #[error("tensor `{name}` appears in two shards: {first} and {second}")]
    DuplicateTensor { name: String, first: String, second: String },
    #[error("{}: in {}", inner, path.display())]
    InFile { path: PathBuf, inner: Box<FormatError> },

    // ---- writing ----
    #[error("writer: expected tensor `{expected}` next, got `{found}`")]
    WriteOrder { expected: String, found: String },
    #[error("writer: tensor `{name}` needs {expected} bytes, got {found}")]
    WriteSize { name: String, expected: usize, found: usize },
    #[error("writer: {missing} planned tensor(s) were not written (first: `{first}`)")]
    WriteIncomplete { missing: usize, first: String },
    #[error("{} already exists (use --force to replace it)", path.display())]
    OutputExists { path: PathBuf },
}

impl FormatError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: io::Error) -> Self {
        FormatError::Io { path: path.into(), error }
    }

    /// Attaches the file a parse error came from.
    pub fn in_file(self, path: impl Into<PathBuf>) -> Self {
        match self {
            e @ (FormatError::Io { .. } | FormatError::InFile { .. }) => e,
            e => FormatError::InFile { path: path.into(), inner: Box::new(e) },
        }
    }
}

pub type Result<T, E = FormatError> = std::result::Result<T, E>;
