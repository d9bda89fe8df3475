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
    let r = perplexity(&model, &ids, 256, 4, &mut |_, _| {}).unwrap();
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
