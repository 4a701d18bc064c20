//! The store's cache for one kind (`artifacts/.cache/KIND/`,
//! [`crate::StageCtx::cache`]): files finer than a stage (eval's units, the
//! data stages' units), shared by its builds and hard-linked into the
//! artifacts that use them.
//!
//! Every cached file `NAME` has a sidecar `NAME.blake3` beside it: the
//! file's BLAKE3 in lowercase hex and a newline, written atomically once the
//! file is in place. A file without its sidecar, or whose bytes do not match
//! it, counts as absent: an artifact's file is the cache's own inode, so
//! without the check a damaged artifact would be the source of its rebuild.
//! A file enters the cache by rename, as a new inode, never by writing over
//! the old one. Sidecars stay in the cache, never linked into artifacts; the
//! engine's `verify` and `gc` read them too.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// One kind's cache folder.
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn open(dir: &Path) -> Result<Cache> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Cache { dir: dir.to_path_buf() })
    }

    /// A cache file, to read (after [`Cache::verified`]).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn sidecar(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.blake3"))
    }

    /// Whether the cache holds `name` whole: its bytes match its sidecar.
    /// A mismatch is logged; the caller computes the file again and
    /// [`Cache::insert`] replaces it.
    pub fn verified(&self, name: &str) -> bool {
        let path = self.path(name);
        let Ok(recorded) = fs::read_to_string(self.sidecar(name)) else { return false };
        let Ok(actual) = digest(&path) else { return false };
        let same = recorded.strip_suffix('\n') == Some(actual.as_str());
        if !same {
            eprintln!("warning: {} does not match its recorded BLAKE3; computing it again", path.display());
        }
        same
    }

    /// Puts `from`'s bytes into the cache as `name`: hard-linked (or copied)
    /// under a temporary name and renamed into place, then its sidecar.
    pub fn insert(&self, from: &Path, name: &str) -> Result<()> {
        let hash = digest(from)?;
        let path = self.path(name);
        let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        link_or_copy(from, &tmp)?;
        fs::rename(&tmp, &path).with_context(|| format!("cannot cache {}", path.display()))?;
        let sidecar = self.sidecar(name);
        let tmp = self.dir.join(format!(".{name}.blake3.{}.tmp", std::process::id()));
        fs::write(&tmp, format!("{hash}\n")).with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, &sidecar).with_context(|| format!("cannot write {}", sidecar.display()))
    }

    /// Links the cache file `name` into an artifact as `to`.
    pub fn link(&self, name: &str, to: &Path) -> Result<()> {
        link_or_copy(&self.path(name), to)
    }
}

/// A file's BLAKE3, as lowercase hex.
fn digest(path: &Path) -> Result<String> {
    let hash = blake3::Hasher::new().update_mmap_rayon(path).with_context(|| format!("cannot read {}", path.display()))?.finalize();
    Ok(hash.to_hex().to_string())
}

/// A hard link of `from` at `to` (replacing it), or a copy across file systems.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    let _ = fs::remove_file(to);
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_counts_only_with_a_matching_sidecar_and_is_replaced_by_a_new_inode() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let source = dir.path().join("unit.bin");
        fs::write(&source, b"scores").unwrap();
        assert!(!cache.verified("unit.bin"), "never cached");
        cache.insert(&source, "unit.bin").unwrap();
        assert!(cache.verified("unit.bin"));
        let sidecar = fs::read_to_string(cache.sidecar("unit.bin")).unwrap();
        assert_eq!(sidecar, format!("{}\n", blake3::hash(b"scores").to_hex()));

        // An artifact's link, damaged in place, damages the cache's file.
        let artifact = dir.path().join("artifact.bin");
        cache.link("unit.bin", &artifact).unwrap();
        fs::write(&artifact, b"SCORES").unwrap();
        assert!(!cache.verified("unit.bin"));
        let again = dir.path().join("again.bin");
        fs::write(&again, b"scores").unwrap();
        cache.insert(&again, "unit.bin").unwrap();
        assert!(cache.verified("unit.bin"));
        assert_ne!(fs::metadata(cache.path("unit.bin")).unwrap().ino(), fs::metadata(&artifact).unwrap().ino());
        assert_eq!(fs::read(&artifact).unwrap(), b"SCORES", "the damaged artifact is left as it is");

        // A file without its sidecar counts as absent.
        fs::remove_file(cache.sidecar("unit.bin")).unwrap();
        assert!(!cache.verified("unit.bin"));
    }
}
