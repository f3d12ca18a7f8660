//! Hostile input through the real testbed stack: script arguments through ssh, the login
//! host's shell, `srun` and `apptainer exec` reach the coordinator byte-identical, with the
//! target's `remote_dir` at a path with spaces, a quote and non-ASCII; and a changed host key
//! is an error that says how to fix it.
//!
//! The coordinator runs on a compute node inside the container, where the tests cannot set
//! its environment directly (ssh forwards none of ours). The dump hook reaches it the way a
//! user would pass any variable: `[container] runtime_args = ["--env", "DAPHNE_ARGV_DUMP=..."]`,
//! which `apptainer exec` sets inside the container; the dump lands in the shared `remote_dir`.

use crate::fixture::{run_ok, shared, testbed, text, xtask, TARGET};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::path::{Path, PathBuf};
use std::process::Output;

/// A TOML basic string (JSON's escapes are a subset of TOML's).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// The generated testbed target with `key = ...` lines under [reach] or elsewhere replaced
/// (or added after the table header when missing).
fn with_settings(base: &str, table: &str, settings: &[(&str, String)]) -> String {
    let mut out = String::new();
    let mut current = String::new();
    let mut done = vec![false; settings.len()];
    for line in base.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            if current == table {
                for (i, (k, v)) in settings.iter().enumerate() {
                    if !done[i] {
                        out.push_str(&format!("{k} = {v}\n"));
                        done[i] = true;
                    }
                }
            }
            current = t.trim_matches(|c| c == '[' || c == ']').to_string();
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let key = t.split('=').next().unwrap_or("").trim();
        if current == table {
            if let Some(i) = settings.iter().position(|(k, _)| *k == key) {
                out.push_str(&format!("{key} = {}\n", settings[i].1));
                done[i] = true;
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    if current == table {
        for (i, (k, v)) in settings.iter().enumerate() {
            if !done[i] {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
    }
    out
}

fn base_target() -> String {
    std::fs::read_to_string(crate::fixture::root().join(format!("target/xtask/targets/{TARGET}.toml"))).unwrap()
}

/// Stops the deployment and removes the test's own remote directory when dropped.
struct Deployment {
    args: Vec<String>,
    remote: PathBuf,
    stopped: bool,
}

impl Deployment {
    fn with(&self, cmd: &[&str]) -> Vec<String> {
        self.args.iter().cloned().chain(cmd.iter().map(|s| s.to_string())).collect()
    }
    fn stop(&mut self) -> Output {
        self.stopped = true;
        xtask().args(self.with(&["stop"])).output().unwrap()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = xtask().args(self.with(&["stop"])).output();
        }
        let _ = std::fs::remove_dir_all(&self.remote);
    }
}

const HOSTILE_PIECES: &[&str] = &[
    "'", "\"", "$(touch /tmp/hostile-pwned)", "`id`", ";", "\n", "\t", "\r", " ", "  ", "\\", "$HOME", "${x}", "$@", "*", "?", "~", "!", "#",
    "&&", "|", "<", ">", "%s", "%p", "%t", "%j", "%%", "=", "{a,b}", "'\\''", "é", "✓", "日本語", "\u{202e}", "\u{1b}[31m", "😀", "-n", "--", ",",
    ":",
];

const FLAG_NAMES: &[&str] = &["--target", "--config", "--dry-run", "--help", "-q", "--jobid", "--overlap", "--bind", "--env", "--distributed", "-"];

fn hostile_value() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => proptest::sample::select(HOSTILE_PIECES).prop_map(str::to_string),
        2 => "[a-zA-Z0-9_./:,+@-]{1,6}",
        1 => any::<char>().prop_map(|c| c.to_string()),
    ];
    proptest::collection::vec(piece, 0..8).prop_map(|p| p.concat().replace('\0', ""))
}

fn hostile_arg() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        2 => "[a-zA-Z_][a-zA-Z0-9_.-]{0,8}",
        1 => proptest::sample::select(FLAG_NAMES).prop_map(str::to_string),
        1 => hostile_value(),
    ]
    .prop_map(|n| n.replace('=', ""))
    .prop_filter("a name", |n| !n.is_empty() && n != "n");
    (name, hostile_value()).prop_map(|(n, v)| format!("{n}={v}"))
}

fn read_dump(file: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(file).unwrap_or_default();
    let mut f: Vec<Vec<u8>> = bytes.split(|b| *b == 0).map(<[u8]>::to_vec).collect();
    f.pop();
    f
}

/// Dumps of coordinator processes (`--distributed` in their argv).
fn coordinator_dumps(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| read_dump(p).iter().any(|a| a == b"--distributed")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// 300 random hostile argument lists (issue 7: "a few hundred") through `xtask run` on the testbed: ssh to the login
/// host, `srun --overlap` into the workers' allocation, `apptainer exec` into the image,
/// the stand-in coordinator. Every argument arrives byte-identical, and so does an
/// environment value with spaces, quotes and `$(...)` given through `runtime_args`.
#[test]
fn hostile_args_reach_the_coordinator_through_ssh_srun_and_apptainer() {
    let tb = testbed();
    let _shared = shared();
    let remote = PathBuf::from(tb.get("TB_RT")).join("home").join("dä phne 'hostile' ✓");
    let dumps = remote.join("argv dumps");
    std::fs::create_dir_all(&dumps).unwrap();
    // Apptainer evaluates `$...` and backticks in `--env` values itself (like a shell), so
    // the value whose arrival is checked inside the container has none; the one with
    // `$(d)` is checked where the tool hands it over: the argv of `apptainer exec` in the
    // job script.
    let weird = "a b 'c' \"f\" ü ; x|y & <z> \\ %p";
    let evaluated = "$(d) `e` $HOME";
    let runtime_args = format!(
        "[\"--env\", {}, \"--env\", {}, \"--env\", {}]",
        toml_str(&format!("DAPHNE_ARGV_DUMP={}/argv-%p", dumps.display())),
        toml_str(&format!("HOSTILE_WEIRD={weird}")),
        toml_str(&format!("HOSTILE_EVALUATED={evaluated}"))
    );
    // The ssh key and known_hosts file at paths with spaces, `%` (ssh expands %-tokens in
    // both) and non-ASCII.
    let dir = tempfile::Builder::new().prefix("tb hostile ✓ ").tempdir().unwrap();
    let key = dir.path().join("id %r ä");
    std::fs::copy(tb.get("SSH_KEY"), &key).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let known = dir.path().join("known hosts ✓ %h");
    std::fs::copy(tb.get("KNOWN_HOSTS"), &known).unwrap();
    let mut cfg = with_settings(
        &base_target(),
        "reach",
        &[
            ("remote_dir", toml_str(remote.to_str().unwrap())),
            ("identity", toml_str(key.to_str().unwrap())),
            ("known_hosts", toml_str(known.to_str().unwrap())),
        ],
    );
    cfg = with_settings(&cfg, "container", &[("runtime_args", runtime_args)]);
    // An srun option whose value has spaces, quotes and non-ASCII, on the workers' step.
    let comment = "--comment=hostile a b 'c' \"d\" ü";
    cfg = with_settings(&cfg, "schedule.slurm", &[("srun_args", format!("[{}]", toml_str(comment)))]);
    let f = dir.path().join("tb hostile.toml");
    std::fs::write(&f, &cfg).unwrap();
    let mut d = Deployment { args: vec!["--target".into(), "tb-hostile".into(), "--config".into(), f.to_str().unwrap().into()], remote: remote.clone(), stopped: false };
    for step in ["singularity", "build", "package", "upload", "start", "wait"] {
        run_ok(&d.with(&[step]).iter().map(String::as_str).collect::<Vec<_>>());
    }

    // The workers run in the same container setup: their environment shows what
    // `runtime_args` passed (the dumps name their PIDs; the nodes share our PID namespace).
    let worker_pids: Vec<String> = std::fs::read_dir(&dumps)
        .unwrap()
        .flatten()
        .filter(|e| read_dump(&e.path()).first().is_some_and(|a| a.ends_with(b"/bin/DistributedWorker")))
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("argv-")).map(str::to_string))
        .collect();
    assert_eq!(worker_pids.len(), 6, "every worker wrote its argv into {}", dumps.display());
    for pid in &worker_pids {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("HOSTILE_WEIRD={weird}");
        assert!(env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()), "worker {pid} lacks `{want}`: {}", String::from_utf8_lossy(&env).replace('\0', "\n"));
    }
    // The job script's step, split by a real shell: `apptainer exec` gets every runtime
    // argument byte for byte, `$(d)` included.
    let start = crate::fixture::newest_record("tb-hostile", "start");
    let job_sh = std::fs::read_to_string(crate::fixture::root().join("target/xtask/runs").join(start["run_id"].as_str().unwrap()).join("job.sh")).unwrap();
    // The step runs from its `srun` to the end of the script (the wrapper spans lines).
    let step = &job_sh[job_sh.rfind("\nsrun ").expect("the srun line") + 1..];
    let out = std::process::Command::new("sh").arg("-c").arg(format!("printf '%s\\0' {step}")).output().unwrap();
    let words: Vec<Vec<u8>> = out.stdout.split(|b| *b == 0).map(<[u8]>::to_vec).collect();
    assert!(words.iter().any(|w| w == comment.as_bytes()), "the job's step does not pass `{comment}`:\n{step}");
    for want in [format!("HOSTILE_WEIRD={weird}"), format!("HOSTILE_EVALUATED={evaluated}"), format!("DAPHNE_ARGV_DUMP={}/argv-%p", dumps.display())] {
        let at = words.iter().position(|w| *w == want.as_bytes());
        assert!(at.is_some_and(|i| i > 0 && words[i - 1] == b"--env"), "the job's step does not pass `--env {want}`:\n{step}");
    }

    let cases = std::env::var("HOSTILE_CLUSTER_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(300);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, max_shrink_iters: 40, rng_seed: prop_seed(), ..Config::default() });
    let started = std::time::Instant::now();
    let result = runner.run(&proptest::collection::vec(hostile_arg(), 1..5), |args| {
        for p in coordinator_dumps(&dumps) {
            std::fs::remove_file(p).unwrap();
        }
        let mut a = d.with(&["run", "deploy/examples/sum.daph"]);
        a.extend(args.iter().cloned());
        let out = xtask().args(&a).output().unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        prop_assert!(out.status.success(), "run failed ({:?}) with {:?}:\n{}\n{}", out.status, args, stdout, stderr);
        prop_assert!(stdout.lines().any(|l| l == "result: 333333833333500000"), "no result for {:?}:\n{}", args, stdout);
        let files = coordinator_dumps(&dumps);
        prop_assert_eq!(files.len(), 1, "one coordinator dump: {:?}", files);
        let got = read_dump(&files[0]);
        let want: Vec<Vec<u8>> = args.iter().map(|s| s.as_bytes().to_vec()).collect();
        prop_assert!(got.len() > want.len(), "argv {:?} shorter than {:?}", got, args);
        let (head, tail) = got.split_at(got.len() - want.len());
        if tail != want.as_slice() {
            return Err(TestCaseError::fail(format!(
                "the coordinator got different arguments\n  sent: {:?}\n  got:  {:?}",
                args,
                tail.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect::<Vec<_>>()
            )));
        }
        let script = head.last().map(|s| String::from_utf8_lossy(s).into_owned()).unwrap_or_default();
        prop_assert!(script.starts_with(remote.to_str().unwrap()) && script.ends_with("/payload/deploy/examples/sum.daph"), "script path {:?}", script);
        Ok(())
    });
    let took = started.elapsed();
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!("hostile args on the testbed: {cases} cases in {:.1}s", took.as_secs_f64());
    let out = d.stop();
    assert!(out.status.success(), "stop failed: {}", text(&out.stderr));
    let rec = crate::fixture::newest_record("tb-hostile", "start");
    let job = rec["job_ids"][0].as_str().unwrap_or_default().to_string();
    let q = tb.on("login", &["squeue", "-h", "-j", &job, "-o", "%T"]);
    let st = text(&q.stdout);
    assert!(st.trim().is_empty() || st.contains("COMPLETED") || st.contains("CANCELLED"), "job {job} still queued: {st}");
}

/// A known_hosts file that holds a different key for the login host: ssh refuses, and the
/// error says the key CHANGED and how to remove the stale entry (`ssh-keygen -R`, with the
/// target's own known_hosts file).
#[test]
fn a_changed_host_key_is_an_error_with_the_fix() {
    let tb = testbed();
    let _shared = shared();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("other key");
    let out = std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "not-the-login-host", "-f"]).arg(&key).output().unwrap();
    assert!(out.status.success(), "ssh-keygen: {}", text(&out.stderr));
    let public = std::fs::read_to_string(dir.path().join("other key.pub")).unwrap();
    let other: Vec<&str> = public.split_whitespace().take(2).collect();
    let known = dir.path().join("known hosts");
    let login = tb.get("LOGIN_ADDR");
    std::fs::write(&known, format!("{login} {} {}\n", other[0], other[1])).unwrap();
    let cfg = with_settings(&base_target(), "reach", &[("known_hosts", toml_str(known.to_str().unwrap()))]);
    let f = dir.path().join("hostkey.toml");
    std::fs::write(&f, cfg).unwrap();
    let g = ["--target", "tb-hostkey", "--config", f.to_str().unwrap()];
    for step in ["build", "package"] {
        let mut a = g.to_vec();
        a.push(step);
        run_ok(&a);
    }
    let mut a = g.to_vec();
    a.push("upload");
    let out = xtask().args(&a).output().unwrap();
    let e = text(&out.stderr);
    assert!(!out.status.success(), "upload succeeded with a wrong host key:\n{e}");
    assert!(e.contains("CHANGED"), "the error does not say the host key changed:\n{e}");
    // The file's name has a space, so it is quoted for the shell the user pastes it into.
    let fix = format!("ssh-keygen -f '{}' -R {login}", known.to_str().unwrap());
    assert!(e.contains(&fix), "the fix is not `{fix}`:\n{e}");
    // Nothing was changed on the login host: no release under this target's remote_dir
    // came from this upload (the run's own directory was never made).
    let rec = crate::fixture::newest_record("tb-hostkey", "upload");
    assert_eq!(rec["outcome"], "failed", "{rec}");
}

/// Property tests run a fixed, reproducible set of cases by default, so CI is deterministic;
/// `PROPTEST_RNG_SEED=random` (or a number) explores other cases.
fn prop_seed() -> proptest::test_runner::RngSeed {
    match std::env::var("PROPTEST_RNG_SEED").as_deref() {
        Ok("random") => proptest::test_runner::RngSeed::Random,
        Ok(n) => n.parse().map(proptest::test_runner::RngSeed::Fixed).unwrap_or(proptest::test_runner::RngSeed::Fixed(0x5eed_da9e)),
        Err(_) => proptest::test_runner::RngSeed::Fixed(0x5eed_da9e),
    }
}
