//! Training-loop pieces shared by the stages that train a model (`pretrain`,
//! and the fine-tuning stages built on it).
//!
//! A training kind says what a row of its data is and what its loss is (an
//! [`trainer::Objective`]); the rest is here, declared once:
//!
//! * [`Training`] ([`params`]): the params every training stage shares,
//!   flattened into its own, with their check and resources;
//!   [`trainer::run_stage`] and [`trainer::Ended`]: a run stopped or
//!   finished, the stop-after step handled in one place.
//! * [`ranks`]: each rank's rows of a batch and the sums over the ranks.
//! * [`Hyper`]: the `train = { ... }` table — steps, batch, learning-rate
//!   schedule, AdamW and clipping settings, seed — with [`Hyper::lr_at`], linear
//!   warmup then cosine decay to `min_lr`.
//! * [`Optimizer`]: AdamW, or Muon for the blocks' matrices ([`muon`]) and
//!   AdamW for the rest, on state tensors this crate owns, so that they can
//!   be checkpointed (libtorch's C++ optimizers keep theirs out of reach);
//!   global-norm gradient clipping.
//! * [`SpikeGuard`]: skips updates whose loss is far above the running mean.
//! * [`Checkpoints`]: numbered checkpoint directories in a stage's work dir,
//!   written atomically, the last K kept.
//! * [`MetricsLog`] and [`plot::loss_curve`]: `metrics.jsonl` that survives a
//!   resume, and its picture.
//! * [`trainer`]: the loop itself, over a stage's [`trainer::Objective`].
//! * [`rl`]: the clipped policy-ratio objective and entropy that the
//!   policy-gradient stages share.
//! * [`replicas`]: a micro-batch split across the CPU cores, one
//!   single-threaded model replica each.
//! * [`finetune`]: what trains of an input model (`trainable`), and the
//!   records a fine-tuning stage reads.
//! * [`last_token`]: a linear head on each sequence's last token (the reward
//!   model's score, the classifier's classes).
//! * [`step_seed`]: the libtorch seed for each micro-batch, which makes
//!   dropout reproducible across a resume without saving libtorch's generator
//!   (tch cannot read it back).

mod checkpoint;
pub mod finetune;
pub mod last_token;
mod metrics;
pub mod muon;
mod optimizer;
pub mod params;
pub mod plot;
pub mod ranks;
pub mod replicas;
pub mod rl;
pub mod trainer;

use anyhow::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use checkpoint::Checkpoints;
pub use metrics::MetricsLog;
pub use optimizer::{decays, Optimizer};
pub use params::{Training, MERGED, VOLATILE};

use crate::model::ModelConfig;
use crate::ParamError;

/// The variables of `vs` that train (`requires_grad`), in name order: the
/// order in which the optimizer and the model replicas take them, so that
/// sums over them add up the same way on every run.
pub fn trainable(vs: &tch::nn::VarStore) -> Vec<(String, tch::Tensor)> {
    sorted_variables(vs).into_iter().filter(|(_, t)| t.requires_grad()).collect()
}

/// Every variable of `vs`, in name order: the same on every run and rank.
pub fn sorted_variables(vs: &tch::nn::VarStore) -> Vec<(String, tch::Tensor)> {
    let mut vars: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Optimization settings: the `train` table of a training stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Hyper {
    /// Optimizer updates.
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub steps: u64,
    /// Sequences per micro-batch.
    #[schemars(range(min = 1, max = 1_048_576))]
    pub batch_size: usize,
    /// Micro-batches whose gradients add up to one update.
    #[schemars(range(min = 1, max = 65_536))]
    pub grad_accum: usize,
    /// Peak learning rate, reached at the end of warmup.
    #[schemars(range(max = 10), extend("exclusiveMinimum" = 0))]
    pub lr: f64,
    /// Learning rate at the last step.
    #[schemars(range(min = 0, max = 10))]
    pub min_lr: f64,
    /// Steps of linear warmup.
    #[schemars(range(max = 1_000_000_000))]
    pub warmup: u64,
    /// Decoupled weight decay, applied to the weights [`decays`] picks.
    #[schemars(range(min = 0, max = 10))]
    pub weight_decay: f64,
    /// AdamW's β1, the decay of the gradient mean.
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 1))]
    pub beta1: f64,
    /// AdamW's β2, the decay of the squared-gradient mean.
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 1))]
    pub beta2: f64,
    /// AdamW's ε, added to the root of the squared-gradient mean.
    #[schemars(range(max = 1), extend("exclusiveMinimum" = 0))]
    pub eps: f64,
    /// Largest global gradient norm; 0 disables clipping.
    #[schemars(range(min = 0, max = 1_000_000))]
    pub grad_clip: f64,
    /// Seeds the initial weights, the data order and dropout.
    pub seed: u64,
    /// `adamw`, or `muon`: Muon for the blocks' matrices, AdamW (the
    /// settings above) for the rest.
    #[serde(skip_serializing_if = "OptimizerName::is_adamw")]
    pub optimizer: OptimizerName,
    /// Muon's settings, with `optimizer = "muon"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub muon: Option<muon::MuonHyper>,
}

/// The `train.optimizer` names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    #[default]
    Adamw,
    Muon,
}

impl OptimizerName {
    // Unset, the name stays out of the params that key a stage: keys from
    // before Muon are unchanged.
    fn is_adamw(&self) -> bool {
        *self == OptimizerName::Adamw
    }
}

impl Default for Hyper {
    fn default() -> Self {
        Hyper {
            steps: 500,
            batch_size: 16,
            grad_accum: 1,
            lr: 2e-3,
            min_lr: 2e-4,
            warmup: 40,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 1337,
            optimizer: OptimizerName::Adamw,
            muon: None,
        }
    }
}

impl Hyper {
    /// Checks what the bounds of single fields cannot; errors name fields
    /// under `table` (e.g. `train`).
    pub fn check(&self, table: &str) -> Result<(), ParamError> {
        if self.min_lr > self.lr {
            return Err(ParamError::new(&[table, "lr"], "`min_lr` must not be above `lr`"));
        }
        if self.muon.is_some() && self.optimizer != OptimizerName::Muon {
            return Err(ParamError::new(&[table, "muon"], "Muon's settings apply with `optimizer = \"muon\"`"));
        }
        Ok(())
    }

    /// The learning rate of update `step` (0-based): linear warmup to `lr`
    /// over `warmup` steps, then a half cosine down to `min_lr` at the last step.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let decay_steps = self.steps.saturating_sub(self.warmup + 1).max(1);
        let progress = ((step - self.warmup) as f64 / decay_steps as f64).min(1.0);
        self.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (self.lr - self.min_lr)
    }

    /// Tokens one update trains on.
    pub fn tokens_per_step(&self, context: i64) -> u64 {
        (self.batch_size * self.grad_accum) as u64 * context as u64
    }
}

/// Bytes training needs: the model state (fp32 weights, gradients and
/// AdamW's two moments, 16 bytes a parameter) and the activations kept for
/// backward (per token and layer about 16·d_model floats for the block's
/// intermediates and 2·n_head·context for the attention scores and
/// probabilities; plus the logits and their gradient).
pub fn memory(config: &ModelConfig, hyper: &Hyper) -> (f64, f64) {
    let rows = hyper.batch_size as f64 * config.context as f64;
    let per_layer = (16 * config.d_model + 2 * config.n_head * config.context) as f64;
    let activations = 4.0 * rows * (config.n_layer as f64 * per_layer + 2.0 * config.vocab_size as f64);
    (16.0 * config.num_params() as f64, activations)
}

/// Fails before training when it would need more memory than the machine
/// has free: libtorch would abort the process, or the kernel kill it,
/// part-way through. A lower bound for stages that hold more than one model
/// (dpo's reference, ppo's reference and value head).
pub fn check_memory(config: &ModelConfig, hyper: &Hyper, device: tch::Device) -> Result<()> {
    let Some(free) = (device == tch::Device::Cpu).then(crate::device::available_memory).flatten() else { return Ok(()) };
    let (state, activations) = memory(config, hyper);
    if state + activations > free as f64 {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        anyhow::bail!(
            "training needs about {:.1} GiB but {:.1} GiB of memory is free: the model (model.n_layer {}, model.d_model {}, vocab {}) \
             takes {:.1} GiB with its gradients and AdamW state, and the activations of train.batch_size {} × model.context {} \
             take {:.1} GiB; lower train.batch_size (raise train.grad_accum to keep the batch) or the model's size",
            gib(state + activations),
            gib(free as f64),
            config.n_layer,
            config.d_model,
            config.vocab_size,
            gib(state),
            hyper.batch_size,
            config.context,
            gib(activations)
        );
    }
    Ok(())
}

/// The libtorch seed for micro-batch `micro` of update `step`: a function of
/// the run's seed and the position only, so a resumed run draws the dropout
/// masks the uninterrupted one would have.
pub fn step_seed(seed: u64, step: u64, micro: usize) -> i64 {
    let h = blake3::hash(&[seed.to_le_bytes(), step.to_le_bytes(), (micro as u64).to_le_bytes()].concat());
    // manual_seed takes an i64; keep it non-negative.
    (u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) >> 1) as i64
}

/// Skips updates whose loss exceeds `factor` × the running mean of accepted
/// losses (an exponential moving average), and non-finite losses always.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpikeGuard {
    /// Stored as bits: JSON floats may not parse back to the same f64, and a
    /// resumed run must make the same decisions.
    mean_bits: u64,
    accepted: u64,
}

impl Default for SpikeGuard {
    fn default() -> Self {
        SpikeGuard { mean_bits: 0f64.to_bits(), accepted: 0 }
    }
}

impl SpikeGuard {
    /// Accepted updates before the guard judges: the mean needs a few samples.
    const WARMUP: u64 = 10;
    const DECAY: f64 = 0.95;

    pub fn mean(&self) -> f64 {
        f64::from_bits(self.mean_bits)
    }

    /// Whether to apply the update of a step with this loss; `factor` 0
    /// accepts every finite loss.
    pub fn accept(&mut self, loss: f64, factor: f64) -> bool {
        if !loss.is_finite() {
            return false;
        }
        if factor > 0.0 && self.accepted >= Self::WARMUP && loss > factor * self.mean() {
            return false;
        }
        let mean = if self.accepted == 0 { loss } else { Self::DECAY * self.mean() + (1.0 - Self::DECAY) * loss };
        self.mean_bits = mean.to_bits();
        self.accepted += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_beyond_the_machines_memory_fails_before_training_naming_the_params() {
        let config = crate::testing::tiny("gpt2", serde_json::json!({"context": 512}));
        let small = Hyper { batch_size: 2, ..Hyper::default() };
        check_memory(&config, &small, tch::Device::Cpu).unwrap();
        let huge = Hyper { batch_size: 1 << 20, ..Hyper::default() };
        let err = format!("{:#}", check_memory(&config, &huge, tch::Device::Cpu).unwrap_err());
        assert!(err.contains("train.batch_size 1048576 × model.context 512"), "{err}");
        assert!(err.contains("lower train.batch_size"), "{err}");
    }

    #[test]
    fn lr_warms_up_linearly_then_decays_to_min_lr() {
        let h = Hyper { steps: 110, warmup: 10, lr: 1.0, min_lr: 0.1, ..Default::default() };
        assert!((h.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((h.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((h.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((h.lr_at(109) - 0.1).abs() < 1e-12);
        assert!(h.lr_at(50) < h.lr_at(40) && h.lr_at(50) > 0.1);
        assert!(h.check("train").is_ok());
        assert_eq!(Hyper { min_lr: 2.0, lr: 1.0, ..Default::default() }.check("train").unwrap_err().path, ["train", "lr"]);
    }

    #[test]
    fn spike_guard_skips_losses_far_above_the_mean() {
        let mut g = SpikeGuard::default();
        assert!((0..20).all(|_| g.accept(2.0, 3.0)));
        assert!(!g.accept(7.0, 3.0));
        assert!(!g.accept(f64::NAN, 3.0));
        assert!(g.accept(5.0, 3.0));
        assert!(g.accept(100.0, 0.0));
        let saved: SpikeGuard = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(saved, g);
    }

    #[test]
    fn step_seeds_differ_by_step_and_micro_batch() {
        assert_eq!(step_seed(1, 2, 0), step_seed(1, 2, 0));
        assert_ne!(step_seed(1, 2, 0), step_seed(1, 3, 0));
        assert_ne!(step_seed(1, 2, 0), step_seed(1, 2, 1));
        assert!(step_seed(5, 6, 7) >= 0);
    }
}
