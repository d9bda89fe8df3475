//! Element types that appear in checkpoints and artifacts, with their safetensors names.

use std::fmt;

/// A safetensors element type this project reads or writes.
///
/// Model weights are `BF16`, `F16` or `F32`; artifacts add `U32` (packed signs). Other
/// safetensors types are recognised so that a checkpoint holding them (an `I64` buffer,
/// say) can still be read and copied through, but no arithmetic is done on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// The name safetensors headers use (`"BF16"`, `"U32"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F64 => "F64",
        }
    }

    /// Parses a safetensors dtype name; `None` for names this project does not know.
    pub fn from_name(name: &str) -> Option<DType> {
        Some(match name {
            "BOOL" => DType::Bool,
            "U8" => DType::U8,
            "I8" => DType::I8,
            "I16" => DType::I16,
            "U16" => DType::U16,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "I32" => DType::I32,
            "U32" => DType::U32,
            "F32" => DType::F32,
            "I64" => DType::I64,
            "U64" => DType::U64,
            "F64" => DType::F64,
            _ => return None,
        })
    }

    /// True for the floating-point weight types the delta math works on.
    pub fn is_weight_float(self) -> bool {
        matches!(self, DType::BF16 | DType::F16 | DType::F32)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Number of elements of `shape`, or `None` if the product overflows `usize`.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// `[576, 1536]` style, for messages.
pub fn shape_string(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sizes_match_safetensors() {
        let all = [
            (DType::Bool, 1), (DType::U8, 1), (DType::I8, 1), (DType::I16, 2), (DType::U16, 2),
            (DType::F16, 2), (DType::BF16, 2), (DType::I32, 4), (DType::U32, 4), (DType::F32, 4),
            (DType::I64, 8), (DType::U64, 8), (DType::F64, 8),
        ];
        for (d, size) in all {
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(d.size(), size, "{d}");
        }
        assert_eq!(DType::from_name("bf16"), None);
        assert_eq!(DType::from_name("F8_E4M3"), None);
    }

    #[test]
    fn numel_detects_overflow() {
        assert_eq!(checked_numel(&[576, 1536]), Some(884_736));
        assert_eq!(checked_numel(&[]), Some(1));
        assert_eq!(checked_numel(&[usize::MAX, 2]), None);
    }
}
