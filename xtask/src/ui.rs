//! What the user sees: stage headers, echoed commands, notes and warnings, on stderr.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(1);

pub fn set_level(quiet: bool, verbose: bool) {
    LEVEL.store(if quiet { 0 } else if verbose { 2 } else { 1 }, Ordering::Relaxed);
}

pub fn verbose() -> bool {
    LEVEL.load(Ordering::Relaxed) >= 2
}

fn normal() -> bool {
    LEVEL.load(Ordering::Relaxed) >= 1
}

/// Colour only on a terminal, and never when `NO_COLOR` is set.
pub fn color() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

fn paint(code: &str, s: &str) -> String {
    if color() {
        format!("\x1b[{code}m{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

pub fn stage(name: &str, what: &str) {
    if normal() {
        eprintln!("{} {name}: {what}", paint("1;34", "==>"));
    }
}

pub fn skip(name: &str, why: &str) {
    if normal() {
        eprintln!("{} {name}: skipped, {why}", paint("2", "==>"));
    }
}

pub fn info(msg: &str) {
    if normal() {
        eprintln!("    {msg}");
    }
}

pub fn detail(msg: &str) {
    if verbose() {
        eprintln!("    {msg}");
    }
}

pub fn cmd(line: &str) {
    if normal() {
        eprintln!("    {} {line}", paint("2", "$"));
    }
}

pub fn warn(msg: &str) {
    eprintln!("{} {msg}", paint("1;33", "warning:"));
}

pub fn error(msg: &str) {
    eprintln!("{} {msg}", paint("1;31", "error:"));
}
