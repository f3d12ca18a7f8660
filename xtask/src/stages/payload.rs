//! Package the build artifacts and the user payload into one reproducible tarball.
//!
//! Layout inside the package: `bin/`, `lib/` (the build), and `payload/<path>` for every
//! script and data file, keeping its path relative to the project root, so
//! `deploy/examples/sum.daph` runs as `<release>/payload/deploy/examples/sum.daph`.

use crate::config::{self, Config};
use crate::package::{self, Compression, Entry, ImageRef, PackSpec, Packed};
use crate::plan::{Stage, Step};
use crate::stages::facts::{self, Facts};
use crate::ui;
use anyhow::{bail, Context, Result};
use camino::{Utf8Path, Utf8PathBuf};

pub fn plan(cfg: &Config, facts: &Facts) -> Stage {
    let build_dir = crate::paths::builds_dir(&cfg.root).join(&facts.build_key);
    let out_dir = crate::paths::packages_dir(&cfg.root);
    Stage::run(
        "package",
        "an identical package (same content hash) is reused without compressing",
        vec![Step::Pack { build_dir, out_dir }],
    )
}

/// Where a payload file goes inside the package.
pub fn archive_path(root: &Utf8Path, file: &Utf8Path) -> String {
    match file.strip_prefix(root) {
        Ok(rel) => format!("payload/{rel}"),
        Err(_) => format!("payload/data/{}", file.file_name().unwrap_or("file")),
    }
}

/// Expands the configured globs (relative to the project root) into files.
pub fn payload_files(cfg: &Config) -> Result<Vec<Utf8PathBuf>> {
    let mut files = vec![];
    for pattern in cfg.payload.globs.iter().chain(&cfg.payload.data) {
        let full = if Utf8Path::new(pattern).is_absolute() { pattern.clone() } else { cfg.root.join(pattern).to_string() };
        let mut matched = 0;
        for p in glob::glob(&full).with_context(|| format!("payload: `{pattern}` is not a valid glob"))? {
            let p = p.with_context(|| format!("payload: cannot read a match of `{pattern}`"))?;
            let p = Utf8PathBuf::from_path_buf(p).map_err(|p| anyhow::anyhow!("payload: {} is not UTF-8", p.display()))?;
            if p.is_file() {
                files.push(p);
                matched += 1;
            }
        }
        if matched == 0 {
            let msg = format!("payload: `{pattern}` matches no file");
            if cfg.payload.require_match {
                bail!("{msg}\n  fix: correct the glob under [payload], or add the files (require_match = true makes this an error)");
            }
            ui::warn(&msg);
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// The payload entries: build artifacts, then scripts and data.
pub fn entries(cfg: &Config, build_dir: &Utf8Path) -> Result<Vec<Entry>> {
    if !crate::stages::compile::is_complete(build_dir) {
        bail!(
            "package: no complete build at {}\n  fix: run `cargo xtask build --target {}` first",
            crate::paths::display(&cfg.root, build_dir),
            cfg.target
        );
    }
    let mut out = vec![];
    for sub in ["bin", "lib"] {
        collect_dir(&build_dir.join(sub), sub, &mut out)?;
    }
    for required in ["bin/daphne", "bin/DistributedWorker"] {
        if !out.iter().any(|e| e.archive_path == required) {
            bail!("package: the build has no {required}\n  fix: run `cargo xtask build --target {}` (without --only) to build both targets", cfg.target);
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for f in payload_files(cfg)? {
        let path = archive_path(&cfg.root, &f);
        if !seen.insert(path.clone()) {
            bail!("package: two payload files would both be stored as {path}\n  fix: rename one of them");
        }
        out.push(Entry::new(path, f));
    }
    Ok(out)
}

fn collect_dir(dir: &Utf8Path, prefix: &str, out: &mut Vec<Entry>) -> Result<()> {
    let rd = dir.read_dir_utf8().with_context(|| format!("package: cannot read {dir}\n  fix: run `cargo xtask build`"))?;
    for e in rd {
        let e = e?;
        let name = e.file_name();
        if name.starts_with('.') {
            continue;
        }
        let arch = format!("{prefix}/{name}");
        let meta = e.path().symlink_metadata()?;
        if meta.is_dir() {
            collect_dir(e.path(), &arch, out)?;
        } else {
            out.push(Entry::new(arch, e.path()).with_hint("run `cargo xtask build`"));
        }
    }
    Ok(())
}

/// Archive time: `SOURCE_DATE_EPOCH`, else the commit time, else 0.
pub fn mtime(root: &Utf8Path) -> u64 {
    std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.trim().parse().ok()).or_else(|| facts::commit_time(root)).unwrap_or(0)
}

pub fn compression(cfg: &Config) -> Compression {
    match cfg.payload.compression {
        config::Compression::Zstd => Compression::Zstd { level: cfg.payload.level.unwrap_or(package::DEFAULT_ZSTD_LEVEL) },
        config::Compression::Gzip => Compression::Gzip { level: cfg.payload.level.map(|l| l as u32).unwrap_or(package::DEFAULT_GZIP_LEVEL) },
    }
}

/// The container image the package runs in: its definition hash, where the SIF lives on the
/// target, and whether the package carries the SIF itself (`payload.include_sif`).
pub fn image_ref(cfg: &Config, facts: &Facts) -> Option<ImageRef> {
    facts.runtime_bin.as_ref()?;
    let hash = facts.definition.hash.clone();
    let sif_remote_path = match cfg.scheduler {
        config::Scheduler::Local => cfg.image.sif.to_string(),
        _ => format!("{}/images/{hash}.sif", cfg.remote_dir.trim_end_matches('/')),
    };
    Some(ImageRef { hash, sif_remote_path, included: cfg.payload.include_sif })
}

/// Packs; called by the executor for `Step::Pack`.
pub fn pack(cfg: &Config, facts: &Facts, build_dir: &Utf8Path, out_dir: &Utf8Path, image: Option<ImageRef>) -> Result<Packed> {
    let mut entries = entries(cfg, build_dir)?;
    if let Some(img) = image.as_ref().filter(|i| i.included) {
        if !cfg.image.sif.is_file() {
            bail!("package: `include_sif = true` but the image {} does not exist\n  fix: run `cargo xtask singularity --target {}` first", cfg.image.sif, cfg.target);
        }
        entries.push(Entry::new(format!("image/{}.sif", img.hash), cfg.image.sif.clone()).with_hint("run `cargo xtask singularity`"));
    }
    let spec = PackSpec {
        entries,
        compression: compression(cfg),
        mtime: mtime(&cfg.root),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        source_commit: facts.commit.clone(),
        source_dirty: facts.dirty,
        image,
        target: cfg.target.clone(),
        out_dir: out_dir.to_owned(),
    };
    let mut bar = crate::ui::ByteProgress::new("packing");
    let started = std::time::Instant::now();
    let packed = package::pack(&spec, &mut |d, t| bar.update(d, t));
    bar.finish();
    let packed = packed?;
    if !packed.skipped {
        let input: u64 = spec.entries.iter().filter_map(|e| e.source.metadata().ok()).map(|m| m.len()).sum();
        crate::ui::detail(&format!("packed {} in {:.2}s ({})", crate::ui::bytes(input), started.elapsed().as_secs_f64(), crate::ui::rate(input, started.elapsed().as_secs_f64())));
    }
    Ok(packed)
}
