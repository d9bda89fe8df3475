//! Tiny random checkpoints of every architecture variant the models crate claims, written as
//! Hugging Face folders (config.json + safetensors through the reference writer). Their reference
//! logits come from Python `transformers` (`fixtures/tiny/reference.py`, run once, committed as
//! `fixtures/tiny/reference_logits.safetensors`); the tests rebuild the same folders and compare.

use std::path::Path;

use safetensors::Dtype;
use serde_json::json;

use crate::{write_folder, RawTensor, Rng};

/// One variant: a name, the paths it exercises, and its `config.json`.
pub struct Variant {
    pub name: &'static str,
    pub exercises: &'static str,
    pub config: serde_json::Value,
    pub dtype: Dtype,
}

/// Token ids every variant is run on (12 positions: longer than Mistral's window of 4).
pub const IDS: [u32; 12] = [1, 17, 42, 5, 63, 8, 30, 30, 2, 51, 9, 26];
pub const VOCAB: usize = 64;

pub fn variants() -> Vec<Variant> {
    let common = |arch: &str, model_type: &str| {
        json!({
            "architectures": [arch], "model_type": model_type, "vocab_size": VOCAB, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": 2,
        })
    };
    let with = |mut base: serde_json::Value, extra: serde_json::Value| {
        base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        base
    };
    vec![
        Variant {
            name: "llama3",
            exercises: "Llama-3 rope_scaling (all three frequency bands), untied head, attention and MLP biases, GQA, bf16",
            config: with(common("LlamaForCausalLM", "llama"), json!({
                "head_dim": 8, "attention_bias": true, "mlp_bias": true,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            })),
            dtype: Dtype::BF16,
        },
        Variant {
            name: "llama_linear",
            exercises: "linear rope_scaling, tied embeddings, multi-head (no GQA), f16",
            config: with(common("LlamaForCausalLM", "llama"), json!({
                "num_key_value_heads": 4, "tie_word_embeddings": true,
                "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            })),
            dtype: Dtype::F16,
        },
        Variant {
            name: "mistral",
            exercises: "sliding-window attention (window 4 over 12 positions), untied head, f32",
            config: with(common("MistralForCausalLM", "mistral"), json!({"sliding_window": 4, "head_dim": 8})),
            dtype: Dtype::F32,
        },
        Variant {
            name: "qwen2",
            exercises: "q/k/v biases without o bias, tied embeddings, bf16",
            config: with(common("Qwen2ForCausalLM", "qwen2"), json!({
                "tie_word_embeddings": true, "use_sliding_window": false, "sliding_window": 4,
            })),
            dtype: Dtype::BF16,
        },
        Variant {
            name: "qwen3",
            exercises: "per-head q/k RMSNorm, head_dim 16 with heads x head_dim != hidden, f32",
            config: with(common("Qwen3ForCausalLM", "qwen3"), json!({
                "head_dim": 16, "attention_bias": false, "use_sliding_window": false,
            })),
            dtype: Dtype::F32,
        },
    ]
}

/// Names and shapes of the tensors a Llama-family `config.json` calls for (biases, q/k norms and
/// an untied head where the config has them), as Hugging Face names them.
pub fn shapes(c: &serde_json::Value) -> Vec<(String, Vec<usize>)> {
    let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("config.json has no {k}")) as usize;
    let (vocab, hidden, ffn, heads, kv, layers) =
        (n("vocab_size"), n("hidden_size"), n("intermediate_size"), n("num_attention_heads"), n("num_key_value_heads"), n("num_hidden_layers"));
    let d = c["head_dim"].as_u64().map_or(hidden / heads, |d| d as usize);
    let flag = |k: &str| c[k].as_bool().unwrap_or(false);
    let model_type = c["model_type"].as_str().unwrap_or("llama");
    let qkv_bias = flag("attention_bias") || model_type == "qwen2";
    let o_bias = flag("attention_bias") && model_type != "qwen2";
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, hidden]), ("model.norm.weight".into(), vec![hidden])];
    if !flag("tie_word_embeddings") {
        shapes.push(("lm_head.weight".into(), vec![vocab, hidden]));
    }
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let mut add = |name: &str, shape: Vec<usize>| shapes.push((format!("{p}.{name}"), shape));
        add("input_layernorm.weight", vec![hidden]);
        add("post_attention_layernorm.weight", vec![hidden]);
        for (proj, out, inp, bias) in [
            ("self_attn.q_proj", heads * d, hidden, qkv_bias),
            ("self_attn.k_proj", kv * d, hidden, qkv_bias),
            ("self_attn.v_proj", kv * d, hidden, qkv_bias),
            ("self_attn.o_proj", hidden, heads * d, o_bias),
            ("mlp.gate_proj", ffn, hidden, flag("mlp_bias")),
            ("mlp.up_proj", ffn, hidden, flag("mlp_bias")),
            ("mlp.down_proj", hidden, ffn, flag("mlp_bias")),
        ] {
            add(&format!("{proj}.weight"), vec![out, inp]);
            if bias {
                add(&format!("{proj}.bias"), vec![out]);
            }
        }
        if model_type == "qwen3" {
            add("self_attn.q_norm.weight", vec![d]);
            add("self_attn.k_norm.weight", vec![d]);
        }
    }
    shapes
}

/// The tensors a variant's config calls for, random (seeded by the variant's name).
pub fn tensors(v: &Variant) -> Vec<RawTensor> {
    let shapes = shapes(&v.config);
    let mut rng = Rng::new(v.name.bytes().fold(7, |h, b| h * 31 + b as u64));
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let count: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with("norm.weight") {
                (0..count).map(|_| 1.0 + 0.3 * rng.uniform()).collect()
            } else {
                // Weights large enough that every path moves the logits visibly.
                let scale = if name.ends_with(".bias") { 0.2 } else { 1.5 / (*shape.last().unwrap() as f32).sqrt() };
                (0..count).map(|_| scale * rng.uniform()).collect()
            };
            RawTensor::from_f32(&name, v.dtype, &shape, &values)
        })
        .collect()
}

/// Writes the variant's folder (`config.json` with its dtype, `model.safetensors`).
pub fn write(v: &Variant, dir: &Path) {
    write_folder(dir, &tensors(v));
    let mut config = v.config.clone();
    let dtype = match v.dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    };
    config["torch_dtype"] = json!(dtype);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
}
