//! The SSH-only scheduler (upstream's `deployDistributed.sh` mode): no SLURM, a fixed list of
//! peers. Each worker is started over ssh as the leader of its own session and process group
//! (`setsid`), its PID recorded, so `stop` signals exactly those process groups.

use crate::config::{Config, Peer, Ports};
use crate::plan::{Arg, Stage, Step, Var};
use crate::stages::facts::Facts;

/// Starts one worker in the background of the remote shell, as its own session leader, and
/// prints its PID (= its process group). Constant text; everything variable is a positional
/// argument: run dir, worker index, then the worker's argv ending with `host:port`.
pub const START_SCRIPT: &str = r#"dir=$1; k=$2; shift 2
mkdir -p "$dir" && chmod 700 "$dir" && cd "$dir" || exit 3
setsid "$@" > "worker-$k.out" 2> "worker-$k.err" < /dev/null &
echo "$!""#;

/// One call per host and poll: `ready K`, `dead K`, for each `K PID` pair given.
pub const POLL_SCRIPT: &str = r#"dir=$1; shift
cd "$dir" 2>/dev/null || exit 0
while [ $# -ge 2 ]; do
  k=$1; pid=$2; shift 2
  if grep -q 'Started Distributed Worker' "worker-$k.out" 2>/dev/null; then echo "ready $k"; fi
  kill -0 "$pid" 2>/dev/null || echo "dead $k"
done
exit 0"#;

/// Stops process groups: SIGTERM, up to 5 s, then SIGKILL. Prints `gone K` or `left K`.
/// (`kill -SIG -PGID` without `--`: dash's kill rejects `--`.)
pub const STOP_SCRIPT: &str = r#"while [ $# -ge 2 ]; do
  k=$1; pid=$2; shift 2
  kill -TERM "-$pid" 2>/dev/null
  i=0
  while kill -0 "-$pid" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  kill -KILL "-$pid" 2>/dev/null
  sleep 0.1
  if kill -0 "-$pid" 2>/dev/null; then echo "left $k"; else echo "gone $k"; fi
done
exit 0"#;

/// The port of peer k: its own, or `port_base + k`.
pub fn peer_port(cfg: &Config, k: usize, p: &Peer) -> u16 {
    p.port.unwrap_or_else(|| match &cfg.ports {
        Ports::Base(b) => b + k as u16,
        Ports::List(l) => l.get(k).copied().unwrap_or(50000 + k as u16),
        Ports::Auto => 50000 + k as u16,
    })
}

/// The argv of worker k on its host, through the container when one is configured.
pub fn worker_argv(cfg: &Config, facts: &Facts, k: usize) -> Vec<Arg> {
    let p = &cfg.peers[k];
    let mut a = crate::stages::container::remote_prefix(cfg, facts);
    a.push(Arg::Concat(vec![Arg::Var(Var::Release), Arg::lit("/bin/DistributedWorker")]));
    a.push(Arg::lit(format!("{}:{}", p.host, peer_port(cfg, k, p))));
    a
}

/// Distinct hosts that need the release: every peer's, plus the login host (coordinator),
/// or only the login host when they share a filesystem.
pub fn upload_hosts(cfg: &Config) -> Vec<String> {
    let login = cfg.ssh.as_ref().map(|s| s.host.clone()).unwrap_or_default();
    let mut hosts = vec![login];
    if !cfg.shared_fs {
        for p in &cfg.peers {
            if !hosts.contains(&p.host) {
                hosts.push(p.host.clone());
            }
        }
    }
    hosts
}

pub fn plan_upload(cfg: &Config, facts: &Facts) -> Stage {
    let hosts = upload_hosts(cfg);
    let why = if cfg.shared_fs { "shared filesystem: once, through the login host".to_string() } else { format!("once per distinct host ({})", hosts.join(", ")) };
    let mut steps = vec![];
    if facts.runtime_bin.is_some() {
        steps.push(Step::UploadImage);
    }
    steps.push(Step::UploadRelease);
    Stage::run("upload", why, steps)
}

pub fn plan_start(cfg: &Config, facts: &Facts) -> Stage {
    let steps = (0..cfg.peers.len()).map(|k| Step::SshWorker { index: k, host: cfg.peers[k].host.clone(), argv: worker_argv(cfg, facts, k) }).collect();
    Stage::run("start", format!("{} workers over ssh, each its own process group", cfg.peers.len()), steps)
}

pub fn plan_wait(cfg: &Config) -> Stage {
    Stage::run("wait", "every worker has printed its \"Started Distributed Worker\" line", vec![Step::WaitSsh { timeout: cfg.ready_timeout }])
}

pub fn plan_stop() -> Stage {
    Stage::run("stop", "SIGTERM, then SIGKILL, to exactly the recorded process groups", vec![Step::StopSsh, Step::CollectLogs])
}

/// The coordinator on the login host, in its run directory.
pub fn coordinator_argv(cfg: &Config, facts: &Facts, script: Arg, args: &[String]) -> Vec<Arg> {
    let mut a: Vec<Arg> = vec!["env".into(), Arg::Concat(vec![Arg::lit("DISTRIBUTED_WORKERS="), Arg::Var(Var::Peers)])];
    a.extend(crate::stages::container::remote_prefix(cfg, facts));
    a.push(Arg::Concat(vec![Arg::Var(Var::Release), Arg::lit("/bin/daphne")]));
    a.push("--distributed".into());
    if cfg.run.dist_backend != "sync-gRPC" {
        a.push(Arg::lit(format!("--dist_backend={}", cfg.run.dist_backend)));
    }
    a.push(script);
    a.extend(args.iter().map(|x| Arg::lit(x.clone())));
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_are_valid_sh() {
        for s in [START_SCRIPT, POLL_SCRIPT, STOP_SCRIPT] {
            let out = std::process::Command::new("sh").args(["-n", "-c", s]).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }

    /// The start script runs a worker as its own process group and the stop script ends it.
    #[test]
    fn start_and_stop_scripts_manage_a_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let out = std::process::Command::new("sh").args(["-c", START_SCRIPT, "sh", d, "0", "sh", "-c", "echo Started Distributed Worker on x; sleep 30 & wait", "sh"]).output().unwrap();
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        // SAFETY: getpgid on a pid we just started.
        assert_eq!(unsafe { libc::getpgid(pid) }, pid, "the worker leads its own process group");
        let poll = std::process::Command::new("sh").args(["-c", POLL_SCRIPT, "sh", d, "0", &pid.to_string()]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&poll.stdout).trim(), "ready 0");
        let stop = std::process::Command::new("sh").args(["-c", STOP_SCRIPT, "sh", "0", &pid.to_string()]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&stop.stdout).trim(), "gone 0");
        // SAFETY: kill with signal 0 only checks existence.
        let sleeper_left = unsafe { libc::kill(-pid, 0) } == 0;
        assert!(!sleeper_left, "a process of the group survived");
    }
}
