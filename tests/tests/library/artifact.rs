//! The artifact format: round trips, one error per broken rule, and mutated / truncated files.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use delta_format::artifact::{write_artifact, ArtifactContents, SideFile, DIGEST_KEY};
use delta_format::fingerprint::{BaseFingerprint, FingerprintEntry};
use delta_format::safetensors::SafetensorsWriter;
use delta_format::{CompressedWeight, DType, DeltaArtifact, FormatError, ScaleMode, SignMask, TensorPlan, TensorView};
use delta_tests::Rng;
use proptest::prelude::*;

fn fake_digest(seed: usize) -> String {
    format!("{:064x}", seed)
}

fn fingerprint(entries: &[(&str, DType, Vec<usize>)]) -> BaseFingerprint {
    let tensors = entries
        .iter()
        .enumerate()
        .map(|(k, (n, d, s))| (n.to_string(), FingerprintEntry { dtype: d.name().into(), shape: s.clone(), digest: fake_digest(k) }))
        .collect();
    BaseFingerprint { hash: "blake3".into(), tensors }
}

fn random_weight(name: &str, rows: usize, cols: usize, mode: ScaleMode, rng: &mut Rng) -> CompressedWeight<'static> {
    let deltas: Vec<f32> = (0..rows * cols).map(|_| rng.uniform()).collect();
    let n = mode.scale_len(rows, cols).unwrap();
    CompressedWeight {
        name: Cow::Owned(name.into()),
        mode,
        signs: SignMask::from_deltas(rows, cols, &deltas),
        scales: (0..n).map(|_| rng.uniform().abs()).collect::<Vec<f32>>().into(),
    }
}

/// A small artifact: `weights` compressed weights of odd widths in the given modes and one
/// whole bf16 norm. Returns its bytes.
fn small_artifact(dir: &Path, modes: &[ScaleMode], seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut entries = vec![("norm.weight", DType::BF16, vec![7])];
    let names: Vec<String> = (0..modes.len()).map(|i| format!("model.layers.{i}.mlp.up_proj.weight")).collect();
    let shapes: Vec<(usize, usize)> = (0..modes.len()).map(|i| (3 + i, 33 + 17 * i)).collect();
    for (n, &(r, c)) in names.iter().zip(&shapes) {
        entries.push((n.as_str(), DType::BF16, vec![r, c]));
    }
    let base = fingerprint(&entries);
    let weights: Vec<CompressedWeight<'static>> =
        names.iter().zip(&shapes).zip(modes).map(|((n, &(r, c)), &m)| random_weight(n, r, c, m, &mut rng)).collect();
    let norm: Vec<u8> = (0..7).flat_map(|i| half::bf16::from_f32(1.0 + i as f32 / 8.0).to_le_bytes()).collect();
    let shape = [7usize];
    let contents = ArtifactContents {
        producer: "test".into(),
        architecture: "LlamaForCausalLM".into(),
        base: &base,
        weights: &weights,
        whole: vec![("norm.weight".into(), TensorView { dtype: DType::BF16, shape: &shape, data: &norm })],
        files: BTreeMap::from([("config.json".into(), SideFile::Utf8("{}".into())), ("tokenizer.model".into(), SideFile::from_bytes(vec![0xff, 0, 1]))]),
        notes: BTreeMap::from([("compression".into(), "{\"scale\":\"test\"}".into())]),
    };
    let path = dir.join(format!("a{seed}.bitdelta.safetensors"));
    write_artifact(&path, &contents, false).unwrap();
    std::fs::read(&path).unwrap()
}

/// Everything a reader can observe of an artifact, for equality checks.
fn observe(a: &DeltaArtifact) -> (delta_format::ArtifactMetadata, Vec<CompressedWeight<'static>>, Vec<(String, Vec<u8>)>) {
    let weights = a.weights().map(|w| CompressedWeight { name: Cow::Owned(w.name.to_string()), mode: w.mode, signs: w.signs.into_owned(), scales: Cow::Owned(w.scales.to_vec()) }).collect();
    let whole = a.whole_tensors().map(|(n, v)| (n.to_string(), v.data.to_vec())).collect();
    (a.metadata().clone(), weights, whole)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn write_then_read_round_trips_every_mode_and_odd_width(
        shapes in prop::collection::vec((1usize..20, 1usize..140, prop::sample::select(ScaleMode::ALL.to_vec())), 1..6),
        seed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(seed);
        let names: Vec<String> = (0..shapes.len()).map(|i| format!("model.layers.{i}.self_attn.q_proj.weight")).collect();
        let entries: Vec<(&str, DType, Vec<usize>)> = names.iter().zip(&shapes).map(|(n, &(r, c, _))| (n.as_str(), DType::F16, vec![r, c])).collect();
        let base = fingerprint(&entries);
        let weights: Vec<_> = names.iter().zip(&shapes).map(|(n, &(r, c, m))| random_weight(n, r, c, m, &mut rng)).collect();
        let contents = ArtifactContents {
            producer: "p".into(), architecture: "a".into(), base: &base, weights: &weights,
            whole: vec![], files: BTreeMap::new(), notes: BTreeMap::new(),
        };
        let path = dir.path().join("x.bitdelta.safetensors");
        write_artifact(&path, &contents, false).unwrap();
        let a = DeltaArtifact::open(&path).unwrap();
        prop_assert_eq!(&a.metadata().base, &base);
        for w in &weights {
            let got = a.weight(&w.name).unwrap();
            prop_assert_eq!(got.mode, w.mode);
            prop_assert_eq!(got.signs.words(), w.signs.words());
            prop_assert_eq!(&got.scales[..], &w.scales[..]);
            prop_assert!(matches!(got.signs.words().as_ptr() as usize % 4, 0));
        }
        // And the reference crate reads it as a plain safetensors file.
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        prop_assert_eq!(st.len(), 2 * weights.len());
    }
}

#[test]
fn side_files_whole_tensors_and_notes_survive() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_artifact(dir.path(), &ScaleMode::ALL, 1);
    let a = DeltaArtifact::from_bytes(bytes).unwrap();
    let m = a.metadata();
    assert_eq!(m.files["tokenizer.model"].to_bytes().unwrap(), vec![0xff, 0, 1]);
    assert!(matches!(m.files["tokenizer.model"], SideFile::Base64(_)));
    assert_eq!(m.notes["compression"], "{\"scale\":\"test\"}");
    assert_eq!(a.whole_tensors().count(), 1);
    assert_eq!(a.weights().count(), 4);
    assert!(a.whole_tensor("model.layers.0.mlp.up_proj.weight.sign").is_none());
}

/// Writes a file with arbitrary tensors and metadata (with a valid digest), for rule tests.
fn crafted(tensors: Vec<(&str, DType, Vec<usize>, Vec<u8>)>, md: BTreeMap<String, String>) -> Result<DeltaArtifact, FormatError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let plan = tensors.iter().map(|(n, d, s, _)| TensorPlan::new(*n, *d, s.clone())).collect();
    let mut w = SafetensorsWriter::create(&path, plan, md, Some(DIGEST_KEY), false).unwrap();
    for t in w.order().to_vec() {
        let data = &tensors.iter().find(|x| x.0 == t.name).unwrap().3;
        w.write_tensor(&t.name, data).unwrap();
    }
    w.finish().unwrap();
    DeltaArtifact::open(&path)
}

fn words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn floats(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn each_artifact_rule_has_its_error() {
    let base = fingerprint(&[("w", DType::BF16, vec![2, 33]), ("n", DType::BF16, vec![2])]);
    let md = |weights: &str| -> BTreeMap<String, String> {
        BTreeMap::from([
            ("format".into(), "bitdelta".into()),
            ("format_version".into(), "1".into()),
            ("producer".into(), "t".into()),
            ("architecture".into(), "a".into()),
            ("weights".into(), weights.into()),
            ("base".into(), serde_json::to_string(&base).unwrap()),
        ])
    };
    let good_w = r#"{"w":{"mode":"per-output","shape":[2,33]}}"#;
    let sign = || ("w.sign", DType::U32, vec![2, 2], words(&[5, 1, 7, 0]));
    let scale = || ("w.scale", DType::F32, vec![2], floats(&[0.1, 0.2]));
    assert!(crafted(vec![sign(), scale()], md(good_w)).is_ok(), "the baseline is valid");

    let with = |k: &str, v: Option<&str>| {
        let mut m = md(good_w);
        match v {
            Some(v) => m.insert(k.into(), v.into()),
            None => m.remove(k),
        };
        m
    };
    use FormatError as E;
    let check = |r: Result<DeltaArtifact, FormatError>, ok: fn(&FormatError) -> bool, what: &str| {
        let e = r.err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(ok(&e), "{what}: wrong error {e}");
        assert!(!e.to_string().contains('\n'));
    };
    check(crafted(vec![sign(), scale()], with("format", None)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::NotAnArtifact { found: None })), "no format");
    check(crafted(vec![sign(), scale()], with("format_version", Some("2"))), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::UnsupportedVersion { .. })), "version 2");
    check(crafted(vec![sign(), scale()], with("weights", None)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::MissingMetadata { key: "weights" })), "no weights");
    check(crafted(vec![sign(), scale()], with("weights", Some("[1]"))), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::BadArtifactMetadata { key: "weights", .. })), "weights not a table");
    check(crafted(vec![sign(), scale()], with("base", Some("{}"))), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::BadArtifactMetadata { key: "base", .. })), "bad base");
    check(crafted(vec![sign(), scale()], md(r#"{"w":{"mode":"group-128","shape":[2,33]}}"#)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::UnknownScaleMode { .. })), "unknown mode");
    check(crafted(vec![sign(), scale()], md(r#"{"w":{"mode":"scalar","shape":[2,32]}}"#)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::TensorShape { .. })), "shape differs from base");
    check(crafted(vec![scale()], md(good_w)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(&**source, E::MissingTensor { name } if name == "w.sign")), "missing sign");
    check(crafted(vec![("w.sign", DType::I32, vec![2, 2], words(&[0; 4])), scale()], md(good_w)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::TensorDType { expected: DType::U32, found: DType::I32, .. })), "sign dtype");
    check(crafted(vec![sign(), ("w.scale", DType::F32, vec![33], floats(&[0.1; 33]))], md(good_w)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::TensorShape { .. })), "scale length");
    check(crafted(vec![("w.sign", DType::U32, vec![2, 2], words(&[5, 1, 7, 2])), scale()], md(good_w)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::NonZeroPadding { row: 1, cols: 33, .. })), "padding");
    check(crafted(vec![sign(), ("w.scale", DType::F32, vec![2], floats(&[0.1, f32::NAN]))], md(good_w)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::NonFinite { index: 1, .. })), "nan scale");
    check(crafted(vec![sign(), scale(), ("extra", DType::F32, vec![1], floats(&[1.0]))], md(good_w)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(&**source, E::UnexpectedTensor { name } if name == "extra")), "unexpected tensor");
    check(crafted(vec![sign(), scale(), ("n", DType::F32, vec![2], floats(&[1.0, 1.0]))], md(good_w)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::TensorDType { expected: DType::BF16, found: DType::F32, .. })), "whole dtype");
    check(crafted(vec![sign(), scale(), ("n", DType::BF16, vec![2], vec![0x80, 0x7f, 0, 0])], md(good_w)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::NonFinite { index: 0, .. })), "inf in whole tensor");
    check(crafted(vec![sign(), scale(), ("w", DType::BF16, vec![2, 33], vec![0; 132])], md(good_w)), |e| matches!(e, E::InFile { inner: source, .. } if matches!(**source, E::UnexpectedTensor { .. })), "weight both compressed and whole");

    // A digest that no longer matches the content.
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = small_artifact(dir.path(), &[ScaleMode::Scalar], 2);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    assert!(matches!(DeltaArtifact::from_bytes(bytes), Err(E::DigestMismatch { .. })));
}

/// At least 100,000 mutated or truncated artifacts: none may panic; each is either refused with
/// an error, or (for edits the format cannot see, like JSON whitespace) reads back identical.
#[test]
fn mutated_and_truncated_artifacts_never_panic_and_never_read_differently() {
    use rayon::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let originals: Vec<Vec<u8>> = vec![
        small_artifact(dir.path(), &[ScaleMode::Scalar, ScaleMode::PerOutput], 3),
        small_artifact(dir.path(), &[ScaleMode::PerInput, ScaleMode::TwoSided, ScaleMode::Scalar], 4),
    ];
    let expected: Vec<_> = originals.iter().map(|b| observe(&DeltaArtifact::from_bytes(b.clone()).unwrap())).collect();
    const N: u64 = 100_000;
    let outcomes: Vec<(bool, String)> = (0..N)
        .into_par_iter()
        .map(|i| {
            let mut rng = Rng::new(i + 17);
            let which = (i % 2) as usize;
            let mut b = originals[which].clone();
            let header_end = 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            match rng.below(6) {
                0 => b.truncate(rng.below(b.len())),
                1 => {
                    // Flip bits in the header, where the structure lives.
                    for _ in 0..1 + rng.below(3) {
                        let k = rng.below(header_end);
                        b[k] ^= 1 << rng.below(8);
                    }
                }
                2 => {
                    let k = rng.below(b.len());
                    b[k] = rng.next_u64() as u8;
                }
                3 => {
                    let k = rng.below(b.len());
                    b.insert(k, rng.next_u64() as u8);
                }
                4 => {
                    let k = rng.below(b.len());
                    b.remove(k);
                }
                _ => {
                    // Re-point the header length.
                    let len = (header_end - 8) as i64 + rng.below(64) as i64 - 32;
                    b[..8].copy_from_slice(&(len.max(0) as u64).to_le_bytes());
                }
            }
            match DeltaArtifact::from_bytes(b) {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(!msg.is_empty() && !msg.contains('\n'), "bad message: {msg:?}");
                    (false, format!("{:?}", std::mem::discriminant(&e)))
                }
                Ok(a) => {
                    assert!(observe(&a) == expected[which], "mutation {i} was accepted and reads differently");
                    (true, String::new())
                }
            }
        })
        .collect();
    let accepted = outcomes.iter().filter(|o| o.0).count();
    let kinds: std::collections::BTreeSet<&String> = outcomes.iter().filter(|o| !o.0).map(|o| &o.1).collect();
    eprintln!("{N} mutations: {accepted} harmless, {} refused with {} distinct error kinds", N as usize - accepted, kinds.len());
    assert!(accepted < (N / 100) as usize, "{accepted} mutations accepted: the digest should catch almost all");
    assert!(kinds.len() >= 6, "only {} error kinds seen", kinds.len());
}
