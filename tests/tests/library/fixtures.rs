//! The fixtures built by `cargo xtask fixtures` (the project's own builder) are the reference ones.

use std::io::BufRead;

use delta_tests::fixtures::{model_digest, split_tiny_stories, BASE_DIGEST, FINETUNED_DIGEST};

#[test]
fn rebuilt_pair_has_the_reference_content_digests() {
    let (base, ft) = delta_tests::smollm2();
    assert_eq!(model_digest(&base).unwrap(), BASE_DIGEST);
    assert_eq!(model_digest(&ft).unwrap(), FINETUNED_DIGEST);
}

/// `fixtures/smollm2/tokenizer_reference.jsonl.gz` holds the ids the reference tokenizer.json
/// gives (Python `tokenizers`, an independent implementation) for 2,900 lines of the fixture
/// text and a few chat-formatted strings; the tokenizer.json we build must give the same.
#[test]
fn rebuilt_tokenizer_encodes_like_the_reference() {
    let fx = delta_tests::fixtures();
    let tok = tokenizers::Tokenizer::from_file(fx.join("smollm2/base/tokenizer.json")).unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/smollm2/tokenizer_reference.jsonl.gz");
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()));
    let mut sources: std::collections::HashMap<String, Vec<String>> = Default::default();
    let (mut checked, mut tokens) = (0, 0);
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
        let expected: Vec<u32> = row["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text.as_str(), true).unwrap();
        assert_eq!(got.get_ids(), expected.as_slice(), "{text:?}");
        checked += 1;
        tokens += expected.len();
    }
    assert!(checked > 2800 && tokens > 200_000, "{checked} lines, {tokens} tokens");
}

#[test]
fn tiny_stories_split_follows_the_protocol() {
    let text = "<|endoftext|>  a \n<|endoftext|>\u{1c}\n<|endoftext|>b<|endoftext|> c<|endoftext|>d\t";
    let docs = ["a", "b", "c", "d"]; // the empty and separator-only pieces are dropped
    let (train, held) = split_tiny_stories(text);
    assert_eq!(train, format!("{}\n", docs[..3].join("\n<|endoftext|>\n")));
    assert_eq!(held, "d\n");
}
