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
        let r = f.rows[i];
        let base_row = &base[i * cols..(i + 1) * cols];
        for (k, &word) in signs.row(i).iter().enumerate() {
            let start = k * 32;
            let end = (start + 32).min(cols);
            let neg = !word;
            for j in start..end {
                let flip = ((neg >> (j - start)) & 1) << 31;
                let d = f32::from_bits((r * f.cols[j]).to_bits() ^ flip);
                out_row[j] = T::from_f32(base_row[j].to_f32() + d);
            }
        }
    });
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
