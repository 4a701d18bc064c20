//! The CLI's verbs, one function each.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use console::style;
use serde_json::json;

use crate::config::Pipeline;
use crate::exec::{self, RunOptions, StageFailed, INTERRUPTED};
use crate::graph::{Dag, Format};
use crate::plan::{self, State, Status};
use crate::protocol::{GenerateRequest, Sampling, Spec, StageCtx};
use crate::store::{self, Integrity, Store};
use crate::ui::Ui;

fn load(file: &Path) -> Result<(Pipeline, Dag)> {
    let p = Pipeline::load(file)?;
    let dag = Dag::new(&p)?;
    Ok((p, dag))
}

pub fn run(file: &Path, targets: Vec<String>, dry_run: bool, force: Vec<String>, jobs: Option<usize>, keep_going: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    if dry_run {
        return plan_only(&p, &dag, &targets, &force);
    }
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))?;
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    exec::run(&p, &dag, &RunOptions { targets, force, jobs, keep_going }, &Ui::new())
}

/// `run --dry-run`: what would be built, why, and what it would cost.
fn plan_only(p: &Pipeline, dag: &Dag, targets: &[String], force: &[String]) -> Result<()> {
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(p, dag, &store)?;
    let idx: Vec<usize> = targets.iter().map(|t| p.index(t)).collect::<Result<_, _>>()?;
    let building: Vec<usize> =
        dag.closure(&idx).into_iter().filter(|&i| statuses[i].state != State::Fresh || force.contains(&p.stages[i].name)).collect();
    let estimates = estimates(p, &statuses, &store, &building)?;
    for i in dag.closure(&idx) {
        let (s, st) = (&p.stages[i], &statuses[i]);
        match building.iter().position(|&b| b == i) {
            None => println!("{:>12} {}", style("Fresh").green(), s.name),
            Some(k) => {
                let why = if st.state == State::Fresh { "forced".to_string() } else { st.reasons.join("; ") };
                println!("{:>12} {} ({}): {why}", style("Would build").yellow().bold(), s.name, s.kind.kind);
                for line in estimates[k].iter().flat_map(|e| e.lines()) {
                    println!("{:>12} {line}", "");
                }
            }
        }
    }
    println!("{} stage(s) would be built", building.len());
    Ok(())
}

/// The stage runner's estimates for `stages`, given the inputs built so far.
fn estimates(p: &Pipeline, statuses: &[Status], store: &Store, stages: &[usize]) -> Result<Vec<Option<String>>> {
    if stages.is_empty() {
        return Ok(Vec::new());
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
    crate::kinds::estimates(&specs)
}

/// `estimate STAGE`: size, compute, memory and expected time of building it.
pub fn estimate(file: &Path, name: &str) -> Result<()> {
    let (p, dag) = load(file)?;
    let i = p.index(name)?;
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(&p, &dag, &store)?;
    match estimates(&p, &statuses, &store, &[i])?.pop().flatten() {
        Some(text) => print!("{text}"),
        None => println!("stage `{name}` ({}) gives no estimate: it is cheap to build", p.stages[i].kind.kind),
    }
    Ok(())
}

pub fn status(file: &Path, json: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(&p, &dag, &store)?;
    if json {
        let stages: Vec<_> = dag
            .order
            .iter()
            .map(|&i| {
                let (s, st) = (&p.stages[i], &statuses[i]);
                json!({
                    "name": s.name,
                    "kind": s.kind.kind,
                    "state": st.state,
                    "key": st.key,
                    "reasons": st.reasons,
                    "out": st.manifest.as_ref().map(|m| store.out_dir(&m.stage, &m.key)),
                    "log": st.log,
                    "inputs": s.inputs,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json!({ "pipeline": p.name, "artifacts": p.artifacts, "stages": stages }))?);
        return Ok(());
    }
    let width = p.stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let kwidth = p.stages.iter().map(|s| s.kind.kind.len()).max().unwrap_or(0);
    for &i in &dag.order {
        let (s, st) = (&p.stages[i], &statuses[i]);
        let state = match st.state {
            State::Fresh => style(st.state.as_str()).green(),
            State::Stale => style(st.state.as_str()).yellow(),
            State::Missing => style(st.state.as_str()).dim(),
            State::Running => style(st.state.as_str()).cyan(),
            State::Failed => style(st.state.as_str()).red().bold(),
        };
        let detail = match (&st.state, &st.key) {
            (State::Fresh, Some(key)) => key[..12].to_string(),
            _ => st.reasons.first().cloned().unwrap_or_default(),
        };
        println!("{:<7}  {:<width$}  {:<kwidth$}  {detail}", state, s.name, s.kind.kind);
        for reason in st.reasons.iter().skip(1) {
            println!("{:<7}  {:<width$}  {:<kwidth$}  {reason}", "", "", "");
        }
        if let Some(log) = &st.log {
            println!("{:<7}  {:<width$}  {:<kwidth$}  log: {}", "", "", "", log.display());
        }
    }
    let count = |s: State| statuses.iter().filter(|x| x.state == s).count();
    println!(
        "\n{} stages: {} fresh, {} stale, {} missing, {} running, {} failed",
        p.stages.len(),
        count(State::Fresh),
        count(State::Stale),
        count(State::Missing),
        count(State::Running),
        count(State::Failed)
    );
    Ok(())
}

pub fn dag(file: &Path, format: Format) -> Result<()> {
    let (p, dag) = load(file)?;
    print!("{}", dag.render(&p, format));
    Ok(())
}

pub fn show(file: &Path, name: &str, json: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let i = p.index(name)?;
    let s = &p.stages[i];
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(&p, &dag, &store)?;
    let st: &Status = &statuses[i];
    let manifest = current_or_latest(&store, st, name);
    if json {
        let out = manifest.as_ref().map(|m| store.out_dir(&m.stage, &m.key));
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "name": s.name, "kind": s.kind.kind, "state": st.state, "reasons": st.reasons,
                "out": out, "manifest": manifest, "log": manifest.as_ref().map(|m| store.log_path(&m.stage, &m.key)),
            }))?
        );
        return Ok(());
    }
    println!("{} ({}) — {}", style(&s.name).bold(), s.kind.kind, st.state.as_str());
    for r in &st.reasons {
        println!("  {r}");
    }
    let Some(m) = manifest else {
        println!("no artifact built yet; run `llmflow run {name}`");
        return Ok(());
    };
    if st.state != State::Fresh {
        println!("showing the last artifact built, which is not current:");
    }
    let total: u64 = m.files.iter().map(|f| f.size).sum();
    println!("key       {}", m.key);
    println!("out       {}", store.out_dir(&m.stage, &m.key).display());
    println!("log       {}", store.log_path(&m.stage, &m.key).display());
    println!("built     {} in {:.1}s on {} (llmflow {})", m.finished, m.duration_s, m.host, m.llmflow_version);
    println!("digest    {}", m.output_digest);
    let out = store.out_dir(&m.stage, &m.key);
    for file in s.kind.show.iter().filter(|f| m.files.iter().any(|mf| &mf.path == *f)) {
        println!("see       {}", out.join(file).display());
    }
    for (slot, input) in &m.inputs {
        println!("input     {slot} = {} ({})", input.stage, &input.digest[..12]);
    }
    for (file, digest) in &m.deps {
        println!("file      {file} ({})", &digest[..12]);
    }
    println!("params    {}", serde_json::to_string(&m.params)?);
    if !m.metrics.is_empty() {
        println!("metrics");
        for (k, v) in &m.metrics {
            println!("  {k:<24} {v}");
        }
    }
    println!("files     {} ({})", m.files.len(), human_bytes(total));
    for f in m.files.iter().take(20) {
        println!("  {:<40} {:>10}", f.path, human_bytes(f.size));
    }
    if m.files.len() > 20 {
        println!("  … and {} more", m.files.len() - 20);
    }
    Ok(())
}

/// The current artifact of stage `name` if fresh, else the last one built
/// (which callers label as not current).
fn current_or_latest(store: &Store, st: &Status, name: &str) -> Option<store::Manifest> {
    st.manifest.clone().or_else(|| store.state(name).latest.and_then(|k| store.read_manifest(name, &k)))
}

/// `report [STAGE]`: the report card STAGE's kind declares (an eval stage's
/// `report.md`, or its `results.json` with `--json`); STAGE defaults to the
/// pipeline's only stage whose kind writes one.
pub fn report(file: &Path, stage: Option<&str>, json: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let name = match stage {
        Some(name) => name.to_string(),
        None => {
            let reporting: Vec<&str> = p.stages.iter().filter(|s| s.kind.report.is_some()).map(|s| s.name.as_str()).collect();
            match reporting.as_slice() {
                [one] => one.to_string(),
                [] => bail!(crate::config::ConfigError(
                    "no stage of the pipeline writes a report (see the README, \"Evaluation and the report card\")".into()
                )),
                many => bail!(crate::config::ConfigError(format!(
                    "several stages write a report ({}): name one, e.g. `llmflow report {}`",
                    many.join(", "),
                    many[0]
                ))),
            }
        }
    };
    let i = p.index(&name)?;
    let kind = &p.stages[i].kind;
    let Some(report) = &kind.report else {
        bail!(crate::config::ConfigError(format!("stage `{name}` ({}) writes no report", kind.kind)));
    };
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(&p, &dag, &store)?;
    let Some(m) = current_or_latest(&store, &statuses[i], &name) else {
        bail!(crate::config::ConfigError(format!("no report of `{name}` is built yet: run `llmflow run {name}` first")));
    };
    let out = store.out_dir(&m.stage, &m.key);
    let wanted = if json { &report.json } else { &report.text };
    let text = fs::read_to_string(out.join(wanted)).with_context(|| format!("cannot read {}", out.join(wanted).display()))?;
    if !json {
        if statuses[i].state != State::Fresh {
            eprintln!(
                "`{name}` is {}: this is the last report built; `llmflow run {name}` brings it up to date",
                statuses[i].state.as_str()
            );
        }
        eprintln!("{} (charts and loss curves beside it)", out.join(wanted).display());
    }
    print!("{text}");
    Ok(())
}

pub fn verify(file: &Path) -> Result<()> {
    let (p, _) = load(file)?;
    let store = Store::new(p.artifacts.clone());
    let started = Instant::now();
    let (mut ok, mut bad, mut bytes) = (0, 0, 0u64);
    for stage in store.stages() {
        for key in store.keys(&stage) {
            let Some(m) = store.read_manifest(&stage, &key) else {
                println!("{:>9} {stage}/{key}: no readable manifest.json", style("DAMAGED").red().bold());
                bad += 1;
                continue;
            };
            bytes += m.files.iter().map(|f| f.size).sum::<u64>();
            match store.check(&m, true) {
                Integrity::Intact => ok += 1,
                Integrity::Damaged(files) => {
                    bad += 1;
                    println!("{:>9} {stage}/{}: {}", style("DAMAGED").red().bold(), &key[..12], files.join(", "));
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("verified {} artifact(s), {} in {secs:.2}s: {ok} intact, {bad} damaged", ok + bad, human_bytes(bytes));
    if bad > 0 {
        bail!(StageFailed(format!("{bad} damaged artifact(s); `llmflow run` rebuilds them")));
    }
    Ok(())
}

pub fn gc(file: &Path, dry_run: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(&p, &dag, &store)?;
    // Keep each stage's current artifact; where the key is not known yet
    // (an input must be rebuilt first), keep the last one built.
    let mut keep: BTreeSet<(String, String)> = BTreeSet::new();
    for (s, st) in p.stages.iter().zip(&statuses) {
        if let Some(key) = &st.key {
            keep.insert((s.name.clone(), key.clone()));
        } else if let Some(latest) = store.state(&s.name).latest {
            keep.insert((s.name.clone(), latest));
        }
    }
    let mut doomed: Vec<PathBuf> = Vec::new();
    for stage in store.stages() {
        for key in store.keys(&stage) {
            if !keep.contains(&(stage.clone(), key.clone())) {
                doomed.push(store.artifact_dir(&stage, &key));
                doomed.push(store.log_path(&stage, &key));
            }
        }
    }
    let work = store.root.join(".work");
    for stage in fs::read_dir(&work).into_iter().flatten().flatten() {
        let name = stage.file_name().to_string_lossy().into_owned();
        for key in fs::read_dir(stage.path()).into_iter().flatten().flatten() {
            if !keep.contains(&(name.clone(), key.file_name().to_string_lossy().into_owned())) {
                doomed.push(key.path());
            }
        }
    }
    let mut freed = 0;
    let mut count = 0;
    for path in doomed.iter().filter(|p| p.exists()) {
        let size = store::disk_usage(path);
        freed += size;
        let shown = path.strip_prefix(&store.root).unwrap_or(path);
        if path.is_dir() && path.parent().and_then(|d| d.parent()) == Some(store.root.as_path()) {
            count += 1;
        }
        println!("{} {} ({})", if dry_run { "would remove" } else { "removing" }, shown.display(), human_bytes(size));
        if !dry_run {
            if path.is_dir() {
                fs::remove_dir_all(path)?;
            } else {
                fs::remove_file(path)?;
            }
        }
    }
    if !dry_run {
        for stage in store.stages() {
            let _ = fs::remove_dir(store.root.join(stage)); // only if now empty
        }
    }
    let verb = if dry_run { "would free" } else { "freed" };
    println!("{count} artifact(s) unused by the current pipeline; {verb} {}", human_bytes(freed));
    Ok(())
}

/// The current artifact of `name`, or an error saying how to build it.
fn fresh_out(file: &Path, name: &str) -> Result<PathBuf> {
    let (p, dag) = load(file)?;
    let i = p.index(name)?;
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(&p, &dag, &store)?;
    match &statuses[i].manifest {
        Some(m) if statuses[i].state == State::Fresh => Ok(store.out_dir(&m.stage, &m.key)),
        _ => bail!(crate::config::ConfigError(format!("stage `{name}` is {}: run `llmflow run {name}` first", statuses[i].state.as_str()))),
    }
}

/// `generate`: the stage runner loads the model and samples.
pub fn generate(file: &Path, stage: &str, prompt: String, sampling: Sampling) -> Result<()> {
    let model = fresh_out(file, stage)?;
    let request = serde_json::to_vec(&GenerateRequest { model, prompt, sampling })?;
    let mut child = std::process::Command::new(crate::kinds::runner()?).arg("generate").stdin(std::process::Stdio::piped()).spawn()?;
    child.stdin.take().expect("piped").write_all(&request)?;
    if !child.wait()?.success() {
        bail!(StageFailed(format!("generation from `{stage}` failed")));
    }
    Ok(())
}

/// `export`: the stage runner writes the Hugging Face layout.
pub fn export(file: &Path, stage: &str, out: &Path) -> Result<()> {
    let dir = fresh_out(file, stage)?;
    let status = std::process::Command::new(crate::kinds::runner()?).arg("export").arg(&dir).arg(out).status()?;
    if !status.success() {
        bail!(StageFailed(format!("exporting `{stage}` failed")));
    }
    println!("exported `{stage}` to {} (config.json, model.safetensors, tokenizer.json)", out.display());
    Ok(())
}

/// `kinds [KIND]`: every kind in a line, or KIND's params as TOML (what
/// the stage runner generates from the kind's code and doc comments).
pub fn kinds(kind: Option<&str>) -> Result<()> {
    let known = crate::kinds::list()?;
    let Some(kind) = kind else {
        for k in known {
            println!("{:<18} v{}  {}", k.kind, k.version, k.summary);
        }
        return Ok(());
    };
    if !known.iter().any(|k| k.kind == kind) {
        let names: Vec<&str> = known.iter().map(|k| k.kind.as_str()).collect();
        let hint = crate::config::suggest(kind, &names);
        bail!(crate::config::ConfigError(format!("unknown stage kind `{kind}`{hint} (`llmflow kinds` lists them)")));
    }
    let status = std::process::Command::new(crate::kinds::runner()?).args(["describe", kind]).status()?;
    if !status.success() {
        bail!("`llmflow-stage describe {kind}` failed");
    }
    Ok(())
}

pub fn hash(files: &[PathBuf]) -> Result<()> {
    for f in files {
        println!("{}  {}", crate::hash::hash_file(f)?, f.display());
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
