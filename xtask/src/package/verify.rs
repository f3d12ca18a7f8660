//! Verification and atomic extraction of packages.
//!
//! One streaming pass checks every entry (safe path, allowed type, content against the
//! manifest) and, when extracting, writes it into a fresh temporary directory that is renamed
//! into place only after the whole archive has checked out.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use camino::Utf8Path;
use sha2::{Digest, Sha256};
use tar::EntryType;

use super::manifest::{
    file_mode, hex, mode_string, sha256_hex, Manifest, DIR_MODE, MANIFEST_NAME, SUMS_NAME,
};
use super::paths;
use super::Verified;

/// manifest.json and SHA256SUMS are held in memory: cap them so a hostile archive can't.
const MAX_METADATA_BYTES: u64 = 64 << 20;
const COPY_BUFFER: usize = 1 << 20;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Checks a package completely without writing anything.
pub fn verify(path: &Utf8Path) -> Result<Verified> {
    scan(path, None).with_context(|| format!("package {path} failed verification"))
}

/// Verifies and extracts `path` so that `dest` appears complete or not at all.
///
/// Extracting the same package again is a no-op; a different package in `dest` is an error.
pub fn extract(path: &Utf8Path, dest: &Utf8Path) -> Result<Verified> {
    if fs::symlink_metadata(dest).is_ok() {
        return already_extracted(path, dest);
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_str().is_empty() => p,
        _ => Utf8Path::new("."),
    };
    let name = dest
        .file_name()
        .ok_or_else(|| anyhow!("extraction target {dest} has no directory name"))?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {parent}"))?;
    // Same filesystem as dest, so the final rename is atomic; removed on drop if anything fails.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.extract-"))
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a temporary directory in {parent}"))?;
    let verified = scan(path, Some(tmp.path())).with_context(|| {
        format!("cannot extract package {path} into {dest} (nothing was extracted)")
    })?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(DIR_MODE))
        .with_context(|| format!("cannot set permissions on {}", tmp.path().display()))?;
    match rename_noreplace(tmp.path(), dest.as_std_path()) {
        Ok(()) => {
            let _ = tmp.keep();
            super::archive::sync_dir(parent)?;
            Ok(verified)
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) => {
            drop(tmp);
            // Someone else extracted concurrently: fine if it is the same package.
            already_extracted(path, dest)
        }
        Err(e) => Err(e).with_context(|| format!("cannot move the extracted package into {dest}")),
    }
}

/// `dest` exists: accept it only if it holds this package's manifest.
fn already_extracted(path: &Utf8Path, dest: &Utf8Path) -> Result<Verified> {
    let verified = verify(path)?;
    let existing = dest.join(MANIFEST_NAME);
    let same = fs::read(&existing)
        .map(|bytes| sha256_hex(&bytes) == verified.content_hash)
        .unwrap_or(false);
    if !same {
        bail!(
            "{dest} already exists and does not hold package {path} (content hash {}); \
             remove it or extract to another directory",
            &verified.content_hash[..16]
        );
    }
    Ok(verified)
}

/// rename(2) that fails with EEXIST/ENOTEMPTY instead of replacing an existing directory.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c_from = CString::new(from.as_os_str().as_bytes())?;
    let c_to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both arguments are valid NUL-terminated paths living across the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // Filesystems without RENAME_NOREPLACE: rename(2) still refuses non-empty targets.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            fs::rename(from, to)
        }
        _ => Err(err),
    }
}

/// Reads `<package>.sha256` if present and returns the hash it records.
pub(crate) fn read_checksum_file(package: &Utf8Path) -> Result<Option<String>> {
    let sidecar = format!("{package}.sha256");
    let text = match fs::read_to_string(&sidecar) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {sidecar}")),
    };
    let hash = text.split_whitespace().next().unwrap_or_default();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{sidecar} is not in sha256sum format; delete it to rebuild it");
    }
    Ok(Some(hash.to_ascii_lowercase()))
}

/// The single pass shared by `verify` and `extract` (`out` = extraction root).
fn scan(path: &Utf8Path, out: Option<&Path>) -> Result<Verified> {
    let mut raw = HashReader::new(File::open(path).with_context(|| format!("cannot open {path}"))?);
    let mut state = ScanState::new(out);
    {
        let decoder = Decoder::detect(&mut raw, path)?;
        let mut archive = tar::Archive::new(decoder);
        for entry in archive.entries().context("cannot read the tar stream")? {
            let entry = entry.context("corrupt tar stream")?;
            state.add(entry)?;
        }
        let mut decoder = archive.into_inner();
        ensure_only_zeros(&mut decoder)?;
    }
    io::copy(&mut raw, &mut io::sink()).with_context(|| format!("cannot read {path}"))?;
    let archive_sha256 = raw.finish();
    let (manifest, content_hash) = state.finish()?;
    if let Some(expected) = read_checksum_file(path)? {
        if expected != archive_sha256 {
            bail!(
                "archive sha256 {archive_sha256} differs from {path}.sha256 ({expected}); \
                 the file is corrupt or incomplete, copy it again"
            );
        }
    }
    Ok(Verified {
        manifest,
        archive_sha256,
        content_hash,
    })
}

/// After the tar end marker only zero padding may follow; anything else could be entries
/// that GNU tar would see but this reader would not.
fn ensure_only_zeros(reader: &mut impl Read) -> Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = reader
            .read(&mut buf)
            .context("corrupt compressed stream after the tar end marker")?;
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().any(|&b| b != 0) {
            bail!(
                "data found after the tar end marker; the archive was tampered with or is corrupt"
            );
        }
    }
}

/// The entry types a package may contain.
#[derive(PartialEq)]
enum Kind {
    Dir,
    Symlink,
    File,
}

/// What an archive path turned out to be.
enum Seen {
    Dir,
    /// Parent of some entry without its own directory entry (yet).
    ImpliedDir,
    File {
        size: u64,
        sha256: String,
        mode: u32,
    },
    Symlink {
        target: String,
    },
}

struct ScanState<'a> {
    out: Option<&'a Path>,
    seen: BTreeMap<String, Seen>,
    manifest: Option<Vec<u8>>,
    sums: Option<Vec<u8>>,
}

impl<'a> ScanState<'a> {
    fn new(out: Option<&'a Path>) -> Self {
        ScanState {
            out,
            seen: BTreeMap::new(),
            manifest: None,
            sums: None,
        }
    }

    fn add<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        let entry_type = entry.header().entry_type();
        let path = entry_path(&entry, entry_type)?;
        match self.check_entry(&mut entry, &path, entry_type)? {
            Kind::Dir => self.add_dir(&path),
            Kind::Symlink => self.add_symlink(&entry, &path),
            Kind::File => self.add_file(&mut entry, &path),
        }
    }

    /// Type, extensions, duplicates and parents: everything decidable from the header.
    fn check_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &str,
        entry_type: EntryType,
    ) -> Result<Kind> {
        let kind = match entry_type {
            EntryType::Regular => Kind::File,
            EntryType::Directory => Kind::Dir,
            EntryType::Symlink => Kind::Symlink,
            EntryType::Link => {
                bail!("archive entry {path} is a hard link; hard links are not allowed")
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                bail!("archive entry {path} is a device or FIFO; only files, directories and symlinks are allowed")
            }
            other => bail!("archive entry {path} has unsupported type {other:?}"),
        };
        if entry
            .pax_extensions()
            .context("corrupt PAX header")?
            .is_some()
        {
            bail!("archive entry {path} uses PAX extended headers, which packages never contain");
        }
        match self.seen.get(path) {
            None => {}
            Some(Seen::ImpliedDir) if kind == Kind::Dir => {}
            Some(Seen::ImpliedDir) => {
                bail!("archive path {path} holds other entries but is not a directory")
            }
            Some(_) => bail!("archive path {path} appears twice"),
        }
        for dir in paths::ancestors(path) {
            match self.seen.get(dir) {
                None => {
                    self.seen.insert(dir.to_owned(), Seen::ImpliedDir);
                }
                Some(Seen::Dir | Seen::ImpliedDir) => {}
                Some(Seen::File { .. }) => {
                    bail!("archive entry {path} is inside {dir}, which is a file")
                }
                Some(Seen::Symlink { .. }) => {
                    bail!("archive entry {path} is inside {dir}, which is a symlink; writing through it could escape")
                }
            }
        }
        Ok(kind)
    }

    fn add_dir(&mut self, path: &str) -> Result<()> {
        if let Some(root) = self.out {
            ensure_dir(root, path)?;
        }
        self.seen.insert(path.to_owned(), Seen::Dir);
        Ok(())
    }

    fn add_symlink<R: Read>(&mut self, entry: &tar::Entry<'_, R>, path: &str) -> Result<()> {
        let raw = entry
            .link_name_bytes()
            .ok_or_else(|| anyhow!("symlink {path} has no target"))?;
        let target = String::from_utf8(raw.into_owned())
            .map_err(|_| anyhow!("symlink {path} has a non-UTF-8 target"))?;
        // Cheap early check (absolute / `..` past the root); links through links at the end.
        if let Err(reason) = paths::resolve_link(path, &target, &BTreeMap::new()) {
            bail!("symlink {path} -> {target} is not allowed: {reason}");
        }
        if let Some(root) = self.out {
            ensure_parent(root, path)?;
            std::os::unix::fs::symlink(&target, root.join(path))
                .with_context(|| format!("cannot create symlink {path}"))?;
        }
        self.seen.insert(path.to_owned(), Seen::Symlink { target });
        Ok(())
    }

    fn add_file<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, path: &str) -> Result<()> {
        let header = entry.header();
        let mode = file_mode(header.mode().context("corrupt mode field")? & 0o111 != 0);
        let mtime = header.mtime().context("corrupt mtime field")?;
        let keep = (path == MANIFEST_NAME || path == SUMS_NAME).then(Vec::new);
        if keep.is_some() && entry.size() > MAX_METADATA_BYTES {
            bail!("{path} is larger than {MAX_METADATA_BYTES} bytes");
        }
        let mut file = match self.out {
            Some(root) => Some(create_file(root, path)?),
            None => None,
        };
        let (sha256, size, kept) = copy_hashing(entry, file.as_mut(), keep)?;
        if let Some(file) = file {
            finish_file(file, mode, mtime)?;
        }
        match path {
            MANIFEST_NAME => self.manifest = kept,
            SUMS_NAME => self.sums = kept,
            _ => {}
        }
        self.seen
            .insert(path.to_owned(), Seen::File { size, sha256, mode });
        Ok(())
    }

    /// Cross-checks the collected entries against manifest.json and SHA256SUMS.
    fn finish(self) -> Result<(Manifest, String)> {
        let manifest_bytes = self.manifest.ok_or_else(|| {
            anyhow!("manifest.json is missing: this is not a DAPHNE payload package")
        })?;
        let manifest = Manifest::from_bytes(&manifest_bytes)?;
        let content_hash = sha256_hex(&manifest_bytes);
        let sums = self
            .sums
            .ok_or_else(|| anyhow!("SHA256SUMS is missing from the package"))?;
        if sums != manifest.sha256sums(&content_hash).as_bytes() {
            bail!("SHA256SUMS does not match manifest.json");
        }
        check_links(&self.seen)?;
        check_against_manifest(&self.seen, &manifest)?;
        Ok((manifest, content_hash))
    }
}

/// Entry path as validated UTF-8, without the trailing '/' tar puts on directories.
fn entry_path<R: Read>(entry: &tar::Entry<'_, R>, kind: EntryType) -> Result<String> {
    let raw = entry.path_bytes();
    let display = String::from_utf8_lossy(&raw).into_owned();
    let mut path = String::from_utf8(raw.into_owned())
        .map_err(|_| anyhow!("archive entry {display:?} has a non-UTF-8 path"))?;
    if kind == EntryType::Directory && path.len() > 1 && path.ends_with('/') {
        path.pop();
    }
    if let Err(reason) = paths::check_archive_path(&path) {
        bail!("archive entry {display:?} has an unsafe path: {reason}");
    }
    Ok(path)
}

fn check_against_manifest(seen: &BTreeMap<String, Seen>, manifest: &Manifest) -> Result<()> {
    let mut listed = BTreeMap::new();
    for record in &manifest.files {
        if paths::check_archive_path(&record.path).is_err()
            || listed.insert(record.path.as_str(), record).is_some()
        {
            bail!(
                "manifest.json lists an invalid or duplicate path {:?}",
                record.path
            );
        }
        match (seen.get(&record.path), &record.sha256, &record.link_target) {
            (Some(Seen::File { size, sha256, mode }), Some(want_sha), None) => {
                if *size != record.size || sha256 != want_sha {
                    bail!(
                        "{}: content does not match manifest.json (size {size} vs {}, sha256 {sha256} vs {want_sha}); \
                         the package is corrupt, rebuild or copy it again",
                        record.path,
                        record.size
                    );
                }
                if mode_string(*mode) != record.mode {
                    bail!(
                        "{}: mode {} does not match manifest.json ({})",
                        record.path,
                        mode_string(*mode),
                        record.mode
                    );
                }
            }
            (Some(Seen::Symlink { target }), None, Some(want)) if target == want => {}
            (Some(Seen::Symlink { target }), _, _) => {
                bail!(
                    "{}: symlink target {target} does not match manifest.json",
                    record.path
                )
            }
            (Some(Seen::File { .. }), _, _) => bail!(
                "{}: manifest.json lists it as a symlink, the archive has a file",
                record.path
            ),
            _ => bail!(
                "{} is listed in manifest.json but missing from the archive",
                record.path
            ),
        }
    }
    for (path, seen) in seen {
        let is_payload = matches!(seen, Seen::File { .. } | Seen::Symlink { .. });
        if is_payload
            && path != MANIFEST_NAME
            && path != SUMS_NAME
            && !listed.contains_key(path.as_str())
        {
            bail!("{path} is in the archive but not listed in manifest.json");
        }
    }
    Ok(())
}

/// Full symlink check once every link is known (links may be chained through each other).
fn check_links(seen: &BTreeMap<String, Seen>) -> Result<()> {
    let links: BTreeMap<String, String> = seen
        .iter()
        .filter_map(|(path, s)| match s {
            Seen::Symlink { target } => Some((path.clone(), target.clone())),
            _ => None,
        })
        .collect();
    for (path, target) in &links {
        if let Err(reason) = paths::resolve_link(path, target, &links) {
            bail!("symlink {path} -> {target} is not allowed: {reason}");
        }
    }
    Ok(())
}

/// Streams an entry into the hasher (and the extracted file), optionally keeping the bytes.
fn copy_hashing(
    reader: &mut impl Read,
    mut file: Option<&mut File>,
    mut keep: Option<Vec<u8>>,
) -> Result<(String, u64, Option<Vec<u8>>)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("corrupt or truncated archive data"),
        };
        let chunk = &buf[..n];
        hasher.update(chunk);
        size += n as u64;
        if let Some(kept) = keep.as_mut() {
            kept.extend_from_slice(chunk);
        }
        if let Some(file) = file.as_mut() {
            file.write_all(chunk)
                .context("cannot write the extracted file")?;
        }
    }
    Ok((hex(&hasher.finalize()), size, keep))
}

/// New file inside `root`; never follows or replaces an existing path.
fn create_file(root: &Path, path: &str) -> Result<File> {
    ensure_parent(root, path)?;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(root.join(path))
        .with_context(|| format!("cannot create {path}"))
}

fn finish_file(file: File, mode: u32, mtime: u64) -> Result<()> {
    file.set_permissions(fs::Permissions::from_mode(mode))
        .context("cannot set permissions")?;
    file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime))
        .context("cannot set mtime")?;
    Ok(())
}

fn ensure_parent(root: &Path, path: &str) -> Result<()> {
    for dir in paths::ancestors(path) {
        ensure_dir(root, dir)?;
    }
    Ok(())
}

/// Creates `root/path` as a directory, refusing anything that already exists as a non-directory
/// (in particular a symlink planted by an earlier entry).
fn ensure_dir(root: &Path, path: &str) -> Result<()> {
    let full: PathBuf = root.join(path);
    match fs::symlink_metadata(&full) {
        Ok(meta) if meta.file_type().is_dir() => Ok(()),
        Ok(_) => bail!("{path} exists and is not a directory"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(&full)
            .with_context(|| format!("cannot create directory {path}")),
        Err(e) => Err(e).with_context(|| format!("cannot inspect {path}")),
    }
}

/// Hashes the raw (compressed) bytes as the decoder pulls them.
struct HashReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R> HashReader<R> {
    fn new(inner: R) -> Self {
        HashReader {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn finish(self) -> String {
        hex(&self.hasher.finalize())
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Decompressor picked from the magic bytes, independent of the file extension.
enum Decoder<R: Read> {
    Zstd(zstd::stream::read::Decoder<'static, BufReader<R>>),
    Gzip(flate2::bufread::MultiGzDecoder<BufReader<R>>),
}

impl<R: Read> Decoder<R> {
    fn detect(raw: R, path: &Utf8Path) -> Result<Self> {
        let mut buffered = BufReader::with_capacity(COPY_BUFFER, raw);
        let magic =
            io::BufRead::fill_buf(&mut buffered).with_context(|| format!("cannot read {path}"))?;
        if magic.starts_with(&ZSTD_MAGIC) {
            let decoder =
                zstd::stream::read::Decoder::with_buffer(buffered).context("cannot start zstd")?;
            Ok(Decoder::Zstd(decoder))
        } else if magic.starts_with(&GZIP_MAGIC) {
            Ok(Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(
                buffered,
            )))
        } else {
            bail!("{path} is neither zstd- nor gzip-compressed; is it a DAPHNE payload package?")
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Zstd(d) => d.read(buf),
            Decoder::Gzip(d) => d.read(buf),
        }
    }
}
