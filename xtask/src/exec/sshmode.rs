//! The executor's steps for the SSH-only scheduler: workers started over ssh as their own
//! process groups, readiness from their logs, stop by process group, logs from every host.

use super::Executor;
use crate::plan::{Arg, Var};
use crate::runstate::WorkerRecord;
use crate::ssh::Session;
use crate::stages::sshmode;
use crate::ui;
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn sh(script: &str, args: &[String]) -> Vec<String> {
    let mut a = vec!["sh".to_string(), "-c".into(), script.to_string(), "sh".into()];
    a.extend(args.iter().cloned());
    a
}

impl Executor<'_> {
    /// The session to `host`: the login host's, or one per peer host (one handshake each).
    pub(super) fn session_for(&mut self, host: &str) -> Result<&Session> {
        let login = self.cfg.ssh.as_ref().map(|s| s.host.clone()).unwrap_or_default();
        if host == login {
            return self.session();
        }
        if !self.peer_sessions.contains_key(host) {
            let mut cfg = self.cfg.ssh.clone().ok_or_else(|| anyhow!("target `{}` has no ssh settings under [reach]", self.cfg.target))?;
            cfg.host = host.to_string();
            self.peer_sessions.insert(host.to_string(), Session::new(&cfg)?);
        }
        Ok(&self.peer_sessions[host])
    }

    fn ensure_run_dir(&mut self, host: &str) -> Result<String> {
        let remote_dir = self.cfg.remote_dir.clone();
        let id = self.run.id().to_string();
        let dir = crate::transfer::make_run_dir(self.session_for(host)?, &remote_dir, &id)?;
        if self.vars.get(&Var::RemoteRunDir).is_none() {
            self.vars.insert(Var::RemoteRunDir, dir.clone());
            self.run.record.remote_run_dir = Some(dir.clone());
        }
        Ok(dir)
    }

    pub(super) fn ssh_worker(&mut self, index: usize, host: &str, argv: &[Arg]) -> Result<()> {
        if index == 0 {
            let login = self.cfg.ssh.as_ref().map(|s| s.host.clone()).unwrap_or_default();
            self.ensure_run_dir(&login)?;
        }
        let dir = self.ensure_run_dir(host)?;
        let argv: Vec<String> = argv.iter().map(|a| self.resolve(a)).collect::<Result<_>>()?;
        let mut args = vec![dir, index.to_string()];
        args.extend(argv.iter().cloned());
        ui::cmd(&format!("on {host}: setsid {} &", crate::quote::display(&argv)));
        let out = self.session_for(host)?.run(&sh(sshmode::START_SCRIPT, &args))?;
        let pid: i32 = out.trim().parse().map_err(|_| anyhow!("start: worker {index} on {host} did not report a PID: {out}"))?;
        let addr = argv.last().cloned().unwrap_or_default();
        let (h, port) = addr.rsplit_once(':').unwrap_or((host, "0"));
        self.run.record.workers.push(WorkerRecord {
            index,
            host: h.to_string(),
            port: port.parse().unwrap_or(0),
            pid: Some(pid),
            start_ticks: None,
            stdout: self.run.path(&format!("worker-{index}.out")).to_string(),
            stderr: self.run.path(&format!("worker-{index}.err")).to_string(),
            state: "starting".into(),
            exit_code: None,
        });
        if !self.run.record.nodes.contains(&host.to_string()) {
            self.run.record.nodes.push(host.to_string());
        }
        let peers: Vec<String> = self.run.record.workers.iter().map(WorkerRecord::addr).collect();
        self.vars.insert(Var::Peers, peers.join(","));
        self.run.record.peers = peers;
        self.run.save()
    }

    /// The recorded workers, grouped by the host they run on: host -> [(index, pid)].
    fn workers_by_host(&self) -> BTreeMap<String, Vec<(usize, i32)>> {
        let mut m: BTreeMap<String, Vec<(usize, i32)>> = BTreeMap::new();
        for (k, w) in self.run.record.workers.iter().enumerate() {
            let host = self.cfg.peers.get(w.index).map(|p| p.host.clone()).unwrap_or_else(|| w.host.clone());
            if let Some(pid) = w.pid {
                m.entry(host).or_default().push((k, pid));
            }
        }
        m
    }

    fn poll_ssh(&mut self) -> Result<(Vec<usize>, Vec<usize>)> {
        let dir = self.remote_dir_or_err()?;
        let (mut ready, mut dead) = (vec![], vec![]);
        for (host, ws) in self.workers_by_host() {
            let mut args = vec![dir.clone()];
            for (k, pid) in &ws {
                args.extend([self.run.record.workers[*k].index.to_string(), pid.to_string()]);
            }
            let out = self.session_for(&host)?.run(&sh(sshmode::POLL_SCRIPT, &args))?;
            for l in out.lines() {
                match l.split_once(' ') {
                    Some(("ready", k)) => ready.extend(k.trim().parse::<usize>()),
                    Some(("dead", k)) => dead.extend(k.trim().parse::<usize>()),
                    _ => {}
                }
            }
        }
        Ok((ready, dead))
    }

    fn remote_dir_or_err(&self) -> Result<String> {
        self.vars.get(&Var::RemoteRunDir).cloned().ok_or_else(|| anyhow!("this run has no directory on the target yet\n  fix: run `cargo xtask start --target {}` first", self.cfg.target))
    }

    fn tail_on(&mut self, index: usize) -> String {
        let Ok(dir) = self.remote_dir_or_err() else { return String::new() };
        let host = self.cfg.peers.get(index).map(|p| p.host.clone()).unwrap_or_default();
        let script = r#"cd "$1" 2>/dev/null || exit 0; for f in "worker-$2.err" "worker-$2.out"; do [ -s "$f" ] && { echo "--- $f"; tail -n 5 "$f"; }; done; exit 0"#;
        match self.session_for(&host).and_then(|s| s.run(&sh(script, &[dir, index.to_string()]))) {
            Ok(t) => t.lines().map(|l| format!("    | {l}")).collect::<Vec<_>>().join("\n"),
            Err(e) => format!("    (cannot read its log on {host}: {e})"),
        }
    }

    pub(super) fn wait_ssh(&mut self, timeout: Duration) -> Result<()> {
        let total = self.run.record.workers.len();
        if total == 0 {
            bail!("wait: this run has no workers\n  fix: run `cargo xtask start --target {}` first", self.cfg.target);
        }
        let start = Instant::now();
        let mut shown = usize::MAX;
        loop {
            self.check_signal()?;
            let (ready, dead) = self.poll_ssh()?;
            if let Some(&k) = dead.iter().find(|k| !ready.contains(k)) {
                let w = self.run.record.workers.iter().find(|w| w.index == k).map(WorkerRecord::addr).unwrap_or_default();
                let tail = self.tail_on(k);
                self.run.save()?;
                bail!("wait: worker {k} ({w}) exited before it was ready; last lines of its log:\n{tail}");
            }
            let n = ready.len();
            if n != shown {
                ui::progress("ready", n, total, start.elapsed().as_secs_f64());
                shown = n;
            }
            if n >= total {
                for w in &mut self.run.record.workers {
                    w.state = "ready".into();
                }
                return self.run.save();
            }
            if start.elapsed() > timeout {
                let missing: Vec<usize> = (0..total).filter(|k| !ready.contains(k)).collect();
                let mut msg = format!("wait: {n}/{total} workers ready after {}s; not ready:", timeout.as_secs());
                for k in missing {
                    let addr = self.run.record.workers.iter().find(|w| w.index == k).map(WorkerRecord::addr).unwrap_or_default();
                    let tail = self.tail_on(k);
                    msg.push_str(&format!("\n  worker {k} ({addr}):\n{tail}"));
                }
                self.run.save()?;
                bail!("{msg}\n  fix: check the logs above; raise `ready_timeout` under [schedule] if the workers are just slow");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub(super) fn stop_ssh(&mut self) -> Result<()> {
        let mut left = vec![];
        for (host, ws) in self.workers_by_host() {
            let mut args = vec![];
            for (k, pid) in &ws {
                args.extend([self.run.record.workers[*k].index.to_string(), pid.to_string()]);
            }
            let out = self.session_for(&host)?.run(&sh(sshmode::STOP_SCRIPT, &args))?;
            for l in out.lines() {
                if let Some(k) = l.strip_prefix("left ") {
                    left.push(format!("worker {k} on {host}"));
                }
            }
        }
        for w in &mut self.run.record.workers {
            w.state = "stopped".into();
        }
        self.run.save()?;
        if !left.is_empty() {
            bail!("stop: could not stop {}\n  fix: kill their process groups by hand (PIDs in run.json)", left.join(", "));
        }
        ui::info(&format!("stopped {} workers", self.run.record.workers.len()));
        Ok(())
    }

    /// Logs from every host that ran a worker (and the login host).
    pub(super) fn collect_ssh_logs(&mut self) -> Result<()> {
        let Ok(dir) = self.remote_dir_or_err() else {
            ui::info("nothing ran on the target; no logs to collect");
            return self.run.save();
        };
        let mut hosts = sshmode::upload_hosts(self.cfg);
        if self.cfg.shared_fs {
            hosts.truncate(1);
        }
        let local = self.run.dir.clone();
        let mut bytes = 0;
        for h in hosts {
            bytes += crate::transfer::fetch_dir(self.session_for(&h)?, &dir, &local)?;
        }
        let peers = self.run.record.peers.join("\n");
        if !peers.is_empty() {
            std::fs::write(self.run.path("peers"), peers + "\n")?;
        }
        ui::info(&format!("collected {bytes} bytes of logs into {}", self.run.dir));
        self.run.save()
    }

    pub(super) fn clean_ssh(&mut self) -> Result<()> {
        let remote_dir = self.cfg.remote_dir.clone();
        let id = self.run.id().to_string();
        for h in sshmode::upload_hosts(self.cfg) {
            crate::transfer::clean_run(self.session_for(&h)?, &remote_dir, &id)?;
        }
        ui::info(&format!("removed the run's directory on every host ({remote_dir}/runs/{id})"));
        Ok(())
    }

    /// `status` for the ssh scheduler.
    pub fn ssh_status(&mut self) -> Result<()> {
        let (ready, dead) = self.poll_ssh()?;
        crate::out!("run {} (target {}, ssh scheduler)", self.run.id(), self.cfg.target);
        for w in &self.run.record.workers {
            let st = if dead.contains(&w.index) { "down" } else if ready.contains(&w.index) { "up" } else { "starting" };
            crate::out!("  worker {:>3}  {:<22} pid {:<8} {st}", w.index, w.addr(), w.pid.map_or("-".into(), |p| p.to_string()));
        }
        let up = ready.iter().filter(|k| !dead.contains(k)).count();
        crate::out!("{up}/{} workers up", self.run.record.workers.len());
        Ok(())
    }
}
