//! The plan: every stage of a sweep as plain data, before anything runs.
//!
//! Planning is pure (config + facts in, steps out), so `--dry-run` prints exactly what the
//! executor would run. Values that only an earlier step can produce (a free port, the
//! package's hash, a SLURM job id) are typed placeholders, never strings spliced into argv.

use crate::quote;
use camino::Utf8PathBuf;
use std::fmt::{self, Write as _};
use std::time::Duration;

/// One argument, or part of one.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Lit(String),
    Var(Var),
    /// Parts joined into one argument, e.g. `127.0.0.1:` + the port of worker 0.
    Concat(Vec<Arg>),
}

/// A value produced while the plan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Var {
    /// The directory of the installed release on the target.
    Release,
    /// The port of worker k (picked when it starts on `local` with automatic ports).
    Port(usize),
    /// `host:port,host:port,...` of every ready worker.
    Peers,
    /// The package file that the package stage wrote.
    Package,
    /// The coordinator's script, copied into the run directory.
    Script,
    /// The id of this run.
    RunId,
    /// The SLURM job id of the workers.
    JobId,
    /// The container image on the target.
    Image,
    /// This run's directory on the target.
    RemoteRunDir,
}

impl Arg {
    pub fn lit(s: impl Into<String>) -> Arg {
        Arg::Lit(s.into())
    }
}

impl From<&str> for Arg {
    fn from(s: &str) -> Arg {
        Arg::Lit(s.to_string())
    }
}
impl From<String> for Arg {
    fn from(s: String) -> Arg {
        Arg::Lit(s)
    }
}
impl From<&Utf8PathBuf> for Arg {
    fn from(s: &Utf8PathBuf) -> Arg {
        Arg::Lit(s.to_string())
    }
}
impl From<Var> for Arg {
    fn from(v: Var) -> Arg {
        Arg::Var(v)
    }
}

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Var::Release => write!(f, "<release>"),
            Var::Port(k) => write!(f, "<port-{k}>"),
            Var::Peers => write!(f, "<peers>"),
            Var::Package => write!(f, "<package>"),
            Var::Script => write!(f, "<run-dir>/script.daph"),
            Var::RunId => write!(f, "<run-id>"),
            Var::JobId => write!(f, "<job-id>"),
            Var::Image => write!(f, "<image>"),
            Var::RemoteRunDir => write!(f, "<remote-run-dir>"),
        }
    }
}

/// A command as an argv vector, with its environment and working directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Cmd {
    pub argv: Vec<Arg>,
    pub env: Vec<(String, Arg)>,
    pub cwd: Option<Utf8PathBuf>,
}

impl Cmd {
    pub fn cwd(mut self, dir: impl Into<Utf8PathBuf>) -> Cmd {
        self.cwd = Some(dir.into());
        self
    }
    pub fn env(mut self, key: &str, value: impl Into<Arg>) -> Cmd {
        self.env.push((key.to_string(), value.into()));
        self
    }
    pub fn program(&self) -> String {
        match self.argv.first() {
            Some(Arg::Lit(s)) => s.clone(),
            Some(a) => render_arg(a),
            None => String::new(),
        }
    }
}

/// What a stage does. One executor (`exec.rs`) knows how to run each kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Say something the user must know (e.g. "building without a container").
    Note(String),
    /// Run to completion; a non-zero exit fails the stage. Output goes to `log` in the run dir.
    Exec { cmd: Cmd, log: String },
    /// Copy the build outputs (`bin/`, `lib/`) into the keyed build directory.
    CollectArtifacts { from: Utf8PathBuf, to: Utf8PathBuf },
    /// Build the payload package in-process.
    Pack { build_dir: Utf8PathBuf, out_dir: Utf8PathBuf },
    /// Verify the package and extract it atomically into `releases/<hash>/` on the target.
    Install { releases: String },
    /// Start worker k in the background, in its own process group, and record its PID.
    SpawnWorker { index: usize, host: String, cmd: Cmd },
    /// Every worker accepts a TCP connection before the deadline, or the stage fails.
    WaitReady { timeout: Duration },
    /// Run the coordinator, streaming its output; its exit code becomes the tool's.
    Coordinator { cmd: Cmd },
    /// Copy every log of the run into the local run directory and write `run.json`.
    CollectLogs,
    /// SIGTERM every worker's process group, then SIGKILL after `grace`.
    StopWorkers { grace: Duration },
    /// Remove a directory of this run's state on the target.
    RemoveRemote { path: String },
    /// Write a generated file (e.g. the definition) atomically.
    WriteFile { path: Utf8PathBuf, contents: String },
    /// Build the image into `partial`, then rename it to `sif`; show a spinner meanwhile.
    BuildImage { cmd: Cmd, partial: Arg, sif: Utf8PathBuf },
    /// Run a command on a remote host over ssh.
    Remote { host: String, argv: Vec<Arg>, log: String },
    /// Remove every release and image on the target that no running deployment uses.
    Prune,
    /// Hold an exclusive lock on `path` until the stage ends (e.g. one build per source tree).
    Lock { path: Utf8PathBuf, what: String },
    /// Fail with `hint` unless the file exists when this step runs.
    RequireFile { path: Utf8PathBuf, hint: String },
    /// Store the SIF on the target once per image hash (`images/<hash>.sif`).
    UploadImage,
    /// Send the package and install it as `releases/<hash>/` on the target.
    UploadRelease,
    /// Write the batch script into the remote run directory and `sbatch` it.
    SubmitJob,
    /// Poll the job until every worker is ready; fail on a dead job, a down node, or a
    /// job pending longer than `pending_timeout`.
    WaitJob { timeout: Duration, pending_timeout: Duration },
    /// Run the coordinator on the target through ssh, streaming its output.
    RemoteCoordinator { argv: Vec<Arg> },
    /// `scancel` the workers' job by its id and wait until it has ended.
    CancelJob,
    /// Start worker k over ssh on `host` as its own process group; record its PID.
    SshWorker { index: usize, host: String, argv: Vec<Arg> },
    /// Poll every host until each worker has printed its Started line; fail when one exits.
    WaitSsh { timeout: Duration },
    /// Stop exactly the recorded process groups on every host.
    StopSsh,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Run(String),
    Skip(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: &'static str,
    pub decision: Decision,
    pub steps: Vec<Step>,
}

impl Stage {
    pub fn run(name: &'static str, why: impl Into<String>, steps: Vec<Step>) -> Stage {
        Stage { name, decision: Decision::Run(why.into()), steps }
    }
    pub fn skip(name: &'static str, why: impl Into<String>) -> Stage {
        Stage { name, decision: Decision::Skip(why.into()), steps: vec![] }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The subcommand this plan is for (`deploy`, `build`, ...).
    pub command: String,
    pub target: String,
    pub summary: String,
    pub run_dir: Utf8PathBuf,
    pub stages: Vec<Stage>,
}

/// Renders one argument for humans; placeholders in angle brackets, secrets hidden.
pub fn render_arg(a: &Arg) -> String {
    match a {
        Arg::Lit(s) => crate::secrets::redact_arg(s),
        Arg::Var(v) => v.to_string(),
        Arg::Concat(parts) => parts.iter().map(render_arg).collect(),
    }
}

pub fn render_cmd(c: &Cmd) -> String {
    let mut out = String::new();
    if let Some(cwd) = &c.cwd {
        let _ = write!(out, "cd {} && ", quote::quote(cwd.as_str()));
    }
    for (k, v) in &c.env {
        let _ = write!(out, "{k}={} ", render_quoted(v));
    }
    // The argument after a marked flag (`--password VALUE`) is hidden whole.
    let mut hide = false;
    let argv: Vec<String> = c
        .argv
        .iter()
        .map(|a| {
            let shown = if hide { "***".to_string() } else { render_quoted(a) };
            hide = !hide && matches!(a, Arg::Lit(s) if crate::secrets::is_marked_flag(s));
            shown
        })
        .collect();
    out.push_str(&argv.join(" "));
    out
}

/// Shell-quotes the literal parts of an argument and leaves `<placeholders>` readable.
fn render_quoted(a: &Arg) -> String {
    match a {
        Arg::Lit(s) => quote::quote(&crate::secrets::redact_arg(s)).into_owned(),
        Arg::Var(v) => v.to_string(),
        Arg::Concat(parts) => parts.iter().map(render_quoted).collect(),
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Note(n) => write!(f, "note: {n}"),
            Step::Exec { cmd, log } => write!(f, "$ {}    [log: {log}]", render_cmd(cmd)),
            Step::CollectArtifacts { from, to } => write!(f, "collect {from}/{{bin,lib}} -> {to}"),
            Step::Pack { build_dir, out_dir } => write!(f, "pack {build_dir} + payload -> {out_dir}/daphne-payload-<hash>"),
            Step::Install { releases } => write!(f, "verify <package>, extract into {releases}/<hash> (temp dir, then rename)"),
            Step::SpawnWorker { index, host, cmd } => write!(f, "spawn worker {index} on {host}: {}    [log: worker-{index}.out, worker-{index}.err]", render_cmd(cmd)),
            Step::WaitReady { timeout } => write!(f, "wait until every worker accepts a TCP connection (timeout {}s)", timeout.as_secs()),
            Step::Coordinator { cmd } => write!(f, "$ {}    [log: coordinator.out, coordinator.err]", render_cmd(cmd)),
            Step::CollectLogs => write!(f, "collect worker and coordinator logs into the run directory; write run.json"),
            Step::StopWorkers { grace } => write!(f, "stop every worker's process group (SIGTERM, SIGKILL after {}s)", grace.as_secs()),
            Step::RemoveRemote { path } => write!(f, "remove {path}"),
            Step::RequireFile { path, .. } => write!(f, "require {path}"),
            Step::Lock { path, what } => write!(f, "lock {path} ({what})"),
            Step::Prune => write!(f, "remove releases/ and images/ entries that no running deployment uses"),
            Step::UploadImage => write!(f, "store the SIF as <remote_dir>/images/<definition-hash>.sif unless it is there"),
            Step::UploadRelease => write!(f, "send <package> (rsync, else a stream over ssh), check its sha256 there, extract into releases/<hash> (temp dir, then rename)"),
            Step::SubmitJob => write!(f, "write <remote-run-dir>/job.sh (mode 0700) and `sbatch --parsable` it; record the job id"),
            Step::WaitJob { timeout, pending_timeout } => write!(
                f,
                "poll the job and the workers' logs until all are ready (timeout {}s; cancel when pending over {}s)",
                timeout.as_secs(),
                pending_timeout.as_secs()
            ),
            Step::RemoteCoordinator { argv } => {
                let c = Cmd { argv: argv.clone(), env: vec![], cwd: None };
                write!(f, "on the login host: {}    [log: coordinator.out, coordinator.err]", render_cmd(&c))
            }
            Step::CancelJob => write!(f, "scancel <job-id>; wait until the job has ended"),
            Step::SshWorker { index, host, argv } => {
                let c = Cmd { argv: argv.clone(), env: vec![], cwd: None };
                write!(f, "on {host}: setsid {} &    [worker {index}; log: worker-{index}.out, worker-{index}.err; pid recorded]", render_cmd(&c))
            }
            Step::WaitSsh { timeout } => write!(f, "poll every host until each worker has printed its Started line (timeout {}s)", timeout.as_secs()),
            Step::StopSsh => write!(f, "on every host: SIGTERM, then SIGKILL after 5s, to each recorded process group"),
            Step::WriteFile { path, contents } => write!(f, "write {path} ({} lines)", contents.lines().count()),
            Step::BuildImage { cmd, partial, sif } => {
                write!(f, "$ {}    [log: image-build.log]\n      rename {} -> {sif}", render_cmd(cmd), render_quoted(partial))
            }
            Step::Remote { host, argv, log } => {
                let c = Cmd { argv: argv.clone(), env: vec![], cwd: None };
                write!(f, "on {host}: {}    [log: {log}]", render_cmd(&c))
            }
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "plan `{}` for target `{}` ({})", self.command, self.target, self.summary)?;
        writeln!(f, "run directory: {}", self.run_dir)?;
        let width = self.stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for (i, s) in self.stages.iter().enumerate() {
            let (what, why) = match &s.decision {
                Decision::Run(why) => ("run ", why),
                Decision::Skip(why) => ("skip", why),
            };
            writeln!(f, "{:>2}. {:<width$}  {what}  {why}", i + 1, s.name)?;
            for step in &s.steps {
                writeln!(f, "      {step}")?;
            }
        }
        Ok(())
    }
}
