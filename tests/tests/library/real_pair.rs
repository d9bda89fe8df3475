//! Library-level checks on the real SmolLM2 pair, for every scale mode.

use delta_calib::{compress, CompressOptions, ScaleChoice};
use delta_format::checkpoint::Checkpoint;
use delta_format::{DeltaArtifact, ScaleMode};
use delta_kernels::delta::direct_error;
use delta_kernels::{merge, merge_reference};

#[test]
fn every_mode_writes_reads_and_merges_like_the_reference_on_the_real_pair() {
    let (b, f) = delta_tests::smollm2();
    let base = Checkpoint::open(&b).unwrap();
    let ft = Checkpoint::open(&f).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for mode in ScaleMode::ALL {
        let options = CompressOptions { scale: ScaleChoice::Fixed(mode), ..CompressOptions::default() };
        let c = compress(&base, &ft, &options, &mut |_, _, _| {}).unwrap();
        assert_eq!(c.weights.len(), 210);
        let path = dir.path().join(format!("{mode}.bitdelta.safetensors"));
        c.write(&path, &ft, false).unwrap();
        let a = DeltaArtifact::open(&path).unwrap();
        for (w, r) in c.weights.iter().zip(&c.reports) {
            let got = a.weight(&w.name).unwrap();
            assert_eq!(got.signs.words(), w.signs.words());
            assert_eq!(&got.scales[..], &w.scales[..]);
            assert_eq!(r.mode, mode);
            // The weight-space error is far from zero but well under ‖Δ‖.
            assert!(r.rel_error > 0.3 && r.rel_error < 0.95, "{}: {}", w.name, r.rel_error);
        }
        // Fast merge equals the plain reference, bit for bit, on the first and last blocks.
        for w in a.weights().filter(|w| w.name.starts_with("model.layers.0.") || w.name.starts_with("model.layers.29.")) {
            let view = base.tensor(&w.name).unwrap();
            assert!(merge(&view, &w).unwrap() == merge_reference(&view, &w).unwrap(), "{mode} {}", w.name);
        }
        a.metadata().base.verify(&base).unwrap();
        assert!(a.metadata().base.verify(&ft).is_err(), "the fine-tune must not pass as the base");
    }
}

#[test]
fn auto_keeps_the_mode_with_the_smallest_error_on_the_real_pair() {
    let (b, f) = delta_tests::smollm2();
    let base = Checkpoint::open(&b).unwrap();
    let ft = Checkpoint::open(&f).unwrap();
    let options = CompressOptions { scale: ScaleChoice::Auto, ..CompressOptions::default() };
    let c = compress(&base, &ft, &options, &mut |_, _, _| {}).unwrap();
    for (k, (w, r)) in c.weights.iter().zip(&c.reports).enumerate() {
        assert_eq!(r.candidates.len(), 4);
        let min = r.candidates.values().cloned().fold(f64::INFINITY, f64::min);
        assert_eq!(r.rel_error, min, "{}", w.name);
        assert_eq!(r.candidates[w.mode.name()], min);
        if k % 30 == 0 {
            // The reported error is the true ‖Δ − Δ̂‖ / ‖Δ‖, recomputed by direct summation.
            let (bv, fv) = (base.tensor(&w.name).unwrap(), ft.tensor(&w.name).unwrap());
            let direct = direct_error(&w.name, &bv, &fv, &w.signs, w.mode, &w.scales).unwrap();
            let sq: f64 = {
                let d = direct_error(&w.name, &bv, &fv, &w.signs, ScaleMode::Scalar, &[0.0]).unwrap();
                d.sqrt()
            };
            assert!((direct.sqrt() / sq - r.rel_error).abs() < 1e-9, "{}", w.name);
        }
    }
    // Per-output and per-input both refine scalar, so neither can lose to it.
    for r in &c.reports {
        assert!(r.candidates["per-output"] <= r.candidates["scalar"] + 1e-12);
        assert!(r.candidates["per-input"] <= r.candidates["scalar"] + 1e-12);
    }
}
