//! `classify`: fine-tune a GPT to classify texts (Raschka, *Build a Large
//! Language Model (From Scratch)*, ch. 6: spam detection).
//!
//! ```toml
//! [stages.spam]
//! kind = "classify"
//! input = "pretrain"
//! data = "data/instruct/spamassassin.jsonl.gz"
//! split = [0.7, 0.1, 0.2]              # train, validation, test
//! max_tokens = 128
//! positive = "spam"
//! trainable = { last_blocks = 4 }
//! train = { steps = 150, batch_size = 16, lr = 1e-3 }
//! ```
//!
//! Input `model`: a model artifact (`pretrain`, `sft`). Data: JSON Lines or
//! a JSON array (optionally `.gz`) of records with a `label` and a `text`
//! (other fields are ignored); the file is part of the stage's key. The
//! classes are the distinct labels in sorted order.
//!
//! Each text becomes its first `max_tokens` − 1 tokens followed by
//! `<|endoftext|>`, whose hidden state a linear head reads ([`HeadModel`], one
//! output per class), trained with cross-entropy. With `mail = true` (the
//! default) texts are raw mails and only the subject and body are kept
//! ([`strip_headers`]): the start of a mail is its routing headers, which
//! would fill the context and say more about the corpus's mail servers than
//! about spam.
//!
//! Split: balanced, as Raschka's spam example is — every class is
//! undersampled to the size of the smallest, and each class's kept records
//! are split by `split` ([`Split::balanced`], seeded by
//! `train.seed`), so train, validation and test each hold the classes in
//! equal numbers and the majority-class baseline is 1 / classes.
//!
//! Params:
//! * `data` (`data/instruct/spamassassin.jsonl.gz`), relative to the project.
//! * `mail` (true): strip mail headers down to the subject.
//! * `split` (`[0.7, 0.1, 0.2]`): train, validation and test fractions.
//! * `max_tokens` (128): tokens per text, the end token included; at most
//!   the model's context.
//! * `positive` (`spam`): the class whose precision, recall and F1 are the
//!   stage's metrics (every class's are in `results.json`).
//! * `trainable` (`{ last_blocks = 4 }`): which weights of the body train,
//!   as in `sft` (see [`crate::train::finetune`]); the head always does. On the default
//!   4-layer model, every weight.
//! * `train`: a [`Hyper`] (defaults: 150 steps of 16 texts, lr 1e-3 → 1e-4,
//!   warmup 15, weight decay 0.01); `eval_every` (50), `spike_factor` (0:
//!   off, since once most texts are classified right, a batch of hard ones
//!   legitimately costs several times the running mean), `checkpoint_every`,
//!   `keep_checkpoints`, `log_every` as in `pretrain`; `processes`, `zero`,
//!   `collective_timeout_s` as in `pretrain`, each rank on its texts of
//!   every batch.
//!
//! Output: the classifier artifact (`model.safetensors` with `score.weight`,
//! `config.json`, `tokenizer.json`, `head.json` with the labels),
//! `results.json` (test accuracy, baseline, per-class precision, recall, F1
//! and support, macro averages, the confusion matrix with rows the true
//! class and columns the predicted one), `metrics.jsonl` (per evaluation
//! `val_loss`, `val_accuracy`) and `loss.png`. Metrics: `test_accuracy`,
//! `baseline_accuracy` (the majority class's share of the test split),
//! `test_precision`, `test_recall`, `test_f1` (of `positive`),
//! `test_confusion`, `val_accuracy`, `train_loss`, `train_examples`,
//! `test_examples`, `wall_seconds`, `skipped_steps`.
//!
//! The defaults reach a test accuracy of about 0.95 (758 mails, baseline
//! 0.5) on the shipped SpamAssassin set from the default pipeline's
//! pretrained model, in about 35 s on 2 CPU cores (see the test
//! `spam_quality`).

use std::time::Instant;

use anyhow::{anyhow, ensure, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};
use tokenizers::Tokenizer;

use crate::data::records::{self, Split};
use crate::data::sequences::{pad, Sequence};
use crate::formats::tokenizer::END_OF_TEXT;
use crate::train::finetune::Trainable;
use crate::train::last_token::{Head, HeadModel};
use crate::train::trainer::{self, batch_indices, Ended, Objective, Trainer};
use crate::train::{self, ranks, Hyper, Training};
use crate::{device, Inputs, ParamError, Stage, StageCtx};

pub struct Classify;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The labeled texts: JSON Lines or a JSON array (optionally .gz) of `{ label, text }`, relative to the pipeline.
    pub data: String,
    /// Texts are raw mails: keep only the subject and body.
    pub mail: bool,
    /// Train, validation and test fractions, each class undersampled to the smallest.
    pub split: Vec<f64>,
    /// Tokens per text, the end token included; at most the model's context.
    #[schemars(range(min = 2, max = 1_048_576))]
    pub max_tokens: usize,
    /// The class whose precision, recall and F1 are the stage's metrics.
    pub positive: String,
    pub trainable: Trainable,
    pub train: Hyper,
    #[serde(flatten)]
    pub training: Training,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            data: "data/instruct/spamassassin.jsonl.gz".into(),
            mail: true,
            split: vec![0.7, 0.1, 0.2],
            max_tokens: 128,
            positive: "spam".into(),
            trainable: Trainable::LastBlocks(4),
            train: Hyper { steps: 150, batch_size: 16, lr: 1e-3, min_lr: 1e-4, warmup: 15, weight_decay: 0.01, ..Hyper::default() },
            training: Training { eval_every: 50, spike_factor: 0.0, ..Training::default() },
        }
    }
}

/// A labeled text.
#[derive(Debug, Clone, Deserialize)]
pub struct Labeled {
    pub label: String,
    pub text: String,
}

impl Stage for Classify {
    const KIND: &'static str = "classify";
    const VERSION: u32 = 4;
    const SUMMARY: &'static str = "fine-tune a GPT with a last-token head to classify texts (spam detection)";
    const INPUTS: Inputs = Inputs::Fixed(&["model"]);
    const VOLATILE: &'static [&'static str] = &train::VOLATILE;
    const MERGED: &'static [&'static str] = &train::MERGED;
    const SHOW: &'static [&'static str] = &["results.json", "loss.png", "metrics.jsonl"];
    type Params = Params;

    fn check(params: &Params, _inputs: &[String]) -> Result<(), ParamError> {
        params.training.check(&params.train)?;
        params.trainable.check()?;
        records::check_split(&params.split, &["train", "validation", "test"])?;
        if params.data.is_empty() {
            return Err(ParamError::new(&["data"], "`data` must name a labeled file"));
        }
        Ok(())
    }

    fn files(params: &Params) -> Vec<String> {
        vec![params.data.clone()]
    }

    fn resources(params: &Params) -> crate::Resources {
        params.training.resources()
    }

    fn run(params: &Params, ctx: &mut StageCtx) -> Result<()> {
        trainer::run_stage(|stop_after| train(params, ctx, stop_after))
    }
}

/// The subject and body of a raw mail, as `Subject: …\n\n<body>`; the other
/// headers (everything before the first empty line) are dropped and a
/// folded subject is unfolded. A text that does not start with a header line
/// is returned as it is.
pub fn strip_headers(mail: &str) -> String {
    let mail = mail.replace("\r\n", "\n");
    let (header, body) = mail.split_once("\n\n").unwrap_or((&mail, ""));
    let is_header = |line: &str| {
        line.starts_with("From ")
            || line.split_once(':').is_some_and(|(name, _)| !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()))
    };
    if !header.lines().next().is_some_and(is_header) {
        return mail.trim().to_string();
    }
    let mut lines = header.lines().peekable();
    let mut subject = None;
    while let Some(line) = lines.next() {
        if line.get(..8).is_some_and(|name| name.eq_ignore_ascii_case("subject:")) {
            let mut s = line[8..].trim().to_string();
            while let Some(folded) = lines.next_if(|l| l.starts_with([' ', '\t'])) {
                s = format!("{s} {}", folded.trim());
            }
            subject = Some(s);
            break;
        }
    }
    match subject {
        Some(s) => format!("Subject: {s}\n\n{}", body.trim()),
        None => body.trim().to_string(),
    }
}

/// The first `n` token ids of `text` without tokenizing all of a long one:
/// a prefix cut just before a whitespace that follows a non-whitespace
/// character ends a pre-token in the text too, so it tokenizes as the
/// text's start does; the prefix grows until it yields `n` tokens.
pub fn leading_ids(tokenizer: &Tokenizer, text: &str, n: usize) -> Result<Vec<i64>> {
    let mut budget = 8 * n;
    loop {
        let from = (budget.min(text.len())..=text.len()).find(|&i| text.is_char_boundary(i)).expect("the end is a boundary");
        let tail = &text[from..];
        let cut = tail
            .char_indices()
            .zip(tail.chars().skip(1))
            .find(|&((_, a), b)| !a.is_whitespace() && b.is_whitespace())
            .map_or(text.len(), |((i, a), _)| from + i + a.len_utf8());
        let encoding = tokenizer.encode(&text[..cut], false).map_err(|e| anyhow!("cannot tokenize: {e}"))?;
        if encoding.len() >= n || cut == text.len() {
            return Ok(encoding.get_ids().iter().take(n).map(|&id| i64::from(id)).collect());
        }
        budget *= 4;
    }
}

/// Counts of (true class, predicted class).
#[derive(Debug, Clone, PartialEq)]
pub struct Confusion {
    /// counts[truth][predicted]
    pub counts: Vec<Vec<u64>>,
}

impl Confusion {
    pub fn new(classes: usize, truth: &[usize], predicted: &[usize]) -> Confusion {
        let mut counts = vec![vec![0; classes]; classes];
        for (&t, &p) in truth.iter().zip(predicted) {
            counts[t][p] += 1;
        }
        Confusion { counts }
    }

    fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    pub fn accuracy(&self) -> f64 {
        let right: u64 = (0..self.counts.len()).map(|c| self.counts[c][c]).sum();
        ratio(right, self.total())
    }

    /// Of the texts predicted `class`, the share that are; 0 when none is.
    pub fn precision(&self, class: usize) -> f64 {
        ratio(self.counts[class][class], self.counts.iter().map(|row| row[class]).sum())
    }

    /// Of the texts of `class`, the share predicted so; 0 when none is.
    pub fn recall(&self, class: usize) -> f64 {
        ratio(self.counts[class][class], self.counts[class].iter().sum())
    }

    /// The harmonic mean of precision and recall; 0 when both are.
    pub fn f1(&self, class: usize) -> f64 {
        let (p, r) = (self.precision(class), self.recall(class));
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }

    /// The share of the most frequent true class: always predicting it
    /// scores this.
    pub fn majority_baseline(&self) -> f64 {
        ratio(self.counts.iter().map(|row| row.iter().sum()).max().unwrap_or(0), self.total())
    }

    /// Everything, per class and macro-averaged, as `results.json` holds it.
    pub fn report(&self, labels: &[String]) -> Value {
        let classes = 0..labels.len();
        let per_class: Map<String, Value> = classes
            .clone()
            .map(|c| {
                let support: u64 = self.counts[c].iter().sum();
                let row = json!({"precision": self.precision(c), "recall": self.recall(c), "f1": self.f1(c), "support": support});
                (labels[c].clone(), row)
            })
            .collect();
        let macro_avg = |f: &dyn Fn(usize) -> f64| classes.clone().map(f).sum::<f64>() / labels.len() as f64;
        json!({
            "accuracy": self.accuracy(),
            "baseline_accuracy": self.majority_baseline(),
            "examples": self.total(),
            "classes": per_class,
            "macro": {
                "precision": macro_avg(&|c| self.precision(c)),
                "recall": macro_avg(&|c| self.recall(c)),
                "f1": macro_avg(&|c| self.f1(c)),
            },
            "labels": labels,
            "confusion": self.counts,
        })
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Texts tokenized for the head, with their class.
struct Examples {
    sequences: Vec<Sequence>,
    classes: Vec<usize>,
}

impl Examples {
    fn pick(all: &Examples, part: &[usize]) -> Examples {
        Examples {
            sequences: part.iter().map(|&i| all.sequences[i].clone()).collect(),
            classes: part.iter().map(|&i| all.classes[i]).collect(),
        }
    }

    /// Predicted classes and the mean cross-entropy.
    /// Across ranks, each scores its share of the texts.
    fn predict(&self, head: Head, batch_size: usize) -> Result<(Vec<usize>, f64)> {
        let (n, classes) = (self.sequences.len(), head.score.size()[0] as usize);
        let logits = ranks::rows_of(n, classes, |rows| {
            Ok(Vec::<f64>::try_from(head.scores(&self.sequences[rows], batch_size).to_kind(Kind::Double).view([-1]))?)
        })?;
        let logits = Tensor::from_slice(&logits).to_kind(Kind::Float).view([n as i64, classes as i64]);
        let targets = Tensor::from_slice(&self.classes.iter().map(|&c| c as i64).collect::<Vec<_>>());
        let loss = logits.cross_entropy_for_logits(&targets).double_value(&[]);
        let predicted = Vec::<i64>::try_from(logits.argmax(-1, false)).expect("1-D int64");
        Ok((predicted.into_iter().map(|c| c as usize).collect(), loss))
    }
}

fn train(params: &Params, ctx: &mut StageCtx, stop_after: Option<u64>) -> Result<Ended> {
    let started = Instant::now();
    let device = device::prepare(ctx)?;
    params.training.join(device)?;
    let model_dir = ctx.input("model")?.to_path_buf();
    let data = ctx.project_path(&params.data);
    let records: Vec<Labeled> = records::read(&data).with_context(|| "the labeled data (param `data`)")?;
    let mut labels: Vec<String> = records.iter().map(|r| r.label.clone()).collect();
    labels.sort_unstable();
    labels.dedup();
    ensure!(labels.len() >= 2, "{}: every record has the label {:?}; a classifier needs two classes", data.display(), labels);
    let positive = labels.iter().position(|l| *l == params.positive).with_context(|| {
        format!("param `positive`: {:?} is not a label of {} (labels: {})", params.positive, data.display(), labels.join(", "))
    })?;
    let classes: Vec<usize> = records.iter().map(|r| labels.binary_search(&r.label).expect("a known label")).collect();
    let parts = Split::new(&params.split, params.train.seed).balanced(&classes, labels.len());

    let mut scorer = HeadModel::from_model(&model_dir, labels.clone(), &params.trainable, device, params.train.seed)?;
    crate::train::check_memory(scorer.model.gpt.config(), &params.train, device)?;
    let context = scorer.model.gpt.config().context as usize;
    ensure!(params.max_tokens <= context, "param `max_tokens` is {}, above the model's context of {context}", params.max_tokens);
    let eot = i64::from(scorer.model.tokenizer.token_to_id(END_OF_TEXT).context("the model's tokenizer has no <|endoftext|>")?);
    // Only the records of some part are tokenized: the undersampled rest is never read.
    let mut used: Vec<usize> = parts.concat();
    used.sort_unstable();
    let mut sequences = vec![Sequence::new(&[], &[]); records.len()];
    for &i in &used {
        let text = if params.mail { strip_headers(&records[i].text) } else { records[i].text.clone() };
        let mut ids = leading_ids(&scorer.model.tokenizer, &text, params.max_tokens - 1)?;
        ids.push(eot);
        sequences[i] = Sequence::new(&ids, &[]);
    }
    let all = Examples { sequences, classes };
    let (train_set, val, test) = (Examples::pick(&all, &parts[0]), Examples::pick(&all, &parts[1]), Examples::pick(&all, &parts[2]));
    ensure!(
        !train_set.classes.is_empty() && !val.classes.is_empty() && !test.classes.is_empty(),
        "{}: too few records of the rarest class to split {:?}",
        data.display(),
        params.split
    );
    eprintln!(
        "classify: {} classes; {} train, {} validation, {} test texts; {} steps of {} on {device:?}, {} threads",
        labels.len(),
        train_set.classes.len(),
        val.classes.len(),
        test.classes.len(),
        params.train.steps,
        params.train.batch_size * params.train.grad_accum,
        ctx.threads
    );

    let (vs, head) = scorer.parts();
    let mut task = Classification { head, hyper: &params.train, train: train_set, val };
    let trainer = Trainer::new("classify", &params.train, &params.training, stop_after);
    let trained = match trainer.run(ctx, vs, &mut task)? {
        Ended::Finished(trained) => trained,
        stopped => return Ok(stopped),
    };
    let (predicted, _) = test.predict(task.head, params.train.batch_size * 2)?;
    if !ranks::is_first() {
        return Ok(Ended::Finished(trained));
    }
    let confusion = Confusion::new(labels.len(), &test.classes, &predicted);
    let train_examples = task.train.classes.len();

    scorer.save(&ctx.out, &model_dir)?;
    trained.write(&ctx.out, "classify: cross-entropy", "nats/example")?;
    std::fs::write(ctx.out.join("results.json"), serde_json::to_string_pretty(&confusion.report(&labels))? + "\n")?;
    ctx.metric("test_accuracy", confusion.accuracy());
    ctx.metric("baseline_accuracy", confusion.majority_baseline());
    ctx.metric("test_precision", confusion.precision(positive));
    ctx.metric("test_recall", confusion.recall(positive));
    ctx.metric("test_f1", confusion.f1(positive));
    ctx.metric("test_confusion", &confusion.counts);
    ctx.metric("val_accuracy", &trained.last_eval["val_accuracy"]);
    ctx.metric("train_loss", trained.train_loss()?);
    ctx.metric("train_examples", train_examples);
    ctx.metric("test_examples", test.classes.len());
    ctx.metric("wall_seconds", started.elapsed().as_secs_f64());
    ctx.metric("skipped_steps", trained.skipped);
    Ok(Ended::Finished(trained))
}

/// Labeled texts as an [`Objective`].
struct Classification<'a> {
    head: Head<'a>,
    hyper: &'a Hyper,
    train: Examples,
    val: Examples,
}

impl Objective for Classification<'_> {
    fn backward(&mut self, step: u64, micro: usize, scale: f64) -> Result<f64> {
        // This rank's examples; the loss is a mean over examples.
        let (picked, share) = ranks::share(batch_indices(self.train.classes.len(), self.hyper, step, micro), |_| 1.0);
        let scale = scale * share;
        let seqs: Vec<Sequence> = picked.iter().map(|&i| self.train.sequences[i].clone()).collect();
        let device = self.head.gpt.device();
        let targets: Vec<i64> = picked.iter().map(|&i| self.train.classes[i] as i64).collect();
        let targets = Tensor::from_slice(&targets).to_device(device);
        let loss =
            self.head.backward(&pad(&seqs, 0, device), |logits| logits.to_kind(Kind::Float).cross_entropy_for_logits(&targets) * scale);
        Ok(loss.double_value(&[]))
    }

    fn evaluate(&mut self, _step: u64) -> Result<Map<String, Value>> {
        let (predicted, loss) = self.val.predict(self.head, self.hyper.batch_size * 2)?;
        let right = predicted.iter().zip(&self.val.classes).filter(|(p, t)| p == t).count();
        Ok(Map::from_iter([("val_loss".into(), json!(loss)), ("val_accuracy".into(), json!(right as f64 / predicted.len() as f64))]))
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::testing::corpus;
    use crate::testing::ctx;
    use crate::testing::tiny_model;
    use crate::testing::torch_rng;

    #[test]
    fn a_tiny_model_learns_to_tell_spam() {
        let _rng = torch_rng();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (base, _) = tiny_model(dir, &corpus("tinyshakespeare.txt")[..20_000], json!({"context": 32, "d_model": 32}));
        // Ham outnumbers spam; both carry the same routing headers.
        let mail = |subject: &str, body: &str| format!("Received: from mx.example.org\nTo: you@example.org\nSubject: {subject}\n\n{body}");
        let mut lines: Vec<String> = (0..50)
            .map(|i| json!({"label": "ham", "text": mail(&format!("minutes {i}"), "The notes of our meeting, as promised.")}).to_string())
            .collect();
        lines.extend(
            (0..30).map(|i| json!({"label": "spam", "text": mail(&format!("WIN $$$ {i}"), "CLICK HERE!!! FREE CASH!!!")}).to_string()),
        );
        std::fs::write(dir.join("mails.jsonl"), lines.join("\n")).unwrap();
        let params: Params = crate::params::<Classify>(json!({
            "data": "mails.jsonl", "split": [0.5, 0.25, 0.25], "max_tokens": 24,
            "train": {"steps": 30, "batch_size": 8, "lr": 3e-3, "warmup": 3},
            "eval_every": 10, "checkpoint_every": 0, "log_every": 100,
        }))
        .unwrap();
        let mut c = ctx(dir, "spam", &[("model", &base)]);
        train(&params, &mut c, None).unwrap();

        let m = c.metrics();
        // 30 of each class kept: 15 + 8 + 7 of each.
        assert_eq!((m["train_examples"].as_u64(), m["test_examples"].as_u64()), (Some(30), Some(14)));
        assert_eq!(m["baseline_accuracy"], 0.5);
        assert_eq!(m["test_accuracy"], 1.0, "{m:?}");
        assert_eq!(m["test_confusion"], json!([[7, 0], [0, 7]]));
        let results: Value = serde_json::from_str(&std::fs::read_to_string(c.out.join("results.json")).unwrap()).unwrap();
        assert_eq!(results["classes"]["spam"]["f1"], 1.0);
        assert_eq!(HeadModel::open(&c.out, tch::Device::Cpu).unwrap().info.labels, ["ham", "spam"]);

        let bad = Params { positive: "junk".into(), ..params };
        let err = format!("{:#}", train(&bad, &mut ctx(dir, "bad", &[("model", &base)]), None).unwrap_err());
        assert!(err.contains("param `positive`: \"junk\" is not a label") && err.contains("ham, spam"), "{err}");
    }

    #[test]
    fn leading_ids_tokenize_as_the_whole_text_does() {
        let tmp = tempfile::tempdir().unwrap();
        let (base, _) = tiny_model(tmp.path(), &corpus("tinyshakespeare.txt")[..20_000], json!({}));
        let tokenizer = crate::formats::tokenizer::load(&base).unwrap();
        let text = corpus("tinyshakespeare.txt")[..30_000].replace('\n', "  \n ");
        let whole: Vec<i64> = tokenizer.encode(text.as_str(), false).unwrap().get_ids().iter().map(|&i| i64::from(i)).collect();
        for n in [1, 7, 50, 400] {
            assert_eq!(leading_ids(&tokenizer, &text, n).unwrap(), whole[..n], "{n}");
        }
        assert_eq!(leading_ids(&tokenizer, "Hark", 50).unwrap().len(), tokenizer.encode("Hark", false).unwrap().len());
    }

    /// Test accuracy at the defaults from a pretrained model artifact such as
    /// the default pipeline's (`MODEL=path/to/out`; `PARAMS` overrides the
    /// params as JSON): `cargo
    /// test --release --workspace --lib spam_quality -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "a minute of training on a model artifact named by MODEL"]
    fn spam_quality() {
        let model = std::env::var("MODEL").expect("MODEL: a pretrained model artifact, e.g. artifacts/pretrain/KEY/out");
        let params: Params = crate::testing::params_from_env::<Classify>();
        let tmp = tempfile::tempdir().unwrap();
        let mut c = ctx(tmp.path(), "spam", &[("model", std::path::Path::new(&model))]);
        c.project_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        train(&params, &mut c, None).unwrap();
        eprintln!("metrics: {}", Value::Object(c.metrics().clone()));
        let (accuracy, baseline) = (c.metrics()["test_accuracy"].as_f64().unwrap(), c.metrics()["baseline_accuracy"].as_f64().unwrap());
        assert!(accuracy > baseline + 0.3, "test accuracy {accuracy}, baseline {baseline}");
    }

    #[test]
    fn headers_are_stripped_to_the_subject() {
        let mail = "From someone@example.com  Thu Aug 22 12:36:23 2002\r\n\
                    Received: from localhost\r\n\
                    \tby phobos (Postfix)\r\n\
                    Subject: Cheap meds\r\n  for you\r\n\
                    X-Spam: no\r\n\
                    \r\n\
                    Buy now.\r\n\r\nReally.\r\n";
        assert_eq!(strip_headers(mail), "Subject: Cheap meds for you\n\nBuy now.\n\nReally.");
        assert_eq!(strip_headers("From: Ünïcødé <a@b>\nsubject:hi\n\nbody"), "Subject: hi\n\nbody");
        assert_eq!(strip_headers("To: a@b\n\nno subject"), "no subject");
        assert_eq!(strip_headers("Just a text: not a mail.\n\nSecond paragraph."), "Just a text: not a mail.\n\nSecond paragraph.");
    }

    #[test]
    fn metrics_match_a_hand_count() {
        // Truth and predictions over classes ham 0, spam 1, other 2.
        let truth = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2];
        let predicted = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1];
        let c = Confusion::new(3, &truth, &predicted);
        assert_eq!(c.counts, [[2, 1, 1], [1, 2, 0], [0, 1, 2]]);
        assert!((c.accuracy() - 0.6).abs() < 1e-12);
        // spam: predicted 4 times, right twice; 3 true, 2 found.
        assert!((c.precision(1) - 0.5).abs() < 1e-12);
        assert!((c.recall(1) - 2.0 / 3.0).abs() < 1e-12);
        assert!((c.f1(1) - 2.0 * 0.5 * (2.0 / 3.0) / (0.5 + 2.0 / 3.0)).abs() < 1e-12);
        assert!((c.majority_baseline() - 0.4).abs() < 1e-12);
        let none = Confusion::new(2, &[0, 0], &[0, 0]);
        assert_eq!((none.precision(1), none.recall(1), none.f1(1)), (0.0, 0.0, 0.0));
        let labels = ["ham", "spam", "other"].map(String::from);
        let report = c.report(&labels);
        assert_eq!(report["classes"]["ham"]["support"], 4);
        assert_eq!(report["confusion"][0], json!([2, 1, 1]));
        let macro_recall = (0.5 + 2.0 / 3.0 + 2.0 / 3.0) / 3.0;
        assert!((report["macro"]["recall"].as_f64().unwrap() - macro_recall).abs() < 1e-12);
    }
}
