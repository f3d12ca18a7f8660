//! Fuzzing the target loader with mutated TOML.
//!
//! Starts from every valid example (deploy/targets/*.toml, the TOML blocks of README.md and
//! docs/config.md, and a few seeds below), applies random mutations (delete, duplicate or swap
//! lines, flip characters, insert keys, change value types, truncate, insert junk) and loads
//! the result. The loader must never panic, and every error must name the file, a line when
//! the error is about something in the text, and a key that exists (or the unknown key that
//! the text holds).
//!
//! Interesting cases found this way are kept as files in `corpus/`, each with its expected
//! outcome in its first line, and loaded by `corpus_cases_load_as_recorded`:
//!
//! ```text
//! # expect: ok
//! # expect: error key=schedule.workers line=3 message=between 1 and
//! # expect: error key=reach.host line=none message=is required
//! ```

use super::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as PropConfig, TestRunner};

const FILE: &str = "deploy/targets/fuzz.toml";

fn repo_root() -> Utf8PathBuf {
    Utf8Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// Richer seeds than the examples: multi-line arrays, inline tables, dotted keys, comments,
/// quoted keys, labels.
const EXTRA_SEEDS: &[&str] = &[
    r#"description = "ssh peers" # trailing comment
[reach]
scheduler = "ssh"
host = "head.example.org"
remote_dir = "/scratch/alice/daphne"
ssh_options = [
  "-o",
  "Compression=yes",
]
[schedule]
peers = [
  "node1",
  "node2:50001",
]
ports = [
  50000,
  50001,
]
"#,
    r#"schedule.workers = 3
schedule.port_base = 50000
run.args = ["n=10", "msg=a b"]
[image]
name = "daphne"
labels = { maintainer = "alice", "org.label" = "x" }
[image.bootstrap]
agent = "debootstrap"
include = ["g++", "make"]
"#,
    r#"[reach]
host = "login.example.eu"
remote_dir = "/scratch/alice/daphne"
[schedule.slurm]
nodes = 2
tasks_per_node = 2
time = "00:30:00"
srun_args = ["--mpi=none"]
[schedule.slurm.coordinator]
time = "00:10:00"
cpus_per_task = 2
[container]
runtime = "apptainer"
runtime_args = ["--bind", "/scratch", "--env", "A=b c"]
[payload]
compression = "gzip"
level = 6
data = ["data/*.csv"]
"#,
];

/// Every valid example the repository ships, plus the seeds above.
fn seeds() -> Vec<(String, String)> {
    let root = repo_root();
    let mut out = vec![];
    let mut files: Vec<_> = std::fs::read_dir(root.join("deploy/targets")).expect("deploy/targets").flatten().map(|e| e.path()).collect();
    files.sort();
    for p in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "toml")) {
        out.push((p.display().to_string(), std::fs::read_to_string(&p).expect("readable example")));
    }
    for doc in ["README.md", "docs/config.md"] {
        let text = std::fs::read_to_string(root.join(doc)).expect("doc");
        for (i, block) in text.split("```toml").skip(1).enumerate() {
            out.push((format!("{doc} block {}", i + 1), block.split("```").next().unwrap_or("").to_string()));
        }
    }
    for (i, s) in EXTRA_SEEDS.iter().enumerate() {
        out.push((format!("extra seed {i}"), s.to_string()));
    }
    out
}

fn load(text: &str) -> Result<Config, ConfigError> {
    load_str(Utf8Path::new("/repo"), "fuzz", Some(Utf8Path::new(FILE)), text, &Overrides::default())
}

/// Every dotted key the loader knows, tables included, read back from serde's "expected
/// one of" lists of each table.
fn known_keys() -> &'static Vec<String> {
    static KEYS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let tables = ["", "reach", "schedule", "schedule.slurm", "schedule.slurm.coordinator", "container", "image", "image.bootstrap", "source", "payload", "run"];
        let mut keys: Vec<String> = tables.iter().filter(|t| !t.is_empty()).map(|t| t.to_string()).collect();
        for t in tables {
            let text = if t.is_empty() { "zz_probe = 1\n".to_string() } else { format!("[{t}]\nzz_probe = 1\n") };
            let e = load(&text).expect_err("unknown key");
            let list = e.message.split("expected").nth(1).expect("expected list").replace("one of", "").replace(" or ", ",");
            for k in list.split(',').map(|k| k.trim().trim_matches('`').to_string()).filter(|k| !k.is_empty()) {
                keys.push(if t.is_empty() { k } else { format!("{t}.{k}") });
            }
        }
        keys
    })
}

/// Leaf names, for inserting keys that the loader knows (so that type and range checks run).
fn leaf_names() -> Vec<String> {
    let mut v: Vec<String> = known_keys().iter().map(|k| k.rsplit('.').next().unwrap_or(k).to_string()).collect();
    v.sort();
    v.dedup();
    v
}

/// What an error must tell: the file, a line when it is about text in the file, a key that
/// exists or that the text holds, a message and a fix. Returns what is wrong, if anything.
fn error_problem(text: &str, e: &ConfigError) -> Option<String> {
    if e.file.as_deref() != Some(Utf8Path::new(FILE)) {
        return Some(format!("the error does not name the file: {e:?}"));
    }
    if e.message.trim().is_empty() || e.fix.trim().is_empty() {
        return Some(format!("the error has no message or no fix: {e:?}"));
    }
    let shown = e.to_string();
    if !shown.starts_with(&format!("{FILE}:")) || !shown.contains("fix:") {
        return Some(format!("the shown error lacks the file or the fix: {shown}"));
    }
    let lines = text.split('\n').count();
    match e.line {
        Some((l, c)) if l == 0 || l > lines || c == 0 => return Some(format!("line {l}:{c} is outside the text ({lines} lines): {e:?}")),
        Some(_) => {}
        // Without a line, the error must be about something the text does not hold.
        None if !e.message.contains("is required") => return Some(format!("an error about the text has no line: {e:?}")),
        None => {}
    }
    // Errors about what a value or key means (from serde or the validator) must name a key
    // of the schema; a syntax error names the key written where it is, if any.
    let semantic = ["unknown field", "invalid type", "invalid value", "unknown variant", "invalid length", "missing field"].iter().any(|p| e.message.starts_with(p));
    if e.key.is_empty() {
        if semantic || e.line.is_none() {
            return Some(format!("the error names no key: {e:?}"));
        }
        return None;
    }
    let known = known_keys();
    if known.contains(&e.key) || e.key.starts_with("image.labels.") {
        return None;
    }
    // An unknown key: its table must exist, and the message must name it.
    if e.message.starts_with("unknown field") {
        // (The unknown name may itself hold dots when it was quoted: `[".x"]`.)
        let leaf = known.iter().filter_map(|t| e.key.strip_prefix(&format!("{t}."))).min_by_key(|l| l.len()).unwrap_or(&e.key);
        if e.message.contains(&format!("`{leaf}`")) {
            return None;
        }
    }
    // A syntax error: the key is one the text holds, not the garbage on the line.
    if !semantic && !e.key.contains('\n') && (text.contains(&e.key) || e.key.split('.').all(|seg| !seg.is_empty() && text.contains(seg))) {
        return None;
    }
    Some(format!("the key `{}` is not a key of the schema: {e:?}", e.key))
}

#[derive(Debug, Clone)]
enum Mutation {
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    FlipChar(Index, char),
    InsertKey(Index, String, String),
    ChangeValue(Index, String),
    Truncate(Index),
    InsertJunk(Index, String),
    InsertHeader(Index, String),
}

fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(
            &[
                "\"str\"",
                "'lit'",
                "\"\"\"multi\nline\"\"\"",
                "'''raw\nlines'''",
                "\"\"",
                "1",
                "0",
                "-1",
                "70000",
                "99999999999999999999",
                "9223372036854775807",
                "-9223372036854775808",
                "4294967296",
                "1.5",
                "nan",
                "inf",
                "-0.0",
                "true",
                "false",
                "[]",
                "[1, \"a\"]",
                "[\"x\", \"y\"]",
                "[\n  \"a\",\n  2,\n]",
                "[[1], [2]]",
                "{}",
                "{ a = 1 }",
                "{ agent = \"docker\" }",
                "1979-05-27T07:32:00Z",
                "07:32:00",
                "\"\\u0000\"",
                "\"a\\nb\"",
                "\"-oProxyCommand=x\"",
                "\"~/.ssh/id.pub\"",
                "\"interface:\"",
                "\"password=hunter2\"",
                "[\"password=hunter2\"]",
                "\"slurm\"",
                "\"ssh\"",
                "\"local\"",
                "\"MPI\"",
                "\"localimage\"",
                "\"library\"",
                "\"login\"",
                "\"[\"",
                "\"**/[\"",
                "[\"[\"]",
            ][..]
        )
        .prop_map(str::to_string),
        any::<i64>().prop_map(|i| i.to_string()),
        (0i64..70000).prop_map(|i| i.to_string()),
        any::<String>().prop_map(|s| toml::Value::String(s).to_string()),
        proptest::collection::vec(any::<String>().prop_map(|s| toml::Value::String(s).to_string()), 0..3).prop_map(|v| format!("[{}]", v.join(", "))),
    ]
}

fn toml_key() -> impl Strategy<Value = String> {
    let leaves = leaf_names();
    prop_oneof![
        4 => proptest::sample::select(leaves),
        1 => "[a-z_]{1,10}",
        1 => Just("\"a b\"".to_string()),
        1 => Just("schedule.workers".to_string()),
        1 => Just("reach.host".to_string()),
        1 => Just("image.labels.x".to_string()),
        1 => "[a-z]{1,5}\\.[a-z]{1,5}",
    ]
}

fn header() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(
            &[
                "[reach]",
                "[schedule]",
                "[schedule.slurm]",
                "[schedule.slurm.coordinator]",
                "[container]",
                "[image]",
                "[image.bootstrap]",
                "[image.labels]",
                "[source]",
                "[payload]",
                "[run]",
                "[[run]]",
                "[[schedule.peers]]",
                "[reach.host]",
                "[ reach ]",
                "[\"reach\"]",
                "[reach",
                "[]",
            ][..]
        )
        .prop_map(str::to_string),
        "\\[[a-z.]{1,12}\\]",
    ]
}

fn junk() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(&["=", "\"", "'", "[", "]", "{", "}", "\n", "#", "\\", "\"\"\"", "'''", ",", ".", "\r", "\t", "\u{feff}", "é", "\u{0}", "\u{1}", "= =", "a.b.c = 1\n"][..])
            .prop_map(str::to_string),
        any::<String>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => any::<Index>().prop_map(Mutation::DeleteLine),
        2 => any::<Index>().prop_map(Mutation::DuplicateLine),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        3 => (any::<Index>(), any::<char>()).prop_map(|(i, c)| Mutation::FlipChar(i, c)),
        3 => (any::<Index>(), toml_key(), toml_value()).prop_map(|(i, k, v)| Mutation::InsertKey(i, k, v)),
        4 => (any::<Index>(), toml_value()).prop_map(|(i, v)| Mutation::ChangeValue(i, v)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), junk()).prop_map(|(i, j)| Mutation::InsertJunk(i, j)),
        2 => (any::<Index>(), header()).prop_map(|(i, h)| Mutation::InsertHeader(i, h)),
    ]
}

fn char_boundary(text: &str, i: &Index) -> usize {
    if text.is_empty() {
        return 0;
    }
    let mut at = i.index(text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    match m {
        Mutation::DeleteLine(i) => {
            lines.remove(i.index(lines.len()));
        }
        Mutation::DuplicateLine(i) => {
            let at = i.index(lines.len());
            lines.insert(at, lines[at].clone());
        }
        Mutation::SwapLines(a, b) => {
            let (a, b) = (a.index(lines.len()), b.index(lines.len()));
            lines.swap(a, b);
        }
        Mutation::FlipChar(i, c) => {
            let at = char_boundary(text, i);
            let mut s = text.to_string();
            let end = s[at..].chars().next().map_or(at, |ch| at + ch.len_utf8());
            s.replace_range(at..end, &c.to_string());
            return s;
        }
        Mutation::InsertKey(i, k, v) => lines.insert(i.index(lines.len() + 1), format!("{k} = {v}")),
        Mutation::ChangeValue(i, v) => {
            let with_value: Vec<usize> = (0..lines.len()).filter(|&n| lines[n].contains('=') && !lines[n].trim_start().starts_with('#')).collect();
            if with_value.is_empty() {
                return text.to_string();
            }
            let n = with_value[i.index(with_value.len())];
            let key = lines[n].split('=').next().unwrap_or("").to_string();
            lines[n] = format!("{key}= {v}");
        }
        Mutation::Truncate(i) => return text[..char_boundary(text, i)].to_string(),
        Mutation::InsertJunk(i, j) => {
            let at = char_boundary(text, i);
            return format!("{}{j}{}", &text[..at], &text[at..]);
        }
        Mutation::InsertHeader(i, h) => lines.insert(i.index(lines.len() + 1), h.clone()),
    }
    lines.join("\n")
}

/// Loads the text and checks the invariants; panics inside the loader are failures too.
/// `Ok(true)` when the text loaded, `Ok(false)` for a good error.
fn check(text: &str) -> Result<bool, String> {
    let r = std::panic::catch_unwind(|| load(text)).map_err(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
        format!("the loader panicked: {msg}")
    })?;
    match r {
        Ok(_) => Ok(true),
        Err(e) => error_problem(text, &e).map_or(Ok(false), Err),
    }
}

/// Every seed loads as it is (the mutations start from valid files).
#[test]
fn every_seed_is_valid() {
    let seeds = seeds();
    assert!(seeds.len() >= 9, "{} seeds", seeds.len());
    for (name, text) in seeds {
        load(&text).unwrap_or_else(|e| panic!("seed {name} does not load: {e}"));
    }
}

/// 20000 mutated targets: no panic, and every error names file, line and key.
#[test]
fn mutated_targets_never_panic_and_errors_point_at_file_line_and_key() {
    let seeds = seeds();
    let n_seeds = seeds.len();
    let cases = std::env::var("CONFIG_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(20_000);
    let started = std::time::Instant::now();
    let mut runner = TestRunner::new(PropConfig { cases, failure_persistence: None, max_shrink_iters: 20_000, rng_seed: prop_seed(), ..PropConfig::default() });
    let (ok, err) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
    let strategy = (0..n_seeds, proptest::collection::vec(mutation(), 1..5));
    let result = runner.run(&strategy, |(seed, muts)| {
        let mut text = seeds[seed].1.clone();
        for m in &muts {
            text = apply(&text, m);
        }
        let verdict = check(&text);
        if matches!(verdict, Ok(true)) {
            ok.set(ok.get() + 1);
        } else {
            err.set(err.get() + 1);
        }
        prop_assert!(verdict.is_ok(), "{}\n--- text ({}) ---\n{}\n---", verdict.unwrap_err(), seeds[seed].0, text);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (ok, err) = (ok.get(), err.get());
    eprintln!("config fuzz: {cases} cases ({ok} loaded, {err} errors) in {:.2}s", started.elapsed().as_secs_f64());
    assert!(err > cases as usize / 10, "the mutations hardly ever break a file: {ok} ok, {err} errors");
}

/// Purely random text (not TOML-shaped) and the empty file.
#[test]
fn random_text_never_panics() {
    let mut runner = TestRunner::new(PropConfig { cases: 5000, failure_persistence: None, rng_seed: prop_seed(), ..PropConfig::default() });
    runner
        .run(&any::<String>(), |s| {
            let v = check(&s);
            prop_assert!(v.is_ok(), "{}", v.unwrap_err());
            Ok(())
        })
        .unwrap();
    check("").unwrap();
}

/// One corpus file: its expectation line and its text.
struct Expect {
    ok: bool,
    key: Option<String>,
    line: Option<Option<usize>>,
    message: Option<String>,
}

fn parse_expect(name: &str, text: &str) -> Expect {
    let first = text.lines().next().unwrap_or("");
    let spec = first.strip_prefix("# expect:").unwrap_or_else(|| panic!("{name}: the first line must be `# expect: ok` or `# expect: error ...`")).trim();
    if spec == "ok" {
        return Expect { ok: true, key: None, line: None, message: None };
    }
    let rest = spec.strip_prefix("error").unwrap_or_else(|| panic!("{name}: `{spec}` is neither ok nor error")).trim();
    let mut e = Expect { ok: false, key: None, line: None, message: None };
    // key=K line=N|none message=the rest of the line
    let (head, message) = match rest.split_once("message=") {
        Some((h, m)) => (h, Some(m.trim().to_string())),
        None => (rest, None),
    };
    e.message = message;
    for part in head.split_whitespace() {
        match part.split_once('=') {
            Some(("key", k)) => e.key = Some(k.to_string()),
            Some(("line", "none")) => e.line = Some(None),
            Some(("line", n)) => e.line = Some(Some(n.parse().unwrap_or_else(|_| panic!("{name}: bad line `{n}`")))),
            _ => panic!("{name}: cannot read `{part}`"),
        }
    }
    e
}

/// Every case in `corpus/`: loads without panicking, as recorded in its first line, and its
/// error (if any) names file, line and key.
#[test]
fn corpus_cases_load_as_recorded() {
    let dir = Utf8Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config/corpus");
    let mut files: Vec<Utf8PathBuf> = dir.read_dir_utf8().expect("corpus dir").flatten().map(|e| e.path().to_owned()).filter(|p| p.extension() == Some("toml")).collect();
    files.sort();
    assert!(files.len() >= 10, "only {} corpus files", files.len());
    let mut wrong = vec![];
    for f in files {
        let name = f.file_name().unwrap_or("?").to_string();
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = parse_expect(&name, &text);
        if let Err(why) = check(&text) {
            wrong.push(format!("{name}: {why}"));
            continue;
        }
        match (load(&text), want.ok) {
            (Ok(_), true) => {}
            (Ok(_), false) => wrong.push(format!("{name}: loads, but an error was recorded")),
            (Err(e), true) => wrong.push(format!("{name}: was recorded as loading, but: {e}")),
            (Err(e), false) => {
                let line = e.line.map(|l| l.0);
                if want.key.as_ref().is_some_and(|k| *k != e.key)
                    || want.line.is_some_and(|l| l != line)
                    || want.message.as_ref().is_some_and(|m| !e.message.contains(m.as_str()))
                {
                    wrong.push(format!("{name}: recorded key={:?} line={:?} message~{:?}, got: {e}", want.key, want.line, want.message));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{} corpus cases differ:\n{}", wrong.len(), wrong.join("\n"));
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
