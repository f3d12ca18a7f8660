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

/// Clean build of the xtask crate (all dependencies) in a fresh target directory, and the
/// dependencies that cost the most, from cargo's own timing report.
pub fn build_time(root: &Utf8Path) -> Result<(f64, Vec<(String, f64)>)> {
    let dir = tempfile::tempdir()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let t = Instant::now();
    let out = Command::new(cargo).args(["build", "-p", "xtask", "--timings"]).env("CARGO_TARGET_DIR", dir.path()).current_dir(root).output()?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("bench: the clean build failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let html = std::fs::read_to_string(dir.path().join("cargo-timings/cargo-timing.html")).unwrap_or_default();
    let mut costs: Vec<(String, f64)> = html
        .split("const UNIT_DATA = ")
        .nth(1)
        .and_then(|rest| rest.split(";\n").next())
        .and_then(|json| serde_json::from_str::<Vec<serde_json::Value>>(json).ok())
        .unwrap_or_default()
        .iter()
        .map(|u| (format!("{}{}", u["name"].as_str().unwrap_or("?"), if u["target"].as_str().unwrap_or("").contains("build-script") { " (build script)" } else { "" }), u["duration"].as_f64().unwrap_or(0.0)))
        .collect();
    costs.sort_by(|a, b| b.1.total_cmp(&a.1));
    costs.truncate(6);
    Ok((secs, costs))
}

/// SSH handshakes of one deploy: accepted logins in the testbed's sshd log when the target
/// is the testbed, and the ControlMasters the run recorded.
pub fn handshakes(root: &Utf8Path, target: &str) -> Result<(Option<usize>, u64)> {
    let log = crate::testbed::read_env(&crate::testbed::runtime_dir().join("testbed.env")).ok().and_then(|e| e.get("SSHD_LOG_LOGIN").cloned());
    let count = |l: &Option<String>| l.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).map(|t| t.matches("Accepted publickey").count());
    let before = count(&log);
    let (_, rec) = xtask(root, &["--target", target, "deploy"])?;
    let after = count(&log);
    Ok((before.zip(after).map(|(b, a)| a - b), rec["ssh_connections"].as_u64().unwrap_or(0)))
}

/// Every benchmark beside its baseline, one table, written to BENCHMARKS.md.
pub fn all(root: &Utf8Path, target: &str) -> Result<String> {
    let mut rows: Vec<(String, String, String, String)> = vec![];
    let work = crate::paths::state_dir(root).join("bench");
    std::fs::create_dir_all(&work)?;
    let p = crate::package::bench::bench_package(&work, 300)?;
    rows.push((
        "Packaging vs `tar czf` (300 MiB generated tree)".into(),
        format!("{:.2}s, {:.1} MiB vs {:.2}s, {:.1} MiB", p.pack_secs, p.pack_bytes as f64 / 1048576.0, p.tar_secs, p.tar_bytes as f64 / 1048576.0),
        format!("{:.1}x faster", p.speedup),
        verdict(p.speedup >= 3.0 && p.pack_not_larger, ">= 3x faster, not larger"),
    ));
    let r = readiness(root, target, 1, 16)?;
    rows.push(("Readiness: all ready, 48 vs 3 workers".into(), first_lines(&r, 1, 2), field(&r, "ratio "), field_after(&r, "ratio ")));
    let d = redeploy(root, target)?;
    rows.push(("Redeploy with nothing changed vs first deploy".into(), first_lines(&d, 1, 2), field(&d, "ratio "), field_after(&d, "ratio ")));
    rows.push(("Tool overhead of a redeploy".into(), "wall minus build, transfer, SLURM, coordinator".into(), field(&d, "tool overhead of the redeploy "), field_after(&d, "tool overhead")));
    let (log_count, masters) = handshakes(root, target)?;
    rows.push((
        "SSH handshakes per deploy".into(),
        format!("sshd log: {}; ControlMasters recorded: {masters}", log_count.map_or("n/a".into(), |c| c.to_string())),
        log_count.unwrap_or(masters as usize).to_string(),
        verdict(log_count.unwrap_or(masters as usize) == 1, "1"),
    ));
    let (build, costs) = build_time(root)?;
    rows.push((
        "Clean build of the xtask crate".into(),
        format!("most costly: {}", costs.iter().map(|(n, s)| format!("{n} {s:.1}s")).collect::<Vec<_>>().join(", ")),
        format!("{build:.1}s"),
        verdict(build <= 25.0, "<= 25 s"),
    ));
    let mut table = String::from("| benchmark | measured (ours vs baseline) | figure | target |\n|---|---|---|---|\n");
    for (a, b, c, d) in &rows {
        table.push_str(&format!("| {a} | {b} | {c} | {d} |\n"));
    }
    let machine = machine();
    let date = crate::runstate::utc_string(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
    let doc = format!(
        "# Benchmarks\n\nRegenerate with `cargo xtask --target {target} bench all` (the target must be a cluster; the\ntestbed works: `cargo xtask testbed up` first). Each benchmark runs beside its baseline in the\nsame run. Timings are wall-clock on a shared machine; no test asserts on them.\n\n- date: {date}\n- machine: {machine}\n- command: `cargo xtask --target {target} bench all`\n\n{table}\nDetails:\n\n```\n{p}\n\n{r}\n\n{d}\n```\n"
    );
    crate::runstate::write_atomic(&root.join("BENCHMARKS.md"), doc.as_bytes())?;
    Ok(format!("{table}\nwritten to BENCHMARKS.md"))
}

fn verdict(ok: bool, target: &str) -> String {
    format!("{target}: {}", if ok { "ok" } else { "MISSED" })
}

fn first_lines(s: &str, from: usize, n: usize) -> String {
    s.lines().skip(from).take(n).map(str::trim).collect::<Vec<_>>().join("; ")
}

/// The word(s) after `key` up to the next space or `(`.
fn field(s: &str, key: &str) -> String {
    s.split(key).nth(1).map(|r| r.split([' ', '(']).next().unwrap_or("").trim_end_matches(':').to_string()).unwrap_or_default()
}

/// The parenthesised target after `key`: `(target <= 0.5: ok)` → `target <= 0.5: ok`.
fn field_after(s: &str, key: &str) -> String {
    s.split(key).nth(1).and_then(|r| r.split('(').nth(1)).and_then(|r| r.split(')').next()).unwrap_or("").to_string()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())).unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok())).map(|k| k / 1024 / 1024).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem} GiB, Linux {}", kernel.trim())
}
