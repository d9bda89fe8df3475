//! delta-models' integration tests, one module per subject, in one test binary: each binary
//! links its own copy of Burn, so one instead of seven saves CI minutes of compiling and linking.

mod architectures;
mod bf16;
mod cube;
mod delta_linear;
mod host;
mod multi;
mod perplexity;
mod reference_logits;
mod support;
mod tasks;
