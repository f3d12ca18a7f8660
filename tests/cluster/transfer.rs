//! `cargo xtask upload` and `clean --all` against the shared testbed's sshd, through the CLI.
//!
//! These tests use a target of their own: a copy of the generated `testbed-tests` target whose
//! `remote_dir` holds spaces and non-ASCII characters. Its package state and remote directory
//! never mix with those of the other cluster tests, which deploy at the same time.
//! (The transfer protocol itself is tested in depth by the unit tests in
//! `xtask/src/transfer.rs`, on a testbed of their own.)

use crate::fixture::{root, run_ok, testbed, text, xtask, TARGET};
use std::path::{Path, PathBuf};
use std::process::Output;

const MINE: &str = "testbed-tests-transfer";

/// The copied target; its file is removed on drop (the remote side goes with the testbed).
struct OwnTarget {
    file: PathBuf,
    remote_dir: String,
}

impl Drop for OwnTarget {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_file(root().join("target/xtask/state").join(format!("{}.json", self.name())));
    }
}

impl OwnTarget {
    fn new(name: &str) -> OwnTarget {
        let tb = testbed();
        let dir = root().join("target/xtask/targets");
        let generated = std::fs::read_to_string(dir.join(format!("{TARGET}.toml"))).unwrap();
        let remote_dir = format!("{}/home/transfer {name} ünï ✓", tb.get("TB_RT"));
        let quoted = toml::Value::String(remote_dir.clone()).to_string();
        let mut replaced = false;
        let text: String = generated
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("remote_dir") {
                    replaced = true;
                    format!("remote_dir = {quoted}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        assert!(replaced, "the generated target has no remote_dir:\n{generated}");
        let file = dir.join(format!("{MINE}-{name}.toml"));
        std::fs::write(&file, text).unwrap();
        OwnTarget { file, remote_dir }
    }

    fn name(&self) -> String {
        self.file.file_stem().unwrap().to_string_lossy().into_owned()
    }

    /// `cargo xtask --target <mine> --runtime host ARGS`, which must succeed.
    fn ok(&self, args: &[&str]) -> Output {
        let name = self.name();
        let mut a = vec!["--target", name.as_str(), "--runtime", "host"];
        a.extend_from_slice(args);
        run_ok(&a)
    }

    fn releases(&self) -> PathBuf {
        Path::new(&self.remote_dir).join("releases")
    }

    /// Release directories that are complete.
    fn complete(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.releases())
            .map(|rd| rd.filter_map(|e| e.ok()).filter(|e| e.path().join(".complete").is_file()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

#[test]
fn upload_installs_a_verified_release_once() {
    let t = OwnTarget::new("once");
    t.ok(&["build"]);
    t.ok(&["package"]);
    let first = t.ok(&["upload"]);
    let e = text(&first.stderr);
    assert!(e.contains("installed ") && e.contains(&t.remote_dir), "{e}");
    let done = t.complete();
    assert_eq!(done.len(), 1, "one complete release: {done:?}");
    let release = t.releases().join(&done[0]);
    let check = std::process::Command::new("sha256sum").args(["-c", "--quiet", "SHA256SUMS"]).current_dir(&release).output().unwrap();
    assert!(check.status.success(), "{}", text(&check.stdout));
    assert!(release.join("bin/daphne").is_file());
    // Not group/world-writable, and nothing left in flight.
    let writable = std::process::Command::new("find").arg(&release).args(["!", "-type", "l", "-perm", "/022"]).output().unwrap();
    assert_eq!(text(&writable.stdout), "");
    let leftovers: Vec<String> = std::fs::read_dir(t.releases().join(".incoming"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let second = t.ok(&["upload"]);
    let e = text(&second.stderr);
    assert!(e.contains("already complete") && e.contains("0 payload bytes sent"), "{e}");
    assert_eq!(t.complete(), done);
}

#[test]
fn upload_to_an_unreachable_host_names_it() {
    let t = OwnTarget::new("unreachable");
    t.ok(&["build"]);
    t.ok(&["package"]);
    let text_now = std::fs::read_to_string(&t.file).unwrap();
    let login = testbed().get("LOGIN_ADDR").to_string();
    let net = login.rsplit_once('.').unwrap().0;
    let bad = format!("{net}.99");
    let patched = text_now
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("host ") || l.trim_start().starts_with("host=") {
                format!("host = \"{bad}\"\n")
            } else if l.trim_start().starts_with("connect_timeout") {
                "connect_timeout = 2\n".to_string()
            } else {
                format!("{l}\n")
            }
        })
        .collect::<String>();
    std::fs::write(&t.file, patched).unwrap();
    let t0 = std::time::Instant::now();
    let out = xtask().args(["--target", &t.name(), "--runtime", "host", "upload"]).output().unwrap();
    let e = text(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains(&bad) && e.contains("unreachable") && e.contains("fix:"), "{e}");
    assert!(t0.elapsed().as_secs_f64() < 10.0, "took {:?}", t0.elapsed());
}

#[test]
fn clean_all_prunes_releases_and_leftovers() {
    let t = OwnTarget::new("prune");
    t.ok(&["build"]);
    t.ok(&["package"]);
    t.ok(&["upload"]);
    assert_eq!(t.complete().len(), 1);
    let old = t.releases().join("00000000deadbeef");
    std::fs::create_dir_all(old.join("bin")).unwrap();
    std::fs::write(old.join(".complete"), "").unwrap();
    let partial = t.releases().join(".incoming/daphne-payload-00000000deadbeef.tar.zst");
    std::fs::write(&partial, "partial").unwrap();
    let tmp = t.releases().join(".tmp-00000000deadbeef-AbCd1234");
    std::fs::create_dir_all(&tmp).unwrap();
    // No deployment of this target is running, so nothing is in use.
    let out = t.ok(&["clean", "--all"]);
    let e = text(&out.stderr);
    assert!(!old.exists() && !partial.exists() && !tmp.exists(), "{e}");
    assert!(t.complete().is_empty(), "{e}");
    // The next upload installs the release again.
    let again = t.ok(&["upload"]);
    assert!(text(&again.stderr).contains("installed "), "{}", text(&again.stderr));
    assert_eq!(t.complete().len(), 1);
}
