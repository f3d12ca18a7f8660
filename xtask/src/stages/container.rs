//! How a command runs through the container runtime (or directly, for runtime `host`).

use crate::config::Config;
use crate::plan::{Arg, Cmd, Var};
use crate::stages::facts::Facts;
use camino::Utf8Path;

/// `apptainer exec [runtime args] [--bind D:D ...] [--pwd CWD] IMAGE argv...`, or `argv` as
/// it is for the `host` runtime. Binds keep absolute paths identical inside and outside.
pub fn exec(cfg: &Config, runtime_bin: Option<&str>, image: &Utf8Path, binds: &[&Utf8Path], cwd: Option<&Utf8Path>, argv: Vec<Arg>) -> Cmd {
    let Some(bin) = runtime_bin else {
        let mut c = Cmd { argv, env: vec![], cwd: None };
        if let Some(d) = cwd {
            c = c.cwd(d);
        }
        return c;
    };
    let mut full: Vec<Arg> = vec![bin.into(), "exec".into()];
    full.extend(cfg.runtime_args.iter().map(|a| Arg::lit(a.clone())));
    for b in binds {
        full.push("--bind".into());
        full.push(format!("{b}:{b}").into());
    }
    if let Some(d) = cwd {
        full.push("--pwd".into());
        full.push(d.to_string().into());
    }
    full.push(image.to_string().into());
    full.extend(argv);
    Cmd { argv: full, env: vec![], cwd: cwd.map(|d| d.to_owned()) }
}

/// `apptainer exec [runtime args] --bind D:D <image>` before a command that runs on the
/// target, where D is the remote directory and the image is the one stored there; empty for
/// the `host` runtime.
pub fn remote_prefix(cfg: &Config, facts: &Facts) -> Vec<Arg> {
    let Some(bin) = &facts.runtime_bin else { return vec![] };
    let mut a = vec![Arg::lit(bin.clone()), "exec".into()];
    a.extend(cfg.runtime_args.iter().map(|x| Arg::lit(x.clone())));
    a.extend(["--bind".into(), Arg::lit(format!("{0}:{0}", cfg.remote_dir))]);
    a.push(Arg::Var(Var::Image));
    a
}
