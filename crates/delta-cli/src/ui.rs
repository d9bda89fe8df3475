//! Terminal output shared by the subcommands: progress bars and human-readable sizes.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar on stderr; hidden with `--json` or when stderr is not a terminal.
pub fn progress(len: u64, what: &str, bytes: bool, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), if quiet { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() });
    let template = if bytes {
        "{prefix:>9} [{bar:32}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}"
    } else {
        "{prefix:>9} [{bar:32}] {pos}/{len} eta {eta} {msg}"
    };
    bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    bar.set_prefix(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `13.4 MB` (decimal units, like file managers and `transformers`).
pub fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// Fails early, before any work, when the output exists and `--force` was not given, or when
/// the folder it would go in does not exist.
pub fn check_output(path: &std::path::Path, force: bool) -> anyhow::Result<()> {
    if !force && std::fs::symlink_metadata(path).is_ok() {
        anyhow::bail!("{} already exists (use --force to replace it)", path.display());
    }
    let parent = output_dir(path);
    if !parent.is_dir() {
        anyhow::bail!("{}: output folder {} does not exist", path.display(), parent.display());
    }
    Ok(())
}

/// The folder an output path goes in (`.` for a bare file name).
fn output_dir(path: &std::path::Path) -> &std::path::Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."))
}

/// Writes `bytes` to `path` atomically (temporary sibling, fsync, rename); an existing `path`
/// is replaced only with `overwrite`.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8], overwrite: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let mut f = delta_format::atomic::AtomicFile::create(path, overwrite)?;
    f.file().write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    f.commit()?;
    Ok(())
}

/// The process's peak resident memory so far (Linux: VmHWM of /proc/self/status).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
