//! The llmflow stage library: one module per stage kind.
//!
//! A stage is a function from `(params, input directories)` to an output
//! directory. This crate knows nothing about DAGs, caching or scheduling; the
//! engine (the `llmflow` binary) knows nothing about language models. The two
//! meet through the [`Stage`] trait, the [`each_kind`] list and a process
//! boundary (see `llmflow::protocol`):
//!
//! * [`Stage`] is what a stage kind implements: its `KIND` name, a `VERSION`
//!   to bump when the output for the same inputs changes, a `Params` struct
//!   deserialized from the stage's table in `pipeline.toml` (unknown keys are an
//!   error, missing keys take their defaults), and `run`.
//! * [`each_kind`] lists every kind once. Adding a stage kind is one module
//!   here and one line in that list; the engine needs no change.
//! * The `llmflow-stage` binary (this crate's `src/main.rs`) answers the
//!   engine: it lists [`kinds`], [`resolve`]s params and [`run`]s a stage.
//!   Only it links libtorch, so the engine starts in milliseconds.
//!
//! The engine hashes the params *after* defaults are applied, so writing a
//! default value explicitly never invalidates an artifact. Params listed in
//! [`Stage::VOLATILE`] (log intervals, progress, thread counts) are left out of
//! the hash because they cannot change the output.


use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use llmflow::protocol::{KindInfo, ParamError, Resolved, Resources, StageCtx};
use llmflow::protocol::{ResolveRequest, ResolveResponse};

pub mod classify;
pub mod command;
pub mod dedup;
pub mod device;
pub mod docs;
pub mod dpo;
pub mod download;
pub mod eval;
pub mod export;
pub mod filter;
pub mod finetune;
pub mod generate;
pub mod head;
pub mod instruct;
pub mod loader;
pub mod model;
pub mod ppo;
pub mod pretrain;
pub mod records;
pub mod reward_model;
pub mod sequences;
pub mod sft;
pub mod shard;
pub mod shards;
pub mod train;
pub mod train_tokenizer;

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
    /// Top-level params that cannot change the output; excluded from the key.
    const VOLATILE: &'static [&'static str] = &[];

    type Params: Serialize + DeserializeOwned + Default;

    /// Checks params beyond what serde can (non-empty strings, ranges, input
    /// references). `inputs` are the slot names the user wired up.
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

/// Something done once per stage kind; see [`each_kind`].
pub trait KindVisitor {
    fn visit<S: Stage + 'static>(&mut self);
}

/// Every stage kind llmflow knows, in the order `llmflow kinds` lists them.
/// Adding a kind is one line here.
pub fn each_kind(v: &mut impl KindVisitor) {
    v.visit::<command::Command>();
    v.visit::<download::Download>();
    v.visit::<filter::Filter>();
    v.visit::<dedup::Dedup>();
    v.visit::<train_tokenizer::TrainTokenizer>();
    v.visit::<shard::Shard>();
    v.visit::<pretrain::Pretrain>();
    v.visit::<sft::Sft>();
    v.visit::<reward_model::RewardModel>();
    v.visit::<ppo::Ppo>();
    v.visit::<dpo::Dpo>();
    v.visit::<classify::Classify>();
    v.visit::<eval::Eval>();
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
        volatile: S::VOLATILE.iter().map(|s| s.to_string()).collect(),
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
    each_kind(&mut c);
    c.0
}

/// The params of kind `S` from what the user wrote, defaults applied;
/// errors name the offending param. Top-level keys left out take the kind's
/// `Params::default()`: serde's own defaulting would give the fields of a
/// flattened table (a training stage's `eval_every`, `spike_factor`, …) their
/// type's defaults instead of the kind's. A table the user writes replaces
/// the default one; its own missing keys are its type's business.
pub fn params<S: Stage>(given: serde_json::Value) -> Result<S::Params, ParamError> {
    let mut full = serde_json::to_value(S::Params::default()).expect("params serialize to JSON");
    match (&mut full, given) {
        (serde_json::Value::Object(full), serde_json::Value::Object(given)) => full.extend(given),
        (full, given) => *full = given,
    }
    serde_path_to_error::deserialize(full).map_err(|e| {
        let path = e.path().iter().filter_map(segment_name).collect();
        ParamError { path, message: e.into_inner().to_string() }
    })
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
        stage: &'a llmflow::protocol::StageRequest,
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
            each_kind(&mut one);
            one.result
        })
        .collect();
    ResolveResponse { kinds: kinds(), stages }
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
                self.result = Some(serde_json::from_value::<S::Params>(params).context("decoding stage params").and_then(|p| {
                    match self.action {
                        Action::Run => S::run(&p, self.ctx).map(|()| None),
                        Action::Estimate => S::estimate(&p, self.ctx),
                    }
                }));
            }
        }
    }
    let mut visitor = Dispatch { kind, params: Some(params), ctx, action, result: None };
    each_kind(&mut visitor);
    visitor.result.unwrap_or_else(|| anyhow::bail!("unknown stage kind `{kind}`"))
}


#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::train::{trainer, Hyper};

    #[test]
    fn left_out_params_take_the_kinds_own_defaults() {
        let p = params::<classify::Classify>(json!({"max_tokens": 64})).unwrap();
        assert_eq!(p.every, classify::Params::default().every, "flattened fields");
        assert_ne!(p.every, trainer::Every::default(), "classify's defaults differ from the loop's");
        let p = params::<sft::Sft>(json!({"train": {"lr": 5e-4}})).unwrap();
        assert_eq!(p.train, Hyper { lr: 5e-4, ..sft::Params::default().train });
        assert_ne!(sft::Params::default().train.steps, Hyper::default().steps, "sft's defaults differ from pretraining's");
        let err = params::<sft::Sft>(json!({"train": {"stpes": 1}})).unwrap_err();
        assert_eq!(err.path, ["train"]);
        assert!(err.message.contains("stpes"), "{}", err.message);
    }
}
