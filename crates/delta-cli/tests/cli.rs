//! End-to-end tests of the `bitdelta` binary: on the real SmolLM2 pair where the issue asks for
//! it, on small synthetic folders (written by the reference safetensors crate) for the refusals.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use delta_tests::{read_tensors, smollm2, synthetic_pair, write_folder, RawTensor};
use safetensors::Dtype;

fn bitdelta(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitdelta")).args(args).output().expect("run bitdelta")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "bitdelta failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect()
}

/// Asserts a refusal: exit status 1, one line on stderr that contains `needle`, nothing on
/// stdout, and nothing new in `dir` (no output, no temporary).
fn refused(out: &Output, needle: &str, dir: &Path, before: &BTreeSet<String>) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1, got {:?}; stderr: {err}", out.status.code());
    assert_eq!(err.trim_end().lines().count(), 1, "stderr is not one line: {err}");
    assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
    // Each cause once: an error that prints its cause must not also hand it on as its source.
    let parts: Vec<&str> = err.trim_end().split(": ").filter(|p| p.len() > 8).collect();
    assert!(parts.iter().enumerate().all(|(i, p)| !parts[..i].contains(p)), "stderr repeats itself: {err}");
    assert!(out.stdout.is_empty(), "stdout not empty");
    assert_eq!(&listing(dir), before, "something was left behind in {}", dir.display());
}

fn bf16_to_f32(b: &[u8]) -> f32 {
    half::bf16::from_le_bytes([b[0], b[1]]).to_f32()
}

fn is_linear(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

#[test]
fn scalar_compress_then_apply_is_bit_exact_on_the_real_pair() {
    let (base_dir, ft_dir) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let delta = tmp.path().join("ft.bitdelta.safetensors");
    let out_dir = tmp.path().join("restored");
    ok(&bitdelta(&["compress", "--base", s(&base_dir), "--finetuned", s(&ft_dir), "-o", s(&delta), "--calibrate", "none", "--scale", "scalar"]));
    let summary: serde_json::Value =
        serde_json::from_str(&ok(&bitdelta(&["apply", "--base", s(&base_dir), "--delta", s(&delta), "-o", s(&out_dir), "--json"]))).unwrap();
    assert_eq!(summary["merged"], 210);

    let base = read_tensors(&base_dir.join("model.safetensors"));
    let ft = read_tensors(&ft_dir.join("model.safetensors"));
    let out = read_tensors(&out_dir.join("model.safetensors"));
    assert_eq!(out.len(), base.len());
    let (mut linear, mut norms, mut same) = (0, 0, 0);
    for (name, (dtype, shape, b)) in &base {
        let (odtype, oshape, o) = &out[name];
        assert_eq!((odtype, oshape), (dtype, shape), "{name}");
        let f = &ft[name].2;
        if is_linear(name) {
            // Recomputed here from the two checkpoints: α = mean |Δ|, W = bf16(base + α·sign(Δ)).
            let deltas: Vec<f32> = b.chunks_exact(2).zip(f.chunks_exact(2)).map(|(b, f)| bf16_to_f32(f) - bf16_to_f32(b)).collect();
            let alpha = (deltas.iter().map(|d| d.abs() as f64).sum::<f64>() / deltas.len() as f64) as f32;
            let expected: Vec<u8> = b
                .chunks_exact(2)
                .zip(&deltas)
                .flat_map(|(b, &d)| half::bf16::from_f32(bf16_to_f32(b) + if d > 0.0 { alpha } else { -alpha }).to_le_bytes())
                .collect();
            assert!(expected == *o, "{name}: merged weight differs from base + mean|Δ|·sign(Δ)");
            linear += 1;
        } else if b != f {
            assert!(o == f, "{name}: changed tensor differs from the fine-tune's");
            norms += 1;
        } else {
            assert!(o == b, "{name}: unchanged tensor differs from the base's");
            same += 1;
        }
    }
    assert_eq!((linear, norms, same), (210, 60, 2));
    for side in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(out_dir.join(side)).unwrap(), std::fs::read(ft_dir.join(side)).unwrap(), "{side}");
    }

    let inspect: serde_json::Value = serde_json::from_str(&ok(&bitdelta(&["inspect", s(&delta), "--json"]))).unwrap();
    assert_eq!(inspect["compressed"], 210);
    assert_eq!(inspect["whole"], 60);
    assert_eq!(inspect["unchanged"], 2);
    let file_bytes = inspect["file_bytes"].as_u64().unwrap();
    assert_eq!(file_bytes, std::fs::metadata(&delta).unwrap().len());
    assert!(file_bytes <= 15_000_000, "artifact is {file_bytes} bytes");
    assert!(inspect["ratio"].as_f64().unwrap() >= 18.0);
}

#[test]
fn wrong_base_and_truncated_artifact_are_refused_on_the_real_pair() {
    let (base_dir, ft_dir) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let delta = tmp.path().join("ft.bitdelta.safetensors");
    ok(&bitdelta(&["compress", "--base", s(&base_dir), "--finetuned", s(&ft_dir), "-o", s(&delta), "--calibrate", "none"]));
    let before = listing(tmp.path());
    let out = tmp.path().join("out");

    // The fine-tune has the same names, dtypes and shapes as the base: only content differs.
    let r = bitdelta(&["apply", "--base", s(&ft_dir), "--delta", s(&delta), "-o", s(&out)]);
    refused(&r, "wrong base: tensor `model.layers.0.", tmp.path(), &before);

    let bytes = std::fs::read(&delta).unwrap();
    for (k, cut) in [bytes.len() - 1, bytes.len() / 2, 100, 5].into_iter().enumerate() {
        let short = tmp.path().join(format!("short{k}.bitdelta.safetensors"));
        std::fs::write(&short, &bytes[..cut]).unwrap();
        let before = listing(tmp.path());
        let r = bitdelta(&["apply", "--base", s(&base_dir), "--delta", s(&short), "-o", s(&out)]);
        let needle = if cut >= 8 { "truncated" } else { "too short" };
        refused(&r, needle, tmp.path(), &before);
        let r = bitdelta(&["inspect", s(&short)]);
        refused(&r, s(&short), tmp.path(), &before);
    }
}

fn pair_folders(tmp: &Path, edit: impl FnOnce(&mut Vec<RawTensor>, &mut Vec<RawTensor>)) -> (PathBuf, PathBuf) {
    let (mut base, mut ft) = synthetic_pair(Dtype::BF16, 2, 7);
    edit(&mut base, &mut ft);
    let (b, f) = (tmp.join("base"), tmp.join("ft"));
    write_folder(&b, &base);
    write_folder(&f, &ft);
    (b, f)
}

#[test]
fn bad_checkpoint_pairs_are_refused_without_output() {
    type Edit = Box<dyn FnOnce(&mut Vec<RawTensor>, &mut Vec<RawTensor>)>;
    let find = |v: &mut Vec<RawTensor>, n: &str| v.iter().position(|t| t.name == n).unwrap();
    let q = "model.layers.1.self_attn.q_proj.weight";
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("nan in fine-tune", Box::new(move |_, f| { let i = find(f, q); f[i].data[6..8].copy_from_slice(&half::bf16::NAN.to_le_bytes()); }), "fine-tune: tensor `model.layers.1.self_attn.q_proj.weight` holds NaN at index 3"),
        ("inf in base", Box::new(move |b, _| { let i = find(b, "model.norm.weight"); b[i].data[0..2].copy_from_slice(&half::bf16::NEG_INFINITY.to_le_bytes()); }), "base: tensor `model.norm.weight` holds -inf at index 0"),
        ("shape mismatch", Box::new(move |_, f| { let i = find(f, q); f[i].shape = vec![20, 80]; }), "shape [40, 40] in the base but [20, 80] in the fine-tune"),
        ("dtype mismatch", Box::new(move |_, f| { let i = find(f, q); let v = RawTensor::values(Dtype::BF16, &f[i].data); f[i] = RawTensor::from_f32(q, Dtype::F16, &[40, 40], &v); }), "dtype BF16 in the base but F16 in the fine-tune"),
        ("extra tensor", Box::new(|_, f| f.push(RawTensor::from_f32("lm_head.weight", Dtype::BF16, &[2, 2], &[1.0; 4]))), "the fine-tune has a tensor `lm_head.weight` that the base lacks"),
        ("missing tensor", Box::new(move |_, f| { let i = find(f, q); f.remove(i); }), "the base has a tensor `model.layers.1.self_attn.q_proj.weight` that the fine-tune lacks"),
    ];
    for (what, edit, needle) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (b, f) = pair_folders(tmp.path(), edit);
        let before = listing(tmp.path());
        let r = bitdelta(&["compress", "--base", s(&b), "--finetuned", s(&f), "-o", s(&tmp.path().join("d.bitdelta.safetensors")), "--calibrate", "none"]);
        eprintln!("case: {what}");
        refused(&r, needle, tmp.path(), &before);
    }
}

#[test]
fn existing_output_needs_force_and_nonsense_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (b, f) = pair_folders(tmp.path(), |_, _| {});
    let delta = tmp.path().join("d.bitdelta.safetensors");
    std::fs::write(&delta, "precious").unwrap();
    let before = listing(tmp.path());
    let r = bitdelta(&["compress", "--base", s(&b), "--finetuned", s(&f), "-o", s(&delta), "--calibrate", "none"]);
    refused(&r, "already exists (use --force", tmp.path(), &before);
    assert_eq!(std::fs::read_to_string(&delta).unwrap(), "precious");
    ok(&bitdelta(&["compress", "--base", s(&b), "--finetuned", s(&f), "-o", s(&delta), "--calibrate", "none", "--force"]));
    assert_eq!(listing(tmp.path()), before, "--force replaced the file in place");
    assert!(std::fs::read(&delta).unwrap().len() > 1000);

    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let before = listing(tmp.path());
    refused(&bitdelta(&["apply", "--base", s(&b), "--delta", s(&delta), "-o", s(&out)]), "already exists", tmp.path(), &before);
    assert!(out.join("keep.txt").exists());
    ok(&bitdelta(&["apply", "--base", s(&b), "--delta", s(&delta), "-o", s(&out), "--force"]));
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").exists());

    refused(&bitdelta(&["inspect", s(&tmp.path().join("nope"))]), "No such file", tmp.path(), &listing(tmp.path()));
    refused(&bitdelta(&["inspect", s(&b)]), "a folder, where a file was expected", tmp.path(), &listing(tmp.path()));
    refused(&bitdelta(&["inspect", s(&b.join("model.safetensors"))]), "not a bitdelta artifact: metadata key `format` is \"pt\", expected \"bitdelta\"", tmp.path(), &listing(tmp.path()));
    let json = tmp.path().join("settings.json");
    std::fs::write(&json, r#"{"not": "safetensors"}"#).unwrap();
    refused(&bitdelta(&["inspect", s(&json)]), "(not a safetensors file?)", tmp.path(), &listing(tmp.path()));
    let weights = b.join("model.safetensors");
    refused(&bitdelta(&["generate", "--model", s(&weights), "--prompt", "Hi"]), "where a model folder", tmp.path(), &listing(tmp.path()));
    let lost = tmp.path().join("no/such/dir/d.bitdelta.safetensors");
    refused(&bitdelta(&["compress", "--base", s(&b), "--finetuned", s(&f), "-o", s(&lost), "--calibrate", "none"]), "output folder", tmp.path(), &listing(tmp.path()));
    refused(&bitdelta(&["apply", "--base", s(&tmp.path().join("nope")), "--delta", s(&delta), "-o", s(&tmp.path().join("o2"))]), "no such model folder", tmp.path(), &listing(tmp.path()));
    for args in [
        vec!["compress", "--base", s(&b), "--finetuned", s(&f), "-o", "x", "--scale", "sideways"],
        vec!["compress", "--base", s(&b), "--finetuned", s(&f), "-o", "x", "--calibrate", "psychic"],
        vec!["apply", "--base", s(&b), "--delta", s(&delta), "-o", "x", "--max-shard-size", "lots"],
        vec!["frobnicate"],
    ] {
        let r = bitdelta(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: stderr is not one line: {err}");
    }
}

/// The base passed as its own fine-tune: an empty delta, written without calibrating (there is
/// nothing to fit, so no text is read into a model and no report is written), that gives the
/// base back.
#[test]
fn a_fine_tune_equal_to_its_base_gives_an_empty_delta_without_calibrating() {
    let tmp = tempfile::tempdir().unwrap();
    let (b, _) = pair_folders(tmp.path(), |_, _| {});
    // Far too little text for calibration: the run must not get as far as needing it.
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, "A few words.").unwrap();
    let delta = tmp.path().join("d.bitdelta.safetensors");
    let r = bitdelta(&["compress", "--base", s(&b), "--finetuned", s(&b), "-o", s(&delta), "--calib-text", s(&text), "--json"]);
    let summary: serde_json::Value = serde_json::from_str(&ok(&r)).unwrap();
    assert!(String::from_utf8_lossy(&r.stderr).contains("nothing to calibrate"), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!((summary["compressed"].as_u64(), summary["whole"].as_array().map(Vec::len)), (Some(0), Some(0)));
    assert_eq!(summary["calibration"], "none");
    assert!(summary["mean_rel_error"].is_null() && summary["max_rel_error"].is_null(), "{summary}");
    let written: BTreeSet<String> = ["base", "ft", "text.txt", "d.bitdelta.safetensors"].map(String::from).into();
    assert_eq!(listing(tmp.path()), written, "no calibration report beside the delta");

    let inspect: serde_json::Value = serde_json::from_str(&ok(&bitdelta(&["inspect", s(&delta), "--json"]))).unwrap();
    assert_eq!((inspect["compressed"].as_u64(), inspect["whole"].as_u64()), (Some(0), Some(0)));
    let out = tmp.path().join("restored");
    ok(&bitdelta(&["apply", "--base", s(&b), "--delta", s(&delta), "-o", s(&out)]));
    let (base, restored) = (read_tensors(&b.join("model.safetensors")), read_tensors(&out.join("model.safetensors")));
    assert_eq!(restored, base);
}

/// Expected merged values for a one-weight formula, computed here from the definition.
fn expected_merge(mode: &str, base: &[f32], ft: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let d: Vec<f32> = ft.iter().zip(base).map(|(f, b)| f - b).collect();
    let row_sum: Vec<f64> = (0..rows).map(|i| (0..cols).map(|j| d[i * cols + j].abs() as f64).sum()).collect();
    let col_sum: Vec<f64> = (0..cols).map(|j| (0..rows).map(|i| d[i * cols + j].abs() as f64).sum()).collect();
    let mean = row_sum.iter().sum::<f64>() / (rows * cols) as f64;
    let scale = |i: usize, j: usize| -> f32 {
        match mode {
            "scalar" => mean as f32,
            "per-output" => (row_sum[i] / cols as f64) as f32,
            "per-input" => (col_sum[j] / rows as f64) as f32,
            "two-sided" => (row_sum[i] / cols as f64) as f32 * (col_sum[j] / rows as f64 / mean) as f32,
            m => panic!("{m}"),
        }
    };
    (0..rows * cols).map(|k| base[k] + if d[k] > 0.0 { scale(k / cols, k % cols) } else { -scale(k / cols, k % cols) }).collect()
}

#[test]
fn every_mode_and_dtype_round_trips_through_sharded_folders() {
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        let tmp = tempfile::tempdir().unwrap();
        let (base, ft) = synthetic_pair(dtype, 3, 11);
        let (b, f) = (tmp.path().join("base"), tmp.path().join("ft"));
        write_folder(&b, &base);
        write_folder(&f, &ft);
        // A sharded copy of the base: apply the empty delta (base against itself) with a tiny
        // shard size. Every compress/apply below reads the base from the shards.
        let ident = tmp.path().join("ident.bitdelta.safetensors");
        ok(&bitdelta(&["compress", "--base", s(&b), "--finetuned", s(&b), "-o", s(&ident), "--calibrate", "none"]));
        let sharded = tmp.path().join("base-sharded");
        ok(&bitdelta(&["apply", "--base", s(&b), "--delta", s(&ident), "-o", s(&sharded), "--max-shard-size", "20kB"]));
        let shards: Vec<String> = listing(&sharded).into_iter().filter(|n| n.ends_with(".safetensors")).collect();
        assert!(shards.len() > 3 && shards[0].starts_with("model-00001-of-"), "{shards:?}");
        let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap()).unwrap();
        assert_eq!(index["weight_map"].as_object().unwrap().len(), base.len());

        let by_name: HashMap<&str, &RawTensor> = base.iter().map(|t| (t.name.as_str(), t)).collect();
        let ft_by_name: HashMap<&str, &RawTensor> = ft.iter().map(|t| (t.name.as_str(), t)).collect();
        for mode in ["scalar", "per-output", "per-input", "two-sided"] {
            let delta = tmp.path().join(format!("{mode}.bitdelta.safetensors"));
            let out = tmp.path().join(format!("out-{mode}"));
            ok(&bitdelta(&["compress", "--base", s(&sharded), "--finetuned", s(&f), "-o", s(&delta), "--calibrate", "none", "--scale", mode]));
            ok(&bitdelta(&["apply", "--base", s(&sharded), "--delta", s(&delta), "-o", s(&out)]));
            let merged = read_tensors(&out.join("model.safetensors"));
            for (name, (odtype, shape, data)) in &merged {
                assert_eq!(*odtype, dtype);
                let (bt, ftt) = (by_name[name.as_str()], ft_by_name[name.as_str()]);
                let expected: Vec<u8> = if is_linear(name) {
                    let vals = expected_merge(mode, &RawTensor::values(dtype, &bt.data), &RawTensor::values(dtype, &ftt.data), shape[0], shape[1]);
                    RawTensor::from_f32(name, dtype, shape, &vals).data
                } else {
                    ftt.data.clone()
                };
                assert!(expected == *data, "{dtype:?} {mode} {name}");
            }
        }
    }
}

/// Spawns `args`, waits until a temporary appears next to `dest`, and SIGKILLs the process.
fn kill_mid_write(args: &[&str], dest: &Path) {
    let parent = dest.parent().unwrap();
    let name = dest.file_name().unwrap().to_string_lossy().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitdelta")).args(args).spawn().unwrap();
    let temp_prefix = format!(".{name}.tmp-{}-", child.id());
    // Poll for the temporary (bounded: 600,000 polls of 200 µs is two minutes at most).
    for poll in 0.. {
        if listing(parent).iter().any(|n| n.starts_with(&temp_prefix)) {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "{args:?} finished before it could be killed mid-write");
        assert!(poll < 600_000, "no temporary appeared");
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "process was not killed");
    assert!(!dest.exists(), "{} exists after a kill mid-write", dest.display());
    assert!(listing(parent).iter().any(|n| n.starts_with(&temp_prefix)), "the kill did not land while writing");
}

#[test]
fn a_process_killed_while_writing_leaves_nothing_under_the_final_name() {
    let (base_dir, ft_dir) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let delta = tmp.path().join("ft.bitdelta.safetensors");
    kill_mid_write(&["compress", "--base", s(&base_dir), "--finetuned", s(&ft_dir), "-o", s(&delta), "--calibrate", "none", "--scale", "scalar"], &delta);
    ok(&bitdelta(&["compress", "--base", s(&base_dir), "--finetuned", s(&ft_dir), "-o", s(&delta), "--calibrate", "none", "--scale", "scalar"]));
    let out = tmp.path().join("restored");
    kill_mid_write(&["apply", "--base", s(&base_dir), "--delta", s(&delta), "-o", s(&out)], &out);
}

/// `generate` on the real fine-tune: greedy from the reference prompt's ids starts with the
/// argmax of the reference's last logits; `--chat` builds the prompt with the model's ChatML
/// template and answers; bad flags and a model without a chat template are one-line refusals.
#[test]
fn generate_follows_the_reference_and_refuses_bad_requests() {
    let (_, ft) = smollm2();
    let reference = read_tensors(&delta_tests::fixtures().join("smollm2/reference_logits.safetensors"));
    let i32s = |name: &str| -> Vec<i32> { reference[name].2.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect() };
    let last: Vec<f32> = reference["story.finetuned.last_logits"].2.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let argmax = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b });
    let ids: Vec<String> = i32s("story.input_ids").iter().map(|i| i.to_string()).collect();
    let out = ok(&bitdelta(&["generate", "--model", s(&ft), "--prompt-ids", &ids.join(","), "--max-new-tokens", "3", "--json"]));
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(g["tokens"][0].as_u64(), Some(argmax as u64), "{g}");
    assert_eq!(g["prompt_tokens"].as_u64(), Some(ids.len() as u64));

    let out = ok(&bitdelta(&["generate", "--model", s(&ft), "--chat", "--prompt", "Tell me a story.", "--max-new-tokens", "12", "--json"]));
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    // <|im_start|> (id 1) opens the template's system turn; the prompt ends with "assistant\n".
    let prompt: Vec<u64> = g["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(prompt[0], 1);
    assert_eq!(g["generated_tokens"].as_u64(), Some(12), "{g}");
    assert!(g["text"].as_str().unwrap().split_whitespace().count() >= 5, "{g}");

    let tmp = tempfile::tempdir().unwrap();
    let no_template = tmp.path().join("model");
    delta_tests::linked_copy(&ft, &no_template, |file, _, _| file == "tokenizer_config.json");
    let before_model = listing(&no_template);
    let before = listing(tmp.path());
    refused(&bitdelta(&["generate", "--model", s(&no_template), "--chat", "--prompt", "hi"]), "no chat template", &no_template, &before_model);
    refused(&bitdelta(&["generate", "--model", s(&ft), "--prompt", "hi", "--temperature", "-1"]), "--temperature", tmp.path(), &before);
    // A negative exponent is still a number (clap alone took `-1e-3` for the flag `-1`).
    refused(&bitdelta(&["generate", "--model", s(&ft), "--prompt", "hi", "--temperature", "-1e-3"]), "temperature -0.001 is not a finite number", tmp.path(), &before);
    refused(&bitdelta(&["generate", "--model", s(&ft), "--prompt", "hi", "--temperature", "nan"]), "--temperature", tmp.path(), &before);
    refused(&bitdelta(&["generate", "--model", s(&ft), "--prompt", ""]), "no tokens", tmp.path(), &before);
    let long = ["generate", "--model", s(&ft), "--prompt-ids", "1,2", "--max-new-tokens", "8191"];
    refused(&bitdelta(&long), "2 prompt tokens + --max-new-tokens 8191 exceed the model's context of 8192 tokens", tmp.path(), &before);
    refused(&bitdelta(&["generate", "--model", s(&tmp.path().join("missing")), "--prompt", "hi"]), "missing", tmp.path(), &before);
    #[cfg(not(feature = "cuda"))]
    refused(&bitdelta(&["generate", "--model", s(&ft), "--prompt", "hi", "--device", "cuda"]), "--features cuda", tmp.path(), &before);
    for bad in [
        vec!["generate", "--model", s(&ft)],
        vec!["generate", "--model", s(&ft), "--prompt", "hi", "--system", "x"],
        vec!["generate", "--model", s(&ft), "--prompt", "hi", "--max-new-tokens", "0"],
        vec!["generate", "--model", s(&ft), "--prompt-ids", "1,x"],
    ] {
        let out = bitdelta(&bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stderr).trim_end().lines().count(), 1);
    }
}

/// A fine-tune whose chat template and `config.json` differ from the base's ships them in its
/// delta, and `--delta` uses them as the merged folder `apply` writes does: the same chat prompt
/// (its template's extra first turn included), the same greedy tokens, the fine-tune's context.
#[test]
fn a_delta_speaks_with_the_fine_tunes_own_template_and_config() {
    let (base, ft) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let own = tmp.path().join("own");
    delta_tests::with_own_files(&ft, &own, |config| config["max_position_embeddings"] = 64.into());
    let delta = tmp.path().join("own.bitdelta.safetensors");
    ok(&bitdelta(&["compress", "--base", s(&base), "--finetuned", s(&own), "-o", s(&delta), "--scale", "scalar", "--calibrate", "none", "--json"]));
    let info: serde_json::Value = serde_json::from_str(&ok(&bitdelta(&["inspect", s(&delta), "--json"]))).unwrap();
    assert_eq!(info["side_files"], serde_json::json!(["config.json", "tokenizer_config.json"]), "{}", info["side_files"]);
    let merged = tmp.path().join("merged");
    ok(&bitdelta(&["apply", "--base", s(&base), "--delta", s(&delta), "-o", s(&merged), "--json"]));

    let chat = |model: &[&str]| -> serde_json::Value {
        let args = [&["generate"][..], model, &["--chat", "--prompt", "Tell me a story.", "--max-new-tokens", "8", "--json"]].concat();
        serde_json::from_str(&ok(&bitdelta(&args))).unwrap()
    };
    let (applied, written, plain) = (chat(&["--model", s(&base), "--delta", s(&delta)]), chat(&["--model", s(&merged)]), chat(&["--model", s(&ft)]));
    let ids = |g: &serde_json::Value, key: &str| -> Vec<u64> { g[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect() };
    assert_eq!(ids(&applied, "prompt_ids"), ids(&written, "prompt_ids"));
    assert_eq!(ids(&applied, "tokens"), ids(&written, "tokens"));
    // The fine-tune's prompt behind the extra turn: <|im_start|> (1), "system", ..., <|im_end|> (2), "\n".
    let (own_prompt, plain_prompt) = (ids(&applied, "prompt_ids"), ids(&plain, "prompt_ids"));
    assert!(own_prompt.len() > plain_prompt.len() + 4 && own_prompt.ends_with(&plain_prompt), "{own_prompt:?} vs {plain_prompt:?}");
    assert_eq!((own_prompt[0], own_prompt[own_prompt.len() - plain_prompt.len() - 2]), (1, 2));

    let before = listing(tmp.path());
    let long = ["generate", "--model", s(&base), "--delta", s(&delta), "--prompt-ids", "1,2", "--max-new-tokens", "63"];
    refused(&bitdelta(&long), "2 prompt tokens + --max-new-tokens 63 exceed the model's context of 64 tokens", tmp.path(), &before);
}

/// A fine-tune that added tokens to its vocabulary: its embedding travels whole with its new rows,
/// its config and tokenizer with it; layer-wise calibration runs on it; `--delta` reads a prompt
/// with the new tokens and answers exactly as the folder `apply` writes — which is the
/// fine-tune's own, tensor for tensor.
#[test]
fn a_fine_tune_with_added_tokens_compresses_applies_and_generates() {
    let (base, ft) = smollm2();
    let fx = delta_tests::fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let grown = tmp.path().join("grown");
    delta_tests::with_added_tokens(&ft, &grown);
    let delta = tmp.path().join("grown.bitdelta.safetensors");
    let text = fx.join("text/tiny_train.utf8");
    let args = ["compress", "--base", s(&base), "--finetuned", s(&grown), "-o", s(&delta), "--calibrate", "layerwise", "--calib-text", s(&text)];
    let report: serde_json::Value = serde_json::from_str(&ok(&bitdelta(&[&args[..], &["--calib-samples", "4", "--calib-len", "32", "--json"]].concat()))).unwrap();
    assert_eq!(report["calibration"], "layerwise", "{report}");
    let info: serde_json::Value = serde_json::from_str(&ok(&bitdelta(&["inspect", s(&delta), "--json"]))).unwrap();
    assert_eq!(info["side_files"], serde_json::json!(["config.json", "tokenizer.json"]), "{}", info["side_files"]);
    let embedding = info["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "model.embed_tokens.weight").expect("the embedding is stored");
    assert_eq!((embedding["mode"].as_str(), embedding["shape"].clone()), (Some("whole"), serde_json::json!([49155, 576])));

    let merged = tmp.path().join("merged");
    ok(&bitdelta(&["apply", "--base", s(&base), "--delta", s(&delta), "-o", s(&merged), "--json"]));
    let (written, own) = (read_tensors(&merged.join("model.safetensors")), read_tensors(&grown.join("model.safetensors")));
    assert_eq!(written["model.embed_tokens.weight"], own["model.embed_tokens.weight"]);
    assert_eq!(written["model.norm.weight"], own["model.norm.weight"]);

    let prompt = format!("{}Once upon a time{}", delta_tests::ADDED_TOKENS[0], delta_tests::ADDED_TOKENS[2]);
    let run = |model: &[&str]| -> serde_json::Value {
        let args = [&["generate"][..], model, &["--prompt", &prompt, "--max-new-tokens", "6", "--json"]].concat();
        serde_json::from_str(&ok(&bitdelta(&args))).unwrap()
    };
    let (applied, from_folder) = (run(&["--model", s(&base), "--delta", s(&delta)]), run(&["--model", s(&merged)]));
    let ids = |g: &serde_json::Value, key: &str| -> Vec<u64> { g[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect() };
    let prompt_ids = ids(&applied, "prompt_ids");
    assert_eq!((prompt_ids[0], *prompt_ids.last().unwrap()), (49152, 49154), "{prompt_ids:?}");
    assert_eq!(prompt_ids, ids(&from_folder, "prompt_ids"));
    assert_eq!(ids(&applied, "tokens"), ids(&from_folder, "tokens"));
    // The base alone has no such tokens.
    let before = listing(tmp.path());
    refused(&bitdelta(&["generate", "--model", s(&base), "--prompt-ids", "49152", "--max-new-tokens", "2"]), "outside the vocabulary of 49152", tmp.path(), &before);
}

/// `--device wgpu` (in CI: Mesa's lavapipe) generates the CPU's tokens, and reports its device.
/// Run inside a Cargo project, it keeps CubeCL's autotune results in the user's cache folder, not
/// in that project's `target/`.
#[cfg(feature = "wgpu")]
#[test]
fn generate_on_wgpu_gives_the_cpu_tokens() {
    let (_, ft) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let (project, cache) = (tmp.path().join("project"), tmp.path().join("cache"));
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("Cargo.toml"), "[package]\nname = \"elsewhere\"\n").unwrap();
    let run = |device: &str| -> serde_json::Value {
        let args = ["generate", "--model", s(&ft), "--prompt", "Once upon a time", "--max-new-tokens", "6", "--json", "--device", device];
        let out = Command::new(env!("CARGO_BIN_EXE_bitdelta")).args(args).current_dir(&project).env("XDG_CACHE_HOME", &cache).output().unwrap();
        serde_json::from_str(&ok(&out)).unwrap()
    };
    let (cpu, gpu) = (run("cpu"), run("wgpu"));
    assert_eq!(gpu["tokens"], cpu["tokens"], "wgpu {gpu}\ncpu {cpu}");
    assert_eq!((cpu["device"].as_str(), gpu["device"].as_str()), (Some("cpu"), Some("wgpu")));
    assert_eq!(listing(&project), BTreeSet::from(["Cargo.toml".to_string()]), "bitdelta wrote into the project it ran in");
    assert!(cache.join("cubecl/autotune").is_dir(), "no autotune results in {}", cache.display());
}

/// Calibration requests that cannot work are refused before any output exists.
#[test]
fn layerwise_calibration_refuses_too_little_text() {
    let (base, ft) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("short.txt");
    std::fs::write(&text, "Only a few words of calibration text.").unwrap();
    let before = listing(tmp.path());
    let out = tmp.path().join("d.bitdelta.safetensors");
    let args = ["compress", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out), "--calibrate", "layerwise", "--calib-text", s(&text)];
    refused(&bitdelta(&args), "calibration text has", tmp.path(), &before);
    let mut bad_lr = args.to_vec();
    bad_lr.extend(["--layerwise-solver", "adamw", "--adamw-lr", "nan"]);
    refused(&bitdelta(&bad_lr), "--adamw-lr", tmp.path(), &before);
    let missing = tmp.path().join("missing.txt");
    let mut no_text = args.to_vec();
    no_text[10] = s(&missing);
    refused(&bitdelta(&no_text), "missing.txt", tmp.path(), &before);
}

/// `--calibrate full` runs both stages (small counts here; the real run is in BENCHMARKS.md),
/// records both in the report and the artifact's metadata, and refuses a bad learning rate.
#[test]
fn full_calibration_runs_both_stages_on_the_real_pair() {
    let (base, ft) = smollm2();
    let fx = delta_tests::fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("d.bitdelta.safetensors");
    let text = fx.join("text/tiny_train.utf8");
    let mut args = vec!["compress", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out), "--calib-text", s(&text), "--scale", "auto"];
    args.extend(["--calib-samples", "4", "--calib-len", "32", "--distill-samples", "5", "--distill-batch", "2", "--json"]);
    let before = listing(tmp.path());
    let mut bad = args.clone();
    bad.extend(["--distill-lr", "0"]);
    refused(&bitdelta(&bad), "--distill-lr", tmp.path(), &before);
    // A negative value is a value (our range message), not an unknown flag `-1` (clap's).
    let mut negative = args.clone();
    negative.extend(["--distill-lr", "-1"]);
    refused(&bitdelta(&negative), "--distill-lr must be a positive number, not -1", tmp.path(), &before);
    let mut exponent = args.clone();
    exponent.extend(["--distill-lr", "-1e-3"]);
    refused(&bitdelta(&exponent), "--distill-lr must be a positive number, not -0.001", tmp.path(), &before);

    let report: serde_json::Value = serde_json::from_str(&ok(&bitdelta(&args))).unwrap();
    assert_eq!(report["calibration"], "full");
    let e2e = &report["end_to_end"];
    // 5 samples: 1 held out, 4 trained on in batches of 2.
    assert_eq!((e2e["steps"].as_u64(), e2e["train_samples"].as_u64(), e2e["heldout_samples"].as_u64()), (Some(2), Some(4), Some(1)));
    assert_eq!(e2e["train_losses"].as_array().unwrap().len(), 2);
    assert!(e2e["heldout_after"].as_f64().unwrap().is_finite());
    assert_eq!(report["layerwise"].as_array().unwrap().len(), 210);

    let info: serde_json::Value = serde_json::from_str(&ok(&bitdelta(&["inspect", s(&out), "--json"]))).unwrap();
    let compression: serde_json::Value = serde_json::from_str(info["notes"]["compression"].as_str().unwrap()).unwrap();
    assert_eq!(compression["calibration"], "full");
    let report: serde_json::Value = serde_json::from_str(info["notes"]["calibration_report"].as_str().unwrap()).unwrap();
    assert_eq!(report["end_to_end"]["steps"], 2);
}

/// `compress --device wgpu` (in CI: Mesa's lavapipe) calibrates the real pair's first blocks
/// and tokens ([`delta_tests::LAVAPIPE_BLOCKS`], [`delta_tests::LAVAPIPE_TOKENS`]) as the CPU
/// does: the same candidate kept for every layer, the same held-out losses and scales within
/// float noise. The fits see 32 token rows here, so some are ill-conditioned: a per-output fit's
/// held-out MSE moved by 1.7e-3 (relative) between the backends where the others moved by
/// ≤ 2.6e-4 (on all 30 blocks). And Adam's normalised step moves a multiplier whose gradient is
/// float noise by ±lr whatever that noise's sign (at the default lr 0.01, scales differed by up
/// to 6.8e-3 after two steps), hence the small learning rate.
#[cfg(feature = "wgpu")]
#[test]
fn calibration_on_wgpu_matches_the_cpu_on_the_real_pair() {
    let fx = delta_tests::fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let (base, ft) = delta_tests::smollm2_first_blocks(delta_tests::LAVAPIPE_BLOCKS, Some(delta_tests::LAVAPIPE_TOKENS), tmp.path());
    let text = fx.join("text/tiny_train.utf8");
    let run = |device: &str| -> (serde_json::Value, HashMap<String, Vec<f32>>) {
        let out = tmp.path().join(format!("{device}.bitdelta.safetensors"));
        let mut args = vec!["compress", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out), "--calib-text", s(&text), "--device", device];
        args.extend(["--calib-samples", "3", "--calib-len", "16", "--distill-samples", "3", "--distill-batch", "1", "--distill-lr", "0.001", "--json"]);
        let report: serde_json::Value = serde_json::from_str(&ok(&bitdelta(&args))).unwrap();
        let scales = delta_tests::read_tensors(&out)
            .into_iter()
            .filter(|(n, _)| n.ends_with(".scale"))
            .map(|(n, (_, _, b))| (n, b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
            .collect();
        (report, scales)
    };
    let (cpu, cpu_scales) = run("cpu");
    let (gpu, gpu_scales) = run("wgpu");
    let (cl, gl) = (cpu["layerwise"].as_array().unwrap(), gpu["layerwise"].as_array().unwrap());
    assert_eq!(cl.len(), 7 * delta_tests::LAVAPIPE_BLOCKS);
    let (mut worst_mse, mut worst_scale) = (0f64, 0f32);
    for (c, g) in cl.iter().zip(gl) {
        assert_eq!(c["kept"], g["kept"], "{}: another candidate kept on wgpu\ncpu {c}\nwgpu {g}", c["name"]);
        let (want, got) = (c["heldout_mse"][c["kept"].as_str().unwrap()].as_f64().unwrap(), g["heldout_mse"][g["kept"].as_str().unwrap()].as_f64().unwrap());
        assert!((got - want).abs() <= 1e-2 * want, "{}: held-out MSE {got} on wgpu vs {want}", c["name"]);
        worst_mse = worst_mse.max((got - want).abs() / want);
    }
    for key in ["heldout_before", "heldout_after"] {
        let (want, got) = (cpu["end_to_end"][key].as_f64().unwrap(), gpu["end_to_end"][key].as_f64().unwrap());
        assert!((got - want).abs() <= 1e-3 * want, "end to end {key}: {got} on wgpu vs {want}");
    }
    assert_eq!(cpu_scales.len(), 7 * delta_tests::LAVAPIPE_BLOCKS);
    for (name, want) in &cpu_scales {
        let got = &gpu_scales[name];
        let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-2 * largest, "{name}: scales differ by {diff} (largest {largest})");
        worst_scale = worst_scale.max(diff / largest);
    }
    eprintln!("wgpu vs cpu: kept held-out MSE {worst_mse:.1e}, scales {worst_scale:.1e} (largest relative differences)");
    assert_eq!((cpu["device"].as_str(), gpu["device"].as_str()), (Some("cpu"), Some("wgpu")));
}

/// A GPU backend that cannot start (here: no Vulkan driver to be found) is a one-line error, not
/// the runtime's panic, and leaves nothing behind.
#[cfg(feature = "wgpu")]
#[test]
fn a_gpu_that_cannot_start_is_refused_in_one_line() {
    let (base, ft) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let before = listing(tmp.path());
    let out = tmp.path().join("d.bitdelta.safetensors");
    let no_gpu = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_bitdelta")).args(args).env("VK_ICD_FILENAMES", tmp.path().join("none.json")).env("XDG_RUNTIME_DIR", tmp.path()).output().unwrap();
    refused(&no_gpu(&["generate", "--model", s(&ft), "--prompt", "hi", "--device", "wgpu"]), "--device wgpu: the GPU backend could not start", tmp.path(), &before);
    let calibrate = ["compress", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out), "--calibrate", "layerwise", "--device", "wgpu"];
    refused(&no_gpu(&calibrate), "could not start", tmp.path(), &before);
}

/// A calibration device this build lacks is refused before anything is written.
#[cfg(not(feature = "cuda"))]
#[test]
fn calibration_on_a_missing_backend_is_refused() {
    let (base, ft) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let before = listing(tmp.path());
    let out = tmp.path().join("d.bitdelta.safetensors");
    let args = ["compress", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&out), "--calibrate", "layerwise", "--device", "cuda"];
    refused(&bitdelta(&args), "--features cuda", tmp.path(), &before);
}

/// `eval tasks` on the real request files: per-task accuracy over the documents asked for, and
/// one-line refusals for files that are not request files.
#[test]
fn eval_tasks_scores_real_requests_and_refuses_bad_files() {
    let (_, ft) = smollm2();
    let fx = delta_tests::fixtures();
    let (arc, wino) = (fx.join("tasks/arc_easy.jsonl.gz"), fx.join("tasks/winogrande.jsonl.gz"));
    let out = ok(&bitdelta(&["eval", "tasks", "--model", s(&ft), "--tasks", s(&arc), s(&wino), "--limit", "3", "--json"]));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tasks = r["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    for (t, name) in tasks.iter().zip(["arc_easy", "winogrande"]) {
        assert_eq!(t["task"], name);
        assert_eq!(t["docs"], 3);
        let acc = t["acc"].as_f64().unwrap();
        // Three documents: the accuracy is a count of them.
        assert!([0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0].iter().any(|v| (v - acc).abs() < 1e-12), "{acc}");
        // The documents behind it: the accuracy is the share of picks that hit the label, and
        // each pick is its document's highest log-likelihood.
        let documents = t["documents"].as_array().unwrap();
        assert_eq!(documents.len(), 3);
        let hits = documents.iter().filter(|d| d["pick"] == d["label"]).count();
        assert!((acc - hits as f64 / 3.0).abs() < 1e-12);
        for d in documents {
            let loglik: Vec<f64> = d["loglik"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert!(loglik.iter().all(|l| l.is_finite() && *l < 0.0), "{loglik:?}");
            assert!(loglik.iter().all(|l| *l <= loglik[d["pick"].as_u64().unwrap() as usize]));
        }
    }

    // The real ARC-Easy file holds each question twice: as itself and, numbered 1,000,000 + k, as
    // its unconditioned twin (context `Answer:`). Twins are not documents.
    let out = ok(&bitdelta(&["eval", "tasks", "--model", s(&ft), "--tasks", s(&arc), "--limit", "2", "--uncond", "--json"]));
    let t = &serde_json::from_str::<serde_json::Value>(&out).unwrap()["tasks"][0];
    assert_eq!((t["docs"].as_u64(), t["twins"].as_u64()), (Some(2), Some(2)));
    assert!([0.0, 0.5, 1.0].contains(&t["acc_uncond"].as_f64().unwrap()));

    let tmp = tempfile::tempdir().unwrap();
    // Four documents whose twins repeat them exactly: with --uncond every request is scored twice.
    let request = |doc: u64, idx: usize, label: usize, context: &str, continuation: &str| {
        format!("{{\"task_name\":\"t\",\"doc_id\":{doc},\"idx\":{idx},\"label\":{label},\"request\":{{\"context\":\"{context}\",\"continuation\":\"{continuation}\"}}}}\n")
    };
    let docs = [(0, "The sky is", [" blue", " green"]), (1, "Two and two make", [" four", " five"]), (1, "Cats like", [" fish", " rocks"]), (0, "Snow is", [" cold", " hot"])];
    let file = |twin_tail: &str| {
        let mut text = String::new();
        for offset in [0, 1_000_000] {
            for (k, (label, context, choices)) in docs.iter().enumerate() {
                for (i, c) in choices.iter().enumerate() {
                    let c = if offset > 0 && k == 3 && i == 1 { twin_tail } else { c };
                    text += &request(offset + k as u64, i, *label, context, c);
                }
            }
        }
        text
    };
    let twins = tmp.path().join("twins.jsonl");
    std::fs::write(&twins, file(" hot")).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["eval", "tasks", "--model", s(&ft), "--tasks", s(&twins), "--json"];
        args.extend(extra);
        serde_json::from_str::<serde_json::Value>(&ok(&bitdelta(&args))).unwrap()["tasks"][0].clone()
    };
    let (plain, uncond) = (run(&[]), run(&["--uncond"]));
    assert_eq!((plain["docs"].as_u64(), plain["twins"].as_u64()), (Some(4), Some(4)));
    assert!(plain["acc_uncond"].is_null());
    assert_eq!(uncond["request_tokens"].as_u64().unwrap(), 2 * plain["request_tokens"].as_u64().unwrap());
    assert_eq!((uncond["acc"].as_f64(), uncond["acc_norm"].as_f64()), (plain["acc"].as_f64(), plain["acc_norm"].as_f64()));
    assert!([0.0, 0.25, 0.5, 0.75, 1.0].contains(&uncond["acc_uncond"].as_f64().unwrap()));
    // Every document's scores: picks by hand from the log-likelihoods (per byte of the
    // continuation for acc_norm; the gain over the twin for acc_uncond), the accuracies from the
    // picks. A twin is its document again, so it scores the same, and a request scores the same
    // in either run, packed with different neighbours.
    let values = |v: &serde_json::Value| -> Vec<f64> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    let first_max = |v: &[f64]| (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best });
    let (plain_docs, uncond_docs) = (plain["documents"].as_array().unwrap(), uncond["documents"].as_array().unwrap());
    assert_eq!((plain_docs.len(), uncond_docs.len()), (4, 4));
    let mut hits = [0usize; 3];
    for (k, ((d, u), (label, _, choices))) in plain_docs.iter().zip(uncond_docs).zip(&docs).enumerate() {
        assert_eq!((d["doc_id"].as_u64(), d["label"].as_u64()), (Some(k as u64), Some(*label as u64)));
        assert!(d.get("loglik_uncond").is_none() && d.get("pick_uncond").is_none());
        let (loglik, twin) = (values(&d["loglik"]), values(&u["loglik_uncond"]));
        assert_eq!(loglik.len(), 2);
        for (a, b) in loglik.iter().zip(values(&u["loglik"])).chain(loglik.iter().zip(twin.clone())) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        let per_byte: Vec<f64> = loglik.iter().zip(choices).map(|(l, c)| l / c.len() as f64).collect();
        let gain: Vec<f64> = values(&u["loglik"]).iter().zip(&twin).map(|(l, t)| l - t).collect();
        let picks = [first_max(&loglik), first_max(&per_byte), first_max(&gain)];
        assert_eq!([d["pick"].as_u64(), d["pick_norm"].as_u64(), u["pick_uncond"].as_u64()], picks.map(|p| Some(p as u64)));
        for (h, p) in hits.iter_mut().zip(picks) {
            *h += (p == *label) as usize;
        }
    }
    let shares = [plain["acc"].as_f64(), plain["acc_norm"].as_f64(), uncond["acc_uncond"].as_f64()];
    assert_eq!(shares, hits.map(|h| Some(h as f64 / 4.0)));
    let limited = run(&["--uncond", "--limit", "3"]);
    assert_eq!((limited["docs"].as_u64(), limited["twins"].as_u64()), (Some(3), Some(3)));

    let mismatched = tmp.path().join("mismatched.jsonl");
    std::fs::write(&mismatched, file(" warm")).unwrap();
    let garbage = tmp.path().join("garbage.jsonl");
    std::fs::write(&garbage, "{\"not\": \"a request\"}\n").unwrap();
    let bad_label = tmp.path().join("label.jsonl");
    let line = |idx: usize| format!("{{\"task_name\":\"t\",\"doc_id\":0,\"idx\":{idx},\"label\":5,\"request\":{{\"context\":\"a\",\"continuation\":\" b\"}}}}\n");
    std::fs::write(&bad_label, line(0) + &line(1)).unwrap();
    let before_files = listing(tmp.path());
    for (file, needle) in [(&garbage, "garbage.jsonl:1"), (&bad_label, "label 5"), (&tmp.path().join("missing.jsonl.gz"), "missing.jsonl.gz"), (&mismatched, "twin of document 3")] {
        refused(&bitdelta(&["eval", "tasks", "--model", s(&ft), "--tasks", s(file)]), needle, tmp.path(), &before_files);
    }
}

/// `eval ppl --teacher --json` on a short real text: its figures agree with each other and with
/// a separate run of the teacher alone (its perplexity, and the gap paired window by window);
/// bad input is refused in one line.
#[test]
fn eval_ppl_pairs_a_model_with_its_teacher_and_refuses_bad_input() {
    let (base, ft) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let heldout = std::fs::read_to_string(delta_tests::fixtures().join("text/tiny_heldout.utf8")).unwrap();
    let text = tmp.path().join("short.txt");
    std::fs::write(&text, &heldout[..heldout.char_indices().nth(2000).unwrap().0]).unwrap();
    let run = |model: &Path, extra: &[&str]| {
        let mut args = vec!["eval", "ppl", "--model", s(model), "--text", s(&text), "--window", "32", "--json"];
        args.extend(extra);
        serde_json::from_str::<serde_json::Value>(&ok(&bitdelta(&args))).unwrap()
    };
    let (r, t) = (run(&base, &["--teacher", s(&ft)]), run(&ft, &[]));
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {v}"));
    let w = |v: &serde_json::Value| -> Vec<f64> { v["window_nll"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    let (wb, wf) = (w(&r), w(&t));
    assert!(wb.len() >= 8 && wb.len() as u64 == r["windows"].as_u64().unwrap() && wf.len() == wb.len(), "{} windows", wb.len());
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    assert!((mean(&wb) - f(&r, "mean_nll")).abs() < 1e-9 && (f(&r, "ppl") - f(&r, "mean_nll").exp()).abs() < 1e-9);
    assert!((f(&r, "teacher_ppl") / f(&t, "ppl") - 1.0).abs() < 1e-6, "teacher {} vs {}", f(&r, "teacher_ppl"), f(&t, "ppl"));
    let d: Vec<f64> = wb.iter().zip(&wf).map(|(a, b)| a - b).collect();
    let se = (d.iter().map(|x| (x - mean(&d)).powi(2)).sum::<f64>() / (d.len() - 1) as f64 / d.len() as f64).sqrt();
    assert!((f(&r, "nll_gap_to_teacher") - mean(&d)).abs() < 1e-6 && mean(&d) > 0.05, "gap {} vs {}", f(&r, "nll_gap_to_teacher"), mean(&d));
    assert!((f(&r, "nll_gap_std_error") - se).abs() < 1e-6, "{} vs {se}", f(&r, "nll_gap_std_error"));
    let sb = (wb.iter().map(|x| (x - mean(&wb)).powi(2)).sum::<f64>() / (wb.len() - 1) as f64 / wb.len() as f64).sqrt();
    assert!((f(&r, "nll_std_error") - sb).abs() < 1e-9, "{} vs {sb}", f(&r, "nll_std_error"));
    assert!(t["nll_gap_to_teacher"].is_null() && t["teacher_ppl"].is_null());

    let human = ok(&bitdelta(&["eval", "ppl", "--model", s(&base), "--text", s(&text), "--window", "32", "--teacher", s(&ft)]));
    assert!(human.contains("KL(teacher ‖ model)") && human.contains(&format!("teacher perplexity {:.4}", f(&t, "ppl"))), "{human}");

    let before = listing(tmp.path());
    for (args, needle) in [
        (vec!["--text", "missing.txt"], "missing.txt"),
        (vec!["--text", s(&text), "--window", "60000"], "fewer than one window"),
        (vec!["--text", s(&text), "--teacher", s(&tmp.path().join("nowhere"))], "nowhere"),
    ] {
        let mut a = vec!["eval", "ppl", "--model", s(&base)];
        a.extend(args);
        refused(&bitdelta(&a), needle, tmp.path(), &before);
    }
}
