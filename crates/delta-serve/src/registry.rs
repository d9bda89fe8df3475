//! The models a server offers: the base, and every `NAME.bitdelta.safetensors` in the deltas
//! folder (read afresh on every lookup, so a file added while running is served without a
//! restart). Deltas load on first use, checked against the base's fingerprint; beyond
//! `max_resident`, the least recently used one is dropped. Requests already running on a dropped
//! delta keep it alive (`Arc`) until they finish. A delta that ships its own tokenizer, chat
//! template or `config.json` (its `files`) reads and ends text with them; one whose config asks for
//! another forward pass than the base's (another RoPE, vocabulary, ...) is refused. A load reads
//! and checks the file on the caller's thread and puts the weights on the device on the engine's
//! ([`Engine::on_device`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::tensor::backend::Backend;
use delta_format::{Checkpoint, DeltaArtifact};
use delta_models::chat::ChatTemplate;
use delta_models::multi::Tenant;
use delta_models::{Llama, ModelConfig, ModelFiles, Tokenizer};

use crate::engine::Engine;
use crate::error::ServeError;

/// The file name suffix of a delta artifact; the model name is what comes before it.
pub const DELTA_SUFFIX: &str = ".bitdelta.safetensors";

/// How a model reads and ends text: its tokenizer, its chat template (if any), its
/// end-of-sequence ids (`config.json`; chat adds the template's eos token) and its context
/// (`max_position_embeddings`, if given).
pub struct TextSide {
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<Arc<ChatTemplate>>,
    pub eos: Vec<u32>,
    pub context: Option<usize>,
}

/// The side files that make a model's [`TextSide`].
const TEXT_FILES: [&str; 4] = ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"];

struct Resident<B: Backend> {
    tenant: Arc<Tenant<B>>,
    text: Arc<TextSide>,
    last_used: u64,
}

struct State<B: Backend> {
    resident: HashMap<String, Resident<B>>,
    /// One lock per name being loaded, so a model loads once however many ask for it at once.
    loading: HashMap<String, Arc<Mutex<()>>>,
    clock: u64,
    loads: u64,
    evictions: u64,
}

impl<B: Backend> Default for State<B> {
    fn default() -> Self {
        State { resident: HashMap::new(), loading: HashMap::new(), clock: 0, loads: 0, evictions: 0 }
    }
}

/// What `/v1/models` lists.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listing {
    pub id: String,
    /// "base" or "delta".
    pub kind: &'static str,
    pub resident: bool,
}

pub struct Registry<B: Backend> {
    pub base_name: String,
    pub base: Arc<Llama<B>>,
    pub base_text: Arc<TextSide>,
    base_ckpt: Arc<Checkpoint>,
    deltas_dir: PathBuf,
    max_resident: usize,
    state: Mutex<State<B>>,
    engine: Engine<B>,
}

/// The model a request asked for, ready to run.
pub enum Resolved<B: Backend> {
    Base,
    Delta(Arc<Tenant<B>>),
}

impl<B: Backend> Clone for Resolved<B> {
    fn clone(&self) -> Self {
        match self {
            Resolved::Base => Resolved::Base,
            Resolved::Delta(t) => Resolved::Delta(t.clone()),
        }
    }
}

impl<B: Backend> Registry<B> {
    /// `engine` is the loop the deltas will run on: it puts their weights on the device.
    pub fn new(base_name: String, base: Arc<Llama<B>>, base_text: Arc<TextSide>, base_ckpt: Checkpoint, deltas_dir: PathBuf, max_resident: usize, engine: Engine<B>) -> Self {
        Registry { base_name, base, base_text, base_ckpt: Arc::new(base_ckpt), deltas_dir, max_resident: max_resident.max(1), state: Mutex::default(), engine }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<B>> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delta names in the folder, sorted.
    pub fn delta_names(&self) -> Result<Vec<String>, ServeError> {
        let entries = std::fs::read_dir(&self.deltas_dir).map_err(|e| ServeError::Io(format!("reading {}: {e}", self.deltas_dir.display())))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(DELTA_SUFFIX)).map(str::to_string))
            .filter(|n| !n.is_empty() && !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names)
    }

    pub fn list(&self) -> Result<Vec<Listing>, ServeError> {
        let names = self.delta_names()?;
        let state = self.state();
        let mut out = vec![Listing { id: self.base_name.clone(), kind: "base", resident: true }];
        out.extend(names.into_iter().filter(|n| *n != self.base_name).map(|id| Listing { resident: state.resident.contains_key(&id), id, kind: "delta" }));
        Ok(out)
    }

    fn touch(&self, name: &str) -> Option<(Resolved<B>, Arc<TextSide>)> {
        let mut state = self.state();
        state.clock += 1;
        let now = state.clock;
        state.resident.get_mut(name).map(|r| {
            r.last_used = now;
            (Resolved::Delta(r.tenant.clone()), r.text.clone())
        })
    }

    /// The model `name` names and its text side, loading its delta if it is not resident.
    /// Blocking (reads and checks the artifact): call it off the async threads.
    pub fn resolve(&self, name: &str) -> Result<(Resolved<B>, Arc<TextSide>), ServeError> {
        if name == self.base_name {
            return Ok((Resolved::Base, self.base_text.clone()));
        }
        if let Some(r) = self.touch(name) {
            return Ok(r);
        }
        let path = self.path_of(name)?;
        let lock = self.state().loading.entry(name.to_string()).or_default().clone();
        let _loading = lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = self.touch(name) {
            return Ok(r);
        }
        let started = Instant::now();
        let loaded = self.load(&path).map(|(tenant, text)| (Arc::new(tenant), text));
        // Resident before the load lock goes, so a request arriving now finds it (no second load).
        let evicted = loaded.as_ref().map(|(t, text)| self.admit(name, t.clone(), text.clone())).unwrap_or_default();
        self.state().loading.remove(name);
        let (tenant, text) = loaded.map_err(|e| ServeError::Unavailable { model: name.to_string(), reason: e })?;
        eprintln!(
            "loaded delta `{name}` in {:.2} s ({:.1} MB resident){}",
            started.elapsed().as_secs_f64(),
            tenant.resident_bytes as f64 / 1e6,
            if evicted.is_empty() { String::new() } else { format!("; evicted {}", evicted.join(", ")) }
        );
        Ok((Resolved::Delta(tenant), text))
    }

    fn path_of(&self, name: &str) -> Result<PathBuf, ServeError> {
        let valid = !name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.');
        let path = self.deltas_dir.join(format!("{name}{DELTA_SUFFIX}"));
        if valid && path.is_file() {
            Ok(path)
        } else {
            Err(ServeError::UnknownModel(name.to_string()))
        }
    }

    fn load(&self, path: &Path) -> Result<(Tenant<B>, Arc<TextSide>), String> {
        let artifact = DeltaArtifact::open(path).map_err(|e| e.to_string())?;
        // The base first (a delta made for another one says so), then the text side, then the weights.
        let loaded = artifact.metadata().base.verify(&self.base_ckpt).map_err(|e| e.to_string()).and_then(|()| {
            let text = self.text_side(&artifact)?;
            let (base, ckpt) = (self.base.clone(), self.base_ckpt.clone());
            let tenant = self.engine.on_device(move || Tenant::new(&base, &ckpt, &artifact).map_err(|e| e.to_string()))??;
            Ok((tenant, text))
        });
        // Checking the fingerprint read the base file's pages; the model holds its own copy.
        self.base_ckpt.release_pages();
        loaded
    }

    /// The delta's text side: the base's, with whatever the delta ships in its place.
    fn text_side(&self, artifact: &DeltaArtifact) -> Result<Arc<TextSide>, String> {
        let files = ModelFiles::with_delta(self.base_ckpt.dir(), Some(artifact));
        if !TEXT_FILES.iter().any(|n| files.shipped(n)) {
            return Ok(self.base_text.clone());
        }
        let cfg = ModelConfig::load(files).map_err(|e| e.to_string())?;
        if let Some(field) = cfg.forward_difference(&self.base.cfg) {
            return Err(format!(
                "its config.json sets `{field}` unlike the base's, which a forward pass shared with the base cannot honour (serve the model `bitdelta apply` writes instead)"
            ));
        }
        let tokenizer = match files.shipped("tokenizer.json") {
            true => Arc::new(Tokenizer::load(files).map_err(|e| e.to_string())?),
            false => self.base_text.tokenizer.clone(),
        };
        let template = match files.shipped("tokenizer_config.json") || files.shipped("chat_template.jinja") {
            true => ChatTemplate::find(files).map_err(|e| e.to_string())?.map(Arc::new),
            false => self.base_text.template.clone(),
        };
        Ok(Arc::new(TextSide { tokenizer, template, eos: cfg.eos_token_ids(), context: cfg.max_position_embeddings }))
    }

    /// Makes `tenant` resident and drops the least recently used beyond the limit; returns
    /// the names dropped.
    fn admit(&self, name: &str, tenant: Arc<Tenant<B>>, text: Arc<TextSide>) -> Vec<String> {
        let mut state = self.state();
        state.clock += 1;
        let now = state.clock;
        state.resident.insert(name.to_string(), Resident { tenant, text, last_used: now });
        state.loads += 1;
        let mut evicted = Vec::new();
        while state.resident.len() > self.max_resident {
            let oldest = state.resident.iter().filter(|(n, _)| n.as_str() != name).min_by_key(|(_, r)| r.last_used).map(|(n, _)| n.clone());
            let Some(oldest) = oldest else { break };
            state.resident.remove(&oldest);
            state.evictions += 1;
            evicted.push(oldest);
        }
        evicted
    }

    /// (resident deltas, loads so far, evictions so far).
    pub fn counts(&self) -> (usize, u64, u64) {
        let state = self.state();
        (state.resident.len(), state.loads, state.evictions)
    }
}
