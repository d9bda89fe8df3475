//! The Fig. 4 plot of `cargo xtask bench kernels`: speed-up of the batched delta path over B dense
//! GEMVs, and the share of the measured copy bandwidth it reaches, against the batch size B, one
//! line per matrix size N. Drawn as SVG, rasterised to PNG with resvg.

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

const COLORS: [&str; 4] = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"];
const BATCHES: [f64; 6] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0];

/// One panel: y(B) per N (colours as in the legend) on a log2 B axis, with a dashed goal line.
#[allow(clippy::too_many_arguments)]
fn panel(s: &mut String, x0: f64, title: &str, series: &[(u64, Vec<(f64, f64)>)], y_max: f64, step: f64, goal: f64, unit: &str) {
    let (w, h, top) = (300.0, 240.0, 90.0);
    let px = |b: f64| x0 + 50.0 + b.log2() / 5.0 * (w - 60.0);
    let py = |v: f64| top + h - v.min(y_max) / y_max * h;
    let _ = writeln!(s, r##"<text x="{}" y="{}" font-size="13" font-weight="bold">{title}</text>"##, x0 + 50.0, top - 12.0);
    let _ = writeln!(s, r##"<rect x="{}" y="{top}" width="{}" height="{h}" fill="none" stroke="#999"/>"##, x0 + 50.0, w - 60.0);
    for k in 0..=(y_max / step).round() as usize {
        let v = step * k as f64;
        let _ = writeln!(s, r##"<text x="{}" y="{}" text-anchor="end">{v:.0}{unit}</text>"##, x0 + 45.0, py(v) + 4.0);
        let _ = writeln!(s, r##"<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="#eee"/>"##, x0 + 50.0, x0 + w - 10.0, py(v), py(v));
    }
    for b in BATCHES {
        let _ = writeln!(s, r##"<text x="{}" y="{}" text-anchor="middle">{b}</text>"##, px(b), top + h + 16.0);
    }
    let _ = writeln!(s, r##"<text x="{}" y="{}" text-anchor="middle">requests per batch B</text>"##, x0 + w / 2.0 + 20.0, top + h + 34.0);
    let _ = writeln!(
        s,
        r##"<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="#c00" stroke-dasharray="5,4"/><text x="{}" y="{}" fill="#c00">goal {goal}{unit}</text>"##,
        x0 + 50.0,
        x0 + w - 10.0,
        py(goal),
        py(goal),
        x0 + 54.0,
        py(goal) - 4.0
    );
    for (k, (_, points)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let path: Vec<String> = points.iter().map(|&(b, v)| format!("{:.1},{:.1}", px(b), py(v))).collect();
        let _ = writeln!(s, r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"##, path.join(" "));
        for &(b, v) in points {
            let _ = writeln!(s, r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"##, px(b), py(v));
        }
    }
}

/// The plot of `kernels.json` as SVG.
pub fn kernels_svg(k: &Value) -> String {
    let sweep = k["sweep"].as_array().cloned().unwrap_or_default();
    let mut sizes: Vec<u64> = sweep.iter().filter_map(|r| r["n"].as_u64()).collect();
    sizes.dedup();
    let series = |field: &str, scale: f64| -> Vec<(u64, Vec<(f64, f64)>)> {
        sizes
            .iter()
            .map(|&n| {
                let points = sweep.iter().filter(|r| r["n"].as_u64() == Some(n)).filter_map(|r| Some((r["b"].as_f64()?, r[field].as_f64()? * scale))).collect();
                (n, points)
            })
            .collect()
    };
    let mut s = String::new();
    let _ = writeln!(s, r##"<svg xmlns="http://www.w3.org/2000/svg" width="640" height="380" font-family="DejaVu Sans, sans-serif" font-size="11">"##);
    let _ = writeln!(s, r##"<rect width="640" height="380" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="20" y="22" font-size="14" font-weight="bold">Batched 1-bit delta product on the CPU (BitDelta Fig. 4 sweep)</text><text x="20" y="38" fill="#555">{}; copy bandwidth {:.1} GB/s, read {:.1} GB/s</text>"##,
        k["machine"].as_str().unwrap_or(""),
        k["copy_gb_s"].as_f64().unwrap_or(0.0),
        k["read_gb_s"].as_f64().unwrap_or(0.0)
    );
    for (k, n) in sizes.iter().enumerate() {
        let _ = writeln!(s, r##"<text x="{}" y="58" fill="{}" font-weight="bold">N = M = {n}</text>"##, 70 + 130 * k, COLORS[k % COLORS.len()]);
    }
    panel(&mut s, 0.0, "speed-up over B dense GEMVs", &series("speedup", 1.0), 10.0, 2.0, 4.0, "×");
    panel(&mut s, 320.0, "share of copy bandwidth", &series("fraction_of_copy_bandwidth", 100.0), 150.0, 25.0, 60.0, "%");
    s.push_str("</svg>\n");
    s
}

/// Rasterises `svg` to a PNG at `path` (text in the system's fonts).
pub fn write_png(svg: &str, path: &Path) -> Result<()> {
    let mut options = resvg::usvg::Options::default();
    options.fontdb_mut().load_system_fonts();
    let tree = resvg::usvg::Tree::from_str(svg, &options).context("parsing the plot's SVG")?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).context("allocating the image")?;
    resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.save_png(path).with_context(|| format!("writing {}", path.display()))
}
