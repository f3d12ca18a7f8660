//! Config errors that point at the file, line and key, and say how to fix it.

use camino::Utf8PathBuf;
use std::fmt;
use std::ops::Range;

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The target file, or `None` for the built-in target and command-line flags.
    pub file: Option<Utf8PathBuf>,
    /// 1-based line and column, when known.
    pub line: Option<(usize, usize)>,
    /// Dotted key, e.g. `schedule.workers`.
    pub key: String,
    pub message: String,
    pub fix: String,
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some((l, c))) => write!(f, "{file}:{l}:{c}: ")?,
            (Some(file), None) => write!(f, "{file}: ")?,
            (None, _) => write!(f, "config: ")?,
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)?;
        } else {
            write!(f, "key `{}`: {}", self.key, self.message)?;
        }
        if !self.fix.is_empty() {
            write!(f, "\n  fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// Source text of one target file, to turn byte spans into lines and keys.
pub struct SourceText<'a> {
    pub file: Option<&'a camino::Utf8Path>,
    pub text: &'a str,
}

impl SourceText<'_> {
    pub fn error(&self, span: Option<Range<usize>>, key: &str, message: impl Into<String>, fix: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.map(|f| f.to_owned()),
            line: span.map(|s| line_col(self.text, s.start)),
            key: key.to_string(),
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// Turns a TOML parse or type error into a located `ConfigError`, recovering the dotted
    /// key from the table header above the span and the key on the span's line.
    pub fn from_toml(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim().to_string();
        let span = e.span();
        let key = span.clone().map(|s| key_at(self.text, s.start, &message)).unwrap_or_default();
        let fix = fix_for_toml_message(&message);
        self.error(span, &key, message, fix)
    }
}

fn fix_for_toml_message(message: &str) -> String {
    if message.starts_with("unknown field") {
        "remove the key or correct its spelling; docs/config.md lists every key".into()
    } else if message.starts_with("invalid type") {
        "give the value the type shown in docs/config.md".into()
    } else if message.contains("unknown variant") {
        "use one of the values listed above".into()
    } else {
        "correct the TOML syntax at that position".into()
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The dotted key that a byte offset belongs to: the last `[table]` header above it, plus
/// the key on its line (or the field named by an "unknown field" message).
pub fn key_at(text: &str, offset: usize, message: &str) -> String {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    let mut table = String::new();
    let mut line_start = 0;
    for (start, line) in line_starts(text) {
        if start > offset {
            break;
        }
        line_start = start;
        let t = line.trim();
        if t.starts_with('[') {
            table = t.trim_start_matches('[').split(']').next().unwrap_or("").trim().to_string();
        }
    }
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = if let Some(field) = backticked_after(message, "unknown field") {
        field
    } else if line.trim().starts_with('[') {
        String::new()
    } else {
        line.split('=').next().unwrap_or("").trim().trim_matches('"').to_string()
    };
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

fn line_starts(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut start = 0;
    text.split_inclusive('\n').map(move |l| {
        let s = start;
        start += l.len();
        (s, l)
    })
}

fn backticked_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?;
    let start = rest.find('`')? + 1;
    let end = rest[start..].find('`')? + start;
    Some(rest[start..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a = 1\nbb = 2\n", 0), (1, 1));
        assert_eq!(line_col("a = 1\nbb = 2\n", 9), (2, 4));
    }

    #[test]
    fn key_at_uses_table_header_and_line_key() {
        let text = "[schedule]\nworkers = 0\n[reach]\nhost = 1\n";
        assert_eq!(key_at(text, 21, ""), "schedule.workers");
        assert_eq!(key_at(text, text.len() - 2, ""), "reach.host");
        assert_eq!(key_at(text, 12, "unknown field `wrokers`, expected"), "schedule.wrokers");
    }
}
