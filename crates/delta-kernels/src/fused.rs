//! A whole decode-step projection in one pass: `Y = X · W_base` plus, for each row that has one,
//! its delta's term `Δ̂ · X[r, :]`. Each task owns a block of output columns: it computes their
//! base sums for every row ([`crate::dense`]) and then adds their delta terms — columns of the
//! base's `[in, out]` layout are the output rows of Δ̂, whose signs it reads in the same task.
//! A layer then costs one fork-join instead of three (base product, activation tables, delta
//! term), which at decode sizes is most of what the separate calls cost beyond the reading.
//!
//! Bit for bit, every row gets what [`crate::dense::dense_matmul_t`] followed by
//! [`crate::gemm::batched_delta_matmul_add`] give it: the same FMA chains for the base, the
//! same signed sums, added the same way.
//!
//! Prefill-sized products of one delta go through [`merged_matmul_t`] instead: the merged weight
//! one tile at a time, one GEMM.

use std::borrow::Borrow;

use delta_format::CompressedWeight;
use rayon::prelude::*;

use crate::dense::{axpy_columns, dense_matmul_t, gemm_columns, place_columns, product_rows, DenseValue, MAX_ACC_FLOATS};
use crate::error::KernelError;
use crate::gemm::{batched_delta_matmul_add, signed_dot, TILE_MIN_ROWS};
use crate::merge::{with_sign, ScaleFactors};
use crate::per_task;
use crate::subset_sums::{self, SumTables, LANES};

/// `Y = X · W + [Δ̂_{idx[r]} · X[r, :] for the rows r with a delta]`: X is `[rows, inp]`, the base
/// weight `wt` is `[inp, out]` (the models' transposed layout), Y is `[rows, out]`, `idx` has one
/// entry per row (`None`: the base alone). Decode-sized batches (fewer than 8 rows on each delta)
/// go in one parallel pass; larger ones through the base product and the batched delta product.
/// The base weight is f32 or bf16 ([`DenseValue`]).
pub fn dense_delta_matmul_t<'w, T: DenseValue, W: Borrow<CompressedWeight<'w>>>(x: &[f32], wt: &[T], inp: usize, out: usize, deltas: &[W], idx: &[Option<usize>], y: &mut [f32]) -> Result<(), KernelError> {
    let rows = idx.len();
    if x.len() != rows * inp || wt.len() != inp * out || y.len() != rows * out {
        return Err(KernelError::Batch(format!(
            "fused product: {rows} rows need x of {} and y of {} values, W [{inp}, {out}] of {}; got {}, {}, {}",
            rows * inp,
            rows * out,
            inp * out,
            x.len(),
            y.len(),
            wt.len()
        )));
    }
    if let Some(d) = deltas.iter().map(Borrow::borrow).find(|d| (d.rows(), d.cols()) != (out, inp)) {
        return Err(KernelError::Batch(format!("delta `{}` is [{}, {}], the base weight [{out}, {inp}]", d.name, d.rows(), d.cols())));
    }
    if let Some(bad) = idx.iter().flatten().find(|&&d| d >= deltas.len()) {
        return Err(KernelError::Batch(format!("row delta index {bad} but only {} deltas", deltas.len())));
    }
    if rows == 0 || out == 0 {
        return Ok(());
    }
    // Rows by delta, with each delta's scale factors, activations z = c ⊙ x and their tables.
    let tabled = subset_sums::available();
    let mut groups = Vec::new();
    for (d, w) in deltas.iter().map(Borrow::borrow).enumerate() {
        let members: Vec<usize> = (0..rows).filter(|&r| idx[r] == Some(d)).collect();
        if !members.is_empty() {
            groups.push((w, members));
        }
    }
    if groups.iter().any(|(_, members)| members.len() >= TILE_MIN_ROWS) || inp == 0 {
        return separately(x, wt, inp, out, deltas, idx, y);
    }
    let groups = groups
        .into_iter()
        .map(|(w, members)| {
            let f = ScaleFactors::new(&w.name, w.mode, &w.scales, out, inp)?;
            let z: Vec<f32> = members.iter().flat_map(|&r| x[r * inp..(r + 1) * inp].iter().zip(f.cols.iter()).map(|(a, c)| a * c)).collect();
            let tables: Vec<SumTables> = if tabled { z.chunks_exact(inp).map(|zr| SumTables::new(zr, w.signs.words_per_row())).collect() } else { Vec::new() };
            Ok((w, f, members, z, tables))
        })
        .collect::<Result<Vec<_>, KernelError>>()?;
    let width = per_task(out, LANES).next_multiple_of(LANES).min((MAX_ACC_FLOATS / rows).max(LANES));
    let parts: Vec<Vec<f32>> = (0..out.div_ceil(width))
        .into_par_iter()
        .map(|t| {
            let (c0, c1) = (t * width, ((t + 1) * width).min(out));
            let n = c1 - c0;
            let mut acc = vec![0f32; rows * n];
            axpy_columns(x, wt, inp, out, c0, c1, &mut acc);
            let mut sums = vec![0f32; n.next_multiple_of(LANES)];
            for (w, f, members, z, tables) in &groups {
                for (k, &r) in members.iter().enumerate() {
                    if tabled {
                        sums.fill(0.0);
                        subset_sums::add_sums(w.signs.words(), w.signs.words_per_row(), c0, c1, &tables[k], &mut sums);
                    } else {
                        for (i, s) in (c0..c1).zip(sums.iter_mut()) {
                            *s = signed_dot(w.signs.row(i), &z[k * inp..(k + 1) * inp]);
                        }
                    }
                    for ((a, s), scale) in acc[r * n..(r + 1) * n].iter_mut().zip(&sums).zip(&f.rows[c0..c1]) {
                        *a += scale * s;
                    }
                }
            }
            acc
        })
        .collect();
    place_columns(&parts, width, out, y);
    Ok(())
}

/// Bytes of one merged tile of [`merged_matmul_t`] (a whole SmolLM2 projection fits in one).
const MERGED_TILE_BYTES: usize = 4 << 20;

/// `Y = X · (W_base + Δ̂)ᵀ` for prefill-sized X (`[rows, inp]`; the base weight `wt` as `[inp,
/// out]`, Y `[rows, out]`): tile by tile of output columns, the merged weight is built in f32,
/// unrounded (all cores, 16 rows per task), then multiplied with one GEMM written straight
/// into Y — one GEMM for base and delta together where the separate products take two. The GEMM
/// is `matrixmultiply`'s own multi-threaded one, called once per tile rather than from inside
/// parallel tasks (nested, its threads and rayon's contend). Decode-sized X is better served by
/// [`dense_delta_matmul_t`], which reads each weight once per step without unpacking. The base
/// weight is f32 or bf16 ([`DenseValue`]).
pub fn merged_matmul_t<T: DenseValue>(x: &[f32], wt: &[T], inp: usize, out: usize, w: &CompressedWeight<'_>, y: &mut [f32]) -> Result<(), KernelError> {
    let rows = product_rows("merged product", x, wt.len(), [inp, out], inp, out, y)?;
    if (w.rows(), w.cols()) != (out, inp) {
        return Err(KernelError::Batch(format!("merged product: delta `{}` is [{}, {}], the weight [{out}, {inp}]", w.name, w.rows(), w.cols())));
    }
    y.fill(0.0);
    if rows == 0 || out == 0 || inp == 0 {
        return Ok(());
    }
    let tile = (MERGED_TILE_BYTES / (4 * inp)).next_multiple_of(LANES);
    merged_tiles(x, wt, w, y, tile)
}

/// [`merged_matmul_t`] with `tile` output columns per tile (a multiple of [`LANES`]).
fn merged_tiles<T: DenseValue>(x: &[f32], wt: &[T], w: &CompressedWeight<'_>, y: &mut [f32], tile: usize) -> Result<(), KernelError> {
    row_tiles(x, w, y, tile, |f, i0, d| merge_rows(w, f, wt, i0, d))
}

/// The loop of [`merged_matmul_t`] and [`delta_matmul_t`]: for every tile of `tile` output
/// columns (a multiple of [`LANES`]), `rows(f, i0, d)` writes rows `i0..` of the tile's matrix
/// (`[_, inp]`, at most [`LANES`] rows a call, all cores; `f` the factors of `w`'s scales), and
/// one GEMM writes X times the tile's transpose into those columns of Y.
fn row_tiles(x: &[f32], w: &CompressedWeight<'_>, y: &mut [f32], tile: usize, rows: impl Fn(&ScaleFactors<'_>, usize, &mut [f32]) + Sync) -> Result<(), KernelError> {
    let (out, inp) = (w.rows(), w.cols());
    let f = ScaleFactors::new(&w.name, w.mode, &w.scales, out, inp)?;
    let tile = tile.min(out);
    let mut d = vec![0f32; tile * inp];
    for i0 in (0..out).step_by(tile) {
        let n = tile.min(out - i0);
        d[..n * inp].par_chunks_mut(LANES * inp).enumerate().for_each(|(c, rows_of_d)| rows(&f, i0 + c * LANES, rows_of_d));
        // The tile's transpose [inp, n]: d is [n, inp] row-major.
        gemm_columns(x, inp, &d[..n * inp], [1, inp as isize], n, y, out, i0);
    }
    Ok(())
}

/// `Y = X · Δ̂ᵀ` for prefill-sized X (`[rows, inp]`, Y `[rows, out]`): the delta term alone, as
/// [`merged_matmul_t`] computes the merged product — tile by tile of output columns, Δ̂ built in
/// f32 from the signs (exact: each value `±(r[i]·c[j])`, as [`ScaleFactors::delta_hat`]; all
/// cores), then one GEMM per tile written straight into Y. So the product is the dense Δ̂'s GEMM
/// without the dense Δ̂: what end-to-end calibration needs for its multipliers' gradients
/// (`delta_models::ScaledDelta`), where the packed signs take 1/32 of the memory. Decode-sized X
/// is better served by [`crate::gemm::delta_matmul_add`].
pub fn delta_matmul_t(x: &[f32], w: &CompressedWeight<'_>, y: &mut [f32]) -> Result<(), KernelError> {
    let (out, inp) = (w.rows(), w.cols());
    let rows = product_rows("delta product", x, inp * out, [inp, out], inp, out, y)?;
    y.fill(0.0);
    if rows == 0 || out == 0 || inp == 0 {
        return Ok(());
    }
    delta_tiles(x, w, y, (MERGED_TILE_BYTES / (4 * inp)).next_multiple_of(LANES))
}

/// [`delta_matmul_t`] with `tile` output columns per tile (a multiple of [`LANES`]).
fn delta_tiles(x: &[f32], w: &CompressedWeight<'_>, y: &mut [f32], tile: usize) -> Result<(), KernelError> {
    row_tiles(x, w, y, tile, |f, i0, d| delta_rows(w, f, i0, [0, w.cols()], d))
}

/// `Y = X · Δ̂` for prefill-sized X (`[rows, out]`, Y `[rows, inp]`): the product with Δ̂ as
/// stored, which is what a product with Δ̂ᵀ passes back to its input in a backward pass
/// (end-to-end calibration's column multipliers, `delta_models::host`). Tile by tile of Δ̂'s
/// columns, Δ̂ is built in f32 from the signs (all cores), then one GEMM per tile writes those
/// columns of Y: the dense Δ̂'s GEMM, bit for bit, without the dense Δ̂.
pub fn delta_matmul(x: &[f32], w: &CompressedWeight<'_>, y: &mut [f32]) -> Result<(), KernelError> {
    let (out, inp) = (w.rows(), w.cols());
    let rows = product_rows("delta product (Δ̂ as stored)", x, out * inp, [out, inp], out, inp, y)?;
    y.fill(0.0);
    if rows == 0 || out == 0 || inp == 0 {
        return Ok(());
    }
    delta_column_tiles(x, w, y, (MERGED_TILE_BYTES / (4 * out)).next_multiple_of(32))
}

/// [`delta_matmul`] with `tile` columns of Δ̂ per tile (a multiple of 32, the inputs of a sign word).
fn delta_column_tiles(x: &[f32], w: &CompressedWeight<'_>, y: &mut [f32], tile: usize) -> Result<(), KernelError> {
    let (out, inp) = (w.rows(), w.cols());
    let f = ScaleFactors::new(&w.name, w.mode, &w.scales, out, inp)?;
    let tile = tile.min(inp);
    let mut d = vec![0f32; out * tile];
    for j0 in (0..inp).step_by(tile) {
        let n = tile.min(inp - j0);
        d[..out * n].par_chunks_mut(LANES * n).enumerate().for_each(|(c, rows_of_d)| delta_rows(w, &f, c * LANES, [j0, n], rows_of_d));
        // The tile is Δ̂[:, j0..j0 + n], [out, n] row-major.
        gemm_columns(x, out, &d[..out * n], [n as isize, 1], n, y, inp, j0);
    }
    Ok(())
}

/// Rows `i0..` of Δ̂, columns `j0..j0 + n` (`j0` a multiple of 32), written out (as many rows as
/// `d`, `[_, n]`, holds; `f` the factors of `w`'s scales): each value `±(r[i]·c[j])`,
/// [`ScaleFactors::delta_hat`] bit for bit, the sign applied by flipping the sign bit (no
/// branch, so the loop vectorises).
fn delta_rows(w: &CompressedWeight<'_>, f: &ScaleFactors<'_>, i0: usize, [j0, n]: [usize; 2], d: &mut [f32]) {
    for (k, dr) in d.chunks_exact_mut(n.max(1)).enumerate() {
        let (r, words) = (f.rows[i0 + k], &w.signs.row(i0 + k)[j0 / 32..]);
        for ((d32, c32), &word) in dr.chunks_mut(32).zip(f.cols[j0..j0 + n].chunks(32)).zip(words) {
            for (b, (dv, &c)) in d32.iter_mut().zip(c32).enumerate() {
                *dv = with_sign(r * c, word, b);
            }
        }
    }
}

/// Rows `i0..` of the merged weight `W_base + Δ̂` (as many as `d`, `[_, inp]`, holds — at most
/// 16): each value `W_base[i, j] + S[i, j]·(r[i]·c[j])`, the sign applied by flipping the sign
/// bit. On AVX-512 a full 16 rows take 16 × 16 blocks: 16 base rows (16 contiguous values each)
/// transposed in registers, the 16 signs of a block as a lane mask; on AVX2, 8 × 8 blocks.
fn merge_rows<T: DenseValue>(w: &CompressedWeight<'_>, f: &ScaleFactors<'_>, wt: &[T], i0: usize, d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if d.len() == LANES * w.cols() && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked); d holds 16 rows, so rows i0..i0 + 16 exist.
        return unsafe { merge_rows_avx512(w, f, wt, i0, d) };
    }
    #[cfg(target_arch = "x86_64")]
    if d.len() == LANES * w.cols() && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked); d holds 16 rows, so rows i0..i0 + 16 exist.
        return unsafe { merge_rows_avx2(w, f, wt, i0, d) };
    }
    merge_rows_portable(w, f, wt, i0, d)
}

/// [`merge_rows`] one value at a time: the base's values transposed in (each base row gives 16
/// contiguous values; the rows of `d` being written stay in L1), then each row's Δ̂ added.
fn merge_rows_portable<T: DenseValue>(w: &CompressedWeight<'_>, f: &ScaleFactors<'_>, wt: &[T], i0: usize, d: &mut [f32]) {
    let (out, inp) = (w.rows(), w.cols());
    let n = d.len() / inp;
    for j in 0..inp {
        for (k, &v) in wt[j * out + i0..j * out + i0 + n].iter().enumerate() {
            d[k * inp + j] = v.to_f32();
        }
    }
    for (k, dr) in d.chunks_exact_mut(inp).enumerate() {
        let (r, words) = (f.rows[i0 + k], w.signs.row(i0 + k));
        for ((d32, c32), &word) in dr.chunks_mut(32).zip(f.cols.chunks(32)).zip(words) {
            for (b, (dv, &c)) in d32.iter_mut().zip(c32).enumerate() {
                *dv += with_sign(r * c, word, b);
            }
        }
    }
}

/// Columns `from..` of [`merge_rows`]' rows (their sign words `words`), one value at a time:
/// what the vector paths leave after their whole blocks.
fn merge_columns_from<T: DenseValue>(words: &[&[u32]], f: &ScaleFactors<'_>, wt: &[T], out: usize, i0: usize, from: usize, d: &mut [f32]) {
    let inp = f.cols.len();
    for (k, row) in words.iter().enumerate() {
        let r = f.rows[i0 + k];
        for j in from..inp {
            d[k * inp + j] = wt[j * out + i0 + k].to_f32() + with_sign(r * f.cols[j], row[j / 32], j % 32);
        }
    }
}

/// [`merge_rows`] for exactly 16 rows on AVX-512: the same arithmetic (one multiply, one sign
/// flip, one add per value), bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn merge_rows_avx512<T: DenseValue>(w: &CompressedWeight<'_>, f: &ScaleFactors<'_>, wt: &[T], i0: usize, d: &mut [f32]) {
    use std::arch::x86_64::*;
    let (out, inp) = (w.rows(), w.cols());
    assert!(d.len() == LANES * inp && i0 + LANES <= out && wt.len() == inp * out && f.cols.len() == inp && f.rows.len() == out);
    let full = inp / LANES * LANES;
    let sign = _mm512_set1_epi32(i32::MIN);
    let words: Vec<&[u32]> = (0..LANES).map(|k| w.signs.row(i0 + k)).collect();
    for j0 in (0..full).step_by(LANES) {
        let mut m = [_mm512_setzero_si512(); LANES];
        for (jj, v) in m.iter_mut().enumerate() {
            *v = _mm512_castps_si512(T::load16(wt.as_ptr().add((j0 + jj) * out + i0)));
        }
        // base[k] lane jj = W_base[i0 + k, j0 + jj].
        let base = subset_sums::transpose(m);
        let c = _mm512_loadu_ps(f.cols.as_ptr().add(j0));
        for (k, b) in base.iter().enumerate() {
            // Bit jj set: Δ ≥ 0, keep the sign; clear: flip it (as `with_sign`).
            let bits = (words[k][j0 / 32] >> (j0 % 32)) as __mmask16;
            let v = _mm512_castps_si512(_mm512_mul_ps(_mm512_set1_ps(f.rows[i0 + k]), c));
            let v = _mm512_castsi512_ps(_mm512_mask_xor_epi32(v, !bits, v, sign));
            _mm512_storeu_ps(d.as_mut_ptr().add(k * inp + j0), _mm512_add_ps(_mm512_castsi512_ps(*b), v));
        }
    }
    merge_columns_from(&words, f, wt, out, i0, full, d);
}

/// [`merge_rows`] for exactly 16 rows on AVX2: each half of 8 rows in 8 × 8 blocks, the base
/// values transposed in registers, a block's 8 signs of a row spread to lanes; the same
/// arithmetic, bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn merge_rows_avx2<T: DenseValue>(w: &CompressedWeight<'_>, f: &ScaleFactors<'_>, wt: &[T], i0: usize, d: &mut [f32]) {
    use std::arch::x86_64::*;
    let (out, inp) = (w.rows(), w.cols());
    assert!(d.len() == LANES * inp && i0 + LANES <= out && wt.len() == inp * out && f.cols.len() == inp && f.rows.len() == out);
    let full = inp / 8 * 8;
    let sign = _mm256_set1_epi32(i32::MIN);
    let lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let words: Vec<&[u32]> = (0..LANES).map(|k| w.signs.row(i0 + k)).collect();
    for j0 in (0..full).step_by(8) {
        let c = _mm256_loadu_ps(f.cols.as_ptr().add(j0));
        for h in (0..LANES).step_by(8) {
            let mut m = [_mm256_setzero_si256(); 8];
            for (jj, v) in m.iter_mut().enumerate() {
                *v = _mm256_castps_si256(T::load8(wt.as_ptr().add((j0 + jj) * out + i0 + h)));
            }
            // base[k] lane jj = W_base[i0 + h + k, j0 + jj].
            let base = subset_sums::transpose8(m);
            for (k, b) in base.iter().enumerate() {
                let row = h + k;
                // Lanes whose bit is clear (Δ < 0) get the sign flipped (as `with_sign`).
                let bits = _mm256_set1_epi32((words[row][j0 / 32] >> (j0 % 32)) as i32);
                let clear = _mm256_cmpeq_epi32(_mm256_and_si256(bits, lane_bit), _mm256_setzero_si256());
                let v = _mm256_castps_si256(_mm256_mul_ps(_mm256_set1_ps(f.rows[i0 + row]), c));
                let v = _mm256_castsi256_ps(_mm256_xor_si256(v, _mm256_and_si256(clear, sign)));
                _mm256_storeu_ps(d.as_mut_ptr().add(row * inp + j0), _mm256_add_ps(_mm256_castsi256_ps(*b), v));
            }
        }
    }
    merge_columns_from(&words, f, wt, out, i0, full, d);
}

/// Prefill-sized groups: the base product, then the delta terms of the rows that have one.
fn separately<'w, T: DenseValue, W: Borrow<CompressedWeight<'w>>>(x: &[f32], wt: &[T], inp: usize, out: usize, deltas: &[W], idx: &[Option<usize>], y: &mut [f32]) -> Result<(), KernelError> {
    dense_matmul_t(x, wt, inp, out, y)?;
    let with: Vec<usize> = (0..idx.len()).filter(|&r| idx[r].is_some()).collect();
    let xs: Vec<f32> = with.iter().flat_map(|&r| x[r * inp..(r + 1) * inp].iter().copied()).collect();
    let mut ys: Vec<f32> = with.iter().flat_map(|&r| y[r * out..(r + 1) * out].iter().copied()).collect();
    let which: Vec<usize> = with.iter().map(|&r| idx[r].expect("rows with a delta")).collect();
    batched_delta_matmul_add(deltas, &which, &xs, &mut ys)?;
    for (k, &r) in with.iter().enumerate() {
        y[r * out..(r + 1) * out].copy_from_slice(&ys[k * out..(k + 1) * out]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{random, weight};
    use delta_format::ScaleMode;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(80))]
        /// Against the separate calls, bit for bit (and so against their oracles), with rows on
        /// the base alone, several deltas, and groups large enough to take the separate path.
        #[test]
        fn one_pass_equals_the_separate_products_bit_for_bit(
            rows in 1usize..20, out in 1usize..300, inp in 1usize..150, n in 0usize..4, seed in any::<u64>(),
            mode in prop::sample::select(ScaleMode::ALL.to_vec()),
        ) {
            let deltas: Vec<_> = (0..n).map(|d| weight(out, inp, mode, seed.wrapping_add(d as u64 * 1000))).collect();
            let idx: Vec<Option<usize>> = random(rows, seed ^ 3).iter().map(|v| {
                let k = (v.abs() * 1000.0) as usize % (n + 1);
                (k < n).then_some(k)
            }).collect();
            let x = random(rows * inp, seed ^ 11);
            let wt = random(inp * out, seed ^ 13);
            let mut fused = vec![f32::NAN; rows * out];
            dense_delta_matmul_t(&x, &wt, inp, out, &deltas, &idx, &mut fused).unwrap();
            let mut want = vec![f32::NAN; rows * out];
            separately(&x, &wt, inp, out, &deltas, &idx, &mut want).unwrap();
            prop_assert!(fused == want, "rows {rows}, idx {idx:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(60))]
        /// Against the merged weight built element by element, products summed in f64.
        #[test]
        fn merged_product_equals_f64_oracle(
            rows in 1usize..40, out in 1usize..200, inp in 1usize..150, tiles in 1usize..6, seed in any::<u64>(),
            mode in prop::sample::select(ScaleMode::ALL.to_vec()),
        ) {
            let w = weight(out, inp, mode, seed);
            let x = random(rows * inp, seed ^ 11);
            let wt = random(inp * out, seed ^ 13);
            let mut y = vec![f32::NAN; rows * out];
            merged_matmul_t(&x, &wt, inp, out, &w, &mut y).unwrap();
            // Several tiles give the same values as one.
            let mut tiled = vec![f32::NAN; rows * out];
            merged_tiles(&x, &wt, &w, &mut tiled, out.div_ceil(tiles).next_multiple_of(LANES)).unwrap();
            prop_assert!(tiled == y, "{tiles} tiles");
            let f = ScaleFactors::new(&w.name, w.mode, &w.scales, out, inp).unwrap();
            for r in 0..rows {
                for i in 0..out {
                    let want: f64 = (0..inp).map(|j| (wt[j * out + i] as f64 + f.delta_hat(&w.signs, i, j) as f64) * x[r * inp + j] as f64).sum();
                    let got = y[r * out + i] as f64;
                    prop_assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "row {r}, output {i}: {got} vs {want}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(60))]
        /// The delta term alone is the dense Δ̂'s GEMM, bit for bit: Δ̂ᵀ written out element by
        /// element (`delta_hat`) and multiplied by the same `matrixmultiply` GEMM; in one tile or
        /// several; and so is the product with Δ̂ as stored.
        #[test]
        fn delta_product_equals_the_dense_delta_gemm(
            rows in 1usize..40, out in 1usize..200, inp in 1usize..150, tiles in 1usize..6, seed in any::<u64>(),
            mode in prop::sample::select(ScaleMode::ALL.to_vec()),
        ) {
            let w = weight(out, inp, mode, seed);
            let x = random(rows * inp, seed ^ 11);
            let f = ScaleFactors::new(&w.name, w.mode, &w.scales, out, inp).unwrap();
            let dt: Vec<f32> = (0..inp * out).map(|k| f.delta_hat(&w.signs, k % out, k / out)).collect();
            let want = crate::dense::bf16_tests::reference_gemm(&x, inp, &dt, [out as isize, 1], out);
            let mut y = vec![f32::NAN; rows * out];
            delta_matmul_t(&x, &w, &mut y).unwrap();
            prop_assert!(y == want);
            let mut tiled = vec![f32::NAN; rows * out];
            delta_tiles(&x, &w, &mut tiled, out.div_ceil(tiles).next_multiple_of(LANES)).unwrap();
            prop_assert!(tiled == want, "{tiles} tiles");
            prop_assert!(delta_matmul_t(&x[1..], &w, &mut y).is_err());

            // And with Δ̂ as stored: G · Δ̂, tiles of Δ̂'s columns.
            let g = random(rows * out, seed ^ 17);
            let d: Vec<f32> = (0..out * inp).map(|k| f.delta_hat(&w.signs, k / inp, k % inp)).collect();
            let want = crate::dense::bf16_tests::reference_gemm(&g, out, &d, [inp as isize, 1], inp);
            let mut h = vec![f32::NAN; rows * inp];
            delta_matmul(&g, &w, &mut h).unwrap();
            prop_assert!(h == want, "Δ̂ as stored");
            let mut tiled = vec![f32::NAN; rows * inp];
            delta_column_tiles(&g, &w, &mut tiled, inp.div_ceil(tiles).next_multiple_of(32)).unwrap();
            prop_assert!(tiled == want, "Δ̂ as stored, {tiles} tiles");
            prop_assert!(delta_matmul(&g[1..], &w, &mut h).is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(60))]
        /// Every path of the tile build gives the portable values, bit for bit.
        #[test]
        fn merged_rows_equal_the_portable_ones(out in 16usize..60, inp in 1usize..150, seed in any::<u64>(), mode in prop::sample::select(ScaleMode::ALL.to_vec())) {
            let w = weight(out, inp, mode, seed);
            let wt = random(inp * out, seed ^ 13);
            let f = ScaleFactors::new(&w.name, w.mode, &w.scales, out, inp).unwrap();
            let i0 = (seed as usize) % (out - LANES + 1);
            let (mut got, mut want) = (vec![f32::NAN; LANES * inp], vec![f32::NAN; LANES * inp]);
            merge_rows(&w, &f, &wt, i0, &mut got);
            merge_rows_portable(&w, &f, &wt, i0, &mut want);
            prop_assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "rows {i0}.., inp {inp}");
            // The AVX2 blocks too, where merge_rows took the AVX-512 ones.
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                let mut avx2 = vec![f32::NAN; LANES * inp];
                // SAFETY: the CPU has AVX2 (checked); the buffers hold 16 rows from i0.
                unsafe { merge_rows_avx2(&w, &f, &wt, i0, &mut avx2) };
                prop_assert!(avx2.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "AVX2: rows {i0}.., inp {inp}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        /// A bf16 base weight gives what its values widened to f32 give, bit for bit: the one-pass
        /// product (and its separate path), the merged product and every tile build.
        #[test]
        fn bf16_base_equals_the_widened_f32_one(
            rows in 1usize..40, out in 16usize..200, inp in 1usize..150, n in 1usize..3, seed in any::<u64>(),
            mode in prop::sample::select(ScaleMode::ALL.to_vec()),
        ) {
            let deltas: Vec<_> = (0..n).map(|d| weight(out, inp, mode, seed.wrapping_add(d as u64 * 1000))).collect();
            let idx: Vec<Option<usize>> = (0..rows).map(|r| (r % (n + 1) < n).then_some(r % (n + 1))).collect();
            let x = random(rows * inp, seed ^ 11);
            let (bits, wide) = crate::dense::bf16_tests::bf16_weight(inp * out, seed ^ 13);
            let (mut got, mut want) = (vec![f32::NAN; rows * out], vec![f32::NAN; rows * out]);
            dense_delta_matmul_t(&x, &bits, inp, out, &deltas, &idx, &mut got).unwrap();
            dense_delta_matmul_t(&x, &wide, inp, out, &deltas, &idx, &mut want).unwrap();
            prop_assert!(got == want, "fused product, rows {rows}");
            merged_matmul_t(&x, &bits, inp, out, &deltas[0], &mut got).unwrap();
            merged_matmul_t(&x, &wide, inp, out, &deltas[0], &mut want).unwrap();
            prop_assert!(got == want, "merged product");
            let f = ScaleFactors::new(&deltas[0].name, mode, &deltas[0].scales, out, inp).unwrap();
            let i0 = (seed as usize) % (out - LANES + 1);
            let (mut got, mut want) = (vec![f32::NAN; LANES * inp], vec![f32::NAN; LANES * inp]);
            merge_rows_portable(&deltas[0], &f, &wide, i0, &mut want);
            merge_rows_portable(&deltas[0], &f, &bits, i0, &mut got);
            prop_assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "portable tile");
            merge_rows(&deltas[0], &f, &bits, i0, &mut got);
            prop_assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "dispatched tile");
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked); the buffers hold 16 rows from i0.
                unsafe { merge_rows_avx2(&deltas[0], &f, &bits, i0, &mut got) };
                prop_assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "AVX2 tile");
            }
        }
    }

    #[test]
    fn bad_shapes_and_indices_are_errors() {
        let w = weight(3, 33, ScaleMode::Scalar, 1);
        let wt = vec![0f32; 33 * 3];
        assert!(dense_delta_matmul_t(&[0.0; 33], &wt, 33, 3, &[&w], &[Some(1)], &mut [0.0; 3]).is_err());
        assert!(dense_delta_matmul_t(&[0.0; 33], &wt, 33, 3, &[&w], &[Some(0)], &mut [0.0; 4]).is_err());
        assert!(dense_delta_matmul_t(&[0.0; 32], &wt, 32, 3, &[&w], &[Some(0)], &mut [0.0; 3]).is_err());
        assert!(dense_delta_matmul_t(&[0.0; 33], &wt, 33, 3, &[&w], &[Some(0)], &mut [0.0; 3]).is_ok());
        assert!(merged_matmul_t(&[0.0; 66], &wt, 33, 3, &w, &mut [0.0; 6]).is_ok());
        assert!(merged_matmul_t(&[0.0; 66], &wt, 33, 3, &w, &mut [0.0; 5]).is_err());
        assert!(merged_matmul_t(&[0.0; 64], &wt[..96], 32, 3, &w, &mut [0.0; 6]).is_err());
    }
}
