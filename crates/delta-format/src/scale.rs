//! Scale modes: how the learned scales of one weight are laid out (HF layout `W[out, in]`).
//!
//! | mode | `.scale` tensor | Δ̂[i, j] |
//! |---|---|---|
//! | `scalar` | `[1]` α | α·S[i,j] |
//! | `per-output` | `[out]` v | v[i]·S[i,j] |
//! | `per-input` | `[in]` u | u[j]·S[i,j] |
//! | `two-sided` | `[out + in]` v then u | (v[i]·u[j])·S[i,j] |

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScaleMode {
    Scalar,
    PerOutput,
    PerInput,
    TwoSided,
}

impl ScaleMode {
    pub const ALL: [ScaleMode; 4] = [ScaleMode::Scalar, ScaleMode::PerOutput, ScaleMode::PerInput, ScaleMode::TwoSided];

    /// The name used in artifacts and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ScaleMode::Scalar => "scalar",
            ScaleMode::PerOutput => "per-output",
            ScaleMode::PerInput => "per-input",
            ScaleMode::TwoSided => "two-sided",
        }
    }

    /// Number of scales for a `[rows, cols]` weight.
    pub fn scale_len(self, rows: usize, cols: usize) -> Option<usize> {
        match self {
            ScaleMode::Scalar => Some(1),
            ScaleMode::PerOutput => Some(rows),
            ScaleMode::PerInput => Some(cols),
            ScaleMode::TwoSided => rows.checked_add(cols),
        }
    }
}

impl fmt::Display for ScaleMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScaleMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        ScaleMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown scale mode `{s}` (expected scalar, per-output, per-input or two-sided)"))
    }
}

impl serde::Serialize for ScaleMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for ScaleMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_lengths() {
        for m in ScaleMode::ALL {
            assert_eq!(m.name().parse::<ScaleMode>().unwrap(), m);
        }
        assert!("row".parse::<ScaleMode>().is_err());
        assert_eq!(ScaleMode::Scalar.scale_len(576, 1536), Some(1));
        assert_eq!(ScaleMode::PerOutput.scale_len(576, 1536), Some(576));
        assert_eq!(ScaleMode::PerInput.scale_len(576, 1536), Some(1536));
        assert_eq!(ScaleMode::TwoSided.scale_len(576, 1536), Some(2112));
    }
}
