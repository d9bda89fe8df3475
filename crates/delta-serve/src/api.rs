//! The OpenAI-compatible HTTP surface: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (`stream: true` as server-sent events), `GET /health`.
//!
//! Bodies are parsed here (not by an extractor) so that malformed JSON gets the same JSON error
//! body as every other refusal. Fields the server does not honour (`n` > 1, `logprobs`) are
//! refused with 400 rather than silently ignored; other unknown fields are ignored as OpenAI's
//! own server does.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use delta_models::chat::{ChatTemplate, Message};
use delta_models::generate::Sampling;
use delta_models::{TextStream, Tokenizer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::{Engine, Event, Finish, Job};
use crate::error::ServeError;
use crate::registry::Registry;
use crate::stop::StopScan;

pub struct AppState {
    pub registry: Arc<Registry>,
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    /// End-of-sequence ids of the base (`config.json`); chat adds the template's eos token.
    pub eos: Vec<u32>,
    /// Most prompt + generated tokens one request may hold.
    pub max_context: usize,
    pub requests: AtomicU64,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|method: axum::http::Method, uri: axum::http::Uri| async move { ServeError::NoRoute(format!("{method} {}", uri.path())) })
        .with_state(state)
}

async fn health(State(s): State<Arc<AppState>>) -> Json<Value> {
    let (resident, loads, evictions) = s.registry.counts();
    let e = &s.engine.stats;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Json(json!({
        "status": "ok", "base": s.registry.base_name, "resident_deltas": resident, "delta_loads": loads, "delta_evictions": evictions,
        "requests": n(&s.requests), "steps": n(&e.steps), "step_sequences": n(&e.sequences), "generated_tokens": n(&e.tokens),
        "max_sequences_in_a_step": n(&e.max_sequences), "max_models_in_a_step": n(&e.max_models),
    }))
}

async fn models(State(s): State<Arc<AppState>>) -> Result<Json<Value>, ServeError> {
    let registry = s.registry.clone();
    let list = tokio::task::spawn_blocking(move || registry.list()).await.map_err(|e| ServeError::Io(e.to_string()))??;
    let data: Vec<Value> =
        list.into_iter().map(|m| json!({ "id": m.id, "object": "model", "created": 0, "owned_by": "bitdelta", "kind": m.kind, "resident": m.resident })).collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// Sampling fields shared by both endpoints.
#[derive(Deserialize)]
struct Params {
    model: String,
    max_tokens: Option<u64>,
    /// Chat's newer name for `max_tokens`.
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    /// Keep going past end-of-sequence tokens (vLLM's extension; for benchmarks).
    #[serde(default)]
    ignore_eos: bool,
    n: Option<u64>,
    top_p: Option<f32>,
    stop: Option<Value>,
    logprobs: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    params: Params,
    prompt: PromptField,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    params: Params,
    messages: Vec<ChatMessage>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: String,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ServeError> {
    serde_json::from_slice(body).map_err(|e| ServeError::BadRequest(format!("the request body is not a valid request: {e}")))
}

impl Params {
    fn check(&self) -> Result<(), ServeError> {
        let bad = |m: &str| Err(ServeError::BadRequest(m.to_string()));
        if self.n.is_some_and(|n| n != 1) {
            return bad("`n` other than 1 is not supported");
        }
        if self.logprobs.as_ref().is_some_and(|l| !(l.is_null() || *l == Value::Bool(false))) {
            return bad("`logprobs` is not supported");
        }
        self.sampling().check().map_err(|e| ServeError::BadRequest(e.to_string()))
    }

    /// The request's sampling, OpenAI's defaults where a field is absent.
    fn sampling(&self) -> Sampling {
        Sampling { temperature: self.temperature.unwrap_or(1.0), top_p: self.top_p.unwrap_or(1.0), seed: self.seed.unwrap_or(0) }
    }
}

/// Which response shape a generation is wrapped in.
#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let result = async {
        let req: CompletionRequest = parse(&body)?;
        let prompt = match &req.prompt {
            PromptField::Text(t) => s.tokenizer.encode(t, false).map_err(|e| ServeError::BadRequest(e.to_string()))?,
            PromptField::Ids(ids) => ids.clone(),
        };
        Ok::<_, ServeError>((req.params, prompt, s.eos.clone()))
    }
    .await;
    match result {
        Ok((params, prompt, stop)) => generate(s, params, prompt, stop, Kind::Completion, "/v1/completions").await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let result = (|| {
        let req: ChatRequest = parse(&body)?;
        let template = s.template.as_ref().ok_or_else(|| ServeError::BadRequest("the base model has no chat template; use /v1/completions".into()))?;
        if req.messages.is_empty() {
            return Err(ServeError::BadRequest("`messages` is empty".into()));
        }
        let messages: Vec<Message> = req.messages.into_iter().map(|m| Message { role: m.role, content: m.content }).collect();
        let text = template.render(&messages, true).map_err(|e| ServeError::BadRequest(format!("the chat template failed: {e}")))?;
        let prompt = s.tokenizer.encode(&text, false).map_err(|e| ServeError::BadRequest(e.to_string()))?;
        let mut stop = s.eos.clone();
        stop.extend(s.tokenizer.token_id(&template.eos_token));
        Ok((req.params, prompt, stop))
    })();
    match result {
        Ok((params, prompt, stop)) => generate(s, params, prompt, stop, Kind::Chat, "/v1/chat/completions").await,
        Err(e) => e.into_response(),
    }
}

/// Shared by both endpoints: resolve the model, queue the job, answer whole or streamed.
async fn generate(s: Arc<AppState>, params: Params, prompt: Vec<u32>, stop: Vec<u32>, kind: Kind, path: &'static str) -> Response {
    let started = Instant::now();
    let number = s.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let prepared = prepare(&s, &params, prompt, stop, kind).await;
    let (job, events, stops) = match prepared {
        Ok(p) => p,
        Err(e) => {
            eprintln!("#{number} {path} model={} -> {} {e}", params.model, e.status().as_u16());
            return e.into_response();
        }
    };
    let prompt_tokens = job.prompt.len();
    if let Err(e) = s.engine.submit(job) {
        return ServeError::Engine(e).into_response();
    }
    let meta = ResponseMeta {
        id: format!("{}-{number}", if matches!(kind, Kind::Chat) { "chatcmpl" } else { "cmpl" }),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        model: params.model.clone(),
        kind,
        prompt_tokens,
    };
    let model = params.model.clone();
    let log = move |tokens: usize, how: &str| {
        eprintln!("#{number} {path} model={model} prompt={prompt_tokens} generated={tokens} {how} {:.2} s", started.elapsed().as_secs_f64())
    };
    if params.stream {
        stream(s.tokenizer.clone(), events, StopScan::new(stops), meta, log).into_response()
    } else {
        whole(&s.tokenizer, events, stops, meta, log).await
    }
}

/// Checks the request, then resolves (loads if need be) its model: the job, its events and the
/// stop strings.
async fn prepare(s: &Arc<AppState>, params: &Params, prompt: Vec<u32>, stop: Vec<u32>, kind: Kind) -> Result<(Job, mpsc::UnboundedReceiver<Event>, Vec<String>), ServeError> {
    params.check()?;
    let stops = crate::stop::parse(params.stop.as_ref())?;
    if prompt.is_empty() {
        return Err(ServeError::BadRequest("the prompt encodes to no tokens".into()));
    }
    let vocab = s.registry.base.cfg.vocab_size;
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ServeError::BadRequest(format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    // OpenAI's defaults: 16 for completions; chat runs to the end of the turn (bounded here).
    let default = match kind {
        Kind::Completion => 16,
        Kind::Chat => 512,
    };
    let max_tokens = params.max_tokens.or(params.max_completion_tokens).unwrap_or(default) as usize;
    if max_tokens == 0 {
        return Err(ServeError::BadRequest("`max_tokens` must be at least 1".into()));
    }
    if prompt.len() + max_tokens > s.max_context {
        return Err(ServeError::BadRequest(format!(
            "{} prompt tokens + {max_tokens} max_tokens exceed this server's context of {} (--max-context)",
            prompt.len(),
            s.max_context
        )));
    }
    let registry = s.registry.clone();
    let name = params.model.clone();
    let model = tokio::task::spawn_blocking(move || registry.resolve(&name)).await.map_err(|e| ServeError::Io(e.to_string()))??;
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        model,
        prompt,
        max_tokens,
        sampling: params.sampling(),
        stop: if params.ignore_eos { Vec::new() } else { stop },
        events: tx,
    };
    Ok((job, rx, stops))
}

struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
}

impl ResponseMeta {
    fn usage(&self, completion: usize) -> Value {
        json!({ "prompt_tokens": self.prompt_tokens, "completion_tokens": completion, "total_tokens": self.prompt_tokens + completion })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// A choice carrying `text` (whole, or a streamed piece).
    fn choice(&self, text: &str, finish: Option<Finish>, chunk: bool, first: bool) -> Value {
        let finish = finish.map(Finish::name);
        match (self.kind, chunk) {
            (Kind::Completion, _) => json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }),
            (Kind::Chat, false) => json!({ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": finish }),
            (Kind::Chat, true) if first => json!({ "index": 0, "delta": { "role": "assistant", "content": text }, "finish_reason": finish }),
            (Kind::Chat, true) if finish.is_some() => json!({ "index": 0, "delta": {}, "finish_reason": finish }),
            (Kind::Chat, true) => json!({ "index": 0, "delta": { "content": text }, "finish_reason": finish }),
        }
    }

    fn body(&self, choice: Value, chunk: bool) -> Value {
        json!({ "id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": [choice] })
    }
}

/// The whole answer at once. With stop strings the text is scanned as it comes and the request
/// ends (its channel dropped, so the engine drops the sequence) at the first one.
async fn whole(tokenizer: &Tokenizer, mut events: mpsc::UnboundedReceiver<Event>, stops: Vec<String>, meta: ResponseMeta, log: impl Fn(usize, &str)) -> Response {
    let scanning = !stops.is_empty();
    let (mut scan, mut text, mut stream) = (StopScan::new(stops), String::new(), TextStream::new(tokenizer));
    let mut tokens = Vec::new();
    let finish = loop {
        match events.recv().await {
            Some(Event::Token(t)) => {
                tokens.push(t);
                if scanning {
                    match stream.push(t) {
                        Ok(piece) => text.push_str(&scan.push(&piece)),
                        Err(e) => return ServeError::Engine(e.to_string()).into_response(),
                    }
                    if scan.stopped() {
                        break Finish::Stop;
                    }
                }
            }
            Some(Event::Done(finish)) => break finish,
            Some(Event::Failed(e)) => {
                log(tokens.len(), "failed");
                return ServeError::Engine(e).into_response();
            }
            None => return ServeError::Engine("the engine dropped the request".into()).into_response(),
        }
    };
    let text = if scanning {
        text + &scan.finish()
    } else {
        match tokenizer.decode(&tokens) {
            Ok(t) => t,
            Err(e) => return ServeError::Engine(e.to_string()).into_response(),
        }
    };
    log(tokens.len(), finish.name());
    let mut body = meta.body(meta.choice(&text, Some(finish), false, false), false);
    body["usage"] = meta.usage(tokens.len());
    Json(body).into_response()
}

/// Server-sent events: one chunk per piece of text, a last chunk with the finish reason and the
/// usage, then `data: [DONE]`. A forwarding task turns engine events into SSE events; when the
/// client goes away its channel closes, and so does the engine's, which drops the sequence.
fn stream(tokenizer: Arc<Tokenizer>, mut events: mpsc::UnboundedReceiver<Event>, mut scan: StopScan, meta: ResponseMeta, log: impl Fn(usize, &str) + Send + 'static) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let mut text = TextStream::new(tokenizer);
        let (mut count, mut first) = (0usize, true);
        let send = |v: Value| SseEvent::default().data(v.to_string());
        while let Some(event) = events.recv().await {
            let (piece, done) = match event {
                Event::Token(t) => {
                    count += 1;
                    match text.push(t) {
                        Ok(piece) => (scan.push(&piece), scan.stopped().then_some(Finish::Stop)),
                        Err(e) => {
                            log(count, "failed");
                            let _ = tx.send(send(ServeError::Engine(e.to_string()).body())).await;
                            return;
                        }
                    }
                }
                Event::Done(finish) => (scan.finish(), Some(finish)),
                Event::Failed(e) => {
                    log(count, "failed");
                    let _ = tx.send(send(ServeError::Engine(e).body())).await;
                    return;
                }
            };
            if !piece.is_empty() && tx.send(send(meta.body(meta.choice(&piece, None, true, std::mem::take(&mut first)), true))).await.is_err() {
                log(count, "abandoned by the client");
                return;
            }
            if let Some(finish) = done {
                // Ending here drops `events`, so the engine drops the sequence (a stop string).
                let mut body = meta.body(meta.choice("", Some(finish), true, false), true);
                body["usage"] = meta.usage(count);
                log(count, finish.name());
                let _ = tx.send(send(body)).await;
                let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                return;
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx)) });
    Sse::new(body).keep_alive(KeepAlive::default())
}
