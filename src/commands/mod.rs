//! The CLI's verbs, one function each: building ([`run`]), looking at the
//! pipeline and its artifacts ([`status`], [`show`], [`report`], [`dag`]),
//! looking after the store ([`verify`], [`gc`]), sharing it ([`push`],
//! [`pull`]) and using a model
//! ([`generate`], [`export`]). Every verb that prints for scripts takes
//! `--json`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{bail, Result};
use console::style;
use serde_json::json;

use crate::config::Pipeline;
use crate::error::{suggest, ConfigError, StageFailed, INTERRUPTED};
use crate::graph::Dag;
use crate::plan::{self, State, Status};
use crate::protocol::{GenerateRequest, Sampling, Spec, StageCtx};
use crate::remote::Remote;
use crate::scheduler::{self, RunOptions};
use crate::store::Store;
use crate::ui::Ui;

mod dag;
mod remote;
mod status;
mod store;

pub use dag::{dag, Format};
pub use remote::{pull, push};
pub use status::{report, show, status};
pub use store::{gc, verify};

/// `println!` that returns the error instead of panicking, so output piped
/// into `head` ends quietly (main turns a broken pipe into exit 0).
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*)?
    };
}
use outln;

/// Prints `value` as pretty JSON, for scripts.
fn print_json(value: &serde_json::Value) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A command loads one pipeline and exits, so the pipeline is never freed:
/// freeing 10,000 stages an allocation at a time costs a no-op `status` a
/// tenth of its time.
fn load(file: &Path) -> Result<(&'static Pipeline, &'static Dag)> {
    let p: &'static Pipeline = Box::leak(Box::new(Pipeline::load(file)?));
    Ok((p, Box::leak(Box::new(p.dag()))))
}

/// What `llmflow run` was asked.
pub struct RunArgs {
    pub targets: Vec<String>,
    pub dry_run: bool,
    pub json: bool,
    pub force: Vec<String>,
    pub jobs: Option<usize>,
    pub keep_going: bool,
}

pub fn run(file: &Path, args: RunArgs) -> Result<()> {
    let (p, dag) = load(file)?;
    if args.dry_run {
        return plan_only(p, dag, &args.targets, &args.force, args.json);
    }
    if args.json {
        bail!(ConfigError(
            "`run --json` goes with `--dry-run`: a run's own output is for people (`status --json` after it is for scripts)".into()
        ));
    }
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))?;
    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let RunArgs { targets, force, keep_going, .. } = args;
    scheduler::run(p, dag, &RunOptions { targets, force, jobs, keep_going }, &Ui::new())
}

/// `run --dry-run`: what would be built, why, and what it would cost.
fn plan_only(p: &Pipeline, dag: &Dag, targets: &[String], force: &[String], json: bool) -> Result<()> {
    let store = Store::new(p.artifacts.clone());
    let remote = Remote::of(p.remote.as_ref(), &Ui::new());
    let statuses = plan::statuses(p, dag, &store, remote.as_ref())?;
    let idx = p.select_all(targets)?;
    let forced: BTreeSet<usize> = p.select_all(force)?.into_iter().collect();
    let pulls = |i: usize| statuses[i].state == State::Remote && !forced.contains(&i);
    let building: Vec<usize> =
        dag.closure(&idx).into_iter().filter(|&i| (statuses[i].state != State::Fresh && !pulls(i)) || forced.contains(&i)).collect();
    let estimates = estimates(p, &statuses, &store, &building)?;
    if json {
        let stages: Vec<_> = dag
            .closure(&idx)
            .into_iter()
            .map(|i| {
                let (s, st) = (&p.stages[i], &statuses[i]);
                let k = building.iter().position(|&b| b == i);
                let reasons = if st.state == State::Fresh && k.is_some() { vec!["forced".to_string()] } else { st.reasons.clone() };
                json!({
                    "name": s.name, "kind": s.kind.kind, "build": k.is_some(), "pull": pulls(i), "state": st.state, "reasons": reasons,
                    "estimate": k.and_then(|k| estimates[k].clone()),
                })
            })
            .collect();
        let would_pull = dag.closure(&idx).into_iter().filter(|&i| pulls(i)).count();
        return print_json(&json!({ "stages": stages, "would_build": building.len(), "would_pull": would_pull }));
    }
    for i in dag.closure(&idx) {
        let (s, st) = (&p.stages[i], &statuses[i]);
        match building.iter().position(|&b| b == i) {
            None if pulls(i) => {
                outln!("{:>12} {} from {}", style("Would pull").blue().bold(), s.name, p.remote.as_ref().map_or("", |r| &r.url))
            }
            None => outln!("{:>12} {}", style("Fresh").green(), s.name),
            Some(k) => {
                let why = if st.state == State::Fresh { "forced".to_string() } else { st.reasons.join("; ") };
                outln!("{:>12} {} ({}): {why}", style("Would build").yellow().bold(), s.name, s.kind.kind);
                for line in estimates[k].iter().flat_map(|e| e.lines()) {
                    outln!("{:>12} {line}", "");
                }
            }
        }
    }
    outln!("{} stage(s) would be built", building.len());
    Ok(())
}

/// The stage runner's estimates for `stages`, given the inputs built so far.
fn estimates(p: &Pipeline, statuses: &[Status], store: &Store, stages: &[usize]) -> Result<Vec<Option<String>>> {
    if !stages.iter().any(|&i| p.stages[i].kind.estimates) {
        return Ok(vec![None; stages.len()]);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let specs: Vec<Spec> = stages
        .iter()
        .map(|&i| {
            let s = &p.stages[i];
            let mut ctx = StageCtx::new(&s.name, &p.root, Path::new(""), Path::new(""));
            for (slot, up) in &s.inputs {
                let u = p.index(up).expect("checked reference");
                if let (State::Fresh, Some(m)) = (statuses[u].state, &statuses[u].manifest) {
                    ctx.inputs.insert(slot.clone(), store.out_dir(&m.stage, &m.key));
                }
            }
            ctx.device = p.device.clone();
            ctx.threads = s.resolved.resources.threads.unwrap_or(threads).min(threads);
            Spec { kind: s.kind.kind.clone(), params: s.resolved.params.clone(), ctx }
        })
        .collect();
    crate::runner::estimates(&specs)
}

/// `estimate STAGE`: size, compute, memory and expected time of building it.
pub fn estimate(file: &Path, name: &str, json: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let i = p.select_one(name)?;
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(p, dag, &store, None)?;
    let estimate = estimates(p, &statuses, &store, &[i])?.pop().flatten();
    if json {
        return print_json(&json!({ "name": p.stages[i].name, "kind": p.stages[i].kind.kind, "estimate": estimate }));
    }
    match estimate {
        Some(text) => print!("{text}"),
        None => outln!("stage `{name}` ({}) gives no estimate: it is cheap to build", p.stages[i].kind.kind),
    }
    Ok(())
}

/// The current artifact of `name`, or an error saying how to build it.
fn fresh_out(file: &Path, name: &str) -> Result<PathBuf> {
    let (p, dag) = load(file)?;
    let i = p.select_one(name)?;
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(p, dag, &store, None)?;
    match &statuses[i].manifest {
        Some(m) if statuses[i].state == State::Fresh => Ok(store.out_dir(&m.stage, &m.key)),
        _ => bail!(ConfigError(format!("stage `{name}` is {}: run `llmflow run {name}` first", statuses[i].state.as_str()))),
    }
}

/// `generate`: the stage runner loads the model and samples.
pub fn generate(file: &Path, stage: &str, prompt: String, sampling: Sampling) -> Result<()> {
    let model = fresh_out(file, stage)?;
    let request = serde_json::to_vec(&GenerateRequest { model, prompt, sampling })?;
    let mut child = std::process::Command::new(crate::runner::runner()?).arg("generate").stdin(std::process::Stdio::piped()).spawn()?;
    child.stdin.take().expect("piped").write_all(&request)?;
    if !child.wait()?.success() {
        bail!(StageFailed(format!("generation from `{stage}` failed")));
    }
    Ok(())
}

/// `export`: the stage runner writes the Hugging Face layout.
pub fn export(file: &Path, stage: &str, out: &Path) -> Result<()> {
    let dir = fresh_out(file, stage)?;
    let status = std::process::Command::new(crate::runner::runner()?).arg("export").arg(&dir).arg(out).status()?;
    if !status.success() {
        bail!(StageFailed(format!("exporting `{stage}` failed")));
    }
    outln!("exported `{stage}` to {} (config.json, model.safetensors, tokenizer.json)", out.display());
    Ok(())
}

/// `kinds [KIND]`: every kind in a line, or KIND's params as TOML (what
/// the stage runner generates from the kind's code and doc comments).
pub fn kinds(kind: Option<&str>, json: bool) -> Result<()> {
    let known = crate::runner::list()?;
    if json {
        let shown: Vec<_> = known.iter().filter(|k| kind.is_none_or(|kind| k.kind == kind)).collect();
        if shown.is_empty() {
            bail!(ConfigError(format!("unknown stage kind `{}` (`llmflow kinds` lists them)", kind.unwrap_or_default())));
        }
        return print_json(&serde_json::to_value(shown)?);
    }
    let Some(kind) = kind else {
        for k in known {
            outln!("{:<18} v{}  {}", k.kind, k.version, k.summary);
        }
        return Ok(());
    };
    if !known.iter().any(|k| k.kind == kind) {
        let names: Vec<&str> = known.iter().map(|k| k.kind.as_str()).collect();
        let hint = suggest(kind, &names);
        bail!(ConfigError(format!("unknown stage kind `{kind}`{hint} (`llmflow kinds` lists them)")));
    }
    let status = std::process::Command::new(crate::runner::runner()?).args(["describe", kind]).status()?;
    if !status.success() {
        bail!("`llmflow-stage describe {kind}` failed");
    }
    Ok(())
}

pub fn hash(files: &[PathBuf]) -> Result<()> {
    for f in files {
        outln!("{}  {}", crate::hash::hash_file(f)?, f.display());
    }
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
