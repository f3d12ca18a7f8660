//! The command line. Subcommands mirror the seed's steps; `deploy` runs them all in order.

use camino::Utf8PathBuf;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    version,
    about = "Build DAPHNE in Singularity/Apptainer and deploy it to SLURM clusters",
    long_about = "Build DAPHNE in Singularity/Apptainer and deploy it to SLURM clusters.\n\n\
        The sweep: singularity -> build -> package -> upload -> start -> wait -> run -> logs -> stop -> clean.\n\
        `cargo xtask deploy` runs all of it; each step is also a subcommand. Targets are files\n\
        deploy/targets/<name>.toml; the built-in `local` target needs none.",
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Target to deploy to: deploy/targets/<NAME>.toml, or the built-in `local`.
    #[arg(long, global = true, default_value = "local", value_name = "NAME")]
    pub target: String,
    /// Print the plan (every stage and command) and touch nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// Use this target file instead of looking the target up by name.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<Utf8PathBuf>,
    /// Override the container runtime: auto, apptainer, singularity or host.
    #[arg(long, global = true, value_name = "RUNTIME")]
    pub runtime: Option<String>,
    /// DAPHNE's distributed backend: sync-gRPC, async-gRPC, or MPI (workers as MPI ranks).
    #[arg(long = "dist-backend", alias = "dist_backend", global = true, value_name = "BACKEND")]
    pub dist_backend: Option<String>,
    /// Act on this run instead of the target's current deployment.
    #[arg(long = "run", global = true, value_name = "RUN_ID")]
    pub run_id: Option<String>,
    /// Print only errors and the coordinator's output.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Print more detail (timings, log paths).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// One JSON event per line on stdout (stage start/finish/skip, progress, output, error, summary).
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnlyTarget {
    Daphne,
    Worker,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Generate singularity/<name>.def from the target's config and build the image (SIF).
    Singularity {
        /// Fail when the committed definition differs from what the config generates.
        #[arg(long)]
        check: bool,
        /// Rebuild the image even when one with the same definition hash exists.
        #[arg(long)]
        force: bool,
    },
    /// Compile the `daphne` and `DistributedWorker` targets (inside the container).
    Build {
        /// Rebuild only this target and keep the other's artifacts.
        #[arg(long, value_enum)]
        only: Option<OnlyTarget>,
        /// Build even when sources, image and build commands are unchanged.
        #[arg(long)]
        force: bool,
    },
    /// Pack the build and the payload into a reproducible, checksummed tarball.
    Package {
        /// Verify a package (manifest and SHA256SUMS) instead of building one.
        #[arg(long, value_name = "FILE")]
        verify: Option<Utf8PathBuf>,
        /// Also copy the package, its .sha256 and its manifest into DIR.
        #[arg(long, value_name = "DIR")]
        out: Option<Utf8PathBuf>,
    },
    /// Write the payload package, its .sha256 and manifest into target/dist/ for CI.
    Dist,
    /// Send the package to the target and install it as releases/<hash>/.
    #[command(alias = "transfer")]
    Upload,
    /// Start the workers and record the deployment.
    Start(Workers),
    /// Show the deployment's workers, up or down.
    Status,
    /// Wait until every worker accepts connections.
    Wait {
        /// Seconds to wait (default: the target's ready_timeout).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Run the coordinator against the running workers.
    Run(RunArgs),
    /// Stop the workers and collect their logs.
    Stop,
    /// Collect the logs of the deployment (or of RUN_ID) into its run directory and show them.
    Logs {
        /// A past run (see `cargo xtask runs`).
        run: Option<String>,
    },
    /// Remove the run's state on the target; --all also prunes unused releases.
    Clean {
        #[arg(long)]
        all: bool,
    },
    /// The whole sweep: singularity, build, package, upload, start, wait, run, logs, stop, clean.
    Deploy {
        #[command(flatten)]
        workers: Workers,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Show the whole sweep's plan (the same as `deploy --dry-run`).
    Plan,
    /// List past runs.
    Runs,
    /// List the known targets.
    Targets,
    /// A real SLURM cluster on this machine for tests and trials (needs root).
    Testbed {
        #[command(subcommand)]
        action: Testbed,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions {
        shell: clap_complete::Shell,
    },
    /// Check each prerequisite of a target and say how to fix what is missing.
    Doctor,
    /// Run a benchmark side by side with its baseline and print the ratio.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum Bench {
    /// Packaging vs `tar czf` on the same generated tree of binaries and libraries.
    Package {
        /// Size of the generated tree in MiB.
        #[arg(long, default_value_t = 300)]
        size_mb: u64,
    },
    /// Time to all workers ready, few vs many workers per node (use --target testbed).
    Readiness {
        #[arg(long, default_value_t = 1)]
        small: u32,
        #[arg(long, default_value_t = 16)]
        large: u32,
    },
    /// A first deploy from a clean state vs a redeploy with nothing changed (use --target testbed).
    Redeploy,
    /// SSH handshakes of one deploy (use --target testbed).
    Handshakes,
    /// Clean build time of the xtask crate, and its costliest dependencies.
    Build,
    /// Everything above, side by side, written to BENCHMARKS.md (use --target testbed).
    All,
}

#[derive(Debug, Clone, Default, Args)]
pub struct Workers {
    /// Number of workers (local and ssh schedulers).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Worker hosts for the ssh scheduler: host[:port],...
    #[arg(long, value_name = "PEERS")]
    pub peers: Option<String>,
}

/// `SCRIPT [NAME=VALUE ...]`. One positional holds the script and its arguments, so that
/// everything after SCRIPT is the script's, even a first argument that looks like one of our
/// flags (`--target=x`, `--help=1`); with two positionals clap would still parse flags until
/// the second one had its first value.
#[derive(Debug, Clone, Default)]
pub struct RunArgs {
    /// The DaphneDSL script: a payload path, a local file, or `-` for stdin
    /// (default: the target's run.script).
    pub script: Option<String>,
    /// Script arguments, name=value, passed through unchanged.
    pub args: Vec<String>,
}

const SCRIPT_AND_ARGS: &str = "script_and_args";

impl clap::FromArgMatches for RunArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut words = m.get_many::<String>(SCRIPT_AND_ARGS).map(|w| w.cloned().collect::<Vec<_>>()).unwrap_or_default().into_iter();
        Ok(RunArgs { script: words.next(), args: words.collect() })
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for RunArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.arg(
            clap::Arg::new(SCRIPT_AND_ARGS)
                .value_name("SCRIPT [NAME=VALUE]")
                .help("The DaphneDSL script (a payload path, a local file, or `-` for stdin; default: the target's run.script), then its arguments, name=value, passed through unchanged")
                .num_args(0..)
                .action(clap::ArgAction::Append)
                .trailing_var_arg(true)
                .allow_hyphen_values(true),
        )
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Testbed {
    /// Install what the testbed needs (slurm-wlm, munge, openssh-server, iproute2, rsync, Apptainer).
    Install,
    /// Bring up login + N nodes and write the `testbed` target.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
    },
    /// Remove everything `up` created; safe to run twice.
    Down,
    /// Show the nodes and their SLURM state.
    Status,
    /// Fault hooks: `crash NODE`, `netcut NODE [down|up]`, `restart-slurmd NODE`.
    Fault {
        #[arg(required = true, num_args = 1..)]
        args: Vec<String>,
    },
}
