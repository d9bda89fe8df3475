//! `bitdelta serve` on the real pair, over loopback: greedy outputs equal `bitdelta generate`
//! for several deltas decoded in the same batch; errors are JSON with the right status; a load
//! test with a delta hot-added and others evicted while it runs loses and mixes up nothing;
//! `logprobs` match the reference logits and `n` choices match `generate` with their seeds; a
//! base's short context limits requests to it; a delta with its own chat template chats with it;
//! a server that cannot start says why in one line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use delta_tests::http::Server;
use delta_tests::smollm2;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_bitdelta");
const MODES: [&str; 3] = ["scalar", "per-output", "per-input"];

fn bitdelta(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run bitdelta");
    assert!(out.status.success(), "bitdelta {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A deltas folder of the pair (base, finetuned) with one artifact per scale mode (weight-space
/// scales: quick to make, and three models whose greedy outputs differ).
fn deltas_of(base: &Path, ft: &Path, dir: &Path) -> PathBuf {
    let folder = dir.join("deltas");
    std::fs::create_dir_all(&folder).unwrap();
    for mode in MODES {
        let out = folder.join(format!("{mode}.bitdelta.safetensors"));
        bitdelta(&["compress", "--base", s(base), "--finetuned", s(ft), "-o", s(&out), "--scale", mode, "--calibrate", "none", "--json"]);
    }
    folder
}

/// [`deltas_of`] the real pair.
fn deltas(dir: &Path) -> PathBuf {
    let (base, ft) = smollm2();
    deltas_of(&base, &ft, dir)
}

fn completion(model: &str, prompt: &str, max_tokens: u32) -> Value {
    json!({ "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0 })
}

fn text(r: &delta_tests::http::Response) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["text"].as_str().expect("text").to_string()
}

const PROMPTS: [&str; 4] = ["Once upon a time", "The little dog", "Tom and Sue went to the park. Tom said", "Why is the sky blue?"];

#[test]
fn greedy_outputs_equal_generate_for_deltas_in_one_batch_and_errors_are_json() {
    let (base, ft) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let folder = deltas(tmp.path());
    let server = Server::start(Path::new(BIN), &base, &folder, &[]);

    let listed: Vec<String> = server.get("/v1/models").json()["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed, ["base", "per-input", "per-output", "scalar"]);

    // Six requests over three deltas at once, plus a streamed chat request on a fourth model.
    let jobs: Vec<(&str, &str)> = MODES.iter().flat_map(|m| PROMPTS[..2].iter().map(move |p| (*m, *p))).collect();
    let chat = json!({ "model": "scalar", "messages": [{"role": "user", "content": "Tell me a story about a cat."}], "max_tokens": 20, "temperature": 0 });
    let mut streaming = chat.clone();
    streaming["stream"] = true.into();
    let (answers, streamed) = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs.iter().map(|&(m, p)| scope.spawn(|| text(&server.post("/v1/completions", &completion(m, p, 24))))).collect();
        let streamed = scope.spawn(|| server.post("/v1/chat/completions", &streaming));
        (handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>(), streamed.join().unwrap())
    });
    let health = server.get("/health").json();
    assert!(health["max_models_in_a_step"].as_u64().unwrap() >= 2, "no step decoded two deltas together: {health}");

    for ((mode, prompt), answer) in jobs.iter().zip(&answers) {
        let delta = folder.join(format!("{mode}.bitdelta.safetensors"));
        let g: Value = serde_json::from_str(&bitdelta(&[
            "generate", "--model", s(&base), "--delta", s(&delta), "--delta-use", "fused", "--prompt", prompt, "--max-new-tokens", "24", "--json",
        ]))
        .unwrap();
        assert_eq!(answer, g["text"].as_str().unwrap(), "{mode}, `{prompt}`: server and generate differ");
    }
    // The deltas are different models: not every answer to a prompt is the same.
    assert!(answers[0] != answers[2] || answers[2] != answers[4] || answers[1] != answers[3], "all deltas answered alike: {answers:?}");
    // The base is a model too, and differs from the fine-tunes.
    let base_answer = text(&server.post("/v1/completions", &completion("base", PROMPTS[0], 24)));
    assert_ne!(base_answer, answers[0]);

    // Streamed chat: chunks whose pieces make the whole answer, a finish reason, then [DONE].
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert!(streamed.content_type.starts_with("text/event-stream"), "{}", streamed.content_type);
    let events = streamed.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
    let whole = server.post("/v1/chat/completions", &chat).json();
    assert_eq!(joined, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let g: Value = serde_json::from_str(&bitdelta(&[
        "generate", "--model", s(&base), "--delta", s(&folder.join("scalar.bitdelta.safetensors")), "--delta-use", "fused",
        "--chat", "--prompt", "Tell me a story about a cat.", "--max-new-tokens", "20", "--json",
    ]))
    .unwrap();
    assert_eq!(joined, g["text"].as_str().unwrap());

    // Errors: JSON bodies with the right status, and the server keeps serving.
    let r = server.post("/v1/completions", &completion("no-such-model", "Hi", 2));
    assert_eq!((r.status, r.json()["error"]["type"].as_str()), (404, Some("model_not_found")), "{}", r.body);
    let r = server.get("/v1/nothing");
    assert_eq!((r.status, r.json()["error"]["type"].as_str()), (404, Some("not_found")), "{}", r.body);
    let r = delta_tests::http::request(&server.addr, "POST", "/v1/completions", Some("{\"model\": \"scalar\", \"prompt\": ")).unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("not a valid request"), "{}", r.body);
    let r = server.post("/v1/completions", &json!({ "model": "scalar", "prompt": "Hi", "max_tokens": 0 }));
    assert_eq!(r.status, 400, "{}", r.body);
    let r = server.post("/v1/completions", &json!({ "model": "scalar", "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"] }));
    assert_eq!(r.status, 400, "{}", r.body);
    for top_p in [0.0, 1.5] {
        let r = server.post("/v1/completions", &json!({ "model": "scalar", "prompt": "Hi", "top_p": top_p }));
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.json()["error"]["message"].as_str().unwrap().contains("top_p"), "{}", r.body);
    }

    // Sampling with a nucleus: the server draws what `generate` draws with the same seed.
    let mut req = completion("scalar", PROMPTS[1], 12);
    (req["temperature"], req["top_p"], req["seed"]) = (json!(0.8), json!(0.5), json!(3));
    let sampled = text(&server.post("/v1/completions", &req));
    let g: Value = serde_json::from_str(&bitdelta(&[
        "generate", "--model", s(&base), "--delta", s(&folder.join("scalar.bitdelta.safetensors")), "--delta-use", "fused",
        "--prompt", PROMPTS[1], "--max-new-tokens", "12", "--temperature", "0.8", "--top-p", "0.5", "--seed", "3", "--json",
    ]))
    .unwrap();
    assert_eq!(sampled, g["text"].as_str().unwrap());

    // Stop strings: the text ends just before the first one, whole or streamed.
    let answer: Vec<char> = answers[0].chars().collect();
    let stop: String = answer[12..16].iter().collect();
    let want = &answers[0][..answers[0].find(&stop).unwrap()];
    let mut req = completion(MODES[0], PROMPTS[0], 24);
    req["stop"] = json!(["never appears in this story", stop]);
    let r = server.post("/v1/completions", &req).json();
    assert_eq!((r["choices"][0]["text"].as_str().unwrap(), r["choices"][0]["finish_reason"].as_str()), (want, Some("stop")), "stop `{stop}`");
    req["stream"] = true.into();
    let events = server.post("/v1/completions", &req).events();
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(joined, want);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    // An artifact made for another base (the fine-tune as base): refused at load, named.
    let wrong = folder.join("reversed.bitdelta.safetensors");
    bitdelta(&["compress", "--base", s(&ft), "--finetuned", s(&base), "-o", s(&wrong), "--calibrate", "none", "--json"]);
    let r = server.post("/v1/completions", &completion("reversed", "Hi", 2));
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("wrong base"), "{}", r.body);
    std::fs::write(folder.join("cut.bitdelta.safetensors"), &std::fs::read(&wrong).unwrap()[..1000]).unwrap();
    let r = server.post("/v1/completions", &completion("cut", "Hi", 2));
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("truncated"), "{}", r.body);
    assert_eq!(text(&server.post("/v1/completions", &completion("per-output", PROMPTS[1], 24))), answers[3]);
}

/// `--device wgpu` (in CI: Mesa's lavapipe, slow, so few tokens and the pair's first blocks and
/// tokens, [`delta_tests::LAVAPIPE_BLOCKS`] and [`delta_tests::LAVAPIPE_TOKENS`]): requests for
/// three deltas and the base decoded together on the GPU backend give `generate`'s greedy text on
/// the CPU.
#[cfg(feature = "wgpu")]
#[test]
fn on_wgpu_deltas_in_one_batch_give_the_cpu_greedy_text() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, ft) = delta_tests::smollm2_first_blocks(delta_tests::LAVAPIPE_BLOCKS, Some(delta_tests::LAVAPIPE_TOKENS), tmp.path());
    let folder = deltas_of(&base, &ft, tmp.path());
    let server = Server::start(Path::new(BIN), &base, &folder, &["--device", "wgpu"]);
    let models = ["scalar", "per-output", "per-input", "base"];
    let on = &server;
    let answers: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = models.iter().map(|&m| scope.spawn(move || text(&on.post("/v1/completions", &completion(m, PROMPTS[0], 5))))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let health = server.get("/health").json();
    assert!(health["max_models_in_a_step"].as_u64().unwrap() >= 2, "no step decoded two deltas together: {health}");
    for (model, answer) in models.iter().zip(&answers) {
        let delta = folder.join(format!("{model}.bitdelta.safetensors"));
        let mut args = vec!["generate", "--model", s(&base), "--prompt", PROMPTS[0], "--max-new-tokens", "5", "--json"];
        if *model != "base" {
            args.extend(["--delta", s(&delta), "--delta-use", "fused"]);
        }
        let g: Value = serde_json::from_str(&bitdelta(&args)).unwrap();
        assert_eq!(answer, g["text"].as_str().unwrap(), "{model}: the server on wgpu and generate on the CPU differ");
    }
}

#[test]
fn load_test_with_hot_load_and_eviction_loses_and_mixes_up_nothing() {
    let (base, _) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let folder = deltas(tmp.path());
    // Two resident at most, while four models are asked for: evictions all through the run.
    let server = Server::start(Path::new(BIN), &base, &folder, &["--max-resident", "2"]);
    let models = ["base", "scalar", "per-output", "per-input"];
    // The expected answers, one request at a time.
    let mut expected: HashMap<(String, &str), String> = HashMap::new();
    for m in models {
        for p in PROMPTS {
            expected.insert((m.to_string(), p), text(&server.post("/v1/completions", &completion(m, p, 6))));
        }
    }
    // The hot-added delta is a copy of `per-input` under a new name: it must answer as per-input.
    for p in PROMPTS {
        expected.insert(("hot".to_string(), p), expected[&("per-input".to_string(), p)].clone());
    }
    let distinct: std::collections::HashSet<&String> = expected.values().collect();
    assert!(distinct.len() >= 8, "too few distinct answers to detect mix-ups: {}", distinct.len());

    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 25;
    let added = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::<String>::new());
    let served = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    std::thread::scope(|scope| {
        for c in 0..CLIENTS {
            let (expected, added, done, failures, served, server, folder) = (&expected, &added, &done, &failures, served.clone(), &server, &folder);
            scope.spawn(move || {
                for k in 0..PER_CLIENT {
                    let n = done.fetch_add(1, Ordering::SeqCst);
                    if n == 40 {
                        std::fs::copy(folder.join("per-input.bitdelta.safetensors"), folder.join("hot.bitdelta.safetensors")).unwrap();
                        added.store(true, Ordering::SeqCst);
                    }
                    let mut model = models[(c + k) % models.len()].to_string();
                    if added.load(Ordering::SeqCst) && (c + k) % 3 == 0 {
                        model = "hot".into();
                    }
                    let prompt = PROMPTS[(c * 7 + k) % PROMPTS.len()];
                    let r = server.post("/v1/completions", &completion(&model, prompt, 6));
                    let answer = (r.status == 200).then(|| r.json()["choices"][0]["text"].as_str().map(str::to_string)).flatten();
                    if answer.as_ref() != Some(&expected[&(model.clone(), prompt)]) {
                        failures.lock().unwrap().push(format!("{model} `{prompt}`: {} {}", r.status, r.body));
                    }
                    *served.lock().unwrap().entry(model).or_default() += 1;
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{} of {} requests failed or were mixed up, e.g. {}", failures.len(), CLIENTS * PER_CLIENT, failures[0]);
    let served = served.lock().unwrap().clone();
    assert!(served.get("hot").copied().unwrap_or(0) >= 10, "the hot-added delta was hardly used: {served:?}");
    let health = server.get("/health").json();
    eprintln!("load test: {served:?}; {health}");
    assert!(health["delta_evictions"].as_u64().unwrap() >= 3, "{health}");
    assert!(health["max_sequences_in_a_step"].as_u64().unwrap() >= 4, "{health}");
    assert!(health["max_models_in_a_step"].as_u64().unwrap() >= 3, "{health}");
    let listed = server.get("/v1/models").json();
    assert!(listed["data"].as_array().unwrap().iter().any(|m| m["id"] == "hot"), "{listed}");
}

/// `logprobs` and `n` choices. The base's log-probabilities equal the log-softmax of the
/// reference logits (transformers) at several prompt positions, requested side by side; choice i
/// of a sampled request draws what `generate --seed SEED+i` draws; streamed choices and their
/// log-probabilities join to the whole answer's; bad values are 400s.
#[test]
fn logprobs_follow_the_reference_and_choices_follow_generate() {
    let (base, ft) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("deltas");
    std::fs::create_dir(&folder).unwrap();
    let delta = folder.join("scalar.bitdelta.safetensors");
    bitdelta(&["compress", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&delta), "--scale", "scalar", "--calibrate", "none", "--json"]);
    let server = Server::start(Path::new(BIN), &base, &folder, &[]);

    // Next-token log-probabilities after prefixes of the reference prompt: the reference holds
    // the top 64 logits and the logsumexp at every position.
    let reference = delta_tests::read_tensors(&delta_tests::fixtures().join("smollm2/reference_logits.safetensors"));
    let f32s = |name: &str| -> Vec<f32> { reference[name].2.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() };
    let ids: Vec<u32> = reference["story.input_ids"].2.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32).collect();
    let (top, lse) = (f32s("story.base.top_logits"), f32s("story.base.logsumexp"));
    let positions = [4, 20, ids.len() - 1];
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = positions
            .iter()
            .map(|&p| {
                let req = json!({ "model": "base", "prompt": &ids[..=p], "max_tokens": 1, "temperature": 0, "logprobs": 5 });
                let server = &server;
                scope.spawn(move || server.post("/v1/completions", &req))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).map(|r| {
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["choices"][0]["logprobs"].clone()
        }).collect()
    });
    for (&p, lp) in positions.iter().zip(&answers) {
        let want: Vec<f64> = top[p * 64..p * 64 + 5].iter().map(|&v| (v - lse[p]) as f64).collect();
        // Greedy: the token is the most likely one; the alternatives are the top 5, in order of value.
        assert!((lp["token_logprobs"][0].as_f64().unwrap() - want[0]).abs() < 1e-2, "position {p}: {lp} vs {want:?}");
        let mut got: Vec<f64> = lp["top_logprobs"][0].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).collect();
        got.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(got.len(), 5, "{lp}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-2, "position {p}: {got:?} vs {want:?}");
        }
        assert_eq!(lp["text_offset"], json!([0]));
    }

    // Three sampled choices: each one is `generate` with its own seed, and they differ.
    let req = json!({ "model": "scalar", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0.9, "seed": 3, "n": 3 });
    let r = server.post("/v1/completions", &req).json();
    let texts: Vec<String> = (0..3).map(|i| {
        assert_eq!(r["choices"][i]["index"], i, "{r}");
        r["choices"][i]["text"].as_str().unwrap().to_string()
    }).collect();
    for (i, text) in texts.iter().enumerate() {
        let g: Value = serde_json::from_str(&bitdelta(&[
            "generate", "--model", s(&base), "--delta", s(&delta), "--delta-use", "fused", "--prompt", PROMPTS[1], "--max-new-tokens", "12",
            "--temperature", "0.9", "--seed", &(3 + i).to_string(), "--json",
        ]))
        .unwrap();
        assert_eq!(text, g["text"].as_str().unwrap(), "choice {i}");
    }
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "three samples alike: {texts:?}");
    // Streamed: pieces per index join to the same texts; one last chunk per choice, the very
    // last of all carrying the usage of all three.
    let mut streaming = req.clone();
    streaming["stream"] = true.into();
    let events = server.post("/v1/completions", &streaming).events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    for (i, text) in texts.iter().enumerate() {
        let mine = chunks.iter().filter(|c| c["choices"][0]["index"] == i);
        assert_eq!(&mine.clone().filter_map(|c| c["choices"][0]["text"].as_str()).collect::<String>(), text, "choice {i}");
        assert_eq!(mine.filter(|c| c["choices"][0]["finish_reason"].is_string()).count(), 1, "choice {i}");
    }
    let with_usage: Vec<usize> = (0..chunks.len()).filter(|&k| chunks[k].get("usage").is_some()).collect();
    assert_eq!(with_usage, [chunks.len() - 1]);
    assert_eq!(chunks[chunks.len() - 1]["usage"], r["usage"]);

    // Chat: greedy tokens are their own top alternative; streamed log-probabilities are the whole ones.
    let mut chat = json!({ "model": "scalar", "messages": [{"role": "user", "content": "Tell me a story about a cat."}], "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 3 });
    let whole = server.post("/v1/chat/completions", &chat).json();
    let content = whole["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(content.len(), 10, "{whole}");
    let joined: String = content.iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert_eq!(joined, whole["choices"][0]["message"]["content"].as_str().unwrap());
    for t in &content {
        let alternatives = t["top_logprobs"].as_array().unwrap();
        assert_eq!(alternatives.len(), 3, "{t}");
        assert_eq!((&alternatives[0]["token"], &alternatives[0]["logprob"]), (&t["token"], &t["logprob"]), "{t}");
        assert!(alternatives.windows(2).all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()), "{t}");
        assert_eq!(t["bytes"], json!(t["token"].as_str().unwrap().as_bytes()));
    }
    chat["stream"] = true.into();
    let events = server.post("/v1/chat/completions", &chat).events();
    let streamed: Vec<Value> = events[..events.len() - 1]
        .iter()
        .flat_map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["logprobs"]["content"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(streamed, content);

    for (path, body, field) in [
        ("/v1/completions", json!({ "model": "scalar", "prompt": "Hi", "n": 0 }), "`n`"),
        ("/v1/completions", json!({ "model": "scalar", "prompt": "Hi", "n": 17 }), "`n`"),
        ("/v1/completions", json!({ "model": "scalar", "prompt": "Hi", "logprobs": 21 }), "`logprobs`"),
        ("/v1/completions", json!({ "model": "scalar", "prompt": "Hi", "logprobs": true }), "`logprobs`"),
        ("/v1/chat/completions", json!({ "model": "scalar", "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2 }), "`top_logprobs`"),
        ("/v1/chat/completions", json!({ "model": "scalar", "messages": [{"role": "user", "content": "Hi"}], "logprobs": 2 }), "`logprobs`"),
    ] {
        let r = server.post(path, &body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(r.json()["error"]["message"].as_str().unwrap().contains(field), "{body}: {}", r.body);
    }
}

/// A base whose config gives a context shorter than the default request limit (4096): the
/// server's limit is that context, and a request beyond it is refused with 400.
#[test]
fn a_base_with_a_short_context_limits_requests_to_it() {
    let (base, _) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let (short, empty) = (tmp.path().join("short"), tmp.path().join("deltas"));
    std::fs::create_dir_all(&empty).unwrap();
    delta_tests::edited_copy(&base, &short, "config.json", |config| config["max_position_embeddings"] = json!(32));
    let server = Server::start(Path::new(BIN), &short, &empty, &[]);
    // "Once upon a time" is 4 tokens.
    assert_eq!(server.post("/v1/completions", &completion("short", "Once upon a time", 28)).status, 200);
    let r = server.post("/v1/completions", &completion("short", "Once upon a time", 29));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("4 prompt tokens + 29 max_tokens exceed this server's context of 32"), "{}", r.body);
}

/// A delta that ships its own chat template chats with it — the prompt and the greedy answer of
/// `generate --delta --chat` — next to one that ships none, and its own shorter context bounds
/// its requests; one whose `config.json` asks for
/// another RoPE than the base's, or that added tokens, is refused, naming the field.
#[test]
fn deltas_chat_with_their_own_templates_and_another_forward_is_refused() {
    let (base, ft) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("deltas");
    std::fs::create_dir(&folder).unwrap();
    let (own, rope) = (tmp.path().join("own"), tmp.path().join("rope"));
    delta_tests::with_own_files(&ft, &own, |config| config["max_position_embeddings"] = 64.into());
    delta_tests::with_own_files(&ft, &rope, |config| config["rope_theta"] = 1234.0.into());
    let grown = tmp.path().join("grown");
    delta_tests::with_added_tokens(&ft, &grown);
    for (name, model) in [("plain", &ft), ("own", &own), ("rope", &rope), ("grown", &grown)] {
        let out = folder.join(format!("{name}.bitdelta.safetensors"));
        bitdelta(&["compress", "--base", s(&base), "--finetuned", s(model), "-o", s(&out), "--scale", "scalar", "--calibrate", "none", "--json"]);
    }
    let server = Server::start(Path::new(BIN), &base, &folder, &[]);
    let chat = |model: &str| {
        let r = server.post("/v1/chat/completions", &json!({ "model": model, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8, "temperature": 0 }));
        assert_eq!(r.status, 200, "{model}: {}", r.body);
        let r = r.json();
        (r["usage"]["prompt_tokens"].as_u64().unwrap(), r["choices"][0]["message"]["content"].as_str().unwrap().to_string())
    };
    let ((plain_tokens, _), (own_tokens, own_text)) = (chat("plain"), chat("own"));
    let delta = folder.join("own.bitdelta.safetensors");
    let g: Value = serde_json::from_str(&bitdelta(&[
        "generate", "--model", s(&base), "--delta", s(&delta), "--delta-use", "fused", "--chat", "--prompt", "Tell me a story.", "--max-new-tokens", "8", "--json",
    ]))
    .unwrap();
    assert_eq!(own_tokens, g["prompt_ids"].as_array().unwrap().len() as u64);
    assert_eq!(own_text, g["text"].as_str().unwrap());
    assert!(own_tokens > plain_tokens + 4, "the delta's own first turn is missing: {own_tokens} against {plain_tokens} prompt tokens");

    // The delta's own context (64 tokens) bounds its requests; the base's stays the server's.
    let r = server.post("/v1/completions", &json!({ "model": "own", "prompt": [1, 2, 3, 4], "max_tokens": 61 }));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("4 prompt tokens + 61 max_tokens exceed the model's context of 64"), "{}", r.body);
    let r = server.post("/v1/completions", &json!({ "model": "plain", "prompt": [1, 2, 3, 4], "max_tokens": 61, "temperature": 0 }));
    assert_eq!(r.status, 200, "{}", r.body);

    // Another RoPE, or added tokens, cannot share the base's forward pass.
    for (model, field) in [("rope", "rope_theta"), ("grown", "vocab_size")] {
        let r = server.post("/v1/completions", &completion(model, PROMPTS[0], 4));
        assert_eq!(r.status, 409, "{}", r.body);
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(field) && message.contains("config.json"), "{message}");
    }
}

/// Runs `bitdelta serve ARGS`, which must refuse to start: exit 1 with one line on stderr (which
/// is returned). A server that starts prints `listening on …` and runs on; one that refuses
/// closes stdout without a line.
fn refused_to_start(args: &[&str]) -> String {
    let mut child = Command::new(BIN).arg("serve").args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut first).unwrap();
    if !first.is_empty() {
        child.kill().unwrap();
        panic!("the server started with {args:?}: {first}");
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

/// Bad folders, a base whose chat template does not compile, a context beyond the base's and a
/// taken port stop the server at start with a one-line error (no template at all is fine: chat
/// requests then get a 400).
#[test]
fn the_server_refuses_to_start_on_bad_folders_a_broken_template_or_a_taken_port() {
    let (base, _) = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("deltas");
    std::fs::create_dir(&empty).unwrap();
    let missing = tmp.path().join("missing");
    let err = refused_to_start(&["--base", s(&missing), "--deltas", s(&empty)]);
    assert!(err.contains("--base") && err.contains("missing") && err.contains("is not a folder"), "{err}");
    let err = refused_to_start(&["--base", s(&base), "--deltas", s(&base.join("config.json"))]);
    assert!(err.contains("--deltas") && err.contains("config.json") && err.contains("is not a folder"), "{err}");
    // A folder without a checkpoint.
    let err = refused_to_start(&["--base", s(&empty), "--deltas", s(&empty)]);
    assert!(err.contains("reading the base"), "{err}");

    let copy = tmp.path().join("base");
    delta_tests::edited_copy(&base, &copy, "tokenizer_config.json", |config| config["chat_template"] = json!("{% for %}"));
    let err = refused_to_start(&["--base", s(&copy), "--deltas", s(&empty), "--addr", "127.0.0.1:0"]);
    assert!(err.contains("chat template") && err.contains("tokenizer_config.json"), "{err}");

    let err = refused_to_start(&["--base", s(&base), "--deltas", s(&empty), "--max-context", "8193", "--addr", "127.0.0.1:0"]);
    assert!(err.contains("--max-context 8193 is beyond the base's context of 8192 tokens"), "{err}");

    // The base loads, the port is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = refused_to_start(&["--base", s(&base), "--deltas", s(&empty), "--addr", &addr]);
    assert!(err.contains(&format!("binding {addr}")), "{err}");
}
