//! The Hugging Face `config.json` of a Llama-family model, read directly.

use serde::Deserialize;

use crate::error::ModelError;
use crate::files::ModelFiles;

/// Llama-3 style RoPE frequency scaling (`rope_scaling` with `rope_type: "llama3"`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: f64,
    #[serde(default)]
    pub low_freq_factor: f64,
    #[serde(default)]
    pub high_freq_factor: f64,
    #[serde(default)]
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ModelConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub vocab_size: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// q/k/v (and o, for Llama) biases; Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    pub bos_token_id: Option<u32>,
    /// One id or a list of ids.
    pub eos_token_id: Option<serde_json::Value>,
    /// Mistral's attention window; Qwen2/3 carry one too but apply it only with
    /// `use_sliding_window: true`.
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    /// The most positions the model was trained for (prompt + generated tokens).
    pub max_position_embeddings: Option<usize>,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_theta() -> f64 {
    10_000.0
}

impl ModelConfig {
    /// The `config.json` of `files` (a model folder, or a base with a delta's shipped files).
    pub fn load<'a>(files: impl Into<ModelFiles<'a>>) -> Result<Self, ModelError> {
        let files = files.into();
        if files.dir().is_file() {
            let error = std::io::Error::new(std::io::ErrorKind::NotADirectory, "a file, where a model folder (config.json, tokenizer.json, safetensors weights) was expected");
            return Err(ModelError::Io { path: files.dir().to_path_buf(), error });
        }
        let path = files.path("config.json");
        let text = files.read_text("config.json")?.ok_or_else(|| files.missing("config.json"))?;
        let cfg: ModelConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config { path: path.clone(), reason: e.to_string() })?;
        cfg.validate().map_err(|reason| ModelError::Config { path, reason })?;
        Ok(cfg)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The attention window in force, if any.
    pub fn sliding_window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "qwen2" | "qwen3" if self.use_sliding_window != Some(true) => None,
            _ => self.sliding_window,
        }
    }

    /// The ids that end generation (`eos_token_id`, one or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|n| n as u32).collect(),
            _ => Vec::new(),
        }
    }

    /// The first field (by its `config.json` name) in which `other` asks for another forward
    /// pass than this config: anything but the names, the bos / eos ids and the context length.
    pub fn forward_difference(&self, other: &ModelConfig) -> Option<&'static str> {
        macro_rules! first_difference {
            ($($field:ident),*) => {
                $(if self.$field != other.$field {
                    return Some(stringify!($field));
                })*
            };
        }
        first_difference!(
            model_type, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps,
            rope_theta, rope_scaling, vocab_size, tie_word_embeddings, attention_bias, mlp_bias, hidden_act, sliding_window, use_sliding_window
        );
        None
    }

    /// Qwen2 puts biases on q/k/v without saying so in `attention_bias`.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!("hidden_act `{act}` is not supported (silu is)"));
            }
        }
        if self.num_attention_heads == 0 || self.num_attention_heads % self.kv_heads() != 0 {
            return Err(format!("{} attention heads are not a multiple of {} key/value heads", self.num_attention_heads, self.kv_heads()));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!("head_dim {} is odd; RoPE needs it even", self.head_dim()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(edit: impl Fn(&mut serde_json::Value)) -> ModelConfig {
        let mut json = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "rope_theta": 10000.0, "eos_token_id": 2, "max_position_embeddings": 256,
        });
        edit(&mut json);
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn forward_difference_names_the_first_field_a_shared_forward_cannot_honour() {
        let base = config(|_| {});
        // Names, end-of-sequence ids and the context length leave the forward pass alone.
        let speaking = config(|c| {
            c["eos_token_id"] = serde_json::json!([2, 7]);
            c["max_position_embeddings"] = 64.into();
            c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        });
        assert_eq!(base.forward_difference(&speaking), None);
        assert_eq!(base.forward_difference(&config(|c| c["rope_theta"] = 5e5.into())), Some("rope_theta"));
        assert_eq!(base.forward_difference(&config(|c| c["vocab_size"] = 101.into())), Some("vocab_size"));
        let scaled = config(|c| c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0}));
        assert_eq!(base.forward_difference(&scaled), Some("rope_scaling"));
        assert_eq!(base.forward_difference(&config(|c| c["tie_word_embeddings"] = true.into())), Some("tie_word_embeddings"));
    }
}
