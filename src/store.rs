//! The artifact store on disk.
//!
//! ```text
//! artifacts/<stage>/<key>/out/             the stage's output
//! artifacts/<stage>/<key>/manifest.json    what built it, and every file's hash
//! artifacts/.tmp/                          artifacts being built (never counted)
//! artifacts/.work/<stage>/<key>/           checkpoints of an interrupted build
//! artifacts/.logs/<stage>/<key>.log        the stage process's output
//! artifacts/.state/<stage>.json            last good key and last failure
//! artifacts/.state/jobs/<stage>.json       a Slurm job in flight: its id, state and node
//! artifacts/.locks/<stage>.lock            held while a stage builds
//! artifacts/.locks/holders/                 one file per run or gc using the store
//! artifacts/.llmflow-store                  marks the folder as a store; runs lock it
//!                                           shared, gc exclusive
//! ```
//!
//! An artifact counts as built once `<stage>/<key>/manifest.json` exists. It
//! is written inside a temporary directory, synced, made read-only and the
//! directory renamed into place (or swapped with the one it replaces), so a
//! crash at any moment leaves either the old artifact or the new one, whole.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::hash::{self, FileEntry, Stat};

pub struct Store {
    pub root: PathBuf,
    /// `root`, opened on first use; see [`Store::open_in`].
    dir: std::sync::OnceLock<Option<File>>,
}

/// Everything known about one built artifact.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub stage: String,
    pub key: String,
    pub kind: String,
    pub version: u32,
    /// Params with defaults applied, volatile ones included.
    pub params: serde_json::Value,
    /// The params the key hashes.
    pub key_params: serde_json::Value,
    /// Input slot → the upstream stage and its output digest.
    pub inputs: BTreeMap<String, InputRef>,
    /// External file → its content digest.
    pub deps: BTreeMap<String, String>,
    pub files: Vec<FileEntry>,
    pub output_digest: String,
    pub metrics: serde_json::Map<String, serde_json::Value>,
    pub started: String,
    pub finished: String,
    pub duration_s: f64,
    pub host: String,
    pub llmflow_version: String,
}

/// What `status` reads of each artifact's manifest: where it is, its files
/// and its output digest. Reading only these skips parsing the params and
/// metrics, which dominate a no-op status of a big pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Head {
    pub stage: String,
    pub key: String,
    pub files: Vec<FileEntry>,
    pub output_digest: String,
}

impl Manifest {
    pub fn head(&self) -> Head {
        Head { stage: self.stage.clone(), key: self.key.clone(), files: self.files.clone(), output_digest: self.output_digest.clone() }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRef {
    pub stage: String,
    pub digest: String,
}

/// Per-stage bookkeeping that outlives a single artifact.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StageState {
    /// Key of the last artifact built successfully; `status` explains what
    /// changed since.
    pub latest: Option<String>,
    pub last_failure: Option<Failure>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    pub key: String,
    pub log: PathBuf,
    pub at: String,
    pub message: String,
}

/// The result of checking an artifact's files against its manifest.
#[derive(Debug, PartialEq, Eq)]
pub enum Integrity {
    Intact,
    /// Files missing or whose contents no longer match.
    Damaged(Vec<String>),
}

/// The file that marks a folder as an llmflow store; runs hold a shared
/// lock on it and `gc` an exclusive one.
pub const MARKER: &str = ".llmflow-store";

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

impl Store {
    pub fn new(root: PathBuf) -> Store {
        Store { root, dir: std::sync::OnceLock::new() }
    }

    /// Creates the store, or checks that an existing folder is one: a folder
    /// holding other things is refused rather than filled with artifacts (and
    /// later swept by `gc`). A store built into before the marker existed (it
    /// has `.locks/`) is marked now.
    pub fn create(&self) -> Result<()> {
        let marker = self.root.join(MARKER);
        if marker.is_file() {
            return Ok(());
        }
        let adoptable = match fs::read_dir(&self.root) {
            Err(_) => true,
            Ok(mut entries) => entries.next().is_none() || self.root.join(".locks").is_dir(),
        };
        if !adoptable {
            bail!(crate::config::ConfigError(format!(
                "{} exists and is not an llmflow artifact store (it has no {MARKER}): set `pipeline.artifacts` to a new or empty folder",
                self.root.display()
            )));
        }
        fs::create_dir_all(&self.root).with_context(|| format!("cannot create the artifact store {}", self.root.display()))?;
        write_atomic(&marker, b"llmflow artifact store\n")
    }

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
                    bail!(StoreBusy(format!("the store {} is in use by: {}", self.root.display(), holders.join("; "))));
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

    /// Opens `rel`, a path inside the store, relative to the store's open
    /// directory (`openat`): the kernel does not walk the store's own path
    /// again for each of the thousands of files a status of a big pipeline
    /// reads.
    fn open_in(&self, rel: &Path) -> std::io::Result<File> {
        let Some(dir) = self.dir() else { return File::open(self.root.join(rel)) };
        let rel = std::ffi::CString::new(rel.as_os_str().as_encoded_bytes())?;
        // SAFETY: `dir` is an open directory and `rel` a NUL-terminated path; the
        // returned descriptor is new and owned by the File.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), rel.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: see above.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// [`Stat`] of `rel`, a path inside the store, as [`Store::open_in`] finds it.
    fn stat_in(&self, rel: &Path) -> std::io::Result<Stat> {
        let Some(dir) = self.dir() else { return Stat::of(&self.root.join(rel)) };
        let rel = std::ffi::CString::new(rel.as_os_str().as_encoded_bytes())?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `dir` is open, `rel` NUL-terminated, `st` large enough for the result.
        if unsafe { libc::fstatat(dir.as_raw_fd(), rel.as_ptr(), st.as_mut_ptr(), 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fstatat succeeded, so it filled `st`.
        let st = unsafe { st.assume_init() };
        Ok(Stat { size: st.st_size as u64, mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128, inode: st.st_ino })
    }

    fn dir(&self) -> Option<&File> {
        self.dir.get_or_init(|| File::open(&self.root).ok()).as_ref()
    }

    pub fn artifact_dir(&self, stage: &str, key: &str) -> PathBuf {
        self.root.join(stage).join(key)
    }

    pub fn out_dir(&self, stage: &str, key: &str) -> PathBuf {
        self.artifact_dir(stage, key).join("out")
    }

    pub fn work_dir(&self, stage: &str, key: &str) -> PathBuf {
        self.root.join(".work").join(stage).join(key)
    }

    pub fn log_path(&self, stage: &str, key: &str) -> PathBuf {
        self.root.join(".logs").join(stage).join(format!("{key}.log"))
    }

    /// Results a kind shares across its builds; see `StageCtx::cache`.
    pub fn cache_dir(&self, kind: &str) -> PathBuf {
        self.root.join(".cache").join(kind)
    }

    /// The cache files no artifact outside `doomed` links: each file's link
    /// count less its links inside `doomed` is 1 (only the cache holds it).
    pub fn unlinked_cache_files(&self, doomed: &[PathBuf]) -> Vec<PathBuf> {
        use std::os::unix::fs::MetadataExt;
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
        for kind in fs::read_dir(self.root.join(".cache")).into_iter().flatten().flatten() {
            for entry in fs::read_dir(kind.path()).into_iter().flatten().flatten() {
                let Ok(m) = entry.metadata() else { continue };
                if !m.is_file() || m.nlink() - links.get(&(m.dev(), m.ino())).copied().unwrap_or(0) <= 1 {
                    unlinked.push(entry.path());
                }
            }
        }
        unlinked.sort();
        unlinked
    }

    pub fn tmp_root(&self) -> PathBuf {
        self.root.join(".tmp")
    }

    /// The artifacts the last status of `pipeline` found fresh (see `plan::statuses`).
    pub fn known_heads_path(&self, pipeline: &Path) -> PathBuf {
        let id = hash::hash_bytes(pipeline.as_os_str().as_encoded_bytes());
        self.root.join(".state").join(format!("heads-{}.json", &id[..16]))
    }

    /// Records that `pipeline` builds into this store, so a `gc` run from
    /// another pipeline file keeps its artifacts.
    pub fn register(&self, pipeline: &Path) -> Result<()> {
        let id = hash::hash_bytes(pipeline.as_os_str().as_encoded_bytes());
        let path = self.root.join(".state").join("pipelines").join(format!("{}.json", &id[..16]));
        if path.exists() {
            return Ok(());
        }
        write_atomic(&path, &serde_json::to_vec(pipeline)?)
    }

    /// Every pipeline file registered with [`Store::register`], with its entry.
    pub fn pipelines(&self) -> Vec<(PathBuf, PathBuf)> {
        let Ok(entries) = fs::read_dir(self.root.join(".state").join("pipelines")) else { return Vec::new() };
        let mut found: Vec<(PathBuf, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let file: PathBuf = serde_json::from_slice(&fs::read(e.path()).ok()?).ok()?;
                Some((e.path(), file))
            })
            .collect();
        found.sort();
        found
    }

    /// The record of `stage`'s Slurm job while it is in flight (see `slurm::JobRecord`).
    pub fn job_path(&self, stage: &str) -> PathBuf {
        self.root.join(".state").join("jobs").join(format!("{stage}.json"))
    }

    pub fn stat_cache_path(&self) -> PathBuf {
        self.root.join(".state").join("file-hashes.json")
    }

    pub fn read_manifest(&self, stage: &str, key: &str) -> Option<Manifest> {
        let bytes = fs::read(self.artifact_dir(stage, key).join("manifest.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn read_head(&self, stage: &str, key: &str) -> Option<Head> {
        thread_local! {
            // One buffer per thread, not one per manifest: status reads thousands.
            static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let mut file = self.open_in(&Path::new(stage).join(key).join("manifest.json")).ok()?;
        BUFFER.with_borrow_mut(|bytes| {
            bytes.clear();
            file.read_to_end(bytes).ok()?;
            serde_json::from_slice(bytes).ok()
        })
    }

    /// Keys of every artifact of `stage` on disk.
    pub fn keys(&self, stage: &str) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.root.join(stage)) else { return Vec::new() };
        let mut keys: Vec<String> = entries.filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_string())).collect();
        keys.sort();
        keys
    }

    /// Stage directories in the store (excluding the store's own `.dirs`).
    pub fn stages(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.root) else { return Vec::new() };
        let mut names: Vec<String> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().to_str()?.to_string();
                (e.file_type().ok()?.is_dir() && !name.starts_with('.')).then_some(name)
            })
            .collect();
        names.sort();
        names
    }

    pub fn state(&self, stage: &str) -> StageState {
        fs::read(self.state_path(stage)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    pub fn update_state(&self, stage: &str, f: impl FnOnce(&mut StageState)) -> Result<()> {
        let mut state = self.state(stage);
        f(&mut state);
        write_atomic(&self.state_path(stage), &serde_json::to_vec_pretty(&state)?)
    }

    fn state_path(&self, stage: &str) -> PathBuf {
        self.root.join(".state").join(format!("{stage}.json"))
    }

    /// Checks an artifact's files by size, mtime and inode; only files whose
    /// stat changed are re-hashed. `deep` re-hashes everything (`verify`).
    pub fn check(&self, m: &Head, deep: bool) -> Integrity {
        let out = Path::new(&m.stage).join(&m.key).join("out");
        let damaged: Vec<String> = m
            .files
            .iter()
            .filter(|f| {
                let path = out.join(&f.path);
                match self.stat_in(&path) {
                    Err(_) => true,
                    Ok(stat) if stat.size != f.size => true,
                    Ok(stat) if stat == f.stat && !deep => false,
                    Ok(_) => hash::hash_file(&self.root.join(&path)).map_or(true, |h| h != f.blake3),
                }
            })
            .map(|f| f.path.clone())
            .collect();
        if damaged.is_empty() {
            Integrity::Intact
        } else {
            Integrity::Damaged(damaged)
        }
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

    /// Moves a finished build into place. `tmp` holds `out/`, already made
    /// read-only (see [`seal`]); the manifest is written beside it,
    /// everything is synced, then the directory is renamed. An existing
    /// artifact with the same key (a forced rebuild) is swapped with the new
    /// one in one step, so it stays whole until the new one is in place.
    pub fn publish(&self, tmp: TmpDir, manifest: &Manifest) -> Result<PathBuf> {
        sync_tree(&tmp.path.join("out"))?;
        let mpath = tmp.path.join("manifest.json");
        let mut f = File::create(&mpath)?;
        f.write_all(&serde_json::to_vec_pretty(manifest)?)?;
        f.sync_all()?;
        fs::set_permissions(&mpath, fs::Permissions::from_mode(0o444))?;
        sync_dir(&tmp.path)?;

        let parent = self.root.join(&manifest.stage);
        fs::create_dir_all(&parent)?;
        let dest = parent.join(&manifest.key);
        if dest.exists() {
            exchange(&tmp.path, &dest).with_context(|| format!("cannot swap the rebuilt artifact into {}", dest.display()))?;
            // `tmp` now holds the old artifact; dropping it removes it.
        } else {
            fs::rename(&tmp.path, &dest).with_context(|| format!("cannot move the build into {}", dest.display()))?;
        }
        sync_dir(&parent)?;
        drop(tmp);
        Ok(dest)
    }

    /// Files under an artifact's `out/` that its manifest does not list.
    pub fn extra_files(&self, m: &Head) -> Vec<String> {
        let out = self.out_dir(&m.stage, &m.key);
        let listed: std::collections::HashSet<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        let mut found = Vec::new();
        walk(&out, &out, &mut found);
        found.retain(|f| !listed.contains(f.as_str()));
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
}

/// Released when dropped (or when the process dies).
pub struct StageLock {
    _file: File,
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// The store is held by others and the caller would not wait; exit code 1.
#[derive(Debug)]
pub struct StoreBusy(pub String);

impl std::fmt::Display for StoreBusy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for StoreBusy {}

pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// A suffix no other process picks: the clock's nanoseconds and a counter.
fn unique() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos:x}{:x}", COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// Swaps two paths in one step (`renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
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

/// Every file under `dir`, as paths relative to `base` with `/`.
fn walk(base: &Path, dir: &Path, found: &mut Vec<String>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(base, &path, found);
        } else if let Ok(rel) = path.strip_prefix(base) {
            found.push(rel.to_string_lossy().into_owned());
        }
    }
}

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

fn sync_tree(dir: &Path) -> Result<()> {
    each_in_tree(dir, &mut |path, is_dir| if is_dir { sync_dir(path) } else { Ok(File::open(path)?.sync_all()?) })
}

/// Calls `f` on every file and folder under `dir`, each folder after what
/// it holds, `dir` last; `f` is told which are folders.
fn each_in_tree(dir: &Path, f: &mut impl FnMut(&Path, bool) -> Result<()>) -> Result<()> {
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

fn sync_dir(dir: &Path) -> Result<()> {
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
