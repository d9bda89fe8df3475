//! `delta-models` — Llama-family models (Llama 2/3, Mistral, Qwen2, Qwen3) defined in Burn and
//! built from Hugging Face `config.json` + safetensors, with a staged forward for calibration and
//! a `DeltaLinear` layer (base weight + packed signs + scales) usable on its own.
//!
//! Not implemented yet: this crate is a placeholder in the dependency chain
//! `delta-format <- delta-kernels <- delta-models <- delta-calib <- delta-cli`, filled by the
//! models issue (#5). It deliberately exports nothing so that nothing can depend on fake code.
