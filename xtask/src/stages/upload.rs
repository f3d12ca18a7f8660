//! Put the package on the target as `<remote_dir>/releases/<hash>/`.
//!
//! For `local`, the "target" is a directory on this machine, laid out exactly like a
//! cluster's: the same verify-then-extract path runs, so it is tested on every deploy.

use crate::config::{Config, Scheduler};
use crate::plan::{Stage, Step};
use anyhow::Result;

pub fn releases_dir(cfg: &Config) -> String {
    format!("{}/releases", cfg.remote_dir.trim_end_matches('/'))
}

pub fn runs_dir(cfg: &Config) -> String {
    format!("{}/runs", cfg.remote_dir.trim_end_matches('/'))
}

pub fn plan(cfg: &Config, facts: &crate::stages::facts::Facts) -> Result<Stage> {
    match cfg.scheduler {
        Scheduler::Slurm => return Ok(crate::stages::slurm::plan_upload(cfg, facts)),
        Scheduler::Ssh => return Ok(crate::stages::sshmode::plan_upload(cfg, facts)),
        Scheduler::Local => {}
    }
    Ok(Stage::run(
        "upload",
        "an already complete release of the same hash is kept as it is",
        vec![Step::Install { releases: releases_dir(cfg) }],
    ))
}
