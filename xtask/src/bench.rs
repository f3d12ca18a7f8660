//! `cargo xtask bench`: each benchmark runs side by side with its baseline in one run and
//! prints the ratio. The deploy benchmarks drive this same binary against a target (the
//! testbed) and read the timings from each run's `run.json`.

use anyhow::{bail, Context, Result};
use camino::{Utf8Path, Utf8PathBuf};

use std::process::Command;
use std::time::Instant;

/// Runs this binary with `args`; returns (wall seconds, run.json of the run it made).
fn xtask(root: &Utf8Path, args: &[&str]) -> Result<(f64, serde_json::Value)> {
    let exe = std::env::current_exe().context("cannot find the xtask binary")?;
    let t = Instant::now();
    let out = Command::new(exe).args(args).current_dir(root).stdin(std::process::Stdio::null()).output()?;
    let secs = t.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("bench: `cargo xtask {}` failed:\n{stderr}", args.join(" "));
    }
    // The newest run of this target and command is the one just made.
    let target = args.iter().position(|a| *a == "--target").and_then(|i| args.get(i + 1)).copied().unwrap_or("local");
    let command = args.iter().rev().find(|a| !a.starts_with('-')).copied().unwrap_or("");
    let rec = crate::runstate::list(root)
        .into_iter()
        .find(|r| r.target == target && (r.command == command || args.contains(&r.command.as_str())))
        .map(|r| serde_json::to_value(r).unwrap_or_default())
        .unwrap_or_default();
    Ok((secs, rec))
}

fn stage_secs(rec: &serde_json::Value, names: &[&str]) -> f64 {
    rec["stages"].as_array().map(|st| st.iter().filter(|s| names.contains(&s["name"].as_str().unwrap_or(""))).filter_map(|s| s["seconds"].as_f64()).sum()).unwrap_or(0.0)
}

/// A copy of a target file with `tasks_per_node` replaced, for a different worker count.
fn with_tasks(src: &str, tasks: u32) -> String {
    src.lines().map(|l| if l.trim_start().starts_with("tasks_per_node") { format!("tasks_per_node = {tasks}") } else { l.to_string() }).collect::<Vec<_>>().join("\n") + "\n"
}

/// Time to all workers ready (start + wait) for `small` and `large` workers per node.
pub fn readiness(root: &Utf8Path, target: &str, small: u32, large: u32) -> Result<String> {
    let cfg = crate::config::load(root, target, &Default::default())?;
    let file = cfg.file.clone().context("bench readiness needs a target file (e.g. the testbed's)")?;
    let text = std::fs::read_to_string(&file)?;
    let dir = tempfile::tempdir()?;
    let mut rows = vec![];
    for tasks in [small, large] {
        let f = Utf8PathBuf::from_path_buf(dir.path().join(format!("bench-{tasks}.toml"))).map_err(|_| anyhow::anyhow!("temp path"))?;
        std::fs::write(&f, with_tasks(&text, tasks))?;
        let name = format!("bench-ready-{tasks}");
        let g = ["--target", name.as_str(), "--config", f.as_str()];
        for step in [["singularity"], ["build"], ["package"], ["upload"]] {
            let a: Vec<&str> = g.iter().copied().chain(step).collect();
            xtask(root, &a)?;
        }
        let a: Vec<&str> = g.iter().copied().chain(["start"]).collect();
        let (_, start) = xtask(root, &a)?;
        let a: Vec<&str> = g.iter().copied().chain(["wait"]).collect();
        let waited = xtask(root, &a);
        let a: Vec<&str> = g.iter().copied().chain(["stop"]).collect();
        let _ = xtask(root, &a);
        let (_, wait) = waited?;
        let secs = stage_secs(&start, &["start"]) + stage_secs(&wait, &["wait"]);
        rows.push((cfg.slurm.nodes * tasks, secs));
    }
    let ratio = rows[1].1 / rows[0].1.max(1e-3);
    Ok(format!(
        "readiness on `{target}` (start + wait, submission to all ready):\n  {:>3} workers: {:.2}s\n  {:>3} workers: {:.2}s\n  ratio {:.2} (target <= 1.5: {})",
        rows[0].0,
        rows[0].1,
        rows[1].0,
        rows[1].1,
        ratio,
        if ratio <= 1.5 { "ok" } else { "MISSED" }
    ))
}

/// A first deploy from a clean state beside a redeploy with nothing changed. "Clean" means
/// what a first deploy from a fresh clone meets: no image, no build, no package, and nothing
/// of ours on the cluster (`clean --all`).
pub fn redeploy(root: &Utf8Path, target: &str) -> Result<String> {
    let cfg = crate::config::load(root, target, &Default::default())?;
    xtask(root, &["--target", target, "clean", "--all"])?;
    for f in [cfg.image.sif.clone(), Utf8PathBuf::from(format!("{}.sha256", cfg.image.sif))] {
        let _ = std::fs::remove_file(f);
    }
    for dir in [crate::paths::builds_dir(root), crate::paths::packages_dir(root)] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {dir}"))?;
        }
    }
    let first = xtask(root, &["--target", target, "deploy"]);
    let (first_secs, first_rec) = first?;
    let (again_secs, again_rec) = xtask(root, &["--target", target, "deploy"])?;
    let bytes = |r: &serde_json::Value| r["upload_bytes"].as_u64().unwrap_or(0);
    let ratio = again_secs / first_secs.max(1e-3);
    let overhead = |r: &serde_json::Value, wall: f64| {
        // Build; transfer (upload, log fetches); SLURM (submit, scheduling and worker start,
        // cancel); the coordinator's own run. What is left is the tool's.
        wall - stage_secs(r, &["singularity", "build", "upload", "logs", "start", "wait", "stop"]) - r["coordinator_runs"].as_array().map(|c| c.iter().filter_map(|x| x["seconds"].as_f64()).sum::<f64>()).unwrap_or(0.0)
    };
    Ok(format!(
        "redeploy on `{target}`:\n  first deploy (from scratch):  {first_secs:.2}s, {} payload bytes sent\n  redeploy, nothing changed:    {again_secs:.2}s, {} payload bytes sent\n  ratio {ratio:.3} (target <= 0.1: {})\n  tool overhead of the redeploy {:.2}s (target <= 0.5: {}): wall minus build, transfer (upload, log fetch),\n  SLURM (submit, scheduling and worker start, cancel) and the coordinator's run",
        bytes(&first_rec),
        bytes(&again_rec),
        if ratio <= 0.1 && bytes(&again_rec) == 0 { "ok" } else { "MISSED" },
        overhead(&again_rec, again_secs),
        if overhead(&again_rec, again_secs) <= 0.5 { "ok" } else { "MISSED" }
    ))
}
