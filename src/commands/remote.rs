//! Sharing artifacts: `push` and `pull` against `[pipeline] remote`.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Result};
use console::style;
use serde_json::json;

use super::{load, outln, print_json};
use crate::config::Pipeline;
use crate::error::{ConfigError, StageFailed};
use crate::plan::{self, State};
use crate::remote::Remote;
use crate::store::{Access, Store, StoreLock};
use crate::ui::Ui;

/// The pipeline's remote, or the error saying why there is none.
fn remote_of(p: &Pipeline, verb: &str, ui: &Ui) -> Result<Remote> {
    if crate::remote::OFFLINE.load(std::sync::atomic::Ordering::Relaxed) {
        bail!(ConfigError(format!("`{verb}` needs the remote, and --offline leaves it alone")));
    }
    match Remote::of(p.remote.as_ref(), ui) {
        Some(remote) => Ok(remote),
        None => bail!(ConfigError(format!(
            "{} sets no remote: add `remote = \"s3://BUCKET/PREFIX\"` (or \"file:///PATH\") to its [pipeline] table",
            p.file.display()
        ))),
    }
}

/// The pipeline's store, held shared for `verb` as a run holds it.
fn hold_store(p: &Pipeline, verb: &str, ui: &Ui) -> Result<(Store, StoreLock)> {
    let store = Store::new(p.artifacts.clone());
    store.create()?;
    let held = store.hold(Access::Shared, &format!("llmflow {verb} -f {}", p.file.display()), true, |holders| {
        ui.status("Waiting", &format!("for the store: {}", holders.join("; ")))
    })?;
    Ok((store, held))
}

/// `push [STAGE…]`: uploads the artifacts of the stages named and what they
/// need (default: every stage) that are built here and not on the remote.
pub fn push(file: &Path, targets: &[String], json: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let ui = Ui::new();
    let remote = remote_of(p, "push", &ui)?;
    let (store, _held) = hold_store(p, "push", &ui)?;
    let statuses = plan::statuses(p, dag, &store, None)?;
    let mut rows = Vec::new();
    let (mut sent, mut bytes) = (0usize, 0u64);
    for i in dag.closure(&p.select_all(targets)?) {
        let (s, st) = (&p.stages[i], &statuses[i]);
        let manifest = st.manifest.as_ref().filter(|_| st.state == State::Fresh).and_then(|h| store.read_manifest(&h.stage, &h.key));
        let Some(manifest) = manifest else {
            if !json {
                ui.status("Skipped", &format!("{} ({}: not built here)", s.name, st.state.as_str()));
            }
            rows.push(json!({ "name": s.name, "state": st.state, "pushed": false }));
            continue;
        };
        let pushed = remote.push(&store, &manifest).map_err(|e| StageFailed(format!("cannot push {}: {e:#}", s.name)))?;
        if !json {
            ui.status(if pushed.already { "Present" } else { "Pushed" }, &format!("{}: {}", s.name, pushed.describe()));
        }
        sent += pushed.blobs;
        bytes += pushed.bytes;
        rows.push(json!({ "name": s.name, "state": st.state, "pushed": !pushed.already, "blobs": pushed.blobs, "bytes": pushed.bytes }));
    }
    if json {
        return print_json(&json!({ "remote": remote.url(), "stages": rows, "blobs": sent, "bytes": bytes }));
    }
    outln!("{sent} file(s), {} sent to {}", crate::remote::megabytes(bytes), remote.url());
    Ok(())
}

/// `pull [STAGE…]`: fetches the stages named and what they need (default:
/// every stage) that the remote has and this store lacks. Fails when one of
/// them is neither here nor there.
pub fn pull(file: &Path, targets: &[String], json: bool) -> Result<()> {
    let (p, dag) = load(file)?;
    let ui = Ui::new();
    let remote = remote_of(p, "pull", &ui)?;
    let (store, _held) = hold_store(p, "pull", &ui)?;
    store.register(&p.file)?;
    let statuses = plan::statuses(p, dag, &store, Some(&remote))?;
    if let Some(why) = remote.down() {
        bail!(StageFailed(why));
    }
    let mut rows = Vec::new();
    let mut missing = Vec::new();
    for i in dag.closure(&p.select_all(targets)?) {
        let (s, st) = (&p.stages[i], &statuses[i]);
        let pulled = match (st.state, &st.key) {
            (State::Remote, Some(key)) => {
                let _lock = store.lock(&s.name, |_| ui.status("Waiting", &format!("for {}: another process is building it", s.name)))?;
                match remote.pull(&store, &s.name, key) {
                    Ok(Some(_)) => true,
                    Ok(None) => bail!(StageFailed(format!("{}'s entry left the remote while it was pulled", s.name))),
                    Err(e) => bail!(StageFailed(format!("cannot pull {}: {e:#}", s.name))),
                }
            }
            (State::Fresh, _) => false,
            _ => {
                missing.push(s.name.clone());
                rows.push(json!({ "name": s.name, "state": st.state, "pulled": false }));
                continue;
            }
        };
        if pulled && !json {
            ui.status("Pulled", &format!("{} from {}", s.name, remote.url()));
        }
        rows.push(json!({ "name": s.name, "state": if pulled { State::Fresh } else { st.state }, "pulled": pulled }));
    }
    if json {
        print_json(&json!({ "remote": remote.url(), "stages": rows }))?;
    } else {
        let n = rows.iter().filter(|r| r["pulled"] == true).count();
        outln!("{n} stage(s) pulled from {}", remote.url());
    }
    if !missing.is_empty() {
        bail!(StageFailed(format!(
            "{} stage(s) neither built here nor on the remote: {}",
            missing.len(),
            missing.iter().map(|m| format!("{}", style(m).bold())).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}
