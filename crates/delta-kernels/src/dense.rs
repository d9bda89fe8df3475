//! The base product of a decode step, `Y = X · W` with the weight kept as the models keep it
//! (`[in, out]`, row-major): read in place, once for all rows of X, output columns split across
//! threads. Every output is one chain of FMAs in input order on every path (portable, AVX2,
//! AVX-512), so a row's result does not depend on the rows it is computed with — batched serving
//! gives each sequence what it would get alone, bit for bit.

use rayon::prelude::*;

use crate::convert::{Bf16Bits, WeightElem};
use crate::error::KernelError;
use crate::per_task;

/// A weight value the dense products read: f32, or bf16 ([`Bf16Bits`]: the upper half of an
/// f32, so widening it is exact). A product on bf16 weights is the f32 product on the widened
/// values, bit for bit, reading half the bytes (a decode step is bound by reading the weights).
pub trait DenseValue: WeightElem {
    /// 16 values from `p`, widened to f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX-512F and `p` points to 16 readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// 8 values from `p`, widened to f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX2 and `p` points to 8 readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl DenseValue for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl DenseValue for Bf16Bits {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const Bf16Bits) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (16 values of 2 bytes).
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)))) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const Bf16Bits) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (8 values of 2 bytes).
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)))) }
    }
}

/// How many sweeps ahead the AVX2 kernel prefetches the weight rows (at B = 8 of a 4096² weight
/// on Zen 3, 2 measured 3.3–4.3 ms in six runs, against 3.9–4.9 ms for 1 and 3.7–4.2 ms for 4
/// in three runs each).
const PREFETCH_ROWS: usize = 2;

/// Most accumulator floats a task of [`dense_matmul_t`] keeps (64 KiB, inside L2).
pub(crate) const MAX_ACC_FLOATS: usize = 16 << 10;

/// `a · b` in eight running sums, so that it vectorises (f32 or f64; the sums' order is fixed, so
/// the result does not depend on the caller's threads).
pub fn dot<T>(a: &[T], b: &[T]) -> T
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::Mul<Output = T> + std::iter::Sum,
{
    let mut acc = [T::default(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: T = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    acc.into_iter().sum::<T>() + tail
}

/// `a · b` as 8 running sums of every 8th product (fused multiply-adds in order), added up by
/// [`lane_sum`], then the last `len mod 8` products in order. Vector code that keeps the 8 sums
/// in a register and adds them the same way gets the same bits (the attention's scores, the tied
/// head's dot products of [`crate::dense_nt`]).
#[inline(always)]
pub fn fma_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ca.remainder().iter().zip(cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s = x.mul_add(y, *s);
        }
    }
    tail.fold(lane_sum(&acc), |s, (&x, &y)| x.mul_add(y, s))
}

/// 8 running sums added up as ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)).
#[inline(always)]
pub fn lane_sum(lanes: &[f32; 8]) -> f32 {
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

/// The rows of X in a product of X (`[rows, inp]`) and a weight of `inp × out` values stored as
/// `w_dims`, into y (`[rows, out]`), or an error naming every length when they do not agree.
pub(crate) fn product_rows(what: &str, x: &[f32], w_len: usize, w_dims: [usize; 2], inp: usize, out: usize, y: &[f32]) -> Result<usize, KernelError> {
    let rows = if inp == 0 { 0 } else { x.len() / inp };
    if x.len() != rows * inp || w_len != inp * out || y.len() != rows * out {
        return Err(KernelError::Batch(format!("{what}: x has {} values, W {w_dims:?} has {w_len}, y has {} (rows {rows})", x.len(), y.len())));
    }
    Ok(rows)
}

/// `Y = X · W` for a weight given as `wt` (`[in, out]`, row-major — the transposed layout the
/// models keep): the decode-shaped product. Each weight is read once for all `rows` of X, output
/// columns are split across threads, and nothing is packed or copied (a general GEMM packs the
/// whole weight on every call, which at one row costs more than the product). The weight is f32
/// or bf16 ([`DenseValue`]).
pub fn dense_matmul_t<T: DenseValue>(x: &[f32], wt: &[T], inp: usize, out: usize, y: &mut [f32]) -> Result<(), KernelError> {
    let rows = product_rows("dense product", x, wt.len(), [inp, out], inp, out, y)?;
    in_column_tasks(rows, out, y, |c0, c1, acc| axpy_columns(x, wt, inp, out, c0, c1, acc));
    Ok(())
}

/// Bytes of one widened tile of [`widened_matmul_t`] and [`crate::dense_nt::widened_matmul_nt`]
/// (a whole SmolLM2 projection fits in one).
const WIDENED_TILE_BYTES: usize = 4 << 20;

/// `Y = X · W` for prefill-sized X (`[rows, inp]`) on a bf16 weight `wt` (`[inp, out]`): tile by
/// tile of output columns, the weight's values widened to f32 (exact; all cores), then one GEMM
/// per tile written straight into Y (`[rows, out]`, [`gemm_columns`]). The GEMM sums every output
/// in the same order whatever the tile, so Y is, bit for bit, the GEMM on the f32 weight.
/// Decode-sized X is better served by [`dense_matmul_t`], which reads the bf16 values in place.
pub fn widened_matmul_t(x: &[f32], wt: &[Bf16Bits], inp: usize, out: usize, y: &mut [f32]) -> Result<(), KernelError> {
    product_rows("widened product", x, wt.len(), [inp, out], inp, out, y)?;
    // A tile is [inp, n], row-major: row j holds W[j, c0..c0 + n].
    widened_tiles(x, inp, out, y, |n| [n as isize, 1], |c0, n, tile| {
        tile.par_chunks_mut(64 * n).enumerate().for_each(|(b, part)| {
            for (k, row) in part.chunks_exact_mut(n).enumerate() {
                let j = b * 64 + k;
                for (v, &b) in row.iter_mut().zip(&wt[j * out + c0..j * out + c0 + n]) {
                    *v = b.to_f32();
                }
            }
        })
    });
    Ok(())
}

/// The widened products' loop, their shapes checked: Y = 0, then for every tile of up to
/// [`WIDENED_TILE_BYTES`] of f32 output columns c0..c0 + n, `widen(c0, n, tile)` fills `tile`
/// (`inp · n` values, read as `[inp, n]` through `strides(n)`) and [`gemm_columns`] adds X · tile
/// into those columns of Y.
pub(crate) fn widened_tiles(x: &[f32], inp: usize, out: usize, y: &mut [f32], strides: impl Fn(usize) -> [isize; 2], widen: impl Fn(usize, usize, &mut [f32])) {
    y.fill(0.0);
    if x.is_empty() || out == 0 || inp == 0 {
        return;
    }
    let tile = (WIDENED_TILE_BYTES / (4 * inp)).next_multiple_of(16).min(out);
    let mut t = vec![0f32; inp * tile];
    for c0 in (0..out).step_by(tile) {
        let n = tile.min(out - c0);
        widen(c0, n, &mut t[..inp * n]);
        gemm_columns(x, inp, &t[..inp * n], strides(n), n, y, out, c0);
    }
}

/// Columns `c0..c0 + n` of Y (`[rows, out]`) = X (`[rows, inp]`) · T, where T is `[inp, n]`
/// read from `t` through its strides `[row, column]`: one `matrixmultiply` GEMM, multi-threaded
/// by `matrixmultiply` itself. `matrixmultiply` packs its right operand on the calling thread and
/// splits the left one's packing among its threads, so when T is wider than X is tall the GEMM
/// runs as Yᵀ = Tᵀ·Xᵀ; every output is summed in the same order either way.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_columns(x: &[f32], inp: usize, t: &[f32], [rs, cs]: [isize; 2], n: usize, y: &mut [f32], out: usize, c0: usize) {
    let rows = x.len() / inp.max(1);
    if rows == 0 || inp == 0 || n == 0 {
        return;
    }
    let last = (inp - 1) as isize * rs + (n - 1) as isize * cs;
    assert!(x.len() == rows * inp && rs >= 0 && cs >= 0 && (last as usize) < t.len() && c0 + n <= out && y.len() >= rows * out, "gemm_columns: operands out of bounds");
    // SAFETY: checked just above: x is [rows, inp] row-major, T's last element (the largest
    // offset, strides being non-negative) lies in t, and columns c0..c0 + n of the [rows, out]
    // row-major y exist; the second call addresses the same elements as their transposes.
    unsafe {
        if n <= rows {
            matrixmultiply::sgemm(rows, inp, n, 1.0, x.as_ptr(), inp as isize, 1, t.as_ptr(), rs, cs, 0.0, y.as_mut_ptr().add(c0), out as isize, 1);
        } else {
            matrixmultiply::sgemm(n, inp, rows, 1.0, t.as_ptr(), cs, rs, x.as_ptr(), 1, inp as isize, 0.0, y.as_mut_ptr().add(c0), 1, out as isize);
        }
    }
}

/// Splits the output columns of `y` (`[rows, out]`) into tasks run in parallel: `sums(c0, c1,
/// acc)` fills a task's `[rows, c1 − c0]` sums (`acc` comes in zeroed, at most
/// [`MAX_ACC_FLOATS`]), which are then placed into their columns of `y`.
pub(crate) fn in_column_tasks(rows: usize, out: usize, y: &mut [f32], sums: impl Fn(usize, usize, &mut [f32]) + Sync) {
    if rows == 0 || out == 0 {
        return;
    }
    let width = per_task(out, 8).min((MAX_ACC_FLOATS / rows).max(8));
    let tasks = out.div_ceil(width);
    let parts: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let (c0, c1) = (t * width, ((t + 1) * width).min(out));
            let mut acc = vec![0f32; rows * (c1 - c0)];
            sums(c0, c1, &mut acc);
            acc
        })
        .collect();
    place_columns(&parts, width, out, y);
}

/// Copies each task's `[rows, w]` block of sums (task t owns the output columns from `t · width`)
/// into its columns of `y` (`[rows, out]`).
pub(crate) fn place_columns(parts: &[Vec<f32>], width: usize, out: usize, y: &mut [f32]) {
    let rows = y.len() / out.max(1);
    for (t, acc) in parts.iter().enumerate() {
        let (c0, w) = (t * width, acc.len() / rows.max(1));
        for (r, part) in acc.chunks_exact(w.max(1)).enumerate() {
            y[r * out + c0..r * out + c0 + w].copy_from_slice(part);
        }
    }
}

/// `acc[r, c - c0] = Σ_i x[r, i] · wt[i, c]` for c in c0..c1 (`acc` comes in zeroed).
pub(crate) fn axpy_columns<T: DenseValue>(x: &[f32], wt: &[T], inp: usize, out: usize, c0: usize, c1: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { axpy_rows_avx512(x, wt, inp, out, c0, c1, acc) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { axpy_rows_avx2(x, wt, inp, out, c0, c1, acc) };
    }
    axpy_columns_portable(x, wt, inp, out, c0, c1, acc)
}

#[inline(always)]
fn axpy_columns_portable<T: DenseValue>(x: &[f32], wt: &[T], inp: usize, out: usize, c0: usize, c1: usize, acc: &mut [f32]) {
    let width = c1 - c0;
    for i in 0..inp {
        let w = &wt[i * out + c0..i * out + c1];
        for (r, acc_r) in acc.chunks_exact_mut(width).enumerate() {
            let a = x[r * inp + i];
            for (s, &v) in acc_r.iter_mut().zip(w) {
                *s = a.mul_add(v.to_f32(), *s);
            }
        }
    }
}

/// Columns `from..c1` (fewer than a register block) one sum at a time: the same chain of FMAs in
/// input order as every other path.
fn tail_columns<T: DenseValue>(x: &[f32], wt: &[T], inp: usize, out: usize, from: usize, c0: usize, c1: usize, acc: &mut [f32]) {
    let width = c1 - c0;
    for r in 0..acc.len() / width {
        for c in from..c1 {
            let mut sum = 0f32;
            for i in 0..inp {
                sum = x[r * inp + i].mul_add(wt[i * out + c].to_f32(), sum);
            }
            acc[r * width + c - c0] = sum;
        }
    }
}

/// Rows of X one sweep of the vector kernels takes (on AVX-512 their 4 × 4 broadcast inputs stay
/// in registers).
#[cfg(target_arch = "x86_64")]
const STREAM_ROWS: usize = 4;
/// Inputs (weight rows) one sweep of the vector kernels takes. On AVX2, 4 rows × 4 inputs are
/// more broadcasts than the 16 registers hold next to the weights, so some are reloaded from the
/// stack each step; still, at B = 8 of a 4096² weight 4 inputs measured 4.5–5.0 ms against
/// 5.9–6.1 ms for 2 and 7.1 ms for 8 (Zen 3; 16 columns a step then, 8 now).
#[cfg(target_arch = "x86_64")]
const STREAM_INPUTS: usize = 4;

/// What a sweep of the vector kernels reads: x, wt, inp, out, the first input i, the task's first
/// column c0, its columns in whole registers, the first row r0, the task's width, its sums.
#[cfg(target_arch = "x86_64")]
type StreamArgs<'a, T> = (&'a [f32], &'a [T], usize, usize, usize, usize, usize, usize, usize, &'a mut [f32]);

/// The order of the vector kernels: the inputs [`STREAM_INPUTS`] at a time (one at a time for
/// the last few), and for each step every group of up to [`STREAM_ROWS`] rows of X;
/// `sweep(nr, ni, i, r0)` advances rows r0..r0 + nr by inputs i..i + ni.
#[cfg(target_arch = "x86_64")]
fn stream_order(inp: usize, rows: usize, mut sweep: impl FnMut(usize, usize, usize, usize)) {
    let mut i = 0;
    while i < inp {
        let ni = if inp - i >= STREAM_INPUTS { STREAM_INPUTS } else { 1 };
        for r0 in (0..rows).step_by(STREAM_ROWS) {
            sweep((rows - r0).min(STREAM_ROWS), ni, i, r0);
        }
        i += ni;
    }
}

/// `$stream::<NR, NI>($args)` for a sweep of `$nr` rows and `$ni` inputs: the counts are const
/// parameters, so that each case keeps its broadcast inputs in registers.
#[cfg(target_arch = "x86_64")]
macro_rules! sweep {
    ($stream:ident, $nr:expr, $ni:expr, $args:expr) => {
        match ($nr, $ni == STREAM_INPUTS) {
            (1, true) => $stream::<_, 1, STREAM_INPUTS>($args),
            (2, true) => $stream::<_, 2, STREAM_INPUTS>($args),
            (3, true) => $stream::<_, 3, STREAM_INPUTS>($args),
            (4, true) => $stream::<_, 4, STREAM_INPUTS>($args),
            (1, false) => $stream::<_, 1, 1>($args),
            (2, false) => $stream::<_, 2, 1>($args),
            (3, false) => $stream::<_, 3, 1>($args),
            (4, false) => $stream::<_, 4, 1>($args),
            _ => unreachable!("sweeps take 1 to STREAM_ROWS rows"),
        }
    };
}

/// On AVX-512, any number of rows: the weight is read row by row, 4 weight rows (inputs) at a
/// time, each task's columns of them contiguous; every group of 4 rows of X sweeps those columns
/// while they sit in L1, each loaded weight register feeding 4 rows × 1 input, each sum loaded,
/// advanced by 4 inputs and stored back — in input order, the FMA chains of
/// [`axpy_columns_portable`], bit for bit. The next 4 weight rows are prefetched during the
/// sweep (a task's part of a row is a few KiB, too short for the hardware prefetcher). Measured
/// at 8 rows of a 4096² weight: 2.0 ms, against 2.2 ms with the inputs in blocks of 64 and 2.7–3.4
/// ms for a register-blocked kernel walking down 32-column panels like the AVX2 one of that time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_rows_avx512<T: DenseValue>(x: &[f32], wt: &[T], inp: usize, out: usize, c0: usize, c1: usize, acc: &mut [f32]) {
    let width = c1 - c0;
    let rows = acc.len() / width;
    let full = width / 16 * 16;
    stream_order(inp, rows, |nr, ni, i, r0| {
        // SAFETY: the CPU has AVX-512F (this function's contract).
        unsafe { sweep!(stream, nr, ni, (x, wt, inp, out, i, c0, full, r0, width, &mut *acc)) }
    });
    tail_columns(x, wt, inp, out, c0 + full, c0, c1, acc);

    #[target_feature(enable = "avx512f")]
    unsafe fn stream<T: DenseValue, const NR: usize, const NI: usize>((x, wt, inp, out, i, c0, full, r0, width, acc): StreamArgs<'_, T>) {
        use std::arch::x86_64::*;
        assert!(i + NI <= inp && x.len() >= (r0 + NR) * inp && acc.len() >= (r0 + NR) * width && wt.len() >= (i + NI - 1) * out + c0 + full);
        let mut xv = [[_mm512_setzero_ps(); NI]; NR];
        for (r, xr) in xv.iter_mut().enumerate() {
            for (q, v) in xr.iter_mut().enumerate() {
                *v = _mm512_set1_ps(*x.as_ptr().add((r0 + r) * inp + i + q));
            }
        }
        let w = wt.as_ptr().add(i * out + c0);
        let a = acc.as_mut_ptr().add(r0 * width);
        for cb in (0..full).step_by(16) {
            let mut wv = [_mm512_setzero_ps(); NI];
            for (q, v) in wv.iter_mut().enumerate() {
                *v = T::load16(w.add(q * out + cb));
                // The same columns of the next 4 weight rows (a cache line: 16 f32 or 32 bf16).
                if (cb * size_of::<T>()).is_multiple_of(64) {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((q + NI) * out + cb) as *const i8);
                }
            }
            for (r, xr) in xv.iter().enumerate() {
                let p = a.add(r * width + cb);
                let mut s = _mm512_loadu_ps(p);
                for q in 0..NI {
                    s = _mm512_fmadd_ps(xr[q], wv[q], s);
                }
                _mm512_storeu_ps(p, s);
            }
        }
    }
}

/// On AVX2 (with FMA), any number of rows: the AVX-512 streaming order on 8 lanes. The weight is
/// read row by row, [`STREAM_INPUTS`] weight rows at a time, each task's columns of them
/// contiguous; every group of 4 rows of X sweeps those columns 8 at a time while they sit in L1,
/// each loaded weight register feeding 4 rows, each sum loaded, advanced by the inputs and stored
/// back — in input order, the FMA chains of [`axpy_columns_portable`], bit for bit. The weight
/// rows [`PREFETCH_ROWS`] sweeps ahead are prefetched during the sweep. Measured at 8 rows of a
/// 4096² weight on Zen 3: 3.3–4.3 ms, against 7.3–7.8 ms for the register-blocked kernel walking
/// 16-column panels down the weight that it replaced (which also left one row to the portable
/// loop: 2.9–3.4 ms there, 1.7–2.6 ms now).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_rows_avx2<T: DenseValue>(x: &[f32], wt: &[T], inp: usize, out: usize, c0: usize, c1: usize, acc: &mut [f32]) {
    let width = c1 - c0;
    let rows = acc.len() / width;
    let full = width / 8 * 8;
    stream_order(inp, rows, |nr, ni, i, r0| {
        // SAFETY: the CPU has AVX2 and FMA (this function's contract).
        unsafe { sweep!(stream, nr, ni, (x, wt, inp, out, i, c0, full, r0, width, &mut *acc)) }
    });
    tail_columns(x, wt, inp, out, c0 + full, c0, c1, acc);

    #[target_feature(enable = "avx2,fma")]
    unsafe fn stream<T: DenseValue, const NR: usize, const NI: usize>((x, wt, inp, out, i, c0, full, r0, width, acc): StreamArgs<'_, T>) {
        use std::arch::x86_64::*;
        assert!(i + NI <= inp && x.len() >= (r0 + NR) * inp && acc.len() >= (r0 + NR) * width && wt.len() >= (i + NI - 1) * out + c0 + full);
        let mut xv = [[_mm256_setzero_ps(); NI]; NR];
        for (r, xr) in xv.iter_mut().enumerate() {
            for (q, v) in xr.iter_mut().enumerate() {
                *v = _mm256_set1_ps(*x.as_ptr().add((r0 + r) * inp + i + q));
            }
        }
        let w = wt.as_ptr().add(i * out + c0);
        let a = acc.as_mut_ptr().add(r0 * width);
        for cb in (0..full).step_by(8) {
            let mut wv = [_mm256_setzero_ps(); NI];
            for (q, v) in wv.iter_mut().enumerate() {
                *v = T::load8(w.add(q * out + cb));
                if (cb * size_of::<T>()).is_multiple_of(64) {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((q + PREFETCH_ROWS * NI) * out + cb) as *const i8);
                }
            }
            for (r, xr) in xv.iter().enumerate() {
                let p = a.add(r * width + cb);
                let mut s = _mm256_loadu_ps(p);
                for q in 0..NI {
                    s = _mm256_fmadd_ps(xr[q], wv[q], s);
                }
                _mm256_storeu_ps(p, s);
            }
        }
    }
}

/// What the bf16 tests of the dense products share.
#[cfg(test)]
pub(crate) mod bf16_tests {
    use crate::convert::{Bf16Bits, WeightElem};
    use crate::test_support::random;

    /// `n` random bf16 weight values and the same values widened to f32.
    pub fn bf16_weight(n: usize, seed: u64) -> (Vec<Bf16Bits>, Vec<f32>) {
        let bits: Vec<Bf16Bits> = random(n, seed).into_iter().map(Bf16Bits::from_f32).collect();
        let wide = bits.iter().map(|b| b.to_f32()).collect();
        (bits, wide)
    }

    /// The reference for the widened products: X (`[rows, inp]`) · W, W `[inp, out]` read from
    /// `w` through its strides `[row, column]`, in one `matrixmultiply` GEMM as written.
    pub fn reference_gemm(x: &[f32], inp: usize, w: &[f32], [rs, cs]: [isize; 2], out: usize) -> Vec<f32> {
        let rows = x.len() / inp;
        assert!(x.len() == rows * inp && w.len() == inp * out && rs >= 0 && cs >= 0);
        assert!(inp == 0 || out == 0 || (inp - 1) * (rs as usize) + (out - 1) * (cs as usize) < w.len());
        let mut y = vec![0f32; rows * out];
        // SAFETY: x is [rows, inp] row-major, W's elements lie in w (checked above), y is a fresh
        // [rows, out] row-major buffer.
        unsafe { matrixmultiply::sgemm(rows, inp, out, 1.0, x.as_ptr(), inp as isize, 1, w.as_ptr(), rs, cs, 0.0, y.as_mut_ptr(), out as isize, 1) };
        y
    }
}

#[cfg(test)]
mod tests {
    use super::bf16_tests::{bf16_weight, reference_gemm};
    use super::*;
    use crate::test_support::random;
    use proptest::prelude::*;

    fn close(a: &[f32], b: &[f32]) -> Result<(), String> {
        for (k, (x, y)) in a.iter().zip(b).enumerate() {
            if (x - y).abs() > 1e-4 * x.abs().max(y.abs()).max(1.0) {
                return Err(format!("index {k}: {x} vs {y}"));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(60))]
        #[test]
        fn dense_product_equals_f64_sum(rows in 1usize..20, inp in 1usize..70, out in 1usize..700, seed in any::<u64>()) {
            let x = random(rows * inp, seed);
            let wt = random(inp * out, seed ^ 7);
            let mut y = vec![f32::NAN; rows * out];
            dense_matmul_t(&x, &wt, inp, out, &mut y).unwrap();
            let want: Vec<f32> = (0..rows * out)
                .map(|k| (0..inp).map(|i| x[k / out * inp + i] as f64 * wt[i * out + k % out] as f64).sum::<f64>() as f32)
                .collect();
            prop_assert!(close(&y, &want).is_ok(), "{:?}", close(&y, &want));
            // Every kernel the CPU has computes the same FMA chains as the portable loop.
            let mut portable = vec![0f32; rows * out];
            axpy_columns_portable(&x, &wt, inp, out, 0, out, &mut portable);
            #[cfg(target_arch = "x86_64")]
            for (has, kernel) in [
                (std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"), axpy_rows_avx2 as unsafe fn(&[f32], &[f32], usize, usize, usize, usize, &mut [f32])),
                (std::arch::is_x86_feature_detected!("avx512f"), axpy_rows_avx512),
            ] {
                if has {
                    let mut got = vec![0f32; rows * out];
                    // SAFETY: the CPU has the kernel's features (checked in the table).
                    unsafe { kernel(&x, &wt, inp, out, 0, out, &mut got) };
                    prop_assert!(got == portable, "a vector kernel differs from the portable loop");
                }
            }
            // A row's result does not depend on the rows it is computed with (batched serving
            // relies on it): every row equals the row alone, bit for bit.
            for r in 0..rows {
                let mut alone = vec![f32::NAN; out];
                dense_matmul_t(&x[r * inp..(r + 1) * inp], &wt, inp, out, &mut alone).unwrap();
                prop_assert!(alone == y[r * out..(r + 1) * out], "row {} of {} differs from the row alone", r, rows);
            }
        }
    }


    proptest! {
        #![proptest_config(ProptestConfig::with_cases(60))]
        /// A bf16 weight gives, on every kernel the CPU has, the product of its values widened to
        /// f32, bit for bit.
        #[test]
        fn bf16_product_equals_the_widened_f32_one(rows in 1usize..20, inp in 1usize..70, out in 1usize..700, seed in any::<u64>()) {
            let x = random(rows * inp, seed);
            let (bits, wide) = bf16_weight(inp * out, seed ^ 7);
            let mut want = vec![f32::NAN; rows * out];
            dense_matmul_t(&x, &wide, inp, out, &mut want).unwrap();
            let mut got = vec![f32::NAN; rows * out];
            dense_matmul_t(&x, &bits, inp, out, &mut got).unwrap();
            prop_assert!(got == want, "dispatched kernel");
            let mut portable = vec![0f32; rows * out];
            axpy_columns_portable(&x, &bits, inp, out, 0, out, &mut portable);
            prop_assert!(portable == want, "portable loop");
            #[cfg(target_arch = "x86_64")]
            for (has, kernel) in [
                (std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"), axpy_rows_avx2::<Bf16Bits> as unsafe fn(&[f32], &[Bf16Bits], usize, usize, usize, usize, &mut [f32])),
                (std::arch::is_x86_feature_detected!("avx512f"), axpy_rows_avx512::<Bf16Bits>),
            ] {
                if has {
                    let mut got = vec![0f32; rows * out];
                    // SAFETY: the CPU has the kernel's features (checked in the table).
                    unsafe { kernel(&x, &bits, inp, out, 0, out, &mut got) };
                    prop_assert!(got == want, "a vector kernel on bf16 differs from the f32 product");
                }
            }
        }

        /// The widened GEMM equals one GEMM on the f32 weight, bit for bit, whatever the tiles, and
        /// the f64 sums within rounding.
        #[test]
        fn widened_product_equals_the_f32_gemm(rows in 1usize..40, inp in 1usize..300, out in 1usize..400, seed in any::<u64>()) {
            let x = random(rows * inp, seed);
            let (bits, wide) = bf16_weight(inp * out, seed ^ 5);
            let mut got = vec![f32::NAN; rows * out];
            widened_matmul_t(&x, &bits, inp, out, &mut got).unwrap();
            let want = reference_gemm(&x, inp, &wide, [out as isize, 1], out);
            prop_assert!(got == want, "widened tiles differ from the f32 GEMM");
            let exact: Vec<f32> = (0..rows * out)
                .map(|k| (0..inp).map(|i| x[k / out * inp + i] as f64 * wide[i * out + k % out] as f64).sum::<f64>() as f32)
                .collect();
            prop_assert!(close(&got, &exact).is_ok(), "{:?}", close(&got, &exact));
        }
    }

    #[test]
    fn widened_tiles_cover_a_weight_wider_than_one_tile() {
        // 4 MiB tiles of 300 inputs hold 3,504 columns: 8,000 columns take three tiles.
        let (rows, inp, out) = (17, 300, 8000);
        let x = random(rows * inp, 1);
        let (bits, wide) = bf16_weight(inp * out, 2);
        let mut got = vec![f32::NAN; rows * out];
        widened_matmul_t(&x, &bits, inp, out, &mut got).unwrap();
        let want = reference_gemm(&x, inp, &wide, [out as isize, 1], out);
        assert!(got == want);
        assert!(widened_matmul_t(&x, &bits[1..], inp, out, &mut got).is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(dense_matmul_t(&[0.0; 6], &[0.0; 6], 3, 2, &mut [0.0; 3]).is_err());
        assert!(dense_matmul_t(&[0.0; 6], &[0.0; 5], 3, 2, &mut [0.0; 4]).is_err());
    }
}
