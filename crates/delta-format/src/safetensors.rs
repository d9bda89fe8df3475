//! The safetensors container: a validating, zero-copy header parser and one streaming writer.
//!
//! Layout (the public safetensors spec): 8 bytes little-endian header length `N`, `N` bytes of
//! JSON (`{"name": {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {..}}`),
//! then the data section. Parsing guarantees, for every tensor it accepts: a known dtype, a
//! shape whose byte size does not overflow and equals `end - start`, offsets inside the data
//! section, and tensors that tile the data section exactly (no overlap, no gap, no trailing
//! bytes). Views borrow from the caller's bytes (an mmap), nothing is copied.
//!
//! The writer streams: it writes the header from a plan of names, dtypes and shapes, then takes
//! tensors one at a time in file order, so memory is bounded by what the caller holds, and it
//! writes through [`AtomicFile`], so the destination only ever holds a complete file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use serde::Deserialize;

use crate::atomic::AtomicFile;
use crate::dtype::{checked_numel, shape_string, DType};
use crate::error::{FormatError, Result};

/// Largest header this reader accepts (same limit as the reference implementation).
pub const MAX_HEADER_LEN: usize = 100_000_000;

/// One tensor's entry in a parsed header; offsets are relative to the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// A borrowed tensor: dtype, shape and its raw little-endian bytes.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl<'a> TensorView<'a> {
    pub fn numel(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// The data as `u32` words (in place when aligned, copied otherwise); `None` unless `U32`.
    pub fn as_u32(&self) -> Option<Cow<'a, [u32]>> {
        (self.dtype == DType::U32).then(|| cast_words(self.data, u32::from_le_bytes))
    }

    /// The data as `f32` (in place when aligned, copied otherwise); `None` unless `F32`.
    pub fn as_f32(&self) -> Option<Cow<'a, [f32]>> {
        (self.dtype == DType::F32).then(|| cast_words(self.data, f32::from_le_bytes))
    }

    /// The raw 16-bit patterns of a `BF16` or `F16` tensor; `None` for other dtypes.
    pub fn as_u16_bits(&self) -> Option<Cow<'a, [u16]>> {
        matches!(self.dtype, DType::BF16 | DType::F16).then(|| cast_words(self.data, u16::from_le_bytes))
    }

    /// Index and value of the first NaN or infinity of a float tensor (`None` if all finite
    /// or not a float type). Works on bit patterns, so it needs no conversion.
    pub fn first_non_finite(&self) -> Option<(usize, f64)> {
        fn classify(mantissa_nonzero: bool, negative: bool) -> f64 {
            match (mantissa_nonzero, negative) {
                (true, _) => f64::NAN,
                (false, false) => f64::INFINITY,
                (false, true) => f64::NEG_INFINITY,
            }
        }
        match self.dtype {
            DType::BF16 | DType::F16 => {
                let (exp, man, sign) = if self.dtype == DType::BF16 { (0x7F80u16, 0x007Fu16, 0x8000u16) } else { (0x7C00, 0x03FF, 0x8000) };
                self.data.chunks_exact(2).position(|c| u16::from_le_bytes([c[0], c[1]]) & exp == exp).map(|i| {
                    let b = u16::from_le_bytes([self.data[2 * i], self.data[2 * i + 1]]);
                    (i, classify(b & man != 0, b & sign != 0))
                })
            }
            DType::F32 => self.data.chunks_exact(4).position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()).map(|i| {
                let c = &self.data[4 * i..4 * i + 4];
                (i, f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            }),
            DType::F64 => self.data.chunks_exact(8).position(|c| !f64::from_le_bytes(c.try_into().expect("8 bytes")).is_finite()).map(|i| {
                (i, f64::from_le_bytes(self.data[8 * i..8 * i + 8].try_into().expect("8 bytes")))
            }),
            _ => None,
        }
    }
}

/// Reinterprets little-endian bytes as words of `N` bytes: borrowed when the host is
/// little-endian and the slice is aligned, copied otherwise.
fn cast_words<const N: usize, T: Copy + Default>(data: &[u8], from_le: fn([u8; N]) -> T) -> Cow<'_, [T]> {
    debug_assert_eq!(std::mem::size_of::<T>(), N);
    if cfg!(target_endian = "little") {
        // SAFETY: T is a plain number type (u16, u32, f32) for which every bit pattern is valid.
        let (head, body, tail) = unsafe { data.align_to::<T>() };
        if head.is_empty() && tail.is_empty() {
            return Cow::Borrowed(body);
        }
    }
    Cow::Owned(data.chunks_exact(N).map(|c| from_le(c.try_into().expect("chunk of N bytes"))).collect())
}

/// A validated header; owns no tensor data, so it can sit beside the mmap it describes.
#[derive(Clone, Debug)]
pub struct SafetensorsHeader {
    /// Tensors in file order (ascending offsets).
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
    data_start: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

impl SafetensorsHeader {
    /// Parses and validates the header of a complete safetensors file held in `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 8 {
            return Err(FormatError::TooShort { len: bytes.len() });
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&bytes[..8]);
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_LEN as u64 {
            return Err(FormatError::HeaderTooLarge { header_len, max: MAX_HEADER_LEN });
        }
        let header_len = header_len as usize;
        let data_start = 8 + header_len;
        if data_start > bytes.len() {
            return Err(FormatError::HeaderOutOfBounds { header_len: header_len as u64, file_len: bytes.len() });
        }
        let json: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..data_start])
            .map_err(|e| FormatError::HeaderNotJson { reason: e.to_string() })?;
        let data_len = bytes.len() - data_start;

        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::with_capacity(json.len());
        for (name, value) in json {
            if name == "__metadata__" {
                metadata = serde_json::from_value(value)
                    .map_err(|e| FormatError::BadMetadata { reason: e.to_string() })?;
                continue;
            }
            let raw: RawEntry = serde_json::from_value(value)
                .map_err(|e| FormatError::BadTensorEntry { name: name.clone(), reason: e.to_string() })?;
            let dtype = DType::from_name(&raw.dtype)
                .ok_or_else(|| FormatError::UnknownDType { name: name.clone(), dtype: raw.dtype.clone() })?;
            let (start, end) = raw.data_offsets;
            let expected = checked_numel(&raw.shape)
                .and_then(|n| n.checked_mul(dtype.size()))
                .ok_or_else(|| FormatError::ShapeOverflow { name: name.clone(), shape: shape_string(&raw.shape) })?;
            let span = end.checked_sub(start).ok_or_else(|| FormatError::BadTensorEntry {
                name: name.clone(),
                reason: format!("data_offsets end {end} is before start {start}"),
            })?;
            if span != expected {
                return Err(FormatError::SizeMismatch { name, start, end, span, expected });
            }
            if end > data_len {
                return Err(FormatError::OffsetOutOfBounds { name, start, end, data_len });
            }
            tensors.push(TensorInfo { name, dtype, shape: raw.shape, start, end });
        }
        tensors.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
        let mut expected_start = 0usize;
        for t in &tensors {
            if t.start != expected_start {
                return Err(FormatError::OffsetNotContiguous { name: t.name.clone(), start: t.start, expected: expected_start });
            }
            expected_start = t.end;
        }
        if expected_start != data_len {
            return Err(FormatError::DataNotCovered { covered: expected_start, data_len });
        }
        let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafetensorsHeader { tensors, by_name, metadata, data_start })
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Byte offset of the data section in the file.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// The view of `info` inside `bytes`, the same bytes this header was parsed from.
    pub fn view<'a>(&self, bytes: &'a [u8], info: &'a TensorInfo) -> TensorView<'a> {
        let data = &bytes[self.data_start + info.start..self.data_start + info.end];
        TensorView { dtype: info.dtype, shape: &info.shape, data }
    }
}

/// Computes an artifact's content digest: BLAKE3 over every tensor in file order
/// (`name 0 dtype 0 shape 0 len_u64_le data`) and then every metadata entry but the digest's
/// own key, sorted (`key 0 value 0`). FORMAT.md gives the same definition.
pub struct ContentHasher(blake3::Hasher);

impl ContentHasher {
    pub fn new() -> Self {
        ContentHasher(blake3::Hasher::new())
    }

    pub fn tensor(&mut self, name: &str, dtype: DType, shape: &[usize], data: &[u8]) {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let h = &mut self.0;
        h.update(name.as_bytes());
        h.update(&[0]);
        h.update(dtype.name().as_bytes());
        h.update(&[0]);
        h.update(dims.join(",").as_bytes());
        h.update(&[0]);
        h.update(&(data.len() as u64).to_le_bytes());
        if data.len() >= 1 << 20 {
            h.update_rayon(data);
        } else {
            h.update(data);
        }
    }

    pub fn finish(mut self, metadata: &BTreeMap<String, String>, digest_key: &str) -> String {
        for (k, v) in metadata {
            if k != digest_key {
                self.0.update(k.as_bytes());
                self.0.update(&[0]);
                self.0.update(v.as_bytes());
                self.0.update(&[0]);
            }
        }
        self.0.finalize().to_hex().to_string()
    }
}

impl Default for ContentHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// Recomputes the content digest of a parsed file.
pub fn content_digest(header: &SafetensorsHeader, bytes: &[u8], digest_key: &str) -> String {
    let mut h = ContentHasher::new();
    for info in header.tensors() {
        let v = header.view(bytes, info);
        h.tensor(&info.name, v.dtype, v.shape, v.data);
    }
    h.finish(header.metadata(), digest_key)
}

/// A tensor the writer will write: its name, dtype and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorPlan {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorPlan {
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<usize>) -> Self {
        TensorPlan { name: name.into(), dtype, shape }
    }

    /// Byte size; `None` on overflow.
    pub fn byte_len(&self) -> Option<usize> {
        checked_numel(&self.shape)?.checked_mul(self.dtype.size())
    }
}

const DIGEST_PLACEHOLDER: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Streams one safetensors file to disk, atomically.
///
/// Tensors are laid out by alignment (8-, 4-, 2-, then 1-byte types), then by name, as the
/// reference implementation does; since the header is padded to a multiple of 8, every tensor
/// starts aligned to its element size and can be read in place from an mmap.
pub struct SafetensorsWriter {
    file: AtomicFile,
    plan: Vec<TensorPlan>,
    next: usize,
    hasher: Option<(ContentHasher, String, u64)>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsWriter {
    /// Plans the file and writes its header. With `digest_key`, the metadata gets that key
    /// holding the content digest, filled in by [`finish`](Self::finish).
    pub fn create(
        path: &Path,
        mut plan: Vec<TensorPlan>,
        mut metadata: BTreeMap<String, String>,
        digest_key: Option<&str>,
        overwrite: bool,
    ) -> Result<Self> {
        plan.sort_by(|a, b| b.dtype.size().cmp(&a.dtype.size()).then_with(|| a.name.cmp(&b.name)));
        if let Some(key) = digest_key {
            metadata.insert(key.to_string(), DIGEST_PLACEHOLDER.to_string());
        }
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for t in &plan {
            let len = t.byte_len().ok_or_else(|| FormatError::ShapeOverflow {
                name: t.name.clone(),
                shape: shape_string(&t.shape),
            })?;
            let end = offset + len;
            header.insert(
                t.name.clone(),
                serde_json::json!({ "dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end] }),
            );
            offset = end;
        }
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::to_value(&metadata).expect("string map serialises"));
        }
        let mut json = serde_json::to_vec(&header).expect("header serialises");
        json.resize(json.len().div_ceil(8) * 8, b' ');

        let hasher = match digest_key {
            Some(key) => {
                let needle = format!("\"{key}\":\"{DIGEST_PLACEHOLDER}\"");
                let at = find(&json, needle.as_bytes()).expect("digest placeholder is in the header");
                let pos = 8 + at + key.len() + 4;
                Some((ContentHasher::new(), key.to_string(), pos as u64))
            }
            None => None,
        };
        let mut file = AtomicFile::create(path, overwrite)?;
        let tmp = file.temp_path().to_path_buf();
        let f = file.file();
        f.write_all(&(json.len() as u64).to_le_bytes()).map_err(|e| FormatError::io(&tmp, e))?;
        f.write_all(&json).map_err(|e| FormatError::io(&tmp, e))?;
        Ok(SafetensorsWriter { file, plan, next: 0, hasher, metadata })
    }

    /// The tensors in the order [`write_tensor`](Self::write_tensor) must receive them.
    pub fn order(&self) -> &[TensorPlan] {
        &self.plan
    }

    /// Writes the next tensor's bytes (little-endian, row-major).
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some(t) = self.plan.get(self.next) else {
            return Err(FormatError::WriteOrder { expected: "(none: all written)".into(), found: name.into() });
        };
        if t.name != name {
            return Err(FormatError::WriteOrder { expected: t.name.clone(), found: name.into() });
        }
        let expected = t.byte_len().unwrap_or(usize::MAX);
        if data.len() != expected {
            return Err(FormatError::WriteSize { name: name.into(), expected, found: data.len() });
        }
        if let Some((h, _, _)) = &mut self.hasher {
            h.tensor(&t.name, t.dtype, &t.shape, data);
        }
        let tmp = self.file.temp_path().to_path_buf();
        self.file.file().write_all(data).map_err(|e| FormatError::io(tmp, e))?;
        self.file.start_writeback(data.len() as u64);
        self.next += 1;
        Ok(())
    }

    /// Checks every planned tensor was written, fills in the digest, syncs and renames the file
    /// into place. Returns the file's size in bytes.
    pub fn finish(mut self) -> Result<u64> {
        if self.next != self.plan.len() {
            return Err(FormatError::WriteIncomplete {
                missing: self.plan.len() - self.next,
                first: self.plan[self.next].name.clone(),
            });
        }
        let tmp = self.file.temp_path().to_path_buf();
        let io = |e| FormatError::io(&tmp, e);
        if let Some((h, key, pos)) = self.hasher.take() {
            let digest = h.finish(&self.metadata, &key);
            let f = self.file.file();
            f.seek(SeekFrom::Start(pos)).map_err(io)?;
            f.write_all(digest.as_bytes()).map_err(io)?;
        }
        let len = self.file.file().seek(SeekFrom::End(0)).map_err(io)?;
        self.file.commit()?;
        Ok(len)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_a_valid_file_in_offset_order() {
        let b = file_with(
            r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"U8","shape":[3],"data_offsets":[8,11]},"__metadata__":{"k":"v"}}"#,
            &[0; 11],
        );
        let h = SafetensorsHeader::parse(&b).unwrap();
        let names: Vec<_> = h.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(h.metadata()["k"], "v");
        assert_eq!(h.view(&b, h.info("a").unwrap()).data.len(), 3);
    }

    #[test]
    fn each_rule_has_its_error() {
        use FormatError as E;
        let cases: Vec<(Vec<u8>, fn(&FormatError) -> bool)> = vec![
            (vec![1, 2, 3], |e| matches!(e, E::TooShort { len: 3 })),
            ((u64::MAX).to_le_bytes().to_vec(), |e| matches!(e, E::HeaderTooLarge { .. })),
            (100u64.to_le_bytes().to_vec(), |e| matches!(e, E::HeaderOutOfBounds { header_len: 100, .. })),
            (file_with("{not json", &[]), |e| matches!(e, E::HeaderNotJson { .. })),
            (file_with(r#"{"a":{"dtype":"F32","shape":[1]}}"#, &[]), |e| matches!(e, E::BadTensorEntry { .. })),
            (file_with(r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}"#, &[0; 4]), |e| matches!(e, E::UnknownDType { .. })),
            (
                file_with(r#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,4]}}"#, &[0; 4]),
                |e| matches!(e, E::ShapeOverflow { .. }),
            ),
            (file_with(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, &[0; 4]), |e| matches!(e, E::SizeMismatch { expected: 8, .. })),
            (file_with(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &[0; 4]), |e| matches!(e, E::OffsetOutOfBounds { .. })),
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    &[0; 8],
                ),
                |e| matches!(e, E::OffsetNotContiguous { start: 4, expected: 8, .. }),
            ),
            (file_with(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, &[0; 6]), |e| matches!(e, E::DataNotCovered { covered: 4, data_len: 6 })),
            (file_with(r#"{"__metadata__":{"k":1}}"#, &[]), |e| matches!(e, E::BadMetadata { .. })),
            (file_with(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#, &[0; 4]), |e| matches!(e, E::BadTensorEntry { .. })),
        ];
        for (i, (bytes, check)) in cases.into_iter().enumerate() {
            let err = SafetensorsHeader::parse(&bytes).unwrap_err();
            assert!(check(&err), "case {i}: unexpected error {err}");
            assert!(!err.to_string().contains('\n'), "case {i}: multi-line message");
        }
    }

    #[test]
    fn writer_output_is_read_by_the_reference_crate_and_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let plan = vec![
            TensorPlan::new("odd", DType::BF16, vec![3]),
            TensorPlan::new("words", DType::U32, vec![2, 2]),
            TensorPlan::new("byte", DType::U8, vec![1]),
        ];
        let mut w = SafetensorsWriter::create(&path, plan, BTreeMap::new(), Some("digest"), false).unwrap();
        let order: Vec<String> = w.order().iter().map(|t| t.name.clone()).collect();
        assert_eq!(order, ["words", "odd", "byte"]);
        w.write_tensor("words", &[1u8; 16]).unwrap();
        assert!(matches!(w.write_tensor("byte", &[0]), Err(FormatError::WriteOrder { .. })));
        assert!(matches!(w.write_tensor("odd", &[0; 5]), Err(FormatError::WriteSize { expected: 6, found: 5, .. })));
        w.write_tensor("odd", &[2u8; 6]).unwrap();
        w.write_tensor("byte", &[7]).unwrap();
        w.finish().unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(reference.tensor("byte").unwrap().data(), &[7]);
        assert_eq!(reference.tensor("words").unwrap().shape(), &[2, 2]);
        let h = SafetensorsHeader::parse(&bytes).unwrap();
        assert_eq!(h.data_start() % 8, 0);
        let stored = &h.metadata()["digest"];
        assert_ne!(stored, DIGEST_PLACEHOLDER);
        assert_eq!(*stored, content_digest(&h, &bytes, "digest"));
    }

    #[test]
    fn unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let plan = vec![TensorPlan::new("a", DType::U8, vec![2])];
        let w = SafetensorsWriter::create(&path, plan.clone(), BTreeMap::new(), None, false).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let w = SafetensorsWriter::create(&path, plan, BTreeMap::new(), None, false).unwrap();
        assert!(matches!(w.finish(), Err(FormatError::WriteIncomplete { missing: 1, .. })));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
