//! `cargo xtask report [--limit N]`: the quality report on the real pair — base, fine-tune, and
//! the fine-tune compressed as scalar and auto, each with no calibration, layer-wise and full: held-out
//! TinyStories and C4 perplexity, the five zero-shot tasks, artifact size and compression time.
//! Writes `REPORT.md`, `report/report.json` and `report/report.svg` in the repository.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{bitdelta, bitdelta_json, fixtures, machine, root, s, target_dir};

const TASKS: [(&str, &str); 5] = [
    ("arc_challenge", "ARC-C"),
    ("arc_easy", "ARC-E"),
    ("hellaswag", "HellaSwag"),
    ("piqa", "PIQA"),
    ("winogrande", "Winogrande"),
];

/// Compressed variants: label, --scale, --calibrate.
const VARIANTS: [(&str, &str, &str); 6] = [
    ("scalar, none", "scalar", "none"),
    ("scalar, layer-wise", "scalar", "layerwise"),
    ("scalar, full", "scalar", "full"),
    ("auto, none", "auto", "none"),
    ("auto, layer-wise", "auto", "layerwise"),
    ("auto, full", "auto", "full"),
];

/// The last ~60 KB of the C4 sample, from a line start: text the calibration (which reads from
/// the start, 200 × 128 tokens ≈ 115 KB) never sees.
fn c4_heldout(fx: &Path, work: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(fx.join("text/c4.utf8"))?;
    let mut start = text.len().saturating_sub(60_000);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let start = text[start..].find('\n').map_or(start, |i| start + i + 1);
    if start < 150_000 {
        bail!("text/c4.utf8 is too short to keep a held-out part away from the calibration samples");
    }
    let path = work.join("c4_heldout.utf8");
    std::fs::write(&path, &text[start..])?;
    Ok(path)
}

pub fn report(args: &[String]) -> Result<()> {
    let mut limit: Option<u64> = Some(50);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--limit" => limit = Some(it.next().context("--limit needs a number")?.parse().context("--limit needs a number")?),
            "--full" => limit = None,
            "--render" if args.len() == 1 => return render(),
            other => bail!("unknown report option `{other}` (--limit N, --full, or --render alone)"),
        }
    }
    let started = Instant::now();
    let fx = fixtures(None)?;
    let bin = bitdelta()?;
    let (base, ft) = (fx.join("smollm2/base"), fx.join("smollm2/finetuned"));
    let work = target_dir().join("report");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let c4 = c4_heldout(&fx, &work)?;
    let tiny = fx.join("text/tiny_heldout.utf8");
    let task_files: Vec<PathBuf> = TASKS.iter().map(|(t, _)| fx.join(format!("tasks/{t}.jsonl.gz"))).collect();

    let evaluate = |model: &Path, delta: Option<&Path>| -> Result<Value> {
        let with = |mut a: Vec<String>| {
            if let Some(d) = delta {
                a.extend(["--delta".into(), s(d).into()]);
            }
            a
        };
        let ppl = |text: &Path, teacher: Option<&Path>| -> Result<Value> {
            let mut a = with(vec!["eval".into(), "ppl".into(), "--model".into(), s(model).into(), "--text".into(), s(text).into()]);
            if let Some(t) = teacher {
                a.extend(["--teacher".into(), s(t).into()]);
            }
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            Ok(bitdelta_json(&bin, &a)?.0)
        };
        // On TinyStories also the KL to the fine-tune: how faithfully a variant reproduces it.
        // Its per-window NLLs pair variants up window by window (`paired`).
        let t = ppl(&tiny, Some(&ft))?;
        let (p_tiny, kl) = (t["ppl"].as_f64().unwrap_or(f64::NAN), t["kl_to_teacher"].as_f64().unwrap_or(f64::NAN));
        let c = ppl(&c4, None)?;
        let mut a = with(vec!["eval".into(), "tasks".into(), "--model".into(), s(model).into()]);
        a.push("--tasks".into());
        a.extend(task_files.iter().map(|p| s(p).to_string()));
        if let Some(l) = limit {
            a.extend(["--limit".into(), l.to_string()]);
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let (mut tasks, _) = bitdelta_json(&bin, &a)?;
        compact_documents(&mut tasks);
        Ok(json!({
            "tiny_ppl": p_tiny, "tiny_kl_to_finetune": kl, "tiny_window_nll": t["window_nll"],
            "tiny_nll_gap_to_finetune": t["nll_gap_to_teacher"], "tiny_nll_gap_std_error": t["nll_gap_std_error"],
            "c4_ppl": c["ppl"].as_f64().unwrap_or(f64::NAN), "c4_window_nll": c["window_nll"], "tasks": tasks,
        }))
    };

    let mut rows: Vec<Value> = Vec::new();
    eprintln!("report: evaluating the base");
    rows.push(json!({ "label": "base", "eval": evaluate(&base, None)? }));
    eprintln!("report: evaluating the fine-tune");
    rows.push(json!({ "label": "fine-tune", "eval": evaluate(&ft, None)? }));
    for (label, scale, calibrate) in VARIANTS {
        eprintln!("report: compressing ({label})");
        let path = work.join(format!("{}-{calibrate}.bitdelta.safetensors", scale));
        let mut a = vec!["compress", "--base", s(&base), "--finetuned", s(&ft), "-o", s(&path), "--scale", scale, "--calibrate", calibrate];
        let c4_text = fx.join("text/c4.utf8");
        if calibrate != "none" {
            a.extend(["--calib-text", s(&c4_text)]);
        }
        let (c, secs) = bitdelta_json(&bin, &a)?;
        eprintln!("report: evaluating ({label})");
        rows.push(json!({
            "label": label, "scale": scale, "calibrate": calibrate,
            "bytes": c["bytes"], "compress_seconds": secs, "modes": c["modes"],
            "peak_rss_bytes": c["peak_rss_bytes"], "eval": evaluate(&base, Some(&path))?,
        }));
    }
    let date = Command::new("date").args(["-u", "+%Y-%m-%d"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let out = json!({
        "machine": machine(), "date": date, "limit": limit, "seconds": started.elapsed().as_secs_f64(),
        "calibration_text": "text/c4.utf8", "rows": rows,
    });
    let dir = root().join("report");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&out)?)?;
    write_pages(&out)?;
    println!("{}", markdown(&out));
    eprintln!("wrote REPORT.md, report/report.json and report/report.svg in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `REPORT.md` and `report/report.svg` from the report's JSON.
fn write_pages(out: &Value) -> Result<()> {
    std::fs::write(root().join("report/report.svg"), plot(out))?;
    std::fs::write(root().join("REPORT.md"), markdown(out))?;
    Ok(())
}

/// `--render`: rewrites `REPORT.md` and the plot from `report/report.json` without measuring
/// anything again (after a change to the page's layout).
fn render() -> Result<()> {
    let path = root().join("report/report.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {} (run `cargo xtask report` first)", path.display()))?;
    let out: Value = serde_json::from_str(&text).with_context(|| format!("{} is not the report's JSON", path.display()))?;
    if !out["rows"].is_array() {
        bail!("{} holds no rows", path.display());
    }
    write_pages(&out)?;
    eprintln!("wrote REPORT.md and report/report.svg from {}", path.display());
    Ok(())
}

/// `a`'s mean NLL on a held-out text (`text`: `tiny` or `c4`) minus `b`'s, with its standard
/// error paired window by window.
fn paired(a: &Value, b: &Value, text: &str) -> Option<(f64, f64)> {
    let w = |r: &Value| -> Option<Vec<f64>> { r["eval"][format!("{text}_window_nll")].as_array()?.iter().map(Value::as_f64).collect() };
    let (a, b) = (w(a)?, w(b)?);
    let d: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
    (a.len() == b.len() && d.len() > 1).then(|| mean_and_std_error(&d))
}

/// The mean of paired differences and its standard error (sample variance over n − 1, divided
/// by n), as `delta_models::perplexity::paired_difference` (xtask does not build the models).
fn mean_and_std_error(d: &[f64]) -> (f64, f64) {
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    (mean, (d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) / n).sqrt())
}

/// Replaces each task's `documents` (every choice's log-likelihood, from `eval tasks --json`) by
/// what the report pairs models on, as strings of space-separated choice indices: `labels`,
/// `picks` (acc) and `picks_norm` (acc_norm), document by document in file order.
fn compact_documents(tasks: &mut Value) {
    for t in tasks["tasks"].as_array_mut().into_iter().flatten() {
        let Some(docs) = t.as_object_mut().and_then(|o| o.remove("documents")) else { continue };
        let docs = docs.as_array().cloned().unwrap_or_default();
        for (key, field) in [("labels", "label"), ("picks", "pick"), ("picks_norm", "pick_norm")] {
            let v: Vec<String> = docs.iter().map(|d| d[field].as_u64().map_or("?".into(), |i| i.to_string())).collect();
            t[key] = Value::from(v.join(" "));
        }
    }
}

/// The right answers and a model's picks on one task, document by document.
fn picks(row: &Value, task: &str, key: &str) -> Option<Vec<u64>> {
    let t = row["eval"]["tasks"]["tasks"].as_array()?.iter().find(|t| t["task"] == task)?;
    t[key].as_str()?.split(' ').map(|p| p.parse().ok()).collect()
}

/// Row `a`'s accuracy on `task` minus row `b`'s, on the same documents, with its standard error
/// paired document by document, and the share of documents where both pick the same choice.
fn paired_acc(a: &Value, b: &Value, task: &str) -> Option<(f64, f64, f64)> {
    let (labels, pa, pb) = (picks(a, task, "labels")?, picks(a, task, "picks")?, picks(b, task, "picks")?);
    if labels != picks(b, task, "labels")? || pa.len() != labels.len() || pb.len() != labels.len() || labels.len() < 2 {
        return None;
    }
    let d: Vec<f64> = labels.iter().zip(pa.iter().zip(&pb)).map(|(l, (x, y))| (x == l) as u8 as f64 - (y == l) as u8 as f64).collect();
    let (mean, se) = mean_and_std_error(&d);
    let agree = pa.iter().zip(&pb).filter(|(x, y)| x == y).count() as f64 / d.len() as f64;
    Some((mean, se, agree))
}

/// The mean over the five tasks of `paired_acc`'s difference, with its standard error (the tasks'
/// documents are independent), and the agreement over all their documents pooled.
fn paired_mean_acc(a: &Value, b: &Value) -> Option<(f64, f64, f64)> {
    let per: Vec<(f64, f64, f64)> = TASKS.iter().map(|(t, _)| paired_acc(a, b, t)).collect::<Option<_>>()?;
    let docs: Vec<f64> = TASKS.iter().map(|(t, _)| picks(a, t, "labels").map_or(0.0, |l| l.len() as f64)).collect();
    let k = per.len() as f64;
    let mean = per.iter().map(|p| p.0).sum::<f64>() / k;
    let se = per.iter().map(|p| p.1 * p.1).sum::<f64>().sqrt() / k;
    let agree = per.iter().zip(&docs).map(|(p, n)| p.2 * n).sum::<f64>() / docs.iter().sum::<f64>();
    Some((mean, se, agree))
}

/// The ordering the method promises (#6: full ≤ layer-wise ≤ none for the same scales), pair by
/// pair: (later, earlier) labels.
const ORDERING: [(&str, &str); 4] = [
    ("scalar, layer-wise", "scalar, none"),
    ("scalar, full", "scalar, layer-wise"),
    ("auto, layer-wise", "auto, none"),
    ("auto, full", "auto, layer-wise"),
];

fn acc(row: &Value, task: &str) -> Option<(f64, f64, f64)> {
    let t = row["eval"]["tasks"]["tasks"].as_array()?.iter().find(|t| t["task"] == task)?;
    Some((t["acc"].as_f64()?, t["acc_norm"].as_f64()?, t["acc_stderr"].as_f64()?))
}

fn markdown(r: &Value) -> String {
    let rows = r["rows"].as_array().cloned().unwrap_or_default();
    let ppl = |row: &Value, k: &str| row["eval"][k].as_f64().unwrap_or(f64::NAN);
    let (b, f) = (&rows[0], &rows[1]);
    let share = |p: f64, k: &str| 100.0 * (ppl(b, k).ln() - p.ln()) / (ppl(b, k).ln() - ppl(f, k).ln());
    let mut m = String::new();
    let _ = writeln!(m, "# Quality report: SmolLM2-135M-Instruct and its TinyStories fine-tune\n");
    let (limit, command) = match r["limit"].as_u64() {
        Some(l) => (format!("the first {l} documents of each task"), format!("cargo xtask report --limit {l}")),
        None => ("every document of each task".into(), "cargo xtask report --full".into()),
    };
    let _ = writeln!(
        m,
        "Produced by `{command}` on {} ({}), {:.0} minutes in all. Compressed variants are \
         applied to the base through `--delta` (merged in the base dtype, as `bitdelta apply` writes them); \
         calibration text: the C4 sample (`text/c4.utf8`). Zero-shot accuracy over {limit} (`bitdelta eval tasks`; \
         acc = argmax of the continuation's summed log-likelihood, ± its standard error); perplexity with the \
         protocol of `results.json` on held-out TinyStories (`text/tiny_heldout.utf8`) and on the last ~60 KB of \
         the C4 sample, which calibration never reads. *Gain kept* = the share of the fine-tune's log-perplexity \
         gain over the base on TinyStories that the variant keeps; *KL to fine-tune* = mean KL(fine-tune ‖ model) \
         of the next-token distributions over the same TinyStories tokens, in nats (`eval ppl --teacher`): how \
         faithfully the variant reproduces the fine-tune; *NLL vs fine-tune* = the variant's mean NLL per \
         TinyStories token minus the fine-tune's, ± its standard error paired over the {} windows (`eval ppl \
         --teacher`): differences smaller than about twice that error are not resolved by this text.\n",
        r["machine"].as_str().unwrap_or("?"),
        r["date"].as_str().unwrap_or("?"),
        r["seconds"].as_f64().unwrap_or(0.0) / 60.0,
        rows[0]["eval"]["tiny_window_nll"].as_array().map_or(0, Vec::len)
    );
    let _ = write!(m, "| model | size | compress | TinyStories ppl | gain kept | NLL vs fine-tune | KL to fine-tune | C4 ppl |");
    for (_, name) in TASKS {
        let _ = write!(m, " {name} |");
    }
    let _ = writeln!(m, " avg acc |");
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|{}---|", "---|".repeat(TASKS.len()));
    for row in &rows {
        let size = row["bytes"].as_f64().map_or("269.1 MB (bf16)".to_string(), |v| format!("{:.1} MB", v / 1e6));
        let secs = row["compress_seconds"].as_f64().map_or("–".to_string(), |v| format!("{v:.0} s"));
        let t = ppl(row, "tiny_ppl");
        let gap = match (row["eval"]["tiny_nll_gap_to_finetune"].as_f64(), row["eval"]["tiny_nll_gap_std_error"].as_f64()) {
            (Some(g), Some(se)) => format!("{g:+.4} ± {se:.4}"),
            _ => "–".into(),
        };
        let _ = write!(
            m,
            "| {} | {size} | {secs} | {t:.3} | {:.1}% | {gap} | {:.5} | {:.2} |",
            row["label"].as_str().unwrap_or("?"),
            share(t, "tiny_ppl"),
            ppl(row, "tiny_kl_to_finetune"),
            ppl(row, "c4_ppl")
        );
        let mut accs = Vec::new();
        for (task, _) in TASKS {
            match acc(row, task) {
                Some((a, _, se)) => {
                    accs.push(a);
                    let _ = write!(m, " {:.1} ± {:.1} |", 100.0 * a, 100.0 * se);
                }
                None => m.push_str(" – |"),
            }
        }
        let _ = writeln!(m, " {:.1} |", 100.0 * accs.iter().sum::<f64>() / accs.len().max(1) as f64);
    }
    let by_label = |l: &str| rows.iter().find(|r| r["label"] == l);
    let pairs: Vec<String> = ORDERING
        .iter()
        .filter_map(|&(a, b)| {
            let (ra, rb) = (by_label(a)?, by_label(b)?);
            let (d, se) = paired(ra, rb, "tiny")?;
            let c4 = paired(ra, rb, "c4").map_or(String::new(), |(d, se)| format!("; C4 {d:+.4} ± {se:.4} nats ({:.2} vs {:.2})", ppl(ra, "c4_ppl"), ppl(rb, "c4_ppl")));
            let tasks = paired_mean_acc(ra, rb).map_or(String::new(), |(d, se, _)| format!("; mean accuracy {:+.1} ± {:.1} points", 100.0 * d, 100.0 * se));
            Some(format!(
                "{a} − {b}: TinyStories {d:+.4} ± {se:.4} nats ({:.3} vs {:.3}; KL to the fine-tune {:.5} vs {:.5}){c4}{tasks}",
                ppl(ra, "tiny_ppl"),
                ppl(rb, "tiny_ppl"),
                ppl(ra, "tiny_kl_to_finetune"),
                ppl(rb, "tiny_kl_to_finetune")
            ))
        })
        .collect();
    if !pairs.is_empty() {
        let _ = writeln!(m, "\nCalibration stage by stage: mean NLL per token on held-out TinyStories and C4, paired over the same windows, and mean zero-shot accuracy, paired over the same documents:\n");
        for p in pairs {
            let _ = writeln!(m, "- {p}");
        }
    }
    // Accuracy against the fine-tune's, document by document: far tighter than the tables'
    // unpaired errors, since close variants answer most documents alike.
    if rows.len() > 2 {
        let _ = writeln!(
            m,
            "\nZero-shot accuracy minus the fine-tune's, in points, ± its standard error paired document by document \
             (the same documents; mean over the five tasks); *agree* = share of all these documents where the model picks \
             the fine-tune's answer:\n"
        );
        let _ = write!(m, "| model |");
        for (_, name) in TASKS {
            let _ = write!(m, " {name} |");
        }
        let _ = writeln!(m, " mean | agree |\n|---|{}---|---|", "---|".repeat(TASKS.len()));
        for row in rows.iter().filter(|r| r["label"] != "fine-tune") {
            let _ = write!(m, "| {} |", row["label"].as_str().unwrap_or("?"));
            for (task, _) in TASKS {
                let cell = paired_acc(row, f, task).map_or("–".into(), |(d, se, _)| format!("{:+.1} ± {:.1}", 100.0 * d, 100.0 * se));
                let _ = write!(m, " {cell} |");
            }
            let cells = paired_mean_acc(row, f).map_or(("–".into(), "–".into()), |(d, se, agree)| (format!("{:+.1} ± {:.1}", 100.0 * d, 100.0 * se), format!("{:.1}%", 100.0 * agree)));
            let _ = writeln!(m, " {} | {} |", cells.0, cells.1);
        }
    }
    let _ = writeln!(m, "\nacc_norm (per byte of continuation), same documents:\n");
    let _ = write!(m, "| model |");
    for (_, name) in TASKS {
        let _ = write!(m, " {name} |");
    }
    let _ = writeln!(m, "\n|---|{}", "---|".repeat(TASKS.len()));
    for row in &rows {
        let _ = write!(m, "| {} |", row["label"].as_str().unwrap_or("?"));
        for (task, _) in TASKS {
            let _ = write!(m, " {} |", acc(row, task).map_or("–".into(), |(_, n, _)| format!("{:.1}", 100.0 * n)));
        }
        m.push('\n');
    }
    let _ = writeln!(m, "\n![TinyStories perplexity and mean accuracy per variant](report/report.svg)\n");
    let _ = writeln!(m, "The numbers behind this page: `report/report.json`.");
    m
}

/// Two bar charts: held-out TinyStories perplexity and mean task accuracy, per variant.
fn plot(r: &Value) -> String {
    let rows = r["rows"].as_array().cloned().unwrap_or_default();
    let labels: Vec<String> = rows.iter().map(|row| row["label"].as_str().unwrap_or("?").to_string()).collect();
    let ppl: Vec<f64> = rows.iter().map(|row| row["eval"]["tiny_ppl"].as_f64().unwrap_or(0.0)).collect();
    let acc: Vec<f64> = rows
        .iter()
        .map(|row| {
            let v: Vec<f64> = TASKS.iter().filter_map(|(t, _)| acc(row, t).map(|a| 100.0 * a.0)).collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        })
        .collect();
    let (w, bar_h, left) = (760.0, 22.0, 130.0);
    let panel = rows.len() as f64 * bar_h;
    let height = 2.0 * panel + 130.0;
    let mut sv = String::new();
    let _ = writeln!(sv, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(sv, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let chart = |sv: &mut String, top: f64, title: &str, values: &[f64], lo: f64, hi: f64, fmt: &dyn Fn(f64) -> String| {
        let _ = writeln!(sv, r#"<text x="10" y="{}" font-weight="bold">{title}</text>"#, top - 8.0);
        for (i, (label, v)) in labels.iter().zip(values).enumerate() {
            let y = top + i as f64 * bar_h;
            let len = ((v - lo) / (hi - lo)).clamp(0.0, 1.0) * (w - left - 90.0);
            let colour = if i < 2 { "#9d9d9d" } else { "#4c78a8" };
            let _ = writeln!(sv, r#"<text x="{}" y="{}" text-anchor="end">{label}</text>"#, left - 6.0, y + 15.0);
            let _ = writeln!(sv, r#"<rect x="{left}" y="{}" width="{len:.1}" height="{}" fill="{colour}"/>"#, y + 3.0, bar_h - 6.0);
            let _ = writeln!(sv, r#"<text x="{:.1}" y="{}">{}</text>"#, left + len + 6.0, y + 15.0, fmt(*v));
        }
    };
    let (pmin, pmax) = (ppl.iter().cloned().fold(f64::INFINITY, f64::min), ppl.iter().cloned().fold(0.0, f64::max));
    chart(&mut sv, 30.0, "Held-out TinyStories perplexity (lower is better; axis from 0.95 × the lowest)", &ppl, 0.95 * pmin, pmax, &|v| format!("{v:.3}"));
    let (amin, amax) = (acc.iter().cloned().fold(f64::INFINITY, f64::min), acc.iter().cloned().fold(0.0, f64::max));
    chart(&mut sv, panel + 90.0, "Mean zero-shot accuracy over the five tasks, % (axis from the lowest − 2)", &acc, amin - 2.0, amax, &|v| format!("{v:.1}"));
    sv.push_str("</svg>\n");
    sv
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row as `evaluate` builds it, with one task's documents as `eval tasks --json` lists them.
    fn row(labels: [u64; 4], picks: [u64; 4]) -> Value {
        let documents: Vec<Value> = labels.iter().zip(picks).map(|(l, p)| json!({ "label": l, "pick": p, "pick_norm": 0, "loglik": [-1.0, -2.0, -3.0] })).collect();
        let mut tasks = json!({ "tasks": [{ "task": "arc_easy", "documents": documents }] });
        compact_documents(&mut tasks);
        json!({ "eval": { "tasks": tasks } })
    }

    #[test]
    fn accuracy_paired_document_by_document() {
        let (a, b) = (row([0, 1, 2, 0], [0, 1, 0, 0]), row([0, 1, 2, 0], [0, 0, 2, 1]));
        let t = &a["eval"]["tasks"]["tasks"][0];
        assert_eq!((t["labels"].as_str(), t["picks"].as_str(), t["picks_norm"].as_str()), (Some("0 1 2 0"), Some("0 1 0 0"), Some("0 0 0 0")));
        assert!(t.get("documents").is_none());
        // Right or wrong per document: a 1 1 0 1, b 1 0 1 0; differences 0 1 −1 1, mean 1/4,
        // sample variance 11/12, standard error √(11/48); the same pick on the first only.
        let (d, se, agree) = paired_acc(&a, &b, "arc_easy").unwrap();
        assert!((d - 0.25).abs() < 1e-12 && (se - (11.0f64 / 48.0).sqrt()).abs() < 1e-12 && (agree - 0.25).abs() < 1e-12, "{d} {se} {agree}");
        // Other right answers: not the same documents, no pairing.
        assert!(paired_acc(&a, &row([0, 1, 2, 1], [0, 1, 0, 0]), "arc_easy").is_none());
        assert!(paired_acc(&a, &b, "piqa").is_none());
    }
}
