//! `bitdelta serve`: many fine-tunes on one base behind an OpenAI-compatible HTTP API.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::backend::Backend;
use delta_serve::{EngineOptions, ServeOptions};

/// Serve a base model and every delta in a folder over an OpenAI-compatible HTTP API.
///
/// Models: the base (named after its folder, or --base-name) and each NAME.bitdelta.safetensors
/// in --deltas (named NAME). The folder is read on every request, so a delta copied in while
/// the server runs is served without a restart. A delta loads on first use and is checked
/// against the base's fingerprint (an artifact made for another base is refused with 409, the
/// server keeps serving the rest); beyond --max-resident, the least recently used one is dropped
/// (requests already running on it finish).
///
/// Requests for different deltas are decoded together: each step runs one base product per layer
/// for every running sequence plus each delta's packed 1-bit term for its own rows (on the CPU,
/// or with --device on a GPU through the CubeCL kernels).
///
/// Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true`
/// streams server-sent events), GET /health. Errors are JSON {"error": {"message", "type",
/// "code"}}: 400 malformed request, 404 unknown model or endpoint, 409 delta that cannot be
/// loaded, 500 the server's own failure.
/// Request fields: model, prompt / messages, max_tokens, temperature, top_p, seed, stop, stream,
/// n (up to 16 choices; choice i samples with seed + i), logprobs (completions: 0-20
/// alternatives; chat: true, with top_logprobs 0-20), ignore_eos.
/// Prints `listening on http://ADDR` on stdout once ready, one line per request on stderr.
#[derive(clap::Args)]
pub struct Args {
    /// The base model folder (Hugging Face layout) every delta was made for.
    #[arg(long)]
    base: PathBuf,
    /// Folder of NAME.bitdelta.safetensors artifacts.
    #[arg(long)]
    deltas: PathBuf,
    /// Address to listen on (port 0 picks a free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// The base's model name (default: its folder name).
    #[arg(long)]
    base_name: Option<String>,
    /// Most deltas held in memory at once (least recently used ones are dropped).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    max_resident: u32,
    /// Most sequences decoded together in one step (more wait for a free place).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    max_batch: u32,
    /// Most prompt tokens a sequence feeds per step (long prompts do not stall the others).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    prefill_chunk: u32,
    /// Most prompt + generated tokens per request: at most the base's context
    /// (max_position_embeddings in its config.json), which is the default up to 4096.
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..))]
    max_context: Option<u32>,
    /// Where the models run: `cpu`, or a GPU through `wgpu` (Vulkan, Metal, DX12) or `cuda`
    /// (those need a bitdelta built with `--features wgpu` / `--features cuda`).
    #[arg(long, value_enum, default_value_t = crate::load::DeviceArg::Cpu)]
    device: crate::load::DeviceArg,
}

pub fn run(a: Args) -> Result<()> {
    crate::load::on_device(a.device, a)
}

impl crate::load::OnDevice for Args {
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        serve::<B>(self, &device)
    }
}

fn serve<B: Backend>(a: Args, device: &B::Device) -> Result<()> {
    let options = ServeOptions {
        base: a.base,
        deltas: a.deltas,
        base_name: a.base_name,
        max_resident: a.max_resident as usize,
        max_context: a.max_context.map(|n| n as usize),
        engine: EngineOptions { max_batch: a.max_batch as usize, prefill_chunk: a.prefill_chunk as usize },
    };
    delta_serve::run::<B>(&options, device, &a.addr, |addr| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    })?;
    Ok(())
}
