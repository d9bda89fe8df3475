//! What several of these tests share.

use std::path::Path;

use delta_calib::{compress, CompressOptions, ScaleChoice};
use delta_format::{Checkpoint, DeltaArtifact, ScaleMode};

/// The fine-tune's delta on the base with `mode` for every weight (no calibration), written into
/// `dir` and opened.
pub fn artifact(base: &Checkpoint, ft: &Checkpoint, mode: ScaleMode, dir: &Path) -> DeltaArtifact {
    let options = CompressOptions { scale: ScaleChoice::Fixed(mode), ..CompressOptions::default() };
    let path = dir.join(format!("{mode}.bitdelta.safetensors"));
    compress(base, ft, &options, &mut |_, _, _| {}).unwrap().write(&path, ft, false).unwrap();
    DeltaArtifact::open(&path).unwrap()
}

/// A chat-formatted prompt of 40 tokens, past the 32-token mark where length-dependent bugs showed.
pub fn chat_prompt_40() -> Vec<u32> {
    (0..40).map(|k| [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2][k % 10]).collect()
}
