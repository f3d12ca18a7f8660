//! SIGINT and SIGTERM become a flag that every wait loop checks, so cleanup always runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

/// Installs the handlers once. Later signals only set the flag; the loops notice it.
pub fn install() {
    let flag = FLAG.get_or_init(|| Arc::new(AtomicUsize::new(0)));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // Registration fails only for forbidden signals; these two are always allowed.
        let _ = signal_hook::flag::register_usize(sig, Arc::clone(flag), sig as usize);
    }
}

/// The signal received, if any.
pub fn pending() -> Option<i32> {
    FLAG.get().map(|f| f.load(Ordering::SeqCst)).filter(|s| *s != 0).map(|s| s as i32)
}

/// The conventional exit code for death by a signal: 130 for SIGINT, 143 for SIGTERM.
pub fn exit_code(sig: i32) -> i32 {
    128 + sig
}

pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// The error that unwinds a run when a signal arrives.
#[derive(Debug)]
pub struct Interrupted(pub i32);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by {}", name(self.0))
    }
}
impl std::error::Error for Interrupted {}

/// Fails with `Interrupted` when a signal is pending.
pub fn check() -> Result<(), Interrupted> {
    match pending() {
        Some(s) => Err(Interrupted(s)),
        None => Ok(()),
    }
}
