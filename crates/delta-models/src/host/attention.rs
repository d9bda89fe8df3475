//! One segment's attention on the host, in tiles: the scores of [`QUERY_TILE`] queries of a head
//! over the keys any of them may see, each query's softmax, and the weighted sum of the values,
//! in which every value row is read once for all the tile's queries and the sums stay in
//! registers. With AVX2 and FMA the scores are taken 8 keys at a time and their lane sums added
//! up together; everything else is plain loops, compiled for AVX2 where the CPU has it.
//!
//! Every score is [`fma_dot`]'s sum (8 running lanes, then a fixed tree), every context value
//! `Σ_j w_j·v_j[c]` is summed in order of j, and e^x is [`exp_to_one`] — fused multiply-adds in
//! both paths: the AVX2 and plain paths give the same bits (tested), and so does a query
//! whatever tile it falls in. A CPU without FMA runs the plain path with `fma` from libm.

use std::ops::Range;

use delta_kernels::dense::{fma_dot, lane_sum};

/// Queries whose scores and weighted values are computed together.
const QUERY_TILE: usize = 4;
/// Keys whose scores one step computes with AVX2 (a register of lane sums each).
const KEYS_AT_ONCE: usize = 8;
/// Context columns per pass of the weighted sum: two 8-lane registers per query.
const VALUE_TILE: usize = 16;
/// Running sums of a score, and of a softmax's largest score and sum.
const LANES: usize = 8;

/// The sizes [`attend_segment`] works with.
#[derive(Clone, Copy)]
pub(super) struct HeadShape {
    pub heads: usize,
    /// Query heads per kv head.
    pub group: usize,
    pub d: usize,
    pub scale: f32,
}

/// Where [`attend_segment`] finds key (and value) j of kv head g: at `g·head_stride +
/// j·row_stride` — a packed batch's rows as the projections return them, or a KV cache's
/// `[kv_heads, positions, d]`.
#[derive(Clone, Copy)]
pub(super) struct KeyLayout {
    pub head_stride: usize,
    pub row_stride: usize,
}

/// The instructions the score tiles use.
#[derive(Clone, Copy)]
enum Isa {
    Plain,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// One segment of `attend_packed` (or queries of `attend_cached`): its rows of the context
/// (`part`, `[queries, heads·d]`, zeros on entry) from its rotated queries `q` (`[queries,
/// heads·d]`) over the `keys` keys and values in `k` and `v` (laid out as `layout` says), `mask`
/// `[queries, keys]` (additive; −∞ hides a key, and a query that sees none gets zeros).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_segment(q: &[f32], k: &[f32], v: &[f32], layout: KeyLayout, shape: HeadShape, keys: usize, mask: &[f32], part: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { attend_segment_avx2(q, k, v, layout, shape, keys, mask, part) };
    }
    attend_tiles(Isa::Plain, q, k, v, layout, shape, keys, mask, part)
}

/// [`attend_segment`] without AVX2 whatever the CPU has: the same bits (tested).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_segment_plain(q: &[f32], k: &[f32], v: &[f32], layout: KeyLayout, shape: HeadShape, keys: usize, mask: &[f32], part: &mut [f32]) {
    attend_tiles(Isa::Plain, q, k, v, layout, shape, keys, mask, part)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_segment_avx2(q: &[f32], k: &[f32], v: &[f32], layout: KeyLayout, shape: HeadShape, keys: usize, mask: &[f32], part: &mut [f32]) {
    attend_tiles(Isa::Avx2, q, k, v, layout, shape, keys, mask, part)
}

/// Every head's queries in tiles of [`QUERY_TILE`], each over the keys from the multiple of
/// [`LANES`] at or below the first any of them sees to the last (hidden keys in between weigh 0).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_tiles(isa: Isa, q: &[f32], k: &[f32], v: &[f32], layout: KeyLayout, shape: HeadShape, keys: usize, mask: &[f32], part: &mut [f32]) {
    let HeadShape { heads, group, d, .. } = shape;
    let width = heads * d;
    let queries = part.len() / width;
    assert!(q.len() >= part.len() && mask.len() >= queries * keys, "attention: {queries} queries of width {width} over {keys} keys");
    if keys == 0 {
        return;
    }
    // The end of the farthest key any tile reads: every read below lies within `k` and `v`.
    let last = (heads / group - 1) * layout.head_stride + (keys - 1) * layout.row_stride + d;
    assert!(k.len() >= last && v.len() >= last, "attention: {keys} keys need {last} values, k has {} and v {}", k.len(), v.len());
    let visible: Vec<Range<usize>> = mask
        .chunks_exact(keys)
        .take(queries)
        .map(|row| match row.iter().position(|&m| m != f32::NEG_INFINITY) {
            Some(first) => first..keys - row.iter().rev().position(|&m| m != f32::NEG_INFINITY).unwrap_or(0),
            None => 0..0,
        })
        .collect();
    let mut scratch = vec![0f32; 2 * QUERY_TILE * keys];
    for head in 0..heads {
        let at = head / group * layout.head_stride;
        for i0 in (0..queries).step_by(QUERY_TILE) {
            let tile = Tile { isa, q, k, v, at, row_stride: layout.row_stride, shape, keys, mask, visible: &visible, head, i0 };
            match (queries - i0).min(QUERY_TILE) {
                1 => tile.attend::<1>(&mut scratch, part),
                2 => tile.attend::<2>(&mut scratch, part),
                3 => tile.attend::<3>(&mut scratch, part),
                _ => tile.attend::<QUERY_TILE>(&mut scratch, part),
            }
        }
    }
}

/// Queries `i0..i0 + NQ` of one head, and where their keys and values are.
struct Tile<'a> {
    isa: Isa,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    /// Where the head's kv head starts in `k` and `v`.
    at: usize,
    row_stride: usize,
    shape: HeadShape,
    keys: usize,
    mask: &'a [f32],
    /// Each query's first to last visible key.
    visible: &'a [Range<usize>],
    head: usize,
    i0: usize,
}

impl Tile<'_> {
    /// The tile's rows of the context (in `part`); `scratch` holds 2·[`QUERY_TILE`]·`keys` floats.
    #[inline(always)]
    fn attend<const NQ: usize>(&self, scratch: &mut [f32], part: &mut [f32]) {
        let Tile { q, keys, head, i0, shape: HeadShape { heads, d, scale, .. }, .. } = *self;
        let width = heads * d;
        let seen = self.visible[i0..i0 + NQ].iter().filter(|r| !r.is_empty());
        let (Some(first), Some(hi)) = (seen.clone().map(|r| r.start).min(), seen.map(|r| r.end).max()) else { return };
        // From a multiple of [`LANES`]: key j's weight goes to lane j mod 8 of the softmax's sum
        // whatever the tile, so that a query's context does not depend on the others in it.
        let lo = first / LANES * LANES;
        let qs: [&[f32]; NQ] = std::array::from_fn(|n| &q[(i0 + n) * width + head * d..][..d]);
        let (weights, interleaved) = scratch.split_at_mut(QUERY_TILE * keys);
        match self.isa {
            Isa::Plain => self.scores::<NQ>(&qs, lo..hi, weights),
            // SAFETY: `Isa::Avx2` tiles run only inside `attend_segment_avx2`, called where the CPU
            // has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.scores_avx2::<NQ>(&qs, lo..hi, weights) },
        }
        for n in 0..NQ {
            let row = i0 + n;
            softmax(&mut weights[n * keys..][lo..hi], &self.mask[row * keys..][lo..hi], scale);
        }
        // Key j's NQ weights side by side, read together by the weighted sum.
        let by_key: &[f32] = if NQ == 1 {
            &weights[lo..hi]
        } else {
            for (j, w) in (lo..hi).zip(interleaved.chunks_exact_mut(NQ)) {
                for (n, w) in w.iter_mut().enumerate() {
                    *w = weights[n * keys + j];
                }
            }
            &interleaved[..(hi - lo) * NQ]
        };
        let mut rows = part.chunks_exact_mut(width).skip(i0);
        let outs: [&mut [f32]; NQ] = std::array::from_fn(|_| &mut rows.next().expect("a row per query")[head * d..][..d]);
        self.weighted_values::<NQ>(by_key, lo..hi, outs);
    }

    /// `scores[n·keys + j]` = [`fma_dot`]`(qs[n], k_j)` for the keys `range`.
    #[inline(always)]
    fn scores<const NQ: usize>(&self, qs: &[&[f32]; NQ], range: Range<usize>, scores: &mut [f32]) {
        let (d, keys) = (self.shape.d, self.keys);
        for (n, q) in qs.iter().enumerate() {
            for j in range.clone() {
                scores[n * keys + j] = fma_dot(q, &self.k[self.at + j * self.row_stride..][..d]);
            }
        }
    }

    /// [`Tile::scores`] with AVX2: per query, 8 keys at a time, their 8 lane sums in 8 registers
    /// and then added up together (`vhaddps` in the order [`fma_dot`] adds them). Where the head's
    /// width is not a multiple of 8, and for the last keys of the range, the plain loop.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores_avx2<const NQ: usize>(&self, qs: &[&[f32]; NQ], range: Range<usize>, scores: &mut [f32]) {
        use std::arch::x86_64::*;
        let (d, keys) = (self.shape.d, self.keys);
        let whole = if d % LANES == 0 { range.start + range.len() / KEYS_AT_ONCE * KEYS_AT_ONCE } else { range.start };
        for (n, q) in qs.iter().enumerate() {
            for j0 in (range.start..whole).step_by(KEYS_AT_ONCE) {
                let mut acc = [_mm256_setzero_ps(); KEYS_AT_ONCE];
                for c0 in (0..d).step_by(LANES) {
                    // SAFETY: columns c0..c0 + 8 of the query, and of keys j0..j0 + 8, lie within
                    // `q` and `k` (checked in `attend_tiles`).
                    let x = unsafe { _mm256_loadu_ps(q.as_ptr().add(c0)) };
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let y = unsafe { _mm256_loadu_ps(self.k.as_ptr().add(self.at + (j0 + r) * self.row_stride + c0)) };
                        *acc = _mm256_fmadd_ps(x, y, *acc);
                    }
                }
                // Lanes (0 + 1) + (2 + 3) and (4 + 5) + (6 + 7) of each key, then the halves.
                let h: [__m256; 4] = std::array::from_fn(|i| _mm256_hadd_ps(acc[2 * i], acc[2 * i + 1]));
                let (g0, g1) = (_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
                let sums = _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(g0, g1), _mm256_permute2f128_ps::<0x31>(g0, g1));
                let out: &mut [f32; KEYS_AT_ONCE] = (&mut scores[n * keys + j0..][..KEYS_AT_ONCE]).try_into().expect("8 scores");
                // SAFETY: `out` holds 8 floats.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sums) };
            }
        }
        self.scores::<NQ>(qs, whole..range.end, scores);
    }

    /// `outs[n][c] = Σ_j weights[(j − range.start)·NQ + n]·v_j[c]` over the keys `range`, 16
    /// columns at a time (the last `d mod 16` one at a time).
    #[inline(always)]
    fn weighted_values<const NQ: usize>(&self, weights: &[f32], range: Range<usize>, mut outs: [&mut [f32]; NQ]) {
        let d = self.shape.d;
        let rows = || self.v[self.at + range.start * self.row_stride..].chunks(self.row_stride).zip(weights.chunks_exact(NQ));
        let whole = d / VALUE_TILE * VALUE_TILE;
        for c0 in (0..whole).step_by(VALUE_TILE) {
            let mut acc = [[0f32; VALUE_TILE]; NQ];
            for (row, w) in rows() {
                let row: &[f32; VALUE_TILE] = row[c0..c0 + VALUE_TILE].try_into().expect("16 columns");
                for (acc, &w) in acc.iter_mut().zip(w) {
                    for (a, &x) in acc.iter_mut().zip(row) {
                        *a = w.mul_add(x, *a);
                    }
                }
            }
            for (out, acc) in outs.iter_mut().zip(&acc) {
                out[c0..c0 + VALUE_TILE].copy_from_slice(acc);
            }
        }
        for c in whole..d {
            for (n, out) in outs.iter_mut().enumerate() {
                out[c] = rows().fold(0f32, |a, (row, w)| w[n].mul_add(row[c], a));
            }
        }
    }
}

/// `scores` (over a query's keys, from a multiple of [`LANES`]) scaled and masked (`mask`
/// additive, −∞ hidden), then replaced by their softmax: hidden keys weigh 0, and a query that
/// sees none gets all zeros. The largest score and the sum are taken in [`LANES`] running lanes
/// (key j in lane j mod 8, hidden keys adding 0), so that every step vectorises.
#[inline(always)]
fn softmax(scores: &mut [f32], mask: &[f32], scale: f32) {
    for (s, &m) in scores.iter_mut().zip(mask) {
        *s = if m == f32::NEG_INFINITY { f32::NEG_INFINITY } else { *s * scale + m };
    }
    let mut most = [f32::NEG_INFINITY; LANES];
    for chunk in scores.chunks_exact(LANES) {
        for (m, &s) in most.iter_mut().zip(chunk) {
            *m = m.max(s);
        }
    }
    let max = most.iter().chain(scores.chunks_exact(LANES).remainder()).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for s in scores.iter_mut() {
        // e^−∞ = 0: a hidden key adds nothing.
        *s = if *s == f32::NEG_INFINITY { 0.0 } else { exp_to_one(*s - max) };
    }
    let mut sums = [0f32; LANES];
    let chunks = scores.chunks_exact(LANES);
    let last = chunks.remainder();
    for chunk in chunks {
        for (sum, &s) in sums.iter_mut().zip(chunk) {
            *sum += s;
        }
    }
    for (sum, &s) in sums.iter_mut().zip(last) {
        *sum += s;
    }
    let sum = lane_sum(&sums);
    if sum > 0.0 {
        for s in scores.iter_mut() {
            *s /= sum;
        }
    }
}

/// e^x for x ≤ 0 (a score minus the largest), in plain arithmetic that vectorises: x = n·ln 2 + r
/// with n an integer and |r| ≤ ln 2 / 2, e^r by Cephes' `expf` polynomial, times 2^n. Below −87
/// it gives e^−87 (the key's weight ~1e−38 of the largest one's), and NaN for NaN. Within 1 ulp
/// of libm's `expf` over [−87, 0] (tested).
#[inline(always)]
fn exp_to_one(x: f32) -> f32 {
    // 1.5·2²³: added and subtracted, it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x < -87.0 { -87.0 } else { x };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let p = 1.987_569_2e-4f32.mul_add(r, 1.398_2e-3).mul_add(r, 8.333_452e-3).mul_add(r, 4.166_579_6e-2).mul_add(r, 1.666_666_5e-1).mul_add(r, 0.5);
    let e_r = (p * r).mul_add(r, r) + 1.0;
    // n in [−126, 0] sits in the low bits of `shifted`; 2^n is the float with exponent n.
    let two_n = (shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23;
    e_r * f32::from_bits(two_n as u32)
}

#[cfg(test)]
mod tests {
    use super::exp_to_one;

    /// A million points of [−87, 0] against libm's `expf`, and the edges.
    #[test]
    fn exp_to_one_is_within_1_ulp_of_libm() {
        let worst = (0..=1_000_000)
            .map(|i| {
                let x = -87.0 * (i as f32 / 1e6);
                (x, (exp_to_one(x).to_bits() as i64 - x.exp().to_bits() as i64).abs())
            })
            .max_by_key(|&(_, ulp)| ulp)
            .unwrap();
        assert!(worst.1 <= 1, "{} ulp at {}", worst.1, worst.0);
        assert_eq!(exp_to_one(0.0), 1.0);
        assert_eq!(exp_to_one(-1e9), exp_to_one(-87.0));
        assert_eq!(exp_to_one(f32::NEG_INFINITY), exp_to_one(-87.0));
        assert!(exp_to_one(f32::NAN).is_nan());
    }
}
