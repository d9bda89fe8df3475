//! `bitdelta generate`: continue a prompt, streaming the text to stdout as it is decoded.

use std::io::Write;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use delta_models::chat::Message;
use delta_models::generate::{generate, Sampling};
use delta_models::TextStream;

use crate::load::ModelArgs;

/// Generate text with a model, or a base with a delta applied.
///
/// The prompt is encoded without special tokens (with --chat, the model's chat template makes
/// the prompt, special tokens included). Tokens stream to stdout as they are decoded; prefill and
/// decode speeds go to stderr. Generation stops at the model's end-of-sequence token(s) (and,
/// with --chat, the template's eos token) or after --max-new-tokens.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(long, required_unless_present = "prompt_ids", conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as token ids, comma-separated (instead of --prompt).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt as a user message in the model's chat template and open the assistant's turn.
    #[arg(long, conflicts_with = "prompt_ids")]
    chat: bool,
    /// With --chat: a system message first (otherwise the template's default, if any).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate (with the prompt, at most the model's context,
    /// max_position_embeddings in its config.json).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_new_tokens: u32,
    /// 0 = greedy (most likely token); above 0, sample from softmax(logits / T).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    temperature: f32,
    /// With a temperature above 0: sample only among the most likely tokens whose probabilities
    /// first add up to at least P (nucleus sampling); 1 keeps every token.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    top_p: f32,
    /// Seed for sampling (the same seed and prompt give the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens, to exactly --max-new-tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object on stdout (text, token ids, speeds) instead of streaming.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let device = a.model.device;
    crate::load::on_device(device, a)
}

impl crate::load::OnDevice for Args {
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        generate_on::<B>(self, &device)
    }
}

fn generate_on<B: Backend>(a: Args, device: &B::Device) -> Result<()> {
    let sampling = Sampling { temperature: a.temperature, top_p: a.top_p, seed: a.seed };
    sampling.check().map_err(|e| anyhow::anyhow!("{e} (--temperature, --top-p)"))?;
    let loaded = a.model.load::<B>(device)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let mut stop = model.cfg.eos_token_ids();
    let prompt = match (&a.prompt_ids, &a.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) if a.chat => {
            let template = loaded.chat_template()?;
            stop.extend(tok.token_id(&template.eos_token));
            let mut messages: Vec<Message> = a.system.iter().map(|s| Message { role: "system".into(), content: s.clone() }).collect();
            messages.push(Message::user(text));
            tok.encode(&template.render(&messages, true)?, false)?
        }
        (None, Some(text)) => tok.encode(text, false)?,
        (None, None) => unreachable!("clap requires one of --prompt, --prompt-ids"),
    };
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    if let Some(context) = model.cfg.max_position_embeddings.filter(|&c| prompt.len() + a.max_new_tokens as usize > c) {
        bail!(
            "{} prompt tokens + --max-new-tokens {} exceed the model's context of {context} tokens (max_position_embeddings in its config.json)",
            prompt.len(),
            a.max_new_tokens
        );
    }
    if a.ignore_eos {
        stop.clear();
    }
    let mut stream = TextStream::new(tok);
    let mut stdout = std::io::stdout().lock();
    let mut failure = None;
    let g = generate(model, &prompt, a.max_new_tokens as usize, sampling, &stop, &mut |id| {
        if a.json {
            return true;
        }
        match stream.push(id).map_err(anyhow::Error::from).and_then(|s| Ok(write!(stdout, "{s}").and_then(|_| stdout.flush())?)) {
            Ok(()) => true,
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e).context("writing the generated text");
    }
    let text = tok.decode(&g.tokens)?;
    if a.json {
        let out = serde_json::json!({
            "model": a.model.model, "delta": a.model.delta, "delta_use": a.model.delta_use.name(),
            "device": a.model.device.name(), "prompt_ids": prompt, "tokens": g.tokens, "text": text, "stopped_at_eos": g.stopped,
            "prompt_tokens": g.prompt_tokens, "generated_tokens": g.tokens.len(),
            "prefill_seconds": g.prefill_seconds, "decode_seconds": g.decode_seconds,
            "prefill_tokens_per_second": g.prefill_tokens_per_second(),
            "decode_tokens_per_second": g.decode_tokens_per_second(),
        });
        println!("{out}");
    } else {
        writeln!(stdout)?;
        eprintln!(
            "{} prompt tokens ({:.0} tokens/s prefill), {} generated ({:.1} tokens/s decode){}",
            g.prompt_tokens,
            g.prefill_tokens_per_second(),
            g.tokens.len(),
            g.decode_tokens_per_second(),
            if g.stopped { ", ended at end-of-sequence" } else { "" }
        );
    }
    Ok(())
}
