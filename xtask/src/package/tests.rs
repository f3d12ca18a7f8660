//! End-to-end tests of pack / verify / extract on temporary trees.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};

use camino::{Utf8Path, Utf8PathBuf};
use tar::{EntryType, Header};

use super::manifest::{sha256_hex, FileRecord, Manifest, MANIFEST_FORMAT};
use super::*;

const MTIME: u64 = 1_700_000_000;
const GZIP: Compression = Compression::Gzip {
    level: DEFAULT_GZIP_LEVEL,
};
const LONG_PATH: &str = "data/a-directory-name-that-is-quite-long/another-fairly-long-directory-name/and-a-file-name-past-100-bytes.csv";

fn tempdir() -> (tempfile::TempDir, Utf8PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = Utf8PathBuf::from_path_buf(tmp.path().to_owned()).unwrap();
    (tmp, path)
}

fn write_file(path: &Utf8Path, data: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A small DAPHNE-like payload under `src`; returns the entries to pack it.
fn write_tree(src: &Utf8Path) -> Vec<Entry> {
    let files: &[(&str, &[u8], u32)] = &[
        ("bin/daphne", b"\x7fELF daphne main binary\n", 0o755),
        ("bin/git_source_status_info", b"commit abc\nclean\n", 0o644),
        (
            "lib/libdaphne.so.1",
            b"\x7fELF unique-library-content-0123456789\n",
            0o700,
        ),
        (
            "scripts/linreg.daph",
            b"X = rand(10, 10, 0.0, 1.0, 1, 42);\nprint(sum(X));\n",
            0o600,
        ),
        (LONG_PATH, b"1,2,3\n4,5,6\n", 0o644),
    ];
    let mut entries = Vec::new();
    for (path, data, mode) in files {
        write_file(&src.join(path), data, *mode);
        entries.push(Entry::new(*path, src.join(path)).with_hint("run `cargo xtask build` first"));
    }
    std::os::unix::fs::symlink("libdaphne.so.1", src.join("lib/libdaphne.so")).unwrap();
    entries.push(Entry::new("lib/libdaphne.so", src.join("lib/libdaphne.so")));
    // Callers pass entries in any order; pack sorts them.
    entries.reverse();
    entries
}

fn spec(entries: Vec<Entry>, out_dir: &Utf8Path) -> PackSpec {
    PackSpec {
        entries,
        compression: Compression::default(),
        mtime: MTIME,
        tool_version: "0.1.0".into(),
        source_commit: "0123456789abcdef0123456789abcdef01234567".into(),
        source_dirty: false,
        image: Some(ImageRef {
            hash: "sha256:feedface".into(),
            sif_remote_path: "/scratch/daphne/images/daphne-feedface.sif".into(),
            included: false,
        }),
        target: "x86_64-linux-gnu".into(),
        out_dir: out_dir.to_owned(),
    }
}

fn pack_quiet(spec: &PackSpec) -> Result<Packed> {
    pack(spec, &mut |_, _| {})
}

/// Fresh tree + package in one temp dir: (guard, root, packed).
fn packed_fixture(compression: Compression) -> (tempfile::TempDir, Utf8PathBuf, Packed) {
    let (tmp, root) = tempdir();
    let mut spec = spec(write_tree(&root.join("src")), &root.join("out"));
    spec.compression = compression;
    let packed = pack_quiet(&spec).unwrap();
    (tmp, root, packed)
}

fn names_in(dir: &Utf8Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

fn decompress(path: &Utf8Path) -> Vec<u8> {
    let bytes = fs::read(path).unwrap();
    if path.as_str().ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    } else {
        zstd::decode_all(&bytes[..]).unwrap()
    }
}

fn err_text(result: Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", result.unwrap_err())
}

// ---------------------------------------------------------------- reproducibility

#[test]
fn same_tree_in_different_dirs_gives_identical_bytes() {
    for compression in [Compression::default(), GZIP] {
        let (_ta, root_a) = tempdir();
        let (_tb, root_b) = tempdir();
        let mut spec_a = spec(write_tree(&root_a.join("some/where")), &root_a.join("out"));
        let mut spec_b = spec(write_tree(&root_b.join("else")), &root_b.join("other-out"));
        spec_a.compression = compression;
        spec_b.compression = compression;
        let one = pack_quiet(&spec_a).unwrap();
        let two = pack_quiet(&spec_b).unwrap();
        assert_eq!(one.path.file_name(), two.path.file_name());
        assert_eq!(one.content_hash, two.content_hash);
        assert_eq!(one.archive_sha256, two.archive_sha256);
        assert_eq!(fs::read(&one.path).unwrap(), fs::read(&two.path).unwrap());
        assert!(one.path.as_str().ends_with(compression.extension()));
        assert_eq!(one.files, 6);
        assert!(!one.skipped);
    }
}

#[test]
fn different_mtime_gives_different_bytes() {
    let (_tmp, root) = tempdir();
    let entries = write_tree(&root.join("src"));
    let first = pack_quiet(&spec(entries.clone(), &root.join("out1"))).unwrap();
    let mut later = spec(entries, &root.join("out2"));
    later.mtime = MTIME + 1;
    let second = pack_quiet(&later).unwrap();
    assert_ne!(first.content_hash, second.content_hash);
    assert_ne!(
        fs::read(&first.path).unwrap(),
        fs::read(&second.path).unwrap()
    );
}

#[test]
fn package_name_and_checksum_file() {
    let (_tmp, root, packed) = packed_fixture(Compression::default());
    let name = packed.path.file_name().unwrap();
    assert_eq!(
        name,
        format!("daphne-payload-{}.tar.zst", &packed.content_hash[..16])
    );
    assert_eq!(packed.content_hash.len(), 64);
    assert_eq!(packed.bytes, fs::metadata(&packed.path).unwrap().len());
    assert_eq!(packed.archive_sha256, sha256_file(&packed.path).unwrap());
    let sidecar = fs::read_to_string(format!("{}.sha256", packed.path)).unwrap();
    assert_eq!(sidecar, format!("{}  {name}\n", packed.archive_sha256));
    assert_eq!(
        names_in(&root.join("out")),
        [name.to_owned(), format!("{name}.sha256")]
    );
    let status = Command::new("sha256sum")
        .args(["-c", "--quiet", &format!("{name}.sha256")])
        .current_dir(root.join("out"))
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn archive_entries_are_ordered_and_normalised() {
    let (_tmp, _root, packed) = packed_fixture(Compression::default());
    let tar_bytes = decompress(&packed.path);
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let mut listed = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        assert_eq!(h.mtime().unwrap(), MTIME);
        assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
        assert!(h.username_bytes().unwrap_or_default().is_empty());
        assert!(h.groupname_bytes().unwrap_or_default().is_empty());
        let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        listed.push((path, h.entry_type(), h.mode().unwrap()));
    }
    let paths: Vec<&str> = listed.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(&paths[..2], ["manifest.json", "SHA256SUMS"]);
    let mut sorted = paths[2..].to_vec();
    sorted.sort();
    assert_eq!(paths[2..], sorted[..]);
    let find = |p: &str| listed.iter().find(|(q, _, _)| q == p).unwrap();
    assert_eq!(find("bin").1, EntryType::Directory);
    assert_eq!(find("bin").2, 0o755);
    assert_eq!(find("bin/daphne").2, 0o755);
    assert_eq!(find("lib/libdaphne.so.1").2, 0o755); // 0700 has an execute bit
    assert_eq!(find("scripts/linreg.daph").2, 0o644); // 0600 does not
    assert_eq!(find("lib/libdaphne.so").1, EntryType::Symlink);
    assert_eq!(find(LONG_PATH).1, EntryType::Regular);
}

// ---------------------------------------------------------------- manifest and sums

#[test]
fn manifest_lists_files_and_sums_work_with_coreutils() {
    let (_tmp, root, packed) = packed_fixture(Compression::default());
    let verified = verify(&packed.path).unwrap();
    let m = &verified.manifest;
    assert_eq!(verified.content_hash, packed.content_hash);
    assert_eq!(verified.archive_sha256, packed.archive_sha256);
    assert_eq!(m.format, 1);
    assert_eq!(m.created, MTIME);
    assert_eq!(m.image.as_ref().unwrap().hash, "sha256:feedface");
    let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "bin/daphne",
            "bin/git_source_status_info",
            LONG_PATH,
            "lib/libdaphne.so",
            "lib/libdaphne.so.1",
            "scripts/linreg.daph"
        ]
    );
    let link = &m.files[3];
    assert_eq!(
        (
            link.link_target.as_deref(),
            link.sha256.as_deref(),
            link.mode.as_str()
        ),
        (Some("libdaphne.so.1"), None, "0777")
    );
    let daphne = &m.files[0];
    assert_eq!(
        daphne.sha256.as_deref(),
        Some(sha256_hex(b"\x7fELF daphne main binary\n").as_str())
    );
    assert_eq!((daphne.size, daphne.mode.as_str()), (24, "0755"));

    let dest = root.join("release");
    extract(&packed.path, &dest).unwrap();
    let sums = fs::read_to_string(dest.join("SHA256SUMS")).unwrap();
    let lines: Vec<&str> = sums.lines().collect();
    assert_eq!(lines.len(), 6, "5 regular files + manifest.json:\n{sums}");
    for line in &lines {
        let (hash, path) = line.split_once("  ").unwrap();
        assert!(
            hash.len() == 64
                && hash
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert!(!path.is_empty() && path != "SHA256SUMS" && path != "lib/libdaphne.so");
    }
    let mut sorted = lines.clone();
    sorted.sort_by_key(|l| l.split_once("  ").unwrap().1);
    assert_eq!(lines, sorted);
    let out = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).matches(": OK").count(),
        6
    );
}

#[test]
fn manifest_snapshot() {
    let (_tmp, root) = tempdir();
    let src = root.join("src");
    write_file(&src.join("bin/daphne"), b"binary", 0o755);
    write_file(&src.join("scripts/a.daph"), b"print(1);\n", 0o644);
    std::os::unix::fs::symlink("../bin/daphne", src.join("scripts/daphne")).unwrap();
    let entries = vec![
        Entry::new("scripts/daphne", src.join("scripts/daphne")),
        Entry::new("bin/daphne", src.join("bin/daphne")),
        Entry::new("scripts/a.daph", src.join("scripts/a.daph")),
    ];
    let mut spec = spec(entries, &root.join("out"));
    spec.source_dirty = true;
    spec.image = None;
    let packed = pack_quiet(&spec).unwrap();
    let dest = root.join("extracted");
    extract(&packed.path, &dest).unwrap();
    let manifest = fs::read_to_string(dest.join("manifest.json")).unwrap();
    let name = packed.path.file_name().unwrap();
    insta::assert_snapshot!(format!("{name}\n{manifest}"));
}

// ---------------------------------------------------------------- system tar

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `tar -tv` listing of a package, via `tar --zstd` or, without a zstd binary, via stdin.
fn system_tar_list(package: &Utf8Path) -> String {
    let out = if package.as_str().ends_with(".gz") {
        Command::new("tar")
            .args(["--numeric-owner", "-tvzf", package.as_str()])
            .output()
            .unwrap()
    } else if have("zstd") {
        Command::new("tar")
            .args(["--numeric-owner", "--zstd", "-tvf", package.as_str()])
            .output()
            .unwrap()
    } else {
        let mut child = Command::new("tar")
            .args(["--numeric-owner", "-tvf", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&decompress(package))
            .unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn system_tar_lists_zstd_and_gzip_packages() {
    for compression in [Compression::default(), GZIP] {
        let (_tmp, _root, packed) = packed_fixture(compression);
        let listing = system_tar_list(&packed.path);
        let lines: Vec<&str> = listing.lines().collect();
        assert!(lines[0].ends_with(" manifest.json"), "{listing}");
        assert!(lines[1].ends_with(" SHA256SUMS"), "{listing}");
        assert!(listing.contains(LONG_PATH), "{listing}");
        assert!(
            listing.contains("lib/libdaphne.so -> libdaphne.so.1"),
            "{listing}"
        );
        assert!(lines.iter().all(|l| l.contains(" 0/0 ")), "{listing}");
    }
}

#[test]
fn system_tar_extracts_gzip_package() {
    let (_tmp, root, packed) = packed_fixture(GZIP);
    let dest = root.join("by-tar");
    fs::create_dir(&dest).unwrap();
    let status = Command::new("tar")
        .args(["-xzf", packed.path.as_str(), "-C", dest.as_str()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        fs::read(dest.join("bin/daphne")).unwrap(),
        b"\x7fELF daphne main binary\n"
    );
    assert_eq!(
        fs::read_link(dest.join("lib/libdaphne.so"))
            .unwrap()
            .to_str(),
        Some("libdaphne.so.1")
    );
    assert_eq!(fs::read(dest.join(LONG_PATH)).unwrap(), b"1,2,3\n4,5,6\n");
    let mode = fs::metadata(dest.join("bin/daphne"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode & 0o111, 0o111);
    assert_eq!(
        fs::metadata(dest.join("bin/daphne")).unwrap().mtime() as u64,
        MTIME
    );
    let out = Command::new("sha256sum")
        .args(["-c", "--quiet", "SHA256SUMS"])
        .current_dir(&dest)
        .status()
        .unwrap();
    assert!(out.success());
}

// ---------------------------------------------------------------- input validation

#[test]
fn symlink_escaping_the_package_is_refused() {
    let (_tmp, root) = tempdir();
    let src = root.join("src");
    let mut entries = write_tree(&src);
    std::os::unix::fs::symlink("../../../etc/passwd", src.join("lib/evil")).unwrap();
    entries.push(Entry::new("lib/evil", src.join("lib/evil")));
    let out = root.join("out");
    let msg = err_text(pack_quiet(&spec(entries.clone(), &out)));
    assert!(
        msg.contains(src.join("lib/evil").as_str()) && msg.contains("leaves the package"),
        "{msg}"
    );

    entries.pop();
    std::os::unix::fs::symlink("/etc", src.join("lib/abs")).unwrap();
    entries.push(Entry::new("lib/abs", src.join("lib/abs")));
    let msg = err_text(pack_quiet(&spec(entries, &out)));
    assert!(
        msg.contains(src.join("lib/abs").as_str()) && msg.contains("absolute"),
        "{msg}"
    );
    assert!(names_in(&out).is_empty());
}

#[test]
fn bad_archive_paths_are_refused() {
    let (_tmp, root) = tempdir();
    let src = root.join("src");
    write_file(&src.join("f"), b"x", 0o644);
    let cases = [
        ("../evil", "`..`"),
        ("/etc/evil", "absolute"),
        ("bin//x", "empty component"),
        ("bin/./x", "`.`"),
        ("", "empty"),
        ("bin/x\n", "forbidden character"),
        ("manifest.json", "reserved"),
        ("SHA256SUMS/x", "reserved"),
    ];
    for (path, reason) in cases {
        let msg = err_text(pack_quiet(&spec(
            vec![Entry::new(path, src.join("f"))],
            &root.join("out"),
        )));
        assert!(
            msg.contains(reason) && msg.contains(src.join("f").as_str()),
            "{path:?}: {msg}"
        );
    }
    let dup = vec![
        Entry::new("a", src.join("f")),
        Entry::new("a", src.join("f")),
    ];
    assert!(err_text(pack_quiet(&spec(dup, &root.join("out")))).contains("used twice"));
    let conflict = vec![
        Entry::new("a", src.join("f")),
        Entry::new("a/b", src.join("f")),
    ];
    assert!(err_text(pack_quiet(&spec(conflict, &root.join("out"))))
        .contains("needs it to be a directory"));
    assert!(names_in(&root.join("out")).is_empty());
}

#[test]
fn missing_input_names_the_file_and_the_hint() {
    let (_tmp, root) = tempdir();
    let missing = root.join("build/bin/daphne");
    let entries =
        vec![Entry::new("bin/daphne", missing.clone()).with_hint("run `cargo xtask build` first")];
    let msg = err_text(pack_quiet(&spec(entries, &root.join("out"))));
    assert!(msg.contains(missing.as_str()), "{msg}");
    assert!(msg.contains("run `cargo xtask build` first"), "{msg}");
    assert!(names_in(&root.join("out")).is_empty());
}

#[test]
fn invalid_compression_level_is_refused() {
    let (_tmp, root) = tempdir();
    let mut s = spec(write_tree(&root.join("src")), &root.join("out"));
    s.compression = Compression::Zstd { level: 99 };
    assert!(err_text(pack_quiet(&s)).contains("level 99"));
    s.compression = Compression::Gzip { level: 10 };
    assert!(err_text(pack_quiet(&s)).contains("level 10"));
}

// ---------------------------------------------------------------- atomic output

#[test]
fn directory_where_a_file_is_expected_leaves_nothing() {
    let (_tmp, root) = tempdir();
    let src = root.join("src");
    let mut entries = write_tree(&src);
    fs::create_dir_all(src.join("lib/plugins")).unwrap();
    entries.push(Entry::new("lib/plugins", src.join("lib/plugins")));
    let out = root.join("out");
    fs::create_dir(&out).unwrap();
    let msg = err_text(pack_quiet(&spec(entries, &out)));
    assert!(
        msg.contains("is a directory") && msg.contains(src.join("lib/plugins").as_str()),
        "{msg}"
    );
    assert!(names_in(&out).is_empty());
}

#[test]
fn file_changed_while_packing_fails_and_leaves_nothing() {
    let (_tmp, root) = tempdir();
    let src = root.join("src");
    let big = vec![7u8; 5 << 20];
    write_file(&src.join("lib/a.so"), &big, 0o644);
    write_file(&src.join("lib/b.so"), &big, 0o644);
    let entries = vec![
        Entry::new("lib/a.so", src.join("lib/a.so")),
        Entry::new("lib/b.so", src.join("lib/b.so")),
    ];
    let out = root.join("out");
    let b = src.join("lib/b.so");
    let mut changed = false;
    let result = pack(&spec(entries, &out), &mut |done, total| {
        // The second half of the progress is the archive pass: change b.so (same size).
        if done > total / 2 && done < total && !changed {
            changed = true;
            fs::write(&b, vec![8u8; 5 << 20]).unwrap();
        }
    });
    assert!(changed);
    let msg = err_text(result);
    assert!(
        msg.contains(b.as_str()) && msg.contains("changed while it was being packed"),
        "{msg}"
    );
    assert!(names_in(&out).is_empty(), "{:?}", names_in(&out));
}

#[test]
fn second_pack_is_skipped_and_does_not_touch_the_file() {
    let (_tmp, root) = tempdir();
    let s = spec(write_tree(&root.join("src")), &root.join("out"));
    let first = pack_quiet(&s).unwrap();
    let before = fs::metadata(&first.path).unwrap();
    let second = pack_quiet(&s).unwrap();
    let after = fs::metadata(&second.path).unwrap();
    assert!(second.skipped && !first.skipped);
    assert_eq!(
        (
            second.path.clone(),
            second.archive_sha256.clone(),
            second.bytes
        ),
        (
            first.path.clone(),
            first.archive_sha256.clone(),
            first.bytes
        )
    );
    assert_eq!(
        (before.ino(), before.mtime(), before.mtime_nsec()),
        (after.ino(), after.mtime(), after.mtime_nsec())
    );

    // A damaged package with the right name is rebuilt, not reused.
    let mut bytes = fs::read(&first.path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&first.path, &bytes).unwrap();
    let third = pack_quiet(&s).unwrap();
    assert!(!third.skipped);
    assert_eq!(fs::read(&third.path).unwrap(), {
        let mut fixed = bytes.clone();
        fixed[mid] ^= 0xff;
        fixed
    });
}

#[test]
fn progress_is_monotonic_and_complete() {
    let (_tmp, root) = tempdir();
    let src = root.join("src");
    write_file(&src.join("lib/big.so"), &vec![1u8; 9 << 20], 0o644);
    let s = spec(
        vec![Entry::new("lib/big.so", src.join("lib/big.so"))],
        &root.join("out"),
    );
    let mut calls = Vec::new();
    pack(&s, &mut |done, total| calls.push((done, total))).unwrap();
    assert!(calls.len() > 3, "{calls:?}");
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(*calls.last().unwrap(), (18 << 20, 18 << 20));
    let mut skipped_calls = Vec::new();
    pack(&s, &mut |done, total| skipped_calls.push((done, total))).unwrap();
    assert_eq!(*skipped_calls.last().unwrap(), (18 << 20, 18 << 20));
}

// ---------------------------------------------------------------- verify

#[test]
fn verify_names_a_corrupted_file() {
    let (_tmp, root, packed) = packed_fixture(Compression::default());
    let mut tar_bytes = decompress(&packed.path);
    let marker = b"unique-library-content";
    let at = tar_bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap();
    tar_bytes[at] ^= 0x20;
    let forged = root.join("forged.tar.zst");
    fs::write(&forged, zstd::encode_all(&tar_bytes[..], 3).unwrap()).unwrap();
    let msg = err_text(verify(&forged));
    assert!(
        msg.contains("lib/libdaphne.so.1") && msg.contains("sha256"),
        "{msg}"
    );
}

#[test]
fn verify_detects_damaged_or_truncated_archives() {
    let (_tmp, root, packed) = packed_fixture(Compression::default());
    let bytes = fs::read(&packed.path).unwrap();
    let damaged = root.join("damaged.tar.zst");
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x01;
    fs::write(&damaged, &flipped).unwrap();
    assert!(verify(&damaged).is_err());
    fs::write(&damaged, &bytes[..bytes.len() - 10]).unwrap();
    assert!(verify(&damaged).is_err());
    fs::write(&damaged, b"not an archive at all").unwrap();
    assert!(err_text(verify(&damaged)).contains("neither zstd- nor gzip-compressed"));
}

#[test]
fn verify_checks_the_sidecar_checksum() {
    let (_tmp, _root, packed) = packed_fixture(Compression::default());
    let sidecar = format!("{}.sha256", packed.path);
    fs::write(&sidecar, format!("{}  x\n", "0".repeat(64))).unwrap();
    let msg = err_text(verify(&packed.path));
    assert!(msg.contains(".sha256"), "{msg}");
    fs::remove_file(&sidecar).unwrap();
    assert!(verify(&packed.path).is_ok());
}

/// One hand-made tar entry; names go straight into the header bytes, so unsafe paths that
/// `Header::set_path` would refuse can be written.
struct Raw<'a> {
    name: &'a str,
    kind: EntryType,
    data: &'a [u8],
    link: &'a str,
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> Raw<'a> {
    Raw {
        name,
        kind: EntryType::Regular,
        data,
        link: "",
    }
}

fn link<'a>(name: &'a str, kind: EntryType, target: &'a str) -> Raw<'a> {
    Raw {
        name,
        kind,
        data: b"",
        link: target,
    }
}

/// manifest.json + SHA256SUMS describing `files` (regular files only).
fn manifest_for(files: &[(&str, &[u8])]) -> (Vec<u8>, Vec<u8>) {
    let mut records: Vec<FileRecord> = files
        .iter()
        .map(|(p, d)| FileRecord::regular(p, d.len() as u64, false, sha256_hex(d)))
        .collect();
    records.sort_by(|a, b| a.path.cmp(&b.path));
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        tool_version: "t".into(),
        source_commit: "c".into(),
        source_dirty: false,
        image: None,
        target: "x".into(),
        created: 0,
        files: records,
    };
    let bytes = manifest.to_bytes().unwrap();
    let sums = manifest.sha256sums(&sha256_hex(&bytes)).into_bytes();
    (bytes, sums)
}

fn craft(path: &Utf8Path, entries: &[Raw<'_>]) {
    let mut builder = tar::Builder::new(Vec::new());
    for raw in entries {
        let mut h = Header::new_gnu();
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..raw.name.len()].copy_from_slice(raw.name.as_bytes());
        gnu.linkname[..raw.link.len()].copy_from_slice(raw.link.as_bytes());
        h.set_entry_type(raw.kind);
        h.set_size(raw.data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        builder.append(&h, raw.data).unwrap();
    }
    let tar_bytes = builder.into_inner().unwrap();
    fs::write(path, zstd::encode_all(&tar_bytes[..], 3).unwrap()).unwrap();
}

/// Crafts an archive with a valid manifest for `payload` plus `extra` entries.
fn craft_with_manifest(path: &Utf8Path, payload: &[(&str, &[u8])], extra: Vec<Raw<'_>>) {
    let (manifest, sums) = manifest_for(payload);
    let mut entries = vec![file("manifest.json", &manifest), file("SHA256SUMS", &sums)];
    entries.extend(payload.iter().map(|(p, d)| file(p, d)));
    entries.extend(extra);
    craft(path, &entries);
}

#[test]
fn crafted_control_archive_is_accepted() {
    let (_tmp, root) = tempdir();
    let pkg = root.join("ok.tar.zst");
    craft_with_manifest(&pkg, &[("bin/x", b"hello")], vec![]);
    let verified = verify(&pkg).unwrap();
    assert_eq!(verified.manifest.files.len(), 1);
    let dest = root.join("dest");
    extract(&pkg, &dest).unwrap();
    assert_eq!(fs::read(dest.join("bin/x")).unwrap(), b"hello");
}

/// Every hostile archive must fail verify and extract, leaving nothing behind.
fn assert_rejected(entries: Vec<Raw<'_>>, with_manifest: bool, expect: &str) {
    let (_tmp, root) = tempdir();
    let pkg = root.join("evil.tar.zst");
    if with_manifest {
        craft_with_manifest(&pkg, &[("bin/x", b"hello")], entries);
    } else {
        craft(&pkg, &entries);
    }
    let msg = err_text(verify(&pkg));
    assert!(msg.contains(expect), "expected {expect:?} in: {msg}");
    let parent = root.join("releases");
    fs::create_dir(&parent).unwrap();
    let msg = err_text(extract(&pkg, &parent.join("current")));
    assert!(msg.contains(expect), "expected {expect:?} in: {msg}");
    assert!(
        names_in(&parent).is_empty(),
        "left behind: {:?}",
        names_in(&parent)
    );
    assert_eq!(names_in(&root), ["evil.tar.zst", "releases"]);
}

#[test]
fn verify_rejects_parent_directory_paths() {
    assert_rejected(vec![file("../evil", b"x")], true, "`..`");
    assert_rejected(vec![file("bin/../../evil", b"x")], true, "`..`");
}

#[test]
fn verify_rejects_absolute_paths() {
    assert_rejected(vec![file("/etc/evil", b"x")], true, "absolute");
}

#[test]
fn verify_rejects_writing_through_symlinks() {
    assert_rejected(
        vec![
            link("link", EntryType::Symlink, "/etc"),
            file("link/evil", b"x"),
        ],
        true,
        "absolute",
    );
    assert_rejected(
        vec![link("bin/up", EntryType::Symlink, "../.."), file("z", b"x")],
        true,
        "leaves the package",
    );
    // Even a link that stays inside must not be used as a directory by later entries.
    assert_rejected(
        vec![
            link("link", EntryType::Symlink, "bin"),
            file("link/evil", b"x"),
        ],
        true,
        "which is a symlink",
    );
}

#[test]
fn verify_rejects_symlink_escapes_via_other_links() {
    let entries = vec![
        link("d/s", EntryType::Symlink, ".."),
        link("t", EntryType::Symlink, "d/s/../etc"),
    ];
    assert_rejected(entries, true, "leaves the package");
}

#[test]
fn verify_rejects_hard_links_and_special_files() {
    assert_rejected(
        vec![link("passwd", EntryType::Link, "/etc/passwd")],
        true,
        "hard link",
    );
    assert_rejected(
        vec![link("passwd", EntryType::Link, "bin/x")],
        true,
        "hard link",
    );
    assert_rejected(vec![link("fifo", EntryType::Fifo, "")], true, "FIFO");
    assert_rejected(vec![link("dev", EntryType::Char, "")], true, "device");
}

#[test]
fn verify_rejects_unlisted_missing_and_duplicate_files() {
    assert_rejected(
        vec![file("bin/extra", b"x")],
        true,
        "not listed in manifest.json",
    );
    assert_rejected(vec![file("bin/x", b"hello")], true, "appears twice");
    // Manifest lists bin/x, but the archive does not contain it.
    let (manifest, sums) = manifest_for(&[("bin/x", b"hello")]);
    assert_rejected(
        vec![file("manifest.json", &manifest), file("SHA256SUMS", &sums)],
        false,
        "missing from the archive",
    );
}

#[test]
fn verify_rejects_missing_manifest_and_bad_sums() {
    assert_rejected(
        vec![file("bin/x", b"hello")],
        false,
        "manifest.json is missing",
    );
    let (manifest, _) = manifest_for(&[("bin/x", b"hello")]);
    let entries = vec![
        file("manifest.json", &manifest),
        file("SHA256SUMS", b"bogus\n"),
        file("bin/x", b"hello"),
    ];
    assert_rejected(entries, false, "SHA256SUMS does not match");
}

// ---------------------------------------------------------------- extract

#[test]
fn extract_creates_the_release_whole_and_is_idempotent() {
    let (_tmp, root, packed) = packed_fixture(Compression::default());
    let parent = root.join("releases");
    let dest = parent.join("v1");
    let verified = extract(&packed.path, &dest).unwrap();
    assert_eq!(verified.content_hash, packed.content_hash);
    assert_eq!(names_in(&parent), ["v1"]);
    assert_eq!(
        fs::read(dest.join("bin/daphne")).unwrap(),
        b"\x7fELF daphne main binary\n"
    );
    assert_eq!(
        fs::metadata(dest.join("bin/daphne"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        fs::metadata(dest.join("scripts/linreg.daph"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
    assert_eq!(
        fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        fs::read_link(dest.join("lib/libdaphne.so"))
            .unwrap()
            .to_str(),
        Some("libdaphne.so.1")
    );
    assert_eq!(fs::read(dest.join(LONG_PATH)).unwrap(), b"1,2,3\n4,5,6\n");

    let before = fs::metadata(dest.join("bin/daphne")).unwrap();
    extract(&packed.path, &dest).unwrap();
    let after = fs::metadata(dest.join("bin/daphne")).unwrap();
    assert_eq!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec())
    );
    assert_eq!(names_in(&parent), ["v1"]);

    // A different package must not be mixed into an existing release.
    let (_tmp2, root2) = tempdir();
    let mut other = spec(write_tree(&root2.join("src")), &root2.join("out"));
    other.source_commit = "different".into();
    let other = pack_quiet(&other).unwrap();
    let msg = err_text(extract(&other.path, &dest));
    assert!(
        msg.contains("already exists") && msg.contains(dest.as_str()),
        "{msg}"
    );
}

#[test]
fn extract_of_a_corrupt_package_leaves_nothing() {
    let (_tmp, root, packed) = packed_fixture(Compression::default());
    let mut tar_bytes = decompress(&packed.path);
    let marker = b"unique-library-content";
    let at = tar_bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap();
    tar_bytes[at] ^= 0x20;
    let forged = root.join("forged.tar.zst");
    fs::write(&forged, zstd::encode_all(&tar_bytes[..], 3).unwrap()).unwrap();
    let parent = root.join("releases");
    let msg = err_text(extract(&forged, &parent.join("v1")));
    assert!(msg.contains("lib/libdaphne.so.1"), "{msg}");
    assert!(names_in(&parent).is_empty(), "{:?}", names_in(&parent));
}

#[test]
fn extract_gzip_package() {
    let (_tmp, root, packed) = packed_fixture(GZIP);
    let dest = root.join("gz");
    let verified = extract(&packed.path, &dest).unwrap();
    assert_eq!(verified.manifest.files.len(), 6);
    let status = Command::new("sha256sum")
        .args(["-c", "--quiet", "SHA256SUMS"])
        .current_dir(&dest)
        .status()
        .unwrap();
    assert!(status.success());
}
