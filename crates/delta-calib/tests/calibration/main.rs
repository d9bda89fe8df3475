//! delta-calib's integration tests, one module per subject, in one test binary (each binary links
//! its own copy of Burn).

mod common;
mod cube;
mod distill;
mod layerwise;
