//! Upload of payload packages and SIF images to a cluster, over the run's one SSH session.
//!
//! Layout under the target's `remote_dir`:
//!
//! ```text
//! releases/<hash16>/           an extracted, verified package (holds `.complete`)
//! releases/.incoming/<pkg>     an upload in progress (resumed from its size)
//! releases/.tmp-<hash16>-XXXX  an extraction in progress (renamed to <hash16> when complete)
//! images/<hash>.sif            one SIF per image hash
//! images/.incoming/<hash>.sif  an image upload in progress
//! runs/<run-id>/               one directory per run, mode 0700
//! ```
//!
//! Every remote action is one call of the constant POSIX `sh` script [`SCRIPT`] with an
//! operation name and positional arguments: paths are never spliced into shell text, so
//! remote directories may hold spaces, quotes or any UTF-8. The cluster needs only sh,
//! coreutils and tar (plus zstd for `.tar.zst` packages); rsync is used when both sides
//! have it. Remote calls per upload of a new release: 2 with the stream method (probe, then
//! append + verify + extract), 3 with rsync (probe, rsync, verify + extract); 1 when the
//! release is already there. A sha256 mismatch costs one more round (retry from scratch).

use std::cell::Cell;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use camino::{Utf8Path, Utf8PathBuf};

use crate::ssh::{self, Session};

/// What an upload did.
#[derive(Debug, Clone, PartialEq)]
pub struct Uploaded {
    /// Absolute remote path of the release directory or the image file.
    pub remote_path: String,
    /// Bytes that went over the wire for the payload (rsync: its "Total bytes sent").
    pub bytes_sent: u64,
    /// True when the remote already had it: nothing was transferred.
    pub skipped: bool,
    /// "rsync", "stream", or "none" when skipped.
    pub method: &'static str,
    pub seconds: f64,
}

/// The connection to the remote dropped while bytes were in flight (not a refused connect, a
/// failed login or a remote error). What arrived stays in `.incoming/`, so the next upload of
/// the same file resumes from there and still verifies the whole file's sha256; the executor
/// retries once on its own.
#[derive(Debug)]
pub struct Dropped {
    pub host: String,
    /// What was being sent, e.g. `/local/image.sif to /remote/images/.incoming/x.sif`.
    pub what: String,
    /// The transfer tool's own last words.
    pub detail: String,
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "on {}: the connection dropped while sending {} ({}); what arrived is kept on the remote, and the next upload resumes from there and verifies the sha256\n  fix: check the network to {0}, then run `cargo xtask upload` (or the same command) again",
            self.host, self.what, self.detail
        )
    }
}

impl std::error::Error for Dropped {}

/// True when `e` is a dropped connection in the middle of a transfer.
pub fn is_dropped(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Dropped>())
}

fn last_line(text: &str) -> String {
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message").trim().to_string()
}

/// How to move the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// rsync when both this machine and the remote have it, else stream.
    #[default]
    Auto,
    Rsync,
    /// `cat >> file` over the ssh session; resumes from the remote partial size.
    Stream,
}

/// The remote side of every operation. `$1` is the operation; the rest are its arguments.
/// Machine-readable replies are `key=value` records, each terminated by a NUL byte.
/// Exit codes: 0 ok, 3 sha256 mismatch (the file was removed), 4 the partial upload has
/// another size than expected, 5 the upload could not be written, 7 unsafe archive entries,
/// 9 no such directory (fetch), others: failures (see stderr). Uploads of one file take a
/// `flock` on `<incoming>.lock` when the remote has flock, so concurrent uploads of the same
/// package wait for each other instead of writing into the same file.
const SCRIPT: &str = r#"
CDPATH=
umask 022
err() { printf '%s\n' "$*" >&2; }
rec() { printf '%s=%s\0' "$1" "$2"; }
has() { command -v "$1" >/dev/null 2>&1; }
size_of() { if [ -f "$1" ]; then echo $(( $(wc -c < "$1") )); else echo 0; fi; }
caps() {
  if has rsync; then rec rsync 1; else rec rsync 0; fi
  if has flock; then rec flock 1; else rec flock 0; fi
  if has zstd; then rec zstd bin
  elif tar --zstd -cf - -T /dev/null >/dev/null 2>&1; then rec zstd tar
  else rec zstd 0; fi
}
untar() {
  uc=$1 ua=$2; shift 2
  case $uc in
    gzip) tar -z "$@" -f "$ua" ;;
    zstd) if has zstd; then zstd -dcq -- "$ua" | tar "$@" -f -; else tar --zstd "$@" -f "$ua"; fi ;;
    *) err "unknown compression $uc"; return 1 ;;
  esac
}
lock() {
  if has flock; then
    exec 9>>"$1.lock" || return 0
    flock -w 900 9 || err "warning: could not lock $1.lock; going on without the lock"
  fi
}
cleanup_on_exit() {
  trap "$1" EXIT
  trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 141' PIPE; trap 'exit 143' TERM
}
partial() {
  p=$(size_of "$1")
  if [ "$p" -gt "$2" ]; then rm -f -- "$1"; p=0; fi
  rec partial "$p"
}
base() {
  mkdir -p -- "$1/releases/.incoming" "$1/images/.incoming" "$1/runs" || exit 1
  chmod 700 -- "$1/runs" "$1/releases/.incoming" "$1/images/.incoming" || exit 1
}
install_release() {
  rel=$d/releases
  if [ -f "$rel/$h/.complete" ]; then rm -f -- "$f"; rec installed already; exit 0; fi
  t=$(mktemp -d "$rel/.tmp-$h-XXXXXXXX") || exit 1
  cleanup_on_exit 'rm -rf -- "$t" "$t.list"'
  untar "$comp" "$f" -t > "$t.list" || { err "cannot list the archive $f"; exit 1; }
  bad=0
  while IFS= read -r p; do
    case /$p/ in */../*) bad=1; err "unsafe archive entry (..): $p" ;; esac
    case $p in /*) bad=1; err "unsafe archive entry (absolute): $p" ;; esac
  done < "$t.list"
  if [ "$bad" != 0 ]; then rm -f -- "$f"; exit 7; fi
  untar "$comp" "$f" -x --no-same-owner -C "$t" || { err "cannot extract $f into $t"; exit 1; }
  (cd -- "$t" && sha256sum -c --quiet SHA256SUMS) >&2 || { err "the files extracted into $t do not match their SHA256SUMS"; exit 8; }
  chmod -R go-w -- "$t" && chmod 755 -- "$t" && touch -- "$t/.complete" || exit 1
  if [ -f "$rel/$h/.complete" ]; then rm -f -- "$f"; rec installed concurrent; exit 0; fi
  if [ -e "$rel/$h" ] || [ -L "$rel/$h" ]; then rm -rf -- "$rel/$h" || exit 1; fi
  if mv -T -- "$t" "$rel/$h"; then
    trap - EXIT; rm -f -- "$t.list" "$f"; rec installed 1; exit 0
  fi
  if [ -f "$rel/$h/.complete" ]; then rm -f -- "$f"; rec installed concurrent; exit 0; fi
  err "cannot rename $t to $rel/$h"; exit 1
}
install_image() {
  chmod 644 -- "$f" && mv -f -- "$f" "$d/images/$n" || exit 1
  # The verified sha256 beside the image, so later probes need not hash 100s of MB again.
  printf '%s\n' "$want" > "$d/images/$n.sha256.tmp" && mv -f -- "$d/images/$n.sha256.tmp" "$d/images/$n.sha256"
  rec installed 1; exit 0
}
op=$1; shift
case $op in
release-probe)
  d=$1 h=$2 n=$3 size=$4
  base "$d"; cd -- "$d" || exit 1
  rec abs "$PWD"
  if [ -f "releases/$h/.complete" ]; then rec complete 1; exit 0; fi
  rec complete 0; caps; partial "releases/.incoming/$n" "$size" ;;
image-probe)
  d=$1 n=$2 size=$3
  base "$d"; cd -- "$d" || exit 1
  rec abs "$PWD"
  if [ -f "images/$n" ] && [ "$(size_of "images/$n")" = "$size" ]; then
    if [ -s "images/$n.sha256" ] && ! [ "images/$n" -nt "images/$n.sha256" ]; then
      rec have "$(head -c 64 "images/$n.sha256")"
    else
      got=$(sha256sum < "images/$n") && rec have "${got%% *}"
    fi
  fi
  caps; partial "images/.incoming/$n" "$size" ;;
append|install)
  kind=$1 d=$2 n=$3 want=$4 x=$5 h=${6-} comp=${7-}
  case $kind in
    release) f=$d/releases/.incoming/$n ;;
    image) f=$d/images/.incoming/$n ;;
    *) err "unknown kind $kind"; exit 2 ;;
  esac
  lock "$f"
  if [ "$kind" = release ] && [ -f "$d/releases/$h/.complete" ]; then rm -f -- "$f"; rec installed already; exit 0; fi
  # A concurrent upload of the same image may have installed it while this one waited for the lock.
  if [ "$kind" = image ] && [ -f "$d/images/$n" ] && [ -s "$d/images/$n.sha256" ] && ! [ "$d/images/$n" -nt "$d/images/$n.sha256" ] && [ "$(head -c 64 "$d/images/$n.sha256")" = "$want" ]; then rm -f -- "$f"; rec installed already; exit 0; fi
  mode=$x
  if [ "$op" = append ]; then
    mode=install
    if [ "$x" = 0 ]; then
      (umask 077; cat > "$f") || { err "cannot write $f"; exit 5; }
    else
      have=$(size_of "$f")
      if [ "$have" != "$x" ]; then rec offset "$have"; exit 4; fi
      cat >> "$f" || { err "cannot write $f"; exit 5; }
    fi
  fi
  [ -f "$f" ] || { err "the upload $f is missing"; exit 6; }
  got=$(sha256sum < "$f") || exit 1
  got=${got%% *}
  if [ "$got" != "$want" ]; then rm -f -- "$f"; rec mismatch "$got"; exit 3; fi
  rec verified 1
  [ "$mode" = verify ] && exit 0
  case $kind in release) install_release ;; image) install_image ;; esac ;;
run-make)
  d=$1 id=$2
  base "$d"
  (umask 077; mkdir -p -- "$d/runs/$id") && chmod 700 -- "$d/runs/$id" || exit 1
  cd -- "$d/runs/$id" || exit 1
  rec abs "$PWD" ;;
run-clean)
  d=$1 id=$2
  if [ -e "$d/runs/$id" ]; then rm -rf -- "$d/runs/$id" || exit 1; rec removed 1; else rec removed 0; fi ;;
fetch)
  [ -d "$1" ] || { err "no such directory: $1"; exit 9; }
  exec tar -cf - -C "$1" . ;;
prune)
  d=$1 krel=$2 kimg=$3
  [ -d "$d" ] || exit 0
  cd -- "$d" || exit 1
  for e in releases/* releases/.tmp-* releases/.incoming/* images/* images/.tmp-* images/.incoming/*; do
    [ -e "$e" ] || [ -L "$e" ] || continue
    nm=${e#*/}
    case $e in
      releases/.*|images/.*) ;;
      releases/*) case $krel in *"/$nm/"*) continue ;; esac ;;
      images/*) case $kimg in *"/$nm/"*|*"/${nm%.sha256}/"*) continue ;; esac ;;
    esac
    rm -rf -- "$e" || exit 1
    printf '%s\0' "$e"
  done ;;
*) err "unknown operation $op"; exit 2 ;;
esac
"#;

/// Exit code of the script: the uploaded file's sha256 differs (it was removed).
const EXIT_MISMATCH: i32 = 3;
/// Exit code of the script: the partial upload is not the size we resume from.
const EXIT_OFFSET: i32 = 4;
/// Exit code of the script: the upload could not be written (e.g. a full disk).
const EXIT_WRITE: i32 = 5;
/// Exit code of the script: the archive holds absolute or `..` entries.
const EXIT_UNSAFE: i32 = 7;

/// Chunk size of the stream method (and of its progress reports).
const STREAM_CHUNK: usize = 256 << 10;

/// Send the package to `<remote_dir>/releases/<hash16>/`, extracted, verified, atomically.
pub fn upload_release(
    s: &Session,
    package: &Utf8Path,
    remote_dir: &str,
    method: Method,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Uploaded> {
    upload_release_with(s, package, remote_dir, method, progress, Opts::default()).map(|(u, _)| u)
}

/// Store a SIF once per image hash at `<remote_dir>/images/<hash>.sif` (skip when present
/// with the same size and sha256).
pub fn upload_image(
    s: &Session,
    sif: &Utf8Path,
    image_hash: &str,
    remote_dir: &str,
    method: Method,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Uploaded> {
    upload_image_with(s, sif, image_hash, remote_dir, method, progress, Opts::default()).map(|(u, _)| u)
}

/// Create `<remote_dir>/runs/<run_id>/` with mode 0700 (and `releases/`, `images/`, `runs/`);
/// returns its absolute path.
pub fn make_run_dir(s: &Session, remote_dir: &str, run_id: &str) -> Result<String> {
    check_name("run id", run_id)?;
    let r = Remote::new(s);
    let dir = dir_arg(remote_dir)?;
    let reply = r.call("run-make", &[&dir, run_id])?;
    if reply.code != 0 {
        return Err(failure(s, remote_dir, &format!("creating the run directory {}", join_path(remote_dir, &format!("runs/{run_id}"))), &reply));
    }
    reply.need(s, "abs").map(str::to_string)
}

/// `cargo xtask clean`: remove `<remote_dir>/runs/<run_id>/`.
pub fn clean_run(s: &Session, remote_dir: &str, run_id: &str) -> Result<()> {
    check_name("run id", run_id)?;
    let r = Remote::new(s);
    let dir = dir_arg(remote_dir)?;
    let reply = r.call("run-clean", &[&dir, run_id])?;
    if reply.code != 0 {
        return Err(failure(s, remote_dir, &format!("removing {}", join_path(remote_dir, &format!("runs/{run_id}"))), &reply));
    }
    Ok(())
}

/// `clean --all`: remove every release and image not in `keep` (release hash16 directory
/// names, image file names) and every incoming or temporary leftover. Returns what was
/// removed, as paths relative to `remote_dir` (`releases/<hash16>`, `images/<x>.sif`, ...).
pub fn prune(s: &Session, remote_dir: &str, keep_releases: &[String], keep_images: &[String]) -> Result<Vec<String>> {
    for k in keep_releases {
        check_name("release", k)?;
    }
    for k in keep_images {
        check_name("image", k)?;
    }
    let set = |names: &[String]| format!("/{}/", names.join("/"));
    let r = Remote::new(s);
    let dir = dir_arg(remote_dir)?;
    let reply = r.call("prune", &[&dir, &set(keep_releases), &set(keep_images)])?;
    if reply.code != 0 {
        return Err(failure(s, remote_dir, &format!("pruning {remote_dir}"), &reply));
    }
    Ok(reply.records.clone())
}

/// Copy the remote run directory's files into `local_dir` (tar over the ssh session; only
/// regular files and directories are taken). Returns the bytes of the files copied.
pub fn fetch_dir(s: &Session, remote_run_dir: &str, local_dir: &Utf8Path) -> Result<u64> {
    let dir = dir_arg(remote_run_dir)?;
    std::fs::create_dir_all(local_dir).with_context(|| format!("cannot create {local_dir}"))?;
    let mut c = s.command(&script_argv("fetch", &[&dir]))?;
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().context("cannot start `ssh`; is the OpenSSH client installed?")?;
    let stderr = drain(child.stderr.take());
    let stdout = child.stdout.take().expect("piped");
    let mut bytes = 0u64;
    let unpacked = (|| -> Result<()> {
        let mut archive = tar::Archive::new(stdout);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind.is_dir()) {
                continue;
            }
            if kind.is_file() {
                bytes += entry.size();
            }
            entry.unpack_in(local_dir.as_std_path())?;
        }
        // Read tar's end-of-archive padding too, so the remote side never sees a closed pipe.
        std::io::copy(&mut archive.into_inner(), &mut std::io::sink())?;
        Ok(())
    })();
    if unpacked.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let stderr = stderr.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&stderr);
    match status.code() {
        Some(255) => return Err(ssh::ssh_error(&s.cfg, &stderr)),
        Some(9) => bail!("on {}: there is no run directory {remote_run_dir}\n  fix: check the run id (`cargo xtask runs`); the run may have been cleaned", s.host()),
        _ => {}
    }
    unpacked.with_context(|| format!("cannot copy {}:{remote_run_dir} into {local_dir}", s.host()))?;
    // GNU tar exits 1 when a file changed while it was read: a log still being written.
    if !(status.success() || status.code() == Some(1)) {
        bail!("on {}: cannot read {remote_run_dir} (exit code {}): {}", s.host(), status.code().unwrap_or(-1), stderr.trim());
    }
    Ok(bytes)
}

/// Knobs for tests.
#[derive(Debug, Clone, Copy)]
struct Opts {
    /// Retry once from scratch after a sha256 mismatch.
    retry: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { retry: true }
    }
}

/// The method to use: an explicit request is kept as is; `Auto` takes rsync only when both
/// sides have it.
fn choose_method(local_has_rsync: bool, remote_has_rsync: bool, requested: Method) -> Method {
    match requested {
        Method::Auto if local_has_rsync && remote_has_rsync => Method::Rsync,
        Method::Auto => Method::Stream,
        m => m,
    }
}

fn resolve_method(s: &Session, requested: Method, remote_has_rsync: bool) -> Result<Method> {
    let local = crate::proc::which("rsync").is_some();
    let m = choose_method(local, remote_has_rsync, requested);
    if requested == Method::Auto && m == Method::Stream {
        let side = if local { format!("{} has no `rsync`", s.host()) } else { "this machine has no `rsync`".to_string() };
        crate::ui::detail(&format!("{side}: streaming over ssh instead (resumable, sha256-checked)"));
    }
    if m == Method::Rsync && !(local && remote_has_rsync) {
        let side = if local { format!("on {}", s.host()) } else { "on this machine".to_string() };
        bail!("rsync was requested, but there is no `rsync` {side}\n  fix: install rsync there, or use the stream method (the default `auto` falls back to it)");
    }
    Ok(m)
}

/// A verified local package and what its name says.
struct LocalPackage {
    path: Utf8PathBuf,
    name: String,
    hash16: String,
    compression: &'static str,
    sha256: String,
    size: u64,
}

/// `daphne-payload-<16 hex>.tar.zst|.tar.gz` → (hash16, compression).
fn parse_package_name(name: &str) -> Option<(&str, &'static str)> {
    let rest = name.strip_prefix(crate::package::PACKAGE_PREFIX)?;
    let (hash, comp) = if let Some(h) = rest.strip_suffix(".tar.zst") {
        (h, "zstd")
    } else if let Some(h) = rest.strip_suffix(".tar.gz") {
        (h, "gzip")
    } else {
        return None;
    };
    (hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())).then_some((hash, comp))
}

impl LocalPackage {
    fn open(package: &Utf8Path) -> Result<LocalPackage> {
        let path = absolute(package)?;
        let name = path.file_name().unwrap_or_default().to_string();
        let (hash16, compression) = parse_package_name(&name).map(|(h, c)| (h.to_string(), c)).ok_or_else(|| {
            anyhow!("{package} is not named like a payload package (daphne-payload-<16 hex digits>.tar.zst or .tar.gz)\n  fix: upload the file that `cargo xtask package` wrote, under its own name")
        })?;
        let verified = crate::package::verify(&path)?;
        if !verified.content_hash.starts_with(&hash16) {
            bail!("{package}: its name says content hash {hash16}, but its manifest hashes to {}\n  fix: rebuild it with `cargo xtask package`", &verified.content_hash[..16]);
        }
        let sidecar = Utf8PathBuf::from(format!("{path}.sha256"));
        if let Ok(text) = std::fs::read_to_string(&sidecar) {
            let recorded = text.split_whitespace().next().unwrap_or("");
            if recorded != verified.archive_sha256 {
                bail!("{package}: its sha256 is {}, but {sidecar} says {recorded}\n  fix: rebuild the package with `cargo xtask package`", verified.archive_sha256);
            }
        }
        let size = std::fs::metadata(&path).with_context(|| format!("cannot read {path}"))?.len();
        Ok(LocalPackage { name, hash16, compression, sha256: verified.archive_sha256, size, path })
    }
}

/// What is being uploaded, with everything the remote operations need.
struct Job<'a> {
    kind: &'static str,
    /// For messages: the remote_dir as configured.
    remote_dir: &'a str,
    /// Absolute remote_dir, as the remote resolved it.
    abs: String,
    /// The file name under `.incoming/` (and under `images/` for images).
    name: String,
    local: Utf8PathBuf,
    sha256: String,
    size: u64,
    /// Release hash16 and compression; empty for images.
    extra: Vec<String>,
    /// The remote has `flock`: rsync then runs under the upload's lock, like the script.
    flock: bool,
}

impl Job<'_> {
    fn incoming(&self) -> String {
        let sub = if self.kind == "release" { "releases" } else { "images" };
        format!("{}/{sub}/.incoming/{}", self.abs.trim_end_matches('/'), self.name)
    }

    fn args(&self, x: &str) -> Vec<String> {
        let mut a = vec![self.kind.to_string(), self.abs.clone(), self.name.clone(), self.sha256.clone(), x.to_string()];
        a.extend(self.extra.iter().cloned());
        a
    }
}

fn upload_release_with(
    s: &Session,
    package: &Utf8Path,
    remote_dir: &str,
    method: Method,
    progress: &mut dyn FnMut(u64, u64),
    opts: Opts,
) -> Result<(Uploaded, u32)> {
    let t0 = Instant::now();
    let pkg = LocalPackage::open(package)?;
    let r = Remote::new(s);
    let dir = dir_arg(remote_dir)?;
    let probe = r.call("release-probe", &[&dir, &pkg.hash16, &pkg.name, &pkg.size.to_string()])?;
    if probe.code != 0 {
        return Err(failure(s, remote_dir, &format!("preparing {remote_dir}"), &probe));
    }
    let abs = probe.need(s, "abs")?.to_string();
    let remote_path = format!("{}/releases/{}", abs.trim_end_matches('/'), pkg.hash16);
    if probe.get("complete") == Some("1") {
        let up = Uploaded { remote_path, bytes_sent: 0, skipped: true, method: "none", seconds: t0.elapsed().as_secs_f64() };
        return Ok((up, r.calls.get()));
    }
    if pkg.compression == "zstd" && probe.get("zstd") == Some("0") {
        bail!(
            "on {}: there is no `zstd` (and tar lacks --zstd), so {} cannot be unpacked there\n  fix: set `compression = \"gzip\"` under [payload] and run `cargo xtask package` again, or install zstd on the cluster",
            s.host(),
            pkg.name
        );
    }
    let m = resolve_method(s, method, probe.get("rsync") == Some("1"))?;
    let partial: u64 = probe.get("partial").and_then(|p| p.parse().ok()).unwrap_or(0);
    let job = Job {
        kind: "release",
        remote_dir,
        abs,
        name: pkg.name.clone(),
        local: pkg.path.clone(),
        sha256: pkg.sha256.clone(),
        size: pkg.size,
        extra: vec![pkg.hash16.clone(), pkg.compression.to_string()],
        flock: probe.get("flock") == Some("1"),
    };
    let bytes_sent = send_and_install(&r, &job, m, partial, opts, progress)?;
    let up = Uploaded { remote_path, bytes_sent, skipped: false, method: method_name(m), seconds: t0.elapsed().as_secs_f64() };
    Ok((up, r.calls.get()))
}

fn upload_image_with(
    s: &Session,
    sif: &Utf8Path,
    image_hash: &str,
    remote_dir: &str,
    method: Method,
    progress: &mut dyn FnMut(u64, u64),
    opts: Opts,
) -> Result<(Uploaded, u32)> {
    let t0 = Instant::now();
    check_name("image hash", image_hash)?;
    let name = if image_hash.ends_with(".sif") { image_hash.to_string() } else { format!("{image_hash}.sif") };
    let local = absolute(sif)?;
    let size = std::fs::metadata(&local).with_context(|| format!("cannot read the image {sif}"))?.len();
    let sha256 = cached_sha256(&local)?;
    let r = Remote::new(s);
    let dir = dir_arg(remote_dir)?;
    let probe = r.call("image-probe", &[&dir, &name, &size.to_string()])?;
    if probe.code != 0 {
        return Err(failure(s, remote_dir, &format!("preparing {remote_dir}"), &probe));
    }
    let abs = probe.need(s, "abs")?.to_string();
    let remote_path = format!("{}/images/{name}", abs.trim_end_matches('/'));
    if probe.get("have") == Some(sha256.as_str()) {
        let up = Uploaded { remote_path, bytes_sent: 0, skipped: true, method: "none", seconds: t0.elapsed().as_secs_f64() };
        return Ok((up, r.calls.get()));
    }
    let m = resolve_method(s, method, probe.get("rsync") == Some("1"))?;
    let partial: u64 = probe.get("partial").and_then(|p| p.parse().ok()).unwrap_or(0);
    let job = Job { kind: "image", remote_dir, abs, name, local, sha256, size, extra: vec![], flock: probe.get("flock") == Some("1") };
    let bytes_sent = send_and_install(&r, &job, m, partial, opts, progress)?;
    let up = Uploaded { remote_path, bytes_sent, skipped: false, method: method_name(m), seconds: t0.elapsed().as_secs_f64() };
    Ok((up, r.calls.get()))
}

/// The sha256 of a large local file (the SIF), cached in `<file>.sha256` beside it together
/// with the size and mtime it was computed for, so an unchanged image is hashed once.
fn cached_sha256(path: &Utf8Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {path}"))?;
    let stamp = format!("{} {}.{}", meta.len(), meta.mtime(), meta.mtime_nsec());
    let cache = Utf8PathBuf::from(format!("{path}.sha256"));
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Some((sha, rest)) = text.trim().split_once(' ') {
            if rest == stamp && sha.len() == 64 {
                return Ok(sha.to_string());
            }
        }
    }
    let sha = crate::package::sha256_file(path)?;
    let _ = crate::runstate::write_atomic(&cache, format!("{sha} {stamp}\n").as_bytes());
    Ok(sha)
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Rsync => "rsync",
        Method::Stream | Method::Auto => "stream",
    }
}

/// Transfers into `.incoming/`, verifies the sha256 remotely and installs. A mismatch
/// removes the remote copy and starts once more from scratch; a second one is an error.
fn send_and_install(r: &Remote<'_>, job: &Job<'_>, m: Method, partial: u64, opts: Opts, progress: &mut dyn FnMut(u64, u64)) -> Result<u64> {
    let s = r.s;
    let mut offset = partial;
    let mut sent = 0u64;
    let mut retried = false;
    let mut restarted = false;
    loop {
        let reply = match m {
            Method::Rsync => {
                sent += r.rsync(job, progress)?;
                r.call("install", &strs(&job.args("install")))?
            }
            _ => {
                let (reply, n) = r.append(job, offset, progress)?;
                sent += n;
                reply
            }
        };
        match reply.code {
            0 => return Ok(sent),
            EXIT_MISMATCH if opts.retry && !retried => {
                retried = true;
                offset = 0;
                crate::ui::warn(&format!(
                    "on {}: the upload {} arrived corrupted (sha256 {}); removed it, sending it again from scratch",
                    s.host(),
                    job.incoming(),
                    reply.get("mismatch").unwrap_or("?")
                ));
            }
            EXIT_MISMATCH => return Err(mismatch_error(s, job, &reply)),
            EXIT_OFFSET if !restarted => {
                // Someone else touched the partial upload between the probe and now.
                restarted = true;
                offset = 0;
            }
            EXIT_UNSAFE => bail!(
                "on {}: {} holds absolute or `..` paths; nothing was extracted and the upload was removed: {}\n  fix: rebuild the package with `cargo xtask package`",
                s.host(),
                job.incoming(),
                reply.stderr.trim()
            ),
            EXIT_WRITE => return Err(failure(s, job.remote_dir, &format!("writing {}", job.incoming()), &reply)),
            _ => return Err(failure(s, job.remote_dir, &format!("installing {} from {}", job.name, job.incoming()), &reply)),
        }
    }
}

fn mismatch_error(s: &Session, job: &Job<'_>, reply: &Reply) -> anyhow::Error {
    anyhow!(
        "on {}: the upload {} does not match the local {} (sha256 {} on the remote, {} here); the corrupt copy was removed and nothing was installed\n  fix: check the network and the remote filesystem under {}, then upload again",
        s.host(),
        job.incoming(),
        job.local,
        reply.get("mismatch").unwrap_or("?"),
        job.sha256,
        job.remote_dir
    )
}

/// Checks the remote sha256 of an upload in `.incoming/` without installing it; a mismatch
/// removes it. Returns whether it matched.
#[cfg_attr(not(test), allow(dead_code))]
fn verify_remote(r: &Remote<'_>, job: &Job<'_>) -> Result<bool> {
    let reply = r.call("install", &strs(&job.args("verify")))?;
    match reply.code {
        0 => Ok(true),
        EXIT_MISMATCH => Ok(false),
        _ => Err(failure(r.s, job.remote_dir, &format!("verifying {}", job.incoming()), &reply)),
    }
}

/// One script call's outcome.
struct Reply {
    code: i32,
    /// `key=value` records.
    fields: Vec<(String, String)>,
    /// Every NUL-terminated record, as is (prune's list).
    records: Vec<String>,
    stderr: String,
}

impl Reply {
    fn parse(code: i32, stdout: &[u8], stderr: &[u8]) -> Reply {
        let records: Vec<String> = stdout.split(|b| *b == 0).filter(|r| !r.is_empty()).map(|r| String::from_utf8_lossy(r).into_owned()).collect();
        let fields = records.iter().filter_map(|r| r.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Reply { code, fields, records, stderr: String::from_utf8_lossy(stderr).into_owned() }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn need(&self, s: &Session, key: &str) -> Result<&str> {
        self.get(key).ok_or_else(|| anyhow!("on {}: the remote shell gave no `{key}` (is /bin/sh a POSIX shell?): {}", s.host(), self.stderr.trim()))
    }
}

/// The session plus a count of remote calls (tests hold uploads to a budget).
struct Remote<'a> {
    s: &'a Session,
    calls: Cell<u32>,
}

fn script_argv(op: &str, args: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["sh", "-c", SCRIPT, "daphne-xtask", op].map(String::from).to_vec();
    a.extend(args.iter().map(|s| s.to_string()));
    a
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

impl<'a> Remote<'a> {
    fn new(s: &'a Session) -> Self {
        Remote { s, calls: Cell::new(0) }
    }

    fn call(&self, op: &str, args: &[&str]) -> Result<Reply> {
        self.calls.set(self.calls.get() + 1);
        let out = self.s.output(&script_argv(op, args), None)?;
        Ok(Reply::parse(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr))
    }

    /// Stream method: appends the local file from `offset` on, then verifies and installs,
    /// all in one remote call. Returns the reply and the bytes sent.
    fn append(&self, job: &Job<'_>, offset: u64, progress: &mut dyn FnMut(u64, u64)) -> Result<(Reply, u64)> {
        self.calls.set(self.calls.get() + 1);
        let argv = script_argv("append", &strs(&job.args(&offset.to_string())));
        let mut c = self.s.command(&argv)?;
        c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().context("cannot start `ssh`; is the OpenSSH client installed?")?;
        let watch = StopOnSignal::watch(child.id());
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let mut stdin = child.stdin.take().expect("piped");
        let mut sent = 0u64;
        let copied = (|| -> Result<()> {
            let mut file = File::open(&job.local).with_context(|| format!("cannot open {}", job.local))?;
            file.seek(SeekFrom::Start(offset)).with_context(|| format!("cannot read {}", job.local))?;
            let mut buf = vec![0u8; STREAM_CHUNK];
            progress(offset, job.size);
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e).with_context(|| format!("cannot read {}", job.local)),
                };
                if stdin.write_all(&buf[..n]).is_err() {
                    // The remote stopped reading (full disk, offset mismatch): its exit tells why.
                    return Ok(());
                }
                sent += n as u64;
                progress(offset + sent, job.size);
            }
        })();
        if copied.is_err() {
            // Never let a short local read reach the remote as a complete upload.
            let _ = child.kill();
        }
        drop(stdin);
        let status = watch.wait(&mut child)?;
        drop(watch);
        let out = stdout.join().unwrap_or_default();
        let err = stderr.join().unwrap_or_default();
        copied?;
        if !status.success() {
            if let Some(e) = interrupted(job) {
                return Err(e);
            }
        }
        if status.code() == Some(255) {
            let text = String::from_utf8_lossy(&err);
            // A connect or login failure says so; anything else mid-stream is a dropped link.
            if looks_like_ssh_failure(&text) {
                return Err(ssh::ssh_error(&self.s.cfg, &text));
            }
            return Err(Dropped { host: self.s.host().to_string(), what: format!("{} to {}", job.local, job.incoming()), detail: format!("ssh exited with code 255 after {sent} bytes: {}", last_line(&text)) }.into());
        }
        Ok((Reply::parse(code_of(status), &out, &err), sent))
    }

    /// rsync into `.incoming/` (resuming with --append-verify) through the session's
    /// ControlMaster. Returns rsync's "Total bytes sent".
    fn rsync(&self, job: &Job<'_>, progress: &mut dyn FnMut(u64, u64)) -> Result<u64> {
        self.calls.set(self.calls.get() + 1);
        let host = &self.s.cfg.host;
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.clone() };
        let mut c = Command::new("rsync");
        // -s: the remote path travels inside rsync's protocol, never through a shell.
        c.args(["-s", "--partial", "--append-verify", "--stats", "--progress", "--timeout=300", "-e", &ssh::rsync_rsh(self.s)]);
        if job.flock {
            // Concurrent uploads of the same file wait for each other (the script takes the same lock).
            let lock = format!("{}.lock", job.incoming());
            c.arg(format!("--rsync-path={}", crate::quote::join(&["flock", "-w", "900", lock.as_str(), "rsync"])?));
        }
        c.arg(job.local.as_str())
            .arg(format!("{host}:{}", job.incoming()))
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        let mut child = c.spawn().context("cannot start `rsync`")?;
        let watch = StopOnSignal::watch(child.id());
        let stderr = drain(child.stderr.take());
        let mut stdout = child.stdout.take().expect("piped");
        let mut text = Vec::new();
        let mut line = Vec::new();
        let mut buf = [0u8; 8192];
        progress(0, job.size);
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            for &b in &buf[..n] {
                if b == b'\r' || b == b'\n' {
                    if let Some(done) = parse_rsync_progress(&String::from_utf8_lossy(&line)) {
                        progress(done.min(job.size), job.size);
                    }
                    line.clear();
                } else {
                    line.push(b);
                }
            }
            text.extend_from_slice(&buf[..n]);
        }
        let status = watch.wait(&mut child)?;
        drop(watch);
        let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
        if !status.success() {
            if let Some(e) = interrupted(job) {
                return Err(e);
            }
            if looks_like_ssh_failure(&err) {
                return Err(ssh::ssh_error(&self.s.cfg, &err));
            }
            // rsync's codes for a lost connection: 10 socket I/O, 12 protocol data stream,
            // 30 I/O timeout, 35 connect timeout, 255 its transport (ssh) died.
            if matches!(status.code(), Some(10 | 12 | 30 | 35 | 255)) {
                return Err(Dropped { host: self.s.host().to_string(), what: format!("{} to {}", job.local, job.incoming()), detail: format!("rsync exited with code {}: {}", code_of(status), last_line(&err)) }.into());
            }
            let reply = Reply { code: code_of(status), fields: vec![], records: vec![], stderr: err };
            return Err(failure(self.s, job.remote_dir, &format!("rsync of {} to {}", job.local, job.incoming()), &reply));
        }
        progress(job.size, job.size);
        Ok(parse_rsync_sent(&String::from_utf8_lossy(&text)).unwrap_or(0))
    }
}

fn code_of(status: ExitStatus) -> i32 {
    status.code().unwrap_or(-1)
}

/// Stops a transfer's child (its whole process group: rsync and its ssh) when SIGINT or SIGTERM
/// arrives. Transfer children have process groups of their own, so a Ctrl-C at the terminal
/// reaches only the tool; this makes a long upload end promptly anyway, and what arrived stays
/// in `.incoming/` for the next upload to resume. The child is reaped through [`Self::wait`],
/// under the same lock as the kill, so a reaped (and maybe reused) process id is never signalled.
struct StopOnSignal {
    /// True once the child is reaped or the watch is over.
    over: std::sync::Arc<std::sync::Mutex<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StopOnSignal {
    fn watch(pgid: u32) -> StopOnSignal {
        let over = std::sync::Arc::new(std::sync::Mutex::new(false));
        let o = std::sync::Arc::clone(&over);
        let thread = std::thread::spawn(move || loop {
            {
                let Ok(g) = o.lock() else { return };
                if *g {
                    return;
                }
                if crate::signals::pending().is_some() {
                    // SAFETY: kill(2) on the group our child leads; it is not reaped (checked
                    // under the lock that `wait` reaps under).
                    unsafe { libc::kill(-(pgid as i32), libc::SIGTERM) };
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        });
        StopOnSignal { over, thread: Some(thread) }
    }

    fn wait(&self, child: &mut std::process::Child) -> std::io::Result<ExitStatus> {
        loop {
            {
                let mut g = self.over.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(st) = child.try_wait()? {
                    *g = true;
                    return Ok(st);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for StopOnSignal {
    fn drop(&mut self) {
        *self.over.lock().unwrap_or_else(|e| e.into_inner()) = true;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A transfer that ended because of SIGINT/SIGTERM is an interruption, not a failure.
fn interrupted(job: &Job<'_>) -> Option<anyhow::Error> {
    let sig = crate::signals::pending()?;
    crate::ui::info(&format!("stopped sending {} ({}); what arrived is kept in {} and the next upload resumes from there", job.local, crate::signals::name(sig), job.incoming()));
    Some(crate::signals::Interrupted(sig).into())
}

/// Reads a pipe to the end on a thread (so neither side of a child blocks).
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut v);
        }
        v
    })
}

/// `      1,234,567  45%  ...` → 1234567.
fn parse_rsync_progress(line: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    let first = words.next()?;
    let pct = words.next()?;
    if !pct.ends_with('%') {
        return None;
    }
    digits(first)
}

/// `Total bytes sent: 1,234` → 1234.
fn parse_rsync_sent(stats: &str) -> Option<u64> {
    stats.lines().find_map(|l| l.trim().strip_prefix("Total bytes sent:")).and_then(digits)
}

fn digits(s: &str) -> Option<u64> {
    let s = s.trim();
    let d: String = s.chars().filter(|c| c.is_ascii_digit()).collect();
    if d.is_empty() || s.chars().any(|c| !(c.is_ascii_digit() || c == ',' || c == '.' || c == '\'')) {
        return None;
    }
    d.parse().ok()
}

/// rsync's stderr when its ssh could not connect or authenticate.
fn looks_like_ssh_failure(stderr: &str) -> bool {
    ["Permission denied (", "Host key verification failed", "host key is known", "Could not resolve hostname", "ssh: connect to host", "REMOTE HOST IDENTIFICATION HAS CHANGED"]
        .iter()
        .any(|p| stderr.contains(p))
}

/// A remote failure as an error that names the host, the path and the next step.
fn failure(s: &Session, remote_dir: &str, what: &str, reply: &Reply) -> anyhow::Error {
    let host = s.host();
    let stderr = reply.stderr.trim();
    if stderr.contains("No space left on device") || stderr.contains("Disk quota exceeded") {
        let last = stderr.lines().rev().find(|l| l.contains("No space") || l.contains("quota")).unwrap_or(stderr).trim();
        return anyhow!(
            "on {host}: the remote disk at {remote_dir} is full; free space or set remote_dir ({what}: {last})\n  fix: free space there (`cargo xtask clean --all` removes unused releases and images), or set `remote_dir` under [reach] to a filesystem with room; nothing half-installed was left behind"
        );
    }
    if stderr.contains("Permission denied") || stderr.contains("Read-only file system") {
        return anyhow!("on {host}: {what} failed: {stderr}\n  fix: set `remote_dir` under [reach] to a directory you can write (now {remote_dir})");
    }
    anyhow!("on {host}: {what} failed (exit code {}): {stderr}\n  fix: run it again with -v; if it persists, check {remote_dir} on {host} by hand", reply.code)
}

/// remote_dir as the script's argument: `~` and `~/x` mean the home directory (the remote
/// shell's working directory), relative paths get `./` so that no argument starts with `-`.
fn dir_arg(dir: &str) -> Result<String> {
    if dir.is_empty() {
        bail!("remote_dir is empty\n  fix: set `remote_dir` under [reach], e.g. \"~/daphne-deploy\"");
    }
    if dir.contains('\0') {
        bail!("remote_dir {dir:?} contains a NUL byte");
    }
    let d = if dir == "~" {
        ".".to_string()
    } else if let Some(rest) = dir.strip_prefix("~/") {
        format!("./{rest}")
    } else if dir.starts_with('/') {
        dir.to_string()
    } else {
        format!("./{dir}")
    };
    let trimmed = d.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/".to_string() } else { trimmed.to_string() })
}

/// A single path component that is safe as a remote file name.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    if !ok {
        bail!("{what} {name:?} is not a valid name: use letters, digits, `.`, `_`, `-` and `+` only, not starting with `.` or `-`");
    }
    Ok(())
}

fn join_path(dir: &str, rest: &str) -> String {
    format!("{}/{rest}", dir.trim_end_matches('/'))
}

fn absolute(p: &Utf8Path) -> Result<Utf8PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let cwd = Utf8PathBuf::from_path_buf(cwd).map_err(|p| anyhow!("the current directory {} is not UTF-8", p.display()))?;
    Ok(cwd.join(p))
}


#[cfg(test)]
mod tests {
    //! Against a real sshd: a testbed of its own (TB_RT=/tmp/daphne-testbed-unit), brought up
    //! once per test binary and torn down at exit, also after failures.

    use super::*;
    use crate::config::Ssh;
    use crate::package::{self, Compression, Entry, PackSpec};
    use std::collections::BTreeMap;
    use std::fs::OpenOptions;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::process::Output;
    use std::sync::OnceLock;

    const RT: &str = "/tmp/daphne-testbed-unit";
    const TB_ENV: [(&str, &str); 4] = [("TB_RT", RT), ("TB_PREFIX", "dtu-"), ("TB_NET", "10.79.0"), ("TB_BRIDGE", "dtubr0")];

    struct Tb {
        env: BTreeMap<String, String>,
    }

    impl Tb {
        fn get(&self, k: &str) -> &str {
            self.env.get(k).map(String::as_str).unwrap_or_else(|| panic!("testbed.env has no {k}"))
        }
    }

    fn run_script(name: &str) -> Output {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed").join(name);
        Command::new("bash").arg(path).envs(TB_ENV).stdin(Stdio::null()).output().unwrap()
    }

    extern "C" fn teardown() {
        let _ = std::panic::catch_unwind(|| run_script("down.sh"));
    }

    /// The unit testbed, up. These tests need root (sshd and slurmd in network namespaces):
    /// without it they fail, saying so; they never pass by skipping.
    fn testbed() -> Option<&'static Tb> {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the transfer tests need root: they run sshd in network namespaces of their own");
        static TB: OnceLock<Tb> = OnceLock::new();
        Some(TB.get_or_init(|| {
            // One test process at a time uses this testbed; the lock dies with the process.
            let lock = OpenOptions::new().create(true).truncate(false).write(true).open("/tmp/daphne-testbed-unit.lock").unwrap();
            // SAFETY: flock on a descriptor we own, kept open until exit.
            assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
            std::mem::forget(lock);
            let _ = run_script("down.sh");
            // SAFETY: registering a plain extern "C" function with atexit.
            unsafe { libc::atexit(teardown) };
            if !crate::testbed::missing().is_empty() {
                let out = run_script("install-deps.sh");
                assert!(out.status.success(), "installing the testbed's packages failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            }
            let out = run_script("up.sh");
            assert!(out.status.success(), "testbed up failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            let env = std::fs::read_to_string(Path::new(RT).join("testbed.env"))
                .unwrap()
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Tb { env }
        }))
    }

    fn ssh_cfg(tb: &Tb) -> Ssh {
        Ssh {
            host: tb.get("LOGIN_ADDR").to_string(),
            user: Some("root".into()),
            port: Some(22),
            identity: Some(tb.get("SSH_KEY").into()),
            proxy_jump: None,
            known_hosts: Some(tb.get("KNOWN_HOSTS").into()),
            ssh_config: None,
            options: vec![],
            connect_timeout: 5,
        }
    }

    fn session(tb: &Tb) -> Session {
        Session::new(&ssh_cfg(tb)).unwrap()
    }

    /// A remote directory of the test's own (on the shared filesystem).
    fn home(name: &str) -> String {
        format!("{RT}/home/{name}")
    }

    /// Runs a constant script remotely with positional arguments: (exit code, stdout+stderr).
    fn sh(s: &Session, script: &str, args: &[&str]) -> (i32, String) {
        let mut a: Vec<String> = ["sh", "-c", script, "sh"].map(String::from).to_vec();
        a.extend(args.iter().map(|x| x.to_string()));
        let out = s.output(&a, None).unwrap();
        (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }

    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    struct Pkg {
        _dir: tempfile::TempDir,
        path: Utf8PathBuf,
        name: String,
        hash16: String,
        sha256: String,
        size: u64,
    }

    /// A real package: two executables (one of `bytes` incompressible bytes), a library with
    /// a symlink to it, and a script.
    fn make_package(seed: u64, bytes: usize, compression: Compression) -> Pkg {
        let dir = tempfile::tempdir().unwrap();
        let root = Utf8PathBuf::from_path_buf(dir.path().to_path_buf()).unwrap();
        let src = root.join("src");
        for d in ["bin", "lib", "payload"] {
            std::fs::create_dir_all(src.join(d)).unwrap();
        }
        let exe = |p: &Utf8Path, data: &[u8]| {
            std::fs::write(p, data).unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        exe(&src.join("bin/daphne"), &noise(seed, bytes));
        exe(&src.join("bin/DistributedWorker"), &noise(seed + 1, 3000));
        std::fs::write(src.join("lib/libdaphne.so"), noise(seed + 2, 4096)).unwrap();
        std::os::unix::fs::symlink("libdaphne.so", src.join("lib/libdaphne.so.1")).unwrap();
        std::fs::write(src.join("payload/sum.daph"), format!("print(sum(seq(1, {seed}, 1)));\n")).unwrap();
        let entries = ["bin/daphne", "bin/DistributedWorker", "lib/libdaphne.so", "lib/libdaphne.so.1", "payload/sum.daph"]
            .iter()
            .map(|p| Entry::new(*p, src.join(p)))
            .collect();
        let spec = PackSpec {
            entries,
            compression,
            mtime: 1_700_000_000,
            tool_version: "transfer-tests".into(),
            source_commit: "0".repeat(40),
            source_dirty: false,
            image: None,
            target: "unit".into(),
            out_dir: root.join("out"),
        };
        let packed = package::pack(&spec, &mut |_, _| {}).unwrap();
        let name = packed.path.file_name().unwrap().to_string();
        Pkg { _dir: dir, name, hash16: packed.content_hash[..16].to_string(), sha256: packed.archive_sha256, size: packed.bytes, path: packed.path }
    }

    fn zstd() -> Compression {
        Compression::Zstd { level: 3 }
    }

    fn upload(s: &Session, pkg: &Pkg, dir: &str, m: Method) -> (Uploaded, u32) {
        let mut last = (0, 0);
        let r = upload_release_with(s, &pkg.path, dir, m, &mut |a, b| last = (a, b), Opts::default()).unwrap();
        if !r.0.skipped {
            assert_eq!(last, (pkg.size, pkg.size), "progress ends at the package size");
        }
        r
    }

    /// The release is complete, verified, not group/world-writable, and nothing is left over.
    fn assert_release(s: &Session, dir: &str, pkg: &Pkg, up: &Uploaded) {
        assert_eq!(up.remote_path, format!("{dir}/releases/{}", pkg.hash16));
        let script = r#"cd -- "$1" && test -f .complete && sha256sum -c --quiet SHA256SUMS && test -x bin/daphne && test -L lib/libdaphne.so.1 \
            && test -f manifest.json && test -f payload/sum.daph || exit 10
            w=$(find . ! -type l -perm /022); [ -z "$w" ] || { echo "writable: $w"; exit 11; }
            [ "$(stat -c %a "$2/runs")" = 700 ] || exit 12
            for i in "$2"/releases/.incoming/*; do case $i in *.lock) ;; *) [ -e "$i" ] && { echo "left: $i"; exit 13; } ;; esac; done
            for t in "$2"/releases/.tmp-*; do [ -e "$t" ] && { echo "left: $t"; exit 14; }; done; exit 0"#;
        let (code, out) = sh(s, script, &[&up.remote_path, dir]);
        assert_eq!(code, 0, "release check failed: {out}");
    }

    /// Leaves `data` as the partial upload of `name` (the filesystem is shared).
    fn place_partial(dir: &str, sub: &str, name: &str, data: &[u8]) {
        let inc = Path::new(dir).join(sub).join(".incoming");
        std::fs::create_dir_all(&inc).unwrap();
        std::fs::write(inc.join(name), data).unwrap();
    }

    fn corrupted(pkg: &Pkg) -> Vec<u8> {
        let mut data = std::fs::read(&pkg.path).unwrap();
        let mid = data.len() / 2;
        data[mid] ^= 0x55;
        data
    }

    // ------------------------------------------------------------------ pure functions

    #[test]
    fn auto_falls_back_to_stream_without_remote_rsync() {
        assert_eq!(choose_method(true, true, Method::Auto), Method::Rsync);
        assert_eq!(choose_method(true, false, Method::Auto), Method::Stream);
        assert_eq!(choose_method(false, true, Method::Auto), Method::Stream);
        assert_eq!(choose_method(false, false, Method::Auto), Method::Stream);
        assert_eq!(choose_method(true, true, Method::Stream), Method::Stream);
        assert_eq!(choose_method(false, false, Method::Rsync), Method::Rsync);
        assert_eq!(method_name(choose_method(true, false, Method::Auto)), "stream");
    }

    #[test]
    fn package_names_and_arguments() {
        assert_eq!(parse_package_name("daphne-payload-0123456789abcdef.tar.zst"), Some(("0123456789abcdef", "zstd")));
        assert_eq!(parse_package_name("daphne-payload-0123456789abcdef.tar.gz"), Some(("0123456789abcdef", "gzip")));
        assert_eq!(parse_package_name("daphne-payload-0123456789ABCDEF.tar.gz"), None);
        assert_eq!(parse_package_name("daphne-payload-0123.tar.gz"), None);
        assert_eq!(parse_package_name("other-0123456789abcdef.tar.gz"), None);
        assert_eq!(dir_arg("~").unwrap(), ".");
        assert_eq!(dir_arg("~/d x/").unwrap(), "./d x");
        assert_eq!(dir_arg("-rf").unwrap(), "./-rf");
        assert_eq!(dir_arg("/").unwrap(), "/");
        assert!(dir_arg("").is_err());
        assert!(check_name("run id", "20240101-120000-ab12").is_ok());
        for bad in ["", "..", ".x", "-x", "a/b", "a b", "x\n"] {
            assert!(check_name("run id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rsync_output_parsing() {
        assert_eq!(parse_rsync_progress("      1,234,567  45%  1.23MB/s    0:00:01"), Some(1_234_567));
        assert_eq!(parse_rsync_progress("daphne-payload-x.tar.zst"), None);
        assert_eq!(parse_rsync_sent("Number of files: 1\nTotal bytes sent: 12,345\nTotal bytes received: 35\n"), Some(12_345));
        assert_eq!(parse_rsync_sent("nothing"), None);
    }

    // ------------------------------------------------------------------ against sshd

    #[test]
    fn rsync_upload_end_to_end_then_skip() {
        let Some(tb) = testbed() else { return };
        let s = session(tb);
        let dir = home("rsync-e2e");
        let pkg = make_package(1, 300_000, zstd());
        let (up, calls) = upload(&s, &pkg, &dir, Method::Rsync);
        assert_eq!((up.method, up.skipped, calls), ("rsync", false, 3));
        assert!(up.bytes_sent >= pkg.size, "{} < {}", up.bytes_sent, pkg.size);
        assert_release(&s, &dir, &pkg, &up);
        let (again, calls) = upload(&s, &pkg, &dir, Method::Rsync);
        assert_eq!((again.method, again.skipped, again.bytes_sent, calls), ("none", true, 0, 1));
        assert_eq!(again.remote_path, up.remote_path);
    }

    #[test]
    fn stream_upload_end_to_end_then_skip() {
        let Some(tb) = testbed() else { return };
        let s = session(tb);
        let dir = home("stream-e2e");
        let pkg = make_package(2, 300_000, Compression::Gzip { level: 6 });
        let (up, calls) = upload(&s, &pkg, &dir, Method::Stream);
        assert_eq!((up.method, up.skipped, up.bytes_sent, calls), ("stream", false, pkg.size, 2));
        assert_release(&s, &dir, &pkg, &up);
        let (again, calls) = upload(&s, &pkg, &dir, Method::Stream);
        assert_eq!((again.skipped, again.bytes_sent, calls), (true, 0, 1));
        // The public API does the same.
        let pub_again = upload_release(&s, &pkg.path, &dir, Method::Auto, &mut |_, _| {}).unwrap();
        assert!(pub_again.skipped);
    }

    #[test]
    fn corrupt_full_size_partial_is_detected_and_sent_again() {
        let Some(tb) = testbed() else { return };
        let s = session(tb);
        for (m, want_calls) in [(Method::Stream, 3), (Method::Rsync, 5)] {
            let dir = home(&format!("corrupt-{}", method_name(m)));
            let pkg = make_package(3 + want_calls as u64, 200_000, zstd());
            place_partial(&dir, "releases", &pkg.name, &corrupted(&pkg));
            let (up, calls) = upload(&s, &pkg, &dir, m);
            assert_eq!(calls, want_calls, "{m:?}: probe, a transfer that is detected as corrupt, then a fresh one");
            assert!(up.bytes_sent >= pkg.size, "{m:?}: the retry sends the whole package");
            assert_release(&s, &dir, &pkg, &up);
        }
    }

    #[test]
    fn corrupt_upload_is_never_extracted() {
        let Some(tb) = testbed() else { return };
        let s = session(tb);
        let dir = home("corrupt-no-retry");
        let pkg = make_package(10, 100_000, zstd());
        // Without the retry, the corrupt file is reported, removed and not extracted.
        place_partial(&dir, "releases", &pkg.name, &corrupted(&pkg));
        let err = upload_release_with(&s, &pkg.path, &dir, Method::Stream, &mut |_, _| {}, Opts { retry: false }).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(tb.get("LOGIN_ADDR")) && msg.contains(&format!("releases/.incoming/{}", pkg.name)) && msg.contains("does not match"), "{msg}");
        let (code, out) = sh(&s, r#"cd -- "$1/releases" && ls -A . .incoming"#, &[&dir]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(out.split_whitespace().filter(|w| !w.ends_with(':') && !w.ends_with(".lock")).collect::<Vec<_>>(), [".incoming"], "nothing extracted, nothing left: {out}");

        // verify_remote on its own: corrupt → false and removed; intact → true, not installed.
        let r = Remote::new(&s);
        let job = Job {
            kind: "release",
            remote_dir: &dir,
            abs: dir.clone(),
            name: pkg.name.clone(),
            local: pkg.path.clone(),
            sha256: pkg.sha256.clone(),
            size: pkg.size,
            extra: vec![pkg.hash16.clone(), "zstd".into()],
            flock: true,
        };
        let incoming = Path::new(&dir).join("releases/.incoming").join(&pkg.name);
        place_partial(&dir, "releases", &pkg.name, &corrupted(&pkg));
        assert!(!verify_remote(&r, &job).unwrap());
        assert!(!incoming.exists(), "a corrupt upload is removed");
        place_partial(&dir, "releases", &pkg.name, &std::fs::read(&pkg.path).unwrap());
        assert!(verify_remote(&r, &job).unwrap());
        assert!(incoming.exists());
        assert!(!Path::new(&dir).join("releases").join(&pkg.hash16).exists(), "verify only never installs");
        // ...and the next upload resumes from it: nothing more to send.
        let (up, calls) = upload(&s, &pkg, &dir, Method::Stream);
        assert_eq!((up.bytes_sent, calls), (0, 2));
        assert_release(&s, &dir, &pkg, &up);
    }

    #[test]
    fn truncated_upload_resumes() {
        let Some(tb) = testbed() else { return };
        let s = session(tb);
        for m in [Method::Stream, Method::Rsync] {
            let dir = home(&format!("resume-{}", method_name(m)));
            let pkg = make_package(20 + m as u64, 400_000, zstd());
            let data = std::fs::read(&pkg.path).unwrap();
            let half = data.len() / 2;
            place_partial(&dir, "releases", &pkg.name, &data[..half]);
            let (up, calls) = upload(&s, &pkg, &dir, m);
            let rest = pkg.size - half as u64;
            match m {
                Method::Stream => assert_eq!((up.bytes_sent, calls), (rest, 2)),
                _ => {
                    assert_eq!(calls, 3);
                    assert!(up.bytes_sent >= rest && up.bytes_sent <= rest + pkg.size / 20 + 8192, "rsync sent {} for a rest of {rest}", up.bytes_sent);
                }
            }
            assert_release(&s, &dir, &pkg, &up);
        }
    }

    #[test]
    fn hostile_strings_round_trip() {
        let Some(tb) = testbed() else { return };
        let s = session(tb);
        let hostile = [
            "plain", "with space", "  lead and trail  ", "it's", "\"double\"", "$(touch /tmp/pwned)", "`id`", "a;b", "a && b || c",
            "line1\nline2", "tab\there", "back\\slash", "π=ü ✓", "-n", "--flag=x y", "'", "'\\''", "", "*", "~", "~root", "$HOME ${HOME}",
            "#c", "!bang", "a\rb", "{a,b}", "<in >out 2>&1 |p",
        ];
        let mut argv: Vec<String> = vec!["printf".into(), "%s\\0".into()];
        argv.extend(hostile.iter().map(|h| h.to_string()));
        let out = s.output(&argv, None).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got: Vec<&[u8]> = out.stdout.split(|b| *b == 0).collect();
        let want: Vec<&[u8]> = hostile.iter().map(|h| h.as_bytes()).chain([&b""[..]]).collect();
        assert_eq!(got, want);
        assert!(!Path::new("/tmp/pwned").exists());
    }

    #[test]
    fn hostile_remote_dirs_upload_run_fetch_clean() {
        let Some(tb) = testbed() else { return };
        let s = session(tb);
        let dirs = [
            (home("dir with spaces/ünï"), Method::Auto, "rsync"),
            (home("it's $(touch pwned) `id`; a&b/-π=ü ✓ *"), Method::Stream, "stream"),
            (home("q\"x\\y/-rsync 'z'"), Method::Rsync, "rsync"),
        ];
        for (i, (dir, m, want)) in dirs.iter().enumerate() {
            let pkg = make_package(30 + i as u64, 50_000, zstd());
            let (up, _) = upload(&s, &pkg, dir, *m);
            assert_eq!(up.method, *want);
            assert_release(&s, dir, &pkg, &up);

            let run = make_run_dir(&s, dir, "run-1").unwrap();
            assert_eq!(run, format!("{dir}/runs/run-1"));
            let (code, out) = sh(&s, r#"stat -c %a "$1""#, &[&run]);
            assert_eq!((code, out.trim()), (0, "700"));
            s.write_file(&format!("{run}/worker 1.log"), b"hello\n", 0o600).unwrap();
            let (code, out) = sh(&s, r#"mkdir -p "$1/sub dir" && printf 'ünï\n' > "$1/sub dir/c.log""#, &[&run]);
            assert_eq!(code, 0, "{out}");
            let local = tempfile::tempdir().unwrap();
            let local = Utf8PathBuf::from_path_buf(local.path().to_path_buf()).unwrap();
            let bytes = fetch_dir(&s, &run, &local).unwrap();
            assert_eq!(bytes, 6 + "ünï\n".len() as u64);
            assert_eq!(std::fs::read_to_string(local.join("worker 1.log")).unwrap(), "hello\n");
            assert_eq!(std::fs::read_to_string(local.join("sub dir/c.log")).unwrap(), "ünï\n");
            clean_run(&s, dir, "run-1").unwrap();
            assert!(!Path::new(&run).exists());
            clean_run(&s, dir, "run-1").unwrap();
        }
        assert!(!Path::new(&home("pwned")).exists() && !Path::new("pwned").exists());
        let err = fetch_dir(&s, &format!("{}/runs/nope", dirs[0].0), Utf8Path::new("/tmp/daphne-unit-never")).unwrap_err();
        assert!(format!("{err:#}").contains("no run directory"), "{err:#}");
        let _ = std::fs::remove_dir("/tmp/daphne-unit-never");
    }

    #[test]
    fn images_once_per_hash_and_prune() {
        let Some(tb) = testbed() else { return };
        let s = session(tb);
        let dir = home("images-prune");
        let tmp = tempfile::tempdir().unwrap();
        let sif = |n: u64| {
            let p = Utf8PathBuf::from_path_buf(tmp.path().join(format!("img{n}.sif"))).unwrap();
            std::fs::write(&p, noise(100 + n, 150_000)).unwrap();
            p
        };
        let (a, b) = (sif(1), sif(2));
        let (up, calls) = upload_image_with(&s, &a, "aaaa1111", &dir, Method::Stream, &mut |_, _| {}, Opts::default()).unwrap();
        assert_eq!((up.method, up.bytes_sent, calls), ("stream", 150_000, 2));
        assert_eq!(up.remote_path, format!("{dir}/images/aaaa1111.sif"));
        assert_eq!(std::fs::read(&up.remote_path).unwrap(), std::fs::read(&a).unwrap());
        let (again, calls) = upload_image_with(&s, &a, "aaaa1111", &dir, Method::Stream, &mut |_, _| {}, Opts::default()).unwrap();
        assert_eq!((again.skipped, again.bytes_sent, calls), (true, 0, 1));
        // The same size but other content is replaced.
        place_partial(&dir, "images", "bbbb2222.sif", &std::fs::read(&a).unwrap());
        let (upb, calls) = upload_image_with(&s, &b, "bbbb2222", &dir, Method::Rsync, &mut |_, _| {}, Opts::default()).unwrap();
        assert_eq!((upb.method, calls), ("rsync", 5), "the wrong partial is detected, removed and sent again");
        assert_eq!(std::fs::read(&upb.remote_path).unwrap(), std::fs::read(&b).unwrap());
        std::fs::write(&upb.remote_path, noise(7, 150_000)).unwrap();
        let (fixed, _) = upload_image_with(&s, &b, "bbbb2222", &dir, Method::Stream, &mut |_, _| {}, Opts::default()).unwrap();
        assert!(!fixed.skipped, "an image with the same size but another sha256 is uploaded again");
        assert_eq!(std::fs::read(&upb.remote_path).unwrap(), std::fs::read(&b).unwrap());

        let p1 = make_package(40, 20_000, zstd());
        let p2 = make_package(41, 20_000, zstd());
        upload(&s, &p1, &dir, Method::Stream);
        upload(&s, &p2, &dir, Method::Stream);
        place_partial(&dir, "releases", "daphne-payload-ffffffffffffffff.tar.zst", b"partial");
        place_partial(&dir, "images", "cccc.sif", b"partial");
        std::fs::create_dir_all(format!("{dir}/releases/.tmp-ffffffffffffffff-Xy12AbCd/bin")).unwrap();
        make_run_dir(&s, &dir, "keep-me").unwrap();
        let removed = prune(&s, &dir, std::slice::from_ref(&p1.hash16), &["aaaa1111.sif".to_string()]).unwrap();
        let (locks, mut removed): (Vec<String>, Vec<String>) = removed.into_iter().partition(|r| r.ends_with(".lock"));
        assert!(locks.iter().any(|l| l.starts_with("releases/.incoming/")) && locks.iter().any(|l| l.starts_with("images/.incoming/")), "{locks:?}");
        removed.sort();
        let mut want = vec![
            format!("releases/{}", p2.hash16),
            "releases/.incoming/daphne-payload-ffffffffffffffff.tar.zst".to_string(),
            "releases/.tmp-ffffffffffffffff-Xy12AbCd".to_string(),
            "images/bbbb2222.sif".to_string(),
            "images/bbbb2222.sif.sha256".to_string(),
            "images/.incoming/cccc.sif".to_string(),
        ];
        want.sort();
        assert_eq!(removed, want);
        let d = Path::new(&dir);
        assert!(d.join("releases").join(&p1.hash16).join(".complete").exists());
        assert!(d.join("images/aaaa1111.sif").exists());
        assert!(d.join("runs/keep-me").is_dir(), "prune leaves runs alone");
        assert!(prune(&s, &dir, std::slice::from_ref(&p1.hash16), &["aaaa1111.sif".to_string()]).unwrap().is_empty());
        assert!(prune(&s, &home("never-created"), &[], &[]).unwrap().is_empty());
        assert!(prune(&s, &dir, &["../x".to_string()], &[]).is_err());
    }

    #[test]
    fn concurrent_uploads_of_one_package() {
        let Some(tb) = testbed() else { return };
        let dir = home("concurrent");
        let pkg = make_package(70, 2_000_000, zstd());
        let results: Vec<Uploaded> = std::thread::scope(|sc| {
            let hs: Vec<_> = [Method::Stream, Method::Stream, Method::Rsync, Method::Rsync]
                .into_iter()
                .map(|m| {
                    let (pkg, dir) = (&pkg, &dir);
                    sc.spawn(move || {
                        let s = session(tb);
                        upload_release_with(&s, &pkg.path, dir, m, &mut |_, _| {}, Opts { retry: false }).unwrap().0
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|u| u.remote_path == results[0].remote_path));
        assert_release(&session(tb), &dir, &pkg, &results[0]);
    }

    #[test]
    fn fetch_while_a_log_grows() {
        let Some(tb) = testbed() else { return };
        let s = session(tb);
        let run = make_run_dir(&s, &home("fetch-busy"), "busy").unwrap();
        let path = format!("{run}/worker-0.out");
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                // The filesystem is shared: this grows the file the remote tar reads.
                // Bounded: at most 8 MiB, a line every millisecond.
                let mut f = OpenOptions::new().create(true).append(true).open(&path).unwrap();
                for _ in 0..2048 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    f.write_all(&[b'x'; 4096]).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            });
            std::thread::sleep(std::time::Duration::from_millis(100));
            for _ in 0..5 {
                let local = tempfile::tempdir().unwrap();
                let n = fetch_dir(&s, &run, Utf8Path::from_path(local.path()).unwrap());
                assert!(n.is_ok(), "{:#}", n.unwrap_err());
                assert!(local.path().join("worker-0.out").is_file());
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }

    /// Every call of a session goes through its one ControlMaster: one SSH handshake for
    /// uploads by rsync and stream, an image, a run directory and a fetch. (Through node3's
    /// sshd, which no other test uses, so its log counts only this test's logins.)
    #[test]
    fn one_handshake_per_session() {
        let Some(tb) = testbed() else { return };
        let log = format!("{RT}/log/sshd-node3.log");
        let logins = || std::fs::read_to_string(&log).unwrap_or_default().matches("Accepted publickey").count();
        let before = logins();
        let mut cfg = ssh_cfg(tb);
        cfg.host = tb.get("NODE_ADDRS").split(',').nth(2).unwrap().to_string();
        let s = Session::new(&cfg).unwrap();
        let dir = home("one-handshake");
        let (a, b) = (make_package(80, 50_000, zstd()), make_package(81, 50_000, zstd()));
        assert_eq!(upload(&s, &a, &dir, Method::Rsync).0.method, "rsync");
        assert_eq!(upload(&s, &b, &dir, Method::Stream).0.method, "stream");
        assert!(upload(&s, &a, &dir, Method::Auto).0.skipped);
        upload_image(&s, &a.path, "img80", &dir, Method::Auto, &mut |_, _| {}).unwrap();
        let run = make_run_dir(&s, &dir, "r1").unwrap();
        let local = tempfile::tempdir().unwrap();
        fetch_dir(&s, &run, Utf8Path::from_path(local.path()).unwrap()).unwrap();
        drop(s);
        assert_eq!(logins() - before, 1, "one handshake for the whole session");
    }

    // ------------------------------------------------------------------ errors

    fn err_of(cfg: &Ssh, pkg: &Pkg) -> (String, f64) {
        let s = Session::new(cfg).unwrap();
        let t0 = Instant::now();
        let e = upload_release(&s, &pkg.path, &home("errors"), Method::Auto, &mut |_, _| {}).unwrap_err();
        (format!("{e:#}"), t0.elapsed().as_secs_f64())
    }

    #[test]
    fn ssh_failures_name_the_host_and_the_fix() {
        let Some(tb) = testbed() else { return };
        let pkg = make_package(50, 1000, zstd());
        let tmp = tempfile::tempdir().unwrap();

        let mut cfg = ssh_cfg(tb);
        cfg.host = "10.79.0.99".into();
        cfg.connect_timeout = 2;
        let (msg, secs) = err_of(&cfg, &pkg);
        assert!(msg.contains("10.79.0.99") && msg.contains("unreachable") && msg.contains("fix:"), "{msg}");
        assert!(secs < 4.0, "took {secs} s");

        let mut cfg = ssh_cfg(tb);
        let empty = tmp.path().join("known_hosts");
        std::fs::write(&empty, "").unwrap();
        cfg.known_hosts = Some(Utf8PathBuf::from_path_buf(empty).unwrap());
        let (msg, _) = err_of(&cfg, &pkg);
        assert!(msg.contains("host key") && msg.contains("unknown") && msg.contains("ssh-keyscan") && msg.contains(tb.get("LOGIN_ADDR")), "{msg}");

        let mut cfg = ssh_cfg(tb);
        let key = tmp.path().join("stranger");
        let st = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status().unwrap();
        assert!(st.success());
        cfg.identity = Some(Utf8PathBuf::from_path_buf(key).unwrap());
        let (msg, _) = err_of(&cfg, &pkg);
        assert!(msg.contains("authentication") && msg.contains(tb.get("LOGIN_ADDR")), "{msg}");
    }

    /// A 1 MiB tmpfs mounted in the login host's mount namespace (the one its sshd and every
    /// session live in); unmounted on drop, and gone with the namespace at teardown anyway.
    struct SmallDisk {
        pid: String,
        path: String,
    }

    impl SmallDisk {
        fn mount(tb: &Tb, path: &str) -> SmallDisk {
            let pid = SmallDisk::pid_of(tb);
            std::fs::create_dir_all(path).unwrap();
            let st = Command::new("nsenter").args(["-t", &pid, "-m", "mount", "-t", "tmpfs", "-o", "size=1m,mode=755", "daphne-unit-full", path]).status().unwrap();
            assert!(st.success(), "cannot mount the small tmpfs");
            SmallDisk { pid, path: path.to_string() }
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let umount = |extra: &[&str]| {
                Command::new("nsenter").args(["-t", &self.pid, "-m", "umount"]).args(extra).arg(&self.path).status().map(|s| s.success()).unwrap_or(false)
            };
            if !umount(&[]) && !umount(&["-l"]) {
                eprintln!("WARNING: could not unmount {} in the namespace of pid {}", self.path, self.pid);
            }
        }
    }

    #[test]
    fn full_remote_disk_is_reported_and_leaves_no_half_release() {
        let Some(tb) = testbed() else { return };
        let s = session(tb);
        let mnt = format!("{RT}/small-disk");
        let disk = SmallDisk::mount(tb, &mnt);
        let no_release = |dir: &str, pkg: &Pkg| {
            let (code, out) = sh(&s, r#"cd -- "$1/releases" && ls -A; for t in .tmp-*; do [ -e "$t" ] && exit 3; done; test ! -e "$2""#, &[dir, &pkg.hash16]);
            assert_eq!(code, 0, "a half release was left: {out}");
        };
        // Too big to transfer (both methods), then transferred but too big to extract.
        for (i, (bytes, m)) in [(1_500_000, Method::Stream), (1_500_000, Method::Rsync), (600_000, Method::Stream)].into_iter().enumerate() {
            let dir = format!("{mnt}/d{i}");
            let pkg = make_package(60 + i as u64, bytes, zstd());
            let err = upload_release_with(&s, &pkg.path, &dir, m, &mut |_, _| {}, Opts::default()).unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains(&format!("the remote disk at {dir} is full")) && msg.contains(tb.get("LOGIN_ADDR")), "{m:?} {bytes}: {msg}");
            no_release(&dir, &pkg);
            // Leftovers of the attempt go with prune.
            prune(&s, &dir, &[], &[]).unwrap();
        }
        drop(disk);
        let mounted = Command::new("nsenter").args(["-t", &SmallDisk::pid_of(tb), "-m", "findmnt", "-rn", &mnt]).output().unwrap();
        assert!(mounted.stdout.is_empty(), "still mounted");
    }

    impl SmallDisk {
        fn pid_of(tb: &Tb) -> String {
            let pids = std::fs::read_to_string(tb.get("PIDS_FILE")).unwrap();
            pids.lines().filter_map(|l| l.split_once(' ')).rfind(|(n, _)| *n == "sshd-login").unwrap().1.to_string()
        }
    }

}
