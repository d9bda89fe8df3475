//! The calibration picture (SVG), after the Per-Axis paper's Fig. 2: for every block and
//! projection type, the mode stage 1 kept, and how much it lowered the held-out layer-output MSE
//! from the weight-space scales; with stage 2, its held-out loss before and after.

use std::fmt::Write;

use crate::distill::DistillReport;
use crate::layerwise::LayerFit;

const KINDS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
const CELL: f64 = 18.0;
const LEFT: f64 = 80.0;

/// Block index and projection row of a weight name, `model.layers.N.*.KIND.weight`.
fn place(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (block, rest) = rest.split_once('.')?;
    let kind = rest.strip_suffix(".weight")?.rsplit('.').next()?;
    Some((block.parse().ok()?, KINDS.iter().position(|k| *k == kind)?))
}

fn mode_colour(kept: &str) -> &'static str {
    match kept {
        "scalar" => "#4c78a8",
        "per-output" => "#f58518",
        "per-input" => "#54a24b",
        "two-sided" => "#b279a2",
        _ => "#bab0ac", // a weight-space start that no fit beat
    }
}

/// Relative reduction 0..1 -> white..dark green.
fn gain_colour(g: f64) -> String {
    let g = g.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * g).round() as u8;
    format!("#{:02x}{:02x}{:02x}", mix(255.0, 0.0), mix(255.0, 104.0), mix(255.0, 55.0))
}

/// The picture for a calibration run. `title` names the artifact.
pub fn calibration_svg(title: &str, fits: &[LayerFit], distill: Option<&DistillReport>) -> String {
    let blocks = fits.iter().filter_map(|f| place(&f.name)).map(|(b, _)| b + 1).max().unwrap_or(0);
    let width = LEFT + blocks as f64 * CELL + 40.0;
    let panel = KINDS.len() as f64 * CELL;
    let (top1, top2) = (60.0, 60.0 + panel + 70.0);
    let height = top2 + panel + if distill.is_some() { 110.0 } else { 60.0 };
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#);
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#, escape(title));
    let _ = writeln!(s, r#"<text x="10" y="{}">Stage 1: mode kept per block and projection (held-out layer-output MSE decides)</text>"#, top1 - 10.0);
    let _ = writeln!(
        s,
        r#"<text x="10" y="{}">Stage 1: held-out layer-output MSE below the weight-space scales</text>"#,
        top2 - 10.0
    );
    // Scale of the second panel.
    for (i, g) in [0.0, 0.25, 0.5, 0.75, 1.0].iter().enumerate() {
        let x = width - 40.0 - (5 - i) as f64 * 34.0;
        let _ = writeln!(s, r##"<rect x="{x}" y="{}" width="12" height="12" fill="{}" stroke="#ddd"/>"##, top2 - 21.0, gain_colour(*g));
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}%</text>"#, x + 14.0, top2 - 11.0, (g * 100.0) as u32);
    }
    for (top, _) in [(top1, 0), (top2, 1)] {
        for (k, kind) in KINDS.iter().enumerate() {
            let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">{kind}</text>"#, LEFT - 6.0, top + k as f64 * CELL + 13.0);
        }
        for b in (0..blocks).step_by(5) {
            let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{b}</text>"#, LEFT + b as f64 * CELL + CELL / 2.0, top + panel + 13.0);
        }
    }
    for f in fits {
        let Some((b, k)) = place(&f.name) else { continue };
        let (x, y) = (LEFT + b as f64 * CELL, k as f64 * CELL);
        let kept = f.heldout_mse.get(&f.kept).copied().unwrap_or(f.init_mse);
        let gain = if f.init_mse > 0.0 { 1.0 - kept / f.init_mse } else { 0.0 };
        let tip = format!("{}: kept {}, held-out MSE {:.3e} (weight-space {:.3e})", f.name, f.kept, kept, f.init_mse);
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="{}" height="{}" fill="{}" stroke="white"><title>{}</title></rect>"#,
            top1 + y,
            CELL,
            CELL,
            mode_colour(&f.kept),
            escape(&tip)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{x}" y="{}" width="{}" height="{}" fill="{}" stroke="#ddd"><title>{}: {:.1}% lower</title></rect>"##,
            top2 + y,
            CELL,
            CELL,
            gain_colour(gain),
            escape(&f.name),
            100.0 * gain
        );
    }
    // Legend of the modes, with counts.
    let mut x = LEFT;
    let legend_y = top1 + panel + 24.0;
    for mode in ["scalar", "per-output", "per-input", "two-sided", "weight-space"] {
        let n = fits.iter().filter(|f| if mode == "weight-space" { f.kept.contains("weight-space") } else { f.kept == mode }).count();
        if n == 0 {
            continue;
        }
        let _ = writeln!(s, r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/>"#, legend_y, mode_colour(mode));
        let label = format!("{mode} ({n})");
        let _ = writeln!(s, r#"<text x="{}" y="{}">{label}</text>"#, x + 16.0, legend_y + 10.0);
        x += 16.0 + 7.0 * label.len() as f64 + 14.0;
    }
    let mean_gain = fits.iter().filter(|f| f.init_mse > 0.0).map(|f| 1.0 - f.heldout_mse.get(&f.kept).copied().unwrap_or(f.init_mse) / f.init_mse).sum::<f64>()
        / fits.len().max(1) as f64;
    let mut y = top2 + panel + 34.0;
    let _ = writeln!(s, r#"<text x="10" y="{y}">Mean over layers: {:.1}% lower held-out layer-output MSE than the weight-space scales.</text>"#, 100.0 * mean_gain);
    if let Some(d) = distill {
        y += 20.0;
        let loss = match d.loss {
            crate::DistillLoss::Mse => "MSE of the logits",
            crate::DistillLoss::Kl => "KL of the next-token distributions",
        };
        let _ = writeln!(
            s,
            r#"<text x="10" y="{y}">Stage 2 (end to end, {} steps of {} samples, lr {}): held-out {loss} {:.4} → {:.4} ({:.1}% lower).</text>"#,
            d.steps,
            d.batch,
            d.lr,
            d.heldout_before,
            d.heldout_after,
            100.0 * (1.0 - d.heldout_after / d.heldout_before)
        );
        // Training loss per step as a sparkline.
        let (w, h, x0) = (width - LEFT - 40.0, 40.0, LEFT);
        let y0 = y + 12.0;
        let max = d.train_losses.iter().cloned().fold(0.0, f64::max).max(f64::MIN_POSITIVE);
        let n = d.train_losses.len().max(2) - 1;
        let points: Vec<String> = d
            .train_losses
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{:.1},{:.1}", x0 + w * i as f64 / n as f64, y0 + h * (1.0 - l / max)))
            .collect();
        let _ = writeln!(s, r#"<text x="10" y="{}">training loss</text>"#, y0 + h / 2.0 + 4.0);
        let _ = writeln!(s, r##"<polyline fill="none" stroke="#4c78a8" stroke-width="1.5" points="{}"/>"##, points.join(" "));
        let _ = writeln!(s, r##"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="#999"/>"##, y0 + h, x0 + w, y0 + h);
    }
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_weights_by_block_and_kind() {
        assert_eq!(place("model.layers.12.mlp.down_proj.weight"), Some((12, 6)));
        assert_eq!(place("model.layers.0.self_attn.q_proj.weight"), Some((0, 0)));
        assert_eq!(place("model.norm.weight"), None);
    }
}
