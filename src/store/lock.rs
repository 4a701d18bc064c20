//! Locks on the store: the store-wide lock (runs share it, `gc` takes it
//! alone) with its list of holders, a lock per stage held while it builds,
//! and a lock beside each temporary build directory.

use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{Store, MARKER};
use crate::files::{hostname, now_rfc3339, remove_tree, unique};

/// How a command uses the store: runs share it, gc needs it alone.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Shared,
    Exclusive,
}

/// The store-wide lock and this process's entry among its holders; both go
/// when dropped (or when the process dies).
pub struct StoreLock {
    _marker: File,
    _holder: File,
    holder_path: PathBuf,
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.holder_path);
    }
}

/// A temporary build directory's lock: held while the build runs, so no
/// other process (in any PID namespace, on any host sharing the store)
/// removes it as left over.
pub struct TmpDir {
    pub path: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = remove_tree(&self.path);
        let _ = fs::remove_file(&self.lock_path);
    }
}

/// Released when dropped (or when the process dies).
pub struct StageLock {
    _file: File,
}

impl Store {
    /// Takes the store-wide lock. A run shares it with other runs; `gc` waits
    /// until no run holds it (or, with `wait` false, fails naming them).
    /// `on_wait` is told who holds it before waiting.
    pub fn hold(&self, access: Access, what: &str, wait: bool, on_wait: impl FnOnce(&[String])) -> Result<StoreLock> {
        let path = self.root.join(MARKER);
        let marker =
            File::open(&path).with_context(|| format!("{} is not an llmflow artifact store (no {MARKER})", self.root.display()))?;
        let attempt = match access {
            Access::Shared => marker.try_lock_shared(),
            Access::Exclusive => marker.try_lock(),
        };
        match attempt {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holders = self.holders();
                if !wait {
                    bail!(crate::error::StoreBusy(format!("the store {} is in use by: {}", self.root.display(), holders.join("; "))));
                }
                on_wait(&holders);
                match access {
                    Access::Shared => marker.lock_shared()?,
                    Access::Exclusive => marker.lock()?,
                }
            }
            Err(fs::TryLockError::Error(e)) => return Err(e).context(format!("cannot lock {}", path.display())),
        }
        let dir = self.root.join(".locks").join("holders");
        fs::create_dir_all(&dir)?;
        let holder_path = dir.join(format!("{}.{}.{}", hostname(), std::process::id(), unique()));
        let mut holder = File::create(&holder_path)?;
        holder.lock()?;
        let since = now_rfc3339();
        writeln!(holder, "{what} (process {} on {}, since {since})", std::process::id(), hostname())?;
        Ok(StoreLock { _marker: marker, _holder: holder, holder_path })
    }

    /// Who holds the store-wide lock: each holder keeps its file locked.
    fn holders(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.root.join(".locks").join("holders")) else { return Vec::new() };
        let mut found: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let mut file = File::open(e.path()).ok()?;
                if file.try_lock_shared().is_ok() {
                    return None; // left by a process that died
                }
                let mut text = String::new();
                file.read_to_string(&mut text).ok()?;
                Some(text.trim().to_string())
            })
            .collect();
        found.sort();
        found
    }

    /// Takes the stage's lock, waiting if another process builds it;
    /// `on_wait` is told the holder's pid once.
    pub fn lock(&self, stage: &str, on_wait: impl FnOnce(Option<u32>)) -> Result<StageLock> {
        let path = self.lock_path(stage);
        fs::create_dir_all(path.parent().expect("has parent"))?;
        let mut file = fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                on_wait(read_pid(&mut file));
                file.lock()?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(e).context(format!("cannot lock {}", path.display())),
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(StageLock { _file: file })
    }

    /// The pid building `stage` right now, if any.
    pub fn holder(&self, stage: &str) -> Option<u32> {
        let mut file = File::open(self.lock_path(stage)).ok()?;
        match file.try_lock_shared() {
            Ok(()) => None,
            Err(_) => Some(read_pid(&mut file).unwrap_or(0)),
        }
    }

    fn lock_path(&self, stage: &str) -> PathBuf {
        self.root.join(".locks").join(format!("{stage}.lock"))
    }
    /// A fresh temporary directory for building `stage`, with a lock beside
    /// it (`NAME.lock`) held until the build is published or dropped.
    pub fn make_tmp(&self, stage: &str, key: &str) -> Result<TmpDir> {
        let name = format!("{stage}.{}.{}.{}", &key[..12], std::process::id(), unique());
        let path = self.tmp_root().join(&name);
        fs::create_dir_all(self.tmp_root())?;
        let lock_path = self.tmp_root().join(format!("{name}.lock"));
        let lock = File::create(&lock_path).with_context(|| format!("cannot create {}", lock_path.display()))?;
        lock.lock()?;
        fs::create_dir_all(path.join("out")).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TmpDir { path, lock_path, _lock: lock })
    }

    /// Removes temporary directories whose builds are over: those whose lock
    /// can be taken. A directory without a lock (the old one a `--force`
    /// swapped out, or a build killed between its two first steps) is
    /// removed once it is a minute old.
    pub fn clean_stale_tmp(&self) {
        let Ok(entries) = fs::read_dir(self.tmp_root()) else { return };
        let entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        for path in &entries {
            let Some(dir) = path.to_str().and_then(|p| p.strip_suffix(".lock")).map(PathBuf::from) else { continue };
            let Ok(lock) = File::open(path) else { continue };
            if lock.try_lock().is_ok() {
                let _ = remove_tree(&dir);
                let _ = fs::remove_file(path);
            }
        }
        let old =
            |p: &Path| fs::symlink_metadata(p).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 60));
        for path in entries.iter().filter(|p| p.extension().is_none_or(|e| e != "lock")) {
            let mut lock = path.clone().into_os_string();
            lock.push(".lock");
            if !Path::new(&lock).exists() && old(path) {
                let _ = remove_tree(path);
            }
        }
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}
