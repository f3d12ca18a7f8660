//! The `local` target end to end: real build, real package, real worker processes on real
//! sockets, the real coordinator. Asserts the exact result, the logs, and that no worker
//! process is left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn xtask() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(root()).env_remove("NO_COLOR").stdin(std::process::Stdio::null());
    c
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run_ok(args: &[&str]) -> Output {
    let out = xtask().args(args).output().unwrap();
    assert!(out.status.success(), "xtask {args:?} failed ({:?}):\n{}\n{}", out.status, text(&out.stdout), text(&out.stderr));
    out
}

/// The run directory the tool printed (`run directory: DIR`).
fn run_dir(stderr: &str) -> PathBuf {
    let line = stderr.lines().rev().find(|l| l.contains("run directory: ")).unwrap_or_else(|| panic!("no run directory in:\n{stderr}"));
    PathBuf::from(line.split("run directory: ").nth(1).unwrap().trim())
}

fn record(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap()
}

fn pids(rec: &serde_json::Value) -> Vec<i64> {
    rec["workers"].as_array().map(|ws| ws.iter().filter_map(|w| w["pid"].as_i64()).collect()).unwrap_or_default()
}

/// A PID that still names a live (non-zombie) process.
fn alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat[stat.rfind(')').unwrap() + 2..].chars().next(), Some('Z') | Some('X')),
        Err(_) => false,
    }
}

fn assert_no_worker_left(rec: &serde_json::Value) {
    for pid in pids(rec) {
        assert!(!alive(pid), "worker pid {pid} is still alive");
    }
}

#[test]
fn deploy_runs_the_whole_sweep_and_leaves_nothing_running() {
    let out = run_ok(&["deploy", "--workers", "3"]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    // sum of i^2 for i in 1..=1_000_000
    assert!(stdout.lines().any(|l| l == "result: 333333833333500000"), "stdout:\n{stdout}");
    let dir = run_dir(&stderr);
    let rec = record(&dir);
    assert_eq!(rec["outcome"], "succeeded");
    assert_eq!(rec["exit_code"], 0);
    let workers = rec["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3);
    // Every worker served a slice, and said so in the coordinator's output.
    for w in workers {
        let addr = format!("{}:{}", w["host"].as_str().unwrap(), w["port"]);
        assert!(stdout.contains(&format!("worker {addr} host=")), "no line for {addr}:\n{stdout}");
        let log = std::fs::read_to_string(w["stdout"].as_str().unwrap()).unwrap();
        assert!(log.contains(&format!("Started Distributed Worker on `{addr}`")), "worker log:\n{log}");
        assert!(log.contains("request from"), "worker log has no request:\n{log}");
        assert!(Path::new(w["stderr"].as_str().unwrap()).is_file());
        assert_eq!(w["state"], "stopped");
    }
    for f in ["coordinator.out", "coordinator.err", "peers", "build-daphne.log", "build-worker.log", "run.json"] {
        // The build logs exist unless the build was skipped as unchanged.
        if f.starts_with("build") && rec["stages"][1]["status"] == "skipped" {
            continue;
        }
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    assert_eq!(std::fs::read_to_string(dir.join("peers")).unwrap().lines().count(), 3);
    let stages: Vec<&str> = rec["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(stages, ["singularity", "build", "package", "upload", "start", "wait", "run", "logs", "stop", "clean"]);
    assert_no_worker_left(&rec);
}

#[test]
fn separate_invocations_share_one_deployment() {
    // Give this test its own target file so it cannot disturb a concurrent `deploy` test.
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("sep.toml");
    std::fs::write(&target, "[schedule]\nworkers = 2\n").unwrap();
    let t = target.to_str().unwrap();
    let common = ["--target", "sep-test", "--config", t];
    // Global flags go first: everything after the script is passed to it unchanged.
    let with = |cmd: &[&str]| -> Vec<String> { common.iter().chain(cmd.iter()).map(|s| s.to_string()).collect() };

    for step in [&["build"][..], &["package"], &["upload"]] {
        let a = with(step);
        run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let a = with(&["start"]);
    run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    // Stops the workers even when an assertion below panics.
    let guard = StopOnDrop(with(&["stop"]));
    {
        let a = with(&["wait"]);
        run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let a = with(&["status"]);
        let status = text(&run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>()).stdout);
        assert!(status.contains("2/2 workers up"), "{status}");
        // Two coordinator runs against the same workers, with different arguments.
        for (n, want) in [("1000", "result: 333833500"), ("10", "result: 385")] {
            let arg = format!("n={n}");
            let a = with(&["run", "deploy/examples/sum.daph", &arg]);
            let out = run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(text(&out.stdout).lines().any(|l| l == want), "{}", text(&out.stdout));
        }
        // The script can also come from stdin.
        let mut child = xtask()
            .args(with(&["run", "-", "n=3"]))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"print(sum(seq(1,3,1)^2));\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).lines().any(|l| l == "result: 14"), "{}", text(&out.stdout));
    }
    let stop = guard.stop();
    assert!(stop.status.success(), "stop failed: {}", text(&stop.stderr));
    let runs = root().join("target/xtask/runs");
    let rec = newest_record(&runs, "sep-test", "start");
    assert_no_worker_left(&rec);
    assert_eq!(rec["coordinator_runs"].as_array().unwrap().len(), 3);
    let rd = runs.join(rec["run_id"].as_str().unwrap());
    for f in ["coordinator.out", "coordinator-2.out", "coordinator-3.out", "script.daph", "worker-0.out", "worker-1.out"] {
        assert!(rd.join(f).is_file(), "{f} missing");
    }
}

/// Runs `xtask stop` when dropped, so a failing test leaves no worker behind.
struct StopOnDrop(Vec<String>);

impl StopOnDrop {
    fn stop(mut self) -> Output {
        let args = std::mem::take(&mut self.0);
        xtask().args(&args).output().unwrap()
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let _ = xtask().args(&self.0).output();
        }
    }
}

fn newest_record(runs: &Path, target: &str, command: &str) -> serde_json::Value {
    let mut recs: Vec<serde_json::Value> = std::fs::read_dir(runs)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("run.json")).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(|r| r["target"] == target && r["command"] == command)
        .collect();
    recs.sort_by_key(|r| r["run_id"].as_str().unwrap().to_string());
    recs.pop().expect("a run")
}

#[test]
fn a_failing_coordinator_sets_the_exit_code_and_still_cleans_up() {
    // `n=abc` makes the coordinator exit 1 after the workers are up.
    let out = xtask().args(["deploy", "deploy/examples/sum.daph", "n=abc"]).output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the coordinator exited with code 1"), "{stderr}");
    let dir = run_dir(&stderr);
    let rec = record(&dir);
    assert_eq!(rec["outcome"], "failed");
    assert_eq!(rec["coordinator_runs"][0]["exit_code"], 1);
    assert!(std::fs::read_to_string(dir.join("coordinator.err")).unwrap().contains("n"));
    for w in rec["workers"].as_array().unwrap() {
        assert!(Path::new(w["stdout"].as_str().unwrap()).is_file());
    }
    assert_no_worker_left(&rec);
}

#[test]
fn without_arguments_it_prints_help() {
    let out = run_ok(&[]);
    let s = text(&out.stdout);
    for sub in ["singularity", "build", "package", "upload", "start", "status", "wait", "run", "stop", "logs", "clean", "deploy"] {
        assert!(s.contains(&format!("  {sub} ")), "help lacks {sub}:\n{s}");
    }
}

#[test]
fn dry_run_touches_nothing() {
    let runs = root().join("target/xtask/runs");
    let before = std::fs::read_dir(&runs).map(|r| r.count()).unwrap_or(0);
    let out = run_ok(&["deploy", "--dry-run", "--target", "local"]);
    let s = text(&out.stdout);
    assert!(s.starts_with("plan `deploy` for target `local`"), "{s}");
    assert!(s.contains("DistributedWorker"), "{s}");
    let after = std::fs::read_dir(&runs).map(|r| r.count()).unwrap_or(0);
    // Other tests may add runs concurrently, but never fewer; a dry run adds none of its own.
    assert!(after >= before);
}

#[test]
fn config_errors_name_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[schedule]\nworkers = 0\n").unwrap();
    let out = xtask().args(["deploy", "--config", f.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = text(&out.stderr);
    assert!(e.contains("bad.toml:2:") && e.contains("schedule.workers") && e.contains("fix:"), "{e}");
}

/// SIGINT or SIGTERM in the middle of a deploy (held before `stage` by the fault hook): the
/// tool stops everything it started, keeps the logs, records the interruption and exits
/// 128+signal.
fn interrupted_deploy(sig: i32, want: i32, stage: &str) {
    use std::io::BufRead;
    let mut child = xtask()
        .args(["deploy", "--workers", "2"])
        .env("XTASK_HOLD_BEFORE", stage)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "deploy ended before holding at `{stage}`:\n{seen}");
        seen.push_str(&line);
        if line.contains(&format!("holding before `{stage}`")) {
            break;
        }
    }
    unsafe { libc::kill(child.id() as i32, sig) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    seen.push_str(&rest);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(want), "{seen}");
    let dir = run_dir(&seen);
    let rec = record(&dir);
    assert_eq!(rec["outcome"], "interrupted", "{rec}");
    assert_eq!(rec["exit_code"], want);
    let stages: Vec<&str> = rec["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert!(stages.ends_with(&["logs", "stop", "clean"]), "cleanup did not run: {stages:?}");
    let interrupted: Vec<&str> = rec["stages"].as_array().unwrap().iter().filter(|s| s["status"] == "interrupted").map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(interrupted, [stage], "{rec}");
    if matches!(stage, "wait" | "run") {
        assert_eq!(rec["workers"].as_array().unwrap().len(), 2, "workers were started");
        for w in rec["workers"].as_array().unwrap() {
            assert!(Path::new(w["stdout"].as_str().unwrap()).is_file(), "worker log missing");
        }
    }
    assert_no_worker_left(&rec);
}

#[test]
fn sigint_during_a_deploy_cleans_up_and_exits_130() {
    for stage in ["build", "package", "upload", "start", "wait", "run"] {
        interrupted_deploy(libc::SIGINT, 130, stage);
    }
}

#[test]
fn sigterm_during_a_deploy_cleans_up_and_exits_143() {
    for stage in ["build", "package", "upload", "start", "wait", "run"] {
        interrupted_deploy(libc::SIGTERM, 143, stage);
    }
}

#[test]
fn package_without_a_build_says_to_run_build() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("nobuild.toml");
    // A source tree the tool has never built: its build key has no complete build.
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(&f, format!("[source]\npath = \"{}\"\n", src.display())).unwrap();
    let out = xtask().args(["--target", "nobuild", "--config", f.to_str().unwrap(), "package"]).output().unwrap();
    let e = text(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("no complete build") && e.contains("cargo xtask build"), "{e}");
}

#[test]
fn payload_globs_that_match_nothing_warn_or_fail() {
    let dir = tempfile::tempdir().unwrap();
    let warn = dir.path().join("warn.toml");
    std::fs::write(&warn, "[payload]\nglobs = [\"deploy/examples/*.daph\", \"no/such/*.csv\"]\n").unwrap();
    let w = warn.to_str().unwrap();
    run_ok(&["--target", "globs", "--config", w, "build"]);
    let out = run_ok(&["--target", "globs", "--config", w, "package"]);
    assert!(text(&out.stderr).contains("warning: payload: `no/such/*.csv` matches no file"), "{}", text(&out.stderr));
    let fail = dir.path().join("fail.toml");
    std::fs::write(&fail, "[payload]\nglobs = [\"no/such/*.csv\"]\nrequire_match = true\n").unwrap();
    let out = xtask().args(["--target", "globs", "--config", fail.to_str().unwrap(), "package"]).output().unwrap();
    let e = text(&out.stderr);
    assert!(!out.status.success() && e.contains("matches no file") && e.contains("fix:"), "{e}");
}

#[test]
fn clean_refuses_a_running_deployment_and_prunes_unused_releases() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("clean.toml");
    let remote = dir.path().join("remote");
    std::fs::write(&f, format!("[reach]\nremote_dir = \"{}\"\n[schedule]\nworkers = 1\n", remote.display())).unwrap();
    let g = ["--target", "clean-test", "--config", f.to_str().unwrap()];
    let with = |cmd: &[&str]| -> Vec<String> { g.iter().chain(cmd).map(|s| s.to_string()).collect() };
    for step in [&["build"][..], &["package"], &["upload"]] {
        let a = with(step);
        run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    }
    // An unused release from an older package.
    let releases = remote.join("releases");
    std::fs::create_dir_all(releases.join("0000000000000000")).unwrap();
    let a = with(&["start"]);
    run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let guard = StopOnDrop(with(&["stop"]));
    let a = with(&["clean"]);
    let out = xtask().args(&a).output().unwrap();
    assert!(!out.status.success() && text(&out.stderr).contains("still deployed"), "{}", text(&out.stderr));
    let a = with(&["clean", "--all"]);
    let out = xtask().args(&a).output().unwrap();
    assert!(!out.status.success(), "clean --all must also refuse while deployed");
    guard.stop();
    let a = with(&["clean", "--all"]);
    run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let left: Vec<_> = std::fs::read_dir(&releases).unwrap().flatten().collect();
    assert!(left.is_empty(), "unused releases left: {left:?}");
}

#[test]
fn a_worker_failing_at_start_fails_the_wait_with_its_log_tail() {
    // Hold a port so the second worker cannot bind it.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().port();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("busy.toml");
    std::fs::write(&f, format!("[schedule]\nworkers = 2\nports = [{free}, {busy}]\nready_timeout = 30\n")).unwrap();
    let t0 = std::time::Instant::now();
    let out = xtask().args(["--target", "busy-port", "--config", f.to_str().unwrap(), "deploy"]).output().unwrap();
    let e = text(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(20), "did not fail fast: {:?}", t0.elapsed());
    assert!(e.contains(&format!("worker 1 (127.0.0.1:{busy}) exited before it was ready")), "{e}");
    assert!(e.contains("Address already in use") || e.contains("cannot listen"), "no log tail:\n{e}");
    let rec = record(&run_dir(&e));
    assert_eq!(rec["outcome"], "failed");
    assert_no_worker_left(&rec);
    drop(held);
}

/// The terminal or pipe goes away mid-deploy (ssh session dropped, CI log closed): writes
/// fail, but the run goes on and still stops its workers.
#[test]
fn closed_stdout_and_stderr_do_not_strand_workers() {
    use std::io::BufRead;
    let runs = root().join("target/xtask/runs");
    let before: std::collections::HashSet<PathBuf> = std::fs::read_dir(&runs).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    let go = tempfile::tempdir().unwrap();
    let go_file = go.path().join("go");
    let mut child = xtask()
        .args(["deploy", "--workers", "2"])
        .env("XTASK_HOLD_BEFORE", "run")
        .env("XTASK_HOLD_UNTIL", &go_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while !line.contains("holding before `run`") {
            line.clear();
            assert!(reader.read_line(&mut line).unwrap() > 0, "deploy ended early");
        }
        drop(child.stdout.take());
        // Both pipes close here, while the run is held.
    }
    std::fs::write(&go_file, b"go").unwrap();
    let status = child.wait().unwrap();
    let dir = std::fs::read_dir(&runs).unwrap().flatten().map(|e| e.path()).find(|p| !before.contains(p) && record(p)["workers"].as_array().is_some_and(|w| w.len() == 2)).expect("the run");
    let rec = record(&dir);
    let stages: Vec<&str> = rec["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert!(stages.ends_with(&["logs", "stop", "clean"]), "cleanup did not run: {stages:?} ({status:?})");
    assert_no_worker_left(&rec);
}
