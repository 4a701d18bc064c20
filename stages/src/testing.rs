//! Fixtures the tests share: shipped corpora, documents and model artifacts,
//! stage contexts, and the Python cross-checks. A stage another test needs
//! (a tokenizer) runs by its kind's name, as the runner runs it, so no test
//! outside a kind imports that kind.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde_json::json;
use tch::{nn, Device, Tensor};

use crate::data::records;
use crate::formats::docs;
use crate::formats::model::save_model;
use crate::model::{Gpt, ModelConfig};
use crate::{Stage, StageCtx};

/// The shipped corpora, by file name.
pub const CORPORA: [&str; 3] = ["tinyshakespeare.txt", "austen.txt", "moby_dick.txt"];

/// A shipped corpus, by file name.
pub fn corpus(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/corpora").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A documents artifact in `dir`: `text` split into paragraphs.
pub fn write_docs(dir: &Path, name: &str, text: &str) {
    let paragraphs: Vec<&str> = text.split("\n\n").filter(|p| !p.trim().is_empty()).collect();
    let ids: Vec<String> = (0..paragraphs.len()).map(|i| format!("{name}:{i}")).collect();
    let sources = vec![name; paragraphs.len()];
    let df = polars::df!("id" => ids, "text" => paragraphs, "source" => sources).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    docs::write(dir, &df).unwrap();
}

/// The blank-line separated paragraphs of a corpus with at least
/// `min_words` words, trimmed.
pub fn novel_paragraphs(name: &str, min_words: usize) -> Vec<String> {
    let text = corpus(name).replace("\r\n", "\n");
    text.split("\n\n").map(str::trim).filter(|p| p.split_whitespace().count() >= min_words).map(str::to_string).collect()
}

/// Runs a stage on documents `d0`, `d1`, … with the given texts; returns
/// its output directory and context (for metrics).
pub fn run_stage<S: Stage>(params: &S::Params, texts: &[&str]) -> (tempfile::TempDir, StageCtx) {
    let input = tempfile::tempdir().unwrap();
    let ids = (0..texts.len()).map(|i| format!("d{i}")).collect();
    let df = docs::frame(ids, texts.iter().map(|t| t.to_string()).collect(), vec!["test".to_string(); texts.len()]).unwrap();
    docs::write(input.path(), &df).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut ctx = StageCtx::new("test", input.path(), out.path(), input.path());
    ctx.inputs.insert("input".into(), input.path().to_path_buf());
    S::run(params, &mut ctx).unwrap();
    (out, ctx)
}

/// A stage context in `dir/name` (out, work) with `inputs`, 2 threads.
pub fn ctx<P: AsRef<Path>>(dir: &Path, name: &str, inputs: &[(&str, P)]) -> StageCtx {
    let (out, work) = (dir.join(name).join("out"), dir.join(name).join("work"));
    std::fs::create_dir_all(&out).unwrap();
    let mut ctx = StageCtx::new(name, dir, &out, &work);
    ctx.inputs = inputs.iter().map(|(slot, path)| (slot.to_string(), path.as_ref().to_path_buf())).collect();
    ctx.threads = 2;
    ctx
}

/// The rows of `out/metrics.jsonl` without their timings (`*seconds`),
/// which differ between two runs of the same training.
pub fn metric_rows(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
            row.as_object_mut().unwrap().retain(|k, _| !k.ends_with("seconds"));
            row
        })
        .collect()
}

/// The params of kind `S` from the JSON in the environment variable
/// `PARAMS` over the kind's defaults (as a stage table is read), or the
/// defaults: how the long, ignored quality runs take overrides.
pub fn params_from_env<S: Stage>() -> S::Params {
    match std::env::var("PARAMS") {
        Ok(json) => crate::params::<S>(serde_json::from_str(&json).expect("PARAMS is JSON")).unwrap_or_else(|e| panic!("PARAMS: {e:?}")),
        Err(_) => S::Params::default(),
    }
}

/// Runs the stage kind `kind` by name with `params` over its defaults, as
/// the runner does; returns its context.
pub fn run_kind(kind: &str, params: serde_json::Value, mut ctx: StageCtx) -> StageCtx {
    let request = llmflow_protocol::ResolveRequest {
        stages: vec![llmflow_protocol::StageRequest {
            name: ctx.stage.clone(),
            kind: kind.into(),
            params,
            inputs: ctx.inputs.keys().cloned().collect(),
        }],
    };
    let resolved = crate::kinds::resolve(&request).stages.remove(0).expect("a known kind").expect("valid params");
    crate::kinds::run(kind, resolved.params, &mut ctx).unwrap();
    ctx
}

/// A `train_tokenizer` artifact in `out`, trained on the documents in
/// `docs_dir` with `params` (e.g. `{"vocab_size": 300}`).
pub fn tokenizer_artifact(docs_dir: &Path, out: &Path, params: serde_json::Value) -> StageCtx {
    std::fs::create_dir_all(out).unwrap();
    let mut ctx = StageCtx::new("tok", docs_dir, out, out);
    ctx.inputs.insert("input".into(), docs_dir.to_path_buf());
    ctx.threads = 2;
    run_kind("train_tokenizer", params, ctx)
}

/// A tiny model artifact in `dir/base` (a 300-token tokenizer trained
/// on `text`, random weights of `config` over `tiny("gpt2")`); returns
/// its directory and config.
pub fn tiny_model(dir: &Path, text: &str, config: serde_json::Value) -> (PathBuf, ModelConfig) {
    write_docs(&dir.join("docs"), "corpus", text);
    let tok = dir.join("tok");
    tokenizer_artifact(&dir.join("docs"), &tok, serde_json::json!({"vocab_size": 300}));
    let mut extra = serde_json::json!({"vocab_size": 300});
    extra.as_object_mut().unwrap().extend(config.as_object().unwrap().clone());
    let config = tiny("gpt2", extra);
    let (vs, _) = build(&config, 1);
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    save_model(&base, &vs, &config, &tok).unwrap();
    (base, config)
}

/// A model artifact of `config` (vocab_size 300) with a tokenizer trained
/// on a little Shakespeare, in `dir/model`. Seeds libtorch: hold
/// `torch_rng()`.
pub fn model_artifact(dir: &Path, config: &ModelConfig) -> PathBuf {
    write_docs(&dir.join("docs"), "corpus", &corpus("tinyshakespeare.txt")[..20_000]);
    tokenizer_artifact(&dir.join("docs"), &dir.join("tok"), serde_json::json!({"vocab_size": 300}));
    let config = ModelConfig { vocab_size: 300, ..config.clone() };
    let (vs, _) = build(&config, 1);
    let out = dir.join("model");
    std::fs::create_dir_all(&out).unwrap();
    save_model(&out, &vs, &config, &dir.join("tok")).unwrap();
    crate::formats::tokenizer::load(&out).unwrap();
    out
}

/// The first `n` records of the shipped data file `name` (under
/// `data/instruct/`), written as JSON Lines into `dir`; returns the
/// file's name.
pub fn instruct_data(dir: &Path, name: &str, n: usize) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/instruct").join(name);
    let all: Vec<serde_json::Value> = records::read(&path).unwrap();
    let lines: Vec<String> = all[..n].iter().map(|r| r.to_string()).collect();
    let file = name.replace(".json", ".jsonl");
    std::fs::write(dir.join(&file), lines.join("\n")).unwrap();
    file
}

#[path = "../../tests/common/skip.rs"]
mod skip;
pub use skip::skip;

/// The interpreter named by `LLMFLOW_PYTHON` when it can import `module`.
/// `make test` sets it, and there a missing module fails the test; run by
/// hand without it, the check is skipped with a note (`python3` is tried).
pub fn python_with(module: &str) -> Option<String> {
    let given = std::env::var("LLMFLOW_PYTHON").ok();
    let python = given.clone().unwrap_or_else(|| "python3".into());
    let import = std::process::Command::new(&python).args(["-c", &format!("import {module}")]).output();
    if import.is_ok_and(|o| o.status.success()) {
        return Some(python);
    }
    assert!(given.is_none(), "LLMFLOW_PYTHON={python} cannot import {module}: `make test` installs it");
    skip(&format!("`{python}` cannot import {module}; set LLMFLOW_PYTHON to an interpreter that has it"));
    None
}

/// Runs `tests/python/SCRIPT` with `args`, failing with its output.
pub fn run_python(python: &str, script: &str, args: &[&Path]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python").join(script);
    let out = std::process::Command::new(python).arg(&path).args(args).output().unwrap();
    let output = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{output}");
    eprint!("{output}");
}

/// libtorch's generator is global and tests run in parallel: tests that
/// seed it hold this lock.
pub fn torch_rng() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A model of a few thousand parameters; `extra` overrides fields.
pub fn tiny(arch: &str, extra: serde_json::Value) -> ModelConfig {
    let mut fields = json!({"arch": arch, "vocab_size": 23, "n_layer": 2, "n_head": 4, "d_model": 16, "context": 12});
    fields.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    serde_json::from_value(fields).unwrap()
}

pub fn build(config: &ModelConfig, seed: i64) -> (nn::VarStore, Gpt) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Gpt::new(&vs.root(), config).unwrap();
    (vs, model)
}
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}
