//! `bitdelta compress`: base + fine-tune -> `.bitdelta.safetensors`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::ValueEnum;
use delta_calib::{calibrate_layerwise, compress, CompressOptions, LayerwiseOptions, ScaleChoice, Solver};
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CalibrateArg {
    /// Scales from the weights alone: the mean of |Δ| over each scale's span.
    None,
    /// Then, layer by layer in forward order, least-squares fits of scalar, per-output and
    /// per-input scales to the fine-tune's layer outputs on calibration text (inputs from the
    /// already-calibrated compressed model); per layer the candidate with the lowest held-out
    /// output MSE is kept (with --scale auto; a fixed --scale fits only that mode).
    Layerwise,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SolverArg {
    Exact,
    Adamw,
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
    /// How scales are fitted (end-to-end distillation is not available yet).
    #[arg(long, value_enum, default_value_t = CalibrateArg::None)]
    calibrate: CalibrateArg,
    /// Calibration text (UTF-8). Default: text/c4.utf8 of the fixtures ($DELTA_FIXTURES, else
    /// ~/.cache/delta-fixtures), when present.
    #[arg(long)]
    calib_text: Option<PathBuf>,
    /// Calibration samples (consecutive token windows from the start of the text); the last 10%
    /// (at least one) are held out to choose each layer's mode.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(2..=100_000))]
    calib_samples: u32,
    /// Tokens per calibration sample.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    calib_len: u32,
    /// How layer-wise fits are solved: `exact` least squares (closed forms, normal equations), or
    /// `adamw`, the papers' loop (5 epochs, batches of 128 rows, --adamw-lr) for comparison.
    #[arg(long, value_enum, default_value_t = SolverArg::Exact)]
    layerwise_solver: SolverArg,
    /// Learning rate of `--layerwise-solver adamw`.
    #[arg(long, default_value_t = 1e-5)]
    adamw_lr: f64,
    /// Replace the output if it exists.
    #[arg(long)]
    force: bool,
    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let started = Instant::now();
    if !(a.adamw_lr.is_finite() && a.adamw_lr > 0.0) {
        anyhow::bail!("--adamw-lr must be a positive number, not {}", a.adamw_lr);
    }
    ui::check_output(&a.output, a.force)?;
    let calib_text = match (a.calibrate, &a.calib_text) {
        (CalibrateArg::None, _) => None,
        (_, Some(p)) => Some(p.clone()),
        (_, None) => {
            let fixtures = std::env::var_os("DELTA_FIXTURES")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/delta-fixtures")));
            match fixtures.map(|d| d.join("text/c4.utf8")).filter(|p| p.exists()) {
                Some(p) => Some(p),
                None => anyhow::bail!("--calibrate {} needs calibration text: pass --calib-text FILE", if a.calibrate == CalibrateArg::Layerwise { "layerwise" } else { "?" }),
            }
        }
    };
    let calib_text = calib_text.map(|p| std::fs::read_to_string(&p).with_context(|| format!("reading calibration text {}", p.display()))).transpose()?;
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
    let mut c = compress(&base, &finetuned, &options, &mut |done, _, name| {
        bar.set_position(done as u64);
        bar.set_message(name.to_string());
    })?;
    bar.finish_and_clear();
    let mut fits = Vec::new();
    if let Some(text) = &calib_text {
        let tok = delta_models::Tokenizer::load(&a.finetuned)?;
        let ids = tok.encode(text, false)?;
        let (n, len) = (a.calib_samples as usize, a.calib_len as usize);
        if ids.len() < n * len {
            anyhow::bail!("the calibration text has {} tokens; {n} samples x {len} need {}", ids.len(), n * len);
        }
        let samples: Vec<Vec<u32>> = ids.chunks_exact(len).take(n).map(<[u32]>::to_vec).collect();
        let solver = match a.layerwise_solver {
            SolverArg::Exact => Solver::Exact,
            SolverArg::Adamw => Solver::AdamW { epochs: 5, lr: a.adamw_lr, batch_rows: 128 },
        };
        let modes = match scale {
            ScaleChoice::Auto => vec![ScaleMode::Scalar, ScaleMode::PerOutput, ScaleMode::PerInput],
            ScaleChoice::Fixed(m) => vec![m],
        };
        let opts = LayerwiseOptions { solver, modes, heldout: n.div_ceil(10), keep_initial: true };
        let bar = ui::progress(c.weights.len() as u64, "layer-wise", false, a.json);
        fits = calibrate_layerwise(&mut c, &base, &finetuned, &samples, &opts, &mut |done, _, name| {
            bar.set_position(done as u64);
            bar.set_message(name.to_string());
        })?;
        bar.finish_and_clear();
        c.calibration = "layerwise".into();
        c.calibration_report = Some(serde_json::json!({
            "samples": n, "tokens_per_sample": len, "heldout_samples": opts.heldout,
            "solver": format!("{:?}", opts.solver), "layers": fits,
        }));
    }
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
            "calibration": c.calibration,
            "modes": c.mode_counts(),
            "layerwise": fits,
            "compressed": c.weights.len(),
            "whole": c.whole,
            "unchanged": c.unchanged.len(),
            "side_files": c.files.keys().collect::<Vec<_>>(),
            "mean_rel_error": mean_err,
            "max_rel_error": max_err,
            "seconds": seconds,
            // Weight-space fits as compressed; with calibration, `layerwise` has what was kept.
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
        let when = if fits.is_empty() { "" } else { " (of the weight-space scales, before calibration)" };
        println!("weight-space error ‖Δ − Δ̂‖/‖Δ‖{when}: mean {mean_err:.3}, max {max_err:.3}");
        if !fits.is_empty() {
            let mut kept: std::collections::BTreeMap<&str, usize> = Default::default();
            fits.iter().for_each(|f| *kept.entry(f.kept.as_str()).or_default() += 1);
            let gain: Vec<f64> = fits.iter().filter(|f| f.init_mse > 0.0).map(|f| 1.0 - f.heldout_mse[&f.kept] / f.init_mse).collect();
            println!(
                "layer-wise calibration: kept {}; held-out layer-output MSE {:.1}% below the weight-space scales (mean over layers)",
                kept.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", "),
                100.0 * gain.iter().sum::<f64>() / gain.len().max(1) as f64
            );
        }
        println!(
            "wrote {} ({}; the bf16 fine-tune is {}, {ratio:.1}x larger) in {seconds:.1} s",
            a.output.display(),
            ui::size(bytes),
            ui::size(bf16_bytes)
        );
    }
    Ok(())
}
