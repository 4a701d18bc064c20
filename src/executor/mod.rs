//! Executors: where a stage's process runs. Every executor runs the same
//! command (`llmflow-stage run SPEC`, [`crate::runner::command`]) on the same
//! spec in the store's temporary build directory, its output into the
//! stage's log; the scheduler publishes what it made the same way whatever
//! ran it, so a stage has the same key and output digest everywhere.
//!
//! Adding an executor is one file implementing [`Executor`] and its line in
//! [`all`]: `executor = "NAME"` then picks it, in `[pipeline]` or a stage's
//! table, and a table named `NAME` holds its settings (the fields it lists),
//! the stage's fields laid over the pipeline's.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::store::Store;

pub mod local;
pub mod slurm;

/// Every executor, the default (`local`) first.
pub fn all() -> [&'static dyn Executor; 2] {
    [&local::Local, &slurm::Slurm]
}

/// The executor called `name`.
pub fn named(name: &str) -> Option<&'static dyn Executor> {
    all().into_iter().find(|e| e.name() == name)
}

/// Where a stage runs, as the pipeline file says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The executor's name.
    pub executor: String,
    /// Where `executor = …` is set (`file:line:column` and the key), empty
    /// where nothing set it.
    pub at: String,
    /// Its table's fields, in the order of [`Executor::fields`].
    pub fields: Vec<Setting>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { executor: local::Local.name().to_string(), at: String::new(), fields: Vec::new() }
    }
}

impl Settings {
    pub fn executor(&self) -> &'static dyn Executor {
        named(&self.executor).expect("checked when the pipeline loaded")
    }

    pub fn get(&self, field: &str) -> Option<&Setting> {
        self.fields.iter().find(|s| s.field == field)
    }
}

/// One field of an executor's settings and where it is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Setting {
    pub field: String,
    pub value: toml::Value,
    /// As the pipeline file writes it, e.g. `"gpu"`.
    pub shown: String,
    /// `file:line:column` and the key's dotted path.
    pub at: String,
}

/// How many threads a stage gets and whose cores they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threads {
    /// The threads of one node, shared by the stage's ranks on it.
    pub per_node: usize,
    /// Ranks on one node.
    pub tasks_per_node: usize,
    /// Whether they are this machine's cores, which the scheduler shares out.
    pub local: bool,
}

/// A stage ready to start.
pub struct Launch<'a> {
    pub store: &'a Store,
    pub stage: &'a str,
    pub key: &'a str,
    pub settings: &'a Settings,
    /// The stage runner's command ([`crate::runner::command`]).
    pub runner: Command,
    pub threads: Threads,
    pub processes: usize,
    /// The temporary build directory: `spec.json`, `out/`, `progress`.
    pub dir: &'a Path,
    pub log: &'a Path,
    /// Bytes the log keeps at most.
    pub log_limit: u64,
    /// The pipeline's folder, where the stage runs.
    pub root: &'a Path,
}

/// What starting a stage came to.
pub enum Started {
    /// Under way; `said` tells the user where, if anything is worth telling
    /// (`as Slurm job 42`).
    Running { run: Box<dyn Running>, said: Option<String> },
    /// Refused at once for its settings: a mistake in the pipeline file
    /// (exit code 2), with the message naming the settings.
    Refused(String),
}

/// A stage under way.
pub trait Running: Send {
    /// Waits until it ends, passing on the stage's progress reports.
    /// `None` when the run was interrupted: what it started is stopped first.
    fn wait(self: Box<Self>, progress: &mut dyn FnMut(&str)) -> Result<Option<Ended>>;
}

/// How a stage's process ended.
pub struct Ended {
    pub success: bool,
    /// Why it failed, for the user: an exit status or the executor's reason.
    pub why: String,
}

/// Somewhere stages run.
pub trait Executor: Sync {
    /// Its name in the pipeline file.
    fn name(&self) -> &'static str;

    /// Where it runs stages, in a few words for messages ("this machine").
    fn about(&self) -> &'static str;

    /// The fields of its settings table (none: it takes no table).
    fn fields(&self) -> &'static [&'static str] {
        &[]
    }

    /// Checks one field's value, giving the text it shows as; the error
    /// completes "`slurm.time` …".
    fn check_field(&self, field: &str, value: &toml::Value) -> Result<String, String> {
        let _ = value;
        Err(format!("is no setting of the `{}` executor", field))
    }

    /// Whether `stage`, of `processes` ranks, can run here as set: checked
    /// for every stage a run will build before any starts.
    fn check(&self, stage: &str, settings: &Settings, processes: usize) -> Result<(), ConfigError>;

    /// The threads a stage runs with: `wanted` is what the stage asks for,
    /// `cores` this machine's.
    fn threads(
        &self,
        stage: &str,
        settings: &Settings,
        wanted: Option<usize>,
        processes: usize,
        cores: usize,
    ) -> Result<Threads, ConfigError>;

    /// Starts the stage.
    fn start(&self, launch: Launch<'_>) -> Result<Started>;

    /// Ends what a run of `stage` that died left in flight, so two builds
    /// never share a work directory; called with the stage's lock held.
    fn cancel_leftover(&self, _store: &Store, _stage: &str) {}
}

/// Passes the stage's last progress report (`done total unit` in the build
/// directory's `progress`) to `progress`.
fn report_progress(dir: &Path, progress: &mut dyn FnMut(&str)) {
    if let Ok(text) = std::fs::read_to_string(dir.join("progress")) {
        progress(&text);
    }
}

/// How often a waiting executor looks at its stage.
const POLL: Duration = Duration::from_millis(50);
