//! The one place where an argv becomes a POSIX shell command line.
//!
//! ssh and srun hand their command to a remote shell, so every argument is quoted here and
//! nowhere else. Single quotes keep every byte literal; a single quote itself is written as
//! `'\''`. Arguments with a NUL byte cannot travel through any shell and are refused.

use std::borrow::Cow;

/// Characters that never need quoting.
fn is_plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)
}

/// Quotes one argument for a POSIX shell (sh, bash, dash, zsh in sh mode).
pub fn quote(arg: &str) -> Cow<'_, str> {
    if !arg.is_empty() && arg.chars().all(is_plain) {
        return Cow::Borrowed(arg);
    }
    Cow::Owned(single_quoted(arg))
}

/// `arg` in single quotes, every `'` written as `'\''`.
fn single_quoted(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Words that a shell reads as syntax, not as a command name, when they come first unquoted.
const RESERVED: &[&str] = &[
    "case", "do", "done", "elif", "else", "esac", "fi", "for", "if", "in", "then", "until", "while", "function", "select", "time", "coproc",
    "foreach", "end", "repeat", "nocorrect", "noglob",
];

/// Joins an argv into one command line that a POSIX shell splits back into the same argv.
/// The first word is the command: it is quoted also when it would otherwise read as a
/// variable assignment (`A=b`) or a reserved word (`if`).
pub fn join<S: AsRef<str>>(argv: &[S]) -> Result<String, NulInArg> {
    let mut out = String::new();
    for (i, a) in argv.iter().enumerate() {
        let a = a.as_ref();
        if a.contains('\0') {
            return Err(NulInArg(a.replace('\0', "\\0")));
        }
        if i > 0 {
            out.push(' ');
        }
        if i == 0 && (a.contains('=') || RESERVED.contains(&a)) {
            out.push_str(&single_quoted(a));
        } else {
            out.push_str(&quote(a));
        }
    }
    Ok(out)
}

/// An argument holds a NUL byte, which no shell or execve can carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NulInArg(pub String);

impl std::fmt::Display for NulInArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "argument `{}` contains a NUL byte, which cannot be passed to a program", self.0)
    }
}
impl std::error::Error for NulInArg {}

/// For display only (plans, echoed commands): like `join`, but never fails.
pub fn display<S: AsRef<str>>(argv: &[S]) -> String {
    let shown: Vec<String> = argv.iter().map(|a| a.as_ref().replace('\0', "\\0")).collect();
    join(&shown).expect("NUL bytes were replaced")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    pub const HOSTILE: &[&str] = &[
        "plain",
        "",
        "with space",
        "  leading and trailing  ",
        "it's",
        "\"double\"",
        "$(touch /tmp/pwned)",
        "`id`",
        "a;b",
        "a && b || c",
        "line1\nline2",
        "tab\there",
        "back\\slash",
        "glob*?[a]",
        "~user",
        "$HOME ${HOME}",
        "π=ü ünïcödé ✓",
        "-n",
        "--flag=x y",
        "'",
        "''",
        "'\\''",
        "#comment",
        "!bang",
        "a\rb",
        "{a,b}",
        "<in >out 2>&1 |pipe",
    ];

    #[test]
    fn plain_words_are_not_quoted() {
        assert_eq!(quote("n=1000"), "n=1000");
        assert_eq!(quote("/a/b-c_d.e:5000"), "/a/b-c_d.e:5000");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn nul_is_refused() {
        assert!(join(&["a\0b"]).is_err());
    }

    /// Every hostile string survives a real `sh -c` byte-identical.
    #[test]
    fn hostile_strings_round_trip_through_sh() {
        for shell in ["sh", "bash"] {
            let line = join(&HOSTILE.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
            let out = Command::new(shell).arg("-c").arg(format!("printf '%s\\0' {line}")).output().unwrap();
            assert!(out.status.success(), "{shell}");
            let got: Vec<&[u8]> = out.stdout.split(|b| *b == 0).collect();
            let want: Vec<&[u8]> = HOSTILE.iter().map(|s| s.as_bytes()).chain([&b""[..]]).collect();
            assert_eq!(got, want, "{shell}");
        }
    }
}
