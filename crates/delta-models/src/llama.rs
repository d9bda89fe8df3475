//! The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) in Burn, laid out as the Hugging Face
//! checkpoint is: `model.embed_tokens`, `model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
//! post_attention_layernorm, mlp.{gate,up,down}_proj}`, `model.norm`, `lm_head` (or tied).
//!
//! RoPE is Hugging Face's *rotate-half* form (not Burn's interleaved `RotaryEncoding`). The forward
//! is staged — [`Llama::embed`], [`Llama::block`], [`Llama::head`] — because calibration needs the
//! activations between blocks and Burn has no forward hooks.

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use delta_kernels::convert::{Bf16Bits, WeightElem};

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::host::HostKv;
use crate::delta_linear::Projection;
use crate::weights::Weights;

/// A linear layer's weight, transposed (`[in, out]`) so the product needs no transpose.
#[derive(Clone)]
pub enum WeightT<B: Backend> {
    /// A tensor of the backend, f32: contiguous, or the transposed view of a tied LM head's
    /// embedding matrix.
    Tensor(Tensor<B, 2>),
    /// On the CPU backend only ([`Weights::bf16_on_host`]): a bf16 checkpoint's values as they
    /// are, `[in, out]`, half the bytes of f32. Every product widens them to f32 exactly and gives
    /// what the f32 tensor gives, bit for bit; a decode step, bound by reading the weights, reads
    /// half as much.
    Bf16(Arc<HostBf16>),
    /// The same for a matrix stored `[out, in]` and read transposed: a tied LM head, which is the
    /// embedding matrix ([`Embedding::head_t`]).
    Bf16Transposed(Arc<HostBf16>),
}

/// A row-major bf16 matrix `[rows, cols]` on the host.
pub struct HostBf16 {
    pub values: Vec<Bf16Bits>,
    pub rows: usize,
    pub cols: usize,
}

impl HostBf16 {
    /// The values widened to f32, row-major.
    fn widened(&self) -> Vec<f32> {
        self.values.iter().map(|b| b.to_f32()).collect()
    }
}

impl<B: Backend> WeightT<B> {
    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            WeightT::Tensor(t) => t.dims(),
            WeightT::Bf16(h) => [h.rows, h.cols],
            WeightT::Bf16Transposed(h) => [h.cols, h.rows],
        }
    }

    pub fn device(&self) -> B::Device {
        match self {
            WeightT::Tensor(t) => t.device(),
            WeightT::Bf16(_) | WeightT::Bf16Transposed(_) => Default::default(),
        }
    }

    /// The f32 tensor, unless the weight is bf16 on the host.
    pub fn tensor(&self) -> Option<&Tensor<B, 2>> {
        match self {
            WeightT::Tensor(t) => Some(t),
            WeightT::Bf16(_) | WeightT::Bf16Transposed(_) => None,
        }
    }

    /// The weight as an f32 tensor of the backend: the tensor itself, or the bf16 values widened
    /// into a new one (what the paths that cannot read bf16 use; the CPU's products all can).
    pub fn to_tensor(&self) -> Tensor<B, 2> {
        match self {
            WeightT::Tensor(t) => t.clone(),
            WeightT::Bf16(h) => Tensor::from_data(TensorData::new(h.widened(), [h.rows, h.cols]), &Default::default()),
            WeightT::Bf16Transposed(h) => Tensor::<B, 2>::from_data(TensorData::new(h.widened(), [h.rows, h.cols]), &Default::default()).transpose(),
        }
    }

    /// Bytes the weight's values take.
    pub fn bytes(&self) -> usize {
        let [inp, out] = self.dims();
        inp * out * if self.tensor().is_some() { 4 } else { 2 }
    }
}

/// The token embedding `[vocab, hidden]`: an f32 tensor, or (on the CPU backend, as
/// [`WeightT::Bf16`]) a bf16 checkpoint's values on the host, widened exactly as rows are looked up.
#[derive(Clone)]
pub enum Embedding<B: Backend> {
    Tensor(Tensor<B, 2>),
    Bf16(Arc<HostBf16>),
}

impl<B: Backend> Embedding<B> {
    /// The rows of `ids` (each below the vocabulary size), `[ids.len(), hidden]`.
    pub fn rows(&self, ids: &[u32], device: &B::Device) -> Tensor<B, 2> {
        match self {
            Embedding::Tensor(t) => {
                let flat: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
                t.clone().select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [ids.len()]), device))
            }
            Embedding::Bf16(h) => {
                let values: Vec<f32> = ids.iter().flat_map(|&i| h.values[i as usize * h.cols..][..h.cols].iter().map(|b| b.to_f32())).collect();
                Tensor::from_data(TensorData::new(values, [ids.len(), h.cols]), device)
            }
        }
    }

    /// The embedding as an f32 tensor of the backend (bf16 values widened into a new one).
    pub fn to_tensor(&self) -> Tensor<B, 2> {
        match self {
            Embedding::Tensor(t) => t.clone(),
            Embedding::Bf16(h) => Tensor::from_data(TensorData::new(h.widened(), [h.rows, h.cols]), &Default::default()),
        }
    }

    /// The tied LM head, `[hidden, vocab]`: a transposed view of this matrix, not a copy.
    /// Products read it as dot products (`host::few_rows`, `delta_kernels::dense_nt`) or through
    /// its strides.
    pub fn head_t(&self) -> WeightT<B> {
        match self {
            Embedding::Tensor(t) => WeightT::Tensor(t.clone().transpose()),
            Embedding::Bf16(h) => WeightT::Bf16Transposed(h.clone()),
        }
    }

    /// Bytes the values take.
    pub fn bytes(&self) -> usize {
        match self {
            Embedding::Tensor(t) => t.dims().iter().product::<usize>() * 4,
            Embedding::Bf16(h) => h.values.len() * 2,
        }
    }
}

/// `y = x·Wᵀ (+ b)`, holding Wᵀ so the product needs no transpose.
#[derive(Clone)]
pub struct Linear<B: Backend> {
    pub weight_t: WeightT<B>,
    pub bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> Linear<B> {
    pub fn load(w: &Weights<'_, B>, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Self, ModelError> {
        let weight_t = w.linear_t(&format!("{prefix}.weight"), out, inp)?;
        let bias = if bias { Some(w.vector(&format!("{prefix}.bias"), out)?) } else { None };
        Ok(Linear { weight_t, bias })
    }

    /// A layer holding the f32 tensor `weight_t` (`[in, out]`).
    pub fn from_tensor(weight_t: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Linear { weight_t: WeightT::Tensor(weight_t), bias }
    }

    /// `x`: `[rows, in]` -> `[rows, out]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.add_bias(crate::host::project(x, &self.weight_t))
    }

    /// `y (+ b)` for a product `y` computed elsewhere (e.g. fused with a delta term).
    pub fn add_bias(&self, y: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }
}

#[derive(Clone)]
pub struct RmsNorm<B: Backend> {
    pub weight: Tensor<B, 1>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn load(w: &Weights<'_, B>, name: &str, dim: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(RmsNorm { weight: w.vector(name, dim)?, eps })
    }

    /// Normalises over the last dimension: `w ⊙ x / sqrt(mean(x²) + eps)`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self.on_host(&x, Some(&self.weight)) {
            Some(y) => y,
            None => self.normalise(x) * self.weight.clone().unsqueeze::<D>(),
        }
    }

    /// `x / sqrt(mean(x²) + eps)` over the last dimension, before the weight (which a batch of
    /// several models applies per row).
    pub fn normalise<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if let Some(y) = self.on_host(&x, None) {
            return y;
        }
        let var = (x.clone() * x.clone()).mean_dim(D - 1);
        // Divide, never `recip()`: Burn 0.21's NdArray backend computes `recip` on larger tensors
        // with the approximate SIMD reciprocal (2.7e-4 relative error, measured), which made
        // logits depend on the sequence length. Division is correctly rounded.
        x / var.add_scalar(self.eps).sqrt()
    }

    /// On the CPU backend, with or without autodiff, the norm (times `weight` when given) on the
    /// host, row by row ([`crate::host::rms_norm`]); `None` on any other.
    fn on_host<const D: usize>(&self, x: &Tensor<B, D>, weight: Option<&Tensor<B, 1>>) -> Option<Tensor<B, D>> {
        if !crate::host::is_cpu::<B>() && !crate::host::is_autodiff_cpu::<B>() {
            return None;
        }
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product();
        crate::host::rms_norm(&x.clone().reshape([rows, dims[D - 1]]), weight, self.eps).map(|y| y.reshape(dims))
    }
}

/// Rotary position embedding, rotate-half form, with optional Llama-3 / linear frequency scaling.
#[derive(Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Result<Self, ModelError> {
        let d = cfg.head_dim();
        let mut inv_freq: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
        if let Some(s) = &cfg.rope_scaling {
            match s.rope_type.as_str() {
                "default" => {}
                "linear" => inv_freq.iter_mut().for_each(|f| *f /= s.factor),
                "llama3" => {
                    let old = s.original_max_position_embeddings as f64;
                    let (low_wavelen, high_wavelen) = (old / s.low_freq_factor, old / s.high_freq_factor);
                    for f in inv_freq.iter_mut() {
                        let wavelen = 2.0 * std::f64::consts::PI / *f;
                        if wavelen > low_wavelen {
                            *f /= s.factor;
                        } else if wavelen >= high_wavelen {
                            let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                            *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                        }
                    }
                }
                other => return Err(ModelError::Input(format!("rope_scaling type `{other}` is not supported (default, linear, llama3 are)"))),
            }
        }
        Ok(Rope { inv_freq })
    }

    /// cos and sin tables `[t, head_dim]` for positions `start..start + t`.
    pub fn tables<B: Backend>(&self, start: usize, t: usize, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        self.tables_at(&(start..start + t).collect::<Vec<_>>(), device)
    }

    /// cos and sin tables `[positions.len(), head_dim]`, a row per position.
    pub fn tables_at<B: Backend>(&self, positions: &[usize], device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let (t, d) = (positions.len(), self.inv_freq.len() * 2);
        let (cos, sin) = self.host_tables(positions);
        let make = |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [t, d]), device);
        (make(cos), make(sin))
    }

    /// [`Rope::tables_at`] as row-major values on the host.
    pub fn host_tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let (t, d) = (positions.len(), self.inv_freq.len() * 2);
        let (mut cos, mut sin) = (Vec::with_capacity(t * d), Vec::with_capacity(t * d));
        for &p in positions {
            // cat(freqs, freqs): the same angles for both halves of the head.
            for _ in 0..2 {
                for f in &self.inv_freq {
                    let a = p as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        (cos, sin)
    }

    /// `x`: `[b, heads, t, d]`: x·cos + rotate_half(x)·sin.
    pub fn apply<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 4> {
        let d = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.clone().unsqueeze::<4>() + rotated * sin.clone().unsqueeze::<4>()
    }
}

#[derive(Clone)]
pub struct Attention<B: Backend> {
    pub q_proj: Projection<B>,
    pub k_proj: Projection<B>,
    pub v_proj: Projection<B>,
    pub o_proj: Projection<B>,
    /// Qwen3's per-head RMSNorm on q and k.
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Mistral's sliding-window attention (keys further back than this are masked).
    pub sliding_window: Option<usize>,
}

/// Several token sequences packed into one for a single forward ([`Llama::forward_packed`]):
/// big products for many short sequences, no padding. Each segment is a run of tokens that
/// attend only among themselves; within one, any pattern of visibility works — e.g. a shared
/// prefix followed by several continuations, each seeing the prefix and itself (a token tree).
pub struct Packed {
    /// Token ids, the segments one after another.
    pub ids: Vec<u32>,
    /// Each token's position (for RoPE and sliding windows), counted within its own sequence.
    pub positions: Vec<usize>,
    pub segments: Vec<Segment>,
}

/// A segment of a [`Packed`] batch: `len` tokens, token i sees token j when `visible[i·len + j]`
/// (every token must see itself). A sliding window, where the model has one, applies on top.
pub struct Segment {
    pub len: usize,
    pub visible: Vec<bool>,
}

/// What every layer of a packed forward shares: the RoPE tables of its positions and, per segment,
/// its first token, its length and its additive mask `[len, len]` — as row-major values for the
/// CPU backend's attention on the host ([`crate::host::attend_packed`]), as tensors for any other.
enum PackedLayout<B: Backend> {
    Host { cos: Vec<f32>, sin: Vec<f32>, segments: Vec<(usize, usize, Vec<f32>)> },
    Tensors { cos: Tensor<B, 2>, sin: Tensor<B, 2>, segments: Vec<(usize, usize, Tensor<B, 2>)> },
}

/// One layer's keys (after RoPE) and values for the positions seen so far.
#[derive(Clone)]
pub enum HeldKv<B: Backend> {
    /// On the CPU backend: host buffers with room for more positions, shared by clones of the
    /// cache until one of them appends (then it copies them first).
    Host(Arc<HostKv>),
    /// On every other backend: tensors `[b, kv_heads, positions, d]`, concatenated on append.
    Tensors(Tensor<B, 4>, Tensor<B, 4>),
}

impl<B: Backend> HeldKv<B> {
    /// Sequences (rows of the batch).
    pub(crate) fn rows(&self) -> usize {
        match self {
            HeldKv::Host(kv) => kv.rows(),
            HeldKv::Tensors(k, _) => k.dims()[0],
        }
    }
}

/// One layer's keys and values for the positions seen so far (none yet: `None`).
pub type LayerKv<B> = Option<HeldKv<B>>;

/// Keys and values of every layer, so decoding a token costs one position, not the whole prefix.
/// A clone shares what is held so far (copied by whichever clone appends first, never changed
/// under another), so several continuations of one prefill can each go on from it.
#[derive(Clone)]
pub struct KvCache<B: Backend> {
    pub(crate) layers: Vec<LayerKv<B>>,
    pub(crate) len: usize,
    /// Positions a layer's host cache makes room for when it starts (0: what its first step needs).
    room: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(layers: usize) -> Self {
        KvCache { layers: (0..layers).map(|_| None).collect(), len: 0, room: 0 }
    }

    /// A cache that will hold about `positions` positions (a prompt and the tokens to come): on the
    /// CPU backend each layer makes room for them at once, so no step moves what it holds (past
    /// them the room doubles as it runs out).
    pub fn with_room(layers: usize, positions: usize) -> Self {
        KvCache { room: positions, ..Self::new(layers) }
    }

    /// Layer `i`'s keys and values, for `attention` over `b` sequences: on the CPU backend, made
    /// with the cache's room if none are held yet.
    pub(crate) fn layer(&mut self, i: usize, attention: &Attention<B>, b: usize) -> &mut LayerKv<B> {
        let slot = &mut self.layers[i];
        if slot.is_none() && self.room > 0 && crate::host::is_cpu::<B>() {
            *slot = Some(HeldKv::Host(Arc::new(HostKv::new(b, attention.kv_heads, attention.head_dim, self.room))));
        }
        slot
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Clone)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Projection<B>,
    pub up_proj: Projection<B>,
    pub down_proj: Projection<B>,
}

#[derive(Clone)]
pub struct Block<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

/// A block's projections, by their names under `model.layers.N.`, in the order
/// [`Block::projections`] gives them.
pub const PROJECTIONS: [&str; 7] = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

impl<B: Backend> Block<B> {
    /// Block `i` (`model.layers.i.*`) of a checkpoint.
    pub fn load(w: &Weights<'_, B>, cfg: &ModelConfig, i: usize) -> Result<Self, ModelError> {
        let (hidden, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        let p = format!("model.layers.{i}");
        Ok(Block {
            input_layernorm: RmsNorm::load(w, &format!("{p}.input_layernorm.weight"), hidden, cfg.rms_norm_eps)?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(w, &format!("{p}.post_attention_layernorm.weight"), hidden, cfg.rms_norm_eps)?,
            mlp: Mlp {
                gate_proj: Projection::load(w, &format!("{p}.mlp.gate_proj"), ffn, hidden, cfg.mlp_bias)?,
                up_proj: Projection::load(w, &format!("{p}.mlp.up_proj"), ffn, hidden, cfg.mlp_bias)?,
                down_proj: Projection::load(w, &format!("{p}.mlp.down_proj"), hidden, ffn, cfg.mlp_bias)?,
            },
        })
    }

    /// The seven projections, in [`PROJECTIONS`] order.
    pub fn projections(&self) -> [&Projection<B>; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }

    pub fn projections_mut(&mut self) -> [&mut Projection<B>; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
    }

    /// The projection named `name` (e.g. `mlp.up_proj`).
    pub fn projection_mut(&mut self, name: &str) -> Option<&mut Projection<B>> {
        let k = PROJECTIONS.iter().position(|p| *p == name)?;
        self.projections_mut().into_iter().nth(k)
    }
}

#[derive(Clone)]
pub struct Llama<B: Backend> {
    pub cfg: ModelConfig,
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<Block<B>>,
    pub norm: RmsNorm<B>,
    /// The LM head as `[hidden, vocab]` (when tied, a transposed view of `embed_tokens`: no copy).
    pub lm_head_t: WeightT<B>,
    pub rope: Rope,
    pub device: B::Device,
}

impl<B: Backend> Attention<B> {
    fn load(w: &Weights<'_, B>, p: &str, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let (h, kv, d, hidden) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim(), cfg.hidden_size);
        let qkv_bias = cfg.qkv_bias();
        let qk_norm = w.has(&format!("{p}.q_norm.weight"));
        Ok(Attention {
            q_proj: Projection::load(w, &format!("{p}.q_proj"), h * d, hidden, qkv_bias)?,
            k_proj: Projection::load(w, &format!("{p}.k_proj"), kv * d, hidden, qkv_bias)?,
            v_proj: Projection::load(w, &format!("{p}.v_proj"), kv * d, hidden, qkv_bias)?,
            o_proj: Projection::load(w, &format!("{p}.o_proj"), hidden, h * d, cfg.attention_bias && cfg.model_type != "qwen2")?,
            q_norm: if qk_norm { Some(RmsNorm::load(w, &format!("{p}.q_norm.weight"), d, cfg.rms_norm_eps)?) } else { None },
            k_norm: if qk_norm { Some(RmsNorm::load(w, &format!("{p}.k_norm.weight"), d, cfg.rms_norm_eps)?) } else { None },
            heads: h,
            kv_heads: kv,
            head_dim: d,
            sliding_window: cfg.sliding_window(),
        })
    }

    /// The attention core between the projections: q, k, v (`[b·t, heads·d]`, `[b·t, kv·d]`, as
    /// the projections return them) -> the context `[b·t, heads·d]` that `o_proj` takes
    /// (q/k norm, RoPE, cache, causal softmax). The new positions follow those already in `cache`
    /// (cos / sin are the tables of the new positions); with a cache, the new keys and values are
    /// appended to it. On the CPU backend it runs on the host ([`crate::host::attend_cached`]),
    /// with a cache or without; under autodiff on the CPU backend, without a cache, as one custom
    /// op ([`crate::host::attend_tracked`]). Calibration calls it with its own projections.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(&self, q: Tensor<B, 2>, k: Tensor<B, 2>, v: Tensor<B, 2>, b: usize, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>, cache: Option<&mut LayerKv<B>>) -> Tensor<B, 2> {
        let (h, d) = (self.heads, self.head_dim);
        let t = q.dims()[0] / b;
        if crate::host::is_cpu::<B>() {
            let mut scratch = None;
            let kv = match cache {
                Some(slot) => match slot.get_or_insert_with(|| HeldKv::Host(Arc::new(HostKv::new(b, self.kv_heads, d, 0)))) {
                    HeldKv::Host(kv) => Arc::make_mut(kv),
                    HeldKv::Tensors(..) => unreachable!("the CPU backend holds its keys and values on the host"),
                },
                None => scratch.insert(HostKv::new(b, self.kv_heads, d, 0)),
            };
            let mask = attention_mask(t, kv.len(), self.sliding_window).unwrap_or_else(|| vec![0.0; t * (kv.len() + t)]);
            let (q, k) = self.normed(q, k);
            return crate::host::attend_cached(&q, &k, &v, b, cos, sin, h, kv, &mask).expect("the CPU backend");
        }
        if crate::host::is_autodiff_cpu::<B>() && cache.is_none() {
            // Stage 2 of calibration: one custom autodiff op on the host.
            let mask = attention_mask(t, 0, self.sliding_window).unwrap_or_else(|| vec![0.0; t * t]);
            let (q, k) = self.normed(q, k);
            return crate::host::attend_tracked(&q, &k, &v, b, cos, sin, h, self.kv_heads, &mask).expect("the CPU backend under autodiff");
        }
        let (q, mut k, mut v) = self.heads_rotated(q, k, v, b, cos, sin);
        let mut past = 0;
        if let Some(cache) = cache {
            match cache.take() {
                Some(HeldKv::Tensors(pk, pv)) => {
                    past = pk.dims()[2];
                    k = Tensor::cat(vec![pk, k], 2);
                    v = Tensor::cat(vec![pv, v], 2);
                }
                Some(HeldKv::Host(_)) => unreachable!("host keys and values only on the CPU backend"),
                None => {}
            }
            *cache = Some(HeldKv::Tensors(k.clone(), v.clone()));
        }
        let mask = attention_mask(t, past, self.sliding_window).map(|m| Tensor::<B, 2>::from_data(TensorData::new(m, [t, past + t]), &self.device()));
        self.softmax_context(q, k, v, mask).swap_dims(1, 2).reshape([b * t, h * d])
    }

    /// q `[rows, heads·d]` and k `[rows, kv·d]` with the q/k norms applied (Qwen3), per head.
    fn normed(&self, q: Tensor<B, 2>, k: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let (h, kv, d, t) = (self.heads, self.kv_heads, self.head_dim, q.dims()[0]);
        match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(q.reshape([t, h, d])).reshape([t, h * d]), kn.forward(k.reshape([t, kv, d])).reshape([t, kv * d])),
            _ => (q, k),
        }
    }

    /// [`Attention::attend`] for one packed sequence (see [`Packed`]): q, k, v of all its tokens;
    /// no token sees another segment.
    fn attend_packed(&self, q: Tensor<B, 2>, k: Tensor<B, 2>, v: Tensor<B, 2>, layout: &PackedLayout<B>) -> Tensor<B, 2> {
        let (h, kv, d, t) = (self.heads, self.kv_heads, self.head_dim, q.dims()[0]);
        match layout {
            PackedLayout::Host { cos, sin, segments } => {
                let (q, k) = self.normed(q, k);
                crate::host::attend_packed(&q, &k, &v, cos, sin, h, kv, segments).expect("a host layout only on the CPU backend")
            }
            PackedLayout::Tensors { cos, sin, segments } => {
                let (q, k, v) = self.heads_rotated(q, k, v, 1, cos, sin);
                let parts = segments
                    .iter()
                    .map(|(start, len, mask)| {
                        let part = |x: &Tensor<B, 4>| x.clone().narrow(2, *start, *len);
                        self.softmax_context(part(&q), part(&k), part(&v), Some(mask.clone()))
                    })
                    .collect();
                Tensor::cat(parts, 2).swap_dims(1, 2).reshape([t, h * d])
            }
        }
    }

    /// q, k, v `[b·t, ·]` -> `[b, heads, t, d]`, `[b, kv, t, d]` ×2, q and k normalised (Qwen3)
    /// and rotated.
    #[allow(clippy::type_complexity)]
    fn heads_rotated(&self, q: Tensor<B, 2>, k: Tensor<B, 2>, v: Tensor<B, 2>, b: usize, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let t = q.dims()[0] / b;
        let split = |y: Tensor<B, 2>, n: usize| y.reshape([b, t, n, d]);
        let mut q = split(q, h);
        let mut k = split(k, kv);
        let v = split(v, kv).swap_dims(1, 2);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        (Rope::apply(q.swap_dims(1, 2), cos, sin), Rope::apply(k.swap_dims(1, 2), cos, sin), v)
    }

    /// softmax(q·kᵀ/√d + mask)·v: `[b, heads, t, d]` queries over `[b, kv, s, d]` keys and values
    /// (each kv head shared by its query heads), mask `[t, s]`.
    fn softmax_context(&self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Option<Tensor<B, 2>>) -> Tensor<B, 4> {
        let n = self.heads / self.kv_heads;
        let (k, v) = (repeat_kv(k, n), repeat_kv(v, n));
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (self.head_dim as f64).sqrt());
        let scores = match mask {
            Some(mask) => scores + mask.unsqueeze::<4>(),
            None => scores,
        };
        burn::tensor::activation::softmax(scores, 3).matmul(v)
    }

    fn device(&self) -> B::Device {
        self.o_proj.device()
    }
}

/// Additive mask `[t, past + t]` for `t` queries at positions `past..past + t` over keys at
/// `0..past + t`: key j is visible to query i when j ≤ i and, with a sliding window w, i − j < w
/// (Hugging Face's rule). `None` when every key is visible (one new token, no window in reach).
fn attention_mask(t: usize, past: usize, window: Option<usize>) -> Option<Vec<f32>> {
    let s = past + t;
    if t == 1 && window.is_none_or(|w| s <= w) {
        return None;
    }
    Some(
        (0..t * s)
            .map(|n| {
                let (i, j) = (past + n / s, n % s);
                let visible = j <= i && window.is_none_or(|w| i - j < w);
                if visible { 0.0 } else { f32::NEG_INFINITY }
            })
            .collect(),
    )
}

/// `[b, kv, t, d]` -> `[b, kv·n, t, d]`, each key/value head repeated for its `n` query heads.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
    if n == 1 {
        return x;
    }
    let [b, kv, t, d] = x.dims();
    x.reshape([b, kv, 1, t, d]).repeat_dim(2, n).reshape([b, kv * n, t, d])
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.down_proj.forward(crate::host::silu_mul(self.gate_proj.forward(x.clone()), self.up_proj.forward(x)))
    }
}

impl<B: Backend> Llama<B> {
    /// Builds the model from a checkpoint's weights (see [`Weights`]).
    pub fn load(cfg: ModelConfig, w: &Weights<'_, B>) -> Result<Self, ModelError> {
        let blocks = cfg.num_hidden_layers;
        Self::load_first_blocks(cfg, w, blocks)
    }

    /// The model with only its first `blocks` blocks (0: embeddings, final norm and head), for
    /// code that walks the blocks itself and loads each with [`Block::load`] when it gets there.
    pub fn load_first_blocks(cfg: ModelConfig, w: &Weights<'_, B>, blocks: usize) -> Result<Self, ModelError> {
        let (hidden, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let layers = (0..blocks.min(cfg.num_hidden_layers)).map(|i| Block::load(w, &cfg, i)).collect::<Result<Vec<_>, _>>()?;
        let embed_tokens = w.embedding("model.embed_tokens.weight", vocab, hidden)?;
        let lm_head_t = if cfg.tie_word_embeddings && !w.has("lm_head.weight") {
            embed_tokens.head_t()
        } else {
            w.linear_t("lm_head.weight", vocab, hidden)?
        };
        let norm = RmsNorm::load(w, "model.norm.weight", hidden, cfg.rms_norm_eps)?;
        let rope = Rope::new(&cfg)?;
        Ok(Llama { cfg, embed_tokens, layers, norm, lm_head_t, rope, device: w.device.clone() })
    }

    /// Whether any linear weight is bf16 on the host ([`Weights::bf16_on_host`]).
    pub fn holds_bf16(&self) -> bool {
        self.layers.iter().any(|b| b.projections().iter().any(|p| matches!(p.linear().weight_t, WeightT::Bf16(_))))
    }

    /// Token ids `[b, t]` (all rows the same length) -> hidden states `[b, t, hidden]`.
    pub fn embed(&self, ids: &[Vec<u32>]) -> Result<Tensor<B, 3>, ModelError> {
        let b = ids.len();
        let t = ids.first().map(Vec::len).unwrap_or(0);
        if b == 0 || t == 0 || ids.iter().any(|r| r.len() != t) {
            return Err(ModelError::Input("token batches must be non-empty rows of equal length".into()));
        }
        if let Some(&bad) = ids.iter().flatten().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(ModelError::Input(format!("token id {bad} is outside the vocabulary of {}", self.cfg.vocab_size)));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        Ok(self.embed_tokens.rows(&flat, &self.device).reshape([b, t, self.cfg.hidden_size]))
    }

    /// cos / sin tables for a forward over `t` positions starting at 0.
    pub fn rope_tables(&self, t: usize) -> (Tensor<B, 2>, Tensor<B, 2>) {
        self.rope.tables(0, t, &self.device)
    }

    /// Block `i`: `x + attn(norm(x))`, then `+ mlp(norm(·))`, over positions `0..t`.
    pub fn block(&self, i: usize, x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 3> {
        self.block_cached(i, x, cos, sin, None)
    }

    fn block_cached(&self, i: usize, x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>, cache: Option<&mut LayerKv<B>>) -> Tensor<B, 3> {
        let b = x.dims()[0];
        self.block_with(i, x, |a, q, k, v| a.attend(q, k, v, b, cos, sin, cache))
    }

    /// Block `i` with `attend(attention, q, k, v)` -> context between the projections.
    fn block_with(&self, i: usize, x: Tensor<B, 3>, attend: impl FnOnce(&Attention<B>, Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>) -> Tensor<B, 3> {
        let (layer, [b, t, hidden]) = (&self.layers[i], x.dims());
        let a = &layer.self_attn;
        let n = layer.input_layernorm.forward(x.clone()).reshape([b * t, hidden]);
        let context = attend(a, a.q_proj.forward(n.clone()), a.k_proj.forward(n.clone()), a.v_proj.forward(n));
        let h = x + a.o_proj.forward(context).reshape([b, t, hidden]);
        let m = layer.mlp.forward(layer.post_attention_layernorm.forward(h.clone()).reshape([b * t, hidden]));
        h + m.reshape([b, t, hidden])
    }

    /// Final norm and LM head: `[b, t, hidden]` -> logits `[b, t, vocab]`.
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.logits(self.norm.forward(x))
    }

    /// The LM head alone: final hidden states (after the final norm) `[b, t, hidden]` -> logits
    /// `[b, t, vocab]`.
    pub fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, hidden] = h.dims();
        crate::host::project(h.reshape([b * t, hidden]), &self.lm_head_t).reshape([b, t, self.cfg.vocab_size])
    }

    /// Feeds `ids` (`[b, t]`) after the positions already in `cache`, extends the cache, and
    /// returns the logits of the last new position, `[b, vocab]` — prefill and decode alike.
    pub fn step(&self, ids: &[Vec<u32>], cache: &mut KvCache<B>) -> Result<Tensor<B, 2>, ModelError> {
        let x = self.blocks_cached(ids, cache)?;
        let [b, t, hidden] = x.dims();
        let last = x.narrow(1, t - 1, 1).reshape([b, 1, hidden]);
        Ok(self.head(last).reshape([b, self.cfg.vocab_size]))
    }

    /// Like [`Llama::step`], returning the logits of every new position, `[b, t, vocab]`.
    pub fn step_all(&self, ids: &[Vec<u32>], cache: &mut KvCache<B>) -> Result<Tensor<B, 3>, ModelError> {
        Ok(self.head(self.blocks_cached(ids, cache)?))
    }

    /// Embedding and every block over `ids` after the cached positions; extends the cache.
    fn blocks_cached(&self, ids: &[Vec<u32>], cache: &mut KvCache<B>) -> Result<Tensor<B, 3>, ModelError> {
        let mut x = self.embed(ids)?;
        let t = x.dims()[1];
        if cache.layers.len() != self.layers.len() {
            return Err(ModelError::Input(format!("a KV cache for {} layers, the model has {}", cache.layers.len(), self.layers.len())));
        }
        if let Some(Some(held)) = cache.layers.first() {
            if held.rows() != ids.len() {
                return Err(ModelError::Input(format!("a KV cache of {} rows for a batch of {}", held.rows(), ids.len())));
            }
        }
        let (cos, sin) = self.rope.tables(cache.len, t, &self.device);
        for i in 0..self.layers.len() {
            x = self.block_cached(i, x, &cos, &sin, Some(cache.layer(i, &self.layers[i].self_attn, ids.len())));
        }
        cache.len += t;
        Ok(x)
    }

    /// The logits `[rows.len(), vocab]` at the given token indices of a packed batch of sequences
    /// (see [`Packed`]); the LM head runs on those rows only.
    pub fn forward_packed(&self, p: &Packed, rows: &[usize]) -> Result<Tensor<B, 2>, ModelError> {
        let t = p.ids.len();
        let bad = |what: String| Err(ModelError::Input(format!("packed batch: {what}")));
        if p.positions.len() != t || p.segments.iter().map(|s| s.len).sum::<usize>() != t {
            return bad(format!("{t} ids, {} positions, segments of {} tokens", p.positions.len(), p.segments.iter().map(|s| s.len).sum::<usize>()));
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= t) {
            return bad(format!("row {r} of {t} tokens"));
        }
        let (mut segments, mut start) = (Vec::with_capacity(p.segments.len()), 0);
        for s in &p.segments {
            if s.visible.len() != s.len * s.len || (0..s.len).any(|i| !s.visible[i * s.len + i]) {
                return bad(format!("the segment at token {start} needs a {0}×{0} visibility in which every token sees itself", s.len));
            }
            let pos = &p.positions[start..start + s.len];
            let window = self.cfg.sliding_window();
            let mask: Vec<f32> = (0..s.len * s.len)
                .map(|n| {
                    let (i, j) = (n / s.len, n % s.len);
                    let visible = s.visible[n] && window.is_none_or(|w| pos[i].abs_diff(pos[j]) < w);
                    if visible { 0.0 } else { f32::NEG_INFINITY }
                })
                .collect();
            segments.push((start, s.len, mask));
            start += s.len;
        }
        let mut x = self.embed(std::slice::from_ref(&p.ids))?;
        let layout = if crate::host::is_cpu::<B>() {
            let (cos, sin) = self.rope.host_tables(&p.positions);
            PackedLayout::Host { cos, sin, segments }
        } else {
            let (cos, sin) = self.rope.tables_at(&p.positions, &self.device);
            let tensor = |len: usize, mask: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(mask, [len, len]), &self.device);
            PackedLayout::Tensors { cos, sin, segments: segments.into_iter().map(|(start, len, mask)| (start, len, tensor(len, mask))).collect() }
        };
        for i in 0..self.layers.len() {
            x = self.block_with(i, x, |a, q, k, v| a.attend_packed(q, k, v, &layout));
        }
        let hidden = self.cfg.hidden_size;
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [rows.len()]), &self.device);
        let x = x.reshape([t, hidden]).select(0, idx).reshape([1, rows.len(), hidden]);
        Ok(self.head(x).reshape([rows.len(), self.cfg.vocab_size]))
    }

    /// The whole forward: logits `[b, t, vocab]` (on the CPU backend the attention runs on the
    /// host, as [`Attention::attend`] does there).
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor<B, 3>, ModelError> {
        Ok(self.logits(self.final_hidden(ids)?))
    }

    /// The forward up to the LM head: the final hidden states after the final norm,
    /// `[b, t, hidden]` ([`Llama::logits`] of them are [`Llama::forward`]'s logits).
    pub fn final_hidden(&self, ids: &[Vec<u32>]) -> Result<Tensor<B, 3>, ModelError> {
        let mut x = self.embed(ids)?;
        let t = x.dims()[1];
        let (cos, sin) = self.rope_tables(t);
        for i in 0..self.layers.len() {
            x = self.block(i, x, &cos, &sin);
        }
        Ok(self.norm.forward(x))
    }
}
