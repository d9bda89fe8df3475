//! Attention under autodiff on the CPU backend, as stage 2 of calibration trains through it: one
//! custom op from the projections' q, k, v to the context, instead of Burn's chain of RoPE,
//! head reshapes, repeated kv heads, batched products and softmax, each a single-threaded pass
//! into a fresh tensor, forward and backward. Per sequence and query head the forward pass is
//! two GEMMs on the values in place (`matrixmultiply`, through strides) and a softmax, whose
//! probabilities it keeps; the backward step is four GEMMs per head, the kv heads' gradients
//! summed over their query heads, and RoPE undone on q's and k's.

use rayon::prelude::*;

/// The sizes of one call: `b` sequences of `t` positions, `heads` query heads over `kv_heads`
/// key/value heads of width `d`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Sizes {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
}

impl Sizes {
    fn width(&self) -> usize {
        self.heads * self.d
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.d
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale(&self) -> f32 {
        (1.0 / (self.d as f64).sqrt()) as f32
    }
}

/// What the forward pass keeps for the backward step: q and k rotated, v, every head's softmax
/// (`[b, heads, t, t]`) and the RoPE tables (one row per row of q).
#[derive(Clone, Debug)]
pub(super) struct Saved {
    pub sizes: Sizes,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// The context `[b·t, heads·d]` of q `[b·t, heads·d]`, k and v `[b·t, kv_heads·d]` (as the
/// projections return them): per sequence and head `softmax(rope(q)·rope(k)ᵀ/√d + mask)·v`,
/// `mask` additive `[t, t]`, `cos` / `sin` the RoPE tables of every row of q (`[b·t, d]`, kept
/// for the backward step). Also what [`backward`] needs.
pub(super) fn forward(q: &[f32], k: &[f32], v: &[f32], cos: Vec<f32>, sin: Vec<f32>, mask: &[f32], sizes: Sizes) -> (Vec<f32>, Saved) {
    let Sizes { b, t, heads, d, .. } = sizes;
    let (width, kv_width, group, scale) = (sizes.width(), sizes.kv_width(), sizes.group(), sizes.scale());
    let q = super::rotate(q, heads, d, &cos, &sin);
    let k = super::rotate(k, sizes.kv_heads, d, &cos, &sin);
    // Per sequence and head, its softmax and its part of the context.
    let parts: Vec<(Vec<f32>, Vec<f32>)> = (0..b * heads)
        .into_par_iter()
        .map(|job| {
            let (r, h) = (job / heads, job % heads);
            let g = h / group;
            let (qh, kg, vg) = (&q[r * t * width + h * d..], &k[r * t * kv_width + g * d..], &v[r * t * kv_width + g * d..]);
            let mut p = vec![0f32; t * t];
            gemm(t, d, t, scale, (qh, width, 1), (kg, 1, kv_width), 0.0, (&mut p, t));
            for (row, mask) in p.chunks_exact_mut(t).zip(mask.chunks_exact(t)) {
                softmax(row, mask);
            }
            let mut o = vec![0f32; t * d];
            gemm(t, t, d, 1.0, (&p, t, 1), (vg, kv_width, 1), 0.0, (&mut o, d));
            (p, o)
        })
        .collect();
    let mut context = vec![0f32; b * t * width];
    let mut probs = Vec::with_capacity(b * heads * t * t);
    for (job, (p, o)) in parts.into_iter().enumerate() {
        let (r, h) = (job / heads, job % heads);
        for (i, row) in o.chunks_exact(d).enumerate() {
            context[(r * t + i) * width + h * d..][..d].copy_from_slice(row);
        }
        probs.extend(p);
    }
    (context, Saved { sizes, q, k, v: v.to_vec(), probs, cos, sin })
}

/// The gradients of q, k and v (as [`forward`] took them) from the context's gradient `grad`.
pub(super) fn backward(saved: &Saved, grad: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Saved { sizes, q, k, v, probs, cos, sin } = saved;
    let Sizes { b, t, heads, kv_heads, d } = *sizes;
    let (width, kv_width, group, scale) = (sizes.width(), sizes.kv_width(), sizes.group(), sizes.scale());
    // Per sequence and kv head: its query heads' gradients, and its key's and value's (summed
    // over those query heads).
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * kv_heads)
        .into_par_iter()
        .map(|job| {
            let (r, g) = (job / kv_heads, job % kv_heads);
            let (kg, vg) = (&k[r * t * kv_width + g * d..], &v[r * t * kv_width + g * d..]);
            let (mut dq, mut dk, mut dv) = (vec![0f32; group * t * d], vec![0f32; t * d], vec![0f32; t * d]);
            let mut ds = vec![0f32; t * t];
            for (n, dq) in dq.chunks_exact_mut(t * d).enumerate() {
                let h = g * group + n;
                let p = &probs[(r * heads + h) * t * t..][..t * t];
                let (qh, go) = (&q[r * t * width + h * d..], &grad[r * t * width + h * d..]);
                // dP = dO·vᵀ, then dS = P ⊙ (dP − Σ_j P⊙dP) row by row.
                gemm(t, d, t, 1.0, (go, width, 1), (vg, 1, kv_width), 0.0, (&mut ds, t));
                for (s, p) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                    let total: f32 = s.iter().zip(p).map(|(s, p)| s * p).sum();
                    s.iter_mut().zip(p).for_each(|(s, p)| *s = p * (*s - total));
                }
                gemm(t, t, d, scale, (&ds, t, 1), (kg, kv_width, 1), 0.0, (dq, d));
                gemm(t, t, d, scale, (&ds, 1, t), (qh, width, 1), 1.0, (&mut dk, d));
                gemm(t, t, d, 1.0, (p, 1, t), (go, width, 1), 1.0, (&mut dv, d));
            }
            (dq, dk, dv)
        })
        .collect();
    let (mut dq, mut dk, mut dv) = (vec![0f32; b * t * width], vec![0f32; b * t * kv_width], vec![0f32; b * t * kv_width]);
    for (job, (q_part, k_part, v_part)) in parts.into_iter().enumerate() {
        let (r, g) = (job / kv_heads, job % kv_heads);
        for i in 0..t {
            let row = r * t + i;
            dk[row * kv_width + g * d..][..d].copy_from_slice(&k_part[i * d..][..d]);
            dv[row * kv_width + g * d..][..d].copy_from_slice(&v_part[i * d..][..d]);
            for n in 0..group {
                dq[row * width + (g * group + n) * d..][..d].copy_from_slice(&q_part[(n * t + i) * d..][..d]);
            }
        }
    }
    (unrotate(&dq, heads, d, cos, sin), unrotate(&dk, kv_heads, d, cos, sin), dv)
}

/// A row of scores (already scaled) plus its additive mask, turned into its softmax in place.
fn softmax(row: &mut [f32], mask: &[f32]) {
    row.iter_mut().zip(mask).for_each(|(s, m)| *s += m);
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0f32;
    for s in row.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    row.iter_mut().for_each(|s| *s /= total);
}

/// The gradient through RoPE: the transpose of [`super::rotate`]'s rotation, per head of width
/// `d` (`y_i = x_i·cos_i − x_{i+h}·sin_i`, `y_{i+h} = x_{i+h}·cos_{i+h} + x_i·sin_{i+h}`).
fn unrotate(dy: &[f32], n: usize, d: usize, cos: &[f32], sin: &[f32]) -> Vec<f32> {
    let mut dx = vec![0f32; dy.len()];
    dx.par_chunks_mut(n * d).zip(dy.par_chunks(n * d)).enumerate().for_each(|(r, (dx, dy))| {
        let (cos, sin) = (&cos[r * d..(r + 1) * d], &sin[r * d..(r + 1) * d]);
        for (dx, dy) in dx.chunks_exact_mut(d).zip(dy.chunks_exact(d)) {
            let half = d / 2;
            for i in 0..half {
                dx[i] = dy[i] * cos[i] + dy[i + half] * sin[i + half];
                dx[i + half] = dy[i + half] * cos[i + half] - dy[i] * sin[i];
            }
        }
    });
    dx
}

/// `C = alpha·A·B + beta·C` for an `m×k` A and a `k×n` B given as (values, row stride, column
/// stride), and a row-major C (values, row stride) — one `matrixmultiply` GEMM. Panics if a
/// stride reaches past its slice.
#[allow(clippy::too_many_arguments)]
fn gemm(m: usize, k: usize, n: usize, alpha: f32, a: (&[f32], usize, usize), b: (&[f32], usize, usize), beta: f32, c: (&mut [f32], usize)) {
    let ((a, rsa, csa), (b, rsb, csb), (c, rsc)) = (a, b, c);
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(m > 0 && k > 0 && n > 0, "an empty product");
    assert!(last(m, k, rsa, csa) < a.len() && last(k, n, rsb, csb) < b.len() && last(m, n, rsc, 1) < c.len(), "a GEMM operand out of bounds");
    // SAFETY: the assert above keeps every element the strides address inside its slice; C is
    // borrowed mutably and does not overlap A or B.
    unsafe {
        matrixmultiply::sgemm(m, k, n, alpha, a.as_ptr(), rsa as isize, csa as isize, b.as_ptr(), rsb as isize, csb as isize, beta, c.as_mut_ptr(), rsc as isize, 1);
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Autodiff;
    use burn::tensor::{Tensor, TensorData};

    use crate::host::tests::values;
    use crate::CpuBackend;

    type AD = Autodiff<CpuBackend>;

    /// [`crate::host::attend_tracked`]'s context, and its gradients of q, k and v of
    /// `Σ context ⊙ w`, against f64 by hand: the attention with rotate-half RoPE written out, and
    /// the gradients by central differences. 2 sequences of 19 positions, 4 query heads on 2 kv
    /// heads of width 8, a causal mask with a window of 7. (Burn's own autodiff through the same
    /// attention as tensor operations was measured 2e-4 off in q's and k's gradients, this op
    /// 1e-6.)
    #[test]
    fn attention_under_autodiff_has_the_gradients_by_hand() {
        let (b, t, heads, kv, d, window) = (2, 19, 4, 2, 8, 7);
        let scaled = |v: Vec<f32>| v.iter().map(|x| x * 0.3).collect::<Vec<f32>>();
        let (q, k, v, w) = (scaled(values(b * t * heads * d, 31)), scaled(values(b * t * kv * d, 32)), values(b * t * kv * d, 33), values(b * t * heads * d, 34));
        // RoPE tables as a model's: per position an angle per pair of columns, both halves alike.
        let angles = values(t * d, 35);
        let table = |f: fn(f32) -> f32| -> Vec<f32> { (0..t * d).map(|n| f(angles[n / d * d + n % d % (d / 2)])).collect() };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        let mask: Vec<f32> = (0..t * t).map(|n| if n % t <= n / t && n / t - n % t < window { 0.0 } else { f32::NEG_INFINITY }).collect();

        let tensor = |v: &[f32], dims: [usize; 2]| Tensor::<AD, 2>::from_data(TensorData::new(v.to_vec(), dims), &Default::default());
        let (qt, kt, vt) = (tensor(&q, [b * t, heads * d]).require_grad(), tensor(&k, [b * t, kv * d]).require_grad(), tensor(&v, [b * t, kv * d]).require_grad());
        let out = crate::host::attend_tracked(&qt, &kt, &vt, b, &tensor(&cos, [t, d]), &tensor(&sin, [t, d]), heads, kv, &mask).expect("the CPU backend under autodiff");
        let grads = (out.clone() * tensor(&w, [b * t, heads * d])).sum().backward();
        let grad = |x: &Tensor<AD, 2>| x.grad(&grads).expect("tracked").into_data().into_vec::<f32>().unwrap();
        let got = [out.inner().into_data().into_vec::<f32>().unwrap(), grad(&qt), grad(&kt), grad(&vt)];

        let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let (cos, sin, w) = (f64s(&cos), f64s(&sin), f64s(&w));
        let context = |q: &[f64], k: &[f64], v: &[f64]| -> Vec<f64> {
            // Head `h` of row `row` (n heads per row; position row mod t), rotated.
            let rotated = |x: &[f64], n: usize, row: usize, h: usize| -> Vec<f64> {
                let (x, i, half) = (&x[(row * n + h) * d..][..d], row % t, d / 2);
                (0..d).map(|c| x[c] * cos[i * d + c] + if c < half { -x[c + half] } else { x[c - half] } * sin[i * d + c]).collect()
            };
            let mut out = vec![0f64; b * t * heads * d];
            for (r, h, i) in (0..b).flat_map(|r| (0..heads).flat_map(move |h| (0..t).map(move |i| (r, h, i)))) {
                let (g, qi) = (h / (heads / kv), rotated(q, heads, r * t + i, h));
                let score = |j: usize| if mask[i * t + j] == 0.0 { qi.iter().zip(rotated(k, kv, r * t + j, g)).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt() } else { f64::NEG_INFINITY };
                let scores: Vec<f64> = (0..t).map(score).collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for c in 0..d {
                    out[(r * t + i) * heads * d + h * d + c] = (0..t).map(|j| (scores[j] - max).exp() / total * v[((r * t + j) * kv + g) * d + c]).sum();
                }
            }
            out
        };
        let (q, k, v) = (f64s(&q), f64s(&k), f64s(&v));
        let loss = |x: &[Vec<f64>; 3]| context(&x[0], &x[1], &x[2]).iter().zip(&w).map(|(c, w)| c * w).sum::<f64>();
        let step = 1e-5;
        let differences = |which: usize| -> Vec<f64> {
            (0..[&q, &k, &v][which].len())
                .map(|n| {
                    let mut at = [q.clone(), k.clone(), v.clone()];
                    at[which][n] += step;
                    let up = loss(&at);
                    at[which][n] -= 2.0 * step;
                    (up - loss(&at)) / (2.0 * step)
                })
                .collect()
        };
        let want = [context(&q, &k, &v), differences(0), differences(1), differences(2)];
        for (what, (got, want)) in ["context", "q's gradient", "k's gradient", "v's gradient"].iter().zip(got.iter().zip(&want)) {
            let largest = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert!(largest > 0.1, "{what}: values to check ({largest})");
            for (n, (g, w)) in got.iter().zip(want).enumerate() {
                assert!((*g as f64 - w).abs() <= 1e-5 * largest, "{what} at {n}: {g} against {w}");
            }
        }
    }
}
