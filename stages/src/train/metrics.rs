//! `metrics.jsonl`: one JSON object per line, each with a `step`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the log at `path` for appending, keeping only the rows of steps
    /// up to `through`: a run resumed from checkpoint `through` writes the
    /// later ones again.
    pub fn open(path: &Path, through: u64) -> Result<MetricsLog> {
        let kept: String = match fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|line| serde_json::from_str::<Value>(line).ok().and_then(|row| row["step"].as_u64()).is_some_and(|s| s <= through))
                .map(|line| format!("{line}\n"))
                .collect(),
            Err(_) => String::new(),
        };
        fs::write(path, kept).with_context(|| format!("cannot write {}", path.display()))?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a row; unbuffered, so a killed run loses nothing it logged.
    pub fn write(&mut self, row: &Value) -> Result<()> {
        self.file.write_all(format!("{row}\n").as_bytes()).with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Every row so far.
    pub fn rows(&self) -> Result<Vec<Value>> {
        let text = fs::read_to_string(&self.path)?;
        text.lines().map(|line| Ok(serde_json::from_str(line)?)).collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reopening_drops_rows_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, 0).unwrap();
        for step in 1..=5 {
            log.write(&json!({"step": step, "loss": 1.0})).unwrap();
        }
        let log = MetricsLog::open(&path, 3).unwrap();
        let steps: Vec<u64> = log.rows().unwrap().iter().map(|r| r["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [1, 2, 3]);
    }
}
