//! `bitdelta eval tasks`: zero-shot multiple-choice accuracy over loglikelihood request files.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use delta_models::tasks::{encode_request, score_documents, EncodedChoice};
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
///
/// A document whose `doc_id` is 1,000,000 + k and whose continuations are those of document k is
/// k's *unconditioned twin* (OLMo's evaluation files: the same choices after the bare context
/// `Answer:`), not a document of its own. Twins are skipped unless `--uncond` is given; then they
/// are scored too and `acc_uncond` picks the choice with the highest log-likelihood gain over its
/// twin (log p(choice | context) − log p(choice | Answer:)).
///
/// `--json` also lists every document's scores (`documents`: its `doc_id`, `label`, each choice's
/// `loglik`, and the choice `acc` and `acc_norm` pick), so that two models scored on the same
/// file can be compared document by document.
#[derive(clap::Args)]
pub struct TasksArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Request files (`tasks/*.jsonl.gz` in the fixtures).
    #[arg(long, num_args = 1.., required = true)]
    tasks: Vec<PathBuf>,
    /// Score only the first N documents of each file.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    limit: Option<u64>,
    /// Also score each document's unconditioned twin, where the file has them, and report
    /// `acc_uncond` (costs a second, shorter pass over every choice).
    #[arg(long)]
    uncond: bool,
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

/// One document: its choices (context, continuation) in `idx` order, the right one, and the
/// choices of its unconditioned twin when the file has one.
struct Doc {
    id: u64,
    choices: Vec<(String, String)>,
    label: usize,
    twin: Option<Vec<(String, String)>>,
}

/// `doc_id` offset of unconditioned twins (see [`TasksArgs`]).
const TWIN_OFFSET: u64 = 1_000_000;

#[derive(Serialize)]
struct TaskResult {
    task: String,
    file: PathBuf,
    docs: usize,
    acc: f64,
    acc_stderr: f64,
    acc_norm: f64,
    acc_norm_stderr: f64,
    /// Documents whose unconditioned twin the file holds (scored only with `--uncond`).
    twins: usize,
    /// With `--uncond`, over the documents that have a twin.
    acc_uncond: Option<f64>,
    acc_uncond_stderr: Option<f64>,
    request_tokens: usize,
    seconds: f64,
    documents: Vec<DocScore>,
}

/// One document's scores.
#[derive(Serialize)]
struct DocScore {
    doc_id: u64,
    label: usize,
    /// Each choice's summed log-likelihood, in `idx` order.
    loglik: Vec<f64>,
    /// The choice with the highest `loglik` (`acc`), and with the highest per byte (`acc_norm`).
    pick: usize,
    pick_norm: usize,
    /// With `--uncond`, for a document with a twin: the twin's log-likelihoods and the choice
    /// whose log-likelihood gains most from the context.
    #[serde(skip_serializing_if = "Option::is_none")]
    loglik_uncond: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pick_uncond: Option<usize>,
}

/// Reads a request file into (task name, documents): every document in file order, twins
/// attached to theirs, at most `limit` of them.
fn read_docs(path: &Path, limit: Option<u64>) -> Result<(String, Vec<Doc>)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    let mut task = None;
    let mut docs: Vec<Doc> = Vec::new();
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
        if docs.last().is_none_or(|d| d.id != l.doc_id) {
            docs.push(Doc { id: l.doc_id, choices: Vec::new(), label: l.label, twin: None });
        }
        let doc = docs.last_mut().expect("pushed above");
        if l.idx != doc.choices.len() || l.label != doc.label {
            bail!("{}: document {} has choice {} after {} choices (label {} vs {})", at(), l.doc_id, l.idx, doc.choices.len(), l.label, doc.label);
        }
        doc.choices.push((l.request.context, l.request.continuation));
    }
    let task = task.with_context(|| format!("{} holds no requests", path.display()))?;
    if let Some(bad) = docs.iter().find(|d| d.label >= d.choices.len()) {
        bail!("{}: document {} has label {} but {} choices", path.display(), bad.id, bad.label, bad.choices.len());
    }
    // Attach each twin to its document: same label, same continuations in the same order.
    let mut ids = HashSet::new();
    if let Some(d) = docs.iter().find(|d| !ids.insert(d.id)) {
        bail!("{}: the lines of document {} are not consecutive", path.display(), d.id);
    }
    let is_twin = |d: &Doc| d.id.checked_sub(TWIN_OFFSET).is_some_and(|k| ids.contains(&k));
    let (twins, mut kept): (Vec<Doc>, Vec<Doc>) = docs.into_iter().partition(is_twin);
    let position: HashMap<u64, usize> = kept.iter().enumerate().map(|(i, d)| (d.id, i)).collect();
    for twin in twins {
        let target = twin.id - TWIN_OFFSET;
        let Some(doc) = position.get(&target).map(|&i| &mut kept[i]) else {
            bail!("{}: document {} is numbered as the unconditioned twin of document {target}, itself a twin", path.display(), twin.id);
        };
        let same = twin.label == doc.label && twin.choices.len() == doc.choices.len() && twin.choices.iter().zip(&doc.choices).all(|(a, b)| a.1 == b.1);
        if !same {
            bail!("{}: document {} is numbered as the unconditioned twin of document {target} but its label or continuations differ", path.display(), twin.id);
        }
        doc.twin = Some(twin.choices);
    }
    if let Some(k) = limit {
        kept.truncate(k as usize);
    }
    Ok((task, kept))
}

/// Documents go through the model in packed batches of about this many request tokens (context +
/// continuation of every choice): products large enough to run near the GEMM's speed, logits of
/// a batch (one row per continuation token) around 0.2 GB.
const BATCH_TOKENS: usize = 2048;

/// Index of the largest value (the first of equal ones).
fn argmax(v: impl Iterator<Item = f64>) -> usize {
    v.enumerate().fold((0, f64::NEG_INFINITY), |best, (i, x)| if x > best.1 { (i, x) } else { best }).0
}

/// Scores a batch: `seqs` holds each document's choices, followed by its twin's where `owners`
/// says it has one.
fn score_batch<B: Backend>(model: &delta_models::Llama<B>, seqs: &[Vec<EncodedChoice>], owners: &[(&Doc, bool)], out: &mut Vec<DocScore>) -> Result<()> {
    let mut scores = score_documents(model, seqs)?.into_iter();
    for &(doc, twin) in owners {
        let loglik: Vec<f64> = scores.next().expect("one score list per sequence").iter().map(|s| s.loglik).collect();
        let loglik_uncond: Option<Vec<f64>> = twin.then(|| scores.next().expect("the twin's scores follow").iter().map(|s| s.loglik).collect());
        out.push(DocScore {
            doc_id: doc.id,
            label: doc.label,
            pick: argmax(loglik.iter().copied()),
            pick_norm: argmax(loglik.iter().zip(&doc.choices).map(|(l, c)| l / c.1.len().max(1) as f64)),
            pick_uncond: loglik_uncond.as_ref().map(|u| argmax(loglik.iter().zip(u).map(|(l, u)| l - u))),
            loglik,
            loglik_uncond,
        });
    }
    Ok(())
}

impl crate::load::OnDevice for TasksArgs {
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        tasks::<B>(self, &device)
    }
}

fn tasks<B: Backend>(a: TasksArgs, device: &B::Device) -> Result<()> {
    let started = Instant::now();
    let files: Vec<(String, Vec<Doc>)> = a.tasks.iter().map(|p| read_docs(p, a.limit)).collect::<Result<_>>()?;
    let loaded = a.model.load::<B>(device)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let eot = tok.token_id("<|endoftext|>").unwrap_or(0);
    let encode = |choices: &[(String, String)]| choices.iter().map(|(c, k)| encode_request(tok, c, k, eot)).collect::<Result<Vec<_>, _>>();
    let total: usize = files.iter().map(|(_, d)| d.len()).sum();
    let bar = ui::progress(total as u64, "tasks", false, a.json);
    let mut results = Vec::new();
    for ((task, docs), file) in files.iter().zip(&a.tasks) {
        let t0 = Instant::now();
        bar.set_message(task.clone());
        let (mut scored, mut tokens) = (Vec::with_capacity(docs.len()), 0usize);
        let (mut seqs, mut owners, mut pending) = (Vec::new(), Vec::new(), 0usize);
        for (i, doc) in docs.iter().enumerate() {
            let mut own = vec![encode(&doc.choices)?];
            if let (true, Some(t)) = (a.uncond, &doc.twin) {
                own.push(encode(t)?);
            }
            let n: usize = own.iter().flatten().map(|e| e.context.len() + e.continuation.len()).sum();
            (pending, tokens) = (pending + n, tokens + n);
            owners.push((doc, own.len() == 2));
            seqs.extend(own);
            if pending >= BATCH_TOKENS || i + 1 == docs.len() {
                score_batch(model, &seqs, &owners, &mut scored)?;
                bar.inc(owners.len() as u64);
                (pending, seqs, owners) = (0, Vec::new(), Vec::new());
            }
        }
        let share = |right: usize, n: usize| right as f64 / n.max(1) as f64;
        let stderr = |p: f64, n: usize| (p * (1.0 - p) / (n as f64 - 1.0).max(1.0)).sqrt();
        let count = |pick: &dyn Fn(&DocScore) -> Option<usize>| scored.iter().filter(|d| pick(d) == Some(d.label)).count();
        let (acc, acc_norm) = (share(count(&|d| Some(d.pick)), docs.len()), share(count(&|d| Some(d.pick_norm)), docs.len()));
        let with_twin = scored.iter().filter(|d| d.pick_uncond.is_some()).count();
        let acc_uncond = (with_twin > 0).then(|| share(count(&|d| d.pick_uncond), with_twin));
        results.push(TaskResult {
            task: task.clone(),
            file: file.clone(),
            docs: docs.len(),
            acc,
            acc_stderr: stderr(acc, docs.len()),
            acc_norm,
            acc_norm_stderr: stderr(acc_norm, docs.len()),
            twins: docs.iter().filter(|d| d.twin.is_some()).count(),
            acc_uncond,
            acc_uncond_stderr: acc_uncond.map(|p| stderr(p, with_twin)),
            request_tokens: tokens,
            seconds: t0.elapsed().as_secs_f64(),
            documents: scored,
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
            "device": a.model.device.name(), "limit": a.limit, "tasks": results, "mean_acc": mean_acc, "mean_acc_norm": mean_acc_norm,
            "seconds": seconds, "request_tokens_per_second": tokens as f64 / scoring,
        });
        println!("{out}");
    } else {
        let uncond = |r: &TaskResult| match (r.acc_uncond, r.acc_uncond_stderr) {
            (Some(p), Some(e)) => format!(" {p:>7.4} ± {e:.4}"),
            _ => format!(" {:>15}", "–"),
        };
        let header_uncond = if a.uncond { format!(" {:>15}", "acc_uncond") } else { String::new() };
        println!("{:<16} {:>6} {:>15} {:>15}{header_uncond} {:>8}", "task", "docs", "acc", "acc_norm", "seconds");
        for r in &results {
            println!(
                "{:<16} {:>6} {:>7.4} ± {:.4} {:>7.4} ± {:.4}{} {:>8.1}",
                r.task, r.docs, r.acc, r.acc_stderr, r.acc_norm, r.acc_norm_stderr, if a.uncond { uncond(r) } else { String::new() }, r.seconds
            );
        }
        if results.len() > 1 {
            println!("{:<16} {:>6} {:>7.4}          {:>7.4}", "mean", "", mean_acc, mean_acc_norm);
        }
        println!("{seconds:.1} s in all; {:.0} request tokens/s (context + continuation of every choice)", tokens as f64 / scoring);
        let twins: usize = results.iter().map(|r| r.twins).sum();
        if twins > 0 && !a.uncond {
            println!("{twins} of these documents have unconditioned twins in their files (not scored; --uncond adds acc_uncond)");
        }
    }
    Ok(())
}
