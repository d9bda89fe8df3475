//! A model's side files (`config.json`, `tokenizer.json`, `tokenizer_config.json`,
//! `chat_template.jinja`): read from its folder or, for a base with a delta applied, from the
//! delta's `files` where it ships them — the folder `bitdelta apply` would write, without writing
//! it. A fine-tune that brings its own chat template, end-of-sequence tokens or tokenizer speaks
//! with them whether it is merged, applied on load or served over its base.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use delta_format::{DeltaArtifact, SideFile};

use crate::error::ModelError;

#[derive(Clone, Copy)]
pub struct ModelFiles<'a> {
    dir: &'a Path,
    /// The delta's path and its shipped files.
    shipped: Option<(&'a Path, &'a BTreeMap<String, SideFile>)>,
}

impl<'a> From<&'a Path> for ModelFiles<'a> {
    fn from(dir: &'a Path) -> Self {
        ModelFiles { dir, shipped: None }
    }
}

impl<'a> From<&'a PathBuf> for ModelFiles<'a> {
    fn from(dir: &'a PathBuf) -> Self {
        ModelFiles { dir, shipped: None }
    }
}

impl<'a> ModelFiles<'a> {
    /// The files of the model folder `dir` with `delta`'s shipped files in place of the folder's.
    pub fn with_delta(dir: &'a Path, delta: Option<&'a DeltaArtifact>) -> Self {
        ModelFiles { dir, shipped: delta.map(|d| (d.path(), &d.metadata().files)) }
    }

    /// The model folder.
    pub fn dir(&self) -> &'a Path {
        self.dir
    }

    /// Whether the delta ships `name` (so that it differs from the folder's, or the folder lacks it).
    pub fn shipped(&self, name: &str) -> bool {
        self.shipped.is_some_and(|(_, files)| files.contains_key(name))
    }

    /// Where `name` is read from, for messages: the folder's file, or `DELTA:NAME`.
    pub fn path(&self, name: &str) -> PathBuf {
        match self.shipped {
            Some((delta, files)) if files.contains_key(name) => PathBuf::from(format!("{}:{name}", delta.display())),
            _ => self.dir.join(name),
        }
    }

    /// The bytes of `name`, `None` when neither the delta nor the folder has it.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, ModelError> {
        if let Some(file) = self.shipped.and_then(|(_, files)| files.get(name)) {
            let error = |reason| ModelError::Config { path: self.path(name), reason };
            return file.to_bytes().map(Some).map_err(error);
        }
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(ModelError::Io { path, error }),
        }
    }

    /// The error for a file the model needs that neither the delta nor the folder has.
    pub fn missing(&self, name: &str) -> ModelError {
        ModelError::Io { path: self.path(name), error: std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory") }
    }

    /// The text of `name`, `None` when neither has it; an error when it is not UTF-8.
    pub fn read_text(&self, name: &str) -> Result<Option<String>, ModelError> {
        self.read(name)?
            .map(|bytes| String::from_utf8(bytes).map_err(|_| ModelError::Config { path: self.path(name), reason: "not UTF-8 text".into() }))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_files_replace_the_folders_and_absent_ones_are_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "base config").unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "base tokenizer").unwrap();
        let shipped = BTreeMap::from([("config.json".to_string(), SideFile::Utf8("delta config".into())), ("new.jinja".to_string(), SideFile::Base64("aGk=".into()))]);
        let files = ModelFiles { dir: dir.path(), shipped: Some((Path::new("d.bitdelta.safetensors"), &shipped)) };
        assert_eq!(files.read_text("config.json").unwrap().as_deref(), Some("delta config"));
        assert_eq!(files.read_text("tokenizer.json").unwrap().as_deref(), Some("base tokenizer"));
        assert_eq!(files.read("new.jinja").unwrap().as_deref(), Some(&b"hi"[..]));
        assert!(files.read("missing.json").unwrap().is_none());
        assert_eq!(files.missing("missing.json").to_string(), format!("{}: No such file or directory", dir.path().join("missing.json").display()));
        assert!(files.shipped("config.json") && !files.shipped("tokenizer.json"));
        assert_eq!(files.path("config.json"), PathBuf::from("d.bitdelta.safetensors:config.json"));
        assert_eq!(files.path("tokenizer.json"), dir.path().join("tokenizer.json"));
        let plain = ModelFiles::from(dir.path());
        assert_eq!(plain.read_text("config.json").unwrap().as_deref(), Some("base config"));
        let broken = BTreeMap::from([("x".to_string(), SideFile::Base64("***".into()))]);
        let files = ModelFiles { dir: dir.path(), shipped: Some((Path::new("d"), &broken)) };
        assert!(files.read("x").unwrap_err().to_string().starts_with("d:x: "));
    }
}
