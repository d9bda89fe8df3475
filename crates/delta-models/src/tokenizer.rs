//! The model's tokenizer (`tokenizer.json`, through the `tokenizers` crate).

use std::path::{Path, PathBuf};

use crate::error::ModelError;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    pub fn load(model_dir: &Path) -> Result<Self, ModelError> {
        let path = model_dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer { path: path.clone(), reason: e.to_string() })?;
        Ok(Tokenizer { inner, path })
    }

    /// Token ids of `text`, with or without the tokenizer's special-token post-processing.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer { path: self.path.clone(), reason: e.to_string() })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, true).map_err(|e| ModelError::Tokenizer { path: self.path.clone(), reason: e.to_string() })
    }
}
