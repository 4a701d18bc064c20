//! llmflow: train a language model from scratch as a declarative,
//! content-hashed pipeline.
//!
//! This crate is the engine. It knows nothing about language models: it reads
//! `pipeline.toml` ([`config`]), expands sweeps into variants ([`sweep`]), builds the stage graph ([`graph`]),
//! fingerprints every stage ([`plan`]), keeps built outputs in an artifact
//! store ([`store`]) and runs stages as child processes ([`exec`]) or as Slurm batch jobs
//! ([`slurm`]). What a
//! stage *does* lives in the `llmflow-stages` crate and its `llmflow-stage`
//! binary, which the engine reaches only through a process boundary
//! ([`protocol`], [`kinds`]); the engine binary never loads libtorch.
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
pub mod exec;
pub mod graph;
pub mod hash;
pub mod kinds;
pub mod plan;
pub mod slurm;
pub use llmflow_protocol as protocol;
pub mod store;
pub mod sweep;
pub mod ui;
