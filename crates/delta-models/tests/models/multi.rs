//! Many fine-tunes on one base (`delta_models::multi`), on the real pair: a batched step over
//! sequences of different deltas gives each sequence the logits of its own model run alone.

use delta_calib::{compress, CompressOptions};
use delta_format::{Checkpoint, DeltaArtifact, ScaleMode};
use delta_models::multi::{step_batch, SeqStep, Tenant};
use delta_models::{CpuBackend, KvCache, Llama, ModelConfig, Weights};

use crate::support;

type B = CpuBackend;

fn rows(t: burn::tensor::Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [n, v] = t.dims();
    let data = t.into_data().into_vec::<f32>().unwrap();
    (0..n).map(|r| data[r * v..(r + 1) * v].to_vec()).collect()
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold(0, |b, (i, &x)| if x > v[b] { i } else { b }) as u32
}

#[test]
fn a_batch_of_different_deltas_gives_each_sequence_its_own_models_logits() {
    let (base_dir, ft_dir) = delta_tests::smollm2();
    let (base_ckpt, ft) = (Checkpoint::open(&base_dir).unwrap(), Checkpoint::open(&ft_dir).unwrap());
    let cfg = ModelConfig::load(&base_dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let base = Llama::<B>::load(cfg.clone(), &Weights::new(&base_ckpt, None, Default::default()).unwrap()).unwrap();

    let artifacts: Vec<DeltaArtifact> = [ScaleMode::Scalar, ScaleMode::PerOutput, ScaleMode::PerInput].into_iter().map(|mode| support::artifact(&base_ckpt, &ft, mode, tmp.path())).collect();
    let tenants: Vec<Tenant<B>> = artifacts.iter().map(|a| Tenant::new(&base, &base_ckpt, a).unwrap()).collect();
    for (t, a) in tenants.iter().zip(&artifacts) {
        // Packed signs, scales and the f32 copies of the changed norms: about the artifact's size.
        assert!(t.resident_bytes as f64 <= 1.2 * a.file_len() as f64, "{} resident bytes for a {}-byte artifact", t.resident_bytes, a.file_len());
    }
    // Each model on its own: the fine-tunes loaded independently of `Tenant` (DeltaLinear).
    let alone: Vec<Llama<B>> = artifacts
        .iter()
        .map(|a| Llama::load(cfg.clone(), &Weights::<B>::new(&base_ckpt, Some(a), Default::default()).unwrap().fused()).unwrap())
        .collect();

    // Sequence s: (tenant or the base, prompt). Prompts of different lengths, two on one delta;
    // one longer than 16 tokens (its prefill takes the merged-weight product, the others together
    // the base GEMM plus delta terms).
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 9690, 198, 2683, 359, 253, 5356],
        vec![504, 1345, 28, 216],
        vec![1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 198, 1, 4093, 504, 1345, 28, 216, 36, 1345, 8137],
        vec![1, 9690],
        vec![36, 1345, 8137, 43, 28, 216, 11, 13],
    ];
    let who: [Option<usize>; 5] = [Some(0), None, Some(1), Some(2), Some(0)];
    let model = |s: usize| who[s].map_or(&base, |d| &alone[d]);

    let mut caches: Vec<KvCache<B>> = (0..5).map(|_| KvCache::new(cfg.num_hidden_layers)).collect();
    let mut ref_caches: Vec<KvCache<B>> = (0..5).map(|_| KvCache::new(cfg.num_hidden_layers)).collect();
    let mut inputs = prompts.clone();
    let mut worst = 0f32;
    for step in 0..4 {
        let mut batch: Vec<SeqStep<'_, B>> = caches
            .iter_mut()
            .enumerate()
            .map(|(s, cache)| SeqStep { tenant: who[s].map(|d| &tenants[d]), ids: &inputs[s], cache })
            .collect();
        let got = rows(step_batch(&base, &mut batch).unwrap());
        let mut next = Vec::new();
        for s in 0..5 {
            let want = rows(model(s).step(&[inputs[s].clone()], &mut ref_caches[s]).unwrap()).remove(0);
            let diff = got[s].iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            worst = worst.max(diff);
            assert!(diff <= 1e-3, "step {step}, sequence {s}: logits differ by {diff} from the model alone");
            assert_eq!(argmax(&got[s]), argmax(&want), "step {step}, sequence {s}");
            next.push(vec![argmax(&want)]);
        }
        assert_eq!(caches[2].len(), ref_caches[2].len());
        inputs = next;
    }
    eprintln!("largest logit difference batched vs alone: {worst:.2e}");
    // A batch of prefill chunks on deltas only (every one through its merged weight), and the
    // deltas really differ: the three tenants and the base disagree somewhere in their logits.
    let mut c: Vec<KvCache<B>> = (0..3).map(|_| KvCache::new(cfg.num_hidden_layers)).collect();
    let ids = prompts[2].clone();
    let mut batch: Vec<SeqStep<'_, B>> = c.iter_mut().enumerate().map(|(s, cache)| SeqStep { tenant: Some(&tenants[s]), ids: &ids, cache }).collect();
    let mut out = rows(step_batch(&base, &mut batch).unwrap());
    for (d, got) in out.iter().enumerate() {
        let want = rows(alone[d].step(&[ids.clone()], &mut KvCache::new(cfg.num_hidden_layers)).unwrap()).remove(0);
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-3, "delta {d}: logits differ by {diff} from the model alone");
    }
    out.push(rows(base.step(&[ids.clone()], &mut KvCache::new(cfg.num_hidden_layers)).unwrap()).remove(0));
    for a in 0..4 {
        for b in a + 1..4 {
            let d = out[a].iter().zip(&out[b]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(d > 1e-2, "models {a} and {b} give the same logits (max difference {d})");
        }
    }
}

#[test]
fn a_delta_for_another_base_is_refused() {
    let (base_dir, ft_dir) = delta_tests::smollm2();
    let (base_ckpt, ft) = (Checkpoint::open(&base_dir).unwrap(), Checkpoint::open(&ft_dir).unwrap());
    let cfg = ModelConfig::load(&base_dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Made against the fine-tune as its base: names, shapes and dtypes match, contents do not.
    let path = tmp.path().join("reversed.bitdelta.safetensors");
    compress(&ft, &base_ckpt, &CompressOptions::default(), &mut |_, _, _| {}).unwrap().write(&path, &base_ckpt, false).unwrap();
    let base = Llama::<B>::load(cfg, &Weights::new(&base_ckpt, None, Default::default()).unwrap()).unwrap();
    let err = Tenant::new(&base, &base_ckpt, &DeltaArtifact::open(&path).unwrap()).err().expect("refused");
    assert!(err.to_string().contains("wrong base"), "{err}");
}
