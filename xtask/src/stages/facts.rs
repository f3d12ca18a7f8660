//! Read-only observations that planning needs: what is installed, what is already built.
//!
//! Gathering facts touches nothing, so `--dry-run` can use them too; `plan` stays pure by
//! taking them as input.

use crate::config::{Config, Runtime};
use crate::proc;
use crate::stages::compile;

#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    /// `apptainer` or `singularity` when a container runtime will be used.
    pub runtime_bin: Option<String>,
    /// Why no runtime could be found, when one is needed.
    pub runtime_missing: Option<String>,
    /// Key of the build directory for these sources, image and build commands.
    pub build_key: String,
    pub build_cached: bool,
    pub source_exists: bool,
    /// Source commit (or `unknown`) and whether the tree has uncommitted changes.
    pub commit: String,
    pub dirty: bool,
    /// The definition the config generates, and the hash recorded in the built SIF.
    pub definition: crate::stages::definition::Definition,
    pub image_hash: Option<String>,
}

pub fn gather(cfg: &Config) -> Facts {
    let (runtime_bin, runtime_missing) = resolve_runtime(cfg.runtime);
    let definition = crate::stages::definition::generate(cfg);
    let image_hash = match (&runtime_bin, &runtime_missing) {
        (Some(bin), None) => crate::stages::image::built_hash(bin, &cfg.image.sif),
        _ => None,
    };
    let build_key = compile::build_key(cfg, runtime_bin.as_deref(), &definition.hash);
    let build_cached = compile::is_complete(&crate::paths::builds_dir(&cfg.root).join(&build_key));
    let (commit, dirty) = git_state(&cfg.root);
    Facts { runtime_bin, runtime_missing, build_key, build_cached, source_exists: cfg.source.path.is_dir(), commit, dirty, definition, image_hash }
}

/// `auto` picks Apptainer, then Singularity; `host` needs none.
pub fn resolve_runtime(r: Runtime) -> (Option<String>, Option<String>) {
    let found = |p: &str| proc::which(p).map(|_| p.to_string());
    match r {
        Runtime::Host => (None, None),
        Runtime::Auto => match found("apptainer").or_else(|| found("singularity")) {
            Some(b) => (Some(b), None),
            None => (None, Some("neither `apptainer` nor `singularity` is on PATH".into())),
        },
        Runtime::Apptainer | Runtime::Singularity => {
            let name = r.name();
            match found(name) {
                Some(b) => (Some(b), None),
                None => (Some(name.to_string()), Some(format!("`{name}` is not on PATH"))),
            }
        }
    }
}

/// The project's commit and dirty flag, from git; `unknown` outside a checkout.
pub fn git_state(root: &camino::Utf8Path) -> (String, bool) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["-c", "safe.directory=*"])
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            (commit, dirty)
        }
        None => ("unknown".into(), false),
    }
}

/// Seconds since the epoch of the HEAD commit, for reproducible archive times.
pub fn commit_time(root: &camino::Utf8Path) -> Option<u64> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["-c", "safe.directory=*", "log", "-1", "--format=%ct"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
