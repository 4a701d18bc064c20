//! `metrics.jsonl`: one JSON object per line, each with a `step`; beside
//! it, the same numbers as a TensorBoard event file ([`events`]), so the
//! curves can be watched while the stage runs.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::formats::events::{self, EventWriter};

#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    events: EventWriter,
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
        fs::write(path, &kept).with_context(|| format!("cannot write {}", path.display()))?;
        let file = OpenOptions::new().append(true).open(path)?;
        // The event file is written afresh, the kept rows first.
        let mut events = EventWriter::create(&path.with_file_name(events::FILE))?;
        for row in kept.lines().filter_map(|line| serde_json::from_str::<Value>(line).ok()) {
            scalars(&mut events, &row)?;
        }
        Ok(MetricsLog { path: path.to_path_buf(), file, events })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a row, and its numbers to the event file; unbuffered, so a
    /// killed run loses nothing it logged.
    pub fn write(&mut self, row: &Value) -> Result<()> {
        self.file.write_all(format!("{row}\n").as_bytes()).with_context(|| format!("cannot write {}", self.path.display()))?;
        scalars(&mut self.events, row)
    }

    /// Copies `metrics.jsonl` and the event file into `out`.
    pub fn copy_to(&self, out: &Path) -> Result<()> {
        for name in [self.path.file_name().expect("a file"), events::FILE.as_ref()] {
            fs::copy(self.path.with_file_name(name), out.join(name))
                .with_context(|| format!("cannot copy {name:?} into {}", out.display()))?;
        }
        Ok(())
    }

    /// Every row so far.
    pub fn rows(&self) -> Result<Vec<Value>> {
        let text = fs::read_to_string(&self.path)?;
        text.lines().map(|line| Ok(serde_json::from_str(line)?)).collect()
    }
}

/// A row's numbers, but its step, as the scalars of its step.
fn scalars(events: &mut EventWriter, row: &Value) -> Result<()> {
    let Some(map) = row.as_object() else { return Ok(()) };
    let step = row["step"].as_i64().unwrap_or(0);
    let values: Vec<(String, f64)> = map.iter().filter(|(k, _)| *k != "step").filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect();
    if values.is_empty() {
        return Ok(());
    }
    events.scalars(step, &values)
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

    /// TensorBoard's own reader finds every number of metrics.jsonl, at its
    /// step, in the event file, after a resume too.
    #[test]
    fn tensorboard_reads_the_metrics_back() {
        let Some(python) = crate::testing::python_with("tensorboard") else { return };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, 0).unwrap();
        for step in 1..=6 {
            log.write(&json!({"step": step, "loss": 5.0 / step as f64, "lr": 0.0, "tokens": step * 512})).unwrap();
        }
        log.write(&json!({"step": 6, "val_loss": 1.25, "note": "text is left out"})).unwrap();
        // Resumed from step 4: steps 5 and 6 are logged again, differently.
        let mut log = MetricsLog::open(&path, 4).unwrap();
        for step in 5..=6 {
            log.write(&json!({"step": step, "loss": 0.5, "lr": 0.0, "tokens": step * 512})).unwrap();
        }
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        log.copy_to(&out).unwrap();
        crate::testing::run_python(&python, "check_events.py", &[&out]);
    }
}
