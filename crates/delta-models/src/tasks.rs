//! Zero-shot multiple-choice scoring: the log-likelihood of each choice's continuation given its
//! context, the way lm-evaluation-harness builds loglikelihood requests.
//!
//! Tokenisation ([`encode_request`]): trailing whitespace of the context moves to the start of the
//! continuation; the context and the whole string are encoded (no special tokens) and the
//! continuation's tokens are the whole's tokens after the context's count. A continuation's
//! log-likelihood is the sum, over its tokens, of the log-softmax of the logits at the position
//! before each token.
//!
//! Scoring ([`score_documents`]): each document becomes one segment of a packed batch
//! ([`Packed`]) — the token prefix its choices share once, then each choice's remaining tokens,
//! which see the prefix and themselves only (a token tree) — and many documents go through the
//! model in one forward, the LM head only at the positions that predict continuation tokens.

use burn::tensor::backend::Backend;

use crate::error::ModelError;
use crate::llama::{Llama, Packed, Segment};
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

/// Scores every choice of every document (`docs[d][c]`: document d's choice c) in one packed
/// forward. Choices may have different contexts (Winogrande); the longest token prefix they share
/// (at most the shortest context) is computed once.
pub fn score_documents<B: Backend>(model: &Llama<B>, docs: &[Vec<EncodedChoice>]) -> Result<Vec<Vec<ChoiceScore>>, ModelError> {
    if docs.is_empty() {
        return Ok(Vec::new());
    }
    let mut packed = Packed { ids: Vec::new(), positions: Vec::new(), segments: Vec::new() };
    // Per (document, choice, continuation token): the packed row that predicts it, and the token.
    let mut wanted: Vec<Vec<Vec<(usize, u32)>>> = Vec::with_capacity(docs.len());
    for choices in docs {
        if choices.is_empty() || choices.iter().any(|c| c.context.is_empty() || c.continuation.is_empty()) {
            return Err(ModelError::Input("every document needs choices, each with a context and a continuation".into()));
        }
        let full: Vec<Vec<u32>> = choices.iter().map(|c| [c.context.as_slice(), &c.continuation].concat()).collect();
        let limit = choices.iter().map(|c| c.context.len()).min().unwrap_or(0);
        let prefix = (0..limit).take_while(|&k| full.iter().all(|f| f[k] == full[0][k])).count();
        let start = packed.ids.len();
        packed.ids.extend_from_slice(&full[0][..prefix]);
        packed.positions.extend(0..prefix);
        // Where each choice's own tokens begin, relative to the segment.
        let mut own = Vec::with_capacity(full.len());
        for f in &full {
            own.push(packed.ids.len() - start);
            packed.ids.extend_from_slice(&f[prefix..]);
            packed.positions.extend(prefix..f.len());
        }
        // Token k of choice c, as an index into the segment.
        let at = |c: usize, k: usize| if k < prefix { k } else { own[c] + k - prefix };
        let len = packed.ids.len() - start;
        let mut visible = vec![false; len * len];
        for (c, f) in full.iter().enumerate() {
            for i in 0..f.len() {
                for j in 0..=i {
                    visible[at(c, i) * len + at(c, j)] = true;
                }
            }
        }
        packed.segments.push(Segment { len, visible });
        wanted.push(
            full.iter()
                .zip(choices)
                .enumerate()
                .map(|(c, (f, choice))| (choice.context.len()..f.len()).map(|k| (start + at(c, k - 1), f[k])).collect())
                .collect(),
        );
    }
    // Each row once (all choices of a document read the prefix's last row when it ends their
    // context).
    let mut rows: Vec<usize> = wanted.iter().flatten().flatten().map(|&(r, _)| r).collect();
    rows.sort_unstable();
    rows.dedup();
    let logits = model.forward_packed(&packed, &rows)?;
    let vocab = model.cfg.vocab_size;
    // log p(token) = logit − logsumexp(row), in one pass per row on the host (no softmax
    // tensors); the token is the argmax when its logit is the row's largest.
    Ok(crate::host::with_values(&logits, |values| {
        let stats: Vec<(f32, f64)> = values.chunks_exact(vocab).map(crate::host::logsumexp).collect();
        wanted
            .iter()
            .map(|choices| {
                choices
                    .iter()
                    .map(|tokens| {
                        let mut score = ChoiceScore { loglik: 0.0, greedy: true };
                        for &(r, token) in tokens {
                            let i = rows.binary_search(&r).expect("every wanted row is computed");
                            let (v, (max, lse)) = (values[i * vocab + token as usize], stats[i]);
                            score.loglik += v as f64 - lse;
                            score.greedy &= v >= max;
                        }
                        score
                    })
                    .collect()
            })
            .collect()
    }))
}
