//! Stage 2 of calibration: end-to-end distillation. The signs are frozen; every compressed
//! weight's scales are trained jointly, with Burn autodiff, so that the student's logits match the
//! teacher's (the fine-tune's) on calibration text.
//!
//! Each weight is `W = W_base + Δ̂₀ ⊙ (θ_r[i]·θ_c[j])` where Δ̂₀ is its delta after stage 1 and θ
//! are multipliers starting at 1: one for `scalar`, one per row for `per-output`, one per column
//! for `per-input`, both for `two-sided`. Training the multipliers instead of the scales makes
//! every step relative to the scale it moves (Adam's step is ~lr in parameter units): a scale of
//! 3e-4 and one of 3e-2 move by the same fraction, which is what lets vector scales train at the
//! learning rate that suits a scalar.
//!
//! The student holds each `W` whole, at the current multipliers, and moves it after every Adam
//! step (`delta_models::ScaledDelta`): a sample then costs three products per layer — the
//! forward one, the input's gradient, and `x·Δ̂₀ᵀ` for the multipliers' gradients — instead of
//! four for the base and the delta apart. Δ̂₀ stays packed (its signs and stage-1 scales: 1/32
//! of a dense f32 copy), so a trained weight costs one f32 matrix, `W` — two where column
//! multipliers need Δ̂₀ᵀ written out for their gradient.
//!
//! The teacher is needed only for its final hidden states (after the final norm), computed once
//! for every sample before training and kept in memory (SmolLM2: 576 floats per position, 44 MB
//! at the defaults); then the teacher's projection weights are freed one by one as the student's
//! replacements (`W`) are built — one model's weights in memory, not two. The student shares
//! every tensor the compression does not touch (embeddings, norms, biases, head) with the
//! teacher, so the hidden states determine the teacher's logits: for the MSE the squared error
//! of the logits is a quadratic form in the difference of the hidden states through the shared
//! head's Gram matrix ([`delta_models::host::logit_squared_error`]), and neither model's head
//! runs; KL needs the distributions, and the teacher's logits are recomputed from its hidden
//! states through the head for each sample (one product, where keeping them took 25 MB per
//! 128-token sample of SmolLM2, 3.8 GB of scratch file at the defaults).
//!
//! Any Burn backend `B`, trained through `Autodiff<B>`: the CPU's, or a GPU's with
//! `delta-models`' `wgpu` / `cuda` features. Adam itself runs on the host (a few numbers per
//! weight).

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use delta_format::checkpoint::Checkpoint;
use delta_format::{CompressedWeight, ScaleMode};
use delta_kernels::merge::ScaleFactors;
use delta_models::host::{kl_divergence, logit_squared_error, HeadGram};
use delta_models::llama::{Attention, Block, Embedding, Linear, Mlp, RmsNorm};
use delta_models::{Llama, ModelConfig, Projection, ScaledDelta, WeightT, Weights};
use serde::Serialize;

use crate::compress::{CompressError, Compressed};
use crate::layerwise::projection_mut;

/// The backend `B` with gradients.
type AB<B> = Autodiff<B>;

/// What the student's logits are trained to match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DistillLoss {
    /// Mean squared error between the logits (BitDelta's objective).
    Mse,
    /// KL(teacher ‖ student) of the next-token distributions, mean over positions.
    Kl,
}

pub struct DistillOptions {
    pub loss: DistillLoss,
    /// Peak learning rate of Adam on the multipliers (cosine decay to 0 over the run).
    pub lr: f64,
    /// Samples per step.
    pub batch: usize,
    /// Passes over the training samples.
    pub epochs: usize,
    /// Samples (from the end) kept out of training, on which the loss is reported before and after.
    pub heldout: usize,
}

/// Where stage 2 is.
#[derive(Clone, Copy, Debug)]
pub enum DistillProgress {
    /// The teacher's final hidden states for `done` of `total` samples are computed.
    Teacher { done: usize, total: usize },
    /// Training step `step` of `steps` is done; its batch's loss before the update.
    Step { step: usize, steps: usize, loss: f64 },
}

/// What stage 2 did.
#[derive(Clone, Debug, Serialize)]
pub struct DistillReport {
    pub loss: DistillLoss,
    pub lr: f64,
    pub batch: usize,
    pub steps: usize,
    pub train_samples: usize,
    pub heldout_samples: usize,
    /// Held-out loss with the scales stage 2 started from, and with the trained ones.
    pub heldout_before: f64,
    pub heldout_after: f64,
    /// Training loss of every step (on that step's batch, before its update).
    pub train_losses: Vec<f64>,
    /// Wall time of the whole stage (loading, scoring and training).
    pub seconds: f64,
    /// Of which the teacher's pass over every sample.
    pub teacher_seconds: f64,
}

/// One compressed weight's trainable multipliers and the tensors they scale.
struct Trainable<B: Backend> {
    name: String,
    mode: ScaleMode,
    /// The weight at the current multipliers, `W_base + Δ̂₀ ⊙ (θ_r·θ_cᵀ)` (as `Wᵀ`, moved after
    /// every update), with the fine-tune's bias; Δ̂₀, packed; and Δ̂₀ᵀ written out where column
    /// multipliers need it for their gradient (not on the CPU).
    merged: Linear<AB<B>>,
    delta: Arc<CompressedWeight<'static>>,
    delta_t: Option<Tensor<AB<B>, 2>>,
    /// Row multipliers θ_r (`[1, out]`) and column multipliers θ_c (`[1, in]`), where the mode has them.
    rows: Option<Adam>,
    cols: Option<Adam>,
}

/// Adam (β 0.9 / 0.999, no weight decay) over one parameter vector, on the host.
struct Adam {
    theta: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Adam {
    fn ones(n: usize) -> Self {
        Adam { theta: vec![1.0; n], m: vec![0.0; n], v: vec![0.0; n] }
    }

    fn step(&mut self, grad: &[f64], lr: f64, t: i32) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        for (((p, m), v), &g) in self.theta.iter_mut().zip(&mut self.m).zip(&mut self.v).zip(grad) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= lr * (*m / (1.0 - b1.powi(t))) / ((*v / (1.0 - b2.powi(t))).sqrt() + eps);
        }
    }

    /// θ as a `[1, n]` tensor tracked for its gradient.
    fn tracked<B: Backend>(&self, device: &B::Device) -> Tensor<AB<B>, 2> {
        let values: Vec<f32> = self.theta.iter().map(|&v| v as f32).collect();
        Tensor::<AB<B>, 2>::from_data(TensorData::new(values, [1, self.theta.len()]), device).require_grad()
    }
}

impl<B: Backend> Trainable<B> {
    /// The layer with the current multipliers, and those: tracked for gradients when `grad`;
    /// without them (the merged weight alone, one product) when not.
    fn layer(&self, grad: bool) -> (Projection<AB<B>>, Thetas<B>) {
        let device = self.merged.weight_t.device();
        let r = self.rows.as_ref().filter(|_| grad).map(|a| a.tracked::<B>(&device));
        let c = self.cols.as_ref().filter(|_| grad).map(|a| a.tracked::<B>(&device));
        let layer = ScaledDelta { merged: self.merged.clone(), delta: self.delta.clone(), delta_t: self.delta_t.clone(), rows: r.clone(), cols: c.clone() };
        (Projection::Scaled(layer), (r, c))
    }

    /// One Adam step on the multipliers (gradients `gr`, `gc`), the merged weight moved with them.
    fn step(&mut self, gr: &[f64], gc: &[f64], lr: f64, t: i32) {
        let theta = |a: &Option<Adam>| a.as_ref().map_or(Vec::new(), |a| a.theta.clone());
        let before = (theta(&self.rows), theta(&self.cols));
        for (adam, g) in [(self.rows.as_mut(), gr), (self.cols.as_mut(), gc)] {
            if let Some(adam) = adam {
                adam.step(g, lr, t);
            }
        }
        let after = (theta(&self.rows), theta(&self.cols));
        let moved = ScaledDelta::<B>::moved(self.merged.weight_t.to_tensor().inner(), &self.delta, (&before.0, &before.1), (&after.0, &after.1));
        self.merged.weight_t = WeightT::Tensor(Tensor::from_inner(moved));
    }

    /// The trained scales in the artifact's layout for `mode`.
    fn scales(&self, start: &[f32], out: usize) -> Vec<f32> {
        let r = |i: usize| self.rows.as_ref().map_or(1.0, |a| a.theta[i]);
        let c = |j: usize| self.cols.as_ref().map_or(1.0, |a| a.theta[j]);
        match self.mode {
            ScaleMode::Scalar => vec![(start[0] as f64 * r(0)) as f32],
            ScaleMode::PerOutput => start.iter().enumerate().map(|(i, &s)| (s as f64 * r(i)) as f32).collect(),
            ScaleMode::PerInput => start.iter().enumerate().map(|(j, &s)| (s as f64 * c(j)) as f32).collect(),
            ScaleMode::TwoSided => start
                .iter()
                .enumerate()
                .map(|(k, &s)| (s as f64 * if k < out { r(k) } else { c(k - out) }) as f32)
                .collect(),
        }
    }
}

/// Runs stage 2 over every compressed weight of `c` (updating its scales) on `samples` (token id
/// rows of equal length; the last `opts.heldout` are only evaluated), the models on `device` of
/// backend `B`, reporting progress after each teacher batch and each step. A non-finite loss or
/// gradient stops with an error and leaves `c` unchanged.
pub fn distill<B: Backend>(
    c: &mut Compressed,
    base: &Checkpoint,
    finetuned: &Checkpoint,
    samples: &[Vec<u32>],
    opts: &DistillOptions,
    device: &B::Device,
    progress: &mut dyn FnMut(DistillProgress),
) -> Result<DistillReport, CompressError> {
    let started = std::time::Instant::now();
    let n = samples.len();
    let t = samples.first().map_or(0, Vec::len);
    if opts.heldout == 0 || opts.heldout >= n || t == 0 || opts.batch == 0 || opts.epochs == 0 {
        return Err(CompressError::Calibration(format!(
            "stage 2 needs samples to train on and some held out ({n} samples, {} held out, batch {}, {} epochs)",
            opts.heldout, opts.batch, opts.epochs
        )));
    }
    if !(opts.lr.is_finite() && opts.lr > 0.0) {
        return Err(CompressError::Calibration(format!("the learning rate must be a positive number, not {}", opts.lr)));
    }
    if samples.iter().any(|s| s.len() != t) {
        return Err(CompressError::Calibration("stage 2 needs samples of equal length".into()));
    }
    let cfg = ModelConfig::load(finetuned.dir())?;
    let teacher = Llama::<B>::load(cfg.clone(), &Weights::<B>::new(finetuned, None, device.clone())?)?;
    let teacher_started = std::time::Instant::now();
    let targets = Targets::compute(&teacher, samples, opts, &mut |done| progress(DistillProgress::Teacher { done, total: n }))?;
    let teacher_seconds = teacher_started.elapsed().as_secs_f64();
    // The student starts as the teacher (sharing its tensors); each projection it trains replaces
    // the teacher's weight as soon as it is built, so that weight is freed before the next.
    let mut student = lift(&teacher);
    drop(teacher);
    let base_weights = Weights::<B>::new(base, None, device.clone())?;
    let mut trainables = Vec::with_capacity(c.weights.len());
    for w in &c.weights {
        let (out, inp) = (w.rows(), w.cols());
        let Some(proj) = projection_mut(&mut student, &w.name) else {
            return Err(CompressError::Calibration(format!("{}: not a projection of the model", w.name)));
        };
        // The scales fit the mode: checked here, where it can be an error, not a panic later.
        ScaleFactors::new(&w.name, w.mode, &w.scales, out, inp)?;
        let delta = Arc::new(w.clone());
        // All multipliers start at 1: the merged weight is W_base + Δ̂₀. Δ̂₀ᵀ is kept written out
        // only where column multipliers need it for their gradient on a backend other than the
        // CPU (the CPU computes that gradient from the signs).
        let delta_t = delta_models::delta_t::<B>(&delta, device);
        let merged = Linear::from_tensor(Tensor::from_inner(base_weights.matrix_t(&w.name, out, inp)? + delta_t.clone()), proj.linear().bias.clone());
        let (rows, cols) = match w.mode {
            ScaleMode::Scalar => (Some(Adam::ones(1)), None),
            ScaleMode::PerOutput => (Some(Adam::ones(out)), None),
            ScaleMode::PerInput => (None, Some(Adam::ones(inp))),
            ScaleMode::TwoSided => (Some(Adam::ones(out)), Some(Adam::ones(inp))),
        };
        let delta_t = (cols.is_some() && !delta_models::host::is_cpu::<B>()).then(|| Tensor::from_inner(delta_t));
        let tr = Trainable { name: w.name.to_string(), mode: w.mode, merged, delta, delta_t, rows, cols };
        *proj = tr.layer(false).0;
        trainables.push(tr);
    }
    drop(base_weights);
    // Everything needed is in f32 tensors now; the mapped checkpoint pages need not stay resident.
    base.release_pages();
    finetuned.release_pages();

    let (train, heldout) = samples.split_at(n - opts.heldout);
    let batches: Vec<&[Vec<u32>]> = train.chunks(opts.batch).collect();
    let steps = batches.len() * opts.epochs;
    let evaluate = |student: &mut Llama<AB<B>>, trainables: &[Trainable<B>]| -> Result<f64, CompressError> {
        install(student, trainables, false);
        let mut total = 0.0;
        for (k, chunk) in heldout.chunks(opts.batch).enumerate() {
            let first = n - opts.heldout + k * opts.batch;
            let l = targets.loss(student, samples, first..first + chunk.len(), device)?;
            total += l.into_scalar().elem::<f64>() * chunk.len() as f64;
        }
        Ok(total / heldout.len() as f64)
    };
    let heldout_before = evaluate(&mut student, &trainables)?;
    let mut train_losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let b = step % batches.len();
        let batch = batches[b];
        // One sample at a time, gradients summed: the batch's mean loss without holding the
        // activations (and, for KL, logits) of the whole batch at once.
        let mut grads: Vec<(Vec<f64>, Vec<f64>)> = trainables.iter().map(|tr| (zeros(&tr.rows), zeros(&tr.cols))).collect();
        let mut value = 0.0;
        for k in 0..batch.len() {
            let thetas = install(&mut student, &trainables, true);
            let index = b * opts.batch + k;
            let l = targets.loss(&student, samples, index..index + 1, device)?.div_scalar(batch.len() as f64);
            let v = l.clone().into_scalar().elem::<f64>();
            if !v.is_finite() {
                return Err(CompressError::Calibration(format!("stage 2 diverged at step {} of {steps}: the loss is {v}", step + 1)));
            }
            value += v;
            let g = l.backward();
            for ((r, c), (gr, gc)) in thetas.iter().zip(grads.iter_mut()) {
                for (theta, acc) in [(r, gr), (c, gc)] {
                    let Some(theta) = theta else { continue };
                    let values = theta.grad(&g).map(|g| g.into_data().into_vec::<f32>().expect("f32 gradient")).unwrap_or_default();
                    acc.iter_mut().zip(values).for_each(|(a, v)| *a += v as f64);
                }
            }
        }
        // Cosine decay from lr to 0 over the run.
        let lr = opts.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / steps as f64).cos());
        if let Some(tr) = trainables.iter().zip(&grads).find(|(_, (gr, gc))| gr.iter().chain(gc).any(|v| !v.is_finite())).map(|(tr, _)| tr) {
            return Err(CompressError::Calibration(format!("stage 2 diverged at step {}: a non-finite gradient for {}", step + 1, tr.name)));
        }
        for (tr, (gr, gc)) in trainables.iter_mut().zip(grads) {
            tr.step(&gr, &gc, lr, step as i32 + 1);
            // Into the student at once, so the weight it replaces is freed before the next moves.
            *projection_mut(&mut student, &tr.name).expect("checked when built") = tr.layer(false).0;
        }
        train_losses.push(value);
        progress(DistillProgress::Step { step: step + 1, steps, loss: value });
    }
    let heldout_after = evaluate(&mut student, &trainables)?;
    if !heldout_after.is_finite() {
        return Err(CompressError::Calibration(format!("stage 2 diverged: the held-out loss is {heldout_after}")));
    }
    for (w, tr) in c.weights.iter_mut().zip(&trainables) {
        let scales = tr.scales(&w.scales, w.rows());
        if scales.iter().any(|s| !s.is_finite()) {
            return Err(CompressError::Calibration(format!("{}: stage 2 produced non-finite scales", w.name)));
        }
        w.scales = scales.into();
    }
    Ok(DistillReport {
        loss: opts.loss,
        lr: opts.lr,
        batch: opts.batch,
        steps,
        train_samples: train.len(),
        heldout_samples: heldout.len(),
        heldout_before,
        heldout_after,
        train_losses,
        seconds: started.elapsed().as_secs_f64(),
        teacher_seconds,
    })
}

/// What the student is trained to match: the teacher's final hidden states for every sample
/// (`[t, hidden]` f32 per sample, samples in order), and for the MSE the shared head's Gram matrix.
struct Targets {
    values: Vec<f32>,
    dims: [usize; 2],
    gram: Option<HeadGram>,
}

impl Targets {
    /// Runs the teacher over `samples` (`opts.batch` at a time); `progress(samples done)` after
    /// each batch.
    fn compute<B: Backend>(teacher: &Llama<B>, samples: &[Vec<u32>], opts: &DistillOptions, progress: &mut dyn FnMut(usize)) -> Result<Self, CompressError> {
        let gram = (opts.loss == DistillLoss::Mse).then(|| HeadGram::of(&teacher.lm_head_t));
        let (t, hidden) = (samples[0].len(), teacher.cfg.hidden_size);
        let mut values = Vec::with_capacity(samples.len() * t * hidden);
        let mut done = 0;
        for chunk in samples.chunks(opts.batch) {
            let h = teacher.final_hidden(chunk)?;
            values.extend(h.into_data().into_vec::<f32>().map_err(|e| CompressError::Calibration(format!("teacher hidden states: {e:?}")))?);
            done += chunk.len();
            progress(done);
        }
        Ok(Targets { values, dims: [t, hidden], gram })
    }

    /// The loss of `student` on `samples[range]`, a scalar: the MSE of the logits, or
    /// KL(teacher ‖ student) of the next-token distributions, mean over positions.
    fn loss<B: Backend>(&self, student: &Llama<AB<B>>, samples: &[Vec<u32>], range: std::ops::Range<usize>, device: &B::Device) -> Result<Tensor<AB<B>, 1>, CompressError> {
        let [t, hidden] = self.dims;
        let (b, rows) = (range.len(), range.len() * t);
        let teacher = Tensor::<B, 2>::from_data(TensorData::new(self.values[range.start * t * hidden..range.end * t * hidden].to_vec(), [rows, hidden]), device);
        let s = student.final_hidden(&samples[range])?;
        Ok(match &self.gram {
            Some(gram) => logit_squared_error(&s.reshape([rows, hidden]), &teacher, gram),
            None => {
                // The teacher's logits through the shared head, untracked.
                let vocab = student.cfg.vocab_size;
                let lt = student.logits(Tensor::from_inner(teacher.reshape([b, t, hidden]))).inner().reshape([rows, vocab]);
                kl_divergence(&student.logits(s).reshape([rows, vocab]), &lt)
            }
        })
    }
}

fn zeros(a: &Option<Adam>) -> Vec<f64> {
    vec![0.0; a.as_ref().map_or(0, |a| a.theta.len())]
}

/// θ_r and θ_c of one weight, where its mode has them.
type Thetas<B> = (Option<Tensor<AB<B>, 2>>, Option<Tensor<AB<B>, 2>>);

/// Puts every trainable layer, with its current multipliers, into the student; returns the θs.
fn install<B: Backend>(student: &mut Llama<AB<B>>, trainables: &[Trainable<B>], grad: bool) -> Vec<Thetas<B>> {
    trainables
        .iter()
        .map(|tr| {
            let (layer, thetas) = tr.layer(grad);
            *projection_mut(student, &tr.name).expect("checked when built") = layer;
            thetas
        })
        .collect()
}

/// The teacher's model on the autodiff backend, sharing its tensors (no copy).
fn lift<B: Backend>(m: &Llama<B>) -> Llama<AB<B>> {
    fn t<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Tensor<AB<B>, D> {
        Tensor::from_inner(x.clone())
    }
    let norm = |n: &RmsNorm<B>| RmsNorm { weight: t(&n.weight), eps: n.eps };
    let linear = |l: &Linear<B>| Linear::from_tensor(t(&l.weight_t.to_tensor()), l.bias.as_ref().map(t));
    let proj = |p: &Projection<B>| match p {
        Projection::Dense(l) => Projection::Dense(linear(l)),
        Projection::Delta(d) => Projection::Dense(Linear::from_tensor(t(&d.merged_weight_t()), d.base.bias.as_ref().map(t))),
        Projection::Scaled(d) => Projection::Scaled(ScaledDelta {
            merged: linear(&d.merged),
            delta: d.delta.clone(),
            delta_t: d.delta_t.as_ref().map(t),
            rows: d.rows.as_ref().map(t),
            cols: d.cols.as_ref().map(t),
        }),
    };
    Llama {
        cfg: m.cfg.clone(),
        embed_tokens: Embedding::Tensor(t(&m.embed_tokens.to_tensor())),
        layers: m
            .layers
            .iter()
            .map(|l| Block {
                input_layernorm: norm(&l.input_layernorm),
                self_attn: Attention {
                    q_proj: proj(&l.self_attn.q_proj),
                    k_proj: proj(&l.self_attn.k_proj),
                    v_proj: proj(&l.self_attn.v_proj),
                    o_proj: proj(&l.self_attn.o_proj),
                    q_norm: l.self_attn.q_norm.as_ref().map(norm),
                    k_norm: l.self_attn.k_norm.as_ref().map(norm),
                    heads: l.self_attn.heads,
                    kv_heads: l.self_attn.kv_heads,
                    head_dim: l.self_attn.head_dim,
                    sliding_window: l.self_attn.sliding_window,
                },
                post_attention_layernorm: norm(&l.post_attention_layernorm),
                mlp: Mlp { gate_proj: proj(&l.mlp.gate_proj), up_proj: proj(&l.mlp.up_proj), down_proj: proj(&l.mlp.down_proj) },
            })
            .collect(),
        norm: norm(&m.norm),
        lm_head_t: WeightT::Tensor(t(&m.lm_head_t.to_tensor())),
        rope: m.rope.clone(),
        device: m.device.clone(),
    }
}
