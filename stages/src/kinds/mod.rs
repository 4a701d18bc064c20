//! The stage kinds, one module each, and the dispatch over them by kind
//! name: what the runner answers the engine ([`all`], [`resolve`],
//! [`describe`], [`resources`], [`run`], [`estimate`]).
//!
//! A kind is a leaf: it uses the shared layers (`train`, `sample`, `data`,
//! `formats`, `model`, `fast`) and the ground floor (`stage`), never another
//! kind, and nothing outside this folder uses a kind (`stages/src/layers.rs`
//! checks both). Adding a kind is a module here and a line in [`each_kind`].

use anyhow::{Context, Result};
use llmflow_protocol::{ResolveRequest, ResolveResponse};

use crate::stage::schema;
use crate::{Inputs, KindInfo, ParamError, Report, Resolved, Resources, Stage, StageCtx};

pub mod classify;
pub mod command;
pub mod compare;
pub mod dedup;
pub mod download;
pub mod dpo;
pub mod eval;
pub mod filter;
pub mod grpo;
pub mod ppo;
pub mod pretrain;
pub mod reward_model;
pub mod sft;
pub mod shard;
pub mod train_tokenizer;

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
    v.visit::<grpo::Grpo>();
    v.visit::<dpo::Dpo>();
    v.visit::<classify::Classify>();
    v.visit::<eval::Eval>();
    v.visit::<compare::Compare>();
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
pub fn all() -> Vec<KindInfo> {
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
            each_kind(&mut one);
            one.result
        })
        .collect();
    ResolveResponse { kinds: all(), stages }
}

/// The params of kind `kind` with their defaults, as TOML with a comment
/// line each (`llmflow kinds KIND`).
pub fn describe(kind: &str) -> Result<String> {
    struct Describe<'a>(&'a str, Option<String>);
    impl KindVisitor for Describe<'_> {
        fn visit<S: Stage + 'static>(&mut self) {
            if S::KIND == self.0 {
                let defaults = serde_json::to_value(S::Params::default()).expect("params serialize to JSON");
                self.1 = Some(crate::describe::params_toml(S::KIND, S::SUMMARY, &defaults, schema::<S>()));
            }
        }
    }
    let mut d = Describe(kind, None);
    each_kind(&mut d);
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
    each_kind(&mut of);
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
    each_kind(&mut visitor);
    visitor.result.unwrap_or_else(|| anyhow::bail!("unknown stage kind `{kind}`"))
}

#[cfg(test)]
mod tests {
    use llmflow_protocol::{ResolveRequest, StageRequest};
    use serde_json::{json, Value};

    use super::*;
    use crate::model::Lora;
    use crate::params;
    use crate::train::finetune::Trainable;
    use crate::train::{Hyper, Training};

    #[test]
    fn left_out_params_take_the_kinds_own_defaults() {
        let p = params::<classify::Classify>(json!({"max_tokens": 64})).unwrap();
        assert_eq!(p.training, classify::Params::default().training, "flattened fields");
        assert_ne!(p.training.spike_factor, Training::default().spike_factor, "classify's defaults differ from the loop's");
        let p = params::<sft::Sft>(json!({"train": {"lr": 5e-4}, "eval_every": 7})).unwrap();
        assert_eq!(p.train, Hyper { lr: 5e-4, ..sft::Params::default().train });
        assert_eq!(p.training.eval_every, 7);
        assert_ne!(sft::Params::default().train.steps, Hyper::default().steps, "sft's defaults differ from pretraining's");
        // Another variant of an enum replaces the default one.
        let p = params::<reward_model::RewardModel>(json!({"trainable": {"lora": {"rank": 2}}})).unwrap();
        assert_eq!(p.trainable, Trainable::Lora(Lora { rank: 2, ..Lora::default() }));
        let p = params::<reward_model::RewardModel>(json!({"trainable": "all"})).unwrap();
        assert_eq!(p.trainable, Trainable::All);
        let err = params::<sft::Sft>(json!({"train": {"stpes": 1}})).unwrap_err();
        assert_eq!(err.path, ["train", "stpes"]);
        assert!(err.message.contains("stpes"), "{}", err.message);
    }

    /// `llmflow kinds KIND` documents every param of every kind, and what
    /// it prints is valid TOML that gives the kind's defaults back.
    #[test]
    fn every_param_is_documented_and_the_description_round_trips() {
        struct Check(Vec<String>);
        impl KindVisitor for Check {
            fn visit<S: Stage + 'static>(&mut self) {
                let defaults = serde_json::to_value(S::Params::default()).unwrap();
                let schema = schemars::schema_for!(S::Params).to_value();
                let missing = crate::describe::undocumented(&defaults, &schema);
                self.0.extend(missing.iter().map(|m| format!("{}: {m}", S::KIND)));
                let text = describe(S::KIND).unwrap();
                let parsed: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", S::KIND));
                let mut table = parsed["stages"]["NAME"].as_table().unwrap().clone();
                assert_eq!(table.remove("kind").unwrap().as_str(), Some(S::KIND));
                let given = serde_json::to_value(&table).unwrap();
                let back = serde_json::to_value(params::<S>(given).unwrap()).unwrap();
                assert_eq!(back, defaults, "{}:\n{text}", S::KIND);
            }
        }
        let mut check = Check(Vec::new());
        each_kind(&mut check);
        assert!(check.0.is_empty(), "params without a doc comment: {:#?}", check.0);
    }

    #[test]
    fn every_kinds_defaults_are_within_the_bounds() {
        struct Check(Vec<String>);
        impl KindVisitor for Check {
            fn visit<S: Stage + 'static>(&mut self) {
                let schema = schemars::schema_for!(S::Params).to_value();
                let defaults = serde_json::to_value(S::Params::default()).unwrap();
                if let Err(e) = crate::bounds::check(&schema, &defaults) {
                    self.0.push(format!("{}: {}", S::KIND, e.message));
                }
            }
        }
        let mut check = Check(Vec::new());
        each_kind(&mut check);
        assert!(check.0.is_empty(), "defaults out of bounds: {:#?}", check.0);
    }

    /// Numbers that used to crash a stage (a panic in `Duration`, a 2^62
    /// or 80 GB allocation) are param errors at resolve, naming the field.
    #[test]
    fn resolve_rejects_numbers_out_of_bounds_naming_the_field_and_range() {
        let stage = |kind: &str, inputs: &[&str], params: Value| StageRequest {
            name: "s".into(),
            kind: kind.into(),
            params,
            inputs: inputs.iter().map(|i| i.to_string()).collect(),
        };
        let task = |name: &str, kind: &str| json!({"name": name, "type": kind, "file": "f.jsonl"});
        let code = json!({"name": "humaneval", "type": "code", "file": "h.jsonl", "timeout_s": 1e300, "confirm_run_unsafe_code": true});
        // TOML's nan reaches the params as JSON has it: null.
        let nan: toml::Table = toml::from_str("lr = nan").unwrap();
        let request = ResolveRequest {
            stages: vec![
                stage(
                    "eval",
                    &["model"],
                    json!({"tasks": [task("a", "perplexity"), task("b", "lambada"), task("c", "minimal_pairs"), code]}),
                ),
                stage("dedup", &["input"], json!({"bands": 1u64 << 62})),
                stage("dedup", &["input"], json!({"bands": 100_000_000})),
                stage("pretrain", &["data", "tokenizer"], json!({"train": {"batch_size": 1_000_000_000_000u64}})),
                stage("pretrain", &["data", "tokenizer"], json!({"train": serde_json::to_value(nan).unwrap()})),
            ],
        };
        let errors: Vec<ParamError> = resolve(&request).stages.into_iter().map(|s| s.unwrap().unwrap_err()).collect();
        let expected = [
            (&["tasks", "3", "timeout_s"][..], "`tasks[3].timeout_s` must be in (0, 86400], not 1e+300"),
            (&["bands"], "`bands` must be between 1 and 1024, not 4611686018427387904"),
            (&["bands"], "`bands` must be between 1 and 1024, not 100000000"),
            (&["train", "batch_size"], "`train.batch_size` must be between 1 and 1048576, not 1000000000000"),
            (&["train", "lr"], "`train.lr` must be in (0, 10], not nan or inf"),
        ];
        for (error, (path, message)) in errors.iter().zip(expected) {
            assert_eq!(error.path, path);
            assert_eq!(error.message, message);
        }
        assert_eq!(errors.len(), expected.len());
    }
}
