//! Muon in every training kind: `train.optimizer = "muon"` on a tiny
//! pretrain, then SFT with LoRA adapters, a reward model, DPO, a
//! classifier, PPO and GRPO on it. Each trains its blocks' matrices with
//! Muon (LoRA: the adapters' factors) and the rest with AdamW, and says so.

mod common;

use common::{Project, TINY_DATA};

#[test]
fn every_training_kind_trains_with_muon() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let p = Project::new(&format!(
        r#"{TINY_DATA}
[stages.pretrain]
kind = "pretrain"
inputs = {{ data = "tokens", tokenizer = "tok" }}
model = {{ arch = "llama", n_layer = 2, n_head = 2, d_model = 32, context = 64, dropout = 0.0 }}
train = {{ steps = 4, batch_size = 4, optimizer = "muon", muon = {{ lr = 0.01 }} }}
eval_every = 4
eval_batches = 1
samples = {{ count = 0 }}

[stages.sft]
kind = "sft"
inputs = {{ model = "pretrain" }}
data = "{instruct}/instruction-data.json"
template = "Q: {{instruction}} {{input}}\nA: "
trainable = {{ lora = {{ rank = 4 }} }}
train = {{ steps = 2, batch_size = 4, optimizer = "muon" }}
responses = {{ max_tokens = 2 }}

[stages.reward]
kind = "reward_model"
inputs = {{ model = "pretrain" }}
data = "{instruct}/preference-data.json"
template = "Q: {{instruction}} {{input}}\nA: "
train = {{ steps = 2, batch_size = 4, optimizer = "muon" }}

[stages.dpo]
kind = "dpo"
inputs = {{ model = "pretrain" }}
data = "{instruct}/preference-data.json"
template = "Q: {{instruction}} {{input}}\nA: "
train = {{ steps = 2, batch_size = 4, optimizer = "muon" }}

[stages.spam]
kind = "classify"
inputs = {{ model = "pretrain" }}
data = "{instruct}/spamassassin.jsonl.gz"
max_tokens = 24
train = {{ steps = 2, batch_size = 4, optimizer = "muon" }}

[stages.ppo]
kind = "ppo"
inputs = {{ policy = "pretrain", reward = "reward" }}
data = "{instruct}/preference-data.json"
template = "Q: {{instruction}} {{input}}\nA: "
eval_prompts = 2
max_new_tokens = 4
train = {{ steps = 2, batch_size = 4, optimizer = "muon" }}

[stages.grpo]
kind = "grpo"
inputs = {{ policy = "pretrain" }}
data = "{rl}_train.jsonl"
eval_data = "{rl}_test.jsonl"
template = "{{instruction}}="
eval_prompts = 2
max_new_tokens = 4
group = 2
rewards = [{{ type = "exact_match" }}]
train = {{ steps = 2, batch_size = 2, optimizer = "muon" }}
"#,
        instruct = data.join("instruct").display(),
        rl = data.join("rl/arithmetic").display(),
    ));
    p.write_corpus(60_000);
    let run = p.llmflow(&["run"]);
    assert_eq!(run.code, 0, "{}", run.all());
    // Llama blocks: q, k, v, o, gate, up, down, 7 matrices each.
    for stage in ["pretrain", "reward", "dpo", "spam", "ppo", "grpo"] {
        let log = p.log(stage);
        assert!(log.contains(": Muon for 14 matrices"), "{stage}: {log}");
    }
    // LoRA on q and v (the default targets): an A and a B each, 2 layers.
    let sft = p.log("sft");
    assert!(sft.contains(": Muon for 8 matrices"), "{sft}");
}
