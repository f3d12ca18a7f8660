//! Keeping keys, passwords and tokens out of logs, `run.json` and `--dry-run` output.

/// Words that mark the value after them as secret (`password=...`, `--token x`).
const MARKERS: &[&str] = &["password", "passwd", "passphrase", "token", "secret", "api_key", "apikey", "access_key", "private_key"];

/// Whether a string looks like it carries a secret value.
pub fn looks_secret(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    lower.contains("-----begin") || MARKERS.iter().any(|m| lower.contains(m)) || has_token_shape(s)
}

/// Tokens of well-known shapes (GitHub, GitLab, AWS, Slack) that carry no marker word.
fn has_token_shape(s: &str) -> bool {
    ["ghp_", "gho_", "ghs_", "github_pat_", "glpat-", "AKIA", "xoxb-", "xoxp-"].iter().any(|p| {
        s.match_indices(p).any(|(i, _)| s[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-').count() >= 16)
    })
}

/// Replaces secret-looking values with `***`: the value after `=` or `:` of a marked
/// `key=value`, or the whole word when it has a token's shape.
pub fn redact(s: &str) -> String {
    if !looks_secret(s) {
        return s.to_string();
    }
    if s.to_ascii_lowercase().contains("-----begin") {
        return "***".into();
    }
    let mut out = String::with_capacity(s.len());
    let mut hide_next = false;
    for (i, word) in s.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        if word.is_empty() {
            continue;
        }
        if hide_next {
            out.push_str("***");
            hide_next = false;
            continue;
        }
        // `--password VALUE` in text, as in an argv: the marked flag hides the next word
        // (also when it is the value of something else: `opts=--password VALUE`).
        hide_next = is_marked_flag(word.rsplit('=').next().unwrap_or(word));
        out.push_str(&redact_word(word));
    }
    out
}

/// `--password`, `-token`: a flag whose value is the next argument or word.
pub fn is_marked_flag(w: &str) -> bool {
    let lower = w.to_ascii_lowercase();
    lower.starts_with('-') && !w.contains(['=', ':']) && MARKERS.iter().any(|m| lower.contains(m))
}

fn redact_word(w: &str) -> String {
    let lower = w.to_ascii_lowercase();
    // The first `=` or `:` after a marker starts the value, wherever the marker sits in the
    // word (`db_password=`, `PGOPTIONS=password=`, `url:token:`).
    if let Some(pos) = marked_value_start(&lower) {
        return format!("{}***", &w[..=pos]);
    }
    if has_token_shape(w) || MARKERS.iter().any(|m| lower.contains(m)) && w.len() > 24 {
        return "***".into();
    }
    w.to_string()
}

/// Byte offset of the `=` or `:` that ends the earliest marked key in `lower` (an
/// ASCII-lowercased copy, so offsets match the original).
fn marked_value_start(lower: &str) -> Option<usize> {
    MARKERS
        .iter()
        .flat_map(|m| lower.match_indices(m).filter_map(move |(i, _)| lower[i + m.len()..].find(['=', ':']).map(|off| i + m.len() + off)))
        .min()
}

/// Redacts one argument of an argv. One argument is one value: a marked `name=value` hides
/// all of its value, spaces included (word-by-word `redact` would show what follows the
/// first space).
pub fn redact_arg(a: &str) -> String {
    let lower = a.to_ascii_lowercase();
    match marked_value_start(&lower).filter(|_| !lower.contains("-----begin")) {
        Some(pos) => format!("{}***", &a[..=pos]),
        None => redact(a),
    }
}

/// Redacts a whole argv: a marked flag (`--password`) hides the argument after it too.
pub fn redact_argv(argv: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut hide_next = false;
    for a in argv {
        if hide_next {
            out.push("***".into());
            hide_next = false;
            continue;
        }
        if is_marked_flag(a) {
            hide_next = true;
            out.push(a.clone());
            continue;
        }
        out.push(redact_arg(a));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_marked_values_and_token_shapes() {
        assert_eq!(redact("password=hunter2"), "password=***");
        assert_eq!(redact("x TOKEN:abc y"), "x TOKEN:*** y");
        assert_eq!(redact("ghp_0123456789abcdefABCDEF"), "***");
        assert_eq!(redact("n=1000"), "n=1000");
        assert_eq!(redact_argv(&["--password".into(), "s3cr3t".into(), "n=1".into()]), vec!["--password", "***", "n=1"]);
        assert_eq!(redact("=password=hunter2"), "=password=***");
        assert_eq!(redact("PGOPTIONS=password=hunter2 x"), "PGOPTIONS=password=*** x");
        assert_eq!(redact_argv(&["token=two words".into()]), vec!["token=***"]);
        assert_eq!(redact("ssh --password  s3cr3t -p 22"), "ssh --password  *** -p 22");
        assert_eq!(redact_arg("opts=--password s3cr3t"), "opts=--password ***");
    }
}
