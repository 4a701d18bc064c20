//! Data shared by the stages: records on disk, token batches, prompts,
//! and the one seeded generator.
//!
//! * [`records`]: JSON / JSON Lines records with `file:line` errors, and
//!   deterministic splits.
//! * [`loader`]: batches of token windows from the shards, resumable.
//! * [`sequences`]: a context and its counted part, padded batches,
//!   log-probabilities of what counts.
//! * [`instruct`]: instruction and chat templates.
//! * [`rng`]: SplitMix64 and the unbiased shuffle.
//! * [`text`]: word and n-gram hashes.

pub mod instruct;
pub mod loader;
pub mod records;
pub mod rng;
pub mod sequences;
pub mod text;

/// What the engine must hash for a local source: the file, or for a glob the
/// directory before its first wildcard.
pub fn local_dependency(url: &str) -> Option<String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return None;
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    if !path.contains(['*', '?', '[']) {
        return Some(path.to_string());
    }
    let literal: Vec<&str> = path.split('/').take_while(|part| !part.contains(['*', '?', '['])).collect();
    Some(if literal.is_empty() || literal == [""] { ".".to_string() } else { literal.join("/") })
}
