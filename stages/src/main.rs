//! `llmflow-stage`: the stage runner. The engine (`llmflow`) starts it; it is
//! not meant to be run by hand.
//!
//! * `llmflow-stage kinds` prints every stage kind's declaration as JSON.
//! * `llmflow-stage resolve` reads a resolve request (JSON) on stdin and
//!   prints each stage's params with defaults applied, or what is wrong.
//! * `llmflow-stage run SPEC` runs one stage. The scheduler writes SPEC (the
//!   kind, its params and the stage's context) into the stage's temporary
//!   build directory, with output going to the stage's log; metrics are
//!   written beside SPEC as `metrics.json`. A stage with `processes = N`
//!   runs as N ranks: started as no rank, the runner starts them
//!   ([`dist::launch`]); started as one (by itself, `torchrun` or `srun`),
//!   it trains as that rank.
//! * `llmflow-stage estimate` reads specs (JSON) on stdin and prints what
//!   running each stage would cost
//!   (what `llmflow estimate` and `llmflow run --dry-run` show).
//! * `llmflow-stage export DIR OUT` writes the Hugging Face export of the
//!   model artifact in DIR (what `llmflow export` runs).
//! * `llmflow-stage generate` reads a generate request (JSON) on stdin and
//!   samples from the model artifact it names (what `llmflow generate` runs).
//! * `llmflow-stage describe KIND` prints the kind's params with their
//!   defaults as TOML, one comment line each (`llmflow kinds KIND`).
//! * `llmflow-stage device` prints the compute libtorch sees: its CPU
//!   threads, and whether CUDA loads and how many devices it finds.

use std::fs;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use llmflow_protocol::{GenerateRequest, ResolveRequest, Spec};
use llmflow_stages::dist;
use llmflow_stages::formats::model::ModelArtifact;
use llmflow_stages::sample::complete;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["kinds"] => print_json(&llmflow_stages::kinds::all()),
        ["resolve"] => resolve(),
        ["run", spec] => {
            let result = run(Path::new(spec));
            end_descendants();
            result
        }
        ["estimate"] => estimate(),
        ["describe", kind] => llmflow_stages::kinds::describe(kind).map(|toml| print!("{toml}")),
        ["generate"] => generate(),
        ["device"] => {
            println!("{}", llmflow_stages::device::describe());
            Ok(())
        }
        ["export", dir, out] => llmflow_stages::formats::hf::hugging_face(Path::new(dir), Path::new(out)),
        _ => {
            eprintln!("usage: llmflow-stage kinds | describe KIND | resolve | run SPEC | estimate | generate | export DIR OUT | device  (started by `llmflow`)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One write, so ranks sharing a stderr (under torchrun) keep their lines whole.
            let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("error: {e:#}\n").as_bytes());
            ExitCode::FAILURE
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

fn resolve() -> Result<()> {
    let request: ResolveRequest = serde_json::from_reader(std::io::stdin().lock()).context("reading the resolve request")?;
    print_json(&llmflow_stages::kinds::resolve(&request))
}

fn run(spec_path: &Path) -> Result<()> {
    die_with_group();
    keep_freed_memory();
    let spec: Spec = serde_json::from_slice(&fs::read(spec_path).context("reading the stage spec")?)?;
    let mut ctx = spec.ctx;
    let processes = llmflow_stages::kinds::resources(&spec.kind, &spec.params)?.processes;
    let placement = dist::placement()?;
    match placement {
        None if processes > 1 => return dist::launch::run(spec_path, processes),
        Some((rank, size, _, local_size)) => {
            anyhow::ensure!(
                size == processes,
                "the environment starts {size} ranks (WORLD_SIZE or SLURM_NTASKS), but stage `{}` has processes = {processes}",
                ctx.stage
            );
            // The ranks on a machine share its threads; only the first
            // writes the output and reports progress.
            ctx.threads = (ctx.threads / local_size).max(1);
            // Before any pool starts: rayon, OpenMP and polars size theirs from these.
            for var in ["RAYON_NUM_THREADS", "OMP_NUM_THREADS", "POLARS_MAX_THREADS"] {
                std::env::set_var(var, ctx.threads.to_string());
            }
            if rank > 0 {
                ctx.progress_file = None;
                ctx.out = ctx.work.join(format!("rank-{rank}")).join("out");
                fs::create_dir_all(&ctx.out)?;
            }
        }
        None => {}
    }
    llmflow_stages::kinds::run(&spec.kind, spec.params, &mut ctx)?;
    if placement.is_some_and(|(rank, ..)| rank > 0) {
        return Ok(());
    }
    if let Some(peak) = peak_rss_mb() {
        ctx.metric("peak_rss_mb", peak);
    }
    fs::write(spec_path.with_file_name("metrics.json"), serde_json::to_vec_pretty(ctx.metrics())?)?;
    Ok(())
}

/// The most resident memory the stage process has held (`VmHWM`), in MB:
/// what a memory budget (`memory_mb`) is checked against.
fn peak_rss_mb() -> Option<f64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kb / 1024.0 * 10.0).round() / 10.0)
}

/// The engine starts each stage as the leader of its own process group and
/// sends it SIGTERM if the engine dies (`PR_SET_PDEATHSIG`): the whole
/// group, with any shell and the processes it started, then dies with it.
/// The runner is also their subreaper, so a process that left the group
/// (`setsid`) comes back to it as a child once its parent exits; see
/// [`end_descendants`].
fn die_with_group() {
    // SAFETY: prctl with these arguments only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    extern "C" fn kill_group(_: libc::c_int) {
        // SAFETY: kill is async-signal-safe; 0 is this process's own group.
        unsafe { libc::kill(0, libc::SIGKILL) };
    }
    // SAFETY: installs a handler that only calls an async-signal-safe function.
    unsafe { libc::signal(libc::SIGTERM, kill_group as *const () as libc::sighandler_t) };
}

/// Kills every process the stage started and has not waited for, before
/// the engine hashes its output: children first, then the orphans that
/// come back to the runner as their subreaper, until none is left.
fn end_descendants() {
    let me = std::process::id().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let children: Vec<i32> = fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                // pid (comm) state ppid …; comm may hold spaces and parentheses.
                let ppid = stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?;
                (ppid == me).then_some(pid)
            })
            .collect();
        if children.is_empty() || std::time::Instant::now() > deadline {
            return;
        }
        for pid in children {
            // SAFETY: kill and waitpid on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// Training allocates and frees the same large tensors (activations, logits)
/// every step, and libtorch's CPU allocator is plain `malloc`. By default
/// glibc serves blocks above 128 KiB with fresh `mmap`s and unmaps them on
/// `free`, so every step page-faults its memory in again, and each unmap
/// interrupts the other cores of the process to flush their TLBs. Serving
/// blocks up to glibc's limit (32 MiB) from the heap and not trimming it
/// keeps that memory mapped for reuse.
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters; called before the
    // stage starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Reads a JSON list of specs on stdin; prints a JSON list of estimates (null
/// for kinds that give none), so one process serves a whole plan.
fn estimate() -> Result<()> {
    let specs: Vec<Spec> = serde_json::from_reader(std::io::stdin().lock()).context("reading the stage specs")?;
    let mut estimates = Vec::new();
    for spec in specs {
        let mut ctx = spec.ctx;
        estimates.push(llmflow_stages::kinds::estimate(&spec.kind, spec.params, &mut ctx).unwrap_or_else(|e| Some(format!("{e:#}"))));
    }
    print_json(&estimates)
}

/// Reads a [`GenerateRequest`] on stdin; prints the prompt and its
/// continuation.
fn generate() -> Result<()> {
    let request: GenerateRequest = serde_json::from_reader(std::io::stdin().lock()).context("reading the generate request")?;
    let device = llmflow_stages::device::resolve("auto")?;
    let model = ModelArtifact::open(&request.model, device)?;
    println!("{}", complete(&model.gpt, &model.tokenizer, &request.prompt, &request.sampling)?);
    Ok(())
}
