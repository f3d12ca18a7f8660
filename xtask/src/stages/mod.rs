//! One module per stage of the sweep. Each has a pure `plan` that returns a `Stage`; the
//! executor in `exec.rs` runs the steps.

pub mod compile;
pub mod coordinator;
pub mod upload;
pub mod container;
pub mod definition;
pub mod facts;
pub mod image;
pub mod payload;
pub mod slurm;
pub mod sshmode;
pub mod workers;
