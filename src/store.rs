//! The artifact store on disk.
//!
//! ```text
//! artifacts/<stage>/<key>/out/             the stage's output
//! artifacts/<stage>/<key>/manifest.json    what built it, and every file's hash
//! artifacts/.tmp/                          artifacts being built (never counted)
//! artifacts/.work/<stage>/<key>/           checkpoints of an interrupted build
//! artifacts/.logs/<stage>/<key>.log        the stage process's output
//! artifacts/.state/<stage>.json            last good key and last failure
//! artifacts/.locks/<stage>.lock            held while a stage builds
//! ```
//!
//! An artifact counts as built once `<stage>/<key>/manifest.json` exists. It
//! is written inside a temporary directory, synced, and the directory is
//! renamed into place, so a crash at any moment leaves either no artifact or
//! a whole one.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
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

impl Store {
    pub fn new(root: PathBuf) -> Store {
        Store { root, dir: std::sync::OnceLock::new() }
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

    pub fn tmp_root(&self) -> PathBuf {
        self.root.join(".tmp")
    }

    /// The artifacts the last status of `pipeline` found fresh (see `plan::statuses`).
    pub fn known_heads_path(&self, pipeline: &Path) -> PathBuf {
        let id = hash::hash_bytes(pipeline.as_os_str().as_encoded_bytes());
        self.root.join(".state").join(format!("heads-{}.json", &id[..16]))
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

    /// A fresh temporary directory for building `stage`, named so a later run
    /// can tell whether its owner is still alive.
    pub fn make_tmp(&self, stage: &str, key: &str) -> Result<PathBuf> {
        let dir = self.tmp_root().join(format!("{stage}.{}.{}", &key[..12], std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(dir.join("out")).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// Removes temporary directories left by processes that no longer run.
    pub fn clean_stale_tmp(&self) {
        let Ok(entries) = fs::read_dir(self.tmp_root()) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.rsplit('.').next().and_then(|p| p.parse::<i32>().ok());
            if pid.is_none_or(|pid| !process_alive(pid)) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Moves a finished build into place. `tmp` holds `out/`; the manifest is
    /// written beside it, everything is synced, then the directory is renamed.
    /// An existing artifact with the same key (a forced rebuild) is replaced.
    pub fn publish(&self, tmp: &Path, manifest: &Manifest) -> Result<PathBuf> {
        sync_tree(&tmp.join("out"))?;
        let mpath = tmp.join("manifest.json");
        let mut f = File::create(&mpath)?;
        f.write_all(&serde_json::to_vec_pretty(manifest)?)?;
        f.sync_all()?;
        sync_dir(tmp)?;

        let parent = self.root.join(&manifest.stage);
        fs::create_dir_all(&parent)?;
        let dest = parent.join(&manifest.key);
        let trash = if dest.exists() {
            let trash = self.tmp_root().join(format!("replaced.{}.{}", manifest.key, std::process::id()));
            fs::rename(&dest, &trash)?;
            Some(trash)
        } else {
            None
        };
        fs::rename(tmp, &dest).with_context(|| format!("cannot move the build into {}", dest.display()))?;
        sync_dir(&parent)?;
        if let Some(trash) = trash {
            let _ = fs::remove_dir_all(trash);
        }
        Ok(dest)
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

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
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
    Ok(())
}

fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
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
