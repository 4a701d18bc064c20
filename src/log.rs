//! A stage's log: cut to its cap when the stage ends, so a stage that
//! prints without end leaves no more than that behind, and read from its
//! end, so a huge log costs the engine no more than its last lines.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// What a line of a failure message or of `status` shows at most, in characters.
pub const WIDTH: usize = 400;

/// How far back from the end [`tail`] reads.
const TAIL_BYTES: u64 = 256 << 10;

/// The last `n` lines of a log, decoded lossily (a stage may print any
/// bytes) and each cut to [`WIDTH`] characters.
pub fn tail(log: &Path, n: usize) -> Vec<String> {
    let Ok(mut file) = File::open(log) else { return Vec::new() };
    let len = file.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(TAIL_BYTES);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.take(TAIL_BYTES).read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    // A read that starts mid-file starts mid-line: that piece is no line.
    if start > 0 && lines.len() > 1 {
        lines.remove(0);
    }
    lines[lines.len().saturating_sub(n)..].iter().map(|l| cut(l)).collect()
}

/// The last line of the log that looks like an error, else its last line.
pub fn last_error_line(log: &Path) -> Option<String> {
    let lines = tail(log, 200);
    lines.iter().rev().find(|l| l.starts_with("error")).or(lines.last()).map(|l| l.trim().to_string())
}

fn cut(line: &str) -> String {
    match line.char_indices().nth(WIDTH) {
        Some((at, _)) => format!("{}… ({} more bytes)", &line[..at], line.len() - at),
        None => line.to_string(),
    }
}

/// Cuts a stage's log to at most `limit` bytes once the stage has ended:
/// the older part is dropped, down to half the limit, after a line saying
/// how much went. It copies in 1 MiB chunks, so memory stays bounded
/// whatever the stage printed.
pub fn cap_file(path: &Path, limit: u64) -> std::io::Result<()> {
    let limit = limit.max(4096);
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    if len <= limit {
        return Ok(());
    }
    let keep = limit / 2;
    let marker = format!(
        "[llmflow: {} of older output dropped; a stage's log keeps its last {} (`log_limit_mb`)]\n",
        human(len - keep),
        human(limit)
    );
    let (mut from, mut to) = (len - keep, marker.len() as u64);
    file.write_all(marker.as_bytes())?;
    let mut chunk = vec![0u8; 1 << 20];
    while from < len {
        let n = chunk.len().min((len - from) as usize);
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk[..n])?;
        file.seek(SeekFrom::Start(to))?;
        file.write_all(&chunk[..n])?;
        (from, to) = (from + n as u64, to + n as u64);
    }
    file.set_len(to)
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_reads_past_bad_bytes_and_cuts_long_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let long = "x".repeat(3 * TAIL_BYTES as usize);
        std::fs::write(&log, [long.as_bytes(), b"\nline before\nbin\xff\xfejunk\nerror: the real reason\n"].concat()).unwrap();
        let lines = tail(&log, 3);
        assert_eq!(lines, ["line before", "bin\u{fffd}\u{fffd}junk", "error: the real reason"]);
        assert_eq!(last_error_line(&log).unwrap(), "error: the real reason");
        std::fs::write(&log, format!("{long}\nend")).unwrap();
        let lines = tail(&log, 2);
        assert_eq!(lines.len(), 1, "the piece of the long line before the read is no line");
        assert_eq!(lines[0], "end");
        std::fs::write(&log, "y".repeat(WIDTH + 10)).unwrap();
        assert_eq!(tail(&log, 1)[0], format!("{}… (10 more bytes)", "y".repeat(WIDTH)));
    }

    #[test]
    fn a_capped_log_keeps_the_newest_output_and_says_what_went() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let input: Vec<u8> = (0..200_000u32).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
        std::fs::write(&path, &input).unwrap();
        cap_file(&path, 100_000).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() <= 100_000, "{}", text.len());
        assert!(text.starts_with("[llmflow: "), "{}", &text[..100]);
        assert!(text.ends_with("line 199999\n"));
        let kept = text.split_once('\n').unwrap().1;
        assert!(input.ends_with(kept.as_bytes()), "the kept part is the input's end, in order");
        assert_eq!(kept.len(), 50_000);
    }
}
