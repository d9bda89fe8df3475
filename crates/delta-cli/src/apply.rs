//! `bitdelta apply`: base + artifact -> a Hugging Face model folder.

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use delta_format::atomic::AtomicDir;
use delta_format::checkpoint::{parse_size, write_model_folder, Checkpoint};
use delta_format::{DeltaArtifact, TensorPlan};
use delta_kernels::merge;

use crate::ui;

/// Apply a delta to its base, writing the fine-tuned model as a Hugging Face folder.
///
/// The base must be the exact model the delta was made from (names, dtypes, shapes and content
/// are checked against the fingerprint in the artifact). Compressed weights are merged as
/// base + scale·sign and rounded to the base dtype; whole tensors are taken from the artifact;
/// everything else is copied from the base, as are side files (config, tokenizer) unless the
/// artifact carries the fine-tune's own. The folder appears only when complete.
#[derive(clap::Args)]
pub struct Args {
    /// Base model folder the delta was made against.
    #[arg(long)]
    base: PathBuf,
    /// The .bitdelta.safetensors artifact.
    #[arg(long)]
    delta: PathBuf,
    /// Output model folder.
    #[arg(short, long)]
    output: PathBuf,
    /// Split the weights into shards of at most this size (e.g. 5GB, 500MB), with an index,
    /// as transformers does.
    #[arg(long, default_value = "5GB", value_parser = parse_shard_size)]
    max_shard_size: u64,
    /// Replace the output folder if it exists.
    #[arg(long)]
    force: bool,
    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

fn parse_shard_size(s: &str) -> Result<u64, String> {
    parse_size(s).filter(|&n| n > 0).ok_or_else(|| format!("`{s}` is not a size like 5GB, 500MB or 1GiB"))
}

pub fn run(a: Args) -> Result<()> {
    let started = Instant::now();
    ui::check_output(&a.output, a.force)?;
    let artifact = DeltaArtifact::open(&a.delta).context("reading the delta")?;
    let base = Checkpoint::open(&a.base).context("reading the base model")?;
    let meta = artifact.metadata();
    meta.base.check_structure(&base).with_context(|| format!("applying {}", a.delta.display()))?;

    let dir = AtomicDir::create(&a.output, a.force)?;
    // A whole tensor's shape (a vocabulary matrix with added tokens has more rows), else the base's.
    let shape_of = |n: &str, v: delta_format::TensorView<'_>| artifact.whole_tensor(n).map_or(v.shape, |w| w.shape).to_vec();
    let plan: Vec<TensorPlan> = base.names().map(|n| base.tensor(n).map(|v| TensorPlan::new(n, v.dtype, shape_of(n, v))).expect("listed")).collect();
    let bar = ui::progress(base.data_bytes(), "apply", true, a.json);
    let (mut merged, mut whole, mut copied) = (0usize, 0usize, 0usize);
    let files = write_model_folder(dir.path(), plan, a.max_shard_size, |t| -> Result<Cow<'_, [u8]>> {
        let view = base.tensor(&t.name).expect("planned from the base");
        meta.base.check_tensor(&t.name, &view).with_context(|| format!("applying {}", a.delta.display()))?;
        let bytes = if let Some(w) = artifact.weight(&t.name) {
            merged += 1;
            Cow::Owned(merge(&view, &w)?)
        } else if let Some(v) = artifact.whole_tensor(&t.name) {
            whole += 1;
            Cow::Borrowed(v.data)
        } else {
            copied += 1;
            Cow::Borrowed(view.data)
        };
        bar.inc(bytes.len() as u64);
        Ok(bytes)
    })?;
    bar.finish_and_clear();

    let mut side = Vec::new();
    for path in base.side_files()? {
        let name = path.file_name().expect("file").to_string_lossy().to_string();
        if !meta.files.contains_key(&name) {
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            ui::write_atomic(&dir.path().join(&name), &bytes, false)?;
            side.push(name);
        }
    }
    for (name, f) in &meta.files {
        let bytes = f.to_bytes().map_err(anyhow::Error::msg)?;
        ui::write_atomic(&dir.path().join(name), &bytes, false)?;
        side.push(name.clone());
    }
    side.sort();
    dir.commit()?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = base.data_bytes();
    let weight_files: Vec<String> = files.iter().map(|p| p.file_name().expect("file").to_string_lossy().to_string()).collect();
    if a.json {
        let out = serde_json::json!({
            "output": a.output,
            "merged": merged,
            "whole": whole,
            "copied": copied,
            "bytes": bytes,
            "weight_files": weight_files,
            "side_files": side,
            "seconds": seconds,
        });
        println!("{out}");
    } else {
        println!("merged {merged} weights, took {whole} tensors whole from the delta, copied {copied} from the base");
        println!(
            "wrote {} ({}, {} + {} side files) in {seconds:.2} s",
            a.output.display(),
            ui::size(bytes),
            weight_files.join(", "),
            side.len()
        );
    }
    Ok(())
}
