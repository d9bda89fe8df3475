//! Loading a model for `eval` and `generate`: a folder, or a base with a delta (merged or fused),
//! on the backend `--device` names.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use delta_format::{Checkpoint, DeltaArtifact};
use delta_models::chat::ChatTemplate;
use delta_models::{CpuBackend, Llama, ModelConfig, ModelFiles, Tokenizer, Weights};

/// Where a model runs.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DeviceArg {
    /// Burn's NdArray backend with this project's CPU kernels.
    Cpu,
    /// Burn's wgpu backend (Vulkan, Metal, DX12) with the CubeCL delta kernels; needs a build
    /// with `--features wgpu`.
    Wgpu,
    /// Burn's CUDA backend with the CubeCL delta kernels; needs a build with `--features cuda`.
    Cuda,
}

impl DeviceArg {
    pub fn name(self) -> &'static str {
        match self {
            DeviceArg::Cpu => "cpu",
            DeviceArg::Wgpu => "wgpu",
            DeviceArg::Cuda => "cuda",
        }
    }

    /// An error saying how to get this backend, when this build lacks it.
    pub fn check(self) -> Result<()> {
        let built = match self {
            DeviceArg::Cpu => true,
            DeviceArg::Wgpu => cfg!(feature = "wgpu"),
            DeviceArg::Cuda => cfg!(feature = "cuda"),
        };
        anyhow::ensure!(
            built,
            "this bitdelta was built without the {0} backend (--device {0}): build it with `cargo build --release -p delta-cli --features {0}`",
            self.name()
        );
        Ok(())
    }
}

/// A command body that runs on any backend.
pub trait OnDevice {
    fn run<B: Backend>(self, device: B::Device) -> Result<()>;
}

/// Runs `job` on the backend `device` names (its default device); a GPU backend this build
/// lacks is an error saying how to get it.
pub fn on_device(device: DeviceArg, job: impl OnDevice) -> Result<()> {
    device.check()?;
    match device {
        #[cfg(feature = "wgpu")]
        DeviceArg::Wgpu => job.run::<delta_models::cube::WgpuBackend>(start::<delta_models::cube::WgpuBackend>(device)?),
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda => job.run::<delta_models::cube::CudaBackend>(start::<delta_models::cube::CudaBackend>(device)?),
        // The CPU: the check above refused every backend this build lacks.
        _ => job.run::<CpuBackend>(Default::default()),
    }
}

/// The backend's default device, started with one tiny tensor: a GPU runtime that cannot start
/// (no driver library, no adapter) panics inside its own threads, which here becomes a one-line
/// error naming the device and the runtime's reason instead of a panic and a backtrace.
#[allow(dead_code)] // only the GPU features call it
fn start<B: Backend>(device: DeviceArg) -> Result<B::Device> {
    use std::sync::{Arc, Mutex};
    let why = Arc::new(Mutex::new(None::<String>));
    let seen = why.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info.payload().downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| info.payload().downcast_ref::<String>().cloned());
        let mut first = seen.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = text;
        }
    }));
    let d = B::Device::default();
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // CubeCL reads its configuration here (a malformed `cubecl.toml` panics).
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        delta_models::cube::autotune_results_in_the_user_cache();
        burn::tensor::Tensor::<B, 1>::zeros([1], &d).into_data()
    }));
    std::panic::set_hook(previous);
    if started.is_ok() {
        return Ok(d);
    }
    let why = why.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_else(|| "the runtime failed".into());
    // The runtime's first sentence (cudarc appends every library name it tried).
    let short = why.split(" - ").next().unwrap_or(&why).lines().next().unwrap_or("").chars().take(300).collect::<String>();
    anyhow::bail!("--device {}: the GPU backend could not start: {short}", device.name())
}

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
    /// Where the model runs: `cpu`, or a GPU through `wgpu` (Vulkan, Metal, DX12) or `cuda`
    /// (those need a bitdelta built with `--features wgpu` / `--features cuda`).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

pub struct Loaded<B: Backend> {
    pub model: Llama<B>,
    pub tokenizer: Tokenizer,
    /// The model folder and the delta applied, for the side files read on demand.
    dir: PathBuf,
    delta: Option<DeltaArtifact>,
}

impl<B: Backend> Loaded<B> {
    /// The chat template: the delta's where it ships one, else the model folder's.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        Ok(ChatTemplate::load(ModelFiles::with_delta(&self.dir, self.delta.as_ref()))?)
    }
}

impl ModelArgs {
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Loaded<B>> {
        let ckpt = Checkpoint::open(&self.model).context("reading the model")?;
        let delta = self.delta.as_deref().map(|p| DeltaArtifact::open(p).context("reading the delta")).transpose()?;
        // With a delta, the fine-tune's own config and tokenizer where it ships them.
        let files = ModelFiles::with_delta(&self.model, delta.as_ref());
        let cfg = ModelConfig::load(files)?;
        let tokenizer = Tokenizer::load(files)?;
        let mut weights = Weights::<B>::new(&ckpt, delta.as_ref(), device.clone())
            .with_context(|| format!("applying {}", self.delta.as_deref().unwrap_or(Path::new("")).display()))?
            .bf16_on_host();
        if let DeltaUseArg::Fused = self.delta_use {
            weights = weights.fused();
        }
        let model = Llama::load(cfg, &weights)?;
        Ok(Loaded { model, tokenizer, dir: self.model.clone(), delta })
    }
}
