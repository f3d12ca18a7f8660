//! Build the container image (SIF) from the generated definition, unless an image with the
//! same definition hash exists.

use crate::config::{Config, Runtime};
use crate::plan::{Arg, Cmd, Stage, Step, Var};
use crate::stages::definition::{self, Definition};
use crate::stages::facts::Facts;
use anyhow::{bail, Result};
use camino::Utf8Path;

/// What `--check` says when the committed definition is stale.
pub fn check(cfg: &Config, def: &Definition) -> Result<()> {
    let path = &cfg.image.definition;
    let shown = crate::paths::display(&cfg.root, path);
    match std::fs::read_to_string(path) {
        Ok(on_disk) if on_disk == def.text => Ok(()),
        Ok(_) => bail!(
            "singularity --check: {shown} differs from what the `{}` target's config generates\n  fix: run `cargo xtask singularity --target {0}` and commit {shown}",
            cfg.target
        ),
        Err(_) => bail!(
            "singularity --check: {shown} does not exist\n  fix: run `cargo xtask singularity --target {}` and commit {shown}",
            cfg.target
        ),
    }
}

pub fn plan(cfg: &Config, facts: &Facts, force: bool) -> Result<Stage> {
    if cfg.runtime == Runtime::Host {
        return Ok(Stage::skip("singularity", "runtime `host` uses no container image"));
    }
    let Some(bin) = facts.runtime_bin.as_deref().filter(|_| facts.runtime_missing.is_none() || cfg.image.build_on_login) else {
        bail!(
            "singularity: no container runtime: {}\n  fix: install Apptainer (on Debian 12: `bash xtask/testbed/install-deps.sh`), set `runtime` under [container], or use `--runtime host`",
            facts.runtime_missing.as_deref().unwrap_or("none found")
        );
    };
    let def = &facts.definition;
    let def_path = &cfg.image.definition;
    let mut steps = vec![];
    let def_current = std::fs::read_to_string(def_path).is_ok_and(|t| t == def.text);
    if !def_current {
        steps.push(Step::WriteFile { path: def_path.clone(), contents: def.text.clone() });
    }
    let sif = &cfg.image.sif;
    if !force && facts.image_hash.as_deref() == Some(def.hash.as_str()) {
        if steps.is_empty() {
            return Ok(Stage::skip("singularity", format!("image {} has definition hash {} (use --force to rebuild)", display(cfg, sif), def.hash)));
        }
        return Ok(Stage::run("singularity", "definition file rewritten; the image is current", steps));
    }
    // One build of an image at a time; a second one waits and then finds it current.
    steps.push(Step::Lock { path: Utf8Path::new(&format!("{sif}.lock")).to_owned(), what: format!("build of {}", display(cfg, sif)) });
    let partial = Arg::Concat(vec![Arg::lit(format!("{sif}.partial-")), Arg::Var(Var::RunId)]);
    let mut argv: Vec<Arg> = vec![bin.into(), "build".into()];
    if cfg.image.fakeroot {
        argv.push("--fakeroot".into());
    }
    argv.extend(cfg.image.build_args.iter().map(|a| Arg::lit(a.clone())));
    argv.extend(["--build-arg".into(), Arg::lit(format!("SOURCE_COMMIT={}", facts.commit))]);
    argv.push(partial.clone());
    argv.push(def_path.into());
    if cfg.image.build_on_login {
        let Some(ssh) = &cfg.ssh else {
            bail!("singularity: `build_on = \"login\"` needs a login host\n  fix: set `host` under [reach], or `build_on = \"local\"` under [image]");
        };
        steps.push(Step::Note(format!("building on the login node {} over ssh; the SIF stays there", ssh.host)));
        steps.push(Step::Remote { host: ssh.host.clone(), argv, log: "image-build.log".into() });
        return Ok(Stage::run("singularity", format!("no image with definition hash {} on the login node", def.hash), steps));
    }
    let why = match (&facts.image_hash, force) {
        (_, true) => "--force".to_string(),
        (Some(h), _) => format!("the image has definition hash {h}, the definition now {}", def.hash),
        (None, _) => format!("no image {} yet", display(cfg, sif)),
    };
    steps.push(Step::BuildImage { cmd: Cmd { argv, env: vec![], cwd: Some(cfg.root.clone()) }, partial, sif: sif.clone() });
    Ok(Stage::run("singularity", why, steps))
}

fn display(cfg: &Config, p: &Utf8Path) -> String {
    crate::paths::display(&cfg.root, p)
}

/// The definition hash recorded in a built SIF, read with `apptainer inspect --labels`.
pub fn built_hash(bin: &str, sif: &Utf8Path) -> Option<String> {
    if !sif.is_file() {
        return None;
    }
    let out = std::process::Command::new(bin).args(["inspect", "--labels"]).arg(sif).stderr(std::process::Stdio::null()).output().ok()?;
    out.status.success().then(|| definition::hash_from_labels(&String::from_utf8_lossy(&out.stdout))).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, Overrides};

    #[test]
    fn check_names_the_stale_file_and_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let root = camino::Utf8Path::from_path(dir.path()).unwrap();
        let cfg = load_str(root, "t", None, "", &Overrides::default()).unwrap();
        let def = definition::generate(&cfg);
        let e = check(&cfg, &def).unwrap_err().to_string();
        assert!(e.contains("singularity/daphne.def does not exist") && e.contains("cargo xtask singularity --target t"), "{e}");
        std::fs::create_dir_all(root.join("singularity")).unwrap();
        std::fs::write(&cfg.image.definition, "Bootstrap: docker\n").unwrap();
        let e = check(&cfg, &def).unwrap_err().to_string();
        assert!(e.contains("differs from what") && e.contains("run `cargo xtask singularity --target t` and commit"), "{e}");
        std::fs::write(&cfg.image.definition, &def.text).unwrap();
        check(&cfg, &def).unwrap();
    }
}

#[cfg(test)]
mod login_tests {
    use super::*;
    use crate::config::{load_str, Overrides};

    /// `build_on = "login"` plans the build as a command on the login host, over ssh.
    #[test]
    fn build_on_the_login_node_is_a_remote_step() {
        let toml = "[reach]\nhost = \"login.example.eu\"\nremote_dir = \"/scratch/a\"\n[container]\nruntime = \"apptainer\"\n[image]\nbuild_on = \"login\"\nfakeroot = true\n";
        let cfg = load_str(camino::Utf8Path::new("/repo"), "hpc", None, toml, &Overrides::default()).unwrap();
        let facts = crate::stages::facts::Facts {
            runtime_bin: Some("apptainer".into()),
            runtime_missing: None,
            build_key: "k".into(),
            build_cached: false,
            source_exists: true,
            commit: "c".into(),
            dirty: false,
            definition: definition::generate(&cfg),
            image_hash: None,
        };
        let stage = plan(&cfg, &facts, false).unwrap();
        let remote = stage.steps.iter().find_map(|s| match s {
            Step::Remote { host, argv, .. } => Some((host.clone(), argv.iter().map(crate::plan::render_arg).collect::<Vec<_>>())),
            _ => None,
        });
        let (host, argv) = remote.expect("a remote build step");
        assert_eq!(host, "login.example.eu");
        assert_eq!(&argv[..3], ["apptainer", "build", "--fakeroot"]);
    }
}
