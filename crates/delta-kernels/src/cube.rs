//! The delta products as CubeCL kernels: one source for every CubeCL runtime (wgpu — Vulkan,
//! Metal, DX12, and Mesa's lavapipe on the CPU in CI — and CUDA). Behind the `cube` feature
//! (`wgpu` / `cuda` pick the runtime).
//!
//! [`batched_delta_product`]: Y[r, :] = X[r, :]·W_baseᵀ + Δ̂_{idx[r]}·X[r, :] for rows that each
//! pick one of several deltas — the multi-tenant decode product — with the base term optional
//! (without it, only the delta terms). One thread per output element; signs stay packed (bit j
//! of word j/32 of row i), scales enter as the row and column factors of [`ScaleFactors`], so every
//! mode runs the same kernel. Any input width (no multiple of 32 or of a tile needed).
//!
//! This first version uploads its operands on every call and reads the result back: it is the
//! correctness baseline the CPU path is tested against on every runtime, not yet a fast path.

use cubecl::prelude::*;
use delta_format::CompressedWeight;

use crate::error::KernelError;
use crate::merge::ScaleFactors;

/// Threads per cube.
const CUBE_THREADS: u32 = 256;

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn fused_delta_product(
    x: &Array<f32>,
    wt: &Array<f32>,
    signs: &Array<u32>,
    row_f: &Array<f32>,
    col_f: &Array<f32>,
    idx: &Array<u32>,
    y: &mut Array<f32>,
    rows: usize,
    inp: usize,
    out: usize,
    words_per_row: usize,
    with_base: u32,
) {
    let t = ABSOLUTE_POS;
    if t < rows * out {
        let r = t / out;
        let i = t % out;
        let d = idx[r] as usize;
        let sign_at = (d * out + i) * words_per_row;
        let col_at = d * inp;
        let x_at = r * inp;
        let mut base = 0.0f32;
        let mut delta = 0.0f32;
        for j in 0..inp {
            let xv = x[x_at + j];
            if with_base == 1u32 {
                base += xv * wt[j * out + i];
            }
            let word = signs[sign_at + j / 32];
            let bit = (word >> ((j % 32) as u32)) & 1u32;
            let s = f32::cast_from(bit) * 2.0f32 - 1.0f32;
            delta += s * (xv * col_f[col_at + j]);
        }
        y[t] = base + row_f[d * out + i] * delta;
    }
}

/// `Y = X·W_baseᵀ + Δ̂_{idx[r]}·X[r]` per row on `client`'s device (`base_t`: W_baseᵀ, `[in, out]`
/// row-major, or `None` for the delta terms alone). X is `[rows, in]`; returns Y `[rows, out]`.
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
    let words_per_row = inp.div_ceil(32);
    let (mut signs, mut row_f, mut col_f) = (Vec::new(), Vec::new(), Vec::new());
    for d in deltas {
        let f = ScaleFactors::new(&d.name, d.mode, &d.scales, out, inp)?;
        signs.extend_from_slice(d.signs.words());
        row_f.extend_from_slice(&f.rows);
        col_f.extend_from_slice(&f.cols);
    }
    // Buffers are never empty (a zero-size binding is not valid on every runtime).
    let nonempty = |v: &[f32]| if v.is_empty() { vec![0.0f32] } else { v.to_vec() };
    let idx32: Vec<u32> = idx.iter().map(|&d| d as u32).collect();
    let x_h = client.create_from_slice(f32::as_bytes(&nonempty(x)));
    let wt = base_t.map(<[f32]>::to_vec).unwrap_or_else(|| vec![0.0]);
    let wt_h = client.create_from_slice(f32::as_bytes(&wt));
    let signs = if signs.is_empty() { vec![0u32] } else { signs };
    let s_h = client.create_from_slice(u32::as_bytes(&signs));
    let r_h = client.create_from_slice(f32::as_bytes(&row_f));
    let c_h = client.create_from_slice(f32::as_bytes(&nonempty(&col_f)));
    let i_h = client.create_from_slice(u32::as_bytes(&idx32));
    let y_h = client.empty(rows * out * 4);
    let count = (rows * out).div_ceil(CUBE_THREADS as usize) as u32;
    // SAFETY: every handle was created just above with exactly the length passed with it.
    unsafe {
        fused_delta_product::launch::<R>(
            client,
            CubeCount::Static(count, 1, 1),
            CubeDim::new_1d(CUBE_THREADS),
            ArrayArg::from_raw_parts(x_h, x.len().max(1)),
            ArrayArg::from_raw_parts(wt_h, wt.len()),
            ArrayArg::from_raw_parts(s_h, signs.len()),
            ArrayArg::from_raw_parts(r_h, row_f.len()),
            ArrayArg::from_raw_parts(c_h, col_f.len().max(1)),
            ArrayArg::from_raw_parts(i_h, idx32.len()),
            ArrayArg::from_raw_parts(y_h.clone(), rows * out),
            rows,
            inp,
            out,
            words_per_row,
            base_t.is_some() as u32,
        );
    }
    let bytes = client.read_one(y_h).map_err(|e| KernelError::Batch(format!("reading the result back from the device: {e:?}")))?;
    Ok(f32::from_bytes(&bytes).to_vec())
}
