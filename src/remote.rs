//! A shared artifact cache on an object store: S3 (or any S3-compatible
//! server) or a mounted folder, set by `[pipeline] remote`.
//!
//! ```text
//! PREFIX/blobs/<b3[..2]>/<b3>          a file's bytes, named by their BLAKE3
//! PREFIX/entries/<stage>/<key>.json    an artifact: its manifest and its log's blob
//! ```
//!
//! A file shared by several artifacts (or sweep variants) is stored once.
//! An entry is written only after every blob it names is in place: it is the
//! commit point, so a reader never finds an entry with a blob missing, and
//! two machines pushing one key at once only write the same blobs twice.
//! Nothing read from the remote is trusted: an entry must describe the key
//! it is stored under (its fingerprint is recomputed), and every file is
//! checked against the entry's BLAKE3 before the artifact is published
//! locally. A remote that cannot be reached, or refuses, is reported once
//! and left alone for the rest of the command: the build goes on locally.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};

use crate::files::{now_rfc3339, seal};
use crate::hash::{self, FileEntry, Stat};
use crate::store::{Head, KeyParts, Manifest, Store};
use crate::ui::Ui;

/// Set by `--offline`: no command talks to the remote.
pub static OFFLINE: AtomicBool = AtomicBool::new(false);

/// The format of the entries this llmflow writes and reads.
const FORMAT: u32 = 1;
/// Files from this size up are sent in parts, several at once.
const PART: usize = 64 << 20;
/// Transfers in flight at once: files, and parts of one file.
const PARALLEL: usize = 8;

/// `[pipeline] remote` and `remote_push`, as the pipeline file sets them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// `s3://BUCKET/PREFIX` or `file:///PATH`.
    pub url: String,
    /// Whether `run` uploads what it builds (`false`: a read-only consumer).
    pub push: bool,
}

/// Checks a remote's URL; the error completes "`pipeline.remote` …".
pub fn check_url(url: &str) -> Result<(), String> {
    if let Some(rest) = url.strip_prefix("s3://") {
        if rest.split('/').next().is_none_or(str::is_empty) {
            return Err(format!("`{url}` names no bucket: write s3://BUCKET/PREFIX"));
        }
        return Ok(());
    }
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(format!("`{url}` is not an absolute path: write file:///PATH"));
        }
        return Ok(());
    }
    Err(format!("`{url}` is neither s3://BUCKET/PREFIX nor file:///PATH"))
}

/// What the remote holds for one artifact.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub format: u32,
    pub manifest: Manifest,
    /// The BLAKE3 of the stage's log, when it was pushed with it.
    pub log: Option<String>,
    pub pushed: String,
}

/// What pushing an artifact came to.
#[derive(Debug, Default, Serialize)]
pub struct Pushed {
    /// The remote had the entry already.
    pub already: bool,
    /// Blobs uploaded, and their bytes; the rest were there.
    pub blobs: usize,
    pub bytes: u64,
}

impl Pushed {
    /// What `run` and `push` say of it.
    pub fn describe(&self) -> String {
        if self.already {
            "already on the remote".to_string()
        } else {
            format!("{} file(s), {} sent", self.blobs, megabytes(self.bytes))
        }
    }
}

/// `12.3 MB`, as transfers are counted.
pub fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub struct Remote {
    settings: Settings,
    ui: Ui,
    client: OnceLock<Result<Client, String>>,
    /// Why the remote is left alone for the rest of the command, once it failed.
    down: Mutex<Option<String>>,
    warned: AtomicBool,
}

struct Client {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    rt: tokio::runtime::Runtime,
}

impl Remote {
    /// The remote `settings` name; nothing is contacted until it is used.
    pub fn new(settings: &Settings, ui: &Ui) -> Remote {
        Remote {
            settings: settings.clone(),
            ui: ui.clone(),
            client: OnceLock::new(),
            down: Mutex::new(None),
            warned: AtomicBool::new(false),
        }
    }

    /// The remote the pipeline sets, unless `--offline`.
    pub fn of(settings: Option<&Settings>, ui: &Ui) -> Option<Remote> {
        settings.filter(|_| !OFFLINE.load(Ordering::Relaxed)).map(|s| Remote::new(s, ui))
    }

    pub fn url(&self) -> &str {
        &self.settings.url
    }

    pub fn pushes(&self) -> bool {
        self.settings.push
    }

    /// Why the remote is not used any more, once a call to it failed.
    pub fn down(&self) -> Option<String> {
        self.down.lock().expect("not poisoned").clone()
    }

    fn client(&self) -> Result<&Client> {
        if let Some(why) = self.down() {
            bail!("{why}");
        }
        self.client
            .get_or_init(|| connect(&self.settings.url).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| self.fail(anyhow!("{e}")))
    }

    /// Records that the remote failed, warns once, and gives the error back.
    fn fail(&self, e: anyhow::Error) -> anyhow::Error {
        let why = format!("the remote {} failed: {}", self.settings.url, brief(&e));
        *self.down.lock().expect("not poisoned") = Some(why.clone());
        if !self.warned.swap(true, Ordering::SeqCst) {
            self.ui.warning(&format!("{why}; going on without it"));
        }
        anyhow!(why)
    }

    /// Runs `f` on the remote; an error other than "not found" takes the remote out of use.
    fn call<T>(&self, f: impl std::future::Future<Output = object_store::Result<T>>) -> Result<Option<T>> {
        let client = self.client()?;
        match client.rt.block_on(f) {
            Ok(v) => Ok(Some(v)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail(e.into())),
        }
    }

    fn entry_path(&self, stage: &str, key: &str) -> Result<Path> {
        Ok(self.client()?.prefix.clone().join("entries").join(stage).join(format!("{key}.json").as_str()))
    }

    fn blob_path(&self, b3: &str) -> Result<Path> {
        Ok(self.client()?.prefix.clone().join("blobs").join(&b3[..2]).join(b3))
    }

    /// The entry for `stage` at `key`, checked to describe that key; `None`
    /// when the remote has none (or is out of use).
    pub fn entry(&self, stage: &str, key: &str) -> Option<Entry> {
        match self.try_entry(stage, key) {
            Ok(entry) => entry,
            Err(e) => {
                if self.down().is_none() {
                    self.ui.warning(&format!("the remote's entry for {stage} ({}) is unusable: {e:#}", &key[..12]));
                }
                None
            }
        }
    }

    fn try_entry(&self, stage: &str, key: &str) -> Result<Option<Entry>> {
        let path = self.entry_path(stage, key)?;
        let client = self.client()?;
        let Some(got) = self.call(client.store.get(&path))? else { return Ok(None) };
        let Some(bytes) = self.call(got.bytes())? else { return Ok(None) };
        let entry: Entry = serde_json::from_slice(&bytes).context("not an llmflow entry")?;
        check_entry(&entry, stage, key)?;
        Ok(Some(entry))
    }

    /// Fetches `stage`'s artifact at `key` into the store, every file checked
    /// against the entry's BLAKE3 (a file that fails is fetched once more).
    /// `None` when the remote has no such entry. Call with the stage's lock held.
    pub fn pull(&self, store: &Store, stage: &str, key: &str) -> Result<Option<Head>> {
        let Some(entry) = self.try_entry(stage, key)? else { return Ok(None) };
        let client = self.client()?;
        let tmp = store.make_tmp(stage, key)?;
        let out = tmp.path.join("out");
        let files = &entry.manifest.files;
        let fetched: Vec<Stat> = client.rt.block_on(
            futures::stream::iter(files.iter().map(|f| self.fetch_checked(&f.blake3, f.size, out.join(&f.path))))
                .buffered(PARALLEL)
                .try_collect(),
        )?;
        seal(&out)?;
        let mut manifest = entry.manifest.clone();
        manifest.files = files.iter().zip(fetched).map(|(f, stat)| FileEntry { stat, ..f.clone() }).collect();
        if let Some(log) = &entry.log {
            let path = store.log_path(stage, key);
            fs::create_dir_all(path.parent().expect("has parent"))?;
            // A log that fails its check is only a log: the artifact is still published.
            if client.rt.block_on(self.fetch_checked(log, u64::MAX, path.clone())).is_err() {
                let _ = fs::remove_file(&path);
            }
        }
        store.publish(tmp, &manifest)?;
        store.update_state(stage, |s| {
            s.latest = Some(key.to_string());
            s.last_failure = None;
        })?;
        Ok(Some(manifest.head()))
    }

    /// Downloads blob `b3` to `dest`, checking its size (unless `u64::MAX`)
    /// and BLAKE3; a blob that fails is fetched once more, then refused.
    async fn fetch_checked(&self, b3: &str, size: u64, dest: PathBuf) -> Result<Stat> {
        let path = self.blob_path(b3)?;
        let mut last = None;
        for _ in 0..2 {
            match self.fetch(&path, b3, size, &dest).await {
                Ok(stat) => return Ok(stat),
                Err(e) => last = Some(e),
            }
        }
        let _ = fs::remove_file(&dest);
        Err(last.expect("tried"))
    }

    async fn fetch(&self, path: &Path, b3: &str, size: u64, dest: &FsPath) -> Result<Stat> {
        let client = self.client()?;
        let got = match client.store.get(path).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => bail!("blob {b3} is missing"),
            Err(e) => return Err(self.fail(e.into())),
        };
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut file = File::create(dest).with_context(|| format!("cannot create {}", dest.display()))?;
        let mut hasher = blake3::Hasher::new();
        let mut n = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.fail(e.into()))?;
            n += chunk.len() as u64;
            if size != u64::MAX && n > size {
                bail!("blob {b3} fails its check: longer than the {size} bytes its entry says");
            }
            hasher.update(&chunk);
            file.write_all(&chunk)?;
        }
        let got = hasher.finalize().to_hex().to_string();
        if got != b3 || (size != u64::MAX && n != size) {
            bail!("blob {b3} fails its check: {n} bytes with BLAKE3 {got}");
        }
        file.sync_all()?;
        Ok(Stat::of(dest)?)
    }

    /// Uploads `stage`'s artifact at `key` (and its log): the blobs the
    /// remote lacks, then the entry. The files are checked against the
    /// manifest as they are read, so nothing damaged is sent.
    pub fn push(&self, store: &Store, manifest: &Manifest) -> Result<Pushed> {
        let client = self.client()?;
        let entry_path = self.entry_path(&manifest.stage, &manifest.key)?;
        if self.call(client.store.head(&entry_path))?.is_some() {
            return Ok(Pushed { already: true, ..Pushed::default() });
        }
        let out = store.out_dir(&manifest.stage, &manifest.key);
        let mut todo: Vec<(String, PathBuf)> = Vec::new();
        let mut seen = BTreeSet::new();
        for f in &manifest.files {
            if seen.insert(f.blake3.clone()) {
                todo.push((f.blake3.clone(), out.join(&f.path)));
            }
        }
        let log_path = store.log_path(&manifest.stage, &manifest.key);
        let log = match fs::metadata(&log_path) {
            Ok(_) => Some(hash::hash_file(&log_path)?),
            Err(_) => None,
        };
        if let Some(b3) = log.as_ref().filter(|b3| seen.insert((*b3).clone())) {
            todo.push((b3.clone(), log_path));
        }
        let sent: Vec<u64> = client
            .rt
            .block_on(futures::stream::iter(todo.iter().map(|(b3, path)| self.send(b3, path))).buffer_unordered(PARALLEL).try_collect())?;
        let entry = Entry { format: FORMAT, manifest: manifest.clone(), log, pushed: now_rfc3339() };
        let bytes = serde_json::to_vec_pretty(&entry)?;
        // Written only if absent (`If-None-Match: *`): of two machines pushing one key, the first entry stays.
        let create = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        let already = match client.rt.block_on(client.store.put_opts(&entry_path, PutPayload::from(bytes), create)) {
            Ok(_) => false,
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => true,
            Err(e) => return Err(self.fail(e.into())),
        };
        Ok(Pushed { already, blobs: sent.iter().filter(|&&n| n > 0).count(), bytes: sent.iter().sum() })
    }

    /// Uploads the file at `path` as blob `b3` unless the remote has it;
    /// the bytes sent, 0 when it was there.
    async fn send(&self, b3: &str, path: &FsPath) -> Result<u64> {
        let client = self.client()?;
        let blob = self.blob_path(b3)?;
        match client.store.head(&blob).await {
            Ok(_) => return Ok(0),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.fail(e.into())),
        }
        let mut file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let size = file.metadata()?.len();
        let mut hasher = blake3::Hasher::new();
        let damaged = || anyhow!("{} no longer matches its manifest (run `llmflow verify`); not pushed", path.display());
        if size < PART as u64 {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes)?;
            if hash::hash_bytes(&bytes) != b3 {
                return Err(damaged());
            }
            client.store.put(&blob, PutPayload::from(bytes)).await.map_err(|e| self.fail(e.into()))?;
            return Ok(size);
        }
        let upload = client.store.put_multipart(&blob).await.map_err(|e| self.fail(e.into()))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; PART];
        loop {
            let n = read_full(&mut file, &mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            writer.wait_for_capacity(PARALLEL).await.map_err(|e| self.fail(e.into()))?;
            writer.write(&buf[..n]);
        }
        // A file changed since it was built is never sent under its old name.
        if hasher.finalize().to_hex().as_str() != b3 {
            let _ = writer.abort().await;
            return Err(damaged());
        }
        writer.finish().await.map_err(|e| self.fail(e.into()))?;
        Ok(size)
    }
}

/// What went wrong, once: object_store's errors repeat the request at every
/// layer of their chain. The request (method and URL) and the innermost cause.
fn brief(e: &anyhow::Error) -> String {
    let top = e.to_string();
    let request = top.split_once("Error performing ").and_then(|(_, r)| r.split_once(" in ")).map(|(r, _)| r);
    let mut root = e.root_cause().to_string();
    // An S3 error's XML body, cut to its code and message.
    let tag = |name: &str| {
        root.split_once(&format!("<{name}>")).and_then(|(_, rest)| rest.split_once(&format!("</{name}>"))).map(|(v, _)| v.to_string())
    };
    if let (Some(code), Some(message), Some((status, _))) = (tag("Code"), tag("Message"), root.split_once(": <?xml")) {
        root = format!("{status}: {code}: {message}");
    }
    match request {
        Some(request) if !root.contains(request) => format!("{request}: {root}"),
        _ => root,
    }
}

/// Reads until `buf` is full or the file ends; the bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// An entry is used only for the key it is stored under: its fingerprint,
/// recomputed from what it says, must be that key, and its output digest
/// must be that of the files it lists.
fn check_entry(entry: &Entry, stage: &str, key: &str) -> Result<()> {
    let m = &entry.manifest;
    if entry.format != FORMAT {
        bail!("entry format {} (this llmflow reads {FORMAT})", entry.format);
    }
    let fingerprint = KeyParts { kind: &m.kind, version: m.version, params: &m.key_params, inputs: &m.inputs, deps: &m.deps }.key();
    if m.stage != stage || m.key != key || fingerprint != key {
        bail!("it describes {} at key {} (fingerprint {}), not {stage} at {key}", m.stage, m.key, fingerprint);
    }
    if hash::output_digest(&m.files) != m.output_digest {
        bail!("its files do not give its output digest");
    }
    let bad = |p: &str| p.is_empty() || p.starts_with('/') || p.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    let digest = |b3: &str| b3.len() == 64 && b3.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(f) = m.files.iter().find(|f| bad(&f.path) || !digest(&f.blake3)) {
        bail!("it lists a file `{}` that cannot be placed in an artifact", f.path);
    }
    if entry.log.as_deref().is_some_and(|b3| !digest(b3)) {
        bail!("its log is no BLAKE3 digest");
    }
    Ok(())
}

/// A client for `url`, with the AWS conventions for endpoint, region and
/// credentials (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, …) and short
/// timeouts, so a remote that is down costs seconds, not minutes.
fn connect(url: &str) -> Result<Client> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (store, prefix): (Arc<dyn ObjectStore>, Path) = if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            // Requests are signed, their bodies not hashed into the signature: every
            // blob is checked by its BLAKE3 when pulled, and SHA-256 over each
            // body would cost the client and the server a second pass.
            .with_unsigned_payload(true)
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig::default(),
                max_retries: 2,
                retry_timeout: Duration::from_secs(20),
            })
            .with_client_options(
                object_store::ClientOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(300)),
            );
        let endpoint = std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT")).unwrap_or_default();
        if endpoint.starts_with("http://") {
            builder = builder.with_allow_http(true);
        }
        (Arc::new(builder.build().context("cannot set up the S3 client")?), Path::from(prefix))
    } else {
        let dir = url.strip_prefix("file://").expect("checked when the pipeline loaded");
        fs::create_dir_all(dir).with_context(|| format!("cannot create {dir}"))?;
        (Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir)?), Path::default())
    };
    Ok(Client { store, prefix, rt })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(check_url("s3://bucket/some/prefix").is_ok());
        assert!(check_url("s3://bucket").is_ok());
        assert!(check_url("file:///mnt/cache").is_ok());
        assert!(check_url("s3:///prefix").unwrap_err().contains("names no bucket"));
        assert!(check_url("file://relative").unwrap_err().contains("absolute"));
        assert!(check_url("gs://bucket").unwrap_err().contains("neither"));
    }
}
