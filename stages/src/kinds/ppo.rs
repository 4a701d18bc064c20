//! `ppo`: RLHF with proximal policy optimization — a fine-tuned model is
//! trained to raise a reward model's score of its responses while a KL
//! penalty keeps it near where it started.
//!
//! ```toml
//! [stages.ppo]
//! kind = "ppo"
//! inputs = { policy = "sft", reward = "rm" }
//! data = "data/instruct/preference-data.json"
//! template = "alpaca"
//! train = { steps = 30, batch_size = 16, lr = 3e-5 }
//! max_new_tokens = 32
//! temperature = 0.7
//! kl_coef = 0.05
//! ```
//!
//! Inputs: `policy`, a model artifact (`sft`, or any model the `generate`
//! command accepts): the policy starts from it and a frozen copy is the
//! reference; `reward`, a `reward_model` artifact (a [`HeadModel`] with one
//! output) built on the same tokenizer.
//!
//! Each iteration (TRL's `PPOTrainer`; the math is in [`objective`]):
//! 1. a rollout: `train.batch_size × train.grad_accum × minibatches` prompts
//!    of the training split, a response sampled to each at `temperature`
//!    (full distribution, no top-k) up to `max_new_tokens` tokens or
//!    `<|endoftext|>`; the reward model scores prompt + response at the last
//!    token; the policy's and the reference's log-probabilities and the
//!    values are computed once;
//! 2. per-token rewards (the KL penalty `kl_coef`, the score on the last
//!    token, less `missing_eos_penalty` if the response did not end), GAE
//!    advantages (`gamma`, `lam`) whitened over the rollout, returns;
//! 3. `ppo_epochs` passes over the rollout in a fresh random order, each cut
//!    into `minibatches` optimizer updates of `train.grad_accum`
//!    micro-batches of `train.batch_size` sequences; the loss is the clipped
//!    surrogate (`cliprange`) plus `vf_coef` × the clipped value loss
//!    (`cliprange_value`).
//!
//! The value function is a head on the policy: a linear map [1, C] of its
//! last hidden state at every token, starting at zero, trained with the
//! policy through the shared body (TRL's `AutoModelForCausalLMWithValueHead`
//! design). It costs no second model, and one forward pass gives both the
//! log-probabilities and the values. It is not part of the output.
//!
//! Prompts (`data`, an instruction or preference set; only `instruction` and
//! `input` are read) are formatted with `template` (see [`crate::data::instruct`]).
//! A prompt longer than the context less `max_new_tokens` loses tokens from
//! its start. The set is split as [`Split::held_out`]`(val_fraction,
//! split_seed)`, `[1 − val_fraction, val_fraction]` of the records: with the
//! reward model's split (the defaults,
//! 0.1 and 1337, are `reward_model`'s) the held-out prompts are ones the
//! reward model never saw. Before and after training, a response to each of
//! the first `eval_prompts` held-out prompts (all by default) is sampled
//! with the same seeds and scored.
//!
//! Params: `data`, `template`, `val_fraction`, `split_seed`, `eval_prompts`;
//! `train`, a [`Hyper`] whose unwritten keys take PPO's defaults (below), with
//! `steps` counting iterations and the learning rate scheduled per
//! iteration; `minibatches` (2), `ppo_epochs` (4), `max_new_tokens` (32),
//! `temperature` (0.7), `kl_coef` (0.05), `cliprange` (0.2),
//! `cliprange_value` (0.2), `vf_coef` (0.1), `gamma` (1), `lam` (0.95),
//! `missing_eos_penalty` (none); `samples` (4): held-out prompts shown
//! before and after; `trainable` (`"all"`): which weights of the policy
//! train, as in `sft` (the value head always does); `eval_every` (30): the
//! held-out reward every so many iterations and after the last;
//! `spike_factor` (0: off); `checkpoint_every` (10), `keep_checkpoints` (2),
//! `log_every` (5): volatile. The `train` defaults: 30 iterations of 16
//! prompts × 2 minibatches, lr 3e-5 → 3e-6 without warmup, no weight decay,
//! β2 0.999, clipping at 1.
//!
//! Output: the policy as a model artifact (`model.safetensors`,
//! `config.json`, `tokenizer.json`), which `generate`, `export` and `eval`
//! accept; `metrics.jsonl`, a row per iteration: `reward` (mean score of the
//! rollout), `kl` (mean over responses of Σ log π − log π_ref),
//! `entropy` (nats per response token), `clipfrac`, `policy_loss`,
//! `value_loss`, `value_clipfrac`, `response_length`, `ended` (fraction of
//! responses that emitted `<|endoftext|>`), `lr`, `seconds` (of which
//! `rollout_seconds` sampling and scoring); and rows
//! `val_reward` / `val_kl` at step 0 and after the last;
//! `metrics.png`, one panel per curve: reward, KL, entropy, clip fraction,
//! value loss, response length (row by row); `samples.jsonl`: held-out
//! prompts with the response and score before and after. Metrics:
//! `reward_before`, `reward_after`, `kl_after` (on the held-out prompts),
//! `reward_train_last`, `iterations`, `wall_seconds`.
//!
//! Log-probabilities are those of the sampling distribution (logits divided
//! by `temperature`), as in TRL. Dropout is off throughout (TRL disables it
//! too): the old and new log-probabilities of the first epoch then agree.
//!
//! The stage runs on the shared training loop ([`Trainer`]): each of its
//! steps is an iteration, which overrides [`Objective::step`] to collect the
//! rollout and make the iteration's updates through [`Update::apply`].
//! Resume: every `checkpoint_every` iterations the weights that train (value
//! head included), optimizer state and iteration go to the work dir; a run
//! started again continues from the latest. Rollout prompts and seeds are functions
//! of (`train.seed`, iteration), so the resumed run repeats the uninterrupted
//! one. `LLMFLOW_STOP_AFTER_STEP=N` stops after iteration `N`. With
//! `processes = N` ([`Training`]) each rank samples and scores its rows
//! of every micro-batch with their single-process seeds
//! ([`Rollout::collect`]), every rank assembles the whole rollout, and each
//! trains on its share of every micro-batch, weighted by response tokens.

mod objective;
mod rollout;

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{nn, Tensor};

use self::objective::{policy_loss, value_loss};
use self::rollout::{Models, Rollout};
use crate::data::instruct::{Encoder, Record, Template};
use crate::data::records::{self, Split};
use crate::data::rng::shuffled;
use crate::data::sequences::token_logprobs;
use crate::formats::model::{save_model, ModelArtifact};
use crate::model::Gpt;
use crate::train::finetune::{Trainable, Tuning};
use crate::train::last_token::HeadModel;
use crate::train::trainer::{self, batch_indices, Ended, Objective, Trainer, Update};
use crate::train::{self, ranks, step_seed, Hyper, Training};
use crate::{device, Inputs, ParamError, Stage, StageCtx};

pub struct Ppo;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The prompts: an instruction or preference set (`instruction`, `input`), relative to the pipeline.
    pub data: String,
    /// How a record becomes a prompt: the one the policy was tuned with.
    pub template: Template,
    /// The share of prompts held out to score before and after.
    #[schemars(extend("exclusiveMinimum" = 0, "exclusiveMaximum" = 1))]
    pub val_fraction: f64,
    /// Seeds the held-out split (`reward_model`'s, so its held-out prompts are new to the reward model).
    pub split_seed: u64,
    /// Held-out prompts scored before and after; all of them if unset.
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub eval_prompts: Option<usize>,
    /// The optimizer; `steps` counts iterations, `batch_size × grad_accum × minibatches` prompts each.
    pub train: Hyper,
    /// Optimizer updates per pass over a rollout.
    #[schemars(range(min = 1, max = 1024))]
    pub minibatches: usize,
    /// Passes over each rollout.
    #[schemars(range(min = 1, max = 1024))]
    pub ppo_epochs: usize,
    /// Tokens per sampled response at most.
    #[schemars(range(min = 1, max = 1_048_576))]
    pub max_new_tokens: usize,
    /// Sampling temperature of the rollouts; the log-probabilities are those of this distribution.
    #[schemars(range(max = 100), extend("exclusiveMinimum" = 0))]
    pub temperature: f64,
    /// Weight of the per-token KL penalty to the starting policy.
    #[schemars(range(min = 0, max = 100))]
    pub kl_coef: f64,
    /// ε of the clipped policy-ratio objective.
    #[schemars(range(max = 100), extend("exclusiveMinimum" = 0))]
    pub cliprange: f64,
    /// ε of the clipped value loss.
    #[schemars(range(max = 100), extend("exclusiveMinimum" = 0))]
    pub cliprange_value: f64,
    /// Weight of the value loss.
    #[schemars(range(min = 0, max = 100))]
    pub vf_coef: f64,
    /// Discount of future rewards.
    #[schemars(range(min = 0, max = 1))]
    pub gamma: f64,
    /// λ of generalized advantage estimation.
    #[schemars(range(min = 0, max = 1))]
    pub lam: f64,
    /// Subtracted from the score of a response that did not end (none if unset).
    #[schemars(range(min = 0, max = 1000))]
    pub missing_eos_penalty: Option<f64>,
    /// Held-out prompts whose responses before and after go to `samples.jsonl`.
    #[schemars(range(max = 1_000_000))]
    pub samples: usize,
    pub trainable: Trainable,
    #[serde(flatten)]
    pub training: Training,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            data: "data/instruct/preference-data.json".into(),
            template: Template::Alpaca,
            val_fraction: 0.1,
            split_seed: 1337,
            eval_prompts: None,
            train: Hyper {
                steps: 30,
                batch_size: 16,
                grad_accum: 1,
                lr: 3e-5,
                min_lr: 3e-6,
                warmup: 0,
                weight_decay: 0.0,
                beta2: 0.999,
                ..Hyper::default()
            },
            minibatches: 2,
            ppo_epochs: 4,
            max_new_tokens: 32,
            temperature: 0.7,
            kl_coef: 0.05,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            missing_eos_penalty: None,
            samples: 4,
            trainable: Trainable::All,
            training: Training {
                eval_every: 30,
                spike_factor: 0.0,
                checkpoint_every: 10,
                keep_checkpoints: 2,
                log_every: 5,
                ..Training::default()
            },
        }
    }
}

impl Params {
    /// Prompts per rollout.
    fn rollout_size(&self) -> usize {
        self.train.batch_size * self.train.grad_accum * self.minibatches
    }
}

impl Stage for Ppo {
    const KIND: &'static str = "ppo";
    const VERSION: u32 = 4;
    const SUMMARY: &'static str = "RLHF: PPO against a reward model with a KL penalty to the starting policy";
    const INPUTS: Inputs = Inputs::Fixed(&["policy", "reward"]);
    const VOLATILE: &'static [&'static str] = &train::VOLATILE;
    const MERGED: &'static [&'static str] = &train::MERGED;
    const SHOW: &'static [&'static str] = &["metrics.png", "samples.jsonl", "metrics.jsonl"];
    type Params = Params;

    fn check(p: &Params, _inputs: &[String]) -> Result<(), ParamError> {
        let err = |field: &str, message: &str| Err(ParamError::new(&[field], message));
        p.training.check(&p.train)?;
        p.trainable.check()?;
        p.template.check("template")?;
        if p.data.trim().is_empty() {
            return err("data", "`data` must name a JSON or JSON Lines file of instructions");
        }
        Ok(())
    }

    fn files(p: &Params) -> Vec<String> {
        vec![p.data.clone()]
    }

    fn resources(p: &Params) -> crate::Resources {
        p.training.resources()
    }

    fn run(p: &Params, ctx: &mut StageCtx) -> Result<()> {
        trainer::run_stage(|stop_after| ppo(p, ctx, stop_after))
    }
}

/// The prompts of the training and the held-out split, tokenized and cut to
/// leave room for `max_new_tokens`; and the held-out records.
struct Prompts {
    train: Vec<Vec<i64>>,
    val: Vec<Vec<i64>>,
    val_records: Vec<Record>,
}

impl Prompts {
    fn load(p: &Params, path: &Path, encoder: &Encoder, context: usize) -> Result<Prompts> {
        ensure!(
            p.max_new_tokens < context,
            "max_new_tokens is {}, but the policy's context is {context} tokens: leave room for the prompt",
            p.max_new_tokens
        );
        let records: Vec<Record> = records::read(path)?;
        let parts = Split::held_out(p.val_fraction, p.split_seed).parts(records.len());
        let (train, val) = (&parts[0], &parts[1]);
        ensure!(!train.is_empty() && !val.is_empty(), "{}: {} records are too few to split", path.display(), records.len());
        let room = context - p.max_new_tokens;
        let prompt = |i: &usize| -> Result<Vec<i64>> {
            let ids = encoder.prompt(&records[*i])?;
            Ok(ids[ids.len().saturating_sub(room)..].to_vec())
        };
        let val = &val[..p.eval_prompts.unwrap_or(val.len()).min(val.len())];
        Ok(Prompts {
            train: train.iter().map(prompt).collect::<Result<_>>()?,
            val: val.iter().map(prompt).collect::<Result<_>>()?,
            val_records: val.iter().map(|&i| records[i].clone()).collect(),
        })
    }
}

/// The whole stage; `stop_after` ends the run after that iteration, as a
/// kill would.
fn ppo(p: &Params, ctx: &mut StageCtx, stop_after: Option<u64>) -> Result<Ended> {
    let started = Instant::now();
    let device = device::prepare(ctx)?;
    p.training.join(device)?;
    let hyper = &p.train;
    let policy_dir = ctx.input("policy")?.to_path_buf();
    let mut tuning = Tuning::open(&policy_dir, &p.trainable, device, hyper.seed)?;
    let config = tuning.gpt.config().clone();
    crate::train::check_memory(&config, hyper, device)?;
    let v_head = tuning.add_zeros("v_head", &[1, config.d_model]);
    let tokenizer = tuning.tokenizer.clone();
    let mut reference = ModelArtifact::open(&policy_dir, device)?;
    reference.vs.freeze();
    let reward_dir = ctx.input("reward")?.to_path_buf();
    let mut reward = HeadModel::open(&reward_dir, device)?;
    reward.model.vs.freeze();
    ensure!(
        reward.info.labels.len() == 1,
        "{}: a reward model has one output, this head has {} ({:?})",
        reward_dir.display(),
        reward.info.labels.len(),
        reward.info.labels
    );
    ensure!(
        reward.model.tokenizer.get_vocab(true) == tokenizer.get_vocab(true),
        "the reward model in {} has another tokenizer than the policy in {}: train the reward model from the same base",
        reward_dir.display(),
        policy_dir.display()
    );
    let encoder = Encoder::new(&tokenizer, &p.template)?;
    let prompts = Prompts::load(p, &ctx.project_path(&p.data), &encoder, config.context as usize)?;
    eprintln!(
        "ppo: {} iterations of {} prompts ({} training, {} held out), {} epochs × {} minibatches, {} trainable parameters, on {device:?}, {} threads",
        hyper.steps,
        p.rollout_size(),
        prompts.train.len(),
        prompts.val.len(),
        p.ppo_epochs,
        p.minibatches,
        tuning.trainable_params(),
        ctx.threads
    );

    let (policy, trainable) = tuning.parts();
    let m = Models { policy, v_head, reference: reference.gpt, reward, eot: encoder.eot };
    // The starting point: the reference is the policy before any update.
    let eval_seed = step_seed(hyper.seed, u64::MAX, 0) as u64;
    let before = Rollout::collect(&m.reference, &m, &prompts.val, eval_seed, p)?;
    let mut task = PpoTraining { m: &m, p, prompts: &prompts, before, after: None, eval_seed };
    let trainer = Trainer { evaluate_first: true, ..Trainer::new("ppo", &p.train, &p.training, stop_after) };
    let trained = match trainer.run(ctx, trainable, &mut task)? {
        Ended::Finished(trained) => trained,
        stopped => return Ok(stopped),
    };
    if !ranks::is_first() {
        return Ok(Ended::Finished(trained));
    }
    let PpoTraining { before, after, .. } = task;
    let after = after.expect("evaluated after the last iteration");
    let (reward_before, reward_after, kl_after) = (mean(&before.scores), mean(&after.scores), mean(&after.kl()));
    eprintln!("ppo: held-out reward {reward_before:.4} → {reward_after:.4}, KL to the reference {kl_after:.4}");

    let out = ctx.out.clone();
    // The policy alone, without the value head, in the common model format.
    tuning.merge()?;
    let mut policy_vs = nn::VarStore::new(device);
    Gpt::new(&policy_vs.root(), &config)?;
    policy_vs.copy(&tuning.vs)?;
    save_model(&out, &policy_vs, &config, &policy_dir)?;
    let panels = [
        ("reward", "reward model score"),
        ("kl", "KL to the SFT model (nats)"),
        ("entropy", "entropy (nats/token)"),
        ("clipfrac", "share of ratios clipped"),
        ("value_loss", "value loss (squared error)"),
        ("response_length", "response length (tokens)"),
    ];
    trained.write_panels(&out, "iteration", &panels)?;
    let rows = trained.log.rows()?;
    let mut samples = String::new();
    for i in 0..p.samples.min(prompts.val.len()) {
        let row = json!({
            "prompt": p.template.prompt(&prompts.val_records[i]),
            "before": encoder.decode(&before.responses[i])?,
            "reward_before": before.scores[i],
            "after": encoder.decode(&after.responses[i])?,
            "reward_after": after.scores[i],
        });
        samples += &format!("{row}\n");
    }
    std::fs::write(out.join("samples.jsonl"), samples)?;

    ctx.metric("reward_before", reward_before);
    ctx.metric("reward_after", reward_after);
    ctx.metric("kl_after", kl_after);
    ctx.metric("reward_train_last", rows.iter().rev().find_map(|r| r["reward"].as_f64()));
    ctx.metric("iterations", hyper.steps);
    ctx.metric("wall_seconds", started.elapsed().as_secs_f64());
    Ok(Ended::Finished(trained))
}

/// PPO as an [`Objective`] of the shared loop: each step of the loop is an
/// iteration (a rollout, then `ppo_epochs` × `minibatches` updates).
struct PpoTraining<'a> {
    m: &'a Models<'a>,
    p: &'a Params,
    prompts: &'a Prompts,
    /// The reference's answers to the held-out prompts: the row of step 0
    /// and the samples' "before".
    before: Rollout,
    /// The policy's answers at the last evaluation.
    after: Option<Rollout>,
    eval_seed: u64,
}

impl Objective for PpoTraining<'_> {
    fn step(&mut self, iteration: u64, update: &mut Update) -> Result<Map<String, Value>> {
        let (m, p) = (self.m, self.p);
        let started = Instant::now();
        let rollout_hyper = Hyper { batch_size: p.rollout_size(), grad_accum: 1, ..p.train.clone() };
        let batch: Vec<Vec<i64>> =
            batch_indices(self.prompts.train.len(), &rollout_hyper, iteration, 0).iter().map(|&i| self.prompts.train[i].clone()).collect();
        let rollout = Rollout::collect(m.policy, m, &batch, step_seed(p.train.seed, iteration, 0) as u64, p)?;
        let rollout_seconds = started.elapsed().as_secs_f64();
        let stats = optimize(m, update, &rollout, p, iteration)?;
        let ended = rollout.ended(m.eot);
        let mut row = json!({
            "reward": mean(&rollout.scores),
            "kl": mean(&rollout.kl()),
            "entropy": rollout.entropy,
            "response_length": mean(&rollout.responses.iter().map(|r| r.len() as f64).collect::<Vec<_>>()),
            "ended": ended.iter().filter(|&&e| e).count() as f64 / ended.len() as f64,
            "rollout_seconds": rollout_seconds,
        });
        let row = row.as_object_mut().expect("an object");
        row.extend(stats);
        row.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
        Ok(row.clone())
    }

    /// The held-out reward and KL to the reference.
    fn evaluate(&mut self, step: u64) -> Result<Map<String, Value>> {
        if step == 0 {
            return Ok(Map::from_iter([("val_reward".into(), json!(mean(&self.before.scores))), ("val_kl".into(), json!(0.0))]));
        }
        let after = Rollout::collect(self.m.policy, self.m, &self.prompts.val, self.eval_seed, self.p)?;
        let row = Map::from_iter([("val_reward".into(), json!(mean(&after.scores))), ("val_kl".into(), json!(mean(&after.kl())))]);
        self.after = Some(after);
        Ok(row)
    }
}

/// The optimization phase of an iteration: `ppo_epochs` passes over the
/// rollout in `minibatches` updates each. Returns the mean losses and clip
/// fractions over all micro-batches (each rank's share of them, summed).
fn optimize(m: &Models, update: &mut Update, rollout: &Rollout, p: &Params, iteration: u64) -> Result<Map<String, Value>> {
    let (advantages, returns) = rollout.advantages(p, m.eot);
    let n = rollout.responses.len();
    let per_update = n / p.minibatches;
    let mut sums = [0.0; 4];
    let mut micro_batches = 0;
    for epoch in 0..p.ppo_epochs {
        let order = shuffled(n, step_seed(p.train.seed, iteration, 1 + epoch) as u64);
        for minibatch in order.chunks(per_update) {
            let micros: Vec<&[usize]> = minibatch.chunks(p.train.batch_size).collect();
            update.apply(micros.len(), |micro, scale| {
                let (stats, loss) = micro_step(m, rollout, &advantages, &returns, micros[micro], p, scale);
                sums.iter_mut().zip(stats).for_each(|(s, x)| *s += x);
                micro_batches += 1;
                Ok(loss)
            })?;
        }
    }
    let sums = ranks::sum(&sums)?;
    let names = ["policy_loss", "value_loss", "clipfrac", "value_clipfrac"];
    Ok(names.iter().zip(sums).map(|(k, s)| (k.to_string(), json!(s / micro_batches as f64))).collect())
}

/// Forward and backward over `rows` of the rollout with the loss × `scale`;
/// returns (policy loss, value loss, clip fraction, value clip fraction) and
/// the scaled loss. Across ranks, each takes its slice of `rows`, its values
/// weighted by its share of the response tokens (all four are token means).
fn micro_step(m: &Models, r: &Rollout, advantages: &Tensor, returns: &Tensor, rows: &[usize], p: &Params, scale: f64) -> ([f64; 4], f64) {
    let (rows, share) = ranks::share(rows.to_vec(), |&i| r.responses[i].len() as f64);
    let index = Tensor::from_slice(&rows.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(r.mask.device());
    // Only as wide as the longest of these rows.
    let width = rows.iter().map(|&i| r.batch.lengths[i]).max().expect("a micro-batch has rows");
    let take = |t: &Tensor| t.index_select(0, &index).narrow(1, 0, width);
    let (x, y, mask) = (take(&r.batch.x), take(&r.batch.y), take(&r.mask));
    let mut stats = [0.0; 4];
    let loss = m.policy.backward(&x, false, |hidden| {
        let logp = token_logprobs(&(m.policy.logits(hidden) / p.temperature), &y);
        let (pg, clipfrac) = policy_loss(&logp, &take(&r.logp), &take(advantages), &mask, p.cliprange);
        let (vf, vf_clipfrac) = value_loss(&m.values(hidden), &take(&r.values), &take(returns), &mask, p.cliprange_value);
        stats = [&pg, &vf, &clipfrac, &vf_clipfrac].map(|t| t.double_value(&[]) * share);
        (pg + vf * p.vf_coef) * (scale * share)
    });
    (stats, loss.double_value(&[]))
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tch::{Device, Kind};

    use super::*;
    use crate::testing::{build, tiny, torch_rng};
    use crate::testing::{corpus, ctx, metric_rows, tokenizer_artifact, write_docs};

    const MODEL_FILE: &str = "model.safetensors";

    /// A project dir with a tiny policy, a reward model on the same body
    /// with a random head, and 40 instructions; returns the stage's inputs.
    fn setup(dir: &Path) -> Vec<(&'static str, PathBuf)> {
        write_docs(&dir.join("docs"), "corpus", &corpus("tinyshakespeare.txt")[..20_000]);
        let tok = dir.join("tok");
        tokenizer_artifact(&dir.join("docs"), &tok, serde_json::json!({"vocab_size": 300}));
        let config = tiny("gpt2", json!({"vocab_size": 300, "context": 32, "d_model": 32}));
        let (vs, _) = build(&config, 5);
        let policy = dir.join("policy");
        std::fs::create_dir_all(&policy).unwrap();
        save_model(&policy, &vs, &config, &tok).unwrap();
        let reward = HeadModel::from_model(&policy, vec!["reward".into()], &Trainable::All, Device::Cpu, 0).unwrap();
        tch::no_grad(|| reward.score.shallow_clone().copy_(&(Tensor::randn([1, config.d_model], (Kind::Float, Device::Cpu)) * 0.3)));
        let rm = dir.join("rm");
        std::fs::create_dir_all(&rm).unwrap();
        reward.save(&rm, &tok).unwrap();
        let records: Vec<Value> = (0..40).map(|i| json!({"instruction": format!("Speak of {i} kings."), "input": ""})).collect();
        std::fs::write(dir.join("prompts.json"), serde_json::to_string(&records).unwrap()).unwrap();
        vec![("policy", policy), ("reward", rm)]
    }

    fn params() -> Params {
        crate::params::<Ppo>(json!({
            "data": "prompts.json", "template": "Q: {instruction}\nA:", "val_fraction": 0.2, "max_new_tokens": 8,
            "train": {"steps": 6, "batch_size": 4, "lr": 3e-3}, "checkpoint_every": 2, "log_every": 100, "samples": 2,
        }))
        .unwrap()
    }

    #[test]
    fn ppo_raises_the_reward_and_writes_a_model_artifact() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let inputs = setup(tmp.path());
        let mut c = ctx(tmp.path(), "ppo", &inputs);
        assert!(matches!(ppo(&params(), &mut c, None).unwrap(), Ended::Finished(_)));
        let metrics = c.metrics().clone();
        let (before, after) = (metrics["reward_before"].as_f64().unwrap(), metrics["reward_after"].as_f64().unwrap());
        let kl = metrics["kl_after"].as_f64().unwrap();
        // Scores spread over about ±2 (the head's norm is about 1.7).
        assert!(after > before + 0.3, "held-out reward {before} → {after}");
        assert!(kl > 0.0 && kl < 20.0, "KL to the reference {kl}");

        let out = &c.out;
        let rows = metric_rows(out);
        assert_eq!(rows.len(), 6 + 2, "a row per iteration, and the held-out rows before and after");
        for key in ["reward", "kl", "entropy", "clipfrac", "value_loss", "policy_loss", "response_length", "ended", "lr"] {
            assert!(rows[1][key].as_f64().is_some(), "{key} missing from {}", rows[1]);
        }
        // The same numbers, read back from JSON (serde_json's parser may be one ulp off).
        let close = |row: &Value, want: f64| (row["val_reward"].as_f64().unwrap() - want).abs() <= 1e-12 * want.abs();
        assert!(close(&rows[0], before) && close(&rows[7], after), "{} {} vs {before} {after}", rows[0], rows[7]);
        // The first update of each iteration starts where the rollout was taken.
        assert!(rows[1]["kl"].as_f64().unwrap().abs() < 1e-4, "{}", rows[1]);
        assert_eq!(&std::fs::read(out.join("metrics.png")).unwrap()[1..4], b"PNG");
        let samples: Vec<Value> =
            std::fs::read_to_string(out.join("samples.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(samples.len(), 2);
        assert!(samples[0]["prompt"].as_str().unwrap().starts_with("Q: Speak of"), "{}", samples[0]);
        assert!(samples[0]["after"].is_string() && samples[0]["reward_after"].is_f64());

        // A model artifact as the others: no value head, loadable, changed.
        let tensors = Tensor::read_safetensors(out.join(MODEL_FILE)).unwrap();
        assert!(tensors.iter().all(|(name, _)| !name.starts_with("v_head")));
        let trained = ModelArtifact::open(out, Device::Cpu).unwrap();
        let start = ModelArtifact::open(&inputs[0].1, Device::Cpu).unwrap();
        let x = Tensor::from_slice(&[5i64, 6, 7]).view([1, 3]);
        assert!(!trained.gpt.forward(&x, false).allclose(&start.gpt.forward(&x, false), 1e-4, 1e-4, false));
    }

    #[test]
    fn resumed_run_repeats_the_uninterrupted_one() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let inputs = setup(tmp.path());
        let p = params();
        let mut straight = ctx(tmp.path(), "straight", &inputs);
        assert!(matches!(ppo(&p, &mut straight, None).unwrap(), Ended::Finished(_)));
        let mut resumed = ctx(tmp.path(), "resumed", &inputs);
        // Stopped after iteration 3: the checkpoint of 2 is the latest.
        assert!(matches!(ppo(&p, &mut resumed, Some(3)).unwrap(), Ended::Stopped(3)));
        assert!(matches!(ppo(&p, &mut resumed, None).unwrap(), Ended::Finished(_)));
        let weights = |c: &StageCtx| std::fs::read(c.out.join(MODEL_FILE)).unwrap();
        assert!(weights(&straight) == weights(&resumed), "resumed weights differ");
        assert_eq!(metric_rows(&straight.out), metric_rows(&resumed.out));
        assert_eq!(straight.metrics()["reward_after"], resumed.metrics()["reward_after"]);
    }

    #[test]
    fn params_take_ppo_defaults_and_are_checked() {
        let p: Params = crate::params::<Ppo>(json!({"train": {"lr": 1e-4}})).unwrap();
        assert_eq!(p.train, Hyper { lr: 1e-4, ..Params::default().train });
        assert_eq!(p.rollout_size(), 32);
        assert!(crate::params::<Ppo>(json!({"train": {"stpes": 3}})).is_err());
        assert!(crate::params::<Ppo>(json!({"kl_coeff": 0.1})).is_err());
        let out_of_bounds = |v: Value| crate::params::<Ppo>(v).unwrap_err().path;
        assert_eq!(out_of_bounds(json!({"temperature": 0.0})), ["temperature"]);
        assert_eq!(out_of_bounds(json!({"lam": 1.5})), ["lam"]);
        assert_eq!(out_of_bounds(json!({"train": {"steps": 0}})), ["train", "steps"]);
        let bad = |v: Value| Ppo::check(&crate::params::<Ppo>(v).unwrap(), &[]).unwrap_err().path;
        assert_eq!(bad(json!({"template": "no placeholder"})), ["template"]);
        assert!(Ppo::check(&Params::default(), &[]).is_ok());
        assert_eq!(Ppo::files(&Params::default()), ["data/instruct/preference-data.json"]);
    }

    #[test]
    fn a_reward_model_on_another_tokenizer_is_refused() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let mut inputs = setup(tmp.path());
        let dir = tmp.path();
        let other = dir.join("tok2");
        tokenizer_artifact(&dir.join("docs"), &other, serde_json::json!({"vocab_size": 280}));
        let config = tiny("gpt2", json!({"vocab_size": 300, "context": 32}));
        let (vs, _) = build(&config, 1);
        let base = dir.join("other");
        std::fs::create_dir_all(&base).unwrap();
        save_model(&base, &vs, &config, &other).unwrap();
        let rm = dir.join("rm2");
        std::fs::create_dir_all(&rm).unwrap();
        HeadModel::from_model(&base, vec!["reward".into()], &Trainable::All, Device::Cpu, 0).unwrap().save(&rm, &other).unwrap();
        inputs[1].1 = rm;
        let err = ppo(&params(), &mut ctx(dir, "ppo", &inputs), None).unwrap_err();
        assert!(err.to_string().contains("another tokenizer"), "{err}");
    }

    /// A reward model on `base` fit in seconds: a head on its last-token
    /// features, by logistic regression (Bradley–Terry) on the preference
    /// pairs of the reward model's training split of `data`.
    fn make_reward_model(base: &Path, rm: &Path, data: &Path, template: &Template) {
        let started = Instant::now();
        let mut reward = HeadModel::from_model(base, vec!["reward".into()], &Trainable::All, Device::Cpu, 0).unwrap();
        reward.model.vs.freeze();
        let encoder = Encoder::new(&reward.model.tokenizer, template).unwrap();
        let records: Vec<Record> = records::read(data).unwrap();
        let parts = Split::new(&[0.9, 0.1], 1337).parts(records.len());
        let context = reward.model.gpt.config().context as usize;
        // Last-token features of chosen minus rejected, per pair.
        let differences = |indices: &[usize]| -> Tensor {
            let features = |pick: fn(&Record) -> &str| {
                let seqs: Vec<_> = indices.iter().map(|&i| encoder.sequence(&records[i], pick(&records[i]), context).unwrap()).collect();
                let rows: Vec<Tensor> = seqs
                    .chunks(64)
                    .map(|chunk| {
                        let batch = crate::data::sequences::pad(chunk, encoder.eot, Device::Cpu);
                        let h = tch::no_grad(|| reward.model.gpt.hidden_states(&batch.x, false));
                        crate::data::sequences::gather_rows(&h, &batch.last())
                    })
                    .collect();
                Tensor::cat(&rows, 0)
            };
            features(|r| r.chosen.as_deref().unwrap()) - features(|r| r.rejected.as_deref().unwrap())
        };
        let (train, val) = (differences(&parts[0]), differences(&parts[1]));
        let mut w = Tensor::zeros([reward.model.gpt.config().d_model], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        for _ in 0..500 {
            let loss = -train.mv(&w).log_sigmoid().mean(Kind::Float) + w.square().sum(Kind::Float) * 1e-3;
            w.zero_grad();
            loss.backward();
            tch::no_grad(|| {
                let _ = w.shallow_clone().g_sub_(&(w.grad() * 0.5));
            });
        }
        let accuracy = |d: &Tensor| tch::no_grad(|| d.mv(&w).gt(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]));
        tch::no_grad(|| reward.score.shallow_clone().copy_(&w.detach().view([1, -1])));
        std::fs::create_dir_all(rm).unwrap();
        reward.save(rm, base).unwrap();
        eprintln!(
            "reward model: pair accuracy {:.3} train, {:.3} held out, made in {:.1} s",
            accuracy(&train),
            accuracy(&val),
            started.elapsed().as_secs_f64()
        );
    }

    /// PPO at the default params on a real model, with a reward model made
    /// in seconds: a head on the same model's last-token features fit by
    /// logistic regression (Bradley–Terry) to the preference pairs of the
    /// training split. Run with `BASE_MODEL=/path/to/model cargo test
    /// --release --workspace --lib base_model_ppo -- --ignored --nocapture`
    /// (`PARAMS` may hold the stage's params as JSON).
    #[test]
    #[ignore = "a two-minute run on a pretrained model"]
    fn base_model_ppo() {
        let _rng = torch_rng();
        let base = PathBuf::from(std::env::var("BASE_MODEL").expect("set BASE_MODEL to a model artifact"));
        let tmp = tempfile::tempdir().unwrap();
        let project = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let p: Params = crate::testing::params_from_env::<Ppo>();
        let threads = std::env::var("THREADS").map_or(2, |t| t.parse().unwrap());
        tch::set_num_threads(threads);

        // REWARD_MODEL: where the reward model is kept between runs.
        let rm = std::env::var("REWARD_MODEL").map_or_else(|_| tmp.path().join("rm"), PathBuf::from);
        if !rm.join(crate::train::last_token::HEAD_FILE).exists() {
            make_reward_model(&base, &rm, &project.join(&p.data), &p.template);
        }
        let mut c = StageCtx::new("ppo", &project, &tmp.path().join("out"), &tmp.path().join("work"));
        std::fs::create_dir_all(&c.out).unwrap();
        c.inputs = [("policy".to_string(), base.clone()), ("reward".to_string(), rm)].into();
        c.threads = threads as usize;
        ppo(&p, &mut c, None).unwrap();
        for line in std::fs::read_to_string(c.out.join("samples.jsonl")).unwrap().lines() {
            let row: Value = serde_json::from_str(line).unwrap();
            eprintln!(
                "── before ({:.3}): {:?}\n── after ({:.3}): {:?}",
                row["reward_before"], row["before"], row["reward_after"], row["after"]
            );
        }
        eprintln!("metrics: {}", Value::Object(c.metrics().clone()));
        let m = c.metrics();
        assert!(m["reward_after"].as_f64().unwrap() > m["reward_before"].as_f64().unwrap(), "{m:?}");
    }
}
