//! `dedup`: remove exact and near-duplicate documents.
//!
//! ```toml
//! [stages.dedup]
//! kind = "dedup"
//! input = "clean"
//! method = "minhash"        # exact | minhash
//! threshold = 0.8
//! ```
//!
//! Both methods compare documents after normalization: `lowercase`,
//! `strip_punctuation` (drop every character that is neither a letter, a digit
//! nor whitespace) and `collapse_whitespace` (runs of whitespace become one
//! space), all on by default.
//!
//! * `exact`: documents whose normalized text has the same BLAKE3 hash are
//!   duplicates.
//! * `minhash`: word `ngram`-shingles (default 5; shorter documents are one
//!   shingle) hashed to 64 bits, a MinHash signature of `bands × rows`
//!   permutations (default 14 × 8 = 112) seeded by `seed`, and locality
//!   sensitive hashing over the bands. Every candidate pair that shares a band
//!   is verified with the exact Jaccard similarity of the shingle sets and
//!   merged when it reaches `threshold` (default 0.8); merged pairs form
//!   clusters by union-find. `max_bucket` bounds the pairs taken from one band
//!   bucket: a larger bucket (thousands of copies of one text) is compared
//!   against its first document only.
//!
//! In every cluster the document that comes first in the input is kept, so the
//! result does not depend on thread scheduling.
//!
//! At scale: each input part is a unit ([`crate::data::units`], cached in the
//! store under a hash of its bytes and the params that shape signatures)
//! holding its index: the LSH bucket records `(band, key, document)` sorted
//! (spilled to disk as sorted runs and merged when they exceed the budget),
//! each document's shingle set, and its id. The stage merges the sorted
//! bucket files of all parts in one streaming pass (an external merge),
//! takes candidate pairs from each bucket (spilled and sorted the same way),
//! verifies them by reading the two shingle sets from disk, and joins
//! clusters by union-find over one integer per document. `exact` goes
//! through the same merge with the normalized text's hash as the bucket.
//! Memory is bounded by `memory_mb` (volatile) whatever the corpus size,
//! apart from 5 bytes per document. A new input file adds only its own
//! part's signatures; the merge and the verified pairs are redone, so the
//! result is the one a full rebuild gives.
//!
//! `inputs = { input = "new", against = "old_dedup" }`: also deduplicates
//! against the documents another `dedup` stage indexed (its `index/`, built
//! with the same normalization and signature params): a document of the new
//! corpus that is a duplicate of one there is removed, its `cluster` the
//! other document's id. Pairs within the other corpus are not looked at.
//!
//! Outputs: `docs/` (the kept documents, all input columns, sharded Parquet
//! of about `part_mb` of text per part), `clusters/` (`id`, `cluster` = the
//! id of the kept document of its cluster, `kept`), `index/` and
//! `index.json` (the signature index, for `against`), `units/`. Metrics:
//! `documents_in`, `documents_out`, `clusters` (clusters with more than one
//! document), `duplicate_fraction`, `parts_cached`, for MinHash
//! `candidate_pairs` and `verified_pairs`, and with `against`
//! `against_duplicates`.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use polars::prelude::Column;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::data::hash::{fmix64, ngram_hash};
use crate::data::spill::{merge, read_records, write_records, Sorter};
use crate::data::units::{self, Unit, Units};
use crate::data::working_memory_mb;
use crate::formats::docs::{self, PartWriter, RowGroups};
use crate::{Inputs, Stage, StageCtx};

pub struct Dedup;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Exact,
    Minhash,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// `minhash` (near duplicates) or `exact` (the same normalized text).
    pub method: Method,
    /// Compare documents lowercased.
    pub lowercase: bool,
    /// Drop every character that is neither a letter, a digit nor whitespace before comparing.
    pub strip_punctuation: bool,
    /// Runs of whitespace become one space before comparing.
    pub collapse_whitespace: bool,
    /// Words per shingle.
    #[schemars(range(min = 1, max = 1024))]
    pub ngram: usize,
    /// MinHash bands (locality-sensitive hashing): a pair sharing one band is a candidate.
    #[schemars(range(min = 1, max = 1024))]
    pub bands: usize,
    /// Permutations per band; the signature has `bands × rows`.
    #[schemars(range(min = 1, max = 1024))]
    pub rows: usize,
    /// Jaccard similarity at which a verified pair is a duplicate.
    #[schemars(range(max = 1), extend("exclusiveMinimum" = 0))]
    pub threshold: f64,
    /// Seeds the MinHash permutations.
    pub seed: u64,
    /// Largest band bucket compared pair by pair; a larger one is compared against its first document.
    #[schemars(range(min = 1, max = 10_000))]
    pub max_bucket: usize,
    /// Text per output part, in MB.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub part_mb: usize,
    /// Peak memory of the stage process in MB, the runtime's 128 included; volatile: how many bucket records and pairs are held before they spill to disk.
    #[schemars(range(min = 256, max = 1_000_000_000))]
    pub memory_mb: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            method: Method::Minhash,
            lowercase: true,
            strip_punctuation: true,
            collapse_whitespace: true,
            ngram: 5,
            bands: 14,
            rows: 8,
            threshold: 0.8,
            seed: 1,
            max_bucket: 64,
            part_mb: 256,
            memory_mb: 1024,
        }
    }
}

/// The memory held besides the spilled records: a row group being read and
/// its signatures, the output being written, the runtime itself.
const FIXED_MB: usize = 48;

/// A bucket record: band (u16), key (u64), document (u32), big-endian so
/// the bytes sort as the tuple.
const BUCKET: usize = 14;
/// An exact-method record: the normalized text's hash (16 bytes), document.
const HASHED: usize = 20;

impl Stage for Dedup {
    const KIND: &'static str = "dedup";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "remove exact (hash) or near (MinHash LSH) duplicate documents";
    const INPUTS: Inputs = Inputs::Fixed(&["input"]);
    const OPTIONAL_INPUTS: &'static [&'static str] = &["against"];
    const VOLATILE: &'static [&'static str] = &["memory_mb"];
    type Params = Params;

    fn run(p: &Params, ctx: &mut StageCtx) -> Result<()> {
        let parts = docs::parts(ctx.input("input")?)?;
        let units = Units::new(ctx)?;
        let spill = ctx.work.join("spill");
        let budget = (working_memory_mb(p.memory_mb).saturating_sub(FIXED_MB) << 20).max(1 << 20);
        let signature = signature_params(p);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(ctx.threads).build()?;

        // Signatures: one cached unit per input part.
        let mut ours = Vec::new();
        let mut cached = 0;
        for (n, part) in parts.iter().enumerate() {
            let key = units::key(&json!({ "dedup": Dedup::VERSION, "index": signature, "part": units::file_digest(part)? }));
            match units.load(&key) {
                Some(unit) => {
                    cached += 1;
                    ours.push(unit);
                }
                None => ours.push(units.build(&key, |dir| pool.install(|| index_part(part, p, dir, &spill, budget / 2)))?),
            }
            ctx.progress(n as u64 + 1, parts.len() as u64, "parts");
        }
        units.link(&ours, "index", "index", false)?;
        units.link(&ours, "ids", "index", false)?;
        let index = json!({ "signature": signature, "units": ours });
        fs::write(ctx.out.join("index.json"), serde_json::to_vec_pretty(&index)?)?;

        // The other corpus's index comes first, so its documents are the
        // roots of any cluster they share with ours.
        let against = match ctx.inputs.get("against") {
            Some(dir) => Some(Index::open(dir, &signature)?),
            None => None,
        };
        let mut sets = Vec::new();
        let mut start = 0u32;
        if let Some(other) = &against {
            for unit in &other.units {
                sets.push(UnitFiles::open(&other.dir, unit, start)?);
                start += documents(unit);
            }
        }
        let first_ours = start;
        for unit in &ours {
            sets.push(UnitFiles::open(&ctx.cache, unit, start)?);
            start += documents(unit);
        }
        let total = start as usize;

        let mut parent: Vec<u32> = (0..start).collect();
        let pairs = pool.install(|| candidates(&sets, p, first_ours, &spill, budget / 2))?;
        let mut verified = 0;
        match p.method {
            Method::Exact => {
                for pair in pairs {
                    let (a, b) = split_pair(pair?);
                    union(&mut parent, a, b);
                }
            }
            Method::Minhash => {
                let mut candidate_pairs = 0;
                let mut chunk = Vec::with_capacity(1 << 16);
                let verify = |chunk: &mut Vec<(u32, u32)>, parent: &mut Vec<u32>| -> Result<usize> {
                    let similar: Vec<bool> = pool.install(|| {
                        chunk
                            .par_iter()
                            .map(|&(a, b)| Ok(jaccard(&shingle_set(&sets, a)?, &shingle_set(&sets, b)?) >= p.threshold))
                            .collect::<Result<_>>()
                    })?;
                    let mut count = 0;
                    for (&(a, b), similar) in chunk.iter().zip(similar) {
                        if similar {
                            union(parent, a, b);
                            count += 1;
                        }
                    }
                    chunk.clear();
                    Ok(count)
                };
                for pair in pairs {
                    chunk.push(split_pair(pair?));
                    candidate_pairs += 1;
                    if chunk.len() == chunk.capacity() {
                        verified += verify(&mut chunk, &mut parent)?;
                    }
                }
                verified += verify(&mut chunk, &mut parent)?;
                ctx.metric("candidate_pairs", candidate_pairs);
                ctx.metric("verified_pairs", verified);
            }
        }
        let roots: Vec<u32> = (0..total as u32).map(|i| find(&mut parent, i as usize) as u32).collect();
        drop(parent);
        ctx.metric("parts_cached", cached);
        write_outputs(&parts, &roots, first_ours, against.as_ref(), p, ctx)
    }
}

/// The params a part's index depends on; `against` needs them equal.
fn signature_params(p: &Params) -> Value {
    json!({
        "method": p.method, "lowercase": p.lowercase, "strip_punctuation": p.strip_punctuation,
        "collapse_whitespace": p.collapse_whitespace, "ngram": p.ngram, "bands": p.bands, "rows": p.rows, "seed": p.seed,
    })
}

fn documents(unit: &Unit) -> u32 {
    unit.meta["documents"].as_u64().unwrap_or(0) as u32
}

/// Indexes one input part into `dir/index/` and `dir/ids/`: bucket records
/// (or text hashes) sorted within `budget`, shingle sets and their offsets.
fn index_part(part: &Path, p: &Params, dir: &Path, spill: &Path, budget: usize) -> Result<Value> {
    let index = dir.join("index");
    fs::create_dir_all(&index)?;
    let hasher = MinHasher::new(p);
    let name = part.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let mut buckets = Sorter::<BUCKET>::new(spill, &format!("{name}.buckets"), budget);
    let mut hashes = Sorter::<HASHED>::new(spill, &format!("{name}.hashes"), budget);
    let mut shingle_file = BufWriter::new(File::create(index.join("shingles.bin"))?);
    let mut offsets = vec![0u64];
    let mut ids = PartWriter::new(&dir.join("ids"), "part-", usize::MAX);
    let mut doc = 0u32;
    for df in docs::batches(part)? {
        let df = df?;
        let texts: Vec<&str> = df.column("text")?.str()?.iter().map(Option::unwrap_or_default).collect();
        match p.method {
            Method::Minhash => {
                let signed: Vec<(Vec<u64>, Vec<u64>)> = texts
                    .par_iter()
                    .map(|t| {
                        let set = shingles(&normalize(t, p), p.ngram);
                        let keys = hasher.band_keys(&set);
                        (set, keys)
                    })
                    .collect();
                for (set, keys) in signed {
                    set.iter().try_for_each(|x| shingle_file.write_all(&x.to_le_bytes()))?;
                    offsets.push(offsets.last().expect("starts with 0") + set.len() as u64);
                    for (band, key) in keys.into_iter().enumerate() {
                        let mut record = [0u8; BUCKET];
                        record[..2].copy_from_slice(&(band as u16).to_be_bytes());
                        record[2..10].copy_from_slice(&key.to_be_bytes());
                        record[10..].copy_from_slice(&doc.to_be_bytes());
                        buckets.push(record)?;
                    }
                    doc += 1;
                }
            }
            Method::Exact => {
                let keys: Vec<[u8; 32]> = texts.par_iter().map(|t| *blake3::hash(normalize(t, p).as_bytes()).as_bytes()).collect();
                for key in keys {
                    let mut record = [0u8; HASHED];
                    record[..16].copy_from_slice(&key[..16]);
                    record[16..].copy_from_slice(&doc.to_be_bytes());
                    hashes.push(record)?;
                    doc += 1;
                }
            }
        }
        ids.push(&df.select(["id"])?)?;
    }
    shingle_file.flush()?;
    let offset_bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    fs::write(index.join("offsets.bin"), offset_bytes)?;
    match p.method {
        Method::Minhash => write_records(&index.join("buckets.bin"), buckets.sorted()?)?,
        Method::Exact => write_records(&index.join("hashes.bin"), hashes.sorted()?)?,
    };
    if doc > 0 {
        ids.finish()?;
    }
    Ok(json!({ "documents": doc }))
}

/// The index files of one unit, its documents numbered from `start`.
struct UnitFiles {
    start: u32,
    records: PathBuf,
    offsets: File,
    shingles: File,
}

impl UnitFiles {
    fn open(dir: &Path, unit: &Unit, start: u32) -> Result<Self> {
        let file = |role: &str, suffix: &str| unit.files.get(role).into_iter().flatten().find(|f| f.ends_with(suffix)).map(|f| dir.join(f));
        let need = |suffix: &str| file("index", suffix).with_context(|| format!("unit {} has no {suffix}", unit.key));
        let records = file("index", "buckets.bin")
            .or_else(|| file("index", "hashes.bin"))
            .with_context(|| format!("unit {} has no records", unit.key))?;
        let open = |path: PathBuf| File::open(&path).with_context(|| format!("cannot open {}", path.display()));
        Ok(UnitFiles { start, records, offsets: open(need("offsets.bin")?)?, shingles: open(need("shingles.bin")?)? })
    }
}

/// The unit holding document `doc`.
fn unit_of(sets: &[UnitFiles], doc: u32) -> &UnitFiles {
    &sets[sets.partition_point(|s| s.start <= doc) - 1]
}

/// The shingle set of document `doc`, read from disk (positioned reads: the
/// page cache, not the process, holds the files).
fn shingle_set(sets: &[UnitFiles], doc: u32) -> Result<Vec<u64>> {
    let unit = unit_of(sets, doc);
    let local = (doc - unit.start) as u64;
    let mut range = [0u8; 16];
    unit.offsets.read_exact_at(&mut range, local * 8)?;
    let (from, to) = (u64::from_le_bytes(range[..8].try_into()?), u64::from_le_bytes(range[8..].try_into()?));
    let mut bytes = vec![0u8; ((to - from) * 8) as usize];
    unit.shingles.read_exact_at(&mut bytes, from * 8)?;
    Ok(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// Candidate pairs `(a, b)`, `a < b`, sorted and distinct, as `a << 32 | b`
/// big-endian: documents sharing a band bucket (or, for `exact`, a text
/// hash), merged from every unit's sorted records. Pairs of two documents
/// of the other corpus (below `first_ours`) are left out.
fn candidates(
    sets: &[UnitFiles],
    p: &Params,
    first_ours: u32,
    spill: &Path,
    budget: usize,
) -> Result<Box<dyn Iterator<Item = Result<[u8; 8]>> + Send>> {
    let mut pairs = Sorter::<8>::new(spill, "pairs", budget);
    let mut bucket: Vec<u32> = Vec::new();
    let emit = |bucket: &mut Vec<u32>, pairs: &mut Sorter<8>| -> Result<()> {
        let limit = if p.method == Method::Exact { 1 } else { p.max_bucket };
        if bucket.len() > 1 {
            for (j, &b) in bucket.iter().enumerate().skip(1) {
                let firsts = if bucket.len() <= limit { &bucket[..j] } else { &bucket[..1] };
                for &a in firsts.iter().filter(|&&a| b >= first_ours || a >= first_ours) {
                    pairs.push(((a as u64) << 32 | b as u64).to_be_bytes())?;
                }
            }
        }
        bucket.clear();
        Ok(())
    };
    macro_rules! merge_units {
        ($n:expr) => {{
            let streams = sets
                .iter()
                .map(|s| {
                    let start = s.start;
                    Ok(read_records::<$n>(&s.records)?.map(move |r| {
                        r.map(|mut r| {
                            let doc = u32::from_be_bytes(r[$n - 4..].try_into().expect("4 bytes")) + start;
                            r[$n - 4..].copy_from_slice(&doc.to_be_bytes());
                            r
                        })
                    }))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut previous = [0u8; $n];
            for record in merge(streams) {
                let record = record?;
                if !bucket.is_empty() && record[..$n - 4] != previous[..$n - 4] {
                    emit(&mut bucket, &mut pairs)?;
                }
                bucket.push(u32::from_be_bytes(record[$n - 4..].try_into().expect("4 bytes")));
                previous = record;
            }
        }};
    }
    match p.method {
        Method::Minhash => merge_units!(BUCKET),
        Method::Exact => merge_units!(HASHED),
    }
    emit(&mut bucket, &mut pairs)?;
    let mut last = None;
    Ok(Box::new(pairs.sorted()?.filter(move |pair| match pair {
        Ok(pair) if last == Some(*pair) => false,
        Ok(pair) => {
            last = Some(*pair);
            true
        }
        Err(_) => true,
    })))
}

fn split_pair(pair: [u8; 8]) -> (u32, u32) {
    let both = u64::from_be_bytes(pair);
    ((both >> 32) as u32, both as u32)
}

/// Joins the clusters of `a` and `b`; the smaller index becomes the root,
/// so a cluster's root is its first document.
fn union(parent: &mut [u32], a: u32, b: u32) {
    let (ra, rb) = (find(parent, a as usize), find(parent, b as usize));
    parent[ra.max(rb)] = ra.min(rb) as u32;
}

/// Another dedup stage's signature index (`against`).
struct Index {
    dir: PathBuf,
    units: Vec<Unit>,
}

impl Index {
    fn open(artifact: &Path, signature: &Value) -> Result<Self> {
        let path = artifact.join("index.json");
        let text = fs::read(&path).with_context(|| format!("`against`: {} is not a dedup artifact (no index.json)", artifact.display()))?;
        let index: Value = serde_json::from_slice(&text).with_context(|| format!("cannot parse {}", path.display()))?;
        if &index["signature"] != signature {
            bail!(
                "`against`: {} was indexed with {}, this stage signs with {}; use the same method, normalization, ngram, bands, rows and seed",
                artifact.display(),
                index["signature"],
                signature
            );
        }
        let units = serde_json::from_value(index["units"].clone()).with_context(|| format!("cannot parse {}", path.display()))?;
        Ok(Index { dir: artifact.join("index"), units })
    }
}

/// The text as dedup compares it.
pub fn normalize(text: &str, p: &Params) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.chars() {
        if c.is_whitespace() && p.collapse_whitespace {
            space = !out.is_empty();
            continue;
        }
        if p.strip_punctuation && !c.is_alphanumeric() && !c.is_whitespace() {
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        if p.lowercase && c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else if p.lowercase {
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn find(parent: &mut [u32], mut i: usize) -> usize {
    while parent[i] as usize != i {
        parent[i] = parent[parent[i] as usize];
        i = parent[i] as usize;
    }
    i
}

/// The sorted, distinct 64-bit hashes of a normalized text's word n-grams.
fn shingles(text: &str, n: usize) -> Vec<u64> {
    let words: Vec<u64> = text.split_whitespace().map(|w| xxh3_64(w.as_bytes())).collect();
    let mut set: Vec<u64> = if words.len() < n { vec![ngram_hash(&words)] } else { words.windows(n).map(ngram_hash).collect() };
    set.sort_unstable();
    set.dedup();
    set
}

/// Jaccard similarity of two sorted, distinct sets.
fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    common as f64 / (a.len() + b.len() - common) as f64
}

/// `bands × rows` hash functions `h(x) = (x ^ b) · a` (odd `a`), drawn from
/// the seed.
struct MinHasher {
    xor: Vec<u64>,
    mul: Vec<u64>,
    bands: usize,
    rows: usize,
}

impl MinHasher {
    fn new(p: &Params) -> Self {
        let mut state = p.seed;
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            fmix64(state)
        };
        let count = p.bands * p.rows;
        let xor = (0..count).map(|_| next()).collect();
        let mul = (0..count).map(|_| next() | 1).collect();
        MinHasher { xor, mul, bands: p.bands, rows: p.rows }
    }

    fn band_keys(&self, set: &[u64]) -> Vec<u64> {
        let mut signature = vec![u64::MAX; self.xor.len()];
        for &x in set {
            for ((s, &xor), &mul) in signature.iter_mut().zip(&self.xor).zip(&self.mul) {
                // An odd multiplier is a bijection on u64; xoring the high half
                // down spreads the high bits the minimum is decided by.
                let h = (x ^ xor).wrapping_mul(mul);
                *s = (*s).min(h ^ (h >> 32));
            }
        }
        (0..self.bands)
            .map(|band| {
                let rows = &signature[band * self.rows..(band + 1) * self.rows];
                let bytes: Vec<u8> = rows.iter().flat_map(|r| r.to_le_bytes()).collect();
                xxh3_64_with_seed(&bytes, band as u64)
            })
            .collect()
    }
}

fn write_outputs(parts: &[PathBuf], roots: &[u32], first_ours: u32, against: Option<&Index>, p: &Params, ctx: &mut StageCtx) -> Result<()> {
    let n = roots.len() - first_ours as usize;
    let mut has_members = vec![false; roots.len()];
    for (i, &r) in roots.iter().enumerate() {
        if r as usize != i {
            has_members[r as usize] = true;
        }
    }
    // Ids of the other corpus's documents that are roots of our duplicates.
    let mut names: HashMap<u32, String> = HashMap::new();
    if let Some(other) = against {
        let mut start = 0u32;
        for unit in &other.units {
            let end = start + documents(unit);
            if (start..end).any(|i| has_members[i as usize]) {
                let file = unit.files.get("ids").and_then(|f| f.first()).with_context(|| format!("unit {} has no ids", unit.key))?;
                let mut doc = start;
                for df in RowGroups::open(&other.dir.join(file), Some(&["id"]))? {
                    for id in df?.column("id")?.str()?.iter() {
                        if has_members[doc as usize] {
                            names.insert(doc, id.unwrap_or_default().to_string());
                        }
                        doc += 1;
                    }
                }
            }
            start = end;
        }
    }
    let mut kept_out = PartWriter::new(&ctx.out.join(docs::DIR), "part-", p.part_mb << 20);
    let mut clusters_out = PartWriter::new(&ctx.out.join("clusters"), "part-", usize::MAX);
    let mut doc = first_ours;
    for part in parts {
        for df in docs::batches(part)? {
            let df = df?;
            let ids: Vec<String> = df.column("id")?.str()?.iter().map(|s| s.unwrap_or_default().to_string()).collect();
            let mut keep = Vec::with_capacity(ids.len());
            let mut cluster = Vec::with_capacity(ids.len());
            for id in &ids {
                let root = roots[doc as usize];
                if has_members[doc as usize] {
                    names.insert(doc, id.clone());
                }
                keep.push(root == doc);
                cluster.push(if root == doc { id.clone() } else { names[&root].clone() });
                doc += 1;
            }
            kept_out.push(&docs::select(&df, &keep)?)?;
            let height = ids.len();
            let columns = vec![Column::new("id".into(), ids), Column::new("cluster".into(), cluster), Column::new("kept".into(), keep)];
            clusters_out.push(&polars::prelude::DataFrame::new(height, columns)?)?;
        }
    }
    let documents_out = kept_out.rows();
    kept_out.finish()?;
    clusters_out.finish()?;
    let multi = has_members.iter().filter(|&&m| m).count();
    let against_duplicates = roots[first_ours as usize..].iter().filter(|&&r| r < first_ours).count();
    let fraction = if n == 0 { 0.0 } else { (n - documents_out) as f64 / n as f64 };
    ctx.metric("documents_in", n);
    ctx.metric("documents_out", documents_out);
    ctx.metric("clusters", multi);
    ctx.metric("duplicate_fraction", fraction);
    if against.is_some() {
        ctx.metric("against_duplicates", against_duplicates);
    }
    eprintln!(
        "dedup: {n} documents in, {documents_out} kept, {} removed ({:.2}%) in {multi} duplicate clusters{}",
        n - documents_out,
        100.0 * fraction,
        if against.is_some() { format!(", {against_duplicates} of them duplicates of the `against` corpus") } else { String::new() }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use polars::prelude::DataFrame;

    use super::*;
    use crate::data::rng::Rng;
    use crate::testing::{novel_paragraphs, run_stage};

    /// Each document's cluster as the index of its kept document
    /// (`run_stage` names documents `d0`, `d1`, …).
    fn cluster_indices(out: &Path) -> Vec<usize> {
        let clusters = docs::read_table(&out.join("clusters")).unwrap();
        clusters.column("cluster").unwrap().str().unwrap().iter().map(|c| c.unwrap()[1..].parse().unwrap()).collect()
    }

    /// The whole computation in memory, as the stage did before it
    /// streamed: the reference the streaming path must equal.
    fn in_memory(texts: &[&str], p: &Params) -> Vec<usize> {
        let normalized: Vec<String> = texts.iter().map(|t| normalize(t, p)).collect();
        let n = texts.len();
        let mut pairs = Vec::new();
        let sets: Vec<Vec<u64>> = normalized.iter().map(|t| shingles(t, p.ngram)).collect();
        match p.method {
            Method::Exact => {
                let mut first = HashMap::new();
                for (i, t) in normalized.iter().enumerate() {
                    let f = *first.entry(t.clone()).or_insert(i);
                    if f != i {
                        pairs.push((f, i));
                    }
                }
            }
            Method::Minhash => {
                let hasher = MinHasher::new(p);
                let keys: Vec<Vec<u64>> = sets.iter().map(|s| hasher.band_keys(s)).collect();
                for band in 0..p.bands {
                    let mut bucket: Vec<(u64, usize)> = keys.iter().enumerate().map(|(i, k)| (k[band], i)).collect();
                    bucket.sort_unstable();
                    for run in bucket.chunk_by(|a, b| a.0 == b.0) {
                        for (j, &(_, b)) in run.iter().enumerate() {
                            let firsts = if run.len() <= p.max_bucket { &run[..j] } else { &run[..1.min(j)] };
                            pairs.extend(firsts.iter().map(|&(_, a)| (a, b)).filter(|&(a, b)| jaccard(&sets[a], &sets[b]) >= p.threshold));
                        }
                    }
                }
            }
        }
        let mut parent: Vec<u32> = (0..n as u32).collect();
        for (a, b) in pairs {
            union(&mut parent, a as u32, b as u32);
        }
        (0..n).map(|i| find(&mut parent, i)).collect()
    }

    #[test]
    fn exact_normalizes_case_whitespace_and_punctuation() {
        let texts = ["Hello, World!", "other text", "hello   world", "HELLO WORLD.", "Other text?"];
        let p = Params { method: Method::Exact, ..Params::default() };
        assert_eq!(normalize(texts[0], &p), "hello world");
        assert_eq!(cluster_indices(run_stage::<Dedup>(&p, &texts).0.path()), [0, 1, 0, 0, 1]);
        let strict = Params { lowercase: false, strip_punctuation: false, ..p };
        assert_eq!(cluster_indices(run_stage::<Dedup>(&strict, &texts).0.path()), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn stage_writes_kept_docs_clusters_and_metrics() {
        let texts = ["a b c d e f", "x y z", "A b c, d e f.", "x y z", "unique"];
        let p = Params { method: Method::Exact, ..Params::default() };
        let (out, ctx) = run_stage::<Dedup>(&p, &texts);
        let kept = docs::read(out.path()).unwrap();
        assert_eq!(docs::texts(&kept).unwrap(), ["a b c d e f", "x y z", "unique"]);
        let clusters = docs::read_table(&out.path().join("clusters")).unwrap();
        let cluster: Vec<&str> = clusters.column("cluster").unwrap().str().unwrap().iter().map(Option::unwrap).collect();
        assert_eq!(cluster, ["d0", "d1", "d0", "d1", "d4"]);
        assert_eq!(ctx.metrics()["documents_out"], 3);
        assert_eq!(ctx.metrics()["clusters"], 2);
        assert_eq!(ctx.metrics()["duplicate_fraction"], 0.4);
    }

    /// Every file under `dir/sub`, by name, with its bytes.
    fn files(dir: &Path, sub: &str) -> Vec<(String, Vec<u8>)> {
        docs::parquet_files(&dir.join(sub))
            .unwrap()
            .iter()
            .map(|f| (f.file_name().unwrap().to_string_lossy().into(), fs::read(f).unwrap()))
            .collect()
    }

    #[test]
    fn streaming_with_spills_equals_the_in_memory_reference_byte_for_byte() {
        let paragraphs = novel_paragraphs("austen.txt", 20);
        let mut texts: Vec<&str> = paragraphs.iter().take(3000).map(String::as_str).collect();
        texts.extend(paragraphs.iter().take(200).map(String::as_str));
        for method in [Method::Minhash, Method::Exact] {
            // A budget of nothing: bucket records and pairs spill in runs of
            // about 40,000, so the stage merges several runs.
            let tiny = Params { method, memory_mb: 0, part_mb: 1, ..Params::default() };
            let (a, ctx) = run_stage::<Dedup>(&tiny, &texts);
            let (b, _) = run_stage::<Dedup>(&Params { memory_mb: 4096, ..tiny.clone() }, &texts);
            for sub in [docs::DIR, "clusters"] {
                assert_eq!(files(a.path(), sub), files(b.path(), sub), "{sub}: the budget changed bytes");
            }
            let reference = in_memory(&texts, &tiny);
            assert_eq!(cluster_indices(a.path()), reference);
            assert_eq!(ctx.metrics()["documents_out"], 3000);
            // The kept documents, written in one go, are the same bytes.
            let expected = tempfile::tempdir().unwrap();
            let ids: Vec<String> = (0..texts.len()).map(|i| format!("d{i}")).collect();
            let input = docs::frame(ids, texts.iter().map(|t| t.to_string()).collect(), vec!["test".into(); texts.len()]).unwrap();
            let keep: Vec<bool> = reference.iter().enumerate().map(|(i, &r)| r == i).collect();
            let mut writer = PartWriter::new(&expected.path().join(docs::DIR), "part-", 1 << 20);
            writer.push(&docs::select(&input, &keep).unwrap()).unwrap();
            writer.finish().unwrap();
            assert_eq!(files(a.path(), docs::DIR), files(expected.path(), docs::DIR));
        }
    }

    #[test]
    fn against_removes_duplicates_of_the_other_corpus_only() {
        let paragraphs = novel_paragraphs("austen.txt", 20);
        let old: Vec<&str> = paragraphs[..500].iter().map(String::as_str).collect();
        let (old_out, _) = run_stage::<Dedup>(&Params::default(), &old);
        // The new corpus: 100 texts of the old one, 300 new ones, each new
        // one twice.
        let mut new: Vec<&str> = paragraphs[400..800].iter().map(String::as_str).collect();
        new.extend(paragraphs[500..800].iter().map(String::as_str));
        let input = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..new.len()).map(|i| format!("n{i}")).collect();
        docs::write(input.path(), &docs::frame(ids, new.iter().map(|t| t.to_string()).collect(), vec!["new".into(); new.len()]).unwrap())
            .unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut ctx = StageCtx::new("new", input.path(), out.path(), &input.path().join("work"));
        ctx.inputs.insert("input".into(), input.path().to_path_buf());
        ctx.inputs.insert("against".into(), old_out.path().to_path_buf());
        Dedup::run(&Params::default(), &mut ctx).unwrap();
        let kept: DataFrame = docs::read(out.path()).unwrap();
        assert_eq!(docs::texts(&kept).unwrap(), new[100..400]);
        assert_eq!(ctx.metrics()["against_duplicates"], 100);
        let clusters = docs::read_table(&out.path().join("clusters")).unwrap();
        let cluster: Vec<&str> = clusters.column("cluster").unwrap().str().unwrap().iter().map(Option::unwrap).collect();
        assert_eq!(cluster[0], "d400", "a duplicate of the other corpus names the document there");
        assert_eq!(cluster[400], "n100");

        // Other signature params cannot be compared.
        let mut ctx = StageCtx::new("new", input.path(), out.path(), &input.path().join("work"));
        ctx.inputs.insert("input".into(), input.path().to_path_buf());
        ctx.inputs.insert("against".into(), old_out.path().to_path_buf());
        let message = format!("{:#}", Dedup::run(&Params { bands: 10, ..Params::default() }, &mut ctx).unwrap_err());
        assert!(message.contains("use the same method, normalization, ngram, bands, rows and seed"), "{message}");
    }

    /// Replaces `edits` distinct random words of `text` with words that occur
    /// nowhere in the corpus.
    fn edit(text: &str, edits: usize, rng: &mut Rng) -> String {
        let mut words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
        let mut positions: Vec<usize> = (0..words.len()).collect();
        for k in 0..edits.min(words.len()) {
            let pick = k + rng.below(positions.len() - k);
            positions.swap(k, pick);
            words[positions[k]] = format!("qz{}", rng.next_u64());
        }
        words.join(" ")
    }

    #[test]
    fn minhash_recall_and_precision_on_planted_duplicates() {
        let p = Params::default();
        let paragraphs = novel_paragraphs("austen.txt", 40);
        assert!(paragraphs.len() >= 2000, "only {} long paragraphs", paragraphs.len());
        let mut rng = Rng::new(7);
        let mut texts: Vec<String> = paragraphs[..2000].to_vec();
        // (base, copy, true Jaccard) for every planted pair.
        let mut planted = Vec::new();
        for base in 0..1000 {
            // Aim at a Jaccard level uniform in [0.3, 1]: k scattered edits
            // break about 5k of the S shingles, so J ≈ (S - 5k) / (S + 5k).
            let target = 0.3 + 0.7 * rng.below(1001) as f64 / 1000.0;
            let shingle_count = texts[base].split_whitespace().count() - 4;
            let edits = ((1.0 - target) / (1.0 + target) * shingle_count as f64 / 5.0).round() as usize;
            let copy = edit(&texts[base], edits, &mut rng);
            let j = jaccard(&shingles(&normalize(&copy, &p), 5), &shingles(&normalize(&texts[base], &p), 5));
            planted.push((base, texts.len(), j));
            texts.push(copy);
        }
        let normalized: Vec<String> = texts.iter().map(|t| normalize(t, &p)).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (out, _) = run_stage::<Dedup>(&p, &refs);
        let clusters = cluster_indices(out.path());

        let high: Vec<_> = planted.iter().filter(|x| x.2 >= 0.85).collect();
        let found = high.iter().filter(|&&&(a, b, _)| clusters[a] == clusters[b]).count();
        let recall = found as f64 / high.len() as f64;
        let low: Vec<_> = planted.iter().filter(|x| x.2 < 0.6).collect();
        let merged_low = low.iter().filter(|&&&(a, b, _)| clusters[a] == clusters[b]).count();
        // Every pair inside a cluster, judged by its true similarity.
        let sets: Vec<Vec<u64>> = normalized.iter().map(|t| shingles(t, 5)).collect();
        let (mut merged, mut wrong) = (0usize, 0usize);
        for i in 0..texts.len() {
            for j in (i + 1)..texts.len() {
                if clusters[i] == clusters[j] {
                    merged += 1;
                    wrong += usize::from(jaccard(&sets[i], &sets[j]) < 0.6);
                }
            }
        }
        let precision = 1.0 - wrong as f64 / merged as f64;
        eprintln!(
            "planted {} pairs: {} above 0.85 (recall {recall:.4}), {} below 0.6 ({merged_low} merged); {merged} merged pairs, precision {precision:.4}",
            planted.len(),
            high.len(),
            low.len()
        );
        assert!(high.len() >= 150 && low.len() >= 300, "planted levels too narrow");
        assert!(recall >= 0.95, "recall {recall}");
        assert!(precision >= 0.95, "precision {precision}");
        assert_eq!(merged_low, 0);
    }
}
