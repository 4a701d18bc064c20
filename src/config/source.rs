//! The pipeline text, for pointing an error at `file:line:column`.

use std::fmt;
use std::path::Path;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::error::ConfigError;

/// The pipeline text, for turning byte offsets into `file:line:column`.
pub(super) struct Source<'a> {
    pub file: &'a Path,
    pub text: &'a str,
    /// The byte offset where each line starts.
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Source<'a> {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Source { file, text, line_starts }
    }
}

impl Source<'_> {
    pub fn location(&self, offset: Option<usize>) -> String {
        match offset {
            Some(offset) => {
                let offset = offset.min(self.text.len());
                // Lines before `offset`, by binary search: a big pipeline asks for thousands of locations.
                let line = self.line_starts.partition_point(|&start| start <= offset);
                let column = self.text[self.line_starts[line - 1]..offset].chars().count() + 1;
                format!("{}:{line}:{column}", self.file.display())
            }
            None => self.file.display().to_string(),
        }
    }

    pub fn error(&self, offset: Option<usize>, message: impl fmt::Display) -> ConfigError {
        ConfigError(format!("{}: {}", self.location(offset), message.to_string().trim_end()))
    }

    /// The offset of the deepest key along `path` that exists in the file.
    pub fn key_span(&self, table: &DeTable, path: &[&str]) -> Option<usize> {
        let (mut table, mut found, mut i) = (table, None, 0);
        while i < path.len() {
            let Some((key, value)) = table.get_key_value(path[i]) else {
                return found;
            };
            let (key, mut value): (&Spanned<_>, &Spanned<DeValue>) = (key, value);
            found = Some(key.span().start);
            // An array's items are named by index: `tasks.3.timeout_s`.
            while let DeValue::Array(items) = value.get_ref() {
                let Some(item) = path.get(i + 1).and_then(|s| s.parse::<usize>().ok()).and_then(|n| items.get(n)) else {
                    return found;
                };
                (value, found, i) = (item, Some(item.span().start), i + 1);
            }
            match value.get_ref() {
                DeValue::Table(t) if i + 1 < path.len() => table = t,
                _ => return found,
            }
            i += 1;
        }
        found
    }
}

/// The offset of the key at `path` inside stage `name`'s table.
pub(super) fn at<'a>(src: &Source, spans: &DeTable, name: &'a str, path: &[&'a str]) -> Option<usize> {
    let mut full = vec!["stages", name];
    full.extend_from_slice(path);
    src.key_span(spans, &full)
}
