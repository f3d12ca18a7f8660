//! Release artifacts: the CI workflow, `dist`, and bit-reproducible packages built in two
//! different checkout paths.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The xtask binary working on the checkout at `checkout`.
fn xtask_in(checkout: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(checkout).env("CARGO_MANIFEST_DIR", checkout.join("xtask")).stdin(std::process::Stdio::null());
    c
}

#[test]
fn release_workflow_is_valid_yaml_that_builds_and_uploads_the_payload() {
    let text = std::fs::read_to_string(root().join(".github/workflows/release.yml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).expect("release.yml is not valid YAML");
    let wf = &docs[0];
    assert_eq!(wf["name"].as_str(), Some("release"));
    let tags = &wf["on"]["push"]["tags"];
    assert!(tags.as_vec().is_some_and(|t| !t.is_empty()), "no tag trigger");
    let steps = wf["jobs"]["payload"]["steps"].as_vec().expect("jobs.payload.steps");
    let runs: Vec<&str> = steps.iter().filter_map(|s| s["run"].as_str()).collect();
    assert!(runs.iter().any(|r| r.contains("cargo xtask dist")), "no `cargo xtask dist` step");
    assert!(runs.iter().any(|r| r.contains("cargo xtask package --verify")), "no verify step");
    let uses: Vec<&str> = steps.iter().filter_map(|s| s["uses"].as_str()).collect();
    assert!(uses.iter().any(|u| u.starts_with("actions/upload-artifact@")), "no artifact upload");
    assert!(steps.iter().any(|s| s["with"]["path"].as_str() == Some("target/dist/")), "the artifact is not target/dist/");
}

#[test]
fn dist_writes_package_checksum_and_manifest() {
    let out = xtask_in(&root()).arg("dist").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dist = root().join("target/dist");
    let files: Vec<String> = std::fs::read_dir(&dist).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let pkg = files.iter().find(|f| f.starts_with("daphne-payload-") && f.ends_with(".tar.zst")).expect("package in target/dist");
    assert!(files.contains(&format!("{pkg}.sha256")), "{files:?}");
    assert!(files.contains(&"manifest.json".to_string()), "{files:?}");
    let check = Command::new("sha256sum").args(["-c", &format!("{pkg}.sha256")]).current_dir(&dist).output().unwrap();
    assert!(check.status.success(), "{}", text(&check.stdout));
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dist.join("manifest.json")).unwrap()).unwrap();
    let paths: Vec<&str> = manifest["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    for p in ["bin/daphne", "bin/DistributedWorker", "bin/git_source_status_info", "payload/deploy/examples/sum.daph"] {
        assert!(paths.contains(&p), "{p} not in the manifest: {paths:?}");
    }
    assert!(paths.iter().any(|p| p.starts_with("lib/") && p.ends_with(".so")), "no shared library: {paths:?}");
    let verify = xtask_in(&root()).args(["package", "--verify"]).arg(dist.join(pkg)).output().unwrap();
    assert!(verify.status.success(), "{}", text(&verify.stderr));
}

/// Clones HEAD into `dir` and packages it there.
fn package_in(dir: &Path) -> (String, Vec<u8>) {
    let clone = Command::new("git").args(["clone", "-q", "--no-hardlinks"]).arg(root()).arg(dir).output().unwrap();
    assert!(clone.status.success(), "{}", text(&clone.stderr));
    for cmd in ["build", "package"] {
        let out = xtask_in(dir).env("SOURCE_DATE_EPOCH", "1700000000").arg(cmd).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}\n{}", text(&out.stdout), text(&out.stderr));
    }
    let pkgs = dir.join("target/xtask/packages");
    let name = std::fs::read_dir(&pkgs).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).find(|n| n.ends_with(".tar.zst")).unwrap();
    let bytes = std::fs::read(pkgs.join(&name)).unwrap();
    (name, bytes)
}

#[test]
fn packages_built_in_two_checkout_paths_are_identical() {
    let base = tempfile::tempdir().unwrap();
    let a = base.path().join("first checkout");
    let b = base.path().join("elsewhere/second-ü");
    std::fs::create_dir_all(b.parent().unwrap()).unwrap();
    let (name_a, bytes_a) = package_in(&a);
    let (name_b, bytes_b) = package_in(&b);
    assert_eq!(name_a, name_b, "package names differ");
    assert!(bytes_a == bytes_b, "package bytes differ between {} and {}", a.display(), b.display());
}
