//! Tests against the real testbed: slurmctld, slurmd on several nodes, munged and sshd in
//! network namespaces. One testbed serves the whole test binary; it is torn down when the
//! binary exits, also after failures.

mod fixture;
mod slurm;
mod sshmode;
mod transfer;
