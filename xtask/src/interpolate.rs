//! `cargo xtask interpolate BASE FINETUNED ALPHA OUT` (maintainers): the checkpoint
//! `base + α·(fine-tune − base)` on the blocks' linear weights — what a 1-bit delta replaces —
//! with every other tensor the fine-tune's, written in f32 so nothing is rounded. Evaluated with
//! `bitdelta eval ppl --teacher FINETUNED`, it shows how a held-out measure moves when the
//! fine-tune's own change is shrunk (α < 1) or enlarged (α > 1): the yardstick for compressed
//! models whose scales come out smaller or larger than the fine-tune's (BENCHMARKS.md).

use std::path::Path;

use anyhow::{bail, Context, Result};
use delta_format::atomic::AtomicDir;
use delta_format::checkpoint::is_block_linear;
use delta_format::{Checkpoint, DType};
use delta_tests::RawTensor;

pub fn interpolate(args: &[String]) -> Result<()> {
    let [base, finetuned, alpha, out] = args else { bail!("usage: cargo xtask interpolate BASE FINETUNED ALPHA OUT") };
    let alpha: f32 = alpha.parse().ok().filter(|a: &f32| a.is_finite()).with_context(|| format!("ALPHA must be a finite number, not `{alpha}`"))?;
    let (base, finetuned, out) = (Path::new(base), Path::new(finetuned), Path::new(out));
    if out.exists() {
        bail!("{} exists; give a new folder", out.display());
    }
    // Written under a temporary name and moved into place at the end: never half a folder.
    let dir = AtomicDir::create(out, false)?;
    let (b, f) = (Checkpoint::open(base)?, Checkpoint::open(finetuned)?);
    let values = |c: &Checkpoint, name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let v = c.tensor(name).with_context(|| format!("{}: no tensor {name}", c.dir().display()))?;
        let dtype = match v.dtype {
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
            DType::F32 => safetensors::Dtype::F32,
            d => bail!("{name}: {} is not a float type this command reads", d.name()),
        };
        Ok((v.shape.to_vec(), RawTensor::values(dtype, v.data)))
    };
    let mut tensors = Vec::new();
    let mut mixed = 0;
    for name in f.names() {
        let (shape, mut ft) = values(&f, name)?;
        if is_block_linear(name, &shape) {
            let (base_shape, bw) = values(&b, name)?;
            if base_shape != shape {
                bail!("{name}: base shape {base_shape:?}, fine-tune shape {shape:?}");
            }
            ft.iter_mut().zip(&bw).for_each(|(x, &w)| *x = w + alpha * (*x - w));
            mixed += 1;
        }
        tensors.push(RawTensor::from_f32(name, safetensors::Dtype::F32, &shape, &ft));
    }
    if mixed == 0 {
        bail!("{}: no block linear weights (rank-2 `.weight` tensors under a numbered block) to interpolate", finetuned.display());
    }
    let views = tensors.iter().map(|t| Ok((t.name.clone(), safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)?)));
    let views: Vec<_> = views.collect::<Result<_, safetensors::SafeTensorError>>()?;
    let file = dir.path().join("model.safetensors");
    safetensors::serialize_to_file(views, None, &file).with_context(|| file.display().to_string())?;
    for side in f.side_files()? {
        let name = side.file_name().context("a side file without a name")?;
        std::fs::copy(&side, dir.path().join(name)).with_context(|| side.display().to_string())?;
    }
    dir.commit()?;
    eprintln!("{}: base + {alpha}·(fine-tune − base) on {mixed} block linears, the rest the fine-tune's (f32)", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use delta_tests::{read_tensors, synthetic_pair, write_folder, RawTensor};

    #[test]
    fn block_linears_move_along_the_delta_and_the_rest_is_the_finetunes() {
        let dir = std::env::temp_dir().join(format!("xtask-interpolate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (base, ft) = synthetic_pair(safetensors::Dtype::BF16, 2, 7);
        write_folder(&dir.join("base"), &base);
        write_folder(&dir.join("ft"), &ft);
        let arg = |p: &str| dir.join(p).display().to_string();
        super::interpolate(&[arg("base"), arg("ft"), "0.25".into(), arg("out")]).unwrap();
        let out = read_tensors(&dir.join("out/model.safetensors"));
        assert_eq!(out.len(), ft.len());
        let (mut linears, mut moved) = (0, 0);
        for (bt, ft) in base.iter().zip(&ft) {
            let (dtype, shape, data) = &out[&ft.name];
            assert_eq!((*dtype, shape), (safetensors::Dtype::F32, &ft.shape), "{}", ft.name);
            let (bv, fv, ov) = (RawTensor::values(bt.dtype, &bt.data), RawTensor::values(ft.dtype, &ft.data), RawTensor::values(*dtype, data));
            let linear = ft.name.ends_with("proj.weight");
            linears += linear as usize;
            for ((&b, &f), &o) in bv.iter().zip(&fv).zip(&ov) {
                let want = if linear { b + 0.25 * (f - b) } else { f };
                assert!((o - want).abs() <= 1e-7, "{}: {o} against {want}", ft.name);
                moved += (linear && f != b) as usize;
            }
        }
        assert_eq!(linears, 14);
        assert!(moved > 0);
        // The folder exists now: a second run must refuse to write into it.
        assert!(super::interpolate(&[arg("base"), arg("ft"), "0.5".into(), arg("out")]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
