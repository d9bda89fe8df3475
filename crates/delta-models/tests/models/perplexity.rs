//! `results.json`'s held-out TinyStories perplexities (independent JAX implementation, same
//! protocol) reproduced within 1% for the base and the fine-tune.

use delta_format::Checkpoint;
use delta_models::perplexity::{perplexity, token_stream};
use delta_models::{CpuBackend, Llama, ModelConfig, Tokenizer, Weights};

fn ppl(dir: &std::path::Path, text: &str) -> (f64, usize) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let weights = Weights::<CpuBackend>::new(&ckpt, None, Default::default()).unwrap();
    let model = Llama::load(ModelConfig::load(dir).unwrap(), &weights).unwrap();
    let ids = token_stream(&Tokenizer::load(dir).unwrap(), text).unwrap();
    let r = perplexity(&model, None, &ids, 256, 4, &mut |_, _| {}).unwrap();
    (r.ppl, r.windows)
}

#[test]
fn heldout_perplexities_match_results_json() {
    let fx = delta_tests::fixtures();
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fx.join("smollm2/results.json")).unwrap()).unwrap();
    let text = std::fs::read_to_string(fx.join("text/tiny_heldout.utf8")).unwrap();
    let (base, ft) = delta_tests::smollm2();
    for (dir, key) in [(base, "base"), (ft, "finetuned")] {
        let want = results[key]["tiny_heldout_ppl"].as_f64().unwrap();
        let (got, windows) = ppl(&dir, &text);
        eprintln!("{key}: ppl {got:.4} (reference {want:.4}, {:+.3}%)", 100.0 * (got / want - 1.0));
        assert_eq!(windows as u64, results["windows"].as_u64().unwrap());
        assert!((got / want - 1.0).abs() < 0.01, "{key}: ppl {got} vs reference {want}");
    }
}

#[test]
fn protocol_edge_cases() {
    let (base, _) = delta_tests::smollm2();
    let tok = Tokenizer::load(&base).unwrap();
    // Separators, blank pieces and surrounding whitespace: only the two stories remain, each
    // followed by token 0.
    let ids = token_stream(&tok, "  Once upon a time.  <|endoftext|>\n\n<|endoftext|>The end.\n").unwrap();
    let a = tok.encode("Once upon a time.", false).unwrap();
    let b = tok.encode("The end.", false).unwrap();
    let expected: Vec<u32> = a.iter().chain([&0]).chain(b.iter()).chain([&0]).copied().collect();
    assert_eq!(ids, expected);
    assert!(!a.contains(&0) && !b.contains(&0));
}

/// The base and the fine-tune, and the held-out TinyStories token stream.
fn pair_and_heldout_ids() -> (Llama<CpuBackend>, Llama<CpuBackend>, Vec<u32>) {
    let (base, ft) = delta_tests::smollm2();
    let load = |dir: &std::path::Path| {
        let ckpt = Checkpoint::open(dir).unwrap();
        Llama::<CpuBackend>::load(ModelConfig::load(dir).unwrap(), &Weights::new(&ckpt, None, Default::default()).unwrap()).unwrap()
    };
    let text = std::fs::read_to_string(delta_tests::fixtures().join("text/tiny_heldout.utf8")).unwrap();
    let ids = token_stream(&Tokenizer::load(&base).unwrap(), &text).unwrap();
    (load(&base), load(&ft), ids)
}

/// KL to a teacher: zero against itself; against another model, the mean over predicted tokens of
/// Σ q·(log q − log p), checked at one window by host arithmetic in f64.
#[test]
fn kl_to_a_teacher() {
    let (b, f, ids) = pair_and_heldout_ids();
    let window = 32;
    let ids = &ids[..window + 1];
    let same = perplexity(&b, Some(&b), ids, window, 1, &mut |_, _| {}).unwrap();
    assert!(same.kl_to_teacher.unwrap().abs() < 1e-6, "{:?}", same.kl_to_teacher);
    let kl = perplexity(&b, Some(&f), ids, window, 1, &mut |_, _| {}).unwrap().kl_to_teacher.unwrap();
    let logits = |m: &Llama<CpuBackend>| m.forward(&[ids[..window].to_vec()]).unwrap().into_data().into_vec::<f32>().unwrap();
    let (p, q) = (logits(&b), logits(&f));
    let vocab = p.len() / window;
    let want = p
        .chunks(vocab)
        .zip(q.chunks(vocab))
        .map(|(pr, qr)| {
            let (lp, lq) = (delta_tests::log_softmax(pr), delta_tests::log_softmax(qr));
            lq.iter().zip(&lp).map(|(a, b)| a.exp() * (a - b)).sum::<f64>()
        })
        .sum::<f64>()
        / window as f64;
    assert!(want > 0.01, "base and fine-tune differ: {want}");
    assert!((kl - want).abs() <= 1e-3 * want, "{kl} vs {want}");
}

/// Per-window NLLs, their standard error and the gap to a teacher paired window by window,
/// against host arithmetic on plain forwards of each window (3 windows, 2 per batch).
#[test]
fn windows_and_the_gap_to_a_teacher() {
    let (b, f, ids) = pair_and_heldout_ids();
    let window = 16;
    let ids = &ids[..3 * window + 5];
    let r = perplexity(&b, Some(&f), ids, window, 2, &mut |_, _| {}).unwrap();
    let window_nll = |m: &Llama<CpuBackend>| -> Vec<f64> {
        ids.windows(window + 1).step_by(window).map(|w| {
            let logits = m.forward(&[w[..window].to_vec()]).unwrap().into_data().into_vec::<f32>().unwrap();
            let vocab = logits.len() / window;
            logits.chunks(vocab).zip(&w[1..]).map(|(row, &t)| -delta_tests::log_softmax(row)[t as usize]).sum::<f64>() / window as f64
        }).collect()
    };
    let (nb, nf) = (window_nll(&b), window_nll(&f));
    assert_eq!(nb.len(), 3);
    for (got, want) in r.window_nll.iter().zip(&nb) {
        assert!((got - want).abs() < 1e-4, "window NLL {got} vs {want}");
    }
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let se = |x: &[f64]| (x.iter().map(|v| (v - mean(x)).powi(2)).sum::<f64>() / 2.0 / 3.0).sqrt();
    assert!((r.mean_nll - mean(&nb)).abs() < 1e-4 && (r.nll_std_error - se(&nb)).abs() < 1e-4, "{} ± {} vs {} ± {}", r.mean_nll, r.nll_std_error, mean(&nb), se(&nb));
    let d: Vec<f64> = nb.iter().zip(&nf).map(|(x, y)| x - y).collect();
    let g = r.gap_to_teacher.unwrap();
    assert!(d.iter().all(|&x| x.abs() > 1e-2), "base and fine-tune differ on every window: {d:?}");
    assert!((g.reference_mean - mean(&nf)).abs() < 1e-4, "teacher NLL {} vs {}", g.reference_mean, mean(&nf));
    assert!((g.difference - mean(&d)).abs() < 1e-4 && (g.std_error - se(&d)).abs() < 1e-4, "gap {} ± {} vs {} ± {}", g.difference, g.std_error, mean(&d), se(&d));
    assert!(perplexity(&b, None, ids, window, 2, &mut |_, _| {}).unwrap().gap_to_teacher.is_none());
}

#[test]
fn paired_difference_by_hand() {
    let d = delta_models::perplexity::paired_difference(&[3.0, 5.0, 4.0], &[1.0, 2.0, 3.0]);
    // Differences 2, 3, 1: mean 2, sample variance 1, standard error 1/√3.
    assert_eq!((d.reference_mean, d.difference), (2.0, 2.0));
    assert!((d.std_error - 1.0 / 3f64.sqrt()).abs() < 1e-12, "{}", d.std_error);
}
