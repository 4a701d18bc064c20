//! TensorBoard event files: the numeric metrics a stage logs as scalar
//! summaries, which `tensorboard --logdir artifacts` and `wandb sync
//! --sync-tensorboard` read, during the run and after.
//!
//! A file is TFRecord: each record is its length (u64, little-endian), the
//! length's masked CRC32C, the bytes of one `Event` protobuf, and their
//! masked CRC32C. The first event names the format (`brain.Event:2`); each
//! later one holds a step's scalars. The messages are TensorFlow's
//! `event.proto` and `summary.proto`, cut to the fields written here.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

/// The file's name: TensorBoard reads files whose names hold `tfevents`.
pub const FILE: &str = "events.out.tfevents.0.llmflow";

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    /// `oneof what`: the first event's format name…
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    /// …or a step's values.
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    /// `oneof value`: optional so that 0.0 is written, not elided.
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// An event file being written; every event is flushed as it is written.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Creates (or empties) the event file at `path`.
    pub fn create(path: &Path) -> Result<EventWriter> {
        let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut writer = EventWriter { path: path.to_path_buf(), file };
        writer.write(&Event { wall_time: now(), step: 0, file_version: Some("brain.Event:2".into()), summary: None })?;
        Ok(writer)
    }

    /// Writes `values` (tag, value) as the scalars of `step`.
    pub fn scalars(&mut self, step: i64, values: &[(String, f64)]) -> Result<()> {
        let value = values.iter().map(|(tag, v)| Value { tag: tag.clone(), simple_value: Some(*v as f32) }).collect();
        self.write(&Event { wall_time: now(), step, file_version: None, summary: Some(Summary { value }) })
    }

    fn write(&mut self, event: &Event) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc32c(&data).to_le_bytes());
        self.file.write_all(&record).with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Seconds since the Unix epoch.
fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// CRC32C (Castagnoli), masked as TFRecord masks it.
fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 == 1 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |c, &b| TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnolis() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }
}
