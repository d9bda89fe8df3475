//! The delta term without a dense Δ: `Y[r, :] += Δ̂ · X[r, :]`, for one delta or for a batch whose
//! rows each pick one of several resident deltas (the multi-tenant decode case).
//!
//! With Δ̂[i, j] = r[i]·c[j]·S[i, j] (see [`ScaleFactors`]), `(Δ̂ x)[i] = r[i] · Σ_j S[i, j]·z[j]`
//! where `z = c ⊙ x`. Signs stay packed, 1 bit each. For decode-sized batches the inner sums come
//! from table lookups on CPUs with AVX2 or AVX-512 ([`subset_sums`]); elsewhere each sign is
//! applied by flipping the IEEE sign bit of z[j] (exact), a branch-free dot product that
//! vectorises.
//! [`delta_matmul_add_reference`] builds Δ̂ element by element and sums in f64: the oracle.

use std::borrow::Borrow;

use delta_format::CompressedWeight;
use rayon::prelude::*;

use crate::error::KernelError;
use crate::{per_task, TASKS_PER_THREAD};
use crate::merge::{with_sign, ScaleFactors};
use crate::subset_sums::{self, SumTables};

fn check(w: &CompressedWeight<'_>, x: &[f32], y: &[f32]) -> Result<usize, KernelError> {
    let (out, inp) = (w.rows(), w.cols());
    let rows = if inp == 0 { 0 } else { x.len() / inp };
    if x.len() != rows * inp || y.len() != rows * out {
        return Err(KernelError::ShapeMismatch {
            name: w.name.to_string(),
            base: format!("x [{rows}, {inp}] / y [{rows}, {out}]"),
            other: format!("x has {} values, y has {}", x.len(), y.len()),
        });
    }
    Ok(rows)
}

/// `Y += X · Δ̂ᵀ`: X is `[rows, in]`, Y is `[rows, out]`, both row-major f32.
pub fn delta_matmul_add(w: &CompressedWeight<'_>, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    let rows = check(w, x, y)?;
    let (out, inp) = (w.rows(), w.cols());
    if rows == 0 || out == 0 || inp == 0 {
        return Ok(());
    }
    let f = ScaleFactors::new(&w.name, w.mode, &w.scales, out, inp)?;
    if rows >= TILE_MIN_ROWS {
        tiled_delta_matmul_add(w, &f, rows, x, y);
        return Ok(());
    }
    decode_delta_add(vec![(w, f, (0..rows).collect())], x, y, out, inp, subset_sums::available());
    Ok(())
}

/// Decode-sized groups of rows (fewer than [`TILE_MIN_ROWS`] each), every group with its own
/// delta: `Y[r, :] += Δ̂ · X[r, :]` for each of its rows, as `(Δ̂ x)[i] = r[i] · Σ_j S[i, j]·z[j]`
/// with `z = c ⊙ x` once per row. The signed sums come from [`subset_sums`] when `tabled` (the
/// CPU has AVX-512 or AVX2: 16 or 8 output rows per register), else from [`signed_dot`] row by
/// row. One parallel pass over (group, block of output rows) tasks, about TASKS_PER_THREAD per
/// thread in all; each row gets the same sums whatever it is grouped with.
fn decode_delta_add(groups: Vec<(&CompressedWeight<'_>, ScaleFactors<'_>, Vec<usize>)>, x: &[f32], y: &mut [f32], out: usize, inp: usize, tabled: bool) {
    let groups: Vec<_> = groups
        .into_par_iter()
        .map(|(w, f, rows)| {
            let z: Vec<f32> = rows.iter().flat_map(|&r| x[r * inp..(r + 1) * inp].iter().zip(f.cols.iter()).map(|(a, c)| a * c)).collect();
            let tables: Vec<SumTables> = if tabled { z.chunks_exact(inp).map(|zr| SumTables::new(zr, w.signs.words_per_row())).collect() } else { Vec::new() };
            (w, f, rows, z, tables)
        })
        .collect();
    let tasks_per_group = (TASKS_PER_THREAD * rayon::current_num_threads()).div_ceil(groups.len());
    let block = out.div_ceil(tasks_per_group).next_multiple_of(subset_sums::LANES);
    let tasks: Vec<(usize, usize)> = (0..groups.len()).flat_map(|g| (0..out.div_ceil(block)).map(move |t| (g, t * block))).collect();
    // Results land transposed ([outputs, rows] per task) so that tasks own disjoint outputs.
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(g, i0)| {
            let (w, f, rows, z, tables) = &groups[g];
            let i1 = (i0 + block).min(out);
            let mut part = vec![0f32; (i1 - i0) * rows.len()];
            // Σ_j S[i, j]·z[j] for the task's outputs, one row of the group at a time.
            let mut sums = vec![0f32; (i1 - i0).next_multiple_of(subset_sums::LANES)];
            for r in 0..rows.len() {
                if tabled {
                    sums.fill(0.0);
                    subset_sums::add_sums(w.signs.words(), w.signs.words_per_row(), i0, i1, &tables[r], &mut sums);
                } else {
                    for (i, s) in (i0..i1).zip(sums.iter_mut()) {
                        *s = signed_dot(w.signs.row(i), &z[r * inp..(r + 1) * inp]);
                    }
                }
                for (k, s) in sums[..i1 - i0].iter().enumerate() {
                    part[k * rows.len() + r] = f.rows[i0 + k] * s;
                }
            }
            part
        })
        .collect();
    for (&(g, i0), part) in tasks.iter().zip(&parts) {
        let rows = &groups[g].2;
        for (k, col) in part.chunks_exact(rows.len()).enumerate() {
            for (&r, v) in rows.iter().zip(col) {
                y[r * out + i0 + k] += v;
            }
        }
    }
}

/// From this many rows on, a tile of Δ̂ is unpacked and multiplied as a dense GEMM: unpacking
/// costs one pass over the tile, the GEMM then runs at full arithmetic speed for every row.
pub(crate) const TILE_MIN_ROWS: usize = 8;
/// Bytes of one unpacked Δ̂ tile (kept in the L2 cache while the GEMM reads it).
const TILE_BYTES: usize = 256 << 10;

/// Prefill-shaped `Y += X · Δ̂ᵀ`: output rows go in tiles; each task unpacks its tile of Δ̂
/// (`[tile, in]`, f32) and multiplies it with a dense GEMM. Δ̂ exists only one tile per thread at
/// a time.
fn tiled_delta_matmul_add(w: &CompressedWeight<'_>, f: &ScaleFactors<'_>, rows: usize, x: &[f32], y: &mut [f32]) {
    let (out, inp) = (w.rows(), w.cols());
    let tile = (TILE_BYTES / (4 * inp)).clamp(8, per_task(out, 8));
    let parts: Vec<Vec<f32>> = (0..out.div_ceil(tile))
        .into_par_iter()
        .map(|t| {
            let (i0, i1) = (t * tile, ((t + 1) * tile).min(out));
            let n = i1 - i0;
            let mut d = vec![0f32; n * inp];
            for (k, dr) in d.chunks_exact_mut(inp).enumerate() {
                let i = i0 + k;
                let (r, words) = (f.rows[i], w.signs.row(i));
                for (jc, (d32, c32)) in dr.chunks_mut(32).zip(f.cols.chunks(32)).enumerate() {
                    for (b, (dv, &c)) in d32.iter_mut().zip(c32).enumerate() {
                        *dv = with_sign(r * c, words[jc], b);
                    }
                }
            }
            let mut part = vec![0f32; rows * n];
            // SAFETY: the pointers and strides describe x [rows, inp], dᵀ [inp, n] (d is
            // [n, inp] row-major) and part [rows, n], all inside their buffers.
            unsafe {
                matrixmultiply::sgemm(
                    rows, inp, n, 1.0,
                    x.as_ptr(), inp as isize, 1,
                    d.as_ptr(), 1, inp as isize,
                    0.0, part.as_mut_ptr(), n as isize, 1,
                );
            }
            part
        })
        .collect();
    for (t, part) in parts.iter().enumerate() {
        let (i0, n) = (t * tile, part.len() / rows);
        for (r, pr) in part.chunks_exact(n).enumerate() {
            y[r * out + i0..r * out + i0 + n].iter_mut().zip(pr).for_each(|(a, b)| *a += b);
        }
    }
}

/// Σ_j S[j]·z[j] for one packed sign row, for CPUs without the table lookups of [`subset_sums`]
/// (no AVX2).
pub(crate) fn signed_dot(words: &[u32], z: &[f32]) -> f32 {
    // Eight partial sums so the compiler can keep them in one vector register.
    let mut acc = [0f32; 8];
    for (&word, z32) in words.iter().zip(z.chunks(32)) {
        for (b, &v) in z32.iter().enumerate() {
            acc[b % 8] += with_sign(v, word, b);
        }
    }
    acc.iter().sum()
}

/// Multi-delta batch: `Y[r, :] += Δ̂_{idx[r]} · X[r, :]`. Rows that share a delta are gathered and
/// processed together, so each delta's signs are read once per batch. `deltas` holds the weights
/// or references to them (a server keeps them inside its resident models).
pub fn batched_delta_matmul_add<'w, W: Borrow<CompressedWeight<'w>>>(deltas: &[W], idx: &[usize], x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    let Some(first) = deltas.first().map(Borrow::borrow) else {
        return if idx.is_empty() { Ok(()) } else { Err(KernelError::Batch(format!("{} rows but no deltas", idx.len()))) };
    };
    let (out, inp) = (first.rows(), first.cols());
    if let Some(d) = deltas.iter().map(Borrow::borrow).find(|d| (d.rows(), d.cols()) != (out, inp)) {
        return Err(KernelError::Batch(format!("delta `{}` is [{}, {}], the first is [{out}, {inp}]", d.name, d.rows(), d.cols())));
    }
    if x.len() != idx.len() * inp || y.len() != idx.len() * out {
        return Err(KernelError::Batch(format!("{} rows need x of {} and y of {} values", idx.len(), idx.len() * inp, idx.len() * out)));
    }
    if let Some(&bad) = idx.iter().find(|&&d| d >= deltas.len()) {
        return Err(KernelError::Batch(format!("row delta index {bad} but only {} deltas", deltas.len())));
    }
    // Rows grouped by delta. A delta with prefill-sized groups of rows goes through its own
    // (tiled) product; decode-sized groups of every delta share one parallel pass, so a step over
    // many deltas pays one fork-join per weight, not one per delta.
    let mut decode: Vec<(&CompressedWeight<'_>, Vec<usize>)> = Vec::new();
    for (d, w) in deltas.iter().map(Borrow::borrow).enumerate() {
        let rows: Vec<usize> = (0..idx.len()).filter(|&r| idx[r] == d).collect();
        if rows.is_empty() {
            continue;
        }
        if rows.len() < TILE_MIN_ROWS {
            decode.push((w, rows));
            continue;
        }
        // Gathered rows of Y go in and come back whole, so each row gets exactly what
        // `delta_matmul_add` would give it alone (the same sums added to the same values).
        let xs: Vec<f32> = rows.iter().flat_map(|&r| x[r * inp..(r + 1) * inp].iter().copied()).collect();
        let mut ys: Vec<f32> = rows.iter().flat_map(|&r| y[r * out..(r + 1) * out].iter().copied()).collect();
        delta_matmul_add(w, &xs, &mut ys)?;
        for (k, &r) in rows.iter().enumerate() {
            y[r * out..(r + 1) * out].copy_from_slice(&ys[k * out..(k + 1) * out]);
        }
    }
    if decode.is_empty() || out == 0 || inp == 0 {
        return Ok(());
    }
    let groups = decode
        .into_iter()
        .map(|(w, rows)| Ok((w, ScaleFactors::new(&w.name, w.mode, &w.scales, out, inp)?, rows)))
        .collect::<Result<Vec<_>, KernelError>>()?;
    decode_delta_add(groups, x, y, out, inp, subset_sums::available());
    Ok(())
}

/// The oracle: Δ̂ from its definition, products summed in f64.
pub fn delta_matmul_add_reference(w: &CompressedWeight<'_>, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    let rows = check(w, x, y)?;
    let (out, inp) = (w.rows(), w.cols());
    let f = ScaleFactors::new(&w.name, w.mode, &w.scales, out, inp)?;
    for r in 0..rows {
        for i in 0..out {
            let s: f64 = (0..inp).map(|j| f.delta_hat(&w.signs, i, j) as f64 * x[r * inp + j] as f64).sum();
            y[r * out + i] += s as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::test_support::{random, weight};
    use super::*;
    use delta_format::ScaleMode;
    use proptest::prelude::*;

    fn close(a: &[f32], b: &[f32]) -> Result<(), String> {
        for (k, (x, y)) in a.iter().zip(b).enumerate() {
            let scale = x.abs().max(y.abs()).max(1.0);
            if (x - y).abs() > 1e-4 * scale {
                return Err(format!("index {k}: {x} vs {y}"));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(150))]
        #[test]
        fn fused_product_equals_oracle(
            rows in 1usize..24, out in 1usize..70, inp in 1usize..150, seed in any::<u64>(),
            mode in prop::sample::select(ScaleMode::ALL.to_vec()),
        ) {
            let w = weight(out, inp, mode, seed);
            let x = random(rows * inp, seed ^ 99);
            let y0 = random(rows * out, seed ^ 5);
            let (mut fast, mut slow) = (y0.clone(), y0.clone());
            delta_matmul_add(&w, &x, &mut fast).unwrap();
            delta_matmul_add_reference(&w, &x, &mut slow).unwrap();
            prop_assert!(close(&fast, &slow).is_ok(), "{:?}", close(&fast, &slow));
            // Both decode paths (the dispatch above takes one of them on this CPU).
            if rows < TILE_MIN_ROWS {
                for tabled in [false, subset_sums::available()] {
                    let mut y = y0.clone();
                    let f = ScaleFactors::new(&w.name, w.mode, &w.scales, out, inp).unwrap();
                    decode_delta_add(vec![(&w, f, (0..rows).collect())], &x, &mut y, out, inp, tabled);
                    prop_assert!(close(&y, &slow).is_ok(), "tabled {}: {:?}", tabled, close(&y, &slow));
                }
            }
        }

        #[test]
        fn batched_rows_each_get_their_own_delta(
            rows in 1usize..12, out in 1usize..40, inp in 1usize..90, n in 1usize..5, seed in any::<u64>(),
            mode in prop::sample::select(ScaleMode::ALL.to_vec()),
        ) {
            let deltas: Vec<_> = (0..n).map(|d| weight(out, inp, mode, seed.wrapping_add(d as u64 * 1000))).collect();
            let idx: Vec<usize> = random(rows, seed ^ 3).iter().map(|v| ((v.abs() * 1000.0) as usize) % n).collect();
            let x = random(rows * inp, seed ^ 11);
            let mut y = vec![0f32; rows * out];
            batched_delta_matmul_add(&deltas, &idx, &x, &mut y).unwrap();
            for r in 0..rows {
                let mut want = vec![0f32; out];
                delta_matmul_add_reference(&deltas[idx[r]], &x[r * inp..(r + 1) * inp], &mut want).unwrap();
                prop_assert!(close(&y[r * out..(r + 1) * out], &want).is_ok(), "row {r}");
            }
        }
    }

    #[test]
    fn bad_shapes_and_indices_are_errors() {
        let w = weight(3, 33, ScaleMode::Scalar, 1);
        assert!(delta_matmul_add(&w, &[0.0; 32], &mut [0.0; 3]).is_err());
        assert!(delta_matmul_add(&w, &[0.0; 33], &mut [0.0; 4]).is_err());
        let other = weight(4, 33, ScaleMode::Scalar, 2);
        assert!(batched_delta_matmul_add(&[w.clone(), other], &[0], &[0.0; 33], &mut [0.0; 3]).is_err());
        assert!(batched_delta_matmul_add(&[w], &[1], &[0.0; 33], &mut [0.0; 3]).is_err());
    }
}
