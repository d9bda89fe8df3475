//! `DeltaLinear`: a linear layer that keeps the base weight dense and the fine-tune's delta packed
//! (1-bit signs + scales), and computes `y = x·W_baseᵀ + x·Δ̂ᵀ` without ever forming a whole
//! dense Δ. On the CPU, up to 16 rows go through one pass that reads the base weight and the
//! signs once (`delta_kernels::fused::dense_delta_matmul_t`); more rows through one GEMM on the
//! merged weight, built a tile at a time (`merged_matmul_t`). On the GPU backends (`wgpu`,
//! `cuda` features) the same split runs as CubeCL kernels on device buffers ([`crate::cube`]). On
//! any other backend the activations make a round trip to host memory for the delta term.

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use delta_format::CompressedWeight;
use delta_kernels::gemm::delta_matmul_add;
use delta_kernels::merge::ScaleFactors;
use rayon::prelude::*;

use crate::cube::DeviceDelta;
use crate::error::ModelError;
use crate::llama::Linear;
use crate::weights::Weights;

#[derive(Clone)]
pub struct DeltaLinear<B: Backend> {
    pub base: Linear<B>,
    pub delta: CompressedWeight<'static>,
    /// The delta's copy in device memory on a GPU backend, made on first use.
    pub device: DeviceDelta,
}

impl<B: Backend> DeltaLinear<B> {
    pub fn new(base: Linear<B>, delta: CompressedWeight<'static>) -> Result<Self, ModelError> {
        let [inp, out] = base.weight_t.dims();
        if (delta.rows(), delta.cols()) != (out, inp) {
            return Err(ModelError::Shape { name: delta.name.to_string(), expected: vec![out, inp], found: vec![delta.rows(), delta.cols()] });
        }
        Ok(DeltaLinear { base, delta, device: DeviceDelta::default() })
    }

    /// `x`: `[rows, in]` -> `[rows, out]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        if let Some(y) = self.fast_product(&x) {
            return self.base.add_bias(y);
        }
        let [rows, _] = x.dims();
        let device = x.device();
        let mut y = vec![0f32; rows * self.delta.rows()];
        crate::host::with_values(&x, |xs| delta_matmul_add(&self.delta, xs, &mut y).expect("shapes checked in new"));
        let term = Tensor::<B, 2>::from_data(TensorData::new(y, [rows, self.delta.rows()]), &device);
        self.base.forward(x) + term
    }

    /// `x·(W_base + Δ̂)ᵀ`, without the bias, on the CPU and GPU backends; `None` on any other. On
    /// the CPU: decode-shaped, base product and delta term in one pass over host values;
    /// prefill-shaped, one GEMM on the merged weight, a tile at a time. On a GPU backend, the
    /// same split in CubeCL kernels.
    pub fn fast_product(&self, x: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        let [rows, _] = x.dims();
        crate::host::few_rows(x, &self.base.weight_t, &[&self.delta], &vec![Some(0); rows])
            .or_else(|| crate::host::merged(x, &self.base.weight_t, &self.delta))
            .or_else(|| crate::cube::delta_product(x, self.base.weight_t.tensor()?, &self.delta, &self.device))
    }

    /// The merged weight as a dense `Wᵀ` (`[in, out]`), in f32 and unrounded: `W_base + Δ̂`.
    pub fn merged_weight_t(&self) -> Tensor<B, 2> {
        self.base.weight_t.to_tensor() + delta_t(&self.delta, &self.base.weight_t.device())
    }
}

/// The form end-to-end calibration trains (on any backend, autodiff included): the weight
/// `W(θ) = W_base + Δ̂₀ ⊙ (r·cᵀ)` with row multipliers `r` (`[1, out]`, or `[1, 1]` for one
/// scalar) and column multipliers `c` (`[1, in]`), each optional (1 where absent).
///
/// `merged` holds `W(θ)` at the multipliers' current values, as a constant. The forward pass is
/// `x·W(θ)ᵀ + (P ⊙ r − P̄ ⊙ r̄)` with `P = (x̄ ⊙ c)·Δ̂₀ᵀ`, where the bars are the same tensors
/// detached. The second term is zero in value and carries the multipliers' gradients (`∂/∂r` is
/// `P`; `c`'s flows through `P`); `x`'s gradient flows through `merged` alone, which is the whole
/// weight. So a training sample costs three products per layer without column multipliers — the
/// forward product, `x`'s gradient and `P` — where the base and the delta taken apart cost four.
/// Whoever changes the multipliers moves `merged` with them ([`ScaledDelta::moved`]).
///
/// Δ̂₀ is kept packed (its signs and the scales the multipliers start from, 1/32 of a dense f32
/// Δ̂₀). Without column multipliers `P` is a constant, computed on the host from the signs
/// (`delta_kernels::fused::delta_matmul_t`: the dense Δ̂₀'s GEMM, bit for bit). With them, on
/// the CPU backend `P` and `c`'s gradient are both products from the signs
/// ([`crate::host::column_delta_product`]); on other backends `c`'s gradient flows through a
/// product with Δ̂₀ᵀ written out (by the function [`delta_t`]), which the field `delta_t` keeps.
#[derive(Clone)]
pub struct ScaledDelta<B: Backend> {
    /// `W(θ)ᵀ` (`[in, out]`) at the current multipliers, and the layer's bias.
    pub merged: Linear<B>,
    /// Δ̂₀ (`[out, in]` signs and its scales), packed.
    pub delta: Arc<CompressedWeight<'static>>,
    /// Δ̂₀ᵀ written out, where column multipliers need it for their gradient on a backend other
    /// than the CPU (built for each forward pass when absent there; unused on the CPU).
    pub delta_t: Option<Tensor<B, 2>>,
    pub rows: Option<Tensor<B, 2>>,
    pub cols: Option<Tensor<B, 2>>,
}

impl<B: Backend> ScaledDelta<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = self.merged.forward(x.clone());
        if self.rows.is_none() && self.cols.is_none() {
            return y;
        }
        let x = x.detach();
        let p = match &self.cols {
            Some(c) => crate::host::column_delta_product(&x, c, &self.delta)
                .unwrap_or_else(|| crate::host::matmul(x.clone() * c.clone(), &self.delta_t.clone().unwrap_or_else(|| delta_t(&self.delta, &x.device())))),
            None => crate::host::host_product(&x, self.delta.rows(), |xs, p| delta_kernels::fused::delta_matmul_t(xs, &self.delta, p).expect("Δ̂₀ has the merged weight's shape")),
        };
        let carrier = match &self.rows {
            Some(r) => p.clone() * r.clone() - p.detach() * r.clone().detach(),
            None => p.clone() - p.detach(),
        };
        y + carrier
    }

    /// `W(θ')ᵀ` from `W(θ)ᵀ`: `merged_t + Δ̂₀ᵀ ⊙ (c'ⱼ·r'ᵢ − cⱼ·rᵢ)`, the multipliers given as
    /// `(rows, cols)` before and after (empty: none; one row value: a scalar). The differences of
    /// one-sided multipliers are taken in f64 before they are rounded. On the CPU backend, one
    /// pass over the host values, Δ̂₀ᵀ built 32 inputs at a time from the signs; elsewhere Δ̂₀ᵀ
    /// is written out whole and the same arithmetic runs as tensor operations. Both give the
    /// same bits.
    pub fn moved(merged_t: Tensor<B, 2>, delta: &CompressedWeight<'_>, before: (&[f64], &[f64]), after: (&[f64], &[f64])) -> Tensor<B, 2> {
        let step = Move::new(before, after);
        if let Move::None = step {
            return merged_t;
        }
        if crate::host::is_cpu::<B>() {
            let out = delta.rows();
            let f = ScaleFactors::new(&delta.name, delta.mode, &delta.scales, out, delta.cols()).expect("a validated delta");
            let moved = crate::host::with_values(&merged_t, |m| {
                let mut moved = vec![0f32; m.len()];
                moved.par_chunks_mut(32 * out.max(1)).zip(m.par_chunks(32 * out.max(1))).enumerate().for_each(|(jb, (new, old))| {
                    let mut d = vec![0f32; new.len()];
                    delta_kernels::merge::delta_t_rows(delta, &f, 32 * jb, &mut d).expect("blocks of 32 rows of the delta's own shape");
                    for (b, ((new, old), d)) in new.chunks_exact_mut(out).zip(old.chunks_exact(out)).zip(d.chunks_exact(out)).enumerate() {
                        step.row(32 * jb + b, new, old, d);
                    }
                });
                moved
            });
            return Tensor::from_data(TensorData::new(moved, merged_t.dims()), &merged_t.device());
        }
        let delta_t = delta_t(delta, &merged_t.device());
        step.on_tensors(merged_t, &delta_t)
    }
}

/// The change of one [`ScaledDelta`]'s multipliers, as the f32 factors its move multiplies Δ̂₀ᵀ by.
enum Move {
    None,
    /// `W += Δ̂₀ ⊙ (r' − r)` (one value: a scalar's).
    Rows(Vec<f32>),
    /// `W += Δ̂₀ ⊙ (c' − c)`.
    Cols(Vec<f32>),
    /// `W += Δ̂₀ ⊙ (r'·c'ᵀ) − Δ̂₀ ⊙ (r·cᵀ)`, as `(r, c)` before and after.
    Both { before: (Vec<f32>, Vec<f32>), after: (Vec<f32>, Vec<f32>) },
}

impl Move {
    fn new((r0, c0): (&[f64], &[f64]), (r1, c1): (&[f64], &[f64])) -> Self {
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let diff = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| (a - b) as f32).collect::<Vec<f32>>();
        match (r1.is_empty(), c1.is_empty()) {
            (false, true) => Move::Rows(diff(r1, r0)),
            (true, false) => Move::Cols(diff(c1, c0)),
            (false, false) => Move::Both { before: (f32s(r0), f32s(c0)), after: (f32s(r1), f32s(c1)) },
            (true, true) => Move::None,
        }
    }

    /// Row `j` of the moved `Wᵀ` (`new`, `[out]`) from the old row and Δ̂₀ᵀ's row `d`. Each case
    /// is one loop over the row without a branch, so that it vectorises.
    fn row(&self, j: usize, new: &mut [f32], old: &[f32], d: &[f32]) {
        match self {
            Move::None => new.copy_from_slice(old),
            Move::Rows(dr) if dr.len() == 1 => {
                for ((n, &o), &d) in new.iter_mut().zip(old).zip(d) {
                    *n = o + d * dr[0];
                }
            }
            Move::Rows(dr) => {
                for (((n, &o), &d), &dr) in new.iter_mut().zip(old).zip(d).zip(dr) {
                    *n = o + d * dr;
                }
            }
            Move::Cols(dc) => {
                for ((n, &o), &d) in new.iter_mut().zip(old).zip(d) {
                    *n = o + d * dc[j];
                }
            }
            Move::Both { before: (r0, c0), after: (r1, c1) } => {
                let (r0, r1) = (full(r0, new.len()), full(r1, new.len()));
                for ((((n, &o), &d), &r0), &r1) in new.iter_mut().zip(old).zip(d).zip(r0.iter()).zip(r1.iter()) {
                    *n = (o + (d * c1[j]) * r1) - (d * c0[j]) * r0;
                }
            }
        }
    }

    /// The same move as tensor operations on any backend, Δ̂₀ᵀ written out.
    fn on_tensors<B: Backend>(&self, merged_t: Tensor<B, 2>, delta_t: &Tensor<B, 2>) -> Tensor<B, 2> {
        let device = delta_t.device();
        let row = |v: &[f32]| Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), [1, v.len()]), &device);
        let col = |v: &[f32]| Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), [v.len(), 1]), &device);
        match self {
            Move::None => merged_t,
            Move::Rows(dr) => merged_t + delta_t.clone() * row(dr),
            Move::Cols(dc) => merged_t + delta_t.clone() * col(dc),
            Move::Both { before: (r0, c0), after: (r1, c1) } => {
                let term = |r: &[f32], c: &[f32]| delta_t.clone() * col(c) * row(r);
                merged_t + term(r1, c1) - term(r0, c0)
            }
        }
    }
}

/// `v` as `n` values: itself, or its one value repeated.
fn full(v: &[f32], n: usize) -> std::borrow::Cow<'_, [f32]> {
    if v.len() == 1 { vec![v[0]; n].into() } else { v.into() }
}

/// Δ̂ᵀ (`[in, out]`, contiguous) written out in f32 on `device`, all cores, 32 inputs (one sign
/// word per output row) at a time: `delta_kernels::merge::delta_t_rows`, [`ScaleFactors::delta_hat`]
/// bit for bit.
pub fn delta_t<B: Backend>(delta: &CompressedWeight<'_>, device: &B::Device) -> Tensor<B, 2> {
    let (out, inp) = (delta.rows(), delta.cols());
    let f = ScaleFactors::new(&delta.name, delta.mode, &delta.scales, out, inp).expect("a validated delta");
    let mut d = vec![0f32; inp * out];
    d.par_chunks_mut(32 * out.max(1)).enumerate().for_each(|(jb, block)| delta_kernels::merge::delta_t_rows(delta, &f, 32 * jb, block).expect("blocks of 32 rows of the delta's own shape"));
    Tensor::<B, 2>::from_data(TensorData::new(d, [inp, out]), device)
}

/// A projection inside the model: dense, base + packed delta, or base + scaled dense delta.
#[derive(Clone)]
pub enum Projection<B: Backend> {
    Dense(Linear<B>),
    Delta(DeltaLinear<B>),
    Scaled(ScaledDelta<B>),
}

impl<B: Backend> Projection<B> {
    /// A dense layer, or a [`DeltaLinear`] where the weights source keeps this weight's delta packed.
    pub fn load(w: &Weights<'_, B>, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Self, ModelError> {
        let base = Linear::load(w, prefix, out, inp, bias)?;
        Ok(match w.packed_delta(&format!("{prefix}.weight")) {
            Some(delta) => Projection::Delta(DeltaLinear::new(base, delta)?),
            None => Projection::Dense(base),
        })
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Projection::Dense(l) => l.forward(x),
            Projection::Delta(d) => d.forward(x),
            Projection::Scaled(d) => d.forward(x),
        }
    }

    /// The layer's linear part: its weight is the base's for a packed delta and the merged one
    /// for a scaled delta; its bias is the layer's.
    pub fn linear(&self) -> &Linear<B> {
        match self {
            Projection::Dense(l) => l,
            Projection::Delta(d) => &d.base,
            Projection::Scaled(d) => &d.merged,
        }
    }

    pub fn device(&self) -> B::Device {
        self.linear().weight_t.device()
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Autodiff;
    use burn::tensor::{Tensor, TensorData};

    use std::sync::Arc;

    use delta_format::{CompressedWeight, ScaleMode, SignMask};
    use delta_kernels::merge::ScaleFactors;

    use super::ScaledDelta;
    use crate::llama::Linear;
    use crate::CpuBackend;

    type AD = Autodiff<CpuBackend>;

    /// Values in about [−1, 1), from a fixed-seed generator.
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 40) as f64 / (1u64 << 23) as f64 - 1.0
            })
            .collect()
    }

    fn tensor(v: &[f64], dims: [usize; 2]) -> Tensor<CpuBackend, 2> {
        Tensor::from_data(TensorData::new(v.iter().map(|&x| x as f32).collect::<Vec<f32>>(), dims), &Default::default())
    }

    fn vec(t: Tensor<CpuBackend, 2>) -> Vec<f64> {
        t.into_data().into_vec::<f32>().unwrap().into_iter().map(f64::from).collect()
    }

    fn close(what: &str, got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}");
        let scale = want.iter().fold(1f64, |m, w| m.max(w.abs()));
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 2e-5 * scale, "{what}[{k}]: {g} against {w}");
        }
    }

    /// For every mode: the merged weight moved from θ = 1 to other multipliers, the output, and
    /// the gradients of x, r and c under autodiff, against the weight `W_base + Δ̂₀ ⊙ (r·cᵀ)`
    /// written out and differentiated by hand in f64 (for L = Σ y ⊙ G).
    #[test]
    fn moved_weight_output_and_gradients_match_the_weight_written_out() {
        let (rows, inp, out) = (3, 37, 6);
        let (wb, x, g) = (values(out * inp, 1), values(rows * inp, 3), values(rows * out, 4));
        // Δ̂₀ with two-sided scales, so that its values differ along both axes; two sign words a row.
        let delta = {
            let signs = SignMask::from_deltas(out, inp, &values(out * inp, 2).iter().map(|&v| v as f32).collect::<Vec<f32>>());
            let scales: Vec<f32> = values(out + inp, 7).iter().map(|v| (0.5 + 0.4 * v) as f32).collect();
            Arc::new(CompressedWeight { name: "w".into(), mode: ScaleMode::TwoSided, signs, scales: scales.into() })
        };
        let f = ScaleFactors::new("w", ScaleMode::TwoSided, &delta.scales, out, inp).unwrap();
        let d: Vec<f64> = (0..out * inp).map(|k| f.delta_hat(&delta.signs, k / inp, k % inp) as f64).collect();
        let transpose = |m: &[f64]| -> Vec<f64> { (0..inp * out).map(|k| m[(k % out) * inp + k / out]).collect() };
        let merged0 = tensor(&(0..out * inp).map(|k| wb[k] + d[k]).collect::<Vec<_>>(), [out, inp]).transpose();
        let r_full: Vec<f64> = values(out, 5).iter().map(|v| 1.0 + 0.3 * v).collect();
        let c_full: Vec<f64> = values(inp, 6).iter().map(|v| 1.0 + 0.3 * v).collect();
        for (name, r, c) in [
            ("scalar", vec![r_full[0]], vec![]),
            ("per-output", r_full.clone(), vec![]),
            ("per-input", vec![], c_full.clone()),
            ("two-sided", r_full.clone(), c_full.clone()),
        ] {
            let ones = |v: &[f64]| vec![1.0; v.len()];
            let merged = ScaledDelta::<CpuBackend>::moved(merged0.clone(), &delta, (&ones(&r), &ones(&c)), (&r, &c));
            // Other backends' tensor operations give the host pass's bits.
            let on_tensors = super::Move::new((&ones(&r), &ones(&c)), (&r, &c)).on_tensors(merged0.clone(), &super::delta_t(&delta, &Default::default()));
            let bits = |t: Tensor<CpuBackend, 2>| vec(t).iter().map(|v| v.to_bits()).collect::<Vec<u64>>();
            assert_eq!(bits(on_tensors), bits(merged.clone()), "{name}: the move as tensor operations");
            let ri = |i: usize| if r.is_empty() { 1.0 } else if r.len() == 1 { r[0] } else { r[i] };
            let cj = |j: usize| if c.is_empty() { 1.0 } else { c[j] };
            let w: Vec<f64> = (0..out * inp).map(|k| wb[k] + d[k] * ri(k / inp) * cj(k % inp)).collect();
            close(&format!("{name}: moved weight"), &vec(merged.clone()), &transpose(&w));

            let device = Default::default();
            let param = |v: &[f64]| (!v.is_empty()).then(|| Tensor::<AD, 2>::from_inner(tensor(v, [1, v.len()])).require_grad());
            let (rt, ct) = (param(&r), param(&c));
            let xt = Tensor::<AD, 2>::from_inner(tensor(&x, [rows, inp])).require_grad();
            let layer = ScaledDelta::<AD> { merged: Linear::from_tensor(Tensor::from_inner(merged), None), delta: delta.clone(), delta_t: None, rows: rt.clone(), cols: ct.clone() };
            let y = layer.forward(xt.clone());
            let loss = (y.clone() * Tensor::<AD, 2>::from_data(TensorData::new(g.iter().map(|&v| v as f32).collect::<Vec<f32>>(), [rows, out]), &device)).sum();
            let grads = loss.backward();

            let y_want: Vec<f64> = (0..rows * out).map(|k| (0..inp).map(|j| x[k / out * inp + j] * w[k % out * inp + j]).sum()).collect();
            close(&format!("{name}: output"), &vec(y.inner()), &y_want);
            let dx: Vec<f64> = (0..rows * inp).map(|k| (0..out).map(|i| g[k / inp * out + i] * w[i * inp + k % inp]).sum()).collect();
            close(&format!("{name}: x's gradient"), &vec(xt.grad(&grads).unwrap()), &dx);
            // ∂L/∂(r_i c_j) ⋅ Δ_ij summed over the other index (and over i for a scalar).
            let term = |i: usize, j: usize| (0..rows).map(|t| g[t * out + i] * x[t * inp + j]).sum::<f64>() * d[i * inp + j];
            if let Some(rt) = rt {
                let mut dr: Vec<f64> = (0..out).map(|i| (0..inp).map(|j| term(i, j) * cj(j)).sum()).collect();
                if r.len() == 1 {
                    dr = vec![dr.iter().sum()];
                }
                close(&format!("{name}: r's gradient"), &vec(rt.grad(&grads).unwrap()), &dr);
            }
            if let Some(ct) = ct {
                let dc: Vec<f64> = (0..inp).map(|j| (0..out).map(|i| term(i, j) * ri(i)).sum()).collect();
                close(&format!("{name}: c's gradient"), &vec(ct.grad(&grads).unwrap()), &dc);
            }
        }
    }
}
