//! The Hugging Face `config.json` of a Llama-family model, read directly.

use std::path::Path;

use serde::Deserialize;

use crate::error::ModelError;

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
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        if dir.is_file() {
            let error = std::io::Error::new(std::io::ErrorKind::NotADirectory, "a file, where a model folder (config.json, tokenizer.json, safetensors weights) was expected");
            return Err(ModelError::Io { path: dir.to_path_buf(), error });
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|error| ModelError::Io { path: path.clone(), error })?;
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
