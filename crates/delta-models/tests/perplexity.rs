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

/// KL to a teacher: zero against itself; against another model, the mean over predicted tokens of
/// Σ q·(log q − log p), checked at one window by host arithmetic in f64.
#[test]
fn kl_to_a_teacher() {
    let (base, ft) = delta_tests::smollm2();
    let load = |dir: &std::path::Path| {
        let ckpt = Checkpoint::open(dir).unwrap();
        Llama::<CpuBackend>::load(ModelConfig::load(dir).unwrap(), &Weights::new(&ckpt, None, Default::default()).unwrap()).unwrap()
    };
    let (b, f) = (load(&base), load(&ft));
    let text = std::fs::read_to_string(delta_tests::fixtures().join("text/tiny_heldout.utf8")).unwrap();
    let ids = token_stream(&Tokenizer::load(&base).unwrap(), &text).unwrap();
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
