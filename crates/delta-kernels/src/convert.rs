//! Element conversions between checkpoint dtypes and `f32`.
//!
//! `f32 -> bf16` rounds to nearest, ties to even, exactly as PyTorch does; `f32 -> f16` uses the
//! `half` crate (also round-to-nearest-even). Decoding is exact for all three types.

use half::f16;

/// A weight element type the merge can read and write.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

/// A bf16 value as its bit pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16Bits(pub u16);

/// An f16 value as its bit pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16Bits(pub u16);

#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Round to nearest even; NaN stays a (quiet) NaN.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    let rounded = (u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((u >> 16) as u16) | 0x0040;
    // A select, not a branch, so loops over it vectorise.
    if x.is_nan() { quiet_nan } else { rounded }
}

impl WeightElem for Bf16Bits {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        Bf16Bits(f32_to_bf16(x))
    }
}

impl WeightElem for F16Bits {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::from_bits(self.0).to_f32()
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        F16Bits(f16::from_f32(x).to_bits())
    }
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

/// Views a slice of plain numbers as its bytes (little-endian host).
pub fn as_bytes<T: WeightElem>(v: &[T]) -> &[u8] {
    // SAFETY: every WeightElem is a plain 2- or 4-byte number with no padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Reinterprets 16-bit patterns as bf16 or f16 elements.
pub fn bf16_slice(bits: &[u16]) -> &[Bf16Bits] {
    // SAFETY: Bf16Bits is repr(transparent) over u16.
    unsafe { std::slice::from_raw_parts(bits.as_ptr().cast(), bits.len()) }
}

pub fn f16_slice(bits: &[u16]) -> &[F16Bits] {
    // SAFETY: F16Bits is repr(transparent) over u16.
    unsafe { std::slice::from_raw_parts(bits.as_ptr().cast(), bits.len()) }
}

/// Decodes a BF16, F16 or F32 tensor to f32 values; `None` for other dtypes.
pub fn to_f32_vec(v: &delta_format::TensorView<'_>) -> Option<Vec<f32>> {
    match v.dtype {
        delta_format::DType::BF16 => Some(v.as_u16_bits()?.iter().map(|&b| bf16_to_f32(b)).collect()),
        delta_format::DType::F16 => Some(v.as_u16_bits()?.iter().map(|&b| f16::from_bits(b).to_f32()).collect()),
        delta_format::DType::F32 => Some(v.as_f32()?.into_owned()),
        _ => None,
    }
}

/// The transpose of a row-major `[rows, cols]` matrix (`[cols, rows]`, row-major), in 32 × 32
/// blocks so that reads and writes both stay in cache, output rows split across threads. A
/// plain element-by-element transpose of a large matrix touches a new cache line per element:
/// with one, loading SmolLM2-135M (whose linear weights and head the models keep transposed) and
/// generating one token took 1.3 s, with this 0.5 s.
pub fn transpose<T: WeightElem>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    use rayon::prelude::*;
    const BLOCK: usize = 32;
    assert_eq!(v.len(), rows * cols, "transpose: {} values for [{rows}, {cols}]", v.len());
    let mut t = vec![T::from_f32(0.0); v.len()];
    if rows == 0 || cols == 0 {
        return t;
    }
    t.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(b, out)| {
        let j0 = b * BLOCK;
        let width = out.len() / rows;
        for i0 in (0..rows).step_by(BLOCK) {
            for j in j0..j0 + width {
                let row = &mut out[(j - j0) * rows..(j - j0 + 1) * rows];
                for i in i0..(i0 + BLOCK).min(rows) {
                    row[i] = v[i * cols + j];
                }
            }
        }
    });
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn transpose_moves_every_value(rows in 0usize..100, cols in 0usize..100) {
            let v: Vec<f32> = (0..rows * cols).map(|k| k as f32).collect();
            let t = transpose(&v, rows, cols);
            for i in 0..rows {
                for j in 0..cols {
                    prop_assert_eq!(t[j * rows + i], v[i * cols + j]);
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_ties_to_even() {
        // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: rounds to even (1.0).
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3F80);
        // 1.0078125 + 2^-8 is halfway between 0x3F81 and 0x3F82: rounds to even (0x3F82).
        assert_eq!(f32_to_bf16(1.0078125 + 2f32.powi(-8)), 0x3F82);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7F80);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7F80, "rounds up to infinity like torch");
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    }

    proptest! {
        #[test]
        fn bf16_matches_half_crate(bits in any::<u32>()) {
            let x = f32::from_bits(bits);
            prop_assume!(!x.is_nan());
            prop_assert_eq!(f32_to_bf16(x), half::bf16::from_f32(x).to_bits());
        }

        #[test]
        fn decode_encode_is_identity(bits in any::<u16>()) {
            let b = Bf16Bits(bits);
            prop_assume!(!b.to_f32().is_nan());
            prop_assert_eq!(Bf16Bits::from_f32(b.to_f32()), b);
            let h = F16Bits(bits);
            prop_assume!(!h.to_f32().is_nan());
            prop_assert_eq!(F16Bits::from_f32(h.to_f32()), h);
        }
    }
}
