//! llmflow: train a language model from scratch as a declarative,
//! content-hashed pipeline.
//!
//! This crate is the engine. It knows nothing about language models: it reads
//! `pipeline.toml` ([`config`], sweeps expanded into variants), builds the
//! stage graph ([`graph`]), fingerprints every stage ([`plan`]), keeps built
//! outputs in an artifact store ([`store`]) and runs stages ([`scheduler`])
//! through an executor ([`executor`]: this machine, or Slurm batch jobs).
//! What a stage *does* lives in the `llmflow-stages` crate and its
//! `llmflow-stage` binary, which the engine reaches only through a process
//! boundary ([`protocol`], [`runner`]); the engine binary never loads
//! libtorch.
//!
//! The modules form layers, each using only those below it (`layers.rs`
//! checks it in the tests): at the bottom [`error`], [`files`] and [`log`];
//! then [`hash`]; [`graph`], [`runner`], [`store`] and [`ui`]; then
//! [`executor`] and [`remote`]; [`config`]; [`plan`]; [`scheduler`]; [`commands`] at the top.
//!
//! The rules that make caching correct:
//! * A stage's key hashes its kind, the kind's version, its params with
//!   defaults applied (volatile ones excluded), the output digest of each input
//!   and the contents of the files it reads.
//! * An artifact counts as built only once its directory, with its manifest,
//!   has been renamed into place; a crash leaves no half artifact.
//! * Inputs enter a key by *output* digest, so an upstream stage rebuilt to
//!   the same bytes leaves its dependents fresh (early cutoff).
//! * `status` and a no-op `run` trust a file whose size, mtime and inode match
//!   its manifest; `verify` re-hashes everything.

pub mod commands;
pub mod config;
pub mod error;
pub mod executor;
pub mod files;
pub mod graph;
pub mod hash;
#[cfg(test)]
mod layers;
pub mod log;
pub mod plan;
pub mod remote;
pub use llmflow_protocol as protocol;
pub mod runner;
pub mod scheduler;
pub mod store;
pub mod ui;
