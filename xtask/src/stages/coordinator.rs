//! Run the coordinator (`daphne --distributed`) against the ready workers.

use crate::config::Config;
use crate::plan::{Arg, Stage, Step, Var};
use crate::stages::{facts::Facts, payload, workers};
use anyhow::{bail, Context, Result};
use camino::{Utf8Path, Utf8PathBuf};

/// Where the coordinator's script comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Script {
    /// A file shipped in the package, as `payload/<path>`.
    Payload(String),
    /// A local file outside the payload, copied into the run directory.
    Local(Utf8PathBuf),
    /// Read from standard input, saved into the run directory.
    Stdin(Vec<u8>),
}

/// Name of the script copy in the run directory.
pub const RUN_SCRIPT: &str = "script.daph";

/// Decides where `SCRIPT` comes from: `-` is stdin, a payload file is used from the release,
/// anything else is copied into the run.
pub fn resolve_script(cfg: &Config, arg: Option<&str>, stdin: impl FnOnce() -> Result<Vec<u8>>) -> Result<Script> {
    let arg = arg.unwrap_or(&cfg.run.script);
    if arg == "-" {
        return Ok(Script::Stdin(stdin().context("run: cannot read the script from standard input")?));
    }
    let path = if Utf8Path::new(arg).is_absolute() { Utf8PathBuf::from(arg) } else { cfg.root.join(arg) };
    if !path.is_file() {
        let cwd_path = std::env::current_dir().ok().and_then(|d| Utf8PathBuf::from_path_buf(d).ok()).map(|d| d.join(arg));
        match cwd_path {
            Some(p) if p.is_file() => return Ok(Script::Local(p)),
            _ => bail!("run: the script {arg} does not exist\n  fix: give a path to a .daph file, `-` to read it from stdin, or ship it with [payload] globs"),
        }
    }
    let files = payload::payload_files(cfg).unwrap_or_default();
    if files.contains(&path) {
        Ok(Script::Payload(payload::archive_path(&cfg.root, &path)))
    } else {
        Ok(Script::Local(path))
    }
}

pub fn plan(cfg: &Config, facts: &Facts, script: &Script, args: &[String]) -> Result<Stage> {
    for a in args {
        if !a.contains('=') {
            bail!("run: script argument `{a}` is not of the form name=value\n  fix: write script arguments as name=value, e.g. n=1000");
        }
        if a.contains('\0') {
            bail!("run: script argument contains a NUL byte, which no program can receive");
        }
    }
    let mut steps = vec![];
    let script_arg = match script {
        Script::Payload(p) => Arg::Concat(vec![Arg::Var(Var::Release), Arg::lit(format!("/{p}"))]),
        Script::Local(p) => {
            steps.push(Step::Note(format!("copying {p} into the run directory as {RUN_SCRIPT}")));
            Arg::Var(Var::Script)
        }
        Script::Stdin(b) => {
            steps.push(Step::Note(format!("script from standard input ({} bytes), saved in the run directory as {RUN_SCRIPT}", b.len())));
            Arg::Var(Var::Script)
        }
    };
    if cfg.scheduler == crate::config::Scheduler::Ssh {
        let argv = crate::stages::sshmode::coordinator_argv(cfg, facts, script_arg, args);
        steps.push(Step::RemoteCoordinator { argv });
        return Ok(Stage::run("run", format!("coordinator on the login host against {} workers", cfg.workers), steps));
    }
    if cfg.scheduler == crate::config::Scheduler::Slurm {
        let argv = crate::stages::slurm::coordinator_argv(cfg, facts, script_arg, args);
        steps.push(Step::RemoteCoordinator { argv });
        return Ok(Stage::run("run", format!("coordinator as a step of the workers' job, against {} workers", cfg.workers), steps));
    }
    let mut daphne_args = vec![Arg::lit("--distributed")];
    if cfg.run.dist_backend != "sync-gRPC" {
        daphne_args.push(Arg::lit(format!("--dist_backend={}", cfg.run.dist_backend)));
    }
    daphne_args.push(script_arg);
    daphne_args.extend(args.iter().map(|a| Arg::lit(a.clone())));
    let cmd = workers::release_cmd(cfg, facts, "daphne", daphne_args).env("DISTRIBUTED_WORKERS", Var::Peers);
    steps.push(Step::Coordinator { cmd });
    Ok(Stage::run("run", format!("coordinator against {} workers", cfg.workers), steps))
}
