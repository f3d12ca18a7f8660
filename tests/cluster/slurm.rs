//! Deploys to the real SLURM testbed: sbatch, srun steps on three nodes, workers in the
//! Apptainer image, the coordinator as a step of the same allocation, logs back, scancel.

use crate::fixture::{run_ok, testbed, text, xtask, Testbed, TARGET};
use std::path::{Path, PathBuf};
use std::process::Output;

fn run_dir(stderr: &str) -> PathBuf {
    let line = stderr.lines().rev().find(|l| l.contains("run directory: ")).unwrap_or_else(|| panic!("no run directory in:\n{stderr}"));
    PathBuf::from(line.split("run directory: ").nth(1).unwrap().trim())
}

fn record(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap()
}

fn deploy(extra: &[&str]) -> Output {
    let mut a = vec!["--target", TARGET, "deploy"];
    a.extend_from_slice(extra);
    xtask().args(&a).output().unwrap()
}

/// No job of `job` is left in SLURM's queue.
fn assert_job_gone(tb: &Testbed, job: &str) {
    let q = tb.on("login", &["squeue", "-h", "-j", job, "-o", "%T"]);
    let st = text(&q.stdout);
    assert!(st.trim().is_empty() || st.contains("COMPLETED") || st.contains("CANCELLED"), "job {job} still queued: {st}");
}

/// No process of `job` is left on any node: no process whose environment names the job.
fn assert_no_job_process(tb: &Testbed, job: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut left = vec![];
        for node in tb.get("NODES").split(',') {
            let ns = format!("{}{node}", tb.get("TB_PREFIX"));
            let pids = std::process::Command::new("ip").args(["netns", "pids", &ns]).output().unwrap();
            for pid in text(&pids.stdout).split_whitespace() {
                let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                if env.split(|b| *b == 0).any(|kv| kv == format!("SLURM_JOB_ID={job}").as_bytes()) {
                    left.push(format!("{node}:{pid}"));
                }
            }
        }
        if left.is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "processes of job {job} remain: {left:?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn deploy_on_three_nodes_with_two_workers_each() {
    let tb = testbed();
    // Alone on the testbed: the sshd log then counts only this deploy's handshakes.
    let _alone = crate::fixture::exclusive();
    let logins_before = tb.ssh_logins();
    let out = deploy(&["deploy/examples/sum.daph", "n=1000000"]);
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{o}\n{e}");
    assert!(o.lines().any(|l| l == "result: 333333833333500000"), "{o}");
    let dir = run_dir(&e);
    let rec = record(&dir);
    let peers: Vec<&str> = rec["peers"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert_eq!(peers.len(), 6, "{peers:?}");
    let mut distinct = peers.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 6, "peers not distinct: {peers:?}");
    let mut hosts: Vec<&str> = peers.iter().map(|p| p.split(':').next().unwrap()).collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts, ["node1", "node2", "node3"]);
    for t in 0..6 {
        let log = std::fs::read_to_string(dir.join(format!("worker-{t}.out"))).unwrap_or_else(|_| panic!("worker-{t}.out not collected"));
        assert!(log.contains("Started Distributed Worker on `"), "worker {t}: {log}");
        assert!(dir.join(format!("worker-{t}.err")).is_file());
    }
    for f in ["job.sh", "scontrol-show-job.txt", "sacct.txt", "coordinator.out", "peers"] {
        assert!(dir.join(f).is_file(), "{f} not in the run directory");
    }
    let job = rec["job_ids"][0].as_str().unwrap();
    assert_job_gone(tb, job);
    assert_no_job_process(tb, job);
    assert_eq!(rec["outcome"], "succeeded");
    // One ssh handshake for the whole deploy: everything else rides the ControlMaster.
    assert_eq!(tb.ssh_logins() - logins_before, 1, "ssh handshakes during one deploy");
}

#[test]
fn start_then_run_twice_then_stop() {
    let tb = testbed();
    let _shared = crate::fixture::shared();
    // Its own target name, so the current deployment is not shared with other tests.
    let cfg = crate::fixture::root().join(format!("target/xtask/targets/{TARGET}.toml"));
    let cfg = cfg.to_str().unwrap().to_string();
    let g = ["--target", "tb-separate", "--config", cfg.as_str()];
    let with = |cmd: &[&str]| -> Vec<String> { g.iter().chain(cmd).map(|s| s.to_string()).collect() };
    for step in [&["singularity"][..], &["build"], &["package"], &["upload"], &["start"]] {
        let a = with(step);
        run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let stop = with(&["stop"]);
    struct Stop(Vec<String>);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = xtask().args(&self.0).output();
        }
    }
    let guard = Stop(stop);
    let a = with(&["wait"]);
    run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let a = with(&["status"]);
    let st = text(&run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>()).stdout);
    assert!(st.contains("6 workers"), "{st}");
    for (n, want) in [("1000", "result: 333833500"), ("10", "result: 385")] {
        let arg = format!("n={n}");
        let a = with(&["run", "deploy/examples/sum.daph", &arg]);
        let out = run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(text(&out.stdout).lines().any(|l| l == want), "{}", text(&out.stdout));
    }
    let out = xtask().args(&guard.0).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rec = crate::fixture::newest_record("tb-separate", "start");
    let job = rec["job_ids"][0].as_str().unwrap().to_string();
    assert_job_gone(tb, &job);
    assert_no_job_process(tb, &job);
    assert_eq!(rec["coordinator_runs"].as_array().unwrap().len(), 2);
}

/// SIGINT or SIGTERM when `deploy` is held (fault hook) before `wait` or `run`, with the job
/// submitted: the job is cancelled, its processes are gone, the logs are collected.
fn interrupt(sig: i32, want: i32, after: &str) {
    let tb = testbed();
    let _shared = crate::fixture::shared();
    let mut child = xtask()
        .args(["--target", TARGET, "deploy", "deploy/examples/sum.daph", "n=1000"])
        .env("XTASK_HOLD_BEFORE", after)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read stderr until the stage we want to interrupt has begun.
    use std::io::BufRead;
    let stderr = child.stderr.take().unwrap();
    let mut reader = std::io::BufReader::new(stderr);
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("deploy ended before `{after}`:\n{seen}");
        }
        seen.push_str(&line);
        if line.contains(&format!("holding before `{after}`")) {
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
    assert_eq!(rec["outcome"], "interrupted");
    let stages: Vec<&str> = rec["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert!(stages.ends_with(&["logs", "stop", "clean"]), "{stages:?}");
    if let Some(job) = rec["job_ids"][0].as_str() {
        assert_job_gone(tb, job);
        assert_no_job_process(tb, job);
        assert!(dir.join("job.sh").is_file() && dir.join("scontrol-show-job.txt").is_file(), "logs not collected");
    }
}

#[test]
fn sigint_during_wait_cancels_the_job() {
    interrupt(libc::SIGINT, 130, "wait");
}

#[test]
fn sigterm_during_run_cancels_the_job() {
    interrupt(libc::SIGTERM, 143, "run");
}

#[test]
fn two_concurrent_deploys_both_succeed() {
    testbed();
    let _shared = crate::fixture::shared();
    let a = std::thread::spawn(|| deploy(&["deploy/examples/sum.daph", "n=2000"]));
    let b = std::thread::spawn(|| deploy(&["deploy/examples/sum.daph", "n=3000"]));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    for (out, want) in [(&a, "result: 2668667000"), (&b, "result: 9004500500")] {
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).lines().any(|l| l == want), "{}", text(&out.stdout));
    }
    let (da, db) = (run_dir(&text(&a.stderr)), run_dir(&text(&b.stderr)));
    assert_ne!(da, db);
    assert_ne!(record(&da)["job_ids"], record(&db)["job_ids"]);
}

/// A node crashes after the workers are up, just before the coordinator runs: the deploy
/// fails within 15 s naming the node, the survivors' logs are collected, and no job is left.
#[test]
fn a_node_crash_during_run_fails_fast_naming_the_node() {
    let tb = testbed();
    // Alone: crashing a node disturbs every job on it.
    let _alone = crate::fixture::exclusive();
    let go = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let go_path = go.to_path_buf();
    drop(go); // the file must not exist until the crash is done
    let mut child = xtask()
        .args(["--target", TARGET, "deploy", "deploy/examples/sum.daph", "n=1000"])
        .env("XTASK_HOLD_BEFORE", "run")
        .env("XTASK_HOLD_UNTIL", &go_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "deploy ended early:\n{seen}");
        seen.push_str(&line);
        if line.contains("holding before `run`") {
            break;
        }
    }
    tb.fault(&["crash", "node2"]);
    let t0 = std::time::Instant::now();
    std::fs::write(&go_path, b"go").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    seen.push_str(&rest);
    let status = child.wait().unwrap();
    let took = t0.elapsed();
    let _ = std::fs::remove_file(&go_path);
    // Bring the node back (slurmd and its sshd) for the other tests before asserting anything.
    tb.fault(&["restart-slurmd", "node2"]);
    tb.fault(&["restart-sshd", "node2"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let st = text(&tb.on("login", &["sinfo", "-h", "-n", "node2", "-o", "%T"]).stdout);
        if st.trim() == "idle" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(!status.success(), "{seen}");
    assert!(took < std::time::Duration::from_secs(15), "took {took:?} to fail:\n{seen}");
    assert!(seen.contains("node2"), "the failure does not name node2:\n{seen}");
    let dir = run_dir(&seen);
    let rec = record(&dir);
    assert_eq!(rec["outcome"], "failed");
    // Survivors' logs: the workers on node1 and node3 wrote theirs.
    let survivors = rec["workers"].as_array().unwrap().iter().filter(|w| w["host"] != "node2").count();
    assert_eq!(survivors, 4, "{rec}");
    for w in rec["workers"].as_array().unwrap().iter().filter(|w| w["host"] != "node2") {
        let log = std::fs::read_to_string(w["stdout"].as_str().unwrap()).unwrap_or_default();
        assert!(log.contains("Started Distributed Worker"), "survivor log missing: {w}");
    }
    let job = rec["job_ids"][0].as_str().unwrap();
    assert_job_gone(tb, job);
    assert_no_job_process(tb, job);
}

/// `--dist-backend MPI`: the job only holds the allocation and the coordinator's step launches
/// every rank with `srun --mpi`. The stand-in has no MPI, so each rank reports that and exits
/// 3; that every rank reported proves the launch (a real MPI DAPHNE is not testable here).
#[test]
fn mpi_backend_launches_every_rank_in_one_step() {
    testbed();
    let _shared = crate::fixture::shared();
    let cfg = crate::fixture::root().join(format!("target/xtask/targets/{TARGET}.toml"));
    let mut text_cfg = std::fs::read_to_string(&cfg).unwrap();
    text_cfg = text_cfg.replace("[schedule.slurm]\n", "[schedule.slurm]\nmpi = \"none\"\n");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mpi.toml");
    std::fs::write(&f, text_cfg).unwrap();
    let out = xtask().args(["--target", "tb-mpi", "--config", f.to_str().unwrap(), "--dist-backend", "MPI", "deploy", "deploy/examples/sum.daph", "n=10"]).output().unwrap();
    let e = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{e}");
    assert!(e.contains("--mpi=none") && e.contains("--ntasks=6") && e.contains("--dist_backend=MPI"), "{e}");
    assert_eq!(e.matches("built without MPI support").count(), 6, "every rank should report:\n{e}");
    let rec = crate::fixture::newest_record("tb-mpi", "deploy");
    assert_job_gone(testbed(), rec["job_ids"][0].as_str().unwrap());
}

/// `advertise = "interface:eth0"`: the peers are the nodes' addresses on that interface.
#[test]
fn workers_advertise_the_address_of_a_named_interface() {
    let tb = testbed();
    let _shared = crate::fixture::shared();
    let cfg = crate::fixture::root().join(format!("target/xtask/targets/{TARGET}.toml"));
    let text_cfg = std::fs::read_to_string(&cfg).unwrap().replace("[schedule]\n", "[schedule]\nadvertise = \"interface:eth0\"\n");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("iface.toml");
    std::fs::write(&f, text_cfg).unwrap();
    let out = xtask().args(["--target", "tb-iface", "--config", f.to_str().unwrap(), "deploy", "deploy/examples/sum.daph", "n=100"]).output().unwrap();
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{e}");
    assert!(o.lines().any(|l| l == "result: 338350"), "{o}");
    let rec = record(&run_dir(&e));
    let addrs: Vec<String> = tb.get("NODE_ADDRS").split(',').map(str::to_string).collect();
    for p in rec["peers"].as_array().unwrap() {
        let host = p.as_str().unwrap().split(':').next().unwrap();
        assert!(addrs.iter().any(|a| a == host), "peer {p} is not a node address ({addrs:?})");
    }
}
