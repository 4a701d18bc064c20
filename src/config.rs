//! Reading `pipeline.toml`.
//!
//! Parsing happens twice over the same text: once into plain values (what
//! stages receive) and once into a span-carrying tree, used only to point an
//! error at `file:line:column`. Every mistake a user can make in the file is
//! a [`ConfigError`] (exit code 2) that names the stage and field, and
//! suggests the nearest valid name where there is one.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::protocol::{KindInfo, ResolveRequest, Resolved, StageRequest};
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
const ENGINE_KEYS: &[&str] = &["kind", "input", "inputs"];
const PIPELINE_KEYS: &[&str] = &["name", "artifacts", "device"];

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
}

#[derive(Debug)]
pub struct StageDef {
    pub name: String,
    pub kind: KindInfo,
    /// Input slot → upstream stage name.
    pub inputs: BTreeMap<String, String>,
    pub resolved: Resolved,
    /// `file:line` of the stage's table, for messages.
    pub location: String,
}

impl Pipeline {
    /// The index in `stages` of the stage named `name`, or an error
    /// suggesting the nearest name.
    pub fn index(&self, name: &str) -> Result<usize, ConfigError> {
        self.stages.iter().position(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
            ConfigError(format!("no stage named `{name}` in {}{}", self.file.display(), suggest(name, &names)))
        })
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
        let src = Source { file: &file, text: &text };
        let spans = DeTable::parse(&text).map_err(|e| src.error(e.span().map(|s| s.start), e.message()))?;
        let doc: toml::Table = toml::from_str(&text).map_err(|e| src.error(e.span().map(|s| s.start), e.message()))?;
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
        let device = string("device", "auto")?;
        if !valid_device(&device) {
            let at = src.key_span(spans, &["pipeline", "device"]);
            return Err(src.error(at, format!("unknown device `{device}`: use auto, cpu, cuda or cuda:N")));
        }

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
            raw.push(parse_stage(&src, spans, name, &stage_tables[name])?);
        }
        let request = ResolveRequest {
            stages: raw
                .iter()
                .map(|r| StageRequest {
                    name: r.name.clone(),
                    kind: r.kind.clone().unwrap_or_default(),
                    params: r.params.clone(),
                    inputs: r.inputs.keys().cloned().collect(),
                })
                .collect(),
        };
        let response = crate::kinds::resolve(&request, &artifacts.join(".state").join("resolved.json"))
            .map_err(|e| ConfigError(format!("cannot resolve the stages of {}: {e:#}", file.display())))?;
        let mut stages = Vec::new();
        for (r, result) in raw.into_iter().zip(response.stages) {
            stages.push(check_stage(&src, spans, &response.kinds, r, result)?);
        }
        let pipeline = Pipeline { file: file.clone(), root, name, artifacts, device, stages };
        check_references(&src, spans, &pipeline)?;
        crate::graph::Dag::new(&pipeline)?;
        Ok(pipeline)
    }
}

fn valid_device(d: &str) -> bool {
    matches!(d, "auto" | "cpu" | "cuda") || d.strip_prefix("cuda:").is_some_and(|i| i.parse::<u32>().is_ok())
}

/// A stage as written, before its kind has checked its params.
struct RawStage {
    name: String,
    kind: Option<String>,
    inputs: BTreeMap<String, String>,
    params: serde_json::Value,
    location: String,
}

fn at<'a>(src: &Source, spans: &DeTable, name: &'a str, path: &[&'a str]) -> Option<usize> {
    let mut full = vec!["stages", name];
    full.extend_from_slice(path);
    src.key_span(spans, &full)
}

fn parse_stage(src: &Source, spans: &DeTable, name: &str, value: &toml::Value) -> Result<RawStage, ConfigError> {
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
    let mut inputs = BTreeMap::new();
    if let Some(v) = table.get("input") {
        let toml::Value::String(s) = v else {
            return Err(src.error(at(&["input"]), format!("stage `{name}`: `input` must be a stage name")));
        };
        inputs.insert("input".to_string(), s.clone());
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
            inputs.insert(slot.clone(), up.clone());
        }
    }
    let mut params = table.clone();
    for key in ENGINE_KEYS {
        params.remove(*key);
    }
    let params = serde_json::to_value(toml::Value::Table(params)).map_err(|e| src.error(at(&[]), e.to_string()))?;
    Ok(RawStage { name: name.to_string(), kind, inputs, params, location })
}

/// Checks a stage against its kind: the kind exists, the input slots fit, the
/// params resolved.
fn check_stage(
    src: &Source,
    spans: &DeTable,
    kinds: &[KindInfo],
    raw: RawStage,
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
    if let Some(slots) = &kind.inputs {
        let slots: Vec<&str> = slots.iter().map(String::as_str).collect();
        for slot in raw.inputs.keys() {
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
                let path: &[&str] = if slot == "input" { &["input"] } else { &["inputs", slot] };
                return Err(src.error(at(path), msg));
            }
        }
        for slot in &slots {
            if !raw.inputs.contains_key(*slot) {
                let how = if slots.len() == 1 && *slot == "input" {
                    "input = \"STAGE\"".to_string()
                } else {
                    format!("inputs = {{ {slot} = \"STAGE\" }}")
                };
                return Err(src.error(at(&[]), format!("stage `{name}` ({kind_name}) needs input `{slot}`: add {how}")));
            }
        }
    }
    let resolved = result.map_err(|e| {
        let path: Vec<&str> = e.path.iter().map(String::as_str).collect();
        let mut message = format!("stage `{name}` ({kind_name}): {}", e.message);
        if let Some(field) = unknown_field(&e.message) {
            if let Some(expected) = expected_fields(&e.message) {
                let mut candidates: Vec<&str> = expected.iter().map(String::as_str).collect();
                if path.is_empty() {
                    candidates.extend(ENGINE_KEYS);
                }
                message.push_str(&suggest(field, &candidates));
            }
            let mut full = path.clone();
            full.push(field);
            return src.error(at(&full), message);
        }
        src.error(at(&path), message)
    })?;
    Ok(StageDef { name: raw.name.clone(), kind: kind.clone(), inputs: raw.inputs, resolved, location: raw.location })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn check_references(src: &Source, spans: &DeTable, p: &Pipeline) -> Result<(), ConfigError> {
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    for stage in &p.stages {
        for (slot, up) in &stage.inputs {
            if !names.contains(&up.as_str()) {
                let path: Vec<&str> = if slot == "input" && src.key_span(spans, &["stages", &stage.name, "input"]).is_some() {
                    vec!["stages", &stage.name, "input"]
                } else {
                    vec!["stages", &stage.name, "inputs", slot]
                };
                return Err(src.error(
                    src.key_span(spans, &path),
                    format!("stage `{}`: input `{slot}` names stage `{up}`, which does not exist{}", stage.name, suggest(up, &names)),
                ));
            }
        }
    }
    Ok(())
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
}

impl Source<'_> {
    fn location(&self, offset: Option<usize>) -> String {
        match offset {
            Some(offset) => {
                let before = &self.text[..offset.min(self.text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
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
        let mut table = table;
        let mut found = None;
        for (i, segment) in path.iter().enumerate() {
            let Some((key, value)) = table.iter().find(|(k, _)| k.get_ref() == segment) else {
                return found;
            };
            let (key, value): (&Spanned<_>, &Spanned<DeValue>) = (key, value);
            found = Some(key.span().start);
            match value.get_ref() {
                DeValue::Table(t) if i + 1 < path.len() => table = t,
                _ => return found,
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
