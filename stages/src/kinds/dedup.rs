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
//! Outputs: `docs.parquet` (the kept documents, all input columns) and
//! `clusters.parquet` (`id`, `cluster` = the id of the kept document of its
//! cluster, `kept`). Metrics: `documents_in`, `documents_out`, `clusters`
//! (clusters with more than one document), `duplicate_fraction`, and for
//! MinHash `candidate_pairs` and `verified_pairs`.
//!
//! No param is volatile: every one can change the output.

use std::collections::HashMap;

use anyhow::Result;
use polars::prelude::{Column, DataFrame};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::data::text::{fmix64, ngram_hash};
use crate::formats::docs;
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
    /// Largest band bucket compared pair by pair.
    // Its pairs are held at once: 10,000 make 50 million.
    #[schemars(range(min = 1, max = 10_000))]
    pub max_bucket: usize,
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
        }
    }
}

impl Stage for Dedup {
    const KIND: &'static str = "dedup";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "remove exact (hash) or near (MinHash LSH) duplicate documents";
    const INPUTS: Inputs = Inputs::Fixed(&["input"]);
    type Params = Params;

    fn run(p: &Params, ctx: &mut StageCtx) -> Result<()> {
        let df = docs::read(ctx.input("input")?)?;
        let texts = docs::texts(&df)?;
        let normalized: Vec<String> = texts.par_iter().map(|t| normalize(t, p)).collect();
        let clusters = match p.method {
            Method::Exact => exact(&normalized),
            Method::Minhash => {
                let (clusters, stats) = minhash(&normalized, p, ctx);
                ctx.metric("candidate_pairs", stats.candidates);
                ctx.metric("verified_pairs", stats.verified);
                clusters
            }
        };
        write_outputs(&df, &clusters, ctx)
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

/// For each document, the index of its cluster's kept document: the first one
/// in input order (`clusters[i] == i` for kept documents).
type Clusters = Vec<usize>;

fn exact(normalized: &[String]) -> Clusters {
    let keys: Vec<[u8; 32]> = normalized.par_iter().map(|t| *blake3::hash(t.as_bytes()).as_bytes()).collect();
    let mut first = HashMap::with_capacity(keys.len());
    keys.iter().enumerate().map(|(i, k)| *first.entry(k).or_insert(i)).collect()
}

struct Stats {
    candidates: usize,
    verified: usize,
}

fn minhash(normalized: &[String], p: &Params, ctx: &mut StageCtx) -> (Clusters, Stats) {
    let hasher = MinHasher::new(p);
    let n = normalized.len();
    let mut shingle_sets = Vec::with_capacity(n);
    let mut band_keys = Vec::with_capacity(n);
    // Chunks so the progress bar moves while rayon works inside each chunk.
    for chunk in normalized.chunks(4096) {
        let done: Vec<(Vec<u64>, Vec<u64>)> = chunk
            .par_iter()
            .map(|t| {
                let set = shingles(t, p.ngram);
                let keys = hasher.band_keys(&set);
                (set, keys)
            })
            .collect();
        for (set, keys) in done {
            shingle_sets.push(set);
            band_keys.push(keys);
        }
        ctx.progress(shingle_sets.len() as u64, n as u64, "docs");
    }

    let mut pairs: Vec<(u32, u32)> = (0..p.bands)
        .into_par_iter()
        .flat_map_iter(|band| {
            let mut bucket: Vec<(u64, u32)> = band_keys.iter().enumerate().map(|(i, k)| (k[band], i as u32)).collect();
            bucket.sort_unstable();
            let mut pairs = Vec::new();
            for run in bucket.chunk_by(|a, b| a.0 == b.0).filter(|r| r.len() > 1) {
                if run.len() <= p.max_bucket {
                    for (j, &(_, b)) in run.iter().enumerate() {
                        pairs.extend(run[..j].iter().map(|&(_, a)| (a, b)));
                    }
                } else {
                    pairs.extend(run[1..].iter().map(|&(_, b)| (run[0].1, b)));
                }
            }
            pairs
        })
        .collect();
    pairs.par_sort_unstable();
    pairs.dedup();
    let verified: Vec<(u32, u32)> =
        pairs.par_iter().copied().filter(|&(a, b)| jaccard(&shingle_sets[a as usize], &shingle_sets[b as usize]) >= p.threshold).collect();

    let mut parent: Vec<usize> = (0..n).collect();
    for &(a, b) in &verified {
        let (ra, rb) = (find(&mut parent, a as usize), find(&mut parent, b as usize));
        // The smaller index becomes the root, so the root is the kept document.
        parent[ra.max(rb)] = ra.min(rb);
    }
    let clusters = (0..n).map(|i| find(&mut parent, i)).collect();
    (clusters, Stats { candidates: pairs.len(), verified: verified.len() })
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
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

fn write_outputs(df: &DataFrame, clusters: &Clusters, ctx: &mut StageCtx) -> Result<()> {
    let n = clusters.len();
    let kept: Vec<bool> = clusters.iter().enumerate().map(|(i, &c)| c == i).collect();
    let mut out = docs::select(df, &kept)?;
    docs::write(&ctx.out, &mut out)?;

    let ids: Vec<String> = df.column("id")?.str()?.iter().map(|s| s.unwrap_or_default().to_string()).collect();
    let cluster_ids: Vec<String> = clusters.iter().map(|&c| ids[c].clone()).collect();
    let mut sizes = vec![0usize; n];
    clusters.iter().for_each(|&c| sizes[c] += 1);
    let multi = sizes.iter().filter(|&&s| s > 1).count();
    let mut table = DataFrame::new(
        n,
        vec![Column::new("id".into(), ids), Column::new("cluster".into(), cluster_ids), Column::new("kept".into(), kept)],
    )?;
    docs::write_table(&ctx.out.join("clusters.parquet"), &mut table)?;

    let documents_out = out.height();
    let fraction = if n == 0 { 0.0 } else { (n - documents_out) as f64 / n as f64 };
    ctx.metric("documents_in", n);
    ctx.metric("documents_out", documents_out);
    ctx.metric("clusters", multi);
    ctx.metric("duplicate_fraction", fraction);
    eprintln!(
        "dedup: {n} documents in, {documents_out} kept, {} removed ({:.2}%) in {multi} duplicate clusters",
        n - documents_out,
        100.0 * fraction
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use polars::prelude::{ParquetReader, SerReader};

    use super::*;
    use crate::data::rng::Rng;
    use crate::testing::{novel_paragraphs, run_stage};

    #[test]
    fn exact_normalizes_case_whitespace_and_punctuation() {
        let texts = ["Hello, World!", "other text", "hello   world", "HELLO WORLD.", "Other text?"];
        let p = Params::default();
        let normalized: Vec<String> = texts.iter().map(|t| normalize(t, &p)).collect();
        assert_eq!(normalized[0], "hello world");
        assert_eq!(exact(&normalized), [0, 1, 0, 0, 1]);
        let strict = Params { lowercase: false, strip_punctuation: false, ..Params::default() };
        let normalized: Vec<String> = texts.iter().map(|t| normalize(t, &strict)).collect();
        assert_eq!(exact(&normalized), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn stage_writes_kept_docs_clusters_and_metrics() {
        let texts = ["a b c d e f", "x y z", "A b c, d e f.", "x y z", "unique"];
        let p = Params { method: Method::Exact, ..Params::default() };
        let (out, ctx) = run_stage::<Dedup>(&p, &texts);
        let kept = docs::read(out.path()).unwrap();
        assert_eq!(docs::texts(&kept).unwrap(), ["a b c d e f", "x y z", "unique"]);
        let clusters = ParquetReader::new(std::fs::File::open(out.path().join("clusters.parquet")).unwrap()).finish().unwrap();
        let cluster: Vec<&str> = clusters.column("cluster").unwrap().str().unwrap().iter().map(Option::unwrap).collect();
        assert_eq!(cluster, ["d0", "d1", "d0", "d1", "d4"]);
        assert_eq!(ctx.metrics()["documents_out"], 3);
        assert_eq!(ctx.metrics()["clusters"], 2);
        assert_eq!(ctx.metrics()["duplicate_fraction"], 0.4);
    }

    #[test]
    fn output_bytes_are_deterministic() {
        let paragraphs = novel_paragraphs("austen.txt", 20);
        let mut texts: Vec<&str> = paragraphs.iter().take(3000).map(String::as_str).collect();
        texts.extend(paragraphs.iter().take(200).map(String::as_str));
        let (a, _) = run_stage::<Dedup>(&Params::default(), &texts);
        let (b, _) = run_stage::<Dedup>(&Params::default(), &texts);
        for file in [docs::FILE, "clusters.parquet"] {
            assert_eq!(std::fs::read(a.path().join(file)).unwrap(), std::fs::read(b.path().join(file)).unwrap(), "{file}");
        }
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
        let mut ctx = StageCtx::new("t", ".".as_ref(), ".".as_ref(), ".".as_ref());
        let (clusters, _) = minhash(&normalized, &p, &mut ctx);

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
