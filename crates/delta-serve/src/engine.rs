//! Continuous batching: one thread owns the decode loop. Each step takes every running sequence —
//! whatever model it is on — and feeds it its next tokens (a chunk of its prompt, or the token it
//! just produced) through one `step_batch`: one base product per projection for all rows plus
//! each delta's term for its rows. New requests join at the next step; finished or abandoned ones
//! leave. Tokens go back to each request's channel as they come.

use std::sync::mpsc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use delta_models::generate::{pick, Sampling, SplitMix};
use delta_models::multi::{step_batch, SeqStep};
use delta_models::{CpuBackend, KvCache, Llama};
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

/// What a request hears back, in order: tokens, then `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Token(u32),
    Done(Finish),
    Failed(String),
}

/// One generation to run.
pub struct Job {
    pub model: Resolved,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub stop: Vec<u32>,
    pub events: UnboundedSender<Event>,
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

struct Running {
    job: Job,
    cache: KvCache<CpuBackend>,
    /// Prompt tokens fed so far.
    fed: usize,
    generated: usize,
    last: u32,
    rng: SplitMix,
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

/// The handle requests submit to; the loop stops when every handle is dropped.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    pub stats: Arc<Stats>,
}

impl Engine {
    pub fn start(base: Arc<Llama<CpuBackend>>, options: EngineOptions) -> Self {
        let (jobs, queue) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let s = stats.clone();
        std::thread::Builder::new().name("bitdelta-engine".into()).spawn(move || run(&base, options, queue, &s)).expect("spawn the engine thread");
        Engine { jobs, stats }
    }

    pub fn submit(&self, job: Job) -> Result<(), String> {
        self.jobs.send(job).map_err(|_| "the engine has stopped".to_string())
    }
}

fn run(base: &Llama<CpuBackend>, options: EngineOptions, queue: mpsc::Receiver<Job>, stats: &Stats) {
    let layers = base.layers.len();
    let mut running: Vec<Running> = Vec::new();
    let admit = |job: Job| Running { rng: SplitMix(job.sampling.seed), job, cache: KvCache::new(layers), fed: 0, generated: 0, last: 0 };
    loop {
        if running.is_empty() {
            match queue.recv() {
                Ok(job) => running.push(admit(job)),
                Err(_) => return,
            }
        }
        while running.len() < options.max_batch.max(1) {
            match queue.try_recv() {
                Ok(job) => running.push(admit(job)),
                Err(_) => break,
            }
        }
        // A client that went away frees its place now rather than after its last token.
        running.retain(|r| !r.job.events.is_closed());
        if running.is_empty() {
            continue;
        }
        let inputs: Vec<Vec<u32>> = running
            .iter()
            .map(|r| {
                if r.fed < r.job.prompt.len() {
                    r.job.prompt[r.fed..(r.fed + options.prefill_chunk.max(1)).min(r.job.prompt.len())].to_vec()
                } else {
                    vec![r.last]
                }
            })
            .collect();
        let logits = {
            let mut batch: Vec<SeqStep<'_, CpuBackend>> = running
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
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                for r in running.drain(..) {
                    let _ = r.job.events.send(Event::Failed(e.to_string()));
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
        let mut finished = Vec::new();
        for (k, (r, ids)) in running.iter_mut().zip(&inputs).enumerate() {
            if r.fed < r.job.prompt.len() {
                r.fed += ids.len();
                if r.fed < r.job.prompt.len() {
                    continue;
                }
            }
            let next = match pick(&logits[k * vocab..(k + 1) * vocab], &r.job.sampling, &mut r.rng) {
                Ok(t) => t,
                Err(e) => {
                    let _ = r.job.events.send(Event::Failed(e.to_string()));
                    finished.push(k);
                    continue;
                }
            };
            r.generated += 1;
            stats.tokens.fetch_add(1, Ordering::Relaxed);
            r.last = next;
            let sent = r.job.events.send(Event::Token(next)).is_ok();
            let end = if r.job.stop.contains(&next) {
                Some(Finish::Stop)
            } else if r.generated >= r.job.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            if let Some(end) = end {
                let _ = r.job.events.send(Event::Done(end));
            }
            if end.is_some() || !sent {
                finished.push(k);
            }
        }
        let mut k = 0;
        running.retain(|_| {
            k += 1;
            !finished.contains(&(k - 1))
        });
    }
}
