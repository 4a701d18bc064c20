//! `dpo`: direct preference optimization (Rafailov et al. 2023) of an
//! instruction-tuned model on preference pairs, with no reward model.
//!
//! ```toml
//! [stages.dpo]
//! kind = "dpo"
//! input = "sft"
//! data = "data/instruct/preference-data.json"
//! template = "alpaca"                  # the format the model was tuned on
//! split = [0.9, 0.1]                   # train, validation
//! beta = 0.1
//! loss = "sigmoid"                     # or "ipo", "hinge"
//! train = { steps = 100, batch_size = 8, lr = 1e-4 }
//! ```
//!
//! Input `model`: a model artifact, normally the `sft` output; training
//! starts from it (the policy π) and it stays, frozen, the reference π_ref.
//! Data: a JSON array or JSON Lines (optionally `.gz`) of records with
//! `instruction`, `input` (optional), `chosen` and `rejected`; the file is
//! part of the stage's key.
//!
//! Each response is formatted as the model was tuned (prompt, response,
//! `<|endoftext|>`, [`Encoder::sequence`]) and only its tokens are scored:
//! log π(y) is the summed log-probability of the response tokens
//! ([`sequence_logprobs`]). With h = [log π(c) − log π_ref(c)] − [log π(r)
//! − log π_ref(r)] for chosen c and rejected r, the loss of a pair is, as TRL
//! defines them,
//!
//! ```text
//! sigmoid  −log σ(β·h)          (DPO)
//! hinge    max(0, 1 − β·h)      (SLiC)
//! ipo      (h − 1/(2β))²        (IPO; log-probabilities averaged per response token)
//! ```
//!
//! The reference is the input model, so its log-probabilities are computed
//! once, before training, without a graph; no second model is held. A
//! resumed run computes them from the input model again, not from the
//! checkpoint.
//!
//! Params:
//! * `data` (`data/instruct/preference-data.json`), relative to the project.
//! * `template` (`alpaca`): a [`Template`]; the one the input was tuned with.
//! * `split` (`[0.9, 0.1]`): train and validation fractions, shuffled by
//!   `train.seed`: with the defaults, the pairs `reward_model` holds out.
//! * `beta` (0.1): how far the policy may move from the reference; `loss`
//!   (`sigmoid`): see above.
//! * `trainable` (`"all"`): which weights train, as in `sft`; see
//!   [`crate::train::finetune`].
//! * `train`: a [`Hyper`] (defaults: 100 steps of 8 pairs, lr 1e-4 → 1e-5,
//!   warmup 10, no weight decay); `eval_every` (50) and the other loop
//!   params as in `pretrain`, resumable the same way, `processes`, `zero`
//!   and `collective_timeout_s` included (each rank on its pairs of every
//!   batch).
//!
//! Output: the tuned model artifact, `metrics.jsonl` (per step `loss`, `lr`,
//! `grad_norm`; per evaluation the `val_` metrics below) and `loss.png`.
//!
//! Metrics, on the validation pairs:
//! * `val_reward_accuracy`: the share of pairs whose implicit reward
//!   β·(log π − log π_ref) is higher for the chosen response (h > 0);
//!   `val_reward_margin`: the mean difference of the rewards, β·h.
//! * `val_accuracy_before` and `val_accuracy`: the share of pairs for which
//!   the model itself prefers the chosen response, log π(c) > log π(r), for
//!   the input model and for the tuned one. Before training the implicit
//!   rewards are all zero, so the input model's own preference is the
//!   baseline: DPO has worked when `val_reward_accuracy` (and
//!   `val_accuracy`) rise above `val_accuracy_before`.
//! * `val_loss`, `train_loss`, `trainable_params`, `params`, `examples`
//!   (train, validation), `wall_seconds`, `skipped_steps`.
//!
//! With `loss = "ipo"`, every log π in these metrics is the per-token
//! average the loss uses.
//!
//! Measured (test `preference_quality`) on an `sft` model of the default
//! pipeline's pretrained model, with 40 steps of 8 pairs on 330 training
//! pairs: the input model prefers the chosen response of 40.0% of the 110
//! validation pairs; after DPO the implicit reward ranks 76.4% of them
//! right (margin 0.26, validation loss 0.588 from ln 2 = 0.693).

use std::time::Instant;

use anyhow::{ensure, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

use crate::data::instruct::{self, Encoder, Template};
use crate::data::records::{self, Split};
use crate::data::sequences::{pad, score, sequence_logprobs, Sequence};
use crate::model::Gpt;
use crate::train::finetune::{self, read_records, Trainable, Tuning};
use crate::train::trainer::{self, batch_indices, Ended, Objective, Trainer};
use crate::train::{self, ranks, Hyper, Training};
use crate::{device, Inputs, ParamError, Stage, StageCtx};

pub struct Dpo;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The preference pairs (`chosen` and `rejected` per instruction), relative to the pipeline.
    pub data: String,
    /// How a record becomes a prompt: the one the input model was tuned with.
    pub template: Template,
    /// Train and validation fractions, shuffled by `train.seed`.
    pub split: Vec<f64>,
    /// How far the policy may move from the reference.
    #[schemars(range(max = 100), extend("exclusiveMinimum" = 0))]
    pub beta: f64,
    /// `sigmoid` (DPO), `ipo` or `hinge`.
    pub loss: Loss,
    pub trainable: Trainable,
    pub train: Hyper,
    #[serde(flatten)]
    pub training: Training,
}

/// The preference loss; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    Sigmoid,
    Hinge,
    Ipo,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            data: "data/instruct/preference-data.json".into(),
            template: Template::default(),
            split: vec![0.9, 0.1],
            beta: 0.1,
            loss: Loss::Sigmoid,
            trainable: Trainable::All,
            train: Hyper { steps: 100, batch_size: 8, lr: 1e-4, min_lr: 1e-5, warmup: 10, weight_decay: 0.0, ..Hyper::default() },
            training: Training { eval_every: 50, ..Training::default() },
        }
    }
}

impl Stage for Dpo {
    const KIND: &'static str = "dpo";
    const VERSION: u32 = 4;
    const SUMMARY: &'static str = "direct preference optimization on chosen/rejected pairs (sigmoid, IPO or hinge loss)";
    const INPUTS: Inputs = Inputs::Fixed(&["model"]);
    const VOLATILE: &'static [&'static str] = &train::VOLATILE;
    const MERGED: &'static [&'static str] = &train::MERGED;
    const MOVED: &'static [(&'static str, &'static str)] = &[finetune::MOVED_LORA];
    const SHOW: &'static [&'static str] = &["loss.png", "metrics.jsonl"];
    type Params = Params;

    fn check(params: &Params, _inputs: &[String]) -> Result<(), ParamError> {
        if params.data.trim().is_empty() {
            return Err(ParamError::new(&["data"], "`data` must name a preference file (JSON or JSON Lines)"));
        }
        params.template.check("template")?;
        records::check_split(&params.split, &["train", "validation"])?;
        params.trainable.check()?;
        params.training.check(&params.train)
    }

    fn files(params: &Params) -> Vec<String> {
        vec![params.data.clone()]
    }

    fn resources(params: &Params) -> crate::Resources {
        params.training.resources()
    }

    fn run(params: &Params, ctx: &mut StageCtx) -> Result<()> {
        trainer::run_stage(|stop_after| dpo(params, ctx, stop_after))
    }
}

/// The mean preference loss of pairs with log-probabilities `chosen` and
/// `rejected` [B] under the policy and `ref_chosen`, `ref_rejected` [B]
/// under the reference.
pub fn preference_loss(loss: Loss, beta: f64, chosen: &Tensor, rejected: &Tensor, ref_chosen: &Tensor, ref_rejected: &Tensor) -> Tensor {
    let h = (chosen - rejected) - (ref_chosen - ref_rejected);
    let per_pair = match loss {
        Loss::Sigmoid => -(h * beta).log_sigmoid(),
        Loss::Hinge => (-(h * beta) + 1.0).relu(),
        Loss::Ipo => (h - 1.0 / (2.0 * beta)).square(),
    };
    per_pair.mean(Kind::Float)
}

/// A preference pair, tokenized, with the reference's log-probabilities.
struct Pair {
    answers: instruct::Pair,
    ref_chosen: f64,
    ref_rejected: f64,
}

/// The stage, stopping after step `stop_after` if given.
pub(crate) fn dpo(params: &Params, ctx: &mut StageCtx, stop_after: Option<u64>) -> Result<Ended> {
    let started = Instant::now();
    let device = device::prepare(ctx)?;
    params.training.join(device)?;
    let input = ctx.input("model")?.to_path_buf();
    let hyper = &params.train;
    let mut tuning = Tuning::open(&input, &params.trainable, device, hyper.seed)?;
    crate::train::check_memory(tuning.gpt.config(), hyper, device)?;
    let records = read_records(ctx, &params.data)?;
    let parts = Split::new(&params.split, hyper.seed).parts(records.len());
    // Its own copy: the model is borrowed mutably for training below.
    let tokenizer = tuning.tokenizer.clone();
    let encoder = Encoder::new(&tokenizer, &params.template)?;
    let context = tuning.gpt.config().context as usize;
    let objective = PreferenceLoss { loss: params.loss, beta: params.beta, pad_id: encoder.eot, batch_size: hyper.batch_size };
    let all = encoder.pairs(&records, context, &params.data)?;
    let pairs = |part: &[usize]| -> Result<Vec<Pair>> {
        let sequences: Vec<Sequence> = part.iter().flat_map(|&i| [all[i].chosen.clone(), all[i].rejected.clone()]).collect();
        let logps = objective.logps(&tuning.gpt, &sequences)?;
        Ok(part.iter().zip(logps.chunks(2)).map(|(&i, l)| Pair { answers: all[i].clone(), ref_chosen: l[0], ref_rejected: l[1] }).collect())
    };
    let (train, val) = (pairs(&parts[0])?, pairs(&parts[1])?);
    ensure!(
        !train.is_empty() && !val.is_empty(),
        "{}: {} records leave {} pairs for training and {} for validation; `split` needs more data",
        params.data,
        records.len(),
        train.len(),
        val.len()
    );
    let val_accuracy_before = mean(val.iter().map(|p| p.ref_chosen > p.ref_rejected));
    let (trainable_params, params_total) = (tuning.trainable_params(), tuning.gpt.config().num_params());
    eprintln!(
        "dpo: {trainable_params} trainable parameters of {params_total}, {} train / {} validation pairs; \
         the input model prefers the chosen response of {:.1}% of the validation pairs",
        train.len(),
        val.len(),
        100.0 * val_accuracy_before
    );

    let (gpt, trainable) = tuning.parts();
    let examples = [train.len(), val.len()];
    let mut task = Preferences { gpt, train, val, hyper, objective };
    let trainer = Trainer::new("dpo", &params.train, &params.training, stop_after);
    let trained = match trainer.run(ctx, trainable, &mut task)? {
        Ended::Finished(trained) => trained,
        stopped => return Ok(stopped),
    };
    if !ranks::is_first() {
        return Ok(Ended::Finished(trained));
    }
    let out = ctx.out.clone();
    trained.write(&out, "dpo: preference loss", "nats/pair")?;
    tuning.save(&out, &input)?;

    ctx.metric("val_accuracy_before", val_accuracy_before);
    for key in ["val_accuracy", "val_reward_accuracy", "val_reward_margin", "val_loss"] {
        ctx.metric(key, &trained.last_eval[key]);
    }
    ctx.metric("train_loss", trained.train_loss()?);
    ctx.metric("trainable_params", trainable_params);
    ctx.metric("params", params_total);
    ctx.metric("examples", examples);
    ctx.metric("wall_seconds", started.elapsed().as_secs_f64());
    ctx.metric("skipped_steps", trained.skipped);
    Ok(Ended::Finished(trained))
}

/// The loss and the log-probabilities it compares.
struct PreferenceLoss {
    loss: Loss,
    beta: f64,
    pad_id: i64,
    batch_size: usize,
}

impl PreferenceLoss {
    /// The log-probability of each sequence's response as the loss uses it:
    /// summed, or for IPO averaged per token, as tensor [N] from summed ones.
    fn per_loss(&self, summed: Tensor, sequences: &[Sequence]) -> Tensor {
        match self.loss {
            Loss::Ipo => {
                let counted: Vec<f32> = sequences.iter().map(|s| s.counted() as f32).collect();
                let counted = Tensor::from_slice(&counted).to_device(summed.device());
                summed / counted
            }
            Loss::Sigmoid | Loss::Hinge => summed,
        }
    }

    /// [`PreferenceLoss::per_loss`] log-probabilities under `gpt`, without a
    /// graph; across ranks, each computes its share of the sequences.
    fn logps(&self, gpt: &Gpt, sequences: &[Sequence]) -> Result<Vec<f64>> {
        ranks::rows_of(sequences.len(), 1, |rows| {
            let sequences = &sequences[rows];
            let summed = Tensor::from_slice(&score(gpt, sequences, 2 * self.batch_size, self.pad_id));
            Ok(Vec::<f64>::try_from(self.per_loss(summed, sequences))?)
        })
    }
}

/// The share of true values.
fn mean(values: impl Iterator<Item = bool>) -> f64 {
    let (mut yes, mut all) = (0usize, 0usize);
    for v in values {
        (yes, all) = (yes + usize::from(v), all + 1);
    }
    yes as f64 / all.max(1) as f64
}

/// DPO on preference pairs, as an [`Objective`]. Batches depend only on the step.
struct Preferences<'a> {
    gpt: &'a Gpt,
    train: Vec<Pair>,
    val: Vec<Pair>,
    hyper: &'a Hyper,
    objective: PreferenceLoss,
}

impl Objective for Preferences<'_> {
    fn backward(&mut self, step: u64, micro: usize, scale: f64) -> Result<f64> {
        let pairs: Vec<&Pair> = batch_indices(self.train.len(), self.hyper, step, micro).into_iter().map(|i| &self.train[i]).collect();
        // This rank's pairs; the loss is a mean over pairs.
        let (pairs, share) = ranks::share(pairs, |_| 1.0);
        let scale = scale * share;
        let b = pairs.len() as i64;
        // Chosen then rejected responses, in one batch.
        let sequences: Vec<Sequence> =
            pairs.iter().map(|p| p.answers.chosen.clone()).chain(pairs.iter().map(|p| p.answers.rejected.clone())).collect();
        let batch = pad(&sequences, self.objective.pad_id, self.gpt.device());
        let device = self.gpt.device();
        let reference = |f: fn(&Pair) -> f64| Tensor::from_slice(&pairs.iter().map(|p| f(p) as f32).collect::<Vec<_>>()).to_device(device);
        let (ref_chosen, ref_rejected) = (reference(|p| p.ref_chosen), reference(|p| p.ref_rejected));
        let cuda = device.is_cuda();
        let loss = tch::autocast(cuda, || {
            self.gpt.backward(&batch.x, true, |h| {
                let logps = self.objective.per_loss(sequence_logprobs(&self.gpt.logits(h), &batch.y), &sequences);
                let (chosen, rejected) = (logps.narrow(0, 0, b), logps.narrow(0, b, b));
                preference_loss(self.objective.loss, self.objective.beta, &chosen, &rejected, &ref_chosen, &ref_rejected) * scale
            })
        });
        Ok(loss.double_value(&[]))
    }

    fn evaluate(&mut self, _step: u64) -> Result<Map<String, Value>> {
        let sequences: Vec<Sequence> = self.val.iter().flat_map(|p| [p.answers.chosen.clone(), p.answers.rejected.clone()]).collect();
        let logps = self.objective.logps(self.gpt, &sequences)?;
        let (chosen, rejected): (Vec<f64>, Vec<f64>) = logps.chunks(2).map(|l| (l[0], l[1])).unzip();
        let h: Vec<f64> =
            self.val.iter().zip(chosen.iter().zip(&rejected)).map(|(p, (c, r))| (c - p.ref_chosen) - (r - p.ref_rejected)).collect();
        let tensor = |v: Vec<f64>| Tensor::from_slice(&v);
        let val_loss = preference_loss(
            self.objective.loss,
            self.objective.beta,
            &tensor(chosen.clone()),
            &tensor(rejected.clone()),
            &tensor(self.val.iter().map(|p| p.ref_chosen).collect()),
            &tensor(self.val.iter().map(|p| p.ref_rejected).collect()),
        );
        Ok(Map::from_iter([
            ("val_loss".into(), json!(val_loss.double_value(&[]))),
            ("val_reward_accuracy".into(), json!(mean(h.iter().map(|&h| h > 0.0)))),
            ("val_reward_margin".into(), json!(self.objective.beta * h.iter().sum::<f64>() / h.len() as f64)),
            ("val_accuracy".into(), json!(mean(chosen.iter().zip(&rejected).map(|(c, r)| c > r)))),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::formats::model::ModelArtifact;
    use crate::model::Lora;
    use crate::testing::ctx;
    use crate::testing::{instruct_data, model_artifact};
    use crate::testing::{tiny, torch_rng};

    #[test]
    fn losses_match_hand_computed_values() {
        // h = (−10 + 12) − (−11 + 11) = 2 and (−5 + 4) − (−6 + 6) = −1.
        let t = |v: [f64; 2]| Tensor::from_slice(&v);
        let loss =
            |kind| preference_loss(kind, 0.1, &t([-10.0, -5.0]), &t([-12.0, -4.0]), &t([-11.0, -6.0]), &t([-11.0, -6.0])).double_value(&[]);
        // −log σ(0.2) = ln(1 + e^−0.2) = 0.598139, −log σ(−0.1) = ln(1 + e^0.1) = 0.744397.
        assert!((loss(Loss::Sigmoid) - (0.598139 + 0.744397) / 2.0).abs() < 1e-5);
        // max(0, 1 − 0.2) = 0.8, max(0, 1 + 0.1) = 1.1.
        assert!((loss(Loss::Hinge) - 0.95).abs() < 1e-6);
        // (2 − 5)² = 9, (−1 − 5)² = 36.
        assert!((loss(Loss::Ipo) - 22.5).abs() < 1e-6);
        // Equal policy and reference ratios: no preference yet, loss ln 2.
        let zero = preference_loss(Loss::Sigmoid, 0.5, &t([-3.0, -1.0]), &t([-2.0, -1.0]), &t([-3.0, -1.0]), &t([-2.0, -1.0]));
        assert!((zero.double_value(&[]) - std::f64::consts::LN_2).abs() < 1e-6);
    }

    /// A tiny model trained on 36 pairs: the loss starts at ln 2 (policy =
    /// reference) and falls, and the model comes to prefer the chosen
    /// responses of the training pairs.
    #[test]
    fn training_lowers_the_preference_loss() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let model = model_artifact(dir, &tiny("gpt2", json!({"context": 96})));
        let data = instruct_data(dir, "preference-data.json", 40);
        let params: Params = crate::params::<Dpo>(json!({
            "data": data,
            "template": "Q: {instruction} {input}\nA: ",
            "beta": 0.5,
            "train": {"steps": 20, "batch_size": 4, "warmup": 2, "lr": 1e-2, "min_lr": 1e-3},
            "eval_every": 10, "log_every": 100,
        }))
        .unwrap();
        let mut c = ctx(dir, "dpo", &[("model", &model)]);
        dpo(&params, &mut c, None).unwrap().finished().unwrap();
        let rows: Vec<Value> = records::read(&c.out.join(trainer::METRICS_FILE)).unwrap();
        let losses: Vec<f64> = rows.iter().filter_map(|r| r["loss"].as_f64()).collect();
        assert!((losses[0] - std::f64::consts::LN_2).abs() < 1e-4, "{losses:?}");
        let last: f64 = losses[15..].iter().sum::<f64>() / 5.0;
        assert!(last < 0.5, "{losses:?}");
        let metrics = c.metrics();
        assert_eq!(metrics["examples"], json!([36, 4]));
        for key in ["val_accuracy_before", "val_accuracy", "val_reward_accuracy", "val_reward_margin", "val_loss"] {
            assert!(metrics[key].is_f64(), "{key}: {metrics:?}");
        }
        ModelArtifact::open(&c.out, Device::Cpu).unwrap();
        assert_eq!(&std::fs::read(c.out.join("loss.png")).unwrap()[1..4], b"PNG");
    }

    #[test]
    fn params_are_checked() {
        let p: Params = crate::params::<Dpo>(json!({"loss": "ipo", "trainable": {"lora": {"rank": 2}}})).unwrap();
        assert_eq!((p.loss, &p.trainable), (Loss::Ipo, &Trainable::Lora(Lora { rank: 2, ..Lora::default() })));
        assert!(Dpo::check(&p, &[]).is_ok());
        assert!(crate::params::<Dpo>(json!({"loss": "kto"})).is_err());
        assert_eq!(crate::params::<Dpo>(json!({"beta": 0.0})).unwrap_err().path, ["beta"]);
        let bad: Params = crate::params::<Dpo>(json!({"split": [0.85, 0.1, 0.05]})).unwrap();
        assert_eq!(Dpo::check(&bad, &[]).unwrap_err().path, ["split"]);
        assert_eq!(Dpo::files(&Params::default()), ["data/instruct/preference-data.json"]);
    }

    /// The default params on an instruction-tuned model artifact and the
    /// shipped preference pairs: `LLMFLOW_SFT_MODEL=path/to/sft/out cargo
    /// test --release --workspace --lib preference_quality -- --ignored
    /// --nocapture` (`PARAMS` may override params as JSON).
    #[test]
    #[ignore = "a 60-second training run on a model artifact named by LLMFLOW_SFT_MODEL"]
    fn preference_quality() {
        let _rng = torch_rng();
        let model = std::path::PathBuf::from(std::env::var("LLMFLOW_SFT_MODEL").expect("LLMFLOW_SFT_MODEL"));
        let tmp = tempfile::tempdir().unwrap();
        let mut c = ctx(tmp.path(), "dpo", &[("model", &model)]);
        c.project_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let params: Params = crate::testing::params_from_env::<Dpo>();
        dpo(&params, &mut c, None).unwrap().finished().unwrap();
        eprintln!("metrics: {}", Value::Object(c.metrics().clone()));
        let (before, after) = (c.metrics()["val_accuracy_before"].as_f64().unwrap(), c.metrics()["val_reward_accuracy"].as_f64().unwrap());
        assert!(after > before, "{before} → {after}");
    }
}
