//! The Slurm executor: a stage as a batch job on a cluster that shares the
//! artifact store with the machine `llmflow run` runs on.
//!
//! The job runs the very command the local executor runs (`llmflow-stage run
//! SPEC` with the same environment; see [`crate::runner::command`]), on the
//! same spec in the store's temporary build directory, with its output going
//! to the stage's log (cut to the stage's log cap when the job ends). The
//! engine holds the stage's lock while the job is in flight and publishes
//! the output as it publishes a local build's, so a stage has the same key
//! and the same output digest wherever it ran.
//!
//! The job script writes the runner's exit status beside the spec, so the end
//! of a job is seen without asking the controller; `squeue` is asked only
//! every few seconds, for the job's state and node (recorded in the store for
//! `llmflow status`) and for jobs that ended without writing it (time limit,
//! cancelled, preempted), whose reason `scontrol` (or `sacct`, where accounting
//! exists) gives. Ctrl-C cancels the job with `scancel` and waits until it
//! has ended before the build directory is removed.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{report_progress, Ended, Executor, Launch, Running, Settings, Started, Threads, POLL};
use crate::error::{ConfigError, INTERRUPTED};
use crate::files::write_atomic;
use crate::store::{JobRecord, Store};

pub struct Slurm;

impl Executor for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn about(&self) -> &'static str {
        "a batch job per stage"
    }

    fn fields(&self) -> &'static [&'static str] {
        &["partition", "time", "nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task", "mem", "account", "qos", "extra"]
    }

    fn check_field(&self, field: &str, value: &toml::Value) -> Result<String, String> {
        field_args(field, value).map(|(_, shown)| shown)
    }

    fn check(&self, stage: &str, settings: &Settings, processes: usize) -> Result<(), ConfigError> {
        sbatch(stage, settings)?;
        tasks_per_node(stage, settings, processes).map(drop)
    }

    fn threads(
        &self,
        stage: &str,
        settings: &Settings,
        wanted: Option<usize>,
        processes: usize,
        cores: usize,
    ) -> Result<Threads, ConfigError> {
        let tasks_per_node = tasks_per_node(stage, settings, processes)?;
        // The same threads as on this machine, unless `cpus_per_task` sets them: a stage's
        // output may depend on how it splits its work.
        let per_node = match number(settings, "cpus_per_task") {
            Some((cpus, _)) => cpus * tasks_per_node,
            None => wanted.unwrap_or(cores).clamp(1, cores),
        };
        Ok(Threads { per_node, tasks_per_node, local: false })
    }

    fn start(&self, launch: Launch<'_>) -> Result<Started> {
        Ok(match submit(&launch)? {
            Ok(job) => {
                let said = Some(format!("as Slurm job {}", job.id));
                Started::Running {
                    run: Box::new(Follow {
                        job,
                        dir: launch.dir.to_path_buf(),
                        log: launch.log.to_path_buf(),
                        log_limit: launch.log_limit,
                    }),
                    said,
                }
            }
            Err(refused) => Started::Refused(refused),
        })
    }

    /// Cancels a job left in flight by a run of `stage` that died without
    /// cancelling it.
    fn cancel_leftover(&self, store: &Store, stage: &str) {
        if let Some(left) = store.job(stage).filter(|j| j.executor == EXECUTOR) {
            cancel(&left.id);
            let _ = fs::remove_file(store.job_path(stage));
        }
    }
}

/// The name of its jobs in the store's records and in messages.
const EXECUTOR: &str = "Slurm";

/// The fields of a `slurm` table (`[pipeline.slurm]` or a stage's), each
/// with the `sbatch` option it sets; [`Slurm::fields`] lists them in this order.
const FIELDS: &[(&str, &str)] = &[
    ("partition", "--partition"),
    ("time", "--time"),
    ("nodes", "--nodes"),
    ("ntasks_per_node", "--ntasks-per-node"),
    ("gpus_per_node", "--gpus-per-node"),
    ("cpus_per_task", "--cpus-per-task"),
    ("mem", "--mem"),
    ("account", "--account"),
    ("qos", "--qos"),
    ("extra", ""),
];

/// A `slurm` field's value checked, as `sbatch` options and as the file shows it.
fn field_args(field: &str, value: &toml::Value) -> Result<(Vec<String>, String), String> {
    let flag = FIELDS.iter().find(|(f, _)| *f == field).map(|(_, flag)| *flag).ok_or_else(|| format!("unknown field `{field}`"))?;
    let shown = value.to_string();
    let one = |text: String| Ok((vec![format!("{flag}={text}")], shown.clone()));
    match (field, value) {
        ("extra", toml::Value::Array(items)) => {
            let args: Option<Vec<String>> = items.iter().map(|v| v.as_str().map(str::to_string)).collect();
            args.map(|a| (a, shown.clone())).ok_or_else(|| "must be a list of sbatch options, e.g. [\"--exclusive\"]".to_string())
        }
        ("extra", _) => Err("must be a list of sbatch options, e.g. [\"--exclusive\"]".to_string()),
        ("nodes" | "ntasks_per_node" | "cpus_per_task" | "gpus_per_node", toml::Value::Integer(n)) if *n >= 1 => one(n.to_string()),
        ("nodes", _) => Err("must be a whole number of nodes, 1 or more".to_string()),
        ("ntasks_per_node", _) => Err("must be a whole number of tasks, 1 or more".to_string()),
        ("cpus_per_task", _) => Err("must be a whole number of CPUs, 1 or more".to_string()),
        // `--gpus-per-node` takes `[type:]count`, `--mem` a size such as 16G (or MB as a number).
        ("gpus_per_node" | "mem", toml::Value::String(s)) if !s.is_empty() => one(s.clone()),
        ("mem", toml::Value::Integer(n)) if *n >= 1 => one(n.to_string()),
        ("gpus_per_node", _) => Err("must be a number of GPUs or \"type:count\"".to_string()),
        ("mem", _) => Err("must be a size such as \"16G\" or a number of MB".to_string()),
        (_, toml::Value::String(s)) if !s.is_empty() => one(s.clone()),
        _ => Err("must be a non-empty string".to_string()),
    }
}

fn number<'a>(settings: &'a Settings, field: &str) -> Option<(usize, &'a super::Setting)> {
    settings.get(field).and_then(|s| Some((s.shown.parse().ok()?, s)))
}

/// The `sbatch` options the settings add.
fn args(settings: &Settings) -> Vec<String> {
    settings.fields.iter().flat_map(|s| field_args(&s.field, &s.value).map(|(args, _)| args).unwrap_or_default()).collect()
}

/// The ranks of a stage with `processes` ranks that one node runs: the
/// stage's tasks are its ranks, `ntasks_per_node` on each of `nodes`.
/// Fails, naming the settings, where they make another number of tasks.
fn tasks_per_node(stage: &str, settings: &Settings, processes: usize) -> Result<usize, ConfigError> {
    let (nodes, per_node) = (number(settings, "nodes"), number(settings, "ntasks_per_node"));
    let tasks = nodes.map_or(1, |n| n.0) * per_node.map_or(1, |n| n.0);
    let set: Vec<String> = [nodes, per_node].into_iter().flatten().map(|(n, s)| format!("`slurm.{}` = {n} at {}", s.field, s.at)).collect();
    match (nodes, per_node) {
        (None, None) => Ok(processes),
        (_, Some((per_node, _))) if tasks == processes => Ok(per_node),
        (Some((nodes, _)), None) if processes.is_multiple_of(nodes) => Ok(processes / nodes),
        _ => Err(ConfigError(format!(
            "stage `{stage}` runs as {processes} process(es) (its `processes`), but {} do not make {processes} equal tasks, one a rank",
            set.join(" and ")
        ))),
    }
}

/// `sbatch` on PATH, or the error a run of a Slurm stage fails with.
fn sbatch(stage: &str, settings: &Settings) -> Result<PathBuf, ConfigError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("sbatch")).find(|p| p.is_file()).ok_or_else(|| {
        ConfigError(format!(
            "stage `{stage}` runs on Slurm ({}), but `sbatch` is not on PATH: run llmflow where Slurm's commands are installed (a login node), or set `executor = \"local\"`",
            settings.at
        ))
    })
}

/// A submitted job, cancelled (and waited for) if dropped before it ended.
struct Job {
    id: String,
    record: PathBuf,
    ended: bool,
}

impl Drop for Job {
    fn drop(&mut self) {
        if !self.ended {
            cancel(&self.id);
        }
        let _ = fs::remove_file(&self.record);
    }
}

/// Writes the job script and submits it; `Err` is the cluster's refusal.
/// The runner's command is what the local executor would run; a stage of
/// `processes` ranks runs it as that many `srun` tasks, which place
/// themselves from Slurm's environment (`llmflow-stage`'s `dist`).
fn submit(launch: &Launch<'_>) -> Result<Result<Job, String>> {
    let Launch { store, stage, key, settings, runner, threads, processes, dir, log, root, .. } = launch;
    let (stage, processes, cpus) = (*stage, *processes, threads.per_node / threads.tasks_per_node);
    let sbatch = sbatch(stage, settings)?;
    let script = dir.join("job.sh");
    let exit = dir.join("exit");
    let mut text = format!("#!/bin/sh\n# llmflow: stage `{stage}`, key {key}\n");
    for (name, value) in runner.get_envs() {
        if let (Some(name), Some(value)) = (name.to_str(), value.and_then(|v| v.to_str())) {
            text.push_str(&format!("export {name}={}\n", quote(value)));
        }
    }
    let mut words: Vec<String> =
        std::iter::once(runner.get_program()).chain(runner.get_args()).map(|w| quote(&w.to_string_lossy())).collect();
    if processes > 1 {
        // Each task is one rank. Rank 0, on the allocation's first node, serves the rendezvous
        // at the address Slurm reaches that node at (a node's name need not resolve).
        text.push_str("first=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)\n");
        text.push_str("addr=$(scontrol show node \"$first\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')\n");
        text.push_str("export MASTER_ADDR=\"${addr:-$first}\"\n");
        text.push_str("export MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))\n");
        words
            .splice(0..0, ["srun".to_string(), "--kill-on-bad-exit=1".to_string(), "--cpus-per-task=\"$SLURM_CPUS_PER_TASK\"".to_string()]);
    }
    // The status goes beside the spec whole (rename), so the engine never reads half of it.
    text.push_str(&format!(
        "{}\nstatus=$?\necho $status > {tmp} && mv {tmp} {exit}\nexit $status\n",
        words.join(" "),
        tmp = quote(&format!("{}.tmp", exit.display())),
        exit = quote(&exit.to_string_lossy()),
    ));
    fs::write(&script, text)?;
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name=llmflow:{stage}"),
        // sbatch reads `%` in a file name as a pattern (`%j`: the job id); a variant may hold one.
        format!("--output={}", log.display().to_string().replace('%', "%%")),
        "--open-mode=truncate".to_string(),
        format!("--chdir={}", root.display()),
        // A preempted or failed node's job ends; the next run resumes it from its checkpoints.
        "--no-requeue".to_string(),
    ];
    if processes > 1 {
        args.push(format!("--ntasks={processes}"));
    }
    if settings.get("cpus_per_task").is_none() {
        args.push(format!("--cpus-per-task={cpus}"));
    }
    args.extend(self::args(settings));
    let out = slurm_command(&sbatch).args(&args).arg(&script).output().with_context(|| format!("cannot run {}", sbatch.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout.trim().split(';').next().unwrap_or("").to_string();
    if !out.status.success() || id.is_empty() {
        let said: Vec<&str> = std::str::from_utf8(&out.stderr).unwrap_or("").lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let said = said.iter().map(|l| l.trim_start_matches("sbatch: error: ")).collect::<Vec<_>>().join("; ");
        // The controller out of reach is no mistake in the request.
        if ["contact", "connect", "timed out"].iter().any(|w| said.contains(w)) {
            anyhow::bail!("cannot submit to Slurm: {said}");
        }
        return Ok(Err(format!("stage `{stage}`: Slurm refused the job: {said}; {}", culprit(&said, settings, cpus))));
    }
    let record = store.job_path(stage);
    let job = Job { id: id.clone(), record: record.clone(), ended: false };
    let queued = JobRecord { executor: EXECUTOR.into(), id, state: "queued".into(), node: None, reason: None };
    write_atomic(&record, &serde_json::to_vec(&queued)?)?;
    Ok(Ok(job))
}

/// The settings an `sbatch` refusal is about, named with where they are set.
fn culprit(said: &str, settings: &Settings, cpus: usize) -> String {
    let said = said.to_lowercase();
    let fields: &[&str] = if said.contains("partition") {
        &["partition"]
    } else if said.contains("time") {
        &["time"]
    } else if said.contains("account") {
        &["account"]
    } else if said.contains("qos") {
        &["qos"]
    } else if said.contains("gres") || said.contains("gpu") {
        &["gpus_per_node"]
    } else if said.contains("memory") {
        &["mem"]
    } else if said.contains("processors") || said.contains("cpu") {
        &["cpus_per_task"]
    } else if said.contains("node count") {
        &["nodes"]
    } else {
        &["cpus_per_task", "mem", "gpus_per_node", "nodes", "ntasks_per_node", "partition", "extra"]
    };
    let named: Vec<String> = settings
        .fields
        .iter()
        .filter(|s| fields.contains(&s.field.as_str()))
        .map(|s| format!("`slurm.{}` = {} at {}", s.field, s.shown, s.at))
        .collect();
    match (named.is_empty(), fields.contains(&"cpus_per_task") && settings.get("cpus_per_task").is_none()) {
        (false, _) => format!("check {}", named.join(", ")),
        (true, true) => format!("it asked for {cpus} CPUs, the stage's threads: set `slurm.cpus_per_task`"),
        (true, false) => format!("the stage sets no `slurm.{}`; check the cluster's defaults", fields[0]),
    }
}

/// A submitted job, followed until it ends.
struct Follow {
    job: Job,
    dir: PathBuf,
    log: PathBuf,
    log_limit: u64,
}

impl Running for Follow {
    fn wait(self: Box<Self>, progress: &mut dyn FnMut(&str)) -> Result<Option<Ended>> {
        let ended = follow(self.job, &self.dir, progress)?;
        if ended.is_some() {
            let _ = crate::log::cap_file(&self.log, self.log_limit);
        }
        Ok(ended)
    }
}

/// Follows a job until it ends, recording its state for `status` and
/// feeding `progress` the stage's progress reports. `None` when the run was
/// interrupted: the job is then cancelled and over.
fn follow(mut job: Job, dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<Option<Ended>> {
    let exit = dir.join("exit");
    let started = Instant::now();
    let mut next_poll = Instant::now();
    let mut last: Option<JobRecord> = None;
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Ok(None); // dropping the job cancels it
        }
        if let Some(code) = exit_status(&exit) {
            job.ended = true;
            return Ok(Some(if code == 0 { Ended { success: true, why: String::new() } } else { ended(&job.id, Some(code)) }));
        }
        report_progress(dir, progress);
        if Instant::now() >= next_poll {
            // Often at first, when short jobs end, then every 5 s: a cluster's controller serves many users.
            next_poll =
                Instant::now() + if started.elapsed() < Duration::from_secs(10) { Duration::from_secs(1) } else { Duration::from_secs(5) };
            match squeue(&job.id) {
                Some(Queue::Waiting { state, node, reason }) => {
                    let now = Some(JobRecord { executor: EXECUTOR.into(), id: job.id.clone(), state, node, reason });
                    if now != last {
                        write_atomic(&job.record, &serde_json::to_vec(&now)?)?;
                        last = now;
                    }
                }
                Some(Queue::Over) => {
                    // The script may have written its status as the job ended.
                    if exit_status(&exit).is_some() {
                        continue;
                    }
                    job.ended = true;
                    return Ok(Some(ended(&job.id, None)));
                }
                None => {}
            }
        }
        std::thread::sleep(POLL);
    }
}

/// The runner's exit status, as the job script left it.
fn exit_status(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// One of Slurm's commands, in a process group of its own: Ctrl-C at the
/// terminal reaches the engine, which cancels its jobs, and not a
/// submission half done.
fn slurm_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command.process_group(0);
    command
}

enum Queue {
    Waiting { state: String, node: Option<String>, reason: Option<String> },
    Over,
}

/// The job's state as `squeue` sees it; `None` when it could not be asked.
fn squeue(id: &str) -> Option<Queue> {
    let out = slurm_command("squeue").args(["-h", "--states=all", "-j", id, "-o", "%T|%N|%r"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().next() else {
        // Gone from the controller's memory (or never known to it).
        let gone = String::from_utf8_lossy(&out.stderr).contains("Invalid job id") || out.status.success();
        return gone.then_some(Queue::Over);
    };
    let mut parts = line.split('|');
    let (state, node, reason) = (parts.next()?, parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let some = |s: &str| (!s.is_empty() && s != "None" && s != "(null)").then(|| s.to_string());
    match state {
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "SUSPENDED" | "CONFIGURING" => {
            Some(Queue::Waiting { state: "queued".into(), node: None, reason: some(reason) })
        }
        "RUNNING" | "COMPLETING" | "SIGNALING" | "STAGE_OUT" | "RESIZING" => {
            Some(Queue::Waiting { state: "running".into(), node: some(node), reason: None })
        }
        _ => Some(Queue::Over),
    }
}

/// How a job ended, from the controller's memory of it (`scontrol`) or from
/// accounting (`sacct`) where it has forgotten it; `exit` is the status its
/// script wrote, if it lived to write one (a time limit kills it first, or
/// not: Slurm's reason is told first either way).
fn ended(id: &str, exit: Option<i32>) -> Ended {
    let field = |text: &str, name: &str| {
        text.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))).map(str::to_string).unwrap_or_default()
    };
    let from_scontrol = slurm_command("scontrol").args(["show", "job", "-o", id]).output().ok().filter(|o| o.status.success()).map(|o| {
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        (field(&text, "JobState"), field(&text, "ExitCode"), field(&text, "TimeLimit"))
    });
    let from_sacct = || {
        let out = slurm_command("sacct").args(["-n", "-X", "-P", "-j", id, "-o", "State,ExitCode,Timelimit"]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut parts = text.lines().next()?.split('|');
        let state = parts.next()?.split_whitespace().next()?.to_string();
        Some((state, parts.next()?.to_string(), parts.next().unwrap_or("").to_string()))
    };
    let (state, exit_code, limit) = from_scontrol.or_else(from_sacct).unwrap_or_default();
    let exit_code = exit.map_or(exit_code, |code| code.to_string());
    let resume = "run again to resume from its checkpoints";
    let why = match state.as_str() {
        "COMPLETED" if exit.is_none() => return Ended { success: true, why: String::new() },
        "" if exit.is_none() => format!("Slurm job {id} ended and the controller no longer knows how"),
        "TIMEOUT" => format!("Slurm job {id} reached its time limit of {limit}; {resume}"),
        "PREEMPTED" => format!("Slurm job {id} was preempted; {resume}"),
        "CANCELLED" => format!("Slurm job {id} was cancelled outside llmflow; {resume}"),
        "OUT_OF_MEMORY" => format!("Slurm job {id} ran out of memory: raise `slurm.mem`"),
        "NODE_FAIL" => format!("Slurm job {id}: its node failed; {resume}"),
        "FAILED" | "RUNNING" | "COMPLETING" | "COMPLETED" | "" => {
            format!("exit status {}, Slurm job {id}", exit_code.split(':').next().unwrap_or(&exit_code))
        }
        other => format!("Slurm job {id} ended {other} (exit code {exit_code})"),
    };
    Ended { success: false, why }
}

/// Cancels a job and waits (up to a minute) until its processes are gone.
fn cancel(id: &str) {
    let _ = slurm_command("scancel").arg(id).output();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match squeue(id) {
            Some(Queue::Waiting { .. }) => std::thread::sleep(Duration::from_millis(200)),
            _ => return,
        }
    }
}

/// A word for `sh`: single-quoted, with single quotes spelled out.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}
