//! Looking at the pipeline and its artifacts: `status`, `show`, `report`.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use console::style;
use serde_json::json;

use super::{human_bytes, load, outln, print_json};
use crate::config::{Pipeline, StageDef};
use crate::error::ConfigError;
use crate::plan::{self, State, Status, STATES};
use crate::remote::Remote;
use crate::store::{Manifest, Store};
use crate::ui::Ui;

/// `status [STAGE…]`: the stages named and what they need, as `run` would
/// build them (default: every stage).
pub fn status(file: &Path, targets: &[String], json: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let shown: Vec<usize> = dag.closure(&p.select_all(targets)?);
    let is_shown = {
        let mut mark = vec![targets.is_empty(); p.stages.len()];
        shown.iter().for_each(|&i| mark[i] = true);
        mark
    };
    let store = Store::new(p.artifacts.clone());
    let remote = Remote::of(p.remote.as_ref(), &Ui::new());
    let statuses = plan::statuses(p, dag, &store, remote.as_ref())?;
    // One write at the end: a line at a time costs a 10,000-stage pipeline more than computing it.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        let stages: Vec<_> = shown
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
    let label = |s: &StageDef| if s.labels.is_empty() { s.name.clone() } else { format!("  {}", &s.name[s.base.len()..]) };
    let width = p.stages.iter().map(|s| label(s).len().max(s.base.len())).max().unwrap_or(0);
    let kwidth = p.stages.iter().map(|s| s.kind.kind.len()).max().unwrap_or(0);
    for group in p.groups(dag) {
        let group: Vec<usize> = group.into_iter().filter(|&i| is_shown[i]).collect();
        let Some(&first) = group.first() else { continue };
        let first = &p.stages[first];
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
                State::Remote => style(st.state.as_str()).blue(),
            };
            let detail = match (&st.state, &st.key) {
                (State::Fresh, Some(key)) => key[..12].to_string(),
                _ => st.reasons.first().cloned().unwrap_or_default(),
            };
            let kind = if s.labels.is_empty() { s.kind.kind.as_str() } else { "" };
            writeln!(out, "{:<7}  {:<width$}  {:<kwidth$}  {detail}", state, label(s), kind)?;
            for reason in st.reasons.iter().skip(1) {
                writeln!(out, "{:<7}  {:<width$}  {:<kwidth$}  {reason}", "", "", "")?;
            }
            if let Some(log) = &st.log {
                writeln!(out, "{:<7}  {:<width$}  {:<kwidth$}  log: {}", "", "", "", log.display())?;
            }
        }
    }
    let (counts, _) = count(&mut shown.iter().map(|&i| &statuses[i]));
    writeln!(
        out,
        "\n{} stages: {} fresh, {} stale, {} missing, {} queued, {} running, {} failed{}",
        shown.len(),
        counts[State::Fresh as usize],
        counts[State::Stale as usize],
        counts[State::Missing as usize],
        counts[State::Queued as usize],
        counts[State::Running as usize],
        counts[State::Failed as usize],
        match counts[State::Remote as usize] {
            0 => String::new(),
            n => format!(", {n} on remote"),
        }
    )?;
    Ok(out.flush()?)
}

pub fn show(file: &Path, spec: &str, json: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let selected = p.select(spec)?;
    let store = Store::new(p.artifacts.clone());
    let statuses = plan::statuses(p, dag, &store, None)?;
    if let [i] = selected[..] {
        show_one(p, &store, &statuses[i], i, json)
    } else {
        show_variants(p, &store, &statuses, &selected, json)
    }
}

/// Several variants of a swept stage: a line each, with the metrics they all have.
fn show_variants(p: &Pipeline, store: &Store, statuses: &[Status], selected: &[usize], json: bool) -> Result<()> {
    let rows: Vec<(usize, Option<Manifest>)> =
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
        return print_json(&json!({ "stage": p.stages[selected[0]].base, "variants": variants }));
    }
    let first = &p.stages[selected[0]];
    outln!("{} ({}) — {} variants", style(&first.base).bold(), first.kind.kind, selected.len());
    let numeric = |m: &Manifest| -> BTreeSet<String> { m.metrics.iter().filter(|(_, v)| v.is_number()).map(|(k, _)| k.clone()).collect() };
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
        return print_json(&json!({
            "name": s.name, "kind": s.kind.kind, "state": st.state, "reasons": st.reasons,
            "out": out, "manifest": manifest, "log": manifest.as_ref().map(|m| store.log_path(&m.stage, &m.key)),
        }));
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
fn current_or_latest(store: &Store, st: &Status, name: &str) -> Option<Manifest> {
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
    let statuses = plan::statuses(p, dag, &store, None)?;
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
