//! Atomic output: files and folders appear under their final name complete, or not at all.
//!
//! Everything this project writes is first written under a hidden temporary name in the same
//! folder (`.NAME.tmp-PID-N`), synced, then renamed into place; the rename is atomic on POSIX
//! filesystems. A value dropped without `commit` removes its temporary; a process killed
//! mid-write leaves only the hidden temporary, never a partial file under the final name.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{FormatError, Result};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn temp_sibling(dest: &Path, kind: &str) -> Result<PathBuf> {
    let name = dest.file_name().ok_or_else(|| {
        FormatError::io(dest, std::io::Error::new(std::io::ErrorKind::InvalidInput, "output path has no file name"))
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{}.{kind}-{}-{n}", name.to_string_lossy(), std::process::id());
    Ok(parent_of(dest).join(tmp))
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn check_dest(dest: &Path, overwrite: bool) -> Result<()> {
    if !overwrite && fs::symlink_metadata(dest).is_ok() {
        return Err(FormatError::OutputExists { path: dest.to_path_buf() });
    }
    let parent = parent_of(dest);
    if !parent.is_dir() {
        return Err(FormatError::io(&parent, std::io::Error::new(std::io::ErrorKind::NotFound, "output folder does not exist")));
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| FormatError::io(dir, e))
}

/// A file being written under a temporary name.
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    overwrite: bool,
    /// Bytes written so far, and how far disk writeback has been started.
    written: u64,
    flushed: u64,
}

impl AtomicFile {
    /// Starts writing `dest`. Fails with [`FormatError::OutputExists`] if it exists and
    /// `overwrite` is false.
    pub fn create(dest: &Path, overwrite: bool) -> Result<Self> {
        check_dest(dest, overwrite)?;
        let tmp = temp_sibling(dest, "tmp")?;
        let file = File::options().write(true).read(true).create_new(true).open(&tmp).map_err(|e| FormatError::io(&tmp, e))?;
        Ok(AtomicFile { dest: dest.to_path_buf(), tmp, file: Some(file), overwrite, written: 0, flushed: 0 })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file is open until commit")
    }

    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Records `len` more bytes appended to the file and, on Linux, asks the kernel to start
    /// writing each completed 8 MiB stretch to disk now, without waiting, so that the final
    /// sync in [`commit`](Self::commit) overlaps with the caller's work instead of following
    /// it. A performance hint only: durability still comes from `commit`.
    pub fn start_writeback(&mut self, len: u64) {
        const STRETCH: u64 = 8 << 20;
        self.written += len;
        if self.written - self.flushed < STRETCH {
            return;
        }
        #[cfg(target_os = "linux")]
        if let Some(f) = &self.file {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid open descriptor and a range inside the file; this only schedules I/O.
            unsafe {
                libc::sync_file_range(
                    f.as_raw_fd(),
                    self.flushed as libc::off64_t,
                    (self.written - self.flushed) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        self.flushed = self.written;
    }

    /// Syncs the data, renames it to the destination and syncs the folder.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("file is open until commit");
        file.sync_all().map_err(|e| FormatError::io(&self.tmp, e))?;
        drop(file);
        // Re-check: something may have appeared at the destination while we wrote.
        if !self.overwrite && fs::symlink_metadata(&self.dest).is_ok() {
            return Err(FormatError::OutputExists { path: self.dest.clone() });
        }
        fs::rename(&self.tmp, &self.dest).map_err(|e| FormatError::io(&self.dest, e))?;
        sync_dir(&parent_of(&self.dest))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() || self.tmp.exists() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A folder being filled under a temporary name (e.g. a model folder written by `apply`).
pub struct AtomicDir {
    dest: PathBuf,
    tmp: PathBuf,
    overwrite: bool,
    committed: bool,
}

impl AtomicDir {
    pub fn create(dest: &Path, overwrite: bool) -> Result<Self> {
        check_dest(dest, overwrite)?;
        if overwrite && fs::symlink_metadata(dest).is_ok() && !dest.is_dir() {
            return Err(FormatError::io(dest, std::io::Error::other("exists and is not a folder")));
        }
        let tmp = temp_sibling(dest, "tmp")?;
        fs::create_dir(&tmp).map_err(|e| FormatError::io(&tmp, e))?;
        Ok(AtomicDir { dest: dest.to_path_buf(), tmp, overwrite, committed: false })
    }

    /// Where files go until commit.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the folder into place. An existing destination (only with `overwrite`) is moved
    /// aside first and removed once the new folder is in place.
    pub fn commit(mut self) -> Result<()> {
        sync_dir(&self.tmp)?;
        let old = if fs::symlink_metadata(&self.dest).is_ok() {
            if !self.overwrite {
                return Err(FormatError::OutputExists { path: self.dest.clone() });
            }
            let old = temp_sibling(&self.dest, "old")?;
            fs::rename(&self.dest, &old).map_err(|e| FormatError::io(&self.dest, e))?;
            Some(old)
        } else {
            None
        };
        fs::rename(&self.tmp, &self.dest).map_err(|e| FormatError::io(&self.dest, e))?;
        self.committed = true;
        sync_dir(&parent_of(&self.dest))?;
        if let Some(old) = old {
            fs::remove_dir_all(&old).map_err(|e| FormatError::io(&old, e))?;
        }
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_appears_only_on_commit_and_respects_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        let mut f = AtomicFile::create(&dest, false).unwrap();
        f.file().write_all(b"hello").unwrap();
        assert!(!dest.exists());
        f.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"hello");
        assert!(matches!(AtomicFile::create(&dest, false), Err(FormatError::OutputExists { .. })));
        let mut f = AtomicFile::create(&dest, true).unwrap();
        f.file().write_all(b"bye").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"bye");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left behind");
    }

    #[test]
    fn dir_replaces_existing_only_with_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("model");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("old.txt"), "old").unwrap();
        assert!(matches!(AtomicDir::create(&dest, false), Err(FormatError::OutputExists { .. })));
        let d = AtomicDir::create(&dest, true).unwrap();
        fs::write(d.path().join("new.txt"), "new").unwrap();
        assert!(dest.join("old.txt").exists());
        d.commit().unwrap();
        assert!(!dest.join("old.txt").exists());
        assert_eq!(fs::read_to_string(dest.join("new.txt")).unwrap(), "new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let d = AtomicDir::create(&dir.path().join("other"), false).unwrap();
        drop(d);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "dropped dir is removed");
    }

    #[test]
    fn missing_parent_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(AtomicFile::create(&dir.path().join("no/such/file"), false), Err(FormatError::Io { .. })));
    }
}
