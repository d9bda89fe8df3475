//! Perplexity, with the protocol of the fixtures' `results.json`:
//! the text is split on `<|endoftext|>`, pieces are stripped and empty ones skipped, each is
//! encoded without special tokens and followed by token 0 (`<|endoftext|>`), all concatenated;
//! non-overlapping windows of `window + 1` tokens step by `window`, a last partial window is
//! dropped; ppl = exp(mean NLL of the `window` predicted tokens of every window).

use burn::tensor::backend::Backend;

use crate::error::ModelError;
use crate::host;
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;

pub const DOCUMENT_SEPARATOR: &str = "<|endoftext|>";

/// The token stream the protocol evaluates.
pub fn token_stream(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, ModelError> {
    let py_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    let mut ids = Vec::new();
    for piece in text.split(DOCUMENT_SEPARATOR).map(|p| p.trim_matches(py_space)).filter(|p| !p.is_empty()) {
        ids.extend(tok.encode(piece, false)?);
        ids.push(0);
    }
    Ok(ids)
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub mean_nll: f64,
    pub windows: usize,
    pub predicted_tokens: usize,
    /// With a teacher: mean KL(teacher ‖ model) of the next-token distributions over the same
    /// predicted positions, in nats.
    pub kl_to_teacher: Option<f64>,
}

/// Perplexity of `model` over `ids` in windows of `window` predicted tokens, `batch` windows per
/// forward. `progress(done, total)` is called after each batch.
pub fn perplexity<B: Backend>(
    model: &Llama<B>,
    teacher: Option<&Llama<B>>,
    ids: &[u32],
    window: usize,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity, ModelError> {
    if window == 0 || batch == 0 {
        return Err(ModelError::Input("window and batch must be at least 1".into()));
    }
    let windows: Vec<&[u32]> = ids.windows(window + 1).step_by(window).collect();
    if windows.is_empty() {
        return Err(ModelError::Input(format!("the text has {} tokens, fewer than one window of {}", ids.len(), window + 1)));
    }
    let vocab = model.cfg.vocab_size;
    if let Some(t) = teacher.filter(|t| t.cfg.vocab_size != vocab) {
        return Err(ModelError::Input(format!("the teacher's vocabulary has {} tokens, the model's {vocab}", t.cfg.vocab_size)));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(ModelError::Input(format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    let (mut total, mut count, mut kl) = (0f64, 0usize, 0f64);
    for (k, chunk) in windows.chunks(batch).enumerate() {
        let inputs: Vec<Vec<u32>> = chunk.iter().map(|w| w[..window].to_vec()).collect();
        let targets: Vec<u32> = chunk.iter().flat_map(|w| w[1..].iter().copied()).collect();
        let rows = targets.len();
        let logits = model.forward(&inputs)?.reshape([rows, vocab]);
        let teacher_logits = teacher.map(|t| t.forward(&inputs)).transpose()?.map(|t| t.reshape([rows, vocab]));
        let (nll, kl_sum) = host::with_values(&logits, |p| match &teacher_logits {
            Some(t) => host::with_values(t, |q| nll_and_kl(p, Some(q), &targets, vocab)),
            None => nll_and_kl(p, None, &targets, vocab),
        });
        (total, kl, count) = (total + nll, kl + kl_sum, count + rows);
        progress((k * batch + chunk.len()).min(windows.len()), windows.len());
    }
    let mean_nll = total / count as f64;
    let kl_to_teacher = teacher.map(|_| kl / count as f64);
    Ok(Perplexity { ppl: mean_nll.exp(), mean_nll, windows: windows.len(), predicted_tokens: count, kl_to_teacher })
}

/// Σ −log p(target) over the rows of `p` (logits `[rows, vocab]`), and with teacher logits `q`
/// Σ KL(q ‖ p) over the same rows; the rows split over the cores.
fn nll_and_kl(p: &[f32], q: Option<&[f32]>, targets: &[u32], vocab: usize) -> (f64, f64) {
    let row = |r: usize| {
        let pr = &p[r * vocab..][..vocab];
        let (_, lse_p) = host::logsumexp(pr);
        let nll = lse_p - pr[targets[r] as usize] as f64;
        let kl = q.map_or(0.0, |q| {
            let qr = &q[r * vocab..][..vocab];
            let (_, lse_q) = host::logsumexp(qr);
            qr.iter().zip(pr).map(|(&a, &b)| {
                let lq = a as f64 - lse_q;
                lq.exp() * (lq - (b as f64 - lse_p))
            }).sum::<f64>()
        });
        (nll, kl)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(targets.len()).max(1);
    let per = targets.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = (0..threads).map(|t| s.spawn(move || (t * per..((t + 1) * per).min(targets.len())).map(row).fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1)))).collect();
        parts.into_iter().map(|h| h.join().expect("a perplexity worker panicked")).fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    })
}
