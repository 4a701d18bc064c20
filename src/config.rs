//! Reading `pipeline.toml`.
//!
//! Parsing happens twice over the same text: once into plain values (what
//! stages receive) and once into a span-carrying tree, used only to point an
//! error at `file:line:column`. Every mistake a user can make in the file is
//! a [`ConfigError`] (exit code 2) that names the stage and field, and
//! suggests the nearest valid name where there is one.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::hash::{hash_bytes, Stat};
use crate::protocol::{KindInfo, ResolveRequest, Resolved, StageRequest};
use crate::slurm;
use crate::sweep::{self, Axis, Pattern, Variant};
use rayon::prelude::*;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A mistake in the pipeline file or the command line; exits with code 2.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Keys of a stage table that belong to the engine, not to the stage kind.
const ENGINE_KEYS: &[&str] = &["kind", "input", "inputs", "sweep", "sweep_mode", "executor", "slurm"];
const PIPELINE_KEYS: &[&str] = &["name", "artifacts", "device", "executor", "slurm"];

#[derive(Debug)]
pub struct Pipeline {
    /// The pipeline file.
    pub file: PathBuf,
    /// Its directory; relative paths resolve here.
    pub root: PathBuf,
    pub name: String,
    /// The artifact store, absolute.
    pub artifacts: PathBuf,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Stages in file order.
    pub stages: Vec<StageDef>,
    /// Stage name → its index in `stages`.
    by_name: HashMap<String, usize>,
}

#[derive(Debug)]
pub struct StageDef {
    /// The table's name, or for a variant of a swept stage `table[k=v,...]`.
    pub name: String,
    /// The table's name.
    pub base: String,
    /// A variant's swept values (name shown, value text); empty when not swept.
    pub labels: Vec<(String, String)>,
    pub kind: KindInfo,
    /// Input slot → upstream stage name.
    pub inputs: BTreeMap<String, String>,
    pub resolved: Resolved,
    /// `file:line` of the stage's table, for messages.
    pub location: String,
    /// What the stage asks of Slurm when it runs there (`executor = "slurm"`);
    /// `None` runs it on this machine.
    pub slurm: Option<slurm::Request>,
}

impl Pipeline {
    /// The index in `stages` of the stage named `name`, or an error
    /// suggesting the nearest name.
    pub fn index(&self, name: &str) -> Result<usize, ConfigError> {
        self.by_name.get(name).copied().ok_or_else(|| {
            let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
            ConfigError(format!("no stage named `{name}` in {}{}", self.file.display(), suggest(name, &names)))
        })
    }

    /// The stages `spec` names: a stage (every variant, if it is swept), one
    /// variant by name, or the variants a pattern like `pretrain[lr=3e-3,*]`
    /// matches.
    pub fn select(&self, spec: &str) -> Result<Vec<usize>, ConfigError> {
        if let Some(&i) = self.by_name.get(spec) {
            return Ok(vec![i]);
        }
        let pattern = Pattern::parse(spec).map_err(ConfigError)?;
        let members: Vec<usize> = (0..self.stages.len()).filter(|&i| self.stages[i].base == pattern.stage).collect();
        let Some(&first) = members.first() else {
            let mut bases: Vec<&str> = self.stages.iter().map(|s| s.base.as_str()).collect();
            bases.dedup();
            return Err(ConfigError(format!(
                "no stage named `{}` in {}{}",
                pattern.stage,
                self.file.display(),
                suggest(&pattern.stage, &bases)
            )));
        };
        if !pattern.bracketed {
            return Ok(members);
        }
        let keys: Vec<&str> = self.stages[first].labels.iter().map(|(k, _)| k.as_str()).collect();
        if let Some((bad, _)) = pattern.pairs.iter().find(|(k, _)| !keys.contains(&k.as_str())) {
            let varies = if keys.is_empty() { "is not swept".to_string() } else { format!("varies {}", keys.join(", ")) };
            return Err(ConfigError(format!("`{}` {varies}; `{bad}` is not one of them{}", pattern.stage, suggest(bad, &keys))));
        }
        let matched: Vec<usize> = members.iter().copied().filter(|&i| pattern.matches(&self.stages[i].labels)).collect();
        if matched.is_empty() {
            let names: Vec<&str> = members.iter().map(|&i| self.stages[i].name.as_str()).collect();
            return Err(ConfigError(format!("no variant of `{}` matches `{spec}`; its variants: {}", pattern.stage, names.join(", "))));
        }
        Ok(matched)
    }

    /// Every stage the specs name, each once, in the order named.
    pub fn select_all(&self, specs: &[String]) -> Result<Vec<usize>, ConfigError> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for spec in specs {
            out.extend(self.select(spec)?.into_iter().filter(|&i| seen.insert(i)));
        }
        Ok(out)
    }

    /// The one stage `spec` names; a swept stage must be narrowed to one variant.
    pub fn select_one(&self, spec: &str) -> Result<usize, ConfigError> {
        let found = self.select(spec)?;
        match found.as_slice() {
            [one] => Ok(*one),
            many => Err(ConfigError(format!("`{spec}` names {} variants; name one, e.g. `{}`", many.len(), self.stages[many[0]].name))),
        }
    }

    /// Loads and validates a pipeline file. Graph checks (cycles, missing
    /// references) happen here too, before anything runs.
    pub fn load(file: &Path) -> Result<Pipeline, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            ConfigError(format!(
                "cannot read {}: {e}\n  run llmflow in a directory with a pipeline.toml, or pass --file PATH",
                file.display()
            ))
        })?;
        let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        let root = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let snapshot = Snapshot::find(&file, &root, &text);
        if let Some(p) = snapshot.as_ref().and_then(Snapshot::read) {
            check_store_location(&p.file, &text, &p.root, &p.artifacts)?;
            return Ok(p);
        }
        let src = Source::new(&file, &text);
        let spans = DeTable::parse(&text).map_err(|e| src.error(e.span().map(|s| s.start), e.message()))?;
        let Parsed { name, artifacts, device, raw, expanded } = parse(&src, &spans, &root)?;
        let spans = spans.get_ref();
        let request = ResolveRequest {
            stages: expanded
                .iter()
                .map(|v| StageRequest {
                    name: v.name.clone(),
                    kind: raw[v.raw].kind.clone().unwrap_or_default(),
                    params: v.params.clone(),
                    inputs: v.inputs.keys().cloned().collect(),
                })
                .collect(),
        };
        // The store keeps the resolved params, once it is made (or found to be a store).
        let store = crate::store::Store::new(artifacts.clone());
        let cache = store.create().is_ok().then(|| artifacts.join(".state").join("resolved.json"));
        let response = crate::kinds::resolve(&request, cache.as_deref())
            .map_err(|e| ConfigError(format!("cannot resolve the stages of {}: {e:#}", file.display())))?;
        let mut stages = Vec::with_capacity(expanded.len());
        for (v, result) in expanded.into_iter().zip(response.stages) {
            stages.push(check_stage(&src, spans, &response.kinds, &raw[v.raw], v, result)?);
        }
        let mut by_name = HashMap::with_capacity(stages.len());
        for (i, s) in stages.iter().enumerate() {
            if let Some(j) = by_name.insert(s.name.clone(), i) {
                return Err(ConfigError(format!(
                    "{}: two variants of `{}` are both named `{}`: give the sweep's values different texts",
                    s.location, s.base, stages[j].name
                )));
            }
        }
        let pipeline = Pipeline { file: file.clone(), root, name, artifacts, device, stages, by_name };
        if let Some(snapshot) = snapshot {
            snapshot.write(&pipeline, response.kinds);
        }
        Ok(pipeline)
    }
}

/// What a pipeline file says, checked as far as the engine can without the
/// stage runner: sections, keys, stage tables, references, sweeps.
struct Parsed {
    name: String,
    artifacts: PathBuf,
    device: String,
    raw: Vec<RawStage>,
    expanded: Vec<Expanded>,
}

fn parse(src: &Source, spans: &Spanned<DeTable>, root: &Path) -> Result<Parsed, ConfigError> {
    // The values, from the tree already parsed (parsing twice costs a big pipeline tens of ms).
    let doc = <toml::Table as serde::Deserialize>::deserialize(toml::de::Deserializer::from(spans.clone()))
        .map_err(|e| src.error(e.span().map(|s| s.start), e.message()))?;
    let spans = spans.get_ref();

    for key in doc.keys() {
        if key != "pipeline" && key != "stages" {
            let at = src.key_span(spans, &[key]);
            return Err(src.error(at, format!("unknown section `[{key}]`{}", suggest(key, &["pipeline", "stages"]))));
        }
    }

    let section = match doc.get("pipeline") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t.clone(),
        Some(_) => return Err(src.error(src.key_span(spans, &["pipeline"]), "`pipeline` must be a table")),
    };
    for key in section.keys() {
        if !PIPELINE_KEYS.contains(&key.as_str()) {
            let at = src.key_span(spans, &["pipeline", key]);
            return Err(src.error(at, format!("unknown key `pipeline.{key}`{}", suggest(key, PIPELINE_KEYS))));
        }
    }
    let string = |key: &str, default: &str| -> Result<String, ConfigError> {
        match section.get(key) {
            None => Ok(default.to_string()),
            Some(toml::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(src.error(src.key_span(spans, &["pipeline", key]), format!("`pipeline.{key}` must be a string"))),
        }
    };
    let name = string("name", "pipeline")?;
    let artifacts = root.join(string("artifacts", "artifacts")?);
    check_store_location(src.file, src.text, root, &artifacts)?;
    let device = string("device", "auto")?;
    if !valid_device(&device) {
        let at = src.key_span(spans, &["pipeline", "device"]);
        return Err(src.error(at, format!("unknown device `{device}`: use auto, cpu, cuda or cuda:N")));
    }
    let defaults = Executor {
        slurm_at: executor(src, spans, &["pipeline", "executor"], section.get("executor"))?.flatten(),
        settings: match section.get("slurm") {
            Some(table) => slurm_settings(src, spans, &["pipeline", "slurm"], table)?,
            None => Vec::new(),
        },
    };

    let stage_tables = match doc.get("stages") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t.clone(),
        Some(_) => return Err(src.error(src.key_span(spans, &["stages"]), "`stages` must hold tables: [stages.NAME]")),
    };
    // File order, so `status` and `dag` list stages the way the user wrote them.
    let mut order: Vec<(usize, &String)> =
        stage_tables.keys().map(|k| (src.key_span(spans, &["stages", k]).unwrap_or(usize::MAX), k)).collect();
    order.sort();
    let mut raw = Vec::new();
    for (_, name) in order {
        raw.push(parse_stage(src, spans, name, &stage_tables[name], &defaults)?);
    }
    let expanded = expand(src, spans, &raw)?;
    Ok(Parsed { name, artifacts, device, raw, expanded })
}

/// The path of the first nan or infinity in `value`: JSON, which carries
/// params to the stage runner, has neither (they would arrive as null).
fn non_finite(value: &toml::Value) -> Option<Vec<String>> {
    match value {
        toml::Value::Float(f) if !f.is_finite() => Some(Vec::new()),
        toml::Value::Table(t) => t.iter().find_map(|(k, v)| {
            non_finite(v).map(|mut p| {
                p.insert(0, k.clone());
                p
            })
        }),
        toml::Value::Array(items) => items.iter().find_map(non_finite),
        _ => None,
    }
}

/// Refuses a store that is, or holds, the pipeline's own folder: `gc` and
/// `--force` would then work among the user's files.
fn check_store_location(file: &Path, text: &str, root: &Path, artifacts: &Path) -> Result<(), ConfigError> {
    let real = |path: &Path| std::fs::canonicalize(path).unwrap_or_else(|_| normalize(path));
    let (store, root) = (real(artifacts), real(root));
    if !root.starts_with(&store) {
        return Ok(());
    }
    let src = Source::new(file, text);
    let at = DeTable::parse(text).ok().and_then(|spans| src.key_span(spans.get_ref(), &["pipeline", "artifacts"]));
    let relation = if store == root { "the pipeline's own folder" } else { "a folder above the pipeline's" };
    Err(src.error(
        at,
        format!(
            "the artifact store {} is {relation}: llmflow removes and rewrites what is in its store; set `pipeline.artifacts` to a folder of its own, such as \"artifacts\"",
            store.display()
        ),
    ))
}

/// `path` with `.` and `..` resolved without touching the disk.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// A loaded pipeline kept in its store, so a file that has not changed
/// loads without being parsed, expanded or resolved: for 10,000 stages,
/// tens of milliseconds instead of hundreds. It is valid for the file's
/// exact text and path and for the very `llmflow` and `llmflow-stage`
/// binaries that made it. The store is read from the `[pipeline]` table at
/// the top of the file; a file that sets it elsewhere just loads slowly.
struct Snapshot {
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
    slurm: Option<slurm::Request>,
}

impl Snapshot {
    fn find(file: &Path, root: &Path, text: &str) -> Option<Snapshot> {
        let head_end = if text.starts_with("[stages") { 0 } else { text.find("\n[stages").unwrap_or(text.len()) };
        let head: toml::Table = toml::from_str(&text[..head_end]).ok()?;
        let store = head.get("pipeline").and_then(|p| p.get("artifacts")).and_then(|a| a.as_str()).unwrap_or("artifacts");
        let name = format!("pipeline-{}.json", &hash_bytes(file.as_os_str().as_encoded_bytes())[..16]);
        let id = SnapshotId {
            file: file.to_path_buf(),
            text: hash_bytes(text.as_bytes()),
            engine: Stat::of(&std::env::current_exe().ok()?).ok()?,
            runner: Stat::of(&crate::kinds::runner().ok()?).ok()?,
        };
        Some(Snapshot { path: root.join(store).join(".state").join(name), id })
    }

    fn read(&self) -> Option<Pipeline> {
        let (s, stages): (Snapshotted, Vec<SnapshotStage>) = crate::store::read_chunked(&self.path)?;
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
                Some(StageDef { name: c.name, base, labels: c.labels, kind, inputs: c.inputs, resolved, location, slurm: c.slurm })
            })
            .collect::<Option<_>>()?;
        let by_name = stages.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        let root = s.id.file.parent().map(Path::to_path_buf).unwrap_or_default();
        Some(Pipeline { file: s.id.file, root, name: s.name, artifacts: s.artifacts, device: s.device, stages, by_name })
    }

    fn write(self, p: &Pipeline, kinds: Vec<KindInfo>) {
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
                slurm: s.slurm.clone(),
                location: s.location.strip_prefix(&*p.file.to_string_lossy()).unwrap_or(&s.location).to_string(),
            })
            .collect();
        let header = Snapshotted { id: self.id, name: p.name.clone(), artifacts: p.artifacts.clone(), device: p.device.clone(), kinds };
        let _ = crate::store::write_chunked(&self.path, &header, &stages);
    }
}

/// One stage to build: a stage table as written, or one variant of a swept one.
struct Expanded {
    /// Index of the table in the raw stages.
    raw: usize,
    name: String,
    labels: Vec<(String, String)>,
    params: serde_json::Value,
    inputs: BTreeMap<String, String>,
}

/// Checks the references between stage tables, rejects cycles, and expands
/// sweeps: each table becomes its variants, in file order, wired to the
/// variants of their inputs.
fn expand(src: &Source, spans: &DeTable, raw: &[RawStage]) -> Result<Vec<Expanded>, ConfigError> {
    let index: HashMap<&str, usize> = raw.iter().enumerate().map(|(i, r)| (r.name.as_str(), i)).collect();
    let input_at = |r: &RawStage, slot: &str| {
        let path: &[&str] =
            if slot == "input" && src.key_span(spans, &["stages", &r.name, "input"]).is_some() { &["input"] } else { &["inputs", slot] };
        at(src, spans, &r.name, path)
    };
    let mut upstream = Vec::with_capacity(raw.len());
    for r in raw {
        let mut ups = Vec::new();
        for (slot, pattern) in &r.inputs {
            match index.get(pattern.stage.as_str()) {
                Some(&u) => ups.push(u),
                None => {
                    let names: Vec<&str> = raw.iter().map(|r| r.name.as_str()).collect();
                    return Err(src.error(
                        input_at(r, slot),
                        format!(
                            "stage `{}`: input `{slot}` names stage `{}`, which does not exist{}",
                            r.name,
                            pattern.stage,
                            suggest(&pattern.stage, &names)
                        ),
                    ));
                }
            }
        }
        upstream.push(ups);
    }
    let order = crate::graph::toposort(&upstream).map_err(|cycle| {
        let path: Vec<&str> = cycle.iter().chain(&cycle[..1]).map(|&i| raw[i].name.as_str()).collect();
        ConfigError(format!(
            "{}: stages form a cycle: {}\n  an input must name a stage that does not depend on this one",
            raw[cycle[0]].location,
            path.join(" → ")
        ))
    })?;

    // Each table's variants, upstream tables first: a stage fans out over
    // the variants of the stages it reads by plain name, then over its own sweep.
    let mut variants: Vec<Vec<Variant>> = vec![Vec::new(); raw.len()];
    for &i in &order {
        let r = &raw[i];
        let mut acc: Vec<Variant> = vec![Vec::new()];
        for pattern in r.inputs.values().filter(|p| !p.bracketed) {
            acc = sweep::join(&acc, &variants[index[pattern.stage.as_str()]]);
        }
        variants[i] = sweep::join(&acc, &sweep::own(&r.name, &r.axes, r.zip));
    }
    let labels: Vec<Vec<Vec<(String, String)>>> = variants
        .iter()
        .map(|vs| {
            let keys = vs.first().map(sweep::label_keys).unwrap_or_default();
            vs.iter().map(|v| keys.iter().cloned().zip(v.iter().map(|a| a.text.clone())).collect()).collect()
        })
        .collect();
    let names: Vec<Vec<String>> = raw.iter().zip(&labels).map(|(r, ls)| ls.iter().map(|l| sweep::name(&r.name, l)).collect()).collect();
    let lookup: Vec<_> = variants.iter().map(|vs| sweep::index(vs)).collect();

    let mut out = Vec::with_capacity(variants.iter().map(Vec::len).sum());
    for (i, r) in raw.iter().enumerate() {
        for (k, v) in variants[i].iter().enumerate() {
            let mut params = r.params.clone();
            for a in v.iter().filter(|a| a.origin == r.name) {
                set_path(&mut params, &a.path, a.value.clone());
            }
            let mut inputs = BTreeMap::new();
            for (slot, pattern) in &r.inputs {
                let u = index[pattern.stage.as_str()];
                if !pattern.bracketed {
                    let (params, map) = &lookup[u];
                    inputs.insert(slot.clone(), names[u][map[&sweep::signature(v, params)]].clone());
                    continue;
                }
                let keys: Vec<&str> = labels[u].first().map_or(Vec::new(), |l| l.iter().map(|(k, _)| k.as_str()).collect());
                if let Some((bad, _)) = pattern.pairs.iter().find(|(k, _)| !keys.contains(&k.as_str())) {
                    let varies = if keys.is_empty() { "is not swept".to_string() } else { format!("varies {}", keys.join(", ")) };
                    return Err(src.error(
                        input_at(r, slot),
                        format!(
                            "stage `{}`: input `{slot}`: `{}` {varies}; `{bad}` is not one of them{}",
                            r.name,
                            pattern.stage,
                            suggest(bad, &keys)
                        ),
                    ));
                }
                let matched: Vec<usize> = (0..labels[u].len()).filter(|&m| pattern.matches(&labels[u][m])).collect();
                if matched.is_empty() {
                    return Err(src.error(
                        input_at(r, slot),
                        format!(
                            "stage `{}`: input `{slot}`: no variant of `{}` matches `{}`; its variants: {}",
                            r.name,
                            pattern.stage,
                            pattern.text,
                            names[u].join(", ")
                        ),
                    ));
                }
                if pattern.wildcard {
                    for m in matched {
                        let label = &names[u][m][raw[u].name.len()..];
                        inputs.insert(format!("{slot}{label}"), names[u][m].clone());
                    }
                } else {
                    inputs.insert(slot.clone(), names[u][matched[0]].clone());
                }
            }
            out.push(Expanded { raw: i, name: names[i][k].clone(), labels: labels[i][k].clone(), params, inputs });
        }
    }
    Ok(out)
}

/// Sets the value at a dotted path, making the tables on the way.
fn set_path(params: &mut serde_json::Value, path: &str, value: serde_json::Value) {
    let mut at = params;
    for segment in path.split('.') {
        at = &mut at[segment];
        if at.is_null() {
            *at = serde_json::Value::Object(Default::default());
        }
    }
    *at = value;
}

fn valid_device(d: &str) -> bool {
    matches!(d, "auto" | "cpu" | "cuda") || d.strip_prefix("cuda:").is_some_and(|i| i.parse::<u32>().is_ok())
}

/// A stage as written, before its kind has checked its params.
struct RawStage {
    name: String,
    kind: Option<String>,
    /// Input slot → the stage (or variant pattern) it reads.
    inputs: BTreeMap<String, Pattern>,
    params: serde_json::Value,
    axes: Vec<Axis>,
    zip: bool,
    location: String,
    slurm: Option<slurm::Request>,
}

fn at<'a>(src: &Source, spans: &DeTable, name: &'a str, path: &[&'a str]) -> Option<usize> {
    let mut full = vec!["stages", name];
    full.extend_from_slice(path);
    src.key_span(spans, &full)
}

/// Where stages run, as `[pipeline]` sets it for every stage.
struct Executor {
    /// Where `executor = "slurm"` is set, if it is.
    slurm_at: Option<String>,
    /// `[pipeline.slurm]`.
    settings: Vec<slurm::Setting>,
}

/// An `executor` key: `Some(Some(at))` for "slurm" (where it is set),
/// `Some(None)` for "local", `None` when it is not there.
fn executor(src: &Source, spans: &DeTable, path: &[&str], value: Option<&toml::Value>) -> Result<Option<Option<String>>, ConfigError> {
    let at = src.key_span(spans, path);
    match value {
        None => Ok(None),
        Some(toml::Value::String(s)) if s == "local" => Ok(Some(None)),
        Some(toml::Value::String(s)) if s == "slurm" => Ok(Some(Some(format!("`{}` at {}", path.join("."), src.location(at))))),
        Some(other) => {
            Err(src
                .error(at, format!("`{}` is {other}: use \"local\" (this machine) or \"slurm\" (a batch job per stage)", path.join("."))))
        }
    }
}

/// The fields of a `slurm` table at `path`, each with where it is set.
fn slurm_settings(src: &Source, spans: &DeTable, path: &[&str], value: &toml::Value) -> Result<Vec<slurm::Setting>, ConfigError> {
    let dotted = path.join(".");
    let toml::Value::Table(table) = value else {
        return Err(
            src.error(src.key_span(spans, path), format!("`{dotted}` must be a table, e.g. {{ partition = \"gpu\", time = \"4:00:00\" }}"))
        );
    };
    let names: Vec<&str> = slurm::FIELDS.iter().map(|(field, _)| *field).collect();
    let mut settings = Vec::new();
    for (field, value) in table {
        let mut key = path.to_vec();
        key.push(field);
        let at = src.key_span(spans, &key);
        if !names.contains(&field.as_str()) {
            return Err(src.error(
                at,
                format!("unknown key `{dotted}.{field}`{}; a `slurm` table takes {}", suggest(field, &names), names.join(", ")),
            ));
        }
        let (args, shown) = slurm::field_args(field, value).map_err(|m| src.error(at, format!("`{dotted}.{field}` {m}")))?;
        settings.push(slurm::Setting { field: field.clone(), shown, args, at: format!("{} (`{dotted}.{field}`)", src.location(at)) });
    }
    Ok(settings)
}

/// The stage's Slurm request, if it runs on Slurm: the pipeline's executor
/// and `[pipeline.slurm]`, with the stage's own `executor` and `slurm`
/// fields in their place.
fn stage_executor(
    src: &Source,
    spans: &DeTable,
    name: &str,
    table: &toml::Table,
    defaults: &Executor,
) -> Result<Option<slurm::Request>, ConfigError> {
    // Checked wherever the stage runs: switching the executor must not reveal old mistakes.
    let own = match table.get("slurm") {
        Some(value) => slurm_settings(src, spans, &["stages", name, "slurm"], value)?,
        None => Vec::new(),
    };
    let Some(executor_at) =
        executor(src, spans, &["stages", name, "executor"], table.get("executor"))?.unwrap_or(defaults.slurm_at.clone())
    else {
        return Ok(None);
    };
    let settings: Vec<slurm::Setting> =
        slurm::FIELDS.iter().filter_map(|(field, _)| own.iter().chain(&defaults.settings).find(|s| s.field == *field).cloned()).collect();
    let cpus_per_task = settings.iter().find(|s| s.field == "cpus_per_task").and_then(|s| s.shown.parse().ok());
    Ok(Some(slurm::Request { settings, cpus_per_task, executor_at }))
}

fn parse_stage(src: &Source, spans: &DeTable, name: &str, value: &toml::Value, defaults: &Executor) -> Result<RawStage, ConfigError> {
    let at = |path: &[&str]| at(src, spans, name, path);
    let location = src.location(at(&[]));
    if !valid_name(name) {
        return Err(src.error(at(&[]), format!("stage name `{name}` may use only letters, digits, `_` and `-`")));
    }
    let toml::Value::Table(table) = value else {
        return Err(src.error(at(&[]), format!("stage `{name}` must be a table: [stages.{name}]")));
    };
    let kind = match table.get("kind") {
        Some(toml::Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(src.error(at(&["kind"]), format!("stage `{name}`: `kind` must be a string"))),
        None => None,
    };
    let mut refs = BTreeMap::new();
    if let Some(v) = table.get("input") {
        let toml::Value::String(s) = v else {
            return Err(src.error(at(&["input"]), format!("stage `{name}`: `input` must be a stage name")));
        };
        refs.insert("input".to_string(), (s.clone(), at(&["input"])));
    }
    if let Some(v) = table.get("inputs") {
        if table.contains_key("input") {
            return Err(src.error(at(&["inputs"]), format!("stage `{name}`: write `input` or `inputs`, not both")));
        }
        let toml::Value::Table(t) = v else {
            return Err(src.error(
                at(&["inputs"]),
                format!("stage `{name}`: `inputs` must be a table of slot = \"stage\", e.g. inputs = {{ data = \"tokens\" }}"),
            ));
        };
        for (slot, up) in t {
            let toml::Value::String(up) = up else {
                return Err(src.error(at(&["inputs", slot]), format!("stage `{name}`: input `{slot}` must be a stage name")));
            };
            if !valid_name(slot) {
                return Err(src.error(
                    at(&["inputs", slot]),
                    format!("stage `{name}`: input slot `{slot}` may use only letters, digits, `_` and `-`"),
                ));
            }
            refs.insert(slot.clone(), (up.clone(), at(&["inputs", slot])));
        }
    }
    let mut inputs = BTreeMap::new();
    for (slot, (text, span)) in refs {
        let pattern = Pattern::parse(&text).map_err(|e| src.error(span, format!("stage `{name}`: input `{slot}`: {e}")))?;
        inputs.insert(slot, pattern);
    }
    let mut params = table.clone();
    for key in ENGINE_KEYS {
        params.remove(*key);
    }
    let params = toml::Value::Table(params);
    if let Some(path) = non_finite(&params) {
        let shown = path.join(".");
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        return Err(src.error(at(&path), format!("stage `{name}`: `{shown}` is nan or inf; give a finite number")));
    }
    let params = serde_json::to_value(params).map_err(|e| src.error(at(&[]), e.to_string()))?;
    let zip = match table.get("sweep_mode") {
        None => false,
        Some(toml::Value::String(m)) if m == "grid" => false,
        Some(toml::Value::String(m)) if m == "zip" => true,
        Some(_) => {
            return Err(src.error(
                at(&["sweep_mode"]),
                format!("stage `{name}`: `sweep_mode` is \"grid\" (every combination) or \"zip\" (the lists side by side)"),
            ))
        }
    };
    let axes = match table.get("sweep") {
        None => Vec::new(),
        Some(sweep) => parse_sweep(src, spans, name, sweep, &params, zip)?,
    };
    let slurm = stage_executor(src, spans, name, table, defaults)?;
    Ok(RawStage { name: name.to_string(), kind, inputs, params, axes, zip, location, slurm })
}

/// `sweep = { "train.lr" = [1e-3, 3e-3], ... }`: each key a dotted param
/// path, each value a non-empty list of distinct plain values.
fn parse_sweep(
    src: &Source,
    spans: &DeTable,
    name: &str,
    sweep: &toml::Value,
    params: &serde_json::Value,
    zip: bool,
) -> Result<Vec<Axis>, ConfigError> {
    let at = |path: &[&str]| at(src, spans, name, path);
    let toml::Value::Table(sweep) = sweep else {
        return Err(src.error(
            at(&["sweep"]),
            format!("stage `{name}`: `sweep` must be a table of \"param.path\" = [values], e.g. sweep = {{ \"train.lr\" = [1e-3, 3e-3] }}"),
        ));
    };
    let mut axes = Vec::new();
    for (key, values) in sweep {
        let here = at(&["sweep", key]);
        let fail = |message: String| src.error(here, format!("stage `{name}`: sweep `{key}`: {message}"));
        let toml::Value::Array(values) = values else {
            return Err(fail("must be a list of values, e.g. [1e-3, 3e-3]".into()));
        };
        if values.is_empty() {
            return Err(fail("the list is empty; give at least one value".into()));
        }
        let segments: Vec<&str> = key.split('.').collect();
        if segments.iter().any(|s| s.is_empty()) || ENGINE_KEYS.contains(&segments[0]) {
            return Err(fail("name a param of the stage, e.g. \"train.lr\"".into()));
        }
        let mut at_param = params;
        for (k, segment) in segments.iter().enumerate() {
            match at_param.get(segment) {
                None => break,
                Some(_) if k + 1 == segments.len() => {
                    return Err(fail(format!("`{key}` is also set in the table; set it in one place")));
                }
                Some(v) if v.is_object() => at_param = v,
                Some(_) => return Err(fail(format!("`{}` is set in the table and is not a table", segments[..=k].join(".")))),
            }
        }
        // The text each value shows in variant names: as written in the file.
        let element_spans = array_spans(spans, &["stages", name, "sweep", key]);
        let mut parsed: Vec<(serde_json::Value, String)> = Vec::new();
        for (n, v) in values.iter().enumerate() {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                    element_spans.get(n).map_or_else(|| v.to_string(), |r| src.text[r.clone()].trim().to_string())
                }
                _ => return Err(fail("values must be strings, numbers or booleans".into())),
            };
            if !sweep::valid_text(&text) {
                return Err(fail(format!("`{text}` cannot stand in a variant name (no spaces, quotes, `[],=*/`)")));
            }
            if non_finite(v).is_some() {
                return Err(fail(format!("`{text}` is not a finite number")));
            }
            let value = serde_json::to_value(v).map_err(|e| fail(e.to_string()))?;
            if !zip {
                if let Some((_, same)) = parsed.iter().find(|(x, _)| same_json(x, &value)) {
                    return Err(fail(format!("`{text}` repeats `{same}`; each value once")));
                }
            }
            parsed.push((value, text));
        }
        axes.push(Axis { path: key.clone(), values: parsed });
    }
    if zip {
        if let Some(axis) = axes.iter().find(|a| a.values.len() != axes[0].values.len()) {
            return Err(src.error(
                at(&["sweep", &axis.path]),
                format!(
                    "stage `{name}`: sweep_mode = \"zip\" pairs the lists by position, but `{}` has {} values and `{}` has {}",
                    axes[0].path,
                    axes[0].values.len(),
                    axis.path,
                    axis.values.len()
                ),
            ));
        }
    }
    Ok(axes)
}

/// Equal values, with 1e-3 and 0.001, or 2 and 2.0, the same.
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The byte ranges of the elements of the array at `path`.
fn array_spans(table: &DeTable, path: &[&str]) -> Vec<std::ops::Range<usize>> {
    let mut table = table;
    for (i, segment) in path.iter().enumerate() {
        let Some(value) = table.get(*segment) else { return Vec::new() };
        match value.get_ref() {
            DeValue::Table(t) if i + 1 < path.len() => table = t,
            DeValue::Array(items) if i + 1 == path.len() => return items.iter().map(|item| item.span()).collect(),
            _ => return Vec::new(),
        }
    }
    Vec::new()
}

/// Checks a stage against its kind: the kind exists, the input slots fit, the
/// params resolved. A param error inside a swept param points at the sweep.
fn check_stage(
    src: &Source,
    spans: &DeTable,
    kinds: &[KindInfo],
    raw: &RawStage,
    v: Expanded,
    result: Option<Result<Resolved, crate::protocol::ParamError>>,
) -> Result<StageDef, ConfigError> {
    let name = raw.name.as_str();
    let at = |path: &[&str]| at(src, spans, name, path);
    let names: Vec<&str> = kinds.iter().map(|k| k.kind.as_str()).collect();
    let Some(kind_name) = raw.kind.as_deref() else {
        return Err(src.error(at(&[]), format!("stage `{name}` has no `kind`; known kinds: {}", names.join(", "))));
    };
    let (Some(kind), Some(result)) = (kinds.iter().find(|k| k.kind == kind_name), result) else {
        return Err(src.error(
            at(&["kind"]),
            format!("stage `{name}`: unknown kind `{kind_name}`{}\n  known kinds: {}", suggest(kind_name, &names), names.join(", ")),
        ));
    };
    if let Some(required) = &kind.inputs {
        let slots: Vec<&str> = required.iter().chain(&kind.optional_inputs).map(String::as_str).collect();
        for (slot, pattern) in &raw.inputs {
            let path: &[&str] = if slot == "input" { &["input"] } else { &["inputs", slot] };
            if !slots.contains(&slot.as_str()) {
                let msg = if slots.is_empty() {
                    format!("stage `{name}` ({kind_name}) takes no inputs, but names `{slot}`")
                } else {
                    format!(
                        "stage `{name}` ({kind_name}) has no input slot `{slot}`{}; its slots: {}",
                        suggest(slot, &slots),
                        slots.join(", ")
                    )
                };
                return Err(src.error(at(path), msg));
            }
            if pattern.wildcard {
                return Err(src.error(
                    at(path),
                    format!(
                        "stage `{name}` ({kind_name}) reads one artifact in `{slot}`, but `{}` gathers variants; name one variant, or gather into a kind that takes any inputs (eval, compare, command)",
                        pattern.text
                    ),
                ));
            }
        }
        for slot in required {
            if !raw.inputs.contains_key(slot) {
                let how = if required.len() == 1 && slot == "input" {
                    "input = \"STAGE\"".to_string()
                } else {
                    format!("inputs = {{ {slot} = \"STAGE\" }}")
                };
                return Err(src.error(at(&[]), format!("stage `{name}` ({kind_name}) needs input `{slot}`: add {how}")));
            }
        }
    }
    let resolved = result.map_err(|e| {
        let mut path: Vec<&str> = e.path.iter().map(String::as_str).collect();
        let mut detail = e.message.clone();
        if let Some(field) = unknown_field(&e.message) {
            if let Some(expected) = expected_fields(&e.message) {
                let mut candidates: Vec<&str> = expected.iter().map(String::as_str).collect();
                if path.is_empty() {
                    candidates.extend(ENGINE_KEYS);
                }
                detail.push_str(&suggest(field, &candidates));
            }
            path.push(field);
        }
        let dotted = path.join(".");
        let under = |a: &Axis| dotted == a.path || dotted.starts_with(&format!("{}.", a.path)) || a.path.starts_with(&format!("{dotted}."));
        match raw.axes.iter().find(|a| under(a)) {
            Some(axis) => {
                src.error(at(&["sweep", &axis.path]), format!("stage `{}` ({kind_name}): sweep `{}`: {detail}", v.name, axis.path))
            }
            None => src.error(at(&path), format!("stage `{}` ({kind_name}): {detail}", v.name)),
        }
    })?;
    Ok(StageDef {
        name: v.name,
        base: raw.name.clone(),
        labels: v.labels,
        kind: kind.clone(),
        inputs: v.inputs,
        resolved,
        location: raw.location.clone(),
        slurm: raw.slurm.clone(),
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `unknown field `x`, expected ...` → `x`.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

fn expected_fields(message: &str) -> Option<Vec<String>> {
    let (_, rest) = message.split_once("expected ")?;
    Some(rest.split('`').skip(1).step_by(2).map(str::to_string).collect())
}

/// `, did you mean `x`?` when a candidate is close enough, else empty.
pub fn suggest(word: &str, candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!(", did you mean `{c}`?"))
        .unwrap_or_default()
}

/// The pipeline text, for turning byte offsets into `file:line:column`.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
    /// The byte offset where each line starts.
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    fn new(file: &'a Path, text: &'a str) -> Source<'a> {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Source { file, text, line_starts }
    }
}

impl Source<'_> {
    fn location(&self, offset: Option<usize>) -> String {
        match offset {
            Some(offset) => {
                let offset = offset.min(self.text.len());
                // Lines before `offset`, by binary search: a big pipeline asks for thousands of locations.
                let line = self.line_starts.partition_point(|&start| start <= offset);
                let column = self.text[self.line_starts[line - 1]..offset].chars().count() + 1;
                format!("{}:{line}:{column}", self.file.display())
            }
            None => self.file.display().to_string(),
        }
    }

    fn error(&self, offset: Option<usize>, message: impl fmt::Display) -> ConfigError {
        ConfigError(format!("{}: {}", self.location(offset), message.to_string().trim_end()))
    }

    /// The offset of the deepest key along `path` that exists in the file.
    fn key_span(&self, table: &DeTable, path: &[&str]) -> Option<usize> {
        let (mut table, mut found, mut i) = (table, None, 0);
        while i < path.len() {
            let Some((key, value)) = table.get_key_value(path[i]) else {
                return found;
            };
            let (key, mut value): (&Spanned<_>, &Spanned<DeValue>) = (key, value);
            found = Some(key.span().start);
            // An array's items are named by index: `tasks.3.timeout_s`.
            while let DeValue::Array(items) = value.get_ref() {
                let Some(item) = path.get(i + 1).and_then(|s| s.parse::<usize>().ok()).and_then(|n| items.get(n)) else {
                    return found;
                };
                (value, found, i) = (item, Some(item.span().start), i + 1);
            }
            match value.get_ref() {
                DeValue::Table(t) if i + 1 < path.len() => table = t,
                _ => return found,
            }
            i += 1;
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Malformed pipeline files, made by mutating real ones (the default
    /// pipeline, the examples): every one loads or fails with a
    /// ConfigError (exit 2) whose message starts with the file and a line;
    /// none panics. The stage runner's half (params) is fuzzed in its crate.
    #[test]
    fn malformed_pipeline_files_fail_with_a_location_and_never_panic() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let seeds: Vec<String> = ["pipeline.toml", "examples/miniseries.toml"]
            .iter()
            .map(|f| std::fs::read_to_string(root.join(f)).unwrap())
            .chain([
                "[stages.a]\nkind = \"command\"\ncmd = \"echo {out}\"\nsweep = { x = [1, 2] }\n[stages.b]\nkind = \"eval\"\ninputs = { m = \"a[*]\" }\n".into(),
            ])
            .collect();
        let pieces = [
            "[",
            "]",
            "[[",
            "]]",
            "=",
            "\"",
            "'",
            "{",
            "}",
            ",",
            ".",
            "\n",
            "#",
            "[stages.x]\n",
            "[[stages.x.tasks]]\n",
            "[pipeline]\n",
            "sweep = { \"train.lr\" = [] }\n",
            "inputs = { \"/tmp/x\" = \"a\" }\n",
            "input = \"nope\"\n",
            "sweep_mode = \"zip\"\n",
            "1e300",
            "-1",
            "nan",
            "inf",
            "18446744073709551616",
            "\"\u{e9}\u{1f600}\"",
            "true",
            "[1, \"a\"]",
            "\u{0}",
            "a[x=1,*]",
        ];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n.max(1) as u64) as usize
        };
        let file = root.join("fuzzed.toml");
        let (mut cases, mut errors) = (0, 0);
        for _ in 0..4000 {
            let seed = &seeds[next(seeds.len())];
            let mut text = seed.clone();
            for _ in 0..1 + next(3) {
                let at = next(text.len() + 1);
                let at = (0..=at).rev().find(|&i| text.is_char_boundary(i)).unwrap();
                match next(4) {
                    0 => text.insert_str(at, pieces[next(pieces.len())]),
                    1 => {
                        let end = (at + 1 + next(40)).min(text.len());
                        let end = (end..=text.len()).find(|&i| text.is_char_boundary(i)).unwrap();
                        text.replace_range(at..end, "");
                    }
                    2 => text.truncate(at),
                    _ => {
                        let lines: Vec<&str> = text.lines().collect();
                        let line = lines[next(lines.len())].to_string();
                        text.insert_str(at, &format!("\n{line}\n"));
                    }
                }
            }
            cases += 1;
            let outcome = std::panic::catch_unwind(|| {
                let src = Source::new(&file, &text);
                let spans = DeTable::parse(&text).map_err(|e| src.error(e.span().map(|s| s.start), e.message()))?;
                parse(&src, &spans, root).map(drop)
            });
            match outcome {
                Err(_) => panic!("loading panicked on:\n{text}"),
                Ok(Ok(())) => {}
                Ok(Err(ConfigError(message))) => {
                    errors += 1;
                    let location = message.strip_prefix(&format!("{}:", file.display())).and_then(|rest| rest.split(':').next());
                    assert!(location.is_some_and(|l| l.parse::<usize>().is_ok()), "no file:line in {message:?} for:\n{text}");
                }
            }
        }
        assert!(errors > cases / 2, "{errors} of {cases} mutated files failed: the mutations are too gentle");
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(suggest("comand", &["command", "download"]), ", did you mean `command`?");
        assert_eq!(suggest("zzz", &["command", "download"]), "");
    }

    #[test]
    fn parses_serde_unknown_field_messages() {
        let m = "unknown field `cmdd`, expected one of `cmd`, `deps`, `env`, `threads`";
        assert_eq!(unknown_field(m), Some("cmdd"));
        assert_eq!(expected_fields(m).unwrap(), ["cmd", "deps", "env", "threads"]);
    }
}
