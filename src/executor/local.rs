//! The local executor: the stage as a child process of the engine, in a
//! process group of its own, so a crash in native code cannot take the
//! scheduler down and Ctrl-C kills everything the stage started. Its output
//! goes straight into the log, cut to the stage's cap when it ends.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{report_progress, Ended, Executor, Launch, Running, Settings, Started, Threads, POLL};
use crate::error::{ConfigError, INTERRUPTED};
use crate::log;

pub struct Local;

impl Executor for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    fn about(&self) -> &'static str {
        "this machine"
    }

    fn check(&self, _stage: &str, _settings: &Settings, _processes: usize) -> Result<(), ConfigError> {
        Ok(())
    }

    fn threads(&self, _: &str, _: &Settings, wanted: Option<usize>, _: usize, cores: usize) -> Result<Threads, ConfigError> {
        Ok(Threads { per_node: wanted.unwrap_or(cores).clamp(1, cores), tasks_per_node: 1, local: true })
    }

    fn start(&self, launch: Launch<'_>) -> Result<Started> {
        let Launch { mut runner, log, log_limit, dir, .. } = launch;
        let file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        runner.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file).process_group(0);
        // SAFETY: prctl and getppid are async-signal-safe. If we die, the runner
        // gets SIGTERM and kills its whole process group (llmflow-stage's
        // `die_with_group`); if we died before the prctl, it does not start.
        let engine = std::process::id() as libc::pid_t;
        unsafe {
            runner.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                if libc::getppid() != engine {
                    // No allocation between fork and exec: a bare OS error.
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = runner.spawn().context("cannot start the stage process")?;
        let run = LocalRun { child, dir: dir.to_path_buf(), log: log.to_path_buf(), log_limit };
        Ok(Started::Running { run: Box::new(run), said: None })
    }
}

struct LocalRun {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    log_limit: u64,
}

impl Running for LocalRun {
    fn wait(mut self: Box<Self>, progress: &mut dyn FnMut(&str)) -> Result<Option<Ended>> {
        loop {
            if exited(&self.child) {
                // Whatever the stage left running dies before its output is hashed.
                let status = end_group(&mut self.child)?;
                log::cap_file(&self.log, self.log_limit).context("cutting the stage's log to its cap")?;
                let why = match status.code() {
                    Some(c) => format!("exit status {c}"),
                    None => "killed by a signal".to_string(),
                };
                return Ok(Some(Ended { success: status.success(), why }));
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                let _ = end_group(&mut self.child);
                return Ok(None);
            }
            report_progress(&self.dir, progress);
            std::thread::sleep(POLL);
        }
    }
}

/// Whether the stage process has exited, without reaping it: until it is
/// reaped its pid, which is also its process group's id, cannot be reused.
fn exited(child: &Child) -> bool {
    let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
    // SAFETY: waitid writes into `info`; WNOWAIT leaves the child waitable.
    let rc = unsafe { libc::waitid(libc::P_PID, child.id(), info.as_mut_ptr(), libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
    // SAFETY: zeroed above and filled by waitid when a child has exited.
    rc == 0 && unsafe { info.assume_init().si_pid() } != 0
}

/// Kills every process in the stage's group, reaps the stage process, and
/// waits until no member is left: as their subreaper we reap those whose
/// parents died before them.
fn end_group(child: &mut Child) -> std::io::Result<std::process::ExitStatus> {
    let group = child.id() as i32;
    // SAFETY: the group is the stage's own; its leader is not reaped yet, so the id is still ours.
    unsafe { libc::kill(-group, libc::SIGKILL) };
    let status = child.wait()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: reaps exited members of the stage's group, which the leader's
        // remaining members keep reserved.
        while unsafe { libc::waitpid(-group, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        let members = fs::read_dir("/proc").into_iter().flatten().flatten().filter(|e| {
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
