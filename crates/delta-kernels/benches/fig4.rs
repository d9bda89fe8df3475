//! BitDelta's Fig. 4 sweep on the CPU: B requests, each with its own delta over one N×N base
//! weight, decoded together — one dense product for all rows plus each row's packed delta term,
//! in one pass as serving runs it (`dense_delta_matmul_t`) and as two separate products — against
//! B separate dense f32 GEMVs of merged weights; and a copy-bandwidth probe for the roofline.
//! `cargo xtask bench` runs it and collects the results (sizes from `FIG4_SIZES`, default
//! 1024,2048,4096,8192).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use delta_format::CompressedWeight;
use delta_kernels::dense::dense_matmul_t;
use delta_kernels::fused::dense_delta_matmul_t;
use delta_kernels::gemm::batched_delta_matmul_add;

#[path = "../tests/support/mod.rs"]
mod support;

use support::{fig4_delta as delta, fig4_sizes as sizes, random};

const BATCHES: [usize; 6] = [1, 2, 4, 8, 16, 32];

fn fig4(c: &mut Criterion) {
    for n in sizes() {
        let wt = random(n * n, n as u64);
        // One merged weight per request, as separate fine-tunes would have (up to 2 GiB of them;
        // beyond, rows share them round-robin — at that size none fits in any cache anyway).
        let pool = (*BATCHES.last().unwrap()).min(((2usize << 30) / (n * n * 4)).max(1));
        let merged: Vec<Vec<f32>> = (0..pool).map(|k| random(n * n, (n + k) as u64 + 1)).collect();
        let deltas: Vec<CompressedWeight<'static>> = (0..*BATCHES.last().unwrap() as u64).map(|d| delta(n, d + 7)).collect();
        let mut group = c.benchmark_group(format!("fig4_n{n}"));
        group.sample_size(10).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
        for b in BATCHES {
            let x = random(b * n, 99);
            let idx: Vec<usize> = (0..b).collect();
            let row_delta: Vec<Option<usize>> = (0..b).map(Some).collect();
            let mut y = vec![0f32; b * n];
            // Bytes that must come from memory: the base once, each row's signs and scales.
            group.throughput(Throughput::Bytes((n * n * 4 + b * (n * n / 8 + n * 4)) as u64));
            // The batched path as serving runs it: each task takes a block of output columns, its
            // base sums for every row, then those columns' delta terms — one pass, one fork-join.
            group.bench_with_input(BenchmarkId::new("one_pass", b), &b, |bench, _| {
                bench.iter(|| dense_delta_matmul_t(&x, &wt, n, n, &deltas[..b], &row_delta, &mut y).unwrap())
            });
            // The same product as two separate passes.
            group.bench_with_input(BenchmarkId::new("batched_delta", b), &b, |bench, _| {
                bench.iter(|| {
                    dense_matmul_t(&x, &wt, n, n, &mut y).unwrap();
                    batched_delta_matmul_add(&deltas[..b], &idx, &x, &mut y).unwrap();
                })
            });
            // The batched path's first half alone: how its time splits between base and deltas.
            group.throughput(Throughput::Bytes((n * n * 4) as u64));
            group.bench_with_input(BenchmarkId::new("base_product", b), &b, |bench, _| bench.iter(|| dense_matmul_t(&x, &wt, n, n, &mut y).unwrap()));
            // …and its second half alone: the B delta terms (what BitDelta's kernel computes).
            group.throughput(Throughput::Bytes((b * (n * n / 8 + n * 4)) as u64));
            group.bench_with_input(BenchmarkId::new("delta_terms", b), &b, |bench, _| bench.iter(|| batched_delta_matmul_add(&deltas[..b], &idx, &x, &mut y).unwrap()));
            group.throughput(Throughput::Bytes((b * n * n * 4) as u64));
            group.bench_with_input(BenchmarkId::new("dense_gemv_each", b), &b, |bench, _| {
                bench.iter(|| {
                    for r in 0..b {
                        dense_matmul_t(&x[r * n..(r + 1) * n], &merged[r % pool], n, n, &mut y[r * n..(r + 1) * n]).unwrap();
                    }
                })
            });
        }
        group.finish();
    }
    // Roofline: a large copy (reads + writes counted), split across the cores like the kernels.
    let len = 64 << 20;
    let src = random(len, 5);
    let mut dst = vec![0f32; len];
    let mut group = c.benchmark_group("bandwidth");
    group.sample_size(10).measurement_time(std::time::Duration::from_secs(2));
    group.throughput(Throughput::Bytes((2 * len * 4) as u64));
    group.bench_function("copy_256MiB", |bench| {
        use rayon::prelude::*;
        bench.iter(|| dst.par_chunks_mut(1 << 20).zip(src.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s)))
    });
    // Reads alone (what the products mostly do): a parallel sum in 64 independent lanes.
    group.throughput(Throughput::Bytes((len * 4) as u64));
    group.bench_function("read_256MiB", |bench| {
        use rayon::prelude::*;
        bench.iter(|| {
            let lanes = src
                .par_chunks(1 << 20)
                .map(|c| {
                    let mut acc = [0f32; 64];
                    for v in c.chunks_exact(64) {
                        acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
                    }
                    acc
                })
                .reduce(|| [0f32; 64], |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                });
            std::hint::black_box(lanes)
        })
    });
    group.finish();
}

criterion_group!(benches, fig4);
criterion_main!(benches);
