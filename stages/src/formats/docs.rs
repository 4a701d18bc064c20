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
