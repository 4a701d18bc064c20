//! Datasets of JSON records: instruction sets, preference pairs, labeled
//! mails, benchmark items. Read from a JSON array or JSON Lines, optionally
//! gzip-compressed, and split deterministically.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::data::rng::shuffled;
use serde::de::DeserializeOwned;

/// The records of `path`, each deserialized as `T`: a JSON array (`.json`)
/// or one object per line (`.jsonl`); a `.gz` suffix is decompressed. Errors
/// name the file and, for JSON Lines, the line.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut text = String::new();
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let name = match name.strip_suffix(".gz") {
        Some(inner) => {
            flate2::read::GzDecoder::new(file)
                .read_to_string(&mut text)
                .with_context(|| format!("{}: not gzip-compressed UTF-8 text", path.display()))?;
            inner
        }
        None => {
            std::io::BufReader::new(file).read_to_string(&mut text).with_context(|| format!("{}: not UTF-8 text", path.display()))?;
            name
        }
    };
    if name.ends_with(".json") || text.trim_start().starts_with('[') {
        let records: Vec<serde_json::Value> =
            serde_json::from_str(&text).with_context(|| format!("{}: not a JSON array", path.display()))?;
        return records
            .into_iter()
            .enumerate()
            .map(|(i, r)| serde_json::from_value(r).with_context(|| format!("{}: record {}", path.display(), i + 1)))
            .collect();
    }
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        records.push(serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), i + 1))?);
    }
    if records.is_empty() {
        bail!("{}: no records", path.display());
    }
    Ok(records)
}

/// What a stage holds out of its records, said one way by every stage that
/// splits its data: consecutive parts of a seeded shuffle, `fractions` of
/// the records in order (train, validation, and a test part where the stage
/// has one). `sft`, `dpo`, `reward_model` and `classify` take it as
/// `split = [...]` seeded by `train.seed`; `ppo` as `val_fraction` and
/// `split_seed` ([`Split::held_out`]), so that its held-out prompts can be
/// `reward_model`'s. (`grpo` holds out a file of its own, `eval_data`.)
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub fractions: Vec<f64>,
    pub seed: u64,
}

impl Split {
    pub fn new(fractions: &[f64], seed: u64) -> Split {
        Split { fractions: fractions.to_vec(), seed }
    }

    /// Training records and `fraction` of them held out.
    pub fn held_out(fraction: f64, seed: u64) -> Split {
        Split { fractions: vec![1.0 - fraction, fraction], seed }
    }

    /// The parts of `0..n`, each in ascending order; the same for the same
    /// `n` on every run.
    pub fn parts(&self, n: usize) -> Vec<Vec<usize>> {
        split(n, &self.fractions, self.seed)
    }

    /// The parts of the examples of `classes` (each example's class, below
    /// `n_classes`), each class held equally often: each is undersampled to
    /// the size of the smallest (a seeded choice), and its kept examples are
    /// split as [`Split::parts`]. Indices are ascending in each part.
    pub fn balanced(&self, classes: &[usize], n_classes: usize) -> Vec<Vec<usize>> {
        let (fractions, seed) = (&self.fractions, self.seed);
        let mut members = vec![Vec::new(); n_classes];
        for (i, &c) in classes.iter().enumerate() {
            members[c].push(i);
        }
        let smallest = members.iter().map(Vec::len).min().unwrap_or(0);
        let mut parts = vec![Vec::new(); fractions.len()];
        for (c, members) in members.iter().enumerate() {
            let class_seed = seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let kept: Vec<usize> = shuffled(members.len(), class_seed)[..smallest].iter().map(|&k| members[k]).collect();
            for (part, positions) in parts.iter_mut().zip(split(smallest, fractions, class_seed)) {
                part.extend(positions.iter().map(|&k| kept[k]));
            }
        }
        parts.iter_mut().for_each(|p| p.sort_unstable());
        parts
    }
}

/// Splits `0..n` into consecutive parts of the given `fractions` (summing to
/// at most 1; the last part takes the rounding remainder) after a shuffle
/// seeded by `seed`. The same (n, fractions, seed) always gives the same
/// parts, each in ascending order.
fn split(n: usize, fractions: &[f64], seed: u64) -> Vec<Vec<usize>> {
    let order = shuffled(n, seed);
    let mut parts = Vec::with_capacity(fractions.len());
    let mut at = 0;
    for (i, f) in fractions.iter().enumerate() {
        let end = if i + 1 == fractions.len() && fractions.iter().sum::<f64>() >= 1.0 - 1e-9 {
            n
        } else {
            (at + (f * n as f64).round() as usize).min(n)
        };
        let mut part = order[at..end].to_vec();
        part.sort_unstable();
        parts.push(part);
        at = end;
    }
    parts
}

/// Errors unless `split` has one fraction in (0, 1] per name in `names`
/// (e.g. `["train", "validation"]`), summing to at most 1.
pub fn check_split(split: &[f64], names: &[&str]) -> Result<(), crate::ParamError> {
    let ok = split.len() == names.len() && split.iter().all(|f| *f > 0.0 && *f <= 1.0) && split.iter().sum::<f64>() <= 1.0 + 1e-9;
    if ok {
        return Ok(());
    }
    Err(crate::ParamError::new(
        &["split"],
        format!("`split` must be {} fractions [{}], each above 0, summing to at most 1", names.len(), names.join(", ")),
    ))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Item {
        a: u32,
    }

    #[test]
    fn reads_arrays_lines_and_gzip_and_names_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("x.json");
        std::fs::write(&json, r#"[{"a": 1}, {"a": 2}]"#).unwrap();
        assert_eq!(read::<Item>(&json).unwrap(), [Item { a: 1 }, Item { a: 2 }]);
        let gz = dir.path().join("x.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
        enc.write_all(b"{\"a\": 3}\n\n{\"a\": 4}\n").unwrap();
        enc.finish().unwrap();
        assert_eq!(read::<Item>(&gz).unwrap(), [Item { a: 3 }, Item { a: 4 }]);
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"a\": 1}\n{\"a\": \"x\"}\n").unwrap();
        let err = format!("{:#}", read::<Item>(&bad).unwrap_err());
        assert!(err.starts_with(&format!("{}:2:", bad.display())), "{err}");
    }

    #[test]
    fn splits_are_deterministic_disjoint_and_complete() {
        let parts = split(100, &[0.85, 0.1, 0.05], 7);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), [85, 10, 5]);
        let mut all: Vec<usize> = parts.concat();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(split(100, &[0.85, 0.1, 0.05], 7), parts);
        assert_ne!(split(100, &[0.85, 0.1, 0.05], 8), parts);
        assert_eq!(split(10, &[0.5], 1)[0].len(), 5);
        assert!(check_split(&[0.85, 0.1, 0.05], &["train", "validation", "test"]).is_ok());
        assert_eq!(check_split(&[0.9, 0.2], &["train", "validation"]).unwrap_err().path, ["split"]);
        assert!(check_split(&[0.9], &["train", "validation"]).is_err());
        assert!(check_split(&[0.9, 0.0], &["train", "validation"]).is_err());
    }

    #[test]
    fn balanced_splits_hold_every_class_equally_often() {
        // 30 of class 0, 12 of class 1, 20 of class 2.
        let classes: Vec<usize> = (0..62)
            .map(|i| {
                if i < 30 {
                    0
                } else if i < 42 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let parts = Split::new(&[0.5, 0.25, 0.25], 9).balanced(&classes, 3);
        for (part, per_class) in parts.iter().zip([6, 3, 3]) {
            for c in 0..3 {
                assert_eq!(part.iter().filter(|&&i| classes[i] == c).count(), per_class, "{parts:?}");
            }
            assert!(part.windows(2).all(|w| w[0] < w[1]));
        }
        let mut all = parts.concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 36, "disjoint: 12 of each class in all");
        assert_eq!(Split::new(&[0.5, 0.25, 0.25], 9).balanced(&classes, 3), parts);
        assert_ne!(Split::new(&[0.5, 0.25, 0.25], 10).balanced(&classes, 3), parts);
    }
}
