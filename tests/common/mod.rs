//! Helpers for driving the real `llmflow` binary on tiny pipelines.
#![allow(dead_code)] // each test file uses a different subset

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod skip;
#[allow(unused_imports)] // as dead_code above
pub use skip::skip;

pub struct Project {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Stage names in `Built NAME in ...` lines, in order.
    pub fn built(&self) -> Vec<String> {
        self.stderr
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("Built "))
            .map(|rest| rest.split_whitespace().next().unwrap().to_string())
            .collect()
    }

    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Project {
    pub fn new(pipeline: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("pipeline.toml"), pipeline).unwrap();
        Project { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path().join(rel)).unwrap_or_default()
    }

    pub fn set_pipeline(&self, text: &str) {
        self.write("pipeline.toml", text);
    }

    /// Replaces `from` with `to` in pipeline.toml (which must contain it).
    pub fn edit(&self, from: &str, to: &str) {
        let text = self.read("pipeline.toml");
        assert!(text.contains(from), "pipeline.toml lacks {from:?}");
        self.set_pipeline(&text.replacen(from, to, 1));
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_llmflow"));
        c.args(args).current_dir(self.path()).env("NO_COLOR", "1");
        c
    }

    pub fn llmflow(&self, args: &[&str]) -> Run {
        self.cmd(args).output().unwrap().into()
    }

    /// How many times a stage's command ran (each appends a line to runs/NAME).
    pub fn runs(&self, stage: &str) -> usize {
        self.read(&format!("runs/{stage}")).lines().count()
    }

    pub fn artifacts(&self) -> PathBuf {
        self.path().join("artifacts")
    }

    /// The `out/` of a stage's current artifact, from `status --json`.
    pub fn out_dir(&self, stage: &str) -> PathBuf {
        let s = self.status_json();
        let st = s["stages"].as_array().unwrap().iter().find(|x| x["name"] == stage).unwrap().clone();
        PathBuf::from(st["out"].as_str().unwrap_or_else(|| panic!("{stage} has no artifact: {st}")))
    }

    /// The log of a stage's last run, from `show --json`.
    pub fn log(&self, stage: &str) -> String {
        let shown = self.llmflow(&["show", stage, "--json"]).stdout;
        fs::read_to_string(shown.split('"').find(|s| s.ends_with(".log")).unwrap_or_else(|| panic!("{stage} has no log: {shown}"))).unwrap()
    }

    /// The manifest of a stage's current artifact.
    pub fn manifest(&self, stage: &str) -> serde_json::Value {
        manifest_of(&self.out_dir(stage))
    }

    pub fn status_json(&self) -> serde_json::Value {
        let r = self.llmflow(&["status", "--json"]);
        assert_eq!(r.code, 0, "{}", r.all());
        serde_json::from_str(&r.stdout).unwrap()
    }

    /// stage name → state, from `status --json`.
    pub fn states(&self) -> Vec<(String, String)> {
        self.status_json()["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["name"].as_str().unwrap().to_string(), s["state"].as_str().unwrap().to_string()))
            .collect()
    }

    pub fn state(&self, stage: &str) -> String {
        self.states().into_iter().find(|(n, _)| n == stage).unwrap().1
    }
}

/// The stderr of `run` on `pipeline`, which must be a config error (exit 2)
/// that builds nothing and that `status` rejects too.
pub fn config_error(pipeline: &str) -> String {
    let p = Project::new(pipeline);
    let r = p.llmflow(&["run"]);
    assert_eq!(r.code, 2, "expected a config error, got:\n{}", r.all());
    let built: Vec<_> = fs::read_dir(p.artifacts())
        .map(|d| d.flatten().map(|e| e.file_name()).filter(|n| !n.to_string_lossy().starts_with('.')).collect())
        .unwrap_or_default();
    assert!(built.is_empty(), "nothing may run on a config error: {built:?}");
    let status = p.llmflow(&["status"]);
    assert_eq!(status.code, 2, "status must reject the same file");
    r.stderr
}

/// Waits until `done`, failing after a minute with `what`.
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A command stage that counts its runs and writes `text` to out/data.txt.
pub fn counting_stage(name: &str, inputs: &str, text: &str) -> String {
    let read_inputs = if inputs.is_empty() { String::new() } else { format!("inputs = {{ {inputs} }}\n") };
    format!(
        "[stages.{name}]\nkind = \"command\"\n{read_inputs}cmd = \"mkdir -p runs && echo run >> runs/{name} && echo '{text}' > {{out}}/data.txt\"\n\n"
    )
}

/// a → b → c, plus an independent d. Each stage counts its runs in runs/NAME
/// and its output includes its input's, so a change propagates.
pub const CHAIN: &str = r#"
[pipeline]
name = "chain"

[stages.a]
kind = "command"
cmd = "mkdir -p runs && echo run >> runs/a && echo alpha > {out}/data.txt"

[stages.b]
kind = "command"
input = "a"
cmd = "mkdir -p runs && echo run >> runs/b && cat {inputs.input}/data.txt > {out}/data.txt && echo beta >> {out}/data.txt"

[stages.c]
kind = "command"
inputs = { up = "b" }
cmd = "mkdir -p runs && echo run >> runs/c && cat {inputs.up}/data.txt > {out}/data.txt && echo gamma >> {out}/data.txt"

[stages.d]
kind = "command"
cmd = "mkdir -p runs && echo run >> runs/d && echo delta > {out}/data.txt"
"#;

/// The data stages of a tiny training pipeline: `corpus` (from corpus.txt,
/// which [`Project::write_corpus`] writes), `tok` (512 tokens) and `tokens`.
pub const TINY_DATA: &str = r#"
[stages.corpus]
kind = "download"
sources = [{ url = "corpus.txt", split = "paragraph" }]

[stages.tok]
kind = "train_tokenizer"
input = "corpus"
vocab_size = 512

[stages.tokens]
kind = "shard"
inputs = { docs = "corpus", tokenizer = "tok" }
"#;

impl Project {
    /// corpus.txt: the first `bytes` of the shipped Shakespeare.
    pub fn write_corpus(&self, bytes: usize) {
        let text = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/corpora/tinyshakespeare.txt")).unwrap();
        self.write("corpus.txt", &text[..bytes]);
    }
}

/// The manifest of the artifact whose `out/` is `out`.
pub fn manifest_of(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(out.parent().unwrap().join("manifest.json")).unwrap()).unwrap()
}

/// Every stage's output files, from its manifest: name → (path → BLAKE3), and where they are.
pub fn outputs(p: &Project) -> BTreeMap<String, (BTreeMap<String, String>, PathBuf)> {
    let status = p.status_json();
    status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let out = PathBuf::from(s["out"].as_str().unwrap_or_else(|| panic!("{} is not built: {s}", s["name"])));
            let manifest = manifest_of(&out);
            let files = manifest["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| (f["path"].as_str().unwrap().into(), f["blake3"].as_str().unwrap().into()));
            (s["name"].as_str().unwrap().to_string(), (files.collect(), out))
        })
        .collect()
}

/// Wall-clock measurements (tokens or examples per second, seconds): they
/// differ between any two runs, killed or not.
const TIMINGS: [&str; 3] = ["tokens_per_s", "examples_per_s", "seconds"];

fn strip_timings(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|k, _| !TIMINGS.contains(&k.as_str()));
            map.values_mut().for_each(strip_timings);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_timings),
        _ => {}
    }
}

/// A TensorBoard event file's events without their timings: per event its
/// step and its scalars but the [`TIMINGS`] (the wall time left out), one
/// line each. Reads the protobuf fields the writer writes.
fn events_without_times(bytes: &[u8]) -> String {
    fn varint(b: &[u8], at: &mut usize) -> u64 {
        let mut v = 0;
        for shift in (0..64).step_by(7) {
            let byte = b[*at];
            *at += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                break;
            }
        }
        v
    }
    /// (field number, bytes) of each field but doubles; varints as 8 bytes.
    fn fields(b: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let (mut at, mut out) = (0, Vec::new());
        while at < b.len() {
            let key = varint(b, &mut at);
            match key & 7 {
                0 => {
                    let v = varint(b, &mut at);
                    out.push((key >> 3, v.to_le_bytes().to_vec()));
                }
                // A double: the only one is the wall time.
                1 => at += 8,
                5 => {
                    out.push((key >> 3, b[at..at + 4].to_vec()));
                    at += 4;
                }
                2 => {
                    let len = varint(b, &mut at) as usize;
                    out.push((key >> 3, b[at..at + len].to_vec()));
                    at += len;
                }
                t => panic!("wire type {t} in an event"),
            }
        }
        out
    }
    let mut events = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 12 {
        let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        let mut line = String::new();
        for (field, value) in fields(&rest[12..12 + len]) {
            match field {
                2 => line += &format!("step {} ", u64::from_le_bytes(value.try_into().unwrap())),
                5 => {
                    for (_, v) in fields(&value) {
                        let v = fields(&v);
                        let tag = String::from_utf8(v[0].1.clone()).unwrap();
                        if !TIMINGS.contains(&tag.as_str()) {
                            line += &format!("{tag}={:?} ", v.get(1).map(|x| f32::from_le_bytes(x.1.clone().try_into().unwrap())));
                        }
                    }
                }
                _ => line += &format!("{field}:{value:?} "),
            }
        }
        events.push(line);
        rest = &rest[12 + len + 4..];
    }
    events.join("\n")
}

/// A file's contents without its timings: JSON and JSON Lines without the
/// [`TIMINGS`] keys (an event file without its wall times), text without the
/// report card's throughput rows.
fn without_timings(path: &Path) -> String {
    if path.file_name().is_some_and(|n| n.to_string_lossy().contains("tfevents")) {
        return events_without_times(&fs::read(path).unwrap());
    }
    let text = fs::read_to_string(path).unwrap();
    let json = |text: &str| {
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
        strip_timings(&mut v);
        v.to_string()
    };
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => json(&text),
        Some("jsonl") => text.lines().map(json).collect::<Vec<_>>().join("\n"),
        _ => text.lines().filter(|line| !line.contains("/s (")).collect::<Vec<_>>().join("\n"),
    }
}

/// Asserts that two stores hold the same outputs, byte for byte, apart from timings.
pub fn assert_same_outputs(got: &Project, expected: &Project, context: &str) {
    let (got, expected) = (outputs(got), outputs(expected));
    assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "{context}");
    for (stage, (files, out)) in &got {
        let (want, want_out) = &expected[stage];
        assert_eq!(files.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{context}: {stage}'s files");
        for (file, digest) in files.iter().filter(|(f, d)| want[*f] != **d) {
            let same = without_timings(&out.join(file)) == without_timings(&want_out.join(file));
            assert!(same, "{context}: {stage}/{file} differs ({digest})");
        }
    }
}

/// A copy of the repository's `pipeline.toml` with its data and scripts,
/// its training stages scaled down to seconds (the data stages run as
/// shipped). The public URL is swapped for a local address that refuses
/// connections, so the test exercises the fall-back to the shipped mirror
/// without touching the network.
pub fn default_pipeline() -> Project {
    default_pipeline_with(&[
        ("n_layer = 4, n_head = 4, d_model = 128, context = 128", "n_layer = 1, n_head = 2, d_model = 32, context = 32"),
        ("steps = 500, batch_size = 16", "steps = 12, batch_size = 4"),
        ("eval_every = 100", "eval_every = 6"),
        ("checkpoint_every = 100", "checkpoint_every = 6"),
        ("max_tokens = 120", "max_tokens = 8"),
        ("steps = 300, batch_size = 16", "steps = 8, batch_size = 4"),
        ("max_tokens = 64, temperature = 0.0", "max_tokens = 8, temperature = 0.0"),
        ("steps = 150, batch_size = 16", "steps = 4, batch_size = 4"),
        ("steps = 30, batch_size = 16", "steps = 2, batch_size = 2"),
        ("max_new_tokens = 32", "max_new_tokens = 6"),
        ("steps = 100, batch_size = 8", "steps = 4, batch_size = 4"),
        ("max_tokens = 128", "max_tokens = 32"),
        ("steps = 400, batch_size = 32", "steps = 8, batch_size = 4"),
        ("steps = 200, batch_size = 8, grad_accum = 2", "steps = 2, batch_size = 2, grad_accum = 1"),
    ])
}

/// The repository's pipeline with every `from` replaced by its `to`, its
/// data and scripts beside it, and the corpus's URL refusing connections.
pub fn default_pipeline_with(replacements: &[(&str, &str)]) -> Project {
    let text = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipeline.toml")).unwrap();
    let url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt";
    assert!(text.contains(url), "the default pipeline names the corpus's public URL");
    let mut text = text.replace(url, "http://127.0.0.1:9/input.txt");
    for (from, to) in replacements {
        assert!(text.contains(from), "pipeline.toml lacks {from:?}");
        text = text.replace(from, to);
    }
    let p = Project::new(&text);
    for rel in ["data/corpora/tinyshakespeare.txt", "scripts/corpus_stats.sh"] {
        p.write(rel, &fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap());
    }
    for dir in ["data/eval", "data/instruct", "data/rl"] {
        copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir), &p.path().join(dir));
    }
    p
}

pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            fs::copy(&path, &target).unwrap();
        }
    }
}
