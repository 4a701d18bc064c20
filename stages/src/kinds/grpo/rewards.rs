//! Rewards a completion earns, combinable with weights: verifiable ones
//! (the extracted answer equal to the reference, a number within a
//! tolerance, Python unit tests passing in the sandbox), a format check, and
//! a reward model's score.
//!
//! ```toml
//! answer = "answer is (\\S+)"                    # optional: group 1 of the last match is the answer
//! rewards = [
//!   { type = "exact_match" },                   # 1 if the answer is the reference (`output`)
//!   { type = "numeric", tolerance = 0.5 },      # 1 if its last number is within 0.5 of the reference's
//!   { type = "format", pattern = "\\d+", weight = 0.1 },  # 1 if the whole completion matches
//!   { type = "python_tests", confirm_run_unsafe_code = true },  # prompt + completion + `test` passes
//!   { type = "reward_model", weight = 0.5 },    # the `reward` input's score
//! ]
//! ```

use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One reward and its weight in the sum (`type = "…"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reward {
    ExactMatch(ExactMatch),
    Numeric(Numeric),
    Format(Format),
    PythonTests(PythonTests),
    RewardModel(RewardModel),
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExactMatch {
    #[serde(default = "one")]
    #[schemars(range(min = -1000, max = 1000))]
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Numeric {
    #[serde(default = "one")]
    #[schemars(range(min = -1000, max = 1000))]
    pub weight: f64,
    /// The largest absolute difference that still counts as right.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1e12))]
    pub tolerance: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Format {
    #[serde(default = "one")]
    #[schemars(range(min = -1000, max = 1000))]
    pub weight: f64,
    /// A regular expression the whole completion (trimmed) must match.
    pub pattern: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PythonTests {
    #[serde(default = "one")]
    #[schemars(range(min = -1000, max = 1000))]
    pub weight: f64,
    /// Wall-time limit of one test run.
    #[serde(default = "ten")]
    #[schemars(range(max = 86_400), extend("exclusiveMinimum" = 0))]
    pub timeout_s: f64,
    /// Address-space limit of one test run.
    #[serde(default = "gigabyte")]
    #[schemars(range(min = 1, max = 1_048_576))]
    pub memory_mb: u64,
    /// The interpreter (inside the sandbox, found in /usr/bin).
    #[serde(default = "python3")]
    pub python: String,
    /// "bwrap" (bubblewrap's namespaces) or "none" (unconfined, with a warning).
    #[serde(default = "bwrap")]
    pub sandbox: String,
    /// The tests run the code the policy writes: required to be true.
    #[serde(default)]
    pub confirm_run_unsafe_code: bool,
}

fn ten() -> f64 {
    10.0
}
fn gigabyte() -> u64 {
    1024
}
fn python3() -> String {
    "python3".into()
}
fn bwrap() -> String {
    "bwrap".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardModel {
    #[serde(default = "one")]
    #[schemars(range(min = -1000, max = 1000))]
    pub weight: f64,
}

impl Reward {
    pub fn weight(&self) -> f64 {
        match self {
            Reward::ExactMatch(r) => r.weight,
            Reward::Numeric(r) => r.weight,
            Reward::Format(r) => r.weight,
            Reward::PythonTests(r) => r.weight,
            Reward::RewardModel(r) => r.weight,
        }
    }

    /// Whether it checks the answer against something true: what accuracy counts.
    pub fn verifiable(&self) -> bool {
        matches!(self, Reward::ExactMatch(_) | Reward::Numeric(_) | Reward::PythonTests(_))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Reward::ExactMatch(_) => "exact_match",
            Reward::Numeric(_) => "numeric",
            Reward::Format(_) => "format",
            Reward::PythonTests(_) => "python_tests",
            Reward::RewardModel(_) => "reward_model",
        }
    }
}

/// The answer in a completion: group 1 (or the whole match) of the last
/// match of `pattern`, or, without a pattern, the completion trimmed.
/// `None` when the pattern does not match.
pub fn extract<'a>(completion: &'a str, pattern: Option<&Regex>) -> Option<&'a str> {
    let Some(pattern) = pattern else { return Some(completion.trim()) };
    let found = pattern.captures_iter(completion).last()?;
    Some(found.get(1).or_else(|| found.get(0))?.as_str().trim())
}

/// The last number in `text` (`-12`, `3.5`, `1,234`), commas dropped.
pub fn last_number(text: &str) -> Option<f64> {
    static NUMBER: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let number = NUMBER.get_or_init(|| Regex::new(r"-?\d[\d,]*(?:\.\d+)?").expect("a valid regex"));
    number.find_iter(text).last()?.as_str().replace(',', "").parse().ok()
}

/// 1 when the extracted answer equals the reference (both trimmed).
pub fn exact_match(answer: Option<&str>, reference: &str) -> f64 {
    indicator(answer == Some(reference.trim()))
}

/// 1 when the answer's last number is within `tolerance` of the reference's.
pub fn numeric(answer: Option<&str>, reference: &str, tolerance: f64) -> f64 {
    match (answer.and_then(last_number), last_number(reference)) {
        (Some(a), Some(r)) => indicator((a - r).abs() <= tolerance),
        _ => 0.0,
    }
}

/// 1 when the whole trimmed completion matches `pattern` (anchored by the caller).
pub fn format(completion: &str, anchored: &Regex) -> f64 {
    indicator(anchored.is_match(completion.trim()))
}

fn indicator(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_extracted_from_the_last_match() {
        let pattern = Regex::new(r"answer is (\S+)").unwrap();
        assert_eq!(extract("the answer is 3, no, the answer is 4", Some(&pattern)), Some("4"));
        assert_eq!(extract("I do not know", Some(&pattern)), None);
        assert_eq!(extract("  42\n", None), Some("42"));
        let whole = Regex::new(r"#### \d+").unwrap();
        assert_eq!(extract("so #### 17", Some(&whole)), Some("#### 17"));
    }

    #[test]
    fn exact_and_numeric_matches() {
        assert_eq!(exact_match(Some("135"), "135"), 1.0);
        assert_eq!(exact_match(Some("1355"), "135"), 0.0);
        assert_eq!(exact_match(None, "135"), 0.0);
        assert_eq!(last_number("it costs $1,234.50 or -3"), Some(-3.0));
        assert_eq!(last_number("about 1,234.5"), Some(1234.5));
        assert_eq!(numeric(Some("roughly 99.6"), "100", 0.5), 1.0);
        assert_eq!(numeric(Some("roughly 99.4"), "100", 0.5), 0.0);
        assert_eq!(numeric(Some("100"), "100", 0.0), 1.0);
        assert_eq!(numeric(Some("no number"), "100", 10.0), 0.0);
    }

    #[test]
    fn format_matches_the_whole_completion() {
        let digits = Regex::new(r"^(?:\d+)$").unwrap();
        assert_eq!(format(" 123 ", &digits), 1.0);
        assert_eq!(format("123 apples", &digits), 0.0);
    }

    #[test]
    fn rewards_parse_with_defaults_and_reject_unknown_fields() {
        let r: Reward = serde_json::from_value(serde_json::json!({"type": "numeric", "tolerance": 0.5})).unwrap();
        assert_eq!(r, Reward::Numeric(Numeric { weight: 1.0, tolerance: 0.5 }));
        assert!(r.verifiable());
        let err = serde_json::from_value::<Reward>(serde_json::json!({"type": "format", "pattern": "x", "tolerance": 1}));
        assert!(err.unwrap_err().to_string().contains("unknown field `tolerance`"));
        let r: Reward = serde_json::from_value(serde_json::json!({"type": "python_tests"})).unwrap();
        assert!(matches!(r, Reward::PythonTests(PythonTests { confirm_run_unsafe_code: false, .. })));
    }
}
