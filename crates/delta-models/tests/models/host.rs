//! The host GEMMs behind `host::matmul` on the CPU backend, without and under autodiff, against
//! Burn's own matmul: same values, same input gradients, for contiguous and strided operands.

use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorData};
use delta_models::{host, CpuBackend};

type A = Autodiff<CpuBackend>;

/// Deterministic values in (-1, 1) that differ from element to element.
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32).map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 2001) as f32 / 1000.0 - 1.0).collect()
}

fn tensor<B: burn::tensor::backend::Backend>(rows: usize, cols: usize, seed: u32) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values(rows * cols, seed), [rows, cols]), &Default::default())
}

fn max_diff<B: burn::tensor::backend::Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f32 {
    let (a, b) = (a.into_data().into_vec::<f32>().unwrap(), b.into_data().into_vec::<f32>().unwrap());
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn host_product_matches_burns_matmul_for_strided_operands() {
    // 37 rows: past the few-row path, so the GEMM is the one under test; 19 columns (fewer than
    // the rows) and 50 (more: the product runs transposed).
    for out in [19, 50] {
        let x: Tensor<CpuBackend, 2> = tensor(37, 24, 1);
        let wt: Tensor<CpuBackend, 2> = tensor(24, out, 2);
        let w_transposed = tensor::<CpuBackend>(out, 24, 3).transpose();
        let x_strided = tensor::<CpuBackend>(24, 37, 4).transpose();
        for (name, x, wt) in [("contiguous", x.clone(), wt.clone()), ("transposed weight", x, w_transposed), ("transposed input", x_strided, wt)] {
            let ours = host::product(&x, &wt).expect("the CPU backend's product runs on the host");
            let d = max_diff(ours, x.matmul(wt));
            assert!(d <= 1e-5, "{name}, {out} columns: host GEMM differs from Burn's matmul by {d}");
        }
    }
}

#[test]
fn frozen_product_gives_burns_values_and_input_gradients_under_autodiff() {
    // 37 rows; the first product and the second's gradient are wider than that (run transposed),
    // the second product and the first's gradient narrower.
    let (w1, w2) = (tensor::<A>(24, 60, 5), tensor::<A>(11, 60, 6).transpose());
    let r: Tensor<A, 2> = tensor(37, 11, 7);
    // x → x·w1 → (x·w1)·w2 → ⊙ r → sum, once through the host products and once through Burn's.
    let run = |host_path: bool| {
        let x = tensor::<A>(37, 24, 8).require_grad();
        let product = |x: Tensor<A, 2>, w: &Tensor<A, 2>| match host_path {
            true => host::frozen_product(&x, w).expect("a constant weight on the autodiff CPU backend"),
            false => x.matmul(w.clone()),
        };
        let y = product(product(x.clone(), &w1), &w2);
        let grads = (y.clone() * r.clone()).sum().backward();
        (y.inner(), x.grad(&grads).expect("x's gradient"))
    };
    let ((y_host, g_host), (y_burn, g_burn)) = (run(true), run(false));
    let (dy, dg) = (max_diff(y_host, y_burn), max_diff(g_host.clone(), g_burn));
    assert!(dy <= 1e-5, "values differ from Burn's by {dy}");
    assert!(dg <= 1e-5, "input gradients differ from Burn's by {dg}");
    assert!(g_host.abs().max().into_scalar() > 0.1, "a gradient that is not all zeros");
}

#[test]
fn frozen_product_leaves_a_trained_weight_to_burn() {
    let x = tensor::<A>(37, 24, 9);
    let w = tensor::<A>(24, 19, 10).require_grad();
    assert!(host::frozen_product(&x, &w).is_none(), "a weight that wants its gradient is not frozen");
    assert!(host::frozen_product(&tensor::<CpuBackend>(37, 24, 9), &tensor(24, 19, 10)).is_none(), "not under autodiff");
}
