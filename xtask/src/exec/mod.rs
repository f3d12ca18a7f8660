//! The one executor: runs a plan's steps, records every stage in `run.json`.

use crate::config::{Config, Ports};
use crate::plan::{render_cmd, Arg, Cmd, Stage, Step, Var};
use crate::proc::{self, Echo};
use crate::runstate::{CoordinatorRecord, Run, StageRecord, TargetState, WorkerRecord};
use crate::signals::{self, Interrupted};
use crate::stages::coordinator::{Script, RUN_SCRIPT};
use crate::stages::{compile, facts::Facts, payload, workers};
use crate::ui;
use anyhow::{anyhow, bail, Context, Result};
use camino::{Utf8Path, Utf8PathBuf};
use std::collections::HashMap;
use std::time::{Duration, Instant};

mod remote;
mod sshmode;

/// The coordinator ended with a non-zero exit code, which becomes the tool's.
#[derive(Debug)]
pub struct CoordinatorFailed(pub i32);

impl std::fmt::Display for CoordinatorFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "run: the coordinator exited with code {}", self.0)
    }
}
impl std::error::Error for CoordinatorFailed {}

pub struct Executor<'a> {
    pub cfg: &'a Config,
    pub facts: &'a Facts,
    pub run: Run,
    pub vars: HashMap<Var, String>,
    pub script: Option<Script>,
    /// Set while cleaning up: steps then ignore a pending signal, so cleanup completes.
    pub cleaning: bool,
    /// The ssh session to the login host, opened on first use (one handshake per run).
    pub ssh: Option<crate::ssh::Session>,
    /// Locks held until the current stage ends.
    locks: Vec<std::fs::File>,
    /// Sessions to the peer hosts of the ssh scheduler, one handshake per host.
    peer_sessions: HashMap<String, crate::ssh::Session>,
}

impl<'a> Executor<'a> {
    pub fn new(cfg: &'a Config, facts: &'a Facts, run: Run) -> Executor<'a> {
        let mut vars = HashMap::new();
        let state = TargetState::load(&cfg.root, &cfg.target);
        if let Some(r) = run.record.release.clone().or(state.release) {
            vars.insert(Var::Release, r);
        }
        if let Some(p) = state.package {
            vars.insert(Var::Package, p);
        }
        let peers: Vec<String> = run.record.workers.iter().map(WorkerRecord::addr).collect();
        if !peers.is_empty() {
            vars.insert(Var::Peers, peers.join(","));
        }
        if let Some(i) = run.record.image.clone().or(state.image) {
            vars.insert(Var::Image, i);
        }
        if let Some(j) = run.record.job_ids.last() {
            vars.insert(Var::JobId, j.clone());
        }
        if let Some(d) = &run.record.remote_run_dir {
            vars.insert(Var::RemoteRunDir, d.clone());
        }
        vars.insert(Var::RunId, run.id().to_string());
        Executor { cfg, facts, run, vars, script: None, cleaning: false, ssh: None, locks: vec![], peer_sessions: HashMap::new() }
    }

    /// Fault-injection hook for tests and demos: with `XTASK_HOLD_BEFORE=<stage>[,<stage>]`
    /// the run pauses before those stages until a signal arrives (or the file named by
    /// `XTASK_HOLD_UNTIL` exists), so a fault can be placed in an exact phase. Never set in
    /// normal use.
    fn hold_if_asked(&self, stage: &str) -> Result<()> {
        let Ok(list) = std::env::var("XTASK_HOLD_BEFORE") else { return Ok(()) };
        if self.cleaning || !list.split(',').any(|s| s.trim() == stage) {
            return Ok(());
        }
        let until = std::env::var("XTASK_HOLD_UNTIL").ok();
        ui::info(&format!("holding before `{stage}` (XTASK_HOLD_BEFORE); waiting for a signal{}", until.as_deref().map(|f| format!(" or {f}")).unwrap_or_default()));
        loop {
            signals::check()?;
            if until.as_deref().is_some_and(|f| Utf8Path::new(f).exists()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The ssh session to the target's login host.
    pub fn session(&mut self) -> Result<&crate::ssh::Session> {
        if self.ssh.is_none() {
            let cfg = self.cfg.ssh.as_ref().ok_or_else(|| anyhow!("target `{}` has no login host (`host` under [reach])", self.cfg.target))?;
            self.ssh = Some(crate::ssh::Session::new(cfg)?);
        }
        Ok(self.ssh.as_ref().expect("just set"))
    }

    fn is_ssh(&self) -> bool {
        self.cfg.scheduler == crate::config::Scheduler::Ssh
    }

    fn is_remote(&self) -> bool {
        self.cfg.scheduler != crate::config::Scheduler::Local
    }

    fn host(&self) -> String {
        self.cfg.ssh.as_ref().map(|s| s.host.clone()).unwrap_or_default()
    }

    fn check_signal(&self) -> Result<()> {
        if !self.cleaning {
            signals::check()?;
        }
        Ok(())
    }

    pub fn run_stage(&mut self, stage: &Stage) -> Result<()> {
        let start = Instant::now();
        let mut rec = StageRecord { name: stage.name.into(), ..Default::default() };
        if let Err(e) = self.hold_if_asked(stage.name) {
            rec.status = "interrupted".into();
            rec.error = Some(e.to_string());
            self.run.record.stages.push(rec);
            self.run.save()?;
            return Err(e);
        }
        match &stage.decision {
            crate::plan::Decision::Skip(why) => {
                ui::skip(stage.name, why);
                rec.status = "skipped".into();
                rec.reason = why.clone();
                self.run.record.stages.push(rec);
                return self.run.save();
            }
            crate::plan::Decision::Run(why) => {
                ui::stage(stage.name, why);
                rec.reason = why.clone();
            }
        }
        let mut result = self.check_signal();
        if result.is_ok() {
            for step in &stage.steps {
                result = self.check_signal().and_then(|_| self.step(step));
                if result.is_err() {
                    break;
                }
            }
        }
        self.locks.clear();
        rec.seconds = start.elapsed().as_secs_f64();
        rec.status = match &result {
            Ok(()) => "ran".into(),
            Err(e) if e.is::<Interrupted>() => "interrupted".into(),
            Err(_) => "failed".into(),
        };
        if let Err(e) = &result {
            rec.error = Some(crate::secrets::redact(&format!("{e:#}")));
        }
        ui::stage_done(&rec.name, &rec.status, rec.seconds, rec.error.as_deref());
        self.run.record.stages.push(rec);
        self.run.save()?;
        result
    }

    fn resolve(&self, a: &Arg) -> Result<String> {
        Ok(match a {
            Arg::Lit(s) => s.clone(),
            Arg::Var(v) => self.vars.get(v).cloned().ok_or_else(|| missing_var(*v, &self.cfg.target))?,
            Arg::Concat(parts) => parts.iter().map(|p| self.resolve(p)).collect::<Result<String>>()?,
        })
    }

    fn command(&self, cmd: &Cmd) -> Result<(std::process::Command, Vec<String>)> {
        let argv: Vec<String> = cmd.argv.iter().map(|a| self.resolve(a)).collect::<Result<_>>()?;
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let mut c = std::process::Command::new(program);
        c.args(args);
        for (k, v) in &cmd.env {
            c.env(k, self.resolve(v)?);
        }
        if let Some(d) = &cmd.cwd {
            c.current_dir(d);
        }
        Ok((c, argv))
    }

    fn echo(&self, cmd: &Cmd) {
        let resolved = Cmd {
            argv: cmd.argv.iter().map(|a| Arg::Lit(self.resolve(a).unwrap_or_else(|_| crate::plan::render_arg(a)))).collect(),
            env: cmd.env.iter().map(|(k, v)| (k.clone(), Arg::Lit(self.resolve(v).unwrap_or_default()))).collect(),
            cwd: cmd.cwd.clone(),
        };
        ui::cmd(&render_cmd(&resolved));
    }

    fn step(&mut self, step: &Step) -> Result<()> {
        match step {
            Step::Note(n) => ui::info(n),
            Step::Exec { cmd, log } => self.exec(cmd, log)?,
            Step::CollectArtifacts { from, to } => {
                let n = compile::collect(from, to)?;
                ui::info(&format!("collected {n} files into {}", crate::paths::display(&self.cfg.root, to)));
                self.run.record.build_dir = Some(to.to_string());
                let mut st = TargetState::load(&self.cfg.root, &self.cfg.target);
                st.build_dir = Some(to.to_string());
                st.save(&self.cfg.root, &self.cfg.target)?;
            }
            Step::Pack { build_dir, out_dir } => self.pack(build_dir, out_dir)?,
            Step::Install { releases } => self.install(releases)?,
            Step::SpawnWorker { index, host, cmd } => self.spawn_worker(*index, host, cmd)?,
            Step::WaitReady { timeout } => self.wait_ready(*timeout)?,
            Step::Coordinator { cmd } => self.coordinator(cmd)?,
            Step::CollectLogs if self.is_ssh() => self.collect_ssh_logs()?,
            Step::CollectLogs if self.is_remote() => self.collect_remote_logs()?,
            Step::CollectLogs => self.collect_logs()?,
            Step::StopWorkers { grace } => self.stop_workers(*grace)?,
            Step::UploadImage => self.upload_image()?,
            Step::UploadRelease => self.upload_release()?,
            Step::SubmitJob => self.submit_job()?,
            Step::WaitJob { timeout, pending_timeout } => self.wait_job(*timeout, *pending_timeout)?,
            Step::RemoteCoordinator { argv } => self.remote_coordinator(argv)?,
            Step::CancelJob => self.cancel_job()?,
            Step::Prune => self.prune()?,
            Step::SshWorker { index, host, argv } => self.ssh_worker(*index, host, argv)?,
            Step::WaitSsh { timeout } => self.wait_ssh(*timeout)?,
            Step::StopSsh => self.stop_ssh()?,
            Step::Lock { path, what } => {
                let f = crate::proc::lock_file(path, what)?;
                self.locks.push(f);
            }
            Step::RequireFile { path, hint } => {
                if !path.is_file() {
                    bail!("{} does not exist\n  fix: {hint}", crate::paths::display(&self.cfg.root, path));
                }
            }
            Step::WriteFile { path, contents } => {
                crate::runstate::write_atomic(path, contents.as_bytes())?;
                ui::info(&format!("wrote {}", crate::paths::display(&self.cfg.root, path)));
            }
            Step::BuildImage { cmd, partial, sif } => self.build_image(cmd, partial, sif)?,
            Step::Remote { host: _, argv, log } => {
                let remote: Vec<String> = argv.iter().map(|a| self.resolve(a)).collect::<Result<_>>()?;
                let full = self.session()?.argv(&remote)?;
                self.exec(&Cmd { argv: full.into_iter().map(Arg::Lit).collect(), env: vec![], cwd: None }, log)?;
            }
            Step::RemoveRemote { .. } if self.is_ssh() => self.clean_ssh()?,
            Step::RemoveRemote { .. } if self.is_remote() && self.run.record.remote_run_dir.is_none() => {
                // Nothing was created there: no second connect to a host that may be unreachable.
                ui::info("no run directory was created on the target; nothing to remove");
            }
            Step::RemoveRemote { .. } if self.is_remote() => {
                let remote_dir = self.cfg.remote_dir.clone();
                let id = self.run.id().to_string();
                crate::transfer::clean_run(self.session()?, &remote_dir, &id)?;
                ui::info(&format!("removed {remote_dir}/runs/{id} on {}", self.host()));
            }
            Step::RemoveRemote { path } => {
                let p = Utf8Path::new(path);
                if p.exists() {
                    std::fs::remove_dir_all(p).with_context(|| format!("clean: cannot remove {p}"))?;
                    ui::info(&format!("removed {p}"));
                }
            }
        }
        Ok(())
    }

    fn exec(&mut self, cmd: &Cmd, log: &str) -> Result<()> {
        let (c, _) = self.command(cmd)?;
        self.echo(cmd);
        let log_path = self.run.path(log);
        let label = log.trim_end_matches(".log").to_string();
        let done = proc::run_logged_with(c, &log_path, &log_path, Echo::Quiet, None, Some(&label), None)?;
        if done.code != 0 {
            bail!(
                "`{}` failed with exit code {} after {:.1}s; last lines:\n{}\n  full log: {log_path}",
                cmd.program(),
                done.code,
                done.elapsed.as_secs_f64(),
                indent(&done.tail)
            );
        }
        ui::detail(&format!("done in {:.1}s (log: {log_path})", done.elapsed.as_secs_f64()));
        Ok(())
    }

    fn build_image(&mut self, cmd: &Cmd, partial: &Arg, sif: &Utf8Path) -> Result<()> {
        // Another run may have built it while this one waited for the lock.
        if let Some(bin) = self.facts.runtime_bin.as_deref() {
            if crate::stages::image::built_hash(bin, sif).as_deref() == Some(self.facts.definition.hash.as_str()) {
                ui::info(&format!("{} was built meanwhile by another run; using it", crate::paths::display(&self.cfg.root, sif)));
                return Ok(());
            }
        }
        let partial = Utf8PathBuf::from(self.resolve(partial)?);
        if let Some(dir) = sif.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("singularity: cannot create {dir}"))?;
        }
        let (c, _) = self.command(cmd)?;
        self.echo(cmd);
        let log = self.run.path("image-build.log");
        let result = proc::run_logged_with(c, &log, &log, Echo::Quiet, None, Some("building image"), None);
        let done = match result {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        if done.code != 0 || !partial.is_file() {
            let _ = std::fs::remove_file(&partial);
            bail!(
                "singularity: `{}` failed with exit code {} after {:.0}s; last lines:\n{}\n  full log: {log}\n  fix: correct the [image] section of the target config (or the definition's base), then run `cargo xtask singularity` again",
                cmd.program(),
                done.code,
                done.elapsed.as_secs_f64(),
                indent(&done.tail)
            );
        }
        std::fs::rename(&partial, sif).with_context(|| format!("singularity: cannot move {partial} to {sif}"))?;
        ui::info(&format!("built {} in {:.0}s (log: {log})", crate::paths::display(&self.cfg.root, sif), done.elapsed.as_secs_f64()));
        Ok(())
    }

    fn pack(&mut self, build_dir: &Utf8Path, out_dir: &Utf8Path) -> Result<()> {
        // `deploy` may have built in this process; prefer the freshest build directory.
        let build_dir = match (&self.run.record.build_dir, compile::is_complete(build_dir)) {
            (Some(d), _) => Utf8PathBuf::from(d),
            (None, true) => build_dir.to_owned(),
            (None, false) => TargetState::load(&self.cfg.root, &self.cfg.target).build_dir.map(Utf8PathBuf::from).unwrap_or_else(|| build_dir.to_owned()),
        };
        let packed = payload::pack(self.cfg, self.facts, &build_dir, out_dir, payload::image_ref(self.cfg, self.facts))?;
        let shown = crate::paths::display(&self.cfg.root, &packed.path);
        if packed.skipped {
            ui::info(&format!("unchanged: reusing {shown} ({} files, {} bytes)", packed.files, packed.bytes));
        } else {
            ui::info(&format!("wrote {shown} ({} files, {} bytes)", packed.files, packed.bytes));
        }
        self.vars.insert(Var::Package, packed.path.to_string());
        self.run.record.package = Some(packed.path.to_string());
        self.run.record.package_hash = Some(packed.content_hash.clone());
        let mut st = TargetState::load(&self.cfg.root, &self.cfg.target);
        st.package = Some(packed.path.to_string());
        st.package_hash = Some(packed.content_hash);
        st.save(&self.cfg.root, &self.cfg.target)?;
        Ok(())
    }

    fn install(&mut self, releases: &str) -> Result<()> {
        let pkg = self.resolve(&Arg::Var(Var::Package))?;
        let verified = crate::package::verify(Utf8Path::new(&pkg)).with_context(|| format!("upload: the package {pkg} failed verification"))?;
        let dest = Utf8PathBuf::from(releases).join(&verified.content_hash[..16]);
        if dest.join("manifest.json").is_file() {
            ui::info(&format!("release {} is already complete; nothing to transfer", &verified.content_hash[..16]));
        } else {
            std::fs::create_dir_all(releases).with_context(|| format!("upload: cannot create {releases}"))?;
            crate::package::extract(Utf8Path::new(&pkg), &dest)?;
            ui::info(&format!("installed release {}", crate::paths::display(&self.cfg.root, &dest)));
        }
        self.vars.insert(Var::Release, dest.to_string());
        self.run.record.release = Some(dest.to_string());
        let mut st = TargetState::load(&self.cfg.root, &self.cfg.target);
        st.release = Some(dest.to_string());
        st.save(&self.cfg.root, &self.cfg.target)?;
        Ok(())
    }

    fn spawn_worker(&mut self, index: usize, host: &str, cmd: &Cmd) -> Result<()> {
        if matches!(self.cfg.ports, Ports::Auto) {
            let taken: Vec<u16> = self.run.record.workers.iter().map(|w| w.port).collect();
            let port = loop {
                let p = workers::free_port()?;
                if !taken.contains(&p) {
                    break p;
                }
            };
            self.vars.insert(Var::Port(index), port.to_string());
        }
        let port: u16 = match &self.cfg.ports {
            Ports::Auto => self.vars[&Var::Port(index)].parse()?,
            Ports::Base(b) => b + index as u16,
            Ports::List(l) => l[index],
        };
        let (c, _) = self.command(cmd)?;
        self.echo(cmd);
        let out = self.run.path(&format!("worker-{index}.out"));
        let err = self.run.path(&format!("worker-{index}.err"));
        let pid = proc::spawn_background(c, &out, &err)?;
        self.run.record.workers.push(WorkerRecord {
            index,
            host: host.into(),
            port,
            pid: Some(pid),
            start_ticks: proc::start_ticks(pid),
            stdout: out.to_string(),
            stderr: err.to_string(),
            state: "starting".into(),
            exit_code: None,
        });
        if !self.run.record.nodes.contains(&host.to_string()) {
            self.run.record.nodes.push(host.into());
        }
        self.publish_peers();
        self.run.save()
    }

    fn publish_peers(&mut self) {
        let peers: Vec<String> = self.run.record.workers.iter().map(WorkerRecord::addr).collect();
        self.vars.insert(Var::Peers, peers.join(","));
        self.run.record.peers = peers;
    }

    /// Polls every worker until it accepts a TCP connection; fails fast when one exits.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let total = self.run.record.workers.len();
        if total == 0 {
            bail!("wait: this run has no workers\n  fix: run `cargo xtask start --target {}` first", self.cfg.target);
        }
        let mut ready = vec![false; total];
        let mut shown = usize::MAX;
        let start = Instant::now();
        loop {
            self.check_signal()?;
            for (i, w) in self.run.record.workers.iter_mut().enumerate() {
                if ready[i] {
                    continue;
                }
                if let Some(pid) = w.pid {
                    if !proc::alive(pid, w.start_ticks) {
                        w.state = "exited".into();
                        w.exit_code = proc::reap(pid);
                        let tail = [proc::tail_file(Utf8Path::new(&w.stderr), 10), proc::tail_file(Utf8Path::new(&w.stdout), 5)].concat();
                        let addr = w.addr();
                        let out = w.stdout.clone();
                        self.run.save()?;
                        bail!(
                            "wait: worker {i} ({addr}) exited before it was ready; last lines of its log:\n{}\n  logs: {out} and .err",
                            indent(&tail)
                        );
                    }
                }
                // Our worker must say it listens: a port that merely accepts may belong to
                // another process (the worker then failed to bind and exits).
                let started = std::fs::read_to_string(&w.stdout).is_ok_and(|l| l.contains("Started Distributed Worker"));
                if started && workers::accepts(&w.addr(), Duration::from_millis(200)) {
                    ready[i] = true;
                    w.state = "ready".into();
                }
            }
            let n = ready.iter().filter(|r| **r).count();
            if n != shown {
                ui::progress("ready", n, total, start.elapsed().as_secs_f64());
                shown = n;
            }
            if n == total {
                self.run.save()?;
                return Ok(());
            }
            if Instant::now() >= deadline {
                let mut msg = format!("wait: {}/{total} workers ready after {}s; not ready:", n, timeout.as_secs());
                for (i, w) in self.run.record.workers.iter().enumerate().filter(|(i, _)| !ready[*i]) {
                    msg.push_str(&format!("\n  worker {i} ({}), last lines of its log:\n{}", w.addr(), indent(&proc::tail_file(Utf8Path::new(&w.stdout), 5))));
                }
                msg.push_str("\n  fix: check the logs above; raise `ready_timeout` under [schedule] if the workers are just slow");
                self.run.save()?;
                bail!(msg);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stage_script(&mut self) -> Result<()> {
        let dest = self.run.path(RUN_SCRIPT);
        match &self.script {
            Some(Script::Local(p)) => {
                std::fs::copy(p, &dest).with_context(|| format!("run: cannot copy the script {p} into {dest}"))?;
            }
            Some(Script::Stdin(bytes)) => std::fs::write(&dest, bytes).with_context(|| format!("run: cannot write {dest}"))?,
            _ => return Ok(()),
        }
        self.vars.insert(Var::Script, dest.to_string());
        Ok(())
    }

    fn coordinator(&mut self, cmd: &Cmd) -> Result<()> {
        self.stage_script()?;
        if self.run.record.workers.is_empty() {
            bail!("run: no workers are running for target `{}`\n  fix: run `cargo xtask start --target {0}` and `cargo xtask wait --target {0}` first", self.cfg.target);
        }
        let (c, argv) = self.command(cmd)?;
        self.echo(cmd);
        let n = self.run.record.coordinator_runs.len();
        let stem = if n == 0 { "coordinator".to_string() } else { format!("coordinator-{}", n + 1) };
        let out = self.run.path(&format!("{stem}.out"));
        let err = self.run.path(&format!("{stem}.err"));
        let result = proc::run_logged(c, &out, &err, Echo::Stream, None);
        let (code, secs) = match &result {
            Ok(f) => (Some(f.code), f.elapsed.as_secs_f64()),
            Err(_) => (None, 0.0),
        };
        self.run.record.coordinator_runs.push(CoordinatorRecord {
            argv: crate::secrets::redact_argv(&argv),
            exit_code: code,
            seconds: secs,
            stdout: out.to_string(),
            stderr: err.to_string(),
        });
        self.run.save()?;
        let done = result?;
        if done.code != 0 {
            ui::error(&format!("the coordinator exited with code {}; its output: {out} and {err}", done.code));
            return Err(CoordinatorFailed(done.code).into());
        }
        Ok(())
    }

    fn collect_logs(&mut self) -> Result<()> {
        // Local workers write straight into the run directory; record what exists.
        let peers = self.run.record.peers.join("\n");
        std::fs::write(self.run.path("peers"), if peers.is_empty() { peers } else { peers + "\n" })?;
        let mut n = 0;
        for w in &self.run.record.workers {
            n += usize::from(Utf8Path::new(&w.stdout).is_file()) + usize::from(Utf8Path::new(&w.stderr).is_file());
        }
        ui::info(&format!("{n} worker logs and the coordinator's output are in {}", self.run.dir));
        self.run.save()
    }

    fn stop_workers(&mut self, grace: Duration) -> Result<()> {
        let mut survivors = vec![];
        for w in self.run.record.workers.iter_mut() {
            let Some(pid) = w.pid else { continue };
            if proc::alive(pid, w.start_ticks) {
                if proc::stop_group(pid, grace) {
                    w.state = "stopped".into();
                } else {
                    survivors.push(format!("worker {} (pid {pid})", w.index));
                }
            } else if w.state != "stopped" {
                w.state = "exited".into();
            }
            if let Some(code) = proc::reap(pid) {
                w.exit_code = Some(code);
            }
        }
        self.run.save()?;
        ui::info(&format!("stopped {} workers", self.run.record.workers.len() - survivors.len()));
        if !survivors.is_empty() {
            bail!("stop: could not stop {}\n  fix: kill them by PID (see run.json)", survivors.join(", "));
        }
        Ok(())
    }

    /// Releases and images that running deployments of this target use.
    fn in_use(&self) -> (Vec<String>, Vec<String>) {
        let mut releases = vec![];
        let mut images = vec![];
        if let Some(id) = crate::runstate::current(&self.cfg.root, &self.cfg.target) {
            if let Ok(r) = crate::runstate::Run::open(&self.cfg.root, &id) {
                let name = |p: &Option<String>| p.as_deref().and_then(|p| p.rsplit('/').next()).map(str::to_string);
                releases.extend(name(&r.record.release));
                images.extend(name(&r.record.image));
            }
        }
        (releases, images)
    }

    fn prune(&mut self) -> Result<()> {
        let (keep_releases, keep_images) = self.in_use();
        let removed = if self.is_remote() {
            let remote_dir = self.cfg.remote_dir.clone();
            crate::transfer::prune(self.session()?, &remote_dir, &keep_releases, &keep_images)?
        } else {
            let mut removed = vec![];
            let releases = Utf8PathBuf::from(crate::stages::upload::releases_dir(self.cfg));
            if let Ok(rd) = releases.read_dir_utf8() {
                for e in rd.flatten() {
                    if !keep_releases.iter().any(|k| k == e.file_name()) {
                        std::fs::remove_dir_all(e.path()).with_context(|| format!("clean: cannot remove {}", e.path()))?;
                        removed.push(e.path().to_string());
                    }
                }
            }
            let _ = std::fs::remove_file(Utf8PathBuf::from(&self.cfg.remote_dir).join(".keep"));
            removed
        };
        ui::info(&format!("pruned {} entries (kept {} in use)", removed.len(), keep_releases.len() + keep_images.len()));
        for r in &removed {
            ui::detail(&format!("removed {r}"));
        }
        // The target state names what was just removed; forget it so `start` asks for an upload.
        let mut st = TargetState::load(&self.cfg.root, &self.cfg.target);
        if st.release.as_deref().is_some_and(|r| !keep_releases.iter().any(|k| r.ends_with(k.as_str()))) {
            st.release = None;
        }
        if st.image.as_deref().is_some_and(|i| !keep_images.iter().any(|k| i.ends_with(k.as_str()))) {
            st.image = None;
        }
        st.save(&self.cfg.root, &self.cfg.target)
    }

    /// Marks the run finished with its outcome and exit code.
    pub fn finish(&mut self, result: &Result<()>, started: Instant) {
        let (outcome, code) = match result {
            Ok(()) => ("succeeded", 0),
            Err(e) => match e.downcast_ref::<Interrupted>() {
                Some(Interrupted(sig)) => ("interrupted", signals::exit_code(*sig)),
                None => ("failed", e.downcast_ref::<CoordinatorFailed>().map_or(1, |c| c.0)),
            },
        };
        self.run.record.outcome = outcome.into();
        self.run.record.exit_code = Some(code);
        self.run.record.error = result.as_ref().err().map(|e| crate::secrets::redact(&format!("{e:#}")));
        self.run.record.total_seconds = start_secs(started);
        // A ControlMaster check: each session whose control socket exists made one handshake.
        let masters = self.ssh.iter().chain(self.peer_sessions.values()).filter(|s| s.control_path().exists()).count();
        self.run.record.ssh_connections = masters as u32;
        let _ = self.run.save();
    }
}

fn start_secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn missing_var(v: Var, target: &str) -> anyhow::Error {
    match v {
        Var::Release => anyhow!("no release is installed for target `{target}`\n  fix: run `cargo xtask upload --target {target}` (after `build` and `package`), or `cargo xtask deploy`"),
        Var::Package => anyhow!("no package exists for target `{target}`\n  fix: run `cargo xtask package --target {target}` first"),
        Var::Peers => anyhow!("no workers are recorded for target `{target}`\n  fix: run `cargo xtask start --target {target}` first"),
        Var::Port(k) => anyhow!("no port was chosen for worker {k}"),
        Var::Script => anyhow!("the script was not staged"),
        Var::RunId => anyhow!("no run id"),
        Var::JobId => anyhow!("no SLURM job is recorded for target `{target}`\n  fix: run `cargo xtask start --target {target}` first"),
        Var::Image => anyhow!("no image is on the target `{target}`\n  fix: run `cargo xtask upload --target {target}` (after `singularity`)"),
        Var::RemoteRunDir => anyhow!("this run has no directory on target `{target}` yet"),
    }
}

pub fn indent(lines: &[String]) -> String {
    if lines.is_empty() {
        return "    (empty)".into();
    }
    lines.iter().map(|l| format!("    | {l}")).collect::<Vec<_>>().join("\n")
}
