//! The delta products as CubeCL kernels: one source for every CubeCL runtime (wgpu — Vulkan,
//! Metal, DX12, and Mesa's lavapipe on the CPU in CI — and CUDA). Behind the `cube` feature
//! (`wgpu` / `cuda` pick the runtime).
//!
//! A [`ResidentDelta`] is one compressed weight uploaded once — packed signs (bit j of word j/32
//! of row i) and the row and column factors of [`ScaleFactors`], so every scale mode runs the
//! same kernels — with two operations on device buffers:
//! - [`ResidentDelta::add_product`]: `Y[r, :] += Δ̂·X[r, :]` for all rows or for a list of rows
//!   (the multi-tenant decode step: one launch per delta over the rows that use it, after one
//!   dense base product for the whole batch). A cube of 8 × 32 threads computes 8 outputs of one
//!   row; the 32 lanes of an output read consecutive sign words and meet in shared memory.
//! - [`ResidentDelta::merge_t`]: `(W_base + Δ̂)ᵀ` from `W_baseᵀ`, one thread per element — for
//!   products with many rows, which then go through one dense GEMM.
//!
//! Any input width: no multiple of 32 or of a tile is needed. [`batched_delta_product`] runs the
//! same kernels on host slices (upload, launch, read back): what the tests compare with the oracle.

use cubecl::prelude::*;
use cubecl::server::Handle;
use delta_format::CompressedWeight;

use crate::error::KernelError;
use crate::merge::ScaleFactors;

/// Outputs per cube of [`ResidentDelta::add_product`] (the cube's y); 32 lanes each (its x).
const OUTPUTS_PER_CUBE: u32 = 8;
const LANES: u32 = 32;
/// Threads per cube of the elementwise merge.
const MERGE_THREADS: u32 = 256;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn add_product_kernel(
    x: &Array<f32>,
    signs: &Array<u32>,
    row_f: &Array<f32>,
    col_f: &Array<f32>,
    row_ids: &Array<u32>,
    y: &mut Array<f32>,
    inp: usize,
    out: usize,
    words: usize,
    with_cols: u32,
    listed_rows: u32,
) {
    let lane = UNIT_POS_X as usize;
    let i = CUBE_POS_X as usize * CUBE_DIM_Y as usize + UNIT_POS_Y as usize;
    let mut r = CUBE_POS_Y as usize;
    if listed_rows == 1u32 {
        r = row_ids[r] as usize;
    }
    let mut sums = SharedMemory::<f32>::new(256usize);
    let mut acc = 0.0f32;
    if i < out {
        let mut w = lane;
        while w < words {
            let word = signs[i * words + w];
            let j0 = w * 32;
            for b in 0..32u32 {
                let j = j0 + b as usize;
                if j < inp {
                    let mut xv = x[r * inp + j];
                    if with_cols == 1u32 {
                        xv *= col_f[j];
                    }
                    let s = f32::cast_from((word >> b) & 1u32) * 2.0f32 - 1.0f32;
                    acc += s * xv;
                }
            }
            w += CUBE_DIM_X as usize;
        }
    }
    sums[UNIT_POS as usize] = acc;
    sync_cube();
    if lane == 0 && i < out {
        let first = UNIT_POS_Y as usize * CUBE_DIM_X as usize;
        let mut total = 0.0f32;
        for l in 0..CUBE_DIM_X as usize {
            total += sums[first + l];
        }
        y[r * out + i] += row_f[i] * total;
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn merge_t_kernel(wt: &Array<f32>, signs: &Array<u32>, row_f: &Array<f32>, col_f: &Array<f32>, merged: &mut Array<f32>, inp: usize, out: usize, words: usize) {
    let t = ABSOLUTE_POS;
    if t < inp * out {
        let j = t / out;
        let i = t % out;
        let word = signs[i * words + j / 32];
        let s = f32::cast_from((word >> ((j % 32) as u32)) & 1u32) * 2.0f32 - 1.0f32;
        merged[t] = wt[t] + (row_f[i] * col_f[j]) * s;
    }
}

/// One compressed weight `[out, in]` in device memory: signs, row factors, column factors.
pub struct ResidentDelta {
    signs: Handle,
    rows: Handle,
    cols: Handle,
    /// Scale modes whose column factors are all 1 skip them in the product.
    with_cols: bool,
    out: usize,
    inp: usize,
}

impl ResidentDelta {
    pub fn upload<R: Runtime>(client: &ComputeClient<R>, w: &CompressedWeight<'_>) -> Result<Self, KernelError> {
        let (out, inp) = (w.rows(), w.cols());
        let f = ScaleFactors::new(&w.name, w.mode, &w.scales, out, inp)?;
        // Buffers are never empty (a zero-size binding is not valid on every runtime).
        let nonempty = |v: &[f32]| if v.is_empty() { vec![0.0f32] } else { v.to_vec() };
        let words = if w.signs.words().is_empty() { vec![0u32] } else { w.signs.words().to_vec() };
        Ok(ResidentDelta {
            signs: client.create_from_slice(u32::as_bytes(&words)),
            rows: client.create_from_slice(f32::as_bytes(&nonempty(&f.rows))),
            cols: client.create_from_slice(f32::as_bytes(&nonempty(&f.cols))),
            with_cols: f.cols.iter().any(|&c| c != 1.0),
            out,
            inp,
        })
    }

    /// `[out, in]`.
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// Bytes held on the device.
    pub fn device_bytes(&self) -> usize {
        (self.out * self.inp.div_ceil(32) + self.out + self.inp) * 4
    }

    /// `y[r, :] += Δ̂·x[r, :]` on the device, for every row of `x` (`[rows, in]`, contiguous f32)
    /// when `row_ids` is `None`, else for the listed rows (a device buffer of `u32`, `listed` of
    /// them). `y` is `[rows, out]`, contiguous f32, written in place.
    ///
    /// # Safety
    /// `x` must hold `rows · in` f32 values and `y` `rows · out`, `row_ids` `listed` values each
    /// below `rows`; `y` must not be read or written by anything else until the launch is done.
    pub unsafe fn add_product<R: Runtime>(&self, client: &ComputeClient<R>, x: Handle, rows: usize, row_ids: Option<(Handle, usize)>, y: Handle) {
        let count = row_ids.as_ref().map_or(rows, |(_, n)| *n);
        if count == 0 || self.out == 0 {
            return;
        }
        let words = self.inp.div_ceil(32).max(1);
        let (ids, ids_len, listed) = match row_ids {
            Some((h, n)) => (h, n, 1u32),
            None => (self.rows.clone(), 1, 0u32),
        };
        // SAFETY: the caller's contract for x, y and row_ids; the delta's buffers are ours.
        unsafe {
            add_product_kernel::launch::<R>(
                client,
                CubeCount::Static((self.out as u32).div_ceil(OUTPUTS_PER_CUBE), count as u32, 1),
                CubeDim::new_2d(LANES, OUTPUTS_PER_CUBE),
                ArrayArg::from_raw_parts(x, (rows * self.inp).max(1)),
                ArrayArg::from_raw_parts(self.signs.clone(), self.out * words),
                ArrayArg::from_raw_parts(self.rows.clone(), self.out),
                ArrayArg::from_raw_parts(self.cols.clone(), self.inp.max(1)),
                ArrayArg::from_raw_parts(ids, ids_len),
                ArrayArg::from_raw_parts(y, rows * self.out),
                self.inp,
                self.out,
                words,
                self.with_cols as u32,
                listed,
            );
        }
    }

    /// `merged = (W_base + Δ̂)ᵀ`, `[in, out]`, from `wt = W_baseᵀ` (`[in, out]`), both contiguous
    /// f32 buffers on the device.
    ///
    /// # Safety
    /// `wt` and `merged` must each hold `in · out` f32 values; `merged` must not be read or
    /// written by anything else until the launch is done.
    pub unsafe fn merge_t<R: Runtime>(&self, client: &ComputeClient<R>, wt: Handle, merged: Handle) {
        let n = self.inp * self.out;
        if n == 0 {
            return;
        }
        // SAFETY: the caller's contract for wt and merged; the delta's buffers are ours.
        unsafe {
            merge_t_kernel::launch::<R>(
                client,
                CubeCount::Static(n.div_ceil(MERGE_THREADS as usize) as u32, 1, 1),
                CubeDim::new_1d(MERGE_THREADS),
                ArrayArg::from_raw_parts(wt, n),
                ArrayArg::from_raw_parts(self.signs.clone(), self.out * self.inp.div_ceil(32)),
                ArrayArg::from_raw_parts(self.rows.clone(), self.out),
                ArrayArg::from_raw_parts(self.cols.clone(), self.inp),
                ArrayArg::from_raw_parts(merged, n),
                self.inp,
                self.out,
                self.inp.div_ceil(32),
            );
        }
    }
}

/// `Y = X·W_baseᵀ + Δ̂_{idx[r]}·X[r]` per row on `client`'s device, from host slices (`base_t`:
/// W_baseᵀ, `[in, out]` row-major, or `None` for the delta terms alone; X `[rows, in]`). Uploads
/// everything, computes the base product on the host (the device paths use their framework's
/// GEMM for it), then one [`ResidentDelta::add_product`] launch per delta over its rows, and
/// reads Y (`[rows, out]`) back.
pub fn batched_delta_product<R: Runtime>(
    client: &ComputeClient<R>,
    base_t: Option<&[f32]>,
    deltas: &[&CompressedWeight<'_>],
    idx: &[usize],
    x: &[f32],
) -> Result<Vec<f32>, KernelError> {
    let first = deltas.first().ok_or_else(|| KernelError::Batch("no deltas".into()))?;
    let (out, inp) = (first.rows(), first.cols());
    if let Some(d) = deltas.iter().find(|d| (d.rows(), d.cols()) != (out, inp)) {
        return Err(KernelError::Batch(format!("delta `{}` is [{}, {}], the first is [{out}, {inp}]", d.name, d.rows(), d.cols())));
    }
    let rows = idx.len();
    if x.len() != rows * inp {
        return Err(KernelError::Batch(format!("{rows} rows need x of {} values, not {}", rows * inp, x.len())));
    }
    if let Some(&bad) = idx.iter().find(|&&d| d >= deltas.len()) {
        return Err(KernelError::Batch(format!("row delta index {bad} but only {} deltas", deltas.len())));
    }
    if let Some(b) = base_t {
        if b.len() != inp * out {
            return Err(KernelError::Batch(format!("the base weight has {} values, [{inp}, {out}] needs {}", b.len(), inp * out)));
        }
    }
    if rows == 0 || out == 0 {
        return Ok(vec![0.0; rows * out]);
    }
    let mut y = vec![0f32; rows * out];
    if let Some(wt) = base_t {
        crate::dense::dense_matmul_t(x, wt, inp, out, &mut y)?;
    }
    let x_h = client.create_from_slice(f32::as_bytes(if x.is_empty() { &[0.0] } else { x }));
    let y_h = client.create_from_slice(f32::as_bytes(&y));
    for (d, delta) in deltas.iter().enumerate() {
        let ids: Vec<u32> = (0..rows).filter(|&r| idx[r] == d).map(|r| r as u32).collect();
        if ids.is_empty() {
            continue;
        }
        let resident = ResidentDelta::upload(client, delta)?;
        let ids_h = client.create_from_slice(u32::as_bytes(&ids));
        // SAFETY: x_h holds rows · in values, y_h rows · out, ids_h ids.len() values below rows;
        // launches on one client run in order, so no two touch y_h at once.
        unsafe { resident.add_product(client, x_h.clone(), rows, Some((ids_h, ids.len())), y_h.clone()) };
    }
    let bytes = client.read_one(y_h).map_err(|e| KernelError::Batch(format!("reading the result back from the device: {e:?}")))?;
    Ok(f32::from_bytes(&bytes).to_vec())
}

/// `(W_base + Δ̂)ᵀ` (`[in, out]`) on `client`'s device from host slices: upload, one
/// [`ResidentDelta::merge_t`] launch, read back.
pub fn merged_t<R: Runtime>(client: &ComputeClient<R>, base_t: &[f32], delta: &CompressedWeight<'_>) -> Result<Vec<f32>, KernelError> {
    let (out, inp) = (delta.rows(), delta.cols());
    if base_t.len() != inp * out {
        return Err(KernelError::Batch(format!("the base weight has {} values, [{inp}, {out}] needs {}", base_t.len(), inp * out)));
    }
    if base_t.is_empty() {
        return Ok(Vec::new());
    }
    let resident = ResidentDelta::upload(client, delta)?;
    let wt = client.create_from_slice(f32::as_bytes(base_t));
    let merged = client.empty(base_t.len() * 4);
    // SAFETY: both buffers hold in · out f32 values and nothing else uses `merged`.
    unsafe { resident.merge_t(client, wt, merged.clone()) };
    let bytes = client.read_one(merged).map_err(|e| KernelError::Batch(format!("reading the result back from the device: {e:?}")))?;
    Ok(f32::from_bytes(&bytes).to_vec())
}
