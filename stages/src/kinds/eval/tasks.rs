//! The task types: what each reads, what it asks the model and how it
//! scores, following lm-evaluation-harness's definitions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::code::{self, Limits, Outcome, Problem, Sandbox};
use super::score::{encode, encode_pair, rolling_windows, Score, Scorer};
use crate::data::sequences::Sequence;
use crate::data::{mean_stderr, records};
use crate::model::Gpt;
use crate::sample::{generate, Sampling};
use crate::train::replicas::Replicas;

/// One `[[tasks]]` entry: a name, a file (or directory, or glob) relative
/// to the pipeline, how many items to take, and the type with its options.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Task {
    /// The task's name in the report (unique).
    pub name: String,
    /// A file, a directory or a glob, relative to the pipeline; part of the key.
    pub file: String,
    /// Items to evaluate (the first ones); 0 takes all. For `perplexity`,
    /// bytes of text; for `minimal_pairs`, pairs per file.
    #[schemars(range(max = 1_000_000_000_000_u64))]
    pub limit: usize,
    /// The task type (`type = "…"`) and its options.
    #[serde(flatten)]
    pub ty: TaskType,
}

/// The task types and the options of each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskType {
    Perplexity(Perplexity),
    MultipleChoice(MultipleChoice),
    Schema(Schema),
    #[serde(alias = "lambada")]
    LanguageModeling(LanguageModeling),
    MinimalPairs(MinimalPairs),
    Code(Code),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Perplexity {
    /// `limit` takes the last bytes of the file instead of the first.
    pub from_end: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MultipleChoice {
    /// Solved examples before each query, drawn from the same file.
    #[schemars(range(max = 1000))]
    pub shots: usize,
    /// Between the query and a choice.
    pub delimiter: String,
}

impl Default for MultipleChoice {
    fn default() -> Self {
        MultipleChoice { shots: 0, delimiter: " ".into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Schema {
    /// Solved examples before each item (its gold context and the continuation).
    #[schemars(range(max = 1000))]
    pub shots: usize,
    /// Between a context option and the continuation.
    pub delimiter: String,
}

impl Default for Schema {
    fn default() -> Self {
        Schema { shots: 0, delimiter: " ".into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LanguageModeling {
    /// Solved examples (context and continuation) before each item.
    #[schemars(range(max = 1000))]
    pub shots: usize,
    /// Between the context and the continuation.
    pub delimiter: String,
}

impl Default for LanguageModeling {
    fn default() -> Self {
        LanguageModeling { shots: 0, delimiter: " ".into() }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MinimalPairs {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Code {
    /// Completions per problem (n).
    #[schemars(range(min = 1, max = 10_000))]
    pub samples: usize,
    /// The k of each pass@k reported; each at most `samples`.
    pub k: Vec<usize>,
    /// 0 decodes greedily.
    #[schemars(range(min = 0, max = 100))]
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches this.
    #[schemars(range(min = 0, max = 1))]
    pub top_p: f64,
    /// New tokens per completion.
    #[schemars(range(min = 1, max = 1_048_576))]
    pub max_tokens: usize,
    /// Wall-time limit of one test run.
    #[schemars(range(max = 86_400), extend("exclusiveMinimum" = 0))]
    pub timeout_s: f64,
    /// Address-space limit of one test run.
    #[schemars(range(min = 1, max = 1_048_576))]
    pub memory_mb: u64,
    /// The interpreter that runs the tests (inside the sandbox, found in /usr/bin).
    pub python: String,
    /// "bwrap" (bubblewrap's namespaces) or "none" (unconfined, with a warning).
    pub sandbox: String,
    /// Code tasks run generated code; they run only when this is true
    /// (lm-eval's `--confirm_run_unsafe_code`).
    pub confirm_run_unsafe_code: bool,
}

impl Default for Code {
    fn default() -> Self {
        Code {
            samples: 1,
            k: vec![1],
            temperature: 0.0,
            top_p: 0.95,
            max_tokens: 128,
            timeout_s: 10.0,
            memory_mb: 1024,
            python: "python3".into(),
            sandbox: "bwrap".into(),
            confirm_run_unsafe_code: false,
        }
    }
}

impl<'de> Deserialize<'de> for Task {
    /// `name`, `file` and `limit` are common; the rest (with `type`) is the
    /// type's own table, where unknown keys are an error.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Task, D::Error> {
        let mut map = serde_json::Map::<String, Value>::deserialize(d)?;
        let mut field = |key: &'static str| map.remove(key).ok_or_else(|| D::Error::missing_field(key));
        let name = String::deserialize(field("name")?).map_err(D::Error::custom)?;
        let file = String::deserialize(field("file")?).map_err(D::Error::custom)?;
        let limit = field("limit").ok().map(usize::deserialize).transpose().map_err(D::Error::custom)?.unwrap_or(0);
        if !map.contains_key("type") {
            return Err(D::Error::custom(format!(
                "task `{name}`: missing field `type` (perplexity, multiple_choice, schema, language_modeling, minimal_pairs or code)"
            )));
        }
        let ty = TaskType::deserialize(Value::Object(map)).map_err(|e| D::Error::custom(format!("task `{name}`: {e}")))?;
        Ok(Task { name, file, limit, ty })
    }
}

impl TaskType {
    pub fn type_name(&self) -> &'static str {
        match self {
            TaskType::Perplexity(_) => "perplexity",
            TaskType::MultipleChoice(_) => "multiple_choice",
            TaskType::Schema(_) => "schema",
            TaskType::LanguageModeling(_) => "language_modeling",
            TaskType::MinimalPairs(_) => "minimal_pairs",
            TaskType::Code(_) => "code",
        }
    }

    /// The in-context task types CORE averages (DCLM's: multiple choice,
    /// schema and language modelling).
    pub fn in_core(&self) -> bool {
        matches!(self, TaskType::MultipleChoice(_) | TaskType::Schema(_) | TaskType::LanguageModeling(_))
    }
}

/// A model to evaluate and how to batch it.
pub struct Model<'a> {
    pub gpt: &'a Gpt,
    pub tokenizer: &'a Tokenizer,
    /// `<|endoftext|>`: the context of a request without one, the padding.
    pub eot: i64,
    /// Padded positions per forward pass; see [`Scorer`].
    pub batch_tokens: usize,
    /// The cores' model replicas, where scoring splits across them.
    pub replicas: Option<&'a Replicas>,
}

impl Model<'_> {
    fn score(&self, requests: &[Sequence]) -> Result<Vec<Score>> {
        Scorer { gpt: self.gpt, batch_tokens: self.batch_tokens, pad_id: self.eot, replicas: self.replicas }.score(requests)
    }

    fn pair(&self, context: &str, continuation: &str) -> Result<Sequence> {
        encode_pair(self.tokenizer, self.eot, context, continuation)
    }
}

/// Where a task runs: the pipeline's directory, the seed of few-shot draws
/// and code sampling, threads for test runs, scratch space for them.
pub struct Env<'a> {
    pub project_dir: &'a Path,
    pub seed: u64,
    pub threads: usize,
    pub scratch: &'a Path,
}

/// A task's scores on one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskScores {
    /// Metric name → value (`acc`, `acc_stderr`, `bits_per_byte`, …).
    pub metrics: BTreeMap<String, f64>,
    /// What the metrics were computed from (`tokens`, `words`, `bytes` and
    /// the summed `logprob` of a text).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, f64>,
    /// The metric the centered score and the charts use.
    pub primary: String,
    /// The primary metric of a model that guesses; none for perplexity.
    pub chance: Option<f64>,
    /// Items scored (windows for perplexity).
    pub examples: usize,
    /// Per-file accuracy of `minimal_pairs` (the BLiMP paradigms).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub breakdown: BTreeMap<String, f64>,
    /// One record per item, for `items/MODEL/TASK.jsonl`.
    #[serde(skip)]
    pub items: Vec<Value>,
}

impl TaskScores {
    /// (primary − chance) / (1 − chance), as nanochat's CORE centers scores.
    pub fn centered(&self) -> Option<f64> {
        let chance = self.chance?;
        Some((self.metrics[&self.primary] - chance) / (1.0 - chance))
    }
}

/// Evaluates `task` on `model`.
pub fn evaluate(task: &Task, model: &Model, env: &Env) -> Result<TaskScores> {
    let files = task_files(env.project_dir, &task.file)?;
    let single = || -> Result<&Path> {
        match files.as_slice() {
            [one] => Ok(one),
            _ => bail!("task `{}`: `{}` names {} files; this task type reads one", task.name, task.file, files.len()),
        }
    };
    match &task.ty {
        TaskType::Perplexity(p) => perplexity(single()?, task.limit, p, model),
        TaskType::MultipleChoice(p) => multiple_choice(single()?, task.limit, p, model, env.seed),
        TaskType::Schema(p) => schema(single()?, task.limit, p, model, env.seed),
        TaskType::LanguageModeling(p) => language_modeling(single()?, task.limit, p, model, env.seed),
        TaskType::MinimalPairs(_) => minimal_pairs(&files, task.limit, model),
        TaskType::Code(p) => {
            let problems = take(records::read::<Problem>(single()?)?, task.limit);
            // A step of one token is too little work to share: threads would
            // spend it waiting on each other (ten times slower on a busy machine).
            let threads = tch::get_num_threads();
            tch::set_num_threads(1);
            let completions = problems
                .iter()
                .enumerate()
                .map(|(i, problem)| complete_code(model, problem, p, env.seed.wrapping_add(1000 * i as u64)))
                .collect::<Result<Vec<_>>>();
            tch::set_num_threads(threads);
            code_outcomes(&problems, &completions?, p, env)
        }
    }
}

/// The files `pattern` names: a file, every file in a directory, or a glob's
/// matches, sorted.
pub fn task_files(project_dir: &Path, pattern: &str) -> Result<Vec<PathBuf>> {
    let full = project_dir.join(pattern);
    let mut files: Vec<PathBuf> = if pattern.contains(['*', '?', '[']) {
        glob::glob(&full.to_string_lossy())
            .with_context(|| format!("bad glob pattern `{pattern}`"))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("cannot list `{pattern}`"))?
    } else if full.is_dir() {
        std::fs::read_dir(&full)
            .with_context(|| format!("cannot list {}", full.display()))?
            .map(|e| Ok(e?.path()))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|p| p.is_file())
            .collect()
    } else {
        ensure!(full.is_file(), "cannot read {}: no such file", full.display());
        vec![full.clone()]
    };
    files.sort();
    ensure!(!files.is_empty(), "no file matches {}", full.display());
    Ok(files)
}

fn take<T>(mut items: Vec<T>, limit: usize) -> Vec<T> {
    if limit > 0 {
        items.truncate(limit);
    }
    items
}

fn with_stderr(metrics: &mut BTreeMap<String, f64>, name: &str, xs: &[f64]) {
    let (mean, stderr) = mean_stderr(xs);
    metrics.insert(name.to_string(), mean);
    metrics.insert(format!("{name}_stderr"), stderr);
}

fn indicator(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The first index of the largest value (numpy's argmax).
fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Words as lm-eval counts them: `len(re.split(r"\s+", text))`.
pub fn count_words(text: &str) -> usize {
    let mut runs = 0;
    let mut in_space = false;
    for c in text.chars() {
        if c.is_whitespace() && !in_space {
            runs += 1;
        }
        in_space = c.is_whitespace();
    }
    runs + 1
}

/// The first (or last) `limit` bytes of `text`, cut at a line break so that
/// no word is split; all of it when `limit` is 0 or larger.
fn text_slice(text: &str, limit: usize, from_end: bool) -> &str {
    if limit == 0 || limit >= text.len() {
        return text;
    }
    if from_end {
        let mut start = text.len() - limit;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].find('\n').map_or(&text[start..], |i| &text[start + i + 1..])
    } else {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].rfind('\n').map_or(&text[..end], |i| &text[..=i])
    }
}

/// Rolling-window perplexity of a text (lm-eval's `loglikelihood_rolling`):
/// token, word and byte perplexity and bits per byte, words and bytes
/// counted on the text itself.
fn perplexity(path: &Path, limit: usize, p: &Perplexity, model: &Model) -> Result<TaskScores> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
    let text = text_slice(&text, limit, p.from_end);
    ensure!(!text.trim().is_empty(), "{}: no text to measure", path.display());
    let tokens = encode(model.tokenizer, text)?;
    let windows = rolling_windows(&tokens, model.eot, model.gpt.config().context as usize);
    let scores = model.score(&windows)?;
    let logprob: f64 = scores.iter().map(|s| s.logprob).sum();
    let (n_tokens, words, bytes) = (tokens.len() as f64, count_words(text) as f64, text.len() as f64);
    let metrics = BTreeMap::from([
        ("token_perplexity".to_string(), (-logprob / n_tokens).exp()),
        ("word_perplexity".to_string(), (-logprob / words).exp()),
        ("byte_perplexity".to_string(), (-logprob / bytes).exp()),
        ("bits_per_byte".to_string(), -logprob / bytes / std::f64::consts::LN_2),
    ]);
    let counts = BTreeMap::from([
        ("tokens".to_string(), n_tokens),
        ("words".to_string(), words),
        ("bytes".to_string(), bytes),
        ("logprob".to_string(), logprob),
    ]);
    let items = scores.iter().map(|s| json!({"tokens": s.tokens, "logprob": s.logprob})).collect();
    Ok(TaskScores {
        metrics,
        counts,
        primary: "bits_per_byte".into(),
        chance: None,
        examples: windows.len(),
        breakdown: BTreeMap::new(),
        items,
    })
}

#[derive(Deserialize)]
struct ChoiceItem {
    query: String,
    choices: Vec<String>,
    gold: usize,
}

/// Each choice scored by the log-likelihood of its continuation given the
/// query: `acc` picks the largest, `acc_norm` the largest per character.
fn multiple_choice(path: &Path, limit: usize, p: &MultipleChoice, model: &Model, seed: u64) -> Result<TaskScores> {
    let pool: Vec<ChoiceItem> = records::read(path)?;
    for (i, item) in pool.iter().enumerate() {
        ensure!(
            item.gold < item.choices.len(),
            "{}: record {}: `gold` is {} but there are {} choices",
            path.display(),
            i + 1,
            item.gold,
            item.choices.len()
        );
    }
    let n = items_and_shots(path, pool.len(), limit, p.shots)?;
    let mut requests = Vec::new();
    for (i, item) in pool[..n].iter().enumerate() {
        let solved = |x: &ChoiceItem| format!("{}{}{}", x.query, p.delimiter, x.choices[x.gold]);
        let context = format!("{}{}{}", few_shot(&pool, i, p.shots, seed, solved), item.query, p.delimiter);
        for choice in &item.choices {
            requests.push(model.pair(&context, choice)?);
        }
    }
    let mut scores = model.score(&requests)?.into_iter();
    let (mut acc, mut acc_norm, mut items) = (Vec::new(), Vec::new(), Vec::new());
    for item in &pool[..n] {
        let lls: Vec<f64> = scores.by_ref().take(item.choices.len()).map(|s| s.logprob).collect();
        let pred = argmax(lls.iter().copied());
        let pred_norm = argmax(lls.iter().zip(&item.choices).map(|(ll, c)| ll / c.chars().count() as f64));
        acc.push(indicator(pred == item.gold));
        acc_norm.push(indicator(pred_norm == item.gold));
        items.push(json!({"gold": item.gold, "logprobs": lls, "pred": pred, "pred_norm": pred_norm}));
    }
    let mut metrics = BTreeMap::new();
    with_stderr(&mut metrics, "acc", &acc);
    with_stderr(&mut metrics, "acc_norm", &acc_norm);
    let chance = pool[..n].iter().map(|item| 1.0 / item.choices.len() as f64).sum::<f64>() / n as f64;
    Ok(TaskScores {
        metrics,
        counts: BTreeMap::new(),
        primary: "acc_norm".into(),
        chance: Some(chance),
        examples: n,
        breakdown: BTreeMap::new(),
        items,
    })
}

/// How many items a task scores (the first `limit`, 0 for all), once the
/// file is known to hold enough to draw `shots` others from.
fn items_and_shots(path: &Path, items: usize, limit: usize, shots: usize) -> Result<usize> {
    ensure!(shots < items, "{}: {shots} shots need more than {items} items", path.display());
    Ok(if limit == 0 { items } else { limit.min(items) })
}

/// `shots` solved examples other than item `i` of `pool`, drawn by a
/// shuffle seeded with (seed, i), each ending in a blank line (lm-eval's
/// few-shot delimiter).
fn few_shot<T>(pool: &[T], i: usize, shots: usize, seed: u64, solved: impl Fn(&T) -> String) -> String {
    crate::data::rng::shuffled(pool.len(), seed.wrapping_add(i as u64))
        .into_iter()
        .filter(|&j| j != i)
        .take(shots)
        .map(|j| solved(&pool[j]) + "\n\n")
        .collect()
}

#[derive(Deserialize)]
struct SchemaItem {
    context_options: Vec<String>,
    continuation: String,
    gold: usize,
}

/// lm-eval's partial scoring (WinoGrande): the same continuation after each
/// context option; `acc` picks the option under which it is most likely.
fn schema(path: &Path, limit: usize, p: &Schema, model: &Model, seed: u64) -> Result<TaskScores> {
    let pool: Vec<SchemaItem> = records::read(path)?;
    for (i, item) in pool.iter().enumerate() {
        ensure!(
            item.gold < item.context_options.len(),
            "{}: record {}: `gold` is {} but there are {} context options",
            path.display(),
            i + 1,
            item.gold,
            item.context_options.len()
        );
    }
    let n = items_and_shots(path, pool.len(), limit, p.shots)?;
    let mut requests = Vec::new();
    for (i, item) in pool[..n].iter().enumerate() {
        let solved = |x: &SchemaItem| format!("{}{}{}", x.context_options[x.gold], p.delimiter, x.continuation);
        let prefix = few_shot(&pool, i, p.shots, seed, solved);
        for option in &item.context_options {
            requests.push(model.pair(&format!("{prefix}{option}{}", p.delimiter), &item.continuation)?);
        }
    }
    let mut scores = model.score(&requests)?.into_iter();
    let (mut acc, mut items) = (Vec::new(), Vec::new());
    for item in &pool[..n] {
        let lls: Vec<f64> = scores.by_ref().take(item.context_options.len()).map(|s| s.logprob).collect();
        let pred = argmax(lls.iter().copied());
        acc.push(indicator(pred == item.gold));
        items.push(json!({"gold": item.gold, "logprobs": lls, "pred": pred}));
    }
    let mut metrics = BTreeMap::new();
    with_stderr(&mut metrics, "acc", &acc);
    let chance = pool[..n].iter().map(|item| 1.0 / item.context_options.len() as f64).sum::<f64>() / n as f64;
    Ok(TaskScores {
        metrics,
        counts: BTreeMap::new(),
        primary: "acc".into(),
        chance: Some(chance),
        examples: n,
        breakdown: BTreeMap::new(),
        items,
    })
}

#[derive(Deserialize)]
struct ContinuationItem {
    context: String,
    continuation: String,
}

/// DCLM's language-modelling type (LAMBADA and its kin): whether greedy
/// decoding reproduces the continuation (`acc`), and lm-eval's
/// `perplexity`: exp of minus the mean log-likelihood of the continuations.
fn language_modeling(path: &Path, limit: usize, p: &LanguageModeling, model: &Model, seed: u64) -> Result<TaskScores> {
    let pool: Vec<ContinuationItem> = records::read(path)?;
    let n = items_and_shots(path, pool.len(), limit, p.shots)?;
    let items = &pool[..n];
    let solved = |x: &ContinuationItem| format!("{}{}{}", x.context, p.delimiter, x.continuation);
    let requests = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let prefix = few_shot(&pool, i, p.shots, seed, solved);
            model.pair(&format!("{prefix}{}{}", item.context, p.delimiter), &item.continuation)
        })
        .collect::<Result<Vec<_>>>()?;
    let scores = model.score(&requests)?;
    let acc: Vec<f64> = scores.iter().map(|s| indicator(s.greedy)).collect();
    let mut metrics = BTreeMap::new();
    with_stderr(&mut metrics, "acc", &acc);
    let mean_logprob = scores.iter().map(|s| s.logprob).sum::<f64>() / scores.len() as f64;
    metrics.insert("perplexity".into(), (-mean_logprob).exp());
    let details = scores.iter().map(|s| json!({"logprob": s.logprob, "greedy": s.greedy, "tokens": s.tokens})).collect();
    Ok(TaskScores {
        metrics,
        counts: BTreeMap::new(),
        primary: "acc".into(),
        chance: Some(0.0),
        examples: items.len(),
        breakdown: BTreeMap::new(),
        items: details,
    })
}

#[derive(Deserialize)]
struct Pair {
    sentence_good: String,
    sentence_bad: String,
}

/// The share of pairs whose good sentence has the higher total
/// log-probability, per file (paradigm) and over all pairs.
fn minimal_pairs(files: &[PathBuf], limit: usize, model: &Model) -> Result<TaskScores> {
    let mut requests = Vec::new();
    let mut paradigms = Vec::new();
    for path in files {
        let pairs = take(records::read::<Pair>(path)?, limit);
        for pair in &pairs {
            requests.push(model.pair("", &pair.sentence_good)?);
            requests.push(model.pair("", &pair.sentence_bad)?);
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        paradigms.push((name.split('.').next().unwrap_or(name).to_string(), pairs.len()));
    }
    let scores = model.score(&requests)?;
    let correct: Vec<f64> = scores.chunks(2).map(|pair| indicator(pair[0].logprob > pair[1].logprob)).collect();
    let mut breakdown = BTreeMap::new();
    let mut at = 0;
    for (name, n) in paradigms {
        breakdown.insert(name, correct[at..at + n].iter().sum::<f64>() / n as f64);
        at += n;
    }
    let mut metrics = BTreeMap::new();
    with_stderr(&mut metrics, "acc", &correct);
    let items = scores.chunks(2).map(|pair| json!({"good": pair[0].logprob, "bad": pair[1].logprob})).collect();
    Ok(TaskScores { metrics, counts: BTreeMap::new(), primary: "acc".into(), chance: Some(0.5), examples: correct.len(), breakdown, items })
}

/// `samples` completions of a problem's prompt, each cut where the function
/// body ends. The prompt is cut from the left so that it and the completion
/// fit in the model's context (the KV cache then serves every step).
fn complete_code(model: &Model, problem: &Problem, p: &Code, seed: u64) -> Result<Vec<String>> {
    let context = model.gpt.config().context as usize;
    let prompt = encode(model.tokenizer, &problem.prompt)?;
    let keep = context.saturating_sub(p.max_tokens).max(1).min(prompt.len());
    let prompt = if prompt.is_empty() { vec![model.eot] } else { prompt[prompt.len() - keep..].to_vec() };
    (0..p.samples)
        .map(|s| {
            let sampling = Sampling {
                max_tokens: p.max_tokens,
                temperature: p.temperature,
                top_k: None,
                top_p: Some(p.top_p),
                seed: seed.wrapping_add(s as u64),
            };
            let mut ids = tch::no_grad(|| generate(model.gpt, &prompt, &sampling));
            if let Some(end) = ids.iter().position(|&id| id == model.eot) {
                ids.truncate(end);
            }
            let ids: Vec<u32> = ids.into_iter().map(|id| id as u32).collect();
            let text = model.tokenizer.decode(&ids, false).map_err(|e| anyhow::anyhow!("cannot decode a completion: {e}"))?;
            Ok(code::truncate(&text).to_string())
        })
        .collect()
}

/// Runs every completion against its problem's tests, `env.threads` at a
/// time, and estimates pass@k for each k.
pub fn code_outcomes(problems: &[Problem], completions: &[Vec<String>], p: &Code, env: &Env) -> Result<TaskScores> {
    let limits = Limits { timeout: Duration::from_secs_f64(p.timeout_s), memory_bytes: p.memory_mb << 20 };
    let jobs: Vec<(usize, &String)> = completions.iter().enumerate().flat_map(|(i, samples)| samples.iter().map(move |c| (i, c))).collect();
    let sandbox = Sandbox::new(&p.sandbox, env.scratch)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(env.threads.max(1)).build()?;
    let outcomes: Vec<Outcome> =
        pool.install(|| jobs.par_iter().map(|&(i, c)| code::execute(&sandbox, &p.python, &problems[i], c, limits)).collect::<Result<_>>())?;
    let mut metrics = BTreeMap::new();
    let mut outcomes = outcomes.into_iter();
    let mut items = Vec::new();
    let mut passed = Vec::new();
    for (problem, samples) in problems.iter().zip(completions) {
        let results: Vec<Outcome> = outcomes.by_ref().take(samples.len()).collect();
        passed.push(results.iter().filter(|o| **o == Outcome::Passed).count());
        items.push(json!({"task_id": problem.task_id, "completions": samples, "outcomes": results}));
    }
    for &k in &p.k {
        let estimates: Vec<f64> = passed.iter().zip(completions).map(|(&c, s)| code::pass_at_k(s.len(), c, k)).collect();
        with_stderr(&mut metrics, &format!("pass@{k}"), &estimates);
    }
    let primary = format!("pass@{}", p.k.iter().min().copied().unwrap_or(1));
    Ok(TaskScores {
        metrics,
        counts: BTreeMap::new(),
        primary,
        chance: Some(0.0),
        examples: problems.len(),
        breakdown: BTreeMap::new(),
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::code::tests::problems;
    use super::*;

    #[test]
    fn tasks_parse_with_type_specific_options_and_reject_others() {
        let task: Task = serde_json::from_value(json!({"name": "arc", "type": "multiple_choice", "file": "a.jsonl", "shots": 2})).unwrap();
        assert_eq!(task.ty, TaskType::MultipleChoice(MultipleChoice { shots: 2, delimiter: " ".into() }));
        assert_eq!(task.limit, 0);
        // What the engine hashes and the stage reads back.
        let again: Task = serde_json::from_value(serde_json::to_value(&task).unwrap()).unwrap();
        assert_eq!(again, task);
        let err = serde_json::from_value::<Task>(json!({"name": "w", "type": "perplexity", "file": "w", "shots": 2}));
        assert!(err.unwrap_err().to_string().contains("task `w`: unknown field `shots`"));
        // `lambada` is the old name of `language_modeling`.
        let task: Task = serde_json::from_value(json!({"name": "l", "type": "lambada", "file": "l.jsonl", "shots": 3})).unwrap();
        assert_eq!(task.ty, TaskType::LanguageModeling(LanguageModeling { shots: 3, delimiter: " ".into() }));
        assert_eq!(serde_json::to_value(&task).unwrap()["type"], "language_modeling");
        let err = serde_json::from_value::<Task>(json!({"name": "w", "file": "w"}));
        assert!(err.unwrap_err().to_string().contains("missing field `type`"));
        let err = serde_json::from_value::<Task>(json!({"name": "w", "type": "trivia", "file": "w"}));
        assert!(err.unwrap_err().to_string().contains("unknown variant `trivia`"));
    }

    #[test]
    fn words_and_slices_follow_lm_eval() {
        // len(re.split(r"\s+", s))
        assert_eq!(count_words("a b  c"), 3);
        assert_eq!(count_words(" a b\n"), 4);
        assert_eq!(count_words(""), 1);
        let text = "one two\nthree\nfour five\n";
        assert_eq!(text_slice(text, 12, false), "one two\n");
        assert_eq!(text_slice(text, 12, true), "four five\n");
        assert_eq!(text_slice(text, 0, true), text);
        assert_eq!(text_slice("αβγ", 3, false), "α");
    }

    #[test]
    fn mean_and_standard_error_match_numpy() {
        // np.mean, np.std(ddof=1) / sqrt(n) of [1, 0, 1, 1]
        let (mean, stderr) = mean_stderr(&[1.0, 0.0, 1.0, 1.0]);
        assert_eq!(mean, 0.75);
        assert!((stderr - 0.25).abs() < 1e-12, "{stderr}");
    }

    /// The harness, not the model: the canonical solutions of all 164
    /// problems pass (a few seconds, in the sandbox), broken ones none.
    #[test]
    fn canonical_solutions_pass_and_broken_ones_fail() {
        let problems = problems();
        assert_eq!(problems.len(), 164);
        let dir = tempfile::tempdir().unwrap();
        let env = Env { project_dir: dir.path(), seed: 0, threads: 4, scratch: dir.path() };
        let canonical: Vec<Vec<String>> = problems.iter().map(|q| vec![q.canonical_solution.clone()]).collect();
        let outcomes = code_outcomes(&problems, &canonical, &Code::default(), &env).unwrap();
        let failed: Vec<&Value> = outcomes.items.iter().filter(|i| i["outcomes"][0] != "passed").collect();
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(outcomes.metrics["pass@1"], 1.0);

        // Wrong in two ways; then one of two samples right.
        let few = &problems[..10];
        let p = Code { samples: 2, k: vec![1, 2], temperature: 0.8, ..Code::default() };
        let broken: Vec<Vec<String>> = few.iter().map(|_| vec!["    return None\n".into(), "    pass\n".into()]).collect();
        let outcomes = code_outcomes(few, &broken, &p, &env).unwrap();
        assert_eq!((outcomes.metrics["pass@1"], outcomes.metrics["pass@2"]), (0.0, 0.0));
        assert_eq!(outcomes.centered(), Some(0.0));
        let half: Vec<Vec<String>> = few.iter().map(|q| vec!["    pass\n".into(), q.canonical_solution.clone()]).collect();
        let outcomes = code_outcomes(few, &half, &p, &env).unwrap();
        assert_eq!((outcomes.metrics["pass@1"], outcomes.metrics["pass@2"]), (0.5, 1.0));
    }
}
