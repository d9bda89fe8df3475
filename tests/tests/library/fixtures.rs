//! The fixtures built by `cargo xtask fixtures` (the project's own builder) are the reference ones.

use std::io::BufRead;

use delta_tests::fixtures::{model_digest, split_tiny_stories, BASE_DIGEST, FINETUNED_DIGEST};

#[test]
fn rebuilt_pair_has_the_reference_content_digests() {
    let (base, ft) = delta_tests::smollm2();
    assert_eq!(model_digest(&base).unwrap(), BASE_DIGEST);
    assert_eq!(model_digest(&ft).unwrap(), FINETUNED_DIGEST);
}

/// The reference rows: (text, the reference tokenizer's ids).
fn tokenizer_reference() -> Vec<(String, Vec<u32>)> {
    let fx = delta_tests::fixtures();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/smollm2/tokenizer_reference.jsonl.gz");
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()));
    let mut sources: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut rows = Vec::new();
    for line in reader.lines() {
        let line = line.unwrap();
        if line.starts_with('#') {
            continue;
        }
        let row: serde_json::Value = serde_json::from_str(&line).unwrap();
        let text = match row.get("text") {
            Some(t) => t.as_str().unwrap().to_string(),
            None => {
                let src = row["source"].as_str().unwrap();
                let lines = sources
                    .entry(src.to_string())
                    .or_insert_with(|| std::fs::read_to_string(fx.join(src)).unwrap().split('\n').map(str::to_string).collect());
                lines[row["line"].as_u64().unwrap() as usize].clone()
            }
        };
        rows.push((text, row["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()));
    }
    rows
}

/// `fixtures/smollm2/tokenizer_reference.jsonl.gz` holds the ids the reference tokenizer.json
/// gives (Python `tokenizers`, an independent implementation) for 2,900 lines of the fixture
/// text and a few chat-formatted strings; the tokenizer.json we build must give the same.
#[test]
fn rebuilt_tokenizer_encodes_like_the_reference() {
    let fx = delta_tests::fixtures();
    let tok = tokenizers::Tokenizer::from_file(fx.join("smollm2/base/tokenizer.json")).unwrap();
    let (mut checked, mut tokens) = (0, 0);
    for (text, expected) in tokenizer_reference() {
        let got = tok.encode(text.as_str(), true).unwrap();
        assert_eq!(got.get_ids(), expected.as_slice(), "{text:?}");
        checked += 1;
        tokens += expected.len();
    }
    assert!(checked > 2800 && tokens > 200_000, "{checked} lines, {tokens} tokens");
}

/// The tokenizer of the cut pair (`smollm2_first_blocks` with [`delta_tests::LAVAPIPE_TOKENS`],
/// through `cut_tokenizer`) encodes every reference text to ids below the cut that decode to the
/// same text as the reference ids, and to the reference ids themselves wherever those are all
/// below the cut (BPE applies its merges lowest rank first, and the ones dropped are those of the
/// later tokens).
#[test]
fn cut_tokenizer_keeps_to_its_tokens_and_the_text() {
    let cut_at = delta_tests::LAVAPIPE_TOKENS;
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = delta_tests::smollm2_first_blocks(1, Some(cut_at), tmp.path());
    let whole = tokenizers::Tokenizer::from_file(delta_tests::smollm2().0.join("tokenizer.json")).unwrap();
    let cut = tokenizers::Tokenizer::from_file(base.join("tokenizer.json")).unwrap();
    assert_eq!(cut.get_vocab_size(true), cut_at);
    let (mut same, mut differ) = (0, 0);
    for (text, expected) in tokenizer_reference() {
        let got = cut.encode(text.as_str(), true).unwrap().get_ids().to_vec();
        assert!(got.iter().all(|&id| (id as usize) < cut_at), "{text:?}: ids {got:?}");
        assert_eq!(cut.decode(&got, false).unwrap(), whole.decode(&expected, false).unwrap(), "{text:?}");
        if expected.iter().all(|&id| (id as usize) < cut_at) {
            assert_eq!(got, expected, "{text:?}");
            same += 1;
        } else {
            assert!(got.len() > expected.len(), "{text:?}: later tokens, yet no more ids");
            differ += 1;
        }
    }
    assert!(same > 100 && differ > 100, "{same} texts with only tokens below the cut, {differ} with later ones");
}

#[test]
fn tiny_stories_split_follows_the_protocol() {
    let text = "<|endoftext|>  a \n<|endoftext|>\u{1c}\n<|endoftext|>b<|endoftext|> c<|endoftext|>d\t";
    let docs = ["a", "b", "c", "d"]; // the empty and separator-only pieces are dropped
    let (train, held) = split_tiny_stories(text);
    assert_eq!(train, format!("{}\n", docs[..3].join("\n<|endoftext|>\n")));
    assert_eq!(held, "d\n");
}
