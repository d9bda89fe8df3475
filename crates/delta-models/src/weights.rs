//! Where a model's weights come from: a checkpoint, or a base checkpoint plus a bitdelta artifact
//! merged on the fly (W_base + Δ̂, rounded to the base dtype exactly as `bitdelta apply` writes it).

use std::borrow::Cow;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use delta_format::{Checkpoint, DType, DeltaArtifact, TensorView};
use delta_kernels::convert::{bf16_slice, to_f32_vec, transpose, Bf16Bits};

use crate::error::ModelError;
use crate::llama::{Embedding, HostBf16, WeightT};

/// How a delta's compressed weights enter the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaUse {
    /// Merged into dense weights on load, rounded to the base dtype exactly as `apply` writes them.
    Merge,
    /// Kept packed: every compressed weight becomes a `DeltaLinear` (base weight + signs + scales).
    Fused,
}

pub struct Weights<'a, B: Backend> {
    pub base: &'a Checkpoint,
    pub delta: Option<&'a DeltaArtifact>,
    pub delta_use: DeltaUse,
    /// Linear weights stored as bf16 stay bf16 on the host ([`Weights::bf16_on_host`]).
    pub bf16_on_host: bool,
    pub device: B::Device,
}

impl<'a, B: Backend> Weights<'a, B> {
    /// Weights of `base`, or of `base` with `delta` applied (the delta's fingerprint is checked
    /// against the base first: a delta for another base is an error, never applied).
    pub fn new(base: &'a Checkpoint, delta: Option<&'a DeltaArtifact>, device: B::Device) -> Result<Self, ModelError> {
        if let Some(d) = delta {
            d.metadata().base.verify(base)?;
        }
        Ok(Weights { base, delta, delta_use: DeltaUse::Merge, bf16_on_host: false, device })
    }

    /// Keeps compressed weights packed (`DeltaLinear`) instead of merging them.
    pub fn fused(mut self) -> Self {
        self.delta_use = DeltaUse::Fused;
        self
    }

    /// On the CPU backend, keeps the linear weights of the blocks that are stored as bf16 (a bf16
    /// base, and a merged delta, which is rounded to the base's dtype) as bf16 on the host
    /// ([`WeightT::Bf16`]): half the memory, and decode steps that read half the bytes, with the
    /// f32 tensors' results bit for bit. No effect on another backend or dtype. Inference only:
    /// calibration trains on f32 tensors.
    pub fn bf16_on_host(mut self) -> Self {
        self.bf16_on_host = true;
        self
    }

    /// The packed delta of weight `name`, when the delta is used fused and has one.
    pub fn packed_delta(&self, name: &str) -> Option<delta_format::CompressedWeight<'static>> {
        match (self.delta, self.delta_use) {
            (Some(d), DeltaUse::Fused) => d.weight(name).map(|w| delta_format::CompressedWeight {
                name: Cow::Owned(w.name.to_string()),
                mode: w.mode,
                signs: w.signs.into_owned(),
                scales: Cow::Owned(w.scales.into_owned()),
            }),
            _ => None,
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.base.contains(name)
    }

    /// The f32 values of `name` (merged with the delta where it has this tensor) and its shape.
    fn values(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), ModelError> {
        self.stored(name, |view| {
            let values = to_f32_vec(&view).ok_or_else(|| ModelError::DType { name: name.into(), dtype: view.dtype })?;
            Ok((values, view.shape.to_vec()))
        })
    }

    /// `f` on the stored form of `name`: merged with the delta where it has this tensor (rounded
    /// to the base's dtype), in its dtype.
    fn stored<R>(&self, name: &str, f: impl FnOnce(TensorView<'_>) -> Result<R, ModelError>) -> Result<R, ModelError> {
        let view = self.base.tensor(name).ok_or_else(|| ModelError::MissingTensor(name.into()))?;
        let whole = self.delta.and_then(|d| d.whole_tensor(name));
        // A whole tensor may have another shape (a vocabulary matrix with added tokens).
        let shape = whole.as_ref().map_or(view.shape, |w| w.shape).to_vec();
        let bytes: Option<Cow<'_, [u8]>> = match (self.delta, whole) {
            (_, Some(w)) => Some(Cow::Borrowed(w.data)),
            (Some(d), None) => match d.weight(name) {
                // Fused: the base weight stays as it is; the delta goes to a DeltaLinear.
                Some(_) if self.delta_use == DeltaUse::Fused => None,
                Some(w) => Some(Cow::Owned(delta_kernels::merge(&view, &w).map_err(|e| ModelError::Input(e.to_string()))?)),
                None => None,
            },
            (None, None) => None,
        };
        let view = match &bytes {
            Some(b) => TensorView { dtype: view.dtype, shape: &shape, data: b },
            None => view,
        };
        f(view)
    }

    fn check(name: &str, found: &[usize], expected: &[usize]) -> Result<(), ModelError> {
        if found != expected {
            return Err(ModelError::Shape { name: name.into(), expected: expected.to_vec(), found: found.to_vec() });
        }
        Ok(())
    }

    pub fn vector(&self, name: &str, len: usize) -> Result<Tensor<B, 1>, ModelError> {
        let (v, shape) = self.values(name)?;
        Self::check(name, &shape, &[len])?;
        Ok(Tensor::from_data(TensorData::new(v, [len]), &self.device))
    }

    /// `[rows, cols]` as stored.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<B, 2>, ModelError> {
        let (v, shape) = self.values(name)?;
        Self::check(name, &shape, &[rows, cols])?;
        Ok(Tensor::from_data(TensorData::new(v, [rows, cols]), &self.device))
    }

    /// A linear layer's `[rows, cols]` weight transposed to a contiguous `[cols, rows]`: bf16 on
    /// the host where [`Weights::bf16_on_host`] asks for it and the weight is stored as bf16,
    /// else an f32 tensor ([`Weights::matrix_t`]).
    pub fn linear_t(&self, name: &str, rows: usize, cols: usize) -> Result<WeightT<B>, ModelError> {
        match self.bf16(name, rows, cols, true)? {
            Some(values) => Ok(WeightT::Bf16(Arc::new(HostBf16 { values, rows: cols, cols: rows }))),
            None => Ok(WeightT::Tensor(self.matrix_t(name, rows, cols)?)),
        }
    }

    /// A token embedding `[rows, cols]`: bf16 on the host where [`Weights::bf16_on_host`] asks for
    /// it and the matrix is stored as bf16, else an f32 tensor ([`Weights::matrix`]).
    pub fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Embedding<B>, ModelError> {
        match self.bf16(name, rows, cols, false)? {
            Some(values) => Ok(Embedding::Bf16(Arc::new(HostBf16 { values, rows, cols }))),
            None => Ok(Embedding::Tensor(self.matrix(name, rows, cols)?)),
        }
    }

    /// The bf16 values of the `[rows, cols]` matrix `name` (`transposed`: as `[cols, rows]`), when
    /// [`Weights::bf16_on_host`] asks for them, the backend is the CPU's and the matrix is stored
    /// as bf16; `None` otherwise.
    fn bf16(&self, name: &str, rows: usize, cols: usize, transposed: bool) -> Result<Option<Vec<Bf16Bits>>, ModelError> {
        if !(self.bf16_on_host && crate::host::is_cpu::<B>()) {
            return Ok(None);
        }
        self.stored(name, |view| {
            Self::check(name, view.shape, &[rows, cols])?;
            Ok(match (view.dtype, view.as_u16_bits()) {
                (DType::BF16, Some(bits)) if transposed => Some(transpose(bf16_slice(&bits), rows, cols)),
                (DType::BF16, Some(bits)) => Some(bf16_slice(&bits).to_vec()),
                _ => None,
            })
        })
    }

    /// A `[rows, cols]` weight transposed to a contiguous `[cols, rows]`.
    pub fn matrix_t(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor<B, 2>, ModelError> {
        let (v, shape) = self.values(name)?;
        Self::check(name, &shape, &[rows, cols])?;
        Ok(Tensor::from_data(TensorData::new(transpose(&v, rows, cols), [cols, rows]), &self.device))
    }
}
