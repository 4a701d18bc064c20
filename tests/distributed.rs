//! Training across processes (`processes = N`, c10d with Gloo), through the
//! real binaries: two ranks train what one process trains, with and without
//! ZeRO-1; a stopped or killed multi-rank run resumes to bitwise the same
//! weights; a dead rank fails the stage at once, with its output, and
//! publishes nothing.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use common::{Project, TINY_DATA};

/// A tiny pretrain, without dropout, with `extra` lines in its table. Llama
/// has no biases: GPT-2's key bias gets only rounding noise as its gradient
/// (attention is blind to it), which AdamW's normalization makes as large as
/// any step, so it cannot agree between two orders of summation.
fn pipeline(extra: &str) -> Project {
    pipeline_training("", extra)
}

/// [`pipeline`] with `train_extra` in its `train` table too.
fn pipeline_training(train_extra: &str, extra: &str) -> Project {
    let p = Project::new(&format!(
        r#"{TINY_DATA}
[stages.pretrain]
kind = "pretrain"
inputs = {{ data = "tokens", tokenizer = "tok" }}
model = {{ arch = "llama", n_layer = 2, n_head = 2, d_model = 32, context = 32, dropout = 0.0 }}
train = {{ steps = 12, batch_size = 4, grad_accum = 2, lr = 3e-3, warmup = 3{train_extra} }}
eval_every = 6
eval_batches = 2
checkpoint_every = 4
samples = {{ count = 1, max_tokens = 8 }}
{extra}
"#
    ));
    p.write_corpus(120_000);
    p
}

fn weights_file(p: &Project) -> Vec<u8> {
    weights_of(p, "pretrain")
}

fn weights_of(p: &Project, stage: &str) -> Vec<u8> {
    fs::read(p.out_dir(stage).join("model.safetensors")).unwrap()
}

/// The f32 tensors of a safetensors file, by name.
fn tensors(bytes: &[u8]) -> BTreeMap<String, Vec<f32>> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, info)| {
            assert_eq!(info["dtype"], "F32", "{name}");
            let [start, end] = [0, 1].map(|i| info["data_offsets"][i].as_u64().unwrap() as usize);
            let floats = data[start..end].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name.clone(), floats)
        })
        .collect()
}

/// The largest difference between the two stages' models' tensors, each
/// relative to the tensor's largest magnitude.
fn max_relative_difference(a: &Project, b: &Project, stage: &str) -> f64 {
    let (a, b) = (tensors(&weights_of(a, stage)), tensors(&weights_of(b, stage)));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(name, x)| {
            let y = &b[name];
            let scale = y.iter().fold(0f64, |m, v| m.max(f64::from(v.abs()))).max(1e-12);
            x.iter().zip(y).fold(0f64, |m, (x, y)| m.max(f64::from((x - y).abs()))) / scale
        })
        .fold(0.0, f64::max)
}

/// The stage's held-out metrics (`val_*`, `test_*`, `*_before`, `*_after`) agree
/// between the two builds to rounding: the ranks evaluated their shares of
/// the same rows.
fn held_out_metrics_agree(a: &Project, b: &Project, stage: &str) {
    let (a, b) = (a.manifest(stage)["metrics"].clone(), b.manifest(stage)["metrics"].clone());
    let held_out: Vec<&String> = a
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| ["val_", "test_"].iter().any(|p| k.starts_with(p)) || k.ends_with("_before") || k.ends_with("_after"))
        .collect();
    assert!(!held_out.is_empty(), "{stage}: no held-out metric in {a}");
    for key in held_out {
        let (x, y) = (&a[key], &b[key]);
        match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{stage}: {key}: {x} vs {y}"),
            _ => assert_eq!(x, y, "{stage}: {key}"),
        }
    }
}

/// [`pipeline`] with `extra`, built.
fn built(extra: &str) -> Project {
    let p = pipeline(extra);
    let run = p.llmflow(&["run"]);
    assert_eq!(run.code, 0, "{extra}: {}", run.all());
    p
}

/// Runs the interrupted `p` again: it resumes from the checkpoint of step 4
/// and ends with the weights of `whole`, run without interruption, bitwise.
fn resumes_to(p: &Project, whole: &Project) {
    let again = p.llmflow(&["run"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(p.log("pretrain").contains("resuming from the checkpoint of step 4"));
    assert!(weights_file(whole) == weights_file(p), "resumed weights differ from the uninterrupted run's");
}

/// Runs `p` with rank and step `kill` in `LLMFLOW_KILL_RANK`: the stage
/// fails within a minute, publishes nothing and leaves no rank, running or
/// stopped. Returns its log.
fn failed_run(p: &Project, kill: &str) -> String {
    let started = Instant::now();
    let failed = p.cmd(&["run"]).env("LLMFLOW_KILL_RANK", kill).output().unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(60), "the stage took {took:?} to fail");
    assert_eq!(p.state("pretrain"), "failed");
    let status = p.status_json();
    assert!(status["stages"][3]["out"].is_null(), "nothing is published: {status}");
    let env = format!("LLMFLOW_KILL_RANK={kill}");
    let left = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|e| fs::read(e.path().join("environ")).is_ok_and(|vars| vars.split(|&b| b == 0).any(|kv| kv == env.as_bytes())));
    assert!(!left, "a rank is still there");
    let path = stderr.lines().find_map(|l| l.trim().strip_prefix("full log: ")).unwrap_or_else(|| panic!("{stderr}"));
    fs::read_to_string(path).unwrap()
}

#[test]
fn two_ranks_train_what_one_process_trains_with_and_without_zero() {
    let one = built("");
    for extra in ["processes = 2", "processes = 2\nzero = 1"] {
        let two = built(extra);
        let log = two.log("pretrain");
        assert!(log.contains("launching 2 ranks"), "{log}");
        // Two micro-batches an update: each rank adds up its own before the
        // ranks' sums are added, an order one process does not take.
        let diff = max_relative_difference(&two, &one, "pretrain");
        assert!(diff <= 1e-5, "{extra}: the weights differ from one process's by {diff:e} (relative)");
        // The same data, model and batches: the same key as one process's.
        assert_eq!(two.status_json()["stages"][3]["key"], one.status_json()["stages"][3]["key"]);
        let metrics = &two.manifest("pretrain")["metrics"];
        assert_eq!(metrics["processes"], 2);
        let moments = metrics["optimizer_mb_per_rank"].as_f64().unwrap();
        let whole = one.manifest("pretrain")["metrics"]["optimizer_mb_per_rank"].as_f64().unwrap();
        if extra.contains("zero") {
            assert!((moments - whole / 2.0).abs() < 0.01 * whole, "ZeRO-1 holds half the moments a rank: {moments} of {whole} MB");
        } else {
            assert_eq!(moments, whole, "DDP holds all the moments on every rank");
        }
    }
}

/// Muon across ranks: DDP orthogonalizes the all-reduced gradients on every
/// rank; ZeRO-1 gathers the reduced shares first. Both train what one
/// process trains, and a stopped run resumes bitwise.
#[test]
fn two_ranks_train_with_muon_what_one_process_trains() {
    let muon = r#", optimizer = "muon""#;
    let one = pipeline_training(muon, "");
    assert_eq!(one.llmflow(&["run"]).code, 0);
    for extra in ["processes = 2", "processes = 2\nzero = 1"] {
        let two = pipeline_training(muon, extra);
        let run = two.llmflow(&["run"]);
        assert_eq!(run.code, 0, "{extra}: {}", run.all());
        let diff = max_relative_difference(&two, &one, "pretrain");
        assert!(diff <= 1e-5, "{extra}: the weights differ from one process's by {diff:e} (relative)");
    }
    let stopped = pipeline_training(muon, "processes = 2\nzero = 1");
    let run = stopped.cmd(&["run"]).env("LLMFLOW_STOP_AFTER_STEP", "6").output().unwrap();
    assert_eq!(run.status.code(), Some(1), "{}", String::from_utf8_lossy(&run.stderr));
    let whole = pipeline_training(muon, "processes = 2\nzero = 1");
    assert_eq!(whole.llmflow(&["run"]).code, 0);
    resumes_to(&stopped, &whole);
}

/// How far a fine-tuned model on 2 ranks may be from one process's. One
/// process runs the fine-tuning stages' passes on 2 intra-op threads (only
/// `pretrain` splits batches across replicas), the ranks on 1 each: the
/// matrix products add up in other orders too, and AdamW's normalization
/// makes small gradients' rounding as large as their steps (about 1e-5
/// here). A share of the loss taken wrongly is off by 1e-2 and more.
const FINE_TUNING_TOLERANCE: f64 = 1e-4;

/// Fine-tuning on 2 ranks: instruction records of different lengths, so
/// each rank's share of the loss is its share of the counted tokens.
#[test]
fn sft_on_two_ranks_tunes_what_one_process_tunes() {
    let tuned = |extra: &str| {
        let p = pipeline("");
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/instruct/instruction-data.json");
        let sft = format!(
            "\n[stages.sft]\nkind = \"sft\"\ninputs = {{ model = \"pretrain\" }}\ndata = \"{}\"\ntemplate = \"Q: {{instruction}} {{input}}\\nA: \"\n\
             train = {{ steps = 6, batch_size = 6, grad_accum = 2, lr = 1e-3, warmup = 2 }}\neval_every = 3\nresponses = {{ max_tokens = 2 }}\n{extra}\n",
            data.display()
        );
        p.set_pipeline(&(p.read("pipeline.toml") + &sft));
        let run = p.llmflow(&["run"]);
        assert_eq!(run.code, 0, "{extra}: {}", run.all());
        p
    };
    let (one, two) = (tuned(""), tuned("processes = 2"));
    assert!(two.log("sft").contains("launching 2 ranks"));
    let diff = max_relative_difference(&two, &one, "sft");
    assert!(diff <= FINE_TUNING_TOLERANCE, "the tuned weights differ from one process's by {diff:e} (relative)");
    held_out_metrics_agree(&one, &two, "sft");
}

/// `reward_model`, `dpo` and `classify` on 2 ranks against 1 process, each
/// on the tiny pretrained model: every rank trains on its pairs or texts of
/// each batch. See [`FINE_TUNING_TOLERANCE`].
#[test]
fn preference_and_classification_stages_on_two_ranks_train_what_one_process_trains() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/instruct");
    let stages = |extra: &str| {
        let p = pipeline("");
        let table = |name: &str, kind: &str, file: &str, more: &str| {
            format!(
                "\n[stages.{name}]\nkind = \"{kind}\"\ninputs = {{ model = \"pretrain\" }}\ndata = \"{}\"\n{more}\n\
                 train = {{ steps = 4, batch_size = 4, grad_accum = 2, lr = 1e-3, warmup = 1 }}\neval_every = 4\n{extra}\n",
                data.join(file).display()
            )
        };
        let template = "template = \"Q: {instruction} {input}\\nA: \"";
        let added = table("reward", "reward_model", "preference-data.json", template)
            + &table("dpo", "dpo", "preference-data.json", template)
            + &table("spam", "classify", "spamassassin.jsonl.gz", "max_tokens = 24");
        p.set_pipeline(&(p.read("pipeline.toml") + &added));
        let run = p.llmflow(&["run"]);
        assert_eq!(run.code, 0, "{extra}: {}", run.all());
        p
    };
    let (one, two) = (stages(""), stages("processes = 2"));
    for stage in ["reward", "dpo", "spam"] {
        assert!(two.log(stage).contains("launching 2 ranks"), "{stage}");
        let diff = max_relative_difference(&two, &one, stage);
        assert!(diff <= FINE_TUNING_TOLERANCE, "{stage}: the weights differ from one process's by {diff:e} (relative)");
        held_out_metrics_agree(&one, &two, stage);
    }
}

/// `ppo` and `grpo` on 2 ranks against 1 process: each rank samples, scores
/// and evaluates its rows of every batch with the seeds those rows have in
/// one process, every rank assembles the whole rollout, and each trains on
/// its share of every micro-batch. The reward model is trained in one
/// process on both sides. See [`FINE_TUNING_TOLERANCE`].
#[test]
fn rl_stages_on_two_ranks_train_what_one_process_trains() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let stages = |extra: &str| {
        let p = pipeline("");
        let preferences = data.join("instruct/preference-data.json");
        let mut added = format!(
            r#"
[stages.reward]
kind = "reward_model"
inputs = {{ model = "pretrain" }}
data = "{preferences}"
template = "Q: {{instruction}} {{input}}\nA: "
train = {{ steps = 2, batch_size = 4 }}

[stages.ppo]
kind = "ppo"
inputs = {{ policy = "pretrain", reward = "reward" }}
data = "{preferences}"
template = "Q: {{instruction}} {{input}}\nA: "
eval_prompts = 6
max_new_tokens = 6
train = {{ steps = 2, batch_size = 4, lr = 1e-3 }}
{extra}
"#,
            preferences = preferences.display()
        );
        // DAPO's loss divides by the tokens of all ranks; GRPO's mean over
        // each completion weighs a rank's loss by its share of the rows. The
        // tiny model gets no sum right: a completion with an "e" earns the
        // reward that varies within a group.
        for (name, loss_type) in [("grpo", "dapo"), ("grpo_mean", "grpo")] {
            added += &format!(
                r#"
[stages.{name}]
kind = "grpo"
inputs = {{ policy = "pretrain" }}
data = "{arithmetic}_train.jsonl"
eval_data = "{arithmetic}_test.jsonl"
template = "{{instruction}}="
eval_prompts = 7
eval_samples = 2
eval_temperature = 1.0
max_new_tokens = 4
group = 4
loss_type = "{loss_type}"
rewards = [{{ type = "exact_match" }}, {{ type = "format", pattern = "(?s).*e.*" }}]
train = {{ steps = 2, batch_size = 3, grad_accum = 2, lr = 1e-3 }}
{extra}
"#,
                arithmetic = data.join("rl/arithmetic").display(),
            );
        }
        p.set_pipeline(&(p.read("pipeline.toml") + &added));
        let run = p.llmflow(&["run"]);
        assert_eq!(run.code, 0, "{extra}: {}", run.all());
        p
    };
    let (one, two) = (stages(""), stages("processes = 2"));
    assert!(weights_of(&one, "reward") == weights_of(&two, "reward"));
    for stage in ["ppo", "grpo", "grpo_mean"] {
        assert!(two.log(stage).contains("launching 2 ranks"), "{stage}");
        let diff = max_relative_difference(&two, &one, stage);
        assert!(diff <= FINE_TUNING_TOLERANCE, "{stage}: the weights differ from one process's by {diff:e} (relative)");
        // A uniform factor on the loss barely moves AdamW's steps; the
        // logged gradient norm (GRPO's loss is about 0) shows it.
        let loss = if stage == "ppo" { "policy_loss" } else { "grad_norm" };
        let losses = |p: &Project| -> Vec<f64> {
            let rows = fs::read_to_string(p.out_dir(stage).join("metrics.jsonl")).unwrap();
            rows.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[loss].as_f64()).collect()
        };
        let (x, y) = (losses(&one), losses(&two));
        assert!(
            x.len() == 2
                && x.iter().all(|&x| x != 0.0)
                && x.iter().zip(&y).all(|(x, y)| (x - y).abs() <= 1e-4 * x.abs().max(y.abs()) + 1e-7),
            "{stage}: losses {x:?} vs {y:?}"
        );
        // The same completions sampled and scored.
        held_out_metrics_agree(&one, &two, stage);
    }
}

#[test]
fn a_stopped_two_rank_run_resumes_to_bitwise_equal_weights() {
    let whole = built("processes = 2");
    let resumed = pipeline("processes = 2");
    let stopped = resumed.cmd(&["run"]).env("LLMFLOW_STOP_AFTER_STEP", "6").output().unwrap();
    assert_eq!(stopped.status.code(), Some(1), "{}", String::from_utf8_lossy(&stopped.stderr));
    assert_eq!(resumed.state("pretrain"), "failed");
    resumes_to(&resumed, &whole);
}

/// Rank 1 is killed (SIGKILL) after step 6 of a ZeRO-1 run, whose moments
/// are in per-rank files: the stage fails at once with rank 1's output,
/// publishes nothing, leaves no rank running, and the next run resumes
/// from the checkpoint of step 4 to the uninterrupted run's weights.
#[test]
fn a_killed_rank_fails_the_stage_at_once_and_the_run_resumes() {
    let whole = built("processes = 2\nzero = 1");
    let killed = pipeline("processes = 2\nzero = 1");
    let log = failed_run(&killed, "1@6");
    assert!(log.contains("rank 1 of 2 was killed by signal 9; the last lines of its output:\n  [rank 1] rank 1 of 2"), "{log}");
    resumes_to(&killed, &whole);
}

/// Rank 1 hangs (SIGSTOP) after step 6: rank 0's next collective fails
/// after `collective_timeout_s`, and the stage fails with rank 0's error.
#[test]
fn a_hung_rank_fails_the_stage_after_the_collective_timeout() {
    let log = failed_run(&pipeline("processes = 2\ncollective_timeout_s = 3"), "1@6:stop");
    assert!(log.contains("rank 0 of 2 exited with status 1; the last lines of its output:"), "{log}");
    assert!(log.contains("rank 0 of 2: a collective failed"), "{log}");
}

/// A runner that `torchrun` starts (its own rendezvous, `RANK` and the rest
/// set by it) trains as one of the ranks: the same weights, bitwise, as the
/// 2-rank build the engine started. Needs torch's `torchrun`: the
/// interpreter `LLMFLOW_PYTHON` names (`make test` sets it) must have it;
/// without LLMFLOW_PYTHON the check is skipped.
#[test]
fn ranks_started_by_torchrun_train_what_the_runner_launches() {
    let Ok(python) = std::env::var("LLMFLOW_PYTHON") else {
        common::skip("set LLMFLOW_PYTHON to an interpreter with torch to run torchrun");
        return;
    };
    let launched = built("processes = 2");
    let out = |stage: &str| launched.out_dir(stage);
    let dir = launched.path().join("torchrun");
    fs::create_dir_all(dir.join("out")).unwrap();
    let manifest = launched.manifest("pretrain");
    let spec = serde_json::json!({
        "kind": "pretrain",
        "params": manifest["params"],
        "ctx": {
            "stage": "pretrain", "project_dir": launched.path(), "device": "cpu", "threads": 2, "progress_file": null,
            "inputs": {"data": out("tokens"), "tokenizer": out("tok")},
            "out": dir.join("out"), "work": dir.join("work"), "cache": dir.join("cache"),
        },
    });
    fs::write(dir.join("spec.json"), spec.to_string()).unwrap();
    let runner = std::path::Path::new(env!("CARGO_BIN_EXE_llmflow")).with_file_name("llmflow-stage");
    let run = std::process::Command::new(python)
        .args(["-m", "torch.distributed.run", "--no-python", "--standalone", "--nproc-per-node", "2"])
        .arg(runner)
        .arg("run")
        .arg(dir.join("spec.json"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1 of 2 (local 1 of 2) joined the process group") && !stderr.contains("launching"), "{stderr}");
    // The ranks connect to the agent's store rather than serve a second one on its port.
    assert!(!stderr.contains("failed to bind"), "{stderr}");
    let weights = fs::read(dir.join("out/model.safetensors")).unwrap();
    assert!(weights == weights_file(&launched), "torchrun's ranks trained other weights");
}

#[test]
fn more_processes_than_rows_is_an_error_naming_the_field() {
    let err = common::config_error(&format!(
        r#"{TINY_DATA}
[stages.pretrain]
kind = "pretrain"
inputs = {{ data = "tokens", tokenizer = "tok" }}
train = {{ batch_size = 2 }}
processes = 4
"#
    ));
    assert!(err.contains("processes") && err.contains("train.batch_size of at least 4"), "{err}");
}

/// `RANK` and `WORLD_SIZE` left in the shell that runs `llmflow` are no
/// launcher's: the stage fails at once naming them, instead of serving a
/// rendezvous for a rank nobody starts until the collective timeout.
#[test]
fn rank_variables_left_in_the_shell_fail_at_once_naming_them() {
    let p = pipeline("processes = 2");
    let run = p.llmflow(&["run", "tokens"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let started = Instant::now();
    let run: common::Run = p
        .cmd(&["run", "pretrain"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .output()
        .unwrap()
        .into();
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    let all = run.all();
    assert!(
        all.contains("RANK=0, WORLD_SIZE=2, MASTER_ADDR=127.0.0.1") && all.contains("neither llmflow's launcher nor torchrun"),
        "{all}"
    );
    assert_ne!(p.state("pretrain"), "fresh");
    // Without them the same stage builds.
    assert_eq!(p.llmflow(&["run", "pretrain"]).code, 0);
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
