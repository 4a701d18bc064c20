//! The engine's caching, publishing and scheduling rules, driven through the
//! real binary on pipelines of `command` stages.

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{wait_for, Project, CHAIN};

fn runs(p: &Project) -> [usize; 4] {
    [p.runs("a"), p.runs("b"), p.runs("c"), p.runs("d")]
}

#[test]
fn second_run_builds_nothing_and_says_so() {
    let p = Project::new(CHAIN);
    let first = p.llmflow(&["run"]);
    assert_eq!(first.code, 0, "{}", first.all());
    let mut built = first.built();
    built.sort();
    assert_eq!(built, ["a", "b", "c", "d"]);
    assert_eq!(runs(&p), [1, 1, 1, 1]);
    assert_eq!(fs::read_to_string(p.out_dir("c").join("data.txt")).unwrap(), "alpha\nbeta\ngamma\n");

    let second = p.llmflow(&["run"]);
    assert_eq!(second.code, 0, "{}", second.all());
    assert!(second.built().is_empty(), "{}", second.all());
    assert!(second.stderr.contains("nothing to do: all 4 stage(s) are up to date"), "{}", second.stderr);
    assert_eq!(runs(&p), [1, 1, 1, 1]);
}

#[test]
fn param_change_rebuilds_the_stage_and_exactly_its_dependents() {
    let p = Project::new(CHAIN);
    assert_eq!(p.llmflow(&["run"]).code, 0);
    p.edit("echo beta", "echo BETA");

    let status = p.llmflow(&["status"]);
    assert!(status.stdout.contains("param `cmd`"), "{}", status.stdout);
    let expected = sorted(vec![
        ("a".into(), "fresh".into()),
        ("b".into(), "stale".into()),
        ("c".into(), "stale".into()),
        ("d".into(), "fresh".into()),
    ]);
    assert_eq!(sorted(p.states()), expected);
    let json = p.status_json();
    let c = json["stages"].as_array().unwrap().iter().find(|s| s["name"] == "c").unwrap().clone();
    assert!(c["reasons"][0].as_str().unwrap().contains("input `up` (b) must be built first"), "{c}");

    let run = p.llmflow(&["run"]);
    assert_eq!(run.built(), ["b", "c"]);
    assert_eq!(runs(&p), [1, 2, 2, 1]);
    assert_eq!(fs::read_to_string(p.out_dir("c").join("data.txt")).unwrap(), "alpha\nBETA\ngamma\n");
}

fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

#[test]
fn explicit_defaults_and_volatile_params_do_not_invalidate() {
    let p = Project::new(CHAIN);
    assert_eq!(p.llmflow(&["run"]).code, 0);
    // `deps = []` and `env = {}` are the defaults; `threads` is volatile.
    p.edit("[stages.b]\n", "[stages.b]\ndeps = []\nenv = {}\nthreads = 2\n");
    assert!(p.states().iter().all(|(_, s)| s == "fresh"), "{:?}", p.states());
    assert!(p.llmflow(&["run"]).built().is_empty());
}

#[test]
fn early_cutoff_keeps_dependents_fresh_when_output_bytes_are_equal() {
    let p = Project::new(CHAIN);
    assert_eq!(p.llmflow(&["run"]).code, 0);
    // A different command with byte-identical output.
    p.edit("echo alpha >", "printf 'alpha\\n' >");
    let run = p.llmflow(&["run"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(run.built(), ["a"]);
    assert_eq!(runs(&p), [2, 1, 1, 1]);
}

#[test]
fn dependency_file_contents_are_part_of_the_key() {
    let p = Project::new(
        r#"
[stages.s]
kind = "command"
deps = ["script.sh"]
cmd = "sh script.sh > {out}/o.txt"
"#,
    );
    p.write("script.sh", "echo one\n");
    assert_eq!(p.llmflow(&["run"]).built(), ["s"]);
    p.write("script.sh", "echo two\n");
    let status = p.llmflow(&["status"]);
    assert!(status.stdout.contains("file `script.sh` changed"), "{}", status.stdout);
    assert_eq!(p.llmflow(&["run"]).built(), ["s"]);
    assert_eq!(fs::read_to_string(p.out_dir("s").join("o.txt")).unwrap(), "two\n");
    p.write("script.sh", "echo one\n");
    // Back to a known state: the first artifact is reused.
    assert!(p.llmflow(&["run"]).built().is_empty());
}

#[test]
fn manifest_records_inputs_files_and_digests() {
    let p = Project::new(CHAIN);
    assert_eq!(p.llmflow(&["run", "b"]).built(), ["a", "b"]);
    assert_eq!(p.runs("c"), 0, "targets build only what they need");
    let show = p.llmflow(&["show", "b", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let m = &v["manifest"];
    assert_eq!(m["kind"], "command");
    assert_eq!(m["files"][0]["path"], "data.txt");
    assert_eq!(m["files"][0]["blake3"], blake3::hash(b"alpha\nbeta\n").to_hex().to_string());
    assert_eq!(m["inputs"]["input"]["stage"], "a");
    let key = m["key"].as_str().unwrap();
    assert!(p.artifacts().join("b").join(key).join("manifest.json").is_file());
}

#[test]
fn sigkill_mid_stage_publishes_nothing_and_next_run_rebuilds() {
    let p = Project::new(
        r#"
[stages.slow]
kind = "command"
cmd = "echo partial > {out}/part.txt && touch started && sleep 30 && echo done > {out}/done.txt"
"#,
    );
    let mut child = p.cmd(&["run"]).stdout(Stdio::null()).stderr(Stdio::null()).process_group(0).spawn().unwrap();
    wait_for("the stage to start", || p.path().join("started").exists());
    // Kill the scheduler and the stage process, as a power cut would.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(p.state("slow"), "missing");
    assert!(!p.artifacts().join("slow").exists() || fs::read_dir(p.artifacts().join("slow")).unwrap().next().is_none());

    p.edit("sleep 30", "sleep 0");
    fs::remove_file(p.path().join("started")).unwrap();
    let run = p.llmflow(&["run"]);
    assert_eq!(run.built(), ["slow"], "{}", run.all());
    assert!(p.out_dir("slow").join("done.txt").is_file());
}

#[test]
fn interrupt_stops_children_and_publishes_nothing() {
    let p = Project::new(
        r#"
[stages.slow]
kind = "command"
cmd = "touch started && sleep 30 && echo done > {out}/done.txt && touch finished"
"#,
    );
    let child = p.cmd(&["run"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for("the stage to start", || p.path().join("started").exists());
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "Ctrl-C must not wait for the stage");
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(p.state("slow"), "missing");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!p.path().join("finished").exists());
    assert!(fs::read_dir(p.artifacts().join(".tmp")).map_or(true, |mut d| d.next().is_none()), "temp build left behind");
}

#[test]
fn concurrent_runs_build_each_stage_once() {
    let p = Project::new(&CHAIN.replace("mkdir -p runs &&", "mkdir -p runs && sleep 0.3 &&"));
    let children: Vec<_> = (0..4).map(|_| p.cmd(&["run"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()).collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(runs(&p), [1, 1, 1, 1]);
    assert!(p.states().iter().all(|(_, s)| s == "fresh"));
}

#[test]
fn failure_shows_the_log_and_keep_going_builds_independent_stages() {
    let p = Project::new(
        r#"
[stages.bad]
kind = "command"
cmd = "echo 'loading shard 3'; echo 'shard 3 is corrupt' >&2; exit 3"

[stages.after]
kind = "command"
input = "bad"
cmd = "touch {out}/x"

[stages.good]
kind = "command"
cmd = "touch {out}/x"
"#,
    );
    let run = p.llmflow(&["run", "--jobs", "1"]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("stage `bad` failed (exit status 1)"), "{}", run.stderr);
    assert!(run.stderr.contains("| shard 3 is corrupt"), "{}", run.stderr);
    assert!(run.stderr.contains("full log: "), "{}", run.stderr);

    let status = p.llmflow(&["status"]);
    assert!(status.stdout.contains("failed"), "{}", status.stdout);
    assert!(status.stdout.contains("log: "), "{}", status.stdout);

    let kg = p.llmflow(&["run", "--keep-going"]);
    assert_eq!(kg.code, 1);
    assert!(kg.built().contains(&"good".to_string()), "{}", kg.all());
    assert!(kg.stderr.contains("Skipped after (an input failed)"), "{}", kg.stderr);
}

#[test]
fn independent_stages_run_in_parallel_within_jobs() {
    let stage = |n: &str| {
        format!("[stages.{n}]\nkind = \"command\"\ncmd = \"date +%s.%N > {{out}}/start && sleep 0.5 && date +%s.%N > {{out}}/end\"\n\n")
    };
    let p = Project::new(&format!("{}{}", stage("x"), stage("y")));
    let interval = |s: &str| {
        let read = |f: &str| fs::read_to_string(p.out_dir(s).join(f)).unwrap().trim().parse::<f64>().unwrap();
        (read("start"), read("end"))
    };
    assert_eq!(p.llmflow(&["run", "--jobs", "2"]).code, 0);
    let (x, y) = (interval("x"), interval("y"));
    assert!(x.0 < y.1 && y.0 < x.1, "--jobs 2 should overlap: {x:?} {y:?}");

    assert_eq!(p.llmflow(&["run", "--jobs", "1", "--force", "x", "--force", "y"]).code, 0);
    let (x, y) = (interval("x"), interval("y"));
    assert!(x.1 <= y.0 || y.1 <= x.0, "--jobs 1 must not overlap: {x:?} {y:?}");
}

#[test]
fn status_trusts_stat_and_verify_rehashes() {
    let p = Project::new(CHAIN);
    assert_eq!(p.llmflow(&["run"]).code, 0);
    let file = p.out_dir("a").join("data.txt");
    let mtime = fs::metadata(&file).unwrap().modified().unwrap();
    // Same size, same mtime, same inode: status trusts the manifest.
    let mut perms = fs::metadata(&file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(&file, perms).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&file).unwrap();
    use std::io::Write;
    (&f).write_all(b"ALPHA").unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    assert_eq!(p.state("a"), "fresh");

    let verify = p.llmflow(&["verify"]);
    assert_eq!(verify.code, 1, "{}", verify.all());
    assert!(verify.stdout.contains("DAMAGED a/"), "{}", verify.stdout);
    assert!(verify.stdout.contains("data.txt"), "{}", verify.stdout);

    // A visible change (mtime moves) is caught by status and rebuilt by run.
    fs::write(&file, "tampered\n").unwrap();
    let status = p.llmflow(&["status"]);
    assert!(status.stdout.contains("modified or removed: data.txt"), "{}", status.stdout);
    let run = p.llmflow(&["run"]);
    assert_eq!(run.built(), ["a"], "{}", run.all());
    assert_eq!(p.llmflow(&["verify"]).code, 0);
}

/// `status` remembers what it found built; an artifact removed behind its
/// back is still seen as gone.
#[test]
fn a_removed_artifact_is_seen_despite_what_status_remembers() {
    let p = Project::new(CHAIN);
    assert_eq!(p.llmflow(&["run"]).code, 0);
    assert_eq!(p.state("b"), "fresh");
    fs::remove_dir_all(p.out_dir("b").parent().unwrap()).unwrap();
    assert_eq!(p.state("b"), "missing");
    // Rebuilt to the same bytes, so c stays fresh (early cutoff).
    assert_eq!(p.llmflow(&["run"]).built(), ["b"]);
}

#[test]
fn gc_removes_only_unused_artifacts() {
    let p = Project::new(CHAIN);
    assert_eq!(p.llmflow(&["run"]).code, 0);
    let old_d = p.out_dir("d");
    p.edit("echo delta", "echo DELTA");
    assert_eq!(p.llmflow(&["run"]).built(), ["d"]);

    let dry = p.llmflow(&["gc", "--dry-run"]);
    assert!(dry.stdout.contains("would remove d/"), "{}", dry.stdout);
    assert!(dry.stdout.contains("1 artifact(s) unused"), "{}", dry.stdout);
    assert!(old_d.exists());

    let gc = p.llmflow(&["gc"]);
    assert_eq!(gc.code, 0, "{}", gc.all());
    assert!(!old_d.exists());
    assert!(p.states().iter().all(|(_, s)| s == "fresh"));
    assert!(p.llmflow(&["run"]).built().is_empty());
}

#[test]
fn dry_run_lists_what_would_build_and_why() {
    let p = Project::new(CHAIN);
    assert_eq!(p.llmflow(&["run", "a"]).code, 0);
    let dry = p.llmflow(&["run", "--dry-run"]);
    assert_eq!(dry.code, 0);
    assert!(dry.stdout.contains("Fresh a"), "{}", dry.stdout);
    assert!(dry.stdout.contains("Would build b (command): never built"), "{}", dry.stdout);
    assert!(dry.stdout.contains("3 stage(s) would be built"), "{}", dry.stdout);
    assert_eq!(p.runs("b"), 0);
}

#[test]
fn dag_renders_text_dot_and_mermaid() {
    let p = Project::new(CHAIN);
    let text = p.llmflow(&["dag"]).stdout;
    assert!(text.contains("b (command) ← input=a"), "{text}");
    let dot = p.llmflow(&["dag", "--format", "dot"]).stdout;
    assert!(dot.contains("\"a\" -> \"b\";") && dot.contains("\"b\" -> \"c\";"), "{dot}");
    let mermaid = p.llmflow(&["dag", "--format", "mermaid"]).stdout;
    assert!(mermaid.starts_with("flowchart LR") && mermaid.contains("b --> c"), "{mermaid}");
}

/// One grammar across verbs: `status STAGE` selects as `run STAGE` does,
/// and what scripts parse comes as JSON.
#[test]
fn status_filters_like_run_and_scripts_get_json() {
    let p = Project::new(CHAIN);
    assert_eq!(p.llmflow(&["run", "b"]).code, 0);
    let status = p.llmflow(&["status", "b"]);
    assert_eq!(status.code, 0, "{}", status.all());
    assert!(status.stdout.contains("2 stages: 2 fresh"), "b and what it needs: {}", status.stdout);
    assert!(!status.stdout.contains(" d "), "{}", status.stdout);
    let json: serde_json::Value = serde_json::from_str(&p.llmflow(&["status", "c", "--json"]).stdout).unwrap();
    let names: Vec<&str> = json["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let bad = p.llmflow(&["status", "nope"]);
    assert_eq!(bad.code, 2, "{}", bad.all());

    let plan: serde_json::Value = serde_json::from_str(&p.llmflow(&["run", "--dry-run", "--json"]).stdout).unwrap();
    assert_eq!(plan["would_build"], 2, "{plan}");
    let c = plan["stages"].as_array().unwrap().iter().find(|s| s["name"] == "c").unwrap();
    assert_eq!(c["build"], true);
    assert_eq!(c["reasons"][0], "never built", "{c}");

    let dag: serde_json::Value = serde_json::from_str(&p.llmflow(&["dag", "--format", "json"]).stdout).unwrap();
    let b = dag["stages"].as_array().unwrap().iter().find(|s| s["name"] == "b").unwrap();
    assert_eq!(b["inputs"]["input"], "a", "{dag}");
    assert_eq!(b["executor"], "local");

    let kinds: serde_json::Value = serde_json::from_str(&p.llmflow(&["kinds", "command", "--json"]).stdout).unwrap();
    assert_eq!(kinds[0]["kind"], "command", "{kinds}");

    let gc: serde_json::Value = serde_json::from_str(&p.llmflow(&["gc", "--dry-run", "--json"]).stdout).unwrap();
    assert_eq!(gc["dry_run"], true, "{gc}");
    let verify: serde_json::Value = serde_json::from_str(&p.llmflow(&["verify", "--json"]).stdout).unwrap();
    assert_eq!(verify["artifacts"].as_array().unwrap().len(), 2, "{verify}");
}
