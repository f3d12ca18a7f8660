//! Target configuration: TOML + command-line overrides become one checked `Config`.
//!
//! Parsing (`schema`) and validation (here) are separate so that every rule lives in one
//! place and every error can name the file, line and key.

pub mod error;
pub mod schema;

use crate::secrets;
use camino::{Utf8Path, Utf8PathBuf};
pub use error::ConfigError;
use error::SourceText;
use schema::TargetFile;
use serde::Serialize;
use std::time::Duration;
use toml::Spanned;

/// Name of the target that needs no file.
pub const LOCAL: &str = "local";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Local,
    Ssh,
    Slurm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// Apptainer if installed, else Singularity.
    Auto,
    Apptainer,
    Singularity,
    /// No container: build and run the binaries directly.
    Host,
}

impl Runtime {
    pub fn parse(s: &str) -> Option<Runtime> {
        Some(match s {
            "auto" => Runtime::Auto,
            "apptainer" => Runtime::Apptainer,
            "singularity" => Runtime::Singularity,
            "host" => Runtime::Host,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Auto => "auto",
            Runtime::Apptainer => "apptainer",
            Runtime::Singularity => "singularity",
            Runtime::Host => "host",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Ports {
    /// Free ports picked when the workers start (local only).
    Auto,
    Base(u16),
    List(Vec<u16>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Advertise {
    Hostname,
    Interface(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub host: String,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ssh {
    pub host: String,
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity: Option<Utf8PathBuf>,
    pub proxy_jump: Option<String>,
    pub known_hosts: Option<Utf8PathBuf>,
    pub ssh_config: Option<Utf8PathBuf>,
    pub options: Vec<String>,
    pub connect_timeout: u32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SlurmOpts {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub time: Option<String>,
    pub nodes: u32,
    pub tasks_per_node: u32,
    pub sbatch_args: Vec<String>,
    pub srun_args: Vec<String>,
    pub mpi: Option<String>,
    pub pending_timeout: Option<Duration>,
    pub coordinator_time: Option<String>,
    pub coordinator_ntasks: Option<u32>,
    pub coordinator_cpus: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageCfg {
    pub name: String,
    pub sif: Utf8PathBuf,
    pub definition: Utf8PathBuf,
    pub fakeroot: bool,
    pub build_args: Vec<String>,
    pub build_on_login: bool,
    pub bootstrap: schema_out::Bootstrap,
    pub files: Vec<String>,
    pub post: Vec<String>,
    pub environment: Vec<String>,
    pub labels: Vec<(String, String)>,
    pub runscript: Option<String>,
    pub help: Option<String>,
    pub test: Option<String>,
}

/// Checked forms of nested schema types.
pub mod schema_out {
    use serde::Serialize;

    #[derive(Debug, Clone, PartialEq, Serialize)]
    pub enum Bootstrap {
        Docker { from: String, tag: String },
        LocalImage { from: String },
        Debootstrap { os_version: String, mirror_url: String, include: Vec<String> },
        Library { from: String },
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceCfg {
    pub path: Utf8PathBuf,
    pub build_daphne: Vec<String>,
    pub build_worker: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PayloadCfg {
    pub globs: Vec<String>,
    pub data: Vec<String>,
    pub require_match: bool,
    pub compression: Compression,
    pub level: Option<i32>,
    pub include_sif: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunCfg {
    pub script: String,
    pub args: Vec<String>,
    pub dist_backend: String,
}

/// The checked configuration of one target. Everything downstream reads only this.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub root: Utf8PathBuf,
    pub target: String,
    pub file: Option<Utf8PathBuf>,
    pub description: String,
    pub scheduler: Scheduler,
    pub ssh: Option<Ssh>,
    pub remote_dir: String,
    pub shared_fs: bool,
    pub workers: usize,
    pub ports: Ports,
    pub peers: Vec<Peer>,
    pub advertise: Advertise,
    pub ready_timeout: Duration,
    pub port_retries: u32,
    pub slurm: SlurmOpts,
    pub runtime: Runtime,
    pub runtime_args: Vec<String>,
    pub image: ImageCfg,
    pub source: SourceCfg,
    pub payload: PayloadCfg,
    pub run: RunCfg,
}

/// Command-line flags that override the target file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub runtime: Option<String>,
    pub workers: Option<usize>,
    pub peers: Option<String>,
    pub config_file: Option<Utf8PathBuf>,
    pub dist_backend: Option<String>,
}

pub const DEFAULT_DOCKER_IMAGE: &str = "docker://daphneeu/daphne-dev";
pub const DEFAULT_DOCKER_TAG: &str = "latest_X86-64_BASE";

/// Where target files live, in lookup order.
pub fn target_dirs(root: &Utf8Path) -> Vec<Utf8PathBuf> {
    vec![root.join("deploy/targets"), crate::paths::state_dir(root).join("targets")]
}

/// Finds and loads a target by name, applying overrides, and validates it.
pub fn load(root: &Utf8Path, target: &str, ov: &Overrides) -> Result<Config, ConfigError> {
    let file = match &ov.config_file {
        Some(f) => Some(f.clone()),
        None => find_target_file(root, target)?,
    };
    let (text, file) = match file {
        Some(f) => {
            let text = std::fs::read_to_string(&f).map_err(|e| ConfigError {
                file: Some(f.clone()),
                line: None,
                key: String::new(),
                message: format!("cannot read the target file: {e}"),
                fix: "check the path and its permissions".into(),
            })?;
            (text, Some(f))
        }
        None => (String::new(), None),
    };
    load_str(root, target, file.as_deref(), &text, ov)
}

fn find_target_file(root: &Utf8Path, target: &str) -> Result<Option<Utf8PathBuf>, ConfigError> {
    if target.is_empty() || !target.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
        return Err(ConfigError {
            file: None,
            line: None,
            key: "--target".into(),
            message: format!("`{target}` is not a valid target name"),
            fix: "use letters, digits, `-`, `_` or `.`; targets are files deploy/targets/<name>.toml".into(),
        });
    }
    for dir in target_dirs(root) {
        let f = dir.join(format!("{target}.toml"));
        if f.is_file() {
            return Ok(Some(f));
        }
    }
    if target == LOCAL {
        return Ok(None);
    }
    let known = list_targets(root).join(", ");
    Err(ConfigError {
        file: None,
        line: None,
        key: "--target".into(),
        message: format!("no target named `{target}` (known: {known})"),
        fix: format!(
            "create deploy/targets/{target}.toml (see docs/config.md), or run `cargo xtask testbed up` for the `testbed` target"
        ),
    })
}

/// Every target name that `--target` accepts.
pub fn list_targets(root: &Utf8Path) -> Vec<String> {
    let mut names = vec![LOCAL.to_string()];
    for dir in target_dirs(root) {
        if let Ok(rd) = dir.read_dir_utf8() {
            for e in rd.flatten() {
                if let Some(n) = e.file_name().strip_suffix(".toml") {
                    names.push(n.to_string());
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Parses and validates one target file's text (empty text for the built-in `local`).
pub fn load_str(root: &Utf8Path, target: &str, file: Option<&Utf8Path>, text: &str, ov: &Overrides) -> Result<Config, ConfigError> {
    let src = SourceText { file, text };
    let parsed: TargetFile = toml::from_str(text).map_err(|e| src.from_toml(&e))?;
    Validator { src: &src, root, target, ov }.check(parsed)
}

struct Validator<'a> {
    src: &'a SourceText<'a>,
    root: &'a Utf8Path,
    target: &'a str,
    ov: &'a Overrides,
}

impl Validator<'_> {
    fn err<T>(&self, v: &Spanned<T>, key: &str, msg: impl Into<String>, fix: impl Into<String>) -> ConfigError {
        self.src.error(Some(v.span()), key, msg, fix)
    }

    fn flag_err(&self, flag: &str, msg: impl Into<String>, fix: impl Into<String>) -> ConfigError {
        ConfigError { file: None, line: None, key: flag.into(), message: msg.into(), fix: fix.into() }
    }

    fn missing(&self, key: &str, why: &str, fix: &str) -> ConfigError {
        self.src.error(None, key, format!("is required {why}"), fix.to_string())
    }

    fn int_in(&self, v: &Option<Spanned<i64>>, key: &str, lo: i64, hi: i64, fix: &str) -> Result<Option<i64>, ConfigError> {
        match v {
            None => Ok(None),
            Some(s) if (lo..=hi).contains(s.get_ref()) => Ok(Some(*s.get_ref())),
            Some(s) => Err(self.err(s, key, format!("must be between {lo} and {hi} (got {})", s.get_ref()), fix)),
        }
    }

    fn path(&self, p: &str) -> Utf8PathBuf {
        let expanded = expand_home(p);
        if expanded.is_absolute() {
            expanded
        } else {
            self.root.join(expanded)
        }
    }

    /// No argument or option can carry a NUL byte (TOML can write one as `\u0000`).
    fn no_nul(&self, f: &TargetFile) -> Result<(), ConfigError> {
        let sl = &f.schedule.slurm;
        let one = |o: &Option<String>| o.iter().cloned().collect::<Vec<_>>();
        let sp = |o: &Option<Spanned<String>>| o.iter().map(|v| v.get_ref().clone()).collect::<Vec<_>>();
        let lists: Vec<(&str, Vec<String>)> = vec![
            ("reach.user", sp(&f.reach.user)),
            ("reach.identity", sp(&f.reach.identity)),
            ("reach.proxy_jump", sp(&f.reach.proxy_jump)),
            ("reach.known_hosts", sp(&f.reach.known_hosts)),
            ("reach.ssh_config", sp(&f.reach.ssh_config)),
            ("source.path", sp(&f.source.path)),
            ("image.sif", one(&f.image.sif)),
            ("reach.ssh_options", f.reach.ssh_options.clone()),
            ("schedule.slurm.sbatch_args", sl.sbatch_args.clone()),
            ("schedule.slurm.srun_args", sl.srun_args.clone()),
            ("schedule.slurm.partition", one(&sl.partition)),
            ("schedule.slurm.account", one(&sl.account)),
            ("schedule.slurm.qos", one(&sl.qos)),
            ("schedule.slurm.mpi", one(&sl.mpi)),
            ("container.runtime_args", f.container.runtime_args.clone()),
            ("image.build_args", f.image.build_args.clone()),
            ("source.build_daphne", f.source.build_daphne.as_ref().map(|v| v.get_ref().clone()).unwrap_or_default()),
            ("source.build_worker", f.source.build_worker.as_ref().map(|v| v.get_ref().clone()).unwrap_or_default()),
            ("run.args", f.run.args.clone()),
            ("run.script", one(&f.run.script)),
        ];
        for (key, list) in lists {
            if list.iter().any(|a| a.contains('\0')) {
                return Err(self.src.error(None, key, "holds a NUL byte (`\\u0000`), which no program can receive", "remove the NUL character"));
            }
        }
        Ok(())
    }

    fn check(&self, f: TargetFile) -> Result<Config, ConfigError> {
        self.no_nul(&f)?;
        let is_local_name = self.target == LOCAL;
        let scheduler = match &f.reach.scheduler {
            None if is_local_name || f.reach.host.is_none() => Scheduler::Local,
            None => Scheduler::Slurm,
            Some(s) => match s.get_ref().as_str() {
                "local" => Scheduler::Local,
                "ssh" => Scheduler::Ssh,
                "slurm" => Scheduler::Slurm,
                other => {
                    return Err(self.err(s, "reach.scheduler", format!("unknown scheduler `{other}`"), "use `local`, `ssh` or `slurm`"))
                }
            },
        };
        let ssh = self.ssh(&f, scheduler)?;
        let remote_dir = match (&f.reach.remote_dir, scheduler) {
            (Some(d), _) if d.get_ref().trim().is_empty() => {
                return Err(self.err(d, "reach.remote_dir", "must not be empty", "give an absolute directory, e.g. `/scratch/$USER/daphne`"))
            }
            (Some(d), Scheduler::Local) => self.path(d.get_ref()).to_string(),
            (Some(d), _) => {
                if d.get_ref().contains('\n') || d.get_ref().contains('\0') {
                    return Err(self.err(d, "reach.remote_dir", "must not contain newlines or NUL", "give a plain directory path"));
                }
                d.get_ref().clone()
            }
            (None, Scheduler::Local) => crate::paths::state_dir(self.root).join("local").to_string(),
            (None, _) => {
                return Err(self.missing(
                    "reach.remote_dir",
                    "for remote targets",
                    "set `remote_dir` under [reach] to a directory on the cluster, e.g. `/scratch/alice/daphne`",
                ))
            }
        };

        let s = &f.schedule;
        let slurm = self.slurm(&s.slurm)?;
        let peers = self.peers(s)?;
        let workers = match scheduler {
            Scheduler::Slurm => (slurm.nodes * slurm.tasks_per_node) as usize,
            Scheduler::Ssh if !peers.is_empty() => peers.len(),
            _ => {
                let from_file = self.int_in(&s.workers, "schedule.workers", 1, 4096, "set `workers` to the number of workers, e.g. `workers = 2`")?;
                self.ov.workers.or(from_file.map(|w| w as usize)).unwrap_or(2)
            }
        };
        if workers == 0 || workers > 4096 {
            // Name what set the number: the SLURM shape or the peer list in the file, or the flag.
            let from_file = match scheduler {
                Scheduler::Slurm => s.slurm.nodes.as_ref().map(|v| (v.span(), "schedule.slurm.nodes")).or_else(|| s.slurm.tasks_per_node.as_ref().map(|v| (v.span(), "schedule.slurm.tasks_per_node"))),
                Scheduler::Ssh if self.ov.peers.is_none() => s.peers.as_ref().map(|v| (v.span(), "schedule.peers")),
                _ => None,
            };
            return Err(match from_file {
                Some((span, key)) => self.src.error(
                    Some(span),
                    key,
                    format!("makes {workers} workers; at most 4096 are supported"),
                    "use fewer nodes, tasks per node or peers",
                ),
                None => self.flag_err("--workers", format!("must be between 1 and 4096 (got {workers})"), "pass a smaller number"),
            });
        }
        if scheduler == Scheduler::Ssh && peers.is_empty() {
            return Err(self.missing(
                "schedule.peers",
                "for the ssh scheduler",
                "list the worker hosts, e.g. `peers = [\"node1\", \"node2:50001\"]`, or pass `--peers node1,node2`",
            ));
        }
        let ports = self.ports(s, scheduler, workers)?;
        let advertise = match &s.advertise {
            None => Advertise::Hostname,
            Some(a) if a.get_ref() == "hostname" => Advertise::Hostname,
            Some(a) => match a.get_ref().strip_prefix("interface:") {
                Some(i) if !i.is_empty() && i.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) => Advertise::Interface(i.into()),
                _ => return Err(self.err(a, "schedule.advertise", format!("`{}` is not an address choice", a.get_ref()), "use `hostname` or `interface:NAME`, e.g. `interface:ib0`")),
            },
        };
        let port_retries = self.int_in(&s.port_retries, "schedule.port_retries", 0, 1000, "give a count, e.g. `port_retries = 16`, or 0 to fail on a taken port")?.unwrap_or(16) as u32;
        let ready_timeout =
            self.int_in(&s.ready_timeout, "schedule.ready_timeout", 1, 86_400, "give seconds, e.g. `ready_timeout = 60`")?.unwrap_or(60) as u64;

        let runtime = match (&self.ov.runtime, &f.container.runtime) {
            (Some(r), _) => Runtime::parse(r).ok_or_else(|| self.flag_err("--runtime", format!("unknown runtime `{r}`"), "use auto, apptainer, singularity or host"))?,
            (None, Some(r)) => Runtime::parse(r.get_ref()).ok_or_else(|| {
                self.err(r, "container.runtime", format!("unknown runtime `{}`", r.get_ref()), "use `auto`, `apptainer`, `singularity` or `host`")
            })?,
            (None, None) if scheduler == Scheduler::Local => Runtime::Host,
            (None, None) => Runtime::Auto,
        };

        let image = self.image(&f)?;
        let source = self.source(&f)?;
        let payload = self.payload(&f)?;
        let run = self.run(&f)?;

        Ok(Config {
            root: self.root.to_owned(),
            target: self.target.to_string(),
            file: self.src.file.map(|p| p.to_owned()),
            description: f.description.unwrap_or_else(|| {
                if self.src.file.is_none() { "this machine: workers on 127.0.0.1, no container".into() } else { String::new() }
            }),
            scheduler,
            ssh,
            remote_dir,
            shared_fs: f.reach.shared_fs.unwrap_or(scheduler != Scheduler::Ssh),
            workers,
            ports,
            peers,
            advertise,
            ready_timeout: Duration::from_secs(ready_timeout),
            port_retries,
            slurm,
            runtime,
            runtime_args: f.container.runtime_args,
            image,
            source,
            payload,
            run,
        })
    }

    fn ssh(&self, f: &TargetFile, scheduler: Scheduler) -> Result<Option<Ssh>, ConfigError> {
        let r = &f.reach;
        let Some(host) = &r.host else {
            if scheduler == Scheduler::Slurm {
                return Err(self.missing("reach.host", "for the slurm scheduler", "set `host` under [reach] to the cluster's login host"));
            }
            return Ok(None);
        };
        if host.get_ref().is_empty() || host.get_ref().starts_with('-') || host.get_ref().chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.err(host, "reach.host", format!("`{}` is not a host name", host.get_ref()), "give a host name, address or ssh_config alias"));
        }
        let port = self.int_in(&r.port, "reach.port", 1, 65535, "give the ssh port, e.g. `port = 22`")?.map(|p| p as u16);
        let identity = match &r.identity {
            Some(i) if i.get_ref().ends_with(".pub") => {
                return Err(self.err(
                    i,
                    "reach.identity",
                    "points at a public key; ssh needs the private key",
                    format!("use `{}`", i.get_ref().trim_end_matches(".pub")),
                ))
            }
            Some(i) => Some(self.path(i.get_ref())),
            None => None,
        };
        let user = match &r.user {
            Some(u) if u.get_ref().is_empty() || u.get_ref().starts_with('-') || u.get_ref().contains(char::is_whitespace) => {
                return Err(self.err(u, "reach.user", "is not a user name", "give the login name on the cluster"))
            }
            u => u.as_ref().map(|u| u.get_ref().clone()),
        };
        let connect_timeout =
            self.int_in(&r.connect_timeout, "reach.connect_timeout", 1, 600, "give seconds, e.g. `connect_timeout = 10`")?.unwrap_or(10) as u32;
        for o in &r.ssh_options {
            if secrets::looks_secret(o) {
                return Err(self.src.error(
                    None,
                    "reach.ssh_options",
                    "holds what looks like a password or token; secrets do not belong in target files",
                    "use an ssh key (`identity`) or an ssh agent instead",
                ));
            }
        }
        Ok(Some(Ssh {
            host: host.get_ref().clone(),
            user,
            port,
            identity,
            proxy_jump: r.proxy_jump.as_ref().map(|p| p.get_ref().clone()),
            known_hosts: r.known_hosts.as_ref().map(|k| self.path(k.get_ref())),
            ssh_config: r.ssh_config.as_ref().map(|k| self.path(k.get_ref())),
            options: r.ssh_options.clone(),
            connect_timeout,
        }))
    }

    fn slurm(&self, s: &schema::Slurm) -> Result<SlurmOpts, ConfigError> {
        let nodes = self.int_in(&s.nodes, "schedule.slurm.nodes", 1, 100_000, "give the number of nodes, e.g. `nodes = 2`")?.unwrap_or(1) as u32;
        let tasks_per_node = self
            .int_in(&s.tasks_per_node, "schedule.slurm.tasks_per_node", 1, 1024, "give the workers per node, e.g. `tasks_per_node = 1`")?
            .unwrap_or(1) as u32;
        for (key, t) in [("schedule.slurm.time", &s.time), ("schedule.slurm.coordinator.time", &s.coordinator.time)] {
            if let Some(t) = t {
                if !valid_slurm_time(t.get_ref()) {
                    return Err(self.err(t, key, format!("`{}` is not a SLURM time", t.get_ref()), "use MM, HH:MM:SS, D-HH or D-HH:MM:SS, e.g. `\"00:30:00\"`"));
                }
            }
        }
        let pending = self.int_in(&s.pending_timeout, "schedule.slurm.pending_timeout", 1, 7 * 86_400, "give seconds, e.g. `pending_timeout = 600`")?;
        let c = &s.coordinator;
        let ntasks = self.int_in(&c.ntasks, "schedule.slurm.coordinator.ntasks", 1, 1024, "e.g. `ntasks = 1`")?;
        let cpus = self.int_in(&c.cpus_per_task, "schedule.slurm.coordinator.cpus_per_task", 1, 1024, "e.g. `cpus_per_task = 4`")?;
        Ok(SlurmOpts {
            partition: s.partition.clone(),
            account: s.account.clone(),
            qos: s.qos.clone(),
            time: s.time.as_ref().map(|t| t.get_ref().clone()),
            nodes,
            tasks_per_node,
            sbatch_args: s.sbatch_args.clone(),
            srun_args: s.srun_args.clone(),
            mpi: s.mpi.clone(),
            pending_timeout: pending.map(|p| Duration::from_secs(p as u64)),
            coordinator_time: c.time.as_ref().map(|t| t.get_ref().clone()),
            coordinator_ntasks: ntasks.map(|n| n as u32),
            coordinator_cpus: cpus.map(|n| n as u32),
        })
    }

    fn peers(&self, s: &schema::Schedule) -> Result<Vec<Peer>, ConfigError> {
        if let Some(list) = &self.ov.peers {
            return list
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| parse_peer(p).map_err(|m| self.flag_err("--peers", m, "use host[:port],host[:port],...")))
                .collect();
        }
        let Some(list) = &s.peers else { return Ok(vec![]) };
        list.get_ref()
            .iter()
            .map(|p| parse_peer(p).map_err(|m| self.err(list, "schedule.peers", m, "use \"host\" or \"host:port\" entries")))
            .collect()
    }

    fn ports(&self, s: &schema::Schedule, scheduler: Scheduler, workers: usize) -> Result<Ports, ConfigError> {
        if let (Some(b), Some(_)) = (&s.port_base, &s.ports) {
            return Err(self.err(b, "schedule.port_base", "cannot be combined with `ports`", "keep either `port_base` or the `ports` list"));
        }
        if let Some(list) = &s.ports {
            let mut out = Vec::new();
            for p in list.get_ref() {
                if !(1..=65535).contains(p) {
                    return Err(self.err(list, "schedule.ports", format!("{p} is not a TCP port"), "use ports between 1024 and 65535"));
                }
                out.push(*p as u16);
            }
            if scheduler != Scheduler::Slurm && out.len() < workers {
                return Err(self.err(
                    list,
                    "schedule.ports",
                    format!("lists {} ports for {workers} workers", out.len()),
                    "give one port per worker, or use `port_base`",
                ));
            }
            let mut sorted = out.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != out.len() && scheduler == Scheduler::Local {
                return Err(self.err(list, "schedule.ports", "lists a port twice", "give each worker its own port"));
            }
            return Ok(Ports::List(out));
        }
        match self.int_in(&s.port_base, "schedule.port_base", 1024, 65535, "use a port between 1024 and 65535, e.g. `port_base = 50000`")? {
            Some(b) => {
                if b as usize + workers > 65536 {
                    let spanned = s.port_base.as_ref().expect("checked above");
                    return Err(self.err(spanned, "schedule.port_base", format!("{b} + {workers} workers runs past port 65535"), "choose a lower port_base"));
                }
                Ok(Ports::Base(b as u16))
            }
            None if scheduler == Scheduler::Local => Ok(Ports::Auto),
            None => Ok(Ports::Base(50000)),
        }
    }

    fn image(&self, f: &TargetFile) -> Result<ImageCfg, ConfigError> {
        let i = &f.image;
        let name = match &i.name {
            Some(n) if !n.get_ref().is_empty() && n.get_ref().chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) => n.get_ref().clone(),
            Some(n) => return Err(self.err(n, "image.name", format!("`{}` is not a file name", n.get_ref()), "use letters, digits, `-`, `_` and `.`")),
            None => "daphne".into(),
        };
        let b = &i.bootstrap;
        let bootstrap = match b.agent.as_ref().map(|a| a.get_ref().as_str()) {
            None | Some("docker") => schema_out::Bootstrap::Docker {
                from: b.from.clone().unwrap_or_else(|| DEFAULT_DOCKER_IMAGE.into()),
                tag: b.tag.clone().unwrap_or_else(|| DEFAULT_DOCKER_TAG.into()),
            },
            Some("localimage") => schema_out::Bootstrap::LocalImage {
                from: b.from.clone().ok_or_else(|| self.missing("image.bootstrap.from", "for the localimage agent", "give the path of the base image"))?,
            },
            Some("debootstrap") => schema_out::Bootstrap::Debootstrap {
                os_version: b.os_version.clone().unwrap_or_else(|| "bookworm".into()),
                mirror_url: b.mirror_url.clone().unwrap_or_else(|| "http://deb.debian.org/debian".into()),
                include: if b.include.is_empty() { vec!["g++".into(), "make".into()] } else { b.include.clone() },
            },
            Some("library") => schema_out::Bootstrap::Library {
                from: b.from.clone().ok_or_else(|| self.missing("image.bootstrap.from", "for the library agent", "give the library image, e.g. `library/default/alpine:3.19`"))?,
            },
            Some(other) => {
                let a = b.agent.as_ref().expect("matched Some");
                return Err(self.err(a, "image.bootstrap.agent", format!("unknown bootstrap agent `{other}`"), "use `docker`, `localimage`, `debootstrap` or `library`"));
            }
        };
        let build_on_login = match &i.build_on {
            None => false,
            Some(b) if b.get_ref() == "local" => false,
            Some(b) if b.get_ref() == "login" => true,
            Some(b) => return Err(self.err(b, "image.build_on", format!("`{}` is not a build place", b.get_ref()), "use `local` or `login`")),
        };
        Ok(ImageCfg {
            sif: i.sif.as_deref().map(|s| self.path(s)).unwrap_or_else(|| crate::paths::state_dir(self.root).join("images").join(format!("{name}.sif"))),
            definition: self.root.join("singularity").join(format!("{name}.def")),
            name,
            fakeroot: i.fakeroot.unwrap_or(false),
            build_args: i.build_args.clone(),
            build_on_login,
            bootstrap,
            files: i.files.clone(),
            post: i.post.clone(),
            environment: i.environment.clone(),
            labels: i.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            runscript: i.runscript.clone(),
            help: i.help.clone(),
            test: i.test.clone(),
        })
    }

    fn source(&self, f: &TargetFile) -> Result<SourceCfg, ConfigError> {
        let s = &f.source;
        let path = s.path.as_ref().map(|p| self.path(p.get_ref())).unwrap_or_else(|| self.root.join("daphne-src"));
        let cmd = |v: &Option<Spanned<Vec<String>>>, key: &str, default: &[&str]| -> Result<Vec<String>, ConfigError> {
            match v {
                Some(c) if c.get_ref().is_empty() || c.get_ref()[0].is_empty() => {
                    Err(self.err(c, key, "must name a program", "give an argv list, e.g. `[\"./build.sh\", \"--target\", \"daphne\"]`"))
                }
                Some(c) => Ok(c.get_ref().clone()),
                None => Ok(default.iter().map(|s| s.to_string()).collect()),
            }
        };
        Ok(SourceCfg {
            path,
            build_daphne: cmd(&s.build_daphne, "source.build_daphne", &["./build.sh", "--target", "daphne"])?,
            build_worker: cmd(&s.build_worker, "source.build_worker", &["./build.sh", "--target", "DistributedWorker"])?,
        })
    }

    fn payload(&self, f: &TargetFile) -> Result<PayloadCfg, ConfigError> {
        let p = &f.payload;
        let globs = p.globs.clone().unwrap_or_else(|| vec!["deploy/examples/*.daph".into()]);
        for (key, list) in [("payload.globs", &globs), ("payload.data", &p.data)] {
            for g in list {
                if let Err(e) = glob::Pattern::new(g) {
                    return Err(self.src.error(None, key, format!("`{g}` is not a valid glob: {e}"), "fix the pattern, e.g. `deploy/examples/*.daph`"));
                }
            }
        }
        let compression = match &p.compression {
            None => Compression::Zstd,
            Some(c) if c.get_ref() == "zstd" => Compression::Zstd,
            Some(c) if c.get_ref() == "gzip" => Compression::Gzip,
            Some(c) => return Err(self.err(c, "payload.compression", format!("unknown compression `{}`", c.get_ref()), "use `zstd` or `gzip`")),
        };
        let level = match (compression, &p.level) {
            (_, None) => None,
            (Compression::Zstd, l) => self.int_in(l, "payload.level", 1, 19, "zstd levels run from 1 to 19")?.map(|l| l as i32),
            (Compression::Gzip, l) => self.int_in(l, "payload.level", 1, 9, "gzip levels run from 1 to 9")?.map(|l| l as i32),
        };
        Ok(PayloadCfg {
            globs,
            data: p.data.clone(),
            require_match: p.require_match.unwrap_or(false),
            compression,
            level,
            include_sif: p.include_sif.unwrap_or(false),
        })
    }

    fn run(&self, f: &TargetFile) -> Result<RunCfg, ConfigError> {
        let backend = match (&self.ov.dist_backend, &f.run.dist_backend) {
            (Some(b), _) if ["sync-gRPC", "async-gRPC", "MPI"].contains(&b.as_str()) => b.clone(),
            (Some(b), _) => return Err(self.flag_err("--dist-backend", format!("unknown backend `{b}`"), "use sync-gRPC, async-gRPC or MPI")),
            (None, b) => match b {
            None => "sync-gRPC".to_string(),
            Some(b) if ["sync-gRPC", "async-gRPC", "MPI"].contains(&b.get_ref().as_str()) => b.get_ref().clone(),
            Some(b) => return Err(self.err(b, "run.dist_backend", format!("unknown backend `{}`", b.get_ref()), "use `sync-gRPC`, `async-gRPC` or `MPI`")),
            },
        };
        for a in &f.run.args {
            if !a.contains('=') {
                return Err(self.src.error(None, "run.args", format!("`{a}` is not of the form name=value"), "write script arguments as `name=value`"));
            }
        }
        Ok(RunCfg { script: f.run.script.clone().unwrap_or_else(|| "deploy/examples/sum.daph".into()), args: f.run.args.clone(), dist_backend: backend })
    }
}

/// `host` or `host:port`.
pub fn parse_peer(p: &str) -> Result<Peer, String> {
    let p = p.trim();
    let (host, port) = match p.rsplit_once(':') {
        Some((h, port)) => (h, Some(port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("`{p}`: `{port}` is not a port"))?)),
        None => (p, None),
    };
    if host.is_empty() || host.starts_with('-') || !host.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
        return Err(format!("`{p}` is not a valid peer"));
    }
    Ok(Peer { host: host.into(), port })
}

/// SLURM time formats: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`, or `UNLIMITED`.
pub fn valid_slurm_time(t: &str) -> bool {
    if t == "UNLIMITED" || t == "INFINITE" {
        return true;
    }
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, t),
    };
    let num = |s: &str| !s.is_empty() && s.len() <= 4 && s.chars().all(|c| c.is_ascii_digit());
    if days.is_some_and(|d| !num(d)) {
        return false;
    }
    let parts: Vec<&str> = rest.split(':').collect();
    let max = 3;
    !parts.is_empty() && parts.len() <= max && parts.iter().all(|p| num(p)) && (days.is_none() || !parts.is_empty())
}

/// `~/x` → `$HOME/x`; anything else unchanged.
pub fn expand_home(p: &str) -> Utf8PathBuf {
    match (p.strip_prefix("~/"), std::env::var("HOME")) {
        (Some(rest), Ok(home)) => Utf8PathBuf::from(home).join(rest),
        _ => Utf8PathBuf::from(p),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)] mod fuzz;
