//! The shipped `pipeline.toml`, run end to end through the real binaries on
//! the shipped corpus, the way a new user meets it.

mod common;

use std::fs;

use common::{default_pipeline, Project};

fn metric(p: &Project, stage: &str, name: &str) -> serde_json::Value {
    let show = p.llmflow(&["show", stage, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    v["manifest"]["metrics"][name].clone()
}

#[test]
fn default_pipeline_builds_caches_and_rebuilds_only_what_changed() {
    let p = default_pipeline();
    let report = p.llmflow(&["report"]);
    assert_eq!(report.code, 2, "{}", report.all());
    assert!(report.stderr.contains("no report of `eval` is built yet: run `llmflow run eval` first"), "{}", report.stderr);

    let first = p.llmflow(&["run"]);
    assert_eq!(first.code, 0, "{}", first.all());
    let mut built = first.built();
    built.sort();
    assert_eq!(
        built,
        [
            "arith_sft",
            "clean",
            "corpus",
            "dedup",
            "dpo",
            "eval",
            "grpo",
            "ppo",
            "pretrain",
            "reward",
            "sft",
            "spam",
            "stats",
            "tok",
            "tokens"
        ]
    );

    for (stage, file) in [
        ("corpus", "docs/part-00000.parquet"),
        ("clean", "docs/part-00000.parquet"),
        ("clean", "removed/part-00000.parquet"),
        ("dedup", "docs/part-00000.parquet"),
        ("dedup", "clusters/part-00000.parquet"),
        ("dedup", "index.json"),
        ("tok", "tokenizer.json"),
        ("tokens", "train_000000.bin"),
        ("tokens", "val_000000.bin"),
        ("tokens", "manifest.json"),
        ("stats", "stats.txt"),
        ("pretrain", "model.safetensors"),
        ("pretrain", "config.json"),
        ("pretrain", "tokenizer.json"),
        ("pretrain", "metrics.jsonl"),
        ("pretrain", "loss.png"),
        ("pretrain", "samples.txt"),
        ("sft", "model.safetensors"),
        ("sft", "responses.jsonl"),
        ("sft", "loss.png"),
        ("reward", "head.json"),
        ("reward", "model.safetensors"),
        ("ppo", "model.safetensors"),
        ("ppo", "metrics.png"),
        ("ppo", "samples.jsonl"),
        ("dpo", "model.safetensors"),
        ("spam", "results.json"),
        ("eval", "report.md"),
    ] {
        assert!(p.out_dir(stage).join(file).is_file(), "{stage} lacks {file}");
    }
    // Speeches of the play, split at blank lines; the filter removes some and
    // says which rule removed how many.
    let docs_in = metric(&p, "clean", "documents_in").as_u64().unwrap();
    let docs_out = metric(&p, "clean", "documents_out").as_u64().unwrap();
    assert_eq!(docs_in, metric(&p, "corpus", "documents").as_u64().unwrap());
    assert!(docs_out > docs_in / 2 && docs_out < docs_in, "{docs_out} of {docs_in}");
    let removed = metric(&p, "clean", "removed");
    let total: u64 = removed.as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, docs_in - docs_out);
    assert_eq!(metric(&p, "tok", "vocab_size"), 4096);
    let train_tokens = metric(&p, "tokens", "train_tokens").as_u64().unwrap();
    let val_tokens = metric(&p, "tokens", "val_tokens").as_u64().unwrap();
    assert!(train_tokens > 100_000 && val_tokens * 5 < train_tokens && val_tokens * 20 > train_tokens);

    // Training learned something, and the model answers `generate`.
    let val_bpb = metric(&p, "pretrain", "val_bpb").as_f64().unwrap();
    assert!(val_bpb > 1.0 && val_bpb < 12.0, "{val_bpb}");
    let rows = fs::read_to_string(p.out_dir("pretrain").join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = rows.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 12);
    assert!(losses[11] < losses[0], "{losses:?}");
    let args = ["generate", "pretrain", "--prompt", "ROMEO:", "--max-tokens", "5", "--seed", "7"];
    let g1 = p.llmflow(&args);
    assert_eq!(g1.code, 0, "{}", g1.all());
    assert!(g1.stdout.starts_with("ROMEO:") && g1.stdout.len() > "ROMEO:\n".len(), "{}", g1.stdout);
    assert_eq!(p.llmflow(&args).stdout, g1.stdout, "the same seed samples the same text");

    // The estimate counts the parameters the trained model has.
    let estimate = p.llmflow(&["estimate", "pretrain"]);
    let params = metric(&p, "pretrain", "params");
    assert!(estimate.stdout.contains(&format!("parameters        {params} ")), "{}", estimate.stdout);
    assert!(estimate.stdout.contains("tokens            1536 (12 steps × 128 tokens)"), "{}", estimate.stdout);
    assert!(estimate.stdout.contains("expected time"), "{}", estimate.stdout);

    // The Hugging Face export (transformers' own check of it is a unit test).
    let export = p.path().join("hf");
    let r = p.llmflow(&["export", "pretrain", "--out", export.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let config: serde_json::Value = serde_json::from_str(&fs::read_to_string(export.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(config["n_layer"], 1);
    assert_eq!(fs::read(export.join("model.safetensors")).unwrap(), fs::read(p.out_dir("pretrain").join("model.safetensors")).unwrap());
    assert!(export.join("tokenizer.json").is_file());

    // Post-training: SFT learns the responses, each test instruction gets an
    // answer, and the preference stages report before and after.
    let (before, after) = (metric(&p, "sft", "val_loss_before"), metric(&p, "sft", "val_loss"));
    assert!(after.as_f64().unwrap() < before.as_f64().unwrap(), "sft val loss {before} → {after}");
    let responses = fs::read_to_string(p.out_dir("sft").join("responses.jsonl")).unwrap();
    assert_eq!(responses.lines().count() as u64, metric(&p, "sft", "examples")[2].as_u64().unwrap());
    for (stage, name) in
        [("reward", "val_accuracy"), ("ppo", "reward_before"), ("ppo", "reward_after"), ("ppo", "kl_after"), ("dpo", "val_reward_accuracy")]
    {
        assert!(metric(&p, stage, name).as_f64().is_some_and(f64::is_finite), "{stage} {name}");
    }
    let accuracy = metric(&p, "spam", "test_accuracy").as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy) && metric(&p, "spam", "baseline_accuracy") == 0.5, "{accuracy}");
    let generated = p.llmflow(&["generate", "ppo", "--prompt", "Name a color.", "--max-tokens", "4"]);
    assert_eq!(generated.code, 0, "the RLHF model is a model artifact: {}", generated.all());

    // The report card of the trained models, in the terminal and as JSON.
    let report = p.llmflow(&["report"]);
    assert_eq!(report.code, 0, "{}", report.all());
    for line in [
        "| task | metric | dpo | ppo | pretrain | sft |",
        "| arc_easy (multiple_choice, 200 examples) | acc_norm |",
        "| blimp (minimal_pairs, 670 examples) | acc |",
        "| **CORE** |",
        "![centered score per task](centered.png)",
        "[loss.png](loss_pretrain.png)",
    ] {
        assert!(report.stdout.contains(line), "{line:?} not in\n{}", report.stdout);
    }
    assert!(report.stderr.contains("report.md"), "the path of the report: {}", report.stderr);
    let json = p.llmflow(&["report", "eval", "--json"]);
    let results: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let pretrain = results["models"].as_array().unwrap().iter().find(|m| m["label"] == "pretrain").unwrap();
    assert_eq!(pretrain["training_tokens"], 1536);
    assert_eq!(pretrain["params"], metric(&p, "pretrain", "params"));
    let blimp = results["results"]["pretrain"]["blimp"]["metrics"]["acc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&blimp), "{blimp}");
    assert!(results["results"]["pretrain"]["humaneval"]["examples_per_s"].as_f64().unwrap() > 0.0);
    for file in ["centered.png", "bits_per_byte.png", "loss_pretrain.png"] {
        assert!(p.out_dir("eval").join(file).is_file(), "eval lacks {file}");
    }
    let named = p.llmflow(&["report", "pretrain"]);
    assert!(named.stderr.contains("stage `pretrain` (pretrain) writes no report"), "{}", named.all());

    let second = p.llmflow(&["run"]);
    assert!(second.built().is_empty(), "{}", second.all());
    assert!(second.stderr.contains("nothing to do"), "{}", second.stderr);

    // A new SFT learning rate rebuilds SFT and what was tuned from it or
    // evaluates it, nothing else; status says so first.
    p.edit("lr = 1e-3, min_lr = 1e-4, warmup = 20", "lr = 5e-4, min_lr = 1e-4, warmup = 20");
    let status = p.llmflow(&["status"]);
    assert!(status.stdout.contains("param `train.lr`: 0.001 → 0.0005"), "{}", status.stdout);
    let stale: Vec<String> = p.states().into_iter().filter(|(_, s)| s != "fresh").map(|(n, _)| n).collect();
    assert_eq!(stale, ["sft", "reward", "ppo", "dpo", "eval"]);
    let rebuilt = p.llmflow(&["run"]);
    let mut built = rebuilt.built();
    built.sort();
    assert_eq!(built, ["dpo", "eval", "ppo", "reward", "sft"], "{}", rebuilt.all());

    // A tokenizer change rebuilds the tokenizer, the shards and every model;
    // the corpus stages stay.
    p.edit("vocab_size = 4096", "vocab_size = 2048");
    let status = p.llmflow(&["status"]);
    assert!(status.stdout.contains("param `vocab_size`: 4096 → 2048"), "{}", status.stdout);
    let stale: Vec<String> = p.states().into_iter().filter(|(_, s)| s != "fresh").map(|(n, _)| n).collect();
    assert_eq!(stale, ["tok", "tokens", "pretrain", "sft", "reward", "ppo", "dpo", "spam", "arith_sft", "grpo", "eval"]);
    let third = p.llmflow(&["run"]);
    let mut built = third.built();
    built.sort();
    assert_eq!(built, ["arith_sft", "dpo", "eval", "grpo", "ppo", "pretrain", "reward", "sft", "spam", "tok", "tokens"], "{}", third.all());
    assert_eq!(metric(&p, "tok", "vocab_size"), 2048);

    // Volatile params (how long to wait on the network) change nothing.
    p.edit("retries = 0", "retries = 2");
    assert!(p.llmflow(&["run"]).built().is_empty());
}
