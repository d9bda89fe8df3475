//! `delta-calib`: building bitdelta artifacts from a base and a fine-tuned checkpoint.
//!
//! [`compress`] is the weight-only path (`bitdelta compress --calibrate none`): it checks the two
//! checkpoints against each other, extracts every block linear weight's sign mask and fits its
//! scales in weight space (mean |Δ| over the scale's span); `auto` keeps, per matrix, the mode
//! with the smallest ‖Δ − Δ̂‖². Layer-wise MSE calibration and end-to-end distillation come with
//! the calibration issue (#6) and will start from these scales.

pub mod compress;
pub mod layerwise;

pub use layerwise::{calibrate_layerwise, LayerFit, LayerwiseOptions, Solver};
pub use compress::{compress, is_block_linear, CompressError, CompressOptions, Compressed, ScaleChoice, WeightReport};
