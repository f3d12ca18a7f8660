//! What users see: JSON events, completions, doctor, help on every subcommand.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).current_dir(root()).stdin(std::process::Stdio::null()).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn json_mode_emits_one_event_per_line() {
    let out = xtask(&["--json", "deploy", "--workers", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"))).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    for k in ["stage_start", "stage_finish", "stage_skip", "progress", "output", "summary"] {
        assert!(kinds.contains(&k), "no `{k}` event in {kinds:?}");
    }
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["outcome"], "succeeded");
    assert_eq!(summary["exit_code"], 0);
    assert!(events.iter().any(|e| e["event"] == "output" && e["line"] == "result: 333333833333500000"));
    assert!(text(&out.stderr).trim().is_empty(), "human output leaked to stderr:\n{}", text(&out.stderr));
}

#[test]
fn json_mode_reports_errors_as_events() {
    let out = xtask(&["--json", "deploy", "deploy/examples/sum.daph", "n=abc"]);
    assert_eq!(out.status.code(), Some(1));
    let events: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(events.iter().any(|e| e["event"] == "error"), "no error event");
    let summary = events.last().unwrap();
    assert_eq!(summary["outcome"], "failed");
}

#[test]
fn completions_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = xtask(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let s = text(&out.stdout);
        assert!(s.contains("deploy") && s.contains("singularity"), "{shell} completions lack subcommands");
    }
}

#[test]
fn doctor_checks_the_local_target() {
    let out = xtask(&["doctor"]);
    let s = text(&out.stdout);
    assert!(out.status.success(), "{s}\n{}", text(&out.stderr));
    for check in ["source tree", "C++ compiler", "local disk", "worker ports"] {
        assert!(s.contains(check), "doctor lacks `{check}`:\n{s}");
    }
}

#[test]
fn doctor_says_how_to_fix_what_fails() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[reach]\nhost = \"no-such-host.invalid\"\nremote_dir = \"/x\"\nconnect_timeout = 2\n[source]\npath = \"/nonexistent/daphne\"\n").unwrap();
    let out = xtask(&["--target", "bad", "--config", f.to_str().unwrap(), "doctor"]);
    let s = text(&out.stdout);
    assert!(!out.status.success());
    assert!(s.contains("FAIL  source tree") && s.contains("FAIL  ssh"), "{s}");
    assert!(s.matches("fix:").count() >= 2, "{s}");
}

#[test]
fn every_subcommand_has_help() {
    let out = xtask(&["--help"]);
    let help = text(&out.stdout);
    let subs: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|s| s != "help")
        .collect();
    assert!(subs.len() >= 18, "{subs:?}");
    for sub in subs {
        let out = xtask(&[&sub, "--help"]);
        assert!(out.status.success() && text(&out.stdout).contains("Usage:"), "`{sub} --help` failed");
    }
}

#[test]
fn runs_lists_past_runs_and_logs_reopens_one() {
    let out = xtask(&["deploy", "--workers", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dir = text(&out.stderr).lines().rev().find_map(|l| l.split("run directory: ").nth(1)).unwrap().trim().to_string();
    let id = Path::new(&dir).file_name().unwrap().to_str().unwrap().to_string();
    let runs = text(&xtask(&["runs"]).stdout);
    let line = runs.lines().find(|l| l.starts_with(&id)).unwrap_or_else(|| panic!("{id} not listed:\n{runs}"));
    assert!(line.contains("deploy") && line.contains("local") && line.contains("succeeded"), "{line}");
    let logs = xtask(&["logs", &id]);
    let s = text(&logs.stdout);
    assert!(logs.status.success(), "{}", text(&logs.stderr));
    assert!(s.contains(&format!("run {id}")) && s.contains("worker-0.out") && s.contains("result: 333333833333500000"), "{s}");
    let missing = xtask(&["logs", "no-such-run"]);
    assert!(!missing.status.success() && text(&missing.stderr).contains("cargo xtask runs"));
}
