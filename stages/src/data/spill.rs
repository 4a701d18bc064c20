//! External sorting of fixed-size records: what does not fit in a memory
//! budget is spilled to disk as sorted runs and merged back in one pass.
//!
//! Records are byte arrays compared as bytes, so a record encoded big-endian
//! (`band`, `key`, `doc`) sorts as the tuple. The result is the same whatever
//! the budget: only how many runs it takes changes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rayon::slice::ParallelSliceMut;

/// Buffer of each run being read or written.
const IO_BUFFER: usize = 256 << 10;

/// Collects records; sorts them within `budget` bytes of memory.
pub struct Sorter<const N: usize> {
    dir: PathBuf,
    name: String,
    buffer: Vec<[u8; N]>,
    limit: usize,
    runs: Vec<PathBuf>,
}

impl<const N: usize> Sorter<N> {
    /// Spills under `dir` as `NAME.run-K`; holds at most `budget` bytes of records.
    pub fn new(dir: &Path, name: &str, budget: usize) -> Self {
        Sorter { dir: dir.to_path_buf(), name: name.to_string(), buffer: Vec::new(), limit: (budget / N).max(1024), runs: Vec::new() }
    }

    pub fn push(&mut self, record: [u8; N]) -> Result<()> {
        self.buffer.push(record);
        if self.buffer.len() >= self.limit {
            self.spill()?;
        }
        Ok(())
    }

    /// Sorted runs written so far.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    fn spill(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let path = self.dir.join(format!("{}.run-{}", self.name, self.runs.len()));
        self.buffer.par_sort_unstable();
        write_records(&path, self.buffer.iter().map(|r| Ok(*r)))?;
        self.buffer = Vec::new();
        self.runs.push(path);
        Ok(())
    }

    /// Every record pushed, in order: from memory when nothing was spilled,
    /// otherwise merged from the runs (which are removed when the iterator
    /// is dropped).
    pub fn sorted(mut self) -> Result<Box<dyn Iterator<Item = Result<[u8; N]>> + Send>> {
        if self.runs.is_empty() {
            self.buffer.par_sort_unstable();
            return Ok(Box::new(std::mem::take(&mut self.buffer).into_iter().map(Ok)));
        }
        if !self.buffer.is_empty() {
            self.spill()?;
        }
        let runs = self.runs.iter().map(|p| read_records::<N>(p)).collect::<Result<Vec<_>>>()?;
        let cleanup = Cleanup(std::mem::take(&mut self.runs));
        Ok(Box::new(merge(runs).inspect(move |_| {
            let _ = &cleanup;
        })))
    }
}

/// Removes spilled runs once their merge is dropped.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for run in &self.0 {
            let _ = std::fs::remove_file(run);
        }
    }
}

/// Writes records to a file.
pub fn write_records<const N: usize>(path: &Path, records: impl Iterator<Item = Result<[u8; N]>>) -> Result<u64> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::with_capacity(IO_BUFFER, file);
    let mut count = 0;
    for record in records {
        out.write_all(&record?).with_context(|| format!("cannot write {}", path.display()))?;
        count += 1;
    }
    out.flush().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(count)
}

/// The records of a file, in the order written.
pub fn read_records<const N: usize>(path: &Path) -> Result<impl Iterator<Item = Result<[u8; N]>> + Send> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut input = BufReader::with_capacity(IO_BUFFER, file);
    let path = path.to_path_buf();
    Ok(std::iter::from_fn(move || {
        let mut record = [0u8; N];
        match input.read_exact(&mut record) {
            Ok(()) => Some(Ok(record)),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => None,
            Err(e) => Some(Err(anyhow::Error::new(e).context(format!("cannot read {}", path.display())))),
        }
    }))
}

/// Merges sorted streams into one sorted stream; on equal records the
/// earlier stream's comes first.
pub fn merge<const N: usize, I: Iterator<Item = Result<[u8; N]>> + Send>(
    mut streams: Vec<I>,
) -> impl Iterator<Item = Result<[u8; N]>> + Send {
    let mut heap = BinaryHeap::new();
    let mut failed = None;
    for (i, stream) in streams.iter_mut().enumerate() {
        match stream.next() {
            Some(Ok(r)) => heap.push(Reverse((r, i))),
            Some(Err(e)) => failed = Some(e),
            None => {}
        }
    }
    std::iter::from_fn(move || {
        if let Some(e) = failed.take() {
            return Some(Err(e));
        }
        let Reverse((record, i)) = heap.pop()?;
        match streams[i].next() {
            Some(Ok(r)) => heap.push(Reverse((r, i))),
            Some(Err(e)) => failed = Some(e),
            None => {}
        }
        Some(Ok(record))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::rng::Rng;

    #[test]
    fn spilled_sort_equals_in_memory_sort() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(3);
        let records: Vec<[u8; 12]> = (0..50_000).map(|_| (rng.next_u64() as u128 * 3).to_be_bytes()[4..].try_into().unwrap()).collect();
        let mut expected = records.clone();
        expected.sort();
        // 12 bytes × 1,024 records per run (the smallest): about 49 runs.
        let mut small = Sorter::<12>::new(dir.path(), "small", 1);
        let mut large = Sorter::<12>::new(dir.path(), "large", 1 << 30);
        for r in &records {
            small.push(*r).unwrap();
            large.push(*r).unwrap();
        }
        assert!(small.runs() > 40);
        assert_eq!(large.runs(), 0);
        let small: Vec<_> = small.sorted().unwrap().map(Result::unwrap).collect();
        let large: Vec<_> = large.sorted().unwrap().map(Result::unwrap).collect();
        assert_eq!(small, expected);
        assert_eq!(large, expected);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "runs are removed after the merge");
    }
}
