//! The state of one run: its id, its local directory and `run.json`.
//!
//! Every run gets its own directory, so concurrent runs never share a log file, and the
//! record is rewritten atomically after every change, so a crash leaves the last state.

use anyhow::{Context, Result};
use camino::{Utf8Path, Utf8PathBuf};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageRecord {
    pub name: String,
    /// `ran`, `skipped`, `failed` or `interrupted`.
    pub status: String,
    pub reason: String,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub index: usize,
    pub host: String,
    pub port: u16,
    pub pid: Option<i32>,
    /// Start time of the process (clock ticks since boot), so a reused PID is never killed.
    pub start_ticks: Option<u64>,
    pub stdout: String,
    pub stderr: String,
    /// `starting`, `ready`, `exited`, `stopped`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

impl WorkerRecord {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CoordinatorRecord {
    pub argv: Vec<String>,
    pub exit_code: Option<i32>,
    pub seconds: f64,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunRecord {
    pub run_id: String,
    pub command: String,
    pub target: String,
    pub scheduler: String,
    pub runtime: String,
    /// Seconds since the epoch, and the same in UTC for people.
    pub created: u64,
    pub created_utc: String,
    /// `running`, `succeeded`, `failed` or `interrupted`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    pub stages: Vec<StageRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    pub nodes: Vec<String>,
    pub peers: Vec<String>,
    pub workers: Vec<WorkerRecord>,
    pub job_ids: Vec<String>,
    pub coordinator_runs: Vec<CoordinatorRecord>,
    pub total_seconds: f64,
    /// This run's directory on the target (remote schedulers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_run_dir: Option<String>,
    /// The container image on the target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The sbatch command line of the workers' job.
    pub sbatch: Vec<String>,
    /// Payload bytes sent by `upload` (0 when the release was already there).
    pub upload_bytes: u64,
    /// SSH connections (ControlMasters) this run opened: one per host it talked to.
    pub ssh_connections: u32,
    /// SLURM's job state when the run last looked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_state: Option<String>,
}

/// A run directory plus its record.
pub struct Run {
    pub dir: Utf8PathBuf,
    pub record: RunRecord,
}

impl Run {
    /// Creates a fresh run directory with a unique id.
    pub fn create(root: &Utf8Path, command: &str, target: &str, scheduler: &str, runtime: &str) -> Result<Run> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let runs = crate::paths::runs_dir(root);
        std::fs::create_dir_all(&runs).with_context(|| format!("cannot create {runs}"))?;
        for attempt in 0..100u32 {
            let id = new_run_id(now.as_secs(), now.subsec_nanos().wrapping_add(attempt.wrapping_mul(7919)), target);
            let dir = runs.join(&id);
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    let record = RunRecord {
                        run_id: id,
                        command: command.into(),
                        target: target.into(),
                        scheduler: scheduler.into(),
                        runtime: runtime.into(),
                        created: now.as_secs(),
                        created_utc: utc_string(now.as_secs()),
                        outcome: "running".into(),
                        ..Default::default()
                    };
                    let run = Run { dir, record };
                    run.save()?;
                    return Ok(run);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("cannot create the run directory {dir}")),
            }
        }
        anyhow::bail!("could not find a free run id under {runs}")
    }

    /// Opens an existing run by id.
    pub fn open(root: &Utf8Path, id: &str) -> Result<Run> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            anyhow::bail!("`{id}` is not a run id; `cargo xtask runs` lists them");
        }
        let dir = crate::paths::runs_dir(root).join(id);
        let file = dir.join("run.json");
        let text = std::fs::read_to_string(&file).with_context(|| format!("no run `{id}` ({file}); `cargo xtask runs` lists the runs"))?;
        let record = serde_json::from_str(&text).with_context(|| format!("{file} is not a valid run record"))?;
        Ok(Run { dir, record })
    }

    /// Writes `run.json` atomically (temp file, then rename).
    pub fn save(&self) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.record)?;
        write_atomic(&self.dir.join("run.json"), json.as_bytes())
    }

    pub fn id(&self) -> &str {
        &self.record.run_id
    }

    pub fn path(&self, name: &str) -> Utf8PathBuf {
        self.dir.join(name)
    }
}

/// Writes a file through a temp file in the same directory and a rename.
pub fn write_atomic(path: &Utf8Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Utf8Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot create a temp file in {dir}"))?;
    tmp.write_all(bytes).with_context(|| format!("cannot write {path}"))?;
    tmp.persist(path).map_err(|e| e.error).with_context(|| format!("cannot write {path}"))?;
    Ok(())
}

/// `20261125T013000Z-local-1a2b`: sortable by time, unique by the suffix.
fn new_run_id(secs: u64, nanos: u32, target: &str) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    let suffix = (nanos ^ std::process::id().rotate_left(16)) & 0xffff;
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z-{target}-{suffix:04x}")
}

pub fn utc_string(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// UTC calendar date and time of a Unix time (Howard Hinnant's days-from-civil inverse).
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, (rem / 3600) as u32, (rem % 3600 / 60) as u32, (rem % 60) as u32)
}

/// The file that names the current deployment of a target (what `start` left running).
fn current_file(root: &Utf8Path, target: &str) -> Utf8PathBuf {
    crate::paths::state_dir(root).join("current").join(target)
}

pub fn set_current(root: &Utf8Path, target: &str, run_id: &str) -> Result<()> {
    let f = current_file(root, target);
    std::fs::create_dir_all(f.parent().expect("has parent"))?;
    write_atomic(&f, run_id.as_bytes())
}

pub fn current(root: &Utf8Path, target: &str) -> Option<String> {
    std::fs::read_to_string(current_file(root, target)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

pub fn clear_current(root: &Utf8Path, target: &str, run_id: &str) {
    if current(root, target).as_deref() == Some(run_id) {
        let _ = std::fs::remove_file(current_file(root, target));
    }
}

/// Every run, newest first.
pub fn list(root: &Utf8Path) -> Vec<RunRecord> {
    let mut out = vec![];
    if let Ok(rd) = crate::paths::runs_dir(root).read_dir_utf8() {
        for e in rd.flatten() {
            if let Ok(text) = std::fs::read_to_string(e.path().join("run.json")) {
                if let Ok(r) = serde_json::from_str::<RunRecord>(&text) {
                    out.push(r);
                }
            }
        }
    }
    out.sort_by(|a, b| b.run_id.cmp(&a.run_id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(utc_string(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_string(1_795_570_200), "2026-11-25T01:30:00Z");
        assert_eq!(utc_string(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn run_ids_are_unique_and_sortable() {
        let dir = tempfile::tempdir().unwrap();
        let root = Utf8Path::from_path(dir.path()).unwrap();
        let a = Run::create(root, "deploy", "local", "local", "host").unwrap();
        let b = Run::create(root, "deploy", "local", "local", "host").unwrap();
        assert_ne!(a.id(), b.id());
        assert!(a.dir.join("run.json").is_file());
        let back = Run::open(root, a.id()).unwrap();
        assert_eq!(back.record.target, "local");
        assert_eq!(list(root).len(), 2);
    }
}

/// What the last `build`, `package` and `upload` of a target produced, so that separate
/// invocations (`package`, then `upload`, then `start`) hand their results on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetState {
    pub image: Option<String>,
    pub build_dir: Option<String>,
    pub package: Option<String>,
    pub package_hash: Option<String>,
    pub release: Option<String>,
}

fn target_state_file(root: &Utf8Path, target: &str) -> Utf8PathBuf {
    crate::paths::state_dir(root).join("state").join(format!("{target}.json"))
}

impl TargetState {
    pub fn load(root: &Utf8Path, target: &str) -> TargetState {
        std::fs::read_to_string(target_state_file(root, target)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
    }

    pub fn save(&self, root: &Utf8Path, target: &str) -> Result<()> {
        let f = target_state_file(root, target);
        std::fs::create_dir_all(f.parent().expect("has parent"))?;
        write_atomic(&f, serde_json::to_string_pretty(self)?.as_bytes())
    }
}
