//! `shard`: encode documents into llm.c-format token shards.
//!
//! ```toml
//! [stages.tokens]
//! kind = "shard"
//! inputs = { docs = "dedup", tokenizer = "tok" }
//! val_fraction = 0.1
//! ```
//!
//! Every document is encoded as plain text (a special-token string inside a
//! document stays text) and followed by `<|endoftext|>`. Each document goes to
//! the validation split when a hash of its id falls below `val_fraction`, so
//! the split is fixed per document whatever the order or number of the others.
//! Each split is a stream of tokens in document order, cut into shards of
//! exactly `shard_tokens` tokens (the last one shorter); documents run across
//! shard boundaries, as in llm.c.
//!
//! Params:
//! * `val_fraction` (0.1): the share of documents held out for validation;
//!   0 writes no validation shards.
//! * `shard_tokens` (100,000,000): tokens per shard.
//!
//! Documents stream in one Parquet row group at a time and are encoded in
//! parallel batches of at most `memory_mb` / 16 of text, so memory does not
//! grow with the corpus; `memory_mb` (volatile) changes no byte. Output: the
//! shards, the tokenizer (`tokenizer.json`, so training and generation need
//! only this artifact), `manifest.json` (see [`crate::formats::tokens`] for
//! the format) and `units/`. Metrics: `documents`, `train_tokens`,
//! `val_tokens`, `bytes_per_token`, `parts_cached`, and `encode_mb_per_s`
//! when a part was encoded.
//!
//! Incremental: each input part is a unit ([`crate::data::units`]) cached
//! under a hash of its bytes, the tokenizer's and `val_fraction`. A unit is
//! not a set of shards: shards hold exactly `shard_tokens` tokens and a
//! document runs across their boundaries, so a shard mixes parts, and one
//! new part at the front would move every boundary after it. A unit holds
//! the part's token runs instead, one per split (`units/KEY.train.tokens.bin`,
//! `KEY.val.tokens.bin`: the tokens at the shards' width, no header), and
//! the stage then packs the runs of all parts, in order, into shards: a copy
//! of bytes next to encoding, for as much disk again as the shards. An added
//! part is encoded alone, and the shards are byte for byte what a full
//! rebuild writes.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::data::units::{self, Unit, Units};
use crate::data::working_memory_mb;
use crate::formats::docs;
use crate::formats::tokenizer::{self, BatchEncoder, END_OF_TEXT};
use crate::formats::tokens::{Manifest, ShardInfo, ShardWriter, SplitInfo, Width};
use crate::{Inputs, Stage, StageCtx};

pub struct Shard;

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// The share of documents held out for validation; 0 writes no validation shards.
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 1))]
    pub val_fraction: f64,
    /// Tokens per shard; documents run across shard boundaries, as in llm.c.
    // The shard header counts tokens in an int32.
    #[schemars(range(min = 1, max = i32::MAX))]
    pub shard_tokens: u64,
    /// Peak memory of the stage process in MB, the runtime's 128 included; volatile: bounds the text encoded per parallel batch.
    #[schemars(range(min = 256, max = 1_000_000_000))]
    pub memory_mb: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params { val_fraction: 0.1, shard_tokens: 100_000_000, memory_mb: 1024 }
    }
}

const SPLITS: [&str; 2] = ["train", "val"];

/// What encodes a part: the tokenizer and how much text goes in one batch.
struct Encoding {
    encoder: BatchEncoder,
    pool: rayon::ThreadPool,
    eot: u32,
    width: Width,
    val_fraction: f64,
    batch_limit: usize,
}

impl Stage for Shard {
    const KIND: &'static str = "shard";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "encode documents into llm.c token shards (train/val) with a tokenizer";
    const INPUTS: Inputs = Inputs::Fixed(&["docs", "tokenizer"]);
    const VOLATILE: &'static [&'static str] = &["memory_mb"];
    type Params = Params;

    fn run(params: &Params, ctx: &mut StageCtx) -> Result<()> {
        let docs_dir = ctx.input("docs")?.to_path_buf();
        let parts = docs::parts(&docs_dir)?;
        let tokenizer_dir = ctx.input("tokenizer")?.to_path_buf();
        let tokenizer = tokenizer::load(&tokenizer_dir)?;
        let eot = tokenizer
            .token_to_id(END_OF_TEXT)
            .with_context(|| format!("{}: the tokenizer has no {END_OF_TEXT} token", tokenizer_dir.display()))?;
        let vocab_size = tokenizer.get_vocab_size(true);
        let width = Width::for_vocab(vocab_size);
        fs::copy(tokenizer_dir.join(tokenizer::FILE), ctx.out.join(tokenizer::FILE)).context("copying the tokenizer")?;

        let units = Units::new(ctx)?;
        let tokenizer_digest = units::file_digest(&tokenizer_dir.join(tokenizer::FILE))?;
        let encoding = Encoding {
            encoder: BatchEncoder::new(&tokenizer)?,
            pool: rayon::ThreadPoolBuilder::new().num_threads(ctx.threads).build()?,
            eot,
            width,
            val_fraction: params.val_fraction,
            // Tokens take about as much memory again as their text.
            batch_limit: (working_memory_mb(params.memory_mb) << 20) / 16,
        };
        let total_bytes: u64 = parts.iter().filter_map(|p| fs::metadata(p).ok()).map(|m| m.len()).sum();
        let (mut done, mut cached, mut done_bytes) = (Vec::new(), 0, 0);
        let (mut encoded_bytes, mut encode_seconds) = (0, 0.0);
        for part in &parts {
            let key = units::key(&json!({
                "shard": Shard::VERSION, "tokenizer": tokenizer_digest, "val_fraction": params.val_fraction, "part": units::file_digest(part)?,
            }));
            match units.load(&key) {
                Some(unit) => {
                    cached += 1;
                    done.push(unit);
                }
                None => {
                    let start = Instant::now();
                    let unit = units.build(&key, |dir| encode_part(part, &encoding, dir))?;
                    encode_seconds += start.elapsed().as_secs_f64();
                    encoded_bytes += count(&unit, "text_bytes");
                    done.push(unit);
                }
            }
            done_bytes += fs::metadata(part).map(|m| m.len()).unwrap_or(0);
            ctx.progress(done_bytes, total_bytes, "bytes");
        }
        for split in SPLITS {
            units.link(&done, split, "units", false)?;
        }

        let [train, val] = SPLITS.map(|split| pack(split, &done, &units, &ctx.out, width, params.shard_tokens));
        let manifest = Manifest { vocab_size, width, eot, train: train?, val: val? };
        let documents = manifest.train.documents + manifest.val.documents;
        if manifest.train.documents == 0 {
            bail!("{}: no documents to shard", docs_dir.display());
        }
        if params.val_fraction > 0.0 && manifest.val.documents == 0 {
            bail!(
                "val_fraction = {} put none of the {documents} documents in the validation split; raise it, or set it to 0 for no validation split",
                params.val_fraction,
            );
        }
        manifest.write(&ctx.out)?;

        let tokens = manifest.train.tokens + manifest.val.tokens;
        let text_bytes: u64 = done.iter().map(|u| count(u, "text_bytes")).sum();
        // The end-of-text tokens are not text; leave them out of the ratio.
        let bytes_per_token = text_bytes as f64 / (tokens - documents).max(1) as f64;
        ctx.metric("documents", documents);
        ctx.metric("train_tokens", manifest.train.tokens);
        ctx.metric("val_tokens", manifest.val.tokens);
        ctx.metric("bytes_per_token", bytes_per_token);
        ctx.metric("parts_cached", cached);
        let encoded = if encoded_bytes > 0 {
            let mb_per_s = encoded_bytes as f64 / 1e6 / encode_seconds;
            ctx.metric("encode_mb_per_s", mb_per_s);
            format!(", encoded at {mb_per_s:.1} MB/s")
        } else {
            String::new()
        };
        eprintln!(
            "{documents} documents → {} train tokens in {} shards, {} val tokens in {} shards ({:?}); {bytes_per_token:.3} bytes per token; {} of {} parts encoded, {cached} unchanged since a cached run{encoded}",
            manifest.train.tokens,
            manifest.train.shards.len(),
            manifest.val.tokens,
            manifest.val.shards.len(),
            width,
            parts.len() - cached,
            parts.len(),
        );
        Ok(())
    }
}

fn count(unit: &Unit, field: &str) -> u64 {
    unit.meta[field].as_u64().unwrap_or(0)
}

/// Encodes one part into `dir/train/tokens.bin` and `dir/val/tokens.bin`,
/// each document's tokens followed by `<|endoftext|>`, in document order.
fn encode_part(part: &Path, e: &Encoding, dir: &Path) -> Result<Value> {
    let mut runs = Vec::new();
    for split in SPLITS {
        fs::create_dir_all(dir.join(split))?;
        let path = dir.join(split).join("tokens.bin");
        let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        runs.push((BufWriter::with_capacity(1 << 20, file), path, 0u64, 0u64));
    }
    let (mut text_bytes, mut bytes) = (0u64, Vec::new());
    for df in docs::batches(part)? {
        let df = df?;
        let ids = df.column("id")?.str()?;
        let texts: Vec<&str> = df.column("text")?.str()?.iter().map(Option::unwrap_or_default).collect();
        let is_val: Vec<bool> = ids.iter().map(|id| in_val(id.unwrap_or_default(), e.val_fraction)).collect();
        let mut first = 0;
        while first < texts.len() {
            let mut last = first;
            let mut batch_bytes = 0;
            while last < texts.len() && (last == first || batch_bytes + texts[last].len() <= e.batch_limit) {
                batch_bytes += texts[last].len();
                last += 1;
            }
            let encoded = e.pool.install(|| e.encoder.encode(&texts[first..last]))?;
            for (doc, mut tokens) in (first..last).zip(encoded) {
                tokens.push(e.eot);
                let (file, path, documents, count) = &mut runs[usize::from(is_val[doc])];
                bytes.clear();
                e.width.encode(&tokens, &mut bytes)?;
                file.write_all(&bytes).with_context(|| format!("cannot write {}", path.display()))?;
                *documents += 1;
                *count += tokens.len() as u64;
            }
            text_bytes += batch_bytes as u64;
            first = last;
        }
    }
    let mut meta = json!({ "text_bytes": text_bytes });
    for (split, (mut file, path, documents, tokens)) in SPLITS.into_iter().zip(runs) {
        file.flush().with_context(|| format!("cannot write {}", path.display()))?;
        meta[format!("{split}_documents")] = json!(documents);
        meta[format!("{split}_tokens")] = json!(tokens);
    }
    Ok(meta)
}

/// Packs the token runs of `split` of every unit, in order, into shards of
/// `shard_tokens`.
fn pack(split: &'static str, done: &[Unit], units: &Units, out: &Path, width: Width, shard_tokens: u64) -> Result<SplitInfo> {
    let mut writer = SplitWriter { name: split, dir: out.to_path_buf(), width, shard_tokens, current: None, info: SplitInfo::default() };
    for unit in done {
        let name = unit.files.get(split).and_then(|f| f.first()).with_context(|| format!("unit {} has no {split} tokens", unit.key))?;
        let path = units.path(name);
        let mut run = File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
        writer.append(&mut run, count(unit, &format!("{split}_tokens")))?;
        writer.info.documents += count(unit, &format!("{split}_documents"));
    }
    writer.finish()
}

/// Whether the document `id` belongs to the validation split.
fn in_val(id: &str, val_fraction: f64) -> bool {
    let hash = blake3::hash(id.as_bytes());
    let h = u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap());
    // The top 53 bits map exactly onto [0, 1) in an f64.
    ((h >> 11) as f64 / (1u64 << 53) as f64) < val_fraction
}

/// The shards of one split, written as token runs are appended.
struct SplitWriter {
    name: &'static str,
    dir: PathBuf,
    width: Width,
    shard_tokens: u64,
    current: Option<ShardWriter>,
    info: SplitInfo,
}

impl SplitWriter {
    /// Appends `tokens` tokens from `run`, opening and closing shards as they fill.
    fn append(&mut self, run: &mut File, mut tokens: u64) -> Result<()> {
        while tokens > 0 {
            if self.current.is_none() {
                self.current = Some(ShardWriter::create(&self.dir.join(self.next_file()), self.width)?);
            }
            let writer = self.current.as_mut().expect("opened above");
            let now = (self.shard_tokens - writer.tokens()).min(tokens);
            writer.copy_from(run, now)?;
            tokens -= now;
            if writer.tokens() == self.shard_tokens {
                self.close()?;
            }
        }
        Ok(())
    }

    /// The file name of the shard being written (or about to be).
    fn next_file(&self) -> String {
        format!("{}_{:06}.bin", self.name, self.info.shards.len())
    }

    fn close(&mut self) -> Result<()> {
        if let Some(writer) = self.current.take() {
            let tokens = writer.finish()?;
            self.info.shards.push(ShardInfo { file: self.next_file(), tokens });
            self.info.tokens += tokens;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<SplitInfo> {
        self.close()?;
        Ok(self.info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::loader::Split;
    use crate::testing::{corpus, python_with, run_python, tokenizer_artifact, write_docs, CORPORA};
    use std::path::Path;

    fn shard(params: &Params, docs: &Path, tok: &Path, out: &Path) -> StageCtx {
        std::fs::create_dir_all(out).unwrap();
        let mut ctx = StageCtx::new("tokens", out, out, out);
        ctx.inputs.insert("docs".into(), docs.to_path_buf());
        ctx.inputs.insert("tokenizer".into(), tok.to_path_buf());
        ctx.threads = 2;
        Shard::run(params, &mut ctx).unwrap();
        ctx
    }

    #[test]
    fn shards_decode_back_to_every_corpus() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for name in CORPORA {
            let text = corpus(name);
            let docs = dir.join(name).join("docs");
            write_docs(&docs, name, &text);
            tokenizer_artifact(&docs, &dir.join(name).join("tok"), serde_json::json!({"vocab_size": 2000, "max_chars": 300_000}));
            let out = dir.join(name).join("tokens");
            let params = Params { shard_tokens: 100_000, ..Default::default() };
            let ctx = shard(&params, &docs, &dir.join(name).join("tok"), &out);

            let manifest = Manifest::read(&out).unwrap();
            assert!(manifest.train.shards.len() > 1, "{name}: several shards");
            for split in [&manifest.train, &manifest.val] {
                let (last, full) = split.shards.split_last().unwrap();
                assert!(full.iter().all(|s| s.tokens == 100_000));
                assert_eq!(split.tokens, full.len() as u64 * 100_000 + last.tokens);
            }
            assert_eq!(ctx.metrics()["train_tokens"], manifest.train.tokens);
            let frac = manifest.val.documents as f64 / (manifest.train.documents + manifest.val.documents) as f64;
            assert!((0.07..0.13).contains(&frac), "{name}: {frac} of documents in val");

            // Every document, decoded from the shards, is its text again.
            let tokenizer = tokenizer::load(&out).unwrap();
            let df = docs::read(&docs).unwrap();
            let ids = df.column("id").unwrap().str().unwrap();
            let mut expected: [Vec<&str>; 2] = [vec![], vec![]];
            let texts = docs::texts(&df).unwrap();
            for (id, text) in ids.iter().zip(&texts) {
                expected[in_val(id.unwrap(), 0.1) as usize].push(text);
            }
            for (split_name, expected) in ["train", "val"].into_iter().zip(expected) {
                let split = Split::open(&out, split_name).unwrap();
                let mut tokens = Vec::new();
                split.read_into(0, split.len() as usize, &mut tokens);
                let docs_back: Vec<String> = tokens
                    .split(|&t| t == manifest.eot as i64)
                    .take(expected.len())
                    .map(|ids| tokenizer.decode(&ids.iter().map(|&t| t as u32).collect::<Vec<_>>(), false).unwrap())
                    .collect();
                assert_eq!(docs_back, expected, "{name} {split_name}");
                assert_eq!(tokens.last(), Some(&(manifest.eot as i64)));
            }
        }
    }

    #[test]
    fn numpy_reads_the_shards() {
        let Some(python) = python_with("numpy") else { return };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_docs(&dir.join("docs"), "moby", &corpus("moby_dick.txt"));
        tokenizer_artifact(&dir.join("docs"), &dir.join("tok"), serde_json::json!({"vocab_size": 1000}));
        shard(&Params { shard_tokens: 50_000, ..Default::default() }, &dir.join("docs"), &dir.join("tok"), &dir.join("out"));
        for split_name in ["train", "val"] {
            let tokens_file = dir.join(format!("{split_name}.i64"));
            run_python(&python, "read_shards.py", &[&dir.join("out"), Path::new(split_name), &tokens_file]);
            let split = Split::open(&dir.join("out"), split_name).unwrap();
            let mut tokens = Vec::new();
            split.read_into(0, split.len() as usize, &mut tokens);
            let numpy: Vec<i64> =
                std::fs::read(&tokens_file).unwrap().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
            assert_eq!(numpy, tokens, "{split_name}");
        }
    }

    #[test]
    fn special_token_strings_in_documents_stay_text() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let text = corpus("tinyshakespeare.txt")[..200_000].to_string() + "\n\nA <|endoftext|> inside a document.";
        write_docs(&dir.join("docs"), "s", &text);
        tokenizer_artifact(&dir.join("docs"), &dir.join("tok"), serde_json::json!({"vocab_size": 500}));
        shard(&Params { val_fraction: 0.0, ..Default::default() }, &dir.join("docs"), &dir.join("tok"), &dir.join("out"));
        let manifest = Manifest::read(&dir.join("out")).unwrap();
        assert_eq!(manifest.val, SplitInfo::default());
        let split = Split::open(&dir.join("out"), "train").unwrap();
        let mut tokens = Vec::new();
        split.read_into(0, split.len() as usize, &mut tokens);
        let eots = tokens.iter().filter(|&&t| t == manifest.eot as i64).count() as u64;
        assert_eq!(eots, manifest.train.documents, "one end-of-text per document, none from the text");
    }

    #[test]
    fn the_val_split_depends_only_on_the_id() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("doc{i}")).collect();
        let val = ids.iter().filter(|id| in_val(id, 0.1)).count();
        assert!((900..1100).contains(&val), "{val}");
        assert!(ids.iter().all(|id| !in_val(id, 0.0)));
        assert!(ids.iter().filter(|id| in_val(id, 0.05)).all(|id| in_val(id, 0.1)), "a larger fraction keeps the smaller's documents");
    }
}
