//! `DeltaLinear`: a linear layer that keeps the base weight dense and the fine-tune's delta packed
//! (1-bit signs + scales), and computes `y = x·W_baseᵀ + x·Δ̂ᵀ` without ever forming a whole
//! dense Δ. On the CPU, up to 16 rows go through one pass that reads the base weight and the
//! signs once (`delta_kernels::fused::dense_delta_matmul_t`); more rows through one GEMM on the
//! merged weight, built a tile at a time (`merged_matmul_t`). On the GPU backends (`wgpu`,
//! `cuda` features) the same split runs as CubeCL kernels on device buffers ([`crate::cube`]). On
//! any other backend the activations make a round trip to host memory for the delta term.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use delta_format::CompressedWeight;
use delta_kernels::gemm::delta_matmul_add;
use delta_kernels::merge::ScaleFactors;

use crate::cube::DeviceDelta;
use crate::error::ModelError;
use crate::llama::Linear;
use crate::weights::Weights;

#[derive(Clone)]
pub struct DeltaLinear<B: Backend> {
    pub base: Linear<B>,
    pub delta: CompressedWeight<'static>,
    /// The delta's copy in device memory on a GPU backend, made on first use.
    pub device: DeviceDelta,
}

impl<B: Backend> DeltaLinear<B> {
    pub fn new(base: Linear<B>, delta: CompressedWeight<'static>) -> Result<Self, ModelError> {
        let [inp, out] = base.weight_t.dims();
        if (delta.rows(), delta.cols()) != (out, inp) {
            return Err(ModelError::Shape { name: delta.name.to_string(), expected: vec![out, inp], found: vec![delta.rows(), delta.cols()] });
        }
        Ok(DeltaLinear { base, delta, device: DeviceDelta::default() })
    }

    /// `x`: `[rows, in]` -> `[rows, out]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        if let Some(y) = self.fast_product(&x) {
            return self.base.add_bias(y);
        }
        let [rows, _] = x.dims();
        let device = x.device();
        let mut y = vec![0f32; rows * self.delta.rows()];
        crate::host::with_values(&x, |xs| delta_matmul_add(&self.delta, xs, &mut y).expect("shapes checked in new"));
        let term = Tensor::<B, 2>::from_data(TensorData::new(y, [rows, self.delta.rows()]), &device);
        self.base.forward(x) + term
    }

    /// `x·(W_base + Δ̂)ᵀ`, without the bias, on the CPU and GPU backends; `None` on any other. On
    /// the CPU: decode-shaped, base product and delta term in one pass over host values;
    /// prefill-shaped, one GEMM on the merged weight, a tile at a time. On a GPU backend, the
    /// same split in CubeCL kernels.
    pub fn fast_product(&self, x: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        let [rows, _] = x.dims();
        crate::host::few_rows(x, &self.base.weight_t, &[&self.delta], &vec![Some(0); rows])
            .or_else(|| crate::host::merged(x, &self.base.weight_t, &self.delta))
            .or_else(|| crate::cube::delta_product(x, &self.base.weight_t, &self.delta, &self.device))
    }

    /// The merged weight as a dense `Wᵀ` (`[in, out]`), in f32 and unrounded: `W_base + Δ̂`.
    pub fn merged_weight_t(&self) -> Tensor<B, 2> {
        let [inp, out] = self.base.weight_t.dims();
        let f = ScaleFactors::new(&self.delta.name, self.delta.mode, &self.delta.scales, out, inp).expect("validated artifact");
        let mut dt = vec![0f32; inp * out];
        for i in 0..out {
            for j in 0..inp {
                dt[j * out + i] = f.delta_hat(&self.delta.signs, i, j);
            }
        }
        self.base.weight_t.clone() + Tensor::from_data(TensorData::new(dt, [inp, out]), &self.base.weight_t.device())
    }
}

/// `y = x·W_baseᵀ + ((x ⊙ c)·Δ̂₀ᵀ) ⊙ r`: a dense delta with optional column multipliers `c`
/// (`[1, in]`) and row multipliers `r` (`[1, out]`) — the form end-to-end calibration trains (on
/// any backend, autodiff included). The product goes through the base and the delta separately,
/// so no merged weight is formed and only the small multipliers need gradients.
#[derive(Clone)]
pub struct ScaledDelta<B: Backend> {
    pub base: Linear<B>,
    /// Δ̂₀ᵀ, `[in, out]`.
    pub delta_t: Tensor<B, 2>,
    pub rows: Option<Tensor<B, 2>>,
    pub cols: Option<Tensor<B, 2>>,
}

impl<B: Backend> ScaledDelta<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let xc = match &self.cols {
            Some(c) => x.clone() * c.clone(),
            None => x.clone(),
        };
        let d = crate::host::matmul(xc, &self.delta_t);
        let d = match &self.rows {
            Some(r) => d * r.clone(),
            None => d,
        };
        self.base.forward(x) + d
    }
}

/// A projection inside the model: dense, base + packed delta, or base + scaled dense delta.
#[derive(Clone)]
pub enum Projection<B: Backend> {
    Dense(Linear<B>),
    Delta(DeltaLinear<B>),
    Scaled(ScaledDelta<B>),
}

impl<B: Backend> Projection<B> {
    /// A dense layer, or a [`DeltaLinear`] where the weights source keeps this weight's delta packed.
    pub fn load(w: &Weights<'_, B>, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Self, ModelError> {
        let base = Linear::load(w, prefix, out, inp, bias)?;
        Ok(match w.packed_delta(&format!("{prefix}.weight")) {
            Some(delta) => Projection::Delta(DeltaLinear::new(base, delta)?),
            None => Projection::Dense(base),
        })
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Projection::Dense(l) => l.forward(x),
            Projection::Delta(d) => d.forward(x),
            Projection::Scaled(d) => d.forward(x),
        }
    }

    /// The (base) linear layer: its weight is the base's unless dense, its bias is the layer's.
    pub fn linear(&self) -> &Linear<B> {
        match self {
            Projection::Dense(l) => l,
            Projection::Delta(d) => &d.base,
            Projection::Scaled(d) => &d.base,
        }
    }

    pub fn device(&self) -> B::Device {
        self.linear().weight_t.device()
    }
}
