//! Stage 1 of calibration: per linear layer, in forward order, fit the scales so that the
//! compressed layer reproduces the fine-tune's layer outputs, and keep the mode that does best on
//! held-out samples.
//!
//! Inputs are what the layer sees in the *student* — the base with every layer before it already
//! calibrated (and the fine-tune's norms, biases and embeddings, as `apply` would give); targets
//! are the fine-tuned layer's outputs in the *teacher* (the fine-tune) on the same text. With
//! R = Y_teacher − X·W_baseᵀ (what the delta must add) and S the signs:
//! - scalar, Δ̂ = αS: with P = X·Sᵀ, α = ⟨P, R⟩ / ⟨P, P⟩ (least squares, exact);
//! - per-output, Δ̂[i, :] = r_i·S[i, :]: r_i = ⟨P[:, i], R[:, i]⟩ / ‖P[:, i]‖² (separable, exact;
//!   with the same tiny ridge as per-input below, so a row the data never excites keeps its
//!   weight-space scale);
//! - per-input, Δ̂ = S·diag(c): the normal equations ((XᵀX) ⊙ (SᵀS))·c = diag(XᵀR·S)… solved by
//!   Cholesky in f64, with a tiny ridge towards the weight-space scales for columns the data never
//!   excites.
//!
//! The candidates are the fitted modes (plus, with `keep_initial`, the layer's weight-space
//! scales); the one with the lowest output MSE on the held-out samples (never the training ones)
//! is kept.
//!
//! Streaming: one block of teacher and student is in memory at a time (loaded when the walk gets
//! to it, dropped after), plus the two activation streams of all samples.
//!
//! The student is not run through its layers a second time: each fit returns the calibrated
//! layer's output on its input, the base product it needed for R plus the kept delta's term (for a
//! scalar or per-output fit, P scaled row by row; P is computed on every row for that).
//!
//! Any Burn backend: the forward passes run on it (a GPU's, with `delta-models`' `wgpu` / `cuda`
//! features), the fits on the host from the layer inputs and residuals read back.

use std::collections::BTreeMap;

use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use delta_format::checkpoint::Checkpoint;
use delta_format::{CompressedWeight, ScaleMode};
use delta_kernels::dense::dot;
use delta_kernels::gemm::delta_matmul_add;
use delta_models::host::with_values;
use delta_models::llama::{Block, Linear, PROJECTIONS};
use delta_models::{DeltaLinear, Llama, ModelConfig, ModelError, Projection, Weights};
use rayon::prelude::*;
use serde::Serialize;

use crate::compress::{CompressError, Compressed};

/// How stage 1 solves each fit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Solver {
    /// The least-squares solutions (closed forms; normal equations for per-input).
    Exact,
    /// The papers' loop: AdamW (β 0.9 / 0.999, no weight decay) on the output MSE, from the
    /// weight-space scales, `epochs` passes over the training rows in batches of `batch_rows`.
    AdamW { epochs: usize, lr: f64, batch_rows: usize },
}

pub struct LayerwiseOptions {
    pub solver: Solver,
    /// Modes to fit (a fixed `--scale` fits only its own).
    pub modes: Vec<ScaleMode>,
    /// Samples (from the end) kept out of the fits and used to choose.
    pub heldout: usize,
    /// Let the weight-space scales compete too, so a layer never ends worse on held-out data
    /// than it started (the CLI does; tests of the fits themselves turn it off).
    pub keep_initial: bool,
    /// A vector mode (or a non-scalar start) replaces the fitted scalar only if its held-out MSE
    /// is lower by more than this fraction (0: the lowest MSE wins outright).
    pub vector_margin: f64,
}

/// What stage 1 did to one weight.
#[derive(Clone, Debug, Serialize)]
pub struct LayerFit {
    pub name: String,
    /// The candidate kept (`scalar`, `per-output`, `per-input`, or `MODE (weight-space)`).
    pub kept: String,
    pub mode: ScaleMode,
    /// Held-out output MSE of each candidate.
    pub heldout_mse: BTreeMap<String, f64>,
    /// Output MSE of each candidate on the rows it was fitted on.
    pub train_mse: BTreeMap<String, f64>,
    /// Held-out output MSE of the scales the layer started from (weight-space init), whether or
    /// not they competed.
    pub init_mse: f64,
}

impl From<ModelError> for CompressError {
    fn from(e: ModelError) -> Self {
        CompressError::Calibration(e.to_string())
    }
}

/// Runs stage 1 over every compressed weight of `c` (updating its modes and scales) on
/// `samples` (token id rows of equal length), the models on `device` of backend `B`.
/// `progress(done, total, name)` after each weight.
pub fn calibrate_layerwise<B: Backend>(
    c: &mut Compressed,
    base: &Checkpoint,
    finetuned: &Checkpoint,
    samples: &[Vec<u32>],
    opts: &LayerwiseOptions,
    device: &B::Device,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<LayerFit>, CompressError> {
    let n = samples.len();
    let t = samples.first().map_or(0, Vec::len);
    if n < 2 || opts.heldout == 0 || opts.heldout >= n || t == 0 {
        return Err(CompressError::Calibration(format!("need at least 2 samples with some held out ({n} samples, {} held out)", opts.heldout)));
    }
    let cfg = ModelConfig::load(finetuned.dir())?;
    if let Some(w) = c.weights.iter().find(|w| block_projection(&w.name).is_none_or(|(i, p)| i >= cfg.num_hidden_layers || !PROJECTIONS.contains(&p))) {
        return Err(CompressError::Calibration(format!("{}: not a projection of the model", w.name)));
    }
    let ft_weights = Weights::<B>::new(finetuned, None, device.clone())?;
    let base_weights = Weights::<B>::new(base, None, device.clone())?;
    // One block of teacher and student at a time: the model without blocks embeds the samples,
    // each block is loaded when the walk gets to it and dropped after.
    let embedder = Llama::load_first_blocks(cfg.clone(), &ft_weights, 0)?;

    let train_rows = (n - opts.heldout) * t;
    let total = c.weights.len();
    let mut fits = Vec::with_capacity(total);
    // `y_t`: the teacher layer's output on the teacher's input; `x_s`: the student's input.
    // Returns the student layer's output on `x_s`, calibrated where it has a delta.
    let mut fit_one = |y_t: &Tensor<B, 2>, student_proj: &mut Projection<B>, x_s: &Tensor<B, 2>| -> Result<Tensor<B, 2>, CompressError> {
        let Projection::Delta(d) = student_proj else { return Ok(student_proj.forward(x_s.clone())) };
        let (fit, y_s) = fit_layer(d, y_t, x_s, train_rows, opts)?;
        progress(fits.len() + 1, total, &fit.name);
        fits.push(fit);
        Ok(y_s)
    };

    // The student's embeddings are the fine-tune's, as `apply` gives them.
    let mut x_t = embedder.embed(samples)?;
    let mut x_s = x_t.clone();
    let hidden = cfg.hidden_size;
    let (cos, sin) = embedder.rope_tables(t);
    drop(embedder);
    for i in 0..cfg.num_hidden_layers {
        let lt = Block::load(&ft_weights, &cfg, i)?;
        // The student block shares the teacher's tensors except for its compressed projections.
        let mut student_block = lt.clone();
        let ls = &mut student_block;
        // This block's compressed weights: (index in `c.weights`, projection name in the block).
        let mine: Vec<(usize, &'static str)> = c
            .weights
            .iter()
            .enumerate()
            .filter_map(|(k, w)| block_projection(&w.name).filter(|&(b, _)| b == i).and_then(|(_, p)| PROJECTIONS.iter().find(|&&q| q == p)).map(|&p| (k, p)))
            .collect();
        for &(k, p) in &mine {
            let w = &c.weights[k];
            let proj = ls.projection_mut(p).expect("checked above");
            let bias = proj.linear().bias.clone();
            let linear = Linear::from_tensor(base_weights.matrix_t(&w.name, w.rows(), w.cols())?, bias);
            *proj = Projection::Delta(DeltaLinear::new(linear, w.clone())?);
        }
        // Everything of this block is in f32 tensors now; the mapped pages need not stay resident.
        base.release_pages();
        finetuned.release_pages();
        let lt = &lt;
        let (at, mt) = (&lt.self_attn, &lt.mlp);
        let flat = |x: Tensor<B, 3>| x.reshape([n * t, hidden]);
        // Each teacher output is computed once: as a fit's target and for the teacher's forward.
        let h_t = flat(lt.input_layernorm.forward(x_t.clone()));
        let h_s = flat(ls.input_layernorm.forward(x_s.clone()));
        // The student's outputs come out of the fits (no second product through its layers).
        let (q_t, k_t, v_t) = (at.q_proj.forward(h_t.clone()), at.k_proj.forward(h_t.clone()), at.v_proj.forward(h_t));
        let q_s = fit_one(&q_t, &mut ls.self_attn.q_proj, &h_s)?;
        let k_s = fit_one(&k_t, &mut ls.self_attn.k_proj, &h_s)?;
        let v_s = fit_one(&v_t, &mut ls.self_attn.v_proj, &h_s)?;
        let ctx_t = at.attend(q_t, k_t, v_t, n, &cos, &sin, None);
        let ctx_s = ls.self_attn.attend(q_s, k_s, v_s, n, &cos, &sin, None);
        let o_t = at.o_proj.forward(ctx_t);
        let o_s = fit_one(&o_t, &mut ls.self_attn.o_proj, &ctx_s)?;
        let a_t = x_t + o_t.reshape([n, t, hidden]);
        let a_s = x_s + o_s.reshape([n, t, hidden]);
        let h_t = flat(lt.post_attention_layernorm.forward(a_t.clone()));
        let h_s = flat(ls.post_attention_layernorm.forward(a_s.clone()));
        let (gate_t, up_t) = (mt.gate_proj.forward(h_t.clone()), mt.up_proj.forward(h_t));
        let gate_s = fit_one(&gate_t, &mut ls.mlp.gate_proj, &h_s)?;
        let up_s = fit_one(&up_t, &mut ls.mlp.up_proj, &h_s)?;
        let act_t = silu(gate_t) * up_t;
        let act_s = silu(gate_s) * up_s;
        let down_t = mt.down_proj.forward(act_t);
        let down_s = fit_one(&down_t, &mut ls.mlp.down_proj, &act_s)?;
        x_t = a_t + down_t.reshape([n, t, hidden]);
        x_s = a_s + down_s.reshape([n, t, hidden]);
        // Carry the kept modes and scales of this block back into the artifact.
        for (k, p) in mine {
            if let Some(Projection::Delta(d)) = ls.projection_mut(p) {
                c.weights[k].mode = d.delta.mode;
                c.weights[k].scales = d.delta.scales.clone();
            }
        }
    }
    Ok(fits)
}

/// `model.layers.N.{self_attn,mlp}.P.weight` -> (N, `{self_attn,mlp}.P`).
fn block_projection(name: &str) -> Option<(usize, &str)> {
    let (i, rest) = name.strip_prefix("model.layers.")?.split_once('.')?;
    Some((i.parse().ok()?, rest.strip_suffix(".weight")?))
}

/// `model.layers.N.{self_attn,mlp}.P.weight` -> that projection.
pub(crate) fn projection_mut<'m, X: Backend>(model: &'m mut Llama<X>, name: &str) -> Option<&'m mut Projection<X>> {
    let (i, p) = block_projection(name)?;
    model.layers.get_mut(i)?.projection_mut(p)
}

fn host<B: Backend>(x: &Tensor<B, 2>) -> Vec<f32> {
    with_values(x, <[f32]>::to_vec)
}

/// `X·Δ̂ᵀ` for rows `x` of the layer's input: from `p` = X·Sᵀ on the same rows where it was
/// computed (not empty) and `w` has one scale per output row (scalar, per-output), else by a product.
fn delta_out(w: &CompressedWeight<'_>, x: &[f32], p: &[f32]) -> Result<Vec<f32>, CompressError> {
    let out = w.rows();
    if !p.is_empty() && matches!(w.mode, ScaleMode::Scalar | ScaleMode::PerOutput) {
        let row_scale: Vec<f32> = if w.mode == ScaleMode::Scalar { vec![w.scales[0]; out] } else { w.scales.to_vec() };
        return Ok(p.chunks_exact(out).flat_map(|pr| pr.iter().zip(&row_scale).map(|(v, s)| v * s)).collect());
    }
    let mut y = vec![0f32; x.len() / w.cols().max(1) * out];
    delta_matmul_add(w, x, &mut y)?;
    Ok(y)
}

/// Fits one layer, installs the kept candidate in `d` and returns the fit with the calibrated
/// layer's output on `x_s` (the base product plus the kept delta's).
fn fit_layer<B: Backend>(d: &mut DeltaLinear<B>, y_t: &Tensor<B, 2>, x_s: &Tensor<B, 2>, train_rows: usize, opts: &LayerwiseOptions) -> Result<(LayerFit, Tensor<B, 2>), CompressError> {
    let (modes, keep_initial) = (&opts.modes, opts.keep_initial);
    let (out, inp) = (d.delta.rows(), d.delta.cols());
    let xs = host(x_s);
    // R = what the delta must add: teacher output minus the student's base product (with bias).
    let base_out = host(&d.base.forward(x_s.clone()));
    let mut r = host(y_t);
    r.iter_mut().zip(&base_out).for_each(|(a, b)| *a -= b);
    let (x_tr, x_ho) = xs.split_at(train_rows * inp);
    let (r_tr, r_ho) = r.split_at(train_rows * out);
    let with = |mode: ScaleMode, scales: Vec<f32>| CompressedWeight { name: d.delta.name.clone(), mode, signs: d.delta.signs.clone(), scales: scales.into() };
    // P = X·Sᵀ on every row, for the scalar and per-output fits (training rows), the MSEs of
    // candidates with one scale per output row, and the student's output.
    let p_all = if modes.iter().any(|m| matches!(m, ScaleMode::Scalar | ScaleMode::PerOutput)) {
        let mut p = vec![0f32; r.len()];
        delta_matmul_add(&with(ScaleMode::Scalar, vec![1.0]), &xs, &mut p)?;
        p
    } else {
        Vec::new()
    };
    let (p, p_ho) = p_all.split_at(if p_all.is_empty() { 0 } else { r_tr.len() });
    let mse = |w: &CompressedWeight<'_>, x: &[f32], r: &[f32], p: &[f32]| -> Result<f64, CompressError> {
        let y = delta_out(w, x, p)?;
        Ok(y.iter().zip(r).map(|(a, b)| ((b - a) as f64).powi(2)).sum::<f64>() / r.len().max(1) as f64)
    };
    let heldout_mse = |w: &CompressedWeight<'_>| mse(w, x_ho, r_ho, p_ho);
    let init = d.delta.clone();
    let init_mse = heldout_mse(&init)?;
    let init_label = format!("{} (weight-space)", init.mode.name());
    let mut candidates: Vec<(String, CompressedWeight<'static>)> = if keep_initial { vec![(init_label, init.clone())] } else { Vec::new() };
    for &mode in modes {
        if let Solver::AdamW { epochs, lr, batch_rows } = opts.solver {
            if mode == ScaleMode::TwoSided {
                continue;
            }
            let scales = adamw_fit(&with(mode, initial_scales(&init, mode)?), x_tr, r_tr, p, epochs, lr, batch_rows)?;
            if scales.iter().any(|s| !s.is_finite()) {
                return Err(CompressError::Calibration(format!("{}: the {} AdamW fit diverged (non-finite scales)", d.delta.name, mode.name())));
            }
            candidates.push((mode.name().to_string(), with(mode, scales)));
            continue;
        }
        let scales = match mode {
            ScaleMode::Scalar => {
                let (num, den) = p.iter().zip(r_tr).fold((0f64, 0f64), |(n, d), (&p, &r)| (n + p as f64 * r as f64, d + p as f64 * p as f64));
                if den > 0.0 { vec![(num / den) as f32] } else { continue }
            }
            ScaleMode::PerOutput => per_output_fit(p, r_tr, out, &initial_scales(&init, mode)?),
            ScaleMode::PerInput => per_input_fit(&d.delta, x_tr, r_tr, train_rows)?,
            ScaleMode::TwoSided => continue,
        };
        if scales.iter().any(|s| !s.is_finite()) {
            return Err(CompressError::Calibration(format!("{}: the {} fit is not finite (degenerate calibration data?)", d.delta.name, mode.name())));
        }
        candidates.push((mode.name().to_string(), with(mode, scales)));
    }
    let (mut scored, mut train_mse) = (BTreeMap::new(), BTreeMap::new());
    let mut best: Option<(f64, String, CompressedWeight<'static>)> = None;
    let candidates_scalar = candidates.iter().find(|(l, _)| l == "scalar").cloned();
    for (label, w) in candidates {
        train_mse.insert(label.clone(), mse(&w, x_tr, r_tr, p)?);
        let mse = heldout_mse(&w)?;
        scored.insert(label.clone(), mse);
        if best.as_ref().is_none_or(|(m, _, _)| mse < *m) {
            best = Some((mse, label, w));
        }
    }
    let Some((best_mse, mut kept, mut w)) = best else {
        return Err(CompressError::Calibration(format!("{}: no candidate could be fitted", d.delta.name)));
    };
    // Prefer the one-scale fit unless a vector clearly pays.
    if let (Some(&scalar_mse), Some((_, sw))) = (scored.get("scalar"), candidates_scalar) {
        if opts.vector_margin > 0.0 && w.mode != ScaleMode::Scalar && best_mse >= scalar_mse * (1.0 - opts.vector_margin) {
            kept = "scalar".to_string();
            w = sw;
        }
    }
    let mut y_s = delta_out(&w, &xs, &p_all)?;
    y_s.iter_mut().zip(&base_out).for_each(|(y, b)| *y += b);
    let y_s = Tensor::from_data(TensorData::new(y_s, [xs.len() / inp.max(1), out]), &x_s.device());
    let fit = LayerFit { name: w.name.to_string(), kept, mode: w.mode, heldout_mse: scored, train_mse, init_mse };
    // A new layer, so no device copy of the old scales outlives them.
    *d = DeltaLinear::new(d.base.clone(), w)?;
    Ok((fit, y_s))
}

/// The weight-space scales of `w` expressed in `mode` (means of the row / column factors).
fn initial_scales(w: &CompressedWeight<'_>, mode: ScaleMode) -> Result<Vec<f32>, CompressError> {
    let f = delta_kernels::merge::ScaleFactors::new(&w.name, w.mode, &w.scales, w.rows(), w.cols())?;
    let mean = |v: &[f32]| (v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64) as f32;
    let (rm, cm) = (mean(&f.rows), mean(&f.cols));
    Ok(match mode {
        ScaleMode::Scalar => vec![rm * cm],
        ScaleMode::PerOutput => f.rows.iter().map(|r| r * cm).collect(),
        ScaleMode::PerInput => f.cols.iter().map(|c| c * rm).collect(),
        ScaleMode::TwoSided => w.scales.to_vec(),
    })
}

/// AdamW on the output MSE ‖R − X·Δ̂ᵀ‖² / (rows·out), starting from `w`'s scales. `p` = X·Sᵀ on
/// the same rows (for scalar and per-output).
fn adamw_fit(w: &CompressedWeight<'_>, x: &[f32], r: &[f32], p: &[f32], epochs: usize, lr: f64, batch_rows: usize) -> Result<Vec<f32>, CompressError> {
    let (out, inp) = (w.rows(), w.cols());
    let rows = r.len() / out;
    let mut scales: Vec<f64> = w.scales.iter().map(|&v| v as f64).collect();
    let (mut m, mut v) = (vec![0f64; scales.len()], vec![0f64; scales.len()]);
    let dense_s: Vec<f32> = if w.mode == ScaleMode::PerInput {
        (0..out).flat_map(|i| (0..inp).map(move |j| (i, j))).map(|(i, j)| w.signs.sign(i, j)).collect()
    } else {
        Vec::new()
    };
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-12f64);
    let mut step = 0;
    for _ in 0..epochs {
        for r0 in (0..rows).step_by(batch_rows.max(1)) {
            let nb = batch_rows.min(rows - r0);
            let (xb, rb) = (&x[r0 * inp..(r0 + nb) * inp], &r[r0 * out..(r0 + nb) * out]);
            let current = CompressedWeight { name: w.name.clone(), mode: w.mode, signs: w.signs.clone(), scales: scales.iter().map(|&s| s as f32).collect::<Vec<_>>().into() };
            let mut e = vec![0f32; nb * out];
            delta_matmul_add(&current, xb, &mut e)?;
            e.iter_mut().zip(rb).for_each(|(y, r)| *y = r - *y);
            let k = -2.0 / (nb * out) as f64;
            let grad: Vec<f64> = match w.mode {
                ScaleMode::Scalar => vec![k * p[r0 * out..(r0 + nb) * out].iter().zip(&e).map(|(&p, &e)| p as f64 * e as f64).sum::<f64>()],
                ScaleMode::PerOutput => {
                    let mut g = vec![0f64; out];
                    for (pr, er) in p[r0 * out..(r0 + nb) * out].chunks_exact(out).zip(e.chunks_exact(out)) {
                        g.iter_mut().zip(pr.iter().zip(er)).for_each(|(g, (&p, &e))| *g += k * p as f64 * e as f64);
                    }
                    g
                }
                ScaleMode::PerInput => {
                    // (E·S)[t, j], then Σ_t X[t, j]·(E·S)[t, j].
                    let mut es = vec![0f32; nb * inp];
                    // SAFETY: E [nb, out], S [out, inp], ES [nb, inp], all row-major in their buffers.
                    unsafe {
                        matrixmultiply::sgemm(nb, out, inp, 1.0, e.as_ptr(), out as isize, 1, dense_s.as_ptr(), inp as isize, 1, 0.0, es.as_mut_ptr(), inp as isize, 1);
                    }
                    let mut g = vec![0f64; inp];
                    for (xr, er) in xb.chunks_exact(inp).zip(es.chunks_exact(inp)) {
                        g.iter_mut().zip(xr.iter().zip(er)).for_each(|(g, (&x, &e))| *g += k * x as f64 * e as f64);
                    }
                    g
                }
                ScaleMode::TwoSided => return Err(CompressError::Calibration("AdamW fits one-sided modes".into())),
            };
            step += 1;
            for (((s, m), v), g) in scales.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(grad) {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                let (mh, vh) = (*m / (1.0 - b1.powi(step)), *v / (1.0 - b2.powi(step)));
                *s -= lr * mh / (vh.sqrt() + eps);
            }
        }
    }
    Ok(scales.iter().map(|&s| s as f32).collect())
}

/// The vector fits' ridge towards the weight-space scales, as a fraction of the mean diagonal of
/// their normal equations: only rows / columns the data hardly excites move noticeably.
const RIDGE: f64 = 1e-6;

/// Least-squares per-output scales from `p` = X·Sᵀ and the residual `r` (both `[rows, out]`):
/// s[i] = ⟨P[:, i], R[:, i]⟩ / ⟨P[:, i], P[:, i]⟩, with [`RIDGE`] as in [`per_input_fit`] (of the
/// mean ⟨P[:, i], P[:, i]⟩, towards the weight-space scales `prior`): a row the data
/// hardly excites keeps about its weight-space scale instead of a noisy or zero one.
fn per_output_fit(p: &[f32], r: &[f32], out: usize, prior: &[f32]) -> Vec<f32> {
    let (mut num, mut den) = (vec![0f64; out], vec![0f64; out]);
    for (pr, rr) in p.chunks_exact(out).zip(r.chunks_exact(out)) {
        for i in 0..out {
            num[i] += pr[i] as f64 * rr[i] as f64;
            den[i] += pr[i] as f64 * pr[i] as f64;
        }
    }
    let lambda = (RIDGE * den.iter().sum::<f64>() / out.max(1) as f64).max(f64::MIN_POSITIVE);
    (0..out).map(|i| ((num[i] + lambda * prior[i] as f64) / (den[i] + lambda)) as f32).collect()
}

/// Least-squares per-input scales: ((XᵀX) ⊙ (SᵀS))·c = b with b[j] = Σ_i S[i, j]·(XᵀR)[j, i].
fn per_input_fit(w: &CompressedWeight<'_>, x: &[f32], r: &[f32], rows: usize) -> Result<Vec<f32>, CompressError> {
    let (out, inp) = (w.rows(), w.cols());
    let s: Vec<f32> = (0..out).flat_map(|i| (0..inp).map(move |j| (i, j))).map(|(i, j)| w.signs.sign(i, j)).collect();
    let xtx = gemm_tn(x, x, rows, inp, inp);
    let sts = gemm_tn(&s, &s, out, inp, inp);
    let xtr = gemm_tn(x, r, rows, inp, out);
    let mut a: Vec<f64> = xtx.iter().zip(&sts).map(|(p, q)| *p as f64 * *q as f64).collect();
    let mut b: Vec<f64> = (0..inp).map(|j| (0..out).map(|i| s[i * inp + j] as f64 * xtr[j * out + i] as f64).sum()).collect();
    // [`RIDGE`] of the mean diagonal, pulling towards the weight-space scales.
    let c0: Vec<f64> = initial_scales(w, ScaleMode::PerInput)?.iter().map(|&c| c as f64).collect();
    let lambda = RIDGE * (0..inp).map(|j| a[j * inp + j]).sum::<f64>() / inp as f64;
    for j in 0..inp {
        a[j * inp + j] += lambda.max(f64::MIN_POSITIVE);
        b[j] += lambda * c0[j];
    }
    cholesky_solve(&mut a, &mut b, inp).ok_or_else(|| CompressError::Calibration(format!("{}: per-input normal equations are not positive definite", w.name)))?;
    Ok(b.iter().map(|&v| v as f32).collect())
}

/// `Aᵀ·B` for row-major A `[k, m]` and B `[k, n]` -> `[m, n]`.
fn gemm_tn(a: &[f32], b: &[f32], k: usize, m: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    // SAFETY: Aᵀ is A read with strides (1, m), B is row-major [k, n], C row-major [m, n].
    unsafe {
        matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), 1, m as isize, b.as_ptr(), n as isize, 1, 0.0, c.as_mut_ptr(), n as isize, 1);
    }
    c
}

/// Solves A·x = b in place (x in `b`) for symmetric positive definite A `[n, n]`, row-major; A's
/// lower triangle becomes the Cholesky factor L, its upper triangle scratch. `None` if A is not
/// positive definite (or holds NaN).
///
/// Blocked, so that almost all of the n³/3 multiply-adds are one GEMM per panel: for each panel
/// of `PANEL` columns, factor its diagonal block, solve the rows below it against that block
/// (rows in parallel), then subtract the panel's outer product from the trailing matrix. An
/// unblocked loop is a chain of dependent scalar operations: 1.2 G of them for `down_proj`'s
/// 1,536 columns, seconds per layer.
fn cholesky_solve(a: &mut [f64], b: &mut [f64], n: usize) -> Option<()> {
    const PANEL: usize = 64;
    assert_eq!((a.len(), b.len()), (n * n, n));
    for k0 in (0..n).step_by(PANEL) {
        let k1 = (k0 + PANEL).min(n);
        // The diagonal block; columns before k0 are already subtracted by the trailing updates.
        for j in k0..k1 {
            let row_j = j * n;
            let l_j = &a[row_j + k0..row_j + j];
            let d = a[row_j + j] - dot(l_j, l_j);
            if !(d > 0.0) {
                return None;
            }
            let d = d.sqrt();
            a[row_j + j] = d;
            for i in j + 1..k1 {
                let s = a[i * n + j] - dot(&a[i * n + k0..i * n + j], &a[row_j + k0..row_j + j]);
                a[i * n + j] = s / d;
            }
        }
        if k1 == n {
            break;
        }
        // The panel below the diagonal block: L[i, k0..k1] solves L[i, ·]·Lₖₖᵀ = A[i, k0..k1].
        let (head, below) = a.split_at_mut(k1 * n);
        let diag = &head[k0 * n..];
        below.par_chunks_mut(n).for_each(|row| {
            for j in k0..k1 {
                let s = row[j] - dot(&row[k0..j], &diag[(j - k0) * n + k0..(j - k0) * n + j]);
                row[j] = s / diag[(j - k0) * n + j];
            }
        });
        // The trailing matrix: A[k1.., k1..] −= P·Pᵀ with P = L[k1.., k0..k1]. P and the trailing
        // block are disjoint column ranges of the same rows.
        let m = n - k1;
        let p = a.as_mut_ptr();
        // SAFETY: P is read at rows k1..n, columns k0..k1 (row stride n); C is written at rows
        // k1..n, columns k1..n. Both lie inside `a` and never overlap.
        unsafe {
            let panel = p.add(k1 * n + k0) as *const f64;
            matrixmultiply::dgemm(m, k1 - k0, m, -1.0, panel, n as isize, 1, panel, 1, n as isize, 1.0, p.add(k1 * n + k1), n as isize, 1);
        }
    }
    for i in 0..n {
        b[i] = (b[i] - dot(&a[i * n..i * n + i], &b[..i])) / a[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = b[i];
        for k in i + 1..n {
            s -= a[k * n + i] * b[k];
        }
        b[i] = s / a[i * n + i];
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_output_fit_recovers_planted_scales_and_keeps_the_prior_where_there_is_no_signal() {
        // R[:, i] = s[i]·P[:, i] for rows 0..3; row 3 gets no excitation (P[:, 3] = 0).
        let (rows, out) = (50, 4);
        let planted = [0.5f32, -2.0, 3e-3, 0.0];
        let prior = [0.1f32, 0.2, 0.3, 0.04];
        let mut p = vec![0f32; rows * out];
        let mut r = vec![0f32; rows * out];
        for t in 0..rows {
            for i in 0..3 {
                let v = ((t * 7 + i * 13) % 11) as f32 - 5.0;
                p[t * out + i] = v;
                r[t * out + i] = planted[i] * v;
            }
        }
        let s = per_output_fit(&p, &r, out, &prior);
        for i in 0..3 {
            // The ridge moves a fitted scale by ~1e-6 of its distance to the prior.
            assert!((s[i] - planted[i]).abs() <= 1e-5, "row {i}: {} against {}", s[i], planted[i]);
        }
        assert_eq!(s[3], prior[3], "an unexcited row keeps its weight-space scale");
    }

    #[test]
    fn cholesky_solves_a_known_system() {
        // A = [[4, 2], [2, 3]], x = [1, -2] -> b = [0, -4].
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        let mut b = vec![0.0, -4.0];
        cholesky_solve(&mut a, &mut b, 2).unwrap();
        assert!((b[0] - 1.0).abs() < 1e-12 && (b[1] + 2.0).abs() < 1e-12, "{b:?}");
        assert!(cholesky_solve(&mut [1.0, 2.0, 2.0, 1.0], &mut [0.0, 0.0], 2).is_none());
    }

    #[test]
    fn blocked_cholesky_solves_systems_across_panels() {
        // n = 150: two whole panels of 64 columns and a partial one. A = MᵀM + I.
        let n = 150;
        let m: Vec<f64> = (0..n * n).map(|k| (k * 7919 % 1009) as f64 / 1009.0 - 0.5).collect();
        let a: Vec<f64> = (0..n * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                (0..n).map(|k| m[k * n + i] * m[k * n + j]).sum::<f64>() + if i == j { 1.0 } else { 0.0 }
            })
            .collect();
        let x: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..n).map(|i| (0..n).map(|j| a[i * n + j] * x[j]).sum()).collect();
        let (mut l, mut got) = (a.clone(), b.clone());
        cholesky_solve(&mut l, &mut got, n).unwrap();
        let err = got.iter().zip(&x).map(|(g, w)| (g - w).abs()).fold(0f64, f64::max);
        assert!(err <= 1e-9, "largest error {err}");
        // L·Lᵀ gives A back, entry by entry.
        for i in 0..n {
            for j in 0..=i {
                let llt: f64 = (0..=j).map(|k| l[i * n + k] * l[j * n + k]).sum();
                assert!((llt - a[i * n + j]).abs() <= 1e-9 * a[i * n + i], "({i}, {j}): {llt} vs {}", a[i * n + j]);
            }
        }
        // A pivot that fails in the last panel, and a NaN in the second, are refused.
        let identity = |n: usize| (0..n * n).map(|ij| if ij / n == ij % n { 1.0 } else { 0.0 }).collect::<Vec<f64>>();
        let mut bad = identity(n);
        bad[140 * n + 140] = -1.0;
        assert!(cholesky_solve(&mut bad, &mut vec![1.0; n], n).is_none());
        let mut bad = identity(n);
        bad[100 * n + 90] = f64::NAN;
        assert!(cholesky_solve(&mut bad, &mut vec![1.0; n], n).is_none());
    }

    #[test]
    fn gemm_tn_is_a_transposed_product() {
        // A [k=2, m=3], B [k=2, n=2].
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0];
        assert_eq!(gemm_tn(&a, &b, 2, 3, 2), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
