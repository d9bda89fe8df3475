//! A layer's KV cache on the host, with room to grow: `[b, kv_heads, capacity, d]`, of which
//! positions `0..len` of each sequence and kv head are filled. A decode step writes its one new
//! position into the spare room in place; only when the room runs out are the held positions
//! moved, into a buffer of twice the capacity — so a step costs its own position, not a copy of
//! the whole cache (which at 1,516 positions of SmolLM2-135M was 70 MB per token).

/// Keys (after RoPE) and values of one layer for `len` positions of `b` sequences.
#[derive(Clone, Debug)]
pub struct HostKv {
    b: usize,
    kv_heads: usize,
    d: usize,
    len: usize,
    capacity: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl HostKv {
    /// No positions yet, for `b` sequences of `kv_heads` heads of width `d`, with room for
    /// `room` positions (0: as much as the first append needs).
    pub fn new(b: usize, kv_heads: usize, d: usize, room: usize) -> Self {
        let buffer = || vec![0f32; b * kv_heads * room * d];
        HostKv { b, kv_heads, d, len: 0, capacity: room, keys: buffer(), values: buffer() }
    }

    /// Sequences (rows of a batch).
    pub fn rows(&self) -> usize {
        self.b
    }

    /// Positions held per sequence.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Position slots per sequence and head, filled or not (the stride between kv heads is
    /// `capacity · d`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Key `j` of sequence `r`, kv head `g`.
    pub fn key(&self, r: usize, g: usize, j: usize) -> &[f32] {
        assert!(j < self.len, "key {j} of {} held", self.len);
        &self.keys[self.at(r, g, j)..][..self.d]
    }

    /// Value `j` of sequence `r`, kv head `g`.
    pub fn value(&self, r: usize, g: usize, j: usize) -> &[f32] {
        assert!(j < self.len, "value {j} of {} held", self.len);
        &self.values[self.at(r, g, j)..][..self.d]
    }

    /// Sequence `r`'s keys and values, `[kv_heads, capacity, d]` each.
    pub(super) fn sequence(&self, r: usize) -> (&[f32], &[f32]) {
        let span = self.kv_heads * self.capacity * self.d;
        (&self.keys[r * span..(r + 1) * span], &self.values[r * span..(r + 1) * span])
    }

    fn at(&self, r: usize, g: usize, j: usize) -> usize {
        ((r * self.kv_heads + g) * self.capacity + j) * self.d
    }

    /// Appends `t` positions per sequence: `keys` and `values` `[b·t, kv_heads·d]`, row `r·t + i`
    /// being position `len + i` of sequence r. Grows the room to `max(len + t, 2 · capacity)`
    /// positions when it is short (exactly `len + t` when there was none, so a cache used once
    /// wastes nothing).
    pub fn append(&mut self, keys: &[f32], values: &[f32], t: usize) {
        let (b, kv, d) = (self.b, self.kv_heads, self.d);
        assert!(keys.len() == b * t * kv * d && values.len() == keys.len(), "appending {t} positions of {b} sequences, {kv} heads of width {d}: {} keys, {} values", keys.len(), values.len());
        let s = self.len + t;
        if s > self.capacity {
            let capacity = if self.capacity == 0 { s } else { s.max(2 * self.capacity) };
            let (len, old) = (self.len, self.capacity);
            let grow = |held: &[f32]| {
                let mut all = vec![0f32; b * kv * capacity * d];
                if len > 0 {
                    for (all, held) in all.chunks_exact_mut(capacity * d).zip(held.chunks_exact(old * d)) {
                        all[..len * d].copy_from_slice(&held[..len * d]);
                    }
                }
                all
            };
            self.keys = grow(&self.keys);
            self.values = grow(&self.values);
            self.capacity = capacity;
        }
        for (r, i, g) in (0..b).flat_map(|r| (0..t).flat_map(move |i| (0..kv).map(move |g| (r, i, g)))) {
            let (to, from) = (self.at(r, g, self.len + i), (r * t + i) * kv * d + g * d);
            self.keys[to..to + d].copy_from_slice(&keys[from..from + d]);
            self.values[to..to + d].copy_from_slice(&values[from..from + d]);
        }
        self.len = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positions appended 5, then 1 at a time, then 9 (2 sequences, 3 kv heads, width 4): every
    /// key and value is where `key` / `value` find it after each append, and the room grows only
    /// when it runs out (5 → 10 → 20 → 40); a cache made with room keeps it until it is full.
    #[test]
    fn appended_positions_survive_growth() {
        let (b, kv, d) = (2, 3, 4);
        // Position p of sequence r, head g, column c: a value naming all four.
        let val = |r: usize, g: usize, p: usize, c: usize| (r * 1000 + g * 100 + p) as f32 + c as f32 / 10.0;
        let rows = |from: usize, t: usize, sign: f32| -> Vec<f32> {
            (0..b).flat_map(|r| (from..from + t).flat_map(move |p| (0..kv).flat_map(move |g| (0..d).map(move |c| sign * val(r, g, p, c))))).collect()
        };
        let mut cache = HostKv::new(b, kv, d, 0);
        let mut capacities = Vec::new();
        for t in [5, 1, 1, 1, 1, 1, 1, 9, 1] {
            let from = cache.len();
            cache.append(&rows(from, t, 1.0), &rows(from, t, -1.0), t);
            capacities.push(cache.capacity());
            let len = cache.len();
            for (r, g, p) in (0..b).flat_map(|r| (0..kv).flat_map(move |g| (0..len).map(move |p| (r, g, p)))) {
                let want: Vec<f32> = (0..d).map(|c| val(r, g, p, c)).collect();
                assert_eq!(cache.key(r, g, p), want, "key {p} of sequence {r}, head {g}");
                assert!(cache.value(r, g, p).iter().zip(&want).all(|(v, w)| *v == -w), "value {p} of sequence {r}, head {g}");
            }
        }
        assert_eq!(capacities, [5, 10, 10, 10, 10, 10, 20, 20, 40]);
        // Made with room for 12: none of the first 12 positions moves it.
        let mut cache = HostKv::new(b, kv, d, 12);
        let mut capacities = Vec::new();
        for t in [5, 1, 6, 1] {
            let from = cache.len();
            cache.append(&rows(from, t, 1.0), &rows(from, t, -1.0), t);
            capacities.push(cache.capacity());
        }
        assert_eq!(capacities, [12, 12, 12, 24]);
        assert_eq!(cache.key(1, 2, 12), (0..d).map(|c| val(1, 2, 12, c)).collect::<Vec<_>>());
    }
}
