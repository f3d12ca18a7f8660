//! What the user sees: stage headers, echoed commands, notes and warnings, on stderr.

use std::io::IsTerminal;

/// Writes to stderr, ignoring failures: a closed terminal or pipe must never abort a run
/// halfway (the cleanup of workers and jobs depends on the run going on).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// A line on stdout that never panics: a closed pipe (`| head`) must not abort the tool.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `out!` without the newline.
#[macro_export]
macro_rules! out_inline {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

/// `say!` without the newline, for progress lines.
macro_rules! say_inline {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut e = std::io::stderr();
        let _ = write!(e, $($t)*);
        let _ = e.flush();
    }};
}
use std::sync::atomic::{AtomicU8, Ordering};

static LEVEL: AtomicU8 = AtomicU8::new(1);
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

pub fn set_level(quiet: bool, verbose: bool) {
    LEVEL.store(if quiet { 0 } else if verbose { 2 } else { 1 }, Ordering::Relaxed);
    START.get_or_init(std::time::Instant::now);
}

/// `--json`: one JSON event per line on stdout instead of the human messages on stderr.
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Writes one event line: `{"event": kind, "t": seconds since start, ...fields}`.
pub fn event(kind: &str, mut fields: serde_json::Value) {
    use std::io::Write;
    let t = START.get_or_init(std::time::Instant::now).elapsed().as_secs_f64();
    if let Some(m) = fields.as_object_mut() {
        m.insert("event".into(), kind.into());
        m.insert("t".into(), serde_json::json!((t * 1000.0).round() / 1000.0));
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{fields}");
    let _ = out.flush();
}

pub fn verbose() -> bool {
    LEVEL.load(Ordering::Relaxed) >= 2
}

fn normal() -> bool {
    LEVEL.load(Ordering::Relaxed) >= 1 && !json()
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
    if json() {
        return event("stage_start", serde_json::json!({"stage": name, "reason": what}));
    }
    if normal() {
        say!("{} {name}: {what}", paint("1;34", "==>"));
    }
}

pub fn skip(name: &str, why: &str) {
    if json() {
        return event("stage_skip", serde_json::json!({"stage": name, "reason": why}));
    }
    if normal() {
        say!("{} {name}: skipped, {why}", paint("2", "==>"));
    }
}

pub fn info(msg: &str) {
    if json() && LEVEL.load(Ordering::Relaxed) >= 1 {
        return event("info", serde_json::json!({"message": msg}));
    }
    if normal() {
        say!("    {msg}");
    }
}

pub fn detail(msg: &str) {
    if verbose() {
        say!("    {msg}");
    }
}

pub fn cmd(line: &str) {
    if json() {
        return event("command", serde_json::json!({"command": line}));
    }
    if normal() {
        say!("    {} {line}", paint("2", "$"));
    }
}

pub fn warn(msg: &str) {
    if json() {
        return event("warning", serde_json::json!({"message": msg}));
    }
    say!("{} {msg}", paint("1;33", "warning:"));
}

pub fn error(msg: &str) {
    if json() {
        return event("error", serde_json::json!({"message": msg}));
    }
    say!("{} {msg}", paint("1;31", "error:"));
}

/// A one-line progress display: spinner, label, elapsed seconds and the last output line.
/// Drawn only when stderr is a terminal and not quiet, so logs and CI output stay clean.
pub struct Spinner {
    label: String,
    start: std::time::Instant,
    frame: usize,
    last_draw: Option<std::time::Instant>,
    enabled: bool,
}

impl Spinner {
    pub fn new(label: &str, start: std::time::Instant) -> Spinner {
        Spinner { label: label.into(), start, frame: 0, last_draw: None, enabled: normal() && std::io::stderr().is_terminal() }
    }

    pub fn tick(&mut self, last_line: &str) {
        if !self.enabled || self.last_draw.is_some_and(|t| t.elapsed().as_millis() < 100) {
            return;
        }
        const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        self.frame = (self.frame + 1) % FRAMES.len();
        let width = terminal_width().saturating_sub(self.label.len() + 16).max(10);
        let line: String = last_line.chars().filter(|c| !c.is_control()).take(width).collect();
        say_inline!("\r\x1b[2K    {} {} {:>5.0}s | {line}", FRAMES[self.frame], self.label, self.start.elapsed().as_secs_f64());
        self.last_draw = Some(std::time::Instant::now());
    }

    pub fn clear(&mut self) {
        if self.enabled && self.last_draw.is_some() {
            say_inline!("\r\x1b[2K");
        }
    }
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).unwrap_or(100)
}

/// A one-line byte counter with rate (`12.3/45.6 MiB  78.9 MiB/s`) for transfers and
/// packing; drawn only when stderr is a terminal and not quiet.
pub struct ByteProgress {
    label: String,
    start: std::time::Instant,
    last_draw: Option<std::time::Instant>,
    enabled: bool,
}

impl ByteProgress {
    pub fn new(label: &str) -> ByteProgress {
        ByteProgress { label: label.into(), start: std::time::Instant::now(), last_draw: None, enabled: normal() && std::io::stderr().is_terminal() }
    }

    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled || self.last_draw.is_some_and(|t| t.elapsed().as_millis() < 100) {
            return;
        }
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        say_inline!("\r\x1b[2K    {} {:.1}/{:.1} MiB  {:.1} MiB/s", self.label, mib(done), mib(total), mib(done) / secs);
        self.last_draw = Some(std::time::Instant::now());
    }

    pub fn finish(&mut self) {
        if self.enabled && self.last_draw.is_some() {
            say_inline!("\r\x1b[2K");
        }
    }
}

/// `1.5 MiB`, `980 B`.
pub fn bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// `78.9 MiB/s`.
pub fn rate(b: u64, secs: f64) -> String {
    format!("{}/s", bytes((b as f64 / secs.max(1e-3)) as u64))
}

/// A stage ended (JSON mode only; the human output shows results as they come).
pub fn stage_done(name: &str, status: &str, seconds: f64, error: Option<&str>) {
    if json() {
        event("stage_finish", serde_json::json!({"stage": name, "status": status, "seconds": seconds, "error": error}));
    }
}

/// `k/N` of something (workers ready), as an info line or a progress event.
pub fn progress(what: &str, done: usize, total: usize, elapsed: f64) {
    if json() {
        event("progress", serde_json::json!({"what": what, "done": done, "total": total, "seconds": elapsed}));
    } else {
        info(&format!("{what} {done}/{total} ({elapsed:.1}s)"));
    }
}
