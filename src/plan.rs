//! Fingerprints and freshness: what each stage's key is now, whether an
//! artifact with that key exists, and, if not, why not.
//!
//! A stage's key hashes its kind, the kind's version, its params after
//! defaults (volatile ones excluded), the *output digest* of each input and
//! the contents of the external files it reads. Because inputs enter by
//! output digest, an upstream stage rebuilt to identical bytes leaves its
//! dependents fresh (early cutoff). A stage whose upstream must be rebuilt
//! has no key yet: it is stale until the upstream's output is known.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use serde::Serialize;

use crate::config::{Pipeline, StageDef};
use crate::error::ConfigError;
use crate::files::{read_chunked, write_chunked};
use crate::graph::Dag;
use crate::hash::StatCache;
use crate::remote::Remote;
use crate::store::{Head, InputRef, Integrity, KeyParts, Manifest, Store};
use rayon::prelude::*;

/// External files of a stage and their digests, via the stat cache.
pub fn dep_digests(p: &Pipeline, s: &StageDef, cache: &mut StatCache) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut deps = BTreeMap::new();
    for file in &s.resolved.files {
        let digest =
            cache.hash(&p.root.join(file)).map_err(|e| ConfigError(format!("{}: stage `{}` reads `{file}`: {e:#}", s.location, s.name)))?;
        deps.insert(file.clone(), digest);
    }
    Ok(deps)
}

/// Computes the key from known input digests.
pub fn key_of(s: &StageDef, inputs: &BTreeMap<String, InputRef>, deps: &BTreeMap<String, String>) -> String {
    KeyParts { kind: &s.kind.kind, version: s.kind.version, params: &s.resolved.key_params, inputs, deps }.key()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Fresh,
    Stale,
    Missing,
    /// Waiting in a Slurm queue.
    Queued,
    Running,
    Failed,
    /// Not here, but built on the remote (`[pipeline] remote`): `run` pulls it.
    Remote,
}

/// Every state, in the order of their discriminants.
pub const STATES: [State; 7] = [State::Fresh, State::Stale, State::Missing, State::Queued, State::Running, State::Failed, State::Remote];

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Fresh => "fresh",
            State::Stale => "stale",
            State::Missing => "missing",
            State::Queued => "queued",
            State::Running => "running",
            State::Failed => "failed",
            State::Remote => "remote",
        }
    }
}

/// One stage's standing.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    /// Known once every input is fresh.
    pub key: Option<String>,
    pub reasons: Vec<String>,
    /// The artifact for `key`, when fresh.
    pub manifest: Option<Arc<Head>>,
    pub log: Option<std::path::PathBuf>,
}

/// The standing of every stage, in dependency order. Reads manifests and
/// stats files; re-hashes only files whose stat changed. Stages whose inputs
/// are all settled are looked at in parallel, a level of the graph at a time.
/// With a `remote`, a stage not built here is looked up there; one found
/// there is `Remote`, and its dependents' keys follow from its output digest.
pub fn statuses(p: &Pipeline, dag: &Dag, store: &Store, remote: Option<&Remote>) -> Result<Vec<Status>, ConfigError> {
    let mut cache = StatCache::open(store.stat_cache_path());
    let deps: Vec<BTreeMap<String, String>> = p.stages.iter().map(|s| dep_digests(p, s, &mut cache)).collect::<Result<_, _>>()?;
    cache.save();
    let mut level = vec![0usize; p.stages.len()];
    for &i in &dag.order {
        level[i] = dag.upstream(i).iter().map(|&u| level[u] + 1).max().unwrap_or(0);
    }
    let mut levels: Vec<Vec<usize>> = Vec::new();
    for &i in &dag.order {
        if levels.len() <= level[i] {
            levels.resize(level[i] + 1, Vec::new());
        }
        levels[level[i]].push(i);
    }
    // What the last status of this file found built: an artifact whose key
    // is still current and whose files still match by stat is fresh without
    // its manifest being read.
    let known_path = store.known_heads_path(&p.file);
    let known: HashMap<String, Arc<Head>> = read_chunked::<PathBuf, Head>(&known_path)
        .filter(|(file, _)| *file == p.file)
        .map(|(_, heads)| heads.into_iter().map(|h| (h.stage.clone(), Arc::new(h))).collect())
        .unwrap_or_default();
    let mut out: Vec<Option<Status>> = vec![None; p.stages.len()];
    for members in levels {
        let done = &out;
        let found: Vec<Status> = members.par_iter().map(|&i| status_of(p, store, remote, done, &known, i, &deps[i])).collect();
        for (i, status) in members.into_iter().zip(found) {
            out[i] = Some(status);
        }
    }
    let out: Vec<Status> = out.into_iter().map(|s| s.expect("every stage visited")).collect();
    let fresh: Vec<&Head> = out.iter().filter(|s| s.state == State::Fresh).filter_map(|s| s.manifest.as_deref()).collect();
    if fresh.len() != known.len() || fresh.iter().any(|h| known.get(&h.stage).map(|k| &**k) != Some(*h)) {
        let _ = write_chunked(&known_path, &p.file, &fresh);
    }
    Ok(out)
}

/// Stage `i`'s standing, given its upstream stages' in `done`.
fn status_of(
    p: &Pipeline,
    store: &Store,
    remote: Option<&Remote>,
    done: &[Option<Status>],
    known: &HashMap<String, Arc<Head>>,
    i: usize,
    deps: &BTreeMap<String, String>,
) -> Status {
    let s = &p.stages[i];
    let mut inputs = BTreeMap::new();
    let mut waiting = Vec::new();
    for (slot, up) in &s.inputs {
        let ui = p.index(up).expect("checked reference");
        match done[ui].as_ref().and_then(|st| st.manifest.as_ref()) {
            Some(m) if matches!(done[ui].as_ref().unwrap().state, State::Fresh | State::Remote) => {
                inputs.insert(slot.clone(), InputRef { stage: up.clone(), digest: m.output_digest.clone() });
            }
            _ => waiting.push(format!("input `{slot}` ({up}) must be built first")),
        }
    }
    let fresh = if waiting.is_empty() {
        let key = key_of(s, &inputs, deps);
        let intact = |h: &Head| store.check(h, false) == Integrity::Intact;
        if let Some(h) = known.get(&s.name).filter(|h| h.key == key && intact(h)) {
            return Status { state: State::Fresh, key: Some(key), reasons: vec![], manifest: Some(Arc::clone(h)), log: None };
        }
        match store.read_head(&s.name, &key) {
            Some(m) => match store.check(&m, false) {
                Integrity::Intact => {
                    Ok(Status { state: State::Fresh, key: Some(key), reasons: vec![], manifest: Some(Arc::new(m)), log: None })
                }
                Integrity::Damaged(files) => Err((Some(key), Some(files))),
            },
            None => match remote.and_then(|r| Some((r, r.entry(&s.name, &key)?))) {
                Some((r, entry)) => {
                    let why = format!("on remote {}: `run` or `pull` fetches it", r.url());
                    let head = Arc::new(entry.manifest.head());
                    return Status { state: State::Remote, key: Some(key), reasons: vec![why], manifest: Some(head), log: None };
                }
                None => Err((Some(key), None)),
            },
        }
    } else {
        Err((None, None))
    };
    // Only a stage that is not fresh needs its history: why, and whether it runs or failed.
    let status = fresh.unwrap_or_else(|(key, damaged)| {
        let state = store.state(&s.name);
        let latest = state.latest.as_ref().and_then(|k| store.read_manifest(&s.name, k));
        let mut status = match (&key, damaged) {
            (Some(key), Some(files)) => Status {
                state: State::Stale,
                key: Some(key.clone()),
                reasons: vec![format!("artifact files were modified or removed: {}", files.join(", "))],
                manifest: None,
                log: None,
            },
            (Some(key), None) => {
                let reasons = match &latest {
                    Some(prev) => {
                        let mut r = explain(s, prev, &inputs, deps);
                        if r.is_empty() {
                            r.push("its last artifact was removed from the store".to_string());
                        }
                        r
                    }
                    None => vec!["never built".to_string()],
                };
                let st = if latest.is_some() { State::Stale } else { State::Missing };
                Status { state: st, key: Some(key.clone()), reasons, manifest: None, log: None }
            }
            (None, _) => {
                let mut reasons = waiting;
                if let Some(prev) = &latest {
                    reasons.extend(explain(s, prev, &prev.inputs, deps));
                }
                let st = if latest.is_some() { State::Stale } else { State::Missing };
                Status { state: st, key: None, reasons, manifest: None, log: None }
            }
        };
        if let Some(pid) = store.holder(&s.name) {
            // A run building it on an executor that queues (Slurm) records its job while it is in flight.
            let (state, why) = match store.job(&s.name) {
                Some(job) if job.queued() => (State::Queued, job.describe()),
                Some(job) => (State::Running, job.describe()),
                None => (State::Running, format!("being built by process {pid}")),
            };
            status.state = state;
            status.reasons.insert(0, why);
        } else if let Some(f) = state.last_failure.filter(|f| status.key.as_ref() == Some(&f.key)) {
            status.state = State::Failed;
            status.reasons.insert(0, format!("last build failed: {}", f.message));
            status.log = Some(f.log);
        }
        status
    });
    status
}

/// Why the current fingerprint differs from the last artifact built (empty
/// when nothing the stage itself declares has changed).
pub fn explain(s: &StageDef, prev: &Manifest, inputs: &BTreeMap<String, InputRef>, deps: &BTreeMap<String, String>) -> Vec<String> {
    let mut reasons = Vec::new();
    if prev.kind != s.kind.kind {
        reasons.push(format!("kind changed: {} → {}", prev.kind, s.kind.kind));
    } else if prev.version != s.kind.version {
        reasons.push(format!("{} version changed: {} → {}", prev.kind, prev.version, s.kind.version));
    }
    diff_values("", &prev.key_params, &s.resolved.key_params, &mut reasons);
    for (slot, cur) in inputs {
        match prev.inputs.get(slot) {
            None => reasons.push(format!("input `{slot}` added ({})", cur.stage)),
            Some(old) if old.stage != cur.stage => reasons.push(format!("input `{slot}` now reads {} (was {})", cur.stage, old.stage)),
            Some(old) if old.digest != cur.digest => reasons.push(format!("input `{slot}` ({}) changed", cur.stage)),
            _ => {}
        }
    }
    for slot in prev.inputs.keys().filter(|k| !s.inputs.contains_key(*k)) {
        reasons.push(format!("input `{slot}` removed"));
    }
    for (file, digest) in deps {
        match prev.deps.get(file) {
            None => reasons.push(format!("file `{file}` added")),
            Some(old) if old != digest => reasons.push(format!("file `{file}` changed")),
            _ => {}
        }
    }
    for file in prev.deps.keys().filter(|f| !deps.contains_key(*f)) {
        reasons.push(format!("file `{file}` removed"));
    }
    reasons
}

fn diff_values(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value::Object;
    match (old, new) {
        (Object(a), Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_values(&sub, x, y, out),
                    (None, Some(y)) => out.push(format!("param `{sub}` added: {y}")),
                    (Some(x), None) => out.push(format!("param `{sub}` removed (was {x})")),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("param `{path}`: {a} → {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn param_diff_names_nested_fields() {
        let mut out = Vec::new();
        diff_values(
            "",
            &json!({"train": {"lr": 0.001, "steps": 10}, "a": 1}),
            &json!({"train": {"lr": 0.0003, "steps": 10}, "b": 2}),
            &mut out,
        );
        assert_eq!(out, ["param `a` removed (was 1)", "param `b` added: 2", "param `train.lr`: 0.001 → 0.0003"]);
    }
}
