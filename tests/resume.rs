//! A training stage stopped mid-run and run again resumes from its last
//! checkpoint and ends bitwise equal to an uninterrupted run, through the
//! real binaries and the artifact store. Without dropout, as the default
//! pipeline trains, each batch is split across the CPU cores
//! (`train::replicas`); the stage's unit test covers the path with dropout.

mod common;

use std::fs;

use common::{Project, TINY_DATA};

fn pipeline() -> Project {
    let p = Project::new(&format!(
        r#"{TINY_DATA}
[stages.pretrain]
kind = "pretrain"
inputs = {{ data = "tokens", tokenizer = "tok" }}
model = {{ n_layer = 2, n_head = 2, d_model = 32, context = 32, dropout = 0.0 }}
train = {{ steps = 16, batch_size = 4, grad_accum = 2, lr = 3e-3, warmup = 4 }}
eval_every = 8
eval_batches = 2
checkpoint_every = 4
samples = {{ count = 1, max_tokens = 8 }}
"#
    ));
    p.write_corpus(120_000);
    p
}

fn weights(p: &Project) -> Vec<u8> {
    fs::read(p.out_dir("pretrain").join("model.safetensors")).unwrap()
}

#[test]
fn stopped_training_resumes_to_bitwise_equal_weights() {
    let whole = pipeline();
    let run = whole.llmflow(&["run"]);
    assert_eq!(run.code, 0, "{}", run.all());

    let resumed = pipeline();
    // Stop after step 10, as a kill would; the checkpoint of step 8 survives.
    let stopped = resumed.cmd(&["run"]).env("LLMFLOW_STOP_AFTER_STEP", "10").output().unwrap();
    assert_eq!(stopped.status.code(), Some(1), "{}", String::from_utf8_lossy(&stopped.stderr));
    assert_eq!(resumed.state("pretrain"), "failed");
    assert_eq!(resumed.state("tokens"), "fresh");

    let again = resumed.llmflow(&["run"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert_eq!(again.built(), ["pretrain"]);
    let log = resumed.log("pretrain");
    assert!(log.contains("resuming from the checkpoint of step 8"), "{log}");
    if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        assert!(log.contains("each batch split across"), "{log}");
    }

    assert!(weights(&whole) == weights(&resumed), "resumed weights differ from the uninterrupted run's");
    // Same inputs, same params: the same key in both stores.
    assert_eq!(whole.status_json()["stages"][3]["key"], resumed.status_json()["stages"][3]["key"]);
}
