//! Running untrusted programs (the code a model writes, with its tests) in
//! the kernel's sandbox, through bubblewrap (`bwrap`): new user, mount, PID,
//! network, IPC and UTS namespaces; a read-only view of `/usr` (and `/bin`,
//! `/lib`, which point into it) and nothing else of the system (no `/etc`,
//! no home directory, no artifact store, no project); a private writable
//! scratch directory as `/sandbox` holding the program, an empty `/tmp`,
//! both in-memory file systems of at most [`SCRATCH_BYTES`] each, so files
//! the program writes cost the host neither disk nor more memory than that;
//! no network; run as `nobody` when llmflow runs as root. `bwrap` itself
//! starts with an empty environment but `PATH` and `LANG`, the program with
//! `PATH` and `HOME` only, so no variable of the host's is visible inside,
//! not even in `/proc/1/environ` (bwrap is PID 1 there). `setrlimit` bounds
//! address space, CPU time, file size and processes (`RLIMIT_NPROC`). Of
//! what the program writes to stderr only the last [`KEPT_OUTPUT`] bytes
//! are kept, read through a pipe. The sandbox dies as a
//! whole: at the wall-time limit, when the stage ends, and with the stage
//! (Ctrl-C), since it stays in the stage's process group and `bwrap
//! --die-with-parent` ends its PID namespace. Inside, human-eval's
//! `reliability_guard` preamble still runs before the program, as a second
//! line.
//!
//! Without `bwrap` (or where the kernel refuses namespaces) [`Sandbox::new`]
//! fails with a clear error; `sandbox = "none"` runs programs unconfined,
//! with a warning. Used by `eval`'s code tasks and `grpo`'s unit-test reward.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

/// What running a completion gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    /// The last line the program wrote to stderr (the exception), or how it died.
    Failed(String),
    TimedOut,
}

/// Resource limits of one run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub memory_bytes: u64,
}

/// Where the tests run.
#[derive(Debug)]
pub enum Sandbox {
    /// `bwrap`, at this path. Runs get directories under `scratch`, which is
    /// in the system's temporary directory so `nobody` can reach it.
    Bwrap { bwrap: std::path::PathBuf, scratch: std::path::PathBuf },
    /// Unconfined: only rlimits and the guard preamble.
    None { scratch: std::path::PathBuf },
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Sandbox::Bwrap { scratch, .. } = self {
            let _ = std::fs::remove_dir_all(scratch);
        }
    }
}

/// The uid and gid the sandbox runs as when llmflow runs as root.
const NOBODY: u32 = 65534;

/// Processes the sandbox's user may have beyond those it has already.
const MAX_PROCESSES: u64 = 256;

/// The size of each of the sandbox's in-memory file systems, `/sandbox`
/// and `/tmp`: a test needs kilobytes.
pub const SCRATCH_BYTES: u64 = 64 << 20;

/// The end of a program's stderr that is kept: the failure it reports is
/// its last line within these bytes.
pub const KEPT_OUTPUT: usize = 2048;

impl Sandbox {
    /// `name` is the task's `sandbox` param: "bwrap" finds bubblewrap and
    /// checks that it can make its namespaces here; "none" warns and runs
    /// under `scratch`.
    pub fn new(name: &str, scratch: &Path) -> Result<Sandbox> {
        if name == "none" {
            eprintln!("warning: sandbox = \"none\": generated code runs unconfined, with this process's rights");
            return Ok(Sandbox::None { scratch: scratch.to_path_buf() });
        }
        let bwrap = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|dir| dir.join("bwrap"))
            .find(|p| p.is_file())
            .context("bubblewrap (`bwrap`) is not installed, and generated code runs in its sandbox: `make setup` installs it (`apt-get install bubblewrap`); `sandbox = \"none\"` runs generated code unconfined")?;
        static SANDBOXES: AtomicU64 = AtomicU64::new(0);
        let n = SANDBOXES.fetch_add(1, Ordering::Relaxed);
        let scratch = std::env::temp_dir().join(format!("llmflow-sandbox-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
        std::fs::set_permissions(&scratch, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        let sandbox = Sandbox::Bwrap { bwrap, scratch };
        let probe = sandbox.scratch().join("probe");
        std::fs::create_dir_all(&probe)?;
        let out = sandbox.command("true", &probe, Limits { timeout: Duration::from_secs(10), memory_bytes: 1 << 30 })?.output();
        let out = out.context("cannot start bwrap")?;
        if !out.status.success() {
            anyhow::bail!(
                "bubblewrap cannot set up its sandbox here: {}; running generated code needs it (`sandbox = \"none\"` runs generated code unconfined)",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(sandbox)
    }

    pub(crate) fn scratch(&self) -> &Path {
        match self {
            Sandbox::Bwrap { scratch, .. } | Sandbox::None { scratch } => scratch,
        }
    }

    /// `python -I -B program.py` of `dir`, confined, with `limits`.
    pub(crate) fn command(&self, python: &str, dir: &Path, limits: Limits) -> Result<Command> {
        let root = unsafe { libc::geteuid() } == 0;
        let mut cmd = match self {
            Sandbox::None { .. } => {
                let mut cmd = Command::new(python);
                cmd.current_dir(dir).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
                cmd
            }
            Sandbox::Bwrap { bwrap, .. } => {
                let mut cmd = Command::new(bwrap);
                // bwrap is PID 1 inside, its environment readable there: it gets none of ours.
                cmd.env_clear().env("PATH", "/usr/bin:/bin").env("LANG", "C.UTF-8");
                cmd.args(["--unshare-all", "--die-with-parent", "--new-session", "--clearenv"]).args(["--ro-bind", "/usr", "/usr"]);
                for system in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
                    cmd.args(["--ro-bind-try", system, system]);
                }
                let size = SCRATCH_BYTES.to_string();
                cmd.args(["--proc", "/proc", "--dev", "/dev"])
                    .args(["--size", &size, "--tmpfs", "/tmp", "--size", &size, "--tmpfs", "/sandbox"])
                    .arg("--ro-bind-try")
                    .arg(dir.join("program.py"))
                    .args(["/sandbox/program.py", "--chdir", "/sandbox", "--hostname", "sandbox"])
                    .args(["--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/sandbox", "--"])
                    .arg(python);
                cmd
            }
        };
        if python != "true" {
            cmd.args(["-I", "-B", "program.py"]);
        }
        let cpu_seconds = limits.timeout.as_secs() + 1;
        let memory = limits.memory_bytes;
        let uid = if root && matches!(self, Sandbox::Bwrap { .. }) { NOBODY } else { unsafe { libc::getuid() } };
        let processes = processes_of(uid) + MAX_PROCESSES;
        let drop_root = root && matches!(self, Sandbox::Bwrap { .. });
        // SAFETY: between fork and exec the closure calls only async-signal-safe
        // system calls and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for (resource, value) in [
                    (libc::RLIMIT_AS, memory),
                    (libc::RLIMIT_CPU, cpu_seconds),
                    (libc::RLIMIT_FSIZE, 1 << 24),
                    (libc::RLIMIT_CORE, 0),
                    (libc::RLIMIT_NPROC, processes),
                ] {
                    let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
                    if libc::setrlimit(resource, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Root is exempt from RLIMIT_NPROC and may read everything: become nobody.
                if drop_root && (libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(NOBODY) != 0 || libc::setuid(NOBODY) != 0) {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

/// How many processes `uid` runs now (RLIMIT_NPROC counts them all).
fn processes_of(uid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter(|e| e.metadata().is_ok_and(|m| m.uid() == uid))
        .count() as u64
}

/// Runs `program` (Python source) with `python` in `sandbox`, after the
/// guard preamble, in a fresh directory that is removed afterwards.
pub fn run(sandbox: &Sandbox, python: &str, program: &str, limits: Limits) -> Result<Outcome> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let dir = sandbox.scratch().join(format!("run-{}-{}", std::process::id(), RUN.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let outcome = run_in(sandbox, python, &dir, &format!("{GUARD}\n{program}"), limits);
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// Runs before the program: human-eval's `reliability_guard`, plus no
/// sockets.
const GUARD: &str = r#"import builtins, faulthandler, os, shutil, subprocess, sys
faulthandler.disable()
for _m in ("socket", "_socket", "ssl", "ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_m] = None
for _f in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
           "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
           "chroot", "lchown", "chdir"):
    setattr(os, _f, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.exit = builtins.quit = None
del _m, _f
"#;

fn run_in(sandbox: &Sandbox, python: &str, dir: &Path, program: &str, limits: Limits) -> Result<Outcome> {
    std::fs::write(dir.join("program.py"), program)?;
    let (reader, writer) = std::io::pipe()?;
    let mut cmd = sandbox.command(python, dir, limits)?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(writer);
    let started = cmd.spawn();
    drop(cmd); // closes our copy of the pipe's write end
    let mut child = started.with_context(|| format!("cannot start `{python}` to run generated code"))?;
    let tail = Arc::new(Mutex::new(Tail::default()));
    let kept = Arc::clone(&tail);
    let output = std::thread::spawn(move || kept_tail(reader, &kept));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > limits.timeout {
            // bwrap's PID namespace ends with it; unconfined, the program alone dies.
            child.kill()?;
            child.wait()?;
            return Ok(Outcome::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if status.success() {
        return Ok(Outcome::Passed);
    }
    // Unconfined, a process the program left behind may hold the pipe open: wait for it briefly.
    let ended = Instant::now();
    while !output.is_finished() && ended.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let why = tail.lock().expect("not poisoned").last_line();
    Ok(Outcome::Failed(why.unwrap_or_else(|| format!("exited with {status}"))))
}

/// The last [`KEPT_OUTPUT`] bytes of a stream, and how many came before them.
#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    dropped: u64,
}

impl Tail {
    /// The last line that is not blank, marked when its start was cut off.
    fn last_line(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.bytes);
        let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
        let cut = self.dropped > 0 && line.as_ptr() == text.as_ptr();
        Some(if cut { format!("[… {} bytes cut] {line}", self.dropped) } else { line.to_string() })
    }
}

/// Reads `input` to its end, keeping its tail in `tail`.
fn kept_tail(mut input: impl Read, tail: &Mutex<Tail>) {
    let mut buf = vec![0; 64 << 10];
    while let Ok(n @ 1..) = input.read(&mut buf) {
        let mut tail = tail.lock().expect("not poisoned");
        tail.bytes.extend_from_slice(&buf[..n]);
        let over = tail.bytes.len().saturating_sub(KEPT_OUTPUT);
        tail.bytes.drain(..over);
        tail.dropped += over as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { timeout: Duration::from_secs(10), memory_bytes: 1 << 30 };

    /// The sandbox, where bubblewrap is installed: `make test` installs it
    /// and there its absence fails; by hand the test is skipped with a note.
    fn sandbox(scratch: &Path) -> Option<Sandbox> {
        match Sandbox::new("bwrap", scratch) {
            Ok(sandbox) => Some(sandbox),
            // Under `make test` (which sets LLMFLOW_PYTHON) a missing sandbox fails the test.
            Err(e) if std::env::var_os("LLMFLOW_PYTHON").is_none() => {
                crate::testing::skip(&format!("{e:#}"));
                None
            }
            Err(e) => panic!("{e:#}"),
        }
    }

    /// A test function with `body`, called.
    fn program(body: &str) -> String {
        format!("def check():\n{body}\ncheck()\n")
    }

    /// Processes whose command line holds `mark`.
    fn running(mark: &str) -> usize {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(mark)))
            .count()
    }

    #[test]
    fn the_sandbox_stops_sleepers_memory_hogs_and_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let Some(sandbox) = sandbox(dir.path()) else { return };
        let limits = Limits { timeout: Duration::from_millis(1500), ..LIMITS };
        let run = |body: &str| run(&sandbox, "python3", &program(body), limits).unwrap();
        assert_eq!(run("    assert 1 + 1 == 2\n"), Outcome::Passed);
        let started = Instant::now();
        assert_eq!(run("    while True: pass\n"), Outcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(run("    x = bytearray(2 << 30)\n"), Outcome::Failed(why) if why.contains("MemoryError")));
        assert!(matches!(run("    import socket\n"), Outcome::Failed(why) if why.contains("socket")));
        assert!(matches!(run("    import os\n    os.system('true')\n"), Outcome::Failed(why) if why.contains("not callable")));
        let Sandbox::Bwrap { scratch, .. } = &sandbox else { unreachable!() };
        assert_eq!(
            std::fs::read_dir(scratch).unwrap().filter(|e| e.as_ref().unwrap().file_name() != "probe").count(),
            0,
            "run directories are removed"
        );
    }

    /// Each way out that test code found before the sandbox, tried again:
    /// the guard is bypassed on purpose (`posix`, `sys.modules`), so only the
    /// kernel's isolation stands.
    #[test]
    fn escapes_are_blocked() {
        let dir = tempfile::tempdir().unwrap();
        let Some(sandbox) = sandbox(dir.path()) else { return };
        // Stand-ins for the home directory, the artifact store and the project.
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.txt");
        std::fs::write(&secret, "secret").unwrap();
        let model = outside.path().join("model.safetensors");
        std::fs::write(&model, "weights").unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (secret_s, model_s, out_s) = (secret.display(), model.display(), outside.path().display());
        let limits = Limits { timeout: Duration::from_secs(3), ..LIMITS };
        let run = |body: String| run(&sandbox, "python3", &program(&body), limits).unwrap();
        let passed = |body: String| run(body) == Outcome::Passed;

        let reads = [
            format!("    print(open('{secret_s}').read())\n"),
            "    import os\n    print(open(os.path.expanduser('~root/.bashrc')).read())\n".into(),
            "    print(open('/etc/passwd').read())\n".into(),
        ];
        for read in reads {
            assert!(!passed(read.clone()), "read outside the sandbox: {read}");
        }
        assert!(!passed(format!("    open('{out_s}/written', 'w').write('x')\n")));
        assert!(!passed("    open('/usr/written', 'w').write('x')\n".into()));
        assert!(!passed(format!("    f = open('{model_s}', 'r+b')\n    f.write(b'X')\n")));
        assert!(!passed(format!("    import posix\n    posix.unlink('{secret_s}')\n")));
        assert!(!passed(format!("    import posix\n    assert posix.system('echo pwned > {out_s}/pwned') == 0\n")));
        let network = format!(
            "    import sys\n    del sys.modules['socket'], sys.modules['_socket']\n    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        );
        assert!(!passed(network));
        assert!(listener.accept().is_err(), "the sandbox reached the host's network");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "secret");
        assert_eq!(std::fs::read_to_string(&model).unwrap(), "weights");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 2, "a file was written outside the sandbox");

        // A fork bomb is bounded and dies at the timeout, with every process it made.
        let started = Instant::now();
        let bomb = run("    import posix\n    while True:\n        try: posix.fork()\n        except OSError: pass\n".into());
        assert!(bomb != Outcome::Passed && started.elapsed() < Duration::from_secs(10), "{bomb:?}");
        // A process left running past the timeout dies with the sandbox.
        let sleeper = "    import posix\n    posix.system('sleep 31.4159 &')\n    while True: pass\n";
        assert_eq!(run(sleeper.into()), Outcome::TimedOut);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(running("31.4159"), 0, "a process outlived the sandbox's timeout");
    }

    /// No variable of the host's is visible inside: not in the program's
    /// environment, nor in that of any process it can see (bwrap's, PID 1).
    #[test]
    fn no_host_variable_is_visible_inside() {
        let dir = tempfile::tempdir().unwrap();
        let Some(sandbox) = sandbox(dir.path()) else { return };
        std::env::set_var("LLMFLOW_SANDBOX_SECRET", "marker-5f3a");
        let body = r#"    import os
    seen = {}
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            try: seen[pid] = open('/proc/' + pid + '/environ', 'rb').read()
            except OSError: pass
    assert b'PATH=' in seen.get('1', b''), 'bwrap (PID 1) cannot be read: ' + repr(seen)
    leaks = [pid for pid, env in seen.items() if b'marker-5f3a' in env]
    assert not leaks and 'LLMFLOW_SANDBOX_SECRET' not in os.environ, repr(seen)
    assert set(os.environ) <= {'HOME', 'PATH', 'PWD', 'LC_CTYPE'}, sorted(os.environ)  # bwrap sets PWD, Python LC_CTYPE
"#;
        assert_eq!(run(&sandbox, "python3", &program(body), LIMITS).unwrap(), Outcome::Passed);
    }

    /// Files written to `/tmp` or `/sandbox` stop at [`SCRATCH_BYTES`]
    /// inside the sandbox, and nothing is left on the host's disk.
    #[test]
    fn writes_stop_at_the_scratch_size() {
        let dir = tempfile::tempdir().unwrap();
        let Some(sandbox) = sandbox(dir.path()) else { return };
        let limit_mb = SCRATCH_BYTES >> 20;
        for folder in ["/tmp", "/sandbox"] {
            let body = format!(
                "    written = 0
    try:
        for i in range(200):
            with open('{folder}/f%d' % i, 'wb') as f: f.write(b'x' * (1 << 20))
            written += 1
    except OSError as e:
        raise SystemExit('stopped after %d MB: %s' % (written, e))
"
            );
            let outcome = run(&sandbox, "python3", &program(&body), LIMITS).unwrap();
            let Outcome::Failed(why) = &outcome else { panic!("{folder}: {outcome:?}") };
            let written: u64 = why.strip_prefix("stopped after ").and_then(|w| w.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
            assert!(written <= limit_mb && why.contains("No space left"), "{folder}: {why}");
        }
        let Sandbox::Bwrap { scratch, .. } = &sandbox else { unreachable!() };
        assert_eq!(std::fs::read_dir(scratch).unwrap().count(), 1, "only the probe is left");
    }

    /// Of a program's stderr only the end is kept: a huge last line is cut,
    /// with a marker.
    #[test]
    fn only_the_end_of_the_output_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let Some(sandbox) = sandbox(dir.path()) else { return };
        let body = r"    import sys
    sys.stderr.write('early\n' * 1000)
    sys.stderr.write('x' * (20 << 20) + 'END\n')
    sys.stderr.flush()
    raise SystemExit(1)
";
        let outcome = run(&sandbox, "python3", &program(body), LIMITS).unwrap();
        let Outcome::Failed(why) = outcome else { panic!("{outcome:?}") };
        assert!(
            why.starts_with("[… ") && why.ends_with("xxxEND") && why.len() < KEPT_OUTPUT + 40,
            "{} bytes: {}",
            why.len(),
            why.chars().take(80).collect::<String>()
        );
        let short = run(
            &sandbox,
            "python3",
            &program(
                "    raise ValueError('short')
",
            ),
            LIMITS,
        )
        .unwrap();
        assert_eq!(short, Outcome::Failed("ValueError: short".into()));
    }

    /// Ctrl-C: the engine kills the stage's process group; the sandbox is in
    /// it, and everything inside dies with it.
    #[test]
    fn the_sandbox_dies_with_its_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let Some(sandbox) = sandbox(dir.path()) else { return };
        let run = sandbox.scratch().join("group");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("program.py"), "import posix\nposix.system('sleep 27.1828 &')\nwhile True: pass\n").unwrap();
        let mut cmd = sandbox.command("python3", &run, LIMITS).unwrap();
        let mut child = cmd.process_group(0).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let started = Instant::now();
        while running("27.1828") == 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "the sandboxed program did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: the child leads a process group of its own.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(running("27.1828"), 0, "the sandbox outlived its process group");
    }
}
