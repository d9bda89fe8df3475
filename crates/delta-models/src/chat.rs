//! Chat prompts: the model's Jinja chat template (`chat_template` in `tokenizer_config.json`, or
//! `chat_template.jinja`) rendered with minijinja, Python string methods included, as
//! `transformers`' `apply_chat_template` renders it.

use std::path::PathBuf;

use serde::Serialize;

use crate::error::ModelError;
use crate::files::ModelFiles;

#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: &str) -> Self {
        Message { role: "user".into(), content: content.into() }
    }
}

pub struct ChatTemplate {
    source: String,
    pub bos_token: String,
    pub eos_token: String,
    path: PathBuf,
}

impl ChatTemplate {
    /// The template of `files` (a model folder, or a base with a delta's shipped files); an error
    /// naming the file when it has none.
    pub fn load<'a>(files: impl Into<ModelFiles<'a>>) -> Result<Self, ModelError> {
        let files = files.into();
        Self::find(files)?.ok_or_else(|| ModelError::Config { path: files.path("tokenizer_config.json"), reason: "no chat template (chat_template) — use a prompt without --chat".into() })
    }

    /// The template of `files`, `None` when it has none; an error when a file is unreadable or
    /// malformed, or the template does not compile.
    pub fn find<'a>(files: impl Into<ModelFiles<'a>>) -> Result<Option<Self>, ModelError> {
        let files = files.into();
        let config_path = files.path("tokenizer_config.json");
        let config: serde_json::Value = match files.read_text("tokenizer_config.json")? {
            Some(text) => serde_json::from_str(&text).map_err(|e| ModelError::Config { path: config_path.clone(), reason: e.to_string() })?,
            None => serde_json::Value::Null,
        };
        let token = |key: &str| match &config[key] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or_default().to_string(),
        };
        let (source, path) = if let Some(source) = files.read_text("chat_template.jinja")? {
            (source, files.path("chat_template.jinja"))
        } else {
            let source = match &config["chat_template"] {
                serde_json::Value::String(s) => s.clone(),
                // A list of named templates: the one named "default".
                serde_json::Value::Array(list) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .unwrap_or_default()
                    .to_string(),
                _ => String::new(),
            };
            (source, config_path)
        };
        if source.is_empty() {
            return Ok(None);
        }
        let template = ChatTemplate { source, bos_token: token("bos_token"), eos_token: token("eos_token"), path };
        template.environment()?;
        Ok(Some(template))
    }

    /// The prompt text for `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ModelError> {
        let env = self.environment()?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        env.get_template("chat").and_then(|t| t.render(ctx)).map_err(|e| self.error(e))
    }

    /// The template compiled, with Python's string methods and `raise_exception`.
    fn environment(&self) -> Result<minijinja::Environment<'_>, ModelError> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.source).map_err(|e| self.error(e))?;
        Ok(env)
    }

    fn error(&self, e: minijinja::Error) -> ModelError {
        ModelError::Config { path: self.path.clone(), reason: format!("chat template: {e:#}") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_dir(config: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        dir
    }

    #[test]
    fn renders_a_chatml_template_with_python_methods() {
        let dir = model_dir(serde_json::json!({
            "bos_token": {"content": "<s>"}, "eos_token": "<|im_end|>",
            "chat_template": "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'].strip() }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        }));
        let t = ChatTemplate::load(dir.path()).unwrap();
        let text = t.render(&[Message::user("  Hi there ")], true).unwrap();
        assert_eq!(text, "<s><|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(t.render(&[Message::user("x")], false).unwrap(), "<s><|im_start|>user\nx<|im_end|>\n");
    }

    #[test]
    fn missing_or_failing_templates_are_errors() {
        let none = model_dir(serde_json::json!({"eos_token": "</s>"}));
        assert!(ChatTemplate::load(none.path()).err().unwrap().to_string().contains("no chat template"));
        let raising = model_dir(serde_json::json!({"chat_template": "{{ raise_exception('roles must alternate') }}"}));
        let err = ChatTemplate::load(raising.path()).unwrap().render(&[], true).err().unwrap().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
        // A template that does not compile, or a config that is not JSON, is an error at load —
        // not "no template".
        let broken = model_dir(serde_json::json!({"chat_template": "{% for %}"}));
        let err = ChatTemplate::find(broken.path()).err().unwrap().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("chat template"), "{err}");
        assert!(ChatTemplate::find(none.path()).unwrap().is_none());
        let garbled = tempfile::tempdir().unwrap();
        std::fs::write(garbled.path().join("tokenizer_config.json"), "{\"chat_template\": ").unwrap();
        assert!(ChatTemplate::find(garbled.path()).err().unwrap().to_string().contains("tokenizer_config.json"));
    }
}
