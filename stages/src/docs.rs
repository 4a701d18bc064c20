//! The documents format every data stage reads and writes.
//!
//! A documents artifact holds one Parquet file, `docs.parquet`, with at least
//! the columns `id` (string, unique), `text` (string) and `source` (string,
//! where the document came from). Stages may add columns (filter scores,
//! cluster ids); readers ignore the ones they do not know.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};
use polars::prelude::{DataFrame, DataType, ParquetCompression, ParquetReader, ParquetWriter, SerReader};

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

/// Writes documents into an artifact directory (zstd-compressed Parquet).
pub fn write(dir: &Path, df: &mut DataFrame) -> Result<()> {
    let path = dir.join(FILE);
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    ParquetWriter::new(file)
        .with_compression(ParquetCompression::Zstd(None))
        .finish(df)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
