//! The llmflow stage library: the stage kinds (`kinds/`, one module each, each
//! a leaf) over the shared layers they use (`train`, `sample`, `data`,
//! `formats`, `model`, `fast`; see the README's "Layout").
//!
//! A stage is a function from `(params, input directories)` to an output
//! directory. This crate knows nothing about DAGs, caching or scheduling; the
//! engine (the `llmflow` binary) knows nothing about language models. The two
//! meet through the [`Stage`] trait, the [`kinds::each_kind`] list and a process
//! boundary (see the `llmflow-protocol` crate):
//!
//! * [`Stage`] is what a stage kind implements: its `KIND` name, a `VERSION`
//!   to bump when the output for the same inputs changes, a `Params` struct
//!   deserialized from the stage's table in `pipeline.toml` (unknown keys are an
//!   error, missing keys take their defaults), and `run`.
//! * [`kinds::each_kind`] lists every kind once. Adding a stage kind is one
//!   module in `kinds/` and one line in that list; the engine needs no change.
//! * The `llmflow-stage` binary (this crate's `src/main.rs`) answers the
//!   engine: it lists [`kinds`], [`resolve`]s params and [`run`]s a stage.
//!   Only it links libtorch, so the engine starts in milliseconds.
//!
//! The engine hashes the params *after* defaults are applied, so writing a
//! default value explicitly never invalidates an artifact. Params listed in
//! [`Stage::VOLATILE`] (log intervals, progress, thread counts) are left out of
//! the hash because they cannot change the output.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use anyhow::{Context, Result};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use llmflow_protocol::{KindInfo, ParamError, Report, Resolved, Resources, StageCtx};
use llmflow_protocol::{ResolveRequest, ResolveResponse};

pub mod bounds;
pub mod data;
pub mod describe;
pub mod device;
pub mod dist;
pub mod fast;
pub mod formats;
pub mod kinds;
#[cfg(test)]
mod layers;
pub mod model;
pub mod sample;
pub mod sandbox;
#[cfg(test)]
pub(crate) mod testing;
pub mod train;

/// A stage kind.
pub trait Stage {
    /// The name users write as `kind = "..."`.
    const KIND: &'static str;
    /// Bump when the output for the same inputs and params changes.
    const VERSION: u32;
    /// One line for `llmflow kinds` and error messages.
    const SUMMARY: &'static str;
    /// The input slots this kind reads (`inputs = { NAME = "stage" }`).
    const INPUTS: Inputs;
    /// More slots of [`Inputs::Fixed`] that a stage may leave out.
    const OPTIONAL_INPUTS: &'static [&'static str] = &[];
    /// Top-level params that cannot change the output; excluded from the key.
    const VOLATILE: &'static [&'static str] = &[];
    /// The report card (`text`, `json`) `llmflow report` prints, if the kind
    /// writes one.
    const REPORT: Option<(&'static str, &'static str)> = None;
    /// Files of the output a person looks at first; `llmflow show` names them.
    const SHOW: &'static [&'static str] = &[];
    /// Tables of params that take the kind's own defaults key by key (see
    /// [`params`]): a fine-tuning stage's `train`.
    const MERGED: &'static [&'static str] = &[];
    /// Params an older llmflow took, each with what to write instead; a
    /// pipeline that still uses one gets that as its error.
    const MOVED: &'static [(&'static str, &'static str)] = &[];

    /// Each field's doc comment is its line in `llmflow kinds KIND`.
    type Params: Serialize + DeserializeOwned + Default + JsonSchema;

    /// Checks params beyond what serde and the bounds in the schema can
    /// (non-empty strings, rules across fields, input references). `inputs`
    /// are the slot names the user wired up.
    fn check(_params: &Self::Params, _inputs: &[String]) -> Result<(), ParamError> {
        Ok(())
    }

    /// Files outside the artifact store that the stage reads, relative to the
    /// pipeline's directory. Their contents are part of the stage's key.
    fn files(_params: &Self::Params) -> Vec<String> {
        Vec::new()
    }

    /// What the scheduler must reserve while the stage runs.
    fn resources(_params: &Self::Params) -> Resources {
        Resources::default()
    }

    fn run(params: &Self::Params, ctx: &mut StageCtx) -> Result<()>;

    /// Whether [`Stage::estimate`] says anything for this kind.
    const ESTIMATES: bool = false;

    /// What a run would cost (`llmflow estimate`, `run --dry-run`): lines for
    /// a person, or `None` for kinds that are cheap. `ctx` has the inputs
    /// that are already built.
    fn estimate(_params: &Self::Params, _ctx: &StageCtx) -> Result<Option<String>> {
        Ok(None)
    }
}

/// The input slots of a stage kind.
#[derive(Clone, Copy, Debug)]
pub enum Inputs {
    /// Exactly these slot names. `input = "x"` in the file fills the slot
    /// named `input`.
    Fixed(&'static [&'static str]),
    /// Any slot names (the `command` kind).
    Any,
}

/// Something done once per stage kind; see [`kinds::each_kind`].
pub trait KindVisitor {
    fn visit<S: Stage + 'static>(&mut self);
}

fn info<S: Stage>() -> KindInfo {
    KindInfo {
        kind: S::KIND.to_string(),
        version: S::VERSION,
        summary: S::SUMMARY.to_string(),
        inputs: match S::INPUTS {
            Inputs::Fixed(slots) => Some(slots.iter().map(|s| s.to_string()).collect()),
            Inputs::Any => None,
        },
        optional_inputs: S::OPTIONAL_INPUTS.iter().map(|s| s.to_string()).collect(),
        volatile: S::VOLATILE.iter().map(|s| s.to_string()).collect(),
        report: S::REPORT.map(|(text, json)| Report { text: text.into(), json: json.into() }),
        show: S::SHOW.iter().map(|s| s.to_string()).collect(),
        estimates: S::ESTIMATES,
    }
}

/// Every kind's declaration, for the engine.
pub fn kinds() -> Vec<KindInfo> {
    struct Collect(Vec<KindInfo>);
    impl KindVisitor for Collect {
        fn visit<S: Stage + 'static>(&mut self) {
            self.0.push(info::<S>());
        }
    }
    let mut c = Collect(Vec::new());
    kinds::each_kind(&mut c);
    c.0
}

/// The params of kind `S` from what the user wrote, defaults applied;
/// errors name the offending param. Each key the user wrote replaces the
/// kind's default (`Params::default()`), so a key left out keeps the kind's
/// own value: a training stage's flattened loop settings keep the stage's
/// values, not the loop's. The tables in [`Stage::MERGED`] are laid over
/// the kind's default table key by key, so a fine-tuning stage's partly
/// written `train = { lr = 5e-4 }` keeps that stage's step count, not
/// pretraining's. Any other table replaces the default one whole (a model
/// config resolves its own defaults from its `arch`). Numbers are checked
/// against the bounds in the kind's schema (see [`bounds`]) before anything
/// else, so [`Stage::check`] may take them as in range.
pub fn params<S: Stage>(given: serde_json::Value) -> Result<S::Params, ParamError> {
    for (old, instead) in S::MOVED {
        if given.get(old).is_some() {
            return Err(ParamError::new(&[old], format!("`{old}` is no longer a param of `{}`: write `{instead}`", S::KIND)));
        }
    }
    let mut full = serde_json::to_value(S::Params::default()).expect("params serialize to JSON");
    match (&mut full, given) {
        (serde_json::Value::Object(full), serde_json::Value::Object(given)) => {
            for (key, value) in given {
                match (full.get_mut(&key), value) {
                    (Some(serde_json::Value::Object(table)), serde_json::Value::Object(value)) if S::MERGED.contains(&key.as_str()) => {
                        table.extend(value)
                    }
                    (_, value) => {
                        full.insert(key, value);
                    }
                }
            }
        }
        (full, given) => *full = given,
    }
    bounds::check(schema::<S>(), &full)?;
    serde_path_to_error::deserialize(full).map_err(|e| {
        let path = e.path().iter().filter_map(segment_name).collect();
        ParamError { path, message: e.into_inner().to_string() }
    })
}

/// The JSON schema of kind `S`'s params, made once per kind: a pipeline may
/// have thousands of stages of one kind.
fn schema<S: Stage>() -> &'static serde_json::Value {
    static SCHEMAS: LazyLock<Mutex<HashMap<&str, &serde_json::Value>>> = LazyLock::new(Mutex::default);
    let mut schemas = SCHEMAS.lock().expect("no panic while holding the lock");
    schemas.entry(S::KIND).or_insert_with(|| Box::leak(Box::new(schemars::schema_for!(S::Params).to_value())))
}

/// Deserializes and checks params, applying defaults.
fn resolve_one<S: Stage>(params: serde_json::Value, inputs: &[String]) -> Result<Resolved, ParamError> {
    let typed: S::Params = crate::params::<S>(params)?;
    S::check(&typed, inputs)?;
    let params = serde_json::to_value(&typed).expect("params serialize to JSON");
    let mut key_params = params.clone();
    if let serde_json::Value::Object(map) = &mut key_params {
        for name in S::VOLATILE {
            map.remove(*name);
        }
    }
    Ok(Resolved { files: S::files(&typed), resources: S::resources(&typed), params, key_params })
}

fn segment_name(seg: &serde_path_to_error::Segment) -> Option<String> {
    use serde_path_to_error::Segment;
    match seg {
        Segment::Map { key } => Some(key.clone()),
        Segment::Seq { index } => Some(index.to_string()),
        Segment::Enum { variant } => Some(variant.clone()),
        Segment::Unknown => None,
    }
}

/// Resolves every stage of a pipeline (`llmflow-stage resolve`).
pub fn resolve(request: &ResolveRequest) -> ResolveResponse {
    struct One<'a> {
        stage: &'a llmflow_protocol::StageRequest,
        result: Option<Result<Resolved, ParamError>>,
    }
    impl KindVisitor for One<'_> {
        fn visit<S: Stage + 'static>(&mut self) {
            if S::KIND == self.stage.kind {
                self.result = Some(resolve_one::<S>(self.stage.params.clone(), &self.stage.inputs));
            }
        }
    }
    let stages = request
        .stages
        .iter()
        .map(|stage| {
            let mut one = One { stage, result: None };
            kinds::each_kind(&mut one);
            one.result
        })
        .collect();
    ResolveResponse { kinds: kinds(), stages }
}

/// The params of kind `kind` with their defaults, as TOML with a comment
/// line each (`llmflow kinds KIND`).
pub fn describe(kind: &str) -> Result<String> {
    struct Describe<'a>(&'a str, Option<String>);
    impl KindVisitor for Describe<'_> {
        fn visit<S: Stage + 'static>(&mut self) {
            if S::KIND == self.0 {
                let defaults = serde_json::to_value(S::Params::default()).expect("params serialize to JSON");
                self.1 = Some(describe::params_toml(S::KIND, S::SUMMARY, &defaults, schema::<S>()));
            }
        }
    }
    let mut d = Describe(kind, None);
    kinds::each_kind(&mut d);
    d.1.with_context(|| format!("unknown stage kind `{kind}`"))
}

/// What a stage of kind `kind` with these params holds while it runs: the
/// runner starts `processes` ranks of itself from it.
pub fn resources(kind: &str, params: &serde_json::Value) -> Result<Resources> {
    struct Of<'a>(&'a str, &'a serde_json::Value, Option<Result<Resources>>);
    impl KindVisitor for Of<'_> {
        fn visit<S: Stage + 'static>(&mut self) {
            if S::KIND == self.0 {
                self.2 =
                    Some(serde_json::from_value::<S::Params>(self.1.clone()).context("decoding stage params").map(|p| S::resources(&p)));
            }
        }
    }
    let mut of = Of(kind, params, None);
    kinds::each_kind(&mut of);
    of.2.unwrap_or_else(|| anyhow::bail!("unknown stage kind `{kind}`"))
}

/// Runs a stage of kind `kind` (in the stage process).
pub fn run(kind: &str, params: serde_json::Value, ctx: &mut StageCtx) -> Result<()> {
    dispatch(kind, params, ctx, Action::Run).map(drop)
}

/// What running a stage of kind `kind` would cost, if the kind says.
pub fn estimate(kind: &str, params: serde_json::Value, ctx: &mut StageCtx) -> Result<Option<String>> {
    dispatch(kind, params, ctx, Action::Estimate)
}

#[derive(Clone, Copy)]
enum Action {
    Run,
    Estimate,
}

fn dispatch(kind: &str, params: serde_json::Value, ctx: &mut StageCtx, action: Action) -> Result<Option<String>> {
    struct Dispatch<'a> {
        kind: &'a str,
        params: Option<serde_json::Value>,
        ctx: &'a mut StageCtx,
        action: Action,
        result: Option<Result<Option<String>>>,
    }
    impl KindVisitor for Dispatch<'_> {
        fn visit<S: Stage + 'static>(&mut self) {
            if S::KIND == self.kind {
                let params = self.params.take().expect("one kind matches");
                self.result =
                    Some(serde_json::from_value::<S::Params>(params).context("decoding stage params").and_then(|p| match self.action {
                        Action::Run => S::run(&p, self.ctx).map(|()| None),
                        Action::Estimate => S::estimate(&p, self.ctx),
                    }));
            }
        }
    }
    let mut visitor = Dispatch { kind, params: Some(params), ctx, action, result: None };
    kinds::each_kind(&mut visitor);
    visitor.result.unwrap_or_else(|| anyhow::bail!("unknown stage kind `{kind}`"))
}
