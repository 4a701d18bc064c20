//! The params a training stage takes to train across processes
//! ([`crate::dist`]): how many ranks, ZeRO-1, and the collective timeout.

use std::time::Duration;

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::dist::{self, World};
use crate::ParamError;

/// Top-level params of a stage that trains across processes
/// (`#[serde(flatten)]` them into the stage's params).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Distributed {
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

impl Default for Distributed {
    fn default() -> Self {
        Distributed { processes: 1, zero: 0, collective_timeout_s: 600 }
    }
}

/// The params of [`Distributed`]: none changes what is trained beyond rounding.
pub const VOLATILE: [&str; 3] = ["processes", "zero", "collective_timeout_s"];

impl Distributed {
    /// Each rank trains on a slice of every micro-batch of `batch_size` rows.
    pub fn check(&self, batch_size: usize) -> Result<(), ParamError> {
        if self.processes > batch_size {
            return Err(ParamError::new(
                &["processes"],
                format!("{} processes need train.batch_size of at least {0}: each rank trains on a slice of every batch", self.processes),
            ));
        }
        Ok(())
    }

    /// Joins the stage's ranks (see [`dist::init`]); training on `device`.
    pub fn init(&self, device: tch::Device) -> Result<&'static World> {
        if self.processes > 1 && device != tch::Device::Cpu && !cfg!(llmflow_nccl) {
            bail!(
                "processes = {} on {device:?} needs NCCL, and this build has none (its headers were not installed): \
                 `make setup CUDA=1` and rebuild, or set processes = 1 (one GPU) or device = \"cpu\"",
                self.processes
            );
        }
        dist::init(self.processes, Duration::from_secs(self.collective_timeout_s))
    }

    pub fn zero(&self) -> bool {
        self.zero == 1
    }
}
