//! Child processes: each in its own process group, logged to files, killed by PID only.
//!
//! A process group per child lets us stop a whole tree (a build script and its compilers, a
//! worker and what it started) with one signal, and keeps the terminal's Ctrl-C from killing
//! workers before we have collected their logs.

use crate::signals;
use anyhow::{Context, Result};
use camino::{Utf8Path, Utf8PathBuf};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where a foreground command's output goes besides its log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Only to the log; the last lines are kept for error messages.
    Quiet,
    /// Also to our stdout/stderr, line by line (the coordinator).
    Stream,
}

/// How a foreground command ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit code, or 128 + signal number when it was killed.
    pub code: i32,
    pub tail: Vec<String>,
    pub elapsed: Duration,
}

pub fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

const TAIL_LINES: usize = 20;

/// Runs a command to its end in its own process group, teeing stdout and stderr into log
/// files. A pending SIGINT/SIGTERM stops the whole group and returns `Interrupted`.
pub fn run_logged(cmd: Command, out_log: &Utf8Path, err_log: &Utf8Path, echo: Echo, stdin: Option<Vec<u8>>) -> Result<Finished> {
    run_logged_with(cmd, out_log, err_log, echo, stdin, None, None)
}

/// Like `run_logged`, with a spinner line (`label`, elapsed time, last output line) on
/// stderr while it runs, when stderr is a terminal.
/// `abort`, when set by another thread, stops the command's process group; the result is
/// then exit code 128 + SIGTERM.
pub fn run_logged_with(
    mut cmd: Command,
    out_log: &Utf8Path,
    err_log: &Utf8Path,
    echo: Echo,
    stdin: Option<Vec<u8>>,
    spinner: Option<&str>,
    abort: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Finished> {
    let start = Instant::now();
    let out_file = create_log(out_log)?;
    let err_file = if err_log == out_log { out_file.clone() } else { create_log(err_log)? };
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd.spawn().with_context(|| format!("cannot start {program}"))?;
    if let (Some(bytes), Some(mut w)) = (stdin, child.stdin.take()) {
        std::thread::spawn(move || {
            let _ = w.write_all(&bytes);
        });
    }
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let readers = [
        pump(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>), out_file, Arc::clone(&tail), echo, false),
        pump(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>), err_file, Arc::clone(&tail), echo, true),
    ];
    let mut spin = spinner.map(|label| crate::ui::Spinner::new(label, start));
    let status = wait_or_interrupt(&mut child, abort, &mut |_| {
        if let Some(s) = spin.as_mut() {
            let last = tail.lock().ok().and_then(|t| t.back().cloned()).unwrap_or_default();
            s.tick(&last);
        }
    })?;
    if let Some(s) = spin.as_mut() {
        s.clear();
    }
    for r in readers.into_iter().flatten() {
        let _ = r.join();
    }
    let tail = tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default();
    match status {
        Ok(status) => Ok(Finished { code: exit_code(status), tail, elapsed: start.elapsed() }),
        Err(sig) => Err(signals::Interrupted(sig).into()),
    }
}

type SharedFile = Arc<Mutex<File>>;

fn create_log(path: &Utf8Path) -> Result<SharedFile> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {dir}"))?;
    }
    let f = File::options().create(true).append(true).open(path).with_context(|| format!("cannot open the log {path}"))?;
    Ok(Arc::new(Mutex::new(f)))
}

/// Copies one output stream, line by line, into the log (and the terminal when streaming).
fn pump(src: Option<Box<dyn Read + Send>>, log: SharedFile, tail: Arc<Mutex<VecDeque<String>>>, echo: Echo, is_err: bool) -> Option<std::thread::JoinHandle<()>> {
    let src = src?;
    Some(std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Ok(mut f) = log.lock() {
                let _ = f.write_all(&line);
            }
            if echo == Echo::Stream && crate::ui::json() {
                let text = String::from_utf8_lossy(&line);
                crate::ui::event("output", serde_json::json!({"stream": if is_err { "stderr" } else { "stdout" }, "line": text.trim_end_matches('\n')}));
            } else if echo == Echo::Stream {
                if is_err {
                    let _ = std::io::stderr().write_all(&line);
                } else {
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(&line);
                    let _ = o.flush();
                }
            }
            if let Ok(mut t) = tail.lock() {
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(String::from_utf8_lossy(&line).trim_end().to_string());
            }
        }
    }))
}

/// Waits for a child; on SIGINT/SIGTERM, stops its process group and reports the signal.
fn wait_or_interrupt(child: &mut Child, abort: Option<&std::sync::atomic::AtomicBool>, on_tick: &mut dyn FnMut(())) -> Result<std::result::Result<ExitStatus, i32>> {
    loop {
        on_tick(());
        if let Some(status) = child.try_wait()? {
            return Ok(Ok(status));
        }
        if abort.is_some_and(|a| a.load(std::sync::atomic::Ordering::SeqCst)) {
            stop_group(child.id() as i32, Duration::from_secs(3));
            return Ok(Ok(child.wait()?));
        }
        if let Some(sig) = signals::pending() {
            stop_group(child.id() as i32, Duration::from_secs(3));
            let _ = child.wait();
            return Ok(Err(sig));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Children started in the background by this process, so their exit codes can be read and
/// they do not linger as zombies.
fn background() -> &'static Mutex<HashMap<i32, Child>> {
    static B: OnceLock<Mutex<HashMap<i32, Child>>> = OnceLock::new();
    B.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Starts a long-lived process in its own process group with its output in two files.
pub fn spawn_background(mut cmd: Command, out_log: &Utf8Path, err_log: &Utf8Path) -> Result<i32> {
    let out = File::create(out_log).with_context(|| format!("cannot create {out_log}"))?;
    let err = File::create(err_log).with_context(|| format!("cannot create {err_log}"))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
    let program = format!("{:?}", cmd.get_program());
    let child = cmd.spawn().with_context(|| format!("cannot start {program}"))?;
    let pid = child.id() as i32;
    if let Ok(mut b) = background().lock() {
        b.insert(pid, child);
    }
    Ok(pid)
}

/// The exit code of a background child of this process, once it has ended.
pub fn reap(pid: i32) -> Option<i32> {
    let mut b = background().lock().ok()?;
    let child = b.get_mut(&pid)?;
    match child.try_wait() {
        Ok(Some(status)) => {
            b.remove(&pid);
            Some(exit_code(status))
        }
        _ => None,
    }
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// Whether the process with this PID is the one we started and still runs.
pub fn alive(pid: i32, ticks: Option<u64>) -> bool {
    let _ = reap(pid);
    match state(pid) {
        None | Some('Z') | Some('X') => false,
        Some(_) => ticks.is_none_or(|t| start_ticks(pid) == Some(t)),
    }
}

/// Whether any process of the group still exists (leader or not).
pub fn group_alive(pgid: i32) -> bool {
    // kill(-pgid, 0) succeeds while any member exists, zombies included; check members.
    let Ok(rd) = std::fs::read_dir("/proc") else { return false };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some(close) = stat.rfind(')') else { continue };
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) && !matches!(fields.first(), Some(&"Z") | Some(&"X")) {
            return true;
        }
    }
    false
}

/// SIGTERM to a process group, then SIGKILL when it has not ended within `grace`.
pub fn stop_group(pgid: i32, grace: Duration) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill(2) with a negative pid signals exactly that process group. SIGCONT lets
    // a stopped member act on the SIGTERM instead of waiting for the SIGKILL.
    unsafe {
        libc::kill(-pgid, libc::SIGTERM);
        libc::kill(-pgid, libc::SIGCONT);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        let _ = reap(pgid);
        if !group_alive(pgid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(50));
    let _ = reap(pgid);
    !group_alive(pgid)
}

/// The last `n` lines of a file, for error messages.
pub fn tail_file(path: &Utf8Path, n: usize) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else { return vec![] };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|s| s.to_string()).collect()
}

/// Finds a program on PATH.
pub fn which(program: &str) -> Option<Utf8PathBuf> {
    let path = std::env::var("PATH").ok()?;
    path.split(':').filter(|d| !d.is_empty()).map(|d| Utf8PathBuf::from(d).join(program)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    })
}

/// Takes an exclusive `flock` on `path` (created if needed), waiting while another process
/// holds it; the lock ends when the returned file is dropped, also when we crash.
pub fn lock_file(path: &Utf8Path, what: &str) -> Result<File> {
    use std::os::unix::io::AsRawFd;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {d}"))?;
    }
    let f = File::options().create(true).truncate(false).write(true).open(path).with_context(|| format!("cannot open the lock {path}"))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        crate::ui::info(&format!("waiting for another {what} to finish (lock {path})"));
        loop {
            signals::check()?;
            // SAFETY: as above.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(f)
}
