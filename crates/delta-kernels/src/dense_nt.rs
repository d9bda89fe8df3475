//! `Y = X · Wᵀ` for a weight kept as checkpoints store it (`[out, in]`, row-major): every output is
//! the dot product of a row of X and a row of W. It is what a tied LM head needs: the embedding
//! matrix is that weight, so the model reads it in place instead of keeping a transposed copy
//! (113 MB for SmolLM2's 49,152 × 576; 1 GB for a 128,256-token, 2,048-wide vocabulary).
//!
//! Every output is [`fma_dot`]'s sum on every path (portable, and AVX2 tiles with its eight lanes
//! in a register), so a row's result does not depend on the rows it is computed with: batched
//! serving gives each sequence what it would get alone, bit for bit.

use rayon::prelude::*;

use crate::convert::{Bf16Bits, WeightElem};
use crate::dense::{fma_dot, in_column_tasks, product_rows, widened_tiles, DenseValue};
use crate::error::KernelError;

/// `Y = X · Wᵀ` (`x`: `[rows, inp]`, `w`: `[out, inp]`, `y`: `[rows, out]`). Output columns (weight
/// rows) are split across threads and each weight row is read once for all rows of X, several
/// weight rows and rows of X at a time so that independent sums overlap. The weight is f32 or
/// bf16 ([`DenseValue`]: the products of its values widened to f32, bit for bit).
pub fn dense_matmul_nt<T: DenseValue>(x: &[f32], w: &[T], inp: usize, out: usize, y: &mut [f32]) -> Result<(), KernelError> {
    let rows = product_rows("dense product", x, w.len(), [out, inp], inp, out, y)?;
    in_column_tasks(rows, out, y, |c0, c1, acc| dot_columns(x, w, inp, c0, c1, acc));
    Ok(())
}

/// `Y = X · Wᵀ` for prefill-sized X (`[rows, inp]`) on a bf16 weight kept as stored (`w`: `[out,
/// inp]`; a tied LM head): tile by tile of weight rows, the values widened to f32 (exact; all
/// cores), then one GEMM per tile written straight into Y (`[rows, out]`,
/// `dense::widened_tiles`) — the f32 weight's GEMM, bit for bit. Decode-sized X is better served
/// by [`dense_matmul_nt`].
pub fn widened_matmul_nt(x: &[f32], w: &[Bf16Bits], inp: usize, out: usize, y: &mut [f32]) -> Result<(), KernelError> {
    product_rows("widened product", x, w.len(), [out, inp], inp, out, y)?;
    // A tile holds weight rows c0..c0 + n as they are stored ([n, inp]), read as its transpose.
    widened_tiles(x, inp, out, y, |_| [1, inp as isize], |c0, n, tile| {
        tile.par_chunks_mut(64 * inp).zip(w[c0 * inp..(c0 + n) * inp].par_chunks(64 * inp)).for_each(|(t, w)| {
            for (v, &b) in t.iter_mut().zip(w) {
                *v = b.to_f32();
            }
        })
    });
    Ok(())
}

/// `acc[r, c - c0] = x[r] · w[c]` for c in c0..c1.
fn dot_columns<T: DenseValue>(x: &[f32], w: &[T], inp: usize, c0: usize, c1: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { dot_columns_avx2(x, w, inp, c0, c1, acc) };
    }
    dot_columns_portable(x, w, inp, c0, c1, acc)
}

/// The order of the AVX2 tiles: the weight rows c0..c1 in blocks of 8 (18 KiB at 576 inputs, in L1
/// while every row of X passes them: a task's rows are read from memory once), and for each
/// block the rows of X 4 at a time, in tiles of O weight rows (R·O ≤ 8 sums in flight; a last
/// short block one weight row at a time); `tile(nr, no, r0, c, fetch)` computes rows r0..r0 + nr
/// by weight rows c..c + no, and with `fetch` (the first tile of a block, when X has more than
/// one row) prefetches the next block.
#[cfg(target_arch = "x86_64")]
fn tile_order(rows: usize, c0: usize, c1: usize, mut tile: impl FnMut(usize, usize, usize, usize, bool)) {
    for block in (c0..c1).step_by(8) {
        let end = (block + 8).min(c1);
        for r0 in (0..rows).step_by(4) {
            let nr = (rows - r0).min(4);
            let no = if end - block == 8 { [8, 4, 2, 2][nr - 1] } else { 1 };
            for c in (block..end).step_by(no) {
                tile(nr, no, r0, c, rows > 1 && r0 == 0 && c == block);
            }
        }
    }
}

/// `$tile::<R, O>($args)` for a tile of `$nr` rows of X by `$no` weight rows: the counts are
/// const parameters, so that each case keeps its sums in registers.
#[cfg(target_arch = "x86_64")]
macro_rules! tile {
    ($tile:ident, $nr:expr, $no:expr, $args:expr) => {
        match ($nr, $no) {
            (1, 8) => $tile::<_, 1, 8>($args),
            (2, 4) => $tile::<_, 2, 4>($args),
            (3, 2) => $tile::<_, 3, 2>($args),
            (4, 2) => $tile::<_, 4, 2>($args),
            (1, 1) => $tile::<_, 1, 1>($args),
            (2, 1) => $tile::<_, 2, 1>($args),
            (3, 1) => $tile::<_, 3, 1>($args),
            (4, 1) => $tile::<_, 4, 1>($args),
            _ => unreachable!("tiles of tile_order"),
        }
    };
}

/// Where a tile reads and writes: rows r0.. of X, weight rows c.., into the task's sums (`acc`,
/// `[rows, width]`, columns from c0).
#[cfg(target_arch = "x86_64")]
struct Tile<'a, T> {
    x: &'a [f32],
    w: &'a [T],
    inp: usize,
    r0: usize,
    c: usize,
    c0: usize,
    width: usize,
    /// Prefetch the next block of weight rows (at one row of X the hardware prefetchers did
    /// better alone: measured on the tied head of SmolLM2).
    fetch: bool,
    acc: &'a mut [f32],
}

#[cfg(target_arch = "x86_64")]
impl<T: DenseValue> Tile<'_, T> {
    /// The dot product of row r0 + r of X and weight row c + o, from its eight lanes' sums over
    /// the whole blocks of 8 inputs, finished as [`fma_dot`] finishes: the lanes added up by
    /// [`crate::dense::lane_sum`], then the last inputs' FMAs in order.
    #[inline(always)]
    fn finish(&mut self, r: usize, o: usize, lanes: [f32; 8]) {
        let (xr, wr) = (&self.x[(self.r0 + r) * self.inp..][..self.inp], &self.w[(self.c + o) * self.inp..][..self.inp]);
        let full = self.inp / 8 * 8;
        let tail = xr[full..].iter().zip(&wr[full..]);
        self.acc[(self.r0 + r) * self.width + self.c + o - self.c0] = tail.fold(crate::dense::lane_sum(&lanes), |s, (&a, &b)| a.mul_add(b.to_f32(), s));
    }
}

/// `acc[r, c - c0] = x[r] · w[c]`, one [`fma_dot`] at a time (each weight row widened to f32 first).
fn dot_columns_portable<T: DenseValue>(x: &[f32], w: &[T], inp: usize, c0: usize, c1: usize, acc: &mut [f32]) {
    let width = c1 - c0;
    let rows = acc.len() / width;
    let mut row = vec![0f32; inp];
    for c in c0..c1 {
        for (v, &b) in row.iter_mut().zip(&w[c * inp..][..inp]) {
            *v = b.to_f32();
        }
        for r in 0..rows {
            acc[r * width + c - c0] = fma_dot(&x[r * inp..][..inp], &row);
        }
    }
}

/// On AVX2 (with FMA): tiles of [`fma_dot`]s with each sum's eight lanes in one register, the
/// same FMAs in the same order. A weight row's 8 inputs are loaded once for the tile's rows of X,
/// whose 8 inputs stay in registers across the tile's weight rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_columns_avx2<T: DenseValue>(x: &[f32], w: &[T], inp: usize, c0: usize, c1: usize, acc: &mut [f32]) {
    let width = c1 - c0;
    tile_order(acc.len() / width, c0, c1, |nr, no, r0, c, fetch| {
        // SAFETY: the CPU has AVX2 and FMA (this function's contract).
        unsafe { tile!(tile, nr, no, Tile { x, w, inp, r0, c, c0, width, fetch, acc: &mut *acc }) }
    });

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<T: DenseValue, const R: usize, const O: usize>(mut t: Tile<'_, T>) {
        use std::arch::x86_64::*;
        assert!(t.x.len() >= (t.r0 + R) * t.inp && t.w.len() >= (t.c + O) * t.inp);
        let (xp, wp) = (t.x.as_ptr(), t.w.as_ptr());
        let mut sums = [[_mm256_setzero_ps(); O]; R];
        for i in (0..t.inp / 8 * 8).step_by(8) {
            let mut xv = [_mm256_setzero_ps(); R];
            for (r, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(xp.add((t.r0 + r) * t.inp + i));
            }
            if t.fetch {
                // The next block of 8 weight rows (contiguous), as many lines a step as 8 inputs
                // of 8 rows fill (4 of f32, 2 of bf16), so it is in cache when the block is done.
                let per_line = 64 / size_of::<T>();
                let next = wp.wrapping_add((t.c + 8) * t.inp + i * 8);
                for line in 0..64 / per_line {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line * per_line) as *const i8);
                }
            }
            for o in 0..O {
                let wv = T::load8(wp.add((t.c + o) * t.inp + i));
                for r in 0..R {
                    sums[r][o] = _mm256_fmadd_ps(xv[r], wv, sums[r][o]);
                }
            }
        }
        for (r, s) in sums.into_iter().enumerate() {
            for (o, v) in s.into_iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                t.finish(r, o, lanes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::bf16_tests::{bf16_weight, reference_gemm};
    use crate::test_support::random;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(60))]
        #[test]
        fn dot_products_equal_the_f64_sums_and_each_row_is_computed_alone(rows in 1usize..20, inp in 1usize..70, out in 1usize..300, seed in any::<u64>()) {
            let x = random(rows * inp, seed);
            let w = random(inp * out, seed ^ 7);
            let mut y = vec![f32::NAN; rows * out];
            dense_matmul_nt(&x, &w, inp, out, &mut y).unwrap();
            for (k, &got) in y.iter().enumerate() {
                let (r, o) = (k / out, k % out);
                let want = (0..inp).map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64).sum::<f64>() as f32;
                prop_assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "y[{r}, {o}] = {got}, want {want}");
            }
            // A row alone gets the bits it gets in the batch (other tiles, other sums beside it).
            for r in [0, rows / 2, rows - 1] {
                let mut alone = vec![0f32; out];
                dense_matmul_nt(&x[r * inp..(r + 1) * inp], &w, inp, out, &mut alone).unwrap();
                prop_assert!(alone == y[r * out..(r + 1) * out], "row {r} of {rows}");
            }
            // The portable loops give the vector path's bits.
            let mut portable = vec![0f32; rows * out];
            dot_columns_portable(&x, &w, inp, 0, out, &mut portable);
            prop_assert!(portable == y);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(60))]
        /// A bf16 weight gives the products of its values widened to f32, bit for bit, on the
        /// dispatched path and the portable one.
        #[test]
        fn bf16_dot_products_equal_the_widened_f32_ones(rows in 1usize..20, inp in 1usize..70, out in 1usize..300, seed in any::<u64>()) {
            let x = random(rows * inp, seed);
            let (bits, wide) = bf16_weight(inp * out, seed ^ 7);
            let (mut got, mut want) = (vec![f32::NAN; rows * out], vec![f32::NAN; rows * out]);
            dense_matmul_nt(&x, &wide, inp, out, &mut want).unwrap();
            dense_matmul_nt(&x, &bits, inp, out, &mut got).unwrap();
            prop_assert!(got == want);
            let mut portable = vec![0f32; rows * out];
            dot_columns_portable(&x, &bits, inp, 0, out, &mut portable);
            prop_assert!(portable == want);
        }

        /// The widened GEMM equals one GEMM on the f32 weight, bit for bit, and the f64 sums
        /// within rounding.
        #[test]
        fn widened_nt_product_equals_the_f32_gemm(rows in 1usize..40, inp in 1usize..300, out in 1usize..400, seed in any::<u64>()) {
            let x = random(rows * inp, seed);
            let (bits, wide) = bf16_weight(inp * out, seed ^ 5);
            let mut got = vec![f32::NAN; rows * out];
            widened_matmul_nt(&x, &bits, inp, out, &mut got).unwrap();
            // The weight's transpose [inp, out]: w is [out, inp].
            let want = reference_gemm(&x, inp, &wide, [1, inp as isize], out);
            prop_assert!(got == want, "widened tiles differ from the f32 GEMM");
            for (k, &g) in got.iter().enumerate() {
                let (r, o) = (k / out, k % out);
                let exact = (0..inp).map(|i| x[r * inp + i] as f64 * wide[o * inp + i] as f64).sum::<f64>() as f32;
                prop_assert!((g - exact).abs() <= 1e-4 * exact.abs().max(1.0), "y[{r}, {o}] = {g}, want {exact}");
            }
        }
    }

    #[test]
    fn widened_nt_tiles_cover_a_weight_taller_than_one_tile() {
        // 4 MiB tiles of 300 inputs hold 3,504 weight rows: 8,000 take three tiles.
        let (rows, inp, out) = (17, 300, 8000);
        let x = random(rows * inp, 1);
        let (bits, wide) = bf16_weight(inp * out, 2);
        let mut got = vec![f32::NAN; rows * out];
        widened_matmul_nt(&x, &bits, inp, out, &mut got).unwrap();
        let want = reference_gemm(&x, inp, &wide, [1, inp as isize], out);
        assert!(got == want);
        assert!(widened_matmul_nt(&x, &bits[1..], inp, out, &mut got).is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut y = vec![0f32; 6];
        assert!(dense_matmul_nt(&[1.0; 4], &[1.0; 6], 2, 3, &mut y).is_ok());
        assert!(dense_matmul_nt(&[1.0; 5], &[1.0; 6], 2, 3, &mut y).is_err());
        assert!(dense_matmul_nt(&[1.0; 4], &[1.0; 5], 2, 3, &mut y).is_err());
        assert!(dense_matmul_nt(&[1.0; 4], &[1.0; 6], 2, 3, &mut y[..5]).is_err());
        assert_eq!(y, vec![2.0; 6], "x = W = ones: every output is inp");
    }
}
