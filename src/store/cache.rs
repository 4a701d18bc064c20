//! Results a kind caches across its builds (`artifacts/.cache/KIND/`),
//! finer than a stage: eval's per model and task, the data stages' per
//! input file. The stage runner writes each file with a sidecar
//! `NAME.blake3` holding its BLAKE3, checks it before reusing the file
//! (one that fails is made again) and hard-links the file into the
//! artifacts that use it. Here the engine checks them all (`verify`) and
//! removes those no artifact links, or whose bytes no longer match (`gc`).

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::Store;
use crate::files::each_in_tree;
use crate::hash::hash_file;

/// The ending of a cached file's sidecar, which holds its BLAKE3.
const SIDECAR: &str = ".blake3";

/// A cached file against the BLAKE3 recorded beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unit {
    Intact,
    /// No BLAKE3 recorded (made by an older llmflow): never reused as it is.
    Unrecorded,
    /// Its bytes differ from the recorded BLAKE3.
    Damaged,
}

impl Store {
    /// Results a kind shares across its builds; see `StageCtx::cache`.
    pub fn cache_dir(&self, kind: &str) -> PathBuf {
        self.root.join(".cache").join(kind)
    }

    /// Every cached file (not the sidecars), sorted.
    fn cached_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(self.root.join(".cache"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|kind| fs::read_dir(kind.path()).into_iter().flatten().flatten().map(|e| e.path()))
            .filter(|p| !is_sidecar(p))
            .collect();
        files.sort();
        files
    }

    /// Every cached file checked against its recorded BLAKE3, in parallel.
    pub fn check_units(&self) -> Vec<(PathBuf, Unit)> {
        self.cached_files()
            .into_par_iter()
            .filter(|p| p.is_file())
            .map(|p| {
                let unit = check_unit(&p);
                (p, unit)
            })
            .collect()
    }

    /// The cache files to remove when `doomed` goes: those no artifact
    /// outside `doomed` links (each file's link count less its links inside
    /// `doomed` is 1, only the cache holds it) and those whose bytes no
    /// longer match their BLAKE3; each with its sidecar, and sidecars whose
    /// file is gone.
    pub fn unlinked_cache_files(&self, doomed: &[PathBuf]) -> Vec<PathBuf> {
        let mut links: HashMap<(u64, u64), u64> = HashMap::new();
        for dir in doomed.iter().filter(|d| d.is_dir()) {
            let _ = each_in_tree(dir, &mut |path, is_dir| {
                if let (false, Ok(m)) = (is_dir, fs::symlink_metadata(path)) {
                    *links.entry((m.dev(), m.ino())).or_default() += 1;
                }
                Ok(())
            });
        }
        let mut unlinked = Vec::new();
        for path in self.cached_files() {
            let Ok(m) = fs::symlink_metadata(&path) else { continue };
            let unused = !m.is_file() || m.nlink() - links.get(&(m.dev(), m.ino())).copied().unwrap_or(0) <= 1;
            if unused || check_unit(&path) == Unit::Damaged {
                unlinked.push(sidecar(&path));
                unlinked.push(path);
            }
        }
        // Sidecars whose file is gone.
        for kind in fs::read_dir(self.root.join(".cache")).into_iter().flatten().flatten() {
            for entry in fs::read_dir(kind.path()).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.strip_suffix(SIDECAR).is_some_and(|file| !kind.path().join(file).exists()) {
                    unlinked.push(entry.path());
                }
            }
        }
        unlinked.sort();
        unlinked.dedup();
        unlinked
    }
}

fn is_sidecar(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().ends_with(SIDECAR))
}

fn sidecar(path: &Path) -> PathBuf {
    let mut name = path.file_name().expect("a file").to_os_string();
    name.push(SIDECAR);
    path.with_file_name(name)
}

fn check_unit(path: &Path) -> Unit {
    let Ok(recorded) = fs::read_to_string(sidecar(path)) else { return Unit::Unrecorded };
    match hash_file(path) {
        Ok(digest) if digest == recorded.trim() => Unit::Intact,
        _ => Unit::Damaged,
    }
}
