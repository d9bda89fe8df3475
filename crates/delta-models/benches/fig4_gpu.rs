//! BitDelta's Fig. 4 sweep on a GPU backend (`--features cuda`, else `wgpu`): B requests, each
//! with its own delta over one N×N base weight, decoded together — the path `step_batch` takes on
//! the device (one Burn GEMM for the base, then one CubeCL launch per delta over its rows) —
//! against B separate dense GEMVs of merged weights; the delta terms alone (what BitDelta's
//! Triton kernel computes); the base product alone; and a device copy for the roofline.
//!
//! Build here, run where the GPU is (no Rust needed there):
//! `CUDARC_CUDA_VERSION=13000 cargo bench -p delta-models --features cuda --bench fig4_gpu --no-run`
//! prints the executable; run it with `--bench` (`FIG4_SIZES=1024,4096` to choose sizes; on wgpu
//! N ≤ 4096, as wgpu's default limits refuse one buffer of 8192² f32).

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cubecl::prelude::*;
use delta_format::CompressedWeight;
use delta_kernels::cube::ResidentDelta;
use delta_models::cube::DeviceDelta;

#[path = "../../delta-kernels/tests/support/mod.rs"]
mod support;

use support::{fig4_delta as delta, fig4_sizes as sizes, random};

#[cfg(feature = "cuda")]
type G = delta_models::cube::CudaBackend;
#[cfg(feature = "cuda")]
type R = cubecl::cuda::CudaRuntime;
#[cfg(not(feature = "cuda"))]
type G = delta_models::cube::WgpuBackend;
#[cfg(not(feature = "cuda"))]
type R = burn_wgpu::WgpuRuntime;

const BATCHES: [usize; 6] = [1, 2, 4, 8, 16, 32];

fn matrix(values: Vec<f32>, rows: usize, cols: usize, device: &burn::tensor::Device<G>) -> Tensor<G, 2> {
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

fn sync(device: &burn::tensor::Device<G>) {
    G::sync(device).expect("the device finishes its queue");
}

fn fig4(c: &mut Criterion) {
    let device = burn::tensor::Device::<G>::default();
    let client = R::client(&device);
    eprintln!("backend: {}", G::name(&device));
    for n in sizes() {
        let wt = matrix(random(n * n, n as u64), n, n, &device);
        // One merged weight per request, as separate fine-tunes would have (up to 8 GiB of them).
        let pool = (*BATCHES.last().unwrap()).min(((8usize << 30) / (n * n * 4)).max(1));
        let merged: Vec<Tensor<G, 2>> = (0..pool).map(|k| matrix(random(n * n, (n + k) as u64 + 1), n, n, &device)).collect();
        let deltas: Vec<CompressedWeight<'static>> = (0..*BATCHES.last().unwrap() as u64).map(|d| delta(n, d + 7)).collect();
        let on_device: Vec<DeviceDelta> = deltas.iter().map(|_| DeviceDelta::default()).collect();
        let pairs: Vec<(&CompressedWeight<'_>, &DeviceDelta)> = deltas.iter().zip(&on_device).collect();
        let resident: Vec<ResidentDelta> = deltas.iter().map(|d| ResidentDelta::upload(&client, d).unwrap()).collect();
        let mut group = c.benchmark_group(format!("fig4_gpu_n{n}"));
        group.sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
        for b in BATCHES {
            let xv = random(b * n, 99);
            let x = matrix(xv.clone(), b, n, &device);
            let row_delta: Vec<Option<usize>> = (0..b).map(Some).collect();
            // Bytes that must come from memory: the base once, each row's signs and scales.
            group.throughput(Throughput::Bytes((n * n * 4 + b * (n * n / 8 + n * 4)) as u64));
            group.bench_with_input(BenchmarkId::new("batched_delta", b), &b, |bench, _| {
                bench.iter(|| {
                    let y = delta_models::cube::base_and_deltas(&x, &wt, &pairs[..b], &row_delta).expect("a GPU backend");
                    sync(&device);
                    y
                })
            });
            group.throughput(Throughput::Bytes((n * n * 4) as u64));
            group.bench_with_input(BenchmarkId::new("base_product", b), &b, |bench, _| {
                bench.iter(|| {
                    let y = x.clone().matmul(wt.clone());
                    sync(&device);
                    y
                })
            });
            // The delta terms alone, into a resident output: BitDelta's Triton kernel's job.
            let x_h = client.create_from_slice(f32::as_bytes(&xv));
            let y_h = client.empty(b * n * 4);
            let ids: Vec<_> = (0..b as u32).map(|r| client.create_from_slice(u32::as_bytes(&[r]))).collect();
            group.throughput(Throughput::Bytes((b * (n * n / 8 + n * 4)) as u64));
            group.bench_with_input(BenchmarkId::new("delta_terms", b), &b, |bench, _| {
                bench.iter(|| {
                    for (r, id) in ids.iter().enumerate() {
                        // SAFETY: x_h holds b · n values, y_h b · n, each id one row below b;
                        // launches on one client run in order.
                        unsafe { resident[r].add_product(&client, x_h.clone(), b, Some((id.clone(), 1)), y_h.clone()) };
                    }
                    sync(&device);
                })
            });
            group.throughput(Throughput::Bytes((b * n * n * 4) as u64));
            group.bench_with_input(BenchmarkId::new("dense_gemv_each", b), &b, |bench, _| {
                bench.iter(|| {
                    let ys: Vec<Tensor<G, 2>> = (0..b).map(|r| x.clone().narrow(0, r, 1).matmul(merged[r % pool].clone())).collect();
                    sync(&device);
                    ys
                })
            });
        }
        group.finish();
    }
    // Roofline: a 128 MiB device copy (reads + writes counted; far beyond any GPU's L2, and
    // within wgpu's default limit on one storage binding).
    let len = 32 << 20;
    let src = Tensor::<G, 1>::from_data(TensorData::new(random(len, 5), [len]), &device);
    let mut group = c.benchmark_group("gpu_bandwidth");
    group.sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    group.throughput(Throughput::Bytes((2 * len * 4) as u64));
    group.bench_function("copy_128MiB", |bench| {
        bench.iter(|| {
            let y = src.clone().add_scalar(0.0);
            sync(&device);
            y
        })
    });
    group.finish();
}

criterion_group!(benches, fig4);
criterion_main!(benches);
