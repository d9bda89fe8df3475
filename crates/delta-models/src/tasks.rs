//! Zero-shot multiple-choice scoring: the log-likelihood of each choice's continuation given its
//! context, the way lm-evaluation-harness builds loglikelihood requests.
//!
//! Tokenisation ([`encode_request`]): trailing whitespace of the context moves to the start of the
//! continuation; the context and the whole string are encoded (no special tokens) and the
//! continuation's tokens are the whole's tokens after the context's count. A continuation's
//! log-likelihood is the sum, over its tokens, of the log-softmax of the logits at the position
//! before each token.
//!
//! Scoring a document ([`score_choices`]): the token prefix every choice shares is run once
//! through the model into a KV cache; the cache is repeated for the choices, whose remaining
//! tokens go through as one batch (right-padded: causal attention never lets padding reach the
//! positions that are read).

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;

use crate::error::ModelError;
use crate::llama::{KvCache, Llama};
use crate::tokenizer::Tokenizer;

/// One choice, as token ids: its context and its continuation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedChoice {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// A continuation's score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChoiceScore {
    /// Σ log p(token | everything before it) over the continuation's tokens.
    pub loglik: f64,
    /// Whether every continuation token is the argmax at its position.
    pub greedy: bool,
}

/// Token ids of a loglikelihood request (see the module docs). An empty context becomes
/// `empty_context` (the end-of-text token), so the first continuation token has a position to be
/// predicted from.
pub fn encode_request(tok: &Tokenizer, context: &str, continuation: &str, empty_context: u32) -> Result<EncodedChoice, ModelError> {
    let trimmed = context.trim_end();
    let (context, continuation) = (trimmed, format!("{}{continuation}", &context[trimmed.len()..]));
    let whole = tok.encode(&format!("{context}{continuation}"), false)?;
    let ctx = tok.encode(context, false)?;
    let n = ctx.len().min(whole.len());
    let (mut context, continuation) = (whole[..n].to_vec(), whole[n..].to_vec());
    if continuation.is_empty() {
        return Err(ModelError::Input("a request with an empty continuation".into()));
    }
    if context.is_empty() {
        context.push(empty_context);
    }
    Ok(EncodedChoice { context, continuation })
}

/// Scores every choice of one document. Choices may have different contexts (Winogrande); the
/// longest token prefix they share (at most the shortest context) is computed once.
pub fn score_choices<B: Backend>(model: &Llama<B>, choices: &[EncodedChoice]) -> Result<Vec<ChoiceScore>, ModelError> {
    if choices.is_empty() {
        return Ok(Vec::new());
    }
    let full: Vec<Vec<u32>> = choices.iter().map(|c| [c.context.as_slice(), &c.continuation].concat()).collect();
    if choices.iter().any(|c| c.context.is_empty() || c.continuation.is_empty()) {
        return Err(ModelError::Input("every choice needs a context and a continuation".into()));
    }
    // The shared prefix (possibly empty), at most the shortest context, so every choice has tokens
    // after it.
    let limit = choices.iter().map(|c| c.context.len()).min().unwrap_or(0);
    let prefix = (0..limit).take_while(|&k| full.iter().all(|f| f[k] == full[0][k])).count();
    let mut cache = KvCache::new(model.layers.len());
    // The prefix's last logits predict the token at index `prefix` of every choice.
    let first = if prefix > 0 {
        let first = log_softmax(model.step(&[full[0][..prefix].to_vec()], &mut cache)?, 1);
        first.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| ModelError::Input(format!("{e:?}")))?
    } else {
        Vec::new()
    };
    let rest_len = full.iter().map(|f| f.len() - prefix).max().unwrap_or(0);
    let vocab = model.cfg.vocab_size;
    let rows: Vec<Vec<u32>> = full
        .iter()
        .map(|f| {
            let mut r = f[prefix..].to_vec();
            r.resize(rest_len, 0);
            r
        })
        .collect();
    let mut cache = cache.repeat(rows.len());
    let logp = log_softmax(model.step_all(&rows, &mut cache)?, 2);
    let logp = logp.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| ModelError::Input(format!("{e:?}")))?;
    Ok(full
        .iter()
        .zip(choices)
        .enumerate()
        .map(|(r, (f, c))| {
            let mut score = ChoiceScore { loglik: 0.0, greedy: true };
            for k in c.context.len()..f.len() {
                // Log-probabilities at position k − 1, which predicts token k.
                let row = if k == prefix { &first[..] } else { &logp[(r * rest_len + (k - prefix - 1)) * vocab..][..vocab] };
                let v = row[f[k] as usize];
                score.loglik += v as f64;
                score.greedy &= row.iter().all(|&o| o <= v);
            }
            score
        })
        .collect())
}
