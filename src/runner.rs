//! The stage runner, `llmflow-stage`: the engine does not link the stage
//! library (see [`crate::protocol`]); it asks this binary beside it for the
//! kinds, their resolved params and estimates, and every executor runs a
//! stage as the same [`command`]. A resolve answer is cached by
//! the request's hash and the runner's size, mtime and inode, so a pipeline
//! that has not changed is resolved without starting the runner.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::hash::{hash_bytes, Stat};
use crate::protocol::{KindInfo, ResolveRequest, ResolveResponse};

/// `llmflow-stage`, which sits beside this binary.
pub fn runner() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let runner = exe.with_file_name("llmflow-stage");
    if !runner.is_file() {
        bail!("{} not found: the stage runner is built with llmflow (`make build`) and must sit beside it", runner.display());
    }
    Ok(runner)
}

/// Every stage kind (`llmflow-stage kinds`).
pub fn list() -> Result<Vec<KindInfo>> {
    ask(&runner()?, "kinds", b"")
}

/// Runs `llmflow-stage VERB` with `input` on stdin; its stdout is JSON.
fn ask<T: serde::de::DeserializeOwned>(runner: &Path, verb: &str, input: &[u8]) -> Result<T> {
    let mut child = Command::new(runner)
        .arg(verb)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", runner.display()))?;
    child.stdin.take().expect("piped").write_all(input)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("`llmflow-stage {verb}` failed");
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("reading the answer of `llmflow-stage {verb}`"))
}

#[derive(Serialize, Deserialize)]
struct Cached {
    runner: Stat,
    request: String,
    response: ResolveResponse,
}

/// Resolves every stage's params; `cache`, if any, is where a good answer is kept.
pub fn resolve(request: &ResolveRequest, cache: Option<&Path>) -> Result<ResolveResponse> {
    let runner = runner()?;
    let runner_stat = Stat::of(&runner)?;
    let body = serde_json::to_vec(request)?;
    let request_hash = hash_bytes(&body);
    if let Some(hit) = cache.and_then(|c| std::fs::read(c).ok()).and_then(|b| serde_json::from_slice::<Cached>(&b).ok()) {
        if hit.runner == runner_stat && hit.request == request_hash {
            return Ok(hit.response);
        }
    }
    let response: ResolveResponse = ask(&runner, "resolve", &body)?;
    // Only a pipeline without mistakes is cached; errors are cheap to redo.
    if let Some(cache) = cache.filter(|_| response.stages.iter().all(|s| matches!(s, Some(Ok(_))))) {
        let cached = Cached { runner: runner_stat, request: request_hash, response: response.clone() };
        let _ = crate::files::write_atomic(cache, &serde_json::to_vec(&cached)?);
    }
    Ok(response)
}

/// What building each stage would cost, as the stage runner estimates it
/// (`None` for kinds that give no estimate).
pub fn estimates(specs: &[crate::protocol::Spec]) -> Result<Vec<Option<String>>> {
    ask(&runner()?, "estimate", &serde_json::to_vec(specs)?)
}

/// The command that runs a stage from its spec, wherever it runs: the local
/// executor starts it, the Slurm executor's job script runs it.
pub fn command(spec: &Path, threads: usize) -> Result<Command> {
    let threads = threads.to_string();
    let mut runner = Command::new(runner()?);
    runner.arg("run").arg(spec).env("RAYON_NUM_THREADS", &threads).env("OMP_NUM_THREADS", &threads).env("POLARS_MAX_THREADS", &threads);
    Ok(runner)
}
