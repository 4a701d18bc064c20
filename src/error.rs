//! The errors every layer may return, each with its exit code (see `main`),
//! and the flag Ctrl-C sets.

use std::fmt;
use std::sync::atomic::AtomicBool;

/// Set by the Ctrl-C handler; every running build watches it.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A mistake in the pipeline file or the command line; exit code 2.
#[derive(Debug)]
pub struct ConfigError(pub String);

/// A stage failed (or `verify` found damage); exit code 1.
#[derive(Debug)]
pub struct StageFailed(pub String);

/// The store is held by others and the caller would not wait; exit code 1.
#[derive(Debug)]
pub struct StoreBusy(pub String);

/// The run was interrupted; exit code 130.
#[derive(Debug)]
pub struct Interrupted;

macro_rules! message_error {
    ($($name:ident),*) => {$(
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::error::Error for $name {}
    )*};
}
message_error!(ConfigError, StageFailed, StoreBusy);

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted; nothing partial was published")
    }
}
impl std::error::Error for Interrupted {}

/// `, did you mean `x`?` when a candidate is close enough, else empty.
pub fn suggest(word: &str, candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!(", did you mean `{c}`?"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(suggest("comand", &["command", "download"]), ", did you mean `command`?");
        assert_eq!(suggest("zzz", &["command", "download"]), "");
    }
}
