//! Table tests: every config error names the file, the line and the key, and how to fix it.

use super::*;

fn load(text: &str) -> Result<Config, ConfigError> {
    load_str(Utf8Path::new("/repo"), "t", Some(Utf8Path::new("deploy/targets/t.toml")), text, &Overrides::default())
}

#[test]
fn builtin_local_needs_no_file() {
    let c = load_str(Utf8Path::new("/repo"), LOCAL, None, "", &Overrides::default()).unwrap();
    assert_eq!(c.scheduler, Scheduler::Local);
    assert_eq!(c.runtime, Runtime::Host);
    assert_eq!(c.workers, 2);
    assert_eq!(c.ports, Ports::Auto);
    assert_eq!(c.remote_dir, "/repo/target/xtask/local");
    assert_eq!(c.source.path, "/repo/daphne-src");
    assert_eq!(c.source.build_daphne, ["./build.sh", "--target", "daphne"]);
    assert_eq!(c.run.script, "deploy/examples/sum.daph");
}

#[test]
fn full_slurm_target_parses() {
    let c = load(
        r#"
description = "EuroHPC"
[reach]
scheduler = "slurm"
host = "login.example.eu"
user = "alice"
port = 2222
identity = "/home/alice/.ssh/id_ed25519"
proxy_jump = "gw.example.eu"
remote_dir = "/scratch/alice/daphne"
[schedule]
port_base = 51000
advertise = "interface:ib0"
[schedule.slurm]
partition = "cpu"
account = "p200"
time = "00:30:00"
nodes = 4
tasks_per_node = 2
sbatch_args = ["--exclusive"]
[container]
runtime = "apptainer"
runtime_args = ["--bind", "/scratch"]
"#,
    )
    .unwrap();
    assert_eq!(c.scheduler, Scheduler::Slurm);
    assert_eq!(c.workers, 8);
    assert_eq!(c.ports, Ports::Base(51000));
    assert_eq!(c.advertise, Advertise::Interface("ib0".into()));
    let ssh = c.ssh.unwrap();
    assert_eq!((ssh.host.as_str(), ssh.port, ssh.user.as_deref()), ("login.example.eu", Some(2222), Some("alice")));
    assert_eq!(c.runtime, Runtime::Apptainer);
}

/// (case, toml, expected line, expected key, a phrase of the message)
const BAD: &[(&str, &str, usize, &str, &str)] = &[
    ("unknown top key", "colour = 1\n", 1, "colour", "unknown field"),
    ("unknown nested key", "[schedule]\nwrokers = 2\n", 2, "schedule.wrokers", "unknown field"),
    ("wrong type", "[schedule]\nworkers = \"two\"\n", 2, "schedule.workers", "invalid type"),
    ("zero workers", "[schedule]\nworkers = 0\n", 2, "schedule.workers", "between 1 and"),
    ("bad scheduler", "[reach]\nscheduler = \"pbs\"\n", 2, "reach.scheduler", "unknown scheduler"),
    ("slurm without host", "[reach]\nscheduler = \"slurm\"\nremote_dir = \"/x\"\n", 0, "reach.host", "is required"),
    ("slurm without remote_dir", "[reach]\nscheduler = \"slurm\"\nhost = \"h\"\n", 0, "reach.remote_dir", "is required"),
    ("public identity", "[reach]\nhost = \"h\"\nremote_dir = \"/x\"\nidentity = \"~/.ssh/id_rsa.pub\"\n", 4, "reach.identity", "public key"),
    ("port out of range", "[reach]\nhost = \"h\"\nremote_dir = \"/x\"\nport = 70000\n", 4, "reach.port", "between 1 and 65535"),
    ("port_base too low", "[schedule]\nport_base = 80\n", 2, "schedule.port_base", "between 1024"),
    ("port_base and ports", "[schedule]\nport_base = 5000\nports = [1, 2]\n", 2, "schedule.port_base", "cannot be combined"),
    ("too few ports", "[schedule]\nworkers = 3\nports = [5000, 5001]\n", 3, "schedule.ports", "2 ports for 3 workers"),
    ("bad runtime", "[container]\nruntime = \"docker\"\n", 2, "container.runtime", "unknown runtime"),
    ("bad slurm time", "[reach]\nhost = \"h\"\nremote_dir = \"/x\"\n[schedule.slurm]\ntime = \"half an hour\"\n", 5, "schedule.slurm.time", "not a SLURM time"),
    ("ssh without peers", "[reach]\nscheduler = \"ssh\"\nhost = \"h\"\nremote_dir = \"/x\"\n", 0, "schedule.peers", "is required"),
    ("bad peer", "[reach]\nscheduler = \"ssh\"\nhost = \"h\"\nremote_dir = \"/x\"\n[schedule]\npeers = [\"n1:99999\"]\n", 6, "schedule.peers", "not a port"),
    ("bad advertise", "[schedule]\nadvertise = \"ip\"\n", 2, "schedule.advertise", "not an address choice"),
    ("bad compression", "[payload]\ncompression = \"xz\"\n", 2, "payload.compression", "unknown compression"),
    ("bad level", "[payload]\ncompression = \"gzip\"\nlevel = 12\n", 3, "payload.level", "between 1 and 9"),
    ("bad backend", "[run]\ndist_backend = \"TCP\"\n", 2, "run.dist_backend", "unknown backend"),
    ("bad bootstrap", "[image.bootstrap]\nagent = \"oras\"\n", 2, "image.bootstrap.agent", "unknown bootstrap agent"),
    ("localimage without from", "[image.bootstrap]\nagent = \"localimage\"\n", 0, "image.bootstrap.from", "is required"),
    ("empty build command", "[source]\nbuild_worker = []\n", 2, "source.build_worker", "must name a program"),
    ("syntax error", "[schedule\nworkers = 2\n", 1, "", "invalid table header"),
    ("secret in ssh options", "[reach]\nhost = \"h\"\nremote_dir = \"/x\"\nssh_options = [\"-o\", \"Password=hunter2\"]\n", 0, "reach.ssh_options", "password or token"),
];

#[test]
fn bad_configs_name_file_line_key_and_fix() {
    for (case, text, line, key, phrase) in BAD {
        let e = match load(text) {
            Ok(_) => panic!("{case}: accepted"),
            Err(e) => e,
        };
        assert_eq!(e.file.as_deref(), Some(Utf8Path::new("deploy/targets/t.toml")), "{case}");
        if *line > 0 {
            assert_eq!(e.line.map(|l| l.0), Some(*line), "{case}: {e}");
        }
        assert!(e.key.starts_with(key), "{case}: key `{}` should be `{key}`: {e}", e.key);
        assert!(e.message.contains(phrase), "{case}: message `{}` lacks `{phrase}`", e.message);
        assert!(!e.fix.is_empty(), "{case}: no fix");
        let shown = e.to_string();
        assert!(shown.starts_with("deploy/targets/t.toml:"), "{case}: {shown}");
        assert!(shown.contains("fix:"), "{case}: {shown}");
    }
}

#[test]
fn overrides_win_over_the_file() {
    let ov = Overrides { runtime: Some("apptainer".into()), workers: Some(5), ..Default::default() };
    let c = load_str(Utf8Path::new("/repo"), LOCAL, None, "", &ov).unwrap();
    assert_eq!(c.runtime, Runtime::Apptainer);
    assert_eq!(c.workers, 5);
    let bad = Overrides { runtime: Some("podman".into()), ..Default::default() };
    let e = load_str(Utf8Path::new("/repo"), LOCAL, None, "", &bad).unwrap_err();
    assert_eq!(e.key, "--runtime");
}

#[test]
fn unknown_target_lists_known_ones() {
    let e = super::load(Utf8Path::new("/nonexistent-root"), "nosuch", &Overrides::default()).unwrap_err();
    assert!(e.message.contains("no target named `nosuch`"), "{e}");
    assert!(e.message.contains("local"), "{e}");
}

#[test]
fn slurm_times() {
    for ok in ["30", "00:30:00", "1-00", "2-12:00:00", "UNLIMITED", "10:00"] {
        assert!(valid_slurm_time(ok), "{ok}");
    }
    for bad in ["", "half", "1:2:3:4", "-1", "1-", "a-1"] {
        assert!(!valid_slurm_time(bad), "{bad}");
    }
}

#[test]
fn peers_parse() {
    assert_eq!(parse_peer("n1:5000").unwrap(), Peer { host: "n1".into(), port: Some(5000) });
    assert_eq!(parse_peer("n1").unwrap(), Peer { host: "n1".into(), port: None });
    assert!(parse_peer("-oProxyCommand=x").is_err());
    assert!(parse_peer("a b").is_err());
}

/// Every key the loader accepts, per table, read back from serde's "expected one of" list.
fn schema_keys() -> Vec<String> {
    let tables = ["", "reach", "schedule", "schedule.slurm", "schedule.slurm.coordinator", "container", "image", "image.bootstrap", "source", "payload", "run"];
    let mut keys = vec![];
    for t in tables {
        let text = if t.is_empty() { "zz_probe = 1\n".to_string() } else { format!("[{t}]\nzz_probe = 1\n") };
        let e = load(&text).unwrap_err();
        let list = e.message.split("expected").nth(1).unwrap_or_else(|| panic!("{t}: {}", e.message)).replace("one of", "").replace(" or ", ",");
        for k in list.split(',').map(|k| k.trim().trim_matches('`').to_string()).filter(|k| !k.is_empty()) {
            keys.push(if t.is_empty() { k } else { format!("{t}.{k}") });
        }
    }
    keys
}

fn repo_file(rel: &str) -> String {
    let root = Utf8Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    std::fs::read_to_string(root.join(rel)).unwrap()
}

#[test]
fn docs_reference_lists_every_key() {
    let doc = repo_file("docs/config.md");
    let keys = schema_keys();
    assert!(keys.len() > 50, "{keys:?}");
    for k in keys {
        let as_row = format!("| `{k}` |");
        let as_table = format!("**`[{k}]`**");
        assert!(doc.contains(&as_row) || doc.contains(&as_table), "docs/config.md does not document `{k}`");
    }
}

#[test]
fn every_toml_example_in_the_docs_parses() {
    let mut n = 0;
    for file in ["README.md", "docs/config.md"] {
        let text = repo_file(file);
        for block in text.split("```toml").skip(1) {
            let toml = block.split("```").next().unwrap();
            load(toml).unwrap_or_else(|e| panic!("a TOML example in {file} does not load:\n{toml}\n{e}"));
            n += 1;
        }
    }
    for entry in std::fs::read_dir(Utf8Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy/targets")).unwrap() {
        let p = entry.unwrap().path();
        load(&std::fs::read_to_string(&p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        n += 1;
    }
    assert!(n >= 4, "only {n} examples found");
}
