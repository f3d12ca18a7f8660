//! Payload packaging: reproducible tarball, manifest, checksums, verify and extract.
//!
//! A package is `daphne-payload-<hash16>.tar.zst` (or `.tar.gz`) holding `manifest.json`,
//! `SHA256SUMS` and the payload files. The name derives from the manifest, which lists every
//! file's sha256, so identical inputs give the identical name and bytes, and an existing
//! package can be reused without compressing anything.

mod archive;
pub mod bench;
mod manifest;
mod paths;
mod verify;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read};

use anyhow::{bail, Context, Result};
use camino::{Utf8Path, Utf8PathBuf};
use sha2::{Digest, Sha256};

use archive::{Item, Progress};
use manifest::{hex, sha256_hex, MANIFEST_FORMAT, MANIFEST_NAME, SUMS_NAME};
pub use manifest::{FileRecord, ImageRef, Manifest};
pub use verify::{extract, verify};

/// Default zstd level: meets both targets of the packaging issue on a 2-core machine
/// (>= 3x faster than `tar czf`, smaller than gzip -6); see `bench`.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Default gzip level, the same as `gzip`'s own default.
pub const DEFAULT_GZIP_LEVEL: u32 = 6;
/// File name prefix of every package.
pub const PACKAGE_PREFIX: &str = "daphne-payload-";

/// Read buffer for hashing input files.
const READ_BUFFER: usize = 1 << 20;

/// Archive compression; zstd by default, gzip for clusters whose tar lacks `--zstd`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Compression {
    Zstd { level: i32 },
    Gzip { level: u32 },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd {
            level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

impl Compression {
    /// File extension of packages using this compression.
    pub fn extension(&self) -> &'static str {
        match self {
            Compression::Zstd { .. } => "tar.zst",
            Compression::Gzip { .. } => "tar.gz",
        }
    }

    /// Rejects levels the compressor would refuse halfway through packing.
    fn validate(&self) -> Result<()> {
        match *self {
            Compression::Zstd { level } => {
                let range = zstd::compression_level_range();
                if !range.contains(&level) {
                    bail!(
                        "zstd compression level {level} is out of range {}..={}",
                        range.start(),
                        range.end()
                    );
                }
            }
            Compression::Gzip { level } if level > 9 => {
                bail!("gzip compression level {level} is out of range 0..=9")
            }
            Compression::Gzip { .. } => {}
        }
        Ok(())
    }
}

/// One file to pack: where it goes in the package and where it is on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Relative '/'-separated path inside the package, e.g. `bin/daphne`.
    pub archive_path: String,
    /// Regular file or symlink on disk (symlinks are packed as symlinks).
    pub source: Utf8PathBuf,
    /// What to tell the user when `source` is missing, e.g. "run `cargo xtask build` first".
    pub hint: Option<String>,
}

impl Entry {
    /// Entry without a hint for missing sources.
    pub fn new(archive_path: impl Into<String>, source: impl Into<Utf8PathBuf>) -> Self {
        Entry {
            archive_path: archive_path.into(),
            source: source.into(),
            hint: None,
        }
    }

    /// Adds the advice shown when the source file does not exist.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Everything `pack` needs; the output depends only on these values and the file contents.
#[derive(Debug, Clone)]
pub struct PackSpec {
    /// Files (regular or symlink); directories are implied by the paths.
    pub entries: Vec<Entry>,
    pub compression: Compression,
    /// Timestamp of every entry and `created` in the manifest (SOURCE_DATE_EPOCH or commit time).
    pub mtime: u64,
    pub tool_version: String,
    pub source_commit: String,
    pub source_dirty: bool,
    pub image: Option<ImageRef>,
    pub target: String,
    pub out_dir: Utf8PathBuf,
}

/// Result of `pack`.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub path: Utf8PathBuf,
    /// sha256 hex of manifest.json (64 hex digits); the name uses its first 16.
    pub content_hash: String,
    /// sha256 hex of the archive file, also written to `<path>.sha256`.
    pub archive_sha256: String,
    pub bytes: u64,
    /// Number of files (regular and symlinks) listed in the manifest.
    pub files: usize,
    /// True when an identical, verified package already existed and was kept.
    pub skipped: bool,
}

/// Result of `verify` and `extract`.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub manifest: Manifest,
    pub archive_sha256: String,
    /// sha256 hex of manifest.json, as in `Packed::content_hash`.
    pub content_hash: String,
}

/// Builds (or reuses) the package described by `spec` in `spec.out_dir`.
///
/// Every input file is read twice, once to hash it and once to archive it, so `progress`
/// receives `(bytes read so far, 2 * total input bytes)`.
pub fn pack(spec: &PackSpec, progress: &mut dyn FnMut(u64, u64)) -> Result<Packed> {
    spec.compression.validate()?;
    let planned = plan_entries(&spec.entries)?;
    let input_bytes: u64 = planned.iter().map(Planned::size_hint).sum();
    let mut progress = Progress::new(progress, 2 * input_bytes);
    let prepared = hash_sources(planned, &mut progress)?;
    let manifest = build_manifest(spec, &prepared);
    let manifest_bytes = manifest.to_bytes()?;
    let content_hash = sha256_hex(&manifest_bytes);
    let name = package_name(&content_hash, spec.compression);
    let path = spec.out_dir.join(&name);
    let files = manifest.files.len();

    if let Some((archive_sha256, bytes)) = reuse_existing(&path, &content_hash)? {
        progress.finish();
        return Ok(Packed {
            path,
            content_hash,
            archive_sha256,
            bytes,
            files,
            skipped: true,
        });
    }

    let sums = manifest.sha256sums(&content_hash);
    let items = archive_items(&manifest_bytes, sums.as_bytes(), &prepared);
    fs::create_dir_all(&spec.out_dir)
        .with_context(|| format!("cannot create the output directory {}", spec.out_dir))?;
    let stats = archive::write_atomic(&spec.out_dir, &name, |file| {
        archive::write_archive(file, spec.compression, spec.mtime, &items, &mut progress)
    })?;
    if let Err(e) = write_checksum_file(&path, &stats.sha256) {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    progress.finish();
    Ok(Packed {
        path,
        content_hash,
        archive_sha256: stats.sha256,
        bytes: stats.bytes,
        files,
        skipped: false,
    })
}

/// `daphne-payload-<first 16 hex of the content hash>.<ext>`.
pub fn package_name(content_hash: &str, compression: Compression) -> String {
    let short = content_hash.get(..16).unwrap_or(content_hash);
    format!("{PACKAGE_PREFIX}{short}.{}", compression.extension())
}

/// Streaming sha256 of a file, as lower-case hex.
pub fn sha256_file(path: &Utf8Path) -> Result<String> {
    let file = File::open(path).with_context(|| format!("cannot open {path}"))?;
    let (digest, _) =
        hash_reader(file, &mut |_| {}).with_context(|| format!("cannot read {path}"))?;
    Ok(digest)
}

/// sha256 hex and length of everything `reader` yields, reporting each chunk.
fn hash_reader(mut reader: impl Read, on_chunk: &mut dyn FnMut(u64)) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; READ_BUFFER];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
        on_chunk(n as u64);
    }
    Ok((hex(&hasher.finalize()), total))
}

/// A validated entry with what its source turned out to be.
struct Planned {
    path: String,
    source: Utf8PathBuf,
    kind: PlannedKind,
}

enum PlannedKind {
    File { size: u64, executable: bool },
    Symlink { target: String },
}

impl Planned {
    fn size_hint(&self) -> u64 {
        match self.kind {
            PlannedKind::File { size, .. } => size,
            PlannedKind::Symlink { .. } => 0,
        }
    }
}

/// Validates paths, sorts, and classifies every source (no content is read yet).
fn plan_entries(entries: &[Entry]) -> Result<Vec<Planned>> {
    for entry in entries {
        check_entry_path(entry)?;
    }
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.archive_path.cmp(&b.archive_path));
    check_duplicates_and_conflicts(&sorted)?;
    let planned = sorted
        .into_iter()
        .map(classify)
        .collect::<Result<Vec<_>>>()?;
    check_symlinks(&planned)?;
    Ok(planned)
}

fn check_entry_path(entry: &Entry) -> Result<()> {
    let path = &entry.archive_path;
    if let Err(reason) = paths::check_archive_path(path) {
        bail!(
            "invalid archive path {path:?} for {}: {reason}; \
             use a relative path like `bin/daphne` without `..`",
            entry.source
        );
    }
    let first = path.split('/').next().unwrap_or_default();
    if first == MANIFEST_NAME || first == SUMS_NAME {
        bail!(
            "archive path {path:?} for {} is reserved for the package's own {first}; rename the entry",
            entry.source
        );
    }
    Ok(())
}

/// Two entries may not share a path, and a file may not also be a parent directory.
fn check_duplicates_and_conflicts(sorted: &[&Entry]) -> Result<()> {
    for pair in sorted.windows(2) {
        if pair[0].archive_path == pair[1].archive_path {
            bail!(
                "archive path {} is used twice (sources {} and {}); keep only one entry",
                pair[0].archive_path,
                pair[0].source,
                pair[1].source
            );
        }
    }
    let by_path: BTreeMap<&str, &Entry> = sorted
        .iter()
        .map(|e| (e.archive_path.as_str(), *e))
        .collect();
    for entry in sorted {
        for dir in paths::ancestors(&entry.archive_path) {
            if let Some(file) = by_path.get(dir) {
                bail!(
                    "archive path {dir} (from {}) is a file, but {} (from {}) needs it to be a directory",
                    file.source,
                    entry.archive_path,
                    entry.source
                );
            }
        }
    }
    Ok(())
}

/// Looks at the source without following symlinks: regular files and symlinks only.
fn classify(entry: &Entry) -> Result<Planned> {
    let source = &entry.source;
    let meta = match fs::symlink_metadata(source) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "input file {source} (for {}) does not exist; {}",
            entry.archive_path,
            entry
                .hint
                .as_deref()
                .unwrap_or("check the path in the deployment configuration")
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot read input file {source} (for {})",
                    entry.archive_path
                )
            })
        }
    };
    let file_type = meta.file_type();
    let kind = if file_type.is_file() {
        use std::os::unix::fs::PermissionsExt;
        PlannedKind::File {
            size: meta.len(),
            executable: meta.permissions().mode() & 0o111 != 0,
        }
    } else if file_type.is_symlink() {
        PlannedKind::Symlink {
            target: read_link_utf8(source)?,
        }
    } else if file_type.is_dir() {
        bail!(
            "input {source} (for {}) is a directory; list the files inside it as separate entries",
            entry.archive_path
        )
    } else {
        bail!(
            "input {source} (for {}) is not a regular file or symlink (device, FIFO or socket); \
             only files can be packed",
            entry.archive_path
        )
    };
    Ok(Planned {
        path: entry.archive_path.clone(),
        source: source.clone(),
        kind,
    })
}

fn read_link_utf8(source: &Utf8Path) -> Result<String> {
    let target = fs::read_link(source).with_context(|| format!("cannot read symlink {source}"))?;
    target.into_os_string().into_string().map_err(|t| {
        anyhow::anyhow!(
            "symlink {source} has a non-UTF-8 target {t:?}; only UTF-8 targets can be packed"
        )
    })
}

/// Symlinks must resolve inside the package, relative to their own archive location.
fn check_symlinks(planned: &[Planned]) -> Result<()> {
    let links: BTreeMap<String, String> = planned
        .iter()
        .filter_map(|p| match &p.kind {
            PlannedKind::Symlink { target } => Some((p.path.clone(), target.clone())),
            PlannedKind::File { .. } => None,
        })
        .collect();
    for (path, target) in &links {
        if let Err(reason) = paths::resolve_link(path, target, &links) {
            let source = planned
                .iter()
                .find(|p| &p.path == path)
                .map(|p| p.source.as_str())
                .unwrap_or("");
            bail!(
                "symlink {source} (archive path {path}) -> {target} cannot be packed: {reason}; \
                 only symlinks that stay inside the package are allowed (pack the target file instead)"
            );
        }
    }
    Ok(())
}

/// An entry whose content has been hashed: what goes into the manifest and the archive.
struct Prepared {
    path: String,
    source: Utf8PathBuf,
    content: Content,
}

enum Content {
    File {
        size: u64,
        executable: bool,
        sha256: String,
    },
    Symlink {
        target: String,
    },
}

/// First read of every file: sha256 and exact size, needed before the manifest exists.
fn hash_sources(planned: Vec<Planned>, progress: &mut Progress<'_>) -> Result<Vec<Prepared>> {
    planned
        .into_iter()
        .map(|p| {
            let content = match p.kind {
                PlannedKind::File { executable, .. } => {
                    let (sha256, size) = hash_source(&p.source, progress)?;
                    Content::File {
                        size,
                        executable,
                        sha256,
                    }
                }
                PlannedKind::Symlink { target } => Content::Symlink { target },
            };
            Ok(Prepared {
                path: p.path,
                source: p.source,
                content,
            })
        })
        .collect()
}

fn hash_source(source: &Utf8Path, progress: &mut Progress<'_>) -> Result<(String, u64)> {
    let file = File::open(source).with_context(|| format!("cannot open input file {source}"))?;
    hash_reader(file, &mut |n| progress.advance(n))
        .with_context(|| format!("cannot read input file {source}"))
}

fn build_manifest(spec: &PackSpec, prepared: &[Prepared]) -> Manifest {
    let files = prepared
        .iter()
        .map(|p| match &p.content {
            Content::File {
                size,
                executable,
                sha256,
            } => FileRecord::regular(&p.path, *size, *executable, sha256.clone()),
            Content::Symlink { target } => FileRecord::symlink(&p.path, target),
        })
        .collect();
    Manifest {
        format: MANIFEST_FORMAT,
        tool_version: spec.tool_version.clone(),
        source_commit: spec.source_commit.clone(),
        source_dirty: spec.source_dirty,
        image: spec.image.clone(),
        target: spec.target.clone(),
        created: spec.mtime,
        files,
    }
}

/// manifest.json, SHA256SUMS, then directories and files sorted by path.
fn archive_items<'a>(
    manifest: &'a [u8],
    sums: &'a [u8],
    prepared: &'a [Prepared],
) -> Vec<Item<'a>> {
    let dirs: BTreeSet<&str> = prepared
        .iter()
        .flat_map(|p| paths::ancestors(&p.path))
        .collect();
    let mut body: Vec<Item<'a>> = dirs.into_iter().map(|path| Item::Dir { path }).collect();
    body.extend(prepared.iter().map(|p| match &p.content {
        Content::File {
            size,
            executable,
            sha256,
        } => Item::File {
            path: &p.path,
            source: &p.source,
            size: *size,
            mode: manifest::file_mode(*executable),
            sha256,
        },
        Content::Symlink { target } => Item::Symlink {
            path: &p.path,
            target,
        },
    }));
    body.sort_by(|a, b| a.path().cmp(b.path()));
    let mut items = vec![
        Item::Bytes {
            path: MANIFEST_NAME,
            data: manifest,
        },
        Item::Bytes {
            path: SUMS_NAME,
            data: sums,
        },
    ];
    items.extend(body);
    items
}

/// Returns the archive sha256 and size when `path` already holds this exact, intact package.
fn reuse_existing(path: &Utf8Path, content_hash: &str) -> Result<Option<(String, u64)>> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect existing package {path}")),
    };
    if !meta.is_file() {
        bail!("{path} exists but is not a regular file; remove it and pack again");
    }
    // A corrupt or different file is simply rebuilt (and atomically replaced).
    let Ok(verified) = verify::verify(path) else {
        return Ok(None);
    };
    if verified.content_hash != content_hash {
        return Ok(None);
    }
    if verify::read_checksum_file(path)?.is_none() {
        write_checksum_file(path, &verified.archive_sha256)?;
    }
    Ok(Some((verified.archive_sha256, meta.len())))
}

/// `<package>.sha256` in `sha256sum` format, so `sha256sum -c` works next to the package.
fn write_checksum_file(package: &Utf8Path, sha256: &str) -> Result<()> {
    let dir = package.parent().unwrap_or(Utf8Path::new("."));
    let name = package.file_name().unwrap_or_default();
    let line = format!("{sha256}  {name}\n");
    archive::write_atomic(dir, &format!("{name}.sha256"), |file| {
        use std::io::Write;
        file.write_all(line.as_bytes())
            .context("cannot write the checksum")
    })
}
