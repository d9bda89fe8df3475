//! `delta-models`: Llama-family models (Llama 2/3, Mistral, Qwen2, Qwen3) in Burn, built from a
//! Hugging Face `config.json` + safetensors (single or sharded; bf16, f16 or f32), optionally
//! with a bitdelta artifact applied, plus the tokenizer and the perplexity protocol.
//!
//! - [`config`]: `ModelConfig`, deserialised from `config.json`.
//! - [`weights`]: `Weights` — a checkpoint, or base + artifact merged on load.
//! - [`llama`]: the model, with a staged forward (embed, block i, head) for calibration.
//! - [`tokenizer`], [`perplexity`].
//!
//! Not yet here (issue #5): `DeltaLinear` (the delta term without a dense Δ), KV cache and
//! generation, and reference logits for the other architectures.

pub mod config;
pub mod error;
pub mod llama;
pub mod perplexity;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use error::ModelError;
pub use llama::Llama;
pub use tokenizer::Tokenizer;
pub use weights::Weights;

/// The CPU backend every build has.
pub type CpuBackend = burn::backend::NdArray<f32>;
