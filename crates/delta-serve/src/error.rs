use std::path::PathBuf;

use axum::http::StatusCode;
use delta_format::FormatError;
use delta_models::ModelError;

/// Why `build` / `run` returned: the server did not start (nothing is served then), or, for
/// `Io { what: "serving" }`, the listener failed while serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{flag} {} is not a folder", path.display())]
    NotAFolder { flag: &'static str, path: PathBuf },
    #[error("--max-context {asked} is beyond the base's context of {context} tokens (max_position_embeddings in its config.json)")]
    ContextTooLong { asked: usize, context: usize },
    /// The base checkpoint cannot be read.
    #[error("reading the base: {error}")]
    Base { error: FormatError },
    /// The base's config, tokenizer, chat template or weights (`what`: which).
    #[error("{what}: {error}")]
    Model { what: &'static str, error: ModelError },
    /// The runtime, the socket.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
}

/// Why a request was not served; each maps to an HTTP status and an OpenAI-style error body.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The body is not JSON or not the request's shape (400).
    #[error("{0}")]
    BadRequest(String),
    /// No base and no artifact of that name (404).
    #[error("model `{0}` does not exist (GET /v1/models lists the models)")]
    UnknownModel(String),
    /// No such endpoint (404).
    #[error("no endpoint {0} (GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health)")]
    NoRoute(String),
    /// The artifact exists but cannot be served on this base: wrong base, damaged file (409).
    #[error("model `{model}` cannot be loaded: {reason}")]
    Unavailable { model: String, reason: String },
    /// The server's own failure (500).
    #[error("{0}")]
    Io(String),
    #[error("the model failed: {0}")]
    Engine(String),
}

impl ServeError {
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::UnknownModel(_) | ServeError::NoRoute(_) => StatusCode::NOT_FOUND,
            ServeError::Unavailable { .. } => StatusCode::CONFLICT,
            ServeError::Io(_) | ServeError::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `type` field of the error body.
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::BadRequest(_) => "invalid_request_error",
            ServeError::UnknownModel(_) => "model_not_found",
            ServeError::NoRoute(_) => "not_found",
            ServeError::Unavailable { .. } => "model_unavailable",
            ServeError::Io(_) | ServeError::Engine(_) => "server_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": { "message": self.to_string(), "type": self.kind(), "code": self.status().as_u16() } })
    }
}

impl axum::response::IntoResponse for ServeError {
    fn into_response(self) -> axum::response::Response {
        (self.status(), axum::Json(self.body())).into_response()
    }
}
