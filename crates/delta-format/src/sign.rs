//! Sign masks: one bit per weight, packed into little-endian `u32` words, row by row.
//!
//! Row `i` of a `[rows, cols]` weight takes `ceil(cols / 32)` words; bit `b` of word `w` is the
//! sign of column `32 w + b` (least significant bit first). A set bit means the delta was
//! positive (+1); a clear bit means it was zero or negative (−1). Bits past `cols` in a row's
//! last word are padding and must be zero.

use std::borrow::Cow;

/// Words per row for a row of `cols` signs.
pub fn words_per_row(cols: usize) -> usize {
    cols.div_ceil(32)
}

/// Packs the signs of `deltas` (one row) into `out`, which must hold `words_per_row(len)` words.
/// Padding bits come out zero.
pub fn pack_row(deltas: &[f32], out: &mut [u32]) {
    assert_eq!(out.len(), words_per_row(deltas.len()), "pack_row: wrong output length");
    for (word, chunk) in out.iter_mut().zip(deltas.chunks(32)) {
        let mut w = 0u32;
        for (b, &d) in chunk.iter().enumerate() {
            w |= ((d > 0.0) as u32) << b;
        }
        *word = w;
    }
}

/// The mask of bits that may be set in the last word of a row of `cols` columns.
pub fn last_word_mask(cols: usize) -> u32 {
    match cols % 32 {
        0 => u32::MAX,
        r => (1u32 << r) - 1,
    }
}

/// A `[rows, cols]` sign mask, borrowed from an artifact or owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignMask<'a> {
    rows: usize,
    cols: usize,
    words: Cow<'a, [u32]>,
}

impl<'a> SignMask<'a> {
    /// Wraps packed words; `None` if their count does not match the shape.
    pub fn new(rows: usize, cols: usize, words: Cow<'a, [u32]>) -> Option<Self> {
        (rows.checked_mul(words_per_row(cols)) == Some(words.len())).then_some(SignMask { rows, cols, words })
    }

    /// Packs a row-major `[rows, cols]` delta.
    pub fn from_deltas(rows: usize, cols: usize, deltas: &[f32]) -> SignMask<'static> {
        assert_eq!(deltas.len(), rows * cols);
        let wpr = words_per_row(cols);
        let mut words = vec![0u32; rows * wpr];
        if cols > 0 {
            for (row, out) in deltas.chunks(cols).zip(words.chunks_mut(wpr.max(1))) {
                pack_row(row, out);
            }
        }
        SignMask { rows, cols, words: Cow::Owned(words) }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn words_per_row(&self) -> usize {
        words_per_row(self.cols)
    }

    pub fn words(&self) -> &[u32] {
        &self.words
    }

    pub fn row(&self, i: usize) -> &[u32] {
        let w = self.words_per_row();
        &self.words[i * w..(i + 1) * w]
    }

    /// True if the delta at `(i, j)` was positive.
    pub fn is_positive(&self, i: usize, j: usize) -> bool {
        (self.row(i)[j / 32] >> (j % 32)) & 1 == 1
    }

    /// `+1.0` or `-1.0`.
    pub fn sign(&self, i: usize, j: usize) -> f32 {
        if self.is_positive(i, j) {
            1.0
        } else {
            -1.0
        }
    }

    /// First row whose padding bits are not all zero.
    pub fn first_bad_padding(&self) -> Option<usize> {
        let wpr = self.words_per_row();
        if wpr == 0 || self.cols % 32 == 0 {
            return None;
        }
        let allowed = last_word_mask(self.cols);
        (0..self.rows).find(|&i| self.words[i * wpr + wpr - 1] & !allowed != 0)
    }

    pub fn into_owned(self) -> SignMask<'static> {
        SignMask { rows: self.rows, cols: self.cols, words: Cow::Owned(self.words.into_owned()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bit_order_is_lsb_first_and_zero_is_negative() {
        let mut deltas = vec![-1.0f32; 33];
        deltas[0] = 0.5;
        deltas[31] = 2.0;
        deltas[32] = 1e-30;
        deltas[1] = 0.0;
        deltas[2] = -0.0;
        let m = SignMask::from_deltas(1, 33, &deltas);
        assert_eq!(m.words(), &[0x8000_0001, 0x1]);
        assert_eq!(m.sign(0, 1), -1.0);
        assert_eq!(m.sign(0, 32), 1.0);
        assert_eq!(m.first_bad_padding(), None);
    }

    #[test]
    fn padding_rule() {
        assert_eq!(last_word_mask(33), 1);
        assert_eq!(last_word_mask(64), u32::MAX);
        let m = SignMask::new(2, 33, Cow::Owned(vec![0, 1, 0, 3])).unwrap();
        assert_eq!(m.first_bad_padding(), Some(1));
        assert!(SignMask::new(2, 33, Cow::Owned(vec![0; 3])).is_none());
    }

    proptest! {
        #[test]
        fn pack_unpack_round_trip(rows in 1usize..5, cols in 1usize..130, seed in any::<u64>()) {
            let mut s = seed | 1;
            let deltas: Vec<f32> = (0..rows * cols).map(|_| {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                (s % 5) as f32 - 2.0
            }).collect();
            let m = SignMask::from_deltas(rows, cols, &deltas);
            prop_assert_eq!(m.words().len(), rows * cols.div_ceil(32));
            prop_assert_eq!(m.first_bad_padding(), None);
            for i in 0..rows {
                for j in 0..cols {
                    let expect = if deltas[i * cols + j] > 0.0 { 1.0 } else { -1.0 };
                    prop_assert_eq!(m.sign(i, j), expect);
                }
            }
        }
    }
}
