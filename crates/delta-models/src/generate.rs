//! Token generation with a KV cache: one prefill over the prompt, then one position per token,
//! greedy or sampled with a temperature.

use std::time::Instant;

use burn::tensor::backend::Backend;

use crate::error::ModelError;
use crate::llama::{KvCache, Llama};

/// How the next token is chosen.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// 0 picks the most likely token (ties: the lowest id); above 0, tokens are drawn from
    /// softmax(logits / temperature).
    pub temperature: f32,
    /// Nucleus sampling: draw only among the most likely tokens whose probabilities (after the
    /// temperature) first add up to at least this much; 1 keeps every token.
    pub top_p: f32,
    /// Seed of the sampling stream (the same seed gives the same text).
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling { temperature: 0.0, top_p: 1.0, seed: 0 }
    }

    /// Refuses a temperature that is negative or not finite, and a `top_p` outside (0, 1].
    pub fn check(&self) -> Result<(), ModelError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::Input(format!("temperature {} is not a finite number ≥ 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Input(format!("top_p {} is not in (0, 1]", self.top_p)));
        }
        Ok(())
    }
}

/// What a generation did and how fast.
#[derive(Clone, Debug, Default)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Whether it ended on a stop token (not on the token limit).
    pub stopped: bool,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl Generation {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-9)
    }

    /// Tokens decoded after the first (which comes out of the prefill) per second.
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

/// Most new tokens [`generate`] makes KV cache room for at once, within the model's context (a
/// longer generation grows the cache by doubling).
const ROOM_AHEAD: usize = 8192;

/// Generates up to `max_new` tokens after `prompt`, ending early on any of `stop` (which is kept
/// as the last token). `on_token` sees every other token as it comes; returning false stops.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    stop: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generation, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt has no tokens".into()));
    }
    sampling.check()?;
    let mut g = Generation { prompt_tokens: prompt.len(), ..Default::default() };
    let mut rng = SplitMix(sampling.seed);
    let room = prompt.len() + max_new.min(ROOM_AHEAD);
    let mut cache = KvCache::with_room(model.layers.len(), model.cfg.max_position_embeddings.map_or(room, |context| room.min(context)));
    let started = Instant::now();
    let mut input = prompt.to_vec();
    while g.tokens.len() < max_new {
        let logits = model.step(&[input], &mut cache)?;
        let logits = logits.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| ModelError::Input(format!("{e:?}")))?;
        let next = pick(&logits, &sampling, &mut rng)?;
        if g.tokens.is_empty() {
            g.prefill_seconds = started.elapsed().as_secs_f64();
        }
        g.tokens.push(next);
        if stop.contains(&next) {
            g.stopped = true;
            break;
        }
        if !on_token(next) {
            break;
        }
        input = vec![next];
    }
    g.decode_seconds = started.elapsed().as_secs_f64() - g.prefill_seconds;
    Ok(g)
}

/// Chooses a token from one row of logits (`sampling`'s seed is not used: the stream is `rng`).
pub fn pick(logits: &[f32], sampling: &Sampling, rng: &mut SplitMix) -> Result<u32, ModelError> {
    if let Some(i) = logits.iter().position(|x| x.is_nan()) {
        return Err(ModelError::Input(format!("the model produced a NaN logit (token {i})")));
    }
    let argmax = || logits.iter().enumerate().fold(0, |best, (i, &x)| if x > logits[best] { i } else { best });
    if sampling.temperature == 0.0 {
        return Ok(argmax() as u32);
    }
    let max = logits[argmax()] as f64;
    let weights: Vec<f64> = logits.iter().map(|&x| ((x as f64 - max) / sampling.temperature as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    // The candidates, most likely first when a nucleus is cut (ties: lower id first).
    let mut order: Vec<u32> = (0..weights.len() as u32).collect();
    let mut mass = total;
    if sampling.top_p < 1.0 {
        order.sort_unstable_by(|&a, &b| weights[b as usize].total_cmp(&weights[a as usize]).then(a.cmp(&b)));
        let (mut kept, mut sum) = (0, 0.0);
        while kept < order.len() && (kept == 0 || sum < sampling.top_p as f64 * total) {
            sum += weights[order[kept] as usize];
            kept += 1;
        }
        order.truncate(kept);
        mass = sum;
    }
    let mut target = rng.next_f64() * mass;
    for &i in &order {
        target -= weights[i as usize];
        if target < 0.0 {
            return Ok(i);
        }
    }
    Ok(order[0])
}

/// A chosen token's log-probability under the model (log-softmax of its logits at temperature 1,
/// before any nucleus cut), with the most likely tokens of the same row.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// The `top` most likely tokens and their log-probabilities, most likely first (ties: lower id).
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities of `chosen` and of the `top` most likely tokens in one row of logits
/// (computed in f64).
pub fn logprobs(logits: &[f32], chosen: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    let at = |i: u32| (logits[i as usize] as f64 - lse) as f32;
    let better = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(ids.len());
    if top > 0 && top < ids.len() {
        ids.select_nth_unstable_by(top - 1, better);
    }
    ids.truncate(top);
    ids.sort_unstable_by(better);
    TokenLogprobs { logprob: at(chosen), top: ids.into_iter().map(|i| (i, at(i))).collect() }
}

/// SplitMix64: a small, seedable stream for sampling.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_with_the_top_tokens_in_order() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let lp = logprobs(&logits, 4, 3);
        // By hand: log-softmax is x − ln Σ eˣ.
        let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        assert!((lp.logprob as f64 - (0.5 - lse)).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 0]);
        for (i, v) in &lp.top {
            assert!((*v as f64 - (logits[*i as usize] as f64 - lse)).abs() < 1e-6);
        }
        assert!(logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(logprobs(&logits, 0, 9).top.len(), 5);
        // Large logits do not overflow.
        assert!((logprobs(&[1000.0, 1000.0], 0, 0).logprob - (-std::f32::consts::LN_2)).abs() < 1e-6);
    }

    #[test]
    fn greedy_takes_the_first_largest_logit() {
        let mut rng = SplitMix(1);
        assert_eq!(pick(&[0.0, 3.0, -1.0, 3.0], &Sampling::greedy(), &mut rng).unwrap(), 1);
        assert!(pick(&[0.0, f32::NAN], &Sampling::greedy(), &mut rng).is_err());
    }

    fn at(temperature: f32, top_p: f32) -> Sampling {
        Sampling { temperature, top_p, seed: 0 }
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // logits ln 1, ln 2, ln 7 at T = 1 -> probabilities 0.1, 0.2, 0.7.
        let logits = [0f32, 2f32.ln(), 7f32.ln()];
        let mut rng = SplitMix(42);
        let mut counts = [0usize; 3];
        let n = 100_000;
        for _ in 0..n {
            counts[pick(&logits, &at(1.0, 1.0), &mut rng).unwrap() as usize] += 1;
        }
        for (c, p) in counts.iter().zip([0.1, 0.2, 0.7]) {
            let f = *c as f64 / n as f64;
            assert!((f - p).abs() < 0.005, "{counts:?}");
        }
        // T = 0.5 squares the odds: 1 : 4 : 49.
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[pick(&logits, &at(0.5, 1.0), &mut rng).unwrap() as usize] += 1;
        }
        assert!((counts[2] as f64 / n as f64 - 49.0 / 54.0).abs() < 0.005, "{counts:?}");
    }

    #[test]
    fn top_p_draws_from_the_nucleus_only() {
        // Probabilities 0.1, 0.2, 0.7 (token 2 first): top_p 0.7 keeps token 2 alone; 0.8 keeps
        // tokens 2 and 1, drawn 7 : 2; 1 keeps all three.
        let logits = [0f32, 2f32.ln(), 7f32.ln()];
        let mut rng = SplitMix(7);
        let n = 100_000;
        let draw = |top_p: f32, rng: &mut SplitMix| {
            let mut counts = [0usize; 3];
            for _ in 0..n {
                counts[pick(&logits, &at(1.0, top_p), rng).unwrap() as usize] += 1;
            }
            counts
        };
        assert_eq!(draw(0.7, &mut rng), [0, 0, n]);
        assert_eq!(draw(0.01, &mut rng), [0, 0, n]);
        let counts = draw(0.8, &mut rng);
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!((counts[1] as f64 / n as f64 - 2.0 / 9.0).abs() < 0.005, "{counts:?}");
        assert!(draw(1.0, &mut rng)[0] > 9_000);
        for bad in [at(1.0, 0.0), at(1.0, 1.5), at(1.0, f32::NAN), at(-1.0, 1.0), at(f32::INFINITY, 1.0)] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
