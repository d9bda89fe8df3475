//! Merge: W = W_base + Δ̂, rounded back to the base dtype — what `apply` writes.
//!
//! Every scale mode is the product of a row factor and a column factor:
//! Δ̂[i, j] = (r[i]·c[j])·S[i, j], with (r, c) = (α, 1), (v, 1), (1, u) or (v, u). The fast path
//! runs rows in parallel and applies the sign by flipping the IEEE sign bit, so the inner loop
//! has no branch; [`merge_reference`] is the plain formula, and the tests require both to agree
//! bit for bit.

use std::borrow::Cow;

use delta_format::{CompressedWeight, DType, ScaleMode, SignMask, TensorView};
use rayon::prelude::*;

use crate::convert::{Bf16Bits, F16Bits, WeightElem};
use crate::delta::{matrix_shape, with_elems, Elems};
use crate::error::KernelError;

/// Row and column factors of a weight's scales.
pub struct ScaleFactors<'a> {
    pub rows: Cow<'a, [f32]>,
    pub cols: Cow<'a, [f32]>,
}

impl<'a> ScaleFactors<'a> {
    pub fn new(name: &str, mode: ScaleMode, scales: &'a [f32], rows: usize, cols: usize) -> Result<Self, KernelError> {
        let expected = mode.scale_len(rows, cols).unwrap_or(usize::MAX);
        if scales.len() != expected {
            return Err(KernelError::ScaleLen { name: name.into(), mode, expected, found: scales.len() });
        }
        let ones = |n| Cow::Owned(vec![1.0f32; n]);
        Ok(match mode {
            ScaleMode::Scalar => ScaleFactors { rows: Cow::Owned(vec![scales[0]; rows]), cols: ones(cols) },
            ScaleMode::PerOutput => ScaleFactors { rows: Cow::Borrowed(scales), cols: ones(cols) },
            ScaleMode::PerInput => ScaleFactors { rows: ones(rows), cols: Cow::Borrowed(scales) },
            ScaleMode::TwoSided => ScaleFactors { rows: Cow::Borrowed(&scales[..rows]), cols: Cow::Borrowed(&scales[rows..]) },
        })
    }

    /// Δ̂[i, j] by the definition.
    pub fn delta_hat(&self, signs: &SignMask<'_>, i: usize, j: usize) -> f32 {
        (self.rows[i] * self.cols[j]) * signs.sign(i, j)
    }
}

/// Merges `w` into `base`, returning the merged tensor's bytes in the base dtype.
pub fn merge(base: &TensorView<'_>, w: &CompressedWeight<'_>) -> Result<Vec<u8>, KernelError> {
    let mut out = Vec::new();
    merge_into(base, w, &mut out)?;
    Ok(out)
}

/// Like [`merge`], writing into `out` (the base tensor's byte length) to avoid an allocation.
pub fn merge_into(base: &TensorView<'_>, w: &CompressedWeight<'_>, out: &mut Vec<u8>) -> Result<(), KernelError> {
    let (rows, cols) = check(base, w)?;
    let f = ScaleFactors::new(&w.name, w.mode, &w.scales, rows, cols)?;
    out.clear();
    out.resize(base.data.len(), 0);
    with_elems(&w.name, base, |e| match e {
        Elems::Bf16(b) => merge_rows(b, &w.signs, &f, cast_out::<Bf16Bits>(out)),
        Elems::F16(b) => merge_rows(b, &w.signs, &f, cast_out::<F16Bits>(out)),
        Elems::F32(b) => merge_rows(b, &w.signs, &f, cast_out::<f32>(out)),
    })
}

fn cast_out<T: WeightElem>(out: &mut [u8]) -> &mut [T] {
    // SAFETY: WeightElem types are plain numbers valid for any bit pattern; the allocator
    // aligns byte buffers of this size to at least 8, and we check it.
    let (head, body, tail) = unsafe { out.align_to_mut::<T>() };
    assert!(head.is_empty() && tail.is_empty(), "output buffer is not aligned");
    body
}

fn check(base: &TensorView<'_>, w: &CompressedWeight<'_>) -> Result<(usize, usize), KernelError> {
    let (rows, cols) = matrix_shape(&w.name, base)?;
    if (rows, cols) != (w.rows(), w.cols()) {
        return Err(KernelError::ShapeMismatch {
            name: w.name.to_string(),
            base: delta_format::dtype::shape_string(base.shape),
            other: delta_format::dtype::shape_string(&[w.rows(), w.cols()]),
        });
    }
    if !matches!(base.dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(KernelError::UnsupportedDType { name: w.name.to_string(), dtype: base.dtype });
    }
    Ok((rows, cols))
}

fn merge_rows<T: WeightElem>(base: &[T], signs: &SignMask<'_>, f: &ScaleFactors<'_>, out: &mut [T]) {
    let cols = signs.cols();
    if cols == 0 {
        return;
    }
    out.par_chunks_mut(cols).with_min_len(8).enumerate().for_each(|(i, out_row)| {
        let base_row = &base[i * cols..(i + 1) * cols];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { merge_row_avx2(base_row, signs.row(i), f.rows[i], &f.cols, out_row) };
        }
        merge_row(base_row, signs.row(i), f.rows[i], &f.cols, out_row)
    });
}

/// `v` with the sign of bit `b` of a packed sign word applied: `+v` if the bit is 1 (Δ > 0),
/// `−v` if it is 0, by flipping the IEEE sign bit (exact, branch-free). The one place the sign
/// convention of FORMAT.md meets arithmetic.
#[inline(always)]
pub(crate) fn with_sign(v: f32, word: u32, b: usize) -> f32 {
    f32::from_bits(v.to_bits() ^ ((!word >> b) & 1) << 31)
}

/// Rows `j0..` of Δ̂ᵀ (`[in, out]`, row-major; as many as `d` holds, at most 32, with `j0` a
/// multiple of 32 — the inputs of one sign word per output), `f` the factors of `w`'s scales:
/// each value `±(r[i]·c[j])`, [`ScaleFactors::delta_hat`] bit for bit, the sign applied by
/// flipping the sign bit. What a transposed consumer of the delta (end-to-end calibration's
/// `[in, out]` weights) writes a block at a time. An error for rows that are not such a block,
/// or factors of another shape.
pub fn delta_t_rows(w: &CompressedWeight<'_>, f: &ScaleFactors<'_>, j0: usize, d: &mut [f32]) -> Result<(), KernelError> {
    let out = w.rows();
    let n = d.len() / out.max(1);
    if !j0.is_multiple_of(32) || n * out != d.len() || n > 32 || j0 + n > w.cols() || (f.rows.len(), f.cols.len()) != (out, w.cols()) {
        return Err(KernelError::Batch(format!("Δ̂ᵀ rows of `{}` [{out}, {}]: {} values from row {j0}, factors for [{}, {}]: not one sign word's rows", w.name, w.cols(), d.len(), f.rows.len(), f.cols.len())));
    }
    let words: Vec<u32> = (0..out).map(|i| w.signs.row(i)[j0 / 32]).collect();
    for (b, row) in d.chunks_exact_mut(out.max(1)).enumerate() {
        let c = f.cols[j0 + b];
        for ((v, &r), &word) in row.iter_mut().zip(f.rows.iter()).zip(&words) {
            *v = with_sign(r * c, word, b);
        }
    }
    Ok(())
}

/// One row: out[j] = round(base[j] + S[j]·(r·c[j])), the sign applied by flipping the IEEE sign
/// bit of the product (exact), with no branch in the loop so that it vectorises.
#[inline(always)]
fn merge_row<T: WeightElem>(base: &[T], words: &[u32], r: f32, cols: &[f32], out: &mut [T]) {
    let chunks = out.chunks_mut(32).zip(base.chunks(32)).zip(cols.chunks(32));
    for (&word, ((out32, base32), cols32)) in words.iter().zip(chunks) {
        for (b, ((o, &x), &c)) in out32.iter_mut().zip(base32).zip(cols32).enumerate() {
            *o = T::from_f32(x.to_f32() + with_sign(r * c, word, b));
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn merge_row_avx2<T: WeightElem>(base: &[T], words: &[u32], r: f32, cols: &[f32], out: &mut [T]) {
    merge_row(base, words, r, cols, out)
}

/// The merge as written in the spec, element by element, using `half` for rounding: the oracle.
pub fn merge_reference(base: &TensorView<'_>, w: &CompressedWeight<'_>) -> Result<Vec<u8>, KernelError> {
    let (rows, cols) = check(base, w)?;
    let f = ScaleFactors::new(&w.name, w.mode, &w.scales, rows, cols)?;
    let mut out = Vec::with_capacity(base.data.len());
    let size = base.dtype.size();
    for i in 0..rows {
        for j in 0..cols {
            let k = (i * cols + j) * size;
            let b = &base.data[k..k + size];
            let d = f.delta_hat(&w.signs, i, j);
            match base.dtype {
                DType::BF16 => {
                    let x = half::bf16::from_le_bytes([b[0], b[1]]).to_f32() + d;
                    out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
                }
                DType::F16 => {
                    let x = half::f16::from_le_bytes([b[0], b[1]]).to_f32() + d;
                    out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
                }
                _ => {
                    let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) + d;
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{direct_error, WeightDelta};
    use proptest::prelude::*;

    fn encode(dtype: DType, v: &[f32]) -> Vec<u8> {
        match dtype {
            DType::BF16 => v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            DType::F16 => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
            _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        }
    }

    fn values(rows: usize, cols: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // A few exact zeros so that Δ = 0 (sign −1) is exercised.
                if s % 11 == 0 { 0.0 } else { ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale }
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn fast_merge_equals_reference_bit_for_bit(
            rows in 1usize..40, cols in 1usize..100, seed in any::<u64>(),
            dtype in prop::sample::select(vec![DType::BF16, DType::F16, DType::F32]),
            mode in prop::sample::select(ScaleMode::ALL.to_vec()),
        ) {
            let shape = [rows, cols];
            let b = encode(dtype, &values(rows, cols, seed, 0.2));
            let delta = values(rows, cols, seed ^ 0xABCD, 0.02);
            let bv = TensorView { dtype, shape: &shape, data: &b };
            let base_f: Vec<f32> = values(rows, cols, seed, 0.2);
            let f = encode(dtype, &base_f.iter().zip(&delta).map(|(x, d)| x + d).collect::<Vec<_>>());
            let fv = TensorView { dtype, shape: &shape, data: &f };
            let d = WeightDelta::compute("w", &bv, &fv).unwrap();
            let scales = d.init_scales(mode);
            let w = CompressedWeight { name: "w".into(), mode, signs: d.signs.clone(), scales: scales.clone().into() };
            let fast = merge(&bv, &w).unwrap();
            let slow = merge_reference(&bv, &w).unwrap();
            prop_assert!(fast == slow, "{dtype} {mode} {rows}x{cols}");
            // The portable row loop (used where AVX2 is missing) agrees too.
            if dtype == DType::F32 {
                let b32: Vec<f32> = b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                let fac = ScaleFactors::new("w", mode, &scales, rows, cols).unwrap();
                let mut out = vec![0f32; rows * cols];
                for i in 0..rows {
                    merge_row(&b32[i * cols..(i + 1) * cols], w.signs.row(i), fac.rows[i], &fac.cols, &mut out[i * cols..(i + 1) * cols]);
                }
                let portable: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
                prop_assert!(portable == slow, "portable path, {mode} {rows}x{cols}");
            }

            // Δ̂ᵀ written 32 inputs at a time is the definition's Δ̂, transposed, bit for bit.
            let fac = ScaleFactors::new("w", mode, &scales, rows, cols).unwrap();
            let mut dt = vec![f32::NAN; cols * rows];
            for (k, block) in dt.chunks_mut(32 * rows).enumerate() {
                delta_t_rows(&w, &fac, 32 * k, block).unwrap();
            }
            prop_assert!(delta_t_rows(&w, &fac, 1, &mut dt[..rows]).is_err(), "a row not at a sign word's start");
            prop_assert!(delta_t_rows(&w, &fac, 0, &mut vec![0.0; 33 * rows]).is_err(), "33 rows");
            for (k, v) in dt.iter().enumerate() {
                let (j, i) = (k / rows, k % rows);
                prop_assert!(v.to_bits() == fac.delta_hat(&w.signs, i, j).to_bits(), "Δ̂ᵀ[{j}, {i}], {mode} {rows}x{cols}");
            }

            // The closed-form error agrees with direct summation. It is ‖Δ‖² − 2⟨Δ, Δ̂⟩ + ‖Δ̂‖²,
            // terms of the size of ‖Δ‖² that cancel where Δ̂ fits Δ exactly (one column, per
            // output), so its rounding is relative to ‖Δ‖², not to the error.
            if let Some(closed) = d.error(mode, &scales) {
                let direct = direct_error("w", &bv, &fv, &d.signs, mode, &scales).unwrap();
                prop_assert!((closed - direct).abs() <= 1e-9 * (direct + d.sq_sum), "{closed} vs {direct} (‖Δ‖² {})", d.sq_sum);
            }
        }
    }

    #[test]
    fn weight_space_init_minimises_the_one_sided_error() {
        let (rows, cols) = (7, 45);
        let shape = [rows, cols];
        let b = encode(DType::F32, &values(rows, cols, 3, 1.0));
        let f = encode(DType::F32, &values(rows, cols, 5, 1.0));
        let (bv, fv) = (TensorView { dtype: DType::F32, shape: &shape, data: &b }, TensorView { dtype: DType::F32, shape: &shape, data: &f });
        let d = WeightDelta::compute("w", &bv, &fv).unwrap();
        for mode in [ScaleMode::Scalar, ScaleMode::PerOutput, ScaleMode::PerInput] {
            let s = d.init_scales(mode);
            let best = d.error(mode, &s).unwrap();
            for k in 0..s.len() {
                for eps in [1e-3f32, -1e-3] {
                    let mut t = s.clone();
                    t[k] += eps;
                    assert!(d.error(mode, &t).unwrap() > best, "{mode}: moving scale {k} by {eps} lowered the error");
                }
            }
        }
    }

    #[test]
    fn wrong_scale_count_and_shape_are_errors() {
        let shape = [2, 3];
        let b = encode(DType::F32, &[0.0; 6]);
        let bv = TensorView { dtype: DType::F32, shape: &shape, data: &b };
        let signs = SignMask::new(2, 3, vec![0u32, 0].into()).unwrap();
        let w = CompressedWeight { name: "w".into(), mode: ScaleMode::PerInput, signs: signs.clone(), scales: vec![1.0; 2].into() };
        assert!(matches!(merge(&bv, &w), Err(KernelError::ScaleLen { expected: 3, found: 2, .. })));
        let other = SignMask::new(3, 2, vec![0u32, 0, 0].into()).unwrap();
        let w = CompressedWeight { name: "w".into(), mode: ScaleMode::Scalar, signs: other, scales: vec![1.0].into() };
        assert!(matches!(merge(&bv, &w), Err(KernelError::ShapeMismatch { .. })));
        let w = CompressedWeight { name: "w".into(), mode: ScaleMode::Scalar, signs, scales: vec![0.5].into() };
        let merged = merge(&bv, &w).unwrap();
        let got: Vec<f32> = merged.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, vec![-0.5; 6], "all-zero signs mean −α everywhere");
    }
}
