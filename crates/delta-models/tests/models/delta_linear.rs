//! Base + artifact through `DeltaLinear` (signs kept packed) against dense merged weights, on the
//! real pair, for every scale mode.

use delta_format::{Checkpoint, ScaleMode};
use delta_models::llama::Linear;
use delta_models::{CpuBackend, Llama, ModelConfig, Projection, Weights};

use crate::support;

type B = CpuBackend;

/// Replaces every DeltaLinear by a dense layer holding W_base + Δ̂ in f32 (unrounded).
fn densify(model: &mut Llama<B>) -> usize {
    let mut n = 0;
    let mut fix = |p: &mut Projection<B>| {
        if let Projection::Delta(d) = p {
            *p = Projection::Dense(Linear::from_tensor(d.merged_weight_t(), d.base.bias.clone()));
            n += 1;
        }
    };
    for l in &mut model.layers {
        l.projections_mut().into_iter().for_each(&mut fix);
    }
    n
}

fn logits(model: &Llama<B>, ids: &[u32]) -> Vec<f32> {
    model.forward(&[ids.to_vec()]).unwrap().into_data().into_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn delta_linear_matches_dense_merged_weights_for_every_mode() {
    let (base_dir, ft_dir) = delta_tests::smollm2();
    let (base, ft) = (Checkpoint::open(&base_dir).unwrap(), Checkpoint::open(&ft_dir).unwrap());
    let cfg = ModelConfig::load(&base_dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ids = support::chat_prompt_40();
    for mode in ScaleMode::ALL {
        let artifact = support::artifact(&base, &ft, mode, tmp.path());

        let fused = Llama::load(cfg.clone(), &Weights::<B>::new(&base, Some(&artifact), Default::default()).unwrap().fused()).unwrap();
        let mut dense = Llama::load(cfg.clone(), &Weights::<B>::new(&base, Some(&artifact), Default::default()).unwrap().fused()).unwrap();
        assert_eq!(densify(&mut dense), 210, "every block linear is a DeltaLinear");
        let merged_bf16 = Llama::load(cfg.clone(), &Weights::<B>::new(&base, Some(&artifact), Default::default()).unwrap()).unwrap();

        let (f, d, m) = (logits(&fused, &ids), logits(&dense, &ids), logits(&merged_bf16, &ids));
        let (fd, fm) = (max_diff(&f, &d), max_diff(&f, &m));
        eprintln!("{mode}: DeltaLinear vs dense f32 merge {fd:.2e}; vs bf16-rounded merge (what apply writes) {fm:.2e}");
        assert!(fd <= 1e-3, "{mode}: DeltaLinear differs from W_base + Δ̂ by {fd}");
    }
}
