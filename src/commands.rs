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

use crate::config::{ConfigError, Pipeline};
use crate::exec::{self, RunOptions, StageFailed, INTERRUPTED};
use crate::graph::{Dag, Format};
use crate::plan::{self, State, Status, STATES};
use crate::protocol::{GenerateRequest, Sampling, Spec, StageCtx};
use crate::store::{self, Access, Integrity, Store};
use crate::ui::Ui;

/// `println!` that returns the error instead of panicking, so output piped
/// into `head` ends quietly (main turns a broken pipe into exit 0).
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*)?
    };
}

/// A command loads one pipeline and exits, so the pipeline is never freed:
/// freeing 10,000 stages an allocation at a time costs a no-op `status` a
/// tenth of its time.
fn load(file: &Path) -> Result<(&'static Pipeline, &'static Dag)> {
    let p: &'static Pipeline = Box::leak(Box::new(Pipeline::load(file)?));
    Ok((p, Box::leak(Box::new(Dag::new(p)))))
}

pub fn run(file: &Path, targets: Vec<String>, dry_run: bool, force: Vec<String>, jobs: Option<usize>, keep_going: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    if dry_run {
        return plan_only(p, dag, &targets, &force);
    }
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))?;
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    exec::run(p, dag, &RunOptions { targets, force, jobs, keep_going }, &Ui::new())
}

/// `run --dry-run`: what would be built, why, and what it would cost.
fn plan_only(p: &Pipeline, dag: &Dag, targets: &[String], force: &[String]) -> Result<()> {
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(p, dag, &store)?;
    let idx = p.select_all(targets)?;
    let forced: BTreeSet<usize> = p.select_all(force)?.into_iter().collect();
    let building: Vec<usize> =
        dag.closure(&idx).into_iter().filter(|&i| statuses[i].state != State::Fresh || forced.contains(&i)).collect();
    let estimates = estimates(p, &statuses, &store, &building)?;
    for i in dag.closure(&idx) {
        let (s, st) = (&p.stages[i], &statuses[i]);
        match building.iter().position(|&b| b == i) {
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
    crate::kinds::estimates(&specs)
}

/// `estimate STAGE`: size, compute, memory and expected time of building it.
pub fn estimate(file: &Path, name: &str) -> Result<()> {
    let (p, dag) = load(file)?;
    let i = p.select_one(name)?;
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(p, dag, &store)?;
    match estimates(p, &statuses, &store, &[i])?.pop().flatten() {
        Some(text) => print!("{text}"),
        None => outln!("stage `{name}` ({}) gives no estimate: it is cheap to build", p.stages[i].kind.kind),
    }
    Ok(())
}

pub fn status(file: &Path, json: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(p, dag, &store)?;
    // One write at the end: a line at a time costs a 10,000-stage pipeline more than computing it.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        let stages: Vec<_> = dag
            .order
            .iter()
            .map(|&i| {
                let (s, st) = (&p.stages[i], &statuses[i]);
                json!({
                    "name": s.name,
                    "stage": s.base,
                    "variant": s.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
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
        writeln!(out, "{}", serde_json::to_string_pretty(&json!({ "pipeline": p.name, "artifacts": p.artifacts, "stages": stages }))?)?;
        return Ok(out.flush()?);
    }
    let count = |members: &mut dyn Iterator<Item = &Status>| {
        let mut counts = [0usize; STATES.len()];
        for st in members {
            counts[st.state as usize] += 1;
        }
        let parts: Vec<String> = STATES.iter().zip(counts).filter(|(_, n)| *n > 0).map(|(s, n)| format!("{n} {}", s.as_str())).collect();
        (counts, parts.join(", "))
    };
    // A swept stage is a header with its variants indented under it.
    let shown = |s: &crate::config::StageDef| if s.labels.is_empty() { s.name.clone() } else { format!("  {}", &s.name[s.base.len()..]) };
    let width = p.stages.iter().map(|s| shown(s).len().max(s.base.len())).max().unwrap_or(0);
    let kwidth = p.stages.iter().map(|s| s.kind.kind.len()).max().unwrap_or(0);
    for group in dag.groups(p) {
        let first = &p.stages[group[0]];
        if !first.labels.is_empty() {
            let (_, summary) = count(&mut group.iter().map(|&i| &statuses[i]));
            writeln!(out, "{:<7}  {:<width$}  {:<kwidth$}  {} variants: {summary}", "", first.base, first.kind.kind, group.len())?;
        }
        for &i in &group {
            let (s, st) = (&p.stages[i], &statuses[i]);
            let state = match st.state {
                State::Fresh => style(st.state.as_str()).green(),
                State::Stale => style(st.state.as_str()).yellow(),
                State::Missing => style(st.state.as_str()).dim(),
                State::Queued | State::Running => style(st.state.as_str()).cyan(),
                State::Failed => style(st.state.as_str()).red().bold(),
            };
            let detail = match (&st.state, &st.key) {
                (State::Fresh, Some(key)) => key[..12].to_string(),
                _ => st.reasons.first().cloned().unwrap_or_default(),
            };
            let kind = if s.labels.is_empty() { s.kind.kind.as_str() } else { "" };
            writeln!(out, "{:<7}  {:<width$}  {:<kwidth$}  {detail}", state, shown(s), kind)?;
            for reason in st.reasons.iter().skip(1) {
                writeln!(out, "{:<7}  {:<width$}  {:<kwidth$}  {reason}", "", "", "")?;
            }
            if let Some(log) = &st.log {
                writeln!(out, "{:<7}  {:<width$}  {:<kwidth$}  log: {}", "", "", "", log.display())?;
            }
        }
    }
    let (counts, _) = count(&mut statuses.iter());
    writeln!(
        out,
        "\n{} stages: {} fresh, {} stale, {} missing, {} queued, {} running, {} failed",
        p.stages.len(),
        counts[State::Fresh as usize],
        counts[State::Stale as usize],
        counts[State::Missing as usize],
        counts[State::Queued as usize],
        counts[State::Running as usize],
        counts[State::Failed as usize]
    )?;
    Ok(out.flush()?)
}

pub fn dag(file: &Path, format: Format) -> Result<()> {
    let (p, dag) = load(file)?;
    print!("{}", dag.render(p, format));
    Ok(())
}

pub fn show(file: &Path, spec: &str, json: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let selected = p.select(spec)?;
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(p, dag, &store)?;
    if let [i] = selected[..] {
        show_one(p, &store, &statuses[i], i, json)
    } else {
        show_variants(p, &store, &statuses, &selected, json)
    }
}

/// Several variants of a swept stage: a line each, with the metrics they all have.
fn show_variants(p: &Pipeline, store: &Store, statuses: &[Status], selected: &[usize], json: bool) -> Result<()> {
    let rows: Vec<(usize, Option<store::Manifest>)> =
        selected.iter().map(|&i| (i, current_or_latest(store, &statuses[i], &p.stages[i].name))).collect();
    if json {
        let variants: Vec<_> = rows
            .iter()
            .map(|(i, m)| {
                let (s, st) = (&p.stages[*i], &statuses[*i]);
                json!({
                    "name": s.name, "state": st.state, "reasons": st.reasons,
                    "variant": s.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                    "out": m.as_ref().map(|m| store.out_dir(&m.stage, &m.key)), "metrics": m.as_ref().map(|m| &m.metrics),
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&json!({ "stage": p.stages[selected[0]].base, "variants": variants }))?);
        return Ok(());
    }
    let first = &p.stages[selected[0]];
    outln!("{} ({}) — {} variants", style(&first.base).bold(), first.kind.kind, selected.len());
    let numeric =
        |m: &store::Manifest| -> BTreeSet<String> { m.metrics.iter().filter(|(_, v)| v.is_number()).map(|(k, _)| k.clone()).collect() };
    let mut metrics: Option<BTreeSet<String>> = None;
    for m in rows.iter().filter_map(|(_, m)| m.as_ref()) {
        let mine = numeric(m);
        metrics = Some(metrics.map_or(mine.clone(), |all| all.intersection(&mine).cloned().collect()));
    }
    let metrics: Vec<String> = metrics.unwrap_or_default().into_iter().collect();
    let width = rows.iter().map(|(i, _)| p.stages[*i].name.len() - first.base.len()).max().unwrap_or(0);
    let header: Vec<String> = metrics.iter().map(|k| format!("{k:>12}")).collect();
    outln!("  {:<width$}  {:<7}  {}", "variant", "state", header.join(" "));
    for (i, m) in &rows {
        let (s, st) = (&p.stages[*i], &statuses[*i]);
        let values: Vec<String> = metrics
            .iter()
            .map(|k| match m.as_ref().and_then(|m| m.metrics.get(k)).and_then(|v| v.as_f64()) {
                Some(v) => format!("{:>12}", format!("{v:.4}")),
                None => format!("{:>12}", "-"),
            })
            .collect();
        outln!("  {:<width$}  {:<7}  {}", &s.name[s.base.len()..], st.state.as_str(), values.join(" "));
    }
    outln!("`llmflow show 'VARIANT'` shows one, e.g. `llmflow show '{}'`", first.name);
    Ok(())
}

fn show_one(p: &Pipeline, store: &Store, st: &Status, i: usize, json: bool) -> Result<()> {
    let s = &p.stages[i];
    let name = s.name.as_str();
    let manifest = current_or_latest(store, st, name);
    if json {
        let out = manifest.as_ref().map(|m| store.out_dir(&m.stage, &m.key));
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "name": s.name, "kind": s.kind.kind, "state": st.state, "reasons": st.reasons,
                "out": out, "manifest": manifest, "log": manifest.as_ref().map(|m| store.log_path(&m.stage, &m.key)),
            }))?
        );
        return Ok(());
    }
    outln!("{} ({}) — {}", style(&s.name).bold(), s.kind.kind, st.state.as_str());
    for r in &st.reasons {
        outln!("  {r}");
    }
    let Some(m) = manifest else {
        outln!("no artifact built yet; run `llmflow run {name}`");
        return Ok(());
    };
    if st.state != State::Fresh {
        outln!("showing the last artifact built, which is not current:");
    }
    let total: u64 = m.files.iter().map(|f| f.size).sum();
    outln!("key       {}", m.key);
    outln!("out       {}", store.out_dir(&m.stage, &m.key).display());
    outln!("log       {}", store.log_path(&m.stage, &m.key).display());
    outln!("built     {} in {:.1}s on {} (llmflow {})", m.finished, m.duration_s, m.host, m.llmflow_version);
    outln!("digest    {}", m.output_digest);
    let out = store.out_dir(&m.stage, &m.key);
    for file in s.kind.show.iter().filter(|f| m.files.iter().any(|mf| &mf.path == *f)) {
        outln!("see       {}", out.join(file).display());
    }
    for (slot, input) in &m.inputs {
        outln!("input     {slot} = {} ({})", input.stage, &input.digest[..12]);
    }
    for (file, digest) in &m.deps {
        outln!("file      {file} ({})", &digest[..12]);
    }
    outln!("params    {}", serde_json::to_string(&m.params)?);
    if !m.metrics.is_empty() {
        outln!("metrics");
        for (k, v) in &m.metrics {
            outln!("  {k:<24} {v}");
        }
    }
    outln!("files     {} ({})", m.files.len(), human_bytes(total));
    for f in m.files.iter().take(20) {
        outln!("  {:<40} {:>10}", f.path, human_bytes(f.size));
    }
    if m.files.len() > 20 {
        outln!("  … and {} more", m.files.len() - 20);
    }
    Ok(())
}

/// The current artifact of stage `name` if fresh, else the last one built
/// (which callers label as not current).
fn current_or_latest(store: &Store, st: &Status, name: &str) -> Option<store::Manifest> {
    let key = st.manifest.as_ref().map(|m| m.key.clone()).or_else(|| store.state(name).latest)?;
    store.read_manifest(name, &key)
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
                [] => bail!(ConfigError(
                    "no stage of the pipeline writes a report (see the README, \"Evaluation and the report card\")".into()
                )),
                many => bail!(ConfigError(format!(
                    "several stages write a report ({}): name one, e.g. `llmflow report {}`",
                    many.join(", "),
                    many[0]
                ))),
            }
        }
    };
    let i = p.select_one(&name)?;
    let kind = &p.stages[i].kind;
    let Some(report) = &kind.report else {
        bail!(ConfigError(format!("stage `{name}` ({}) writes no report", kind.kind)));
    };
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(p, dag, &store)?;
    let Some(m) = current_or_latest(&store, &statuses[i], &name) else {
        bail!(ConfigError(format!("no report of `{name}` is built yet: run `llmflow run {name}` first")));
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

/// `verify`: re-hashes every artifact in the store (files missing, changed
/// or not in the manifest) and every file the pipeline's stages read,
/// whatever their stat says.
pub fn verify(file: &Path) -> Result<()> {
    let (p, _) = load(file)?;
    let store = Store::new(p.artifacts.clone());
    let started = Instant::now();
    let (mut ok, mut bad, mut bytes) = (0, 0, 0u64);
    let damaged = style("DAMAGED").red().bold();
    for stage in store.stages() {
        for key in store.keys(&stage) {
            let Some(m) = store.read_manifest(&stage, &key) else {
                outln!("{damaged:>9} {stage}/{key}: no readable manifest.json");
                bad += 1;
                continue;
            };
            bytes += m.files.iter().map(|f| f.size).sum::<u64>();
            let head = m.head();
            let mut problems = match store.check(&head, true) {
                Integrity::Intact => Vec::new(),
                Integrity::Damaged(files) => files.into_iter().map(|f| format!("{f} (missing or changed)")).collect(),
            };
            problems.extend(store.extra_files(&head).into_iter().map(|f| format!("{f} (not in the manifest)")));
            if problems.is_empty() {
                ok += 1;
            } else {
                bad += 1;
                outln!("{damaged:>9} {stage}/{}: {}", &key[..12], problems.join(", "));
            }
        }
    }
    // Files outside the store are trusted by stat in `status`; here they are re-hashed.
    let mut cache = crate::hash::StatCache::open(store.stat_cache_path());
    let roots: Vec<PathBuf> = p.stages.iter().flat_map(|s| s.resolved.files.iter().map(|f| p.root.join(f))).collect();
    let changed = cache.recheck(&roots)?;
    cache.save();
    for path in &changed {
        let shown = path.strip_prefix(&p.root).unwrap_or(path);
        outln!(
            "{:>9} {}: its contents changed but its size and mtime did not; the stages reading it rebuild on the next run",
            style("CHANGED").red().bold(),
            shown.display()
        );
    }
    let secs = started.elapsed().as_secs_f64();
    outln!(
        "verified {} artifact(s), {} in {secs:.2}s: {ok} intact, {bad} damaged; {} dependency file(s) re-hashed, {} changed",
        ok + bad,
        human_bytes(bytes),
        roots.len(),
        changed.len()
    );
    if bad > 0 || !changed.is_empty() {
        bail!(StageFailed(format!(
            "{bad} damaged artifact(s), {} changed dependency file(s); `llmflow run` rebuilds what they affect",
            changed.len()
        )));
    }
    Ok(())
}

/// `gc`: removes what the store made and no pipeline using it still needs.
/// It only ever removes `<stage>/<key>` folders holding a manifest, their
/// logs, and the store's own work, temporary and state files; it takes the
/// store alone, so no run is using what it removes.
pub fn gc(file: &Path, dry_run: bool, wait: bool, only_this_pipeline: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let store = Store::new(p.artifacts.clone());
    if !store.root.join(store::MARKER).is_file() {
        bail!(ConfigError(format!(
            "{} is not an llmflow artifact store (it has no {}): gc removes nothing there",
            store.root.display(),
            store::MARKER
        )));
    }
    let _held = store.hold(Access::Exclusive, &format!("llmflow gc -f {}", p.file.display()), wait, |holders| {
        eprintln!("waiting for the store, in use by: {}", holders.join("; "))
    })?;
    let mut keep = in_use(p, dag, &store)?;
    let mut forgotten = Vec::new();
    if !only_this_pipeline {
        for (entry, other) in store.pipelines() {
            if other == p.file {
                continue;
            }
            if !other.exists() {
                forgotten.push(entry);
                continue;
            }
            let q = Pipeline::load(&other).map_err(|e| {
                ConfigError(format!(
                    "{} also builds into this store and does not load:\n{e}\n  fix it, or run `llmflow gc --only-this-pipeline` to keep only what {} uses",
                    other.display(),
                    p.file.display()
                ))
            })?;
            if std::fs::canonicalize(&q.artifacts).ok() == std::fs::canonicalize(&store.root).ok() {
                keep.extend(in_use(&q, &Dag::new(&q), &store)?);
            }
        }
    }
    let mut doomed: Vec<PathBuf> = Vec::new();
    for stage in store.stages() {
        for key in store.keys(&stage) {
            let dir = store.artifact_dir(&stage, &key);
            let ours = is_key(&key)
                && fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
                && fs::symlink_metadata(dir.join("manifest.json")).is_ok_and(|m| m.is_file());
            if ours && !keep.contains(&(stage.clone(), key.clone())) {
                doomed.push(dir);
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
    // Results a kind caches across builds go with the last artifact linking them.
    let unlinked = store.unlinked_cache_files(&doomed);
    doomed.extend(unlinked);
    // No run holds the store, so every temporary build and state file is left over.
    doomed.extend(fs::read_dir(store.tmp_root()).into_iter().flatten().flatten().map(|e| e.path()));
    let state = store.root.join(".state");
    doomed.extend(
        fs::read_dir(&state)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.') && n.contains(".tmp"))),
    );
    let mut freed = 0;
    let mut count = 0;
    for path in doomed.iter().filter(|p| fs::symlink_metadata(p).is_ok()) {
        let size = store::disk_usage(path);
        freed += size;
        let shown = path.strip_prefix(&store.root).unwrap_or(path);
        if path.is_dir() && path.parent().and_then(|d| d.parent()) == Some(store.root.as_path()) {
            count += 1;
        }
        outln!("{} {} ({})", if dry_run { "would remove" } else { "removing" }, shown.display(), human_bytes(size));
        if !dry_run {
            store::remove_tree(path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    if !dry_run {
        for stage in store.stages() {
            let _ = fs::remove_dir(store.root.join(stage)); // only if now empty
        }
        for entry in forgotten {
            let _ = fs::remove_file(entry);
        }
    }
    let verb = if dry_run { "would free" } else { "freed" };
    let whose = if only_this_pipeline { "by this pipeline" } else { "by any pipeline file using this store" };
    outln!("{count} artifact(s) unused {whose}; {verb} {}", human_bytes(freed));
    Ok(())
}

/// The artifacts `p` uses: each stage's current one and, where the key is
/// not known yet (an input must be rebuilt first), the last one built.
fn in_use(p: &Pipeline, dag: &Dag, store: &Store) -> Result<BTreeSet<(String, String)>> {
    let statuses = plan::statuses(p, dag, store)?;
    let mut keep = BTreeSet::new();
    for (s, st) in p.stages.iter().zip(&statuses) {
        if let Some(key) = &st.key {
            keep.insert((s.name.clone(), key.clone()));
        } else if let Some(latest) = store.state(&s.name).latest {
            keep.insert((s.name.clone(), latest));
        }
    }
    Ok(keep)
}

/// Whether `name` looks like an artifact key (64 hex digits).
fn is_key(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The current artifact of `name`, or an error saying how to build it.
fn fresh_out(file: &Path, name: &str) -> Result<PathBuf> {
    let (p, dag) = load(file)?;
    let i = p.select_one(name)?;
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(p, dag, &store)?;
    match &statuses[i].manifest {
        Some(m) if statuses[i].state == State::Fresh => Ok(store.out_dir(&m.stage, &m.key)),
        _ => bail!(ConfigError(format!("stage `{name}` is {}: run `llmflow run {name}` first", statuses[i].state.as_str()))),
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
    outln!("exported `{stage}` to {} (config.json, model.safetensors, tokenizer.json)", out.display());
    Ok(())
}

/// `kinds [KIND]`: every kind in a line, or KIND's params as TOML (what
/// the stage runner generates from the kind's code and doc comments).
pub fn kinds(kind: Option<&str>) -> Result<()> {
    let known = crate::kinds::list()?;
    let Some(kind) = kind else {
        for k in known {
            outln!("{:<18} v{}  {}", k.kind, k.version, k.summary);
        }
        return Ok(());
    };
    if !known.iter().any(|k| k.kind == kind) {
        let names: Vec<&str> = known.iter().map(|k| k.kind.as_str()).collect();
        let hint = crate::config::suggest(kind, &names);
        bail!(ConfigError(format!("unknown stage kind `{kind}`{hint} (`llmflow kinds` lists them)")));
    }
    let status = std::process::Command::new(crate::kinds::runner()?).args(["describe", kind]).status()?;
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
