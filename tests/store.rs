//! The store under misuse, races and faults: what `gc` may remove, the
//! store-wide lock, leftover builds, processes a stage leaves behind,
//! read-only artifacts and `verify`. Each test reproduces a way data was
//! lost or changed.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use common::{wait_for, Project};

const AB: &str = r#"
[pipeline]
name = "ab"

[stages.a]
kind = "command"
cmd = "echo alpha > {out}/data.txt"

[stages.b]
kind = "command"
input = "a"
cmd = "cat {inputs.input}/data.txt > {out}/data.txt && echo beta >> {out}/data.txt"
"#;

#[test]
fn a_store_that_is_or_holds_the_pipeline_folder_is_refused() {
    for store in [".", ".."] {
        let p = Project::new(&AB.replace("name = \"ab\"", &format!("name = \"ab\"\nartifacts = \"{store}\"")));
        p.write("notes/todo.txt", "keep me");
        for verb in [&["run"][..], &["status"], &["gc"]] {
            let r = p.llmflow(verb);
            assert_eq!(r.code, 2, "{verb:?} with artifacts = {store}: {}", r.all());
            assert!(r.stderr.contains("pipeline.toml:4:"), "{}", r.stderr);
            assert!(r.stderr.contains("pipeline.artifacts"), "{}", r.stderr);
        }
        assert_eq!(p.read("notes/todo.txt"), "keep me");
    }
}

#[test]
fn a_folder_that_is_not_a_store_is_neither_filled_nor_swept() {
    let p = Project::new(&AB.replace("name = \"ab\"", "name = \"ab\"\nartifacts = \"data\""));
    p.write("data/corpus.txt", "the user's corpus");
    let run = p.llmflow(&["run"]);
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("is not an llmflow artifact store"), "{}", run.stderr);
    let gc = p.llmflow(&["gc"]);
    assert_eq!(gc.code, 2, "{}", gc.all());
    assert!(gc.stderr.contains("gc removes nothing there"), "{}", gc.stderr);
    assert_eq!(p.read("data/corpus.txt"), "the user's corpus");
    assert_eq!(fs::read_dir(p.path().join("data")).unwrap().count(), 1);
}

#[test]
fn gc_removes_only_what_the_store_made() {
    let p = Project::new(AB);
    assert_eq!(p.llmflow(&["run"]).code, 0);
    let old_a = p.out_dir("a").parent().unwrap().to_path_buf();
    p.edit("echo alpha", "echo ALPHA");
    assert_eq!(p.llmflow(&["run"]).code, 0);
    // An export, and a folder of a stage's name without a manifest, inside the store.
    p.write("artifacts/hf-export/config.json", "{}");
    p.write("artifacts/a/notes/readme.txt", "mine");
    let dry = p.llmflow(&["gc", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.all());
    assert!(dry.stdout.contains(&format!("would remove a/{}", old_a.file_name().unwrap().to_str().unwrap())), "{}", dry.stdout);
    assert!(!dry.stdout.contains("hf-export") && !dry.stdout.contains("notes"), "{}", dry.stdout);
    assert_eq!(p.llmflow(&["gc"]).code, 0);
    assert!(!old_a.exists());
    assert_eq!(p.read("artifacts/hf-export/config.json"), "{}");
    assert_eq!(p.read("artifacts/a/notes/readme.txt"), "mine");
    assert!(p.states().iter().all(|(_, s)| s == "fresh"));
    // Without its marker the folder is no store of ours.
    fs::remove_file(p.artifacts().join(".llmflow-store")).unwrap();
    let gc = p.llmflow(&["gc"]);
    assert_eq!(gc.code, 2, "{}", gc.all());
}

#[test]
fn gc_waits_for_a_run_and_no_wait_names_it() {
    let slow = AB.replace("echo alpha > {out}/data.txt", "touch started && sleep 2 && echo alpha > {out}/data.txt");
    let p = Project::new(&slow);
    let mut run = p.cmd(&["run"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for("the stage to start", || p.path().join("started").exists());

    let busy = p.llmflow(&["gc", "--no-wait"]);
    assert_eq!(busy.code, 1, "{}", busy.all());
    assert!(busy.stderr.contains("in use by: llmflow run"), "{}", busy.stderr);

    // A waiting gc starts only once the run is over, and the run loses nothing.
    let gc = p.llmflow(&["gc"]);
    assert_eq!(gc.code, 0, "{}", gc.all());
    assert!(gc.stderr.contains("waiting for the store"), "{}", gc.stderr);
    assert!(run.wait().unwrap().success());
    assert_eq!(fs::read_to_string(p.out_dir("b").join("data.txt")).unwrap(), "alpha\nbeta\n");
    assert_eq!(p.llmflow(&["verify"]).code, 0);
}

#[test]
fn gc_of_one_pipeline_file_keeps_what_another_uses() {
    let p = Project::new(AB);
    p.write("v2.toml", &AB.replace("echo alpha", "echo ALPHA"));
    assert_eq!(p.llmflow(&["run"]).code, 0);
    assert_eq!(p.llmflow(&["run", "-f", "v2.toml"]).code, 0);
    let v1_a = p.out_dir("a");

    let gc = p.llmflow(&["gc", "-f", "v2.toml"]);
    assert_eq!(gc.code, 0, "{}", gc.all());
    assert!(gc.stdout.contains("0 artifact(s) unused"), "{}", gc.stdout);
    assert!(v1_a.exists());
    assert!(p.states().iter().all(|(_, s)| s == "fresh"));

    // A pipeline file that no longer loads stops gc rather than losing its artifacts.
    p.edit("[stages.b]", "[stages.b");
    let broken = p.llmflow(&["gc", "-f", "v2.toml"]);
    assert_eq!(broken.code, 2, "{}", broken.all());
    assert!(broken.stderr.contains("--only-this-pipeline"), "{}", broken.stderr);
    assert!(v1_a.exists());

    let only = p.llmflow(&["gc", "-f", "v2.toml", "--only-this-pipeline"]);
    assert_eq!(only.code, 0, "{}", only.all());
    assert!(only.stdout.contains("2 artifact(s) unused"), "{}", only.stdout);
    assert!(!v1_a.exists());
}

#[test]
fn a_live_build_in_another_pid_namespace_keeps_its_temp_dir() {
    let p = Project::new(AB);
    assert_eq!(p.llmflow(&["run", "a"]).code, 0);
    // A build whose pid means nothing here (another namespace or host) holds its lock.
    let tmp = p.artifacts().join(".tmp");
    let live = tmp.join("b.0123456789ab.1.1");
    fs::create_dir_all(live.join("out")).unwrap();
    let lock = fs::File::create(tmp.join("b.0123456789ab.1.1.lock")).unwrap();
    lock.lock().unwrap();
    let dead = tmp.join("b.0123456789ab.2.2");
    fs::create_dir_all(dead.join("out")).unwrap();
    fs::File::create(tmp.join("b.0123456789ab.2.2.lock")).unwrap();

    assert_eq!(p.llmflow(&["run"]).code, 0);
    assert!(live.join("out").exists(), "a live build's temp dir was removed");
    assert!(!dead.exists(), "a dead build's temp dir was kept");
    drop(lock);
    assert_eq!(p.llmflow(&["run"]).code, 0);
    assert!(!live.exists());
}

#[test]
fn processes_a_stage_leaves_behind_die_before_its_output_is_hashed() {
    let p = Project::new(&AB.replace(
        "echo alpha > {out}/data.txt",
        "exec 3>>{out}/data.txt; echo alpha >&3; (sleep 1; echo late >&3) & (setsid sh -c 'sleep 1; echo late' >&3 &) ",
    ));
    let run = p.llmflow(&["run"]);
    assert_eq!(run.code, 0, "{}", run.all());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(fs::read_to_string(p.out_dir("a").join("data.txt")).unwrap(), "alpha\n");
    assert_eq!(p.llmflow(&["verify"]).code, 0);
}

#[test]
fn a_stage_dies_with_the_engine() {
    let p = Project::new(&AB.replace("echo alpha > {out}/data.txt", "while true; do echo tick >> ticks; sleep 0.05; done"));
    let mut run = p.cmd(&["run"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for("the stage to tick", || p.read("ticks").lines().count() > 2);
    // SAFETY: kills the engine alone, not its process group.
    unsafe { libc::kill(run.id() as i32, libc::SIGKILL) };
    run.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = p.read("ticks").len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(p.read("ticks").len(), after, "the stage's shell outlived the engine");
    // The next run finds the store consistent and builds everything.
    p.edit("while true; do echo tick >> ticks; sleep 0.05; done", "echo alpha > {out}/data.txt");
    assert_eq!(p.llmflow(&["run"]).code, 0);
    assert_eq!(p.llmflow(&["verify"]).code, 0);
}

#[test]
fn published_artifacts_are_read_only_and_a_stage_may_not_write_into_its_input() {
    let p =
        Project::new(&AB.replace("cat {inputs.input}/data.txt >", "echo evil >> {inputs.input}/data.txt; cat {inputs.input}/data.txt >"));
    assert_eq!(p.llmflow(&["run", "a"]).code, 0);
    let a = p.out_dir("a");
    let run = p.llmflow(&["run"]);
    assert_eq!(run.code, 1, "{}", run.all());
    let mode = fs::metadata(a.join("data.txt")).unwrap().permissions().mode();
    assert_eq!(mode & 0o222, 0, "published file is writable: {mode:o}");
    assert_eq!(fs::metadata(&a).unwrap().permissions().mode() & 0o222, 0);
    // Running as root the write goes through; llmflow notices and fails the stage.
    if run.stderr.contains("wrote into its input") {
        assert!(run.stderr.contains("`input` (a: data.txt)"), "{}", run.stderr);
        assert_eq!(p.state("a"), "stale", "the damaged input is rebuilt");
    } else {
        assert!(run.all().contains("Permission denied"), "{}", run.all());
    }
}

#[test]
fn verify_reports_extra_files_and_rehashes_dependency_files() {
    let p = Project::new(
        &AB.replace("cmd = \"echo alpha > {out}/data.txt\"", "deps = [\"script.sh\"]\ncmd = \"sh script.sh > {out}/data.txt\""),
    );
    p.write("script.sh", "echo alpha\n");
    assert_eq!(p.llmflow(&["run"]).code, 0);
    assert_eq!(p.llmflow(&["verify"]).code, 0);

    // Same size, same mtime, same inode: status trusts it; verify does not.
    let script = p.path().join("script.sh");
    let mtime = fs::metadata(&script).unwrap().modified().unwrap();
    let mut f = fs::OpenOptions::new().write(true).open(&script).unwrap();
    std::io::Write::write_all(&mut f, b"echo ALPHA\n").unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    assert_eq!(p.state("a"), "fresh");
    let verify = p.llmflow(&["verify"]);
    assert_eq!(verify.code, 1, "{}", verify.all());
    assert!(verify.stdout.contains("CHANGED script.sh"), "{}", verify.stdout);
    assert_eq!(p.state("a"), "stale");
    assert_eq!(p.llmflow(&["run"]).built(), ["a", "b"]);

    // A file added to an artifact is damage too.
    let extra = p.out_dir("b").join("extra.txt");
    fs::set_permissions(p.out_dir("b"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(&extra, "added").unwrap();
    let verify = p.llmflow(&["verify"]);
    assert_eq!(verify.code, 1, "{}", verify.all());
    assert!(verify.stdout.contains("extra.txt (not in the manifest)"), "{}", verify.stdout);
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let p = Project::new(AB);
    let mut child = p.cmd(&["status"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn gc_sweeps_left_over_temp_and_state_files() {
    let p = Project::new(AB);
    assert_eq!(p.llmflow(&["run"]).code, 0);
    p.write("artifacts/.state/.a.json.tmp12345", "half written");
    p.write("artifacts/.tmp/b.0123456789ab.3.3/out/data.txt", "a killed build");
    let gc = p.llmflow(&["gc"]);
    assert_eq!(gc.code, 0, "{}", gc.all());
    assert!(!p.artifacts().join(".state/.a.json.tmp12345").exists());
    assert!(!p.artifacts().join(".tmp/b.0123456789ab.3.3").exists());
    assert!(p.states().iter().all(|(_, s)| s == "fresh"));
}

/// A run in another PID namespace (`unshare --pid`, as a container would
/// be) and a run here share the store: neither removes the other's build.
#[test]
fn runs_in_two_pid_namespaces_share_a_store() {
    let slow = AB.replace("echo alpha > {out}/data.txt", "touch started && sleep 2 && echo alpha > {out}/data.txt");
    let p = Project::new(&slow);
    p.write("other.toml", &AB.replace("echo alpha", "echo ALPHA"));
    let probe = std::process::Command::new("unshare").args(["--pid", "--fork", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        common::skip("cannot make a PID namespace here (unshare --pid needs root or user namespaces)");
        return;
    }
    let inside = std::process::Command::new("unshare")
        .args(["--pid", "--fork", env!("CARGO_BIN_EXE_llmflow"), "run"])
        .current_dir(p.path())
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the stage in the other namespace to start", || p.path().join("started").exists());
    // Meanwhile a run here, of another version of the pipeline, on the same store.
    let here = p.llmflow(&["run", "-f", "other.toml"]);
    assert_eq!(here.code, 0, "{}", here.all());
    let out = inside.wait_with_output().unwrap();
    assert!(out.status.success(), "the run in the other namespace failed:\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read_to_string(p.out_dir("b").join("data.txt")).unwrap(), "alpha\nbeta\n");
    assert_eq!(p.llmflow(&["verify"]).code, 0);
}
