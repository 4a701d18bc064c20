//! The documents format every data stage reads and writes.
//!
//! A documents artifact holds sharded Parquet, as FineWeb publishes it:
//! `docs/part-00000.parquet`, `docs/part-00001.parquet`, … in document order,
//! each holding about a stage's `part_mb` of text in row groups of about
//! [`ROW_GROUP_BYTES`], so a reader holds one row group at a time whatever
//! the corpus size. The columns are at least `id` (string, unique), `text`
//! (string) and `source` (string, where the document came from). Stages may
//! add columns (filter scores, cluster ids); readers ignore the ones they do
//! not know. A folder with one `docs.parquet` instead (an older artifact, a
//! `command` stage's output) reads as a single part.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use polars::io::parquet::metadata::FileMetadataRef;
use polars::io::parquet::write::BatchedWriter;
use polars::prelude::{
    BooleanChunked, Column, DataFrame, DataType, NewChunkedArray, ParquetCompression, ParquetReader, ParquetWriter, SerReader,
};

/// The folder of parts inside a documents artifact.
pub const DIR: &str = "docs";
/// The single file of an unsharded documents folder.
const SINGLE: &str = "docs.parquet";
/// Text per row group: what a reader or writer holds of one part at a time.
/// A constant, so the bytes written never depend on a memory budget.
pub const ROW_GROUP_BYTES: usize = 4 << 20;
/// What a row costs besides its text (id, source, offsets), for row-group sizing.
const ROW_OVERHEAD: usize = 64;

/// The name of part `n` of a sharded table.
pub fn part_name(n: usize) -> String {
    format!("part-{n:05}.parquet")
}

/// The Parquet parts of the documents artifact in `dir`, in document order.
pub fn parts(dir: &Path) -> Result<Vec<PathBuf>> {
    let sharded = dir.join(DIR);
    if sharded.is_dir() {
        return parquet_files(&sharded);
    }
    let single = dir.join(SINGLE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    bail!("{}: not a documents artifact (no {DIR}/ folder of Parquet parts and no {SINGLE})", dir.display())
}

/// The `.parquet` files of a folder, sorted by name.
pub fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "parquet") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The row groups of one Parquet file, read one at a time (optionally only
/// some columns), each as a frame.
pub struct RowGroups {
    path: PathBuf,
    metadata: FileMetadataRef,
    columns: Option<Vec<String>>,
    next: usize,
    offset: usize,
}

impl RowGroups {
    pub fn open(path: &Path, columns: Option<&[&str]>) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let metadata = ParquetReader::new(file).get_metadata().with_context(|| format!("{}: not a Parquet file", path.display()))?.clone();
        let columns = columns.map(|c| c.iter().map(|s| s.to_string()).collect());
        Ok(RowGroups { path: path.to_path_buf(), metadata, columns, next: 0, offset: 0 })
    }

    /// Rows in the whole file.
    pub fn rows(&self) -> usize {
        self.metadata.num_rows
    }

    /// The first row of the next row group (rows are counted from 0).
    pub fn offset(&self) -> usize {
        self.offset
    }

    fn read(&mut self) -> Result<DataFrame> {
        let rows = self.metadata.row_groups[self.next].num_rows();
        let file = File::open(&self.path).with_context(|| format!("cannot open {}", self.path.display()))?;
        let mut reader = ParquetReader::new(file).with_slice(Some((self.offset, rows))).with_columns(self.columns.clone());
        reader.set_metadata(self.metadata.clone());
        let df = reader.finish().with_context(|| {
            format!("{}: row group {} (rows {}..{}) is corrupt", self.path.display(), self.next, self.offset, self.offset + rows)
        })?;
        self.next += 1;
        self.offset += rows;
        Ok(df)
    }
}

impl Iterator for RowGroups {
    type Item = Result<DataFrame>;

    fn next(&mut self) -> Option<Result<DataFrame>> {
        (self.next < self.metadata.row_groups.len()).then(|| self.read())
    }
}

/// The row groups of one part of a documents artifact, checking the columns.
pub fn batches(part: &Path) -> Result<impl Iterator<Item = Result<DataFrame>>> {
    let path = part.to_path_buf();
    Ok(RowGroups::open(part, None)?.map(move |df| {
        let df = df?;
        check_columns(&df, &path)?;
        Ok(df)
    }))
}

fn check_columns(df: &DataFrame, path: &Path) -> Result<()> {
    for column in ["id", "text", "source"] {
        match df.column(column) {
            Ok(c) if c.dtype() == &DataType::String => {}
            Ok(c) => bail!("{}: column `{column}` is {}, expected a string", path.display(), c.dtype()),
            Err(_) => bail!("{}: missing column `{column}` (documents need id, text, source)", path.display()),
        }
    }
    Ok(())
}

/// Every document of an artifact in one frame: for stages that need the
/// whole corpus at once (tokenizer training) and for tests.
pub fn read(dir: &Path) -> Result<DataFrame> {
    concat(&parts(dir)?, true)
}

/// A sharded table (`removed/`, `clusters/`) in one frame.
pub fn read_table(dir: &Path) -> Result<DataFrame> {
    concat(&parquet_files(dir)?, false)
}

fn concat(files: &[PathBuf], documents: bool) -> Result<DataFrame> {
    let mut all: Option<DataFrame> = None;
    for file in files {
        for df in RowGroups::open(file, None)? {
            let df = df?;
            if documents {
                check_columns(&df, file)?;
            }
            if let Some(all) = &mut all {
                all.vstack_mut_owned(df)?;
            } else {
                all = Some(df);
            }
        }
    }
    let mut df = all.unwrap_or(frame(Vec::new(), Vec::new(), Vec::new())?);
    df.rechunk_mut();
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

/// Writes a documents artifact into `dir` in one go (tests, small outputs).
pub fn write(dir: &Path, df: &DataFrame) -> Result<()> {
    let mut parts = PartWriter::new(&dir.join(DIR), "part-", usize::MAX);
    parts.push(df)?;
    parts.finish()?;
    Ok(())
}

/// Writes a table as sharded Parquet, streaming: rows are pushed in order,
/// grouped into row groups of about [`ROW_GROUP_BYTES`] of text and into
/// files `PREFIX00000.parquet`, … of about `part_bytes`. Where the cuts fall
/// depends only on the rows, never on how they were pushed, so equal tables
/// give equal bytes (zstd, no timestamps) and the engine's early cutoff works.
pub struct PartWriter {
    dir: PathBuf,
    prefix: String,
    part_bytes: usize,
    file: Option<(BatchedWriter<File>, PathBuf)>,
    pending: Vec<DataFrame>,
    pending_bytes: usize,
    in_part: usize,
    written: Vec<PathBuf>,
    rows: usize,
}

impl PartWriter {
    pub fn new(dir: &Path, prefix: &str, part_bytes: usize) -> Self {
        PartWriter {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            part_bytes,
            file: None,
            pending: Vec::new(),
            pending_bytes: 0,
            in_part: 0,
            written: Vec::new(),
            rows: 0,
        }
    }

    /// Appends rows (every push with the same columns).
    pub fn push(&mut self, df: &DataFrame) -> Result<()> {
        let sizes: Vec<usize> = match df.column("text").ok().and_then(|c| c.str().ok()) {
            Some(text) => text.iter().map(|t| t.map_or(0, str::len) + ROW_OVERHEAD).collect(),
            None => vec![ROW_OVERHEAD; df.height()],
        };
        let mut start = 0;
        for (i, size) in sizes.into_iter().enumerate() {
            self.pending_bytes += size;
            if self.pending_bytes >= ROW_GROUP_BYTES {
                self.pending.push(df.slice(start as i64, i + 1 - start));
                start = i + 1;
                self.flush()?;
            }
        }
        if start < df.height() {
            self.pending.push(df.slice(start as i64, df.height() - start));
        }
        self.rows += df.height();
        Ok(())
    }

    /// Rows pushed so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    fn flush(&mut self) -> Result<()> {
        let mut pending = std::mem::take(&mut self.pending).into_iter();
        let Some(mut group) = pending.next() else { return Ok(()) };
        for df in pending {
            group.vstack_mut_owned(df)?;
        }
        // One chunk is one row group.
        group.rechunk_mut();
        if self.file.is_none() {
            fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
            let path = self.dir.join(format!("{}{:05}.parquet", self.prefix, self.written.len()));
            let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
            let writer = ParquetWriter::new(file).with_compression(ParquetCompression::Zstd(None)).batched(group.schema())?;
            self.file = Some((writer, path));
        }
        let (writer, path) = self.file.as_mut().expect("opened above");
        writer.write_batch(&group).with_context(|| format!("cannot write {}", path.display()))?;
        self.in_part += self.pending_bytes;
        self.pending_bytes = 0;
        if self.in_part >= self.part_bytes {
            self.close()?;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some((writer, path)) = self.file.take() {
            writer.finish().with_context(|| format!("cannot write {}", path.display()))?;
            self.written.push(path);
        }
        self.in_part = 0;
        Ok(())
    }

    /// Writes what is pending; returns the files written, in order (none
    /// when no row was pushed).
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        self.flush()?;
        self.close()?;
        Ok(self.written)
    }
}

/// Writes a whole table as one Parquet file (small tables: clusters of a
/// test, fixtures).
pub fn write_table(path: &Path, df: &mut DataFrame) -> Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    ParquetWriter::new(file)
        .with_compression(ParquetCompression::Zstd(None))
        .finish(df)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
