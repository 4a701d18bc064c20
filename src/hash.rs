//! Content hashing: files, directory manifests, and a stat cache so unchanged
//! files are not hashed twice.
//!
//! Large files are hashed with blake3's memory-mapped, multi-threaded path,
//! which runs near memory bandwidth. Small ones are read whole; mapping them
//! costs more than it saves.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Below this size a file is read into memory instead of mapped.
const MMAP_THRESHOLD: u64 = 1 << 20;

pub fn hash_file(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    let size = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    if size >= MMAP_THRESHOLD {
        hasher.update_mmap_rayon(path).with_context(|| format!("cannot hash {}", path.display()))?;
    } else {
        hasher.update(&fs::read(path).with_context(|| format!("cannot read {}", path.display()))?);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// What identifies a file's contents without reading it, as Bazel does:
/// if size, mtime and inode are unchanged, the contents are taken as unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
}

impl Stat {
    pub fn of(path: &Path) -> std::io::Result<Stat> {
        let m = fs::metadata(path)?;
        Ok(Stat { size: m.len(), mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128, inode: m.ino() })
    }
}

/// One file of an artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the artifact's `out/`, `/`-separated.
    pub path: String,
    pub size: u64,
    pub blake3: String,
    pub stat: Stat,
}

/// Lists and hashes every file under `dir`, sorted by path; files are hashed
/// in parallel.
pub fn manifest_files(dir: &Path) -> Result<Vec<FileEntry>> {
    let mut paths = Vec::new();
    walk(dir, dir, &mut paths)?;
    paths.sort();
    use rayon::prelude::*;
    paths
        .par_iter()
        .map(|rel| {
            let full = dir.join(rel);
            let stat = Stat::of(&full).with_context(|| format!("cannot stat {}", full.display()))?;
            Ok(FileEntry { path: rel.clone(), size: stat.size, blake3: hash_file(&full)?, stat })
        })
        .collect()
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(root, &path, out)?;
        } else if kind.is_file() || kind.is_symlink() {
            let rel = path.strip_prefix(root).expect("under root");
            let rel: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            out.push(rel.join("/"));
        }
    }
    Ok(())
}

/// The output digest: blake3 over the sorted (path, size, hash) list. Stat
/// data is left out, so the same bytes always give the same digest.
pub fn output_digest(files: &[FileEntry]) -> String {
    let mut h = blake3::Hasher::new();
    for f in files {
        h.update(f.path.as_bytes());
        h.update(&[0]);
        h.update(f.size.to_string().as_bytes());
        h.update(&[0]);
        h.update(f.blake3.as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex().to_string()
}

/// Remembers the hashes of files outside the store (corpora, scripts) by
/// their stat, so `status` does not re-read a gigabyte corpus each time.
pub struct StatCache {
    file: PathBuf,
    entries: BTreeMap<PathBuf, (Stat, String)>,
    dirty: bool,
}

impl StatCache {
    pub fn open(file: PathBuf) -> StatCache {
        let entries = fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        StatCache { file, entries, dirty: false }
    }

    pub fn hash(&mut self, path: &Path) -> Result<String> {
        let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if !meta.is_dir() {
            return self.hash_file(path);
        }
        // A directory's own stat does not change when a file in it is
        // rewritten, so it hashes as the output digest of its files, each
        // cached by its own stat.
        let mut rels = Vec::new();
        walk(path, path, &mut rels)?;
        rels.sort();
        let mut files = Vec::with_capacity(rels.len());
        for rel in rels {
            let full = path.join(&rel);
            let stat = Stat::of(&full).with_context(|| format!("cannot read {}", full.display()))?;
            files.push(FileEntry { blake3: self.hash_file(&full)?, path: rel, size: stat.size, stat });
        }
        Ok(output_digest(&files))
    }

    fn hash_file(&mut self, path: &Path) -> Result<String> {
        let stat = Stat::of(path).with_context(|| format!("cannot read {}", path.display()))?;
        if let Some((cached, digest)) = self.entries.get(path) {
            if *cached == stat {
                return Ok(digest.clone());
            }
        }
        let digest = hash_file(path)?;
        self.entries.insert(path.to_path_buf(), (stat, digest.clone()));
        self.dirty = true;
        Ok(digest)
    }

    /// Re-hashes every cached file under one of `roots`, whatever its stat
    /// says, and returns those whose contents changed without their size,
    /// mtime or inode changing; their entries now hold the new digest.
    pub fn recheck(&mut self, roots: &[PathBuf]) -> Result<Vec<PathBuf>> {
        let mut changed = Vec::new();
        for (path, (_, digest)) in self.entries.iter_mut() {
            if !roots.iter().any(|r| path.starts_with(r)) || !path.is_file() {
                continue;
            }
            let now = hash_file(path)?;
            if now != *digest {
                *digest = now;
                changed.push(path.clone());
                self.dirty = true;
            }
        }
        Ok(changed)
    }

    /// Saves the cache; losing it only costs re-hashing, so errors are ignored.
    pub fn save(&mut self) {
        if !self.dirty {
            return;
        }
        if let Ok(bytes) = serde_json::to_vec(&self.entries) {
            let _ = crate::files::write_atomic(&self.file, &bytes);
        }
        self.dirty = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_matches_blake3_of_contents() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&big, &data).unwrap();
        assert_eq!(hash_file(&big).unwrap(), blake3::hash(&data).to_hex().to_string());
        fs::write(dir.path().join("small"), b"abc").unwrap();
        assert_eq!(hash_file(&dir.path().join("small")).unwrap(), blake3::hash(b"abc").to_hex().to_string());
    }

    #[test]
    fn stat_cache_sees_a_rewritten_file_inside_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let deps = dir.path().join("corpus");
        fs::create_dir(&deps).unwrap();
        fs::write(deps.join("a.txt"), b"one").unwrap();
        let mut cache = StatCache::open(dir.path().join("cache.json"));
        let first = cache.hash(&deps).unwrap();
        assert_eq!(first, output_digest(&manifest_files(&deps).unwrap()));
        // Same name and size: the directory's own stat does not change.
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(deps.join("a.txt"), b"two").unwrap();
        let second = cache.hash(&deps).unwrap();
        assert_ne!(first, second);
        assert_eq!(second, output_digest(&manifest_files(&deps).unwrap()));
    }

    #[test]
    fn output_digest_ignores_stat_but_not_content() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/a"), b"1").unwrap();
        let first = manifest_files(dir.path()).unwrap();
        assert_eq!(first[0].path, "sub/a");
        fs::remove_file(dir.path().join("sub/a")).unwrap();
        fs::write(dir.path().join("sub/a"), b"1").unwrap();
        let again = manifest_files(dir.path()).unwrap();
        assert_eq!(output_digest(&first), output_digest(&again));
        fs::write(dir.path().join("sub/a"), b"2").unwrap();
        assert_ne!(output_digest(&first), output_digest(&manifest_files(dir.path()).unwrap()));
    }
}
