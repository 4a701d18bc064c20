//! Each (model, task) result is its own cached unit, kept across builds of
//! the stage in the store's cache for the kind ([`crate::StageCtx::cache`]).
//!
//! A unit's key hashes everything its scores depend on: the model's files
//! (config, weights, tokenizer), the task's params (not its name), the digest
//! of every file the task reads, the stage's seed and `batch_tokens`, the
//! device and the eval implementation's version. Adding a task or a model
//! to a stage therefore scores only the new pairs, and a task that fails
//! leaves the others' units for the next run.
//!
//! A unit is one JSON file (`KEY.json`: outcomes, per-item records, seconds
//! spent scoring), written into the artifact's `units/` and hard-linked
//! into the cache ([`crate::data::cache`]); a cached unit whose bytes match
//! their recorded BLAKE3 is linked back into the new artifact (one that does
//! not is scored again), so `gc` keeps a unit while an artifact holds it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::report::Scored;
use super::tasks::{task_files, Task, TaskScores};
use crate::data::cache::Cache;

/// What goes into a unit's key besides the model and the task.
pub struct KeyParts<'a> {
    pub project_dir: &'a Path,
    pub seed: u64,
    pub batch_tokens: usize,
    pub device: String,
    pub version: u32,
}

/// A hash of the files that make the model: its config, weights and
/// tokenizer (not its training log, whose timings differ between two runs
/// that train the same weights).
pub fn model_digest(dir: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        let path = dir.join(file);
        hasher.update_mmap_rayon(&path).with_context(|| format!("cannot read {}", path.display()))?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// The key of `task` on the model whose digest is `model`.
pub fn key(task: &Task, model: &str, parts: &KeyParts) -> Result<String> {
    let mut params = serde_json::to_value(task)?;
    params.as_object_mut().expect("a task is a table").remove("name");
    let files = task_files(parts.project_dir, &task.file)?
        .iter()
        .map(|path| {
            let digest = blake3::Hasher::new().update_mmap(path).with_context(|| format!("cannot read {}", path.display()))?.finalize();
            let name = path.strip_prefix(parts.project_dir).unwrap_or(path).to_string_lossy().into_owned();
            Ok(json!([name, digest.to_hex().to_string()]))
        })
        .collect::<Result<Vec<_>>>()?;
    let material = json!({
        "eval": parts.version, "model": model, "task": params, "files": files,
        "seed": parts.seed, "batch_tokens": parts.batch_tokens, "device": parts.device,
    });
    Ok(blake3::hash(material.to_string().as_bytes()).to_hex().to_string())
}

#[derive(Serialize, Deserialize)]
struct UnitFile {
    outcomes: TaskScores,
    items: Vec<Value>,
    seconds: f64,
}

/// Where units go: `cache` (shared) and `units` (the artifact's folder).
pub struct Units {
    pub cache: Cache,
    pub units: PathBuf,
}

impl Units {
    /// The unit `key` from the cache, linked into the artifact; `None` when
    /// it was never scored (or its file is damaged or does not parse: it is
    /// scored again).
    pub fn load(&self, key: &str) -> Result<Option<Scored>> {
        let name = format!("{key}.json");
        if !self.cache.verified(&name) {
            return Ok(None);
        }
        let cached = self.cache.path(&name);
        let Ok(text) = fs::read_to_string(&cached) else { return Ok(None) };
        let Ok(unit) = serde_json::from_str::<UnitFile>(&text) else {
            eprintln!("warning: {} does not parse; scoring it again", cached.display());
            return Ok(None);
        };
        self.cache.link(&name, &self.units.join(&name))?;
        let mut outcomes = unit.outcomes;
        outcomes.items = unit.items;
        Ok(Some(Scored { outcomes, seconds: unit.seconds }))
    }

    /// Writes unit `key` into the artifact and links it into the cache.
    pub fn save(&self, key: &str, scored: &Scored) -> Result<()> {
        let unit = UnitFile { outcomes: scored.outcomes.clone(), items: scored.outcomes.items.clone(), seconds: scored.seconds };
        let name = format!("{key}.json");
        let path = self.units.join(&name);
        fs::write(&path, serde_json::to_vec(&unit)?).with_context(|| format!("cannot write {}", path.display()))?;
        self.cache.insert(&path, &name)
    }
}
