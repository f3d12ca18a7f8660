//! The shared testbed: brought up once per test run on its own namespaces, subnet and
//! runtime directory (so a developer's own testbed is never touched), torn down at exit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Name of the generated target the tests deploy to.
pub const TARGET: &str = "testbed-tests";

/// Environment that selects the tests' own testbed in every script and in the xtask.
pub const TB_ENV: &[(&str, &str)] = &[
    ("TB_RT", "/tmp/daphne-testbed-tests"),
    ("TB_PREFIX", "dtt-"),
    ("TB_NET", "10.78.0"),
    ("TB_BRIDGE", "dttbr0"),
    ("TB_TARGET", TARGET),
];

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The xtask binary, set up for the tests' testbed.
pub fn xtask() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(root()).stdin(std::process::Stdio::null()).envs(TB_ENV.iter().copied());
    c
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn run_ok(args: &[&str]) -> Output {
    let out = xtask().args(args).output().unwrap();
    assert!(out.status.success(), "xtask {args:?} failed ({:?}):\n{}\n{}", out.status, text(&out.stdout), text(&out.stderr));
    out
}

pub struct Testbed {
    /// The KEY=VALUE settings `up.sh` wrote (addresses, keys, log files).
    pub env: BTreeMap<String, String>,
}

impl Testbed {
    pub fn get(&self, k: &str) -> &str {
        self.env.get(k).map(String::as_str).unwrap_or_else(|| panic!("testbed.env has no {k}"))
    }

    /// Runs a command "on" a testbed host (its namespace and hostname).
    pub fn on(&self, host: &str, argv: &[&str]) -> Output {
        Command::new(self.get("ONHOST")).arg(host).args(argv).envs(TB_ENV.iter().copied()).output().unwrap()
    }

    /// The number of accepted SSH logins so far on the login host.
    pub fn ssh_logins(&self) -> usize {
        std::fs::read_to_string(self.get("SSHD_LOG_LOGIN")).unwrap_or_default().matches("Accepted publickey").count()
    }

    /// A fault hook of `xtask/testbed/fault.sh`.
    pub fn fault(&self, args: &[&str]) {
        let mut a = vec!["testbed", "fault"];
        a.extend_from_slice(args);
        run_ok(&a);
    }
}

extern "C" fn teardown() {
    let _ = xtask().args(["testbed", "down"]).output();
}

/// The testbed, up. The first caller brings it up (after removing any leftover of an
/// earlier, killed run) and registers the teardown for process exit.
pub fn testbed() -> &'static Testbed {
    static TB: OnceLock<Testbed> = OnceLock::new();
    TB.get_or_init(|| {
        // One test process at a time owns this testbed; the lock ends with the process.
        use std::os::unix::io::AsRawFd;
        let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open("/tmp/daphne-testbed-tests.lock").unwrap();
        // SAFETY: flock on a descriptor we own, kept open until exit.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        std::mem::forget(lock);
        let _ = xtask().args(["testbed", "down"]).output();
        // SAFETY: registering a plain extern "C" function with atexit.
        unsafe { libc::atexit(teardown) };
        let out = xtask().args(["testbed", "up"]).output().unwrap();
        assert!(out.status.success(), "testbed up failed (the cluster tests need root):\n{}\n{}", text(&out.stdout), text(&out.stderr));
        // The image once, before tests deploy concurrently (each would otherwise build it).
        let img = xtask().args(["--target", TARGET, "singularity"]).output().unwrap();
        assert!(img.status.success(), "building the image failed:\n{}", text(&img.stderr));
        let env_file = Path::new(TB_ENV[0].1).join("testbed.env");
        let env = std::fs::read_to_string(&env_file)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Testbed { env }
    })
}

/// The newest run record of a target and command.
pub fn newest_record(target: &str, command: &str) -> serde_json::Value {
    let runs = root().join("target/xtask/runs");
    let mut recs: Vec<serde_json::Value> = std::fs::read_dir(runs)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("run.json")).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(|r| r["target"] == target && r["command"] == command)
        .collect();
    recs.sort_by_key(|r| r["run_id"].as_str().unwrap().to_string());
    recs.pop().expect("a run")
}

static LOCK: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by every test that talks to the testbed, so a test that counts what happens on the
/// testbed (SSH handshakes) can run alone.
pub fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    LOCK.read().unwrap_or_else(|e| e.into_inner())
}

/// Excludes every other testbed test while held.
pub fn exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    LOCK.write().unwrap_or_else(|e| e.into_inner())
}
