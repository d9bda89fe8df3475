//! Deterministic inputs shared by the kernel tests (unit, CubeCL) and the Fig. 4 benches (CPU here,
//! GPU in `delta-models/benches/fig4_gpu.rs`).
#![allow(dead_code)]

use std::borrow::Cow;

use delta_format::{CompressedWeight, ScaleMode, SignMask};

/// `n` values in [−1, 1) from an xorshift stream.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A compressed `[out, inp]` weight of `mode` with random signs and positive scales.
pub fn weight(out: usize, inp: usize, mode: ScaleMode, seed: u64) -> CompressedWeight<'static> {
    let signs = SignMask::from_deltas(out, inp, &random(out * inp, seed));
    let n = mode.scale_len(out, inp).unwrap();
    let scales: Vec<f32> = random(n, seed ^ 7).iter().map(|v| v.abs() + 0.01).collect();
    CompressedWeight { name: format!("w{seed}").into(), mode, signs, scales: scales.into() }
}

/// A Fig. 4 delta: `[n, n]`, per-output scales, random signs drawn directly as words (quick at
/// n = 8192).
pub fn fig4_delta(n: usize, seed: u64) -> CompressedWeight<'static> {
    let words = n * n.div_ceil(32);
    let mut s = seed | 1;
    let bits: Vec<u32> = (0..words)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u32
        })
        .collect();
    CompressedWeight {
        name: Cow::Owned(format!("d{seed}")),
        mode: ScaleMode::PerOutput,
        signs: SignMask::new(n, n, Cow::Owned(bits)).expect("whole words"),
        scales: Cow::Owned(random(n, seed ^ 3).iter().map(|v| v.abs() * 1e-3).collect()),
    }
}

/// The Fig. 4 sizes N: `FIG4_SIZES` (comma-separated), default 1024, 2048, 4096, 8192.
pub fn fig4_sizes() -> Vec<usize> {
    std::env::var("FIG4_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1024, 2048, 4096, 8192])
}
