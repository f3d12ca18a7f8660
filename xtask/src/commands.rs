//! From a parsed command line to a plan, and from the plan to the executor.

use crate::cli::{Command, Global, OnlyTarget, RunArgs, Workers};
use crate::config::{self, Config, Overrides};
use crate::exec::Executor;
use crate::plan::{Plan, Stage, Step};
use crate::runstate::{self, Run};
use crate::stages::coordinator::{self, Script};
use crate::stages::{compile, facts, payload, upload, workers};
use crate::ui;
use anyhow::{bail, Context, Result};
use camino::{Utf8Path, Utf8PathBuf};
use std::io::Read;
use std::time::Instant;

/// Which run directory a command works in.
enum RunChoice {
    /// A fresh run (build, package, upload, start, deploy).
    New,
    /// The target's current deployment, or `--run ID`.
    Current,
}

pub fn main(root: &Utf8Path, g: &Global, cmd: Command) -> Result<()> {
    ui::set_level(g.quiet, g.verbose);
    ui::set_json(g.json);
    match &cmd {
        Command::Completions { shell } => {
            let mut c = <crate::cli::Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut c, "cargo-xtask", &mut buf);
            use std::io::Write;
            // A closed pipe (`| head`) is not an error worth a message.
            let _ = std::io::stdout().write_all(&buf);
            return Ok(());
        }
        Command::Targets => return list_targets(root),
        Command::Runs => return list_runs(root),
        Command::Package { verify: Some(file), .. } => return verify_package(file),
        Command::Logs { run: Some(id) } => return show_logs(&Run::open(root, id)?),
        Command::Testbed { action } => {
            use crate::cli::Testbed as T;
            return match action {
                T::Install => crate::testbed::install(root),
                T::Up { nodes } => crate::testbed::up(root, *nodes),
                T::Down => crate::testbed::down(root),
                T::Status => crate::testbed::status(root),
                T::Fault { args } => crate::testbed::fault(root, args),
            };
        }
        Command::Bench { which } => {
            use crate::cli::Bench as B;
            let report = match which {
                B::Package { size_mb } => {
                    let work = crate::paths::state_dir(root).join("bench");
                    std::fs::create_dir_all(&work)?;
                    crate::package::bench::bench_package(&work, *size_mb)?.to_string()
                }
                B::Readiness { small, large } => crate::bench::readiness(root, &g.target, *small, *large)?,
                B::Redeploy => crate::bench::redeploy(root, &g.target)?,
                B::Handshakes => {
                    let (log, masters) = crate::bench::handshakes(root, &g.target)?;
                    format!("ssh handshakes of one deploy on `{}`: sshd log {}, ControlMasters {masters} (target 1)", g.target, log.map_or("n/a".into(), |c| c.to_string()))
                }
                B::Build => {
                    let (secs, costs) = crate::bench::build_time(root)?;
                    let list: Vec<String> = costs.iter().map(|(n, s)| format!("  {s:6.1}s  {n}")).collect();
                    format!("clean build of the xtask crate: {secs:.1}s (target <= 25 s)\ncostliest units:\n{}", list.join("\n"))
                }
                B::All => crate::bench::all(root, &g.target)?,
            };
            crate::out!("{report}");
            return Ok(());
        }
        _ => {}
    }
    let workers = match &cmd {
        Command::Start(w) | Command::Deploy { workers: w, .. } => w.clone(),
        _ => Workers::default(),
    };
    let ov = Overrides { runtime: g.runtime.clone(), workers: workers.workers, peers: workers.peers, config_file: g.config.clone(), dist_backend: g.dist_backend.clone() };
    let cfg = config::load(root, &g.target, &ov)?;
    let facts = facts::gather(&cfg);
    if let Command::Doctor = cmd {
        return crate::doctor::run(&cfg, &facts);
    }
    if let Command::Singularity { check: true, .. } = cmd {
        crate::stages::image::check(&cfg, &facts.definition)?;
        crate::out!("{} is up to date", crate::paths::display(root, &cfg.image.definition));
        return Ok(());
    }
    let script = match &cmd {
        Command::Run(r) | Command::Deploy { run: r, .. } => Some(coordinator::resolve_script(&cfg, r.script.as_deref(), read_stdin)?),
        _ => None,
    };
    // From here on, Ctrl-C and SIGTERM clean up instead of killing us outright (reading a
    // script from stdin above stays interruptible the ordinary way).
    crate::signals::install();
    let (stages, choice) = plan_command(&cfg, &facts, &cmd, script.as_ref(), g)?;
    let command = name(&cmd);
    if g.dry_run || matches!(cmd, Command::Plan) {
        let run_dir = match (&choice, current_run_id(root, g)) {
            (RunChoice::Current, Some(id)) => crate::paths::runs_dir(root).join(id),
            _ => crate::paths::runs_dir(root).join("<new run id>"),
        };
        let plan = Plan { command: command.into(), target: cfg.target.clone(), summary: summary(&cfg, &facts), run_dir, stages };
        crate::out_inline!("{plan}");
        return Ok(());
    }
    if let Command::Status = cmd {
        let run = open_current(root, g)?;
        match cfg.scheduler {
            config::Scheduler::Slurm => return Executor::new(&cfg, &facts, run).remote_status(),
            config::Scheduler::Ssh => return Executor::new(&cfg, &facts, run).ssh_status(),
            config::Scheduler::Local => {}
        }
        return status(&cfg, &run);
    }
    let run = match choice {
        RunChoice::New => Run::create(root, command, &cfg.target, scheduler_name(&cfg), cfg.runtime.name())?,
        RunChoice::Current => open_current(root, g)?,
    };
    ui::detail(&format!("run {} in {}", run.id(), run.dir));
    let started = Instant::now();
    let mut ex = Executor::new(&cfg, &facts, run);
    ex.script = script;
    let result = match cmd {
        Command::Deploy { .. } => deploy(&mut ex, &stages),
        Command::Start(_) => {
            runstate::set_current(root, &cfg.target, ex.run.id())?;
            run_stages(&mut ex, &stages)
        }
        Command::Stop => {
            let r = run_stages(&mut ex, &stages);
            if r.is_ok() {
                runstate::clear_current(root, &cfg.target, ex.run.id());
            }
            r
        }
        _ => run_stages(&mut ex, &stages),
    };
    // The copy for CI is part of the command: it happens before the outcome is recorded.
    let mut result = result;
    if result.is_ok() {
        let out_dir = match &cmd {
            Command::Package { out: Some(dir), .. } => Some(dir.clone()),
            Command::Dist => Some(root.join("target/dist")),
            _ => None,
        };
        if let Some(dir) = out_dir {
            result = copy_dist(&ex, &dir);
        }
    }
    if matches!(command, "deploy" | "start" | "run" | "stop" | "build" | "package" | "dist" | "upload") || result.is_err() {
        ex.finish_command(command, &result, started);
    }
    if ui::json() {
        let r = &ex.run.record;
        ui::event(
            "summary",
            serde_json::json!({"run_id": r.run_id, "command": command, "target": r.target, "outcome": r.outcome, "exit_code": r.exit_code,
                "run_dir": ex.run.dir, "peers": r.peers, "job_ids": r.job_ids, "seconds": started.elapsed().as_secs_f64(),
                "error": result.as_ref().err().map(|e| crate::secrets::redact(&format!("{e:#}")))}),
        );
        return result;
    }
    match &result {
        Ok(()) if command == "deploy" => ui::stage("done", &format!("run directory: {}", ex.run.dir)),
        Err(_) => ui::info(&format!("run directory: {}", ex.run.dir)),
        _ => {}
    }
    result
}

fn name(cmd: &Command) -> &'static str {
    match cmd {
        Command::Singularity { .. } => "singularity",
        Command::Build { .. } => "build",
        Command::Package { .. } => "package",
        Command::Dist => "dist",
        Command::Upload => "upload",
        Command::Start(_) => "start",
        Command::Status => "status",
        Command::Wait { .. } => "wait",
        Command::Run(_) => "run",
        Command::Stop => "stop",
        Command::Logs { .. } => "logs",
        Command::Clean { .. } => "clean",
        Command::Deploy { .. } | Command::Plan => "deploy",
        Command::Runs => "runs",
        Command::Targets => "targets",
        Command::Bench { .. } => "bench",
        Command::Completions { .. } => "completions",
        Command::Doctor => "doctor",
        Command::Testbed { .. } => "testbed",
    }
}

fn scheduler_name(cfg: &Config) -> &'static str {
    match cfg.scheduler {
        config::Scheduler::Local => "local",
        config::Scheduler::Ssh => "ssh",
        config::Scheduler::Slurm => "slurm",
    }
}

fn summary(cfg: &Config, facts: &facts::Facts) -> String {
    let runtime = match (&cfg.runtime, &facts.runtime_bin) {
        (config::Runtime::Host, _) => "host".to_string(),
        (_, Some(b)) => b.clone(),
        (r, None) => format!("{} (not found)", r.name()),
    };
    format!("scheduler {}, runtime {runtime}, {} workers", scheduler_name(cfg), cfg.workers)
}

fn read_stdin() -> Result<Vec<u8>> {
    let mut buf = vec![];
    std::io::stdin().read_to_end(&mut buf)?;
    Ok(buf)
}

fn plan_singularity(cfg: &Config, facts: &facts::Facts) -> Result<Stage> {
    crate::stages::image::plan(cfg, facts, false)
}

fn plan_logs(_cfg: &Config) -> Stage {
    Stage::run("logs", "every log is kept in the run directory", vec![Step::CollectLogs])
}

fn plan_clean(cfg: &Config, run_id: Option<&str>) -> Stage {
    let path = format!("{}/{}", upload::runs_dir(cfg), run_id.unwrap_or("<run id>"));
    Stage::run("clean", "the run's state on the target is no longer needed", vec![Step::RemoveRemote { path }])
}

fn plan_command(cfg: &Config, facts: &facts::Facts, cmd: &Command, script: Option<&Script>, g: &Global) -> Result<(Vec<Stage>, RunChoice)> {
    use RunChoice::*;
    Ok(match cmd {
        Command::Singularity { force, .. } => {
            let mut stage = crate::stages::image::plan(cfg, facts, *force)?;
            if cfg.runtime == config::Runtime::Host {
                // `singularity` with runtime host still writes the definition users commit.
                let def = &facts.definition;
                let current = std::fs::read_to_string(&cfg.image.definition).is_ok_and(|t| t == def.text);
                stage = if current {
                    Stage::skip("singularity", "definition is current; runtime `host` builds no image (use --runtime apptainer)")
                } else {
                    Stage::run("singularity", "runtime `host` builds no image; writing the definition only", vec![Step::WriteFile { path: cfg.image.definition.clone(), contents: def.text.clone() }])
                };
            }
            (vec![stage], New)
        }
        Command::Build { only, force } => {
            let only = only.map(|o| match o {
                OnlyTarget::Daphne => compile::Only::Daphne,
                OnlyTarget::Worker => compile::Only::Worker,
            });
            (vec![compile::plan(cfg, facts, only, *force)?], New)
        }
        Command::Package { .. } => (vec![payload::plan(cfg, facts)], New),
        // `dist` runs in CI on a fresh clone: it builds first (skipped when current).
        Command::Dist => (vec![compile::plan(cfg, facts, None, false)?, payload::plan(cfg, facts)], New),
        Command::Upload => (vec![upload::plan(cfg, facts)?], New),
        Command::Start(_) => (vec![workers::plan_start(cfg, facts)?], New),
        Command::Status => (vec![], Current),
        Command::Wait { timeout } => {
            let mut s = workers::plan_wait(cfg)?;
            if let (Some(t), Some(Step::WaitReady { timeout: w })) = (timeout, s.steps.first_mut()) {
                *w = std::time::Duration::from_secs(*t);
            }
            (vec![s], Current)
        }
        Command::Run(RunArgs { args, .. }) => {
            let args = if args.is_empty() { cfg.run.args.clone() } else { args.clone() };
            (vec![coordinator::plan(cfg, facts, script.expect("resolved"), &args)?], Current)
        }
        Command::Stop => (vec![plan_logs(cfg), workers::plan_stop(cfg)?], Current),
        Command::Logs { .. } => (vec![plan_logs(cfg)], Current),
        Command::Clean { all } => {
            let current = runstate::current(&cfg.root, &cfg.target);
            if let Some(c) = &current {
                if g.run_id.is_none() || g.run_id.as_ref() == Some(c) {
                    bail!("clean: run {c} of target `{}` is still deployed\n  fix: `cargo xtask stop --target {0}` first (it collects the logs), then clean", cfg.target);
                }
            }
            let mut stages = vec![];
            if g.run_id.is_some() {
                stages.push(plan_clean(cfg, None));
            }
            if *all {
                stages.push(Stage::run("prune", "--all: releases and images that no running deployment uses", vec![Step::Prune]));
            }
            if stages.is_empty() {
                bail!("clean: name the run to clean with `--run RUN_ID` (see `cargo xtask runs`), or pass `--all` to prune unused releases and images");
            }
            (stages, if g.run_id.is_some() { Current } else { New })
        }
        Command::Deploy { .. } | Command::Plan => {
            let args = match cmd {
                Command::Deploy { run, .. } if !run.args.is_empty() => run.args.clone(),
                _ => cfg.run.args.clone(),
            };
            let script = match script {
                Some(s) => s.clone(),
                None => coordinator::resolve_script(cfg, None, || Ok(vec![]))?,
            };
            (deploy_stages(cfg, facts, &script, &args)?, New)
        }
        Command::Runs | Command::Targets | Command::Bench { .. } | Command::Testbed { .. } | Command::Completions { .. } | Command::Doctor => {
            unreachable!("handled before planning")
        }
    })
}

/// The seed's order: singularity, build, package, upload, start, wait, run, logs, stop, clean.
pub fn deploy_stages(cfg: &Config, facts: &facts::Facts, script: &Script, args: &[String]) -> Result<Vec<Stage>> {
    Ok(vec![
        plan_singularity(cfg, facts)?,
        compile::plan(cfg, facts, None, false)?,
        payload::plan(cfg, facts),
        upload::plan(cfg, facts)?,
        workers::plan_start(cfg, facts)?,
        workers::plan_wait(cfg)?,
        coordinator::plan(cfg, facts, script, args)?,
        plan_logs(cfg),
        workers::plan_stop(cfg)?,
        plan_clean(cfg, None),
    ])
}

/// Stages after which cleanup is guaranteed, whatever happened before.
const CLEANUP: &[&str] = &["logs", "stop", "clean"];

/// Runs the sweep; once anything may be running, logs, stop and clean always run.
fn deploy(ex: &mut Executor, stages: &[Stage]) -> Result<()> {
    let mut result = Ok(());
    for stage in stages.iter().filter(|s| !CLEANUP.contains(&s.name)) {
        // A bug that panics in a stage must not skip the cleanup below.
        result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ex.run_stage(stage)))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("{}: internal error (a panic); cleaning up", stage.name)));
        if result.is_err() {
            break;
        }
    }
    if let Err(e) = &result {
        ui::error(&format!("{e:#}"));
        ui::info("cleaning up: collecting logs, stopping workers");
    }
    ex.cleaning = true;
    let run_id = ex.run.id().to_string();
    for stage in stages.iter().filter(|s| CLEANUP.contains(&s.name)) {
        let mut stage = stage.clone();
        for step in &mut stage.steps {
            if let Step::RemoveRemote { path } = step {
                *path = path.replace("<run id>", &run_id);
            }
        }
        let r = ex.run_stage(&stage);
        if let Err(e) = r {
            if result.is_ok() {
                result = Err(e);
            } else {
                ui::error(&format!("cleanup: {e:#}"));
            }
        }
    }
    result
}

fn run_stages(ex: &mut Executor, stages: &[Stage]) -> Result<()> {
    for s in stages {
        let mut s = s.clone();
        let id = ex.run.id().to_string();
        for step in &mut s.steps {
            if let Step::RemoveRemote { path } = step {
                *path = path.replace("<run id>", &id);
            }
        }
        ex.run_stage(&s)?;
    }
    Ok(())
}

fn current_run_id(root: &Utf8Path, g: &Global) -> Option<String> {
    g.run_id.clone().or_else(|| runstate::current(root, &g.target))
}

fn open_current(root: &Utf8Path, g: &Global) -> Result<Run> {
    match current_run_id(root, g) {
        Some(id) => Run::open(root, &id),
        None => bail!("no deployment is running for target `{}`\n  fix: run `cargo xtask start --target {0}` first, or pass `--run RUN_ID`", g.target),
    }
}

fn status(cfg: &Config, run: &Run) -> Result<()> {
    crate::out!("run {} (target {}, {})", run.id(), cfg.target, run.record.outcome);
    let mut up = 0;
    for w in &run.record.workers {
        let alive = w.pid.is_some_and(|p| crate::proc::alive(p, w.start_ticks));
        let accepting = alive && workers::accepts(&w.addr(), std::time::Duration::from_millis(300));
        up += usize::from(accepting);
        let state = if accepting { "up" } else if alive { "starting" } else { "down" };
        crate::out!("  worker {:>3}  {:<22} pid {:<8} {state}", w.index, w.addr(), w.pid.map_or("-".into(), |p| p.to_string()));
    }
    crate::out!("{up}/{} workers up", run.record.workers.len());
    Ok(())
}

fn show_logs(run: &Run) -> Result<()> {
    let r = &run.record;
    crate::out!("run {} ({} on {}, {}, {})", r.run_id, r.command, r.target, r.created_utc, r.outcome);
    if let Some(e) = &r.error {
        crate::out!("error: {e}");
    }
    for s in &r.stages {
        crate::out!("  {:<12} {:<11} {:>7.2}s  {}", s.name, s.status, s.seconds, s.reason);
    }
    crate::out!("directory: {}", run.dir);
    let mut files: Vec<_> = run.dir.read_dir_utf8()?.flatten().map(|e| e.file_name().to_string()).collect();
    files.sort();
    for f in files {
        crate::out!("  {f}");
    }
    if let Some(c) = r.coordinator_runs.last() {
        crate::out!("coordinator output ({}):", c.stdout);
        for l in crate::proc::tail_file(Utf8Path::new(&c.stdout), 20) {
            crate::out!("  {l}");
        }
    }
    Ok(())
}

fn list_targets(root: &Utf8Path) -> Result<()> {
    for t in config::list_targets(root) {
        match config::load(root, &t, &Overrides::default()) {
            Ok(c) => crate::out!("{t:<16} {:<6} {}", scheduler_name(&c), c.description),
            Err(e) => crate::out!("{t:<16} error: {}", e.to_string().lines().next().unwrap_or("")),
        }
    }
    Ok(())
}

fn list_runs(root: &Utf8Path) -> Result<()> {
    let runs = runstate::list(root);
    if runs.is_empty() {
        crate::out!("no runs yet; `cargo xtask deploy` makes one");
    }
    for r in runs {
        crate::out!("{:<40} {:<10} {:<10} {:<21} {}", r.run_id, r.command, r.target, r.created_utc, r.outcome);
    }
    Ok(())
}

fn verify_package(file: &Utf8Path) -> Result<()> {
    let v = crate::package::verify(file).with_context(|| format!("package --verify: {file} is not a valid package"))?;
    crate::out!("{file}: OK ({} files, content hash {}, archive sha256 {})", v.manifest.files.len(), v.content_hash, v.archive_sha256);
    Ok(())
}

/// Copies the package, its `.sha256` and its manifest into `dir` for a CI job to upload.
fn copy_dist(ex: &Executor, dir: &Utf8Path) -> Result<()> {
    let pkg = Utf8PathBuf::from(ex.run.record.package.clone().context("no package was written")?);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {dir}"))?;
    let name = pkg.file_name().context("package has no name")?;
    let sha = Utf8PathBuf::from(format!("{pkg}.sha256"));
    for (from, to) in [(&pkg, dir.join(name)), (&sha, dir.join(format!("{name}.sha256")))] {
        let tmp = dir.join(format!(".{}.tmp", to.file_name().unwrap_or("x")));
        // A full disk must not leave a partial copy behind.
        if let Err(e) = std::fs::copy(from, &tmp).and_then(|_| std::fs::rename(&tmp, &to)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot copy {from} into {dir}"));
        }
    }
    let v = crate::package::verify(&dir.join(name))?;
    runstate::write_atomic(&dir.join("manifest.json"), serde_json::to_string_pretty(&v.manifest)?.as_bytes())?;
    ui::info(&format!("wrote {name}, {name}.sha256 and manifest.json into {dir}"));
    Ok(())
}

impl Executor<'_> {
    /// Records the outcome of a command in its run.
    pub fn finish_command(&mut self, _command: &str, result: &Result<()>, started: Instant) {
        self.finish(result, started);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn fixed_facts(cached: bool) -> facts::Facts {
        facts::Facts {
            runtime_bin: None,
            runtime_missing: None,
            build_key: "0123456789abcdef".into(),
            build_cached: cached,
            source_exists: true,
            commit: "c0ffee".into(),
            dirty: false,
            definition: crate::stages::definition::Definition { text: String::new(), hash: "feedfacefeedface".into() },
            image_hash: None,
        }
    }

    fn render(cfg: &Config, facts: &facts::Facts, script: Script, args: &[String]) -> String {
        let stages = deploy_stages(cfg, facts, &script, args).unwrap();
        let plan = Plan { command: "deploy".into(), target: cfg.target.clone(), summary: summary(cfg, facts), run_dir: "/repo/target/xtask/runs/<new run id>".into(), stages };
        plan.to_string()
    }

    #[test]
    fn dry_run_plan_of_a_fresh_local_deploy() {
        let cfg = load_str(Utf8Path::new("/repo"), "local", None, "", &Overrides::default()).unwrap();
        let out = render(&cfg, &fixed_facts(false), Script::Payload("payload/deploy/examples/sum.daph".into()), &[]);
        insta::assert_snapshot!(out);
    }

    #[test]
    fn dry_run_plan_with_cached_build_fixed_ports_and_hostile_args() {
        let toml = "[schedule]\nworkers = 3\nport_base = 50000\n[run]\ndist_backend = \"async-gRPC\"\n";
        let cfg = load_str(Utf8Path::new("/repo"), "local", None, toml, &Overrides::default()).unwrap();
        let args = vec!["n=10".to_string(), "msg=it's $(rm -rf /); `x`".to_string(), "token=hunter2".to_string()];
        let out = render(&cfg, &fixed_facts(true), Script::Stdin(b"print(1);".to_vec()), &args);
        insta::assert_snapshot!(out);
    }
}
