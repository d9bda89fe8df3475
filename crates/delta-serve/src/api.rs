//! The OpenAI-compatible HTTP surface: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (`stream: true` as server-sent events), `GET /health`.
//!
//! Bodies are parsed here (not by an extractor) so that malformed JSON gets the same JSON error
//! body as every other refusal. Values the server does not honour are refused with 400 rather
//! than silently ignored; unknown fields are ignored as OpenAI's own server does.
//!
//! `n` choices share one prefill; choice i samples with the seed `seed + i`. `logprobs` (an
//! integer on `/v1/completions`; `logprobs: true` with `top_logprobs` on chat) gives each
//! generated token's log-probability under the model — log-softmax of its logits at temperature
//! 1, before any `top_p` cut — and the most likely alternatives, in OpenAI's shapes.

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
use delta_models::chat::Message;
use burn::tensor::backend::Backend;
use delta_models::generate::Sampling;
use delta_models::{TextStream, Tokenizer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::{Engine, Event, Finish, Job, Sampled};
use crate::error::ServeError;
use crate::registry::{Registry, TextSide};
use crate::stop::StopScan;

pub struct AppState<B: Backend> {
    pub registry: Arc<Registry<B>>,
    pub engine: Engine<B>,
    /// Most prompt + generated tokens one request may hold.
    pub max_context: usize,
    pub requests: AtomicU64,
}

pub fn router<B: Backend>(state: Arc<AppState<B>>) -> Router {
    Router::new()
        .route("/health", get(health::<B>))
        .route("/v1/models", get(models::<B>))
        .route("/v1/completions", post(completions::<B>))
        .route("/v1/chat/completions", post(chat_completions::<B>))
        .fallback(|method: axum::http::Method, uri: axum::http::Uri| async move { ServeError::NoRoute(format!("{method} {}", uri.path())) })
        .with_state(state)
}

async fn health<B: Backend>(State(s): State<Arc<AppState<B>>>) -> Json<Value> {
    let (resident, loads, evictions) = s.registry.counts();
    let e = &s.engine.stats;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Json(json!({
        "status": "ok", "base": s.registry.base_name, "resident_deltas": resident, "delta_loads": loads, "delta_evictions": evictions,
        "requests": n(&s.requests), "steps": n(&e.steps), "step_sequences": n(&e.sequences), "generated_tokens": n(&e.tokens),
        "max_sequences_in_a_step": n(&e.max_sequences), "max_models_in_a_step": n(&e.max_models),
    }))
}

async fn models<B: Backend>(State(s): State<Arc<AppState<B>>>) -> Result<Json<Value>, ServeError> {
    let registry = s.registry.clone();
    let list = tokio::task::spawn_blocking(move || registry.list()).await.map_err(|e| ServeError::Io(e.to_string()))??;
    let data: Vec<Value> =
        list.into_iter().map(|m| json!({ "id": m.id, "object": "model", "created": 0, "owned_by": "bitdelta", "kind": m.kind, "resident": m.resident })).collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: u64 = 16;
/// Most alternatives per token (`logprobs` on completions, `top_logprobs` on chat), as OpenAI.
pub const MAX_TOP_LOGPROBS: u64 = 20;

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
    /// Completions: how many alternatives per token; chat: whether to send log-probabilities.
    logprobs: Option<Value>,
    /// Chat: how many alternatives per token.
    top_logprobs: Option<u64>,
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

fn bad<T>(message: &str) -> Result<T, ServeError> {
    Err(ServeError::BadRequest(message.to_string()))
}

impl Params {
    /// The number of choices, 1 to [`MAX_CHOICES`].
    fn choices(&self) -> Result<usize, ServeError> {
        match self.n.unwrap_or(1) {
            n @ 1..=MAX_CHOICES => Ok(n as usize),
            n => bad(&format!("`n` is {n}; it must be from 1 to {MAX_CHOICES}")),
        }
    }

    /// The log-probabilities asked for: none, or `Some(k)` alternatives with every token.
    fn logprobs(&self, kind: Kind) -> Result<Option<usize>, ServeError> {
        let top = |k: u64, field: &str| if k <= MAX_TOP_LOGPROBS { Ok(k as usize) } else { bad(&format!("`{field}` is {k}; it must be from 0 to {MAX_TOP_LOGPROBS}")) };
        match kind {
            Kind::Completion => match &self.logprobs {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(k) => top(k, "logprobs").map(Some),
                    None => bad(&format!("`logprobs` must be an integer from 0 to {MAX_TOP_LOGPROBS} on /v1/completions")),
                },
            },
            Kind::Chat => {
                let on = match &self.logprobs {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return bad("`logprobs` must be true or false on /v1/chat/completions (`top_logprobs` sets how many alternatives)"),
                };
                let k = top(self.top_logprobs.unwrap_or(0), "top_logprobs")?;
                match on {
                    true => Ok(Some(k)),
                    false if k > 0 => bad("`top_logprobs` needs `logprobs: true`"),
                    false => Ok(None),
                }
            }
        }
    }

    /// The request's sampling, OpenAI's defaults where a field is absent.
    fn sampling(&self) -> Result<Sampling, ServeError> {
        let s = Sampling { temperature: self.temperature.unwrap_or(1.0), top_p: self.top_p.unwrap_or(1.0), seed: self.seed.unwrap_or(0) };
        s.check().map_err(|e| ServeError::BadRequest(e.to_string()))?;
        Ok(s)
    }
}

/// Which response shape a generation is wrapped in.
#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

/// What a request asks the model to continue: text or ids, or chat messages for its template.
enum Prompt {
    Completion(PromptField),
    Chat(Vec<Message>),
}

async fn completions<B: Backend>(State(s): State<Arc<AppState<B>>>, body: Bytes) -> Response {
    match parse::<CompletionRequest>(&body) {
        Ok(req) => generate(s, req.params, Prompt::Completion(req.prompt), Kind::Completion, "/v1/completions").await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions<B: Backend>(State(s): State<Arc<AppState<B>>>, body: Bytes) -> Response {
    match parse::<ChatRequest>(&body) {
        Ok(req) if req.messages.is_empty() => ServeError::BadRequest("`messages` is empty".into()).into_response(),
        Ok(req) => {
            let messages = req.messages.into_iter().map(|m| Message { role: m.role, content: m.content }).collect();
            generate(s, req.params, Prompt::Chat(messages), Kind::Chat, "/v1/chat/completions").await
        }
        Err(e) => e.into_response(),
    }
}

/// Shared by both endpoints: resolve the model, queue the job, answer whole or streamed.
async fn generate<B: Backend>(s: Arc<AppState<B>>, params: Params, prompt: Prompt, kind: Kind, path: &'static str) -> Response {
    let started = Instant::now();
    let number = s.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let prepared = prepare(&s, &params, prompt, kind).await;
    let (job, text, events, stops) = match prepared {
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
    let meta = Arc::new(ResponseMeta {
        id: format!("{}-{number}", if matches!(kind, Kind::Chat) { "chatcmpl" } else { "cmpl" }),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        model: params.model.clone(),
        kind,
        prompt_tokens,
        tokenizer: text.tokenizer.clone(),
    });
    let model = params.model.clone();
    let log = move |tokens: usize, how: &str| {
        eprintln!("#{number} {path} model={model} prompt={prompt_tokens} generated={tokens} {how} {:.2} s", started.elapsed().as_secs_f64())
    };
    let choices: Vec<Choice> = events.into_iter().map(|events| Choice::new(events, &text.tokenizer, stops.clone(), params.stream)).collect();
    if params.stream {
        stream(choices, meta, log).into_response()
    } else {
        whole(choices, meta, log).await
    }
}

/// Checks the request, resolves (loads if need be) its model and reads the prompt with that
/// model's tokenizer and chat template (a delta's own where it ships them): the job, the model's
/// text side, each choice's events and the stop strings.
#[allow(clippy::type_complexity)]
async fn prepare<B: Backend>(
    s: &Arc<AppState<B>>,
    params: &Params,
    prompt: Prompt,
    kind: Kind,
) -> Result<(Job<B>, Arc<TextSide>, Vec<mpsc::UnboundedReceiver<Event>>, Vec<String>), ServeError> {
    let n = params.choices()?;
    let logprobs = params.logprobs(kind)?;
    let sampling = params.sampling()?;
    let stops = crate::stop::parse(params.stop.as_ref())?;
    // OpenAI's defaults: 16 for completions; chat runs to the end of the turn (bounded here).
    let default = match kind {
        Kind::Completion => 16,
        Kind::Chat => 512,
    };
    let max_tokens = params.max_tokens.or(params.max_completion_tokens).unwrap_or(default) as usize;
    if max_tokens == 0 {
        return bad("`max_tokens` must be at least 1");
    }
    let registry = s.registry.clone();
    let name = params.model.clone();
    let (model, text) = tokio::task::spawn_blocking(move || registry.resolve(&name)).await.map_err(|e| ServeError::Io(e.to_string()))??;
    let encode = |t: &str| text.tokenizer.encode(t, false).map_err(|e| ServeError::BadRequest(e.to_string()));
    let mut stop = text.eos.clone();
    let prompt = match &prompt {
        Prompt::Completion(PromptField::Text(t)) => encode(t)?,
        Prompt::Completion(PromptField::Ids(ids)) => ids.clone(),
        Prompt::Chat(messages) => {
            let template = text.template.as_ref().ok_or_else(|| ServeError::BadRequest(format!("the model `{}` has no chat template; use /v1/completions", params.model)))?;
            let rendered = template.render(messages, true).map_err(|e| ServeError::BadRequest(format!("the chat template failed: {e}")))?;
            stop.extend(text.tokenizer.token_id(&template.eos_token));
            encode(&rendered)?
        }
    };
    if prompt.is_empty() {
        return bad("the prompt encodes to no tokens");
    }
    let vocab = s.registry.base.cfg.vocab_size;
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ServeError::BadRequest(format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    let asked = format!("{} prompt tokens + {max_tokens} max_tokens", prompt.len());
    match text.context {
        // A delta whose own config gives it a shorter context than the server's.
        Some(context) if prompt.len() + max_tokens > context && context < s.max_context => {
            return Err(ServeError::BadRequest(format!("{asked} exceed the model's context of {context} (max_position_embeddings in its config.json)")));
        }
        _ if prompt.len() + max_tokens > s.max_context => {
            return Err(ServeError::BadRequest(format!("{asked} exceed this server's context of {} (--max-context)", s.max_context)));
        }
        _ => {}
    }
    let (senders, receivers) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
    let job = Job {
        model,
        prompt,
        max_tokens,
        sampling,
        stop: if params.ignore_eos { Vec::new() } else { stop },
        logprobs,
        choices: senders,
    };
    Ok((job, text, receivers, stops))
}

struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
    tokenizer: Arc<Tokenizer>,
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

    /// Choice `index` carrying `text` (whole, or a streamed piece) and its tokens'
    /// log-probabilities (null when not asked for).
    fn choice(&self, index: usize, text: &str, finish: Option<Finish>, logprobs: Value, chunk: bool, first: bool) -> Value {
        let finish = finish.map(Finish::name);
        let (i, l) = (index, logprobs);
        match (self.kind, chunk) {
            (Kind::Completion, _) => json!({ "index": i, "text": text, "logprobs": l, "finish_reason": finish }),
            (Kind::Chat, false) => json!({ "index": i, "message": { "role": "assistant", "content": text }, "logprobs": l, "finish_reason": finish }),
            (Kind::Chat, true) if first => json!({ "index": i, "delta": { "role": "assistant", "content": text }, "logprobs": l, "finish_reason": finish }),
            (Kind::Chat, true) if finish.is_some() && text.is_empty() => json!({ "index": i, "delta": {}, "logprobs": l, "finish_reason": finish }),
            (Kind::Chat, true) => json!({ "index": i, "delta": { "content": text }, "logprobs": l, "finish_reason": finish }),
        }
    }

    fn body(&self, choices: Vec<Value>, chunk: bool) -> Value {
        json!({ "id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices })
    }

    /// `tokens`' log-probabilities in the endpoint's shape, or null when none were asked for.
    /// `offset` is where the first token's text starts in the choice's text (characters; the
    /// completions shape's `text_offset`), moved past these tokens.
    fn logprobs(&self, tokens: &[Sampled], offset: &mut usize) -> Result<Value, ServeError> {
        if tokens.iter().all(|t| t.logprobs.is_none()) {
            return Ok(Value::Null);
        }
        let text = |id: u32| self.tokenizer.token_text(id).map_err(|e| ServeError::Engine(e.to_string()));
        let bytes = |t: &str| if t.contains('\u{FFFD}') { Value::Null } else { json!(t.as_bytes()) };
        let mut parts = Vec::new();
        for t in tokens {
            let Some(l) = &t.logprobs else { continue };
            let token = text(t.id)?;
            let top: Vec<(String, f32)> = l.top.iter().map(|&(id, lp)| Ok((text(id)?, lp))).collect::<Result<_, ServeError>>()?;
            parts.push((token, l.logprob, top));
        }
        Ok(match self.kind {
            Kind::Completion => {
                let mut offsets = Vec::new();
                for (token, ..) in &parts {
                    offsets.push(*offset);
                    *offset += token.chars().count();
                }
                // OpenAI's legacy shape: the chosen token is always among the alternatives.
                let tops: Vec<Value> = parts
                    .iter()
                    .map(|(token, lp, top)| {
                        let mut m: serde_json::Map<String, Value> = top.iter().map(|(t, v)| (t.clone(), json!(v))).collect();
                        m.entry(token.clone()).or_insert(json!(lp));
                        Value::Object(m)
                    })
                    .collect();
                json!({
                    "tokens": parts.iter().map(|p| &p.0).collect::<Vec<_>>(),
                    "token_logprobs": parts.iter().map(|p| p.1).collect::<Vec<_>>(),
                    "top_logprobs": tops,
                    "text_offset": offsets,
                })
            }
            Kind::Chat => json!({ "content": parts.iter().map(|(token, lp, top)| json!({
                "token": token, "logprob": lp, "bytes": bytes(token),
                "top_logprobs": top.iter().map(|(t, v)| json!({ "token": t, "logprob": v, "bytes": bytes(t) })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>() }),
        })
    }
}

/// One choice's events turned into text as they come: tokens decode, stop strings cut the text
/// (and end the choice), each token's log-probabilities travel with the piece it completed.
struct Choice {
    events: mpsc::UnboundedReceiver<Event>,
    /// The text as it comes; `None` when no piece is needed before the end (a whole answer
    /// without stop strings is decoded once, at the end).
    text: Option<TextStream<Arc<Tokenizer>>>,
    scan: StopScan,
    /// Every token generated (for the whole answer's text).
    ids: Vec<u32>,
}

/// What one event adds to a choice.
struct Update {
    piece: String,
    token: Option<Sampled>,
    finish: Option<Finish>,
}

impl Choice {
    fn new(events: mpsc::UnboundedReceiver<Event>, tokenizer: &Arc<Tokenizer>, stops: Vec<String>, stream: bool) -> Self {
        let text = (stream || !stops.is_empty()).then(|| TextStream::new(tokenizer.clone()));
        Choice { events, text, scan: StopScan::new(stops), ids: Vec::new() }
    }

    async fn next(&mut self) -> Result<Update, ServeError> {
        match self.events.recv().await {
            Some(Event::Token(t)) => {
                self.ids.push(t.id);
                let piece = match &mut self.text {
                    Some(text) => self.scan.push(&text.push(t.id).map_err(|e| ServeError::Engine(e.to_string()))?),
                    None => String::new(),
                };
                Ok(Update { piece, token: Some(t), finish: self.scan.stopped().then_some(Finish::Stop) })
            }
            Some(Event::Done(finish)) => Ok(Update { piece: self.scan.finish(), token: None, finish: Some(finish) }),
            Some(Event::Failed(e)) => Err(ServeError::Engine(e)),
            None => Err(ServeError::Engine("the engine dropped the request".into())),
        }
    }

    /// Reads to the end: the text, the tokens and why it ended.
    async fn read_all(mut self, tokenizer: &Tokenizer) -> Result<(String, Vec<Sampled>, Finish), ServeError> {
        let (mut text, mut tokens) = (String::new(), Vec::new());
        let finish = loop {
            let u = self.next().await?;
            text.push_str(&u.piece);
            tokens.extend(u.token);
            if let Some(f) = u.finish {
                break f;
            }
        };
        // Without stop strings the text is the tokens decoded at once.
        if self.text.is_none() {
            text = tokenizer.decode(&self.ids).map_err(|e| ServeError::Engine(e.to_string()))?;
        }
        Ok((text, tokens, finish))
    }
}

/// The whole answer at once, every choice read side by side. A choice that meets a stop string
/// ends there: its channel is dropped, so the engine drops the sequence.
async fn whole(choices: Vec<Choice>, meta: Arc<ResponseMeta>, log: impl Fn(usize, &str)) -> Response {
    let answers = futures_util::future::join_all(choices.into_iter().map(|c| c.read_all(&meta.tokenizer))).await;
    let (mut choices, mut count, mut how) = (Vec::new(), 0, Vec::new());
    for (index, answer) in answers.into_iter().enumerate() {
        let (text, tokens, finish) = match answer {
            Ok(a) => a,
            Err(e) => {
                log(count, "failed");
                return e.into_response();
            }
        };
        count += tokens.len();
        how.push(finish.name());
        let logprobs = match meta.logprobs(&tokens, &mut 0) {
            Ok(l) => l,
            Err(e) => return e.into_response(),
        };
        choices.push(meta.choice(index, &text, Some(finish), logprobs, false, false));
    }
    log(count, &how.join(","));
    let mut body = meta.body(choices, false);
    body["usage"] = meta.usage(count);
    Json(body).into_response()
}

/// What a choice's task hands the stream: a chunk, its last chunk (with its token count), or an
/// error body.
enum Out {
    Chunk(Value),
    Last(Value, usize, Finish),
    Failed(Value),
}

/// Server-sent events: chunks of text per choice (`index`), each choice's last chunk with its
/// finish reason — the very last one sent also carries the usage of all choices — then
/// `data: [DONE]`. One task per choice reads its events; one forwards their chunks. When the
/// client goes away the forwarding task ends, the choices' tasks with it, and their channels
/// close, so the engine drops the sequences.
fn stream(choices: Vec<Choice>, meta: Arc<ResponseMeta>, log: impl Fn(usize, &str) + Send + 'static) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel::<SseEvent>(64);
    let (out, mut outs) = mpsc::unbounded_channel::<Out>();
    let mut left = choices.len();
    for (index, mut c) in choices.into_iter().enumerate() {
        let (out, meta) = (out.clone(), meta.clone());
        tokio::spawn(async move {
            let (mut first, mut pending, mut offset, mut count) = (true, Vec::new(), 0usize, 0usize);
            loop {
                let u = match c.next().await {
                    Ok(u) => u,
                    Err(e) => {
                        let _ = out.send(Out::Failed(e.body()));
                        return;
                    }
                };
                count += u.token.is_some() as usize;
                pending.extend(u.token);
                if u.piece.is_empty() && u.finish.is_none() {
                    continue;
                }
                let logprobs = match meta.logprobs(&std::mem::take(&mut pending), &mut offset) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = out.send(Out::Failed(e.body()));
                        return;
                    }
                };
                let chunk = meta.body(vec![meta.choice(index, &u.piece, u.finish, logprobs, true, std::mem::take(&mut first))], true);
                // Returning drops `c` and its events, so the engine drops the sequence.
                if let Some(finish) = u.finish {
                    let _ = out.send(Out::Last(chunk, count, finish));
                    return;
                }
                if out.send(Out::Chunk(chunk)).is_err() {
                    return;
                }
            }
        });
    }
    drop(out);
    tokio::spawn(async move {
        let send = |v: Value| SseEvent::default().data(v.to_string());
        let (mut count, mut how) = (0, Vec::new());
        while let Some(o) = outs.recv().await {
            let event = match o {
                Out::Chunk(chunk) => send(chunk),
                Out::Last(mut chunk, tokens, finish) => {
                    (left, count) = (left - 1, count + tokens);
                    how.push(finish.name());
                    if left == 0 {
                        chunk["usage"] = meta.usage(count);
                    }
                    send(chunk)
                }
                Out::Failed(body) => {
                    log(count, "failed");
                    let _ = tx.send(send(body)).await;
                    return;
                }
            };
            if tx.send(event).await.is_err() {
                log(count, "abandoned by the client");
                return;
            }
            if left == 0 {
                log(count, &how.join(","));
                let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                return;
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx)) });
    Sse::new(body).keep_alive(KeepAlive::default())
}
