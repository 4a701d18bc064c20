//! Fine-tuning an input model artifact: which of its weights train (the
//! `trainable` param, the same in `sft`, `dpo`, `reward_model`, `classify`
//! and `ppo`) and the plain model artifact written at the end.
//!
//! * `trainable = "all"`: every weight trains.
//! * `trainable = { last_blocks = N }`: the final norm (and an untied output
//!   head) and the last N transformer blocks train, the rest is frozen;
//!   N ≥ the model's `n_layer` trains the embeddings too, and 0 trains only
//!   what the stage adds (a reward or class head: a linear probe). Frozen
//!   weights get no gradient and autograd stops below the lowest trained
//!   block, so training only the top is also faster.
//! * `trainable = { lora = { rank, alpha, dropout, targets } }` (a [`Lora`]):
//!   the model's weights are frozen and low-rank adapters train; they live in
//!   a VarStore of their own, which is what the trainer optimizes and
//!   checkpoints. On saving they are merged into the weights
//!   ([`Gpt::merge_lora`]), so the output is a plain model artifact that
//!   `generate`, `export` and `eval` take as they take `pretrain`'s.
//!
//! What a stage adds on top of the model (a head, made by
//! [`Tuning::add_zeros`]) trains in every mode.

use std::path::Path;

use anyhow::{Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Tensor};
use tokenizers::Tokenizer;

use crate::data::instruct::Record;
use crate::data::records;
use crate::formats::model::{save_model, ModelArtifact};
use crate::model::{Gpt, Lora};
use crate::{ParamError, StageCtx};

/// Which weights of the input model train: `"all"`, `{ last_blocks = N }` or `{ lora = { rank, alpha, dropout, targets } }`.
///
/// See the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Trainable {
    All,
    LastBlocks(#[schemars(range(max = 1024))] usize),
    Lora(Lora),
}

impl Trainable {
    /// Checks the LoRA settings; errors name fields under `trainable`.
    pub fn check(&self) -> Result<(), ParamError> {
        match self {
            Trainable::Lora(lora) => lora.check(&["trainable", "lora"]),
            _ => Ok(()),
        }
    }
}

/// The param an older llmflow took for LoRA, with what to write now (see
/// [`crate::Stage::MOVED`]).
pub const MOVED_LORA: (&str, &str) = ("lora", "trainable = { lora = { rank = 8, alpha = 16, … } }");

/// An input model being fine-tuned.
pub struct Tuning {
    /// The model's weights: frozen under LoRA, in part under `last_blocks`.
    pub vs: nn::VarStore,
    pub gpt: Gpt,
    pub tokenizer: Tokenizer,
    /// The LoRA adapters and what the stage adds; `None` without LoRA.
    adapters: Option<nn::VarStore>,
    /// The modules the stage added (`score`, `v_head`).
    added: Vec<String>,
}

impl Tuning {
    /// The model artifact in `dir`, prepared as `trainable` asks; LoRA
    /// adapters start from values seeded by `seed`.
    pub fn open(dir: &Path, trainable: &Trainable, device: Device, seed: u64) -> Result<Tuning> {
        let ModelArtifact { mut vs, mut gpt, tokenizer } = ModelArtifact::open(dir, device)?;
        let adapters = match trainable {
            Trainable::All => None,
            Trainable::LastBlocks(n) => {
                freeze_below(&vs, gpt.config().n_layer as usize, *n)?;
                None
            }
            Trainable::Lora(lora) => {
                vs.freeze();
                let adapters = nn::VarStore::new(device);
                tch::manual_seed(seed as i64);
                gpt.add_lora(&adapters.root(), lora)?;
                Some(adapters)
            }
        };
        Ok(Tuning { vs, gpt, tokenizer, adapters, added: Vec::new() })
    }

    /// A weight `{module}.weight` of shape `dims` that the stage adds to the
    /// model (a head), starting at zero; it trains in every mode.
    pub fn add_zeros(&mut self, module: &str, dims: &[i64]) -> Tensor {
        self.added.push(module.to_string());
        (self.adapters.as_ref().unwrap_or(&self.vs).root() / module).zeros("weight", dims)
    }

    /// The model, and the VarStore whose variables train.
    pub fn parts(&mut self) -> (&Gpt, &mut nn::VarStore) {
        match &mut self.adapters {
            Some(adapters) => (&self.gpt, adapters),
            None => (&self.gpt, &mut self.vs),
        }
    }

    /// Parameters that train.
    pub fn trainable_params(&self) -> i64 {
        let vs = self.adapters.as_ref().unwrap_or(&self.vs);
        vs.variables().values().filter(|t| t.requires_grad()).map(|t| t.numel() as i64).sum()
    }

    /// Merges the adapters into the weights and moves what the stage added
    /// beside them, so that `vs` holds every weight of the trained model.
    pub fn merge(&mut self) -> Result<()> {
        self.gpt.merge_lora();
        if let Some(adapters) = self.adapters.take() {
            let variables = adapters.variables();
            for module in &self.added {
                let name = format!("{module}.weight");
                let trained = variables.get(&name).with_context(|| format!("no variable `{name}` among the adapters"))?;
                let mut weight = (self.vs.root() / module.as_str()).zeros("weight", &trained.size());
                tch::no_grad(|| weight.copy_(trained));
            }
        }
        Ok(())
    }

    /// Merges (see [`Tuning::merge`]) and writes the model artifact into
    /// `out` with the tokenizer of the input artifact `input`.
    pub fn save(mut self, out: &Path, input: &Path) -> Result<()> {
        self.merge()?;
        save_model(out, &self.vs, self.gpt.config(), input)
    }
}

/// Freezes the weights below the last `last_blocks` of `n_layer` blocks (see
/// the module docs). Errors on a variable name the model does not use.
fn freeze_below(vs: &nn::VarStore, n_layer: usize, last_blocks: usize) -> Result<()> {
    for (name, mut tensor) in vs.variables() {
        let train = match part(&name).with_context(|| format!("variable `{name}` is no part of a GPT"))? {
            Part::FinalNorm | Part::LmHead => last_blocks > 0,
            Part::Block(i) => i + last_blocks >= n_layer,
            Part::Embedding => last_blocks >= n_layer,
        };
        let _ = tensor.requires_grad_(train);
    }
    Ok(())
}

/// Where a variable sits in a GPT.
#[derive(Debug, PartialEq)]
enum Part {
    Embedding,
    Block(usize),
    FinalNorm,
    LmHead,
}

/// The part of the Hugging Face name of a GPT-2 or Llama variable (see
/// [`crate::model`]'s table).
fn part(name: &str) -> Option<Part> {
    let segments: Vec<&str> = name.split('.').collect();
    match segments.as_slice() {
        ["lm_head", "weight"] => Some(Part::LmHead),
        ["transformer", "wte" | "wpe", ..] | ["model", "embed_tokens", ..] => Some(Part::Embedding),
        ["transformer", "ln_f", ..] | ["model", "norm", ..] => Some(Part::FinalNorm),
        ["transformer", "h", i, _, ..] | ["model", "layers", i, _, ..] => i.parse().ok().map(Part::Block),
        _ => None,
    }
}

/// The records of the data file `path` (relative to the project).
pub fn read_records(ctx: &StageCtx, path: &str) -> Result<Vec<Record>> {
    records::read(&ctx.project_path(path))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn trainable_takes_one_of_three_shapes() {
        let parse = |v| serde_json::from_value::<Trainable>(v);
        assert_eq!(parse(json!("all")).unwrap(), Trainable::All);
        assert_eq!(parse(json!({"last_blocks": 2})).unwrap(), Trainable::LastBlocks(2));
        assert_eq!(parse(json!({"lora": {"rank": 4}})).unwrap(), Trainable::Lora(Lora { rank: 4, ..Lora::default() }));
        let err = parse(json!({"last_block": 2})).unwrap_err().to_string();
        assert!(err.contains("last_blocks") && err.contains("lora"), "{err}");
        let bad = parse(json!({"lora": {"targets": ["qkv"]}})).unwrap();
        assert_eq!(bad.check().unwrap_err().path, ["trainable", "lora", "targets"]);
    }

    #[test]
    fn parts_are_named_as_hugging_face_names_them() {
        assert_eq!(part("transformer.h.3.attn.c_attn.weight"), Some(Part::Block(3)));
        assert_eq!(part("model.layers.0.mlp.up_proj.weight"), Some(Part::Block(0)));
        assert_eq!(part("transformer.ln_f.bias"), Some(Part::FinalNorm));
        assert_eq!(part("model.embed_tokens.weight"), Some(Part::Embedding));
        assert_eq!(part("lm_head.weight"), Some(Part::LmHead));
        assert_eq!(part("score.weight"), None);
    }
}
