//! The token data loader every training stage reads with.
//!
//! A [`Split`] is the `train` or `val` token stream of a `shard` artifact: its
//! shards, memory-mapped and read as one sequence. A [`Loader`] cuts that
//! stream into windows of `context + 1` tokens starting every `context` tokens
//! (window `i` starts at token `i * context`) and hands them out `batch_size` at
//! a time as `(x, y)`, `y` being `x` shifted by one token.
//!
//! [`Order::Sequential`] takes windows in stream order; [`Order::Random`] takes
//! each epoch's windows in a permutation drawn from the seed and the epoch
//! number, so every window is seen once per epoch. Either way the `k`-th window
//! handed out depends only on the data, `context`, the order and `k`, which is
//! all a [`Position`] has to record: a run resumed from a saved position sees
//! exactly the batches the uninterrupted run would have seen.
//!
//! In data-parallel training every rank builds the same loader and reads the
//! whole batch, then trains on its rows of it (`crate::train::ranks`), so
//! all ranks hold the same [`Position`].
//!
//! Token ids come out as `i64`, ready for `Tensor::from_slice`; the loader does
//! not depend on libtorch.

use std::path::Path;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::data::rng::Rng;
use crate::formats::tokens::{Manifest, TokenShard};

/// One split of a token shards artifact, read as a single token stream.
#[derive(Debug)]
pub struct Split {
    shards: Vec<TokenShard>,
    /// `starts[i]`: the stream offset of shard `i`'s first token.
    starts: Vec<u64>,
    len: u64,
}

impl Split {
    /// Opens split `name` (`train` or `val`) of the token shards in `dir`,
    /// checking every shard against the manifest, token ids included.
    pub fn open(dir: &Path, name: &str) -> Result<Split> {
        let manifest = Manifest::read(dir)?;
        let mut shards = Vec::new();
        let mut starts = Vec::new();
        let mut len = 0;
        for info in &manifest.split(name)?.shards {
            let shard = TokenShard::open(&dir.join(&info.file))?;
            if shard.len() as u64 != info.tokens {
                bail!("corrupt shard {}: {} tokens, but the manifest lists {}", shard.path().display(), shard.len(), info.tokens);
            }
            if shard.width() != manifest.width {
                bail!("corrupt shard {}: {:?} tokens, but the manifest says {:?}", shard.path().display(), shard.width(), manifest.width);
            }
            shard.check_ids(manifest.vocab_size)?;
            starts.push(len);
            len += info.tokens;
            shards.push(shard);
        }
        Ok(Split { shards, starts, len })
    }

    /// Tokens in the split.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends stream tokens `start..start + n` to `out`, across shards.
    pub fn read_into(&self, start: u64, n: usize, out: &mut Vec<i64>) {
        assert!(start + n as u64 <= self.len, "tokens {start}..{} of a {}-token split", start + n as u64, self.len);
        if n == 0 {
            return;
        }
        let mut pos = start;
        let end = start + n as u64;
        // The last shard starting at or before `pos`.
        let mut i = self.starts.partition_point(|&s| s <= pos) - 1;
        while pos < end {
            let offset = (pos - self.starts[i]) as usize;
            let take = (self.shards[i].len() - offset).min((end - pos) as usize);
            self.shards[i].read_into(offset, take, out);
            pos += take as u64;
            i += 1;
        }
    }
}

/// The order windows are handed out in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "order")]
pub enum Order {
    Sequential,
    Random { seed: u64 },
}

/// Where a loader is: how many windows it has handed out. Part of a training
/// checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub windows: u64,
}

/// `batch_size` windows of `context` tokens, row-major; `y` is `x` shifted by
/// one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub x: Vec<i64>,
    pub y: Vec<i64>,
    pub batch_size: usize,
    pub context: usize,
}

/// Hands out `(x, y)` batches from a [`Split`].
pub struct Loader {
    split: Split,
    batch_size: usize,
    context: usize,
    order: Order,
    windows_per_epoch: u64,
    position: Position,
    /// The permutation of the epoch in use, for [`Order::Random`].
    permutation: Option<(u64, Vec<u64>)>,
}

impl Loader {
    pub fn new(split: Split, batch_size: usize, context: usize, order: Order) -> Result<Loader> {
        if batch_size == 0 || context == 0 {
            bail!("batch size and context must be positive (got {batch_size} and {context})");
        }
        if split.len() <= context as u64 {
            bail!("the split has {} tokens, too few for one window of context {context} plus one", split.len());
        }
        let windows_per_epoch = (split.len() - 1) / context as u64;
        let position = Position::default();
        Ok(Loader { split, batch_size, context, order, windows_per_epoch, position, permutation: None })
    }

    /// The position to save in a checkpoint.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Continues from a saved position.
    pub fn seek(&mut self, position: Position) {
        self.position = position;
    }

    /// Windows in one pass over the split.
    pub fn windows_per_epoch(&self) -> u64 {
        self.windows_per_epoch
    }

    /// Completed passes over the split.
    pub fn epoch(&self) -> u64 {
        self.position.windows / self.windows_per_epoch
    }

    pub fn next_batch(&mut self) -> Batch {
        let (b, t) = (self.batch_size, self.context);
        let mut x = Vec::with_capacity(b * t);
        let mut y = Vec::with_capacity(b * t);
        let mut window = Vec::with_capacity(t + 1);
        for i in 0..b as u64 {
            let index = self.window_index(self.position.windows + i);
            window.clear();
            self.split.read_into(index * t as u64, t + 1, &mut window);
            x.extend_from_slice(&window[..t]);
            y.extend_from_slice(&window[1..]);
        }
        self.position.windows += b as u64;
        Batch { x, y, batch_size: b, context: t }
    }

    /// The window handed out `k`-th.
    fn window_index(&mut self, k: u64) -> u64 {
        let (epoch, i) = (k / self.windows_per_epoch, k % self.windows_per_epoch);
        match self.order {
            Order::Sequential => i,
            Order::Random { seed } => {
                if self.permutation.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    self.permutation = Some((epoch, permutation(self.windows_per_epoch, seed, epoch)));
                }
                self.permutation.as_ref().expect("set above").1[i as usize]
            }
        }
    }
}

/// A permutation of `0..n` drawn from `seed` and `epoch`.
fn permutation(n: u64, seed: u64, epoch: u64) -> Vec<u64> {
    let mut p: Vec<u64> = (0..n).collect();
    Rng::stream(seed, epoch).shuffle(&mut p);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::tokens::{ShardInfo, ShardWriter, SplitInfo, Width};

    /// A token shards artifact whose train stream is `0..n` cut into shards of
    /// `per_shard` tokens.
    fn counting_shards(dir: &Path, n: u32, per_shard: u32) {
        let mut shards = Vec::new();
        for (i, start) in (0..n).step_by(per_shard as usize).enumerate() {
            let file = format!("train_{i:06}.bin");
            let mut w = ShardWriter::create(&dir.join(&file), Width::U16).unwrap();
            w.write(&(start..n.min(start + per_shard)).collect::<Vec<_>>()).unwrap();
            shards.push(ShardInfo { file, tokens: w.finish().unwrap() });
        }
        let train = SplitInfo { documents: 1, tokens: n as u64, shards };
        Manifest { vocab_size: 65536, width: Width::U16, eot: 0, train, val: SplitInfo::default() }.write(dir).unwrap();
    }

    fn loader(dir: &Path, order: Order) -> Loader {
        Loader::new(Split::open(dir, "train").unwrap(), 3, 4, order).unwrap()
    }

    #[test]
    fn sequential_batches_shift_y_and_cross_shards() {
        let dir = tempfile::tempdir().unwrap();
        counting_shards(dir.path(), 30, 7);
        let mut l = loader(dir.path(), Order::Sequential);
        assert_eq!(l.windows_per_epoch(), 7);
        let b = l.next_batch();
        assert_eq!(b.x, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(b.y, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        l.next_batch();
        // Windows 6, then 0 and 1 of the second epoch.
        assert_eq!(l.next_batch().x, [24, 25, 26, 27, 0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(l.epoch(), 1);
    }

    #[test]
    fn random_epochs_cover_every_window_once_in_a_seeded_order() {
        let dir = tempfile::tempdir().unwrap();
        counting_shards(dir.path(), 10_001, 1000);
        let starts = |order, epochs| {
            let mut l = Loader::new(Split::open(dir.path(), "train").unwrap(), 10, 4, order).unwrap();
            (0..epochs * 250).flat_map(|_| l.next_batch().x.chunks(4).map(|w| w[0]).collect::<Vec<_>>()).collect::<Vec<_>>()
        };
        let a = starts(Order::Random { seed: 1 }, 2);
        for epoch in a.chunks(2500) {
            let mut sorted = epoch.to_vec();
            sorted.sort();
            assert_eq!(sorted, (0..2500).map(|i| i * 4).collect::<Vec<_>>());
        }
        assert_ne!(a[..2500], a[2500..], "each epoch has its own order");
        assert_eq!(a, starts(Order::Random { seed: 1 }, 2));
        assert_ne!(a, starts(Order::Random { seed: 2 }, 2));
    }

    #[test]
    fn a_resumed_loader_sees_the_batches_of_an_uninterrupted_one() {
        let dir = tempfile::tempdir().unwrap();
        counting_shards(dir.path(), 200, 64);
        for order in [Order::Sequential, Order::Random { seed: 7 }] {
            let mut straight = loader(dir.path(), order);
            let expected: Vec<Batch> = (0..40).map(|_| straight.next_batch()).collect();

            let mut first = loader(dir.path(), order);
            let mut seen: Vec<Batch> = (0..23).map(|_| first.next_batch()).collect();
            let saved = serde_json::to_string(&first.position()).unwrap();
            drop(first);
            let mut resumed = loader(dir.path(), order);
            resumed.seek(serde_json::from_str(&saved).unwrap());
            seen.extend((23..40).map(|_| resumed.next_batch()));
            assert_eq!(seen, expected, "{order:?}");
        }
    }

    #[test]
    fn mismatched_manifest_and_short_splits_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        counting_shards(dir.path(), 20, 10);
        let mut manifest = Manifest::read(dir.path()).unwrap();
        let err = Loader::new(Split::open(dir.path(), "train").unwrap(), 1, 20, Order::Sequential).err().unwrap();
        assert!(err.to_string().contains("20 tokens, too few"), "{err}");
        manifest.train.shards[1].tokens = 11;
        manifest.write(dir.path()).unwrap();
        let err = Split::open(dir.path(), "train").unwrap_err().to_string();
        assert!(err.contains("train_000001.bin: 10 tokens, but the manifest lists 11"), "{err}");
    }
}
