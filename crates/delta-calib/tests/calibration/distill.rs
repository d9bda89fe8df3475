//! Stage 2 (end-to-end distillation) on a tiny f32 pair: it lowers the held-out loss in every
//! scale mode, the loss it reports is the loss of the scales it writes (recomputed here from the
//! written artifact through an independent forward), and a run that diverges stops with an error
//! and leaves the scales alone.

use delta_calib::{compress, distill, CompressOptions, Compressed, DistillLoss, DistillOptions, DistillProgress, ScaleChoice};
use delta_format::{DeltaArtifact, ScaleMode};
use delta_models::{CpuBackend, Llama, ModelConfig, Weights};
use delta_tests::tiny::VOCAB;
use delta_tests::Rng;

use crate::common::{pair, Pair, T};

const SAMPLES: usize = 16;
const HELDOUT: usize = 4;

fn samples() -> Vec<Vec<u32>> {
    let mut rng = Rng::new(21);
    (0..SAMPLES).map(|_| (0..T).map(|_| rng.below(VOCAB) as u32).collect()).collect()
}

fn compressed(p: &Pair, mode: ScaleMode) -> Compressed {
    let opts = CompressOptions { scale: ScaleChoice::Fixed(mode), ..CompressOptions::default() };
    compress(&p.base, &p.ft, &opts, &mut |_, _, _| {}).unwrap()
}

/// The loss of the artifact written from `c` on the held-out samples, through the fused
/// (`DeltaLinear`) model and plain arithmetic on the host.
fn heldout_loss(p: &Pair, c: &Compressed, loss: DistillLoss, samples: &[Vec<u32>]) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("d.bitdelta.safetensors");
    c.write(&path, &p.ft, false).unwrap();
    let art = DeltaArtifact::open(&path).unwrap();
    let cfg = ModelConfig::load(p.ft.dir()).unwrap();
    let device = Default::default();
    let student = Llama::<CpuBackend>::load(cfg.clone(), &Weights::new(&p.base, Some(&art), device).unwrap().fused()).unwrap();
    let teacher = Llama::<CpuBackend>::load(cfg, &Weights::new(&p.ft, None, device).unwrap()).unwrap();
    let held = &samples[samples.len() - HELDOUT..];
    let values = |m: &Llama<CpuBackend>| m.forward(held).unwrap().into_data().into_vec::<f32>().unwrap();
    let (s, t) = (values(&student), values(&teacher));
    let vocab = s.len() / (HELDOUT * T);
    match loss {
        DistillLoss::Mse => s.iter().zip(&t).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / s.len() as f64,
        DistillLoss::Kl => {
            let total: f64 = s
                .chunks(vocab)
                .zip(t.chunks(vocab))
                .map(|(sr, tr)| {
                    let (ls, lt) = (delta_tests::log_softmax(sr), delta_tests::log_softmax(tr));
                    lt.iter().zip(&ls).map(|(a, b)| a.exp() * (a - b)).sum::<f64>()
                })
                .sum();
            total / (HELDOUT * T) as f64
        }
    }
}

fn options(loss: DistillLoss, lr: f64) -> DistillOptions {
    DistillOptions { loss, lr, batch: 4, epochs: 4, heldout: HELDOUT }
}

#[test]
fn distillation_lowers_the_heldout_loss_in_every_mode() {
    let p = pair();
    let samples = samples();
    for (mode, loss) in [
        (ScaleMode::Scalar, DistillLoss::Mse),
        (ScaleMode::PerOutput, DistillLoss::Mse),
        (ScaleMode::PerInput, DistillLoss::Mse),
        (ScaleMode::TwoSided, DistillLoss::Mse),
        (ScaleMode::PerOutput, DistillLoss::Kl),
    ] {
        let mut c = compressed(&p, mode);
        let start = heldout_loss(&p, &c, loss, &samples);
        let opts = options(loss, 0.05);
        let mut teacher_done = 0;
        let r = distill::<CpuBackend>(&mut c, &p.base, &p.ft, &samples, &opts, &Default::default(), &mut |p| {
            if let DistillProgress::Teacher { done, .. } = p {
                teacher_done = done;
            }
        })
        .unwrap();
        let what = format!("{} / {loss:?}", mode.name());
        assert_eq!(r.steps, 12, "{what}: 3 batches of 4 training samples, 4 epochs");
        assert_eq!(r.train_losses.len(), 12);
        // The reported losses are those of the artifacts before and after, computed independently.
        assert!((r.heldout_before - start).abs() <= 1e-4 * start, "{what}: reported {} vs recomputed {start}", r.heldout_before);
        let end = heldout_loss(&p, &c, loss, &samples);
        assert!((r.heldout_after - end).abs() <= 1e-4 * end, "{what}: reported {} vs recomputed {end}", r.heldout_after);
        // The tiny fine-tune is mostly noise a sign mask cannot follow (measured: 1-8% lower after
        // 12 steps); a gradient of the wrong sign or size would raise it.
        assert!(end < start, "{what}: held-out loss {start} -> {end}");
        assert!(c.weights.iter().all(|w| w.mode == mode), "{what}: modes are frozen");
        // The teacher ran over every sample.
        assert_eq!(teacher_done, samples.len(), "{what}");
    }
}

#[test]
fn a_diverging_run_stops_with_an_error_and_changes_nothing() {
    let p = pair();
    let mut c = compressed(&p, ScaleMode::PerOutput);
    let before: Vec<Vec<f32>> = c.weights.iter().map(|w| w.scales.to_vec()).collect();
    let err = distill::<CpuBackend>(&mut c, &p.base, &p.ft, &samples(), &options(DistillLoss::Mse, 1e30), &Default::default(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("diverged"), "{err}");
    let after: Vec<Vec<f32>> = c.weights.iter().map(|w| w.scales.to_vec()).collect();
    assert_eq!(before, after);
    for bad in [DistillOptions { heldout: 0, ..options(DistillLoss::Mse, 0.01) }, options(DistillLoss::Mse, f64::NAN)] {
        assert!(distill::<CpuBackend>(&mut c, &p.base, &p.ft, &samples(), &bad, &Default::default(), &mut |_| {}).is_err());
    }
}
