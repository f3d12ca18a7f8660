//! The system OpenSSH client as an argv builder, so users' ~/.ssh/config, ProxyJump, agents
//! and keys work as they expect. Remote command lines are built only by `quote::join`.

use crate::config::Ssh;
use crate::plan::{Arg, Cmd};

/// Options every connection gets: never prompt, always verify host keys.
pub fn base_args(s: &Ssh) -> Vec<String> {
    let mut a: Vec<String> = vec!["-o".into(), "BatchMode=yes".into(), "-o".into(), format!("ConnectTimeout={}", s.connect_timeout)];
    if let Some(f) = &s.ssh_config {
        a.extend(["-F".into(), f.to_string()]);
    }
    if let Some(k) = &s.known_hosts {
        a.extend(["-o".into(), format!("UserKnownHostsFile={k}"), "-o".into(), "StrictHostKeyChecking=yes".into()]);
    }
    if let Some(p) = s.port {
        a.extend(["-p".into(), p.to_string()]);
    }
    if let Some(u) = &s.user {
        a.extend(["-l".into(), u.clone()]);
    }
    if let Some(i) = &s.identity {
        a.extend(["-i".into(), i.to_string(), "-o".into(), "IdentitiesOnly=yes".into()]);
    }
    if let Some(j) = &s.proxy_jump {
        a.extend(["-J".into(), j.clone()]);
    }
    a.extend(s.options.iter().cloned());
    a
}

/// `ssh [options] HOST -- 'quoted remote argv'`.
pub fn command(s: &Ssh, remote: &[String]) -> Result<Cmd, crate::quote::NulInArg> {
    let line = crate::quote::join(remote)?;
    let mut argv: Vec<Arg> = vec!["ssh".into()];
    argv.extend(base_args(s).into_iter().map(Arg::Lit));
    argv.push(Arg::Lit(s.host.clone()));
    argv.push("--".into());
    argv.push(Arg::Lit(line));
    Ok(Cmd { argv, env: vec![], cwd: None })
}
