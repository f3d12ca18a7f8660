//! Workers on the `local` scheduler: start, readiness, status and stop.
//!
//! Each worker runs in its own process group with its PID and start time recorded in
//! `run.json`, so `stop` (even from another invocation) signals exactly our workers.

use crate::config::{Config, Ports, Scheduler};
use crate::plan::{Arg, Stage, Step, Var};
use crate::stages::{container, facts::Facts};
use anyhow::{bail, Result};
use camino::Utf8Path;
use std::time::Duration;

pub const LOCAL_HOST: &str = "127.0.0.1";
pub const STOP_GRACE: Duration = Duration::from_secs(5);

fn local_only(cfg: &Config, what: &str) -> Result<()> {
    if cfg.scheduler != Scheduler::Local {
        bail!(
            "{what}: workers on the `{}` scheduler are not implemented in this version; only the `local` target runs workers\n  fix: use `--target local`",
            match cfg.scheduler { Scheduler::Ssh => "ssh", _ => "slurm" }
        );
    }
    Ok(())
}

/// The port of worker k: fixed by config, or picked when it starts.
pub fn port_arg(ports: &Ports, k: usize) -> Arg {
    match ports {
        Ports::Auto => Arg::Var(Var::Port(k)),
        Ports::Base(b) => Arg::lit((*b as usize + k).to_string()),
        Ports::List(l) => Arg::lit(l[k].to_string()),
    }
}

/// A release binary, run through the container when one is configured.
pub fn release_cmd(cfg: &Config, facts: &Facts, binary: &str, args: Vec<Arg>) -> crate::plan::Cmd {
    let mut argv = vec![Arg::Concat(vec![Arg::Var(Var::Release), Arg::lit(format!("/bin/{binary}"))])];
    argv.extend(args);
    let remote = Utf8Path::new(&cfg.remote_dir);
    container::exec(cfg, facts.runtime_bin.as_deref(), &cfg.image.sif, &[remote], None, argv)
}

pub fn plan_start(cfg: &Config, facts: &Facts) -> Result<Stage> {
    if cfg.scheduler == Scheduler::Slurm {
        return Ok(crate::stages::slurm::plan_start(cfg));
    }
    if cfg.scheduler == Scheduler::Ssh {
        return Ok(crate::stages::sshmode::plan_start(cfg, facts));
    }
    local_only(cfg, "start")?;
    let steps = (0..cfg.workers)
        .map(|k| {
            let addr = Arg::Concat(vec![Arg::lit(format!("{LOCAL_HOST}:")), port_arg(&cfg.ports, k)]);
            Step::SpawnWorker { index: k, host: LOCAL_HOST.into(), cmd: release_cmd(cfg, facts, "DistributedWorker", vec![addr]) }
        })
        .collect();
    let ports = match cfg.ports {
        Ports::Auto => "free ports",
        _ => "configured ports",
    };
    Ok(Stage::run("start", format!("{} workers on {LOCAL_HOST}, {ports}", cfg.workers), steps))
}

pub fn plan_wait(cfg: &Config) -> Result<Stage> {
    if cfg.scheduler == Scheduler::Slurm {
        return Ok(crate::stages::slurm::plan_wait(cfg));
    }
    if cfg.scheduler == Scheduler::Ssh {
        return Ok(crate::stages::sshmode::plan_wait(cfg));
    }
    local_only(cfg, "wait")?;
    Ok(Stage::run("wait", "readiness gate before the coordinator runs", vec![Step::WaitReady { timeout: cfg.ready_timeout }]))
}

pub fn plan_stop(cfg: &Config) -> Result<Stage> {
    if cfg.scheduler == Scheduler::Slurm {
        return Ok(crate::stages::slurm::plan_stop());
    }
    if cfg.scheduler == Scheduler::Ssh {
        return Ok(crate::stages::sshmode::plan_stop());
    }
    local_only(cfg, "stop")?;
    Ok(Stage::run("stop", "workers are stopped by their recorded process groups", vec![Step::StopWorkers { grace: STOP_GRACE }]))
}

/// Picks a free TCP port on the loopback address by letting the kernel choose one.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind((LOCAL_HOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// Whether something accepts TCP connections at `addr` right now.
pub fn accepts(addr: &str, timeout: Duration) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(addrs) = addr.to_socket_addrs() else { return false };
    addrs.into_iter().any(|a| std::net::TcpStream::connect_timeout(&a, timeout).is_ok())
}
