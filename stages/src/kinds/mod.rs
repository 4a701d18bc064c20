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
    v.visit::<dpo::Dpo>();
    v.visit::<classify::Classify>();
    v.visit::<eval::Eval>();
    v.visit::<compare::Compare>();
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::Lora;
    use crate::train::finetune::Trainable;
    use crate::train::{trainer, Hyper};
    use crate::{params, Stage};

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
}
