//! Compile the `daphne` and `DistributedWorker` targets, in the container or on the host.
//!
//! Outputs are collected into `target/xtask/builds/<key>/`, where the key hashes the
//! sources, the image and the build commands: two builds of different inputs never share a
//! directory, and a build whose inputs are unchanged is skipped.

use crate::config::{Config, Runtime};
use crate::plan::{Arg, Stage, Step};
use crate::stages::{container, facts::Facts};
use anyhow::{bail, Result};
use camino::Utf8Path;
use sha2::{Digest, Sha256};

/// Which targets `build --only` rebuilds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Only {
    Daphne,
    Worker,
}

/// Directories of a source tree that hold outputs or dependencies, not sources.
const NOT_SOURCES: &[&str] = &[".git", "bin", "lib", "build", "thirdparty", "tmp", "target"];

/// Marks a build directory as complete; written last, so a half-copied one never counts.
const COMPLETE: &str = ".complete";

pub fn is_complete(dir: &Utf8Path) -> bool {
    dir.join(COMPLETE).is_file()
}

/// Hash of everything a build depends on: source files (path, size, mtime), the image, and
/// the build commands.
pub fn build_key(cfg: &Config, runtime_bin: Option<&str>, definition_hash: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"daphne-build-v1\0");
    fingerprint_tree(&cfg.source.path, &cfg.source.path, &mut h);
    match runtime_bin {
        None => h.update(b"runtime=host\0"),
        Some(bin) => {
            // The image is identified by its definition's hash, which labels the SIF it builds.
            h.update(format!("runtime={bin}\0image={}\0{definition_hash}\0", cfg.image.sif).as_bytes());
        }
    }
    for cmd in [&cfg.source.build_daphne, &cfg.source.build_worker] {
        for a in cmd {
            h.update(a.as_bytes());
            h.update(b"\0");
        }
        h.update(b"\n");
    }
    format!("{:x}", h.finalize())[..16].to_string()
}

fn fingerprint_tree(root: &Utf8Path, dir: &Utf8Path, h: &mut Sha256) {
    let Ok(rd) = dir.read_dir_utf8() else { return };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by(|a, b| a.file_name().cmp(b.file_name()));
    for e in entries {
        let path = e.path();
        let rel = path.strip_prefix(root).unwrap_or(path);
        let Ok(meta) = e.path().symlink_metadata() else { continue };
        if meta.is_dir() {
            if dir == root && NOT_SOURCES.contains(&e.file_name()) {
                continue;
            }
            fingerprint_tree(root, path, h);
        } else {
            use std::os::unix::fs::MetadataExt;
            h.update(format!("{rel}\0{}\0{}.{}\0{:o}\n", meta.len(), meta.mtime(), meta.mtime_nsec(), meta.mode()).as_bytes());
        }
    }
}

/// Plans the compile stage.
pub fn plan(cfg: &Config, facts: &Facts, only: Option<Only>, force: bool) -> Result<Stage> {
    let src = &cfg.source.path;
    if !facts.source_exists {
        bail!(
            "build: the DAPHNE source tree {src} does not exist\n  fix: set `path` under [source] in the target file to your DAPHNE checkout, or restore daphne-src/ (git checkout daphne-src)"
        );
    }
    let out = crate::paths::builds_dir(&cfg.root).join(&facts.build_key);
    if facts.build_cached && !force && only.is_none() {
        return Ok(Stage::skip("build", format!("sources, image and build commands unchanged (build {})", facts.build_key)));
    }
    // build.sh writes into the source tree: one build of a tree at a time.
    let lock = crate::paths::state_dir(&cfg.root).join("locks").join(format!("build-{:x}.lock", Sha256::digest(src.as_str().as_bytes())));
    let mut steps = vec![Step::Lock { path: lock, what: format!("build of {src}") }];
    let image = cfg.image.sif.clone();
    if cfg.runtime != Runtime::Host {
        if let Some(why) = &facts.runtime_missing {
            bail!("build: no container runtime: {why}\n  fix: install Apptainer (on Debian 12: `cargo xtask testbed install`), or use `--runtime host` to build without a container");
        }
    }
    match (cfg.runtime, &facts.runtime_bin) {
        (Runtime::Host, _) => steps.push(Step::Note("runtime `host`: building directly on this machine, without a container".into())),
        (_, Some(bin)) => {
            steps.push(Step::Note(format!("building inside the container image {image} with `{bin} exec`")));
            steps.push(Step::RequireFile { path: image.clone(), hint: format!("build the image first: `cargo xtask singularity --target {}`", cfg.target) });
        }
        (_, None) => bail!(
            "build: no container runtime found ({})\n  fix: install Apptainer (`cargo xtask testbed install` does it on Debian 12), or use `--runtime host`",
            facts.runtime_missing.as_deref().unwrap_or("none configured")
        ),
    }
    let targets: Vec<(&str, &Vec<String>)> = [("daphne", &cfg.source.build_daphne), ("worker", &cfg.source.build_worker)]
        .into_iter()
        .filter(|(name, _)| match only {
            None => true,
            Some(Only::Daphne) => *name == "daphne",
            Some(Only::Worker) => *name == "worker",
        })
        .collect();
    for (name, argv) in targets {
        let argv: Vec<Arg> = argv.iter().map(|a| Arg::lit(a.clone())).collect();
        let cmd = container::exec(cfg, facts.runtime_bin.as_deref(), &image, &[src.as_path()], Some(src), argv);
        steps.push(Step::Exec { cmd, log: format!("build-{name}.log") });
    }
    steps.push(Step::CollectArtifacts { from: src.clone(), to: out });
    let why = match (only, force, facts.build_cached) {
        (Some(Only::Worker), _, _) => "rebuilding only the worker target (--only worker)".to_string(),
        (Some(Only::Daphne), _, _) => "rebuilding only the daphne target (--only daphne)".to_string(),
        (None, true, _) => "--force".to_string(),
        _ => format!("no complete build {} of these inputs yet", facts.build_key),
    };
    Ok(Stage::run("build", why, steps))
}

/// Copies `bin/` and `lib/` from the source tree into the keyed build directory, through a
/// temp directory and a rename so a reader never sees half a build.
pub fn collect(from: &Utf8Path, to: &Utf8Path) -> Result<usize> {
    use anyhow::Context;
    let parent = to.parent().expect("build dirs have a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {parent}"))?;
    let tmp = tempfile::Builder::new().prefix(".collect-").tempdir_in(parent).with_context(|| format!("cannot create a temp dir in {parent}"))?;
    let tmp_path = Utf8Path::from_path(tmp.path()).context("non-UTF-8 temp path")?.to_owned();
    let mut files = 0;
    for sub in ["bin", "lib"] {
        let src = from.join(sub);
        if !src.is_dir() {
            bail!("build: the build produced no {src}/\n  fix: check the build log; the build command must put its outputs in bin/ and lib/");
        }
        files += copy_tree(&src, &tmp_path.join(sub))?;
    }
    std::fs::write(tmp_path.join(COMPLETE), b"")?;
    if to.exists() {
        std::fs::remove_dir_all(to).with_context(|| format!("cannot replace {to}"))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, to).with_context(|| format!("cannot move the build into {to}"))?;
    Ok(files)
}

/// Copies a tree, keeping symlinks as symlinks and file modes.
fn copy_tree(from: &Utf8Path, to: &Utf8Path) -> Result<usize> {
    use anyhow::Context;
    std::fs::create_dir_all(to)?;
    let mut n = 0;
    for e in from.read_dir_utf8().with_context(|| format!("cannot read {from}"))? {
        let e = e?;
        let meta = e.path().symlink_metadata()?;
        let dest = to.join(e.file_name());
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path())?, &dest)?;
        } else if meta.is_dir() {
            n += copy_tree(e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), &dest).with_context(|| format!("cannot copy {} to {dest}", e.path()))?;
            n += 1;
        }
    }
    Ok(n)
}
