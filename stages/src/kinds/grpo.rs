//! `grpo`: reinforcement learning with verifiable rewards, by group relative
//! policy optimization (DeepSeekMath's GRPO, with Dr. GRPO's and DAPO's
//! variants, as TRL's `GRPOTrainer` offers them).
//!
//! ```toml
//! [stages.grpo]
//! kind = "grpo"
//! inputs = { policy = "sft" }                  # and optionally `reward`, a reward_model artifact
//! data = "data/rl/arithmetic_train.jsonl"      # prompts and reference answers
//! eval_data = "data/rl/arithmetic_test.jsonl"  # held out: accuracy before and after
//! template = "{instruction}="
//! group = 8
//! rewards = [{ type = "exact_match" }]
//! train = { steps = 60, batch_size = 8, grad_accum = 2, lr = 1e-4 }
//! ```
//!
//! Records (JSON or JSON Lines): `instruction` and `input` make the prompt
//! through `template` (see [`crate::data::instruct`]); `output` is the
//! reference answer; `test`, for `python_tests`, is Python that runs after
//! prompt + completion and fails (raises) when the completion is wrong.
//!
//! Each step of the loop (an iteration):
//! 1. `train.batch_size × train.grad_accum` training prompts (a seeded
//!    permutation per epoch), `group` completions of each sampled at
//!    `temperature` (full distribution) up to `max_new_tokens` or
//!    `<|endoftext|>`: one prefill per prompt, the group's continuations
//!    batched through the KV cache ([`generate_groups`]);
//! 2. each completion's reward, the weighted sum of `rewards`
//!    ([`rewards`]); the group-relative advantages ([`objective`]):
//!    reward − group mean, divided by the group's std when `scale_rewards`;
//! 3. `iterations` optimizer updates on that generation batch, each of
//!    `grad_accum` micro-batches of `batch_size` prompts' groups: the
//!    clipped policy-ratio loss (`epsilon`, and `epsilon_high` above when
//!    set: DAPO's clip-higher), plus `beta` × the k3 KL to the reference
//!    (the input policy, frozen), normalised by `loss_type`: `grpo`, `dr_grpo`
//!    or `dapo`. With one iteration the ratio is 1 and the clipping never
//!    binds, as in TRL.
//!
//! Rewards ([`rewards::Reward`], weights default 1): `exact_match` (the
//! answer equals `output`), `numeric` (its last number within `tolerance`),
//! `format` (the whole completion matches `pattern`), `python_tests`
//! (prompt + completion + `test` runs and exits 0 in the same bubblewrap
//! sandbox as `eval`'s code tasks; needs `confirm_run_unsafe_code = true`),
//! `reward_model` (the `reward` input's score). The answer is the completion
//! trimmed, or group 1 of the last match of the `answer` regex. A
//! completion is *correct* when every verifiable reward (exact, numeric,
//! tests) gives 1.
//!
//! Held-out accuracy: before training and after, `eval_samples` completions
//! of each `eval_data` record (the first `eval_prompts`) at
//! `eval_temperature` (0: one greedy completion), with the same seeds; a
//! prompt's accuracy is the share that is correct (pass@1), and the stage's
//! their mean, with its standard error over the prompts.
//!
//! Output: the policy as a model artifact (`model.safetensors`,
//! `config.json`, `tokenizer.json`); `metrics.jsonl`, a row per iteration:
//! `reward`, `reward_std` (within groups), `accuracy` (of the sampled
//! completions), `kl` (per token, to the reference), `clip_fraction` (of
//! the iteration's completion tokens, where the clipped term won),
//! `entropy` (of the policy that sampled them), `completion_length`,
//! `loss`, `grad_norm`, `lr`, `generation_seconds` (sampling),
//! `training_seconds` (log-probabilities, then the updates); rows `val_accuracy` (and its
//! `_stderr`) before and after; `metrics.png`; `samples.jsonl`, the first
//! `samples` held-out prompts with the reference and the first completion before
//! and after, and the prompt's accuracy. Metrics: `accuracy_before`, `accuracy_after` and their
//! `_stderr`, `reward_train_last`, `iterations`, `completions_per_s` and
//! `generated_tokens_per_s` (of sampling), `generation_share` (of the
//! iterations' time), `wall_seconds`.
//!
//! Runs on the shared training loop ([`Trainer`]): checkpoints every
//! `checkpoint_every` iterations, exact resume (prompts and sampling seeds
//! are functions of (`train.seed`, iteration)), metrics and plots.
//! `LLMFLOW_STOP_AFTER_STEP=N` stops after iteration `N`. With `processes =
//! N` ([`Training`]) each rank samples, scores and evaluates its prompts
//! of every micro-batch with their single-process seeds ([`generate`],
//! [`Scorer::score`]), every rank assembles the whole batch, and each trains
//! on its rows of every micro-batch.

mod objective;
pub mod rewards;

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};
use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

use self::objective::{group_advantages, kl_k3, reduce, LossType};
use self::rewards::Reward;
use crate::data::instruct::{Encoder, Record, Template};
use crate::data::sequences::{pad, token_logprobs, Padded, Sequence};
use crate::data::{mean_stderr, records};
use crate::formats::model::ModelArtifact;
use crate::model::Gpt;
use crate::sample::{generate_groups, Sampling};
use crate::sandbox::{self, Limits, Outcome, Sandbox};
use crate::train::finetune::{Trainable, Tuning};
use crate::train::last_token::HeadModel;
use crate::train::rl::{clipped_surrogate, entropy, masked_mean};
use crate::train::trainer::{self, batch_indices, Ended, Objective, Trainer, Update};
use crate::train::{self, ranks, step_seed, Hyper, Training};
use crate::{device, Inputs, ParamError, Stage, StageCtx};

pub struct Grpo;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Training prompts with reference answers (`instruction`, `input`, `output`, `test`), relative to the pipeline.
    pub data: String,
    /// Held-out records: the accuracy before and after.
    pub eval_data: String,
    /// Held-out records used (the first ones); all if unset.
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub eval_prompts: Option<usize>,
    /// Completions per held-out prompt; its accuracy is their mean (pass@1).
    #[schemars(range(min = 1, max = 4096))]
    pub eval_samples: usize,
    /// Their temperature; 0 decodes greedily (one completion suffices).
    #[schemars(range(min = 0, max = 100))]
    pub eval_temperature: f64,
    /// How a record becomes a prompt: the one the policy was tuned with.
    pub template: Template,
    /// Completions per prompt (G).
    #[schemars(range(min = 2, max = 4096))]
    pub group: usize,
    /// The optimizer; `steps` counts iterations of `batch_size × grad_accum` prompts.
    pub train: Hyper,
    /// Optimizer updates per generation batch (μ).
    #[schemars(range(min = 1, max = 1024))]
    pub iterations: usize,
    /// Tokens per completion at most.
    #[schemars(range(min = 1, max = 1_048_576))]
    pub max_new_tokens: usize,
    /// Sampling temperature; the log-probabilities are those of this distribution.
    #[schemars(range(max = 100), extend("exclusiveMinimum" = 0))]
    pub temperature: f64,
    /// ε of the clipped ratio (below, and above unless `epsilon_high`).
    #[schemars(range(max = 100), extend("exclusiveMinimum" = 0))]
    pub epsilon: f64,
    /// ε above (DAPO's clip-higher, e.g. 0.28).
    #[schemars(range(max = 100), extend("exclusiveMinimum" = 0))]
    pub epsilon_high: Option<f64>,
    /// How token losses are normalised: "grpo", "dr_grpo" or "dapo".
    pub loss_type: LossType,
    /// Divide advantages by the group's standard deviation (false: Dr. GRPO).
    pub scale_rewards: bool,
    /// Weight of the KL penalty to the reference (0: none, TRL's default).
    #[schemars(range(min = 0, max = 100))]
    pub beta: f64,
    /// A regex whose last match (group 1, or all of it) is the answer; the trimmed completion if unset.
    pub answer: Option<String>,
    /// What a completion earns: `[{ type = "exact_match" | "numeric" | "format" | "python_tests" | "reward_model", weight, … }]`.
    pub rewards: Vec<Reward>,
    /// Held-out prompts whose completions before and after go to `samples.jsonl`.
    #[schemars(range(max = 1_000_000))]
    pub samples: usize,
    pub trainable: Trainable,
    #[serde(flatten)]
    pub training: Training,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            data: "data/rl/arithmetic_train.jsonl".into(),
            eval_data: "data/rl/arithmetic_test.jsonl".into(),
            eval_prompts: None,
            eval_samples: 1,
            eval_temperature: 0.0,
            template: Template::Custom("{instruction}=".into()),
            group: 8,
            train: Hyper {
                steps: 60,
                batch_size: 8,
                grad_accum: 2,
                lr: 1e-4,
                min_lr: 1e-5,
                warmup: 0,
                weight_decay: 0.0,
                beta2: 0.999,
                ..Hyper::default()
            },
            iterations: 1,
            max_new_tokens: 8,
            temperature: 1.0,
            epsilon: 0.2,
            epsilon_high: None,
            loss_type: LossType::Dapo,
            scale_rewards: true,
            beta: 0.0,
            answer: None,
            rewards: vec![Reward::ExactMatch(rewards::ExactMatch { weight: 1.0 })],
            samples: 4,
            trainable: Trainable::All,
            training: Training {
                eval_every: 60,
                spike_factor: 0.0,
                checkpoint_every: 10,
                keep_checkpoints: 2,
                log_every: 5,
                ..Training::default()
            },
        }
    }
}

impl Stage for Grpo {
    const KIND: &'static str = "grpo";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "RL with verifiable rewards: GRPO (and Dr. GRPO, DAPO) on groups of sampled completions";
    const INPUTS: Inputs = Inputs::Any;
    const VOLATILE: &'static [&'static str] = &train::VOLATILE;
    const MERGED: &'static [&'static str] = &train::MERGED;
    const SHOW: &'static [&'static str] = &["metrics.png", "samples.jsonl", "metrics.jsonl"];
    type Params = Params;

    fn check(p: &Params, inputs: &[String]) -> Result<(), ParamError> {
        let err = |path: &[&str], message: String| Err(ParamError::new(path, message));
        p.training.check(&p.train)?;
        p.trainable.check()?;
        p.template.check("template")?;
        if !inputs.iter().any(|i| i == "policy") || inputs.iter().any(|i| i != "policy" && i != "reward") {
            return err(&[], format!("inputs are `policy` (a model) and optionally `reward` (a reward_model), not {inputs:?}"));
        }
        for (field, file) in [("data", &p.data), ("eval_data", &p.eval_data)] {
            if file.trim().is_empty() {
                return err(&[field], format!("`{field}` must name a JSON or JSON Lines file of records"));
            }
        }
        if let Err(e) = p.answer.as_deref().map(Regex::new).transpose() {
            return err(&["answer"], format!("not a regular expression: {e}"));
        }
        if p.rewards.is_empty() {
            return err(&["rewards"], "no rewards: add `rewards = [{ type = \"exact_match\" }]` or another".into());
        }
        let wants_model = p.rewards.iter().any(|r| matches!(r, Reward::RewardModel(_)));
        if wants_model != inputs.iter().any(|i| i == "reward") {
            return err(&["rewards"], "a `reward_model` reward and a `reward` input come together: add both or neither".into());
        }
        for (i, reward) in p.rewards.iter().enumerate() {
            let at = |field: &str, message: String| err(&["rewards", &i.to_string(), field], message);
            match reward {
                Reward::Format(f) => {
                    if let Err(e) = Regex::new(&f.pattern) {
                        return at("pattern", format!("not a regular expression: {e}"));
                    }
                }
                Reward::PythonTests(t) if !t.confirm_run_unsafe_code => {
                    return at("confirm_run_unsafe_code", "python_tests runs the code the policy writes: set `confirm_run_unsafe_code = true` to allow it (it runs in a bubblewrap sandbox)".into());
                }
                Reward::PythonTests(t) if t.sandbox != "bwrap" && t.sandbox != "none" => {
                    return at("sandbox", format!("`sandbox` is \"bwrap\" or \"none\", not {:?}", t.sandbox));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn files(p: &Params) -> Vec<String> {
        vec![p.data.clone(), p.eval_data.clone()]
    }

    fn resources(p: &Params) -> crate::Resources {
        p.training.resources()
    }

    fn run(p: &Params, ctx: &mut StageCtx) -> Result<()> {
        trainer::run_stage(|stop_after| grpo(p, ctx, stop_after))
    }
}

/// A record: the prompt's fields, the reference answer, the tests.
#[derive(Debug, Clone, Deserialize)]
struct Problem {
    instruction: String,
    #[serde(default)]
    input: String,
    #[serde(default)]
    output: String,
    #[serde(default)]
    test: String,
}

/// Problems with their prompts, as text and as tokens cut from the left to
/// leave room for the completion.
struct Prompts {
    problems: Vec<Problem>,
    text: Vec<String>,
    ids: Vec<Vec<i64>>,
}

impl Prompts {
    fn load(path: &Path, limit: Option<usize>, encoder: &Encoder, room: usize) -> Result<Prompts> {
        let mut problems: Vec<Problem> = records::read(path)?;
        problems.truncate(limit.unwrap_or(problems.len()));
        ensure!(!problems.is_empty(), "{}: no records", path.display());
        let text: Vec<String> = problems
            .iter()
            .map(|q| encoder.template.prompt(&Record { instruction: q.instruction.clone(), input: q.input.clone(), ..Record::default() }))
            .collect();
        let ids = text
            .iter()
            .map(|t| {
                let ids = encoder.ids(t)?;
                Ok(ids[ids.len().saturating_sub(room)..].to_vec())
            })
            .collect::<Result<_>>()?;
        Ok(Prompts { problems, text, ids })
    }
}

/// Scores completions with the stage's rewards.
struct Scorer<'a> {
    rewards: &'a [Reward],
    answer: Option<Regex>,
    /// Each `format` reward's pattern, anchored; `None` for the others.
    formats: Vec<Option<Regex>>,
    sandbox: Option<Sandbox>,
    reward_model: Option<HeadModel>,
    eot: i64,
}

impl Scorer<'_> {
    /// The total reward of each completion of `prompts` (row `i` answers
    /// problem `of[i]`), and whether it is correct. Across ranks, each
    /// scores its rows and every rank gets all.
    fn score(&self, prompts: &Prompts, of: &[usize], ids: &[Vec<i64>], texts: &[String]) -> Result<(Vec<f64>, Vec<bool>)> {
        // Each row's reward, then 1 if it is correct.
        let values = ranks::rows_of(ids.len(), 2, |rows| {
            let (rewards, correct) = self.score_rows(prompts, &of[rows.clone()], &ids[rows.clone()], &texts[rows])?;
            Ok(rewards.into_iter().zip(correct).flat_map(|(reward, ok)| [reward, f64::from(u8::from(ok))]).collect())
        })?;
        Ok(values.chunks(2).map(|v| (v[0], v[1] == 1.0)).unzip())
    }

    fn score_rows(&self, prompts: &Prompts, of: &[usize], ids: &[Vec<i64>], texts: &[String]) -> Result<(Vec<f64>, Vec<bool>)> {
        let mut totals = vec![0.0; texts.len()];
        let mut correct = vec![self.rewards.iter().any(Reward::verifiable); texts.len()];
        for (reward, format) in self.rewards.iter().zip(&self.formats) {
            let values: Vec<f64> = match reward {
                Reward::ExactMatch(_) => (0..texts.len())
                    .map(|i| rewards::exact_match(rewards::extract(&texts[i], self.answer.as_ref()), &prompts.problems[of[i]].output))
                    .collect(),
                Reward::Numeric(n) => (0..texts.len())
                    .map(|i| {
                        rewards::numeric(rewards::extract(&texts[i], self.answer.as_ref()), &prompts.problems[of[i]].output, n.tolerance)
                    })
                    .collect(),
                Reward::Format(_) => texts.iter().map(|t| rewards::format(t, format.as_ref().expect("compiled"))).collect(),
                Reward::PythonTests(t) => {
                    let sandbox = self.sandbox.as_ref().expect("made for python_tests");
                    let limits = Limits { timeout: std::time::Duration::from_secs_f64(t.timeout_s), memory_bytes: t.memory_mb << 20 };
                    (0..texts.len())
                        .map(|i| {
                            let q = &prompts.problems[of[i]];
                            let program = format!("{}{}\n\n{}\n", prompts.text[of[i]], texts[i], q.test);
                            Ok(if sandbox::run(sandbox, &t.python, &program, limits)? == Outcome::Passed { 1.0 } else { 0.0 })
                        })
                        .collect::<Result<_>>()?
                }
                Reward::RewardModel(_) => self.reward_model_scores(prompts, of, ids)?,
            };
            for (i, v) in values.into_iter().enumerate() {
                totals[i] += reward.weight() * v;
                if reward.verifiable() && v != 1.0 {
                    correct[i] = false;
                }
            }
        }
        Ok((totals, correct))
    }

    fn reward_model_scores(&self, prompts: &Prompts, of: &[usize], ids: &[Vec<i64>]) -> Result<Vec<f64>> {
        let model = self.reward_model.as_ref().expect("loaded for reward_model");
        let context = model.model.gpt.config().context as usize;
        let sequences: Vec<Sequence> = (0..ids.len()).map(|i| Sequence::new(&prompts.ids[of[i]], &ids[i]).fit(context)).collect();
        let mut scores = Vec::with_capacity(ids.len());
        tch::no_grad(|| {
            for chunk in sequences.chunks(64) {
                let score = model.forward(&pad(chunk, self.eot, model.model.gpt.device()), false);
                scores.extend(Vec::<f64>::try_from(score.select(1, 0).to_kind(Kind::Double).to_device(tch::Device::Cpu))?);
            }
            anyhow::Ok(())
        })?;
        Ok(scores)
    }
}

/// The whole stage; `stop_after` ends the run after that iteration, as a
/// kill would.
fn grpo(p: &Params, ctx: &mut StageCtx, stop_after: Option<u64>) -> Result<Ended> {
    let started = Instant::now();
    let device = device::prepare(ctx)?;
    p.training.join(device)?;
    let hyper = &p.train;
    let policy_dir = ctx.input("policy")?.to_path_buf();
    let mut tuning = Tuning::open(&policy_dir, &p.trainable, device, hyper.seed)?;
    let config = tuning.gpt.config().clone();
    crate::train::check_memory(&config, hyper, device)?;
    let tokenizer = tuning.tokenizer.clone();
    let mut reference = ModelArtifact::open(&policy_dir, device)?;
    reference.vs.freeze();
    let encoder = Encoder::new(&tokenizer, &p.template)?;
    let context = config.context as usize;
    ensure!(p.max_new_tokens < context, "max_new_tokens is {}, but the policy's context is {context} tokens", p.max_new_tokens);
    let room = context - p.max_new_tokens;
    let train = Prompts::load(&ctx.project_path(&p.data), None, &encoder, room)?;
    let held_out = Prompts::load(&ctx.project_path(&p.eval_data), p.eval_prompts, &encoder, room)?;
    let reward_model = match ctx.inputs.get("reward") {
        Some(dir) => {
            let mut model = HeadModel::open(dir, device)?;
            model.model.vs.freeze();
            ensure!(
                model.info.labels.len() == 1,
                "{}: a reward model has one output, this head has {}",
                dir.display(),
                model.info.labels.len()
            );
            ensure!(
                model.model.tokenizer.get_vocab(true) == tokenizer.get_vocab(true),
                "the reward model in {} has another tokenizer than the policy in {}",
                dir.display(),
                policy_dir.display()
            );
            Some(model)
        }
        None => None,
    };
    let sandbox = match p.rewards.iter().find_map(|r| if let Reward::PythonTests(t) = r { Some(t) } else { None }) {
        Some(t) => {
            let scratch = ctx.work.join("code");
            std::fs::create_dir_all(&scratch)?;
            Some(Sandbox::new(&t.sandbox, &scratch)?)
        }
        None => None,
    };
    let formats = p
        .rewards
        .iter()
        .map(|r| if let Reward::Format(f) = r { Regex::new(&format!("^(?:{})$", f.pattern)).map(Some) } else { Ok(None) })
        .collect::<Result<_, _>>()?;
    let answer = p.answer.as_deref().map(Regex::new).transpose()?;
    let scorer = Scorer { rewards: &p.rewards, answer, formats, sandbox, reward_model, eot: encoder.eot };
    eprintln!(
        "grpo: {} iterations of {} prompts × {} completions ({} training prompts, {} held out), {} trainable parameters, on {device:?}, {} threads",
        hyper.steps,
        hyper.batch_size * hyper.grad_accum,
        p.group,
        train.ids.len(),
        held_out.ids.len(),
        tuning.trainable_params(),
        ctx.threads
    );

    let (policy, trainable) = tuning.parts();
    let m = Models { policy, reference: &reference.gpt, encoder: &encoder };
    // The starting point: the reference is the policy before any update.
    let before = HeldOut::measure(m.reference, &m, &held_out, &scorer, p)?;
    let mut task = GrpoTraining { m: &m, p, train: &train, held_out: &held_out, scorer: &scorer, before, after: None, timing: [0.0; 4] };
    let trainer = Trainer { evaluate_first: true, ..Trainer::new("grpo", &p.train, &p.training, stop_after) };
    let trained = match trainer.run(ctx, trainable, &mut task)? {
        Ended::Finished(trained) => trained,
        stopped => return Ok(stopped),
    };
    if !ranks::is_first() {
        return Ok(Ended::Finished(trained));
    }
    let GrpoTraining { before, after, timing: [generation_s, training_s, completions, generated], .. } = task;
    let after = after.expect("evaluated after the last iteration");
    let (acc_before, se_before) = mean_stderr(&before.correct);
    let (acc_after, se_after) = mean_stderr(&after.correct);
    eprintln!("grpo: held-out accuracy {acc_before:.4} ± {se_before:.4} → {acc_after:.4} ± {se_after:.4}");

    let out = ctx.out.clone();
    let panels = [
        ("reward", "mean reward"),
        ("accuracy", "share of answers right"),
        ("kl", "KL to the start (nats)"),
        ("clip_fraction", "share of ratios clipped"),
        ("completion_length", "completion length (tokens)"),
        ("entropy", "entropy (nats/token)"),
    ];
    trained.write_panels(&out, "step", &panels)?;
    let rows = trained.log.rows()?;
    let mut samples = String::new();
    for i in 0..p.samples.min(held_out.ids.len()) {
        let row = json!({
            "prompt": held_out.text[i],
            "reference": held_out.problems[i].output,
            "before": before.texts[i], "accuracy_before": before.correct[i],
            "after": after.texts[i], "accuracy_after": after.correct[i],
        });
        samples += &format!("{row}\n");
    }
    std::fs::write(out.join("samples.jsonl"), samples)?;
    tuning.save(&out, &policy_dir)?;

    ctx.metric("accuracy_before", acc_before);
    ctx.metric("accuracy_before_stderr", se_before);
    ctx.metric("accuracy_after", acc_after);
    ctx.metric("accuracy_after_stderr", se_after);
    ctx.metric("reward_train_last", rows.iter().rev().find_map(|r| r["reward"].as_f64()));
    ctx.metric("iterations", hyper.steps);
    if generation_s > 0.0 {
        ctx.metric("completions_per_s", completions / generation_s);
        ctx.metric("generated_tokens_per_s", generated / generation_s);
        ctx.metric("generation_share", generation_s / (generation_s + training_s));
    }
    ctx.metric("wall_seconds", started.elapsed().as_secs_f64());
    Ok(Ended::Finished(trained))
}

/// The models GRPO runs.
struct Models<'a> {
    /// Trained.
    policy: &'a Gpt,
    /// The frozen input policy.
    reference: &'a Gpt,
    encoder: &'a Encoder<'a>,
}

impl Models<'_> {
    /// Each completion's text, up to `<|endoftext|>`.
    fn texts(&self, ids: &[Vec<i64>]) -> Result<Vec<String>> {
        ids.iter().map(|c| self.encoder.decode(c)).collect()
    }
}

/// The held-out prompts' completions (`eval_samples` each, the same seeds
/// before and after) and each prompt's accuracy: the share that is correct.
struct HeldOut {
    /// Each prompt's first completion.
    texts: Vec<String>,
    correct: Vec<f64>,
}

impl HeldOut {
    fn measure(gpt: &Gpt, m: &Models, prompts: &Prompts, scorer: &Scorer, p: &Params) -> Result<HeldOut> {
        let n = if p.eval_temperature > 0.0 { p.eval_samples } else { 1 };
        let eot = m.encoder.eot;
        let sampling = |c: usize| Sampling {
            max_tokens: p.max_new_tokens,
            temperature: p.eval_temperature,
            top_k: None,
            top_p: None,
            seed: step_seed(p.train.seed, u64::MAX, c) as u64,
        };
        let ids = generate(gpt, &prompts.ids, (256 / n).max(1), n, sampling, eot)?;
        let texts = m.texts(&ids)?;
        let of: Vec<usize> = (0..ids.len()).map(|i| i / n).collect();
        let (_, correct) = scorer.score(prompts, &of, &ids, &texts)?;
        Ok(HeldOut {
            texts: texts.into_iter().step_by(n).collect(),
            correct: correct.chunks(n).map(|c| c.iter().filter(|&&ok| ok).count() as f64 / n as f64).collect(),
        })
    }

    fn row(&self) -> Map<String, Value> {
        let (accuracy, stderr) = mean_stderr(&self.correct);
        Map::from_iter([("val_accuracy".into(), json!(accuracy)), ("val_accuracy_stderr".into(), json!(stderr))])
    }
}

/// GRPO as an [`Objective`] of the shared loop: each step is an iteration
/// (a generation batch, then `iterations` updates on it).
struct GrpoTraining<'a> {
    m: &'a Models<'a>,
    p: &'a Params,
    train: &'a Prompts,
    held_out: &'a Prompts,
    scorer: &'a Scorer<'a>,
    before: HeldOut,
    after: Option<HeldOut>,
    /// This run's seconds generating and training, completions and tokens generated.
    timing: [f64; 4],
}

/// A generation batch on the grid of [`pad`] (position `t` of a row holds
/// what concerns its target `y[t]`), with what the updates need of it.
struct Generation {
    batch: Padded,
    /// 1 at completion tokens.
    mask: Tensor,
    /// Each row's advantage on every token [N, T] (0 outside the mask).
    advantages: Tensor,
    /// The policy's (sampling distribution's) and the reference's
    /// log-probabilities [N, T], without gradients.
    logp: Tensor,
    ref_logp: Tensor,
    /// Completion tokens of the whole batch (DAPO's denominator).
    tokens: f64,
    /// The sampling policy's mean entropy over those tokens.
    entropy: f64,
}

impl Objective for GrpoTraining<'_> {
    fn step(&mut self, iteration: u64, update: &mut Update) -> Result<Map<String, Value>> {
        let (m, p) = (self.m, self.p);
        let started = Instant::now();
        let (micro, g) = (p.train.batch_size, p.group);
        let prompts_hyper = Hyper { batch_size: micro * p.train.grad_accum, grad_accum: 1, ..p.train.clone() };
        let chosen = batch_indices(self.train.ids.len(), &prompts_hyper, iteration, 0);
        let prompt_ids: Vec<Vec<i64>> = chosen.iter().map(|&i| self.train.ids[i].clone()).collect();
        let sampling = |chunk: usize| Sampling {
            max_tokens: p.max_new_tokens,
            temperature: p.temperature,
            top_k: None,
            top_p: None,
            seed: step_seed(p.train.seed, iteration, chunk) as u64,
        };
        // [prompt 0 × G, prompt 1 × G, …], a micro-batch's prompts at a time.
        let completions = generate(m.policy, &prompt_ids, micro, g, sampling, m.encoder.eot)?;
        let generation_seconds = started.elapsed().as_secs_f64();
        let texts = m.texts(&completions)?;
        let of: Vec<usize> = (0..completions.len()).map(|i| chosen[i / g]).collect();
        let (rewards, correct) = self.scorer.score(self.train, &of, &completions, &texts)?;
        let advantages = group_advantages(&rewards, g, p.scale_rewards);
        let training = Instant::now();
        let generation = self.grid(&prompt_ids, &completions, &advantages)?;
        let rows = micro * g;
        let mut sums = [0.0; 2]; // clipped tokens, tokens
        let mut row = Map::new();
        for _ in 0..p.iterations {
            row = update.apply(p.train.grad_accum, |k, scale| {
                let (loss, clipped, tokens) = self.micro_step(&generation, k * rows, rows, scale);
                sums[0] += clipped;
                sums[1] += tokens;
                Ok(loss)
            })?;
        }
        let sums = ranks::sum(&sums)?;
        let training_seconds = training.elapsed().as_secs_f64();
        let kl = tch::no_grad(|| masked_mean(&kl_k3(&generation.logp, &generation.ref_logp), &generation.mask).double_value(&[]));
        let generated: usize = completions.iter().map(Vec::len).sum();
        let group_std: Vec<f64> = rewards.chunks(g).map(|r| mean_stderr(r).1 * (r.len() as f64).sqrt()).collect();
        for (k, v) in [
            ("reward", json!(mean(&rewards))),
            ("reward_std", json!(mean(&group_std))),
            ("accuracy", json!(correct.iter().filter(|&&c| c).count() as f64 / correct.len() as f64)),
            ("kl", json!(kl)),
            ("clip_fraction", json!(sums[0] / sums[1].max(1.0))),
            ("entropy", json!(generation.entropy)),
            ("completion_length", json!(generated as f64 / completions.len() as f64)),
            ("generation_seconds", json!(generation_seconds)),
            ("training_seconds", json!(training_seconds)),
        ] {
            row.insert(k.into(), v);
        }
        let t = &mut self.timing;
        *t = [t[0] + generation_seconds, t[1] + training_seconds, t[2] + completions.len() as f64, t[3] + generated as f64];
        Ok(row)
    }

    /// The held-out accuracy: the reference's before, the policy's after.
    fn evaluate(&mut self, step: u64) -> Result<Map<String, Value>> {
        if step == 0 {
            return Ok(self.before.row());
        }
        let after = HeldOut::measure(self.m.policy, self.m, self.held_out, self.scorer, self.p)?;
        let row = after.row();
        self.after = Some(after);
        Ok(row)
    }
}

impl GrpoTraining<'_> {
    /// The generation batch as training rows, with the log-probabilities of
    /// the policy that sampled it and of the reference.
    fn grid(&self, prompts: &[Vec<i64>], completions: &[Vec<i64>], advantages: &[f64]) -> Result<Generation> {
        let (m, p) = (self.m, self.p);
        let sequences: Vec<Sequence> = completions.iter().enumerate().map(|(i, c)| Sequence::new(&prompts[i / p.group], c)).collect();
        let batch = pad(&sequences, m.encoder.eot, m.policy.device());
        let mask = batch.mask();
        let advantages = Tensor::from_slice(advantages).to_kind(Kind::Float).to_device(mask.device()).view([-1, 1]) * &mask;
        let (logp, ref_logp, mut entropy_sum) = (mask.zeros_like(), mask.zeros_like(), 0.0);
        tch::no_grad(|| {
            let rows = p.train.batch_size * p.group;
            // Across ranks, each computes its rows of every micro-batch.
            for chunk in (0..sequences.len()).step_by(rows) {
                let (start, end) = ranks::rows(rows.min(sequences.len() - chunk));
                if start == end {
                    continue;
                }
                let take = |t: &Tensor| t.narrow(0, (chunk + start) as i64, (end - start) as i64);
                let (x, y, chunk_mask) = (take(&batch.x), take(&batch.y), take(&mask));
                let logits = m.policy.forward(&x, false) / p.temperature;
                take(&logp).copy_(&token_logprobs(&logits, &y));
                entropy_sum += (entropy(&logits, &chunk_mask) * chunk_mask.sum(Kind::Float)).double_value(&[]);
                take(&ref_logp).copy_(&token_logprobs(&(m.reference.forward(&x, false) / p.temperature), &y));
            }
        });
        ranks::merge(&logp)?;
        ranks::merge(&ref_logp)?;
        let entropy_sum = ranks::sum(&[entropy_sum])?[0];
        let tokens = mask.sum(Kind::Double).double_value(&[]);
        Ok(Generation { batch, mask, advantages, logp, ref_logp, tokens, entropy: entropy_sum / tokens.max(1.0) })
    }

    /// Forward and backward over rows `start..start + n` with the loss's
    /// share × `scale`; returns that share and the clipped and all
    /// completion tokens. Across ranks, each takes its slice of the rows,
    /// its loss weighted by its share of them.
    fn micro_step(&self, gen: &Generation, start: usize, n: usize, scale: f64) -> (f64, f64, f64) {
        let (m, p) = (self.m, self.p);
        let n = n.min(gen.batch.lengths.len() - start);
        let (first, end) = ranks::rows(n);
        let (start, n, scale) = (start + first, end - first, scale * (end - first) as f64 / n as f64);
        // Only as wide as the longest of these rows.
        let width = gen.batch.lengths[start..start + n].iter().copied().max().expect("a micro-batch has rows");
        let take = |t: &Tensor| t.narrow(0, start as i64, n as i64).narrow(1, 0, width);
        let (x, y, mask) = (take(&gen.batch.x), take(&gen.batch.y), take(&gen.mask));
        let mut clipped_tokens = 0.0;
        let loss = m.policy.backward(&x, false, |hidden| {
            let logp = token_logprobs(&(m.policy.logits(hidden) / p.temperature), &y);
            // One update per generation: the ratio is 1 (TRL detaches, too).
            let old = if p.iterations == 1 { logp.detach() } else { take(&gen.logp) };
            let (mut per_token, clipped) =
                clipped_surrogate(&logp, &old, &take(&gen.advantages), p.epsilon, p.epsilon_high.unwrap_or(p.epsilon));
            if p.beta > 0.0 {
                per_token += kl_k3(&logp, &take(&gen.ref_logp)) * p.beta;
            }
            clipped_tokens = (clipped * &mask).sum(Kind::Double).double_value(&[]);
            reduce(&per_token, &mask, p.loss_type, scale, p.max_new_tokens, gen.tokens)
        });
        (loss.double_value(&[]), clipped_tokens, mask.sum(Kind::Double).double_value(&[]))
    }
}

/// `group` completions of each of `prompts` ([`generate_groups`]) in chunks
/// of `per_chunk` prompts, chunk `c` with `sampling(c)`. Across ranks, each
/// samples its prompts of every chunk with the seeds their rows have in the
/// whole chunk, and every rank gets all.
fn generate(
    gpt: &Gpt,
    prompts: &[Vec<i64>],
    per_chunk: usize,
    group: usize,
    sampling: impl Fn(usize) -> Sampling,
    eot: i64,
) -> Result<Vec<Vec<i64>>> {
    let mut completions = vec![Vec::new(); prompts.len() * group];
    tch::no_grad(|| {
        for (c, chunk) in prompts.chunks(per_chunk).enumerate() {
            let (start, end) = ranks::rows(chunk.len());
            if start == end {
                continue;
            }
            let s = sampling(c);
            let s = Sampling { seed: s.seed.wrapping_add((start * group) as u64), ..s };
            let first = (c * per_chunk + start) * group;
            for (k, completion) in generate_groups(gpt, &chunk[start..end], group, &s, Some(eot)).into_iter().enumerate() {
                completions[first + k] = completion;
            }
        }
    });
    ranks::merge_lists(completions)
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::formats::model::save_model;
    use crate::testing::{build, corpus, ctx, metric_rows, tiny, tokenizer_artifact, torch_rng, write_docs};

    /// A project dir with a tiny policy and 60 prompts whose answer is right
    /// when the completion holds an `e` (the `answer` regex finds it).
    fn setup(dir: &Path) -> Vec<(&'static str, PathBuf)> {
        write_docs(&dir.join("docs"), "corpus", &corpus("tinyshakespeare.txt")[..20_000]);
        let tok = dir.join("tok");
        tokenizer_artifact(&dir.join("docs"), &tok, json!({"vocab_size": 300}));
        let config = tiny("gpt2", json!({"vocab_size": 300, "context": 32, "d_model": 32}));
        let (vs, _) = build(&config, 5);
        let policy = dir.join("policy");
        std::fs::create_dir_all(&policy).unwrap();
        save_model(&policy, &vs, &config, &tok).unwrap();
        let records = |range: std::ops::Range<usize>| -> String {
            range.map(|i| format!("{}\n", json!({"instruction": format!("Speak of {i} kings."), "output": "e"}))).collect()
        };
        std::fs::write(dir.join("train.jsonl"), records(0..40)).unwrap();
        std::fs::write(dir.join("test.jsonl"), records(40..60)).unwrap();
        vec![("policy", policy)]
    }

    fn params() -> Params {
        crate::params::<Grpo>(json!({
            "data": "train.jsonl", "eval_data": "test.jsonl", "template": "Q: {instruction}\nA:", "answer": "(e)",
            "max_new_tokens": 6, "group": 4, "iterations": 2, "epsilon_high": 0.28, "beta": 0.01,
            "train": {"steps": 8, "batch_size": 2, "grad_accum": 2, "lr": 3e-3},
            "checkpoint_every": 2, "eval_every": 8, "log_every": 100, "samples": 2,
        }))
        .unwrap()
    }

    #[test]
    fn grpo_raises_the_verifiable_reward_and_writes_a_model_artifact() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let inputs = setup(tmp.path());
        let mut c = ctx(tmp.path(), "grpo", &inputs);
        assert!(matches!(grpo(&params(), &mut c, None).unwrap(), Ended::Finished(_)));
        let m = c.metrics().clone();
        let (before, after) = (m["accuracy_before"].as_f64().unwrap(), m["accuracy_after"].as_f64().unwrap());
        assert!(after > before + 0.2, "held-out accuracy {before} → {after}");
        assert!(m["accuracy_after_stderr"].is_f64() && m["completions_per_s"].as_f64().unwrap() > 0.0, "{m:?}");
        let rows = metric_rows(&c.out);
        assert_eq!(rows.len(), 8 + 2, "a row per iteration, and the held-out rows before and after");
        for key in ["reward", "reward_std", "accuracy", "kl", "clip_fraction", "entropy", "completion_length", "loss", "lr"] {
            assert!(rows[1][key].as_f64().is_some(), "{key} missing from {}", rows[1]);
        }
        // The second update on a generation batch moves the ratio: some tokens clip.
        assert!(rows[1..9].iter().any(|r| r["clip_fraction"].as_f64().unwrap() > 0.0));
        assert!(rows[1]["kl"].as_f64().unwrap().abs() < 1e-6, "the first batch is sampled by the reference: {}", rows[1]);
        assert_eq!(&std::fs::read(c.out.join("metrics.png")).unwrap()[1..4], b"PNG");
        let samples: Vec<Value> =
            std::fs::read_to_string(c.out.join("samples.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0]["reference"], "e");
        let trained = ModelArtifact::open(&c.out, tch::Device::Cpu).unwrap();
        assert_eq!(trained.gpt.config().context, 32);
    }

    #[test]
    fn resumed_run_repeats_the_uninterrupted_one() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let inputs = setup(tmp.path());
        let p = Params { train: Hyper { steps: 5, ..params().train }, ..params() };
        let mut straight = ctx(tmp.path(), "straight", &inputs);
        assert!(matches!(grpo(&p, &mut straight, None).unwrap(), Ended::Finished(_)));
        let mut resumed = ctx(tmp.path(), "resumed", &inputs);
        // Stopped after iteration 3: the checkpoint of 2 is the latest.
        assert!(matches!(grpo(&p, &mut resumed, Some(3)).unwrap(), Ended::Stopped(3)));
        assert!(matches!(grpo(&p, &mut resumed, None).unwrap(), Ended::Finished(_)));
        let weights = |c: &StageCtx| std::fs::read(c.out.join("model.safetensors")).unwrap();
        assert!(weights(&straight) == weights(&resumed), "resumed weights differ");
        assert_eq!(metric_rows(&straight.out), metric_rows(&resumed.out));
    }

    /// The unit-test reward runs prompt + completion + the record's test
    /// in the sandbox; only a passing program earns it, and it counts
    /// toward accuracy.
    #[test]
    fn python_tests_reward_passing_programs() {
        let scratch = tempfile::tempdir().unwrap();
        let sandbox = match Sandbox::new("bwrap", scratch.path()) {
            Ok(sandbox) => sandbox,
            Err(e) if std::env::var_os("LLMFLOW_PYTHON").is_none() => {
                crate::testing::skip(&format!("{e:#}"));
                return;
            }
            Err(e) => panic!("{e:#}"),
        };
        let rewards: Vec<Reward> = serde_json::from_value(json!([
            {"type": "python_tests", "confirm_run_unsafe_code": true, "timeout_s": 2},
            {"type": "format", "pattern": "\\s*return .*", "weight": 0.5},
        ]))
        .unwrap();
        let problem = Problem { instruction: String::new(), input: String::new(), output: String::new(), test: "assert f(2) == 4".into() };
        let prompts = Prompts { problems: vec![problem], text: vec!["def f(x):\n".into()], ids: vec![vec![1]] };
        let formats = vec![None, Some(Regex::new("^(?:\\s*return .*)$").unwrap())];
        let scorer = Scorer { rewards: &rewards, answer: None, formats, sandbox: Some(sandbox), reward_model: None, eot: 0 };
        let texts = ["    return x * 2", "    return x + 3", "    while True: pass"].map(String::from);
        let (totals, correct) = scorer.score(&prompts, &[0, 0, 0], &[vec![], vec![], vec![]], &texts).unwrap();
        assert_eq!(totals, [1.5, 0.5, 0.0]);
        assert_eq!(correct, [true, false, false]);
    }

    #[test]
    fn params_are_checked() {
        let ok = Params::default();
        let policy = ["policy".to_string()];
        assert!(Grpo::check(&ok, &policy).is_ok());
        let path = |p: &Params, inputs: &[String]| Grpo::check(p, inputs).unwrap_err().path;
        assert_eq!(path(&ok, &["model".into()]), Vec::<String>::new());
        let with = |rewards: Value| Params { rewards: serde_json::from_value(rewards).unwrap(), ..Params::default() };
        assert_eq!(path(&with(json!([{"type": "format", "pattern": "("}])), &policy), ["rewards", "0", "pattern"]);
        assert_eq!(path(&with(json!([{"type": "python_tests"}])), &policy), ["rewards", "0", "confirm_run_unsafe_code"]);
        assert_eq!(path(&with(json!([{"type": "reward_model"}])), &policy), ["rewards"], "a reward model needs its input");
        assert!(Grpo::check(&with(json!([{"type": "reward_model"}])), &["policy".into(), "reward".into()]).is_ok());
        assert_eq!(path(&Params { answer: Some("[".into()), ..Params::default() }, &policy), ["answer"]);
        let out_of_bounds = |v: Value| crate::params::<Grpo>(v).unwrap_err().path;
        assert_eq!(out_of_bounds(json!({"group": 1})), ["group"]);
        assert_eq!(out_of_bounds(json!({"temperature": 0.0})), ["temperature"]);
        assert!(crate::params::<Grpo>(json!({"loss_type": "ppo"})).is_err());
        assert_eq!(crate::params::<Grpo>(json!({"loss_type": "dr_grpo"})).unwrap().loss_type, LossType::DrGrpo);
    }
}
