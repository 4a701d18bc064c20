//! `eval`: benchmark evaluation of model artifacts, scored the way
//! lm-evaluation-harness scores, and a report card comparing them.
//!
//! ```toml
//! [stages.eval]
//! kind = "eval"
//! inputs = { pretrained = "pretrain", sft = "sft" }    # each input is a model
//! batch_tokens = 8192
//!
//! [[stages.eval.tasks]]
//! name = "arc_easy"
//! type = "multiple_choice"
//! file = "data/eval/arc_easy.jsonl"
//! delimiter = "\nAnswer: "
//! limit = 200
//!
//! [[stages.eval.tasks]]
//! name = "blimp"
//! type = "minimal_pairs"
//! file = "data/eval/blimp"                            # a file, a directory or a glob
//! limit = 10                                          # pairs per file
//! ```
//!
//! Inputs: any number of model artifacts (`pretrain`, `sft`, …: a
//! `config.json`, `model.safetensors` and `tokenizer.json`), each under a
//! slot name that is its label in the report. Models appear in the order of
//! their labels.
//!
//! Params:
//! * `tasks`: at least one; each has a `name` (unique), a `type`, a `file`
//!   relative to the pipeline (part of the stage's key) and a `limit`: the
//!   first N items, 0 for all. New files of a known type need no code.
//! * `batch_tokens` (8192): padded positions per forward pass when scoring,
//!   shared among the cores on the CPU: hundreds of short sentences or
//!   dozens of long texts at once. The output head runs only at scored
//!   positions, so the activations of the blocks bound the memory.
//! * `seed` (1234): few-shot draws and code sampling.
//!
//! Task types (details in [`tasks`]):
//! * `perplexity`: a text file, cut into lm-eval's rolling windows (every
//!   token predicted once; the first window from `<|endoftext|>`, each later
//!   one from as many preceding tokens as the context holds). Reports
//!   `token_perplexity`, `word_perplexity`, `byte_perplexity` and
//!   `bits_per_byte`, words (`re.split(r"\s+")`) and UTF-8 bytes counted on the
//!   text itself. `limit` is in bytes (cut at a line break); `from_end = true`
//!   takes the last bytes instead of the first. No chance level.
//! * `multiple_choice`: JSONL `{"query", "choices", "gold"}`. Each choice is
//!   scored by the summed log-likelihood of `delimiter` (default `" "`) +
//!   choice after the query; `acc` takes the best, `acc_norm` (the centered
//!   metric) the best per character. Chance: 1 / choices.
//! * `schema` (lm-eval's partial scoring, WinoGrande and Winograd): JSONL
//!   `{"context_options", "continuation", "gold"}`. The continuation is
//!   scored after each context option and `delimiter` (default `" "`); `acc`
//!   takes the option under which it is most likely. Chance: 1 / options.
//! * `language_modeling` (DCLM's type; `lambada` is another name for it):
//!   JSONL `{"context", "continuation"}`. `acc`: greedy decoding of the
//!   continuation after context + `delimiter` (`" "`) reproduces it (every
//!   token is the argmax); `perplexity`: exp(−mean log-likelihood of the
//!   continuations), as lm-eval. Chance 0.
//! * `minimal_pairs`: JSONL `{"sentence_good", "sentence_bad"}` (BLiMP), one
//!   file per paradigm. `acc`: the share of pairs whose good sentence has the
//!   higher total log-probability, overall and per file. Chance 0.5.
//! * `code`: HumanEval JSONL(.gz). `samples` (1) completions per problem of
//!   `max_tokens` (128) tokens at `temperature` (0: greedy) and `top_p`
//!   (0.95), cut at the first line that starts at column 0 (HumanEval's stop
//!   sequences `\ndef`, `\nclass`, `\nif`, `\nprint`, …), each run with the
//!   problem's tests by `python` (`python3`) in bubblewrap's sandbox
//!   ([`code`]: `timeout_s` 10, `memory_mb` 1024; `sandbox = "none"` runs
//!   unconfined). A code task runs only with `confirm_run_unsafe_code =
//!   true`. Reports `pass@k` for each of `k` ([1]), the unbiased estimator
//!   of Chen et al. (2021). Chance 0.
//!
//! `shots` (0), for the last three types: solved examples before each item,
//! drawn from the same file by a shuffle seeded with (`seed`, item), each
//! followed by a blank line (lm-eval's few-shot delimiter).
//!
//! An item longer than the model's context is cut as lm-eval cuts it: the
//! last context + 1 tokens are kept, so the context loses its start (at
//! least one token of it stays) and the continuation is scored whole; a
//! continuation longer than the context loses its end.
//!
//! Every accuracy comes with its standard error (sample standard deviation
//! over √n). A task with a chance level gets a centered score
//! (metric − chance) / (1 − chance), nanochat's CORE normalization. A
//! model's CORE is the mean centered score over its `multiple_choice`,
//! `schema` and `language_modeling` tasks (DCLM's) of at least 100 scored
//! items; a smaller task is reported as a sample and left out.
//!
//! Each (model, task) pair is its own cached unit ([`units`]): adding a task
//! or a model to the stage scores only the new pairs, and a task that fails
//! (a missing file, an unknown format) fails alone: the others are scored,
//! cached and logged, and the stage fails at the end naming it. The log has
//! one line per pair, `scored` or `cached`.
//!
//! Output: `results.json` (every metric, the centered scores, examples/s per
//! task, each model's size and training steps and tokens), `report.md` (the
//! same as tables), `centered.png` (a bar per model and task),
//! `bits_per_byte.png` (perplexity tasks), `loss_LABEL.png` (each model's
//! loss curve, where its artifact has one) and `items/LABEL/TASK.jsonl` (per
//! item: log-likelihoods, predictions, completions and test outcomes),
//! `units/KEY.json` (each pair's cached unit). `llmflow report` prints the
//! report. Metrics: `LABEL.TASK.METRIC` (each task's centered metric) and
//! `LABEL.core`.
//!
//! Training tokens are the last `tokens` that the model's `metrics.jsonl`
//! logs (pretrain logs the tokens trained on so far in every step's row).
//!
//! Scoring runs on the pipeline's device in fp32, requests sorted by length
//! into batches of `batch_tokens`; padded rows score as they do alone
//! (tested). Requests with one context (a multiple-choice item's choices)
//! compute it once: its keys and values are copied to each continuation's
//! row. On the CPU with several cores, each core scores its share of the
//! requests on a single-threaded model replica
//! ([`crate::train::replicas`]): a small model's operations are too short to
//! spread over libtorch's threads. Both score what a request scores alone
//! (tested). Code generation runs on one thread: a step of one token is too
//! little work to share.

pub mod code;
pub mod report;
pub mod score;
pub mod tasks;
pub mod units;

use std::collections::BTreeSet;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::data::cache::Cache;
use crate::formats::model::ModelArtifact;
use crate::formats::tokenizer::END_OF_TEXT;
use crate::train::replicas::Replicas;
use crate::{device, Inputs, ParamError, Stage, StageCtx};
use report::{ModelInfo, Scored};
use tasks::{Env, Model, Task, TaskType};
use units::{KeyParts, Units};

pub struct Eval;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The benchmarks: `[[stages.NAME.tasks]]` tables with `name`, `type`, `file`, `limit` and the type's options.
    pub tasks: Vec<Task>,
    /// Padded positions per forward pass when scoring.
    #[schemars(range(min = 1, max = 1_048_576))]
    pub batch_tokens: usize,
    /// Seeds few-shot draws and code sampling.
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params { tasks: Vec::new(), batch_tokens: 8192, seed: 1234 }
    }
}

impl Stage for Eval {
    const KIND: &'static str = "eval";
    const VERSION: u32 = 5;
    const SUMMARY: &'static str = "score models on benchmarks (perplexity, multiple choice, LAMBADA, BLiMP, HumanEval); report card";
    const INPUTS: Inputs = Inputs::Any;
    const REPORT: Option<(&'static str, &'static str)> = Some(("report.md", "results.json"));
    const SHOW: &'static [&'static str] = &["report.md", "results.json"];
    type Params = Params;

    fn check(params: &Params, inputs: &[String]) -> Result<(), ParamError> {
        if inputs.is_empty() {
            return Err(ParamError::new(&[], "no model to evaluate: add `inputs = { LABEL = \"STAGE\" }` naming model stages"));
        }
        if params.tasks.is_empty() {
            return Err(ParamError::new(&["tasks"], "no tasks: add `[[stages.NAME.tasks]]` tables with a name, type and file"));
        }
        let mut names = BTreeSet::new();
        for (i, task) in params.tasks.iter().enumerate() {
            let at = |field: &str, message: String| Err(ParamError::new(&["tasks", &i.to_string(), field], message));
            let name_ok = !task.name.is_empty() && task.name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
            if !name_ok {
                return at("name", format!("task name `{}` must be letters, digits, `_`, `-` or `.`", task.name));
            }
            if !names.insert(task.name.as_str()) {
                return at("name", format!("two tasks are named `{}`", task.name));
            }
            if task.file.is_empty() {
                return at("file", format!("task `{}` needs a `file`", task.name));
            }
            if let TaskType::Code(c) = &task.ty {
                if !c.confirm_run_unsafe_code {
                    return at(
                        "confirm_run_unsafe_code",
                        format!(
                            "task `{}` runs the code the model writes: set `confirm_run_unsafe_code = true` in the task to allow it (it runs in a bubblewrap sandbox)",
                            task.name
                        ),
                    );
                }
                if c.sandbox != "bwrap" && c.sandbox != "none" {
                    return at("sandbox", format!("task `{}`: `sandbox` is \"bwrap\" or \"none\", not {:?}", task.name, c.sandbox));
                }
                if c.k.is_empty() || c.k.iter().any(|&k| k == 0 || k > c.samples) {
                    return at("k", format!("task `{}`: each k must be between 1 and `samples` ({})", task.name, c.samples));
                }
                if c.samples > 1 && c.temperature <= 0.0 {
                    return at(
                        "temperature",
                        format!(
                            "task `{}`: {} greedy samples are all the same; set a temperature (0.8 is usual for pass@10)",
                            task.name, c.samples
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    fn files(params: &Params) -> Vec<String> {
        params.tasks.iter().filter_map(|t| crate::data::local_dependency(&t.file)).collect()
    }

    fn resources(_params: &Params) -> crate::Resources {
        crate::Resources { threads: None, accelerator: true, ..Default::default() }
    }

    fn run(params: &Params, ctx: &mut StageCtx) -> Result<()> {
        let device = device::prepare(ctx)?;
        let scratch = ctx.work.join("code");
        std::fs::create_dir_all(&scratch)?;
        let project_dir = ctx.project_dir.clone();
        let env = Env { project_dir: &project_dir, seed: params.seed, threads: ctx.threads, scratch: &scratch };
        let parts = KeyParts {
            project_dir: &project_dir,
            seed: params.seed,
            batch_tokens: params.batch_tokens,
            device: format!("{device:?}"),
            version: Self::VERSION,
        };
        let units = Units { cache: Cache::open(&ctx.cache)?, units: ctx.out.join("units") };
        std::fs::create_dir_all(&units.units)?;
        let inputs: Vec<(String, std::path::PathBuf)> = ctx.inputs.clone().into_iter().collect();
        let total = (inputs.len() * params.tasks.len()) as u64;
        let (mut models, mut scores, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        for (label, dir) in &inputs {
            let loaded = ModelArtifact::open(dir, device).with_context(|| format!("input `{label}`"))?;
            let eot = loaded
                .tokenizer
                .token_to_id(END_OF_TEXT)
                .with_context(|| format!("input `{label}`: the tokenizer has no {END_OF_TEXT}"))?;
            let info = ModelInfo::read(label, dir, loaded.gpt.config().clone(), &ctx.out)?;
            let digest = units::model_digest(dir).with_context(|| format!("input `{label}`"))?;
            eprintln!("eval: {label}: {} parameters on {device:?}, {} threads", info.config.num_params(), ctx.threads);
            let replicas = Replicas::new(&loaded.vs, loaded.gpt.config(), ctx.threads)?;
            let model = Model {
                gpt: &loaded.gpt,
                tokenizer: &loaded.tokenizer,
                eot: i64::from(eot),
                batch_tokens: params.batch_tokens,
                replicas: replicas.as_ref(),
            };
            let items_dir = ctx.out.join("items").join(label);
            std::fs::create_dir_all(&items_dir)?;
            let mut row = Vec::new();
            for (t, task) in params.tasks.iter().enumerate() {
                // A task that fails fails alone: the others are scored, cached and logged.
                let unit = || -> Result<(Scored, &str)> {
                    let key = units::key(task, &digest, &parts)?;
                    if let Some(scored) = units.load(&key)? {
                        return Ok((scored, "cached"));
                    }
                    let started = Instant::now();
                    let outcomes = tasks::evaluate(task, &model, &env)?;
                    let scored = Scored { outcomes, seconds: started.elapsed().as_secs_f64() };
                    units.save(&key, &scored)?;
                    Ok((scored, "scored"))
                };
                match unit() {
                    Ok((scored, how)) => {
                        let o = &scored.outcomes;
                        eprintln!(
                            "eval: {label} | {} | {how} | {} {:.4} | {} examples in {:.1} s, {:.1} examples/s",
                            task.name,
                            o.primary,
                            o.metrics[&o.primary],
                            o.examples,
                            scored.seconds,
                            scored.examples_per_s()
                        );
                        let lines: String = o.items.iter().map(|item| format!("{item}\n")).collect();
                        std::fs::write(items_dir.join(format!("{}.jsonl", task.name)), lines)?;
                        row.push(scored);
                    }
                    Err(e) => {
                        eprintln!("eval: {label} | {} | failed: {e:#}", task.name);
                        failed.push(format!("task `{}` on `{label}`: {e:#}", task.name));
                    }
                }
                ctx.progress((models.len() * params.tasks.len() + t + 1) as u64, total, "tasks");
            }
            models.push(info);
            scores.push(row);
        }
        if !failed.is_empty() {
            bail!(
                "{} of {total} (model, task) pairs failed; the others are cached, and the next run scores only what failed:\n  {}",
                failed.len(),
                failed.join("\n  ")
            );
        }
        report::write(&ctx.out, &params.tasks, &models, &scores)?;
        for (name, value) in report::manifest_metrics(&params.tasks, &models, &scores) {
            ctx.metric(&name, value);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};

    use serde_json::{json, Value};

    use super::*;
    use crate::formats::hf;
    use crate::formats::tokenizer;
    use crate::model::ModelConfig;
    use crate::testing::{build, tiny, torch_rng};
    use crate::testing::{corpus, python_with, run_python, tokenizer_artifact, write_docs};

    fn data(rel: &str) -> String {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data").join(rel).to_string_lossy().into_owned()
    }

    /// Two small untrained models (GPT-2 and Llama, context 32) sharing a
    /// tokenizer, as model artifacts under `dir`; the first with a training
    /// log and loss curve.
    fn models(dir: &Path) -> Vec<(String, PathBuf)> {
        write_docs(&dir.join("docs"), "shakespeare", &corpus("tinyshakespeare.txt")[..20_000]);
        tokenizer_artifact(&dir.join("docs"), &dir.join("tok"), serde_json::json!({"vocab_size": 300}));
        let variants = [
            ("base", tiny("gpt2", json!({"vocab_size": 300, "context": 32}))),
            ("llama", tiny("llama", json!({"vocab_size": 300, "context": 32, "n_kv_head": 2}))),
        ];
        variants
            .into_iter()
            .enumerate()
            .map(|(i, (label, config)): (usize, (&str, ModelConfig))| {
                let out = dir.join(label);
                fs::create_dir_all(&out).unwrap();
                let (vs, _gpt) = build(&config, 10 + i as i64);
                vs.save(out.join("model.safetensors")).unwrap();
                fs::write(out.join("config.json"), serde_json::to_string(&config).unwrap()).unwrap();
                fs::copy(dir.join("tok").join(tokenizer::FILE), out.join(tokenizer::FILE)).unwrap();
                if i == 0 {
                    fs::write(
                        out.join("metrics.jsonl"),
                        "{\"step\": 1, \"loss\": 5.0, \"tokens\": 512}\n{\"step\": 1, \"val_loss\": 5.1}\n",
                    )
                    .unwrap();
                    let labels = crate::train::plot::Labels { title: "loss", x: "step", y: "loss (nats/token)" };
                    crate::train::plot::loss_curve(&out.join("loss.png"), labels, &[(1.0, 5.0)], ("validation loss", &[(1.0, 5.1)]))
                        .unwrap();
                }
                (label.to_string(), out)
            })
            .collect()
    }

    fn suite() -> Vec<Task> {
        serde_json::from_value(json!([
            {"name": "wikitext", "type": "perplexity", "file": data("eval/wikitext2_test.tokens"), "limit": 2000},
            {"name": "shakespeare", "type": "perplexity", "file": data("corpora/tinyshakespeare.txt"), "limit": 1500, "from_end": true},
            {"name": "arc_easy", "type": "multiple_choice", "file": data("eval/arc_easy.jsonl"), "limit": 5, "shots": 1, "delimiter": "\nAnswer: "},
            {"name": "hellaswag", "type": "multiple_choice", "file": data("eval/hellaswag_format_sample.jsonl")},
            {"name": "lambada", "type": "language_modeling", "file": data("eval/lambada_openai.jsonl"), "limit": 6, "shots": 1},
            {"name": "winogrande", "type": "schema", "file": data("eval/winogrande_format_sample.jsonl"), "limit": 6, "shots": 1},
            {"name": "blimp", "type": "minimal_pairs", "file": data("eval/blimp/anaphor_*.jsonl.gz"), "limit": 4},
            {"name": "humaneval", "type": "code", "file": data("eval/HumanEval.jsonl.gz"), "limit": 2, "max_tokens": 8, "confirm_run_unsafe_code": true},
        ]))
        .unwrap()
    }

    fn run_eval(dir: &Path, models: &[(String, PathBuf)], params: &Params) -> StageCtx {
        let (out, work) = (dir.join("eval/out"), dir.join("eval/work"));
        fs::create_dir_all(&out).unwrap();
        let mut ctx = StageCtx::new("eval", dir, &out, &work);
        ctx.inputs = models.iter().cloned().collect();
        ctx.threads = 2;
        Eval::run(params, &mut ctx).unwrap();
        ctx
    }

    /// Every task type on two models: the report card's files, and the same
    /// numbers from transformers on the Hugging Face exports.
    #[test]
    fn report_card_and_transformers_agree() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let models = models(dir);
        let params = Params { tasks: suite(), batch_tokens: 100, ..Params::default() };
        assert!(Eval::check(&params, &["base".into()]).is_ok());
        let ctx = run_eval(dir, &models, &params);
        let out = &ctx.out;

        let results: Value = serde_json::from_str(&fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
        let base = &results["results"]["base"];
        assert_eq!(results["models"][0]["training_tokens"], 512);
        assert_eq!(results["models"][0]["loss_curve"], "loss_base.png");
        assert_eq!(results["models"][1]["loss_curve"], Value::Null);
        assert_eq!(base["arc_easy"]["chance"], 0.25);
        assert_eq!(base["blimp"]["examples"], 8, "4 pairs from each of 2 files");
        assert_eq!(base["blimp"]["breakdown"].as_object().unwrap().len(), 2);
        assert_eq!(base["humaneval"]["metrics"]["pass@1"], 0.0, "an untrained model writes no working code");
        let centered = base["lambada"]["centered"].as_f64().unwrap();
        assert_eq!(centered, base["lambada"]["metrics"]["acc"].as_f64().unwrap());
        assert!(base["wikitext"]["centered"].is_null());
        assert_eq!(base["winogrande"]["chance"], 0.5);
        // CORE: the in-context types with 100 items or more; here none.
        assert_eq!((base["hellaswag"]["in_core"].as_bool(), base["blimp"]["in_core"].as_bool()), (Some(false), Some(false)));
        assert!(results["core"]["base"].is_null());
        // The scores as TensorBoard scalars, a tag per model, task and metric.
        let events = fs::read(out.join(crate::formats::events::FILE)).unwrap();
        for tag in ["base/arc_easy/acc_norm", "base/wikitext/bits_per_byte", "base/humaneval/pass@1"] {
            assert!(events.windows(tag.len()).any(|w| w == tag.as_bytes()), "no scalar {tag} in the event file");
        }
        assert!(base["arc_easy"]["examples_per_s"].as_f64().unwrap() > 0.0);
        // An untrained model is close to uniform over its 300 tokens.
        let token_ppl = base["wikitext"]["metrics"]["token_perplexity"].as_f64().unwrap();
        assert!((200.0..400.0).contains(&token_ppl), "{token_ppl}");
        for file in ["report.md", "centered.png", "bits_per_byte.png", "loss_base.png", "items/llama/humaneval.jsonl"] {
            assert!(out.join(file).is_file(), "{file}");
        }
        let report = fs::read_to_string(out.join("report.md")).unwrap();
        assert!(report.contains("| task | metric | base | llama |"), "{report}");
        assert!(report.contains("| arc_easy (multiple_choice, 5 examples) | acc_norm |"), "{report}");
        assert!(report.contains("[loss.png](loss_base.png)"), "{report}");
        assert!(ctx.metrics().contains_key("llama.blimp.acc") && !ctx.metrics().contains_key("base.core"));
        assert!(report.contains("| hellaswag (not in CORE: a sample of 4 items) | 0.2500 |"), "{report}");

        let Some(python) = python_with("transformers") else { return };
        let case = dir.join("case.json");
        fs::write(&case, json!({"tasks": params.tasks, "seed": params.seed, "tolerance": 1e-3}).to_string()).unwrap();
        let mut args = vec![out.clone(), case];
        for (label, model_dir) in &models {
            let export = dir.join(format!("hf-{label}"));
            hf::hugging_face(model_dir, &export).unwrap();
            args.push(PathBuf::from(format!("{label}={}", export.display())));
        }
        run_python(&python, "check_eval.py", &args.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    }

    #[test]
    fn params_are_checked() {
        let ok = Params { tasks: suite(), ..Params::default() };
        assert!(Eval::check(&ok, &[]).unwrap_err().message.contains("no model to evaluate"));
        let inputs = ["m".to_string()];
        assert_eq!(Eval::check(&Params::default(), &inputs).unwrap_err().path, ["tasks"]);
        let mut twice = ok.clone();
        twice.tasks.push(twice.tasks[0].clone());
        assert!(Eval::check(&twice, &inputs).unwrap_err().message.contains("two tasks are named `wikitext`"));
        let mut greedy = ok.clone();
        if let TaskType::Code(c) = &mut greedy.tasks[7].ty {
            c.samples = 5;
            c.k = vec![1, 5];
        }
        assert_eq!(Eval::check(&greedy, &inputs).unwrap_err().path, ["tasks", "7", "temperature"]);
        // A glob's directory is part of the key.
        let files = Eval::files(&ok);
        assert!(files.iter().any(|f| f.ends_with("eval/blimp")), "{files:?}");
    }
}
