//! The llmflow stage library: one module per stage kind.
//!
//! A stage is a function from `(params, input directories)` to an output
//! directory. This crate knows nothing about DAGs, caching or scheduling; the
//! engine (the `llmflow` binary) knows nothing about language models. The two
//! meet through the [`Stage`] trait and the [`registry`]:
//!
//! * [`Stage`] is what a stage kind implements: its `KIND` name, a `VERSION`
//!   to bump when the output for the same inputs changes, a `Params` struct
//!   deserialized from the stage's table in `pipeline.toml` (unknown keys are an
//!   error, missing keys take their defaults), and `run`.
//! * [`registry`] lists every kind once. Adding a stage kind is one module here
//!   and one line in that list; the engine needs no change.
//!
//! The engine hashes the params *after* defaults are applied, so writing a
//! default value explicitly never invalidates an artifact. Params listed in
//! [`Stage::VOLATILE`] (log intervals, progress, thread counts) are left out of
//! the hash because they cannot change the output.

use std::collections::BTreeMap;
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub mod command;
pub mod dedup;
pub mod device;
pub mod docs;
pub mod download;
pub mod filter;

/// A stage kind.
pub trait Stage {
    /// The name users write as `kind = "..."`.
    const KIND: &'static str;
    /// Bump when the output for the same inputs and params changes.
    const VERSION: u32;
    /// One line for `llmflow kinds` and error messages.
    const SUMMARY: &'static str;
    /// The input slots this kind reads (`inputs = { NAME = "stage" }`).
    const INPUTS: Inputs;
    /// Top-level params that cannot change the output; excluded from the key.
    const VOLATILE: &'static [&'static str] = &[];

    type Params: Serialize + DeserializeOwned + Default;

    /// Checks params beyond what serde can (non-empty strings, ranges, input
    /// references). `inputs` are the slot names the user wired up.
    fn check(_params: &Self::Params, _inputs: &[String]) -> Result<(), ParamError> {
        Ok(())
    }

    /// Files outside the artifact store that the stage reads, relative to the
    /// pipeline's directory. Their contents are part of the stage's key.
    fn files(_params: &Self::Params) -> Vec<String> {
        Vec::new()
    }

    /// What the scheduler must reserve while the stage runs.
    fn resources(_params: &Self::Params) -> Resources {
        Resources::default()
    }

    fn run(params: &Self::Params, ctx: &mut StageCtx) -> Result<()>;
}

/// The input slots of a stage kind.
#[derive(Clone, Copy, Debug)]
pub enum Inputs {
    /// Exactly these slot names. `input = "x"` in the file fills the slot
    /// named `input`.
    Fixed(&'static [&'static str]),
    /// Any slot names (the `command` kind).
    Any,
}

/// What a running stage holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU threads it keeps busy; `None` means all the engine allows.
    pub threads: Option<usize>,
    /// Whether it runs on the pipeline's accelerator (one such stage per device).
    pub accelerator: bool,
}

/// A parameter error: the path of the offending field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Every param, defaults filled in; what the stage process receives.
    pub params: serde_json::Value,
    /// `params` without the volatile ones; what the key hashes.
    pub key_params: serde_json::Value,
    pub files: Vec<String>,
    pub resources: Resources,
}

/// The object-safe face of a [`Stage`], used by the engine.
pub trait Kind: Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn summary(&self) -> &'static str;
    fn inputs(&self) -> Inputs;
    fn volatile(&self) -> &'static [&'static str];
    /// Deserializes and checks params, applying defaults.
    fn resolve(&self, params: serde_json::Value, inputs: &[String]) -> Result<Resolved, ParamError>;
    fn run(&self, params: serde_json::Value, ctx: &mut StageCtx) -> Result<()>;
}

struct Registered<S>(PhantomData<fn() -> S>);

impl<S: Stage> Kind for Registered<S> {
    fn kind(&self) -> &'static str {
        S::KIND
    }
    fn version(&self) -> u32 {
        S::VERSION
    }
    fn summary(&self) -> &'static str {
        S::SUMMARY
    }
    fn inputs(&self) -> Inputs {
        S::INPUTS
    }
    fn volatile(&self) -> &'static [&'static str] {
        S::VOLATILE
    }

    fn resolve(&self, params: serde_json::Value, inputs: &[String]) -> Result<Resolved, ParamError> {
        let typed: S::Params = serde_path_to_error::deserialize(params).map_err(|e| {
            let path = e.path().iter().filter_map(segment_name).collect();
            ParamError { path, message: e.into_inner().to_string() }
        })?;
        S::check(&typed, inputs)?;
        let params = serde_json::to_value(&typed).expect("params serialize to JSON");
        let mut key_params = params.clone();
        if let serde_json::Value::Object(map) = &mut key_params {
            for name in S::VOLATILE {
                map.remove(*name);
            }
        }
        Ok(Resolved { files: S::files(&typed), resources: S::resources(&typed), params, key_params })
    }

    fn run(&self, params: serde_json::Value, ctx: &mut StageCtx) -> Result<()> {
        let typed: S::Params = serde_json::from_value(params).context("decoding stage params")?;
        S::run(&typed, ctx)
    }
}

fn segment_name(seg: &serde_path_to_error::Segment) -> Option<String> {
    use serde_path_to_error::Segment;
    match seg {
        Segment::Map { key } => Some(key.clone()),
        Segment::Seq { index } => Some(index.to_string()),
        Segment::Enum { variant } => Some(variant.clone()),
        Segment::Unknown => None,
    }
}

const fn kind<S: Stage + 'static>() -> &'static dyn Kind {
    &Registered::<S>(PhantomData)
}

/// Every stage kind llmflow knows, in the order `llmflow kinds` lists them.
pub fn registry() -> &'static [&'static dyn Kind] {
    static KINDS: &[&dyn Kind] = &[
        kind::<command::Command>(),
        kind::<download::Download>(),
        kind::<filter::Filter>(),
        kind::<dedup::Dedup>(),
    ];
    KINDS
}

/// Looks a kind up by name.
pub fn find(kind: &str) -> Option<&'static dyn Kind> {
    registry().iter().copied().find(|k| k.kind() == kind)
}

/// Everything a running stage sees. The engine writes it as JSON for the stage
/// process (`llmflow exec-stage`), which reads it back.
#[derive(Debug, Serialize, Deserialize)]
pub struct StageCtx {
    /// The stage's name in `pipeline.toml`.
    pub stage: String,
    /// The directory of `pipeline.toml`; relative paths in params resolve here.
    pub project_dir: PathBuf,
    /// Input slot name → the upstream artifact's `out/` directory (read-only).
    pub inputs: BTreeMap<String, PathBuf>,
    /// Where the stage writes its output; a temporary directory until published.
    pub out: PathBuf,
    /// A directory that survives an interrupted run of the same key
    /// (checkpoints); removed once the artifact is published.
    pub work: PathBuf,
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
            device: "cpu".to_string(),
            threads: 1,
            progress_file: None,
            metrics: serde_json::Map::new(),
            last_progress: None,
        }
    }

    /// The output directory of the upstream stage wired to slot `name`.
    pub fn input(&self, name: &str) -> Result<&Path> {
        self.inputs
            .get(name)
            .map(PathBuf::as_path)
            .with_context(|| format!("stage `{}` has no input named `{name}`", self.stage))
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
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| writeln!(f, "{done} {total} {unit}"))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            eprintln!("warning: cannot write progress to {}: {e}", path.display());
        }
    }
}
