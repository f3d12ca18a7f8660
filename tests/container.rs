//! The container path against a real Apptainer: a real image built from a debootstrap
//! definition, DAPHNE compiled inside it, workers and coordinator run through it.
//!
//! The image build takes 70-100 s, so every test shares one image (the fixture builds it
//! once per test run, or finds it current and skips). Apptainer itself is installed by the
//! project's own installer when missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const TARGET: &str = "local-apptainer";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn xtask() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(root()).stdin(std::process::Stdio::null());
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(args: &[&str]) -> Output {
    xtask().args(args).output().unwrap()
}

fn run_ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(out.status.success(), "xtask {args:?} failed ({:?}):\n{}\n{}", out.status, text(&out.stdout), text(&out.stderr));
    out
}

/// Installs Apptainer if needed and builds the shared image once.
fn image() -> &'static () {
    static IMAGE: OnceLock<()> = OnceLock::new();
    IMAGE.get_or_init(|| {
        if Command::new("apptainer").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
            let installer = root().join("xtask/testbed/install-deps.sh");
            let out = Command::new("bash").arg(&installer).output().unwrap();
            assert!(out.status.success(), "installing Apptainer failed (the container tests need root):\n{}\n{}", text(&out.stdout), text(&out.stderr));
        }
        run_ok(&["--target", TARGET, "singularity"]);
    })
}

#[test]
fn a_second_image_build_is_skipped() {
    image();
    let out = run_ok(&["--target", TARGET, "singularity"]);
    let e = text(&out.stderr);
    assert!(e.contains("singularity: skipped") && e.contains("definition hash"), "{e}");
    // The SIF carries the labels: definition hash, source commit, tool version.
    let sif = root().join("target/xtask/images/daphne-bookworm.sif");
    let labels = Command::new("apptainer").args(["inspect", "--labels"]).arg(&sif).output().unwrap();
    let labels = text(&labels.stdout);
    for l in ["org.daphne.definition-hash", "org.daphne.source-commit", "org.daphne.xtask-version"] {
        assert!(labels.contains(l), "label {l} missing:\n{labels}");
    }
    assert!(!labels.contains("org.daphne.source-commit: unknown"), "the commit was not passed as a build argument:\n{labels}");
}

#[test]
fn compiles_inside_the_container_and_skips_when_unchanged() {
    image();
    let out = run_ok(&["--target", TARGET, "build", "--force"]);
    let e = text(&out.stderr);
    assert!(e.contains("apptainer exec") && e.contains("--bind"), "not built through the container:\n{e}");
    let build_dir = e.lines().find_map(|l| l.split("collected ").nth(1)).and_then(|l| l.split(" into ").nth(1)).expect("collected line").trim().to_string();
    let daphne = root().join(&build_dir).join("bin/daphne");
    // Binaries built in the bookworm image run on the host.
    let ran = Command::new(&daphne).args(["deploy/examples/sum.daph", "n=10"]).current_dir(root()).output().unwrap();
    assert_eq!(text(&ran.stdout).trim(), "result: 385", "{}", text(&ran.stderr));
    let again = run_ok(&["--target", TARGET, "build"]);
    assert!(text(&again.stderr).contains("build: skipped, sources, image and build commands unchanged"), "{}", text(&again.stderr));
}

#[test]
fn only_worker_rebuilds_one_target() {
    image();
    // Both targets built once (in a fresh clone nothing is), then only the worker again.
    run_ok(&["--target", TARGET, "build"]);
    let out = run_ok(&["--target", TARGET, "build", "--only", "worker"]);
    let e = text(&out.stderr);
    assert!(e.contains("--target DistributedWorker") && !e.contains("--target daphne"), "{e}");
    let build_dir = e.lines().find_map(|l| l.split(" into ").nth(1)).expect("collected line").trim().to_string();
    for bin in ["bin/daphne", "bin/DistributedWorker"] {
        assert!(root().join(&build_dir).join(bin).is_file(), "{bin} missing after --only worker");
    }
}

#[test]
fn deploy_runs_workers_and_coordinator_in_the_container() {
    image();
    let out = run_ok(&["--target", TARGET, "deploy", "deploy/examples/sum.daph", "n=1000"]);
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    assert!(o.lines().any(|l| l == "result: 333833500"), "{o}\n{e}");
    assert!(e.lines().any(|l| l.contains("apptainer exec") && l.contains("DistributedWorker")), "workers not run through apptainer:\n{e}");
    assert!(e.lines().any(|l| l.contains("apptainer exec") && l.contains("bin/daphne")), "coordinator not run through apptainer:\n{e}");
}

#[test]
fn committed_definitions_are_current() {
    for target in ["local", TARGET] {
        let out = run(&["--target", target, "singularity", "--check"]);
        assert!(out.status.success(), "{target}: {}", text(&out.stderr));
    }
}

fn temp_target(toml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.toml");
    std::fs::write(&f, toml).unwrap();
    let p = f.to_str().unwrap().to_string();
    (dir, p)
}

#[test]
fn no_container_runtime_is_a_clear_error() {
    let out = xtask().env("PATH", "/nonexistent").args(["--target", TARGET, "build", "--force"]).output().unwrap();
    let e = text(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("no container runtime") && e.contains("`apptainer` is not on PATH") && e.contains("fix:"), "{e}");
}

#[test]
fn a_broken_definition_surfaces_apptainers_error_and_keeps_the_log() {
    image();
    let base = root().join("target/xtask/images/daphne-bookworm.sif");
    let (_d, cfg) = temp_target(&format!(
        "[container]\nruntime = \"apptainer\"\n[image]\nname = \"zz-broken-test\"\nsif = \"{}\"\nfakeroot = true\npost = [\"echo about to fail\", \"exit 3\"]\n[image.bootstrap]\nagent = \"localimage\"\nfrom = \"{}\"\n",
        std::env::temp_dir().join("zz-broken-test.sif").display(),
        base.display()
    ));
    let out = run(&["--config", &cfg, "--target", "broken", "singularity"]);
    let def = root().join("singularity/zz-broken-test.def");
    let _ = std::fs::remove_file(&def);
    let e = text(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("apptainer` failed with exit code") && e.contains("full log:") && e.contains("fix:"), "{e}");
    let log = e.lines().find_map(|l| l.trim().strip_prefix("full log: ")).unwrap();
    assert!(std::fs::read_to_string(log).unwrap().contains("about to fail"), "the log lacks the build output");
    assert!(!std::env::temp_dir().join("zz-broken-test.sif").exists());
}

#[test]
fn a_missing_source_tree_is_a_clear_error() {
    let (_d, cfg) = temp_target("[source]\npath = \"/nonexistent/daphne\"\n");
    let out = run(&["--config", &cfg, "build"]);
    let e = text(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("/nonexistent/daphne does not exist") && e.contains("fix:"), "{e}");
}

#[test]
fn a_failing_build_script_shows_its_last_lines_and_the_log() {
    image();
    let (_d, cfg) = temp_target(
        "[container]\nruntime = \"apptainer\"\n[image]\nname = \"daphne-bookworm\"\nfakeroot = true\n[image.bootstrap]\nagent = \"debootstrap\"\ninclude = [\"g++\", \"make\"]\n[source]\nbuild_daphne = [\"sh\", \"-c\", \"echo compiling kernels; echo 'error: kernels.cpp:1: boom' >&2; exit 7\"]\n",
    );
    let out = run(&["--config", &cfg, "--target", "failing-build", "build", "--force"]);
    let e = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("exit code 7") && e.contains("error: kernels.cpp:1: boom") && e.contains("full log:"), "{e}");
}

fn manifest_of(stderr: &str) -> serde_json::Value {
    let pkg = stderr
        .lines()
        .find_map(|l| l.split("wrote ").nth(1).or_else(|| l.split("reusing ").nth(1)))
        .and_then(|l| l.split(" (").next())
        .expect("package line")
        .trim()
        .to_string();
    let out = xtask().args(["package", "--verify", &pkg]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The manifest is the archive's first entry; read it back through `tar`.
    let list = Command::new("sh").arg("-c").arg(format!("zstd -dc '{}' 2>/dev/null | tar -xOf - manifest.json || tar --zstd -xOf '{}' manifest.json", root().join(&pkg).display(), root().join(&pkg).display())).output().unwrap();
    serde_json::from_slice(&list.stdout).unwrap_or_else(|e| panic!("manifest of {pkg}: {e}: {}", text(&list.stderr)))
}

#[test]
fn the_package_records_the_image_and_can_carry_the_sif() {
    image();
    run_ok(&["--target", TARGET, "build"]);
    let out = run_ok(&["--target", TARGET, "package"]);
    let m = manifest_of(&text(&out.stderr));
    let hash = m["image"]["hash"].as_str().expect("image hash in the manifest").to_string();
    assert_eq!(hash.len(), 16);
    assert!(m["image"]["sif_remote_path"].as_str().unwrap().ends_with("daphne-bookworm.sif"));
    assert_eq!(m["image"]["included"], false);
    let cfg_text = std::fs::read_to_string(root().join("deploy/targets/local-apptainer.toml")).unwrap() + "\n[payload]\ninclude_sif = true\n";
    let (_d, cfg) = temp_target(&cfg_text);
    let out = run_ok(&["--config", &cfg, "--target", "with-sif", "package"]);
    let m = manifest_of(&text(&out.stderr));
    assert_eq!(m["image"]["included"], true);
    let paths: Vec<&str> = m["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert!(paths.contains(&format!("image/{hash}.sif").as_str()), "{paths:?}");
}
