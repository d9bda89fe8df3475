//! `delta-serve`: many fine-tunes on one base model, served over an OpenAI-compatible HTTP API.
//!
//! - [`registry`]: the base and the deltas folder; deltas load on first use (fingerprint checked),
//!   least recently used ones are dropped beyond a limit, new files are picked up while running.
//! - [`engine`]: the continuous-batching decode loop — sequences of different deltas share every
//!   step (`delta_models::multi::step_batch`).
//! - [`api`]: the axum routes and the OpenAI request / response shapes; [`stop`]: stop strings.

pub mod api;
pub mod engine;
pub mod error;
pub mod registry;
pub mod stop;

use std::path::PathBuf;
use std::sync::Arc;

use delta_format::Checkpoint;
use delta_models::chat::ChatTemplate;
use burn::tensor::backend::Backend;
use delta_models::{Llama, ModelConfig, Tokenizer, Weights};

pub use engine::EngineOptions;
pub use error::{ServeError, StartError};

pub struct ServeOptions {
    pub base: PathBuf,
    pub deltas: PathBuf,
    /// The base's model name; default: the base folder's name.
    pub base_name: Option<String>,
    pub max_resident: usize,
    /// Most prompt + generated tokens per request; default: the base's context
    /// (`max_position_embeddings`), at most [`DEFAULT_MAX_CONTEXT`].
    pub max_context: Option<usize>,
    pub engine: EngineOptions,
}

/// The request context a server allows unless told otherwise (less where the base's is shorter).
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

/// Loads the base on `device`, starts the engine and returns the app, ready to be served.
pub fn build<B: Backend>(o: &ServeOptions, device: &B::Device) -> Result<axum::Router, StartError> {
    for (flag, dir) in [("--base", &o.base), ("--deltas", &o.deltas)] {
        if !dir.is_dir() {
            return Err(StartError::NotAFolder { flag, path: dir.clone() });
        }
    }
    let model = |what| move |error| StartError::Model { what, error };
    let ckpt = Checkpoint::open(&o.base).map_err(|error| StartError::Base { error })?;
    let cfg = ModelConfig::load(&o.base).map_err(model("reading the base's config"))?;
    let max_context = match (o.max_context, cfg.max_position_embeddings) {
        (Some(asked), Some(context)) if asked > context => return Err(StartError::ContextTooLong { asked, context }),
        (Some(asked), _) => asked,
        (None, context) => context.map_or(DEFAULT_MAX_CONTEXT, |c| c.min(DEFAULT_MAX_CONTEXT)),
    };
    let tokenizer = Tokenizer::load(&o.base).map_err(model("loading the tokenizer"))?;
    // No template: /v1/chat/completions answers 400; a broken one stops the server here.
    let template = ChatTemplate::find(&o.base).map_err(model("reading the chat template"))?.map(Arc::new);
    let weights = Weights::<B>::new(&ckpt, None, device.clone()).map_err(model("loading the base"))?.bf16_on_host();
    let base = Arc::new(Llama::load(cfg, &weights).map_err(model("loading the base"))?);
    ckpt.release_pages();
    let base_name = o.base_name.clone().unwrap_or_else(|| o.base.canonicalize().unwrap_or(o.base.clone()).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "base".into()));
    let (eos, context) = (base.cfg.eos_token_ids(), base.cfg.max_position_embeddings);
    let text = Arc::new(registry::TextSide { tokenizer: Arc::new(tokenizer), template, eos, context });
    let engine = engine::Engine::start(base.clone(), o.engine);
    let registry = Arc::new(registry::Registry::new(base_name, base, text, ckpt, o.deltas.clone(), o.max_resident, engine.clone()));
    let state = api::AppState { registry, engine, max_context, requests: Default::default() };
    Ok(api::router(Arc::new(state)))
}

/// Serves on `addr` with the models on `device` until Ctrl-C (or SIGTERM), calling `ready` with
/// the bound address once the base is loaded and the port is open (port 0 picks a free one).
pub fn run<B: Backend>(o: &ServeOptions, device: &B::Device, addr: &str, ready: impl FnOnce(std::net::SocketAddr)) -> Result<(), StartError> {
    let app = build::<B>(o, device)?;
    let io = |what: String| move |error| StartError::Io { what, error };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(io("starting the async runtime".into()))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(io(format!("binding {addr}")))?;
        ready(listener.local_addr().map_err(io("reading the bound address".into()))?);
        axum::serve(listener, app).with_graceful_shutdown(shutdown()).await.map_err(io("serving".into()))
    })
}

async fn shutdown() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
