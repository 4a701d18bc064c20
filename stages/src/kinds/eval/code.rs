//! Functional correctness of generated code, as OpenAI's `human-eval`
//! measures it: each completion runs with its problem's tests in the
//! [`crate::sandbox`], and pass@k is estimated without bias (Chen et al.
//! 2021).

use serde::Deserialize;

pub use crate::sandbox::{Limits, Outcome, Sandbox};

/// A HumanEval problem.
#[derive(Debug, Clone, Deserialize)]
pub struct Problem {
    pub task_id: String,
    pub prompt: String,
    #[serde(default)]
    pub canonical_solution: String,
    pub test: String,
    pub entry_point: String,
}

/// The completion up to where the function body ends: the first line that
/// starts at column 0 (`def`, `class`, `if`, `print`, `#`, … — the HumanEval
/// stop sequences and any other dedent to the top level).
pub fn truncate(completion: &str) -> &str {
    let bytes = completion.as_bytes();
    let end =
        (0..bytes.len()).find(|&i| bytes[i] == b'\n' && bytes.get(i + 1).is_some_and(|c| !c.is_ascii_whitespace())).unwrap_or(bytes.len());
    &completion[..end]
}

/// The program human-eval runs: prompt, completion, tests, and the call of
/// `check` on the entry point.
pub fn program(problem: &Problem, completion: &str) -> String {
    format!("{}{completion}\n\n{}\n\ncheck({})\n", problem.prompt, problem.test, problem.entry_point)
}

/// Runs `completion` against `problem`'s tests with `python` in `sandbox`.
pub fn execute(sandbox: &Sandbox, python: &str, problem: &Problem, completion: &str, limits: Limits) -> anyhow::Result<Outcome> {
    crate::sandbox::run(sandbox, python, &program(problem, completion), limits)
}

/// The unbiased estimate of pass@k from `n` samples of which `c` passed:
/// 1 − C(n−c, k) / C(n, k), computed as a stable product.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n - c < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use super::*;

    pub(crate) fn problems() -> Vec<Problem> {
        crate::data::records::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/eval/HumanEval.jsonl.gz")).unwrap()
    }

    #[test]
    fn pass_at_k_is_the_unbiased_estimator() {
        assert!((pass_at_k(10, 3, 1) - 0.3).abs() < 1e-12);
        // 1 − C(7,5)/C(10,5) = 1 − 21/252
        assert!((pass_at_k(10, 3, 5) - (1.0 - 21.0 / 252.0)).abs() < 1e-12);
        assert_eq!(pass_at_k(10, 6, 5), 1.0);
        assert_eq!(pass_at_k(5, 0, 1), 0.0);
    }

    #[test]
    fn completions_stop_where_the_function_body_ends() {
        assert_eq!(truncate("    return x\n\n\ndef other():\n    pass"), "    return x\n\n");
        assert_eq!(truncate("    y = 1\n\n    return y\nprint(f(1))"), "    y = 1\n\n    return y");
        assert_eq!(truncate("    return 1\nif __name__"), "    return 1");
        assert_eq!(truncate("    return 1\n"), "    return 1\n");
    }
}
