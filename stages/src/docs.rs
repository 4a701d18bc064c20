//! The documents format every data stage reads and writes.
//!
//! A documents artifact holds one Parquet file, `docs.parquet`, with at least
//! the columns `id` (string, unique), `text` (string) and `source` (string,
//! where the document came from). Stages may add columns (filter scores,
//! cluster ids); readers ignore the ones they do not know.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};
use polars::prelude::{
    BooleanChunked, Column, DataFrame, DataType, NewChunkedArray, ParquetCompression, ParquetReader, ParquetWriter, SerReader,
};

/// The file name inside a documents artifact.
pub const FILE: &str = "docs.parquet";

/// Reads the documents of an artifact directory, checking the columns.
pub fn read(dir: &Path) -> Result<DataFrame> {
    let path = dir.join(FILE);
    let file = File::open(&path).with_context(|| format!("cannot open {}: the input is not a documents artifact", path.display()))?;
    let df = ParquetReader::new(file).finish().with_context(|| format!("cannot read {}", path.display()))?;
    for column in ["id", "text", "source"] {
        match df.column(column) {
            Ok(c) if c.dtype() == &DataType::String => {}
            Ok(c) => bail!("{}: column `{column}` is {}, expected a string", path.display(), c.dtype()),
            Err(_) => bail!("{}: missing column `{column}` (documents need id, text, source)", path.display()),
        }
    }
    Ok(df)
}

/// The `text` column as owned strings, in document order.
pub fn texts(df: &DataFrame) -> Result<Vec<String>> {
    let col = df.column("text")?.str()?;
    Ok(col.iter().map(|t| t.unwrap_or_default().to_string()).collect())
}

/// Builds a documents frame from its three columns.
pub fn frame(ids: Vec<String>, texts: Vec<String>, sources: Vec<String>) -> Result<DataFrame> {
    let height = ids.len();
    let columns = vec![Column::new("id".into(), ids), Column::new("text".into(), texts), Column::new("source".into(), sources)];
    Ok(DataFrame::new(height, columns)?)
}

/// The rows of `df` whose `keep` flag is set, in their original order.
pub fn select(df: &DataFrame, keep: &[bool]) -> Result<DataFrame> {
    Ok(df.filter(&BooleanChunked::from_slice("keep".into(), keep))?)
}

/// Writes documents into an artifact directory (zstd-compressed Parquet).
pub fn write(dir: &Path, df: &mut DataFrame) -> Result<()> {
    write_table(&dir.join(FILE), df)
}

/// Writes any table a stage produces (documents, removed rows, clusters).
/// The encoding depends only on the data, so equal tables give equal bytes and
/// the engine's early cutoff works.
pub fn write_table(path: &Path, df: &mut DataFrame) -> Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    ParquetWriter::new(file)
        .with_compression(ParquetCompression::Zstd(None))
        .finish(df)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Fixtures the data stages' tests share.
#[cfg(test)]
pub mod testing {
    use std::path::PathBuf;

    use super::*;
    use crate::{Stage, StageCtx};

    /// A shipped corpus, by file name.
    pub fn corpus(name: &str) -> String {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/corpora/")).join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The blank-line separated paragraphs of a corpus with at least
    /// `min_words` words, trimmed.
    pub fn novel_paragraphs(name: &str, min_words: usize) -> Vec<String> {
        let text = corpus(name).replace("\r\n", "\n");
        text.split("\n\n").map(str::trim).filter(|p| p.split_whitespace().count() >= min_words).map(str::to_string).collect()
    }

    /// Runs a stage on documents `d0`, `d1`, … with the given texts; returns
    /// its output directory and context (for metrics).
    pub fn run_stage<S: Stage>(params: &S::Params, texts: &[&str]) -> (tempfile::TempDir, StageCtx) {
        run_on::<S>(params, &input(texts))
    }

    /// A documents artifact `d0`, `d1`, … with the given texts.
    pub fn input(texts: &[&str]) -> tempfile::TempDir {
        let input = tempfile::tempdir().unwrap();
        let ids = (0..texts.len()).map(|i| format!("d{i}")).collect();
        let mut df = frame(ids, texts.iter().map(|t| t.to_string()).collect(), vec!["test".to_string(); texts.len()]).unwrap();
        write(input.path(), &mut df).unwrap();
        input
    }

    /// Runs a stage on the documents artifact `input`.
    pub fn run_on<S: Stage>(params: &S::Params, input: &tempfile::TempDir) -> (tempfile::TempDir, StageCtx) {
        let out = tempfile::tempdir().unwrap();
        let mut ctx = StageCtx::new("test", input.path(), out.path(), input.path());
        ctx.inputs.insert("input".into(), input.path().to_path_buf());
        S::run(params, &mut ctx).unwrap();
        (out, ctx)
    }

    /// The texts of `corpus.jsonl` in the benchmark corpus directory named by
    /// `LLMFLOW_BENCH_CORPUS` (made by `bench/make_corpus.py`).
    pub fn bench_corpus() -> (PathBuf, Vec<String>) {
        let dir = PathBuf::from(std::env::var("LLMFLOW_BENCH_CORPUS").expect("set LLMFLOW_BENCH_CORPUS; see bench/run.sh"));
        let texts = std::fs::read_to_string(dir.join("corpus.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string())
            .collect();
        (dir, texts)
    }

    /// SplitMix64: a seeded generator so test corpora are the same every run.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in `0..n` (n > 0).
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
    }
}
