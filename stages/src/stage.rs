//! The ground floor of the stage library: what a stage kind is ([`Stage`]),
//! its input slots, and its params resolved from what the user wrote
//! ([`params`]). Every layer may use it; it uses none of them. The list of
//! kinds and the dispatch over it are in [`crate::kinds`].

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use anyhow::Result;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{bounds, ParamError, Resources, StageCtx};

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
pub(crate) fn schema<S: Stage>() -> &'static serde_json::Value {
    static SCHEMAS: LazyLock<Mutex<HashMap<&str, &serde_json::Value>>> = LazyLock::new(Mutex::default);
    let mut schemas = SCHEMAS.lock().expect("no panic while holding the lock");
    schemas.entry(S::KIND).or_insert_with(|| Box::leak(Box::new(schemars::schema_for!(S::Params).to_value())))
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
