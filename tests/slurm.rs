//! The Slurm executor through a real cluster: `scripts/slurm-local.sh`
//! brings up a single-node Slurm on loopback once for this test binary (it
//! installs Debian's packages when they are missing) and takes it down when
//! the binary exits. Where Slurm cannot be set up (not root, no apt-get) the
//! tests that need it say why and pass, except under `CI=true`, where they
//! fail naming why.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{assert_same_outputs, manifest_of, wait_for, Project, Run, CHAIN, TINY_DATA};

/// The cluster's `SLURM_CONF`, or `None` where it cannot be set up (the test is skipped, naming why).
fn cluster() -> Option<&'static Path> {
    static CONF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let conf = CONF.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-local.sh");
        let out = Command::new(script).args(["up", "--owner", &std::process::id().to_string()]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => {}
            Some(3) => return Err(format!("no Slurm cluster: {}", stderr.trim())),
            _ => panic!("slurm-local.sh up failed:\n{stderr}"),
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        Ok(PathBuf::from(stdout.lines().find_map(|l| l.strip_prefix("SLURM_CONF=")).expect("SLURM_CONF printed")))
    });
    match conf {
        Ok(conf) => Some(conf),
        Err(why) => {
            common::skip(why);
            None
        }
    }
}

/// `llmflow ARGS` pointed at the cluster.
fn slurm_cmd(p: &Project, conf: &Path, args: &[&str]) -> Command {
    let mut c = p.cmd(args);
    c.env("SLURM_CONF", conf);
    c
}

fn slurm_run(p: &Project, conf: &Path, args: &[&str]) -> Run {
    slurm_cmd(p, conf, args).output().unwrap().into()
}

/// Slurm's own view of a job: its state, or "" once the controller has forgotten it.
fn squeue_state(conf: &Path, job: &str) -> String {
    let out = Command::new("squeue").env("SLURM_CONF", conf).args(["-h", "--states=all", "-j", job, "-o", "%T"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Job ids from `Submitted STAGE as Slurm job N` lines.
fn jobs(run: &Run) -> Vec<String> {
    run.stderr.lines().filter_map(|l| l.split("as Slurm job ").nth(1)).map(|id| id.trim().to_string()).collect()
}

const SLURM: &str = "[pipeline]\nexecutor = \"slurm\"\n\n";

/// The engine tests' chain with every stage a Slurm job.
fn chain() -> String {
    CHAIN.replace("[pipeline]\n", "[pipeline]\nexecutor = \"slurm\"\n")
}

#[test]
fn the_cache_rules_hold_for_stages_built_on_slurm() {
    let Some(conf) = cluster() else { return };
    let p = Project::new(&chain());
    let first = slurm_run(&p, conf, &["run"]);
    assert_eq!(first.code, 0, "{}", first.all());
    let mut built = first.built();
    built.sort();
    assert_eq!(built, ["a", "b", "c", "d"]);
    assert_eq!(jobs(&first).len(), 4, "each stage a job: {}", first.stderr);
    assert_eq!(fs::read_to_string(p.out_dir("c").join("data.txt")).unwrap(), "alpha\nbeta\ngamma\n");
    let manifest = fs::read_to_string(p.out_dir("a").parent().unwrap().join("manifest.json")).unwrap();
    assert!(!manifest.contains("slurm"), "where a stage ran is no part of its artifact: {manifest}");

    // A second run builds nothing and submits nothing.
    let second = slurm_run(&p, conf, &["run"]);
    assert!(second.built().is_empty() && jobs(&second).is_empty(), "{}", second.all());
    assert!(second.stderr.contains("nothing to do: all 4 stage(s) are up to date"), "{}", second.stderr);

    // Slurm settings are volatile: a time limit and a partition change no key.
    p.edit("executor = \"slurm\"\n", "executor = \"slurm\"\nslurm = { time = \"0:10:00\", partition = \"debug\" }\n");
    assert!(p.states().iter().all(|(_, s)| s == "fresh"), "{:?}", p.states());

    // A param change rebuilds the stage and exactly its dependents.
    p.edit("echo beta", "echo BETA");
    let edited = slurm_run(&p, conf, &["run"]);
    assert_eq!(edited.code, 0, "{}", edited.all());
    assert_eq!(edited.built(), ["b", "c"]);
    assert_eq!([p.runs("a"), p.runs("b"), p.runs("c"), p.runs("d")], [1, 2, 2, 1]);
    assert_eq!(fs::read_to_string(p.out_dir("c").join("data.txt")).unwrap(), "alpha\nBETA\ngamma\n");

    // Early cutoff: `a` rebuilt to the same bytes leaves b and c fresh.
    p.edit("echo alpha >", "printf 'alpha\\n' >");
    let cutoff = slurm_run(&p, conf, &["run"]);
    assert_eq!(cutoff.code, 0, "{}", cutoff.all());
    assert_eq!(cutoff.built(), ["a"]);
    assert_eq!([p.runs("a"), p.runs("b"), p.runs("c"), p.runs("d")], [2, 2, 2, 1]);
}

/// The same tiny pipeline from a local corpus file to a few pretraining
/// steps on 2 ranks, built locally and through Slurm (2 `srun` tasks), into
/// two stores: every stage has the same key, the data stages the same
/// output digest, and the model the same bytes (its training log differs
/// only in its measured tokens per second, as between any two runs).
#[test]
fn a_tiny_training_pipeline_built_on_slurm_equals_a_local_build() {
    let Some(conf) = cluster() else { return };
    let pipeline = format!(
        r#"{TINY_DATA}
[stages.pretrain]
kind = "pretrain"
inputs = {{ data = "tokens", tokenizer = "tok" }}
model = {{ n_layer = 2, n_head = 2, d_model = 32, context = 32, dropout = 0.0 }}
train = {{ steps = 8, batch_size = 4, lr = 3e-3, warmup = 2 }}
eval_every = 4
eval_batches = 2
checkpoint_every = 4
samples = {{ count = 1, max_tokens = 8 }}
processes = 2
"#
    );
    let local = Project::new(&pipeline);
    let cluster_built = Project::new(&format!("{SLURM}{pipeline}"));
    for p in [&local, &cluster_built] {
        p.write_corpus(60_000);
    }
    let (a, b) = (local.llmflow(&["run"]), slurm_run(&cluster_built, conf, &["run"]));
    assert_eq!(a.code, 0, "{}", a.all());
    assert_eq!(b.code, 0, "{}", b.all());
    assert_eq!(jobs(&b).len(), 4, "{}", b.stderr);
    let heads = |p: &Project| -> Vec<(String, String, String)> {
        let status = p.status_json();
        status["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let manifest = manifest_of(&PathBuf::from(s["out"].as_str().unwrap()));
                (s["name"].as_str().unwrap().into(), s["key"].as_str().unwrap().into(), manifest["output_digest"].as_str().unwrap().into())
            })
            .collect()
    };
    let (want, got) = (heads(&local), heads(&cluster_built));
    for ((stage, key, digest), (_, got_key, got_digest)) in want.iter().zip(&got) {
        assert_eq!(key, got_key, "{stage}'s key");
        if stage != "pretrain" {
            assert_eq!(digest, got_digest, "{stage}'s output digest");
        }
    }
    let weights = |p: &Project| fs::read(p.out_dir("pretrain").join("model.safetensors")).unwrap();
    assert!(weights(&local) == weights(&cluster_built), "the weights trained on Slurm differ from the local run's");
    let log = cluster_built.log("pretrain");
    assert!(log.contains("2 process(es)") && !log.contains("launching"), "2 srun tasks, no launcher: {log}");
    assert_same_outputs(&cluster_built, &local, "built on Slurm vs locally");
}

/// While jobs are in flight `status` shows them queued or running, with
/// the job id and the node; Ctrl-C cancels them, and nothing is published.
#[test]
fn status_follows_the_jobs_and_ctrl_c_cancels_them() {
    let Some(conf) = cluster() else { return };
    // Two jobs of 5 of the node's 8 CPUs: one runs, the other waits for it.
    let p = Project::new(&format!(
        "{SLURM}{}{}",
        "[stages.one]\nkind = \"command\"\nslurm = { cpus_per_task = 5 }\ncmd = \"touch started-one; sleep 300; echo > {out}/x\"\n\n",
        "[stages.two]\nkind = \"command\"\nslurm = { cpus_per_task = 5 }\ncmd = \"touch started-two; sleep 300; echo > {out}/x\"\n\n",
    ));
    let child = slurm_cmd(&p, conf, &["run", "--jobs", "2"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut shown = String::new();
    wait_for("one job running and one queued", || {
        let status = p.llmflow(&["status"]);
        shown = status.stdout;
        // Until its job is submitted, a stage shows the run's process.
        shown.contains("running on llmflow-node") && shown.contains("queued   ")
    });
    assert!(shown.contains("0 stale, 0 missing, 1 queued, 1 running, 0 failed"), "{shown}");
    let queued = shown.lines().find(|l| l.starts_with("queued")).unwrap();
    assert!(queued.contains("Slurm job ") && queued.contains("queued ("), "{queued}");
    let json = p.status_json();
    let states: Vec<&str> = json["stages"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert!(states.contains(&"queued") && states.contains(&"running"), "{json}");

    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = Instant::now();
    let out: Run = child.wait_with_output().unwrap().into();
    assert_eq!(out.code, 130, "{}", out.all());
    assert!(started.elapsed() < Duration::from_secs(30), "cancelling took {:?}", started.elapsed());
    let ids = jobs(&out);
    assert_eq!(ids.len(), 2, "{}", out.stderr);
    for id in &ids {
        let state = squeue_state(conf, id);
        assert!(state.is_empty() || state == "CANCELLED", "job {id} is {state} after Ctrl-C");
    }
    assert_eq!(p.states(), [("one".to_string(), "missing".to_string()), ("two".to_string(), "missing".to_string())]);
    assert!(fs::read_dir(p.artifacts().join(".tmp")).map_or(true, |mut d| d.next().is_none()), "temp build left behind");
    assert!(!p.artifacts().join("one").exists() && !p.artifacts().join("two").exists(), "published after Ctrl-C");
}

/// A job outlives an engine that is SIGKILLed; the next run that builds the
/// stage cancels it before submitting its own, so two jobs never share the
/// stage's work folder.
#[test]
fn a_job_left_by_a_killed_engine_is_cancelled_by_the_next_run() {
    let Some(conf) = cluster() else { return };
    let p = Project::new(&format!(
        "{SLURM}[stages.s]\nkind = \"command\"\ncmd = \"{}\"\n",
        "if [ -f {work}/first ]; then echo second > {out}/x; else touch {work}/first started; sleep 300; fi"
    ));
    let mut child = slurm_cmd(&p, conf, &["run"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let mut reason = String::new();
    wait_for("the job to start its command", || {
        reason = p.status_json()["stages"][0]["reasons"][0].as_str().unwrap_or("").to_string();
        p.path().join("started").exists() && reason.contains("running on llmflow-node")
    });
    let id = reason.split_whitespace().nth(2).unwrap().to_string();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(squeue_state(conf, &id), "RUNNING", "the job outlives the engine");

    let run = slurm_run(&p, conf, &["run"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let state = squeue_state(conf, &id);
    assert!(state.is_empty() || state == "CANCELLED", "job {id} left over is {state}");
    assert_eq!(fs::read_to_string(p.out_dir("s").join("x")).unwrap(), "second\n");
}

#[test]
fn a_failed_job_shows_the_tail_of_its_log() {
    let Some(conf) = cluster() else { return };
    let p = Project::new(&format!(
        "{SLURM}[stages.bad]\nkind = \"command\"\ncmd = \"echo working on it; echo 'no such table: users' >&2; exit 3\"\n"
    ));
    let run = slurm_run(&p, conf, &["run"]);
    assert_eq!(run.code, 1, "{}", run.all());
    let id = &jobs(&run)[0];
    // The runner's status, as a local build reports it; the command's own is in the log.
    assert!(run.stderr.contains(&format!("stage `bad` failed (exit status 1, Slurm job {id}); last lines of its log:")), "{}", run.stderr);
    assert!(run.stderr.contains("  | error: command exited with status 3"), "{}", run.stderr);
    assert!(run.stderr.contains("  | no such table: users"), "{}", run.stderr);
    let log = run.stderr.lines().find_map(|l| l.trim().strip_prefix("full log: ")).expect("the log's path");
    assert!(log.starts_with(&p.artifacts().join(".logs/bad").display().to_string()), "{log}");
    assert!(fs::read_to_string(log).unwrap().contains("working on it"));
    assert_eq!(p.state("bad"), "failed");
}

/// A job killed at its time limit keeps what the stage put in its work
/// directory (a training stage's checkpoints); the next run resumes from it.
#[test]
fn a_job_killed_by_its_time_limit_resumes_on_the_next_run() {
    let Some(conf) = cluster() else { return };
    // The first attempt saves a checkpoint and outlives its one-minute limit;
    // an attempt that finds the checkpoint finishes from it.
    let p = Project::new(&format!(
        "{SLURM}[stages.train]\nkind = \"command\"\nslurm = {{ time = \"0:01:00\" }}\ncmd = \"{}\"\n",
        "if [ -f {work}/checkpoint ]; then echo resumed from $(cat {work}/checkpoint) > {out}/result.txt; \
         else echo step-100 > {work}/checkpoint; sleep 600; fi"
    ));
    let killed = slurm_run(&p, conf, &["run"]);
    assert_eq!(killed.code, 1, "{}", killed.all());
    assert!(killed.stderr.contains("reached its time limit of 00:01:00; run again to resume from its checkpoints"), "{}", killed.stderr);
    assert_eq!(p.state("train"), "failed");

    let resumed = slurm_run(&p, conf, &["run"]);
    assert_eq!(resumed.code, 0, "{}", resumed.all());
    assert_eq!(fs::read_to_string(p.out_dir("train").join("result.txt")).unwrap(), "resumed from step-100\n");
}

/// A request the cluster cannot meet is refused at submission: exit code 2,
/// naming the stage and the field, and nothing is built.
#[test]
fn an_impossible_request_fails_at_submit_naming_stage_and_field() {
    let Some(conf) = cluster() else { return };
    let p = Project::new(&format!(
        "{SLURM}[stages.s]\nkind = \"command\"\nslurm = {{ partition = \"gpu-huge\" }}\ncmd = \"echo > {{out}}/x\"\n"
    ));
    let run = slurm_run(&p, conf, &["run"]);
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("stage `s`: Slurm refused the job: "), "{}", run.stderr);
    assert!(run.stderr.contains("Invalid partition name specified"), "{}", run.stderr);
    let at = format!("`slurm.partition` = \"gpu-huge\" at {}:6:", p.path().join("pipeline.toml").display());
    assert!(run.stderr.contains(&at), "{}", run.stderr);
    assert!(run.stderr.contains("(`stages.s.slurm.partition`)"), "{}", run.stderr);
    assert_eq!(p.state("s"), "failed");

    // More CPUs than any node has, from [pipeline.slurm].
    p.edit("executor = \"slurm\"\n", "executor = \"slurm\"\nslurm = { cpus_per_task = 1000 }\n");
    p.edit("slurm = { partition = \"gpu-huge\" }\n", "");
    let run = slurm_run(&p, conf, &["run"]);
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("stage `s`: Slurm refused the job: "), "{}", run.stderr);
    assert!(
        run.stderr.contains("`slurm.cpus_per_task` = 1000 at") && run.stderr.contains("(`pipeline.slurm.cpus_per_task`)"),
        "{}",
        run.stderr
    );
    assert!(!p.artifacts().join("s").exists());

    // Tasks that are not the stage's ranks: one process on two nodes.
    p.edit("slurm = { cpus_per_task = 1000 }\n", "slurm = { nodes = 2 }\n");
    let run = slurm_run(&p, conf, &["run"]);
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("stage `s` runs as 1 process(es) (its `processes`), but `slurm.nodes` = 2 at"), "{}", run.stderr);
    assert!(!p.artifacts().join("s").exists());
}

#[test]
fn without_sbatch_a_slurm_stage_names_the_executor_setting() {
    let p = Project::new(&format!("{SLURM}[stages.s]\nkind = \"command\"\ncmd = \"echo > {{out}}/x\"\n"));
    // A PATH with a shell and no Slurm.
    let bin = p.path().join("bin");
    fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink("/bin/sh", bin.join("sh")).unwrap();
    let run: Run = p.cmd(&["run"]).env("PATH", &bin).output().unwrap().into();
    assert_eq!(run.code, 2, "{}", run.all());
    let file = p.path().join("pipeline.toml");
    assert!(
        run.stderr
            .contains(&format!("stage `s` runs on Slurm (`pipeline.executor` at {}:2:1), but `sbatch` is not on PATH", file.display())),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("executor = \"local\""), "{}", run.stderr);
    // A local stage in the same file builds without Slurm.
    p.edit("[stages.s]\n", "[stages.s]\nexecutor = \"local\"\n");
    let run: Run = p.cmd(&["run"]).env("PATH", &bin).output().unwrap().into();
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(run.built(), ["s"]);
}

#[test]
fn mistakes_in_slurm_settings_are_config_errors() {
    let e = common::config_error("[pipeline]\nexecutor = \"cluster\"\n");
    assert!(e.contains("pipeline.toml:2:1: `pipeline.executor` is \"cluster\": use \"local\""), "{e}");
    let e = common::config_error("[stages.s]\nkind = \"command\"\ncmd = \"true\"\nslurm = { partiton = \"gpu\" }\n");
    assert!(e.contains("pipeline.toml:4:11: unknown key `stages.s.slurm.partiton`, did you mean `partition`?"), "{e}");
    let e = common::config_error("[pipeline.slurm]\nnodes = 0\n");
    assert!(e.contains("pipeline.toml:2:1: `pipeline.slurm.nodes` must be a whole number of nodes, 1 or more"), "{e}");
    let e = common::config_error("[stages.s]\nkind = \"command\"\ncmd = \"true\"\nslurm = { extra = \"--exclusive\" }\n");
    assert!(e.contains("`stages.s.slurm.extra` must be a list of sbatch options"), "{e}");
}

/// sbatch reads `%` in a file name as a pattern; a variant's log still lands
/// at its own path.
#[test]
fn a_percent_in_a_variant_name_keeps_its_log_where_llmflow_looks() {
    let Some(conf) = cluster() else { return };
    let p = Project::new(&format!(
        "{SLURM}[stages.s]\nkind = \"command\"\ncmd = \"echo said $A; echo $A > {{out}}/a\"\nsweep = {{ \"env.A\" = [\"50%j\"] }}\n"
    ));
    let r = slurm_run(&p, conf, &["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let logs: Vec<PathBuf> = fs::read_dir(p.artifacts().join(".logs").join("s[A=50%j]")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(fs::read_to_string(&logs[0]).unwrap().contains("said 50%j"));
}
