//! Multiple-choice scoring: on tiny random models, the log-likelihood `score_documents` returns
//! (documents packed into one sequence, each a shared prefix and its choices' own tokens) equals
//! the sum of the per-token log-softmax values of a plain full forward over each choice alone,
//! scored one document at a time or all together; on the real tokenizer, context / continuation
//! boundaries follow the request rules.

use delta_format::Checkpoint;
use delta_models::tasks::{encode_request, score_documents, EncodedChoice};
use delta_models::{CpuBackend, Llama, ModelConfig, Tokenizer, Weights};
use delta_tests::tiny;

fn choice(context: &[u32], continuation: &[u32]) -> EncodedChoice {
    EncodedChoice { context: context.to_vec(), continuation: continuation.to_vec() }
}

/// Σ log softmax(logits[k − 1])[token k] over the continuation, and whether each token is the
/// argmax, from one full forward over context + continuation, in f64 on the host.
fn by_hand(model: &Llama<CpuBackend>, c: &EncodedChoice) -> (f64, bool) {
    let full = [c.context.as_slice(), &c.continuation].concat();
    let logits = model.forward(&[full.clone()]).unwrap().into_data().into_vec::<f32>().unwrap();
    let vocab = logits.len() / full.len();
    let (mut sum, mut greedy) = (0f64, true);
    for k in c.context.len()..full.len() {
        let row = &logits[(k - 1) * vocab..k * vocab];
        sum += delta_tests::log_softmax(row)[full[k] as usize];
        greedy &= row.iter().all(|&v| v <= row[full[k] as usize]);
    }
    (sum, greedy)
}

#[test]
fn scores_are_sums_of_per_token_log_softmax() {
    let tmp = tempfile::tempdir().unwrap();
    for v in tiny::variants() {
        let dir = tmp.path().join(v.name);
        tiny::write(&v, &dir);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let model = Llama::<CpuBackend>::load(ModelConfig::load(&dir).unwrap(), &Weights::new(&ckpt, None, Default::default()).unwrap()).unwrap();
        let docs = [
            // ARC-like: one context, continuations of different lengths.
            vec![choice(&[1, 17, 42, 5], &[63, 8]), choice(&[1, 17, 42, 5], &[30]), choice(&[1, 17, 42, 5], &[2, 51, 9])],
            // Winogrande-like: contexts that part after two tokens, the same continuation.
            vec![choice(&[1, 17, 42, 5, 63], &[26, 30]), choice(&[1, 17, 9, 9], &[26, 30])],
            // No shared prefix at all; a one-token context.
            vec![choice(&[3], &[4, 5, 6]), choice(&[7, 8], &[9])],
        ];
        let together = score_documents(&model, &docs).unwrap();
        assert_eq!(together.len(), docs.len());
        for (doc, scored) in docs.iter().zip(&together) {
            let alone = score_documents(&model, std::slice::from_ref(doc)).unwrap().remove(0);
            assert_eq!(scored.len(), doc.len());
            for ((c, s), a) in doc.iter().zip(scored).zip(&alone) {
                let (want, greedy) = by_hand(&model, c);
                for s in [s, a] {
                    assert!((s.loglik - want).abs() <= 1e-4 * want.abs().max(1.0), "{}: {c:?}: {} vs {want}", v.name, s.loglik);
                    assert_eq!(s.greedy, greedy, "{}: {c:?}", v.name);
                }
            }
        }
        assert!(score_documents(&model, &[vec![choice(&[], &[1])]]).is_err());
        assert!(score_documents(&model, &[vec![choice(&[1], &[])]]).is_err());
        assert!(score_documents(&model, &[vec![]]).is_err());
    }
}

#[test]
fn request_boundaries_follow_the_harness_rules() {
    let (_, ft) = delta_tests::smollm2();
    let tok = Tokenizer::load(&ft).unwrap();
    let eot = tok.token_id("<|endoftext|>").unwrap();
    for (context, continuation) in [
        ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone"),
        // Trailing whitespace of the context belongs to the continuation.
        ("The cat sat on the ", "mat."),
        ("Fill in: the trophy didn't fit because", " it was too big"),
    ] {
        let e = encode_request(&tok, context, continuation, eot).unwrap();
        let trimmed = context.trim_end();
        let whole = tok.encode(&format!("{context}{continuation}"), false).unwrap();
        assert_eq!([e.context.as_slice(), &e.continuation].concat(), whole, "{context:?}");
        assert_eq!(e.context, tok.encode(trimmed, false).unwrap(), "{context:?}");
        assert_eq!(tok.decode(&e.continuation).unwrap(), format!("{}{continuation}", &context[trimmed.len()..]));
    }
    // An empty context is the end-of-text token.
    let e = encode_request(&tok, "", "Hello", eot).unwrap();
    assert_eq!(e.context, vec![eot]);
    assert_eq!(e.continuation, tok.encode("Hello", false).unwrap());
    assert!(encode_request(&tok, "Hi", "", eot).is_err());
}
