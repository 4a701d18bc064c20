//! Files on disk as the store and its caches write them: small files
//! replaced whole, caches of many items in chunks, read-only trees, swaps
//! in one step; and the clock and host names records carry.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Writes a cache of many items (thousands of stages) as JSON lines: the
/// header, then the items in chunks, which [`read_chunked`] parses in parallel.
pub fn write_chunked<H: Serialize, T: Serialize>(path: &Path, header: &H, items: &[T]) -> Result<()> {
    let mut bytes = serde_json::to_vec(header)?;
    for chunk in items.chunks(items.len().div_ceil(16).max(256)) {
        bytes.push(b'\n');
        bytes.extend(serde_json::to_vec(chunk)?);
    }
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// What [`write_chunked`] wrote; `None` if the file is missing or unreadable.
pub fn read_chunked<H: DeserializeOwned, T: DeserializeOwned + Send>(path: &Path) -> Option<(H, Vec<T>)> {
    let bytes = fs::read(path).ok()?;
    let mut lines = bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty());
    let header = serde_json::from_slice(lines.next()?).ok()?;
    let chunks: Vec<&[u8]> = lines.collect();
    let items: Option<Vec<Vec<T>>> = chunks.par_iter().map(|chunk| serde_json::from_slice(chunk).ok()).collect();
    Some((header, items?.into_iter().flatten().collect()))
}

/// Writes a small file so readers see the old or the new contents, never half.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("has parent");
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp{}", path.file_name().unwrap().to_string_lossy(), std::process::id()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    sync_dir(dir)
}

pub fn sync_tree(dir: &Path) -> Result<()> {
    each_in_tree(dir, &mut |path, is_dir| if is_dir { sync_dir(path) } else { Ok(File::open(path)?.sync_all()?) })
}

/// Calls `f` on every file and folder under `dir`, each folder after what
/// it holds, `dir` last; `f` is told which are folders.
pub fn each_in_tree(dir: &Path, f: &mut impl FnMut(&Path, bool) -> Result<()>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            each_in_tree(&entry.path(), f)?;
        } else if kind.is_file() {
            f(&entry.path(), false)?;
        }
    }
    f(dir, true)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all().with_context(|| format!("cannot sync {}", dir.display()))
}

/// Seconds since the epoch as RFC 3339, UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Total size in bytes of everything under `path`.
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path).map(|rd| rd.flatten().map(|e| disk_usage(&e.path())).sum()).unwrap_or(0)
}

/// Makes a finished build's output read-only (files 0444, folders 0555), so
/// a later stage or a user cannot change an artifact by accident. Done
/// before the files are listed, so the manifest records their final state.
pub fn seal(dir: &Path) -> Result<()> {
    each_in_tree(dir, &mut |path, is_dir| Ok(fs::set_permissions(path, fs::Permissions::from_mode(if is_dir { 0o555 } else { 0o444 }))?))
}

/// Removes a tree that may hold sealed (read-only) folders.
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    fn unseal(dir: &Path) {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                unseal(&entry.path());
            }
        }
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            unseal(path);
            fs::remove_dir_all(path)
        }
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// A suffix no other process picks: the clock's nanoseconds and a counter.
pub fn unique() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos:x}{:x}", COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// Swaps two paths in one step (`renameat2(RENAME_EXCHANGE)`).
pub fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let a = std::ffi::CString::new(a.as_os_str().as_encoded_bytes())?;
    let b = std::ffi::CString::new(b.as_os_str().as_encoded_bytes())?;
    // SAFETY: both paths are NUL-terminated; AT_FDCWD resolves them as given.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Every file under `dir`, as paths relative to `base` with `/`.
pub fn walk(base: &Path, dir: &Path, found: &mut Vec<String>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(base, &path, found);
        } else if let Ok(rel) = path.strip_prefix(base) {
            found.push(rel.to_string_lossy().into_owned());
        }
    }
}
