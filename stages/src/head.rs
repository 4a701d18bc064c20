//! A GPT with a linear head on the hidden state of each sequence's last
//! token: the reward model (one output, a scalar score) and the classifier
//! (one output per class).
//!
//! The artifact is a model artifact (see [`crate::generate::save_model`])
//! whose `model.safetensors` also holds `score.weight` [n_out, d_model], the
//! name Hugging Face's `GPT2ForSequenceClassification` and
//! `LlamaForSequenceClassification` use, plus `head.json` with the output
//! labels. Reading the last real token works because batches are right-padded
//! and attention is causal: that token has seen the whole sequence.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};
use tokenizers::Tokenizer;

use crate::generate::{save_model, Loaded};
use crate::model::Gpt;
use crate::sequences::{gather_rows, Padded};
use crate::train_tokenizer;

pub const HEAD_FILE: &str = "head.json";

/// What `head.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadInfo {
    /// One name per output: `["reward"]`, or the classes in label order.
    pub labels: Vec<String>,
}

/// A GPT body with a last-token head.
pub struct Scorer {
    pub vs: nn::VarStore,
    pub gpt: Gpt,
    /// [n_out, C], no bias.
    pub score: Tensor,
    pub tokenizer: Tokenizer,
    pub info: HeadInfo,
}

impl Scorer {
    /// A new head with `labels.len()` outputs on the model artifact in
    /// `base` (a pretrained or fine-tuned model; an existing `score.weight`
    /// is not reused). The head starts at zero, so every score starts equal.
    pub fn from_model(base: &Path, labels: Vec<String>, device: Device) -> Result<Scorer> {
        ensure!(!labels.is_empty(), "a head needs at least one output");
        let Loaded { vs, gpt, tokenizer } = Loaded::open(base, device)?;
        let score = (vs.root() / "score").zeros("weight", &[labels.len() as i64, gpt.config().d_model]);
        Ok(Scorer { vs, gpt, score, tokenizer, info: HeadInfo { labels } })
    }

    /// A scorer artifact written by [`Scorer::save`] (`reward_model`,
    /// `classify`).
    pub fn open(dir: &Path, device: Device) -> Result<Scorer> {
        let info_path = dir.join(HEAD_FILE);
        let info: HeadInfo = serde_json::from_slice(&std::fs::read(&info_path).with_context(|| {
            format!("cannot read {}: not a reward model or classifier artifact", info_path.display())
        })?)
        .with_context(|| format!("cannot parse {}", info_path.display()))?;
        let mut scorer = Scorer::from_model(dir, info.labels.clone(), device)?;
        scorer.vs.load(dir.join("model.safetensors")).with_context(|| format!("cannot load the head in {}", dir.display()))?;
        scorer.info = info;
        Ok(scorer)
    }

    /// Outputs [B, n_out] for each row's last real token.
    pub fn forward(&self, batch: &Padded, train: bool) -> Tensor {
        let hidden = self.gpt.hidden_states(&batch.x, train);
        gather_rows(&hidden, &batch.last()).to_kind(Kind::Float).linear::<Tensor>(&self.score, None)
    }

    /// Writes the artifact: model, head and the tokenizer of `tokenizer_dir`.
    pub fn save(&self, out: &Path, tokenizer_dir: &Path) -> Result<()> {
        save_model(out, &self.vs, self.gpt.config(), tokenizer_dir)?;
        std::fs::write(out.join(HEAD_FILE), serde_json::to_string_pretty(&self.info)? + "\n")?;
        // The tokenizer is the same file; check it loads as the model expects.
        train_tokenizer::load(out)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::save_model;
    use crate::model::tests::{build, tiny, torch_rng};
    use crate::sequences::{pad, Sequence};
    use crate::train_tokenizer::tests::{corpus, run_stage, write_docs};

    #[test]
    fn head_reads_the_last_real_token_and_round_trips() {
        let _rng = torch_rng();
        let dir = tempfile::tempdir().unwrap();
        write_docs(&dir.path().join("docs"), "corpus", &corpus("tinyshakespeare.txt")[..20_000]);
        let tok = dir.path().join("tok");
        run_stage(&train_tokenizer::Params { vocab_size: 300, ..Default::default() }, &dir.path().join("docs"), &tok);
        let config = tiny("gpt2", serde_json::json!({"vocab_size": 300}));
        let (vs, _) = build(&config, 1);
        let base = dir.path().join("base");
        std::fs::create_dir_all(&base).unwrap();
        save_model(&base, &vs, &config, &tok).unwrap();

        let scorer = Scorer::from_model(&base, vec!["ham".into(), "spam".into()], Device::Cpu).unwrap();
        tch::no_grad(|| scorer.score.shallow_clone().copy_(&Tensor::randn([2, config.d_model], (Kind::Float, Device::Cpu))));
        let seqs = [Sequence::new(&[1, 2], &[3, 4, 5]), Sequence::new(&[6], &[7])];
        let batch = pad(&seqs, 0, Device::Cpu);
        let together = scorer.forward(&batch, false);
        let alone = scorer.forward(&pad(&seqs[1..], 0, Device::Cpu), false);
        assert_eq!(together.size(), [2, 2]);
        assert!(together.get(1).allclose(&alone.get(0), 1e-5, 1e-5, false), "padding changed the score");

        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        scorer.save(&out, &tok).unwrap();
        let back = Scorer::open(&out, Device::Cpu).unwrap();
        assert_eq!(back.info.labels, ["ham", "spam"]);
        assert!(back.forward(&batch, false).equal(&together));
        let err = Scorer::open(&base, Device::Cpu).err().expect("a plain model has no head");
        assert!(err.to_string().contains("not a reward model or classifier"), "{err}");
    }
}
