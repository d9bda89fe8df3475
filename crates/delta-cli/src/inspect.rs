//! `bitdelta inspect`: what an artifact holds, tensor by tensor.

use std::path::PathBuf;

use anyhow::{Context, Result};
use delta_format::dtype::shape_string;
use delta_format::DeltaArtifact;

use crate::ui;

/// Validate an artifact and list its contents.
///
/// Prints format version, producer, architecture and the base it belongs to, then one row per
/// stored tensor (name, shape, mode, bytes) and totals, with the compression ratio against the
/// fine-tune in bf16. Any broken rule of the format is reported as an error instead.
#[derive(clap::Args)]
pub struct Args {
    /// The .bitdelta.safetensors artifact.
    file: PathBuf,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

struct Row {
    name: String,
    shape: Vec<usize>,
    mode: String,
    bytes: u64,
}

pub fn run(a: Args) -> Result<()> {
    let artifact = DeltaArtifact::open(&a.file).context("reading the delta")?;
    let meta = artifact.metadata();
    let mut rows = Vec::new();
    for w in artifact.weights() {
        let bytes = (w.signs.words().len() * 4 + w.scales.len() * 4) as u64;
        rows.push(Row { name: w.name.to_string(), shape: vec![w.rows(), w.cols()], mode: w.mode.name().into(), bytes });
    }
    for (name, v) in artifact.whole_tensors() {
        rows.push(Row { name: name.into(), shape: v.shape.to_vec(), mode: "whole".into(), bytes: v.data.len() as u64 });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let file_bytes = artifact.file_len() as u64;
    let (base_bytes, bf16_bytes) = meta.base.model_bytes();
    let compressed_bytes: u64 = rows.iter().filter(|r| r.mode != "whole").map(|r| r.bytes).sum();
    let whole_bytes: u64 = rows.iter().filter(|r| r.mode == "whole").map(|r| r.bytes).sum();
    let unchanged = meta.base.tensors.len() - meta.weights.len() - rows.iter().filter(|r| r.mode == "whole").count();
    let ratio = bf16_bytes as f64 / file_bytes as f64;

    if a.json {
        let tensors: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({ "name": r.name, "shape": r.shape, "mode": r.mode, "bytes": r.bytes }))
            .collect();
        let out = serde_json::json!({
            "file": a.file,
            "format_version": delta_format::artifact::FORMAT_VERSION,
            "producer": meta.producer,
            "architecture": meta.architecture,
            "base_tensors": meta.base.tensors.len(),
            "compressed": meta.weights.len(),
            "whole": rows.len() - meta.weights.len(),
            "unchanged": unchanged,
            "compressed_bytes": compressed_bytes,
            "whole_bytes": whole_bytes,
            "file_bytes": file_bytes,
            "base_bytes": base_bytes,
            "finetuned_bf16_bytes": bf16_bytes,
            "ratio": ratio,
            "side_files": meta.files.keys().collect::<Vec<_>>(),
            "notes": meta.notes,
            "tensors": tensors,
        });
        println!("{out}");
        return Ok(());
    }
    println!("{}", a.file.display());
    println!(
        "  bitdelta format v{}, made by {}, architecture {}",
        delta_format::artifact::FORMAT_VERSION,
        meta.producer,
        meta.architecture
    );
    println!("  base: {} tensors, {} as stored (fingerprinted, checked on apply)", meta.base.tensors.len(), ui::size(base_bytes));
    if !meta.files.is_empty() {
        println!("  side files carried: {}", meta.files.keys().cloned().collect::<Vec<_>>().join(", "));
    }
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    println!();
    println!("  {:<width$}  {:>14}  {:>10}  {:>10}", "name", "shape", "mode", "bytes");
    for r in &rows {
        println!("  {:<width$}  {:>14}  {:>10}  {:>10}", r.name, shape_string(&r.shape), r.mode, ui::size(r.bytes));
    }
    println!();
    println!("  compressed weights: {:>4}  {}", meta.weights.len(), ui::size(compressed_bytes));
    println!("  whole tensors:      {:>4}  {}", rows.len() - meta.weights.len(), ui::size(whole_bytes));
    println!("  unchanged (absent): {:>4}", unchanged);
    if let Some(c) = meta.notes.get("compression").and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok()) {
        println!("  scales: {}, calibration {}", c["scale"].as_str().unwrap_or("?"), c["calibration"].as_str().unwrap_or("?"));
    }
    println!(
        "  file: {} — the fine-tune in bf16 is {}, {ratio:.1}x larger",
        ui::size(file_bytes),
        ui::size(bf16_bytes)
    );
    Ok(())
}
