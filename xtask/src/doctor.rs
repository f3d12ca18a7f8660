//! `cargo xtask doctor`: checks every prerequisite of a target, locally and on the target,
//! and says how to fix what is missing. Read-only: it creates nothing but an ssh connection.

use crate::config::{Config, Ports, Runtime, Scheduler};
use crate::proc;
use crate::stages::facts::Facts;
use crate::ui;
use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Warn,
    Fail,
}

struct Check {
    name: String,
    status: Status,
    detail: String,
    fix: String,
}

fn ok(name: &str, detail: impl Into<String>) -> Check {
    Check { name: name.into(), status: Status::Ok, detail: detail.into(), fix: String::new() }
}
fn warn(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name: name.into(), status: Status::Warn, detail: detail.into(), fix: fix.into() }
}
fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name: name.into(), status: Status::Fail, detail: detail.into(), fix: fix.into() }
}

/// Free bytes on the filesystem holding `path`.
fn free_bytes(path: &camino::Utf8Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_str()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs with a valid C string and an out-pointer to a zeroed struct.
    (unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

fn local_checks(cfg: &Config, facts: &Facts) -> Vec<Check> {
    let mut out = vec![];
    let src = &cfg.source.path;
    out.push(if src.is_dir() {
        ok("source tree", src.to_string())
    } else {
        fail("source tree", format!("{src} does not exist"), "set `path` under [source] to your DAPHNE checkout")
    });
    if cfg.runtime == Runtime::Host {
        out.push(match proc::which("c++").or_else(|| proc::which("g++")) {
            Some(p) => ok("C++ compiler", format!("{p} (runtime `host` builds without a container)")),
            None => fail("C++ compiler", "no c++ or g++ on PATH", "install one (`apt-get install g++`), or use a container runtime"),
        });
    } else {
        out.push(match (&facts.runtime_bin, &facts.runtime_missing) {
            (Some(bin), None) => {
                let v = std::process::Command::new(bin).arg("--version").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
                ok("container runtime", v)
            }
            (_, Some(why)) => fail("container runtime", why.clone(), "install Apptainer (Debian 12: `cargo xtask testbed install`), or use `--runtime host`"),
            _ => fail("container runtime", "none found", "install Apptainer"),
        });
        out.push(match &facts.image_hash {
            Some(h) if *h == facts.definition.hash => ok("image", format!("{} is current (definition hash {h})", cfg.image.sif)),
            Some(h) => warn("image", format!("{} has definition hash {h}, the config generates {}", cfg.image.sif, facts.definition.hash), format!("`cargo xtask singularity --target {}` rebuilds it", cfg.target)),
            None => warn("image", format!("{} is not built yet", cfg.image.sif), format!("`cargo xtask singularity --target {}` builds it (70-100 s)", cfg.target)),
        });
    }
    let state = crate::paths::state_dir(&cfg.root);
    let probe = if state.exists() { state.clone() } else { cfg.root.clone() };
    out.push(match free_bytes(&probe) {
        Some(b) if b < 500 << 20 => fail("local disk", format!("{} free at {probe}", ui::bytes(b)), "free space: builds, packages and images need a few hundred MiB"),
        Some(b) if b < 2 << 30 => warn("local disk", format!("{} free at {probe}", ui::bytes(b)), "an image needs ~250 MiB, a real DAPHNE build several GiB"),
        Some(b) => ok("local disk", format!("{} free at {probe}", ui::bytes(b))),
        None => warn("local disk", format!("cannot tell the free space at {probe}"), ""),
    });
    out.push(match proc::which("rsync") {
        Some(_) => ok("rsync (local)", "uploads resume with rsync"),
        None => warn("rsync (local)", "not installed", "uploads stream over ssh instead; `apt-get install rsync` enables rsync"),
    });
    if cfg.scheduler == Scheduler::Local {
        let ports: Vec<u16> = match &cfg.ports {
            Ports::Auto => vec![],
            Ports::Base(b) => (0..cfg.workers as u16).map(|k| b + k).collect(),
            Ports::List(l) => l.clone(),
        };
        let busy: Vec<u16> = ports.iter().copied().filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_err()).collect();
        out.push(match (ports.is_empty(), busy.is_empty()) {
            (true, _) => ok("worker ports", "picked free when the workers start"),
            (false, true) => ok("worker ports", format!("{} free", ports.len())),
            (false, false) => fail("worker ports", format!("in use: {busy:?}"), "stop what listens there, or change `port_base`/`ports` under [schedule]"),
        });
    }
    out
}

fn remote_checks(cfg: &Config) -> Vec<Check> {
    let mut out = vec![];
    let Some(ssh_cfg) = &cfg.ssh else {
        return vec![fail("login host", "no `host` under [reach]", "set `host` under [reach]")];
    };
    let session = match crate::ssh::Session::new(ssh_cfg) {
        Ok(s) => s,
        Err(e) => return vec![fail("ssh", e.to_string(), "")],
    };
    match session.run(&["true".to_string()]) {
        Ok(_) => out.push(ok("ssh", format!("{} reachable, host key verified, key accepted", ssh_cfg.host))),
        Err(e) => {
            let msg = format!("{e:#}");
            let (what, fix) = msg.split_once("\n  fix: ").unwrap_or((&msg, ""));
            out.push(fail("ssh", what.to_string(), fix.to_string()));
            return out;
        }
    }
    // One remote call: tools, the remote directory, free space there.
    let script = r#"for t in sbatch srun squeue scancel sinfo scontrol apptainer singularity rsync sha256sum tar zstd ss; do command -v "$t" >/dev/null 2>&1 && echo "have $t"; done
d=$1; case $d in "~"|"~/"*) d=$HOME${d#"~"} ;; esac
p=$d; while [ ! -d "$p" ]; do p=$(dirname "$p"); done
[ -w "$p" ] && echo "writable $p"
echo "free $(df -Pk "$p" | awk 'NR==2{print $4}')"
[ -n "$2" ] && sinfo -h -p "$2" -o %P 2>/dev/null | head -n1 | sed 's/^/partition /'
exit 0"#;
    let part = cfg.slurm.partition.clone().unwrap_or_default();
    let argv = ["sh", "-c", script, "sh", &cfg.remote_dir, &part].map(String::from).to_vec();
    let text = match session.run(&argv) {
        Ok(t) => t,
        Err(e) => {
            out.push(fail("login host", format!("{e:#}"), ""));
            return out;
        }
    };
    let has = |t: &str| text.lines().any(|l| l == format!("have {t}"));
    if cfg.scheduler == Scheduler::Slurm {
        let missing: Vec<&str> = ["sbatch", "srun", "squeue", "scancel", "sinfo", "scontrol"].into_iter().filter(|t| !has(t)).collect();
        out.push(if missing.is_empty() {
            ok("SLURM commands", format!("sbatch, srun, squeue, scancel, sinfo, scontrol on {}", ssh_cfg.host))
        } else {
            fail("SLURM commands", format!("missing on {}: {}", ssh_cfg.host, missing.join(", ")), "the login host needs the SLURM client tools; check `module load slurm` or the host")
        });
        if !part.is_empty() {
            out.push(if text.lines().any(|l| l.starts_with("partition ")) {
                ok("partition", part.clone())
            } else {
                fail("partition", format!("`{part}` is not a partition on {}", ssh_cfg.host), "see `sinfo -s` there and fix `partition` under [schedule.slurm]")
            });
        }
    }
    if cfg.runtime != Runtime::Host {
        out.push(if has("apptainer") || has("singularity") {
            ok("container runtime (target)", if has("apptainer") { "apptainer" } else { "singularity" })
        } else {
            fail("container runtime (target)", format!("neither apptainer nor singularity on {}", ssh_cfg.host), "load it (`module load apptainer`) or ask your admins; or use `runtime = \"host\"`")
        });
    }
    out.push(if has("rsync") { ok("rsync (target)", "present") } else { warn("rsync (target)", "missing", "uploads fall back to streaming over ssh") });
    out.push(match text.lines().find_map(|l| l.strip_prefix("writable ")) {
        Some(p) => ok("remote_dir", format!("{} (writable from {p})", cfg.remote_dir)),
        None => fail("remote_dir", format!("{} is not writable", cfg.remote_dir), "choose a directory you own for `remote_dir` under [reach]"),
    });
    if let Some(kb) = text.lines().find_map(|l| l.strip_prefix("free ")).and_then(|k| k.trim().parse::<u64>().ok()) {
        let b = kb * 1024;
        out.push(if b < 1 << 30 { warn("remote disk", format!("{} free", ui::bytes(b)), "an image needs ~250 MiB per definition hash") } else { ok("remote disk", format!("{} free", ui::bytes(b))) });
    }
    out.push(if has("ss") {
        ok("worker ports", format!("checked on each node when workers start (port_retries = {})", cfg.port_retries))
    } else {
        warn("worker ports", "`ss` is missing on the login host; a taken port is reported, not moved", "install iproute2 on the nodes")
    });
    if cfg.scheduler == Scheduler::Ssh {
        for p in &cfg.peers {
            let mut c = ssh_cfg.clone();
            c.host = p.host.clone();
            let r = crate::ssh::Session::new(&c).and_then(|s| s.run(&["true".to_string()]));
            out.push(match r {
                Ok(_) => ok("peer", p.host.clone()),
                Err(e) => fail("peer", format!("{}: {e:#}", p.host), "each peer needs the same ssh access as the login host"),
            });
        }
    }
    out
}

pub fn run(cfg: &Config, facts: &Facts) -> Result<()> {
    let mut checks = local_checks(cfg, facts);
    if cfg.scheduler != Scheduler::Local {
        checks.extend(remote_checks(cfg));
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    for c in &checks {
        let st = match c.status {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        if ui::json() {
            ui::event("check", serde_json::json!({"check": c.name, "status": st, "detail": c.detail, "fix": c.fix}));
            continue;
        }
        crate::out!("{st:<5} {:<26} {}", c.name, c.detail);
        if !c.fix.is_empty() && c.status != Status::Ok {
            crate::out!("      {:<26} fix: {}", "", c.fix);
        }
    }
    if failed > 0 {
        bail!("doctor: {failed} check(s) failed for target `{}`", cfg.target);
    }
    Ok(())
}
