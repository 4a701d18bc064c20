//! `pretrain`: train a GPT from scratch on token shards.
//!
//! ```toml
//! [stages.pretrain]
//! kind = "pretrain"
//! inputs = { data = "tokens", tokenizer = "tok" }
//! model = { arch = "gpt2", n_layer = 4, n_head = 4, d_model = 128, context = 128 }
//! train = { steps = 2000, batch_size = 16, lr = 1e-3, min_lr = 1e-4, warmup = 100 }
//! eval_every = 250
//! checkpoint_every = 250
//! samples = { count = 3, max_tokens = 200, prompt = "ROMEO:" }
//! ```
//!
//! Inputs: `data`, a `shard` artifact (train and val token streams), and
//! `tokenizer`, the `train_tokenizer` artifact they were encoded with.
//!
//! Params:
//! * `model`: a [`ModelConfig`]; `vocab_size` 0 (the default) takes the
//!   tokenizer's.
//! * `train`: a [`crate::train::Hyper`] — AdamW with decoupled weight decay on
//!   matrices only (or `optimizer = "muon"`: Muon for the blocks' matrices,
//!   [`crate::train::muon`]), linear warmup then cosine decay, global-norm
//!   clipping, gradient accumulation, `seed`.
//! * `eval_every` (125), `eval_batches` (20): validation loss every so many
//!   steps and at the end, over the first `eval_batches` batches of the val
//!   split (the same ones every time).
//! * `spike_factor` (3): an update whose loss exceeds this × the running mean
//!   is skipped and logged (`skipped: true`); 0 turns the guard off.
//! * `checkpoint_every` (100), `keep_checkpoints` (2), `log_every` (50; a line
//!   on stderr): volatile, they cannot change the result.
//! * `processes` (1), `zero` (0), `collective_timeout_s` (600): train as that
//!   many ranks, data-parallel through c10d, each on its slice of every
//!   batch, with AdamW's moments partitioned among them if `zero = 1`
//!   ([`crate::train::params`], [`crate::train::ranks`]); volatile: the weights agree with one
//!   process's to rounding. Validation batches are shared out among the
//!   ranks; rank 0 writes the output.
//! * `samples`: `count` texts of `max_tokens` tokens generated after training
//!   from `prompt` (empty: from `<|endoftext|>`), `temperature`, `top_k`.
//!
//! Output: `model.safetensors` (Hugging Face names), `config.json` (the
//! [`ModelConfig`]), `tokenizer.json`, `metrics.jsonl` (per step: `loss`, `lr`,
//! `grad_norm`, `tokens_per_s`; per evaluation: `val_loss`, `val_bpb`),
//! `loss.png` and `samples.txt`. Metrics: `train_loss` (last step),
//! `val_loss`, `val_bpb`, `tokens_per_s`, `params`, `wall_seconds`,
//! `skipped_steps`, `processes`, `optimizer_mb_per_rank` (the optimizer state a rank holds).
//!
//! Bits per byte: the summed loss (nats) of the evaluated targets over ln 2
//! and over the UTF-8 bytes those targets stand for. Each token's byte length
//! is read off the byte-level vocabulary (one character per byte);
//! special tokens such as `<|endoftext|>` count no bytes.
//!
//! Resume: a checkpoint (weights, optimizer state, step, loader position,
//! spike-guard state) is written to the work dir every `checkpoint_every`
//! steps. Running the stage again with the same work dir continues from the
//! latest one and, on the CPU, ends with weights bitwise equal to an
//! uninterrupted run's. libtorch's generator state cannot be read through
//! tch, so instead of saving it, dropout is reseeded before every micro-batch
//! from (seed, step, micro-batch). Setting `LLMFLOW_STOP_AFTER_STEP=N` makes
//! the stage fail right after step `N`, as if killed there, to exercise this.
//!
//! On CUDA the forward and backward passes run under bf16 autocast.
//!
//! On the CPU with more than one thread and no dropout, each batch is split
//! across the cores, one single-threaded model replica each
//! ([`crate::train::replicas`]), instead of spreading every operation over
//! libtorch's intra-op threads; the output head and the cross-entropy are one
//! hand-written step ([`Gpt::backward_lm`]). Both change the order of
//! floating-point sums, not the math: for a given thread count a run is
//! deterministic and resumes bitwise.
//!
//! The defaults (the model's 4 layers × 128 wide, context 128; 500 steps of
//! 16 sequences, lr 2e-3 → 2e-4) train in about 75 s on 2 CPU cores and
//! reach 2.54 bits per byte on tiny Shakespeare's last tenth with a 1024-token
//! vocabulary (nanoGPT's character-level CPU model: 2.71); see the test
//! `shakespeare_quality`.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{nn, Device, Tensor};
use tokenizers::Tokenizer;

use crate::data::loader::{Batch, Loader, Order, Position, Split};
use crate::formats::model::save_model;
use crate::formats::tokenizer;
use crate::model::{self, Gpt, ModelConfig};
use crate::sample::{complete, Sampling};
use crate::train::replicas::Replicas;
use crate::train::trainer::{self, Ended, Objective, Trainer};
use crate::train::{self, ranks, Hyper, Training};
use crate::{device, Inputs, ParamError, Stage, StageCtx};

pub struct Pretrain;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The network: `arch` (`gpt2` or `llama`) and its sizes; `vocab_size` 0 takes the tokenizer's.
    pub model: ModelConfig,
    /// AdamW or Muon, warmup then cosine decay, clipping, accumulation, seed.
    pub train: Hyper,
    /// Validation batches (the same ones every time) per evaluation.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub eval_batches: usize,
    #[serde(flatten)]
    pub training: Training,
    /// Texts generated from the trained model into `samples.txt`.
    pub samples: Samples,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Samples {
    /// How many texts.
    #[schemars(range(max = 10_000))]
    pub count: usize,
    /// New tokens per text.
    #[schemars(range(max = 1_048_576))]
    pub max_tokens: usize,
    /// 0 decodes greedily.
    #[schemars(range(min = 0, max = 100))]
    pub temperature: f64,
    /// Keep only the K most likely tokens (all if unset).
    #[schemars(range(min = 1, max = 10_000_000))]
    pub top_k: Option<usize>,
    /// Where each text starts; empty: a fresh document.
    pub prompt: String,
}

impl Default for Samples {
    fn default() -> Self {
        Samples { count: 3, max_tokens: 200, temperature: 0.8, top_k: Some(50), prompt: String::new() }
    }
}

impl Default for Params {
    fn default() -> Self {
        Params {
            model: ModelConfig::default(),
            train: Hyper::default(),
            eval_batches: 20,
            training: Training::default(),
            samples: Samples::default(),
        }
    }
}

impl Stage for Pretrain {
    const KIND: &'static str = "pretrain";
    const VERSION: u32 = 5;
    const SUMMARY: &'static str = "train a GPT from scratch on token shards (AdamW or Muon, cosine schedule, resumable)";
    const INPUTS: Inputs = Inputs::Fixed(&["data", "tokenizer"]);
    const VOLATILE: &'static [&'static str] = &train::VOLATILE;
    const MERGED: &'static [&'static str] = &train::MERGED;
    const SHOW: &'static [&'static str] = &["loss.png", "samples.txt", "metrics.jsonl"];
    const ESTIMATES: bool = true;
    type Params = Params;

    fn check(params: &Params, _inputs: &[String]) -> Result<(), ParamError> {
        params.training.check(&params.train)?;
        if params.samples.count > 0 && params.samples.max_tokens == 0 {
            return Err(ParamError::new(&["samples", "max_tokens"], "`max_tokens` must be at least 1"));
        }
        Ok(())
    }

    fn resources(params: &Params) -> crate::Resources {
        params.training.resources()
    }

    fn run(params: &Params, ctx: &mut StageCtx) -> Result<()> {
        trainer::run_stage(|stop_after| pretrain(params, ctx, stop_after))
    }

    fn estimate(params: &Params, ctx: &StageCtx) -> Result<Option<String>> {
        let config = match (params.model.vocab_size, ctx.inputs.get("tokenizer")) {
            (0, None) => {
                return Ok(Some(
                    "model.vocab_size comes from the tokenizer input, which is not built yet: build it first or set model.vocab_size"
                        .to_string(),
                ))
            }
            (0, Some(dir)) => model_config(&params.model, &tokenizer::load(dir)?)?,
            _ => params.model.clone(),
        };
        Ok(Some(estimate(&config, &params.train, &device::resolve(&ctx.device)?, ctx.threads)))
    }
}

/// Size, compute, memory and expected time of a training run. The time comes
/// from timing forward and backward passes of this very model on this
/// machine (one sequence, after a warm-up pass), so it is a pessimistic
/// bound: full batches use the cores better.
fn estimate(config: &ModelConfig, hyper: &Hyper, device: &Device, threads: usize) -> String {
    tch::set_num_threads(threads as i32);
    let (n, per_token) = (config.num_params(), config.flops_per_token());
    let tokens = hyper.tokens_per_step(config.context) as f64 * hyper.steps as f64;
    let total = per_token as f64 * tokens;
    let (state, activations) = train::memory(config, hyper);

    let vs = nn::VarStore::new(*device);
    let measured = Gpt::new(&vs.root(), config).map(|gpt| {
        let x = Tensor::zeros([1, config.context], (tch::Kind::Int64, *device));
        let pass = || {
            let started = Instant::now();
            let _loss = gpt.backward(&x, true, |h| model::loss(&gpt.logits(h), &x));
            started.elapsed().as_secs_f64()
        };
        pass();
        config.context as f64 / pass()
    });
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let mut out = format!(
        "parameters        {n} ({:.2} M)\n\
         FLOPs per token   {per_token} (6N + 12·n_layer·d_model·context)\n\
         tokens            {tokens} ({} steps × {} tokens)\n\
         total FLOPs       {total:.3e}\n\
         memory            {:.2} GiB (weights, gradients, optimizer state: {:.2} GiB; activations at batch {}: {:.2} GiB)\n",
        n as f64 / 1e6,
        hyper.steps,
        hyper.tokens_per_step(config.context),
        gib(state + activations),
        gib(state),
        hyper.batch_size,
        gib(activations),
    );
    match measured {
        Ok(tokens_per_s) => {
            out += &format!(
                "measured          {tokens_per_s:.0} tokens/s = {:.2} GFLOP/s on {device:?} with {threads} threads (one sequence)\n\
             expected time     {:.0} s at that rate\n",
                tokens_per_s * per_token as f64 / 1e9,
                tokens / tokens_per_s,
            )
        }
        Err(e) => out += &format!("measured          cannot build the model: {e:#}\n"),
    }
    out
}

/// The whole stage; `stop_after` ends the run after that step, as a kill would.
fn pretrain(params: &Params, ctx: &mut StageCtx, stop_after: Option<u64>) -> Result<Ended> {
    let started = Instant::now();
    let device = device::prepare(ctx)?;
    params.training.join(device)?;
    let hyper = &params.train;
    let tokenizer_dir = ctx.input("tokenizer")?.to_path_buf();
    let tokenizer = tokenizer::load(&tokenizer_dir)?;
    let config = model_config(&params.model, &tokenizer)?;
    train::check_memory(&config, hyper, device)?;
    let data = ctx.input("data")?.to_path_buf();
    let context = config.context as usize;
    let loader = Loader::new(Split::open(&data, "train")?, hyper.batch_size, context, Order::Random { seed: hyper.seed })?;
    let val = Evaluator::new(&data, &tokenizer, hyper.batch_size, context, params.eval_batches)?;

    tch::manual_seed(hyper.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let gpt = Gpt::new(&vs.root(), &config)?;
    if ranks::is_first() {
        eprintln!(
            "pretrain: {} parameters, {} steps of {} tokens on {device:?}, {} process(es) of {} threads",
            config.num_params(),
            hyper.steps,
            hyper.tokens_per_step(config.context),
            ranks::size(),
            ctx.threads
        );
    }
    let trainer = Trainer {
        tokens_per_step: Some(hyper.tokens_per_step(config.context)),
        ..Trainer::new("pretrain", &params.train, &params.training, stop_after)
    };
    // Dropout masks drawn on several threads at once would depend on scheduling.
    let replicas = if config.dropout > 0.0 { None } else { Replicas::new(&vs, &config, ctx.threads)? };
    if replicas.is_some() && ranks::is_first() {
        eprintln!("pretrain: each batch split across {} cores, one single-threaded model replica each", ctx.threads);
    }
    let task = &mut Pretraining { gpt: &gpt, loader, val, replicas, micro_batches: hyper.grad_accum };
    let trained = match trainer.run(ctx, &mut vs, task)? {
        Ended::Finished(trained) => trained,
        stopped => return Ok(stopped),
    };
    if !ranks::is_first() {
        return Ok(Ended::Finished(trained));
    }

    let out = ctx.out.clone();
    save_model(&out, &vs, &config, &tokenizer_dir)?;
    trained.write(&out, "pretrain: next-token loss", "nats/token")?;
    let samples = write_samples(&gpt, &tokenizer, &params.samples, hyper.seed)?;
    std::fs::write(out.join("samples.txt"), samples)?;

    ctx.metric("train_loss", trained.train_loss()?);
    ctx.metric("val_loss", &trained.last_eval["val_loss"]);
    ctx.metric("val_bpb", &trained.last_eval["val_bpb"]);
    ctx.metric("tokens_per_s", trained.tokens_per_s);
    ctx.metric("params", config.num_params());
    ctx.metric("wall_seconds", started.elapsed().as_secs_f64());
    ctx.metric("skipped_steps", trained.skipped);
    ctx.metric("processes", ranks::size());
    ctx.metric("optimizer_mb_per_rank", trained.optimizer_bytes as f64 / 1e6);
    Ok(Ended::Finished(trained))
}

/// Next-token prediction on the token stream, as an [`Objective`].
struct Pretraining<'a> {
    gpt: &'a Gpt,
    loader: Loader,
    val: Evaluator,
    /// Splits each batch across the CPU cores where that applies.
    replicas: Option<Replicas>,
    /// Micro-batches an update (`train.grad_accum`).
    micro_batches: usize,
}

impl Objective for Pretraining<'_> {
    fn backward(&mut self, _step: u64, micro: usize, scale: f64) -> Result<f64> {
        let (x, y) = tensors(&self.loader.next_batch(), self.gpt.device());
        // Every rank reads the whole batch and trains on its rows.
        let rows = x.size()[0] as usize;
        let (start, end) = ranks::rows(rows);
        let (x, y) = (x.narrow(0, start as i64, (end - start) as i64), y.narrow(0, start as i64, (end - start) as i64));
        let scale = scale * (end - start) as f64 / rows as f64;
        match &mut self.replicas {
            Some(replicas) => {
                let loss = replicas.backward(self.gpt, &x, &y, scale, train_pass)?;
                // Each slice's gradients summed over the update's micro-batches,
                // then the slices' in order: the sums ranks take, each rank a slice.
                if micro + 1 == self.micro_batches {
                    replicas.add_gradients()?;
                }
                Ok(loss)
            }
            None => Ok(train_pass(self.gpt, &x, &y, scale)),
        }
    }

    fn evaluate(&mut self, _step: u64) -> Result<serde_json::Map<String, serde_json::Value>> {
        let (val_loss, bpb) = self.val.evaluate(self.gpt, self.replicas.as_mut())?;
        Ok(serde_json::Map::from_iter([("val_loss".into(), json!(val_loss)), ("val_bpb".into(), json!(bpb))]))
    }

    fn state(&self) -> serde_json::Value {
        json!(self.loader.position())
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<()> {
        self.loader.seek(serde_json::from_value::<Position>(state).context("the checkpoint's loader position")?);
        Ok(())
    }
}

/// A training pass on a batch or a slice of one ([`crate::train::replicas::Pass`]):
/// `weight` × the next-token loss, gradients accumulated; bf16 autocast on CUDA.
fn train_pass(gpt: &Gpt, x: &Tensor, y: &Tensor, weight: f64) -> f64 {
    tch::autocast(gpt.device().is_cuda(), || gpt.backward_lm(x, y, weight)).double_value(&[])
}

/// A validation pass: `weight` × the mean next-token loss, no gradients.
fn val_pass(gpt: &Gpt, x: &Tensor, y: &Tensor, weight: f64) -> f64 {
    let loss = tch::no_grad(|| tch::autocast(gpt.device().is_cuda(), || model::loss(&gpt.forward(x, false), y)));
    loss.double_value(&[]) * weight
}

/// `model` with the tokenizer's vocabulary size filled in (or checked).
fn model_config(model: &ModelConfig, tokenizer: &Tokenizer) -> Result<ModelConfig> {
    let vocab = tokenizer.get_vocab_size(true) as i64;
    let mut config = model.clone();
    if config.vocab_size == 0 {
        config.vocab_size = vocab;
    }
    ensure!(config.vocab_size >= vocab, "model.vocab_size is {}, but the tokenizer has {vocab} tokens", config.vocab_size);
    Ok(config)
}

fn tensors(batch: &Batch, device: Device) -> (Tensor, Tensor) {
    let shape = [batch.batch_size as i64, batch.context as i64];
    let x = Tensor::from_slice(&batch.x).view(shape).to_device(device);
    let y = Tensor::from_slice(&batch.y).view(shape).to_device(device);
    (x, y)
}

/// Validation loss and bits per byte over a fixed set of val batches.
struct Evaluator {
    batches: Vec<Batch>,
    /// UTF-8 bytes the targets of all batches stand for.
    bytes: f64,
}

impl Evaluator {
    fn new(data: &Path, tokenizer: &Tokenizer, batch_size: usize, context: usize, max_batches: usize) -> Result<Evaluator> {
        let split = Split::open(data, "val")?;
        let windows = split.len().saturating_sub(1) as usize / context;
        ensure!(windows > 0, "{}: the val split has {} tokens, too few for one window of {context}", data.display(), split.len());
        // Never more batches than the split holds, so no window counts twice.
        let batch_size = batch_size.min(windows);
        let count = max_batches.min(windows / batch_size);
        let mut loader = Loader::new(split, batch_size, context, Order::Sequential)?;
        let batches: Vec<Batch> = (0..count).map(|_| loader.next_batch()).collect();
        let lengths = token_bytes(tokenizer);
        let bytes = batches.iter().flat_map(|b| &b.y).map(|&t| lengths.get(t as usize).copied().unwrap_or(0) as f64).sum();
        Ok(Evaluator { batches, bytes })
    }

    /// (mean loss in nats per token, bits per byte); each batch split across
    /// the cores when training is.
    fn evaluate(&self, gpt: &Gpt, mut replicas: Option<&mut Replicas>) -> Result<(f64, f64)> {
        let mut nats = 0.0;
        let mut tokens = 0.0;
        // Across ranks, each takes every so many batches, and the sums are added up.
        for batch in ranks::interleaved(&self.batches) {
            let (x, y) = tensors(batch, gpt.device());
            let loss = match replicas.as_deref_mut() {
                Some(r) => r.map(gpt, &x, &y, 1.0, val_pass)?,
                None => val_pass(gpt, &x, &y, 1.0),
            };
            nats += loss * batch.y.len() as f64;
            tokens += batch.y.len() as f64;
        }
        let sums = ranks::sum(&[nats, tokens])?;
        let (nats, tokens) = (sums[0], sums[1]);
        Ok((nats / tokens, nats / std::f64::consts::LN_2 / self.bytes.max(1.0)))
    }
}

/// The UTF-8 length of every token id: byte-level BPE writes one character
/// per byte; added (special) tokens stand for no text.
fn token_bytes(tokenizer: &Tokenizer) -> Vec<u32> {
    let mut lengths = vec![0; tokenizer.get_vocab_size(true)];
    let special = tokenizer.get_added_tokens_decoder();
    for (token, id) in tokenizer.get_vocab(true) {
        if !special.contains_key(&id) {
            lengths[id as usize] = token.chars().count() as u32;
        }
    }
    lengths
}

/// `samples.count` generated texts, separated by rules.
fn write_samples(gpt: &Gpt, tokenizer: &Tokenizer, samples: &Samples, seed: u64) -> Result<String> {
    let mut text = String::new();
    for i in 0..samples.count {
        let sampling = Sampling {
            max_tokens: samples.max_tokens,
            temperature: samples.temperature,
            top_k: samples.top_k,
            top_p: None,
            seed: seed.wrapping_add(i as u64),
        };
        text += &format!("──── sample {} ────\n{}\n\n", i + 1, complete(gpt, tokenizer, &samples.prompt, &sampling)?);
    }
    Ok(text)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::testing::torch_rng;
    use crate::train::trainer::METRICS_FILE;
    use crate::train::Checkpoints;

    const MODEL_FILE: &str = "model.safetensors";

    use crate::formats::tokenizer::BatchEncoder;
    use crate::formats::tokenizer::END_OF_TEXT;
    use crate::formats::tokens::{Manifest, ShardInfo, ShardWriter, SplitInfo, Width};
    use crate::testing::{corpus, ctx, run_kind, write_docs};

    /// A tokenizer artifact trained on `text`'s paragraphs; returns its directory.
    fn tokenizer(dir: &Path, text: &str, vocab_size: usize) -> PathBuf {
        write_docs(&dir.join("docs"), "corpus", text);
        crate::testing::tokenizer_artifact(&dir.join("docs"), &dir.join("tok"), serde_json::json!({"vocab_size": vocab_size}));
        dir.join("tok")
    }

    fn tiny() -> Params {
        crate::params::<Pretrain>(json!({
            "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "context": 32, "dropout": 0.1},
            "train": {"steps": 12, "batch_size": 4, "grad_accum": 2, "warmup": 3, "lr": 3e-3},
            "eval_every": 5, "eval_batches": 2, "checkpoint_every": 4, "log_every": 100,
            "samples": {"count": 2, "max_tokens": 16, "prompt": "ROMEO:"},
        }))
        .unwrap()
    }

    /// Train rows of metrics.jsonl without the timing.
    fn losses(out: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join(METRICS_FILE))
            .unwrap()
            .lines()
            .map(|l| {
                let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
                row.as_object_mut().unwrap().remove("tokens_per_s");
                row
            })
            .collect()
    }

    /// The contexts of a run never interrupted and of one stopped after step
    /// 6 and resumed, of `params` on a small corpus in `dir`; asserts that
    /// they end bitwise equal.
    fn straight_and_resumed(dir: &Path, params: &Params) -> (StageCtx, StageCtx) {
        let text = &corpus("tinyshakespeare.txt")[..60_000];
        let tok = tokenizer(dir, text, 300);
        let shard_ctx = ctx(dir, "tokens", &[("docs", &dir.join("docs")), ("tokenizer", &tok)]);
        let shard_ctx = run_kind("shard", serde_json::json!({}), shard_ctx);
        let inputs = [("data", shard_ctx.out.as_path()), ("tokenizer", tok.as_path())];

        let mut straight = ctx(dir, "straight", &inputs);
        assert!(matches!(pretrain(params, &mut straight, None).unwrap(), Ended::Finished(_)));

        // Killed after step 6: the checkpoint of step 4 is the latest, steps 5
        // and 6 are done again.
        let mut resumed = ctx(dir, "resumed", &inputs);
        assert!(matches!(pretrain(params, &mut resumed, Some(6)).unwrap(), Ended::Stopped(6)));
        let steps: Vec<u64> =
            Checkpoints::open(&resumed.work.join("checkpoints"), 2).unwrap().list().unwrap().iter().map(|c| c.0).collect();
        assert_eq!(steps, [4]);
        assert!(matches!(pretrain(params, &mut resumed, None).unwrap(), Ended::Finished(_)));

        assert!(weights(&straight) == weights(&resumed), "resumed weights differ");
        assert_eq!(losses(&straight.out), losses(&resumed.out));
        assert_eq!(losses(&straight.out).len(), 12 + 3, "a row per step and per evaluation (5, 10, 12)");
        assert_eq!(std::fs::read(straight.out.join("samples.txt")).unwrap(), std::fs::read(resumed.out.join("samples.txt")).unwrap());
        (straight, resumed)
    }

    fn weights(c: &StageCtx) -> Vec<u8> {
        std::fs::read(c.out.join(MODEL_FILE)).unwrap()
    }

    #[test]
    fn resumed_run_ends_bitwise_equal_to_an_uninterrupted_one() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let (straight, _) = straight_and_resumed(tmp.path(), &tiny());

        // The outputs of a finished run.
        let out = &straight.out;
        let config: ModelConfig = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config.vocab_size, 300);
        tokenizer::load(out).unwrap();
        let mut vs = nn::VarStore::new(Device::Cpu);
        Gpt::new(&vs.root(), &config).unwrap();
        vs.load(out.join(MODEL_FILE)).unwrap();
        assert_eq!(&std::fs::read(out.join("loss.png")).unwrap()[1..4], b"PNG");
        let samples = std::fs::read_to_string(out.join("samples.txt")).unwrap();
        assert_eq!(samples.matches("ROMEO:").count(), 2, "{samples}");
        let metrics = straight.metrics();
        let (first, last) = (losses(out)[0]["loss"].as_f64().unwrap(), metrics["train_loss"].as_f64().unwrap());
        assert!(last < first - 0.5, "the loss falls: {first} → {last}");
        let (val_loss, bpb) = (metrics["val_loss"].as_f64().unwrap(), metrics["val_bpb"].as_f64().unwrap());
        // The evaluated text's bytes per token, about the 1.39 of the whole split.
        let bytes_per_token = val_loss / std::f64::consts::LN_2 / bpb;
        assert!((1.2..1.6).contains(&bytes_per_token), "{metrics:?}");
        assert_eq!(metrics["params"], config.num_params());
    }

    /// Muon: the loss falls, and a resumed run (its momentum buffers in the
    /// checkpoint) ends bitwise equal.
    #[test]
    fn muon_trains_and_resumes_bitwise() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let mut params = tiny();
        params.train.optimizer = crate::train::OptimizerName::Muon;
        let (straight, _) = straight_and_resumed(tmp.path(), &params);
        let (first, last) = (losses(&straight.out)[0]["loss"].as_f64().unwrap(), straight.metrics()["train_loss"].as_f64().unwrap());
        assert!(last < first - 0.5, "the loss falls: {first} → {last}");
    }

    #[test]
    fn an_unknown_optimizer_or_muon_settings_under_adamw_are_errors_naming_the_field() {
        let unknown = crate::params::<Pretrain>(json!({"train": {"optimizer": "sgd"}})).unwrap_err();
        assert_eq!(unknown.path, ["train", "optimizer"]);
        assert!(unknown.message.contains("adamw") && unknown.message.contains("muon"), "{}", unknown.message);
        let stray = crate::params::<Pretrain>(json!({"train": {"muon": {"lr": 0.01}}})).unwrap();
        let err = Pretrain::check(&stray, &[]).unwrap_err();
        assert_eq!(err.path, ["train", "muon"]);
        assert!(err.message.contains("optimizer = \"muon\""), "{}", err.message);
        let typo = crate::params::<Pretrain>(json!({"train": {"optimizer": "muon", "muon": {"nesterow": false}}})).unwrap_err();
        assert_eq!(typo.path, ["train", "muon", "nesterow"]);
    }

    #[test]
    fn bits_per_byte_count_token_bytes_but_not_special_tokens() {
        let tmp = tempfile::tempdir().unwrap();
        let tok = tokenizer::load(&tokenizer(tmp.path(), &corpus("tinyshakespeare.txt")[..20_000], 300)).unwrap();
        let lengths = token_bytes(&tok);
        let text = "First Citizen: Before we proceed, any further — hear me speak.";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids.iter().map(|&id| lengths[id as usize] as usize).sum::<usize>(), text.len());
        assert_eq!(lengths[tok.token_to_id(END_OF_TEXT).unwrap() as usize], 0);
    }

    #[test]
    fn params_are_checked_and_volatile_ones_listed() {
        let bad = Params { training: Training { spike_factor: 0.5, ..Default::default() }, ..Default::default() };
        assert_eq!(Pretrain::check(&bad, &[]).unwrap_err().path, ["spike_factor"]);
        assert_eq!(crate::params::<Pretrain>(json!({"train": {"steps": 0}})).unwrap_err().path, ["train", "steps"]);
        assert!(crate::params::<Pretrain>(json!({"train": {"stpes": 1}})).is_err());
        assert!(Pretrain::VOLATILE.contains(&"log_every"));
        // Unset, the optimizer stays out of the params that key the stage:
        // keys from before Muon are unchanged.
        let train = &serde_json::to_value(Params::default()).unwrap()["train"];
        assert!(train.get("optimizer").is_none() && train.get("muon").is_none(), "{train}");
    }

    /// Tiny Shakespeare with the last tenth of the text as validation, at the
    /// default params: run with `cargo test --release -p llmflow-stages
    /// shakespeare_quality -- --ignored --nocapture`.
    #[test]
    #[ignore = "a 90-second training run"]
    fn shakespeare_quality() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let text = corpus("tinyshakespeare.txt");
        let cut = text.len() * 9 / 10;
        let cut = (cut..text.len()).find(|&i| text.is_char_boundary(i)).unwrap();
        let (train, val) = text.split_at(cut);
        let vocab_size: usize = std::env::var("VOCAB").map_or(1024, |v| v.parse().unwrap());
        let tok_dir = tokenizer(dir, train, vocab_size);
        let tok = tokenizer::load(&tok_dir).unwrap();
        let data = dir.join("tokens");
        std::fs::create_dir_all(&data).unwrap();
        let encoder = BatchEncoder::new(&tok).unwrap();
        let width = Width::for_vocab(vocab_size);
        let split = |name: &str, text: &str| {
            let file = format!("{name}_000000.bin");
            let mut w = ShardWriter::create(&data.join(&file), width).unwrap();
            w.write(&encoder.encode(&[text]).unwrap()[0]).unwrap();
            let tokens = w.finish().unwrap();
            SplitInfo { documents: 1, tokens, shards: vec![ShardInfo { file, tokens }] }
        };
        let (train, val) = (split("train", train), split("val", val));
        let eot = tok.token_to_id(END_OF_TEXT).unwrap();
        Manifest { vocab_size, width, eot, train, val }.write(&data).unwrap();

        let params = crate::testing::params_from_env::<Pretrain>();
        let mut c = ctx(dir, "pretrain", &[("data", &data), ("tokenizer", &tok_dir)]);
        pretrain(&params, &mut c, None).unwrap();
        eprintln!("{}", std::fs::read_to_string(c.out.join("samples.txt")).unwrap());
        eprintln!("metrics: {}", serde_json::Value::Object(c.metrics().clone()));
        let bpb = c.metrics()["val_bpb"].as_f64().unwrap();
        assert!(bpb < 2.71, "val bits/byte {bpb}");
    }
}
