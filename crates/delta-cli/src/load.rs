//! Loading a model for `eval` and `generate`: a folder, or a base with a delta (merged or fused).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use delta_format::{Checkpoint, DeltaArtifact};
use delta_models::{CpuBackend, Llama, ModelConfig, Tokenizer, Weights};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DeltaUseArg {
    Merge,
    Fused,
}

impl DeltaUseArg {
    pub fn name(self) -> &'static str {
        match self {
            DeltaUseArg::Merge => "merge",
            DeltaUseArg::Fused => "fused",
        }
    }
}

/// The model arguments `eval` and `generate` share.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Model folder (Hugging Face layout); with --delta, the base the delta was made for.
    #[arg(long)]
    pub model: PathBuf,
    /// A .bitdelta.safetensors artifact to apply to the model first (checked against its base).
    #[arg(long)]
    pub delta: Option<PathBuf>,
    /// How the delta enters the model: `merge` rounds W_base + Δ̂ to the base dtype exactly as
    /// `bitdelta apply` writes it; `fused` keeps the signs packed (DeltaLinear) and adds the delta
    /// term in f32, unrounded. They differ measurably when scales are near the dtype's precision.
    #[arg(long, value_enum, default_value_t = DeltaUseArg::Merge)]
    pub delta_use: DeltaUseArg,
}

pub struct Loaded {
    pub model: Llama<CpuBackend>,
    pub tokenizer: Tokenizer,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Loaded> {
        let ckpt = Checkpoint::open(&self.model).context("reading the model")?;
        let delta = self.delta.as_deref().map(|p| DeltaArtifact::open(p).context("reading the delta")).transpose()?;
        let cfg = ModelConfig::load(&self.model)?;
        let tokenizer = Tokenizer::load(&self.model)?;
        let mut weights = Weights::<CpuBackend>::new(&ckpt, delta.as_ref(), Default::default())
            .with_context(|| format!("applying {}", self.delta.as_deref().unwrap_or(Path::new("")).display()))?;
        if let DeltaUseArg::Fused = self.delta_use {
            weights = weights.fused();
        }
        let model = Llama::load(cfg, &weights)?;
        Ok(Loaded { model, tokenizer })
    }
}
