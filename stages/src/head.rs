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
//!
//! Stages that train a head choose which weights train with
//! `trainable = { last_blocks = N }` (see [`Trainable`]): the head always,
//! the final norm and the last N transformer blocks with it, and the whole
//! model (embeddings included) once N reaches the model's depth. Frozen
//! weights get no gradient, and autograd stops below the lowest trained
//! block, so training only the top is also faster.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};
use tokenizers::Tokenizer;

use crate::generate::{save_model, Loaded};
use crate::model::Gpt;
use crate::sequences::{gather_rows, pad, Padded, Sequence};
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
        self.head().forward(batch, train)
    }

    /// The model and head, borrowed for scoring.
    pub fn head(&self) -> Head<'_> {
        Head { gpt: &self.gpt, score: &self.score }
    }

    /// The VarStore and the head, borrowed apart, so that a training loop
    /// can hold the VarStore while its task scores with the head.
    pub fn parts(&mut self) -> (&mut nn::VarStore, Head<'_>) {
        (&mut self.vs, Head { gpt: &self.gpt, score: &self.score })
    }

    /// Freezes every variable that `trainable` leaves out. Errors on a
    /// variable name the model does not use.
    pub fn freeze(&self, trainable: &Trainable) -> Result<()> {
        let n_layer = self.gpt.config().n_layer as usize;
        for (name, mut tensor) in self.vs.variables() {
            let train = match part(&name).with_context(|| format!("variable `{name}` is no part of a scorer"))? {
                Part::Score => true,
                Part::FinalNorm => trainable.last_blocks > 0,
                Part::Block(i) => i + trainable.last_blocks >= n_layer,
                Part::Embedding => trainable.last_blocks >= n_layer,
                // The language-model output head (when untied) is unused.
                Part::LmHead => false,
            };
            let _ = tensor.requires_grad_(train);
        }
        Ok(())
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

/// The GPT and head of a [`Scorer`], without its VarStore.
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
        tch::autocast(self.gpt.device().is_cuda(), || {
            self.gpt.backward(&batch.x, true, |hidden| loss_fn(&self.read(hidden, batch)))
        })
    }

    /// Outputs [N, n_out] of many sequences, `batch_size` at a time, without
    /// gradients, on the CPU.
    pub fn scores(&self, sequences: &[Sequence], batch_size: usize) -> Tensor {
        let device = self.gpt.device();
        tch::no_grad(|| {
            let parts: Vec<Tensor> = sequences
                .chunks(batch_size.max(1))
                .map(|chunk| {
                    tch::autocast(device.is_cuda(), || self.forward(&pad(chunk, 0, device), false)).to_device(Device::Cpu)
                })
                .collect();
            Tensor::cat(&parts, 0)
        })
    }

    fn read(&self, hidden: &Tensor, batch: &Padded) -> Tensor {
        gather_rows(hidden, &batch.last()).to_kind(Kind::Float).linear::<Tensor>(self.score, None)
    }
}

/// Which weights a head stage trains: `trainable = { last_blocks = N }`
/// (the stage sets the default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trainable {
    /// The head always trains; with N > 0 the final norm and the last N
    /// blocks do too; N ≥ the model's `n_layer` trains every weight. 0 makes
    /// the head a linear probe on frozen features.
    pub last_blocks: usize,
}

/// Where a variable sits in a scorer.
#[derive(Debug, PartialEq)]
enum Part {
    Embedding,
    Block(usize),
    FinalNorm,
    LmHead,
    Score,
}

/// The part of the Hugging Face name of a GPT-2 or Llama variable (see
/// [`crate::model`]'s table).
fn part(name: &str) -> Option<Part> {
    let segments: Vec<&str> = name.split('.').collect();
    match segments.as_slice() {
        ["score", "weight"] => Some(Part::Score),
        ["lm_head", "weight"] => Some(Part::LmHead),
        ["transformer", "wte" | "wpe", ..] | ["model", "embed_tokens", ..] => Some(Part::Embedding),
        ["transformer", "ln_f", ..] | ["model", "norm", ..] => Some(Part::FinalNorm),
        ["transformer", "h", i, _, ..] | ["model", "layers", i, _, ..] => i.parse().ok().map(Part::Block),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::generate::save_model;
    use crate::model::tests::{build, tiny, torch_rng};
    use crate::model::ModelConfig;
    use crate::sequences::{pad, Sequence};
    use crate::train_tokenizer::tests::{corpus, run_stage, write_docs};

    /// A tiny model artifact in `dir/base` (a 300-token tokenizer trained
    /// on `text`, random weights of `config` over `tiny("gpt2")`); returns
    /// its directory and config.
    pub(crate) fn tiny_model(dir: &Path, text: &str, config: serde_json::Value) -> (PathBuf, ModelConfig) {
        write_docs(&dir.join("docs"), "corpus", text);
        let tok = dir.join("tok");
        run_stage(&train_tokenizer::Params { vocab_size: 300, ..Default::default() }, &dir.join("docs"), &tok);
        let mut extra = serde_json::json!({"vocab_size": 300});
        extra.as_object_mut().unwrap().extend(config.as_object().unwrap().clone());
        let config = tiny("gpt2", extra);
        let (vs, _) = build(&config, 1);
        let base = dir.join("base");
        std::fs::create_dir_all(&base).unwrap();
        save_model(&base, &vs, &config, &tok).unwrap();
        (base, config)
    }

    #[test]
    fn head_reads_the_last_real_token_and_round_trips() {
        let _rng = torch_rng();
        let dir = tempfile::tempdir().unwrap();
        let (base, config) = tiny_model(dir.path(), &corpus("tinyshakespeare.txt")[..20_000], serde_json::json!({}));
        let tok = dir.path().join("tok");

        let scorer = Scorer::from_model(&base, vec!["ham".into(), "spam".into()], Device::Cpu).unwrap();
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
        let back = Scorer::open(&out, Device::Cpu).unwrap();
        assert_eq!(back.info.labels, ["ham", "spam"]);
        assert!(back.forward(&batch, false).equal(&together));
        let err = Scorer::open(&base, Device::Cpu).err().expect("a plain model has no head");
        assert!(err.to_string().contains("not a reward model or classifier"), "{err}");
    }

    #[test]
    fn freezing_keeps_the_head_and_the_top_blocks_trainable() {
        for arch in ["gpt2", "llama"] {
            let config = tiny(arch, serde_json::json!({"n_layer": 3, "tie_embeddings": false}));
            let (vs, gpt) = build(&config, 0);
            let score = (vs.root() / "score").zeros("weight", &[1, config.d_model]);
            let scorer = Scorer {
                vs,
                gpt,
                score,
                tokenizer: Tokenizer::new(tokenizers::models::bpe::BPE::default()),
                info: HeadInfo { labels: vec!["reward".into()] },
            };
            let trained = |last_blocks| {
                scorer.freeze(&Trainable { last_blocks }).unwrap();
                let mut names: Vec<String> =
                    scorer.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).map(|(n, _)| n).collect();
                names.sort();
                names
            };
            assert_eq!(trained(0), ["score.weight"], "{arch}");
            let top = trained(1);
            assert!(top.iter().all(|n| n == "score.weight" || n.contains(".2.") || n.contains("ln_f") || n.starts_with("model.norm")), "{arch}: {top:?}");
            assert!(top.iter().any(|n| n.contains(".2.")) && top.len() > 3, "{arch}: {top:?}");
            let all = trained(3);
            assert_eq!(all.len(), scorer.vs.variables().len() - 1, "{arch}: all but the unused lm_head: {all:?}");
            assert!(!all.contains(&"lm_head.weight".to_string()));
        }
    }
}
