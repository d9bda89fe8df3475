//! The CPU fast path for decode-shaped products. Burn's NdArray matmul hands every product to a
//! general GEMM that packs the whole weight first, which at one or a few rows costs more than
//! the product itself (measured: 4.7 tokens/s decode on SmolLM2-135M). On the CPU backend, few-row
//! products read the weight in place (`delta_kernels::gemm::dense_matmul_t`); everything else —
//! and every other backend — goes through Burn.

use std::any::Any;

use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::CpuBackend;

/// Up to this many rows the in-place product beats the packing GEMM (it reads the weight once for
/// all rows either way; beyond this Burn's blocked GEMM wins on arithmetic).
pub const FEW_ROWS: usize = 16;

/// `x · wt` (`x`: `[rows, in]`, `wt`: `[in, out]`).
pub fn matmul<B: Backend>(x: Tensor<B, 2>, wt: &Tensor<B, 2>) -> Tensor<B, 2> {
    let [rows, inp] = x.dims();
    let out = wt.dims()[1];
    if rows <= FEW_ROWS {
        if let Some(cpu) = (wt as &dyn Any).downcast_ref::<Tensor<CpuBackend, 2>>() {
            if let NdArrayTensor::F32(storage) = cpu.clone().into_primitive().tensor() {
                let view = storage.view();
                if let Some(w) = view.as_slice() {
                    let xs = x.to_data().convert::<f32>().into_vec::<f32>().expect("f32 activations");
                    let mut y = vec![0f32; rows * out];
                    delta_kernels::gemm::dense_matmul_t(&xs, w, inp, out, &mut y).expect("shapes from the tensors");
                    return Tensor::from_data(TensorData::new(y, [rows, out]), &x.device());
                }
            }
        }
    }
    x.matmul(wt.clone())
}
