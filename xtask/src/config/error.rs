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
            // Without a span, the line that assigns the key, if the text holds it.
            line: span.map(|s| s.start).or_else(|| offset_of_key(self.text, key)).map(|o| line_col(self.text, o)),
            key: key.to_string(),
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// Turns a TOML parse or type error into a located `ConfigError`, recovering the dotted
    /// key from the table header above the span and the key on the span's line.
    pub fn from_toml(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span();
        let message = match e.message().trim() {
            // toml gives no message for some errors at the very end of the text.
            "" if span.as_ref().is_some_and(|s| s.start >= self.text.trim_end().len()) => "unexpected end of the file: a value or a closing bracket is missing".to_string(),
            "" => "invalid TOML syntax".to_string(),
            m => m.to_string(),
        };
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

/// The dotted key that a byte offset belongs to: the `[table]` header above it, plus the key
/// assigned on its line, or on the line where the multi-line value around it began (or the
/// field named by an "unknown field" message). Only real TOML keys count: a line of garbage
/// yields the table alone, never the garbage.
pub fn key_at(text: &str, offset: usize, message: &str) -> String {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    let mut table = String::new();
    // The last assignment of the current table, and where its value starts.
    let mut current: Option<(String, usize)> = None;
    // The key on the line that holds the offset (assigned there, or continued there), and
    // that line's key segments with their byte ranges when it is a header or an assignment.
    let mut key = String::new();
    let mut segs: Vec<Seg> = vec![];
    let mut header = false;
    for (start, line) in line_starts(text) {
        if start > offset {
            break;
        }
        key.clear();
        segs.clear();
        header = false;
        if let Some((k, value_at)) = &current {
            if value_is_open(&text[*value_at..start]) {
                key = k.clone();
                continue;
            }
        }
        if let Some(h) = header_segs(line) {
            table = joined(&h);
            segs = shifted(h, start);
            header = true;
            current = None;
        } else if let Some((k, after_eq)) = assigned_segs(line) {
            key = joined(&k);
            segs = shifted(k, start);
            current = Some((key.clone(), start + after_eq));
        } else {
            current = None;
        }
    }
    // An error that points into a dotted key is about the key up to that segment
    // (`[a.zz]`, `schedule.wrokers = 1`, `data.b = 1` where `data` must be a list).
    let pointed = segs.iter().position(|(_, r)| r.contains(&offset));
    let field = backticked_after(message, "unknown field");
    if pointed.is_some() || field.is_some() {
        // For an unknown field: the segment of that name it points at, else the first one
        // of that name on the line, else the field itself.
        let at = match &field {
            Some(f) => pointed.filter(|&j| segs[j].0 == *f).or_else(|| segs.iter().position(|(s, _)| s == f)),
            None => pointed,
        };
        match (at, header) {
            (Some(j), true) => return joined(&segs[..=j]),
            (Some(j), false) => key = joined(&segs[..=j]),
            // An unknown field inside the value (an inline table) belongs to the key.
            (None, false) if pointed.is_none() && !key.is_empty() => key = format!("{key}.{}", field.unwrap_or_default()),
            (None, _) => key = field.unwrap_or_default(),
        }
        if header {
            table = table.rsplit_once('.').map(|(t, _)| t.to_string()).unwrap_or_default();
        }
    }
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

/// One segment of a dotted key and its byte range.
type Seg = (String, Range<usize>);

fn joined(segs: &[Seg]) -> String {
    segs.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(".")
}

fn shifted(segs: Vec<Seg>, by: usize) -> Vec<Seg> {
    segs.into_iter().map(|(s, r)| (s, r.start + by..r.end + by)).collect()
}

/// The byte offset of the line that assigns the dotted key `want` (as `key_at` reads keys),
/// for errors about a value that carries no span of its own.
pub fn offset_of_key(text: &str, want: &str) -> Option<usize> {
    if want.is_empty() {
        return None;
    }
    let mut table = String::new();
    let mut current: Option<usize> = None;
    for (start, line) in line_starts(text) {
        if current.is_some_and(|v| value_is_open(&text[v..start])) {
            continue;
        }
        current = None;
        if let Some(h) = header_key(line) {
            table = h;
        } else if let Some((k, after_eq)) = assigned_key(line) {
            let full = if table.is_empty() { k } else { format!("{table}.{k}") };
            if full == want {
                return Some(start + line.len() - line.trim_start().len());
            }
            current = Some(start + after_eq);
        }
    }
    None
}

fn is_bare_key_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

fn skip_blank(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
        i += 1;
    }
    i
}

/// A dotted TOML key starting at `i` (`a.b`, `"a b".c`, `'x'`): its segments with their
/// byte ranges (quotes included), and the index after it and the blanks that follow.
fn parse_key(line: &str, mut i: usize) -> Option<(Vec<Seg>, usize)> {
    let b = line.as_bytes();
    let mut segs: Vec<Seg> = vec![];
    loop {
        i = skip_blank(b, i);
        let seg_start = i;
        match b.get(i) {
            Some(b'"') => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                if i >= b.len() {
                    return None;
                }
                segs.push((line[seg_start + 1..i].to_string(), seg_start..i + 1));
                i += 1;
            }
            Some(b'\'') => {
                let end = line[i + 1..].find('\'')? + i + 1;
                segs.push((line[i + 1..end].to_string(), seg_start..end + 1));
                i = end + 1;
            }
            Some(c) if is_bare_key_char(*c) => {
                while i < b.len() && is_bare_key_char(b[i]) {
                    i += 1;
                }
                segs.push((line[seg_start..i].to_string(), seg_start..i));
            }
            _ => return None,
        }
        i = skip_blank(b, i);
        if b.get(i) == Some(&b'.') {
            i += 1;
            continue;
        }
        return Some((segs, i));
    }
}

/// `key = ...` on this line: the key's segments and the index just after `=`.
fn assigned_segs(line: &str) -> Option<(Vec<Seg>, usize)> {
    let (k, i) = parse_key(line, bom_len(line))?;
    (line.as_bytes().get(i) == Some(&b'=')).then_some((k, i + 1))
}

fn assigned_key(line: &str) -> Option<(String, usize)> {
    assigned_segs(line).map(|(k, i)| (joined(&k), i))
}

/// `[table]` or `[[array.of.tables]]` on this line: the table name's segments.
fn header_segs(line: &str) -> Option<Vec<Seg>> {
    let t = line[bom_len(line)..].trim_start();
    let at = line.len() - t.len();
    let open = if t.starts_with("[[") { 2 } else if t.starts_with('[') { 1 } else { return None };
    let (k, i) = parse_key(line, at + open)?;
    (line.as_bytes().get(i) == Some(&b']')).then_some(k)
}

/// A byte order mark that starts the file is not part of the first key.
fn bom_len(line: &str) -> usize {
    if line.starts_with('\u{feff}') {
        '\u{feff}'.len_utf8()
    } else {
        0
    }
}

fn header_key(line: &str) -> Option<String> {
    header_segs(line).map(|k| joined(&k))
}

/// Whether a value that starts with `v` is still open at its end: inside brackets, braces or
/// a multi-line string.
fn value_is_open(v: &str) -> bool {
    let b = v.as_bytes();
    let (mut i, mut depth) = (0usize, 0usize);
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"\"\"\"") || rest.starts_with(b"'''") {
            let (quote, escapes) = (&rest[..3], rest[0] == b'"');
            i += 3;
            loop {
                if i >= b.len() {
                    return true;
                }
                if escapes && b[i] == b'\\' {
                    i += 2;
                } else if b[i..].starts_with(quote) {
                    i += 3;
                    break;
                } else {
                    i += 1;
                }
            }
            continue;
        }
        match b[i] {
            b'"' | b'\'' => {
                let q = b[i];
                i += 1;
                while i < b.len() && b[i] != q && b[i] != b'\n' {
                    i += if q == b'"' && b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            _ => i += 1,
        }
    }
    depth > 0
}

fn line_starts(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut start = 0;
    text.split_inclusive('\n').map(move |l| {
        let s = start;
        start += l.len();
        (s, l)
    })
}

/// The name in serde's "unknown field `NAME`, expected ...". NAME may itself hold backticks
/// (a quoted TOML key can), so it ends at the backtick before ", expected", else the last one.
/// An empty name is shown as `""`, as it is written in TOML.
fn backticked_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?;
    let start = rest.find('`')? + 1;
    let tail = &rest[start..];
    let end = tail.find("`, expected").or_else(|| tail.rfind('`'))?;
    let name = &tail[..end];
    Some(if name.is_empty() { "\"\"".to_string() } else { name.to_string() })
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

    #[test]
    fn key_at_knows_multi_line_values_dotted_keys_and_garbage() {
        let text = "[schedule]\nports = [\n  5000,\n  \"x=y\",\n]\ngarbage here\n[reach]\n\"host\" . 'x' = 1\n";
        let at = |needle: &str| text.find(needle).unwrap();
        assert_eq!(key_at(text, at("\"x=y"), "invalid type"), "schedule.ports");
        assert_eq!(key_at(text, at("garbage"), "expected `.`, `=`"), "schedule");
        assert_eq!(key_at(text, at("' = 1") + 4, ""), "reach.host.x");
        assert_eq!(key_at(text, at("\"host"), "invalid type"), "reach.host");
        assert_eq!(key_at("schedule.wrokers = 1\n", 0, "unknown field `wrokers`"), "schedule.wrokers");
        assert_eq!(key_at("[zz]\n", 1, "unknown field `zz`"), "zz");
        assert_eq!(backticked_after("unknown field ``reach`, expected one of `a`, `b`", "unknown field").as_deref(), Some("`reach"));
        assert_eq!(backticked_after("unknown field ``, expected `a`", "unknown field").as_deref(), Some("\"\""));
        assert_eq!(key_at("[a.a]\n", 1, "unknown field `a`"), "a");
        assert_eq!(key_at("[reach.reach]\n", 7, "unknown field `reach`"), "reach.reach");
        assert_eq!(key_at("[reach]\nschedule.workers = 1\n", 8, "unknown field `schedule`"), "reach.schedule");
        assert_eq!(key_at("[payload]\ndata.b.c = 1\n", 10, "invalid type: map, expected a sequence"), "payload.data");
        assert_eq!(key_at("[image]\nbootstrap = { agnt = 1 }\n", 22, "unknown field `agnt`"), "image.bootstrap.agnt");
        assert_eq!(offset_of_key(text, "schedule.ports"), Some(11));
        assert_eq!(offset_of_key(text, "reach.port"), None);
        assert_eq!(key_at("\u{feff}schedule.workers = \"\"\n", 21, "invalid type"), "schedule.workers");
    }
}
