//! `cargo xtask`: build DAPHNE in Singularity/Apptainer and deploy it to SLURM clusters.

mod bench;
mod cli;
mod commands;
mod config;
mod doctor;
mod exec;
mod package;
mod paths;
mod plan;
mod proc;
mod quote;
#[cfg(test)] mod quote_props;
mod runstate;
mod secrets;
mod signals;
mod ssh;
mod testbed;
mod transfer;
mod stages;
mod ui;

use clap::Parser;

fn main() {
    if std::env::args_os().len() == 1 {
        // No arguments: help on stdout and success, as `cargo xtask` users expect.
        let _ = <cli::Cli as clap::CommandFactory>::command().print_help();
        return;
    }
    let cli = cli::Cli::parse();
    let root = paths::project_root();
    let result = commands::main(&root, &cli.global, cli.command);
    std::process::exit(match result {
        Ok(()) => 0,
        Err(e) => exit_code_of(&e),
    })
}

/// Prints the error and maps it to the exit code: the coordinator's own code, 128+signal
/// when interrupted, 2 for configuration errors, 1 otherwise.
fn exit_code_of(e: &anyhow::Error) -> i32 {
    if let Some(exec::CoordinatorFailed(code)) = e.downcast_ref() {
        return *code;
    }
    if let Some(signals::Interrupted(sig)) = e.downcast_ref() {
        ui::error(&format!("{e}; cleaned up"));
        return signals::exit_code(*sig);
    }
    ui::error(&format!("{e:#}"));
    if e.downcast_ref::<config::ConfigError>().is_some() {
        2
    } else {
        1
    }
}
