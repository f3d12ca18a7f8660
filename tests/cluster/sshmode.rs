//! The SSH-only scheduler end to end on the testbed's nodes (each runs its own sshd): workers
//! started over ssh as process groups, the coordinator on the login host, stop by process group.

use crate::fixture::{root, testbed, text, xtask, Testbed};
use std::path::PathBuf;

/// A target for the ssh scheduler: the login host runs the coordinator; the three nodes,
/// addressed by IP, run the workers; no shared filesystem is assumed, so the release goes to
/// every host.
fn ssh_target(tb: &Testbed, dir: &std::path::Path) -> PathBuf {
    let peers: Vec<String> = tb.get("NODE_ADDRS").split(',').map(|a| format!("\"{a}\"")).collect();
    let toml = format!(
        "[reach]\nscheduler = \"ssh\"\nhost = \"{login}\"\nuser = \"root\"\nidentity = \"{key}\"\nknown_hosts = \"{known}\"\nremote_dir = \"{rt}/home/ssh-mode\"\nshared_fs = false\nconnect_timeout = 5\n\n[schedule]\npeers = [{peers}]\nport_base = 52000\nready_timeout = 30\n\n[container]\nruntime = \"apptainer\"\n\n[image]\nname = \"daphne-bookworm\"\nfakeroot = true\n\n[image.bootstrap]\nagent = \"debootstrap\"\nos_version = \"bookworm\"\nmirror_url = \"http://deb.debian.org/debian\"\ninclude = [\"g++\", \"make\"]\n",
        login = tb.get("LOGIN_ADDR"),
        key = tb.get("SSH_KEY"),
        known = tb.get("KNOWN_HOSTS"),
        rt = tb.get("TB_RT"),
        peers = peers.join(", ")
    );
    let f = dir.join("ssh-mode.toml");
    std::fs::write(&f, toml).unwrap();
    f
}

/// Processes on `node` whose command line mentions `needle`.
fn procs_on(tb: &Testbed, node: &str, needle: &str) -> Vec<String> {
    let ns = format!("{}{node}", tb.get("TB_PREFIX"));
    let pids = std::process::Command::new("ip").args(["netns", "pids", &ns]).output().unwrap();
    text(&pids.stdout)
        .split_whitespace()
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).map(|c| String::from_utf8_lossy(&c).contains(needle)).unwrap_or(false))
        .map(str::to_string)
        .collect()
}

#[test]
fn ssh_scheduler_end_to_end() {
    let tb = testbed();
    let _shared = crate::fixture::shared();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ssh_target(tb, dir.path());
    let out = xtask().args(["--target", "ssh-mode", "--config", cfg.to_str().unwrap(), "deploy", "deploy/examples/sum.daph", "n=1000"]).output().unwrap();
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{o}\n{e}");
    assert!(o.lines().any(|l| l == "result: 333833500"), "{o}");
    // One line per worker, each answered from its own node.
    for (i, node) in ["node1", "node2", "node3"].iter().enumerate() {
        let addr = format!("{}:{}", tb.get("NODE_ADDRS").split(',').nth(i).unwrap(), 52000 + i);
        assert!(o.contains(&format!("worker {addr} host={node} ")), "{o}");
    }
    let run_dir = e.lines().rev().find_map(|l| l.split("run directory: ").nth(1)).map(|s| PathBuf::from(s.trim())).unwrap();
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).unwrap()).unwrap();
    let workers = rec["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3);
    for w in workers {
        assert!(w["pid"].as_i64().is_some(), "no pid recorded: {w}");
        assert_eq!(w["state"], "stopped");
        let k = w["index"].as_u64().unwrap();
        let log = std::fs::read_to_string(run_dir.join(format!("worker-{k}.out"))).unwrap();
        assert!(log.contains("Started Distributed Worker"), "{log}");
    }
    // The release went to every host; the workers are gone from every node.
    assert!(e.matches("release ").count() + e.matches("installed ").count() >= 3, "{e}");
    for node in ["node1", "node2", "node3"] {
        let left = procs_on(tb, node, "ssh-mode/releases");
        assert!(left.is_empty(), "workers left on {node}: {left:?}");
    }
    let _ = root();
}
