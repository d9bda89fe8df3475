//! `bitdelta`: store, ship and apply fine-tuned LLMs as 1-bit deltas on a shared base model.
//!
//! Exit status 0 on success; otherwise 1 with a one-line cause on stderr (2 for usage errors,
//! from clap). `--json` prints exactly one JSON object on stdout.

mod apply;
mod compress;
mod eval;
mod eval_tasks;
mod generate;
mod inspect;
mod load;
mod serve;
mod ui;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bitdelta",
    version,
    about = "Store, ship and apply fine-tuned LLMs as 1-bit deltas on a shared base model.",
    long_about = "Store, ship and apply fine-tuned LLMs as 1-bit deltas on a shared base model.\n\n\
        A delta keeps, for every linear weight inside the transformer blocks, the sign of \
        (fine-tune − base) as one bit per weight plus a few f32 scales; changed norms and other \
        small tensors are kept whole, unchanged tensors are not stored. The artifact is one \
        safetensors file tied to its base by a fingerprint (see FORMAT.md).\n\n\
        Typical use:\n  \
        bitdelta compress --base BASE_DIR --finetuned FT_DIR -o ft.bitdelta.safetensors\n  \
        bitdelta inspect ft.bitdelta.safetensors\n  \
        bitdelta apply --base BASE_DIR --delta ft.bitdelta.safetensors -o FT_RESTORED_DIR\n  \
        bitdelta generate --model BASE_DIR --delta ft.bitdelta.safetensors --chat --prompt \"Tell me a story\"\n  \
        bitdelta serve --base BASE_DIR --deltas DELTAS_DIR --addr 127.0.0.1:8080"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Compress(compress::Args),
    Apply(apply::Args),
    Inspect(inspect::Args),
    Generate(generate::Args),
    Serve(serve::Args),
    /// Evaluate a model, or a base with a delta applied.
    #[command(subcommand)]
    Eval(eval::Command),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if !matches!(cli.command, Command::Serve(_)) {
        keep_freed_memory();
    }
    let result = match cli.command {
        Command::Compress(a) => compress::run(a),
        Command::Apply(a) => apply::run(a),
        Command::Inspect(a) => inspect::run(a),
        // On a thread of rayon's pool: each of a decode step's ~200 fork-joins then starts from a
        // worker, rather than waking one and blocking this thread.
        Command::Generate(a) => rayon::scope(|_| generate::run(a)),
        Command::Serve(a) => serve::run(a),
        Command::Eval(c) => eval::run(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// The batch commands allocate and free large buffers over and over: activations, logits and
/// widened weight tiles of a few to a few hundred MB. With glibc's defaults each large one is a
/// fresh `mmap` whose pages the kernel zeroes and maps again. Served from the heap, with up to
/// 1 GiB of freed memory kept for reuse, a default `compress` on the pair went from 31.6 M page
/// faults and 148 s of system time to 1.5 M and 117 s (peak RSS still under 2 GB), and `eval
/// ppl` from 7.1–7.9 s of system time to 1.5–1.8 s and 16–21% less wall time (peak RSS
/// unchanged; BENCHMARKS.md). `serve` keeps glibc's defaults: a long-running server should give
/// back what a burst of long prompts took, and it measured no faster with these settings.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters, under glibc's own locks; a refused value
    // (return 0) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Help and version go out as clap renders them; usage errors become one line, exit status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
        e.exit();
    }
    let text = e.render().to_string();
    let line: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    eprintln!("{}", line.join(" "));
    ExitCode::from(2)
}
