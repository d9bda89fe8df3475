//! `bitdelta compress`: base + fine-tune -> `.bitdelta.safetensors`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::ValueEnum;
use delta_calib::{compress, CompressOptions, ScaleChoice};
use delta_format::checkpoint::Checkpoint;
use delta_format::ScaleMode;

use crate::ui;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScaleArg {
    /// Per matrix, the mode below with the smallest weight-space error ‖Δ − Δ̂‖² (until
    /// calibration lands, when the choice moves to held-out layer outputs).
    Auto,
    /// One scale per matrix (BitDelta).
    Scalar,
    /// One scale per output row.
    PerOutput,
    /// One scale per input column.
    PerInput,
    /// A row scale times a column scale, v[i]·u[j].
    TwoSided,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CalibrateArg {
    /// Scales from the weights alone: the mean of |Δ| over each scale's span.
    None,
}

/// Compress a fine-tune into a 1-bit delta against its base.
///
/// Every linear weight inside the transformer blocks that changed is stored as the sign of
/// (fine-tune − base), one bit per weight, plus f32 scales; other changed tensors (norms,
/// biases, a changed embedding) are stored whole; unchanged tensors are not stored. The base's
/// fingerprint is recorded so the delta can only ever be applied to that base.
#[derive(clap::Args)]
pub struct Args {
    /// Base model folder (Hugging Face layout, single or sharded safetensors, bf16/f16/f32).
    #[arg(long)]
    base: PathBuf,
    /// Fine-tuned model folder, same architecture and tensor names as the base.
    #[arg(long)]
    finetuned: PathBuf,
    /// Artifact to write (conventionally NAME.bitdelta.safetensors).
    #[arg(short, long)]
    output: PathBuf,
    /// How each weight's scales are laid out.
    #[arg(long, value_enum, default_value_t = ScaleArg::Auto)]
    scale: ScaleArg,
    /// How scales are fitted. Layer-wise and end-to-end calibration are not available yet.
    #[arg(long, value_enum, default_value_t = CalibrateArg::None)]
    calibrate: CalibrateArg,
    /// Replace the output if it exists.
    #[arg(long)]
    force: bool,
    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let CalibrateArg::None = a.calibrate;
    let started = Instant::now();
    ui::check_output(&a.output, a.force)?;
    let base = Checkpoint::open(&a.base).context("reading the base model")?;
    let finetuned = Checkpoint::open(&a.finetuned).context("reading the fine-tuned model")?;
    let scale = match a.scale {
        ScaleArg::Auto => ScaleChoice::Auto,
        ScaleArg::Scalar => ScaleChoice::Fixed(ScaleMode::Scalar),
        ScaleArg::PerOutput => ScaleChoice::Fixed(ScaleMode::PerOutput),
        ScaleArg::PerInput => ScaleChoice::Fixed(ScaleMode::PerInput),
        ScaleArg::TwoSided => ScaleChoice::Fixed(ScaleMode::TwoSided),
    };
    let options = CompressOptions { scale, ..CompressOptions::default() };
    let bar = ui::progress(base.len() as u64, "compress", false, a.json);
    let c = compress(&base, &finetuned, &options, &mut |done, _, name| {
        bar.set_position(done as u64);
        bar.set_message(name.to_string());
    })?;
    bar.finish_and_clear();
    let bytes = c.write(&a.output, &finetuned, a.force)?;
    let seconds = started.elapsed().as_secs_f64();

    let (_, bf16_bytes) = c.base.model_bytes();
    let ratio = bf16_bytes as f64 / bytes as f64;
    let errors: Vec<f64> = c.reports.iter().map(|r| r.rel_error).collect();
    let mean_err = errors.iter().sum::<f64>() / errors.len().max(1) as f64;
    let max_err = errors.iter().cloned().fold(0.0, f64::max);
    if a.json {
        let out = serde_json::json!({
            "output": a.output,
            "bytes": bytes,
            "finetuned_bf16_bytes": bf16_bytes,
            "ratio": ratio,
            "scale": scale.name(),
            "calibration": "none",
            "modes": c.mode_counts(),
            "compressed": c.weights.len(),
            "whole": c.whole,
            "unchanged": c.unchanged.len(),
            "side_files": c.files.keys().collect::<Vec<_>>(),
            "mean_rel_error": mean_err,
            "max_rel_error": max_err,
            "seconds": seconds,
            "weights": c.reports,
        });
        println!("{out}");
    } else {
        let modes: Vec<String> = c.mode_counts().iter().map(|(m, n)| format!("{n} {m}")).collect();
        println!(
            "compressed {} weights ({}), {} tensors stored whole, {} unchanged",
            c.weights.len(),
            modes.join(", "),
            c.whole.len(),
            c.unchanged.len()
        );
        println!("weight-space error ‖Δ − Δ̂‖/‖Δ‖: mean {mean_err:.3}, max {max_err:.3}");
        println!(
            "wrote {} ({}; the bf16 fine-tune is {}, {ratio:.1}x larger) in {seconds:.1} s",
            a.output.display(),
            ui::size(bytes),
            ui::size(bf16_bytes)
        );
    }
    Ok(())
}
