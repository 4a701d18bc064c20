//! The shared cache (`[pipeline] remote`) against a real S3-compatible server:
//! SeaweedFS on loopback, started by `scripts/s3-local.sh` for this test
//! binary and stopped when it exits. boto3, a second client, checks that the
//! remote holds plain S3 objects in the documented layout, and tampers with
//! them. Without a server the tests say why and pass, except under
//! `CI=true`, where they fail naming what is missing.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{config_error, default_pipeline, Project, Run};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The server's settings: `AWS_*` variables, `S3_BUCKET` and `S3_LOCAL_DIR`.
struct Server {
    env: BTreeMap<String, String>,
}

/// The server the tests share, started once for this test binary.
fn server() -> Option<&'static Server> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    match SERVER.get_or_init(try_server) {
        Ok(server) => Some(server),
        Err(why) => {
            common::skip(why);
            None
        }
    }
}

/// A server of its own, down when this test binary exits; `None` when it
/// cannot be set up here (the test is skipped, naming why).
fn start_server() -> Option<Server> {
    try_server().map_err(|why| common::skip(&why)).ok()
}

fn try_server() -> Result<Server, String> {
    let mut cmd = Command::new(Path::new(ROOT).join("scripts/s3-local.sh"));
    cmd.args(["up", "--owner", &std::process::id().to_string()]);
    if let Some(venv) = python().and_then(|p| Some(p.parent()?.parent()?.to_path_buf())) {
        cmd.env("VENV", venv);
    }
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(3) => return Err(format!("no S3 server: {}", stderr.trim())),
        _ => panic!("s3-local.sh up failed:\n{stderr}"),
    }
    let env = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok(Server { env })
}

/// The test environment's Python (with boto3), as `make test` sets it.
fn python() -> Option<PathBuf> {
    std::env::var_os("LLMFLOW_PYTHON").map(PathBuf::from)
}

impl Server {
    fn var(&self, name: &str) -> &str {
        &self.env[name]
    }

    /// A remote of its own for one test: `s3://BUCKET/NAME-PID`.
    fn remote(&self, name: &str) -> String {
        format!("s3://{}/{name}-{}", self.var("S3_BUCKET"), std::process::id())
    }

    /// `llmflow ARGS` in `p` with the server's credentials.
    fn llmflow(&self, p: &Project, args: &[&str]) -> Run {
        let mut cmd = p.cmd(args);
        cmd.envs(self.env.iter().filter(|(k, _)| k.starts_with("AWS_")));
        cmd.output().unwrap().into()
    }

    /// `tests/python/s3_layout.py ARGS` on `prefix`: boto3's view of the remote.
    fn boto3(&self, prefix: &str, args: &[&str]) -> Vec<u8> {
        let python = python().expect("LLMFLOW_PYTHON names the tests' Python (make test sets it)");
        let out = Command::new(python)
            .arg(Path::new(ROOT).join("tests/python/s3_layout.py"))
            .args(["--bucket", self.var("S3_BUCKET"), "--prefix", prefix])
            .args(args)
            .envs(self.env.iter().filter(|(k, _)| k.starts_with("AWS_")))
            .output()
            .unwrap();
        assert!(out.status.success(), "s3_layout.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// Every object under `prefix`: key → size.
    fn objects(&self, prefix: &str) -> BTreeMap<String, u64> {
        let listed: serde_json::Value = serde_json::from_slice(&self.boto3(prefix, &[])).unwrap();
        listed["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o["key"].as_str().unwrap().to_string(), o["size"].as_u64().unwrap()))
            .collect()
    }

    /// Kills the server (its data stays) and starts it again on the same port.
    fn restart(&self, down_for: Duration) {
        let script = Path::new(ROOT).join("scripts/s3-local.sh");
        let dir = self.var("S3_LOCAL_DIR");
        assert!(Command::new(&script).args(["stop-server", dir]).status().unwrap().success());
        std::thread::sleep(down_for);
        assert!(Command::new(&script).args(["start-server", dir]).status().unwrap().success());
    }
}

/// The prefix inside the bucket of `s3://BUCKET/PREFIX`.
fn prefix_of(remote: &str) -> &str {
    remote.splitn(4, '/').nth(3).unwrap()
}

/// Stage names in lines `VERB NAME …` of a run's output.
fn said(r: &Run, verb: &str) -> Vec<String> {
    let prefix = format!("{verb} ");
    r.stderr
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix(prefix.as_str()))
        .map(|rest| rest.split_whitespace().next().unwrap().trim_end_matches(':').to_string())
        .collect()
}

/// `stage`'s output digest in `p`, from its current artifact's manifest.
fn digest(p: &Project, stage: &str) -> String {
    p.manifest(stage)["output_digest"].as_str().unwrap().to_string()
}

/// stage → output digest, from the manifests of a store's current artifacts.
fn digests(p: &Project) -> BTreeMap<String, String> {
    p.status_json()["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let out = PathBuf::from(s["out"].as_str().unwrap_or_else(|| panic!("{} is not built: {s}", s["name"])));
            (s["name"].as_str().unwrap().to_string(), common::manifest_of(&out)["output_digest"].as_str().unwrap().to_string())
        })
        .collect()
}

fn with_remote(pipeline: &str, remote: &str, extra: &str) -> String {
    assert!(pipeline.contains("[pipeline]\n"));
    pipeline.replacen("[pipeline]\n", &format!("[pipeline]\nremote = \"{remote}\"\n{extra}"), 1)
}

/// A copy of `p`'s pipeline and the files it reads, with an empty store.
fn twin(p: &Project) -> Project {
    let q = Project::new(&p.read("pipeline.toml"));
    for entry in fs::read_dir(p.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if ["artifacts", "pipeline.toml", "runs"].contains(&name.as_str()) {
            continue;
        }
        if path.is_dir() {
            common::copy_dir(&path, &q.path().join(&name));
        } else {
            fs::copy(&path, q.path().join(&name)).unwrap();
        }
    }
    q
}

#[test]
fn two_stores_share_the_default_pipeline_through_one_remote() {
    let Some(s3) = server() else { return };
    let remote = s3.remote("default");
    let a = default_pipeline();
    a.set_pipeline(&with_remote(&a.read("pipeline.toml"), &remote, ""));
    let built = s3.llmflow(&a, &["run"]);
    assert_eq!(built.code, 0, "{}", built.all());
    let stages = built.built();
    assert!(stages.len() >= 10, "{}", built.all());
    let mut pushed = said(&built, "Pushed");
    pushed.sort();
    let mut want = stages.clone();
    want.sort();
    assert_eq!(pushed, want, "run pushes every stage it builds:\n{}", built.all());

    // The remote is plain S3 objects in the documented layout, each file once.
    let objects = s3.objects(prefix_of(&remote));
    let prefix = prefix_of(&remote);
    let entries: Vec<&String> = objects.keys().filter(|k| k.starts_with(&format!("{prefix}/entries/"))).collect();
    assert_eq!(entries.len(), stages.len(), "an entry per stage: {entries:?}");
    let hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    for key in objects.keys() {
        let rest = key.strip_prefix(&format!("{prefix}/")).unwrap();
        let parts: Vec<&str> = rest.split('/').collect();
        match parts[..] {
            ["blobs", two, name] => assert!(hex(name) && name.starts_with(two) && two.len() == 2, "{key}"),
            ["entries", stage, name] => assert!(stages.iter().any(|s| s == stage) && hex(name.strip_suffix(".json").unwrap()), "{key}"),
            _ => panic!("an object outside the layout: {key}"),
        }
    }
    for key in &entries {
        let entry: serde_json::Value = serde_json::from_slice(&s3.boto3(prefix, &["--get", key])).unwrap();
        for f in entry["manifest"]["files"].as_array().unwrap() {
            let b3 = f["blake3"].as_str().unwrap();
            let blob = format!("{prefix}/blobs/{}/{b3}", &b3[..2]);
            assert_eq!(objects.get(&blob), Some(&f["size"].as_u64().unwrap()), "{key} names {blob}");
        }
    }

    // An empty store B: every stage is on the remote, and `run` pulls them all.
    let b = twin(&a);
    let states = s3.llmflow(&b, &["status", "--json"]);
    let states: serde_json::Value = serde_json::from_str(&states.stdout).unwrap();
    for st in states["stages"].as_array().unwrap() {
        assert_eq!(st["state"], "remote", "{st}");
    }
    let text = s3.llmflow(&b, &["status"]);
    assert!(text.stdout.contains(&format!("on remote {remote}")), "{}", text.stdout);
    let pulled = s3.llmflow(&b, &["run"]);
    assert_eq!(pulled.code, 0, "{}", pulled.all());
    assert_eq!(pulled.built(), Vec::<String>::new(), "B builds nothing:\n{}", pulled.all());
    let mut got = said(&pulled, "Pulled");
    got.sort();
    assert_eq!(got, want, "every stage is pulled:\n{}", pulled.all());
    assert!(pulled.stderr.contains(&format!("0 built, {} pulled, 0 fresh", stages.len())), "{}", pulled.stderr);
    let verify = b.llmflow(&["verify"]);
    assert_eq!(verify.code, 0, "{}", verify.all());
    assert_eq!(digests(&b), digests(&a), "B's outputs are A's");
    assert_eq!(b.log("pretrain"), a.log("pretrain"), "the stage's log comes with it");
    let again = s3.llmflow(&b, &["run"]);
    assert!(again.stderr.contains("nothing to do"), "{}", again.all());
}

/// Three stages with files of several MB (one sent in parts) and a small one.
fn sized_pipeline(remote: &str, extra: &str) -> String {
    let mut text = with_remote("[pipeline]\nname = \"sized\"\n\n", remote, extra);
    for (name, mb, input) in [("a", 40, ""), ("b", 6, "input = \"a\"\n"), ("c", 1, "input = \"b\"\n")] {
        text.push_str(&format!(
            "[stages.{name}]\nkind = \"command\"\n{input}cmd = \"mkdir -p runs && echo run >> runs/{name} && head -c {}000000 /dev/urandom > {{out}}/data.bin && echo {name} > {{out}}/small.txt\"\n\n",
            mb
        ));
    }
    text
}

#[test]
fn a_tampered_blob_or_entry_is_refused_and_the_stage_built_here() {
    let Some(s3) = server() else { return };
    let remote = s3.remote("tamper");
    let prefix = prefix_of(&remote).to_string();
    let a = Project::new(&sized_pipeline(&remote, ""));
    assert_eq!(s3.llmflow(&a, &["run"]).code, 0);
    let blob_of = |stage: &str, file: &str| {
        let m = a.manifest(stage);
        let b3 = m["files"].as_array().unwrap().iter().find(|f| f["path"] == file).unwrap()["blake3"].as_str().unwrap().to_string();
        format!("{prefix}/blobs/{}/{b3}", &b3[..2])
    };

    // c's small file is replaced on the server by other bytes.
    let forged = a.path().join("forged");
    fs::write(&forged, "c but not c\n").unwrap();
    s3.boto3(&prefix, &["--put", &blob_of("c", "small.txt"), forged.to_str().unwrap()]);
    let b = twin(&a);
    let r = s3.llmflow(&b, &["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(said(&r, "Pulled"), ["a", "b"], "{}", r.all());
    assert_eq!(r.built(), ["c"], "c is built here instead:\n{}", r.all());
    assert!(r.stderr.contains("warning: cannot pull c from") && r.stderr.contains("fails its check"), "{}", r.stderr);
    assert_eq!(fs::read_to_string(b.out_dir("c").join("small.txt")).unwrap(), "c\n", "nothing forged is published");
    assert_eq!(b.llmflow(&["verify"]).code, 0);

    // b's entry is replaced by a's: an entry must describe the key it is stored under.
    let entry = |stage: &str, p: &Project| format!("{prefix}/entries/{stage}/{}.json", p.manifest(stage)["key"].as_str().unwrap());
    let a_entry = a.path().join("a-entry.json");
    fs::write(&a_entry, s3.boto3(&prefix, &["--get", &entry("a", &a)])).unwrap();
    s3.boto3(&prefix, &["--put", &entry("b", &a), a_entry.to_str().unwrap()]);
    let c = twin(&a);
    let r = s3.llmflow(&c, &["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(said(&r, "Pulled"), ["a"], "{}", r.all());
    assert!(r.stderr.contains("not b at"), "{}", r.stderr);
    assert_eq!(c.llmflow(&["verify"]).code, 0);

    // A blob gone from the server: refused the same way.
    s3.boto3(&prefix, &["--delete", &blob_of("a", "data.bin")]);
    let d = twin(&a);
    let r = s3.llmflow(&d, &["run", "a"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(r.built(), ["a"], "{}", r.all());
    assert!(r.stderr.contains("is missing"), "{}", r.stderr);
}

#[test]
fn a_remote_down_or_refusing_leaves_a_correct_local_run() {
    let Some(s3) = server() else { return };
    let remote = s3.remote("down");
    let p = Project::new(&sized_pipeline(&remote, ""));
    let mut cmd = p.cmd(&["run"]);
    cmd.envs(s3.env.iter().filter(|(k, _)| k.starts_with("AWS_")));
    // Nothing listens on port 9 (discard): the remote is down.
    cmd.env("AWS_ENDPOINT_URL", "http://127.0.0.1:9");
    let r: Run = cmd.output().unwrap().into();
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(r.built(), ["a", "b", "c"], "{}", r.all());
    assert_eq!(r.stderr.matches("warning:").count(), 1, "one warning, then the remote is left alone:\n{}", r.stderr);
    assert!(r.stderr.contains(&format!("the remote {remote} failed")) && r.stderr.contains("going on without it"), "{}", r.stderr);
    assert_eq!(p.llmflow(&["verify"]).code, 0);

    // Credentials the server refuses: the same, and the secret is never printed.
    let q = twin(&p);
    let secret = "wrong-secret-0123456789abcdefghijkl";
    let mut cmd = q.cmd(&["run"]);
    cmd.envs(s3.env.iter().filter(|(k, _)| k.starts_with("AWS_")));
    cmd.env("AWS_SECRET_ACCESS_KEY", secret);
    let r: Run = cmd.output().unwrap().into();
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(r.built(), ["a", "b", "c"], "{}", r.all());
    assert!(r.stderr.contains("warning:"), "{}", r.stderr);
    assert!(!r.all().contains(secret) && !r.all().contains(s3.var("AWS_SECRET_ACCESS_KEY")), "{}", r.all());
    assert!(s3.objects(prefix_of(&remote)).is_empty(), "nothing reached the remote");

    // --offline does not look: no warning though the remote is down.
    let mut cmd = q.cmd(&["status", "--offline"]);
    cmd.env("AWS_ENDPOINT_URL", "http://127.0.0.1:9");
    let r: Run = cmd.output().unwrap().into();
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
}

#[test]
fn push_pull_and_read_only_consumers() {
    let Some(s3) = server() else { return };
    let remote = s3.remote("pushpull");
    let prefix = prefix_of(&remote).to_string();
    // A read-only consumer builds and sends nothing.
    let a = Project::new(&sized_pipeline(&remote, "remote_push = false\n"));
    let r = s3.llmflow(&a, &["run"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(said(&r, "Pushed").is_empty(), "{}", r.all());
    assert!(s3.objects(&prefix).is_empty());

    // `push b` sends b and what it needs; a second push sends nothing.
    let r = s3.llmflow(&a, &["push", "b", "--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let pushed: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(pushed["blobs"].as_u64().unwrap() >= 4, "{pushed}");
    assert!(pushed["bytes"].as_u64().unwrap() > 46_000_000, "{pushed}");
    let r = s3.llmflow(&a, &["push"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(said(&r, "Present"), ["a", "b"], "{}", r.all());
    assert_eq!(said(&r, "Pushed"), ["c"], "{}", r.all());

    // B sees them on the remote, pulls c and what it needs, then nothing more.
    let b = twin(&a);
    let st = s3.llmflow(&b, &["status"]);
    assert!(st.stdout.contains("3 on remote"), "{}", st.stdout);
    let r = s3.llmflow(&b, &["pull", "c"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(said(&r, "Pulled"), ["a", "b", "c"], "{}", r.all());
    assert_eq!(digests(&b), digests(&a));
    assert_eq!(b.runs("a"), 0, "nothing ran in B");
    let r = s3.llmflow(&b, &["pull"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(said(&r, "Pulled").is_empty(), "{}", r.all());

    // A stage changed in B is on neither side: `pull` says so, exit 1.
    b.edit("echo c >", "echo C >");
    let r = s3.llmflow(&b, &["pull", "c"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("1 stage(s) neither built here nor on the remote: c"), "{}", r.stderr);

    // A mounted folder serves as a remote too.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let c = Project::new(&sized_pipeline(&url, ""));
    assert_eq!(c.llmflow(&["run", "a"]).code, 0);
    let d = twin(&c);
    let r = d.llmflow(&["run", "a"]);
    assert_eq!(said(&r, "Pulled"), ["a"], "{}", r.all());
    assert_eq!(digest(&d, "a"), digest(&c, "a"));

    // Push without a remote, or offline: a usage error.
    let e = Project::new("[pipeline]\nname = \"x\"\n\n[stages.a]\nkind = \"command\"\ncmd = \"true\"\n");
    let r = e.llmflow(&["push"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("sets no remote: add `remote = \"s3://BUCKET/PREFIX\"`"), "{}", r.stderr);
    let r = s3.llmflow(&a, &["pull", "--offline"]);
    assert_eq!(r.code, 2, "{}", r.all());
}

#[test]
fn killed_pushes_and_a_server_killed_mid_upload_never_leave_a_readable_entry_with_a_missing_blob() {
    // A server of its own: this test kills it.
    let Some(s3) = start_server() else { return };
    let remote = s3.remote("faults");
    let a = Project::new(&sized_pipeline(&remote, "remote_push = false\n"));
    assert_eq!(s3.llmflow(&a, &["run"]).code, 0);
    let seed = std::process::id() as u64;
    let mut rng = seed;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut completed = 0;
    for trial in 0..20 {
        // Every so often the push is made to start afresh.
        if trial % 5 == 0 {
            for key in s3.objects(prefix_of(&remote)).keys() {
                s3.boto3(prefix_of(&remote), &["--delete", key]);
            }
        }
        let mut cmd = a.cmd(&["push"]);
        cmd.envs(s3.env.iter().filter(|(k, _)| k.starts_with("AWS_"))).stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let delay = Duration::from_millis(next(1500));
        if trial % 4 == 3 {
            // The server dies mid-upload, and comes back.
            std::thread::sleep(delay);
            s3.restart(Duration::from_millis(200));
            let _ = child.wait();
        } else {
            std::thread::sleep(delay);
            let _ = child.kill();
            if child.wait().unwrap().success() {
                completed += 1;
            }
        }
        // Whatever entries the remote has, a fresh store pulls whole.
        let b = twin(&a);
        let r = s3.llmflow(&b, &["pull", "--json"]);
        assert!(!r.stderr.contains("cannot pull"), "trial {trial} (seed {seed}): {}", r.all());
        let pulled: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|_| panic!("trial {trial}: {}", r.all()));
        for st in pulled["stages"].as_array().unwrap().iter().filter(|s| s["pulled"] == true) {
            let name = st["name"].as_str().unwrap();
            assert_eq!(digest(&b, name), digest(&a, name), "trial {trial}: {name}");
        }
        assert_eq!(b.llmflow(&["verify"]).code, 0, "trial {trial}");
    }
    assert!(completed < 20, "some pushes must be killed before they finish");
    // The next push completes what the killed ones began.
    let r = s3.llmflow(&a, &["push"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let b = twin(&a);
    let r = s3.llmflow(&b, &["pull"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(digests(&b), digests(&a));
}

#[test]
fn remote_settings_are_checked() {
    let err = config_error("[pipeline]\nremote = \"gs://bucket/x\"\n");
    assert!(err.contains("pipeline.toml:2:1") && err.contains("`gs://bucket/x` is neither s3://BUCKET/PREFIX nor file:///PATH"), "{err}");
    let err = config_error("[pipeline]\nremote = \"s3://\"\n");
    assert!(err.contains("names no bucket"), "{err}");
    let err = config_error("[pipeline]\nremote_push = false\n");
    assert!(err.contains("`pipeline.remote_push` is set but `pipeline.remote` is not"), "{err}");
    let err = config_error("[pipeline]\nremote = \"s3://b/p\"\nremote_push = \"no\"\n");
    assert!(err.contains("`pipeline.remote_push` must be true or false"), "{err}");
}
