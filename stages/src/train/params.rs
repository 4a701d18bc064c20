//! The params every training stage shares, declared once: its `train`
//! table (a [`Hyper`]) and [`Training`], the loop's and the ranks'
//! top-level params, flattened into each training kind's `Params`
//! (`#[serde(flatten)] pub training: Training`) with the kind's own defaults
//! where they differ (`Training { eval_every: 100, ..Training::default() }`).
//! Their check and the resources they ask for are every training stage's; a
//! kind checks only its own params beside them.

use std::time::Duration;

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Hyper;
use crate::{dist, ParamError, Resources};

/// The top-level params of the loop and of training across processes
/// ([`crate::dist`]). One struct without nested `flatten`s: serde's
/// `flatten` inside a flattened struct would leave its keys unknown to the
/// kind's `deny_unknown_fields`. The `train` table stays a field of the
/// kind's own: an error inside a flattened table would lose its path
/// (`train.stpes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Training {
    /// Evaluate every so many updates, and after the last.
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub eval_every: u64,
    /// Skip an update whose loss exceeds this × the running mean; 0: never.
    #[schemars(range(min = 0, max = 1000))]
    pub spike_factor: f64,
    /// Checkpoint every so many updates (volatile); 0: never.
    #[schemars(range(max = 1_000_000_000))]
    pub checkpoint_every: u64,
    /// Checkpoints kept (volatile).
    #[schemars(range(max = 1000))]
    pub keep_checkpoints: usize,
    /// A progress line on stderr every so many updates (volatile).
    #[schemars(range(max = 1_000_000_000))]
    pub log_every: u64,
    /// Ranks that train one model together, each on its slice of every batch (volatile: the result agrees to rounding).
    #[schemars(range(min = 1, max = 65_536))]
    pub processes: usize,
    /// 1 partitions AdamW's moments across the ranks (ZeRO stage 1); 0 keeps them whole on every rank (volatile).
    #[schemars(range(max = 1))]
    pub zero: u8,
    /// Seconds a collective may wait for the other ranks before the stage fails (volatile).
    #[schemars(range(min = 1, max = 86_400))]
    pub collective_timeout_s: u64,
}

impl Default for Training {
    fn default() -> Self {
        Training {
            eval_every: 125,
            spike_factor: 3.0,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            log_every: 50,
            processes: 1,
            zero: 0,
            collective_timeout_s: 600,
        }
    }
}

/// The params of [`Training`] that cannot change a result: the loop's
/// checkpoints and log, and the ranks (the weights agree with one process's
/// to rounding).
pub const VOLATILE: [&str; 6] = ["checkpoint_every", "keep_checkpoints", "log_every", "processes", "zero", "collective_timeout_s"];

/// The tables of a training stage that take the kind's defaults key by key
/// ([`crate::Stage::MERGED`]): a partly written `train` keeps the kind's steps.
pub const MERGED: [&str; 1] = ["train"];

impl Training {
    /// What the bounds of single fields cannot check, with the stage's
    /// `train` table.
    pub fn check(&self, train: &Hyper) -> Result<(), ParamError> {
        train.check("train")?;
        if self.spike_factor > 0.0 && self.spike_factor <= 1.0 {
            return Err(ParamError::new(&["spike_factor"], "`spike_factor` must be above 1, or 0 to turn the guard off"));
        }
        // Each rank trains on a slice of every micro-batch.
        if self.processes > train.batch_size {
            return Err(ParamError::new(
                &["processes"],
                format!("{} processes need train.batch_size of at least {0}: each rank trains on a slice of every batch", self.processes),
            ));
        }
        Ok(())
    }

    /// What a training stage holds while it runs: an accelerator, and its
    /// ranks (the runner starts them).
    pub fn resources(&self) -> Resources {
        Resources { threads: None, accelerator: true, processes: self.processes }
    }

    /// Joins the stage's ranks (see [`dist::init`]), training on `device`.
    pub fn join(&self, device: tch::Device) -> Result<()> {
        if self.processes > 1 && device != tch::Device::Cpu && !cfg!(llmflow_nccl) {
            bail!(
                "processes = {} on {device:?} needs NCCL, and this build has none (its headers were not installed): \
                 `make setup CUDA=1` and rebuild, or set processes = 1 (one GPU) or device = \"cpu\"",
                self.processes
            );
        }
        dist::init(self.processes, Duration::from_secs(self.collective_timeout_s)).map(drop)
    }

    /// Whether AdamW's moments are partitioned across the ranks (ZeRO-1).
    pub fn zero(&self) -> bool {
        self.zero == 1
    }
}
