//! The eval stage through the real binaries: each (model, task) pair is a
//! cached unit, so adding a task or a model scores only the new pairs, a
//! broken task fails alone, gc keeps exactly the units an artifact uses, and
//! a damaged unit is scored again.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{Project, TINY_DATA};

fn pipeline(models: &str, tasks: &[&str]) -> String {
    let mut text = format!(
        r#"{TINY_DATA}
[stages.pretrain]
kind = "pretrain"
inputs = {{ data = "tokens", tokenizer = "tok" }}
model = {{ n_layer = 1, n_head = 2, d_model = 16, context = 32, dropout = 0.0 }}
train = {{ steps = 4, batch_size = 2, lr = 3e-3, warmup = 1 }}
eval_every = 4
eval_batches = 1
samples = {{ count = 1, max_tokens = 4 }}

[stages.other]
kind = "pretrain"
inputs = {{ data = "tokens", tokenizer = "tok" }}
model = {{ n_layer = 1, n_head = 2, d_model = 16, context = 32, dropout = 0.0 }}
train = {{ steps = 4, batch_size = 2, lr = 3e-3, warmup = 1, seed = 7 }}
eval_every = 4
eval_batches = 1
samples = {{ count = 1, max_tokens = 4 }}

[stages.eval]
kind = "eval"
inputs = {{ {models} }}
"#
    );
    for task in tasks {
        let (file, kind) = match *task {
            "mc" => ("mc.jsonl", "multiple_choice"),
            "lm" => ("lm.jsonl", "language_modeling"),
            "schema" => ("schema.jsonl", "schema"),
            "broken" => ("broken.jsonl", "multiple_choice"),
            _ => unreachable!(),
        };
        text += &format!("\n[[stages.eval.tasks]]\nname = \"{task}\"\ntype = \"{kind}\"\nfile = \"{file}\"\n");
    }
    text
}

fn shipped(file: &str, lines: usize) -> String {
    let text = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/eval").join(file)).unwrap();
    text.lines().take(lines).map(|l| format!("{l}\n")).collect()
}

fn project() -> Project {
    let p = Project::new(&pipeline("base = \"pretrain\"", &["mc", "lm"]));
    p.write_corpus(30_000);
    p.write("mc.jsonl", &shipped("copa.jsonl", 6));
    p.write("lm.jsonl", &shipped("lambada_openai.jsonl", 5));
    p.write("schema.jsonl", &shipped("winogrande_format_sample.jsonl", 6));
    p.write("broken.jsonl", "{\"question\": \"Which?\", \"answers\": [\"a\", \"b\"]}\n");
    p
}

/// `(model, task, how)` of each unit line of the newest eval log.
fn units_logged(p: &Project) -> Vec<(String, String, String)> {
    let logs = p.artifacts().join(".logs/eval");
    let newest = fs::read_dir(&logs).unwrap().flatten().max_by_key(|e| e.metadata().unwrap().modified().unwrap()).unwrap();
    let mut units: Vec<(String, String, String)> = fs::read_to_string(newest.path())
        .unwrap()
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.strip_prefix("eval: ")?.split(" | ").collect();
            (fields.len() >= 3).then(|| (fields[0].into(), fields[1].into(), fields[2].split(':').next().unwrap().into()))
        })
        .collect();
    units.sort();
    units
}

fn unit(model: &str, task: &str, how: &str) -> (String, String, String) {
    (model.into(), task.into(), how.into())
}

/// The cached units, without their `.blake3` sidecars.
fn cache_files(p: &Project) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(p.artifacts().join(".cache/eval"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn results(p: &Project) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(p.out_dir("eval").join("results.json")).unwrap()).unwrap()
}

#[test]
fn each_model_and_task_is_a_cached_unit() {
    let p = project();
    let run = p.llmflow(&["run", "eval"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(units_logged(&p), [unit("base", "lm", "scored"), unit("base", "mc", "scored")]);
    let first = results(&p);

    // A new task: only it is scored; the others' numbers are the same.
    p.set_pipeline(&pipeline("base = \"pretrain\"", &["mc", "lm", "schema"]));
    let run = p.llmflow(&["run", "eval"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(units_logged(&p), [unit("base", "lm", "cached"), unit("base", "mc", "cached"), unit("base", "schema", "scored")]);
    let second = results(&p);
    for task in ["mc", "lm"] {
        assert_eq!(first["results"]["base"][task]["metrics"], second["results"]["base"][task]["metrics"], "{task}");
    }
    assert_eq!(second["results"]["base"]["schema"]["examples"], 6);
    assert_eq!(second["results"]["base"]["schema"]["in_core"], false, "6 items are a sample");

    // A new model: only its pairs are scored. The same model under a second
    // label is the same unit.
    p.set_pipeline(&pipeline("base = \"pretrain\", again = \"pretrain\", other = \"other\"", &["mc", "lm", "schema"]));
    let run = p.llmflow(&["run", "eval"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let logged = units_logged(&p);
    let how = |model: &str| logged.iter().filter(|u| u.0 == model).map(|u| u.2.as_str()).collect::<Vec<_>>();
    assert_eq!((how("base"), how("again"), how("other")), (vec!["cached"; 3], vec!["cached"; 3], vec!["scored"; 3]));

    // A broken task fails alone: the stage fails naming it and publishes
    // nothing; the others are scored and kept.
    p.set_pipeline(&pipeline("base = \"pretrain\", other = \"other\"", &["mc", "lm", "schema", "broken"]));
    let run = p.llmflow(&["run", "eval"]);
    assert_ne!(run.code, 0, "{}", run.all());
    assert!(run.all().contains("task `broken` on `base`"), "{}", run.all());
    assert!(run.all().contains("broken.jsonl"), "the error names the file: {}", run.all());
    assert_ne!(p.state("eval"), "fresh");
    let logged = units_logged(&p);
    assert_eq!(logged.iter().filter(|u| u.2 == "failed").count(), 2, "{logged:?}");
    assert_eq!(logged.iter().filter(|u| u.2 == "cached").count(), 6, "{logged:?}");

    // Fixed, only the fixed task is scored.
    p.write("broken.jsonl", &shipped("copa.jsonl", 4));
    let run = p.llmflow(&["run", "eval"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let logged = units_logged(&p);
    let scored: Vec<_> = logged.iter().filter(|u| u.2 == "scored").map(|u| u.1.as_str()).collect();
    assert_eq!(scored, ["broken", "broken"], "{logged:?}");

    // gc keeps the units a kept artifact links and removes the rest: `mc`'s
    // once it leaves the stage.
    let units = |p: &Project| fs::read_dir(p.out_dir("eval").join("units")).unwrap().count();
    assert_eq!((cache_files(&p).len(), units(&p)), (8, 8), "4 tasks on 2 models; `again` is `base`");
    p.set_pipeline(&pipeline("base = \"pretrain\", other = \"other\"", &["lm", "schema", "broken"]));
    let run = p.llmflow(&["run", "eval"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let run = p.llmflow(&["gc"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(cache_files(&p).len(), 6);
    assert_eq!(units(&p), 6);
    assert_eq!(p.llmflow(&["verify"]).code, 0);
}

/// A unit damaged in place in the cache (the artifact's `units/KEY.json` is
/// the same file) no longer matches its recorded BLAKE3: the rebuild scores
/// it again and publishes a fresh store's scores, not the damaged ones.
#[test]
fn a_damaged_unit_is_scored_again() {
    use std::os::unix::fs::PermissionsExt;
    let p = project();
    let run = p.llmflow(&["run", "eval"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let fresh = results(&p);
    let units = cache_files(&p);
    assert_eq!(units.len(), 2);
    for unit in &units {
        assert!(unit.with_extension("json.blake3").is_file(), "{} has no sidecar", unit.display());
        let mut value: serde_json::Value = serde_json::from_slice(&fs::read(unit).unwrap()).unwrap();
        for metric in value["outcomes"]["metrics"].as_object_mut().unwrap().values_mut() {
            *metric = serde_json::json!(0.123);
        }
        fs::set_permissions(unit, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(unit, value.to_string()).unwrap();
    }
    let run = p.llmflow(&["run", "eval", "--force", "eval"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(units_logged(&p), [unit("base", "lm", "scored"), unit("base", "mc", "scored")]);
    let rebuilt = results(&p);
    for task in ["mc", "lm"] {
        assert_eq!(rebuilt["results"]["base"][task]["metrics"], fresh["results"]["base"][task]["metrics"], "{task}");
    }
    // The units made again are cached and reused as they are.
    let run = p.llmflow(&["run", "eval", "--force", "eval"]);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(units_logged(&p), [unit("base", "lm", "cached"), unit("base", "mc", "cached")]);
}
