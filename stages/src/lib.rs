//! The llmflow stage library: the stage kinds (`kinds/`, one module each, each
//! a leaf) over the shared layers they use (`train`, `sample`, `data`,
//! `formats`, `model`, `fast`, `dist`), all on the ground floor, `stage`
//! (see the README's "Layout").
//!
//! A stage is a function from `(params, input directories)` to an output
//! directory. This crate knows nothing about DAGs, caching or scheduling; the
//! engine (the `llmflow` binary) knows nothing about language models. The two
//! meet through the [`Stage`] trait, the [`kinds::each_kind`] list and a process
//! boundary (see the `llmflow-protocol` crate):
//!
//! * [`Stage`] ([`stage`]) is what a stage kind implements: its `KIND` name, a
//!   `VERSION` to bump when the output for the same inputs changes, a `Params`
//!   struct deserialized from the stage's table in `pipeline.toml` (unknown
//!   keys are an error, missing keys take their defaults), and `run`.
//! * [`kinds::each_kind`] lists every kind once. Adding a stage kind is one
//!   module in `kinds/` and one line in that list; the engine needs no change.
//! * The `llmflow-stage` binary (this crate's `src/main.rs`) answers the
//!   engine through the dispatch in [`kinds`]: it lists the kinds
//!   ([`kinds::all`]), [`kinds::resolve`]s params and [`kinds::run`]s a
//!   stage. Only it links libtorch, so the engine starts in milliseconds.
//!
//! The engine hashes the params *after* defaults are applied, so writing a
//! default value explicitly never invalidates an artifact. Params listed in
//! [`Stage::VOLATILE`] (log intervals, progress, thread counts) are left out of
//! the hash because they cannot change the output.

pub use llmflow_protocol::{KindInfo, ParamError, Report, Resolved, Resources, StageCtx};
pub use stage::{params, Inputs, Stage};

pub mod bounds;
pub mod data;
pub mod describe;
pub mod device;
pub mod dist;
pub mod fast;
pub mod formats;
pub mod kinds;
#[cfg(test)]
mod layers;
pub mod model;
pub mod sample;
pub mod sandbox;
pub mod stage;
#[cfg(test)]
pub(crate) mod testing;
pub mod train;
