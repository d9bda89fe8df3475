//! Reading a weight delta Δ = W_ft − W_base (in f32) into its sign mask and the statistics
//! every weight-space scale init needs, in one multi-threaded pass.
//!
//! Weight-space init is the L2-optimal scale for each one-sided mode: the mean of |Δ| over the
//! span of the scale (whole matrix, row, or column). Because Δ·Sign(Δ) = |Δ|, the reconstruction
//! error of those scales has a closed form from the same sums:
//! ‖Δ − Δ̂‖² = ΣΔ² − 2·Σ r_i c_j |Δ_ij| + (Σ r_i²)(Σ c_j²).

use delta_format::{DType, ScaleMode, SignMask, TensorView};
use rayon::prelude::*;

use crate::convert::{bf16_slice, f16_slice, WeightElem};
use crate::error::KernelError;

/// Sign mask and |Δ| statistics of one `[rows, cols]` weight.
#[derive(Clone, Debug)]
pub struct WeightDelta {
    pub signs: SignMask<'static>,
    /// Σ_j |Δ_ij| per row.
    pub row_abs_sum: Vec<f64>,
    /// Σ_i |Δ_ij| per column.
    pub col_abs_sum: Vec<f64>,
    /// Σ Δ².
    pub sq_sum: f64,
}

/// Rows handed to one task: small weights still split across threads, large ones do not
/// pay per-row scheduling.
const ROWS_PER_TASK: usize = 16;

pub(crate) fn matrix_shape(name: &str, v: &TensorView<'_>) -> Result<(usize, usize), KernelError> {
    match *v.shape {
        [r, c] => Ok((r, c)),
        _ => Err(KernelError::NotAMatrix { name: name.into(), shape: delta_format::dtype::shape_string(v.shape) }),
    }
}

/// Runs `f` with the tensor's elements as a typed slice (borrowed from the mmap when aligned).
pub(crate) fn with_elems<R>(
    name: &str,
    v: &TensorView<'_>,
    f: impl FnOnce(Elems<'_>) -> R,
) -> Result<R, KernelError> {
    match v.dtype {
        DType::BF16 => Ok(f(Elems::Bf16(bf16_slice(&v.as_u16_bits().expect("bf16"))))),
        DType::F16 => Ok(f(Elems::F16(f16_slice(&v.as_u16_bits().expect("f16"))))),
        DType::F32 => Ok(f(Elems::F32(&v.as_f32().expect("f32")))),
        d => Err(KernelError::UnsupportedDType { name: name.into(), dtype: d }),
    }
}

pub(crate) enum Elems<'a> {
    Bf16(&'a [crate::convert::Bf16Bits]),
    F16(&'a [crate::convert::F16Bits]),
    F32(&'a [f32]),
}

impl WeightDelta {
    /// Reads Δ = `finetuned` − `base` for a matrix weight.
    pub fn compute(name: &str, base: &TensorView<'_>, finetuned: &TensorView<'_>) -> Result<Self, KernelError> {
        if base.dtype != finetuned.dtype {
            return Err(KernelError::DTypeMismatch { name: name.into(), base: base.dtype, other: finetuned.dtype });
        }
        if base.shape != finetuned.shape {
            return Err(KernelError::ShapeMismatch {
                name: name.into(),
                base: delta_format::dtype::shape_string(base.shape),
                other: delta_format::dtype::shape_string(finetuned.shape),
            });
        }
        let (rows, cols) = matrix_shape(name, base)?;
        with_elems(name, base, |b| {
            with_elems(name, finetuned, |f| match (b, f) {
                (Elems::Bf16(b), Elems::Bf16(f)) => compute_typed(rows, cols, b, f),
                (Elems::F16(b), Elems::F16(f)) => compute_typed(rows, cols, b, f),
                (Elems::F32(b), Elems::F32(f)) => compute_typed(rows, cols, b, f),
                _ => unreachable!("dtypes checked equal"),
            })
        })??
    }

    pub fn rows(&self) -> usize {
        self.signs.rows()
    }

    pub fn cols(&self) -> usize {
        self.signs.cols()
    }

    pub fn abs_sum(&self) -> f64 {
        self.row_abs_sum.iter().sum()
    }

    /// Weight-space init of `mode`'s scales. For `two-sided`, v is the row means of |Δ| and u the
    /// column means divided by their mean (so u averages 1).
    pub fn init_scales(&self, mode: ScaleMode) -> Vec<f32> {
        let (rows, cols) = (self.rows() as f64, self.cols() as f64);
        let row_means = || self.row_abs_sum.iter().map(|s| (s / cols) as f32);
        let col_means = || self.col_abs_sum.iter().map(|s| (s / rows) as f32);
        match mode {
            ScaleMode::Scalar => vec![(self.abs_sum() / (rows * cols)) as f32],
            ScaleMode::PerOutput => row_means().collect(),
            ScaleMode::PerInput => col_means().collect(),
            ScaleMode::TwoSided => {
                let mean = self.abs_sum() / (rows * cols);
                let u = self.col_abs_sum.iter().map(|s| if mean > 0.0 { (s / rows / mean) as f32 } else { 1.0 });
                row_means().chain(u).collect()
            }
        }
    }

    /// ‖Δ − Δ̂‖² for one-sided modes, from the sums alone; `None` for `two-sided`, whose cross term
    /// needs a second pass over Δ (see [`two_sided_error`]).
    pub fn error(&self, mode: ScaleMode, scales: &[f32]) -> Option<f64> {
        let sq = |v: &[f32]| v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        let dot = |s: &[f32], sums: &[f64]| s.iter().zip(sums).map(|(&a, &b)| a as f64 * b).sum::<f64>();
        let (cross, norm) = match mode {
            ScaleMode::Scalar => (scales[0] as f64 * self.abs_sum(), sq(scales) * (self.rows() * self.cols()) as f64),
            ScaleMode::PerOutput => (dot(scales, &self.row_abs_sum), sq(scales) * self.cols() as f64),
            ScaleMode::PerInput => (dot(scales, &self.col_abs_sum), sq(scales) * self.rows() as f64),
            ScaleMode::TwoSided => return None,
        };
        Some((self.sq_sum - 2.0 * cross + norm).max(0.0))
    }
}

fn compute_typed<T: WeightElem>(rows: usize, cols: usize, base: &[T], ft: &[T]) -> Result<WeightDelta, KernelError> {
    let wpr = delta_format::sign::words_per_row(cols);
    let mut words = vec![0u32; rows * wpr];
    let mut row_abs_sum = vec![0f64; rows];
    struct Acc {
        col: Vec<f64>,
        sq: f64,
    }
    let chunk_words = ROWS_PER_TASK * wpr.max(1);
    let acc = words
        .par_chunks_mut(chunk_words)
        .zip(row_abs_sum.par_chunks_mut(ROWS_PER_TASK))
        .enumerate()
        .fold(
            || Acc { col: vec![0.0; cols], sq: 0.0 },
            |mut acc, (t, (wchunk, rsum))| {
                let mut delta = vec![0f32; cols];
                for (k, (wrow, rs)) in wchunk.chunks_mut(wpr.max(1)).zip(rsum.iter_mut()).enumerate() {
                    let i = t * ROWS_PER_TASK + k;
                    let (b, f) = (&base[i * cols..(i + 1) * cols], &ft[i * cols..(i + 1) * cols]);
                    let mut abs = 0f64;
                    for j in 0..cols {
                        let d = f[j].to_f32() - b[j].to_f32();
                        delta[j] = d;
                        let a = d.abs() as f64;
                        abs += a;
                        acc.col[j] += a;
                        acc.sq += (d as f64) * (d as f64);
                    }
                    *rs = abs;
                    if wpr > 0 {
                        delta_format::sign::pack_row(&delta, wrow);
                    }
                }
                acc
            },
        )
        .reduce(
            || Acc { col: vec![0.0; cols], sq: 0.0 },
            |mut a, b| {
                a.col.iter_mut().zip(&b.col).for_each(|(x, y)| *x += y);
                a.sq += b.sq;
                a
            },
        );
    let signs = SignMask::new(rows, cols, words.into()).expect("sized for the shape");
    Ok(WeightDelta { signs, row_abs_sum, col_abs_sum: acc.col, sq_sum: acc.sq })
}

/// ‖Δ − Δ̂‖² of any mode by direct summation over Δ (a second pass over both tensors).
pub fn direct_error(
    name: &str,
    base: &TensorView<'_>,
    finetuned: &TensorView<'_>,
    signs: &SignMask<'_>,
    mode: ScaleMode,
    scales: &[f32],
) -> Result<f64, KernelError> {
    let (rows, cols) = matrix_shape(name, base)?;
    let factors = crate::merge::ScaleFactors::new(name, mode, scales, rows, cols)?;
    let row_err = |i: usize, b: &dyn Fn(usize) -> f32, f: &dyn Fn(usize) -> f32| -> f64 {
        (0..cols)
            .map(|j| {
                let d = (f(i * cols + j) - b(i * cols + j)) as f64;
                let e = d - factors.delta_hat(signs, i, j) as f64;
                e * e
            })
            .sum()
    };
    with_elems(name, base, |be| {
        with_elems(name, finetuned, |fe| {
            let get = |e: &Elems<'_>, k: usize| match e {
                Elems::Bf16(s) => s[k].to_f32(),
                Elems::F16(s) => s[k].to_f32(),
                Elems::F32(s) => s[k],
            };
            (0..rows).into_par_iter().map(|i| row_err(i, &|k| get(&be, k), &|k| get(&fe, k))).sum()
        })
    })?
}

/// ‖Δ − Δ̂‖² for two-sided scales (needs the tensors again for the cross term).
pub fn two_sided_error(
    name: &str,
    base: &TensorView<'_>,
    finetuned: &TensorView<'_>,
    d: &WeightDelta,
    scales: &[f32],
) -> Result<f64, KernelError> {
    direct_error(name, base, finetuned, &d.signs, ScaleMode::TwoSided, scales)
}
