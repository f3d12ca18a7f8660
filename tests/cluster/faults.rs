//! The fault matrix (issue 7): one test per row, on the real testbed. Every case ends with the
//! same four checks ([`assert_cleaned_up`]):
//!
//! (a) no SLURM job of the run is left (`squeue` on the login host);
//! (b) no process of the run is left anywhere: none whose environment says `SLURM_JOB_ID=<job>`
//!     (workers, the coordinator's step) and none whose command line names the run;
//! (c) no half-extracted release (`releases/.tmp-*`) under the target's `remote_dir`;
//! (d) the local run directory holds every log that existed on the cluster when the fault was
//!     injected, and `run.json` records the failure.
//!
//! Faults go in at exact points through the executor's hold hook (`XTASK_HOLD_BEFORE`) and the
//! testbed's fault hooks. Each case deploys under a target name of its own (a `--config` copy of
//! the generated `testbed-tests` target), so its state and run records never mix with others'.
//! Rows 2 and 11 are covered in `slurm.rs` (see RELIABILITY.md).

use crate::fixture::{root, testbed, text, Testbed, TARGET, TB_ENV};
use std::io::{BufRead, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// A target of the case's own: the generated testbed target, edited, under another name.
struct Target {
    name: String,
    file: PathBuf,
    remote_dir: PathBuf,
    /// The remote_dir was made for this case alone; it is removed at the end.
    fresh: bool,
    _dir: tempfile::TempDir,
}

impl Target {
    fn new(name: &str, edit: impl FnOnce(&mut toml::Table)) -> Target {
        testbed();
        let generated = std::fs::read_to_string(root().join(format!("target/xtask/targets/{TARGET}.toml"))).unwrap();
        let mut t: toml::Table = generated.parse().unwrap();
        edit(&mut t);
        let remote_dir = PathBuf::from(t["reach"]["remote_dir"].as_str().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, t.to_string()).unwrap();
        Target { name: name.into(), file, remote_dir, fresh: false, _dir: dir }
    }

    /// Like [`Target::new`], with a `remote_dir` of its own: everything, the 240 MB image
    /// included, must be uploaded again.
    fn fresh(name: &str, edit: impl FnOnce(&mut toml::Table)) -> Target {
        let rt = testbed().get("TB_RT").to_string();
        let dir = format!("{rt}/home/faults-{name}-{}", std::process::id());
        let _ = std::fs::remove_dir_all(&dir);
        let mut t = Target::new(name, |t| {
            set(t, "reach.remote_dir", dir.as_str());
            edit(t);
        });
        t.fresh = true;
        t
    }

    /// `--target NAME --config FILE ARGS...`
    fn args(&self, rest: &[&str]) -> Vec<String> {
        let mut a = vec!["--target".to_string(), self.name.clone(), "--config".into(), self.file.to_str().unwrap().into()];
        a.extend(rest.iter().map(|s| s.to_string()));
        a
    }

    fn deploy(&self, extra: &[&str]) -> Vec<String> {
        let mut rest = vec!["deploy", "deploy/examples/sum.daph"];
        rest.extend_from_slice(extra);
        self.args(&rest)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let state = root().join("target/xtask");
        let _ = std::fs::remove_file(state.join("state").join(format!("{}.json", self.name)));
        let _ = std::fs::remove_file(state.join("current").join(&self.name));
        if self.fresh {
            let _ = std::fs::remove_dir_all(&self.remote_dir);
        }
    }
}

/// Sets a dotted key (`schedule.slurm.partition`) in a parsed target file.
fn set(t: &mut toml::Table, key: &str, v: impl Into<toml::Value>) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap();
    let mut cur = t;
    for p in parts {
        cur = cur.entry(p).or_insert_with(|| toml::Value::Table(Default::default())).as_table_mut().unwrap();
    }
    cur.insert(last.into(), v.into());
}

/// One xtask process with its stderr lines time-stamped as they arrive. Dropping it while the
/// process runs stops it the way a user would (SIGTERM), so its cleanup runs even when a test
/// fails half-way.
struct Running {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<()>>,
}

/// What a finished xtask process left.
struct Done {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    lines: Vec<(Instant, String)>,
    ended: Instant,
}

impl Done {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// When the first stderr line holding `needle` arrived.
    fn at(&self, needle: &str) -> Instant {
        self.lines.iter().find(|(_, l)| l.contains(needle)).map(|(t, _)| *t).unwrap_or_else(|| panic!("no line with {needle:?} in:\n{}", self.stderr))
    }

    fn run_dir(&self) -> PathBuf {
        let line = self.stderr.lines().rev().find(|l| l.contains("run directory: ")).unwrap_or_else(|| panic!("no run directory in:\n{}", self.stderr));
        PathBuf::from(line.split("run directory: ").nth(1).unwrap().trim())
    }
}

impl Running {
    fn spawn(args: &[String], env: &[(&str, &str)]) -> Running {
        let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
        c.current_dir(root()).envs(TB_ENV.iter().copied()).envs(env.iter().copied()).args(args);
        // A process group of its own, like a job a shell started: a group signal is Ctrl-C.
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child = c.spawn().unwrap();
        let lines = Arc::new(Mutex::new(vec![]));
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err = std::io::BufReader::new(child.stderr.take().unwrap());
        let l = Arc::clone(&lines);
        let stderr = std::thread::spawn(move || {
            for line in err.lines() {
                let Ok(line) = line else { break };
                l.lock().unwrap().push((Instant::now(), line));
            }
        });
        Running { child: Some(child), lines, stdout: Some(stdout), stderr: Some(stderr) }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn stderr_now(&self) -> String {
        self.lines.lock().unwrap().iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// Waits until a stderr line holds `needle`; when it arrived.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((t, _)) = self.lines.lock().unwrap().iter().find(|(_, l)| l.contains(needle)) {
                return *t;
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap().is_some();
            if exited {
                std::thread::sleep(Duration::from_millis(200));
                if let Some((t, _)) = self.lines.lock().unwrap().iter().find(|(_, l)| l.contains(needle)) {
                    return *t;
                }
            }
            assert!(!exited && Instant::now() < deadline, "no {needle:?} from xtask{}:\n{}", if exited { " (it exited)" } else { "" }, self.stderr_now());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the process alone, or to its whole process group (a terminal's Ctrl-C).
    fn signal(&self, sig: i32, group: bool) {
        let pid = self.pid();
        // SAFETY: kill(2) on our own, unreaped child (or its group).
        unsafe { libc::kill(if group { -pid } else { pid }, sig) };
    }

    fn finish(mut self) -> Done {
        let status = self.child.take().unwrap().wait().unwrap();
        let ended = Instant::now();
        self.stderr.take().unwrap().join().unwrap();
        let stdout = self.stdout.take().unwrap().join().unwrap();
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        let stderr = lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n");
        Done { status, stdout, stderr, lines, ended }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(90);
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(args: &[String], env: &[(&str, &str)]) -> Done {
    Running::spawn(args, env).finish()
}

fn record(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap()
}

/// The newest local run of a target (each case has a target of its own).
fn newest_run(target: &str) -> PathBuf {
    let mut runs: Vec<(String, PathBuf)> = std::fs::read_dir(root().join("target/xtask/runs"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(e.path().join("run.json")).ok()?).ok()?;
            (rec["target"] == target).then(|| (rec["run_id"].as_str().unwrap_or_default().to_string(), e.path()))
        })
        .collect();
    runs.sort();
    runs.pop().unwrap_or_else(|| panic!("no run of {target}")).1
}

/// Every regular file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
            if m.is_dir() {
                walk(base, &p, out);
            } else if m.is_file() {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut v = vec![];
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// The run's directory on the cluster (the testbed's filesystem is shared with this machine).
fn remote_run_dir(t: &Target, run_id: &str) -> PathBuf {
    t.remote_dir.join("runs").join(run_id)
}

/// The logs that exist on the cluster for the newest run of `t`, right now.
fn remote_logs_now(t: &Target) -> Vec<String> {
    let dir = newest_run(&t.name);
    let id = dir.file_name().unwrap().to_string_lossy().into_owned();
    // `peers.d/<task>.tmp` lives for a moment only (a worker's atomic write of its address).
    files_under(&remote_run_dir(t, &id)).into_iter().filter(|f| !f.ends_with(".tmp")).collect()
}

/// The four checks every case ends with: (a) no job, (b) no process, (c) no half-extracted
/// release, (d) every log that existed is in the local run directory (`logs` lists those seen
/// on the cluster at the fault) and run.json records the failure. Returns the record.
fn assert_cleaned_up(tb: &Testbed, t: &Target, dir: &Path, logs: &[String]) -> serde_json::Value {
    let rec = record(dir);
    let run_id = rec["run_id"].as_str().unwrap().to_string();
    let jobs: Vec<String> = rec["job_ids"].as_array().map(|a| a.iter().filter_map(|j| j.as_str().map(str::to_string)).collect()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(15);
    // (a) no SLURM job of the run: neither by id nor by the run's job name.
    let name = format!("daphne-{run_id}");
    loop {
        let q = text(&tb.on("login", &["squeue", "-h", "-o", "%i|%j|%T"]).stdout);
        let left: Vec<&str> = q.lines().filter(|l| l.split('|').next().is_some_and(|id| jobs.iter().any(|j| j == id)) || l.split('|').nth(1) == Some(name.as_str())).collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "jobs of run {run_id} are still queued: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // (b) no process of the run on any host (all namespaces share this machine's /proc).
    loop {
        let mut left = vec![];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == std::process::id().to_string() {
                continue;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let of_job = env.split(|b| *b == 0).any(|kv| jobs.iter().any(|j| kv == format!("SLURM_JOB_ID={j}").as_bytes()));
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let names_run = String::from_utf8_lossy(&cmd).contains(&run_id);
            if of_job || names_run {
                left.push(format!("{pid}: {}", String::from_utf8_lossy(&cmd).replace('\0', " ").chars().take(120).collect::<String>()));
            }
        }
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes of run {run_id} remain: {left:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // (c) no half-extracted release under the target's remote_dir. Other tests share that
    // directory and may be extracting their own releases right now: on a shared remote_dir,
    // only this run's release (its package hash is unique to the target) counts.
    let mine = rec["package_hash"].as_str().map(|h| format!(".tmp-{}-", &h[..16]));
    for sub in ["releases", "images"] {
        let tmp: Vec<String> = std::fs::read_dir(t.remote_dir.join(sub))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-") && (t.fresh || mine.as_ref().is_some_and(|m| n.starts_with(m.as_str()))))
            .collect();
        assert!(tmp.is_empty(), "half-extracted entries in {}/{sub}: {tmp:?}", t.remote_dir.display());
    }
    // (d) every log that existed is here, and the failure is on record.
    let local = files_under(dir);
    for f in logs {
        assert!(local.contains(f), "{f} existed on the cluster but is not in {}: {local:?}", dir.display());
    }
    let outcome = rec["outcome"].as_str().unwrap_or_default();
    assert!(outcome == "failed" || outcome == "interrupted", "outcome {outcome:?}: {rec:#}");
    let failed_stage = rec["stages"].as_array().unwrap().iter().any(|s| s["status"] == "failed" || s["status"] == "interrupted");
    assert!(rec["error"].as_str().is_some_and(|e| !e.is_empty()) || failed_stage, "no failure recorded: {rec:#}");
    assert!(!remote_run_dir(t, &run_id).exists(), "the run's directory on the cluster was not cleaned");
    rec
}

/// The name of the stage that failed or was interrupted.
fn failed_stage(rec: &serde_json::Value) -> String {
    rec["stages"].as_array().unwrap().iter().find(|s| s["status"] == "failed" || s["status"] == "interrupted").map(|s| s["name"].as_str().unwrap().to_string()).unwrap_or_default()
}

/// A file that does not exist yet; creating it releases a hold (`XTASK_HOLD_UNTIL`).
fn go_file() -> PathBuf {
    let p = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let path = p.to_path_buf();
    drop(p);
    path
}

/// Brings a node back after a fault, also when the test fails: link up, slurmd and sshd
/// restarted, then waits until SLURM reports it idle again.
struct Restore<'a> {
    tb: &'a Testbed,
    node: &'static str,
}

impl Restore<'_> {
    fn now(&self) {
        for args in [&["netcut", self.node, "up"][..], &["restart-slurmd", self.node], &["restart-sshd", self.node]] {
            let mut a = vec!["testbed", "fault"];
            a.extend_from_slice(args);
            let _ = crate::fixture::xtask().args(&a).output();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let st = text(&self.tb.on("login", &["sinfo", "-h", "-n", self.node, "-o", "%T"]).stdout);
            if st.lines().all(|l| l.trim() == "idle") && !st.trim().is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("warning: {} is not idle 60 s after its restore", self.node);
    }
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        self.now();
    }
}

/// Pid of the ControlMaster that carries the transfer of `xtask`: the rsync child's ssh
/// options name the control socket, and the master's title is `ssh: <socket> [mux]`.
fn transfer_master(xtask: i32) -> Option<(i32, i32)> {
    let rsync = children(xtask).into_iter().find(|p| comm(*p) == "rsync")?;
    let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{rsync}/cmdline")).ok()?).into_owned();
    let cp = cmd.split(|c: char| c == '\0' || c == ' ').find_map(|w| w.strip_prefix("ControlPath="))?.trim_matches('\'').to_string();
    let title = format!("ssh: {cp} [mux]");
    let master = std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let c = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&c).starts_with(&title).then_some(pid)
    })?;
    Some((rsync, master))
}

fn children(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok().and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.split(' ').nth(1) == Some(&pid.to_string()))).unwrap_or(false))
        .collect()
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

/// Bytes of the image upload that have arrived on the cluster so far.
fn incoming_bytes(t: &Target) -> u64 {
    std::fs::read_dir(t.remote_dir.join("images/.incoming")).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
}

/// Waits until the image upload has more than `bytes` on the cluster.
fn wait_incoming(r: &mut Running, t: &Target, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while incoming_bytes(t) <= bytes {
        assert!(Instant::now() < deadline, "the image upload never passed {bytes} bytes:\n{}", r.stderr_now());
        assert!(r.child.as_mut().unwrap().try_wait().unwrap().is_none(), "xtask ended before the upload passed {bytes} bytes:\n{}", r.stderr_now());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `sent the image (123.4 MiB, rsync)` → bytes.
fn image_bytes_sent(stderr: &str) -> Option<u64> {
    let rest = stderr.lines().find_map(|l| l.split("sent the image (").nth(1))?;
    let (num, rest) = rest.split_once(' ')?;
    let unit = rest.split(|c: char| c == ',' || c == ')').next()?;
    let mult = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((num.parse::<f64>().ok()? * mult) as u64)
}

/// The upload on the cluster is complete and intact: the image has the local SIF's sha256
/// (and its sidecar says so), and the release is `.complete` and passes `sha256sum -c`.
fn assert_upload_verified(t: &Target) {
    let local_sif = root().join("target/xtask/images/daphne-bookworm.sif");
    let sum = |p: &Path| text(&Command::new("sha256sum").arg(p).output().unwrap().stdout).split_whitespace().next().unwrap_or_default().to_string();
    let want = sum(&local_sif);
    let images: Vec<PathBuf> = std::fs::read_dir(t.remote_dir.join("images")).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "sif")).collect();
    assert_eq!(images.len(), 1, "{images:?}");
    assert_eq!(sum(&images[0]), want, "the uploaded image differs from the local one");
    let sidecar = std::fs::read_to_string(format!("{}.sha256", images[0].display())).unwrap();
    assert_eq!(sidecar.trim(), want);
    let releases: Vec<PathBuf> = std::fs::read_dir(t.remote_dir.join("releases")).unwrap().flatten().map(|e| e.path()).filter(|p| p.join(".complete").is_file()).collect();
    assert_eq!(releases.len(), 1, "{releases:?}");
    let check = Command::new("sha256sum").args(["-c", "--quiet", "SHA256SUMS"]).current_dir(&releases[0]).output().unwrap();
    assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));
    let partial: Vec<String> = files_under(&t.remote_dir.join("images/.incoming")).into_iter().filter(|f| !f.ends_with(".lock")).collect();
    assert!(partial.is_empty(), "partial uploads left: {partial:?}");
}

// ---------------------------------------------------------------------------------------------
// Row 1: a node crashes during `wait`
// ---------------------------------------------------------------------------------------------

/// Held before `wait` with the workers' job running, node2 crashes; the deploy fails within
/// 15 s of the crash, in `wait`, naming node2. (The workers had already printed their Started
/// lines: `wait` must not take a log line for a live worker.)
#[test]
fn node_crash_during_wait_fails_fast_naming_the_node() {
    let tb = testbed();
    let _alone = crate::fixture::exclusive();
    let t = Target::new("tbf-crash-wait", |_| {});
    let go = go_file();
    let go_s = go.to_str().unwrap().to_string();
    let mut r = Running::spawn(&t.deploy(&["n=1000"]), &[("XTASK_HOLD_BEFORE", "wait"), ("XTASK_HOLD_UNTIL", &go_s)]);
    r.wait_for("holding before `wait`", Duration::from_secs(120));
    // The workers are up: every one has its Started line (so only a liveness check can tell).
    let dir = newest_run(&t.name);
    let id = dir.file_name().unwrap().to_string_lossy().into_owned();
    let rdir = remote_run_dir(&t, &id);
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..6).filter(|k| std::fs::read_to_string(rdir.join(format!("worker-{k}.out"))).is_ok_and(|s| s.contains("Started Distributed Worker"))).count() < 6 {
        assert!(Instant::now() < deadline, "workers never started: {:?}", files_under(&rdir));
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs: Vec<String> = files_under(&rdir).into_iter().filter(|f| !f.ends_with(".tmp")).collect();
    let restore = Restore { tb, node: "node2" };
    tb.fault(&["crash", "node2"]);
    let t0 = Instant::now();
    std::fs::write(&go, b"go").unwrap();
    let done = r.finish();
    let _ = std::fs::remove_file(&go);
    let took = done.ended - t0;
    let to_error = done.at("error: ") - t0;
    restore.now();
    std::mem::forget(restore);
    eprintln!("row 1: node crash -> error line {to_error:?}, -> exit {took:?}");
    assert_eq!(done.code(), Some(1), "{}", done.stderr);
    assert!(took < Duration::from_secs(15), "took {took:?} from the crash to the end:\n{}", done.stderr);
    let first_error = done.stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
    assert!(first_error.contains("node2") && first_error.starts_with("error: wait:"), "the failure does not name node2 in `wait`:\n{}", done.stderr);
    let rec = assert_cleaned_up(tb, &t, &done.run_dir(), &logs);
    assert_eq!(failed_stage(&rec), "wait");
}

// ---------------------------------------------------------------------------------------------
// Row 3: the network to a node is cut after the workers are up, before `run`
// ---------------------------------------------------------------------------------------------

#[test]
fn network_cut_to_a_node_fails_naming_it() {
    let tb = testbed();
    let _alone = crate::fixture::exclusive();
    let t = Target::new("tbf-netcut", |_| {});
    let go = go_file();
    let go_s = go.to_str().unwrap().to_string();
    let mut r = Running::spawn(&t.deploy(&["n=1000"]), &[("XTASK_HOLD_BEFORE", "run"), ("XTASK_HOLD_UNTIL", &go_s)]);
    r.wait_for("holding before `run`", Duration::from_secs(120));
    let logs = remote_logs_now(&t);
    let restore = Restore { tb, node: "node2" };
    tb.fault(&["netcut", "node2", "down"]);
    let t0 = Instant::now();
    std::fs::write(&go, b"go").unwrap();
    let done = r.finish();
    let _ = std::fs::remove_file(&go);
    let to_error = done.at("error: ") - t0;
    let took = done.ended - t0;
    // The node's own processes cannot be reached while it is cut off; SLURM ends them when it
    // is back. So restore first, then check that nothing of the run is left anywhere.
    restore.now();
    std::mem::forget(restore);
    eprintln!("row 3: netcut -> error line {to_error:?}, -> exit {took:?}");
    assert_eq!(done.code(), Some(1), "{}", done.stderr);
    let first_error = done.stderr.lines().find(|l| l.starts_with("error: run:")).unwrap_or_else(|| panic!("no run error:\n{}", done.stderr));
    assert!(first_error.contains("node2"), "the failure does not name node2:\n{}", done.stderr);
    let rec = assert_cleaned_up(tb, &t, &done.run_dir(), &logs);
    assert_eq!(failed_stage(&rec), "run");
}

// ---------------------------------------------------------------------------------------------
// Row 4: a worker exits with an error at start
// ---------------------------------------------------------------------------------------------

/// A first deployment holds ports 50300/50301 on every node; a second one with the same
/// `port_base` and `port_retries = 0` cannot bind: its workers exit at once. The deploy fails
/// before the readiness deadline, and the error shows the worker's own log line.
#[test]
fn worker_failing_at_start_fails_with_its_log_tail() {
    let tb = testbed();
    let _shared = crate::fixture::shared();
    let holder_t = Target::new("tbf-port-holder", |t| set(t, "schedule.port_base", 50300));
    let mut holder = Running::spawn(&holder_t.deploy(&["n=10"]), &[("XTASK_HOLD_BEFORE", "run")]);
    holder.wait_for("holding before `run`", Duration::from_secs(120));
    let t = Target::new("tbf-port-taken", |t| {
        set(t, "schedule.port_base", 50300);
        set(t, "schedule.port_retries", 0);
    });
    let done = run(&t.deploy(&["n=1000"]), &[]);
    drop(holder); // SIGTERM: the holder cleans up after itself
    assert_eq!(done.code(), Some(1), "{}", done.stderr);
    let took = done.at("error: ") - done.at("==> wait");
    assert!(took < Duration::from_secs(60), "failed after {took:?}, past ready_timeout = 60 s");
    let dir = done.run_dir();
    // The worker's own words, from its log in the run directory, are in the error.
    let bind_line = files_under(&dir)
        .iter()
        .filter(|f| f.starts_with("worker-") && f.ends_with(".err"))
        .flat_map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default().lines().map(str::to_string).collect::<Vec<_>>())
        .find(|l| l.contains("Address already in use"))
        .unwrap_or_else(|| panic!("no worker log says why it failed: {:?}", files_under(&dir)));
    let error = &done.stderr[done.stderr.find("error: wait:").unwrap_or_else(|| panic!("no wait error:\n{}", done.stderr))..];
    assert!(error.contains(&bind_line), "the error lacks the worker's log line {bind_line:?}:\n{error}");
    assert!(error.contains("no retries are left (port_retries = 0)"), "{error}");
    let mut logs = vec!["job.out".to_string(), "job.sh".into()];
    logs.extend((0..6).map(|k| format!("worker-{k}.err")));
    let rec = assert_cleaned_up(tb, &t, &dir, &logs);
    assert_eq!(failed_stage(&rec), "wait");
}

// ---------------------------------------------------------------------------------------------
// Row 5: the coordinator fails
// ---------------------------------------------------------------------------------------------

#[test]
fn coordinator_failure_exit_code_is_the_tools() {
    let tb = testbed();
    let _shared = crate::fixture::shared();
    let t = Target::new("tbf-coordinator", |_| {});
    let done = run(&t.deploy(&["n=abc"]), &[]);
    let dir = done.run_dir();
    let rec = record(&dir);
    let coord = rec["coordinator_runs"][0]["exit_code"].as_i64().unwrap_or_else(|| panic!("no coordinator exit code: {rec:#}"));
    assert_ne!(coord, 0);
    assert_eq!(done.code(), Some(coord as i32), "the tool's exit code is not the coordinator's:\n{}", done.stderr);
    assert_eq!(rec["exit_code"].as_i64(), Some(coord));
    assert!(done.stderr.contains(&format!("the coordinator exited with code {coord}")), "{}", done.stderr);
    let err = std::fs::read_to_string(dir.join("coordinator.err")).unwrap();
    assert!(err.contains("invalid value for script argument n: 'abc'"), "{err}");
    let mut logs = vec!["job.out".to_string(), "coordinator.out".into(), "coordinator.err".into(), "scontrol-show-job.txt".into()];
    logs.extend((0..6).flat_map(|k| [format!("worker-{k}.out"), format!("worker-{k}.err")]));
    let rec = assert_cleaned_up(tb, &t, &dir, &logs);
    assert_eq!(failed_stage(&rec), "run");
}

// ---------------------------------------------------------------------------------------------
// Row 6: SIGINT and SIGTERM in every phase
// ---------------------------------------------------------------------------------------------

/// Interrupts a deploy held before each phase in turn. SIGINT goes to the whole process group,
/// as a terminal's Ctrl-C does; SIGTERM to the process alone, as `kill` does.
fn interrupt_every_phase(sig: i32, want: i32, target: &str) {
    let tb = testbed();
    let _shared = crate::fixture::shared();
    let t = Target::new(target, |_| {});
    for phase in ["build", "package", "upload", "start", "wait", "run"] {
        let t0 = Instant::now();
        let mut r = Running::spawn(&t.deploy(&["n=1000"]), &[("XTASK_HOLD_BEFORE", phase)]);
        r.wait_for(&format!("holding before `{phase}`"), Duration::from_secs(120));
        let logs = remote_logs_now(&t);
        r.signal(sig, sig == libc::SIGINT);
        let done = r.finish();
        eprintln!("row 6: {} before `{phase}`: exit {:?} after {:.1}s", if sig == libc::SIGINT { "SIGINT" } else { "SIGTERM" }, done.code(), (done.ended - t0).as_secs_f64());
        assert_eq!(done.code(), Some(want), "phase {phase}:\n{}", done.stderr);
        let dir = done.run_dir();
        let rec = assert_cleaned_up(tb, &t, &dir, &logs);
        assert_eq!(rec["outcome"], "interrupted", "phase {phase}");
        let stages: Vec<(&str, &str)> = rec["stages"].as_array().unwrap().iter().map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap())).collect();
        assert!(stages.contains(&(phase, "interrupted")), "phase {phase}: {stages:?}");
        let names: Vec<&str> = stages.iter().map(|s| s.0).collect();
        assert!(names.ends_with(&["logs", "stop", "clean"]), "phase {phase}: cleanup did not run: {names:?}");
        if phase == "wait" || phase == "run" {
            assert!(!rec["job_ids"].as_array().unwrap().is_empty(), "phase {phase}: no job was recorded");
            for f in ["job.sh", "scontrol-show-job.txt"] {
                assert!(dir.join(f).is_file(), "phase {phase}: {f} not collected");
            }
        }
    }
}

#[test]
fn sigint_in_every_phase_cleans_up() {
    interrupt_every_phase(libc::SIGINT, 130, "tbf-sigint");
}

#[test]
fn sigterm_in_every_phase_cleans_up() {
    interrupt_every_phase(libc::SIGTERM, 143, "tbf-sigterm");
}

/// Ctrl-C (SIGINT to the whole process group, rsync and ssh included) while the 240 MB image
/// is on the wire: exit 130 at once, nothing half-installed, what arrived is kept, and the next
/// upload resumes from it and ends verified.
#[test]
fn ctrl_c_mid_upload_stops_the_transfer_and_the_next_upload_resumes() {
    let tb = testbed();
    let _shared = crate::fixture::shared();
    let t = Target::fresh("tbf-ctrlc-upload", |_| {});
    let mut r = Running::spawn(&t.deploy(&["n=10"]), &[]);
    wait_incoming(&mut r, &t, 30 << 20);
    let t0 = Instant::now();
    r.signal(libc::SIGINT, true);
    let done = r.finish();
    eprintln!("row 6: Ctrl-C mid-upload: exit {:?} after {:?}", done.code(), done.ended - t0);
    assert_eq!(done.code(), Some(130), "{}", done.stderr);
    let rec = assert_cleaned_up(tb, &t, &done.run_dir(), &[]);
    assert_eq!(failed_stage(&rec), "upload");
    assert_eq!(rec["outcome"], "interrupted");
    let kept = incoming_bytes(&t);
    assert!(kept >= 30 << 20, "the partial upload was not kept ({kept} bytes)");
    let up = run(&t.args(&["upload"]), &[]);
    assert_eq!(up.code(), Some(0), "{}", up.stderr);
    let sent = image_bytes_sent(&up.stderr).unwrap_or_else(|| panic!("no image sent:\n{}", up.stderr));
    let size = std::fs::metadata(root().join("target/xtask/images/daphne-bookworm.sif")).unwrap().len();
    assert!(sent < size - (20 << 20), "the upload did not resume: sent {sent} of {size} bytes");
    assert_upload_verified(&t);
}

// ---------------------------------------------------------------------------------------------
// Row 7: the ssh connection drops mid-upload
// ---------------------------------------------------------------------------------------------

/// The ControlMaster carrying the image upload is killed (the connection drops): the deploy
/// reconnects and resumes once on its own and succeeds, verified. When the connection drops
/// again during that retry, the deploy fails cleanly with a clear error, and the next `upload`
/// resumes from what arrived and ends verified.
#[test]
fn dropped_connection_mid_upload_is_resumed_and_verified() {
    let tb = testbed();
    let _shared = crate::fixture::shared();
    let size = std::fs::metadata(root().join("target/xtask/images/daphne-bookworm.sif")).unwrap().len();

    // One drop: resumed automatically.
    let t = Target::fresh("tbf-drop-once", |_| {});
    let mut r = Running::spawn(&t.deploy(&["n=10"]), &[]);
    wait_incoming(&mut r, &t, 30 << 20);
    let (_, master) = transfer_master(r.pid()).expect("no ControlMaster under the transfer");
    // SAFETY: kill(2) on the ControlMaster our xtask started.
    unsafe { libc::kill(master, libc::SIGKILL) };
    let done = r.finish();
    assert_eq!(done.code(), Some(0), "{}", done.stderr);
    assert!(done.stdout.lines().any(|l| l == "result: 385"), "{}", done.stdout);
    assert!(done.stderr.contains("the connection dropped while sending") && done.stderr.contains("resuming the upload once"), "{}", done.stderr);
    let sent = image_bytes_sent(&done.stderr).unwrap();
    assert!(sent < size - (20 << 20), "the retry did not resume: sent {sent} of {size} bytes");
    assert_upload_verified(&t);
    drop(t);

    // Two drops: a clean failure, then `upload` resumes.
    let t = Target::fresh("tbf-drop-twice", |_| {});
    let mut r = Running::spawn(&t.deploy(&["n=10"]), &[]);
    wait_incoming(&mut r, &t, 30 << 20);
    let (rsync1, master) = transfer_master(r.pid()).expect("no ControlMaster under the transfer");
    // SAFETY: as above.
    unsafe { libc::kill(master, libc::SIGKILL) };
    r.wait_for("resuming the upload once", Duration::from_secs(30));
    let first = incoming_bytes(&t);
    wait_incoming(&mut r, &t, first + (30 << 20));
    let (rsync2, master2) = transfer_master(r.pid()).expect("no ControlMaster under the retry");
    assert_ne!(rsync1, rsync2, "the retry runs a new transfer");
    // SAFETY: as above.
    unsafe { libc::kill(master2, libc::SIGKILL) };
    let done = r.finish();
    assert_eq!(done.code(), Some(1), "{}", done.stderr);
    let err = done.stderr.lines().rev().find(|l| l.starts_with("error: ")).unwrap();
    assert!(err.contains("the connection dropped while sending") && err.contains("the next upload resumes"), "{}", done.stderr);
    let rec = assert_cleaned_up(tb, &t, &done.run_dir(), &[]);
    assert_eq!(failed_stage(&rec), "upload");
    let kept = incoming_bytes(&t);
    assert!(kept > first, "the partial upload was not kept ({kept} bytes)");
    let up = run(&t.args(&["upload"]), &[]);
    assert_eq!(up.code(), Some(0), "{}", up.stderr);
    let sent = image_bytes_sent(&up.stderr).unwrap();
    assert!(sent <= size - kept + (1 << 20), "the upload did not resume from {kept} bytes: sent {sent} of {size}");
    assert_upload_verified(&t);
}

// ---------------------------------------------------------------------------------------------
// Row 8: the login host is unreachable
// ---------------------------------------------------------------------------------------------

#[test]
fn unreachable_login_host_fails_within_the_connect_timeout() {
    let tb = testbed();
    let _shared = crate::fixture::shared();
    let net = tb.get("LOGIN_ADDR").rsplit_once('.').unwrap().0.to_string();
    let bad = format!("{net}.99");
    let t = Target::new("tbf-unreachable", |t| {
        set(t, "reach.host", bad.as_str());
        set(t, "reach.connect_timeout", 2);
    });
    let done = run(&t.deploy(&["n=10"]), &[]);
    assert_eq!(done.code(), Some(1), "{}", done.stderr);
    let to_error = done.at("error: ") - done.at("==> upload");
    eprintln!("row 8: unreachable login host: error {to_error:?} after the upload began; exit {:?} after it", done.ended - done.at("==> upload"));
    assert!(to_error < Duration::from_secs(2 + 3), "no error within the connect timeout (2 s): {to_error:?}");
    let first = done.stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
    assert!(first.contains(&bad) && first.contains("unreachable"), "{}", done.stderr);
    assert!(done.stderr.contains("the connect timeout is 2s"), "{}", done.stderr);
    // Nothing started: no second connection attempt during cleanup, no job, no run directory.
    assert_eq!(done.stderr.matches("is unreachable").count(), 2, "the cleanup tried to connect again:\n{}", done.stderr);
    let rec = assert_cleaned_up(tb, &t, &done.run_dir(), &[]);
    assert_eq!(failed_stage(&rec), "upload");
    assert!(rec["job_ids"].as_array().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Row 9: SLURM rejects the job
// ---------------------------------------------------------------------------------------------

/// A partition that does not exist, and a time limit over the `short` partition's MaxTime
/// (EnforcePartLimits rejects it at submit). (The testbed has no accounting, so SLURM accepts
/// any `--account`; a bad account is rejected the same way on a cluster that enforces them.)
#[test]
fn job_rejected_by_slurm_shows_its_message() {
    let tb = testbed();
    let _shared = crate::fixture::shared();
    let cases: [(&str, &str, &str, &str); 2] = [
        ("tbf-bad-partition", "nosuch", "00:15:00", "invalid partition specified: nosuch"),
        ("tbf-over-maxtime", tb.get("SHORT_PARTITION"), "00:05:00", "Requested time limit is invalid"),
    ];
    for (name, partition, time, says) in cases {
        let t = Target::new(name, |t| {
            set(t, "schedule.slurm.partition", partition);
            set(t, "schedule.slurm.time", time);
        });
        let done = run(&t.deploy(&["n=10"]), &[]);
        assert_eq!(done.code(), Some(1), "{}", done.stderr);
        let first = done.stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
        assert!(first.contains("SLURM rejected the workers' job") && done.stderr.contains(says), "{name}: SLURM's message is not shown:\n{}", done.stderr);
        let dir = done.run_dir();
        let rec = assert_cleaned_up(tb, &t, &dir, &["job.sh".to_string()]);
        assert_eq!(failed_stage(&rec), "start");
        assert!(rec["job_ids"].as_array().unwrap().is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Row 10: the job pends past the configured limit
// ---------------------------------------------------------------------------------------------

#[test]
fn job_pending_past_the_limit_is_cancelled() {
    let tb = testbed();
    let _shared = crate::fixture::shared();
    let t = Target::new("tbf-pending", |t| {
        set(t, "schedule.slurm.pending_timeout", 3);
        set(t, "schedule.slurm.sbatch_args", toml::Value::Array(vec!["--begin=now+120".into()]));
    });
    let done = run(&t.deploy(&["n=10"]), &[]);
    assert_eq!(done.code(), Some(1), "{}", done.stderr);
    let pending = done.at("PENDING");
    let cancelled = done.at("error: wait:");
    eprintln!("row 10: pending -> cancelled after {:?}", cancelled - pending);
    let first = done.stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
    assert!(first.contains("stayed pending for more than 3s") && first.contains("BeginTime") && first.contains("cancelled"), "{}", done.stderr);
    assert!(cancelled - pending >= Duration::from_secs(2), "cancelled before the limit: {:?}", cancelled - pending);
    let rec = assert_cleaned_up(tb, &t, &done.run_dir(), &["job.sh".to_string()]);
    assert_eq!(failed_stage(&rec), "wait");
    let job = rec["job_ids"][0].as_str().unwrap();
    let state = text(&tb.on("login", &["scontrol", "show", "job", job]).stdout);
    assert!(state.contains("JobState=CANCELLED"), "{state}");
}

// ---------------------------------------------------------------------------------------------
// Row 12: the local disk fills up during packaging
// ---------------------------------------------------------------------------------------------

/// A tmpfs mounted for the test; unmounted on drop, also when the test panics.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "daphne-faults-full"]).arg(dir).status().unwrap();
        assert!(st.success(), "mount tmpfs on {} failed (the test needs root)", dir.display());
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Packaging into a full filesystem: a clear error naming the path, and no partial package,
/// both in the packages directory and for `package --out DIR`. The xtask runs on a project
/// root of its own (a copy of the sources; the root is derived from CARGO_MANIFEST_DIR) whose
/// `target/xtask/packages` is a 16 KiB tmpfs, smaller than the package.
#[test]
fn disk_full_while_packaging_leaves_no_partial_package() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("project");
    std::fs::create_dir_all(fake.join("xtask")).unwrap();
    for d in ["daphne-src", "deploy"] {
        let st = Command::new("cp").arg("-a").arg(root().join(d)).arg(&fake).status().unwrap();
        assert!(st.success());
    }
    let xtask = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).current_dir(&fake).env("CARGO_MANIFEST_DIR", fake.join("xtask")).stdin(Stdio::null()).output().unwrap();
        (out.status.code(), text(&out.stderr))
    };
    let (code, e) = xtask(&["build"]);
    assert_eq!(code, Some(0), "{e}");
    let packages = fake.join("target/xtask/packages");
    {
        let _full = Mount::tmpfs(&packages, "16k");
        let (code, e) = xtask(&["package"]);
        assert_eq!(code, Some(1), "{e}");
        let first = e.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{e}"));
        assert!(first.contains("the disk is full") && first.contains(packages.to_str().unwrap()), "unclear error:\n{e}");
        assert_eq!(files_under(&packages), Vec::<String>::new(), "a partial package was left");
        let runs = fake.join("target/xtask/runs");
        let rec = std::fs::read_dir(&runs).unwrap().flatten().map(|e| record(&e.path())).find(|r| r["command"] == "package").expect("the package run's record");
        assert_eq!(rec["outcome"], "failed");
        assert!(rec["error"].as_str().unwrap().contains("No space left on device"), "{rec:#}");
        assert_eq!(failed_stage(&rec), "package");
    }
    // With room in the packages directory, `--out` onto a full filesystem.
    let (code, e) = xtask(&["package"]);
    assert_eq!(code, Some(0), "{e}");
    let pkg = files_under(&packages).into_iter().find(|f| f.ends_with(".tar.zst")).unwrap();
    assert!(std::fs::metadata(packages.join(&pkg)).unwrap().len() > 16 << 10, "the package fits into 16 KiB; the test proves nothing");
    let out = fake.join("out");
    {
        let _full = Mount::tmpfs(&out, "16k");
        let (code, e) = xtask(&["package", "--out", out.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{e}");
        let first = e.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{e}"));
        assert!(first.contains(out.to_str().unwrap()) && first.contains("No space left on device"), "unclear error:\n{e}");
        assert_eq!(files_under(&out), Vec::<String>::new(), "a partial copy was left in {}", out.display());
    }
    // With room again, the same command writes the package, its checksum and its manifest.
    let (code, e) = xtask(&["package", "--out", out.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{e}");
    assert_eq!(files_under(&out), vec![pkg.clone(), format!("{pkg}.sha256"), "manifest.json".to_string()]);
}
