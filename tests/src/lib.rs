//! Test support shared by every crate's tests: where the real fixtures are, and small synthetic
//! model folders written with the reference `safetensors` crate (so our reader is checked
//! against an independent writer, and our writer against an independent reader).

pub mod http;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The fixture folder: `$DELTA_FIXTURES`, else `~/.cache/delta-fixtures`. Panics with the
/// command that builds it when it is missing, so a test never passes for lack of data.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("DELTA_FIXTURES")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/delta-fixtures")))
        .expect("neither DELTA_FIXTURES nor HOME is set");
    if !dir.join(".complete").exists() {
        panic!(
            "real fixtures not found in {} — build them with `cargo xtask fixtures` \
             (or set DELTA_FIXTURES to a folder that holds them)",
            dir.display()
        );
    }
    dir
}

/// The SmolLM2 base / fine-tune pair: (base, finetuned) folders.
pub fn smollm2() -> (PathBuf, PathBuf) {
    let d = fixtures().join("smollm2");
    (d.join("base"), d.join("finetuned"))
}

/// How many of the SmolLM2 pair's 30 blocks the checks on Mesa's lavapipe run (through
/// [`smollm2_first_blocks`]).
pub const LAVAPIPE_BLOCKS: usize = 4;

/// How many of the SmolLM2 vocabulary's 49,152 tokens the checks on Mesa's lavapipe keep
/// (through [`smollm2_first_blocks`]): the first 4,096, which hold the special tokens, every
/// token of the byte-level alphabet and the most frequent merges.
pub const LAVAPIPE_TOKENS: usize = 4_096;

/// The SmolLM2 pair cut to its first `blocks` blocks, written into `dir`: (base, finetuned)
/// folders whose `config.json` says `num_hidden_layers: blocks`, whose weights are the real
/// pair's tensors byte for byte less those of the later blocks, and whose other files (the
/// tokenizer, its template) are links. For the checks on Mesa's lavapipe, where every block
/// costs seconds: a block's kernels and shapes are those of every other block.
///
/// `tokens`: also keep only the first `tokens` rows of the embedding (and of an untied LM head),
/// with `vocab_size` to match, and the tokenizer's first `tokens` tokens ([`cut_tokenizer`]), so
/// that text encodes to ids below it. The LM head is not a delta weight, and on lavapipe its
/// 49,152 columns dominate a fresh machine's time: CubeCL times each candidate GEMM 13 times for
/// every new shape.
pub fn smollm2_first_blocks(blocks: usize, tokens: Option<usize>, dir: &Path) -> (PathBuf, PathBuf) {
    let (base, ft) = smollm2();
    (first_blocks(&base, blocks, tokens, &dir.join("base")), first_blocks(&ft, blocks, tokens, &dir.join("finetuned")))
}

fn first_blocks(from: &Path, blocks: usize, tokens: Option<usize>, to: &Path) -> PathBuf {
    let later = |name: &str| {
        let block = name.strip_prefix("model.layers.").and_then(|rest| rest.split('.').next()).and_then(|b| b.parse::<usize>().ok());
        block.is_some_and(|b| b >= blocks)
    };
    let per_token = |name: &str| name == "model.embed_tokens.weight" || name == "lm_head.weight";
    linked_copy(from, to, |name, path, target| {
        assert!(!name.ends_with(".index.json"), "{}: sharded checkpoints are not cut here", path.display());
        if name == "config.json" {
            let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            let all = config["num_hidden_layers"].as_u64().unwrap() as usize;
            assert!(blocks <= all, "{} has {all} blocks, fewer than {blocks}", from.display());
            config["num_hidden_layers"] = blocks.into();
            if let Some(t) = tokens {
                assert!(t <= config["vocab_size"].as_u64().unwrap() as usize, "{}: fewer than {t} tokens", from.display());
                config["vocab_size"] = t.into();
            }
            std::fs::write(target, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        } else if let (Some(t), "tokenizer.json") = (tokens, name) {
            let mut tokenizer: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            cut_tokenizer(&mut tokenizer, t);
            std::fs::write(target, tokenizer.to_string()).unwrap();
        } else if name.ends_with(".safetensors") {
            let bytes = std::fs::read(path).unwrap();
            let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
                .tensors()
                .into_iter()
                .filter(|(n, _)| !later(n))
                .map(|(n, view)| match tokens {
                    Some(t) if per_token(&n) => {
                        let mut shape = view.shape().to_vec();
                        let row = view.data().len() / shape[0];
                        shape[0] = t;
                        let cut = safetensors::tensor::TensorView::new(view.dtype(), shape, &view.data()[..t * row]).unwrap();
                        (n, cut)
                    }
                    _ => (n, view),
                })
                .collect();
            safetensors::serialize_to_file(kept, header.metadata().clone(), target).unwrap();
        } else {
            return false;
        }
        true
    });
    to.to_path_buf()
}

/// Keeps a byte-level BPE `tokenizer.json`'s first `tokens` tokens: the vocabulary entries and
/// added tokens with smaller ids, and the merges whose two parts and result are all kept. The cut
/// tokenizer encodes any text (its single-character tokens must all be kept, asserted) to ids
/// below `tokens`: where the whole one would use a dropped merge, it stops at the parts.
pub fn cut_tokenizer(tokenizer: &mut serde_json::Value, tokens: usize) {
    let model = &mut tokenizer["model"];
    assert_eq!(model["type"], "BPE", "only BPE tokenizers are cut here");
    let vocab = model["vocab"].as_object_mut().expect("a BPE vocabulary");
    let below = |id: &serde_json::Value| id.as_u64().is_some_and(|i| (i as usize) < tokens);
    let dropped_letter = vocab.iter().find(|(piece, id)| piece.chars().count() == 1 && !below(id)).map(|(p, _)| p.clone());
    assert!(dropped_letter.is_none(), "cutting the vocabulary to {tokens} tokens drops the single-character token {dropped_letter:?}");
    vocab.retain(|_, id| below(id));
    let kept: std::collections::HashSet<String> = vocab.keys().cloned().collect();
    let parts = |merge: &serde_json::Value| -> (String, String) {
        let pair: Vec<&str> = match merge {
            serde_json::Value::String(pair) => pair.splitn(2, ' ').collect(),
            serde_json::Value::Array(parts) => parts.iter().filter_map(|p| p.as_str()).collect(),
            _ => Vec::new(),
        };
        assert_eq!(pair.len(), 2, "a merge that is neither \"a b\" nor [a, b]: {merge}");
        (pair[0].to_string(), pair[1].to_string())
    };
    model["merges"].as_array_mut().expect("BPE merges").retain(|m| {
        let (a, b) = parts(m);
        kept.contains(&a) && kept.contains(&b) && kept.contains(&(a + &b))
    });
    if let Some(added) = tokenizer["added_tokens"].as_array_mut() {
        added.retain(|t| below(&t["id"]));
    }
}

/// `dest`: a new folder of links to the files of the model folder `src`, but for those `rewrite`
/// handles. It gets each file's name, its path and its path in `dest`, and returns whether it
/// handled the file (wrote it, or left it out); otherwise the file is linked.
pub fn linked_copy(src: &Path, dest: &Path, mut rewrite: impl FnMut(&str, &Path, &Path) -> bool) {
    std::fs::create_dir_all(dest).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let target = dest.join(path.file_name().unwrap());
        if !rewrite(path.file_name().unwrap().to_str().unwrap(), &path, &target) {
            std::os::unix::fs::symlink(&path, &target).unwrap();
        }
    }
}

/// [`linked_copy`] of `src` with its JSON file `name` written with `edit` made.
pub fn edited_copy(src: &Path, dest: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) {
    linked_copy(src, dest, |file, path, target| {
        if file != name {
            return false;
        }
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        edit(&mut json);
        std::fs::write(target, json.to_string()).unwrap();
        true
    });
}

/// The first turn [`with_own_files`] puts at the head of every chat prompt.
pub const OWN_SYSTEM_TURN: &str = "<|im_start|>system\nAnswer like a pirate.<|im_end|>\n";

/// [`linked_copy`] of the fine-tune `ft` with side files of its own, as a fine-tune that brings
/// them has: its chat template opens every prompt with [`OWN_SYSTEM_TURN`], and its
/// `config.json` is edited by `config`.
pub fn with_own_files(ft: &Path, dest: &Path, config: impl Fn(&mut serde_json::Value)) {
    linked_copy(ft, dest, |file, path, target| {
        let mut json: serde_json::Value = match file {
            "tokenizer_config.json" | "config.json" => serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap(),
            _ => return false,
        };
        if file == "config.json" {
            config(&mut json);
        } else {
            let template = json["chat_template"].as_str().expect("the fine-tune has a chat template");
            json["chat_template"] = format!("{OWN_SYSTEM_TURN}{template}").into();
        }
        std::fs::write(target, json.to_string()).unwrap();
        true
    });
}

/// The tokens [`with_added_tokens`] adds, with the ids after the fine-tune's vocabulary.
pub const ADDED_TOKENS: [&str; 3] = ["<|pirate|>", "<|parrot|>", "<|treasure|>"];

/// A copy of the fine-tune `ft` in `dest` that added [`ADDED_TOKENS`] to its vocabulary, as a
/// fine-tune that brings new special tokens is: the tokenizer knows them, `config.json` counts
/// them, and the (tied) embedding has a row for each — the mean of two rows it already had.
pub fn with_added_tokens(ft: &Path, dest: &Path) {
    linked_copy(ft, dest, |file, path, target| {
        match file {
            "model.safetensors" => {
                let mut tensors = read_tensors(path);
                let (dtype, shape, data) = tensors.get_mut("model.embed_tokens.weight").expect("an embedding");
                let width = shape[1];
                let mut values = RawTensor::values(*dtype, data);
                for k in 0..ADDED_TOKENS.len() {
                    let (a, b) = (100 + k, 2000 + 7 * k);
                    let row: Vec<f32> = (0..width).map(|j| 0.5 * (values[a * width + j] + values[b * width + j])).collect();
                    values.extend(row);
                }
                shape[0] += ADDED_TOKENS.len();
                *data = RawTensor::from_f32("", *dtype, shape, &values).data;
                let views: Vec<_> = tensors.iter().map(|(n, (d, sh, v))| (n.clone(), safetensors::tensor::TensorView::new(*d, sh.clone(), v).unwrap())).collect();
                safetensors::serialize_to_file(views, Some(HashMap::from([("format".to_string(), "pt".to_string())])), target).unwrap();
            }
            "config.json" | "tokenizer.json" => {
                let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
                if file == "config.json" {
                    json["vocab_size"] = (json["vocab_size"].as_u64().unwrap() + ADDED_TOKENS.len() as u64).into();
                } else {
                    let vocab = json["model"]["vocab"].as_object().unwrap().len();
                    let added = json["added_tokens"].as_array_mut().unwrap();
                    for (k, token) in ADDED_TOKENS.iter().enumerate() {
                        added.push(serde_json::json!({
                            "id": vocab + k, "content": token, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true
                        }));
                    }
                }
                std::fs::write(target, json.to_string()).unwrap();
            }
            _ => return false,
        }
        true
    });
}

/// A tensor for [`write_folder`]: name, safetensors dtype, shape, raw little-endian bytes.
pub struct RawTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// Encodes `values` as `dtype` (BF16 / F16 rounded to nearest even by the `half` crate).
    pub fn from_f32(name: &str, dtype: safetensors::Dtype, shape: &[usize], values: &[f32]) -> Self {
        use safetensors::Dtype;
        let data = match dtype {
            Dtype::BF16 => values.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            Dtype::F16 => values.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
            Dtype::F32 => values.iter().flat_map(|&x| x.to_le_bytes()).collect(),
            d => panic!("from_f32: unsupported dtype {d:?}"),
        };
        RawTensor { name: name.into(), dtype, shape: shape.to_vec(), data }
    }

    /// Decodes a float tensor's values to f32.
    pub fn values(dtype: safetensors::Dtype, data: &[u8]) -> Vec<f32> {
        use safetensors::Dtype;
        match dtype {
            Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            d => panic!("values: unsupported dtype {d:?}"),
        }
    }
}

/// Writes a model folder: `model.safetensors` through the reference crate, plus a `config.json`.
pub fn write_folder(dir: &Path, tensors: &[RawTensor]) {
    std::fs::create_dir_all(dir).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
        .collect();
    let md = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(md), &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama"}"#).unwrap();
}

/// Reads every tensor of a safetensors file with the reference crate: name -> (dtype, shape, bytes).
pub fn read_tensors(path: &Path) -> HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

/// A deterministic pseudo-random stream (xorshift), so tests need no RNG crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A small Llama-like pair: `layers` blocks of q/k/v/o/gate/up/down with odd widths, norms and
/// an embedding, in `dtype`. The fine-tune perturbs every linear weight and the norms; the
/// embedding is unchanged. Returns (base, finetuned) tensors.
pub fn synthetic_pair(dtype: safetensors::Dtype, layers: usize, seed: u64) -> (Vec<RawTensor>, Vec<RawTensor>) {
    let mut rng = Rng::new(seed);
    let (hidden, ffn, kv) = (40, 72, 24);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![50, hidden]), ("model.norm.weight".into(), vec![hidden])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("self_attn.q_proj", vec![hidden, hidden]),
            ("self_attn.k_proj", vec![kv, hidden]),
            ("self_attn.v_proj", vec![kv, hidden]),
            ("self_attn.o_proj", vec![hidden, hidden]),
            ("mlp.gate_proj", vec![ffn, hidden]),
            ("mlp.up_proj", vec![ffn, hidden]),
            ("mlp.down_proj", vec![hidden, ffn]),
            ("input_layernorm", vec![hidden]),
            ("post_attention_layernorm", vec![hidden]),
        ] {
            shapes.push((format!("{p}.{n}.weight"), s));
        }
    }
    let (mut base, mut ft) = (Vec::new(), Vec::new());
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let b: Vec<f32> = (0..n).map(|_| rng.uniform() * 0.1).collect();
        let f: Vec<f32> = if name.contains("embed") { b.clone() } else { b.iter().map(|x| x + rng.uniform() * 0.01).collect() };
        base.push(RawTensor::from_f32(&name, dtype, &shape, &b));
        ft.push(RawTensor::from_f32(&name, dtype, &shape, &f));
    }
    (base, ft)
}

pub mod fixtures;
pub mod tiny;

/// log softmax of one row of logits, in f64 on the host: the plain formula tests compare against.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}
