//! The base fingerprint: what an artifact records about the base model it was made against.
//!
//! For every tensor of the base: name, dtype, shape and a BLAKE3 digest of its bytes. Applying
//! a delta to a model whose tensors differ in any of these is refused with the first difference
//! named, never done silently. All base tensors are covered, not only those the delta changes,
//! because the reconstructed model passes the unchanged ones through from the base.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::dtype::{checked_numel, shape_string, DType};
use crate::error::{FormatError, Result};
use crate::safetensors::TensorView;

pub const HASH_NAME: &str = "blake3";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub digest: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseFingerprint {
    pub hash: String,
    pub tensors: BTreeMap<String, FingerprintEntry>,
}

/// BLAKE3 of a tensor's bytes, hex.
pub fn tensor_digest(data: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    if data.len() >= 1 << 20 {
        h.update_rayon(data);
    } else {
        h.update(data);
    }
    h.finalize().to_hex().to_string()
}

impl BaseFingerprint {
    /// Fingerprints every tensor of `base` (in parallel).
    pub fn of(base: &Checkpoint) -> Self {
        let names: Vec<&str> = base.names().collect();
        let tensors = names
            .par_iter()
            .map(|&name| {
                let v = base.tensor(name).expect("listed tensor exists");
                (name.to_string(), FingerprintEntry { dtype: v.dtype.name().into(), shape: v.shape.to_vec(), digest: tensor_digest(v.data) })
            })
            .collect();
        BaseFingerprint { hash: HASH_NAME.into(), tensors }
    }

    /// The recorded dtype of `name` (validated when the artifact was read).
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.tensors.get(name).and_then(|e| DType::from_name(&e.dtype))
    }

    /// Checks names, dtypes and shapes (cheap; no data is read).
    pub fn check_structure(&self, base: &Checkpoint) -> Result<()> {
        let mismatch = |reason: String| Err(FormatError::BaseMismatch { reason });
        for (name, e) in &self.tensors {
            let Some(v) = base.tensor(name) else {
                return mismatch(format!("the base has no tensor `{name}`"));
            };
            if v.dtype.name() != e.dtype || v.shape != e.shape.as_slice() {
                return mismatch(format!(
                    "tensor `{name}` is {} {} in the base, the delta expects {} {}",
                    v.dtype,
                    shape_string(v.shape),
                    e.dtype,
                    shape_string(&e.shape)
                ));
            }
        }
        if let Some(extra) = base.names().find(|n| !self.tensors.contains_key(*n)) {
            return mismatch(format!("the base has a tensor `{extra}` the delta's base did not have"));
        }
        Ok(())
    }

    /// Checks one tensor's content.
    pub fn check_tensor(&self, name: &str, view: &TensorView<'_>) -> Result<()> {
        match self.tensors.get(name) {
            Some(e) if e.digest == tensor_digest(view.data) => Ok(()),
            Some(_) => Err(FormatError::BaseMismatch { reason: format!("tensor `{name}` has different content") }),
            None => Err(FormatError::BaseMismatch { reason: format!("the delta's base had no tensor `{name}`") }),
        }
    }

    /// Checks structure, then the content of every tensor against the base's digests
    /// ([`Checkpoint::fingerprint`]: hashed in parallel the first time, then kept).
    pub fn verify(&self, base: &Checkpoint) -> Result<()> {
        self.check_structure(base)?;
        let theirs = &base.fingerprint().tensors;
        match self.tensors.iter().find(|(name, e)| theirs.get(*name).is_none_or(|t| t.digest != e.digest)) {
            Some((name, _)) => Err(FormatError::BaseMismatch { reason: format!("tensor `{name}` has different content") }),
            None => Ok(()),
        }
    }

    /// Validates the recorded entries themselves (known dtypes, sizes that fit in memory).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.hash != HASH_NAME {
            return Err(format!("unknown hash `{}`", self.hash));
        }
        for (name, e) in &self.tensors {
            let d = DType::from_name(&e.dtype).ok_or_else(|| format!("tensor `{name}` has unknown dtype `{}`", e.dtype))?;
            checked_numel(&e.shape)
                .and_then(|n| n.checked_mul(d.size()))
                .ok_or_else(|| format!("tensor `{name}` has an overflowing shape"))?;
            if e.digest.len() != 64 || !e.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("tensor `{name}` has a malformed digest"));
            }
        }
        Ok(())
    }

    /// Bytes of the whole base model as stored, and as it would be in bf16 (floats at 2 bytes).
    pub fn model_bytes(&self) -> (u64, u64) {
        let mut stored = 0u64;
        let mut bf16 = 0u64;
        for e in self.tensors.values() {
            let n = checked_numel(&e.shape).unwrap_or(0) as u64;
            let d = DType::from_name(&e.dtype).unwrap_or(DType::U8);
            stored += n * d.size() as u64;
            bf16 += n * if d.is_weight_float() { 2 } else { d.size() as u64 };
        }
        (stored, bf16)
    }
}
