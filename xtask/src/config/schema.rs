//! The TOML schema of a target file, exactly as users write it.
//!
//! Every table denies unknown keys, so a typo is an error with a line number instead of a
//! silently ignored setting. Values that need checks beyond their type are `Spanned`, so the
//! validator can point at the line that holds them.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    /// One line shown by `cargo xtask targets`.
    pub description: Option<String>,
    #[serde(default)]
    pub reach: Reach,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default)]
    pub container: Container,
    #[serde(default)]
    pub image: Image,
    #[serde(default)]
    pub source: Source,
    #[serde(default)]
    pub payload: Payload,
    #[serde(default)]
    pub run: Run,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reach {
    /// `local`, `ssh` or `slurm`.
    pub scheduler: Option<Spanned<String>>,
    /// Login host (ssh destination). A `Host` alias from `~/.ssh/config` works too.
    pub host: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    pub port: Option<Spanned<i64>>,
    /// Private key file. Never the `.pub` file.
    pub identity: Option<Spanned<String>>,
    /// ProxyJump, e.g. `gateway.example.org` or `user@gw:2222`.
    pub proxy_jump: Option<Spanned<String>>,
    /// Known-hosts file to verify host keys against (default: the user's own).
    pub known_hosts: Option<Spanned<String>>,
    /// An ssh_config file to use instead of `~/.ssh/config`.
    pub ssh_config: Option<Spanned<String>>,
    /// Extra `-o Key=Value` options for ssh.
    #[serde(default)]
    pub ssh_options: Vec<String>,
    /// Seconds to wait for the TCP connection to the login host.
    pub connect_timeout: Option<Spanned<i64>>,
    /// Where deployments live on the target: `releases/`, `runs/`, `images/`.
    pub remote_dir: Option<Spanned<String>>,
    /// Whether every node sees `remote_dir` (true on HPC). The ssh scheduler uploads once per
    /// host when false.
    pub shared_fs: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Number of workers (local and ssh schedulers; slurm derives it from nodes × tasks).
    pub workers: Option<Spanned<i64>>,
    /// First worker port; worker k listens on `port_base + k` (slurm: `+ SLURM_LOCALID`).
    pub port_base: Option<Spanned<i64>>,
    /// Explicit port per worker, instead of `port_base`.
    pub ports: Option<Spanned<Vec<i64>>>,
    /// Peers for the ssh scheduler: `host` or `host:port`.
    pub peers: Option<Spanned<Vec<String>>>,
    /// Address that workers advertise: `hostname` (default) or `interface:NAME`.
    pub advertise: Option<Spanned<String>>,
    /// Seconds that `wait` gives every worker to become ready.
    pub ready_timeout: Option<Spanned<i64>>,
    /// How often a worker whose port is taken on its node may move on to another port
    /// (0: fail and report the port instead).
    pub port_retries: Option<Spanned<i64>>,
    #[serde(default)]
    pub slurm: Slurm,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slurm {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Wall time of the workers' job, in SLURM syntax (`HH:MM:SS`, `D-HH:MM`).
    pub time: Option<Spanned<String>>,
    pub nodes: Option<Spanned<i64>>,
    pub tasks_per_node: Option<Spanned<i64>>,
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    #[serde(default)]
    pub srun_args: Vec<String>,
    /// MPI plugin for `--dist_backend=MPI` (`srun --mpi=...`).
    pub mpi: Option<String>,
    /// Seconds the workers' job may stay pending before it is cancelled.
    pub pending_timeout: Option<Spanned<i64>>,
    #[serde(default)]
    pub coordinator: CoordinatorLimits,
}

/// Limits of the coordinator's own step, separate from the workers' job.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorLimits {
    pub time: Option<Spanned<String>>,
    pub ntasks: Option<Spanned<i64>>,
    pub cpus_per_task: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// `auto`, `apptainer`, `singularity` or `host`.
    pub runtime: Option<Spanned<String>>,
    /// Extra arguments for `apptainer exec` (e.g. `--nv`, `--bind`).
    #[serde(default)]
    pub runtime_args: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// Name of the definition: `singularity/<name>.def` and `<name>.sif`.
    pub name: Option<Spanned<String>>,
    /// Where the SIF is built locally (default `target/xtask/images/<name>.sif`).
    pub sif: Option<String>,
    /// `apptainer build --fakeroot`.
    pub fakeroot: Option<bool>,
    #[serde(default)]
    pub build_args: Vec<String>,
    /// `local` or `login`: build the image here, or on the target's login node.
    pub build_on: Option<Spanned<String>>,
    #[serde(default)]
    pub bootstrap: Bootstrap,
    #[serde(default)]
    pub files: Vec<String>,
    #[serde(default)]
    pub post: Vec<String>,
    #[serde(default)]
    pub environment: Vec<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    pub runscript: Option<String>,
    pub help: Option<String>,
    pub test: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// `docker`, `localimage`, `debootstrap` or `library`.
    pub agent: Option<Spanned<String>>,
    /// docker/library: the image; localimage: the path of the base image.
    pub from: Option<String>,
    /// docker: the tag appended to `from`.
    pub tag: Option<String>,
    pub os_version: Option<String>,
    pub mirror_url: Option<String>,
    #[serde(default)]
    pub include: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The DAPHNE source tree (default: the stand-in in `daphne-src/`).
    pub path: Option<Spanned<String>>,
    /// Build command of the coordinator target, run from the source root.
    pub build_daphne: Option<Spanned<Vec<String>>>,
    /// Build command of the worker target.
    pub build_worker: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// Globs, relative to the project root, of the scripts to ship.
    pub globs: Option<Vec<String>>,
    /// Data files or globs to ship as well.
    #[serde(default)]
    pub data: Vec<String>,
    /// Fail instead of warning when a glob matches nothing.
    pub require_match: Option<bool>,
    /// `zstd` (default) or `gzip` (for old clusters without zstd).
    pub compression: Option<Spanned<String>>,
    pub level: Option<Spanned<i64>>,
    /// Ship the SIF inside the payload instead of storing it once per image hash.
    pub include_sif: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// Script that `deploy` and `run` use when none is given.
    pub script: Option<String>,
    /// Script arguments (`name=value`) that `deploy` passes.
    #[serde(default)]
    pub args: Vec<String>,
    /// `sync-gRPC` (default), `async-gRPC` or `MPI`.
    pub dist_backend: Option<Spanned<String>>,
}
