//! A loaded pipeline kept in its store for the next load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{Pipeline, StageDef};
use crate::executor;
use crate::hash::{hash_bytes, Stat};
use crate::protocol::{KindInfo, Resolved};

/// A loaded pipeline kept in its store, so a file that has not changed
/// loads without being parsed, expanded or resolved: for 10,000 stages,
/// tens of milliseconds instead of hundreds. It is valid for the file's
/// exact text and path and for the very `llmflow` and `llmflow-stage`
/// binaries that made it. The store is read from the `[pipeline]` table at
/// the top of the file; a file that sets it elsewhere just loads slowly.
pub(super) struct Snapshot {
    path: PathBuf,
    id: SnapshotId,
}

#[derive(PartialEq, serde::Serialize, serde::Deserialize)]
struct SnapshotId {
    file: PathBuf,
    text: String,
    engine: Stat,
    runner: Stat,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshotted {
    id: SnapshotId,
    name: String,
    artifacts: PathBuf,
    device: String,
    remote: Option<crate::remote::Settings>,
    kinds: Vec<KindInfo>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotStage {
    name: String,
    /// Empty for a stage that is not swept (it is `name`).
    base: String,
    labels: Vec<(String, String)>,
    /// Index into `kinds`.
    kind: usize,
    inputs: BTreeMap<String, String>,
    /// The resolved params; the key's params are these without the kind's volatile ones.
    params: serde_json::Value,
    files: Vec<String>,
    resources: crate::protocol::Resources,
    /// `:line:column`; the file is the snapshot's.
    location: String,
    executor: executor::Settings,
    log_limit_mb: u64,
}

impl Snapshot {
    pub fn find(file: &Path, root: &Path, text: &str) -> Option<Snapshot> {
        let head_end = if text.starts_with("[stages") { 0 } else { text.find("\n[stages").unwrap_or(text.len()) };
        let head: toml::Table = toml::from_str(&text[..head_end]).ok()?;
        let store = head.get("pipeline").and_then(|p| p.get("artifacts")).and_then(|a| a.as_str()).unwrap_or("artifacts");
        let name = format!("pipeline-{}.json", &hash_bytes(file.as_os_str().as_encoded_bytes())[..16]);
        let id = SnapshotId {
            file: file.to_path_buf(),
            text: hash_bytes(text.as_bytes()),
            engine: Stat::of(&std::env::current_exe().ok()?).ok()?,
            runner: Stat::of(&crate::runner::runner().ok()?).ok()?,
        };
        Some(Snapshot { path: root.join(store).join(".state").join(name), id })
    }

    pub fn read(&self) -> Option<Pipeline> {
        let (s, stages): (Snapshotted, Vec<SnapshotStage>) = crate::files::read_chunked(&self.path)?;
        if s.id != self.id {
            return None;
        }
        let stages: Vec<StageDef> = stages
            .into_par_iter()
            .map(|c| {
                let kind = s.kinds.get(c.kind)?.clone();
                let mut key_params = c.params.clone();
                if let serde_json::Value::Object(map) = &mut key_params {
                    map.retain(|k, _| !kind.volatile.contains(k));
                }
                let resolved = Resolved { params: c.params, key_params, files: c.files, resources: c.resources };
                let base = if c.labels.is_empty() { c.name.clone() } else { c.base };
                let location = format!("{}{}", s.id.file.display(), c.location);
                Some(StageDef {
                    name: c.name,
                    base,
                    labels: c.labels,
                    kind,
                    inputs: c.inputs,
                    resolved,
                    location,
                    executor: c.executor,
                    log_limit_mb: c.log_limit_mb,
                })
            })
            .collect::<Option<_>>()?;
        let by_name = stages.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        let root = s.id.file.parent().map(Path::to_path_buf).unwrap_or_default();
        Some(Pipeline { file: s.id.file, root, name: s.name, artifacts: s.artifacts, device: s.device, remote: s.remote, stages, by_name })
    }

    pub fn write(self, p: &Pipeline, kinds: Vec<KindInfo>) {
        // Only a store gets one: a folder that is not a store is left alone.
        if !self.path.parent().and_then(Path::parent).is_some_and(|store| store.join(crate::store::MARKER).is_file()) {
            return;
        }
        let stages: Vec<SnapshotStage> = p
            .stages
            .iter()
            .map(|s| SnapshotStage {
                name: s.name.clone(),
                base: if s.labels.is_empty() { String::new() } else { s.base.clone() },
                labels: s.labels.clone(),
                kind: kinds.iter().position(|k| k.kind == s.kind.kind).expect("a resolved kind"),
                inputs: s.inputs.clone(),
                params: s.resolved.params.clone(),
                files: s.resolved.files.clone(),
                resources: s.resolved.resources,
                executor: s.executor.clone(),
                log_limit_mb: s.log_limit_mb,
                location: s.location.strip_prefix(&*p.file.to_string_lossy()).unwrap_or(&s.location).to_string(),
            })
            .collect();
        let header = Snapshotted {
            id: self.id,
            name: p.name.clone(),
            artifacts: p.artifacts.clone(),
            device: p.device.clone(),
            remote: p.remote.clone(),
            kinds,
        };
        let _ = crate::files::write_chunked(&self.path, &header, &stages);
    }
}
