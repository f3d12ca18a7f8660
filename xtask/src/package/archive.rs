//! Tar writing with explicit, reproducible headers, plus atomic file creation.
//!
//! Every header is built by hand (GNU format, uid/gid 0, empty owner names, fixed mtime,
//! normalised modes) so the archive bytes depend only on the packed content.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};

use anyhow::{anyhow, Context, Result};
use camino::{Utf8Path, Utf8PathBuf};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use super::manifest::{hex, DIR_MODE, SYMLINK_MODE};
use super::Compression;

/// Size of the buffer between the compressor and the output file.
const OUT_BUFFER: usize = 1 << 20;
/// Report progress at most once per this many bytes, so callers can print freely.
const PROGRESS_STEP: u64 = 4 << 20;

/// One archive entry, in final archive order.
pub(crate) enum Item<'a> {
    Dir {
        path: &'a str,
    },
    /// In-memory file such as manifest.json (mode 0644).
    Bytes {
        path: &'a str,
        data: &'a [u8],
    },
    /// File copied from disk; `size` and `sha256` come from the hashing pass and are
    /// re-checked while copying, so a file changed mid-pack cannot slip through.
    File {
        path: &'a str,
        source: &'a Utf8Path,
        size: u64,
        mode: u32,
        sha256: &'a str,
    },
    Symlink {
        path: &'a str,
        target: &'a str,
    },
}

impl Item<'_> {
    /// Path inside the archive (sort key).
    pub fn path(&self) -> &str {
        match *self {
            Item::Dir { path }
            | Item::Bytes { path, .. }
            | Item::File { path, .. }
            | Item::Symlink { path, .. } => path,
        }
    }
}

/// What the caller needs to know about the written archive.
pub(crate) struct ArchiveStats {
    pub sha256: String,
    pub bytes: u64,
}

/// Throttled progress reporting over all input bytes read by `pack`.
pub(crate) struct Progress<'a> {
    callback: &'a mut dyn FnMut(u64, u64),
    done: u64,
    total: u64,
    reported: u64,
}

impl<'a> Progress<'a> {
    pub fn new(callback: &'a mut dyn FnMut(u64, u64), total: u64) -> Self {
        callback(0, total);
        Progress {
            callback,
            done: 0,
            total,
            reported: 0,
        }
    }

    pub fn advance(&mut self, bytes: u64) {
        self.done = (self.done + bytes).min(self.total);
        if self.done - self.reported >= PROGRESS_STEP {
            self.reported = self.done;
            (self.callback)(self.done, self.total);
        }
    }

    /// Final report, also used when work is skipped.
    pub fn finish(&mut self) {
        self.done = self.total;
        (self.callback)(self.total, self.total);
    }
}

/// Writes the compressed tar of `items` to `out` and returns the archive's sha256.
pub(crate) fn write_archive(
    out: &mut File,
    compression: Compression,
    mtime: u64,
    items: &[Item<'_>],
    progress: &mut Progress<'_>,
) -> Result<ArchiveStats> {
    let sink = HashWriter::new(BufWriter::with_capacity(OUT_BUFFER, out));
    let encoder = Encoder::new(sink, compression).context("cannot start the compressor")?;
    let mut builder = tar::Builder::new(encoder);
    for item in items {
        append_item(&mut builder, item, mtime, progress)?;
    }
    let encoder = builder
        .into_inner()
        .context("cannot finish the tar stream")?;
    let sink = encoder
        .finish()
        .context("cannot finish the compressed stream")?;
    let (sha256, bytes, buffered) = sink.finish();
    buffered
        .into_inner()
        .map_err(|e| e.into_error())
        .context("cannot flush the archive")?;
    Ok(ArchiveStats { sha256, bytes })
}

fn append_item<W: Write>(
    builder: &mut tar::Builder<W>,
    item: &Item<'_>,
    mtime: u64,
    progress: &mut Progress<'_>,
) -> Result<()> {
    match *item {
        Item::Dir { path } => {
            let mut h = header(EntryType::Directory, DIR_MODE, 0, mtime);
            builder
                .append_data(&mut h, path, io::empty())
                .map_err(write_error)
        }
        Item::Bytes { path, data } => {
            let mut h = header(EntryType::Regular, 0o644, data.len() as u64, mtime);
            builder.append_data(&mut h, path, data).map_err(write_error)
        }
        Item::Symlink { path, target } => {
            let mut h = header(EntryType::Symlink, SYMLINK_MODE, 0, mtime);
            builder
                .append_link(&mut h, path, target)
                .map_err(write_error)
        }
        Item::File {
            path,
            source,
            size,
            mode,
            sha256,
        } => {
            let mut h = header(EntryType::Regular, mode, size, mtime);
            let mut reader = SourceReader::open(source, size, sha256, progress)?;
            match builder.append_data(&mut h, path, &mut reader) {
                Ok(()) => Ok(()),
                Err(e) => Err(reader.take_error().unwrap_or_else(|| write_error(e))),
            }
        }
    }
}

/// A deterministic GNU header: only type, mode, size and mtime vary.
fn header(kind: EntryType, mode: u32, size: u64, mtime: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn write_error(e: io::Error) -> anyhow::Error {
    anyhow::Error::new(e).context("cannot write the compressed archive")
}

/// Reads a source file for the archive, re-checking size and sha256 from the hashing pass.
struct SourceReader<'p, 'a> {
    file: File,
    source: Utf8PathBuf,
    size: u64,
    sha256: String,
    read: u64,
    hasher: Sha256,
    progress: &'p mut Progress<'a>,
    error: Option<anyhow::Error>,
}

impl<'p, 'a> SourceReader<'p, 'a> {
    fn open(
        source: &Utf8Path,
        size: u64,
        sha256: &str,
        progress: &'p mut Progress<'a>,
    ) -> Result<Self> {
        let file = File::open(source).with_context(|| format!("cannot open {source}"))?;
        Ok(SourceReader {
            file,
            source: source.to_owned(),
            size,
            sha256: sha256.to_owned(),
            read: 0,
            hasher: Sha256::new(),
            progress,
            error: None,
        })
    }

    /// The input-side failure, if the tar writer stopped because of this reader.
    fn take_error(&mut self) -> Option<anyhow::Error> {
        self.error.take()
    }

    fn fail(&mut self, error: anyhow::Error) -> io::Error {
        let err = io::Error::other(format!("{error:#}"));
        self.error = Some(error);
        err
    }

    fn changed(&mut self, what: &str) -> io::Error {
        let msg = format!(
            "{} {what} while it was being packed; wait for the build to finish and pack again",
            self.source
        );
        self.fail(anyhow!(msg))
    }
}

impl Read for SourceReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.file.read(buf) {
            Ok(n) => n,
            Err(e) => {
                let source = self.source.clone();
                return Err(
                    self.fail(anyhow::Error::new(e).context(format!("cannot read {source}")))
                );
            }
        };
        self.read += n as u64;
        if self.read > self.size {
            return Err(self.changed("grew"));
        }
        if n == 0 {
            if self.read < self.size {
                return Err(self.changed("shrank"));
            }
            let digest = hex(&std::mem::take(&mut self.hasher).finalize());
            if digest != self.sha256 {
                return Err(self.changed("changed"));
            }
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        self.progress.advance(n as u64);
        Ok(n)
    }
}

/// Compressor chosen by [`Compression`], as one `Write` type.
enum Encoder<W: Write> {
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Gzip(flate2::write::GzEncoder<W>),
}

impl<W: Write> Encoder<W> {
    fn new(w: W, compression: Compression) -> io::Result<Self> {
        Ok(match compression {
            Compression::Zstd { level } => {
                let mut enc = zstd::stream::write::Encoder::new(w, level)?;
                // Always multithreaded (>= 1 worker): zstd's MT output does not depend on
                // the worker count, so archives are identical across machines.
                enc.multithread(worker_threads())?;
                enc.include_checksum(true)?;
                Encoder::Zstd(enc)
            }
            Compression::Gzip { level } => {
                // GzBuilder writes mtime 0 and no file name: reproducible.
                let enc = flate2::GzBuilder::new().write(w, flate2::Compression::new(level));
                Encoder::Gzip(enc)
            }
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Zstd(e) => e.finish(),
            Encoder::Gzip(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Gzip(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Zstd(e) => e.flush(),
            Encoder::Gzip(e) => e.flush(),
        }
    }
}

/// zstd worker threads: one per available core.
fn worker_threads() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// Counts and hashes bytes on their way to the output file.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W> HashWriter<W> {
    fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    fn finish(self) -> (String, u64, W) {
        (hex(&self.hasher.finalize()), self.bytes, self.inner)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Creates `dir/name` atomically: temp file in `dir`, fsync, rename, fsync `dir`.
///
/// If `write` (or anything after it) fails, the temp file is removed, so a crash or a
/// full disk never leaves a partial `name` behind.
pub(crate) fn write_atomic<T>(
    dir: &Utf8Path,
    name: &str,
    write: impl FnOnce(&mut File) -> Result<T>,
) -> Result<T> {
    let dest = dir.join(name);
    let result = write_atomic_inner(dir, &dest, name, write);
    result.map_err(|e| explain_write_error(e, &dest))
}

fn write_atomic_inner<T>(
    dir: &Utf8Path,
    dest: &Utf8Path,
    name: &str,
    write: impl FnOnce(&mut File) -> Result<T>,
) -> Result<T> {
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {dir}"))?;
    let value = write(tmp.as_file_mut())?;
    set_mode(tmp.as_file(), 0o644)?;
    tmp.as_file()
        .sync_all()
        .context("cannot flush the file to disk")?;
    tmp.persist(dest)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot rename the temporary file to {dest}"))?;
    sync_dir(dir)?;
    Ok(value)
}

/// Packages are read by other users on shared clusters: 0644 instead of tempfile's 0600.
fn set_mode(file: &File, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .context("cannot set file permissions")
}

/// Makes a rename durable across a crash.
pub(crate) fn sync_dir(dir: &Utf8Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {dir}"))
}

/// Names the output path and says what to do when the disk (or quota) is full.
fn explain_write_error(err: anyhow::Error, dest: &Utf8Path) -> anyhow::Error {
    if is_disk_full(&err) {
        let dir = dest.parent().unwrap_or(dest);
        err.context(format!(
            "cannot write {dest}: the disk is full; free space in {dir} or choose another output directory"
        ))
    } else {
        err.context(format!("cannot write {dest}"))
    }
}

/// True when any cause in the chain is ENOSPC or EDQUOT.
pub(crate) fn is_disk_full(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(cause);
        while let Some(e) = current {
            if e.downcast_ref::<io::Error>().is_some_and(io_disk_full) {
                return true;
            }
            current = e.source();
        }
        false
    })
}

/// Checks an io::Error and the errors it wraps (io::Error::source skips its payload).
fn io_disk_full(io: &io::Error) -> bool {
    matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(
            io.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
        || io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<io::Error>())
            .is_some_and(io_disk_full)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Utf8Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    #[test]
    fn write_atomic_success_creates_only_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Utf8Path::from_path(tmp.path()).unwrap();
        let n = write_atomic(dir, "out.bin", |f| {
            f.write_all(b"hello")?;
            Ok(5)
        })
        .unwrap();
        assert_eq!(n, 5);
        assert_eq!(leftovers(dir), ["out.bin"]);
        assert_eq!(std::fs::read(dir.join("out.bin")).unwrap(), b"hello");
    }

    #[test]
    fn write_atomic_failure_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Utf8Path::from_path(tmp.path()).unwrap();
        let err = write_atomic(dir, "out.bin", |f| -> Result<()> {
            f.write_all(b"partial data")?;
            Err(io::Error::from_raw_os_error(libc::ENOSPC).into())
        })
        .unwrap_err();
        assert!(leftovers(dir).is_empty(), "left {:?}", leftovers(dir));
        let msg = format!("{err:#}");
        assert!(msg.contains("disk is full"), "{msg}");
        assert!(msg.contains(dir.join("out.bin").as_str()), "{msg}");
    }

    #[test]
    fn write_atomic_replaces_existing_file_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Utf8Path::from_path(tmp.path()).unwrap();
        std::fs::write(dir.join("out.bin"), b"old").unwrap();
        let _ = write_atomic(dir, "out.bin", |_| -> Result<()> { Err(anyhow!("boom")) });
        assert_eq!(std::fs::read(dir.join("out.bin")).unwrap(), b"old");
        write_atomic(dir, "out.bin", |f| Ok(f.write_all(b"new")?)).unwrap();
        assert_eq!(std::fs::read(dir.join("out.bin")).unwrap(), b"new");
        assert_eq!(leftovers(dir), ["out.bin"]);
    }

    #[test]
    fn disk_full_is_detected_through_wrapping() {
        let wrapped = io::Error::other(io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(is_disk_full(&anyhow::Error::new(wrapped).context("x")));
        assert!(!is_disk_full(&anyhow!("other")));
    }
}
