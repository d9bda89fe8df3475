//! Many fine-tunes on one base, decoded together.
//!
//! A [`Tenant`] is a fine-tune held as its packed delta over a base [`Llama`]: a copy of the base
//! model whose projections are `DeltaLinear`s over the base's own weight tensors (Burn tensors are
//! reference-counted, so nothing of the base is duplicated) and whose changed small tensors
//! (norms, biases) are its own. [`step_batch`] runs sequences of *different* tenants (or of the
//! base) through one forward: per projection, one base product for every row of every sequence
//! with each tenant's delta term for its rows — in one pass at decode sizes
//! (`delta_kernels::fused`), else the base product then `batched_delta_matmul_add`; on a GPU
//! backend the base GEMM then one CubeCL kernel launch per delta over its rows ([`crate::cube`]) — except that
//! a tenant's prefill chunk of more than 16 rows goes through its merged weight, as its own
//! `DeltaLinear` would; attention runs per sequence against its own KV cache. That is the
//! multi-tenant decode step of `bitdelta serve`.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use delta_format::{Checkpoint, CompressedWeight, DeltaArtifact};
use delta_kernels::gemm::batched_delta_matmul_add;

use crate::delta_linear::{DeltaLinear, Projection};
use crate::error::ModelError;
use crate::llama::{KvCache, Linear, Llama, RmsNorm, WeightT, PROJECTIONS};
use crate::weights::Weights;

/// A fine-tune resident as a packed delta over a shared base model.
pub struct Tenant<B: Backend> {
    /// The fine-tune as a model: the base's tensors wherever the delta leaves them unchanged.
    pub model: Llama<B>,
    own_head: bool,
    /// Per block and projection slot: the delta replaced this weight whole (a dense override).
    own_dense: Vec<[bool; 7]>,
    /// Bytes this tenant holds beyond the base (signs, scales, its own tensors).
    pub resident_bytes: usize,
}

impl<B: Backend> Tenant<B> {
    /// The fine-tune `delta` over `base` (loaded from `base_ckpt`). The delta's fingerprint is
    /// checked against `base_ckpt` first; a delta that changes a tensor the model does not have is
    /// an error, never ignored.
    pub fn new(base: &Llama<B>, base_ckpt: &Checkpoint, delta: &DeltaArtifact) -> Result<Self, ModelError> {
        let mut w = Weights::<B>::new(base_ckpt, Some(delta), base.device.clone())?.fused();
        if base.holds_bf16() {
            w = w.bf16_on_host();
        }
        let cfg = &base.cfg;
        let mut model = base.clone();
        let mut used = std::collections::HashSet::new();
        let mut bytes = 0usize;
        let mut own_dense = vec![[false; 7]; model.layers.len()];
        let whole = |name: &str| delta.whole_tensor(name).is_some();
        let norm = |norm: &mut RmsNorm<B>, name: String, used: &mut std::collections::HashSet<String>, bytes: &mut usize| -> Result<(), ModelError> {
            if whole(&name) {
                let dim = norm.weight.dims()[0];
                *norm = RmsNorm::load(&w, &name, dim, norm.eps)?;
                *bytes += dim * 4;
                used.insert(name);
            }
            Ok(())
        };
        for (i, block) in model.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            norm(&mut block.input_layernorm, format!("{p}.input_layernorm.weight"), &mut used, &mut bytes)?;
            norm(&mut block.post_attention_layernorm, format!("{p}.post_attention_layernorm.weight"), &mut used, &mut bytes)?;
            if let Some(n) = block.self_attn.q_norm.as_mut() {
                norm(n, format!("{p}.self_attn.q_norm.weight"), &mut used, &mut bytes)?;
            }
            if let Some(n) = block.self_attn.k_norm.as_mut() {
                norm(n, format!("{p}.self_attn.k_norm.weight"), &mut used, &mut bytes)?;
            }
            for (k, proj) in PROJECTIONS.iter().enumerate() {
                let prefix = format!("{p}.{proj}");
                let (weight, bias) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
                let mut linear = block.projections()[k].linear().clone();
                let [inp, out] = linear.weight_t.dims();
                if linear.bias.is_some() && whole(&bias) {
                    linear.bias = Some(w.vector(&bias, out)?);
                    bytes += out * 4;
                    used.insert(bias);
                }
                *block.projections_mut()[k] = if let Some(packed) = w.packed_delta(&weight) {
                    bytes += packed.signs.words().len() * 4 + packed.scales.len() * 4;
                    used.insert(weight);
                    Projection::Delta(DeltaLinear::new(linear, packed)?)
                } else if whole(&weight) {
                    linear.weight_t = w.linear_t(&weight, out, inp)?;
                    bytes += linear.weight_t.bytes();
                    own_dense[i][k] = true;
                    used.insert(weight);
                    Projection::Dense(linear)
                } else {
                    Projection::Dense(linear)
                };
            }
        }
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        norm(&mut model.norm, "model.norm.weight".into(), &mut used, &mut bytes)?;
        let tied = cfg.tie_word_embeddings && !base_ckpt.contains("lm_head.weight");
        let own_embed = whole("model.embed_tokens.weight");
        if own_embed {
            model.embed_tokens = w.embedding("model.embed_tokens.weight", vocab, hidden)?;
            bytes += model.embed_tokens.bytes();
            used.insert("model.embed_tokens.weight".to_string());
        }
        let own_head = if tied { own_embed } else { whole("lm_head.weight") };
        if own_head && tied {
            // The tied head reads the embedding matrix itself (a transposed view, no copy).
            model.lm_head_t = model.embed_tokens.head_t();
        } else if own_head {
            model.lm_head_t = w.linear_t("lm_head.weight", vocab, hidden)?;
            bytes += model.lm_head_t.bytes();
            used.insert("lm_head.weight".to_string());
        }
        let changed = delta.weights().map(|c| c.name.to_string()).chain(delta.whole_tensors().map(|(n, _)| n.to_string()));
        if let Some(name) = changed.into_iter().find(|n| !used.contains(n)) {
            return Err(ModelError::Input(format!("the delta changes `{name}`, which this {} model has no place for", cfg.model_type)));
        }
        Ok(Tenant { model, own_head, own_dense, resident_bytes: bytes })
    }
}

/// One sequence's share of a batched step: its new tokens, fed after those in its cache, through
/// its tenant's model (`None`: the base itself).
pub struct SeqStep<'a, B: Backend> {
    pub tenant: Option<&'a Tenant<B>>,
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache<B>,
}

/// Runs every sequence's new tokens (a prompt chunk or one decoded token) through its own model in
/// one pass and extends each cache; returns the logits of each sequence's last new position,
/// `[sequences, vocab]`. Per projection: one base product for all rows, then every tenant's packed
/// delta term for its rows in one batched call; attention per sequence. Each sequence gets the
/// logits [`Llama::step`] would give it on its own model (up to the rounding of the row count's
/// product path: Burn's GEMM above [`crate::host::FEW_ROWS`] rows, the in-place product below).
pub fn step_batch<B: Backend>(base: &Llama<B>, seqs: &mut [SeqStep<'_, B>]) -> Result<Tensor<B, 2>, ModelError> {
    if seqs.is_empty() {
        return Err(ModelError::Input("a batched step needs at least one sequence".into()));
    }
    let tenants: Vec<Option<&Tenant<B>>> = seqs.iter().map(|s| s.tenant).collect();
    let model = |s: usize| tenants[s].map_or(base, |t| &t.model);
    let mut spans = Vec::with_capacity(seqs.len());
    let mut rows = 0;
    for s in seqs.iter() {
        if s.ids.is_empty() {
            return Err(ModelError::Input("a sequence in a batched step has no new tokens".into()));
        }
        if s.cache.layers.len() != base.layers.len() {
            return Err(ModelError::Input(format!("a KV cache for {} layers, the model has {}", s.cache.layers.len(), base.layers.len())));
        }
        if let Some(Some(held)) = s.cache.layers.first() {
            if held.rows() != 1 {
                return Err(ModelError::Input(format!("a batched step takes one-row caches, not {}", held.rows())));
            }
        }
        if let Some(t) = s.tenant {
            if t.model.layers.len() != base.layers.len() || t.model.cfg.hidden_size != base.cfg.hidden_size {
                return Err(ModelError::Input("a tenant built on another base".into()));
            }
        }
        spans.push((rows, s.ids.len()));
        rows += s.ids.len();
    }
    if let [only] = seqs {
        // One sequence: its own model's step is the same product without the batching's copies.
        return only.tenant.map_or(base, |t| &t.model).step(&[only.ids.to_vec()], only.cache);
    }
    let hidden = base.cfg.hidden_size;
    // RMS norm of every row with its own sequence's weight: normalised once for all rows, then
    // multiplied by the weights laid out per row (the same arithmetic as `RmsNorm::forward`).
    let norm_rows = |x: Tensor<B, 2>, norm: &dyn Fn(&Llama<B>) -> &RmsNorm<B>| -> Tensor<B, 2> {
        let weights = Tensor::cat(spans.iter().enumerate().map(|(s, &(_, n))| norm(model(s)).weight.clone().unsqueeze::<2>().expand([n, hidden])).collect(), 0);
        norm(base).normalise(x) * weights
    };
    let embedded: Result<Vec<Tensor<B, 2>>, ModelError> =
        seqs.iter().enumerate().map(|(s, q)| Ok(model(s).embed(&[q.ids.to_vec()])?.reshape([q.ids.len(), hidden]))).collect();
    let mut x = Tensor::cat(embedded?, 0);
    let tables: Vec<_> = seqs.iter().map(|s| base.rope.tables::<B>(s.cache.len, s.ids.len(), &base.device)).collect();
    for i in 0..base.layers.len() {
        let n = norm_rows(x.clone(), &|m| &m.layers[i].input_layernorm);
        let project = |k: usize, x: Tensor<B, 2>| project(base, &tenants, &spans, i, k, x);
        let (q, k, v) = (project(0, n.clone()), project(1, n.clone()), project(2, n));
        let mut contexts = Vec::with_capacity(seqs.len());
        for (s, seq) in seqs.iter_mut().enumerate() {
            let (at, len) = spans[s];
            let (cos, sin) = &tables[s];
            let rows = |t: &Tensor<B, 2>| t.clone().narrow(0, at, len);
            let attention = &model(s).layers[i].self_attn;
            contexts.push(attention.attend(rows(&q), rows(&k), rows(&v), 1, cos, sin, Some(seq.cache.layer(i, attention, 1))));
        }
        let h = x + project(3, Tensor::cat(contexts, 0));
        let n = norm_rows(h.clone(), &|m| &m.layers[i].post_attention_layernorm);
        let m = project(6, crate::host::silu_mul(project(4, n.clone()), project(5, n)));
        x = h + m;
    }
    for s in seqs.iter_mut() {
        s.cache.len += s.ids.len();
    }
    let last: Vec<Tensor<B, 2>> = spans.iter().enumerate().map(|(s, &(at, n))| model(s).norm.forward(x.clone().narrow(0, at + n - 1, 1))).collect();
    // One head product for every sequence on the base's head; a tenant with its own head alone.
    let shared: Vec<usize> = (0..seqs.len()).filter(|&s| !tenants[s].is_some_and(|t| t.own_head)).collect();
    let mut logits: Vec<Option<Tensor<B, 2>>> = vec![None; seqs.len()];
    if !shared.is_empty() {
        let rows = Tensor::cat(shared.iter().map(|&s| last[s].clone()).collect(), 0);
        let y = crate::host::project(rows, &base.lm_head_t);
        for (r, &s) in shared.iter().enumerate() {
            logits[s] = Some(y.clone().narrow(0, r, 1));
        }
    }
    for (s, l) in logits.iter_mut().enumerate() {
        if l.is_none() {
            *l = Some(crate::host::project(last[s].clone(), &model(s).lm_head_t));
        }
    }
    Ok(Tensor::cat(logits.into_iter().flatten().collect(), 0))
}

/// `x·W_baseᵀ` with the delta term of every row that has one (`row_delta[r]`, an index into
/// `deltas`): one pass at decode sizes on the CPU, the CubeCL kernels on a GPU backend, else
/// Burn's GEMM for the base and then the delta terms on the host.
fn base_and_deltas<B: Backend>(x: &Tensor<B, 2>, wt: &WeightT<B>, deltas: &[&DeltaLinear<B>], row_delta: &[Option<usize>]) -> Tensor<B, 2> {
    let packed: Vec<&CompressedWeight<'static>> = deltas.iter().map(|d| &d.delta).collect();
    if let Some(y) = crate::host::few_rows(x, wt, &packed, row_delta) {
        return y;
    }
    let on_device: Vec<_> = deltas.iter().map(|d| (&d.delta, &d.device)).collect();
    if let Some(y) = wt.tensor().and_then(|t| crate::cube::base_and_deltas(x, t, &on_device, row_delta)) {
        return y;
    }
    let [rows, inp] = x.dims();
    let out = wt.dims()[1];
    let y = crate::host::project(x.clone(), wt);
    let with: Vec<usize> = (0..rows).filter(|&r| row_delta[r].is_some()).collect();
    if with.is_empty() {
        return y;
    }
    let idx: Vec<usize> = with.iter().map(|&r| row_delta[r].expect("rows with a delta")).collect();
    let mut yv = crate::host::with_values(&y, |v| v.to_vec());
    crate::host::with_values(x, |xv| {
        let xs: Vec<f32> = with.iter().flat_map(|&r| xv[r * inp..(r + 1) * inp].iter().copied()).collect();
        let mut ys: Vec<f32> = with.iter().flat_map(|&r| yv[r * out..(r + 1) * out].iter().copied()).collect();
        batched_delta_matmul_add(&packed, &idx, &xs, &mut ys).expect("shapes checked when the tenants were built");
        for (j, &r) in with.iter().enumerate() {
            yv[r * out..(r + 1) * out].copy_from_slice(&ys[j * out..(j + 1) * out]);
        }
    });
    Tensor::from_data(TensorData::new(yv, [rows, out]), &x.device())
}

/// Projection `k` of block `i` for every row: `x·W_baseᵀ` for all rows at once with the packed
/// delta terms of every tenant that has one (one pass for a decode step, else the base product
/// then one batched delta call), then per sequence a whole replacement weight where its tenant
/// has one, and its bias.
fn project<B: Backend>(base: &Llama<B>, tenants: &[Option<&Tenant<B>>], spans: &[(usize, usize)], i: usize, k: usize, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let base_linear = base.layers[i].projections()[k].linear();
    let out = base_linear.weight_t.dims()[1];
    let projection = |s: usize| tenants[s].map(|t| (t, t.model.layers[i].projections()[k]));
    let plain = (0..spans.len()).all(|s| match projection(s) {
        None => true,
        Some((t, p)) => !t.own_dense[i][k] && matches!(p, Projection::Dense(_)),
    });
    if plain {
        return base_linear.forward(x);
    }
    let wt = &base_linear.weight_t;
    // A delta's span of more than FEW_ROWS rows (a prefill chunk) gets what `DeltaLinear` gives it
    // alone: one GEMM on the merged weight (on the CPU and GPU backends; elsewhere it joins the
    // rest). The tenant's base weight is the base model's tensor.
    let merged: Vec<Option<Tensor<B, 2>>> = spans
        .iter()
        .enumerate()
        .map(|(s, &(at, n))| match projection(s) {
            Some((_, Projection::Delta(d))) if n > crate::host::FEW_ROWS => d.fast_product(&x.clone().narrow(0, at, n)),
            _ => None,
        })
        .collect();
    // The rest: one base product for all their rows with each delta term, and whole replacement
    // weights where a tenant has them.
    let rest: Vec<usize> = (0..spans.len()).filter(|&s| merged[s].is_none()).collect();
    let mut deltas: Vec<&DeltaLinear<B>> = Vec::new();
    let mut row_delta = Vec::new();
    let mut dense: Vec<(usize, &Linear<B>)> = Vec::new();
    for &s in &rest {
        let n = spans[s].1;
        match projection(s) {
            Some((_, Projection::Delta(d))) => {
                let d_idx = match deltas.iter().position(|w| std::ptr::eq(*w, d)) {
                    Some(p) => p,
                    None => {
                        deltas.push(d);
                        deltas.len() - 1
                    }
                };
                row_delta.extend(std::iter::repeat_n(Some(d_idx), n));
            }
            Some((t, Projection::Dense(l))) if t.own_dense[i][k] => {
                dense.push((s, l));
                row_delta.extend(std::iter::repeat_n(None, n));
            }
            Some((_, Projection::Scaled(_))) => unreachable!("Tenant::new builds no ScaledDelta"),
            _ => row_delta.extend(std::iter::repeat_n(None, n)),
        }
    }
    let rest_y = match rest.len() {
        0 => None,
        n if n == spans.len() => Some(base_and_deltas(&x, wt, &deltas, &row_delta)),
        _ => Some(base_and_deltas(&Tensor::cat(rest.iter().map(|&s| x.clone().narrow(0, spans[s].0, spans[s].1)).collect(), 0), wt, &deltas, &row_delta)),
    };
    let mut y = match rest_y {
        Some(y) if rest.len() == spans.len() => y,
        rest_y => {
            let mut at = 0;
            let pieces = merged
                .into_iter()
                .enumerate()
                .map(|(s, m)| {
                    m.unwrap_or_else(|| {
                        let n = spans[s].1;
                        at += n;
                        rest_y.clone().expect("a span not merged is in the rest").narrow(0, at - n, n)
                    })
                })
                .collect();
            Tensor::cat(pieces, 0)
        }
    };
    for (s, l) in dense {
        let (at, n) = spans[s];
        y = y.slice_assign([at..at + n, 0..out], crate::host::project(x.clone().narrow(0, at, n), &l.weight_t));
    }
    // Biases: the tenant's own where it has one (the base's otherwise), per sequence.
    let any_bias = (0..spans.len()).any(|s| projection(s).map_or(base_linear, |(_, p)| p.linear()).bias.is_some());
    if !any_bias {
        return y;
    }
    Tensor::cat(
        spans
            .iter()
            .enumerate()
            .map(|(s, &(at, n))| projection(s).map_or(base_linear, |(_, p)| p.linear()).add_bias(y.clone().narrow(0, at, n)))
            .collect(),
        0,
    )
}
