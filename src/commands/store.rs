//! Looking after the store: `verify` and `gc`.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use console::style;
use serde_json::json;

use super::{human_bytes, load, outln, print_json};
use crate::config::Pipeline;
use crate::error::{ConfigError, StageFailed};
use crate::files::{disk_usage, remove_tree};
use crate::graph::Dag;
use crate::plan;
use crate::store::{Access, Integrity, Store, Unit, MARKER};

/// `verify`: re-hashes every artifact in the store (files missing, changed
/// or not in the manifest), every unit the kinds cache, and every file the
/// pipeline's stages read, whatever their stat says. An artifact no stage
/// of the pipeline uses any more is reported apart: `gc` removes it, and its
/// damage fails nothing.
pub fn verify(file: &Path, json: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let store = Store::new(p.artifacts.clone());
    let started = Instant::now();
    let current = in_use(p, dag, &store)?;
    let mut artifacts = Vec::new();
    let mut bytes = 0u64;
    for stage in store.stages() {
        for key in store.keys(&stage) {
            let used = current.contains(&(stage.clone(), key.clone()));
            let Some(m) = store.read_manifest(&stage, &key) else {
                artifacts.push((stage.clone(), key, used, vec!["no readable manifest.json".to_string()]));
                continue;
            };
            bytes += m.files.iter().map(|f| f.size).sum::<u64>();
            let head = m.head();
            let mut problems = match store.check(&head, true) {
                Integrity::Intact => Vec::new(),
                Integrity::Damaged(files) => files.into_iter().map(|f| format!("{f} (missing or changed)")).collect(),
            };
            problems.extend(store.extra_files(&head).into_iter().map(|f| format!("{f} (not in the manifest)")));
            artifacts.push((stage.clone(), key, used, problems));
        }
    }
    let units = store.check_units();
    let damaged_units: Vec<&PathBuf> = units.iter().filter(|(_, u)| *u == Unit::Damaged).map(|(p, _)| p).collect();
    // Files outside the store are trusted by stat in `status`; here they are re-hashed.
    let mut cache = crate::hash::StatCache::open(store.stat_cache_path());
    let roots: Vec<PathBuf> = p.stages.iter().flat_map(|s| s.resolved.files.iter().map(|f| p.root.join(f))).collect();
    let changed = cache.recheck(&roots)?;
    cache.save();
    let bad = artifacts.iter().filter(|(_, _, used, problems)| *used && !problems.is_empty()).count();
    let old_bad = artifacts.iter().filter(|(_, _, used, problems)| !*used && !problems.is_empty()).count();
    let in_store = |path: &PathBuf| path.strip_prefix(&store.root).unwrap_or(path).display().to_string();
    if json {
        let listed: Vec<_> = artifacts
            .iter()
            .map(|(stage, key, used, problems)| json!({ "stage": stage, "key": key, "current": used, "intact": problems.is_empty(), "problems": problems }))
            .collect();
        print_json(&json!({
            "artifacts": listed,
            "damaged_units": damaged_units.iter().map(|p| in_store(p)).collect::<Vec<_>>(),
            "unrecorded_units": units.iter().filter(|(_, u)| *u == Unit::Unrecorded).count(),
            "changed_files": changed,
            "bytes": bytes,
        }))?;
    } else {
        let damaged = style("DAMAGED").red().bold();
        for (stage, key, used, problems) in artifacts.iter().filter(|a| !a.3.is_empty()) {
            let old = if *used { "" } else { " (old: no stage uses it; `llmflow gc` removes it)" };
            outln!("{damaged:>9} {stage}/{}{old}: {}", &key[..12.min(key.len())], problems.join(", "));
        }
        for path in &damaged_units {
            outln!(
                "{damaged:>9} {}: its bytes differ from its recorded BLAKE3; it is never reused (`llmflow gc` removes it)",
                in_store(path)
            );
        }
        for path in &changed {
            let shown = path.strip_prefix(&p.root).unwrap_or(path);
            outln!(
                "{:>9} {}: its contents changed but its size and mtime did not; the stages reading it rebuild on the next run",
                style("CHANGED").red().bold(),
                shown.display()
            );
        }
        let secs = started.elapsed().as_secs_f64();
        outln!(
            "verified {} artifact(s), {} in {secs:.2}s: {} intact, {bad} damaged, {old_bad} old ones damaged; {} cached unit(s), {} damaged; {} dependency file(s) re-hashed, {} changed",
            artifacts.len(),
            human_bytes(bytes),
            artifacts.len() - bad - old_bad,
            units.len(),
            damaged_units.len(),
            roots.len(),
            changed.len()
        );
    }
    if bad > 0 || !damaged_units.is_empty() || !changed.is_empty() {
        bail!(StageFailed(format!(
            "{bad} damaged artifact(s), {} damaged cached unit(s), {} changed dependency file(s); `llmflow run` rebuilds what they affect",
            damaged_units.len(),
            changed.len()
        )));
    }
    Ok(())
}

pub fn gc(file: &Path, dry_run: bool, wait: bool, only_this_pipeline: bool, json: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let store = Store::new(p.artifacts.clone());
    if !store.root.join(MARKER).is_file() {
        bail!(ConfigError(format!(
            "{} is not an llmflow artifact store (it has no {}): gc removes nothing there",
            store.root.display(),
            MARKER
        )));
    }
    let _held = store.hold(Access::Exclusive, &format!("llmflow gc -f {}", p.file.display()), wait, |holders| {
        eprintln!("waiting for the store, in use by: {}", holders.join("; "))
    })?;
    let mut keep = in_use(p, dag, &store)?;
    let mut forgotten = Vec::new();
    if !only_this_pipeline {
        for (entry, other) in store.pipelines() {
            if other == p.file {
                continue;
            }
            if !other.exists() {
                forgotten.push(entry);
                continue;
            }
            let q = Pipeline::load(&other).map_err(|e| {
                ConfigError(format!(
                    "{} also builds into this store and does not load:\n{e}\n  fix it, or run `llmflow gc --only-this-pipeline` to keep only what {} uses",
                    other.display(),
                    p.file.display()
                ))
            })?;
            if std::fs::canonicalize(&q.artifacts).ok() == std::fs::canonicalize(&store.root).ok() {
                keep.extend(in_use(&q, &q.dag(), &store)?);
            }
        }
    }
    let mut doomed: Vec<PathBuf> = Vec::new();
    for stage in store.stages() {
        for key in store.keys(&stage) {
            let dir = store.artifact_dir(&stage, &key);
            let ours = is_key(&key)
                && fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
                && fs::symlink_metadata(dir.join("manifest.json")).is_ok_and(|m| m.is_file());
            if ours && !keep.contains(&(stage.clone(), key.clone())) {
                doomed.push(dir);
                doomed.push(store.log_path(&stage, &key));
            }
        }
    }
    let work = store.root.join(".work");
    for stage in fs::read_dir(&work).into_iter().flatten().flatten() {
        let name = stage.file_name().to_string_lossy().into_owned();
        for key in fs::read_dir(stage.path()).into_iter().flatten().flatten() {
            if !keep.contains(&(name.clone(), key.file_name().to_string_lossy().into_owned())) {
                doomed.push(key.path());
            }
        }
    }
    // Results a kind caches across builds go with the last artifact linking them.
    let unlinked = store.unlinked_cache_files(&doomed);
    doomed.extend(unlinked);
    // No run holds the store, so every temporary build and state file is left over.
    doomed.extend(fs::read_dir(store.tmp_root()).into_iter().flatten().flatten().map(|e| e.path()));
    let state = store.root.join(".state");
    doomed.extend(
        fs::read_dir(&state)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.') && n.contains(".tmp"))),
    );
    let mut freed = 0;
    let mut count = 0;
    let mut removed = Vec::new();
    for path in doomed.iter().filter(|p| fs::symlink_metadata(p).is_ok()) {
        let size = disk_usage(path);
        freed += size;
        let shown = path.strip_prefix(&store.root).unwrap_or(path);
        if path.is_dir() && path.parent().and_then(|d| d.parent()) == Some(store.root.as_path()) {
            count += 1;
        }
        if json {
            removed.push(json!({ "path": shown, "bytes": size }));
        } else {
            outln!("{} {} ({})", if dry_run { "would remove" } else { "removing" }, shown.display(), human_bytes(size));
        }
        if !dry_run {
            remove_tree(path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    if !dry_run {
        for stage in store.stages() {
            let _ = fs::remove_dir(store.root.join(stage)); // only if now empty
        }
        for entry in forgotten {
            let _ = fs::remove_file(entry);
        }
    }
    if json {
        return print_json(&json!({ "dry_run": dry_run, "removed": removed, "artifacts": count, "bytes": freed }));
    }
    let verb = if dry_run { "would free" } else { "freed" };
    let whose = if only_this_pipeline { "by this pipeline" } else { "by any pipeline file using this store" };
    outln!("{count} artifact(s) unused {whose}; {verb} {}", human_bytes(freed));
    Ok(())
}

/// The artifacts `p` uses: each stage's current one and, where the key is
/// not known yet (an input must be rebuilt first), the last one built.
fn in_use(p: &Pipeline, dag: &Dag, store: &Store) -> Result<BTreeSet<(String, String)>> {
    let statuses = plan::statuses(p, dag, store, None)?;
    let mut keep = BTreeSet::new();
    for (s, st) in p.stages.iter().zip(&statuses) {
        if let Some(key) = &st.key {
            keep.insert((s.name.clone(), key.clone()));
        } else if let Some(latest) = store.state(&s.name).latest {
            keep.insert((s.name.clone(), latest));
        }
    }
    Ok(keep)
}

/// Whether `name` looks like an artifact key (64 hex digits).
fn is_key(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}
