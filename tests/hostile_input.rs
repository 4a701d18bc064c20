//! What a careless or hostile pipeline does to the engine: huge and
//! non-UTF-8 logs, sweeps of millions of variants, names too long for a
//! file system, patterns that could pick the wrong variant, damage to
//! artifacts no stage uses any more.

mod common;

use std::fs;

use common::{config_error, Project};

/// The engine's peak memory so far, over the children it waited for (the
/// stages run under it are small shell commands).
fn children_max_rss_mb() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills `usage`.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) };
    // SAFETY: filled above; ru_maxrss is in KiB on Linux.
    unsafe { usage.assume_init().ru_maxrss / 1024 }
}

#[test]
fn a_huge_log_is_capped_and_read_from_its_end() {
    // 300 MB of output, a line of 100 KB, then the reason.
    let p = Project::new(
        r#"
[pipeline]
log_limit_mb = 4

[stages.loud]
kind = "command"
cmd = "yes 'a line of output that goes on and on, as a stage in a loop prints it' | head -c 300000000; head -c 100000 /dev/zero | tr '\\0' y; echo; echo 'error: the real reason'; exit 3"
"#,
    );
    let r = p.llmflow(&["run"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("| error: the real reason"), "{}", r.stderr);
    assert!(r.stderr.contains("more bytes)"), "the 100 KB line is cut: {}", &r.stderr[..r.stderr.len().min(3000)]);
    assert!(r.stderr.len() < 20_000, "the failure message is short: {} bytes", r.stderr.len());
    let log = fs::read_dir(p.artifacts().join(".logs/loud")).unwrap().next().unwrap().unwrap().path();
    let size = fs::metadata(&log).unwrap().len();
    assert!(size <= 4 << 20, "the log keeps its last 4 MiB: {size} bytes");
    let head = fs::read(&log).unwrap()[..200].to_vec();
    assert!(String::from_utf8_lossy(&head).starts_with("[llmflow: "), "{}", String::from_utf8_lossy(&head));
    let status = p.llmflow(&["status"]);
    assert!(status.stdout.contains("last build failed: error: command exited with status 3"), "{}", status.stdout);
    let rss = children_max_rss_mb();
    assert!(rss < 200, "the engine's memory stays bounded: {rss} MB at its peak");
}

#[test]
fn output_that_is_not_utf8_does_not_hide_the_error() {
    let p = Project::new(
        r#"
[stages.bad]
kind = "command"
cmd = "echo 'line before'; printf 'bin\\377\\376junk\\n'; echo 'error: the real reason'; exit 4"
"#,
    );
    let r = p.llmflow(&["run"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("| error: the real reason"), "{}", r.stderr);
    assert!(r.stderr.contains("bin\u{fffd}\u{fffd}junk"), "{}", r.stderr);
    // The last error line is the runner's, after the stage's own: reading did not stop at the bad bytes.
    let status = p.llmflow(&["status"]);
    assert!(status.stdout.contains("last build failed: error: command exited with status 4"), "{}", status.stdout);
}

#[test]
fn a_sweep_of_millions_of_variants_is_refused_before_it_is_made() {
    let values = |n: usize| (0..n).map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ");
    let pipeline = format!(
        "[stages.s]\nkind = \"command\"\ncmd = \"echo {{out}}\"\nsweep = {{ \"env.A\" = [{v}], \"env.B\" = [{v}], \"env.C\" = [{v}] }}\n",
        v = values(200)
    );
    let started = std::time::Instant::now();
    let err = config_error(&pipeline);
    assert!(started.elapsed().as_secs() < 30, "refused at once, not after expanding");
    assert!(err.contains("pipeline.toml:4:"), "at the sweep's line: {err}");
    assert!(err.contains("8000000 variants"), "{err}");
    assert!(err.contains("`pipeline.max_stages` = 100000"), "{err}");
    // The setting the message names lets a big sweep through.
    let p = Project::new(&format!(
        "[pipeline]\nmax_stages = 5\n[stages.s]\nkind = \"command\"\ncmd = \"echo {{out}}\"\nsweep = {{ \"env.A\" = [{}] }}\n",
        values(6)
    ));
    let r = p.llmflow(&["status"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("up to 6 variants"), "{}", r.stderr);
    p.edit("max_stages = 5", "max_stages = 6");
    assert_eq!(p.llmflow(&["status"]).code, 0);
}

#[test]
fn a_bracketed_input_picks_the_variant_written_and_refuses_an_ambiguous_one() {
    let pipeline = r#"
[stages.s]
kind = "command"
cmd = "echo $A > {out}/a"
sweep = { "env.A" = ["1", "01"] }

[stages.x]
kind = "command"
inputs = { x = "s[A=01]" }
cmd = "cat {inputs.x}/a > {out}/a"
"#;
    let p = Project::new(pipeline);
    let r = p.llmflow(&["run", "x"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(fs::read_to_string(p.out_dir("x").join("a")).unwrap(), "01\n");
    let err = config_error(&pipeline.replace("s[A=01]", "s[A=1e0]"));
    assert!(err.contains("`s[A=1e0]` matches 2 variants (s[A=1], s[A=01]); name one, or add `*`"), "{err}");
}

#[test]
fn names_too_long_for_a_file_name_are_refused_at_load() {
    let long = "v".repeat(240);
    let err = config_error(&format!("[stages.s]\nkind = \"command\"\ncmd = \"echo {{out}}\"\nsweep = {{ \"env.A\" = [\"{long}\"] }}\n"));
    assert!(err.contains("pipeline.toml:4:"), "{err}");
    assert!(err.contains("is 245 bytes"), "{err}");
    assert!(err.contains("at most 200"), "{err}");
}

/// An artifact that is no stage's current one is reported apart: its
/// damage fails nothing and `gc` is what removes it.
#[test]
fn verify_reports_old_artifacts_apart() {
    let p = Project::new("[stages.a]\nkind = \"command\"\ncmd = \"echo one > {out}/f\"\n");
    assert_eq!(p.llmflow(&["run"]).code, 0);
    let old = p.out_dir("a");
    p.edit("echo one", "echo two");
    assert_eq!(p.llmflow(&["run"]).built(), ["a"]);
    let file = old.join("f");
    fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    fs::write(&file, "tampered\n").unwrap();
    let verify = p.llmflow(&["verify"]);
    assert_eq!(verify.code, 0, "{}", verify.all());
    assert!(verify.stdout.contains("(old: no stage uses it; `llmflow gc` removes it)"), "{}", verify.stdout);
    let json: serde_json::Value = serde_json::from_str(&p.llmflow(&["verify", "--json"]).stdout).unwrap();
    let listed = json["artifacts"].as_array().unwrap();
    assert_eq!(listed.iter().filter(|a| a["intact"] == false && a["current"] == false).count(), 1, "{json}");
    // Damage to the current artifact fails, and `run` has something to do.
    let current = p.out_dir("a").join("f");
    fs::set_permissions(&current, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    fs::write(&current, "tampered\n").unwrap();
    let verify = p.llmflow(&["verify"]);
    assert_eq!(verify.code, 1, "{}", verify.all());
    assert!(verify.stderr.contains("`llmflow run` rebuilds"), "{}", verify.stderr);
    assert_eq!(p.llmflow(&["gc"]).code, 0);
    assert_eq!(p.llmflow(&["run"]).built(), ["a"]);
    assert_eq!(p.llmflow(&["verify"]).code, 0);
}
