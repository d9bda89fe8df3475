//! `delta-kernels`: the math on packed 1-bit deltas.
//!
//! - [`delta`]: Δ = W_ft − W_base in f32 → sign mask + |Δ| sums, weight-space scale init and its
//!   reconstruction error, multi-threaded.
//! - [`merge`]: W_base + Δ̂ rounded to the base dtype (fast path + plain reference oracle).
//! - [`gemm`]: the delta term `Y += X·Δ̂ᵀ` with signs kept packed, for one delta or a batch whose
//!   rows each pick a resident delta (fast path + f64 reference oracle); on AVX-512 and AVX2
//!   CPUs its decode-shaped sums come from `subset_sums` (16 or 8 output rows per register,
//!   table lookups).
//! - [`dense`]: the base product `Y = X·W` of a decode step, read in place (no packing), and a
//!   vectorising dot product.
//! - [`dense_nt`]: `Y = X·Wᵀ` for a weight kept as stored (`[out, in]`): a tied LM head reading
//!   the embedding matrix in place.
//! - [`fused`]: a decode step's whole projection, base product and delta terms, in one pass;
//!   prefill-sized products on the merged weight, or on Δ̂ alone, built a tile at a time.
//! - [`convert`]: bf16 / f16 / f32 conversions (round to nearest even).
//!
//! - [`cube`] (feature `cube`, with `wgpu` or `cuda`): the batched delta product as a CubeCL
//!   kernel, for any CubeCL runtime, tested against the same oracle.

pub mod convert;
#[cfg(feature = "cube")]
pub mod cube;
pub mod delta;
pub mod dense;
pub mod dense_nt;
pub mod error;
pub mod fused;
pub mod gemm;
pub mod merge;
mod subset_sums;

#[cfg(test)]
#[path = "../tests/support/mod.rs"]
mod test_support;

pub use delta::WeightDelta;
pub use error::KernelError;
pub use merge::{merge, merge_into, merge_reference, ScaleFactors};

/// Tasks per thread a product is split into: enough to balance, few enough that scheduling
/// stays negligible next to the work (a decode step runs ~200 small products).
pub(crate) const TASKS_PER_THREAD: usize = 2;

/// Output rows (or columns) per task for `out` of them: at least `min`, a multiple of 8.
pub(crate) fn per_task(out: usize, min: usize) -> usize {
    out.div_ceil(TASKS_PER_THREAD * rayon::current_num_threads()).next_multiple_of(8).max(min)
}
