//! The CPU fast paths: products on the host values in place, and the work between them. Burn's
//! NdArray matmul hands every product to a general GEMM that packs the whole weight first, which
//! at one or a few rows costs more than the product itself (measured: 4.7 tokens/s decode on
//! SmolLM2-135M). On the CPU backend, few-row products read the weight in place, with any packed
//! delta terms in the same pass (`delta_kernels::fused::dense_delta_matmul_t`); larger products
//! are one GEMM on both operands in place ([`product`]; Burn's copies them first), and so are a
//! constant weight's products and their input gradients under autodiff ([`frozen_product`],
//! stage 2 of calibration), and so is stage 2's product with column multipliers on a packed
//! delta, gradient included ([`column_delta_product`]). Every other backend goes through Burn.
//! The element-wise work between the products — RMSNorm ([`rms_norm`]), `silu(gate) ⊙ up`
//! ([`silu_mul`]) and a packed batch's RoPE and attention ([`attend_packed`]) — runs on the host
//! too, in parallel over rows or segments, in one pass each instead of Burn's one
//! single-threaded pass and fresh tensor per operation (measured: most of a packed forward's
//! non-GEMM time). RMSNorm, SiLU and attention ([`attend_tracked`]) do so under autodiff as
//! well, each with its own backward step, and so does stage 2's squared error of the logits,
//! computed from the final hidden states through the head's Gram matrix
//! ([`logit_squared_error`]). Also the host-side arithmetic on logits ([`logsumexp`]) that
//! scoring and perplexity do row by row instead of through softmax tensors.

use std::any::{Any, TypeId};
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use delta_format::CompressedWeight;
use rayon::prelude::*;

use crate::llama::WeightT;
use crate::CpuBackend;
use attention::{attend_segment, HeadShape, KeyLayout};
pub use kv::HostKv;
pub use logit_error::{kl_divergence, logit_squared_error, HeadGram};

mod attention;
mod kv;
mod logit_error;
mod tracked_attention;

/// Up to this many rows the in-place product beats the packing GEMM (it reads the weight once for
/// all rows either way; beyond this a blocked GEMM, [`product`], wins on arithmetic).
pub const FEW_ROWS: usize = 16;

/// `x · wt` (`x`: `[rows, in]`, `wt`: `[in, out]`). On the CPU backend, with or without autodiff
/// (`wt` then a constant), on the host values in place ([`few_rows`], [`product`],
/// [`frozen_product`]); through Burn on every other backend.
pub fn matmul<B: Backend>(x: Tensor<B, 2>, wt: &Tensor<B, 2>) -> Tensor<B, 2> {
    few_rows(&x, &WeightT::Tensor(wt.clone()), &[], &[])
        .or_else(|| product(&x, wt))
        .or_else(|| frozen_product(&x, wt))
        .unwrap_or_else(|| x.matmul(wt.clone()))
}

/// `x · wt` for a linear layer's weight: [`matmul`] for a tensor; for bf16 values on the host
/// (`[in, out]`, or a tied head's embedding read transposed), up to [`FEW_ROWS`] rows read them in
/// place ([`few_rows`]), more go through a GEMM on tiles widened to f32
/// (`delta_kernels::dense::widened_matmul_t`, `delta_kernels::dense_nt::widened_matmul_nt`) —
/// either way the f32 tensor's result, bit for bit.
pub fn project<B: Backend>(x: Tensor<B, 2>, wt: &WeightT<B>) -> Tensor<B, 2> {
    if let WeightT::Tensor(t) = wt {
        return matmul(x, t);
    }
    let inp = x.dims()[1];
    let out = wt.dims()[1];
    few_rows(&x, wt, &[], &[])
        .or_else(|| match wt {
            _ if !is_cpu::<B>() => None,
            WeightT::Bf16(h) => Some(host_product(&x, out, |xs, y| delta_kernels::dense::widened_matmul_t(xs, &h.values, inp, out, y).expect("shapes checked when the layer was built"))),
            WeightT::Bf16Transposed(h) => Some(host_product(&x, out, |xs, y| delta_kernels::dense_nt::widened_matmul_nt(xs, &h.values, inp, out, y).expect("shapes checked when the model was built"))),
            WeightT::Tensor(_) => None,
        })
        .unwrap_or_else(|| x.matmul(wt.to_tensor()))
}

/// `x · wt` as one GEMM on the host values in place, when `B` is the CPU backend (`None`
/// otherwise). Burn's NdArray matmul copies both operands first, whatever their layout.
pub fn product<B: Backend>(x: &Tensor<B, 2>, wt: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let x = (x as &dyn Any).downcast_ref::<Tensor<CpuBackend, 2>>()?;
    let wt = (wt as &dyn Any).downcast_ref::<Tensor<CpuBackend, 2>>()?;
    let y = gemm(&x.clone().into_primitive().tensor(), &wt.clone().into_primitive().tensor(), false)?;
    crate::same_backend(cpu_tensor(y))
}

/// The CPU backend under autodiff, as stage 2 of calibration trains on it.
type AutodiffCpu = burn::backend::Autodiff<CpuBackend>;

/// `x · wt` for a constant `wt` (no gradient flows to it) under autodiff on the CPU backend
/// (`None` for any other backend, or a `wt` that is tracked). The product and, in the backward
/// pass, `x`'s gradient `g · wtᵀ` are GEMMs on the host values in place. Burn's matmul copies
/// both operands forward, and for the gradient transposes the weight element by element: in
/// stage 2 of calibration on the CPU (perf, the pair), 56% of the main thread's time.
pub fn frozen_product<B: Backend>(x: &Tensor<B, 2>, wt: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let x = (x as &dyn Any).downcast_ref::<Tensor<AutodiffCpu, 2>>()?.clone().into_primitive().tensor();
    let wt = (wt as &dyn Any).downcast_ref::<Tensor<AutodiffCpu, 2>>()?.clone().into_primitive().tensor();
    if wt.is_tracked() {
        return None;
    }
    let wt = wt.primitive;
    let y = gemm(&x.primitive, &wt, false)?;
    let y = match FrozenProduct.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(wt, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    crate::same_backend(Tensor::<AutodiffCpu, 2>::from_primitive(TensorPrimitive::Float(y)))
}

/// The backward step of [`frozen_product`]; its state is `wt`.
#[derive(Debug)]
struct FrozenProduct;

impl Backward<CpuBackend, 1> for FrozenProduct {
    type State = NdArrayTensor;

    fn backward(self, ops: Ops<NdArrayTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let wt = ops.state;
        unary::<CpuBackend, _>(ops.parents, ops.node, grads, |g| {
            gemm(&g, &wt, true).unwrap_or_else(|| CpuBackend::float_matmul(g, CpuBackend::float_transpose(wt.clone())))
        });
    }
}

/// `P = (x̄ ⊙ c)·Δ̂ᵀ` for column multipliers `c` (`[1, in]`, tracked for its gradient) and a
/// constant `x̄` (`[rows, in]`) under autodiff on the CPU backend (`None` for any other backend):
/// the product from Δ̂'s packed signs ([`delta_kernels::fused::delta_matmul_t`]), and in the
/// backward pass `c`'s gradient `Σ_rows x̄ ⊙ (G·Δ̂)`, the product with Δ̂ as stored also from the
/// signs ([`delta_kernels::fused::delta_matmul`]). So Δ̂ᵀ is never written out whole: what
/// end-to-end calibration's per-input and two-sided layers train ([`crate::ScaledDelta`]).
pub fn column_delta_product<B: Backend>(x: &Tensor<B, 2>, c: &Tensor<B, 2>, delta: &Arc<CompressedWeight<'static>>) -> Option<Tensor<B, 2>> {
    let x = (x as &dyn Any).downcast_ref::<Tensor<AutodiffCpu, 2>>()?.clone().inner();
    let [rows, inp] = x.dims();
    let xc = with_values(&x, |xs| with_values(c, |cs| xs.chunks_exact(inp.max(1)).flat_map(|row| row.iter().zip(cs).map(|(x, c)| x * c)).collect::<Vec<f32>>()));
    let c = (c as &dyn Any).downcast_ref::<Tensor<AutodiffCpu, 2>>()?.clone().into_primitive().tensor();
    let xc = Tensor::<CpuBackend, 2>::from_data(TensorData::new(xc, [rows, inp]), &Default::default());
    let p = host_product(&xc, delta.rows(), |xs, p| delta_kernels::fused::delta_matmul_t(xs, delta, p).expect("Δ̂ has the layer's shape")).into_primitive().tensor();
    let p = match ColumnDeltaProduct.prepare::<NoCheckpointing>([c.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((x.into_primitive().tensor(), delta.clone()), p),
        OpsKind::UnTracked(prep) => prep.finish(p),
    };
    crate::same_backend(Tensor::<AutodiffCpu, 2>::from_primitive(TensorPrimitive::Float(p)))
}

/// The backward step of [`column_delta_product`]; its state is `x̄` and Δ̂.
#[derive(Debug)]
struct ColumnDeltaProduct;

impl Backward<CpuBackend, 1> for ColumnDeltaProduct {
    type State = (NdArrayTensor, Arc<CompressedWeight<'static>>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, delta) = ops.state;
        unary::<CpuBackend, _>(ops.parents, ops.node, grads, |g| {
            let x = cpu_tensor(x);
            let g = cpu_tensor(g);
            let inp = x.dims()[1];
            let h = host_product(&g, inp, |gs, h| delta_kernels::fused::delta_matmul(gs, &delta, h).expect("the gradient has the product's shape"));
            // Σ over rows of x̄ ⊙ H, a row at a time.
            let mut dc = vec![0f32; inp];
            with_values(&x, |xs| {
                with_values(&h, |hs| {
                    for (xr, hr) in xs.chunks_exact(inp.max(1)).zip(hs.chunks_exact(inp.max(1))) {
                        for ((d, &x), &h) in dc.iter_mut().zip(xr).zip(hr) {
                            *d += x * h;
                        }
                    }
                })
            });
            primitive(dc, [1, inp])
        });
    }
}

/// Row-major host values `[rows, cols]` as a CPU tensor's primitive, the form the custom autodiff
/// ops here return and register gradients in.
fn primitive(values: Vec<f32>, dims: [usize; 2]) -> NdArrayTensor {
    Tensor::<CpuBackend, 2>::from_data(TensorData::new(values, dims), &Default::default()).into_primitive().tensor()
}

/// A CPU tensor's primitive (a custom op's state or gradient) as a tensor, to read its values
/// with [`with_values`].
fn cpu_tensor(p: NdArrayTensor) -> Tensor<CpuBackend, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// `a · b` (`b_t`: `a · bᵀ`) for 2-d f32 tensors of the CPU backend, one `matrixmultiply` GEMM
/// reading both through their strides (transposed or not, no copy). `None` for another dtype, a
/// negative stride, an empty or mismatched shape.
///
/// `matrixmultiply` packs the right operand on the calling thread and splits the left one's rows
/// among its threads, packing included. A weight (`n` columns) wider than the activations are
/// tall (`m` rows) is therefore made the left operand: `cᵀ = bᵀ·aᵀ`, written straight into
/// row-major `c` through its strides. In stage 2 on the pair (LM head: 128 rows, 49,152
/// columns) packing was a third of the GEMMs' samples, all on the calling thread; transposed, it
/// is split between the threads (stage 2's time moved within the host's noise; BENCHMARKS.md).
fn gemm(a: &NdArrayTensor, b: &NdArrayTensor, b_t: bool) -> Option<NdArrayTensor> {
    let (NdArrayTensor::F32(a), NdArrayTensor::F32(b)) = (a, b) else { return None };
    let (a, b) = (a.view(), b.view());
    let (&[m, k], &[rsa, csa]) = (a.shape(), a.strides()) else { return None };
    let (&[b0, b1], &[rs0, cs0]) = (b.shape(), b.strides()) else { return None };
    let (bk, n, rsb, csb) = if b_t { (b1, b0, cs0, rs0) } else { (b0, b1, rs0, cs0) };
    if bk != k || m == 0 || k == 0 || n == 0 || [rsa, csa, rsb, csb].iter().any(|&s| s < 0) {
        return None;
    }
    let mut c = vec![0f32; m * n];
    // SAFETY: `a` is m×k and `b` (as read) k×n with the strides of their views, which address
    // only their own elements; `c` is a fresh row-major m×n buffer, addressed as such or (in the
    // second call) as its n×m transpose.
    unsafe {
        if n <= m {
            matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, 0.0, c.as_mut_ptr(), n as isize, 1);
        } else {
            matrixmultiply::sgemm(n, k, m, 1.0, b.as_ptr(), csb, rsb, a.as_ptr(), csa, rsa, 0.0, c.as_mut_ptr(), 1, n as isize);
        }
    }
    Some(primitive(c, [m, n]))
}

/// `x · wt` plus, for every row r with `idx[r] = Some(d)`, the packed delta term `x[r]·Δ̂_dᵀ`
/// (`idx` empty: none) — on the host, in one pass, when `B` is the CPU backend, `x` has at most
/// [`FEW_ROWS`] rows and the weight is bf16 on the host or a contiguous f32 tensor. Without
/// deltas, the tensor may also be the transposed view of a contiguous `[out, in]` weight (a tied
/// LM head: the embedding matrix), read in place as dot products. `None` otherwise.
pub fn few_rows<B: Backend>(x: &Tensor<B, 2>, wt: &WeightT<B>, deltas: &[&CompressedWeight<'_>], idx: &[Option<usize>]) -> Option<Tensor<B, 2>> {
    let [rows, inp] = x.dims();
    let out = wt.dims()[1];
    if rows > FEW_ROWS || !is_cpu::<B>() {
        return None;
    }
    let none = vec![None; if idx.is_empty() { rows } else { 0 }];
    let idx = if idx.is_empty() { &none } else { idx };
    let wt = match wt {
        WeightT::Bf16(h) => {
            return Some(host_product(x, out, |xs, y| delta_kernels::fused::dense_delta_matmul_t(xs, &h.values, inp, out, deltas, idx, y).expect("shapes checked when the layers were built")));
        }
        WeightT::Bf16Transposed(h) if deltas.is_empty() => {
            return Some(host_product(x, out, |xs, y| delta_kernels::dense_nt::dense_matmul_nt(xs, &h.values, inp, out, y).expect("shapes checked when the model was built")));
        }
        WeightT::Bf16Transposed(_) => return None,
        WeightT::Tensor(t) => t,
    };
    in_place(wt, |w| {
        host_product(x, out, |xs, y| delta_kernels::fused::dense_delta_matmul_t(xs, w, inp, out, deltas, idx, y).expect("shapes checked when the layers were built"))
    })
    .or_else(|| {
        if deltas.is_empty() {
            in_place_transposed(wt, |w| host_product(x, out, |xs, y| delta_kernels::dense_nt::dense_matmul_nt(xs, w, inp, out, y).expect("shapes checked when the model was built")))
        } else {
            None
        }
    })
}

/// `x · (W_base + Δ̂)ᵀ` on the host, the base given as `wt` (`[in, out]`), merged one tile at a
/// time (`delta_kernels::fused::merged_matmul_t`), when `B` is the CPU backend and the weight is
/// bf16 on the host or a contiguous f32 tensor — a prefill's delta layer in one GEMM. `None`
/// otherwise.
pub fn merged<B: Backend>(x: &Tensor<B, 2>, wt: &WeightT<B>, delta: &CompressedWeight<'_>) -> Option<Tensor<B, 2>> {
    let inp = x.dims()[1];
    let out = wt.dims()[1];
    if !is_cpu::<B>() {
        return None;
    }
    match wt {
        WeightT::Bf16(h) => Some(host_product(x, out, |xs, y| delta_kernels::fused::merged_matmul_t(xs, &h.values, inp, out, delta, y).expect("shapes checked when the layer was built"))),
        WeightT::Bf16Transposed(_) => None,
        WeightT::Tensor(t) => in_place(t, |w| host_product(x, out, |xs, y| delta_kernels::fused::merged_matmul_t(xs, w, inp, out, delta, y).expect("shapes checked when the layer was built"))),
    }
}

/// `kernel(x's values, y)` on the host into a fresh `[rows, out]` tensor on `x`'s device (`y`
/// comes in zeroed).
pub(crate) fn host_product<B: Backend>(x: &Tensor<B, 2>, out: usize, kernel: impl FnOnce(&[f32], &mut [f32])) -> Tensor<B, 2> {
    let rows = x.dims()[0];
    let y = with_values(x, |xs| {
        let mut y = vec![0f32; rows * out];
        kernel(xs, &mut y);
        y
    });
    Tensor::from_data(TensorData::new(y, [rows, out]), &x.device())
}

/// Runs `f` on the row-major f32 values of `t`: in place for a contiguous tensor of the CPU
/// backend, with or without autodiff, else on a copy (Burn's `to_data`, which on NdArray walks a
/// non-contiguous tensor element by element).
pub fn with_values<B: Backend, R>(t: &Tensor<B, 2>, f: impl FnOnce(&[f32]) -> R) -> R {
    let mut f = Some(f);
    if let Some(r) = in_place(t, |v| (f.take().expect("called once"))(v)) {
        return r;
    }
    let values = t.to_data().convert::<f32>().into_vec::<f32>().expect("f32 tensor");
    (f.take().expect("not called yet"))(&values)
}

/// `f` on the values of `t` without a copy, when `t` is a contiguous f32 tensor of the CPU backend
/// or of `Autodiff` over it (its inner values).
fn in_place<B: Backend, R>(t: &Tensor<B, 2>, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let any = t as &dyn Any;
    let cpu = match any.downcast_ref::<Tensor<CpuBackend, 2>>() {
        Some(cpu) => cpu.clone(),
        None => any.downcast_ref::<Tensor<AutodiffCpu, 2>>()?.clone().inner(),
    };
    let NdArrayTensor::F32(storage) = cpu.into_primitive().tensor() else { return None };
    let view = storage.view();
    view.as_slice().map(f)
}

/// `f` on the values of `t`'s transpose without a copy, when `t` is the transposed view of a
/// contiguous f32 tensor of the CPU backend.
fn in_place_transposed<B: Backend, R>(t: &Tensor<B, 2>, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let cpu = (t as &dyn Any).downcast_ref::<Tensor<CpuBackend, 2>>()?;
    let NdArrayTensor::F32(storage) = cpu.clone().into_primitive().tensor() else { return None };
    let view = storage.view();
    view.t().as_slice().map(f)
}

/// Whether `B` is the CPU backend, whose tensors the functions here read in place.
pub fn is_cpu<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<CpuBackend>()
}

/// Whether `B` is the CPU backend under autodiff, as stage 2 of calibration trains on it.
pub fn is_autodiff_cpu<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<AutodiffCpu>()
}

/// Attention over a packed batch ([`crate::llama::Packed`]) on the host, when `B` is the CPU
/// backend (`None` otherwise): q `[t, heads·d]`, k and v `[t, kv_heads·d]` as the projections
/// return them (q/k norms applied), rotated here with the RoPE tables `cos` / `sin` (`[t, d]`);
/// then for every segment `(start, len, additive mask [len, len])` and query head, the softmax of
/// the scaled scores over the segment's keys (its kv head's) times their values. Segments run in
/// parallel; keys the mask hides are skipped. Returns the context `[t, heads·d]`.
#[allow(clippy::too_many_arguments)]
pub fn attend_packed<B: Backend>(q: &Tensor<B, 2>, k: &Tensor<B, 2>, v: &Tensor<B, 2>, cos: &[f32], sin: &[f32], heads: usize, kv_heads: usize, segments: &[(usize, usize, Vec<f32>)]) -> Option<Tensor<B, 2>> {
    if !is_cpu::<B>() {
        return None;
    }
    let ([t, width], device) = (q.dims(), q.device());
    let d = width / heads;
    let kv_width = kv_heads * d;
    let q = with_values(q, |q| rotate(q, heads, d, cos, sin));
    let k = with_values(k, |k| rotate(k, kv_heads, d, cos, sin));
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let group = heads / kv_heads;
    let mut context = vec![0f32; t * width];
    with_values(v, |v| {
        // Each segment's rows of the context, split off in order.
        let mut jobs = Vec::with_capacity(segments.len());
        let mut rest = context.as_mut_slice();
        for (start, len, mask) in segments {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(len * width);
            jobs.push((*start, *len, mask, part));
            rest = tail;
        }
        let shape = HeadShape { heads, group, d, scale };
        let keys = KeyLayout { head_stride: d, row_stride: kv_width };
        jobs.into_par_iter().for_each(|(start, len, mask, part)| {
            let (rows, kv_rows) = (start * width..(start + len) * width, start * kv_width..(start + len) * kv_width);
            attend_segment(&q[rows], &k[kv_rows.clone()], &v[kv_rows], keys, shape, len, mask, part)
        });
    });
    Some(Tensor::from_data(TensorData::new(context, [t, width]), &device))
}

/// `x` (`[rows, n·d]`: n heads of width d per row) rotated by RoPE with row r's tables
/// `cos[r·d..]`, `sin[r·d..]`: x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁).
fn rotate(x: &[f32], n: usize, d: usize, cos: &[f32], sin: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(n * d).zip(x.par_chunks(n * d)).enumerate().for_each(|(r, (out, x))| {
        let (cos, sin) = (&cos[r * d..(r + 1) * d], &sin[r * d..(r + 1) * d]);
        for (out, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            let half = d / 2;
            for i in 0..half {
                out[i] = x[i] * cos[i] + -x[i + half] * sin[i];
                out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
            }
        }
    });
    out
}

/// Attention of `b` sequences without a KV cache under autodiff on the CPU backend, as stage 2
/// of calibration trains through it (`None` for any other backend): q `[b·t, heads·d]`, k and v
/// `[b·t, kv_heads·d]` as the projections return them (q/k norms applied), rotated here with the
/// positions' RoPE tables `cos` / `sin` (`[t, d]`); every query sees the keys `mask` shows
/// (additive, `[t, t]`). One custom op: per sequence and head two GEMMs and a softmax forward,
/// four GEMMs backward (`host/tracked_attention.rs`). Returns the context `[b·t, heads·d]`.
/// Panics if the shapes do not fit together.
#[allow(clippy::too_many_arguments)]
pub fn attend_tracked<B: Backend>(q: &Tensor<B, 2>, k: &Tensor<B, 2>, v: &Tensor<B, 2>, b: usize, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>, heads: usize, kv_heads: usize, mask: &[f32]) -> Option<Tensor<B, 2>> {
    let tracked = |x: &Tensor<B, 2>| (x as &dyn Any).downcast_ref::<Tensor<AutodiffCpu, 2>>().cloned();
    let (q, k, v) = (tracked(q)?, tracked(k)?, tracked(v)?);
    let [rows, width] = q.dims();
    assert!(b > 0 && heads > 0 && kv_heads > 0 && rows % b == 0 && width % heads == 0 && heads % kv_heads == 0, "attention of {rows} rows in {b} sequences, {heads} heads of {width} columns on {kv_heads} kv heads");
    let sizes = tracked_attention::Sizes { b, t: rows / b, heads, kv_heads, d: width / heads };
    assert_eq!(mask.len(), sizes.t * sizes.t, "a mask for {} positions", sizes.t);
    // Row r of q and k is position r mod t.
    let (cos, sin) = (with_values(cos, |c| c.repeat(b)), with_values(sin, |s| s.repeat(b)));
    let (context, saved) = with_values(&q, |qs| with_values(&k, |ks| with_values(&v, |vs| tracked_attention::forward(qs, ks, vs, cos, sin, mask, sizes))));
    let context = primitive(context, [rows, width]);
    let (q, k, v) = (q.into_primitive().tensor(), k.into_primitive().tensor(), v.into_primitive().tensor());
    let context = match AttentionStep.prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(saved, context),
        OpsKind::UnTracked(prep) => prep.finish(context),
    };
    crate::same_backend(Tensor::<AutodiffCpu, 2>::from_primitive(TensorPrimitive::Float(context)))
}

/// The backward step of [`attend_tracked`]; its state is what the forward pass kept.
#[derive(Debug)]
struct AttentionStep;

impl Backward<CpuBackend, 3> for AttentionStep {
    type State = tracked_attention::Saved;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = cpu_tensor(grads.consume::<CpuBackend>(&ops.node));
        let (dq, dk, dv) = with_values(&grad, |g| tracked_attention::backward(&ops.state, g));
        let s = ops.state.sizes;
        let rows = s.b * s.t;
        for (parent, (values, width)) in ops.parents.into_iter().zip([(dq, s.heads * s.d), (dk, s.kv_heads * s.d), (dv, s.kv_heads * s.d)]) {
            if let Some(node) = parent {
                grads.register::<CpuBackend>(node.id, primitive(values, [rows, width]));
            }
        }
    }
}

/// Queries per task of [`attend_cached`] (a prefill's rows of one sequence split into tasks).
const QUERY_ROWS: usize = 16;

/// Attention of `t` new positions per sequence after those in a KV cache, on the host, when `B`
/// is the CPU backend (`None` otherwise): q `[b·t, heads·d]`, k and v `[b·t, kv_heads·d]` as the
/// projections return them (q/k norms applied), rotated here with the new positions' RoPE tables
/// `cos` / `sin` (`[t, d]`); `cache` the keys and values so far, to which the new ones are
/// appended (in place while its room lasts, [`HostKv::append`]). Every query sees the keys
/// `mask` shows (additive, `[t, cache.len() + t]`), through the same tiles as
/// [`attend_packed`], each kv head shared by its query heads without copies. Returns the context
/// `[b·t, heads·d]`; sequences and blocks of [`QUERY_ROWS`] queries run in parallel.
#[allow(clippy::too_many_arguments)]
pub fn attend_cached<B: Backend>(q: &Tensor<B, 2>, k: &Tensor<B, 2>, v: &Tensor<B, 2>, b: usize, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>, heads: usize, cache: &mut HostKv, mask: &[f32]) -> Option<Tensor<B, 2>> {
    if !is_cpu::<B>() {
        return None;
    }
    let ([rows, width], device) = (q.dims(), q.device());
    let (t, d) = (rows / b, width / heads);
    let kv_heads = k.dims()[1] / d;
    assert_eq!(cache.rows(), b, "a KV cache of {} sequences for a batch of {b}", cache.rows());
    // Row r of q and k is position r mod t of the new ones.
    let tables = |x: &Tensor<B, 2>| with_values(x, |x| x.repeat(b));
    let (cos, sin) = (tables(cos), tables(sin));
    let q = with_values(q, |q| rotate(q, heads, d, &cos, &sin));
    with_values(k, |k| with_values(v, |v| cache.append(&rotate(k, kv_heads, d, &cos, &sin), v, t)));
    let s = cache.len();
    let shape = HeadShape { heads, group: heads / kv_heads, d, scale: (1.0 / (d as f64).sqrt()) as f32 };
    let layout = KeyLayout { head_stride: cache.capacity() * d, row_stride: d };
    let mut context = vec![0f32; rows * width];
    let jobs: Vec<(usize, usize, &mut [f32])> = context
        .chunks_mut(t * width)
        .enumerate()
        .flat_map(|(r, part)| part.chunks_mut(QUERY_ROWS * width).enumerate().map(move |(c, part)| (r, c * QUERY_ROWS, part)))
        .collect();
    let cache = &*cache;
    jobs.into_par_iter().for_each(|(r, i0, part)| {
        let n = part.len() / width;
        let (keys, values) = cache.sequence(r);
        attend_segment(&q[(r * t + i0) * width..(r * t + i0 + n) * width], keys, values, layout, shape, s, &mask[i0 * s..(i0 + n) * s], part)
    });
    Some(Tensor::from_data(TensorData::new(context, [rows, width]), &device))
}

/// `silu(gate) ⊙ up` (`silu(x) = x / (1 + e^−x)`): on the host in parallel over rows when `B` is
/// the CPU backend, with or without autodiff (then with its own backward step, [`SiluProduct`]);
/// through Burn otherwise. Under autodiff Burn's SiLU is a dozen single-threaded passes forward
/// and more backward (its sigmoid is `exp(−log(1 + e^−x))`, recomputed in the backward step).
pub fn silu_mul<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    if let Some(y) = tracked_silu_mul(&gate, &up) {
        return y;
    }
    if !is_cpu::<B>() {
        return burn::tensor::activation::silu(gate) * up;
    }
    let [rows, width] = gate.dims();
    let y = with_values(&gate, |g| with_values(&up, |u| silu_product(g, u, width)));
    Tensor::from_data(TensorData::new(y, [rows, width]), &gate.device())
}

/// `silu(g) ⊙ u` of two row-major `[rows, width]` value slices.
fn silu_product(g: &[f32], u: &[f32], width: usize) -> Vec<f32> {
    let mut out = g.to_vec();
    each_row(&mut out, width, |r, g| {
        for (g, &u) in g.iter_mut().zip(&u[r * width..(r + 1) * width]) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    });
    out
}

/// [`silu_mul`] under autodiff on the CPU backend (`None` for any other backend): the product on
/// the host, and a backward step that computes both inputs' gradients in one parallel pass.
fn tracked_silu_mul<B: Backend>(gate: &Tensor<B, 2>, up: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let gate = (gate as &dyn Any).downcast_ref::<Tensor<AutodiffCpu, 2>>()?;
    let up = (up as &dyn Any).downcast_ref::<Tensor<AutodiffCpu, 2>>()?;
    let [rows, width] = gate.dims();
    let y = with_values(gate, |g| with_values(up, |u| silu_product(g, u, width)));
    let y = primitive(y, [rows, width]);
    let (g, u) = (gate.clone().into_primitive().tensor(), up.clone().into_primitive().tensor());
    let y = match SiluProduct.prepare::<NoCheckpointing>([g.node.clone(), u.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((g.primitive, u.primitive), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    crate::same_backend(Tensor::<AutodiffCpu, 2>::from_primitive(TensorPrimitive::Float(y)))
}

/// The backward step of [`silu_mul`] under autodiff; its state is `gate` and `up`. With
/// `s = σ(g)`: `∂/∂g = G·u·s·(1 + g·(1 − s))`, `∂/∂u = G·silu(g)`.
#[derive(Debug)]
struct SiluProduct;

impl Backward<CpuBackend, 2> for SiluProduct {
    type State = (NdArrayTensor, NdArrayTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (g, u) = (cpu_tensor(ops.state.0), cpu_tensor(ops.state.1));
        let grad = cpu_tensor(grads.consume::<CpuBackend>(&ops.node));
        let [rows, width] = g.dims();
        let (mut dg, mut du) = (vec![0f32; rows * width], vec![0f32; rows * width]);
        with_values(&grad, |d| {
            with_values(&g, |g| {
                with_values(&u, |u| {
                    dg.par_chunks_mut(width.max(1)).zip(du.par_chunks_mut(width.max(1))).enumerate().with_min_len(8).for_each(|(r, (dg, du))| {
                        let row = r * width..(r + 1) * width;
                        for ((((dg, du), &d), &g), &u) in dg.iter_mut().zip(du).zip(&d[row.clone()]).zip(&g[row.clone()]).zip(&u[row]) {
                            let e = (-g).exp();
                            let s = 1.0 / (1.0 + e);
                            *du = d * (g / (1.0 + e));
                            *dg = d * u * s * (1.0 + g * (1.0 - s));
                        }
                    })
                })
            })
        });
        let [gate, up] = ops.parents;
        for (parent, values) in [(gate, dg), (up, du)] {
            if let Some(node) = parent {
                grads.register::<CpuBackend>(node.id, primitive(values, [rows, width]));
            }
        }
    }
}

/// `x / sqrt(mean(x²) + eps)` over the last dimension of a `[rows, width]` tensor, times `weight`
/// (`[width]`) when given — on the host in parallel over rows for the CPU backend, with or without
/// autodiff (then with its own backward step, [`RmsNormStep`], `weight` a constant); `None`
/// otherwise.
pub fn rms_norm<B: Backend>(x: &Tensor<B, 2>, weight: Option<&Tensor<B, 1>>, eps: f64) -> Option<Tensor<B, 2>> {
    if let Some(y) = tracked_rms_norm(x, weight, eps) {
        return Some(y);
    }
    if !is_cpu::<B>() {
        return None;
    }
    let [rows, width] = x.dims();
    let weight = weight.map(|w| w.to_data().convert::<f32>().into_vec::<f32>().expect("f32 tensor"));
    let out = with_values(x, |x| normalised(x, width, weight.as_deref(), eps));
    Some(Tensor::from_data(TensorData::new(out, [rows, width]), &x.device()))
}

/// The rows (`width` values each) of `x` over their root mean square, times `weight` when given.
fn normalised(x: &[f32], width: usize, weight: Option<&[f32]>, eps: f64) -> Vec<f32> {
    let mut out = x.to_vec();
    each_row(&mut out, width, |_, row| {
        let norm = root_mean_square(row, eps);
        match weight {
            Some(w) => row.iter_mut().zip(w).for_each(|(v, w)| *v = *v / norm * w),
            None => row.iter_mut().for_each(|v| *v /= norm),
        }
    });
    out
}

/// `sqrt(mean(row²) + eps)`.
fn root_mean_square(row: &[f32], eps: f64) -> f32 {
    let mean = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    (mean + eps as f32).sqrt()
}

/// [`rms_norm`] under autodiff on the CPU backend with a constant (untracked) weight; `None` for
/// any other backend or a tracked weight.
fn tracked_rms_norm<B: Backend>(x: &Tensor<B, 2>, weight: Option<&Tensor<B, 1>>, eps: f64) -> Option<Tensor<B, 2>> {
    let x = (x as &dyn Any).downcast_ref::<Tensor<AutodiffCpu, 2>>()?;
    let weight = match weight {
        Some(w) => {
            let w = (w as &dyn Any).downcast_ref::<Tensor<AutodiffCpu, 1>>()?.clone().into_primitive().tensor();
            if w.is_tracked() {
                return None;
            }
            Some(Tensor::<CpuBackend, 1>::from_primitive(TensorPrimitive::Float(w.primitive)).into_data().convert::<f32>().into_vec::<f32>().expect("f32 tensor"))
        }
        None => None,
    };
    let [rows, width] = x.dims();
    let y = with_values(x, |xs| normalised(xs, width, weight.as_deref(), eps));
    let y = primitive(y, [rows, width]);
    let x = x.clone().into_primitive().tensor();
    let y = match RmsNormStep.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((x.primitive, weight, eps), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    crate::same_backend(Tensor::<AutodiffCpu, 2>::from_primitive(TensorPrimitive::Float(y)))
}

/// The backward step of [`rms_norm`] under autodiff; its state is `x`, the weight and `eps`. Per
/// row, with `r = sqrt(mean(x²) + eps)`, `a = G ⊙ w` and `n` the width:
/// `∂/∂x = a / r − x · (a·x) / (n·r³)`.
#[derive(Debug)]
struct RmsNormStep;

impl Backward<CpuBackend, 1> for RmsNormStep {
    type State = (NdArrayTensor, Option<Vec<f32>>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, weight, eps) = ops.state;
        unary::<CpuBackend, _>(ops.parents, ops.node, grads, |g| {
            let (x, g) = (cpu_tensor(x), cpu_tensor(g));
            let [rows, width] = x.dims();
            let mut dx = with_values(&g, |g| g.to_vec());
            with_values(&x, |xs| {
                each_row(&mut dx, width, |r, a| {
                    let x = &xs[r * width..(r + 1) * width];
                    if let Some(w) = &weight {
                        a.iter_mut().zip(w).for_each(|(a, w)| *a *= w);
                    }
                    let norm = root_mean_square(x, eps);
                    let dot = a.iter().zip(x).map(|(a, x)| a * x).sum::<f32>();
                    let k = dot / (width as f32 * norm * norm * norm);
                    a.iter_mut().zip(x).for_each(|(a, x)| *a = *a / norm - x * k);
                })
            });
            primitive(dx, [rows, width])
        });
    }
}

/// `f(r, row r)` over the rows of `values`, in parallel when there is enough work to pay for
/// waking the thread pool (not for a decode step's single row).
fn each_row(values: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if values.len() < 1 << 15 {
        values.chunks_mut(width).enumerate().for_each(|(r, row)| f(r, row));
    } else {
        values.par_chunks_mut(width).enumerate().with_min_len(8).for_each(|(r, row)| f(r, row));
    }
}

/// `(max, log Σ exp)` of a row of logits, the sum in f64: log p(i) = row[i] − the second value.
pub fn logsumexp(row: &[f32]) -> (f32, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (max, max as f64 + row.iter().map(|&v| (v - max).exp() as f64).sum::<f64>().ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in about [−4, 4), from a fixed-seed generator (shared with `tracked_attention`'s
    /// tests).
    pub(super) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
            })
            .collect()
    }

    fn tensor(v: &[f32], dims: [usize; 2]) -> Tensor<CpuBackend, 2> {
        Tensor::from_data(TensorData::new(v.to_vec(), dims), &Default::default())
    }

    fn close(got: &Tensor<CpuBackend, 2>, want: &[f64]) {
        let got = got.to_data().into_vec::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} against {w}");
        }
    }

    #[test]
    fn rms_norm_and_silu_mul_match_their_definitions_in_f64() {
        let (rows, width, eps) = (37, 53, 1e-5);
        let (x, w) = (values(rows * width, 1), values(width, 2));
        let by_hand = |weight: Option<&[f32]>| -> Vec<f64> {
            x.chunks(width)
                .flat_map(|row| {
                    let norm = (row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / width as f64 + eps).sqrt();
                    row.iter().enumerate().map(move |(i, &v)| v as f64 / norm * weight.map_or(1.0, |w| w[i] as f64))
                })
                .collect()
        };
        let weight = Tensor::<CpuBackend, 1>::from_data(TensorData::new(w.clone(), [width]), &Default::default());
        close(&rms_norm(&tensor(&x, [rows, width]), Some(&weight), eps).unwrap(), &by_hand(Some(&w)));
        close(&rms_norm(&tensor(&x, [rows, width]), None, eps).unwrap(), &by_hand(None));
        // A transposed (non-contiguous) input reads the same values.
        let xt: Vec<f32> = (0..width * rows).map(|n| x[(n % rows) * width + n / rows]).collect();
        close(&rms_norm(&tensor(&xt, [width, rows]).transpose(), None, eps).unwrap(), &by_hand(None));

        let u = values(rows * width, 3);
        let want: Vec<f64> = x.iter().zip(&u).map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64).collect();
        close(&silu_mul(tensor(&x, [rows, width]), tensor(&u, [rows, width])), &want);
    }

    /// Under autodiff `silu_mul` gives the product and both inputs' gradients of `Σ y ⊙ w` (`w`
    /// fixed) by hand in f64: `∂/∂g = w·u·σ(g)·(1 + g·(1 − σ(g)))`, `∂/∂u = w·silu(g)`; with `up`
    /// untracked only `gate` gets a gradient.
    #[test]
    fn silu_mul_under_autodiff_has_the_gradients_by_hand() {
        type AD = burn::backend::Autodiff<CpuBackend>;
        let (rows, width) = (37, 53);
        let (g, u, w) = (values(rows * width, 7), values(rows * width, 8), values(rows * width, 9));
        let ad = |v: &[f32]| Tensor::<AD, 2>::from_data(TensorData::new(v.to_vec(), [rows, width]), &Default::default());
        let each = |f: &dyn Fn(f64, f64, f64) -> f64| -> Vec<f64> { (0..g.len()).map(|n| f(g[n] as f64, u[n] as f64, w[n] as f64)).collect() };
        let sigma = |g: f64| 1.0 / (1.0 + (-g).exp());
        let want_y = each(&|g, u, _| g * sigma(g) * u);
        let want_dg = each(&|g, u, w| w * u * sigma(g) * (1.0 + g * (1.0 - sigma(g))));
        let want_du = each(&|g, _, w| w * g * sigma(g));
        let near = |what: &str, got: Tensor<CpuBackend, 2>, want: &[f64]| {
            for (n, (g, w)) in got.into_data().into_vec::<f32>().unwrap().iter().zip(want).enumerate() {
                assert!((*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0), "{what} at {n}: {g} against {w}");
            }
        };
        for up_tracked in [true, false] {
            let gate = ad(&g).require_grad();
            let up = if up_tracked { ad(&u).require_grad() } else { ad(&u) };
            let y = silu_mul(gate.clone(), up.clone());
            near("y", y.clone().inner(), &want_y);
            let grads = (y * ad(&w)).sum().backward();
            near("the gate's gradient", gate.grad(&grads).expect("gate is tracked"), &want_dg);
            match up.grad(&grads) {
                Some(du) => near("up's gradient", du, &want_du),
                None => assert!(!up_tracked, "no gradient for a tracked up"),
            }
        }
    }

    /// Under autodiff `rms_norm` gives the norm and `x`'s gradient of `Σ y ⊙ c` (`c` fixed) by
    /// hand in f64, with and without a weight: per row, with `r = sqrt(mean(x²) + eps)` and
    /// `a = c ⊙ w`, `∂/∂x = a / r − x · (a·x) / (n·r³)`.
    #[test]
    fn rms_norm_under_autodiff_has_the_gradient_by_hand() {
        type AD = burn::backend::Autodiff<CpuBackend>;
        let (rows, width, eps) = (37, 53, 1e-5);
        let (x, w, c) = (values(rows * width, 10), values(width, 11), values(rows * width, 12));
        let ad = |v: &[f32]| Tensor::<AD, 2>::from_data(TensorData::new(v.to_vec(), [rows, width]), &Default::default());
        let weight = Tensor::<AD, 1>::from_data(TensorData::new(w.clone(), [width]), &Default::default());
        for weighted in [true, false] {
            let w_at = |j: usize| if weighted { w[j] as f64 } else { 1.0 };
            let (mut want_y, mut want_dx) = (Vec::new(), Vec::new());
            for (xr, cr) in x.chunks(width).zip(c.chunks(width)) {
                let r = (xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / width as f64 + eps).sqrt();
                let a: Vec<f64> = (0..width).map(|j| cr[j] as f64 * w_at(j)).collect();
                let dot: f64 = (0..width).map(|j| a[j] * xr[j] as f64).sum();
                want_y.extend((0..width).map(|j| xr[j] as f64 / r * w_at(j)));
                want_dx.extend((0..width).map(|j| a[j] / r - xr[j] as f64 * dot / (width as f64 * r * r * r)));
            }
            let input = ad(&x).require_grad();
            let y = rms_norm(&input, weighted.then_some(&weight), eps).expect("the CPU backend under autodiff");
            close(&y.clone().inner(), &want_y);
            let grads = (y * ad(&c)).sum().backward();
            let got = input.grad(&grads).expect("x is tracked").into_data().into_vec::<f32>().unwrap();
            for (n, (g, want)) in got.iter().zip(&want_dx).enumerate() {
                assert!((*g as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "weighted {weighted}: gradient {n}, {g} against {want}");
            }
        }
    }

    /// A segment's attention (4 query heads on 2 kv heads of width 20 or 64, a causal mask with
    /// a window of 9, the segment at token 5 of 50, 37 to 39 tokens long so that the last tile
    /// holds 1, 2 or 3 queries): softmax(q·kᵀ·scale + mask)·v by hand in f64, and with AVX2 the
    /// same bits as the plain tiles.
    #[test]
    fn a_segments_attention_is_the_masked_softmax_by_hand() {
        for (d, len) in [(20, 37), (64, 37), (64, 38), (64, 39)] {
            segment_attention_by_hand(d, len);
        }
    }

    /// [`a_segments_attention_is_the_masked_softmax_by_hand`] at head width `d`, `len` tokens.
    fn segment_attention_by_hand(d: usize, len: usize) {
        let (heads, kv_heads, t, start) = (4, 2, 50, 5);
        let shape = HeadShape { heads, group: heads / kv_heads, d, scale: 0.3 };
        // Queries scaled so that the scores stay a few units, as a model's do.
        let q: Vec<f32> = values(t * heads * d, 4).iter().map(|x| x * 0.1).collect();
        let (k, v) = (values(t * kv_heads * d, 5), values(t * kv_heads * d, 6));
        let mask: Vec<f32> = (0..len * len).map(|n| if n % len <= n / len && n / len - n % len < 9 { 0.0 } else { f32::NEG_INFINITY }).collect();
        let mut got = vec![0f32; len * heads * d];
        let rows = |x: &[f32], width: usize| x[start * width..(start + len) * width].to_vec();
        let (qs, ks, vs) = (rows(&q, heads * d), rows(&k, kv_heads * d), rows(&v, kv_heads * d));
        let layout = KeyLayout { head_stride: d, row_stride: kv_heads * d };
        attend_segment(&qs, &ks, &vs, layout, shape, len, &mask, &mut got);
        for (head, i) in (0..heads).flat_map(|h| (0..len).map(move |i| (h, i))) {
            let at = |x: &[f32], width: usize, r: usize, col: usize| -> Vec<f64> { (0..d).map(|c| x[(start + r) * width + col + c] as f64).collect() };
            let kv_col = head / 2 * d;
            let scores: Vec<f64> = (0..=i).map(|j| if i - j < 9 { at(&q, heads * d, i, head * d).iter().zip(at(&k, 2 * d, j, kv_col)).map(|(a, b)| a * b).sum::<f64>() * 0.3 } else { f64::NEG_INFINITY }).collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for c in 0..d {
                let want: f64 = scores.iter().enumerate().map(|(j, s)| (s - max).exp() / total * v[(start + j) * 2 * d + kv_col + c] as f64).sum();
                let g = got[i * heads * d + head * d + c] as f64;
                assert!((g - want).abs() <= 1e-5 * want.abs().max(1.0), "width {d}, head {head} row {i} column {c}: {g} against {want}");
            }
        }
        let mut plain = vec![0f32; got.len()];
        attention::attend_segment_plain(&qs, &ks, &vs, layout, shape, len, &mask, &mut plain);
        assert!(plain.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "the AVX2 tiles differ from the plain ones");
    }

    /// A prefill and a decode give the same bits: 29 positions of 2 sequences (4 query heads on
    /// 2 kv heads of width 20 or 64, a window of 11) attended in one call, and one position at a
    /// time after the cache that the calls before built. In the prefill a query shares its tile
    /// of 4 with others that see other keys; decoded, it is alone.
    #[test]
    fn a_query_gets_the_same_context_in_a_prefill_as_decoded_alone() {
        for d in [20, 64] {
            let (b, heads, kv, t, window) = (2, 4, 2, 29, 11);
            let q: Vec<f32> = values(b * t * heads * d, 21).iter().map(|x| x * 0.1).collect();
            let (k, v) = (values(b * t * kv * d, 22), values(b * t * kv * d, 23));
            let angles = values(t * d, 24);
            let table = |f: fn(f32) -> f32| -> Vec<f32> { (0..t * d).map(|n| f(angles[n / d * d + n % d % (d / 2)])).collect() };
            let (cos, sin) = (table(f32::cos), table(f32::sin));
            let seen = |i: usize, j: usize| if j <= i && i - j < window { 0.0 } else { f32::NEG_INFINITY };
            let mask: Vec<f32> = (0..t * t).map(|n| seen(n / t, n % t)).collect();
            let whole = attend_cached(&tensor(&q, [b * t, heads * d]), &tensor(&k, [b * t, kv * d]), &tensor(&v, [b * t, kv * d]), b, &tensor(&cos, [t, d]), &tensor(&sin, [t, d]), heads, &mut HostKv::new(b, kv, d, 0), &mask).unwrap();
            let whole = whole.into_data().into_vec::<f32>().unwrap();
            let mut cache = HostKv::new(b, kv, d, 0);
            for i in 0..t {
                // Position i of both sequences.
                let rows = |x: &[f32], width: usize| -> Vec<f32> { (0..b).flat_map(|r| x[(r * t + i) * width..][..width].to_vec()).collect() };
                let (qi, ki, vi) = (rows(&q, heads * d), rows(&k, kv * d), rows(&v, kv * d));
                let mask: Vec<f32> = (0..=i).map(|j| seen(i, j)).collect();
                let at = |x: &[f32]| tensor(&x[i * d..(i + 1) * d], [1, d]);
                let alone = attend_cached(&tensor(&qi, [b, heads * d]), &tensor(&ki, [b, kv * d]), &tensor(&vi, [b, kv * d]), b, &at(&cos), &at(&sin), heads, &mut cache, &mask).unwrap();
                let alone = alone.into_data().into_vec::<f32>().unwrap();
                for r in 0..b {
                    let prefilled = &whole[(r * t + i) * heads * d..][..heads * d];
                    assert!(alone[r * heads * d..][..heads * d].iter().zip(prefilled).all(|(a, p)| a.to_bits() == p.to_bits()), "width {d}, sequence {r}, position {i}: decoded alone differs from the prefill");
                }
            }
        }
    }

    /// Attention after a KV cache (2 sequences, 4 query heads on 2 kv heads of width 20, 7 held
    /// positions and 5 new ones, a causal mask with a window of 9, then a mask showing every
    /// key): the new keys rotated and appended after the held ones, and each query's
    /// softmax(q·kᵀ/√d + mask)·v over them by hand in f64, RoPE included. The cache grows to 14
    /// positions' room for the 12, so its heads lie further apart than the positions held.
    #[test]
    fn attention_after_a_kv_cache_is_the_masked_softmax_by_hand() {
        let (b, heads, kv, d, held, t) = (2, 4, 2, 20, 7, 5);
        let s = held + t;
        // Queries scaled so that the scores stay a few units, and RoPE tables as a model's: per
        // position an angle per pair of columns, both halves alike.
        let q: Vec<f32> = values(b * t * heads * d, 11).iter().map(|x| x * 0.05).collect();
        let (k, v) = (values(b * t * kv * d, 12), values(b * t * kv * d, 13));
        let angles = values(t * d, 14);
        let table = |f: fn(f32) -> f32| -> Vec<f32> { (0..t * d).map(|n| f(angles[n / d * d + n % d % (d / 2)])).collect() };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        let (past_k, past_v) = (values(b * kv * held * d, 16), values(b * kv * held * d, 17));
        // The held positions as the projections return them: `[b·held, kv·d]`.
        let as_rows = |x: &[f32]| -> Vec<f32> { (0..b).flat_map(|r| (0..held).flat_map(move |j| (0..kv).flat_map(move |g| x[((r * kv + g) * held + j) * d..][..d].to_vec()))).collect() };
        let mut past = HostKv::new(b, kv, d, 0);
        past.append(&as_rows(&past_k), &as_rows(&past_v), held);
        let windowed: Vec<f32> = (0..t * s).map(|n| if n % s <= held + n / s && held + n / s - n % s < 9 { 0.0 } else { f32::NEG_INFINITY }).collect();
        let all_visible = vec![0f32; t * s];
        for mask in [&windowed, &all_visible] {
            let mut cache = past.clone();
            let got = attend_cached(&tensor(&q, [b * t, heads * d]), &tensor(&k, [b * t, kv * d]), &tensor(&v, [b * t, kv * d]), b, &tensor(&cos, [t, d]), &tensor(&sin, [t, d]), heads, &mut cache, mask).unwrap();
            assert_eq!((cache.len(), cache.capacity()), (s, 14));
            // x of width n·d at row r (new position i = r mod t), head h, rotated in f64.
            let rotated = |x: &[f32], n: usize, r: usize, h: usize| -> Vec<f64> {
                let (x, i, half) = (&x[r * n * d + h * d..][..d], r % t, d / 2);
                (0..d).map(|c| {
                    let turned = if c < half { -(x[c + half] as f64) } else { x[c - half] as f64 };
                    x[c] as f64 * cos[i * d + c] as f64 + turned * sin[i * d + c] as f64
                }).collect()
            };
            let mut want = vec![0f64; b * t * heads * d];
            for (r, h, i) in (0..b).flat_map(|r| (0..heads).flat_map(move |h| (0..t).map(move |i| (r, h, i)))) {
                let g = h / 2;
                // Key j: held (from the cache) or new (rotated here); both as the cache must hold them.
                let key = |j: usize| if j < held { (0..d).map(|c| past_k[((r * kv + g) * held + j) * d + c] as f64).collect() } else { rotated(&k, kv, r * t + j - held, g) };
                let value = |j: usize, c: usize| if j < held { past_v[((r * kv + g) * held + j) * d + c] as f64 } else { v[(r * t + j - held) * kv * d + g * d + c] as f64 };
                for j in 0..s {
                    assert!(cache.key(r, g, j).iter().zip(key(j)).all(|(&a, b)| (a as f64 - b).abs() <= 1e-5), "sequence {r} kv head {g}: key {j} in the extended cache");
                    assert!((0..d).all(|c| cache.value(r, g, j)[c] as f64 == value(j, c)), "sequence {r} kv head {g}: value {j} in the extended cache");
                }
                let qi = rotated(&q, heads, r * t + i, h);
                let visible = |j: usize| mask[i * s + j] == 0.0;
                let scores: Vec<f64> = (0..s).map(|j| if visible(j) { qi.iter().zip(key(j)).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt() } else { f64::NEG_INFINITY }).collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                for c in 0..d {
                    want[(r * t + i) * heads * d + h * d + c] = (0..s).map(|j| (scores[j] - max).exp() / total * value(j, c)).sum();
                }
            }
            let got = got.into_data().into_vec::<f32>().unwrap();
            for (n, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0), "windowed {}: value {n}, {g} against {w}", mask == &windowed);
            }
        }
    }
}
