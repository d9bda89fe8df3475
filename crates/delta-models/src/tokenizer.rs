//! The model's tokenizer (`tokenizer.json`, through the `tokenizers` crate).

use std::path::PathBuf;

use crate::error::ModelError;
use crate::files::ModelFiles;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// The `tokenizer.json` of `files` (a model folder, or a base with a delta's shipped files).
    pub fn load<'a>(files: impl Into<ModelFiles<'a>>) -> Result<Self, ModelError> {
        let files = files.into();
        let path = files.path("tokenizer.json");
        let bytes = files.read("tokenizer.json")?.ok_or_else(|| files.missing("tokenizer.json"))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| ModelError::Tokenizer { path: path.clone(), reason: e.to_string() })?;
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

    /// One token's own text, special tokens included (a piece of a multi-byte character shows as
    /// U+FFFD).
    pub fn token_text(&self, id: u32) -> Result<String, ModelError> {
        self.inner.decode(&[id], false).map_err(|e| ModelError::Tokenizer { path: self.path.clone(), reason: e.to_string() })
    }

    /// The id of a token string (special tokens included), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Turns generated ids into text as they come: each push returns the text the new id adds, held
/// back while the text ends inside a multi-byte character. Holds the tokenizer by reference or
/// shared (`Arc<Tokenizer>`), so a stream can outlive the scope that made it.
pub struct TextStream<T: std::ops::Deref<Target = Tokenizer>> {
    tokenizer: T,
    ids: Vec<u32>,
    shown: usize,
}

impl<T: std::ops::Deref<Target = Tokenizer>> TextStream<T> {
    pub fn new(tokenizer: T) -> Self {
        TextStream { tokenizer, ids: Vec::new(), shown: 0 }
    }

    pub fn push(&mut self, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = text.get(self.shown..).unwrap_or_default().to_string();
        self.shown = text.len();
        Ok(new)
    }
}
