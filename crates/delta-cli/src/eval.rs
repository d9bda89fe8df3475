//! `bitdelta eval`: measure a model (optionally with a delta applied) on real data.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use delta_format::{Checkpoint, DeltaArtifact};
use delta_models::perplexity::{perplexity, token_stream};
use delta_models::{CpuBackend, Llama, ModelConfig, Tokenizer, Weights};

use crate::ui;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DeltaUseArg {
    Merge,
    Fused,
}

#[derive(clap::Subcommand)]
pub enum Command {
    Ppl(PplArgs),
}

/// Perplexity of a model on a text file.
///
/// Protocol (the one of the fixtures' results.json): the text is split on `<|endoftext|>`, each
/// piece is stripped (empty ones skipped), encoded without special tokens and followed by token 0;
/// the pieces are concatenated; non-overlapping windows of WINDOW + 1 tokens step by WINDOW and a
/// last partial window is dropped; ppl = exp(mean negative log-likelihood of the WINDOW predicted
/// tokens of every window). Computed in f32 on the CPU.
#[derive(clap::Args)]
pub struct PplArgs {
    /// Model folder (Hugging Face layout); with --delta, the base the delta was made for.
    #[arg(long)]
    model: PathBuf,
    /// A .bitdelta.safetensors artifact to apply to the model first (checked against its base).
    #[arg(long)]
    delta: Option<PathBuf>,
    /// How the delta enters the model: `merge` rounds W_base + Δ̂ to the base dtype exactly as
    /// `bitdelta apply` writes it; `fused` keeps the signs packed (DeltaLinear) and adds the delta
    /// term in f32, unrounded. They differ measurably when scales are near the dtype's precision.
    #[arg(long, value_enum, default_value_t = DeltaUseArg::Merge)]
    delta_use: DeltaUseArg,
    /// The text to evaluate (UTF-8).
    #[arg(long)]
    text: PathBuf,
    /// Tokens predicted per window.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    window: u32,
    /// Windows per forward pass (more is faster, uses more memory).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    batch: u32,
    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Ppl(a) => ppl(a),
    }
}

fn ppl(a: PplArgs) -> Result<()> {
    let started = Instant::now();
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let ckpt = Checkpoint::open(&a.model).context("reading the model")?;
    let delta = a.delta.as_deref().map(|p| DeltaArtifact::open(p).context("reading the delta")).transpose()?;
    let cfg = ModelConfig::load(&a.model)?;
    let tok = Tokenizer::load(&a.model)?;
    let mut weights = Weights::<CpuBackend>::new(&ckpt, delta.as_ref(), Default::default())
        .with_context(|| format!("applying {}", a.delta.as_deref().unwrap_or(std::path::Path::new("")).display()))?;
    if let DeltaUseArg::Fused = a.delta_use {
        weights = weights.fused();
    }
    let model = Llama::load(cfg, &weights)?;
    let ids = token_stream(&tok, &text)?;
    let windows = ids.len().saturating_sub(1) / a.window as usize;
    let bar = ui::progress(windows as u64, "ppl", false, a.json);
    let r = perplexity(&model, &ids, a.window as usize, a.batch as usize, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let tokens_per_s = r.predicted_tokens as f64 / seconds;
    if a.json {
        let out = serde_json::json!({
            "model": a.model, "delta": a.delta, "text": a.text,
            "delta_use": match a.delta_use { DeltaUseArg::Merge => "merge", DeltaUseArg::Fused => "fused" },
            "ppl": r.ppl, "mean_nll": r.mean_nll, "windows": r.windows, "predicted_tokens": r.predicted_tokens,
            "window": a.window, "seconds": seconds, "tokens_per_second": tokens_per_s,
        });
        println!("{out}");
    } else {
        println!(
            "perplexity {:.4} (mean NLL {:.5}) over {} windows x {} tokens of {} — {seconds:.1} s, {tokens_per_s:.0} tokens/s",
            r.ppl,
            r.mean_nll,
            r.windows,
            a.window,
            a.text.display()
        );
    }
    Ok(())
}
