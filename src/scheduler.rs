//! The scheduler: which stage runs when, building one, and publishing what
//! it made.
//!
//! Every stage runs as a process of its own, `llmflow-stage run SPEC`
//! (installed beside `llmflow`), started by the stage's executor
//! ([`crate::executor`]): a crash in native code cannot take the scheduler
//! down and accelerator memory is freed when the stage ends. Only that
//! binary links libtorch; the scheduler starts in milliseconds. On Ctrl-C
//! the executors stop what they started and nothing partial is published.
//!
//! Independent stages run in parallel, bounded by `--jobs`, by the CPU threads
//! each local stage declares, and by one accelerator stage per device.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::config::Pipeline;
use crate::error::{ConfigError, Interrupted, StageFailed, INTERRUPTED};
use crate::executor::{self, Ended, Launch, Started, Threads};
use crate::files::{hostname, now_rfc3339, remove_tree, seal};
use crate::graph::Dag;
use crate::hash::{self, StatCache};
use crate::plan::{self, State};
use crate::protocol::{Resources, Spec, StageCtx};
use crate::remote::Remote;
use crate::store::{Access, Failure, Head, InputRef, Integrity, Manifest, Store};
use crate::ui::Ui;

pub struct RunOptions {
    pub targets: Vec<String>,
    pub force: Vec<String>,
    pub jobs: usize,
    pub keep_going: bool,
}

/// What became of a stage in this run.
enum Fate {
    Built(Arc<Head>),
    Fresh(Arc<Head>),
    /// Fetched from the remote.
    Pulled(Arc<Head>),
    Failed,
    /// The executor refused the stage at once: a mistake in its settings.
    Refused,
    /// Not run because an input failed.
    Skipped,
}

impl Fate {
    fn head(&self) -> Option<&Head> {
        self.shared_head().map(|m| &**m)
    }

    fn shared_head(&self) -> Option<&Arc<Head>> {
        match self {
            Fate::Built(m) | Fate::Fresh(m) | Fate::Pulled(m) => Some(m),
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
    threads: Threads,
    processes: usize,
    executor: executor::Settings,
    log_limit: u64,
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
    let remote = Remote::of(p.remote.as_ref(), ui).map(Arc::new);
    let planned = plan::statuses(p, dag, &store, remote.as_deref())?;
    // What an executor cannot run here (no `sbatch`, settings at odds) is said before anything runs.
    let building = |i: usize| !matches!(planned[i].state, State::Fresh | State::Remote) || forced.contains(&i);
    for &i in wanted.iter().filter(|&&i| building(i)) {
        let s = &p.stages[i];
        s.executor.executor().check(&s.name, &s.executor, s.resolved.resources.processes)?;
    }
    let mut cache = StatCache::open(store.stat_cache_path());

    let started = Instant::now();
    let mut fates: HashMap<usize, Fate> = HashMap::new();
    // What each running stage holds of this machine; `None` for one that runs elsewhere.
    let mut running: HashMap<usize, Option<Resources>> = HashMap::new();
    let mut failed_any = false;
    let (tx, rx) = mpsc::channel::<(usize, Fate)>();

    loop {
        let stop_starting = INTERRUPTED.load(Ordering::SeqCst) || (failed_any && !opts.keep_going);
        if !stop_starting {
            for &i in &wanted {
                if fates.contains_key(&i) || running.contains_key(&i) {
                    continue;
                }
                let ups = dag.upstream(i);
                if ups.iter().any(|u| matches!(fates.get(u), Some(Fate::Failed | Fate::Refused | Fate::Skipped))) {
                    ui.status("Skipped", &format!("{} (an input failed)", p.stages[i].name));
                    fates.insert(i, Fate::Skipped);
                    continue;
                }
                if !ups.iter().all(|u| fates.get(u).and_then(Fate::head).is_some()) {
                    continue;
                }
                let s = &p.stages[i];
                let force = forced.contains(&i);
                // Fresh when planned, with every input the very artifact the plan saw: nothing to recompute.
                let known = &planned[i];
                let same_inputs = ups.iter().all(|u| match (fates.get(u), &planned[*u].manifest) {
                    (Some(Fate::Fresh(now)), Some(then)) => now.output_digest == then.output_digest,
                    _ => false,
                });
                if let (false, State::Fresh, true, Some(m)) = (force, known.state, same_inputs, &known.manifest) {
                    fates.insert(i, Fate::Fresh(Arc::clone(m)));
                    continue;
                }
                let mut inputs = BTreeMap::new();
                let mut input_heads = BTreeMap::new();
                for (slot, up) in &s.inputs {
                    let u = p.index(up).expect("checked reference");
                    let m = fates[&u].shared_head().expect("built");
                    inputs.insert(slot.clone(), InputRef { stage: up.clone(), digest: m.output_digest.clone() });
                    input_heads.insert(slot.clone(), Arc::clone(m));
                }
                let deps = plan::dep_digests(p, s, &mut cache)?;
                let key = plan::key_of(s, &inputs, &deps);
                if !force {
                    if let Some(m) = fresh_artifact(&store, &s.name, &key) {
                        fates.insert(i, Fate::Fresh(Arc::new(m)));
                        continue;
                    }
                }
                let res = s.resolved.resources;
                let threads = s.executor.executor().threads(&s.name, &s.executor, res.threads, res.processes, cores)?;
                // A stage the plan found on the remote is fetched, which takes none of this machine's cores.
                let pulling = !force && known.state == State::Remote && known.key.as_ref() == Some(&key);
                let held = (threads.local && !pulling).then_some(res);
                let busy: usize = running.values().flatten().map(|r| r.threads.unwrap_or(cores).min(cores)).sum();
                let gpu_busy = running.values().flatten().any(|r| r.accelerator) && res.accelerator && p.device != "cpu";
                if !running.is_empty() && (running.len() >= opts.jobs || (held.is_some() && (busy + threads.per_node > cores || gpu_busy)))
                {
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
                    executor: s.executor.clone(),
                    log_limit: s.log_limit_mb << 20,
                };
                running.insert(i, held);
                let (tx, store, ui, root, device) = (tx.clone(), store.clone(), ui.clone(), p.root.clone(), p.device.clone());
                let remote = remote.clone();
                std::thread::spawn(move || {
                    // A panic fails the stage instead of leaving the run waiting for it.
                    let build = || build(&job, &store, remote.as_deref(), &ui, &root, &device);
                    let fate = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build)).unwrap_or(Fate::Failed);
                    let _ = tx.send((job.index, fate));
                });
            }
        }
        if running.is_empty() {
            break;
        }
        if let Ok((i, fate)) = rx.recv_timeout(Duration::from_millis(100)) {
            running.remove(&i);
            failed_any |= matches!(fate, Fate::Failed | Fate::Refused);
            fates.insert(i, fate);
        }
    }
    cache.save();

    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    let count = |f: fn(&Fate) -> bool| fates.values().filter(|o| f(o)).count();
    let built = count(|o| matches!(o, Fate::Built(_)));
    let pulled = count(|o| matches!(o, Fate::Pulled(_)));
    let fresh = count(|o| matches!(o, Fate::Fresh(_)));
    let failed = count(|o| matches!(o, Fate::Failed));
    let refused = count(|o| matches!(o, Fate::Refused));
    let skipped = count(|o| matches!(o, Fate::Skipped));
    let secs = started.elapsed().as_secs_f64();
    let not_run = wanted.len() - fates.len() + skipped;
    if failed > 0 {
        return Err(StageFailed(format!("{} stage(s) failed; {built} built, {fresh} fresh, {not_run} not run", failed + refused)).into());
    }
    if refused > 0 {
        // Only mistakes in the pipeline file's executor settings: exit code 2.
        return Err(ConfigError(format!(
            "{refused} stage(s) refused for their executor's settings; {built} built, {fresh} fresh, {not_run} not run"
        ))
        .into());
    }
    if built + pulled == 0 {
        ui.status("Fresh", &format!("nothing to do: all {fresh} stage(s) are up to date ({secs:.2}s)"));
    } else if pulled == 0 {
        ui.status("Finished", &format!("{built} built, {fresh} fresh in {secs:.1}s"));
    } else {
        ui.status("Finished", &format!("{built} built, {pulled} pulled, {fresh} fresh in {secs:.1}s"));
    }
    for &t in &targets {
        if let Some(m) = fates.get(&t).and_then(Fate::head) {
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
fn build(job: &Job, store: &Store, remote: Option<&Remote>, ui: &Ui, root: &Path, device: &str) -> Fate {
    match try_build(job, store, remote, ui, root, device) {
        Ok(fate) => fate,
        Err(e) => {
            ui.error(&format!("stage `{}`: {e:#}", job.stage));
            Fate::Failed
        }
    }
}

fn try_build(job: &Job, store: &Store, remote: Option<&Remote>, ui: &Ui, root: &Path, device: &str) -> Result<Fate> {
    let _lock = store.lock(&job.stage, |pid| {
        let who = pid.map_or("another process".to_string(), |p| format!("process {p}"));
        ui.status("Waiting", &format!("for {}: {who} is building it", job.stage));
    })?;
    for e in executor::all() {
        e.cancel_leftover(store, &job.stage);
    }
    // Another run may have built it while we waited.
    if !job.force {
        if let Some(m) = fresh_artifact(store, &job.stage, &job.key) {
            return Ok(Fate::Fresh(Arc::new(m)));
        }
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Ok(Fate::Failed);
    }
    if let Some(remote) = remote.filter(|_| !job.force) {
        let started = Instant::now();
        match remote.pull(store, &job.stage, &job.key) {
            Ok(Some(head)) => {
                let secs = started.elapsed().as_secs_f64();
                ui.status(
                    "Pulled",
                    &format!("{} in {secs:.1}s from {} → {}", job.stage, remote.url(), shown(&store.artifact_dir(&head.stage, &head.key))),
                );
                return Ok(Fate::Pulled(Arc::new(head)));
            }
            Ok(None) => {}
            // A remote out of use has said so once already.
            Err(e) if remote.down().is_none() => {
                ui.warning(&format!("cannot pull {} from {}: {e:#}; building it here", job.stage, remote.url()))
            }
            Err(_) => {}
        }
    }
    let tmp = store.make_tmp(&job.stage, &job.key)?;
    let dir = tmp.path.clone();
    let work = store.work_dir(&job.stage, &job.key);
    fs::create_dir_all(&work)?;
    let log_path = store.log_path(&job.stage, &job.key);
    fs::create_dir_all(log_path.parent().expect("has parent"))?;

    let mut ctx = StageCtx::new(&job.stage, root, &dir.join("out"), &work);
    ctx.inputs = job.input_heads.iter().map(|(slot, m)| (slot.clone(), store.out_dir(&m.stage, &m.key))).collect();
    ctx.cache = store.cache_dir(&job.kind);
    fs::create_dir_all(&ctx.cache)?;
    ctx.device = device.to_string();
    ctx.threads = job.threads.per_node;
    ctx.progress_file = Some(dir.join("progress"));
    let spec_path = dir.join("spec.json");
    let spec = Spec { kind: job.kind.clone(), params: job.params.clone(), ctx };
    fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;

    let start_time = now_rfc3339();
    let started = Instant::now();
    let bar = ui.stage_bar(&job.stage, &job.kind);
    let launch = Launch {
        store,
        stage: &job.stage,
        key: &job.key,
        settings: &job.executor,
        runner: crate::runner::command(&spec_path, job.threads.per_node)?,
        threads: job.threads,
        processes: job.processes,
        dir: &dir,
        log: &log_path,
        log_limit: job.log_limit,
        root,
    };
    let ended = match job.executor.executor().start(launch)? {
        Started::Running { run, said } => {
            if let Some(said) = said {
                ui.status("Submitted", &format!("{} {said}", job.stage));
            }
            run.wait(&mut |report| ui.progress(&bar, report))?
        }
        Started::Refused(message) => {
            bar.finish_and_clear();
            record_failure(store, job, &log_path, &message)?;
            ui.error(&message);
            return Ok(Fate::Refused);
        }
    };
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();

    match ended {
        None => Ok(Fate::Failed),
        Some(Ended { success: false, why }) => {
            let message = crate::log::last_error_line(&log_path).unwrap_or_else(|| why.clone());
            record_failure(store, job, &log_path, &message)?;
            ui.failure(&job.stage, &why, &log_path);
            Ok(Fate::Failed)
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
                return Ok(Fate::Failed);
            }
            seal(&dir.join("out"))?;
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
                finished: now_rfc3339(),
                duration_s: secs,
                host: hostname(),
                llmflow_version: env!("CARGO_PKG_VERSION").to_string(),
            };
            let dest = store.publish(tmp, &manifest)?;
            store.update_state(&job.stage, |s| {
                s.latest = Some(job.key.clone());
                s.last_failure = None;
            })?;
            let _ = remove_tree(&work);
            ui.status("Built", &format!("{} in {secs:.1}s → {}", job.stage, shown(&dest)));
            if let Some(remote) = remote.filter(|r| r.pushes() && r.down().is_none()) {
                match remote.push(store, &manifest) {
                    Ok(pushed) => ui.status("Pushed", &format!("{} to {}: {}", job.stage, remote.url(), pushed.describe())),
                    Err(e) if remote.down().is_none() => ui.warning(&format!("cannot push {} to {}: {e:#}", job.stage, remote.url())),
                    Err(_) => {}
                }
            }
            Ok(Fate::Built(Arc::new(manifest.head())))
        }
    }
}

/// `path`, relative to the working directory when under it.
fn shown(path: &Path) -> String {
    path.strip_prefix(std::env::current_dir().unwrap_or_default()).unwrap_or(path).display().to_string()
}

fn record_failure(store: &Store, job: &Job, log: &Path, message: &str) -> Result<()> {
    store.update_state(&job.stage, |s| {
        s.last_failure = Some(Failure { key: job.key.clone(), log: log.to_path_buf(), at: now_rfc3339(), message: message.to_string() })
    })
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
