//! The artifact store on disk.
//!
//! ```text
//! artifacts/<stage>/<key>/out/             the stage's output
//! artifacts/<stage>/<key>/manifest.json    what built it, and every file's hash
//! artifacts/.tmp/                          artifacts being built (never counted)
//! artifacts/.work/<stage>/<key>/           checkpoints of an interrupted build
//! artifacts/.logs/<stage>/<key>.log        the stage process's output
//! artifacts/.state/<stage>.json            last good key and last failure
//! artifacts/.state/jobs/<stage>.json       a job in flight (Slurm): its id, state and node
//! artifacts/.cache/<kind>/                 results a kind shares across builds, each with NAME.blake3
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

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::files::{exchange, sync_dir, sync_tree, walk, write_atomic};
use crate::hash::{self, FileEntry, Stat};

mod cache;
mod lock;

pub use cache::Unit;
pub use lock::{Access, StageLock, StoreLock, TmpDir};

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

/// The fingerprint inputs of one stage: what its key hashes. A manifest
/// holds them all, so its key can be checked against what it says.
#[derive(Debug, Clone, Serialize)]
pub struct KeyParts<'a> {
    pub kind: &'a str,
    pub version: u32,
    pub params: &'a serde_json::Value,
    pub inputs: &'a BTreeMap<String, InputRef>,
    pub deps: &'a BTreeMap<String, String>,
}

impl KeyParts<'_> {
    /// blake3 over canonical JSON (object keys sorted).
    pub fn key(&self) -> String {
        hash::hash_bytes(&serde_json::to_vec(self).expect("serializable"))
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

/// A stage's job in flight on an executor that queues it (Slurm), as the
/// run following it records it for `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The executor's name for its jobs, e.g. `Slurm`.
    pub executor: String,
    pub id: String,
    /// `queued` or `running`.
    pub state: String,
    /// The node it runs on, once it runs.
    pub node: Option<String>,
    /// Why it waits (Slurm's reason: `Resources`, `Priority`, …).
    pub reason: Option<String>,
}

impl JobRecord {
    pub fn queued(&self) -> bool {
        self.state == "queued"
    }

    /// What `status` says of the stage.
    pub fn describe(&self) -> String {
        let job = format!("{} job {}", self.executor, self.id);
        match (&self.node, &self.reason) {
            (Some(node), _) if self.state == "running" => format!("{job} running on {node}"),
            (_, Some(reason)) => format!("{job} queued ({reason})"),
            _ => format!("{job} {}", self.state),
        }
    }
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
            bail!(crate::error::ConfigError(format!(
                "{} exists and is not an llmflow artifact store (it has no {MARKER}): set `pipeline.artifacts` to a new or empty folder",
                self.root.display()
            )));
        }
        fs::create_dir_all(&self.root).with_context(|| format!("cannot create the artifact store {}", self.root.display()))?;
        write_atomic(&marker, b"llmflow artifact store\n")
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

    /// Where the record of `stage`'s job in flight is kept.
    pub fn job_path(&self, stage: &str) -> PathBuf {
        self.root.join(".state").join("jobs").join(format!("{stage}.json"))
    }

    /// The record of `stage`'s job in flight, if any.
    pub fn job(&self, stage: &str) -> Option<JobRecord> {
        serde_json::from_slice(&fs::read(self.job_path(stage)).ok()?).ok()
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
}
