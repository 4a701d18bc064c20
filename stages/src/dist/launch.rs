//! The ranks of a stage on one machine, started by the stage runner itself
//! (as `torchrun` starts a script's): `llmflow-stage run SPEC` for a stage
//! with `processes = N`, started as no rank, runs N ranks of `llmflow-stage
//! run SPEC` with torchrun's variables and a rendezvous port of its own;
//! each rank takes its share of the threads (the runner's `run`).
//!
//! Every rank's output comes through the launcher into the stage's log, the
//! others' lines prefixed `[rank R]`. When a rank fails, the launcher kills
//! the rest at once (the others would wait for it until the collective
//! timeout) and fails with the last lines of the failed ranks' output.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

/// Lines of a failed rank's output its error quotes.
const TAIL: usize = 20;

/// A port on `host` that was free a moment ago, for the rendezvous.
pub fn free_port(host: &str) -> Result<u16> {
    let listener = std::net::TcpListener::bind((host, 0)).with_context(|| format!("cannot bind a port on {host}"))?;
    Ok(listener.local_addr()?.port())
}

struct Rank {
    child: Child,
    output: JoinHandle<()>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// Runs `processes` ranks of this runner on the stage spec `spec`;
/// succeeds when every rank does.
pub fn run(spec: &Path, processes: usize) -> Result<()> {
    let port = free_port("127.0.0.1")?;
    let exe = std::env::current_exe().context("the stage runner's own path")?;
    eprintln!("launching {processes} ranks on this machine, rendezvous at 127.0.0.1:{port}");
    let mut ranks: Vec<Rank> = Vec::with_capacity(processes);
    for rank in 0..processes {
        let (reader, writer) = std::io::pipe()?;
        let mut command = Command::new(&exe);
        command
            .arg("run")
            .arg(spec)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", processes.to_string())
            .env("LOCAL_WORLD_SIZE", processes.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(super::LAUNCHER, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer);
        // SAFETY: prctl is async-signal-safe. A rank dies with its launcher.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let started = command.spawn();
        drop(command); // closes the launcher's copies of the pipe's write end
        let child = match started {
            Ok(child) => child,
            Err(e) => {
                kill(&mut ranks);
                return Err(e).context(format!("cannot start rank {rank}"));
            }
        };
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL)));
        let kept = Arc::clone(&tail);
        let output = std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                let mut err = std::io::stderr().lock();
                let _ = match rank {
                    0 => writeln!(err, "{line}"),
                    r => writeln!(err, "[rank {r}] {line}"),
                };
                let mut tail = kept.lock().expect("not poisoned");
                if tail.len() == TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        ranks.push(Rank { child, output, tail });
    }
    loop {
        let mut ended: Vec<Option<ExitStatus>> = Vec::with_capacity(ranks.len());
        for r in &mut ranks {
            ended.push(r.child.try_wait()?);
        }
        let failed: Vec<usize> = (0..ranks.len()).filter(|&i| ended[i].is_some_and(|s| !s.success())).collect();
        if !failed.is_empty() {
            kill(&mut ranks);
            return Err(failure(&mut ranks, &failed, &ended));
        }
        if ended.iter().all(Option::is_some) {
            for r in ranks {
                let _ = r.output.join();
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(ranks: &mut [Rank]) {
    for r in ranks.iter_mut() {
        let _ = r.child.kill();
    }
    for r in ranks.iter_mut() {
        let _ = r.child.wait();
    }
}

/// The error of a run whose ranks `failed` ended as `ended` says: each failed
/// rank, how it ended and the end of its output, the killed ones first
/// (their death is what made the others' collectives fail).
fn failure(ranks: &mut Vec<Rank>, failed: &[usize], ended: &[Option<ExitStatus>]) -> anyhow::Error {
    let mut order = failed.to_vec();
    order.sort_by_key(|&i| ended[i].and_then(|s| s.code()).is_some());
    let size = ranks.len();
    let tails: Vec<Vec<String>> = ranks
        .drain(..)
        .map(|r| {
            let _ = r.output.join();
            r.tail.lock().expect("not poisoned").iter().cloned().collect()
        })
        .collect();
    let mut message = String::new();
    for (n, &i) in order.iter().enumerate() {
        let how = match ended[i] {
            Some(s) if s.code().is_some() => format!("exited with status {}", s.code().expect("checked")),
            Some(s) => format!("was killed by signal {}", s.signal().unwrap_or(0)),
            None => "is running".to_string(),
        };
        if n > 0 {
            message += "\n";
        }
        message += &format!("rank {i} of {size} {how}; the last lines of its output:");
        if tails[i].is_empty() {
            message += " (none)";
        }
        for line in &tails[i] {
            message += &format!("\n  [rank {i}] {line}");
        }
    }
    anyhow::anyhow!("{message}")
}
