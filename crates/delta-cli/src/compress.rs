//! `bitdelta compress`: base + fine-tune -> `.bitdelta.safetensors`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::ValueEnum;
use delta_calib::{
    calibrate_layerwise, compress, distill, CompressOptions, Compressed, DistillLoss, DistillOptions, DistillProgress, DistillReport, LayerFit, LayerwiseOptions,
    ScaleChoice, Solver,
};
use delta_format::checkpoint::Checkpoint;
use delta_format::ScaleMode;

use crate::load::{on_device, DeviceArg, OnDevice};
use crate::ui;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScaleArg {
    /// Per matrix: without calibration, the mode below with the smallest weight-space error
    /// ‖Δ − Δ̂‖²; with calibration, scalar, per-output and per-input fits compete on held-out
    /// layer outputs (a vector must win by --vector-margin).
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
    /// output MSE is kept (with --scale auto, subject to --vector-margin; a fixed --scale fits
    /// only that mode).
    Layerwise,
    /// Layer-wise as above, then end to end: signs frozen, all scales trained jointly (Adam,
    /// cosine schedule) so the compressed model's logits match the fine-tune's on further
    /// calibration samples (--distill-*).
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LossArg {
    /// Mean squared error of the logits (BitDelta), computed exactly from the final hidden states
    /// through the shared head's Gram matrix, so neither model runs its head.
    Mse,
    /// KL(fine-tune ‖ compressed) of the next-token distributions (the fine-tune's logits
    /// recomputed from its hidden states through the shared head for each sample).
    Kl,
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
    /// How scales are fitted: from the weights alone, layer by layer on calibration text, or
    /// layer by layer and then end to end (`full`, ~7 min for a 135M model on 2 CPU cores).
    #[arg(long, value_enum, default_value_t = CalibrateArg::Full)]
    calibrate: CalibrateArg,
    /// Calibration text (UTF-8). Default: text/c4.utf8 of the fixtures ($DELTA_FIXTURES, else
    /// ~/.cache/delta-fixtures), when present.
    #[arg(long)]
    calib_text: Option<PathBuf>,
    /// Layer-wise calibration samples (consecutive token windows from the start of the text); the
    /// last 10% (at least one) are held out to choose each layer's mode.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(2..=100_000))]
    calib_samples: u32,
    /// Tokens per calibration sample.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    calib_len: u32,
    /// How layer-wise fits are solved: `exact` least squares (closed forms, normal equations), or
    /// `adamw`, the papers' loop (5 epochs, batches of 128 rows, --adamw-lr) for comparison.
    #[arg(long, value_enum, default_value_t = SolverArg::Exact)]
    layerwise_solver: SolverArg,
    /// With `--scale auto`: a per-output or per-input fit replaces the scalar fit of a layer only
    /// if its held-out layer-output MSE is lower by more than this fraction (0: the lowest wins).
    /// Vectors that win by a few percent of layer MSE lose perplexity (measured: BENCHMARKS.md).
    #[arg(long, default_value_t = 0.2, allow_hyphen_values = true)]
    vector_margin: f64,
    /// Learning rate of `--layerwise-solver adamw`.
    #[arg(long, default_value_t = 1e-5, allow_hyphen_values = true)]
    adamw_lr: f64,
    /// End-to-end samples (`--calibrate full`): the token windows after the layer-wise ones; the
    /// last 10% are held out and only scored. The fine-tune's final hidden states for them are
    /// computed once and kept (samples × tokens × hidden × 4 bytes: 44 MB for SmolLM2 at the
    /// defaults), so only one model is in memory while training.
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u32).range(2..=100_000))]
    distill_samples: u32,
    /// End-to-end samples per Adam step.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    distill_batch: u32,
    /// Passes over the end-to-end training samples.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    distill_epochs: u32,
    /// Peak learning rate of the end-to-end stage (cosine decay to 0). Steps are relative: each
    /// scale is trained as its stage-1 value times a multiplier starting at 1, so 0.01 moves a
    /// scale by about 1% per step whatever its magnitude.
    #[arg(long, default_value_t = 0.01, allow_hyphen_values = true)]
    distill_lr: f64,
    /// End-to-end objective. MSE is the default; with calibration text from the fine-tune's own
    /// domain, KL reproduced SmolLM2's fine-tune more closely (KL to it 0.0032 against 0.0048
    /// nats/token on held-out text), while on C4 the two were alike (BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = LossArg::Mse)]
    distill_loss: LossArg,
    /// Where calibration runs the models: `cpu`, or a GPU through `wgpu` (Vulkan, Metal, DX12) or
    /// `cuda` (those need a bitdelta built with `--features wgpu` / `--features cuda`). The fits
    /// of the layer-wise stage and the optimiser's updates run on the host either way.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
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
    if !(0.0..1.0).contains(&a.vector_margin) {
        anyhow::bail!("--vector-margin must be in [0, 1), not {}", a.vector_margin);
    }
    if !(a.distill_lr.is_finite() && a.distill_lr > 0.0) {
        anyhow::bail!("--distill-lr must be a positive number, not {}", a.distill_lr);
    }
    ui::check_output(&a.output, a.force)?;
    if a.calibrate != CalibrateArg::None {
        a.device.check()?;
        for ext in ["json", "svg"] {
            ui::check_output(&side_file(&a.output, ext), a.force)?;
        }
    }
    let calib_text = match (a.calibrate, &a.calib_text) {
        (CalibrateArg::None, _) => None,
        (_, Some(p)) => Some(p.clone()),
        (_, None) => {
            let fixtures = std::env::var_os("DELTA_FIXTURES")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/delta-fixtures")));
            match fixtures.map(|d| d.join("text/c4.utf8")).filter(|p| p.exists()) {
                Some(p) => Some(p),
                None => anyhow::bail!(
                    "--calibrate {} needs calibration text: pass --calib-text FILE (or build the fixtures: cargo xtask fixtures), or --calibrate none",
                    a.calibrate.to_possible_value().expect("no skipped variants").get_name()
                ),
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
    let calib_text = match calib_text {
        Some(_) if c.weights.is_empty() => {
            eprintln!(
                "note: no block linear of {} differs from the base's, so there is nothing to calibrate and the delta holds {} whole tensors only",
                a.finetuned.display(),
                c.whole.len()
            );
            None
        }
        text => text,
    };
    let mut fits = Vec::new();
    let mut distilled: Option<DistillReport> = None;
    if let Some(text) = &calib_text {
        let tok = delta_models::Tokenizer::load(&a.finetuned)?;
        let ids = tok.encode(text, false)?;
        let (n, len) = (a.calib_samples as usize, a.calib_len as usize);
        let n2 = if a.calibrate == CalibrateArg::Full { a.distill_samples as usize } else { 0 };
        if ids.len() < (n + n2) * len {
            let what = if n2 > 0 { format!("{n} layer-wise + {n2} end-to-end samples") } else { format!("{n} samples") };
            anyhow::bail!("the calibration text has {} tokens; {what} x {len} tokens need {}", ids.len(), (n + n2) * len);
        }
        let windows: Vec<Vec<u32>> = ids.chunks_exact(len).take(n + n2).map(<[u32]>::to_vec).collect();
        let (samples, distill_samples) = windows.split_at(n);
        let solver = match a.layerwise_solver {
            SolverArg::Exact => Solver::Exact,
            SolverArg::Adamw => Solver::AdamW { epochs: 5, lr: a.adamw_lr, batch_rows: 128 },
        };
        let modes = match scale {
            ScaleChoice::Auto => vec![ScaleMode::Scalar, ScaleMode::PerOutput, ScaleMode::PerInput],
            ScaleChoice::Fixed(m) => vec![m],
        };
        let layerwise = LayerwiseOptions { solver, modes, heldout: n.div_ceil(10), keep_initial: true, vector_margin: a.vector_margin };
        let end_to_end = (n2 > 0).then(|| DistillOptions {
            loss: match a.distill_loss {
                LossArg::Mse => DistillLoss::Mse,
                LossArg::Kl => DistillLoss::Kl,
            },
            lr: a.distill_lr,
            batch: a.distill_batch as usize,
            epochs: a.distill_epochs as usize,
            heldout: n2.div_ceil(10),
        });
        let job = Calibration {
            c: &mut c,
            base: &base,
            finetuned: &finetuned,
            samples,
            layerwise: &layerwise,
            end_to_end: end_to_end.as_ref().map(|o| (distill_samples, o)),
            json: a.json,
            fits: &mut fits,
            distilled: &mut distilled,
        };
        on_device(a.device, job)?;
        let mut report = serde_json::json!({
            "samples": n, "tokens_per_sample": len, "heldout_samples": layerwise.heldout,
            "solver": format!("{:?}", layerwise.solver), "layers": fits, "device": a.device.name(),
        });
        c.calibration = "layerwise".into();
        if let Some(r) = &distilled {
            c.calibration = "full".into();
            report["end_to_end"] = serde_json::to_value(r)?;
        }
        c.calibration_report = Some(report);
    }
    let bytes = c.write(&a.output, &finetuned, a.force)?;
    // The calibration report beside the artifact: the JSON of its metadata and the picture.
    let mut side = Vec::new();
    if let Some(report) = &c.calibration_report {
        let title = format!("{} — --scale {} --calibrate {}", a.output.file_name().unwrap_or_default().to_string_lossy(), scale.name(), c.calibration);
        let svg = delta_calib::picture::calibration_svg(&title, &fits, distilled.as_ref());
        for (path, bytes) in [(side_file(&a.output, "json"), serde_json::to_vec_pretty(report)?), (side_file(&a.output, "svg"), svg.into_bytes())] {
            ui::write_atomic(&path, &bytes, true)?;
            side.push(path);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss = ui::peak_rss_bytes();

    let (_, bf16_bytes) = c.base.model_bytes();
    let ratio = bf16_bytes as f64 / bytes as f64;
    // None without compressed weights.
    let errors: Vec<f64> = c.reports.iter().map(|r| r.rel_error).collect();
    let mean_err = (!errors.is_empty()).then(|| errors.iter().sum::<f64>() / errors.len() as f64);
    let max_err = (!errors.is_empty()).then(|| errors.iter().cloned().fold(0.0, f64::max));
    if a.json {
        let out = serde_json::json!({
            "output": a.output,
            "bytes": bytes,
            "finetuned_bf16_bytes": bf16_bytes,
            "ratio": ratio,
            "scale": scale.name(),
            "calibration": c.calibration,
            // Where calibration ran (none without calibration).
            "device": calib_text.is_some().then(|| a.device.name()),
            "modes": c.mode_counts(),
            "layerwise": fits,
            "end_to_end": distilled,
            "compressed": c.weights.len(),
            "whole": c.whole,
            "unchanged": c.unchanged.len(),
            "side_files": c.files.keys().collect::<Vec<_>>(),
            "mean_rel_error": mean_err,
            "max_rel_error": max_err,
            "seconds": seconds,
            "peak_rss_bytes": peak_rss,
            "calibration_files": side,
            // Weight-space fits as compressed; with calibration, `layerwise` has what was kept.
            "weights": c.reports,
        });
        println!("{out}");
    } else {
        let modes: Vec<String> = c.mode_counts().iter().map(|(m, n)| format!("{n} {m}")).collect();
        let modes = if modes.is_empty() { String::new() } else { format!(" ({})", modes.join(", ")) };
        println!(
            "compressed {} weights{modes}, {} tensors stored whole, {} unchanged",
            c.weights.len(),
            c.whole.len(),
            c.unchanged.len()
        );
        if let (Some(mean_err), Some(max_err)) = (mean_err, max_err) {
            let when = if fits.is_empty() { "" } else { " (of the weight-space scales, before calibration)" };
            println!("weight-space error ‖Δ − Δ̂‖/‖Δ‖{when}: mean {mean_err:.3}, max {max_err:.3}");
        }
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
        if let Some(r) = &distilled {
            println!(
                "end-to-end calibration: {} steps of {} samples; held-out {} loss {:.4} -> {:.4} ({:.1}% lower)",
                r.steps,
                r.batch,
                serde_json::to_value(r.loss)?.as_str().unwrap_or("?"),
                r.heldout_before,
                r.heldout_after,
                100.0 * (1.0 - r.heldout_after / r.heldout_before)
            );
        }
        for p in &side {
            println!("calibration report: {}", p.display());
        }
        println!(
            "wrote {} ({}; the bf16 fine-tune is {}, {ratio:.1}x larger) in {seconds:.1} s",
            a.output.display(),
            ui::size(bytes),
            ui::size(bf16_bytes)
        );
        if let Some(p) = peak_rss {
            println!("peak memory (resident): {}", ui::size(p));
        }
    }
    Ok(())
}

/// Both calibration stages on one backend: layer-wise, then end to end where asked.
struct Calibration<'a> {
    c: &'a mut Compressed,
    base: &'a Checkpoint,
    finetuned: &'a Checkpoint,
    samples: &'a [Vec<u32>],
    layerwise: &'a LayerwiseOptions,
    end_to_end: Option<(&'a [Vec<u32>], &'a DistillOptions)>,
    json: bool,
    fits: &'a mut Vec<LayerFit>,
    distilled: &'a mut Option<DistillReport>,
}

impl OnDevice for Calibration<'_> {
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let c = self.c;
        let bar = ui::progress(c.weights.len() as u64, "layer-wise", false, self.json);
        *self.fits = calibrate_layerwise::<B>(c, self.base, self.finetuned, self.samples, self.layerwise, &device, &mut |done, _, name| {
            bar.set_position(done as u64);
            bar.set_message(name.to_string());
        })?;
        bar.finish_and_clear();
        if let Some((samples, opts)) = self.end_to_end {
            let steps = (samples.len() - opts.heldout).div_ceil(opts.batch) * opts.epochs;
            let bar = ui::progress(steps as u64, "end-to-end", false, self.json);
            let r = distill::<B>(c, self.base, self.finetuned, samples, opts, &device, &mut |p| match p {
                DistillProgress::Teacher { done, total } => bar.set_message(format!("fine-tune pass {done}/{total}")),
                DistillProgress::Step { step, loss, .. } => {
                    bar.set_position(step as u64);
                    bar.set_message(format!("loss {loss:.4}"));
                }
            })?;
            bar.finish_and_clear();
            *self.distilled = Some(r);
        }
        Ok(())
    }
}

/// `NAME.bitdelta.safetensors` -> `NAME.bitdelta.calibration.EXT` (beside it).
fn side_file(output: &Path, ext: &str) -> PathBuf {
    let name = output.file_name().unwrap_or_default().to_string_lossy();
    let stem = name.strip_suffix(".safetensors").unwrap_or(&name);
    output.with_file_name(format!("{stem}.calibration.{ext}"))
}
