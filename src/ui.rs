//! What `llmflow run` prints: cargo-style status lines on stderr and a
//! progress bar per running stage when stderr is a terminal. `NO_COLOR`
//! turns colour off.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use console::style;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
pub struct Ui {
    bars: MultiProgress,
    tty: bool,
}

impl Default for Ui {
    fn default() -> Self {
        Self::new()
    }
}

impl Ui {
    pub fn new() -> Ui {
        if std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()) {
            console::set_colors_enabled(false);
            console::set_colors_enabled_stderr(false);
        }
        let tty = console::Term::stderr().is_term();
        let target = if tty { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        Ui { bars: MultiProgress::with_draw_target(target), tty }
    }

    fn println(&self, line: String) {
        if self.tty {
            let _ = self.bars.println(line);
        } else {
            // Not `eprintln!`: a reader gone (`run 2>&1 | head`) must not panic a build thread.
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }

    /// `    Building stage (kind)`: a right-aligned verb, as cargo prints.
    pub fn status(&self, verb: &str, message: &str) {
        self.println(format!("{:>12} {message}", style(verb).green().bold()));
    }

    pub fn warning(&self, message: &str) {
        self.println(format!("{} {message}", style("warning:").yellow().bold()));
    }

    pub fn error(&self, message: &str) {
        self.println(format!("{} {message}", style("error:").red().bold()));
    }

    /// A failed stage: the last lines of its log and where the log is.
    pub fn failure(&self, stage: &str, why: &str, log: &Path) {
        let mut text = format!("{} stage `{stage}` failed ({why}); last lines of its log:", style("error:").red().bold());
        for line in crate::log::tail(log, 12) {
            text.push_str(&format!("\n  | {line}"));
        }
        text.push_str(&format!("\n  full log: {}", log.display()));
        self.println(text);
    }

    /// A spinner for a running stage; becomes a bar once the stage reports
    /// progress.
    pub fn stage_bar(&self, stage: &str, kind: &str) -> ProgressBar {
        self.status("Building", &format!("{stage} ({kind})"));
        if !self.tty {
            return ProgressBar::hidden();
        }
        let bar = self.bars.add(ProgressBar::new_spinner());
        bar.set_style(ProgressStyle::with_template("{spinner:.green} {prefix:>12.bold} [{elapsed}] {msg}").expect("valid template"));
        bar.set_prefix(stage.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }

    /// Applies a stage's progress report (`done total unit`) to its bar.
    pub fn progress(&self, bar: &ProgressBar, report: &str) {
        let mut parts = report.split_whitespace();
        let (Some(done), Some(total)) = (parts.next().and_then(|d| d.parse().ok()), parts.next().and_then(|t| t.parse().ok())) else {
            return;
        };
        let unit = parts.next().unwrap_or("");
        if bar.length() != Some(total) {
            bar.set_length(total);
            // indicatif prints a bare rate with four decimals; bytes get its
            // human units, other counts their ETA alone.
            let counts = if unit == "bytes" {
                "{binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta} left)".to_string()
            } else {
                format!("{{human_pos}}/{{human_len}} {unit} ({{eta}} left)")
            };
            let template = format!("{{spinner:.green}} {{prefix:>12.bold}} [{{elapsed}}] {{wide_bar:.cyan/blue}} {counts}");
            bar.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
        }
        bar.set_position(done);
    }
}
