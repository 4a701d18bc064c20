//! Reading `pipeline.toml` into a [`Pipeline`]: parsing ([`parse`], with
//! errors at `file:line:column` through [`source`]), sweeps ([`sweep`])
//! expanded into stages ([`expand`]), params resolved by the stage runner,
//! and the result kept in the store for the next load ([`snapshot`]).
//!
//! Parsing happens twice over the same text: once into plain values (what
//! stages receive) and once into a span-carrying tree, used only to point an
//! error at `file:line:column`. Every mistake a user can make in the file is
//! a [`ConfigError`] (exit code 2) that names the stage and field, and
//! suggests the nearest valid name where there is one.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use toml::de::DeTable;

use crate::error::{suggest, ConfigError};
use crate::executor;
use crate::graph::Dag;
use crate::protocol::{KindInfo, ResolveRequest, Resolved, StageRequest};

mod expand;
mod parse;
mod snapshot;
mod source;
pub mod sweep;

use parse::{check_stage, check_store_location, parse, Parsed};
use snapshot::Snapshot;
use source::Source;
use sweep::Pattern;

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
    /// The shared cache, when `[pipeline] remote` sets one.
    pub remote: Option<crate::remote::Settings>,
    /// Stages in file order.
    pub stages: Vec<StageDef>,
    /// Stage name → its index in `stages`.
    pub(crate) by_name: HashMap<String, usize>,
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
    /// Where it runs and the executor's settings for it.
    pub executor: executor::Settings,
    /// Its log keeps the last this many MiB (`log_limit_mb`).
    pub log_limit_mb: u64,
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
        let labels: Vec<Vec<(String, String)>> = members.iter().map(|&i| self.stages[i].labels.clone()).collect();
        let matched: Vec<usize> = pattern.select(&labels).into_iter().map(|m| members[m]).collect();
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
        let Parsed { name, artifacts, device, remote, raw, expanded } = parse(&src, &spans, &root)?;
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
        let response = crate::runner::resolve(&request, cache.as_deref())
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
        let pipeline = Pipeline { file: file.clone(), root, name, artifacts, device, remote, stages, by_name };
        if let Some(snapshot) = snapshot {
            snapshot.write(&pipeline, response.kinds);
        }
        Ok(pipeline)
    }

    /// The stage graph.
    pub fn dag(&self) -> Dag {
        Dag::new(self.stages.iter().map(|s| s.inputs.values().map(|up| self.index(up).expect("checked reference")).collect()).collect())
    }

    /// Stages grouped by the table they come from (a swept stage's
    /// variants together), groups in dependency order.
    pub fn groups(&self, dag: &Dag) -> Vec<Vec<usize>> {
        let mut at: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for &i in &dag.order {
            let g = *at.entry(self.stages[i].base.as_str()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        groups
    }
}
