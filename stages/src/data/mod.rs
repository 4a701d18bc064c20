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
//! * [`hash`]: word and n-gram hashes.
//! * [`spill`]: external sorting of fixed-size records within a memory budget.
//! * [`cache`]: a kind's files in the store's cache, each checked against its
//!   recorded BLAKE3 before reuse.
//! * [`units`]: per-input-file units of the data stages, cached in the store.
//! * [`mean_stderr`]: a mean and its standard error, as evaluations report them.

pub mod cache;
pub mod hash;
pub mod instruct;
pub mod loader;
pub mod records;
pub mod rng;
pub mod sequences;
pub mod spill;
pub mod units;

/// What the stage runner holds resident before a data stage starts (the
/// runtime and libtorch's libraries), in MB. A data stage's `memory_mb` is
/// the whole process's peak (`VmHWM`), so its own buffers get what is left.
pub const RUNTIME_MB: usize = 128;

/// The memory, in MB, a data stage's buffers may use under `memory_mb`.
pub fn working_memory_mb(memory_mb: usize) -> usize {
    memory_mb.saturating_sub(RUNTIME_MB)
}

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

/// Mean and standard error of the mean (sample standard deviation over
/// √n), as lm-eval reports them; an accuracy's is over its items.
pub fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}
