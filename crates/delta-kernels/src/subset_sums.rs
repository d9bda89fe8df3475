//! Sign products by table lookup, 16 output rows at a time (AVX-512) or 8 (AVX2).
//!
//! For a packed sign row S[i, ·] and an activation vector z, `Σ_j S[i, j]·z[j]` splits into groups
//! of four inputs. Each group has only 16 possible signed sums `±z[4g] ± z[4g+1] ± z[4g+2] ±
//! z[4g+3]`; they are tabulated once per vector (a [`SumTables`]), and each output row then needs
//! one lookup per 4 signs instead of 4 sign flips. The lookup runs in the vector unit: the 16
//! lanes of a register are 16 output rows, their sign words are transposed into registers, and
//! `vpermps` picks every lane's entry of the group's 16-float table by the low 4 bits of its word
//! (shifted 4 bits further for each next group). Per 64 signs that is a shift, a permute and an
//! add, against 8 XORs and 8 adds for sign flipping. On AVX2 a register holds 8 output rows and
//! a table covers 2 signs (see [`Lookup`]).
//!
//! Every lane does the same arithmetic in the same order whichever rows share its register, so an
//! output row's sum does not depend on the batch or on how the rows are split into tasks.

/// Output rows a tile takes, and the granule of the sums' padding: 16 lanes of one AVX-512
/// register, or two AVX2 registers of 8.
pub(crate) const LANES: usize = 16;
/// How many tiles ahead the AVX-512 tile prefetches the sign words (into L2: the tables own L1).
/// Measured for the whole B = 8 product at 4096²: prefetching steadily 2 tiles ahead instead of a
/// burst for the next tile took it from 4.6 to 4.1 ms (with the older base product); later 2
/// tiles into L1 gave 2.7 ms, 8 into L2 2.6–3.0 ms, 16 into L2 3.1 ms — within the host's
/// run-to-run noise.
const PREFETCH_TILES: usize = 8;
/// How many tiles (of 16 rows) ahead the AVX2 tile prefetches the sign words, into L1. The 8
/// delta terms at B = 8, 4096² on Zen 3, three runs each: 2.53–2.59 ms, against 2.4–3.5 ms
/// for 16 tiles into L2, 2.8–3.1 ms for 4 and 2.6–3.5 ms for 8.
const AVX2_PREFETCH_TILES: usize = 2;

/// Sign words (32 inputs each) per column block: their tables (64 KiB on AVX-512, 32 KiB on
/// AVX2) stay in L1/L2 while every row tile of a task reads them, and each row's signs are read
/// in runs of 512 bytes.
/// AVX-512: 64 or 256 words measured slower at 4096 inputs: 3.3 / 3.2 against 3.1 ms. AVX2
/// (Zen 3, the 8 delta terms at B = 8, three runs each, with the 3-sign tables of `vpermps`):
/// 2.6–2.8 ms, against 3.1–4.8 ms for 32 words and 3.3–4.2 ms for 64; at 8192 inputs
/// 11.9–14.1 ms, against 12.6–18.3 ms for 256.
const BLOCK_WORDS: usize = 128;

/// How this CPU looks the sums up: the register width sets the table shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// AVX-512F: 16 output rows per register; `vpermps` picks one of 16 floats, so a table
    /// covers 4 signs (8 tables per sign word).
    Avx512,
    /// AVX2: 8 output rows per register; `vpermilps` picks one of 4 floats within each 128-bit
    /// half, so a table covers 2 signs (its 4 sums, loaded into both halves; 16 tables per sign
    /// word). AVX2's `vpermps` picks one of 8 (3 signs a table, 11 per word), but measured slower
    /// on Zen 3: the 8 delta terms at B = 8, 4096², three runs each, 3.3–3.5 ms against 2.5–3.3
    /// ms (with 8-float tables, each table's sums twice).
    Avx2,
}

impl Lookup {
    /// Signs one table covers.
    const fn bits(self) -> usize {
        match self {
            Lookup::Avx512 => 4,
            Lookup::Avx2 => 2,
        }
    }

    /// Tables per 32-sign word.
    const fn groups(self) -> usize {
        32 / self.bits()
    }

    /// Floats in one table, 2^bits — each sum of its signs once, picked by the low `bits` bits of
    /// a lane's index: the 16 sums of 4 signs (a register's lanes), or the 4 sums of 2 signs (a
    /// 128-bit half, broadcast into both halves of the register as it is loaded).
    const fn entries(self) -> usize {
        match self {
            Lookup::Avx512 => 16,
            Lookup::Avx2 => 4,
        }
    }

    /// Floats of tables per sign word.
    const fn floats_per_word(self) -> usize {
        self.groups() * self.entries()
    }
}

/// Whether this CPU has the instructions of lookup `l`.
fn supports(l: Lookup) -> bool {
    #[cfg(target_arch = "x86_64")]
    return match l {
        Lookup::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
        Lookup::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
    };
    #[allow(unreachable_code)]
    false
}

/// The lookup this CPU runs, if any: AVX-512F, else AVX2.
pub(crate) fn lookup() -> Option<Lookup> {
    [Lookup::Avx512, Lookup::Avx2].into_iter().find(|&l| supports(l))
}

/// Whether this CPU runs the table path (AVX-512F or AVX2).
pub(crate) fn available() -> bool {
    lookup().is_some()
}

/// For every group of `bits` inputs of z (zero beyond its end, up to `words` sign words), the
/// 2^bits signed sums: entry `n` of a group is `Σ_t (bit t of n ? +z[t] : −z[t])` over its
/// inputs — bit 1 means Δ ≥ 0, the packing convention — summed as `(±z[0] ± z[1]) + (±z[2] ±
/// z[3])`, the second pair ±0 for 2-sign groups. Kept in 16-byte quads, so that every table
/// starts on a 16-byte boundary (the AVX2 tile broadcasts each 4-float table from memory).
pub(crate) struct SumTables {
    quads: Vec<Quad>,
    lookup: Lookup,
}

#[derive(Clone, Copy, Default)]
#[repr(C, align(16))]
struct Quad([f32; 4]);

impl SumTables {
    /// The tables' floats, table after table.
    fn floats(&self) -> &[f32] {
        // SAFETY: a Quad is 4 f32 and nothing else (repr(C), size 16), so the quads are
        // 4 × len initialised f32 in a row.
        unsafe { std::slice::from_raw_parts(self.quads.as_ptr() as *const f32, 4 * self.quads.len()) }
    }

    fn floats_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `floats`, and the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.quads.as_mut_ptr() as *mut f32, 4 * self.quads.len()) }
    }

    /// The tables for this CPU's lookup. Needs [`available`].
    pub(crate) fn new(z: &[f32], words: usize) -> SumTables {
        SumTables::with(lookup().expect("a CPU with table lookups"), z, words)
    }

    pub(crate) fn with(lookup: Lookup, z: &[f32], words: usize) -> SumTables {
        let bits = lookup.bits();
        let mut tables = SumTables { quads: vec![Quad::default(); words * lookup.floats_per_word() / 4], lookup };
        for (g, tg) in tables.floats_mut().chunks_exact_mut(lookup.entries()).enumerate() {
            let v = |k: usize| if k < bits { z.get(bits * g + k).copied().unwrap_or(0.0) } else { 0.0 };
            let pair = |a: f32, b: f32| [-a - b, a - b, -a + b, a + b];
            let (lo, hi) = (pair(v(0), v(1)), pair(v(2), v(3)));
            for (n, e) in tg.iter_mut().enumerate() {
                *e = lo[n & 3] + hi[n >> 2];
            }
        }
        tables
    }
}

/// `sums[i - i0] += Σ_j S[i, j]·z[j]` for the output rows `i0..i1` of a sign matrix stored as
/// `words` (`wpr` words per row), z given by its tables. `sums` holds at least `i1 - i0` rounded
/// up to [`LANES`] values (the padding receives sums of no row). Needs the tables' lookup on this
/// CPU.
pub(crate) fn add_sums(words: &[u32], wpr: usize, i0: usize, i1: usize, tables: &SumTables, sums: &mut [f32]) {
    let lookup = tables.lookup;
    assert!(supports(lookup) && i1 <= words.len() / wpr.max(1) && tables.floats().len() >= wpr * lookup.floats_per_word() && sums.len() >= (i1 - i0).next_multiple_of(LANES));
    let floats = tables.floats().as_ptr();
    for w0 in (0..wpr).step_by(BLOCK_WORDS) {
        let w1 = (w0 + BLOCK_WORDS).min(wpr);
        for (t, s) in (i0..i1).step_by(LANES).zip(sums.chunks_exact_mut(LANES)) {
            let lanes = (i1 - t).min(LANES);
            // SAFETY: the CPU has the lookup's features (asserted); rows t..t + lanes and words
            // w0..w1 lie in `words`, the tables hold floats_per_word floats per word, `s` holds
            // LANES floats.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let rows = words.as_ptr().add(t * wpr);
                match lookup {
                    Lookup::Avx512 => tile_avx512(rows, wpr, lanes, w0, w1, floats, s.as_mut_ptr()),
                    Lookup::Avx2 => {
                        tile_avx2(rows, wpr, lanes.min(8), w0, w1, floats, s.as_mut_ptr());
                        if lanes > 8 {
                            tile_avx2(rows.add(8 * wpr), wpr, lanes - 8, w0, w1, floats, s.as_mut_ptr().add(8));
                        }
                    }
                }
            };
        }
    }
}

/// One tile: `sums[l] += Σ_{w0 ≤ w < w1} Σ_k T[w, k][(S[l, w] >> 4k) & 15]` for lanes l < `lanes`,
/// in four accumulators (group k goes to accumulator k mod 4), summed as (a0 + a1) + (a2 + a3).
/// The sign words come 16 per row with plain loads and are transposed in registers (a gather of
/// one word per row measured the same; the transpose needs no gather unit).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(rows: *const u32, wpr: usize, lanes: usize, w0: usize, w1: usize, tables: *const f32, sums: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut w = w0;
    while w < w1 {
        let n = (w1 - w).min(LANES);
        let valid: __mmask16 = if n == LANES { 0xffff } else { (1u16 << n) - 1 };
        let mut m = [_mm512_setzero_si512(); LANES];
        for (l, v) in m.iter_mut().enumerate().take(lanes) {
            *v = _mm512_maskz_loadu_epi32(valid, rows.add(l * wpr + w) as *const i32);
            // The same words of the tile PREFETCH_TILES ahead (a prefetch never faults).
            let ahead = rows.wrapping_add((l + PREFETCH_TILES * LANES) * wpr + w);
            _mm_prefetch::<_MM_HINT_T1>(ahead as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(LANES - 1) as *const i8);
        }
        let m = transpose(m);
        for (j, &word) in m.iter().enumerate().take(n) {
            let t = tables.add((w + j) * 128);
            let mut s = word;
            for k in 0..8 {
                // vpermps reads only the low 4 bits of each lane's index.
                let v = _mm512_permutexvar_ps(s, _mm512_loadu_ps(t.add(16 * k)));
                acc[k & 3] = _mm512_add_ps(acc[k & 3], v);
                s = _mm512_srli_epi32::<4>(s);
            }
        }
        w += LANES;
    }
    let total = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_storeu_ps(sums, _mm512_add_ps(_mm512_loadu_ps(sums), total));
}

/// The AVX2 tile, 8 output rows: `sums[l] += Σ_{w0 ≤ w < w1} Σ_k T[w, k][(S[l, w] >> 2k) & 3]`
/// for lanes l < `lanes`, in four accumulators (group k goes to accumulator k mod 4), summed as
/// (a0 + a1) + (a2 + a3). The sign words come 8 per row and are transposed in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2(rows: *const u32, wpr: usize, lanes: usize, w0: usize, w1: usize, tables: *const f32, sums: *mut f32) {
    use std::arch::x86_64::*;
    const FLOATS: usize = Lookup::Avx2.floats_per_word();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut w = w0;
    while w < w1 {
        let n = (w1 - w).min(8);
        let valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        let mut m = [_mm256_setzero_si256(); 8];
        for (l, v) in m.iter_mut().enumerate().take(lanes) {
            *v = _mm256_maskload_epi32(rows.add(l * wpr + w) as *const i32, valid);
            // The same words of the rows AVX2_PREFETCH_TILES × 16 further on (a prefetch never
            // faults).
            _mm_prefetch::<_MM_HINT_T0>(rows.wrapping_add((l + AVX2_PREFETCH_TILES * LANES) * wpr + w) as *const i8);
        }
        let m = transpose8(m);
        for (j, &word) in m.iter().enumerate().take(n) {
            let t = tables.add((w + j) * FLOATS);
            let mut s = word;
            for k in 0..Lookup::Avx2.groups() {
                // The table in both halves (it starts on 16 bytes: SumTables keeps quads);
                // vpermilps reads only the low 2 bits of each lane's index, within its half.
                let table = _mm256_broadcast_ps(&*(t.add(4 * k) as *const __m128));
                let v = _mm256_permutevar_ps(table, s);
                acc[k & 3] = _mm256_add_ps(acc[k & 3], v);
                s = _mm256_srli_epi32::<2>(s);
            }
        }
        w += 8;
    }
    let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_loadu_ps(sums), total));
}

/// 8 × 8 words: row l's word j → register j, lane l (32-bit then 64-bit interleaves inside the
/// 128-bit halves, then the halves exchanged). Inlined into AVX2 code only.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn transpose8(m: [std::arch::x86_64::__m256i; 8]) -> [std::arch::x86_64::__m256i; 8] {
    use std::arch::x86_64::*;
    let mut t = [_mm256_setzero_si256(); 8];
    for i in 0..4 {
        t[2 * i] = _mm256_unpacklo_epi32(m[2 * i], m[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(m[2 * i], m[2 * i + 1]);
    }
    // u[4h + e], half q: word 4q + e of rows 4h..4h + 4.
    let mut u = [_mm256_setzero_si256(); 8];
    for h in 0..2 {
        u[4 * h] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    let mut out = [_mm256_setzero_si256(); 8];
    for e in 0..4 {
        out[e] = _mm256_permute2x128_si256::<0x20>(u[e], u[4 + e]);
        out[4 + e] = _mm256_permute2x128_si256::<0x31>(u[e], u[4 + e]);
    }
    out
}

/// 16 × 16 words: row l's word j → register j, lane l. 32-bit then 64-bit interleaves inside
/// 128-bit chunks, then two rounds of chunk shuffles. Inlined into AVX-512 code only.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn transpose(m: [std::arch::x86_64::__m512i; LANES]) -> [std::arch::x86_64::__m512i; LANES] {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_si512(); LANES];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(m[2 * i], m[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(m[2 * i], m[2 * i + 1]);
    }
    // u[4i + e], chunk q: word 4q + e of rows 4i..4i + 4.
    let mut u = [_mm512_setzero_si512(); LANES];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    let mut out = [_mm512_setzero_si512(); LANES];
    for e in 0..4 {
        let (a, b, c, d) = (u[e], u[4 + e], u[8 + e], u[12 + e]);
        let (ab01, ab23) = (_mm512_shuffle_i32x4::<0x44>(a, b), _mm512_shuffle_i32x4::<0xee>(a, b));
        let (cd01, cd23) = (_mm512_shuffle_i32x4::<0x44>(c, d), _mm512_shuffle_i32x4::<0xee>(c, d));
        out[e] = _mm512_shuffle_i32x4::<0x88>(ab01, cd01);
        out[4 + e] = _mm512_shuffle_i32x4::<0xdd>(ab01, cd01);
        out[8 + e] = _mm512_shuffle_i32x4::<0x88>(ab23, cd23);
        out[12 + e] = _mm512_shuffle_i32x4::<0xdd>(ab23, cd23);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{random, weight};
    use delta_format::ScaleMode;
    use proptest::prelude::*;

    /// The tile arithmetic lane by lane in plain code: same lookups, same order of additions.
    fn lane_sums(words: &[u32], wpr: usize, i: usize, tables: &SumTables) -> f32 {
        let l = tables.lookup;
        let mut total = 0f32;
        for w0 in (0..wpr).step_by(BLOCK_WORDS) {
            let mut acc = [0f32; 4];
            for w in w0..(w0 + BLOCK_WORDS).min(wpr) {
                let word = words[i * wpr + w];
                for k in 0..l.groups() {
                    let entry = (word >> (l.bits() * k)) as usize & (l.entries() - 1);
                    acc[k & 3] += tables.floats()[w * l.floats_per_word() + l.entries() * k + entry];
                }
            }
            total += (acc[0] + acc[1]) + (acc[2] + acc[3]);
        }
        total
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn table_sums_are_the_signed_sums(out in 1usize..50, inp in 1usize..4700, seed in any::<u64>()) {
            let w = weight(out, inp, ScaleMode::Scalar, seed);
            let z = random(inp, seed ^ 1);
            let wpr = w.signs.words_per_row();
            // A task that starts mid-matrix, as the decode pass splits them.
            let i0 = out / 3;
            for l in [Lookup::Avx512, Lookup::Avx2] {
                let tables = SumTables::with(l, &z, wpr);
                // The vector pass needs the lookup's instructions (an AVX-512 CPU runs both); without
                // them the tables are still checked through the plain lane arithmetic.
                let runs = supports(l);
                let mut sums = vec![0f32; (out - i0).next_multiple_of(LANES)];
                if runs {
                    add_sums(w.signs.words(), wpr, i0, out, &tables, &mut sums);
                }
                for i in i0..out {
                    let lane = lane_sums(w.signs.words(), wpr, i, &tables);
                    // Bit for bit the lane arithmetic, whatever tile the row falls in…
                    if runs {
                        prop_assert_eq!(sums[i - i0].to_bits(), lane.to_bits(), "{:?} row {}", l, i);
                    }
                    // …and the signed sum itself, against f64. The f32 running sums round in
                    // proportion to their size: about √inp for random signs, but up to Σ|z| for a
                    // row whose signs follow z's (row 0: `random` draws both from one sequence).
                    let want: f64 = (0..inp).map(|j| if (w.signs.row(i)[j / 32] >> (j % 32)) & 1 == 1 { z[j] as f64 } else { -(z[j] as f64) }).sum();
                    let root = (inp as f64).sqrt().max(1.0);
                    prop_assert!((lane as f64 - want).abs() <= 1e-5 * (root + want.abs()), "{:?} row {}: {} vs {}", l, i, lane, want);
                }
            }
        }
    }
}
