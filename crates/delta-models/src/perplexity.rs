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
    /// Standard error of `mean_nll`, with the windows as the independent samples (tokens inside a
    /// window are not independent of each other); NaN with one window.
    pub nll_std_error: f64,
    pub windows: usize,
    pub predicted_tokens: usize,
    /// Mean NLL of each window's predicted tokens, in window order: two models evaluated on the
    /// same text pair up window by window (see [`paired_difference`]).
    pub window_nll: Vec<f64>,
    /// With a teacher: mean KL(teacher ‖ model) of the next-token distributions over the same
    /// predicted positions, in nats.
    pub kl_to_teacher: Option<f64>,
    /// With a teacher: its own mean NLL on the same tokens, and `mean_nll` minus it with the
    /// standard error of that difference, paired window by window.
    pub gap_to_teacher: Option<PairedDifference>,
}

/// The mean of `a − b` over paired samples and its standard error.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PairedDifference {
    /// Mean of `b` (the reference).
    pub reference_mean: f64,
    pub difference: f64,
    pub std_error: f64,
}

/// Mean and standard error of `a[i] − b[i]` (`a`, `b` equally long; the error is NaN with fewer
/// than 2 samples); `reference_mean` is `b`'s mean.
pub fn paired_difference(a: &[f64], b: &[f64]) -> PairedDifference {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let (difference, std_error) = mean_and_std_error(&d);
    PairedDifference { reference_mean: b.iter().sum::<f64>() / b.len() as f64, difference, std_error }
}

fn mean_and_std_error(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
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
    let (mut window_nll, mut teacher_nll, mut kl, mut count) = (Vec::new(), Vec::new(), 0f64, 0usize);
    for (k, chunk) in windows.chunks(batch).enumerate() {
        let inputs: Vec<Vec<u32>> = chunk.iter().map(|w| w[..window].to_vec()).collect();
        let targets: Vec<u32> = chunk.iter().flat_map(|w| w[1..].iter().copied()).collect();
        let rows = targets.len();
        let logits = model.forward(&inputs)?.reshape([rows, vocab]);
        let teacher_logits = teacher.map(|t| t.forward(&inputs)).transpose()?.map(|t| t.reshape([rows, vocab]));
        let scores = host::with_values(&logits, |p| match &teacher_logits {
            Some(t) => host::with_values(t, |q| token_scores(p, Some(q), &targets, vocab)),
            None => token_scores(p, None, &targets, vocab),
        });
        for w in scores.chunks(window) {
            window_nll.push(w.iter().map(|s| s.nll).sum::<f64>() / window as f64);
            teacher_nll.push(w.iter().map(|s| s.teacher_nll).sum::<f64>() / window as f64);
            kl += w.iter().map(|s| s.kl).sum::<f64>();
        }
        count += rows;
        progress((k * batch + chunk.len()).min(windows.len()), windows.len());
    }
    // Every window predicts `window` tokens, so the mean over windows is the mean over tokens.
    let (mean_nll, nll_std_error) = mean_and_std_error(&window_nll);
    let gap_to_teacher = teacher.map(|_| paired_difference(&window_nll, &teacher_nll));
    let kl_to_teacher = teacher.map(|_| kl / count as f64);
    Ok(Perplexity { ppl: mean_nll.exp(), mean_nll, nll_std_error, windows: windows.len(), predicted_tokens: count, window_nll, kl_to_teacher, gap_to_teacher })
}

/// One predicted token: −log p(target) under the model, and with teacher logits −log q(target)
/// and KL(q ‖ p); zeros without a teacher.
struct TokenScore {
    nll: f64,
    teacher_nll: f64,
    kl: f64,
}

/// The [`TokenScore`] of every row of `p` (logits `[rows, vocab]`), with teacher logits `q`
/// when given; the rows split over the cores.
fn token_scores(p: &[f32], q: Option<&[f32]>, targets: &[u32], vocab: usize) -> Vec<TokenScore> {
    let row = |r: usize| {
        let pr = &p[r * vocab..][..vocab];
        let (_, lse_p) = host::logsumexp(pr);
        let nll = lse_p - pr[targets[r] as usize] as f64;
        let (teacher_nll, kl) = q.map_or((0.0, 0.0), |q| {
            let qr = &q[r * vocab..][..vocab];
            let (_, lse_q) = host::logsumexp(qr);
            let kl = qr.iter().zip(pr).map(|(&a, &b)| {
                let lq = a as f64 - lse_q;
                lq.exp() * (lq - (b as f64 - lse_p))
            }).sum::<f64>();
            (lse_q - qr[targets[r] as usize] as f64, kl)
        });
        TokenScore { nll, teacher_nll, kl }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(targets.len()).max(1);
    let per = targets.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = (0..threads).map(|t| s.spawn(move || (t * per..((t + 1) * per).min(targets.len())).map(row).collect::<Vec<_>>())).collect();
        parts.into_iter().flat_map(|h| h.join().expect("a perplexity worker panicked")).collect()
    })
}
