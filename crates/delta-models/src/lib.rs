//! `delta-models`: Llama-family models (Llama 2/3, Mistral, Qwen2, Qwen3) in Burn, built from a
//! Hugging Face `config.json` + safetensors (single or sharded; bf16, f16 or f32), optionally
//! with a bitdelta artifact applied, plus the tokenizer and the perplexity protocol.
//!
//! - [`config`]: `ModelConfig`, deserialised from `config.json`.
//! - [`weights`]: `Weights` — a checkpoint, or base + artifact, merged on load or kept packed.
//! - [`delta_linear`]: `DeltaLinear` — base weight + packed delta, forward without a dense Δ.
//! - [`cube`]: the GPU backends (`wgpu`, `cuda` features) and `DeltaLinear`'s kernels on them.
//! - [`llama`]: the model, with a staged forward (embed, block i, head) for calibration.
//! - [`multi`]: `Tenant` (a fine-tune resident as its packed delta over a shared base) and
//!   `step_batch` (sequences of different fine-tunes through one forward) — what `serve` runs.
//! - [`generate`]: greedy / temperature sampling over a KV cache.
//! - [`files`]: `ModelFiles` — a folder's side files, or a base's with a delta's shipped ones.
//! - [`tokenizer`] (with streaming detokenisation), [`chat`] (chat templates), [`perplexity`],
//!   [`tasks`] (zero-shot multiple-choice scoring).

pub mod chat;
pub mod config;
pub mod cube;
pub mod delta_linear;
pub mod error;
pub mod files;
pub mod generate;
pub mod host;
pub mod llama;
pub mod multi;
pub mod perplexity;
pub mod tasks;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use delta_linear::{delta_t, DeltaLinear, Projection, ScaledDelta};
pub use error::ModelError;
pub use files::ModelFiles;
pub use llama::{KvCache, Linear, Llama, WeightT};
pub use tokenizer::{TextStream, Tokenizer};
pub use weights::{DeltaUse, Weights};

/// The CPU backend every build has.
pub type CpuBackend = burn::backend::NdArray<f32>;

/// `t` as a tensor of backend `B`, when its backend `A` is `B` (`None` otherwise): how the CPU
/// and GPU fast paths ([`host`], [`cube`]) hand back a result computed on their concrete backend.
pub(crate) fn same_backend<A: burn::tensor::backend::Backend, B: burn::tensor::backend::Backend, const D: usize>(t: burn::tensor::Tensor<A, D>) -> Option<burn::tensor::Tensor<B, D>> {
    (Box::new(t) as Box<dyn std::any::Any>).downcast::<burn::tensor::Tensor<B, D>>().ok().map(|t| *t)
}
