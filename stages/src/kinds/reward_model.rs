//! `reward_model`: a scalar score of a response to a prompt, learned from
//! preference pairs (Ouyang et al. 2022; TRL's `RewardTrainer`).
//!
//! ```toml
//! [stages.reward]
//! kind = "reward_model"
//! input = "sft"                        # or a pretrained model
//! data = "data/instruct/preference-data.json"
//! template = "alpaca"                  # the format the model was tuned on
//! split = [0.9, 0.1]                   # train, validation
//! margin = 0.0
//! center_coef = 0.01
//! trainable = { last_blocks = 4 }
//! train = { steps = 150, batch_size = 16, lr = 1e-3 }
//! ```
//!
//! Input `model`: a model artifact (`sft`, `pretrain`). Data: a JSON array
//! or JSON Lines (optionally `.gz`) of records with `instruction`, `input`
//! (optional), `chosen` and `rejected`; the file is part of the stage's key.
//!
//! Each response is formatted as the model was tuned, prompt then response
//! then `<|endoftext|>` ([`Encoder::sequence`], cut to the model's context
//! by dropping prompt tokens from the left), and scored by a linear head on
//! the hidden state of that last token ([`HeadModel`] with the one label
//! `reward`). The loss of a pair with rewards r_c (chosen) and r_r
//! (rejected) is
//!
//! ```text
//! −log σ(r_c − r_r − margin) + center_coef · (r_c + r_r)²
//! ```
//!
//! averaged over the batch: the Bradley–Terry likelihood, with Llama 2's
//! margin (here one constant) and TRL's `center_rewards_coefficient`, which
//! keeps the rewards' mean near zero, so that a PPO stage reading them needs
//! no offset.
//!
//! Params:
//! * `data` (`data/instruct/preference-data.json`), relative to the project.
//! * `template` (`alpaca`): a [`Template`]; it must be the one the
//!   input model was fine-tuned with.
//! * `split` (`[0.9, 0.1]`): train and validation fractions of the records,
//!   shuffled by `train.seed` ([`Split`]). Keep the default split
//!   and seed (1337): `ppo` takes its held-out prompts from the same
//!   validation part, which the reward model has then never trained on.
//! * `margin` (0), `center_coef` (0.01): the loss above.
//! * `trainable` (`{ last_blocks = 4 }`): which weights of the body train,
//!   as in `sft` (see [`crate::train::finetune`]); the head always does. On the default
//!   4-layer model, every weight.
//! * `train`: a [`Hyper`] (defaults: 150 steps of 16 pairs, lr 1e-3 → 1e-4,
//!   warmup 15, weight decay 0.01); `eval_every` (50), `spike_factor`,
//!   `checkpoint_every`, `keep_checkpoints`, `log_every` as in `pretrain`
//!   (resumable the same way); `processes`, `zero`, `collective_timeout_s`
//!   as in `pretrain`, each rank on its pairs of every batch.
//!
//! Output: the scorer artifact (`model.safetensors` with `score.weight`,
//! `config.json`, `tokenizer.json`, `head.json`), `metrics.jsonl` (per step
//! `loss`, `lr`, `grad_norm`; per evaluation `val_loss`, `val_accuracy`,
//! `val_margin`) and `loss.png`. Metrics: `val_accuracy` (the share of
//! held-out pairs whose chosen response scores higher; a tie counts half),
//! `val_margin` (mean r_c − r_r), `val_loss`, the same before training
//! (`val_accuracy_before`, `val_margin_before`: the head starts at zero, so
//! 0.5 and 0 — chance, the bar to clear), `reward_mean` and `reward_std` of
//! the held-out responses, `train_loss`, `train_pairs`, `val_pairs`,
//! `wall_seconds`, `skipped_steps`.
//!
//! The defaults reach a held-out accuracy of 0.85 (110 pairs) on the
//! shipped preference set from the default pipeline's pretrained model, in
//! about 50 s on 2 CPU cores (see the test `preference_quality`).

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

use crate::data::instruct::{Encoder, Pair, Record, Template};
use crate::data::records::{self, Split};
use crate::data::sequences::{pad, Sequence};
use crate::train::finetune::Trainable;
use crate::train::last_token::{Head, HeadModel};
use crate::train::trainer::{self, batch_indices, Ended, Objective, Trainer};
use crate::train::{self, ranks, Hyper, Training};
use crate::{device, Inputs, ParamError, Stage, StageCtx};

pub struct RewardModel;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The preference pairs (`chosen` and `rejected` per instruction), relative to the pipeline.
    pub data: String,
    /// How a record becomes a prompt: the one the input model was tuned with.
    pub template: Template,
    /// Train and validation fractions, shuffled by `train.seed`; `ppo` holds out the same validation part.
    pub split: Vec<f64>,
    /// m in −log σ(r_chosen − r_rejected − m).
    #[schemars(range(min = -100, max = 100))]
    pub margin: f64,
    /// Weight of (r_chosen + r_rejected)², which keeps rewards centered at 0.
    #[schemars(range(min = 0, max = 100))]
    pub center_coef: f64,
    pub trainable: Trainable,
    pub train: Hyper,
    #[serde(flatten)]
    pub training: Training,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            data: "data/instruct/preference-data.json".into(),
            template: Template::default(),
            split: vec![0.9, 0.1],
            margin: 0.0,
            center_coef: 0.01,
            trainable: Trainable::LastBlocks(4),
            train: Hyper { steps: 150, batch_size: 16, lr: 1e-3, min_lr: 1e-4, warmup: 15, weight_decay: 0.01, ..Hyper::default() },
            training: Training { eval_every: 50, ..Training::default() },
        }
    }
}

impl Stage for RewardModel {
    const KIND: &'static str = "reward_model";
    const VERSION: u32 = 4;
    const SUMMARY: &'static str = "train a scalar reward head on preference pairs (Bradley–Terry loss)";
    const INPUTS: Inputs = Inputs::Fixed(&["model"]);
    const VOLATILE: &'static [&'static str] = &train::VOLATILE;
    const MERGED: &'static [&'static str] = &train::MERGED;
    const SHOW: &'static [&'static str] = &["loss.png", "metrics.jsonl"];
    type Params = Params;

    fn check(params: &Params, _inputs: &[String]) -> Result<(), ParamError> {
        params.training.check(&params.train)?;
        params.trainable.check()?;
        params.template.check("template")?;
        records::check_split(&params.split, &["train", "validation"])?;
        if params.data.is_empty() {
            return Err(ParamError::new(&["data"], "`data` must name a preference file"));
        }
        Ok(())
    }

    fn files(params: &Params) -> Vec<String> {
        vec![params.data.clone()]
    }

    fn resources(params: &Params) -> crate::Resources {
        params.training.resources()
    }

    fn run(params: &Params, ctx: &mut StageCtx) -> Result<()> {
        trainer::run_stage(|stop_after| train(params, ctx, stop_after))
    }
}

/// The loss of the module docs, averaged over pairs: rewards [B] of the
/// chosen and the rejected responses.
pub fn pairwise_loss(chosen: &Tensor, rejected: &Tensor, margin: f64, center_coef: f64) -> Tensor {
    let preference = -(chosen - rejected - margin).log_sigmoid().mean(Kind::Float);
    if center_coef == 0.0 {
        return preference;
    }
    preference + (chosen + rejected).square().mean(Kind::Float) * center_coef
}

fn train(params: &Params, ctx: &mut StageCtx, stop_after: Option<u64>) -> Result<Ended> {
    let started = Instant::now();
    let device = device::prepare(ctx)?;
    params.training.join(device)?;
    let model_dir = ctx.input("model")?.to_path_buf();
    let data = ctx.project_path(&params.data);
    let records: Vec<Record> = records::read(&data).with_context(|| "the preference data (param `data`)")?;

    let mut scorer = HeadModel::from_model(&model_dir, vec!["reward".into()], &params.trainable, device, params.train.seed)?;
    crate::train::check_memory(scorer.model.gpt.config(), &params.train, device)?;
    let encoder = Encoder::new(&scorer.model.tokenizer, &params.template)?;
    let all = encoder.pairs(&records, scorer.model.gpt.config().context as usize, &data.display().to_string())?;
    let parts = Split::new(&params.split, params.train.seed).parts(all.len());
    let take = |part: &[usize]| -> Vec<Pair> { part.iter().map(|&i| all[i].clone()).collect() };
    let (train_pairs, val_pairs) = (take(&parts[0]), take(&parts[1]));
    ensure!(
        !train_pairs.is_empty() && !val_pairs.is_empty(),
        "{}: {} records are too few to split {:?}",
        data.display(),
        records.len(),
        params.split
    );
    eprintln!(
        "reward_model: {} train and {} validation pairs; {} steps of {} pairs on {device:?}, {} threads",
        train_pairs.len(),
        val_pairs.len(),
        params.train.steps,
        params.train.batch_size * params.train.grad_accum,
        ctx.threads
    );

    let (vs, head) = scorer.parts();
    let mut task = Preferences { head, params, train: train_pairs, val: val_pairs };
    let before = task.judge()?;
    let trainer = Trainer::new("reward_model", &params.train, &params.training, stop_after);
    let trained = match trainer.run(ctx, vs, &mut task)? {
        Ended::Finished(trained) => trained,
        stopped => return Ok(stopped),
    };
    let after = task.judge()?;
    if !ranks::is_first() {
        return Ok(Ended::Finished(trained));
    }
    let (train_len, val_len) = (task.train.len(), task.val.len());

    scorer.save(&ctx.out, &model_dir)?;
    trained.write(&ctx.out, "reward model: Bradley–Terry loss", "nats/pair")?;
    ctx.metric("val_accuracy", after.accuracy);
    ctx.metric("val_margin", after.margin);
    ctx.metric("val_loss", after.loss);
    ctx.metric("val_accuracy_before", before.accuracy);
    ctx.metric("val_margin_before", before.margin);
    ctx.metric("reward_mean", after.reward_mean);
    ctx.metric("reward_std", after.reward_std);
    ctx.metric("train_loss", trained.train_loss()?);
    ctx.metric("train_pairs", train_len);
    ctx.metric("val_pairs", val_len);
    ctx.metric("wall_seconds", started.elapsed().as_secs_f64());
    ctx.metric("skipped_steps", trained.skipped);
    Ok(Ended::Finished(trained))
}

/// Preference pairs as an [`Objective`].
struct Preferences<'a> {
    head: Head<'a>,
    params: &'a Params,
    train: Vec<Pair>,
    val: Vec<Pair>,
}

/// How a reward model ranks held-out pairs.
#[derive(Debug)]
pub struct Judged {
    /// The share of pairs with r_c > r_r, ties counting half.
    pub accuracy: f64,
    /// Mean r_c − r_r.
    pub margin: f64,
    /// Mean loss.
    pub loss: f64,
    /// Mean and standard deviation of all rewards.
    pub reward_mean: f64,
    pub reward_std: f64,
}

impl Preferences<'_> {
    /// Across ranks, each scores its share of the pairs.
    fn judge(&self) -> Result<Judged> {
        let batch_size = self.params.train.batch_size * 2;
        let scores = |pick: fn(&Pair) -> &Sequence| -> Result<Tensor> {
            let seqs: Vec<Sequence> = self.val.iter().map(|p| pick(p).clone()).collect();
            let scores = ranks::rows_of(seqs.len(), 1, |rows| {
                Ok(Vec::<f64>::try_from(self.head.scores(&seqs[rows], batch_size).view([-1]).to_kind(Kind::Double))?)
            })?;
            Ok(Tensor::from_slice(&scores).to_kind(Kind::Float))
        };
        let (chosen, rejected) = (scores(|p| &p.chosen)?, scores(|p| &p.rejected)?);
        Ok(judge(&chosen, &rejected, self.params.margin, self.params.center_coef))
    }
}

/// [`Judged`] of rewards [N] of chosen and rejected responses.
pub fn judge(chosen: &Tensor, rejected: &Tensor, margin: f64, center_coef: f64) -> Judged {
    let diff = chosen - rejected;
    let wins = diff.gt(0.0).to_kind(Kind::Double) + diff.eq(0.0).to_kind(Kind::Double) * 0.5;
    let all = Tensor::cat(&[chosen, rejected], 0).to_kind(Kind::Double);
    Judged {
        accuracy: wins.mean(Kind::Double).double_value(&[]),
        margin: diff.mean(Kind::Double).double_value(&[]),
        loss: pairwise_loss(chosen, rejected, margin, center_coef).double_value(&[]),
        reward_mean: all.mean(Kind::Double).double_value(&[]),
        reward_std: all.std(false).double_value(&[]),
    }
}

impl Objective for Preferences<'_> {
    fn backward(&mut self, step: u64, micro: usize, scale: f64) -> Result<f64> {
        // This rank's pairs; the loss is a mean over pairs.
        let (picked, share) = ranks::share(batch_indices(self.train.len(), &self.params.train, step, micro), |_| 1.0);
        let scale = scale * share;
        // Chosen then rejected responses in one batch, one forward pass.
        let seqs: Vec<Sequence> =
            picked.iter().map(|&i| self.train[i].chosen.clone()).chain(picked.iter().map(|&i| self.train[i].rejected.clone())).collect();
        let batch = pad(&seqs, 0, self.head.gpt.device());
        let (margin, center_coef) = (self.params.margin, self.params.center_coef);
        let loss = self.head.backward(&batch, |rewards| {
            let rewards = rewards.view([2, -1]);
            pairwise_loss(&rewards.get(0), &rewards.get(1), margin, center_coef) * scale
        });
        Ok(loss.double_value(&[]))
    }

    fn evaluate(&mut self, _step: u64) -> Result<Map<String, Value>> {
        let j = self.judge()?;
        Ok(Map::from_iter([
            ("val_loss".into(), json!(j.loss)),
            ("val_accuracy".into(), json!(j.accuracy)),
            ("val_margin".into(), json!(j.margin)),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::corpus;
    use crate::testing::ctx;
    use crate::testing::tiny_model;
    use crate::testing::torch_rng;

    /// Params for a run of seconds on a tiny model.
    fn quick(data: &str) -> Params {
        crate::params::<RewardModel>(json!({
            "data": data,
            "template": "Q: {instruction}\nA: ",
            "train": {"steps": 30, "batch_size": 8, "lr": 3e-3, "warmup": 3},
            "eval_every": 10, "checkpoint_every": 0, "log_every": 100,
        }))
        .unwrap()
    }

    #[test]
    fn a_tiny_model_learns_an_obvious_preference() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (base, _) = tiny_model(dir, &corpus("tinyshakespeare.txt")[..20_000], json!({"context": 32, "d_model": 32}));
        let records: Vec<Value> = (0..40)
            .map(|i| json!({"instruction": format!("Tell me about thing {i}."), "chosen": "Gladly, good friend.", "rejected": "Go away, knave!"}))
            .collect();
        std::fs::write(dir.join("prefs.json"), serde_json::to_string(&records).unwrap()).unwrap();
        let mut c = ctx(dir, "reward", &[("model", &base)]);
        train(&quick("prefs.json"), &mut c, None).unwrap();

        let m = c.metrics();
        assert_eq!(m["val_accuracy_before"], 0.5, "a zero head ties every pair");
        assert_eq!((m["train_pairs"].as_u64(), m["val_pairs"].as_u64()), (Some(36), Some(4)));
        assert_eq!(m["val_accuracy"], 1.0, "{m:?}");
        assert!(m["val_margin"].as_f64().unwrap() > 1.0, "{m:?}");
        assert!(m["train_loss"].as_f64().unwrap() < 0.2, "{m:?}");

        // The artifact scores a new prompt's responses in the learned order.
        let scorer = HeadModel::open(&c.out, tch::Device::Cpu).unwrap();
        assert_eq!(scorer.info.labels, ["reward"]);
        let template = quick("").template;
        let encoder = Encoder::new(&scorer.model.tokenizer, &template).unwrap();
        let r = Record { instruction: "Tell me about the sea.".into(), ..Default::default() };
        let seqs = [encoder.sequence(&r, "Gladly, good friend.", 32).unwrap(), encoder.sequence(&r, "Go away, knave!", 32).unwrap()];
        let rewards = Vec::<f64>::try_from(scorer.forward(&pad(&seqs, 0, tch::Device::Cpu), false).view([-1])).unwrap();
        assert!(rewards[0] > rewards[1], "{rewards:?}");
        assert_eq!(&std::fs::read(c.out.join("loss.png")).unwrap()[1..4], b"PNG");
        let rows = std::fs::read_to_string(c.out.join(trainer::METRICS_FILE)).unwrap();
        assert_eq!(rows.lines().filter(|l| l.contains("val_accuracy")).count(), 3);
    }

    #[test]
    fn missing_responses_name_the_record() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("p.jsonl"),
            "{\"instruction\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"instruction\": \"a\", \"chosen\": \"b\"}\n",
        )
        .unwrap();
        let (base, _) = tiny_model(tmp.path(), &corpus("tinyshakespeare.txt")[..5_000], json!({}));
        let mut c = ctx(tmp.path(), "reward", &[("model", &base)]);
        let err = format!("{:#}", train(&quick("p.jsonl"), &mut c, None).unwrap_err());
        assert!(err.contains("p.jsonl: record 2 needs both `chosen` and `rejected`"), "{err}");
    }

    /// Held-out accuracy at the defaults from a pretrained model artifact
    /// such as the default pipeline's (`MODEL=path/to/out`; `PARAMS` overrides
    /// the params as JSON): `cargo test --release --workspace --lib preference_quality --
    /// --ignored --nocapture`.
    #[test]
    #[ignore = "a minute of training on a model artifact named by MODEL"]
    fn preference_quality() {
        let model = std::env::var("MODEL").expect("MODEL: a pretrained model artifact, e.g. artifacts/pretrain/KEY/out");
        let params: Params = crate::testing::params_from_env::<RewardModel>();
        let tmp = tempfile::tempdir().unwrap();
        let mut c = ctx(tmp.path(), "reward", &[("model", std::path::Path::new(&model))]);
        c.project_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        train(&params, &mut c, None).unwrap();
        eprintln!("metrics: {}", Value::Object(c.metrics().clone()));
        let accuracy = c.metrics()["val_accuracy"].as_f64().unwrap();
        assert!(accuracy >= 0.75, "held-out accuracy {accuracy}");
    }

    #[test]
    fn loss_matches_a_hand_computation() {
        let chosen = Tensor::from_slice(&[1.0f32, 0.5]);
        let rejected = Tensor::from_slice(&[-1.0f32, 1.0]);
        let nll = |d: f64| -(1.0 / (1.0 + (-d).exp())).ln();
        // Differences 2 and −0.5; sums 0 and 1.5.
        let plain = (nll(2.0) + nll(-0.5)) / 2.0;
        let got = |m, c| pairwise_loss(&chosen, &rejected, m, c).double_value(&[]);
        assert!((got(0.0, 0.0) - plain).abs() < 1e-6);
        let with_margin = (nll(2.0 - 0.3) + nll(-0.5 - 0.3)) / 2.0;
        assert!((got(0.3, 0.0) - with_margin).abs() < 1e-6);
        let centered = with_margin + 0.1 * (0.0 + 1.5f64.powi(2)) / 2.0;
        assert!((got(0.3, 0.1) - centered).abs() < 1e-6, "{} vs {centered}", got(0.3, 0.1));

        let j = judge(&Tensor::from_slice(&[1.0f32, 0.5, 2.0]), &Tensor::from_slice(&[-1.0f32, 1.0, 2.0]), 0.0, 0.0);
        assert!((j.accuracy - 1.5 / 3.0).abs() < 1e-9, "a tie counts half: {j:?}");
        assert!((j.margin - 1.5 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn split_is_checked() {
        let bad = Params { split: vec![0.9, 0.2], ..Default::default() };
        assert_eq!(RewardModel::check(&bad, &[]).unwrap_err().path, ["split"]);
        let bad = Params { split: vec![1.0], ..Default::default() };
        assert_eq!(RewardModel::check(&bad, &[]).unwrap_err().path, ["split"]);
        assert!(RewardModel::check(&Params::default(), &[]).is_ok());
        assert!(crate::params::<RewardModel>(json!({"trainable": {"last_block": 1}})).is_err());
    }
}
