//! The token shard format: llm.c's layout, memory-mapped for reading.
//!
//! A shard is a header of 256 little-endian int32 — `[0]` the magic, `[1]` the
//! version, `[2]` the number of tokens, the rest zero — followed by the tokens.
//! The header says how wide the tokens are, with llm.c's own two conventions:
//!
//! | magic      | version | tokens | used by llm.c for |
//! |------------|---------|--------|-------------------|
//! | 20240520   | 1       | uint16 | GPT-2 (vocabularies up to 65,535) |
//! | 20240801   | 7       | uint32 | Llama 3 (larger vocabularies) |
//!
//! A token shards artifact holds `train_NNNNNN.bin` and `val_NNNNNN.bin`, the
//! tokenizer they were encoded with (`tokenizer.json`) and `manifest.json`
//! ([`Manifest`]), which lists the shards of each split with their token counts.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

/// The manifest's file name inside a token shards artifact.
pub const MANIFEST: &str = "manifest.json";

const HEADER_INTS: usize = 256;
const HEADER_BYTES: usize = HEADER_INTS * 4;

/// How wide the tokens of a shard are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Width {
    U16,
    U32,
}

impl Width {
    /// The narrowest width that holds every id of a `vocab_size` vocabulary.
    pub fn for_vocab(vocab_size: usize) -> Width {
        if vocab_size <= 1 << 16 {
            Width::U16
        } else {
            Width::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Width::U16 => 2,
            Width::U32 => 4,
        }
    }

    /// Appends `ids` as little-endian tokens of this width.
    pub fn encode(self, ids: &[u32], out: &mut Vec<u8>) -> Result<()> {
        for &id in ids {
            match self {
                Width::U16 => out.extend_from_slice(&u16::try_from(id).context("token id exceeds uint16")?.to_le_bytes()),
                Width::U32 => out.extend_from_slice(&id.to_le_bytes()),
            }
        }
        Ok(())
    }

    /// `(magic, version)` in the header.
    fn marker(self) -> (i32, i32) {
        match self {
            Width::U16 => (20240520, 1),
            Width::U32 => (20240801, 7),
        }
    }

    fn from_marker(magic: i32, version: i32) -> Option<Width> {
        [Width::U16, Width::U32].into_iter().find(|w| w.marker() == (magic, version))
    }
}

/// One shard in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// The file name, relative to the artifact directory.
    pub file: String,
    pub tokens: u64,
}

/// The shards of one split (`train` or `val`) and their totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub documents: u64,
    pub tokens: u64,
    pub shards: Vec<ShardInfo>,
}

/// `manifest.json` of a token shards artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub vocab_size: usize,
    pub width: Width,
    /// The id of `<|endoftext|>`, which ends every document.
    pub eot: u32,
    pub train: SplitInfo,
    pub val: SplitInfo,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}: the input is not a token shards artifact", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a token shards manifest", path.display()))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(self)? + "\n";
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The split named `train` or `val`.
    pub fn split(&self, name: &str) -> Result<&SplitInfo> {
        match name {
            "train" => Ok(&self.train),
            "val" => Ok(&self.val),
            _ => bail!("no split named `{name}`: token shards have `train` and `val`"),
        }
    }
}

/// Writes one shard: tokens stream to the file, the header is filled in last.
pub struct ShardWriter {
    path: PathBuf,
    file: BufWriter<File>,
    width: Width,
    tokens: u64,
}

impl ShardWriter {
    pub fn create(path: &Path, width: Width) -> Result<ShardWriter> {
        let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.write_all(&[0; HEADER_BYTES])?;
        Ok(ShardWriter { path: path.to_path_buf(), file, width, tokens: 0 })
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    pub fn write(&mut self, ids: &[u32]) -> Result<()> {
        let mut bytes = Vec::with_capacity(ids.len() * self.width.bytes());
        self.width.encode(ids, &mut bytes)?;
        self.file.write_all(&bytes).with_context(|| format!("cannot write {}", self.path.display()))?;
        self.tokens += ids.len() as u64;
        Ok(())
    }

    /// Appends `tokens` tokens already encoded at this width from `from`
    /// (in the kernel where it can: `copy_file_range`).
    pub fn copy_from(&mut self, from: &mut File, tokens: u64) -> Result<()> {
        let bytes = tokens * self.width.bytes() as u64;
        let copied = std::io::copy(&mut (&mut *from).take(bytes), &mut self.file)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        if copied != bytes {
            bail!("{}: a token file ended {} bytes early", self.path.display(), bytes - copied);
        }
        self.tokens += tokens;
        Ok(())
    }

    /// Writes the header and flushes the file to disk.
    pub fn finish(mut self) -> Result<u64> {
        let count = i32::try_from(self.tokens)
            .with_context(|| format!("{}: {} tokens do not fit the header's int32 count", self.path.display(), self.tokens))?;
        let (magic, version) = self.width.marker();
        let mut header = [0i32; HEADER_INTS];
        header[..3].copy_from_slice(&[magic, version, count]);
        let bytes: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
        let written = self
            .file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.write_all(&bytes))
            .and_then(|_| self.file.flush())
            .and_then(|_| self.file.get_ref().sync_all());
        written.with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(self.tokens)
    }
}

/// A shard opened for reading: checked, then memory-mapped.
#[derive(Debug)]
pub struct TokenShard {
    path: PathBuf,
    map: Mmap,
    width: Width,
    len: usize,
}

impl TokenShard {
    /// Opens a shard, checking its header against its size.
    pub fn open(path: &Path) -> Result<TokenShard> {
        let file = File::open(path).with_context(|| format!("cannot open shard {}", path.display()))?;
        // SAFETY: artifacts are immutable once published; nothing writes a
        // shard while it is mapped.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map shard {}", path.display()))?;
        let corrupt = |what: String| anyhow::anyhow!("corrupt shard {}: {what}", path.display());
        if map.len() < HEADER_BYTES {
            return Err(corrupt(format!("{} bytes, shorter than the {HEADER_BYTES}-byte header", map.len())));
        }
        let int = |i: usize| i32::from_le_bytes(map[i * 4..i * 4 + 4].try_into().unwrap());
        let (magic, version, count) = (int(0), int(1), int(2));
        let width = Width::from_marker(magic, version).ok_or_else(|| {
            corrupt(format!("magic {magic} version {version}; expected 20240520 version 1 (uint16) or 20240801 version 7 (uint32)"))
        })?;
        let len = usize::try_from(count).map_err(|_| corrupt(format!("negative token count {count}")))?;
        let expected = HEADER_BYTES + len * width.bytes();
        if map.len() != expected {
            return Err(corrupt(format!("the header says {len} tokens ({expected} bytes) but the file has {} bytes", map.len())));
        }
        Ok(TokenShard { path: path.to_path_buf(), map, width, len })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn width(&self) -> Width {
        self.width
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that every token id is below `vocab_size`: an id past the
    /// embedding table would otherwise fail deep inside libtorch, and only
    /// when a batch happened to hold it.
    pub fn check_ids(&self, vocab_size: usize) -> Result<()> {
        let w = self.width.bytes();
        let ids = self.map[HEADER_BYTES..].chunks_exact(w).map(|b| match self.width {
            Width::U16 => u16::from_le_bytes([b[0], b[1]]) as usize,
            Width::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
        });
        if let Some((at, id)) = ids.enumerate().find(|&(_, id)| id >= vocab_size) {
            bail!(
                "corrupt shard {}: token {at} (byte offset {}) is id {id}, outside the vocabulary of {vocab_size}",
                self.path.display(),
                HEADER_BYTES + at * w
            );
        }
        Ok(())
    }

    /// Appends tokens `start..start + n` to `out`.
    pub fn read_into(&self, start: usize, n: usize, out: &mut Vec<i64>) {
        assert!(start + n <= self.len, "{}: tokens {start}..{} of {}", self.path.display(), start + n, self.len);
        let w = self.width.bytes();
        let bytes = &self.map[HEADER_BYTES + start * w..HEADER_BYTES + (start + n) * w];
        match self.width {
            Width::U16 => out.extend(bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as i64)),
            Width::U32 => out.extend(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, width: Width, ids: &[u32]) {
        let mut w = ShardWriter::create(path, width).unwrap();
        w.write(ids).unwrap();
        assert_eq!(w.finish().unwrap(), ids.len() as u64);
    }

    fn read_all(path: &Path) -> Vec<i64> {
        let shard = TokenShard::open(path).unwrap();
        let mut out = Vec::new();
        shard.read_into(0, shard.len(), &mut out);
        out
    }

    #[test]
    fn round_trips_both_widths_with_llm_c_headers() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("a.bin");
        write(&small, Width::U16, &[0, 1, 65535, 7]);
        let bytes = std::fs::read(&small).unwrap();
        assert_eq!(bytes.len(), 1024 + 8);
        assert_eq!(&bytes[..12], [20240520i32, 1, 4].map(i32::to_le_bytes).concat());
        assert_eq!(read_all(&small), [0, 1, 65535, 7]);

        let wide = dir.path().join("b.bin");
        write(&wide, Width::U32, &[70000, 3]);
        assert_eq!(&std::fs::read(&wide).unwrap()[..12], [20240801i32, 7, 2].map(i32::to_le_bytes).concat());
        assert_eq!(read_all(&wide), [70000, 3]);
        assert_eq!(Width::for_vocab(65536), Width::U16);
        assert_eq!(Width::for_vocab(65537), Width::U32);
    }

    #[test]
    fn corrupt_shards_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train_000000.bin");
        write(&path, Width::U16, &[1, 2, 3]);
        let good = std::fs::read(&path).unwrap();
        let cases: [(&str, Vec<u8>); 4] = [
            ("shorter than the 1024-byte header", good[..100].to_vec()),
            ("magic 1 version 1", [&1i32.to_le_bytes()[..], &good[4..]].concat()),
            ("the header says 3 tokens (1030 bytes) but the file has 1028 bytes", good[..1028].to_vec()),
            ("but the file has 1032 bytes", [&good[..], &[0, 0]].concat()),
        ];
        for (message, bytes) in cases {
            std::fs::write(&path, bytes).unwrap();
            let err = format!("{:#}", TokenShard::open(&path).unwrap_err());
            assert!(err.contains(&format!("corrupt shard {}", path.display())), "{err}");
            assert!(err.contains(message), "{err}");
        }
        let err = format!("{:#}", TokenShard::open(&dir.path().join("missing.bin")).unwrap_err());
        assert!(err.contains("missing.bin"), "{err}");
    }

    #[test]
    fn ids_outside_the_vocabulary_are_found_with_their_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train_000000.bin");
        write(&path, Width::U16, &[1, 511, 512, 3]);
        let shard = TokenShard::open(&path).unwrap();
        shard.check_ids(513).unwrap();
        let err = format!("{:#}", shard.check_ids(512).unwrap_err());
        assert!(err.contains("train_000000.bin: token 2 (byte offset 1028) is id 512, outside the vocabulary of 512"), "{err}");
    }
}
