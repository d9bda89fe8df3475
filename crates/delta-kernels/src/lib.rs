//! `delta-kernels`: the math on packed 1-bit deltas.
//!
//! - [`delta`]: Δ = W_ft − W_base in f32 → sign mask + |Δ| sums, weight-space scale init and its
//!   reconstruction error, multi-threaded.
//! - [`merge`]: W_base + Δ̂ rounded to the base dtype (fast path + plain reference oracle).
//! - [`gemm`]: the delta term `Y += X·Δ̂ᵀ` with signs kept packed, for one delta or a batch whose
//!   rows each pick a resident delta (fast path + f64 reference oracle).
//! - [`convert`]: bf16 / f16 / f32 conversions (round to nearest even).
//!
//! - [`cube`] (feature `cube`, with `wgpu` or `cuda`): the batched delta product as a CubeCL
//!   kernel, for any CubeCL runtime, tested against the same oracle.

pub mod convert;
#[cfg(feature = "cube")]
pub mod cube;
pub mod delta;
pub mod error;
pub mod gemm;
pub mod merge;

pub use delta::WeightDelta;
pub use error::KernelError;
pub use merge::{merge, merge_into, merge_reference, ScaleFactors};
