//! Running stages: the scheduler, the stage processes, and what the user sees.
//!
//! Every stage runs as a child process, `llmflow-stage SPEC` (installed beside
//! `llmflow`), so a crash in native code cannot take the scheduler down and
//! accelerator memory is freed when the stage ends. Only that binary links
//! libtorch; the scheduler starts in milliseconds. The
//! child is put in its own process group; on Ctrl-C the scheduler kills the
//! groups it started and publishes nothing partial. A stage with `executor =
//! "slurm"` runs the same command as a batch job instead ([`crate::slurm`]);
//! its output is published the same way.
//!
//! Independent stages run in parallel, bounded by `--jobs`, by the CPU threads
//! each local stage declares, and by one accelerator stage per device.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::protocol::{Resources, Spec, StageCtx};
use anyhow::{Context, Result};

use crate::config::{ConfigError, Pipeline};
use crate::graph::Dag;
use crate::hash::{self, StatCache};
use crate::plan::{self, State};
use crate::slurm::{self, Ended, Refused};
use crate::store::{self, Access, Head, InputRef, Integrity, Manifest, Store};
use crate::ui::Ui;

/// Set by the Ctrl-C handler; every running build watches it.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A stage failed; exit code 1.
#[derive(Debug)]
pub struct StageFailed(pub String);

impl std::fmt::Display for StageFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for StageFailed {}

/// The run was interrupted; exit code 130.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted; nothing partial was published")
    }
}
impl std::error::Error for Interrupted {}

pub struct RunOptions {
    pub targets: Vec<String>,
    pub force: Vec<String>,
    pub jobs: usize,
    pub keep_going: bool,
}

enum Outcome {
    Built(Arc<Head>),
    Fresh(Arc<Head>),
    Failed,
    /// Slurm refused the job at submission: a mistake in its settings.
    Refused,
    /// Not run because an input failed.
    Skipped,
}

impl Outcome {
    fn head(&self) -> Option<&Head> {
        self.shared_head().map(|m| &**m)
    }

    fn shared_head(&self) -> Option<&Arc<Head>> {
        match self {
            Outcome::Built(m) | Outcome::Fresh(m) => Some(m),
            _ => None,
        }
    }
}

/// One stage ready to build, with everything its thread needs.
struct Job {
    index: usize,
    stage: String,
    kind: String,
    version: u32,
    params: serde_json::Value,
    key_params: serde_json::Value,
    key: String,
    inputs: BTreeMap<String, InputRef>,
    /// Input slot → the upstream artifact.
    input_heads: BTreeMap<String, Arc<Head>>,
    deps: BTreeMap<String, String>,
    force: bool,
    /// A node's threads, shared by the stage's ranks on it.
    threads: usize,
    processes: usize,
    tasks_per_node: usize,
    slurm: Option<slurm::Request>,
}

pub fn run(p: &Pipeline, dag: &Dag, opts: &RunOptions, ui: &Ui) -> Result<()> {
    let targets: Vec<usize> = p.select_all(&opts.targets)?;
    let forced: HashSet<usize> = p.select_all(&opts.force)?.into_iter().collect();
    let wanted = dag.closure(&targets);
    // Fail on a missing file before touching the store.
    for &i in &wanted {
        let s = &p.stages[i];
        if let Some(f) = s.resolved.files.iter().find(|f| !p.root.join(f).exists()) {
            return Err(ConfigError(format!("{}: stage `{}` reads `{f}`, which does not exist", s.location, s.name)).into());
        }
    }
    let store = Arc::new(Store::new(p.artifacts.clone()));
    store.create()?;
    let _held = store.hold(Access::Shared, &format!("llmflow run -f {}", p.file.display()), true, |holders| {
        ui.status("Waiting", &format!("for the store: {}", holders.join("; ")))
    })?;
    store.register(&p.file)?;
    store.clean_stale_tmp();
    // Processes a stage leaves behind are re-parented to us when their parent
    // exits, so we can reap them and know they are gone (see `end_group`).
    // SAFETY: prctl with these arguments only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // What is fresh now, checked in parallel; a stage whose inputs are still
    // the ones the plan saw is not looked at again.
    let planned = plan::statuses(p, dag, &store)?;
    // A stage to build on Slurm needs `sbatch` here: say so before anything runs.
    for &i in &wanted {
        if let (Some(req), true) = (&p.stages[i].slurm, planned[i].state != State::Fresh || forced.contains(&i)) {
            slurm::sbatch(&p.stages[i].name, req)?;
            req.tasks_per_node(&p.stages[i].name, p.stages[i].resolved.resources.processes)?;
        }
    }
    let mut cache = StatCache::open(store.stat_cache_path());

    let started = Instant::now();
    let mut outcomes: HashMap<usize, Outcome> = HashMap::new();
    // What each running stage holds of this machine; `None` for a Slurm job.
    let mut running: HashMap<usize, Option<Resources>> = HashMap::new();
    let mut failed_any = false;
    let (tx, rx) = mpsc::channel::<(usize, Outcome)>();

    loop {
        let stop_starting = INTERRUPTED.load(Ordering::SeqCst) || (failed_any && !opts.keep_going);
        if !stop_starting {
            for &i in &wanted {
                if outcomes.contains_key(&i) || running.contains_key(&i) {
                    continue;
                }
                let ups = dag.upstream(i);
                if ups.iter().any(|u| matches!(outcomes.get(u), Some(Outcome::Failed | Outcome::Refused | Outcome::Skipped))) {
                    ui.status("Skipped", &format!("{} (an input failed)", p.stages[i].name));
                    outcomes.insert(i, Outcome::Skipped);
                    continue;
                }
                if !ups.iter().all(|u| outcomes.get(u).and_then(Outcome::head).is_some()) {
                    continue;
                }
                let s = &p.stages[i];
                let force = forced.contains(&i);
                // Fresh when planned, with every input the very artifact the plan saw: nothing to recompute.
                let known = &planned[i];
                let same_inputs = ups.iter().all(|u| match (outcomes.get(u), &planned[*u].manifest) {
                    (Some(Outcome::Fresh(now)), Some(then)) => now.output_digest == then.output_digest,
                    _ => false,
                });
                if let (false, State::Fresh, true, Some(m)) = (force, known.state, same_inputs, &known.manifest) {
                    outcomes.insert(i, Outcome::Fresh(Arc::clone(m)));
                    continue;
                }
                let mut inputs = BTreeMap::new();
                let mut input_heads = BTreeMap::new();
                for (slot, up) in &s.inputs {
                    let u = p.index(up).expect("checked reference");
                    let m = outcomes[&u].shared_head().expect("built");
                    inputs.insert(slot.clone(), InputRef { stage: up.clone(), digest: m.output_digest.clone() });
                    input_heads.insert(slot.clone(), Arc::clone(m));
                }
                let deps = plan::dep_digests(p, s, &mut cache)?;
                let key = plan::key_of(s, &inputs, &deps);
                if !force {
                    if let Some(m) = fresh_artifact(&store, &s.name, &key) {
                        outcomes.insert(i, Outcome::Fresh(Arc::new(m)));
                        continue;
                    }
                }
                let res = s.resolved.resources;
                // The same threads wherever it runs, unless its Slurm request sets them: a
                // stage's output may depend on how it splits its work.
                // A node's threads are shared by the stage's ranks on it (checked before the run).
                let tasks_per_node = match &s.slurm {
                    Some(req) => req.tasks_per_node(&s.name, res.processes)?,
                    None => 1,
                };
                let threads = match s.slurm.as_ref().and_then(|r| r.cpus_per_task) {
                    Some(cpus) => cpus * tasks_per_node,
                    None => res.threads.unwrap_or(cores).clamp(1, cores),
                };
                let held = s.slurm.is_none().then_some(res);
                let busy: usize = running.values().flatten().map(|r| r.threads.unwrap_or(cores).min(cores)).sum();
                let gpu_busy = running.values().flatten().any(|r| r.accelerator) && res.accelerator && p.device != "cpu";
                if !running.is_empty() && (running.len() >= opts.jobs || (held.is_some() && (busy + threads > cores || gpu_busy))) {
                    continue;
                }
                let job = Job {
                    index: i,
                    stage: s.name.clone(),
                    kind: s.kind.kind.to_string(),
                    version: s.kind.version,
                    params: s.resolved.params.clone(),
                    key_params: s.resolved.key_params.clone(),
                    key,
                    inputs,
                    input_heads,
                    deps,
                    force,
                    threads,
                    processes: res.processes,
                    tasks_per_node,
                    slurm: s.slurm.clone(),
                };
                running.insert(i, held);
                let (tx, store, ui, root, device) = (tx.clone(), store.clone(), ui.clone(), p.root.clone(), p.device.clone());
                std::thread::spawn(move || {
                    let outcome = build(&job, &store, &ui, &root, &device);
                    let _ = tx.send((job.index, outcome));
                });
            }
        }
        if running.is_empty() {
            break;
        }
        if let Ok((i, outcome)) = rx.recv_timeout(Duration::from_millis(100)) {
            running.remove(&i);
            failed_any |= matches!(outcome, Outcome::Failed | Outcome::Refused);
            outcomes.insert(i, outcome);
        }
    }
    cache.save();

    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    let count = |f: fn(&Outcome) -> bool| outcomes.values().filter(|o| f(o)).count();
    let built = count(|o| matches!(o, Outcome::Built(_)));
    let fresh = count(|o| matches!(o, Outcome::Fresh(_)));
    let failed = count(|o| matches!(o, Outcome::Failed));
    let refused = count(|o| matches!(o, Outcome::Refused));
    let skipped = count(|o| matches!(o, Outcome::Skipped));
    let secs = started.elapsed().as_secs_f64();
    let not_run = wanted.len() - outcomes.len() + skipped;
    if failed > 0 {
        return Err(StageFailed(format!("{} stage(s) failed; {built} built, {fresh} fresh, {not_run} not run", failed + refused)).into());
    }
    if refused > 0 {
        // Only mistakes in the pipeline file's Slurm settings: exit code 2.
        return Err(ConfigError(format!(
            "Slurm refused {refused} stage(s) for their `slurm` settings; {built} built, {fresh} fresh, {not_run} not run"
        ))
        .into());
    }
    if built == 0 {
        ui.status("Fresh", &format!("nothing to do: all {fresh} stage(s) are up to date ({secs:.2}s)"));
    } else {
        ui.status("Finished", &format!("{built} built, {fresh} fresh in {secs:.1}s"));
    }
    for &t in &targets {
        if let Some(m) = outcomes.get(&t).and_then(Outcome::head) {
            ui.status("Output", &format!("{}: {}", m.stage, store.out_dir(&m.stage, &m.key).display()));
        }
    }
    Ok(())
}

fn fresh_artifact(store: &Store, stage: &str, key: &str) -> Option<Head> {
    let m = store.read_head(stage, key)?;
    (store.check(&m, false) == Integrity::Intact).then_some(m)
}

/// Builds one stage in a child process and publishes its artifact.
fn build(job: &Job, store: &Store, ui: &Ui, root: &Path, device: &str) -> Outcome {
    match try_build(job, store, ui, root, device) {
        Ok(outcome) => outcome,
        Err(e) => {
            ui.error(&format!("stage `{}`: {e:#}", job.stage));
            Outcome::Failed
        }
    }
}

fn try_build(job: &Job, store: &Store, ui: &Ui, root: &Path, device: &str) -> Result<Outcome> {
    let _lock = store.lock(&job.stage, |pid| {
        let who = pid.map_or("another process".to_string(), |p| format!("process {p}"));
        ui.status("Waiting", &format!("for {}: {who} is building it", job.stage));
    })?;
    slurm::cancel_leftover(store, &job.stage);
    // Another run may have built it while we waited.
    if !job.force {
        if let Some(m) = fresh_artifact(store, &job.stage, &job.key) {
            return Ok(Outcome::Fresh(Arc::new(m)));
        }
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Ok(Outcome::Failed);
    }
    let tmp = store.make_tmp(&job.stage, &job.key)?;
    let dir = tmp.path.clone();
    let work = store.work_dir(&job.stage, &job.key);
    fs::create_dir_all(&work)?;
    let log_path = store.log_path(&job.stage, &job.key);
    fs::create_dir_all(log_path.parent().expect("has parent"))?;
    let log = File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;

    let mut ctx = StageCtx::new(&job.stage, root, &dir.join("out"), &work);
    ctx.inputs = job.input_heads.iter().map(|(slot, m)| (slot.clone(), store.out_dir(&m.stage, &m.key))).collect();
    ctx.cache = store.cache_dir(&job.kind);
    fs::create_dir_all(&ctx.cache)?;
    ctx.device = device.to_string();
    ctx.threads = job.threads;
    ctx.progress_file = Some(dir.join("progress"));
    let spec_path = dir.join("spec.json");
    let spec = Spec { kind: job.kind.clone(), params: job.params.clone(), ctx };
    fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;

    let start_time = store::now_rfc3339();
    let started = Instant::now();
    let bar = ui.stage_bar(&job.stage, &job.kind);
    let runner = runner_command(&spec_path, job.threads)?;
    let ended = match &job.slurm {
        None => run_local(runner, log, &dir, ui, &bar)?,
        Some(req) => match slurm::submit(
            store,
            &job.stage,
            &job.key,
            req,
            &runner,
            job.threads / job.tasks_per_node,
            job.processes,
            &dir,
            &log_path,
            root,
        )? {
            Ok(submitted) => {
                ui.status("Submitted", &format!("{} as Slurm job {}", job.stage, submitted.id));
                slurm::follow(submitted, &dir, ui, &bar)?
            }
            Err(Refused(message)) => {
                bar.finish_and_clear();
                record_failure(store, job, &log_path, &message)?;
                ui.error(&message);
                return Ok(Outcome::Refused);
            }
        },
    };
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();

    match ended {
        None => Ok(Outcome::Failed),
        Some(Ended { success: false, why }) => {
            let message = last_error_line(&log_path).unwrap_or_else(|| why.clone());
            record_failure(store, job, &log_path, &message)?;
            ui.failure(&job.stage, &why, &log_path);
            Ok(Outcome::Failed)
        }
        Some(_) => {
            let metrics = fs::read(dir.join("metrics.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
            for extra in ["spec.json", "metrics.json", "progress", "job.sh", "exit"] {
                let _ = fs::remove_file(dir.join(extra));
            }
            if let Some(changed) = changed_inputs(job, store) {
                let message = format!(
                    "the stage wrote into its input {changed}; a stage must only read its inputs (they are rebuilt on the next run)"
                );
                record_failure(store, job, &log_path, &message)?;
                ui.error(&format!("stage `{}`: {message}", job.stage));
                return Ok(Outcome::Failed);
            }
            store::seal(&dir.join("out"))?;
            let files = hash::manifest_files(&dir.join("out"))?;
            let manifest = Manifest {
                stage: job.stage.clone(),
                key: job.key.clone(),
                kind: job.kind.clone(),
                version: job.version,
                params: job.params.clone(),
                key_params: job.key_params.clone(),
                inputs: job.inputs.clone(),
                deps: job.deps.clone(),
                output_digest: hash::output_digest(&files),
                files,
                metrics,
                started: start_time,
                finished: store::now_rfc3339(),
                duration_s: secs,
                host: store::hostname(),
                llmflow_version: env!("CARGO_PKG_VERSION").to_string(),
            };
            let dest = store.publish(tmp, &manifest)?;
            store.update_state(&job.stage, |s| {
                s.latest = Some(job.key.clone());
                s.last_failure = None;
            })?;
            let _ = store::remove_tree(&work);
            let shown = dest.strip_prefix(std::env::current_dir().unwrap_or_default()).unwrap_or(&dest);
            ui.status("Built", &format!("{} in {secs:.1}s → {}", job.stage, shown.display()));
            Ok(Outcome::Built(Arc::new(manifest.head())))
        }
    }
}

/// The command that runs a stage from its spec, wherever it runs: the local
/// executor starts it, the Slurm executor's job script runs it.
pub fn runner_command(spec: &Path, threads: usize) -> Result<Command> {
    let threads = threads.to_string();
    let mut runner = Command::new(crate::kinds::runner()?);
    runner.arg("run").arg(spec).env("RAYON_NUM_THREADS", &threads).env("OMP_NUM_THREADS", &threads).env("POLARS_MAX_THREADS", &threads);
    Ok(runner)
}

/// Runs the stage as a child of this process, its output into `log`, until
/// it exits; `None` when the run was interrupted (the stage is then killed).
fn run_local(mut child: Command, log: File, dir: &Path, ui: &Ui, bar: &indicatif::ProgressBar) -> Result<Option<Ended>> {
    child.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
    // SAFETY: prctl and getppid are async-signal-safe. If we die, the runner
    // gets SIGTERM and kills its whole process group (llmflow-stage's
    // `die_with_group`); if we died before the prctl, it does not start.
    let engine = std::process::id() as libc::pid_t;
    unsafe {
        child.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if libc::getppid() != engine {
                // No allocation between fork and exec: a bare OS error.
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = child.spawn().context("cannot start the stage process")?;
    loop {
        if exited(&child) {
            // Whatever the stage left running dies before its output is hashed.
            let status = end_group(&mut child)?;
            let why = match status.code() {
                Some(c) => format!("exit status {c}"),
                None => "killed by a signal".to_string(),
            };
            return Ok(Some(Ended { success: status.success(), why }));
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            let _ = end_group(&mut child);
            return Ok(None);
        }
        if let Ok(text) = fs::read_to_string(dir.join("progress")) {
            ui.progress(bar, &text);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn record_failure(store: &Store, job: &Job, log: &Path, message: &str) -> Result<()> {
    store.update_state(&job.stage, |s| {
        s.last_failure =
            Some(store::Failure { key: job.key.clone(), log: log.to_path_buf(), at: store::now_rfc3339(), message: message.to_string() })
    })
}

/// The last line of the log that looks like an error, for `status`.
fn last_error_line(log: &Path) -> Option<String> {
    let lines = tail(log, usize::MAX);
    lines.iter().rev().find(|l| l.starts_with("error")).or(lines.last()).map(|l| l.trim().to_string())
}

/// Whether the stage process has exited, without reaping it: until it is
/// reaped its pid, which is also its process group's id, cannot be reused.
fn exited(child: &std::process::Child) -> bool {
    let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
    // SAFETY: waitid writes into `info`; WNOWAIT leaves the child waitable.
    let rc = unsafe { libc::waitid(libc::P_PID, child.id(), info.as_mut_ptr(), libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
    // SAFETY: zeroed above and filled by waitid when a child has exited.
    rc == 0 && unsafe { info.assume_init().si_pid() } != 0
}

/// Kills every process in the stage's group, reaps the stage process, and
/// waits until no member is left: as their subreaper we reap those whose
/// parents died before them.
fn end_group(child: &mut std::process::Child) -> std::io::Result<std::process::ExitStatus> {
    let group = child.id() as i32;
    // SAFETY: the group is the stage's own; its leader is not reaped yet, so the id is still ours.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    let status = child.wait()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: reaps exited members of the stage's group, which the leader's
        // remaining members keep reserved.
        while unsafe { libc::waitpid(-group, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        let members = std::fs::read_dir("/proc").into_iter().flatten().flatten().filter(|e| {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { return false };
            process_group(pid) == Some(group)
        });
        if members.count() == 0 || Instant::now() > deadline {
            return Ok(status);
        }
        // SAFETY: as above.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The process group of `pid`, from `/proc/PID/stat`, if it is still running.
fn process_group(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid pgrp …; comm may hold spaces and parentheses.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?;
    (state != "Z").then(|| fields.nth(1)?.parse().ok()).flatten()
}

/// An input artifact the stage changed, described for the error.
fn changed_inputs(job: &Job, store: &Store) -> Option<String> {
    job.input_heads.iter().find_map(|(slot, head)| {
        let mut changed = match store.check(head, false) {
            Integrity::Intact => Vec::new(),
            Integrity::Damaged(files) => files,
        };
        changed.extend(store.extra_files(head));
        (!changed.is_empty()).then(|| format!("`{slot}` ({}: {})", head.stage, changed.join(", ")))
    })
}

/// The tail of a log, for failure messages.
pub fn tail(log: &Path, n: usize) -> Vec<String> {
    let Ok(file) = File::open(log) else { return Vec::new() };
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}
