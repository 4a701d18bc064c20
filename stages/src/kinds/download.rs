//! `download`: turn local files and URLs into a documents artifact.
//!
//! ```toml
//! [stages.corpus]
//! kind = "download"
//! sources = [
//!   { url = "https://example.org/input.txt", mirrors = ["data/corpora/tinyshakespeare.txt"], blake3 = "…", split = "paragraph" },
//!   { url = "data/extra/*.jsonl.gz", text_field = "content" },
//! ]
//! ```
//!
//! Each source has a `url`: a local path or glob (relative to the pipeline's
//! directory, matches taken in sorted order), a `file://` URL, or an
//! `http(s)://` URL. Per source:
//!
//! * `mirrors`: more URLs or paths with the same bytes, tried in order when the
//!   `url` fails (or fails its checksum).
//! * `blake3` / `sha256`: the expected hex digest of the bytes as fetched
//!   (before decompression). A mismatch is an error naming the source and both
//!   digests, and nothing is published. A checksum needs the source to be one
//!   file.
//! * `format`: `text`, `jsonl` or `parquet`; by default inferred from the
//!   `url`'s extension (`.jsonl`/`.ndjson`/`.json` → jsonl, `.parquet` →
//!   parquet, anything else → text), ignoring `.gz`/`.zst`. Gzip and zstd data
//!   is decompressed transparently, recognized by its magic bytes; a file
//!   named `.gz` or `.zst` whose bytes are not is an error saying so.
//! * `text_field`: the JSONL key or Parquet column holding the text (default
//!   `text`).
//! * `id_field`: the JSONL key or Parquet column holding each document's own
//!   id (a string or a number, kept as text; unique, as FineWeb's are), as
//!   datatrove's `id_key`: a document keeps it through `filter` and `dedup`.
//!   Unset, ids are `SOURCE#N`.
//! * `split` (text only): `"file"` (one document per file, the default),
//!   `"paragraph"` (blank-line separated) or `{ lines = N }`.
//!
//! The `source` column is the source's `url` as written (for a glob, each
//! matched path), never the mirror that served the bytes: the same bytes give
//! the same output whichever copy was reachable, so dependents stay fresh.
//! Document ids are `SOURCE#N` unless `id_field` names them. Empty documents
//! are skipped.
//!
//! HTTP (reqwest): timeouts (`timeout_secs` for connecting and between
//! reads), up to `retries` retries with exponential backoff from
//! `backoff_ms` on connection errors, cut bodies and 408/429/5xx, and resume of
//! a partial file with `Range` (kept in the stage's work directory). Gzip and
//! zstd are decompressed streaming, up to `max_bytes` (8 GiB) per source.
//! `retries`, `timeout_secs`, `backoff_ms` and `max_bytes` are volatile.
//!
//! Local sources are part of the stage's key (a glob through the directory
//! before its first wildcard), so editing a corpus rebuilds the stage; HTTP
//! sources are keyed by their URL and checksum.
//!
//! Streaming: every file is read as a stream (decompressed on the fly, JSONL
//! and text line by line, Parquet one row group at a time) into sharded
//! Parquet (`docs/part-00000.parquet`, … of about `part_mb` of text each; see
//! [`crate::formats::docs`]). Files are read in parallel, as many at once as
//! the stage's threads and `memory_mb` (volatile) allow. Each file is its own
//! unit, cached in the store ([`crate::data::units`]) under a hash of its
//! bytes and the params that shape its documents: adding a file to a list
//! reads only that file, and the parts of the others are linked back in.
//!
//! `on_error`: `"fail"` (default) stops at a file that cannot be read or
//! parsed, naming the file and the line (JSONL, text) or row group
//! (Parquet); `"skip"` leaves such a file out, says so in the log and lists
//! it in the metric `skipped` (file and error), and fails when it leaves
//! out every file.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::data::units::{self, OnError, Unit, Units};
use crate::data::{local_dependency, working_memory_mb};
use crate::formats::docs::{self, PartWriter, RowGroups};
use crate::{Inputs, ParamError, Stage, StageCtx};

pub struct Download;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Where the documents come from: a list of `{ url, mirrors, blake3, sha256, format, text_field, split }`.
    pub sources: Vec<Source>,
    /// Retries per HTTP URL after the first attempt.
    #[schemars(range(max = 100))]
    pub retries: u32,
    /// HTTP timeout for connecting and between reads.
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_secs: u64,
    /// The first retry's delay; each later one doubles it.
    #[schemars(range(max = 3_600_000))]
    pub backoff_ms: u64,
    /// The most bytes one source may decompress to: a small archive that
    /// expands without end (a decompression bomb) stops here.
    #[schemars(range(min = 1))]
    pub max_bytes: u64,
    /// Text per output part, in MB (FineWeb's layout: `docs/part-00000.parquet`, …).
    #[schemars(range(min = 1, max = 1_000_000))]
    pub part_mb: usize,
    /// Peak memory of the stage process in MB, the runtime's 128 included; volatile: bounds how many files are read at once.
    #[schemars(range(min = 256, max = 1_000_000_000))]
    pub memory_mb: usize,
    /// `fail` at a file that cannot be read, or `skip` it (logged, listed in the metric `skipped`).
    pub on_error: OnError,
}

/// Memory one file being read holds: a row group of text as it is parsed,
/// the same being encoded, and the decoders' buffers.
const PER_FILE_MB: usize = 48;

impl Default for Params {
    fn default() -> Self {
        Params {
            sources: Vec::new(),
            retries: 5,
            timeout_secs: 30,
            backoff_ms: 1000,
            max_bytes: 8 << 30,
            part_mb: 256,
            memory_mb: 1024,
            on_error: OnError::Fail,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Source {
    /// A local path or glob (relative to the pipeline), a `file://` or an `http(s)://` URL.
    pub url: String,
    /// More URLs or paths with the same bytes, tried in order when `url` fails.
    pub mirrors: Vec<String>,
    /// The expected BLAKE3 hex digest of the bytes as fetched.
    pub blake3: Option<String>,
    /// The expected SHA-256 hex digest of the bytes as fetched.
    pub sha256: Option<String>,
    /// `text`, `jsonl` or `parquet`; inferred from the extension if unset.
    pub format: Option<Format>,
    /// The JSONL key or Parquet column holding the text.
    pub text_field: String,
    /// The JSONL key or Parquet column holding each document's id (kept as text); unset: `SOURCE#N`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_field: Option<String>,
    /// Text only: `"file"`, `"paragraph"` (blank-line separated) or `{ lines = N }`.
    pub split: SplitBy,
}

impl Default for Source {
    fn default() -> Self {
        Source {
            url: String::new(),
            mirrors: Vec::new(),
            blake3: None,
            sha256: None,
            format: None,
            text_field: "text".to_string(),
            id_field: None,
            split: SplitBy::File,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Text,
    Jsonl,
    Parquet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SplitBy {
    File,
    Paragraph,
    Lines(usize),
}

impl Stage for Download {
    const KIND: &'static str = "download";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "read local files, globs and URLs (checksummed, resumable) into documents";
    const INPUTS: Inputs = Inputs::Fixed(&[]);
    const VOLATILE: &'static [&'static str] = &["retries", "timeout_secs", "backoff_ms", "max_bytes", "memory_mb"];
    type Params = Params;

    fn check(p: &Params, _inputs: &[String]) -> Result<(), ParamError> {
        if p.sources.is_empty() {
            return Err(ParamError::new(&["sources"], "`sources` is empty: list at least one `{ url = \"...\" }`"));
        }
        for (i, s) in p.sources.iter().enumerate() {
            let index = i.to_string();
            let at = |field: &str| ParamError::new(&["sources", &index, field], "");
            if s.url.trim().is_empty() {
                return Err(ParamError { message: "`url` is required: a path, glob, file:// or http(s):// URL".into(), ..at("url") });
            }
            if s.split == SplitBy::Lines(0) {
                return Err(ParamError { message: "`lines` must be at least 1".into(), ..at("split") });
            }
            if s.split != SplitBy::File && s.format_of(&s.url) != Format::Text {
                return Err(ParamError { message: "`split` applies to text sources only".into(), ..at("split") });
            }
            for (field, digest, len) in [("blake3", &s.blake3, 64), ("sha256", &s.sha256, 64)] {
                if digest.as_ref().is_some_and(|d| d.len() != len || !d.chars().all(|c| c.is_ascii_hexdigit())) {
                    return Err(ParamError { message: format!("`{field}` must be {len} hex digits"), ..at(field) });
                }
            }
        }
        Ok(())
    }

    fn files(p: &Params) -> Vec<String> {
        p.sources.iter().filter_map(|s| local_dependency(&s.url)).collect()
    }

    fn run(p: &Params, ctx: &mut StageCtx) -> Result<()> {
        let started = Instant::now();
        let mut files = Vec::new();
        let mut labels = HashSet::new();
        for (index, source) in p.sources.iter().enumerate() {
            for (label, path) in fetch_source(source, p, ctx)? {
                if !labels.insert(label.clone()) {
                    bail!("{label} is listed by two sources; remove one of them");
                }
                files.push(Input { label, path, source: index });
            }
        }
        let units = Units::new(ctx)?;
        let workers = ctx.threads.min(working_memory_mb(p.memory_mb) / PER_FILE_MB).max(1);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(workers).build()?;
        let results: Vec<Result<(Unit, bool)>> = pool.install(|| files.par_iter().map(|input| read_file(input, p, &units)).collect());
        let labels = files.iter().map(|f| f.label.clone());
        let (done, cached) = units::gather(labels.zip(results), p.on_error, ctx)?;
        units.link(&done, "docs", docs::DIR, true)?;
        let count: u64 = done.iter().map(|u| u.meta["documents"].as_u64().unwrap_or(0)).sum();
        let chars: u64 = done.iter().map(|u| u.meta["text_bytes"].as_u64().unwrap_or(0)).sum();
        let bytes: u64 = files.iter().filter_map(|f| fs::metadata(&f.path).ok()).map(|m| m.len()).sum();
        ctx.metric("documents", count);
        ctx.metric("bytes_fetched", bytes);
        ctx.metric("text_bytes", chars);
        ctx.metric("files", files.len());
        ctx.metric("files_cached", cached);
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "download: {count} documents, {chars} bytes of text from {} files ({cached} unchanged since a cached run, {} skipped) in {seconds:.1}s ({:.1} MB/s)",
            files.len(),
            files.len() - done.len(),
            bytes as f64 / 1e6 / seconds.max(1e-9)
        );
        Ok(())
    }
}

/// One file to read: its label (the `source` column) and where its bytes are.
struct Input {
    label: String,
    path: PathBuf,
    source: usize,
}

/// The unit of one file: from the cache when its bytes and params were
/// read before (`true`), otherwise read now.
fn read_file(input: &Input, p: &Params, units: &Units) -> Result<(Unit, bool)> {
    let source = &p.sources[input.source];
    let digest = units::file_digest(&input.path)?;
    let mut key = json!({
        "download": Download::VERSION, "label": input.label, "bytes": digest, "format": source.format_of(&input.label),
        "text_field": source.text_field, "split": source.split, "part_mb": p.part_mb,
    });
    if let Some(id_field) = &source.id_field {
        key["id_field"] = json!(id_field);
    }
    let key = units::key(&key);
    if let Some(unit) = units.load(&key) {
        return Ok((unit, true));
    }
    let unit = units.build(&key, |dir| {
        let mut out = Documents::new(&dir.join("docs"), &input.label, p.part_mb << 20);
        parse(&input.path, source, &input.label, p.max_bytes, &mut out)?;
        let (documents, text_bytes) = out.finish()?;
        Ok(json!({ "documents": documents, "text_bytes": text_bytes }))
    })?;
    Ok((unit, false))
}

/// Documents of one file as they are parsed: ids their own or `LABEL#N`,
/// empty ones skipped, written a row group at a time.
struct Documents {
    label: String,
    writer: PartWriter,
    texts: Vec<String>,
    ids: Vec<Option<String>>,
    pending: usize,
    count: u64,
    text_bytes: u64,
}

impl Documents {
    fn new(dir: &Path, label: &str, part_bytes: usize) -> Self {
        let writer = PartWriter::new(dir, "part-", part_bytes);
        Documents { label: label.to_string(), writer, texts: Vec::new(), ids: Vec::new(), pending: 0, count: 0, text_bytes: 0 }
    }

    /// Adds a document, with its own id when the source names one.
    fn push(&mut self, text: String, id: Option<String>) -> Result<()> {
        if text.trim().is_empty() {
            return Ok(());
        }
        self.pending += text.len();
        self.text_bytes += text.len() as u64;
        self.texts.push(text);
        self.ids.push(id);
        if self.pending >= docs::ROW_GROUP_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let texts = std::mem::take(&mut self.texts);
        let first = self.count;
        self.count += texts.len() as u64;
        let ids = std::mem::take(&mut self.ids)
            .into_iter()
            .zip(first..)
            .map(|(id, n)| id.unwrap_or_else(|| format!("{}#{n}", self.label)))
            .collect();
        let sources = vec![self.label.clone(); texts.len()];
        self.writer.push(&docs::frame(ids, texts, sources)?)?;
        self.pending = 0;
        Ok(())
    }

    /// Writes what is pending; returns the documents and bytes of text written.
    fn finish(mut self) -> Result<(u64, u64)> {
        self.flush()?;
        self.writer.finish()?;
        Ok((self.count, self.text_bytes))
    }
}

impl Source {
    /// The format of a file of this source named `name` (its url or, for a
    /// glob, the matched path).
    fn format_of(&self, name: &str) -> Format {
        self.format.unwrap_or_else(|| {
            let name = name.trim_end_matches(".gz").trim_end_matches(".zst");
            match name.rsplit('.').next().unwrap_or("") {
                "jsonl" | "ndjson" | "json" => Format::Jsonl,
                "parquet" => Format::Parquet,
                _ => Format::Text,
            }
        })
    }
}

fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// The files of a source as `(label, path)`, trying the url and then each
/// mirror, and checking the checksum. HTTP files are fetched into the work
/// directory.
fn fetch_source(source: &Source, p: &Params, ctx: &mut StageCtx) -> Result<Vec<(String, PathBuf)>> {
    let mut failures = Vec::new();
    for location in std::iter::once(&source.url).chain(&source.mirrors) {
        let fetched = fetch(location, p, ctx).and_then(|files| {
            if source.blake3.is_some() || source.sha256.is_some() {
                let [(_, path)] = files.as_slice() else {
                    bail!("matches {} files, but a checksum needs exactly one", files.len());
                };
                verify(source, path)?;
            }
            Ok(files)
        });
        match fetched {
            // The primary url names the data, whichever copy served it.
            Ok(files) if location == &source.url => return Ok(files),
            Ok(files) if files.len() == 1 => return Ok(files.into_iter().map(|(_, d)| (source.url.clone(), d)).collect()),
            Ok(files) => return Ok(files),
            Err(e) => {
                eprintln!("{location}: {e:#}");
                failures.push(format!("  {location}: {e:#}"));
            }
        }
    }
    bail!("cannot fetch source {}:\n{}", source.url, failures.join("\n"))
}

fn verify(source: &Source, path: &Path) -> Result<()> {
    if let Some(expected) = &source.blake3 {
        let actual = units::file_digest(path)?;
        if !actual.eq_ignore_ascii_case(expected) {
            bail!("blake3 mismatch for {}: expected {expected}, got {actual}; fix `blake3` if the data changed on purpose", source.url);
        }
    }
    if let Some(expected) = &source.sha256 {
        let mut hasher = Sha256::new();
        let mut file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let actual: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if !actual.eq_ignore_ascii_case(expected) {
            bail!("sha256 mismatch for {}: expected {expected}, got {actual}; fix `sha256` if the data changed on purpose", source.url);
        }
    }
    Ok(())
}

/// Finds one location: `(label, path)` per file.
fn fetch(location: &str, p: &Params, ctx: &mut StageCtx) -> Result<Vec<(String, PathBuf)>> {
    if is_http(location) {
        return Ok(vec![(location.to_string(), http_get(location, p, ctx)?)]);
    }
    let path = location.strip_prefix("file://").unwrap_or(location);
    let full = ctx.project_path(path);
    if !path.contains(['*', '?', '[']) {
        File::open(&full).with_context(|| format!("cannot read {}", full.display()))?;
        return Ok(vec![(location.to_string(), full)]);
    }
    let pattern = full.to_string_lossy();
    let mut matches: Vec<PathBuf> = glob::glob(&pattern)
        .with_context(|| format!("bad glob pattern {location}"))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot list {location}"))?;
    matches.sort();
    if matches.is_empty() {
        bail!("no file matches {}", full.display());
    }
    matches
        .into_iter()
        .map(|m| {
            let label = m.strip_prefix(&ctx.project_dir).unwrap_or(&m).to_string_lossy().into_owned();
            Ok((label, m))
        })
        .collect()
}

/// Why one HTTP attempt failed: worth retrying or not.
enum Failure {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

fn http_get(url: &str, p: &Params, ctx: &mut StageCtx) -> Result<PathBuf> {
    let timeout = Duration::from_secs(p.timeout_secs);
    let client = reqwest::Client::builder().connect_timeout(timeout).read_timeout(timeout).build()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    fs::create_dir_all(&ctx.work).with_context(|| format!("cannot create {}", ctx.work.display()))?;
    // Keyed by URL so an interrupted run resumes where it stopped.
    let part = ctx.work.join(format!("{}.part", &blake3::hash(url.as_bytes()).to_hex()[..16]));
    let started = Instant::now();
    let mut delay = Duration::from_millis(p.backoff_ms);
    for attempt in 0.. {
        match runtime.block_on(attempt_get(&client, url, &part, ctx)) {
            Ok(()) => break,
            Err(Failure::Retry(e)) if attempt < p.retries => {
                eprintln!("{url}: {e:#}; retrying in {delay:.1?}");
                sleep(delay);
                delay *= 2;
            }
            Err(Failure::Retry(e)) => return Err(e.context(format!("gave up after {} attempts", attempt + 1))),
            Err(Failure::Fatal(e)) => return Err(e),
        }
    }
    // A finished download is never resumed from; the work directory goes
    // once the artifact is published.
    let done = part.with_extension("done");
    fs::rename(&part, &done).with_context(|| format!("cannot rename {}", part.display()))?;
    let len = fs::metadata(&done)?.len();
    let secs = started.elapsed().as_secs_f64();
    eprintln!("{url}: {len} bytes in {secs:.1}s ({:.1} MB/s)", len as f64 / 1e6 / secs.max(1e-9));
    Ok(done)
}

/// Connection errors, timeouts and cut bodies are worth another attempt.
fn transient(e: reqwest::Error) -> Failure {
    if e.is_connect() || e.is_timeout() || e.is_request() || e.is_body() || e.is_decode() {
        Failure::Retry(anyhow!(e))
    } else {
        Failure::Fatal(anyhow!(e))
    }
}

async fn attempt_get(client: &reqwest::Client, url: &str, part: &Path, ctx: &mut StageCtx) -> Result<(), Failure> {
    let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut request = client.get(url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut response = request.send().await.map_err(transient)?;
    let status = response.status().as_u16();
    let append = match status {
        200 => false,
        206 if content_range_start(&response) == Some(have) => true,
        206 | 416 => {
            // The server disagrees about what we have: start over.
            let _ = fs::remove_file(part);
            return Err(Failure::Retry(anyhow!("HTTP {status} for a resume at byte {have}")));
        }
        408 | 429 | 500..=599 => return Err(Failure::Retry(anyhow!("HTTP {status}"))),
        _ => return Err(Failure::Fatal(anyhow!("HTTP {status}"))),
    };
    let open = if append { OpenOptions::new().append(true).open(part) } else { File::create(part) };
    let mut file = open.map_err(|e| Failure::Fatal(anyhow!("cannot write {}: {e}", part.display())))?;
    let mut done = if append { have } else { 0 };
    let total = response.content_length().map_or(0, |len| done + len);
    // A cut connection keeps what arrived, so the next attempt resumes.
    while let Some(chunk) = response.chunk().await.map_err(|e| match transient(e) {
        Failure::Retry(e) => Failure::Retry(e.context(format!("connection lost after {done} bytes"))),
        fatal => fatal,
    })? {
        file.write_all(&chunk).map_err(|e| Failure::Fatal(anyhow!("cannot write {}: {e}", part.display())))?;
        done += chunk.len() as u64;
        ctx.progress(done, total.max(done), "bytes");
    }
    Ok(())
}

fn content_range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response.headers().get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?;
    value.strip_prefix("bytes ")?.split('-').next()?.parse().ok()
}

/// A file's bytes as a stream: gzip and zstd decompressed on the fly (at
/// most `max_bytes`), other data as it is. A file named `.gz` or `.zst`
/// whose bytes are not that format is an error saying so, not whatever
/// parsing its bytes would say.
fn open_stream(path: &Path, name: &str, max_bytes: u64) -> Result<Box<dyn BufRead>> {
    let mut file = BufReader::new(File::open(path).with_context(|| format!("cannot open {}", path.display()))?);
    let magic = file.fill_buf()?.to_vec();
    let (gzip, zstd) = (magic.starts_with(&[0x1f, 0x8b]), magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]));
    for (suffix, format, is) in [(".gz", "gzip", gzip), (".zst", "zstd", zstd)] {
        if name.ends_with(suffix) && !is {
            let start: Vec<String> = magic.iter().take(4).map(|b| format!("{b:02x}")).collect();
            bail!(
                "cannot decompress: the name ends in `{suffix}` but the bytes are not {format} data (they start with [{}])",
                start.join(" ")
            );
        }
    }
    let (decoder, format): (Box<dyn Read>, _) = if gzip {
        (Box::new(flate2::bufread::MultiGzDecoder::new(file)), "gzip")
    } else if zstd {
        (Box::new(zstd::stream::read::Decoder::with_buffer(file)?), "zstd")
    } else {
        return Ok(Box::new(file));
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, Limited { inner: decoder, format, left: max_bytes, max_bytes })))
}

/// A decompressed stream that fails past `max_bytes`: a small archive that
/// expands without end stops here. Its errors name the format.
struct Limited {
    inner: Box<dyn Read>,
    format: &'static str,
    left: u64,
    max_bytes: u64,
}

impl Read for Limited {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| std::io::Error::other(format!("cannot decompress {}: {e}", self.format)))?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::other(format!(
                "it decompresses to more than `max_bytes` ({} bytes); raise `max_bytes` if the source is really this big",
                self.max_bytes
            ))
        })?;
        Ok(n)
    }
}

/// Lines of a stream without their `\n` or `\r\n`, numbered from 1; an
/// error names the line.
fn each_line(mut input: impl BufRead, mut f: impl FnMut(usize, &str) -> Result<()>) -> Result<()> {
    let mut buf = Vec::new();
    for number in 1.. {
        buf.clear();
        let read = input.read_until(b'\n', &mut buf).with_context(|| format!("line {number}: cannot read"))?;
        if read == 0 {
            break;
        }
        let line =
            std::str::from_utf8(&buf).map_err(|_| anyhow!("line {number}: not UTF-8 text; set `format` if it is JSONL or Parquet"))?;
        let line = line.strip_suffix('\n').unwrap_or(line);
        f(number, line.strip_suffix('\r').unwrap_or(line))?;
    }
    Ok(())
}

/// Parses one file into documents, streaming.
fn parse(path: &Path, source: &Source, name: &str, max_bytes: u64, out: &mut Documents) -> Result<()> {
    let field = &source.text_field;
    let id_field = source.id_field.as_deref();
    match source.format_of(name) {
        Format::Text if id_field.is_some() => bail!("`id_field` needs JSONL or Parquet, and this source is text"),
        Format::Text => split(open_stream(path, name, max_bytes)?, source.split, out),
        Format::Jsonl => each_line(open_stream(path, name, max_bytes)?, |number, line| {
            if line.trim().is_empty() {
                return Ok(());
            }
            let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("line {number}: invalid JSON"))?;
            let id = match id_field.map(|f| (f, value.get(f))) {
                None => None,
                Some((_, Some(serde_json::Value::String(s)))) => Some(s.clone()),
                Some((_, Some(serde_json::Value::Number(n)))) => Some(n.to_string()),
                Some((f, _)) => bail!("line {number}: no string or number field `{f}`; set `id_field`"),
            };
            match value.get(field) {
                Some(serde_json::Value::String(s)) => out.push(s.clone(), id),
                _ => bail!("line {number}: no string field `{field}`; set `text_field`"),
            }
        }),
        Format::Parquet => {
            let columns: Vec<&str> = [Some(field.as_str()), id_field].into_iter().flatten().collect();
            let groups = RowGroups::open(path, Some(&columns)).map_err(|e| anyhow!("invalid Parquet: {e:#}"))?;
            for df in groups {
                let df = df?;
                let column = df.column(field).map_err(|_| anyhow!("no column `{field}`; set `text_field`"))?;
                let column = column.str().map_err(|_| anyhow!("column `{field}` is {}, not a string", column.dtype()))?;
                let ids = match id_field {
                    None => None,
                    Some(f) => {
                        let ids = df.column(f).map_err(|_| anyhow!("no column `{f}`; set `id_field`"))?;
                        Some(
                            ids.cast(&polars::prelude::DataType::String)
                                .map_err(|e| anyhow!("column `{f}` cannot be read as text: {e}"))?,
                        )
                    }
                };
                let ids = ids.as_ref().map(|c| c.str()).transpose()?;
                for (i, text) in column.iter().enumerate() {
                    let id = ids.map(|ids| {
                        ids.get(i).map(str::to_string).ok_or_else(|| anyhow!("row {i}: `{}` is null", id_field.unwrap_or_default()))
                    });
                    out.push(text.unwrap_or_default().to_string(), id.transpose()?)?;
                }
            }
            Ok(())
        }
    }
}

/// Splits a text stream into documents as `how` says.
fn split(mut input: Box<dyn BufRead>, how: SplitBy, out: &mut Documents) -> Result<()> {
    let mut current: Vec<String> = Vec::new();
    match how {
        SplitBy::File => {
            // One document: the whole file is held whatever the budget.
            let mut bytes = Vec::new();
            input.read_to_end(&mut bytes).context("cannot read")?;
            let text = String::from_utf8(bytes).map_err(|_| anyhow!("not UTF-8 text; set `format` if it is JSONL or Parquet"))?;
            out.push(text.replace("\r\n", "\n"), None)
        }
        SplitBy::Paragraph => {
            each_line(input, |_, line| {
                if !line.trim().is_empty() {
                    current.push(line.to_string());
                } else if !current.is_empty() {
                    out.push(std::mem::take(&mut current).join("\n"), None)?;
                }
                Ok(())
            })?;
            out.push(current.join("\n"), None)
        }
        SplitBy::Lines(n) => {
            each_line(input, |_, line| {
                current.push(line.to_string());
                if current.len() == n {
                    out.push(std::mem::take(&mut current).join("\n"), None)?;
                }
                Ok(())
            })?;
            out.push(current.join("\n"), None)
        }
    }
}

#[cfg(test)]
mod tests;
