//! Linear weights kept as bf16 on the host (`Weights::bf16_on_host`) against the same weights as
//! f32 tensors, on the real pair (a bf16 checkpoint): every product widens the values exactly, so
//! the logits must agree bit for bit — the base, a merged delta and a packed one, through a
//! prefill (more than 16 rows: the widened GEMM, the merged tiles), decode steps (the few-row
//! kernels), a whole forward (the tied head, the bf16 embedding, on 40 rows), and a batched step
//! of several deltas.

use delta_format::{Checkpoint, DeltaArtifact, ScaleMode};
use delta_models::multi::{step_batch, SeqStep, Tenant};
use delta_models::llama::Embedding;
use delta_models::{CpuBackend, KvCache, Llama, ModelConfig, WeightT, Weights};

use crate::support;

type B = CpuBackend;

fn values(t: burn::tensor::Tensor<B, 2>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold(0, |b, (i, &x)| if x > v[b] { i } else { b }) as u32
}

/// Prefills `ids` and decodes 3 greedy tokens; every step's logits, bit patterns.
fn steps(model: &Llama<B>, ids: &[u32]) -> Vec<Vec<u32>> {
    let mut cache = KvCache::new(model.cfg.num_hidden_layers);
    let mut input = ids.to_vec();
    let mut out = Vec::new();
    for _ in 0..4 {
        let logits = values(model.step(&[input.clone()], &mut cache).unwrap());
        input = vec![argmax(&logits)];
        out.push(logits.iter().map(|v| v.to_bits()).collect());
    }
    out
}

#[test]
fn bf16_weights_on_the_host_give_the_f32_logits_bit_for_bit() {
    let (base_dir, ft_dir) = delta_tests::smollm2();
    let (base, ft) = (Checkpoint::open(&base_dir).unwrap(), Checkpoint::open(&ft_dir).unwrap());
    let cfg = ModelConfig::load(&base_dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let artifact = support::artifact(&base, &ft, ScaleMode::PerOutput, tmp.path());
    let ids = support::chat_prompt_40();
    let load = |delta: Option<&DeltaArtifact>, fused: bool, bf16: bool| {
        let mut w = Weights::<B>::new(&base, delta, Default::default()).unwrap();
        if fused {
            w = w.fused();
        }
        if bf16 {
            w = w.bf16_on_host();
        }
        Llama::load(cfg.clone(), &w).unwrap()
    };
    for (what, delta, fused) in [("base", None, false), ("merged delta", Some(&artifact), false), ("packed delta", Some(&artifact), true)] {
        let (f32s, bf16s) = (load(delta, fused, false), load(delta, fused, true));
        assert!(!f32s.holds_bf16() && bf16s.holds_bf16(), "{what}: the option decides the storage");
        assert!(matches!(bf16s.embed_tokens, Embedding::Bf16(_)) && matches!(bf16s.lm_head_t, WeightT::Bf16Transposed(_)), "{what}: a bf16 embedding and tied head");
        let (want, got) = (steps(&f32s, &ids), steps(&bf16s, &ids));
        for (k, (w, g)) in want.iter().zip(&got).enumerate() {
            assert!(w == g, "{what}, step {k}: bf16 weights give other logits than f32 ones");
        }
        // Every position's logits: the head on 40 rows (widened tiles of the embedding).
        let all = |m: &Llama<B>| m.forward(&[ids.clone()]).unwrap().into_data().into_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert!(all(&f32s) == all(&bf16s), "{what}: a whole forward differs");
    }

    // Tenants over a bf16 base, batched with the base: the f32 base's logits, bit for bit.
    let scalar = support::artifact(&base, &ft, ScaleMode::Scalar, tmp.path());
    let run = |bf16: bool| {
        let model = load(None, false, bf16);
        let tenants: Vec<Tenant<B>> = [&artifact, &scalar].iter().map(|a| Tenant::new(&model, &base, a).unwrap()).collect();
        assert_eq!(tenants.iter().all(|t| t.model.holds_bf16()), bf16, "tenants follow their base's storage");
        let prompts = [ids.clone(), ids[..7].to_vec(), ids[3..9].to_vec()];
        let who = [Some(0), Some(1), None];
        let mut caches: Vec<KvCache<B>> = (0..3).map(|_| KvCache::new(cfg.num_hidden_layers)).collect();
        let mut inputs = prompts.to_vec();
        let mut out = Vec::new();
        for _ in 0..3 {
            let mut batch: Vec<SeqStep<'_, B>> =
                caches.iter_mut().enumerate().map(|(s, cache)| SeqStep { tenant: who[s].map(|d| &tenants[d]), ids: &inputs[s], cache }).collect();
            let logits = values(step_batch(&model, &mut batch).unwrap());
            let vocab = logits.len() / 3;
            inputs = (0..3).map(|s| vec![argmax(&logits[s * vocab..(s + 1) * vocab])]).collect();
            out.push(logits.iter().map(|v| v.to_bits()).collect::<Vec<u32>>());
        }
        out
    };
    assert!(run(false) == run(true), "a batched step on a bf16 base gives other logits than on an f32 one");
}
