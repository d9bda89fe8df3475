//! `delta-format`: the on-disk side of bitdelta-rs.
//!
//! - [`artifact`]: the `.bitdelta.safetensors` artifact (FORMAT.md is its normative spec) —
//!   reading with one typed error per broken rule, and writing.
//! - [`sign`], [`scale`]: how sign masks are packed and how scales are laid out per mode.
//! - [`fingerprint`]: the base fingerprint that ties an artifact to the base it was made for.
//! - [`checkpoint`]: Hugging Face model folders (single or sharded safetensors) over mmap, and
//!   which of their tensors are block linears (the weights a delta compresses).
//! - [`safetensors`]: the container itself — a zero-copy validating parser and the one
//!   streaming writer every file goes through.
//! - [`atomic`]: temp-file-and-rename output, so no half-written file ever has its final name.
//!
//! This crate does no arithmetic on weights and never depends on Burn.

pub mod artifact;
pub mod atomic;
pub mod checkpoint;
pub mod dtype;
pub mod error;
pub mod fingerprint;
pub mod safetensors;
pub mod scale;
pub mod sign;

pub use artifact::{write_artifact, ArtifactContents, ArtifactMetadata, CompressedWeight, DeltaArtifact, SideFile};
pub use checkpoint::Checkpoint;
pub use dtype::DType;
pub use error::{FormatError, Result};
pub use fingerprint::BaseFingerprint;
pub use safetensors::{TensorPlan, TensorView};
pub use scale::ScaleMode;
pub use sign::SignMask;
