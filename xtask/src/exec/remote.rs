//! The executor's steps on a remote target: upload, the SLURM job, the coordinator over
//! ssh, logs and cleanup. Every remote command goes through the run's one ssh session.

use super::{indent, CoordinatorFailed, Executor};
use crate::plan::{Arg, Var};
use crate::proc::{self, Echo};
use crate::runstate::{CoordinatorRecord, TargetState, WorkerRecord};
use crate::stages::coordinator::{Script, RUN_SCRIPT};
use crate::stages::slurm;
use crate::transfer::{self, Method};
use crate::ui;
use anyhow::{anyhow, bail, Context, Result};
use camino::Utf8Path;
use std::time::{Duration, Instant};

fn sinfo_argv(nodes: &str) -> Vec<String> {
    ["sinfo", "-h", "-N", "-n", nodes, "-o", "%N %T"].map(String::from).to_vec()
}

/// Parses `sinfo -N -o '%N %T'`: nodes that are down, failing or not responding (`*`).
/// A node in several partitions is listed once per partition; it is named once.
fn unhealthy(sinfo: &str) -> Vec<String> {
    let mut bad: Vec<String> = vec![];
    for (n, st) in sinfo.lines().filter_map(|l| l.split_once(' ')) {
        if (st.ends_with('*') || ["down", "drain", "fail", "failing", "unknown"].iter().any(|b| st.starts_with(b))) && !bad.iter().any(|b| b.split(' ').next() == Some(n)) {
            bad.push(format!("{n} ({st})"));
        }
    }
    bad
}

/// Watches the job's nodes while the coordinator runs (one `sinfo` a second over the
/// multiplexed ssh connection) and raises `abort` when one stops responding, so a dead
/// node fails the run within seconds instead of the coordinator's I/O timeout.
struct NodeWatch {
    abort: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    failed: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeWatch {
    fn start(probe: Vec<String>) -> NodeWatch {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let abort = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(None));
        let (a, d, f) = (Arc::clone(&abort), Arc::clone(&done), Arc::clone(&failed));
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                let out = std::os::unix::process::CommandExt::process_group(std::process::Command::new(&probe[0]).args(&probe[1..]).stdin(std::process::Stdio::null()), 0).output();
                if let Ok(out) = out {
                    let bad = unhealthy(&String::from_utf8_lossy(&out.stdout));
                    if !bad.is_empty() {
                        if let Ok(mut g) = f.lock() {
                            *g = Some(bad.join(", "));
                        }
                        a.store(true, Ordering::SeqCst);
                        return;
                    }
                }
                for _ in 0..10 {
                    if d.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        NodeWatch { abort, done, failed, thread: Some(thread) }
    }

    /// A watch that watches nothing (schedulers without node states).
    fn idle() -> NodeWatch {
        use std::sync::{atomic::AtomicBool, Arc, Mutex};
        NodeWatch { abort: Arc::new(AtomicBool::new(false)), done: Arc::new(AtomicBool::new(true)), failed: Arc::new(Mutex::new(None)), thread: None }
    }

    /// Stops watching; the failed node, if one failed.
    fn stop(mut self) -> Option<String> {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.failed.lock().ok().and_then(|g| g.clone())
    }
}

/// Runs an upload; when the connection drops mid-transfer, runs it once more, which resumes
/// from what already arrived in `.incoming/` (rsync --append-verify, or the stream from the
/// remote size) and verifies the whole file's sha256 as always. A second drop, or a pending
/// Ctrl-C, ends the upload with the (resumable) error.
fn resuming<T>(host: &str, mut upload: impl FnMut() -> Result<T>) -> Result<T> {
    match upload() {
        Err(e) if transfer::is_dropped(&e) && crate::signals::pending().is_none() => {
            let first = format!("{e:#}");
            ui::warn(first.lines().next().unwrap_or_default());
            ui::info(&format!("reconnecting to {host} and resuming the upload once"));
            std::thread::sleep(Duration::from_secs(1));
            crate::signals::check()?;
            upload()
        }
        r => r,
    }
}

fn sh(script: &str, args: &[&str]) -> Vec<String> {
    let mut a = vec!["sh".to_string(), "-c".into(), script.to_string(), "sh".into()];
    a.extend(args.iter().map(|s| s.to_string()));
    a
}

impl Executor<'_> {
    /// Hosts that receive uploads: the login host, plus every peer host for the ssh
    /// scheduler without a shared filesystem.
    fn upload_hosts(&self) -> Vec<String> {
        if self.cfg.scheduler == crate::config::Scheduler::Ssh {
            crate::stages::sshmode::upload_hosts(self.cfg)
        } else {
            vec![self.host()]
        }
    }

    pub(super) fn upload_image(&mut self) -> Result<()> {
        let sif = self.cfg.image.sif.clone();
        if !sif.is_file() {
            bail!("upload: the image {sif} does not exist\n  fix: run `cargo xtask singularity --target {}` first", self.cfg.target);
        }
        let hash = self.facts.definition.hash.clone();
        let remote_dir = self.cfg.remote_dir.clone();
        let mut last = None;
        for host in self.upload_hosts() {
            let mut bar = ui::ByteProgress::new(&format!("image to {host}"));
            let up = resuming(&host, || transfer::upload_image(self.session_for(&host)?, &sif, &hash, &remote_dir, Method::Auto, &mut |d, t| bar.update(d, t)))?;
            bar.finish();
            if up.skipped {
                ui::info(&format!("image {hash} is already on {host}; nothing sent"));
            } else {
                ui::info(&format!("sent the image ({}, {}) to {host} in {:.1}s ({})", ui::bytes(up.bytes_sent), up.method, up.seconds, ui::rate(up.bytes_sent, up.seconds)));
            }
            last = Some(up);
        }
        let up = last.ok_or_else(|| anyhow!("upload: no host to upload to"))?;
        self.vars.insert(Var::Image, up.remote_path.clone());
        self.run.record.image = Some(up.remote_path.clone());
        let mut st = TargetState::load(&self.cfg.root, &self.cfg.target);
        st.image = Some(up.remote_path);
        st.save(&self.cfg.root, &self.cfg.target)?;
        self.run.save()
    }

    pub(super) fn upload_release(&mut self) -> Result<()> {
        let pkg = self.resolve(&Arg::Var(Var::Package))?;
        let remote_dir = self.cfg.remote_dir.clone();
        let mut last = None;
        for host in self.upload_hosts() {
            let mut bar = ui::ByteProgress::new(&format!("package to {host}"));
            let up = resuming(&host, || transfer::upload_release(self.session_for(&host)?, Utf8Path::new(&pkg), &remote_dir, Method::Auto, &mut |d, t| bar.update(d, t)))?;
            bar.finish();
            if up.skipped {
                ui::info(&format!("release {} is already complete on {host}; 0 payload bytes sent", up.remote_path));
            } else {
                ui::info(&format!("sent {} by {} to {host} in {:.1}s ({}); installed {}", ui::bytes(up.bytes_sent), up.method, up.seconds, ui::rate(up.bytes_sent, up.seconds), up.remote_path));
            }
            self.run.record.upload_bytes += up.bytes_sent;
            last = Some(up);
        }
        let up = last.ok_or_else(|| anyhow!("upload: no host to upload to"))?;
        self.vars.insert(Var::Release, up.remote_path.clone());
        self.run.record.release = Some(up.remote_path.clone());
        let mut st = TargetState::load(&self.cfg.root, &self.cfg.target);
        st.release = Some(up.remote_path);
        st.save(&self.cfg.root, &self.cfg.target)?;
        self.run.save()
    }

    pub(super) fn submit_job(&mut self) -> Result<()> {
        let release = self.resolve(&Arg::Var(Var::Release))?;
        let image = if self.facts.runtime_bin.is_some() { Some(self.resolve(&Arg::Var(Var::Image))?) } else { None };
        let run_id = self.run.id().to_string();
        let remote_dir = self.cfg.remote_dir.clone();
        let run_dir = transfer::make_run_dir(self.session()?, &remote_dir, &run_id)?;
        self.vars.insert(Var::RemoteRunDir, run_dir.clone());
        self.run.record.remote_run_dir = Some(run_dir.clone());
        self.run.record.image = image.clone();
        self.run.record.release = Some(release.clone());
        let script = slurm::batch_script(self.cfg, self.facts, &run_id, &release, image.as_deref());
        std::fs::write(self.run.path("job.sh"), &script)?;
        self.session()?.write_file(&format!("{run_dir}/job.sh"), script.as_bytes(), 0o700)?;
        let argv = slurm::sbatch_argv(self.cfg, &run_id, &run_dir);
        ui::cmd(&format!("on {}: {}", self.host(), crate::quote::display(&crate::secrets::redact_argv(&argv))));
        self.run.record.sbatch = argv.clone();
        let out = self.session()?.output(&argv, None)?;
        if !out.status.success() {
            self.run.save()?;
            bail!(
                "start: SLURM rejected the workers' job: {}\n  fix: check partition, account, qos, time and nodes under [schedule.slurm] against `sinfo` on {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                self.host()
            );
        }
        let job = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or("").to_string();
        if job.is_empty() || !job.chars().all(|c| c.is_ascii_digit()) {
            bail!("start: sbatch printed no job id: {}", String::from_utf8_lossy(&out.stdout));
        }
        ui::info(&format!("submitted job {job}"));
        self.vars.insert(Var::JobId, job.clone());
        self.run.record.job_ids.push(job);
        self.run.save()
    }

    fn job(&self) -> Result<String> {
        self.vars.get(&Var::JobId).cloned().ok_or_else(|| anyhow!("no SLURM job is recorded for this run\n  fix: run `cargo xtask start --target {}` first", self.cfg.target))
    }

    fn remote_run_dir(&self) -> Result<String> {
        self.vars.get(&Var::RemoteRunDir).cloned().ok_or_else(|| anyhow!("this run has no directory on the target yet"))
    }

    fn poll(&mut self) -> Result<slurm::Poll> {
        let (dir, job) = (self.remote_run_dir()?, self.job()?);
        let out = self.session()?.run(&sh(slurm::POLL_SCRIPT, &[&dir, &job]))?;
        Ok(slurm::parse_poll(&out))
    }

    /// Down or unresponsive nodes among `nodes` (SLURM's hostlist syntax).
    fn bad_nodes(&mut self, nodes: &str) -> Result<Vec<String>> {
        if nodes.is_empty() || nodes == "(null)" {
            return Ok(vec![]);
        }
        let out = self.session()?.run(&sinfo_argv(nodes))?;
        Ok(unhealthy(&out))
    }

    fn log_tails(&mut self, tasks: &[usize]) -> String {
        let Ok(dir) = self.remote_run_dir() else { return String::new() };
        let mut args = vec![dir];
        args.extend(tasks.iter().map(|t| t.to_string()));
        let script = r#"cd "$1" || exit 0; shift; for t in "$@"; do for f in "worker-$t.err" "worker-$t.out"; do [ -s "$f" ] && { echo "--- $f"; tail -n 5 "$f"; }; done; done; [ -s job.out ] && { echo "--- job.out"; tail -n 5 job.out; }; exit 0"#;
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        match self.session().and_then(|s| s.run(&sh(script, &a))) {
            Ok(t) => t.lines().map(|l| format!("    | {l}")).collect::<Vec<_>>().join("\n"),
            Err(e) => format!("    (could not read the logs: {e})"),
        }
    }

    pub(super) fn wait_job(&mut self, timeout: Duration, pending_timeout: Duration) -> Result<()> {
        let total = self.cfg.workers;
        let job = self.job()?;
        let start = Instant::now();
        let mut running_since: Option<Instant> = None;
        let mut shown = usize::MAX;
        let mut last_state = String::new();
        loop {
            self.check_signal()?;
            let p = self.poll()?;
            self.run.record.job_state = Some(p.state.clone());
            if p.state != last_state {
                ui::info(&format!("job {job}: {}{}", p.state, if p.reason.is_empty() || p.reason == "None" { String::new() } else { format!(" ({})", p.reason) }));
                last_state = p.state.clone();
            }
            if slurm::is_terminal(&p.state) {
                let missing: Vec<usize> = (0..total).filter(|t| !p.ready.contains(t)).collect();
                let tails = self.log_tails(&missing);
                let bad = self.bad_nodes(&p.nodes).unwrap_or_default();
                self.run.save()?;
                bail!(
                    "wait: the workers' job {job} ended ({}) before all workers were ready{}; {}/{total} ready\n{tails}",
                    if p.state.is_empty() { "gone".into() } else { p.state.clone() },
                    if bad.is_empty() { String::new() } else { format!("; node {} failed", bad.join(", ")) },
                    p.ready.len()
                );
            }
            if p.state == "PENDING" && start.elapsed() > pending_timeout {
                let _ = self.session()?.run(&["scancel".into(), job.clone()]);
                self.run.save()?;
                bail!(
                    "wait: job {job} stayed pending for more than {}s (reason: {}); it was cancelled\n  fix: raise `pending_timeout`, or ask for fewer nodes or a shorter `time` under [schedule.slurm]",
                    pending_timeout.as_secs(),
                    p.reason
                );
            }
            if p.state == "RUNNING" && slurm::is_mpi(self.cfg) {
                let nodes = p.nodes.clone();
                self.run.record.nodes = vec![nodes.clone()];
                ui::info(&format!("allocation running on {nodes}; the MPI ranks start with `run`"));
                return self.run.save();
            }
            if p.state == "RUNNING" {
                let since = *running_since.get_or_insert_with(Instant::now);
                let bad = self.bad_nodes(&p.nodes)?;
                if !bad.is_empty() {
                    let missing: Vec<usize> = (0..total).filter(|t| !p.ready.contains(t)).collect();
                    let tails = self.log_tails(&missing);
                    bail!("wait: node {} failed while the workers were starting (job {job})\n{tails}", bad.join(", "));
                }
                let n = p.ready.len();
                if n != shown {
                    ui::progress("ready", n, total, start.elapsed().as_secs_f64());
                    shown = n;
                }
                if n >= total && p.peers.len() >= total {
                    self.record_peers(&p);
                    // A Started line in a log does not prove the worker still lives: its node
                    // may have died since (it stays "responding" for seconds). The gate is what
                    // the coordinator needs, as locally: every worker accepts a connection,
                    // probed from inside the allocation.
                    match self.unreachable_workers() {
                        Ok(gone) if !gone.is_empty() => {
                            let mut hosts: Vec<&str> = gone.iter().map(|g| g.split(' ').next().unwrap_or(g)).collect();
                            hosts.sort_unstable();
                            hosts.dedup();
                            let tasks: Vec<usize> = p.peers.iter().filter(|(_, a)| gone.iter().any(|g| g.contains(&format!("({a})")))).map(|(t, _)| *t).collect();
                            let bad = self.bad_nodes(&p.nodes).unwrap_or_default();
                            let tails = self.log_tails(&tasks);
                            self.run.save()?;
                            bail!(
                                "wait: the workers on {} printed their Started line but no longer accept connections ({}): the node failed, lost its network, or the workers died (probed from inside job {job}){}\n{tails}",
                                hosts.join(", "),
                                gone.join(", "),
                                if bad.is_empty() { String::new() } else { format!("; SLURM: node {} not healthy", bad.join(", ")) }
                            );
                        }
                        Ok(_) => {}
                        Err(e) => ui::warn(&format!("wait: could not probe the workers from inside job {job} ({}); going by their logs", format!("{e:#}").lines().next().unwrap_or_default())),
                    }
                    return self.run.save();
                }
                if since.elapsed() > timeout {
                    let missing: Vec<usize> = (0..total).filter(|t| !p.ready.contains(t)).collect();
                    let names: Vec<String> = missing
                        .iter()
                        .map(|t| p.peers.iter().find(|(pt, _)| pt == t).map(|(_, a)| format!("task {t} ({a})")).unwrap_or_else(|| format!("task {t} (no address yet)")))
                        .collect();
                    let tails = self.log_tails(&missing);
                    self.run.save()?;
                    bail!(
                        "wait: {n}/{total} workers ready after {}s; not ready: {}\n{tails}\n  fix: check the logs above; raise `ready_timeout` under [schedule] if the workers are just slow",
                        timeout.as_secs(),
                        names.join(", ")
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn record_peers(&mut self, p: &slurm::Poll) {
        self.run.record.workers = p
            .peers
            .iter()
            .map(|(t, addr)| {
                let (host, port) = addr.rsplit_once(':').unwrap_or((addr.as_str(), "0"));
                WorkerRecord {
                    index: *t,
                    host: host.into(),
                    port: port.parse().unwrap_or(0),
                    pid: None,
                    start_ticks: None,
                    stdout: self.run.path(&format!("worker-{t}.out")).to_string(),
                    stderr: self.run.path(&format!("worker-{t}.err")).to_string(),
                    state: "ready".into(),
                    exit_code: None,
                }
            })
            .collect();
        let mut nodes: Vec<String> = self.run.record.workers.iter().map(|w| w.host.clone()).collect();
        nodes.sort();
        nodes.dedup();
        self.run.record.nodes = nodes;
        let peers: Vec<String> = p.peers.iter().map(|(_, a)| a.clone()).collect();
        self.vars.insert(Var::Peers, peers.join(","));
        self.run.record.peers = peers;
    }

    pub(super) fn remote_coordinator(&mut self, argv: &[Arg]) -> Result<()> {
        if self.run.record.peers.is_empty() && !slurm::is_mpi(self.cfg) {
            bail!("run: no workers are ready for target `{}`\n  fix: run `cargo xtask start` and `cargo xtask wait` first", self.cfg.target);
        }
        let dir = self.remote_run_dir()?;
        let bytes = match &self.script {
            Some(Script::Local(p)) => Some(std::fs::read(p).with_context(|| format!("run: cannot read {p}"))?),
            Some(Script::Stdin(b)) => Some(b.clone()),
            _ => None,
        };
        if let Some(b) = bytes {
            let n = self.run.record.coordinator_runs.len();
            let name = if n == 0 { RUN_SCRIPT.to_string() } else { format!("script-{}.daph", n + 1) };
            std::fs::write(self.run.path(&name), &b)?;
            let remote = format!("{dir}/{name}");
            self.session()?.write_file(&remote, &b, 0o600)?;
            self.vars.insert(Var::Script, remote);
        }
        let remote: Vec<String> = argv.iter().map(|a| self.resolve(a)).collect::<Result<_>>()?;
        // The coordinator runs in the remote run directory, where relative paths resolve.
        let mut in_dir = vec!["sh".to_string(), "-c".into(), "cd \"$1\" && shift && exec \"$@\"".into(), "sh".into(), dir];
        in_dir.extend(remote.iter().cloned());
        let full = self.session()?.argv(&in_dir)?;
        ui::cmd(&format!("on {}: {}", self.host(), crate::quote::display(&crate::secrets::redact_argv(&remote))));
        let mut c = std::process::Command::new(&full[0]);
        c.args(&full[1..]);
        let n = self.run.record.coordinator_runs.len();
        let stem = if n == 0 { "coordinator".to_string() } else { format!("coordinator-{}", n + 1) };
        let out = self.run.path(&format!("{stem}.out"));
        let err = self.run.path(&format!("{stem}.err"));
        let slurm = self.cfg.scheduler == crate::config::Scheduler::Slurm && !slurm::is_mpi(self.cfg);
        let nodes = self.run.record.nodes.join(",");
        let watch = if slurm { NodeWatch::start(self.session()?.argv(&sinfo_argv(&nodes))?) } else { NodeWatch::idle() };
        let result = proc::run_logged_with(c, &out, &err, Echo::Stream, None, None, Some(&watch.abort));
        let failed_node = watch.stop();
        let (code, secs) = match &result {
            Ok(f) => (Some(f.code), f.elapsed.as_secs_f64()),
            Err(_) => (None, 0.0),
        };
        self.run.record.coordinator_runs.push(CoordinatorRecord { argv: crate::secrets::redact_argv(&remote), exit_code: code, seconds: secs, stdout: out.to_string(), stderr: err.to_string() });
        self.run.save()?;
        let done = result?;
        if let Some(node) = failed_node {
            bail!("run: node {node} failed during the run; the coordinator was stopped after {secs:.1}s\n  its output: {out} and {err}");
        }
        if done.code != 0 && !slurm {
            ui::error(&format!("the coordinator exited with code {}; its output: {out} and {err}", done.code));
            return Err(CoordinatorFailed(done.code).into());
        }
        if done.code != 0 {
            let p = self.poll().ok();
            let mut bad = p.as_ref().map(|p| self.bad_nodes(&p.nodes).unwrap_or_default()).unwrap_or_default();
            if bad.is_empty() {
                bad = self.unreachable_workers().unwrap_or_default();
            }
            if !bad.is_empty() {
                self.run.record.error = Some(format!("node failure: {}", bad.join(", ")));
                self.run.save()?;
                bail!(
                    "run: the coordinator failed (exit code {}) because workers are gone: {}; the node failed or lost its network\n  its output: {out} and {err}",
                    done.code,
                    bad.join(", ")
                );
            }
            ui::error(&format!("the coordinator exited with code {}; its output: {out} and {err}", done.code));
            return Err(CoordinatorFailed(done.code).into());
        }
        Ok(())
    }

    /// Which workers no longer accept connections, probed from inside the allocation (compute
    /// nodes reach each other even where the login host cannot reach them).
    fn unreachable_workers(&mut self) -> Result<Vec<String>> {
        let job = self.job()?;
        // In parallel, so dead peers cost one timeout, not one each; addresses stay arguments.
        let probe = r#"for a in "$@"; do (timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' probe "${a%:*}" "${a##*:}" 2>/dev/null || echo "$a") & done; wait; exit 0"#;
        let mut argv: Vec<String> = ["srun", &format!("--jobid={job}"), "--overlap", "--nodes=1", "--ntasks=1", "--quiet", "bash", "-c", probe, "probe"].map(String::from).to_vec();
        argv.extend(self.run.record.peers.iter().cloned());
        let out = self.session()?.run(&argv)?;
        Ok(out.lines().filter(|l| !l.trim().is_empty()).map(|a| format!("{} ({a})", a.rsplit_once(':').map_or(a, |(h, _)| h))).collect())
    }

    pub(super) fn cancel_job(&mut self) -> Result<()> {
        let Ok(job) = self.job() else {
            ui::info("no job to cancel");
            return Ok(());
        };
        let host = self.host();
        self.session()?.run(&["scancel".into(), job.clone()]).with_context(|| format!("stop: scancel {job} on {host} failed"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = self.session()?.run(&sh("squeue -h -j \"$1\" -o %T 2>/dev/null; exit 0", &[&job]))?;
            let st = st.trim().to_string();
            if st.is_empty() || slurm::is_terminal(&st) {
                break;
            }
            if Instant::now() > deadline {
                bail!("stop: job {job} is still {st} 30s after scancel\n  fix: check `squeue -j {job}` on {host}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for w in &mut self.run.record.workers {
            w.state = "stopped".into();
        }
        ui::info(&format!("cancelled job {job}"));
        self.run.save()
    }

    pub(super) fn collect_remote_logs(&mut self) -> Result<()> {
        let (Ok(dir), Ok(job)) = (self.remote_run_dir(), self.job()) else {
            ui::info("nothing ran on the target; no logs to collect");
            return self.run.save();
        };
        self.session()?.run(&sh(slurm::RECORDS_SCRIPT, &[&dir, &job]))?;
        let local = self.run.dir.clone();
        let bytes = transfer::fetch_dir(self.session()?, &dir, &local)?;
        let peers = self.run.record.peers.join("\n");
        if !peers.is_empty() {
            std::fs::write(self.run.path("peers"), peers + "\n")?;
        }
        ui::info(&format!("collected {bytes} bytes of logs into {}", self.run.dir));
        let _ = indent(&[]);
        self.run.save()
    }
}

impl Executor<'_> {
    /// `status` on SLURM: the job's state and every worker, up (ready) or down.
    pub fn remote_status(&mut self) -> Result<()> {
        let job = self.job()?;
        let p = self.poll()?;
        let bad = self.bad_nodes(&p.nodes).unwrap_or_default();
        crate::out!("run {} (target {}): job {job} {}{}", self.run.id(), self.cfg.target, p.state, if p.nodes.is_empty() { String::new() } else { format!(" on {}", p.nodes) });
        let running = p.state == "RUNNING";
        for (t, addr) in &p.peers {
            let host = addr.split(':').next().unwrap_or("");
            let node_bad = bad.iter().any(|b| b.split(' ').next() == Some(host));
            let state = if running && p.ready.contains(t) && !node_bad { "up" } else if running && !node_bad { "starting" } else { "down" };
            crate::out!("  worker {t:>3}  {addr:<22} {state}");
        }
        for b in &bad {
            crate::out!("  node {b} is not healthy");
        }
        let up = if running { p.ready.len() } else { 0 };
        crate::out!("{up}/{} workers up", self.cfg.workers);
        Ok(())
    }
}
