//! What the stages that fine-tune a model artifact share (`sft`, `dpo`):
//! which weights train, and the plain model artifact they write.
//!
//! Without `lora`, every weight of the input model trains. With
//! `lora = { rank, alpha, dropout, targets }` (a [`Lora`]), the input
//! model's weights are frozen (`requires_grad` off, so AdamW leaves them and
//! no gradient is computed for them) and only low-rank adapters train; they
//! live in a VarStore of their own, which is what the trainer optimizes and
//! checkpoints. On saving, the adapters are merged into the base weights
//! ([`Gpt::merge_lora`]), so the output is a plain model artifact that
//! `generate`, `export` and `eval` take as they take `pretrain`'s.

use std::path::Path;

use anyhow::Result;
use tch::{nn, Device};

use crate::generate::{save_model, Loaded};
use crate::instruct::Record;
use crate::model::{Gpt, Lora};
use crate::{records, StageCtx};

/// An input model being fine-tuned.
pub struct Tuning {
    /// The model; its weights are frozen under LoRA.
    pub model: Loaded,
    /// The LoRA adapters' variables; `None` for full fine-tuning.
    adapters: Option<nn::VarStore>,
}

impl Tuning {
    /// The model artifact in `dir`, with adapters as `lora` asks, their
    /// initial values seeded by `seed`.
    pub fn open(dir: &Path, lora: Option<&Lora>, device: Device, seed: u64) -> Result<Tuning> {
        let mut model = Loaded::open(dir, device)?;
        let adapters = match lora {
            None => None,
            Some(lora) => {
                model.vs.freeze();
                let adapters = nn::VarStore::new(device);
                tch::manual_seed(seed as i64);
                model.gpt.add_lora(&adapters.root(), lora)?;
                Some(adapters)
            }
        };
        Ok(Tuning { model, adapters })
    }

    /// The model, and the variables that train: the adapters, or all.
    pub fn parts(&mut self) -> (&Gpt, &mut nn::VarStore) {
        match &mut self.adapters {
            Some(adapters) => (&self.model.gpt, adapters),
            None => (&self.model.gpt, &mut self.model.vs),
        }
    }

    /// Parameters that train.
    pub fn trainable_params(&self) -> i64 {
        let vs = self.adapters.as_ref().unwrap_or(&self.model.vs);
        vs.variables().values().filter(|t| t.requires_grad()).map(|t| t.numel() as i64).sum()
    }

    /// Merges the adapters, if any, and writes the model artifact into `out`
    /// with the tokenizer of the input artifact `input`.
    pub fn save(mut self, out: &Path, input: &Path) -> Result<()> {
        self.model.gpt.merge_lora();
        save_model(out, &self.model.vs, self.model.gpt.config(), input)
    }
}

/// The records of the data file `path` (relative to the project).
pub fn read_records(ctx: &StageCtx, path: &str) -> Result<Vec<Record>> {
    records::read(&ctx.project_path(path))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::model::tests::build;
    use crate::model::ModelConfig;
    use crate::train_tokenizer::tests::{corpus, run_stage, write_docs};
    use crate::train_tokenizer::{self, Params};

    /// A model artifact of `config` (vocab_size 300) with a tokenizer trained
    /// on a little Shakespeare, in `dir/model`. Seeds libtorch: hold
    /// `torch_rng()`.
    pub(crate) fn model_artifact(dir: &Path, config: &ModelConfig) -> PathBuf {
        write_docs(&dir.join("docs"), "corpus", &corpus("tinyshakespeare.txt")[..20_000]);
        run_stage(&Params { vocab_size: 300, ..Default::default() }, &dir.join("docs"), &dir.join("tok"));
        let config = ModelConfig { vocab_size: 300, ..config.clone() };
        let (vs, _) = build(&config, 1);
        let out = dir.join("model");
        std::fs::create_dir_all(&out).unwrap();
        save_model(&out, &vs, &config, &dir.join("tok")).unwrap();
        train_tokenizer::load(&out).unwrap();
        out
    }

    /// The first `n` records of the shipped data file `name` (under
    /// `data/instruct/`), written as JSON Lines into `dir`; returns the
    /// file's name.
    pub(crate) fn instruct_data(dir: &Path, name: &str, n: usize) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/instruct").join(name);
        let all: Vec<serde_json::Value> = records::read(&path).unwrap();
        let lines: Vec<String> = all[..n].iter().map(|r| r.to_string()).collect();
        let file = name.replace(".json", ".jsonl");
        std::fs::write(dir.join(&file), lines.join("\n")).unwrap();
        file
    }

    #[test]
    fn splits_are_checked() {
    }
}
