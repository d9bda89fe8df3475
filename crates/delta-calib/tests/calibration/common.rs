//! A tiny f32 base / fine-tune pair (Qwen3 layout) and calibration samples, shared by the
//! calibration tests.

use delta_format::Checkpoint;
use delta_tests::tiny::{self, VOCAB};
use delta_tests::{RawTensor, Rng};

pub const N: usize = 6;
pub const T: usize = 12;
pub const HELDOUT: usize = 2;

pub struct Pair {
    pub _tmp: tempfile::TempDir,
    pub base: Checkpoint,
    pub ft: Checkpoint,
    pub samples: Vec<Vec<u32>>,
}

pub fn pair() -> Pair {
    let v = tiny::variants().into_iter().find(|v| v.name == "qwen3").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    tiny::write(&v, &tmp.path().join("base"));
    tiny::write(&v, &tmp.path().join("ft"));
    // The fine-tune: every block linear moved by noise with a direction-dependent size.
    let mut rng = Rng::new(9);
    let moved: Vec<RawTensor> = tiny::tensors(&v)
        .into_iter()
        .map(|t| {
            if t.name.contains("layers") && t.name.ends_with("proj.weight") {
                let vals: Vec<f32> = RawTensor::values(t.dtype, &t.data).iter().map(|x| x + 0.02 * rng.uniform() + 0.01 * x.signum()).collect();
                RawTensor::from_f32(&t.name, t.dtype, &t.shape, &vals)
            } else {
                t
            }
        })
        .collect();
    let ft_dir = tmp.path().join("ft");
    let config = std::fs::read(ft_dir.join("config.json")).unwrap();
    delta_tests::write_folder(&ft_dir, &moved);
    std::fs::write(ft_dir.join("config.json"), config).unwrap();
    let samples = (0..N).map(|_| (0..T).map(|_| rng.below(VOCAB) as u32).collect()).collect();
    Pair { base: Checkpoint::open(&tmp.path().join("base")).unwrap(), ft: Checkpoint::open(&ft_dir).unwrap(), samples, _tmp: tmp }
}

