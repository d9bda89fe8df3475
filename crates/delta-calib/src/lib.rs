//! `delta-calib`: building bitdelta artifacts from a base and a fine-tuned checkpoint.
//!
//! - [`compress`]: the weight-only path (`bitdelta compress --calibrate none`): checks the two
//!   checkpoints against each other, extracts every block linear weight's sign mask and fits its
//!   scales in weight space (mean |Δ| over the scale's span); `auto` keeps, per matrix, the mode
//!   with the smallest ‖Δ − Δ̂‖².
//! - [`layerwise`]: stage 1 of calibration — per layer, least-squares fits to the fine-tune's
//!   layer outputs, mode chosen on held-out samples.
//! - [`distill`]: stage 2 — all scales trained jointly, end to end, on the fine-tune's logits.
//! - [`picture`]: the calibration report as an SVG picture.

pub mod compress;
pub mod distill;
pub mod layerwise;
pub mod picture;

pub use distill::{distill, DistillLoss, DistillOptions, DistillProgress, DistillReport};
pub use layerwise::{calibrate_layerwise, LayerFit, LayerwiseOptions, Solver};
pub use compress::{compress, CompressError, CompressOptions, Compressed, ScaleChoice, WeightReport};
