//! A GPT with a linear head on the hidden state of each sequence's last
//! token: the reward model (one output, a scalar score) and the classifier
//! (one output per class).
//!
//! The artifact is a model artifact (see [`crate::formats::model`])
//! whose `model.safetensors` also holds `score.weight` [n_out, d_model], the
//! name Hugging Face's `GPT2ForSequenceClassification` and
//! `LlamaForSequenceClassification` use, plus `head.json` with the output
//! labels. Reading the last real token works because batches are right-padded
//! and attention is causal: that token has seen the whole sequence.
//!
//! Stages that train a head choose which weights of the body train with
//! `trainable` (see [`crate::train::finetune`]); the head always trains.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::data::sequences::{gather_rows, pad, Padded, Sequence};
use crate::formats::model::save_model;
use crate::formats::tokenizer;
use crate::model::Gpt;
use crate::train::finetune::{Trainable, Tuning};

pub const HEAD_FILE: &str = "head.json";

/// What `head.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadInfo {
    /// One name per output: `["reward"]`, or the classes in label order.
    pub labels: Vec<String>,
}

/// A GPT body with a last-token head.
pub struct HeadModel {
    /// The body, its tokenizer, and the head among what it added.
    pub model: Tuning,
    /// [n_out, C], no bias.
    pub score: Tensor,
    pub info: HeadInfo,
}

impl HeadModel {
    /// A new head with `labels.len()` outputs on the model artifact in
    /// `base` (a pretrained or fine-tuned model; an existing `score.weight`
    /// is not reused), with the weights `trainable` names set to train. The
    /// head starts at zero, so every score starts equal.
    pub fn from_model(base: &Path, labels: Vec<String>, trainable: &Trainable, device: Device, seed: u64) -> Result<HeadModel> {
        ensure!(!labels.is_empty(), "a head needs at least one output");
        let mut model = Tuning::open(base, trainable, device, seed)?;
        // The language-model output head (when untied) is unused here.
        if let Some(lm_head) = model.vs.variables().get_mut("lm_head.weight") {
            let _ = lm_head.requires_grad_(false);
        }
        let score = model.add_zeros("score", &[labels.len() as i64, model.gpt.config().d_model]);
        Ok(HeadModel { model, score, info: HeadInfo { labels } })
    }

    /// A scorer artifact written by [`HeadModel::save`] (`reward_model`,
    /// `classify`).
    pub fn open(dir: &Path, device: Device) -> Result<HeadModel> {
        let info_path = dir.join(HEAD_FILE);
        let info: HeadInfo = serde_json::from_slice(
            &std::fs::read(&info_path)
                .with_context(|| format!("cannot read {}: not a reward model or classifier artifact", info_path.display()))?,
        )
        .with_context(|| format!("cannot parse {}", info_path.display()))?;
        let mut scorer = HeadModel::from_model(dir, info.labels.clone(), &Trainable::All, device, 0)?;
        scorer.model.vs.load(dir.join("model.safetensors")).with_context(|| format!("cannot load the head in {}", dir.display()))?;
        scorer.info = info;
        Ok(scorer)
    }

    /// Outputs [B, n_out] for each row's last real token.
    pub fn forward(&self, batch: &Padded, train: bool) -> Tensor {
        self.head().forward(batch, train)
    }

    /// The model and head, borrowed for scoring.
    pub fn head(&self) -> Head<'_> {
        Head { gpt: &self.model.gpt, score: &self.score }
    }

    /// The VarStore that trains and the head, borrowed apart, so that a
    /// training loop can hold the VarStore while its task scores with the
    /// head.
    pub fn parts(&mut self) -> (&mut nn::VarStore, Head<'_>) {
        let (gpt, vs) = self.model.parts();
        (vs, Head { gpt, score: &self.score })
    }

    /// Writes the artifact: model, head and the tokenizer of `tokenizer_dir`.
    pub fn save(mut self, out: &Path, tokenizer_dir: &Path) -> Result<()> {
        self.model.merge()?;
        save_model(out, &self.model.vs, self.model.gpt.config(), tokenizer_dir)?;
        std::fs::write(out.join(HEAD_FILE), serde_json::to_string_pretty(&self.info)? + "\n")?;
        // The tokenizer is the same file; check it loads as the model expects.
        tokenizer::load(out)?;
        Ok(())
    }
}

/// The GPT and head of a [`HeadModel`], without its VarStore.
#[derive(Clone, Copy)]
pub struct Head<'a> {
    pub gpt: &'a Gpt,
    pub score: &'a Tensor,
}

impl Head<'_> {
    /// Outputs [B, n_out] for each row's last real token.
    pub fn forward(&self, batch: &Padded, train: bool) -> Tensor {
        self.read(&self.gpt.hidden_states(&batch.x, train), batch)
    }

    /// Forward and backward in training mode through [`Gpt::backward`]
    /// (activation checkpointing included): `loss_fn` maps the outputs
    /// [B, n_out] to a scalar loss; returns it, detached. On CUDA under bf16 autocast, as `pretrain` trains.
    pub fn backward(&self, batch: &Padded, loss_fn: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        tch::autocast(self.gpt.device().is_cuda(), || self.gpt.backward(&batch.x, true, |hidden| loss_fn(&self.read(hidden, batch))))
    }

    /// Outputs [N, n_out] of many sequences, `batch_size` at a time, without
    /// gradients, on the CPU.
    pub fn scores(&self, sequences: &[Sequence], batch_size: usize) -> Tensor {
        let device = self.gpt.device();
        tch::no_grad(|| {
            let parts: Vec<Tensor> = sequences
                .chunks(batch_size.max(1))
                .map(|chunk| tch::autocast(device.is_cuda(), || self.forward(&pad(chunk, 0, device), false)).to_device(Device::Cpu))
                .collect();
            Tensor::cat(&parts, 0)
        })
    }

    fn read(&self, hidden: &Tensor, batch: &Padded) -> Tensor {
        gather_rows(hidden, &batch.last()).to_kind(Kind::Float).linear::<Tensor>(self.score, None)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::sequences::{pad, Sequence};
    use crate::testing::{build, tiny, torch_rng};
    use crate::testing::{corpus, tiny_model, write_docs};

    #[test]
    fn head_reads_the_last_real_token_and_round_trips() {
        let _rng = torch_rng();
        let dir = tempfile::tempdir().unwrap();
        let (base, config) = tiny_model(dir.path(), &corpus("tinyshakespeare.txt")[..20_000], serde_json::json!({}));
        let tok = dir.path().join("tok");

        let scorer = HeadModel::from_model(&base, vec!["ham".into(), "spam".into()], &Trainable::All, Device::Cpu, 0).unwrap();
        tch::no_grad(|| scorer.score.shallow_clone().copy_(&Tensor::randn([2, config.d_model], (Kind::Float, Device::Cpu))));
        let seqs = [Sequence::new(&[1, 2], &[3, 4, 5]), Sequence::new(&[6], &[7])];
        let batch = pad(&seqs, 0, Device::Cpu);
        let together = scorer.forward(&batch, false);
        let alone = scorer.forward(&pad(&seqs[1..], 0, Device::Cpu), false);
        assert_eq!(together.size(), [2, 2]);
        assert!(together.get(1).allclose(&alone.get(0), 1e-5, 1e-5, false), "padding changed the score");
        let many = [&seqs[..], &seqs[..], &seqs[..1]].concat();
        assert!(scorer.head().scores(&many, 2).narrow(0, 2, 2).allclose(&together, 1e-5, 1e-5, false));

        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        scorer.save(&out, &tok).unwrap();
        let back = HeadModel::open(&out, Device::Cpu).unwrap();
        assert_eq!(back.info.labels, ["ham", "spam"]);
        assert!(back.forward(&batch, false).equal(&together));
        let err = HeadModel::open(&base, Device::Cpu).err().expect("a plain model has no head");
        assert!(err.to_string().contains("not a reward model or classifier"), "{err}");
    }

    #[test]
    fn freezing_keeps_the_head_and_the_top_blocks_trainable() {
        let _rng = torch_rng();
        let dir = tempfile::tempdir().unwrap();
        write_docs(&dir.path().join("docs"), "corpus", &corpus("tinyshakespeare.txt")[..20_000]);
        let tok = dir.path().join("tok");
        crate::testing::tokenizer_artifact(&dir.path().join("docs"), &tok, serde_json::json!({"vocab_size": 300}));
        for arch in ["gpt2", "llama"] {
            let config = tiny(arch, serde_json::json!({"n_layer": 3, "tie_embeddings": false, "vocab_size": 300}));
            let (vs, _) = build(&config, 0);
            let base = dir.path().join(arch);
            std::fs::create_dir_all(&base).unwrap();
            save_model(&base, &vs, &config, &tok).unwrap();
            let trained = |last_blocks| {
                let trainable = Trainable::LastBlocks(last_blocks);
                let scorer = HeadModel::from_model(&base, vec!["reward".into()], &trainable, Device::Cpu, 0).unwrap();
                let mut names: Vec<String> =
                    scorer.model.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).map(|(n, _)| n).collect();
                names.sort();
                (names, scorer.model.vs.variables().len())
            };
            assert_eq!(trained(0).0, ["score.weight"], "{arch}");
            let top = trained(1).0;
            assert!(
                top.iter().all(|n| n == "score.weight" || n.contains(".2.") || n.contains("ln_f") || n.starts_with("model.norm")),
                "{arch}: {top:?}"
            );
            assert!(top.iter().any(|n| n.contains(".2.")) && top.len() > 3, "{arch}: {top:?}");
            let (all, variables) = trained(3);
            assert_eq!(all.len(), variables - 1, "{arch}: all but the unused lm_head: {all:?}");
            assert!(!all.contains(&"lm_head.weight".to_string()));
        }
    }
}
