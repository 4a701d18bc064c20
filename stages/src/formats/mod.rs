//! The files artifacts are made of, read and written in one place each.
//!
//! * [`docs`]: documents (`docs.parquet`: `id`, `text`, `source`).
//! * [`tokens`]: llm.c token shards and their `manifest.json`.
//! * [`tokenizer`]: `tokenizer.json`, `<|endoftext|>`, batch encoding.
//! * [`model`]: the model artifact (config, weights, tokenizer).
//! * [`hf`]: the Hugging Face export of a model artifact.
//! * [`events`]: TensorBoard event files of the logged metrics.

pub mod docs;
pub mod events;
pub mod hf;
pub mod model;
pub mod tokenizer;
pub mod tokens;
