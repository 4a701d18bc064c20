//! Per-input-file units of the data stages, cached across builds in the
//! store's cache for the kind ([`crate::StageCtx::cache`]).
//!
//! A unit is what a stage makes of one input file (a downloaded file, one
//! Parquet part of its input): a few files in named roles (`docs`,
//! `removed`, `index`) and a small record `KEY.json` listing them with the
//! unit's metadata (counts, what was skipped). Its key hashes everything its
//! bytes depend on (the kind's version, the params that matter, the input
//! file's contents), so an unchanged file is never processed twice. A unit is
//! built in the stage's work directory, its files put into the cache
//! ([`crate::data::cache`]) as `KEY.ROLE.NAME`, the record last, so the cache
//! holds whole units only; a unit is reused only when the record and every
//! file match their recorded BLAKE3, and built again otherwise. The build
//! that uses a unit hard-links its files into `out/` and its record into
//! `out/units/`, and `gc` keeps a unit while an artifact links it.
//!
//! A file that cannot be read or parsed fails the stage, or with
//! [`OnError::Skip`] is left out: [`gather`] logs it and lists it in the
//! metric `skipped`. When every file is left out the stage fails, naming
//! them and their first errors.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::data::cache::Cache;
use crate::StageCtx;

/// A unit in the cache: its files by role, in order, and its metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Unit {
    pub key: String,
    pub files: BTreeMap<String, Vec<String>>,
    pub meta: Value,
}

/// The cache of one stage's units.
pub struct Units {
    cache: Cache,
    work: PathBuf,
    out: PathBuf,
}

/// What a data stage does with an input file it cannot read or parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Fail,
    Skip,
}

/// The units of a stage's input files, in order, from each file's label and
/// its unit (`true`: from the cache) or error; returns them with how many
/// came from the cache. An error fails the stage naming the file, or with
/// `Skip` is logged and listed in the metric `skipped` (file and error).
pub fn gather(
    results: impl IntoIterator<Item = (String, Result<(Unit, bool)>)>,
    on_error: OnError,
    ctx: &mut StageCtx,
) -> Result<(Vec<Unit>, usize)> {
    let (mut units, mut skipped, mut cached) = (Vec::new(), Vec::new(), 0);
    for (label, result) in results {
        match result {
            Ok((unit, hit)) => {
                cached += usize::from(hit);
                units.push(unit);
            }
            Err(e) if on_error == OnError::Skip => {
                eprintln!("warning: skipped {label}: {e:#}");
                skipped.push(json!({ "file": label, "error": format!("{e:#}") }));
            }
            Err(e) => return Err(e.context(format!("cannot read {label} (on_error = \"skip\" leaves such a file out)"))),
        }
    }
    // Nothing left is no output to publish: the stage fails here, not its readers.
    if units.is_empty() && !skipped.is_empty() {
        let files: Vec<&str> = skipped.iter().filter_map(|s| s["file"].as_str()).collect();
        let shown = if files.len() > 10 { format!("{}, … ({} in all)", files[..10].join(", "), files.len()) } else { files.join(", ") };
        let errors: String = skipped
            .iter()
            .take(3)
            .map(|s| format!("\n  {}: {}", s["file"].as_str().unwrap_or(""), s["error"].as_str().unwrap_or("")))
            .collect();
        bail!("every input was skipped (on_error = \"skip\"), so nothing is left to publish: {shown}; the first errors:{errors}");
    }
    if !skipped.is_empty() {
        ctx.metric("skipped", &skipped);
    }
    Ok((units, cached))
}

/// The key of a unit: BLAKE3 of everything it depends on, as JSON.
pub fn key(material: &Value) -> String {
    blake3::hash(material.to_string().as_bytes()).to_hex().to_string()
}

/// The BLAKE3 of a file's contents, streamed.
pub fn file_digest(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    let file = fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    hasher.update_reader(file).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hasher.finalize().to_hex().to_string())
}

impl Units {
    pub fn new(ctx: &StageCtx) -> Result<Self> {
        Ok(Units { cache: Cache::open(&ctx.cache)?, work: ctx.work.join("units"), out: ctx.out.clone() })
    }

    /// The unit `key` if the cache holds it whole, each file as it was made.
    pub fn load(&self, key: &str) -> Option<Unit> {
        let record = format!("{key}.json");
        if !self.cache.verified(&record) {
            return None;
        }
        let unit: Unit = serde_json::from_slice(&fs::read(self.cache.path(&record)).ok()?).ok()?;
        unit.files.values().flatten().all(|f| self.cache.verified(f)).then_some(unit)
    }

    /// Builds unit `key`: `build` writes its files into `ROLE/` folders of
    /// the directory it is given and returns the unit's metadata.
    pub fn build(&self, key: &str, build: impl FnOnce(&Path) -> Result<Value>) -> Result<Unit> {
        let scratch = self.work.join(key);
        let _ = fs::remove_dir_all(&scratch);
        fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
        let meta = build(&scratch)?;
        let mut files = BTreeMap::new();
        for role in sorted_entries(&scratch)? {
            let role_name = name_of(&role);
            let mut names = Vec::new();
            for file in sorted_entries(&role)? {
                let name = format!("{key}.{role_name}.{}", name_of(&file));
                self.cache.insert(&file, &name)?;
                names.push(name);
            }
            files.insert(role_name, names);
        }
        let unit = Unit { key: key.to_string(), files, meta };
        let record = scratch.join(format!("{key}.json"));
        fs::write(&record, serde_json::to_vec(&unit)?).with_context(|| format!("cannot write {}", record.display()))?;
        self.cache.insert(&record, &format!("{key}.json"))?;
        let _ = fs::remove_dir_all(&scratch);
        Ok(unit)
    }

    /// A cache file of a unit, to read.
    pub fn path(&self, name: &str) -> PathBuf {
        self.cache.path(name)
    }

    /// Links the units' records into `out/units/` and the files of `role`
    /// into `out/DIR/`, numbered in order as `part-00000.parquet`, … or, when
    /// `numbered` is false, under their cache names. Returns the paths made.
    pub fn link(&self, units: &[Unit], role: &str, dir: &str, numbered: bool) -> Result<Vec<PathBuf>> {
        let records = self.out.join("units");
        fs::create_dir_all(&records)?;
        let target = self.out.join(dir);
        fs::create_dir_all(&target).with_context(|| format!("cannot create {}", target.display()))?;
        let mut made = Vec::new();
        for unit in units {
            let record = records.join(format!("{}.json", unit.key));
            if !record.exists() {
                self.cache.link(&format!("{}.json", unit.key), &record)?;
            }
            for name in unit.files.get(role).into_iter().flatten() {
                let to = target.join(if numbered { crate::formats::docs::part_name(made.len()) } else { name.clone() });
                self.cache.link(name, &to)?;
                made.push(to);
            }
        }
        Ok(made)
    }
}

fn name_of(path: &Path) -> String {
    path.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    Ok(entries)
}
