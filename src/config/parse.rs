//! Parsing a pipeline file into stage tables as written: the sections,
//! the engine's keys, inputs, executors and sweeps, each mistake an error at
//! its `file:line:column`; then checking each stage against its kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::expand::{expand, Expanded};
use super::source::{at, Source};
use super::sweep::{self, Axis, Pattern};
use super::StageDef;
use crate::error::{suggest, ConfigError};
use crate::executor::{self, Executor, Setting};
use crate::protocol::{KindInfo, Resolved};
use crate::remote;

/// Keys of a stage table that belong to the engine, not to the stage kind:
/// these and each executor's settings table.
const ENGINE_KEYS: &[&str] = &["kind", "input", "inputs", "sweep", "sweep_mode", "executor", "log_limit_mb"];
const PIPELINE_KEYS: &[&str] = &["name", "artifacts", "device", "executor", "log_limit_mb", "max_stages", "remote", "remote_push"];

/// The engine's keys of a stage table (`pipeline`: of `[pipeline]`).
pub(super) fn engine_keys(pipeline: bool) -> Vec<&'static str> {
    let own = if pipeline { PIPELINE_KEYS } else { ENGINE_KEYS };
    own.iter().copied().chain(executor::all().into_iter().filter(|e| !e.fields().is_empty()).map(|e| e.name())).collect()
}

/// A stage's log keeps its last this many MiB unless `log_limit_mb` says otherwise.
const LOG_LIMIT_MB: u64 = 1024;
/// Stages (variants counted) a pipeline may make unless `max_stages` says otherwise.
const MAX_STAGES: u64 = 100_000;

/// What a pipeline file says, checked as far as the engine can without the
/// stage runner: sections, keys, stage tables, references, sweeps.
pub(super) struct Parsed {
    pub name: String,
    pub artifacts: PathBuf,
    pub device: String,
    pub remote: Option<remote::Settings>,
    pub raw: Vec<RawStage>,
    pub expanded: Vec<Expanded>,
}

pub(super) fn parse(src: &Source, spans: &Spanned<DeTable>, root: &Path) -> Result<Parsed, ConfigError> {
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
    let keys = engine_keys(true);
    for key in section.keys() {
        if !keys.contains(&key.as_str()) {
            let at = src.key_span(spans, &["pipeline", key]);
            return Err(src.error(at, format!("unknown key `pipeline.{key}`{}", suggest(key, &keys))));
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
    let remote = match section.get("remote") {
        None => None,
        Some(_) => {
            let url = string("remote", "")?;
            let at = src.key_span(spans, &["pipeline", "remote"]);
            remote::check_url(&url).map_err(|e| src.error(at, format!("`pipeline.remote`: {e}")))?;
            Some(remote::Settings { url, push: true })
        }
    };
    let remote = match (section.get("remote_push"), remote) {
        (None, remote) => remote,
        (Some(toml::Value::Boolean(push)), Some(remote)) => Some(remote::Settings { push: *push, ..remote }),
        (Some(value), _) => {
            let at = src.key_span(spans, &["pipeline", "remote_push"]);
            let why = if value.is_bool() { "is set but `pipeline.remote` is not" } else { "must be true or false" };
            return Err(src.error(at, format!("`pipeline.remote_push` {why}")));
        }
    };
    let mut tables = Vec::new();
    for e in executor::all() {
        if let Some(table) = section.get(e.name()) {
            tables.push((e.name(), executor_table(src, spans, &["pipeline", e.name()], e, table)?));
        }
    }
    let defaults = Defaults {
        executor: executor_key(src, spans, &["pipeline", "executor"], section.get("executor"))?,
        tables,
        log_limit_mb: whole_number(src, spans, &["pipeline", "log_limit_mb"], section.get("log_limit_mb"))?.unwrap_or(LOG_LIMIT_MB),
    };
    let max_stages = whole_number(src, spans, &["pipeline", "max_stages"], section.get("max_stages"))?.unwrap_or(MAX_STAGES);

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
    let expanded = expand(src, spans, &raw, max_stages)?;
    Ok(Parsed { name, artifacts, device, remote, raw, expanded })
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
pub(super) fn check_store_location(file: &Path, text: &str, root: &Path, artifacts: &Path) -> Result<(), ConfigError> {
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

fn valid_device(d: &str) -> bool {
    matches!(d, "auto" | "cpu" | "cuda") || d.strip_prefix("cuda:").is_some_and(|i| i.parse::<u32>().is_ok())
}

/// A stage as written, before its kind has checked its params.
pub(super) struct RawStage {
    pub name: String,
    pub kind: Option<String>,
    /// Input slot → the stage (or variant pattern) it reads.
    pub inputs: BTreeMap<String, Pattern>,
    pub params: serde_json::Value,
    pub axes: Vec<Axis>,
    pub zip: bool,
    pub location: String,
    pub executor: executor::Settings,
    pub log_limit_mb: u64,
}

/// What `[pipeline]` sets for every stage.
struct Defaults {
    /// The executor named by `pipeline.executor` and where.
    executor: Option<(&'static dyn Executor, String)>,
    /// `[pipeline.NAME]` of each executor that has one.
    tables: Vec<(&'static str, Vec<Setting>)>,
    log_limit_mb: u64,
}

/// An `executor` key: the executor it names and where it is set, `None`
/// when it is not there.
fn executor_key(
    src: &Source,
    spans: &DeTable,
    path: &[&str],
    value: Option<&toml::Value>,
) -> Result<Option<(&'static dyn Executor, String)>, ConfigError> {
    let at = src.key_span(spans, path);
    let Some(value) = value else { return Ok(None) };
    match value.as_str().and_then(executor::named) {
        Some(e) => Ok(Some((e, format!("`{}` at {}", path.join("."), src.location(at))))),
        None => {
            let names: Vec<&str> = executor::all().iter().map(|e| e.name()).collect();
            let hint = value.as_str().map(|s| suggest(s, &names)).unwrap_or_default();
            let each: Vec<String> = executor::all().iter().map(|e| format!("\"{}\" ({})", e.name(), e.about())).collect();
            Err(src.error(at, format!("`{}` is {value}{hint}: use {}", path.join("."), each.join(" or "))))
        }
    }
}

/// The fields of executor `e`'s settings table at `path`, each with where it is set.
fn executor_table(
    src: &Source,
    spans: &DeTable,
    path: &[&str],
    e: &dyn Executor,
    value: &toml::Value,
) -> Result<Vec<Setting>, ConfigError> {
    let dotted = path.join(".");
    let toml::Value::Table(table) = value else {
        return Err(src.error(src.key_span(spans, path), format!("`{dotted}` must be a table of the `{}` executor's settings", e.name())));
    };
    let names = e.fields();
    let mut settings = Vec::new();
    for (field, value) in table {
        let mut key = path.to_vec();
        key.push(field);
        let at = src.key_span(spans, &key);
        if !names.contains(&field.as_str()) {
            return Err(src.error(
                at,
                format!("unknown key `{dotted}.{field}`{}; a `{}` table takes {}", suggest(field, names), e.name(), names.join(", ")),
            ));
        }
        let shown = e.check_field(field, value).map_err(|m| src.error(at, format!("`{dotted}.{field}` {m}")))?;
        settings.push(Setting {
            field: field.clone(),
            value: value.clone(),
            shown,
            at: format!("{} (`{dotted}.{field}`)", src.location(at)),
        });
    }
    Ok(settings)
}

/// Where the stage runs: its own `executor`, else the pipeline's, else
/// `local`; with that executor's table from `[pipeline]`, the stage's own
/// fields in their place. Every executor table the stage has is checked,
/// whichever runs it: switching the executor must not reveal old mistakes.
fn stage_executor(
    src: &Source,
    spans: &DeTable,
    name: &str,
    table: &toml::Table,
    defaults: &Defaults,
) -> Result<executor::Settings, ConfigError> {
    let mut own = Vec::new();
    for e in executor::all() {
        if let Some(value) = table.get(e.name()) {
            own.push((e.name(), executor_table(src, spans, &["stages", name, e.name()], e, value)?));
        }
    }
    let Some((e, at)) = executor_key(src, spans, &["stages", name, "executor"], table.get("executor"))?.or(defaults.executor.clone())
    else {
        return Ok(executor::Settings::default());
    };
    let of = |tables: &[(&str, Vec<Setting>)]| tables.iter().find(|(n, _)| *n == e.name()).map(|(_, s)| s.clone()).unwrap_or_default();
    let (own, pipeline) = (of(&own), of(&defaults.tables));
    let fields = e.fields().iter().filter_map(|f| own.iter().chain(&pipeline).find(|s| s.field == *f).cloned()).collect();
    Ok(executor::Settings { executor: e.name().to_string(), at, fields })
}

/// A whole number of at least 1 at `path`, if it is there.
fn whole_number(src: &Source, spans: &DeTable, path: &[&str], value: Option<&toml::Value>) -> Result<Option<u64>, ConfigError> {
    match value {
        None => Ok(None),
        Some(toml::Value::Integer(n)) if *n >= 1 => Ok(Some(*n as u64)),
        Some(other) => {
            Err(src.error(src.key_span(spans, path), format!("`{}` must be a whole number, 1 or more, not {other}", path.join("."))))
        }
    }
}

fn parse_stage(src: &Source, spans: &DeTable, name: &str, value: &toml::Value, defaults: &Defaults) -> Result<RawStage, ConfigError> {
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
    for key in engine_keys(false) {
        params.remove(key);
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
    let executor = stage_executor(src, spans, name, table, defaults)?;
    let log_limit_mb =
        whole_number(src, spans, &["stages", name, "log_limit_mb"], table.get("log_limit_mb"))?.unwrap_or(defaults.log_limit_mb);
    Ok(RawStage { name: name.to_string(), kind, inputs, params, axes, zip, location, executor, log_limit_mb })
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
        if segments.iter().any(|s| s.is_empty()) || engine_keys(false).contains(&segments[0]) {
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
pub(super) fn check_stage(
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
                    candidates.extend(engine_keys(false));
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
        executor: raw.executor.clone(),
        log_limit_mb: raw.log_limit_mb,
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
    fn parses_serde_unknown_field_messages() {
        let m = "unknown field `cmdd`, expected one of `cmd`, `deps`, `env`, `threads`";
        assert_eq!(unknown_field(m), Some("cmdd"));
        assert_eq!(expected_fields(m).unwrap(), ["cmd", "deps", "env", "threads"]);
    }
}
