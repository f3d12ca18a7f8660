//! The system OpenSSH client: users' ~/.ssh/config, ProxyJump, agents and keys work as they
//! expect. One ControlMaster per session, so a whole deploy costs one SSH handshake. Remote
//! command lines are built only by `quote::join`.

use crate::config::Ssh;
use crate::quote;
use anyhow::{bail, Context, Result};
use camino::Utf8PathBuf;
use std::io::Write;
use std::process::{Command, Output, Stdio};

/// Options every connection gets: never prompt, always verify host keys.
pub fn base_args(s: &Ssh) -> Vec<String> {
    let mut a: Vec<String> = vec!["-o".into(), "BatchMode=yes".into(), "-o".into(), format!("ConnectTimeout={}", s.connect_timeout)];
    if let Some(f) = &s.ssh_config {
        a.extend(["-F".into(), f.to_string()]);
    }
    if let Some(k) = &s.known_hosts {
        a.extend(["-o".into(), format!("UserKnownHostsFile={}", option_path(k.as_str())), "-o".into(), "StrictHostKeyChecking=yes".into()]);
    }
    if let Some(p) = s.port {
        a.extend(["-p".into(), p.to_string()]);
    }
    if let Some(u) = &s.user {
        a.extend(["-l".into(), u.clone()]);
    }
    if let Some(i) = &s.identity {
        // As an option, not `-i`: ssh checks an `-i` file under its literal name but opens it
        // after expanding `%` tokens, so no escaping makes `-i` work for a name with `%`.
        a.extend(["-o".into(), format!("IdentityFile={}", option_path(i.as_str())), "-o".into(), "IdentitiesOnly=yes".into()]);
    }
    if let Some(j) = &s.proxy_jump {
        a.extend(["-J".into(), j.clone()]);
    }
    a.extend(s.options.iter().cloned());
    a
}

/// A path as the value of an `-o Key=Value` option. ssh splits such values at whitespace
/// (UserKnownHostsFile takes a list) and expands `%` tokens, so the path goes in double
/// quotes, with `\`, `"` and `%` escaped.
fn option_path(p: &str) -> String {
    let mut out = String::from("\"");
    for c in p.chars() {
        match c {
            '\\' | '"' => {
                out.push('\\');
                out.push(c);
            }
            '%' => out.push_str("%%"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An ssh connection to one host, multiplexed through a ControlMaster that this session
/// starts on first use and stops when dropped.
pub struct Session {
    pub cfg: Ssh,
    /// Short private directory for the control socket (socket paths are limited to ~100 bytes).
    control_dir: tempfile::TempDir,
}

impl Session {
    pub fn new(cfg: &Ssh) -> Result<Session> {
        let control_dir = tempfile::Builder::new().prefix("dx-").tempdir_in("/tmp").context("cannot create a directory for the ssh control socket")?;
        Ok(Session { cfg: cfg.clone(), control_dir })
    }

    pub fn host(&self) -> &str {
        &self.cfg.host
    }

    pub fn control_path(&self) -> Utf8PathBuf {
        Utf8PathBuf::from_path_buf(self.control_dir.path().join("cm")).unwrap_or_else(|p| Utf8PathBuf::from(p.to_string_lossy().into_owned()))
    }

    /// ssh options including the multiplexing ones (for `ssh` and `rsync -e`).
    pub fn options(&self) -> Vec<String> {
        let mut a = base_args(&self.cfg);
        a.extend([
            "-o".into(),
            "ControlMaster=auto".into(),
            "-o".into(),
            format!("ControlPath={}", self.control_path()),
            "-o".into(),
            "ControlPersist=120".into(),
            "-o".into(),
            "ServerAliveInterval=15".into(),
        ]);
        a
    }

    /// The argv that runs `remote` (an argv, quoted here) on the host.
    pub fn argv(&self, remote: &[String]) -> Result<Vec<String>> {
        let line = quote::join(remote)?;
        let mut a = vec!["ssh".to_string()];
        a.extend(self.options());
        a.push(self.cfg.host.clone());
        a.push("--".into());
        a.push(line);
        Ok(a)
    }

    /// The command, in a process group of its own: a Ctrl-C at the terminal reaches only the
    /// tool, which finishes or stops the remote command itself (an `sbatch` killed halfway
    /// could leave a job whose id was never read, and so never cancelled).
    pub fn command(&self, remote: &[String]) -> Result<Command> {
        use std::os::unix::process::CommandExt;
        let argv = self.argv(remote)?;
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]).process_group(0);
        Ok(c)
    }

    /// Runs a remote command, capturing its output; an ssh failure becomes an error that
    /// names the host and the fix.
    pub fn output(&self, remote: &[String], stdin: Option<&[u8]>) -> Result<Output> {
        let mut c = self.command(remote)?;
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = c.spawn().context("cannot start `ssh`; is the OpenSSH client installed?")?;
        if let (Some(bytes), Some(mut w)) = (stdin, child.stdin.take()) {
            let bytes = bytes.to_vec();
            std::thread::spawn(move || {
                let _ = w.write_all(&bytes);
            });
        }
        let out = child.wait_with_output()?;
        if out.status.code() == Some(255) {
            return Err(ssh_error(&self.cfg, &String::from_utf8_lossy(&out.stderr)));
        }
        Ok(out)
    }

    /// Runs a remote command that must succeed; returns its stdout.
    pub fn run(&self, remote: &[String]) -> Result<String> {
        let out = self.output(remote, None)?;
        if !out.status.success() {
            bail!(
                "on {}: `{}` failed with exit code {}: {}",
                self.cfg.host,
                quote::display(remote),
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes `bytes` to a remote file (through `cat`), creating it with mode `mode`.
    pub fn write_file(&self, path: &str, bytes: &[u8], mode: u32) -> Result<()> {
        let script = "umask 077; cat > \"$1.tmp.$$\" && chmod \"$2\" \"$1.tmp.$$\" && mv -f \"$1.tmp.$$\" \"$1\"";
        let remote = ["sh", "-c", script, "sh", path, &format!("{mode:o}")].map(String::from);
        let out = self.output(&remote, Some(bytes))?;
        if !out.status.success() {
            bail!("on {}: cannot write {path}: {}", self.cfg.host, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Stops the ControlMaster, if one was started.
    pub fn close(&self) {
        if self.control_path().exists() {
            let _ = Command::new("ssh")
                .args(base_args(&self.cfg))
                .args(["-o", &format!("ControlPath={}", self.control_path()), "-O", "exit", &self.cfg.host])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

/// Turns ssh's own failure (exit 255) into an error that names the host and the fix.
pub fn ssh_error(cfg: &Ssh, stderr: &str) -> anyhow::Error {
    let host = &cfg.host;
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    let (what, fix) = if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") || stderr.contains("has changed and you have requested strict checking") {
        // The stale entry is in the target's own known_hosts file when it names one, and is
        // recorded as `[host]:port` for ports other than 22.
        let entry = match cfg.port {
            Some(p) if p != 22 => format!("[{host}]:{p}"),
            _ => host.clone(),
        };
        let file = cfg.known_hosts.as_ref().map(|k| format!("-f {} ", quote::quote(k.as_str()))).unwrap_or_default();
        (
            "the host key of {host} has CHANGED since it was recorded (or someone is intercepting the connection)",
            format!(
                "if the change is expected (reinstalled host), remove the old key with `ssh-keygen {file}-R {}`, then verify the new fingerprint with your admins and add it",
                quote::quote(&entry)
            ),
        )
    } else if stderr.contains("Host key verification failed") || stderr.contains("No ED25519 host key is known") || stderr.contains("host key is known") {
        ("the host key of {host} is unknown", format!("verify the fingerprint, then add it: `ssh-keyscan -p {} {host} >> ~/.ssh/known_hosts` (host keys are always checked)", cfg.port.unwrap_or(22)))
    } else if stderr.contains("Permission denied") {
        ("authentication to {host} failed", "check `user` and `identity` under [reach], or load the key into your ssh agent (`ssh-add`)".to_string())
    } else if stderr.contains("Could not resolve hostname") {
        ("the host name {host} does not resolve", "check `host` under [reach] (or its Host entry in ~/.ssh/config)".to_string())
    } else if stderr.contains("timed out") || stderr.contains("No route to host") || stderr.contains("Connection refused") || stderr.contains("Network is unreachable") {
        ("{host} is unreachable", format!("check the network or VPN, `host`/`port` under [reach], and `proxy_jump`; the connect timeout is {}s", cfg.connect_timeout))
    } else {
        ("ssh to {host} failed", "run the same `ssh` by hand with `-v` to see why".to_string())
    };
    anyhow::anyhow!("{}: {last}\n  fix: {fix}", what.replace("{host}", host))
}

/// The `-e` argument of rsync: ssh with this session's options, quoted for rsync's own
/// parser, which splits on spaces and honours single quotes, where `''` stands for one quote
/// (it knows no backslash escapes, so `quote::quote` would not do).
pub fn rsync_rsh(session: &Session) -> String {
    let mut a = vec!["ssh".to_string()];
    a.extend(session.options());
    a.iter().map(|w| rsync_quote(w)).collect::<Vec<_>>().join(" ")
}

fn rsync_quote(w: &str) -> String {
    if !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_changed_host_key_names_the_known_hosts_file_and_entry() {
        let mut cfg = crate::config::Ssh {
            host: "login.example.org".into(),
            user: None,
            port: Some(2222),
            identity: None,
            proxy_jump: None,
            known_hosts: Some("/keys/known hosts".into()),
            ssh_config: None,
            options: vec![],
            connect_timeout: 10,
        };
        // What OpenSSH prints under StrictHostKeyChecking=yes (at LogLevel ERROR, without the banner).
        let stderr = "Host key for [login.example.org]:2222 has changed and you have requested strict checking.\nHost key verification failed.\n";
        let e = super::ssh_error(&cfg, stderr).to_string();
        assert!(e.contains("CHANGED") && e.contains("ssh-keygen -f '/keys/known hosts' -R '[login.example.org]:2222'"), "{e}");
        cfg.port = None;
        cfg.known_hosts = None;
        let e = super::ssh_error(&cfg, "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.\n").to_string();
        assert!(e.contains("CHANGED") && e.contains("`ssh-keygen -R login.example.org`"), "{e}");
    }

    /// ssh itself reads the quoted option back as the exact path (`ssh -G` prints what it
    /// would use, without connecting).
    #[test]
    fn paths_in_ssh_options_survive_spaces_quotes_and_percent() {
        let path = "/tmp/dä phne %r \"q\" \\x/known hosts";
        let out = std::process::Command::new("ssh").args(["-G", "-o", &format!("UserKnownHostsFile={}", super::option_path(path)), "example.org"]).output().unwrap();
        let cfg = String::from_utf8_lossy(&out.stdout);
        let line = cfg.lines().find(|l| l.starts_with("userknownhostsfile ")).unwrap_or_else(|| panic!("{cfg}"));
        assert_eq!(&line["userknownhostsfile ".len()..], path);
    }

    #[test]
    fn rsync_quoting_doubles_single_quotes() {
        assert_eq!(super::rsync_quote("ControlPath=/tmp/dx-1/cm"), "ControlPath=/tmp/dx-1/cm");
        assert_eq!(super::rsync_quote("/keys/it's mine"), "'/keys/it''s mine'");
    }
}
