//! Weight-only compression of a fine-tune against its base.
//!
//! Guarantees: the two checkpoints hold the same tensor names, dtypes and shapes (but for the
//! rows of a vocabulary matrix: a fine-tune that added tokens), and only finite values, or the
//! first violation is returned; every *block linear* weight that changed becomes
//! a sign mask + scales; every other tensor that changed is kept whole; unchanged tensors are
//! left out. Peak memory is the compressed result (≈1/16 of a bf16 model) plus one weight's
//! working set: both checkpoints are read through mmap.

use std::collections::BTreeMap;
use std::path::Path;

use delta_format::artifact::{write_artifact, ArtifactContents, SideFile};
use delta_format::checkpoint::{is_block_linear, replaces_shape, Checkpoint};
use delta_format::dtype::shape_string;
use delta_format::{BaseFingerprint, CompressedWeight, FormatError, ScaleMode};
use delta_kernels::delta::two_sided_error;
use delta_kernels::{KernelError, WeightDelta};
use rayon::prelude::*;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("the fine-tune has a tensor `{name}` that the base lacks (is --base the model it was fine-tuned from?)")]
    MissingInBase { name: String },
    #[error("the base has a tensor `{name}` that the fine-tune lacks")]
    MissingInFinetune { name: String },
    #[error("tensor `{name}`: shape {base} in the base but {finetuned} in the fine-tune")]
    ShapeMismatch { name: String, base: String, finetuned: String },
    #[error("tensor `{name}`: dtype {base} in the base but {finetuned} in the fine-tune")]
    DTypeMismatch { name: String, base: delta_format::DType, finetuned: delta_format::DType },
    #[error("{model}: tensor `{name}` holds {value} at index {index}; refusing to compress non-finite weights")]
    NonFinite { model: &'static str, name: String, index: usize, value: f64 },
    #[error("side file {}: {error}", path.display())]
    SideFile { path: std::path::PathBuf, error: std::io::Error },
    #[error("calibration: {0}")]
    Calibration(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// Which scale mode each weight gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleChoice {
    /// The same mode for every weight.
    Fixed(ScaleMode),
    /// Per weight, the candidate with the smallest ‖Δ − Δ̂‖² at weight-space init.
    Auto,
}

impl ScaleChoice {
    pub fn name(&self) -> &'static str {
        match self {
            ScaleChoice::Fixed(m) => m.name(),
            ScaleChoice::Auto => "auto",
        }
    }
}

#[derive(Clone, Debug)]
pub struct CompressOptions {
    pub scale: ScaleChoice,
    /// Modes `auto` chooses among.
    pub auto_candidates: Vec<ScaleMode>,
    /// Written into the artifact (`producer`).
    pub producer: String,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            scale: ScaleChoice::Auto,
            auto_candidates: ScaleMode::ALL.to_vec(),
            producer: format!("bitdelta-rs {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// What happened to one compressed weight.
#[derive(Clone, Debug, Serialize)]
pub struct WeightReport {
    pub name: String,
    pub shape: [usize; 2],
    pub mode: ScaleMode,
    /// ‖Δ − Δ̂‖ / ‖Δ‖ of the kept mode.
    pub rel_error: f64,
    /// The same for every candidate tried (only the kept mode unless `auto`).
    pub candidates: BTreeMap<String, f64>,
}

/// The result of [`compress`], ready to be written.
pub struct Compressed {
    pub weights: Vec<CompressedWeight<'static>>,
    pub reports: Vec<WeightReport>,
    /// Changed tensors that are stored whole.
    pub whole: Vec<String>,
    /// Tensors identical in both models (left out of the artifact).
    pub unchanged: Vec<String>,
    pub files: BTreeMap<String, SideFile>,
    pub base: BaseFingerprint,
    pub architecture: String,
    pub options: CompressOptions,
    /// How the scales were fitted (`none`, `layerwise`, `full`), and the calibration report, if any.
    pub calibration: String,
    pub calibration_report: Option<serde_json::Value>,
}

/// Checks the pair and compresses it. `on_tensor(done, total, name)` is called after each tensor.
pub fn compress(
    base: &Checkpoint,
    finetuned: &Checkpoint,
    options: &CompressOptions,
    on_tensor: &mut dyn FnMut(usize, usize, &str),
) -> Result<Compressed, CompressError> {
    check_pair(base, finetuned)?;
    let fingerprint = base.fingerprint().clone();

    let names: Vec<&str> = base.names().collect();
    let mut weights = Vec::new();
    let mut reports = Vec::new();
    let mut whole = Vec::new();
    let mut unchanged = Vec::new();
    for (k, &name) in names.iter().enumerate() {
        let b = base.tensor(name).expect("listed");
        let f = finetuned.tensor(name).expect("pair checked");
        if b.data == f.data {
            unchanged.push(name.to_string());
        } else if is_block_linear(name, b.shape) && b.dtype.is_weight_float() {
            let (w, r) = compress_weight(name, &b, &f, options)?;
            weights.push(w);
            reports.push(r);
        } else {
            whole.push(name.to_string());
        }
        on_tensor(k + 1, names.len(), name);
    }
    Ok(Compressed {
        weights,
        reports,
        whole,
        unchanged,
        files: changed_side_files(base, finetuned)?,
        base: fingerprint,
        architecture: finetuned.architecture().or_else(|| base.architecture()).unwrap_or_else(|| "unknown".into()),
        options: options.clone(),
        calibration: "none".into(),
        calibration_report: None,
    })
}

fn compress_weight(
    name: &str,
    b: &delta_format::TensorView<'_>,
    f: &delta_format::TensorView<'_>,
    options: &CompressOptions,
) -> Result<(CompressedWeight<'static>, WeightReport), CompressError> {
    let d = WeightDelta::compute(name, b, f)?;
    let candidates: Vec<ScaleMode> = match options.scale {
        ScaleChoice::Fixed(m) => vec![m],
        ScaleChoice::Auto => options.auto_candidates.clone(),
    };
    let norm = d.sq_sum.sqrt().max(f64::MIN_POSITIVE);
    let mut best: Option<(f64, ScaleMode, Vec<f32>)> = None;
    let mut tried = BTreeMap::new();
    for mode in candidates {
        let scales = d.init_scales(mode);
        let err = match d.error(mode, &scales) {
            Some(e) => e,
            None => two_sided_error(name, b, f, &d, &scales)?,
        };
        tried.insert(mode.name().to_string(), err.sqrt() / norm);
        if best.as_ref().is_none_or(|(e, _, _)| err < *e) {
            best = Some((err, mode, scales));
        }
    }
    let (err, mode, scales) = best.expect("at least one candidate");
    let weight = CompressedWeight { name: name.to_string().into(), mode, signs: d.signs, scales: scales.into() };
    let report = WeightReport { name: name.into(), shape: [weight.rows(), weight.cols()], mode, rel_error: err.sqrt() / norm, candidates: tried };
    Ok((weight, report))
}

/// Same names, dtypes, shapes (a vocabulary matrix may have other rows); all values finite
/// (checked in parallel over tensors).
fn check_pair(base: &Checkpoint, finetuned: &Checkpoint) -> Result<(), CompressError> {
    if let Some(name) = finetuned.names().find(|n| !base.contains(n)) {
        return Err(CompressError::MissingInBase { name: name.into() });
    }
    if let Some(name) = base.names().find(|n| !finetuned.contains(n)) {
        return Err(CompressError::MissingInFinetune { name: name.into() });
    }
    for name in base.names() {
        let (b, f) = (base.tensor(name).expect("listed"), finetuned.tensor(name).expect("listed"));
        if !replaces_shape(name, b.shape, f.shape) {
            return Err(CompressError::ShapeMismatch { name: name.into(), base: shape_string(b.shape), finetuned: shape_string(f.shape) });
        }
        if b.dtype != f.dtype {
            return Err(CompressError::DTypeMismatch { name: name.into(), base: b.dtype, finetuned: f.dtype });
        }
    }
    let names: Vec<&str> = base.names().collect();
    let first_bad = |model: &'static str, ckpt: &Checkpoint| {
        names
            .par_iter()
            .filter_map(|&n| ckpt.tensor(n).expect("listed").first_non_finite().map(|(index, value)| (n, index, value)))
            .min_by_key(|(n, _, _)| *n)
            .map(|(n, index, value)| CompressError::NonFinite { model, name: n.into(), index, value })
    };
    if let Some(e) = first_bad("base", base).or_else(|| first_bad("fine-tune", finetuned)) {
        return Err(e);
    }
    Ok(())
}

/// Side files of the fine-tune that the base lacks or has with other content.
fn changed_side_files(base: &Checkpoint, finetuned: &Checkpoint) -> Result<BTreeMap<String, SideFile>, CompressError> {
    let mut out = BTreeMap::new();
    for path in finetuned.side_files()? {
        let name = path.file_name().expect("listed file").to_string_lossy().to_string();
        let ours = std::fs::read(&path).map_err(|error| CompressError::SideFile { path: path.clone(), error })?;
        let theirs = std::fs::read(base.dir().join(&name)).ok();
        if theirs.as_deref() != Some(ours.as_slice()) {
            out.insert(name, SideFile::from_bytes(ours));
        }
    }
    Ok(out)
}

impl Compressed {
    /// Counts of kept modes.
    pub fn mode_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for w in &self.weights {
            *m.entry(w.mode.name()).or_insert(0) += 1;
        }
        m
    }

    /// Writes the artifact atomically; `finetuned` supplies the whole tensors. Returns its size.
    pub fn write(&self, path: &Path, finetuned: &Checkpoint, overwrite: bool) -> Result<u64, CompressError> {
        let whole = self.whole.iter().map(|n| (n.clone(), finetuned.tensor(n).expect("checked pair"))).collect();
        let summary = serde_json::json!({
            "scale": self.options.scale.name(),
            "calibration": self.calibration,
            "modes": self.mode_counts(),
        });
        let contents = ArtifactContents {
            producer: self.options.producer.clone(),
            architecture: self.architecture.clone(),
            base: &self.base,
            weights: &self.weights,
            whole,
            files: self.files.clone(),
            notes: BTreeMap::from_iter(
                [("compression".to_string(), summary.to_string())]
                    .into_iter()
                    .chain(self.calibration_report.as_ref().map(|r| ("calibration_report".to_string(), r.to_string()))),
            ),
        };
        Ok(write_artifact(path, &contents, overwrite)?)
    }
}
