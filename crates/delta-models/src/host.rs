//! The CPU fast path for decode-shaped products. Burn's NdArray matmul hands every product to a
//! general GEMM that packs the whole weight first, which at one or a few rows costs more than
//! the product itself (measured: 4.7 tokens/s decode on SmolLM2-135M). On the CPU backend, few-row
//! products read the weight in place, with any packed delta terms in the same pass
//! (`delta_kernels::fused::dense_delta_matmul_t`); everything else —
//! and every other backend — goes through Burn. Also the host-side arithmetic on logits
//! ([`logsumexp`]) that scoring and perplexity do row by row instead of through softmax tensors.

use std::any::Any;

use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use delta_format::CompressedWeight;

use crate::CpuBackend;

/// Up to this many rows the in-place product beats the packing GEMM (it reads the weight once for
/// all rows either way; beyond this Burn's blocked GEMM wins on arithmetic).
pub const FEW_ROWS: usize = 16;

/// `x · wt` (`x`: `[rows, in]`, `wt`: `[in, out]`).
pub fn matmul<B: Backend>(x: Tensor<B, 2>, wt: &Tensor<B, 2>) -> Tensor<B, 2> {
    few_rows(&x, wt, &[], &[]).unwrap_or_else(|| x.matmul(wt.clone()))
}

/// `x · wt` plus, for every row r with `idx[r] = Some(d)`, the packed delta term `x[r]·Δ̂_dᵀ`
/// (`idx` empty: none) — on the host, in one pass, when `B` is the CPU backend, `x` has at most
/// [`FEW_ROWS`] rows and the weight is contiguous f32. `None` otherwise.
pub fn few_rows<B: Backend>(x: &Tensor<B, 2>, wt: &Tensor<B, 2>, deltas: &[&CompressedWeight<'_>], idx: &[Option<usize>]) -> Option<Tensor<B, 2>> {
    let [rows, inp] = x.dims();
    let out = wt.dims()[1];
    if rows > FEW_ROWS {
        return None;
    }
    let none = vec![None; if idx.is_empty() { rows } else { 0 }];
    let idx = if idx.is_empty() { &none } else { idx };
    in_place(wt, |w| {
        let y = with_values(x, |xs| {
            let mut y = vec![0f32; rows * out];
            delta_kernels::fused::dense_delta_matmul_t(xs, w, inp, out, deltas, idx, &mut y).expect("shapes checked when the layers were built");
            y
        });
        Tensor::from_data(TensorData::new(y, [rows, out]), &x.device())
    })
}

/// `x · (W_base + Δ̂)ᵀ` on the host, the base given as `wt` (`[in, out]`), merged one tile at a
/// time (`delta_kernels::fused::merged_matmul_t`), when `B` is the CPU backend and the weight is
/// contiguous f32 — a prefill's delta layer in one GEMM. `None` otherwise.
pub fn merged<B: Backend>(x: &Tensor<B, 2>, wt: &Tensor<B, 2>, delta: &CompressedWeight<'_>) -> Option<Tensor<B, 2>> {
    let [rows, inp] = x.dims();
    let out = wt.dims()[1];
    in_place(wt, |w| {
        let y = with_values(x, |xs| {
            let mut y = vec![0f32; rows * out];
            delta_kernels::fused::merged_matmul_t(xs, w, inp, out, delta, &mut y).expect("shapes checked when the layer was built");
            y
        });
        Tensor::from_data(TensorData::new(y, [rows, out]), &x.device())
    })
}

/// Runs `f` on the row-major f32 values of `t`: in place for a contiguous tensor of the CPU
/// backend, else on a copy (Burn's `to_data`, which on NdArray walks a non-contiguous tensor
/// element by element).
pub fn with_values<B: Backend, R>(t: &Tensor<B, 2>, f: impl FnOnce(&[f32]) -> R) -> R {
    let mut f = Some(f);
    if let Some(r) = in_place(t, |v| (f.take().expect("called once"))(v)) {
        return r;
    }
    let values = t.to_data().convert::<f32>().into_vec::<f32>().expect("f32 tensor");
    (f.take().expect("not called yet"))(&values)
}

/// `f` on the values of `t` without a copy, when `t` is a contiguous f32 tensor of the CPU backend.
fn in_place<B: Backend, R>(t: &Tensor<B, 2>, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let cpu = (t as &dyn Any).downcast_ref::<Tensor<CpuBackend, 2>>()?;
    let NdArrayTensor::F32(storage) = cpu.clone().into_primitive().tensor() else { return None };
    let view = storage.view();
    view.as_slice().map(f)
}

/// `(max, log Σ exp)` of a row of logits, the sum in f64: log p(i) = row[i] − the second value.
pub fn logsumexp(row: &[f32]) -> (f32, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (max, max as f64 + row.iter().map(|&v| (v - max).exp() as f64).sum::<f64>().ln())
}
