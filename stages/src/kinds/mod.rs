//! The stage kinds, one module each. A kind is a leaf: it uses the shared
//! layers (`formats`, `data`, `model`, `sample`, `train`) and never another
//! kind, and nothing outside this folder uses a kind (`tests/layers.rs`
//! checks both). Adding a kind is a module here and a line in [`each_kind`].

use crate::KindVisitor;

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

#[cfg(test)]
mod tests {
    use llmflow_protocol::{ResolveRequest, StageRequest};
    use serde_json::{json, Value};

    use super::*;
    use crate::model::Lora;
    use crate::train::finetune::Trainable;
    use crate::train::{trainer, Hyper};
    use crate::{params, ParamError, Stage};

    #[test]
    fn left_out_params_take_the_kinds_own_defaults() {
        let p = params::<classify::Classify>(json!({"max_tokens": 64})).unwrap();
        assert_eq!(p.every, classify::Params::default().every, "flattened fields");
        assert_ne!(p.every, trainer::Every::default(), "classify's defaults differ from the loop's");
        let p = params::<sft::Sft>(json!({"train": {"lr": 5e-4}})).unwrap();
        assert_eq!(p.train, Hyper { lr: 5e-4, ..sft::Params::default().train });
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
                let text = crate::describe(S::KIND).unwrap();
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
        let errors: Vec<ParamError> = crate::resolve(&request).stages.into_iter().map(|s| s.unwrap().unwrap_err()).collect();
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
