//! The training loop every training stage runs: learning-rate schedule,
//! gradient accumulation, spike guard, clipping, the optimizer, periodic evaluation,
//! metrics, checkpoints and resume. A stage supplies only what differs, as an
//! [`Objective`]: the loss of a micro-batch and its evaluation.
//!
//! A step of the loop is one optimizer update by default. Reinforcement
//! learning extends it by overriding [`Objective::step`]: collect a rollout,
//! then make as many updates as the method asks through [`Update::apply`]
//! (PPO: epochs × minibatches), each with the same accumulation, guard,
//! clipping and the optimizer as a supervised update. Everything else (schedule per
//! step, checkpoints, resume, metrics, stopping) stays the loop's.
//!
//! Resume is exact on the CPU: a checkpoint holds every variable of the
//! VarStore, the optimizer state, the step, the spike guard and the task's own
//! state (a data position), and dropout is reseeded from (seed, step,
//! micro-batch) before every micro-batch. A task whose batches are a function
//! of (step, micro-batch), like [`batch_indices`], needs no state at all.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::nn;

use super::{plot, step_seed, Checkpoints, Hyper, MetricsLog, Optimizer, SpikeGuard, Training};
use crate::data::rng::shuffled;
use crate::dist::{self, World};
use crate::StageCtx;

/// What a stage trains: the part of the loop that is not shared.
pub trait Objective {
    /// Runs forward and backward on micro-batch `micro` of update `step`
    /// (0-based) with the loss multiplied by `scale` (1 / grad_accum), so the
    /// gradients add up to the update's mean; returns the scaled loss.
    /// An objective that makes its updates in its own [`Objective::step`]
    /// needs no `backward`.
    fn backward(&mut self, _step: u64, _micro: usize, _scale: f64) -> Result<f64> {
        anyhow::bail!("this objective makes its updates in its own `step`")
    }

    /// Step `step` (0-based) of the loop; returns the columns it adds to the
    /// step's row of `metrics.jsonl`. By default one update of `grad_accum`
    /// micro-batches through [`Objective::backward`].
    fn step(&mut self, step: u64, update: &mut Update) -> Result<Map<String, Value>> {
        update.apply(update.grad_accum, |micro, scale| self.backward(step, micro, scale))
    }

    /// Validation metrics after `step` updates, written as one row of
    /// `metrics.jsonl` (e.g. `val_loss`).
    fn evaluate(&mut self, step: u64) -> Result<Map<String, Value>>;

    /// State beyond the weights that a resumed run needs (a loader position).
    fn state(&self) -> Value {
        Value::Null
    }

    fn restore(&mut self, _state: Value) -> Result<()> {
        Ok(())
    }
}

/// Optimizer updates within a step of the loop; see [`Objective::step`].
pub struct Update<'a> {
    opt: &'a mut Optimizer,
    guard: &'a mut SpikeGuard,
    skipped: &'a mut u64,
    spike_factor: f64,
    grad_clip: f64,
    seed: u64,
    /// The step being trained (0-based) and its learning rate.
    pub step: u64,
    pub lr: f64,
    /// Micro-batches per update (`train.grad_accum`).
    pub grad_accum: usize,
    name: &'a str,
}

impl Update<'_> {
    /// One optimizer update: `micro_batches` calls of `backward(micro,
    /// scale)`, each returning its loss × `scale` (1 / `micro_batches`) after
    /// adding its gradients; dropout is seeded from (seed, step, micro)
    /// before each. Then the spike guard, clipping and the optimizer. Returns `loss`
    /// and `grad_norm`, or `skipped` for an update the guard refused.
    pub fn apply(&mut self, micro_batches: usize, mut backward: impl FnMut(usize, f64) -> Result<f64>) -> Result<Map<String, Value>> {
        self.opt.zero_grad();
        let world = dist::world();
        let mut loss = 0.0;
        for micro in 0..micro_batches {
            // Each rank draws its own dropout masks, the same on every run.
            tch::manual_seed(step_seed(self.seed, self.step, micro * world.size + world.rank));
            loss += backward(micro, 1.0 / micro_batches as f64)?;
        }
        // Each rank's loss is its slice's share: the sum is the batch's, and
        // every rank makes the same decision on it.
        let loss = world.sum(&[loss])?[0];
        self.opt.reduce_gradients()?;
        let mut row = Map::from_iter([("loss".to_string(), json!(loss))]);
        if self.guard.accept(loss, self.spike_factor) {
            let norm = self.opt.clip_grad_norm(self.grad_clip)?;
            self.opt.step(self.lr)?;
            row.insert("grad_norm".into(), json!(norm));
        } else {
            *self.skipped += 1;
            row.insert("skipped".into(), json!(true));
            eprintln!(
                "{}: step {}: loss {loss:.4} is a spike (running mean {:.4}); update skipped",
                self.name,
                self.step + 1,
                self.guard.mean()
            );
        }
        Ok(row)
    }
}

/// The loop's settings: a stage's `train` table and [`Training`] params,
/// and what the stage itself says.
pub struct Trainer<'a> {
    /// The stage kind, prefixing log lines.
    pub name: &'a str,
    pub hyper: &'a Hyper,
    pub training: &'a Training,
    /// Tokens one update trains on, for the `tokens` (so far) and
    /// `tokens_per_s` columns; `None` when updates differ in size.
    pub tokens_per_step: Option<u64>,
    /// End the run after this step as if killed there (see [`STOP_ENV`]).
    pub stop_after: Option<u64>,
    /// Evaluate before the first step too (a fresh run), as the row of step
    /// 0: where the curve starts.
    pub evaluate_first: bool,
}

impl<'a> Trainer<'a> {
    /// The loop of a stage `name` with these settings: updates of no fixed
    /// size in tokens, no evaluation before the first; a stage changes what
    /// differs.
    pub fn new(name: &'a str, hyper: &'a Hyper, training: &'a Training, stop_after: Option<u64>) -> Self {
        Trainer { name, hyper, training, tokens_per_step: None, stop_after, evaluate_first: false }
    }
}

/// The environment variable that stops a training stage right after a given
/// step, as if killed there, to exercise resume.
pub const STOP_ENV: &str = "LLMFLOW_STOP_AFTER_STEP";

/// The environment variable `RANK@STEP` that kills rank RANK of a training
/// stage with SIGKILL right after step STEP, to exercise a rank's death;
/// `RANK@STEP:stop` stops it (SIGSTOP) instead: a rank that hangs.
pub const KILL_ENV: &str = "LLMFLOW_KILL_RANK";

/// (rank, step, signal) of [`KILL_ENV`], if set.
fn kill_after_env() -> Result<Option<(usize, u64, libc::c_int)>> {
    let Ok(v) = std::env::var(KILL_ENV) else { return Ok(None) };
    let (at, signal) = match v.strip_suffix(":stop") {
        Some(at) => (at, libc::SIGSTOP),
        None => (v.as_str(), libc::SIGKILL),
    };
    let parsed = at.split_once('@').and_then(|(rank, step)| Some((rank.parse().ok()?, step.parse().ok()?, signal)));
    parsed.map(Some).with_context(|| format!("{KILL_ENV}={v}: not RANK@STEP or RANK@STEP:stop"))
}

/// The step [`STOP_ENV`] asks to stop after, if set.
fn stop_after_env() -> Result<Option<u64>> {
    match std::env::var(STOP_ENV) {
        Ok(v) => Ok(Some(v.parse().with_context(|| format!("{STOP_ENV}={v}: not a step number"))?)),
        Err(_) => Ok(None),
    }
}

/// How a training run ended, every training stage's and the loop's.
#[derive(Debug)]
pub enum Ended {
    Finished(Trained),
    /// Stopped after this step, as [`Trainer::stop_after`] asked.
    Stopped(u64),
}

impl Ended {
    /// The finished run; a stopped one is the error a stage reports, telling
    /// the user to run again.
    pub fn finished(self) -> Result<Trained> {
        match self {
            Ended::Finished(trained) => Ok(trained),
            Ended::Stopped(step) => {
                anyhow::bail!("stopped after step {step} as {STOP_ENV} asks; run again to resume from the last checkpoint")
            }
        }
    }
}

/// Runs a training stage, `stage(stop_after)`, stopping after the step
/// [`STOP_ENV`] names: every training kind's `Stage::run`.
pub fn run_stage(stage: impl FnOnce(Option<u64>) -> Result<Ended>) -> Result<()> {
    stage(stop_after_env()?)?.finished().map(drop)
}

/// A finished run.
#[derive(Debug)]
pub struct Trained {
    /// `metrics.jsonl` in the work dir: a row per update and per evaluation.
    pub log: MetricsLog,
    /// The metrics of the evaluation after the last step.
    pub last_eval: Map<String, Value>,
    /// Updates the spike guard skipped.
    pub skipped: u64,
    /// Training throughput of this run's own steps (a resumed run has not
    /// timed the others); 0 without `tokens_per_step`.
    pub tokens_per_s: f64,
    /// Bytes of optimizer state this rank holds.
    pub optimizer_bytes: u64,
}

/// What a checkpoint's `state.json` holds besides the tensors.
#[derive(Serialize, Deserialize)]
struct State {
    step: u64,
    guard: SpikeGuard,
    skipped: u64,
    task: Value,
}

const MODEL_FILE: &str = "model.safetensors";
const STATE_FILE: &str = "state.json";
pub const METRICS_FILE: &str = "metrics.jsonl";

impl Trainer<'_> {
    /// Trains the requires-grad variables of `vs` on `task`, resuming from the
    /// latest checkpoint in the stage's work dir.
    pub fn run(&self, ctx: &mut StageCtx, vs: &mut nn::VarStore, task: &mut impl Objective) -> Result<Ended> {
        let (hyper, training, name) = (self.hyper, self.training, self.name);
        let world = dist::world();
        let mut opt = Optimizer::new(vs, hyper, world, training.zero());
        if let Some(summary) = opt.summary().filter(|_| world.is_first()) {
            eprintln!("{name}: {summary}");
        }
        let checkpoints = Checkpoints::open(&ctx.work.join("checkpoints"), training.keep_checkpoints)?;
        let mut state = State { step: 0, guard: SpikeGuard::default(), skipped: 0, task: Value::Null };
        if let Some((step, dir)) = checkpoints.latest()? {
            vs.load(dir.join(MODEL_FILE)).with_context(|| format!("cannot load {}", dir.join(MODEL_FILE).display()))?;
            let moments = dir.join(opt.file_name());
            ensure!(
                moments.exists(),
                "{}: no {}; the checkpoint was written with other `processes` or `zero`: run with those to resume",
                dir.display(),
                opt.file_name()
            );
            opt.load(&moments)?;
            state = serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE))?)?;
            ensure!(state.step == step, "{}: state is for step {}", dir.display(), state.step);
            task.restore(state.task.take())?;
            if world.is_first() {
                eprintln!("{name}: resuming from the checkpoint of step {step}");
            }
        }
        if let Some(group) = world.group() {
            // Every rank starts from rank 0's weights, as PyTorch's DDP does.
            for (_, var) in super::sorted_variables(vs) {
                group.broadcast(&var.detach(), 0)?;
            }
        }
        // Only the first rank keeps the stage's log; the others' stay beside it.
        let log_path = match world.rank {
            0 => ctx.work.join(METRICS_FILE),
            r => ctx.work.join(format!("rank-{r}")).join(METRICS_FILE),
        };
        std::fs::create_dir_all(log_path.parent().expect("in the work dir"))?;
        let mut log = MetricsLog::open(&log_path, state.step)?;
        let kill = kill_after_env()?.filter(|&(rank, ..)| rank == world.rank);
        let (mut timed_tokens, mut timed_seconds) = (0u64, 0.0);
        let mut last_eval = Map::new();
        if self.evaluate_first && state.step == 0 {
            let mut row = Map::from_iter([("step".to_string(), json!(0))]);
            row.extend(task.evaluate(0)?);
            log.write(&Value::Object(row))?;
        }
        while state.step < hyper.steps {
            let started = Instant::now();
            let lr = hyper.lr_at(state.step);
            let mut update = Update {
                opt: &mut opt,
                guard: &mut state.guard,
                skipped: &mut state.skipped,
                spike_factor: training.spike_factor,
                grad_clip: hyper.grad_clip,
                seed: hyper.seed,
                step: state.step,
                lr,
                grad_accum: hyper.grad_accum,
                name,
            };
            let columns = task.step(state.step, &mut update)?;
            let mut row = Map::from_iter([("step".to_string(), json!(state.step + 1))]);
            row.extend(columns);
            row.insert("lr".into(), json!(lr));
            state.step += 1;
            let seconds = started.elapsed().as_secs_f64();
            if let Some(tokens) = self.tokens_per_step {
                (timed_tokens, timed_seconds) = (timed_tokens + tokens, timed_seconds + seconds);
                row.insert("tokens".into(), json!(state.step * tokens));
                row.insert("tokens_per_s".into(), json!(tokens as f64 / seconds));
            }
            let last = state.step == hyper.steps;
            if (state.step.is_multiple_of(training.log_every.max(1)) || last) && world.is_first() {
                eprintln!("step {:>6}/{} | {}", state.step, hyper.steps, shown(&row));
            }
            log.write(&Value::Object(row))?;
            if state.step.is_multiple_of(training.eval_every) || last {
                last_eval = task.evaluate(state.step)?;
                if world.is_first() {
                    eprintln!("step {:>6}/{} | {}", state.step, hyper.steps, shown(&last_eval));
                }
                let mut row = Map::from_iter([("step".to_string(), json!(state.step))]);
                row.extend(last_eval.clone());
                log.write(&Value::Object(row))?;
            }
            ctx.progress(state.step, hyper.steps, "steps");
            if training.checkpoint_every > 0 && state.step.is_multiple_of(training.checkpoint_every) && !last {
                state.task = task.state();
                save(&checkpoints, world, vs, &opt, &state)?;
            }
            if self.stop_after == Some(state.step) && !last {
                return Ok(Ended::Stopped(state.step));
            }
            if let Some((_, _, signal)) = kill.filter(|&(_, step, _)| step == state.step) {
                // SAFETY: kill on this very process.
                unsafe { libc::kill(libc::getpid(), signal) };
            }
        }
        let tokens_per_s = if timed_seconds > 0.0 { timed_tokens as f64 / timed_seconds } else { 0.0 };
        let optimizer_bytes = opt.state_bytes();
        Ok(Ended::Finished(Trained { log, last_eval, skipped: state.skipped, tokens_per_s, optimizer_bytes }))
    }
}

/// Writes checkpoint `state.step`. The first rank writes the weights and the
/// state; the moments are its too, or under ZeRO-1 each rank's share is its
/// own file, written between two barriers while the first rank waits to
/// complete the checkpoint.
fn save(checkpoints: &Checkpoints, world: &World, vs: &nn::VarStore, opt: &Optimizer, state: &State) -> Result<()> {
    if world.is_first() {
        checkpoints.save(state.step, |dir| {
            vs.save(dir.join(MODEL_FILE))?;
            opt.save(&dir.join(opt.file_name()))?;
            std::fs::write(dir.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
            world.barrier()?;
            world.barrier()
        })?;
    } else {
        world.barrier()?;
        if opt.saves() {
            opt.save(&checkpoints.partial(state.step).join(opt.file_name()))?;
        }
        world.barrier()?;
    }
    Ok(())
}

impl Trained {
    /// Copies `metrics.jsonl` into `out` and draws `loss.png`: the training
    /// and validation loss over the steps, under `title`, the loss in `unit`.
    pub fn write(&self, out: &std::path::Path, title: &str, unit: &str) -> Result<()> {
        self.log.copy_to(out)?;
        let series = self.series()?;
        let y = format!("loss ({unit})");
        let labels = plot::Labels { title, x: "step", y: &y };
        plot::loss_curve(&out.join("loss.png"), labels, &series("loss"), ("validation loss", &series("val_loss")))
    }

    /// Copies `metrics.jsonl` into `out` and draws `metrics.png`: a panel
    /// per (metric, its y axis's name) against the step, named `x`.
    pub fn write_panels(&self, out: &std::path::Path, x: &str, panels: &[(&str, &str)]) -> Result<()> {
        self.log.copy_to(out)?;
        let series = self.series()?;
        let curves: Vec<(plot::Labels, Vec<(f64, f64)>)> =
            panels.iter().map(|&(key, y)| (plot::Labels { title: key, x, y }, series(key))).collect();
        let curves: Vec<(plot::Labels, &[(f64, f64)])> = curves.iter().map(|(labels, points)| (*labels, points.as_slice())).collect();
        plot::panels(&out.join("metrics.png"), &curves, 3)
    }

    /// A metric against the step, from every row that logs it.
    fn series(&self) -> Result<impl Fn(&str) -> Vec<(f64, f64)>> {
        let rows = self.log.rows()?;
        Ok(move |key: &str| rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?))).collect())
    }

    /// The loss of the last update.
    pub fn train_loss(&self) -> Result<Option<f64>> {
        Ok(self.log.rows()?.iter().rev().find_map(|r| r["loss"].as_f64()))
    }
}

/// A row's columns for the log, `step` left out: `loss 2.1034 | lr 1.00e-3 | …`.
fn shown(row: &Map<String, Value>) -> String {
    let short = |v: &Value| match v.as_f64() {
        Some(x) if x != 0.0 && (x.abs() < 1e-2 || x.abs() >= 1e5) => format!("{x:.2e}"),
        Some(x) => format!("{x:.4}"),
        None => v.to_string(),
    };
    row.iter().filter(|(k, _)| *k != "step").map(|(k, v)| format!("{k} {}", short(v))).collect::<Vec<_>>().join(" | ")
}

/// Example indices of micro-batch `micro` of update `step` over `n` examples:
/// consecutive slices of a fresh seeded permutation each epoch. A function of
/// its arguments only, so a resumed run draws the same batches.
pub fn batch_indices(n: usize, hyper: &Hyper, step: u64, micro: usize) -> Vec<usize> {
    assert!(n > 0, "no examples to train on");
    let first = (step as usize * hyper.grad_accum + micro) * hyper.batch_size;
    let mut epoch_order: Option<(usize, Vec<usize>)> = None;
    (first..first + hyper.batch_size)
        .map(|i| {
            let epoch = i / n;
            if epoch_order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                epoch_order = Some((epoch, shuffled(n, hyper.seed ^ (epoch as u64).wrapping_mul(0x9E37))));
            }
            epoch_order.as_ref().expect("set above").1[i % n]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_each_epoch_once_and_depend_only_on_the_position() {
        let hyper = Hyper { batch_size: 4, grad_accum: 2, ..Default::default() };
        let hyper = &hyper;
        let mut epoch: Vec<usize> = (0..5u64).flat_map(|s| (0..2).flat_map(move |m| batch_indices(10, hyper, s, m))).collect();
        assert_eq!(epoch.len(), 40);
        let second_epoch = epoch.split_off(10);
        let mut first = epoch.clone();
        first.sort_unstable();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        assert_ne!(epoch, second_epoch[..10], "each epoch is shuffled anew");
        assert_eq!(batch_indices(10, hyper, 3, 1), batch_indices(10, hyper, 3, 1));
    }
}
