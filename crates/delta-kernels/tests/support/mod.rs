//! Deterministic inputs shared by the kernel tests (unit, CubeCL) and the Fig. 4 bench.
#![allow(dead_code)]

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
