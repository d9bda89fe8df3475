use delta_format::{DType, FormatError};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("tensor `{name}`: dtype {dtype} is not a float weight type (BF16, F16 or F32)")]
    UnsupportedDType { name: String, dtype: DType },
    #[error("tensor `{name}`: shape {shape} is not a matrix")]
    NotAMatrix { name: String, shape: String },
    #[error("tensor `{name}`: base is {base}, other side is {other}")]
    DTypeMismatch { name: String, base: DType, other: DType },
    #[error("tensor `{name}`: base shape {base}, other side {other}")]
    ShapeMismatch { name: String, base: String, other: String },
    #[error("tensor `{name}`: {found} scales for mode {mode}, expected {expected}")]
    ScaleLen { name: String, mode: delta_format::ScaleMode, expected: usize, found: usize },
    #[error("batched delta product: {0}")]
    Batch(String),
    #[error(transparent)]
    Format(#[from] FormatError),
}
