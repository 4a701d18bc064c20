//! Numbered checkpoint directories in a stage's work dir.
//!
//! Checkpoint `N` (taken after `N` updates) is the directory `step-N` (zero
//! padded, so names sort by step). It is written as `step-N.tmp`, every file
//! synced, then renamed: a run killed at any moment leaves complete
//! checkpoints and at most a `.tmp` directory, which the next run removes.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub struct Checkpoints {
    dir: PathBuf,
    keep: usize,
}

const PREFIX: &str = "step-";

impl Checkpoints {
    /// Checkpoints under `dir`, keeping the last `keep` (at least one).
    pub fn open(dir: &Path, keep: usize) -> Result<Checkpoints> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                // Every rank of a stage opens them; another may have removed it first.
                if let Err(e) = fs::remove_dir_all(&path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        return Err(e).with_context(|| format!("cannot remove {}", path.display()));
                    }
                }
            }
        }
        Ok(Checkpoints { dir: dir.to_path_buf(), keep: keep.max(1) })
    }

    /// Complete checkpoints, oldest first, as (step, directory).
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let step = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix(PREFIX)?.parse().ok());
            if let Some(step) = step {
                found.push((step, path));
            }
        }
        found.sort();
        Ok(found)
    }

    pub fn latest(&self) -> Result<Option<(u64, PathBuf)>> {
        Ok(self.list()?.pop())
    }

    /// The directory checkpoint `step` is written in until it is complete:
    /// where other ranks add their files while [`Checkpoints::save`] runs.
    pub fn partial(&self, step: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{step:010}.tmp"))
    }

    /// Writes checkpoint `step`: `write` fills the directory it is given.
    /// Then drops all but the last `keep`.
    pub fn save(&self, step: u64, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let tmp = self.partial(step);
        let done = self.dir.join(format!("{PREFIX}{step:010}"));
        fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        write(&tmp)?;
        for entry in fs::read_dir(&tmp)? {
            fs::File::open(entry?.path())?.sync_all()?;
        }
        if done.exists() {
            fs::remove_dir_all(&done)?;
        }
        fs::rename(&tmp, &done).with_context(|| format!("cannot rename {} to {}", tmp.display(), done.display()))?;
        fs::File::open(&self.dir)?.sync_all()?;
        let all = self.list()?;
        for (_, old) in &all[..all.len().saturating_sub(self.keep)] {
            fs::remove_dir_all(old).with_context(|| format!("cannot remove {}", old.display()))?;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_k_and_ignores_partial_ones() {
        let dir = tempfile::tempdir().unwrap();
        let ckpts = Checkpoints::open(dir.path(), 2).unwrap();
        for step in [5, 10, 100] {
            ckpts.save(step, |d| Ok(fs::write(d.join("state.json"), step.to_string())?)).unwrap();
        }
        let steps: Vec<u64> = ckpts.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [10, 100]);
        let (step, path) = ckpts.latest().unwrap().unwrap();
        assert_eq!((step, fs::read_to_string(path.join("state.json")).unwrap()), (100, "100".to_string()));

        // A checkpoint that failed half way is not listed, and is cleared on open.
        assert!(ckpts.save(200, |_| anyhow::bail!("disk full")).is_err());
        assert_eq!(ckpts.latest().unwrap().unwrap().0, 100);
        Checkpoints::open(dir.path(), 2).unwrap();
        assert!(!dir.path().join("step-0000000200.tmp").exists());
    }
}
