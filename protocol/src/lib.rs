//! The boundary between the engine and the stage library: serde types and
//! nothing else, so both sides depend on this crate and on neither other.
//!
//! The engine never runs stage code in its own process: it starts the stage
//! runner, `llmflow-stage` (built from the `stages/` crate), and talks to it
//! in JSON through the types here.
//!
//! * `llmflow-stage kinds` prints every kind's [`KindInfo`].
//! * `llmflow-stage resolve` reads a [`ResolveRequest`] (each stage's kind,
//!   raw params and input slots) and prints a [`ResolveResponse`]: params with
//!   defaults applied, or the field that is wrong. The engine caches the answer
//!   by the request's hash and the runner binary's identity, so an unchanged
//!   pipeline is never resolved twice.
//! * `llmflow-stage run SPEC` runs one stage from a [`Spec`].
//!
//! This keeps libtorch, which only the runner links, out of the engine: a
//! no-op `llmflow run` or `llmflow status` starts in milliseconds instead of
//! the ~0.4 s libtorch takes to load.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// What the engine knows of a stage kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindInfo {
    pub kind: String,
    pub version: u32,
    pub summary: String,
    /// Input slot names; `None` means any names (the `command` kind).
    pub inputs: Option<Vec<String>>,
    /// Slots a stage of the kind may leave out (`dedup`'s `against`).
    #[serde(default)]
    pub optional_inputs: Vec<String>,
    /// Params excluded from the key.
    pub volatile: Vec<String>,
    /// What `llmflow report` prints of this kind's artifact, if anything.
    pub report: Option<Report>,
    /// Files of the artifact a person looks at first (plots, samples), named
    /// by `llmflow show`.
    pub show: Vec<String>,
    /// Whether the kind estimates what a build costs (`llmflow estimate`);
    /// planning skips asking the stage runner when no stage's kind does.
    pub estimates: bool,
}

/// The report card a kind writes into its artifact: a file for people and
/// one for scripts (`llmflow report --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub text: String,
    pub json: String,
}

/// How to sample from a model: the options of `llmflow generate`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Tokens to add.
    pub max_tokens: usize,
    /// 0 is greedy decoding; otherwise the logits are divided by it.
    pub temperature: f64,
    /// Keep only the K most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches P.
    pub top_p: Option<f64>,
    pub seed: u64,
}

/// `llmflow-stage generate` reads this on stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The model artifact's `out/` directory.
    pub model: PathBuf,
    pub prompt: String,
    pub sampling: Sampling,
}

/// One stage to resolve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRequest {
    pub name: String,
    pub kind: String,
    /// The stage's table without the engine's keys (`kind`, `input(s)`).
    pub params: serde_json::Value,
    /// The input slots the user wired up.
    pub inputs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResolveRequest {
    pub stages: Vec<StageRequest>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResolveResponse {
    pub kinds: Vec<KindInfo>,
    /// One per requested stage, in order; `None` for an unknown kind.
    pub stages: Vec<Option<Result<Resolved, ParamError>>>,
}

/// What the stage process reads: the kind, its params and its context.
#[derive(Serialize, Deserialize)]
pub struct Spec {
    pub kind: String,
    pub params: serde_json::Value,
    pub ctx: StageCtx,
}

/// What a running stage holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU threads it keeps busy; `None` means all the engine allows.
    pub threads: Option<usize>,
    /// Whether it runs on the pipeline's accelerator (one such stage per device).
    pub accelerator: bool,
    /// Ranks of the stage runner it runs as (`processes`), sharing its threads.
    #[serde(default = "one")]
    pub processes: usize,
}

fn one() -> usize {
    1
}

impl Default for Resources {
    fn default() -> Self {
        Resources { threads: None, accelerator: false, processes: 1 }
    }
}

/// A parameter error: the path of the offending field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamError {
    /// Field path inside the stage table, e.g. `["train", "lr"]`; empty for
    /// the table itself.
    pub path: Vec<String>,
    pub message: String,
}

impl ParamError {
    pub fn new(path: &[&str], message: impl Into<String>) -> Self {
        ParamError { path: path.iter().map(|s| s.to_string()).collect(), message: message.into() }
    }
}

/// Params after defaults are applied, as the engine hashes and stores them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resolved {
    /// Every param, defaults filled in; what the stage process receives.
    pub params: serde_json::Value,
    /// `params` without the volatile ones; what the key hashes.
    pub key_params: serde_json::Value,
    pub files: Vec<String>,
    pub resources: Resources,
}

/// Everything a running stage sees. The engine writes it as JSON for the stage
/// process (`llmflow-stage run`), which reads it back.
#[derive(Debug, Serialize, Deserialize)]
pub struct StageCtx {
    /// The stage's name in `pipeline.toml`.
    pub stage: String,
    /// The directory of `pipeline.toml`; relative paths in params resolve here.
    pub project_dir: PathBuf,
    /// Input slot name → the upstream artifact's `out/` directory (read-only);
    /// the artifact's `manifest.json` (its params and metrics) sits beside it.
    pub inputs: BTreeMap<String, PathBuf>,
    /// Where the stage writes its output; a temporary directory until published.
    pub out: PathBuf,
    /// A directory that survives an interrupted run of the same key
    /// (checkpoints); removed once the artifact is published.
    pub work: PathBuf,
    /// Results finer than the stage, shared by every build of its kind across
    /// keys (`STORE/.cache/KIND`): files named by a hash of everything they
    /// depend on, written whole (rename) and hard-linked into `out/` by the
    /// build that uses them. `gc` keeps the files a kept artifact links.
    pub cache: PathBuf,
    /// `auto`, `cpu`, `cuda` or `cuda:N`, from the pipeline.
    pub device: String,
    /// Threads the stage may use.
    pub threads: usize,
    /// Where progress is reported for the engine's progress bars.
    pub progress_file: Option<PathBuf>,
    #[serde(skip)]
    metrics: serde_json::Map<String, serde_json::Value>,
    #[serde(skip)]
    last_progress: Option<Instant>,
}

impl StageCtx {
    pub fn new(stage: &str, project_dir: &Path, out: &Path, work: &Path) -> Self {
        StageCtx {
            stage: stage.to_string(),
            project_dir: project_dir.to_path_buf(),
            inputs: BTreeMap::new(),
            out: out.to_path_buf(),
            work: work.to_path_buf(),
            cache: work.join("cache"),
            device: "cpu".to_string(),
            threads: 1,
            progress_file: None,
            metrics: serde_json::Map::new(),
            last_progress: None,
        }
    }

    /// The output directory of the upstream stage wired to slot `name`.
    pub fn input(&self, name: &str) -> Result<&Path> {
        self.inputs.get(name).map(PathBuf::as_path).with_context(|| format!("stage `{}` has no input named `{name}`", self.stage))
    }

    /// A path from the params, relative to the pipeline's directory.
    pub fn project_path(&self, path: &str) -> PathBuf {
        self.project_dir.join(path)
    }

    /// Records a metric; the engine stores metrics in the artifact's manifest.
    pub fn metric(&mut self, name: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        self.metrics.insert(name.to_string(), value);
    }

    pub fn metrics(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.metrics
    }

    /// Reports progress (`done` of `total` `unit`s) to the engine's progress
    /// bar; cheap to call often (written at most ten times a second).
    pub fn progress(&mut self, done: u64, total: u64, unit: &str) {
        let Some(path) = &self.progress_file else { return };
        let now = Instant::now();
        if done < total && self.last_progress.is_some_and(|t| now - t < Duration::from_millis(100)) {
            return;
        }
        self.last_progress = Some(now);
        // Write then rename so the engine never reads half a line.
        let tmp = path.with_extension("tmp");
        let written =
            std::fs::File::create(&tmp).and_then(|mut f| writeln!(f, "{done} {total} {unit}")).and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            eprintln!("warning: cannot write progress to {}: {e}", path.display());
        }
    }
}
