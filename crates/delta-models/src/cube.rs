//! The GPU path: Burn's CubeCL backends ([`WgpuBackend`] with the `wgpu` feature, [`CudaBackend`]
//! with `cuda`), and `DeltaLinear`'s product on them through the CubeCL kernels of
//! `delta_kernels::cube`. The packed delta goes to the device once, on first use
//! ([`DeviceDelta`]); up to [`crate::host::FEW_ROWS`] rows take Burn's GEMM for the base and one kernel that
//! adds each row's delta term into it in place; more rows take one GEMM on the merged weight,
//! formed on the device for the call (`(W_base + Δ̂)ᵀ`, never kept).
//!
//! The backends are used without Burn's fusion, so every float tensor is a `CubeTensor` whose
//! buffer the kernels can take. Like [`crate::host`], the functions here recognise their backend
//! by type and return `None` for any other.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use delta_format::CompressedWeight;

/// Burn's wgpu backend (Vulkan, Metal, DX12; Mesa's lavapipe on a CPU), f32, without fusion.
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn_cubecl::CubeBackend<burn_wgpu::WgpuRuntime, f32, i32, u32>;
/// Burn's CUDA backend, f32, without fusion.
#[cfg(feature = "cuda")]
pub type CudaBackend = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// Keeps CubeCL's autotune results (which kernel is fastest for each product shape, measured on
/// first use) in the user's cache folder (`cubecl/` there, `~/.cache/cubecl` on Linux), where
/// CubeCL keeps them when the process runs outside a Cargo project; inside one, CubeCL would
/// write them into that project's `target/` folder. A `cubecl.toml` that names a place wins. For
/// programs such as the `bitdelta` command; call it before any GPU work: once CubeCL has read its
/// configuration this changes nothing.
#[cfg(feature = "cube")]
pub fn autotune_results_in_the_user_cache() {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    let Some(dir) = dirs::cache_dir() else { return };
    let mut state = CubeClRuntimeConfig::storage().lock();
    if state.is_some() {
        return;
    }
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if matches!(config.autotune.cache, CacheConfig::Target) {
        config.autotune.cache = CacheConfig::File(dir.join("cubecl"));
    }
    *state = Some(std::sync::Arc::new(config));
}

/// A packed delta's device buffers, uploaded on first use on a GPU backend and shared by clones
/// (empty, and free, on the CPU).
#[derive(Clone, Default)]
pub struct DeviceDelta {
    #[cfg(feature = "cube")]
    resident: std::sync::Arc<std::sync::OnceLock<delta_kernels::cube::ResidentDelta>>,
}

impl DeviceDelta {
    /// Bytes held on the device (0 before the first product on a GPU backend).
    pub fn device_bytes(&self) -> usize {
        #[cfg(feature = "cube")]
        if let Some(r) = self.resident.get() {
            return r.device_bytes();
        }
        0
    }
}

/// `x · (W_base + Δ̂)ᵀ` on a GPU backend (`wt`: W_baseᵀ, `[in, out]`); `None` on any other.
#[allow(unused_variables)]
pub fn delta_product<B: Backend>(x: &Tensor<B, 2>, wt: &Tensor<B, 2>, delta: &CompressedWeight<'_>, device: &DeviceDelta) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "wgpu")]
    if let Some(y) = on::product::<B, burn_wgpu::WgpuRuntime, WgpuBackend>(x, wt, delta, device) {
        return Some(y);
    }
    #[cfg(feature = "cuda")]
    if let Some(y) = on::product::<B, cubecl::cuda::CudaRuntime, CudaBackend>(x, wt, delta, device) {
        return Some(y);
    }
    None
}

/// `x·W_baseᵀ` plus, for every row r with `row_delta[r] = Some(d)`, the delta term
/// `x[r]·Δ̂_dᵀ` of `deltas[d]`, on a GPU backend: one GEMM for the base, then one kernel launch
/// per delta over its rows. `None` on any other backend.
#[allow(unused_variables)]
pub fn base_and_deltas<B: Backend>(x: &Tensor<B, 2>, wt: &Tensor<B, 2>, deltas: &[(&CompressedWeight<'_>, &DeviceDelta)], row_delta: &[Option<usize>]) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "wgpu")]
    if let Some(y) = on::batched::<B, burn_wgpu::WgpuRuntime, WgpuBackend>(x, wt, deltas, row_delta) {
        return Some(y);
    }
    #[cfg(feature = "cuda")]
    if let Some(y) = on::batched::<B, cubecl::cuda::CudaRuntime, CudaBackend>(x, wt, deltas, row_delta) {
        return Some(y);
    }
    None
}

/// The products when `B` is the CubeCL backend `C` (runtime `R`).
#[cfg(feature = "cube")]
mod on {
    use std::any::Any;

    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, Tensor, TensorPrimitive};
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::CubeRuntime;
    use cubecl::prelude::CubeElement;
    use delta_format::CompressedWeight;
    use delta_kernels::cube::ResidentDelta;

    use super::DeviceDelta;

    /// `t` as a tensor of `C`, when `B` is `C`.
    fn cube<B: Backend, C: Backend>(t: &Tensor<B, 2>) -> Option<Tensor<C, 2>> {
        (t as &dyn Any).downcast_ref::<Tensor<C, 2>>().cloned()
    }

    /// The contiguous f32 buffer of `t`; `None` for another dtype.
    fn buffer<R: CubeRuntime, C: Backend<FloatTensorPrimitive = CubeTensor<R>>>(t: Tensor<C, 2>) -> Option<CubeTensor<R>> {
        let p = into_contiguous(t.into_primitive().tensor());
        (p.dtype == DType::F32).then_some(p)
    }

    /// `x·wt` in a buffer no other tensor shares (so a kernel may add into it).
    fn own_product<R: CubeRuntime, C: Backend<FloatTensorPrimitive = CubeTensor<R>>>(x: Tensor<C, 2>, wt: Tensor<C, 2>) -> Option<CubeTensor<R>> {
        let y = buffer(x.matmul(wt))?;
        Some(if y.can_mut() { y } else { y.copy() })
    }

    fn resident<'d, R: CubeRuntime>(device: &'d DeviceDelta, client: &cubecl::prelude::ComputeClient<R>, delta: &CompressedWeight<'_>) -> &'d ResidentDelta {
        device.resident.get_or_init(|| ResidentDelta::upload(client, delta).expect("the artifact's scales were validated when it was read"))
    }

    fn float<R: CubeRuntime, C: Backend<FloatTensorPrimitive = CubeTensor<R>>>(t: CubeTensor<R>) -> Tensor<C, 2> {
        Tensor::from_primitive(TensorPrimitive::Float(t))
    }

    pub fn product<B, R, C>(x: &Tensor<B, 2>, wt: &Tensor<B, 2>, delta: &CompressedWeight<'_>, device: &DeviceDelta) -> Option<Tensor<B, 2>>
    where
        B: Backend,
        R: CubeRuntime,
        C: Backend<FloatTensorPrimitive = CubeTensor<R>>,
    {
        let (x, wt) = (cube::<B, C>(x)?, cube::<B, C>(wt)?);
        let [rows, _] = x.dims();
        let [inp, out] = wt.dims();
        let xp = buffer(x.clone())?;
        let client = xp.client.clone();
        let resident = resident(device, &client, delta);
        let y = if rows <= crate::host::FEW_ROWS {
            let yp = own_product(x, wt)?;
            // SAFETY: xp holds rows · in contiguous f32 values, yp rows · out, and yp is ours alone.
            unsafe { resident.add_product(&client, xp.handle.clone(), rows, None, yp.handle.clone()) };
            float(yp)
        } else {
            let wp = buffer(wt)?;
            let merged = CubeTensor::new_contiguous(client.clone(), wp.device.clone(), [inp, out].into(), client.empty(inp * out * 4), DType::F32);
            // SAFETY: both hold in · out contiguous f32 values; `merged` was just allocated.
            unsafe { resident.merge_t(&client, wp.handle.clone(), merged.handle.clone()) };
            x.matmul(float(merged))
        };
        crate::same_backend(y)
    }

    pub fn batched<B, R, C>(x: &Tensor<B, 2>, wt: &Tensor<B, 2>, deltas: &[(&CompressedWeight<'_>, &DeviceDelta)], row_delta: &[Option<usize>]) -> Option<Tensor<B, 2>>
    where
        B: Backend,
        R: CubeRuntime,
        C: Backend<FloatTensorPrimitive = CubeTensor<R>>,
    {
        let (x, wt) = (cube::<B, C>(x)?, cube::<B, C>(wt)?);
        let [rows, _] = x.dims();
        let xp = buffer(x.clone())?;
        let client = xp.client.clone();
        let yp = own_product(x, wt)?;
        for (d, &(delta, device)) in deltas.iter().enumerate() {
            let ids: Vec<u32> = (0..rows).filter(|&r| row_delta[r] == Some(d)).map(|r| r as u32).collect();
            if ids.is_empty() {
                continue;
            }
            let resident = resident(device, &client, delta);
            let ids_h = client.create_from_slice(u32::as_bytes(&ids));
            // SAFETY: xp holds rows · in contiguous f32 values, yp rows · out and is ours alone;
            // ids_h holds ids.len() row indices below rows. Launches on one client run in order.
            unsafe { resident.add_product(&client, xp.handle.clone(), rows, Some((ids_h, ids.len())), yp.handle.clone()) };
        }
        crate::same_backend(float::<R, C>(yp))
    }
}
