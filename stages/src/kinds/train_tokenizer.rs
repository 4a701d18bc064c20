//! `train_tokenizer`: train a byte-level BPE tokenizer on documents.
//!
//! ```toml
//! [stages.tok]
//! kind = "train_tokenizer"
//! input = "dedup"                       # any documents artifact
//! vocab_size = 4096
//! special_tokens = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
//! ```
//!
//! Params:
//! * `vocab_size` (4096): the size of the vocabulary, special tokens and the
//!   256 byte tokens included. 4096 suits the shipped corpora; 30–50k is usual
//!   at scale.
//! * `min_frequency` (2): a pair seen fewer times is never merged.
//! * `special_tokens`: added first, so they get ids 0, 1, …; `<|endoftext|>`
//!   is required (the `shard` stage separates documents with it) and the chat
//!   tokens are what the SFT stage formats conversations with.
//! * `pre_tokenizer` (`gpt2`): how text is split into words before BPE; `gpt2`
//!   is GPT-2's byte-level regex, `gpt4` the cl100k split pattern (case-folded
//!   contractions, digits in groups of at most three, newlines kept apart).
//! * `max_chars` (none): train on at most this many characters.
//! * `holdout_chars` (100 000): characters held out of training to measure
//!   compression on.
//!
//! Documents are ordered by a hash of their id, a deterministic sample spread
//! over the whole input: the first ones, up to `holdout_chars` (and never more
//! than a tenth of the documents), are held out; training takes the rest up to
//! `max_chars`. Training is deterministic, so the same documents and params give
//! a byte-identical `tokenizer.json`. No param is volatile.
//!
//! Output: `tokenizer.json` (Hugging Face format). Metrics: `vocab_size`,
//! `train_chars`, `train_seconds`, `train_mb_per_s` and, on the held-out
//! documents, `bytes_per_token`.

use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::formats::docs;
use crate::formats::tokenizer::{BatchEncoder, END_OF_TEXT, FILE};
use crate::{Inputs, ParamError, Stage, StageCtx};

/// The cl100k (GPT-4) split pattern, as Hugging Face tokenizers write it.
const GPT4_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct TrainTokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PreTokenizer {
    Gpt2,
    Gpt4,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The vocabulary size, the special tokens and the 256 byte tokens included.
    #[schemars(range(min = 256, max = 10_000_000))]
    pub vocab_size: usize,
    /// A pair seen fewer times is never merged.
    #[schemars(range(max = 1_000_000_000_000_u64))]
    pub min_frequency: u64,
    /// Added first (ids 0, 1, …); `<|endoftext|>` is required, the chat tokens are what `sft` formats with.
    pub special_tokens: Vec<String>,
    /// How text is split into words before BPE: `gpt2` (GPT-2's regex) or `gpt4` (cl100k's).
    pub pre_tokenizer: PreTokenizer,
    /// Train on at most this many characters (all if unset).
    #[schemars(range(min = 1, max = 1_000_000_000_000_u64))]
    pub max_chars: Option<u64>,
    /// Characters held out of training to measure compression on.
    #[schemars(range(max = 1_000_000_000_000_u64))]
    pub holdout_chars: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            vocab_size: 4096,
            min_frequency: 2,
            special_tokens: ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"].map(String::from).to_vec(),
            pre_tokenizer: PreTokenizer::Gpt2,
            max_chars: None,
            holdout_chars: 100_000,
        }
    }
}

impl Stage for TrainTokenizer {
    const KIND: &'static str = "train_tokenizer";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "train a byte-level BPE tokenizer (tokenizer.json) on documents";
    const INPUTS: Inputs = Inputs::Fixed(&["input"]);
    type Params = Params;

    fn check(params: &Params, _inputs: &[String]) -> Result<(), ParamError> {
        let min_vocab = 256 + params.special_tokens.len();
        if params.vocab_size < min_vocab {
            return Err(ParamError::new(
                &["vocab_size"],
                format!("`vocab_size` must be at least {min_vocab}: 256 byte tokens plus the special tokens"),
            ));
        }
        if !params.special_tokens.iter().any(|t| t == END_OF_TEXT) {
            return Err(ParamError::new(&["special_tokens"], format!("`special_tokens` must include {END_OF_TEXT}")));
        }
        if let Some(i) = params.special_tokens.iter().position(|t| t.is_empty()) {
            return Err(ParamError::new(&["special_tokens", &i.to_string()], "a special token cannot be empty"));
        }
        Ok(())
    }

    fn run(params: &Params, ctx: &mut StageCtx) -> Result<()> {
        let df = docs::read(ctx.input("input")?)?;
        let ids: Vec<String> = df.column("id")?.str()?.iter().map(|s| s.unwrap_or_default().to_string()).collect();
        let texts = docs::texts(&df)?;
        let sample = Sample::new(&ids, &texts, params.holdout_chars, params.max_chars);
        if sample.train.is_empty() {
            bail!("{}: no documents to train the tokenizer on", ctx.input("input")?.display());
        }
        let train_bytes: usize = sample.train.iter().map(|&i| texts[i].len()).sum();
        let train_chars: u64 = sample.train.iter().map(|&i| texts[i].chars().count() as u64).sum();

        let pool = rayon::ThreadPoolBuilder::new().num_threads(ctx.threads).build()?;
        let start = Instant::now();
        let tokenizer = pool.install(|| train(params, sample.train.iter().map(|&i| texts[i].as_str())))?;
        let seconds = start.elapsed().as_secs_f64();
        let path = ctx.out.join(FILE);
        tokenizer.save(&path, false).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;

        let vocab_size = tokenizer.get_vocab_size(true);
        let mb_per_s = train_bytes as f64 / 1e6 / seconds;
        ctx.metric("vocab_size", vocab_size);
        ctx.metric("train_chars", train_chars);
        ctx.metric("train_seconds", seconds);
        ctx.metric("train_mb_per_s", mb_per_s);
        eprintln!(
            "trained a {vocab_size}-token BPE on {train_chars} chars of {} documents in {seconds:.2} s ({mb_per_s:.2} MB/s)",
            sample.train.len()
        );
        if sample.holdout.is_empty() {
            eprintln!("no documents held out; compression not measured");
        } else {
            let held: Vec<&str> = sample.holdout.iter().map(|&i| texts[i].as_str()).collect();
            let bytes: usize = held.iter().map(|t| t.len()).sum();
            let encoder = BatchEncoder::new(&tokenizer)?;
            let tokens: usize = pool.install(|| encoder.encode(&held))?.iter().map(Vec::len).sum();
            let bytes_per_token = bytes as f64 / tokens.max(1) as f64;
            ctx.metric("bytes_per_token", bytes_per_token);
            eprintln!("held-out compression: {bytes_per_token:.3} bytes per token over {} documents", sample.holdout.len());
        }
        Ok(())
    }
}

/// Which documents train the tokenizer and which measure it, as indices.
struct Sample {
    holdout: Vec<usize>,
    train: Vec<usize>,
}

impl Sample {
    fn new(ids: &[String], texts: &[String], holdout_chars: u64, max_chars: Option<u64>) -> Self {
        // Hashing ids spreads the sample over the whole input, whatever its
        // order, and keeps it fixed for fixed documents.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_cached_key(|&i| *blake3::hash(ids[i].as_bytes()).as_bytes());
        let chars = |i: usize| texts[i].chars().count() as u64;

        let mut holdout = Vec::new();
        let mut held = 0;
        let mut rest = order.into_iter().peekable();
        while let Some(&i) = rest.peek() {
            if held + chars(i) > holdout_chars || holdout.len() + 1 > ids.len() / 10 {
                break;
            }
            held += chars(i);
            holdout.push(i);
            rest.next();
        }
        let mut train = Vec::new();
        let mut used = 0;
        for i in rest {
            if max_chars.is_some_and(|max| used + chars(i) > max) {
                break;
            }
            used += chars(i);
            train.push(i);
        }
        Sample { holdout, train }
    }
}

/// An untrained byte-level BPE tokenizer with the chosen pre-tokenizer.
fn empty_tokenizer(pre_tokenizer: PreTokenizer) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::new(BPE::default());
    match pre_tokenizer {
        PreTokenizer::Gpt2 => {
            tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        PreTokenizer::Gpt4 => {
            let split = Split::new(SplitPattern::Regex(GPT4_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| anyhow!("the gpt4 split pattern: {e}"))?;
            let bytes = ByteLevel::new(false, true, false);
            tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), bytes.into()])));
        }
    }
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// Trains a tokenizer on `texts` in the current rayon pool.
fn train<'a>(params: &Params, texts: impl Iterator<Item = &'a str> + Send) -> Result<Tokenizer> {
    let mut tokenizer = empty_tokenizer(params.pre_tokenizer)?;
    let special = params.special_tokens.iter().map(|t| AddedToken::from(t.clone(), true)).collect();
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainer::builder()
            .vocab_size(params.vocab_size)
            .min_frequency(params.min_frequency)
            .special_tokens(special)
            // Every byte gets a token, so any text encodes without unknowns.
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .show_progress(false)
            .build(),
    );
    tokenizer.train(&mut trainer, texts).map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    Ok(tokenizer)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use super::*;
    use crate::formats::tokenizer::load;
    use crate::testing::{corpus, python_with, run_python, write_docs, CORPORA};

    /// Runs the stage on `docs_dir`, writing into `out`.
    pub(crate) fn run_stage(params: &Params, docs_dir: &Path, out: &Path) -> StageCtx {
        std::fs::create_dir_all(out).unwrap();
        let mut ctx = StageCtx::new("tok", docs_dir, out, out);
        ctx.inputs.insert("input".into(), docs_dir.to_path_buf());
        ctx.threads = 2;
        TrainTokenizer::run(params, &mut ctx).unwrap();
        ctx
    }

    #[test]
    fn python_tokenizers_loads_it_and_gives_the_same_ids() {
        let Some(python) = python_with("tokenizers") else { return };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_docs(&dir.join("docs"), "shakespeare", &corpus("tinyshakespeare.txt"));
        let mut texts: Vec<String> = CORPORA
            .iter()
            .flat_map(|name| {
                let text = corpus(name);
                text.split("\n\n").take(2000).map(String::from).collect::<Vec<_>>()
            })
            .collect();
        texts.extend(
            ["caf\u{e9} \u{1f600} \u{4e2d}\u{6587}  tabs\t\r\nand 123456789", "<|user|>Hi<|assistant|>Hello<|endoftext|>"]
                .map(String::from),
        );
        for pre_tokenizer in [PreTokenizer::Gpt2, PreTokenizer::Gpt4] {
            let params = Params { vocab_size: 2000, pre_tokenizer, ..Default::default() };
            let out = dir.join(format!("{pre_tokenizer:?}"));
            run_stage(&params, &dir.join("docs"), &out);
            let tok = load(&out).unwrap();
            let cases: Vec<serde_json::Value> =
                texts.iter().map(|t| serde_json::json!({ "text": t, "ids": tok.encode(t.as_str(), false).unwrap().get_ids() })).collect();
            std::fs::write(dir.join("cases.json"), serde_json::to_string(&cases).unwrap()).unwrap();
            run_python(&python, "check_tokenizer.py", &[&out.join(FILE), &dir.join("cases.json")]);
        }
    }

    #[test]
    fn training_is_byte_identical_and_keeps_special_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_docs(&dir.join("docs"), "shakespeare", &corpus("tinyshakespeare.txt"));
        for pre_tokenizer in [PreTokenizer::Gpt2, PreTokenizer::Gpt4] {
            let params = Params { vocab_size: 1000, pre_tokenizer, max_chars: Some(400_000), ..Default::default() };
            let a = run_stage(&params, &dir.join("docs"), &dir.join("a"));
            run_stage(&params, &dir.join("docs"), &dir.join("b"));
            let bytes_a = std::fs::read(dir.join("a").join(FILE)).unwrap();
            assert_eq!(bytes_a, std::fs::read(dir.join("b").join(FILE)).unwrap(), "{pre_tokenizer:?}");

            let tok = load(&dir.join("a")).unwrap();
            assert_eq!(tok.get_vocab_size(true), 1000);
            for (id, token) in params.special_tokens.iter().enumerate() {
                assert_eq!(tok.token_to_id(token), Some(id as u32));
            }
            let bpt = a.metrics()["bytes_per_token"].as_f64().unwrap();
            assert!((2.0..5.0).contains(&bpt), "{pre_tokenizer:?}: {bpt} bytes per token");
            let text = "First Citizen:\nWe are accounted poor citizens, 1234 <|user|> caf\u{e9}!";
            let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
    }

    #[test]
    fn sample_holds_out_and_caps_by_hash_order() {
        let ids: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        let texts: Vec<String> = (0..100).map(|_| "x".repeat(10)).collect();
        let s = Sample::new(&ids, &texts, 35, Some(200));
        assert_eq!((s.holdout.len(), s.train.len()), (3, 20));
        // A tenth of the documents at most is held out.
        assert_eq!(Sample::new(&ids, &texts, 10_000, None).holdout.len(), 10);
        let mut all: Vec<usize> = s.holdout.iter().chain(&s.train).copied().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 23, "held-out and training documents are disjoint");
    }

    #[test]
    fn params_are_checked() {
        let p = Params { special_tokens: vec!["<|user|>".into()], ..Default::default() };
        assert_eq!(TrainTokenizer::check(&p, &[]).unwrap_err().path, ["special_tokens"]);
        let p = Params { vocab_size: 100, ..Default::default() };
        assert!(TrainTokenizer::check(&p, &[]).unwrap_err().message.contains("at least 260"));
    }
}
