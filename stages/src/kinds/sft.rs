//! `sft`: supervised instruction fine-tuning of a pretrained model, in full
//! or with LoRA adapters.
//!
//! ```toml
//! [stages.sft]
//! kind = "sft"
//! input = "pretrain"
//! data = "data/instruct/instruction-data.json"
//! template = "alpaca"                  # or "chat", or "Q: {instruction}\n{input}\nA: "
//! split = [0.85, 0.10, 0.05]           # train, validation, test
//! trainable = { lora = { rank = 8, alpha = 16, dropout = 0.05, targets = ["q", "v"] } }   # optional
//! train = { steps = 300, batch_size = 16, lr = 1e-3 }
//! responses = { max_tokens = 64, temperature = 0.0 }
//! ```
//!
//! Input `model`: a model artifact (`pretrain`, or an earlier `sft`). Data:
//! a JSON array or JSON Lines (optionally `.gz`) of Alpaca records,
//! `instruction`, `input` (optional) and `output`; the file is part of the
//! stage's key.
//!
//! Each record becomes its prompt (the [`Template`]) followed by the output
//! and `<|endoftext|>` ([`Encoder::sequence`]), cut to the model's context by
//! dropping prompt tokens from the left. The loss is the mean cross-entropy
//! of the response tokens only: prompt and padding targets are
//! `IGNORE_INDEX` ([`pad`] pads on the right, so with causal attention no
//! real token sees a pad and no attention mask is needed).
//!
//! Params:
//! * `data` (`data/instruct/instruction-data.json`), relative to the project.
//! * `template` (`alpaca`): a [`Template`]. Prompt the tuned model the same
//!   way (`reward_model`, `dpo` and `ppo` take the same param).
//! * `split` (`[0.85, 0.10, 0.05]`): train, validation and test fractions of
//!   the records, shuffled by `train.seed` ([`Split`]).
//! * `trainable` (`"all"`): which weights train — `"all"`,
//!   `{ last_blocks = N }`, or `{ lora = { … } }` (a [`crate::model::Lora`]: defaults rank
//!   8, alpha 16, dropout 0.05, targets `["q", "v"]`), which trains adapters
//!   on a frozen model and merges them on saving (see
//!   [`crate::train::finetune`]).
//! * `train`: a [`Hyper`] (defaults: 300 steps of 16 records, lr 1e-3 →
//!   1e-4, warmup 20, weight decay 0.01); `eval_every` (100),
//!   `spike_factor`, `checkpoint_every`, `keep_checkpoints`, `log_every` as in
//!   `pretrain`, resumable the same way (`LLMFLOW_STOP_AFTER_STEP`). The
//!   batches are a function of the step ([`batch_indices`]), so a resumed
//!   run ends bitwise equal to an uninterrupted one on the CPU.
//! * `processes`, `zero`, `collective_timeout_s` as in `pretrain`: each rank
//!   trains on its records of every batch, its loss weighted by its share of
//!   the batch's counted response tokens.
//! * `responses`: `max_tokens` (64) and `temperature` (0: greedy), `top_k`
//!   (none) for the answers to the test instructions.
//!
//! Output: the fine-tuned model artifact, adapters merged
//! (`model.safetensors`, `config.json`, `tokenizer.json`), `metrics.jsonl`
//! (per step `loss`, `lr`, `grad_norm`; per evaluation `val_loss`),
//! `loss.png`, and `responses.jsonl`: for every test record, `instruction`,
//! `input`, `reference` (its output) and `response` (generated, up to
//! `<|endoftext|>`). Metrics: `val_loss_before` and `val_loss` (mean nats
//! per response token of the validation records, before and after),
//! `train_loss`, `trainable_params`, `params`, `examples` (train, validation,
//! test), `wall_seconds`, `skipped_steps`.
//!
//! The defaults take the default pipeline's pretrained model (4 × 128 GPT-2,
//! context 128, trained on tiny Shakespeare) from 6.56 to 3.86 nats per
//! validation response token after 300 steps; see the test
//! `instruction_quality`. A step costs less than a `pretrain` step of the
//! same batch (16 sequences of at most 128 tokens): on the CPU the output
//! head runs on the response tokens only ([`Gpt::backward_lm`]).

use std::time::Instant;

use anyhow::{ensure, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::instruct::{Encoder, Record, Template};
use crate::data::records::{self, Split};
use crate::data::sequences::{pad, score, Sequence};
use crate::model::Gpt;
use crate::sample::{generate_batch, Sampling};
use crate::train::finetune::{self, read_records, Trainable, Tuning};
use crate::train::trainer::{self, batch_indices, Ended, Objective, Trainer};
use crate::train::{self, ranks, Hyper, Training};
use crate::{device, Inputs, ParamError, Stage, StageCtx};

pub struct Sft;

/// Test instructions answered per batch of generation.
const RESPONSE_BATCH: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The instruction records (Alpaca JSON or JSON Lines), relative to the pipeline.
    pub data: String,
    /// How a record becomes a prompt: `alpaca`, `chat`, or a template with `{instruction}` and `{input}`.
    pub template: Template,
    /// Train, validation and test fractions of the records, shuffled by `train.seed`.
    pub split: Vec<f64>,
    pub trainable: Trainable,
    pub train: Hyper,
    #[serde(flatten)]
    pub training: Training,
    /// How the answers to the test instructions (`responses.jsonl`) are sampled.
    pub responses: Responses,
}

/// How the answers to the test instructions are generated.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Responses {
    /// New tokens per answer at most.
    #[schemars(range(min = 1, max = 1_048_576))]
    pub max_tokens: usize,
    /// 0 decodes greedily.
    #[schemars(range(min = 0, max = 100))]
    pub temperature: f64,
    /// Keep only the K most likely tokens (all if unset).
    #[schemars(range(min = 1, max = 10_000_000))]
    pub top_k: Option<usize>,
}

impl Default for Responses {
    fn default() -> Self {
        Responses { max_tokens: 64, temperature: 0.0, top_k: None }
    }
}

impl Default for Params {
    fn default() -> Self {
        Params {
            data: "data/instruct/instruction-data.json".into(),
            template: Template::default(),
            split: vec![0.85, 0.10, 0.05],
            trainable: Trainable::All,
            train: Hyper { steps: 300, lr: 1e-3, min_lr: 1e-4, warmup: 20, weight_decay: 0.01, ..Hyper::default() },
            training: Training { eval_every: 100, ..Training::default() },
            responses: Responses::default(),
        }
    }
}

impl Stage for Sft {
    const KIND: &'static str = "sft";
    const VERSION: u32 = 4;
    const SUMMARY: &'static str = "instruction fine-tuning on response tokens, in full or with LoRA adapters";
    const INPUTS: Inputs = Inputs::Fixed(&["model"]);
    const VOLATILE: &'static [&'static str] = &train::VOLATILE;
    const MERGED: &'static [&'static str] = &train::MERGED;
    const MOVED: &'static [(&'static str, &'static str)] = &[finetune::MOVED_LORA];
    const SHOW: &'static [&'static str] = &["loss.png", "responses.jsonl", "metrics.jsonl"];
    type Params = Params;

    fn check(params: &Params, _inputs: &[String]) -> Result<(), ParamError> {
        if params.data.trim().is_empty() {
            return Err(ParamError::new(&["data"], "`data` must name an instruction file (JSON or JSON Lines)"));
        }
        params.template.check("template")?;
        records::check_split(&params.split, &["train", "validation", "test"])?;
        params.trainable.check()?;
        params.training.check(&params.train)
    }

    fn files(params: &Params) -> Vec<String> {
        vec![params.data.clone()]
    }

    fn resources(params: &Params) -> crate::Resources {
        params.training.resources()
    }

    fn run(params: &Params, ctx: &mut StageCtx) -> Result<()> {
        trainer::run_stage(|stop_after| sft(params, ctx, stop_after))
    }
}

/// The stage, stopping after step `stop_after` if given (see
/// [`Trainer::stop_after`]).
pub(crate) fn sft(params: &Params, ctx: &mut StageCtx, stop_after: Option<u64>) -> Result<Ended> {
    let started = Instant::now();
    let device = device::prepare(ctx)?;
    params.training.join(device)?;
    let input = ctx.input("model")?.to_path_buf();
    let hyper = &params.train;
    let mut tuning = Tuning::open(&input, &params.trainable, device, hyper.seed)?;
    crate::train::check_memory(tuning.gpt.config(), hyper, device)?;
    let records = read_records(ctx, &params.data)?;
    let parts = Split::new(&params.split, hyper.seed).parts(records.len());
    // Its own copy: the model is borrowed mutably for training below.
    let tokenizer = tuning.tokenizer.clone();
    let encoder = Encoder::new(&tokenizer, &params.template)?;
    let context = tuning.gpt.config().context as usize;
    let encode = |part: &[usize]| -> Result<Vec<Sequence>> {
        part.iter().map(|&i| encoder.sequence(&records[i], &records[i].output, context)).collect()
    };
    let (train, val) = (encode(&parts[0])?, encode(&parts[1])?);
    ensure!(
        !train.is_empty() && !val.is_empty(),
        "{}: {} records leave {} for training and {} for validation; `split` needs more data",
        params.data,
        records.len(),
        train.len(),
        val.len()
    );
    let (trainable_params, params_total) = (tuning.trainable_params(), tuning.gpt.config().num_params());
    eprintln!(
        "sft: {trainable_params} trainable parameters of {params_total}, {} train / {} validation / {} test records",
        train.len(),
        val.len(),
        parts[2].len()
    );

    let (gpt, trainable) = tuning.parts();
    let mut task = Instructions { gpt, train, val, hyper, pad_id: encoder.eot };
    let val_loss_before = task.val_loss()?;
    let trainer = Trainer::new("sft", &params.train, &params.training, stop_after);
    let trained = match trainer.run(ctx, trainable, &mut task)? {
        Ended::Finished(trained) => trained,
        stopped => return Ok(stopped),
    };
    if !ranks::is_first() {
        return Ok(Ended::Finished(trained));
    }

    let out = ctx.out.clone();
    let mut lines = String::new();
    // Generated in batches that stop at <|endoftext|>; each prompt keeps its
    // last tokens so that it and the answer fit the context.
    let context = gpt.config().context as usize;
    let max_tokens = params.responses.max_tokens.min(context - 1);
    let test: Vec<&Record> = parts[2].iter().map(|&i| &records[i]).collect();
    for (b, batch) in test.chunks(RESPONSE_BATCH).enumerate() {
        let prompts = batch
            .iter()
            .map(|r| encoder.prompt(r).map(|p| p[p.len().saturating_sub(context - max_tokens)..].to_vec()))
            .collect::<Result<Vec<_>>>()?;
        let sampling = Sampling {
            max_tokens,
            temperature: params.responses.temperature,
            top_k: params.responses.top_k,
            top_p: None,
            seed: hyper.seed.wrapping_add((b * RESPONSE_BATCH) as u64),
        };
        let news = tch::no_grad(|| generate_batch(gpt, &prompts, &sampling, Some(encoder.eot)));
        for (record, new) in batch.iter().zip(news) {
            let row = json!({
                "instruction": record.instruction,
                "input": record.input,
                "reference": record.output,
                "response": encoder.decode(&new)?,
            });
            lines += &format!("{row}\n");
        }
    }
    std::fs::write(out.join("responses.jsonl"), lines)?;
    trained.write(&out, "sft: loss on the response tokens", "nats/token")?;
    tuning.save(&out, &input)?;

    ctx.metric("val_loss_before", val_loss_before);
    ctx.metric("val_loss", &trained.last_eval["val_loss"]);
    ctx.metric("train_loss", trained.train_loss()?);
    ctx.metric("trainable_params", trainable_params);
    ctx.metric("params", params_total);
    ctx.metric("examples", [parts[0].len(), parts[1].len(), parts[2].len()]);
    ctx.metric("wall_seconds", started.elapsed().as_secs_f64());
    ctx.metric("skipped_steps", trained.skipped);
    Ok(Ended::Finished(trained))
}

/// Next-token prediction on the response tokens of instruction records, as a
/// [`Objective`]. Batches depend only on the step: no state to checkpoint.
struct Instructions<'a> {
    gpt: &'a Gpt,
    train: Vec<Sequence>,
    val: Vec<Sequence>,
    hyper: &'a Hyper,
    /// Any id does: padded positions are neither attended to nor counted.
    pad_id: i64,
}

impl Instructions<'_> {
    /// Mean nats per response token of the validation records.
    /// Across ranks, each scores its share of the records.
    fn val_loss(&self) -> Result<f64> {
        let scores = ranks::rows_of(self.val.len(), 1, |rows| Ok(score(self.gpt, &self.val[rows], self.hyper.batch_size, self.pad_id)))?;
        Ok(-scores.iter().sum::<f64>() / self.val.iter().map(Sequence::counted).sum::<usize>() as f64)
    }
}

impl Objective for Instructions<'_> {
    fn backward(&mut self, step: u64, micro: usize, scale: f64) -> Result<f64> {
        let batch: Vec<Sequence> =
            batch_indices(self.train.len(), self.hyper, step, micro).into_iter().map(|i| self.train[i].clone()).collect();
        // This rank's rows; the loss is a mean over the counted tokens.
        let (batch, share) = ranks::share(batch, |s| s.counted() as f64);
        if share == 0.0 {
            return Ok(0.0);
        }
        let scale = scale * share;
        let batch = pad(&batch, self.pad_id, self.gpt.device());
        let cuda = self.gpt.device().is_cuda();
        let loss = tch::autocast(cuda, || self.gpt.backward_lm(&batch.x, &batch.y, scale));
        Ok(loss.double_value(&[]))
    }

    fn evaluate(&mut self, _step: u64) -> Result<serde_json::Map<String, serde_json::Value>> {
        Ok(serde_json::Map::from_iter([("val_loss".into(), json!(self.val_loss()?))]))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::formats::model::ModelArtifact;
    use crate::model;
    use crate::model::Lora;
    use crate::model::IGNORE_INDEX;
    use crate::testing::ctx;
    use crate::testing::{instruct_data, model_artifact};
    use crate::testing::{tiny, torch_rng};
    use crate::train::trainer::METRICS_FILE;
    use crate::train::Checkpoints;

    /// Short prompts, so that tiny models with a short context see them whole.
    const TEMPLATE: &str = "Q: {instruction} {input}\nA: ";

    fn tiny_params(extra: serde_json::Value) -> Params {
        let mut fields = json!({
            "data": "instructions.jsonl",
            "template": TEMPLATE,
            "train": {"steps": 12, "batch_size": 4, "warmup": 2, "lr": 1e-2, "min_lr": 1e-3},
            "eval_every": 6, "checkpoint_every": 4, "log_every": 100,
            "responses": {"max_tokens": 8},
        });
        fields.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        crate::params::<Sft>(fields).unwrap()
    }

    /// A project dir with a tiny model artifact and 40 instruction records.
    fn project(dir: &Path) -> std::path::PathBuf {
        let model = model_artifact(dir, &tiny("gpt2", json!({"context": 64, "dropout": 0.1})));
        std::fs::rename(dir.join(instruct_data(dir, "instruction-data.json", 40)), dir.join("instructions.jsonl")).unwrap();
        model
    }

    /// The loss a training step takes (pad, then `model::loss`, which
    /// `Gpt::backward_lm` computes with its gradients) counts the
    /// response tokens only: it is their mean negative log-likelihood, and
    /// changing a prompt token's target leaves it as it was, while changing a
    /// response token's does not.
    #[test]
    fn the_loss_counts_response_tokens_only() {
        let _rng = torch_rng();
        let dir = tempfile::tempdir().unwrap();
        let ModelArtifact { gpt, tokenizer, .. } = ModelArtifact::open(&project(dir.path()), Device::Cpu).unwrap();
        let template = Template::from(TEMPLATE.to_string());
        let encoder = Encoder::new(&tokenizer, &template).unwrap();
        let record = Record { instruction: "Name a color.".into(), output: "Red.".into(), ..Default::default() };
        let s = encoder.sequence(&record, &record.output, 64).unwrap();
        assert!(s.start >= 3 && s.counted() >= 2, "{s:?}");
        let batch = pad(&[s.clone(), s.clone()], encoder.eot, Device::Cpu);
        let logits = gpt.forward(&batch.x, false);
        let loss = |y: &Tensor| model::loss(&logits, y).double_value(&[]);

        let logp = logits.log_softmax(-1, Kind::Float);
        let nll: f64 = (s.start..s.ids.len()).map(|t| -logp.double_value(&[0, t as i64 - 1, s.ids[t]])).sum();
        assert!((loss(&batch.y) - nll / s.counted() as f64).abs() < 1e-5);

        let retarget = |t: usize| {
            let mut ids = s.ids.clone();
            ids[t] = (ids[t] + 1) % 300;
            let changed = Sequence { ids, start: s.start };
            pad(&[changed.clone(), changed], encoder.eot, Device::Cpu).y
        };
        assert_eq!(loss(&retarget(1)), loss(&batch.y), "a prompt token's target counted");
        assert_eq!(loss(&retarget(s.start - 1)), loss(&batch.y), "a prompt token's target counted");
        assert_ne!(loss(&retarget(s.start)), loss(&batch.y), "a response token's target ignored");
        assert_eq!(Vec::<i64>::try_from(batch.y.get(0).narrow(0, 0, s.start as i64 - 1)).unwrap(), vec![IGNORE_INDEX; s.start - 1]);
    }

    /// Full fine-tuning of a tiny model on 34 records lowers the validation
    /// loss on response tokens, and writes a plain model artifact and the
    /// test responses.
    #[test]
    fn tuning_lowers_the_validation_loss_and_writes_the_outputs() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let model = project(dir);
        let mut c = ctx(dir, "sft", &[("model", &model)]);
        let train = json!({"train": {"steps": 20, "batch_size": 4, "warmup": 2, "lr": 1e-2, "min_lr": 1e-3}});
        sft(&tiny_params(train), &mut c, None).unwrap().finished().unwrap();
        let metrics = c.metrics();
        let (before, after) = (metrics["val_loss_before"].as_f64().unwrap(), metrics["val_loss"].as_f64().unwrap());
        assert!(after < before - 1.0, "{before} → {after}");
        assert_eq!(metrics["examples"], json!([34, 4, 2]));
        assert_eq!(metrics["trainable_params"], metrics["params"]);

        let responses: Vec<serde_json::Value> = records::read(&c.out.join("responses.jsonl")).unwrap();
        assert_eq!(responses.len(), 2);
        for key in ["instruction", "input", "reference", "response"] {
            assert!(responses[0][key].is_string(), "{key}: {:?}", responses[0]);
        }
        ModelArtifact::open(&c.out, Device::Cpu).unwrap();
        assert_eq!(&std::fs::read(c.out.join("loss.png")).unwrap()[1..4], b"PNG");
        assert_eq!(
            std::fs::read_to_string(c.out.join(METRICS_FILE)).unwrap().lines().count(),
            20 + 4,
            "a row per step and per evaluation (every 6 and after the last)"
        );
    }

    /// LoRA trains adapters only, and a run stopped after step 6 and resumed
    /// (from the checkpoint of step 4) ends with the weights of an
    /// uninterrupted run, bit for bit: adapter dropout included.
    #[test]
    fn lora_runs_resume_bitwise_and_save_merged_plain_models() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let model = project(dir);
        let params = tiny_params(json!({"trainable": {"lora": {"rank": 4, "dropout": 0.1, "targets": ["q", "v", "up"]}}}));
        let run = |name: &str, stop_after: Option<u64>| {
            let mut c = ctx(dir, name, &[("model", &model)]);
            let outcome = sft(&params, &mut c, stop_after).unwrap();
            (c, outcome)
        };
        let (straight, _) = run("straight", None);
        let (_, stopped) = run("resumed", Some(6));
        assert!(matches!(stopped, Ended::Stopped(6)));
        let checkpoints = Checkpoints::open(&dir.join("resumed/work/checkpoints"), 2).unwrap();
        assert_eq!(checkpoints.list().unwrap().iter().map(|c| c.0).collect::<Vec<_>>(), [4]);
        let (resumed, finished) = run("resumed", None);
        finished.finished().unwrap();

        let file = |c: &StageCtx, name: &str| std::fs::read(c.out.join(name)).unwrap();
        assert!(file(&straight, "model.safetensors") == file(&resumed, "model.safetensors"), "resumed weights differ");
        assert_eq!(file(&straight, "responses.jsonl"), file(&resumed, "responses.jsonl"));
        // q, v and up of 2 layers: A [4, 16] and B [16 or 64, 4].
        assert_eq!(straight.metrics()["trainable_params"], json!(2 * (4 * 16 * 3 + 4 * (16 + 16 + 64))));
        let names = |dir: &Path| {
            let mut names: Vec<String> =
                Tensor::read_safetensors(dir.join("model.safetensors")).unwrap().into_iter().map(|(n, _)| n).collect();
            names.sort();
            names
        };
        assert_eq!(names(&straight.out), names(&model), "the output is a plain model");
        let (tuned, base) = (ModelArtifact::open(&straight.out, Device::Cpu).unwrap(), ModelArtifact::open(&model, Device::Cpu).unwrap());
        let (tuned, base) = (tuned.vs.variables(), base.vs.variables());
        let changed = |name: &str| !tuned[name].equal(&base[name]);
        assert!(changed("transformer.h.0.attn.c_attn.weight") && changed("transformer.h.1.mlp.c_fc.weight"));
        assert!(!changed("transformer.h.0.attn.c_proj.weight") && !changed("transformer.wte.weight"), "frozen");
        assert!(!changed("transformer.h.0.attn.c_attn.bias"), "biases are frozen");
    }

    #[test]
    fn params_are_checked() {
        let p: Params = crate::params::<Sft>(json!({"trainable": {"lora": {}}})).unwrap();
        assert_eq!(p.trainable, Trainable::Lora(Lora::default()));
        assert!(Sft::check(&p, &[]).is_ok());
        let bad: Params = crate::params::<Sft>(json!({"trainable": {"lora": {"targets": ["qkv"]}}})).unwrap();
        assert_eq!(Sft::check(&bad, &[]).unwrap_err().path, ["trainable", "lora", "targets"]);
        let moved = crate::params::<Sft>(json!({"lora": {"rank": 4}})).unwrap_err();
        assert_eq!(moved.path, ["lora"]);
        assert!(moved.message.contains("trainable = { lora = {"), "{}", moved.message);
        let bad: Params = crate::params::<Sft>(json!({"split": [0.9, 0.1]})).unwrap();
        assert_eq!(Sft::check(&bad, &[]).unwrap_err().path, ["split"]);
        let bad: Params = crate::params::<Sft>(json!({"template": "A: "})).unwrap();
        assert_eq!(Sft::check(&bad, &[]).unwrap_err().path, ["template"]);
        assert!(crate::params::<Sft>(json!({"trainable": {"lora": {"rnak": 4}}})).is_err());
        assert_eq!(Sft::files(&Params::default()), ["data/instruct/instruction-data.json"]);
    }

    /// The default params on a real pretrained model artifact and the
    /// shipped instructions: `LLMFLOW_BASE_MODEL=path/to/pretrain/out cargo
    /// test --release --workspace --lib instruction_quality -- --ignored
    /// --nocapture` (`PARAMS` may override params as JSON; the output is
    /// moved to `LLMFLOW_OUT` if set, e.g. for `dpo`'s `preference_quality`).
    #[test]
    #[ignore = "a 90-second training run on a model artifact named by LLMFLOW_BASE_MODEL"]
    fn instruction_quality() {
        let _rng = torch_rng();
        let model = std::path::PathBuf::from(std::env::var("LLMFLOW_BASE_MODEL").expect("LLMFLOW_BASE_MODEL"));
        let tmp = tempfile::tempdir().unwrap();
        let mut c = ctx(tmp.path(), "sft", &[("model", &model)]);
        c.project_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let params: Params = crate::testing::params_from_env::<Sft>();
        sft(&params, &mut c, None).unwrap().finished().unwrap();
        for line in std::fs::read_to_string(c.out.join("responses.jsonl")).unwrap().lines().take(5) {
            eprintln!("{line}");
        }
        eprintln!("metrics: {}", serde_json::Value::Object(c.metrics().clone()));
        let (before, after) = (c.metrics()["val_loss_before"].as_f64().unwrap(), c.metrics()["val_loss"].as_f64().unwrap());
        assert!(after < before - 0.5, "{before} → {after}");
        if let Ok(keep) = std::env::var("LLMFLOW_OUT") {
            std::fs::rename(&c.out, keep).unwrap();
        }
    }
}
