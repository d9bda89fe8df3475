//! The models on a GPU backend against the CPU backend: every tiny architecture variant, and the
//! real pair's first blocks ([`delta_tests::LAVAPIPE_BLOCKS`]: every block runs the same kernels
//! on the same shapes, and on lavapipe each costs seconds) with a packed delta of every scale
//! mode through `DeltaLinear`'s CubeCL kernels — prefill-shaped (the merged weight formed on the
//! device) and decode-shaped (the delta term added into the base product) — and a multi-tenant
//! batch (`step_batch`: one base GEMM, one kernel launch per delta over its rows). Runs with
//! `--features wgpu` (in CI: Mesa's lavapipe, a Vulkan driver on the CPU) or `--features cuda`.
//! The real pair's checks keep the first [`TOKENS`] tokens of its vocabulary (their prompts' ids
//! are taken modulo it): the LM head (not a delta weight) over all 49,152 took most of a fresh
//! machine's time in CubeCL's GEMM autotune.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use std::path::Path;

use burn::tensor::backend::Backend;
use delta_format::{Checkpoint, DeltaArtifact, ScaleMode};
use delta_models::multi::{step_batch, SeqStep, Tenant};
use delta_models::{CpuBackend, KvCache, Llama, ModelConfig, Projection, Weights};
use delta_tests::tiny::{self, IDS};

use crate::support;

#[cfg(feature = "wgpu")]
type Gpu = delta_models::cube::WgpuBackend;
#[cfg(not(feature = "wgpu"))]
type Gpu = delta_models::cube::CudaBackend;

/// The vocabulary the real pair is cut to here.
const TOKENS: usize = delta_tests::LAVAPIPE_TOKENS;

/// Token ids below [`TOKENS`]: the kernels see the same shapes whatever the ids mean.
fn in_cut_vocabulary(ids: &[u32]) -> Vec<u32> {
    ids.iter().map(|&t| t % TOKENS as u32).collect()
}

fn load<B: Backend>(dir: &Path, delta: Option<&DeltaArtifact>) -> Llama<B> {
    let ckpt = Checkpoint::open(dir).unwrap();
    let weights = Weights::<B>::new(&ckpt, delta, Default::default()).unwrap().fused();
    Llama::load(ModelConfig::load(dir).unwrap(), &weights).unwrap()
}

fn values<B: Backend, const D: usize>(t: burn::tensor::Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// Largest difference relative to the largest magnitude of `want`.
fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
    got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max) / scale
}

#[test]
fn every_architecture_gives_the_cpu_logits_on_the_gpu_backend() {
    let tmp = tempfile::tempdir().unwrap();
    for v in tiny::variants() {
        let dir = tmp.path().join(v.name);
        tiny::write(&v, &dir);
        let cpu = values(load::<CpuBackend>(&dir, None).forward(&[IDS.to_vec()]).unwrap());
        let gpu = values(load::<Gpu>(&dir, None).forward(&[IDS.to_vec()]).unwrap());
        let d = rel_diff(&gpu, &cpu);
        eprintln!("{}: {d:.2e}", v.name);
        assert!(d <= 1e-4, "{}: GPU logits differ from the CPU's by {d} (relative)", v.name);
    }
}

#[test]
fn delta_linear_kernels_give_the_cpu_logits_for_every_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let (base_dir, ft_dir) = delta_tests::smollm2_first_blocks(delta_tests::LAVAPIPE_BLOCKS, Some(TOKENS), tmp.path());
    let (base, ft) = (Checkpoint::open(&base_dir).unwrap(), Checkpoint::open(&ft_dir).unwrap());
    let ids = in_cut_vocabulary(&support::chat_prompt_40());
    for mode in ScaleMode::ALL {
        let artifact = support::artifact(&base, &ft, mode, tmp.path());
        let (cpu, gpu) = (load::<CpuBackend>(&base_dir, Some(&artifact)), load::<Gpu>(&base_dir, Some(&artifact)));
        let packed = gpu.layers.iter().flat_map(|l| l.projections()).filter(|p| matches!(p, Projection::Delta(_))).count();
        assert_eq!(packed, 7 * delta_tests::LAVAPIPE_BLOCKS, "every block linear keeps its delta packed");

        // A 37-row prefill: the merged weight formed on the device, then one GEMM; every row's
        // logits compared. Then 3 decoded rows: the delta term added into the base product.
        let (mut c_cache, mut g_cache) = (KvCache::<CpuBackend>::new(cpu.layers.len()), KvCache::<Gpu>::new(gpu.layers.len()));
        let (c, g) = (cpu.step_all(&[ids[..37].to_vec()], &mut c_cache).unwrap(), gpu.step_all(&[ids[..37].to_vec()], &mut g_cache).unwrap());
        let (g, c) = (values(g), values(c));
        assert_eq!(c.len(), 37 * TOKENS, "logits of every prefill row over the cut vocabulary");
        let d = rel_diff(&g, &c);
        let mut step = 0f32;
        for &t in &ids[37..] {
            let (c, g) = (cpu.step(&[vec![t]], &mut c_cache).unwrap(), gpu.step(&[vec![t]], &mut g_cache).unwrap());
            step = step.max(rel_diff(&values(g), &values(c)));
        }
        eprintln!("{mode}: prefill {d:.2e}, decode {step:.2e} (relative to the largest logit)");
        assert!(d <= 1e-4 && step <= 1e-4, "{mode}: GPU logits differ from the CPU's by {d} (prefill), {step} (decode)");
        let bytes: usize = gpu.layers.iter().flat_map(|l| l.projections()).map(|p| if let Projection::Delta(d) = p { d.device.device_bytes() } else { 0 }).sum();
        assert!(bytes > 0 && bytes as f64 <= 1.2 * artifact_bytes(artifact.path()) as f64, "{mode}: {bytes} bytes of deltas on the device");
    }
}

/// Two steps of a batch of five sequences — the base and three deltas, two sequences on one —
/// on one backend: a prefill (one chunk above 16 rows through its merged weight, the rest through
/// the base GEMM plus per-delta terms), then one decoded token each. The logits of both steps,
/// and the bytes each tenant's deltas hold on the device.
fn batched_steps<B: Backend>(base_dir: &Path, artifacts: &[DeltaArtifact]) -> (Vec<Vec<f32>>, Vec<usize>) {
    let ckpt = Checkpoint::open(base_dir).unwrap();
    let cfg = ModelConfig::load(base_dir).unwrap();
    let base = Llama::<B>::load(cfg.clone(), &Weights::new(&ckpt, None, Default::default()).unwrap()).unwrap();
    let tenants: Vec<Tenant<B>> = artifacts.iter().map(|a| Tenant::new(&base, &ckpt, a).unwrap()).collect();
    let who = [Some(0), None, Some(1), Some(2), Some(0)];
    let prompts: [Vec<u32>; 5] = [vec![1, 9690, 198, 2683, 359, 253, 5356], vec![504, 1345, 28, 216], (0..20).map(|k| 200 + 7 * k).collect(), vec![1, 9690], vec![36, 1345, 8137, 43, 28, 216, 11, 13]];
    let mut inputs: Vec<Vec<u32>> = prompts.iter().map(|p| in_cut_vocabulary(p)).collect();
    let mut caches: Vec<KvCache<B>> = (0..5).map(|_| KvCache::new(cfg.num_hidden_layers)).collect();
    let mut out = Vec::new();
    for _ in 0..2 {
        let mut batch: Vec<SeqStep<'_, B>> = caches.iter_mut().enumerate().map(|(s, cache)| SeqStep { tenant: who[s].map(|d| &tenants[d]), ids: &inputs[s], cache }).collect();
        let logits = values(step_batch(&base, &mut batch).unwrap());
        let vocab = logits.len() / 5;
        assert!(inputs.iter().flatten().all(|&t| (t as usize) < vocab));
        inputs = (0..5).map(|s| vec![(0..vocab).fold(0, |b, i| if logits[s * vocab + i] > logits[s * vocab + b] { i } else { b }) as u32]).collect();
        out.push(logits);
    }
    let on_device = tenants
        .iter()
        .map(|t| t.model.layers.iter().flat_map(|l| l.projections()).map(|p| if let Projection::Delta(d) = p { d.device.device_bytes() } else { 0 }).sum())
        .collect();
    (out, on_device)
}

#[test]
fn a_batch_of_different_deltas_gives_the_cpu_logits_on_the_gpu_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let (base_dir, ft_dir) = delta_tests::smollm2_first_blocks(delta_tests::LAVAPIPE_BLOCKS, Some(TOKENS), tmp.path());
    let (base, ft) = (Checkpoint::open(&base_dir).unwrap(), Checkpoint::open(&ft_dir).unwrap());
    let artifacts: Vec<DeltaArtifact> = [ScaleMode::Scalar, ScaleMode::PerOutput, ScaleMode::PerInput]
        .into_iter()
        .map(|mode| support::artifact(&base, &ft, mode, tmp.path()))
        .collect();
    let ((cpu, _), (gpu, on_device)) = (batched_steps::<CpuBackend>(&base_dir, &artifacts), batched_steps::<Gpu>(&base_dir, &artifacts));
    // Every tenant's deltas went to the device: the kernels ran, not the host fallback.
    assert!(on_device.iter().all(|&b| b > 0), "bytes on the device per tenant: {on_device:?}");
    for (step, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        let d = rel_diff(g, c);
        eprintln!("step {step}: {d:.2e}");
        assert!(d <= 1e-4, "step {step}: the GPU batch's logits differ from the CPU's by {d} (relative)");
    }
}

fn artifact_bytes(path: &Path) -> usize {
    std::fs::metadata(path).unwrap().len() as usize
}
