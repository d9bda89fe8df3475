//! `cargo xtask ci`: the test suite. Builds every test target of the workspace (release, with the
//! wgpu backend, so the CubeCL kernels and the models on them are tested too — on Mesa's
//! lavapipe where there is no GPU), runs the test binaries as many at once as the machine has
//! cores, then the doc tests.
//!
//! `cargo test` runs one test binary after another, and a binary's last slow tests leave the
//! other cores idle (the models binary ends on a single 80-second test). Here the next binary
//! starts as soon as one ends. Each binary still runs its own tests the way `cargo test` does,
//! in one process (the wgpu tests of a binary share its CubeCL autotune results and compiled
//! kernels: one process per test made a fresh clone's suite no faster, 727 s against 743 s).
//! Order: slowest first, by the times of the last run on this checkout (`target/ci-times.json`),
//! else by [`FRESH_CLONE_SECS`]; binaries with no time at all go first, by name.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{cargo, sh};

/// The features the suite is built with.
const FEATURES: &str = "delta-cli/wgpu";

/// The slow binaries' times in a fresh clone (96c6418's CI on the Zen 3 machine, cold lavapipe
/// caches; BENCHMARKS.md), for the order when this checkout has no times of its own: by name, the
/// models binary would start last and run alone for five minutes at the end.
const FRESH_CLONE_SECS: [(&str, f64); 4] = [("delta-models::models", 298.0), ("delta-cli::cli", 220.0), ("delta-cli::serve", 145.0), ("delta-calib::calibration", 74.0)];

/// A test executable cargo built, and where `cargo test` would run it.
struct Binary {
    /// `package::target`, e.g. `delta-models::models`.
    label: String,
    exe: PathBuf,
    /// The package's folder: `cargo test` runs a test binary there.
    dir: PathBuf,
}

/// How one binary's run went.
struct Outcome {
    binary: usize,
    secs: f64,
    passed: bool,
    /// Tests that passed and failed, from libtest's summary line.
    counts: (usize, usize),
}

pub fn ci(root: &Path, target: &Path, fixtures: &Path) -> Result<()> {
    let started = Instant::now();
    let mut binaries = build(root)?;
    binaries.sort_by(|a, b| a.label.cmp(&b.label));
    let times_file = target.join("ci-times.json");
    let recorded: Option<BTreeMap<String, f64>> = std::fs::read(&times_file).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let known = recorded.unwrap_or_else(|| FRESH_CLONE_SECS.iter().map(|&(label, secs)| (label.to_string(), secs)).collect());
    // Binaries with no time first, by name, then the timed ones slowest first.
    binaries.sort_by(|a, b| match (known.get(&a.label), known.get(&b.label)) {
        (None, None) => std::cmp::Ordering::Equal,
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (Some(x), Some(y)) => y.total_cmp(x),
    });

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!("running {} test binaries, {jobs} at a time", binaries.len());
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::new());
    let run_started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                while let Some((binary, bin)) = Some(next.fetch_add(1, Ordering::Relaxed)).and_then(|i| Some((i, binaries.get(i)?))) {
                    let clock = Instant::now();
                    let (passed, counts, log) = run_binary(bin, fixtures);
                    let secs = clock.elapsed().as_secs_f64();
                    outcomes.lock().unwrap_or_else(|e| e.into_inner()).push(Outcome { binary, secs, passed, counts });
                    // The binary's whole output at once, so that binaries running side by side
                    // do not interleave their lines.
                    eprintln!("\n{} [{secs:6.1} s] {} ({})\n{}", if passed { "PASS" } else { "FAIL" }, bin.label, bin.exe.display(), log.trim_end());
                }
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    let run_secs = run_started.elapsed().as_secs_f64();

    // Every binary that ran gets its time on record for the next run's order.
    let mut times = known;
    for o in &outcomes {
        times.insert(binaries[o.binary].label.clone(), (o.secs * 10.0).round() / 10.0);
    }
    if let Ok(json) = serde_json::to_vec_pretty(&times) {
        let _ = std::fs::write(&times_file, json);
    }

    let mut by_time: Vec<&Outcome> = outcomes.iter().collect();
    by_time.sort_by(|a, b| b.secs.total_cmp(&a.secs));
    eprintln!("\ntest binaries, slowest first:");
    for o in by_time.iter().filter(|o| o.counts.0 + o.counts.1 > 0) {
        eprintln!("  {:6.1} s  {:3} tests  {}", o.secs, o.counts.0 + o.counts.1, binaries[o.binary].label);
    }
    let (passed, failed) = outcomes.iter().fold((0, 0), |(p, f), o| (p + o.counts.0, f + o.counts.1));
    eprintln!("\nci: {passed} tests passed, {failed} failed, in {run_secs:.0} s ({:.0} s of binaries' time, {jobs} at a time)", outcomes.iter().map(|o| o.secs).sum::<f64>());
    let broken: Vec<&str> = outcomes.iter().filter(|o| !o.passed).map(|o| binaries[o.binary].label.as_str()).collect();
    if !broken.is_empty() {
        bail!("test binaries failed: {} ({failed} tests failed)", broken.join(", "));
    }

    sh(cargo().current_dir(root).args(["test", "--workspace", "--release", "--features", FEATURES, "--doc"]).env("DELTA_FIXTURES", fixtures))?;
    eprintln!("ci: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Runs one test binary where `cargo test` would run it: whether it passed, its tests passed
/// and failed (libtest's summary line), and what it printed.
fn run_binary(bin: &Binary, fixtures: &Path) -> (bool, (usize, usize), String) {
    let output = Command::new(&bin.exe).current_dir(&bin.dir).env("CARGO_MANIFEST_DIR", &bin.dir).env("DELTA_FIXTURES", fixtures).output();
    match output {
        Ok(o) => {
            let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            let counts = summary(&log);
            (o.status.success(), counts, log)
        }
        Err(e) => (false, (0, 0), format!("could not start {}: {e}", bin.exe.display())),
    }
}

/// Passed and failed counts from libtest's `test result: ok. 3 passed; 1 failed; …` line.
fn summary(log: &str) -> (usize, usize) {
    let Some(line) = log.lines().rev().find(|l| l.starts_with("test result:")) else { return (0, 0) };
    let count = |word: &str| line.split(';').find_map(|part| part.trim().strip_suffix(word)?.rsplit(' ').next()?.parse().ok()).unwrap_or(0);
    (count(" passed"), count(" failed"))
}

/// Builds the workspace's test targets and returns their executables.
fn build(root: &Path) -> Result<Vec<Binary>> {
    let mut child = cargo()
        .current_dir(root)
        .args(["test", "--workspace", "--release", "--features", FEATURES, "--no-run", "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test --no-run")?;
    let mut binaries = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let msg: serde_json::Value = match serde_json::from_str(&line?) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) = (msg["executable"].as_str(), msg["manifest_path"].as_str()) else { continue };
        let dir = Path::new(manifest).parent().context("a manifest path without a folder")?.to_path_buf();
        let package = dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let target = msg["target"]["name"].as_str().unwrap_or("?");
        binaries.push(Binary { label: format!("{package}::{target}"), exe: exe.into(), dir });
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building the tests failed ({status})");
    }
    Ok(binaries)
}
