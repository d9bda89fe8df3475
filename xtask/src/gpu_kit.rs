//! `cargo xtask gpu-kit [--backend cuda|wgpu]`: everything the GPU checks of issues #5, #6, #7
//! and #9 need on a lent machine that has a GPU but no Rust and no network, in `.device/` (ignored
//! by git, carried by the device tool): `run.sh` (from `xtask/gpu/run.sh`) and `kit.tar.xz` with
//! the stripped `bitdelta` and Fig. 4 bench built for the backend, this xtask (for `random-pair`
//! and `bench serve` there), SmolLM2's config and tokenizer, and C4 calibration text.
//!
//! `random-pair LIKE OUT`: a random base (bf16, the shapes `LIKE/config.json` calls for) and a
//! "fine-tune" (the base plus small noise on every block linear) in `OUT/base` and
//! `OUT/finetuned`, with LIKE's config and tokenizer — a stand-in of the real pair's size where
//! the real pair cannot go (270 MB each, over the device tool's 64 MiB). Its text is noise; its
//! timings are the real pair's.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use delta_format::checkpoint::is_block_linear;
use delta_tests::{tiny, write_folder, RawTensor, Rng};

use crate::{cargo, fixtures, root, s, sh, target_dir};

/// Standard deviation of the random weights (Hugging Face's Llama init) and of the fine-tune's
/// changes to them.
const WEIGHT_STD: f32 = 0.02;
const CHANGE_STD: f32 = 0.002;

/// Files of a model folder besides the weights that travel with it, where present.
const SIDE_FILES: [&str; 4] = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"];

pub fn random_pair(like: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(like.join("config.json")).with_context(|| format!("reading {}/config.json", like.display()))?;
    let mut config: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}/config.json", like.display()))?;
    config["torch_dtype"] = "bfloat16".into();
    let shapes = tiny::shapes(&config);
    let mut rng = Rng::new(2026);
    // Uniform values with the wanted standard deviation: U(-1, 1) has σ = 1/√3.
    let (w, dw) = (WEIGHT_STD * 3f32.sqrt(), CHANGE_STD * 3f32.sqrt());
    let (mut base, mut ft) = (Vec::new(), Vec::new());
    for (name, shape) in &shapes {
        let count: usize = shape.iter().product();
        let b: Vec<f32> = if name.ends_with("norm.weight") { vec![1.0; count] } else { (0..count).map(|_| w * rng.uniform()).collect() };
        let changed = is_block_linear(name, shape);
        let f: Vec<f32> = if changed { b.iter().map(|v| v + dw * rng.uniform()).collect() } else { b.clone() };
        base.push(RawTensor::from_f32(name, safetensors::Dtype::BF16, shape, &b));
        ft.push(RawTensor::from_f32(name, safetensors::Dtype::BF16, shape, &f));
    }
    for (dir, tensors) in [(out.join("base"), base), (out.join("finetuned"), ft)] {
        let _ = std::fs::remove_dir_all(&dir);
        write_folder(&dir, &tensors);
        // config.json is written below, with the dtype set.
        for f in SIDE_FILES.iter().skip(1).filter(|f| like.join(f).exists()) {
            std::fs::copy(like.join(f), dir.join(f))?;
        }
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    }
    let params: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    eprintln!("random pair of {:.1} M parameters in {}", params as f64 / 1e6, out.display());
    Ok(())
}

pub fn gpu_kit(args: &[String]) -> Result<()> {
    let backend = match args {
        [] => "cuda",
        [flag, b] if flag == "--backend" && (b == "cuda" || b == "wgpu") => b.as_str(),
        _ => bail!("usage: cargo xtask gpu-kit [--backend cuda|wgpu]"),
    };
    let fx = fixtures(None)?;
    let dir = root().join(".device");
    let _ = std::fs::remove_dir_all(&dir);
    let kit = dir.join("kit");
    std::fs::create_dir_all(kit.join("smollm2"))?;
    std::fs::create_dir_all(kit.join("text"))?;
    let build = |c: &mut Command| {
        if backend == "cuda" && std::env::var_os("CUDARC_CUDA_VERSION").is_none() {
            // The lent machines have CUDA 13 and no toolkit here to ask.
            c.env("CUDARC_CUDA_VERSION", "13000");
        }
        c.current_dir(root());
    };
    let mut c = cargo();
    c.args(["build", "--release", "--quiet", "-p", "delta-cli", "--features", backend]);
    build(&mut c);
    sh(&mut c)?;
    strip_into(&target_dir().join("release/bitdelta"), &kit.join("bitdelta"))?;
    let mut c = cargo();
    c.args(["bench", "-p", "delta-models", "--features", backend, "--bench", "fig4_gpu", "--no-run", "--message-format", "json"]);
    build(&mut c);
    let out = c.output().context("building the fig4_gpu bench")?;
    if !out.status.success() {
        bail!("building the fig4_gpu bench: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let bench = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "fig4_gpu")
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo named no fig4_gpu executable")?;
    strip_into(&bench, &kit.join("fig4_gpu"))?;
    strip_into(&std::env::current_exe()?, &kit.join("xtask"))?;
    for f in SIDE_FILES {
        let from = fx.join("smollm2/base").join(f);
        if from.exists() {
            std::fs::copy(&from, kit.join("smollm2").join(f))?;
        }
    }
    std::fs::copy(fx.join("text/c4.utf8"), kit.join("text/c4.utf8"))?;
    std::fs::write(kit.join("backend"), backend)?;
    sh(Command::new("tar").arg("-cJf").arg(dir.join("kit.tar.xz")).arg("-C").arg(&dir).arg("kit"))?;
    std::fs::remove_dir_all(&kit)?;
    let run = dir.join("run.sh");
    std::fs::copy(root().join("xtask/gpu/run.sh"), &run)?;
    let size = std::fs::metadata(dir.join("kit.tar.xz"))?.len();
    println!("{} ready: kit.tar.xz {:.1} MB ({backend}) and run.sh", dir.display(), size as f64 / 1e6);
    println!("on the device: run with carry [\".device\"] and the command `.device/run.sh` (see its header)");
    Ok(())
}

fn strip_into(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    sh(Command::new("strip").arg(s(to)))
}
