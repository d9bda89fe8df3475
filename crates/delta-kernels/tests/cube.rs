//! The CubeCL kernels against the f64 oracle, on the cases the CPU path is tested on: every scale
//! mode, widths that are not multiples of 32, several deltas with a per-row index (listed rows),
//! one delta over all rows, with and without the base term; the merge against the definition. Runs on the wgpu runtime with `--features wgpu` (in CI: Mesa's lavapipe
//! Vulkan driver on the CPU, packages mesa-vulkan-drivers + libvulkan1), on CUDA with
//! `--features cuda` alone.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod support;

use cubecl::Runtime;
use delta_format::{CompressedWeight, ScaleMode};
use cubecl::prelude::*;
use delta_kernels::cube::{batched_delta_product, merged_t, ResidentDelta};
use delta_kernels::gemm::delta_matmul_add_reference;
use delta_kernels::merge::ScaleFactors;
use proptest::prelude::*;
use support::{random, weight};

#[cfg(feature = "wgpu")]
type R = cubecl::wgpu::WgpuRuntime;
#[cfg(not(feature = "wgpu"))]
type R = cubecl::cuda::CudaRuntime;

fn client() -> cubecl::prelude::ComputeClient<R> {
    let client = R::client(&Default::default());
    eprintln!("runtime: {}", R::name(&client));
    client
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn cube_kernel_equals_the_oracle(
        rows in 1usize..6, inp in 1usize..100, out in 1usize..40, ndeltas in 1usize..4,
        with_base in any::<bool>(), seed in any::<u64>(),
    ) {
        let deltas: Vec<CompressedWeight<'static>> =
            (0..ndeltas).map(|d| weight(out, inp, ScaleMode::ALL[(seed as usize + d) % ScaleMode::ALL.len()], seed ^ (d as u64 + 1))).collect();
        let refs: Vec<&CompressedWeight<'_>> = deltas.iter().collect();
        let idx: Vec<usize> = (0..rows).map(|r| (seed as usize >> (2 * r)) % ndeltas).collect();
        let x = random(rows * inp, seed ^ 11);
        let wt = random(inp * out, seed ^ 13);
        let got = batched_delta_product(&client(), with_base.then_some(&wt[..]), &refs, &idx, &x).unwrap();
        for r in 0..rows {
            let mut want = vec![0f32; out];
            if with_base {
                for (i, w) in want.iter_mut().enumerate() {
                    *w = (0..inp).map(|j| x[r * inp + j] as f64 * wt[j * out + i] as f64).sum::<f64>() as f32;
                }
            }
            delta_matmul_add_reference(&deltas[idx[r]], &x[r * inp..(r + 1) * inp], &mut want).unwrap();
            for i in 0..out {
                let (g, w) = (got[r * out + i], want[i]);
                prop_assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "row {} output {}: {} vs {} (inp {}, mode {})", r, i, g, w, inp, deltas[idx[r]].mode);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn one_delta_over_all_rows_equals_the_oracle(rows in 1usize..20, inp in 1usize..130, out in 1usize..20, mode in 0usize..4, seed in any::<u64>()) {
        let delta = weight(out, inp, ScaleMode::ALL[mode], seed);
        let x = random(rows * inp, seed ^ 5);
        let y0 = random(rows * out, seed ^ 7);
        let c = client();
        let resident = ResidentDelta::upload(&c, &delta).unwrap();
        prop_assert_eq!(resident.shape(), (out, inp));
        let (x_h, y_h) = (c.create_from_slice(f32::as_bytes(&x)), c.create_from_slice(f32::as_bytes(&y0)));
        // SAFETY: x_h holds rows · inp values, y_h rows · out, and nothing else uses y_h.
        unsafe { resident.add_product(&c, x_h, rows, None, y_h.clone()) };
        let got = f32::from_bytes(&c.read_one(y_h).unwrap()).to_vec();
        for r in 0..rows {
            let mut want = y0[r * out..(r + 1) * out].to_vec();
            delta_matmul_add_reference(&delta, &x[r * inp..(r + 1) * inp], &mut want).unwrap();
            for i in 0..out {
                let (g, w) = (got[r * out + i], want[i]);
                prop_assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "row {} output {}: {} vs {}", r, i, g, w);
            }
        }
    }

    #[test]
    fn merge_equals_the_definition(inp in 1usize..100, out in 1usize..40, mode in 0usize..4, seed in any::<u64>()) {
        let delta = weight(out, inp, ScaleMode::ALL[mode], seed);
        let wt = random(inp * out, seed ^ 3);
        let got = merged_t(&client(), &wt, &delta).unwrap();
        let f = ScaleFactors::new(&delta.name, delta.mode, &delta.scales, out, inp).unwrap();
        for j in 0..inp {
            for i in 0..out {
                // Same operations in the same order as the definition: exact.
                prop_assert_eq!(got[j * out + i], wt[j * out + i] + f.delta_hat(&delta.signs, i, j), "element [{}, {}]", j, i);
            }
        }
    }
}

#[test]
fn bad_shapes_and_indices_are_errors() {
    let w = weight(3, 33, ScaleMode::PerOutput, 1);
    let other = weight(4, 33, ScaleMode::Scalar, 2);
    let c = client();
    assert!(batched_delta_product(&c, None, &[&w, &other], &[0], &[0.0; 33]).is_err());
    assert!(batched_delta_product(&c, None, &[&w], &[1], &[0.0; 33]).is_err());
    assert!(batched_delta_product(&c, None, &[&w], &[0], &[0.0; 32]).is_err());
    assert!(batched_delta_product(&c, Some(&[0.0; 5]), &[&w], &[0], &[0.0; 33]).is_err());
    assert!(merged_t(&c, &[0.0; 98], &w).is_err());
}
