//! Functional correctness of generated code, as OpenAI's `human-eval`
//! measures it: each completion runs with its problem's tests in a
//! subprocess, and pass@k is estimated without bias (Chen et al. 2021).
//!
//! The sandbox is best effort, like human-eval's: `python3 -I` in a fresh
//! directory, its own session (killed as a group at the wall-time limit),
//! `setrlimit` on address space, CPU time and file size, a new network
//! namespace where the kernel allows one, and a preamble that disables
//! `socket`, process creation and file removal before the program runs
//! (human-eval's `reliability_guard`). It is no defence against code written
//! to escape; run untrusted models on a machine you can lose.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

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

/// What running a completion gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    /// The last line the program wrote to stderr (the exception), or how it died.
    Failed(String),
    TimedOut,
}

/// Resource limits of one run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub memory_bytes: u64,
}

/// Runs before the program: human-eval's `reliability_guard`, plus no
/// sockets.
const GUARD: &str = r#"import builtins, faulthandler, os, shutil, subprocess, sys
faulthandler.disable()
for _m in ("socket", "_socket", "ssl", "ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_m] = None
for _f in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
           "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
           "chroot", "lchown", "chdir"):
    setattr(os, _f, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.exit = builtins.quit = None
del _m, _f
"#;

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
    format!("{GUARD}\n{}{completion}\n\n{}\n\ncheck({})\n", problem.prompt, problem.test, problem.entry_point)
}

/// Runs `completion` against `problem`'s tests with `python` in a fresh
/// directory under `scratch`.
pub fn execute(python: &str, problem: &Problem, completion: &str, limits: Limits, scratch: &Path) -> Result<Outcome> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let dir = scratch.join(format!("run-{}-{}", std::process::id(), RUN.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let outcome = run_in(python, &dir, &program(problem, completion), limits);
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

fn run_in(python: &str, dir: &Path, program: &str, limits: Limits) -> Result<Outcome> {
    std::fs::write(dir.join("program.py"), program)?;
    let stderr = std::fs::File::create(dir.join("stderr.txt"))?;
    let mut cmd = Command::new(python);
    cmd.args(["-I", "-B", "program.py"])
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let cpu_seconds = limits.timeout.as_secs() + 1;
    let memory = limits.memory_bytes;
    // SAFETY: between fork and exec the closure calls only async-signal-safe
    // system calls and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            for (resource, value) in
                [(libc::RLIMIT_AS, memory), (libc::RLIMIT_CPU, cpu_seconds), (libc::RLIMIT_FSIZE, 1 << 24), (libc::RLIMIT_CORE, 0)]
            {
                let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // No network where unprivileged namespaces are allowed; the guard
            // covers the rest.
            libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET);
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("cannot start `{python}` to run generated code"))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > limits.timeout {
            // SAFETY: the child leads its own process group (setsid).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            child.wait()?;
            return Ok(Outcome::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if status.success() {
        return Ok(Outcome::Passed);
    }
    let text = std::fs::read_to_string(dir.join("stderr.txt")).unwrap_or_default();
    let why = text.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_string);
    Ok(Outcome::Failed(why.unwrap_or_else(|| format!("exited with {status}"))))
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
    use super::*;

    pub(crate) fn problems() -> Vec<Problem> {
        crate::data::records::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/eval/HumanEval.jsonl.gz")).unwrap()
    }

    pub(crate) const LIMITS: Limits = Limits { timeout: Duration::from_secs(10), memory_bytes: 1 << 30 };

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

    #[test]
    fn the_sandbox_stops_sleepers_memory_hogs_and_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let problem = |body: &str| Problem {
            task_id: "t".into(),
            prompt: "def f():\n".into(),
            canonical_solution: String::new(),
            test: format!("def check(candidate):\n{body}"),
            entry_point: "f".into(),
        };
        let limits = Limits { timeout: Duration::from_millis(1500), ..LIMITS };
        let run = |body: &str| execute("python3", &problem(body), "    return 1\n", limits, dir.path()).unwrap();
        assert_eq!(run("    assert candidate() == 1\n"), Outcome::Passed);
        let started = Instant::now();
        assert_eq!(run("    while True: pass\n"), Outcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(run("    x = bytearray(2 << 30)\n"), Outcome::Failed(why) if why.contains("MemoryError")));
        assert!(matches!(run("    import socket\n"), Outcome::Failed(why) if why.contains("socket")));
        assert!(matches!(run("    import os\n    os.system('true')\n"), Outcome::Failed(why) if why.contains("not callable")));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "run directories are removed");
    }
}
