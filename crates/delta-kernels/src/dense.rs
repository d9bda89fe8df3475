//! The base product of a decode step, `Y = X · W` with the weight kept as the models keep it
//! (`[in, out]`, row-major): read in place, once for all rows of X, output columns split across
//! threads. Every output is one chain of FMAs in input order on every path (portable, AVX2,
//! AVX-512), so a row's result does not depend on the rows it is computed with — batched serving
//! gives each sequence what it would get alone, bit for bit.

use rayon::prelude::*;

use crate::error::KernelError;
use crate::per_task;

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
pub(crate) fn product_rows(what: &str, x: &[f32], w: &[f32], w_dims: [usize; 2], inp: usize, out: usize, y: &[f32]) -> Result<usize, KernelError> {
    let rows = if inp == 0 { 0 } else { x.len() / inp };
    if x.len() != rows * inp || w.len() != inp * out || y.len() != rows * out {
        return Err(KernelError::Batch(format!("{what}: x has {} values, W {w_dims:?} has {}, y has {} (rows {rows})", x.len(), w.len(), y.len())));
    }
    Ok(rows)
}

/// `Y = X · W` for a weight given as `wt` (`[in, out]`, row-major — the transposed layout the
/// models keep): the decode-shaped product. Each weight is read once for all `rows` of X, output
/// columns are split across threads, and nothing is packed or copied (a general GEMM packs the
/// whole weight on every call, which at one row costs more than the product).
pub fn dense_matmul_t(x: &[f32], wt: &[f32], inp: usize, out: usize, y: &mut [f32]) -> Result<(), KernelError> {
    let rows = product_rows("dense product", x, wt, [inp, out], inp, out, y)?;
    in_column_tasks(rows, out, y, |c0, c1, acc| axpy_columns(x, wt, inp, out, c0, c1, acc));
    Ok(())
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
pub(crate) fn axpy_columns(x: &[f32], wt: &[f32], inp: usize, out: usize, c0: usize, c1: usize, acc: &mut [f32]) {
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
fn axpy_columns_portable(x: &[f32], wt: &[f32], inp: usize, out: usize, c0: usize, c1: usize, acc: &mut [f32]) {
    let width = c1 - c0;
    for i in 0..inp {
        let w = &wt[i * out + c0..i * out + c1];
        for (r, acc_r) in acc.chunks_exact_mut(width).enumerate() {
            let a = x[r * inp + i];
            for (s, &v) in acc_r.iter_mut().zip(w) {
                *s = a.mul_add(v, *s);
            }
        }
    }
}

/// Columns `from..c1` (fewer than a register block) one sum at a time: the same chain of FMAs in
/// input order as every other path.
fn tail_columns(x: &[f32], wt: &[f32], inp: usize, out: usize, from: usize, c0: usize, c1: usize, acc: &mut [f32]) {
    let width = c1 - c0;
    for r in 0..acc.len() / width {
        for c in from..c1 {
            let mut sum = 0f32;
            for i in 0..inp {
                sum = x[r * inp + i].mul_add(wt[i * out + c], sum);
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
type StreamArgs<'a> = (&'a [f32], &'a [f32], usize, usize, usize, usize, usize, usize, usize, &'a mut [f32]);

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
            (1, true) => $stream::<1, STREAM_INPUTS>($args),
            (2, true) => $stream::<2, STREAM_INPUTS>($args),
            (3, true) => $stream::<3, STREAM_INPUTS>($args),
            (4, true) => $stream::<4, STREAM_INPUTS>($args),
            (1, false) => $stream::<1, 1>($args),
            (2, false) => $stream::<2, 1>($args),
            (3, false) => $stream::<3, 1>($args),
            (4, false) => $stream::<4, 1>($args),
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
unsafe fn axpy_rows_avx512(x: &[f32], wt: &[f32], inp: usize, out: usize, c0: usize, c1: usize, acc: &mut [f32]) {
    let width = c1 - c0;
    let rows = acc.len() / width;
    let full = width / 16 * 16;
    stream_order(inp, rows, |nr, ni, i, r0| {
        // SAFETY: the CPU has AVX-512F (this function's contract).
        unsafe { sweep!(stream, nr, ni, (x, wt, inp, out, i, c0, full, r0, width, &mut *acc)) }
    });
    tail_columns(x, wt, inp, out, c0 + full, c0, c1, acc);

    #[target_feature(enable = "avx512f")]
    unsafe fn stream<const NR: usize, const NI: usize>((x, wt, inp, out, i, c0, full, r0, width, acc): StreamArgs<'_>) {
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
                *v = _mm512_loadu_ps(w.add(q * out + cb));
                // The same columns of the next 4 weight rows.
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((q + NI) * out + cb) as *const i8);
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
unsafe fn axpy_rows_avx2(x: &[f32], wt: &[f32], inp: usize, out: usize, c0: usize, c1: usize, acc: &mut [f32]) {
    let width = c1 - c0;
    let rows = acc.len() / width;
    let full = width / 8 * 8;
    stream_order(inp, rows, |nr, ni, i, r0| {
        // SAFETY: the CPU has AVX2 and FMA (this function's contract).
        unsafe { sweep!(stream, nr, ni, (x, wt, inp, out, i, c0, full, r0, width, &mut *acc)) }
    });
    tail_columns(x, wt, inp, out, c0 + full, c0, c1, acc);

    #[target_feature(enable = "avx2,fma")]
    unsafe fn stream<const NR: usize, const NI: usize>((x, wt, inp, out, i, c0, full, r0, width, acc): StreamArgs<'_>) {
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
                *v = _mm256_loadu_ps(w.add(q * out + cb));
                if cb % 16 == 0 {
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

#[cfg(test)]
mod tests {
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


    #[test]
    fn bad_shapes_are_errors() {
        assert!(dense_matmul_t(&[0.0; 6], &[0.0; 6], 3, 2, &mut [0.0; 3]).is_err());
        assert!(dense_matmul_t(&[0.0; 6], &[0.0; 5], 3, 2, &mut [0.0; 4]).is_err());
    }
}
