//! `cargo xtask bench serve`: BitDelta's Fig. 5 comparison on the real pair. The same requests
//! (one per fine-tune, greedy, a fixed number of tokens) served two ways:
//! - multi-tenant: `bitdelta serve` with every delta resident, all requests at once, decoded
//!   together (one base product per layer for all rows plus each delta's 1-bit term);
//! - swapping: one merged model after another (`bitdelta generate --delta`, which merges the
//!   delta into the base on load), as a server holding one full model at a time would.
//!
//! Also the server's memory per extra resident delta (VmRSS after each first use) against the
//! artifact's size. Results to `target/bench/serve.json`, tables on stdout.
//!
//! Options (for other machines, e.g. a GPU through `.device/run.sh`): `--bin PATH` (a built
//! bitdelta instead of building one), `--pair DIR` (`DIR/base` and `DIR/finetuned` instead of the
//! fixtures' pair), `--device NAME` (passed to `serve` and `generate`), `--tokens N` (per
//! request, 64), `--out FILE`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use delta_tests::http::Server;
use serde_json::json;

use crate::{bitdelta, bitdelta_json, fixtures, machine, median, s, target_dir};

const DELTAS: usize = 8;
const PROMPT: &str = "Once upon a time";
const MODES: [&str; 4] = ["scalar", "per-output", "per-input", "auto"];

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).context("no VmRSS")?;
    Ok(kb * 1024)
}

fn request(model: &str, tokens: u32) -> serde_json::Value {
    json!({ "model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": true })
}

/// `n` requests of `tokens` each on models `d0..d(n-1)` at once; (wall seconds, tokens generated).
fn concurrent(server: &Server, n: usize, tokens: u32) -> Result<(f64, u64)> {
    let started = Instant::now();
    let results: Vec<Result<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|d| {
                scope.spawn(move || -> Result<u64> {
                    let r = server.post("/v1/completions", &request(&format!("d{d}"), tokens));
                    if r.status != 200 {
                        bail!("d{d}: {} {}", r.status, r.body);
                    }
                    r.json()["usage"]["completion_tokens"].as_u64().context("no usage")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let tokens = results.into_iter().sum::<Result<u64>>()?;
    Ok((wall, tokens))
}

/// Where and what `bench_serve` runs (see the module docs).
struct Setup {
    bin: PathBuf,
    base: PathBuf,
    ft: PathBuf,
    device: String,
    tokens: u32,
    out: PathBuf,
}

impl Setup {
    fn parse(args: &[String]) -> Result<Self> {
        let (mut bin, mut pair, mut device, mut tokens, mut out) = (None, None, "cpu".to_string(), 64, None);
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--bin" => bin = Some(PathBuf::from(value)),
                "--pair" => pair = Some(PathBuf::from(value)),
                "--device" => device = value.clone(),
                "--tokens" => tokens = value.parse().ok().filter(|&t| t > 0).with_context(|| format!("--tokens {value}: not a positive number"))?,
                "--out" => out = Some(PathBuf::from(value)),
                other => bail!("bench serve: unknown option {other} (--bin, --pair, --device, --tokens, --out)"),
            }
        }
        let pair = match pair {
            Some(p) => p,
            None => fixtures(None)?.join("smollm2"),
        };
        let bin = match bin {
            Some(b) => b,
            None => bitdelta()?,
        };
        let out = out.unwrap_or_else(|| target_dir().join("bench/serve.json"));
        Ok(Setup { bin, base: pair.join("base"), ft: pair.join("finetuned"), device, tokens, out })
    }
}

pub fn bench_serve(args: &[String]) -> Result<()> {
    let Setup { bin, base, ft, device, tokens, out: out_path } = Setup::parse(args)?;
    // The deltas (8 × the artifact) go to a scratch folder, not beside the results.
    let work = std::env::temp_dir().join("bitdelta-bench-serve");
    let folder = work.join("deltas");
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&folder)?;
    // Eight deltas: the pair compressed with each of four scale modes, each twice under two
    // names (loaded and held separately by the server, so eight sets of signs are read per step).
    for (k, mode) in MODES.iter().enumerate() {
        let path = work.join(format!("{mode}.bitdelta.safetensors"));
        bitdelta_json(&bin, &["compress", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&path), "--scale", mode, "--calibrate", "none", "--force"])?;
        for copy in 0..DELTAS / MODES.len() {
            std::fs::copy(&path, folder.join(format!("d{}.bitdelta.safetensors", k + copy * MODES.len())))?;
        }
    }

    let server = Server::start(&bin, &base, &folder, &["--max-resident", &DELTAS.to_string(), "--max-batch", "16", "--device", &device]);
    let warm = server.post("/v1/completions", &json!({ "model": "base", "prompt": PROMPT, "max_tokens": 4 }));
    if warm.status != 200 {
        bail!("warm-up request: {} {}", warm.status, warm.body);
    }
    // Memory per resident delta: RSS before and after each delta's first use.
    let mut memory = Vec::new();
    let mut rss = rss_bytes(server.pid())?;
    let rss_base = rss;
    for d in 0..DELTAS {
        let r = server.post("/v1/completions", &json!({ "model": format!("d{d}"), "prompt": PROMPT, "max_tokens": 1 }));
        if r.status != 200 {
            bail!("loading d{d}: {} {}", r.status, r.body);
        }
        let now = rss_bytes(server.pid())?;
        let artifact = std::fs::metadata(folder.join(format!("d{d}.bitdelta.safetensors")))?.len();
        memory.push(json!({ "delta": d, "mode": MODES[d % MODES.len()], "artifact_bytes": artifact, "rss_increase_bytes": now as i64 - rss as i64 }));
        rss = now;
    }
    let rss_all = rss;

    // Multi-tenant: 1, 2, 4, 8 deltas at once, three runs each.
    println!("machine: {}; bitdelta --device {device}", machine());
    println!("multi-tenant `bitdelta serve`, {tokens} tokens per request, greedy, all requests at once:");
    println!("| deltas | wall | aggregate tokens/s |");
    println!("|---|---|---|");
    let mut served = Vec::new();
    for n in [1usize, 2, 4, 8] {
        let runs: Vec<(f64, u64)> = (0..3).map(|_| concurrent(&server, n, tokens)).collect::<Result<_>>()?;
        let wall = median(runs.iter().map(|r| r.0).collect());
        let tokens = runs[0].1;
        println!("| {n} | {wall:.2} s | {:.1} |", tokens as f64 / wall);
        served.push(json!({ "deltas": n, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens as f64 / wall }));
    }
    let health = server.get("/health").json();
    drop(server);

    // Swapping merged models: each delta merged into the base and run alone, one after another.
    let mut swap_wall = 0.0;
    let (mut swap_tokens, mut swap_decode_s, mut swap_load_s) = (0u64, 0.0, 0.0);
    for d in 0..DELTAS {
        let delta = folder.join(format!("d{d}.bitdelta.safetensors"));
        let (g, wall) = bitdelta_json(&bin, &["generate", "--model", s(&base), "--delta", s(&delta), "--prompt", PROMPT, "--max-new-tokens", &tokens.to_string(), "--ignore-eos", "--device", &device])?;
        let tokens = g["generated_tokens"].as_u64().context("generated_tokens")?;
        swap_wall += wall;
        swap_tokens += tokens;
        swap_decode_s += g["decode_seconds"].as_f64().unwrap_or(0.0) + g["prefill_seconds"].as_f64().unwrap_or(0.0);
        swap_load_s += wall - g["decode_seconds"].as_f64().unwrap_or(0.0) - g["prefill_seconds"].as_f64().unwrap_or(0.0);
    }
    let multi8 = served.last().expect("measured")["tokens_per_s"].as_f64().unwrap_or(0.0);
    let swap_rate = swap_tokens as f64 / swap_wall;
    let swap_gen_rate = swap_tokens as f64 / swap_decode_s;
    println!("\nswapping {DELTAS} merged models (`bitdelta generate --delta`, one after another): {swap_tokens} tokens in {swap_wall:.1} s \
              = {swap_rate:.1} tokens/s ({swap_load_s:.1} s of it loading and merging; generation alone {swap_gen_rate:.1} tokens/s)");
    println!("ratio at {DELTAS} deltas: {:.2}x against swapping, {:.2}x against generation alone", multi8 / swap_rate, multi8 / swap_gen_rate);

    println!("\nmemory per resident delta (server VmRSS after each delta's first request; base alone {:.0} MB):", rss_base as f64 / 1e6);
    println!("| delta | mode | artifact | RSS increase | ratio |");
    println!("|---|---|---|---|---|");
    for m in &memory {
        let (a, r) = (m["artifact_bytes"].as_f64().unwrap_or(0.0), m["rss_increase_bytes"].as_f64().unwrap_or(0.0));
        println!("| d{} | {} | {:.1} MB | {:.1} MB | {:.2} |", m["delta"], m["mode"].as_str().unwrap_or(""), a / 1e6, r / 1e6, r / a);
    }
    let artifacts: f64 = memory.iter().map(|m| m["artifact_bytes"].as_f64().unwrap_or(0.0)).sum();
    println!("all {DELTAS}: {:.1} MB of artifacts, RSS +{:.1} MB ({:.2}x)", artifacts / 1e6, (rss_all - rss_base) as f64 / 1e6, (rss_all - rss_base) as f64 / artifacts);

    let out = json!({
        "machine": machine(), "device": device, "tokens_per_request": tokens, "prompt": PROMPT, "served": served, "server_health": health,
        "swap": { "models": DELTAS, "tokens": swap_tokens, "wall_s": swap_wall, "tokens_per_s": swap_rate, "load_and_merge_s": swap_load_s, "generation_tokens_per_s": swap_gen_rate },
        "ratio_vs_swap": multi8 / swap_rate, "ratio_vs_generation_alone": multi8 / swap_gen_rate,
        "memory": { "rss_base_bytes": rss_base, "rss_all_bytes": rss_all, "per_delta": memory, "artifact_bytes": artifacts },
    });
    let path = out_path;
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    println!("wrote {}", path.display());
    Ok(())
}
