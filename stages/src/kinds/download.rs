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
//!   is decompressed transparently, recognized by its magic bytes.
//! * `text_field`: the JSONL key or Parquet column holding the text (default
//!   `text`).
//! * `split` (text only): `"file"` (one document per file, the default),
//!   `"paragraph"` (blank-line separated) or `{ lines = N }`.
//!
//! The `source` column is the source's `url` as written (for a glob, each
//! matched path), never the mirror that served the bytes: the same bytes give
//! the same output whichever copy was reachable, so dependents stay fresh.
//! Document ids are `SOURCE#N`. Empty documents are skipped.
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

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use polars::prelude::{ParquetReader, SerReader};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::local_dependency;
use crate::formats::docs;
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
}

impl Default for Params {
    fn default() -> Self {
        Params { sources: Vec::new(), retries: 5, timeout_secs: 30, backoff_ms: 1000, max_bytes: 8 << 30 }
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
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "read local files, globs and URLs (checksummed, resumable) into documents";
    const INPUTS: Inputs = Inputs::Fixed(&[]);
    const VOLATILE: &'static [&'static str] = &["retries", "timeout_secs", "backoff_ms", "max_bytes"];
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
        let (mut ids, mut texts, mut sources) = (Vec::new(), Vec::new(), Vec::new());
        let mut bytes = 0usize;
        let mut labels = HashSet::new();
        for source in &p.sources {
            for (label, data) in fetch_source(source, p, ctx)? {
                bytes += data.len();
                let data = decompress(&data, p.max_bytes).with_context(|| format!("{label}: cannot decompress"))?;
                let parsed = parse(&data, source, &label).with_context(|| format!("cannot read source {label}"))?;
                if !labels.insert(label.clone()) {
                    bail!("{label} is listed by two sources; remove one of them");
                }
                for (n, text) in parsed.into_iter().filter(|t| !t.trim().is_empty()).enumerate() {
                    ids.push(format!("{label}#{n}"));
                    texts.push(text);
                    sources.push(label.clone());
                }
            }
        }
        let count = texts.len();
        let chars: usize = texts.iter().map(|t: &String| t.len()).sum();
        docs::write(&ctx.out, &mut docs::frame(ids, texts, sources)?)?;
        ctx.metric("documents", count);
        ctx.metric("bytes_fetched", bytes);
        ctx.metric("text_bytes", chars);
        eprintln!("download: {count} documents, {chars} bytes of text from {bytes} bytes fetched in {:.1?}", started.elapsed());
        Ok(())
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

/// The files of a source as `(label, bytes)`, trying the url and then each
/// mirror, and checking the checksum.
fn fetch_source(source: &Source, p: &Params, ctx: &mut StageCtx) -> Result<Vec<(String, Vec<u8>)>> {
    let mut failures = Vec::new();
    for location in std::iter::once(&source.url).chain(&source.mirrors) {
        let fetched = fetch(location, p, ctx).and_then(|files| {
            if source.blake3.is_some() || source.sha256.is_some() {
                let [(_, data)] = files.as_slice() else {
                    bail!("matches {} files, but a checksum needs exactly one", files.len());
                };
                verify(source, data)?;
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

fn verify(source: &Source, data: &[u8]) -> Result<()> {
    if let Some(expected) = &source.blake3 {
        let actual = blake3::hash(data).to_hex().to_string();
        if !actual.eq_ignore_ascii_case(expected) {
            bail!("blake3 mismatch for {}: expected {expected}, got {actual}; fix `blake3` if the data changed on purpose", source.url);
        }
    }
    if let Some(expected) = &source.sha256 {
        let actual: String = Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect();
        if !actual.eq_ignore_ascii_case(expected) {
            bail!("sha256 mismatch for {}: expected {expected}, got {actual}; fix `sha256` if the data changed on purpose", source.url);
        }
    }
    Ok(())
}

/// Reads one location: `(label, bytes)` per file.
fn fetch(location: &str, p: &Params, ctx: &mut StageCtx) -> Result<Vec<(String, Vec<u8>)>> {
    if is_http(location) {
        return Ok(vec![(location.to_string(), http_get(location, p, ctx)?)]);
    }
    let path = location.strip_prefix("file://").unwrap_or(location);
    let full = ctx.project_path(path);
    if !path.contains(['*', '?', '[']) {
        let data = fs::read(&full).with_context(|| format!("cannot read {}", full.display()))?;
        return Ok(vec![(location.to_string(), data)]);
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
            let data = fs::read(&m).with_context(|| format!("cannot read {}", m.display()))?;
            let label = m.strip_prefix(&ctx.project_dir).unwrap_or(&m).to_string_lossy().into_owned();
            Ok((label, data))
        })
        .collect()
}

/// Why one HTTP attempt failed: worth retrying or not.
enum Failure {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

fn http_get(url: &str, p: &Params, ctx: &mut StageCtx) -> Result<Vec<u8>> {
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
    let data = fs::read(&part).with_context(|| format!("cannot read {}", part.display()))?;
    // A bad download must not be resumed from, and a good one is in the output.
    let _ = fs::remove_file(&part);
    let secs = started.elapsed().as_secs_f64();
    eprintln!("{url}: {} bytes in {secs:.1}s ({:.1} MB/s)", data.len(), data.len() as f64 / 1e6 / secs.max(1e-9));
    Ok(data)
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

/// Gzip or zstd data decompressed, streaming, up to `max_bytes`; other data as it is.
fn decompress(data: &[u8], max_bytes: u64) -> Result<Vec<u8>> {
    let decoder: Box<dyn Read + '_> = if data.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(data))
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::new(data)?)
    } else {
        return Ok(data.to_vec());
    };
    let mut out = Vec::new();
    decoder.take(max_bytes.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > max_bytes {
        bail!("it decompresses to more than `max_bytes` ({max_bytes} bytes); raise `max_bytes` if the source is really this big");
    }
    Ok(out)
}

/// The document texts of one file.
fn parse(data: &[u8], source: &Source, name: &str) -> Result<Vec<String>> {
    let field = &source.text_field;
    match source.format_of(name) {
        Format::Text => {
            let text = std::str::from_utf8(data).context("not UTF-8 text; set `format` if it is JSONL or Parquet")?;
            Ok(split(text, source.split))
        }
        Format::Jsonl => {
            let text = std::str::from_utf8(data).context("JSONL that is not UTF-8")?;
            let records = text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty());
            records
                .map(|(i, line)| -> Result<String> {
                    let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("line {}: invalid JSON", i + 1))?;
                    match value.get(field) {
                        Some(serde_json::Value::String(s)) => Ok(s.clone()),
                        _ => bail!("line {}: no string field `{field}`; set `text_field`", i + 1),
                    }
                })
                .collect()
        }
        Format::Parquet => {
            let df = ParquetReader::new(Cursor::new(data)).finish().context("invalid Parquet")?;
            let column = df.column(field).map_err(|_| anyhow!("no column `{field}`; set `text_field`"))?;
            let column = column.str().map_err(|_| anyhow!("column `{field}` is {}, not a string", column.dtype()))?;
            Ok(column.iter().map(|t| t.unwrap_or_default().to_string()).collect())
        }
    }
}

fn split(text: &str, how: SplitBy) -> Vec<String> {
    let text = text.replace("\r\n", "\n");
    match how {
        SplitBy::File => vec![text],
        SplitBy::Paragraph => {
            let mut paragraphs = Vec::new();
            let mut current: Vec<&str> = Vec::new();
            for line in text.lines() {
                if line.trim().is_empty() {
                    if !current.is_empty() {
                        paragraphs.push(current.join("\n"));
                        current.clear();
                    }
                } else {
                    current.push(line);
                }
            }
            if !current.is_empty() {
                paragraphs.push(current.join("\n"));
            }
            paragraphs
        }
        SplitBy::Lines(n) => text.lines().collect::<Vec<_>>().chunks(n).map(|c| c.join("\n")).collect(),
    }
}

#[cfg(test)]
mod tests;
