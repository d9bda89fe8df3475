//! Perplexity, with the protocol of the fixtures' `results.json`:
//! the text is split on `<|endoftext|>`, pieces are stripped and empty ones skipped, each is
//! encoded without special tokens and followed by token 0 (`<|endoftext|>`), all concatenated;
//! non-overlapping windows of `window + 1` tokens step by `window`, a last partial window is
//! dropped; ppl = exp(mean NLL of the `window` predicted tokens of every window).

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::ModelError;
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
    let mut total = 0f64;
    let mut count = 0usize;
    let mut kl = 0f64;
    for (k, chunk) in windows.chunks(batch).enumerate() {
        let inputs: Vec<Vec<u32>> = chunk.iter().map(|w| w[..window].to_vec()).collect();
        let targets: Vec<i64> = chunk.iter().flat_map(|w| w[1..].iter().map(|&t| t as i64)).collect();
        let logits = model.forward(&inputs)?;
        let b = chunk.len();
        let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [b * window]), &model.device).reshape([b, window, 1]);
        let logp = log_softmax(logits, 2);
        if let Some(teacher) = teacher {
            let logq = log_softmax(teacher.forward(&inputs)?, 2);
            let sum = (logq.clone().exp() * (logq - logp.clone())).sum().into_data().convert::<f64>();
            kl += sum.into_vec::<f64>().map_err(|e| ModelError::Input(format!("{e:?}")))?[0];
        }
        let picked = logp.gather(2, targets);
        let values = picked.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| ModelError::Input(format!("{e:?}")))?;
        total -= values.iter().map(|&v| v as f64).sum::<f64>();
        count += values.len();
        progress((k * batch + b).min(windows.len()), windows.len());
    }
    let mean_nll = total / count as f64;
    let kl_to_teacher = teacher.map(|_| kl / count as f64);
    Ok(Perplexity { ppl: mean_nll.exp(), mean_nll, windows: windows.len(), predicted_tokens: count, kl_to_teacher })
}
