//! `bitdelta eval`: measure a model (optionally with a delta applied) on real data.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use delta_models::perplexity::{perplexity, token_stream};

use crate::load::ModelArgs;
use crate::ui;

#[derive(clap::Subcommand)]
pub enum Command {
    Ppl(PplArgs),
    Tasks(crate::eval_tasks::TasksArgs),
}

/// Perplexity of a model on a text file.
///
/// Protocol (the one of the fixtures' results.json): the text is split on `<|endoftext|>`, each
/// piece is stripped (empty ones skipped), encoded without special tokens and followed by token 0;
/// the pieces are concatenated; non-overlapping windows of WINDOW + 1 tokens step by WINDOW and a
/// last partial window is dropped; ppl = exp(mean negative log-likelihood of the WINDOW predicted
/// tokens of every window). Computed in f32 (on the CPU unless --device says otherwise).
///
/// Standard errors treat the windows as the independent samples. `--json` also lists every
/// window's mean NLL (`window_nll`), so two runs on the same text can be compared window by
/// window: the paired standard error of a difference is far smaller than either run's own.
#[derive(clap::Args)]
pub struct PplArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to evaluate (UTF-8).
    #[arg(long)]
    text: PathBuf,
    /// Tokens predicted per window.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    window: u32,
    /// Also measure how close the model is to this one (e.g. the fine-tune a delta was made
    /// from): the mean KL(teacher ‖ model) of the next-token distributions, same windows, and
    /// the model's mean NLL minus the teacher's, with its standard error paired window by window.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Windows per forward pass (more is faster, uses more memory).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    batch: u32,
    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Ppl(a) => crate::load::on_device(a.model.device, a),
        Command::Tasks(a) => crate::load::on_device(a.model.device, a),
    }
}

impl crate::load::OnDevice for PplArgs {
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        ppl::<B>(self, &device)
    }
}

fn ppl<B: Backend>(a: PplArgs, device: &B::Device) -> Result<()> {
    let started = Instant::now();
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let loaded = a.model.load::<B>(device)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let ids = token_stream(tok, &text)?;
    let windows = ids.len().saturating_sub(1) / a.window as usize;
    let bar = ui::progress(windows as u64, "ppl", false, a.json);
    let teacher = a
        .teacher
        .as_ref()
        .map(|t| ModelArgs { model: t.clone(), delta: None, delta_use: crate::load::DeltaUseArg::Merge, device: a.model.device }.load::<B>(device))
        .transpose()
        .context("loading the teacher")?;
    let r = perplexity(model, teacher.as_ref().map(|t| &t.model), &ids, a.window as usize, a.batch as usize, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let tokens_per_s = r.predicted_tokens as f64 / seconds;
    if a.json {
        let out = serde_json::json!({
            "model": a.model.model, "delta": a.model.delta, "text": a.text,
            "delta_use": a.model.delta_use.name(), "device": a.model.device.name(),
            "ppl": r.ppl, "mean_nll": r.mean_nll, "nll_std_error": finite(r.nll_std_error),
            "teacher": a.teacher, "kl_to_teacher": r.kl_to_teacher,
            "teacher_ppl": r.gap_to_teacher.map(|g| g.reference_mean.exp()),
            "nll_gap_to_teacher": r.gap_to_teacher.map(|g| g.difference), "nll_gap_std_error": r.gap_to_teacher.and_then(|g| finite(g.std_error)),
            "windows": r.windows, "predicted_tokens": r.predicted_tokens,
            "window": a.window, "seconds": seconds, "tokens_per_second": tokens_per_s, "window_nll": r.window_nll,
        });
        println!("{out}");
    } else {
        println!(
            "perplexity {:.4} (mean NLL {:.5}{}) over {} windows x {} tokens of {} — {seconds:.1} s, {tokens_per_s:.0} tokens/s",
            r.ppl,
            r.mean_nll,
            plus_minus(r.nll_std_error),
            r.windows,
            a.window,
            a.text.display()
        );
        if let (Some(kl), Some(g)) = (r.kl_to_teacher, r.gap_to_teacher) {
            println!("KL(teacher ‖ model) {kl:.5} nats per predicted token");
            println!(
                "teacher perplexity {:.4}; model's mean NLL minus the teacher's {:+.5}{} nats (paired over windows)",
                g.reference_mean.exp(),
                g.difference,
                plus_minus(g.std_error)
            );
        }
    }
    Ok(())
}

/// `None` (JSON null) for a standard error that one window cannot give.
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// ` ± 0.01234`, or nothing for a standard error that one window cannot give.
fn plus_minus(std_error: f64) -> String {
    finite(std_error).map_or(String::new(), |e| format!(" ± {e:.5}"))
}
