//! Every architecture variant loads and runs, against Hugging Face `transformers`: tiny random
//! checkpoints (rebuilt here by `delta_tests::tiny`) and their logits and greedy tokens computed
//! once by `fixtures/tiny/reference.py` (transformers, f32, eager attention), committed in
//! `fixtures/tiny/reference_logits.safetensors`.

use std::path::{Path, PathBuf};

use delta_format::{Checkpoint, DType};
use delta_models::generate::{generate, Sampling};
use delta_models::{CpuBackend, KvCache, Llama, ModelConfig, Weights};
use delta_tests::tiny::{self, IDS, VOCAB};

/// f32 against f32: differences come from summation order only (measured ≤ 1.7e-6).
const TOL: f32 = 1e-4;

fn reference() -> std::collections::HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny/reference_logits.safetensors");
    delta_tests::read_tensors(&path)
}

fn load(dir: &Path) -> Llama<CpuBackend> {
    let ckpt = Checkpoint::open(dir).unwrap();
    let weights = Weights::<CpuBackend>::new(&ckpt, None, Default::default()).unwrap();
    Llama::load(ModelConfig::load(dir).unwrap(), &weights).unwrap()
}

fn logits(model: &Llama<CpuBackend>) -> Vec<f32> {
    model.forward(&[IDS.to_vec()]).unwrap().into_data().into_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn write_all(tmp: &Path) -> Vec<(tiny::Variant, PathBuf)> {
    tiny::variants()
        .into_iter()
        .map(|v| {
            let dir = tmp.join(v.name);
            tiny::write(&v, &dir);
            (v, dir)
        })
        .collect()
}

#[test]
fn tiny_checkpoints_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = reference();
    for (v, dir) in write_all(tmp.path()) {
        let model = load(&dir);
        let ours = logits(&model);
        let (_, shape, bytes) = &reference[&format!("{}.logits", v.name)];
        assert_eq!(shape, &[IDS.len(), VOCAB]);
        let want: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let spread = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = max_diff(&ours, &want);
        eprintln!("{}: max |logit| {spread:.2}, max |diff| {diff:.2e} ({})", v.name, v.exercises);
        assert!(diff <= TOL, "{}: logits differ from transformers by {diff}", v.name);

        let (_, _, bytes) = &reference[&format!("{}.greedy", v.name)];
        let greedy: Vec<u32> = bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect();
        let g = generate(&model, &IDS, greedy.len(), Sampling::greedy(), &[], &mut |_| true).unwrap();
        assert_eq!(g.tokens, greedy, "{}: greedy tokens differ from transformers' generate", v.name);
    }
}

/// The paths the variants claim to exercise really move the logits: with the feature switched
/// off in config.json, the same weights disagree with transformers.
#[test]
fn each_variant_feature_changes_the_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = reference();
    for (v, dir) in write_all(tmp.path()) {
        let key = match v.name {
            "llama3" | "llama_linear" => "rope_scaling",
            "mistral" => "sliding_window",
            _ => continue,
        };
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        cfg.as_object_mut().unwrap().remove(key);
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let (_, _, bytes) = &reference[&format!("{}.logits", v.name)];
        let want: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let diff = max_diff(&logits(&load(&dir)), &want);
        assert!(diff > 100.0 * TOL, "{}: without {key} the logits still match ({diff})", v.name);
    }
    // The variants cover the claimed dtypes, biases, q/k norms and head layouts.
    let vs = tiny::variants();
    let has = |name: &str, tensor: &str| tiny::tensors(vs.iter().find(|v| v.name == name).unwrap()).iter().any(|t| t.name.ends_with(tensor));
    assert!(has("llama3", "o_proj.bias") && has("llama3", "up_proj.bias") && has("llama3", "lm_head.weight"));
    assert!(has("qwen2", "q_proj.bias") && !has("qwen2", "o_proj.bias") && !has("qwen2", "lm_head.weight"));
    assert!(has("qwen3", "q_norm.weight") && has("qwen3", "k_norm.weight"));
    let dtypes: Vec<DType> = write_all(tmp.path().join("again").as_path()).iter().map(|(_, d)| Checkpoint::open(d).unwrap().tensor("model.norm.weight").unwrap().dtype).collect();
    assert!([DType::BF16, DType::F16, DType::F32].iter().all(|d| dtypes.contains(d)));
}

/// Feeding tokens one at a time through the KV cache gives the logits of the full forward at
/// every position, on every variant (Mistral's window included).
#[test]
fn kv_cache_decode_equals_full_forward() {
    let tmp = tempfile::tempdir().unwrap();
    for (v, dir) in write_all(tmp.path()) {
        let model = load(&dir);
        let full = logits(&model);
        let mut cache = KvCache::new(model.layers.len());
        // A prefill of 5, then one token at a time.
        let mut rows = model.step(&[IDS[..5].to_vec()], &mut cache).unwrap().into_data().into_vec::<f32>().unwrap();
        assert!(max_diff(&rows, &full[4 * VOCAB..5 * VOCAB]) <= TOL, "{}: prefill", v.name);
        for (p, &id) in IDS.iter().enumerate().skip(5) {
            rows = model.step(&[vec![id]], &mut cache).unwrap().into_data().into_vec::<f32>().unwrap();
            let diff = max_diff(&rows, &full[p * VOCAB..(p + 1) * VOCAB]);
            assert!(diff <= TOL, "{}: position {p} differs by {diff}", v.name);
        }
        assert_eq!(cache.len(), IDS.len());
    }
}
