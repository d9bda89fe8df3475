//! `cargo xtask ci`: the test suite. Builds every test target of the workspace (release, with the
//! wgpu backend, so the CubeCL kernels and the models on them are tested too — on Mesa's
//! lavapipe where there is no GPU), then runs each test in its own process, as many at once as
//! the machine has cores, and the doc tests last.
//!
//! `cargo test` runs one test binary after another, and a binary's last slow test leaves the other
//! cores idle (the models binary ends on a single 80-second test). Taking the tests one by one
//! from all binaries keeps every core busy. Order: the tests an earlier run on this checkout timed
//! (`target/ci-times.json`) slowest first, new ones before them; in a fresh clone, the order
//! `cargo test` lists them in.

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

/// A test executable cargo built, and where `cargo test` would run it.
struct Binary {
    /// `package::target`, e.g. `delta-models::models`.
    label: String,
    exe: PathBuf,
    /// The package's folder: `cargo test` runs a test binary there.
    dir: PathBuf,
}

struct Test {
    binary: usize,
    name: String,
}

struct Outcome {
    test: usize,
    secs: f64,
    passed: bool,
}

pub fn ci(root: &Path, target: &Path, fixtures: &Path) -> Result<()> {
    let started = Instant::now();
    let binaries = build(root)?;
    let mut tests = Vec::new();
    for (b, bin) in binaries.iter().enumerate() {
        tests.extend(list(bin)?.into_iter().map(|name| Test { binary: b, name }));
    }
    let times_file = target.join("ci-times.json");
    let known: BTreeMap<String, f64> = std::fs::read(&times_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let key = |t: &Test| format!("{} {}", binaries[t.binary].label, t.name);
    // New tests (no time on record) first in listing order, then the timed ones slowest first.
    let mut order: Vec<usize> = (0..tests.len()).collect();
    order.sort_by(|&a, &b| {
        let (ta, tb) = (known.get(&key(&tests[a])), known.get(&key(&tests[b])));
        match (ta, tb) {
            (None, None) => a.cmp(&b),
            (None, Some(_)) => std::cmp::Ordering::Less,
            (Some(_), None) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => y.total_cmp(x),
        }
    });

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!("running {} tests from {} binaries, {jobs} at a time", tests.len(), binaries.len());
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::new());
    let run_started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                while let Some(&t) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let (test, bin) = (&tests[t], &binaries[tests[t].binary]);
                    let clock = Instant::now();
                    let (passed, log) = run_one(bin, &test.name, fixtures);
                    let secs = clock.elapsed().as_secs_f64();
                    let mut done = outcomes.lock().unwrap_or_else(|e| e.into_inner());
                    done.push(Outcome { test: t, secs, passed });
                    eprintln!("{} [{secs:6.1} s] ({:3}/{}) {} {}", if passed { "PASS" } else { "FAIL" }, done.len(), tests.len(), bin.label, test.name);
                    if !passed {
                        eprintln!("{}", log.trim_end());
                    }
                }
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    let run_secs = run_started.elapsed().as_secs_f64();

    // Every test that ran gets its time on record for the next run's order.
    let mut times = known;
    for o in &outcomes {
        times.insert(key(&tests[o.test]), (o.secs * 10.0).round() / 10.0);
    }
    if let Ok(json) = serde_json::to_vec_pretty(&times) {
        let _ = std::fs::write(&times_file, json);
    }

    let failed: Vec<String> = outcomes.iter().filter(|o| !o.passed).map(|o| key(&tests[o.test])).collect();
    let mut slowest: Vec<&Outcome> = outcomes.iter().collect();
    slowest.sort_by(|a, b| b.secs.total_cmp(&a.secs));
    eprintln!("\nslowest tests:");
    for o in slowest.iter().take(8) {
        eprintln!("  {:6.1} s  {}", o.secs, key(&tests[o.test]));
    }
    eprintln!(
        "\nci: {} passed, {} failed, in {run_secs:.0} s of tests ({:.0} s of test time on {jobs} at a time)",
        outcomes.len() - failed.len(),
        failed.len(),
        outcomes.iter().map(|o| o.secs).sum::<f64>()
    );
    if !failed.is_empty() {
        bail!("{} of {} tests failed: {}", failed.len(), outcomes.len(), failed.join(", "));
    }

    sh(cargo().current_dir(root).args(["test", "--workspace", "--release", "--features", FEATURES, "--doc"]).env("DELTA_FIXTURES", fixtures))?;
    eprintln!("ci: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Runs one test alone in its binary, where `cargo test` would run the binary: whether it passed
/// (a filter that ran no test is a failure too), and what it printed.
fn run_one(bin: &Binary, name: &str, fixtures: &Path) -> (bool, String) {
    let output = Command::new(&bin.exe)
        .args([name, "--exact", "--test-threads", "1"])
        .current_dir(&bin.dir)
        .env("CARGO_MANIFEST_DIR", &bin.dir)
        .env("DELTA_FIXTURES", fixtures)
        .output();
    match output {
        Ok(o) => {
            let stdout = String::from_utf8_lossy(&o.stdout);
            (o.status.success() && stdout.contains("test result: ok. 1 passed"), format!("{stdout}{}", String::from_utf8_lossy(&o.stderr)))
        }
        Err(e) => (false, format!("could not start {}: {e}", bin.exe.display())),
    }
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

/// The names of a test binary's tests (`--list --format terse`: `name: test` lines).
fn list(bin: &Binary) -> Result<Vec<String>> {
    let out = Command::new(&bin.exe).args(["--list", "--format", "terse"]).current_dir(&bin.dir).output().with_context(|| format!("listing {}", bin.exe.display()))?;
    if !out.status.success() {
        bail!("listing the tests of {} failed: {}", bin.label, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.strip_suffix(": test")).map(str::to_string).collect())
}
