//! Continuous batching: one thread owns the decode loop. Each step takes every running sequence —
//! whatever model it is on — and feeds it its next tokens (a chunk of its prompt, or the token it
//! just produced) through one `step_batch`: one base product per projection for all rows plus
//! each delta's term for its rows. New requests join at the next step; finished or abandoned ones
//! leave. Tokens go back to each request's channel as they come. A request for several choices
//! (`n`) prefills its prompt once; the choices then go on from copies of that KV cache.
//!
//! The loop's thread is the only one that touches the models' device: a delta's weights are put
//! there by [`Engine::on_device`], between two steps, not by the thread that read the file. GPU
//! runtimes (CubeCL's streams and device queue, wgpu) then see one thread, as in `generate`.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use delta_models::generate::{logprobs, pick, Sampling, SplitMix, TokenLogprobs};
use delta_models::multi::{step_batch, SeqStep};
use burn::tensor::backend::Backend;
use delta_models::{KvCache, Llama};
use tokio::sync::mpsc::UnboundedSender;

use crate::registry::Resolved;

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// On a stop token (kept as the last token).
    Stop,
    /// On the token limit.
    Length,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a choice hears back, in order: tokens, then `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Token(Sampled),
    Done(Finish),
    Failed(String),
}

/// One generated token, with its log-probabilities when the job asked for them.
#[derive(Debug)]
pub struct Sampled {
    pub id: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// One generation to run, for one or more choices.
pub struct Job<B: Backend> {
    pub model: Resolved<B>,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<u32>,
    /// `Some(k)`: send each token's log-probability and the k most likely tokens with it.
    pub logprobs: Option<usize>,
    /// One channel per choice; choice i samples with the seed `sampling.seed + i`.
    pub choices: Vec<UnboundedSender<Event>>,
}

#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// Most sequences in one step (more wait for a free place).
    pub max_batch: usize,
    /// Most prompt tokens one sequence feeds per step, so long prompts do not stall the others.
    pub prefill_chunk: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { max_batch: 16, prefill_chunk: 256 }
    }
}

struct Running<B: Backend> {
    job: Arc<Job<B>>,
    events: UnboundedSender<Event>,
    cache: KvCache<B>,
    /// Prompt tokens fed so far.
    fed: usize,
    generated: usize,
    last: u32,
    rng: SplitMix,
    /// The job's other choices (channel, seed), split off when the prompt is in the cache.
    forks: Vec<(UnboundedSender<Event>, u64)>,
}

impl<B: Backend> Running<B> {
    fn admit(mut job: Job<B>, layers: usize) -> Self {
        let seed = job.sampling.seed;
        let mut choices = std::mem::take(&mut job.choices).into_iter();
        let events = choices.next().unwrap_or_else(|| tokio::sync::mpsc::unbounded_channel().0);
        let forks = choices.zip(1u64..).map(|(c, i)| (c, seed.wrapping_add(i))).collect();
        Running { job: Arc::new(job), events, cache: KvCache::new(layers), fed: 0, generated: 0, last: 0, rng: SplitMix(seed), forks }
    }

    /// Places in the batch: the sequence and the choices it will split into.
    fn places(&self) -> usize {
        1 + self.forks.len()
    }

    /// Nobody is listening any more (the client went away, or every choice hit a stop string).
    fn abandoned(&self) -> bool {
        self.events.is_closed() && self.forks.iter().all(|(c, _)| c.is_closed())
    }

    /// Picks and sends the next token from this sequence's row of logits; true when it is done.
    fn emit(&mut self, row: &[f32], stats: &Stats) -> bool {
        let next = match pick(row, &self.job.sampling, &mut self.rng) {
            Ok(t) => t,
            Err(e) => {
                let _ = self.events.send(Event::Failed(e.to_string()));
                return true;
            }
        };
        self.generated += 1;
        stats.tokens.fetch_add(1, Ordering::Relaxed);
        self.last = next;
        let logprobs = self.job.logprobs.map(|k| logprobs(row, next, k));
        let sent = self.events.send(Event::Token(Sampled { id: next, logprobs })).is_ok();
        let end = if self.job.stop.contains(&next) {
            Some(Finish::Stop)
        } else if self.generated >= self.job.max_tokens {
            Some(Finish::Length)
        } else {
            None
        };
        if let Some(end) = end {
            let _ = self.events.send(Event::Done(end));
        }
        end.is_some() || !sent
    }
}

/// What the loop has done so far (for `/health` and benchmarks).
#[derive(Default, Debug)]
pub struct Stats {
    pub steps: AtomicU64,
    /// Sequences summed over steps (rows / steps = mean batch).
    pub sequences: AtomicU64,
    /// Generated tokens.
    pub tokens: AtomicU64,
    /// Most sequences, and most distinct models (base and deltas), in one step.
    pub max_sequences: AtomicU64,
    pub max_models: AtomicU64,
}

/// What the loop takes in: a generation, or work on the models' device.
enum Work<B: Backend> {
    Job(Job<B>),
    OnDevice(Box<dyn FnOnce() + Send>),
}

/// The handle requests submit to; the loop stops when every handle is dropped.
pub struct Engine<B: Backend> {
    work: mpsc::Sender<Work<B>>,
    pub stats: Arc<Stats>,
}

impl<B: Backend> Clone for Engine<B> {
    fn clone(&self) -> Self {
        Engine { work: self.work.clone(), stats: self.stats.clone() }
    }
}

impl<B: Backend> Engine<B> {
    pub fn start(base: Arc<Llama<B>>, options: EngineOptions) -> Self {
        let (work, queue) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        // The loop itself runs on a thread of rayon's pool (this one waits for it): every
        // product's fork-join then starts from a worker, which saves waking one thread and
        // blocking another per product (a decode step has ~200).
        std::thread::Builder::new().name("bitdelta-engine".into()).spawn(move || rayon::scope(|_| run(&base, options, queue, &s))).expect("spawn the engine thread");
        Engine { work, stats }
    }

    pub fn submit(&self, job: Job<B>) -> Result<(), String> {
        self.work.send(Work::Job(job)).map_err(|_| STOPPED.to_string())
    }

    /// Runs `f` on the loop's thread before its next step and waits for the result: how
    /// anything that puts tensors on the models' device (a delta's weights) gets there. A panic
    /// in `f` comes back as an error. Never call it from inside `f`: the loop would wait on itself.
    pub fn on_device<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        let task = move || {
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| panic_message(p.as_ref())));
        };
        self.work.send(Work::OnDevice(Box::new(task))).map_err(|_| STOPPED.to_string())?;
        rx.recv().map_err(|_| STOPPED.to_string())?
    }
}

const STOPPED: &str = "the engine has stopped";

/// A panic's message, without the `===` rulers some of Burn's carry.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let what = panic.downcast_ref::<String>().map(String::as_str).or(panic.downcast_ref::<&str>().copied()).unwrap_or("no message");
    let what: Vec<&str> = what.split_whitespace().filter(|w| !w.contains("===")).collect();
    what.join(" ")
}

fn run<B: Backend>(base: &Llama<B>, options: EngineOptions, queue: mpsc::Receiver<Work<B>>, stats: &Stats) {
    let layers = base.layers.len();
    let mut running: Vec<Running<B>> = Vec::new();
    // Jobs taken in while the batch was full, in order. Device work runs as it comes, so a
    // delta loads whether or not the batch has room.
    let mut waiting: VecDeque<Job<B>> = VecDeque::new();
    let take = |work: Work<B>, waiting: &mut VecDeque<Job<B>>| match work {
        Work::Job(job) => waiting.push_back(job),
        Work::OnDevice(task) => task(),
    };
    loop {
        if running.is_empty() && waiting.is_empty() {
            match queue.recv() {
                Ok(work) => take(work, &mut waiting),
                Err(_) => return,
            }
        }
        while let Ok(work) = queue.try_recv() {
            take(work, &mut waiting);
        }
        while running.iter().map(Running::places).sum::<usize>() < options.max_batch.max(1) {
            match waiting.pop_front() {
                Some(job) => running.push(Running::admit(job, layers)),
                None => break,
            }
        }
        // A client that went away frees its place now rather than after its last token.
        running.retain(|r| !r.abandoned());
        if running.is_empty() {
            continue;
        }
        let inputs: Vec<Vec<u32>> = running
            .iter()
            .map(|r| {
                let prompt = &r.job.prompt;
                if r.fed < prompt.len() {
                    prompt[r.fed..(r.fed + options.prefill_chunk.max(1)).min(prompt.len())].to_vec()
                } else {
                    vec![r.last]
                }
            })
            .collect();
        // A panic inside the model fails this step's requests, not the server.
        let logits = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut batch: Vec<SeqStep<'_, B>> = running
                .iter_mut()
                .zip(&inputs)
                .map(|(r, ids)| SeqStep {
                    tenant: match &r.job.model {
                        Resolved::Base => None,
                        Resolved::Delta(t) => Some(t.as_ref()),
                    },
                    ids,
                    cache: &mut r.cache,
                })
                .collect();
            step_batch(base, &mut batch).and_then(|t| t.into_data().into_vec::<f32>().map_err(|e| delta_models::ModelError::Input(format!("{e:?}"))))
        }))
        .unwrap_or_else(|panic| Err(delta_models::ModelError::Input(format!("the decode step panicked: {}", panic_message(panic.as_ref())))));
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                for r in running.drain(..) {
                    for events in std::iter::once(&r.events).chain(r.forks.iter().map(|f| &f.0)) {
                        let _ = events.send(Event::Failed(e.to_string()));
                    }
                }
                continue;
            }
        };
        let vocab = logits.len() / running.len();
        let mut models: Vec<*const ()> = running
            .iter()
            .map(|r| match &r.job.model {
                Resolved::Base => std::ptr::null(),
                Resolved::Delta(t) => Arc::as_ptr(t) as *const (),
            })
            .collect();
        models.sort();
        models.dedup();
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats.sequences.fetch_add(running.len() as u64, Ordering::Relaxed);
        stats.max_sequences.fetch_max(running.len() as u64, Ordering::Relaxed);
        stats.max_models.fetch_max(models.len() as u64, Ordering::Relaxed);
        let mut done = vec![false; running.len()];
        let mut split = Vec::new();
        for (k, (r, ids)) in running.iter_mut().zip(&inputs).enumerate() {
            if r.fed < r.job.prompt.len() {
                r.fed += ids.len();
                if r.fed < r.job.prompt.len() {
                    continue;
                }
            }
            let row = &logits[k * vocab..(k + 1) * vocab];
            // The prompt is in the cache: the other choices start from copies of it.
            for (events, seed) in std::mem::take(&mut r.forks) {
                let mut fork = Running { job: r.job.clone(), events, cache: r.cache.clone(), fed: r.fed, generated: 0, last: 0, rng: SplitMix(seed), forks: Vec::new() };
                if !fork.emit(row, stats) {
                    split.push(fork);
                }
            }
            done[k] = r.emit(row, stats);
        }
        let mut k = 0;
        running.retain(|_| {
            k += 1;
            !done[k - 1]
        });
        running.extend(split);
    }
}
