//! `bitdelta eval tasks`: zero-shot multiple-choice accuracy over loglikelihood request files.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use delta_models::tasks::{encode_request, score_choices, EncodedChoice};
use serde::{Deserialize, Serialize};

use crate::load::ModelArgs;
use crate::ui;

/// Zero-shot multiple-choice accuracy (ARC, HellaSwag, PIQA, Winogrande, ...).
///
/// Each FILE holds loglikelihood requests, one JSON object per line (gzip-compressed when the
/// name ends in .gz), as lm-evaluation-harness writes them: `task_name`, `doc_id`, `label` (the
/// right choice), `idx` (the choice) and `request.context` / `request.continuation`; the lines of
/// a document are consecutive. Each continuation is scored by the sum of its tokens'
/// log-probabilities given the context (trailing whitespace of the context moves to the
/// continuation; its tokens are those of context + continuation after the context's). `acc`
/// counts documents whose right choice has the highest sum; `acc_norm` divides each sum by the
/// continuation's length in UTF-8 bytes first.
#[derive(clap::Args)]
pub struct TasksArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Request files (`tasks/*.jsonl.gz` in the fixtures).
    #[arg(long, num_args = 1.., required = true)]
    tasks: Vec<PathBuf>,
    /// Score only the first N documents of each file.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Deserialize)]
struct Line {
    task_name: String,
    doc_id: u64,
    idx: usize,
    label: usize,
    request: Request,
}

#[derive(Deserialize)]
struct Request {
    context: String,
    continuation: String,
}

/// One document: its choices (context, continuation) in `idx` order and the right one.
struct Doc {
    choices: Vec<(String, String)>,
    label: usize,
}

#[derive(Serialize)]
struct TaskResult {
    task: String,
    file: PathBuf,
    docs: usize,
    acc: f64,
    acc_stderr: f64,
    acc_norm: f64,
    acc_norm_stderr: f64,
    request_tokens: usize,
    seconds: f64,
}

/// Reads a request file into (task name, documents), at most `limit` documents.
fn read_docs(path: &Path, limit: Option<u64>) -> Result<(String, Vec<Doc>)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    let mut task = None;
    let mut docs: Vec<Doc> = Vec::new();
    let mut current: Option<u64> = None;
    for (n, line) in BufReader::new(reader).lines().enumerate() {
        let at = || format!("{}:{}", path.display(), n + 1);
        let line = line.with_context(|| format!("reading {}", at()))?;
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(&line).with_context(|| format!("{}: not a loglikelihood request", at()))?;
        match &task {
            None => task = Some(l.task_name.clone()),
            Some(t) if *t != l.task_name => bail!("{}: task {} in a file of task {t}", at(), l.task_name),
            _ => {}
        }
        if current != Some(l.doc_id) {
            if limit.is_some_and(|k| docs.len() as u64 >= k) {
                break;
            }
            docs.push(Doc { choices: Vec::new(), label: l.label });
            current = Some(l.doc_id);
        }
        let doc = docs.last_mut().expect("pushed above");
        if l.idx != doc.choices.len() || l.label != doc.label {
            bail!("{}: document {} has choice {} after {} choices (label {} vs {})", at(), l.doc_id, l.idx, doc.choices.len(), l.label, doc.label);
        }
        doc.choices.push((l.request.context, l.request.continuation));
    }
    let task = task.with_context(|| format!("{} holds no requests", path.display()))?;
    if let Some(bad) = docs.iter().position(|d| d.label >= d.choices.len()) {
        bail!("{}: document {bad} has label {} but {} choices", path.display(), docs[bad].label, docs[bad].choices.len());
    }
    Ok((task, docs))
}

pub fn run(a: TasksArgs) -> Result<()> {
    let started = Instant::now();
    let files: Vec<(String, Vec<Doc>)> = a.tasks.iter().map(|p| read_docs(p, a.limit)).collect::<Result<_>>()?;
    let loaded = a.model.load()?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let eot = tok.token_id("<|endoftext|>").unwrap_or(0);
    let total: usize = files.iter().map(|(_, d)| d.len()).sum();
    let bar = ui::progress(total as u64, "tasks", false, a.json);
    let mut results = Vec::new();
    for ((task, docs), file) in files.iter().zip(&a.tasks) {
        let t0 = Instant::now();
        bar.set_message(task.clone());
        let (mut right, mut right_norm, mut tokens) = (0usize, 0usize, 0usize);
        for doc in docs {
            let encoded: Vec<EncodedChoice> = doc.choices.iter().map(|(c, k)| encode_request(tok, c, k, eot)).collect::<Result<_, _>>()?;
            tokens += encoded.iter().map(|e| e.context.len() + e.continuation.len()).sum::<usize>();
            let scores = score_choices(model, &encoded)?;
            let argmax = |f: &dyn Fn(usize) -> f64| (0..scores.len()).fold(0, |best, i| if f(i) > f(best) { i } else { best });
            right += (argmax(&|i| scores[i].loglik) == doc.label) as usize;
            right_norm += (argmax(&|i| scores[i].loglik / doc.choices[i].1.len().max(1) as f64) == doc.label) as usize;
            bar.inc(1);
        }
        let n = docs.len().max(1) as f64;
        let (acc, acc_norm) = (right as f64 / n, right_norm as f64 / n);
        let stderr = |p: f64| (p * (1.0 - p) / (n - 1.0).max(1.0)).sqrt();
        results.push(TaskResult {
            task: task.clone(),
            file: file.clone(),
            docs: docs.len(),
            acc,
            acc_stderr: stderr(acc),
            acc_norm,
            acc_norm_stderr: stderr(acc_norm),
            request_tokens: tokens,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    bar.finish_and_clear();
    let k = results.len() as f64;
    let mean_acc = results.iter().map(|r| r.acc).sum::<f64>() / k;
    let mean_acc_norm = results.iter().map(|r| r.acc_norm).sum::<f64>() / k;
    let seconds = started.elapsed().as_secs_f64();
    let tokens: usize = results.iter().map(|r| r.request_tokens).sum();
    let scoring: f64 = results.iter().map(|r| r.seconds).sum();
    if a.json {
        let out = serde_json::json!({
            "model": a.model.model, "delta": a.model.delta, "delta_use": a.model.delta_use.name(),
            "limit": a.limit, "tasks": results, "mean_acc": mean_acc, "mean_acc_norm": mean_acc_norm,
            "seconds": seconds, "request_tokens_per_second": tokens as f64 / scoring,
        });
        println!("{out}");
    } else {
        println!("{:<16} {:>6} {:>15} {:>15} {:>8}", "task", "docs", "acc", "acc_norm", "seconds");
        for r in &results {
            println!(
                "{:<16} {:>6} {:>7.4} ± {:.4} {:>7.4} ± {:.4} {:>8.1}",
                r.task, r.docs, r.acc, r.acc_stderr, r.acc_norm, r.acc_norm_stderr, r.seconds
            );
        }
        if results.len() > 1 {
            println!("{:<16} {:>6} {:>7.4}          {:>7.4}", "mean", "", mean_acc, mean_acc_norm);
        }
        println!("{seconds:.1} s in all; {:.0} request tokens/s (context + continuation of every choice)", tokens as f64 / scoring);
    }
    Ok(())
}
