//! The model against logits computed by an independent implementation (JAX, f32) for both
//! prompts of `reference_logits.safetensors`, for the base and the fine-tune.
//!
//! The contract is 1e-2; we assert 1e-3 (measured: ≤ 2.1e-4), because a real bug seen
//! here — an approximate SIMD reciprocal in RMSNorm — moved logits by about 1e-2 and would have
//! slipped under the looser bound.

const TOL: f32 = 1e-3;

use delta_format::checkpoint::SafetensorsFile;
use delta_format::Checkpoint;
use delta_models::generate::{generate, Sampling};
use delta_models::{CpuBackend, Llama, ModelConfig, Weights};

struct Reference {
    file: SafetensorsFile,
}

impl Reference {
    fn f32(&self, name: &str) -> Vec<f32> {
        let info = self.file.header.info(name).unwrap_or_else(|| panic!("{name}"));
        self.file.view(info).as_f32().unwrap().into_owned()
    }

    fn i32(&self, name: &str) -> Vec<i32> {
        let info = self.file.header.info(name).unwrap();
        self.file.view(info).data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
    }
}

fn logsumexp(row: &[f32]) -> f64 {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

fn check_model(dir: &std::path::Path, which: &str, reference: &Reference) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let cfg = ModelConfig::load(dir).unwrap();
    let weights = Weights::<CpuBackend>::new(&ckpt, None, Default::default()).unwrap();
    let model = Llama::load(cfg, &weights).unwrap();
    for prompt in ["chat", "story"] {
        let ids: Vec<u32> = reference.i32(&format!("{prompt}.input_ids")).iter().map(|&i| i as u32).collect();
        let t = ids.len();
        let logits = model.forward(&[ids.clone()]).unwrap().into_data().into_vec::<f32>().unwrap();
        let vocab = logits.len() / t;
        let top_ids = reference.i32(&format!("{prompt}.{which}.top_ids"));
        let top_logits = reference.f32(&format!("{prompt}.{which}.top_logits"));
        let lse = reference.f32(&format!("{prompt}.{which}.logsumexp"));
        let mut worst = 0f32;
        for p in 0..t {
            let row = &logits[p * vocab..(p + 1) * vocab];
            // Same top-64 set (ties aside): every reference id is in our top 64, unless its
            // value ties with the 64th within tolerance; and values agree.
            let mut order: Vec<usize> = (0..vocab).collect();
            order.select_nth_unstable_by(63, |&a, &b| row[b].total_cmp(&row[a]));
            let ours: std::collections::HashSet<usize> = order[..64].iter().copied().collect();
            let threshold = top_logits[p * 64 + 63];
            for k in 0..64 {
                let id = top_ids[p * 64 + k] as usize;
                let want = top_logits[p * 64 + k];
                let diff = (row[id] - want).abs();
                worst = worst.max(diff);
                assert!(diff <= TOL, "{which} {prompt} pos {p} id {id}: {} vs {want}", row[id]);
                assert!(ours.contains(&id) || (want - threshold).abs() <= TOL, "{which} {prompt} pos {p}: id {id} not in our top 64");
            }
            let d = (logsumexp(row) - lse[p] as f64).abs();
            assert!(d <= TOL as f64, "{which} {prompt} pos {p}: logsumexp {} vs {}", logsumexp(row), lse[p]);
        }
        let last = reference.f32(&format!("{prompt}.{which}.last_logits"));
        let row = &logits[(t - 1) * vocab..];
        let max_diff = row.iter().zip(&last).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff <= TOL, "{which} {prompt}: last row differs by up to {max_diff}");
        eprintln!("{which} {prompt}: {t} positions, top-64 max |diff| {worst:.2e}, last row max |diff| {max_diff:.2e}");

        // Greedy generation (prefill + KV-cached decode) starts with the reference's argmax, and
        // each cached step picks what a full forward over the whole prefix picks.
        let g = generate(&model, &ids, 4, Sampling::greedy(), &[], &mut |_| true).unwrap();
        assert_eq!(g.tokens[0], argmax(&last), "{which} {prompt}: first generated token");
        let mut all = ids.clone();
        all.extend(&g.tokens[..3]);
        let full = model.forward(&[all.clone()]).unwrap().into_data().into_vec::<f32>().unwrap();
        for k in 0..4 {
            let row = &full[(t - 1 + k) * vocab..(t + k) * vocab];
            assert_eq!(g.tokens[k], argmax(row), "{which} {prompt}: generated token {k}");
        }
    }
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }) as u32
}

#[test]
fn base_and_finetune_match_the_reference_logits() {
    let fx = delta_tests::fixtures();
    let reference = Reference { file: SafetensorsFile::open(&fx.join("smollm2/reference_logits.safetensors")).unwrap() };
    let (base, ft) = delta_tests::smollm2();
    check_model(&base, "base", &reference);
    check_model(&ft, "finetuned", &reference);
}
